//! Parsing and execution of virtio-blk requests over guest memory, and the per-queue processing
//! pass (pop chains, execute, fill the used ring, decide whether to notify).
//!
//! A request is a descriptor chain: driver-readable bytes (16-byte header, then OUT data or
//! discard/write-zeroes segments) followed by device-writable bytes (IN data or GET_ID answer, then
//! the 1-byte status as the very last byte). Descriptor boundaries carry no meaning: the chain is
//! treated as two byte streams, so any framing a driver chooses works.
//!
//! Every value read from the chain is untrusted: lengths and sectors use checked arithmetic, guest
//! addresses go through `vm-memory` (which refuses anything outside guest RAM), and no allocation
//! is sized by the guest beyond [`CHUNK_BYTES`]. Whatever is wrong with a request, its descriptor
//! goes back to the used ring so the driver never hangs; a status byte is written whenever the
//! chain has a place for one.
//!
//! Locking model: a [`RequestWorker`] belongs to exactly one queue thread (it holds that thread's
//! reusable buffers); the [`BlkDevice`] it executes on is shared and lock-free.

use std::cell::RefCell;
use std::ops::Deref;
use std::sync::Arc;

use blockdev::{check_range, AlignedBuf, BlockError, ReadSink};
use log::{debug, error, warn};
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{
    Address, Bytes, GuestAddress, GuestAddressSpace, GuestMemory, GuestMemoryAtomic,
    GuestMemoryError, GuestMemoryMmap, Permissions,
};

use crate::device::BlkDevice;
use crate::metrics::Op;
use crate::virtio_blk::*;

/// Largest piece of a request moved through the bounce buffer at once. Larger IN/OUT requests are
/// split into several `read_at`/`write_at` calls of this size.
pub const CHUNK_BYTES: usize = 4 << 20;

/// Largest read that goes to the disk as a [`blockdev::ReadSink`] over guest memory (a
/// folio-cache hit is then copied straight into the guest's buffers); a larger one reads into
/// the request's buffer, as the cache reads it past its folios anyway (its bypass threshold).
const READ_INTO_MAX: usize = 256 << 10;

/// Largest write whose data goes from guest memory straight into the disk's own copy of it
/// when the disk keeps one (the crash journal's record, [`blockdev::BlockDev::gathers_writes`]):
/// the folio cache then copies the record, and the request's buffer is not needed. A larger
/// write goes through the request's buffer, which the cache lets through to the file as it
/// is (in huge pages from 1 MiB, one piece for the device).
const WRITE_GATHER_MAX: usize = 256 << 10;

/// Longest descriptor chain accepted (an indirect table may hold up to 65535 entries).
pub const MAX_CHAIN_DESCRIPTORS: usize = 4096;

/// Why a request failed. [`ExecuteRequestError::status`] gives the status byte for the driver.
#[derive(Debug, thiserror::Error)]
pub enum ExecuteRequestError {
    /// The chain has more descriptors than we accept.
    #[error("descriptor chain longer than {MAX_CHAIN_DESCRIPTORS} descriptors")]
    ChainTooLong,
    /// A driver-readable descriptor follows a device-writable one.
    #[error("driver-readable descriptor after a device-writable one")]
    ReadableAfterWritable,
    /// Fewer than 16 driver-readable bytes.
    #[error("request header needs 16 driver-readable bytes, chain has {0}")]
    HeaderTooShort(u64),
    /// A part of the chain has the wrong size for the request type.
    #[error("request type {request_type}: {what} is {actual} bytes, expected {expected}")]
    BadLength {
        /// Request type.
        request_type: u32,
        /// Which part.
        what: &'static str,
        /// Bytes expected.
        expected: &'static str,
        /// Bytes found.
        actual: u64,
    },
    /// Sector number times 512 overflows.
    #[error("sector {0} is out of range")]
    SectorOverflow(u64),
    /// Offset or length not a multiple of the logical block size.
    #[error("request at byte {offset} length {len} is not aligned to {align} bytes")]
    Unaligned {
        /// Byte offset.
        offset: u64,
        /// Byte length.
        len: u64,
        /// Required alignment.
        align: u64,
    },
    /// The request reaches past the end of the disk.
    #[error("request at byte {offset} length {len} is past the end of the {size}-byte disk")]
    OutOfRange {
        /// Byte offset.
        offset: u64,
        /// Byte length.
        len: u64,
        /// Disk size.
        size: u64,
    },
    /// A guest address in the chain is not guest RAM.
    #[error("guest memory access failed: {0}")]
    GuestMemory(#[from] GuestMemoryError),
    /// A write-type request to a read-only device.
    #[error("write-type request to a read-only device")]
    ReadOnly,
    /// Too many discard/write-zeroes segments.
    #[error("{count} segments, at most {max} allowed")]
    TooManySegments {
        /// Segments in the request.
        count: u64,
        /// Limit announced in the config space.
        max: u32,
    },
    /// A discard/write-zeroes segment is larger than announced.
    #[error("segment of {sectors} sectors exceeds the limit of {max}")]
    SegmentTooLarge {
        /// Segment length.
        sectors: u32,
        /// Limit announced in the config space.
        max: u32,
    },
    /// Reserved or disallowed flags in a discard/write-zeroes segment.
    #[error("segment flags {0:#x} not supported")]
    UnsupportedFlags(u32),
    /// A request type the device does not implement or did not negotiate.
    #[error("request type {0} not supported")]
    UnsupportedType(u32),
    /// The disk failed.
    #[error("disk {op} failed: {source}")]
    Disk {
        /// The operation.
        op: &'static str,
        /// The disk error.
        source: BlockError,
    },
}

impl ExecuteRequestError {
    /// The virtio-blk status reported to the driver.
    pub fn status(&self) -> u8 {
        match self {
            ExecuteRequestError::UnsupportedFlags(_) | ExecuteRequestError::UnsupportedType(_) => {
                VIRTIO_BLK_S_UNSUPP
            }
            ExecuteRequestError::Disk {
                source: BlockError::Unsupported(_),
                ..
            } => VIRTIO_BLK_S_UNSUPP,
            _ => VIRTIO_BLK_S_IOERR,
        }
    }

