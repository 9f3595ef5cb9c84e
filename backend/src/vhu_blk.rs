//! vhost-user glue: the [`VhostUserBackend`] implementation of the block device (features,
//! protocol features, config space, queue events).
//!
//! One [`VhostUserBlk`] lives for one frontend connection. Each request queue gets its own worker
//! thread (`queues_per_thread` puts one queue in each), and each thread has its own
//! [`RequestWorker`] buffers, so queues are served in parallel with no lock in common: a queue
//! thread holds only its own vring lock (taken for the duration of a processing pass) and its own
//! worker mutex, which is never contended. With `--max-inflight` above 1 each queue also has a
//! [`QueueRunner`]: the pass only submits requests, the runner's executors complete them to the
//! used ring (taking the vring lock briefly), and GET_VRING_BASE (`stop_vring`), a device reset
//! and the end of the connection wait until the queue has no request in flight. While the queue
//! thread is in a pass (it holds the vring lock all the while, running fast requests itself),
//! an executor does not wait for the lock: it leaves its completion to the queue thread
//! ([`LeftCompletions`]), which adds it to the used ring during the pass and at its end, before
//! it lets go of the lock. Whoever takes the vring lock after a pass (GET_VRING_BASE, a reset)
//! therefore finds every completion left in it on the used ring.
//!
//! Guest memory: the handler thread applies a memory table update (ADD_MEM_REG, SET_MEM_TABLE)
//! while queue threads may be in a pass, and a pass holds no snapshot of the table: it reads
//! each chain over the table as it is once that chain was popped
//! ([`crate::request::MemoryTable`]), so a chain the driver published right after an update
//! (a client's payload region, registered after its queues started) is read over the table that
//! maps it.
//!
//! In-flight tracking ([`crate::reconnect`]): the backend offers INFLIGHT_SHMFD; every pop and
//! completion is recorded in the frontend's buffer under the vring lock ([`TrackedVring`]), and
//! the first pass of a queue after it started resubmits what a previous backend left in flight
//! (`vring_started` kicks the queue so that pass happens). The current buffer sits behind a
//! mutex taken only to replace it or to clone a queue's handle.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use log::{debug, error, warn};
use vhost::vhost_user::message::{
    VhostUserInflight, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{
    GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryMmap,
    GuestMemoryRegion,
};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::device::BlkDevice;
use crate::inflight::{add_used_and_check, submit_queue, QueueRunner, UsedRing};
use crate::reconnect::{
    add_used_tracked, recover_queue, InflightFile, InflightRegion, QueueInflight,
};
use crate::request::{process_queue_tracked, RequestWorker};

/// Guest memory as shared with the vhost-user handler.
pub type GuestMemory = GuestMemoryAtomic<GuestMemoryMmap>;

/// A vring with its queue's in-flight tracking (if the frontend gave a buffer) and the
/// completions its executors leave to the queue thread.
#[derive(Clone)]
pub struct TrackedVring {
    vring: VringRwLock,
    track: Option<Arc<QueueInflight>>,
    left: Arc<LeftCompletions>,
}

/// Completions the executors of one queue leave to its queue thread while that thread is in a
/// pass: it holds the vring lock for the whole pass (also while it runs fast requests itself),
/// and an executor that waited for the lock would sleep instead of taking its next request.
/// `in_pass` changes and completions are left under this mutex only, so none is stranded: a
/// completion left before the pass ends is taken by the queue thread as it ends it (vring lock
/// still held), and an executor that finds no pass publishes its completion itself.
///
/// Lock order: the vring lock before this mutex (a leaf); an executor never holds it while it
/// takes the vring lock.
#[derive(Default)]
pub struct LeftCompletions(Mutex<LeftState>);

#[derive(Default)]
struct LeftState {
    /// The queue thread is in a pass, holding the vring lock: it adds `done` before it lets go.
    in_pass: bool,
    /// `(head, len)` of every completion left and not yet on the used ring.
    done: Vec<(u16, u32)>,
}

impl LeftCompletions {
    fn state(&self) -> std::sync::MutexGuard<'_, LeftState> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Leaves `(head, len)` to the queue thread if it is in a pass; `false` if it is not (the
    /// caller publishes the completion itself).
    fn leave(&self, head: u16, len: u32) -> bool {
        let mut st = self.state();
        if st.in_pass {
            st.done.push((head, len));
        }
        st.in_pass
    }

    /// The queue thread starts a pass (vring lock held).
    pub(crate) fn begin_pass(&self) {
        self.state().in_pass = true;
    }

    /// Adds every completion left so far to `queue` (which the caller holds locked: the queue
    /// thread in its pass) and, with `end_pass`, ends the pass: executors publish their own
    /// completions from then on. Returns how many were added and whether the driver must be
    /// notified of one of them. The list is drained in place (its memory kept for the next
    /// ones), under this mutex: an executor leaving one meanwhile waits for a few used-ring
    /// entries, never for I/O.
    pub(crate) fn add_to(
        &self,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
        track: Option<&QueueInflight>,
        end_pass: bool,
    ) -> (usize, bool) {
        let mut st = self.state();
        if end_pass {
            st.in_pass = false;
        }
        let n = st.done.len();
        let needed = st.done.drain(..).fold(false, |needed, (head, len)| {
            complete_tracked(queue, mem, head, len, track) | needed
        });
        (n, needed)
    }
}

/// Adds the used element for `head` (recorded in `track`) and reports whether the driver must
/// be notified.
fn complete_tracked(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    head: u16,
    len: u32,
    track: Option<&QueueInflight>,
) -> bool {
    match track {
        None => add_used_and_check(queue, mem, head, len),
        Some(t) => match add_used_tracked(queue, mem, head, len, Some(t)) {
            Ok(()) => queue.needs_notification(mem).unwrap_or_else(|e| {
                error!("cannot read the driver's event index: {e}");
                true
            }),
            Err(e) => {
                error!("cannot return descriptor {head} to the used ring: {e}");
                false
            }
        },
    }
}

impl TrackedVring {
    /// `vring` with its in-flight tracking `track` and the completions `left` to its queue
    /// thread.
    pub(crate) fn new(
        vring: VringRwLock,
        track: Option<Arc<QueueInflight>>,
        left: Arc<LeftCompletions>,
    ) -> Self {
        TrackedVring { vring, track, left }
    }

    /// Runs `add` (which adds used elements and reports whether the driver must be notified)
    /// under the vring lock, then notifies the driver if it must be.
    fn publish(&self, add: impl FnOnce(&mut Queue, Option<&QueueInflight>) -> bool) {
        let notify = {
            let mut state = self.vring.get_mut();
            add(state.get_queue_mut(), self.track.as_deref())
        };
        if notify {
            if let Err(e) = self.vring.signal_used_queue() {
                warn!("cannot signal the driver: {e}");
            }
        }
    }
}

/// Executors complete requests straight to the vring: the used element, then the driver's
/// notification if it asked for one.
impl UsedRing for TrackedVring {
    fn complete(&self, mem: &GuestMemoryMmap, head: u16, len: u32) {
        if self.left.leave(head, len) {
            return;
        }
        self.publish(|queue, track| complete_tracked(queue, mem, head, len, track));
    }

    fn add_left(&self, queue: &mut Queue, mem: &GuestMemoryMmap) -> (usize, bool) {
        self.left.add_to(queue, mem, self.track.as_deref(), false)
    }

    fn complete_many(&self, done: &[(Arc<GuestMemoryMmap>, u16, u32)]) {
        self.publish(|queue, track| {
            done.iter().fold(false, |notify, (mem, head, len)| {
                complete_tracked(queue, mem, *head, *len, track) | notify
            })
        });
    }

    fn popped(&self, head: u16) {
        if let Some(t) = &self.track {
            t.popped(head);
        }
    }

    fn complete_locked(
        &self,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
        head: u16,
        len: u32,
    ) -> bool {
        complete_tracked(queue, mem, head, len, self.track.as_deref())
    }
}

/// The vhost-user-blk backend of one connection.
pub struct VhostUserBlk {
    dev: Arc<BlkDevice>,
    mem: GuestMemory,
    /// Request buffers of each queue thread (used for requests the thread runs itself).
    workers: Vec<Mutex<RequestWorker>>,
    /// Each queue's executors (none with `--max-inflight 1`: the queue thread runs everything).
    runners: Vec<Option<QueueRunner<TrackedVring>>>,
    event_idx: AtomicBool,
    /// Where GET_INFLIGHT_FD buffers come from (`None`: in-flight tracking is not offered).
    inflight_file: Option<Arc<InflightFile>>,
    /// The buffer of the last SET_INFLIGHT_FD.
    inflight: Mutex<Option<Arc<InflightRegion>>>,
    /// Each queue's part of it, set when the queue starts.
    tracks: Vec<Mutex<Option<Arc<QueueInflight>>>>,
    /// Queues whose next pass must first resubmit what was left in flight.
    recover: Vec<AtomicBool>,
    /// Each queue's completions its executors leave to its queue thread during a pass.
    left: Vec<Arc<LeftCompletions>>,
    /// Test hook: run by a pass with executors after its last round of pops, before it adds
    /// what they left and lets go of the vring lock.
    #[cfg(test)]
    before_pass_end: Mutex<Option<Box<dyn FnMut() + Send>>>,
    /// Passes notify the driver mid-way ([`crate::inflight::SIGNAL_EVERY`]): only with fewer
    /// queue threads than CPUs, so that a core is left for the driver to run on meanwhile.
    mid_pass_signals: bool,
}

impl std::fmt::Debug for VhostUserBlk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhostUserBlk")
            .field("dev", &self.dev)
            .finish()
    }
}

