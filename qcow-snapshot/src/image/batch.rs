//! Batches of writes into a [`QcowImage`] (`BlockDev::write_batch`, what the cache's batched
//! writebacks hand down): planned under one hold of the metadata lock, their data written
//! together, published under one more hold. Copy-on-write clusters of a batch are assembled in
//! one arena ([`CowArena`]) and go down with the batch, those next to each other in the file
//! as one write; with a raw backing file read with O_DIRECT ([`DirectBacking`]) their old
//! content is read for the whole batch at once, all reads in flight on an io_uring, straight
//! into the arena.
//!
//! Locking: as every write (see the parent module): `meta` only to plan and to publish, no
//! lock of the image across the data I/O; the arena pool's mutex is a leaf, held only to take
//! or give back an arena.

use std::sync::Arc;

use blockdev::AlignedBuf;

use super::datapath::{same_error, Fill, Rewrite, Step};
use super::*;

/// The most copy-on-write assembly one batch keeps for writing together (see [`CowArena`]);
/// what does not fit is written as it is made.
pub const COW_ARENA_MAX: usize = 8 << 20;
/// Copy-on-write arenas kept for the next batches (memory a batch touched stays mapped: fresh
/// pages each batch would be faulted in again).
const KEPT_COW_ARENAS: usize = 8;
static COW_ARENAS: std::sync::Mutex<Vec<AlignedBuf>> = std::sync::Mutex::new(Vec::new());

/// The copy-on-write clusters (or subcluster runs) of one batch, assembled one after another
/// in one aligned buffer, so that all go down with the batch and clusters that are next to
/// each other in the file go down as one write.
pub(super) struct CowArena {
    pub(super) buf: AlignedBuf,
    used: usize,
    /// What the batch asked for (a buffer from the pool may be larger).
    cap: usize,
}

impl CowArena {
    fn take(len: usize) -> CowArena {
        let buf = COW_ARENAS
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop()
            .unwrap_or_default()
            .at_least(len);
        CowArena {
            buf,
            used: 0,
            cap: len,
        }
    }

    /// `len` more bytes, or `None` when the arena is full.
    pub(super) fn claim(&mut self, len: usize) -> Option<std::ops::Range<usize>> {
        let end = self
            .used
            .checked_add(len)
            .filter(|&e| e <= self.cap.min(self.buf.len()))?;
        let r = self.used..end;
        self.used = end;
        Some(r)
    }
}

impl Drop for CowArena {
    fn drop(&mut self) {
        let mut kept = COW_ARENAS.lock().unwrap_or_else(|e| e.into_inner());
        if kept.len() < KEPT_COW_ARENAS {
            kept.push(std::mem::take(&mut self.buf));
        }
    }
}

/// Where a host write a batch defers takes its bytes from.
#[derive(Debug, Clone)]
pub(super) enum Src<'a> {
    /// The caller's buffer.
    Caller(&'a [u8]),
    /// The caller's buffer, over clusters the image already has (not counted toward early
    /// writeback).
    InPlace(&'a [u8]),
    /// This range of the batch's [`CowArena`].
    Arena(std::ops::Range<usize>),
}

/// The host writes of a batch, made while its writes are assembled and issued together after.
pub(super) struct Deferred<'a> {
    pub(super) writes: Vec<(Src<'a>, u64)>,
    pub(super) arena: Option<CowArena>,
    /// Copy-on-write clusters of the arena still to be filled from the backing file (with a
    /// [`DirectBacking`]), all of them together once the batch is assembled.
    pub(super) fills: Vec<PendingFill<'a>>,
}

/// A copy-on-write cluster whose old content comes from the backing file, filled after the
/// batch is assembled: then its write's bytes go over it.
pub(super) struct PendingFill<'a> {
    /// Its range of the arena (one cluster).
    range: std::ops::Range<usize>,
    /// Guest offset of the cluster.
    start: u64,
    /// The write's bytes and where in the cluster they go.
    data: &'a [u8],
    at: usize,
    /// Index of its host write in [`Deferred::writes`].
    write: usize,
}

/// Device and inode of `file` (`None` if it cannot be asked).
fn file_id(file: &std::fs::File) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    file.metadata().ok().map(|m| (m.dev(), m.ino()))
}

