//! The io_uring read path: a queue's reads that miss the folio cache go from the host files
//! straight into the guest's own buffers, as many in flight as the guest submitted, without a
//! thread per request.
//!
//! For each IN request the queue thread pops, [`UringReads::try_submit`] parses the chain
//! ([`RequestWorker::prepare_read`]) and asks the disk stack where its bytes are
//! ([`blockdev::BlockDev::plan_read`]): the folio cache answers only when no folio of the range
//! is cached, the qcow2 overlay for ranges that are unallocated (backing chain), zero, or in
//! its own uncompressed data clusters (pinned against reuse while the plan lives), the raw base
//! with its file. Zero pieces are written to guest memory at once; each file piece
//! becomes one IORING_OP_READV on the guest's buffers (zero copy with an O_DIRECT file, the
//! kernel's one copy from its page cache otherwise). Everything else (cache hits, writes,
//! flushes, compressed clusters, malformed chains) keeps the executor path of
//! [`crate::inflight`], and so does a read when the ring is full or the bound of in-flight
//! reads (`--max-inflight`) is reached.
//!
//! Which reads take the ring follows the runner's speed estimate ([`crate::inflight`]): while
//! requests wait for the disk (the estimate is slow, or the pass has already met a slow one)
//! reads go on the ring; while they are fast they run on the queue thread through the stack,
//! whose misses fill the folio cache, so a working set that fits in memory ends up served from
//! it. A ring read counts with its time on the ring, or as a (lighter) fast sample when it
//! completed within the system call that submitted it (the host page cache had it).
//!
//! The pass submits its reads in groups of [`SUBMIT_EVERY`] entries (and what is left at its
//! end), so that the disk starts on the first reads of a deep pass while the queue thread is
//! still planning the others. Completions raise the ring's eventfd, which the queue's worker
//! thread watches next to the kick (`handle_event`), and are also collected at the end of
//! every pass; each request goes to the used ring the moment its last piece completes, in any
//! order. A failed or short piece (EIO, EOF, a truncated file) does not fail the request: it
//! is executed again through the synchronous path ([`RequestWorker::process_chain`]), which
//! retries the read and reports its error exactly as for every other request. Reads change no
//! state, so executing one twice is harmless.
//!
//! The pause gate (live snapshots) is held while a read is planned and submitted, not while it
//! is in flight: a plan names read-only backing files, zeros and the overlay's own clusters,
//! none of which a snapshot moves (the overlay it freezes keeps its clusters where they are),
//! and holding the files open and the pins on the clusters is the plan's job (the request
//! keeps its plan until its last piece completed). So a pause never waits for the queue
//! thread, which may itself be waiting at the gate.
//!
//! Ring set-up: the ring is created disabled, restricted to IORING_OP_READV
//! (IORING_REGISTER_RESTRICTIONS) and only then enabled, so even a bug cannot make it open,
//! write or connect anything behind the seccomp filter. If io_uring is unavailable (old kernel,
//! seccomp, `io_uring_disabled`), the queue serves every request on the executors, with one
//! warning.
//!
//! Locking model: one mutex per queue around the ring and its table of requests in flight.
//! Lock order: the vring lock before this mutex (the pass submits under the vring lock); the
//! vring lock is never taken while this mutex is held: completions are collected under it and
//! put on the used ring after it is released. [`UringReads::wait_idle`] (stop, reset,
//! disconnect) waits on the ring itself, so it does not depend on the queue thread running.

use std::io;
use std::os::unix::io::AsRawFd;
use std::sync::{Arc, Mutex, MutexGuard};

use blockdev::{PlanSource, ReadPlan};
use io_uring::{opcode, register::Restriction, types, IoUring};
use log::{error, warn};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::device::BlkDevice;
use crate::inflight::{OwnedChain, UsedRing};
use crate::metrics::{DetachedTimer, Op};
use crate::request::{PreparedRead, RequestWorker};
use crate::virtio_blk::VIRTIO_BLK_S_OK;

