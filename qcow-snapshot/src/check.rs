//! `check` / `--repair` for qcow2 images: an independent referee of the on-disk structures.
//!
//! This module owns the consistency check of a qcow2 file. It does **not** use the engine: it
//! re-reads the header, header extensions, the active L1 table, every L2 table, the snapshot
//! table and every snapshot L1 table, the refcount table and every refcount block straight
//! from the file, computes the expected refcount of every host cluster from the references it
//! found, and compares that with the refcounts stored in the image. Classification, messages,
//! counts and exit codes follow `qemu-img check` (QEMU's `qcow2_check_refcounts`), so the two
//! tools agree on the same file:
//!
//! * corruptions: a refcount lower than the number of references (including 0 for a used
//!   cluster and overlapping allocations), references past the end of the file, misaligned
//!   L2 tables or data clusters, reserved bits set, a wrong `OFLAG_COPIED` flag;
//! * leaks: a refcount higher than the number of references;
//! * check errors: the check itself could not look at something (unreadable refcount block).
//!
//! Repair ([`Repair::Leaks`]) lowers refcounts that are too high and, when nothing else is
//! wrong, fixes `OFLAG_COPIED`; [`Repair::All`] also raises refcounts that are too low, fixes
//! every `OFLAG_COPIED` flag, and rebuilds the whole refcount structure when a used cluster
//! has refcount 0 or the refcount table itself is damaged. A rebuild writes the new refcount
//! blocks and the new refcount table into clusters nothing references, syncs them, and only
//! then switches the header to them with one 12-byte write followed by a sync; a crash at any
//! point leaves either the old or the new structure in force. After a repair the image is
//! checked again and the report describes the repaired image, like `qemu-img check -r`.
//!
//! Not repaired (reported only): snapshot table entries without their mandatory extra data,
//! oversized snapshot extra data and overlong snapshot tables (QEMU rewrites or truncates the
//! snapshot table for those; here the check refuses to start, exit code 1, like QEMU without
//! `-r all`). Images with extended L2 entries, an external data file or encryption are refused
//! with [`CheckError::Unsupported`].
//!
//! Everything read from the file is untrusted: all arithmetic on offsets and sizes is checked,
//! the expected-refcount array is sized by the file's real length and refused above
//! [`MAX_CHECK_CLUSTERS`], tables are bounded by QEMU's limits, reads past the end of the file
//! read as zeros (as in QEMU) without allocating for the missing part, and the total number of
//! L1/L2 entries walked is bounded so a hostile image that references the same tables over
//! and over cannot make the check run for days.
//!
//! Locking model: none. A check owns its file handle for its whole duration; the caller must
//! make sure no one else writes the image meanwhile (the daemon does not serve an image it is
//! repairing).

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::format::{
    self, incompat, refcount_get, refcount_set, table_entry, DecodeError, Geometry, Header,
    HeaderExtension, COMPRESSED_SECTOR_SIZE, INCOMPATIBLE_FEATURES_OFFSET, L1E_OFFSET_MASK,
    L1E_RESERVED_MASK, L2E_OFFSET_MASK, L2E_STD_RESERVED_MASK, MAX_CLUSTER_BITS, MAX_L1_BYTES,
    MAX_REFCOUNT_ORDER, MAX_REFCOUNT_TABLE_BYTES, MIN_CLUSTER_BITS, OFLAG_COMPRESSED, OFLAG_COPIED,
    OFLAG_ZERO, REFCOUNT_TABLE_OFFSET_OFFSET, REFT_OFFSET_MASK, REFT_RESERVED_MASK,
};

/// Largest image file, in clusters, the check accepts (the expected-refcount array holds 4
/// bytes per cluster, so this bounds it to 256 MiB; with 64 KiB clusters this is a 4 TiB file).
pub const MAX_CHECK_CLUSTERS: u64 = 1 << 26;
/// Most snapshots an image may have (QEMU's limit).
pub const MAX_SNAPSHOTS: u32 = 65536;
/// Largest extra data of one snapshot table entry (QEMU's limit).
const MAX_SNAPSHOT_EXTRA_DATA: u64 = 1024;
/// Largest snapshot table, in bytes.
const MAX_SNAPSHOT_TABLE_BYTES: u64 = 64 << 20;
/// L1 and L2 entries one check may walk in total, beyond what an honest image needs (every
/// table in the file walked once per L1 table): a hostile image whose L1 entries all point at
/// the same L2 table is refused after this much work instead of running for hours.
const EXTRA_ENTRIES_WALKED: u64 = 1 << 24;
/// Absolute cap on the L1 and L2 entries one check walks (about a minute of work).
const MAX_ENTRIES_WALKED: u64 = 1 << 31;
/// Messages kept in a report; further ones are only counted.
pub const MAX_MESSAGES: usize = 10_000;
/// Host offset bits of a bitmap table entry.
const BITMAP_ENTRY_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Reserved bits of a bitmap table entry.
const BITMAP_ENTRY_RESERVED_MASK: u64 = 0xff00_0000_0000_01fe;
/// Fixed part of a snapshot table entry.
const SNAPSHOT_HEADER_LEN: u64 = 40;

/// What a check may repair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Repair {
    /// Lower refcounts that are too high (and fix `OFLAG_COPIED` if nothing else is wrong).
    Leaks,
    /// Everything `Leaks` fixes, plus too-low refcounts, `OFLAG_COPIED` flags, misaligned
    /// preallocated zero clusters, and a full refcount rebuild when needed.
    All,
}

impl Repair {
    fn leaks(self) -> bool {
        true
    }

    fn errors(self) -> bool {
        self == Repair::All
    }
}

/// Why a check could not start (the image cannot even be opened as qcow2). `qemu-img check`
/// exits with 1 in all these cases.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    /// The file could not be opened or its length read.
    #[error("could not open {path}: {source}")]
    Open {
        /// The image path.
        path: String,
        /// The OS error.
        source: io::Error,
    },
    /// Reading or writing the image failed.
    #[error("I/O error while checking the image: {0}")]
    Io(#[from] io::Error),
    /// The header or a header extension is invalid.
    #[error("invalid qcow2 header: {0}")]
    Header(#[from] DecodeError),
    /// A structure the checker must read before it can start (snapshot table, bitmap
    /// directory) is invalid.
    #[error("invalid qcow2 image: {0}")]
    Invalid(String),
    /// The image uses something this checker cannot verify.
    #[error("unsupported image: {0}")]
    Unsupported(String),
    /// The image is larger than the check's bounds.
    #[error("image too large to check: {0}")]
    TooLarge(String),
}

impl CheckError {
    /// `qemu-img check`'s exit code for a check that could not run: always 1.
    pub fn exit_code(&self) -> i32 {
        1
    }
}

/// The result of a check (after a repair: the result of the check that followed it).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// Inconsistencies that may lose data or corrupt it on further writes.
    pub corruptions: u64,
    /// Clusters whose refcount is higher than their references (wasted space only).
    pub leaks: u64,
    /// Things the check could not look at.
    pub check_errors: u64,
    /// Corruptions the repair fixed (0 without repair).
    pub corruptions_fixed: u64,
    /// Leaks the repair fixed (0 without repair).
    pub leaks_fixed: u64,
    /// End of the last cluster that is referenced or has a refcount.
    pub image_end_offset: u64,
    /// Guest clusters of the virtual disk.
    pub total_clusters: u64,
    /// Allocated guest clusters of the active L1 table.
    pub allocated_clusters: u64,
    /// Allocated guest clusters not contiguous with the previous one.
    pub fragmented_clusters: u64,
    /// Compressed guest clusters.
    pub compressed_clusters: u64,
    /// Why the check stopped early (qemu-img: "Check failed: ..."), if it did.
    pub failure: Option<String>,
    /// One line per finding, worded like qemu-img's stderr output.
    pub messages: Vec<String>,
    /// Messages dropped past [`MAX_MESSAGES`].
    pub messages_dropped: u64,
    /// Messages of the repairing pass, when a repair ran and the image was checked again.
    pub repair_messages: Vec<String>,
}

impl CheckReport {
    /// `qemu-img check`'s exit code: 0 clean, 1 the check could not complete, 2 corruptions,
    /// 3 leaks only.
    pub fn exit_code(&self) -> i32 {
        if self.failure.is_some() || self.check_errors > 0 {
            1
        } else if self.corruptions > 0 {
            2
        } else if self.leaks > 0 {
            3
        } else {
            0
        }
    }

    /// Whether a repair changed anything.
    pub fn repaired(&self) -> bool {
        self.corruptions_fixed > 0 || self.leaks_fixed > 0
    }