/// A raw backing file read with O_DIRECT for the copy-on-write fills of batches (see
/// [`QcowImage::enable_direct_backing`]).
pub(super) struct DirectBacking {
    /// The backing file's own (buffered) descriptor: a read plan naming it, or another
    /// description of the same file (a raw base plans random reads through one advised
    /// `POSIX_FADV_RANDOM`), is read through `file` instead.
    buffered: Arc<std::fs::File>,
    /// Device and inode of `buffered`.
    id: Option<(u64, u64)>,
    /// The other description of the backing file once a plan named it, so that later fills
    /// compare pointers instead of asking the kernel for its inode each time.
    twin: std::sync::OnceLock<Arc<std::fs::File>>,
    file: Box<dyn crate::direct::PosIo>,
    fd: std::os::fd::RawFd,
    d: crate::direct::DirectIo,
    rings: crate::host::Rings,
}

impl DirectBacking {
    /// Reads of `buffered` through `file` (an O_DIRECT descriptor of the same file).
    pub(super) fn new(buffered: Arc<std::fs::File>, file: Box<std::fs::File>) -> DirectBacking {
        use std::os::fd::AsRawFd;
        let d = crate::direct::DirectIo::for_file(&file);
        let fd = file.as_raw_fd();
        DirectBacking {
            id: file_id(&buffered),
            twin: std::sync::OnceLock::new(),
            buffered,
            file,
            fd,
            d,
            rings: crate::host::Rings::for_reads(),
        }
    }

    /// Whether a read plan naming `file` reads the backing file (see `buffered`).
    fn reads(&self, file: &Arc<std::fs::File>) -> bool {
        if Arc::ptr_eq(file, &self.buffered)
            || self.twin.get().is_some_and(|t| Arc::ptr_eq(file, t))
        {
            return true;
        }
        let same = self.id.is_some() && file_id(file) == self.id;
        if same {
            let _ = self.twin.set(file.clone());
        }
        same
    }

    /// How many fills were read on a ring so far.
    pub(super) fn ring_reads(&self) -> u64 {
        self.rings.completed()
    }

    /// Reads through `file` one `pread` at a time, never on a ring, with `d`'s alignment
    /// (tests inject failing and short reads this way).
    #[cfg(test)]
    pub(super) fn with_io(
        buffered: Arc<std::fs::File>,
        file: Box<dyn crate::direct::PosIo>,
        d: crate::direct::DirectIo,
    ) -> DirectBacking {
        let rings = crate::host::Rings::for_reads();
        rings.disable();
        DirectBacking {
            id: file_id(&buffered),
            twin: std::sync::OnceLock::new(),
            buffered,
            file,
            fd: -1,
            d,
            rings,
        }
    }
}

