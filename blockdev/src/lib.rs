//! The block-device trait that every snapblk layer stacks through.
//!
//! A layer is anything that stores a virtual disk's bytes: the raw file ([`RawFile`]), an in-memory
//! disk ([`MemDisk`]), the qcow2 overlay engine, the folio cache. The virtio-blk front end only ever
//! talks to one `Arc<dyn BlockDev>`, so each layer can be tested over a `Vec<u8>` or a plain file.
//!
//! Locking model: every method takes `&self`; a layer does its own internal locking so that
//! requests from several virtqueue worker threads run in parallel. Layers never call back upward.
//!
//! Contract shared by all layers:
//! - `read_at`/`write_at` move whole buffers or fail; a failed write may have written any part of
//!   the range (like a torn disk write) but never touches bytes outside it.
//! - `flush` returns only when every write that *completed* before `flush` was called is durable
//!   (data and any metadata that makes it reachable).
//! - After `discard` or `write_zeroes` the range reads back as zeros.
//! - Offsets and lengths are byte-granular; callers that need sector alignment check it themselves.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::{Arc, RwLock};

mod aligned;
mod direct_reads;
mod file;
pub mod lock;
mod switch;
mod thread_usage;
pub use aligned::{prefault_huge_halves, AlignedBuf, IO_ALIGN};
pub use direct_reads::{
    dio_alignment, page_cache_holds, page_cache_pages, reopen_direct, reopen_read_only,
    DirectReads, SYS_CACHESTAT,
};
pub use file::{file_size, random_twin, RawFile, ReadStreams};
pub use switch::{SwitchDev, SwitchGuard};
pub use thread_usage::ThreadUsage;

/// What went wrong in a block-device operation.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The host file returned an error (EIO, ENOSPC, ...).
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
    /// The request reaches past the end of the device.
    #[error(
        "request at offset {offset} length {len} is past the end of the device ({size} bytes)"
    )]
    OutOfRange { offset: u64, len: u64, size: u64 },
    /// A write-type request to a read-only device.
    #[error("device is read-only")]
    ReadOnly,
    /// The image's metadata is inconsistent; the image was marked corrupt and is not written again.
    #[error("image is corrupt: {0}")]
    Corrupt(String),
    /// The layer does not implement this operation.
    #[error("operation not supported: {0}")]
    Unsupported(&'static str),
}

impl BlockError {
    /// The errno-like kind of the underlying error, for logs and tests.
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            BlockError::Io(e) => e.raw_os_error(),
            _ => None,
        }
    }
}

/// Result type of every block-device operation.
pub type Result<T> = std::result::Result<T, BlockError>;

