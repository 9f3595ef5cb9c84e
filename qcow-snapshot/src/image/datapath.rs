//! The data path of [`QcowImage`]: reads (backing, compressed, subcluster), allocating writes
//! with copy-on-write, write-zeroes/discard and close (the flush is in `flush.rs`).
//!
//! Locking: each request holds `gate` shared from its mapping lookup until its data I/O is done,
//! takes `meta` only for lookups and metadata updates and drops it for data I/O; requests that
//! allocate the same guest cluster serialize on `inflight` and `alloc_done`. Flushes reuse freed
//! clusters only under `gate` held exclusively. Full model in the parent module.

use std::cell::Cell;

use blockdev::AlignedBuf;

use super::batch::{Deferred, Src};
use super::*;

thread_local! {
    /// The thread's buffer for the cluster (or subclusters) a copy-on-write assembles, reused
    /// across writes: a fresh 64 KiB `calloc` per write cost zeroing, page faults and TLB
    /// shootdowns between the writing threads (about 2% of the samples of a copy-on-write
    /// run).
    static COW_BUF: Cell<AlignedBuf> = const { Cell::new(AlignedBuf::new()) };
}

/// Runs `f` on the thread's copy-on-write buffer of `len` bytes (old contents: the caller
/// overwrites all of it). A nested call gets a buffer of its own.
fn with_cow_buf<T>(len: usize, f: impl FnOnce(&mut [u8]) -> T) -> T {
    let mut b = COW_BUF.with(Cell::take).at_least(len);
    let out = f(&mut b[..len]);
    COW_BUF.with(|c| c.set(b));
    out
}

/// Where a write's rewrites of clusters the image already has go, on a file whose large
/// writes go with O_DIRECT and the rest through the host page cache (`--direct large`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Rewrite {
    /// Through the host page cache whatever their size ([`HostFile::write_cached_at`]), as a
    /// raw image's writes go: the folio cache's writebacks, which the host page cache absorbs
    /// when the same blocks are written back again soon.
    Cached,
    /// As the image's other writes go (large aligned ones direct): a guest write the folio
    /// cache let through ([`BlockDev::write_uncached_at`]). Sent through the host page cache,
    /// 1 MiB rewrites of a cold image went at a tenth of the device's rate here: every page
    /// of it newly allocated (on this VM a fault on the host too) and sixteen writers queued
    /// on the inode lock.
    Uncached,
}

/// Where the bytes of an allocating write's uncovered part come from.
#[derive(Debug, Clone, Copy)]
pub(super) enum Fill {
    Backing,
    Zero,
    Compressed(CompressedDescriptor),
    Host(u64),
    /// The cluster's guest-visible content as mapped now (subclusters of a shared cluster).
    Mapped,
}

/// A write into a cluster with an extended L2 entry that allocates only the subclusters it
/// touches: guest bytes `[start, end)` (the write widened to subcluster boundaries at ends that
/// are not allocated yet) go to the same offsets of the host cluster.
#[derive(Debug, Clone, Copy)]
pub(super) struct SubWrite {
    pub(super) start: u64,
    pub(super) end: u64,
    /// Allocation-half mask of the subclusters written.
    mask: u64,
    /// The entry's bitmap when the write was planned (stable: the cluster is in flight).
    bitmap: u64,
}

#[derive(Debug)]
pub(super) enum Step {
    /// Write in place at this host offset.
    Direct { host: u64, guest: u64, len: u64 },
    /// Allocate guest cluster `gc` at `target`, filling what the write does not cover (the
    /// whole cluster, or with `sub` only the subclusters the write touches).
    Alloc {
        gc: u64,
        target: u64,
        fresh: bool,
        fill: Fill,
        guest: u64,
        len: u64,
        sub: Option<SubWrite>,
    },
    /// Another request is allocating this cluster; retry after it finishes.
    Blocked { guest: u64, len: u64 },
}

impl QcowImage {
    /// Reads guest bytes `[off, off+buf.len())` of the backing device (zeros past its end).
    pub(super) fn read_backing(&self, buf: &mut [u8], off: u64) -> Result<()> {
        if !buf.is_empty() {
            // (Subcluster writes ask for empty head and tail fills: those read nothing.)
            self.early_wb.backing_read();
        }
        let Some(b) = &self.backing else {
            buf.fill(0);
            return Ok(());
        };
        let bsize = b.size();
        let avail = bsize.saturating_sub(off).min(buf.len() as u64) as usize;
        if avail > 0 {
            b.read_at(&mut buf[..avail], off).map_err(|e| match e {
                BlockError::Corrupt(m) => {
                    BlockError::Io(io::Error::other(format!("backing image corrupt: {m}")))
                }
                other => other,
            })?;
        }
        buf[avail..].fill(0);
        Ok(())
    }

