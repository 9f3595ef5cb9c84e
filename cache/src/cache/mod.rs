//! [`FolioCache`]: the write-back folio cache layer.
//!
//! # State
//! The disk is cut into folios of `folio_size` bytes. A cached [`Folio`] tracks, per 512-byte
//! sector, whether its bytes are *uptodate* (equal to the newest content of the disk) and whether
//! they are *dirty* (newer than the lower layer; dirty implies uptodate). A folio is *accounted*
//! while it has dirty sectors or a writeback in flight: it is then listed in the dirty list,
//! counted against the dirty limit and never evicted. Only clean, unpinned folios are evicted.
//!
//! - Reads copy uptodate sectors; missing sectors are *filled* from the lower layer without any
//!   lock held, then installed only into sectors that are still not uptodate and only if no
//!   discard/write-zeroes (a *zap*) started or ended meanwhile: the zap sequence number is the
//!   validity cookie of a fill. A fill that lost the race is used for this read only.
//! - Read invariant: every 512-byte sector a read returns holds the value of the last write or
//!   zap that completed before the read was invoked, or of one concurrent with it, on every
//!   path. So a read takes the uptodate sectors under the folio lock *before* any lower I/O
//!   (the filled read copies them into the caller's buffer, the bypassing read copies them
//!   aside) and uses lower-layer bytes only for sectors that were missing at that instant - a
//!   zap finishing during the lower read may clear an uptodate sector whose lower bytes are
//!   older than the write the cache held.
//! - Reads never go back in time: a read does not start while a zap (or bypassing write) of its
//!   range is in flight. Such a zap changes the lower layer before it drops the cached sectors
//!   of its range; in between, a read served from below would see its result and a later read
//!   served from the cache the older bytes.
//! - Writes copy the caller's complete buffer into the folio and mark it dirty. A write that
//!   covers a sector only partly first fills that sector from below, so dirty sectors are always
//!   whole and writeback never writes bytes the cache does not know (no zeroed tails). A write
//!   into bytes of a registered zap waits until the zap ends (the zap drops the cached sectors
//!   of its range at its end, which must not drop a write that completed after the zap's lower
//!   operation).
//! - Writeback takes a folio's dirty runs under its lock (a reference to the folio's memory, not
//!   a copy), clears their dirty bits, sets the folio's `writeback` flag and writes from that
//!   memory without any lock held. A write, fill or zap that changes the folio meanwhile moves
//!   it to a copy of its own first (`FolioState::data_mut`), so the bytes below never change
//!   under the writeback (its *snapshot*). At most one writeback per folio is in flight, so
//!   writes to a byte reach the lower layer in completion order. A failed or deferred
//!   writeback marks the snapshot's sectors dirty again.
//! - A zap registers its range first; writebacks of folios overlapping a registered zap are
//!   deferred; the zap waits for writebacks already in flight, runs the lower operation, then
//!   drops the cached sectors in the range (zeroing partly covered ones) and unregisters.
//! - Flush writes back every folio that was accounted when it started (waiting for in-flight
//!   writebacks and retrying failed ones), then flushes the lower layer. A long list is written
//!   back by up to `FLUSH_WORKERS` scoped threads, each taking whole runs of adjacent folios (the
//!   writeback path is the same; folios are independent), so that copy-on-write writebacks that
//!   wait for backing reads overlap. The flushing thread starts alone and brings the others in
//!   once its writebacks wait for the disk (writebacks into a page cache do not). A failed
//!   writeback fails the flush and stays dirty; a failed lower flush makes every later flush
//!   fail (the lower layer may have dropped data the cache already considers clean).
//! - Background writeback: the flusher thread is woken after every `KICK_EVERY` folios that
//!   become dirty (so a later flush finds little left to write), when half of the dirty budget
//!   is used, and periodically; it only ever uses the writeback path above.
//! - Batched writeback: the flusher, writers throttled by the dirty budget and each flush thread
//!   take a batch of folios (`WRITEBACK_BATCH`, or `FLUSH_CHUNK_RUNS` runs), snapshot each one
//!   as above (every folio of the batch is under writeback from its snapshot on), then hand all
//!   their lower writes to one `BlockDev::write_batch` (a qcow2 image on an O_DIRECT file has
//!   them in flight together on an io_uring), and end each folio's writeback with the outcome
//!   of its own writes. A zap registered meanwhile waits for the whole batch, since it waits
//!   for every writeback flag in its range.
//! - Write-through mode (`set_writeback(false)`) writes back the written folios and flushes the
//!   lower layer before a write (or zap) completes.
//! - Writeback of a folio whose dirty data reaches its end takes the following folios whose
//!   dirty data starts at their beginning along (up to 1 MiB), merging touching runs into one
//!   lower write: such a group is copied into one merged buffer (an arena shared by the
//!   writebacks), and lets go of the folios' memory once copied. A folio already under
//!   writeback never joins.
//! - Requests of at least `bypass_threshold` bytes bypass the cache (reads from
//!   `read_bypass_threshold` on, when that is smaller; writes from `rewrite_bypass_threshold`
//!   on where the lower layer says they rewrite in place through the host page cache,
//!   `BlockDev::rewrites_in_page_cache`, a hint asked with no cache lock held: a write or zap
//!   that changes the range after the answer orders before the bypass, as any that completed
//!   before it). A large read pins the
//!   cached folios of its range, reads the lower layer and overlays their uptodate sectors (as
//!   copied before the lower read). The
//!   whole folios of a large write are registered like a zap, in-flight writebacks of them
//!   finish, one lower write follows, and then their cached copies are dropped; the partial
//!   folios at its ends go through the cache. A write the layer above wants persisted in place
//!   (`BlockDev::write_in_place_persisted`, the crash journal's marker path) takes the same
//!   route when it is whole folios the cache would send around itself, in write-back mode; if
//!   the lower layer refuses it, nothing changes.
//! - `BlockDev::writes_in_memory` tells the layer above whether a write issued now would only
//!   copy into folios (write-back mode, whole sectors, no part around the cache, no zap in
//!   flight, dirty budget for every folio it spans): a hint read without any lock, on which
//!   the request layer runs the write on its queue thread; a stale yes costs a wait there.
//!
//! # Files
//! This file holds the state, the public face and the `BlockDev` implementation; each part of
//! [`Inner`]'s work has its own file: `map` (lookup, allocation, eviction), `zap`, `read`,
//! `write`, `writeback` (clustered writeback and flush) and `flusher` (background writeback).
//!
//! # Locking
//! Every lock is held only for memory operations, never across lower-layer I/O. Order (a thread
//! holding a lock may only take locks further down the list):
//! 1. a shard lock (`shards[i]`: folio map and eviction clock of that shard),
//! 2. a folio lock (`Folio::state`; at most one at a time),
//! 3. the dirty list (`dirty_list`), the zap registry (`zaps`), the buffer pools (`free_bufs`,
//!    `wb_arenas`), the budget/flusher condition mutexes - leaves, never nested with each other.
//!
//! Eviction holds a shard lock and only *tries* a folio lock. A folio is pinned while any thread
//! holds an `Arc` to it besides the map (checked under the shard lock, where new references are
//! made), so eviction never pulls a folio out from under a reader or writer.

