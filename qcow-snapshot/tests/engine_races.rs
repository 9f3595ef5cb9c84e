//! Deterministic interleaving tests for every point where the qcow2 engine (and the replay
//! journal under it) lets another request run while one is between a decision and its I/O.
//!
//! Each test hooks the host file: right after one chosen I/O of the request under test has
//! reached the file (a data read, a copy-on-write cluster write, a flush's L2-table write, a
//! sync, a write not yet journaled), the hook starts the racing operation on another thread and
//! waits until it has finished or [`RACE_WAIT`] has passed (then it is blocked by whatever
//! protects the state, which is the point). Then the hooked request goes on, and the test checks
//! the invariant its name states. Each test also checks that the race really did what it needs
//! (for example that a freed cluster really was reused), so it cannot pass vacuously.
//!
//! Locking model of the test host: one mutex around the current and the durable file content;
//! hooks are taken out of their own mutex before they run, so a hook's racer can do I/O on the
//! same host.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use blockdev::{BlockDev, MemDisk};
use qcow_snapshot::host::ReplayHost;
use qcow_snapshot::{create_on, CreateOptions, Format, HostFile, Mapping, MemHost, QcowImage};

/// How long a hook waits for its racer before letting the hooked request go on.
const RACE_WAIT: Duration = Duration::from_millis(200);

const CS: u64 = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Io {
    Read,
    Write,
    Sync,
}

/// Runs once, right after the first matching I/O (offset and length, when given).
struct Hook {
    io: Io,
    offset: Option<u64>,
    len: Option<usize>,
    run: Box<dyn FnOnce() + Send>,
}

#[derive(Default)]
struct Files {
    current: Vec<u8>,
    durable: Vec<u8>,
}

/// An in-memory image file with "fsyncgate" semantics (a failed sync drops every write since
/// the last good one) and hooks that run after an I/O.
#[derive(Default)]
struct HookHost {
    files: Mutex<Files>,
    fail_syncs: AtomicU32,
    hooks: Mutex<Vec<Hook>>,
}

impl HookHost {
    fn after(
        &self,
        io: Io,
        offset: Option<u64>,
        len: Option<usize>,
        run: impl FnOnce() + Send + 'static,
    ) {
        self.hooks.lock().unwrap().push(Hook {
            io,
            offset,
            len,
            run: Box::new(run),
        });
    }

    fn fire(&self, io: Io, offset: u64, len: usize) {
        let hook = {
            let mut hooks = self.hooks.lock().unwrap();
            hooks
                .iter()
                .position(|h| {
                    h.io == io
                        && h.offset.is_none_or(|o| o == offset)
                        && h.len.is_none_or(|l| l == len)
                })
                .map(|i| hooks.remove(i))
        };
        if let Some(h) = hook {
            (h.run)();
        }
    }

    /// What survives a crash now.
    fn durable(&self) -> Vec<u8> {
        self.files.lock().unwrap().durable.clone()
    }
}

impl HostFile for HookHost {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        {
            let f = self.files.lock().unwrap();
            buf.fill(0);
            if let Some(avail) = f.current.get(offset as usize..) {
                let n = avail.len().min(buf.len());
                buf[..n].copy_from_slice(&avail[..n]);
            }
        }
        self.fire(Io::Read, offset, buf.len());
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        {
            let mut f = self.files.lock().unwrap();
            let end = offset as usize + buf.len();
            if f.current.len() < end {
                f.current.resize(end, 0);
            }
            f.current[offset as usize..end].copy_from_slice(buf);
        }
        self.fire(Io::Write, offset, buf.len());
        Ok(())
    }

    fn sync_data(&self) -> std::io::Result<()> {
        {
            let mut f = self.files.lock().unwrap();
            if self.fail_syncs.load(Ordering::SeqCst) > 0 {
                self.fail_syncs.fetch_sub(1, Ordering::SeqCst);
                f.current = f.durable.clone();
                return Err(std::io::Error::from_raw_os_error(libc::EIO));
            }
            f.durable = f.current.clone();
        }
        self.fire(Io::Sync, 0, 0);
        Ok(())
    }

    fn len(&self) -> std::io::Result<u64> {
        Ok(self.files.lock().unwrap().current.len() as u64)
    }

    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.files.lock().unwrap().current.resize(len as usize, 0);
        Ok(())
    }
}

/// The racing operation of a hook: where the hook leaves its thread for the test to join.
type Racer<T> = Arc<Mutex<Option<JoinHandle<T>>>>;