impl VhostUserBlk {
    /// A backend for `dev` whose queues read guest memory through `mem` (the same atomic the
    /// daemon is created with).
    pub fn new(dev: Arc<BlkDevice>, mem: GuestMemory) -> io::Result<Self> {
        Self::with_inflight(dev, mem, None)
    }

    /// [`Self::new`] offering in-flight tracking (INFLIGHT_SHMFD) with buffers from `file`.
    pub fn with_inflight(
        dev: Arc<BlkDevice>,
        mem: GuestMemory,
        inflight_file: Option<Arc<InflightFile>>,
    ) -> io::Result<Self> {
        let max_inflight = dev.config().max_inflight;
        let queues = dev.config().num_queues;
        let workers = (0..queues)
            .map(|q| Mutex::new(RequestWorker::for_queue(usize::from(q))))
            .collect();
        let runners = (0..queues)
            .map(|q| {
                (max_inflight > 1).then(|| {
                    QueueRunner::new(Arc::clone(&dev), max_inflight, &format!("snapblk-q{q}"))
                        .for_queue(usize::from(q))
                        .with_uring(dev.config().io_uring)
                })
            })
            .collect();
        Ok(VhostUserBlk {
            dev,
            mem,
            workers,
            runners,
            event_idx: AtomicBool::new(false),
            inflight_file,
            inflight: Mutex::new(None),
            tracks: (0..queues).map(|_| Mutex::new(None)).collect(),
            recover: (0..queues).map(|_| AtomicBool::new(false)).collect(),
            left: (0..queues).map(|_| Arc::default()).collect(),
            #[cfg(test)]
            before_pass_end: Mutex::new(None),
            mid_pass_signals: std::thread::available_parallelism()
                .is_ok_and(|cpus| usize::from(queues) < cpus.get()),
        })
    }

