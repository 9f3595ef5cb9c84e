//! The host-file abstraction the qcow2 engine does all its image-file I/O through.
//!
//! The trait is deliberately tiny so that a crash-recording or fault-injecting layer can sit
//! under the engine and see every write and every `sync_data` in order. [`FileHost`] is the real
//! file; [`MemHost`] keeps the file in memory (tests, crash simulation); [`ReplayHost`]
//! (`replay.rs`) sits between the engine and its file and deals with failed `fdatasync`s.
//!
//! Locking model: implementations take `&self` and must be safe to call from several threads at
//! once. `FileHost` relies on positional I/O (no shared cursor) and takes its grow-ahead mutex (a
//! leaf) only to extend the file; `MemHost` uses one `RwLock`. `ReplayHost`'s locks: see
//! `replay.rs`.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use blockdev::{DirectReads, PlanSource};

use crate::direct::{set_o_direct, DirectIo};

mod batch;
mod replay;
#[cfg(test)]
mod tests;

pub use batch::disable_rings;
pub(crate) use batch::Rings;
pub use replay::{ReplayHost, REPLAY_LIMIT_BYTES};

/// Positional I/O on the file that holds a qcow2 image.
#[allow(clippy::len_without_is_empty)]
pub trait HostFile: Send + Sync {
    /// Fills `buf` from `offset`; bytes past the end of the file read as zeros.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes all of `buf` at `offset`, extending the file if needed.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Writes every `(buf, offset)` of `writes`, as [`HostFile::write_at`] would, one result per
    /// write in order. No two of them overlap; they may reach the file in any order and at
    /// once (an O_DIRECT [`FileHost`] puts them on an io_uring together).
    fn write_batch(&self, writes: &[(&[u8], u64)]) -> Vec<io::Result<()>> {
        writes.iter().map(|&(b, o)| self.write_at(b, o)).collect()
    }
    /// Makes every completed write durable.
    fn sync_data(&self) -> io::Result<()>;
    /// Current length of the file.
    fn len(&self) -> io::Result<u64>;
    /// Truncates or extends the file.
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Moves the file's data path below the host page cache (O_DIRECT, see [`crate::direct`]).
    /// Files that cannot do so say `Unsupported`.
    fn enable_direct(&self) -> io::Result<()> {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "this image file cannot use O_DIRECT",
        ))
    }
    /// Whether completed writes sit in a host page cache until a sync (a buffered file):
    /// then the image starts syncing written data early in the background (see
    /// `image/early_writeback.rs`). Files without such a cache (O_DIRECT, memory) say no.
    fn page_cached(&self) -> bool {
        false
    }
    /// Whether a failed `sync_data` may have dropped writes that had reported success (a
    /// buffered file: Linux marks the pages it could not write clean). With O_DIRECT each write
    /// reaches the device before it returns, or reports its own error, so a failed sync loses
    /// nothing a later sync could not make durable; such a file says no.
    fn failed_sync_drops_writes(&self) -> bool {
        true
    }
    /// Gives back space the file grew ahead of its writes (a [`FileHost`] whose writes, all or
    /// the large ones, go direct), so that a cleanly closed image is as long as its writes
    /// made it. Called by a clean close.
    fn release_growth(&self) -> io::Result<()> {
        Ok(())
    }
    /// Lets a buffered file write large aligned requests (at least `min` bytes) with O_DIRECT,
    /// past the host page cache; the rest stays buffered. Files that cannot say `Unsupported`.
    fn enable_direct_large(&self, _min: usize) -> io::Result<()> {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "this image file cannot write large requests with O_DIRECT",
        ))
    }
    /// Whether [`HostFile::write_at`] of `buf` at `offset` goes to the device with O_DIRECT
    /// while the file is otherwise buffered (see [`HostFile::enable_direct_large`]): such a
    /// write reports its own error, and a later failed sync cannot drop it.
    fn writes_directly(&self, _buf: &[u8], _offset: u64) -> bool {
        false
    }
    /// Writes every `(buf, offset)` of `writes` as [`HostFile::write_batch`] does, for a caller
    /// that syncs the file right after (the writeback of a guest FLUSH): a buffered file whose
    /// large writes go with O_DIRECT ([`HostFile::enable_direct_large`]) sends every one it can
    /// ([`HostFile::syncs_directly`]) to the device with O_DIRECT whatever its size, all in
    /// flight together, and the rest through the host page cache. The default is
    /// `write_batch`.
    fn write_batch_to_sync(&self, writes: &[(&[u8], u64)]) -> Vec<io::Result<()>> {
        self.write_batch(writes)
    }
    /// Whether [`HostFile::write_batch_to_sync`] writes `buf` at `offset` with O_DIRECT while
    /// the file is otherwise buffered (as [`HostFile::writes_directly`], which is the default,
    /// says of `write_at`).
    fn syncs_directly(&self, buf: &[u8], offset: u64) -> bool {
        self.writes_directly(buf, offset)
    }
    /// Writes all of `buf` at `offset` like [`HostFile::write_at`], except that a file whose
    /// large requests go with O_DIRECT ([`HostFile::enable_direct_large`]) writes this one
    /// through the host page cache whatever its size: a rewrite in place, which the page cache
    /// absorbs as it does every write of a raw image. A file whose every write goes direct
    /// writes it direct.
    fn write_cached_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.write_at(buf, offset)
    }
    /// Where a planned read (`BlockDev::plan_read`: the caller reads later, on its own) finds
    /// the file's bytes `[offset, offset + len)`: a read-only description of the file through
    /// the host page cache, with an O_DIRECT one offered where the page cache does not hold
    /// all of them. `None` (the default; a [`FileHost`] opened without
    /// [`FileHost::with_planned_reads`]) sends such reads through [`HostFile::read_at`].
    fn plan_source(&self, _offset: u64, _len: u64) -> Option<PlanSource> {
        None
    }
}

