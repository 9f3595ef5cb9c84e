//! Batched writeback: the flusher, throttled writers and flush threads snapshot a batch of
//! folios and hand all their lower writes down in one `BlockDev::write_batch` (on an O_DIRECT
//! qcow2 image they are in flight together). Every folio of a batch ends its writeback with the
//! outcome of its own writes, and a write that lands while the batch is below stays dirty.

mod common;

use std::sync::mpsc::channel;
use std::sync::Arc;
use std::time::Duration;

use blockdev::BlockDev;
use cache::{CacheConfig, FolioCache, HookPoint};
use common::*;

const K4: u64 = 4096;

#[test]
fn a_flush_writes_back_in_batches_and_a_failed_write_keeps_only_its_own_folio_dirty() {
    // One sector (the third) of every other folio: no writeback merges two folios, so the
    // flush has 32 separate writes to hand down.
    let lower = FaultyDisk::new(vec![0; 64 * K4 as usize]);
    let cache = cache_over(&lower, small_cfg(K4, 64, 64));
    for i in (0..64u64).step_by(2) {
        cache
            .write_at(&pattern(i as u8, i * K4, 512), i * K4 + 1024)
            .unwrap();
    }
    lower.fail_writes(10 * K4 + 1024, 512);
    cache
        .flush()
        .expect_err("a failed writeback was not reported");
    let batches = lower.batches();
    // 32 runs on up to 8 flush threads: chunks of 4 runs, each one batch.
    assert!(
        batches.iter().all(|&n| n >= 2) && batches.iter().sum::<usize>() == 32,
        "the flush did not write back in batches: {batches:?}"
    );
    for i in (0..64u64).step_by(2) {
        let want = if i == 10 {
            vec![0; 512]
        } else {
            pattern(i as u8, i * K4, 512)
        };
        assert_eq!(
            lower.bytes(i * K4 + 1024, 512),
            want,
            "folio {i} after the failed flush"
        );
    }
    let st = cache.stats();
    assert_eq!(st.dirty_folios, 1, "only the failed folio stays dirty");
    assert_eq!(st.writeback_errors, 1);
    assert_eq!(st.writebacks, 31, "folios written back");
    assert_eq!(st.writeback_bytes, 31 * 512, "bytes written back");
    lower.heal();
    cache.flush().unwrap();
    assert_eq!(lower.bytes(10 * K4 + 1024, 512), pattern(10, 10 * K4, 512));
    let st = cache.stats();
    assert_eq!(st.dirty_folios, 0);
    assert_eq!((st.writebacks, st.writeback_bytes), (32, 32 * 512));
}

#[test]
fn a_write_between_a_batched_snapshot_and_its_lower_write_stays_dirty_and_goes_down_after_it() {
    // The flush snapshots folio 4 as part of a batch; before the batch goes down, a newer write
    // into folio 4 lands in the cache. The batch writes the older snapshot; ending its writeback
    // must leave the newer bytes dirty, so the flush (which syncs every folio after its batch)
    // writes them after the snapshot, never before it, and never drops them.
    let lower = FaultyDisk::new(vec![0; 16 * K4 as usize]);
    let hook = OnceHook::new(HookPoint::AfterWritebackSnapshot, 4);
    let cache = FolioCache::with_hooks(
        lower.clone() as Arc<dyn BlockDev>,
        small_cfg(K4, 16, 16),
        hook.clone(),
    )
    .unwrap();
    for i in [0u64, 2, 4, 6, 8] {
        cache.write_at(&[0x11; 512], i * K4).unwrap();
    }
    let c = cache.clone();
    hook.arm(move || {
        let (tx, rx) = channel();
        std::thread::spawn(move || {
            c.write_at(&[0x22; 512], 4 * K4).unwrap();
            tx.send(()).unwrap();
        });
        rx.recv_timeout(Duration::from_secs(5))
            .expect("a write waited for a batched writeback of its folio");
    });
    lower.clear_events();
    cache.flush().unwrap();
    assert!(hook.fired());
    assert!(
        lower.batches().iter().any(|&n| n >= 2),
        "folio 4 was not written back in a batch: {:?}",
        lower.batches()
    );
    let folio4: Vec<u8> = lower
        .events()
        .into_iter()
        .filter_map(|e| match e {
            Event::Write { offset, data } if offset == 4 * K4 => Some(data[0]),
            _ => None,
        })
        .collect();
    assert_eq!(
        folio4,
        [0x11, 0x22],
        "folio 4 did not go down as its snapshot and then the newer write"
    );
    assert_eq!(
        lower.bytes(4 * K4, 512),
        vec![0x22; 512],
        "the newer write was lost"
    );
    assert_eq!(cache.stats().dirty_folios, 0);
    for i in [0u64, 2, 6, 8] {
        assert_eq!(lower.bytes(i * K4, 512), vec![0x11; 512], "folio {i}");
    }
}