    /// Test hook: `hook` runs in every pass with executors after its last round of pops, with
    /// the vring lock held, before the completions left to the pass are added.
    #[cfg(test)]
    pub(crate) fn set_before_pass_end(&self, hook: Box<dyn FnMut() + Send>) {
        *self
            .before_pass_end
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(hook);
    }

    /// Completions left to queue `q`'s thread and not yet on its used ring (tests).
    #[cfg(test)]
    pub(crate) fn left_count(&self, q: usize) -> usize {
        self.left.get(q).map_or(0, |l| l.state().done.len())
    }

    /// Blocks until no queue has a request in flight: every request picked up so far is on its
    /// used ring.
    pub fn wait_idle(&self) {
        for r in self.runners.iter().flatten() {
            r.wait_idle();
        }
    }

    /// The device event (epoll data) of a queue thread's io_uring completions: the first
    /// value after the queues and the exit event.
    pub fn uring_event(&self) -> u16 {
        self.dev.config().num_queues + 1
    }

    /// The eventfd of queue `queue`'s io_uring completions, if it has a ring: the queue's
    /// worker thread must watch it (as [`Self::uring_event`]).
    pub fn uring_event_fd(&self, queue: usize) -> Option<i32> {
        self.runners
            .get(queue)?
            .as_ref()?
            .uring()
            .map(|u| u.event_fd())
    }