    fn disk(op: &'static str) -> impl FnOnce(BlockError) -> Self {
        move |source| ExecuteRequestError::Disk { op, source }
    }
}

/// Why a processing pass over a queue stopped early.
#[derive(Debug, thiserror::Error)]
pub enum ProcessQueueError {
    /// The queue's rings could not be accessed.
    #[error("virtqueue access failed: {0}")]
    Queue(#[from] virtio_queue::Error),
    /// The driver reports available descriptors that cannot be popped (a corrupt available
    /// ring); the queue is left alone until the driver kicks or resets it again.
    #[error("virtqueue stalled: the available ring announces descriptors that cannot be popped")]
    Stalled,
}

/// Tells a stalled available ring from a driver that published chains during a pass. With
/// EVENT_IDX a pass re-checks the ring when it re-enables notifications, and loops when the
/// driver's index has moved; the driver does not kick for what it published while they were
/// off, so the pass must take it. A round that popped nothing is normal (a kick for chains an
/// earlier round took, or chains published after the round's last pop and before the
/// re-check); only a round that pops nothing right after a re-check saw chains means a ring
/// that announces chains that cannot be popped (a corrupt ring), which ends the pass rather
/// than spin.
#[derive(Debug, Default)]
pub(crate) struct StallCheck {
    announced: bool,
}

impl StallCheck {
    /// A round of pops took `popped` chains.
    pub(crate) fn popped(&mut self, popped: usize) -> Result<(), ProcessQueueError> {
        if self.announced && popped == 0 {
            return Err(ProcessQueueError::Stalled);
        }
        self.announced = false;
        Ok(())
    }