/// Runs `f` on its own thread, waits until it finished or [`RACE_WAIT`] passed, and leaves the
/// thread in `slot`.
fn race<T: Send + 'static>(slot: &Racer<T>, f: impl FnOnce() -> T + Send + 'static) {
    let t = std::thread::spawn(f);
    let start = Instant::now();
    while !t.is_finished() && start.elapsed() < RACE_WAIT {
        std::thread::sleep(Duration::from_millis(1));
    }
    *slot.lock().unwrap() = Some(t);
}

/// Joins the racer of a hook that must have fired.
fn join<T>(slot: &Racer<T>) -> T {
    let t = slot
        .lock()
        .unwrap()
        .take()
        .expect("the hook never fired: the race did not happen");
    t.join().expect("racer panicked")
}

/// A fresh 1 MiB image with 4 KiB clusters (and `backing` under it) over a hooked host.
fn image(backing: Option<Arc<dyn BlockDev>>) -> (Arc<HookHost>, Arc<QcowImage>) {
    image_with(CS, false, backing)
}

/// A fresh 1 MiB image with clusters of `cs` bytes and, with `extended_l2`, subclusters.
fn image_with(
    cs: u64,
    extended_l2: bool,
    backing: Option<Arc<dyn BlockDev>>,
) -> (Arc<HookHost>, Arc<QcowImage>) {
    let host = Arc::new(HookHost::default());
    create_on(
        &*host,
        &CreateOptions {
            size: 1 << 20,
            cluster_size: cs,
            extended_l2,
            backing: backing
                .as_ref()
                .map(|_| ("base.raw".to_string(), Format::Raw)),
            ..CreateOptions::default()
        },
    )
    .unwrap();
    host.sync_data().unwrap();
    let img = QcowImage::open_with(Box::new(host.clone()), false, backing).unwrap();
    (host, Arc::new(img))
}

/// The host offset guest cluster `gc` (of 4 KiB) is stored at, if it has one.
fn host_of(img: &QcowImage, gc: u64) -> Option<u64> {
    host_of_cs(img, gc, CS)
}

/// The host offset guest cluster `gc` (of `cs` bytes) starts at, if its start is stored.
fn host_of_cs(img: &QcowImage, gc: u64, cs: u64) -> Option<u64> {
    match img.map(gc * cs, cs).unwrap().first().map(|e| e.mapping) {
        Some(Mapping::Data(h)) => Some(h),
        _ => None,
    }
}

fn read(img: &dyn BlockDev, off: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    img.read_at(&mut b, off).unwrap();
    b
}

fn all(b: &[u8], v: u8) -> bool {
    b.iter().all(|&x| x == v)
}

/// Guest clusters 0 and 1 stored in host clusters h0 > h1 (so an operation over both is two
/// I/Os); right after `op`'s `io` at h0 (its mapping of cluster 1 is known, that part not done
/// yet), cluster 1 is discarded, flushed (which frees h1) and cluster 5 is written, which
/// allocates the lowest free cluster: h1. Returns the image once `op` and the racer are done,
/// after checking that the reuse really happened.
fn race_a_stale_mapping(io: Io, op: impl FnOnce(&QcowImage)) -> Arc<QcowImage> {
    let (host, img) = image(None);
    img.write_at(&[0x11; CS as usize], CS).unwrap();
    img.write_at(&[0x10; CS as usize], 0).unwrap();
    img.flush().unwrap();
    let (h0, h1) = (host_of(&img, 0).unwrap(), host_of(&img, 1).unwrap());
    assert!(h1 < h0);
    let racer: Racer<()> = Arc::default();
    let (img2, slot) = (img.clone(), racer.clone());
    host.after(io, Some(h0), Some(CS as usize), move || {
        race(&slot, move || {
            img2.discard(CS, CS).unwrap();
            img2.flush().unwrap();
            img2.write_at(&[0x22; CS as usize], 5 * CS).unwrap();
            img2.flush().unwrap();
        })
    });
    op(&img);
    join(&racer);
    assert_eq!(
        host_of(&img, 5),
        Some(h1),
        "the freed cluster was not reused"
    );
    img
}

