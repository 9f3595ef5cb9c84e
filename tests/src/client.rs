//! Userspace vhost-user-blk client on top of libblkio's pure-Rust `blkio` crate.
//!
//! Owns: one connection to a vhost-user-blk socket (driver `virtio-blk-vhost-user`), the shared
//! memory region that carries request payloads, and per-virtqueue request bookkeeping (which
//! payload slots and request ids are in flight). It lets integration tests and the benchmark talk
//! to a vhost-user-blk daemon (snapblk or qemu-storage-daemon) without booting a guest.
//!
//! Two ways to issue I/O:
//! - synchronous, byte-addressed: [`Client::read`], [`Client::write`], [`Client::flush`],
//!   [`Client::discard`], [`Client::write_zeroes`] (and the same on a locked [`Queue`]). Payloads
//!   are copied through a bounce slot of the shared region and split into chunks the device
//!   accepts (`size_max`/`max-transfer`, discard and write-zeroes limits).
//! - asynchronous, queue-depth capable: lock a [`Queue`] with [`Client::queue`], fill payload
//!   slots with [`Queue::slot_mut`], [`Queue::submit`] [`Op`]s tagged with a caller value, and reap
//!   [`IoCompletion`]s with [`Queue::wait`]. This is what `snapblk-bench` uses.
//!
//! Memory model: all payload memory lives in one region allocated with `Blkio::alloc_mem_region`
//! and registered with the daemon through `Blkio::map_mem_region` (vhost-user `ADD_MEM_REG`, so the
//! daemon must offer `CONFIGURE_MEM_SLOTS`). The region is cut into `slots_per_queue` slots of
//! `slot_size` bytes per queue. A slot that belongs to a request still in flight is neither handed
//! out nor reused; a request that timed out keeps its slot until its completion does arrive,
//! because the daemon may still write into it.
//!
//! Locking model: each virtqueue sits in its own `Mutex<Queue>`, and a request takes only that
//! lock, so threads driving different queues never contend. The `Blkio` handle is only used while
//! connecting and is then kept (behind a `Mutex`, to make `Client` `Sync`) for the lifetime of the
//! client. Queues are dropped before the `Blkio` handle.
//!
//! Limits: offsets must be multiples of 512 (the virtio-blk sector); lengths are passed through
//! unchanged so tests can probe how a daemon handles odd requests. Every wait is bounded by
//! [`ClientConfig::timeout`], so a dead daemon fails a test instead of hanging it.

use std::collections::VecDeque;
use std::fmt;
use std::mem::MaybeUninit;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use blkio::{Blkio, Blkioq, Errno, ReqFlags};

/// The virtio-blk sector size: every offset and discard/write-zeroes range is counted in these.
pub const SECTOR_SIZE: u64 = 512;

/// Granularity of payload slots (page size), so daemons may use O_DIRECT on them.
const SLOT_ALIGN: usize = 4096;

/// Upper bound on the payload region, to keep a typo in a test from mapping the whole machine.
const MAX_REGION_BYTES: usize = 8 << 30;

/// Largest discard/write-zeroes chunk the wire format can carry (`num_sectors` is a `u32`),
/// rounded down to a 1 MiB boundary.
const MAX_DWZ_CHUNK: u64 = ((u32::MAX as u64) * SECTOR_SIZE) & !((1 << 20) - 1);

/// The blkio driver name for vhost-user-blk.
const DRIVER: &str = "virtio-blk-vhost-user";

/// What went wrong while connecting to or talking to a vhost-user-blk device.
///
/// Variants are named after the action that failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Creating the blkio instance, setting properties or connecting to the socket failed.
    #[error("connecting to {path}: {source}")]
    Connect {
        path: PathBuf,
        #[source]
        source: blkio::Error,
    },
    /// Reading a device property (capacity, limits) failed.
    #[error("reading device property {name}: {source}")]
    ReadProperty {
        name: &'static str,
        #[source]
        source: blkio::Error,
    },
    /// Starting the virtqueues failed (for example more queues than the device offers).
    #[error("starting {num_queues} queue(s) (device offers {max_queues}): {source}")]
    Start {
        num_queues: usize,
        max_queues: usize,
        #[source]
        source: blkio::Error,
    },
    /// Allocating or registering the payload memory region failed.
    #[error("mapping the {len}-byte payload region: {source}")]
    MapMemory {
        len: usize,
        #[source]
        source: blkio::Error,
    },
    /// Waiting for completions failed inside blkio (not a timeout).
    #[error("waiting for completions on queue {queue}: {source}")]
    Wait {
        queue: usize,
        #[source]
        source: blkio::Error,
    },
    /// No completion arrived within the configured timeout.
    #[error("timed out after {timeout:?} waiting for completions on queue {queue}")]
    Timeout { queue: usize, timeout: Duration },
    /// The device (or blkio on its behalf) completed the request with an error.
    #[error("{op} at offset {offset} length {len} failed: {status}")]
    Request {
        op: &'static str,
        offset: u64,
        len: u64,
        status: RequestStatus,
    },
    /// The caller passed something this client cannot submit (bad slot, queue index, config).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// Every request id or payload slot of the queue is in use.
    #[error("queue {queue} is full ({in_flight} requests in flight)")]
    QueueFull { queue: usize, in_flight: usize },
}

