//! Refcounts and allocation: the refcount-block cache accessor, refcount reads and updates,
//! refcount-table growth, the cluster allocator, deferred frees, and the metadata flush that
//! writes dirty refcount blocks, refcount-table entries, L2 tables and L1 entries in dependency
//! order (see "Write ordering" in the parent module).
//!
//! Locking: every function here is a method of `Meta` and runs with the `meta` lock held,
//! including the metadata I/O of a flush.

use super::*;

impl Meta {
    pub(super) fn block(&mut self, io: &dyn HostFile, off: u64) -> Result<&mut CachedBlock> {
        if !self.blocks.contains_key(&off) {
            self.check_host_cluster(off, "refcount block")?;
        }
        let cs = self.cs() as usize;
        get_or_load(
            &mut self.blocks,
            self.block_cap,
            &mut self.tick,
            off,
            "refcount cache",
            || {
                let mut buf = vec![0u8; cs];
                io.read_at(&mut buf, off)?;
                Ok(CachedBlock {
                    data: buf,
                    dirty: false,
                    used: 0,
                })
            },
        )
    }

    pub(super) fn refcount(&mut self, io: &dyn HostFile, host: u64) -> Result<u64> {
        let idx = self.geo.refcount_table_index(host) as usize;
        let Some(&e) = self.reftable.get(idx) else {
            return Ok(0);
        };
        let bo = reftable_entry_offset(e);
        if bo == 0 {
            return Ok(0);
        }
        let order = self.geo.refcount_order;
        let bi = self.geo.refcount_block_index(host) as u64;
        let b = self.block(io, bo)?;
        refcount_get(&b.data, order, bi).ok_or_else(|| corrupt("refcount index".into()))
    }

    pub(super) fn set_refcount(
        &mut self,
        io: &dyn HostFile,
        host: u64,
        value: u64,
        depth: u32,
    ) -> Result<()> {
        if depth > 8 {
            return Err(corrupt(
                "refcount block allocation does not converge".into(),
            ));
        }
        let idx = self.geo.refcount_table_index(host) as usize;
        if idx >= self.reftable.len() {
            if value == 0 {
                return Ok(());
            }
            self.grow_reftable(io, idx)?;
        }
        let mut bo = self
            .reftable
            .get(idx)
            .map_or(0, |&e| reftable_entry_offset(e));
        if bo == 0 {
            if value == 0 {
                return Ok(());
            }
            // The new block is appended and counted by the block of its own index, which may
            // itself be new, and so on. If any block of that chain would be counted beyond the
            // table, grow first (the growth counts every cluster it adds) and start over, so a
            // growth never happens halfway through a chain (with a table entry naming a block
            // nothing counts yet).
            let cs = self.cs();
            let mut chain = vec![idx];
            let mut p = self.file_end;
            loop {
                let j = self.geo.refcount_table_index(p) as usize;
                if j >= self.reftable.len() {
                    self.grow_reftable(io, j)?;
                    return self.set_refcount(io, host, value, depth + 1);
                }
                if chain.contains(&j)
                    || self
                        .reftable
                        .get(j)
                        .is_some_and(|&e| reftable_entry_offset(e) != 0)
                {
                    break;
                }
                if chain.len() > 8 {
                    return Err(corrupt(
                        "refcount block allocation does not converge".into(),
                    ));
                }
                chain.push(j);
                p = p.checked_add(cs).ok_or_else(|| no_space("file size"))?;
            }
            bo = self.file_end;
            self.file_end = bo
                .checked_add(self.cs())
                .filter(|&e| e <= MAX_HOST_OFFSET)
                .ok_or_else(|| no_space("file size"))?;
            self.blocks.insert(
                bo,
                CachedBlock {
                    data: vec![0; self.cs() as usize],
                    dirty: true,
                    used: self.tick,
                },
            );
            self.dirty += 1;
            self.reftable[idx] = bo;
            let was_dirty = !self.reftable_dirty.insert(idx);
            if let Err(e) = self.set_refcount(io, bo, 1, depth + 1) {
                // Nothing counts the block: unpublish it (its cluster stays a hole below EOF).
                self.reftable[idx] = 0;
                if !was_dirty {
                    self.reftable_dirty.remove(&idx);
                }
                if self.blocks.remove(&bo).is_some() {
                    self.dirty = self.dirty.saturating_sub(1);
                }
                return Err(e);
            }
        }
        let order = self.geo.refcount_order;
        let bi = self.geo.refcount_block_index(host) as u64;
        let b = self.block(io, bo)?;
        refcount_set(&mut b.data, order, bi, value)
            .map_err(|e| corrupt(format!("refcount overflow: {e}")))?;
        if !b.dirty {
            b.dirty = true;
            self.dirty += 1;
        }
        Ok(())
    }

