//! Engine behaviour: randomized operations against a shadow model with cold reopens,
//! concurrency on a shared cluster, zero/discard semantics, v2 images, the dirty bit, and the
//! path-level operations (commit, export, checksum, snapshot overlays).

mod common;

use std::sync::Arc;

use blockdev::{BlockDev, BlockError};
use common::*;
use qcow_snapshot::{
    checksum, commit, create, create_on, create_snapshot_overlay, export, format, open_image,
    open_qcow2, CreateOptions, Format, HostFile, Mapping, MemHost, QcowImage,
};
use rand::{Rng, SeedableRng};

#[test]
fn random_writes_zeroes_and_discards_match_a_shadow_across_cold_reopens() {
    for (cs, seed, extended_l2) in [
        (4096u64, 1u64, false),
        (65536, 2, false),
        (512, 3, false),
        (65536, 4, true),
        (16384, 5, true),
    ] {
        let dir = tmp();
        let size = 3u64 << 20;
        let base_data = random_bytes(seed + 100, size as usize);
        let img = overlay_with(dir.path(), &base_data, cs, extended_l2);
        let mut shadow = base_data.clone();
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        for reopen in 0..4 {
            let dev = open_image(&img, None, false).unwrap();
            assert_same(
                &read_all(&*dev),
                &shadow,
                &format!("cs {cs} after reopen {reopen}"),
            );
            for i in 0..60 {
                let off = rng.random_range(0..size);
                let len = rng.random_range(1..=(size - off).min(4 * cs + 1000));
                match rng.random_range(0..10) {
                    0..=5 => {
                        let v = random_bytes(rng.random(), len as usize);
                        dev.write_at(&v, off).unwrap();
                        shadow[off as usize..(off + len) as usize].copy_from_slice(&v);
                    }
                    6 => {
                        dev.discard(off, len).unwrap();
                        shadow[off as usize..(off + len) as usize].fill(0);
                    }
                    7 | 8 => {
                        dev.write_zeroes(off, len, rng.random()).unwrap();
                        shadow[off as usize..(off + len) as usize].fill(0);
                    }
                    _ => dev.flush().unwrap(),
                }
                if i % 20 == 0 {
                    let mut b = vec![0u8; len as usize];
                    dev.read_at(&mut b, off).unwrap();
                    assert_same(&b, &shadow[off as usize..(off + len) as usize], "spot read");
                }
            }
        }
        qemu_check_and_compare(&img, &shadow);
        assert_eq!(
            std::fs::read(dir.path().join("base.raw")).unwrap(),
            base_data,
            "base untouched"
        );
    }
}

/// A raw-backed overlay (see [`raw_backed_overlay`]), with extended L2 entries when asked.
fn overlay_with(
    dir: &std::path::Path,
    base_data: &[u8],
    cs: u64,
    extended_l2: bool,
) -> std::path::PathBuf {
    let img = raw_backed_overlay(dir, base_data, Some(cs));
    if extended_l2 {
        create(
            &img,
            &CreateOptions {
                cluster_size: cs,
                backing: Some(("base.raw".into(), Format::Raw)),
                extended_l2: true,
                ..Default::default()
            },
        )
        .unwrap();
    }
    img
}

#[test]
fn concurrent_writes_into_one_unallocated_cluster_allocate_it_once_and_keep_both() {
    for extended_l2 in [false, true] {
        concurrent_writes_into_one_cluster(extended_l2);
    }
}

