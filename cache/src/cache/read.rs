//! Reads: hits, fills from the lower layer with a zap-sequence token, and large reads that
//! bypass the cache.

use super::*;

impl Inner {
    pub(super) fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(offset, buf.len() as u64, self.size)?;
        if buf.is_empty() {
            return Ok(());
        }
        self.wait_zaps_before_read(offset, offset + buf.len() as u64);
        if self.read_bypass_threshold > 0 && buf.len() as u64 >= self.read_bypass_threshold {
            return self.read_bypass(buf, offset);
        }
        let mut done = 0;
        for (index, a, n) in self.segments(offset, buf.len()) {
            self.read_segment(index, a, &mut buf[done..done + n])?;
            done += n;
        }
        Ok(())
    }

    /// [`Self::read_at`] into a destination in pieces (guest memory): a folio that holds the
    /// whole piece uptodate is copied straight from its memory to the destination (one copy);
    /// any other piece is read exactly as `read_at` reads it, into a buffer, and copied from
    /// there. Same order and invariants as `read_at`: zaps of the range are waited for first,
    /// and a hit copies under the folio lock, as `read_segment`'s hit does.
    pub(super) fn read_into(&self, dst: &dyn ReadSink, offset: u64) -> Result<()> {
        let len = dst.len();
        check_range(offset, len as u64, self.size)?;
        if len == 0 {
            return Ok(());
        }
        if self.read_bypass_threshold > 0 && len as u64 >= self.read_bypass_threshold {
            return read_via_bounce(dst, 0, len, |buf| self.read_at(buf, offset));
        }
        self.wait_zaps_before_read(offset, offset + len as u64);
        let mut done = 0;
        for (index, a, n) in self.segments(offset, len) {
            if !self.fill_from_folio(index, a, n, dst, done)? {
                read_via_bounce(dst, done, n, |buf| self.read_segment(index, a, buf))?;
            }
            done += n;
        }
        Ok(())
    }

    /// Copies folio `index`'s bytes `[a, a + n)` to `dst` at `at` if the folio is cached and
    /// uptodate over them; `false` (nothing copied) otherwise.
    fn fill_from_folio(
        &self,
        index: u64,
        a: usize,
        n: usize,
        dst: &dyn ReadSink,
        at: usize,
    ) -> Result<bool> {
        let Some(f) = self.lookup(index) else {
            return Ok(false);
        };
        let st = f.lock();
        let (sa, sb) = f.sector_span(a, a + n);
        if st.evicted || !st.uptodate.all(sa, sb) {
            return Ok(false);
        }
        dst.fill(at, &st.data[a..a + n]).map_err(BlockError::Io)?;
        drop(st);
        f.touch();
        self.counters.read_hits.fetch_add(1, Ordering::Relaxed);
        Ok(true)
    }

    /// A read the caller executes below the cache itself (`BlockDev::plan_read`, the io_uring
    /// read path): planned only while no cached folio holds any sector of the range uptodate,
    /// after any zap of the range in flight (monotonic reads, below). A write that completed
    /// through the cache left its sectors uptodate in their folio, and they stay so until the
    /// folio leaves the map (after its writeback) or a zap has changed the lower layer under
    /// them; so a write completed before this call is in the lower layer, whose plan sees it.
    /// A folio that only holds other sectors (one filled by a read elsewhere in it) does not
    /// send the read through the cache. Writes that race with the plan were not complete when
    /// the read was submitted, so the read may or may not see them. Such reads do not populate
    /// the cache.
    pub(super) fn plan_read(&self, offset: u64, len: u64) -> Option<ReadPlan> {
        check_range(offset, len, self.size).ok()?;
        if len == 0 {
            return None;
        }
        let end = offset + len;
        self.wait_zaps_before_read(offset, end);
        for f in self.cached_in_range(offset, end) {
            let st = f.lock();
            let a = (offset.max(f.start) - f.start) as usize;
            let b = (end.min(f.start + f.len as u64) - f.start) as usize;
            let (sa, sb) = f.sector_span(a, b);
            if st.evicted || st.uptodate.find(sa, sb, true).is_some() {
                return None;
            }
        }
        self.hook(HookPoint::ReadPlanned, offset >> self.folio_shift);
        self.lower.plan_read(offset, len)
    }

    /// Monotonic reads: a read never starts while a zap (or bypassing write) of its range is in
    /// flight. Such a zap has changed the lower layer before it drops the cached sectors of its
    /// range, so in between, a read served from below sees its result while a read served from
    /// the cache still sees the older bytes: a read that started after the first completed
    /// would go back in time. Waiting orders the read after the zap.
    pub(super) fn wait_zaps_before_read(&self, start: u64, end: u64) {
        if self.zaps_active.load(Ordering::SeqCst) > 0 && self.zap_overlaps(start, end) {
            self.hook(HookPoint::ReadWaitsForZap, start >> self.folio_shift);
            self.wait_zaps_clear(start, end);
        }
    }

    /// A large read, without populating the cache. The cached folios of the range are pinned
    /// first, so a write completed before this read is either in a pinned folio or was written
    /// back before its folio could leave the map. Pinned folios that are uptodate over their
    /// part are copied; every other stretch is read from the lower layer in one request and
    /// then overlaid with the uptodate sectors of the pinned folios in it *as they were before
    /// the lower read*: they are copied aside under the folio lock first (read invariant: a
    /// zap finishing during the lower read may clear such a sector, and the lower layer's
    /// bytes are then older than the write the cache held).
    pub(super) fn read_bypass(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let end = offset + buf.len() as u64;
        let mut pinned = self.cached_in_range(offset, end);
        pinned.sort_unstable_by_key(|f| f.index);
        let find = |index: u64| {
            pinned
                .binary_search_by_key(&index, |f| f.index)
                .ok()
                .and_then(|i| pinned.get(i))
        };
        // Stretches (buffer ranges) that must come from the lower layer.
        let mut lower_runs: Vec<(usize, usize)> = Vec::new();
        // Uptodate bytes of partly uptodate folios, taken before the lower read: (buffer
        // position, length) and their bytes, concatenated.
        let mut overlay: Vec<(usize, usize)> = Vec::new();
        let mut overlay_bytes: Vec<u8> = Vec::new();
        let mut done = 0;
        for (index, a, n) in self.segments(offset, buf.len()) {
            let copied = find(index).is_some_and(|f| {
                let st = f.lock();
                let (sa, sb) = f.sector_span(a, a + n);
                let full = st.uptodate.all(sa, sb);
                if full {
                    buf[done..done + n].copy_from_slice(&st.data[a..a + n]);
                } else {
                    let mut s = sa;
                    while let Some(up) = st.uptodate.find(s, sb, true) {
                        let stop = st.uptodate.find(up, sb, false).unwrap_or(sb);
                        let u = f.sector_bytes(up).0.max(a);
                        let v = f.sector_bytes(stop - 1).1.min(a + n);
                        overlay.push((done + (u - a), v - u));
                        overlay_bytes.extend_from_slice(&st.data[u..v]);
                        s = stop;
                    }
                }
                full
            });
            if !copied {
                match lower_runs.last_mut() {
                    Some((_, e)) if *e == done => *e = done + n,
                    _ => lower_runs.push((done, done + n)),
                }
            }
            done += n;
        }
        for &(x, y) in &lower_runs {
            self.lower.read_at(&mut buf[x..y], offset + x as u64)?;
        }
        // Every overlay lies in a segment that was not copied, i.e. inside a lower run.
        let mut src = 0;
        for &(dst, len) in &overlay {
            buf[dst..dst + len].copy_from_slice(&overlay_bytes[src..src + len]);
            src += len;
        }
        self.counters.bypassed.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Reads `out` from folio `index` at folio offset `a`.
    ///
    /// Read invariant: every sector of `out` gets a value the sector had at some instant while
    /// this read ran. Sectors uptodate when the folio is first locked are copied right then;
    /// only the sectors missing at that instant may come from the fill, whose lower read also
    /// covers the uptodate sectors between them (one request) - those bytes are never used,
    /// because a zap may have cleared such a sector meanwhile and the lower layer's bytes are
    /// then older than the write the cache held.
    pub(super) fn read_segment(&self, index: u64, a: usize, out: &mut [u8]) -> Result<()> {
        let b = a + out.len();
        loop {
            let f = self.get_folio(index)?;
            let (sa, sb) = f.sector_span(a, b);
            let (lo, hi, was_uptodate) = {
                let st = f.lock();
                if st.evicted {
                    continue;
                }
                if st.uptodate.all(sa, sb) {
                    out.copy_from_slice(&st.data[a..b]);
                    self.counters.read_hits.fetch_add(1, Ordering::Relaxed);
                    return Ok(());
                }
                copy_uptodate(&f, &st, sa, sb, a, out);
                let lo = st.uptodate.find(sa, sb, false).unwrap_or(sa);
                let hi = st.uptodate.rfind(sa, sb, false).map_or(sb, |s| s + 1);
                (lo, hi, st.uptodate.clone())
            };
            self.counters.read_misses.fetch_add(1, Ordering::Relaxed);
            let ba = f.sector_bytes(lo).0;
            let bb = f.sector_bytes(hi - 1).1;
            let token = self.fill_token(f.start + ba as u64, f.start + bb as u64);
            let mut scratch = take_buf(&FILL_BUF, bb - ba);
            if let Err(e) = self
                .lower
                .read_at(&mut scratch[..bb - ba], f.start + ba as u64)
            {
                FILL_BUF.with(|c| c.set(scratch));
                return Err(e);
            }
            self.hook(HookPoint::AfterFillRead, index);
            {
                let mut st = f.lock();
                let valid = !st.evicted && self.fill_valid(&token);
                if valid {
                    install(&f, &mut st, lo, hi, ba, &scratch, &self.counters.cow_copies);
                } else {
                    self.counters.fills_dropped.fetch_add(1, Ordering::Relaxed);
                }
                // The sectors missing at the start (all inside `lo..hi`): the cache's bytes if
                // they are uptodate now, else this read's fill (read from below while they
                // were missing, so the lower layer held their newest value).
                let mut s = sa;
                while let Some(first) = was_uptodate.find(s, sb, false) {
                    let end = was_uptodate.find(first, sb, true).unwrap_or(sb);
                    for t in first..end {
                        let (x, y) = f.sector_bytes(t);
                        let (x, y) = (x.max(a), y.min(b));
                        let dst = &mut out[x - a..y - a];
                        if st.uptodate.get(t) {
                            dst.copy_from_slice(&st.data[x..y]);
                        } else {
                            dst.copy_from_slice(&scratch[x - ba..y - ba]);
                        }
                    }
                    s = end;
                }
            }
            FILL_BUF.with(|c| c.set(scratch));
            return Ok(());
        }
    }

    /// Fills sectors `lo..hi` of `f` from the lower layer (only those still missing).
    pub(super) fn fill_sectors(&self, f: &Folio, lo: usize, hi: usize) -> Result<()> {
        let ba = f.sector_bytes(lo).0;
        let bb = f.sector_bytes(hi - 1).1;
        let token = self.fill_token(f.start + ba as u64, f.start + bb as u64);
        if !token.clean {
            // The range is being changed below: a fill now could not be installed; the caller
            // retries once the zap is over.
            self.wait_zaps_clear(f.start + ba as u64, f.start + bb as u64);
            return Ok(());
        }
        let mut scratch = take_buf(&FILL_BUF, bb - ba);
        let result = self
            .lower
            .read_at(&mut scratch[..bb - ba], f.start + ba as u64);
        if result.is_ok() {
            self.hook(HookPoint::AfterFillRead, f.index);
            let mut st = f.lock();
            if !st.evicted && self.fill_valid(&token) {
                install(f, &mut st, lo, hi, ba, &scratch, &self.counters.cow_copies);
            } else {
                self.counters.fills_dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
        FILL_BUF.with(|c| c.set(scratch));
        result
    }
}

/// Copies the uptodate sectors among `sa..sb` of `f` into `out`, which holds the folio's bytes
/// `[a, a + out.len())`.
pub(super) fn copy_uptodate(
    f: &Folio,
    st: &FolioState,
    sa: usize,
    sb: usize,
    a: usize,
    out: &mut [u8],
) {
    let b = a + out.len();
    let mut s = sa;
    while let Some(first) = st.uptodate.find(s, sb, true) {
        let end = st.uptodate.find(first, sb, false).unwrap_or(sb);
        let x = f.sector_bytes(first).0.max(a);
        let y = f.sector_bytes(end - 1).1.min(b);
        out[x - a..y - a].copy_from_slice(&st.data[x..y]);
        s = end;
    }
}

/// Copies the fill data for sectors `lo..hi` (buffer starting at folio byte `ba`) into the
/// sectors that are still not uptodate, and marks them uptodate (`copies`: see
/// [`FolioState::data_mut`]).
pub(super) fn install(
    f: &Folio,
    st: &mut FolioState,
    lo: usize,
    hi: usize,
    ba: usize,
    fill: &[u8],
    copies: &AtomicU64,
) {
    let mut s = lo;
    while let Some(start) = st.uptodate.find(s, hi, false) {
        let end = st.uptodate.find(start, hi, true).unwrap_or(hi);
        let (x, y) = (f.sector_bytes(start).0, f.sector_bytes(end - 1).1);
        st.data_mut(copies)[x..y].copy_from_slice(&fill[x - ba..y - ba]);
        st.uptodate.set(start, end);
        s = end;
    }
}
