//! Reconnection with in-flight tracking (`VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD`): a snapblk
//! started on the socket of one that died resubmits every request the guest had in flight,
//! exactly once in effect.
//!
//! The frontend (QEMU) keeps a shared buffer for the backend across reconnections. The backend
//! hands it out once (`GET_INFLIGHT_FD`, [`InflightFile::fresh`]), and the frontend passes it to
//! every backend it connects to (`SET_INFLIGHT_FD`, [`InflightRegion::map`]). For each queue the
//! buffer holds, in the split-ring layout of QEMU's docs/interop/vhost-user.rst ("Inflight I/O
//! tracking"):
//!
//! ```text
//! u64 features | u16 version | u16 desc_num | u16 last_batch_head | u16 used_idx   (16 bytes)
//! desc_num x { u8 inflight | u8 padding[5] | u16 next | u64 counter }            (16 bytes each)
//! ```
//!
//! The backend (and only the backend) writes it:
//! - a descriptor chain popped from the available ring is marked `inflight = 1` with a growing
//!   `counter` ([`QueueInflight::popped`]) before anything else is done with it;
//! - completing it: `last_batch_head = head` ([`QueueInflight::completing`]), then the used
//!   element and the used index go to guest memory, then `inflight = 0` and `used_idx` = the new
//!   used index ([`QueueInflight::completed`]). All three steps happen under the queue's vring
//!   lock, so completions of one queue are one at a time and `last_batch_head` names the only
//!   request whose completion may be half recorded.
//!
//! Recovery ([`QueueInflight::recover`], run by the queue thread before its first pass after
//! the ring started): if the buffer's `used_idx` differs from the used index in guest memory,
//! the backend died between publishing the used element and clearing the descriptor, so
//! `last_batch_head` is done and is cleared. Every descriptor still marked is in flight: it was
//! popped and never reached the guest. Their number `n` fixes where the available ring resumes
//! (`used_idx + n`: each pop adds one to the available position, each completion one to the used
//! index, and every popped chain is either completed or still marked), whatever base the
//! frontend restored. The chains are then executed again in the order they were first popped
//! (by `counter`) and completed as usual. Re-executing a request is harmless: a read reads, a
//! write writes the same bytes to the same place, a flush flushes, discard and write-zeroes are
//! idempotent, and the guest never saw any of them complete; requests the guest had in flight
//! together have no order between them, so running one again after another is a legal outcome.
//!
//! Stores to the buffer are atomic, in program order (release), so a SIGKILL at any instruction
//! leaves one of the states above.
//!
//! Locking model: a [`QueueInflight`] is used only under its queue's vring lock (pop and
//! completion both hold it); the region is shared by the queues, each touching its own part.
//! The [`crate::vhu_blk::VhostUserBlk`] keeps the current region behind a mutex that is taken
//! only to swap it (SET_INFLIGHT_FD) or clone a queue's handle at the start of a pass.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU16, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;

use log::{error, info, warn};
use vhost::vhost_user::message::VhostUserInflight;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemory;

use crate::shared_map::SharedMap;

/// Version written into a queue's header the first time the backend uses it.
const INFLIGHT_VERSION: u16 = 1;
/// Bytes of a queue's header and of one descriptor state.
const HEADER_LEN: usize = 16;
const DESC_LEN: usize = 16;
/// Each queue's part starts on this alignment.
const QUEUE_ALIGN: usize = 64;
/// Upper bound of a buffer we map (65535 queues of 32768 entries would be 32 GiB: refuse).
const MAX_REGION: u64 = 64 << 20;

/// Bytes of one queue's part of the buffer for `queue_size` descriptors.
pub fn queue_region_len(queue_size: u16) -> usize {
    let raw = HEADER_LEN + DESC_LEN * usize::from(queue_size);
    raw.div_ceil(QUEUE_ALIGN) * QUEUE_ALIGN
}

/// The memfd that backs the buffers this daemon hands out. Created at start-up, before the
/// system-call filter forbids `memfd_create`; each `GET_INFLIGHT_FD` zeroes it and hands out a
/// duplicate. A frontend asks again only after a device reset, when it has dropped the previous
/// buffer, and the daemon serves one frontend at a time.
#[derive(Debug)]
pub struct InflightFile {
    file: File,
}

