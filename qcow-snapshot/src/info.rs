//! `info`: what `qemu-img info` reports about an image, in its human form and in its JSON form
//! (`--output json`, with QEMU's field names and order), for one image or a whole backing chain.
//!
//! Only headers, the snapshot table and the bitmap directory are read; the image's data is not.
//! Every table read is bounded (snapshot and bitmap counts are capped like QEMU caps them).
//!
//! Locking model: none in memory. Each file is opened through `blockdev::open_file`, so it is
//! locked as a reader (force-shared inside `blockdev::lock::with_force_share`, `-U`) while it
//! is read.

use std::fmt::{self, Write as _};
use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use crate::api::{probe_format, resolve_backing_path, Format, MAX_CHAIN_DEPTH};
use crate::error::OpenImageError;
use crate::format::{self, CompressionType, HeaderExtension};
use crate::host::FileHost;
use crate::image::ImageHeader;

/// QEMU's cap on internal snapshots (`QCOW_MAX_SNAPSHOTS`).
const MAX_SNAPSHOTS: u32 = 65536;
/// QEMU's cap on persistent bitmaps (`QCOW2_MAX_BITMAPS`).
const MAX_BITMAPS: u32 = 65535;
/// Largest bitmap directory read (QEMU: `QCOW2_MAX_BITMAP_DIRECTORY_SIZE`).
const MAX_BITMAP_DIRECTORY: u64 = 64 << 20;
/// Largest extra data of one snapshot entry QEMU accepts.
const MAX_SNAPSHOT_EXTRA: u64 = 1024;

/// One internal snapshot, as `qemu-img info` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotInfo {
    /// Snapshot id ("1", "2", ...).
    pub id: String,
    /// Tag (name).
    pub name: String,
    /// Saved VM state size in bytes.
    pub vm_state_size: u64,
    /// Creation time, seconds since the epoch.
    pub date_sec: u32,
    /// Creation time, nanoseconds part.
    pub date_nsec: u32,
    /// Guest clock at the snapshot, nanoseconds.
    pub vm_clock_nsec: u64,
    /// Instruction count, when recorded.
    pub icount: Option<u64>,
}

/// One persistent dirty bitmap, as `qemu-img info` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapInfo {
    /// Name.
    pub name: String,
    /// Bytes per bit.
    pub granularity: u64,
    /// Flag names ("in-use", "auto").
    pub flags: Vec<&'static str>,
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
    /// qcow2: the backing file's path, resolved against the image's directory.
    pub full_backing_file: Option<PathBuf>,
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
    /// qcow2: extended L2 entries (subclusters).
    pub extended_l2: bool,
    /// qcow2: external data file name, and whether it is a consistent raw image.
    pub data_file: Option<(String, bool)>,
    /// qcow2: internal snapshots.
    pub snapshots: Vec<SnapshotInfo>,
    /// qcow2 v3: persistent dirty bitmaps.
    pub bitmaps: Vec<BitmapInfo>,
}

fn open_err(path: &Path) -> impl FnOnce(io::Error) -> OpenImageError + '_ {
    move |source| OpenImageError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn be16(b: &[u8], at: usize) -> u16 {
    b.get(at..at + 2)
        .map_or(0, |s| u16::from_be_bytes([s[0], s[1]]))
}

