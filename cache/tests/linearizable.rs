//! The linearizability checker (`cache::lincheck`) over the cache: several threads issue
//! random reads, writes, discards, write-zeroes, large bypassing reads and writes and flushes;
//! the layer below the cache delays every request at random (`ChaosDev`); every read is checked
//! per 512-byte sector against the writes and zaps that completed before it or ran alongside it.
//!
//! Duration: `SNAPBLK_LIN_SECS` (default 2 s per test), seed `SNAPBLK_LIN_SEED` (printed on
//! failure); the `soak_*` variants run 60 s and are `#[ignore]`d (`make soak`).

use std::sync::Arc;
use std::time::Duration;

use blockdev::{BlockDev, MemDisk, RawFile};
use cache::lincheck::{self, ChaosDev, Delays, LinConfig};
use cache::{CacheConfig, FolioCache};

/// `folios` folios of `folio` bytes, a quarter of them dirty at most; requests of `bypass` bytes
/// or more bypass the cache.
fn small_cache(folio: u64, folios: u64, bypass: u64) -> CacheConfig {
    CacheConfig {
        folio_size: folio,
        cache_size: folio * folios,
        dirty_limit: folio * (folios / 2).max(1),
        writeback: true,
        flusher_threads: 1,
        writeback_interval: Duration::from_millis(50),
        bypass_threshold: bypass,
        read_bypass_threshold: 0,
        rewrite_bypass_threshold: 0,
    }
}

fn initial(len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|i| ((i * 2_654_435_761) >> 11) as u8 | 1)
        .collect()
}

/// Runs the checker; returns the number of requests that went around the cache.
fn check(lower: Arc<dyn BlockDev>, cache: CacheConfig, lin: LinConfig) -> u64 {
    let delays = Arc::new(Delays::new(lin.seed));
    let chaos = ChaosDev::new(lower, delays);
    let cache = FolioCache::new(chaos, cache).unwrap();
    let dev: Arc<dyn BlockDev> = cache.clone();
    match lincheck::run(&dev, &lin, None) {
        Ok(r) => eprintln!("lincheck: {r:?}"),
        Err(e) => panic!("{e}"),
    }
    cache.stats().bypassed
}

fn over_memdisk(cache: CacheConfig, lin: LinConfig) {
    check(Arc::new(MemDisk::from_vec(initial(2 << 20))), cache, lin);
}

fn over_rawfile(cache: CacheConfig, lin: LinConfig) -> u64 {
    let tmp = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(tmp.path(), initial(2 << 20)).unwrap();
    let raw = Arc::new(RawFile::open(tmp.path(), false).unwrap());
    check(raw, cache, lin)
}

fn lin(large_len: u64) -> LinConfig {
    LinConfig {
        span: 512 << 10,
        large_len,
        ..LinConfig::from_env()
    }
}

#[test]
fn every_read_sees_the_last_completed_or_a_concurrent_write_cache_over_memdisk() {
    over_memdisk(small_cache(4096, 16, 32 << 10), lin(32 << 10));
}

#[test]
fn every_read_sees_the_last_completed_or_a_concurrent_write_cache_with_64k_folios() {
    over_memdisk(small_cache(64 << 10, 8, 128 << 10), lin(128 << 10));
}

#[test]
fn every_read_sees_the_last_completed_or_a_concurrent_write_cache_over_rawfile() {
    over_rawfile(small_cache(16 << 10, 8, 64 << 10), lin(64 << 10));
}

#[test]
fn every_read_sees_the_last_completed_or_a_concurrent_write_with_small_rewrites_around_the_cache() {
    // A raw file rewrites every range in place, so the small writes of 8 KiB and more
    // (whole 4 KiB folios) go around the cache, among cached writes of the same sectors. No
    // large requests: those are all that go around it.
    let cfg = CacheConfig {
        rewrite_bypass_threshold: 8 << 10,
        ..small_cache(4096, 16, 32 << 10)
    };
    let around = over_rawfile(cfg, lin(0));
    assert!(around > 0, "no write went around the cache");
}

#[test]
#[ignore = "soak: run by `make soak`"]
fn soak_linearizable_cache_over_memdisk() {
    over_memdisk(
        small_cache(4096, 16, 32 << 10),
        LinConfig {
            span: 512 << 10,
            large_len: 32 << 10,
            ..LinConfig::soak()
        },
    );
}

#[test]
#[ignore = "soak: run by `make soak`"]
fn soak_linearizable_cache_over_rawfile_64k_folios() {
    over_rawfile(
        small_cache(64 << 10, 8, 128 << 10),
        LinConfig {
            span: 2 << 20,
            large_len: 128 << 10,
            ..LinConfig::soak()
        },
    );
}