fn concurrent_writes_into_one_cluster(extended_l2: bool) {
    let dir = tmp();
    let size = 8u64 << 20;
    let base_data = random_bytes(5, size as usize);
    let cs = 65536u64;
    let img = overlay_with(dir.path(), &base_data, cs, extended_l2);
    let dev = open_image(&img, None, false).unwrap();
    // 8 threads, each writing its own 4 KiB slice of every one of 64 clusters.
    let threads: Vec<_> = (0..8u64)
        .map(|t| {
            let dev = dev.clone();
            std::thread::spawn(move || {
                for c in 0..64u64 {
                    let off = c * cs + t * 8192 + 100;
                    dev.write_at(&[t as u8 + 1; 4096], off).unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let mut want = base_data.clone();
    for t in 0..8u64 {
        for c in 0..64u64 {
            let off = (c * cs + t * 8192 + 100) as usize;
            want[off..off + 4096].fill(t as u8 + 1);
        }
    }
    assert_same(&read_all(&*dev), &want, "concurrent writes");
    dev.flush().unwrap();
    drop(dev);
    qemu_check(&img);
    // 64 data clusters + L2 + metadata: no cluster was allocated twice.
    let out = run("qemu-img", &["check", s(&img)]);
    assert!(out.contains("No errors"), "{out}");
    let q = open_qcow2(&img, true).unwrap();
    // (guest cluster, host cluster) of every mapped byte range.
    let mut pairs = std::collections::BTreeSet::new();
    for e in q.map(0, 64 * cs).unwrap() {
        if let Mapping::Data(h) = e.mapping {
            let mut o = 0;
            while o < e.len {
                pairs.insert(((e.offset + o) / cs, (h + o) / cs));
                o += (cs - (e.offset + o) % cs).min(e.len - o);
            }
        }
    }
    let guests: std::collections::BTreeSet<_> = pairs.iter().map(|p| p.0).collect();
    let hosts: std::collections::BTreeSet<_> = pairs.iter().map(|p| p.1).collect();
    assert_eq!(guests.len(), 64, "{extended_l2}");
    assert_eq!(
        (pairs.len(), hosts.len()),
        (64, 64),
        "each guest cluster has its own host cluster ({extended_l2})"
    );
}

#[test]
fn concurrent_random_io_from_many_threads_keeps_metadata_consistent() {
    let dir = tmp();
    let img = dir.path().join("o.qcow2");
    let size = 16u64 << 20;
    create(
        &img,
        &CreateOptions {
            size,
            cluster_size: 4096,
            ..Default::default()
        },
    )
    .unwrap();
    let dev = open_image(&img, None, false).unwrap();
    // Each thread owns a disjoint stripe of 1 MiB regions, so the final content is known.
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let dev = dev.clone();
            std::thread::spawn(move || {
                let mut rng = rand::rngs::StdRng::seed_from_u64(t);
                let mut shadow = vec![0u8; size as usize];
                for i in 0..300 {
                    let region = rng.random_range(0..4u64) * 4 + t;
                    let off = region * (1 << 20) + rng.random_range(0..(1u64 << 20) - 20000);
                    let len = rng.random_range(1..20000u64);
                    if i % 7 == 0 {
                        dev.discard(off, len).unwrap();
                        shadow[off as usize..(off + len) as usize].fill(0);
                    } else {
                        let v = rng.random::<u8>() | 1;
                        dev.write_at(&vec![v; len as usize], off).unwrap();
                        shadow[off as usize..(off + len) as usize].fill(v);
                    }
                    if i % 50 == 0 {
                        dev.flush().unwrap();
                    }
                }
                (t, shadow)
            })
        })
        .collect();
    let mut want = vec![0u8; size as usize];
    for th in threads {
        let (t, shadow) = th.join().unwrap();
        for r in 0..4u64 {
            let s0 = ((r * 4 + t) << 20) as usize;
            want[s0..s0 + (1 << 20)].copy_from_slice(&shadow[s0..s0 + (1 << 20)]);
        }
    }
    assert_same(&read_all(&*dev), &want, "threads");
    drop(dev);
    qemu_check_and_compare(&img, &want);
}

#[test]
fn discard_over_backing_data_reads_zeros_and_never_shows_backing_again() {
    let dir = tmp();
    let size = 1u64 << 20;
    let base_data = vec![0x77u8; size as usize];
    let img = raw_backed_overlay(dir.path(), &base_data, None);
    {
        let dev = open_qcow2(&img, false).unwrap();
        dev.write_at(&[1; 65536], 65536).unwrap();
        dev.discard(0, 3 * 65536).unwrap();
        dev.write_zeroes(5 * 65536 + 10, 100, false).unwrap();
        let ext = dev.map(0, 3 * 65536).unwrap();
        assert_eq!(ext.len(), 1);
        assert_eq!(ext[0].mapping, Mapping::Zero);
        dev.close().unwrap();
    }
    let dev = open_image(&img, None, true).unwrap();
    let got = read_all(&*dev);
    assert!(got[..3 * 65536].iter().all(|&b| b == 0));
    assert!(got[3 * 65536..5 * 65536 + 10].iter().all(|&b| b == 0x77));
    assert!(got[5 * 65536 + 10..5 * 65536 + 110].iter().all(|&b| b == 0));
    assert!(got[5 * 65536 + 110..].iter().all(|&b| b == 0x77));
    drop(dev);
    qemu_check(&img);
    // The discarded data cluster was freed: after close nothing leaks (qemu-img check above).
    let info = run("qemu-img", &["map", "--output=json", s(&img)]);
    assert!(info.contains("\"zero\": true"), "{info}");
}

#[test]
fn v2_images_are_read_and_written_and_zeroes_over_backing_write_zeros() {
    let dir = tmp();
    let size = 2u64 << 20;
    let base_data = vec![0x33u8; size as usize];
    std::fs::write(dir.path().join("base.raw"), &base_data).unwrap();
    let img = dir.path().join("v2.qcow2");
    qemu_overlay(&img, "base.raw", "raw", &["-o", "compat=0.10"], "");
    qemu_io_write(&img, "qcow2", 0x44, 0, 4096);
    let mut want = base_data.clone();
    want[..4096].fill(0x44);
    {
        let dev = open_image(&img, None, false).unwrap();
        assert_same(&read_all(&*dev), &want, "v2 read");
        dev.write_at(&[0x55; 1000], 70000).unwrap();
        want[70000..71000].fill(0x55);
        dev.discard(131072, 131072).unwrap();
        want[131072..262144].fill(0);
        dev.write_zeroes(0, 65536, true).unwrap();
        want[..65536].fill(0);
        assert_same(&read_all(&*dev), &want, "v2 after writes");
    }
    let out = run("qemu-img", &["info", s(&img)]);
    assert!(out.contains("compat: 0.10"), "{out}");
    qemu_check_and_compare(&img, &want);
}

#[test]
fn image_left_dirty_by_a_crash_is_repaired_on_read_write_open() {
    let dir = tmp();
    let img = dir.path().join("d.qcow2");
    create(
        &img,
        &CreateOptions {
            size: 4 << 20,
            cluster_size: 4096,
            ..Default::default()
        },
    )
    .unwrap();
    let dev = open_qcow2(&img, false).unwrap();
    dev.write_at(&[9; 20000], 5000).unwrap();
    dev.flush().unwrap();
    dev.discard(0, 16384).unwrap(); // frees clusters, decrements pending
    dev.write_at(&[8; 4096], 1 << 20).unwrap();
    dev.flush().unwrap();
    // The open image holds a writer lock: inspect it force-shared, like `qemu-img info -U`.
    assert!(
        blockdev::lock::with_force_share(|| qcow_snapshot::info(&img))
            .unwrap()
            .dirty,
        "dirty bit set while open"
    );
    // Crash: the file as it is on disk now, without a close. (The image lock of the process
    // that "crashed" would die with it; the copy has none.)
    let crashed = dir.path().join("crashed.qcow2");
    std::fs::copy(&img, &crashed).unwrap();
    drop(dev);
    let img = crashed;
    let mut want = vec![0u8; 4 << 20];
    want[16384..25000].fill(9);
    want[1 << 20..(1 << 20) + 4096].fill(8);
    {
        let dev = open_qcow2(&img, false).unwrap();
        assert_same(&read_all(&dev), &want, "after repair");
        dev.close().unwrap();
    }
    assert!(
        !qcow_snapshot::info(&img).unwrap().dirty,
        "dirty bit cleared by close"
    );
    qemu_check(&img);
}

#[test]
fn commit_writes_overlay_into_backing_and_empties_the_overlay() {
    for bfmt in [Format::Raw, Format::Qcow2] {
        let dir = tmp();
        let size = 2u64 << 20;
        let base_data = random_bytes(11, size as usize);
        let (_, base) = base_in_format(dir.path(), &base_data, bfmt);
        let ov = dir.path().join("o.qcow2");
        let bname = base.file_name().unwrap().to_str().unwrap().to_string();
        create(
            &ov,
            &CreateOptions {
                backing: Some((bname, bfmt)),
                cluster_size: 4096,
                ..Default::default()
            },
        )
        .unwrap();
        let mut want = base_data.clone();
        {
            let dev = open_image(&ov, None, false).unwrap();
            dev.write_at(&[0xa1; 10000], 3000).unwrap();
            dev.discard(65536, 8192).unwrap();
            want[3000..13000].fill(0xa1);
            want[65536..73728].fill(0);
        }
        let before = checksum(&ov, &mut |_, _| {}).unwrap();
        let mut calls = 0;
        commit(&ov, &mut |d, t| {
            assert!(d <= t);
            calls += 1;
        })
        .unwrap();
        assert!(calls > 0);
        let refp = dir.path().join("want.raw");
        std::fs::write(&refp, &want).unwrap();
        let base_sum = checksum(&base, &mut |_, _| {}).unwrap();
        assert_eq!(
            base_sum,
            checksum(&refp, &mut |_, _| {}).unwrap(),
            "backing holds the committed data"
        );
        assert_eq!(before, base_sum);
        // The overlay is empty: everything unallocated, still reads the same through the chain.
        let q = open_qcow2(&ov, true).unwrap();
        assert!(q
            .map(0, size)
            .unwrap()
            .iter()
            .all(|e| e.mapping == Mapping::Unallocated));
        drop(q);
        assert_eq!(checksum(&ov, &mut |_, _| {}).unwrap(), base_sum);
        qemu_check(&ov);
        if bfmt == Format::Qcow2 {
            qemu_check(&base);
        }
    }
}

#[test]
fn export_and_checksum_agree_between_raw_and_overlay_chains() {
    let dir = tmp();
    let size = 3u64 << 20;
    let mut data = random_bytes(12, size as usize);
    data[1 << 20..2 << 20].fill(0);
    let raw = dir.path().join("base.raw");
    std::fs::write(&raw, &data).unwrap();
    let ov = create_snapshot_overlay(&raw, Format::Raw, dir.path()).unwrap();
    assert!(ov.starts_with(dir.path()));
    // The throwaway overlay uses subclusters (cheaper first writes).
    assert!(file_header(&ov).has_extended_l2());
    let raw_sum = checksum(&raw, &mut |_, _| {}).unwrap();
    assert_eq!(raw_sum.len(), 64);
    assert_eq!(checksum(&ov, &mut |_, _| {}).unwrap(), raw_sum);
    {
        let dev = open_image(&ov, None, false).unwrap();
        dev.write_at(&[5; 777], 12345).unwrap();
    }
    data[12345..12345 + 777].fill(5);
    assert_ne!(checksum(&ov, &mut |_, _| {}).unwrap(), raw_sum);
    let out = dir.path().join("out.raw");
    export(&ov, None, &out, &mut |_, _| {}).unwrap();
    assert_eq!(std::fs::read(&out).unwrap(), data);
    assert_eq!(
        checksum(&out, &mut |_, _| {}).unwrap(),
        checksum(&ov, &mut |_, _| {}).unwrap()
    );
    // Sparse where zero.
    use std::os::unix::fs::MetadataExt;
    let md = std::fs::metadata(&out).unwrap();
    assert!(
        md.blocks() * 512 < size,
        "export is sparse ({} bytes allocated)",
        md.blocks() * 512
    );
    // Two overlays never share a name.
    let ov2 = create_snapshot_overlay(&raw, Format::Raw, dir.path()).unwrap();
    assert_ne!(ov, ov2);
}

#[test]
fn read_only_image_refuses_writes_and_backing_is_never_modified() {
    let dir = tmp();
    let img = dir.path().join("a.qcow2");
    create(
        &img,
        &CreateOptions {
            size: 1 << 20,
            ..Default::default()
        },
    )
    .unwrap();
    let before = std::fs::read(&img).unwrap();
    let dev = open_image(&img, Some(Format::Qcow2), true).unwrap();
    assert!(dev.is_read_only());
    assert!(matches!(dev.write_at(&[1], 0), Err(BlockError::ReadOnly)));
    assert!(matches!(dev.discard(0, 512), Err(BlockError::ReadOnly)));
    dev.flush().unwrap();
    drop(dev);
    assert_eq!(std::fs::read(&img).unwrap(), before);
    // A qcow2 file named as raw is served raw (never probed).
    let dev = open_image(&img, Some(Format::Raw), true).unwrap();
    let mut m = [0u8; 4];
    dev.read_at(&mut m, 0).unwrap();
    assert_eq!(&m, b"QFI\xfb");
    let _ = Arc::clone(&dev);
}

#[test]
fn refcount_table_growth_and_tiny_caches_keep_the_image_consistent() {
    for (order, cs) in [(6u32, 512u64), (0, 512), (4, 4096)] {
        let dir = tmp();
        let img = dir.path().join("g.qcow2");
        let size = 6u64 << 20;
        create(
            &img,
            &CreateOptions {
                size,
                cluster_size: cs,
                refcount_order: order,
                ..Default::default()
            },
        )
        .unwrap();
        let before = qcow_snapshot::api::read_header(&img).unwrap().header;
        let mut shadow = vec![0u8; size as usize];
        let mut rng = rand::rngs::StdRng::seed_from_u64(u64::from(order));
        {
            let q = open_qcow2(&img, false).unwrap();
            // Evict and flush internally all the time.
            q.set_cache_limits(2, 2, 3);
            for i in 0..400 {
                let off = rng.random_range(0..size);
                let len = rng.random_range(1..=(size - off).min(40_000));
                if i % 9 == 0 {
                    q.discard(off, len).unwrap();
                    shadow[off as usize..(off + len) as usize].fill(0);
                } else {
                    let v = rng.random::<u8>() | 1;
                    q.write_at(&vec![v; len as usize], off).unwrap();
                    shadow[off as usize..(off + len) as usize].fill(v);
                }
            }
            // Fill a large contiguous part so the host file outgrows the first refcount table.
            q.write_at(&vec![0xc3; 4 << 20], 1 << 20).unwrap();
            shadow[1 << 20..5 << 20].fill(0xc3);
            assert_same(&read_all(&q), &shadow, "before close");
            q.close().unwrap();
        }
        let after = qcow_snapshot::api::read_header(&img).unwrap().header;
        if order == 6 {
            assert_ne!(
                after.refcount_table_offset, before.refcount_table_offset,
                "refcount table was relocated"
            );
        }
        qemu_check_and_compare(&img, &shadow);
        let dev = open_image(&img, None, true).unwrap();
        assert_same(&read_all(&*dev), &shadow, "after reopen");
    }
}

#[test]
fn overlapping_concurrent_writes_discards_and_flushes_leave_consistent_metadata() {
    let dir = tmp();
    let size = 1u64 << 20;
    let img = raw_backed_overlay(dir.path(), &vec![0xbbu8; size as usize], Some(4096));
    let dev = open_image(&img, None, false).unwrap();
    let threads: Vec<_> = (1..=4u8)
        .map(|t| {
            let dev = dev.clone();
            std::thread::spawn(move || {
                let mut rng = rand::rngs::StdRng::seed_from_u64(u64::from(t));
                for i in 0..400 {
                    // All threads hammer the same 256 KiB.
                    let off = rng.random_range(0..(256u64 << 10) - 9000);
                    let len = rng.random_range(1..9000u64);
                    match i % 10 {
                        0 => dev.discard(off, len).unwrap(),
                        1 => dev.write_zeroes(off, len, false).unwrap(),
                        2 => dev.flush().unwrap(),
                        _ => dev.write_at(&vec![t; len as usize], off).unwrap(),
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let got = read_all(&*dev);
    assert!(
        got[..256 << 10].iter().all(|&b| b <= 4 || b == 0xbb),
        "only written, zero or backing bytes"
    );
    assert!(got[256 << 10..].iter().all(|&b| b == 0xbb));
    drop(dev);
    qemu_check(&img);
    let dev = open_image(&img, None, true).unwrap();
    assert_same(&read_all(&*dev), &got, "reopen");
}

#[test]
fn flush_without_new_writes_does_not_sync_and_flush_after_writes_does() {
    let host = CrashHost::default();
    qcow_snapshot::create_on(
        &host,
        &CreateOptions {
            size: 1 << 20,
            ..Default::default()
        },
    )
    .unwrap();
    let img = qcow_snapshot::QcowImage::open_with(Box::new(host.clone()), false, None).unwrap();
    let syncs = |h: &CrashHost| h.log().iter().filter(|o| matches!(o, Op::Sync)).count();
    img.write_at(&[1; 4096], 0).unwrap();
    img.flush().unwrap();
    let s0 = syncs(&host);
    img.flush().unwrap();
    assert_eq!(syncs(&host), s0, "idle flush is free");
    img.write_at(&[2; 512], 100).unwrap(); // in place, no metadata
    img.flush().unwrap();
    assert_eq!(
        syncs(&host),
        s0 + 1,
        "in-place write needs exactly one data sync"
    );
}

#[test]
fn disk_size_not_a_multiple_of_the_cluster_size_handles_the_last_partial_cluster() {
    let dir = tmp();
    let size = (1u64 << 20) + 1536;
    let base_data = random_bytes(21, size as usize);
    let img = raw_backed_overlay(dir.path(), &base_data, None);
    let mut want = base_data.clone();
    {
        let dev = open_image(&img, None, false).unwrap();
        assert_eq!(dev.size(), size);
        dev.write_at(&[0x42; 700], size - 1000).unwrap();
        want[(size - 1000) as usize..(size - 300) as usize].fill(0x42);
        assert!(matches!(
            dev.write_at(&[0; 2], size - 1),
            Err(BlockError::OutOfRange { .. })
        ));
        // Zeroing the whole visible tail of the last cluster makes it a zero cluster.
        dev.write_zeroes(1 << 20, 1536, true).unwrap();
        want[1 << 20..].fill(0);
        assert_same(&read_all(&*dev), &want, "tail");
    }
    qemu_check_and_compare(&img, &want);
    // Image sizes must be multiples of 512, like QEMU requires.
    assert!(create(
        &dir.path().join("x.qcow2"),
        &CreateOptions {
            size: 1000,
            ..Default::default()
        }
    )
    .is_err());
}

/// A memory file whose `n`-th read at one offset fails with EIO (armed with `arm`).
struct FailNthReadAt {
    inner: MemHost,
    offset: std::sync::atomic::AtomicU64,
    reads: std::sync::atomic::AtomicU32,
    fail_on: u32,
}

impl FailNthReadAt {
    fn arm(&self, offset: u64) {
        use std::sync::atomic::Ordering;
        self.reads.store(0, Ordering::SeqCst);
        self.offset.store(offset, Ordering::SeqCst);
    }
}

impl HostFile for FailNthReadAt {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        use std::sync::atomic::Ordering;
        if offset == self.offset.load(Ordering::SeqCst)
            && self.reads.fetch_add(1, Ordering::SeqCst) + 1 == self.fail_on
        {
            return Err(std::io::Error::from_raw_os_error(libc::EIO));
        }
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.inner.write_at(buf, offset)
    }
    fn sync_data(&self) -> std::io::Result<()> {
        self.inner.sync_data()
    }
    fn len(&self) -> std::io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.inner.set_len(len)
    }
}

#[test]
fn half_published_allocation_never_frees_a_cluster_an_l2_entry_points_to() {
    // One write allocates guest clusters 511 and 512, whose entries live in different L2 tables.
    // With one L2 table cached, publishing 511's entry evicts table 1, and re-reading it for
    // 512 fails: the write fails after 511's entry was set. The undo must not free 511's new
    // cluster, or the next allocation reuses it and two guest clusters share one host cluster.
    let cs = 4096u64;
    let host = Arc::new(FailNthReadAt {
        inner: MemHost::new(Vec::new()),
        offset: std::sync::atomic::AtomicU64::new(u64::MAX),
        reads: std::sync::atomic::AtomicU32::new(0),
        fail_on: 2,
    });
    create_on(
        &*host,
        &CreateOptions {
            size: 8 << 20,
            cluster_size: cs,
            ..CreateOptions::default()
        },
    )
    .unwrap();
    // Allocate L2 tables 0 and 1 (guest clusters 0 and 600), then close cleanly.
    {
        let img = QcowImage::open_with(Box::new(host.clone()), false, None).unwrap();
        img.write_at(&[1; 4096], 0).unwrap();
        img.write_at(&[2; 4096], 600 * cs).unwrap();
        img.close().unwrap();
    }
    // Where L2 table 1 is: L1 entry 1.
    let mut hdr = [0u8; 48];
    host.inner.read_at(&mut hdr, 0).unwrap();
    let l1 = u64::from_be_bytes(hdr[40..48].try_into().unwrap());
    let mut e = [0u8; 8];
    host.inner.read_at(&mut e, l1 + 8).unwrap();
    let l2_table_1 = u64::from_be_bytes(e) & 0x00ff_ffff_ffff_fe00;
    assert_ne!(l2_table_1, 0);

    let img = QcowImage::open_with(Box::new(host.clone()), false, None).unwrap();
    img.set_cache_limits(1, 64, 1 << 20);
    host.arm(l2_table_1);
    assert!(
        img.write_at(&[3; 8192], 511 * cs).is_err(),
        "the injected read error must fail the write"
    );
    host.arm(u64::MAX);
    img.flush().unwrap();
    // Freed clusters are reusable after the flush: allocate fresh ones.
    img.write_at(&[4; 4096], 100 * cs).unwrap();
    img.write_at(&[5; 4096], 101 * cs).unwrap();
    img.flush().unwrap();
    let host_of = |gc: u64| match img.map(gc * cs, cs).unwrap().first().map(|x| x.mapping) {
        Some(Mapping::Data(off)) => Some(off),
        _ => None,
    };
    if let Some(h511) = host_of(511) {
        for other in [100, 101, 0, 600] {
            assert_ne!(
                Some(h511),
                host_of(other),
                "guest cluster 511 shares host cluster {h511:#x} with guest cluster {other}"
            );
        }
    }
    let mut b = vec![0u8; 4096];
    img.read_at(&mut b, 100 * cs).unwrap();
    assert!(b.iter().all(|&x| x == 4));
    img.close().unwrap();
}

/// A host file whose first write of exactly `pause_len` bytes (once armed) stops until the
/// test releases it: the engine is then inside a subcluster allocation's data write, with the
/// metadata lock dropped.
struct PauseOnWrite {
    inner: MemHost,
    /// What `page_cached` says (a buffered file, or memory).
    cached: bool,
    pause_len: std::sync::atomic::AtomicUsize,
    reached: std::sync::Mutex<Option<std::sync::mpsc::Sender<()>>>,
    release: std::sync::Mutex<Option<std::sync::mpsc::Receiver<()>>>,
}

impl HostFile for PauseOnWrite {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        use std::sync::atomic::Ordering;
        if self
            .pause_len
            .compare_exchange(buf.len(), 0, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
        {
            if let Some(tx) = self.reached.lock().unwrap().take() {
                tx.send(()).unwrap();
            }
            let rx = self.release.lock().unwrap().take();
            if let Some(rx) = rx {
                rx.recv().unwrap();
            }
        }
        self.inner.write_at(buf, offset)
    }
    fn sync_data(&self) -> std::io::Result<()> {
        self.inner.sync_data()
    }
    fn len(&self) -> std::io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.inner.set_len(len)
    }
    fn page_cached(&self) -> bool {
        self.cached
    }
}

/// A fresh 4 MiB image with extended L2 entries and 64 KiB clusters on a [`PauseOnWrite`] host
/// (`cached`: what its `page_cached` says), with the channel that says a paused write was
/// reached and the one that releases it.
fn paused_extended_l2_image(
    cached: bool,
) -> (
    Arc<PauseOnWrite>,
    Arc<QcowImage>,
    std::sync::mpsc::Receiver<()>,
    std::sync::mpsc::Sender<()>,
) {
    let (tx_reached, rx_reached) = std::sync::mpsc::channel();
    let (tx_release, rx_release) = std::sync::mpsc::channel();
    let host = Arc::new(PauseOnWrite {
        inner: MemHost::new(Vec::new()),
        cached,
        pause_len: std::sync::atomic::AtomicUsize::new(0),
        reached: std::sync::Mutex::new(Some(tx_reached)),
        release: std::sync::Mutex::new(Some(rx_release)),
    });
    create_on(
        &*host,
        &CreateOptions {
            size: 4 << 20,
            cluster_size: 65536,
            extended_l2: true,
            ..CreateOptions::default()
        },
    )
    .unwrap();
    let img = Arc::new(QcowImage::open_with(Box::new(host.clone()), false, None).unwrap());
    (host, img, rx_reached, tx_release)
}

#[test]
fn writes_and_zeroes_racing_a_subcluster_allocation_of_the_same_cluster_all_land() {
    // Write A allocates subclusters 0-1 of a fresh cluster and is stopped inside its data
    // write (metadata lock dropped, cluster in flight). Write B into subclusters 4-5 (partial
    // at both ends) and a zero write of subcluster 20 of the same cluster run exactly then:
    // they must wait for A and then add their own subclusters, so nothing is lost, the cluster
    // is allocated once and the bitmap has all three.
    let cs = 65536u64;
    let (host, img, rx_reached, tx_release) = paused_extended_l2_image(false);
    host.pause_len
        .store(4096, std::sync::atomic::Ordering::SeqCst);
    let a = {
        let img = img.clone();
        std::thread::spawn(move || img.write_at(&[0xaa; 4096], 3 * cs).unwrap())
    };
    rx_reached.recv().unwrap();
    let b = {
        let img = img.clone();
        std::thread::spawn(move || img.write_at(&[0xbb; 3000], 3 * cs + 8192 + 500).unwrap())
    };
    let c = {
        let img = img.clone();
        std::thread::spawn(move || img.write_zeroes(3 * cs + 20 * 2048, 2048, false).unwrap())
    };
    // B and C cannot finish while A holds the cluster in flight.
    std::thread::sleep(std::time::Duration::from_millis(50));
    assert!(!b.is_finished() && !c.is_finished());
    tx_release.send(()).unwrap();
    a.join().unwrap();
    b.join().unwrap();
    c.join().unwrap();
    let mut want = vec![0u8; cs as usize];
    want[..4096].fill(0xaa);
    want[8192 + 500..8192 + 3500].fill(0xbb);
    let mut got = vec![0u8; cs as usize];
    img.read_at(&mut got, 3 * cs).unwrap();
    assert_same(&got, &want, "cluster 3");
    let m = img.map(3 * cs, cs).unwrap();
    let data: Vec<(u64, u64)> = m
        .iter()
        .filter(|e| matches!(e.mapping, Mapping::Data(_)))
        .map(|e| (e.offset - 3 * cs, e.len))
        .collect();
    assert_eq!(data, vec![(0, 4096), (8192, 4096)], "{m:?}");
    assert!(m
        .iter()
        .any(|e| e.mapping == Mapping::Zero && e.offset == 3 * cs + 20 * 2048));
    img.close().unwrap();
}

#[test]
fn a_rewrite_goes_to_the_page_cache_only_where_every_cluster_is_allocated_and_its_own() {
    let dir = tmp();
    let path = qemu_create(dir.path(), "p.qcow2", "cluster_size=65536", "1M", &[]);
    let cs = 65536u64;
    {
        let img = open_qcow2(&path, false).unwrap();
        assert!(!img.rewrites_in_page_cache(0, cs), "an unallocated cluster");
        img.write_at(&[1; 2 * 65536], 0).unwrap();
        img.write_at(&[2; 65536], 4 * cs).unwrap();
        assert!(img.rewrites_in_page_cache(0, 2 * cs));
        assert!(
            img.rewrites_in_page_cache(cs / 2, cs),
            "across two allocated clusters"
        );
        assert!(img.rewrites_in_page_cache(4 * cs + 512, 512));
        assert!(
            !img.rewrites_in_page_cache(cs, 2 * cs),
            "the second cluster is not allocated"
        );
        assert!(
            !img.rewrites_in_page_cache(cs + cs / 2, cs),
            "from the middle of an allocated cluster into an unallocated one"
        );
        assert!(!img.rewrites_in_page_cache(0, 0), "an empty range");
        img.write_at(&[2; 65536], (1 << 20) - cs).unwrap();
        assert!(img.rewrites_in_page_cache((1 << 20) - 1024, 1024));
        assert!(
            !img.rewrites_in_page_cache((1 << 20) - 512, 1024),
            "past the end"
        );
        // A zeroed cluster that keeps its host cluster is written by allocating it again.
        img.write_zeroes(cs, cs, false).unwrap();
        assert!(!img.rewrites_in_page_cache(cs, 512));
        assert!(img.rewrites_in_page_cache(0, cs));
        img.flush().unwrap();
    }
    let ro = open_qcow2(&path, true).unwrap();
    assert!(
        !ro.rewrites_in_page_cache(0, 512),
        "a read-only image writes nothing"
    );
    drop(ro);
    let direct = open_qcow2(&path, false).unwrap();
    if direct.enable_direct().is_ok() {
        assert!(
            !direct.rewrites_in_page_cache(0, cs),
            "an O_DIRECT file has no page cache"
        );
    }
    drop(direct);
    // A compressed cluster is written by allocating a new one.
    let (packed, _) = qemu_compressed(dir.path(), "c.qcow2", 2 * cs);
    let img = open_qcow2(&packed, false).unwrap();
    assert!(!img.rewrites_in_page_cache(cs, 512));
    img.write_at(&[4; 512], cs).unwrap();
    assert!(
        img.rewrites_in_page_cache(cs, cs),
        "allocated by the write: its own now"
    );
}

#[test]
fn an_extended_l2_rewrite_needs_every_touched_subcluster_and_no_allocation_in_flight() {
    let cs = 65536u64;
    // A buffered file: a memory one never says a rewrite goes to a page cache.
    let (host, img, rx_reached, tx_release) = paused_extended_l2_image(true);
    // Subclusters 0-1 (2 KiB each) of cluster 3.
    img.write_at(&[0xaa; 4096], 3 * cs).unwrap();
    assert!(img.rewrites_in_page_cache(3 * cs, 4096));
    assert!(img.rewrites_in_page_cache(3 * cs + 100, 1000));
    assert!(
        !img.rewrites_in_page_cache(3 * cs, 4097),
        "subcluster 2 is not allocated"
    );
    // A write allocating subclusters 4-5 of the same cluster, stopped in its data write: the
    // cluster is in flight, and a write into 0-1 would wait for it.
    host.pause_len
        .store(4096, std::sync::atomic::Ordering::SeqCst);
    let a = {
        let img = img.clone();
        std::thread::spawn(move || img.write_at(&[0xbb; 4096], 3 * cs + 8192).unwrap())
    };
    rx_reached.recv().unwrap();
    assert!(
        !img.rewrites_in_page_cache(3 * cs, 4096),
        "the cluster is being allocated"
    );
    tx_release.send(()).unwrap();
    a.join().unwrap();
    assert!(img.rewrites_in_page_cache(3 * cs, 4096));
    assert!(img.rewrites_in_page_cache(3 * cs + 8192, 4096));
}

/// A write persists in place (the crash journal then keeps only a marker of it) only where
/// every cluster it touches is allocated and the image's own and its L2 entry is in the file
/// (the table clean, the L1 entry naming it too), so that the file as it is at that moment
/// (what a daemon started after a crash opens) reads the write back. Buffered or O_DIRECT
/// alike. A refused write writes nothing.
#[test]
fn a_write_persists_in_place_only_over_its_own_clusters_with_all_metadata_in_the_file() {
    let dir = tmp();
    let path = qemu_create(dir.path(), "p.qcow2", "cluster_size=65536", "1M", &[]);
    let cs = 65536u64;
    let img = open_qcow2(&path, false).unwrap();
    assert!(!img.persists_in_place(0, cs), "an unallocated cluster");
    img.write_at(&[1; 2 * 65536], 0).unwrap();
    assert!(
        !img.persists_in_place(0, cs),
        "allocated, but its L2 entry is only in memory"
    );
    assert!(!img.write_in_place_persisted(&[5; 65536], 0).unwrap());
    let mut b = vec![0u8; cs as usize];
    img.read_at(&mut b, 0).unwrap();
    assert_eq!(b, vec![1; cs as usize], "a refused write wrote something");
    img.write_back().unwrap();
    assert!(img.persists_in_place(0, 2 * cs));
    assert!(img.persists_in_place(cs / 2, cs), "across two clusters");
    assert!(
        !img.persists_in_place(cs, 2 * cs),
        "the third cluster is not allocated"
    );
    assert!(!img.persists_in_place(0, 0), "an empty range");
    assert!(
        !img.persists_in_place((1 << 20) - 512, 1024),
        "past the end"
    );
    assert!(img.write_in_place_persisted(&[6; 65536], cs / 2).unwrap());
    let crashed = dir.path().join("crashed.qcow2");
    std::fs::copy(&path, &crashed).unwrap();
    {
        let after = open_qcow2(&crashed, false).unwrap();
        let mut b = vec![0u8; 2 * cs as usize];
        after.read_at(&mut b, 0).unwrap();
        let mut want = vec![1u8; 2 * cs as usize];
        want[cs as usize / 2..cs as usize * 3 / 2].fill(6);
        assert_same(&b, &want, "the file after a persisted write");
    }
    // An allocation elsewhere in the same L2 table, until the table is in the file.
    img.write_at(&[2; 65536], 4 * cs).unwrap();
    assert!(!img.persists_in_place(0, cs));
    img.flush().unwrap();
    assert!(img.persists_in_place(0, cs) && img.persists_in_place(4 * cs, cs));
    // A zeroed cluster that keeps its host cluster is written by allocating it again.
    img.write_zeroes(cs, cs, false).unwrap();
    img.flush().unwrap();
    assert!(!img.persists_in_place(cs, 512));
    assert!(img.persists_in_place(0, cs));
    img.close().unwrap();
    drop(img);
    let ro = open_qcow2(&path, true).unwrap();
    assert!(
        !ro.persists_in_place(0, 512),
        "a read-only image writes nothing"
    );
    assert!(!ro.write_in_place_persisted(&[1; 512], 0).unwrap());
    drop(ro);
    let direct = open_qcow2(&path, false).unwrap();
    if direct.enable_direct().is_ok() {
        assert!(
            direct.persists_in_place(0, cs),
            "a direct write is on the device when it completes"
        );
        let mut buf = blockdev::AlignedBuf::zeroed(65536);
        buf.fill(7);
        assert!(direct.write_in_place_persisted(&buf, 4 * cs).unwrap());
        let mut b = vec![0u8; cs as usize];
        direct.read_at(&mut b, 4 * cs).unwrap();
        assert_eq!(b, vec![7; cs as usize]);
    }
    direct.close().unwrap();
    drop(direct);
    qemu_check(&path);
}

/// Nothing past the end of the disk persists in place, not even where the last cluster is
/// allocated with its entry in the file, and nothing of an image marked corrupt (its metadata
/// cannot be trusted to name where the bytes went).
#[test]
fn no_write_persists_past_the_end_or_into_an_image_marked_corrupt() {
    let dir = tmp();
    let path = qemu_create(
        dir.path(),
        "e.qcow2",
        "cluster_size=65536",
        "1M",
        &["write -P 0x11 0 1M"],
    );
    let size = 1u64 << 20;
    {
        let img = open_qcow2(&path, false).unwrap();
        assert!(img.persists_in_place(size - 4096, 4096), "the last block");
        assert!(!img.persists_in_place(size - 512, 1024), "past the end");
        assert!(
            matches!(
                img.write_in_place_persisted(&[2; 1024], size - 512),
                Ok(false)
            ),
            "a range past the end does not qualify (the caller's own write reports it)"
        );
        assert!(
            matches!(img.write_in_place_persisted(&[], 0), Ok(false)),
            "an empty write"
        );
        let mut b = vec![0u8; 512];
        img.read_at(&mut b, size - 512).unwrap();
        assert_eq!(b, vec![0x11; 512], "a write past the end wrote its head");
        img.close().unwrap();
    }
    // Guest cluster 1's L2 entry repointed to a misaligned host offset: reading it marks the
    // image corrupt (cluster 0 keeps a sound entry in the file).
    let bytes = std::fs::read(&path).unwrap();
    let l1 = file_header(&path).l1_table_offset as usize;
    let l2 = format::l1_entry_offset(format::table_entry(&bytes[l1..], 0));
    poke(&path, l2 + 8, &(format::OFLAG_COPIED | 0x200).to_be_bytes());
    let img = open_qcow2(&path, false).unwrap();
    assert!(img.persists_in_place(0, 65536));
    let mut b = vec![0u8; 512];
    assert!(img.read_at(&mut b, 65536).is_err());
    assert!(img.is_corrupt());
    assert!(!img.persists_in_place(0, 65536), "an image marked corrupt");
    assert!(img.write_in_place_persisted(&[2; 65536], 0).is_err());
}

/// Whether a write persists in place depends on its own clusters' L2 table and L1 entry only:
/// an allocation under another table leaves it persisting, one that needs a new table (a new
/// L1 entry) or dirties its table does not, until they are in the file.
#[test]
fn a_write_persists_in_place_whatever_other_l2_tables_have_in_memory_only() {
    let dir = tmp();
    let path = dir.path().join("small.qcow2");
    create(
        &path,
        &CreateOptions {
            size: 1 << 20,
            cluster_size: 512,
            ..Default::default()
        },
    )
    .unwrap();
    // 512-byte clusters: an L2 table holds 64 entries, 32 KiB of the disk.
    let table = 32u64 << 10;
    let img = open_qcow2(&path, false).unwrap();
    img.write_at(&[1; 8192], 0).unwrap();
    img.write_at(&[1; 512], table - 512).unwrap();
    img.flush().unwrap();
    assert!(img.persists_in_place(0, 8192));
    assert!(
        img.persists_in_place(table - 512, 512),
        "the last cluster of a table, the next table not allocated"
    );
    img.write_at(&[2; 512], 3 * table).unwrap();
    assert!(
        img.persists_in_place(0, 8192),
        "a new table and L1 entry elsewhere"
    );
    assert!(
        !img.persists_in_place(3 * table, 512),
        "its L1 entry is only in memory"
    );
    img.write_at(&[3; 512], 8192).unwrap();
    assert!(!img.persists_in_place(0, 8192), "its table is dirty");
    img.write_back().unwrap();
    assert!(img.persists_in_place(0, 8192) && img.persists_in_place(3 * table, 512));
    assert!(img.write_in_place_persisted(&[4; 512], 3 * table).unwrap());
    img.close().unwrap();
    drop(img);
    qemu_check(&path);
}

/// Deterministic: a persisted write is stopped inside its data write (metadata lock dropped,
/// `gate` held). Exactly then another write allocates a cluster under the same L2 table, the
/// written cluster is discarded and a flush starts: the allocation and the discard go on, but
/// the flush frees the discarded host cluster only once the persisted write is out, so a
/// cluster allocated afterwards (which may reuse it) never receives the persisted bytes.
#[test]
fn a_persisted_write_in_its_data_write_keeps_its_host_cluster_from_being_freed() {
    let cs = 65536u64;
    let (host, img, reached, release) = paused_extended_l2_image(true);
    img.write_at(&[1; 65536], 0).unwrap();
    img.flush().unwrap();
    host.pause_len
        .store(32768, std::sync::atomic::Ordering::SeqCst);
    let a = {
        let img = img.clone();
        std::thread::spawn(move || img.write_in_place_persisted(&[2; 32768], 0).unwrap())
    };
    reached
        .recv_timeout(std::time::Duration::from_secs(10))
        .expect("the persisted write never reached its data write");
    img.write_at(&[3; 65536], 2 * cs).unwrap();
    img.discard(0, cs).unwrap();
    let flush = {
        let img = img.clone();
        std::thread::spawn(move || img.flush().unwrap())
    };
    std::thread::sleep(std::time::Duration::from_millis(100));
    assert!(
        !flush.is_finished(),
        "the flush freed the discarded cluster under a persisted write"
    );
    release.send(()).unwrap();
    assert!(
        a.join().unwrap(),
        "the persisted write was planned before the discard"
    );
    flush.join().unwrap();
    for gc in 3..8u64 {
        img.write_at(&[gc as u8 + 10; 65536], gc * cs).unwrap();
    }
    let mut b = vec![0u8; cs as usize];
    for gc in 3..8u64 {
        img.read_at(&mut b, gc * cs).unwrap();
        assert!(
            b.iter().all(|&x| x == gc as u8 + 10),
            "guest cluster {gc} got bytes of another write"
        );
    }
    img.read_at(&mut b, 2 * cs).unwrap();
    assert!(b.iter().all(|&x| x == 3));
    img.read_at(&mut b, 0).unwrap();
    assert!(
        b.iter().all(|&x| x == 0),
        "the discard is the last change of cluster 0"
    );
    img.close().unwrap();
}