/// A virtual disk: a byte-addressed store with flush, discard and write-zeroes.
pub trait BlockDev: Send + Sync {
    /// Size of the virtual disk in bytes.
    fn size(&self) -> u64;
    /// Fills `buf` with the bytes at `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;
    /// Writes `buf` at `offset`.
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()>;
    /// Writes `buf` at `offset` as [`BlockDev::write_at`] does, for a caller that keeps no copy
    /// of the bytes (a large guest write the folio cache let through): a layer with a page
    /// cache of its own below (a qcow2 image on a buffered file whose large writes go
    /// O_DIRECT) sends it past that cache even where it rewrites data in place. The default is
    /// `write_at`.
    fn write_uncached_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.write_at(buf, offset)
    }
    /// Writes every `(buf, offset)` of `writes`, as [`BlockDev::write_at`] would, one result
    /// per write in order. No two of them overlap; they may reach the device in any order and
    /// at once (a qcow2 image on an O_DIRECT file puts their data in flight together).
    fn write_batch(&self, writes: &[(&[u8], u64)]) -> Vec<Result<()>> {
        writes.iter().map(|&(b, o)| self.write_at(b, o)).collect()
    }
    /// Writes every `(buf, offset)` of `writes` as [`BlockDev::write_batch`] does, for a caller
    /// that flushes right after (the folio cache's writeback for a guest FLUSH): a layer with a
    /// page cache of its own below (a qcow2 image on a buffered file whose large writes go
    /// O_DIRECT) may send them past it to the device whatever their size, since the flush
    /// would write them out of that page cache at once anyway. The default is `write_batch`.
    fn write_batch_to_sync(&self, writes: &[(&[u8], u64)]) -> Vec<Result<()>> {
        self.write_batch(writes)
    }
    /// Makes every completed write durable.
    fn flush(&self) -> Result<()>;
    /// Makes every completed write survive the end of this process (a daemon crash), not
    /// necessarily a crash of the host: its bytes are with the kernel or below, where a
    /// restarted daemon reads them. The crash journal's background trims need no more. The
    /// default is [`BlockDev::flush`], which is more than that; a layer whose completed
    /// writes are with the kernel already (a raw file written with `pwrite`) does nothing,
    /// and one that holds writes in its own memory writes them down first. A layer whose
    /// on-disk state must stay consistent across a host crash (qcow2 metadata) writes it in
    /// that order, with the syncs the order needs and none that only make it durable.
    fn write_back(&self) -> Result<()> {
        self.flush()
    }
    /// Deallocates a range; it reads back as zeros afterwards.
    fn discard(&self, offset: u64, len: u64) -> Result<()>;
    /// Zeroes a range. With `unmap` the layer may deallocate it instead of writing zeros.
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<()>;
    /// Whether write-type operations are refused.
    fn is_read_only(&self) -> bool {
        false
    }
    /// Whether a write of `[offset, offset + len)` (shorter than 256 KiB) would only overwrite
    /// bytes this layer already stores, in place (allocating nothing, changing no metadata),
    /// through the host page cache (a buffered file): every cluster of a buffered qcow2 image
    /// allocated and its own, any range of a writable raw file. A hint for the folio cache
    /// above, which lets such a rewrite of 128 KiB and more go around it: the page cache below
    /// absorbs and merges rewrites as it does a raw image's, so the folio cache's copy would
    /// be one copy more. Writes that allocate, and writes to a file opened O_DIRECT, keep going
    /// through the folio cache, whose writebacks merge them into large writes. The answer may
    /// be stale by the time the write runs; the write is correct either way. The default is
    /// `false`.
    fn rewrites_in_page_cache(&self, _offset: u64, _len: u64) -> bool {
        false
    }
    /// Whether a write of `[offset, offset + len)` issued now would complete from memory: copied
    /// into a write-back cache that has room for it, with no lower I/O and no wait for another
    /// thread (a writeback, a zap, a free slot). A hint for the request layer, which runs such
    /// writes on the queue thread itself instead of handing them to an executor; the answer may
    /// be stale by the time the write runs, which is correct either way (it may then wait). The
    /// default is `false`: layers that write through to a file, or do not know, say so.
    fn writes_in_memory(&self, _offset: u64, _len: u64) -> bool {
        false
    }
    /// Whether [`BlockDev::write_in_place_persisted`] would take a write of `[offset, offset +
    /// len)` now. A hint for the crash journal, which then records only that the range was
    /// written (a marker) instead of the write's bytes; the answer may be stale by the time
    /// the write runs, which then says so. The default is `false`.
    fn persists_in_place(&self, _offset: u64, _len: u64) -> bool {
        false
    }
    /// Writes `buf` at `offset` if, once this returns `Ok(true)`, a process started after this
    /// one ended reads the bytes back with nothing of this process's memory: they are in
    /// place, in the host page cache or on the device, and every mapping that leads a reader
    /// there (qcow2 L1, L2 and refcount entries) is in the file already. No layer on the way
    /// keeps a dirty copy of the range. `Ok(false)`: the range does not qualify now and
    /// nothing was written or changed; the caller writes it another way. An error is a failed
    /// write, whose range holds old or new bytes. The default is `Ok(false)`.
    fn write_in_place_persisted(&self, _buf: &[u8], _offset: u64) -> Result<bool> {
        Ok(false)
    }
    /// Where the bytes of `[offset, offset + len)` are, for a caller that reads them itself with
    /// asynchronous I/O (the io_uring read path). `None` (the default) means "use `read_at`":
    /// a layer answers only when every byte comes from a file range that nothing but a write of
    /// the same guest range changes, or reads as zeros. See [`ReadPlan`] for the contract.
    fn plan_read(&self, _offset: u64, _len: u64) -> Option<ReadPlan> {
        None
    }
    /// Reads `dst.len()` bytes at `offset` into `dst`, a destination in pieces (a guest's
    /// buffers). A layer that holds the bytes in memory (the folio cache) copies them there
    /// directly; the default reads into a buffer of the calling thread with `read_at` and
    /// copies that. Layers that only pass a read down forward this too, so the copy happens
    /// once, where the bytes are.
    fn read_into(&self, dst: &dyn ReadSink, offset: u64) -> Result<()> {
        read_via_bounce(dst, 0, dst.len(), |buf| self.read_at(buf, offset))
    }
    /// Whether [`BlockDev::write_gathered`] fills memory of this layer's own that it keeps
    /// anyway (the crash journal's record), so that a caller holding the data in pieces (a
    /// guest's buffers) needs no buffer of its own for it: the default is `false`, and the
    /// caller then gathers into its buffer and calls [`BlockDev::write_at`].
    fn gathers_writes(&self) -> bool {
        false
    }
    /// Writes `len` bytes at `offset` that `fill` puts into a buffer of exactly `len` bytes
    /// this layer hands it (once, before anything of the write is done): the layer's private
    /// copy of them, which nobody else changes until the write is done. An error from `fill`
    /// fails the write with nothing written, recorded or changed. The default gathers into a
    /// fresh buffer and calls [`BlockDev::write_at`]; a layer only forwards this where it
    /// forwards [`BlockDev::gathers_writes`].
    fn write_gathered(
        &self,
        offset: u64,
        len: usize,
        fill: &mut dyn FnMut(&mut [u8]) -> Result<()>,
    ) -> Result<()> {
        write_via_buffer(self, offset, len, fill)
    }
}

