//! Deterministic interleavings of in-flight tracking ([`crate::reconnect`]) with the real queue
//! paths of [`VhostUserBlk`]: the serial pass, the inline path of a pass and the executors of
//! one queue, completing out of order and racing for the vring lock.
//!
//! A SIGKILL is modelled by freezing a copy of the in-flight buffer and of guest memory at a
//! hook point (every store to the buffer and every used-ring publication has one, see
//! [`Stage`]) and running the recovery of a new daemon on that copy. The invariant checked at
//! every frozen instant: the chains the new daemon executes (resubmitted ones, then the ones it
//! pops from the available ring) are exactly the requests whose completion the frozen used ring
//! does not show, each once.
//!
//! Locking model of the harness: the guest model writes its rings under `guest` (a mutex the
//! hooks also take while they copy guest memory, so a copy never holds half a submission); the
//! hooks run with the queue's vring lock held, as every store to a queue's part of the buffer
//! does. Gates in the disk hold writes until the test releases them.

use std::collections::{HashMap, HashSet};
use std::os::unix::fs::FileExt;
use std::sync::atomic::AtomicUsize;
use std::sync::{Condvar, Mutex, PoisonError};
use std::time::Duration;

use blockdev::{BlockDev, MemDisk};
use vhost_user_backend::{VringRwLock, VringT};
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::QueueOwnedT;
use vm_memory::{Bytes, GuestMemoryMmap};

use super::*;
use crate::reconnect::Stage;
use crate::virtio_blk::{RequestHeader, VIRTIO_BLK_T_OUT};

const QSIZE: u16 = 64;
/// Heads 0..HEADS carry requests; descriptor `h + HEADS` is the status of head `h`.
const HEADS: u16 = 32;
const MEM: usize = 0x20000;
const DESC: u64 = 0x0;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;
const SLOTS: u64 = 0x4000;
const SLOT: u64 = 0x400;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;

/// A disk whose writes to gated sectors wait until the test opens the gate.
#[derive(Default)]
struct GatedDisk {
    inner: Mutex<Option<MemDisk>>,
    gated: Mutex<HashSet<u64>>,
    opened: Condvar,
    /// Sectors whose write returned.
    written: Mutex<HashSet<u64>>,
    /// Writes per sector.
    writes: Mutex<HashMap<u64, usize>>,
    done: Condvar,
}

impl GatedDisk {
    fn new() -> Arc<Self> {
        let d = GatedDisk::default();
        *d.inner.lock().unwrap() = Some(MemDisk::new(1 << 20));
        Arc::new(d)
    }
    fn gate(&self, sector: u64) {
        self.gated.lock().unwrap().insert(sector);
    }
    fn open(&self, sector: u64) {
        self.gated.lock().unwrap().remove(&sector);
        self.opened.notify_all();
    }
    /// Waits (bounded: a lost request fails the test instead of hanging it) until the write
    /// of `sector` reached the disk.
    fn wait_written(&self, sector: u64) {
        let w = self.written.lock().unwrap();
        let (w, _) = self
            .done
            .wait_timeout_while(w, Duration::from_secs(30), |w| !w.contains(&sector))
            .unwrap();
        assert!(
            w.contains(&sector),
            "the write of sector {sector} never ran"
        );
    }
}

