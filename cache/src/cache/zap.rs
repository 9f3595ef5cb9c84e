//! Zaps: discard and write-zeroes, their registry, and the waits of reads, writes and
//! writebacks on registered zaps.

use super::*;

impl Inner {
    pub(super) fn fill_token(&self, start: u64, end: u64) -> FillToken {
        let z = lock(&self.zaps);
        FillToken {
            seq: z.seq,
            clean: !z.overlaps(start, end),
        }
    }

    pub(super) fn fill_valid(&self, t: &FillToken) -> bool {
        t.clean && lock(&self.zaps).seq == t.seq
    }

    pub(super) fn zap_overlaps(&self, start: u64, end: u64) -> bool {
        lock(&self.zaps).overlaps(start, end)
    }

    pub(super) fn wait_zaps_clear(&self, start: u64, end: u64) {
        let mut z = lock(&self.zaps);
        while z.overlaps(start, end) {
            z = self.zap_cv.wait(z).unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// The cached folios overlapping `[start, end)` (`end > start`).
    pub(super) fn cached_in_range(&self, start: u64, end: u64) -> Vec<Arc<Folio>> {
        let first = start >> self.folio_shift;
        let last = (end - 1) >> self.folio_shift;
        let count = last - first + 1;
        if count <= 2 * self.max_folios as u64 {
            (first..=last).filter_map(|i| self.lookup(i)).collect()
        } else {
            let mut out = Vec::new();
            for shard in self.shards.iter() {
                let s = lock(shard);
                out.extend(
                    s.map
                        .values()
                        .filter(|f| f.index >= first && f.index <= last)
                        .cloned(),
                );
            }
            out
        }
    }

    /// Registers `[start, end)` as changing under the cache: from now on fills of it are not
    /// installed and writebacks overlapping it are deferred.
    pub(super) fn register_zap(&self, start: u64, end: u64) -> u64 {
        let mut z = lock(&self.zaps);
        z.seq += 1;
        z.next_id += 1;
        let id = z.next_id;
        z.active.push(Zap { id, start, end });
        self.zaps_active.fetch_add(1, Ordering::SeqCst);
        id
    }

    pub(super) fn unregister_zap(&self, id: u64) {
        {
            let mut z = lock(&self.zaps);
            z.active.retain(|zap| zap.id != id);
            z.seq += 1;
            self.zaps_active.fetch_sub(1, Ordering::SeqCst);
        }
        self.zap_cv.notify_all();
    }

    pub(super) fn zap(&self, offset: u64, len: u64, kind: ZapKind) -> Result<()> {
        if self.read_only {
            return Err(BlockError::ReadOnly);
        }
        check_range(offset, len, self.size)?;
        if len == 0 {
            return Ok(());
        }
        let end = offset + len;
        let id = self.register_zap(offset, end);
        let result = self.zap_registered(offset, end, kind);
        self.unregister_zap(id);
        result?;
        if !self.wce.load(Ordering::SeqCst) {
            self.lower_flush()?;
        }
        Ok(())
    }

    pub(super) fn zap_registered(&self, offset: u64, end: u64, kind: ZapKind) -> Result<()> {
        // Writebacks that started before the zap was registered must land before it.
        for f in self.cached_in_range(offset, end) {
            drop(f.wait_writeback(f.lock()));
        }
        self.hook(HookPoint::BeforeLowerZap, offset >> self.folio_shift);
        let len = end - offset;
        let result = match kind {
            ZapKind::Discard => self.lower.discard(offset, len),
            ZapKind::Zeroes { unmap } => self.lower.write_zeroes(offset, len, unmap),
        };
        for f in self.cached_in_range(offset, end) {
            let mut st = f.wait_writeback(f.lock());
            if st.evicted {
                continue;
            }
            let a = (offset.max(f.start) - f.start) as usize;
            let b = (end.min(f.start + f.len as u64) - f.start) as usize;
            let (sa, sb) = f.sector_span(a, b);
            for s in sa..sb {
                if result.is_ok() {
                    if f.partially_covers(s, a, b) {
                        if st.uptodate.get(s) {
                            let (x, y) = f.sector_bytes(s);
                            st.data_mut(&self.counters.cow_copies)[x.max(a)..y.min(b)].fill(0);
                        }
                    } else {
                        st.uptodate.clear(s, s + 1);
                        st.dirty.clear(s, s + 1);
                    }
                } else if !st.dirty.get(s) {
                    // The lower layer may now hold anything in the range: forget clean copies.
                    st.uptodate.clear(s, s + 1);
                }
            }
            self.maybe_clean(&f, &mut st);
        }
        result
    }
}
