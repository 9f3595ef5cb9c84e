//! The qcow2 engine: [`QcowImage`] implements [`BlockDev`] over a [`HostFile`], with a backing
//! device underneath for clusters the image does not allocate.
//!
//! # Modules
//! - [`header`]: [`ImageHeader`] parsing and feature checks, [`BackingSpec`].
//! - [`metadata`]: L1/L2 lookups and updates, [`Mapping`]/[`Extent`].
//! - [`table_cache`]: the one LRU for L2 tables and refcount blocks.
//! - [`alloc`]: refcounts, allocation, refcount-table growth and the metadata flush.
//! - [`datapath`]: read/write/COW/zero/discard/close of [`QcowImage`].
//! - [`batch`]: batches of writes (the cache's writebacks): one plan, the copy-on-write
//!   clusters assembled in one arena and filled from an O_DIRECT raw base on a ring, one publish.
//! - [`flush`]: the flush, which plans under the metadata lock and syncs without it.
//! - [`pins`]: planned reads' pins on data clusters, and the quarantine of freed clusters.
//!
//! # Locking model
//! - `meta: Mutex<Meta>` guards all metadata: the L1 table, the L2-table and refcount-block
//!   caches, the refcount table, the allocator and the set of guest clusters with an allocation
//!   in flight. It is held only for lookups, metadata updates and a flush's pwrites of
//!   refcount blocks and refcount-table entries, never across a flush's fdatasync (see
//!   [`flush`]); guest data is read and written with the lock released. (Exceptions: the
//!   refcount-table growth, and the in-lock flush forced by the dirty-metadata bound.)
//! - `flush_lock: Mutex<()>` serializes flushes; taken before `meta`, released before `gate`.
//! - `alloc_done: Condvar` (with `meta`) wakes requests that wait for another request's
//!   allocation of the same guest cluster: the first request allocates, the second waits and
//!   then writes into the now-allocated cluster, so a cluster is never allocated twice and
//!   neither write is lost.
//! - `gate: RwLock<()>`: every data request holds it shared from the mapping lookup until its
//!   data I/O is done. Freed host clusters become reusable only inside `flush`, under the gate
//!   held exclusively, so no request can still be using a stale mapping to a reused cluster.
//!   A planned read (`BlockDev::plan_read`) executes after it released `gate`: its plan holds a
//!   pin, and clusters freed while pins from before are live wait in a quarantine ([`pins`]).
//!   Lock order: `gate` before `meta`; `meta` is never held while acquiring `gate`; the pins'
//!   mutex is a leaf.
//!
//! # Write ordering
//! Allocating writes (COW) write the whole new cluster (guest data plus the bytes it does not
//! cover, taken from what the guest saw before) while the L2 entry still points to the old
//! state, and only then update the L2 entry *in memory*. Dirty L2 tables, refcount blocks and
//! L1/refcount-table entries stay in memory until a flush, which writes them in dependency
//! order: sync data -> refcount blocks -> sync -> refcount-table entries -> sync -> L2 tables
//! -> sync -> L1 entries -> sync. Refcount-table entries go in levels: the entry of a block
//! that counts other new blocks is durable before theirs. A refcount-table growth writes the
//! blocks and the new table, syncs, switches the header, syncs, and only then switches the
//! in-memory table, so memory never names a table the header does not. A failed sync is
//! repaired by [`ReplayHost`] or makes every later write, flush and close fail with EIO. Refcount decrements of replaced clusters are applied only
//! after the flush that made the replacing references durable, so a crash can leak clusters
//! but never leave a reference to a free or reused cluster. A bound on dirty metadata forces
//! an internal flush.

mod alloc;
mod batch;
mod datapath;
mod early_writeback;
mod flush;
mod header;
mod metadata;
mod pins;
mod table_cache;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock};

use blockdev::{check_range, BlockDev, BlockError, PlanSource, ReadPlan, Result};

