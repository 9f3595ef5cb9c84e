//! Path-level image operations for the CLI: opening an image with its backing chain, `info`,
//! `commit`, `export`, `checksum` and snapshot overlays.
//!
//! Backing chains: the backing format comes from the header extension; without it the backing
//! file is opened as raw unless the [`BackingPolicy`] says to probe. Which files a chain may
//! name at all is the policy's decision (see [`crate::policy`]). Relative backing names
//! are resolved against the directory of the image that names them. Backing files are opened
//! read-only, the chain depth is bounded and a file (by device and inode) may appear only once.
//!
//! Locking model: none here; each opened image does its own locking.

use std::fmt;
use std::fs::File;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use blockdev::{BlockDev, RawFile};
use sha2::{Digest, Sha256};

use crate::create::{create, CreateOptions};
use crate::error::{ImageOpError, OpenImageError};
use crate::format::{self, CompressionType};
use crate::host::{FileHost, HostFile};
use crate::image::{ImageHeader, Mapping, QcowImage};
use crate::policy::BackingPolicy;

/// Longest backing chain (images below the top one).
pub const MAX_CHAIN_DEPTH: usize = 16;

/// Chunk size of the copy loops.
const CHUNK: u64 = 1 << 20;

/// An image format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Plain bytes.
    Raw,
    /// qcow2.
    Qcow2,
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
        })
    }
}

impl FromStr for Format {
    type Err = OpenImageError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "raw" => Ok(Format::Raw),
            "qcow2" => Ok(Format::Qcow2),
            other => Err(OpenImageError::BackingFormat(other.to_string())),
        }
    }
}

fn open_err(path: &Path) -> impl FnOnce(io::Error) -> OpenImageError + '_ {
    move |source| OpenImageError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// How many leading bytes of a file [`probe_bytes`] looks at (QEMU's probe buffer is one
/// 512-byte sector too).
pub const PROBE_LEN: usize = 512;

/// The format the first bytes of a file (up to [`PROBE_LEN`]) probe as: qcow2 if they start with
/// the qcow2 magic, raw otherwise. The single probing rule: `probe_format` and the probed-raw
/// write guard of `serve` both use it.
pub fn probe_bytes(head: &[u8]) -> Format {
    match head.get(..4) {
        Some(m) if u32::from_be_bytes([m[0], m[1], m[2], m[3]]) == format::QCOW_MAGIC => {
            Format::Qcow2
        }
        _ => Format::Raw,
    }
}

/// Whether `file` starts with the qcow2 magic.
fn has_qcow2_magic(file: &File) -> io::Result<bool> {
    Ok(probe_head(file)? == Format::Qcow2)
}

fn probe_head(file: &File) -> io::Result<Format> {
    let mut head = [0u8; PROBE_LEN];
    let len = blockdev::file_size(file)?.min(PROBE_LEN as u64) as usize;
    blockdev::read_full_at(file, &mut head[..len], 0)?;
    Ok(probe_bytes(&head[..len]))
}

/// The format of the file at `path`: qcow2 if it has the qcow2 magic, raw otherwise.
pub fn probe_format(path: &Path) -> Result<Format, OpenImageError> {
    let f = File::open(path).map_err(open_err(path))?;
    probe_head(&f).map_err(open_err(path))
}

/// Resolves a backing file name stored in `image` (relative to the image's directory).
pub fn resolve_backing_path(image: &Path, name: &str) -> PathBuf {
    let p = Path::new(name);
    if p.is_absolute() {
        return p.to_path_buf();
    }
    match image.parent() {
        Some(dir) => dir.join(p),
        None => p.to_path_buf(),
    }
}

/// Opens an image (raw or qcow2, probing only for the qcow2 magic when `format` is `None`)
/// with its whole backing chain.
pub fn open_image(
    path: &Path,
    format: Option<Format>,
    read_only: bool,
) -> Result<Arc<dyn BlockDev>, OpenImageError> {
    open_image_with(path, format, read_only, &BackingPolicy::default())
}

