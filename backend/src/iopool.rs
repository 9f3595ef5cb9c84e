//! Per-queue helper threads that execute the requests of one processing pass in parallel.
//!
//! A virtqueue is drained by a single thread (the vhost-user worker of that queue). When the
//! disk's operations block (page-cache writeback throttling, `fdatasync`, a cache miss), running
//! the requests of a batch one after another leaves the queue idle. An [`IoPool`] lets the queue
//! thread hand the batch to `n` helper threads and execute requests itself as well, then wait for
//! the whole batch before it fills the used ring. virtio-blk gives no ordering between requests
//! that are in flight together, and a FLUSH only covers writes that completed before it was
//! submitted, so running a batch in parallel keeps the device's semantics.
//!
//! Locking model: one mutex per pool guards the job queue and the results; helpers hold it only
//! to take a job or to hand back a result, never while a request executes. Each helper owns its
//! own [`RequestWorker`] buffers. The pool belongs to one queue, so batches never interleave.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};

use log::error;
use virtio_queue::DescriptorChain;
use vm_memory::GuestMemoryMmap;

use crate::device::BlkDevice;
use crate::request::RequestWorker;

/// A descriptor chain that owns its view of guest memory, so it can move to another thread,
/// with that memory.
pub type OwnedChain = (Arc<GuestMemoryMmap>, DescriptorChain<Arc<GuestMemoryMmap>>);

#[derive(Default)]
struct State {
    jobs: VecDeque<OwnedChain>,
    running: usize,
    results: Vec<(u16, u32)>,
    shutdown: bool,
}

struct Shared {
    dev: Arc<BlkDevice>,
    state: Mutex<State>,
    work: Condvar,
    done: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn execute(&self, worker: &mut RequestWorker, (mem, chain): OwnedChain) -> (u16, u32) {
        let head = chain.head_index();
        (head, worker.process_chain(&self.dev, &*mem, chain))
    }
}

/// Helper threads of one queue.
pub struct IoPool {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for IoPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoPool")
            .field("threads", &self.threads.len())
            .finish()
    }
}

impl IoPool {
    /// Starts `threads` helper threads for requests of queue `queue` on `dev`.
    pub fn new(
        dev: Arc<BlkDevice>,
        queue: usize,
        threads: usize,
        name: &str,
    ) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            dev,
            state: Mutex::new(State::default()),
            work: Condvar::new(),
            done: Condvar::new(),
        });
        let mut handles = Vec::with_capacity(threads);
        for i in 0..threads {
            let shared = Arc::clone(&shared);
            let handle = thread::Builder::new()
                .name(format!("{name}-io{i}"))
                .spawn(move || helper_loop(&shared, queue))?;
            handles.push(handle);
        }
        Ok(IoPool {
            shared,
            threads: handles,
        })
    }

    /// Executes every chain of `batch` (the calling thread helps with `worker`) and appends
    /// `(head, used length)` of each to `out`, in completion order.
    pub fn run_batch(
        &self,
        batch: &mut Vec<OwnedChain>,
        worker: &mut RequestWorker,
        out: &mut Vec<(u16, u32)>,
    ) {
        {
            let mut st = self.shared.lock();
            st.jobs.extend(batch.drain(..));
        }
        self.shared.work.notify_all();
        loop {
            let chain = {
                let mut st = self.shared.lock();
                match st.jobs.pop_front() {
                    Some(c) => {
                        st.running += 1;
                        c
                    }
                    None => break,
                }
            };
            let result = self.shared.execute(worker, chain);
            let mut st = self.shared.lock();
            st.running -= 1;
            st.results.push(result);
        }
        let mut st = self.shared.lock();
        while st.running > 0 || !st.jobs.is_empty() {
            st = self.shared.done.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        out.append(&mut st.results);
    }
}

fn helper_loop(shared: &Shared, queue: usize) {
    let mut worker = RequestWorker::for_queue(queue);
    loop {
        let chain = {
            let mut st = shared.lock();
            loop {
                if let Some(c) = st.jobs.pop_front() {
                    st.running += 1;
                    break c;
                }
                if st.shutdown {
                    return;
                }
                st = shared.work.wait(st).unwrap_or_else(|e| e.into_inner());
            }
        };
        let result = shared.execute(&mut worker, chain);
        let mut st = shared.lock();
        st.running -= 1;
        st.results.push(result);
        if st.running == 0 && st.jobs.is_empty() {
            shared.done.notify_all();
        }
    }
}

impl Drop for IoPool {
    fn drop(&mut self) {
        self.shared.lock().shutdown = true;
        self.shared.work.notify_all();
        for t in self.threads.drain(..) {
            if t.join().is_err() {
                error!("an I/O helper thread panicked");
            }
        }
    }
}

/// [`crate::request::process_queue`] with the requests of each pass executed in parallel on
/// `pool`. A pass that finds a single request executes it inline.
pub fn process_queue_pooled(
    dev: &BlkDevice,
    worker: &mut RequestWorker,
    pool: &IoPool,
    batch: &mut Vec<OwnedChain>,
    results: &mut Vec<(u16, u32)>,
    queue: &mut virtio_queue::Queue,
    mem: &Arc<GuestMemoryMmap>,
) -> Result<bool, crate::request::ProcessQueueError> {
    use virtio_queue::QueueT;
    let event_idx = queue.event_idx_enabled();
    let mut completed = false;
    loop {
        if event_idx {
            queue.disable_notification(&**mem)?;
        }
        batch.clear();
        crate::request::check_avail_ring(queue, &**mem)?;
        while let Some(chain) = queue.pop_descriptor_chain(Arc::clone(mem)) {
            batch.push((Arc::clone(mem), chain));
        }
        let popped = batch.len();
        if batch.len() == 1 {
            if let Some((m, chain)) = batch.pop() {
                let head = chain.head_index();
                results.push((head, worker.process_chain(dev, &*m, chain)));
            }
        } else if !batch.is_empty() {
            pool.run_batch(batch, worker, results);
        }
        for (head, len) in results.drain(..) {
            match queue.add_used(&**mem, head, len) {
                Ok(()) => completed = true,
                Err(e) => error!("cannot return descriptor {head} to the used ring: {e}"),
            }
        }
        if !event_idx || !queue.enable_notification(&**mem)? {
            break;
        }
        if popped == 0 {
            return Err(crate::request::ProcessQueueError::Stalled);
        }
    }
    if !completed {
        return Ok(false);
    }
    Ok(queue.needs_notification(&**mem)?)
}
