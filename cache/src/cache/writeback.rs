//! Writeback of dirty folios (clustered), flush, and the parallel flush workers.

use super::*;

/// A group of a batched writeback: its members, a reference to each one's memory, the offset
/// of its merged copy in the batch's arena (none for a folio alone), and the end of its runs.
type WbGroup = (Vec<Arc<Folio>>, Vec<Arc<AlignedBuf>>, Option<usize>, usize);

impl Inner {
    /// Writes back the folio's dirty sectors. With `wait`, waits for an in-flight writeback
    /// first (so everything dirty when called is written when this returns `Written`/`Clean`).
    ///
    /// When the folio's dirty data reaches its end, the following folios whose dirty data starts
    /// at their beginning join the writeback (up to `cluster_folios`), so that sequentially
    /// written data goes down in large contiguous writes.
    ///
    /// A folio written back alone goes down from its own memory; a group is merged into one
    /// buffer first (see [`Self::merge_group`]). With `to_sync` (a flush's writeback) the lower
    /// writes go with [`BlockDev::write_batch_to_sync`].
    pub(super) fn writeback_folio(
        &self,
        f: &Arc<Folio>,
        wait: bool,
        to_sync: bool,
    ) -> Result<WbOutcome> {
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
        let mut runs = WB_RUNS.with(Cell::take);
        runs.clear();
        let mut frozen = Vec::with_capacity(1);
        let members = self.snapshot_group(f, st, &mut frozen, &mut runs);
        let end = members.last().map_or(f.start, |g| g.start + g.len as u64);
        let mut arena = None;
        let outcome = if self.zap_overlaps(f.start, end) {
            Ok(WbOutcome::Deferred)
        } else {
            let src: &[u8] = if members.len() > 1 {
                let merged = arena.insert(self.take_arena());
                self.merge_group(&members, &frozen, &runs, merged);
                // The merged copy holds the bytes: writers need not copy the folios.
                frozen.clear();
                merged
            } else {
                frozen.first().map_or(&[][..], |d| &d[..])
            };
            let writes: Vec<(&[u8], u64)> = self
                .run_ranges(&members, &runs)
                .into_iter()
                .map(|(a, b)| (&src[a..b], f.start + a as u64))
                .collect();
            if to_sync {
                self.lower
                    .write_batch_to_sync(&writes)
                    .into_iter()
                    .collect::<Result<()>>()
                    .map(|()| WbOutcome::Written)
            } else {
                writes
                    .iter()
                    .try_for_each(|&(b, o)| self.lower.write_at(b, o))
                    .map(|()| WbOutcome::Written)
            }
        };
        // The memory goes back before the writeback ends, so that a writer woken by its end
        // finds it unshared (no copy).
        drop(frozen);
        self.finish_group(&members, &runs, &outcome);
        if let Some(merged) = arena {
            self.keep_arena(merged);
        }
        WB_RUNS.with(|c| c.set(runs));
        outcome
    }