#[test]
fn writers_throttled_by_the_dirty_budget_write_back_a_batch_and_lose_nothing() {
    // A dirty budget of 4 folios and no flusher: writers past the budget write back batches
    // themselves (more than one folio per batch), and every byte reaches the lower layer.
    let lower = FaultyDisk::new(vec![0; 64 * K4 as usize]);
    let cache = cache_over(&lower, small_cfg(K4, 64, 4));
    for i in (0..64u64).step_by(2) {
        cache.write_at(&pattern(3, i * K4, 1024), i * K4).unwrap();
    }
    assert!(cache.stats().throttled > 0, "no writer was throttled");
    assert!(
        lower.batches().iter().any(|&n| n >= 2),
        "throttled writers wrote back one folio at a time: {:?}",
        lower.batches()
    );
    cache.flush().unwrap();
    for i in (0..64u64).step_by(2) {
        assert_eq!(
            lower.bytes(i * K4, 1024),
            pattern(3, i * K4, 1024),
            "folio {i}"
        );
    }
}

#[test]
fn a_batch_takes_the_runs_that_fit_its_arena_and_the_flush_still_writes_every_byte() {
    // 40 runs of 1 MiB (256 folios of 4 KiB, each run one clustered writeback) with a clean
    // folio between them: 8 flush threads take chunks of 5 runs. A batch's arena holds 4 MiB of
    // snapshots: 4 whole runs fit exactly, the fifth of each chunk is written back alone.
    let run = 256u64;
    let folios = 40 * (run + 1);
    let lower = FaultyDisk::new(vec![0; (folios * K4) as usize]);
    let cache = cache_over(&lower, small_cfg(K4, folios, folios));
    for r in 0..40u64 {
        let off = r * (run + 1) * K4;
        let data = pattern(r as u8, off, (run * K4) as usize);
        // In folio-sized writes (a large one would bypass the cache).
        for (k, piece) in data.chunks(K4 as usize).enumerate() {
            cache.write_at(piece, off + k as u64 * K4).unwrap();
        }
    }
    cache.flush().unwrap();
    let batches = lower.batches();
    assert!(
        batches.iter().all(|&n| n <= 4) && batches.contains(&4),
        "batches did not fill their arena exactly: {batches:?}"
    );
    for r in 0..40u64 {
        let off = r * (run + 1) * K4;
        assert!(
            lower.bytes(off, (run * K4) as usize) == pattern(r as u8, off, (run * K4) as usize),
            "run {r} did not reach the lower layer"
        );
    }
    assert_eq!(cache.stats().dirty_folios, 0);
}

