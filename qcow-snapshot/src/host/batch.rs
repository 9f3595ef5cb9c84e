//! Batched direct I/O on io_uring: many writes (or reads) of one O_DIRECT file in flight at once.
//!
//! A writeback of small folios into an O_DIRECT image is one device write each. Issued one after
//! another (`pwrite` per folio) the device sees one at a time, and every write is a kick of the
//! virtual disk of its own (the kick, a VM exit here, was the largest single cost of such a
//! writeback). [`Rings::write`] puts a whole batch on a ring with one system call, so the
//! block layer plugs it into one dispatch and the device works on all of it at once, and waits
//! until every write of the batch has completed: the buffers are borrowed, so nothing returns
//! while the kernel may still read one.
//!
//! A completion that wrote less than asked (a short write) or was interrupted is finished with
//! `pwrite`s ([`DirectIo::write_at`] continues short writes); a failed one reports its own error,
//! for that write only. Where a ring cannot be made (an old kernel, a seccomp policy without
//! io_uring), or rings are turned off ([`Rings::disable`], `serve --aio threads`), the batch
//! is written one `pwrite` after another, with one warning.
//!
//! The same for reads ([`Rings::read`]): the copy-on-write clusters of a batch are filled from
//! an O_DIRECT descriptor of a raw backing file, all of them in flight at once, straight into
//! the batch's buffer (see `image/datapath.rs`).
//!
//! A ring is restricted to IORING_OP_WRITE, or to IORING_OP_READ, before it is enabled (as the
//! daemon's read rings are to READV): seccomp does not see what a ring executes.
//!
//! Locking model: `pool` (a leaf) is held only to take a ring out or to give it back; a batch
//! owns its ring while it runs, so batches of several threads run at once on rings of their own.

use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use io_uring::{opcode, register::Restriction, squeue, types, IoUring};

use crate::direct::{DirectIo, PosIo};

/// Entries of a ring: the most I/Os one submission carries.
const RING_ENTRIES: u32 = 64;

/// Rings kept for reuse (more threads than this running batches at once make their own).
const KEPT_RINGS: usize = 8;

/// Set by [`disable_rings`]: every file does its batches one system call at a time.
static ALL_OFF: AtomicBool = AtomicBool::new(false);

/// Turns batched ring I/O off for every image file of the process (`serve --aio threads`: no
/// io_uring anywhere on the data path).
pub fn disable_rings() {
    ALL_OFF.store(true, Ordering::Release);
}

/// A pool of rings for one file that can each do one kind of I/O only: writes
/// ([`Rings::for_writes`]) or reads ([`Rings::for_reads`]).
pub(crate) struct Rings {
    reads: bool,
    pool: Mutex<Vec<IoUring>>,
    /// Batches go one system call at a time.
    off: AtomicBool,
    warned: AtomicBool,
    /// I/Os that completed on a ring (short ones included).
    completed: AtomicU64,
}

impl std::fmt::Debug for Rings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rings")
            .field("reads", &self.reads)
            .field("off", &self.off)
            .finish_non_exhaustive()
    }
}

/// A ring of [`RING_ENTRIES`] that can only run `op` (see the module documentation).
fn ring_for(op: u8) -> io::Result<IoUring> {
    let ring = IoUring::builder().setup_r_disabled().build(RING_ENTRIES)?;
    let sub = ring.submitter();
    sub.register_restrictions(&mut [Restriction::sqe_op(op)])?;
    sub.register_enable_rings()?;
    Ok(ring)
}

impl Rings {
    /// Rings for batches of writes.
    pub(crate) fn for_writes() -> Rings {
        Rings::new(false)
    }

    /// Rings for batches of reads.
    pub(crate) fn for_reads() -> Rings {
        Rings::new(true)
    }

    fn new(reads: bool) -> Rings {
        Rings {
            reads,
            pool: Mutex::default(),
            off: AtomicBool::new(false),
            warned: AtomicBool::new(false),
            completed: AtomicU64::new(0),
        }
    }

    /// Batches go one system call after another from now on.
    pub(crate) fn disable(&self) {
        self.off.store(true, Ordering::Release);
    }