impl BlockDev for GatedDisk {
    fn size(&self) -> u64 {
        1 << 20
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> blockdev::Result<()> {
        self.inner
            .lock()
            .unwrap()
            .as_ref()
            .unwrap()
            .read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> blockdev::Result<()> {
        let sector = offset / 512;
        let mut g = self.gated.lock().unwrap();
        while g.contains(&sector) {
            g = self.opened.wait(g).unwrap();
        }
        drop(g);
        self.inner
            .lock()
            .unwrap()
            .as_ref()
            .unwrap()
            .write_at(buf, offset)?;
        self.written.lock().unwrap().insert(sector);
        *self.writes.lock().unwrap().entry(sector).or_default() += 1;
        self.done.notify_all();
        Ok(())
    }
    fn flush(&self) -> blockdev::Result<()> {
        Ok(())
    }
    fn discard(&self, offset: u64, len: u64) -> blockdev::Result<()> {
        self.inner
            .lock()
            .unwrap()
            .as_ref()
            .unwrap()
            .discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> blockdev::Result<()> {
        self.inner
            .lock()
            .unwrap()
            .as_ref()
            .unwrap()
            .write_zeroes(offset, len, unmap)
    }
}

/// The state a SIGKILL at one hook point leaves: the buffer and guest memory.
#[derive(Clone)]
struct Frozen {
    /// The ring index the run started at.
    start: u16,
    stage: Stage,
    head: u16,
    region: Vec<u8>,
    mem: Vec<u8>,
}

/// Hook points reached so far, and a wake-up for tests waiting on one.
#[derive(Default)]
struct Reached {
    seen: Mutex<Vec<(Stage, u16)>>,
    cv: Condvar,
}

impl Reached {
    /// Waits until `(stage, head)` was reached, for at most `limit`; whether it was.
    fn wait(&self, stage: Stage, head: u16, limit: Duration) -> bool {
        let seen = self.seen.lock().unwrap();
        let (seen, _) = self
            .cv
            .wait_timeout_while(seen, limit, |s| !s.contains(&(stage, head)))
            .unwrap();
        seen.contains(&(stage, head))
    }
}

type StageAction = Box<dyn Fn(Stage, u16) + Send + Sync>;

/// One queue of a [`VhostUserBlk`] with in-flight tracking, a guest model driving it, and every
/// hook point frozen.
struct Rig {
    backend: Arc<VhostUserBlk>,
    vring: VringRwLock,
    mem: GuestMemory,
    disk: Arc<GatedDisk>,
    /// Guest model: next avail index to write (held while writing the rings).
    guest: Arc<Mutex<u16>>,
    /// The ring index the run started at.
    start: u16,
    frozen: Arc<Mutex<Vec<Frozen>>>,
    reached: Arc<Reached>,
    /// Completions between `Completing` and `Completed` right now (at most one may be).
    half_done: Arc<AtomicUsize>,
    /// Extra action run at a hook point (after freezing), set by a test.
    action: Arc<Mutex<Option<StageAction>>>,
    /// Threads whose hooks saw a `Completing` (to tell inline from executor completions).
    completers: Arc<Mutex<HashMap<u16, String>>>,
    /// What went wrong inside hooks (they must not panic).
    violations: Arc<Mutex<Vec<String>>>,
}

impl Drop for Rig {
    fn drop(&mut self) {
        // A failed test must not leave executors waiting at a gate (the runner joins them).
        self.disk.gated.lock().unwrap().clear();
        self.disk.opened.notify_all();
    }
}

fn guest_memory() -> GuestMemory {
    GuestMemoryAtomic::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).unwrap())
}

fn snapshot_mem(mem: &GuestMemoryMmap) -> Vec<u8> {
    let mut buf = vec![0u8; MEM];
    mem.read_slice(&mut buf, GuestAddress(0)).unwrap();
    buf
}

impl Rig {
    /// `max_inflight` 1 serves the queue serially; more uses executors. The rings start at
    /// index `start` (both the driver's and the device's), e.g. near the 16-bit wrap.
    fn new(max_inflight: usize, start: u16) -> Rig {
        Self::build(max_inflight, start, None)
    }

    /// A new daemon on the state a killed one left (`f`): its guest memory and buffer.
    fn restarted(max_inflight: usize, f: &Frozen) -> Rig {
        Self::build(max_inflight, f.start, Some(f))
    }

    fn build(max_inflight: usize, start: u16, from: Option<&Frozen>) -> Rig {
        let mem = guest_memory();
        let disk = GatedDisk::new();
        let dev = BlkDevice::for_tests(Arc::clone(&disk) as Arc<dyn BlockDev>, QSIZE, max_inflight);
        let file = Arc::new(InflightFile::create().unwrap());
        let backend =
            Arc::new(VhostUserBlk::with_inflight(Arc::new(dev), mem.clone(), Some(file)).unwrap());
        let (desc, fd) = backend
            .get_inflight_fd(&VhostUserInflight::new(0, 0, 1, QSIZE))
            .unwrap();
        if let Some(f) = from {
            fd.write_all_at(&f.region, 0).unwrap();
        }
        backend.set_inflight_fd(&desc, fd).unwrap();
        {
            let m = mem.memory();
            match from {
                Some(f) => m.write_slice(&f.mem, GuestAddress(0)).unwrap(),
                None => {
                    m.write_obj(start.to_le(), GuestAddress(AVAIL + 2)).unwrap();
                    m.write_obj(start.to_le(), GuestAddress(USED + 2)).unwrap();
                }
            }
        }
        let avail: u16 = mem.memory().read_obj(GuestAddress(AVAIL + 2)).unwrap();
        let rig = Rig {
            backend,
            vring: VringRwLock::new(mem.clone(), QSIZE).unwrap(),
            mem,
            disk,
            guest: Arc::new(Mutex::new(avail)),
            start,
            frozen: Arc::default(),
            reached: Arc::default(),
            half_done: Arc::default(),
            action: Arc::default(),
            completers: Arc::default(),
            violations: Arc::default(),
        };
        rig.install_hook();
        rig.vring.set_queue_size(QSIZE);
        rig.vring.set_queue_info(DESC, AVAIL, USED).unwrap();
        rig.vring.set_queue_ready(true);
        // What QEMU restores as the base after losing a backend: the used index.
        let used: u16 = rig.mem.memory().read_obj(GuestAddress(USED + 2)).unwrap();
        rig.vring.set_queue_next_avail(used);
        rig.backend.vring_started(0, &rig.vring).unwrap();
        rig
    }