    /// The device model.
    pub fn device(&self) -> &Arc<BlkDevice> {
        &self.dev
    }

    /// Executes again, on the queue thread and oldest first, every request a previous backend
    /// left in flight on `queue`, and completes each to the used ring. Returns whether any was
    /// completed (the driver is then signalled).
    fn resubmit(
        &self,
        worker: &mut RequestWorker,
        queue: &mut Queue,
        track: &QueueInflight,
        index: usize,
    ) -> bool {
        let mem = self.mem.memory().into_inner();
        let heads = match recover_queue(queue, &*mem, track, index) {
            Ok(h) => h,
            Err(e) => {
                error!("queue {index}: cannot read the used index to recover: {e}");
                return false;
            }
        };
        let mut any = false;
        for head in heads {
            let chain = DescriptorChain::new(
                Arc::clone(&mem),
                GuestAddress(queue.desc_table()),
                queue.size(),
                head,
            );
            let len = worker.process_chain(&self.dev, &*mem, chain);
            any |= complete_tracked(queue, &mem, head, len, Some(track));
        }
        any
    }

    /// Runs processing passes on `vring` with the worker of `thread_id`.
    fn process_vring(&self, vring: &VringRwLock, thread_id: usize) -> io::Result<()> {
        let Some(worker) = self.workers.get(thread_id) else {
            return Err(io::Error::other(format!(
                "no worker for thread {thread_id}"
            )));
        };
        let mut worker = worker.lock().unwrap_or_else(|e| e.into_inner());
        let track = self
            .tracks
            .get(thread_id)
            .and_then(|t| t.lock().unwrap_or_else(|e| e.into_inner()).clone());
        let mut state = vring.get_mut();
        let call = CallFd::of(state.get_call());
        let queue = state.get_queue_mut();
        // First pass since the ring started: resubmit what a previous backend left in flight,
        // and signal the driver in any case: a backend that died (or stopped) after putting
        // requests on the used ring may never have delivered their interrupt, and the driver,
        // waiting for them, would never kick again. A spurious interrupt costs the driver one
        // look at the used ring.
        let mut resubmitted = false;
        if self.recover[thread_id].swap(false, Ordering::AcqRel) {
            if let Some(t) = &track {
                self.resubmit(&mut worker, queue, t, thread_id);
            }
            resubmitted = true;
        }
        // The pass gets the memory table itself, not a snapshot of it: it may run across a
        // memory table update, and reads each chain over the table as it is once popped.
        let result = match self.runners.get(thread_id).and_then(Option::as_ref) {
            Some(runner) => {
                let left = self.left.get(thread_id).cloned().unwrap_or_default();
                let ring = TrackedVring::new(vring.clone(), track.clone(), Arc::clone(&left));
                let mid_pass = self.mid_pass_signals;
                left.begin_pass();
                let result =
                    submit_queue(runner, &mut worker, &ring, queue, &self.mem, &mut || {
                        mid_pass && call.notify()
                    });
                #[cfg(test)]
                if let Some(hook) = self
                    .before_pass_end
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .as_mut()
                {
                    hook();
                }
                // What the executors left during the pass goes on the used ring before the
                // vring lock is let go; from now on they publish their own.
                let (_, needed) = left.add_to(queue, &self.mem.memory(), track.as_deref(), true);
                result.map(|owed| owed || needed)
            }
            None => {
                process_queue_tracked(&self.dev, &mut worker, queue, &self.mem, track.as_deref())
            }
        };
        let needs_signal = resubmitted
            | match result {
                Ok(n) => n,
                Err(e) => {
                    // A broken ring is the driver's fault: log it and keep the thread alive.
                    error!("queue {thread_id}: {e}");
                    true
                }
            };
        if needs_signal {
            if let Err(e) = state.signal_used_queue() {
                warn!("queue {thread_id}: cannot signal the driver: {e}");
            }
        }
        Ok(())
    }
}

