//! The flush of [`QcowImage`] that never holds the metadata lock across `fdatasync`.
//!
//! # How it stays consistent without the lock
//! A flush takes a *plan* under `meta` at one instant T: copies of the dirty L2 tables and the
//! dirty L1 entries, the set of dirty refcount-table entries, the pending frees, and the
//! `data_written` flag. Everything in the plan is consistent as of T. It then runs the same
//! stages as before (sync data -> refcount blocks -> sync -> refcount-table entries by level ->
//! sync -> L2 tables -> sync -> L1 entries -> sync) with `meta` released during every sync:
//! - Refcount blocks are written with their *current* content, under `meta` (a pwrite, not a
//!   sync). Refcounts of clusters referenced at T only grow until the frees of this plan are
//!   applied, so the current content counts everything the T copies of the L2 tables name.
//!   Writing under the lock keeps an older copy from ever landing after a newer one (the
//!   refcount-table growth also writes dirty blocks under `meta`).
//! - Refcount-table entries of the plan are written (current value, current table) under
//!   `meta`, level by level, and forgotten only after their sync.
//! - L2 tables and L1 entries are written from the T copies without the lock: only a flush
//!   writes them, and flushes are serialized by `flush_lock`. A table or entry becomes clean
//!   after the last sync only if it still equals its T copy; one changed meanwhile stays dirty
//!   for the next flush. Dirty tables are never evicted, so a table is never reloaded from
//!   disk while its newer content only lives in memory.
//! - `Meta::flushing` is set for the whole flush. The in-lock metadata flush forced by the
//!   dirty bound ([`Meta::maybe_flush`]) is skipped meanwhile: it would write newer L2 content
//!   that this flush's older copies could then overwrite.
//! - On failure nothing is lost: tables and entries are still dirty, the frees go back, and
//!   `data_written` is set again. A failed sync was repaired by [`ReplayHost`] or poisoned the
//!   file, so a flush that reports success is true.
//!
//! # Write-back: the same plan, fewer syncs
//! [`QcowImage::write_back_inner`] ([`BlockDev::write_back`], the crash journal's background
//! trims) makes every completed write survive the end of the process, not a host crash: what
//! a restarted daemon reads from the file must name every cluster written, so the dirty L2
//! tables and L1 entries go into the file, but need not be durable. It carries out the plan
//! with the syncs that order it and without those that only make it durable: data and
//! refcount blocks, sync, refcount-table levels (each synced: a block must be reachable before
//! anything names its clusters), L2 tables, and only if L1 entries are dirty a sync before
//! they are written (an L1 entry may reach the disk at any moment after its write, and must
//! never name an L2 table that is not durable). So at every instant the file on disk is one
//! a flush could have left: the host may crash at any point and the image stays consistent,
//! no cluster named before its data and its count are durable. With no metadata dirty (writes
//! into allocated clusters) it syncs nothing: the data is with the kernel already. It applies
//! no frees (the L2 tables that stopped naming those clusters are not durable) and leaves
//! `data_written` set, so the next flush syncs what it wrote even if nothing is dirty then.
//!
//! Lock order: `flush_lock` -> `meta`; `flush_lock` is released before the frees take `gate`
//! exclusively, and no request takes `flush_lock` while holding `gate` or `meta`.

use super::*;

/// How far [`QcowImage::carry_out`] takes a plan.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Depth {
    /// Everything durable, frees applied: [`BlockDev::flush`].
    Durable,
    /// Everything in the file in an order that stays consistent across a host crash, not
    /// necessarily durable: [`BlockDev::write_back`].
    InFile,
}

/// What one flush writes, taken under `meta` at its start.
struct FlushPlan {
    /// Copies of the dirty L2 tables: (host offset, entries).
    l2: Vec<(u64, Vec<u64>)>,
    /// Dirty L1 entries: (index, value).
    l1: Vec<(usize, u64)>,
    /// Dirty refcount-table entries.
    reftable: BTreeSet<usize>,
    /// Host clusters whose references were replaced before the plan was taken.
    frees: Vec<u64>,
    /// Whether there is anything to sync at all.
    work: bool,
}

impl Meta {
    /// Counts the dirty cached tables again (after a flush cleaned some of them).
    fn recount_dirty(&mut self) {
        self.dirty = self.l2.values().filter(|t| t.dirty).count()
            + self.blocks.values().filter(|b| b.dirty).count();
    }

