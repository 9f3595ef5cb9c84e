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
//! `-r all`). Images with an external data file or unknown incompatible features are refused
//! with [`CheckError::Unsupported`]; extended L2 entries are checked (subcluster bitmaps
//! included) like QEMU checks them.
//!
//! Modules, in the order a check runs: `image` (load and validate the header, tables, snapshot
//! and bitmap directories), `walk` (count every reference into the expected refcounts),
//! `refcounts` (read the stored refcounts and compare), `repair` (`OFLAG_COPIED` and the
//! refcount rebuild); this file holds the report types and drives the passes.
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

mod image;
mod refcounts;
mod repair;
mod walk;

use image::{load, load_file, Image};
use refcounts::compare;
use repair::{oflag_copied, rebuild_refcounts};
use walk::{Abort, Counts, Log, Walk};

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