/// [`BlockDev::write_gathered`]'s default, for layers that fall back to it: gathers into a
/// fresh buffer and writes that with `write_at`.
pub fn write_via_buffer<D: BlockDev + ?Sized>(
    dev: &D,
    offset: u64,
    len: usize,
    fill: &mut dyn FnMut(&mut [u8]) -> Result<()>,
) -> Result<()> {
    let mut buf = AlignedBuf::zeroed(len);
    fill(&mut buf)?;
    dev.write_at(&buf, offset)
}

/// The destination of [`BlockDev::read_into`]: bytes the caller does not hold as one slice of
/// its own memory (guest memory, reached through its descriptors).
pub trait ReadSink {
    /// How many bytes the read fills.
    fn len(&self) -> usize;
    /// Whether the read is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Copies `src` to the destination's bytes `[at, at + src.len())`.
    fn fill(&self, at: usize, src: &[u8]) -> io::Result<()>;
}

/// A plain slice is a destination too (tests, callers with a buffer of their own).
impl ReadSink for std::cell::RefCell<&mut [u8]> {
    fn len(&self) -> usize {
        self.borrow().len()
    }

    fn fill(&self, at: usize, src: &[u8]) -> io::Result<()> {
        let mut b = self.borrow_mut();
        let dst = at
            .checked_add(src.len())
            .and_then(|end| b.get_mut(at..end))
            .ok_or_else(|| io::Error::other("read sink range out of bounds"))?;
        dst.copy_from_slice(src);
        Ok(())
    }
}

/// Largest buffer [`with_bounce`] keeps per thread.
const BOUNCE_KEEP: usize = 1 << 20;

thread_local! {
    static BOUNCE: std::cell::Cell<AlignedBuf> = const { std::cell::Cell::new(AlignedBuf::new()) };
}

/// Runs `f` on a buffer of `n` bytes owned by the calling thread (kept for its next call, so
/// a request path allocates once; aligned for direct I/O, see [`AlignedBuf`]). Reentrant: a
/// nested call gets a buffer of its own.
pub fn with_bounce<T>(n: usize, f: impl FnOnce(&mut [u8]) -> T) -> T {
    let mut buf = BOUNCE.with(std::cell::Cell::take).at_least(n);
    let out = f(&mut buf[..n]);
    BOUNCE.with(|c| {
        // Keep the larger of a nested call's buffer and this one, unless it is large: a
        // thread does not keep more than `BOUNCE_KEEP` bytes for the next call.
        let other = c.take();
        let keep = if other.len() > buf.len() { other } else { buf };
        if keep.len() <= BOUNCE_KEEP {
            c.set(keep);
        }
    });
    out
}