fn be32(b: &[u8], at: usize) -> u32 {
    b.get(at..at + 4)
        .map_or(0, |s| u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
}

fn be64(b: &[u8], at: usize) -> u64 {
    (u64::from(be32(b, at)) << 32) | u64::from(be32(b, at + 4))
}

fn read_exact(file: &File, len: u64, off: u64, what: &str) -> Result<Vec<u8>, OpenImageError> {
    let n =
        usize::try_from(len).map_err(|_| OpenImageError::Corrupt(format!("{what} too large")))?;
    let mut buf = vec![0u8; n];
    file.read_exact_at(&mut buf, off)
        .map_err(|e| OpenImageError::Corrupt(format!("cannot read {what}: {e}")))?;
    Ok(buf)
}

fn read_snapshots(file: &File, h: &format::Header) -> Result<Vec<SnapshotInfo>, OpenImageError> {
    if h.nb_snapshots > MAX_SNAPSHOTS {
        return Err(OpenImageError::Corrupt(format!(
            "too many snapshots ({})",
            h.nb_snapshots
        )));
    }
    let mut out = Vec::new();
    let mut off = h.snapshots_offset;
    for _ in 0..h.nb_snapshots {
        off = off
            .checked_next_multiple_of(8)
            .ok_or_else(|| OpenImageError::Corrupt("snapshot table overflow".into()))?;
        let e = read_exact(file, 40, off, "snapshot table")?;
        let id_len = u64::from(be16(&e, 12));
        let name_len = u64::from(be16(&e, 14));
        let extra_len = u64::from(be32(&e, 36));
        if extra_len > MAX_SNAPSHOT_EXTRA {
            return Err(OpenImageError::Corrupt(
                "snapshot extra data too large".into(),
            ));
        }
        let extra = read_exact(file, extra_len, off + 40, "snapshot extra data")?;
        let strings = read_exact(
            file,
            id_len + name_len,
            off + 40 + extra_len,
            "snapshot name",
        )?;
        let (id, name) = strings.split_at(id_len as usize);
        let mut vm_state_size = u64::from(be32(&e, 32));
        if extra_len >= 8 {
            vm_state_size = be64(&extra, 0);
        }
        out.push(SnapshotInfo {
            id: String::from_utf8_lossy(id).into_owned(),
            name: String::from_utf8_lossy(name).into_owned(),
            vm_state_size,
            date_sec: be32(&e, 16),
            date_nsec: be32(&e, 20),
            vm_clock_nsec: be64(&e, 24),
            icount: (extra_len >= 24)
                .then(|| be64(&extra, 16))
                .filter(|&v| v != u64::MAX),
        });
        off += 40 + extra_len + id_len + name_len;
    }
    Ok(out)
}

fn read_bitmaps(file: &File, ext: &[u8]) -> Result<Vec<BitmapInfo>, OpenImageError> {
    let bad = |m: &str| OpenImageError::Corrupt(format!("bitmaps extension: {m}"));
    if ext.len() < 24 {
        return Err(bad("too short"));
    }
    let nb = be32(ext, 0);
    let dir_size = be64(ext, 8);
    let dir_off = be64(ext, 16);
    if nb > MAX_BITMAPS || dir_size > MAX_BITMAP_DIRECTORY {
        return Err(bad("directory too large"));
    }
    let dir = read_exact(file, dir_size, dir_off, "bitmap directory")?;
    let mut out = Vec::new();
    let mut pos = 0usize;
    for _ in 0..nb {
        let e = dir.get(pos..).unwrap_or(&[]);
        if e.len() < 24 {
            return Err(bad("directory truncated"));
        }
        let flags = be32(e, 12);
        let granularity_bits = u32::from(e[17]);
        let name_len = usize::from(be16(e, 18));
        let extra = be32(e, 20) as usize;
        let name = e
            .get(24 + extra..24 + extra + name_len)
            .ok_or_else(|| bad("directory truncated"))?;
        let mut names = Vec::new();
        if flags & 1 != 0 {
            names.push("in-use");
        }
        if flags & 2 != 0 {
            names.push("auto");
        }
        out.push(BitmapInfo {
            name: String::from_utf8_lossy(name).into_owned(),
            granularity: 1u64.checked_shl(granularity_bits).unwrap_or(0),
            flags: names,
        });
        pos = pos
            .checked_add((24 + extra + name_len).next_multiple_of(8))
            .ok_or_else(|| bad("directory overflow"))?;
    }
    Ok(out)
}

/// Describes an image without opening its backing chain (format probed by the qcow2 magic).
pub fn info(path: &Path) -> Result<ImageInfo, OpenImageError> {
    info_with(path, None)
}

/// Describes an image read as `format` (probed when `None`), without opening its backing chain.
pub fn info_with(path: &Path, format: Option<Format>) -> Result<ImageInfo, OpenImageError> {
    // Locked as a reader like `qemu-img info` (force-shared inside `with_force_share`, `-U`).
    let file = blockdev::open_file(path, true).map_err(open_err(path))?;
    let md = file.metadata().map_err(open_err(path))?;
    let file_length = blockdev::file_size(&file).map_err(open_err(path))?;
    let disk_size = md.blocks() * 512;
    let fmt = match format {
        Some(f) => f,
        None => probe_format(path)?,
    };
    let mut info = ImageInfo {
        path: path.to_path_buf(),
        format: fmt,
        virtual_size: file_length,
        disk_size,
        file_length,
        cluster_size: None,
        backing_file: None,
        full_backing_file: None,
        backing_format: None,
        version: None,
        dirty: false,
        corrupt: false,
        refcount_bits: None,
        compression_type: None,
        lazy_refcounts: false,
        extended_l2: false,
        data_file: None,
        snapshots: Vec::new(),
        bitmaps: Vec::new(),
    };
    if fmt == Format::Raw {
        return Ok(info);
    }
    let host = FileHost::new(file.try_clone().map_err(open_err(path))?);
    let ih = ImageHeader::read(&host)?;
    let h = &ih.header;
    info.virtual_size = h.size;
    info.cluster_size = Some(h.geometry().cluster_size());
    info.backing_file = ih.backing.as_ref().map(|b| b.name.clone());
    info.full_backing_file = ih
        .backing
        .as_ref()
        .map(|b| resolve_backing_path(path, &b.name));
    info.backing_format = ih.backing.as_ref().and_then(|b| b.format.clone());
    info.version = Some(h.version);
    info.dirty = h.incompatible_features & format::incompat::DIRTY != 0;
    info.corrupt = h.incompatible_features & format::incompat::CORRUPT != 0;
    info.refcount_bits = Some(h.geometry().refcount_bits());
    info.compression_type = h.compression().ok();
    info.lazy_refcounts = h.compatible_features & format::compat::LAZY_REFCOUNTS != 0;
    info.extended_l2 = h.incompatible_features & format::incompat::EXTENDED_L2 != 0;
    for e in &ih.extensions {
        match e {
            HeaderExtension::ExternalDataFile(name) => {
                let raw = h.autoclear_features & format::autoclear::RAW_EXTERNAL_DATA != 0;
                info.data_file = Some((name.clone(), raw));
            }
            HeaderExtension::Bitmaps(data) if h.version >= 3 => {
                info.bitmaps = read_bitmaps(&file, data)?;
            }
            _ => {}
        }
    }
    info.snapshots = read_snapshots(&file, h)?;
    Ok(info)
}

/// `info --backing-chain`: the image and every backing file below it, top first.
pub fn info_chain(path: &Path, format: Option<Format>) -> Result<Vec<ImageInfo>, OpenImageError> {
    let mut out: Vec<ImageInfo> = Vec::new();
    let mut seen = Vec::new();
    let mut next = Some((path.to_path_buf(), format));
    while let Some((p, f)) = next.take() {
        if out.len() > MAX_CHAIN_DEPTH {
            return Err(OpenImageError::ChainTooDeep(MAX_CHAIN_DEPTH));
        }
        let md = std::fs::metadata(&p).map_err(|source| match out.last() {
            Some(above) => OpenImageError::BackingIo {
                path: p.clone(),
                image: above.path.clone(),
                source,
            },
            None => OpenImageError::Io {
                path: p.clone(),
                source,
            },
        })?;
        if seen.contains(&(md.dev(), md.ino())) {
            return Err(OpenImageError::BackingLoop(p));
        }
        seen.push((md.dev(), md.ino()));
        let i = info_with(&p, f)?;
        next = match &i.full_backing_file {
            // An NBD export is no file to describe here; the chain's listing ends at its name.
            Some(b) if b.to_str().is_some_and(crate::nbd::is_nbd_name) => None,
            Some(b) => Some((
                b.clone(),
                match &i.backing_format {
                    Some(name) => Some(name.parse::<Format>()?),
                    None => None,
                },
            )),
            None => None,
        };
        out.push(i);
    }
    Ok(out)
}

/// `qemu-img`'s `size_to_str`: three significant digits and a binary unit.
pub fn size_to_str(n: u64) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    // %0.3g: three significant digits, no trailing zeros.
    let digits = if v >= 100.0 {
        0
    } else if v >= 10.0 {
        1
    } else {
        2
    };
    let mut s = format!("{v:.digits$}");
    if s.contains('.') {
        s = s.trim_end_matches('0').trim_end_matches('.').to_string();
    }
    format!("{s} {}", UNITS[u])
}

