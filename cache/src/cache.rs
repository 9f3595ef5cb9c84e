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
//! - Writeback snapshots a folio's dirty sectors under its lock, clears their dirty bits, sets the
//!   folio's `writeback` flag and writes the snapshot without any lock held. At most one
//!   writeback per folio is in flight, so writes to a byte reach the lower layer in completion
//!   order. A failed or deferred writeback marks the snapshot's sectors dirty again.
//! - A zap registers its range first; writebacks of folios overlapping a registered zap are
//!   deferred; the zap waits for writebacks already in flight, runs the lower operation, then
//!   drops the cached sectors in the range (zeroing partly covered ones) and unregisters.
//! - Flush writes back every folio that was accounted when it started (waiting for in-flight
//!   writebacks and retrying failed ones), then flushes the lower layer. A long list is written
//!   back by up to `FLUSH_WORKERS` scoped threads, each taking whole runs of adjacent folios (the
//!   writeback path is the same; folios are independent), so that copy-on-write writebacks that
//!   wait for backing reads overlap. A failed writeback fails
//!   the flush and stays dirty; a failed lower flush makes every later flush fail (the lower
//!   layer may have dropped data the cache already considers clean).
//! - Background writeback: the flusher thread is woken after every `WRITEBACK_BATCH` folios
//!   that become dirty (so a later flush finds little left to write), when half of the dirty
//!   budget is used, and periodically; it only ever uses the writeback path above.
//! - Write-through mode (`set_writeback(false)`) writes back the written folios and flushes the
//!   lower layer before a write (or zap) completes.
//! - Writeback of a folio whose dirty data reaches its end takes the following folios whose
//!   dirty data starts at their beginning along (up to 1 MiB), merging touching runs into one
//!   lower write. A folio already under writeback never joins.
//! - Requests of at least `bypass_threshold` bytes bypass the cache. A large read pins the
//!   cached folios of its range, reads the lower layer and overlays their uptodate sectors (as
//!   copied before the lower read). The
//!   whole folios of a large write are registered like a zap, in-flight writebacks of them
//!   finish, one lower write follows, and then their cached copies are dropped; the partial
//!   folios at its ends go through the cache.
//!
//! # Locking
//! Every lock is held only for memory operations, never across lower-layer I/O. Order (a thread
//! holding a lock may only take locks further down the list):
//! 1. a shard lock (`shards[i]`: folio map and eviction clock of that shard),
//! 2. a folio lock (`Folio::state`; at most one at a time),
//! 3. the dirty list (`dirty_list`), the zap registry (`zaps`), the buffer pool (`free_bufs`),
//!    the budget/flusher condition mutexes - leaves, never nested with each other.
//!
//! Eviction holds a shard lock and only *tries* a folio lock. A folio is pinned while any thread
//! holds an `Arc` to it besides the map (checked under the shard lock, where new references are
//! made), so eviction never pulls a folio out from under a reader or writer.

use std::cell::Cell;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, TryLockError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use blockdev::{check_range, BlockDev, BlockError, Result};

use crate::folio::{Folio, FolioState};
use crate::{CacheConfig, CacheHooks, HookPoint, NewCacheError};

/// Largest number of shards of the folio map.
const MAX_SHARDS: usize = 64;
/// Folios written back per batch by the flusher and by throttled writers.
const WRITEBACK_BATCH: usize = 16;
/// Most threads a flush writes back with (see `Inner::sync_folios`).
const FLUSH_WORKERS: usize = 8;
/// Runs of adjacent folios per extra flush thread (a short list is written back by the
/// flushing thread alone).
const FLUSH_MIN_RUNS: usize = 4;
/// Largest writeback, in bytes, when consecutive folios are written back together.
const MAX_CLUSTER: usize = 1 << 20;
/// Recycled folio buffers kept for reuse.
const FREE_BUFS: usize = 64;
/// How long a thread waiting for a free slot or dirty budget sleeps before retrying.
const PRESSURE_WAIT: Duration = Duration::from_millis(1);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

thread_local! {
    /// Reusable buffer for fills (taken out while in use, so re-entrant calls just allocate).
    static FILL_BUF: Cell<Vec<u8>> = const { Cell::new(Vec::new()) };
    /// Reusable buffer for writeback snapshots.
    static WB_BUF: Cell<Vec<u8>> = const { Cell::new(Vec::new()) };
    /// Reusable list of dirty sector runs.
    static WB_RUNS: Cell<Vec<(usize, usize, usize)>> = const { Cell::new(Vec::new()) };
}

