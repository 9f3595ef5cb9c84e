//! `convert`: copies the guest-visible content of any image snapblk reads (raw, qcow2, any
//! backing chain) into a new standalone raw or qcow2 image, in the manner of `qemu-img convert`.
//!
//! - Zero clusters are never written: raw output stays sparse, qcow2 output leaves them
//!   unallocated (the output has no backing file, so they read as zeros).
//! - Uncompressed qcow2 output is written through the engine ([`QcowImage`]), so it gets the
//!   engine's allocation and write ordering (and subclusters with `extended_l2`).
//! - Compressed qcow2 output (`compress`) is laid out here, as QEMU lays it out: each non-zero
//!   cluster is compressed on its own (raw deflate with a 4 KiB window, or a zstd frame,
//!   per the header's compression type), packed byte after byte behind the previous one; a
//!   cluster that does not shrink below the cluster size is stored uncompressed. Compression
//!   runs on `threads` worker threads, batch by batch, while the output is written in guest
//!   order. The L2 tables and the L1 table follow the data, and the refcounts are built from
//!   the finished tables (see [`crate::refcount::rebuild_refcounts`]).
//! - The output never clobbers an input: a destination that is the source or any file of its
//!   backing chain (same device and inode), or that exists and is not a regular file, is
//!   refused; the image is written under a temporary name in the destination's directory,
//!   synced, and only then renamed over the destination.
//!
//! Locking model: the source is only read, the temporary output belongs to this function until
//! the rename; the worker threads share nothing but the read-only input batch and each returns
//! its own results (scoped threads).

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use blockdev::{BlockDev, BlockError};

use crate::api::{open_image, probe_format, read_header, resolve_backing_path, Format};
use crate::create::{create_on, CreateOptions};
use crate::error::{CreateImageError, OpenImageError};
use crate::format::{
    incompat, table_to_bytes, CompressedDescriptor, CompressionType, COMPRESSION_TYPE_OFFSET,
    INCOMPATIBLE_FEATURES_OFFSET, L2_BITMAP_ALL_ALLOC, OFLAG_COPIED,
};
use crate::host::{FileHost, HostFile};
use crate::image::{ImageHeader, QcowImage};
use crate::refcount::rebuild_refcounts;

/// Output format of [`convert`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputFormat {
    /// A raw file (sparse where the source reads zeros).
    Raw,
    /// A standalone qcow2 v3 image.
    Qcow2,
}

/// What [`convert`] writes.
#[derive(Debug, Clone)]
pub struct ConvertOptions {
    /// Format of the source (`None`: probe for the qcow2 magic, else raw).
    pub src_format: Option<Format>,
    /// Output format.
    pub output: OutputFormat,
    /// Write compressed clusters (qcow2 output only).
    pub compress: bool,
    /// Compression type of compressed output.
    pub compression_type: CompressionType,
    /// Cluster size of qcow2 output.
    pub cluster_size: u64,
    /// Extended L2 entries (subclusters) in qcow2 output.
    pub extended_l2: bool,
    /// Compression threads (0: one per available CPU).
    pub threads: usize,
}

impl Default for ConvertOptions {
    fn default() -> Self {
        ConvertOptions {
            src_format: None,
            output: OutputFormat::Qcow2,
            compress: false,
            compression_type: CompressionType::Zlib,
            cluster_size: CreateOptions::default().cluster_size,
            extended_l2: false,
            threads: 0,
        }
    }
}