use crate::compress::decompress;
use crate::error::OpenImageError;
use crate::format::{
    self, check_l2_bitmap, incompat, l1_entry_offset, parse_extensions, refcount_get, refcount_set,
    reftable_entry_offset, subcluster_mask, subcluster_state, table_from_bytes, table_to_bytes,
    CompressedDescriptor, CompressionType, Geometry, Header, HeaderExtension, L2Entry, Subcluster,
    AUTOCLEAR_FEATURES_OFFSET, INCOMPATIBLE_FEATURES_OFFSET, L2_BITMAP_ALL_ALLOC,
    L2_BITMAP_ALL_ZERO, MAX_REFCOUNT_TABLE_BYTES, OFLAG_COPIED, REFCOUNT_TABLE_OFFSET_OFFSET,
};
use crate::host::{HostFile, ReplayHost};
use crate::refcount::rebuild_refcounts;
use datapath::Rewrite;

pub use batch::COW_ARENA_MAX;
pub use header::{BackingSpec, ImageHeader};
pub use metadata::{Extent, Mapping};
use table_cache::{get_or_load, CachedBlock, CachedL2};

/// Highest host offset an L2 entry can address (bits 9..56).
const MAX_HOST_OFFSET: u64 = 1 << 56;

/// Everything behind the metadata lock.
struct Meta {
    geo: Geometry,
    header: Header,
    l1: Vec<u64>,
    l1_dirty: BTreeSet<usize>,
    l2: HashMap<u64, CachedL2>,
    reftable: Vec<u64>,
    reftable_dirty: BTreeSet<usize>,
    blocks: HashMap<u64, CachedBlock>,
    /// Cluster-aligned end of the allocated host area; appends go here.
    file_end: u64,
    /// No free cluster below this offset.
    free_hint: u64,
    /// Host clusters whose refcount drops by one after the next flush.
    pending_free: Vec<u64>,
    /// Guest clusters with an allocation in flight.
    inflight: HashSet<u64>,
    /// A flush is between its plan and its end (see [`flush`]).
    flushing: bool,
    tick: u64,
    dirty: usize,
    l2_cap: usize,
    block_cap: usize,
    dirty_cap: usize,
}

fn corrupt(msg: String) -> BlockError {
    BlockError::Corrupt(msg)
}

fn no_space(what: &str) -> BlockError {
    BlockError::Io(io::Error::new(
        io::ErrorKind::StorageFull,
        format!("qcow2 limit reached: {what}"),
    ))
}

/// A qcow2 image as a block device.
pub struct QcowImage {
    io: Arc<ReplayHost<Box<dyn HostFile>>>,
    /// Starts the kernel's writeback of written data early (see [`early_writeback`]).
    early_wb: early_writeback::EarlyWriteback,
    geo: Geometry,
    size: u64,
    version: u32,
    read_only: bool,
    compression: CompressionType,
    backing: Option<Arc<dyn BlockDev>>,
    backing_spec: Option<BackingSpec>,
    meta: Mutex<Meta>,
    alloc_done: Condvar,
    gate: RwLock<()>,
    /// Serializes flushes (see [`flush`]); taken before `meta`.
    flush_lock: Mutex<()>,
    corrupt: AtomicBool,
    closed: AtomicBool,
    zcache: Mutex<Option<(u64, Arc<Vec<u8>>)>>,
    /// Guest data (or, by a write-back, metadata) was written since the last flush started
    /// and is not durable yet.
    data_written: AtomicBool,
    /// Data clusters allocated by guest writes since open (statistics only).
    clusters_allocated: AtomicU64,
    /// Copy-on-write pieces of batches written as they were assembled, their batch's arena
    /// full (statistics only).
    cow_alone: AtomicU64,
    /// The raw backing file with O_DIRECT, for batches' copy-on-write fills
    /// ([`QcowImage::enable_direct_backing`]).
    direct_backing: std::sync::OnceLock<batch::DirectBacking>,
    /// Pins of planned reads on data clusters, and the freed clusters they hold back.
    pins: Arc<pins::ReadPins>,
}

impl std::fmt::Debug for QcowImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QcowImage")
            .field("size", &self.size)
            .field("cluster_size", &self.geo.cluster_size())
            .field("read_only", &self.read_only)
            .field("backing", &self.backing_spec)
            .finish()
    }
}

