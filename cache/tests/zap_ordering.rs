//! Deterministic interleaving tests of the ordering between writeback and a discard /
//! write-zeroes (a zap): a writeback snapshot taken before a zap's lower operation never lands
//! after it. Two separate rules make that true, and each is tested alone here (each was a
//! surviving mutant for the other tests): a zap waits for writebacks already in flight before
//! its lower operation, and a writeback that snapshots while a zap is registered is deferred.
//! Also here: a zap that fails forgets the clean cached copies of its range (a surviving mutant
//! of the focused `make mutants` run over the cache's writeback, zap and flush functions), and
//! a flush or write-through write whose writeback a zap deferred waits for it (another one).

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use blockdev::BlockDev;
use cache::{CacheHooks, FolioCache, HookPoint};
use common::{cache_over, pattern, read, small_cfg, FaultyDisk, Io};

const K4: u64 = 4096;

fn wait_until(cond: impl Fn() -> bool, limit: Duration) {
    let start = Instant::now();
    while !cond() && start.elapsed() < limit {
        thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn zap_waits_for_a_writeback_already_writing_before_its_lower_operation() {
    let lower = FaultyDisk::new(pattern(1, 0, 64 << 10));
    let cache = cache_over(&lower, small_cfg(K4, 8, 4));
    cache.write_at(&[0xaa; 4096], 0).unwrap();
    let zapper = Arc::new(Mutex::new(None));
    let (c, slot) = (cache.clone(), zapper.clone());
    // The writeback passed every check and its lower write is about to land: a discard now must
    // not reach the lower layer before that write does.
    lower.at(Io::WriteStart, 0, K4, move || {
        let t = thread::spawn(move || c.discard(0, K4).unwrap());
        wait_until(|| t.is_finished(), Duration::from_millis(100));
        *slot.lock().unwrap() = Some(t);
    });
    cache.flush().unwrap();
    zapper.lock().unwrap().take().unwrap().join().unwrap();
    cache.flush().unwrap();
    assert_eq!(
        lower.bytes(0, 4096),
        vec![0; 4096],
        "a writeback landed after the discard"
    );
    assert_eq!(read(&*cache, 0, 4096), vec![0; 4096]);
}

/// Hooks: at the zap's `BeforeLowerZap`, start a flush and let it take its writeback snapshot;
/// the flush's writeback then waits (at `AfterWritebackSnapshot`) until the zap's lower
/// operation is done.
#[derive(Default)]
struct SnapshotDuringZap {
    cache: Mutex<Option<Arc<FolioCache>>>,
    flusher: Mutex<Option<thread::JoinHandle<()>>>,
    snapshotted: AtomicBool,
    zapped: Arc<AtomicBool>,
}

impl CacheHooks for SnapshotDuringZap {
    fn at(&self, point: HookPoint, _folio: u64) {
        match point {
            HookPoint::BeforeLowerZap => {
                let Some(c) = self.cache.lock().unwrap().take() else {
                    return;
                };
                *self.flusher.lock().unwrap() = Some(thread::spawn(move || {
                    let _ = c.flush();
                }));
                wait_until(
                    || self.snapshotted.load(Ordering::SeqCst),
                    Duration::from_secs(1),
                );
            }
            HookPoint::AfterWritebackSnapshot if !self.snapshotted.load(Ordering::SeqCst) => {
                self.snapshotted.store(true, Ordering::SeqCst);
                wait_until(
                    || self.zapped.load(Ordering::SeqCst),
                    Duration::from_secs(1),
                );
            }
            _ => {}
        }
    }
}

#[test]
fn writeback_snapshotted_while_a_zap_is_registered_is_deferred_past_it() {
    let lower = FaultyDisk::new(pattern(1, 0, 64 << 10));
    let hooks = Arc::new(SnapshotDuringZap::default());
    let cache = FolioCache::with_hooks(
        lower.clone() as Arc<dyn BlockDev>,
        small_cfg(K4, 8, 4),
        hooks.clone(),
    )
    .unwrap();
    cache.write_at(&[0xaa; 4096], 0).unwrap();
    *hooks.cache.lock().unwrap() = Some(cache.clone());
    let zapped = hooks.zapped.clone();
    lower.at(Io::Zap, 0, K4, move || zapped.store(true, Ordering::SeqCst));
    // The discard registered and waited for writebacks (none); now a writeback snapshots the old
    // data and tries to write it after the discard reached the lower layer.
    cache.discard(0, K4).unwrap();
    assert!(hooks.snapshotted.load(Ordering::SeqCst), "no writeback ran");
    hooks
        .flusher
        .lock()
        .unwrap()
        .take()
        .unwrap()
        .join()
        .unwrap();
    cache.flush().unwrap();
    assert_eq!(
        lower.bytes(0, 4096),
        vec![0; 4096],
        "a writeback snapshotted during the discard landed after it"
    );
    assert_eq!(read(&*cache, 0, 4096), vec![0; 4096]);
}

#[test]
fn a_failed_zap_forgets_the_clean_cached_copies_of_its_range() {
    // A discard or write-zeroes that fails may have changed the lower layer part-way: the cache
    // must not keep serving its clean copies of the range (the lower layer is the truth now), or a
    // read would return one value while the folio stays cached and another once it is evicted,
    // with no write in between. Dirty sectors stay (they are newer than anything below).
    for zeroes in [false, true] {
        let lower = FaultyDisk::new(pattern(1, 0, 64 << 10));
        let cache = cache_over(&lower, small_cfg(K4, 8, 4));
        let clean_off = K4 + 512;
        let dirty_off = K4 + 2048;
        let _ = read(&*cache, K4, K4 as usize);
        let dirty = pattern(9, dirty_off, 512);
        cache.write_at(&dirty, dirty_off).unwrap();
        lower.fail_zaps_after_applying(true);
        let r = if zeroes {
            cache.write_zeroes(K4, K4, false)
        } else {
            cache.discard(K4, K4)
        };
        assert!(r.is_err(), "the lower layer's failure is reported");
        lower.heal();
        let cached = read(&*cache, clean_off, 512);
        assert_eq!(
            cached,
            lower.bytes(clean_off, 512),
            "zeroes={zeroes}: after a failed zap, a clean sector reads as the lower layer holds \
             it, not as the cache held it before"
        );
        assert_eq!(
            read(&*cache, dirty_off, 512),
            dirty,
            "zeroes={zeroes}: a dirty sector survives a failed zap"
        );
        cache.flush().unwrap();
        cache.drop_clean();
        assert_eq!(read(&*cache, clean_off, 512), cached, "zeroes={zeroes}");
    }
}

#[test]
fn a_failed_bypassing_write_forgets_the_clean_cached_copies_of_its_folios() {
    // The same rule for the whole folios of a large write that bypasses the cache: if the lower
    // write fails, part of it may be below; clean copies are dropped, dirty sectors stay.
    let lower = FaultyDisk::new(pattern(1, 0, 64 << 10));
    let cfg = cache::CacheConfig {
        bypass_threshold: 4 * K4,
        read_bypass_threshold: 0,
        ..small_cfg(K4, 16, 8)
    };
    let cache = cache_over(&lower, cfg);
    let clean_off = K4 + 512;
    let dirty_off = 2 * K4 + 1024;
    let _ = read(&*cache, K4, 2 * K4 as usize);
    let dirty = pattern(9, dirty_off, 512);
    cache.write_at(&dirty, dirty_off).unwrap();
    lower.fail_writes_after_applying(true);
    assert!(cache.write_at(&pattern(7, 0, 8 * K4 as usize), 0).is_err());
    lower.heal();
    let cached = read(&*cache, clean_off, 512);
    assert_eq!(
        cached,
        lower.bytes(clean_off, 512),
        "after a failed bypassing write, a clean sector reads as the lower layer holds it"
    );
    assert_eq!(
        read(&*cache, dirty_off, 512),
        dirty,
        "a dirty sector survives"
    );
    cache.flush().unwrap();
    cache.drop_clean();
    assert_eq!(read(&*cache, clean_off, 512), cached);
}

/// Records every hook point with the folio it names.
#[derive(Default)]
struct Recorder(Mutex<Vec<(HookPoint, u64)>>);

impl CacheHooks for Recorder {
    fn at(&self, point: HookPoint, folio: u64) {
        self.0.lock().unwrap().push((point, folio));
    }
}

#[test]
fn zap_hooks_name_the_first_folio_of_the_range() {
    // Interleaving tests park requests by the folio their hooks name; a wrong index would park
    // the wrong request and let a test pass without running its race.
    let lower = FaultyDisk::new(pattern(1, 0, 64 << 10));
    let hooks = Arc::new(Recorder::default());
    let cfg = cache::CacheConfig {
        bypass_threshold: 4 * K4,
        read_bypass_threshold: 0,
        ..small_cfg(K4, 16, 8)
    };
    let cache =
        FolioCache::with_hooks(lower.clone() as Arc<dyn BlockDev>, cfg, hooks.clone()).unwrap();
    cache.discard(3 * K4, K4).unwrap();
    cache.write_zeroes(5 * K4 + 512, 512, false).unwrap();
    cache
        .write_at(&pattern(2, 8 * K4, 4 * K4 as usize), 8 * K4)
        .unwrap();
    let zaps: Vec<u64> = hooks
        .0
        .lock()
        .unwrap()
        .iter()
        .filter(|(p, _)| *p == HookPoint::BeforeLowerZap)
        .map(|&(_, f)| f)
        .collect();
    assert_eq!(zaps, vec![3, 5, 8]);
}

#[test]
fn a_flush_or_write_through_write_deferred_by_a_zap_completes_only_after_its_writeback() {
    // A writeback of a folio that overlaps a registered zap is deferred (see above); a flush and a
    // write in write-through mode must then wait for the zap and write the folio back before they
    // report success, or a FLUSH would be acknowledged with its data still only in the cache (a
    // surviving mutant of `sync_folio`'s deferred arm). The zap covers other bytes of the folio.
    for write_through in [false, true] {
        let lower = FaultyDisk::new(pattern(1, 0, 64 << 10));
        let cache = cache_over(&lower, small_cfg(K4, 8, 4));
        let data = pattern(5, 0, 512);
        if !write_through {
            cache.write_at(&data, 0).unwrap();
        }
        let (c, l, d) = (cache.clone(), lower.clone(), data.clone());
        let request = Arc::new(Mutex::new(None));
        let slot = request.clone();
        // The zap's lower operation is done and it is still registered: run the request now.
        lower.at(Io::Zap, 2048, 512, move || {
            let t = thread::spawn(move || {
                if write_through {
                    c.set_writeback(false).unwrap();
                    c.write_at(&d, 0).unwrap();
                } else {
                    c.flush().unwrap();
                }
                l.bytes(0, 512)
            });
            wait_until(|| t.is_finished(), Duration::from_millis(200));
            *slot.lock().unwrap() = Some(t);
        });
        cache.discard(2048, 512).unwrap();
        let below = request.lock().unwrap().take().unwrap().join().unwrap();
        assert_eq!(
            below, data,
            "write_through={write_through}: the request reported success before the folio it \
             covers was written back"
        );
    }
}

#[test]
fn a_flush_s_own_writeback_of_a_folio_a_zap_overlaps_waits_for_the_zap() {
    // The folio is dirty inside and outside the discarded range. While the discard's lower
    // operation is done and the zap still registered, a flush writes back: its batched pass
    // defers the folio, and its per-folio pass (`sync_folio`, the one a flush and a
    // write-through write end with) must defer it too, or it writes the old bytes of the
    // discarded range below after the discard.
    let lower = FaultyDisk::new(pattern(1, 0, 64 << 10));
    let cache = cache_over(&lower, small_cfg(K4, 8, 4));
    // Folio 2: for folio 0 an empty range's end wraps around to past everything.
    let at = 2 * K4;
    cache.write_at(&pattern(5, at, 512), at).unwrap();
    cache
        .write_at(&pattern(6, at + 2048, 512), at + 2048)
        .unwrap();
    let c = cache.clone();
    let flush = Arc::new(Mutex::new(None));
    let slot = flush.clone();
    lower.at(Io::Zap, at + 2048, 512, move || {
        let t = thread::spawn(move || c.flush());
        wait_until(|| t.is_finished(), Duration::from_millis(200));
        *slot.lock().unwrap() = Some(t);
    });
    cache.discard(at + 2048, 512).unwrap();
    flush
        .lock()
        .unwrap()
        .take()
        .expect("the hook did not run")
        .join()
        .unwrap()
        .unwrap();
    assert_eq!(
        lower.bytes(at + 2048, 512),
        vec![0; 512],
        "the flush wrote the discarded range's old bytes below after the discard"
    );
    assert_eq!(lower.bytes(at, 512), pattern(5, at, 512));
    assert_eq!(read(&*cache, at + 2048, 512), vec![0; 512]);
}
