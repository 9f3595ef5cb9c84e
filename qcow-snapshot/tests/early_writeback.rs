//! Early writeback (`image/early_writeback.rs`): on a buffered image file a background thread
//! syncs the file every 8 MiB of guest data. These tests pin what that may and may not change:
//! it makes data durable earlier, it never turns a failed sync into a later false success
//! (invariant 6), a write that lands while the background sync is inside the file's sync is
//! durable after the next FLUSH, and files without a page cache never see it.
//!
//! The test host keeps a current and a durable copy with "fsyncgate" semantics (a failed sync
//! drops every write since the last good one), says it is page cached, and can run a hook right
//! after a sync reached the file (on the background thread: the deterministic interleaving
//! point). Locking model: the durable copy's mutex is held across a sync (syncs are serialized
//! by the journal anyway); the hook is taken out of its own mutex before it runs.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use blockdev::{BlockDev, MemDisk};
use qcow_snapshot::{create_on, CreateOptions, Format, HostFile, MemHost, QcowImage};

const CS: u64 = 64 << 10;
const MIB: usize = 1 << 20;

type SyncHook = Box<dyn FnOnce() + Send>;

/// A page-cached file: the current content in a [`MemHost`], the durable one beside it.
#[derive(Default)]
struct CachedHost {
    file: MemHost,
    durable: Mutex<Vec<u8>>,
    fail_syncs: AtomicU32,
    syncs: AtomicU32,
    after_sync: Mutex<Option<SyncHook>>,
    /// Writes of at least this many bytes go to the device with O_DIRECT (0: none do), as a
    /// buffered file's large writes do with `--direct large`.
    direct_min: usize,
    /// Bytes written with O_DIRECT (`write_at` of at least `direct_min`).
    direct_bytes: AtomicU64,
    /// Bytes written through `write_cached_at` that `write_at` would have sent direct.
    kept_cached_bytes: AtomicU64,
    /// Bytes `write_batch_to_sync` sent with O_DIRECT (page-aligned writes of any size, when
    /// `direct_min` is set), and how many writes its calls had.
    synced_direct_bytes: AtomicU64,
    to_sync_writes: AtomicU64,
}

impl CachedHost {
    fn durable(&self) -> Vec<u8> {
        self.durable.lock().unwrap().clone()
    }
}

impl HostFile for CachedHost {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.file.read_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        if self.writes_directly(buf, offset) {
            self.direct_bytes
                .fetch_add(buf.len() as u64, Ordering::SeqCst);
        }
        self.file.write_at(buf, offset)
    }

    fn write_cached_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        if self.writes_directly(buf, offset) {
            self.kept_cached_bytes
                .fetch_add(buf.len() as u64, Ordering::SeqCst);
        }
        self.file.write_at(buf, offset)
    }

    fn sync_data(&self) -> std::io::Result<()> {
        {
            let mut durable = self.durable.lock().unwrap();
            if self.fail_syncs.load(Ordering::SeqCst) > 0 {
                // fsyncgate: the unsynced pages are gone.
                self.fail_syncs.fetch_sub(1, Ordering::SeqCst);
                self.file.set_len(0)?;
                self.file.write_at(&durable, 0)?;
                return Err(std::io::Error::from_raw_os_error(libc::EIO));
            }
            *durable = self.file.contents();
        }
        self.syncs.fetch_add(1, Ordering::SeqCst);
        let hook = self.after_sync.lock().unwrap().take();
        if let Some(h) = hook {
            h();
        }
        Ok(())
    }

    fn len(&self) -> std::io::Result<u64> {
        self.file.len()
    }

    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.file.set_len(len)
    }

    fn page_cached(&self) -> bool {
        true
    }

    fn writes_directly(&self, buf: &[u8], _offset: u64) -> bool {
        self.direct_min > 0 && buf.len() >= self.direct_min
    }

    fn syncs_directly(&self, buf: &[u8], offset: u64) -> bool {
        self.direct_min > 0
            && !buf.is_empty()
            && offset.is_multiple_of(4096)
            && (buf.len() as u64).is_multiple_of(4096)
    }

    fn write_batch_to_sync(&self, writes: &[(&[u8], u64)]) -> Vec<std::io::Result<()>> {
        self.to_sync_writes
            .fetch_add(writes.len() as u64, Ordering::SeqCst);
        writes
            .iter()
            .map(|&(b, o)| {
                if self.syncs_directly(b, o) {
                    self.synced_direct_bytes
                        .fetch_add(b.len() as u64, Ordering::SeqCst);
                    self.file.write_at(b, o)
                } else {
                    self.write_at(b, o)
                }
            })
            .collect()
    }
}