mod flusher;
mod map;
mod read;
mod write;
mod writeback;
mod zap;

use std::cell::Cell;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, TryLockError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use blockdev::{
    check_range, read_via_bounce, AlignedBuf, BlockDev, BlockError, ReadPlan, ReadSink, Result,
    ThreadUsage,
};

use crate::folio::{Folio, FolioState};
use crate::{CacheConfig, CacheHooks, HookPoint, NewCacheError};

/// Largest number of shards of the folio map.
const MAX_SHARDS: usize = 64;
/// Folios written back per batch by the flusher and by throttled writers: on an O_DIRECT
/// image their writes are in flight together (64 measured best for 4 KiB writebacks here:
/// 16 left the device idle between batches).
const WRITEBACK_BATCH: usize = 64;
/// Newly dirtied folios after which the flusher is woken.
const KICK_EVERY: usize = 16;
/// Most threads a flush writes back with (see `Inner::sync_folios`).
const FLUSH_WORKERS: usize = 8;
/// Runs of adjacent folios per extra flush thread (a short list is written back by the
/// flushing thread alone), and per chunk the flushing thread takes before any helper joins.
const FLUSH_MIN_RUNS: usize = 4;
/// Time per run past which a chunk of a flush's writebacks that slept counts as waiting for
/// the disk, and the flushing thread brings in the other flush threads: a writeback into the
/// host page cache takes a few microseconds, a copy-on-write that reads its backing data or
/// an O_DIRECT write a hundred and more.
const FLUSH_SLOW_RUN: Duration = Duration::from_micros(50);
/// Runs of adjacent folios a flush thread writes back in one batch.
const FLUSH_CHUNK_RUNS: usize = 16;
/// Largest writeback, in bytes, when consecutive folios are written back together.
const MAX_CLUSTER: usize = 1 << 20;
/// Least and most room for the snapshots of one batched writeback (virtual: untouched pages
/// cost nothing; a batch touches the pages of the dirty data it copies).
const BATCH_ARENA: usize = 4 << 20;
const MAX_ARENA: usize = 16 << 20;
/// Snapshot arenas kept for reuse: one for each flush thread (the flusher and throttled
/// writers take them between flushes).
const KEPT_ARENAS: usize = FLUSH_WORKERS;
/// Recycled folio buffers kept for reuse.
const FREE_BUFS: usize = 64;
/// How long a thread waiting for a free slot or dirty budget sleeps before retrying.
const PRESSURE_WAIT: Duration = Duration::from_millis(1);

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