impl QcowImage {
    /// Opens an image over `io`. `backing` must be supplied iff the header names a backing
    /// file (see [`ImageHeader::read`] to learn it first). Read-write opens of a dirty image
    /// rebuild its refcounts first; read-write opens set the dirty bit until [`close`].
    ///
    /// [`close`]: QcowImage::close
    pub fn open_with(
        io: Box<dyn HostFile>,
        read_only: bool,
        backing: Option<Arc<dyn BlockDev>>,
    ) -> std::result::Result<QcowImage, OpenImageError> {
        // Every write and sync from here on goes through the replay journal.
        let io = ReplayHost::new(io);
        let ih = ImageHeader::read(&io)?;
        ih.check_features(read_only)?;
        let mut header = ih.header.clone();
        let geo = header.geometry();
        let cs = geo.cluster_size();
        if let Some(spec) = &ih.backing {
            if backing.is_none() {
                return Err(OpenImageError::MissingBacking(spec.name.clone()));
            }
        }
        let backing = if ih.backing.is_some() { backing } else { None };
        let mut l1buf = vec![0u8; header.l1_size as usize * 8];
        io.read_at(&mut l1buf, header.l1_table_offset)?;
        let l1 = table_from_bytes(&l1buf);
        let mut rtbuf = vec![0u8; (u64::from(header.refcount_table_clusters) * cs) as usize];
        io.read_at(&mut rtbuf, header.refcount_table_offset)?;
        let mut reftable = table_from_bytes(&rtbuf);
        if !read_only {
            if header.version >= 3 && header.incompatible_features & incompat::DIRTY != 0 {
                log::warn!("qcow2 image was not closed cleanly; rebuilding refcounts");
                reftable = rebuild_refcounts(&io, &mut header, &l1)?;
            }
            if header.version >= 3 {
                if header.autoclear_features != 0 {
                    header.autoclear_features = 0;
                    io.write_at(&0u64.to_be_bytes(), AUTOCLEAR_FEATURES_OFFSET as u64)?;
                }
                header.incompatible_features |= incompat::DIRTY;
                io.write_at(
                    &header.incompatible_features.to_be_bytes(),
                    INCOMPATIBLE_FEATURES_OFFSET as u64,
                )?;
                io.sync_data()?;
            }
        }
        let file_end = geo
            .align_up(io.len()?)
            .ok_or(format::DecodeError::Overflow("file size"))?;
        let l2_cap = ((32u64 << 20) / cs).clamp(16, 4096) as usize;
        let block_cap = ((8u64 << 20) / cs).clamp(8, 1024) as usize;
        let dirty_cap = ((16u64 << 20) / cs).clamp(8, 1024) as usize;
        let compression = header.compression()?;
        let meta = Meta {
            geo,
            l1,
            l1_dirty: BTreeSet::new(),
            l2: HashMap::new(),
            reftable,
            reftable_dirty: BTreeSet::new(),
            blocks: HashMap::new(),
            file_end,
            free_hint: cs,
            pending_free: Vec::new(),
            inflight: HashSet::new(),
            flushing: false,
            tick: 0,
            dirty: 0,
            l2_cap,
            block_cap,
            dirty_cap,
            header: header.clone(),
        };
        let io = Arc::new(io);
        Ok(QcowImage {
            early_wb: early_writeback::EarlyWriteback::new(io.clone(), !read_only),
            io,
            geo,
            size: header.size,
            version: header.version,
            read_only,
            compression,
            backing,
            backing_spec: ih.backing,
            meta: Mutex::new(meta),
            alloc_done: Condvar::new(),
            gate: RwLock::new(()),
            flush_lock: Mutex::new(()),
            corrupt: AtomicBool::new(
                header.incompatible_features & incompat::CORRUPT != 0 && !read_only,
            ),
            closed: AtomicBool::new(false),
            zcache: Mutex::new(None),
            data_written: AtomicBool::new(false),
            clusters_allocated: AtomicU64::new(0),
            cow_alone: AtomicU64::new(0),
            direct_backing: std::sync::OnceLock::new(),
            pins: Arc::default(),
        })
    }