/// Implements [`HostFile`] for a pointer type by forwarding every method to what it points at:
/// `Arc` (a test or a recording layer keeps a handle to the file) and `Box` (an owned host file
/// of any kind).
macro_rules! forward_host_file {
    ($($ptr:ident)::+) => {
        impl<T: HostFile + ?Sized> HostFile for $($ptr)::+<T> {
            fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
                (**self).read_at(buf, offset)
            }

            fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
                (**self).write_at(buf, offset)
            }

            fn write_batch(&self, writes: &[(&[u8], u64)]) -> Vec<io::Result<()>> {
                (**self).write_batch(writes)
            }

            fn sync_data(&self) -> io::Result<()> {
                (**self).sync_data()
            }

            fn len(&self) -> io::Result<u64> {
                (**self).len()
            }

            fn set_len(&self, len: u64) -> io::Result<()> {
                (**self).set_len(len)
            }

            fn enable_direct(&self) -> io::Result<()> {
                (**self).enable_direct()
            }

            fn page_cached(&self) -> bool {
                (**self).page_cached()
            }

            fn failed_sync_drops_writes(&self) -> bool {
                (**self).failed_sync_drops_writes()
            }

            fn release_growth(&self) -> io::Result<()> {
                (**self).release_growth()
            }

            fn enable_direct_large(&self, min: usize) -> io::Result<()> {
                (**self).enable_direct_large(min)
            }

            fn writes_directly(&self, buf: &[u8], offset: u64) -> bool {
                (**self).writes_directly(buf, offset)
            }

            fn write_cached_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
                (**self).write_cached_at(buf, offset)
            }

            fn write_batch_to_sync(&self, writes: &[(&[u8], u64)]) -> Vec<io::Result<()>> {
                (**self).write_batch_to_sync(writes)
            }

            fn syncs_directly(&self, buf: &[u8], offset: u64) -> bool {
                (**self).syncs_directly(buf, offset)
            }

            fn plan_source(&self, offset: u64, len: u64) -> Option<PlanSource> {
                (**self).plan_source(offset, len)
            }
        }
    };
}

forward_host_file!(std::sync::Arc);
forward_host_file!(Box);