    /// The report in `qemu-img check --output=json` layout.
    pub fn to_json(&self, filename: &str) -> String {
        let mut s = String::from("{\n");
        let mut field = |k: &str, v: String| {
            s.push_str(&format!("    \"{k}\": {v},\n"));
        };
        if self.image_end_offset != 0 {
            field("image-end-offset", self.image_end_offset.to_string());
        }
        if self.total_clusters != 0 {
            field("total-clusters", self.total_clusters.to_string());
        }
        field("check-errors", self.check_errors.to_string());
        if self.leaks_fixed != 0 {
            field("leaks-fixed", self.leaks_fixed.to_string());
        }
        if self.corruptions_fixed != 0 {
            field("corruptions-fixed", self.corruptions_fixed.to_string());
        }
        if self.leaks != 0 {
            field("leaks", self.leaks.to_string());
        }
        if self.corruptions != 0 {
            field("corruptions", self.corruptions.to_string());
        }
        if self.allocated_clusters != 0 {
            field("allocated-clusters", self.allocated_clusters.to_string());
        }
        if self.fragmented_clusters != 0 {
            field("fragmented-clusters", self.fragmented_clusters.to_string());
        }
        if self.compressed_clusters != 0 {
            field("compressed-clusters", self.compressed_clusters.to_string());
        }
        let name: String = filename
            .chars()
            .flat_map(|c| match c {
                '"' => vec!['\\', '"'],
                '\\' => vec!['\\', '\\'],
                c if (c as u32) < 0x20 => format!("\\u{:04x}", c as u32).chars().collect(),
                c => vec![c],
            })
            .collect();
        s.push_str(&format!(
            "    \"filename\": \"{name}\",\n    \"format\": \"qcow2\"\n}}"
        ));
        s
    }
}

impl fmt::Display for CheckReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.repaired() {
            write!(
                f,
                "The following inconsistencies were found and repaired:\n\n    {} leaked clusters\n    {} corruptions\n\nDouble checking the fixed image now...\n",
                self.leaks_fixed, self.corruptions_fixed
            )?;
        }
        if let Some(why) = &self.failure {
            return writeln!(f, "Check failed: {why}");
        }
        if self.corruptions == 0 && self.leaks == 0 && self.check_errors == 0 {
            writeln!(f, "No errors were found on the image.")?;
        } else {
            if self.corruptions > 0 {
                write!(
                    f,
                    "\n{} errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.\n",
                    self.corruptions
                )?;
            }
            if self.leaks > 0 {
                write!(
                    f,
                    "\n{} leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.\n",
                    self.leaks
                )?;
            }
            if self.check_errors > 0 {
                write!(
                    f,
                    "\n{} internal errors have occurred during the check.\n",
                    self.check_errors
                )?;
            }
        }
        if self.total_clusters != 0 && self.allocated_clusters != 0 {
            let alloc = self.allocated_clusters as f64;
            writeln!(
                f,
                "{}/{} = {:.2}% allocated, {:.2}% fragmented, {:.2}% compressed clusters",
                self.allocated_clusters,
                self.total_clusters,
                alloc * 100.0 / self.total_clusters as f64,
                self.fragmented_clusters as f64 * 100.0 / alloc,
                self.compressed_clusters as f64 * 100.0 / alloc
            )?;
        }
        if self.image_end_offset != 0 {
            writeln!(f, "Image end offset: {}", self.image_end_offset)?;
        }
        if self.check_errors > 0 {
            writeln!(f, "Check failed")?;
        }
        Ok(())
    }
}

/// Checks the qcow2 image at `path`, repairing it first if `repair` is given.
///
/// Returns `Err` only when the image cannot be opened as qcow2 at all; every inconsistency
/// found inside a readable image is reported in the [`CheckReport`].
pub fn check(path: &Path, repair: Option<Repair>) -> Result<CheckReport, CheckError> {
    let first = run(path, repair)?;
    // Like qemu-img: a repair that stopped early is reported as is.
    if repair.is_none() || first.failure.is_some() || !first.repaired() {
        return Ok(first);
    }
    // Like qemu-img: report the state of the repaired image, with the repair's counts.
    let mut second = run(path, None)?;
    second.corruptions_fixed = first.corruptions_fixed;
    second.leaks_fixed = first.leaks_fixed;
    second.repair_messages = first.messages;
    Ok(second)
}

/// One snapshot table entry (only what the check needs).
#[derive(Debug, Clone)]
struct Snapshot {
    l1_table_offset: u64,
    l1_size: u32,
    id: String,
    name: String,
}

/// A bitmap directory entry (only what the check needs).
#[derive(Debug, Clone)]
struct BitmapTable {
    offset: u64,
    entries: u32,
}

/// The image as the check sees it: file, header and the tables loaded at open.
struct Image {
    file: File,
    len: u64,
    header: Header,
    g: Geometry,
    cs: u64,
    l1: Vec<u64>,
    reftable: Vec<u64>,
    snapshots: Vec<Snapshot>,
    snapshots_size: u64,
    /// v3 snapshot table entries without the mandatory extra data.
    incomplete_snapshots: Vec<u32>,
    /// Bitmap directory (offset, size) and its entries, when the bitmaps feature is in use.
    bitmaps: Option<(u64, u64, Vec<BitmapTable>)>,
}

impl Image {
    /// Reads `buf.len()` bytes at `off`; the part past the end of the file reads as zeros.
    fn read_padded(&self, off: u64, buf: &mut [u8]) -> io::Result<()> {
        buf.fill(0);
        if off >= self.len {
            return Ok(());
        }
        let avail = usize::try_from(self.len - off)
            .unwrap_or(usize::MAX)
            .min(buf.len());
        self.file.read_exact_at(&mut buf[..avail], off)
    }

    fn read_table(&self, off: u64, entries: u64) -> io::Result<Vec<u64>> {
        let bytes = usize::try_from(entries.saturating_mul(8))
            .map_err(|_| io::Error::other("table too large"))?;
        let mut buf = vec![0u8; bytes];
        self.read_padded(off, &mut buf)?;
        Ok(format::table_from_bytes(&buf))
    }

    fn clusters(&self) -> u64 {
        self.len.div_ceil(self.cs)
    }
}

fn invalid(msg: impl Into<String>) -> CheckError {
    CheckError::Invalid(msg.into())
}

/// Opens and validates the image like QEMU does when `qemu-img check` opens it: tables must
/// be aligned and within QEMU's size limits, but may lie past the end of the file.
///
/// The file is locked like `qemu-img check` locks it (a repair as a writer, a plain check as a
/// reader, or force-shared inside `blockdev::lock::with_force_share`).
fn load(path: &Path, writable: bool) -> Result<Image, CheckError> {
    let file = blockdev::open_file(path, !writable).map_err(|source| CheckError::Open {
        path: path.display().to_string(),
        source,
    })?;
    load_file(path, file)
}