/// Takes the thread's scratch buffer, grown to at least `len` bytes.
fn take_buf(key: &'static std::thread::LocalKey<Cell<Vec<u8>>>, len: usize) -> Vec<u8> {
    let v = key.with(Cell::take);
    if v.len() < len {
        // Scratch contents never matter: a fresh zeroed allocation (calloc) touches no page
        // until it is used, where growing in place would zero all of it by hand (1 MiB for a
        // writeback buffer, once per writing thread, including every flush worker).
        return vec![0; len];
    }
    v
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
    cluster_folios: usize,
    shards: Box<[Mutex<Shard>]>,
    nr_folios: AtomicUsize,
    evict_hand: AtomicUsize,
    free_bufs: Mutex<Vec<Vec<u8>>>,
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
            cluster_folios: (MAX_CLUSTER / folio_size).max(1),
            shards: (0..nshards).map(|_| Mutex::new(Shard::default())).collect(),
            nr_folios: AtomicUsize::new(0),
            evict_hand: AtomicUsize::new(0),
            free_bufs: Mutex::new(Vec::new()),
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

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.inner.write_at(buf, offset)
    }

    fn flush(&self) -> Result<()> {
        self.inner.flush()
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

    // ---- folio lookup, allocation and eviction ----

    fn lookup(&self, index: u64) -> Option<Arc<Folio>> {
        lock(self.shard(index)).map.get(&index).cloned()
    }

    /// The folio `index`, created (evicting or writing back if the cache is full) if absent.
    fn get_folio(&self, index: u64) -> Result<Arc<Folio>> {
        loop {
            if let Some(f) = lock(self.shard(index)).map.get(&index) {
                f.touch();
                return Ok(f.clone());
            }
            let reserved = self
                .nr_folios
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                    (n < self.max_folios).then_some(n + 1)
                })
                .is_ok();
            if reserved {
                let buf = lock(&self.free_bufs).pop().unwrap_or_default();
                let start = index << self.folio_shift;
                let folio = Arc::new(Folio::new(index, start, self.folio_len(index), buf));
                let mut shard = lock(self.shard(index));
                if let Some(existing) = shard.map.get(&index) {
                    let existing = existing.clone();
                    drop(shard);
                    self.nr_folios.fetch_sub(1, Ordering::AcqRel);
                    self.recycle(folio);
                    existing.touch();
                    return Ok(existing);
                }
                shard.map.insert(index, folio.clone());
                shard.clock.push_back(index);
                return Ok(folio);
            }
            if !self.evict_one() {
                self.relieve_pressure()?;
            }
        }
    }

    /// Evicts one clean, unpinned folio if the clock finds one.
    fn evict_one(&self) -> bool {
        let n = self.shards.len();
        for _ in 0..2 * n {
            let i = self.evict_hand.fetch_add(1, Ordering::Relaxed) & (n - 1);
            let victim = self.evict_from_shard(&mut lock(&self.shards[i]), false);
            if let Some(f) = victim {
                self.finish_evict(f);
                return true;
            }
        }
        false
    }

    /// Runs the clock over one shard; returns the evicted folio (already out of the map).
    fn evict_from_shard(&self, shard: &mut Shard, ignore_referenced: bool) -> Option<Arc<Folio>> {
        let Shard { map, clock } = shard;
        for _ in 0..clock.len() {
            let index = clock.pop_front()?;
            let Some(f) = map.get(&index) else { continue };
            // The map's reference is the only one: nobody is using the folio, and new references
            // are only made under this shard lock.
            if Arc::strong_count(f) > 1
                || (f.referenced.swap(false, Ordering::Relaxed) && !ignore_referenced)
            {
                clock.push_back(index);
                continue;
            }
            let mut st = match f.state.try_lock() {
                Ok(g) => g,
                Err(TryLockError::Poisoned(p)) => p.into_inner(),
                Err(TryLockError::WouldBlock) => {
                    clock.push_back(index);
                    continue;
                }
            };
            if st.accounted || st.writeback {
                drop(st);
                clock.push_back(index);
                continue;
            }
            st.evicted = true;
            drop(st);
            let f = map.remove(&index);
            self.nr_folios.fetch_sub(1, Ordering::AcqRel);
            return f;
        }
        None
    }

    fn finish_evict(&self, f: Arc<Folio>) {
        let index = f.index;
        self.counters.evictions.fetch_add(1, Ordering::Relaxed);
        self.recycle(f);
        self.hook(HookPoint::AfterEvict, index);
    }

    /// Keeps an unreferenced folio's buffer for the next folio.
    fn recycle(&self, f: Arc<Folio>) {
        if let Ok(folio) = Arc::try_unwrap(f) {
            let data = folio
                .state
                .into_inner()
                .unwrap_or_else(PoisonError::into_inner)
                .data;
            if data.len() == self.folio_size {
                let mut bufs = lock(&self.free_bufs);
                if bufs.len() < FREE_BUFS {
                    bufs.push(data.into_vec());
                }
            }
        }
    }

    /// Makes progress when no folio slot or no dirty budget is free: writes back some dirty
    /// folios, or waits briefly for pinned folios to be released.
    fn relieve_pressure(&self) -> Result<()> {
        self.counters.throttled.fetch_add(1, Ordering::Relaxed);
        self.kick_flusher();
        if self.dirty_folios.load(Ordering::Acquire) > 0 && self.writeback_some(1)? > 0 {
            return Ok(());
        }
        let g = lock(&self.budget_lock);
        drop(
            self.budget_cv
                .wait_timeout(g, PRESSURE_WAIT)
                .unwrap_or_else(PoisonError::into_inner),
        );
        Ok(())
    }

    fn reserve_dirty(&self) -> bool {
        self.dirty_folios
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max_dirty).then_some(n + 1)
            })
            .is_ok()
    }

    /// Releases the folio's dirty accounting once it has no dirty sectors and no writeback.
    fn maybe_clean(&self, f: &Folio, st: &mut FolioState) {
        if st.accounted && !st.writeback && st.dirty.is_empty() {
            st.accounted = false;
            lock(&self.dirty_list).remove(&f.index);
            self.dirty_folios.fetch_sub(1, Ordering::AcqRel);
            self.budget_cv.notify_all();
        }
    }

    // ---- zaps (discard / write-zeroes) ----

    fn fill_token(&self, start: u64, end: u64) -> FillToken {
        let z = lock(&self.zaps);
        FillToken {
            seq: z.seq,
            clean: !z.overlaps(start, end),
        }
    }

    fn fill_valid(&self, t: &FillToken) -> bool {
        t.clean && lock(&self.zaps).seq == t.seq
    }

    fn zap_overlaps(&self, start: u64, end: u64) -> bool {
        lock(&self.zaps).overlaps(start, end)
    }

    fn wait_zaps_clear(&self, start: u64, end: u64) {
        let mut z = lock(&self.zaps);
        while z.overlaps(start, end) {
            z = self.zap_cv.wait(z).unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// The cached folios overlapping `[start, end)` (`end > start`).
    fn cached_in_range(&self, start: u64, end: u64) -> Vec<Arc<Folio>> {
        let first = start >> self.folio_shift;
        let last = (end - 1) >> self.folio_shift;
        let count = last - first + 1;
        if count <= 2 * self.max_folios as u64 {
            (first..=last).filter_map(|i| self.lookup(i)).collect()
        } else {
            let mut out = Vec::new();
            for shard in self.shards.iter() {
                let s = lock(shard);
                out.extend(
                    s.map
                        .values()
                        .filter(|f| f.index >= first && f.index <= last)
                        .cloned(),
                );
            }
            out
        }
    }

    /// Registers `[start, end)` as changing under the cache: from now on fills of it are not
    /// installed and writebacks overlapping it are deferred.
    fn register_zap(&self, start: u64, end: u64) -> u64 {
        let mut z = lock(&self.zaps);
        z.seq += 1;
        z.next_id += 1;
        let id = z.next_id;
        z.active.push(Zap { id, start, end });
        self.zaps_active.fetch_add(1, Ordering::SeqCst);
        id
    }

    fn unregister_zap(&self, id: u64) {
        {
            let mut z = lock(&self.zaps);
            z.active.retain(|zap| zap.id != id);
            z.seq += 1;
            self.zaps_active.fetch_sub(1, Ordering::SeqCst);
        }
        self.zap_cv.notify_all();
    }

    fn zap(&self, offset: u64, len: u64, kind: ZapKind) -> Result<()> {
        if self.read_only {
            return Err(BlockError::ReadOnly);
        }
        check_range(offset, len, self.size)?;
        if len == 0 {
            return Ok(());
        }
        let end = offset + len;
        let id = self.register_zap(offset, end);
        let result = self.zap_registered(offset, end, kind);
        self.unregister_zap(id);
        result?;
        if !self.wce.load(Ordering::SeqCst) {
            self.lower_flush()?;
        }
        Ok(())
    }

    fn zap_registered(&self, offset: u64, end: u64, kind: ZapKind) -> Result<()> {
        // Writebacks that started before the zap was registered must land before it.
        for f in self.cached_in_range(offset, end) {
            drop(f.wait_writeback(f.lock()));
        }
        self.hook(HookPoint::BeforeLowerZap, offset >> self.folio_shift);
        let len = end - offset;
        let result = match kind {
            ZapKind::Discard => self.lower.discard(offset, len),
            ZapKind::Zeroes { unmap } => self.lower.write_zeroes(offset, len, unmap),
        };
        for f in self.cached_in_range(offset, end) {
            let mut st = f.wait_writeback(f.lock());
            if st.evicted {
                continue;
            }
            let a = (offset.max(f.start) - f.start) as usize;
            let b = (end.min(f.start + f.len as u64) - f.start) as usize;
            let (sa, sb) = f.sector_span(a, b);
            for s in sa..sb {
                if result.is_ok() {
                    if f.partially_covers(s, a, b) {
                        if st.uptodate.get(s) {
                            let (x, y) = f.sector_bytes(s);
                            st.data[x.max(a)..y.min(b)].fill(0);
                        }
                    } else {
                        st.uptodate.clear(s, s + 1);
                        st.dirty.clear(s, s + 1);
                    }
                } else if !st.dirty.get(s) {
                    // The lower layer may now hold anything in the range: forget clean copies.
                    st.uptodate.clear(s, s + 1);
                }
            }
            self.maybe_clean(&f, &mut st);
        }
        result
    }

    // ---- reads ----

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(offset, buf.len() as u64, self.size)?;
        if buf.is_empty() {
            return Ok(());
        }
        self.wait_zaps_before_read(offset, offset + buf.len() as u64);
        if self.bypass_threshold > 0 && buf.len() as u64 >= self.bypass_threshold {
            return self.read_bypass(buf, offset);
        }
        let mut done = 0;
        for (index, a, n) in self.segments(offset, buf.len()) {
            self.read_segment(index, a, &mut buf[done..done + n])?;
            done += n;
        }
        Ok(())
    }

    /// Monotonic reads: a read never starts while a zap (or bypassing write) of its range is in
    /// flight. Such a zap has changed the lower layer before it drops the cached sectors of its
    /// range, so in between, a read served from below sees its result while a read served from
    /// the cache still sees the older bytes: a read that started after the first completed
    /// would go back in time. Waiting orders the read after the zap.
    fn wait_zaps_before_read(&self, start: u64, end: u64) {
        if self.zaps_active.load(Ordering::SeqCst) > 0 && self.zap_overlaps(start, end) {
            self.hook(HookPoint::ReadWaitsForZap, start >> self.folio_shift);
            self.wait_zaps_clear(start, end);
        }
    }

    /// A large read, without populating the cache. The cached folios of the range are pinned
    /// first, so a write completed before this read is either in a pinned folio or was written
    /// back before its folio could leave the map. Pinned folios that are uptodate over their
    /// part are copied; every other stretch is read from the lower layer in one request and
    /// then overlaid with the uptodate sectors of the pinned folios in it *as they were before
    /// the lower read*: they are copied aside under the folio lock first (read invariant: a
    /// zap finishing during the lower read may clear such a sector, and the lower layer's
    /// bytes are then older than the write the cache held).
    fn read_bypass(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let end = offset + buf.len() as u64;
        let mut pinned = self.cached_in_range(offset, end);
        pinned.sort_unstable_by_key(|f| f.index);
        let find = |index: u64| {
            pinned
                .binary_search_by_key(&index, |f| f.index)
                .ok()
                .and_then(|i| pinned.get(i))
        };
        // Stretches (buffer ranges) that must come from the lower layer.
        let mut lower_runs: Vec<(usize, usize)> = Vec::new();
        // Uptodate bytes of partly uptodate folios, taken before the lower read: (buffer
        // position, length) and their bytes, concatenated.
        let mut overlay: Vec<(usize, usize)> = Vec::new();
        let mut overlay_bytes: Vec<u8> = Vec::new();
        let mut done = 0;
        for (index, a, n) in self.segments(offset, buf.len()) {
            let copied = find(index).is_some_and(|f| {
                let st = f.lock();
                let (sa, sb) = f.sector_span(a, a + n);
                let full = st.uptodate.all(sa, sb);
                if full {
                    buf[done..done + n].copy_from_slice(&st.data[a..a + n]);
                } else {
                    let mut s = sa;
                    while let Some(up) = st.uptodate.find(s, sb, true) {
                        let stop = st.uptodate.find(up, sb, false).unwrap_or(sb);
                        let u = f.sector_bytes(up).0.max(a);
                        let v = f.sector_bytes(stop - 1).1.min(a + n);
                        overlay.push((done + (u - a), v - u));
                        overlay_bytes.extend_from_slice(&st.data[u..v]);
                        s = stop;
                    }
                }
                full
            });
            if !copied {
                match lower_runs.last_mut() {
                    Some((_, e)) if *e == done => *e = done + n,
                    _ => lower_runs.push((done, done + n)),
                }
            }
            done += n;
        }
        for &(x, y) in &lower_runs {
            self.lower.read_at(&mut buf[x..y], offset + x as u64)?;
        }
        // Every overlay lies in a segment that was not copied, i.e. inside a lower run.
        let mut src = 0;
        for &(dst, len) in &overlay {
            buf[dst..dst + len].copy_from_slice(&overlay_bytes[src..src + len]);
            src += len;
        }
        self.counters.bypassed.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Reads `out` from folio `index` at folio offset `a`.
    ///
    /// Read invariant: every sector of `out` gets a value the sector had at some instant while
    /// this read ran. Sectors uptodate when the folio is first locked are copied right then;
    /// only the sectors missing at that instant may come from the fill, whose lower read also
    /// covers the uptodate sectors between them (one request) - those bytes are never used,
    /// because a zap may have cleared such a sector meanwhile and the lower layer's bytes are
    /// then older than the write the cache held.
    fn read_segment(&self, index: u64, a: usize, out: &mut [u8]) -> Result<()> {
        let b = a + out.len();
        loop {
            let f = self.get_folio(index)?;
            let (sa, sb) = f.sector_span(a, b);
            let (lo, hi, was_uptodate) = {
                let st = f.lock();
                if st.evicted {
                    continue;
                }
                if st.uptodate.all(sa, sb) {
                    out.copy_from_slice(&st.data[a..b]);
                    self.counters.read_hits.fetch_add(1, Ordering::Relaxed);
                    return Ok(());
                }
                copy_uptodate(&f, &st, sa, sb, a, out);
                let lo = st.uptodate.find(sa, sb, false).unwrap_or(sa);
                let hi = st.uptodate.rfind(sa, sb, false).map_or(sb, |s| s + 1);
                (lo, hi, st.uptodate.clone())
            };
            self.counters.read_misses.fetch_add(1, Ordering::Relaxed);
            let ba = f.sector_bytes(lo).0;
            let bb = f.sector_bytes(hi - 1).1;
            let token = self.fill_token(f.start + ba as u64, f.start + bb as u64);
            let mut scratch = take_buf(&FILL_BUF, bb - ba);
            if let Err(e) = self
                .lower
                .read_at(&mut scratch[..bb - ba], f.start + ba as u64)
            {
                FILL_BUF.with(|c| c.set(scratch));
                return Err(e);
            }
            self.hook(HookPoint::AfterFillRead, index);
            {
                let mut st = f.lock();
                let valid = !st.evicted && self.fill_valid(&token);
                if valid {
                    install(&f, &mut st, lo, hi, ba, &scratch);
                } else {
                    self.counters.fills_dropped.fetch_add(1, Ordering::Relaxed);
                }
                // The sectors missing at the start (all inside `lo..hi`): the cache's bytes if
                // they are uptodate now, else this read's fill (read from below while they
                // were missing, so the lower layer held their newest value).
                let mut s = sa;
                while let Some(first) = was_uptodate.find(s, sb, false) {
                    let end = was_uptodate.find(first, sb, true).unwrap_or(sb);
                    for t in first..end {
                        let (x, y) = f.sector_bytes(t);
                        let (x, y) = (x.max(a), y.min(b));
                        let dst = &mut out[x - a..y - a];
                        if st.uptodate.get(t) {
                            dst.copy_from_slice(&st.data[x..y]);
                        } else {
                            dst.copy_from_slice(&scratch[x - ba..y - ba]);
                        }
                    }
                    s = end;
                }
            }
            FILL_BUF.with(|c| c.set(scratch));
            return Ok(());
        }
    }

    /// Fills sectors `lo..hi` of `f` from the lower layer (only those still missing).
    fn fill_sectors(&self, f: &Folio, lo: usize, hi: usize) -> Result<()> {
        let ba = f.sector_bytes(lo).0;
        let bb = f.sector_bytes(hi - 1).1;
        let token = self.fill_token(f.start + ba as u64, f.start + bb as u64);
        if !token.clean {
            // The range is being changed below: a fill now could not be installed; the caller
            // retries once the zap is over.
            self.wait_zaps_clear(f.start + ba as u64, f.start + bb as u64);
            return Ok(());
        }
        let mut scratch = take_buf(&FILL_BUF, bb - ba);
        let result = self
            .lower
            .read_at(&mut scratch[..bb - ba], f.start + ba as u64);
        if result.is_ok() {
            self.hook(HookPoint::AfterFillRead, f.index);
            let mut st = f.lock();
            if !st.evicted && self.fill_valid(&token) {
                install(f, &mut st, lo, hi, ba, &scratch);
            } else {
                self.counters.fills_dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
        FILL_BUF.with(|c| c.set(scratch));
        result
    }

    // ---- writes ----

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        if self.read_only {
            return Err(BlockError::ReadOnly);
        }
        check_range(offset, buf.len() as u64, self.size)?;
        let end = offset + buf.len() as u64;
        let fmask = self.folio_size as u64 - 1;
        // The whole folios of a large write go straight down (see `write_bypass`); the partial
        // folios at either end go through the cache.
        let head_end = offset
            .checked_add(fmask)
            .map_or(end, |v| (v & !fmask).min(end));
        let mid_end = if end == self.size { end } else { end & !fmask };
        if self.bypass_threshold > 0
            && buf.len() as u64 >= self.bypass_threshold
            && mid_end > head_end
        {
            let (h, m) = ((head_end - offset) as usize, (mid_end - offset) as usize);
            self.write_cached(&buf[..h], offset)?;
            self.write_bypass(&buf[h..m], head_end)?;
            self.write_cached(&buf[m..], mid_end)?;
        } else {
            self.write_cached(buf, offset)?;
        }
        if !self.wce.load(Ordering::SeqCst) && !buf.is_empty() {
            let first = offset >> self.folio_shift;
            let last = (offset + buf.len() as u64 - 1) >> self.folio_shift;
            for index in first..=last {
                if let Some(f) = self.lookup(index) {
                    self.sync_folio(&f)?;
                }
            }
            self.lower_flush()?;
        }
        Ok(())
    }

    fn write_cached(&self, buf: &[u8], offset: u64) -> Result<()> {
        let mut done = 0;
        for (index, a, n) in self.segments(offset, buf.len()) {
            self.write_segment(index, a, &buf[done..done + n])?;
            done += n;
        }
        Ok(())
    }

    /// Writes whole folios `[offset, offset + buf.len())` straight to the lower layer. The range
    /// is registered like a zap (fills of it are not installed, writebacks are deferred) and
    /// in-flight writebacks of its cached folios finish first, so no older snapshot can land
    /// after this write. Once it is down, the cached copies are dropped. If it fails, dirty
    /// sectors stay dirty (they are retried over whatever reached the disk) and clean copies are
    /// forgotten.
    fn write_bypass(&self, buf: &[u8], offset: u64) -> Result<()> {
        let end = offset + buf.len() as u64;
        let id = self.register_zap(offset, end);
        let pinned = self.cached_in_range(offset, end);
        self.hook(HookPoint::BeforeLowerZap, offset >> self.folio_shift);
        for f in &pinned {
            drop(f.wait_writeback(f.lock()));
        }
        let result = self.lower.write_at(buf, offset);
        for f in &pinned {
            let mut st = f.wait_writeback(f.lock());
            let n = f.sectors();
            if result.is_ok() {
                st.uptodate.clear(0, n);
                st.dirty.clear(0, n);
            } else {
                for s in 0..n {
                    if !st.dirty.get(s) {
                        st.uptodate.clear(s, s + 1);
                    }
                }
            }
            self.maybe_clean(f, &mut st);
        }
        drop(pinned);
        self.unregister_zap(id);
        self.counters.bypassed.fetch_add(1, Ordering::Relaxed);
        result
    }

    fn write_segment(&self, index: u64, a: usize, data: &[u8]) -> Result<()> {
        let b = a + data.len();
        if data.is_empty() {
            return Ok(());
        }
        loop {
            let f = self.get_folio(index)?;
            let (sa, sb) = f.sector_span(a, b);
            let (head, tail) = (sa, sb - 1);
            let mut st = f.lock();
            if st.evicted {
                continue;
            }
            // A partly covered sector must hold the disk's bytes before it becomes dirty, so that
            // writeback never writes bytes the cache does not know.
            let need_head = f.partially_covers(head, a, b) && !st.uptodate.get(head);
            let need_tail =
                tail != head && f.partially_covers(tail, a, b) && !st.uptodate.get(tail);
            if need_head || need_tail {
                drop(st);
                if need_head {
                    self.fill_sectors(&f, head, head + 1)?;
                }
                if need_tail {
                    self.fill_sectors(&f, tail, tail + 1)?;
                }
                continue;
            }
            // A zap (or bypassing write) of these bytes is in flight: it drops the cached sectors
            // of its range once its lower operation is done, so a write landing now would be
            // lost although it completed after the zap's lower operation. Wait for it to end.
            // (Checked under the folio lock: a zap registered after this check clears the folio
            // only after this write released it, so it orders after this write everywhere.)
            let (lo_b, hi_b) = (f.start + a as u64, f.start + b as u64);
            if self.zaps_active.load(Ordering::SeqCst) > 0 && self.zap_overlaps(lo_b, hi_b) {
                drop(st);
                drop(f);
                self.wait_zaps_clear(lo_b, hi_b);
                continue;
            }
            let newly_dirty = !st.accounted;
            if newly_dirty {
                if !self.reserve_dirty() {
                    drop(st);
                    drop(f);
                    self.relieve_pressure()?;
                    continue;
                }
                st.accounted = true;
                lock(&self.dirty_list).insert(index, f.clone());
            }
            st.data[a..b].copy_from_slice(data);
            st.uptodate.set(sa, sb);
            st.dirty.set(sa, sb);
            drop(st);
            f.touch();
            // Every `WRITEBACK_BATCH` folios that become dirty wake the flusher, so their data
            // starts down to the lower layer in the background while the guest keeps writing: a
            // later FLUSH then finds less left to write back (and the lower layer has had time
            // to start its own writeback) instead of doing all of it serially on its own path.
            // Batching keeps the wake-up cost off single small writes.
            let eager = newly_dirty
                && self
                    .newly_dirtied
                    .fetch_add(1, Ordering::Relaxed)
                    .wrapping_add(1)
                    .is_multiple_of(WRITEBACK_BATCH);
            if eager || self.dirty_folios.load(Ordering::Relaxed) * 2 >= self.max_dirty {
                self.kick_flusher();
            }
            return Ok(());
        }
    }

    // ---- writeback and flush ----

    /// Writes back the folio's dirty sectors. With `wait`, waits for an in-flight writeback
    /// first (so everything dirty when called is written when this returns `Written`/`Clean`).
    ///
    /// When the folio's dirty data reaches its end, the following folios whose dirty data starts
    /// at their beginning join the writeback (up to `cluster_folios`), so that sequentially
    /// written data goes down in large contiguous writes.
    fn writeback_folio(&self, f: &Arc<Folio>, wait: bool) -> Result<WbOutcome> {
        let mut st = f.lock();
        if st.writeback {
            if !wait {
                return Ok(WbOutcome::Busy);
            }
            st = f.wait_writeback(st);
        }
        if st.dirty.is_empty() {
            return Ok(WbOutcome::Clean);
        }
        let mut buf = take_buf(&WB_BUF, self.folio_size * self.cluster_folios);
        // (member number, first sector, end sector) of every dirty run, in disk order.
        let mut runs = WB_RUNS.with(Cell::take);
        runs.clear();
        let mut members: Vec<Arc<Folio>> = Vec::with_capacity(1);
        let mut open_end = snapshot_dirty(f, &mut st, 0, &mut buf, &mut runs);
        members.push(f.clone());
        drop(st);
        while open_end && members.len() < self.cluster_folios {
            let Some(g) = self.lookup(f.index + members.len() as u64) else {
                break;
            };
            let mut gs = g.lock();
            if gs.writeback || gs.evicted || !gs.dirty.get(0) {
                break;
            }
            open_end = snapshot_dirty(
                &g,
                &mut gs,
                members.len(),
                &mut buf[members.len() * self.folio_size..],
                &mut runs,
            );
            drop(gs);
            members.push(g);
        }

        self.hook(HookPoint::AfterWritebackSnapshot, f.index);
        let end = members.last().map_or(f.start, |g| g.start + g.len as u64);
        let outcome = if self.zap_overlaps(f.start, end) {
            Ok(WbOutcome::Deferred)
        } else {
            self.write_runs(&members, &buf, &runs)
                .map(|()| WbOutcome::Written)
        };

        for (m, g) in members.iter().enumerate() {
            let mut gs = g.lock();
            gs.writeback = false;
            if !matches!(outcome, Ok(WbOutcome::Written)) {
                // The snapshot did not reach the lower layer: its sectors are dirty again (the
                // cache holds them or newer bytes, since nothing drops sectors under writeback).
                for &(_, s, e) in runs.iter().filter(|r| r.0 == m) {
                    gs.dirty.set(s, e);
                }
            }
            self.maybe_clean(g, &mut gs);
            drop(gs);
            g.cv.notify_all();
        }
        let wb_bytes: usize = runs
            .iter()
            .filter_map(|&(m, s, e)| {
                let g = members.get(m)?;
                Some(g.sector_bytes(e - 1).1 - g.sector_bytes(s).0)
            })
            .sum();
        WB_BUF.with(|c| c.set(buf));
        WB_RUNS.with(|c| c.set(runs));
        match &outcome {
            Ok(WbOutcome::Written) => {
                self.counters
                    .writebacks
                    .fetch_add(members.len() as u64, Ordering::Relaxed);
                self.counters
                    .writeback_bytes
                    .fetch_add(wb_bytes as u64, Ordering::Relaxed);
            }
            Err(e) => {
                self.counters
                    .writeback_errors
                    .fetch_add(1, Ordering::Relaxed);
                log::warn!(
                    "cache writeback of folios {}..={} failed: {e}",
                    f.index,
                    f.index + members.len() as u64 - 1
                );
            }
            _ => {}
        }
        outcome
    }

    /// Writes the snapshot runs (`buf` starts at disk offset `start`, one folio per member),
    /// merging runs that touch into one lower write.
    fn write_runs(
        &self,
        members: &[Arc<Folio>],
        buf: &[u8],
        runs: &[(usize, usize, usize)],
    ) -> Result<()> {
        let Some(start) = members.first().map(|f| f.start) else {
            return Ok(());
        };
        let byte_range = |&(m, s, e): &(usize, usize, usize)| {
            let base = m * self.folio_size;
            let (x, y) = members
                .get(m)
                .map_or((0, 0), |g| (g.sector_bytes(s).0, g.sector_bytes(e - 1).1));
            (base + x, base + y)
        };
        let mut pending: Option<(usize, usize)> = None;
        for r in runs {
            let (x, y) = byte_range(r);
            pending = match pending {
                Some((a, b)) if b == x => Some((a, y)),
                Some((a, b)) => {
                    self.lower.write_at(&buf[a..b], start + a as u64)?;
                    Some((x, y))
                }
                None => Some((x, y)),
            };
        }
        if let Some((a, b)) = pending {
            self.lower.write_at(&buf[a..b], start + a as u64)?;
        }
        Ok(())
    }

    /// Writes back everything dirty in `f` as of now, waiting out zaps and in-flight writebacks.
    fn sync_folio(&self, f: &Arc<Folio>) -> Result<()> {
        loop {
            match self.writeback_folio(f, true)? {
                WbOutcome::Deferred => self.wait_zaps_clear(f.start, f.start + f.len as u64),
                _ => return Ok(()),
            }
        }
    }

    /// Writes back every folio of `folios` (in disk order) and returns the first error. A long
    /// list is shared by up to `FLUSH_WORKERS` threads that take whole runs of adjacent folios
    /// whose dirty data touches (at most `cluster_folios`, what one clustered writeback takes
    /// along), so that the lower layer sees several writebacks at once (a copy-on-write
    /// writeback waits for a read of the backing file) while sequential dirty data still
    /// reaches it in one write: a run never starts inside another thread's cluster.
    fn sync_folios(&self, folios: &[Arc<Folio>]) -> Option<BlockError> {
        // Runs follow the clustering rule of `sync_folio` as it looks now (a dirty end meets a
        // dirty beginning); that only decides who writes what, `sync_folio` re-checks.
        let mut runs: Vec<std::ops::Range<usize>> = Vec::new();
        let mut open_end = false;
        for (i, f) in folios.iter().enumerate() {
            let (starts, ends) = {
                let st = f.lock();
                let n = f.sectors();
                (st.dirty.get(0), st.dirty.get(n - 1))
            };
            match runs.last_mut() {
                Some(r)
                    if open_end
                        && starts
                        && r.len() < self.cluster_folios
                        && folios[r.end - 1].index + 1 == f.index =>
                {
                    r.end = i + 1;
                }
                _ => runs.push(i..i + 1),
            }
            open_end = ends;
        }
        let workers = runs.len().div_ceil(FLUSH_MIN_RUNS).min(FLUSH_WORKERS);
        let next = AtomicUsize::new(0);
        let first_error = Mutex::new(None);
        let work = || {
            while let Some(run) = runs.get(next.fetch_add(1, Ordering::Relaxed)) {
                for f in &folios[run.clone()] {
                    if let Err(e) = self.sync_folio(f) {
                        lock(&first_error).get_or_insert(e);
                    }
                }
            }
        };
        if workers <= 1 {
            work();
        } else {
            std::thread::scope(|s| {
                for _ in 1..workers {
                    s.spawn(work);
                }
                work();
            });
        }
        first_error
            .into_inner()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Writes back up to `max` dirty folios (round robin over the disk), skipping busy ones.
    /// Returns how many were written; an error only if none could be written.
    fn writeback_some(&self, max: usize) -> Result<usize> {
        let batch: Vec<Arc<Folio>> = {
            let list = lock(&self.dirty_list);
            let cursor = self.wb_cursor.load(Ordering::Relaxed);
            list.range(cursor..)
                .chain(list.range(..cursor))
                .take(max)
                .map(|(_, f)| f.clone())
                .collect()
        };
        let mut written = 0;
        let mut error = None;
        for f in &batch {
            self.wb_cursor
                .store(f.index.wrapping_add(1), Ordering::Relaxed);
            match self.writeback_folio(f, false) {
                Ok(WbOutcome::Written) => written += 1,
                Ok(_) => {}
                Err(e) => {
                    error.get_or_insert(e);
                }
            }
        }
        match error {
            Some(e) if written == 0 => Err(e),
            _ => Ok(written),
        }
    }

    fn lower_flush(&self) -> Result<()> {
        if self.lower_flush_failed.load(Ordering::SeqCst) {
            return Err(BlockError::Io(std::io::Error::other(
                "an earlier flush of the lower layer failed; written data may have been lost",
            )));
        }
        self.lower
            .flush()
            .inspect_err(|_| self.lower_flush_failed.store(true, Ordering::SeqCst))
    }

    fn flush(&self) -> Result<()> {
        let accounted: Vec<Arc<Folio>> = lock(&self.dirty_list).values().cloned().collect();
        let first_error = self.sync_folios(&accounted);
        drop(accounted);
        if let Some(e) = first_error {
            return Err(e);
        }
        self.hook(HookPoint::BeforeLowerFlush, 0);
        self.lower_flush()
    }

    // ---- background writeback ----

    fn kick_flusher(&self) {
        if self.has_flusher && !self.kick.swap(true, Ordering::AcqRel) {
            let _g = lock(&self.flusher_lock);
            self.flusher_cv.notify_one();
        }
    }

    fn flusher_main(&self) {
        let interval = self.cfg.writeback_interval;
        let tick = (interval / 4).clamp(Duration::from_millis(10), Duration::from_millis(250));
        let mut last_full = Instant::now();
        while !self.stop.load(Ordering::SeqCst) {
            {
                let g = lock(&self.flusher_lock);
                if !self.kick.load(Ordering::Acquire) && !self.stop.load(Ordering::SeqCst) {
                    drop(
                        self.flusher_cv
                            .wait_timeout(g, tick)
                            .unwrap_or_else(PoisonError::into_inner),
                    );
                }
            }
            let kicked = self.kick.swap(false, Ordering::AcqRel);
            let dirty = self.dirty_folios.load(Ordering::Acquire);
            if dirty == 0 {
                last_full = Instant::now();
                continue;
            }
            let periodic = last_full.elapsed() >= interval;
            if !(kicked || periodic || dirty * 2 >= self.max_dirty) {
                continue;
            }
            let target = if periodic { 0 } else { self.max_dirty / 4 };
            while !self.stop.load(Ordering::SeqCst) {
                match self.writeback_some(WRITEBACK_BATCH) {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(e) => {
                        log::warn!("background writeback failed, will retry: {e}");
                        break;
                    }
                }
                if self.dirty_folios.load(Ordering::Acquire) <= target {
                    break;
                }
            }
            if periodic {
                last_full = Instant::now();
            }
        }
    }
}

/// Copies the dirty sectors of `f` into `buf` (the folio's bytes at the same offsets), records
/// them as runs of member `member`, clears them and starts the writeback. Returns whether the
/// last dirty run reaches the end of the folio.
fn snapshot_dirty(
    f: &Folio,
    st: &mut FolioState,
    member: usize,
    buf: &mut [u8],
    runs: &mut Vec<(usize, usize, usize)>,
) -> bool {
    let n = f.sectors();
    let mut s = 0;
    let mut open_end = false;
    while let Some(first) = st.dirty.find(s, n, true) {
        let end = st.dirty.find(first, n, false).unwrap_or(n);
        let (x, y) = (f.sector_bytes(first).0, f.sector_bytes(end - 1).1);
        buf[x..y].copy_from_slice(&st.data[x..y]);
        runs.push((member, first, end));
        open_end = end == n;
        s = end;
    }
    st.dirty.clear(0, n);
    st.writeback = true;
    open_end
}

/// Copies the uptodate sectors among `sa..sb` of `f` into `out`, which holds the folio's bytes
/// `[a, a + out.len())`.
fn copy_uptodate(f: &Folio, st: &FolioState, sa: usize, sb: usize, a: usize, out: &mut [u8]) {
    let b = a + out.len();
    let mut s = sa;
    while let Some(first) = st.uptodate.find(s, sb, true) {
        let end = st.uptodate.find(first, sb, false).unwrap_or(sb);
        let x = f.sector_bytes(first).0.max(a);
        let y = f.sector_bytes(end - 1).1.min(b);
        out[x - a..y - a].copy_from_slice(&st.data[x..y]);
        s = end;
    }
}

/// Copies the fill data for sectors `lo..hi` (buffer starting at folio byte `ba`) into the
/// sectors that are still not uptodate, and marks them uptodate.
fn install(f: &Folio, st: &mut FolioState, lo: usize, hi: usize, ba: usize, fill: &[u8]) {
    let mut s = lo;
    while let Some(start) = st.uptodate.find(s, hi, false) {
        let end = st.uptodate.find(start, hi, true).unwrap_or(hi);
        let (x, y) = (f.sector_bytes(start).0, f.sector_bytes(end - 1).1);
        st.data[x..y].copy_from_slice(&fill[x - ba..y - ba]);
        st.uptodate.set(start, end);
        s = end;
    }
}