    /// The plan of a read (`BlockDev::plan_read`), made while holding `gate` shared like a read:
    /// only when every extent reads as zeros, comes from the backing chain (which plans its own
    /// part; past its end the range reads as zeros) or from the image's own data clusters in a
    /// file that names a description for them ([`HostFile::plan_source`]). The read executes
    /// after `gate` is released, when a flush may have freed such a cluster: the plan holds a
    /// pin, and the cluster is not reused while it lives ([`super::pins`]). A replay after a
    /// failed sync writes each byte once, with its newest bytes (`ReplayHost`), so the plan
    /// sees no older write put back either. Compressed clusters are not planned.
    pub(super) fn plan_read_inner(&self, offset: u64, len: u64) -> Option<ReadPlan> {
        let extents = self.lock().map(&self.io, offset, len).ok()?;
        let mut plan = ReadPlan::default();
        // Host clusters the plan names (a read-only image frees nothing: none to pin).
        let mut own = Vec::new();
        let cs = self.geo.cluster_size();
        for e in extents {
            match e.mapping {
                Mapping::Zero => plan.append(ReadPlan::one(e.len, PlanSource::Zero)),
                Mapping::Unallocated => plan.append(self.plan_backing(e.offset, e.len)?),
                Mapping::Data(h) => {
                    plan.append(ReadPlan::one(e.len, self.io.plan_source(h, e.len)?));
                    if !self.read_only {
                        own.extend((h & !(cs - 1)..h + e.len).step_by(cs as usize));
                    }
                }
                Mapping::Compressed(_) => return None,
            }
        }
        if !own.is_empty() {
            // Taken under `gate`, like the mapping (see `pins`).
            plan.holds.push(Arc::new(self.pins.pin(own)));
        }
        Some(plan)
    }

    /// [`Self::plan_read_inner`] of guest bytes `[off, off + len)` of the backing device.
    fn plan_backing(&self, off: u64, len: u64) -> Option<ReadPlan> {
        self.early_wb.backing_read();
        let Some(b) = &self.backing else {
            return Some(ReadPlan::one(len, PlanSource::Zero));
        };
        let avail = b.size().saturating_sub(off).min(len);
        let mut plan = if avail > 0 {
            b.plan_read(off, avail)?
        } else {
            ReadPlan::default()
        };
        if avail < len {
            plan.append(ReadPlan::one(len - avail, PlanSource::Zero));
        }
        Some(plan)
    }

    pub(super) fn decompressed(&self, d: CompressedDescriptor) -> Result<Arc<Vec<u8>>> {
        let key = d.host_offset;
        if let Some((k, data)) = &*self.zcache.lock().unwrap_or_else(|e| e.into_inner()) {
            if *k == key {
                return Ok(data.clone());
            }
        }
        let mut input = vec![0u8; d.byte_len() as usize];
        self.io.read_at(&mut input, d.host_offset)?;
        let mut out = vec![0u8; self.geo.cluster_size() as usize];
        decompress(self.compression, &input, &mut out)
            .map_err(|e| corrupt(format!("compressed cluster at {:#x}: {e}", d.host_offset)))?;
        let out = Arc::new(out);
        *self.zcache.lock().unwrap_or_else(|e| e.into_inner()) = Some((key, out.clone()));
        Ok(out)
    }

    pub(super) fn read_inner(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let extents = self.lock().map(&self.io, offset, buf.len() as u64)?;
        for e in extents {
            let s = (e.offset - offset) as usize;
            let part = &mut buf[s..s + e.len as usize];
            match e.mapping {
                Mapping::Data(h) => self.io.read_at(part, h)?,
                Mapping::Zero => part.fill(0),
                Mapping::Unallocated => self.read_backing(part, e.offset)?,
                Mapping::Compressed(d) => {
                    let data = self.decompressed(d)?;
                    let in_off = self.geo.offset_in_cluster(e.offset) as usize;
                    part.copy_from_slice(&data[in_off..in_off + part.len()]);
                }
            }
        }
        Ok(())
    }

    /// The guest-visible content of cluster `gc` before this write (`out` is one cluster).
    pub(super) fn old_content(&self, gc: u64, fill: Fill, out: &mut [u8]) -> Result<()> {
        let start = gc << self.geo.cluster_bits;
        let visible = self.size.saturating_sub(start).min(out.len() as u64) as usize;
        out[visible..].fill(0);
        let vis = &mut out[..visible];
        match fill {
            Fill::Zero => vis.fill(0),
            Fill::Backing => self.read_backing(vis, start)?,
            Fill::Host(h) => self.io.read_at(vis, h)?,
            Fill::Compressed(d) => {
                let data = self.decompressed(d)?;
                vis.copy_from_slice(&data[..visible]);
            }
            Fill::Mapped => self.read_inner(vis, start)?,
        }
        Ok(())
    }