#[test]
fn a_read_never_returns_data_of_a_cluster_that_was_freed_and_reused_while_it_read() {
    // A read of guest clusters 0 and 1 races the discard, flush and reuse of cluster 1's host
    // cluster (`race_a_stale_mapping`). It must return cluster 1's old bytes or zeros, never
    // cluster 5's. Protection: the free gate (requests hold it shared; a flush frees clusters
    // only with it held exclusively).
    let mut got = vec![0u8; 2 * CS as usize];
    let img = race_a_stale_mapping(Io::Read, |img| img.read_at(&mut got, 0).unwrap());
    assert!(all(&got[..CS as usize], 0x10));
    let second = &got[CS as usize..];
    assert!(
        all(second, 0x11) || all(second, 0),
        "the read of cluster 1 returned bytes of another guest cluster (first byte {:#x})",
        second[0]
    );
    assert!(all(&read(&*img, CS, CS as usize), 0));
    assert!(all(&read(&*img, 5 * CS, CS as usize), 0x22));
}

#[test]
fn an_in_place_write_never_lands_in_a_cluster_that_was_freed_and_reused_while_it_wrote() {
    // One write over guest clusters 0 and 1 (two in-place writes) races the discard, flush
    // and reuse of cluster 1's host cluster (`race_a_stale_mapping`). Its second half must not
    // land in cluster 5's data. Protection: the free gate.
    let img = race_a_stale_mapping(Io::Write, |img| {
        img.write_at(&[0xee; 2 * CS as usize], 0).unwrap()
    });
    assert!(
        all(&read(&*img, 5 * CS, CS as usize), 0x22),
        "a write through a stale mapping overwrote another guest cluster"
    );
    assert!(all(&read(&*img, 0, CS as usize), 0xee));
    let c1 = read(&*img, CS, CS as usize);
    assert!(all(&c1, 0xee) || all(&c1, 0), "cluster 1: {:#x}", c1[0]);
}

#[test]
fn a_discard_racing_a_cow_write_into_its_kept_host_cluster_never_frees_a_referenced_cluster() {
    // Cluster 3 is zeroed without unmap, so its L2 entry is "zero, host cluster h kept". A
    // write into it is an allocating write that fills h (all of it, or with extended L2
    // entries the subcluster it touches) and only then publishes "data at h". Right after that
    // write reached the file, a discard of cluster 3 runs, then a flush. If the discard did not
    // wait for the allocation in flight, it would queue h for freeing (its entry still says
    // "zero at h") and the write would then publish h: after the flush h is free yet
    // referenced, and the next allocation (cluster 7) overwrites cluster 3.
    // Protection: write-zeroes/discard wait while a cluster of their range is in flight (both
    // the standard and the subcluster zero path).
    for (cs, extended_l2, cow_len) in [(CS, false, CS), (65536, true, 2048)] {
        discard_racing_a_cow_into_its_kept_cluster(cs, extended_l2, cow_len as usize);
    }
}

fn discard_racing_a_cow_into_its_kept_cluster(cs: u64, extended_l2: bool, cow_len: usize) {
    let what = format!("cluster size {cs}, extended L2 {extended_l2}");
    let (host, img) = image_with(cs, extended_l2, None);
    img.write_at(&vec![0x11; cs as usize], 3 * cs).unwrap();
    img.flush().unwrap();
    let h = host_of_cs(&img, 3, cs).unwrap();
    img.write_zeroes(3 * cs, cs, false).unwrap();
    assert_eq!(img.map(3 * cs, cs).unwrap()[0].mapping, Mapping::Zero);
    let racer: Racer<()> = Arc::default();
    let (img2, slot) = (img.clone(), racer.clone());
    host.after(Io::Write, Some(h), Some(cow_len), move || {
        race(&slot, move || {
            img2.discard(3 * cs, cs).unwrap();
            img2.flush().unwrap();
        })
    });
    img.write_at(&[0xaa; 512], 3 * cs).unwrap();
    join(&racer);
    img.flush().unwrap();
    img.write_at(&vec![0x22; cs as usize], 7 * cs).unwrap();
    img.flush().unwrap();
    let c3 = read(&*img, 3 * cs, cs as usize);
    let written = all(&c3[..512], 0xaa) && all(&c3[512..], 0);
    assert!(
        all(&c3, 0) || written,
        "{what}: cluster 3 reads neither the discard's zeros nor the write (first byte {:#x})",
        c3[0]
    );
    assert!(all(&read(&*img, 7 * cs, cs as usize), 0x22), "{what}");
    if let Some(h3) = host_of_cs(&img, 3, cs) {
        assert_ne!(
            Some(h3),
            host_of_cs(&img, 7, cs),
            "{what}: clusters 3 and 7 share a host cluster"
        );
    }
    img.close().unwrap();
}