    /// The re-check found chains announced: the next round must pop some.
    pub(crate) fn announced(&mut self) {
        self.announced = true;
    }
}

/// The request type of `chain` when its header starts its first descriptor (the usual framing),
/// read without collecting the chain; `None` otherwise (the chain may still be valid, or not:
/// only [`RequestWorker::process_chain`] says). A hint for scheduling, never for executing.
pub(crate) fn peek_request_type<M, D>(mem: &M, chain: &DescriptorChain<D>) -> Option<u32>
where
    M: GuestMemory,
    D: std::ops::Deref<Target = M> + Clone,
{
    let first = chain.clone().next()?;
    let mut t = [0u8; 4];
    (!first.is_write_only() && first.len() >= 4 && mem.read_slice(&mut t, first.addr()).is_ok())
        .then(|| u32::from_le_bytes(t))
}

/// The byte offset and length of a write (`VIRTIO_BLK_T_OUT`) of at most `max_len` bytes in the
/// usual framing (a 16-byte header descriptor, the data in descriptors the device reads, then
/// the write-only status descriptor), read without collecting the chain; `None` for any other
/// request, framing or size. A hint for scheduling, never for executing (as
/// [`peek_request_type`]).
pub(crate) fn peek_write<M, D>(
    mem: &M,
    chain: &DescriptorChain<D>,
    max_len: u64,
) -> Option<(u64, u64)>
where
    M: GuestMemory,
    D: std::ops::Deref<Target = M> + Clone,
{
    let mut descs = chain.clone();
    let first = descs.next()?;
    if first.is_write_only() || first.len() as usize != RequestHeader::SIZE {
        return None;
    }
    let mut hdr = [0u8; RequestHeader::SIZE];
    mem.read_slice(&mut hdr, first.addr()).ok()?;
    let hdr = RequestHeader::from_bytes(&hdr);
    if hdr.request_type != VIRTIO_BLK_T_OUT {
        return None;
    }
    let mut len = 0u64;
    for d in descs {
        if d.is_write_only() {
            let offset = hdr.sector.checked_mul(SECTOR_SIZE)?;
            return (len > 0).then_some((offset, len));
        }
        len += u64::from(d.len());
        if len > max_len {
            return None;
        }
    }
    None
}

/// Where a processing pass finds guest memory: the memory table as it is when asked.
///
/// A pass can run across a memory table update: the vhost-user handler thread applies the
/// frontend's ADD_MEM_REG (or SET_MEM_TABLE) while a queue thread is in a pass, and as soon as
/// it has acknowledged the update the driver may publish a chain whose buffers lie in the new
/// memory, which the pass, still going, pops. So every chain is read over the table loaded
/// after its pop read the available index ([`pop_current`]), never over the one the pass
/// loaded when it began: that one need not map the chain's buffers (the request would fail
/// with "invalid guest address", `VIRTIO_BLK_S_IOERR`). The rings themselves stay mapped
/// across an update, so a pass reads them through any table of its own.
pub trait MemoryTable {
    /// The memory of one table.
    type Memory: GuestMemory;
    /// A handle that keeps one table's memory mapped (each popped chain holds one).
    type Handle: Deref<Target = Self::Memory> + Clone;
    /// The table as it is now.
    fn current(&self) -> Self::Handle;
}

/// A table that nothing updates (tests, the fuzzer).
impl<'a, M: GuestMemory> MemoryTable for &'a M {
    type Memory = M;
    type Handle = &'a M;
    fn current(&self) -> &'a M {
        self
    }
}

/// A table that nothing updates, shared with the executors.
impl MemoryTable for Arc<GuestMemoryMmap> {
    type Memory = GuestMemoryMmap;
    type Handle = Arc<GuestMemoryMmap>;
    fn current(&self) -> Arc<GuestMemoryMmap> {
        Arc::clone(self)
    }
}

/// The table the vhost-user handler replaces on every memory table update.
impl MemoryTable for GuestMemoryAtomic<GuestMemoryMmap> {
    type Memory = GuestMemoryMmap;
    type Handle = Arc<GuestMemoryMmap>;
    fn current(&self) -> Arc<GuestMemoryMmap> {
        self.memory().into_inner()
    }
}

/// Pops the next available chain of `queue` (reading the available ring through `ring`) and
/// returns it over `table` as it is once the pop has read the available index, with that
/// table's handle. The driver publishes a chain only after the update that maps its buffers was
/// acknowledged, and the index is read with acquire ordering, so the table loaded afterwards
/// maps the chain (see [`MemoryTable`]).
pub(crate) fn pop_current<T: MemoryTable>(
    queue: &mut Queue,
    ring: &T::Memory,
    table: &T,
) -> Option<(T::Handle, DescriptorChain<T::Handle>)> {
    let head = queue.pop_descriptor_chain(ring)?.head_index();
    let mem = table.current();
    let chain = DescriptorChain::new(
        mem.clone(),
        GuestAddress(queue.desc_table()),
        queue.size(),
        head,
    );
    Some((mem, chain))
}

/// Checks the available ring before a processing pass. A corrupt ring (an index more than the
/// queue size ahead of ours) makes popping find nothing while `enable_notification` keeps
/// reporting work: without this check a hostile driver could make the queue thread spin forever.
pub(crate) fn check_avail_ring<M: GuestMemory>(
    queue: &mut Queue,
    mem: &M,
) -> Result<(), ProcessQueueError> {
    virtio_queue::QueueOwnedT::iter(queue, mem).map(|_| ())?;
    Ok(())
}

/// One non-empty descriptor of a chain.
#[derive(Clone, Copy, Debug)]
struct Segment {
    addr: GuestAddress,
    len: u32,
}

/// Shape of a collected chain: `segs[..readable]` are driver-readable, the rest device-writable.
#[derive(Clone, Copy, Debug, Default)]
struct ChainLayout {
    readable: usize,
    readable_len: u64,
    writable_len: u64,
}

/// What [`RequestWorker::collect`] found in a chain.
#[derive(Debug, Default)]
struct CollectedChain {
    layout: ChainLayout,
    /// The last non-empty descriptor of the whole chain and whether it is device-writable: the
    /// status byte is its last byte.
    last: Option<(Segment, bool)>,
    /// What is wrong with the chain's shape, if anything.
    error: Option<ExecuteRequestError>,
}

/// A read request parsed for the io_uring path ([`RequestWorker::prepare_read`]).
#[derive(Debug)]
pub(crate) struct PreparedRead {
    /// Byte offset on the disk.
    pub offset: u64,
    /// Data bytes (the status byte excluded).
    pub len: u64,
    /// The device-writable data pieces, in order, `len` bytes in all.
    pub data: Vec<(GuestAddress, usize)>,
    /// Where the status byte goes.
    pub status: GuestAddress,
}

/// Per-queue-thread request executor holding reusable buffers, so the data path does not allocate
/// once the buffers have grown to the working size.
#[derive(Debug, Default)]
pub struct RequestWorker {
    segs: Vec<Segment>,
    /// The request's bounce buffer, aligned for direct I/O (an O_DIRECT image takes a large
    /// write that bypasses the cache straight from it).
    buf: AlignedBuf,
    /// Bytes written to the device-writable part of the current chain, status excluded.
    written: u64,
    /// The queue this worker serves (the metrics label).
    queue: usize,
    /// Type and payload bytes of the current request, for the metrics.
    op: Option<Op>,
    bytes: u64,
}

fn bounce(buf: &mut AlignedBuf, n: usize) -> &mut [u8] {
    if buf.len() < n {
        // In huge pages from 1 MiB on: a large write goes to the device as one request. A
        // buffer past `CHUNK_BYTES` is dropped after its request, so it stays on the heap.
        *buf = if n <= CHUNK_BYTES {
            AlignedBuf::zeroed_contiguous(n)
        } else {
            AlignedBuf::zeroed(n)
        };
    }
    &mut buf[..n]
}

/// Walks `len` bytes of the concatenation of `segs`, starting `skip` bytes in, calling `piece`
/// with the guest address of each contiguous piece and its range within the `len` bytes.
fn walk_segments(
    segs: &[Segment],
    mut skip: u64,
    len: usize,
    mut piece: impl FnMut(GuestAddress, std::ops::Range<usize>) -> Result<(), GuestMemoryError>,
) -> Result<(), GuestMemoryError> {
    let mut done = 0usize;
    for seg in segs {
        if done == len {
            break;
        }
        let seg_len = u64::from(seg.len);
        if skip >= seg_len {
            skip -= seg_len;
            continue;
        }
        let n = (seg_len - skip).min((len - done) as u64) as usize;
        let addr = seg
            .addr
            .checked_add(skip)
            .ok_or(GuestMemoryError::InvalidGuestAddress(seg.addr))?;
        piece(addr, done..done + n)?;
        done += n;
        skip = 0;
    }
    if done != len {
        return Err(GuestMemoryError::PartialBuffer {
            expected: len,
            completed: done,
        });
    }
    Ok(())
}

/// Copies `dst.len()` bytes from the concatenation of `segs`, starting `skip` bytes in.
fn gather<M: GuestMemory>(
    mem: &M,
    segs: &[Segment],
    skip: u64,
    dst: &mut [u8],
) -> Result<(), GuestMemoryError> {
    walk_segments(segs, skip, dst.len(), |addr, r| {
        mem.read_slice(&mut dst[r], addr)
    })
}

/// Copies `src` into the concatenation of `segs`, starting `skip` bytes in.
fn scatter<M: GuestMemory>(
    mem: &M,
    segs: &[Segment],
    skip: u64,
    src: &[u8],
) -> Result<(), GuestMemoryError> {
    walk_segments(segs, skip, src.len(), |addr, r| {
        mem.write_slice(&src[r], addr)
    })
}

/// `len` bytes of a read's device-writable buffers, from `skip` bytes in, as the destination of
/// [`blockdev::BlockDev::read_into`]: the layer that holds the bytes (a folio-cache hit) copies
/// them straight into guest memory, with no buffer of the request in between. The first
/// guest-memory error is kept, so that the request reports it as such and not as a disk error.
struct GuestSink<'a, M: GuestMemory> {
    mem: &'a M,
    segs: &'a [Segment],
    skip: u64,
    len: usize,
    error: RefCell<Option<GuestMemoryError>>,
}