/// The results of `writes` in order: the ones `pick` chooses written by `together` (which
/// gets them in order and answers each), the others one by one by `alone`.
pub(super) fn split_batch(
    writes: &[(&[u8], u64)],
    pick: impl Fn(&[u8], u64) -> bool,
    together: impl FnOnce(&[(&[u8], u64)]) -> Vec<io::Result<()>>,
    alone: impl Fn(&[u8], u64) -> io::Result<()>,
) -> Vec<io::Result<()>> {
    let picked: Vec<usize> = (0..writes.len())
        .filter(|&k| pick(writes[k].0, writes[k].1))
        .collect();
    let mut results: Vec<Option<io::Result<()>>> = (0..writes.len()).map(|_| None).collect();
    if !picked.is_empty() {
        let batch: Vec<(&[u8], u64)> = picked.iter().map(|&k| writes[k]).collect();
        for (&k, r) in picked.iter().zip(together(&batch)) {
            results[k] = Some(r);
        }
    }
    results
        .into_iter()
        .zip(writes)
        .map(|(r, &(b, o))| r.unwrap_or_else(|| alone(b, o)))
        .collect()
}

/// Bytes a file grows ahead of a write past its end (see [`FileHost`]).
pub const GROW_AHEAD: u64 = 64 << 20;

/// A real file, buffered or (after [`HostFile::enable_direct`]) with O_DIRECT, or buffered with
/// its large aligned writes direct (after [`HostFile::enable_direct_large`]).
///
/// With O_DIRECT, or with its large writes direct, the file grows ahead of its writes: a write
/// past the end (direct or buffered) first extends the file by [`GROW_AHEAD`] with
/// `fallocate`. On ext4 (and others) a direct write that allocates blocks takes the inode lock
/// exclusively and so runs alone, one at a time: the writebacks of a fresh overlay would queue
/// behind each other (about 5,000 4 KiB writes a second here, whatever the number of threads).
/// Into blocks already allocated, aligned direct writes run in parallel. A buffered write into
/// allocated blocks skips ext4's delayed allocation (a block reservation at every write, then
/// an allocation per extent when the kernel writes the page back): with 4 KiB written into
/// each cluster of a fresh overlay (an extent of its own per write) that was a third of the
/// daemon's CPU. QEMU's `preallocate` filter does the same. A clean close
/// ([`HostFile::release_growth`]) truncates the file to the end of what was written, so the
/// image is as long as buffered writes would have left it; a crash leaves the grown tail
/// (zeros no metadata points at: qemu-img check finds nothing to report).
#[derive(Debug)]
pub struct FileHost {
    file: File,
    direct: std::sync::OnceLock<DirectIo>,
    /// A second, O_DIRECT descriptor of the same file for large writes while `file` stays
    /// buffered ([`HostFile::enable_direct_large`]), the smallest write it takes, and the
    /// granularity its writes must be aligned to (the page size, see `large_route`).
    large: std::sync::OnceLock<(File, DirectIo, usize, u64)>,
    growth: Growth,
    /// Rings for batches of direct writes ([`HostFile::write_batch`]).
    rings: batch::Rings,
    /// Descriptions planned reads read through ([`FileHost::with_planned_reads`]).
    reads: Option<PlannedReads>,
}

/// Read-only descriptions of a [`FileHost`]'s file (without O_DIRECT whatever the file's own
/// flags) for the reads its plans name ([`HostFile::plan_source`]), and for random reads
/// without read-ahead, as a read-only raw file has (`blockdev/src/file.rs`).
#[derive(Debug)]
struct PlannedReads {
    /// Plain: sequential and large reads, with the kernel's read-ahead.
    seq: Arc<File>,
    /// Advised `POSIX_FADV_RANDOM`: short reads that continue no recent read.
    random: Option<Arc<File>>,
    /// O_DIRECT: offered to plans of random reads the host page cache does not hold.
    direct: Option<Arc<DirectReads>>,
    streams: blockdev::ReadStreams,
}

impl PlannedReads {
    /// The description a buffered read of `len` bytes at `offset` goes through, noting it.
    fn for_read(&self, offset: u64, len: u64) -> &Arc<File> {
        match &self.random {
            Some(r) if self.streams.note_random(offset, len) => r,
            _ => &self.seq,
        }
    }
}