/// Result type of every client operation.
pub type Result<T> = std::result::Result<T, ClientError>;

/// Why a request failed, as reported in its completion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestStatus {
    /// The device answered `VIRTIO_BLK_S_IOERR` (blkio reports `-EIO`).
    IoErr,
    /// The device answered `VIRTIO_BLK_S_UNSUPP`, or the feature was not negotiated (`-ENOTSUP`).
    Unsupported,
    /// Any other negative errno (for example `EINVAL` for an unaligned offset, `EBADF` for a
    /// write to a read-only connection, `EPROTO` for an unknown status byte).
    Errno(i32),
}

impl RequestStatus {
    /// Maps a blkio completion return value to `Ok(())` or the failure it describes.
    pub fn from_ret(ret: i32) -> std::result::Result<(), RequestStatus> {
        if ret >= 0 {
            return Ok(());
        }
        let errno = ret.checked_neg().unwrap_or(i32::MAX);
        Err(if errno == libc::EIO {
            RequestStatus::IoErr
        } else if errno == libc::ENOTSUP || errno == libc::EOPNOTSUPP {
            RequestStatus::Unsupported
        } else {
            RequestStatus::Errno(errno)
        })
    }
}

impl fmt::Display for RequestStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RequestStatus::IoErr => write!(f, "I/O error (VIRTIO_BLK_S_IOERR)"),
            RequestStatus::Unsupported => write!(f, "unsupported (VIRTIO_BLK_S_UNSUPP)"),
            RequestStatus::Errno(e) => {
                write!(f, "errno {e} ({})", std::io::Error::from_raw_os_error(*e))
            }
        }
    }
}

/// How to set up a connection.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Number of virtqueues to start (at most what the device offers).
    pub num_queues: usize,
    /// Ring size of each virtqueue (a power of two); also the cap on requests in flight per queue.
    pub queue_size: u16,
    /// Payload slots per queue (the most data requests a queue can have in flight).
    pub slots_per_queue: usize,
    /// Bytes per payload slot (a positive multiple of 4096); bigger sync I/O is split.
    pub slot_size: usize,
    /// Open the device read-only (required if the device offers `VIRTIO_BLK_F_RO`).
    pub read_only: bool,
    /// Longest time any wait for a completion may take before [`ClientError::Timeout`].
    pub timeout: Duration,
}

impl ClientConfig {
    /// Defaults for `num_queues` queues: ring size 256, 32 slots of 1 MiB each, 30 s timeout.
    pub fn new(num_queues: usize) -> Self {
        ClientConfig {
            num_queues,
            queue_size: 256,
            slots_per_queue: 32,
            slot_size: 1 << 20,
            read_only: false,
            timeout: Duration::from_secs(30),
        }
    }

    fn validate(&self) -> Result<usize> {
        let bad = |m: String| Err(ClientError::InvalidArgument(m));
        if self.num_queues == 0 {
            return bad("num_queues must be at least 1".into());
        }
        if self.queue_size == 0 || !self.queue_size.is_power_of_two() {
            return bad(format!(
                "queue_size {} is not a power of two",
                self.queue_size
            ));
        }
        if self.slots_per_queue == 0 {
            return bad("slots_per_queue must be at least 1".into());
        }
        if self.slot_size == 0 || !self.slot_size.is_multiple_of(SLOT_ALIGN) {
            return bad(format!(
                "slot_size {} is not a positive multiple of {SLOT_ALIGN}",
                self.slot_size
            ));
        }
        let total = self
            .num_queues
            .checked_mul(self.slots_per_queue)
            .and_then(|n| n.checked_mul(self.slot_size))
            .filter(|&t| t <= MAX_REGION_BYTES);
        match total {
            Some(t) => Ok(t),
            None => bad(format!(
                "{} queues x {} slots x {} bytes exceeds {MAX_REGION_BYTES} bytes",
                self.num_queues, self.slots_per_queue, self.slot_size
            )),
        }
    }
}

/// What the device reported at connect time (blkio properties).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Size of the disk in bytes.
    pub capacity: u64,
    /// Most virtqueues the device offers.
    pub max_queues: usize,
    /// Logical block size (`blk_size`), the smallest I/O the device wants.
    pub request_alignment: u32,
    /// Largest bytes per request (`size_max * seg_max`), 0 if the device does not say.
    pub max_transfer: u64,
    /// Largest bytes per segment (`size_max`), 0 if the device does not say.
    pub max_segment_len: u64,
    /// Largest discard in bytes, 0 if discard is not offered (or unlimited).
    pub max_discard_len: u64,
    /// Largest write-zeroes in bytes, 0 if write-zeroes is not offered (or unlimited).
    pub max_write_zeroes_len: u64,
    /// Whether the device has a volatile write cache (writeback), i.e. flushes matter.
    pub flush_needed: bool,
}