impl<M: GuestMemory> ReadSink for GuestSink<'_, M> {
    fn len(&self) -> usize {
        self.len
    }

    fn fill(&self, at: usize, src: &[u8]) -> std::io::Result<()> {
        if at.checked_add(src.len()).is_none_or(|end| end > self.len) {
            return Err(std::io::Error::other(
                "read piece past the request's buffers",
            ));
        }
        scatter(self.mem, self.segs, self.skip + at as u64, src).map_err(|e| {
            let msg = format!("guest memory: {e}");
            self.error.borrow_mut().get_or_insert(e);
            std::io::Error::other(msg)
        })
    }
}

/// The discard/write-zeroes segments in `raw` (whole segments only; the caller checked the length).
fn decode_segments(raw: &[u8]) -> impl Iterator<Item = DiscardWriteZeroesSegment> + '_ {
    raw.chunks_exact(DiscardWriteZeroesSegment::SIZE)
        .map(|chunk| {
            let mut b = [0u8; DiscardWriteZeroesSegment::SIZE];
            b.copy_from_slice(chunk);
            DiscardWriteZeroesSegment::from_bytes(&b)
        })
}

/// Checks that every byte of `segs` is guest RAM.
fn check_segments<M: GuestMemory>(mem: &M, segs: &[Segment]) -> Result<(), GuestMemoryError> {
    for seg in segs {
        if !mem.check_range(seg.addr, seg.len as usize, Permissions::Read) {
            return Err(GuestMemoryError::InvalidGuestAddress(seg.addr));
        }
    }
    Ok(())
}