/// [`load`] on an already open (and locked) file.
fn load_file(path: &Path, file: File) -> Result<Image, CheckError> {
    let len = file
        .metadata()
        .map_err(|source| CheckError::Open {
            path: path.display().to_string(),
            source,
        })?
        .len();
    let probe = Image {
        file,
        len,
        header: Header::new_v3(0, 16, 4),
        g: Geometry::standard(16, 4),
        cs: 1 << 16,
        l1: Vec::new(),
        reftable: Vec::new(),
        snapshots: Vec::new(),
        snapshots_size: 0,
        incomplete_snapshots: Vec::new(),
        bitmaps: None,
    };
    let mut first = [0u8; 512];
    probe.read_padded(0, &mut first)?;
    if len < u64::from(format::V2_HEADER_LEN) {
        return Err(DecodeError::Truncated {
            what: "header",
            need: format::V2_HEADER_LEN as usize,
            have: usize::try_from(len).unwrap_or(0),
        }
        .into());
    }
    let cluster_bits = be32(&first, 20);
    // Magic and version first, so a non-qcow2 file gets the right error; a v3 header longer
    // than this probe is parsed again below from the whole first cluster.
    match Header::parse(&first) {
        Ok(_) | Err(DecodeError::Truncated { .. }) => {}
        Err(e) => return Err(e.into()),
    }
    if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
        return Err(DecodeError::ClusterBits(cluster_bits).into());
    }
    let cs = 1u64 << cluster_bits;
    let mut head = vec![0u8; cs as usize];
    probe.read_padded(0, &mut head)?;
    let header = Header::parse(&head)?;
    let g = header.geometry();
    if header.refcount_order > MAX_REFCOUNT_ORDER {
        return Err(DecodeError::RefcountOrder(header.refcount_order).into());
    }
    if header.version == 3 && u64::from(header.header_length) > cs {
        return Err(DecodeError::HeaderLength(header.header_length).into());
    }
    let unknown = header.incompatible_features & !incompat::KNOWN;
    if unknown != 0 {
        return Err(CheckError::Unsupported(format!(
            "unknown incompatible feature bits {unknown:#x}"
        )));
    }
    if header.incompatible_features & incompat::EXTERNAL_DATA_FILE != 0 {
        return Err(CheckError::Unsupported("external data file".into()));
    }
    if g.extended_l2 && cluster_bits < format::MIN_EXTENDED_L2_CLUSTER_BITS {
        return Err(DecodeError::SubclusterSize(cluster_bits).into());
    }
    if header.crypt_method != 0 {
        return Err(DecodeError::Encrypted(header.crypt_method).into());
    }
    header.compression()?;
    if header.backing_file_offset != 0 {
        if header.backing_file_offset > cs {
            return Err(DecodeError::BackingName("invalid backing file offset".into()).into());
        }
        let room = (cs - header.backing_file_offset).min(u64::from(format::MAX_BACKING_FILE_NAME));
        if u64::from(header.backing_file_size) > room {
            return Err(DecodeError::BackingName("backing file name too long".into()).into());
        }
    }
    // Active L1 table.
    let l1_bytes = header.l1_table_bytes("active L1 table")?;
    validate_table_offset("L1 table", header.l1_table_offset, l1_bytes, &g)?;
    // Refcount table.
    let rt_bytes = header.refcount_table_bytes()?;
    validate_table_offset("refcount table", header.refcount_table_offset, rt_bytes, &g)?;
    // Snapshot table location.
    if header.nb_snapshots > MAX_SNAPSHOTS {
        return Err(invalid(format!(
            "too many snapshots ({})",
            header.nb_snapshots
        )));
    }
    validate_table_offset(
        "snapshot table",
        header.snapshots_offset,
        u64::from(header.nb_snapshots) * SNAPSHOT_HEADER_LEN,
        &g,
    )?;
    // Header extensions.
    let ext_start = usize::try_from(header.extensions_start()).unwrap_or(usize::MAX);
    let ext_end = usize::try_from(header.extensions_end())
        .unwrap_or(0)
        .min(head.len());
    let exts = match head.get(ext_start..ext_end) {
        Some(area) => format::parse_extensions(area)?,
        None => Vec::new(),
    };
    let mut img = probe;
    img.header = header;
    img.g = g;
    img.cs = cs;
    if img.header.autoclear_features & format::autoclear::BITMAPS != 0 {
        if let Some(HeaderExtension::Bitmaps(data)) = exts
            .iter()
            .find(|e| matches!(e, HeaderExtension::Bitmaps(_)))
        {
            img.bitmaps = Some(load_bitmaps(&img, data)?);
        }
    }
    img.l1 = img.read_table(img.header.l1_table_offset, img.header.l1_size.into())?;
    img.reftable = img.read_table(img.header.refcount_table_offset, rt_bytes / 8)?;
    load_snapshots(&mut img)?;
    Ok(img)
}

/// QEMU's `qcow2_validate_table`: aligned and `offset + size` fits in an `i64`; the table may
/// lie past the end of the file (it then reads as zeros).
fn validate_table_offset(
    what: &'static str,
    offset: u64,
    bytes: u64,
    g: &Geometry,
) -> Result<(), DecodeError> {
    // Like QEMU, this applies even to empty tables.
    if offset
        .checked_add(bytes)
        .is_none_or(|end| end > i64::MAX as u64)
    {
        return Err(DecodeError::Overflow(what));
    }
    if !g.is_aligned(offset) {
        return Err(DecodeError::Misaligned { what, offset });
    }
    Ok(())
}

fn be32(b: &[u8], at: usize) -> u32 {
    b.get(at..at + 4)
        .map_or(0, |s| u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
}

fn be16(b: &[u8], at: usize) -> u16 {
    b.get(at..at + 2)
        .map_or(0, |s| u16::from_be_bytes([s[0], s[1]]))
}

fn be64(b: &[u8], at: usize) -> u64 {
    table_entry(b.get(at..).unwrap_or(&[]), 0)
}

/// Reads the snapshot table entries (headers, ids and names; extra data is skipped).
fn load_snapshots(img: &mut Image) -> Result<(), CheckError> {
    let start = img.header.snapshots_offset;
    let mut off = start;
    for i in 0..img.header.nb_snapshots {
        // Every entry starts 8-byte aligned; the table ends where the last entry ends.
        off = off
            .checked_next_multiple_of(8)
            .ok_or(DecodeError::Overflow("snapshot table"))?;
        let mut h = [0u8; SNAPSHOT_HEADER_LEN as usize];
        img.read_padded(off, &mut h)?;
        let l1_table_offset = be64(&h, 0);
        let l1_size = be32(&h, 8);
        let id_len = u64::from(be16(&h, 12));
        let name_len = u64::from(be16(&h, 14));
        let extra = u64::from(be32(&h, 36));
        if extra > MAX_SNAPSHOT_EXTRA_DATA {
            return Err(invalid(format!(
                "snapshot {i}: extra data too large ({extra} bytes)"
            )));
        }
        let strings_at = off.saturating_add(SNAPSHOT_HEADER_LEN + extra);
        let mut strings = vec![0u8; (id_len + name_len) as usize];
        img.read_padded(strings_at, &mut strings)?;
        let (id, name) = strings.split_at(id_len as usize);
        let entry = SNAPSHOT_HEADER_LEN + extra + id_len + name_len;
        off = off
            .checked_add(entry)
            .ok_or(DecodeError::Overflow("snapshot table"))?;
        if off - start > MAX_SNAPSHOT_TABLE_BYTES {
            return Err(invalid("snapshot table too large"));
        }
        // QEMU: every v3 entry needs the 16 bytes of extra data holding the large VM state
        // size and the disk size.
        if img.header.version >= 3 && extra < 16 {
            img.incomplete_snapshots.push(i);
        }
        img.snapshots.push(Snapshot {
            l1_table_offset,
            l1_size,
            id: String::from_utf8_lossy(id).into_owned(),
            name: String::from_utf8_lossy(name).into_owned(),
        });
    }
    img.snapshots_size = off - start;
    Ok(())
}

/// Parses the bitmaps header extension and the bitmap directory it points to.
fn load_bitmaps(img: &Image, ext: &[u8]) -> Result<(u64, u64, Vec<BitmapTable>), CheckError> {
    if ext.len() < 24 {
        return Err(invalid("bitmaps extension too short"));
    }
    let nb = be32(ext, 0);
    let dir_size = be64(ext, 8);
    let dir_off = be64(ext, 16);
    if nb > 65535 || dir_size > 64 << 20 || !img.g.is_aligned(dir_off) {
        return Err(invalid("invalid bitmaps extension"));
    }
    let mut dir = vec![0u8; dir_size as usize];
    img.read_padded(dir_off, &mut dir)?;
    let mut tables = Vec::new();
    let mut pos = 0usize;
    for _ in 0..nb {
        let e = dir.get(pos..).unwrap_or(&[]);
        if e.len() < 24 {
            return Err(invalid("bitmap directory truncated"));
        }
        let name_size = usize::from(be16(e, 14));
        let extra = be32(e, 16) as usize;
        tables.push(BitmapTable {
            offset: be64(e, 0),
            entries: be32(e, 8),
        });
        pos = pos
            .checked_add((24 + extra + name_size).next_multiple_of(8))
            .ok_or_else(|| invalid("bitmap directory overflow"))?;
    }
    Ok((dir_off, dir_size, tables))
}

/// Counters of one pass, like QEMU's `BdrvCheckResult`.
#[derive(Debug, Clone, Copy, Default)]
struct Counts {
    corruptions: u64,
    leaks: u64,
    check_errors: u64,
    corruptions_fixed: u64,
    leaks_fixed: u64,
    allocated: u64,
    fragmented: u64,
    compressed: u64,
}

/// Collected messages, bounded.
#[derive(Debug, Default)]
struct Log {
    lines: Vec<String>,
    dropped: u64,
}

impl Log {
    fn push(&mut self, line: String) {
        if self.lines.len() < MAX_MESSAGES {
            self.lines.push(line);
        } else {
            self.dropped += 1;
        }
    }
}

/// A check stopped early; the string is qemu-img's "Check failed: ..." reason.
#[derive(Debug)]
struct Abort(String);

impl From<io::Error> for Abort {
    fn from(e: io::Error) -> Self {
        Abort(e.to_string())
    }
}

/// The expected refcount of every host cluster, computed from the references found.
struct Walk<'a> {
    img: &'a Image,
    expected: Vec<u32>,
    /// Largest value an expected refcount may reach (the image's refcount width).
    max: u64,
    res: Counts,
    log: &'a mut Log,
    /// Clusters counted for the refcount table and refcount blocks (for a rebuild).
    refcount_structure: Vec<u64>,
    entries_left: u64,
}