    /// Replaces the refcount table with a larger one covering index `need`.
    pub(super) fn grow_reftable(&mut self, io: &dyn HostFile, need: usize) -> Result<()> {
        let g = self.geo;
        let cs = g.cluster_size();
        let old_len = self.reftable.len();
        let mut entries = (need as u64 + 1).max(old_len as u64 * 2).max(cs / 8);
        let start = self.file_end;
        let (tclusters, missing, end) = loop {
            let tclusters = g.clusters_for(entries * 8);
            let mut nb = 0u64;
            let mut missing: Vec<u64>;
            let mut end;
            let mut rounds = 0;
            loop {
                rounds += 1;
                end = start
                    .checked_add((tclusters + nb) * cs)
                    .filter(|&e| e <= MAX_HOST_OFFSET)
                    .ok_or_else(|| no_space("file size"))?;
                let first = g.refcount_table_index(start);
                let last = g.refcount_table_index(end - 1);
                missing = (first..=last)
                    .filter(|&i| {
                        self.reftable
                            .get(i as usize)
                            .is_none_or(|&e| reftable_entry_offset(e) == 0)
                    })
                    .collect();
                if missing.len() as u64 == nb || rounds > 8 {
                    break;
                }
                nb = missing.len() as u64;
            }
            let max_idx = g.refcount_table_index(end - 1);
            if max_idx < entries && missing.len() as u64 == nb {
                break (tclusters, missing, end);
            }
            entries = entries.max(max_idx + 1) + 1;
            if entries * 8 > MAX_REFCOUNT_TABLE_BYTES {
                return Err(no_space("refcount table size"));
            }
        };
        let table_bytes = tclusters * cs;
        if table_bytes > MAX_REFCOUNT_TABLE_BYTES {
            return Err(no_space("refcount table size"));
        }
        let order = g.refcount_order;
        let mut table = self.reftable.clone();
        table.resize((table_bytes / 8) as usize, 0);
        // The new refcount blocks and updated copies of the existing blocks that count the new
        // clusters; nothing in `self` changes until the new table is durable and in the header.
        let mut blocks: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
        for (k, &i) in missing.iter().enumerate() {
            let off = start + (tclusters + k as u64) * cs;
            let slot = table
                .get_mut(i as usize)
                .ok_or_else(|| corrupt("refcount table growth: index past the table".into()))?;
            *slot = off;
            blocks.insert(off, vec![0; cs as usize]);
        }
        let mut c = start;
        while c < end {
            let idx = g.refcount_table_index(c) as usize;
            let bo = table.get(idx).map_or(0, |&e| reftable_entry_offset(e));
            if bo == 0 {
                return Err(corrupt(format!(
                    "refcount table growth left cluster {c:#x} without a refcount block"
                )));
            }
            if let std::collections::btree_map::Entry::Vacant(v) = blocks.entry(bo) {
                v.insert(self.block(io, bo)?.data.clone());
            }
            let data = blocks
                .get_mut(&bo)
                .ok_or_else(|| corrupt("refcount table growth: block copy".into()))?;
            refcount_set(data, order, g.refcount_block_index(c) as u64, 1)
                .map_err(|e| corrupt(format!("refcount overflow: {e}")))?;
            c += cs;
        }
        // Order: every refcount block (including dirty cached ones that the new table names)
        // and the new table, sync; then the header that switches to it, sync. Only then does
        // memory switch, so a failure anywhere leaves memory describing the on-disk table.
        self.write_dirty_blocks(io)?;
        for (&off, data) in &blocks {
            io.write_at(data, off)?;
        }
        io.write_at(&table_to_bytes(&table), start)?;
        io.sync_data()?;
        let mut field = [0u8; 12];
        field[..8].copy_from_slice(&start.to_be_bytes());
        field[8..].copy_from_slice(&(tclusters as u32).to_be_bytes());
        io.write_at(&field, REFCOUNT_TABLE_OFFSET_OFFSET as u64)?;
        io.sync_data()?;
        let old_off = self.header.refcount_table_offset;
        let old_clusters = u64::from(self.header.refcount_table_clusters);
        self.header.refcount_table_offset = start;
        self.header.refcount_table_clusters = tclusters as u32;
        self.reftable = table;
        // Every entry of the old table is in the new one, which is on disk.
        self.reftable_dirty.clear();
        self.file_end = end;
        for (off, data) in blocks {
            // The copies are what is on disk now, and the cached originals were clean (written
            // above), so replacing them loses nothing.
            self.blocks.insert(
                off,
                CachedBlock {
                    data,
                    dirty: false,
                    used: self.tick,
                },
            );
        }
        for k in 0..old_clusters {
            self.pending_free.push(old_off + k * cs);
        }
        Ok(())
    }

