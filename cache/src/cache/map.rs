//! Folio lookup, allocation and eviction (the clock over the shards).

use super::*;

impl Inner {
    pub(super) fn lookup(&self, index: u64) -> Option<Arc<Folio>> {
        lock(self.shard(index)).map.get(&index).cloned()
    }

    /// The folio `index`, created (evicting or writing back if the cache is full) if absent.
    pub(super) fn get_folio(&self, index: u64) -> Result<Arc<Folio>> {
        loop {
            if let Some(f) = lock(self.shard(index)).map.get(&index) {
                f.touch();
                return Ok(f.clone());
            }
            let reserved = self
                .nr_folios
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                    (n < self.max_folios).then_some(n + 1)
                })
                .is_ok();
            if reserved {
                let buf = lock(&self.free_bufs).pop().unwrap_or_default();
                let start = index << self.folio_shift;
                let folio = Arc::new(Folio::new(index, start, self.folio_len(index), buf));
                let mut shard = lock(self.shard(index));
                if let Some(existing) = shard.map.get(&index) {
                    let existing = existing.clone();
                    drop(shard);
                    self.nr_folios.fetch_sub(1, Ordering::AcqRel);
                    self.recycle(folio);
                    existing.touch();
                    return Ok(existing);
                }
                shard.map.insert(index, folio.clone());
                shard.clock.push_back(index);
                return Ok(folio);
            }
            if !self.evict_one() {
                self.relieve_pressure()?;
            }
        }
    }

    /// Evicts one clean, unpinned folio if the clock finds one.
    pub(super) fn evict_one(&self) -> bool {
        let n = self.shards.len();
        for _ in 0..2 * n {
            let i = self.evict_hand.fetch_add(1, Ordering::Relaxed) & (n - 1);
            let victim = self.evict_from_shard(&mut lock(&self.shards[i]), false);
            if let Some(f) = victim {
                self.finish_evict(f);
                return true;
            }
        }
        false
    }

    /// Runs the clock over one shard; returns the evicted folio (already out of the map).
    pub(super) fn evict_from_shard(
        &self,
        shard: &mut Shard,
        ignore_referenced: bool,
    ) -> Option<Arc<Folio>> {
        let Shard { map, clock } = shard;
        for _ in 0..clock.len() {
            let index = clock.pop_front()?;
            let Some(f) = map.get(&index) else { continue };
            // The map's reference is the only one: nobody is using the folio, and new references
            // are only made under this shard lock.
            if Arc::strong_count(f) > 1
                || (f.referenced.swap(false, Ordering::Relaxed) && !ignore_referenced)
            {
                clock.push_back(index);
                continue;
            }
            let mut st = match f.state.try_lock() {
                Ok(g) => g,
                Err(TryLockError::Poisoned(p)) => p.into_inner(),
                Err(TryLockError::WouldBlock) => {
                    clock.push_back(index);
                    continue;
                }
            };
            if st.accounted || st.writeback {
                drop(st);
                clock.push_back(index);
                continue;
            }
            st.evicted = true;
            drop(st);
            let f = map.remove(&index);
            self.nr_folios.fetch_sub(1, Ordering::AcqRel);
            return f;
        }
        None
    }

    pub(super) fn finish_evict(&self, f: Arc<Folio>) {
        let index = f.index;
        self.counters.evictions.fetch_add(1, Ordering::Relaxed);
        self.recycle(f);
        self.hook(HookPoint::AfterEvict, index);
    }

    /// Keeps an unreferenced folio's buffer for the next folio.
    pub(super) fn recycle(&self, f: Arc<Folio>) {
        if let Ok(folio) = Arc::try_unwrap(f) {
            let data = folio
                .state
                .into_inner()
                .unwrap_or_else(PoisonError::into_inner)
                .data;
            // A writeback that still holds the memory frees it when it is done with it.
            let Ok(data) = Arc::try_unwrap(data) else {
                return;
            };
            if data.len() == self.folio_size {
                let mut bufs = lock(&self.free_bufs);
                if bufs.len() < FREE_BUFS {
                    bufs.push(data);
                }
            }
        }
    }

    /// Makes progress when no folio slot or no dirty budget is free: writes back some dirty
    /// folios, or waits briefly for pinned folios to be released.
    pub(super) fn relieve_pressure(&self) -> Result<()> {
        self.counters.throttled.fetch_add(1, Ordering::Relaxed);
        self.kick_flusher();
        if self.dirty_folios.load(Ordering::Acquire) > 0
            && self.writeback_some(WRITEBACK_BATCH)? > 0
        {
            return Ok(());
        }
        let g = lock(&self.budget_lock);
        drop(
            self.budget_cv
                .wait_timeout(g, PRESSURE_WAIT)
                .unwrap_or_else(PoisonError::into_inner),
        );
        Ok(())
    }

    pub(super) fn reserve_dirty(&self) -> bool {
        self.dirty_folios
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max_dirty).then_some(n + 1)
            })
            .is_ok()
    }

    /// Releases the folio's dirty accounting once it has no dirty sectors and no writeback.
    pub(super) fn maybe_clean(&self, f: &Folio, st: &mut FolioState) {
        if st.accounted && !st.writeback && st.dirty.is_empty() {
            st.accounted = false;
            lock(&self.dirty_list).remove(&f.index);
            self.dirty_folios.fetch_sub(1, Ordering::AcqRel);
            self.budget_cv.notify_all();
        }
    }
}