impl Walk<'_> {
    fn get(&self, k: u64) -> u64 {
        usize::try_from(k)
            .ok()
            .and_then(|k| self.expected.get(k))
            .map_or(0, |&v| u64::from(v))
    }

    /// QEMU's `qcow2_inc_refcounts_imrt`: counts one reference to every cluster of
    /// `[offset, offset + size)`; a range ending a cluster or more past the end of the file
    /// is a corruption and is not counted.
    fn inc(&mut self, offset: u64, size: u64, refcount_structure: bool) -> Result<(), Abort> {
        if size == 0 {
            return Ok(());
        }
        // QEMU does this test in signed 64-bit arithmetic: an offset at or above 2^63 (only
        // possible for a snapshot's L1 table) passes it and then makes QEMU's expected-refcount
        // array allocation fail. Report the same failure instead of a corruption.
        let qemu_past_end = offset
            .cast_signed()
            .wrapping_add(size.cast_signed())
            .wrapping_sub(self.img.len.cast_signed());
        let end = i128::from(offset) + i128::from(size);
        if qemu_past_end < self.img.cs.cast_signed()
            && end - i128::from(self.img.len) >= i128::from(self.img.cs)
        {
            self.res.check_errors += 1;
            return Err(Abort("Cannot allocate memory".into()));
        }
        if end - i128::from(self.img.len) >= i128::from(self.img.cs) {
            self.res.corruptions += 1;
            self.log.push(format!(
                "ERROR: counting reference for region exceeding the end of the file by one cluster or more: offset {offset:#x} size {size:#x}"
            ));
            return Ok(());
        }
        // In range of the file (plus less than one cluster), so the indices are bounded.
        let first = offset >> self.img.g.cluster_bits;
        let last = (offset + size - 1) >> self.img.g.cluster_bits;
        for k in first..=last {
            let idx = usize::try_from(k).map_err(|_| Abort("cluster index overflow".into()))?;
            if idx >= self.expected.len() {
                self.expected.resize(idx + 1, 0);
            }
            let cur = u64::from(self.expected[idx]);
            if cur >= self.max {
                self.res.corruptions += 1;
                self.log.push(format!(
                    "ERROR: overflow cluster offset={:#x}",
                    k << self.img.g.cluster_bits
                ));
                self.log.push(
                    "Use qemu-img amend to increase the refcount entry width or qemu-img convert to create a clean copy if the image cannot be opened for writing"
                        .to_string(),
                );
                continue;
            }
            self.expected[idx] = (cur + 1) as u32;
            if refcount_structure {
                self.refcount_structure.push(k);
            }
        }
        Ok(())
    }

    fn spend(&mut self, entries: u64) -> Result<(), Abort> {
        self.entries_left = self.entries_left.checked_sub(entries).ok_or_else(|| {
            Abort("image references too many tables to check (walk limit exceeded)".into())
        })?;
        Ok(())
    }

    /// QEMU's `check_refcounts_l1`.
    fn l1(
        &mut self,
        offset: u64,
        entries: u32,
        active: bool,
        fix: Option<Repair>,
    ) -> Result<(), Abort> {
        if entries == 0 {
            return Ok(());
        }
        self.inc(offset, u64::from(entries) * 8, false)?;
        self.spend(u64::from(entries))?;
        let l1 = if active {
            self.img.l1.clone()
        } else {
            self.img.read_table(offset, entries.into())?
        };
        for &e in &l1 {
            if e == 0 {
                continue;
            }
            if e & L1E_RESERVED_MASK != 0 {
                self.res.corruptions += 1;
                self.log.push(format!(
                    "ERROR found L1 entry with reserved bits set: {e:x}"
                ));
            }
            let l2 = e & L1E_OFFSET_MASK;
            self.inc(l2, self.img.cs, false)?;
            if !self.img.g.is_aligned(l2) {
                self.res.corruptions += 1;
                self.log.push(format!(
                    "ERROR l2_offset={l2:x}: Table is not cluster aligned; L1 entry corrupted"
                ));
            }
            self.l2(l2, active, fix)?;
        }
        Ok(())
    }

    /// QEMU's `check_refcounts_l2`.
    fn l2(&mut self, l2_offset: u64, active: bool, fix: Option<Repair>) -> Result<(), Abort> {
        let g = self.img.g;
        let cs = self.img.cs;
        if l2_offset >= self.img.len {
            // Reads as zeros: nothing allocated.
            return Ok(());
        }
        self.spend(g.l2_entries())?;
        let mut table = vec![0u8; cs as usize];
        self.img.read_padded(l2_offset, &mut table)?;
        let mut next_contiguous = 0u64;
        let w = g.l2_entry_words();
        for i in 0..g.l2_entries() as usize {
            let mut e = table_entry(&table, i * w);
            // The subcluster bitmap of an extended L2 entry (0 without them).
            let bitmap = if w == 2 {
                table_entry(&table, i * w + 1)
            } else {
                0
            };
            let compressed = e & OFLAG_COMPRESSED != 0;
            if !compressed && e & L2E_STD_RESERVED_MASK != 0 {
                self.res.corruptions += 1;
                self.log.push(format!(
                    "ERROR found l2 entry with reserved bits set: {e:x}"
                ));
            }
            if compressed {
                if e & OFLAG_COPIED != 0 {
                    self.res.corruptions += 1;
                    self.log.push(format!(
                        "ERROR: coffset={:#x}: copied flag must never be set for compressed clusters",
                        e & g.compressed_offset_mask()
                    ));
                    e &= !OFLAG_COPIED;
                }
                if bitmap != 0 {
                    self.res.corruptions += 1;
                    self.log.push(format!(
                        "ERROR compressed cluster {i} with non-zero subcluster allocation bitmap, entry={e:#x}"
                    ));
                    continue;
                }
                let coffset = e & g.compressed_offset_mask();
                let sectors =
                    ((e >> g.compressed_sector_shift()) & g.compressed_sectors_mask()) + 1;
                let csize = sectors * COMPRESSED_SECTOR_SIZE - (coffset % COMPRESSED_SECTOR_SIZE);
                self.inc(coffset, csize, false)?;
                if active {
                    self.res.allocated += 1;
                    self.res.compressed += 1;
                    self.res.fragmented += 1;
                }
                continue;
            }
            let host = e & L2E_OFFSET_MASK;
            if host == 0 {
                // Unallocated or plain zero cluster.
                if bitmap & format::L2_BITMAP_ALL_ALLOC != 0 {
                    self.res.corruptions += 1;
                    self.log.push(
                        "ERROR: Unallocated cluster has non-zero subcluster allocation map"
                            .to_string(),
                    );
                }
                continue;
            }
            if (bitmap >> 32) & bitmap != 0 {
                self.res.corruptions += 1;
                self.log.push(format!(
                    "ERROR offset={host:x}: Allocated cluster has corrupted subcluster allocation bitmap"
                ));
            }
            if !g.is_aligned(host) {
                self.res.corruptions += 1;
                let preallocated = if g.extended_l2 {
                    bitmap & format::L2_BITMAP_ALL_ALLOC == 0
                } else {
                    e & OFLAG_ZERO != 0
                };
                if preallocated {
                    let repair = fix.is_some_and(Repair::errors);
                    self.log.push(format!(
                        "{} offset={host:x}: Preallocated cluster is not properly aligned; L2 entry corrupted.",
                        if repair { "Repairing" } else { "ERROR" }
                    ));
                    if repair {
                        let at = l2_offset + (i * w) as u64 * 8;
                        // Zero cluster: the zero flag, or with subclusters an unallocated
                        // entry whose subclusters all keep reading as zeros.
                        let fixed = if g.extended_l2 {
                            let z = (bitmap | (bitmap << 32)) & format::L2_BITMAP_ALL_ZERO;
                            [0u64.to_be_bytes(), z.to_be_bytes()].concat()
                        } else {
                            OFLAG_ZERO.to_be_bytes().to_vec()
                        };
                        match self.img.file.write_all_at(&fixed, at) {
                            Ok(()) => {
                                self.img.file.sync_data()?;
                                self.res.corruptions -= 1;
                                self.res.corruptions_fixed += 1;
                                continue;
                            }
                            Err(err) => {
                                self.res.check_errors += 1;
                                self.log.push(format!(
                                    "ERROR: Failed to overwrite L2 table entry: {err}"
                                ));
                            }
                        }
                    }
                } else {
                    self.log.push(format!(
                        "ERROR offset={host:x}: Data cluster is not properly aligned; L2 entry corrupted."
                    ));
                }
            }
            if active {
                self.res.allocated += 1;
                if next_contiguous != 0 && host != next_contiguous {
                    self.res.fragmented += 1;
                }
                next_contiguous = host.saturating_add(cs);
            }
            self.inc(host, cs, false)?;
        }
        Ok(())
    }

    /// QEMU's `check_refblocks`.
    fn refblocks(
        &mut self,
        fix: Option<Repair>,
        rebuild: &mut bool,
        file_len: &mut u64,
    ) -> Result<(), Abort> {
        let cs = self.img.cs;
        let bits = self.img.g.cluster_bits;
        for (i, &e) in self.img.reftable.iter().enumerate() {
            let offset = e & REFT_OFFSET_MASK;
            let cluster = offset >> bits;
            if e & REFT_RESERVED_MASK != 0 {
                self.log.push(format!(
                    "ERROR refcount table entry {i} has reserved bits set"
                ));
                self.res.corruptions += 1;
                *rebuild = true;
                continue;
            }
            if !self.img.g.is_aligned(offset) {
                self.log.push(format!(
                    "ERROR refcount block {i} is not cluster aligned; refcount table entry corrupted"
                ));
                self.res.corruptions += 1;
                *rebuild = true;
                continue;
            }
            if cluster >= self.expected.len() as u64 {
                self.res.corruptions += 1;
                let repair = fix.is_some_and(Repair::errors);
                self.log.push(format!(
                    "{} refcount block {i} is outside image",
                    if repair { "Repairing" } else { "ERROR" }
                ));
                if repair {
                    // Grow the file so the refcount block exists (reads as zeros), as QEMU
                    // does, but never past the check's own size bound.
                    let new_len = offset
                        .checked_add(cs)
                        .filter(|&l| l / cs <= MAX_CHECK_CLUSTERS);
                    let grown = match new_len {
                        Some(l) => self.img.file.set_len(l).map(|()| l),
                        None => Err(io::Error::from_raw_os_error(libc::EINVAL)),
                    };
                    match grown {
                        Ok(l) => {
                            *file_len = l;
                            self.expected.resize(l.div_ceil(cs) as usize, 0);
                            self.res.corruptions -= 1;
                            self.res.corruptions_fixed += 1;
                            // The block is now inside the file; count it against the new length.
                            let k = cluster as usize;
                            if let Some(v) = self.expected.get_mut(k) {
                                *v = v.saturating_add(1);
                            }
                            self.refcount_structure.push(cluster);
                            continue;
                        }
                        Err(err) => {
                            *rebuild = true;
                            self.log
                                .push(format!("ERROR could not resize image: {err}"));
                        }
                    }
                }
                continue;
            }
            if offset != 0 {
                self.inc(offset, cs, true)?;
                let n = self.get(cluster);
                if n != 1 {
                    self.log
                        .push(format!("ERROR refcount block {i} refcount={n}"));
                    self.res.corruptions += 1;
                    *rebuild = true;
                }
            }
        }
        Ok(())
    }

    /// QEMU's `calculate_refcounts`.
    fn calculate(
        &mut self,
        fix: Option<Repair>,
        rebuild: &mut bool,
        file_len: &mut u64,
    ) -> Result<(), Abort> {
        let img = self.img;
        let h = &img.header;
        self.inc(0, img.cs, false)?;
        self.l1(h.l1_table_offset, h.l1_size, true, fix)?;
        for sn in &img.snapshots {
            if !img.g.is_aligned(sn.l1_table_offset) {
                self.res.corruptions += 1;
                self.log.push(format!(
                    "ERROR snapshot {} ({}) l1_offset={:#x}: L1 table is not cluster aligned; snapshot table entry corrupted",
                    sn.id, sn.name, sn.l1_table_offset
                ));
                continue;
            }
            if u64::from(sn.l1_size) > MAX_L1_BYTES / 8 {
                self.res.corruptions += 1;
                self.log.push(format!(
                    "ERROR snapshot {} ({}) l1_size={:#x}: L1 table is too large; snapshot table entry corrupted",
                    sn.id, sn.name, sn.l1_size
                ));
                continue;
            }
            self.l1(sn.l1_table_offset, sn.l1_size, false, fix)?;
        }
        self.inc(h.snapshots_offset, img.snapshots_size, false)?;
        self.inc(h.refcount_table_offset, img.reftable.len() as u64 * 8, true)?;
        if let Some((dir_off, dir_size, tables)) = &img.bitmaps {
            self.bitmaps(*dir_off, *dir_size, tables)?;
        }
        self.refblocks(fix, rebuild, file_len)
    }

    /// QEMU's `qcow2_check_bitmaps_refcounts`.
    fn bitmaps(
        &mut self,
        dir_off: u64,
        dir_size: u64,
        tables: &[BitmapTable],
    ) -> Result<(), Abort> {
        if tables.is_empty() {
            return Ok(());
        }
        self.inc(dir_off, dir_size, false)?;
        for t in tables {
            self.inc(t.offset, u64::from(t.entries) * 8, false)?;
            if !self.img.g.is_aligned(t.offset) || u64::from(t.entries) * 8 > MAX_L1_BYTES {
                self.res.corruptions += 1;
                break;
            }
            self.spend(t.entries.into())?;
            for e in self.img.read_table(t.offset, t.entries.into())? {
                let off = e & BITMAP_ENTRY_OFFSET_MASK;
                let bad = e & BITMAP_ENTRY_RESERVED_MASK != 0
                    || (off != 0 && (e & 1 != 0 || !self.img.g.is_aligned(off)));
                if bad {
                    self.res.corruptions += 1;
                    continue;
                }
                if off != 0 {
                    self.inc(off, self.img.cs, false)?;
                }
            }
        }
        Ok(())
    }
}