/// The grow-ahead state of a [`FileHost`] whose writes (all, or the large ones) go direct.
#[derive(Debug, Default)]
struct Growth {
    /// The file is at least this long (0: not known yet); writes below it allocate nothing new.
    grown_to: AtomicU64,
    /// End of what was written (or set by `set_len`), block-aligned, or the length at the
    /// switch to O_DIRECT if larger: where a clean close cuts the file.
    written_to: AtomicU64,
    /// Whether the file was ever grown ahead (only then does a close truncate it).
    grew: AtomicBool,
    /// `fallocate` failed once (unsupported, or no space): stop trying.
    off: AtomicBool,
    /// Serializes growing.
    lock: Mutex<()>,
}

impl FileHost {
    /// Wraps an open file.
    pub fn new(file: File) -> Self {
        FileHost {
            file,
            direct: std::sync::OnceLock::new(),
            large: std::sync::OnceLock::new(),
            growth: Growth::default(),
            rings: batch::Rings::for_writes(),
            reads: None,
        }
    }

    /// Opens the read-only descriptions planned reads of the file go through
    /// ([`HostFile::plan_source`]) and that its short random reads take without read-ahead: a
    /// plain one, one advised `POSIX_FADV_RANDOM` and, where the file system can, an O_DIRECT
    /// one. Call at open, before a sandbox forbids opening files. Where they cannot be opened
    /// (not a regular file), the file plans nothing and every read takes the file itself.
    pub fn with_planned_reads(mut self) -> Self {
        if !self.file.metadata().is_ok_and(|m| m.is_file()) {
            return self;
        }
        match blockdev::reopen_read_only(&self.file) {
            Ok(f) => {
                self.reads = Some(PlannedReads {
                    random: blockdev::random_twin(&f),
                    direct: DirectReads::open(&f).map(Arc::new),
                    seq: Arc::new(f),
                    streams: blockdev::ReadStreams::default(),
                });
            }
            Err(e) => log::debug!("image file: no description for planned reads ({e})"),
        }
        self
    }

    /// Writes batches one `pwrite` at a time, never on a ring (tests of that fallback).
    pub fn disable_write_rings(&self) {
        self.rings.disable();
    }

    /// How many writes of batches completed on an io_uring so far.
    pub fn ring_writes(&self) -> u64 {
        self.rings.completed()
    }

    /// The O_DIRECT descriptor and alignment a buffered file writes `buf` at `offset` with, if
    /// it does: large enough, aligned in memory for direct I/O, and covering whole pages. Whole
    /// pages because the kernel drops the cached pages a direct write covers after it, and
    /// cannot drop one that a buffered write into its other half dirtied meanwhile: that page
    /// would keep the old bytes of the direct half for later buffered reads. No buffered write
    /// shares a page with a direct one in flight (`ReplayHost` orders overlapping changes).
    /// What this does not rule out: a kernel that caches the file in large folios (ext4 since
    /// Linux 6.16) can hold a direct write's page in one folio with a neighbour's; a folio that
    /// read-ahead brings in *during* the direct write (with the page's old bytes) and that a
    /// buffered write of the neighbour then dirties cannot be dropped after the write (the
    /// kernel logs "Page cache invalidation failure on direct I/O"). Before the write the
    /// kernel writes such a folio back and drops it, or falls back to a buffered write, so
    /// only that read-ahead window remains, and [`FileHost::mend_after_direct`] closes it.
    fn large_route(&self, buf: &[u8], offset: u64) -> Option<(&File, &DirectIo)> {
        let min = self.large.get()?.2;
        self.page_route(buf, offset, min)
    }

    /// The O_DIRECT descriptor and alignment a buffered file writes `buf` at `offset` with
    /// when at least `min` bytes go direct (the rule of [`FileHost::large_route`]).
    fn page_route(&self, buf: &[u8], offset: u64, min: usize) -> Option<(&File, &DirectIo)> {
        let (f, d, _, page) = self.large.get()?;
        (self.direct.get().is_none()
            && buf.len() >= min
            && offset.is_multiple_of(*page)
            && (buf.len() as u64).is_multiple_of(*page)
            && d.takes_as_is(buf, offset))
        .then_some((f, d))
    }