/// [`open_image`] with an explicit backing-file policy (`serve --allow-backing` and friends).
pub fn open_image_with(
    path: &Path,
    format: Option<Format>,
    read_only: bool,
    policy: &BackingPolicy,
) -> Result<Arc<dyn BlockDev>, OpenImageError> {
    let mut seen = Vec::new();
    open_chain(path, path, format, read_only, 0, &mut seen, policy)
}

/// Opens a qcow2 image as a [`QcowImage`] (with its backing chain).
pub fn open_qcow2(path: &Path, read_only: bool) -> Result<QcowImage, OpenImageError> {
    let mut seen = Vec::new();
    let policy = BackingPolicy::default();
    open_qcow2_in_chain(path, path, read_only, 0, &mut seen, &policy)
}

/// Opens one file of a chain: `path` is its name (for resolving relative backing names and for
/// messages), `open_as` the path that opens it (a policy-checked `/proc/self/fd/N` for backing
/// files).
fn open_chain(
    path: &Path,
    open_as: &Path,
    format: Option<Format>,
    read_only: bool,
    depth: usize,
    seen: &mut Vec<(u64, u64)>,
    policy: &BackingPolicy,
) -> Result<Arc<dyn BlockDev>, OpenImageError> {
    let fmt = match format {
        Some(f) => f,
        None => probe_format(open_as).map_err(|e| rename_io(e, path))?,
    };
    match fmt {
        Format::Raw => {
            check_chain(open_as, depth, seen).map_err(|e| rename_io(e, path))?;
            Ok(Arc::new(
                RawFile::open(open_as, read_only).map_err(open_err(path))?,
            ))
        }
        Format::Qcow2 => Ok(Arc::new(open_qcow2_in_chain(
            path, open_as, read_only, depth, seen, policy,
        )?)),
    }
}

/// Names `path` (not the `/proc/self/fd` path it was opened by) in a file error.
fn rename_io(e: OpenImageError, path: &Path) -> OpenImageError {
    match e {
        OpenImageError::Io { source, .. } => OpenImageError::Io {
            path: path.to_path_buf(),
            source,
        },
        OpenImageError::BackingLoop(_) => OpenImageError::BackingLoop(path.to_path_buf()),
        e => e,
    }
}

fn check_chain(
    path: &Path,
    depth: usize,
    seen: &mut Vec<(u64, u64)>,
) -> Result<(), OpenImageError> {
    if depth > MAX_CHAIN_DEPTH {
        return Err(OpenImageError::ChainTooDeep(MAX_CHAIN_DEPTH));
    }
    let md = std::fs::metadata(path).map_err(open_err(path))?;
    let id = (md.dev(), md.ino());
    if seen.contains(&id) {
        return Err(OpenImageError::BackingLoop(path.to_path_buf()));
    }
    seen.push(id);
    Ok(())
}

fn open_qcow2_in_chain(
    path: &Path,
    open_as: &Path,
    read_only: bool,
    depth: usize,
    seen: &mut Vec<(u64, u64)>,
    policy: &BackingPolicy,
) -> Result<QcowImage, OpenImageError> {
    check_chain(open_as, depth, seen).map_err(|e| rename_io(e, path))?;
    let file = blockdev::open_file(open_as, read_only).map_err(open_err(path))?;
    let host = FileHost::new(file);
    let ih = ImageHeader::read(&host)?;
    ih.check_features(read_only)?;
    let backing = match &ih.backing {
        None => None,
        Some(spec) => {
            let bpath = resolve_backing_path(path, &spec.name);
            // The policy decides which files a chain may name (see `policy`); a format the
            // overlay does not record is raw unless the user asked for probing.
            let admitted = policy.admit(&bpath)?;
            let bfmt = match &spec.format {
                Some(f) => Some(f.parse::<Format>()?),
                None => policy.unrecorded_format(),
            };
            let open_as = admitted.open_path();
            Some(open_chain(
                &bpath,
                &open_as,
                bfmt,
                true,
                depth + 1,
                seen,
                policy,
            )?)
        }
    };
    QcowImage::open_with(Box::new(host), read_only, backing)
}