#[test]
fn a_woken_flusher_writes_back_batch_after_batch_until_a_quarter_of_the_budget_is_dirty() {
    // 300 separate dirty folios of a 512-folio budget: once woken, the flusher writes back
    // batch after batch (64 folios each) until at most a quarter of the budget (128) is dirty,
    // without further wake-ups and long before its periodic pass (an hour away).
    let lower = FaultyDisk::new(vec![0; 1024 * K4 as usize]);
    let cfg = CacheConfig {
        flusher_threads: 1,
        writeback_interval: Duration::from_secs(3600),
        ..small_cfg(K4, 1024, 512)
    };
    let cache = cache_over(&lower, cfg);
    // The flusher's first batch (woken after 16 folios) stalls at its first write until all
    // 300 are dirty: what it does next is its own loop, not more wake-ups.
    let (go, wait) = channel::<()>();
    lower.at(Io::WriteStart, 0, 512, move || {
        let _ = wait.recv_timeout(Duration::from_secs(5));
    });
    for i in 0..300u64 {
        cache.write_at(&[i as u8 | 1; 512], 2 * i * K4).unwrap();
    }
    assert!(
        cache.stats().dirty_folios >= 250,
        "the flusher did not stall"
    );
    go.send(()).unwrap();
    let start = std::time::Instant::now();
    while cache.stats().dirty_folios > 128 && start.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(5));
    }
    let st = cache.stats();
    assert!(
        st.dirty_folios <= 128,
        "the flusher stopped with {} folios dirty",
        st.dirty_folios
    );
    assert!(
        lower.batches().iter().filter(|&&n| n >= 2).count() >= 2,
        "{:?}",
        lower.batches()
    );
    cache.flush().unwrap();
    for i in 0..300u64 {
        assert_eq!(lower.bytes(2 * i * K4, 512), vec![i as u8 | 1; 512]);
    }
}

#[test]
fn a_throttled_writer_takes_a_whole_batch_of_64_kib_folios_in_one_arena() {
    // With 64 KiB folios, a batch of 64 single-folio groups needs 4 MiB of snapshot room plus a
    // cluster's: the arena holds all of them, so a writer over the dirty budget writes back 64
    // folios at once, not the 48 a 4 MiB arena would take.
    let folio = 64u64 << 10;
    let lower = FaultyDisk::new(vec![0; (512 * folio) as usize]);
    let cache = cache_over(&lower, small_cfg(folio, 512, 128));
    for i in 0..200u64 {
        cache.write_at(&[i as u8 | 1; 4096], 2 * i * folio).unwrap();
    }
    let batches = lower.batches();
    assert!(batches.contains(&64), "no batch of 64 folios: {batches:?}");
    cache.flush().unwrap();
    for i in 0..200u64 {
        assert_eq!(lower.bytes(2 * i * folio, 4096), vec![i as u8 | 1; 4096]);
    }
}

#[test]
fn a_throttled_write_goes_on_when_its_batch_wrote_something_and_fails_when_none_could_be() {
    // A dirty budget of 4 folios and no flusher. The fifth dirty folio makes its writer write
    // back a batch: one folio of it fails, the others are written, and the write goes on. Once
    // every writeback fails, a throttled write can make no room and reports the error (it
    // neither hangs nor loses the older dirty data); after the disk heals everything lands.
    let lower = FaultyDisk::new(vec![0; 64 * K4 as usize]);
    let cache = cache_over(&lower, small_cfg(K4, 64, 4));
    for i in [0u64, 2, 4, 6] {
        cache.write_at(&[0x10 | i as u8; 512], i * K4).unwrap();
    }
    lower.fail_writes(0, 512);
    cache
        .write_at(&[0x18; 512], 8 * K4)
        .expect("a batch that wrote three of four folios made room");
    assert_eq!(lower.bytes(2 * K4, 512), vec![0x12; 512]);
    for i in [10u64, 12] {
        cache.write_at(&[0x10 | i as u8; 512], i * K4).unwrap();
    }
    lower.fail_writes(0, 64 * K4);
    let (tx, rx) = channel();
    let c = cache.clone();
    std::thread::spawn(move || {
        let _ = tx.send(c.write_at(&[0x1e; 512], 14 * K4));
    });
    let r = rx
        .recv_timeout(Duration::from_secs(5))
        .expect("a throttled write hung while every writeback failed");
    assert!(
        r.is_err(),
        "a write over the budget succeeded with no room made"
    );
    lower.heal();
    cache.write_at(&[0x1e; 512], 14 * K4).unwrap();
    cache.flush().unwrap();
    for i in [0u64, 2, 4, 6, 8, 10, 12, 14] {
        assert_eq!(
            lower.bytes(i * K4, 512),
            vec![0x10 | i as u8; 512],
            "folio {i}"
        );
    }
}