    /// Overrides the metadata cache bounds: cached L2 tables, cached refcount blocks, and dirty
    /// tables/blocks that force an internal flush (tests use tiny values to exercise eviction).
    pub fn set_cache_limits(&self, l2_tables: usize, refcount_blocks: usize, dirty: usize) {
        let mut m = self.lock();
        m.l2_cap = l2_tables.max(1);
        m.block_cap = refcount_blocks.max(1);
        m.dirty_cap = dirty.max(1);
    }

    /// Moves the image file's I/O below the host page cache (O_DIRECT; see [`crate::direct`]).
    /// Call before serving requests. Fails (and changes nothing) where the file or its file
    /// system cannot do direct I/O.
    pub fn enable_direct(&self) -> io::Result<()> {
        self.io.enable_direct()
    }

    /// Lets the (buffered) image file write requests of at least `min` bytes that are aligned
    /// for direct I/O with O_DIRECT (see [`HostFile::enable_direct_large`]). Call before
    /// serving requests.
    pub fn enable_direct_large(&self, min: usize) -> io::Result<()> {
        self.io.enable_direct_large(min)
    }

    /// Fills the copy-on-write clusters of write batches (the cache's writebacks) from the
    /// backing file with O_DIRECT, all of a batch's fills in flight at once on an io_uring,
    /// straight into the batch's buffer: the host page cache is not filled with base data
    /// that is about to be copied into this image, and the daemon copies none of it. Only a
    /// raw backing file directly below can (a second descriptor of it is opened now: call
    /// before serving requests, before a sandbox forbids opening files). Fails, changing
    /// nothing, for any other backing or where the file system cannot do direct I/O.
    pub fn enable_direct_backing(&self) -> io::Result<()> {
        let unsupported = |why: &str| io::Error::new(io::ErrorKind::Unsupported, why.to_string());
        let b = self
            .backing
            .as_ref()
            .ok_or_else(|| unsupported("the image has no backing file"))?;
        let probe = b.size().min(self.geo.cluster_size());
        let plan = b.plan_read(0, probe);
        let file = match plan.as_ref().map(|p| p.pieces.as_slice()) {
            Some(
                [(
                    _,
                    blockdev::PlanSource::File {
                        file, offset: 0, ..
                    },
                )],
            ) => file.clone(),
            _ => return Err(unsupported("the backing file is not a raw file")),
        };
        let direct = crate::direct::reopen_direct(&file, false)?;
        // Some file systems open with O_DIRECT and then refuse the reads: try one first.
        let d = crate::direct::DirectIo::for_file(&direct);
        let mut probe_buf = blockdev::AlignedBuf::zeroed(d.block().max(4096) as usize);
        let n = probe_buf.len().min(probe as usize);
        d.read_at(&direct, &mut probe_buf[..n], 0)?;
        let db = batch::DirectBacking::new(file, Box::new(direct));
        // A second call keeps the first descriptor.
        let _ = self.direct_backing.set(db);
        Ok(())
    }

    /// How many copy-on-write fills of batches were read from the backing file on an
    /// io_uring so far ([`QcowImage::enable_direct_backing`]).
    pub fn backing_ring_reads(&self) -> u64 {
        self.direct_backing.get().map_or(0, |d| d.ring_reads())
    }

    /// Whether the image file's data goes through the host page cache (no with O_DIRECT,
    /// see [`QcowImage::enable_direct`]).
    pub fn page_cached(&self) -> bool {
        self.io.page_cached()
    }

    /// The cluster geometry.
    pub fn geometry(&self) -> Geometry {
        self.geo
    }

    /// A copy of the in-memory header.
    pub fn header(&self) -> Header {
        self.lock().header.clone()
    }

    /// The backing file named by the header.
    pub fn backing_spec(&self) -> Option<&BackingSpec> {
        self.backing_spec.as_ref()
    }

    /// The backing device.
    pub fn backing(&self) -> Option<&Arc<dyn BlockDev>> {
        self.backing.as_ref()
    }

    /// Data clusters allocated by guest writes (copy-on-write or first writes) since the image
    /// was opened; statistics only.
    pub fn clusters_allocated(&self) -> u64 {
        self.clusters_allocated.load(Ordering::Relaxed)
    }