/// A fresh image on a page-cached host whose writes of 256 KiB and more go direct, as a
/// buffered file's do with `--direct large`.
fn large_direct_image() -> (Arc<CachedHost>, QcowImage) {
    let host = Arc::new(CachedHost {
        direct_min: 256 << 10,
        ..CachedHost::default()
    });
    let img = image_on(host.clone());
    (host, img)
}

/// A fresh 32 MiB image with 64 KiB clusters on `host`.
fn image_on(host: Arc<dyn HostFile>) -> QcowImage {
    image_over(host, None)
}

/// The same over a raw `backing` device.
fn image_over(host: Arc<dyn HostFile>, backing: Option<Arc<dyn BlockDev>>) -> QcowImage {
    image_with(host, backing, false)
}

fn image_with(
    host: Arc<dyn HostFile>,
    backing: Option<Arc<dyn BlockDev>>,
    extended_l2: bool,
) -> QcowImage {
    image_sized(host, backing, extended_l2, 32 << 20)
}

fn image_sized(
    host: Arc<dyn HostFile>,
    backing: Option<Arc<dyn BlockDev>>,
    extended_l2: bool,
    size: u64,
) -> QcowImage {
    create_on(
        &*host,
        &CreateOptions {
            size,
            cluster_size: CS,
            extended_l2,
            backing: backing
                .as_ref()
                .map(|_| ("base.raw".to_string(), Format::Raw)),
            ..CreateOptions::default()
        },
    )
    .unwrap();
    host.sync_data().unwrap();
    QcowImage::open_with(Box::new(host), false, backing).unwrap()
}

/// Writes `mib` MiB of pattern `v` from offset 0, 1 MiB per request.
fn fill(img: &QcowImage, mib: usize, v: u8) {
    fill_from(img, 0, mib, v);
}

/// Writes `mib` MiB of pattern `v` from MiB `first` on, 1 MiB per request.
fn fill_from(img: &QcowImage, first: usize, mib: usize, v: u8) {
    for i in first..first + mib {
        img.write_at(&vec![v; MIB], (i * MIB) as u64).unwrap();
    }
}

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// What the image reads as when opened from `bytes` (the durable copy after a crash).
fn read_durable(bytes: Vec<u8>, offset: u64, len: usize) -> Vec<u8> {
    let img = QcowImage::open_with(Box::new(MemHost::new(bytes)), true, None).unwrap();
    let mut buf = vec![0; len];
    img.read_at(&mut buf, offset).unwrap();
    buf
}

#[test]
fn written_data_becomes_durable_in_the_background_before_any_flush() {
    let host = Arc::new(CachedHost::default());
    let img = image_on(host.clone());
    let syncs_at_open = host.syncs.load(Ordering::SeqCst);
    fill(&img, 9, 0xa5);
    wait_for("a background sync", || img.early_writeback_kicks() >= 1);
    assert!(host.syncs.load(Ordering::SeqCst) > syncs_at_open);
    // The data clusters are durable (their mapping is not until a FLUSH writes the L2 table):
    // the first 8 MiB of guest data sit somewhere in the durable file.
    let durable = host.durable();
    let pattern = durable
        .chunks(CS as usize)
        .filter(|c| c.iter().all(|&b| b == 0xa5));
    assert!(pattern.count() as u64 >= (8 << 20) / CS);
    img.flush().unwrap();
    assert!(read_durable(host.durable(), 0, 9 * MIB)
        .iter()
        .all(|&b| b == 0xa5));
}

