//! `qcow2_image`: hostile qcow2 images against the engine ([`qcow_snapshot::QcowImage`]) and the
//! independent checker ([`qcow_snapshot::check::check`]).
//!
//! The image is either the input itself (so real `qemu-img` images serve as seeds) or one of a
//! few valid built-in images with byte patches from the input applied (so the fuzzer starts from
//! consistent tables and mutates single fields). The harness checks the image, opens it with
//! the engine over an in-memory host file bounded to [`HOST_LIMIT`] bytes (a hostile offset
//! cannot grow it past that; the engine's own allocations are what is under test), does one
//! read, one write, a flush and a close, then checks the result.
//!
//! Oracles: no panic, no allocation beyond libFuzzer's `-malloc_limit_mb`, and: when the check
//! called the input image free of corruptions and the engine then opened it read-write, wrote,
//! flushed and closed without any error, the check of the result must find no corruption
//! either (the engine must never break a consistent image).
//!
//! Input format: `mode:u8 read_off:u32 read_len:u16 write_off:u32 write_len:u16 fill:u8`, then
//! either the whole image (mode bit 0 clear) or patches `off:u32 n:u8 bytes[n]` over built-in
//! image number `(mode >> 3) % 3` (mode bit 0 set). Mode bit 1 opens read-only, bit 2 also runs
//! a full repair (`check -r all`) on the result and checks it again.

use std::io;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock, RwLock};

use blockdev::{BlockDev, MemDisk};
use qcow_snapshot::check::{check, Repair};
use qcow_snapshot::{create_on, CreateOptions, HostFile, ImageHeader, QcowImage};

use crate::{Reader, Writer};

/// Largest host file the harness keeps in memory; writes beyond fail with ENOSPC.
pub const HOST_LIMIT: u64 = 64 << 20;
/// Largest input image accepted in whole-image mode.
const MAX_IMAGE: usize = 4 << 20;
/// Largest backing disk given to an image that names one.
const MAX_BACKING: u64 = 4 << 20;
/// Most patches applied.
const MAX_PATCHES: usize = 64;

/// An image file in memory that refuses to grow past [`HOST_LIMIT`].
#[derive(Debug, Default)]
pub struct BoundedHost {
    data: RwLock<Vec<u8>>,
}

impl BoundedHost {
    /// A host file holding `data`.
    pub fn new(data: Vec<u8>) -> Self {
        BoundedHost {
            data: RwLock::new(data),
        }
    }

    /// A copy of the content.
    pub fn contents(&self) -> Vec<u8> {
        self.data.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

fn bounded_end(offset: u64, len: usize) -> io::Result<usize> {
    offset
        .checked_add(len as u64)
        .filter(|&e| e <= HOST_LIMIT)
        .map(|e| e as usize)
        .ok_or_else(|| io::Error::from_raw_os_error(libc_enospc()))
}

const fn libc_enospc() -> i32 {
    28
}

impl HostFile for BoundedHost {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        buf.fill(0);
        let data = self.data.read().unwrap_or_else(|e| e.into_inner());
        let Ok(start) = usize::try_from(offset) else {
            return Ok(());
        };
        if let Some(avail) = data.get(start..) {
            let n = avail.len().min(buf.len());
            buf[..n].copy_from_slice(&avail[..n]);
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let end = bounded_end(offset, buf.len())?;
        let mut data = self.data.write().unwrap_or_else(|e| e.into_inner());
        if data.len() < end {
            data.resize(end, 0);
        }
        data[end - buf.len()..end].copy_from_slice(buf);
        Ok(())
    }

    fn sync_data(&self) -> io::Result<()> {
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.data.read().unwrap_or_else(|e| e.into_inner()).len() as u64)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let end = bounded_end(len, 0)?;
        self.data
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .resize(end, 0);
        Ok(())
    }
}

/// Builds a valid image with the engine: `size` bytes, `cluster_size` clusters, refcount
/// order `order`, a few clusters written, optionally naming a backing file, optionally with
/// extended L2 entries (subclusters).
fn build_image(
    size: u64,
    cluster_size: u64,
    order: u32,
    backing: bool,
    extended_l2: bool,
) -> Vec<u8> {
    let host = Arc::new(BoundedHost::default());
    let opts = CreateOptions {
        size,
        cluster_size,
        backing: backing.then(|| ("base.raw".to_string(), qcow_snapshot::Format::Raw)),
        refcount_order: order,
        extended_l2,
    };
    create_on(&*host, &opts).expect("create built-in image");
    let backing_dev: Option<Arc<dyn BlockDev>> = if backing {
        Some(Arc::new(MemDisk::new(size as usize)))
    } else {
        None
    };
    let img = QcowImage::open_with(Box::new(host.clone()), false, backing_dev)
        .expect("open built-in image");
    for (i, off) in [0u64, 3 * cluster_size + 512, size / 2, size - cluster_size]
        .into_iter()
        .enumerate()
    {
        let buf = vec![0x40 + i as u8; cluster_size as usize];
        img.write_at(&buf, off.min(size - cluster_size))
            .expect("write built-in image");
    }
    img.write_zeroes(5 * cluster_size, cluster_size, false)
        .expect("write zeroes into built-in image");
    if extended_l2 {
        // Partly allocated clusters: some subclusters data, some zero, the rest unallocated.
        img.write_at(&[0x77; 700], 7 * cluster_size + 1000)
            .expect("write subclusters of built-in image");
        img.write_zeroes(7 * cluster_size + 4096, 2048, false)
            .expect("zero subclusters of built-in image");
    }
    img.close().expect("close built-in image");
    drop(img);
    host.contents()
}

/// The built-in base images for patch mode.
pub fn base_images() -> &'static [Vec<u8>; 4] {
    static BASES: OnceLock<[Vec<u8>; 4]> = OnceLock::new();
    BASES.get_or_init(|| {
        [
            build_image(1 << 20, 4096, 4, false, false),
            build_image(256 << 10, 512, 0, false, false),
            build_image(2 << 20, 64 << 10, 6, true, false),
            build_image(1 << 20, 16 << 10, 4, true, true),
        ]
    })
}