fn expect_len(
    request_type: u32,
    what: &'static str,
    actual: u64,
    ok: bool,
    expected: &'static str,
) -> Result<(), ExecuteRequestError> {
    if ok {
        Ok(())
    } else {
        Err(ExecuteRequestError::BadLength {
            request_type,
            what,
            expected,
            actual,
        })
    }
}

impl RequestWorker {
    /// A worker with empty buffers.
    pub fn new() -> Self {
        Self::default()
    }

    /// A worker for requests of queue `queue`.
    pub fn for_queue(queue: usize) -> Self {
        RequestWorker {
            queue,
            ..Self::default()
        }
    }

    /// Executes one request and writes its status. Returns the used length: the number of bytes
    /// written into the device-writable part of the chain, status byte included.
    pub fn process_chain<M, D>(
        &mut self,
        dev: &BlkDevice,
        mem: &M,
        chain: DescriptorChain<D>,
    ) -> u32
    where
        M: GuestMemory,
        D: std::ops::Deref<Target = M>,
    {
        self.written = 0;
        let head = chain.head_index();
        let CollectedChain {
            layout,
            last,
            error: chain_error,
        } = self.collect(chain);

        // The status byte is the last byte of the chain, which must be device-writable.
        let status_addr = match last {
            Some((seg, true)) => seg.addr.checked_add(u64::from(seg.len) - 1),
            _ => None,
        };
        let Some(status_addr) = status_addr else {
            match chain_error {
                Some(e) => error!("request {head}: {e}; no status byte, dropping the request"),
                None => error!("request {head}: no device-writable status byte, dropping it"),
            }
            return 0;
        };

        let in_flight = dev.live().begin(self.queue);
        self.op = None;
        self.bytes = 0;
        let result = match chain_error {
            Some(e) => Err(e),
            None => self.execute(dev, mem, &layout),
        };
        in_flight.finish(
            self.op.unwrap_or(Op::Other),
            self.bytes,
            result.as_ref().err(),
        );
        let status = match result {
            Ok(()) => VIRTIO_BLK_S_OK,
            Err(e) => {
                match &e {
                    ExecuteRequestError::UnsupportedType(_)
                    | ExecuteRequestError::UnsupportedFlags(_) => debug!("request {head}: {e}"),
                    ExecuteRequestError::SectorOverflow(_)
                    | ExecuteRequestError::Unaligned { .. }
                    | ExecuteRequestError::OutOfRange { .. }
                    | ExecuteRequestError::ReadOnly
                    | ExecuteRequestError::TooManySegments { .. }
                    | ExecuteRequestError::SegmentTooLarge { .. } => warn!("request {head}: {e}"),
                    _ => error!("request {head}: {e}"),
                }
                e.status()
            }
        };
        let mut used = self.written;
        match mem.write_slice(&[status], status_addr) {
            Ok(()) => used += 1,
            Err(e) => error!("request {head}: cannot write status byte: {e}"),
        }
        if self.buf.len() > CHUNK_BYTES {
            self.buf = AlignedBuf::new();
        }
        u32::try_from(used).unwrap_or(u32::MAX)
    }

    /// Parses `chain` for the io_uring read path ([`crate::uring`]): `Some` only for a
    /// well-formed IN request (header alone in the driver-readable part, at least one data byte,
    /// aligned, in range, a device-writable status byte). Anything else, valid or not, gets
    /// `None` and goes through [`Self::process_chain`], which reports what is wrong with it.
    pub(crate) fn prepare_read<M, D>(
        &mut self,
        dev: &BlkDevice,
        mem: &M,
        chain: DescriptorChain<D>,
    ) -> Option<PreparedRead>
    where
        M: GuestMemory,
        D: std::ops::Deref<Target = M> + Clone,
    {
        // Most requests a pass sees are not reads: when the header starts the first descriptor
        // (the usual framing), its type decides before the whole chain is collected.
        if peek_request_type(mem, &chain).is_some_and(|t| t != VIRTIO_BLK_T_IN) {
            return None;
        }
        let CollectedChain {
            layout,
            last,
            error,
        } = self.collect(chain);
        let (Some((last, true)), None) = (last, error) else {
            return None;
        };
        if layout.readable_len != RequestHeader::SIZE as u64 || layout.writable_len < 2 {
            return None;
        }
        let mut hdr = [0u8; RequestHeader::SIZE];
        gather(mem, &self.segs[..layout.readable], 0, &mut hdr).ok()?;
        let hdr = RequestHeader::from_bytes(&hdr);
        if hdr.request_type != VIRTIO_BLK_T_IN {
            return None;
        }
        let len = layout.writable_len - 1;
        let offset = Self::check_io(
            dev,
            hdr.sector,
            len,
            u64::from(dev.config().logical_block_size),
        )
        .ok()?;
        let mut data = Vec::with_capacity(self.segs.len() - layout.readable);
        walk_segments(&self.segs[layout.readable..], 0, len as usize, |addr, r| {
            data.push((addr, r.len()));
            Ok(())
        })
        .ok()?;
        Some(PreparedRead {
            offset,
            len,
            data,
            status: last.addr.checked_add(u64::from(last.len) - 1)?,
        })
    }