/// One request for [`Queue::submit`]. Payloads live in the queue's slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Read `len` bytes at `offset` into slot `slot`.
    Read {
        slot: usize,
        offset: u64,
        len: usize,
    },
    /// Write `len` bytes of slot `slot` at `offset`; `fua` adds a flush after it (blkio emulates
    /// FUA with a flush request if the device negotiated `VIRTIO_BLK_F_FLUSH`).
    Write {
        slot: usize,
        offset: u64,
        len: usize,
        fua: bool,
    },
    /// Make every completed write durable.
    Flush,
    /// Discard `len` bytes at `offset` (a hint; contents afterwards are device-defined).
    Discard { offset: u64, len: u64 },
    /// Zero `len` bytes at `offset`, deallocating if `unmap` and the device can.
    WriteZeroes { offset: u64, len: u64, unmap: bool },
}

impl Op {
    /// Short lowercase name used in errors and reports.
    pub fn name(&self) -> &'static str {
        match self {
            Op::Read { .. } => "read",
            Op::Write { .. } => "write",
            Op::Flush => "flush",
            Op::Discard { .. } => "discard",
            Op::WriteZeroes { .. } => "write-zeroes",
        }
    }

    /// The payload slot the request uses, if any.
    pub fn slot(&self) -> Option<usize> {
        match *self {
            Op::Read { slot, .. } | Op::Write { slot, .. } => Some(slot),
            _ => None,
        }
    }

    fn offset(&self) -> u64 {
        match *self {
            Op::Read { offset, .. }
            | Op::Write { offset, .. }
            | Op::Discard { offset, .. }
            | Op::WriteZeroes { offset, .. } => offset,
            Op::Flush => 0,
        }
    }

    fn len(&self) -> u64 {
        match *self {
            Op::Read { len, .. } | Op::Write { len, .. } => len as u64,
            Op::Discard { len, .. } | Op::WriteZeroes { len, .. } => len,
            Op::Flush => 0,
        }
    }

    fn failure(&self, status: RequestStatus) -> ClientError {
        ClientError::Request {
            op: self.name(),
            offset: self.offset(),
            len: self.len(),
            status,
        }
    }
}

/// A finished asynchronous request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IoCompletion {
    /// The caller's tag given to [`Queue::submit`].
    pub tag: u64,
    /// The request as submitted (its slot is free again).
    pub op: Op,
    /// `Ok(())` or why the request failed.
    pub result: std::result::Result<(), RequestStatus>,
}

impl IoCompletion {
    /// The completion as a `Result`, with the failed request described in the error.
    pub fn into_result(self) -> Result<()> {
        self.result.map_err(|s| self.op.failure(s))
    }
}

/// Who waits for a request: a caller of [`Queue::wait`] or a synchronous helper.
#[derive(Debug, Clone, Copy)]
enum Origin {
    Async(u64),
    Sync,
}

#[derive(Debug, Clone, Copy)]
struct InFlight {
    op: Op,
    origin: Origin,
}

/// One started virtqueue with its payload slots. Obtain it with [`Client::queue`].
///
/// Not shared between threads: every method takes `&mut self` (the `Mutex` in [`Client`] provides
/// that), so the bookkeeping below needs no further locking.
pub struct Queue {
    index: usize,
    q: Blkioq,
    /// Address of this queue's first slot inside the mapped payload region.
    slots_addr: usize,
    slot_size: usize,
    slot_busy: Vec<bool>,
    /// Request id (blkio `user_data`) -> request; ids are reused through `free_ids`.
    in_flight: Vec<Option<InFlight>>,
    free_ids: Vec<usize>,
    async_outstanding: usize,
    sync_outstanding: usize,
    ready: VecDeque<IoCompletion>,
    sync_done: Option<(usize, std::result::Result<(), RequestStatus>)>,
    /// The id of the synchronous request being waited for; completions of other (earlier,
    /// timed-out) synchronous requests are dropped, so they can neither overwrite its result
    /// nor be taken for it when an id is reused.
    sync_waiting: Option<usize>,
    cbuf: Vec<MaybeUninit<blkio::Completion>>,
    timeout: Duration,
    /// Largest read/write chunk for the synchronous helpers.
    rw_chunk: usize,
    discard_chunk: u64,
    write_zeroes_chunk: u64,
}

impl fmt::Debug for Queue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Queue")
            .field("index", &self.index)
            .field("slots", &self.slot_busy.len())
            .field("slot_size", &self.slot_size)
            .field("in_flight", &self.in_flight())
            .finish()
    }
}

/// Why waiting for a synchronous request ended without success.
enum SyncWait {
    Status(RequestStatus),
    Client(ClientError),
}

impl Queue {
    /// Index of this virtqueue.
    pub fn index(&self) -> usize {
        self.index
    }

    /// Changes how long a wait on this queue may take before [`ClientError::Timeout`].
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// Number of payload slots.
    pub fn num_slots(&self) -> usize {
        self.slot_busy.len()
    }

