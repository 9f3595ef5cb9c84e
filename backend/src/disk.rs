//! Which block device the daemon serves: the single place that turns `serve` arguments into the
//! layer stack behind the virtio-blk front end.
//!
//! The stack, top to bottom: the crash journal ([`crate::journal::Journal`], unless
//! `--crash-journal none`, `--snapshot` or `--readonly`) → [`cache::FolioCache`] (write-back folio cache; in write-through mode
//! every write is durable before it completes) → the image: a qcow2 overlay
//! ([`qcow_snapshot::QcowImage`] with its read-only backing chain) or a raw file. With
//! `--snapshot` a fresh qcow2 overlay is created over the image first (the image itself is only
//! ever opened read-only) and deleted when the served disk is dropped, unless `--keep-overlay`.
//!
//! When the format of a writable image had to be probed and came out raw, the stack is topped by
//! [`crate::probe_guard::ProbedRawGuard`] (the guest cannot change how its disk is opened);
//! backing files are opened under the `--allow-backing` policy ([`qcow_snapshot::policy`]).
//!
//! Locking model: none here; the returned layers do their own locking.

use std::path::PathBuf;
use std::sync::Arc;

use blockdev::BlockDev;
use cache::{CacheConfig, FolioCache};
use qcow_snapshot::{CreateOptions, Format};

use crate::cli::{CacheMode, DirectMode, ServeArgs};

/// Puts the qcow2 top of `chain` on O_DIRECT (`--direct on`, or `auto` on an image with
/// extended L2 entries); a file that cannot do it stays buffered, with a warning when `on` was
/// asked for.
fn enable_direct(chain: &crate::snapshot::Chain, image: &std::path::Path, asked: bool) {
    match chain.top_qcow() {
        Some(q) => match q.enable_direct() {
            Ok(()) => log::info!("{}: O_DIRECT below the folio cache", image.display()),
            Err(e) if asked => log::warn!(
                "{}: O_DIRECT unavailable ({e}); using the host page cache",
                image.display()
            ),
            Err(e) => log::info!(
                "{}: stays in the host page cache (no O_DIRECT: {e})",
                image.display()
            ),
        },
        None => log::warn!(
            "{}: --direct on applies to qcow2 images only; this raw image stays buffered",
            image.display()
        ),
    }
}

/// Puts the writable top of `chain` in `mode` (`--direct`; `auto` decided by the top's L2
/// entries) and records `mode` for the tops live snapshots make.
fn set_up_direct(chain: &crate::snapshot::Chain, image: &std::path::Path, mode: DirectMode) {
    let top = chain.top_qcow();
    let extended_l2 = top.as_ref().is_some_and(|q| q.geometry().extended_l2);
    let resolved = mode.for_top(extended_l2);
    match resolved {
        DirectMode::On => enable_direct(chain, image, mode == DirectMode::On),
        DirectMode::Large => enable_direct_large(chain, image),
        DirectMode::Off | DirectMode::Auto => {}
    }
    if resolved != DirectMode::Off && !extended_l2 {
        // Copy-on-write fills of the cache's writeback batches read a raw base with O_DIRECT
        // (with extended L2 entries a first write fills nothing from the base).
        if let Some(q) = top.filter(|q| q.backing().is_some()) {
            match q.enable_direct_backing() {
                Ok(()) => log::info!(
                    "{}: copy-on-write fills read the backing file with O_DIRECT",
                    image.display()
                ),
                Err(e) => log::info!(
                    "{}: copy-on-write fills read the backing file through the host page \
                     cache ({e})",
                    image.display()
                ),
            }
        }
    }
    chain.set_direct(mode);
}