    fn take_plan(&mut self, data_written: bool, depth: Depth) -> FlushPlan {
        let meta_dirty =
            self.dirty > 0 || !self.l1_dirty.is_empty() || !self.reftable_dirty.is_empty();
        let l2 = self
            .l2
            .iter()
            .filter(|(_, t)| t.dirty)
            .map(|(&off, t)| (off, t.entries.clone()))
            .collect();
        let l1 = self
            .l1_dirty
            .iter()
            .map(|&i| (i, self.l1.get(i).copied().unwrap_or(0)))
            .collect();
        FlushPlan {
            l2,
            l1,
            reftable: self.reftable_dirty.clone(),
            // Applied only once the L2 tables that stopped naming them are durable.
            frees: match depth {
                Depth::Durable => std::mem::take(&mut self.pending_free),
                Depth::InFile => Vec::new(),
            },
            work: meta_dirty || data_written,
        }
    }

    /// Writes the dirty refcount blocks as they are now.
    fn write_blocks_now(&mut self, io: &dyn HostFile) -> Result<()> {
        for (&off, b) in self.blocks.iter_mut().filter(|(_, b)| b.dirty) {
            io.write_at(&b.data, off)?;
            b.dirty = false;
        }
        Ok(())
    }

    /// Writes the entries of `pending` (still dirty) whose block is counted by an entry that is
    /// not pending any more, and returns them with the values and table they were written to.
    pub(super) fn write_reftable_level(
        &mut self,
        io: &dyn HostFile,
        pending: &mut BTreeSet<usize>,
    ) -> Result<Vec<(usize, u64, u64)>> {
        pending.retain(|i| self.reftable_dirty.contains(i));
        if pending.is_empty() {
            return Ok(Vec::new());
        }
        let on_disk_entries = u64::from(self.header.refcount_table_clusters) * (self.cs() / 8);
        if self.reftable.len() as u64 != on_disk_entries {
            return Err(corrupt(format!(
                "in-memory refcount table has {} entries but the one on disk has {on_disk_entries}",
                self.reftable.len()
            )));
        }
        let ready: Vec<usize> = pending
            .iter()
            .copied()
            .filter(|&i| {
                let bo = self
                    .reftable
                    .get(i)
                    .map_or(0, |&e| reftable_entry_offset(e));
                let counted_in = self.geo.refcount_table_index(bo) as usize;
                bo == 0 || counted_in == i || !pending.contains(&counted_in)
            })
            .collect();
        if ready.is_empty() {
            return Err(corrupt(
                "new refcount blocks count each other in a cycle".into(),
            ));
        }
        let table = self.header.refcount_table_offset;
        let mut written = Vec::with_capacity(ready.len());
        for i in ready {
            if i as u64 >= on_disk_entries {
                return Err(corrupt(format!(
                    "refcount table entry {i} is outside the on-disk table"
                )));
            }
            let e = self.reftable.get(i).copied().unwrap_or(0);
            io.write_at(&e.to_be_bytes(), table + i as u64 * 8)?;
            written.push((i, e, table));
        }
        Ok(written)
    }
}

impl QcowImage {
    /// Writes all metadata dirty at the call and syncs it in dependency order, with `meta`
    /// released during every sync; then applies the frees the flush made safe.
    pub(super) fn flush_inner(&self) -> Result<()> {
        self.carry_out(Depth::Durable)
    }

    /// Writes all metadata dirty at the call into the file in dependency order, syncing only
    /// where the order needs it (see the module documentation).
    pub(super) fn write_back_inner(&self) -> Result<()> {
        self.carry_out(Depth::InFile)
    }