impl InflightFile {
    /// Creates the (empty) memfd.
    pub fn create() -> io::Result<Self> {
        // SAFETY: the name is a valid NUL-terminated string; the flags are valid.
        let fd = unsafe { libc::memfd_create(c"snapblk-inflight".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a new descriptor owned by nobody else.
        let file = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        Ok(InflightFile { file })
    }

    /// A zeroed buffer for `msg.num_queues` queues of `msg.queue_size` entries: its description
    /// and a descriptor of the file (for the frontend).
    pub fn fresh(&self, msg: &VhostUserInflight) -> io::Result<(VhostUserInflight, File)> {
        let size = (queue_region_len(msg.queue_size) as u64)
            .checked_mul(u64::from(msg.num_queues))
            .filter(|&s| s > 0 && s <= MAX_REGION)
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "inflight buffer for {} queues of {} is out of range",
                        msg.num_queues, msg.queue_size
                    ),
                )
            })?;
        // Never shrink the file (a mapping of it may still exist; shrinking would make its
        // tail fault): zero the part handed out, grow if needed.
        let len = self.file.metadata()?.len();
        if len < size {
            self.file.set_len(size)?;
        }
        let zeros = vec![0u8; 64 << 10];
        let mut off = 0u64;
        while off < size {
            let n = usize::try_from((size - off).min(zeros.len() as u64)).unwrap_or(zeros.len());
            std::os::unix::fs::FileExt::write_all_at(&self.file, &zeros[..n], off)?;
            off += n as u64;
        }
        let desc = VhostUserInflight::new(size, 0, msg.num_queues, msg.queue_size);
        Ok((desc, self.file.try_clone()?))
    }
}

/// A frontend's in-flight buffer, mapped shared.
pub struct InflightRegion {
    map: SharedMap,
    num_queues: u16,
    queue_size: u16,
    /// Test hook called after every store to the buffer (see [`Stage`]).
    #[cfg(test)]
    hook: std::sync::OnceLock<TestHook>,
}

impl std::fmt::Debug for InflightRegion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InflightRegion")
            .field("len", &self.map.len())
            .field("num_queues", &self.num_queues)
            .field("queue_size", &self.queue_size)
            .finish()
    }
}

/// The points of the protocol after which a test hook runs: each follows one store to the
/// buffer (or to the used ring), so together they are every state a SIGKILL can leave.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// `counter` of the popped chain stored, not yet marked.
    Counted,
    /// Marked in flight.
    Popped,
    /// `last_batch_head` stored, used element not yet written.
    Completing,
    /// Used element and used index written (visible to the driver), mark not yet cleared.
    Published,
    /// Mark cleared, `used_idx` not yet stored.
    Cleared,
    /// `used_idx` stored: the completion is fully recorded.
    Completed,
    /// Recovery cleared the mark of `last_batch_head`, `used_idx` not yet reconciled.
    Reconciled,
}

/// A test hook: the queue's handle, the stage just reached and the head concerned.
#[cfg(test)]
pub type TestHook = Box<dyn Fn(&QueueInflight, Stage, u16) + Send + Sync>;

// SAFETY: the mapping is plain shared memory accessed only through atomics; each queue's part is
// used by one thread at a time (under its vring lock).
unsafe impl Send for InflightRegion {}
// SAFETY: as above.
unsafe impl Sync for InflightRegion {}

impl InflightRegion {
    /// Maps the buffer `msg` describes in `file`, after checking that it is large enough for its
    /// queues and lies inside the file (a mapping past the end would fault on first use).
    pub fn map(msg: &VhostUserInflight, file: &File) -> io::Result<Arc<Self>> {
        let bad = |why: String| io::Error::new(io::ErrorKind::InvalidInput, why);
        let need = (queue_region_len(msg.queue_size) as u64) * u64::from(msg.num_queues);
        if msg.num_queues == 0 || msg.queue_size == 0 || msg.mmap_size < need {
            return Err(bad(format!(
                "inflight buffer of {} bytes cannot hold {} queues of {}",
                msg.mmap_size, msg.num_queues, msg.queue_size
            )));
        }
        if msg.mmap_size > MAX_REGION {
            return Err(bad(format!(
                "inflight buffer of {} bytes is too large",
                msg.mmap_size
            )));
        }
        // SAFETY: sysconf has no memory-safety preconditions.
        let page = u64::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
        if !msg.mmap_offset.is_multiple_of(page) {
            return Err(bad(format!(
                "inflight buffer offset {} is not page aligned",
                msg.mmap_offset
            )));
        }
        let file_len = file.metadata()?.len();
        if msg
            .mmap_offset
            .checked_add(msg.mmap_size)
            .is_none_or(|end| end > file_len)
        {
            return Err(bad(format!(
                "inflight buffer ({} bytes at {}) reaches past the end of its {}-byte file",
                msg.mmap_size, msg.mmap_offset, file_len
            )));
        }
        let len = usize::try_from(msg.mmap_size).map_err(|e| bad(e.to_string()))?;
        // A range checked above to lie inside the file.
        let map = SharedMap::new(file, msg.mmap_offset, len)?;
        Ok(Arc::new(InflightRegion {
            map,
            num_queues: msg.num_queues,
            queue_size: msg.queue_size,
            #[cfg(test)]
            hook: std::sync::OnceLock::new(),
        }))
    }