thread_local! {
    /// Reusable buffer for fills (taken out while in use, so re-entrant calls just allocate).
    /// Aligned for direct I/O, like the snapshot arenas: an O_DIRECT image below reads and
    /// writes them without a bounce copy.
    static FILL_BUF: Cell<AlignedBuf> = const { Cell::new(AlignedBuf::new()) };
    /// Reusable list of dirty sector runs.
    static WB_RUNS: Cell<Vec<(usize, usize, usize)>> = const { Cell::new(Vec::new()) };
}

/// Takes the thread's scratch buffer, grown to at least `len` bytes.
pub(super) fn take_buf(
    key: &'static std::thread::LocalKey<Cell<AlignedBuf>>,
    len: usize,
) -> AlignedBuf {
    // Scratch contents never matter: a fresh zeroed allocation touches no page until it is
    // used, where growing in place would zero all of it by hand.
    key.with(Cell::take).at_least(len)
}

/// A hasher for folio numbers (Fibonacci hashing; keys are not attacker-chosen hash-flood
/// material beyond the disk size, and the map is sharded).
#[derive(Default)]
struct IndexHasher(u64);

impl Hasher for IndexHasher {
    fn finish(&self) -> u64 {
        self.0 ^ (self.0 >> 32)
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }
    fn write_u64(&mut self, i: u64) {
        self.0 = i.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

type FolioMap = HashMap<u64, Arc<Folio>, BuildHasherDefault<IndexHasher>>;

/// One shard of the folio map with its eviction clock.
#[derive(Default)]
struct Shard {
    map: FolioMap,
    clock: VecDeque<u64>,
}

/// A registered discard/write-zeroes range.
struct Zap {
    id: u64,
    start: u64,
    end: u64,
}

/// The zap registry; `seq` changes whenever a zap starts or ends.
#[derive(Default)]
struct Zaps {
    seq: u64,
    next_id: u64,
    active: Vec<Zap>,
}

impl Zaps {
    fn overlaps(&self, start: u64, end: u64) -> bool {
        self.active.iter().any(|z| z.start < end && start < z.end)
    }
}

/// Validity cookie of a fill: taken before the lower read, checked before installing.
struct FillToken {
    seq: u64,
    clean: bool,
}

/// What a writeback attempt did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WbOutcome {
    /// Nothing was dirty.
    Clean,
    /// Another writeback of the folio is in flight (only when not waiting).
    Busy,
    /// A zap overlaps the folio; the dirty sectors stay dirty.
    Deferred,
    /// The dirty sectors were written to the lower layer.
    Written,
}

/// Which zap a discard-type request performs on the lower layer.
#[derive(Debug, Clone, Copy)]
enum ZapKind {
    Discard,
    Zeroes { unmap: bool },
}

#[derive(Default)]
struct Counters {
    read_hits: AtomicU64,
    read_misses: AtomicU64,
    fills_dropped: AtomicU64,
    evictions: AtomicU64,
    writebacks: AtomicU64,
    writeback_bytes: AtomicU64,
    writeback_errors: AtomicU64,
    throttled: AtomicU64,
    bypassed: AtomicU64,
    cow_copies: AtomicU64,
    merged_bytes: AtomicU64,
}

/// A snapshot of the cache's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Read segments served entirely from the cache.
    pub read_hits: u64,
    /// Read segments that had to fill from the lower layer.
    pub read_misses: u64,
    /// Fills not installed because a zap or an eviction raced with them.
    pub fills_dropped: u64,
    /// Folios evicted.
    pub evictions: u64,
    /// Folio writebacks that reached the lower layer.
    pub writebacks: u64,
    /// Bytes written to the lower layer by writebacks.
    pub writeback_bytes: u64,
    /// Folio writebacks that failed (their data stayed dirty).
    pub writeback_errors: u64,
    /// Times a writer or filler had to wait for a free folio or for dirty budget.
    pub throttled: u64,
    /// Large reads and writes that bypassed the cache.
    pub bypassed: u64,
    /// Folios moved to a copy of their memory because a write, fill or zap changed them while
    /// a writeback was writing from it.
    pub cow_copies: u64,
    /// Bytes copied into a merged buffer by writebacks of several folios together (a single
    /// folio's writeback goes down from its own memory).
    pub merged_bytes: u64,
    /// Folios currently cached.
    pub cached_folios: usize,
    /// Folios currently dirty or under writeback.
    pub dirty_folios: usize,
    /// Discard/write-zeroes requests currently in flight.
    pub active_zaps: usize,
}