fn local_date(sec: u32) -> String {
    let t = libc::time_t::from(sec);
    // SAFETY: `tm` is a plain C struct of integers (and a pointer that may be null); all-zero
    // is a valid value.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    // SAFETY: localtime_r reads `t` and writes only into `tm`; both outlive the call.
    let ok = unsafe { !libc::localtime_r(&t, &mut tm).is_null() };
    if !ok {
        return "-".to_string();
    }
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
        tm.tm_year + 1900,
        tm.tm_mon + 1,
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec
    )
}

impl fmt::Display for ImageInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "image: {}", self.path.display())?;
        writeln!(f, "file format: {}", self.format)?;
        writeln!(
            f,
            "virtual size: {} ({} bytes)",
            size_to_str(self.virtual_size),
            self.virtual_size
        )?;
        writeln!(f, "disk size: {}", size_to_str(self.disk_size))?;
        if let Some(cs) = self.cluster_size {
            writeln!(f, "cluster_size: {cs}")?;
        }
        if let Some(b) = &self.backing_file {
            match &self.full_backing_file {
                Some(full) if full.as_os_str() != b.as_str() => {
                    writeln!(f, "backing file: {b} (actual path: {})", full.display())?
                }
                _ => writeln!(f, "backing file: {b}")?,
            }
        }
        if let Some(b) = &self.backing_format {
            writeln!(f, "backing file format: {b}")?;
        }
        if !self.snapshots.is_empty() {
            writeln!(f, "Snapshot list:")?;
            writeln!(
                f,
                "{:<7} {:<16} {:>8} {:>19} {:>15} {:>10}",
                "ID", "TAG", "VM_SIZE", "DATE", "VM_CLOCK", "ICOUNT"
            )?;
            for s in &self.snapshots {
                let secs = s.vm_clock_nsec / 1_000_000_000;
                let clock = format!(
                    "{:04}:{:02}:{:02}.{:03}",
                    secs / 3600,
                    (secs / 60) % 60,
                    secs % 60,
                    (s.vm_clock_nsec / 1_000_000) % 1000
                );
                let icount = s.icount.map(|i| i.to_string()).unwrap_or_default();
                writeln!(
                    f,
                    "{:<7} {:<16} {:>8} {:>19} {:>15} {:>10}",
                    s.id,
                    s.name,
                    size_to_str(s.vm_state_size),
                    local_date(s.date_sec),
                    clock,
                    icount
                )?;
            }
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
            if !self.bitmaps.is_empty() {
                writeln!(f, "    bitmaps:")?;
                for (i, b) in self.bitmaps.iter().enumerate() {
                    writeln!(f, "        [{i}]:")?;
                    writeln!(f, "            flags:")?;
                    for (j, fl) in b.flags.iter().enumerate() {
                        writeln!(f, "                [{j}]: {fl}")?;
                    }
                    writeln!(f, "            name: {}", b.name)?;
                    writeln!(f, "            granularity: {}", b.granularity)?;
                }
            }
            if let Some(r) = self.refcount_bits {
                writeln!(f, "    refcount bits: {r}")?;
            }
            if let Some((name, raw)) = &self.data_file {
                writeln!(f, "    data file: {name}")?;
                writeln!(f, "    data file raw: {raw}")?;
            }
            writeln!(f, "    corrupt: {}", self.corrupt)?;
            writeln!(f, "    extended l2: {}", self.extended_l2)?;
            if self.dirty {
                // qemu-img shows this only in JSON ("dirty-flag"); a user wants to see it.
                writeln!(f, "    dirty: true")?;
            }
        }
        writeln!(f, "Child node '/file':")?;
        writeln!(f, "    filename: {}", self.path.display())?;
        writeln!(f, "    protocol type: file")?;
        let len = self.protocol_length();
        writeln!(f, "    file length: {} ({len} bytes)", size_to_str(len))?;
        writeln!(f, "    disk size: {}", size_to_str(self.disk_size))?;
        Ok(())
    }
}