/// Most file pieces one request may have on the ring (a fragmented plan takes the executors;
/// at most 16: [`Pending::direct`] has a bit per piece).
const MAX_PIECES: usize = 16;

/// A pass submits its reads whenever this many entries are waiting, not only at its end: the
/// disk starts on the first reads of a 32-request pass while the queue thread still plans the
/// others (cold 4 KiB reads QD32: about 1.15x against one submission per pass, for 4 system
/// calls instead of 1).
pub(crate) const SUBMIT_EVERY: usize = 8;

/// Zeros for the zero pieces of a plan.
static ZEROS: [u8; 64 << 10] = [0; 64 << 10];

/// The iovecs of each file piece of a read (boxed: their addresses must not move while the
/// kernel holds them).
type PieceIovecs = Vec<Box<[libc::iovec]>>;

/// A read on the ring.
struct Pending<R> {
    ring: R,
    head: u16,
    mem: Arc<GuestMemoryMmap>,
    /// Kept to execute the request again if a piece fails.
    chain: OwnedChain,
    status: GuestAddress,
    len: u64,
    /// The iovecs of each file piece (the guest buffers the kernel reads into).
    iovecs: PieceIovecs,
    /// Bytes each piece must return.
    expect: Vec<usize>,
    remaining: usize,
    failed: bool,
    /// Bit `i`: file piece `i` was read through the plan's O_DIRECT description.
    direct: u16,
    /// Where each piece comes from; keeps the files open while the kernel reads them.
    plan: ReadPlan,
    timer: DetachedTimer,
    /// When it was put on the ring, and the submission (`Engine::epoch`) that carries it.
    pushed: std::time::Instant,
    epoch: u64,
}

impl<R> Pending<R> {
    /// File piece `piece`, read through its O_DIRECT description, failed with `errno`: after a
    /// refusal (EINVAL), later reads of that file take its buffered description.
    fn direct_refused(&self, piece: usize, errno: i32) {
        let direct = self
            .plan
            .pieces
            .iter()
            .filter_map(|(_, s)| match s {
                PlanSource::File { direct, .. } => Some(direct),
                PlanSource::Zero => None,
            })
            .nth(piece);
        if let Some(Some(d)) = direct {
            if d.refused(errno) {
                warn!(
                    "request {}: an O_DIRECT read was refused ({}); reads of that file go \
                     through the host page cache from now",
                    self.head,
                    io::Error::from_raw_os_error(errno)
                );
            }
        }
    }
}

// SAFETY: the raw pointers in `iovecs` point into guest memory mapped by `mem`, which the
// request owns; they are only handed to the kernel, never dereferenced by this process.
unsafe impl<R: Send> Send for Pending<R> {}

/// A read whose pieces have all completed, to finish with the ring unlocked.
pub struct Finished<R> {
    p: Pending<R>,
    /// It completed within the system call that submitted it (host page-cache hits).
    at_submit: bool,
}

struct Engine<R> {
    ring: IoUring,
    slots: Vec<Option<Pending<R>>>,
    free: Vec<usize>,
    /// Requests on the ring.
    pending: usize,
    /// Entries pushed and not yet submitted.
    unsubmitted: usize,
    /// Submissions made so far.
    epoch: u64,
    /// Reads that completed within a submission made during the pass, for
    /// [`UringReads::end_pass`].
    ready: Vec<Finished<R>>,
    /// The queue (for log messages).
    queue: usize,
}

/// The io_uring read path of one virtqueue.
pub struct UringReads<R: UsedRing> {
    engine: Mutex<Engine<R>>,
    event: EventFd,
    dev: Arc<BlkDevice>,
    queue: usize,
    max_inflight: usize,
    /// Executes reads whose ring attempt failed (rare; only the thread finishing them uses it).
    fallback: Mutex<RequestWorker>,
    /// Where each finished read's cost goes (the runner's moving average, see
    /// [`crate::inflight`]): `None` for a read that completed at its submission (the host
    /// page cache had it), else its time on the ring.
    record: Box<dyn Fn(Option<std::time::Duration>) + Send + Sync>,
}