    /// Allocates `n` contiguous host clusters with refcount 1.
    pub(super) fn alloc(&mut self, io: &dyn HostFile, n: u64) -> Result<u64> {
        let cs = self.cs();
        if n == 1 {
            while self.free_hint < self.file_end {
                let c = self.free_hint;
                self.free_hint += cs;
                if self.refcount(io, c)? == 0 {
                    if let Err(e) = self.set_refcount(io, c, 1, 0) {
                        self.free_hint = c;
                        return Err(e);
                    }
                    return Ok(c);
                }
            }
        }
        let start = self.file_end;
        let end = n
            .checked_mul(cs)
            .and_then(|b| start.checked_add(b))
            .filter(|&e| e <= MAX_HOST_OFFSET)
            .ok_or_else(|| no_space("file size"))?;
        self.file_end = end;
        if self.free_hint == start {
            self.free_hint = end;
        }
        let mut c = start;
        while c < end {
            if let Err(e) = self.set_refcount(io, c, 1, 0) {
                // All or nothing: release what this call already counted (best effort; a
                // failure here leaks clusters, never loses a reference).
                let mut u = start;
                while u < c {
                    if self.set_refcount(io, u, 0, 0).is_err() {
                        break;
                    }
                    u += cs;
                }
                self.free_hint = self.free_hint.min(start);
                return Err(e);
            }
            c += cs;
        }
        Ok(start)
    }

    /// Drops one reference of each cluster (only called once the references are gone on disk).
    pub(super) fn apply_frees(&mut self, io: &dyn HostFile, frees: Vec<u64>) -> Result<()> {
        for c in frees {
            let r = self.refcount(io, c)?;
            if r == 0 {
                return Err(corrupt(format!(
                    "refcount of in-use cluster {c:#x} is already 0"
                )));
            }
            self.set_refcount(io, c, r - 1, 0)?;
            if r == 1 && c < self.free_hint {
                self.free_hint = c;
            }
        }
        Ok(())
    }

    pub(super) fn write_dirty_blocks(&mut self, io: &dyn HostFile) -> Result<()> {
        let mut wrote = false;
        for (&off, b) in self.blocks.iter_mut().filter(|(_, b)| b.dirty) {
            io.write_at(&b.data, off)?;
            b.dirty = false;
            wrote = true;
        }
        if wrote {
            io.sync_data()?;
        }
        Ok(())
    }

    /// Writes the dirty refcount-table entries (their blocks are already durable) in dependency
    /// order: an entry naming a new block is written only once the entry of the block that holds
    /// *that* block's refcount is durable, with a sync after each level. So at every sync point
    /// each refcount block reachable from the header has a nonzero refcount reachable from it.
    /// An entry is never written outside the table the on-disk header names.
    pub(super) fn write_reftable_entries(&mut self, io: &dyn HostFile) -> Result<()> {
        let mut pending = self.reftable_dirty.clone();
        loop {
            let level = self.write_reftable_level(io, &mut pending)?;
            if level.is_empty() {
                return Ok(());
            }
            io.sync_data()?;
            for (i, _, _) in level {
                pending.remove(&i);
                self.reftable_dirty.remove(&i);
            }
        }
    }

    /// Writes all dirty metadata in dependency order. Guest data written before the call is
    /// made durable first.
    pub(super) fn flush_meta(&mut self, io: &dyn HostFile, data_written: bool) -> Result<()> {
        let meta_dirty =
            self.dirty > 0 || !self.l1_dirty.is_empty() || !self.reftable_dirty.is_empty();
        if !meta_dirty && !data_written {
            return Ok(());
        }
        io.sync_data()?;
        self.write_dirty_blocks(io)?;
        self.write_reftable_entries(io)?;
        let mut wrote = false;
        for (&off, t) in self.l2.iter_mut().filter(|(_, t)| t.dirty) {
            io.write_at(&table_to_bytes(&t.entries), off)?;
            t.dirty = false;
            wrote = true;
        }
        if wrote {
            io.sync_data()?;
        }
        if !self.l1_dirty.is_empty() {
            for &i in &self.l1_dirty {
                let e = self.l1.get(i).copied().unwrap_or(0);
                io.write_at(&e.to_be_bytes(), self.header.l1_table_offset + i as u64 * 8)?;
            }
            io.sync_data()?;
            self.l1_dirty.clear();
        }
        self.dirty = 0;
        Ok(())
    }

    pub(super) fn maybe_flush(&mut self, io: &dyn HostFile) -> Result<()> {
        // Skipped while a flush runs without the lock: it would write newer L2 tables that the
        // flush's older copies could then overwrite (see the `flush` module).
        if self.dirty > self.dirty_cap && !self.flushing {
            self.flush_meta(io, true)?;
        }
        Ok(())
    }
}