/// Lets the qcow2 top of `chain` write large aligned requests with O_DIRECT (`--direct large`,
/// or `auto` on an image with standard L2 entries); where it cannot, everything stays buffered
/// (logged, not warned: nothing was asked for explicitly).
fn enable_direct_large(chain: &crate::snapshot::Chain, image: &std::path::Path) {
    if let Some(q) = chain.top_qcow() {
        if let Err(e) = q.enable_direct_large(crate::cli::LARGE_DIRECT_MIN) {
            log::info!(
                "{}: large writes stay in the host page cache (no O_DIRECT: {e})",
                image.display()
            );
        }
    }
}

/// Switch between write-back and write-through for a layer that owns a write cache.
///
/// The front end calls it when the driver writes the `writeback` field of the config space (and
/// once per connection with the initial mode). If a disk comes with a `WriteCacheControl`, the
/// front end relies on the layer to make writes durable before they complete in write-through
/// mode; without one, the front end issues a `flush()` after every write-type request instead.
pub trait WriteCacheControl: Send + Sync {
    /// `true`: write-back (writes are durable at the next flush). `false`: write-through.
    fn set_writeback(&self, writeback: bool);
}

/// The disk stack the front end serves.
#[derive(Clone)]
pub struct ServedDisk {
    /// The top layer every request goes through.
    pub dev: Arc<dyn BlockDev>,
    /// The write-cache switch of the top layer, if it has a cache of its own.
    pub cache_control: Option<Arc<dyn WriteCacheControl>>,
    /// Pause gate, statistics, live snapshots and control commands of this disk.
    pub live: Arc<crate::live::Live>,
    /// Removes a throwaway `--snapshot` overlay once the last clone of the disk is gone. Declared
    /// last so the layers above (and the image's clean close) are dropped before it.
    overlay: Option<Arc<OverlayGuard>>,
}

impl std::fmt::Debug for ServedDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServedDisk")
            .field("size", &self.dev.size())
            .field("read_only", &self.dev.is_read_only())
            .field("cache_control", &self.cache_control.is_some())
            .finish()
    }
}

impl ServedDisk {
    /// A disk whose top layer has its own write cache, switched by `control`.
    pub fn with_cache_control(dev: Arc<dyn BlockDev>, control: Arc<dyn WriteCacheControl>) -> Self {
        ServedDisk {
            live: Arc::new(crate::live::Live::detached(dev.clone())),
            dev,
            cache_control: Some(control),
            overlay: None,
        }
    }

    /// The throwaway `--snapshot` overlay this disk deletes when dropped, if any.
    pub fn throwaway_overlay(&self) -> Option<&std::path::Path> {
        self.overlay.as_deref().map(|g| g.path.as_path())
    }

    /// Unlinks the throwaway `--snapshot` overlay now (the open image keeps its data until the
    /// daemon exits, even on a crash), so that nothing needs to be unlinked at exit. Called by
    /// `serve` before it enters the sandbox.
    pub fn unlink_throwaway_overlay(&self) {
        if let Some(g) = &self.overlay {
            if g.unlinked.swap(true, std::sync::atomic::Ordering::SeqCst) {
                return;
            }
            match std::fs::remove_file(&g.path) {
                Ok(()) => log::info!(
                    "unlinked snapshot overlay {} (it lives on until exit)",
                    g.path.display()
                ),
                Err(e) => log::warn!("cannot unlink snapshot overlay {}: {e}", g.path.display()),
            }
        }
    }

    /// A disk without a cache layer of its own.
    pub fn plain(dev: Arc<dyn BlockDev>) -> Self {
        ServedDisk {
            live: Arc::new(crate::live::Live::detached(dev.clone())),
            dev,
            cache_control: None,
            overlay: None,
        }
    }
}

/// Deletes a throwaway snapshot overlay when dropped, unless it was unlinked already (at
/// sandbox entry) or a live snapshot made it part of the chain (`keep`).
#[derive(Debug)]
struct OverlayGuard {
    path: PathBuf,
    unlinked: std::sync::atomic::AtomicBool,
    keep: std::sync::atomic::AtomicBool,
}