impl<R: UsedRing> std::fmt::Debug for UringReads<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UringReads")
            .field("queue", &self.queue)
            .field("max_inflight", &self.max_inflight)
            .finish()
    }
}

/// A ring of `entries` that can only read and that raises `event` when something completes
/// (see the module documentation). The eventfd is registered before the restrictions, which
/// also forbid every later registration.
fn restricted_ring(entries: u32, event: &EventFd) -> io::Result<IoUring> {
    let ring = IoUring::builder().setup_r_disabled().build(entries)?;
    let sub = ring.submitter();
    sub.register_eventfd(event.as_raw_fd())?;
    sub.register_restrictions(&mut [Restriction::sqe_op(opcode::Readv::CODE)])?;
    sub.register_enable_rings()?;
    Ok(ring)
}

impl<R: UsedRing> UringReads<R> {
    /// The ring size for `max_inflight` reads (room for a few pieces each).
    pub fn entries_for(max_inflight: usize) -> u32 {
        u32::try_from((max_inflight.max(1) * 4).next_power_of_two().min(4096)).unwrap_or(4096)
    }

    /// The read path of queue `queue`, with at most `max_inflight` reads on a ring of
    /// `entries` ([`Self::entries_for`]).
    pub fn new(
        dev: Arc<BlkDevice>,
        queue: usize,
        max_inflight: usize,
        entries: u32,
        record: Box<dyn Fn(Option<std::time::Duration>) + Send + Sync>,
    ) -> io::Result<Self> {
        let max_inflight = max_inflight.max(1);
        let event = EventFd::new(EFD_NONBLOCK)?;
        let ring = restricted_ring(entries, &event)?;
        Ok(UringReads {
            engine: Mutex::new(Engine {
                ring,
                slots: Vec::new(),
                free: Vec::new(),
                pending: 0,
                unsubmitted: 0,
                epoch: 0,
                ready: Vec::new(),
                queue,
            }),
            event,
            dev,
            queue,
            max_inflight,
            fallback: Mutex::new(RequestWorker::for_queue(queue)),
            record,
        })
    }

    /// The eventfd raised when a read completes (the queue thread watches it).
    pub fn event_fd(&self) -> i32 {
        self.event.as_raw_fd()
    }

    fn lock(&self) -> MutexGuard<'_, Engine<R>> {
        self.engine.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reads on the ring.
    pub fn inflight(&self) -> usize {
        self.lock().pending
    }

    /// Puts the read `chain` on the ring. `Err` gives the chain back when it is not a read this
    /// path takes (the caller executes it the usual way); `Ok(Some)` is a read that needed no
    /// I/O (all zeros), to finish at once.
    pub fn try_submit(
        &self,
        worker: &mut RequestWorker,
        ring: &R,
        mem: &Arc<GuestMemoryMmap>,
        chain: OwnedChain,
    ) -> Result<Option<Finished<R>>, OwnedChain> {
        if self.lock().pending >= self.max_inflight {
            return Err(chain);
        }
        let Some(req) = worker.prepare_read(&self.dev, &**mem, chain.clone()) else {
            return Err(chain);
        };
        // Held while planning and submitting only (module documentation).
        let _gate = self.dev.live().enter_gate();
        let Some(plan) = self.dev.disk().plan_read(req.offset, req.len) else {
            return Err(chain);
        };
        let files = plan
            .pieces
            .iter()
            .filter(|(_, s)| matches!(s, PlanSource::File { .. }))
            .count();
        if plan.len() != req.len || files > MAX_PIECES {
            return Err(chain);
        }
        let Some((iovecs, expect)) = guest_iovecs(mem, &req, &plan) else {
            return Err(chain);
        };
        let head = chain.head_index();
        let make = |chain: OwnedChain| Pending {
            ring: ring.clone(),
            head,
            mem: Arc::clone(mem),
            chain,
            status: req.status,
            len: req.len,
            iovecs,
            expect,
            remaining: files,
            failed: false,
            direct: 0,
            plan,
            timer: self.dev.live().request_metrics().begin_detached(self.queue),
            pushed: std::time::Instant::now(),
            epoch: 0,
        };
        if files == 0 {
            return Ok(Some(Finished {
                p: make(chain),
                at_submit: true,
            }));
        }
        let mut e = self.lock();
        if !e.make_room(files) {
            return Err(chain);
        }
        e.push(make(chain));
        if e.unsubmitted >= SUBMIT_EVERY {
            e.submit_pushed();
        }
        Ok(None)
    }