    /// Plans a write of `[pos, pos+n)` (inside guest cluster `gc`) into an image with extended
    /// L2 entries: in place when every touched subcluster is allocated, else an allocation of
    /// just the touched subclusters (in the cluster's own host cluster, or a new one), else (a
    /// compressed or shared cluster) a copy of the whole cluster.
    fn plan_subclusters(&self, m: &mut Meta, gc: u64, pos: u64, n: u64) -> Result<Step> {
        let (e, bitmap) = m.sub_entry(&self.io, gc)?;
        let g = self.geo;
        let ss = g.subcluster_size();
        let first = g.subcluster_index(pos);
        let last = g.subcluster_index(pos + n - 1);
        let mask = subcluster_mask(first, last);
        let allocated = |i: u32| subcluster_state(bitmap, i) == Subcluster::Data;
        let (target, fresh) = match e {
            L2Entry::Normal { host, copied: true } if bitmap & mask == mask => {
                return Ok(Step::Direct {
                    host: host + g.offset_in_cluster(pos),
                    guest: pos,
                    len: n,
                });
            }
            L2Entry::Normal { host, copied: true } => (host, false),
            L2Entry::Unallocated | L2Entry::Zero { host: None } => (0, true),
            other => {
                let fill = match other {
                    L2Entry::Compressed(d) => Fill::Compressed(d),
                    _ => Fill::Mapped,
                };
                return Ok(Step::Alloc {
                    gc,
                    target: 0,
                    fresh: true,
                    fill,
                    guest: pos,
                    len: n,
                    sub: None,
                });
            }
        };
        let start = if allocated(first) {
            pos
        } else {
            pos & !(ss - 1)
        };
        let end = if allocated(last) {
            pos + n
        } else {
            (pos + n).next_multiple_of(ss)
        };
        Ok(Step::Alloc {
            gc,
            target,
            fresh,
            fill: Fill::Zero,
            guest: pos,
            len: n,
            sub: Some(SubWrite {
                start,
                end,
                mask,
                bitmap,
            }),
        })
    }

    /// Fills `buf` (inside one unallocated or zero subcluster, at guest `off`) with that
    /// subcluster's guest-visible content.
    pub(super) fn subcluster_fill(&self, bitmap: u64, off: u64, buf: &mut [u8]) -> Result<()> {
        match subcluster_state(bitmap, self.geo.subcluster_index(off)) {
            Subcluster::Zero => {
                buf.fill(0);
                Ok(())
            }
            _ => self.read_backing(buf, off),
        }
    }

    /// One pass of a write: plan under the lock, write data unlocked, publish under the lock.
    /// Returns the ranges that another request was allocating.
    pub(super) fn write_pass(
        &self,
        buf: &[u8],
        offset: u64,
        rewrite: Rewrite,
    ) -> Result<Vec<(u64, u64)>> {
        let steps = {
            let mut m = self.lock();
            let planned = self.plan_pass(&mut m, buf.len() as u64, offset);
            if planned.is_err() {
                drop(m);
                self.alloc_done.notify_all();
            }
            planned?
        };
        let data = self.write_data(buf, offset, &steps, None, rewrite);
        self.wrote_data();
        let mut m = self.lock();
        let r = self
            .publish_pass(&mut m, &steps, data)
            .and_then(|blocked| m.maybe_flush(&self.io).map(|()| blocked));
        drop(m);
        self.alloc_done.notify_all();
        r
    }

    /// Notes that data writes returned.
    pub(super) fn wrote_data(&self) {
        // Set only after the data writes returned: a flush that clears the flag earlier must
        // not cause a later flush to skip syncing them.
        self.data_written.store(true, Ordering::Release);
    }

    /// Writes guest data (or an assembled cluster) `b` at host offset `at`, counting it toward
    /// early writeback when it lands in the host page cache and is not `in_place` (see
    /// [`QcowImage::wrote_host`]).
    ///
    /// A write `in_place` goes where `rewrite` says (see [`Rewrite`]); writes that allocate
    /// (an installer filling a fresh overlay) take the large-write route to the device.
    pub(super) fn write_host(
        &self,
        b: &[u8],
        at: u64,
        in_place: bool,
        rewrite: Rewrite,
    ) -> Result<()> {
        if in_place && rewrite == Rewrite::Cached {
            self.io.write_cached_at(b, at)?;
            return Ok(());
        }
        let buffered = !self.io.writes_directly(b, at);
        self.io.write_at(b, at)?;
        self.wrote_host(b.len(), buffered && !in_place);
        Ok(())
    }

    /// The host writes of a batch, as [`HostFile::write_batch`] puts them in flight, except
    /// that the ones `in_place` that the file would route around its page cache go through
    /// it, one at a time (see [`QcowImage::write_host`]). With `to_sync` (a batch the caller
    /// flushes right after) all of them go with [`HostFile::write_batch_to_sync`]: past the
    /// page cache wherever the file can, in place or not, since the flush's `fdatasync` would
    /// write them out of it at once (and on a large page-cache folio a 4 KiB buffered write
    /// and its writeback each walk every block of the folio).
    pub(super) fn write_host_batch(
        &self,
        host: &[(&[u8], u64)],
        in_place: &[bool],
        to_sync: bool,
    ) -> Vec<io::Result<()>> {
        if to_sync {
            return self.io.write_batch_to_sync(host);
        }
        let cached: Vec<bool> = host
            .iter()
            .zip(in_place)
            .map(|(&(b, at), &p)| p && self.io.writes_directly(b, at))
            .collect();
        if !cached.iter().any(|&c| c) {
            return self.io.write_batch(host);
        }
        let rest: Vec<(&[u8], u64)> = host
            .iter()
            .zip(&cached)
            .filter(|(_, &c)| !c)
            .map(|(&w, _)| w)
            .collect();
        let mut rest_results = self.io.write_batch(&rest).into_iter();
        host.iter()
            .zip(&cached)
            .map(|(&(b, at), &c)| {
                if c {
                    self.io.write_cached_at(b, at)
                } else {
                    rest_results
                        .next()
                        .unwrap_or_else(|| Err(io::Error::other("missing result")))
                }
            })
            .collect()
    }

