//! Per-queue asynchronous execution: the guest's queue depth reaches the disk, and each request
//! goes back to the used ring the moment it finishes.
//!
//! A virtqueue is still drained by a single thread (the vhost-user worker of that queue). With a
//! [`QueueRunner`], that thread only pops chains and hands them over ([`submit_queue`]); it never
//! waits for a request. Up to `max_inflight` executor threads of the queue (started on demand)
//! execute the requests, so as many host I/Os are in flight as the guest submitted, bounded by
//! `--max-inflight`. Each executor puts its request on the used ring itself ([`UsedRing`]) as soon
//! as it has finished, in whatever order requests finish: a slow FLUSH or a cold read holds back
//! no other completion. virtio-blk gives no ordering between requests in flight together, and a
//! FLUSH covers only writes that completed (reached the used ring) before it was submitted; a
//! request reaches the used ring only after its disk operation returned, so both hold.
//!
//! Handing a request to another thread costs a wake-up and a context switch, far more than a
//! request served from memory (a folio-cache hit) costs itself. So the runner keeps a moving
//! average of how long requests take to execute. While requests are fast the queue thread runs a
//! pass's requests itself, one after the other, completing each to the used ring as it finishes
//! (the executors are idle, nothing waits behind it for long). As soon as one of them takes
//! longer than the slow threshold (it had to wait for the disk), the rest of the pass goes to
//! the executors, and so do the following passes until requests are fast again. A single request
//! found while nothing is in flight always runs inline (no hand-off on the queue-depth-1 path).
//! A write of at most `INLINE_WRITE_MAX` (64 KiB) that the disk stack says completes in memory
//! ([`BlkDevice::write_in_memory`]: the write-back cache has room for it) runs inline whatever
//! the estimate says and stays out of it: a copy into the cache costs less than a hand-off.
//! Writes the stack says may wait (no dirty budget left: they would write back to make room)
//! go to the executors, where those writebacks run in parallel.
//! A request on an executor that never slept counts with its CPU time, not its wall-clock time
//! (which preemption by the other executors inflates; see `executor_cost`).
//!
//! With `--aio io_uring` the same estimate decides which reads go on the queue's io_uring
//! ([`crate::uring`]) instead of an executor: those of a pass that hands off (requests are
//! slow); a ring read feeds the estimate with its time on the ring, or, when it completed at
//! its submission (the host page cache had it), with a fast sample of lesser weight
//! (`Shared::record_hit`).
//!
//! Stopping a queue (GET_VRING_BASE), resetting the device or closing the connection first waits
//! for the queue's requests in flight ([`QueueRunner::wait_idle`]): the frontend then reads a used
//! ring that no executor touches any more.
//!
//! Locking model: one mutex per runner guards the job queue and the in-flight count. Lock order:
//! the vring lock (held by the queue thread while it pops and submits) before the runner mutex.
//! An executor holds neither while a request executes; it takes the vring lock (through
//! [`UsedRing::complete`]) with the runner mutex released, and the runner mutex only afterwards to
//! count the completion. While the queue thread is in a pass (holding the vring lock), the ring
//! may take the completion without the lock and leave it to the queue thread, which adds it
//! with [`UsedRing::add_left`] after each request it runs and at the end of each round of pops
//! (the vhost-user ring, [`crate::vhu_blk::LeftCompletions`]). Each executor owns its own
//! [`RequestWorker`] buffers.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use blockdev::ThreadUsage;
use log::{error, warn};
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use crate::device::BlkDevice;
use crate::request::{
    check_avail_ring, peek_request_type, peek_write, pop_current, MemoryTable, ProcessQueueError,
    RequestWorker, StallCheck,
};
use crate::uring::UringReads;
use crate::virtio_blk::{VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_OUT};

/// A descriptor chain that owns its view of guest memory, so it can move to another thread with
/// that memory (a memory table update while it is in flight does not unmap its buffers).
pub type OwnedChain = DescriptorChain<Arc<GuestMemoryMmap>>;