    fn carry_out(&self, depth: Depth) -> Result<()> {
        let one = self.flush_lock.lock().unwrap_or_else(|e| e.into_inner());
        let plan = {
            let mut m = self.lock();
            // A flush clears it at the plan so writes completing during the flush are synced
            // next time; a write-back syncs no data for its own sake (it is with the kernel
            // already) and leaves the flag to the next flush.
            let written =
                depth == Depth::Durable && self.data_written.swap(false, Ordering::AcqRel);
            let plan = m.take_plan(written, depth);
            m.flushing = true;
            plan
        };
        let r = if plan.work {
            self.run_plan(&plan, depth)
        } else {
            Ok(())
        };
        if plan.work && depth == Depth::InFile {
            // What it wrote is not durable yet: the next flush must sync even if nothing is
            // dirty by then.
            self.data_written.store(true, Ordering::Release);
        }
        let frees = {
            let mut m = self.lock();
            m.flushing = false;
            match &r {
                Ok(()) => {
                    for (off, entries) in &plan.l2 {
                        if let Some(t) = m.l2.get_mut(off) {
                            if t.dirty && t.entries == *entries {
                                t.dirty = false;
                            }
                        }
                    }
                    for &(i, v) in &plan.l1 {
                        if m.l1.get(i) == Some(&v) {
                            m.l1_dirty.remove(&i);
                        }
                    }
                    m.recount_dirty();
                    plan.frees
                }
                Err(_) => {
                    m.pending_free.extend(plan.frees);
                    self.data_written.store(true, Ordering::Release);
                    Vec::new()
                }
            }
        };
        drop(one);
        r?;
        if !frees.is_empty() || self.pins.quarantined() {
            // No request may still hold a mapping to a cluster that is about to become free,
            // and no planned read made before its free may still read it (`pins`).
            let _excl = self.gate.write().unwrap_or_else(|e| e.into_inner());
            let frees = self.pins.admit(frees);
            if !frees.is_empty() {
                self.lock().apply_frees(&self.io, frees)?;
            }
        }
        Ok(())
    }

    /// The stages of a flush; `meta` is held only for the writes that must see current state.
    /// At [`Depth::InFile`] the syncs after the L2 tables (unless L1 entries follow) and after
    /// the L1 entries are left out.
    fn run_plan(&self, plan: &FlushPlan, depth: Depth) -> Result<()> {
        let durable = depth == Depth::Durable;
        // Guest data written before the plan (which the planned L2 tables may name) and the
        // refcount blocks that count its clusters become durable with one sync: neither needs
        // the other on disk first (a count durable before its data, or data before its count,
        // is at worst a leak after a crash); the refcount-table and L2 entries written after
        // this sync need both. Counts that drop (frees) are applied only after the L2 tables
        // that stop naming those clusters are durable, so none is written here early.
        self.lock().write_blocks_now(&self.io)?;
        self.io.sync_data()?;
        let mut pending = plan.reftable.clone();
        loop {
            let level = self.lock().write_reftable_level(&self.io, &mut pending)?;
            if level.is_empty() {
                break;
            }
            self.io.sync_data()?;
            let mut m = self.lock();
            for (i, v, table) in level {
                pending.remove(&i);
                if m.header.refcount_table_offset == table && m.reftable.get(i) == Some(&v) {
                    m.reftable_dirty.remove(&i);
                }
            }
        }
        if !plan.l2.is_empty() {
            for (off, entries) in &plan.l2 {
                self.io.write_at(&table_to_bytes(entries), *off)?;
            }
            if durable || !plan.l1.is_empty() {
                self.io.sync_data()?;
            }
        }
        if !plan.l1.is_empty() {
            let l1_table = self.lock().header.l1_table_offset;
            for &(i, v) in &plan.l1 {
                self.io
                    .write_at(&v.to_be_bytes(), l1_table + i as u64 * 8)?;
            }
            if durable {
                self.io.sync_data()?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc::{channel, Receiver, Sender};
    use std::time::Duration;

    use super::*;
    use crate::create::{create_on, CreateOptions};
    use crate::host::MemHost;

    /// Which sync to park (1-based), the channel that says it parked, the one that lets it go.
    type Park = (u64, Sender<()>, Receiver<()>);

    /// A file whose `sync_data` makes durable what was written before it started, and which can
    /// park one chosen sync (after its I/O, before it returns) until the test lets it go.
    struct ParkingHost {
        file: MemHost,
        durable: Mutex<Vec<u8>>,
        syncs: AtomicU64,
        writes: AtomicU64,
        park: Mutex<Option<Park>>,
    }

    impl HostFile for ParkingHost {
        fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
            self.file.read_at(buf, offset)
        }

        fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
            self.writes.fetch_add(1, Ordering::SeqCst);
            self.file.write_at(buf, offset)
        }

        fn sync_data(&self) -> io::Result<()> {
            *self.durable.lock().unwrap() = self.file.contents();
            let n = self.syncs.fetch_add(1, Ordering::SeqCst) + 1;
            let mut park = self.park.lock().unwrap();
            if park.as_ref().is_some_and(|(k, _, _)| *k == n) {
                let (_, parked, go) = park.take().unwrap();
                drop(park);
                parked.send(()).unwrap();
                go.recv().unwrap();
            }
            Ok(())
        }

        fn len(&self) -> io::Result<u64> {
            self.file.len()
        }

        fn set_len(&self, len: u64) -> io::Result<()> {
            self.file.set_len(len)
        }
    }

    const CS: u64 = 4096;

    fn image() -> (Arc<ParkingHost>, Arc<QcowImage>) {
        image_with(CS)
    }

    fn image_with(cluster_size: u64) -> (Arc<ParkingHost>, Arc<QcowImage>) {
        let host = Arc::new(ParkingHost {
            file: MemHost::default(),
            durable: Mutex::new(Vec::new()),
            syncs: AtomicU64::new(0),
            writes: AtomicU64::new(0),
            park: Mutex::new(None),
        });
        let opts = CreateOptions {
            size: 1 << 20,
            cluster_size,
            ..CreateOptions::default()
        };
        create_on(&*host, &opts).unwrap();
        let img = QcowImage::open_with(Box::new(host.clone()), false, None).unwrap();
        (host, Arc::new(img))
    }

    /// Opens what is durable in `host` and reads guest cluster `gc`.
    fn durable_cluster(host: &ParkingHost, gc: u64) -> Vec<u8> {
        let durable = MemHost::new(host.durable.lock().unwrap().clone());
        let img = QcowImage::open_with(Box::new(durable), true, None).unwrap();
        let mut b = vec![0u8; CS as usize];
        img.read_at(&mut b, gc * CS).unwrap();
        b
    }

    /// Opens `bytes` as the image and reads guest cluster `gc`.
    fn cluster_of(bytes: Vec<u8>, gc: u64) -> Vec<u8> {
        let img = QcowImage::open_with(Box::new(MemHost::new(bytes)), true, None).unwrap();
        let mut b = vec![0u8; CS as usize];
        img.read_at(&mut b, gc * CS).unwrap();
        b
    }

    /// What a restarted process would read: the file as written, durable or not.
    fn written_cluster(host: &ParkingHost, gc: u64) -> Vec<u8> {
        cluster_of(host.file.contents(), gc)
    }

    /// `qemu-img check`'s verdict on what is durable in `host`: (corruptions, leaks).
    fn durable_check(host: &ParkingHost) -> (u64, u64) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("durable.qcow2");
        std::fs::write(&path, &*host.durable.lock().unwrap()).unwrap();
        let report = crate::check::check(&path, None).unwrap();
        (report.corruptions as u64, report.leaks as u64)
    }