#[test]
fn a_file_without_a_page_cache_never_gets_a_background_sync() {
    let img = image_on(Arc::new(MemHost::default()));
    fill(&img, 17, 1);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(img.early_writeback_kicks(), 0);
}

#[test]
fn no_background_sync_while_writes_copy_from_the_backing_chain() {
    // Each write covers a cluster but its first 4 KiB, so each allocation reads 4 KiB of the
    // backing file: those reads are what the writes wait for, and background write bursts
    // would only queue in front of them on the device.
    let host = Arc::new(CachedHost::default());
    let base: Arc<dyn BlockDev> = Arc::new(MemDisk::new(64 << 20));
    let img = image_sized(host.clone(), Some(base), false, 64 << 20);
    let syncs = host.syncs.load(Ordering::SeqCst);
    let part = CS as usize - 4096;
    for c in 0..(32 << 20) / CS {
        img.write_at(&vec![2; part], c * CS + 4096).unwrap();
    }
    assert!(
        (32 << 20) / CS * part as u64 > 2 * (8 << 20),
        "too few bytes to reach a kick"
    );
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(img.early_writeback_kicks(), 0);
    assert_eq!(host.syncs.load(Ordering::SeqCst), syncs);
    // Without backing reads kicks resume (the first kick point after the copying writes is
    // still skipped: they read since the previous one).
    fill_from(&img, 32, 17, 4);
    wait_for("a background sync", || img.early_writeback_kicks() >= 1);
}

#[test]
fn subcluster_aligned_first_writes_over_a_backing_chain_still_kick() {
    // With extended L2 entries a write of whole subclusters into a fresh cluster reads nothing
    // from the backing chain (its empty head and tail fills must not count as reads).
    let host = Arc::new(CachedHost::default());
    let base: Arc<dyn BlockDev> = Arc::new(MemDisk::new(32 << 20));
    let img = image_with(host.clone(), Some(base), true);
    for c in 0..(32 << 20) / CS {
        img.write_at(&vec![6; 32 << 10], c * CS).unwrap();
    }
    wait_for("a background sync", || img.early_writeback_kicks() >= 1);
}

#[test]
fn a_failed_background_sync_is_never_followed_by_a_flush_that_reports_success_falsely() {
    // The background sync fails and so does the replay's sync: the image is poisoned, so the
    // next FLUSH fails (had the error been swallowed, the kernel would not report it again and
    // the FLUSH would succeed over lost pages).
    let host = Arc::new(CachedHost::default());
    let img = image_on(host.clone());
    host.fail_syncs.store(2, Ordering::SeqCst);
    // 8 MiB: the last write reaches the kick point (later writes fail once it is poisoned).
    fill(&img, 8, 7);
    wait_for("the failed background sync", || {
        host.fail_syncs.load(Ordering::SeqCst) == 0 && img.early_writeback_kicks() >= 1
    });
    assert!(img.is_poisoned());
    assert!(img.flush().is_err(), "a FLUSH succeeded after lost writes");
}

#[test]
fn a_failed_background_sync_repaired_by_the_replay_loses_nothing() {
    let host = Arc::new(CachedHost::default());
    let img = image_on(host.clone());
    host.fail_syncs.store(1, Ordering::SeqCst);
    fill(&img, 9, 9);
    wait_for("the background sync", || img.early_writeback_kicks() >= 1);
    assert_eq!(host.fail_syncs.load(Ordering::SeqCst), 0, "no sync failed");
    assert!(!img.is_poisoned());
    img.flush().unwrap();
    assert!(read_durable(host.durable(), 0, 9 * MIB)
        .iter()
        .all(|&b| b == 9));
}