/// Where an executor puts a finished request: the used ring of its queue, followed by a
/// notification of the driver when it asked for one.
pub trait UsedRing: Clone + Send + 'static {
    /// Adds `(head, len)` to the used ring and notifies the driver if it must be.
    fn complete(&self, mem: &GuestMemoryMmap, head: u16, len: u32);

    /// Adds every `(memory, head, len)` of `done` to the used ring and notifies the driver
    /// once if it must be (the io_uring path completes reads in batches).
    fn complete_many(&self, done: &[(Arc<GuestMemoryMmap>, u16, u32)]) {
        for (mem, head, len) in done {
            self.complete(mem, *head, *len);
        }
    }

    /// Called for each chain right after it was popped, with the queue still locked (in-flight
    /// tracking, [`crate::reconnect`]).
    fn popped(&self, _head: u16) {}

    /// Adds to `queue` (which the caller, the queue thread in its pass, holds locked) the
    /// completions executors left to it instead of waiting for the lock
    /// ([`crate::vhu_blk::LeftCompletions`]); how many, and whether the driver must be notified
    /// of one of them.
    fn add_left(&self, _queue: &mut Queue, _mem: &GuestMemoryMmap) -> (usize, bool) {
        (0, false)
    }

    /// Adds `(head, len)` to `queue`, which the caller holds locked, and reports whether the
    /// driver must be notified.
    fn complete_locked(
        &self,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
        head: u16,
        len: u32,
    ) -> bool {
        add_used_and_check(queue, mem, head, len)
    }
}

/// Adds a used element to `queue` and reports whether the driver must be notified.
pub fn add_used_and_check(queue: &mut Queue, mem: &GuestMemoryMmap, head: u16, len: u32) -> bool {
    if let Err(e) = queue.add_used(mem, head, len) {
        error!("cannot return descriptor {head} to the used ring: {e}");
        return false;
    }
    match queue.needs_notification(mem) {
        Ok(n) => n,
        Err(e) => {
            error!("cannot read the driver's event index: {e}");
            true
        }
    }
}

struct Job<R> {
    ring: R,
    mem: Arc<GuestMemoryMmap>,
    chain: OwnedChain,
    /// A FLUSH (peeked once, when the queue thread popped it): its time is not a sample of
    /// how long requests take.
    flush: bool,
}

struct State<R> {
    jobs: VecDeque<Job<R>>,
    /// Requests submitted and not yet on the used ring (queued or executing).
    inflight: usize,
    /// Executor threads started.
    threads: usize,
    /// Executor threads waiting for a job.
    idle: usize,
    shutdown: bool,
}

/// Default execution time above which a request counts as slow (it waited for the disk): a hot
/// 4 KiB request takes a few microseconds, a read from an SSD about a hundred.
pub const DEFAULT_SLOW_THRESHOLD: Duration = Duration::from_micros(40);

/// Largest write the queue thread runs itself when the disk takes it in memory
/// ([`BlkDevice::write_in_memory`]): a copy of up to 64 KiB into the folio cache and the crash
/// journal costs less than a hand-off to an executor and back.
const INLINE_WRITE_MAX: u64 = 64 * 1024;

struct Shared<R> {
    dev: Arc<BlkDevice>,
    /// The queue whose requests this runner executes (the metrics label of its workers).
    queue: usize,
    /// Moving average of request execution times in nanoseconds (weight 1/4 per sample).
    avg_ns: AtomicU64,
    slow_ns: u64,
    state: Mutex<State<R>>,
    work: Condvar,
    drained: Condvar,
}

impl<R> Shared<R> {
    fn lock(&self) -> MutexGuard<'_, State<R>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds one execution time to the moving average (racing updates may lose a sample, which
    /// only makes the estimate a little slower to follow).
    fn record(&self, took: Duration) {
        let sample = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        let avg = self.avg_ns.load(Ordering::Relaxed);
        let next = avg - avg / 4 + sample / 4;
        self.avg_ns.store(next, Ordering::Relaxed);
    }

    /// Counts one read that the host page cache served within the system call that submitted
    /// it: a fast sample, but with a quarter of [`Self::record`]'s weight. In a cold random
    /// phase a share of the reads hit the host page cache (pages that read-ahead or earlier
    /// reads brought in); at full weight a few of them in a row made the estimate fast, the
    /// next pass ran inline, and its first miss stopped the queue thread for a whole disk read
    /// while the ring's completions waited (a fifth of the queue thread's time at cold 4 KiB
    /// reads QD32). A queue whose reads all hit the host page cache still turns fast after
    /// about a dozen of them.
    fn record_hit(&self) {
        let avg = self.avg_ns.load(Ordering::Relaxed);
        self.avg_ns.store(avg - avg / 16, Ordering::Relaxed);
    }

    fn requests_are_fast(&self) -> bool {
        self.avg_ns.load(Ordering::Relaxed) < self.slow_ns
    }
}