    /// How many copy-on-write pieces of write batches did not fit their batch's arena and were
    /// written as they were assembled, instead of with the batch (see [`COW_ARENA_MAX`]).
    pub fn batch_cow_written_alone(&self) -> u64 {
        self.cow_alone.load(Ordering::Relaxed)
    }

    /// How many times the kernel was asked to start writing the file's dirty pages early
    /// (see `image/early_writeback.rs`); statistics and tests.
    pub fn early_writeback_kicks(&self) -> u64 {
        self.early_wb.kicks()
    }

    /// Whether an inconsistency was found (all I/O then fails with `BlockError::Corrupt`).
    pub fn is_corrupt(&self) -> bool {
        self.corrupt.load(Ordering::Acquire)
    }

    fn lock(&self) -> MutexGuard<'_, Meta> {
        self.meta.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How `[offset, offset+len)` is stored, as contiguous extents.
    pub fn map(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        self.check_usable()?;
        check_range(offset, len, self.size)?;
        let r = self.lock().map(&self.io, offset, len);
        self.finish(r)
    }

    fn check_usable(&self) -> Result<()> {
        if self.corrupt.load(Ordering::Acquire) {
            return Err(BlockError::Corrupt("image is marked corrupt".into()));
        }
        Ok(())
    }

    fn check_writable(&self) -> Result<()> {
        if self.read_only {
            return Err(BlockError::ReadOnly);
        }
        if self.closed.load(Ordering::Acquire) {
            return Err(BlockError::Unsupported("image is closed"));
        }
        self.check_usable()?;
        self.check_durable()
    }

    /// Fails with EIO once a failed sync could not be repaired (see [`ReplayHost`]): from then
    /// on no write, flush or close may succeed, and the dirty bit stays set.
    fn check_durable(&self) -> Result<()> {
        if self.io.is_poisoned() {
            return Err(BlockError::Io(io::Error::from_raw_os_error(libc::EIO)));
        }
        Ok(())
    }

    /// The gate of a flush or write-back: `Ok(false)` when there is nothing to do (read-only,
    /// or closed with durability intact), an error when durability was lost or writes are
    /// refused.
    fn flush_gate(&self) -> Result<bool> {
        if self.read_only {
            return Ok(false);
        }
        // A closed image has nothing unflushed, unless durability was lost before.
        self.check_durable()?;
        if self.closed.load(Ordering::Acquire) {
            return Ok(false);
        }
        self.check_writable()?;
        Ok(true)
    }

    /// Whether a failed sync of the image file could not be repaired: every later write,
    /// flush and close then fails with EIO (reads still work).
    pub fn is_poisoned(&self) -> bool {
        self.io.is_poisoned()
    }

    /// Marks the image corrupt when an operation found an inconsistency.
    fn finish<T>(&self, r: Result<T>) -> Result<T> {
        if let Err(BlockError::Corrupt(msg)) = &r {
            if !self.corrupt.swap(true, Ordering::AcqRel) {
                log::error!("qcow2 image corrupt: {msg}; further I/O is refused");
                if !self.read_only {
                    let mut m = self.lock();
                    m.header.incompatible_features |= incompat::CORRUPT;
                    let v = m.header.incompatible_features;
                    drop(m);
                    let _ = self
                        .io
                        .write_at(&v.to_be_bytes(), INCOMPATIBLE_FEATURES_OFFSET as u64);
                    let _ = self.io.sync_data();
                }
            }
        }
        r
    }
}

impl QcowImage {
    /// A write of the block-device interface, its rewrites in place going where `rewrite` says.
    fn write_routed(&self, buf: &[u8], offset: u64, rewrite: Rewrite) -> Result<()> {
        self.check_writable()?;
        check_range(offset, buf.len() as u64, self.size)?;
        if buf.is_empty() {
            return Ok(());
        }
        let _g = self.gate.read().unwrap_or_else(|e| e.into_inner());
        let r = self.write_inner(buf, offset, rewrite);
        drop(_g);
        self.finish(r)
    }
}