    /// Ends a processing pass: submits what it put on the ring since its last submission and
    /// returns the reads that have completed already (within the pass's submissions or
    /// after). Reads of pages in the host page cache complete during the submission itself,
    /// so the ring's eventfd is disarmed here and armed again only when the pass leaves reads
    /// in flight: then every later completion wakes the queue thread, and one posted before
    /// the arming is collected here.
    pub fn end_pass(&self) -> Vec<Finished<R>> {
        let mut e = self.lock();
        e.ring.completion().disable_eventfd();
        e.submit_pushed();
        let mut done = std::mem::take(&mut e.ready);
        if e.pending > 0 {
            let _ = self.event.read();
            e.ring.completion().enable_eventfd();
            done.extend(e.harvest(false));
        }
        done
    }

    /// The reads whose last piece has completed, without waiting.
    pub fn collect(&self) -> Vec<Finished<R>> {
        let _ = self.event.read();
        let mut e = self.lock();
        e.harvest(false)
    }

    /// Finishes `done`: its status (or, if a piece failed, its execution through the
    /// synchronous path), then returns what the used ring needs: `(ring, memory, head, used
    /// length)`.
    pub fn finish(&self, done: Finished<R>) -> (R, Arc<GuestMemoryMmap>, u16, u32) {
        let p = done.p;
        (self.record)(if done.at_submit {
            None
        } else {
            Some(p.pushed.elapsed())
        });
        let metrics = self.dev.live().request_metrics();
        let used = if p.failed {
            metrics.abandon_detached(p.timer);
            let mut w = self.fallback.lock().unwrap_or_else(|e| e.into_inner());
            w.process_chain(&self.dev, &*p.mem, p.chain)
        } else {
            metrics.finish_detached(p.timer, Op::Read, p.len, None);
            match p.mem.write_slice(&[VIRTIO_BLK_S_OK], p.status) {
                Ok(()) => u32::try_from(p.len + 1).unwrap_or(u32::MAX),
                Err(e) => {
                    error!("request {}: cannot write status byte: {e}", p.head);
                    u32::try_from(p.len).unwrap_or(u32::MAX)
                }
            }
        };
        (p.ring, p.mem, p.head, used)
    }

    /// Finishes every read that completed and puts it on its used ring (one notification for
    /// the batch).
    pub fn complete_ready(&self) {
        let done = self.collect();
        self.complete_batch(done);
    }

    fn complete_batch(&self, done: Vec<Finished<R>>) {
        let mut ring = None;
        let mut items = Vec::with_capacity(done.len());
        for d in done {
            let (r, mem, head, len) = self.finish(d);
            items.push((mem, head, len));
            ring.get_or_insert(r);
        }
        if let Some(r) = ring {
            r.complete_many(&items);
        }
    }

    /// Blocks until no read is on the ring, completing each to its used ring.
    pub fn wait_idle(&self) {
        loop {
            let done = {
                let mut e = self.lock();
                if e.pending == 0 {
                    return;
                }
                let got = e.ring.submit_and_wait(1);
                if let Err(err) = got {
                    if err.raw_os_error() != Some(libc::EINTR) {
                        error!("queue {}: io_uring wait: {err}", self.queue);
                    }
                }
                e.unsubmitted = 0;
                e.harvest(false)
            };
            self.complete_batch(done);
        }
    }
}

impl<R: UsedRing> Drop for UringReads<R> {
    fn drop(&mut self) {
        // The kernel must be done with the guest buffers and files before they go.
        self.wait_idle();
    }
}