    fn install_hook(&self) {
        let region = self
            .backend
            .inflight
            .lock()
            .unwrap()
            .clone()
            .expect("SET_INFLIGHT_FD took the buffer");
        let mem = self.mem.clone();
        let guest = Arc::clone(&self.guest);
        let frozen = Arc::clone(&self.frozen);
        let reached = Arc::clone(&self.reached);
        let half = Arc::clone(&self.half_done);
        let action = Arc::clone(&self.action);
        let completers = Arc::clone(&self.completers);
        let start = self.start;
        let violations = Arc::clone(&self.violations);
        region.set_test_hook(Box::new(move |q, stage, head| {
            match stage {
                Stage::Completing => {
                    // Never panic in a hook (it may run under the vring lock, on an
                    // executor): record the violation, the test checks the list.
                    if half.fetch_add(1, Ordering::SeqCst) != 0 {
                        violations
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .push(format!(
                                "two completions of one queue half-recorded at once (head {head})"
                            ));
                    }
                    let name = std::thread::current().name().unwrap_or("").to_string();
                    completers
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .insert(head, name);
                }
                Stage::Completed => {
                    half.fetch_sub(1, Ordering::SeqCst);
                }
                _ => {}
            }
            {
                let _g = guest.lock().unwrap_or_else(PoisonError::into_inner);
                frozen
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(Frozen {
                        start,
                        stage,
                        head,
                        region: q.region().snapshot(),
                        mem: snapshot_mem(&mem.memory()),
                    });
            }
            reached
                .seen
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push((stage, head));
            reached.cv.notify_all();
            if let Some(a) = action
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .as_ref()
            {
                a(stage, head);
            }
        }));
    }

    /// The guest submits a one-sector write of `id` (to sector `id`) on descriptor head `head`.
    fn submit(&self, head: u16, id: u64) {
        assert!(head < HEADS);
        let mut avail = self.guest.lock().unwrap();
        let m = self.mem.memory();
        let slot = SLOTS + SLOT * u64::from(head);
        let hdr = RequestHeader {
            request_type: VIRTIO_BLK_T_OUT,
            reserved: 0,
            sector: id,
        };
        m.write_slice(&hdr.to_bytes(), GuestAddress(slot)).unwrap();
        m.write_slice(&[id as u8; 512], GuestAddress(slot + 16))
            .unwrap();
        let d0 = SplitDescriptor::new(slot, 16 + 512, F_NEXT, head + HEADS);
        let d1 = SplitDescriptor::new(slot + 0x300, 1, F_WRITE, 0);
        m.write_obj(
            RawDescriptor::from(d0),
            GuestAddress(DESC + 16 * u64::from(head)),
        )
        .unwrap();
        m.write_obj(
            RawDescriptor::from(d1),
            GuestAddress(DESC + 16 * u64::from(head + HEADS)),
        )
        .unwrap();
        let pos = u64::from(*avail % QSIZE);
        m.write_obj(head.to_le(), GuestAddress(AVAIL + 4 + 2 * pos))
            .unwrap();
        *avail = avail.wrapping_add(1);
        m.store(avail.to_le(), GuestAddress(AVAIL + 2), Ordering::Release)
            .unwrap();
    }

    /// One processing pass of the queue thread, with the runner believing requests are `fast`.
    fn pass(&self, fast: bool) {
        if let Some(Some(r)) = self.backend.runners.first() {
            r.set_speed_for_test(fast);
        }
        self.backend.process_vring(&self.vring, 0).unwrap();
    }