impl Drop for OverlayGuard {
    fn drop(&mut self) {
        if *self.unlinked.get_mut() {
            return;
        }
        if self.keep.load(std::sync::atomic::Ordering::Acquire) {
            log::info!(
                "keeping snapshot overlay {}: a live snapshot froze it",
                self.path.display()
            );
            return;
        }
        match std::fs::remove_file(&self.path) {
            Ok(()) => log::info!("removed snapshot overlay {}", self.path.display()),
            Err(e) => log::warn!(
                "cannot remove snapshot overlay {}: {e}",
                self.path.display()
            ),
        }
    }
}

/// The folio cache as the front end's write-cache switch (the guest's CONFIG_WCE).
struct CacheSwitch(Arc<FolioCache>);

impl WriteCacheControl for CacheSwitch {
    fn set_writeback(&self, writeback: bool) {
        if let Err(e) = self.0.set_writeback(writeback) {
            log::error!(
                "switching the write cache to write-{}: {e}",
                if writeback { "back" } else { "through" }
            );
        }
    }
}

/// Why the disk stack could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenDiskError {
    /// The image (or one of its backing files) could not be opened.
    #[error("cannot open image {path}: {source}")]
    Open {
        /// The image path.
        path: PathBuf,
        /// The underlying error.
        source: qcow_snapshot::OpenImageError,
    },
    /// The `--snapshot` overlay could not be created.
    #[error("cannot create snapshot overlay for {path}: {reason}")]
    Snapshot {
        /// The base image path.
        path: PathBuf,
        /// What failed.
        reason: String,
    },
    /// An `--allow-backing` directory (or the `--snapshot` base) cannot be resolved.
    #[error("invalid backing-file policy: {0}")]
    Policy(std::io::Error),
    /// `--image` names an NBD export without `--snapshot`.
    #[error(
        "{}: an NBD export is served only as the read-only base of --snapshot (or as the \
         backing file of a qcow2 overlay)",
        .0.display()
    )]
    NbdNeedsSnapshot(PathBuf),
    /// The cache settings are invalid.
    #[error("invalid cache settings: {0}")]
    Cache(#[from] cache::NewCacheError),
    /// The crash journal could not be opened or replayed.
    #[error("crash journal {path}: {source}")]
    Journal {
        /// The journal path.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
}

/// Creates the `--snapshot` overlay over `args.image` and returns its path and whether it is kept.
fn create_snapshot(args: &ServeArgs) -> Result<(PathBuf, bool), OpenDiskError> {
    let err = |reason: String| OpenDiskError::Snapshot {
        path: args.image.clone(),
        reason,
    };
    let nbd = args
        .image
        .to_str()
        .is_some_and(qcow_snapshot::nbd::is_nbd_name);
    let format = match args.format {
        Some(f) => Format::from(f),
        // An NBD base is raw unless --format says otherwise; it is never probed.
        None if nbd => Format::Raw,
        None => qcow_snapshot::probe_format(&args.image).map_err(|e| err(e.to_string()))?,
    };
    match &args.keep_overlay {
        Some(path) => {
            // Never overwrite: an existing file there may be an earlier session's overlay.
            if path.symlink_metadata().is_ok() {
                return Err(err(format!(
                    "--keep-overlay {} already exists; serve it with --image, or remove it",
                    path.display()
                )));
            }
            let name = qcow_snapshot::api::snapshot_base_name(&args.image)
                .map_err(|e| err(e.to_string()))?;
            let opts = CreateOptions {
                backing: Some((name, format)),
                ..CreateOptions::default()
            };
            qcow_snapshot::create(path, &opts).map_err(|e| err(e.to_string()))?;
            Ok((path.clone(), true))
        }
        None => {
            let dir = std::env::temp_dir();
            let path = qcow_snapshot::create_snapshot_overlay(&args.image, format, &dir)
                .map_err(|e| err(e.to_string()))?;
            Ok((path, false))
        }
    }
}

/// Opens the block device stack that `serve` exposes for `args`.
pub fn open_disk(args: &ServeArgs) -> Result<ServedDisk, OpenDiskError> {
    nbd_client::set_default_options(args.nbd_options());
    if !args.snapshot
        && args
            .image
            .to_str()
            .is_some_and(qcow_snapshot::nbd::is_nbd_name)
    {
        return Err(OpenDiskError::NbdNeedsSnapshot(args.image.clone()));
    }
    let (image, format, guard) = if args.snapshot {
        let (path, keep) = create_snapshot(args)?;
        log::info!(
            "snapshot overlay {} over {} ({})",
            path.display(),
            args.image.display(),
            if keep {
                "kept at exit"
            } else {
                "deleted at exit"
            }
        );
        let guard = (!keep).then(|| {
            Arc::new(OverlayGuard {
                path: path.clone(),
                unlinked: false.into(),
                keep: Default::default(),
            })
        });
        (path, Some(Format::Qcow2), guard)
    } else {
        (args.image.clone(), args.format.map(Format::from), None)
    };
    let open_err = |source| OpenDiskError::Open {
        path: image.clone(),
        source,
    };
    // Probe once here so the guard below knows what the probe said.
    let probed = match format {
        None => Some(qcow_snapshot::probe_format(&image).map_err(open_err)?),
        Some(_) => None,
    };
    let policy = crate::probe_guard::backing_policy(args).map_err(OpenDiskError::Policy)?;
    let chain = crate::snapshot::Chain::open(&image, format.or(probed), args.readonly, &policy)
        .map_err(open_err)?;
    if !args.readonly {
        set_up_direct(&chain, &image, args.direct);
    }
    if let Some(g) = &guard {
        let g = Arc::downgrade(g);
        chain.on_first_freeze(Box::new(move || {
            if let Some(g) = g.upgrade() {
                g.keep.store(true, std::sync::atomic::Ordering::Release);
            }
        }));
    }
    let chain = Arc::new(chain);
    let dev: Arc<dyn BlockDev> = chain.device();
    let cfg = CacheConfig {
        folio_size: args.folio_size,
        cache_size: args.cache_size,
        dirty_limit: args.dirty_limit.min(args.cache_size),
        writeback: args.cache == CacheMode::Writeback,
        ..CacheConfig::default()
    };
    let cache = FolioCache::new(dev, cfg)?;
    // The crash journal sits below the probed-raw guard (a refused write is never journaled)
    // and above the cache; it replays what a crashed daemon left before anything is served.
    let mut journal = None;
    let journaled: Arc<dyn BlockDev> = match args.effective_crash_journal() {
        Some(path) => {
            let jerr = |source| OpenDiskError::Journal {
                path: path.clone(),
                source,
            };
            let id = crate::journal::Identity::of(&image).map_err(jerr)?;
            let (j, _recovery) = crate::journal::Journal::open(
                cache.clone(),
                &path,
                &id,
                crate::journal::DEFAULT_SEGMENT,
            )
            .map_err(jerr)?;
            let j = Arc::new(j);
            // After a live snapshot the journal's records belong to the new top.
            let weak = Arc::downgrade(&j);
            chain.on_new_top(Box::new(move |p| {
                if let Some(j) = weak.upgrade() {
                    j.rebind(p);
                }
            }));
            journal = Some(j.clone());
            j
        }
        None => {
            if args.readonly {
                let mut p = args.socket.clone().into_os_string();
                p.push(".journal");
                let p = PathBuf::from(p);
                if std::fs::metadata(&p).is_ok_and(|m| m.len() > 0) {
                    log::warn!(
                        "{} exists: if a crashed read-write daemon left writes in it, this read-only view does not show them until a read-write daemon replays it",
                        p.display()
                    );
                }
            }
            cache.clone()
        }
    };
    let journaled_top = journaled.clone();
    let top: Arc<dyn BlockDev> = if probed == Some(Format::Raw) && !args.readonly {
        log::warn!("{}", crate::probe_guard::probed_raw_warning(&image));
        Arc::new(crate::probe_guard::ProbedRawGuard::new(
            journaled,
            image.clone(),
        ))
    } else {
        journaled
    };
    let mode_policy = Arc::new(crate::live::ModePolicy::new(Arc::new(CacheSwitch(
        cache.clone(),
    ))));
    let info = crate::live::LiveInfo {
        num_queues: args.num_queues,
        queue_size: args.queue_size,
        read_only: args.readonly || cache.is_read_only(),
    };
    Ok(ServedDisk {
        live: Arc::new(crate::live::Live::new(
            journaled_top,
            cache.clone(),
            journal,
            chain,
            mode_policy.clone(),
            info,
        )),
        dev: top,
        cache_control: Some(mode_policy),
        overlay: guard,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_disk_serves_the_raw_file_with_its_size_and_mode() {
        let tmp = tempfile::NamedTempFile::new().unwrap();
        tmp.as_file().set_len(3 << 20).unwrap();
        let dir = tempfile::tempdir().unwrap();
        // The crash journal defaults to SOCKET.journal: keep it in the temporary directory.
        let mut args = ServeArgs::with_defaults(tmp.path().to_path_buf(), dir.path().join("s"));
        let disk = open_disk(&args).unwrap();
        assert!(
            dir.path().join("s.journal").is_file(),
            "the crash journal is on by default"
        );
        assert_eq!(disk.dev.size(), 3 << 20);
        assert!(!disk.dev.is_read_only());
        assert!(
            disk.cache_control.is_some(),
            "the folio cache is the write-cache switch"
        );
        // The served image is locked as a writer: a second open waits until it is closed.
        drop(disk);
        args.readonly = true;
        assert!(open_disk(&args).unwrap().dev.is_read_only());
    }

    #[test]
    fn open_disk_reports_missing_image() {
        let args = ServeArgs::with_defaults("/nonexistent/snapblk.img".into(), "unused".into());
        let err = open_disk(&args).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/snapblk.img"));
    }

    #[test]
    fn snapshot_serves_an_overlay_that_never_touches_the_base_and_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.raw");
        std::fs::write(&base, vec![0x5a; 1 << 20]).unwrap();
        let mut args = ServeArgs::with_defaults(base.clone(), "unused".into());
        args.snapshot = true;
        args.format = Some(crate::cli::FormatArg::Raw);
        let disk = open_disk(&args).unwrap();
        let overlay = disk.throwaway_overlay().unwrap().to_path_buf();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&overlay).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "the guest's data is owner-only");
        disk.dev.write_at(&[1; 4096], 8192).unwrap();
        let mut b = vec![0; 3 * 4096];
        disk.dev.read_at(&mut b, 4096).unwrap();
        assert!(b[..4096].iter().all(|&x| x == 0x5a));
        assert!(b[4096..8192].iter().all(|&x| x == 1));
        assert!(b[8192..].iter().all(|&x| x == 0x5a));
        disk.dev.flush().unwrap();
        drop(disk);
        assert!(!overlay.exists(), "throwaway overlay removed at exit");
        assert!(std::fs::read(&base).unwrap().iter().all(|&x| x == 0x5a));
    }

    #[test]
    fn keep_overlay_keeps_the_written_overlay_for_qemu_img() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.raw");
        std::fs::write(&base, vec![7; 1 << 20]).unwrap();
        let kept = dir.path().join("kept.qcow2");
        let mut args = ServeArgs::with_defaults(base.clone(), dir.path().join("s"));
        args.snapshot = true;
        args.keep_overlay = Some(kept.clone());
        let disk = open_disk(&args).unwrap();
        assert!(
            dir.path().join("s.journal").is_file(),
            "a kept overlay has a crash journal"
        );
        disk.dev.write_at(&[9; 512], 0).unwrap();
        drop(disk);
        let reopened = qcow_snapshot::open_image(&kept, None, true).unwrap();
        let mut b = [0u8; 1024];
        reopened.read_at(&mut b, 0).unwrap();
        assert!(b[..512].iter().all(|&x| x == 9));
        assert!(b[512..].iter().all(|&x| x == 7));
        assert!(std::fs::read(&base).unwrap().iter().all(|&x| x == 7));
    }

    /// A qcow2 image made with `opts` in `dir`, opened as a chain's top and set up for
    /// `--direct mode`.
    fn top_set_up(
        dir: &std::path::Path,
        opts: &CreateOptions,
        mode: DirectMode,
    ) -> (crate::snapshot::Chain, Arc<qcow_snapshot::QcowImage>) {
        let img = dir.join(format!("{}-{mode:?}.qcow2", opts.extended_l2));
        qcow_snapshot::create(&img, opts).unwrap();
        let chain = crate::snapshot::Chain::open(
            &img,
            Some(Format::Qcow2),
            false,
            &qcow_snapshot::BackingPolicy::default(),
        )
        .unwrap();
        set_up_direct(&chain, &img, mode);
        let top = chain.top_qcow().unwrap();
        (chain, top)
    }

    #[test]
    fn auto_direct_puts_an_extended_l2_top_below_the_page_cache_and_a_standard_one_above() {
        let dir = tempfile::tempdir().unwrap();
        let direct_ok = {
            let probe = dir.path().join("probe");
            let f = std::fs::File::create(&probe).unwrap();
            qcow_snapshot::direct::set_o_direct(&f, true).is_ok()
        };
        for (extended_l2, mode, below) in [
            (true, DirectMode::Auto, true),
            (false, DirectMode::Auto, false),
            (false, DirectMode::On, true),
            (true, DirectMode::Large, false),
            (true, DirectMode::Off, false),
        ] {
            let opts = CreateOptions {
                size: 4 << 20,
                extended_l2,
                ..CreateOptions::default()
            };
            let (_chain, top) = top_set_up(dir.path(), &opts, mode);
            assert_eq!(
                top.page_cached(),
                !(below && direct_ok),
                "extended_l2={extended_l2} {mode:?}"
            );
        }
    }

    #[test]
    fn copy_on_write_fills_read_a_raw_base_directly_unless_direct_is_off_or_l2_is_extended() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.raw");
        std::fs::write(&base, vec![0x5a; 1 << 20]).unwrap();
        let direct_ok = std::fs::File::open(&base)
            .is_ok_and(|f| qcow_snapshot::direct::reopen_direct(&f, false).is_ok());
        for (extended_l2, mode, direct_fills) in [
            (false, DirectMode::Auto, true),
            (false, DirectMode::On, true),
            (false, DirectMode::Off, false),
            (true, DirectMode::Auto, false),
        ] {
            let opts = CreateOptions {
                size: 1 << 20,
                extended_l2,
                backing: Some((base.to_str().unwrap().to_string(), Format::Raw)),
                ..CreateOptions::default()
            };
            let (_chain, top) = top_set_up(dir.path(), &opts, mode);
            // A batch of two first writes of 512 bytes (copy-on-write in either kind of image).
            let w = [7u8; 512];
            for r in top.write_batch(&[(&w[..], 0), (&w[..], 65536 + 512)]) {
                r.unwrap();
            }
            assert_eq!(
                top.backing_ring_reads() > 0,
                direct_fills && direct_ok,
                "extended_l2={extended_l2} {mode:?}"
            );
            let mut b = [0u8; 1024];
            top.read_at(&mut b, 65536).unwrap();
            assert!(b[..512].iter().all(|&x| x == 0x5a) && b[512..].iter().all(|&x| x == 7));
        }
    }

    /// Pages of `file` the host page cache holds, if the kernel can tell (`cachestat`).
    fn cached_pages(file: &std::fs::File) -> Option<u64> {
        let len = file.metadata().unwrap().len();
        let mut n = 0;
        for off in (0..len).step_by(4096) {
            n += u64::from(blockdev::page_cache_holds(file, off, 4096)?);
        }
        Some(n)
    }

    #[test]
    fn a_large_guest_rewrite_of_a_standard_l2_overlay_leaves_the_host_page_cache_by_default() {
        // `--direct auto` (`large` for standard L2 entries), the whole served stack: a
        // background writeback's rewrite in place stays in the host page cache; a 1 MiB guest
        // write, which bypasses the folio cache, rewrites the same clusters with O_DIRECT, so
        // the pages the writeback left are dropped.
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("ovl.qcow2");
        let opts = CreateOptions {
            size: 4 << 20,
            ..CreateOptions::default()
        };
        qcow_snapshot::create(&img, &opts).unwrap();
        let probe = std::fs::File::create(dir.path().join("probe")).unwrap();
        if qcow_snapshot::direct::reopen_direct(&probe, true).is_err() {
            eprintln!("no O_DIRECT on this file system: nothing to check");
            return;
        }
        let mut args = ServeArgs::with_defaults(img.clone(), dir.path().join("s"));
        // The cache's write-back on top (the crash journal's would be a flush).
        args.crash_journal = Some("none".into());
        let disk = open_disk(&args).unwrap();
        let mib = vec![1u8; 1 << 20];
        disk.dev.write_at(&mib, 1 << 20).unwrap();
        disk.dev.flush().unwrap();
        for i in 0..256u64 {
            disk.dev
                .write_at(&[2u8; 4096], (1 << 20) + i * 4096)
                .unwrap();
        }
        // Written back as the crash journal's trims do (a FLUSH's own writeback goes direct).
        disk.dev.write_back().unwrap();
        disk.dev.flush().unwrap();
        let file = std::fs::File::open(&img).unwrap();
        let Some(before) = cached_pages(&file) else {
            eprintln!("no cachestat on this kernel: nothing to check");
            return;
        };
        assert!(
            before >= 256,
            "the writeback's rewrite left {before} cached pages"
        );
        // Page-aligned, as the request buffer a guest's write is copied into.
        let mut big = blockdev::AlignedBuf::zeroed(1 << 20);
        big.fill(3);
        disk.dev.write_at(&big, 1 << 20).unwrap();
        disk.dev.flush().unwrap();
        let after = cached_pages(&file).unwrap();
        assert!(
            after + 256 <= before,
            "the guest's large rewrite went through the page cache: {before} -> {after} pages"
        );
        let mut back = vec![0u8; 1 << 20];
        disk.dev.read_at(&mut back, 1 << 20).unwrap();
        assert!(back.iter().all(|&b| b == 3));
        drop(disk);
        let reopened = qcow_snapshot::open_qcow2_with(&img, true, &Default::default()).unwrap();
        reopened.read_at(&mut back, 1 << 20).unwrap();
        assert!(
            back.iter().all(|&b| b == 3),
            "the image file holds other bytes"
        );
    }

    #[test]
    fn keep_overlay_never_overwrites_an_existing_file() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.raw");
        std::fs::write(&base, vec![7; 1 << 20]).unwrap();
        let kept = dir.path().join("kept.qcow2");
        std::fs::write(&kept, b"an earlier session's overlay").unwrap();
        let mut args = ServeArgs::with_defaults(base, "unused".into());
        args.snapshot = true;
        args.keep_overlay = Some(kept.clone());
        let err = open_disk(&args).unwrap_err();
        assert!(err.to_string().contains("already exists"), "{err}");
        assert_eq!(
            std::fs::read(&kept).unwrap(),
            b"an earlier session's overlay"
        );
    }
}