#[test]
fn a_write_racing_a_cow_of_its_cluster_waits_for_it_and_neither_write_is_lost() {
    // A first write into cluster 2 copies the cluster from the backing file into a new host
    // cluster. Right after that copy reached the file (the L2 entry still says "unallocated"),
    // a second write into another part of the same cluster runs. It must wait for the first
    // and then write into the cluster it allocated; planning its own copy from the backing
    // file would lose one of the two writes. Protection: the in-flight allocation table.
    let base: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8).collect();
    let backing: Arc<dyn BlockDev> = Arc::new(MemDisk::from_vec(base.clone()));
    let (host, img) = image(Some(backing));
    let racer: Racer<()> = Arc::default();
    let (img2, slot) = (img.clone(), racer.clone());
    // The copy-on-write is the first cluster-sized write: nothing else is written before a flush.
    host.after(Io::Write, None, Some(CS as usize), move || {
        race(&slot, move || {
            img2.write_at(&[0xbb; 512], 2 * CS + 2048).unwrap()
        })
    });
    img.write_at(&[0xaa; 512], 2 * CS).unwrap();
    join(&racer);
    let mut want = base[2 * CS as usize..3 * CS as usize].to_vec();
    want[..512].fill(0xaa);
    want[2048..2560].fill(0xbb);
    let got = read(&*img, 2 * CS, CS as usize);
    assert!(all(&got[..512], 0xaa), "the copy-on-write was lost");
    assert!(all(&got[2048..2560], 0xbb), "the racing write was lost");
    assert_eq!(got, want, "the rest of the cluster is not the backing data");
    img.flush().unwrap();
    // One host cluster was allocated for the guest cluster.
    assert_eq!(img.clusters_allocated(), 1);
    img.close().unwrap();
}

#[test]
fn a_flush_returns_only_once_every_write_acknowledged_before_it_is_durable_even_mid_flush() {
    // Cluster 0 is written and flushed, so its L2 table is on disk (and the L1 entry naming it).
    // Write A allocates cluster 1 (dirty L2 table). Flush F0 writes the L2 table; right after
    // that write (before F0's sync and before it marks the table clean):
    // - flush F1 runs: when it returns, A must be durable (F1 may not return early because F0
    //   is still busy with A's metadata);
    // - then write B allocates cluster 2 in the same L2 table, write C overwrites cluster 0 in
    //   place and discard D drops cluster 3; once they and F0 are done, flush F2 runs: when it
    //   returns, A, B, C and D must be durable (F0 may not mark clean a table B or D changed
    //   after F0 wrote it, nor F2 skip C's data sync);
    // - afterwards cluster 9 reuses cluster 3's old host cluster, and a flush must leave
    //   cluster 3 reading zeros, not cluster 9's data.
    // Protection: the metadata lock held across the flush's metadata write-back, and frees
    // applied only after the flush that wrote the entries dropping them.
    let (host, img) = image(None);
    img.write_at(&[0x10; CS as usize], 0).unwrap();
    img.write_at(&[0x33; CS as usize], 3 * CS).unwrap();
    img.flush().unwrap();
    let h3 = host_of(&img, 3).unwrap();
    let durable = host.durable();
    let l1 = u64::from_be_bytes(durable[40..48].try_into().unwrap());
    let l1e = u64::from_be_bytes(durable[l1 as usize..l1 as usize + 8].try_into().unwrap());
    let l2 = l1e & 0x00ff_ffff_ffff_fe00;
    assert_ne!(l2, 0);
    img.write_at(&[0xaa; CS as usize], CS).unwrap();
    let (f1, bcd): (Racer<Vec<u8>>, Racer<()>) = Default::default();
    let (img2, host2, slot1, slot2) = (img.clone(), host.clone(), f1.clone(), bcd.clone());
    host.after(Io::Write, Some(l2), Some(CS as usize), move || {
        let img3 = img2.clone();
        race(&slot1, move || {
            img3.flush().unwrap();
            host2.durable()
        });
        race(&slot2, move || {
            img2.write_at(&[0xbb; CS as usize], 2 * CS).unwrap();
            img2.write_at(&[0xcc; 512], 0).unwrap();
            img2.discard(3 * CS, CS).unwrap();
        });
    });
    img.flush().unwrap();
    let at_f1 = join(&f1);
    join(&bcd);
    img.flush().unwrap();
    let at_f2 = host.durable();
    let crashed = |d: Vec<u8>| QcowImage::open_with(Box::new(MemHost::new(d)), true, None).unwrap();
    let after_f1 = crashed(at_f1);
    assert!(
        all(&read(&after_f1, CS, CS as usize), 0xaa),
        "a flush returned before write A (acknowledged before it) was durable"
    );
    let after_f2 = crashed(at_f2);
    let c0 = read(&after_f2, 0, CS as usize);
    assert!(all(&c0[..512], 0xcc), "in-place write C is not durable");
    assert!(all(&c0[512..], 0x10));
    assert!(
        all(&read(&after_f2, CS, CS as usize), 0xaa),
        "write A is not durable"
    );
    assert!(
        all(&read(&after_f2, 2 * CS, CS as usize), 0xbb),
        "write B is not durable"
    );
    assert!(
        all(&read(&after_f2, 3 * CS, CS as usize), 0),
        "discard D is not durable"
    );
    img.write_at(&[0x99; CS as usize], 9 * CS).unwrap();
    img.flush().unwrap();
    assert_eq!(
        host_of(&img, 9),
        Some(h3),
        "the freed cluster was not reused"
    );
    let after_reuse = crashed(host.durable());
    assert!(all(&read(&after_reuse, 3 * CS, CS as usize), 0));
    assert!(all(&read(&after_reuse, 9 * CS, CS as usize), 0x99));
    img.close().unwrap();
}

