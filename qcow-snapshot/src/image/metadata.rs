//! L1/L2 metadata: host-cluster plausibility checks, the L2-table lookups and updates behind
//! guest-cluster mappings ([`Mapping`], [`Extent`]), releasing replaced clusters and building
//! the extent map of a guest range.
//!
//! Locking: every function here is a method of `Meta` and runs with the `meta` lock held; the
//! only I/O is reading L2 tables into the cache.

use super::*;

/// What I/O a guest range needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mapping {
    /// Guest bytes are at this host offset (the start of the extent).
    Data(u64),
    /// Reads as zeros.
    Zero,
    /// Not allocated in this image: the backing device (or zeros).
    Unallocated,
    /// Inside a compressed cluster.
    Compressed(CompressedDescriptor),
}

/// A contiguous guest range with one mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Guest offset.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
    /// How the range is stored.
    pub mapping: Mapping,
}

impl Meta {
    pub(super) fn cs(&self) -> u64 {
        self.geo.cluster_size()
    }

    /// Checks that a host cluster referenced by metadata is plausible: aligned, not the header,
    /// not one of the fixed tables, and inside the allocated area.
    pub(super) fn check_host_cluster(&self, off: u64, what: &str) -> Result<()> {
        let cs = self.cs();
        let l1_start = self.header.l1_table_offset;
        let l1_end = l1_start + u64::from(self.header.l1_size) * 8;
        let rt_start = self.header.refcount_table_offset;
        let rt_end = rt_start + u64::from(self.header.refcount_table_clusters) * cs;
        let overlaps = |s: u64, e: u64| off < e && off + cs > s;
        if !self.geo.is_aligned(off)
            || off < cs
            || off >= self.file_end
            || (l1_end > l1_start && overlaps(l1_start, l1_end))
            || overlaps(rt_start, rt_end)
        {
            return Err(corrupt(format!(
                "{what} offset {off:#x} is invalid (misaligned, past EOF or over metadata)"
            )));
        }
        Ok(())
    }

    pub(super) fn l2_table(&mut self, io: &dyn HostFile, off: u64) -> Result<&mut CachedL2> {
        if !self.l2.contains_key(&off) {
            self.check_host_cluster(off, "L2 table")?;
        }
        let cs = self.cs() as usize;
        get_or_load(
            &mut self.l2,
            self.l2_cap,
            &mut self.tick,
            off,
            "L2 cache",
            || {
                let mut buf = vec![0u8; cs];
                io.read_at(&mut buf, off)?;
                Ok(CachedL2 {
                    entries: table_from_bytes(&buf),
                    dirty: false,
                    used: 0,
                })
            },
        )
    }

    /// The raw L2 entry of guest cluster `gc` and its subcluster bitmap (0 without extended L2
    /// entries); both 0 when its L2 table does not exist.
    pub(super) fn raw_entry(&mut self, io: &dyn HostFile, gc: u64) -> Result<(u64, u64)> {
        let l2e = self.geo.l2_entries();
        let l1i = (gc / l2e) as usize;
        let w = self.geo.l2_entry_words();
        let l2i = (gc % l2e) as usize * w;
        let off = self.l1.get(l1i).map_or(0, |&e| l1_entry_offset(e));
        if off == 0 {
            return Ok((0, 0));
        }
        let t = self.l2_table(io, off)?;
        let raw = t.entries.get(l2i).copied().unwrap_or(0);
        let bitmap = if w == 2 {
            t.entries.get(l2i + 1).copied().unwrap_or(0)
        } else {
            0
        };
        Ok((raw, bitmap))
    }

