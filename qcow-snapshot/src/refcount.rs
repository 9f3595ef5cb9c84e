//! Building a complete refcount structure (table + blocks) from a list of per-cluster counts,
//! and rebuilding an image's refcounts from its L1/L2 tables (dirty-bit repair).
//!
//! The rebuild never edits the old structure in place: it lays a new table and new blocks out
//! past the end of the file, writes and syncs them, and only then switches the header to them
//! with one small header write. A crash at any point leaves either the old or the new
//! structure in force. The old table and blocks are simply no longer counted (free space).
//!
//! Locking model: none; the caller owns the image exclusively (open time / image creation).

use crate::format::{
    self, l1_entry_offset, refcount_set, table_from_bytes, table_to_bytes, CompressedDescriptor,
    Geometry, Header, L2Entry, MAX_REFCOUNT_TABLE_BYTES, REFCOUNT_TABLE_OFFSET_OFFSET,
};
use crate::host::HostFile;
use std::io;

/// Most host clusters a rebuild will count (bounds its memory to 1 GiB of counters).
const MAX_REBUILD_CLUSTERS: u64 = 1 << 28;

/// Why refcounts could not be rebuilt or laid out.
#[derive(Debug, thiserror::Error)]
pub enum RebuildRefcountsError {
    /// Host file I/O failed.
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
    /// A table points somewhere impossible; the image cannot be repaired automatically.
    #[error("image is corrupt: {0}")]
    Corrupt(String),
    /// The structure would exceed a format or implementation limit.
    #[error("refcount structure too large: {0}")]
    TooLarge(String),
}

/// A refcount structure ready to be written.
#[derive(Debug)]
pub struct RefcountLayout {
    /// Host offset of the refcount table.
    pub table_offset: u64,
    /// Clusters the table occupies.
    pub table_clusters: u64,
    /// The table entries (padded to whole clusters).
    pub table: Vec<u64>,
    /// `(host offset, content)` of every refcount block.
    pub blocks: Vec<(u64, Vec<u8>)>,
    /// First cluster-aligned offset after the structure.
    pub end: u64,
}

/// Lays out a refcount structure at host cluster index `start` describing `counts` (one count
/// per host cluster from 0) plus the structure's own clusters (count 1 each).
pub fn build_layout(
    g: &Geometry,
    counts: &[u32],
    start: u64,
) -> Result<RefcountLayout, RebuildRefcountsError> {
    let cs = g.cluster_size();
    let rbe = g.refcount_block_entries();
    let too_large = || RebuildRefcountsError::TooLarge("host offsets overflow".into());
    // Which refcount-table indices have non-zero counts among `counts`.
    let mut used: Vec<u64> = counts
        .iter()
        .enumerate()
        .filter(|(_, &c)| c != 0)
        .map(|(i, _)| i as u64 / rbe)
        .collect();
    used.dedup();
    let mut table_clusters = 1u64;
    let mut nblocks = 0u64;
    let mut blocks_idx: Vec<u64>;
    let mut iterations = 0;
    loop {
        iterations += 1;
        if iterations > 64 {
            return Err(RebuildRefcountsError::TooLarge(
                "layout does not converge".into(),
            ));
        }
        let end = start
            .checked_add(table_clusters)
            .and_then(|v| v.checked_add(nblocks))
            .ok_or_else(too_large)?;
        let first = start / rbe;
        let last = (end - 1) / rbe;
        let mut set: std::collections::BTreeSet<u64> = used.iter().copied().collect();
        set.extend(first..=last);
        blocks_idx = set.into_iter().collect();
        let max_idx = blocks_idx.last().copied().unwrap_or(0);
        let need_tc = g.clusters_for((max_idx + 1).checked_mul(8).ok_or_else(too_large)?);
        let nb = blocks_idx.len() as u64;
        if need_tc <= table_clusters && nb == nblocks {
            break;
        }
        table_clusters = table_clusters.max(need_tc);
        nblocks = nb;
    }
    let table_bytes = table_clusters.checked_mul(cs).ok_or_else(too_large)?;
    if table_bytes > MAX_REFCOUNT_TABLE_BYTES {
        return Err(RebuildRefcountsError::TooLarge(format!(
            "refcount table of {table_bytes} bytes"
        )));
    }
    let table_offset = start.checked_mul(cs).ok_or_else(too_large)?;
    let mut table = vec![0u64; (table_bytes / 8) as usize];
    let mut blocks = Vec::with_capacity(blocks_idx.len());
    let end_cluster = start + table_clusters + nblocks;
    for (k, &idx) in blocks_idx.iter().enumerate() {
        let off = (start + table_clusters + k as u64) * cs;
        table[idx as usize] = off;
        let mut data = vec![0u8; cs as usize];
        let first = idx * rbe;
        for j in 0..rbe {
            let c = first + j;
            let v = if c >= start && c < end_cluster {
                1
            } else {
                u64::from(counts.get(c as usize).copied().unwrap_or(0))
            };
            if v != 0 {
                if v > g.refcount_max() {
                    return Err(RebuildRefcountsError::TooLarge(format!(
                        "refcount {v} of cluster {c} exceeds {}-bit refcounts",
                        g.refcount_bits()
                    )));
                }
                refcount_set(&mut data, g.refcount_order, j, v)
                    .map_err(|e| RebuildRefcountsError::TooLarge(e.to_string()))?;
            }
        }
        blocks.push((off, data));
    }
    Ok(RefcountLayout {
        table_offset,
        table_clusters,
        table,
        blocks,
        end: end_cluster * cs,
    })
}