/// Fills `dst`'s bytes `[at, at + n)` with what `read` puts into a buffer of the calling
/// thread ([`with_bounce`]): the path of a read that cannot copy straight into `dst`.
pub fn read_via_bounce(
    dst: &dyn ReadSink,
    at: usize,
    n: usize,
    read: impl FnOnce(&mut [u8]) -> Result<()>,
) -> Result<()> {
    with_bounce(n, |buf| {
        read(buf)?;
        dst.fill(at, buf).map_err(BlockError::Io)
    })
}

/// Where one stretch of a planned read comes from.
#[derive(Debug, Clone)]
pub enum PlanSource {
    /// Reads as zeros.
    Zero,
    /// The bytes of `file` from `offset` (a full read: the range lies inside the file).
    /// `direct`: an `O_DIRECT` description of the same file the bytes may be read through
    /// instead (where the buffers meet its alignments), offered where the host page cache
    /// does not hold them.
    File {
        file: Arc<File>,
        offset: u64,
        direct: Option<Arc<DirectReads>>,
    },
}

impl PlanSource {
    /// The bytes of `file` from `offset`, with no direct description.
    pub fn file(file: Arc<File>, offset: u64) -> PlanSource {
        PlanSource::File {
            file,
            offset,
            direct: None,
        }
    }
}

/// Something a [`ReadPlan`] keeps alive until it is dropped, which the caller does only after
/// every read of the plan completed: a layer's pin on the storage the plan names (the qcow2
/// engine's pin against reuse of its data clusters).
pub type PlanHold = Arc<dyn std::any::Any + Send + Sync>;

/// The answer of [`BlockDev::plan_read`]: consecutive pieces covering the range in order.
///
/// Contract: executing the plan at any later time returns what `read_at` returned when the plan
/// was made, except where a write-type request of the same guest range that did not complete
/// before the read was submitted changed it meanwhile (a read and a write in flight together
/// may see either). So storage a plan names is never reused for another guest range while the
/// plan exists: a layer whose storage can be reused (the qcow2 overlay's own data clusters,
/// which a flush frees and an allocation takes again) puts a pin in [`Self::holds`] that defers
/// the reuse until the plan is dropped. The caller keeps the plan (its files open, its holds
/// held) until its reads completed.
#[derive(Debug, Clone, Default)]
pub struct ReadPlan {
    /// `(length, source)` pieces, in guest order.
    pub pieces: Vec<(u64, PlanSource)>,
    /// Pins of the layers that named their own storage (see [`PlanHold`]).
    pub holds: Vec<PlanHold>,
}

impl ReadPlan {
    /// A plan of one piece.
    pub fn one(len: u64, source: PlanSource) -> Self {
        ReadPlan {
            pieces: vec![(len, source)],
            holds: Vec::new(),
        }
    }

    /// Appends `plan`, merging its first piece with the last one when they continue each other
    /// (zeros after zeros, or the next bytes of the same file; the merged piece keeps a direct
    /// description only if both had it), and taking over its holds.
    pub fn append(&mut self, plan: ReadPlan) {
        self.holds.extend(plan.holds);
        for (len, src) in plan.pieces {
            if let Some((last_len, last)) = self.pieces.last_mut() {
                let merged = match (&mut *last, &src) {
                    (PlanSource::Zero, PlanSource::Zero) => true,
                    (
                        PlanSource::File {
                            file: a,
                            offset: oa,
                            direct: da,
                        },
                        PlanSource::File {
                            file: b,
                            offset: ob,
                            direct: db,
                        },
                    ) if Arc::ptr_eq(a, b) && oa.checked_add(*last_len) == Some(*ob) => {
                        if db.is_none() {
                            *da = None;
                        }
                        true
                    }
                    _ => false,
                };
                if merged {
                    *last_len += len;
                    continue;
                }
            }
            self.pieces.push((len, src));
        }
    }

