//! Unit tests of the queue runner ([`crate::inflight`]): requests complete to the used ring as
//! they finish, the bound of requests in flight holds, fast requests run on the queue thread
//! and slow ones on the executors, a pass notifies the driver as it goes, and stopping a vring
//! waits for what is in flight. Over the same mock split virtqueue as the parsing tests.

use super::*;

/// The used ring of a test queue shared by the "queue thread" and the executors, like a vring.
#[derive(Clone)]
struct TestRing {
    queue: Arc<std::sync::Mutex<Queue>>,
    notifications: Arc<AtomicUsize>,
}

impl TestRing {
    fn new(q: Queue) -> Self {
        TestRing {
            queue: Arc::new(std::sync::Mutex::new(q)),
            notifications: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// One processing pass as the queue thread runs it, under a watchdog: a request these
    /// tests hold at a gate that runs on the queue thread instead of an executor would block
    /// the pass forever, so a pass that has not returned within [`PASS_WATCHDOG`] aborts the
    /// test process (a failure, not a hang).
    fn pass(
        &self,
        runner: &crate::inflight::QueueRunner<TestRing>,
        worker: &mut RequestWorker,
        mem: &Arc<GuestMemoryMmap>,
    ) {
        let _watchdog = PassWatchdog::arm();
        let mut q = self.queue.lock().unwrap();
        let notifications = Arc::clone(&self.notifications);
        let mut signal = || {
            notifications.fetch_add(1, Ordering::SeqCst);
            true
        };
        if crate::inflight::submit_queue(runner, worker, self, &mut q, mem, &mut signal).unwrap() {
            self.notifications.fetch_add(1, Ordering::SeqCst);
        }
    }
}

/// How long a test's queue pass may take: its requests are in memory, so a pass takes
/// milliseconds unless one of them waits at a gate the test opens only after the pass.
const PASS_WATCHDOG: std::time::Duration = std::time::Duration::from_secs(20);

/// Aborts the process unless dropped within [`PASS_WATCHDOG`] of being armed (dropping it
/// drops the sender, which wakes the watchdog thread early).
struct PassWatchdog {
    _disarm: std::sync::mpsc::Sender<()>,
}

impl PassWatchdog {
    fn arm() -> Self {
        let (disarm, armed) = std::sync::mpsc::channel::<()>();
        std::thread::spawn(move || {
            if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                armed.recv_timeout(PASS_WATCHDOG)
            {
                eprintln!(
                    "a queue pass did not return within {PASS_WATCHDOG:?}: a request held at a \
                     gate ran on the queue thread instead of an executor"
                );
                std::process::abort();
            }
        });
        PassWatchdog { _disarm: disarm }
    }
}

impl crate::inflight::UsedRing for TestRing {
    fn complete(&self, mem: &GuestMemoryMmap, head: u16, len: u32) {
        let mut q = self.queue.lock().unwrap();
        if crate::inflight::add_used_and_check(&mut q, mem, head, len) {
            self.notifications.fetch_add(1, Ordering::SeqCst);
        }
    }
}

/// A disk over a `MemDisk` whose reads and writes can be held at a gate, and that records how
/// many operations ran at once.
struct GateDisk {
    inner: CountingDisk,
    /// Operations at this byte offset wait while the gate is closed (u64::MAX: every offset).
    gated_offset: u64,
    open: std::sync::Mutex<bool>,
    opened: std::sync::Condvar,
    running: AtomicUsize,
    max_running: AtomicUsize,
    /// Operations at this byte offset take this long (a request that waits for the disk).
    delay: Option<(u64, std::time::Duration)>,
    /// Threads that executed an operation.
    threads: std::sync::Mutex<Vec<std::thread::ThreadId>>,
    /// Operations at this byte offset fail with EIO.
    fail_at: Option<u64>,
    /// Each flush takes this long, and the threads that ran one.
    flush_delay: Option<std::time::Duration>,
    flush_threads: std::sync::Mutex<Vec<std::thread::ThreadId>>,
    /// Writes at these byte offsets complete in memory (`writes_in_memory` says yes).
    in_memory: Vec<u64>,
    /// Every `writes_in_memory` question (offset, length), in order.
    asked: std::sync::Mutex<Vec<(u64, u64)>>,
    /// The offset of every operation and the thread that ran it.
    by_offset: std::sync::Mutex<Vec<(u64, std::thread::ThreadId)>>,
}

impl GateDisk {
    fn new(gated_offset: u64) -> Self {
        GateDisk {
            inner: CountingDisk {
                inner: MemDisk::new(DISK_SIZE),
                flushes: AtomicUsize::new(0),
                gathers: false,
                gathered: AtomicUsize::new(0),
            },
            gated_offset,
            open: std::sync::Mutex::new(false),
            opened: std::sync::Condvar::new(),
            running: AtomicUsize::new(0),
            max_running: AtomicUsize::new(0),
            delay: None,
            threads: std::sync::Mutex::new(Vec::new()),
            fail_at: None,
            flush_delay: None,
            flush_threads: std::sync::Mutex::new(Vec::new()),
            in_memory: Vec::new(),
            asked: std::sync::Mutex::new(Vec::new()),
            by_offset: std::sync::Mutex::new(Vec::new()),
        }
    }

    fn enter(&self, offset: u64) {
        let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_running.fetch_max(now, Ordering::SeqCst);
        self.threads
            .lock()
            .unwrap()
            .push(std::thread::current().id());
        self.by_offset
            .lock()
            .unwrap()
            .push((offset, std::thread::current().id()));
        if let Some((at, d)) = self.delay {
            if at == offset {
                std::thread::sleep(d);
            }
        }
        if self.gated_offset == u64::MAX || self.gated_offset == offset {
            let mut open = self.open.lock().unwrap();
            while !*open {
                open = self.opened.wait(open).unwrap();
            }
        }
    }

    fn leave(&self) {
        self.running.fetch_sub(1, Ordering::SeqCst);
    }

    fn open_gate(&self) {
        *self.open.lock().unwrap() = true;
        self.opened.notify_all();
    }
}

impl BlockDev for GateDisk {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> blockdev::Result<()> {
        self.enter(offset);
        let r = if self.fail_at == Some(offset) {
            Err(std::io::Error::from_raw_os_error(libc::EIO).into())
        } else {
            self.inner.read_at(buf, offset)
        };
        self.leave();
        r
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> blockdev::Result<()> {
        self.enter(offset);
        let r = if self.fail_at == Some(offset) {
            Err(std::io::Error::from_raw_os_error(libc::EIO).into())
        } else {
            self.inner.write_at(buf, offset)
        };
        self.leave();
        r
    }
    fn flush(&self) -> blockdev::Result<()> {
        self.flush_threads
            .lock()
            .unwrap()
            .push(std::thread::current().id());
        if let Some(d) = self.flush_delay {
            std::thread::sleep(d);
        }
        self.inner.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> blockdev::Result<()> {
        self.inner.discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> blockdev::Result<()> {
        self.inner.write_zeroes(offset, len, unmap)
    }
    fn writes_in_memory(&self, offset: u64, len: u64) -> bool {
        self.asked.lock().unwrap().push((offset, len));
        self.in_memory.contains(&offset)
    }
}

fn gated_device(disk: Arc<GateDisk>) -> Arc<BlkDevice> {
    let dev = BlkDevice::new(
        ServedDisk::plain(disk),
        Arc::new(DeviceConfig::new(DISK_SIZE as u64, 512, 1, QSIZE).unwrap()),
    );
    dev.set_acked_features(dev.config().features());
    Arc::new(dev)
}

/// `n` chains: chain i reads (or writes) 4 KiB at byte 4096 * i, status at STATUS + i.
fn io_chains(mem: &GuestMemoryMmap, n: u64, request_type: u32) -> Vec<Vec<(u64, u32, u16)>> {
    (0..n)
        .map(|i| {
            let hdr = RequestHeader {
                request_type,
                reserved: 0,
                sector: 8 * i,
            };
            mem.write_slice(&hdr.to_bytes(), GuestAddress(HDR + 64 * i))
                .unwrap();
            let data_flags = if request_type == VIRTIO_BLK_T_IN {
                F_WRITE
            } else {
                mem.write_slice(&[i as u8 + 1; 4096], GuestAddress(DATA + 4096 * i))
                    .unwrap();
                0
            };
            vec![
                (HDR + 64 * i, 16, 0),
                (DATA + 4096 * i, 4096, data_flags),
                (STATUS + i, 1, F_WRITE),
            ]
        })
        .collect()
}

fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !cond() {
        assert!(std::time::Instant::now() < deadline, "timed out: {what}");
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

/// Guest memory, a runner of `max_inflight` over `disk`, and a ring offering `n` 4 KiB requests
/// of `request_type` (see `io_chains`), after one processing pass of the queue thread.
fn runner_after_one_pass(
    disk: &Arc<GateDisk>,
    max_inflight: usize,
    n: u64,
    request_type: u32,
) -> (
    Arc<GuestMemoryMmap>,
    crate::inflight::QueueRunner<TestRing>,
    TestRing,
) {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    let runner =
        crate::inflight::QueueRunner::new(gated_device(disk.clone()), max_inflight, "test");
    let ring = TestRing::new(queue_with_chains(
        &mem,
        &io_chains(&mem, n, request_type),
        0,
    ));
    let mem = Arc::new(mem);
    ring.pass(&runner, &mut RequestWorker::new(), &mem);
    (mem, runner, ring)
}

#[test]
fn runner_completes_each_request_as_it_finishes_not_behind_a_slow_one() {
    // The first request (byte 0) is held at the disk; the other four must complete meanwhile.
    let disk = Arc::new(GateDisk::new(0));
    let (mem, runner, ring) = runner_after_one_pass(&disk, 8, 5, VIRTIO_BLK_T_OUT);
    wait_until("four fast writes on the used ring", || used_idx(&mem) == 4);
    let done: Vec<u32> = (0..4).map(|i| used_elem(&mem, i).0).collect();
    assert!(!done.contains(&0), "the held request completed: {done:?}");
    assert_eq!(runner.inflight(), 1);
    assert!(ring.notifications.load(Ordering::SeqCst) > 0);
    disk.open_gate();
    runner.wait_idle();
    assert_eq!(used_idx(&mem), 5);
    assert_eq!(used_elem(&mem, 4), (0, 1));
    for i in 0..5u64 {
        assert_eq!(
            mem.read_obj::<u8>(GuestAddress(STATUS + i)).unwrap(),
            VIRTIO_BLK_S_OK
        );
        assert_eq!(
            disk.inner.inner.snapshot()[4096 * i as usize..4096 * (i as usize + 1)],
            vec![i as u8 + 1; 4096]
        );
    }
}

#[test]
fn runner_keeps_exactly_the_bound_of_requests_in_flight_at_the_disk() {
    let disk = Arc::new(GateDisk::new(u64::MAX));
    // The queue thread returns at once: it never waits for a request.
    let (mem, runner, _ring) = runner_after_one_pass(&disk, 3, 5, VIRTIO_BLK_T_IN);
    assert_eq!(runner.inflight(), 5);
    wait_until("three reads at the disk", || {
        disk.running.load(Ordering::SeqCst) == 3
    });
    std::thread::sleep(std::time::Duration::from_millis(20));
    assert_eq!(disk.max_running.load(Ordering::SeqCst), 3);
    assert_eq!(runner.threads(), 3);
    assert_eq!(used_idx(&mem), 0);
    disk.open_gate();
    runner.wait_idle();
    assert_eq!(used_idx(&mem), 5);
    for i in 0..5u64 {
        assert_eq!(
            mem.read_obj::<u8>(GuestAddress(STATUS + i)).unwrap(),
            VIRTIO_BLK_S_OK
        );
    }
    assert_eq!(runner.threads(), 3);
}

#[test]
fn runner_runs_a_lone_request_inline_and_a_batch_on_executors() {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    let disk = Arc::new(GateDisk::new(u64::MAX));
    disk.open_gate();
    let dev = gated_device(disk.clone());
    let runner = crate::inflight::QueueRunner::new(dev, 4, "test");
    let mut list = io_chains(&mem, 1, VIRTIO_BLK_T_OUT);
    let ring = TestRing::new(queue_with_chains(&mem, &list, 0));
    let mem = Arc::new(mem);
    let mut worker = RequestWorker::new();
    ring.pass(&runner, &mut worker, &mem);
    // Nothing was in flight: the queue thread ran the write itself, no executor was started.
    assert_eq!(runner.threads(), 0);
    assert_eq!(used_idx(&mem), 1);
    assert_eq!(ring.notifications.load(Ordering::SeqCst), 1);
    // Four writes and a flush in one pass, on executors.
    list = io_chains(&mem, 4, VIRTIO_BLK_T_OUT);
    let flush = RequestHeader {
        request_type: VIRTIO_BLK_T_FLUSH,
        reserved: 0,
        sector: 0,
    };
    mem.write_slice(&flush.to_bytes(), GuestAddress(HDR + 64 * 8))
        .unwrap();
    list.push(vec![(HDR + 64 * 8, 16, 0), (STATUS + 8, 1, F_WRITE)]);
    let mut q = queue_with_chains(&mem, &list, 0);
    q.set_next_used(1);
    *ring.queue.lock().unwrap() = q;
    ring.pass(&runner, &mut worker, &mem);
    runner.wait_idle();
    assert_eq!(used_idx(&mem), 6);
    assert!(runner.threads() >= 1 && runner.threads() <= 4);
    assert_eq!(
        mem.read_obj::<u8>(GuestAddress(STATUS + 8)).unwrap(),
        VIRTIO_BLK_S_OK
    );
    assert_eq!(disk.inner.flushes.load(Ordering::SeqCst), 1);
    drop(runner);
}

#[test]
fn runner_runs_fast_requests_on_the_queue_thread_and_hands_off_after_a_slow_one() {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    let mut disk = GateDisk::new(u64::MAX);
    disk.open_gate();
    // The second request of the second pass (byte 4096) takes far longer than the threshold.
    disk.delay = Some((4096, std::time::Duration::from_millis(300)));
    let disk = Arc::new(disk);
    let dev = gated_device(disk.clone());
    let slow = std::time::Duration::from_millis(60);
    let runner = crate::inflight::QueueRunner::with_slow_threshold(dev, 8, "test", slow);
    let mem = Arc::new(mem);
    let mut worker = RequestWorker::new();
    // First pass: the runner assumes slow requests until it has measured fast ones.
    // Reads far from the slow offset: fast.
    let far = |mem: &GuestMemoryMmap, n: u64, first_sector: u64| {
        let chains = io_chains(mem, n, VIRTIO_BLK_T_IN);
        for i in 0..n {
            let hdr = RequestHeader {
                request_type: VIRTIO_BLK_T_IN,
                reserved: 0,
                sector: first_sector + 8 * i,
            };
            mem.write_slice(&hdr.to_bytes(), GuestAddress(HDR + 64 * i))
                .unwrap();
        }
        chains
    };
    let ring = TestRing::new(queue_with_chains(&mem, &far(&mem, 4, 1024), 0));
    ring.pass(&runner, &mut worker, &mem);
    runner.wait_idle();
    assert_eq!(used_idx(&mem), 4);
    assert!(
        runner.threads() >= 1,
        "a fresh runner starts on its executors"
    );
    // Fast requests brought the average down: a batch of fast reads runs on the queue thread.
    for _ in 0..8 {
        let mut q = queue_with_chains(&mem, &far(&mem, 4, 1024), 0);
        let next = ring.queue.lock().unwrap().next_used();
        q.set_next_used(next);
        *ring.queue.lock().unwrap() = q;
        disk.threads.lock().unwrap().clear();
        ring.pass(&runner, &mut worker, &mem);
        runner.wait_idle();
    }
    let me = std::thread::current().id();
    assert!(
        disk.threads.lock().unwrap().iter().all(|t| *t == me),
        "fast requests left the queue thread"
    );
    // Now a pass whose second request is slow: the first two run inline, the other two on
    // executors.
    let mut q = queue_with_chains(&mem, &io_chains(&mem, 4, VIRTIO_BLK_T_IN), 0);
    let next = ring.queue.lock().unwrap().next_used();
    q.set_next_used(next);
    *ring.queue.lock().unwrap() = q;
    disk.threads.lock().unwrap().clear();
    ring.pass(&runner, &mut worker, &mem);
    runner.wait_idle();
    let threads = disk.threads.lock().unwrap().clone();
    assert_eq!(threads.len(), 4);
    assert_eq!(&threads[..2], &[me, me]);
    assert!(threads[2..].iter().all(|t| *t != me), "{threads:?}");
    for i in 0..4u64 {
        assert_eq!(
            mem.read_obj::<u8>(GuestAddress(STATUS + i)).unwrap(),
            VIRTIO_BLK_S_OK
        );
    }
}

#[test]
fn a_flush_in_a_fast_pass_goes_to_an_executor_and_the_writes_around_it_stay_inline() {
    // A FLUSH waits for the disk whatever the caches hold: run inline, its fdatasync stopped
    // the queue thread, sent the rest of the pass to the executors, and its time made the
    // following passes slow too (with a FLUSH every 32 writes, every write paid a hand-off).
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    let mut disk = GateDisk::new(u64::MAX);
    disk.open_gate();
    disk.flush_delay = Some(std::time::Duration::from_millis(300));
    let disk = Arc::new(disk);
    let slow = std::time::Duration::from_millis(60);
    let runner =
        crate::inflight::QueueRunner::with_slow_threshold(gated_device(disk.clone()), 8, "t", slow);
    runner.set_speed_for_test(true);
    let flush = RequestHeader {
        request_type: VIRTIO_BLK_T_FLUSH,
        reserved: 0,
        sector: 0,
    };
    let chains = |mem: &GuestMemoryMmap, with_flush: bool| {
        let mut list = io_chains(mem, 5, VIRTIO_BLK_T_OUT);
        if with_flush {
            mem.write_slice(&flush.to_bytes(), GuestAddress(HDR + 64 * 2))
                .unwrap();
            list[2] = vec![(HDR + 64 * 2, 16, 0), (STATUS + 2, 1, F_WRITE)];
        }
        list
    };
    let ring = TestRing::new(queue_with_chains(&mem, &chains(&mem, true), 0));
    let mem = Arc::new(mem);
    let mut worker = RequestWorker::new();
    ring.pass(&runner, &mut worker, &mem);
    // The pass did not wait for the flush: the four writes are on the used ring, run by the
    // queue thread itself; the flush is still at the disk, on an executor.
    assert_eq!(used_idx(&mem), 4, "the pass waited for the flush");
    let me = std::thread::current().id();
    let threads = disk.threads.lock().unwrap().clone();
    assert_eq!(threads, vec![me; 4], "a write left the queue thread");
    runner.wait_idle();
    assert_eq!(used_idx(&mem), 5);
    assert!(disk.flush_threads.lock().unwrap().iter().all(|t| *t != me));
    // Its 300 ms did not count as a request's time: the next pass runs inline too.
    let mut q = queue_with_chains(&mem, &chains(&mem, false), 0);
    q.set_next_used(5);
    *ring.queue.lock().unwrap() = q;
    disk.threads.lock().unwrap().clear();
    ring.pass(&runner, &mut worker, &mem);
    runner.wait_idle();
    assert_eq!(
        disk.threads.lock().unwrap().clone(),
        vec![me; 5],
        "the flush's time sent the next pass to the executors"
    );
    for i in 0..5u64 {
        assert_eq!(
            mem.read_obj::<u8>(GuestAddress(STATUS + i)).unwrap(),
            VIRTIO_BLK_S_OK
        );
    }
}

#[test]
fn runner_fails_only_the_request_whose_disk_operation_failed() {
    let mut disk = GateDisk::new(u64::MAX);
    disk.fail_at = Some(2 * 4096);
    let disk = Arc::new(disk);
    let (mem, runner, _ring) = runner_after_one_pass(&disk, 8, 5, VIRTIO_BLK_T_OUT);
    // All five are at the disk (executors) before any of them finishes.
    wait_until("five writes at the disk", || {
        disk.running.load(Ordering::SeqCst) == 5
    });
    disk.open_gate();
    runner.wait_idle();
    assert_eq!(used_idx(&mem), 5);
    for i in 0..5u64 {
        let want = if i == 2 {
            VIRTIO_BLK_S_IOERR
        } else {
            VIRTIO_BLK_S_OK
        };
        assert_eq!(mem.read_obj::<u8>(GuestAddress(STATUS + i)).unwrap(), want);
    }
    assert_eq!(
        disk.inner.inner.snapshot()[2 * 4096..3 * 4096],
        vec![0u8; 4096]
    );
}

/// Guest memory, a gated disk (gate closed), a vhost-user backend over it with up to 8
/// requests in flight per queue, and one vring of `QSIZE` entries over that memory.
fn vring_backend() -> (
    GuestMemoryMmap,
    Arc<GateDisk>,
    Arc<crate::vhu_blk::VhostUserBlk>,
    vhost_user_backend::VringRwLock,
) {
    use vhost_user_backend::VringT;
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    let disk = Arc::new(GateDisk::new(u64::MAX));
    let mut cfg = DeviceConfig::new(DISK_SIZE as u64, 512, 1, QSIZE).unwrap();
    cfg.max_inflight = 8;
    let dev = BlkDevice::new(ServedDisk::plain(disk.clone()), Arc::new(cfg));
    dev.set_acked_features(dev.config().features());
    let atomic = vm_memory::GuestMemoryAtomic::new(mem.clone());
    let backend =
        Arc::new(crate::vhu_blk::VhostUserBlk::new(Arc::new(dev), atomic.clone()).unwrap());
    let vring = vhost_user_backend::VringRwLock::new(atomic, QSIZE).unwrap();
    (mem, disk, backend, vring)
}

/// A call eventfd given to `vring` (what the driver would be notified on), to read.
fn call_eventfd(vring: &vhost_user_backend::VringRwLock) -> vmm_sys_util::eventfd::EventFd {
    use std::os::fd::{AsRawFd, FromRawFd};
    use vhost_user_backend::VringT;
    let call = vmm_sys_util::eventfd::EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap();
    // SAFETY: a fresh descriptor of our own (a duplicate of the eventfd's), owned by the File.
    let file = unsafe { std::fs::File::from_raw_fd(libc::dup(call.as_raw_fd())) };
    vring.set_call(Some(file));
    call
}

#[test]
fn stop_vring_returns_only_when_no_request_of_the_queue_is_in_flight() {
    use vhost_user_backend::{VhostUserBackend, VringT};
    use vmm_sys_util::epoll::EventSet;

    let (mem, disk, backend, vring) = vring_backend();
    *vring.get_mut().get_queue_mut() =
        queue_with_chains(&mem, &io_chains(&mem, 4, VIRTIO_BLK_T_OUT), 0);
    // A kick: the queue thread submits the four writes and returns while they wait at the disk.
    backend
        .handle_event(0, EventSet::IN, std::slice::from_ref(&vring), 0)
        .unwrap();
    wait_until("four writes at the disk", || {
        disk.running.load(Ordering::SeqCst) == 4
    });
    let stopped = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stopper = {
        let (backend, stopped) = (backend.clone(), stopped.clone());
        std::thread::spawn(move || {
            backend.stop_vring(0).unwrap();
            stopped.store(true, Ordering::SeqCst);
        })
    };
    std::thread::sleep(std::time::Duration::from_millis(50));
    let returned_early = stopped.load(Ordering::SeqCst);
    let used_early = used_idx(&mem);
    // Release the disk before asserting, so a failure does not leave requests blocked forever.
    disk.open_gate();
    stopper.join().unwrap();
    assert!(
        !returned_early,
        "GET_VRING_BASE returned with requests in flight"
    );
    assert_eq!(used_early, 0);
    // Once it returned, every request is on the used ring: the frontend reads a final state.
    assert_eq!(used_idx(&mem), 4);
    for i in 0..4u64 {
        assert_eq!(
            mem.read_obj::<u8>(GuestAddress(STATUS + i)).unwrap(),
            VIRTIO_BLK_S_OK
        );
    }
}

/// While the queue thread is in a pass it holds the vring lock; an executor that finishes then
/// does not sleep on that lock: it leaves its completion, which the queue thread adds to the
/// used ring during the pass or as it ends it, still holding the lock (so whoever takes the
/// lock next, GET_VRING_BASE included, finds it there). Once the pass has ended, an executor
/// publishes its own completion, taking the lock: none is ever stranded.
#[test]
fn an_executor_finishing_during_a_pass_leaves_its_completion_to_the_queue_thread() {
    use crate::inflight::UsedRing;
    use crate::vhu_blk::{LeftCompletions, TrackedVring};
    use vhost_user_backend::{VringRwLock, VringT};
    use vm_memory::GuestMemoryAtomic;

    const MUST: std::time::Duration = std::time::Duration::from_secs(10);
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    let vring = VringRwLock::new(GuestMemoryAtomic::new(mem.clone()), QSIZE).unwrap();
    *vring.get_mut().get_queue_mut() =
        queue_with_chains(&mem, &io_chains(&mem, 4, VIRTIO_BLK_T_OUT), 0);
    let left = Arc::new(LeftCompletions::default());
    let ring = TrackedVring::new(vring.clone(), None, Arc::clone(&left));
    let executor = |head: u16| {
        let (ring, mem) = (ring.clone(), mem.clone());
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            ring.complete(&mem, head, 1);
            tx.send(()).unwrap();
        });
        rx
    };
    // The queue thread's pass: the vring lock held all along.
    let mut state = vring.get_mut();
    left.begin_pass();
    for head in [0, 1] {
        executor(head)
            .recv_timeout(MUST)
            .expect("an executor waited for the vring lock of a pass");
    }
    assert_eq!(used_idx(&mem), 0, "left, not on the used ring yet");
    let queue = state.get_queue_mut();
    assert_eq!(
        ring.add_left(queue, &mem),
        (2, true),
        "both added, and the driver asked to hear of them"
    );
    assert_eq!(used_idx(&mem), 2);
    executor(2)
        .recv_timeout(MUST)
        .expect("an executor waited for the vring lock of a pass");
    assert_eq!(
        left.add_to(queue, &mem, None, true).0,
        1,
        "taken as the pass ends"
    );
    assert_eq!(used_idx(&mem), 3);
    // The pass is over (its lock not let go yet): the next executor publishes itself.
    let done = executor(3);
    assert!(
        done.recv_timeout(std::time::Duration::from_millis(150))
            .is_err(),
        "after its pass, an executor completes to the used ring itself, under the vring lock"
    );
    assert_eq!(ring.add_left(queue, &mem), (0, false));
    drop(state);
    done.recv_timeout(MUST)
        .expect("the executor never published");
    assert_eq!(used_idx(&mem), 4);
    assert_eq!(used_elem(&mem, 3), (3, 1));
}

/// Completions executors leave to a pass after the pass's last round of pops are added as the
/// pass ends, and the driver is notified of them: the pass owed no notification of its own (it
/// ran nothing itself), and the executors, having left them, signal nothing.
#[test]
fn a_completion_left_as_the_pass_ends_is_signalled_to_the_driver() {
    use vhost_user_backend::{VhostUserBackend, VringT};
    use vmm_sys_util::epoll::EventSet;

    let (mem, disk, backend, vring) = vring_backend();
    *vring.get_mut().get_queue_mut() =
        queue_with_chains(&mem, &io_chains(&mem, 2, VIRTIO_BLK_T_OUT), 0);
    let call = call_eventfd(&vring);
    {
        // The writes are with executors (a fresh runner expects slow requests), held at the
        // disk; once the pass has popped them, let them finish and wait until their
        // completions are left to the pass.
        let (disk, backend2) = (disk.clone(), Arc::downgrade(&backend));
        backend.set_before_pass_end(Box::new(move || {
            wait_until("the write at the disk", || {
                disk.running.load(Ordering::SeqCst) == 2
            });
            disk.open_gate();
            wait_until("the completion left to the pass", || {
                backend2.upgrade().is_some_and(|b| b.left_count(0) == 2)
            });
        }));
    }
    backend
        .handle_event(0, EventSet::IN, std::slice::from_ref(&vring), 0)
        .unwrap();
    assert_eq!(backend.left_count(0), 0);
    assert_eq!(
        used_idx(&mem),
        2,
        "added before the pass let go of the lock"
    );
    assert!(
        call.read().is_ok(),
        "the driver was not notified of the completion left as the pass ended"
    );
    backend.wait_idle();
}

/// Through the vhost-user pass itself (`process_vring`): a pass that runs `SIGNAL_EVERY`
/// requests on the queue thread notifies the driver, on its call eventfd, for them, whether it
/// does so in the middle of the pass (a core left for the driver) or at its end.
#[test]
fn an_inline_pass_of_the_vring_notifies_the_driver_of_its_completions() {
    use crate::inflight::SIGNAL_EVERY;
    use vhost_user_backend::{VhostUserBackend, VringT};
    use vmm_sys_util::epoll::EventSet;

    let (mem, disk, backend, vring) = vring_backend();
    disk.open_gate();
    let call = call_eventfd(&vring);
    let me = std::thread::current().id();
    // A fresh runner expects slow requests: fast passes bring its estimate down first.
    for _ in 0..10 {
        {
            let mut st = vring.get_mut();
            let q = st.get_queue_mut();
            let first = q.next_used();
            *q = queue_with_chains(
                &mem,
                &io_chains(&mem, SIGNAL_EVERY as u64, VIRTIO_BLK_T_IN),
                0,
            );
            q.set_next_used(first);
        }
        backend.wait_idle();
        let _ = call.read();
        disk.threads.lock().unwrap().clear();
        backend
            .handle_event(0, EventSet::IN, std::slice::from_ref(&vring), 0)
            .unwrap();
        backend.wait_idle();
    }
    assert!(
        disk.threads.lock().unwrap().iter().all(|t| *t == me),
        "the last pass ran on the queue thread"
    );
    assert!(
        call.read().is_ok(),
        "the driver was not notified of a pass's completions"
    );
}

#[path = "uring_tests.rs"]
mod uring_tests;

/// A pass that runs its requests on the queue thread tells the driver every `SIGNAL_EVERY`
/// completions, not only at its end: the driver reaps and refills the ring meanwhile (one
/// notification per pass made the two take turns). What remains unsignalled at the end is
/// left to the caller's end-of-pass notification.
#[test]
fn an_inline_pass_notifies_the_driver_every_few_completions_not_only_at_its_end() {
    use crate::inflight::SIGNAL_EVERY;
    const { assert!(SIGNAL_EVERY < 5, "the test's queue holds five requests") };
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    let disk = Arc::new(GateDisk::new(u64::MAX));
    disk.open_gate();
    let runner = crate::inflight::QueueRunner::with_slow_threshold(
        gated_device(disk.clone()),
        8,
        "test",
        std::time::Duration::from_secs(5),
    );
    let mem = Arc::new(mem);
    let mut worker = RequestWorker::new();
    let ring = TestRing::new(queue_with_chains(&mem, &[], 0));
    let me = std::thread::current().id();
    // A fresh runner assumes slow requests (its executors complete to `ring`): fast passes
    // bring its estimate down first.
    let mut signalled_at = Vec::new();
    let mut owed = false;
    for _ in 0..10 {
        let mut q = ring.queue.lock().unwrap();
        let first = q.next_used();
        *q = queue_with_chains(&mem, &io_chains(&mem, 5, VIRTIO_BLK_T_IN), 0);
        q.set_next_used(first);
        disk.threads.lock().unwrap().clear();
        signalled_at.clear();
        let mut signal = || {
            signalled_at.push(used_idx(&mem).wrapping_sub(first));
            true
        };
        owed =
            crate::inflight::submit_queue(&runner, &mut worker, &ring, &mut q, &mem, &mut signal)
                .unwrap();
        drop(q);
        runner.wait_idle();
        assert_eq!(used_idx(&mem), first.wrapping_add(5));
    }
    assert!(
        disk.threads.lock().unwrap().iter().all(|t| *t == me),
        "the last pass ran on the queue thread"
    );
    assert_eq!(
        signalled_at,
        vec![SIGNAL_EVERY as u16],
        "one notification once SIGNAL_EVERY requests were on the used ring"
    );
    assert!(
        owed,
        "the fifth completion is left to the end-of-pass notification"
    );
}

/// A driver may publish chains after a pass's last pop and before the pass re-enables
/// notifications; with EVENT_IDX it does not kick for them, so the pass must take them. A
/// round that popped nothing (here: the kick's chains were taken by an earlier pass) and then
/// sees chains at the re-check used to end the pass as "stalled", leaving the published chains
/// unserved until some later kick (seen in benchmark logs under load). The hook publishes a
/// chain exactly in that window.
#[test]
fn a_pass_that_popped_nothing_takes_the_chains_published_before_its_re_check() {
    let mem = Arc::new(GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap());
    let disk = Arc::new(GateDisk::new(u64::MAX));
    disk.open_gate();
    let runner = crate::inflight::QueueRunner::new(gated_device(disk), 8, "test");
    // One read chain in the descriptor table and the avail ring, not yet published.
    let mut q = queue_with_chains(&mem, &io_chains(&mem, 1, VIRTIO_BLK_T_IN), 0);
    q.set_event_idx(true);
    mem.write_obj(0u16, GuestAddress(AVAIL + 2)).unwrap();
    let published = Arc::new(AtomicUsize::new(0));
    {
        let mem = Arc::clone(&mem);
        let published = Arc::clone(&published);
        *runner.after_pops.lock().unwrap() = Some(Box::new(move |popped| {
            if popped == 0 && published.fetch_add(1, Ordering::SeqCst) == 0 {
                mem.write_obj(1u16.to_le(), GuestAddress(AVAIL + 2))
                    .unwrap();
            }
        }));
    }
    let ring = TestRing::new(q);
    let mut worker = RequestWorker::new();
    let r = {
        let mut q = ring.queue.lock().unwrap();
        let mut signal = || true;
        crate::inflight::submit_queue(&runner, &mut worker, &ring, &mut q, &mem, &mut signal)
    };
    assert!(r.is_ok(), "the pass ended with {r:?}");
    assert_eq!(published.load(Ordering::SeqCst), 1, "the hook did not run");
    runner.wait_idle();
    assert_eq!(
        used_idx(&mem),
        1,
        "the chain published in the window was not served"
    );
    assert_eq!(
        mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(),
        VIRTIO_BLK_S_OK
    );
}

/// The other side of the same check: a ring whose index announces a chain that cannot be
/// popped (its avail ring ends at the end of guest memory, so the entry is unreadable) ends
/// the pass with an error on both paths instead of spinning.
#[test]
fn a_ring_announcing_a_chain_it_cannot_hold_ends_the_pass_on_both_paths() {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let ring_at = MEM_SIZE as u64 - 4;
        let unpoppable = |mem: &GuestMemoryMmap| {
            let mut q = ready_queue(ring_at);
            q.set_event_idx(true);
            mem.write_obj(0u16, GuestAddress(ring_at)).unwrap();
            mem.write_obj(1u16.to_le(), GuestAddress(ring_at + 2))
                .unwrap();
            q
        };
        let mut h = Harness::new();
        let mut q = unpoppable(&h.mem);
        let plain = process_queue(&h.dev, &mut h.worker, &mut q, &h.mem);
        let mem =
            Arc::new(GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap());
        let disk = Arc::new(GateDisk::new(u64::MAX));
        disk.open_gate();
        let runner = crate::inflight::QueueRunner::new(gated_device(disk), 8, "test");
        let ring = TestRing::new(unpoppable(&mem));
        let mut worker = RequestWorker::new();
        let runner_result = {
            let mut q = ring.queue.lock().unwrap();
            let mut signal = || true;
            crate::inflight::submit_queue(&runner, &mut worker, &ring, &mut q, &mem, &mut signal)
        };
        let _ = tx.send((
            matches!(plain, Err(ProcessQueueError::Stalled)),
            matches!(runner_result, Err(ProcessQueueError::Stalled)),
        ));
    });
    let (plain, runner) = rx
        .recv_timeout(std::time::Duration::from_secs(10))
        .expect("a pass spun on a ring announcing a chain it cannot hold");
    assert!(plain, "process_queue did not report the stalled ring");
    assert!(runner, "submit_queue did not report the stalled ring");
}

/// A small write the disk takes in memory (`BlockDev::writes_in_memory`: the write-back cache
/// has room for it) runs on the queue thread even while requests are slow, and leaves the
/// estimate alone; a write the disk says may wait, one larger than the queue thread takes, and
/// any write in write-through mode (the front end flushes after each) go to the executors.
#[test]
fn a_small_write_the_disk_takes_in_memory_runs_on_the_queue_thread_while_requests_are_slow() {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    let mut disk = GateDisk::new(u64::MAX);
    disk.open_gate();
    let big = 1 << 20;
    disk.in_memory = vec![0, 8192, big, 2 * big];
    let disk = Arc::new(disk);
    let dev = gated_device(disk.clone());
    let runner = crate::inflight::QueueRunner::new(dev.clone(), 8, "t");
    runner.set_speed_for_test(false);
    let write = |i: u64, at: u64, len: u32| {
        let hdr = RequestHeader {
            request_type: VIRTIO_BLK_T_OUT,
            reserved: 0,
            sector: at / 512,
        };
        mem.write_slice(&hdr.to_bytes(), GuestAddress(HDR + 64 * i))
            .unwrap();
        vec![
            (HDR + 64 * i, 16, 0),
            (DATA + (i << 17), len, 0),
            (STATUS + i, 1, F_WRITE),
        ]
    };
    let mut chains = io_chains(&mem, 4, VIRTIO_BLK_T_OUT);
    // Exactly the most the queue thread takes, and 512 bytes more.
    chains.push(write(4, big, 64 << 10));
    chains.push(write(5, 2 * big, (64 << 10) + 512));
    let ring = TestRing::new(queue_with_chains(&mem, &chains, 0));
    let mem = Arc::new(mem);
    let mut worker = RequestWorker::new();
    ring.pass(&runner, &mut worker, &mem);
    runner.wait_idle();
    assert_eq!(used_idx(&mem), 6);
    let me = std::thread::current().id();
    let ran = disk.by_offset.lock().unwrap().clone();
    let on_queue_thread = |at: u64| ran.iter().any(|&(o, t)| o == at && t == me);
    assert_eq!(
        [0, 4096, 8192, 12288, big, 2 * big].map(on_queue_thread),
        [true, false, true, false, true, false],
        "{ran:?}"
    );
    assert_eq!(
        disk.asked.lock().unwrap().clone(),
        vec![
            (0, 4096),
            (4096, 4096),
            (8192, 4096),
            (12288, 4096),
            (big, 64 << 10)
        ],
        "the disk is asked of each small write, with its range"
    );
    // Writes run inline leave the estimate as it was: after a pass of only those, two reads
    // still go to the executors.
    runner.set_speed_for_test(false);
    let in_memory = [chains[0].clone(), chains[2].clone(), chains[4].clone()];
    // One more pass over `chains` (the used ring at `used`): which thread ran each operation.
    let mut pass = |chains: &[Vec<(u64, u32, u16)>], used: u16| {
        disk.by_offset.lock().unwrap().clear();
        let mut q = queue_with_chains(&mem, chains, 0);
        q.set_next_used(used);
        *ring.queue.lock().unwrap() = q;
        ring.pass(&runner, &mut worker, &mem);
        runner.wait_idle();
        disk.by_offset.lock().unwrap().clone()
    };
    pass(&in_memory, 6);
    let ran = pass(&io_chains(&mem, 2, VIRTIO_BLK_T_IN), 9);
    assert!(
        ran.len() == 2 && ran.iter().all(|&(_, t)| t != me),
        "{ran:?}"
    );
    // Write-through mode, no cache layer: the front end flushes after each write. (The reads
    // took the headers of the first two chains: they are writes again.)
    io_chains(&mem, 4, VIRTIO_BLK_T_OUT);
    dev.set_writeback(false);
    runner.set_speed_for_test(false);
    let ran = pass(&in_memory, 11);
    assert!(
        ran.len() == 3 && ran.iter().all(|&(_, t)| t != me),
        "{ran:?}"
    );
    for i in [0, 2, 4] {
        assert_eq!(
            mem.read_obj::<u8>(GuestAddress(STATUS + i)).unwrap(),
            VIRTIO_BLK_S_OK
        );
    }
}