#[test]
fn a_write_landing_while_the_background_sync_is_inside_the_file_sync_is_durable_after_the_next_flush(
) {
    // Interleaving: right after the background sync reached the file (before ReplayHost
    // retires its journal), a write allocating a new cluster and a FLUSH run to the end on
    // another thread. The FLUSH waits for the background sync (one sync at a time) and then
    // syncs itself; the write it covers must survive a crash right after it.
    let host = Arc::new(CachedHost::default());
    let img = Arc::new(image_on(host.clone()));
    let racer = Arc::new(Mutex::new(None));
    let (img2, slot) = (img.clone(), racer.clone());
    let hook_thread = Arc::new(Mutex::new(None));
    let on = hook_thread.clone();
    *host.after_sync.lock().unwrap() = Some(Box::new(move || {
        *on.lock().unwrap() = std::thread::current().name().map(str::to_owned);
        let t = std::thread::spawn(move || {
            img2.write_at(&vec![0x5a; 4096], 20 << 20).unwrap();
            img2.flush()
        });
        // Give the racer time to block where it must (the FLUSH on the sync mutex).
        let start = Instant::now();
        while !t.is_finished() && start.elapsed() < Duration::from_millis(200) {
            std::thread::sleep(Duration::from_millis(1));
        }
        *slot.lock().unwrap() = Some(t);
    }));
    fill(&img, 9, 3);
    wait_for("the hooked background sync", || {
        racer.lock().unwrap().is_some()
    });
    assert_eq!(
        hook_thread.lock().unwrap().as_deref(),
        Some("qcow-early-wb"),
        "the hooked sync was not the background one"
    );
    let t = racer.lock().unwrap().take().unwrap();
    t.join().unwrap().expect("the racing FLUSH succeeds");
    let durable = host.durable();
    assert_eq!(
        read_durable(durable.clone(), 20 << 20, 4096),
        vec![0x5a; 4096],
        "a write covered by a successful FLUSH was not durable"
    );
    // Every write that completed before the racing FLUSH started is covered too: the hook ran
    // after the 8th MiB was written.
    assert!(read_durable(durable, 0, 8 * MIB).iter().all(|&b| b == 3));
}

#[test]
fn writes_that_go_direct_never_kick_a_background_sync() {
    // A large write that goes to the device with O_DIRECT leaves nothing in the page cache; a
    // background sync for it would only flush the device's cache and hold the file system's
    // journal while writers grow the file. Buffered writes on the same file still kick.
    let (_, img) = large_direct_image();
    fill(&img, 9, 3);
    let big = vec![5u8; MIB];
    let batch: Vec<(&[u8], u64)> = (9..17).map(|i| (&big[..], (i * MIB) as u64)).collect();
    assert!(img.write_batch(&batch).iter().all(Result::is_ok));
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(img.early_writeback_kicks(), 0);
    // 64 KiB writes stay buffered: 8 MiB of them into new clusters reach a kick point.
    for c in (17 * MIB as u64) / CS..(25 * MIB as u64) / CS {
        img.write_at(&vec![8; CS as usize], c * CS).unwrap();
    }
    wait_for("a background sync", || img.early_writeback_kicks() >= 1);
}

#[test]
fn rewrites_of_allocated_clusters_never_kick_a_background_sync() {
    // A stream that rewrites clusters the image already has leaves its data in the host page
    // cache, where a rewrite of the same page costs nothing more, as on a raw image (and as
    // QEMU's qcow2, whose metadata flushes come with allocations only). A background sync
    // would write every page out and make each later rewrite of it start again from a clean
    // page. Only writes that allocate count, alone or batched.
    let host = Arc::new(CachedHost::default());
    let img = image_on(host.clone());
    // 4 MiB allocated: below a kick point.
    fill(&img, 4, 1);
    let syncs = host.syncs.load(Ordering::SeqCst);
    for round in 0..5u8 {
        for c in 0..(4 * MIB as u64) / CS {
            img.write_at(&vec![round; CS as usize], c * CS).unwrap();
        }
        let data = vec![round ^ 0x80; CS as usize];
        let batch: Vec<(&[u8], u64)> = (0..(4 * MIB as u64) / CS)
            .map(|c| (&data[..], c * CS))
            .collect();
        assert!(img.write_batch(&batch).iter().all(Result::is_ok));
    }
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(img.early_writeback_kicks(), 0);
    assert_eq!(host.syncs.load(Ordering::SeqCst), syncs);
    // The next 4 MiB that allocate reach the kick point (the rewrites counted nothing).
    fill_from(&img, 4, 4, 2);
    wait_for("a background sync", || img.early_writeback_kicks() >= 1);
}

