//! Keeps a guest from changing how its disk is opened (the CVE-2008-2004 bug class).
//!
//! When `serve` had to probe the image's format and found raw, the next start would probe it
//! again: a guest that writes a qcow2 header (naming any host file as backing file) into its
//! first sector would turn its disk into a window onto the host. Like QEMU's raw driver on a
//! probed image, [`ProbedRawGuard`] refuses every write-type request that touches the first
//! [`PROBE_LEN`] bytes and would leave them probing as anything but raw (the same
//! [`qcow_snapshot::probe_bytes`] rule that probed the image). The request fails with an I/O
//! error (the guest sees `VIRTIO_BLK_S_IOERR`), a warning is logged and the bytes are unchanged.
//! Giving `--format raw` removes the restriction (and the start-up warning).
//!
//! Locking model: requests that do not touch the first [`PROBE_LEN`] bytes pass straight through
//! without a lock. Requests that do take `head`, a mutex held across reading the current head,
//! the check and the write itself, so two partial writes can never each pass the check against
//! the old head and together form a magic.

use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use blockdev::{BlockDev, BlockError, Result};
use qcow_snapshot::api::PROBE_LEN;
use qcow_snapshot::{probe_bytes, Format};

/// The backing-file policy of `serve`: `--allow-backing` trees, `--probe-backing-format`, and
/// with `--snapshot` the image itself (named by the user, the base of the throwaway overlay) is
/// trusted whatever it is (a block device, say).
pub fn backing_policy(args: &crate::cli::ServeArgs) -> io::Result<qcow_snapshot::BackingPolicy> {
    let mut policy =
        qcow_snapshot::BackingPolicy::new().probe_unrecorded(args.probe_backing_format);
    for dir in &args.allow_backing {
        policy.allow_dir(dir)?;
    }
    for server in &args.allow_nbd {
        policy.allow_nbd_server(server)?;
    }
    if args.snapshot {
        policy.trust(&args.image)?;
    }
    Ok(policy)
}

/// A probed-raw, writable image: write-type requests that would change its probed format are
/// refused.
pub struct ProbedRawGuard {
    inner: Arc<dyn BlockDev>,
    image: PathBuf,
    head: Mutex<()>,
    refused: AtomicU64,
}

impl std::fmt::Debug for ProbedRawGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProbedRawGuard")
            .field("image", &self.image)
            .field("refused", &self.refused.load(Ordering::Relaxed))
            .finish()
    }
}

/// The start-up warning for a writable image whose format was probed as raw.
pub fn probed_raw_warning(image: &std::path::Path) -> String {
    format!(
        "the format of {} was probed as raw: probing a writable raw image is dangerous (a guest \
         could write another format's header into it); writes that would change the probed \
         format are refused. Give --format raw to serve it without this restriction",
        image.display()
    )
}

impl ProbedRawGuard {
    /// Guards `inner`, the stack over the probed-raw image `image`.
    pub fn new(inner: Arc<dyn BlockDev>, image: PathBuf) -> Self {
        ProbedRawGuard {
            inner,
            image,
            head: Mutex::new(()),
            refused: AtomicU64::new(0),
        }
    }

    /// How many requests were refused so far.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// Runs `op` (a write-type request on `offset..offset + len`) if it leaves the head probing
    /// as raw; `patch` applies the request to a copy of the head.
    fn guarded(
        &self,
        offset: u64,
        len: u64,
        patch: impl FnOnce(&mut [u8]),
        op: impl FnOnce() -> Result<()>,
    ) -> Result<()> {
        if offset >= PROBE_LEN as u64 || len == 0 {
            return op();
        }
        let _head = self.head.lock().unwrap_or_else(|e| e.into_inner());
        let n = self.inner.size().min(PROBE_LEN as u64) as usize;
        let mut head = vec![0u8; n];
        self.inner.read_at(&mut head, 0)?;
        patch(&mut head);
        let probed = probe_bytes(&head);
        if probed != Format::Raw {
            let count = self.refused.fetch_add(1, Ordering::Relaxed) + 1;
            // Every refusal up to 10, then every power of two: a guest cannot flood the log.
            if count <= 10 || count.is_power_of_two() {
                log::warn!(
                    "refused a guest write at offset {offset} ({len} bytes) to {}: it would make \
                     the probed-raw image probe as {probed} ({count} refused so far; serve with \
                     --format raw to allow it)",
                    self.image.display()
                );
            }
            return Err(BlockError::Io(io::Error::from_raw_os_error(libc::EPERM)));
        }
        op()
    }
}