    /// Counts a successful data write of `len` bytes toward early writeback if `counted`: it
    /// was buffered (a write that went to the device with O_DIRECT left nothing in the host
    /// page cache to push out, and a background sync for it would only flush the device's
    /// cache and hold ext4's journal while the writers grow the file) and it allocated (a
    /// rewrite of allocated clusters is what the page cache absorbs, as for a raw image; see
    /// `early_writeback.rs`).
    pub(super) fn wrote_host(&self, len: usize, counted: bool) {
        if counted {
            self.early_wb.wrote(len as u64);
        }
    }

    /// How a write of `[pos, pos + n)` (inside guest cluster `gc`, which no write is
    /// allocating) would go, as the cluster is mapped now: [`Step::Direct`] in place, else the
    /// allocation it needs (no host cluster chosen yet: `target` 0 where `fresh`). Changes
    /// nothing but the L2 table cache.
    fn step_for(&self, m: &mut Meta, gc: u64, pos: u64, n: u64) -> Result<Step> {
        let in_off = pos & (self.geo.cluster_size() - 1);
        let e = m.entry(&self.io, gc)?;
        Ok(match e {
            _ if self.geo.extended_l2 => self.plan_subclusters(m, gc, pos, n)?,
            L2Entry::Normal { host, copied: true } => Step::Direct {
                host: host + in_off,
                guest: pos,
                len: n,
            },
            L2Entry::Zero { host: Some(h) } => Step::Alloc {
                gc,
                target: h,
                fresh: false,
                fill: Fill::Zero,
                guest: pos,
                len: n,
                sub: None,
            },
            L2Entry::Normal {
                host,
                copied: false,
            } => Step::Alloc {
                gc,
                target: 0,
                fresh: true,
                fill: Fill::Host(host),
                guest: pos,
                len: n,
                sub: None,
            },
            L2Entry::Zero { host: None } => Step::Alloc {
                gc,
                target: 0,
                fresh: true,
                fill: Fill::Zero,
                guest: pos,
                len: n,
                sub: None,
            },
            L2Entry::Unallocated => Step::Alloc {
                gc,
                target: 0,
                fresh: true,
                fill: if self.backing.is_some() {
                    Fill::Backing
                } else {
                    Fill::Zero
                },
                guest: pos,
                len: n,
                sub: None,
            },
            L2Entry::Compressed(d) => Step::Alloc {
                gc,
                target: 0,
                fresh: true,
                fill: Fill::Compressed(d),
                guest: pos,
                len: n,
                sub: None,
            },
        })
    }

    /// Whether a write of `[offset, offset + len)` would go in place in every cluster it
    /// touches (for `BlockDev::rewrites_in_page_cache`): see [`QcowImage::in_place_steps`].
    /// Read under `gate` and the metadata lock like a write's plan, and stale as soon as they
    /// are released.
    pub(super) fn rewrites_in_place_inner(&self, offset: u64, len: u64) -> bool {
        let mut m = self.lock();
        self.in_place_steps(&mut m, offset, len).is_some()
    }

    /// The steps of a write of `[offset, offset + len)` if it goes in place in every cluster
    /// it touches: each one allocated, this image's own (not shared with a snapshot, not
    /// compressed; with extended L2 entries every touched subcluster allocated) and not being
    /// allocated by a write in flight. `None` otherwise. Changes nothing but the L2 table
    /// cache.
    pub(super) fn in_place_steps(&self, m: &mut Meta, offset: u64, len: u64) -> Option<Vec<Step>> {
        let cs = self.geo.cluster_size();
        let end = offset + len;
        let mut steps = Vec::new();
        let mut pos = offset;
        while pos < end {
            let gc = pos >> self.geo.cluster_bits;
            let n = (cs - (pos & (cs - 1))).min(end - pos);
            if m.inflight.contains(&gc) {
                return None;
            }
            match self.step_for(m, gc, pos, n) {
                Ok(s @ Step::Direct { .. }) => steps.push(s),
                _ => return None,
            }
            pos += n;
        }
        Some(steps)
    }

    /// The steps of a write of `[offset, offset + len)` that persists in place
    /// (`BlockDev::write_in_place_persisted`): in place as [`QcowImage::in_place_steps`] says,
    /// and with the L2 entry of every cluster it touches in the file ([`Meta::entry_in_file`]),
    /// so a restarted daemon finds those clusters where this write puts its bytes. A request
    /// in flight elsewhere may dirty the same L2 table after the answer: it changes no entry of
    /// these clusters (a change to them overlaps this write, which the layers above keep
    /// apart), so the file's copy of the table still names them. An empty range has nothing
    /// to persist. Under `gate` and the metadata lock.
    pub(super) fn persisted_steps(&self, m: &mut Meta, offset: u64, len: u64) -> Option<Vec<Step>> {
        if len == 0 {
            return None;
        }
        let steps = self.in_place_steps(m, offset, len)?;
        let first = offset >> self.geo.cluster_bits;
        let last = (offset + len - 1) >> self.geo.cluster_bits;
        (first..=last)
            .all(|gc| m.entry_in_file(gc))
            .then_some(steps)
    }