/// Reads (and for a repair, updates) the refcounts stored in the image, one refcount block
/// at a time.
struct StoredRefcounts<'a> {
    img: &'a Image,
    /// The refcount block in the cache: its offset, contents, and whether it was modified.
    block: Option<(u64, Vec<u8>, bool)>,
}

/// The stored refcount cannot be read (misaligned refcount block).
struct Unreadable;

impl StoredRefcounts<'_> {
    fn locate(&self, cluster: u64) -> Result<Option<(u64, u64)>, Unreadable> {
        let g = self.img.g;
        let epb = g.refcount_block_entries();
        let idx = cluster / epb;
        let Some(&e) = usize::try_from(idx)
            .ok()
            .and_then(|i| self.img.reftable.get(i))
        else {
            return Ok(None);
        };
        let off = e & REFT_OFFSET_MASK;
        if off == 0 {
            return Ok(None);
        }
        if !g.is_aligned(off) {
            return Err(Unreadable);
        }
        Ok(Some((off, cluster % epb)))
    }

    fn load(&mut self, off: u64) -> io::Result<&mut (u64, Vec<u8>, bool)> {
        if self.block.as_ref().is_none_or(|b| b.0 != off) {
            self.flush()?;
            let mut buf = vec![0u8; self.img.cs as usize];
            self.img.read_padded(off, &mut buf)?;
            self.block = Some((off, buf, false));
        }
        self.block
            .as_mut()
            .ok_or_else(|| io::Error::other("refcount block cache is empty"))
    }

    /// QEMU's `qcow2_get_refcount`.
    fn get(&mut self, cluster: u64) -> Result<u64, Unreadable> {
        let Some((off, index)) = self.locate(cluster)? else {
            return Ok(0);
        };
        let order = self.img.g.refcount_order;
        let block = self.load(off).map_err(|_| Unreadable)?;
        Ok(refcount_get(&block.1, order, index).unwrap_or(0))
    }

    fn set(&mut self, cluster: u64, value: u64) -> io::Result<()> {
        let Ok(Some((off, index))) = self.locate(cluster) else {
            return Err(io::Error::other("no refcount block for the cluster"));
        };
        let order = self.img.g.refcount_order;
        let block = self.load(off)?;
        refcount_set(&mut block.1, order, index, value).map_err(io::Error::other)?;
        block.2 = true;
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        if let Some((off, buf, dirty)) = &mut self.block {
            if *dirty {
                self.img.file.write_all_at(buf, *off)?;
                *dirty = false;
            }
        }
        Ok(())
    }
}