    /// Makes sure `[.., end)` lies inside the file before a direct write: extends the file by
    /// [`GROW_AHEAD`] past `end` when `end` is past the file's end, and, once the file was
    /// grown, already when `end` comes within half of that of the end. Failing to grow is not
    /// an error (the write then allocates its own blocks, and reports ENOSPC itself).
    ///
    /// Growing early keeps the writers going: `fallocate` waits for ext4's journal, which a
    /// concurrent `fdatasync` (a flush, the crash journal's trim) holds for milliseconds. A
    /// writer whose range already lies inside the file only tries the grow lock and goes on
    /// if another writer is growing; only a writer past the end waits for the growth. Before
    /// the first growth, and after a clean close gave it back, writes inside the file (the
    /// header, tables of a small image) grow nothing.
    fn grow_for(&self, end: u64) {
        let g = &self.growth;
        let early = |grown: u64| {
            let margin = if g.grew.load(Ordering::Acquire) {
                GROW_AHEAD / 2
            } else {
                0
            };
            end.saturating_add(margin) <= grown
        };
        if early(g.grown_to.load(Ordering::Acquire)) || g.off.load(Ordering::Relaxed) {
            return;
        }
        let _one = if end <= g.grown_to.load(Ordering::Acquire) {
            match g.lock.try_lock() {
                Ok(l) => l,
                Err(std::sync::TryLockError::Poisoned(e)) => e.into_inner(),
                Err(std::sync::TryLockError::WouldBlock) => return,
            }
        } else {
            g.lock.lock().unwrap_or_else(|e| e.into_inner())
        };
        if early(g.grown_to.load(Ordering::Acquire)) {
            return;
        }
        let Ok(len) = blockdev::file_size(&self.file) else {
            return;
        };
        if early(len) {
            g.grown_to.store(len, Ordering::Release);
            return;
        }
        let to = end
            .max(len)
            .saturating_add(GROW_AHEAD)
            .next_multiple_of(1 << 20);
        let (Ok(from), Ok(n)) = (i64::try_from(len), i64::try_from(to - len)) else {
            return;
        };
        // SAFETY: fallocate on a valid fd with plain integer arguments.
        let r = unsafe { libc::fallocate(self.file.as_raw_fd(), 0, from, n) };
        if r == 0 {
            g.grew.store(true, Ordering::Release);
            g.grown_to.store(to, Ordering::Release);
        } else {
            log::debug!(
                "cannot grow the image file ahead of its writes: {}",
                io::Error::last_os_error()
            );
            g.off.store(true, Ordering::Relaxed);
        }
    }

    /// Writes `writes` through `f`, an O_DIRECT description of the file, on a ring together
    /// (what the file cannot take as it is, and all where no ring can be had, one at a time),
    /// growing the file ahead first and noting where the written blocks end.
    fn ring_write(&self, f: &File, d: &DirectIo, writes: &[(&[u8], u64)]) -> Vec<io::Result<()>> {
        let end = writes
            .iter()
            .map(|&(b, o)| o.saturating_add(b.len() as u64))
            .max()
            .unwrap_or(0);
        self.grow_for(end);
        let results = self.rings.write(d, f, f.as_raw_fd(), writes);
        for (r, &(b, o)) in results.iter().zip(writes) {
            if r.is_ok() {
                let end = o.saturating_add(b.len() as u64);
                self.growth
                    .written_to
                    .fetch_max(end.next_multiple_of(d.block()), Ordering::AcqRel);
            }
        }
        results
    }

    /// After a write of `buf` at `offset` through the large-write O_DIRECT description of a
    /// buffered file: where the host page cache holds any page of the range now, the write is
    /// repeated through it. Normally the kernel has dropped those pages; one it could not drop
    /// (a large folio that read-ahead brought in during the write, with the old bytes, and a
    /// buffered write of a neighbouring page then dirtied: see [`FileHost::large_route`])
    /// would serve the old bytes to later buffered reads. Repeating the write costs a copy only
    /// when the page cache holds the range; without `cachestat` nothing is checked.
    fn mend_after_direct(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if blockdev::page_cache_pages(&self.file, offset, buf.len() as u64).is_some_and(|n| n > 0) {
            self.file.write_all_at(buf, offset)?;
        }
        Ok(())
    }