/// What `info` reports about an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    /// The path given.
    pub path: PathBuf,
    /// Detected format.
    pub format: Format,
    /// Virtual disk size.
    pub virtual_size: u64,
    /// Space allocated on the host file system.
    pub disk_size: u64,
    /// Length of the file.
    pub file_length: u64,
    /// qcow2: cluster size.
    pub cluster_size: Option<u64>,
    /// qcow2: backing file name as stored.
    pub backing_file: Option<String>,
    /// qcow2: backing format from the extension.
    pub backing_format: Option<String>,
    /// qcow2: version (2 or 3).
    pub version: Option<u32>,
    /// qcow2: dirty bit.
    pub dirty: bool,
    /// qcow2: corrupt bit.
    pub corrupt: bool,
    /// qcow2: refcount width.
    pub refcount_bits: Option<u64>,
    /// qcow2: compression type.
    pub compression_type: Option<CompressionType>,
    /// qcow2: lazy refcounts compatible bit.
    pub lazy_refcounts: bool,
    /// qcow2: number of internal snapshots.
    pub snapshots: u32,
}

fn human(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else if v.fract() == 0.0 {
        format!("{v:.0} {}", UNITS[u])
    } else {
        format!("{v:.3} {}", UNITS[u]).replace(".000", "")
    }
}

impl fmt::Display for ImageInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "image: {}", self.path.display())?;
        writeln!(f, "file format: {}", self.format)?;
        writeln!(
            f,
            "virtual size: {} ({} bytes)",
            human(self.virtual_size),
            self.virtual_size
        )?;
        writeln!(f, "disk size: {}", human(self.disk_size))?;
        if let Some(cs) = self.cluster_size {
            writeln!(f, "cluster_size: {cs}")?;
        }
        if let Some(b) = &self.backing_file {
            writeln!(f, "backing file: {b}")?;
        }
        if let Some(b) = &self.backing_format {
            writeln!(f, "backing file format: {b}")?;
        }
        if self.format == Format::Qcow2 {
            writeln!(f, "Format specific information:")?;
            let compat = if self.version == Some(2) {
                "0.10"
            } else {
                "1.1"
            };
            writeln!(f, "    compat: {compat}")?;
            if let Some(c) = self.compression_type {
                writeln!(f, "    compression type: {c}")?;
            }
            writeln!(f, "    lazy refcounts: {}", self.lazy_refcounts)?;
            if let Some(r) = self.refcount_bits {
                writeln!(f, "    refcount bits: {r}")?;
            }
            writeln!(f, "    corrupt: {}", self.corrupt)?;
            writeln!(f, "    dirty: {}", self.dirty)?;
            writeln!(f, "    snapshots: {}", self.snapshots)?;
        }
        Ok(())
    }
}

/// Describes an image without opening its backing chain.
pub fn info(path: &Path) -> Result<ImageInfo, OpenImageError> {
    let file = File::open(path).map_err(open_err(path))?;
    let md = file.metadata().map_err(open_err(path))?;
    let file_length = blockdev::file_size(&file).map_err(open_err(path))?;
    let disk_size = md.blocks() * 512;
    if !has_qcow2_magic(&file).map_err(open_err(path))? {
        return Ok(ImageInfo {
            path: path.to_path_buf(),
            format: Format::Raw,
            virtual_size: file_length,
            disk_size,
            file_length,
            cluster_size: None,
            backing_file: None,
            backing_format: None,
            version: None,
            dirty: false,
            corrupt: false,
            refcount_bits: None,
            compression_type: None,
            lazy_refcounts: false,
            snapshots: 0,
        });
    }
    let host = FileHost::new(file);
    let ih = ImageHeader::read(&host)?;
    let h = &ih.header;
    Ok(ImageInfo {
        path: path.to_path_buf(),
        format: Format::Qcow2,
        virtual_size: h.size,
        disk_size,
        file_length,
        cluster_size: Some(h.geometry().cluster_size()),
        backing_file: ih.backing.as_ref().map(|b| b.name.clone()),
        backing_format: ih.backing.as_ref().and_then(|b| b.format.clone()),
        version: Some(h.version),
        dirty: h.incompatible_features & format::incompat::DIRTY != 0,
        corrupt: h.incompatible_features & format::incompat::CORRUPT != 0,
        refcount_bits: Some(h.geometry().refcount_bits()),
        compression_type: h.compression().ok(),
        lazy_refcounts: h.compatible_features & format::compat::LAZY_REFCOUNTS != 0,
        snapshots: h.nb_snapshots,
    })
}