    /// Installs the test hook (once per region).
    #[cfg(test)]
    pub fn set_test_hook(&self, hook: TestHook) {
        assert!(self.hook.set(hook).is_ok(), "test hook already set");
    }

    /// A copy of the whole buffer, as a frontend would keep it after the daemon died here.
    #[cfg(test)]
    pub fn snapshot(&self) -> Vec<u8> {
        (0..self.map.len())
            // SAFETY: in bounds of the mapping; a volatile byte read of shared memory.
            .map(|i| unsafe { std::ptr::read_volatile(self.map.as_ptr().add(i)) })
            .collect()
    }

    /// The handle of queue `index` whose ring has `ring_size` entries, or `None` if the buffer
    /// has no part for it (the frontend described fewer queues or smaller ones).
    pub fn queue(self: &Arc<Self>, index: usize, ring_size: u16) -> Option<QueueInflight> {
        if index >= usize::from(self.num_queues) || ring_size > self.queue_size {
            return None;
        }
        let offset = index * queue_region_len(self.queue_size);
        Some(QueueInflight {
            region: Arc::clone(self),
            offset,
            desc_num: self.queue_size,
            counter: AtomicU64::new(0),
        })
    }
}

/// One queue's part of the in-flight buffer.
#[derive(Debug)]
pub struct QueueInflight {
    region: Arc<InflightRegion>,
    offset: usize,
    desc_num: u16,
    /// The counter given to the next popped chain.
    counter: AtomicU64,
}

impl QueueInflight {
    fn at<T>(&self, off: usize) -> &T {
        let end = self.offset + off + std::mem::size_of::<T>();
        assert!(
            end <= self.region.map.len(),
            "inflight field outside the mapping"
        );
        // SAFETY: in bounds of the mapping (checked above), naturally aligned (the mapping is
        // page aligned, each queue part 64-byte aligned, every field at a multiple of its size),
        // and only ever accessed through atomics of this type.
        unsafe { &*self.region.map.as_ptr().add(self.offset + off).cast::<T>() }
    }

    /// Runs the test hook, if any, at `stage` (nothing outside tests).
    #[inline]
    fn hook(&self, _stage: Stage, _head: u16) {
        #[cfg(test)]
        if let Some(h) = self.region.hook.get() {
            h(self, _stage, _head);
        }
    }

    /// The buffer this handle is a part of.
    #[cfg(test)]
    pub fn region(&self) -> &Arc<InflightRegion> {
        &self.region
    }

    fn version(&self) -> &AtomicU16 {
        self.at(8)
    }
    fn desc_num_field(&self) -> &AtomicU16 {
        self.at(10)
    }
    fn last_batch_head(&self) -> &AtomicU16 {
        self.at(12)
    }
    fn used_idx(&self) -> &AtomicU16 {
        self.at(14)
    }
    fn inflight(&self, head: u16) -> &AtomicU8 {
        self.at(HEADER_LEN + DESC_LEN * usize::from(head))
    }
    fn counter_of(&self, head: u16) -> &AtomicU64 {
        self.at(HEADER_LEN + DESC_LEN * usize::from(head) + 8)
    }

    /// Records that the chain at `head` was popped from the available ring.
    pub fn popped(&self, head: u16) {
        if head >= self.desc_num {
            return;
        }
        let c = self.counter.fetch_add(1, Ordering::Relaxed);
        self.counter_of(head).store(c, Ordering::Release);
        self.hook(Stage::Counted, head);
        self.inflight(head).store(1, Ordering::Release);
        self.hook(Stage::Popped, head);
        test_abort_point("popped");
    }

    /// Before the used element for `head` is written.
    pub fn completing(&self, head: u16) {
        if head < self.desc_num {
            self.last_batch_head().store(head, Ordering::Release);
            self.hook(Stage::Completing, head);
        }
    }

    /// After the used element for `head` was published and the used index is `used_idx`.
    pub fn completed(&self, head: u16, used_idx: u16) {
        if head < self.desc_num {
            self.inflight(head).store(0, Ordering::Release);
            self.hook(Stage::Cleared, head);
        }
        self.used_idx().store(used_idx, Ordering::Release);
        self.hook(Stage::Completed, head);
    }