/// A JSON string literal.
pub fn json_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A JSON writer that indents like QEMU's pretty printer (4 spaces, `"key": value`).
struct Json {
    out: String,
    depth: usize,
    first: Vec<bool>,
}

impl Json {
    fn new() -> Self {
        Json {
            out: String::new(),
            depth: 0,
            first: vec![true],
        }
    }

    fn sep(&mut self) {
        let first = self.first.last_mut().expect("a JSON scope is open");
        if !*first {
            self.out.push(',');
        }
        *first = false;
        if self.depth > 0 {
            self.out.push('\n');
            self.out.push_str(&"    ".repeat(self.depth));
        }
    }

    fn key(&mut self, k: &str) {
        self.sep();
        self.out.push_str(&json_str(k));
        self.out.push_str(": ");
    }

    fn open(&mut self, c: char) {
        self.out.push(c);
        self.depth += 1;
        self.first.push(true);
    }

    fn close(&mut self, c: char) {
        self.depth -= 1;
        self.first.pop();
        self.out.push('\n');
        self.out.push_str(&"    ".repeat(self.depth));
        self.out.push(c);
    }

    fn field(&mut self, k: &str, v: impl fmt::Display) {
        self.key(k);
        let _ = write!(self.out, "{v}");
    }

    fn field_str(&mut self, k: &str, v: &str) {
        self.key(k);
        self.out.push_str(&json_str(v));
    }

    fn open_field(&mut self, k: &str, c: char) {
        self.key(k);
        self.open(c);
    }

    fn open_item(&mut self, c: char) {
        self.sep();
        self.open(c);
    }
}