    /// Collects the non-empty descriptors of `chain` into `self.segs`.
    fn collect<M, D>(&mut self, chain: DescriptorChain<D>) -> CollectedChain
    where
        M: GuestMemory,
        D: std::ops::Deref<Target = M>,
    {
        self.segs.clear();
        let mut layout = ChainLayout::default();
        let mut error = None;
        let mut last = None;
        // The iterator ends by itself after at most 65535 descriptors (virtio-queue's ttl).
        for desc in chain {
            if desc.len() == 0 {
                continue;
            }
            let seg = Segment {
                addr: desc.addr(),
                len: desc.len(),
            };
            let writable = desc.is_write_only();
            last = Some((seg, writable));
            if error.is_some() {
                continue;
            }
            if self.segs.len() >= MAX_CHAIN_DESCRIPTORS {
                error = Some(ExecuteRequestError::ChainTooLong);
                continue;
            }
            let len = u64::from(desc.len());
            if writable {
                layout.writable_len += len;
            } else {
                if layout.writable_len > 0 {
                    error = Some(ExecuteRequestError::ReadableAfterWritable);
                    continue;
                }
                layout.readable += 1;
                layout.readable_len += len;
            }
            self.segs.push(seg);
        }
        CollectedChain {
            layout,
            last,
            error,
        }
    }