    /// Bytes per payload slot.
    pub fn slot_size(&self) -> usize {
        self.slot_size
    }

    /// Requests submitted and not yet reaped (including completions waiting in [`Queue::wait`]'s
    /// buffer).
    pub fn in_flight(&self) -> usize {
        self.async_outstanding + self.sync_outstanding + self.ready.len()
    }

    fn slot_ptr(&self, slot: usize) -> Result<*mut u8> {
        if slot >= self.slot_busy.len() {
            return Err(ClientError::InvalidArgument(format!(
                "slot {slot} out of range (queue has {})",
                self.slot_busy.len()
            )));
        }
        // In range by construction: slot < slots_per_queue and the region holds all of them.
        Ok((self.slots_addr + slot * self.slot_size) as *mut u8)
    }

    /// The payload bytes of `slot`, for filling before a write or checking after a read.
    ///
    /// Fails if the slot is out of range or belongs to a request still in flight.
    pub fn slot_mut(&mut self, slot: usize) -> Result<&mut [u8]> {
        let ptr = self.slot_ptr(slot)?;
        if self.slot_busy.get(slot).copied().unwrap_or(true) {
            return Err(ClientError::InvalidArgument(format!(
                "slot {slot} is in flight"
            )));
        }
        // SAFETY: `ptr` points at `slot_size` bytes inside the payload region, which stays mapped
        // read/write while `self.q` (which holds blkio's region registry) lives. The slot is not in
        // flight, so no request of ours lets the device touch it, and `&mut self` makes this the
        // only borrow of it on our side.
        Ok(unsafe { std::slice::from_raw_parts_mut(ptr, self.slot_size) })
    }

    /// Read-only view of `slot` (same rules as [`Queue::slot_mut`]).
    pub fn slot(&mut self, slot: usize) -> Result<&[u8]> {
        self.slot_mut(slot).map(|s| &*s)
    }

    /// Queues `op` for the device; its completion, carrying `tag`, comes out of [`Queue::wait`].
    ///
    /// Fails without submitting if the slot is invalid or busy, the length exceeds the slot, or
    /// `queue_size` requests are already in flight.
    pub fn submit(&mut self, op: Op, tag: u64) -> Result<()> {
        self.submit_inner(op, Origin::Async(tag)).map(|_| ())
    }

    fn submit_inner(&mut self, op: Op, origin: Origin) -> Result<usize> {
        let buf = match op {
            Op::Read { slot, len, .. } | Op::Write { slot, len, .. } => {
                let ptr = self.slot_ptr(slot)?;
                if self.slot_busy.get(slot).copied().unwrap_or(true) {
                    return Err(ClientError::InvalidArgument(format!(
                        "slot {slot} is already in flight"
                    )));
                }
                if len > self.slot_size {
                    return Err(ClientError::InvalidArgument(format!(
                        "length {len} exceeds slot size {}",
                        self.slot_size
                    )));
                }
                Some((slot, ptr, len))
            }
            _ => None,
        };
        let id = self.free_ids.pop().ok_or(ClientError::QueueFull {
            queue: self.index,
            in_flight: self.in_flight(),
        })?;
        // The raw pointers below stay valid until the completion is reaped: the slot is marked
        // busy (so `slot_mut` refuses it) and the region outlives `self.q`.
        match (op, buf) {
            (Op::Read { offset, .. }, Some((_, ptr, len))) => {
                self.q.read(offset, ptr, len, id, ReqFlags::empty())
            }
            (Op::Write { offset, fua, .. }, Some((_, ptr, len))) => {
                let flags = if fua {
                    ReqFlags::FUA
                } else {
                    ReqFlags::empty()
                };
                self.q.write(offset, ptr, len, id, flags)
            }
            (Op::Flush, _) => self.q.flush(id, ReqFlags::empty()),
            (Op::Discard { offset, len }, _) => self.q.discard(offset, len, id, ReqFlags::empty()),
            (Op::WriteZeroes { offset, len, unmap }, _) => {
                let flags = if unmap {
                    ReqFlags::empty()
                } else {
                    ReqFlags::NO_UNMAP
                };
                self.q.write_zeroes(offset, len, id, flags)
            }
            // Read/Write always carry a buffer (checked above).
            (Op::Read { .. } | Op::Write { .. }, None) => {
                self.free_ids.push(id);
                return Err(ClientError::InvalidArgument("missing payload".into()));
            }
        }
        if let Some((slot, _, _)) = buf {
            if let Some(b) = self.slot_busy.get_mut(slot) {
                *b = true;
            }
        }
        if let Some(entry) = self.in_flight.get_mut(id) {
            *entry = Some(InFlight { op, origin });
        }
        match origin {
            Origin::Async(_) => self.async_outstanding += 1,
            Origin::Sync => self.sync_outstanding += 1,
        }
        Ok(id)
    }