fn bump(
    counts: &mut [u32],
    g: &Geometry,
    off: u64,
    what: &str,
) -> Result<(), RebuildRefcountsError> {
    let i = usize::try_from(off >> g.cluster_bits).unwrap_or(usize::MAX);
    match counts.get_mut(i) {
        Some(c) => {
            *c = c.saturating_add(1);
            Ok(())
        }
        None => Err(RebuildRefcountsError::Corrupt(format!(
            "{what} at {off:#x} lies past the end of the file"
        ))),
    }
}

/// Counts the references of every host cluster reachable from the header and the active L1
/// table (header cluster, L1 table, L2 tables, data and compressed clusters). Snapshots and
/// bitmaps are not counted: images with them are never opened read-write.
pub fn count_references(
    host: &dyn HostFile,
    h: &Header,
    l1: &[u64],
) -> Result<Vec<u32>, RebuildRefcountsError> {
    let g = h.geometry();
    let cs = g.cluster_size();
    let file_len = host.len()?;
    let nclusters = g.clusters_for(file_len);
    if nclusters > MAX_REBUILD_CLUSTERS {
        return Err(RebuildRefcountsError::TooLarge(format!(
            "{nclusters} host clusters"
        )));
    }
    let mut counts = vec![0u32; nclusters.max(1) as usize];
    bump(&mut counts, &g, 0, "header")?;
    let l1_bytes = u64::from(h.l1_size) * 8;
    let mut off = h.l1_table_offset;
    while off < h.l1_table_offset + l1_bytes {
        bump(&mut counts, &g, off, "L1 table")?;
        off += cs;
    }
    let mut buf = vec![0u8; cs as usize];
    for &e in l1 {
        let l2 = l1_entry_offset(e);
        if l2 == 0 {
            continue;
        }
        if !g.is_aligned(l2) || l2 < cs || l2 >= file_len {
            return Err(RebuildRefcountsError::Corrupt(format!(
                "L2 table offset {l2:#x} invalid"
            )));
        }
        bump(&mut counts, &g, l2, "L2 table")?;
        host.read_at(&mut buf, l2)?;
        // With extended L2 entries every other word is a subcluster bitmap, not an entry.
        for raw in table_from_bytes(&buf)
            .into_iter()
            .step_by(g.l2_entry_words())
        {
            match L2Entry::decode(raw, &g) {
                Ok(L2Entry::Unallocated) | Ok(L2Entry::Zero { host: None }) => {}
                Ok(L2Entry::Normal { host: d, .. }) | Ok(L2Entry::Zero { host: Some(d) }) => {
                    if d < cs {
                        return Err(RebuildRefcountsError::Corrupt(format!(
                            "data cluster at {d:#x}"
                        )));
                    }
                    bump(&mut counts, &g, d, "data cluster")?;
                }
                Ok(L2Entry::Compressed(d)) => {
                    let (first, last) = compressed_span(&d, &g);
                    let mut c = first;
                    while c <= last {
                        bump(&mut counts, &g, c, "compressed cluster")?;
                        c += cs;
                    }
                }
                Err(e) => return Err(RebuildRefcountsError::Corrupt(e.to_string())),
            }
        }
    }
    Ok(counts)
}