    /// The plan of a write of `len` bytes at `offset` (under the metadata lock): the clusters
    /// it allocates are marked in flight and get their host clusters. On an error nothing stays
    /// marked (the caller wakes the waiters).
    pub(super) fn plan_pass(&self, m: &mut Meta, len: u64, offset: u64) -> Result<Vec<Step>> {
        let cs = self.geo.cluster_size();
        let end = offset + len;
        let mut steps: Vec<Step> = Vec::new();
        {
            let mut pos = offset;
            let mut fresh = 0u64;
            let plan = (|| -> Result<()> {
                while pos < end {
                    let gc = pos >> self.geo.cluster_bits;
                    let in_off = pos & (cs - 1);
                    let n = (cs - in_off).min(end - pos);
                    if m.inflight.contains(&gc) {
                        steps.push(Step::Blocked { guest: pos, len: n });
                    } else {
                        let step = self.step_for(m, gc, pos, n)?;
                        if let Step::Alloc { fresh: f, .. } = step {
                            m.inflight.insert(gc);
                            if f {
                                fresh += 1;
                            }
                        }
                        steps.push(step);
                    }
                    pos += n;
                }
                if fresh > 0 {
                    let base = m.alloc(&self.io, fresh)?;
                    self.clusters_allocated.fetch_add(fresh, Ordering::Relaxed);
                    let mut k = 0;
                    for s in steps.iter_mut() {
                        if let Step::Alloc {
                            target,
                            fresh: true,
                            ..
                        } = s
                        {
                            *target = base + k * cs;
                            k += 1;
                        }
                    }
                }
                Ok(())
            })();
            if let Err(e) = plan {
                for s in &steps {
                    if let Step::Alloc { gc, .. } = s {
                        m.inflight.remove(gc);
                    }
                }
                return Err(e);
            }
        }
        Ok(steps)
    }

    /// Publishes a planned write whose data writes ended with `data` (under the metadata lock):
    /// the L2 entries of its allocations, or, on an error, the release of clusters nothing
    /// references. Clears its in-flight marks (the caller wakes the waiters) and returns the
    /// ranges another request was allocating.
    pub(super) fn publish_pass(
        &self,
        m: &mut Meta,
        steps: &[Step],
        data: Result<()>,
    ) -> Result<Vec<(u64, u64)>> {
        let mut blocked = Vec::new();
        // How many allocations got their L2 entry: those clusters are referenced now and must
        // never be freed by the undo below, even if a later entry of the same write fails.
        let mut published = 0usize;
        let publish = (|| -> Result<()> {
            data?;
            for s in steps {
                if let Step::Alloc {
                    gc, target, sub, ..
                } = *s
                {
                    let (old, old_bitmap) = m.sub_entry(&self.io, gc)?;
                    // Subcluster writes allocate what they wrote; other allocations wrote the
                    // whole cluster.
                    let bitmap = match sub {
                        Some(w) => (old_bitmap | w.mask) & !(w.mask << 32),
                        None => L2_BITMAP_ALL_ALLOC,
                    };
                    m.set_entry(&self.io, gc, target | OFLAG_COPIED, bitmap)?;
                    m.release(old, Some(target));
                    published += 1;
                }
            }
            Ok(())
        })();
        let mut undo = Vec::new();
        let mut alloc_no = 0usize;
        for s in steps {
            match *s {
                Step::Alloc {
                    gc, target, fresh, ..
                } => {
                    m.inflight.remove(&gc);
                    if publish.is_err() && fresh && alloc_no >= published {
                        undo.push(target);
                    }
                    alloc_no += 1;
                }
                Step::Blocked { guest, len } => blocked.push((guest, len)),
                Step::Direct { .. } => {}
            }
        }
        // Clusters never referenced can be released at once (best effort on the error path).
        if !undo.is_empty() {
            let _ = m.apply_frees(&self.io, undo);
        }
        publish.map(|()| blocked)
    }

