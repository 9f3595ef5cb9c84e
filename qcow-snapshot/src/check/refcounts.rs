//! The stored refcounts: read (and for a repair, updated) one refcount block at a time, and
//! compared with the expected ones.

use super::image::Image;
use super::walk::{Abort, Counts, Log};
use super::*;

/// Reads (and for a repair, updates) the refcounts stored in the image, one refcount block
/// at a time.
pub(super) struct StoredRefcounts<'a> {
    pub(super) img: &'a Image,
    /// The refcount block in the cache: its offset, contents, and whether it was modified.
    pub(super) block: Option<(u64, Vec<u8>, bool)>,
}

/// The stored refcount cannot be read (misaligned refcount block).
pub(super) struct Unreadable;

impl StoredRefcounts<'_> {
    pub(super) fn locate(&self, cluster: u64) -> Result<Option<(u64, u64)>, Unreadable> {
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

    pub(super) fn load(&mut self, off: u64) -> io::Result<&mut (u64, Vec<u8>, bool)> {
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
    pub(super) fn get(&mut self, cluster: u64) -> Result<u64, Unreadable> {
        let Some((off, index)) = self.locate(cluster)? else {
            return Ok(0);
        };
        let order = self.img.g.refcount_order;
        let block = self.load(off).map_err(|_| Unreadable)?;
        Ok(refcount_get(&block.1, order, index).unwrap_or(0))
    }

    pub(super) fn set(&mut self, cluster: u64, value: u64) -> io::Result<()> {
        let Ok(Some((off, index))) = self.locate(cluster) else {
            return Err(io::Error::other("no refcount block for the cluster"));
        };
        let order = self.img.g.refcount_order;
        let block = self.load(off)?;
        refcount_set(&mut block.1, order, index, value).map_err(io::Error::other)?;
        block.2 = true;
        Ok(())
    }

    pub(super) fn flush(&mut self) -> io::Result<()> {
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
pub(super) fn compare(
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
pub(super) fn overlaps_metadata(img: &Image, off: u64, len: u64, writing: Writing) -> bool {
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
pub(super) enum Writing {
    ActiveL1,
    ActiveL2,
}
