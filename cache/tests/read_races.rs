//! Deterministic interleaving tests of the read invariant: a read returns, for every 512-byte
//! sector, the value of the last write or zap (discard, write-zeroes, bypassing large write)
//! that completed before the read was invoked, or of one concurrent with it - on every read
//! path (filled from below, bypassing the cache). The lower layer runs the racing zap exactly
//! after its read has got the old bytes and before the cache looks at them again.

mod common;

use std::sync::Arc;

use blockdev::BlockDev;
use cache::CacheConfig;
use common::{cache_over, pattern, read, read_into, small_cfg, FaultyDisk};

const K4: u64 = 4096;
const SECTOR: usize = 512;

/// The three kinds of request that change a range under the cache's cached sectors.
#[derive(Debug, Clone, Copy)]
enum Racer {
    Discard,
    WriteZeroes,
    /// A write large enough to bypass the cache, covering whole folios 0..8.
    LargeWrite,
}

const RACERS: [Racer; 3] = [Racer::Discard, Racer::WriteZeroes, Racer::LargeWrite];

/// The two ways a read enters the cache: into a buffer (`read_at`) and into a destination in
/// pieces (`read_into`, which copies hits straight from the folio).
type ReadFn = fn(&dyn BlockDev, u64, usize) -> Vec<u8>;
const READS: [ReadFn; 2] = [read, read_into];
const LARGE: usize = 8 * K4 as usize;

impl Racer {
    /// Runs the racing request over the sector at `off` (the large write covers `0..LARGE`).
    fn run(self, dev: &dyn BlockDev, off: u64) {
        match self {
            Racer::Discard => dev.discard(off, SECTOR as u64).unwrap(),
            Racer::WriteZeroes => dev.write_zeroes(off, SECTOR as u64, false).unwrap(),
            Racer::LargeWrite => dev.write_at(&pattern(77, 0, LARGE), 0).unwrap(),
        }
    }

    /// What the racing request leaves in the sector at `off`.
    fn result(self, off: u64) -> Vec<u8> {
        match self {
            Racer::Discard | Racer::WriteZeroes => vec![0; SECTOR],
            Racer::LargeWrite => pattern(77, off, SECTOR),
        }
    }
}

/// Every request of at least 4 folios bypasses the cache.
fn bypass_cfg() -> CacheConfig {
    CacheConfig {
        bypass_threshold: 4 * K4,
        read_bypass_threshold: 0,
        ..small_cfg(K4, 16, 8)
    }
}

/// Writes a dirty sector at `hot` (lower keeps the old bytes), then reads `[read_off, +read_len)`
/// while the lower layer runs `racer` over `hot` right after the read's lower I/O. The read
/// must see, in that sector, the dirty write or the racer's bytes - never the old lower bytes -
/// and the old bytes everywhere else.
fn read_racing(cfg: CacheConfig, racer: Racer, hot: u64, read_off: u64, read_len: usize) {
    for read_fn in READS {
        read_racing_with(read_fn, cfg.clone(), racer, hot, read_off, read_len);
    }
}

fn read_racing_with(
    read_fn: ReadFn,
    cfg: CacheConfig,
    racer: Racer,
    hot: u64,
    read_off: u64,
    read_len: usize,
) {
    let old = pattern(1, 0, 64 << 10);
    let lower = FaultyDisk::new(old.clone());
    let cache = cache_over(&lower, cfg);
    let new = pattern(2, hot, SECTOR);
    cache.write_at(&new, hot).unwrap();
    let c = cache.clone();
    lower.after_read(read_off, read_len as u64, move || racer.run(&*c, hot));
    let got = read_fn(&*cache, read_off, read_len);
    assert!(
        lower.after_read_fired(),
        "{racer:?}: the read never reached the lower layer"
    );
    let rel = (hot - read_off) as usize;
    let sector = &got[rel..rel + SECTOR];
    assert!(
        sector == new.as_slice() || sector == racer.result(hot).as_slice(),
        "{racer:?}: the read returned lower-layer bytes older than a completed write (first \
         bytes {:?}, old {:?}, new {:?})",
        &sector[..8],
        &old[hot as usize..hot as usize + 8],
        &new[..8]
    );
    for (i, (&g, &o)) in got.iter().zip(&old[read_off as usize..]).enumerate() {
        let disk = read_off + i as u64;
        let racer_range = match racer {
            Racer::LargeWrite => disk < LARGE as u64,
            _ => (hot..hot + SECTOR as u64).contains(&disk),
        };
        if !racer_range {
            assert_eq!(g, o, "{racer:?}: byte {disk:#x} changed");
        } else if !(hot..hot + SECTOR as u64).contains(&disk) {
            let r = pattern(77, disk, 1)[0];
            assert!(g == o || g == r, "{racer:?}: byte {disk:#x} is {g}");
        }
    }
    // And after the dust settled, the racer's bytes are there.
    assert_eq!(read(&*cache, hot, SECTOR), racer.result(hot));
}