/// The driver's call eventfd of a vring, for signalling it while the queue itself is borrowed
/// (a pass notifies mid-way, [`crate::inflight::SIGNAL_EVERY`]). Taken from the vring state
/// whose lock the pass holds: SET_VRING_CALL replaces (and closes) the eventfd only under that
/// lock, so the descriptor stays open for as long as the pass runs.
struct CallFd(Option<RawFd>);

impl CallFd {
    fn of(call: &Option<EventNotifier>) -> Self {
        CallFd(call.as_ref().map(AsRawFd::as_raw_fd))
    }

    /// Signals the driver; false if that failed (or there is no eventfd).
    fn notify(&self) -> bool {
        let Some(fd) = self.0 else {
            return false;
        };
        let one = 1u64.to_ne_bytes();
        // SAFETY: an eventfd that stays open while the caller holds the vring lock (see above);
        // the buffer is 8 readable bytes.
        let n = unsafe { libc::write(fd, one.as_ptr().cast(), one.len()) };
        n == 8
    }
}

/// Checks that every file-backed region of `mem` lies inside its (regular) file.
fn check_regions_fit_their_files(mem: &GuestMemoryMmap) -> io::Result<()> {
    for region in mem.iter() {
        let Some(fo) = region.file_offset() else {
            continue;
        };
        let meta = fo.file().metadata()?;
        if !meta.file_type().is_file() {
            continue;
        }
        let end = fo.start().checked_add(region.len());
        if end.is_none_or(|end| end > meta.len()) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "memory region at guest address {:#x} ({} bytes from file offset {}) reaches past the end of its {}-byte file",
                    region.start_addr().0,
                    region.len(),
                    fo.start(),
                    meta.len()
                ),
            ));
        }
    }
    Ok(())
}

