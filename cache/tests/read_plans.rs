//! Planned reads (`BlockDev::plan_read`, executed later by the io_uring read path with no lock
//! held): the cache plans a read below itself only while no cached folio holds any sector of
//! its range and no zap of it is in flight, so a plan made after a write completed never misses
//! that write. The
//! deterministic tests run the racing request exactly between the cache's check and the lower
//! layer's plan (`HookPoint::ReadPlanned`), and exactly inside a zap (`BeforeLowerZap`).

mod common;

use std::sync::mpsc::channel;
use std::sync::Arc;

use blockdev::{BlockDev, RawFile};
use cache::{FolioCache, HookPoint};
use common::{gate, pattern, small_cfg, OnceHook};

const K4: u64 = 4096;

/// A cache of 4 KiB folios over a writable raw file holding `pattern(1, ..)`, with `hook`
/// installed.
fn cache_over_file(hook: Arc<OnceHook>) -> (tempfile::TempDir, Arc<FolioCache>) {
    cache_over_file_with(hook, K4)
}

/// [`cache_over_file`] with folios of `folio` bytes (a 128 KiB file).
fn cache_over_file_with(hook: Arc<OnceHook>, folio: u64) -> (tempfile::TempDir, Arc<FolioCache>) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.raw");
    std::fs::write(&path, pattern(1, 0, 128 << 10)).unwrap();
    let lower: Arc<dyn BlockDev> = Arc::new(RawFile::open(&path, false).unwrap());
    let cache = FolioCache::with_hooks(lower, small_cfg(folio, 8, 4), hook).unwrap();
    (dir, cache)
}

#[test]
fn a_read_is_planned_below_the_cache_only_while_no_folio_holds_a_sector_of_its_range() {
    let (_dir, cache) = cache_over_file(OnceHook::new(HookPoint::ReadPlanned, u64::MAX));
    let plan = cache
        .plan_read(0, 2 * K4)
        .expect("nothing cached: planned below");
    assert_eq!(plan.read_all().unwrap(), pattern(1, 0, 2 * K4 as usize));
    // A dirty sector, then the same sector clean after its writeback: the cache serves it.
    cache.write_at(&[0xaa; 512], K4 + 512).unwrap();
    assert!(cache.plan_read(K4, K4).is_none());
    assert!(cache.plan_read(0, 2 * K4).is_none(), "a range touching it");
    cache.flush().unwrap();
    assert!(cache.plan_read(K4 + 512, 512).is_none());
    assert!(cache.plan_read(K4, 1024).is_none(), "a range touching it");
    // The folio's other sectors are in the file only.
    let plan = cache
        .plan_read(K4 + 1024, 512)
        .expect("a sector the cache lacks");
    assert_eq!(plan.read_all().unwrap(), pattern(1, K4 + 1024, 512));
    // A clean folio filled by a read counts too.
    let mut b = vec![0u8; 512];
    cache.read_at(&mut b, 4 * K4).unwrap();
    assert!(cache.plan_read(4 * K4, K4).is_none());
    // Untouched folios are still planned.
    assert!(cache.plan_read(2 * K4, 2 * K4).is_some());
    assert!(cache.plan_read(0, 0).is_none());
    assert!(
        cache.plan_read(124 << 10, 8 << 10).is_none(),
        "out of range"
    );
}

#[test]
fn a_large_folio_that_a_small_read_filled_does_not_keep_its_other_sectors_from_the_plan() {
    // 64 KiB folios: a 4 KiB read caches 4 KiB of its folio. The rest of the folio is planned
    // below (the io_uring path, not a synchronous read); the filled part, and a part a write
    // completed into (dirty, then clean after its writeback), stay with the cache.
    let k64 = 64 << 10;
    let (_dir, cache) = cache_over_file_with(OnceHook::new(HookPoint::ReadPlanned, u64::MAX), k64);
    let mut b = vec![0u8; K4 as usize];
    cache.read_at(&mut b, K4).unwrap();
    assert_eq!(b, pattern(1, K4, K4 as usize));
    assert!(cache.plan_read(K4, K4).is_none(), "the filled part");
    assert!(cache.plan_read(0, 2 * K4).is_none(), "a range touching it");
    assert!(
        cache.plan_read(2 * K4 - 512, 1024).is_none(),
        "its last sector"
    );
    let plan = cache
        .plan_read(2 * K4, 4 * K4)
        .expect("the folio's other sectors");
    assert_eq!(
        plan.read_all().unwrap(),
        pattern(1, 2 * K4, 4 * K4 as usize)
    );
    cache.write_at(&[0x5c; 4096], 8 * K4).unwrap();
    assert!(
        cache.plan_read(8 * K4, K4).is_none(),
        "a completed write, dirty"
    );
    cache.flush().unwrap();
    assert!(
        cache.plan_read(8 * K4, K4).is_none(),
        "a completed write, clean"
    );
    assert!(
        cache.plan_read(6 * K4, 4 * K4).is_none(),
        "a range touching it"
    );
    let plan = cache.plan_read(12 * K4, 4 * K4).expect("still the file's");
    assert_eq!(
        plan.read_all().unwrap(),
        pattern(1, 12 * K4, 4 * K4 as usize)
    );
    // A plan spanning two folios, one of them untouched.
    let plan = cache.plan_read(k64 - K4, 2 * K4).expect("across folios");
    assert_eq!(
        plan.read_all().unwrap(),
        pattern(1, k64 - K4, 2 * K4 as usize)
    );
    // The same rules inside a folio that does not start the disk: its filled middle stays with
    // the cache, the sectors before and after it go below.
    cache.read_at(&mut b, k64 + 8 * K4).unwrap();
    assert!(
        cache.plan_read(k64 + 8 * K4, K4).is_none(),
        "the filled middle"
    );
    assert!(
        cache.plan_read(k64 + 7 * K4, 2 * K4).is_none(),
        "a range touching it"
    );
    let plan = cache
        .plan_read(k64 + K4, K4)
        .expect("before the filled part");
    assert_eq!(plan.read_all().unwrap(), pattern(1, k64 + K4, K4 as usize));
    let plan = cache
        .plan_read(k64 + 12 * K4, K4)
        .expect("after the filled part");
    assert_eq!(
        plan.read_all().unwrap(),
        pattern(1, k64 + 12 * K4, K4 as usize)
    );
}