impl<R> Engine<R> {
    /// Submits the entries pushed since the last submission (one system call), then sets
    /// aside the reads that completed within it (see [`Finished::at_submit`]) together with
    /// any other read that has completed, for the end of the pass.
    fn submit_pushed(&mut self) {
        if self.ring.submission().is_empty() {
            return;
        }
        match self.ring.submit() {
            Ok(_) => {
                self.unsubmitted = 0;
                let done = self.harvest(true);
                self.ready.extend(done);
                self.epoch += 1;
            }
            // EBUSY/EAGAIN: the kernel takes them with the next call.
            Err(err) => warn!("queue {}: io_uring submit: {err}", self.queue),
        }
    }

    /// Whether `n` more entries fit in the submission queue (submitting what is there first
    /// if needed).
    fn make_room(&mut self, n: usize) -> bool {
        let room = |ring: &mut IoUring| {
            let sq = ring.submission();
            sq.capacity() - sq.len()
        };
        if room(&mut self.ring) >= n {
            return true;
        }
        self.submit_pushed();
        room(&mut self.ring) >= n
    }

    /// Pushes the pieces of `p` ([`Self::make_room`] said they fit).
    fn push(&mut self, p: Pending<R>) {
        let slot = match self.free.pop() {
            Some(s) => s,
            None => {
                self.slots.push(None);
                self.slots.len() - 1
            }
        };
        let files = p.plan.pieces.iter().filter_map(|(_, s)| match s {
            PlanSource::File {
                file,
                offset,
                direct,
            } => Some((file, *offset, direct)),
            PlanSource::Zero => None,
        });
        let mut direct_mask = 0u16;
        let entries: Vec<_> = files
            .zip(p.iovecs.iter())
            .enumerate()
            .map(|(i, ((file, offset, direct), iov))| {
                // The O_DIRECT description where the plan offers it and the guest's buffers
                // meet its alignments (module documentation).
                let direct = direct.as_ref().filter(|d| {
                    d.usable()
                        && d.takes(offset, iov.iter().map(|v| (v.iov_base as usize, v.iov_len)))
                });
                let fd = match direct {
                    Some(d) => {
                        direct_mask |= 1 << i;
                        d.file().as_raw_fd()
                    }
                    None => file.as_raw_fd(),
                };
                opcode::Readv::new(
                    types::Fd(fd),
                    iov.as_ptr(),
                    u32::try_from(iov.len()).unwrap_or(u32::MAX),
                )
                .offset(offset)
                .build()
                .user_data(((slot as u64) << 16) | i as u64)
            })
            .collect();
        // SAFETY: each entry names iovecs owned by `p` (boxed, so they do not move), whose
        // buffers are guest memory kept mapped by `p.mem`, and a file kept open by `p.plan`;
        // `p` stays in `slots` until the kernel has completed every entry.
        let pushed = unsafe { self.ring.submission().push_multiple(&entries) };
        debug_assert!(pushed.is_ok(), "make_room said the entries fit");
        let n = entries.len();
        let mut p = p;
        p.direct = direct_mask;
        p.epoch = self.epoch;
        self.slots[slot] = Some(p);
        self.pending += 1;
        self.unsubmitted += n;
    }

    /// Takes the completions the kernel has posted; returns the requests they finished.
    /// `just_submitted`: called right after the submission of epoch `self.epoch`, so the reads
    /// it carried that are done completed within that system call.
    fn harvest(&mut self, just_submitted: bool) -> Vec<Finished<R>> {
        let epoch = self.epoch;
        let mut out = Vec::new();
        let cqes: Vec<(u64, i32)> = self
            .ring
            .completion()
            .map(|c| (c.user_data(), c.result()))
            .collect();
        for (data, res) in cqes {
            let slot = (data >> 16) as usize;
            let piece = (data & 0xffff) as usize;
            let Some(Some(p)) = self.slots.get_mut(slot) else {
                error!("io_uring completion for unknown request slot {slot}");
                continue;
            };
            let want = p.expect.get(piece).copied().unwrap_or(0);
            if usize::try_from(res).ok() != Some(want) {
                if res < 0 && p.direct & (1 << piece) != 0 {
                    p.direct_refused(piece, -res);
                }
                if res < 0 {
                    warn!(
                        "request {}: io_uring read failed ({}); executing it again",
                        p.head,
                        io::Error::from_raw_os_error(-res)
                    );
                } else {
                    warn!(
                        "request {}: io_uring read returned {res} of {want} bytes; executing it again",
                        p.head
                    );
                }
                p.failed = true;
            }
            p.remaining -= 1;
            if p.remaining == 0 {
                if let Some(p) = self.slots[slot].take() {
                    self.free.push(slot);
                    self.pending -= 1;
                    let at_submit = just_submitted && p.epoch == epoch;
                    out.push(Finished { p, at_submit });
                }
            }
        }
        out
    }
}

