//! Writes: into folios (filling partly covered sectors first), write-through, and large writes
//! that bypass the cache.

use super::*;

impl Inner {
    pub(super) fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        if self.read_only {
            return Err(BlockError::ReadOnly);
        }
        check_range(offset, buf.len() as u64, self.size)?;
        let end = offset + buf.len() as u64;
        let fmask = self.folio_size as u64 - 1;
        // The whole folios of a large write go straight down (see `write_bypass`); the partial
        // folios at either end go through the cache.
        let head_end = offset
            .checked_add(fmask)
            .map_or(end, |v| (v & !fmask).min(end));
        let mid_end = if end == self.size { end } else { end & !fmask };
        if mid_end > head_end && self.bypasses_write(buf.len() as u64, head_end, mid_end) {
            let (h, m) = ((head_end - offset) as usize, (mid_end - offset) as usize);
            self.write_cached(&buf[..h], offset)?;
            self.write_bypass(&buf[h..m], head_end)?;
            self.write_cached(&buf[m..], mid_end)?;
        } else {
            self.write_cached(buf, offset)?;
        }
        if !self.wce.load(Ordering::SeqCst) && !buf.is_empty() {
            let first = offset >> self.folio_shift;
            let last = (offset + buf.len() as u64 - 1) >> self.folio_shift;
            for index in first..=last {
                if let Some(f) = self.lookup(index) {
                    self.sync_folio(&f, true)?;
                }
            }
            self.lower_flush()?;
        }
        Ok(())
    }

    /// Whether a write of `len` bytes whose whole folios span `[head_end, mid_end)` sends
    /// them around the cache: from `bypass_threshold` on always, from
    /// `rewrite_bypass_threshold` on where the lower layer rewrites them in place.
    fn bypasses_write(&self, len: u64, head_end: u64, mid_end: u64) -> bool {
        if self.bypass_threshold > 0 && len >= self.bypass_threshold {
            return true;
        }
        self.rewrite_bypass_threshold > 0
            && len >= self.rewrite_bypass_threshold
            && self
                .lower
                .rewrites_in_page_cache(head_end, mid_end - head_end)
    }

    pub(super) fn write_cached(&self, buf: &[u8], offset: u64) -> Result<()> {
        let mut done = 0;
        for (index, a, n) in self.segments(offset, buf.len()) {
            self.write_segment(index, a, &buf[done..done + n])?;
            done += n;
        }
        Ok(())
    }

    /// Writes whole folios `[offset, offset + buf.len())` straight to the lower layer (see
    /// [`Inner::bypass_with`]).
    pub(super) fn write_bypass(&self, buf: &[u8], offset: u64) -> Result<()> {
        let end = offset + buf.len() as u64;
        self.bypass_with(offset, end, || {
            self.lower.write_uncached_at(buf, offset).map(|()| true)
        })
        .map(|_| ())
    }

    /// Whether a write of `[offset, offset + len)` now would only copy into folios
    /// ([`BlockDev::writes_in_memory`]): write-back mode, whole sectors (no fill from below),
    /// no part of it sent around the cache, no zap in flight, and room in the dirty budget for
    /// every folio it spans (counted as if each were newly dirtied). Read without any lock: a
    /// hint, stale as soon as it is returned.
    pub(super) fn writes_in_memory(&self, offset: u64, len: u64) -> bool {
        const SECTOR: u64 = 512;
        if self.read_only
            || !self.wce.load(Ordering::Relaxed)
            || len == 0
            || !offset.is_multiple_of(SECTOR)
            || !len.is_multiple_of(SECTOR)
            || check_range(offset, len, self.size).is_err()
            || self.bypass_threshold > 0 && len >= self.bypass_threshold
            || self.rewrite_bypass_threshold > 0 && len >= self.rewrite_bypass_threshold
            || self.zaps_active.load(Ordering::Relaxed) > 0
        {
            return false;
        }
        let folios = ((offset + len - 1) >> self.folio_shift) - (offset >> self.folio_shift) + 1;
        let folios = usize::try_from(folios).unwrap_or(usize::MAX);
        self.dirty_folios
            .load(Ordering::Relaxed)
            .saturating_add(folios)
            <= self.max_dirty
    }

    /// Whether a write of `[offset, offset + len)` goes down with
    /// [`BlockDev::write_in_place_persisted`]: in write-back mode, whole folios that the cache
    /// sends around itself anyway ([`Inner::bypasses_write`]), where the lower layer persists
    /// them in place.
    pub(super) fn persists_in_place(&self, offset: u64, len: u64) -> bool {
        self.may_persist(offset, len)
            && self.bypasses_write(len, offset, offset + len)
            && self.lower.persists_in_place(offset, len)
    }

    /// Whole folios of a writable cache in write-back mode: the range a persisted write may
    /// take.
    fn may_persist(&self, offset: u64, len: u64) -> bool {
        let fmask = self.folio_size as u64 - 1;
        let end = offset.saturating_add(len);
        !self.read_only
            && self.wce.load(Ordering::SeqCst)
            && len > 0
            && check_range(offset, len, self.size).is_ok()
            && offset & fmask == 0
            && (end & fmask == 0 || end == self.size)
    }

    /// A write the lower layer persists in place ([`BlockDev::write_in_place_persisted`]),
    /// around the cache like any bypass: afterwards no folio holds a dirty or stale copy of the
    /// range. `Ok(false)` (not whole folios, write-through mode, or the lower layer refused)
    /// changes nothing.
    pub(super) fn write_in_place_persisted(&self, buf: &[u8], offset: u64) -> Result<bool> {
        if !self.may_persist(offset, buf.len() as u64) {
            return Ok(false);
        }
        let end = offset + buf.len() as u64;
        self.bypass_with(offset, end, || {
            self.lower.write_in_place_persisted(buf, offset)
        })
    }

    /// Runs `write`, a lower write of the whole folios `[offset, end)`, around the cache. The
    /// range is registered like a zap (fills of it are not installed, writebacks are deferred)
    /// and in-flight writebacks of its cached folios finish first, so no older snapshot can
    /// land after this write. Once it is down, the cached copies are dropped. If it fails,
    /// dirty sectors stay dirty (they are retried over whatever reached the disk) and clean
    /// copies are forgotten. If it says `Ok(false)` (it wrote nothing), the folios stay as
    /// they are.
    fn bypass_with(
        &self,
        offset: u64,
        end: u64,
        write: impl FnOnce() -> Result<bool>,
    ) -> Result<bool> {
        let id = self.register_zap(offset, end);
        let pinned = self.cached_in_range(offset, end);
        self.hook(HookPoint::BeforeLowerZap, offset >> self.folio_shift);
        for f in &pinned {
            drop(f.wait_writeback(f.lock()));
        }
        let result = write();
        if !matches!(result, Ok(false)) {
            for f in &pinned {
                let mut st = f.wait_writeback(f.lock());
                let n = f.sectors();
                if result.is_ok() {
                    st.uptodate.clear(0, n);
                    st.dirty.clear(0, n);
                } else {
                    for s in 0..n {
                        if !st.dirty.get(s) {
                            st.uptodate.clear(s, s + 1);
                        }
                    }
                }
                self.maybe_clean(f, &mut st);
            }
        }
        drop(pinned);
        self.unregister_zap(id);
        if matches!(result, Ok(true)) {
            self.counters.bypassed.fetch_add(1, Ordering::Relaxed);
        }
        result
    }

    pub(super) fn write_segment(&self, index: u64, a: usize, data: &[u8]) -> Result<()> {
        let b = a + data.len();
        if data.is_empty() {
            return Ok(());
        }
        loop {
            let f = self.get_folio(index)?;
            let (sa, sb) = f.sector_span(a, b);
            let (head, tail) = (sa, sb - 1);
            let mut st = f.lock();
            if st.evicted {
                continue;
            }
            // A partly covered sector must hold the disk's bytes before it becomes dirty, so that
            // writeback never writes bytes the cache does not know.
            let need_head = f.partially_covers(head, a, b) && !st.uptodate.get(head);
            let need_tail =
                tail != head && f.partially_covers(tail, a, b) && !st.uptodate.get(tail);
            if need_head || need_tail {
                drop(st);
                if need_head {
                    self.fill_sectors(&f, head, head + 1)?;
                }
                if need_tail {
                    self.fill_sectors(&f, tail, tail + 1)?;
                }
                continue;
            }
            // A zap (or bypassing write) of these bytes is in flight: it drops the cached sectors
            // of its range once its lower operation is done, so a write landing now would be
            // lost although it completed after the zap's lower operation. Wait for it to end.
            // (Checked under the folio lock: a zap registered after this check clears the folio
            // only after this write released it, so it orders after this write everywhere.)
            let (lo_b, hi_b) = (f.start + a as u64, f.start + b as u64);
            if self.zaps_active.load(Ordering::SeqCst) > 0 && self.zap_overlaps(lo_b, hi_b) {
                drop(st);
                drop(f);
                self.wait_zaps_clear(lo_b, hi_b);
                continue;
            }
            let newly_dirty = !st.accounted;
            if newly_dirty {
                if !self.reserve_dirty() {
                    drop(st);
                    drop(f);
                    self.relieve_pressure()?;
                    continue;
                }
                st.accounted = true;
                lock(&self.dirty_list).insert(index, f.clone());
            }
            st.data_mut(&self.counters.cow_copies)[a..b].copy_from_slice(data);
            st.uptodate.set(sa, sb);
            st.dirty.set(sa, sb);
            drop(st);
            f.touch();
            // Every `KICK_EVERY` folios that become dirty wake the flusher, so their data
            // starts down to the lower layer in the background while the guest keeps writing: a
            // later FLUSH then finds less left to write back (and the lower layer has had time
            // to start its own writeback) instead of doing all of it serially on its own path.
            // Batching keeps the wake-up cost off single small writes.
            let eager = newly_dirty
                && self
                    .newly_dirtied
                    .fetch_add(1, Ordering::Relaxed)
                    .wrapping_add(1)
                    .is_multiple_of(KICK_EVERY);
            if eager || self.dirty_folios.load(Ordering::Relaxed) * 2 >= self.max_dirty {
                self.kick_flusher();
            }
            return Ok(());
        }
    }
}