impl BlockDev for QcowImage {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.check_usable()?;
        check_range(offset, buf.len() as u64, self.size)?;
        if buf.is_empty() {
            return Ok(());
        }
        let _g = self.gate.read().unwrap_or_else(|e| e.into_inner());
        let r = self.read_inner(buf, offset);
        drop(_g);
        self.finish(r)
    }

    /// In place, and through the host page cache: the file is buffered (with `--direct
    /// large` a write goes direct from 256 KiB on, and the folio cache asks only about
    /// shorter ones).
    fn rewrites_in_page_cache(&self, offset: u64, len: u64) -> bool {
        if self.read_only
            || !self.page_cached()
            || len == 0
            || self.check_usable().is_err()
            || check_range(offset, len, self.size).is_err()
        {
            return false;
        }
        let _g = self.gate.read().unwrap_or_else(|e| e.into_inner());
        self.rewrites_in_place_inner(offset, len)
    }

    /// In place, with the L2 entries of its clusters in the file
    /// ([`QcowImage::persisted_steps`]), buffered or O_DIRECT: a completed write is then with
    /// the kernel or on the device, and the file names where.
    fn persists_in_place(&self, offset: u64, len: u64) -> bool {
        if self.read_only
            || len == 0
            || self.check_usable().is_err()
            || check_range(offset, len, self.size).is_err()
        {
            return false;
        }
        let _g = self.gate.read().unwrap_or_else(|e| e.into_inner());
        let mut m = self.lock();
        self.persisted_steps(&mut m, offset, len).is_some()
    }

    /// The write of [`BlockDev::write_uncached_at`] (large ones direct where the file sends
    /// them so), taken only where the plan is all in place with the L2 entries in the file;
    /// the steps are planned and written under one hold of `gate`.
    fn write_in_place_persisted(&self, buf: &[u8], offset: u64) -> Result<bool> {
        if self.read_only
            || buf.is_empty()
            || check_range(offset, buf.len() as u64, self.size).is_err()
        {
            return Ok(false);
        }
        self.check_writable()?;
        let _g = self.gate.read().unwrap_or_else(|e| e.into_inner());
        let steps = {
            let mut m = self.lock();
            match self.persisted_steps(&mut m, offset, buf.len() as u64) {
                Some(s) => s,
                None => return Ok(false),
            }
        };
        let r = self.write_data(buf, offset, &steps, None, Rewrite::Uncached);
        self.wrote_data();
        drop(_g);
        self.finish(r).map(|()| true)
    }

    fn plan_read(&self, offset: u64, len: u64) -> Option<ReadPlan> {
        self.check_usable().ok()?;
        check_range(offset, len, self.size).ok()?;
        if len == 0 {
            return None;
        }
        let _g = self.gate.read().unwrap_or_else(|e| e.into_inner());
        self.plan_read_inner(offset, len)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.write_routed(buf, offset, Rewrite::Cached)
    }

    fn write_uncached_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.write_routed(buf, offset, Rewrite::Uncached)
    }

    fn write_batch(&self, writes: &[(&[u8], u64)]) -> Vec<Result<()>> {
        self.write_batch_routed(writes, false)
    }

    fn write_batch_to_sync(&self, writes: &[(&[u8], u64)]) -> Vec<Result<()>> {
        self.write_batch_routed(writes, true)
    }

    fn flush(&self) -> Result<()> {
        if !self.flush_gate()? {
            return Ok(());
        }
        let r = self.flush_inner();
        self.finish(r)
    }

    fn write_back(&self) -> Result<()> {
        // The same gate as a flush: what a failed sync lost may not be reported as safe.
        if !self.flush_gate()? {
            return Ok(());
        }
        let r = self.write_back_inner();
        self.finish(r)
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.write_zeroes(offset, len, true)
    }

    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        self.check_writable()?;
        check_range(offset, len, self.size)?;
        if len == 0 {
            return Ok(());
        }
        let _g = self.gate.read().unwrap_or_else(|e| e.into_inner());
        let r = self.zero_inner(offset, len, unmap);
        drop(_g);
        self.finish(r)
    }

    fn is_read_only(&self) -> bool {
        self.read_only
    }
}

