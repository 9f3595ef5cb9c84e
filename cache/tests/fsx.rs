//! The fsx model checker over the cache with a tiny cache (8 folios of 4 KiB) so eviction,
//! throttling and writeback run constantly, over a `MemDisk` and over a `RawFile`.
//! Duration: `SNAPBLK_FSX_SECS` (default 5 s per test); the `soak_*` variants run 120 s unless
//! the variable says otherwise and are `#[ignore]`d (run them with `cargo test -p cache --release
//! --test fsx -- --ignored`).

use std::sync::Arc;
use std::time::Duration;

use blockdev::{BlockDev, MemDisk, RawFile};
use cache::fsx::{self, FsxConfig};
use cache::{CacheConfig, FolioCache};

/// 8 folios of 4 KiB; requests of `bypass` bytes or more bypass the cache (0: never), and so
/// do rewrites in place from 8 KiB (when `bypass` is not 0).
fn tiny_cache(bypass: u64) -> CacheConfig {
    CacheConfig {
        folio_size: 4096,
        cache_size: 8 * 4096,
        dirty_limit: 4 * 4096,
        writeback: true,
        flusher_threads: 1,
        writeback_interval: Duration::from_millis(10),
        bypass_threshold: bypass,
        read_bypass_threshold: 0,
        // Over a raw file (every range rewritten in place) writes of 8 KiB and more go
        // around the cache too; a memory disk never says so.
        rewrite_bypass_threshold: 8 << 10,
    }
}

fn fsx_over_memdisk(cfg: FsxConfig, cache: CacheConfig) {
    let lower = Arc::new(MemDisk::new(4 << 20));
    let open = || -> blockdev::Result<Arc<dyn BlockDev>> {
        Ok(
            FolioCache::new(lower.clone(), cache.clone()).expect("cache config")
                as Arc<dyn BlockDev>,
        )
    };
    let cold = || -> blockdev::Result<Arc<dyn BlockDev>> { Ok(lower.clone() as Arc<dyn BlockDev>) };
    match fsx::run(&open, &cold, &cfg) {
        Ok(report) => eprintln!("fsx over MemDisk: {report:?}"),
        Err(e) => panic!("{e}"),
    }
}

fn fsx_over_rawfile(cfg: FsxConfig, cache: CacheConfig) {
    let tmp = tempfile::NamedTempFile::new().unwrap();
    // Non-zero initial content, so zeroing bugs show.
    let init: Vec<u8> = (0..4u32 << 20).map(|i| (i % 253) as u8 + 1).collect();
    std::fs::write(tmp.path(), &init).unwrap();
    let path = tmp.path().to_path_buf();
    let open = || -> blockdev::Result<Arc<dyn BlockDev>> {
        let raw = Arc::new(RawFile::open(&path, false)?);
        Ok(FolioCache::new(raw, cache.clone()).expect("cache config") as Arc<dyn BlockDev>)
    };
    let cold = || -> blockdev::Result<Arc<dyn BlockDev>> {
        Ok(Arc::new(RawFile::open(&path, true)?) as Arc<dyn BlockDev>)
    };
    match fsx::run(&open, &cold, &cfg) {
        Ok(report) => eprintln!("fsx over RawFile: {report:?}"),
        Err(e) => panic!("{e}"),
    }
}

#[test]
fn fsx_tiny_cache_without_bypass_over_memdisk_matches_shadow() {
    fsx_over_memdisk(FsxConfig::from_env(), tiny_cache(0));
}

#[test]
fn fsx_tiny_cache_with_bypass_over_rawfile_matches_shadow_after_cold_reopen() {
    fsx_over_rawfile(
        FsxConfig {
            align: 512,
            ..FsxConfig::from_env()
        },
        tiny_cache(64 << 10),
    );
}

#[test]
#[ignore = "soak: long-running, see the file header"]
fn soak_fsx_tiny_cache_over_memdisk() {
    fsx_over_memdisk(FsxConfig::soak(), tiny_cache(32 << 10));
}

#[test]
#[ignore = "soak: long-running, see the file header"]
fn soak_fsx_tiny_cache_over_rawfile() {
    fsx_over_rawfile(FsxConfig::soak(), tiny_cache(0));
}

#[test]
#[ignore = "soak: long-running, see the file header"]
fn soak_fsx_default_folios_over_rawfile() {
    let cache = CacheConfig {
        cache_size: 1 << 20,
        dirty_limit: 512 << 10,
        ..CacheConfig::default()
    };
    fsx_over_rawfile(FsxConfig::soak(), cache);
}