    /// How many I/Os completed on a ring so far.
    pub(crate) fn completed(&self) -> u64 {
        self.completed.load(Ordering::Relaxed)
    }

    fn take(&self) -> Option<IoUring> {
        if self.off.load(Ordering::Acquire) || ALL_OFF.load(Ordering::Acquire) {
            return None;
        }
        if let Some(r) = self.pool.lock().unwrap_or_else(|e| e.into_inner()).pop() {
            return Some(r);
        }
        let op = if self.reads {
            opcode::Read::CODE
        } else {
            opcode::Write::CODE
        };
        match ring_for(op) {
            Ok(r) => Some(r),
            Err(e) => {
                if !self.warned.swap(true, Ordering::AcqRel) {
                    log::warn!(
                        "io_uring is unavailable for batched image {} ({e}); doing them one at a \
                         time",
                        if self.reads { "reads" } else { "writes" }
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

    /// Runs the `n` entries `sqe(k)` makes on `ring`, all in flight at once (in chunks of
    /// [`RING_ENTRIES`]), and calls `done(k, result)` for each completion. Returns when every
    /// pushed entry has completed; an entry the ring could not take is never done.
    fn run(
        &self,
        ring: &mut IoUring,
        n: usize,
        sqe: impl Fn(usize) -> squeue::Entry,
        mut done: impl FnMut(usize, i32),
    ) {
        for base in (0..n).step_by(RING_ENTRIES as usize) {
            let mut pushed = 0usize;
            for k in base..n.min(base + RING_ENTRIES as usize) {
                let e = sqe(k).user_data(k as u64);
                // SAFETY: the caller's buffers stay borrowed until their completions are
                // reaped below (this function does not return before every pushed entry has
                // completed).
                if unsafe { ring.submission().push(&e) }.is_err() {
                    break;
                }
                pushed += 1;
            }
            let mut reaped = 0usize;
            while reaped < pushed {
                match ring.submit_and_wait(pushed - reaped) {
                    Ok(_) => {}
                    Err(e)
                        if matches!(
                            e.raw_os_error(),
                            Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)
                        ) => {}
                    Err(e) => {
                        // Entries may be in the kernel: their buffers must outlive them, so keep
                        // waiting (never seen; io_uring_enter fails like this only on bugs).
                        log::error!("waiting for batched image I/O failed: {e}; retrying");
                        std::thread::sleep(std::time::Duration::from_millis(1));
                    }
                }
                for cqe in ring.completion() {
                    if let Ok(k) = usize::try_from(cqe.user_data()) {
                        if k < n {
                            done(k, cqe.result());
                            reaped += 1;
                            self.completed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }
        }
    }

    /// Writes every `(buf, offset)` of `writes` (none overlapping another) to `fd` (the
    /// O_DIRECT descriptor `f` stands for), all in flight at once; what `d` does not take as
    /// it is (unaligned: a read-modify-write of its end blocks) is written alone. One result
    /// per write, in order; returns when every write has completed.
    pub(crate) fn write(
        &self,
        d: &DirectIo,
        f: &dyn PosIo,
        fd: RawFd,
        writes: &[(&[u8], u64)],
    ) -> Vec<io::Result<()>> {
        let mut results: Vec<Option<io::Result<()>>> = (0..writes.len()).map(|_| None).collect();
        let on_ring: Vec<usize> = (0..writes.len())
            .filter(|&k| d.takes_as_is(writes[k].0, writes[k].1))
            .collect();
        if let Some(mut ring) = (!on_ring.is_empty()).then(|| self.take()).flatten() {
            self.run(
                &mut ring,
                on_ring.len(),
                |j| {
                    let (buf, off) = writes[on_ring[j]];
                    let len = u32::try_from(buf.len()).unwrap_or(u32::MAX);
                    opcode::Write::new(types::Fd(fd), buf.as_ptr(), len)
                        .offset(off)
                        .build()
                },
                |j, res| {
                    let k = on_ring[j];
                    let (buf, off) = writes[k];
                    results[k] = Some(finish(d, f, buf, off, res));
                },
            );
            self.give_back(ring);
        }
        results
            .into_iter()
            .zip(writes)
            .map(|(r, &(b, o))| r.unwrap_or_else(|| d.write_at(f, b, o)))
            .collect()
    }

    /// Reads every `(buf, offset)` of `reads` from `fd` (the O_DIRECT descriptor `f` stands
    /// for), all in flight at once; what `d` does not take as it is (unaligned) is read alone.
    /// One result per read, in order; bytes past the end of the file read as zeros.
    pub(crate) fn read(
        &self,
        d: &DirectIo,
        f: &dyn PosIo,
        fd: RawFd,
        reads: &mut [(&mut [u8], u64)],
    ) -> Vec<io::Result<()>> {
        let mut results: Vec<Option<io::Result<()>>> = (0..reads.len()).map(|_| None).collect();
        let on_ring: Vec<usize> = (0..reads.len())
            .filter(|&k| d.takes_as_is(reads[k].0, reads[k].1))
            .collect();
        if let Some(mut ring) = (!on_ring.is_empty()).then(|| self.take()).flatten() {
            // The kernel fills the buffers through these pointers while the slices stay
            // untouched; each is looked at again only after its completion.
            let targets: Vec<(*mut u8, u32, u64)> = on_ring
                .iter()
                .map(|&k| {
                    let (b, off) = &mut reads[k];
                    let len = u32::try_from(b.len()).unwrap_or(u32::MAX);
                    (b.as_mut_ptr(), len, *off)
                })
                .collect();
            let mut res: Vec<Option<i32>> = vec![None; on_ring.len()];
            self.run(
                &mut ring,
                on_ring.len(),
                |j| {
                    let (ptr, len, off) = targets[j];
                    opcode::Read::new(types::Fd(fd), ptr, len)
                        .offset(off)
                        .build()
                },
                |j, r| res[j] = Some(r),
            );
            self.give_back(ring);
            for (j, r) in res.into_iter().enumerate() {
                if let Some(r) = r {
                    let k = on_ring[j];
                    let (b, off) = &mut reads[k];
                    results[k] = Some(finish_read(d, f, b, *off, r));
                }
            }
        }
        results
            .into_iter()
            .zip(reads.iter_mut())
            .map(|(r, (b, o))| r.unwrap_or_else(|| d.read_at(f, b, *o)))
            .collect()
    }
}

/// The outcome of a ring I/O of `len` bytes that completed with `res` (bytes done, or a negated
/// errno): complete; short, then `rest(n)` does the rest from `n`, the last whole block the
/// kernel reports done (it moves whole blocks); interrupted, then `rest(0)` does it all again;
/// failed, with its errno.
fn completion(
    d: &DirectIo,
    len: usize,
    res: i32,
    rest: impl FnOnce(usize) -> io::Result<()>,
) -> io::Result<()> {
    match usize::try_from(res) {
        Ok(n) if n >= len => Ok(()),
        Ok(n) => rest(n - n % usize::try_from(d.block()).unwrap_or(1).max(1)),
        Err(_) if matches!(-res, libc::EINTR | libc::EAGAIN) => rest(0),
        Err(_) => Err(io::Error::from_raw_os_error(-res)),
    }
}

/// The outcome of a ring write of `buf` at `off` that completed with `res`: a short or
/// interrupted write is finished with `pwrite`s.
pub(super) fn finish(
    d: &DirectIo,
    f: &dyn PosIo,
    buf: &[u8],
    off: u64,
    res: i32,
) -> io::Result<()> {
    completion(d, buf.len(), res, |n| {
        d.write_at(f, &buf[n..], off + n as u64)
    })
}

/// The outcome of a ring read into `buf` at `off` that completed with `res`: a short or
/// interrupted read is finished with `pread`s (zeros past the end of the file).
pub(super) fn finish_read(
    d: &DirectIo,
    f: &dyn PosIo,
    buf: &mut [u8],
    off: u64,
    res: i32,
) -> io::Result<()> {
    let len = buf.len();
    completion(d, len, res, |n| d.read_at(f, &mut buf[n..], off + n as u64))
}