impl ImageInfo {
    /// The file's length as QEMU's file driver reports it (rounded up to 512 bytes).
    fn protocol_length(&self) -> u64 {
        self.file_length.next_multiple_of(512)
    }

    fn write_json(&self, j: &mut Json) {
        let name = self.path.display().to_string();
        j.open_field("children", '[');
        j.open_item('{');
        j.field_str("name", "file");
        j.open_field("info", '{');
        j.open_field("children", '[');
        j.close(']');
        j.field("virtual-size", self.protocol_length());
        j.field_str("filename", &name);
        j.field_str("format", "file");
        j.field("actual-size", self.disk_size);
        j.open_field("format-specific", '{');
        j.field_str("type", "file");
        j.open_field("data", '{');
        j.close('}');
        j.close('}');
        j.field("dirty-flag", false);
        j.close('}');
        j.close('}');
        j.close(']');
        if let Some(b) = &self.backing_format {
            j.field_str("backing-filename-format", b);
        }
        if !self.snapshots.is_empty() {
            j.open_field("snapshots", '[');
            for s in &self.snapshots {
                j.open_item('{');
                if let Some(i) = s.icount {
                    j.field("icount", i);
                }
                j.field("vm-clock-nsec", s.vm_clock_nsec % 1_000_000_000);
                j.field_str("name", &s.name);
                j.field("date-sec", s.date_sec);
                j.field("date-nsec", s.date_nsec);
                j.field("vm-clock-sec", s.vm_clock_nsec / 1_000_000_000);
                j.field_str("id", &s.id);
                j.field("vm-state-size", s.vm_state_size);
                j.close('}');
            }
            j.close(']');
        }
        j.field("virtual-size", self.virtual_size);
        j.field_str("filename", &name);
        if let Some(cs) = self.cluster_size {
            j.field("cluster-size", cs);
        }
        j.field_str("format", &self.format.to_string());
        j.field("actual-size", self.disk_size);
        if self.format == Format::Qcow2 {
            j.open_field("format-specific", '{');
            j.field_str("type", "qcow2");
            j.open_field("data", '{');
            j.field_str(
                "compat",
                if self.version == Some(2) {
                    "0.10"
                } else {
                    "1.1"
                },
            );
            if let Some(c) = self.compression_type {
                j.field_str("compression-type", &c.to_string());
            }
            j.field("lazy-refcounts", self.lazy_refcounts);
            if !self.bitmaps.is_empty() {
                j.open_field("bitmaps", '[');
                for b in &self.bitmaps {
                    j.open_item('{');
                    j.open_field("flags", '[');
                    for fl in &b.flags {
                        j.sep();
                        j.out.push_str(&json_str(fl));
                    }
                    j.close(']');
                    j.field_str("name", &b.name);
                    j.field("granularity", b.granularity);
                    j.close('}');
                }
                j.close(']');
            }
            if let Some(r) = self.refcount_bits {
                j.field("refcount-bits", r);
            }
            if let Some((df, raw)) = &self.data_file {
                j.field_str("data-file", df);
                j.field("data-file-raw", raw);
            }
            j.field("corrupt", self.corrupt);
            j.field("extended-l2", self.extended_l2);
            j.close('}');
            j.close('}');
        }
        if let Some(full) = &self.full_backing_file {
            j.field_str("full-backing-filename", &full.display().to_string());
        }
        if let Some(b) = &self.backing_file {
            j.field_str("backing-filename", b);
        }
        j.field("dirty-flag", self.dirty);
    }

    /// The `qemu-img info --output json` object of this image.
    pub fn to_json(&self) -> String {
        let mut j = Json::new();
        j.open('{');
        self.write_json(&mut j);
        j.close('}');
        j.out
    }
}

/// The `qemu-img info --output json --backing-chain` array.
pub fn chain_to_json(chain: &[ImageInfo]) -> String {
    let mut j = Json::new();
    j.open('[');
    for i in chain {
        j.open_item('{');
        i.write_json(&mut j);
        j.close('}');
    }
    j.close(']');
    j.out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_to_str_matches_qemu_three_significant_digits() {
        assert_eq!(size_to_str(0), "0 B");
        assert_eq!(size_to_str(1536), "1.5 KiB");
        assert_eq!(size_to_str(1 << 20), "1 MiB");
        assert_eq!(size_to_str(216 << 10), "216 KiB");
    }

    #[test]
    fn json_strings_are_escaped() {
        assert_eq!(json_str("a\"b\\c\n\u{1}"), "\"a\\\"b\\\\c\\n\\u0001\"");
    }
}