#[test]
fn a_write_completing_between_the_cache_check_and_the_lower_plan_is_either_seen_or_concurrent() {
    // The write lands (and is written back to the file) right after the cache found no folio:
    // it did not complete before the read was submitted, so the plan may return the old bytes
    // or the new ones, sector by sector never anything else; and every plan made after it
    // completed sees it. The same with the read's folio already cached for other sectors
    // (a 64 KiB folio, the disk's second, a read of whose second half filled it).
    for (writeback, prefilled) in [(false, false), (true, false), (false, true), (true, true)] {
        let (at, folio) = if prefilled { (64 << 10, 1) } else { (0, 0) };
        let hook = OnceHook::new(HookPoint::ReadPlanned, folio);
        let (_dir, cache) = if prefilled {
            let (dir, cache) = cache_over_file_with(hook.clone(), 64 << 10);
            let mut b = vec![0u8; 32 << 10];
            cache.read_at(&mut b, at + (32 << 10)).unwrap();
            (dir, cache)
        } else {
            cache_over_file(hook.clone())
        };
        let c = cache.clone();
        hook.arm(move || {
            c.write_at(&[0xcd; 4096], at).unwrap();
            if writeback {
                c.flush().unwrap();
            }
        });
        let plan = cache.plan_read(at, K4).expect("planned");
        assert!(hook.fired());
        let got = plan.read_all().unwrap();
        let old = pattern(1, at, K4 as usize);
        for (i, s) in got.chunks(512).enumerate() {
            let o = &old[i * 512..(i + 1) * 512];
            assert!(
                s == o || s == [0xcd; 512],
                "sector {i}: neither the old nor the racing bytes (writeback {writeback}, \
                 prefilled {prefilled})"
            );
        }
        assert!(
            cache.plan_read(at, K4).is_none(),
            "a plan after the write completed must leave it to the cache"
        );
        let mut b = vec![0u8; 4096];
        cache.read_at(&mut b, at).unwrap();
        assert_eq!(b, vec![0xcd; 4096]);
    }
}

#[test]
fn a_plan_of_a_range_with_a_zap_in_flight_waits_until_the_zap_is_done() {
    // A discard is parked after registering, before it reaches the file. A read planned now
    // must not name the file's old bytes (the discard completes before the plan returns, and
    // a read served from the cache afterwards would see zeros: time would run backwards).
    let hook = OnceHook::new(HookPoint::BeforeLowerZap, 0);
    let (_dir, cache) = cache_over_file(hook.clone());
    let (park, reached, go) = gate();
    hook.arm(park);
    let c = cache.clone();
    let zap = std::thread::spawn(move || c.discard(0, K4).unwrap());
    reached.recv().unwrap();
    let (done_tx, done_rx) = channel();
    let c = cache.clone();
    let planner = std::thread::spawn(move || {
        let plan = c.plan_read(0, K4);
        done_tx.send(()).unwrap();
        plan
    });
    assert!(
        done_rx
            .recv_timeout(std::time::Duration::from_millis(100))
            .is_err(),
        "planned while the discard of its range was in flight"
    );
    go.send(()).unwrap();
    zap.join().unwrap();
    let plan = planner
        .join()
        .unwrap()
        .expect("planned once the discard is done");
    assert_eq!(plan.read_all().unwrap(), vec![0; K4 as usize]);
}