type Journaled = ReplayHost<Arc<HookHost>>;

#[test]
fn a_write_journaled_while_a_sync_runs_is_replayed_when_a_later_sync_fails() {
    // Right after a sync reached the file (before it forgets the journal), write W runs to the
    // end. W is not covered by that sync, so it must stay in the journal: the next sync fails
    // and drops W's page, and only the replay can make W durable. Protection: a sync forgets
    // only the changes journaled before it started.
    let host = Arc::new(HookHost::default());
    let h: Arc<Journaled> = Arc::new(ReplayHost::new(host.clone()));
    h.write_at(&[1; 8], 0).unwrap();
    h.sync_data().unwrap();
    h.write_at(&[3; 4], 0).unwrap();
    let racer: Racer<()> = Arc::default();
    let (h2, slot) = (h.clone(), racer.clone());
    host.after(Io::Sync, None, None, move || {
        race(&slot, move || h2.write_at(&[2; 4], 16).unwrap())
    });
    h.sync_data().unwrap();
    join(&racer);
    host.fail_syncs.store(1, Ordering::SeqCst);
    h.sync_data().unwrap();
    assert!(!h.is_poisoned());
    let d = host.durable();
    assert_eq!(d.get(..4), Some(&[3u8; 4][..]));
    assert_eq!(
        d.get(16..20),
        Some(&[2u8; 4][..]),
        "a write acknowledged before a sync was lost"
    );
}

#[test]
fn a_write_in_the_file_but_not_yet_journaled_when_a_sync_fails_is_replayed() {
    // Write W has reached the file and is not journaled yet when another thread's sync fails
    // and drops W's page. The replay that repairs the failure must include W (wait for it to be
    // journaled), or the sync reports success while W, acknowledged right after, is gone.
    // Protection: the replay holds the journal's I/O lock exclusively.
    let host = Arc::new(HookHost::default());
    let h: Arc<Journaled> = Arc::new(ReplayHost::new(host.clone()));
    h.write_at(&[1; 8], 0).unwrap();
    h.sync_data().unwrap();
    let racer: Racer<std::io::Result<()>> = Arc::default();
    let (h2, host2, slot) = (h.clone(), host.clone(), racer.clone());
    host.after(Io::Write, Some(16), None, move || {
        host2.fail_syncs.store(1, Ordering::SeqCst);
        race(&slot, move || h2.sync_data())
    });
    h.write_at(&[2; 4], 16).unwrap();
    join(&racer).expect("the replay repairs the failed sync");
    assert!(!h.is_poisoned());
    h.sync_data().unwrap();
    assert_eq!(
        host.durable().get(16..20),
        Some(&[2u8; 4][..]),
        "a write acknowledged after a repaired sync failure was lost"
    );
}

