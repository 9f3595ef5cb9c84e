//! The linearizability checker (`cache::lincheck`) over the whole stack the daemon serves:
//! folio cache → qcow2 overlay → backing chain (a qcow2 image over a raw base), and over the
//! qcow2 overlay alone. The overlay's host file is a `ChaosFile`: every pread/pwrite/fdatasync
//! is delayed at random (seeded) and every few fdatasyncs fail with Linux semantics (the
//! unsynced writes are lost for durability, readers still see them), so the engine's replay
//! journal runs constantly; the cache's lower layer is a `ChaosDev`. Every read is checked per
//! 512-byte sector against the writes and zaps that completed before it or ran alongside it,
//! and crash snapshots (the durable bytes of the overlay, opened cold) taken during the run are
//! checked against the crash contract: every write acknowledged by a completed flush survives
//! unless something newer replaced it, and nothing older comes back.
//!
//! Duration: `SNAPBLK_LIN_SECS` (default 2 s per test), seed `SNAPBLK_LIN_SEED` (printed on
//! failure); the `soak_*` variants run 60 s and are `#[ignore]`d (`make soak`).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use blockdev::{BlockDev, BlockError};
use cache::lincheck::{self, ChaosDev, CrashProbe, Delays, LinConfig};
use cache::{CacheConfig, FolioCache};
use qcow_snapshot::{CreateOptions, Format, MemHost, QcowImage};
use snapblk_tests::chaos::ChaosFile;

const SIZE: usize = 4 << 20;

/// A raw base with position-dependent bytes, a qcow2 image over it with some data of its own
/// (so reads fall through two levels), and the bytes of a fresh overlay over that image.
struct Chain {
    _dir: tempfile::TempDir,
    backing: Arc<dyn BlockDev>,
    overlay: Vec<u8>,
}

fn chain(cluster_size: u64) -> Chain {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    let mid = dir.path().join("mid.qcow2");
    let top = dir.path().join("top.qcow2");
    let bytes: Vec<u8> = (0..SIZE as u64)
        .map(|i| ((i * 2_654_435_761) >> 13) as u8 | 1)
        .collect();
    std::fs::write(&base, &bytes).unwrap();
    let create = |path: &Path, backing: &Path, fmt: Format| {
        let opts = CreateOptions {
            cluster_size,
            backing: Some((backing.to_str().unwrap().to_string(), fmt)),
            ..CreateOptions::default()
        };
        qcow_snapshot::create(path, &opts).unwrap();
    };
    create(&mid, &base, Format::Raw);
    {
        let img = qcow_snapshot::open_qcow2(&mid, false).unwrap();
        // Every fourth 16 KiB of the first 2 MiB differs from the base.
        for i in (0..128u64).step_by(4) {
            img.write_at(&vec![(i as u8) | 0x80; 16 << 10], i * (16 << 10))
                .unwrap();
        }
        img.close().unwrap();
    }
    create(&top, &mid, Format::Qcow2);
    let backing = qcow_snapshot::open_image(&mid, Some(Format::Qcow2), true).unwrap();
    Chain {
        overlay: std::fs::read(&top).unwrap(),
        _dir: dir,
        backing,
    }
}

fn open_overlay(
    file: Box<dyn qcow_snapshot::HostFile>,
    ro: bool,
    backing: &Arc<dyn BlockDev>,
) -> blockdev::Result<Arc<QcowImage>> {
    let img = QcowImage::open_with(file, ro, Some(backing.clone()))
        .map_err(|e| BlockError::Corrupt(e.to_string()))?;
    if !ro {
        // Tiny metadata caches: L2 and refcount eviction and forced metadata flushes all the time.
        img.set_cache_limits(2, 2, 4);
    }
    Ok(Arc::new(img))
}

/// Runs the checker on the overlay (under a cache if `cache` is set) with crash snapshots.
fn check(cluster_size: u64, cache: Option<CacheConfig>, lin: LinConfig, fail_every: u64) {
    check_stack(cluster_size, cache, lin, fail_every, false);
}