impl QcowImage {
    /// Claims the arena room of a copy-on-write cluster whose old content comes from a
    /// backing file read with O_DIRECT, to be filled with the batch's other such clusters
    /// ([`QcowImage::fill_from_backing`]); false (nothing done) when it cannot be.
    pub(super) fn defer_fill<'a>(
        &self,
        defer: &mut Option<&mut Deferred<'a>>,
        gc: u64,
        fill: Fill,
        target: u64,
        data: &'a [u8],
        guest: u64,
    ) -> bool {
        if !matches!(fill, Fill::Backing) || self.direct_backing.get().is_none() {
            return false;
        }
        let Some(d) = defer.as_deref_mut() else {
            return false;
        };
        let cs = self.geo.cluster_size() as usize;
        let Some(range) = d.arena.as_mut().and_then(|a| a.claim(cs)) else {
            return false;
        };
        d.fills.push(PendingFill {
            range: range.clone(),
            start: gc << self.geo.cluster_bits,
            data,
            at: self.geo.offset_in_cluster(guest) as usize,
            write: d.writes.len(),
        });
        d.writes.push((Src::Arena(range), target));
        true
    }

    /// Fills the batch's pending copy-on-write clusters: the old content of each from the
    /// backing file (all reads of the O_DIRECT descriptor in flight at once, straight into
    /// the arena; a cluster the plan does not map to that file alone is read the usual way),
    /// zeros past the disk's end, then its write's bytes over it. One result per fill.
    fn fill_from_backing(
        &self,
        db: &DirectBacking,
        arena: &mut [u8],
        fills: &[PendingFill<'_>],
    ) -> Vec<Result<()>> {
        let cs = self.geo.cluster_size();
        let bsize = self.backing.as_ref().map_or(0, |b| b.size());
        // The arena split into the fills' clusters (claimed in order, never overlapping).
        let mut slices: Vec<&mut [u8]> = Vec::with_capacity(fills.len());
        let (mut rest, mut at) = (arena, 0usize);
        for f in fills {
            let tail = std::mem::take(&mut rest);
            let (_, tail) = tail.split_at_mut(f.range.start - at);
            let (mine, tail) = tail.split_at_mut(f.range.len());
            slices.push(mine);
            rest = tail;
            at = f.range.end;
        }
        let mut results: Vec<Result<()>> = Vec::with_capacity(fills.len());
        // Per fill, the offset and length it reads through the direct descriptor, if it does.
        let mut direct: Vec<Option<(u64, usize)>> = Vec::with_capacity(fills.len());
        for (f, b) in fills.iter().zip(slices.iter_mut()) {
            let visible = self.size.saturating_sub(f.start).min(cs) as usize;
            let avail = bsize.saturating_sub(f.start).min(visible as u64) as usize;
            b[avail..].fill(0);
            let plan = self
                .backing
                .as_ref()
                .and_then(|x| x.plan_read(f.start, avail as u64));
            match plan.as_ref().map(|p| p.pieces.as_slice()) {
                Some([(_, PlanSource::File { file, offset, .. })]) if db.reads(file) => {
                    self.early_wb.backing_read();
                    direct.push(Some((*offset, avail)));
                    results.push(Ok(()));
                }
                _ => {
                    direct.push(None);
                    results.push(self.read_backing(&mut b[..visible], f.start));
                }
            }
        }
        let mut reads: Vec<(&mut [u8], u64)> = Vec::new();
        let mut which: Vec<usize> = Vec::new();
        for (k, (b, d)) in slices.iter_mut().zip(&direct).enumerate() {
            if let Some((off, avail)) = *d {
                reads.push((&mut b[..avail], off));
                which.push(k);
            }
        }
        if !reads.is_empty() {
            let done = db.rings.read(&db.d, &*db.file, db.fd, &mut reads);
            for (k, r) in which.into_iter().zip(done) {
                if let Err(e) = r {
                    results[k] = Err(BlockError::Io(e));
                }
            }
        }
        for ((f, b), r) in fills.iter().zip(slices).zip(&results) {
            if r.is_ok() {
                b[f.at..f.at + f.data.len()].copy_from_slice(f.data);
            }
        }
        results
    }

    /// How much copy-on-write assembly `steps` make (what a batch's arena needs for them).
    fn cow_bytes(&self, steps: &[Step]) -> usize {
        let cs = self.geo.cluster_size();
        steps
            .iter()
            .map(|s| match *s {
                Step::Alloc {
                    len, sub, guest, ..
                } if len != cs => match sub {
                    Some(w) if w.start == guest && w.end == guest + len => 0,
                    Some(w) => (w.end - w.start) as usize,
                    None => cs as usize,
                },
                _ => 0,
            })
            .sum()
    }

    /// [`BlockDev::write_batch`], and with `to_sync` [`BlockDev::write_batch_to_sync`]: the
    /// data of the batch goes down with [`HostFile::write_batch_to_sync`] then (past the host
    /// page cache where the file can, see [`QcowImage::write_host_batch`]).
    pub(super) fn write_batch_routed(
        &self,
        writes: &[(&[u8], u64)],
        to_sync: bool,
    ) -> Vec<Result<()>> {
        if let Err(e) = self.check_writable() {
            return writes
                .iter()
                .map(|_| Err(datapath::same_error(&e)))
                .collect();
        }
        // Empty or out-of-range writes are answered alone; the rest go down together.
        let mut results: Vec<Option<Result<()>>> = writes
            .iter()
            .map(|&(b, o)| match check_range(o, b.len() as u64, self.size) {
                Err(e) => Some(Err(e)),
                Ok(()) if b.is_empty() => Some(Ok(())),
                Ok(()) => None,
            })
            .collect();
        let todo: Vec<usize> = (0..writes.len())
            .filter(|&i| results[i].is_none())
            .collect();
        let batch: Vec<(&[u8], u64)> = todo.iter().map(|&i| writes[i]).collect();
        let g = self.gate.read().unwrap_or_else(|e| e.into_inner());
        let done = self.write_batch_inner(&batch, to_sync);
        drop(g);
        for (i, r) in todo.into_iter().zip(done) {
            results[i] = Some(self.finish(r));
        }
        results.into_iter().map(|r| r.unwrap_or(Ok(()))).collect()
    }

    /// Writes every `(buf, offset)` of `writes` (none overlapping another), one result each:
    /// all are planned under one hold of the metadata lock, the data of all of them goes down
    /// in one host batch ([`HostFile::write_batch`]: on an O_DIRECT file, all in flight at once),
    /// and all are published under one more hold. Copy-on-write clusters are assembled in one
    /// arena (up to [`COW_ARENA_MAX`]) and go down with the batch, clusters next to each other
    /// in the file and in the arena as one write; parts another request was allocating are
    /// written afterwards, one at a time.
    pub(super) fn write_batch_inner(
        &self,
        writes: &[(&[u8], u64)],
        to_sync: bool,
    ) -> Vec<Result<()>> {
        let plans: Vec<Result<Vec<Step>>> = {
            let mut m = self.lock();
            writes
                .iter()
                .map(|&(b, o)| self.plan_pass(&mut m, b.len() as u64, o))
                .collect()
        };
        let cow: usize = plans.iter().flatten().map(|p| self.cow_bytes(p)).sum();
        let mut deferred = Deferred {
            writes: Vec::new(),
            arena: (cow > 0).then(|| CowArena::take(cow.min(COW_ARENA_MAX))),
            fills: Vec::new(),
        };
        // Each write's data outcome, and whose each deferred host write is.
        let mut data: Vec<Result<()>> = Vec::with_capacity(writes.len());
        let mut owner: Vec<usize> = Vec::new();
        for (i, (&(b, o), plan)) in writes.iter().zip(&plans).enumerate() {
            let r = match plan {
                Ok(steps) => {
                    let before = (deferred.writes.len(), deferred.fills.len());
                    let r = self.write_data(b, o, steps, Some(&mut deferred), Rewrite::Cached);
                    // A write whose copy-on-write part failed issues nothing more.
                    if r.is_err() {
                        deferred.writes.truncate(before.0);
                        deferred.fills.truncate(before.1);
                    }
                    owner.resize(deferred.writes.len(), i);
                    r
                }
                Err(_) => Ok(()),
            };
            data.push(r);
        }
        // (Fills are deferred only with a direct backing file.)
        if let Some(db) = self
            .direct_backing
            .get()
            .filter(|_| !deferred.fills.is_empty())
        {
            let arena = deferred
                .arena
                .as_mut()
                .map_or(&mut [][..], |a| &mut a.buf[..]);
            let filled = self.fill_from_backing(db, arena, &deferred.fills);
            // A write whose fill failed reports it and issues nothing.
            let mut failed = vec![false; writes.len()];
            for (f, r) in deferred.fills.iter().zip(filled) {
                if let Err(e) = r {
                    let i = owner[f.write];
                    failed[i] = true;
                    if let Some(d @ Ok(())) = data.get_mut(i) {
                        *d = Err(e);
                    }
                }
            }
            if failed.iter().any(|&f| f) {
                let keep: Vec<bool> = owner.iter().map(|&i| !failed[i]).collect();
                let mut k = 0;
                deferred.writes.retain(|_| {
                    k += 1;
                    keep[k - 1]
                });
                owner.retain(|&i| !failed[i]);
            }
        }
        // Arena pieces next to each other in the file and in the arena go as one write; the
        // writes whose pieces it carries (only those: a write between two of them may have
        // none in it) share its outcome.
        let mut merged: Vec<(Src<'_>, u64, Vec<usize>)> = Vec::new();
        for (k, (src, at)) in deferred.writes.iter().enumerate() {
            let last = merged.last_mut();
            if let (Some((Src::Arena(r0), at0, owners)), Src::Arena(r)) = (last, src) {
                if r0.end == r.start && *at0 + r0.len() as u64 == *at {
                    r0.end = r.end;
                    if owners.last() != Some(&owner[k]) {
                        owners.push(owner[k]);
                    }
                    continue;
                }
            }
            merged.push((src.clone(), *at, vec![owner[k]]));
        }
        let arena: &[u8] = deferred.arena.as_ref().map_or(&[], |a| &a.buf);
        let host: Vec<(&[u8], u64)> = merged
            .iter()
            .map(|(src, at, _)| match src {
                Src::Caller(b) | Src::InPlace(b) => (*b, *at),
                Src::Arena(r) => (&arena[r.clone()], *at),
            })
            .collect();
        if !host.is_empty() {
            let in_place: Vec<bool> = merged
                .iter()
                .map(|(src, _, _)| matches!(src, Src::InPlace(_)))
                .collect();
            let counted: Vec<bool> = host
                .iter()
                .zip(&in_place)
                .map(|(&(b, at), &in_place)| {
                    let direct = if to_sync {
                        self.io.syncs_directly(b, at)
                    } else {
                        self.io.writes_directly(b, at)
                    };
                    !in_place && !direct
                })
                .collect();
            for (k, r) in self
                .write_host_batch(&host, &in_place, to_sync)
                .into_iter()
                .enumerate()
            {
                if r.is_ok() {
                    self.wrote_host(host[k].0.len(), counted[k]);
                }
                let (Err(e), Some((_, _, owners))) = (r, merged.get(k)) else {
                    continue;
                };
                let e = BlockError::from(e);
                for &i in owners {
                    if let Some(d @ Ok(())) = data.get_mut(i) {
                        *d = Err(same_error(&e));
                    }
                }
            }
        }
        drop(host);
        drop(deferred);
        self.wrote_data();
        let mut results: Vec<Result<Vec<(u64, u64)>>> = Vec::with_capacity(writes.len());
        {
            let mut m = self.lock();
            for (plan, d) in plans.into_iter().zip(data) {
                results.push(match plan {
                    Ok(steps) => self.publish_pass(&mut m, &steps, d),
                    Err(e) => Err(e),
                });
            }
            if let Err(e) = m.maybe_flush(&self.io) {
                // As for a single write: the write that pushed metadata out reports its error
                // (here every write of the batch that succeeded so far).
                for r in results.iter_mut().filter(|r| r.is_ok()) {
                    *r = Err(same_error(&e));
                }
            }
        }
        self.alloc_done.notify_all();
        results
            .into_iter()
            .zip(writes)
            .map(|(r, &(b, o))| {
                for (boff, blen) in r? {
                    drop(self.wait_inflight(self.lock(), boff, blen));
                    let s = (boff - o) as usize;
                    self.write_inner(&b[s..s + blen as usize], boff, Rewrite::Cached)?;
                }
                Ok(())
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::io;
    use std::os::unix::fs::FileExt;

    use blockdev::{BlockDev, PlanSource, RawFile};

    use super::*;
    use crate::create::{create_on, CreateOptions};
    use crate::direct::{DirectIo, PosIo};
    use crate::host::MemHost;
    use crate::Format;

    const CS: u64 = 65536;

    /// The backing file, whose reads at `fail_at` fail with EIO while `failing` is set.
    struct FailingReads {
        file: std::fs::File,
        fail_at: u64,
        failing: std::sync::atomic::AtomicBool,
    }

    impl PosIo for FailingReads {
        fn pread(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
            let hit = offset <= self.fail_at && self.fail_at < offset + buf.len() as u64;
            if hit && self.failing.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(io::Error::from_raw_os_error(libc::EIO));
            }
            self.file.read_at(buf, offset)
        }

        fn pwrite(&self, _buf: &[u8], _offset: u64) -> io::Result<usize> {
            Err(io::Error::from_raw_os_error(libc::EBADF))
        }

        fn file_len(&self) -> io::Result<u64> {
            blockdev::file_size(&self.file)
        }
    }

    /// A 1 MiB standard-L2 overlay (64 KiB clusters) over a patterned raw base whose
    /// copy-on-write fills are read through `reads` (one `pread` at a time).
    fn overlay_reading_fills_through(
        dir: &tempfile::TempDir,
        reads: impl FnOnce(&std::path::Path) -> Box<dyn PosIo>,
    ) -> (Arc<QcowImage>, Vec<u8>) {
        let path = dir.path().join("base.raw");
        let base: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &base).unwrap();
        let raw: Arc<dyn BlockDev> = Arc::new(RawFile::open(&path, true).unwrap());
        let buffered = match raw.plan_read(0, 4096).unwrap().pieces.first() {
            Some((_, PlanSource::File { file, .. })) => file.clone(),
            other => panic!("a raw file plans {other:?}"),
        };
        let host = MemHost::default();
        let opts = CreateOptions {
            size: 1 << 20,
            cluster_size: CS,
            backing: Some(("base.raw".into(), Format::Raw)),
            ..CreateOptions::default()
        };
        create_on(&host, &opts).unwrap();
        let img = QcowImage::open_with(Box::new(host), false, Some(raw)).unwrap();
        let db = DirectBacking::with_io(buffered, reads(&path), DirectIo::with_alignment(512, 512));
        assert!(img.direct_backing.set(db).is_ok());
        (Arc::new(img), base)
    }

    #[test]
    fn fills_planned_through_any_description_of_the_backing_file_read_it_directly() {
        // A raw base plans short random reads through a second description of itself (advised
        // random) and the others through its first: both are the backing file; another file
        // is not.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("base.raw");
        std::fs::write(&path, vec![1u8; 4 << 20]).unwrap();
        let raw = RawFile::open(&path, true).unwrap();
        let planned = |off: u64, len: u64| match raw.plan_read(off, len).unwrap().pieces.first() {
            Some((_, PlanSource::File { file, .. })) => file.clone(),
            other => panic!("a raw file plans {other:?}"),
        };
        let random = planned(2 << 20, 4096);
        let streamed = planned((2 << 20) + 4096, 4096);
        assert!(
            !Arc::ptr_eq(&random, &streamed) || !raw.has_random_reads(),
            "one description for both"
        );
        let db = DirectBacking::with_io(
            streamed.clone(),
            Box::new(std::fs::File::open(&path).unwrap()),
            DirectIo::with_alignment(512, 512),
        );
        assert!(db.reads(&streamed));
        assert!(db.reads(&random));
        let other = dir.path().join("other.raw");
        std::fs::write(&other, vec![1u8; 4096]).unwrap();
        assert!(!db.reads(&Arc::new(std::fs::File::open(&other).unwrap())));
    }

    fn read(img: &QcowImage, off: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        img.read_at(&mut v, off).unwrap();
        v
    }

    /// The backing file, running `hook` (once) right after its first read.
    struct HookedReads {
        file: std::fs::File,
        hook: std::sync::Mutex<Option<Box<dyn FnOnce() + Send>>>,
    }

    impl PosIo for HookedReads {
        fn pread(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
            let n = self.file.read_at(buf, offset)?;
            if let Some(h) = self.hook.lock().unwrap().take() {
                h();
            }
            Ok(n)
        }

        fn pwrite(&self, _buf: &[u8], _offset: u64) -> io::Result<usize> {
            Err(io::Error::from_raw_os_error(libc::EBADF))
        }

        fn file_len(&self) -> io::Result<u64> {
            blockdev::file_size(&self.file)
        }
    }

    #[test]
    fn a_read_during_a_batchs_fills_sees_the_base_and_a_write_into_a_filling_cluster_waits() {
        // Right after the batch read the old content of the cluster it copies on write (the
        // metadata lock released, nothing written or published yet): a read of the batch's
        // range sees the base, and a write into another part of the same cluster waits for
        // the batch (else it would copy the cluster from the base itself and one of the two
        // writes would be lost). Both land.
        type Racer<T> = Arc<std::sync::Mutex<Option<std::thread::JoinHandle<T>>>>;
        let dir = tempfile::tempdir().unwrap();
        let reader: Racer<Vec<u8>> = Arc::default();
        let writer: Racer<()> = Arc::default();
        let waited = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let slot: Arc<std::sync::Mutex<Option<Arc<QcowImage>>>> = Arc::default();
        let (r2, w2, waited2, slot2) =
            (reader.clone(), writer.clone(), waited.clone(), slot.clone());
        let hook = move || {
            let img = slot2.lock().unwrap().clone().unwrap();
            let (i1, i2) = (img.clone(), img);
            *r2.lock().unwrap() = Some(std::thread::spawn(move || read(&i1, 0, 4096)));
            *w2.lock().unwrap() = Some(std::thread::spawn(move || {
                i2.write_at(&[0xcc; 4096], 8192).unwrap();
            }));
            let t0 = std::time::Instant::now();
            while t0.elapsed() < std::time::Duration::from_millis(200)
                && !w2.lock().unwrap().as_ref().unwrap().is_finished()
            {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            waited2.store(
                !w2.lock().unwrap().as_ref().unwrap().is_finished(),
                std::sync::atomic::Ordering::SeqCst,
            );
        };
        let (img, base) = overlay_reading_fills_through(&dir, |path| {
            Box::new(HookedReads {
                file: std::fs::File::open(path).unwrap(),
                hook: std::sync::Mutex::new(Some(Box::new(hook))),
            })
        });
        *slot.lock().unwrap() = Some(img.clone());
        let a = vec![0xaa; 4096];
        img.write_batch(&[(&a[..], 0)])[0].as_ref().unwrap();
        fn take<T>(r: &Racer<T>) -> std::thread::JoinHandle<T> {
            r.lock().unwrap().take().expect("the hook never ran")
        }
        let seen = take(&reader).join().unwrap();
        assert!(
            seen == base[..4096],
            "a read saw the batch's data before it was published"
        );
        take(&writer).join().unwrap();
        assert!(
            waited.load(std::sync::atomic::Ordering::SeqCst),
            "the write into the cluster being filled did not wait for the batch"
        );
        let mut want = base[..CS as usize].to_vec();
        want[..4096].fill(0xaa);
        want[8192..12288].fill(0xcc);
        assert!(read(&img, 0, CS as usize) == want);
    }

    /// A backing device whose first half is one raw file and second half another (as a chain
    /// could plan it): its plans name either file.
    struct TwoFiles {
        a: Arc<std::fs::File>,
        b: Arc<std::fs::File>,
        half: u64,
    }

    impl BlockDev for TwoFiles {
        fn size(&self) -> u64 {
            2 * self.half
        }

        fn read_at(&self, buf: &mut [u8], offset: u64) -> blockdev::Result<()> {
            let (f, at) = if offset < self.half {
                (&self.a, offset)
            } else {
                (&self.b, offset - self.half)
            };
            Ok(blockdev::read_full_at(f, buf, at)?)
        }

        fn plan_read(&self, offset: u64, len: u64) -> Option<blockdev::ReadPlan> {
            let (file, at) = if offset + len <= self.half {
                (self.a.clone(), offset)
            } else if offset >= self.half {
                (self.b.clone(), offset - self.half)
            } else {
                return None;
            };
            Some(blockdev::ReadPlan::one(len, PlanSource::file(file, at)))
        }

        fn write_at(&self, _buf: &[u8], _offset: u64) -> blockdev::Result<()> {
            Err(BlockError::ReadOnly)
        }

        fn flush(&self) -> blockdev::Result<()> {
            Ok(())
        }

        fn discard(&self, _offset: u64, _len: u64) -> blockdev::Result<()> {
            Err(BlockError::ReadOnly)
        }

        fn write_zeroes(&self, _offset: u64, _len: u64, _unmap: bool) -> blockdev::Result<()> {
            Err(BlockError::ReadOnly)
        }

        fn is_read_only(&self) -> bool {
            true
        }
    }

    #[test]
    fn a_fill_the_plan_maps_to_another_file_than_the_direct_one_is_read_from_that_file() {
        // The direct descriptor is of file A; a cluster whose plan names file B is read the
        // usual way, from B, not through A's descriptor at B's offset.
        let dir = tempfile::tempdir().unwrap();
        let half = 4 * CS;
        let (pa, pb) = (dir.path().join("a.raw"), dir.path().join("b.raw"));
        std::fs::write(&pa, vec![0x0a; half as usize]).unwrap();
        std::fs::write(&pb, vec![0x0b; half as usize]).unwrap();
        let two = TwoFiles {
            a: Arc::new(std::fs::File::open(&pa).unwrap()),
            b: Arc::new(std::fs::File::open(&pb).unwrap()),
            half,
        };
        let buffered = two.a.clone();
        let host = MemHost::default();
        let opts = CreateOptions {
            size: 2 * half,
            cluster_size: CS,
            backing: Some(("base.raw".into(), Format::Raw)),
            ..CreateOptions::default()
        };
        create_on(&host, &opts).unwrap();
        let img = QcowImage::open_with(Box::new(host), false, Some(Arc::new(two))).unwrap();
        let db = DirectBacking::with_io(
            buffered,
            Box::new(std::fs::File::open(&pa).unwrap()),
            DirectIo::with_alignment(512, 512),
        );
        assert!(img.direct_backing.set(db).is_ok());
        let w = vec![0xff; 4096];
        let results = img.write_batch(&[(&w[..], 0), (&w[..], half + CS)]);
        assert!(results.iter().all(|r| r.is_ok()), "{results:?}");
        let mut want = vec![0x0a; CS as usize];
        want[..4096].fill(0xff);
        assert!(read(&img, 0, CS as usize) == want, "the fill from file A");
        want.fill(0x0b);
        want[..4096].fill(0xff);
        assert!(
            read(&img, half + CS, CS as usize) == want,
            "the fill from file B was read from file A"
        );
    }

    #[test]
    fn a_failed_fill_from_the_backing_file_fails_its_write_alone_and_publishes_nothing_of_it() {
        // Three copy-on-write clusters of one batch fill from the backing file; the fill of the
        // second fails with EIO: its write reports EIO and the disk still reads the base
        // there, the other two land. Then it succeeds.
        let dir = tempfile::tempdir().unwrap();
        struct Shared(Arc<FailingReads>);
        impl PosIo for Shared {
            fn pread(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
                self.0.pread(buf, offset)
            }
            fn pwrite(&self, buf: &[u8], offset: u64) -> io::Result<usize> {
                self.0.pwrite(buf, offset)
            }
            fn file_len(&self) -> io::Result<u64> {
                self.0.file_len()
            }
        }
        let mut reads = None;
        let (img, base) = overlay_reading_fills_through(&dir, |path| {
            let r = Arc::new(FailingReads {
                file: std::fs::File::open(path).unwrap(),
                fail_at: CS + 100,
                failing: true.into(),
            });
            reads = Some(r.clone());
            Box::new(Shared(r))
        });
        let reads = reads.unwrap();
        let (a, b, c) = (vec![0xaa; 4096], vec![0xbb; 4096], vec![0xcc; 4096]);
        let results = img.write_batch(&[(&a[..], 4096), (&b[..], CS + 8192), (&c[..], 2 * CS)]);
        assert!(results[0].is_ok() && results[2].is_ok(), "{results:?}");
        match &results[1] {
            Err(BlockError::Io(e)) => assert_eq!(e.raw_os_error(), Some(libc::EIO)),
            other => panic!("the write whose fill failed reported {other:?}"),
        }
        let read = |off: u64, len: usize| read(&img, off, len);
        let mut want = base[..3 * CS as usize].to_vec();
        want[4096..8192].fill(0xaa);
        want[2 * CS as usize..2 * CS as usize + 4096].fill(0xcc);
        assert!(
            read(0, 3 * CS as usize) == want,
            "the batch around the failed fill"
        );
        reads
            .failing
            .store(false, std::sync::atomic::Ordering::SeqCst);
        img.write_batch(&[(&b[..], CS + 8192)])[0].as_ref().unwrap();
        want[CS as usize + 8192..CS as usize + 12288].fill(0xbb);
        assert!(
            read(0, 3 * CS as usize) == want,
            "the failed write, written again"
        );
        img.flush().unwrap();
    }
}