#[test]
fn filled_read_never_returns_old_lower_bytes_for_a_sector_dirty_when_it_started() {
    // Folio 1: sector 3 dirty, the rest missing, so the fill spans sectors 0..8 including the
    // dirty one; the racer completes while the fill's bytes are out.
    for racer in RACERS {
        read_racing(bypass_cfg(), racer, K4 + 3 * SECTOR as u64, K4, K4 as usize);
    }
}

#[test]
fn unaligned_filled_read_never_returns_old_lower_bytes_for_a_dirty_sector() {
    for racer in RACERS {
        read_racing(bypass_cfg(), racer, K4 + 5 * SECTOR as u64, K4 + 700, 3000);
    }
}

#[test]
fn bypassing_read_never_returns_old_lower_bytes_for_a_sector_dirty_when_it_started() {
    // A 16 KiB read bypasses the cache: folio 1 is only partly uptodate, so the lower layer is
    // read under it and the cached sectors are overlaid; the racer completes in between.
    for racer in RACERS {
        read_racing(
            bypass_cfg(),
            racer,
            K4 + 3 * SECTOR as u64,
            0,
            4 * K4 as usize,
        );
    }
}

#[test]
fn bypassing_read_never_returns_old_bytes_when_the_racer_also_rewrites_the_sector() {
    // The racer zaps the dirty sector and a newer write makes it uptodate again before the
    // overlay looks: the overlay may use the newest bytes or the ones it saw first, never the
    // lower layer's old ones.
    let old = pattern(1, 0, 64 << 10);
    let lower = FaultyDisk::new(old.clone());
    let cache = cache_over(&lower, bypass_cfg());
    let hot = K4 + 3 * SECTOR as u64;
    let first = pattern(2, hot, SECTOR);
    cache.write_at(&first, hot).unwrap();
    let c = cache.clone();
    let newer = pattern(3, hot, SECTOR);
    let n2 = newer.clone();
    lower.after_read(0, 4 * K4, move || {
        c.discard(hot, SECTOR as u64).unwrap();
        c.write_at(&n2, hot).unwrap();
    });
    let got = read(&*cache, 0, 4 * K4 as usize);
    assert!(lower.after_read_fired());
    let s = &got[hot as usize..hot as usize + SECTOR];
    assert!(
        s == first.as_slice() || s == newer.as_slice() || s == [0u8; SECTOR].as_slice(),
        "old lower bytes returned"
    );
    let _: Arc<dyn BlockDev> = cache;
}

#[test]
fn write_completed_after_a_discard_survives_a_bypassing_write_still_in_flight() {
    // A large write B has reached the lower layer and has not yet dropped the cached copies of
    // its folios. A discard D of one sector runs completely (after B below: the lower layer
    // holds zeros), then a small write W of that sector completes. W completed after D, so a
    // read must see W (or B, which is still concurrent) - never D's zeros, which would mean B
    // dropped W from the cache when it finished.
    let lower = FaultyDisk::new(pattern(1, 0, 64 << 10));
    let cache = cache_over(&lower, bypass_cfg());
    let hot = K4 + 3 * SECTOR as u64;
    // Folio 1 is cached, so B pins it and drops its cached copy when it finishes.
    let _ = read(&*cache, K4, 512);
    let w = pattern(5, hot, SECTOR);
    let (c, w2) = (cache.clone(), w.clone());
    let writer = Arc::new(std::sync::Mutex::new(None));
    let slot = writer.clone();
    lower.after_write(0, LARGE as u64, move || {
        c.discard(hot, SECTOR as u64).unwrap();
        let c2 = c.clone();
        let t = std::thread::spawn(move || c2.write_at(&w2, hot).unwrap());
        // W either completes now or waits for B; give it the chance to complete.
        let start = std::time::Instant::now();
        while !t.is_finished() && start.elapsed() < std::time::Duration::from_millis(100) {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        *slot.lock().unwrap() = Some(t);
    });
    cache.write_at(&pattern(77, 0, LARGE), 0).unwrap();
    assert!(
        lower.after_read_fired(),
        "the bypassing write never reached the lower layer"
    );
    writer.lock().unwrap().take().unwrap().join().unwrap();
    let got = read(&*cache, hot, SECTOR);
    assert!(
        got == w || got == pattern(77, hot, SECTOR),
        "a write that completed after a discard was dropped by an older bypassing write: the \
         sector reads as {}",
        if got == [0u8; SECTOR] {
            "zeros"
        } else {
            "other bytes"
        }
    );
    cache.flush().unwrap();
    assert_eq!(lower.bytes(hot, SECTOR), got);
}