/// State shared by the cache handle and its writeback threads.
struct Inner {
    lower: Arc<dyn BlockDev>,
    cfg: CacheConfig,
    size: u64,
    read_only: bool,
    folio_shift: u32,
    folio_size: usize,
    max_folios: usize,
    max_dirty: usize,
    bypass_threshold: u64,
    /// Reads of at least this many bytes bypass the cache (0: none do).
    read_bypass_threshold: u64,
    /// Writes of at least this many bytes that the lower layer rewrites in place through the
    /// host page cache bypass the cache (0: only those of `bypass_threshold` and more do).
    rewrite_bypass_threshold: u64,
    cluster_folios: usize,
    shards: Box<[Mutex<Shard>]>,
    nr_folios: AtomicUsize,
    evict_hand: AtomicUsize,
    free_bufs: Mutex<Vec<AlignedBuf>>,
    /// Snapshot arenas of writebacks not in use (at most `KEPT_ARENAS`): shared, not per
    /// thread, so that the many threads that may write back (every writer the dirty budget
    /// throttles) do not each keep one, and a flush's own threads find them.
    wb_arenas: Mutex<Vec<AlignedBuf>>,
    dirty_folios: AtomicUsize,
    /// Folios that became dirty so far (wraps); paces the eager wake-ups of the flusher.
    newly_dirtied: AtomicUsize,
    dirty_list: Mutex<BTreeMap<u64, Arc<Folio>>>,
    wb_cursor: AtomicU64,
    budget_lock: Mutex<()>,
    budget_cv: Condvar,
    zaps: Mutex<Zaps>,
    /// Number of registered zaps (changed under `zaps`): lets writes skip the registry lock.
    zaps_active: AtomicUsize,
    zap_cv: Condvar,
    wce: AtomicBool,
    lower_flush_failed: AtomicBool,
    has_flusher: bool,
    stop: AtomicBool,
    kick: AtomicBool,
    flusher_lock: Mutex<()>,
    flusher_cv: Condvar,
    hooks: Option<Arc<dyn CacheHooks>>,
    counters: Counters,
}

/// The write-back folio cache over a lower [`BlockDev`]. See the module documentation.
pub struct FolioCache {
    inner: Arc<Inner>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl std::fmt::Debug for FolioCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FolioCache")
            .field("cfg", &self.inner.cfg)
            .field("size", &self.inner.size)
            .field("stats", &self.stats())
            .finish()
    }
}

impl FolioCache {
    /// A cache over `lower` configured by `cfg`; starts `cfg.flusher_threads` writeback threads.
    pub fn new(
        lower: Arc<dyn BlockDev>,
        cfg: CacheConfig,
    ) -> std::result::Result<Arc<Self>, NewCacheError> {
        Self::build(lower, cfg, None)
    }

    /// Like [`FolioCache::new`], with test hooks called at the [`HookPoint`]s.
    pub fn with_hooks(
        lower: Arc<dyn BlockDev>,
        cfg: CacheConfig,
        hooks: Arc<dyn CacheHooks>,
    ) -> std::result::Result<Arc<Self>, NewCacheError> {
        Self::build(lower, cfg, Some(hooks))
    }

