//! The fsx model test over the whole stack the daemon serves: folio cache → qcow2 overlay →
//! file, over a random raw base. A tiny cache keeps eviction and writeback running constantly;
//! small clusters make COW allocation, L2 allocation and refcount growth frequent. Every round
//! ends with a flush, a byte-for-byte check through the stack, closing everything, reopening the
//! overlay cold (without the cache) and checking every byte again. Afterwards the real
//! `qemu-img check` must find the overlay clean and the base must be unchanged.
//!
//! Duration: `SNAPBLK_FSX_SECS` (default 5 s); `soak_*` runs are `#[ignore]`d (`make soak`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use blockdev::BlockDev;
use cache::fsx::{self, FsxConfig};
use cache::{CacheConfig, FolioCache};
use qcow_snapshot::{CreateOptions, Format};

/// 16 folios of 4 KiB: eviction and dirty throttling on nearly every request.
fn tiny_cache(bypass: u64) -> CacheConfig {
    CacheConfig {
        folio_size: 4096,
        cache_size: 16 * 4096,
        dirty_limit: 8 * 4096,
        writeback: true,
        flusher_threads: 1,
        writeback_interval: Duration::from_millis(10),
        bypass_threshold: bypass,
        read_bypass_threshold: 0,
        // Writes of 16 KiB and more into clusters the overlay already has go around the cache.
        rewrite_bypass_threshold: 16 << 10,
    }
}

struct Images {
    _dir: tempfile::TempDir,
    base: PathBuf,
    overlay: PathBuf,
    base_bytes: Vec<u8>,
}

fn images(size: usize, cluster_size: u64, extended_l2: bool) -> Images {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    let overlay = dir.path().join("overlay.qcow2");
    // Non-zero, position-dependent base content, so a COW that zeroes or misplaces shows.
    let base_bytes: Vec<u8> = (0..size as u64)
        .map(|i| ((i * 2_654_435_761) >> 13) as u8 | 1)
        .collect();
    std::fs::write(&base, &base_bytes).unwrap();
    let opts = CreateOptions {
        cluster_size,
        backing: Some((base.to_str().unwrap().to_string(), Format::Raw)),
        extended_l2,
        ..CreateOptions::default()
    };
    qcow_snapshot::create(&overlay, &opts).unwrap();
    Images {
        _dir: dir,
        base,
        overlay,
        base_bytes,
    }
}

fn qemu_img_check(path: &Path) {
    let out = Command::new("qemu-img")
        .args(["check", "-f", "qcow2"])
        .arg(path)
        .output()
        .expect("qemu-img is installed (make test installs it)");
    assert_eq!(
        out.status.code(),
        Some(0),
        "qemu-img check: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn run_full_stack(cfg: FsxConfig, cache: CacheConfig, cluster_size: u64) {
    run_full_stack_on(cfg, cache, cluster_size, false);
}

/// Like [`run_full_stack`], on an overlay with extended L2 entries (subclusters) when
/// `extended_l2`.
fn run_full_stack_on(cfg: FsxConfig, cache: CacheConfig, cluster_size: u64, extended_l2: bool) {
    let img = images(8 << 20, cluster_size, extended_l2);
    let overlay = img.overlay.clone();
    let open = || -> blockdev::Result<Arc<dyn BlockDev>> {
        let qcow = qcow_snapshot::open_image(&overlay, Some(Format::Qcow2), false)
            .map_err(|e| blockdev::BlockError::Corrupt(e.to_string()))?;
        Ok(FolioCache::new(qcow, cache.clone()).expect("cache config") as Arc<dyn BlockDev>)
    };
    let cold = || -> blockdev::Result<Arc<dyn BlockDev>> {
        qcow_snapshot::open_image(&overlay, Some(Format::Qcow2), true)
            .map_err(|e| blockdev::BlockError::Corrupt(e.to_string()))
    };
    match fsx::run(&open, &cold, &cfg) {
        Ok(report) => eprintln!("fsx over cache -> qcow2 -> file: {report:?}"),
        Err(e) => panic!("{e}"),
    }
    qemu_img_check(&img.overlay);
    assert!(
        std::fs::read(&img.base).unwrap() == img.base_bytes,
        "the base image was modified"
    );
}

#[test]
fn fsx_full_stack_small_clusters_never_loses_or_zeroes_acknowledged_writes() {
    let cfg = FsxConfig {
        span: Some(4 << 20),
        ..FsxConfig::from_env()
    };
    run_full_stack(cfg, tiny_cache(0), 4096);
}

#[test]
fn fsx_full_stack_default_clusters_with_bypass_matches_shadow_after_cold_reopen() {
    let cfg = FsxConfig {
        align: 512,
        span: Some(8 << 20),
        ..FsxConfig::from_env()
    };
    run_full_stack(cfg, tiny_cache(64 << 10), 64 << 10);
}

#[test]
fn fsx_full_stack_extended_l2_subclusters_never_lose_or_zero_acknowledged_writes() {
    // 16 KiB clusters: 512-byte subclusters, the smallest QEMU allows.
    let cfg = FsxConfig {
        span: Some(4 << 20),
        ..FsxConfig::from_env()
    };
    run_full_stack_on(cfg, tiny_cache(0), 16 << 10, true);
    let cfg = FsxConfig {
        align: 512,
        span: Some(8 << 20),
        ..FsxConfig::from_env()
    };
    run_full_stack_on(cfg, tiny_cache(64 << 10), 64 << 10, true);
}

#[test]
#[ignore = "soak: run by `make soak`"]
fn soak_fsx_full_stack_extended_l2() {
    run_full_stack_on(FsxConfig::soak(), tiny_cache(0), 64 << 10, true);
}

#[test]
#[ignore = "soak: run by `make soak`"]
fn soak_fsx_full_stack_512_byte_clusters() {
    run_full_stack(FsxConfig::soak(), tiny_cache(0), 512);
}

#[test]
#[ignore = "soak: run by `make soak`"]
fn soak_fsx_full_stack_64k_clusters_with_bypass() {
    run_full_stack(
        FsxConfig {
            align: 512,
            ..FsxConfig::soak()
        },
        tiny_cache(64 << 10),
        64 << 10,
    );
}