impl VhostUserBackend for VhostUserBlk {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        self.dev.config().num_queues.into()
    }

    fn max_queue_size(&self) -> usize {
        self.dev.config().queue_size.into()
    }

    fn features(&self) -> u64 {
        self.dev.config().features() | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn acked_features(&self, features: u64) {
        debug!("driver acknowledged features {features:#x}");
        self.dev.set_acked_features(features);
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | if self.inflight_file.is_some() {
                VhostUserProtocolFeatures::INFLIGHT_SHMFD
            } else {
                VhostUserProtocolFeatures::empty()
            }
    }

    fn get_inflight_fd(&self, msg: &VhostUserInflight) -> io::Result<(VhostUserInflight, File)> {
        let Some(file) = &self.inflight_file else {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "in-flight tracking is not offered",
            ));
        };
        // Drop our mapping of the previous buffer before its file is zeroed for the new one.
        *self.inflight.lock().unwrap_or_else(|e| e.into_inner()) = None;
        let out = file.fresh(msg)?;
        debug!(
            "GET_INFLIGHT_FD: {} queues of {}, {} bytes",
            msg.num_queues, msg.queue_size, out.0.mmap_size
        );
        Ok(out)
    }

    fn set_inflight_fd(&self, msg: &VhostUserInflight, file: File) -> io::Result<()> {
        let region = InflightRegion::map(msg, &file).inspect_err(|e| {
            error!("refusing the frontend's inflight buffer: {e}");
            // The frontend no longer keeps the previous buffer: never track into it.
            *self.inflight.lock().unwrap_or_else(|e| e.into_inner()) = None;
        })?;
        debug!(
            "SET_INFLIGHT_FD: {} queues of {}, {} bytes",
            msg.num_queues, msg.queue_size, msg.mmap_size
        );
        *self.inflight.lock().unwrap_or_else(|e| e.into_inner()) = Some(region);
        Ok(())
    }

    fn vring_started(&self, queue_index: u32, vring: &VringRwLock) -> io::Result<()> {
        let index = queue_index as usize;
        let (Some(track), Some(recover)) = (self.tracks.get(index), self.recover.get(index)) else {
            return Ok(());
        };
        let region = self
            .inflight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let state = vring.get_ref();
        let size = state.get_queue().size();
        let part = match region {
            None => None,
            Some(r) => {
                let part = r.queue(index, size).map(Arc::new);
                if part.is_none() {
                    // Serving untracked would lose this queue's requests at the next restart
                    // without a word.
                    error!(
                        "queue {index}: the frontend's inflight buffer has no part for a ring of {size}; its requests are not tracked across a restart"
                    );
                }
                part
            }
        };
        *track.lock().unwrap_or_else(|e| e.into_inner()) = part;
        recover.store(true, Ordering::Release);
        // Run a pass as soon as the ring is watched, even if the guest (waiting for the requests
        // it has in flight) never kicks again.
        if let Some(kick) = state.get_kick() {
            crate::reconnect::kick(kick);
        }
        Ok(())
    }

    fn reset_device(&self) {
        debug!("device reset");
        self.wait_idle();
        self.dev.reset();
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        // The frontend reads the used ring once this returns: no executor may write it later.
        if let Some(Some(runner)) = self.runners.get(queue_index as usize) {
            runner.wait_idle();
        }
        Ok(())
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Release);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        debug!("GET_CONFIG offset {offset} size {size}");
        self.dev.read_config(offset, size)
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        debug!("SET_CONFIG offset {offset} data {buf:?}");
        self.dev.write_config(offset, buf);
        Ok(())
    }

    fn update_memory(&self, mem: GuestMemory) -> io::Result<()> {
        // `self.mem` is the atomic the handler just updated. vm-memory maps each region as the
        // frontend describes it without comparing it with its file: a region that reaches past
        // the end of its file would SIGBUS the queue thread on first access. Refuse such a table
        // and leave no guest memory mapped, so every ring access fails cleanly instead.
        if let Err(e) = check_regions_fit_their_files(&mem.memory()) {
            match self.mem.lock() {
                Ok(guard) => guard.replace(GuestMemoryMmap::new()),
                Err(_) => error!("cannot drop the refused memory table: its lock is poisoned"),
            }
            error!("refusing the frontend's memory table: {e}");
            return Err(e);
        }
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.num_queues()).map(|q| 1u64 << q).collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        match new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC) {
            Ok(pair) => Some(pair),
            Err(e) => {
                error!("cannot create a worker exit event: {e}");
                None
            }
        }
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        thread_id: usize,
    ) -> io::Result<()> {
        crate::sandbox::test_trigger_forbidden_syscall();
        if !evset.contains(EventSet::IN) {
            warn!("queue thread {thread_id}: unexpected events {evset:?}");
            return Ok(());
        }
        if device_event == self.uring_event() {
            // Reads of this thread's queue completed on its io_uring.
            if let Some(Some(r)) = self.runners.get(thread_id) {
                if let Some(u) = r.uring() {
                    u.complete_ready();
                }
            }
            return Ok(());
        }
        let Some(vring) = vrings.get(usize::from(device_event)) else {
            return Err(io::Error::other(format!(
                "unknown device event {device_event}"
            )));
        };
        self.process_vring(vring, thread_id)
    }
}