#[test]
fn a_throttled_writer_passes_over_folios_in_flight_and_writes_back_others_at_once() {
    // A dirty budget of 128 folios, no flusher. Writer A's batch (folios 0..63, the first 64
    // after the writeback cursor) stalls at its lower write. Once the cursor has moved past
    // every other dirty folio and wraps around to A's, the next throttled writer must pass
    // over A's folios and write back the others on its first attempt, not take a batch of
    // folios in flight, write nothing and wait.
    let lower = FaultyDisk::new(vec![0; 1024 * K4 as usize]);
    let cache = cache_over(&lower, small_cfg(K4, 1024, 128));
    let dirty = |i: u64| cache.write_at(&[i as u8 | 1; 512], i * K4).unwrap();
    for i in (0..64).chain(100..164) {
        dirty(i);
    }
    assert_eq!(cache.stats().dirty_folios, 128, "the budget is not spent");
    let (release, held) = channel::<()>();
    let (entered, at_disk) = channel::<()>();
    lower.at(Io::WriteStart, 0, 512, move || {
        entered.send(()).unwrap();
        let _ = held.recv_timeout(Duration::from_secs(20));
    });
    let a = {
        let c = cache.clone();
        std::thread::spawn(move || c.write_at(&[0x5a; 512], 500 * K4).unwrap())
    };
    at_disk
        .recv_timeout(Duration::from_secs(5))
        .expect("writer A did not write back");
    // B, throttled too, writes back 100..163 (the cursor is past A's batch) and goes on.
    dirty(70);
    // Dirty again what B wrote back: 0..63 are in flight, 70 and 100..162 are not, and the
    // cursor (past 163) wraps around to A's folios first.
    for i in 100..163 {
        dirty(i);
    }
    assert_eq!(cache.stats().dirty_folios, 128);
    let before = cache.stats().throttled;
    dirty(71);
    assert_eq!(
        cache.stats().throttled - before,
        1,
        "the writer took a batch of folios in flight and had to try again"
    );
    assert_eq!(
        lower.batches().last(),
        Some(&64),
        "the writer's batch was not 70 and 100..162, all folios dirty and not in flight"
    );
    release.send(()).unwrap();
    a.join().unwrap();
    cache.flush().unwrap();
    assert_eq!(cache.stats().dirty_folios, 0);
    for i in (0..64).chain([70, 71]).chain(100..164) {
        assert_eq!(
            lower.bytes(i * K4, 512),
            vec![i as u8 | 1; 512],
            "folio {i}"
        );
    }
    assert_eq!(lower.bytes(500 * K4, 512), vec![0x5a; 512]);
}

#[test]
fn write_back_writes_every_dirty_folio_down_without_a_flush_and_fails_after_a_failed_flush() {
    // What the crash journal's background trim asks of the cache: every completed write handed
    // to the lower layer (which, for a raw file, is the kernel), no fdatasync.
    let lower = FaultyDisk::new(vec![0; 64 * K4 as usize]);
    let cache = cache_over(&lower, small_cfg(K4, 64, 64));
    for i in (0..64u64).step_by(4) {
        cache
            .write_at(&pattern(i as u8, i * K4, 512), i * K4)
            .unwrap();
    }
    lower.clear_events();
    cache.write_back().unwrap();
    let events = lower.events();
    assert!(
        !events.iter().any(|e| matches!(e, Event::Flush)),
        "the write-back flushed the lower layer"
    );
    assert!(
        matches!(events.last(), Some(Event::WriteBack)),
        "the lower layer was not written back after the data: {:?}",
        events.last()
    );
    for i in (0..64u64).step_by(4) {
        assert_eq!(
            lower.bytes(i * K4, 512),
            pattern(i as u8, i * K4, 512),
            "folio {i}"
        );
    }
    assert_eq!(cache.stats().dirty_folios, 0);
    // After a failed flush below, what that flush lost is not with the kernel any more: a
    // write-back fails as every later flush does.
    cache.write_at(&[7; 512], 0).unwrap();
    lower.fail_flushes(true);
    cache
        .flush()
        .expect_err("the failed flush below was not reported");
    lower.fail_flushes(false);
    cache
        .write_back()
        .expect_err("a write-back after a failed flush below succeeded");
}

