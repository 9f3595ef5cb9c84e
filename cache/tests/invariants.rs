//! Deterministic tests of the cache's invariants, one or more per invariant, including the
//! kernel write-path corruption classes from the seed reports (bcachefs lockless buffered
//! writes, the 2015 short-copy zeroing, btrfs partial DIO holes, iomap stale mappings). Racy
//! interleavings are forced with `CacheHooks` rather than left to timing.

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Barrier, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use blockdev::{BlockDev, BlockError, MemDisk};
use cache::{CacheConfig, CacheHooks, FolioCache, HookPoint};
use common::{cache_over, pattern, read, small_cfg, Event, FaultyDisk, OnceHook};

const K4: u64 = 4096;

fn hooked_cache(lower: &Arc<FaultyDisk>, cfg: CacheConfig, hook: Arc<OnceHook>) -> Arc<FolioCache> {
    FolioCache::with_hooks(lower.clone() as Arc<dyn BlockDev>, cfg, hook).unwrap()
}

/// Waits (at most a second) for `cond`; a broken implementation may never satisfy it, and the
/// test's final checks then report what went wrong.
fn wait_until(cond: impl Fn() -> bool) {
    let start = Instant::now();
    while !cond() && start.elapsed() < Duration::from_secs(1) {
        thread::sleep(Duration::from_millis(1));
    }
}

// ---- 1. read-your-writes ----

#[test]
fn read_returns_every_write_completed_before_it_from_any_thread() {
    let lower = FaultyDisk::new(pattern(1, 0, 256 << 10));
    let cfg = CacheConfig {
        flusher_threads: 1,
        writeback_interval: Duration::from_millis(20),
        ..small_cfg(K4, 6, 3)
    };
    let cache = cache_over(&lower, cfg);
    let (tx, rx) = mpsc::channel::<(u64, Vec<u8>)>();
    let (ack_tx, ack_rx) = mpsc::channel::<()>();
    let writer = {
        let cache = cache.clone();
        thread::spawn(move || {
            for i in 0..400u64 {
                // Unaligned, sometimes crossing folios, spread over 16x more than the cache.
                let off = (i * 12_347) % ((256 << 10) - 9000);
                let data = pattern((i % 200) as u8 + 2, off, 1 + (i as usize * 977) % 9000);
                cache.write_at(&data, off).unwrap();
                tx.send((off, data)).unwrap();
                ack_rx.recv().unwrap();
            }
        })
    };
    for (off, data) in rx {
        assert_eq!(
            read(&*cache, off, data.len()),
            data,
            "read at {off:#x} missed a completed write"
        );
        ack_tx.send(()).unwrap();
    }
    writer.join().unwrap();
}

// ---- 2. no lost writes (bcachefs) ----