/// [`check`], with the daemon's crash journal on top if `journal` is set; returns how many
/// writes the journal recorded as markers of writes persisted in place.
fn check_stack(
    cluster_size: u64,
    cache: Option<CacheConfig>,
    lin: LinConfig,
    fail_every: u64,
    journal: bool,
) -> u64 {
    let chain = chain(cluster_size);
    let delays = Arc::new(Delays::new(lin.seed));
    let file = ChaosFile::new(chain.overlay.clone(), delays.clone(), fail_every);
    let img = open_overlay(Box::new(file.clone()), false, &chain.backing).unwrap();
    let dev: Arc<dyn BlockDev> = match &cache {
        Some(cfg) => FolioCache::new(ChaosDev::new(img.clone(), delays), cfg.clone()).unwrap(),
        None => img.clone(),
    };
    let jdir = tempfile::tempdir().unwrap();
    let journal = journal.then(|| {
        let id = snapblk::journal::Identity {
            path: "lincheck-overlay".into(),
            dev: 0,
            ino: 1,
        };
        let (j, _) =
            snapblk::journal::Journal::open(dev.clone(), &jdir.path().join("j"), &id, 1 << 20)
                .unwrap();
        Arc::new(j)
    });
    let dev: Arc<dyn BlockDev> = match &journal {
        Some(j) => j.clone(),
        None => dev,
    };
    let take = || -> blockdev::Result<Arc<dyn BlockDev>> {
        let snap = MemHost::new(file.durable());
        Ok(open_overlay(Box::new(snap), true, &chain.backing)? as Arc<dyn BlockDev>)
    };
    let probe = CrashProbe {
        every: Duration::from_millis(150),
        take: &take,
    };
    let result = lincheck::run(&dev, &lin, Some(&probe));
    let failed_syncs = file.failed_syncs();
    match result {
        Ok(r) => eprintln!("lincheck: {r:?}, failed fdatasyncs replayed: {failed_syncs}"),
        Err(e) => panic!("{e} (failed fdatasyncs so far: {failed_syncs})"),
    }
    assert!(!img.is_poisoned(), "a replay failed");
    let persisted = journal.as_ref().map_or(0, |j| j.persisted_writes());
    drop(dev);
    drop(journal);
    img.close().unwrap();
    persisted
}

fn tiny_cache(bypass: u64) -> CacheConfig {
    CacheConfig {
        folio_size: 4096,
        cache_size: 16 * 4096,
        dirty_limit: 8 * 4096,
        writeback: true,
        flusher_threads: 1,
        writeback_interval: Duration::from_millis(50),
        bypass_threshold: bypass,
        read_bypass_threshold: 0,
        // Small writes of 8 KiB and more that land in allocated clusters go around the cache.
        rewrite_bypass_threshold: 8 << 10,
    }
}

fn lin(large_len: u64) -> LinConfig {
    LinConfig {
        span: 512 << 10,
        large_len,
        ..LinConfig::from_env()
    }
}

#[test]
fn full_stack_reads_see_the_last_completed_or_a_concurrent_write_and_crashes_keep_flushed_data() {
    check(4096, Some(tiny_cache(32 << 10)), lin(32 << 10), 5);
}

/// The same under the crash journal, where writes of 32 KiB into allocated clusters whose L2
/// entries are in the file are persisted in place below and recorded as markers: those must
/// order like any write against the reads, writes and zaps around them.
#[test]
fn under_the_crash_journal_writes_persisted_in_place_stay_linearizable() {
    let cfg = LinConfig {
        large_align: 4096,
        ..lin(32 << 10)
    };
    let persisted = check_stack(4096, Some(tiny_cache(32 << 10)), cfg, 5, true);
    eprintln!("writes persisted in place: {persisted}");
    assert!(persisted > 0, "no write was persisted in place");
}

#[test]
fn qcow2_overlay_alone_is_linearizable_and_replays_failed_fdatasyncs_in_file_order() {
    check(4096, None, lin(32 << 10), 3);
}

#[test]
#[ignore = "soak: run by `make soak`"]
fn soak_linearizable_full_stack_64k_clusters() {
    check(
        64 << 10,
        Some(tiny_cache(64 << 10)),
        LinConfig {
            span: 2 << 20,
            large_len: 64 << 10,
            ..LinConfig::soak()
        },
        7,
    );
}

#[test]
#[ignore = "soak: run by `make soak`"]
fn soak_linearizable_qcow2_overlay_alone() {
    check(
        4096,
        None,
        LinConfig {
            large_len: 32 << 10,
            ..LinConfig::soak()
        },
        3,
    );
}