#[test]
fn only_writebacks_a_flush_syncs_right_after_are_handed_down_to_sync() {
    // `BlockDev::write_batch_to_sync` lets the layer below send writes past a page cache of
    // its own (a qcow2 image's O_DIRECT route): right for a flush's writeback, which the
    // lower flush makes durable at once, and for a write-through write; wrong for a throttled
    // writer's or a write-back's (the crash journal's trims), which nothing syncs.
    let lower = FaultyDisk::new(vec![0; 64 * K4 as usize]);
    let cache = cache_over(&lower, small_cfg(K4, 64, 4));
    // Every other folio, so that no two writebacks merge: past the dirty limit of 4 folios
    // the writers write back on their own.
    for i in (0..24u64).step_by(2) {
        cache.write_at(&pattern(1, i * K4, 512), i * K4).unwrap();
    }
    assert!(
        !lower.writes().is_empty(),
        "no writer was throttled: nothing to check"
    );
    cache.write_back().unwrap();
    assert_eq!(
        lower.batches_to_sync(),
        Vec::<usize>::new(),
        "a throttled writer's or a write-back's writeback was handed down to sync"
    );
    for i in (0..6u64).step_by(2) {
        cache.write_at(&pattern(2, i * K4, 512), i * K4).unwrap();
    }
    cache.flush().unwrap();
    assert_eq!(
        lower.batches_to_sync().iter().sum::<usize>(),
        3,
        "the flush's writeback was not handed down to sync: {:?}",
        lower.batches_to_sync()
    );
    cache.set_writeback(false).unwrap();
    let before = lower.batches_to_sync().iter().sum::<usize>();
    cache.write_at(&pattern(3, 40 * K4, 512), 40 * K4).unwrap();
    assert_eq!(
        lower.batches_to_sync().iter().sum::<usize>(),
        before + 1,
        "a write-through write's writeback was not handed down to sync"
    );
    for i in (0..24u64).step_by(2) {
        let want = if i < 6 { 2 } else { 1 };
        assert_eq!(lower.bytes(i * K4, 512), pattern(want, i * K4, 512));
    }
    assert_eq!(lower.bytes(40 * K4, 512), pattern(3, 40 * K4, 512));
}

#[test]
fn a_write_back_writes_what_was_dirtied_during_its_batch_at_its_own_offset() {
    // A write-back (the crash journal's trims) ends, like a flush, with a per-folio pass
    // (`sync_folio`) over what its batch left dirty: here a write that dirtied the folio again
    // while the batch's write of it was below, in the middle of the folio (a surviving mutant
    // wrote that pass's runs at the folio's start minus their offset).
    let lower = FaultyDisk::new(vec![0; 16 * K4 as usize]);
    let cache = cache_over(&lower, small_cfg(K4, 16, 8));
    let at = 2 * K4;
    cache.write_at(&pattern(1, at, 512), at).unwrap();
    let c = cache.clone();
    lower.after_write(at, 512, move || {
        c.write_at(&pattern(2, at + 1024, 512), at + 1024).unwrap();
    });
    cache.write_back().unwrap();
    assert_eq!(lower.bytes(at, 512), pattern(1, at, 512));
    assert_eq!(
        lower.bytes(at + 1024, 512),
        pattern(2, at + 1024, 512),
        "the bytes dirtied during the batch did not reach their place below"
    );
    assert_eq!(lower.bytes(at - 1024, 512), vec![0; 512]);
    assert_eq!(cache.stats().dirty_folios, 0);
}