    fn execute<M: GuestMemory>(
        &mut self,
        dev: &BlkDevice,
        mem: &M,
        layout: &ChainLayout,
    ) -> Result<(), ExecuteRequestError> {
        if layout.readable_len < RequestHeader::SIZE as u64 {
            return Err(ExecuteRequestError::HeaderTooShort(layout.readable_len));
        }
        let readable = &self.segs[..layout.readable];
        let mut hdr = [0u8; RequestHeader::SIZE];
        gather(mem, readable, 0, &mut hdr)?;
        let hdr = RequestHeader::from_bytes(&hdr);
        // Driver-to-device payload after the header, device-to-driver payload before the status.
        let data_in = layout.readable_len - RequestHeader::SIZE as u64;
        let data_out = layout.writable_len.saturating_sub(1);
        let t = hdr.request_type;
        self.op = Some(Op::from_type(t));
        self.bytes = match t {
            VIRTIO_BLK_T_IN => data_out,
            VIRTIO_BLK_T_OUT => data_in,
            _ => 0,
        };

        match t {
            VIRTIO_BLK_T_IN => {
                expect_len(t, "driver-readable data", data_in, data_in == 0, "0")?;
                self.read(dev, mem, layout, hdr.sector, data_out)
            }
            VIRTIO_BLK_T_OUT => {
                expect_len(t, "device-writable data", data_out, data_out == 0, "0")?;
                self.write(dev, mem, layout, hdr.sector, data_in)
            }
            VIRTIO_BLK_T_FLUSH => {
                expect_len(t, "driver-readable data", data_in, data_in == 0, "0")?;
                expect_len(t, "device-writable data", data_out, data_out == 0, "0")?;
                dev.disk()
                    .flush()
                    .map_err(ExecuteRequestError::disk("flush"))
            }
            VIRTIO_BLK_T_GET_ID => {
                expect_len(t, "driver-readable data", data_in, data_in == 0, "0")?;
                let n = data_out.min(VIRTIO_BLK_ID_BYTES as u64) as usize;
                let serial = dev.config().serial;
                scatter(mem, &self.segs[layout.readable..], 0, &serial[..n])?;
                self.written = n as u64;
                Ok(())
            }
            VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
                let (bit, discard) = if t == VIRTIO_BLK_T_DISCARD {
                    (VIRTIO_BLK_F_DISCARD, true)
                } else {
                    (VIRTIO_BLK_F_WRITE_ZEROES, false)
                };
                if !dev.has_feature(bit) {
                    return Err(ExecuteRequestError::UnsupportedType(t));
                }
                expect_len(t, "device-writable data", data_out, data_out == 0, "0")?;
                self.discard_write_zeroes(dev, mem, layout, discard, data_in)
            }
            _ => Err(ExecuteRequestError::UnsupportedType(t)),
        }
    }

    /// Byte offset of `sector` after checking alignment and range of `[offset, offset + len)`.
    fn check_io(
        dev: &BlkDevice,
        sector: u64,
        len: u64,
        align: u64,
    ) -> Result<u64, ExecuteRequestError> {
        let offset = sector
            .checked_mul(SECTOR_SIZE)
            .ok_or(ExecuteRequestError::SectorOverflow(sector))?;
        if !offset.is_multiple_of(align) || !len.is_multiple_of(align) {
            return Err(ExecuteRequestError::Unaligned { offset, len, align });
        }
        let size = dev.config().size_bytes;
        check_range(offset, len, size).map_err(|_| ExecuteRequestError::OutOfRange {
            offset,
            len,
            size,
        })?;
        Ok(offset)
    }

    fn read<M: GuestMemory>(
        &mut self,
        dev: &BlkDevice,
        mem: &M,
        layout: &ChainLayout,
        sector: u64,
        len: u64,
    ) -> Result<(), ExecuteRequestError> {
        let offset = Self::check_io(dev, sector, len, u64::from(dev.config().logical_block_size))?;
        let writable = &self.segs[layout.readable..];
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(CHUNK_BYTES as u64) as usize;
            if n > READ_INTO_MAX {
                // Large: the cache bypasses itself for it, through a buffer either way; the
                // request's own (page-aligned, reused) buffer keeps the thread's small.
                let buf = bounce(&mut self.buf, n);
                dev.disk()
                    .read_at(buf, offset + done)
                    .map_err(ExecuteRequestError::disk("read"))?;
                scatter(mem, writable, done, buf)?;
            } else {
                let sink = GuestSink {
                    mem,
                    segs: writable,
                    skip: done,
                    len: n,
                    error: RefCell::new(None),
                };
                if let Err(e) = dev.disk().read_into(&sink, offset + done) {
                    return Err(match sink.error.into_inner() {
                        Some(g) => g.into(),
                        None => ExecuteRequestError::disk("read")(e),
                    });
                }
            }
            done += n as u64;
            self.written = done;
        }
        Ok(())
    }

    fn write<M: GuestMemory>(
        &mut self,
        dev: &BlkDevice,
        mem: &M,
        layout: &ChainLayout,
        sector: u64,
        len: u64,
    ) -> Result<(), ExecuteRequestError> {
        if dev.config().read_only {
            return Err(ExecuteRequestError::ReadOnly);
        }
        let offset = Self::check_io(dev, sector, len, u64::from(dev.config().logical_block_size))?;
        let readable = &self.segs[..layout.readable];
        if len > CHUNK_BYTES as u64 {
            // Several write_at calls: make sure none of the data is unreadable before the first.
            check_segments(mem, readable)?;
        }
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(CHUNK_BYTES as u64) as usize;
            let skip = RequestHeader::SIZE as u64 + done;
            if n <= WRITE_GATHER_MAX && dev.disk().gathers_writes() {
                // Straight into the journal's record; a guest buffer that cannot be read fails
                // the write before anything is recorded or written.
                let mut guest_error = None;
                let r = dev.disk().write_gathered(offset + done, n, &mut |dst| {
                    gather(mem, readable, skip, dst).map_err(|e| {
                        let err = BlockError::Io(std::io::Error::other(e.to_string()));
                        guest_error = Some(e);
                        err
                    })
                });
                if let Err(e) = r {
                    return Err(match guest_error {
                        Some(g) => g.into(),
                        None => ExecuteRequestError::disk("write")(e),
                    });
                }
            } else {
                let buf = bounce(&mut self.buf, n);
                gather(mem, readable, skip, buf)?;
                dev.disk()
                    .write_at(buf, offset + done)
                    .map_err(ExecuteRequestError::disk("write"))?;
            }
            done += n as u64;
        }
        if dev.flush_after_write() {
            dev.disk()
                .flush()
                .map_err(ExecuteRequestError::disk("write-through flush"))?;
        }
        Ok(())
    }

    fn discard_write_zeroes<M: GuestMemory>(
        &mut self,
        dev: &BlkDevice,
        mem: &M,
        layout: &ChainLayout,
        discard: bool,
        data_len: u64,
    ) -> Result<(), ExecuteRequestError> {
        let cfg = dev.config();
        let (max_seg, max_sectors) = if discard {
            (cfg.max_discard_seg, cfg.max_discard_sectors)
        } else {
            (cfg.max_write_zeroes_seg, cfg.max_write_zeroes_sectors)
        };
        let seg_size = DiscardWriteZeroesSegment::SIZE as u64;
        if data_len == 0 || !data_len.is_multiple_of(seg_size) {
            return Err(ExecuteRequestError::BadLength {
                request_type: if discard {
                    VIRTIO_BLK_T_DISCARD
                } else {
                    VIRTIO_BLK_T_WRITE_ZEROES
                },
                what: "segment array",
                expected: "a non-zero multiple of 16",
                actual: data_len,
            });
        }
        let count = data_len / seg_size;
        if count > u64::from(max_seg) {
            return Err(ExecuteRequestError::TooManySegments {
                count,
                max: max_seg,
            });
        }
        if cfg.read_only {
            return Err(ExecuteRequestError::ReadOnly);
        }
        let lbs = u64::from(cfg.logical_block_size);
        let align = if discard {
            lbs.max(u64::from(cfg.discard_sector_alignment) * SECTOR_SIZE)
        } else {
            lbs
        };
        // `count` is at most `max_seg` (a u32 from our own config), so this is bounded.
        let raw = bounce(&mut self.buf, data_len as usize);
        gather(
            mem,
            &self.segs[..layout.readable],
            RequestHeader::SIZE as u64,
            raw,
        )?;

        // Validate every segment before touching the disk.
        for seg in decode_segments(raw) {
            let allowed = if discard {
                0
            } else {
                VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
            };
            if seg.flags & !allowed != 0 {
                return Err(ExecuteRequestError::UnsupportedFlags(seg.flags));
            }
            if seg.num_sectors > max_sectors {
                return Err(ExecuteRequestError::SegmentTooLarge {
                    sectors: seg.num_sectors,
                    max: max_sectors,
                });
            }
            Self::check_io(
                dev,
                seg.sector,
                u64::from(seg.num_sectors) * SECTOR_SIZE,
                align,
            )?;
        }
        self.bytes = decode_segments(raw)
            .map(|seg| u64::from(seg.num_sectors) * SECTOR_SIZE)
            .sum();
        for seg in decode_segments(raw) {
            let len = u64::from(seg.num_sectors) * SECTOR_SIZE;
            if len == 0 {
                continue;
            }
            // Checked above.
            let offset = seg.sector * SECTOR_SIZE;
            if discard {
                dev.disk()
                    .discard(offset, len)
                    .map_err(ExecuteRequestError::disk("discard"))?;
            } else {
                let unmap = seg.flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0;
                dev.disk()
                    .write_zeroes(offset, len, unmap)
                    .map_err(ExecuteRequestError::disk("write zeroes"))?;
            }
        }
        if dev.flush_after_write() {
            dev.disk()
                .flush()
                .map_err(ExecuteRequestError::disk("write-through flush"))?;
        }
        Ok(())
    }
}