    fn build(
        lower: Arc<dyn BlockDev>,
        cfg: CacheConfig,
        hooks: Option<Arc<dyn CacheHooks>>,
    ) -> std::result::Result<Arc<Self>, NewCacheError> {
        cfg.validate()?;
        let folio_size = usize::try_from(cfg.folio_size)
            .map_err(|_| NewCacheError::BadFolioSize(cfg.folio_size))?;
        let max_folios = usize::try_from(cfg.cache_size / cfg.folio_size).unwrap_or(usize::MAX);
        let max_dirty = usize::try_from(cfg.dirty_limit / cfg.folio_size).unwrap_or(usize::MAX);
        let nshards = max_folios.next_power_of_two().clamp(1, MAX_SHARDS);
        let inner = Arc::new(Inner {
            size: lower.size(),
            read_only: lower.is_read_only(),
            lower,
            folio_shift: cfg.folio_size.trailing_zeros(),
            folio_size,
            max_folios,
            max_dirty,
            bypass_threshold: cfg.bypass_threshold,
            read_bypass_threshold: match (cfg.bypass_threshold, cfg.read_bypass_threshold) {
                (0, _) => 0,
                (w, 0) => w,
                (w, r) => w.min(r),
            },
            rewrite_bypass_threshold: match (cfg.bypass_threshold, cfg.rewrite_bypass_threshold) {
                (0, _) | (_, 0) => 0,
                (w, r) => w.min(r),
            },
            cluster_folios: (MAX_CLUSTER / folio_size).max(1),
            shards: (0..nshards).map(|_| Mutex::new(Shard::default())).collect(),
            nr_folios: AtomicUsize::new(0),
            evict_hand: AtomicUsize::new(0),
            free_bufs: Mutex::new(Vec::new()),
            wb_arenas: Mutex::new(Vec::new()),
            dirty_folios: AtomicUsize::new(0),
            newly_dirtied: AtomicUsize::new(0),
            dirty_list: Mutex::new(BTreeMap::new()),
            wb_cursor: AtomicU64::new(0),
            budget_lock: Mutex::new(()),
            budget_cv: Condvar::new(),
            zaps: Mutex::new(Zaps::default()),
            zaps_active: AtomicUsize::new(0),
            zap_cv: Condvar::new(),
            wce: AtomicBool::new(cfg.writeback),
            lower_flush_failed: AtomicBool::new(false),
            has_flusher: cfg.flusher_threads > 0,
            stop: AtomicBool::new(false),
            kick: AtomicBool::new(false),
            flusher_lock: Mutex::new(()),
            flusher_cv: Condvar::new(),
            hooks,
            counters: Counters::default(),
            cfg,
        });
        let cache = FolioCache {
            inner: inner.clone(),
            threads: Mutex::new(Vec::new()),
        };
        for i in 0..inner.cfg.flusher_threads {
            let worker = inner.clone();
            let handle = std::thread::Builder::new()
                .name(format!("snapblk-wb{i}"))
                .spawn(move || worker.flusher_main())
                .map_err(NewCacheError::SpawnWriteback)?;
            lock(&cache.threads).push(handle);
        }
        Ok(Arc::new(cache))
    }

    /// Switches between write-back (`true`) and write-through (`false`). Turning write-back off
    /// first flushes everything dirty; the error of that flush is returned (the mode is switched
    /// regardless, and the data stays dirty for a later flush).
    pub fn set_writeback(&self, enabled: bool) -> Result<()> {
        self.inner.wce.store(enabled, Ordering::SeqCst);
        if enabled {
            Ok(())
        } else {
            self.inner.flush()
        }
    }

    /// Whether the cache is in write-back mode.
    pub fn writeback_enabled(&self) -> bool {
        self.inner.wce.load(Ordering::SeqCst)
    }

    /// Stops the writeback threads and flushes everything. Idempotent; the cache stays usable
    /// (writers then write back themselves when they hit the dirty limit).
    pub fn shutdown(&self) -> Result<()> {
        self.inner.stop.store(true, Ordering::SeqCst);
        {
            let _g = lock(&self.inner.flusher_lock);
            self.inner.flusher_cv.notify_all();
        }
        let handles = std::mem::take(&mut *lock(&self.threads));
        for h in handles {
            if h.join().is_err() {
                log::error!("cache writeback thread panicked");
            }
        }
        self.inner.flush()
    }