/// The executors of one virtqueue.
pub struct QueueRunner<R: UsedRing> {
    shared: Arc<Shared<R>>,
    max_inflight: usize,
    name: String,
    handles: Mutex<Vec<JoinHandle<()>>>,
    /// The io_uring read path of the queue, if on and available ([`crate::uring`]).
    uring: Option<UringReads<R>>,
    /// Test hook: run after each round of pops of a pass with how many chains it popped (the
    /// window in which a driver publishes more chains behind the pass's back).
    #[cfg(test)]
    pub(crate) after_pops: Mutex<Option<AfterPops>>,
}

/// The type of [`QueueRunner::after_pops`].
#[cfg(test)]
pub(crate) type AfterPops = Box<dyn FnMut(usize) + Send>;

impl<R: UsedRing> std::fmt::Debug for QueueRunner<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueueRunner")
            .field("name", &self.name)
            .field("max_inflight", &self.max_inflight)
            .finish()
    }
}

impl<R: UsedRing> QueueRunner<R> {
    /// A runner that keeps at most `max_inflight` (at least 1) requests of one queue executing at
    /// once. Executor threads are named `{name}-ioN` and started when the guest's queue depth
    /// first needs them.
    pub fn new(dev: Arc<BlkDevice>, max_inflight: usize, name: &str) -> Self {
        Self::with_slow_threshold(dev, max_inflight, name, DEFAULT_SLOW_THRESHOLD)
    }

    /// The same runner, labelling its requests as queue `queue` in the statistics. Called
    /// before the first request, while no executor shares the runner's state.
    pub fn for_queue(mut self, queue: usize) -> Self {
        if let Some(shared) = Arc::get_mut(&mut self.shared) {
            shared.queue = queue;
        }
        self
    }

    /// [`Self::new`] with another slow threshold. The runner starts by assuming requests are
    /// slow (executors) until it has seen fast ones.
    pub fn with_slow_threshold(
        dev: Arc<BlkDevice>,
        max_inflight: usize,
        name: &str,
        slow: Duration,
    ) -> Self {
        let slow_ns = u64::try_from(slow.as_nanos()).unwrap_or(u64::MAX).max(1);
        QueueRunner {
            shared: Arc::new(Shared {
                dev,
                queue: 0,
                avg_ns: AtomicU64::new(slow_ns.saturating_mul(2)),
                slow_ns,
                state: Mutex::new(State {
                    jobs: VecDeque::new(),
                    inflight: 0,
                    threads: 0,
                    idle: 0,
                    shutdown: false,
                }),
                work: Condvar::new(),
                drained: Condvar::new(),
            }),
            max_inflight: max_inflight.max(1),
            name: name.to_string(),
            handles: Mutex::new(Vec::new()),
            uring: None,
            #[cfg(test)]
            after_pops: Mutex::new(None),
        }
    }

    /// The same runner with the io_uring read path ([`crate::uring`]) when `on` and the kernel
    /// allows it; otherwise (with a warning if it was asked for) every request takes the
    /// executors. Called before the first request.
    pub fn with_uring(self, on: bool) -> Self {
        let entries = UringReads::<R>::entries_for(self.max_inflight);
        self.with_uring_entries(on, entries)
    }

    /// [`Self::with_uring`] with a ring of `entries` (0 makes the ring fail: the fallback).
    pub(crate) fn with_uring_entries(mut self, on: bool, entries: u32) -> Self {
        self.uring = None;
        if on {
            let dev = Arc::clone(&self.shared.dev);
            let shared = Arc::clone(&self.shared);
            let record = Box::new(move |d: Option<Duration>| match d {
                Some(d) => shared.record(d),
                None => shared.record_hit(),
            });
            match UringReads::new(dev, self.shared.queue, self.max_inflight, entries, record) {
                Ok(u) => {
                    log::info!("{}: reads that miss the cache go on io_uring", self.name);
                    self.uring = Some(u);
                }
                Err(e) => warn!(
                    "{}: io_uring is not available ({e}); reads take the I/O threads",
                    self.name
                ),
            }
        }
        self
    }

    /// The io_uring read path, if the queue has one.
    pub fn uring(&self) -> Option<&UringReads<R>> {
        self.uring.as_ref()
    }

    /// The bound on requests executing at once.
    pub fn max_inflight(&self) -> usize {
        self.max_inflight
    }