    fn wait_completed(&self, head: u16) {
        assert!(
            self.reached
                .wait(Stage::Completed, head, Duration::from_secs(30)),
            "head {head} never completed"
        );
    }

    /// Waits (bounded, like `wait_completed`) until no request of the device is in flight.
    fn wait_idle(&self) {
        let backend = Arc::clone(&self.backend);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            backend.wait_idle();
            let _ = tx.send(());
        });
        assert!(
            rx.recv_timeout(Duration::from_secs(30)).is_ok(),
            "requests still in flight after 30 s"
        );
    }

    fn set_action(&self, a: impl Fn(Stage, u16) + Send + Sync + 'static) {
        *self.action.lock().unwrap() = Some(Box::new(a));
    }

    /// Checks every frozen instant (see the module documentation); returns how many.
    fn check_every_instant(&self) -> usize {
        let v = self.violations.lock().unwrap();
        assert!(v.is_empty(), "{v:?}");
        let frozen = self.frozen.lock().unwrap();
        for f in frozen.iter() {
            check_recovery_of(f);
        }
        frozen.len()
    }
}

/// The request id (sector) the descriptor at `head` carries in guest memory `m`.
fn id_of(m: &GuestMemoryMmap, head: u16) -> u64 {
    let d: RawDescriptor = m
        .read_obj(GuestAddress(DESC + 16 * u64::from(head)))
        .unwrap();
    let d = SplitDescriptor::from(d);
    m.read_obj::<u64>(GuestAddress(d.addr().0 + 8)).unwrap()
}

/// What a new daemon does from the frozen state `f`: the ids it resubmits, then the ids it
/// pops, in order.
fn new_daemon_runs(f: &Frozen) -> (Vec<u64>, Vec<u64>) {
    let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
    m.write_slice(&f.mem, GuestAddress(0)).unwrap();
    let file = InflightFile::create().unwrap();
    let (desc, fd) = file.fresh(&VhostUserInflight::new(0, 0, 1, QSIZE)).unwrap();
    fd.write_all_at(&f.region, 0).unwrap();
    let region = InflightRegion::map(&desc, &fd).unwrap();
    let track = region.queue(0, QSIZE).unwrap();
    let mut q = Queue::new(QSIZE).unwrap();
    q.set_size(QSIZE);
    q.try_set_desc_table_address(GuestAddress(DESC)).unwrap();
    q.try_set_avail_ring_address(GuestAddress(AVAIL)).unwrap();
    q.try_set_used_ring_address(GuestAddress(USED)).unwrap();
    q.set_ready(true);
    // What QEMU restores when the backend died: the used index.
    let used = q.used_idx(&m, Ordering::Acquire).unwrap().0;
    q.set_next_avail(used);
    let heads = recover_queue(&mut q, &m, &track, 0).unwrap();
    let resubmitted = heads.iter().map(|&h| id_of(&m, h)).collect();
    let mut popped = Vec::new();
    while let Some(c) = q.iter(&m).unwrap().next() {
        popped.push(id_of(&m, c.head_index()));
    }
    (resubmitted, popped)
}

/// The invariant at one frozen instant: the new daemon runs exactly the requests whose
/// completion is not on the frozen used ring, each once.
fn check_recovery_of(f: &Frozen) {
    let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
    m.write_slice(&f.mem, GuestAddress(0)).unwrap();
    let avail: u16 = m.read_obj(GuestAddress(AVAIL + 2)).unwrap();
    let used: u16 = m.read_obj(GuestAddress(USED + 2)).unwrap();
    // Requests are identified by sector. The guest model never reuses a head here and submits
    // fewer requests than the ring holds, so the avail and used entries since `start` name
    // every request made available and every completion the driver can see.
    let mut expected = ring_ids(&m, f.start, avail, |pos| {
        m.read_obj::<u16>(GuestAddress(AVAIL + 4 + 2 * pos))
            .unwrap()
    });
    let done: HashSet<u64> = ring_ids(&m, f.start, used, |pos| {
        m.read_obj::<u32>(GuestAddress(USED + 4 + 8 * pos)).unwrap() as u16
    })
    .into_iter()
    .collect();
    expected.retain(|id| !done.contains(id));
    expected.sort_unstable();
    let (resub, popped) = new_daemon_runs(f);
    let mut ran: Vec<u64> = resub.iter().chain(popped.iter()).copied().collect();
    ran.sort_unstable();
    assert_eq!(
        ran, expected,
        "killed after {:?} of head {}: the new daemon resubmits {resub:?} and pops {popped:?}, \
         but the requests not completed on the used ring are {expected:?}",
        f.stage, f.head
    );
}