    /// Evicts every clean, unused folio; returns how many were evicted.
    pub fn drop_clean(&self) -> usize {
        let mut n = 0;
        for shard in self.inner.shards.iter() {
            loop {
                let victim = self.inner.evict_from_shard(&mut lock(shard), true);
                match victim {
                    Some(f) => {
                        n += 1;
                        self.inner.finish_evict(f);
                    }
                    None => break,
                }
            }
        }
        n
    }

    /// The current counters.
    pub fn stats(&self) -> CacheStats {
        let c = &self.inner.counters;
        CacheStats {
            read_hits: c.read_hits.load(Ordering::Relaxed),
            read_misses: c.read_misses.load(Ordering::Relaxed),
            fills_dropped: c.fills_dropped.load(Ordering::Relaxed),
            evictions: c.evictions.load(Ordering::Relaxed),
            writebacks: c.writebacks.load(Ordering::Relaxed),
            writeback_bytes: c.writeback_bytes.load(Ordering::Relaxed),
            writeback_errors: c.writeback_errors.load(Ordering::Relaxed),
            throttled: c.throttled.load(Ordering::Relaxed),
            bypassed: c.bypassed.load(Ordering::Relaxed),
            cow_copies: c.cow_copies.load(Ordering::Relaxed),
            merged_bytes: c.merged_bytes.load(Ordering::Relaxed),
            cached_folios: self.inner.nr_folios.load(Ordering::Relaxed),
            dirty_folios: self.inner.dirty_folios.load(Ordering::Relaxed),
            active_zaps: lock(&self.inner.zaps).active.len(),
        }
    }

    /// The configuration the cache was built with (the write-back flag as at creation).
    pub fn config(&self) -> &CacheConfig {
        &self.inner.cfg
    }

    /// The layer below the cache.
    pub fn lower(&self) -> &Arc<dyn BlockDev> {
        &self.inner.lower
    }
}

impl Drop for FolioCache {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown() {
            log::error!("flushing the folio cache at shutdown failed: {e}");
        }
    }
}

impl BlockDev for FolioCache {
    fn size(&self) -> u64 {
        self.inner.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.inner.read_at(buf, offset)
    }

    fn plan_read(&self, offset: u64, len: u64) -> Option<ReadPlan> {
        self.inner.plan_read(offset, len)
    }

    fn read_into(&self, dst: &dyn ReadSink, offset: u64) -> Result<()> {
        self.inner.read_into(dst, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.inner.write_at(buf, offset)
    }

    fn flush(&self) -> Result<()> {
        self.inner.flush()
    }

    fn write_back(&self) -> Result<()> {
        self.inner.write_back()
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.inner.zap(offset, len, ZapKind::Discard)
    }

    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        self.inner.zap(offset, len, ZapKind::Zeroes { unmap })
    }

    fn is_read_only(&self) -> bool {
        self.inner.read_only
    }

    fn persists_in_place(&self, offset: u64, len: u64) -> bool {
        self.inner.persists_in_place(offset, len)
    }

    fn writes_in_memory(&self, offset: u64, len: u64) -> bool {
        self.inner.writes_in_memory(offset, len)
    }

    fn write_in_place_persisted(&self, buf: &[u8], offset: u64) -> Result<bool> {
        self.inner.write_in_place_persisted(buf, offset)
    }
}

impl Inner {
    fn hook(&self, point: HookPoint, index: u64) {
        if let Some(h) = &self.hooks {
            h.at(point, index);
        }
    }

    fn shard(&self, index: u64) -> &Mutex<Shard> {
        // The shard count is a power of two, so the mask keeps the index in bounds.
        let i = (index as usize) & (self.shards.len() - 1);
        &self.shards[i]
    }

    /// Splits `[offset, offset + len)` into per-folio pieces `(index, offset in folio, length)`.
    fn segments(&self, offset: u64, len: usize) -> impl Iterator<Item = (u64, usize, usize)> + '_ {
        let mut done = 0usize;
        std::iter::from_fn(move || {
            if done >= len {
                return None;
            }
            let off = offset + done as u64;
            let index = off >> self.folio_shift;
            let in_folio = (off - (index << self.folio_shift)) as usize;
            let n = (self.folio_size - in_folio).min(len - done);
            done += n;
            Some((index, in_folio, n))
        })
    }

    fn folio_len(&self, index: u64) -> usize {
        let start = index << self.folio_shift;
        let rest = self.size.saturating_sub(start);
        usize::try_from(rest)
            .unwrap_or(usize::MAX)
            .min(self.folio_size)
    }
}
