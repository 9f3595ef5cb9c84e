//! Writeback of dirty folios (clustered), flush, and the parallel flush workers.

use super::*;

impl Inner {
    /// Writes back the folio's dirty sectors. With `wait`, waits for an in-flight writeback
    /// first (so everything dirty when called is written when this returns `Written`/`Clean`).
    ///
    /// When the folio's dirty data reaches its end, the following folios whose dirty data starts
    /// at their beginning join the writeback (up to `cluster_folios`), so that sequentially
    /// written data goes down in large contiguous writes.
    pub(super) fn writeback_folio(&self, f: &Arc<Folio>, wait: bool) -> Result<WbOutcome> {
        let mut st = f.lock();
        if st.writeback {
            if !wait {
                return Ok(WbOutcome::Busy);
            }
            st = f.wait_writeback(st);
        }
        if st.dirty.is_empty() {
            return Ok(WbOutcome::Clean);
        }
        let mut buf = take_buf(&WB_BUF, self.folio_size * self.cluster_folios);
        // (member number, first sector, end sector) of every dirty run, in disk order.
        let mut runs = WB_RUNS.with(Cell::take);
        runs.clear();
        let mut members: Vec<Arc<Folio>> = Vec::with_capacity(1);
        let mut open_end = snapshot_dirty(f, &mut st, 0, &mut buf, &mut runs);
        members.push(f.clone());
        drop(st);
        while open_end && members.len() < self.cluster_folios {
            let Some(g) = self.lookup(f.index + members.len() as u64) else {
                break;
            };
            let mut gs = g.lock();
            if gs.writeback || gs.evicted || !gs.dirty.get(0) {
                break;
            }
            open_end = snapshot_dirty(
                &g,
                &mut gs,
                members.len(),
                &mut buf[members.len() * self.folio_size..],
                &mut runs,
            );
            drop(gs);
            members.push(g);
        }

        self.hook(HookPoint::AfterWritebackSnapshot, f.index);
        let end = members.last().map_or(f.start, |g| g.start + g.len as u64);
        let outcome = if self.zap_overlaps(f.start, end) {
            Ok(WbOutcome::Deferred)
        } else {
            self.write_runs(&members, &buf, &runs)
                .map(|()| WbOutcome::Written)
        };

        for (m, g) in members.iter().enumerate() {
            let mut gs = g.lock();
            gs.writeback = false;
            if !matches!(outcome, Ok(WbOutcome::Written)) {
                // The snapshot did not reach the lower layer: its sectors are dirty again (the
                // cache holds them or newer bytes, since nothing drops sectors under writeback).
                for &(_, s, e) in runs.iter().filter(|r| r.0 == m) {
                    gs.dirty.set(s, e);
                }
            }
            self.maybe_clean(g, &mut gs);
            drop(gs);
            g.cv.notify_all();
        }
        let wb_bytes: usize = runs
            .iter()
            .filter_map(|&(m, s, e)| {
                let g = members.get(m)?;
                Some(g.sector_bytes(e - 1).1 - g.sector_bytes(s).0)
            })
            .sum();
        WB_BUF.with(|c| c.set(buf));
        WB_RUNS.with(|c| c.set(runs));
        match &outcome {
            Ok(WbOutcome::Written) => {
                self.counters
                    .writebacks
                    .fetch_add(members.len() as u64, Ordering::Relaxed);
                self.counters
                    .writeback_bytes
                    .fetch_add(wb_bytes as u64, Ordering::Relaxed);
            }
            Err(e) => {
                self.counters
                    .writeback_errors
                    .fetch_add(1, Ordering::Relaxed);
                log::warn!(
                    "cache writeback of folios {}..={} failed: {e}",
                    f.index,
                    f.index + members.len() as u64 - 1
                );
            }
            _ => {}
        }
        outcome
    }

    /// Writes the snapshot runs (`buf` starts at disk offset `start`, one folio per member),
    /// merging runs that touch into one lower write.
    pub(super) fn write_runs(
        &self,
        members: &[Arc<Folio>],
        buf: &[u8],
        runs: &[(usize, usize, usize)],
    ) -> Result<()> {
        let Some(start) = members.first().map(|f| f.start) else {
            return Ok(());
        };
        let byte_range = |&(m, s, e): &(usize, usize, usize)| {
            let base = m * self.folio_size;
            let (x, y) = members
                .get(m)
                .map_or((0, 0), |g| (g.sector_bytes(s).0, g.sector_bytes(e - 1).1));
            (base + x, base + y)
        };
        let mut pending: Option<(usize, usize)> = None;
        for r in runs {
            let (x, y) = byte_range(r);
            pending = match pending {
                Some((a, b)) if b == x => Some((a, y)),
                Some((a, b)) => {
                    self.lower.write_at(&buf[a..b], start + a as u64)?;
                    Some((x, y))
                }
                None => Some((x, y)),
            };
        }
        if let Some((a, b)) = pending {
            self.lower.write_at(&buf[a..b], start + a as u64)?;
        }
        Ok(())
    }

    /// Writes back everything dirty in `f` as of now, waiting out zaps and in-flight writebacks.
    pub(super) fn sync_folio(&self, f: &Arc<Folio>) -> Result<()> {
        loop {
            match self.writeback_folio(f, true)? {
                WbOutcome::Deferred => self.wait_zaps_clear(f.start, f.start + f.len as u64),
                _ => return Ok(()),
            }
        }
    }