    /// Takes the dirty sectors of `f` (locked as `st`, dirty, not under writeback) for
    /// writeback, and those of the following folios that join its writeback (see
    /// [`Self::writeback_folio`]): marks them all under writeback, records their dirty runs in
    /// `runs` and a reference to each one's memory in `frozen` (nothing is copied: a change of
    /// a folio under writeback moves it to a copy of its own). Returns the members, `f` first.
    fn snapshot_group(
        &self,
        f: &Arc<Folio>,
        mut st: MutexGuard<'_, FolioState>,
        frozen: &mut Vec<Arc<AlignedBuf>>,
        runs: &mut Vec<(usize, usize, usize)>,
    ) -> Vec<Arc<Folio>> {
        // (member number, first sector, end sector) of every dirty run, in disk order.
        let mut members: Vec<Arc<Folio>> = Vec::with_capacity(1);
        let mut open_end = snapshot_dirty(f, &mut st, 0, frozen, runs);
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
            open_end = snapshot_dirty(&g, &mut gs, members.len(), frozen, runs);
            drop(gs);
            members.push(g);
        }
        self.hook(HookPoint::AfterWritebackSnapshot, f.index);
        members
    }

    /// Copies the dirty runs of a group of several folios from their memory (`frozen`, as
    /// taken by [`Self::snapshot_group`]) into `out`, a folio's room per member, so that runs
    /// that touch across folios go down as one write. No lock is needed: nobody changes memory
    /// a writeback holds. The caller lets go of the memory right after.
    fn merge_group(
        &self,
        members: &[Arc<Folio>],
        frozen: &[Arc<AlignedBuf>],
        runs: &[(usize, usize, usize)],
        out: &mut [u8],
    ) {
        let mut bytes = 0;
        for &(m, s, e) in runs {
            let (Some(g), Some(mem)) = (members.get(m), frozen.get(m)) else {
                continue;
            };
            let (x, y) = (g.sector_bytes(s).0, g.sector_bytes(e - 1).1);
            let base = m * self.folio_size;
            out[base + x..base + y].copy_from_slice(&mem[x..y]);
            bytes += y - x;
        }
        self.counters
            .merged_bytes
            .fetch_add(bytes as u64, Ordering::Relaxed);
    }

    /// Ends the writeback of `members` with `outcome`: a snapshot that did not reach the lower
    /// layer makes its sectors dirty again (the cache holds them or newer bytes, since nothing
    /// drops sectors under writeback). Wakes the waiters and counts.
    fn finish_group(
        &self,
        members: &[Arc<Folio>],
        runs: &[(usize, usize, usize)],
        outcome: &Result<WbOutcome>,
    ) {
        for (m, g) in members.iter().enumerate() {
            let mut gs = g.lock();
            gs.writeback = false;
            g.in_writeback.store(false, Ordering::Relaxed);
            if !matches!(outcome, Ok(WbOutcome::Written)) {
                for &(_, s, e) in runs.iter().filter(|r| r.0 == m) {
                    gs.dirty.set(s, e);
                }
            }
            self.maybe_clean(g, &mut gs);
            drop(gs);
            g.cv.notify_all();
        }
        match outcome {
            Ok(WbOutcome::Written) => {
                let wb_bytes: usize = runs
                    .iter()
                    .filter_map(|&(m, s, e)| {
                        let g = members.get(m)?;
                        Some(g.sector_bytes(e - 1).1 - g.sector_bytes(s).0)
                    })
                    .sum();
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
                    members.first().map_or(0, |f| f.index),
                    members.last().map_or(0, |f| f.index)
                );
            }
            _ => {}
        }
    }

    /// The byte ranges (in a snapshot buffer with a folio's room per member) that the runs of
    /// a group's writeback write; runs that touch are merged into one lower write.
    fn run_ranges(
        &self,
        members: &[Arc<Folio>],
        runs: &[(usize, usize, usize)],
    ) -> Vec<(usize, usize)> {
        let mut out: Vec<(usize, usize)> = Vec::with_capacity(1);
        for &(m, s, e) in runs {
            let base = m * self.folio_size;
            let (x, y) = members
                .get(m)
                .map_or((0, 0), |g| (g.sector_bytes(s).0, g.sector_bytes(e - 1).1));
            match out.last_mut() {
                Some(last) if last.1 == base + x => last.1 = base + y,
                _ => out.push((base + x, base + y)),
            }
        }
        out
    }

    /// Writes back the dirty folios of `folios` that no writeback has taken (each clustered
    /// with its followers as [`Self::writeback_folio`] does), with all their lower writes in one
    /// [`BlockDev::write_batch`]: on an O_DIRECT image they are in flight together. Folios under
    /// writeback are skipped; the ones a zap overlaps stay dirty. Returns how many folios were
    /// written, and the first folio and error of every group that failed.
    ///
    /// A folio written back alone goes down from its own memory; groups of several are merged
    /// into one arena, taken when the first such group comes: a batch takes folios while a
    /// whole cluster's room is left in it (the rest wait for the next call). With `to_sync` (a flush's writeback) the batch goes down
    /// with [`BlockDev::write_batch_to_sync`].
    pub(super) fn writeback_batch(
        &self,
        folios: &[Arc<Folio>],
        to_sync: bool,
    ) -> (usize, Vec<(u64, BlockError)>) {
        let room = self.folio_size * self.cluster_folios;
        // Only merged groups need it: a batch of folios written back alone takes none.
        let mut arena: Option<AlignedBuf> = None;
        let mut runs = WB_RUNS.with(Cell::take);
        runs.clear();
        // (members, their memory, arena offset if merged, end of its runs in `runs`).
        let mut groups: Vec<WbGroup> = Vec::new();
        let mut used = 0usize;
        for f in folios {
            if arena.as_ref().is_some_and(|a| used + room > a.len()) {
                break;
            }
            let st = f.lock();
            if st.writeback || st.dirty.is_empty() {
                continue;
            }
            let first_run = runs.len();
            let mut frozen = Vec::with_capacity(1);
            let members = self.snapshot_group(f, st, &mut frozen, &mut runs);
            let end = members.last().map_or(f.start, |g| g.start + g.len as u64);
            if self.zap_overlaps(f.start, end) {
                let mine: Vec<(usize, usize, usize)> = runs.drain(first_run..).collect();
                drop(frozen);
                self.finish_group(&members, &mine, &Ok(WbOutcome::Deferred));
                continue;
            }
            let at = (members.len() > 1).then(|| {
                let at = used;
                let merged = arena.get_or_insert_with(|| self.take_arena());
                self.merge_group(
                    &members,
                    &frozen,
                    &runs[first_run..],
                    &mut merged[at..at + room],
                );
                used = (used + members.len() * self.folio_size).next_multiple_of(4096);
                frozen.clear();
                at
            });
            groups.push((members, frozen, at, runs.len()));
        }
        let mut writes: Vec<(&[u8], u64)> = Vec::new();
        let mut owner: Vec<usize> = Vec::new();
        let mut run_start = 0;
        for (gi, (members, frozen, at, run_end)) in groups.iter().enumerate() {
            let start = members.first().map_or(0, |f| f.start);
            let src: &[u8] = match (at, &arena) {
                (Some(at), Some(merged)) => &merged[*at..],
                _ => frozen.first().map_or(&[][..], |d| &d[..]),
            };
            for (a, b) in self.run_ranges(members, &runs[run_start..*run_end]) {
                writes.push((&src[a..b], start + a as u64));
                owner.push(gi);
            }
            run_start = *run_end;
        }
        let mut outcomes: Vec<Result<WbOutcome>> =
            groups.iter().map(|_| Ok(WbOutcome::Written)).collect();
        if !writes.is_empty() {
            let results = if to_sync {
                self.lower.write_batch_to_sync(&writes)
            } else {
                self.lower.write_batch(&writes)
            };
            for (k, r) in results.into_iter().enumerate() {
                if let (Err(e), Some(&gi)) = (r, owner.get(k)) {
                    if let Some(o @ Ok(_)) = outcomes.get_mut(gi) {
                        *o = Err(e);
                    }
                }
            }
        }
        drop(writes);
        let mut written = 0;
        let mut failed = Vec::new();
        let mut run_start = 0;
        for ((members, frozen, _, run_end), outcome) in groups.into_iter().zip(outcomes) {
            drop(frozen);
            self.finish_group(&members, &runs[run_start..run_end], &outcome);
            run_start = run_end;
            match outcome {
                Ok(_) => written += members.len(),
                Err(e) => failed.push((members.first().map_or(0, |f| f.index), e)),
            }
        }
        if let Some(merged) = arena {
            self.keep_arena(merged);
        }
        WB_RUNS.with(|c| c.set(runs));
        (written, failed)
    }

    /// An arena for merged groups from the shared pool, or a new one: room for a flusher's
    /// batch of folios plus one cluster, within bounds (a batch that fills it leaves the rest
    /// of its folios for the next call), and never less than one cluster.
    /// Shared rather than per thread, because a flush writes back on threads of its own that
    /// end with it: their buffers would be new memory (page faults, the allocator's zeroing)
    /// at every flush, and the crash journal's trims flush every 64 MiB of writes.
    fn take_arena(&self) -> AlignedBuf {
        let room = self.folio_size * self.cluster_folios;
        let want = (WRITEBACK_BATCH * self.folio_size + room)
            .clamp(BATCH_ARENA, MAX_ARENA)
            .max(room);
        let popped = lock(&self.wb_arenas).pop();
        // A fresh arena is zeroed by the allocator and touches no page until used.
        popped.unwrap_or_default().at_least(want)
    }

    /// Returns an arena to the pool (at most `KEPT_ARENAS` are kept).
    fn keep_arena(&self, arena: AlignedBuf) {
        let mut kept = lock(&self.wb_arenas);
        if kept.len() < KEPT_ARENAS {
            kept.push(arena);
        }
    }

    /// Writes back everything dirty in `f` as of now, waiting out zaps and in-flight writebacks
    /// (`to_sync`: see [`Self::writeback_folio`]).
    pub(super) fn sync_folio(&self, f: &Arc<Folio>, to_sync: bool) -> Result<()> {
        loop {
            match self.writeback_folio(f, true, to_sync)? {
                WbOutcome::Deferred => self.wait_zaps_clear(f.start, f.start + f.len as u64),
                _ => return Ok(()),
            }
        }
    }

    /// Writes back every folio of `folios` (in disk order) and returns the first error. A long
    /// list is shared by up to `FLUSH_WORKERS` threads that take chunks of whole runs of
    /// adjacent folios whose dirty data touches (a run is at most `cluster_folios`, what one
    /// clustered writeback takes along) and write each chunk back in one batch, so that the
    /// lower layer sees several writebacks at once (a copy-on-write writeback waits for a read
    /// of the backing file; an O_DIRECT image has a batch in flight together) while sequential
    /// dirty data still reaches it in one write: a run never starts inside another thread's
    /// cluster.
    ///
    /// The flushing thread starts alone, `FLUSH_MIN_RUNS` runs at a time, and brings in the
    /// other threads only once one of its chunks waited: it slept (for the device, a backing
    /// read; being preempted does not count, see [`blockdev::ThreadUsage`]) and took at least
    /// `FLUSH_SLOW_RUN` per run (a short wait for a writeback the flusher thread has in flight
    /// does not count either). Writebacks that only copy into memory (the host page cache
    /// below a buffered image) gain nothing from more threads, and starting them is not free:
    /// with a FLUSH every 32 random 4 KiB writes, the threads started for each FLUSH cost a
    /// third of the daemon's CPU per write (BENCHMARKS.md, 2026-12-03 15:00 UTC).
    ///
    /// With `to_sync` (the writeback of a flush, whose lower flush follows) the lower writes
    /// go with [`BlockDev::write_batch_to_sync`]: past a page cache below where the lower
    /// layer has one and can.
    pub(super) fn sync_folios(&self, folios: &[Arc<Folio>], to_sync: bool) -> Option<BlockError> {
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
        let next = AtomicUsize::new(0);
        let first_error = Mutex::new(None);
        // A chunk of at most `n` runs: their writebacks go down in one batch, then each folio
        // is synced (what the batch skipped or was dirtied since); a folio whose batched
        // writeback failed has reported its error. False once no run is left.
        let chunk = |n: usize| -> bool {
            let first = next.fetch_add(n, Ordering::Relaxed);
            let Some(chunk) = runs.get(first..(first + n).min(runs.len())) else {
                return false;
            };
            let (Some(a), Some(b)) = (chunk.first(), chunk.last()) else {
                return false;
            };
            let span = &folios[a.start..b.end];
            let (_, failed) = self.writeback_batch(span, to_sync);
            for f in span {
                if failed.iter().any(|(i, _)| *i == f.index) {
                    continue;
                }
                if let Err(e) = self.sync_folio(f, to_sync) {
                    lock(&first_error).get_or_insert(e);
                }
            }
            if let Some((_, e)) = failed.into_iter().next() {
                lock(&first_error).get_or_insert(e);
            }
            true
        };
        // Alone, until a chunk waits (or nothing is left).
        let mut waited = false;
        while !waited {
            let (before, started) = (ThreadUsage::now(), Instant::now());
            if !chunk(FLUSH_MIN_RUNS) {
                break;
            }
            waited = started.elapsed() >= FLUSH_SLOW_RUN * FLUSH_MIN_RUNS as u32
                && ThreadUsage::slept_between(before, ThreadUsage::now());
        }
        if waited {
            // The rest on up to `FLUSH_WORKERS` threads (this one included), in chunks small
            // enough that every worker gets some (copy-on-write writebacks of one batch read
            // their backing data one after another), at most `FLUSH_CHUNK_RUNS`.
            let left = runs.len().saturating_sub(next.load(Ordering::Relaxed));
            let workers = left.div_ceil(FLUSH_MIN_RUNS).clamp(1, FLUSH_WORKERS);
            let chunk_runs = left.div_ceil(workers).clamp(1, FLUSH_CHUNK_RUNS);
            let work = || while chunk(chunk_runs) {};
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
            // Folios another writeback has in flight are passed over here, not taken and
            // skipped by the batch: while the list is mostly in flight, a batch of them would
            // write nothing and its caller would only wait. (A hint read without the folio's
            // lock, which the dirty list's holder may not wait for: the batch checks again.)
            let batch: Vec<Arc<Folio>> = list
                .range(cursor..)
                .chain(list.range(..cursor))
                .filter(|(_, f)| !f.in_writeback.load(Ordering::Relaxed))
                .take(max)
                .map(|(_, f)| f.clone())
                .collect();
            if let Some(last) = batch.last() {
                self.wb_cursor
                    .store(last.index.wrapping_add(1), Ordering::Relaxed);
            }
            batch
        };
        let (written, failed) = self.writeback_batch(&batch, false);
        match failed.into_iter().next() {
            Some((_, e)) if written == 0 => Err(e),
            _ => Ok(written),
        }
    }

    /// The error of every flush (and write-back) after a flush of the lower layer failed.
    fn earlier_lower_flush_failed(&self) -> Result<()> {
        if self.lower_flush_failed.load(Ordering::SeqCst) {
            return Err(BlockError::Io(std::io::Error::other(
                "an earlier flush of the lower layer failed; written data may have been lost",
            )));
        }
        Ok(())
    }

    pub(super) fn lower_flush(&self) -> Result<()> {
        self.earlier_lower_flush_failed()?;
        self.lower
            .flush()
            .inspect_err(|_| self.lower_flush_failed.store(true, Ordering::SeqCst))
    }

    /// Writes back every dirty folio (`to_sync`: for a flush, see [`Self::sync_folios`]); the
    /// first error, if any.
    fn write_back_dirty(&self, to_sync: bool) -> Result<()> {
        let accounted: Vec<Arc<Folio>> = lock(&self.dirty_list).values().cloned().collect();
        match self.sync_folios(&accounted, to_sync) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    pub(super) fn flush(&self) -> Result<()> {
        self.write_back_dirty(true)?;
        self.hook(HookPoint::BeforeLowerFlush, 0);
        self.lower_flush()
    }

    /// [`BlockDev::write_back`]: every dirty folio written down, then the lower layer's
    /// write-back, no flush. After a failed flush of the lower layer it fails like a flush
    /// (what that flush lost is not with the kernel any more).
    pub(super) fn write_back(&self) -> Result<()> {
        self.earlier_lower_flush_failed()?;
        self.write_back_dirty(false)?;
        self.lower.write_back()
    }
}

/// Marks the dirty sectors of `f` (locked as `st`) as under writeback: records their runs
/// as member `member` in `runs` and a reference to the folio's memory in `frozen`, clears the
/// dirty bits. Returns whether the last run reaches the folio's end.
pub(super) fn snapshot_dirty(
    f: &Folio,
    st: &mut FolioState,
    member: usize,
    frozen: &mut Vec<Arc<AlignedBuf>>,
    runs: &mut Vec<(usize, usize, usize)>,
) -> bool {
    let n = f.sectors();
    let mut s = 0;
    let mut open_end = false;
    while let Some(first) = st.dirty.find(s, n, true) {
        let end = st.dirty.find(first, n, false).unwrap_or(n);
        runs.push((member, first, end));
        open_end = end == n;
        s = end;
    }
    frozen.push(st.data.clone());
    st.dirty.clear(0, n);
    st.writeback = true;
    f.in_writeback.store(true, Ordering::Relaxed);
    open_end
}