    /// Waits until at least `min` completions are available (at most the number of requests in
    /// flight), appends every available completion to `out` and returns how many it appended.
    /// `min == 0` only collects what has already completed.
    pub fn wait(&mut self, min: usize, out: &mut Vec<IoCompletion>) -> Result<usize> {
        let max_possible = self.ready.len() + self.async_outstanding;
        if min > max_possible {
            return Err(ClientError::InvalidArgument(format!(
                "waiting for {min} completions with only {max_possible} outstanding"
            )));
        }
        let deadline = Instant::now() + self.timeout;
        // Always look once (non-blocking when enough are ready) so `out` gets everything
        // that has completed.
        loop {
            let need = min.saturating_sub(self.ready.len());
            self.reap(need.min(1), deadline)?;
            if self.ready.len() >= min {
                break;
            }
        }
        let n = self.ready.len();
        out.extend(self.ready.drain(..));
        Ok(n)
    }

    /// Pulls completions from blkio, blocking until at least `min` (0 or 1 in practice) arrive.
    fn reap(&mut self, min: usize, deadline: Instant) -> Result<()> {
        let outstanding = self.async_outstanding + self.sync_outstanding;
        let min = min.min(outstanding);
        let mut remaining = deadline.saturating_duration_since(Instant::now());
        if min > 0 && remaining.is_zero() {
            return Err(ClientError::Timeout {
                queue: self.index,
                timeout: self.timeout,
            });
        }
        let n = match self
            .q
            .do_io(&mut self.cbuf, min, Some(&mut remaining), None)
        {
            Ok(n) => n,
            Err(e) if e.errno() == Errno::TIME => {
                return Err(ClientError::Timeout {
                    queue: self.index,
                    timeout: self.timeout,
                })
            }
            Err(source) => {
                return Err(ClientError::Wait {
                    queue: self.index,
                    source,
                })
            }
        };
        for i in 0..n.min(self.cbuf.len()) {
            let Some(slot) = self.cbuf.get(i) else { break };
            // SAFETY: `do_io` returned `n` and initialised the first `n` elements of `cbuf`;
            // `blkio::Completion` is plain data, so reading it out does not duplicate ownership.
            let c = unsafe { slot.assume_init_read() };
            self.complete(c.user_data, c.ret);
        }
        Ok(())
    }

    fn complete(&mut self, id: usize, ret: i32) {
        let Some(entry) = self.in_flight.get_mut(id).and_then(Option::take) else {
            log::warn!(
                "queue {}: completion for unknown request id {id}",
                self.index
            );
            return;
        };
        self.free_ids.push(id);
        if let Some(slot) = entry.op.slot() {
            if let Some(b) = self.slot_busy.get_mut(slot) {
                *b = false;
            }
        }
        let result = RequestStatus::from_ret(ret);
        match entry.origin {
            Origin::Async(tag) => {
                self.async_outstanding = self.async_outstanding.saturating_sub(1);
                self.ready.push_back(IoCompletion {
                    tag,
                    op: entry.op,
                    result,
                });
            }
            Origin::Sync => {
                self.sync_outstanding = self.sync_outstanding.saturating_sub(1);
                if self.sync_waiting == Some(id) {
                    self.sync_done = Some((id, result));
                }
            }
        }
    }

    /// Submits `op` and waits for exactly its completion; other completions are kept for
    /// [`Queue::wait`].
    fn run_sync(&mut self, op: Op) -> Result<()> {
        let deadline = Instant::now() + self.timeout;
        let id = loop {
            match self.submit_inner(op, Origin::Sync) {
                Ok(id) => break id,
                // Out of ids: let an asynchronous request finish first.
                Err(ClientError::QueueFull { .. }) if self.async_outstanding > 0 => {
                    self.reap(1, deadline)?
                }
                Err(e) => return Err(e),
            }
        };
        self.sync_done = None;
        self.sync_waiting = Some(id);
        let r = self.wait_sync(id, deadline);
        self.sync_waiting = None;
        r.map_err(|e| match e {
            SyncWait::Status(s) => op.failure(s),
            SyncWait::Client(e) => e,
        })
    }

    fn wait_sync(&mut self, id: usize, deadline: Instant) -> std::result::Result<(), SyncWait> {
        loop {
            if let Some((done, result)) = self.sync_done.take() {
                if done == id {
                    return result.map_err(SyncWait::Status);
                }
            }
            if self.sync_outstanding == 0 {
                // Nothing left that could complete it: never spin on a non-blocking reap.
                return Err(SyncWait::Client(ClientError::Timeout {
                    queue: self.index,
                    timeout: self.timeout,
                }));
            }
            self.reap(1, deadline).map_err(SyncWait::Client)?;
        }
    }

    /// A free slot for a synchronous copy, waiting for asynchronous requests if all are busy.
    fn free_slot(&mut self) -> Result<usize> {
        let deadline = Instant::now() + self.timeout;
        loop {
            if let Some(slot) = self.slot_busy.iter().position(|b| !b) {
                return Ok(slot);
            }
            if self.async_outstanding == 0 {
                return Err(ClientError::QueueFull {
                    queue: self.index,
                    in_flight: self.in_flight(),
                });
            }
            self.reap(1, deadline)?;
        }
    }

