//! Batched direct writes on io_uring: many writes of one O_DIRECT file in flight at once.
//!
//! A writeback of small folios into an O_DIRECT image is one device write each. Issued one after
//! another (`pwrite` per folio) the device sees one at a time, and every write is a kick of the
//! virtual disk of its own (the kick, a VM exit here, was the largest single cost of such a
//! writeback). [`WriteRings::write`] puts a whole batch on a ring with one system call, so the
//! block layer plugs it into one dispatch and the device works on all of it at once, and waits
//! until every write of the batch has completed: the buffers are borrowed, so nothing returns
//! while the kernel may still read one.
//!
//! A completion that wrote less than asked (a short write) or was interrupted is finished with
//! `pwrite`s ([`DirectIo::write_at`] continues short writes); a failed one reports its own error,
//! for that write only. Where a ring cannot be made (an old kernel, a seccomp policy without
//! io_uring), or rings are turned off ([`WriteRings::disable`], `serve --aio threads`), the batch
//! is written one `pwrite` after another, with one warning.
//!
//! The rings are restricted to IORING_OP_WRITE before they are enabled (as the daemon's read
//! rings are to READV): seccomp does not see what a ring executes.
//!
//! Locking model: `pool` (a leaf) is held only to take a ring out or to give it back; a batch
//! owns its ring while it runs, so batches of several threads run at once on rings of their own.

use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use io_uring::{opcode, register::Restriction, types, IoUring};

use crate::direct::{DirectIo, PosIo};

/// Entries of a ring: the most writes one submission carries.
const RING_ENTRIES: u32 = 64;

/// Rings kept for reuse (more threads than this writing batches at once make their own).
const KEPT_RINGS: usize = 8;

/// Set by [`disable_write_rings`]: every file writes its batches one `pwrite` at a time.
static ALL_OFF: AtomicBool = AtomicBool::new(false);

/// Turns batched ring writes off for every image file of the process (`serve --aio threads`:
/// no io_uring anywhere on the data path).
pub fn disable_write_rings() {
    ALL_OFF.store(true, Ordering::Release);
}

/// A pool of write-only rings for one file.
#[derive(Default)]
pub(super) struct WriteRings {
    pool: Mutex<Vec<IoUring>>,
    /// Batches go one `pwrite` at a time.
    off: AtomicBool,
    warned: AtomicBool,
    /// Writes that completed on a ring (short ones included).
    completed: AtomicU64,
}

impl std::fmt::Debug for WriteRings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WriteRings")
            .field("off", &self.off)
            .finish_non_exhaustive()
    }
}

/// A ring of [`RING_ENTRIES`] that can only write (see the module documentation).
fn write_ring() -> io::Result<IoUring> {
    let ring = IoUring::builder().setup_r_disabled().build(RING_ENTRIES)?;
    let sub = ring.submitter();
    sub.register_restrictions(&mut [Restriction::sqe_op(opcode::Write::CODE)])?;
    sub.register_enable_rings()?;
    Ok(ring)
}

impl WriteRings {
    /// Batches are written one `pwrite` after another from now on.
    pub(super) fn disable(&self) {
        self.off.store(true, Ordering::Release);
    }

    /// How many writes completed on a ring so far.
    pub(super) fn completed(&self) -> u64 {
        self.completed.load(Ordering::Relaxed)
    }

    fn take(&self) -> Option<IoUring> {
        if self.off.load(Ordering::Acquire) || ALL_OFF.load(Ordering::Acquire) {
            return None;
        }
        if let Some(r) = self.pool.lock().unwrap_or_else(|e| e.into_inner()).pop() {
            return Some(r);
        }
        match write_ring() {
            Ok(r) => Some(r),
            Err(e) => {
                if !self.warned.swap(true, Ordering::AcqRel) {
                    log::warn!(
                        "io_uring is unavailable for batched image writes ({e}); \
                         writing them one at a time"
                    );
                }
                self.off.store(true, Ordering::Release);
                None
            }
        }
    }

    fn give_back(&self, ring: IoUring) {
        let mut pool = self.pool.lock().unwrap_or_else(|e| e.into_inner());
        if pool.len() < KEPT_RINGS {
            pool.push(ring);
        }
    }

    /// Writes every `(buf, offset)` of `writes` (each aligned as `d` takes it as is, none
    /// overlapping another) to `fd` (the O_DIRECT descriptor `f` stands for), all in flight
    /// at once. One result per write, in order; returns when every write has completed.
    pub(super) fn write(
        &self,
        d: &DirectIo,
        f: &dyn PosIo,
        fd: RawFd,
        writes: &[(&[u8], u64)],
    ) -> Vec<io::Result<()>> {
        let Some(mut ring) = self.take() else {
            return writes.iter().map(|&(b, o)| d.write_at(f, b, o)).collect();
        };
        let mut results: Vec<Option<io::Result<()>>> = (0..writes.len()).map(|_| None).collect();
        for (chunk_no, chunk) in writes.chunks(RING_ENTRIES as usize).enumerate() {
            let base = chunk_no * RING_ENTRIES as usize;
            let mut pushed = 0usize;
            for (i, &(buf, off)) in chunk.iter().enumerate() {
                let len = u32::try_from(buf.len()).unwrap_or(u32::MAX);
                let sqe = opcode::Write::new(types::Fd(fd), buf.as_ptr(), len)
                    .offset(off)
                    .build()
                    .user_data((base + i) as u64);
                // SAFETY: the buffer stays borrowed until its completion is reaped below (this
                // function does not return before every pushed entry has completed).
                if unsafe { ring.submission().push(&sqe) }.is_err() {
                    break;
                }
                pushed += 1;
            }
            let mut done = 0usize;
            while done < pushed {
                match ring.submit_and_wait(pushed - done) {
                    Ok(_) => {}
                    Err(e)
                        if matches!(
                            e.raw_os_error(),
                            Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)
                        ) => {}
                    Err(e) => {
                        // Entries may be in the kernel: their buffers must outlive them, so keep
                        // waiting (never seen; io_uring_enter fails like this only on bugs).
                        log::error!("waiting for batched image writes failed: {e}; retrying");
                        std::thread::sleep(std::time::Duration::from_millis(1));
                    }
                }
                for cqe in ring.completion() {
                    let Ok(k) = usize::try_from(cqe.user_data()) else {
                        continue;
                    };
                    if let (Some(slot), Some(&(buf, off))) = (results.get_mut(k), writes.get(k)) {
                        *slot = Some(finish(d, f, buf, off, cqe.result()));
                        done += 1;
                        self.completed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
        self.give_back(ring);
        results
            .into_iter()
            .zip(writes)
            .map(|(r, &(b, o))| r.unwrap_or_else(|| d.write_at(f, b, o)))
            .collect()
    }
}

/// The outcome of a ring write of `buf` at `off` that completed with `res` (bytes written, or a
/// negated errno): a short or interrupted write is finished with `pwrite`s.
pub(super) fn finish(
    d: &DirectIo,
    f: &dyn PosIo,
    buf: &[u8],
    off: u64,
    res: i32,
) -> io::Result<()> {
    match usize::try_from(res) {
        Ok(n) if n >= buf.len() => Ok(()),
        Ok(n) => {
            // The kernel writes whole blocks; what it reports written is written.
            let n = n - n % usize::try_from(d.block()).unwrap_or(1).max(1);
            d.write_at(f, &buf[n..], off + n as u64)
        }
        Err(_) if matches!(-res, libc::EINTR | libc::EAGAIN) => d.write_at(f, buf, off),
        Err(_) => Err(io::Error::from_raw_os_error(-res)),
    }
}