/// Why a conversion failed (the destination is then left untouched).
#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    /// The source could not be opened.
    #[error(transparent)]
    Open(#[from] OpenImageError),
    /// The output image could not be created.
    #[error(transparent)]
    Create(#[from] CreateImageError),
    /// Reading the source or writing the output through the engine failed.
    #[error(transparent)]
    Block(#[from] BlockError),
    /// A file operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// The destination is an input of the conversion (or not a regular file).
    #[error("refusing to write {0}: {1}")]
    Refused(PathBuf, &'static str),
    /// Bad options.
    #[error("{0}")]
    Invalid(String),
}

/// Clusters compressed per batch and thread.
const CLUSTERS_PER_THREAD: usize = 32;
/// Bytes read per step for uncompressed output.
const CHUNK: u64 = 4 << 20;

fn io_at(path: &Path) -> impl Fn(io::Error) -> ConvertError + '_ {
    move |source| ConvertError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// (device, inode) of `src` and of every file of its backing chain.
pub fn chain_files(src: &Path, format: Option<Format>) -> Result<Vec<(u64, u64)>, ConvertError> {
    let mut ids = Vec::new();
    let mut path = src.to_path_buf();
    let mut fmt = format;
    loop {
        let md = std::fs::metadata(&path).map_err(io_at(&path))?;
        let id = (md.dev(), md.ino());
        if ids.contains(&id) || ids.len() > 64 {
            return Err(OpenImageError::BackingLoop(path).into());
        }
        ids.push(id);
        let f = match fmt {
            Some(f) => f,
            None => probe_format(&path)?,
        };
        if f == Format::Raw {
            return Ok(ids);
        }
        let ih = read_header(&path)?;
        let Some(spec) = ih.backing else {
            return Ok(ids);
        };
        if crate::nbd::is_nbd_name(&spec.name) {
            // An NBD export is no host file the destination could be.
            return Ok(ids);
        }
        fmt = match &spec.format {
            Some(f) => Some(f.parse::<Format>()?),
            None => None,
        };
        path = resolve_backing_path(&path, &spec.name);
    }
}

/// Refuses a destination that is an input or not a regular file.
fn check_destination(dst: &Path, inputs: &[(u64, u64)]) -> Result<(), ConvertError> {
    match std::fs::metadata(dst) {
        Ok(md) => {
            if inputs.contains(&(md.dev(), md.ino())) {
                return Err(ConvertError::Refused(
                    dst.to_path_buf(),
                    "it is the source image or a file of its backing chain",
                ));
            }
            if !md.file_type().is_file() {
                return Err(ConvertError::Refused(
                    dst.to_path_buf(),
                    "it exists and is not a regular file",
                ));
            }
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_at(dst)(e)),
    }
}

/// Converts `src` into a new image at `dst` (see the module docs). `progress(done, total)` is
/// called as guest bytes are processed.
pub fn convert(
    src: &Path,
    dst: &Path,
    opts: &ConvertOptions,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<(), ConvertError> {
    if opts.output == OutputFormat::Raw && (opts.compress || opts.extended_l2) {
        return Err(ConvertError::Invalid(
            "compression and extended_l2 need -O qcow2".into(),
        ));
    }
    let inputs = chain_files(src, opts.src_format)?;
    check_destination(dst, &inputs)?;
    let dev = open_image(src, opts.src_format, true)?;
    let name = dst
        .file_name()
        .ok_or_else(|| ConvertError::Invalid(format!("{}: not a file name", dst.display())))?;
    let tmp = dst.with_file_name(format!(
        ".{}.convert-{}.tmp",
        name.to_string_lossy(),
        std::process::id()
    ));
    let r = write_output(&*dev, &tmp, opts, progress).and_then(|()| {
        // The destination may have appeared meanwhile: check again right before the rename.
        check_destination(dst, &inputs)?;
        std::fs::rename(&tmp, dst).map_err(io_at(dst))?;
        let dir = dst.parent().filter(|p| !p.as_os_str().is_empty());
        if let Ok(d) = std::fs::File::open(dir.unwrap_or(Path::new("."))) {
            let _ = d.sync_all();
        }
        Ok(())
    });
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    r
}

fn write_output(
    dev: &dyn BlockDev,
    out: &Path,
    opts: &ConvertOptions,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<(), ConvertError> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(out)
        .map_err(io_at(out))?;
    match opts.output {
        OutputFormat::Raw => {
            let size = dev.size();
            file.set_len(size).map_err(io_at(out))?;
            copy_nonzero(dev, CHUNK, progress, &mut |buf, off| {
                file.write_all_at(buf, off).map_err(io_at(out))
            })?;
            file.sync_all().map_err(io_at(out))?;
            Ok(())
        }
        OutputFormat::Qcow2 => {
            let host = FileHost::new(file);
            let copts = CreateOptions {
                size: dev.size(),
                cluster_size: opts.cluster_size,
                extended_l2: opts.extended_l2,
                ..CreateOptions::default()
            };
            create_on(&host, &copts)?;
            if opts.compression_type == CompressionType::Zstd {
                set_compression_type(&host, opts.compression_type).map_err(io_at(out))?;
            }
            if opts.compress {
                write_compressed(dev, &host, opts, progress).map_err(|e| match e {
                    ConvertError::Io { source, .. } => io_at(out)(source),
                    other => other,
                })
            } else {
                let img = QcowImage::open_with(Box::new(host), false, None)?;
                let cs = opts.cluster_size;
                copy_nonzero(dev, CHUNK.max(cs), progress, &mut |buf, off| {
                    img.write_at(buf, off).map_err(ConvertError::from)
                })?;
                img.close()?;
                Ok(())
            }
        }
    }
}

/// Sets the compression type of a freshly created v3 image.
fn set_compression_type(host: &dyn HostFile, t: CompressionType) -> io::Result<()> {
    let ih = ImageHeader::read(host).map_err(io::Error::other)?;
    let mut feat = ih.header.incompatible_features;
    if t != CompressionType::Zlib {
        feat |= incompat::COMPRESSION_TYPE;
    }
    host.write_at(&[t.to_byte()], COMPRESSION_TYPE_OFFSET as u64)?;
    host.write_at(&feat.to_be_bytes(), INCOMPATIBLE_FEATURES_OFFSET as u64)?;
    host.sync_data()
}

/// Writes one run of non-zero bytes at a guest offset.
type WriteRun<'a> = dyn FnMut(&[u8], u64) -> Result<(), ConvertError> + 'a;

/// Reads the whole device in `chunk`-sized steps and hands every run of non-zero 4 KiB blocks
/// to `write` (zero runs are skipped).
fn copy_nonzero(
    dev: &dyn BlockDev,
    chunk: u64,
    progress: &mut dyn FnMut(u64, u64),
    write: &mut WriteRun<'_>,
) -> Result<(), ConvertError> {
    const BLOCK: usize = 4096;
    let size = dev.size();
    let mut buf = vec![0u8; chunk as usize];
    let mut pos = 0u64;
    while pos < size {
        let n = (size - pos).min(chunk) as usize;
        dev.read_at(&mut buf[..n], pos)?;
        let mut i = 0;
        while i < n {
            let nonzero = |k: usize| buf[k..(k + BLOCK).min(n)].iter().any(|&b| b != 0);
            if !nonzero(i) {
                i += BLOCK;
                continue;
            }
            let mut j = i + BLOCK;
            while j < n && nonzero(j) {
                j += BLOCK;
            }
            let j = j.min(n);
            write(&buf[i..j], pos + i as u64)?;
            i = j;
        }
        pos += n as u64;
        progress(pos, size);
    }
    Ok(())
}

/// One cluster of compressed output.
enum Packed {
    /// Reads as zeros: left unallocated.
    Zero,
    /// Compressed bytes.
    Compressed(Vec<u8>),
    /// Did not shrink: stored as a normal cluster.
    Raw,
}

/// Compresses one cluster (`data` is exactly one cluster) as QEMU does: the result must be
/// shorter than the cluster, else the cluster is stored uncompressed.
pub fn compress_cluster(t: CompressionType, data: &[u8]) -> Option<Vec<u8>> {
    let limit = data.len() - 1;
    match t {
        CompressionType::Zlib => {
            // Raw deflate with a 4 KiB window: QEMU inflates with windowBits -12.
            let mut c =
                flate2::Compress::new_with_window_bits(flate2::Compression::default(), false, 12);
            let mut out = Vec::with_capacity(limit);
            match c.compress_vec(data, &mut out, flate2::FlushCompress::Finish) {
                Ok(flate2::Status::StreamEnd) if out.len() <= limit => Some(out),
                _ => None,
            }
        }
        CompressionType::Zstd => {
            // One frame at libzstd's default level, as QEMU writes it.
            let mut out = vec![0u8; limit];
            match zstd::bulk::compress_to_buffer(data, &mut out, 0) {
                Ok(n) => {
                    out.truncate(n);
                    Some(out)
                }
                Err(_) => None,
            }
        }
    }
}

fn pack(t: CompressionType, data: &[u8]) -> Packed {
    if data.iter().all(|&b| b == 0) {
        return Packed::Zero;
    }
    match compress_cluster(t, data) {
        Some(c) => Packed::Compressed(c),
        None => Packed::Raw,
    }
}

fn write_compressed(
    dev: &dyn BlockDev,
    host: &FileHost,
    opts: &ConvertOptions,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<(), ConvertError> {
    let io_err = |source| ConvertError::Io {
        path: PathBuf::new(),
        source,
    };
    let ih = ImageHeader::read(host)?;
    let mut header = ih.header.clone();
    let g = header.geometry();
    let cs = g.cluster_size();
    let size = dev.size();
    let kind = header.compression().map_err(OpenImageError::from)?;
    let threads = if opts.threads == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        opts.threads
    };
    let batch = threads * CLUSTERS_PER_THREAD;
    let nclusters = g.clusters_for(size);
    let l2e = g.l2_entries();
    let w = g.l2_entry_words();
    // L2 tables by L1 index, as raw words.
    let mut l2: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    let mut pos = g
        .align_up(host.len().map_err(io_err)?)
        .ok_or_else(|| ConvertError::Invalid("image too large".into()))?;
    let mut input = vec![0u8; batch * cs as usize];
    let mut gc = 0u64;
    while gc < nclusters {
        let n = (nclusters - gc).min(batch as u64) as usize;
        let start = gc * cs;
        let len = (size - start).min(n as u64 * cs) as usize;
        dev.read_at(&mut input[..len], start)?;
        input[len..n * cs as usize].fill(0);
        let clusters: Vec<&[u8]> = input[..n * cs as usize].chunks(cs as usize).collect();
        let per = n.div_ceil(threads);
        let packed: Vec<Packed> = std::thread::scope(|s| {
            let mut parts = clusters.chunks(per);
            // The calling thread compresses the first part itself.
            let mine = parts.next().unwrap_or_default();
            let handles: Vec<_> = parts
                .map(|part| s.spawn(move || part.iter().map(|c| pack(kind, c)).collect::<Vec<_>>()))
                .collect();
            let mut all: Vec<Packed> = mine.iter().map(|c| pack(kind, c)).collect();
            for h in handles {
                all.extend(h.join().unwrap_or_default());
            }
            all
        });
        if packed.len() != n {
            return Err(ConvertError::Invalid("a compression thread failed".into()));
        }
        // Lay the batch out behind `pos` and write it with one call.
        let base = pos;
        let mut out: Vec<u8> = Vec::new();
        for (k, p) in packed.iter().enumerate() {
            let (entry, bitmap) = match p {
                Packed::Zero => continue,
                Packed::Compressed(c) => {
                    let at = base + out.len() as u64;
                    match CompressedDescriptor::encode(at, c.len() as u64, &g) {
                        Some(e) => {
                            out.extend_from_slice(c);
                            (e, 0)
                        }
                        None => {
                            return Err(ConvertError::Invalid(
                                "compressed cluster offset out of range".into(),
                            ))
                        }
                    }
                }
                Packed::Raw => {
                    let at = g
                        .align_up(base + out.len() as u64)
                        .ok_or_else(|| ConvertError::Invalid("image too large".into()))?;
                    out.resize((at - base) as usize, 0);
                    out.extend_from_slice(clusters[k]);
                    (at | OFLAG_COPIED, L2_BITMAP_ALL_ALLOC)
                }
            };
            let c = gc + k as u64;
            let table = l2
                .entry(c / l2e)
                .or_insert_with(|| vec![0u64; l2e as usize * w]);
            let i = (c % l2e) as usize * w;
            table[i] = entry;
            if w == 2 {
                table[i + 1] = bitmap;
            }
        }
        host.write_at(&out, base).map_err(io_err)?;
        pos = base + out.len() as u64;
        gc += n as u64;
        progress((gc * cs).min(size), size);
    }
    // L2 tables, then the L1 table, then refcounts counted from them.
    let mut pos = g
        .align_up(pos)
        .ok_or_else(|| ConvertError::Invalid("image too large".into()))?;
    let mut l1 = vec![0u64; header.l1_size as usize];
    for (l1i, table) in &l2 {
        host.write_at(&table_to_bytes(table), pos).map_err(io_err)?;
        if let Some(e) = l1.get_mut(*l1i as usize) {
            *e = pos | OFLAG_COPIED;
        }
        pos += cs;
    }
    host.sync_data().map_err(io_err)?;
    host.write_at(&table_to_bytes(&l1), header.l1_table_offset)
        .map_err(io_err)?;
    host.sync_data().map_err(io_err)?;
    rebuild_refcounts(host, &mut header, &l1)
        .map_err(|e| ConvertError::Invalid(format!("counting references: {e}")))?;
    host.sync_data().map_err(io_err)?;
    Ok(())
}