    /// A write through the host page cache (the file is not all direct).
    fn write_buffered(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let end = offset.saturating_add(buf.len() as u64);
        let grows = self.large.get().is_some();
        if grows {
            // Into preallocated blocks (see the type's documentation).
            self.grow_for(end);
        }
        self.file.write_all_at(buf, offset)?;
        if grows {
            // Where a clean close cuts the file: the buffered writes' end counts too.
            self.growth.written_to.fetch_max(end, Ordering::AcqRel);
        }
        Ok(())
    }

    /// Whether the file's I/O bypasses the host page cache.
    pub fn is_direct(&self) -> bool {
        self.direct.get().is_some()
    }

    /// The underlying file.
    pub fn file(&self) -> &File {
        &self.file
    }
}

impl HostFile for FileHost {
    fn plan_source(&self, offset: u64, len: u64) -> Option<PlanSource> {
        let r = self.reads.as_ref()?;
        let file = r.for_read(offset, len);
        // Like a raw base, O_DIRECT is offered to random reads the page cache does not hold;
        // on a file whose I/O is all direct (`--direct on`: one cache, the folio cache) to
        // every read the page cache does not hold.
        let direct = r
            .direct
            .as_ref()
            .filter(|d| {
                (self.is_direct() || !Arc::ptr_eq(file, &r.seq)) && d.offers(file, offset, len)
            })
            .cloned();
        Some(PlanSource::File {
            file: Arc::clone(file),
            offset,
            direct,
        })
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        match (self.direct.get(), &self.reads) {
            (Some(d), _) => d.read_at(&self.file, buf, offset),
            // A short random read without read-ahead (the descriptions share the page cache).
            (None, Some(r)) => {
                blockdev::read_full_at(r.for_read(offset, buf.len() as u64), buf, offset)
            }
            (None, None) => blockdev::read_full_at(&self.file, buf, offset),
        }
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let end = offset.saturating_add(buf.len() as u64);
        let direct = self.direct.get().map(|d| (&self.file, d));
        match direct.or_else(|| self.large_route(buf, offset)) {
            Some((f, d)) => {
                self.grow_for(end);
                d.write_at(f, buf, offset)?;
                if !self.is_direct() {
                    self.mend_after_direct(buf, offset)?;
                }
                // Direct writes cover whole blocks: the file reaches the block's end.
                self.growth
                    .written_to
                    .fetch_max(end.next_multiple_of(d.block()), Ordering::AcqRel);
                Ok(())
            }
            None => self.write_buffered(buf, offset),
        }
    }

