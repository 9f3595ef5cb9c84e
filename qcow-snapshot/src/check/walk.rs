//! The walk: counts every reference found in the image into the expected refcount of each host
//! cluster (QEMU's `qcow2_check_refcounts` first half), with its counters and message log.

use super::image::{BitmapTable, Image};
use super::*;

/// Counters of one pass, like QEMU's `BdrvCheckResult`.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Counts {
    pub(super) corruptions: u64,
    pub(super) leaks: u64,
    pub(super) check_errors: u64,
    pub(super) corruptions_fixed: u64,
    pub(super) leaks_fixed: u64,
    pub(super) allocated: u64,
    pub(super) fragmented: u64,
    pub(super) compressed: u64,
}

/// Collected messages, bounded.
#[derive(Debug, Default)]
pub(super) struct Log {
    pub(super) lines: Vec<String>,
    pub(super) dropped: u64,
}

impl Log {
    pub(super) fn push(&mut self, line: String) {
        if self.lines.len() < MAX_MESSAGES {
            self.lines.push(line);
        } else {
            self.dropped += 1;
        }
    }
}

/// A check stopped early; the string is qemu-img's "Check failed: ..." reason.
#[derive(Debug)]
pub(super) struct Abort(pub(super) String);

impl From<io::Error> for Abort {
    fn from(e: io::Error) -> Self {
        Abort(e.to_string())
    }
}

/// The expected refcount of every host cluster, computed from the references found.
pub(super) struct Walk<'a> {
    pub(super) img: &'a Image,
    pub(super) expected: Vec<u32>,
    /// Largest value an expected refcount may reach (the image's refcount width).
    pub(super) max: u64,
    pub(super) res: Counts,
    pub(super) log: &'a mut Log,
    /// Clusters counted for the refcount table and refcount blocks (for a rebuild).
    pub(super) refcount_structure: Vec<u64>,
    pub(super) entries_left: u64,
}

impl Walk<'_> {
    pub(super) fn get(&self, k: u64) -> u64 {
        usize::try_from(k)
            .ok()
            .and_then(|k| self.expected.get(k))
            .map_or(0, |&v| u64::from(v))
    }

    /// QEMU's `qcow2_inc_refcounts_imrt`: counts one reference to every cluster of
    /// `[offset, offset + size)`; a range ending a cluster or more past the end of the file
    /// is a corruption and is not counted.
    pub(super) fn inc(
        &mut self,
        offset: u64,
        size: u64,
        refcount_structure: bool,
    ) -> Result<(), Abort> {
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

    pub(super) fn spend(&mut self, entries: u64) -> Result<(), Abort> {
        self.entries_left = self.entries_left.checked_sub(entries).ok_or_else(|| {
            Abort("image references too many tables to check (walk limit exceeded)".into())
        })?;
        Ok(())
    }

    /// QEMU's `check_refcounts_l1`.
    pub(super) fn l1(
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
    pub(super) fn l2(
        &mut self,
        l2_offset: u64,
        active: bool,
        fix: Option<Repair>,
    ) -> Result<(), Abort> {
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
    pub(super) fn refblocks(
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
    pub(super) fn calculate(
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
    pub(super) fn bitmaps(
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