    /// Whether the L2 entry of guest cluster `gc` is in the file as it is in memory: the L1
    /// entry naming its table is not dirty, and the table is cached clean (a dirty table is
    /// never evicted, so one not cached is clean too). Every flush and write-back writes the
    /// refcount blocks, and the refcount-table entries reaching them, before the L2 tables
    /// that name their clusters, and a table becomes clean only once its copy in the file is
    /// what memory holds: the clusters of a clean entry are counted in the file as well.
    pub(super) fn entry_in_file(&self, gc: u64) -> bool {
        let l1i = (gc / self.geo.l2_entries()) as usize;
        if self.l1_dirty.contains(&l1i) {
            return false;
        }
        let off = self.l1.get(l1i).map_or(0, |&e| l1_entry_offset(e));
        off != 0 && self.l2.get(&off).is_none_or(|t| !t.dirty)
    }

    /// The decoded, validated L2 entry of guest cluster `gc`.
    pub(super) fn entry(&mut self, io: &dyn HostFile, gc: u64) -> Result<L2Entry> {
        Ok(self.sub_entry(io, gc)?.0)
    }

    /// The decoded, validated L2 entry of guest cluster `gc` with its validated subcluster
    /// bitmap (always 0 without extended L2 entries).
    pub(super) fn sub_entry(&mut self, io: &dyn HostFile, gc: u64) -> Result<(L2Entry, u64)> {
        let (raw, bitmap) = self.raw_entry(io, gc)?;
        let e = L2Entry::decode(raw, &self.geo)
            .map_err(|e| corrupt(format!("guest cluster {gc}: {e}")))?;
        if self.geo.extended_l2 {
            check_l2_bitmap(&e, bitmap)
                .map_err(|why| corrupt(format!("guest cluster {gc}: {why}")))?;
        }
        match e {
            L2Entry::Normal { host, .. } | L2Entry::Zero { host: Some(host) } => {
                self.check_host_cluster(host, "data cluster")?;
            }
            L2Entry::Compressed(d)
                if d.host_offset < self.cs() || d.host_offset >= self.file_end =>
            {
                return Err(corrupt(format!(
                    "compressed cluster at {:#x} is outside the file",
                    d.host_offset
                )));
            }
            _ => {}
        }
        Ok((e, bitmap))
    }

    /// Sets the raw L2 entry of `gc` and (with extended L2 entries) its subcluster bitmap,
    /// creating its L2 table if needed.
    pub(super) fn set_entry(
        &mut self,
        io: &dyn HostFile,
        gc: u64,
        raw: u64,
        bitmap: u64,
    ) -> Result<()> {
        let l2e = self.geo.l2_entries();
        let l1i = (gc / l2e) as usize;
        let w = self.geo.l2_entry_words();
        let l2i = (gc % l2e) as usize * w;
        let l1e = *self
            .l1
            .get(l1i)
            .ok_or_else(|| corrupt(format!("guest cluster {gc} beyond the L1 table")))?;
        let mut off = l1_entry_offset(l1e);
        if off == 0 {
            off = self.alloc(io, 1)?;
            let entries = vec![0u64; l2e as usize * w];
            self.l2.insert(
                off,
                CachedL2 {
                    entries,
                    dirty: true,
                    used: self.tick,
                },
            );
            self.dirty += 1;
            self.l1[l1i] = off | OFLAG_COPIED;
            self.l1_dirty.insert(l1i);
        } else if l1e & OFLAG_COPIED == 0 {
            if self.refcount(io, off)? != 1 {
                return Err(BlockError::Unsupported(
                    "writing to an L2 table shared with a snapshot",
                ));
            }
            self.l1[l1i] = off | OFLAG_COPIED;
            self.l1_dirty.insert(l1i);
        }
        let t = self.l2_table(io, off)?;
        let slot = t
            .entries
            .get_mut(l2i)
            .ok_or_else(|| corrupt("L2 index".into()))?;
        *slot = raw;
        if w == 2 {
            let slot = t
                .entries
                .get_mut(l2i + 1)
                .ok_or_else(|| corrupt("L2 index".into()))?;
            *slot = bitmap;
        }
        let newly_dirty = !t.dirty;
        t.dirty = true;
        if newly_dirty {
            self.dirty += 1;
        }
        Ok(())
    }