    fn write_cached_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if self.is_direct() {
            return self.write_at(buf, offset);
        }
        self.write_buffered(buf, offset)
    }

    fn write_batch(&self, writes: &[(&[u8], u64)]) -> Vec<io::Result<()>> {
        // Buffered, or nothing to put in flight together: one write after another.
        let Some(d) = self.direct.get().filter(|_| writes.len() >= 2) else {
            return writes.iter().map(|&(b, o)| self.write_at(b, o)).collect();
        };
        self.ring_write(&self.file, d, writes)
    }

    fn writes_directly(&self, buf: &[u8], offset: u64) -> bool {
        self.large_route(buf, offset).is_some()
    }

    fn syncs_directly(&self, buf: &[u8], offset: u64) -> bool {
        // Any size: the page rule still holds (see `large_route`), and an empty write is
        // nothing to put on a ring.
        !buf.is_empty() && self.page_route(buf, offset, 1).is_some()
    }

    fn write_batch_to_sync(&self, writes: &[(&[u8], u64)]) -> Vec<io::Result<()>> {
        let Some((f, d, _, _)) = self.large.get().filter(|_| !self.is_direct()) else {
            return self.write_batch(writes);
        };
        split_batch(
            writes,
            |b, o| self.syncs_directly(b, o),
            |direct| {
                let results = self.ring_write(f, d, direct);
                results
                    .into_iter()
                    .zip(direct)
                    .map(|(r, &(b, o))| r.and_then(|()| self.mend_after_direct(b, o)))
                    .collect()
            },
            |b, o| self.write_buffered(b, o),
        )
    }

    fn enable_direct_large(&self, min: usize) -> io::Result<()> {
        if self.large.get().is_some() || self.is_direct() {
            return Ok(());
        }
        let f = crate::direct::reopen_direct(&self.file, true)?;
        let d = DirectIo::for_file(&f);
        self.growth
            .written_to
            .fetch_max(blockdev::file_size(&self.file)?, Ordering::AcqRel);
        // SAFETY: sysconf has no memory effects.
        let page = u64::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
        let page = page.max(d.block()).max(512).next_power_of_two();
        let _ = self.large.set((f, d, min.max(1), page));
        Ok(())
    }

    fn sync_data(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn len(&self) -> io::Result<u64> {
        // Works for block devices too (their metadata length is 0).
        blockdev::file_size(&self.file)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let g = &self.growth;
        let _one = g.lock.lock().unwrap_or_else(|e| e.into_inner());
        self.file.set_len(len)?;
        g.written_to.store(len, Ordering::Release);
        g.grown_to.store(len, Ordering::Release);
        Ok(())
    }

    fn release_growth(&self) -> io::Result<()> {
        let g = &self.growth;
        let _one = g.lock.lock().unwrap_or_else(|e| e.into_inner());
        if !g.grew.load(Ordering::Acquire) {
            return Ok(());
        }
        let keep = g.written_to.load(Ordering::Acquire);
        if blockdev::file_size(&self.file)? > keep {
            self.file.set_len(keep)?;
        }
        g.grown_to.store(keep, Ordering::Release);
        g.grew.store(false, Ordering::Release);
        Ok(())
    }

    fn enable_direct(&self) -> io::Result<()> {
        if self.is_direct() {
            return Ok(());
        }
        let d = DirectIo::for_file(&self.file);
        self.growth
            .written_to
            .fetch_max(blockdev::file_size(&self.file)?, Ordering::AcqRel);
        set_o_direct(&self.file, true)?;
        // Callers switch before any I/O of the image runs, so no request sees half a switch.
        let _ = self.direct.set(d);
        Ok(())
    }

    fn page_cached(&self) -> bool {
        !self.is_direct()
    }

    fn failed_sync_drops_writes(&self) -> bool {
        !self.is_direct()
    }
}

/// An image file held in memory.
#[derive(Debug, Default)]
pub struct MemHost {
    data: RwLock<Vec<u8>>,
}

/// Largest in-memory file, to keep a hostile offset from allocating without bound.
const MEM_HOST_MAX: u64 = 4 << 30;

impl MemHost {
    /// A file with `data` as its content.
    pub fn new(data: Vec<u8>) -> Self {
        MemHost {
            data: RwLock::new(data),
        }
    }

    /// A copy of the content.
    pub fn contents(&self) -> Vec<u8> {
        self.data.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

fn mem_range(offset: u64, len: usize) -> io::Result<(usize, usize)> {
    let end = offset
        .checked_add(len as u64)
        .filter(|&e| e <= MEM_HOST_MAX)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "offset too large"))?;
    Ok((offset as usize, end as usize))
}

impl HostFile for MemHost {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let data = self.data.read().unwrap_or_else(|e| e.into_inner());
        buf.fill(0);
        let (start, _) = mem_range(offset, buf.len())?;
        if let Some(avail) = data.get(start..) {
            let n = avail.len().min(buf.len());
            buf[..n].copy_from_slice(&avail[..n]);
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut data = self.data.write().unwrap_or_else(|e| e.into_inner());
        let (start, end) = mem_range(offset, buf.len())?;
        if data.len() < end {
            data.resize(end, 0);
        }
        data[start..end].copy_from_slice(buf);
        Ok(())
    }

    fn sync_data(&self) -> io::Result<()> {
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.data.read().unwrap_or_else(|e| e.into_inner()).len() as u64)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let (_, end) = mem_range(len, 0)?;
        self.data
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .resize(end, 0);
        Ok(())
    }
}