    /// (syncs, writes) of the host since `before`.
    fn counts(host: &ParkingHost, before: (u64, u64)) -> (u64, u64) {
        (
            host.syncs.load(Ordering::SeqCst) - before.0,
            host.writes.load(Ordering::SeqCst) - before.1,
        )
    }

    fn now(host: &ParkingHost) -> (u64, u64) {
        (
            host.syncs.load(Ordering::SeqCst),
            host.writes.load(Ordering::SeqCst),
        )
    }

    /// Syncs of a flush after one allocating write into a fresh image: data with its refcount
    /// block, L2 table, L1 entry.
    const FLUSH_SYNCS: u64 = 3;

    #[test]
    fn a_write_back_into_allocated_clusters_neither_writes_nor_syncs_and_the_flush_still_syncs() {
        // The crash journal trims by write-back; over an image whose clusters are allocated
        // the data is with the kernel once written, so a trim must not cost a device flush.
        let (host, img) = image();
        img.write_at(&[0xaa; CS as usize], 0).unwrap();
        img.flush().unwrap();
        img.write_at(&[0xbb; CS as usize], 0).unwrap();
        let before = now(&host);
        img.write_back().unwrap();
        assert_eq!(counts(&host, before), (0, 0));
        assert_eq!(written_cluster(&host, 0), vec![0xbb; CS as usize]);
        // The write-back did not make the data durable, and left the next flush its sync.
        assert_eq!(durable_cluster(&host, 0), vec![0xaa; CS as usize]);
        img.flush().unwrap();
        assert_eq!(counts(&host, before).0, 1);
        assert_eq!(durable_cluster(&host, 0), vec![0xbb; CS as usize]);
    }