#[test]
fn a_batch_write_is_invisible_until_published_and_a_racing_write_into_its_clusters_waits() {
    // A batch plans its writes under the metadata lock, drops the lock for the data writes of
    // all of them, and publishes their L2 entries under the lock again. Right after the first
    // data write of the batch reached the file: a read of that guest range still sees the
    // backing data (nothing is published yet), and a write into another part of the same fresh
    // cluster waits for the batch (it would otherwise copy the cluster from the backing file
    // and lose the batch's bytes). Both kinds of overlay: with subclusters the batch's 4 KiB
    // writes are whole subclusters written from the caller's buffer, without, copy-on-write.
    for extended_l2 in [false, true] {
        let cs = 65536u64;
        let base: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8).collect();
        let backing: Arc<dyn BlockDev> = Arc::new(MemDisk::from_vec(base.clone()));
        let (host, img) = image_with(cs, extended_l2, Some(backing));
        let reader: Racer<Vec<u8>> = Arc::default();
        let writer: Racer<()> = Arc::default();
        let writer_waited = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (img2, img3) = (img.clone(), img.clone());
        let (rslot, wslot, waited) = (reader.clone(), writer.clone(), writer_waited.clone());
        // Without subclusters the two clusters the batch copies on write are next to each
        // other in the file and go down as one write.
        let first_len = if extended_l2 { 4096 } else { 2 * cs as usize };
        host.after(Io::Write, None, Some(first_len), move || {
            race(&rslot, move || read(&*img2, 0, 4096));
            race(&wslot, move || img3.write_at(&[0xcc; 4096], 8192).unwrap());
            waited.store(
                !wslot.lock().unwrap().as_ref().unwrap().is_finished(),
                Ordering::SeqCst,
            );
        });
        let (a, b) = (vec![0xaau8; 4096], vec![0xbbu8; 4096]);
        let results = img.write_batch(&[(&a[..], 0), (&b[..], 3 * cs)]);
        assert!(results.iter().all(|r| r.is_ok()), "{results:?}");
        let seen = join(&reader);
        assert_eq!(
            seen,
            base[..4096],
            "extended_l2={extended_l2}: a read saw the batch's data before it was published"
        );
        join(&writer);
        assert!(
            writer_waited.load(Ordering::SeqCst),
            "extended_l2={extended_l2}: the racing write into the batch's cluster did not wait"
        );
        let mut want = base[..cs as usize].to_vec();
        want[..4096].fill(0xaa);
        want[8192..12288].fill(0xcc);
        assert_eq!(
            read(&*img, 0, cs as usize),
            want,
            "extended_l2={extended_l2}"
        );
        assert!(all(&read(&*img, 3 * cs, 4096), 0xbb));
        assert_eq!(img.clusters_allocated(), 2, "extended_l2={extended_l2}");
        img.flush().unwrap();
        img.close().unwrap();
    }
}

#[test]
fn a_batch_answers_each_write_alone_and_retries_a_part_another_write_of_it_was_allocating() {
    // Two writes of one batch into one fresh cluster: the second finds the cluster in flight
    // (planned by the first) and is written after the batch published it. An out-of-range
    // write fails alone; an empty one succeeds.
    for extended_l2 in [false, true] {
        let cs = 65536u64;
        let base: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8).collect();
        let backing: Arc<dyn BlockDev> = Arc::new(MemDisk::from_vec(base.clone()));
        let (host, img) = image_with(cs, extended_l2, Some(backing.clone()));
        let (a, b) = (vec![0x01u8; 4096], vec![0x02u8; 6000]);
        let results = img.write_batch(&[
            (&a[..], cs),
            (&b[..], cs + 20000),
            (&a[..], 1 << 20),
            (&[][..], 0),
        ]);
        assert!(results[0].is_ok() && results[1].is_ok() && results[3].is_ok());
        assert!(
            matches!(results[2], Err(blockdev::BlockError::OutOfRange { .. })),
            "{:?}",
            results[2]
        );
        let mut want = base[cs as usize..2 * cs as usize].to_vec();
        want[..4096].fill(0x01);
        want[20000..26000].fill(0x02);
        assert_eq!(
            read(&*img, cs, cs as usize),
            want,
            "extended_l2={extended_l2}"
        );
        assert_eq!(img.clusters_allocated(), 1, "extended_l2={extended_l2}");
        img.flush().unwrap();
        img.close().unwrap();
        drop(img);
        // A read-only image refuses every write of a batch, each with its own error.
        let ro = QcowImage::open_with(Box::new(host.clone()), true, Some(backing)).unwrap();
        let refused = ro.write_batch(&[(&a[..], 0), (&b[..], cs)]);
        assert_eq!(refused.len(), 2);
        assert!(
            refused
                .iter()
                .all(|r| matches!(r, Err(blockdev::BlockError::ReadOnly))),
            "{refused:?}"
        );
    }
}