/// QEMU's `compare_refcounts`; returns the highest cluster in use.
fn compare(
    img: &Image,
    expected: &[u32],
    fix: Option<Repair>,
    res: &mut Counts,
    log: &mut Log,
    rebuild: &mut bool,
) -> Result<u64, Abort> {
    let mut stored = StoredRefcounts { img, block: None };
    let mut highest = 0u64;
    for (i, &want) in expected.iter().enumerate() {
        let i = i as u64;
        let Ok(have) = stored.get(i) else {
            log.push(format!(
                "Can't get refcount for cluster {i}: Input/output error"
            ));
            res.check_errors += 1;
            continue;
        };
        let want = u64::from(want);
        if have > 0 || want > 0 {
            highest = i;
        }
        if have == want {
            continue;
        }
        let fixable = if have == 0 {
            *rebuild = true;
            false
        } else if have > want {
            fix.is_some_and(Repair::leaks)
        } else {
            fix.is_some_and(Repair::errors)
        };
        log.push(format!(
            "{} cluster {i} refcount={have} reference={want}",
            if fixable {
                "Repairing"
            } else if have < want {
                "ERROR"
            } else {
                "Leaked"
            }
        ));
        if fixable {
            match stored.set(i, want) {
                Ok(()) => {
                    if have > want {
                        res.leaks_fixed += 1;
                    } else {
                        res.corruptions_fixed += 1;
                    }
                    continue;
                }
                Err(e) => log.push(format!(
                    "ERROR could not update refcount of cluster {i}: {e}"
                )),
            }
        }
        if have < want {
            res.corruptions += 1;
        } else {
            res.leaks += 1;
        }
    }
    stored.flush()?;
    if fix.is_some() {
        img.file.sync_data()?;
    }
    Ok(highest)
}

/// Whether `[off, off + len)` overlaps metadata other than the active L2 tables (QEMU's
/// pre-write overlap check for rewriting an L2 table).
fn overlaps_metadata(img: &Image, off: u64, len: u64, writing: Writing) -> bool {
    let h = &img.header;
    // Compare whole clusters, like QEMU.
    let off = img.g.cluster_start(off);
    let len = img.g.align_up(len).unwrap_or(u64::MAX);
    let hit = |start: u64, size: u64| {
        size > 0 && start < off.saturating_add(len) && off < start.saturating_add(size)
    };
    let l2s = || {
        img.l1.iter().any(|&e| {
            let t = e & L1E_OFFSET_MASK;
            t != 0 && hit(t, img.cs)
        })
    };
    off < img.cs
        || (writing != Writing::ActiveL1 && hit(h.l1_table_offset, u64::from(h.l1_size) * 8))
        || (writing != Writing::ActiveL2 && l2s())
        || img
            .bitmaps
            .as_ref()
            .is_some_and(|(d, size, _)| hit(*d, *size))
        || hit(h.refcount_table_offset, img.reftable.len() as u64 * 8)
        || hit(h.snapshots_offset, img.snapshots_size)
        || img
            .snapshots
            .iter()
            .any(|s| hit(s.l1_table_offset, u64::from(s.l1_size) * 8))
        || img.reftable.iter().any(|&e| {
            let b = e & REFT_OFFSET_MASK;
            b != 0 && hit(b, img.cs)
        })
}

/// Which kind of metadata a repair is rewriting (it may overlap itself).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Writing {
    ActiveL1,
    ActiveL2,
}

/// QEMU's `check_oflag_copied`: the COPIED flag of every active L1 and L2 entry must say
/// whether the stored refcount is exactly 1.
fn oflag_copied(
    img: &Image,
    fix: Option<Repair>,
    res: &mut Counts,
    log: &mut Log,
) -> Result<(), Abort> {
    let repair = match fix {
        Some(Repair::All) => true,
        Some(Repair::Leaks) => res.check_errors == 0 && res.corruptions == 0 && res.leaks == 0,
        None => false,
    };
    let mut stored = StoredRefcounts { img, block: None };
    let cs = img.cs;
    let bits = img.g.cluster_bits;
    let mut table = vec![0u8; cs as usize];
    for (i, &l1e) in img.l1.iter().enumerate() {
        let l2_offset = l1e & L1E_OFFSET_MASK;
        if l2_offset == 0 {
            continue;
        }
        let Ok(refcount) = stored.get(l2_offset >> bits) else {
            continue;
        };
        if (refcount == 1) != (l1e & OFLAG_COPIED != 0) {
            res.corruptions += 1;
            log.push(format!(
                "{} OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={l1e:x} refcount={refcount}",
                if repair { "Repairing" } else { "ERROR" }
            ));
            if repair {
                let new = if refcount == 1 {
                    l1e | OFLAG_COPIED
                } else {
                    l1e & !OFLAG_COPIED
                };
                let at = img.header.l1_table_offset + i as u64 * 8;
                if overlaps_metadata(img, at, 8, Writing::ActiveL1) {
                    res.check_errors += 1;
                    log.push(
                        "ERROR: Could not write L1 entry; metadata overlap check failed"
                            .to_string(),
                    );
                    return Err(Abort("metadata overlap check failed".into()));
                }
                if let Err(e) = img
                    .file
                    .write_all_at(&new.to_be_bytes(), at)
                    .and_then(|()| img.file.sync_data())
                {
                    res.check_errors += 1;
                    return Err(Abort(e.to_string()));
                }
                res.corruptions -= 1;
                res.corruptions_fixed += 1;
            }
        }
        if l2_offset >= img.len {
            // Reads as zeros: no entries to look at.
            continue;
        }
        img.read_padded(l2_offset, &mut table)?;
        let mut dirty = 0u64;
        let w = img.g.l2_entry_words();
        for j in 0..img.g.l2_entries() as usize {
            let e = table_entry(&table, j * w);
            let data = e & L2E_OFFSET_MASK;
            if e & OFLAG_COMPRESSED != 0 || data == 0 {
                continue;
            }
            let Ok(refcount) = stored.get(data >> bits) else {
                continue;
            };
            if (refcount == 1) != (e & OFLAG_COPIED != 0) {
                res.corruptions += 1;
                log.push(format!(
                    "{} OFLAG_COPIED data cluster: l2_entry={e:x} refcount={refcount}",
                    if repair { "Repairing" } else { "ERROR" }
                ));
                if repair {
                    let new = if refcount == 1 {
                        e | OFLAG_COPIED
                    } else {
                        e & !OFLAG_COPIED
                    };
                    format::set_table_entry(&mut table, j * w, new);
                    dirty += 1;
                }
            }
        }
        if dirty > 0 {
            if overlaps_metadata(img, l2_offset, cs, Writing::ActiveL2) {
                log.push(
                    "ERROR: Could not write L2 table; metadata overlap check failed: Input/output error"
                        .to_string(),
                );
                res.check_errors += 1;
                return Err(Abort("metadata overlap check failed".into()));
            }
            if let Err(e) = img.file.write_all_at(&table, l2_offset) {
                log.push(format!("ERROR: Could not write L2 table: {e}"));
                res.check_errors += 1;
                return Err(Abort(e.to_string()));
            }
            res.corruptions -= dirty;
            res.corruptions_fixed += dirty;
        }
    }
    if repair {
        img.file.sync_data()?;
    }
    Ok(())
}

/// First fit of `n` contiguous clusters neither in `used` nor in `avoid`, at or after
/// `*cursor`; marks them used.
fn alloc_clusters(
    used: &mut Vec<u32>,
    avoid: &HashSet<u64>,
    n: u64,
    cursor: &mut u64,
) -> Result<u64, Abort> {
    let mut start = *cursor;
    let mut run = 0u64;
    let mut k = *cursor;
    while run < n {
        let busy = usize::try_from(k)
            .ok()
            .and_then(|i| used.get(i))
            .is_some_and(|&v| v > 0)
            || avoid.contains(&k);
        if busy {
            run = 0;
            start = k + 1;
        } else {
            run += 1;
        }
        k += 1;
    }
    let end = start + n;
    if end > MAX_CHECK_CLUSTERS + (1 << 20) {
        return Err(Abort("no room for the rebuilt refcount structure".into()));
    }
    if used.len() < end as usize {
        used.resize(end as usize, 0);
    }
    for c in start..end {
        used[c as usize] = 1;
    }
    *cursor = end;
    Ok(start)
}