/// A scratch file for the checker, unique per call.
fn scratch_path() -> PathBuf {
    let dir = if std::path::Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    // One file per call: the harness's own tests run inputs on several threads at once.
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    dir.join(format!("snapblk-fuzz-qcow2-{}-{n}.img", std::process::id()))
}

/// Writes `image` to the scratch file and checks it (optionally repairing it first).
fn check_bytes(image: &[u8], repair: Option<Repair>) -> Option<qcow_snapshot::check::CheckReport> {
    let path = scratch_path();
    std::fs::write(&path, image).ok()?;
    let report = check(&path, repair).ok();
    let _ = std::fs::remove_file(&path);
    report
}

/// Runs one input.
pub fn run(data: &[u8]) {
    run_outcome(data);
}

/// What one input did (for the harness's own tests).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QcowOutcome {
    /// The checker called the input image free of corruptions and check errors.
    pub consistent: bool,
    /// The engine opened the image.
    pub opened: bool,
    /// The write, flush and close all succeeded.
    pub wrote: bool,
}

/// Runs one input and says how far it got.
pub fn run_outcome(data: &[u8]) -> QcowOutcome {
    let mut outcome = QcowOutcome::default();
    let mut r = Reader::new(data);
    let mode = r.u8();
    let read_off = u64::from(r.u32());
    let read_len = usize::from(r.u16());
    let write_off = u64::from(r.u32());
    let write_len = usize::from(r.u16());
    let fill = r.u8();
    let read_only = mode & 2 != 0;
    let repair = mode & 4 != 0;

    let image = if mode & 1 == 0 {
        let rest = r.rest();
        if rest.len() > MAX_IMAGE {
            return outcome;
        }
        rest.to_vec()
    } else {
        let bases = base_images();
        let mut img = bases[usize::from(mode >> 3) % bases.len()].clone();
        let mut n = 0;
        while !r.is_empty() && n < MAX_PATCHES {
            n += 1;
            let off = r.u32() as usize % img.len().max(1);
            let len = usize::from(r.u8());
            let bytes = r.bytes(len);
            let end = (off + bytes.len()).min(img.len());
            img[off..end].copy_from_slice(&bytes[..end - off]);
        }
        img
    };

    let before = check_bytes(&image, None);
    let consistent = before
        .as_ref()
        .is_some_and(|rep| rep.corruptions == 0 && rep.check_errors == 0 && rep.failure.is_none());

    let host = Arc::new(BoundedHost::new(image));
    let backing: Option<Arc<dyn BlockDev>> = match ImageHeader::read(&*host) {
        Ok(ih) if ih.backing.is_some() => {
            let size = ih.header.size.min(MAX_BACKING) as usize;
            let pattern: Vec<u8> = (0..size).map(|i| (i / 4096) as u8 ^ 0xa5).collect();
            Some(Arc::new(MemDisk::from_vec(pattern)))
        }
        _ => None,
    };
    outcome.consistent = consistent;
    let Ok(img) = QcowImage::open_with(Box::new(host.clone()), read_only, backing) else {
        return outcome;
    };
    outcome.opened = true;
    let size = img.size();
    let mut buf = vec![0u8; read_len];
    let read_ok = img.read_at(&mut buf, read_off).is_ok();
    let wbuf = vec![fill; write_len];
    let write_res = img.write_at(&wbuf, write_off);
    let write_ok = write_res.is_ok();
    let flush_ok = img.flush().is_ok();
    if write_ok && flush_ok && !read_only {
        // What was written reads back.
        let mut back = vec![0u8; write_len];
        if img.read_at(&mut back, write_off).is_ok() {
            assert!(
                back == wbuf,
                "write at {write_off} len {write_len} did not read back"
            );
        }
    }
    let close_ok = img.close().is_ok();
    assert_eq!(img.size(), size, "virtual size changed");
    let corrupt = img.is_corrupt();
    drop(img);

    let after_bytes = host.contents();
    let after = check_bytes(&after_bytes, None);
    if consistent
        && !read_only
        && read_ok
        && write_ok
        && flush_ok
        && close_ok
        && !corrupt
        && write_len > 0
    {
        let after = after.expect("the engine's output must still open in the checker");
        assert!(
            after.corruptions == 0,
            "engine turned a consistent image into a corrupt one: {:?}",
            after.messages
        );
    }
    if repair {
        let _ = check_bytes(&after_bytes, Some(Repair::All));
    }
    outcome.wrote = write_ok && flush_ok && close_ok;
    outcome
}