/// The ids named by ring entries `start..end` (16-bit indexes), `head_at(pos)` reading the head
/// at ring position `pos`.
fn ring_ids(m: &GuestMemoryMmap, start: u16, end: u16, head_at: impl Fn(u64) -> u16) -> Vec<u64> {
    (0..end.wrapping_sub(start))
        .map(|i| id_of(m, head_at(u64::from(start.wrapping_add(i) % QSIZE))))
        .collect()
}

/// Four requests go to the executors (gated), then two passes complete requests inline while
/// executors finish theirs; completion order 4, 2, 0, 3, 5, 1 (out of order, across the
/// 16-bit wrap of the ring indexes). One executor is released while an inline completion is
/// half recorded: it must not record its own meanwhile, and leaves it to the pass (which holds
/// the vring lock), which records it after the inline one.
#[test]
fn reconnect_every_instant_of_racing_executor_and_inline_completions_resubmits_exactly_the_unpublished(
) {
    let rig = Arc::new(Rig::new(4, 65532));
    for id in 0..4u64 {
        rig.disk.gate(id);
        rig.submit(id as u16, id);
    }
    rig.pass(false);
    // Inline completion of head 4; while it is half recorded, executor 2 finishes its write and
    // completes: it must not start recording its completion before head 4's ends (it leaves it
    // to the pass).
    {
        let disk = Arc::clone(&rig.disk);
        let reached = Arc::clone(&rig.reached);
        let violations = Arc::clone(&rig.violations);
        let backend = Arc::clone(&rig.backend);
        rig.set_action(move |stage, head| {
            if stage == Stage::Completing && head == 4 {
                disk.open(2);
                disk.wait_written(2);
                // Bounded wait for something that must not happen (the executor holds no lock
                // it could take here).
                if reached.wait(Stage::Completing, 2, Duration::from_millis(100)) {
                    violations.lock().unwrap().push(
                        "an executor recorded its completion while an inline one was half recorded"
                            .into(),
                    );
                }
                // The executor has left its completion to this pass (however slow it was to
                // get there).
                let left = |b: &VhostUserBlk| b.left[0].state().done.iter().any(|d| d.0 == 2);
                let until = std::time::Instant::now() + Duration::from_secs(10);
                while !left(&backend) && std::time::Instant::now() < until {
                    std::thread::sleep(Duration::from_millis(1));
                }
                if !left(&backend) {
                    violations
                        .lock()
                        .unwrap()
                        .push("the executor did not leave its completion to the pass".into());
                }
            }
        });
    }
    rig.submit(4, 4);
    rig.pass(true);
    rig.wait_completed(2);
    *rig.action.lock().unwrap() = None;
    for id in [0u16, 3] {
        rig.disk.open(u64::from(id));
        rig.wait_completed(id);
    }
    rig.submit(5, 5);
    rig.pass(true);
    rig.disk.open(1);
    rig.wait_completed(1);
    rig.wait_idle();
    let used: u16 = rig.mem.memory().read_obj(GuestAddress(USED + 2)).unwrap();
    assert_eq!(used, 65532u16.wrapping_add(6));
    let who = rig.completers.lock().unwrap().clone();
    assert!(
        !who[&4].contains("-io") && !who[&5].contains("-io"),
        "{who:?}"
    );
    // Head 2 finished during the pass: the pass recorded it. The others were completed by
    // their executors outside a pass.
    assert!(!who[&2].contains("-io"), "{who:?}");
    assert!([0, 1, 3].iter().all(|h| who[h].contains("-io")), "{who:?}");
    let n = rig.check_every_instant();
    assert!(n >= 6 * 5, "only {n} instants frozen");
}

/// The serial path (`--max-inflight 1`) across the wrap: every instant recovers exactly.
#[test]
fn reconnect_every_instant_of_serial_completions_resubmits_exactly_the_unpublished() {
    let rig = Rig::new(1, 65534);
    for id in 0..3u64 {
        rig.submit(id as u16 * 3, id);
    }
    rig.pass(true);
    rig.submit(1, 3);
    rig.pass(true);
    let n = rig.check_every_instant();
    assert!(n >= 4 * 5, "only {n} instants frozen");
}