#[test]
fn batched_buffered_writes_kick_a_background_sync() {
    let host = Arc::new(CachedHost::default());
    let img = image_on(host.clone());
    let data = vec![0x3cu8; CS as usize];
    let batch: Vec<(&[u8], u64)> = (0..(9 * MIB as u64) / CS)
        .map(|c| (&data[..], c * CS))
        .collect();
    assert!(img.write_batch(&batch).iter().all(Result::is_ok));
    wait_for("a background sync", || img.early_writeback_kicks() >= 1);
}

#[test]
fn large_answer_in_page_cache_stay_in_the_page_cache_and_large_allocating_writes_go_direct() {
    // `--direct large`: a 1 MiB write that allocates goes to the device with O_DIRECT (an
    // installer filling a fresh overlay); the same write over clusters the image has goes
    // through the page cache, as a raw image's writes do, alone or batched.
    let (host, img) = large_direct_image();
    fill(&img, 4, 1);
    assert_eq!(host.direct_bytes.load(Ordering::SeqCst), 4 << 20);
    assert_eq!(host.kept_cached_bytes.load(Ordering::SeqCst), 0);
    fill(&img, 2, 2);
    let data = vec![3u8; MIB];
    let batch: Vec<(&[u8], u64)> = (2..4).map(|i| (&data[..], (i * MIB) as u64)).collect();
    assert!(img.write_batch(&batch).iter().all(Result::is_ok));
    assert_eq!(host.direct_bytes.load(Ordering::SeqCst), 4 << 20);
    assert_eq!(host.kept_cached_bytes.load(Ordering::SeqCst), 4 << 20);
    // A batch mixing both: the allocating write still goes direct.
    let batch: Vec<(&[u8], u64)> = [0u64, 4]
        .iter()
        .map(|&i| (&data[..], i * MIB as u64))
        .collect();
    assert!(img.write_batch(&batch).iter().all(Result::is_ok));
    assert_eq!(host.direct_bytes.load(Ordering::SeqCst), 5 << 20);
    assert_eq!(host.kept_cached_bytes.load(Ordering::SeqCst), 5 << 20);
    let mut back = vec![0u8; 5 * MIB];
    img.read_at(&mut back, 0).unwrap();
    assert!(back[..MIB].iter().all(|&b| b == 3));
    assert!(back[MIB..2 * MIB].iter().all(|&b| b == 2));
    assert!(back[2 * MIB..].iter().all(|&b| b == 3));
}

#[test]
fn a_large_guest_write_past_the_folio_cache_answer_in_page_cache_directly() {
    // A guest write the folio cache let through (`write_uncached_at`) keeps no copy above:
    // under `--direct large` its rewrite in place goes to the device with O_DIRECT like an
    // allocating write, where a writeback's (`write_at`) stays in the page cache. One that is
    // too small for the direct route is buffered (`write_at`, not counted as kept cached).
    let (host, img) = large_direct_image();
    fill(&img, 2, 1);
    let direct = || host.direct_bytes.load(Ordering::SeqCst);
    let cached = || host.kept_cached_bytes.load(Ordering::SeqCst);
    assert_eq!((direct(), cached()), (2 << 20, 0));
    img.write_uncached_at(&vec![7u8; MIB], 0).unwrap();
    assert_eq!(
        (direct(), cached()),
        (3 << 20, 0),
        "an uncached rewrite stayed cached"
    );
    img.write_at(&vec![8u8; MIB], MIB as u64).unwrap();
    assert_eq!(
        (direct(), cached()),
        (3 << 20, 1 << 20),
        "a writeback's rewrite went direct"
    );
    img.write_uncached_at(&[9u8; 4096], 8192).unwrap();
    assert_eq!((direct(), cached()), (3 << 20, 1 << 20));
    // Also past the end of what it allocated: the uncached write allocates the rest directly.
    img.write_uncached_at(&vec![6u8; 2 * MIB], MIB as u64)
        .unwrap();
    assert_eq!((direct(), cached()), (5 << 20, 1 << 20));
    img.flush().unwrap();
    let mut want = vec![7u8; 3 * MIB];
    want[8192..12288].fill(9);
    want[MIB..].fill(6);
    let mut back = vec![0u8; 3 * MIB];
    img.read_at(&mut back, 0).unwrap();
    assert!(back == want, "the image reads back other bytes");
    assert!(
        read_durable(host.durable(), 0, 3 * MIB) == want,
        "the flushed image differs"
    );
}