/// Builds inputs for [`run`].
pub fn encode(mode: u8, read: (u32, u16), write: (u32, u16, u8), body: &[u8]) -> Vec<u8> {
    let mut w = Writer::default();
    w.u8(mode)
        .u32(read.0)
        .u16(read.1)
        .u32(write.0)
        .u16(write.1)
        .u8(write.2);
    w.bytes(body);
    w.out
}

/// Patch-mode seeds over the built-in images (whole-image seeds come from `qemu-img`, see
/// `examples/gen_seeds.rs`).
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let mut out = Vec::new();
    // Unpatched base 0, read and write across a cluster boundary.
    out.push((
        "base0_rw",
        encode(1, (4000, 8192), (4096 * 7 + 100, 5000, 0x77), &[]),
    ));
    // Base 1 (512-byte clusters): one harmless patch of the unused header padding.
    let mut p = Writer::default();
    p.u32(200).u8(4).bytes(&[0, 0, 0, 0]);
    out.push((
        "base1_patch",
        encode(1 | 8, (0, 4096), (65536, 1024, 1), &p.out),
    ));
    // Base 2 (backing file, 64 KiB clusters), repair after the write.
    out.push((
        "base2_backing_repair",
        encode(1 | 16 | 4, (65536, 512), (0, 512, 9), &[]),
    ));
    // Base 3 (extended L2, 16 KiB clusters): read the partly allocated cluster 7, write into
    // its unallocated subclusters, repair after the write.
    out.push((
        "base3_subclusters",
        encode(
            1 | 24 | 4,
            (7 * 16384, 16384),
            (7 * 16384 + 3000, 5000, 0x55),
            &[],
        ),
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The built-in images are consistent and writable, so patch-mode fuzzing starts from
    /// images the engine really opens and writes.
    #[test]
    fn built_in_seeds_are_consistent_and_the_engine_writes_them() {
        for (name, input) in seeds() {
            let out = run_outcome(&input);
            assert!(
                out.consistent,
                "{name}: checker finds the image inconsistent"
            );
            assert!(out.opened && out.wrote, "{name}: {out:?}");
        }
    }

    /// The `qemu-img` made seeds (fresh, written, compressed, with an internal snapshot, an
    /// overlay, version 2) are consistent and the engine opens every one of them and writes
    /// every one that is opened read-write.
    #[test]
    fn qemu_img_seeds_are_consistent_and_the_engine_writes_them() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus/qcow2_image");
        let mut n = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().to_string();
            if !name.starts_with("seed-qemu_") {
                continue;
            }
            let input = std::fs::read(&path).unwrap();
            let out = run_outcome(&input);
            assert!(
                out.consistent,
                "{name}: checker finds the image inconsistent"
            );
            assert!(out.opened, "{name}: {out:?}");
            // Read-only seeds (mode bit 1: the image with an internal snapshot) write nothing.
            let read_only = input.first().is_some_and(|m| m & 2 != 0);
            assert_eq!(out.wrote, !read_only, "{name}: {out:?}");
            n += 1;
        }
        assert!(n >= 5, "only {n} qemu-img seeds");
    }

    #[test]
    fn bounded_host_refuses_to_grow_past_its_limit() {
        let h = BoundedHost::default();
        h.write_at(&[1, 2], 10).unwrap();
        assert_eq!(h.len().unwrap(), 12);
        assert!(h.write_at(&[1], HOST_LIMIT).is_err());
        assert!(h.write_at(&[1], u64::MAX).is_err());
        assert!(h.set_len(HOST_LIMIT + 1).is_err());
        let mut b = [9u8; 4];
        h.read_at(&mut b, u64::MAX).unwrap();
        assert_eq!(b, [0; 4]);
    }
}