    #[test]
    fn a_write_back_puts_new_metadata_in_the_file_with_only_the_syncs_its_order_needs() {
        // A fresh image: the first write allocates a data cluster and an L2 table whose L1
        // entry is new, so the L2 table must be durable before the L1 entry is written (one
        // sync for data and refcounts, one before the L1 entry, none after it).
        let (host, img) = image();
        img.flush().unwrap();
        img.write_at(&[0xaa; CS as usize], 0).unwrap();
        let before = now(&host);
        img.write_back().unwrap();
        assert_eq!(counts(&host, before).0, FLUSH_SYNCS - 1);
        assert_eq!(written_cluster(&host, 0), vec![0xaa; CS as usize]);
        // Every durable state it passed through is consistent: at worst clusters counted that
        // nothing durable names yet (leaks).
        assert_eq!(durable_check(&host).0, 0);
        // A second cluster under the same L2 table: one sync (data and refcounts), then the
        // L2 table goes into the file unsynced.
        img.write_at(&[0xbb; CS as usize], 3 * CS).unwrap();
        let before = now(&host);
        img.write_back().unwrap();
        assert_eq!(counts(&host, before).0, 1);
        assert_eq!(written_cluster(&host, 3), vec![0xbb; CS as usize]);
        assert_eq!(durable_cluster(&host, 3), vec![0u8; CS as usize]);
        assert_eq!(durable_check(&host).0, 0);
        // The flush after it syncs what the write-back left in the file, and writes nothing
        // again (the write-back cleaned what it wrote).
        let before = now(&host);
        img.flush().unwrap();
        assert_eq!(counts(&host, before), (1, 0));
        assert_eq!(durable_cluster(&host, 0), vec![0xaa; CS as usize]);
        assert_eq!(durable_cluster(&host, 3), vec![0xbb; CS as usize]);
        assert_eq!(durable_check(&host), (0, 0));
    }

    #[test]
    fn a_flush_after_a_write_back_of_metadata_alone_still_syncs_it() {
        // Zeroing an allocated cluster writes no data, only its L2 entry; once a write-back
        // has put that entry in the file nothing is dirty, and the next flush must still sync.
        let (host, img) = image();
        img.write_at(&[0xaa; CS as usize], 2 * CS).unwrap();
        img.flush().unwrap();
        img.write_zeroes(2 * CS, CS, false).unwrap();
        img.write_back().unwrap();
        assert_eq!(written_cluster(&host, 2), vec![0u8; CS as usize]);
        img.flush().unwrap();
        assert_eq!(durable_cluster(&host, 2), vec![0u8; CS as usize]);
    }

    #[test]
    fn a_write_back_applies_no_free_before_the_l2_table_that_dropped_it_is_durable() {
        // Discarding an allocated cluster frees it once no durable L2 table names it; a
        // write-back leaves that L2 table unsynced, so the refcount must not drop yet: a
        // crash would otherwise leave a durable table naming a cluster counted free.
        let (host, img) = image();
        img.write_at(&[0xaa; CS as usize], CS).unwrap();
        img.flush().unwrap();
        let cluster = match img.lock().entry(&img.io, 1).unwrap() {
            L2Entry::Normal { host, .. } => host,
            e => panic!("guest cluster 1 is not allocated: {e:?}"),
        };
        let count = |img: &QcowImage| img.lock().refcount(&img.io, cluster).unwrap();
        img.discard(CS, CS).unwrap();
        img.write_back().unwrap();
        // Still counted (so not reusable) after the write-back; free once flushes made the
        // L2 table durable.
        assert_eq!(count(&img), 1, "a write-back applied a free");
        let durable = host.durable.lock().unwrap().clone();
        let written = host.file.contents();
        // The durable file still names the cluster, and counts it.
        assert_eq!(cluster_of(durable, 1), vec![0xaa; CS as usize]);
        assert_eq!(durable_check(&host), (0, 0));
        // What a restarted process reads has the discard; at worst a leak until the flush.
        assert_eq!(cluster_of(written, 1), vec![0u8; CS as usize]);
        img.flush().unwrap();
        assert_eq!(count(&img), 0);
        img.flush().unwrap();
        assert_eq!(durable_check(&host), (0, 0));
    }