    /// Clears the marks of `heads` (a buffer found not to describe its ring).
    pub fn forget(&self, heads: &[u16]) {
        for &head in heads {
            if head < self.desc_num {
                self.inflight(head).store(0, Ordering::Release);
            }
        }
    }

    /// Reconciles the buffer with `guest_used_idx` (the used index in guest memory) and returns
    /// the heads still in flight, oldest first. Heads outside a ring of `ring_size` entries are
    /// cleared and not returned (no chain can sit there). A buffer never used before is
    /// initialised and yields nothing.
    pub fn recover(&self, guest_used_idx: u16, ring_size: u16) -> Vec<u16> {
        if self.version().load(Ordering::Acquire) == 0 {
            self.desc_num_field()
                .store(self.desc_num, Ordering::Release);
            self.used_idx().store(guest_used_idx, Ordering::Release);
            self.version().store(INFLIGHT_VERSION, Ordering::Release);
            return Vec::new();
        }
        if self.used_idx().load(Ordering::Acquire) != guest_used_idx {
            // Died after publishing the used element of `last_batch_head`, before clearing it.
            let head = self.last_batch_head().load(Ordering::Acquire);
            if head < self.desc_num {
                self.inflight(head).store(0, Ordering::Release);
                self.hook(Stage::Reconciled, head);
            }
            self.used_idx().store(guest_used_idx, Ordering::Release);
        }
        let mut heads: Vec<(u64, u16)> = Vec::new();
        for head in 0..self.desc_num {
            match self.inflight(head).load(Ordering::Acquire) {
                0 => {}
                1 if head < ring_size => {
                    heads.push((self.counter_of(head).load(Ordering::Acquire), head));
                }
                other => {
                    warn!("inflight buffer: descriptor {head} has state {other} (ring size {ring_size}), dropped");
                    self.inflight(head).store(0, Ordering::Release);
                }
            }
        }
        heads.sort_unstable();
        let next = heads.last().map_or(0, |&(c, _)| c.wrapping_add(1));
        self.counter.store(next, Ordering::Relaxed);
        heads.into_iter().map(|(_, h)| h).collect()
    }
}

/// Test hook: `SNAPBLK_TEST_ABORT_AT=STAGE:N` aborts the daemon (SIGABRT, like a SIGKILL: no
/// unwinding, no flush) the `N`th time a request reaches `STAGE`: `popped` (marked in flight,
/// not executed), `executing` (its crash-journal record appended, its lower operation not
/// run), `persisted` (a write in place below, its crash-journal marker not yet appended),
/// `executed` (its disk operation returned, not yet on the used ring) or `published` (on the
/// used ring, its in-flight mark not yet cleared). Used by
/// tests/tests/reconnect_inflight.rs; unset in production (one relaxed load per request).
pub fn test_abort_point(stage: &str) {
    use std::sync::atomic::AtomicUsize;
    use std::sync::OnceLock;
    static SPEC: OnceLock<Option<(String, usize)>> = OnceLock::new();
    static COUNT: AtomicUsize = AtomicUsize::new(0);
    let spec = SPEC.get_or_init(|| {
        let v = std::env::var("SNAPBLK_TEST_ABORT_AT").ok()?;
        let (s, n) = v.split_once(':')?;
        Some((s.to_string(), n.parse().ok()?))
    });
    if let Some((s, n)) = spec {
        if s == stage && COUNT.fetch_add(1, Ordering::SeqCst) + 1 == *n {
            log::error!("test hook: aborting at stage {stage} (request {n})");
            std::process::abort();
        }
    }
}

/// Adds a used element for `head` to `queue`, recording the completion in `track` around it
/// (see the module documentation for the order).
pub fn add_used_tracked<M: GuestMemory>(
    queue: &mut Queue,
    mem: &M,
    head: u16,
    len: u32,
    track: Option<&QueueInflight>,
) -> Result<(), virtio_queue::Error> {
    test_abort_point("executed");
    if let Some(t) = track {
        t.completing(head);
    }
    queue.add_used(mem, head, len)?;
    if let Some(t) = track {
        t.hook(Stage::Published, head);
    }
    test_abort_point("published");
    if let Some(t) = track {
        t.completed(head, queue.next_used());
    }
    Ok(())
}