    /// Total length of the pieces.
    pub fn len(&self) -> u64 {
        self.pieces.iter().map(|(n, _)| n).sum()
    }

    /// Whether the plan covers nothing.
    pub fn is_empty(&self) -> bool {
        self.pieces.is_empty()
    }

    /// Executes the plan with positional reads (what the io_uring path does asynchronously):
    /// the planned bytes, [`Self::len`] of them.
    pub fn read_all(&self) -> io::Result<Vec<u8>> {
        let mut out = Vec::with_capacity(usize::try_from(self.len()).unwrap_or(0));
        for (len, src) in &self.pieces {
            let start = out.len();
            out.resize(start + usize::try_from(*len).unwrap_or(0), 0);
            if let PlanSource::File { file, offset, .. } = src {
                file.read_exact_at(&mut out[start..], *offset)?;
            }
        }
        Ok(out)
    }
}

/// Checks that `[offset, offset + len)` lies inside a device of `size` bytes, without overflow.
pub fn check_range(offset: u64, len: u64, size: u64) -> Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(BlockError::OutOfRange { offset, len, size }),
    }
}

/// An in-memory disk over a `Vec<u8>`, for tests and as a shadow model.
#[derive(Debug)]
pub struct MemDisk {
    data: RwLock<Vec<u8>>,
}

impl MemDisk {
    /// A zero-filled disk of `size` bytes.
    pub fn new(size: usize) -> Self {
        Self::from_vec(vec![0; size])
    }

    /// A disk holding `data`.
    pub fn from_vec(data: Vec<u8>) -> Self {
        MemDisk {
            data: RwLock::new(data),
        }
    }

    /// A copy of the whole content.
    pub fn snapshot(&self) -> Vec<u8> {
        self.data.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl BlockDev for MemDisk {
    fn size(&self) -> u64 {
        self.data.read().unwrap_or_else(|e| e.into_inner()).len() as u64
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let data = self.data.read().unwrap_or_else(|e| e.into_inner());
        check_range(offset, buf.len() as u64, data.len() as u64)?;
        let start = offset as usize;
        buf.copy_from_slice(&data[start..start + buf.len()]);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        let mut data = self.data.write().unwrap_or_else(|e| e.into_inner());
        check_range(offset, buf.len() as u64, data.len() as u64)?;
        let start = offset as usize;
        data[start..start + buf.len()].copy_from_slice(buf);
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.write_zeroes(offset, len, true)
    }

    fn write_zeroes(&self, offset: u64, len: u64, _unmap: bool) -> Result<()> {
        let mut data = self.data.write().unwrap_or_else(|e| e.into_inner());
        check_range(offset, len, data.len() as u64)?;
        data[offset as usize..(offset + len) as usize].fill(0);
        Ok(())
    }
}

/// Opens the image file `path` for reading, and for writing unless `read_only`, and locks it as
/// QEMU would ([`lock::Perms::for_open`]): a read-write open refuses an image another process
/// uses, a read-only open refuses an image another process writes (unless inside
/// [`lock::with_force_share`]). The lock lives as long as the returned `File`.
pub fn open_file(path: &Path, read_only: bool) -> io::Result<File> {
    let file = OpenOptions::new().read(true).write(!read_only).open(path)?;
    lock::lock_image(&file, lock::Perms::for_open(read_only))?;
    Ok(file)
}

/// Reads exactly `buf.len()` bytes at `offset`; bytes past the end of the file read as zeros.
pub fn read_full_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => {
                buf[done..].fill(0);
                return Ok(());
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Appended pieces that continue each other merge (zeros after zeros too); the merged piece
    /// offers a direct description only if both did (a part the page cache holds is read
    /// buffered).
    #[test]
    fn appended_file_pieces_merge_and_keep_a_direct_description_only_if_both_had_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, vec![5u8; 1 << 16]).unwrap();
        let file = Arc::new(File::open(&path).unwrap());
        let direct = Arc::new(DirectReads::open(&file).expect("O_DIRECT in the temp directory"));
        let piece = |offset: u64, d: bool| PlanSource::File {
            file: Arc::clone(&file),
            offset,
            direct: d.then(|| Arc::clone(&direct)),
        };
        let direct_of = |p: &ReadPlan| match &p.pieces[..] {
            [(_, PlanSource::File { direct, .. })] => direct.is_some(),
            other => panic!("not one file piece: {other:?}"),
        };
        let mut both = ReadPlan::one(4096, piece(0, true));
        both.append(ReadPlan::one(4096, piece(4096, true)));
        assert_eq!(both.len(), 8192);
        assert!(direct_of(&both));
        let mut first_only = ReadPlan::one(4096, piece(0, true));
        first_only.append(ReadPlan::one(4096, piece(4096, false)));
        assert!(!direct_of(&first_only));
        let mut second_only = ReadPlan::one(4096, piece(0, false));
        second_only.append(ReadPlan::one(4096, piece(4096, true)));
        assert!(!direct_of(&second_only));
        // Zeros after zeros: one piece.
        let mut zeros = ReadPlan::one(4096, PlanSource::Zero);
        zeros.append(ReadPlan::one(512, PlanSource::Zero));
        assert_eq!(zeros.pieces.len(), 1);
        assert_eq!(zeros.len(), 4608);
        // Not continuing: two pieces, each keeping its own.
        let mut gap = ReadPlan::one(4096, piece(0, true));
        gap.append(ReadPlan::one(4096, piece(12288, false)));
        assert_eq!(gap.pieces.len(), 2);
        assert_eq!(gap.read_all().unwrap(), vec![5u8; 8192]);
    }