/// Builds a new refcount structure from the expected refcounts and switches the header to
/// it. New refcount blocks and the new refcount table go into clusters nothing references
/// (the old refcount structure stays untouched until the header switch), so a crash leaves
/// either the old or the new structure in force.
fn rebuild_refcounts(img: &Image, expected: &[u32], old_structure: &[u64]) -> Result<(), Abort> {
    let g = img.g;
    let cs = img.cs;
    let epb = g.refcount_block_entries();
    // Occupancy: everything referenced, including the old refcount structure.
    let mut used: Vec<u32> = expected.to_vec();
    // The values to store: the old refcount structure will no longer be referenced.
    let mut extra: HashMap<u64, u64> = HashMap::new();
    let mut minus: HashMap<u64, u64> = HashMap::new();
    for &k in old_structure {
        *minus.entry(k).or_default() += 1;
    }
    // Never write over any part of the old refcount structure, even the parts the check could
    // not count (misaligned or flagged entries): it stays valid until the header switch.
    let mut avoid: HashSet<u64> = HashSet::new();
    let rt_first = img.header.refcount_table_offset >> g.cluster_bits;
    let rt_n = (img.reftable.len() as u64 * 8).div_ceil(cs);
    avoid.extend(rt_first..rt_first.saturating_add(rt_n));
    for &e in &img.reftable {
        let off = e & REFT_OFFSET_MASK;
        if off != 0 {
            avoid.insert(off >> g.cluster_bits);
            avoid.insert(off.saturating_add(cs - 1) >> g.cluster_bits);
        }
    }
    let mut cursor = 1u64;
    let mut blocks: Vec<u64> = Vec::new(); // reftable index -> block offset (0 = none)
    let mut reftable_at: Option<(u64, u64)> = None; // (first cluster, clusters)
    loop {
        // Give every refcount block range holding a used cluster a block.
        let mut idx = 0u64;
        while idx * epb < used.len() as u64 {
            let lo = (idx * epb) as usize;
            let hi = ((idx + 1) * epb).min(used.len() as u64) as usize;
            let needed = used[lo..hi].iter().any(|&v| v > 0);
            if needed && blocks.get(idx as usize).copied().unwrap_or(0) == 0 {
                let c = alloc_clusters(&mut used, &avoid, 1, &mut cursor)?;
                if blocks.len() <= idx as usize {
                    blocks.resize(idx as usize + 1, 0);
                }
                blocks[idx as usize] = c * cs;
                extra.insert(c, 1);
                // The new block may lie in a range that needs a block: rescan from there.
                idx = idx.min(c / epb);
                continue;
            }
            idx += 1;
        }
        let rt_clusters = (blocks.len() as u64 * 8).div_ceil(cs).max(1);
        if rt_clusters * cs > MAX_REFCOUNT_TABLE_BYTES {
            return Err(Abort("rebuilt refcount table would be too large".into()));
        }
        match reftable_at {
            Some((_, n)) if n >= rt_clusters => break,
            Some((first, n)) => {
                // Too small now: give the clusters back (nothing was written yet) and retry.
                for c in first..first + n {
                    used[c as usize] = 0;
                    extra.remove(&c);
                }
                cursor = 1;
            }
            None => {}
        }
        let first = alloc_clusters(&mut used, &avoid, rt_clusters, &mut cursor)?;
        for c in first..first + rt_clusters {
            extra.insert(c, 1);
        }
        reftable_at = Some((first, rt_clusters));
    }
    let (rt_first, rt_clusters) = reftable_at.ok_or_else(|| Abort("no refcount table".into()))?;
    // Write the refcount blocks, then the table, then sync; only then switch the header.
    let value = |k: u64| -> u64 {
        let base = usize::try_from(k)
            .ok()
            .and_then(|i| expected.get(i))
            .map_or(0, |&v| u64::from(v));
        base.saturating_sub(minus.get(&k).copied().unwrap_or(0))
            + extra.get(&k).copied().unwrap_or(0)
    };
    let mut buf = vec![0u8; cs as usize];
    for (idx, &off) in blocks.iter().enumerate() {
        if off == 0 {
            continue;
        }
        buf.fill(0);
        let base = idx as u64 * epb;
        for j in 0..epb {
            let v = value(base + j).min(g.refcount_max());
            if v != 0 {
                refcount_set(&mut buf, g.refcount_order, j, v).map_err(|e| Abort(e.to_string()))?;
            }
        }
        img.file.write_all_at(&buf, off)?;
    }
    let mut rt = vec![0u8; (rt_clusters * cs) as usize];
    for (i, &off) in blocks.iter().enumerate() {
        format::set_table_entry(&mut rt, i, off);
    }
    img.file.write_all_at(&rt, rt_first * cs)?;
    img.file.sync_all()?;
    let mut hdr = [0u8; 12];
    hdr[..8].copy_from_slice(&(rt_first * cs).to_be_bytes());
    hdr[8..].copy_from_slice(&(rt_clusters as u32).to_be_bytes());
    img.file
        .write_all_at(&hdr, REFCOUNT_TABLE_OFFSET_OFFSET as u64)?;
    img.file.sync_all()?;
    Ok(())
}

/// The result of calculating the expected refcounts of an image.
struct Calculated {
    expected: Vec<u32>,
    refcount_structure: Vec<u64>,
    res: Counts,
    rebuild: bool,
}

fn calculate(img: &mut Image, fix: Option<Repair>, log: &mut Log) -> Result<Calculated, Abort> {
    let clusters = img.clusters();
    let max = img.g.refcount_max().min(u64::from(u32::MAX));
    let mut rebuild = false;
    let mut file_len = img.len;
    let mut walk = Walk {
        img,
        expected: vec![0; clusters as usize],
        max,
        res: Counts::default(),
        log,
        refcount_structure: Vec::new(),
        entries_left: (img.len / 8)
            .saturating_mul(1 + u64::from(img.header.nb_snapshots))
            .saturating_add(EXTRA_ENTRIES_WALKED)
            .min(MAX_ENTRIES_WALKED),
    };
    let r = walk.calculate(fix, &mut rebuild, &mut file_len);
    let out = Calculated {
        expected: walk.expected,
        refcount_structure: walk.refcount_structure,
        res: walk.res,
        rebuild,
    };
    img.len = file_len;
    r.map(|()| out)
}

/// One pass of `qcow2_check_refcounts` (+ the mark-clean step of `qcow2_co_check_locked`).
fn run(path: &Path, fix: Option<Repair>) -> Result<CheckReport, CheckError> {
    let mut img = load(path, fix.is_some())?;
    let clusters = img.clusters();
    if clusters > MAX_CHECK_CLUSTERS {
        return Err(CheckError::TooLarge(format!(
            "{clusters} clusters in the file, the check handles at most {MAX_CHECK_CLUSTERS}"
        )));
    }
    let mut log = Log::default();
    let mut report = CheckReport {
        total_clusters: img.header.size.div_ceil(img.cs),
        ..CheckReport::default()
    };
    // QEMU checks the snapshot table first and adds its findings after the refcount check.
    // Incomplete entries are reported but not rewritten (see the module docs).
    let incomplete = img.incomplete_snapshots.len() as u64;
    for i in &img.incomplete_snapshots {
        log.push(format!("ERROR snapshot table entry {i} is incomplete"));
    }
    let outcome = pass(path, &mut img, fix, &mut log);
    let (res, highest) = match outcome {
        Ok(v) => v,
        Err((res, Abort(why))) => {
            report.failure = Some(why);
            (res, None)
        }
    };
    report.corruptions = res.corruptions + incomplete;
    report.leaks = res.leaks;
    report.check_errors = res.check_errors;
    report.corruptions_fixed = res.corruptions_fixed;
    report.leaks_fixed = res.leaks_fixed;
    report.allocated_clusters = res.allocated;
    report.fragmented_clusters = res.fragmented;
    report.compressed_clusters = res.compressed;
    report.image_end_offset = highest.map_or(0, |h| (h + 1) * img.cs);
    if fix.is_some()
        && report.failure.is_none()
        && report.check_errors == 0
        && report.corruptions == 0
    {
        mark_clean(&img)?;
    }
    report.messages = log.lines;
    report.messages_dropped = log.dropped;
    Ok(report)
}

/// Clears the dirty and corrupt bits after a successful repair.
fn mark_clean(img: &Image) -> Result<(), CheckError> {
    let bits = incompat::DIRTY | incompat::CORRUPT;
    if img.header.version < 3 || img.header.incompatible_features & bits == 0 {
        return Ok(());
    }
    img.file.sync_all()?;
    let v = img.header.incompatible_features & !bits;
    img.file
        .write_all_at(&v.to_be_bytes(), INCOMPATIBLE_FEATURES_OFFSET as u64)?;
    img.file.sync_all()?;
    Ok(())
}

type PassResult = Result<(Counts, Option<u64>), (Counts, Abort)>;