/// One processing pass over `queue`: executes every available request, puts each on the used ring
/// and returns whether the driver must be notified. With EVENT_IDX, notifications from the driver
/// are suppressed during the pass and the queue is re-checked before returning, so no kick is lost.
pub fn process_queue<M: GuestMemory>(
    dev: &BlkDevice,
    worker: &mut RequestWorker,
    queue: &mut Queue,
    mem: &M,
) -> Result<bool, ProcessQueueError> {
    process_queue_tracked(dev, worker, queue, &mem, None)
}

/// [`process_queue`] over the guest memory of `table` (each chain over the table as it is once
/// popped, [`MemoryTable`]), recording each chain's pop and completion in `track` (in-flight
/// tracking for reconnection, [`crate::reconnect`]).
pub fn process_queue_tracked<T: MemoryTable>(
    dev: &BlkDevice,
    worker: &mut RequestWorker,
    queue: &mut Queue,
    table: &T,
    track: Option<&crate::reconnect::QueueInflight>,
) -> Result<bool, ProcessQueueError> {
    let event_idx = queue.event_idx_enabled();
    let mut completed = false;
    let mut stall = StallCheck::default();
    loop {
        let ring = table.current();
        if event_idx {
            queue.disable_notification(&*ring)?;
        }
        check_avail_ring(queue, &*ring)?;
        let mut popped = 0usize;
        while let Some((mem, chain)) = pop_current(queue, &*ring, table) {
            popped += 1;
            let head = chain.head_index();
            if let Some(t) = track {
                t.popped(head);
            }
            let used_len = worker.process_chain(dev, &*mem, chain);
            match crate::reconnect::add_used_tracked(queue, &*mem, head, used_len, track) {
                Ok(()) => completed = true,
                Err(e) => error!("cannot return descriptor {head} to the used ring: {e}"),
            }
        }
        stall.popped(popped)?;
        if !event_idx || !queue.enable_notification(&*ring)? {
            break;
        }
        stall.announced();
    }
    if !completed {
        return Ok(false);
    }
    Ok(queue.needs_notification(&*table.current())?)
}

#[cfg(test)]
#[path = "request_tests.rs"]
mod tests;