    #[test]
    fn check_range_rejects_overflow_and_past_end() {
        assert!(check_range(0, 10, 10).is_ok());
        assert!(check_range(1, 10, 10).is_err());
        assert!(check_range(u64::MAX, 2, u64::MAX).is_err());
    }

    #[test]
    fn read_into_by_default_reads_like_read_at_and_refuses_a_piece_past_the_sink() {
        let d = MemDisk::from_vec((0..=255u8).cycle().take(8192).collect());
        let mut got = vec![0u8; 1000];
        d.read_into(&std::cell::RefCell::new(&mut got[..]), 300)
            .unwrap();
        let mut want = vec![0u8; 1000];
        d.read_at(&mut want, 300).unwrap();
        assert_eq!(got, want);
        let mut small = [0u8; 4];
        let sink = std::cell::RefCell::new(&mut small[..]);
        assert!(sink.fill(2, &[1, 2, 3]).is_err());
        assert!(sink.fill(usize::MAX, &[1]).is_err());
    }

    #[test]
    fn a_nested_bounce_buffer_is_its_own_and_the_larger_one_is_kept() {
        with_bounce(16, |outer| {
            outer.fill(7);
            with_bounce(64, |inner| {
                assert_eq!(inner.len(), 64);
                inner.fill(9);
            });
            assert!(
                outer.iter().all(|&b| b == 7),
                "a nested call reused the outer buffer"
            );
        });
        BOUNCE.with(|c| {
            let kept = c.take();
            assert!(kept.len() >= 64);
            c.set(kept);
        });
        // A buffer past the bound is not kept for the next call.
        with_bounce(BOUNCE_KEEP + 1, |b| b.fill(1));
        BOUNCE.with(|c| {
            let kept = c.take();
            assert!(kept.len() <= BOUNCE_KEEP, "kept {} bytes", kept.len());
            c.set(kept);
        });
    }

    #[test]
    fn memdisk_reads_back_writes_and_zeroes() {
        let d = MemDisk::new(4096);
        d.write_at(&[7; 100], 10).unwrap();
        let mut b = [0u8; 120];
        d.read_at(&mut b, 0).unwrap();
        assert_eq!(&b[..10], &[0; 10]);
        assert_eq!(&b[10..110], &[7; 100]);
        d.write_zeroes(20, 10, false).unwrap();
        d.read_at(&mut b, 0).unwrap();
        assert_eq!(&b[20..30], &[0; 10]);
        assert_eq!(b[30], 7);
        assert!(d.write_at(&[1], 4096).is_err());
    }
}