/// Fills the zero pieces of `plan` in guest memory and builds the iovecs of its file pieces
/// over the guest buffers of `req`; also returns the bytes each file piece must read. `None`
/// if a buffer is not guest RAM.
fn guest_iovecs(
    mem: &GuestMemoryMmap,
    req: &PreparedRead,
    plan: &ReadPlan,
) -> Option<(PieceIovecs, Vec<usize>)> {
    let mut iovecs = Vec::new();
    let mut expect = Vec::new();
    let mut seg = 0usize;
    let mut seg_off = 0usize;
    for (len, src) in &plan.pieces {
        let mut left = usize::try_from(*len).ok()?;
        expect.push(left);
        let mut iov = Vec::new();
        while left > 0 {
            let (addr, seg_len) = *req.data.get(seg)?;
            let n = (seg_len - seg_off).min(left);
            let at = addr.checked_add(seg_off as u64)?;
            match src {
                PlanSource::Zero => {
                    let mut done = 0;
                    while done < n {
                        let k = (n - done).min(ZEROS.len());
                        mem.write_slice(&ZEROS[..k], at.checked_add(done as u64)?)
                            .ok()?;
                        done += k;
                    }
                }
                PlanSource::File { .. } => {
                    let slice = mem.get_slice(at, n).ok()?;
                    iov.push(libc::iovec {
                        iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                        iov_len: n,
                    });
                }
            }
            left -= n;
            seg_off += n;
            if seg_off == seg_len {
                seg += 1;
                seg_off = 0;
            }
        }
        if matches!(src, PlanSource::File { .. }) {
            if iov.len() > libc::UIO_MAXIOV as usize {
                return None;
            }
            iovecs.push(iov.into_boxed_slice());
        } else {
            expect.pop();
        }
    }
    Some((iovecs, expect))
}

#[cfg(test)]
mod ring_tests {
    use super::*;

    #[test]
    fn the_read_ring_refuses_every_operation_but_readv_and_every_later_registration() {
        let event = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut ring = restricted_ring(8, &event).unwrap();
        let file = tempfile::tempfile().unwrap();
        let data = b"written through the ring";
        let entries = [
            opcode::Nop::new().build().user_data(1),
            opcode::Write::new(
                types::Fd(file.as_raw_fd()),
                data.as_ptr(),
                data.len() as u32,
            )
            .build()
            .user_data(2),
            opcode::Fsync::new(types::Fd(file.as_raw_fd()))
                .build()
                .user_data(3),
        ];
        // One at a time: the kernel stops a batch at its first refused entry.
        let mut results = Vec::new();
        for e in &entries {
            // SAFETY: the entry names `data` and `file`, which outlive the wait below.
            unsafe { ring.submission().push(e).unwrap() };
            ring.submit_and_wait(1).unwrap();
            results.extend(ring.completion().map(|c| (c.user_data(), c.result())));
        }
        assert_eq!(
            results,
            vec![(1, -libc::EACCES), (2, -libc::EACCES), (3, -libc::EACCES)]
        );
        assert_eq!(file.metadata().unwrap().len(), 0, "nothing was written");
        let err = ring
            .submitter()
            .register_eventfd(event.as_raw_fd())
            .unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EACCES));
    }
}
