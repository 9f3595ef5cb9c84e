//! The overlays under test (qcow2 over raw or qcow2 bases, in memory) and the referees that
//! reopen a crash state and check it (snapblk's checker, qemu-img).

use super::*;
use std::io;
use std::path::Path;
use std::sync::Arc;

use blockdev::BlockDev;
use qcow_snapshot::{HostFile, QcowImage};
use rand::rngs::StdRng;
use rand::{Rng, RngCore};

/// What the overlay under test sits on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BaseKind {
    /// No backing file: unallocated clusters read as zeros.
    None,
    /// A raw backing file with random content.
    Raw,
    /// A qcow2 backing file with random content, zero and unallocated clusters.
    Qcow2,
}

/// A fresh qcow2 overlay (in memory) over a backing device, ready to be opened many times.
pub struct Overlay {
    /// The backing kind.
    pub kind: BaseKind,
    /// Virtual disk size.
    pub disk_size: u64,
    /// Cluster size of the overlay.
    pub cluster_size: u64,
    /// The backing device handed to the engine (read-only).
    pub backing: Option<Arc<dyn BlockDev>>,
    /// What the guest sees before the first write (the backing content, or zeros).
    pub guest_initial: Vec<u8>,
    /// The bytes of the newly created overlay file.
    pub fresh: Vec<u8>,
}

impl std::fmt::Debug for Overlay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Overlay")
            .field("kind", &self.kind)
            .field("disk_size", &self.disk_size)
            .field("cluster_size", &self.cluster_size)
            .finish()
    }
}