    /// Queues the host clusters an entry owns for release after the next flush.
    pub(super) fn release(&mut self, e: L2Entry, keep: Option<u64>) {
        match e {
            L2Entry::Normal { host, .. } | L2Entry::Zero { host: Some(host) } => {
                if Some(host) != keep {
                    self.pending_free.push(host);
                }
            }
            L2Entry::Compressed(d) => {
                let (first, last) = d.host_clusters(&self.geo);
                let mut c = first;
                while c <= last {
                    self.pending_free.push(c);
                    c += self.cs();
                }
            }
            L2Entry::Unallocated | L2Entry::Zero { host: None } => {}
        }
    }

    /// Maps `[off, off+len)` into extents.
    pub(super) fn map(&mut self, io: &dyn HostFile, off: u64, len: u64) -> Result<Vec<Extent>> {
        let cs = self.cs();
        let cov = self.geo.l2_coverage();
        let end = off + len;
        let mut out: Vec<Extent> = Vec::new();
        let mut pos = off;
        while pos < end {
            let gc = pos >> self.geo.cluster_bits;
            let l1i = (gc / self.geo.l2_entries()) as usize;
            let (n, mapping) = if self.l1.get(l1i).is_none_or(|&e| l1_entry_offset(e) == 0) {
                let run_end = ((l1i as u64 + 1) * cov).min(end);
                (run_end - pos, Mapping::Unallocated)
            } else {
                let in_off = pos & (cs - 1);
                let n = (cs - in_off).min(end - pos);
                let (e, bitmap) = self.sub_entry(io, gc)?;
                if self.geo.extended_l2 && !matches!(e, L2Entry::Compressed(_)) {
                    // Runs of subclusters in the same state.
                    let host = match e {
                        L2Entry::Normal { host, .. } => host,
                        _ => 0,
                    };
                    let sb = self.geo.subcluster_bits();
                    let mut p = pos;
                    while p < pos + n {
                        let i = self.geo.subcluster_index(p);
                        let state = subcluster_state(bitmap, i);
                        let mut q = (p | ((1 << sb) - 1)) + 1;
                        while q < pos + n
                            && subcluster_state(bitmap, self.geo.subcluster_index(q)) == state
                        {
                            q += 1 << sb;
                        }
                        let q = q.min(pos + n);
                        let mapping = match state {
                            Subcluster::Data => Mapping::Data(host + (p & (cs - 1))),
                            Subcluster::Zero => Mapping::Zero,
                            Subcluster::Unallocated => Mapping::Unallocated,
                        };
                        push_extent(&mut out, p, q - p, mapping);
                        p = q;
                    }
                    pos += n;
                    continue;
                }
                let m = match e {
                    L2Entry::Unallocated => Mapping::Unallocated,
                    L2Entry::Zero { .. } => Mapping::Zero,
                    L2Entry::Normal { host, .. } => Mapping::Data(host + in_off),
                    L2Entry::Compressed(d) => Mapping::Compressed(d),
                };
                (n, m)
            };
            push_extent(&mut out, pos, n, mapping);
            pos += n;
        }
        Ok(out)
    }
}

/// Appends `[pos, pos+n)` to `out`, merging it into the last extent when contiguous.
fn push_extent(out: &mut Vec<Extent>, pos: u64, n: u64, mapping: Mapping) {
    let merged = match (out.last_mut(), mapping) {
        (Some(last), Mapping::Data(h)) => match last.mapping {
            Mapping::Data(lh) if lh + last.len == h => {
                last.len += n;
                true
            }
            _ => false,
        },
        (Some(last), Mapping::Zero) if last.mapping == Mapping::Zero => {
            last.len += n;
            true
        }
        (Some(last), Mapping::Unallocated) if last.mapping == Mapping::Unallocated => {
            last.len += n;
            true
        }
        _ => false,
    };
    if !merged {
        out.push(Extent {
            offset: pos,
            len: n,
            mapping,
        });
    }
}