    /// Reads `buf.len()` bytes at `offset`, split into device-sized chunks.
    pub fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let slot = self.free_slot()?;
        let mut done = 0usize;
        while done < buf.len() {
            let len = (buf.len() - done).min(self.rw_chunk);
            let off = chunk_offset(offset, done)?;
            self.run_sync(Op::Read {
                slot,
                offset: off,
                len,
            })?;
            let src = self.slot_mut(slot)?;
            let (Some(dst), Some(src)) = (buf.get_mut(done..done + len), src.get(..len)) else {
                return Err(ClientError::InvalidArgument("chunk out of bounds".into()));
            };
            dst.copy_from_slice(src);
            done += len;
        }
        Ok(())
    }

    /// Writes `buf` at `offset`, split into device-sized chunks (each chunk is acknowledged
    /// before the next is sent, so a failure leaves a known prefix written).
    pub fn write(&mut self, offset: u64, buf: &[u8]) -> Result<()> {
        self.write_with(offset, buf, false)
    }

    /// Like [`Queue::write`] but each chunk is written with FUA (durable on completion).
    pub fn write_fua(&mut self, offset: u64, buf: &[u8]) -> Result<()> {
        self.write_with(offset, buf, true)
    }

    fn write_with(&mut self, offset: u64, buf: &[u8], fua: bool) -> Result<()> {
        let slot = self.free_slot()?;
        let mut done = 0usize;
        while done < buf.len() {
            let len = (buf.len() - done).min(self.rw_chunk);
            let off = chunk_offset(offset, done)?;
            let dst = self.slot_mut(slot)?;
            let (Some(dst), Some(src)) = (dst.get_mut(..len), buf.get(done..done + len)) else {
                return Err(ClientError::InvalidArgument("chunk out of bounds".into()));
            };
            dst.copy_from_slice(src);
            self.run_sync(Op::Write {
                slot,
                offset: off,
                len,
                fua,
            })?;
            done += len;
        }
        Ok(())
    }

    /// Sends a flush and waits for it.
    pub fn flush(&mut self) -> Result<()> {
        self.run_sync(Op::Flush)
    }

    /// Discards `len` bytes at `offset`, split at the device's discard limit.
    pub fn discard(&mut self, offset: u64, len: u64) -> Result<()> {
        let chunk = self.discard_chunk;
        for_each_chunk(offset, len, chunk, |offset, len| {
            self.run_sync(Op::Discard { offset, len })
        })
    }

    /// Zeroes `len` bytes at `offset`, split at the device's write-zeroes limit.
    pub fn write_zeroes(&mut self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        let chunk = self.write_zeroes_chunk;
        for_each_chunk(offset, len, chunk, |offset, len| {
            self.run_sync(Op::WriteZeroes { offset, len, unmap })
        })
    }
}

fn chunk_offset(offset: u64, done: usize) -> Result<u64> {
    offset
        .checked_add(done as u64)
        .ok_or_else(|| ClientError::InvalidArgument(format!("offset {offset} + {done} overflows")))
}

/// Calls `f` for consecutive pieces of `[offset, offset + len)` no longer than `chunk`.
/// A zero-length range still issues one request (so tests can probe how a device answers it).
fn for_each_chunk(
    offset: u64,
    len: u64,
    chunk: u64,
    mut f: impl FnMut(u64, u64) -> Result<()>,
) -> Result<()> {
    if len == 0 {
        return f(offset, 0);
    }
    let chunk = chunk.max(SECTOR_SIZE);
    let mut done = 0u64;
    while done < len {
        let piece = (len - done).min(chunk);
        let off = offset.checked_add(done).ok_or_else(|| {
            ClientError::InvalidArgument(format!("offset {offset} + {done} overflows"))
        })?;
        f(off, piece)?;
        done += piece;
    }
    Ok(())
}

/// Rounds `v` down to a multiple of 512, never below 512.
fn sector_floor(v: u64) -> u64 {
    (v & !(SECTOR_SIZE - 1)).max(SECTOR_SIZE)
}

/// A connection to a vhost-user-blk device with `num_queues` started virtqueues.
pub struct Client {
    // Field order matters: queues (and their blkio queues) drop before the driver.
    queues: Vec<Mutex<Queue>>,
    info: DeviceInfo,
    socket: PathBuf,
    _blkio: Mutex<Blkio>,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("socket", &self.socket)
            .field("num_queues", &self.queues.len())
            .field("info", &self.info)
            .finish()
    }
}

fn prop_u64(b: &Blkio, name: &'static str) -> Result<u64> {
    b.get_u64(name)
        .map_err(|source| ClientError::ReadProperty { name, source })
}

fn prop_i32(b: &Blkio, name: &'static str) -> Result<i32> {
    b.get_i32(name)
        .map_err(|source| ClientError::ReadProperty { name, source })
}

