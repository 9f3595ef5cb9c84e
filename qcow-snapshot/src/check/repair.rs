//! Repair: the `OFLAG_COPIED` flags, and the rebuild of the whole refcount structure into
//! clusters nothing references.

use super::image::Image;
use super::refcounts::{overlaps_metadata, StoredRefcounts, Writing};
use super::walk::{Abort, Counts, Log};
use super::*;

/// QEMU's `check_oflag_copied`: the COPIED flag of every active L1 and L2 entry must say
/// whether the stored refcount is exactly 1.
pub(super) fn oflag_copied(
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
pub(super) fn alloc_clusters(
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
pub(super) fn rebuild_refcounts(
    img: &Image,
    expected: &[u32],
    old_structure: &[u64],
) -> Result<(), Abort> {
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