/// Writes the overlay's allocated data and zeroed ranges into its backing file (growing a raw
/// backing file if it is smaller), flushes the backing file, then empties the overlay, like
/// `qemu-img commit`.
pub fn commit(overlay: &Path, progress: &mut dyn FnMut(u64, u64)) -> Result<(), ImageOpError> {
    let file = blockdev::open_file(overlay, false).map_err(open_err(overlay))?;
    let host = FileHost::new(file);
    let ih = ImageHeader::read(&host).map_err(ImageOpError::Open)?;
    let spec = ih.backing.clone().ok_or_else(|| {
        ImageOpError::Invalid(format!("{} has no backing file", overlay.display()))
    })?;
    let bpath = resolve_backing_path(overlay, &spec.name);
    let policy = BackingPolicy::default();
    let admitted = policy.admit(&bpath)?;
    let open_as = admitted.open_path();
    // Never guess the format of the file about to be written: raw data written into a qcow2
    // (or the reverse) would destroy it.
    let bfmt = match &spec.format {
        Some(f) => f.parse::<Format>()?,
        None => {
            return Err(ImageOpError::Invalid(format!(
                "{} does not record the format of its backing file {}; record it first \
                 (qemu-img rebase -u -F raw|qcow2 -b {} {})",
                overlay.display(),
                bpath.display(),
                spec.name,
                overlay.display()
            )))
        }
    };
    let size = ih.header.size;
    if bfmt == Format::Raw {
        let f = blockdev::open_file(&open_as, false).map_err(open_err(&bpath))?;
        let len = blockdev::file_size(&f).map_err(open_err(&bpath))?;
        if len < size {
            f.set_len(size).map_err(|source| ImageOpError::Io {
                path: bpath.clone(),
                source,
            })?;
        }
    }
    let mut seen = Vec::new();
    check_chain(overlay, 0, &mut seen)?;
    let backing = open_chain(&bpath, &open_as, Some(bfmt), false, 1, &mut seen, &policy)?;
    if backing.size() < size {
        return Err(ImageOpError::Invalid(format!(
            "backing image {} ({} bytes) is smaller than the overlay ({size} bytes)",
            bpath.display(),
            backing.size()
        )));
    }
    let img = QcowImage::open_with(Box::new(host), false, Some(backing.clone()))?;
    let mut buf = vec![0u8; CHUNK as usize];
    let mut pos = 0;
    while pos < size {
        let n = (size - pos).min(64 * CHUNK);
        for e in img.map(pos, n)? {
            match e.mapping {
                Mapping::Unallocated => {}
                Mapping::Zero => backing.write_zeroes(e.offset, e.len, false)?,
                Mapping::Data(_) | Mapping::Compressed(_) => {
                    let mut done = 0;
                    while done < e.len {
                        let k = (e.len - done).min(CHUNK) as usize;
                        img.read_at(&mut buf[..k], e.offset + done)?;
                        backing.write_at(&buf[..k], e.offset + done)?;
                        done += k as u64;
                    }
                }
            }
        }
        pos += n;
        progress(pos, size * 2);
    }
    backing.flush()?;
    img.make_empty(&mut |d, t| progress(size + d * size / t.max(1), size * 2))?;
    img.close()?;
    progress(size * 2, size * 2);
    Ok(())
}