impl Client {
    /// Connects to the vhost-user-blk socket at `socket` and starts `num_queues` queues with the
    /// defaults of [`ClientConfig::new`].
    pub fn connect(socket: impl AsRef<Path>, num_queues: usize) -> Result<Client> {
        Self::connect_with(socket, &ClientConfig::new(num_queues))
    }

    /// Connects with an explicit configuration.
    pub fn connect_with(socket: impl AsRef<Path>, config: &ClientConfig) -> Result<Client> {
        let region_len = config.validate()?;
        let path = socket.as_ref().to_path_buf();
        let path_str = path.to_str().ok_or_else(|| {
            ClientError::InvalidArgument(format!("socket path {path:?} is not UTF-8"))
        })?;
        let connect_err = |source| ClientError::Connect {
            path: path.clone(),
            source,
        };
        let mut blkio = Blkio::new(DRIVER).map_err(connect_err)?;
        blkio.set_str("path", path_str).map_err(connect_err)?;
        blkio
            .set_bool("read-only", config.read_only)
            .map_err(connect_err)?;
        blkio.connect().map_err(connect_err)?;

        let max_queues = usize::try_from(prop_i32(&blkio, "max-queues")?).unwrap_or(0);
        let to_u64 = |v: i32| u64::try_from(v).unwrap_or(0);
        let info = DeviceInfo {
            capacity: prop_u64(&blkio, "capacity")?,
            max_queues,
            request_alignment: u32::try_from(prop_i32(&blkio, "request-alignment")?).unwrap_or(512),
            max_transfer: to_u64(prop_i32(&blkio, "max-transfer")?),
            max_segment_len: to_u64(prop_i32(&blkio, "max-segment-len")?),
            max_discard_len: prop_u64(&blkio, "max-discard-len")?,
            max_write_zeroes_len: prop_u64(&blkio, "max-write-zeroes-len")?,
            flush_needed: blkio.get_bool("flush-needed").map_err(|source| {
                ClientError::ReadProperty {
                    name: "flush-needed",
                    source,
                }
            })?,
        };

        let start_err = |source| ClientError::Start {
            num_queues: config.num_queues,
            max_queues,
            source,
        };
        let nq = i32::try_from(config.num_queues).map_err(|_| {
            ClientError::InvalidArgument(format!("num_queues {} too large", config.num_queues))
        })?;
        blkio.set_i32("num-queues", nq).map_err(start_err)?;
        blkio
            .set_i32("queue-size", i32::from(config.queue_size))
            .map_err(start_err)?;
        let started = blkio.start().map_err(start_err)?;

        let map_err = |source| ClientError::MapMemory {
            len: region_len,
            source,
        };
        let region = blkio.alloc_mem_region(region_len).map_err(map_err)?;
        blkio.map_mem_region(&region).map_err(map_err)?;

        // Single-segment requests: a chunk must fit one segment and one transfer.
        let mut rw_chunk = config.slot_size as u64;
        if info.max_segment_len > 0 {
            rw_chunk = rw_chunk.min(info.max_segment_len);
        }
        if info.max_transfer > 0 {
            rw_chunk = rw_chunk.min(info.max_transfer);
        }
        let rw_chunk = usize::try_from(sector_floor(rw_chunk)).unwrap_or(config.slot_size);
        let limit = |max: u64| {
            if max == 0 {
                MAX_DWZ_CHUNK
            } else {
                sector_floor(max.min(MAX_DWZ_CHUNK))
            }
        };

        let per_queue = config.slots_per_queue * config.slot_size;
        let ring = usize::from(config.queue_size);
        let queues = started
            .queues
            .into_iter()
            .enumerate()
            .map(|(index, q)| {
                Mutex::new(Queue {
                    index,
                    q,
                    slots_addr: region.addr + index * per_queue,
                    slot_size: config.slot_size,
                    slot_busy: vec![false; config.slots_per_queue],
                    in_flight: vec![None; ring],
                    free_ids: (0..ring).rev().collect(),
                    async_outstanding: 0,
                    sync_outstanding: 0,
                    ready: VecDeque::with_capacity(ring),
                    sync_done: None,
                    sync_waiting: None,
                    cbuf: (0..ring).map(|_| MaybeUninit::uninit()).collect(),
                    timeout: config.timeout,
                    rw_chunk,
                    discard_chunk: limit(info.max_discard_len),
                    write_zeroes_chunk: limit(info.max_write_zeroes_len),
                })
            })
            .collect::<Vec<_>>();
        if queues.len() != config.num_queues {
            return Err(ClientError::InvalidArgument(format!(
                "device started {} queues, asked for {}",
                queues.len(),
                config.num_queues
            )));
        }
        Ok(Client {
            queues,
            info,
            socket: path,
            _blkio: Mutex::new(blkio),
        })
    }