#[test]
fn a_failed_sync_after_large_answer_in_page_cache_replays_them() {
    // A rewrite kept in the page cache can be dropped by a failed sync (unlike a direct
    // write, which reported its own outcome), so the image keeps it for the replay: the
    // FLUSH after the failed sync makes it durable.
    let (host, img) = large_direct_image();
    fill(&img, 2, 1);
    img.flush().unwrap();
    fill(&img, 2, 9);
    assert_eq!(host.kept_cached_bytes.load(Ordering::SeqCst), 2 << 20);
    host.fail_syncs.store(1, Ordering::SeqCst);
    img.flush().unwrap();
    assert_eq!(host.fail_syncs.load(Ordering::SeqCst), 0, "no sync failed");
    assert!(read_durable(host.durable(), 0, 2 * MIB)
        .iter()
        .all(|&b| b == 9));
}

#[test]
fn a_batch_to_sync_sends_every_page_aligned_write_direct_and_the_rest_through_the_page_cache() {
    // `--direct large`: the folio cache's writeback for a FLUSH (`write_batch_to_sync`) goes
    // past the host page cache whatever its size, rewrites in place and allocating writes
    // alike, since the flush's `fdatasync` would write it out at once; a page-unaligned piece
    // stays buffered. The same writes as an ordinary batch stay in the page cache.
    let (host, img) = large_direct_image();
    fill(&img, 1, 1);
    img.flush().unwrap();
    let synced = || host.synced_direct_bytes.load(Ordering::SeqCst);
    let direct = || host.direct_bytes.load(Ordering::SeqCst);
    let d0 = direct();
    for r in img.write_batch(&[(&[2u8; 4096], 0), (&[2u8; 4096], 8192)]) {
        r.unwrap();
    }
    assert_eq!(
        (synced(), direct()),
        (0, d0),
        "an ordinary batch of small writes left the page cache"
    );
    // Two rewrites in place, a sector in the middle of a page, and a first write into a
    // cluster the image does not have yet (copy-on-write assembles the whole cluster).
    let results = img.write_batch_to_sync(&[
        (&[3u8; 4096], 0),
        (&[3u8; 4096], 8192),
        (&[4u8; 512], 20480 + 512),
        (&[5u8; 4096], 2 << 20),
    ]);
    for r in results {
        r.unwrap();
    }
    assert_eq!(
        synced(),
        2 * 4096 + CS,
        "the batch to sync did not send its page-aligned writes (and only those) direct"
    );
    assert_eq!(
        host.to_sync_writes.load(Ordering::SeqCst),
        3,
        "the direct ones did not go down in one batch"
    );
    img.flush().unwrap();
    let mut want = vec![1u8; MIB];
    want[..4096].fill(3);
    want[8192..12288].fill(3);
    want[20480 + 512..20480 + 1024].fill(4);
    let mut back = vec![0u8; MIB];
    img.read_at(&mut back, 0).unwrap();
    assert!(back == want, "the image reads other bytes");
    let mut c = vec![0u8; CS as usize];
    img.read_at(&mut c, 2 << 20).unwrap();
    assert!(c[..4096].iter().all(|&b| b == 5) && c[4096..].iter().all(|&b| b == 0));
}