/// Why an overlay scenario could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildOverlayError {
    /// Creating an image failed.
    #[error("creating an image failed: {0}")]
    Create(#[from] qcow_snapshot::CreateImageError),
    /// Opening an image failed.
    #[error("opening an image failed: {0}")]
    Open(#[from] qcow_snapshot::OpenImageError),
    /// An I/O on the base failed.
    #[error("base image I/O failed: {0}")]
    Block(#[from] blockdev::BlockError),
    /// Writing the base file failed.
    #[error("writing the base file failed: {0}")]
    Io(#[from] io::Error),
}

impl Overlay {
    /// Builds a base of `kind` (also written into `dir`, so `qemu-img` can find it) and a fresh
    /// overlay of `disk_size` bytes with `cluster_size` clusters over it (with extended L2
    /// entries, i.e. subclusters, when `extended_l2`).
    pub fn build(
        dir: &Path,
        kind: BaseKind,
        disk_size: u64,
        cluster_size: u64,
        refcount_order: u32,
        extended_l2: bool,
        rng: &mut StdRng,
    ) -> Result<Overlay, BuildOverlayError> {
        let mut content = vec![0u8; disk_size as usize];
        let (backing, backing_opt): (Option<Arc<dyn BlockDev>>, _) = match kind {
            BaseKind::None => (None, None),
            BaseKind::Raw => {
                rng.fill_bytes(&mut content);
                // Some zero runs, so "zeros" is not always a wrong answer.
                for chunk in content.chunks_mut(8192) {
                    if rng.random_bool(0.15) {
                        chunk.fill(0);
                    }
                }
                let path = dir.join("base.raw");
                std::fs::write(&path, &content)?;
                let dev: Arc<dyn BlockDev> = Arc::new(blockdev::MemDisk::from_vec(content.clone()));
                (
                    Some(dev),
                    Some((path.display().to_string(), qcow_snapshot::Format::Raw)),
                )
            }
            BaseKind::Qcow2 => {
                let host = Arc::new(qcow_snapshot::MemHost::default());
                let opts = qcow_snapshot::CreateOptions {
                    size: disk_size,
                    cluster_size: 4096,
                    ..Default::default()
                };
                qcow_snapshot::create_on(&*host, &opts)?;
                {
                    let img =
                        QcowImage::open_with(Box::new(SharedMem(Arc::clone(&host))), false, None)?;
                    let mut buf = vec![0u8; 4096];
                    for off in (0..disk_size).step_by(4096) {
                        match rng.random_range(0..10) {
                            0..=5 => {
                                rng.fill_bytes(&mut buf);
                                img.write_at(&buf, off)?;
                            }
                            6 => img.write_zeroes(off, 4096, true)?,
                            _ => {}
                        }
                    }
                    img.close()?;
                }
                let bytes = host.contents();
                let path = dir.join("base.qcow2");
                std::fs::write(&path, &bytes)?;
                let img =
                    QcowImage::open_with(Box::new(qcow_snapshot::MemHost::new(bytes)), true, None)?;
                read_all(&img, &mut content)?;
                let dev: Arc<dyn BlockDev> = Arc::new(img);
                (
                    Some(dev),
                    Some((path.display().to_string(), qcow_snapshot::Format::Qcow2)),
                )
            }
        };
        let host = qcow_snapshot::MemHost::default();
        let opts = qcow_snapshot::CreateOptions {
            size: disk_size,
            cluster_size,
            backing: backing_opt,
            refcount_order,
            extended_l2,
        };
        qcow_snapshot::create_on(&host, &opts)?;
        Ok(Overlay {
            kind,
            disk_size,
            cluster_size,
            backing,
            guest_initial: content,
            fresh: host.contents(),
        })
    }

    /// Opens the overlay stored in `host` read-write over this scenario's backing device.
    pub fn open(
        &self,
        host: Box<dyn HostFile>,
    ) -> Result<QcowImage, qcow_snapshot::OpenImageError> {
        QcowImage::open_with(host, false, self.backing.clone())
    }
}

/// A [`qcow_snapshot::MemHost`] shared with the test, so its bytes can be read after the engine
/// took ownership of the handle.
#[derive(Debug, Clone)]
pub struct SharedMem(pub Arc<qcow_snapshot::MemHost>);

impl HostFile for SharedMem {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.0.read_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.0.write_at(buf, offset)
    }

    fn sync_data(&self) -> io::Result<()> {
        self.0.sync_data()
    }

    fn len(&self) -> io::Result<u64> {
        self.0.len()
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }
}

/// Judges recovered images: the in-process checker on every one, `qemu-img check` on a sample,
/// then the engine's own recovery (dirty-bit repair) and a byte comparison against the
/// expectation, then both checkers again on the repaired and cleanly closed image.
#[derive(Debug)]
pub struct Referee {
    path: std::path::PathBuf,
    /// Run `qemu-img check` on every `qemu_every`-th judged image (0: never).
    pub qemu_every: usize,
    /// Images judged.
    pub judged: usize,
    /// `qemu-img check` runs.
    pub qemu_runs: usize,
    /// Judged images that needed a leak repair (checker exit 3 before reopening).
    pub leaky: usize,
    have_qemu: bool,
}

impl Referee {
    /// A referee writing its scratch image into `dir`.
    pub fn new(dir: &Path, qemu_every: usize) -> Referee {
        Referee {
            path: dir.join("state.qcow2"),
            qemu_every,
            judged: 0,
            qemu_runs: 0,
            leaky: 0,
            have_qemu: have_qemu_img(),
        }
    }

    fn checkers(
        &mut self,
        bytes: &[u8],
        allowed: &[i32],
        qemu: bool,
        stage: &str,
    ) -> Result<i32, String> {
        std::fs::write(&self.path, bytes).map_err(|e| format!("writing the state file: {e}"))?;
        let code = match snapblk_check(&self.path) {
            Ok((code, _)) if allowed.contains(&code) => code,
            Ok((code, text)) => {
                return Err(format!(
                    "{stage}: snapblk check exit {code} (allowed {allowed:?}):\n{text}"
                ));
            }
            Err(e) => return Err(format!("{stage}: snapblk check could not run: {e}")),
        };
        if qemu {
            self.qemu_runs += 1;
            let (qcode, text) = qemu_img_check(&self.path)
                .map_err(|e| format!("{stage}: running qemu-img: {e}"))?;
            if !allowed.contains(&qcode) {
                return Err(format!(
                    "{stage}: qemu-img check exit {qcode} (allowed {allowed:?}):\n{text}"
                ));
            }
            if qcode != code {
                return Err(format!(
                    "{stage}: snapblk check (exit {code}) and qemu-img check (exit {qcode}) disagree:\n{text}"
                ));
            }
        }
        Ok(code)
    }

    /// Judges one recovered image file `bytes` of overlay `ov` against `exp`. With
    /// `SNAPBLK_CRASH_DUMP=DIR` set, a failing image is saved there for inspection.
    pub fn judge(&mut self, ov: &Overlay, bytes: &[u8], exp: &Expectation) -> Result<(), String> {
        let r = self.judge_inner(ov, bytes, exp);
        if let (Err(e), Some(dir)) = (&r, std::env::var_os("SNAPBLK_CRASH_DUMP")) {
            let path = Path::new(&dir).join(format!(
                "failed-{}-{}.qcow2",
                std::process::id(),
                self.judged
            ));
            if std::fs::write(&path, bytes).is_ok() {
                return Err(format!("{e}\n(image saved as {})", path.display()));
            }
        }
        r
    }

    fn judge_inner(&mut self, ov: &Overlay, bytes: &[u8], exp: &Expectation) -> Result<(), String> {
        self.judged += 1;
        let qemu = self.have_qemu
            && self.qemu_every > 0
            && self.judged % self.qemu_every == 1 % self.qemu_every;
        let code = self.checkers(bytes, &[0, 3], qemu, "before recovery")?;
        if code == 3 {
            self.leaky += 1;
        }
        let rec = Recorder::new(bytes.to_vec());
        rec.set_recording(false);
        let img = ov
            .open(Box::new(rec.file()))
            .map_err(|e| format!("the engine cannot reopen the image: {e}"))?;
        let mut got = vec![0u8; ov.disk_size as usize];
        read_all(&img, &mut got).map_err(|e| format!("reading the recovered image failed: {e}"))?;
        exp.verify(&got)?;
        img.close()
            .map_err(|e| format!("closing the recovered image failed: {e}"))?;
        drop(img);
        self.checkers(&rec.current(), &[0], qemu, "after recovery and clean close")?;
        Ok(())
    }
}

/// Runs snapblk's own checker (`qcow_snapshot::check::check`) on `path`: exit code and report.
pub fn snapblk_check(path: &Path) -> Result<(i32, String), qcow_snapshot::check::CheckError> {
    let r = qcow_snapshot::check::check(path, None)?;
    let mut text = format!("{r}");
    for m in r.messages.iter().take(12) {
        text.push('\n');
        text.push_str(m);
    }
    if r.messages.len() > 12 {
        text.push_str(&format!("\n... {} more messages", r.messages.len() - 12));
    }
    Ok((r.exit_code(), text))
}