/// Writes the guest-visible bytes of `image` to a new raw file, leaving zero ranges sparse.
pub fn export(
    image: &Path,
    out_raw: &Path,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<(), ImageOpError> {
    let dev = open_image(image, None, true)?;
    let size = dev.size();
    let out_err = |source| ImageOpError::Io {
        path: out_raw.to_path_buf(),
        source,
    };
    let out = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(out_raw)
        .map_err(out_err)?;
    out.set_len(size).map_err(out_err)?;
    let mut buf = vec![0u8; CHUNK as usize];
    let mut pos = 0;
    while pos < size {
        let n = (size - pos).min(CHUNK) as usize;
        dev.read_at(&mut buf[..n], pos)?;
        if buf[..n].iter().any(|&b| b != 0) {
            std::os::unix::fs::FileExt::write_all_at(&out, &buf[..n], pos).map_err(out_err)?;
        }
        pos += n as u64;
        progress(pos, size);
    }
    out.sync_all().map_err(out_err)?;
    Ok(())
}

/// SHA-256 (lower-case hex) of the guest-visible content of `image` (any format or chain).
pub fn checksum(image: &Path, progress: &mut dyn FnMut(u64, u64)) -> Result<String, ImageOpError> {
    let dev = open_image(image, None, true)?;
    checksum_dev(&*dev, progress)
}

/// SHA-256 (lower-case hex) of a block device's content.
pub fn checksum_dev(
    dev: &dyn BlockDev,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<String, ImageOpError> {
    let size = dev.size();
    let mut h = Sha256::new();
    let mut buf = vec![0u8; CHUNK as usize];
    let mut pos = 0;
    while pos < size {
        let n = (size - pos).min(CHUNK) as usize;
        dev.read_at(&mut buf[..n], pos)?;
        h.update(&buf[..n]);
        pos += n as u64;
        progress(pos, size);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// Creates a fresh qcow2 overlay over `base` in `dir` (for `serve --snapshot`) and returns its
/// path. The overlay names `base` by absolute path; the caller deletes it when done.
pub fn create_snapshot_overlay(
    base: &Path,
    base_format: Format,
    dir: &Path,
) -> Result<PathBuf, ImageOpError> {
    let abs = std::fs::canonicalize(base).map_err(|source| ImageOpError::Io {
        path: base.to_path_buf(),
        source,
    })?;
    let name = abs
        .to_str()
        .ok_or_else(|| ImageOpError::Invalid(format!("{} is not valid UTF-8", abs.display())))?
        .to_string();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    for attempt in 0..100u32 {
        let path = dir.join(format!(
            "snapblk-snapshot-{}-{nanos:09}-{attempt}.qcow2",
            std::process::id()
        ));
        // Reserve the name atomically so two daemons never share an overlay.
        // Owner-only: the overlay holds the guest's data and lives in a shared directory.
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
        {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(source) => return Err(ImageOpError::Io { path, source }),
        }
        // Extended L2 entries: a first write allocates only the subclusters it touches instead
        // of copying the rest of its cluster from the base (COW first writes of 4 KiB into a
        // fresh 64 KiB-cluster overlay measured about 29x faster). The overlay never outlives
        // the daemon, so compatibility with QEMU before 5.2 does not matter.
        let opts = CreateOptions {
            backing: Some((name, base_format)),
            extended_l2: true,
            ..CreateOptions::default()
        };
        if let Err(e) = create(&path, &opts) {
            let _ = std::fs::remove_file(&path);
            return Err(e.into());
        }
        return Ok(path);
    }
    Err(ImageOpError::Invalid(format!(
        "cannot find a free overlay name in {}",
        dir.display()
    )))
}

/// Reads the header of a qcow2 image file (no backing chain).
pub fn read_header(path: &Path) -> Result<ImageHeader, OpenImageError> {
    let file = File::open(path).map_err(open_err(path))?;
    ImageHeader::read(&FileHost::new(file) as &dyn HostFile)
}