    /// Test hook: makes the runner believe requests are fast (`true`: the pass runs them
    /// inline) or slow (`false`: they go to the executors).
    #[cfg(test)]
    pub fn set_speed_for_test(&self, fast: bool) {
        let ns = if fast {
            0
        } else {
            self.shared.slow_ns.saturating_mul(2)
        };
        self.shared.avg_ns.store(ns, Ordering::Relaxed);
    }

    /// Requests submitted and not yet on the used ring.
    pub fn inflight(&self) -> usize {
        self.shared.lock().inflight
    }

    /// Executor threads started so far (never more than [`Self::max_inflight`]).
    pub fn threads(&self) -> usize {
        self.shared.lock().threads
    }

    /// Blocks until every submitted request is on the used ring.
    pub fn wait_idle(&self) {
        if let Some(u) = &self.uring {
            u.wait_idle();
        }
        let mut st = self.shared.lock();
        while st.inflight > 0 {
            st = self
                .shared
                .drained
                .wait(st)
                .unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Queues `job` for an executor, starting one if more jobs wait than executors do and the
    /// bound allows. Returns the job back if no executor exists and none can be started (the
    /// caller then executes it itself).
    fn submit(&self, job: Job<R>) -> Option<Job<R>> {
        let mut st = self.shared.lock();
        if st.jobs.len() >= st.idle && st.threads < self.max_inflight {
            let shared = Arc::clone(&self.shared);
            let spawned = thread::Builder::new()
                .name(format!("{}-io{}", self.name, st.threads))
                .spawn(move || executor_loop(&shared));
            match spawned {
                Ok(h) => {
                    st.threads += 1;
                    self.handles
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(h);
                }
                Err(e) => {
                    warn!("{}: cannot start an I/O thread: {e}", self.name);
                    if st.threads == 0 {
                        return Some(job);
                    }
                }
            }
        }
        st.inflight += 1;
        st.jobs.push_back(job);
        let wake = st.idle > 0;
        drop(st);
        if wake {
            self.shared.work.notify_one();
        }
        None
    }
}

fn executor_loop<R: UsedRing>(shared: &Shared<R>) {
    let mut worker = RequestWorker::for_queue(shared.queue);
    let mut st = shared.lock();
    loop {
        let job = loop {
            if let Some(job) = st.jobs.pop_front() {
                break job;
            }
            if st.shutdown {
                return;
            }
            // `idle` counts exactly the executors blocked here, so a submitter that sees none
            // starts a thread (or leaves the job to a busy executor) instead of a lost wake-up.
            st.idle += 1;
            st = shared.work.wait(st).unwrap_or_else(|e| e.into_inner());
            st.idle -= 1;
        };
        drop(st);
        let Job {
            ring,
            mem,
            chain,
            flush,
        } = job;
        let head = chain.head_index();
        let before = ThreadUsage::now();
        let started = Instant::now();
        let len = worker.process_chain(&shared.dev, &*mem, chain);
        let wall = started.elapsed();
        if !flush {
            shared.record(executor_cost(wall, before, ThreadUsage::now()));
        }
        ring.complete(&mem, head, len);
        // Release the request's memory view before counting it done.
        drop(mem);
        st = shared.lock();
        st.inflight -= 1;
        if st.inflight == 0 {
            shared.drained.notify_all();
        }
    }
}

/// What one request executed on an executor counts for in the moving average: its wall-clock
/// time if it waited (the thread slept: disk, lock), else only the CPU time it used. On a
/// loaded machine, 32 executors of cache hits preempt each other, and their wall-clock times
/// would keep the queue on the executors (each hand-off costing more than the hit) although
/// none of them ever waited for the disk.
fn executor_cost(
    wall: Duration,
    before: Option<ThreadUsage>,
    after: Option<ThreadUsage>,
) -> Duration {
    match (before, after) {
        (Some(b), Some(a)) if !ThreadUsage::slept_between(before, after) => {
            a.cpu.saturating_sub(b.cpu).min(wall)
        }
        _ => wall,
    }
}

impl<R: UsedRing> Drop for QueueRunner<R> {
    fn drop(&mut self) {
        self.wait_idle();
        self.shared.lock().shutdown = true;
        self.shared.work.notify_all();
        let handles = std::mem::take(&mut *self.handles.lock().unwrap_or_else(|e| e.into_inner()));
        for h in handles {
            if h.join().is_err() {
                error!("{}: an I/O thread panicked", self.name);
            }
        }
    }
}

/// Completions a pass puts on the used ring before it notifies the driver mid-pass (see
/// [`submit_queue`]). One notification per pass made the driver and the queue thread take
/// turns: the driver waited for the whole pass (32 requests at QD32) before it reaped and
/// submitted more, and the queue thread then waited for its kick; told every few completions,
/// the driver refills the ring while the pass goes on, on the other core. 4 KiB reads served
/// from the folio cache at QD32, one queue on 2 cores: about 0.36M IOPS with one notification
/// per pass, 0.75-0.9M with one per 4 completions (more often gained nothing: each
/// notification is a system call). Only where a core is left for the driver: with as many
/// queue threads as cores, the woken driver thread preempts a queue thread instead (4 KiB
/// reads QD32 on 2 queues: 0.33-0.47M IOPS with one notification per pass, 0.24-0.35M with
/// one per 4); the caller's `signal` then declines.
pub const SIGNAL_EVERY: usize = 4;

/// Whether the completions of a pass still owe the driver a notification.
#[derive(Default)]
struct PassNotify {
    /// A completion the driver asked to hear about has not been signalled yet.
    pending: bool,
    /// Completions since the last signal.
    since: usize,
}

impl PassNotify {
    /// One completion put on the used ring (`needed`: the driver asked to be told of it).
    /// Signals through `signal` once [`SIGNAL_EVERY`] completions are unsignalled; a failed
    /// signal leaves the notification to the end of the pass.
    fn completed(&mut self, needed: bool, signal: &mut dyn FnMut() -> bool) {
        self.completed_many(1, needed, signal);
    }

    /// `n` completions put on the used ring at once (`needed`: the driver asked to be told of
    /// one of them); see [`Self::completed`].
    fn completed_many(&mut self, n: usize, needed: bool, signal: &mut dyn FnMut() -> bool) {
        if n == 0 {
            return;
        }
        self.pending |= needed;
        self.since += n;
        if self.pending && self.since >= SIGNAL_EVERY && signal() {
            self.pending = false;
            self.since = 0;
        }
    }
}

/// One processing pass over `queue` with `runner`: pops every available chain and runs it
/// inline while requests are fast, or submits it to the executors, which complete it to `ring`
/// (see the module documentation for the policy). Returns whether the driver must be notified
/// of completions made by this pass itself (the executors notify for theirs). A pass that
/// completes requests itself notifies the driver through `signal` (the caller holds the
/// queue) as soon as [`SIGNAL_EVERY`] of them are on the used ring and the driver asked to be
/// told, without waiting for the pass to end. With EVENT_IDX, notifications from the driver
/// are suppressed during the pass and the queue is re-checked before returning, so no kick is
/// lost. Each chain goes with the guest memory of `table` as it is once the chain was popped
/// (a pass can run across a memory table update, see [`MemoryTable`]).
pub fn submit_queue<R, T>(
    runner: &QueueRunner<R>,
    worker: &mut RequestWorker,
    ring: &R,
    queue: &mut Queue,
    table: &T,
    signal: &mut dyn FnMut() -> bool,
) -> Result<bool, ProcessQueueError>
where
    R: UsedRing,
    T: MemoryTable<Memory = GuestMemoryMmap, Handle = Arc<GuestMemoryMmap>>,
{
    let event_idx = queue.event_idx_enabled();
    let mut notify = PassNotify::default();
    let mut popped_chains: Vec<(Arc<GuestMemoryMmap>, OwnedChain)> = Vec::new();
    let mut stall = StallCheck::default();
    loop {
        let ring_mem = table.current();
        if event_idx {
            queue.disable_notification(&*ring_mem)?;
        }
        check_avail_ring(queue, &*ring_mem)?;
        popped_chains.clear();
        while let Some((mem, chain)) = pop_current(queue, &*ring_mem, table) {
            ring.popped(chain.head_index());
            popped_chains.push((mem, chain));
        }
        let popped = popped_chains.len();
        stall.popped(popped)?;
        #[cfg(test)]
        if let Some(hook) = runner
            .after_pops
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_mut()
        {
            hook(popped);
        }
        let shared = &runner.shared;
        let mut inline =
            popped > 0 && (shared.requests_are_fast() || (popped == 1 && runner.inflight() == 0));
        for (mem, mut chain) in popped_chains.drain(..) {
            // Reads go on the ring while requests wait for the disk; while they are fast (the
            // folio cache or the host page cache has them) they take the inline path, whose
            // misses fill the folio cache, so that re-reads are served from it.
            let slow = !inline || !shared.requests_are_fast();
            if let Some(u) = runner.uring.as_ref().filter(|_| slow) {
                match u.try_submit(worker, ring, &mem, chain) {
                    Ok(None) => continue,
                    Ok(Some(done)) => {
                        let (_, m, head, len) = u.finish(done);
                        let needed = ring.complete_locked(queue, &m, head, len);
                        notify.completed(needed, signal);
                        continue;
                    }
                    Err(c) => chain = c,
                }
            }
            // The request's type, read once from its header (see [`peek_request_type`]).
            let request_type = peek_request_type(&*mem, &chain);
            // A small write the disk takes in memory (the write-back cache has room for it)
            // runs here whatever the estimate says, and stays out of it. (Asked only of writes
            // the ring did not take: no other request pays for it.)
            let in_memory = request_type == Some(VIRTIO_BLK_T_OUT)
                && peek_write(&*mem, &chain, INLINE_WRITE_MAX)
                    .is_some_and(|(offset, len)| shared.dev.write_in_memory(offset, len));
            // A FLUSH waits for the disk by its nature: it goes to an executor (unless it is the
            // only request of an idle queue) and leaves the estimate alone, so the writes
            // around it stay inline (with a FLUSH every 32 writes, each one's fdatasync used to
            // stop the queue thread and send the next passes' writes to the executors).
            let flush = request_type == Some(VIRTIO_BLK_T_FLUSH);
            let alone = popped == 1 && runner.inflight() == 0;
            let job = Job {
                ring: ring.clone(),
                mem,
                chain,
                flush,
            };
            let job = if in_memory || inline && (!flush || alone) {
                Some(job)
            } else {
                runner.submit(job)
            };
            if let Some(job) = job {
                let head = job.chain.head_index();
                let started = Instant::now();
                let len = worker.process_chain(&shared.dev, &*job.mem, job.chain);
                let took = started.elapsed();
                let sample = !flush && !in_memory;
                if sample {
                    shared.record(took);
                }
                let needed = ring.complete_locked(queue, &job.mem, head, len);
                notify.completed(needed, signal);
                let (n, needed) = ring.add_left(queue, &job.mem);
                notify.completed_many(n, needed, signal);
                if sample && took.as_nanos() >= u128::from(shared.slow_ns) {
                    // It waited for the disk: the rest of the pass goes to the executors.
                    inline = false;
                }
            }
        }
        if let Some(u) = &runner.uring {
            // The pass's reads not submitted yet, then whatever has completed already.
            for done in u.end_pass() {
                let (r, m, head, len) = u.finish(done);
                let needed = r.complete_locked(queue, &m, head, len);
                notify.completed(needed, signal);
            }
        }
        let (n, needed) = ring.add_left(queue, &ring_mem);
        notify.completed_many(n, needed, signal);
        if !event_idx || !queue.enable_notification(&*ring_mem)? {
            break;
        }
        stall.announced();
    }
    Ok(notify.pending)
}

#[cfg(test)]
mod cost_tests {
    use super::*;

    fn usage(cpu_us: u64, switches: i64) -> Option<ThreadUsage> {
        Some(ThreadUsage {
            cpu: Duration::from_micros(cpu_us),
            voluntary_switches: switches,
        })
    }

    #[test]
    fn an_executor_request_that_never_slept_counts_its_cpu_time_not_its_preempted_wall_time() {
        let wall = Duration::from_micros(900);
        // Preempted for most of its 900 us, 5 us of CPU, never slept: a cache hit.
        assert_eq!(
            executor_cost(wall, usage(100, 7), usage(105, 7)),
            Duration::from_micros(5)
        );
        // It slept (waited for the disk or a lock): the whole wall-clock time.
        assert_eq!(executor_cost(wall, usage(100, 7), usage(105, 8)), wall);
        // Without usage figures: wall-clock time, as before.
        assert_eq!(executor_cost(wall, None, usage(105, 7)), wall);
    }

    #[test]
    fn thread_usage_sees_a_sleep_as_a_voluntary_switch() {
        let (Some(a), Some(b)) = (ThreadUsage::now(), {
            std::thread::sleep(Duration::from_millis(2));
            ThreadUsage::now()
        }) else {
            panic!("getrusage(RUSAGE_THREAD) failed");
        };
        assert!(b.voluntary_switches > a.voluntary_switches);
        let cost = executor_cost(Duration::from_millis(2), Some(a), Some(b));
        assert_eq!(cost, Duration::from_millis(2));
    }
}