/// Writes `src` at byte `offset` of the (head-sized) buffer `head`, clipped to it.
fn patch_head(head: &mut [u8], offset: u64, src: Option<&[u8]>, len: u64) {
    let start = offset as usize;
    if start >= head.len() {
        return;
    }
    let end = (offset.saturating_add(len)).min(head.len() as u64) as usize;
    match src {
        Some(buf) => head[start..end].copy_from_slice(&buf[..end - start]),
        None => head[start..end].fill(0),
    }
}

impl BlockDev for ProbedRawGuard {
    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.inner.read_at(buf, offset)
    }

    fn read_into(&self, dst: &dyn blockdev::ReadSink, offset: u64) -> Result<()> {
        self.inner.read_into(dst, offset)
    }

    fn plan_read(&self, offset: u64, len: u64) -> Option<blockdev::ReadPlan> {
        self.inner.plan_read(offset, len)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        let len = buf.len() as u64;
        self.guarded(
            offset,
            len,
            |h| patch_head(h, offset, Some(buf), len),
            || self.inner.write_at(buf, offset),
        )
    }

    /// Past the head as the layer below says; a write into the head is checked first.
    fn writes_in_memory(&self, offset: u64, len: u64) -> bool {
        offset >= PROBE_LEN as u64 && self.inner.writes_in_memory(offset, len)
    }

    fn gathers_writes(&self) -> bool {
        self.inner.gathers_writes()
    }

    /// Past the head the write is not guarded: it goes to the layer below as it is; a write
    /// into the head is gathered into a buffer and checked like any other.
    fn write_gathered(
        &self,
        offset: u64,
        len: usize,
        fill: &mut dyn FnMut(&mut [u8]) -> Result<()>,
    ) -> Result<()> {
        if offset >= PROBE_LEN as u64 {
            self.inner.write_gathered(offset, len, fill)
        } else {
            blockdev::write_via_buffer(self, offset, len, fill)
        }
    }

    fn flush(&self) -> Result<()> {
        self.inner.flush()
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        // A discarded range reads back as zeros (the BlockDev contract).
        self.guarded(
            offset,
            len,
            |h| patch_head(h, offset, None, len),
            || self.inner.discard(offset, len),
        )
    }

    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        self.guarded(
            offset,
            len,
            |h| patch_head(h, offset, None, len),
            || self.inner.write_zeroes(offset, len, unmap),
        )
    }

    fn is_read_only(&self) -> bool {
        self.inner.is_read_only()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use blockdev::MemDisk;

    const QCOW_MAGIC: [u8; 4] = *b"QFI\xfb";

    fn guarded(size: usize) -> (Arc<MemDisk>, ProbedRawGuard) {
        let mem = Arc::new(MemDisk::new(size));
        let g = ProbedRawGuard::new(mem.clone(), "test.raw".into());
        (mem, g)
    }

    /// A gathered write (the request path's, when the layer below keeps a copy of its own)
    /// into the head is checked like any other; past the head it goes down as it is.
    #[test]
    fn a_gathered_write_into_the_head_is_refused_like_any_other_and_past_it_goes_down() {
        let (mem, g) = guarded(1 << 20);
        let e = g
            .write_gathered(0, 512, &mut |dst| {
                dst.fill(0);
                dst[..4].copy_from_slice(&QCOW_MAGIC);
                Ok(())
            })
            .unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EPERM), "{e}");
        assert!(mem.snapshot()[..512].iter().all(|&b| b == 0));
        let past = PROBE_LEN as u64;
        g.write_gathered(past, 512, &mut |dst| {
            dst.fill(0x42);
            Ok(())
        })
        .unwrap();
        assert_eq!(
            &mem.snapshot()[past as usize..past as usize + 512],
            &[0x42; 512]
        );
        assert_eq!(g.refused(), 1);
    }

    /// A lower layer that keeps its own copy of written data (like the crash journal) and
    /// counts the writes gathered into it.
    struct Gathering {
        mem: MemDisk,
        gathered: std::sync::atomic::AtomicUsize,
    }

    impl BlockDev for Gathering {
        fn size(&self) -> u64 {
            self.mem.size()
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
            self.mem.read_at(buf, offset)
        }
        fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
            self.mem.write_at(buf, offset)
        }
        fn gathers_writes(&self) -> bool {
            true
        }
        fn writes_in_memory(&self, _offset: u64, _len: u64) -> bool {
            true
        }
        fn write_gathered(
            &self,
            offset: u64,
            len: usize,
            fill: &mut dyn FnMut(&mut [u8]) -> Result<()>,
        ) -> Result<()> {
            self.gathered.fetch_add(1, Ordering::SeqCst);
            blockdev::write_via_buffer(&self.mem, offset, len, fill)
        }
        fn flush(&self) -> Result<()> {
            Ok(())
        }
        fn discard(&self, offset: u64, len: u64) -> Result<()> {
            self.mem.discard(offset, len)
        }
        fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
            self.mem.write_zeroes(offset, len, unmap)
        }
    }

    /// The guard gathers where the layer below does: past the head, a gathered write reaches
    /// that layer's `write_gathered`; over a layer that does not, it says so.
    #[test]
    fn the_guard_gathers_writes_exactly_where_the_layer_below_does() {
        let (_mem, plain) = guarded(1 << 20);
        assert!(!plain.gathers_writes());
        let below = Arc::new(Gathering {
            mem: MemDisk::new(1 << 20),
            gathered: std::sync::atomic::AtomicUsize::new(0),
        });
        let g = ProbedRawGuard::new(below.clone(), "test.raw".into());
        assert!(g.gathers_writes());
        g.write_gathered(PROBE_LEN as u64, 4096, &mut |dst| {
            dst.fill(9);
            Ok(())
        })
        .unwrap();
        g.write_gathered(0, 512, &mut |dst| {
            dst.fill(8);
            Ok(())
        })
        .unwrap();
        assert_eq!(
            below.gathered.load(Ordering::SeqCst),
            1,
            "only past the head"
        );
        let mut b = vec![0; 512];
        below.mem.read_at(&mut b, 0).unwrap();
        assert_eq!(b, vec![8; 512]);
    }

    /// A write into the head is checked (it reads the head and may be refused), so it never
    /// completes from memory; past the head the layer below answers.
    #[test]
    fn a_write_into_the_head_never_completes_in_memory_and_past_it_the_layer_below_says() {
        let below = Arc::new(Gathering {
            mem: MemDisk::new(1 << 20),
            gathered: std::sync::atomic::AtomicUsize::new(0),
        });
        let g = ProbedRawGuard::new(below, "test.raw".into());
        let past = PROBE_LEN as u64;
        assert!(g.writes_in_memory(past, 4096));
        assert!(!g.writes_in_memory(0, 512));
        assert!(
            !g.writes_in_memory(past - 512, 1024),
            "a write that ends past the head"
        );
        let (_mem, plain) = guarded(1 << 20);
        assert!(
            !plain.writes_in_memory(past, 4096),
            "the layer below says no"
        );
    }

    #[test]
    fn probed_raw_refuses_a_write_that_would_make_it_probe_as_qcow2() {
        let (mem, g) = guarded(1 << 20);
        let mut sector = vec![0u8; 512];
        sector[..4].copy_from_slice(&QCOW_MAGIC);
        let e = g.write_at(&sector, 0).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EPERM), "{e}");
        assert!(
            mem.snapshot()[..512].iter().all(|&b| b == 0),
            "head unchanged"
        );
        assert_eq!(g.refused(), 1);
        // A write elsewhere, and a harmless write to the head, pass.
        g.write_at(&sector, 4096).unwrap();
        g.write_at(&[0xee; 512], 0).unwrap();
        assert!(mem.snapshot()[..512].iter().all(|&b| b == 0xee));
    }

    #[test]
    fn probed_raw_refuses_partial_writes_that_complete_a_magic_with_the_current_head() {
        let (mem, g) = guarded(1 << 16);
        g.write_at(&QCOW_MAGIC[..3], 0).unwrap();
        assert!(g.write_at(&QCOW_MAGIC[3..], 3).is_err());
        assert_eq!(&mem.snapshot()[..4], b"QFI\0");
        // A write straddling the end of the probed head is checked on its head part.
        g.write_at(&[0], 0).unwrap();
        let mut big = vec![1u8; 1024];
        big[..4].copy_from_slice(&QCOW_MAGIC);
        assert!(g.write_at(&big[1..], 1).is_ok(), "no magic at offset 0");
        assert!(g.write_at(&QCOW_MAGIC[..1], 0).is_err());
        assert_eq!(&mem.snapshot()[..4], b"\0FI\xfb");
        assert!(
            g.write_at(&big[..600], 0).is_err(),
            "straddling write with the magic"
        );
        assert_eq!(
            mem.snapshot()[0],
            0,
            "the refused write left the head alone"
        );
    }

    #[test]
    fn probed_raw_allows_zeroing_and_discarding_the_head() {
        let (mem, g) = guarded(1 << 16);
        g.write_at(&[7; 512], 0).unwrap();
        g.write_zeroes(0, 4096, false).unwrap();
        g.discard(0, 512).unwrap();
        assert!(mem.snapshot()[..4096].iter().all(|&b| b == 0));
        assert_eq!(g.refused(), 0);
    }

    /// A lower layer that runs `hook` once, right after its first read (the guard's read of
    /// the current head), before the guard checks and writes.
    struct HookAfterRead {
        mem: Arc<MemDisk>,
        hook: Mutex<Option<Box<dyn FnOnce() + Send>>>,
    }

    impl BlockDev for HookAfterRead {
        fn size(&self) -> u64 {
            self.mem.size()
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
            self.mem.read_at(buf, offset)?;
            let hook = self.hook.lock().unwrap().take();
            if let Some(h) = hook {
                h();
            }
            Ok(())
        }
        fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
            self.mem.write_at(buf, offset)
        }
        fn flush(&self) -> Result<()> {
            Ok(())
        }
        fn discard(&self, offset: u64, len: u64) -> Result<()> {
            self.mem.discard(offset, len)
        }
        fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
            self.mem.write_zeroes(offset, len, unmap)
        }
    }

    #[test]
    fn probed_raw_head_check_and_write_are_atomic_against_a_racing_head_write() {
        // Writer A has read the head (magic half "QF" not yet written) and is paused exactly
        // between its read and its check+write; writer B then writes the other half "I\xfb".
        // B must wait for A (the head lock) and then see A's bytes, so B is refused. Without the
        // lock B would pass its check against the old head and the two halves would form a magic.
        let mem = Arc::new(MemDisk::new(4096));
        let lower = Arc::new(HookAfterRead {
            mem: mem.clone(),
            hook: Mutex::new(None),
        });
        let g = Arc::new(ProbedRawGuard::new(lower.clone(), "test.raw".into()));
        let (tx, rx) = std::sync::mpsc::channel();
        let b_result = Arc::new(Mutex::new(None));
        let b_thread: Arc<Mutex<Option<std::thread::JoinHandle<()>>>> = Arc::default();
        {
            let g = g.clone();
            let b_result = b_result.clone();
            let b_thread = b_thread.clone();
            *lower.hook.lock().unwrap() = Some(Box::new(move || {
                let handle = std::thread::spawn(move || {
                    let r = g.write_at(&QCOW_MAGIC[2..], 2).is_ok();
                    *b_result.lock().unwrap() = Some(r);
                    let _ = tx.send(());
                });
                *b_thread.lock().unwrap() = Some(handle);
                // Give B every chance to run through while A is paused here.
                assert!(
                    rx.recv_timeout(std::time::Duration::from_millis(200))
                        .is_err(),
                    "B wrote the head while A was between its read and its write"
                );
            }));
        }
        g.write_at(&QCOW_MAGIC[..2], 0).unwrap();
        let handle = b_thread.lock().unwrap().take().expect("hook ran");
        handle.join().unwrap();
        assert_eq!(*b_result.lock().unwrap(), Some(false), "B refused");
        assert_eq!(&mem.snapshot()[..4], b"QF\0\0");
    }

    #[test]
    fn probed_raw_concurrent_partial_writes_never_form_a_magic() {
        // Two writers race to complete the magic from both halves; the head lock makes the
        // second one see the first one's bytes, so at most one succeeds.
        for _ in 0..200 {
            let (mem, g) = guarded(4096);
            let g = Arc::new(g);
            let a = {
                let g = g.clone();
                std::thread::spawn(move || g.write_at(&QCOW_MAGIC[..2], 0).is_ok())
            };
            let b = {
                let g = g.clone();
                std::thread::spawn(move || g.write_at(&QCOW_MAGIC[2..], 2).is_ok())
            };
            let (a, b) = (a.join().unwrap(), b.join().unwrap());
            assert!(
                a ^ b,
                "exactly one half of the magic may land (a: {a}, b: {b})"
            );
            assert_ne!(&mem.snapshot()[..4], &QCOW_MAGIC);
        }
    }
}