    #[test]
    fn a_flush_makes_data_and_its_refcount_block_durable_with_one_sync() {
        // Each sync of a flush is a device cache flush and holds the file system's journal;
        // the data and the counts of its clusters need no order between them.
        let (host, img) = image();
        img.flush().unwrap();
        img.write_at(&[0xaa; CS as usize], 0).unwrap();
        let before = host.syncs.load(Ordering::SeqCst);
        img.flush().unwrap();
        assert_eq!(host.syncs.load(Ordering::SeqCst) - before, FLUSH_SYNCS);
        assert_eq!(durable_cluster(&host, 0), vec![0xaa; CS as usize]);
    }

    #[test]
    fn an_allocating_write_and_a_metadata_read_complete_while_a_flush_is_inside_fdatasync() {
        for parked_sync in 1..=FLUSH_SYNCS {
            let (host, img) = image();
            img.write_at(&[0xaa; CS as usize], 0).unwrap();
            let (parked_tx, parked_rx) = channel();
            let (go_tx, go_rx) = channel();
            let base = host.syncs.load(Ordering::SeqCst);
            *host.park.lock().unwrap() = Some((base + parked_sync, parked_tx, go_rx));
            let flusher = {
                let img = img.clone();
                std::thread::spawn(move || img.flush())
            };
            parked_rx
                .recv_timeout(Duration::from_secs(10))
                .unwrap_or_else(|_| panic!("the flush made fewer than {parked_sync} syncs"));
            // The flush is parked inside its sync number `parked_sync`.
            let (done_tx, done_rx) = channel();
            let worker = {
                let img = img.clone();
                std::thread::spawn(move || {
                    // Allocates cluster 5: the allocator, refcounts and the same L2 table.
                    img.write_at(&[0xbb; CS as usize], 5 * CS).unwrap();
                    let mut b = vec![0u8; CS as usize];
                    img.read_at(&mut b, 0).unwrap();
                    done_tx.send(b).unwrap();
                })
            };
            let seen = done_rx.recv_timeout(Duration::from_secs(5));
            go_tx.send(()).unwrap();
            flusher.join().unwrap().unwrap();
            worker.join().unwrap();
            let seen = seen.unwrap_or_else(|_| {
                panic!("a write and a read waited for the flush's sync number {parked_sync}")
            });
            assert_eq!(seen, vec![0xaa; CS as usize]);
            // The flush that returned made its write durable; the write that ran during it
            // becomes durable with the next flush, and the image stays consistent throughout.
            assert_eq!(durable_cluster(&host, 0), vec![0xaa; CS as usize]);
            img.flush().unwrap();
            assert_eq!(durable_cluster(&host, 5), vec![0xbb; CS as usize]);
            assert_eq!(durable_cluster(&host, 0), vec![0xaa; CS as usize]);
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("durable.qcow2");
            std::fs::write(&path, &*host.durable.lock().unwrap()).unwrap();
            let report = crate::check::check(&path, None).unwrap();
            assert_eq!(
                (report.corruptions, report.leaks),
                (0, 0),
                "sync {parked_sync}: {:?}",
                report.messages
            );
        }
    }

    #[test]
    fn a_flush_leaves_nothing_dirty_it_wrote_so_the_next_flush_writes_nothing() {
        // 512-byte clusters with 16-bit refcounts: one refcount block counts 128 KiB of the
        // file, so 512 KiB of data needs new refcount blocks and new refcount-table entries.
        // A flush must mark what it wrote clean (when it still equals what was written), or
        // every later flush would write and sync the same metadata again.
        let (host, img) = image_with(512);
        img.write_at(&vec![0xcc; 512 << 10], 0).unwrap();
        img.flush().unwrap();
        let (writes, syncs) = (
            host.writes.load(Ordering::SeqCst),
            host.syncs.load(Ordering::SeqCst),
        );
        img.flush().unwrap();
        assert_eq!(
            (
                host.writes.load(Ordering::SeqCst) - writes,
                host.syncs.load(Ordering::SeqCst) - syncs
            ),
            (0, 0),
            "a flush with nothing new wrote or synced again"
        );
        let durable = MemHost::new(host.durable.lock().unwrap().clone());
        let reopened = QcowImage::open_with(Box::new(durable), true, None).unwrap();
        let mut b = vec![0u8; 512 << 10];
        reopened.read_at(&mut b, 0).unwrap();
        assert!(b.iter().all(|&x| x == 0xcc));
    }
}