fn used_index(m: &GuestMemoryMmap) -> u16 {
    m.read_obj(GuestAddress(USED + 2)).unwrap()
}

/// A daemon killed with requests popped and executing, one completed but not on the used ring
/// (or on it with its mark not cleared, its head already reused by the guest), and a head the
/// guest reused after a visible completion: the restarted daemon (the real resubmission and
/// pop paths) completes every request the driver has not seen complete exactly once, and
/// writes each of them once.
#[test]
fn reconnect_a_restarted_daemon_completes_popped_unpublished_and_reused_heads_once_each() {
    let rig = Rig::new(4, 65533);
    for id in [0u64, 1, 4] {
        rig.disk.gate(id);
    }
    for id in 0..3u64 {
        rig.submit(id as u16, id);
    }
    rig.pass(false);
    rig.wait_completed(2);
    // The driver saw head 2 complete and reuses it.
    rig.submit(2, 4);
    rig.pass(false);
    rig.disk.open(1);
    rig.wait_completed(1);
    // Copies, so that a failed assertion below poisons no lock the old daemon's hooks take.
    let at = |stage: Stage, head: u16| {
        rig.frozen
            .lock()
            .unwrap()
            .iter()
            .find(|f| f.stage == stage && f.head == head)
            .unwrap()
            .clone()
    };
    // (a) Killed while 1's completion is half recorded (not visible): 0 and 4 are executing.
    // (b) Killed after 1 reached the used ring, before its mark was cleared; the driver, having
    //     seen it, reuses head 1 for request 6 before the new daemon starts.
    for (f, reuse) in [
        (at(Stage::Completing, 1), false),
        (at(Stage::Published, 1), true),
    ] {
        let new = Rig::restarted(4, &f);
        let before = used_index(&new.mem.memory());
        new.submit(5, 5);
        let mut expect = vec![0u64, 4, 5];
        if reuse {
            new.submit(1, 6);
            expect.push(6);
        } else {
            expect.push(1);
        }
        new.pass(false);
        new.wait_idle();
        let m = new.mem.memory();
        let mut got = ring_ids(&m, before, used_index(&m), |pos| {
            m.read_obj::<u32>(GuestAddress(USED + 4 + 8 * pos)).unwrap() as u16
        });
        got.sort_unstable();
        expect.sort_unstable();
        assert_eq!(got, expect, "killed after {:?} of head 1", f.stage);
        let writes = new.disk.writes.lock().unwrap().clone();
        let once: HashMap<u64, usize> = expect.iter().map(|&id| (id, 1)).collect();
        assert_eq!(writes, once, "killed after {:?} of head 1", f.stage);
    }
}

/// A hostile or stale buffer (marks on heads the driver has not made available, equal and huge
/// counters): no panic, nothing resubmitted, and the ring keeps serving new requests once.
#[test]
fn reconnect_a_buffer_marking_more_chains_than_the_driver_has_outstanding_resubmits_nothing() {
    let rig = Rig::new(1, 65535);
    rig.submit(0, 0);
    rig.pass(true);
    let mut f = {
        let frozen = rig.frozen.lock().unwrap();
        let last = frozen.last().unwrap();
        Frozen {
            start: last.start,
            stage: last.stage,
            head: last.head,
            region: last.region.clone(),
            mem: snapshot_mem(&rig.mem.memory()),
        }
    };
    for (head, counter) in [(0usize, 7u64), (3, 7), (9, u64::MAX)] {
        f.region[16 + 16 * head] = 1;
        f.region[16 + 16 * head + 8..16 + 16 * head + 16].copy_from_slice(&counter.to_le_bytes());
    }
    let new = Rig::restarted(1, &f);
    let before = used_index(&new.mem.memory());
    new.pass(true);
    assert_eq!(
        used_index(&new.mem.memory()),
        before,
        "something was resubmitted"
    );
    new.submit(4, 4);
    new.pass(true);
    let m = new.mem.memory();
    let got = ring_ids(&m, before, used_index(&m), |pos| {
        m.read_obj::<u32>(GuestAddress(USED + 4 + 8 * pos)).unwrap() as u16
    });
    assert_eq!(got, vec![4]);
    assert_eq!(
        *new.disk.writes.lock().unwrap(),
        HashMap::from([(4u64, 1usize)])
    );
}