/// Recovery of one queue after its ring started: returns the heads to execute again (oldest
/// first) after moving the queue's available position past every chain still in flight.
pub fn recover_queue<M: GuestMemory>(
    queue: &mut Queue,
    mem: &M,
    track: &QueueInflight,
    queue_index: usize,
) -> Result<Vec<u16>, virtio_queue::Error> {
    let used = queue.used_idx(mem, Ordering::Acquire)?.0;
    let avail = queue.avail_idx(mem, Ordering::Acquire)?.0;
    let heads = track.recover(used, queue.size());
    // Every chain in flight was taken from the available ring and is not on the used ring: a
    // buffer marking more chains than the driver has outstanding is not this ring's (a
    // frontend's bug, or a buffer from before a reset). Nothing it says can be trusted, and
    // running a chain twice is worse than not running it: resubmit none, resume after the
    // driver's last request.
    let outstanding = avail.wrapping_sub(used);
    if heads.len() > usize::from(outstanding) {
        error!(
            "queue {queue_index}: the inflight buffer marks {} request(s) in flight but the driver has only {outstanding} outstanding; ignoring the buffer and skipping those {outstanding}",
            heads.len()
        );
        track.forget(&heads);
        queue.set_next_avail(avail);
        queue.set_next_used(used);
        return Ok(Vec::new());
    }
    let n = u16::try_from(heads.len()).unwrap_or(u16::MAX);
    queue.set_next_avail(used.wrapping_add(n));
    queue.set_next_used(used);
    if !heads.is_empty() {
        info!(
            "queue {queue_index}: resubmitting {} request(s) left in flight by the previous connection",
            heads.len()
        );
    }
    Ok(heads)
}

/// Makes the kick eventfd `fd` readable, so the queue thread runs a pass (and the recovery)
/// as soon as the ring is watched.
pub fn kick(fd: &impl AsRawFd) {
    let one = 1u64.to_ne_bytes();
    // SAFETY: writes 8 bytes from a valid buffer to a descriptor we hold.
    let ret = unsafe { libc::write(fd.as_raw_fd(), one.as_ptr().cast(), one.len()) };
    if ret < 0 {
        warn!("cannot kick the queue: {}", io::Error::last_os_error());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region(queues: u16, size: u16) -> (InflightFile, Arc<InflightRegion>) {
        let f = InflightFile::create().unwrap();
        let (desc, file) = f
            .fresh(&VhostUserInflight::new(0, 0, queues, size))
            .unwrap();
        (f, InflightRegion::map(&desc, &file).unwrap())
    }

    #[test]
    fn a_fresh_buffer_yields_nothing_and_is_initialised() {
        let (_f, r) = region(2, 8);
        let q = r.queue(1, 8).unwrap();
        assert!(q.recover(5, 8).is_empty());
        assert_eq!(q.version().load(Ordering::Relaxed), INFLIGHT_VERSION);
        assert_eq!(q.used_idx().load(Ordering::Relaxed), 5);
    }

    #[test]
    fn inflight_chains_are_returned_oldest_first_and_completed_ones_are_not() {
        let (_f, r) = region(1, 8);
        let q = r.queue(0, 8).unwrap();
        q.recover(0, 8);
        for h in [5, 2, 7, 1] {
            q.popped(h);
        }
        q.completing(2);
        q.completed(2, 1);
        let again = r.queue(0, 8).unwrap();
        assert_eq!(again.recover(1, 8), vec![5, 7, 1]);
    }

    #[test]
    fn a_completion_published_but_not_cleared_is_not_resubmitted() {
        let (_f, r) = region(1, 8);
        let q = r.queue(0, 8).unwrap();
        q.recover(0, 8);
        q.popped(3);
        q.popped(4);
        q.completing(4);
        // Died here: the guest's used index already says 1.
        let again = r.queue(0, 8).unwrap();
        assert_eq!(again.recover(1, 8), vec![3]);
        // Died before the used element was published: still in flight.
        again.popped(6);
        again.completing(6);
        let third = r.queue(0, 8).unwrap();
        assert_eq!(third.recover(1, 8), vec![3, 6]);
    }

    #[test]
    fn a_buffer_too_small_or_past_its_file_is_refused() {
        let f = InflightFile::create().unwrap();
        let (desc, file) = f.fresh(&VhostUserInflight::new(0, 0, 1, 8)).unwrap();
        let mut small = desc;
        small.num_queues = 4;
        assert!(InflightRegion::map(&small, &file).is_err());
        let mut past = desc;
        past.mmap_offset = 4096;
        assert!(InflightRegion::map(&past, &file).is_err());
        assert!(f
            .fresh(&VhostUserInflight::new(0, 0, u16::MAX, u16::MAX))
            .is_err());
    }
}