    /// Writes back every folio of `folios` (in disk order) and returns the first error. A long
    /// list is shared by up to `FLUSH_WORKERS` threads that take whole runs of adjacent folios
    /// whose dirty data touches (at most `cluster_folios`, what one clustered writeback takes
    /// along), so that the lower layer sees several writebacks at once (a copy-on-write
    /// writeback waits for a read of the backing file) while sequential dirty data still
    /// reaches it in one write: a run never starts inside another thread's cluster.
    pub(super) fn sync_folios(&self, folios: &[Arc<Folio>]) -> Option<BlockError> {
        // Runs follow the clustering rule of `sync_folio` as it looks now (a dirty end meets a
        // dirty beginning); that only decides who writes what, `sync_folio` re-checks.
        let mut runs: Vec<std::ops::Range<usize>> = Vec::new();
        let mut open_end = false;
        for (i, f) in folios.iter().enumerate() {
            let (starts, ends) = {
                let st = f.lock();
                let n = f.sectors();
                (st.dirty.get(0), st.dirty.get(n - 1))
            };
            match runs.last_mut() {
                Some(r)
                    if open_end
                        && starts
                        && r.len() < self.cluster_folios
                        && folios[r.end - 1].index + 1 == f.index =>
                {
                    r.end = i + 1;
                }
                _ => runs.push(i..i + 1),
            }
            open_end = ends;
        }
        let workers = runs.len().div_ceil(FLUSH_MIN_RUNS).min(FLUSH_WORKERS);
        let next = AtomicUsize::new(0);
        let first_error = Mutex::new(None);
        let work = || {
            while let Some(run) = runs.get(next.fetch_add(1, Ordering::Relaxed)) {
                for f in &folios[run.clone()] {
                    if let Err(e) = self.sync_folio(f) {
                        lock(&first_error).get_or_insert(e);
                    }
                }
            }
        };
        if workers <= 1 {
            work();
        } else {
            std::thread::scope(|s| {
                for _ in 1..workers {
                    s.spawn(work);
                }
                work();
            });
        }
        first_error
            .into_inner()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Writes back up to `max` dirty folios (round robin over the disk), skipping busy ones.
    /// Returns how many were written; an error only if none could be written.
    ///
    /// The cursor moves past the batch as it is taken, so that threads calling this at once
    /// (the flusher, writers throttled by the dirty budget) take different folios and their
    /// writebacks run in parallel: with an O_DIRECT image each writeback waits for the device,
    /// and callers that all took the same first folio would find it busy and only wait.
    pub(super) fn writeback_some(&self, max: usize) -> Result<usize> {
        let batch: Vec<Arc<Folio>> = {
            let list = lock(&self.dirty_list);
            let cursor = self.wb_cursor.load(Ordering::Relaxed);
            let batch: Vec<Arc<Folio>> = list
                .range(cursor..)
                .chain(list.range(..cursor))
                .take(max)
                .map(|(_, f)| f.clone())
                .collect();
            if let Some(last) = batch.last() {
                self.wb_cursor
                    .store(last.index.wrapping_add(1), Ordering::Relaxed);
            }
            batch
        };
        let mut written = 0;
        let mut error = None;
        for f in &batch {
            match self.writeback_folio(f, false) {
                Ok(WbOutcome::Written) => written += 1,
                Ok(_) => {}
                Err(e) => {
                    error.get_or_insert(e);
                }
            }
        }
        match error {
            Some(e) if written == 0 => Err(e),
            _ => Ok(written),
        }
    }

    pub(super) fn lower_flush(&self) -> Result<()> {
        if self.lower_flush_failed.load(Ordering::SeqCst) {
            return Err(BlockError::Io(std::io::Error::other(
                "an earlier flush of the lower layer failed; written data may have been lost",
            )));
        }
        self.lower
            .flush()
            .inspect_err(|_| self.lower_flush_failed.store(true, Ordering::SeqCst))
    }

    pub(super) fn flush(&self) -> Result<()> {
        let accounted: Vec<Arc<Folio>> = lock(&self.dirty_list).values().cloned().collect();
        let first_error = self.sync_folios(&accounted);
        drop(accounted);
        if let Some(e) = first_error {
            return Err(e);
        }
        self.hook(HookPoint::BeforeLowerFlush, 0);
        self.lower_flush()
    }
}

/// Copies the dirty sectors of `f` into `buf` (the folio's bytes at the same offsets), records
/// them as runs of member `member`, clears them and starts the writeback. Returns whether the
/// last dirty run reaches the end of the folio.
pub(super) fn snapshot_dirty(
    f: &Folio,
    st: &mut FolioState,
    member: usize,
    buf: &mut [u8],
    runs: &mut Vec<(usize, usize, usize)>,
) -> bool {
    let n = f.sectors();
    let mut s = 0;
    let mut open_end = false;
    while let Some(first) = st.dirty.find(s, n, true) {
        let end = st.dirty.find(first, n, false).unwrap_or(n);
        let (x, y) = (f.sector_bytes(first).0, f.sector_bytes(end - 1).1);
        buf[x..y].copy_from_slice(&st.data[x..y]);
        runs.push((member, first, end));
        open_end = end == n;
        s = end;
    }
    st.dirty.clear(0, n);
    st.writeback = true;
    open_end
}