#[cfg(test)]
#[path = "reconnect_race_tests.rs"]
mod reconnect_race_tests;

#[cfg(test)]
#[path = "memory_table_tests.rs"]
mod memory_table_tests;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::DeviceConfig;
    use crate::disk::ServedDisk;
    use crate::virtio_blk::*;
    use blockdev::MemDisk;

    fn backend(num_queues: u16, read_only: bool) -> VhostUserBlk {
        let mut cfg = DeviceConfig::new(1 << 20, 512, num_queues, 128).unwrap();
        cfg.read_only = read_only;
        let dev = BlkDevice::new(
            ServedDisk::plain(Arc::new(MemDisk::new(1 << 20))),
            Arc::new(cfg),
        );
        VhostUserBlk::new(
            Arc::new(dev),
            GuestMemoryAtomic::new(GuestMemoryMmap::new()),
        )
        .unwrap()
    }

    #[test]
    fn each_queue_gets_its_own_worker_thread() {
        let b = backend(4, false);
        assert_eq!(b.num_queues(), 4);
        assert_eq!(b.max_queue_size(), 128);
        assert_eq!(b.queues_per_thread(), vec![1, 2, 4, 8]);
        assert!(b.exit_event(0).is_some());
    }

    #[test]
    fn offers_the_features_and_protocol_features_clients_need() {
        let b = backend(2, false);
        let f = b.features();
        for bit in [
            VIRTIO_F_VERSION_1,
            VIRTIO_RING_F_EVENT_IDX,
            VIRTIO_RING_F_INDIRECT_DESC,
            VIRTIO_BLK_F_SIZE_MAX,
            VIRTIO_BLK_F_SEG_MAX,
            VIRTIO_BLK_F_BLK_SIZE,
            VIRTIO_BLK_F_TOPOLOGY,
            VIRTIO_BLK_F_MQ,
            VIRTIO_BLK_F_FLUSH,
            VIRTIO_BLK_F_CONFIG_WCE,
            VIRTIO_BLK_F_DISCARD,
            VIRTIO_BLK_F_WRITE_ZEROES,
        ] {
            assert_ne!(f & feature(bit), 0, "feature bit {bit} missing");
        }
        assert_eq!(f & feature(VIRTIO_BLK_F_RO), 0);
        assert_ne!(f & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(), 0);
        let p = b.protocol_features();
        assert!(p.contains(VhostUserProtocolFeatures::CONFIG));
        assert!(p.contains(VhostUserProtocolFeatures::MQ));
        assert!(p.contains(VhostUserProtocolFeatures::REPLY_ACK));
        assert!(p.contains(VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS));
        assert_ne!(backend(1, true).features() & feature(VIRTIO_BLK_F_RO), 0);
    }

    #[test]
    fn config_write_of_wce_reaches_the_device() {
        let b = backend(1, false);
        b.set_config(BlkConfigSpace::WRITEBACK_OFFSET as u32, &[0])
            .unwrap();
        assert!(!b.device().writeback());
        assert_eq!(
            b.get_config(BlkConfigSpace::WRITEBACK_OFFSET as u32, 1),
            vec![0]
        );
        b.reset_device();
        assert!(b.device().writeback());
    }
}