#[test]
fn concurrent_writers_to_the_same_folios_lose_nothing_under_eviction_and_writeback() {
    const THREADS: u64 = 4;
    const SIZE: u64 = 64 << 10;
    let lower = FaultyDisk::new(vec![0; SIZE as usize]);
    let cfg = CacheConfig {
        flusher_threads: 1,
        writeback_interval: Duration::from_millis(5),
        ..small_cfg(K4, 4, 2)
    };
    let cache = cache_over(&lower, cfg);
    let barrier = Arc::new(Barrier::new(THREADS as usize));
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let cache = cache.clone();
            let barrier = barrier.clone();
            thread::spawn(move || {
                barrier.wait();
                // Thread t owns every 512-byte sector s with s % THREADS == t, so all threads
                // write into every folio at once; each pass rewrites its sectors, half of them
                // in two unaligned pieces.
                for pass in 0..40u8 {
                    for k in 0..SIZE / 512 / THREADS {
                        let s = k * THREADS + t;
                        let off = s * 512;
                        let data = pattern(pass.wrapping_mul(4) + t as u8, off, 512);
                        if (k + u64::from(pass)) % 2 == 0 {
                            cache.write_at(&data, off).unwrap();
                        } else {
                            cache.write_at(&data[..200], off).unwrap();
                            cache.write_at(&data[200..], off + 200).unwrap();
                        }
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    cache.flush().unwrap();
    let mut expected = vec![0u8; SIZE as usize];
    for s in 0..SIZE / 512 {
        let t = s % THREADS;
        let off = s * 512;
        expected[off as usize..off as usize + 512].copy_from_slice(&pattern(
            39u8 * 4 + t as u8,
            off,
            512,
        ));
    }
    assert_eq!(
        lower.bytes(0, SIZE as usize),
        expected,
        "the lower layer lost a completed write"
    );
    assert_eq!(read(&*cache, 0, SIZE as usize), expected);
    let stats = cache.stats();
    assert!(
        stats.evictions > 0 && stats.writebacks > 0,
        "test did not exercise eviction: {stats:?}"
    );
}

#[test]
fn dirty_folios_are_never_evicted_when_the_cache_is_full() {
    let lower = FaultyDisk::new(vec![0; 40 * K4 as usize]);
    let cache = cache_over(&lower, small_cfg(K4, 2, 1));
    for i in 0..40u64 {
        cache
            .write_at(&pattern(i as u8, i * K4, K4 as usize), i * K4)
            .unwrap();
        let s = cache.stats();
        assert!(
            s.cached_folios <= 2 && s.dirty_folios <= 1,
            "memory bound exceeded: {s:?}"
        );
    }
    for i in 0..40u64 {
        assert_eq!(
            read(&*cache, i * K4, K4 as usize),
            pattern(i as u8, i * K4, K4 as usize)
        );
    }
    cache.flush().unwrap();
    for i in 0..40u64 {
        assert_eq!(
            lower.bytes(i * K4, K4 as usize),
            pattern(i as u8, i * K4, K4 as usize)
        );
    }
}

#[test]
fn eviction_only_drops_data_the_lower_layer_already_has() {
    let lower = FaultyDisk::new(vec![0; 16 * K4 as usize]);
    let hook = OnceHook::new(HookPoint::AfterEvict, 0);
    let cache = hooked_cache(&lower, small_cfg(K4, 2, 2), hook.clone());
    cache.write_at(&pattern(9, 100, 3000), 100).unwrap();
    let (c, l) = (cache.clone(), lower.clone());
    hook.arm(move || {
        // Folio 0 was just evicted: the lower layer must already hold the write.
        assert_eq!(l.bytes(100, 3000), pattern(9, 100, 3000));
        assert_eq!(read(&*c, 100, 3000), pattern(9, 100, 3000));
    });
    // Fill the cache with other folios until folio 0 is evicted.
    for i in 1..16u64 {
        let _ = read(&*cache, i * K4, 512);
        cache.write_at(&[1; 512], i * K4).unwrap();
    }
    assert!(hook.fired(), "folio 0 was never evicted");
}

// ---- 3. never zero what was there (2015 short copy, btrfs partial DIO) ----

#[test]
fn partial_write_into_uncached_folio_keeps_lower_bytes() {
    let old = pattern(1, 0, 64 << 10);
    let lower = FaultyDisk::new(old.clone());
    let cache = cache_over(&lower, small_cfg(64 << 10, 4, 2));
    cache.write_at(&[0xee; 100], 1000).unwrap();
    cache.write_at(&[0xdd; 3], 70_000 - 65_536).unwrap();
    cache.flush().unwrap();
    let mut expected = old;
    expected[1000..1100].fill(0xee);
    expected[4464..4467].fill(0xdd);
    assert_eq!(lower.bytes(0, 64 << 10), expected);
    assert_eq!(read(&*cache, 0, 64 << 10), expected);
}

#[test]
fn failed_fill_for_partial_write_changes_nothing_and_reports_the_error() {
    let old = pattern(1, 0, 32 << 10);
    let lower = FaultyDisk::new(old.clone());
    let cache = cache_over(&lower, small_cfg(K4, 4, 2));
    // The write's head sector is not cached and cannot be read: the write must fail as a whole
    // instead of dirtying a half-known sector (which would write zeros or garbage around it).
    lower.fail_reads(1024, 512);
    let err = cache.write_at(&[0xee; 700], 1100).unwrap_err();
    assert!(matches!(err, BlockError::Io(_)), "{err:?}");
    // A read touching the bad sector reports the error and does not install anything.
    assert!(cache.read_at(&mut [0u8; 4096], 0).is_err());
    lower.heal();
    assert_eq!(
        read(&*cache, 0, 32 << 10),
        old,
        "a failed request left zeros or garbage"
    );
    cache.flush().unwrap();
    assert_eq!(lower.bytes(0, 32 << 10), old);
}

#[test]
fn failed_fill_of_tail_sector_after_head_changed_nothing_in_that_folio() {
    let old = pattern(3, 0, 16 << 10);
    let lower = FaultyDisk::new(old.clone());
    let cache = cache_over(&lower, small_cfg(K4, 4, 2));
    lower.fail_reads(3584, 512);
    // Write covering sector 0 partly (fillable) and sector 7 partly (unreadable).
    assert!(cache.write_at(&[0xab; 3400], 300).is_err());
    lower.heal();
    assert_eq!(read(&*cache, 0, 16 << 10), old);
}

#[test]
fn failed_writeback_keeps_data_dirty_and_flush_reports_it_until_a_retry_succeeds() {
    let lower = FaultyDisk::new(pattern(1, 0, 64 << 10));
    let cache = cache_over(&lower, small_cfg(K4, 8, 4));
    let new = pattern(7, 8192, 3 * K4 as usize);
    cache.write_at(&new, 8192).unwrap();
    lower.fail_writes(8192 + 4096, 512);
    assert!(
        cache.flush().is_err(),
        "flush reported success over unwritten data"
    );
    assert!(
        cache.flush().is_err(),
        "a second flush must retry and fail again"
    );
    assert_eq!(
        read(&*cache, 8192, new.len()),
        new,
        "failed writeback lost or zeroed data"
    );
    assert!(cache.stats().writeback_errors >= 2);
    lower.heal();
    cache.flush().unwrap();
    assert_eq!(lower.bytes(8192, new.len()), new);
    assert_eq!(cache.stats().dirty_folios, 0);
}

#[test]
fn failed_write_through_write_reports_error_and_never_leaves_zeros() {
    let old = pattern(2, 0, 32 << 10);
    let lower = FaultyDisk::new(old.clone());
    let cache = cache_over(&lower, small_cfg(K4, 8, 4));
    cache.set_writeback(false).unwrap();
    lower.fail_writes(4096, 4096);
    let new = pattern(5, 2048, 6000);
    assert!(cache.write_at(&new, 2048).is_err());
    let got = read(&*cache, 0, 32 << 10);
    for (i, (&g, &o)) in got.iter().zip(&old).enumerate() {
        let in_write = (2048..8048).contains(&i);
        assert!(
            g == o || (in_write && g == new[i - 2048]),
            "byte {i} is {g}, neither old nor new"
        );
    }
    lower.heal();
    cache.flush().unwrap();
    assert_eq!(
        lower.bytes(0, 32 << 10),
        got,
        "lower and cache disagree after the retry"
    );
}

// ---- 4. no stale mappings (iomap) ----

#[test]
fn fill_racing_write_zeroes_and_new_write_never_installs_stale_data() {
    let lower = FaultyDisk::new(pattern(1, 0, 64 << 10));
    let hook = OnceHook::new(HookPoint::AfterFillRead, 1);
    let cache = hooked_cache(&lower, small_cfg(K4, 8, 4), hook.clone());
    let c = cache.clone();
    hook.arm(move || {
        // The fill has read the old bytes of folio 1; now the mapping changes under it.
        c.write_zeroes(K4, K4, false).unwrap();
        c.write_at(&[0x77; 512], K4 + 1024).unwrap();
    });
    let _ = read(&*cache, K4, K4 as usize);
    assert!(hook.fired());
    let mut expected = vec![0u8; K4 as usize];
    expected[1024..1536].fill(0x77);
    assert_eq!(
        read(&*cache, K4, K4 as usize),
        expected,
        "a stale fill was installed over zeros"
    );
    cache.flush().unwrap();
    assert_eq!(lower.bytes(K4, K4 as usize), expected);
}

#[test]
fn fill_for_partial_write_racing_discard_never_resurrects_old_bytes() {
    let lower = FaultyDisk::new(pattern(1, 0, 64 << 10));
    let hook = OnceHook::new(HookPoint::AfterFillRead, 2);
    let cache = hooked_cache(&lower, small_cfg(K4, 8, 4), hook.clone());
    let c = cache.clone();
    hook.arm(move || c.discard(2 * K4, K4).unwrap());
    // Partial write into sector 0 of folio 2: its fill races the discard.
    cache.write_at(&[0x55; 100], 2 * K4 + 10).unwrap();
    assert!(hook.fired());
    let mut expected = vec![0u8; K4 as usize];
    expected[10..110].fill(0x55);
    assert_eq!(read(&*cache, 2 * K4, K4 as usize), expected);
    cache.flush().unwrap();
    assert_eq!(lower.bytes(2 * K4, K4 as usize), expected);
}

#[test]
fn writeback_racing_discard_never_writes_stale_data_over_zeros() {
    let lower = FaultyDisk::new(pattern(1, 0, 64 << 10));
    let hook = OnceHook::new(HookPoint::AfterWritebackSnapshot, 0);
    let cache = hooked_cache(&lower, small_cfg(K4, 8, 4), hook.clone());
    cache.write_at(&[0xaa; 4096], 0).unwrap();
    let (c, zapper) = (cache.clone(), Arc::new(Mutex::new(None)));
    let z = zapper.clone();
    hook.arm(move || {
        // The old data is snapshotted for writeback; a discard and a newer write arrive now.
        let c2 = c.clone();
        *z.lock().unwrap() = Some(thread::spawn(move || {
            c2.discard(0, K4).unwrap();
            c2.write_at(&[0xbb; 512], 512).unwrap();
        }));
        wait_until(|| c.stats().active_zaps == 1);
        // Give a broken implementation time to zero the lower layer before the stale write.
        thread::sleep(Duration::from_millis(30));
    });
    cache.flush().unwrap();
    zapper.lock().unwrap().take().unwrap().join().unwrap();
    cache.flush().unwrap();
    let mut expected = vec![0u8; K4 as usize];
    expected[512..1024].fill(0xbb);
    assert_eq!(read(&*cache, 0, K4 as usize), expected);
    assert_eq!(
        lower.bytes(0, K4 as usize),
        expected,
        "stale writeback landed over the discard"
    );
}

#[test]
fn discard_drops_cached_dirty_data_and_partial_sectors_keep_neighbours() {
    let old = pattern(1, 0, 64 << 10);
    let lower = FaultyDisk::new(old.clone());
    let cache = cache_over(&lower, small_cfg(K4, 8, 4));
    cache.write_at(&pattern(4, 0, 20_000), 0).unwrap();
    cache.discard(1000, 9000).unwrap();
    cache.write_zeroes(15_000, 300, false).unwrap();
    let mut expected = old.clone();
    expected[..20_000].copy_from_slice(&pattern(4, 0, 20_000));
    expected[1000..10_000].fill(0);
    expected[15_000..15_300].fill(0);
    assert_eq!(read(&*cache, 0, 64 << 10), expected);
    cache.flush().unwrap();
    assert_eq!(lower.bytes(0, 64 << 10), expected);
    cache.drop_clean();
    assert_eq!(read(&*cache, 0, 64 << 10), expected);
}

#[test]
fn failed_discard_keeps_dirty_data_and_forgets_clean_copies() {
    let lower = FaultyDisk::new(pattern(1, 0, 64 << 10));
    let cache = cache_over(&lower, small_cfg(K4, 8, 4));
    let _ = read(&*cache, 0, 8192);
    cache.write_at(&[0x33; 512], 4096).unwrap();
    lower.fail_writes(0, 8192);
    assert!(cache.discard(0, 8192).is_err());
    // The failed zap may have changed the lower layer anywhere in the range (here: nothing);
    // the cache must read what is there now for clean bytes and keep the dirty ones.
    let got = read(&*cache, 0, 8192);
    assert_eq!(&got[..4096], &lower.bytes(0, 4096)[..]);
    assert_eq!(&got[4096..4608], &[0x33; 512]);
    lower.heal();
    cache.flush().unwrap();
    assert_eq!(&lower.bytes(4096, 512)[..], &[0x33; 512]);
}

// ---- 5. ordering and honest flush ----

#[test]
fn writes_to_the_same_byte_reach_the_lower_layer_in_completion_order() {
    let lower = FaultyDisk::new(vec![0; 64 << 10]);
    let hook = OnceHook::new(HookPoint::AfterWritebackSnapshot, 0);
    let cache = hooked_cache(&lower, small_cfg(K4, 8, 4), hook.clone());
    cache.write_at(&[1; 512], 0).unwrap();
    let c = cache.clone();
    // A newer write to the same bytes completes while the older one is being written back.
    hook.arm(move || c.write_at(&[2; 512], 0).unwrap());
    cache.flush().unwrap();
    assert!(hook.fired());
    // The newer write completed during that flush, so it is only guaranteed by the next one.
    cache.flush().unwrap();
    let writes: Vec<u8> = lower
        .events()
        .iter()
        .filter_map(|e| match e {
            Event::Write { offset: 0, data } => Some(data[0]),
            _ => None,
        })
        .collect();
    assert_eq!(writes, vec![1, 2], "lower saw the writes out of order");
    assert_eq!(lower.bytes(0, 512), vec![2; 512]);
}

#[test]
fn flush_returns_after_in_flight_writeback_and_lower_flush() {
    let lower = FaultyDisk::new(vec![0; 64 << 10]);
    let hook = OnceHook::new(HookPoint::AfterWritebackSnapshot, 0);
    let cache = hooked_cache(&lower, small_cfg(K4, 8, 8), hook.clone());
    for i in 0..6u64 {
        cache
            .write_at(&pattern(i as u8, i * K4, K4 as usize), i * K4)
            .unwrap();
    }
    let flushed = Arc::new(AtomicBool::new(false));
    let (c, f, l) = (cache.clone(), flushed.clone(), lower.clone());
    let flusher = Arc::new(Mutex::new(None));
    let fl = flusher.clone();
    hook.arm(move || {
        // Folios 0..6 are mid-writeback on this thread; a flush from another thread must wait for it.
        let (c2, f2) = (c.clone(), f.clone());
        *fl.lock().unwrap() = Some(thread::spawn(move || {
            c2.flush().unwrap();
            f2.store(true, Ordering::SeqCst);
        }));
        thread::sleep(Duration::from_millis(50));
        assert!(
            !f.load(Ordering::SeqCst),
            "flush returned while a writeback was in flight"
        );
        assert_eq!(l.flushes.load(Ordering::SeqCst), 0);
    });
    cache.flush().unwrap();
    flusher.lock().unwrap().take().unwrap().join().unwrap();
    assert!(flushed.load(Ordering::SeqCst));
    // Every data write precedes the first lower flush.
    let events = lower.events();
    let first_flush = events.iter().position(|e| *e == Event::Flush).unwrap();
    let bytes_before: usize = events[..first_flush]
        .iter()
        .map(|e| match e {
            Event::Write { data, .. } => data.len(),
            _ => 0,
        })
        .sum();
    assert_eq!(bytes_before, 6 * K4 as usize, "{events:?}");
    for i in 0..6u64 {
        assert_eq!(
            lower.bytes(i * K4, K4 as usize),
            pattern(i as u8, i * K4, K4 as usize)
        );
    }
}

#[test]
fn failed_lower_flush_fails_every_later_flush() {
    let lower = FaultyDisk::new(vec![0; 64 << 10]);
    let cache = cache_over(&lower, small_cfg(K4, 8, 4));
    cache.write_at(&[1; 4096], 0).unwrap();
    lower.fail_flushes(true);
    assert!(cache.flush().is_err());
    lower.heal();
    // The lower layer may have dropped the data the cache now thinks is clean.
    assert!(
        cache.flush().is_err(),
        "flush reported success after a lost lower flush"
    );
}

// ---- 6. write-through ----

#[test]
fn write_through_write_is_durable_before_it_completes() {
    let lower = FaultyDisk::new(vec![0; 64 << 10]);
    let cache = cache_over(&lower, small_cfg(K4, 4, 2));
    cache.write_at(&[9; 4096], 0).unwrap();
    assert_eq!(lower.bytes(0, 4096), vec![0; 4096]);
    // Turning write-back off first flushes what is dirty.
    cache.set_writeback(false).unwrap();
    assert_eq!(lower.bytes(0, 4096), vec![9; 4096]);
    assert!(lower.flushes.load(Ordering::SeqCst) >= 1);
    for i in 0..20u64 {
        let off = (i * 5000) % (60 << 10);
        let data = pattern(i as u8, off, 3000);
        lower.clear_events();
        cache.write_at(&data, off).unwrap();
        assert_eq!(
            lower.bytes(off, 3000),
            data,
            "write {i} not in the lower layer"
        );
        let events = lower.events();
        assert_eq!(
            events.last(),
            Some(&Event::Flush),
            "write {i} not followed by a flush: {events:?}"
        );
        assert!(events.iter().any(|e| matches!(e, Event::Write { .. })));
    }
    lower.clear_events();
    cache.write_zeroes(0, 8192, false).unwrap();
    assert_eq!(lower.events().last(), Some(&Event::Flush));
    cache.set_writeback(true).unwrap();
    cache.write_at(&[3; 512], 0).unwrap();
    assert_eq!(
        lower.bytes(0, 512),
        vec![0; 512],
        "write-back mode wrote through"
    );
}

// ---- misc ----

#[test]
fn shutdown_and_drop_flush_dirty_data() {
    let lower = FaultyDisk::new(vec![0; 64 << 10]);
    let cfg = CacheConfig {
        flusher_threads: 2,
        ..small_cfg(K4, 8, 8)
    };
    let cache = cache_over(&lower, cfg);
    cache.write_at(&[4; 10_000], 5).unwrap();
    drop(cache);
    assert_eq!(lower.bytes(5, 10_000), vec![4; 10_000]);
    assert_eq!(lower.events().last(), Some(&Event::Flush));
}

#[test]
fn requests_past_the_end_or_to_read_only_lower_are_refused() {
    let lower = FaultyDisk::new(vec![0; 10_000]);
    let cache = cache_over(&lower, small_cfg(K4, 4, 2));
    assert!(matches!(
        cache.read_at(&mut [0; 2], 9999),
        Err(BlockError::OutOfRange { .. })
    ));
    assert!(matches!(
        cache.write_at(&[0; 2], u64::MAX),
        Err(BlockError::OutOfRange { .. })
    ));
    assert!(matches!(
        cache.discard(u64::MAX - 1, 5),
        Err(BlockError::OutOfRange { .. })
    ));
    // The short last folio and the partial last sector work.
    cache.write_at(&[8; 100], 9900).unwrap();
    assert_eq!(read(&*cache, 9900, 100), vec![8; 100]);
    cache.flush().unwrap();
    assert_eq!(lower.bytes(9900, 100), vec![8; 100]);

    let tmp = tempfile::NamedTempFile::new().unwrap();
    tmp.as_file().set_len(8192).unwrap();
    let ro = Arc::new(blockdev::RawFile::open(tmp.path(), true).unwrap());
    let cache = FolioCache::new(ro, small_cfg(K4, 4, 2)).unwrap();
    assert!(cache.is_read_only());
    assert!(matches!(cache.write_at(&[1], 0), Err(BlockError::ReadOnly)));
    assert!(matches!(
        cache.write_zeroes(0, 1, false),
        Err(BlockError::ReadOnly)
    ));
    assert_eq!(read(&*cache, 0, 8192), vec![0; 8192]);
}

#[test]
fn hot_reads_are_served_from_the_cache() {
    let lower = FaultyDisk::new(pattern(1, 0, 256 << 10));
    let cache = cache_over(&lower, small_cfg(64 << 10, 8, 4));
    for i in 0..4 {
        let _ = read(&*cache, i * (64 << 10), 64 << 10);
    }
    let before = lower.reads.load(Ordering::Relaxed);
    for i in 0..100u64 {
        assert_eq!(read(&*cache, i * 1000, 4096), pattern(1, i * 1000, 4096));
    }
    assert_eq!(
        lower.reads.load(Ordering::Relaxed),
        before,
        "cached reads went to the lower layer"
    );
    // Whole-folio writes into uncached folios never read from below.
    let lower = FaultyDisk::new(vec![0; 1 << 20]);
    let cache = cache_over(&lower, small_cfg(64 << 10, 8, 4));
    cache.write_at(&vec![5; 512 << 10], 0).unwrap();
    assert_eq!(lower.reads.load(Ordering::Relaxed), 0);
}

#[test]
fn many_threads_with_fewer_folios_than_threads_make_progress() {
    let lower = Arc::new(MemDisk::new(1 << 20));
    let cfg = CacheConfig {
        flusher_threads: 1,
        ..small_cfg(K4, 2, 1)
    };
    let cache = FolioCache::new(lower.clone(), cfg).unwrap();
    let done = Arc::new(AtomicUsize::new(0));
    let handles: Vec<_> = (0..6u64)
        .map(|t| {
            let (cache, done) = (cache.clone(), done.clone());
            thread::spawn(move || {
                for i in 0..200u64 {
                    let off = (((t * 131 + i * 17) % 40) * 6 + t) * K4 + 500;
                    cache.write_at(&pattern(t as u8, off, 3000), off).unwrap();
                    assert_eq!(read(&*cache, off, 3000), pattern(t as u8, off, 3000));
                }
                done.fetch_add(1, Ordering::SeqCst);
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    assert_eq!(done.load(Ordering::SeqCst), 6);
}

// ---- large-request bypass ----

fn bypass_cfg() -> CacheConfig {
    CacheConfig {
        bypass_threshold: 4 * K4,
        read_bypass_threshold: 0,
        ..small_cfg(K4, 8, 4)
    }
}

#[test]
fn large_read_bypass_returns_dirty_cached_bytes() {
    let old = pattern(1, 0, 64 << 10);
    let lower = FaultyDisk::new(old.clone());
    let cache = cache_over(&lower, bypass_cfg());
    cache.write_at(&[0x11; 700], 5000).unwrap();
    let mut expected = old;
    expected[5000..5700].fill(0x11);
    assert_eq!(read(&*cache, 0, 64 << 10), expected);
    assert!(cache.stats().bypassed >= 1);
}

#[test]
fn large_write_bypass_replaces_cached_and_dirty_copies() {
    let lower = FaultyDisk::new(pattern(1, 0, 64 << 10));
    let cache = cache_over(&lower, bypass_cfg());
    let _ = read(&*cache, 2 * K4, 100);
    cache.write_at(&[0x22; 512], 3 * K4).unwrap();
    let new = pattern(9, 1000, 30_000);
    cache.write_at(&new, 1000).unwrap();
    assert_eq!(read(&*cache, 1000, 30_000), new);
    assert_eq!(
        read(&*cache, 2 * K4, 100),
        new[2 * K4 as usize - 1000..][..100].to_vec()
    );
    cache.flush().unwrap();
    assert_eq!(
        lower.bytes(1000, 30_000),
        new,
        "an older dirty copy was written over the bypass"
    );
}

#[test]
fn only_a_large_write_that_bypasses_the_cache_goes_down_uncached() {
    // The lower layer may send an uncached write past a page cache of its own (a qcow2
    // image's rewrites in place): only the guest's large writes are such; the cache's own
    // writebacks, whatever their size, are not.
    let lower = FaultyDisk::new(vec![0; 64 << 10]);
    let cache = cache_over(&lower, bypass_cfg());
    // Four sequential folios (as large as the bypass threshold) written back in one run.
    for i in 0..4 {
        cache.write_at(&[0x33; 4096], i * K4).unwrap();
    }
    cache.flush().unwrap();
    assert!(
        lower.uncached_writes().is_empty(),
        "a writeback went down uncached"
    );
    assert_eq!(lower.bytes(0, 4 * K4 as usize), vec![0x33; 4 * K4 as usize]);
    // A large write with a partial head and tail: only its whole folios bypass.
    let new = pattern(4, 6 * K4 + 100, 5 * K4 as usize);
    cache.write_at(&new, 6 * K4 + 100).unwrap();
    assert_eq!(lower.uncached_writes(), vec![(7 * K4, 4 * K4 as usize)]);
    cache.flush().unwrap();
    assert_eq!(lower.bytes(6 * K4 + 100, new.len()), new);
    assert_eq!(lower.uncached_writes().len(), 1);
}

#[test]
fn writeback_racing_large_write_bypass_never_lands_after_it() {
    let lower = FaultyDisk::new(vec![0; 64 << 10]);
    let hook = OnceHook::new(HookPoint::AfterWritebackSnapshot, 1);
    let cache = hooked_cache(&lower, bypass_cfg(), hook.clone());
    cache.write_at(&[0xaa; 4096], K4).unwrap();
    let (c, writer) = (cache.clone(), Arc::new(Mutex::new(None)));
    let w = writer.clone();
    hook.arm(move || {
        let c2 = c.clone();
        *w.lock().unwrap() = Some(thread::spawn(move || {
            c2.write_at(&[0xbb; 8 * 4096], 0).unwrap()
        }));
        wait_until(|| c.stats().active_zaps == 1);
        thread::sleep(Duration::from_millis(30));
    });
    cache.flush().unwrap();
    writer.lock().unwrap().take().unwrap().join().unwrap();
    cache.flush().unwrap();
    assert_eq!(
        lower.bytes(0, 8 * 4096),
        vec![0xbb; 8 * 4096],
        "stale writeback landed after the bypass write"
    );
    assert_eq!(read(&*cache, 0, 8 * 4096), vec![0xbb; 8 * 4096]);
}

#[test]
fn fill_racing_large_write_bypass_never_installs_stale_data() {
    let lower = FaultyDisk::new(pattern(1, 0, 64 << 10));
    let hook = OnceHook::new(HookPoint::AfterFillRead, 2);
    let cache = hooked_cache(&lower, bypass_cfg(), hook.clone());
    let c = cache.clone();
    hook.arm(move || c.write_at(&[0x44; 8 * 4096], 0).unwrap());
    let _ = read(&*cache, 2 * K4, 512);
    assert!(hook.fired());
    assert_eq!(
        read(&*cache, 2 * K4, 4096),
        vec![0x44; 4096],
        "a stale fill was installed"
    );
}

#[test]
fn failed_large_write_bypass_reports_error_and_keeps_older_dirty_data() {
    let old = pattern(1, 0, 64 << 10);
    let lower = FaultyDisk::new(old.clone());
    let cache = cache_over(&lower, bypass_cfg());
    let _ = read(&*cache, 0, 3 * K4 as usize);
    cache.write_at(&[0x12; 512], K4).unwrap();
    lower.fail_writes(0, 64 << 10);
    assert!(cache.write_at(&[0x66; 8 * 4096], 0).is_err());
    // The failed write may have reached the disk anywhere in its range (here: nowhere); the
    // completed older write stays dirty and is retried, and nothing reads as zeros.
    let mut expected = old.clone();
    expected[K4 as usize..K4 as usize + 512].fill(0x12);
    assert_eq!(read(&*cache, 0, 64 << 10), expected);
    for i in 0..4u64 {
        assert_eq!(
            read(&*cache, i * K4, 4096),
            expected[(i * K4) as usize..][..4096].to_vec()
        );
    }
    assert!(cache.flush().is_err(), "flush hid the failed writeback");
    lower.heal();
    cache.flush().unwrap();
    assert_eq!(lower.bytes(0, 64 << 10), expected);
}

/// Hooks for `fill_started_after_bypass_pinned_its_folios_is_not_installed`.
#[derive(Default)]
struct BypassVsFill {
    reader: Mutex<Option<Box<dyn FnOnce() + Send>>>,
    reader_in_fill: AtomicBool,
    release_fill: AtomicBool,
}

impl CacheHooks for BypassVsFill {
    fn at(&self, point: HookPoint, folio: u64) {
        match point {
            HookPoint::BeforeLowerZap => {
                if let Some(spawn_reader) = self.reader.lock().unwrap().take() {
                    spawn_reader();
                    wait_until(|| self.reader_in_fill.load(Ordering::SeqCst));
                }
            }
            HookPoint::AfterFillRead
                if folio == 2 && !self.reader_in_fill.load(Ordering::SeqCst) =>
            {
                self.reader_in_fill.store(true, Ordering::SeqCst);
                wait_until(|| self.release_fill.load(Ordering::SeqCst));
            }
            _ => {}
        }
    }
}

#[test]
fn fill_started_after_bypass_pinned_its_folios_is_not_installed() {
    let lower = FaultyDisk::new(pattern(1, 0, 64 << 10));
    let hooks = Arc::new(BypassVsFill::default());
    let cache = FolioCache::with_hooks(
        lower.clone() as Arc<dyn BlockDev>,
        bypass_cfg(),
        hooks.clone(),
    )
    .unwrap();
    let reader = Arc::new(Mutex::new(None));
    let (c, r) = (cache.clone(), reader.clone());
    // The bypass write has pinned its (uncached) folios; now a reader creates folio 2 and reads
    // the old bytes, and holds them while the bypass write reaches the lower layer.
    *hooks.reader.lock().unwrap() = Some(Box::new(move || {
        *r.lock().unwrap() = Some(thread::spawn(move || read(&*c, 2 * K4, 512)));
    }));
    cache.write_at(&[0x99; 8 * 4096], 0).unwrap();
    hooks.release_fill.store(true, Ordering::SeqCst);
    let _ = reader.lock().unwrap().take().unwrap().join().unwrap();
    assert!(hooks.reader_in_fill.load(Ordering::SeqCst));
    assert_eq!(
        read(&*cache, 2 * K4, 4096),
        vec![0x99; 4096],
        "a fill older than the bypass write was installed"
    );
}

#[test]
fn sequential_dirty_folios_are_written_back_in_one_lower_write() {
    let lower = FaultyDisk::new(vec![0; 1 << 20]);
    // Through the cache, not around it: no bypass.
    let cfg = CacheConfig {
        bypass_threshold: 0,
        read_bypass_threshold: 0,
        ..small_cfg(K4, 64, 64)
    };
    let cache = cache_over(&lower, cfg);
    // 40 folios, partly dirty at both ends: one contiguous dirty range from 1000 to 160_000.
    cache.write_at(&pattern(3, 1000, 159_000), 1000).unwrap();
    cache.write_at(&[7; 512], 300_000).unwrap();
    cache.flush().unwrap();
    let writes = lower.writes();
    assert_eq!(
        writes,
        vec![(512, 160_256 - 512), (300_000 - 300_000 % 512, 1024)]
    );
    assert_eq!(lower.bytes(1000, 159_000), pattern(3, 1000, 159_000));
}

/// Blocks the first thread that reaches `point` for `folio` until `release` is set.
struct BlockOnce {
    point: HookPoint,
    folio: u64,
    entered: AtomicBool,
    release: AtomicBool,
}

impl CacheHooks for BlockOnce {
    fn at(&self, point: HookPoint, folio: u64) {
        if point == self.point && folio == self.folio && !self.entered.swap(true, Ordering::SeqCst)
        {
            while !self.release.load(Ordering::SeqCst) {
                thread::sleep(Duration::from_millis(1));
            }
        }
    }
}

#[test]
fn clustered_writeback_never_joins_a_folio_already_under_writeback() {
    let lower = FaultyDisk::new(vec![0; 64 << 10]);
    let hook = Arc::new(BlockOnce {
        point: HookPoint::AfterWritebackSnapshot,
        folio: 1,
        entered: AtomicBool::new(false),
        release: AtomicBool::new(false),
    });
    let cache = FolioCache::with_hooks(
        lower.clone() as Arc<dyn BlockDev>,
        small_cfg(K4, 8, 8),
        hook.clone(),
    )
    .unwrap();
    cache.write_at(&[1; 4096], K4).unwrap();
    let a = {
        let c = cache.clone();
        thread::spawn(move || c.flush().unwrap())
    };
    wait_until(|| hook.entered.load(Ordering::SeqCst));
    assert!(hook.entered.load(Ordering::SeqCst));
    // Folio 1's old content is snapshotted and stuck before its lower write. Newer data lands in
    // folio 1, and folio 0 becomes dirty up to its end, so a writeback of folio 0 would like to
    // extend into folio 1.
    cache.write_at(&[2; 4096], K4).unwrap();
    cache.write_at(&[3; 4096], 0).unwrap();
    let b = {
        let c = cache.clone();
        thread::spawn(move || c.flush().unwrap())
    };
    thread::sleep(Duration::from_millis(50));
    hook.release.store(true, Ordering::SeqCst);
    a.join().unwrap();
    b.join().unwrap();
    cache.flush().unwrap();
    assert_eq!(
        lower.bytes(K4, 4096),
        vec![2; 4096],
        "an older snapshot landed after a newer one"
    );
    assert_eq!(lower.bytes(0, 4096), vec![3; 4096]);
}

#[test]
fn by_default_128_kib_reads_and_answer_in_page_cache_go_around_the_cache_and_other_writes_through_it(
) {
    let lower = FaultyDisk::new(pattern(5, 0, 1 << 20));
    let cfg = CacheConfig {
        flusher_threads: 0,
        ..CacheConfig::default()
    };
    let cache = cache_over(&lower, cfg);
    // A 128 KiB read around the cache: nothing cached afterwards.
    assert_eq!(
        read(&*cache, 0, 128 << 10),
        pattern(5, 0, 1 << 20)[..128 << 10]
    );
    assert_eq!(cache.stats().bypassed, 1);
    assert_eq!(cache.stats().cached_folios, 0);
    // A 64 KiB read goes through it (and stays cached).
    let small = 64 << 10;
    assert_eq!(read(&*cache, 0, small), pattern(5, 0, 1 << 20)[..small]);
    assert_eq!(cache.stats().cached_folios, 1);
    // A 128 KiB write the lower layer would have to allocate for goes through the cache:
    // nothing reaches the lower layer before a flush.
    cache.write_at(&[9; 128 << 10], 256 << 10).unwrap();
    assert_eq!(cache.stats().bypassed, 1);
    assert!(lower.writes().is_empty());
    assert_eq!(lower.asked_in_place(), vec![(256 << 10, 128 << 10)]);
    // 256 KiB writes go around it whatever the lower layer does with them (it is not asked).
    cache.write_at(&[8; 256 << 10], 512 << 10).unwrap();
    assert_eq!(cache.stats().bypassed, 2);
    assert_eq!(lower.writes(), vec![(512 << 10, 256 << 10)]);
    assert_eq!(lower.asked_in_place().len(), 1);
    // Where the lower layer rewrites in place, 128 KiB writes go around the cache too; of an
    // unaligned one, its whole folio (the lower layer is asked about that one).
    lower.answer_in_page_cache(0, 1 << 20);
    cache.write_at(&[7; 128 << 10], 768 << 10).unwrap();
    assert_eq!(cache.stats().bypassed, 3);
    assert_eq!(lower.writes()[1], (768 << 10, 128 << 10));
    cache.write_at(&[6; 128 << 10], 32 << 10).unwrap();
    assert_eq!(cache.stats().bypassed, 4);
    assert_eq!(lower.writes()[2], (64 << 10, 64 << 10));
    assert_eq!(lower.asked_in_place()[2], (64 << 10, 64 << 10));
    // A write just below the threshold stays in the cache, and the lower layer is not asked.
    cache.write_at(&[5; (128 << 10) - 512], 896 << 10).unwrap();
    assert_eq!(
        cache.stats().bypassed,
        4,
        "a write below 128 KiB went around the cache"
    );
    assert_eq!(lower.writes().len(), 3);
    assert_eq!(lower.asked_in_place().len(), 3);
    cache.flush().unwrap();
    assert_eq!(lower.bytes(256 << 10, 128 << 10), vec![9; 128 << 10]);
    assert_eq!(lower.bytes(768 << 10, 128 << 10), vec![7; 128 << 10]);
    assert_eq!(lower.bytes(32 << 10, 128 << 10), vec![6; 128 << 10]);
    assert_eq!(
        lower.bytes(896 << 10, (128 << 10) - 512),
        vec![5; (128 << 10) - 512]
    );
}

#[test]
fn a_read_threshold_above_the_write_threshold_changes_nothing_and_zero_follows_it() {
    for (write, read_t) in [(16 << 10, 128 << 10), (16 << 10, 0)] {
        let lower = FaultyDisk::new(vec![3; 1 << 20]);
        let cfg = CacheConfig {
            flusher_threads: 0,
            bypass_threshold: write,
            read_bypass_threshold: read_t,
            ..CacheConfig::default()
        };
        let cache = cache_over(&lower, cfg);
        // Reads bypass from the smaller of the two: 16 KiB here.
        assert_eq!(read(&*cache, 0, 16 << 10), vec![3; 16 << 10]);
        assert_eq!(cache.stats().bypassed, 1, "write {write} read {read_t}");
    }
    // No bypass at all when writes have none.
    let lower = FaultyDisk::new(vec![3; 1 << 20]);
    let cfg = CacheConfig {
        flusher_threads: 0,
        bypass_threshold: 0,
        read_bypass_threshold: 4 << 10,
        ..CacheConfig::default()
    };
    let cache = cache_over(&lower, cfg);
    assert_eq!(read(&*cache, 0, 512 << 10), vec![3; 512 << 10]);
    assert_eq!(cache.stats().bypassed, 0);
}

#[test]
fn the_rewrite_threshold_is_off_at_zero_capped_by_the_write_threshold_and_off_without_it() {
    // (bypass_threshold, rewrite_bypass_threshold, write length, goes around the cache)
    for (write_t, rewrite_t, len, around) in [
        (256 << 10, 0, 128 << 10, false),
        (256 << 10, 0, 256 << 10, true),
        (0, 64 << 10, 512 << 10, false),
        (64 << 10, 128 << 10, 64 << 10, true),
        (256 << 10, 64 << 10, 64 << 10, true),
        (256 << 10, 64 << 10, 60 << 10, false),
    ] {
        let lower = FaultyDisk::new(vec![3; 1 << 20]);
        lower.answer_in_page_cache(0, 1 << 20);
        let cfg = CacheConfig {
            flusher_threads: 0,
            bypass_threshold: write_t,
            rewrite_bypass_threshold: rewrite_t,
            ..CacheConfig::default()
        };
        let cache = cache_over(&lower, cfg);
        cache.write_at(&vec![4; len as usize], 0).unwrap();
        assert_eq!(
            cache.stats().bypassed,
            u64::from(around),
            "write {write_t} rewrite {rewrite_t} len {len}"
        );
        cache.flush().unwrap();
        assert_eq!(lower.bytes(0, len as usize), vec![4; len as usize]);
    }
}

/// Deterministic: the lower layer's "in place" answer is taken with no cache lock held, and a
/// write and a discard of the same range run right after it, before the rewrite goes around the
/// cache. Both complete before the rewrite is registered, so they order before it: the cached
/// write's dirty folio is dropped once the rewrite is down (never written back over it later),
/// and the discard's zeros are overwritten.
#[test]
fn a_cached_write_or_discard_right_after_the_in_place_answer_orders_before_the_rewrite() {
    for discard in [false, true] {
        let lower = FaultyDisk::new(vec![3; 1 << 20]);
        lower.answer_in_page_cache(0, 1 << 20);
        let cfg = CacheConfig {
            flusher_threads: 0,
            ..CacheConfig::default()
        };
        let cache = cache_over(&lower, cfg);
        let racer = cache.clone();
        lower.after_in_place(move || {
            if discard {
                racer.discard(64 << 10, 64 << 10).unwrap();
            } else {
                racer.write_at(&[1; 4096], 68 << 10).unwrap();
            }
        });
        cache.write_at(&[7; 128 << 10], 64 << 10).unwrap();
        assert_eq!(cache.stats().bypassed, 1, "discard {discard}");
        assert_eq!(read(&*cache, 64 << 10, 128 << 10), vec![7; 128 << 10]);
        cache.flush().unwrap();
        assert_eq!(
            lower.bytes(64 << 10, 128 << 10),
            vec![7; 128 << 10],
            "discard {discard}: an older write or zap landed after the rewrite"
        );
        assert_eq!(lower.bytes(0, 64 << 10), vec![3; 64 << 10]);
    }
}

/// A default cache (no flusher thread) over 1 MiB of 3s whose every range the lower layer
/// rewrites in place and persists.
fn persisting_cache() -> (Arc<FaultyDisk>, Arc<FolioCache>) {
    let lower = FaultyDisk::new(vec![3; 1 << 20]);
    lower.answer_in_page_cache(0, 1 << 20);
    lower.answer_persisted(0, 1 << 20);
    let cfg = CacheConfig {
        flusher_threads: 0,
        ..CacheConfig::default()
    };
    let cache = cache_over(&lower, cfg);
    (lower, cache)
}

/// A write the lower layer persists in place (the crash journal then records only a marker)
/// goes down around the cache only as whole folios that the cache sends around itself anyway,
/// in write-back mode; afterwards no folio keeps a dirty copy of the range, so nothing older
/// is written back over it later. A refusal from below (`Ok(false)`: the layer's state changed
/// after its hint) writes nothing and leaves the cached folios as they were.
#[test]
fn a_persisted_write_takes_whole_bypassed_folios_and_leaves_no_dirty_copy_behind() {
    let (lower, cache) = persisting_cache();
    let k = |n: u64| n << 10;
    cache.write_at(&[1; 4096], k(68)).unwrap();
    assert!(cache.persists_in_place(k(64), k(128)));
    assert!(
        !cache.persists_in_place(k(64) + 512, k(128)),
        "a partial folio"
    );
    assert!(
        !cache.persists_in_place(k(64), k(128) + 512),
        "a partial last folio"
    );
    assert!(
        !cache.persists_in_place(k(64), k(64)),
        "below the rewrite threshold"
    );
    assert!(!cache
        .write_in_place_persisted(&[9; 64 << 10], 4096)
        .unwrap());
    assert!(cache
        .write_in_place_persisted(&[7; 128 << 10], k(64))
        .unwrap());
    assert_eq!(lower.persisted_writes(), vec![(k(64), 128 << 10)]);
    assert_eq!(cache.stats().bypassed, 1);
    assert_eq!(read(&*cache, k(64), 128 << 10), vec![7; 128 << 10]);
    cache.flush().unwrap();
    assert_eq!(
        lower.writes(),
        vec![(k(64), 128 << 10)],
        "the older dirty folio was written back after the persisted write"
    );
    assert_eq!(lower.bytes(k(64), 128 << 10), vec![7; 128 << 10]);

    lower.refuse_persist(true);
    cache.write_at(&[2; 4096], k(512)).unwrap();
    assert!(cache.persists_in_place(k(512), k(128)));
    assert!(!cache
        .write_in_place_persisted(&[8; 128 << 10], k(512))
        .unwrap());
    assert_eq!(lower.bytes(k(512), 128 << 10), vec![3; 128 << 10]);
    assert_eq!(
        read(&*cache, k(512), 8192),
        [vec![2; 4096], vec![3; 4096]].concat()
    );
    cache.flush().unwrap();
    assert_eq!(
        lower.bytes(k(512), 4096),
        vec![2; 4096],
        "the refusal lost a dirty folio"
    );

    // From the start of the disk, over a dirty folio: it is dropped too.
    lower.refuse_persist(false);
    cache.write_at(&[4; 4096], 4096).unwrap();
    assert!(cache.write_in_place_persisted(&[5; 128 << 10], 0).unwrap());
    cache.flush().unwrap();
    assert_eq!(lower.bytes(0, 128 << 10), vec![5; 128 << 10]);
    assert!(
        !cache.write_in_place_persisted(&[], k(64)).unwrap(),
        "an empty write"
    );

    cache.set_writeback(false).unwrap();
    assert!(
        !cache.persists_in_place(k(512), k(128)),
        "write-through mode"
    );
    assert!(!cache
        .write_in_place_persisted(&[8; 128 << 10], k(512))
        .unwrap());
    assert_eq!(lower.persisted_writes().len(), 2);
}

/// A persisted write that fails below (it may have written part of its range) leaves no clean
/// cached copy of the range to be read instead of what the disk now holds; a dirty one stays
/// dirty, to be written again over whatever landed.
#[test]
fn a_failed_persisted_write_forgets_clean_copies_and_keeps_dirty_ones() {
    let (lower, cache) = persisting_cache();
    assert_eq!(read(&*cache, 64 << 10, 4096), vec![3; 4096]);
    cache.write_at(&[1; 4096], 128 << 10).unwrap();
    lower.fail_writes_after_applying(true);
    assert!(cache
        .write_in_place_persisted(&[7; 128 << 10], 64 << 10)
        .is_err());
    lower.heal();
    assert_eq!(
        read(&*cache, 64 << 10, 4096),
        vec![7; 4096],
        "a clean copy from before the failed write was read"
    );
    cache.flush().unwrap();
    assert_eq!(
        lower.bytes(128 << 10, 4096),
        vec![1; 4096],
        "the dirty folio was lost"
    );
}

/// A persisted write registers and cleans exactly its own folios: a dirty copy inside its range
/// (a range that starts past its own length into the disk) is dropped, so no older writeback
/// lands over it, and a read past the range while the write is below neither waits for it nor
/// has its fill held back.
#[test]
fn a_persisted_write_covers_exactly_its_own_folios() {
    let (lower, cache) = persisting_cache();
    let k = |n: u64| n << 10;
    cache.write_at(&[1; 4096], k(260)).unwrap();
    let c = cache.clone();
    let outside_read = Arc::new(Mutex::new(None));
    let seen = outside_read.clone();
    lower.after_write(k(256), k(128), move || {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || tx.send(read(&*c, k(512), 4096)).unwrap());
        *seen.lock().unwrap() = Some(rx.recv_timeout(Duration::from_secs(5)).ok());
    });
    let misses = cache.stats().read_misses;
    assert!(cache
        .write_in_place_persisted(&[7; 128 << 10], k(256))
        .unwrap());
    assert_eq!(
        outside_read.lock().unwrap().take(),
        Some(Some(vec![3; 4096])),
        "a read past the persisted write's range waited for it"
    );
    assert_eq!(cache.stats().read_misses, misses + 1);
    assert_eq!(read(&*cache, k(512), 4096), vec![3; 4096]);
    assert_eq!(
        cache.stats().read_misses,
        misses + 1,
        "a fill past the persisted write's range was not installed"
    );
    assert_eq!(read(&*cache, k(260), 4096), vec![7; 4096]);
    cache.flush().unwrap();
    assert_eq!(
        lower.bytes(k(256), 128 << 10),
        vec![7; 128 << 10],
        "a dirty copy from before the persisted write was written back over it"
    );
}

/// A write the cache says completes in memory (`BlockDev::writes_in_memory`, the hint on which
/// the request layer runs a write on the queue thread instead of an executor) reaches nothing
/// below: no fill of a partly covered sector, no writeback to make room, no flush. Random
/// writes over a cache whose dirty budget keeps filling up, some not whole sectors: every write
/// the hint said yes to left the lower layer untouched, and the hint said both yes and no.
#[test]
fn a_write_said_to_complete_in_memory_reaches_nothing_below() {
    let lower = FaultyDisk::new(vec![3; 1 << 20]);
    let cache = cache_over(&lower, small_cfg(K4, 32, 8));
    let mut x = 0x2545_f491_4f6c_dd1d_u64;
    let (mut yes, mut no) = (0, 0);
    for i in 0..3000u32 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let mut offset = (x % 512) * 512;
        let mut len = ((x >> 16) % 16 + 1) * 512;
        if x >> 60 == 0 {
            offset += 100;
        }
        if x >> 60 == 1 {
            len -= 7;
        }
        if i % 211 == 0 {
            cache.flush().unwrap();
        }
        let before = (lower.event_count(), lower.reads.load(Ordering::SeqCst));
        let said = cache.writes_in_memory(offset, len);
        cache
            .write_at(&pattern(i as u8, offset, len as usize), offset)
            .unwrap();
        if said {
            yes += 1;
            assert_eq!(
                (lower.event_count(), lower.reads.load(Ordering::SeqCst)),
                before,
                "write {i} of {len} bytes at {offset} was said to complete in memory"
            );
        } else {
            no += 1;
        }
    }
    assert!(yes > 300 && no > 300, "said yes {yes} times, no {no} times");
}

/// When the hint says no: a write that needs dirty budget beyond the limit (the boundary
/// exactly), one of a range the cache sends around itself (and only then: with either
/// threshold off, a large write is copied in like any other), one past the end, an empty one,
/// while a zap is in flight, and in write-through mode.
#[test]
fn a_write_is_not_said_to_complete_in_memory_where_it_may_wait() {
    let lower = FaultyDisk::new(vec![3; 1 << 20]);
    let cache = cache_over(&lower, small_cfg(K4, 64, 8));
    for i in 0..7 {
        cache.write_at(&[1; 4096], i * K4).unwrap();
    }
    assert!(
        cache.writes_in_memory(100 * K4, K4),
        "the last folio of budget"
    );
    assert!(
        !cache.writes_in_memory(100 * K4, 2 * K4),
        "two folios, one of budget left"
    );
    cache.write_at(&[1; 4096], 7 * K4).unwrap();
    assert!(!cache.writes_in_memory(100 * K4, K4), "no budget left");
    cache.flush().unwrap();
    assert!(cache.writes_in_memory(100 * K4, K4));
    assert!(cache.writes_in_memory(0, 8 * K4));
    assert!(
        !cache.writes_in_memory((1 << 20) - K4, 2 * K4),
        "past the end"
    );
    assert!(!cache.writes_in_memory(K4, 0), "an empty write");

    let during = Arc::new(Mutex::new(None));
    let (c, d) = (cache.clone(), during.clone());
    lower.at(common::Io::Zap, 0, K4, move || {
        *d.lock().unwrap() = Some(c.writes_in_memory(200 * K4, K4));
    });
    cache.discard(0, K4).unwrap();
    assert_eq!(*during.lock().unwrap(), Some(false), "during a zap");
    assert!(cache.writes_in_memory(200 * K4, K4), "after the zap");

    cache.set_writeback(false).unwrap();
    assert!(!cache.writes_in_memory(200 * K4, K4), "write-through mode");

    // The thresholds of writes around the cache; 0 turns one off.
    let with = |bypass: u64, rewrite: u64| {
        let lower = FaultyDisk::new(vec![3; 1 << 20]);
        lower.answer_in_page_cache(0, 1 << 20);
        let cfg = CacheConfig {
            bypass_threshold: bypass,
            rewrite_bypass_threshold: rewrite,
            ..small_cfg(K4, 128, 64)
        };
        cache_over(&lower, cfg)
    };
    let c = with(64 << 10, 0);
    assert!(!c.writes_in_memory(0, 64 << 10), "a write around the cache");
    assert!(c.writes_in_memory(0, 60 << 10));
    let c = with(256 << 10, 32 << 10);
    assert!(
        !c.writes_in_memory(0, 32 << 10),
        "a rewrite around the cache"
    );
    assert!(c.writes_in_memory(0, 28 << 10));
    let c = with(0, 0);
    assert!(
        c.writes_in_memory(0, 128 << 10),
        "nothing goes around the cache"
    );
}