/// Host clusters (first, last) a compressed cluster occupies.
pub fn compressed_span(d: &CompressedDescriptor, g: &Geometry) -> (u64, u64) {
    d.host_clusters(g)
}

/// Rebuilds the refcount structure of an image from its L1/L2 tables and switches the header
/// to it. Returns the new refcount table; `h` is updated.
pub fn rebuild_refcounts(
    host: &dyn HostFile,
    h: &mut Header,
    l1: &[u64],
) -> Result<Vec<u64>, RebuildRefcountsError> {
    let g = h.geometry();
    let counts = count_references(host, h, l1)?;
    let start = g.clusters_for(host.len()?).max(counts.len() as u64);
    let layout = build_layout(&g, &counts, start)?;
    write_layout(host, &layout)?;
    let mut field = [0u8; 12];
    field[..8].copy_from_slice(&layout.table_offset.to_be_bytes());
    field[8..].copy_from_slice(&(layout.table_clusters as u32).to_be_bytes());
    host.write_at(&field, REFCOUNT_TABLE_OFFSET_OFFSET as u64)?;
    host.sync_data()?;
    h.refcount_table_offset = layout.table_offset;
    h.refcount_table_clusters = layout.table_clusters as u32;
    Ok(layout.table)
}

/// Writes blocks, syncs, writes the table, syncs.
pub fn write_layout(host: &dyn HostFile, layout: &RefcountLayout) -> io::Result<()> {
    for (off, data) in &layout.blocks {
        host.write_at(data, *off)?;
    }
    host.sync_data()?;
    host.write_at(&table_to_bytes(&layout.table), layout.table_offset)?;
    host.sync_data()?;
    Ok(())
}

/// Reads refcount `host_off` through `table` (for tests and the check helper).
pub fn read_refcount(
    host: &dyn HostFile,
    g: &Geometry,
    table: &[u64],
    host_off: u64,
) -> io::Result<u64> {
    let idx = g.refcount_table_index(host_off) as usize;
    let Some(&e) = table.get(idx) else {
        return Ok(0);
    };
    let bo = format::reftable_entry_offset(e);
    if bo == 0 {
        return Ok(0);
    }
    let mut b = vec![0u8; g.cluster_size() as usize];
    host.read_at(&mut b, bo)?;
    Ok(format::refcount_get(
        &b,
        g.refcount_order,
        g.refcount_block_index(host_off) as u64,
    )
    .unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::MemHost;

    #[test]
    fn layout_counts_its_own_clusters_for_every_order() {
        for order in 0..=6 {
            let g = Geometry::standard(9, order);
            let mut counts = vec![1u32; 300];
            counts[5] = 0;
            let l = build_layout(&g, &counts, 300).unwrap();
            let host = MemHost::default();
            write_layout(&host, &l).unwrap();
            for c in 0..l.end / 512 {
                let want = if c == 5 { 0 } else { 1 };
                assert_eq!(
                    read_refcount(&host, &g, &l.table, c * 512).unwrap(),
                    want,
                    "order {order} cluster {c}"
                );
            }
            assert_eq!(read_refcount(&host, &g, &l.table, l.end).unwrap(), 0);
        }
    }

    #[test]
    fn layout_rejects_counts_wider_than_the_refcount_width() {
        let g = Geometry::standard(9, 0);
        assert!(matches!(
            build_layout(&g, &[1, 2], 2),
            Err(RebuildRefcountsError::TooLarge(_))
        ));
    }
}