fn pass(path: &Path, img: &mut Image, fix: Option<Repair>, log: &mut Log) -> PassResult {
    let mut calc = match calculate(img, fix, log) {
        Ok(c) => c,
        Err(e) => {
            return Err((
                Counts {
                    check_errors: 1,
                    ..Counts::default()
                },
                e,
            ))
        }
    };
    let pre_compare = calc.res;
    let mut res = calc.res;
    let mut rebuild = calc.rebuild;
    let mut highest = match compare(img, &calc.expected, None, &mut res, log, &mut rebuild) {
        Ok(h) => h,
        Err(e) => return Err((res, e)),
    };
    if rebuild && fix.is_some_and(Repair::errors) {
        let old = res;
        log.push("Rebuilding refcount structure".to_string());
        if let Err(e) = rebuild_refcounts(img, &calc.expected, &calc.refcount_structure) {
            res.check_errors += 1;
            return Err((res, e));
        }
        // The header now points to the new structure: load it and recalculate.
        // Reuse the open file description: it holds the image lock, and a second description
        // of the same file would conflict with it.
        let reloaded = img
            .file
            .try_clone()
            .map_err(CheckError::Io)
            .and_then(|f| load_file(path, f));
        *img = match reloaded {
            Ok(i) => i,
            Err(e) => {
                res.check_errors += 1;
                return Err((res, Abort(e.to_string())));
            }
        };
        calc = match calculate(img, None, log) {
            Ok(c) => c,
            Err(e) => return Err((res, e)),
        };
        let mut after = res;
        after.corruptions = calc.res.corruptions;
        after.leaks = calc.res.leaks;
        after.check_errors += calc.res.check_errors;
        after.corruptions_fixed += calc.res.corruptions_fixed;
        let mut fresh = Counts::default();
        let mut broken = false;
        highest = match compare(
            img,
            &calc.expected,
            Some(Repair::Leaks),
            &mut fresh,
            log,
            &mut broken,
        ) {
            Ok(h) => h,
            Err(e) => return Err((after, e)),
        };
        if broken {
            log.push("ERROR rebuilt refcount structure is still broken".to_string());
        }
        if after.corruptions < old.corruptions {
            after.corruptions_fixed += old.corruptions - after.corruptions;
        }
        if after.leaks < old.leaks {
            after.leaks_fixed += old.leaks - after.leaks;
        }
        after.leaks += fresh.leaks;
        after.allocated = old.allocated;
        after.fragmented = old.fragmented;
        after.compressed = old.compressed;
        res = after;
    } else if fix.is_some() {
        if rebuild {
            log.push("ERROR need to rebuild refcount structures".to_string());
            res.check_errors += 1;
            return Err((res, Abort("Input/output error".into())));
        }
        if res.leaks > 0 || res.corruptions > 0 {
            res = pre_compare;
            let mut again = false;
            highest = match compare(img, &calc.expected, fix, &mut res, log, &mut again) {
                Ok(h) => h,
                Err(e) => return Err((res, e)),
            };
        }
    }
    if let Err(e) = oflag_copied(img, fix, &mut res, log) {
        return Err((res, e));
    }
    Ok((res, Some(highest)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::OpenOptions;

    const CS: u64 = 4096;

    /// A hand-made v3 image (no engine involved): header, refcount table, one refcount block,
    /// L1, one L2 table and two data clusters, all with refcount 1 and COPIED set.
    fn handmade(dir: &Path) -> std::path::PathBuf {
        let g = Geometry::standard(12, 4);
        let mut h = Header::new_v3(1 << 20, 12, 4);
        h.refcount_table_offset = CS;
        h.refcount_table_clusters = 1;
        h.l1_table_offset = 3 * CS;
        h.l1_size = g.l1_entries_for(h.size).expect("l1 size") as u32;
        let mut img = vec![0u8; 7 * CS as usize];
        let hb = h.serialize();
        img[..hb.len()].copy_from_slice(&hb);
        format::set_table_entry(&mut img[CS as usize..], 0, 2 * CS);
        for c in 0..7 {
            refcount_set(&mut img[2 * CS as usize..3 * CS as usize], 4, c, 1).expect("set");
        }
        format::set_table_entry(&mut img[3 * CS as usize..], 0, OFLAG_COPIED | (4 * CS));
        format::set_table_entry(&mut img[4 * CS as usize..], 0, OFLAG_COPIED | (5 * CS));
        format::set_table_entry(&mut img[4 * CS as usize..], 3, OFLAG_COPIED | (6 * CS));
        let p = dir.join("hand.qcow2");
        std::fs::write(&p, &img).expect("write image");
        p
    }

    fn set_rc(p: &Path, cluster: u64, v: u64) {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(p)
            .expect("open");
        let mut b = vec![0u8; CS as usize];
        f.read_exact_at(&mut b, 2 * CS).expect("read");
        refcount_set(&mut b, 4, cluster, v).expect("set");
        f.write_all_at(&b, 2 * CS).expect("write");
    }

    #[test]
    fn consistent_image_reports_no_errors_and_exit_code_zero() {
        let d = tempfile::tempdir().expect("tempdir");
        let r = check(&handmade(d.path()), None).expect("check");
        assert_eq!(
            (r.corruptions, r.leaks, r.check_errors, r.exit_code()),
            (0, 0, 0, 0),
            "{r}"
        );
        assert_eq!(r.image_end_offset, 7 * CS);
        assert_eq!(r.allocated_clusters, 2);
        assert!(r
            .to_string()
            .starts_with("No errors were found on the image.\n"));
    }

    #[test]
    fn refcount_above_references_is_a_leak_that_repair_leaks_lowers() {
        let d = tempfile::tempdir().expect("tempdir");
        let p = handmade(d.path());
        set_rc(&p, 6, 3);
        let r = check(&p, None).expect("check");
        assert_eq!((r.leaks, r.exit_code()), (1, 2), "{r}"); // + COPIED now wrong
        assert!(r
            .messages
            .contains(&"Leaked cluster 6 refcount=3 reference=1".to_string()));
        let fixed = check(&p, Some(Repair::Leaks)).expect("repair");
        assert_eq!((fixed.leaks_fixed, fixed.exit_code()), (1, 0), "{fixed}");
        assert!(fixed
            .to_string()
            .contains("    1 leaked clusters\n    0 corruptions\n"));
        assert_eq!(check(&p, None).expect("check").exit_code(), 0);
    }

    #[test]
    fn zero_refcount_of_used_cluster_is_rebuilt_without_overwriting_the_old_structure() {
        let d = tempfile::tempdir().expect("tempdir");
        let p = handmade(d.path());
        set_rc(&p, 5, 0);
        let r = check(&p, None).expect("check");
        assert_eq!(r.exit_code(), 2);
        assert!(r
            .messages
            .contains(&"ERROR cluster 5 refcount=0 reference=1".to_string()));
        // Leaks-only repair must refuse, like qemu-img.
        let refused = check(&p, Some(Repair::Leaks)).expect("repair");
        assert_eq!(refused.exit_code(), 1);
        let before = std::fs::read(&p).expect("read");
        let fixed = check(&p, Some(Repair::All)).expect("repair");
        assert_eq!(fixed.exit_code(), 0, "{fixed}");
        let after = std::fs::read(&p).expect("read");
        // Old refcount table and block untouched; the header points to new ones elsewhere.
        assert_eq!(
            before[CS as usize..3 * CS as usize],
            after[CS as usize..3 * CS as usize]
        );
        let h = Header::parse(&after).expect("header");
        assert!(h.refcount_table_offset >= 7 * CS, "{h:?}");
        assert_eq!(check(&p, None).expect("check").exit_code(), 0);
    }

    #[test]
    fn wrong_copied_flag_is_a_corruption_fixed_by_repair_all() {
        let d = tempfile::tempdir().expect("tempdir");
        let p = handmade(d.path());
        let f = OpenOptions::new().write(true).open(&p).expect("open");
        f.write_all_at(&(5 * CS).to_be_bytes(), 4 * CS)
            .expect("write");
        let r = check(&p, None).expect("check");
        assert_eq!((r.corruptions, r.exit_code()), (1, 2));
        assert_eq!(
            r.messages,
            vec![format!(
                "ERROR OFLAG_COPIED data cluster: l2_entry={:x} refcount=1",
                5 * CS
            )]
        );
        let fixed = check(&p, Some(Repair::All)).expect("repair");
        assert_eq!((fixed.corruptions_fixed, fixed.exit_code()), (1, 0));
    }

    #[test]
    fn unopenable_images_are_errors_with_exit_code_one() {
        let d = tempfile::tempdir().expect("tempdir");
        let p = d.path().join("junk");
        std::fs::write(
            &p,
            b"not a qcow2 image at all, just some bytes that go on for a while..",
        )
        .expect("write");
        let e = check(&p, None).expect_err("junk");
        assert_eq!(e.exit_code(), 1);
        let missing = check(&d.path().join("missing"), None).expect_err("missing");
        assert!(matches!(missing, CheckError::Open { .. }));
    }
}