impl Drop for QcowImage {
    fn drop(&mut self) {
        if let Err(e) = self.close() {
            log::error!("closing qcow2 image failed: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU32;

    use super::*;
    use crate::create::{create_on, CreateOptions};
    use crate::host::MemHost;

    /// A file whose failed syncs drop the unsynced writes (Linux "fsyncgate"); `fail_syncs`
    /// syncs fail once armed.
    struct LossyHost {
        file: MemHost,
        synced: Mutex<Vec<u8>>,
        fail_syncs: AtomicU32,
    }

    impl HostFile for LossyHost {
        fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
            self.file.read_at(buf, offset)
        }

        fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
            self.file.write_at(buf, offset)
        }

        fn sync_data(&self) -> io::Result<()> {
            let mut synced = self.synced.lock().unwrap();
            if self.fail_syncs.load(Ordering::SeqCst) > 0 {
                self.fail_syncs.fetch_sub(1, Ordering::SeqCst);
                let old = synced.clone();
                self.file.set_len(0)?;
                self.file.write_at(&old, 0)?;
                return Err(io::Error::from_raw_os_error(libc::EIO));
            }
            *synced = self.file.contents();
            Ok(())
        }

        fn len(&self) -> io::Result<u64> {
            self.file.len()
        }

        fn set_len(&self, len: u64) -> io::Result<()> {
            self.file.set_len(len)
        }
    }

    fn lossy_image() -> (Arc<LossyHost>, QcowImage) {
        let host = Arc::new(LossyHost {
            file: MemHost::default(),
            synced: Mutex::new(Vec::new()),
            fail_syncs: AtomicU32::new(0),
        });
        let opts = CreateOptions {
            size: 1 << 20,
            cluster_size: 4096,
            ..CreateOptions::default()
        };
        create_on(&*host, &opts).unwrap();
        host.sync_data().unwrap();
        let img = QcowImage::open_with(Box::new(host.clone()), false, None).unwrap();
        (host, img)
    }

    fn dirty_bit_on_disk(host: &LossyHost) -> bool {
        let durable = MemHost::new(host.synced.lock().unwrap().clone());
        let h = ImageHeader::read(&durable).unwrap();
        h.header.incompatible_features & incompat::DIRTY != 0
    }

    #[test]
    fn a_sync_failure_that_the_replay_cannot_repair_fails_every_later_flush_write_and_close() {
        let (host, img) = lossy_image();
        img.write_at(&[0xaa; 4096], 0).unwrap();
        img.flush().unwrap();
        img.write_at(&[0xbb; 4096], 8192).unwrap();
        // The sync fails and so does the one after the replay: the write may be lost.
        host.fail_syncs.store(2, Ordering::SeqCst);
        let e = img.flush().unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EIO));
        assert!(img.is_poisoned());
        // The file syncs fine again, but nothing may claim durability any more.
        for _ in 0..2 {
            assert_eq!(img.flush().unwrap_err().raw_os_error(), Some(libc::EIO));
        }
        let w = img.write_at(&[0xcc; 512], 0).unwrap_err();
        assert_eq!(w.raw_os_error(), Some(libc::EIO));
        assert_eq!(
            img.write_zeroes(0, 4096, true).unwrap_err().raw_os_error(),
            Some(libc::EIO)
        );
        let mut b = [0u8; 512];
        img.read_at(&mut b, 0).unwrap();
        assert_eq!(b, [0xaa; 512]);
        assert_eq!(img.close().unwrap_err().raw_os_error(), Some(libc::EIO));
        drop(img);
        assert!(dirty_bit_on_disk(&host), "the dirty bit was cleared");
    }

    #[test]
    fn a_sync_failure_repaired_by_the_replay_leaves_the_image_fully_usable() {
        let (host, img) = lossy_image();
        img.write_at(&[0xbb; 4096], 8192).unwrap();
        host.fail_syncs.store(1, Ordering::SeqCst);
        img.flush().unwrap();
        assert!(!img.is_poisoned());
        img.close().unwrap();
        assert!(!dirty_bit_on_disk(&host));
        let synced = MemHost::new(host.synced.lock().unwrap().clone());
        let img = QcowImage::open_with(Box::new(synced), true, None).unwrap();
        let mut b = [0u8; 4096];
        img.read_at(&mut b, 8192).unwrap();
        assert_eq!(b, [0xbb; 4096]);
    }
}