    /// Connects, retrying until the socket accepts or `wait` elapses (for freshly started
    /// daemons).
    pub fn connect_retry(
        socket: impl AsRef<Path>,
        config: &ClientConfig,
        wait: Duration,
    ) -> Result<Client> {
        let deadline = Instant::now() + wait;
        loop {
            match Self::connect_with(socket.as_ref(), config) {
                Ok(c) => return Ok(c),
                Err(ClientError::Connect { .. }) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// What the device reported at connect time.
    pub fn info(&self) -> &DeviceInfo {
        &self.info
    }

    /// Disk size in bytes.
    pub fn capacity(&self) -> u64 {
        self.info.capacity
    }

    /// Number of started queues.
    pub fn num_queues(&self) -> usize {
        self.queues.len()
    }

    /// The socket this client is connected to.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Locks queue `index` for exclusive use (asynchronous I/O, or a series of synchronous calls).
    pub fn queue(&self, index: usize) -> Result<MutexGuard<'_, Queue>> {
        let m = self.queues.get(index).ok_or_else(|| {
            ClientError::InvalidArgument(format!(
                "queue {index} out of range ({} started)",
                self.queues.len()
            ))
        })?;
        // A panic while holding the lock leaves the bookkeeping consistent at the granularity
        // of whole submissions/completions, so a poisoned lock is still usable.
        Ok(m.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Reads `buf.len()` bytes at `offset` through queue `queue`.
    pub fn read(&self, queue: usize, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.queue(queue)?.read(offset, buf)
    }

    /// Writes `buf` at `offset` through queue `queue`.
    pub fn write(&self, queue: usize, offset: u64, buf: &[u8]) -> Result<()> {
        self.queue(queue)?.write(offset, buf)
    }

    /// Writes `buf` at `offset` with FUA through queue `queue`.
    pub fn write_fua(&self, queue: usize, offset: u64, buf: &[u8]) -> Result<()> {
        self.queue(queue)?.write_fua(offset, buf)
    }

    /// Flushes through queue `queue`.
    pub fn flush(&self, queue: usize) -> Result<()> {
        self.queue(queue)?.flush()
    }

    /// Discards `len` bytes at `offset` through queue `queue`.
    pub fn discard(&self, queue: usize, offset: u64, len: u64) -> Result<()> {
        self.queue(queue)?.discard(offset, len)
    }

    /// Zeroes `len` bytes at `offset` through queue `queue`.
    pub fn write_zeroes(&self, queue: usize, offset: u64, len: u64, unmap: bool) -> Result<()> {
        self.queue(queue)?.write_zeroes(offset, len, unmap)
    }
}

/// Reports that a daemon binary a test needs is missing: a failure when `SNAPBLK_REQUIRE_DAEMONS`
/// is set (CI-style runs), otherwise a skip message. The caller returns after it.
pub fn daemon_missing(msg: &str) {
    if std::env::var_os("SNAPBLK_REQUIRE_DAEMONS").is_some() {
        panic!("{msg}");
    }
    eprintln!("{msg}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_status_maps_virtio_statuses_and_errnos() {
        assert_eq!(RequestStatus::from_ret(0), Ok(()));
        assert_eq!(
            RequestStatus::from_ret(-libc::EIO),
            Err(RequestStatus::IoErr)
        );
        assert_eq!(
            RequestStatus::from_ret(-libc::ENOTSUP),
            Err(RequestStatus::Unsupported)
        );
        assert_eq!(
            RequestStatus::from_ret(-libc::EINVAL),
            Err(RequestStatus::Errno(libc::EINVAL))
        );
        assert!(RequestStatus::from_ret(i32::MIN).is_err());
    }

    #[test]
    fn config_rejects_unaligned_slots_and_huge_regions() {
        let mut c = ClientConfig::new(1);
        c.slot_size = 1000;
        assert!(c.validate().is_err());
        let mut c = ClientConfig::new(1);
        c.queue_size = 100;
        assert!(c.validate().is_err());
        let mut c = ClientConfig::new(usize::MAX);
        c.slots_per_queue = 2;
        assert!(c.validate().is_err());
        assert_eq!(
            ClientConfig::new(2).validate().ok(),
            Some(2 * 32 * (1 << 20))
        );
    }

    #[test]
    fn chunking_covers_range_exactly_once() {
        let mut pieces = Vec::new();
        for_each_chunk(4096, 10 * 512 + 512, 2048, |o, l| {
            pieces.push((o, l));
            Ok(())
        })
        .unwrap();
        assert_eq!(
            pieces,
            vec![(4096, 2048), (6144, 2048), (8192, 1536)],
            "pieces must tile the range in order"
        );
        let mut zero = Vec::new();
        for_each_chunk(0, 0, 2048, |o, l| {
            zero.push((o, l));
            Ok(())
        })
        .unwrap();
        assert_eq!(zero, vec![(0, 0)]);
        assert!(for_each_chunk(u64::MAX - 511, 1024, 512, |_, _| Ok(())).is_err());
    }

    #[test]
    fn sector_floor_never_returns_zero() {
        assert_eq!(sector_floor(0), 512);
        assert_eq!(sector_floor(4097), 4096);
        assert_eq!(MAX_DWZ_CHUNK % SECTOR_SIZE, 0);
        assert!(MAX_DWZ_CHUNK / SECTOR_SIZE <= u64::from(u32::MAX));
    }
}