    /// Writes the data of a planned write. With `defer`, the writes that come straight from
    /// `buf` are not issued but added to it (the caller writes them, all of a batch at once);
    /// the ones that assemble a copy-on-write buffer go to its arena while it has room, and
    /// are written here when it has none.
    pub(super) fn write_data<'a>(
        &self,
        buf: &'a [u8],
        offset: u64,
        steps: &[Step],
        mut defer: Option<&mut Deferred<'a>>,
        rewrite: Rewrite,
    ) -> Result<()> {
        let cs = self.geo.cluster_size();
        let slice = |guest: u64, len: u64| {
            let s = (guest - offset) as usize;
            &buf[s..s + len as usize]
        };
        let mut i = 0;
        while i < steps.len() {
            match steps[i] {
                Step::Direct { host, guest, len } => {
                    // Coalesce host- and guest-contiguous in-place writes.
                    let (mut tot, mut j) = (len, i + 1);
                    while let Some(Step::Direct {
                        host: h2,
                        guest: g2,
                        len: l2,
                    }) = steps.get(j)
                    {
                        if *h2 != host + tot || *g2 != guest + tot {
                            break;
                        }
                        tot += l2;
                        j += 1;
                    }
                    self.write_or_defer(&mut defer, slice(guest, tot), host, true, rewrite)?;
                    i = j;
                }
                Step::Alloc {
                    gc,
                    target,
                    fill,
                    guest,
                    len,
                    sub,
                    ..
                } => {
                    if len == cs {
                        let (mut tot, mut j) = (len, i + 1);
                        while let Some(Step::Alloc {
                            target: t2,
                            guest: g2,
                            len: l2,
                            ..
                        }) = steps.get(j)
                        {
                            if *l2 != cs || *t2 != target + tot || *g2 != guest + tot {
                                break;
                            }
                            tot += l2;
                            j += 1;
                        }
                        self.write_or_defer(&mut defer, slice(guest, tot), target, false, rewrite)?;
                        i = j;
                    } else if let Some(w) = sub {
                        let at = target + self.geo.offset_in_cluster(w.start);
                        if w.start == guest && w.end == guest + len {
                            // Whole subclusters: written from the caller's buffer (aligned
                            // memory stays aligned for an O_DIRECT file), nothing to fill.
                            self.write_or_defer(&mut defer, slice(guest, len), at, false, rewrite)?;
                        } else {
                            self.assemble((w.end - w.start) as usize, at, &mut defer, |b| {
                                let head = (guest - w.start) as usize;
                                self.subcluster_fill(w.bitmap, w.start, &mut b[..head])?;
                                b[head..head + len as usize].copy_from_slice(slice(guest, len));
                                let tail = guest + len;
                                self.subcluster_fill(w.bitmap, tail, &mut b[head + len as usize..])
                            })?;
                        }
                        i += 1;
                    } else if self.defer_fill(
                        &mut defer,
                        gc,
                        fill,
                        target,
                        slice(guest, len),
                        guest,
                    ) {
                        i += 1;
                    } else {
                        // Aligned: an O_DIRECT file takes it as it is.
                        self.assemble(cs as usize, target, &mut defer, |cbuf| {
                            self.old_content(gc, fill, cbuf)?;
                            let in_off = self.geo.offset_in_cluster(guest) as usize;
                            cbuf[in_off..in_off + len as usize].copy_from_slice(slice(guest, len));
                            Ok(())
                        })?;
                        i += 1;
                    }
                }
                Step::Blocked { .. } => i += 1,
            }
        }
        Ok(())
    }

    /// Writes `b` at `at` now (an `in_place` one where `rewrite` says), or adds it to the
    /// batch's writes; `in_place` for a write over clusters (or subclusters) the image already
    /// has.
    pub(super) fn write_or_defer<'a>(
        &self,
        defer: &mut Option<&mut Deferred<'a>>,
        b: &'a [u8],
        at: u64,
        in_place: bool,
        rewrite: Rewrite,
    ) -> Result<()> {
        match defer {
            Some(d) => {
                let src = if in_place {
                    Src::InPlace(b)
                } else {
                    Src::Caller(b)
                };
                d.writes.push((src, at));
                Ok(())
            }
            None => self.write_host(b, at, in_place, rewrite),
        }
    }

    /// Assembles `len` bytes of copy-on-write with `make` and writes them at `at`: in the
    /// batch's arena, written with the batch, while it has room; else in the thread's buffer,
    /// written now.
    pub(super) fn assemble(
        &self,
        len: usize,
        at: u64,
        defer: &mut Option<&mut Deferred<'_>>,
        make: impl FnOnce(&mut [u8]) -> Result<()>,
    ) -> Result<()> {
        if let Some(d) = defer.as_deref_mut() {
            if let Some(a) = d.arena.as_mut() {
                if let Some(r) = a.claim(len) {
                    make(&mut a.buf[r.clone()])?;
                    d.writes.push((Src::Arena(r), at));
                    return Ok(());
                }
            }
            self.cow_alone.fetch_add(1, Ordering::Relaxed);
        }
        with_cow_buf(len, |b| -> Result<()> {
            make(b)?;
            self.write_host(b, at, false, Rewrite::Cached)
        })
    }

    /// Waits until no cluster of `[off, off+len)` has an allocation in flight.
    pub(super) fn wait_inflight<'a>(
        &'a self,
        mut m: MutexGuard<'a, Meta>,
        off: u64,
        len: u64,
    ) -> MutexGuard<'a, Meta> {
        if len == 0 {
            return m;
        }
        let first = off >> self.geo.cluster_bits;
        let last = (off + len - 1) >> self.geo.cluster_bits;
        while (first..=last).any(|gc| m.inflight.contains(&gc)) {
            m = self.alloc_done.wait(m).unwrap_or_else(|e| e.into_inner());
        }
        m
    }

    pub(super) fn write_inner(&self, buf: &[u8], offset: u64, rewrite: Rewrite) -> Result<()> {
        let mut todo = vec![(offset, buf.len() as u64)];
        while let Some((off, len)) = todo.pop() {
            let s = (off - offset) as usize;
            let blocked = self.write_pass(&buf[s..s + len as usize], off, rewrite)?;
            for (boff, blen) in blocked {
                drop(self.wait_inflight(self.lock(), boff, blen));
                todo.push((boff, blen));
            }
        }
        Ok(())
    }

    /// Whether guest cluster `gc` currently reads as all zeros without I/O.
    pub(super) fn reads_zero(&self, m: &mut Meta, gc: u64) -> Result<bool> {
        Ok(match m.entry(&self.io, gc)? {
            L2Entry::Zero { .. } => true,
            L2Entry::Unallocated => match &self.backing {
                None => true,
                Some(b) => (gc << self.geo.cluster_bits) >= b.size(),
            },
            _ => false,
        })
    }

    /// Writes zeros over each range (each at most one cluster), with the usual COW.
    pub(super) fn write_zero_ranges(&self, ranges: Vec<(u64, u64)>) -> Result<()> {
        if !ranges.is_empty() {
            let zeros = vec![0u8; self.geo.cluster_size() as usize];
            for (off, n) in ranges {
                self.write_inner(&zeros[..n as usize], off, Rewrite::Cached)?;
            }
        }
        Ok(())
    }

    /// Whether guest range `[off, off+len)` reads as zeros without data I/O.
    pub(super) fn range_reads_zero(&self, m: &mut Meta, off: u64, len: u64) -> Result<bool> {
        let bsize = self.backing.as_ref().map_or(0, |b| b.size());
        Ok(m.map(&self.io, off, len)?.iter().all(|e| match e.mapping {
            Mapping::Zero => true,
            Mapping::Unallocated => e.offset >= bsize,
            _ => false,
        }))
    }

    /// Write-zeroes and discard with extended L2 entries: whole clusters become zero (keeping
    /// their host cluster when `!unmap` and it is writable in place), whole subclusters get
    /// their zero bit, and only the partly covered subclusters at the ends are written with
    /// zeros (unless they read as zeros already). A compressed or shared cluster is written
    /// with zeros instead.
    pub(super) fn zero_subclusters(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        let g = self.geo;
        let cs = g.cluster_size();
        let ss = g.subcluster_size();
        let end = offset + len;
        let mut partial: Vec<(u64, u64)> = Vec::new();
        let mut pos = offset;
        while pos < end {
            let gc = pos >> g.cluster_bits;
            let cstart = gc << g.cluster_bits;
            let vis_end = (cstart + cs).min(self.size);
            let n = (cstart + cs).min(end) - pos;
            let mut m = self.wait_inflight(self.lock(), pos, n);
            let l1i = (gc / g.l2_entries()) as usize;
            if self.backing.is_none() && m.l1.get(l1i).is_none_or(|&e| l1_entry_offset(e) == 0) {
                // Nothing mapped by this L2 table: it all reads as zeros already.
                pos = ((l1i as u64 + 1) * g.l2_coverage()).min(end);
                continue;
            }
            let (old, bitmap) = m.sub_entry(&self.io, gc)?;
            let raw_old = old.encode(&g);
            if pos == cstart && end >= vis_end {
                let new = match old {
                    L2Entry::Normal { host, copied: true } if !unmap => host | OFLAG_COPIED,
                    _ => 0,
                };
                if (new, L2_BITMAP_ALL_ZERO) != (raw_old, bitmap) {
                    m.set_entry(&self.io, gc, new, L2_BITMAP_ALL_ZERO)?;
                    m.release(old, Some(new & format::L2E_OFFSET_MASK).filter(|&h| h != 0));
                }
            } else {
                let a = pos.next_multiple_of(ss);
                let b = (pos + n) & !(ss - 1);
                let in_place = matches!(
                    old,
                    L2Entry::Normal { copied: true, .. } | L2Entry::Unallocated
                );
                let mut edges = vec![];
                if a < b && in_place {
                    let mask = subcluster_mask(g.subcluster_index(a), g.subcluster_index(b - 1));
                    let new = (bitmap & !mask) | (mask << 32);
                    if new != bitmap {
                        m.set_entry(&self.io, gc, raw_old, new)?;
                    }
                    edges.push((pos, a - pos));
                    edges.push((b, pos + n - b));
                } else {
                    edges.push((pos, n));
                }
                for (o, l) in edges {
                    if l > 0 && !self.range_reads_zero(&mut m, o, l)? {
                        partial.push((o, l));
                    }
                }
            }
            m.maybe_flush(&self.io)?;
            pos += n;
        }
        self.write_zero_ranges(partial)
    }

    pub(super) fn zero_inner(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        if self.geo.extended_l2 {
            return self.zero_subclusters(offset, len, unmap);
        }
        let cs = self.geo.cluster_size();
        let end = offset + len;
        let mut partial: Vec<(u64, u64)> = Vec::new();
        let mut pos = offset;
        while pos < end {
            let gc = pos >> self.geo.cluster_bits;
            let cstart = gc << self.geo.cluster_bits;
            let vis_end = (cstart + cs).min(self.size);
            let n = (cstart + cs).min(end) - pos;
            let whole = pos == cstart && end >= vis_end;
            let mut m = self.wait_inflight(self.lock(), pos, n);
            if !whole {
                if !self.reads_zero(&mut m, gc)? {
                    partial.push((pos, n));
                }
                pos += n;
                continue;
            }
            // Skip an entire unmapped L2 range at once when it already reads as zeros.
            let l1i = (gc / self.geo.l2_entries()) as usize;
            if self.backing.is_none() && m.l1.get(l1i).is_none_or(|&e| l1_entry_offset(e) == 0) {
                let next = ((l1i as u64 + 1) * self.geo.l2_coverage()).min(end);
                // Only whole clusters are skipped; a trailing partial one is handled next round.
                pos = next;
                continue;
            }
            let old = m.entry(&self.io, gc)?;
            if self.version >= 3 {
                let new = match old {
                    L2Entry::Unallocated if self.backing.is_none() => None,
                    L2Entry::Zero { host: Some(_) } if !unmap => None,
                    L2Entry::Zero { host: None } => None,
                    L2Entry::Normal { host, copied: true } if !unmap => {
                        Some(L2Entry::Zero { host: Some(host) })
                    }
                    _ => Some(L2Entry::Zero { host: None }),
                };
                if let Some(new) = new {
                    let keep = match new {
                        L2Entry::Zero { host } => host,
                        _ => None,
                    };
                    m.set_entry(&self.io, gc, new.encode(&self.geo), 0)?;
                    m.release(old, keep);
                }
            } else if self.backing.is_some() {
                if !self.reads_zero(&mut m, gc)? {
                    partial.push((pos, n));
                }
            } else if old != L2Entry::Unallocated {
                m.set_entry(&self.io, gc, 0, 0)?;
                m.release(old, None);
            }
            m.maybe_flush(&self.io)?;
            pos += n;
        }
        self.write_zero_ranges(partial)
    }

    /// Flushes everything, clears the dirty bit and stops accepting writes. Called by `Drop`
    /// if not called explicitly.
    pub fn close(&self) -> Result<()> {
        if self.read_only || self.closed.load(Ordering::Acquire) || self.is_corrupt() {
            return Ok(());
        }
        self.check_durable()?;
        // The second flush makes the refcount decrements of the first one durable.
        let r = self.flush_inner().and_then(|()| self.flush_inner());
        let r = self.finish(r);
        r?;
        if self.pins.quarantined() {
            // A read still in flight names a cluster the guest freed meanwhile (a live
            // snapshot freezes the image under it): the cluster stays allocated, a leak.
            log::warn!("closing with freed clusters a planned read still pins: they leak");
        }
        self.closed.store(true, Ordering::Release);
        if self.version >= 3 {
            let mut m = self.lock();
            m.header.incompatible_features &= !incompat::DIRTY;
            let v = m.header.incompatible_features;
            self.io
                .write_at(&v.to_be_bytes(), INCOMPATIBLE_FEATURES_OFFSET as u64)?;
            self.io.sync_data()?;
        }
        // A file grown ahead of its writes goes back to what they wrote (nothing
        // points past it; a failure only leaves zeros at the end).
        if let Err(e) = self.io.release_growth() {
            log::warn!("cannot give back the space the image grew ahead of its writes: {e}");
        }
        Ok(())
    }

    /// Makes every guest cluster unallocated again (reads fall through to the backing file),
    /// freeing the data clusters, and flushes. Used after committing into the backing file.
    pub fn make_empty(&self, progress: &mut dyn FnMut(u64, u64)) -> Result<()> {
        self.check_writable()?;
        let _g = self.gate.read().unwrap_or_else(|e| e.into_inner());
        let r = (|| -> Result<()> {
            let total = self.geo.l1_entries_for(self.size).unwrap_or(0);
            let l2e = self.geo.l2_entries();
            for l1i in 0..total {
                let base = l1i * self.geo.l2_coverage();
                let span = self.geo.l2_coverage().min(self.size.saturating_sub(base));
                let mut m = self.wait_inflight(self.lock(), base, span);
                if m.l1
                    .get(l1i as usize)
                    .is_none_or(|&e| l1_entry_offset(e) == 0)
                {
                    continue;
                }
                for k in 0..l2e {
                    let gc = l1i * l2e + k;
                    if gc << self.geo.cluster_bits >= self.size {
                        break;
                    }
                    let old = m.entry(&self.io, gc)?;
                    if m.raw_entry(&self.io, gc)? != (0, 0) {
                        m.set_entry(&self.io, gc, 0, 0)?;
                        m.release(old, None);
                    }
                }
                m.maybe_flush(&self.io)?;
                drop(m);
                progress(l1i + 1, total);
            }
            Ok(())
        })();
        drop(_g);
        let r = r
            .and_then(|()| self.flush_inner())
            .and_then(|()| self.flush_inner());
        self.finish(r)
    }
}

/// A copy of `e` (the same errno, kind or message) for a second write that reports it.
pub(super) fn same_error(e: &BlockError) -> BlockError {
    match e {
        BlockError::Io(io) => BlockError::Io(match io.raw_os_error() {
            Some(n) => std::io::Error::from_raw_os_error(n),
            None => std::io::Error::new(io.kind(), io.to_string()),
        }),
        BlockError::OutOfRange { offset, len, size } => BlockError::OutOfRange {
            offset: *offset,
            len: *len,
            size: *size,
        },
        BlockError::ReadOnly => BlockError::ReadOnly,
        BlockError::Corrupt(m) => BlockError::Corrupt(m.clone()),
        BlockError::Unsupported(w) => BlockError::Unsupported(w),
    }
}
