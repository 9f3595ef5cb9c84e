//! Tests of the crash journal: a "crash" drops the journal and every unflushed write of the
//! lower layer (a [`Volatile`] disk keeps writes in memory until `flush`), then a new journal
//! over what was durable replays.

use super::*;
use blockdev::MemDisk;
use std::sync::atomic::AtomicUsize;
use std::sync::mpsc;
use std::time::Duration;

const SIZE: usize = 4 << 20;

/// A disk whose writes become durable only at `flush` (like the folio cache plus qcow2
/// metadata in memory): `durable()` is what survives a crash.
struct Volatile {
    live: MemDisk,
    durable: Mutex<Vec<u8>>,
    flushes: AtomicUsize,
    /// Called inside `write_at`, after the write reached `live` (the lower I/O).
    hook: Mutex<Option<Box<dyn FnMut() + Send>>>,
    /// Called inside `flush`, after what was written before it became durable.
    flush_hook: Mutex<Option<Box<dyn FnMut() + Send>>>,
}

impl Volatile {
    fn new(content: Vec<u8>) -> Arc<Self> {
        Arc::new(Volatile {
            live: MemDisk::from_vec(content.clone()),
            durable: Mutex::new(content),
            flushes: AtomicUsize::new(0),
            hook: Mutex::new(None),
            flush_hook: Mutex::new(None),
        })
    }
    fn durable(&self) -> Vec<u8> {
        self.durable.lock().unwrap().clone()
    }
}

impl BlockDev for Volatile {
    fn size(&self) -> u64 {
        self.live.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.live.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.live.write_at(buf, offset)?;
        let hook = self.hook.lock().unwrap().take();
        if let Some(mut h) = hook {
            h();
        }
        Ok(())
    }
    fn flush(&self) -> Result<()> {
        *self.durable.lock().unwrap() = self.live.snapshot();
        self.flushes.fetch_add(1, Ordering::SeqCst);
        let hook = self.flush_hook.lock().unwrap().take();
        if let Some(mut h) = hook {
            h();
        }
        Ok(())
    }
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.live.discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        self.live.write_zeroes(offset, len, unmap)
    }
}

fn ident(n: u64) -> Identity {
    Identity {
        path: format!("/images/{n}.qcow2"),
        dev: 1,
        ino: n,
    }
}

fn open(lower: Arc<Volatile>, path: &Path, id: &Identity, seg: u64) -> (Journal, Recovery) {
    Journal::open(lower, path, id, seg).unwrap()
}

/// Crash: drop the journal without flushing; a new lower from what was durable; reopen.
fn crash_and_restart(
    j: Journal,
    lower: &Volatile,
    path: &Path,
    id: &Identity,
) -> (Journal, Arc<Volatile>, Recovery) {
    drop(j);
    let after = Volatile::new(lower.durable());
    let (j, rec) = open(after.clone(), path, id, 1 << 20);
    (j, after, rec)
}

/// A fresh journal (in a temporary directory) over a zeroed [`Volatile`] disk.
fn fresh() -> (tempfile::TempDir, PathBuf, Arc<Volatile>, Journal) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("j");
    let lower = Volatile::new(vec![0; SIZE]);
    let (j, rec) = open(lower.clone(), &path, &ident(1), 1 << 20);
    assert_eq!(rec.replayed, 0);
    assert!(rec.refused.is_none());
    (dir, path, lower, j)
}

/// A hook that says it was reached, then waits until released.
fn gate() -> (
    Box<dyn FnMut() + Send>,
    mpsc::Receiver<()>,
    mpsc::Sender<()>,
) {
    let (reached_tx, reached_rx) = mpsc::channel::<()>();
    let (release_tx, release_rx) = mpsc::channel::<()>();
    let hook = Box::new(move || {
        reached_tx.send(()).unwrap();
        release_rx.recv().unwrap();
    });
    (hook, reached_rx, release_tx)
}

fn read(dev: &dyn BlockDev, off: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0; len];
    dev.read_at(&mut b, off).unwrap();
    b
}

#[test]
fn every_acknowledged_write_survives_a_daemon_crash_through_replay() {
    let (_dir, path, lower, j) = fresh();
    j.write_at(&[1; 4096], 0).unwrap();
    j.flush().unwrap();
    j.write_at(&[2; 512], 512).unwrap();
    j.write_at(&[3; 8192], 65536).unwrap();
    j.write_zeroes(65536 + 4096, 512, false).unwrap();
    j.discard(1 << 20, 65536).unwrap();
    let want = read(&*lower, 0, SIZE);
    let (j2, after, rec) = crash_and_restart(j, &lower, &path, &ident(1));
    assert_eq!(
        rec.replayed, 4,
        "the flushed write was trimmed, the four later ones replayed"
    );
    assert!(rec.refused.is_none());
    assert_eq!(read(&*after, 0, SIZE), want);
    assert_eq!(
        after.durable(),
        want,
        "the replay is flushed before serving"
    );
    // And the journal is empty again: another crash replays nothing.
    let (_j3, _a, rec) = crash_and_restart(j2, &after, &path, &ident(1));
    assert_eq!(rec.replayed, 0);
}

#[test]
fn a_full_segment_forces_a_flush_and_nothing_acknowledged_is_lost() {
    let (_dir, path, lower, j) = fresh();
    for i in 0..48u64 {
        j.write_at(&[i as u8 + 1; 65536], i * 65536).unwrap();
    }
    assert!(
        lower.flushes.load(Ordering::SeqCst) >= 2,
        "segments of 1 MiB must have been flushed"
    );
    let want = read(&*lower, 0, SIZE);
    let (_j, after, rec) = crash_and_restart(j, &lower, &path, &ident(1));
    assert!(rec.replayed < 48, "flushed records were trimmed");
    assert_eq!(read(&*after, 0, SIZE), want);
}

#[test]
fn a_journal_of_another_image_refuses_writes_and_keeps_its_records() {
    let (_dir, path, lower, j) = fresh();
    j.write_at(&[7; 512], 0).unwrap();
    drop(j);
    let other = Volatile::new(vec![0; SIZE]);
    let (j, rec) = open(other.clone(), &path, &ident(2), 1 << 20);
    let why = rec.refused.expect("refused");
    assert!(
        why.contains("/images/1.qcow2") && why.contains("/images/2.qcow2"),
        "{why}"
    );
    assert!(j.write_at(&[1; 512], 0).is_err());
    assert!(j.flush().is_err());
    assert_eq!(read(&j, 0, 512), vec![0; 512], "reads are served");
    drop(j);
    // The records are still there for the right image.
    let (_j, rec) = open(lower.clone(), &path, &ident(1), 1 << 20);
    assert_eq!(rec.replayed, 1);
    assert_eq!(read(&*lower, 0, 512), vec![7; 512]);
}

#[test]
fn a_torn_journal_header_refuses_writes_with_the_reason() {
    let (_dir, path, _lower, j) = fresh();
    j.write_at(&[7; 512], 0).unwrap();
    drop(j);
    let f = OpenOptions::new().write(true).open(&path).unwrap();
    f.write_all_at(b"garbage", 20).unwrap();
    let (j, rec) = open(Volatile::new(vec![0; SIZE]), &path, &ident(1), 1 << 20);
    assert!(
        rec.refused.as_deref().unwrap().contains("torn header"),
        "{rec:?}"
    );
    assert!(j.write_at(&[1; 512], 0).is_err());
    assert!(j.discard(0, 512).is_err());
}

#[test]
fn an_unfinished_record_at_the_tail_is_dropped_and_the_ones_before_replayed() {
    let (_dir, path, _lower, j) = fresh();
    j.write_at(&[1; 512], 0).unwrap();
    j.write_at(&[2; 512], 512).unwrap();
    let tail = { j.lock_state().tail[0] };
    drop(j);
    // A third record whose data was only partly written when the daemon died.
    let f = OpenOptions::new().write(true).open(&path).unwrap();
    let at = FILE_HEADER + SEG_HEADER + tail;
    let data = [3u8; 512];
    f.write_all_at(
        &encode_record_header(Kind::Write, 3, 1, 1024, 512, &data),
        at,
    )
    .unwrap();
    f.write_all_at(&data[..100], at + REC_HEADER as u64)
        .unwrap();
    let after = Volatile::new(vec![0; SIZE]);
    let (_j, rec) = open(after.clone(), &path, &ident(1), 1 << 20);
    assert_eq!(rec.replayed, 2);
    assert!(rec.refused.is_none());
    assert_eq!(
        read(&*after, 0, 1536),
        [vec![1; 512], vec![2; 512], vec![0; 512]].concat()
    );
}

/// Deterministic interleaving of the lock held across "append + lower write": a second write to
/// the same range, started while the first is inside its lower write, must neither append its
/// record nor reach the lower layer before the first is done; so the replay order (journal)
/// equals the order the lower layer saw.
#[test]
fn overlapping_writes_reach_the_journal_and_the_lower_layer_in_the_same_order() {
    let (_dir, path, lower, j) = fresh();
    let j = Arc::new(j);
    let (hook, in_lower_rx, release_tx) = gate();
    *lower.hook.lock().unwrap() = Some(hook);
    let a = {
        let j = Arc::clone(&j);
        std::thread::spawn(move || j.write_at(&[0xaa; 4096], 0).unwrap())
    };
    in_lower_rx.recv().unwrap();
    let b = {
        let j = Arc::clone(&j);
        std::thread::spawn(move || j.write_at(&[0xbb; 512], 1024).unwrap())
    };
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        j.lock_state().next_seq,
        2,
        "the racing write appended while the first was in its lower write"
    );
    assert_eq!(read(&*lower, 1024, 512), vec![0xaa; 512]);
    release_tx.send(()).unwrap();
    a.join().unwrap();
    b.join().unwrap();
    assert_eq!(read(&*lower, 1024, 512), vec![0xbb; 512]);
    let want = read(&*lower, 0, SIZE);
    let j = Arc::try_unwrap(j).unwrap();
    let (_j, after, rec) = crash_and_restart(j, &lower, &path, &ident(1));
    assert_eq!(rec.replayed, 2);
    assert_eq!(read(&*after, 0, SIZE), want);
}

/// A flush drops the lock before the lower flush: a write that appends to the new segment
/// while the lower flush runs is kept (not trimmed with the old segment).
#[test]
fn a_write_racing_a_flush_stays_in_the_journal() {
    let (_dir, path, lower, j) = fresh();
    let (hook, in_flush_rx, release_tx) = gate();
    *lower.flush_hook.lock().unwrap() = Some(hook);
    let j = Arc::new(j);
    j.write_at(&[1; 512], 0).unwrap();
    let f = {
        let j = Arc::clone(&j);
        std::thread::spawn(move || j.flush().unwrap())
    };
    in_flush_rx.recv().unwrap();
    // Inside the lower flush: this write is not covered by it.
    j.write_at(&[2; 512], 512).unwrap();
    release_tx.send(()).unwrap();
    f.join().unwrap();
    let j = Arc::try_unwrap(j).unwrap();
    let (_j, after, rec) = crash_and_restart(j, &lower, &path, &ident(1));
    assert_eq!(rec.replayed, 1);
    assert_eq!(
        read(&*after, 0, 1024),
        [vec![1; 512], vec![2; 512]].concat()
    );
}

/// A live snapshot makes a new file the top: the journal then belongs to it, so a daemon
/// restarted on the new top replays, and one started on the frozen image refuses.
#[test]
fn after_a_live_snapshot_the_journal_belongs_to_the_new_top() {
    let dir = tempfile::tempdir().unwrap();
    let (old, new) = (dir.path().join("old.qcow2"), dir.path().join("new.qcow2"));
    std::fs::write(&old, b"x").unwrap();
    std::fs::write(&new, b"y").unwrap();
    let (old_id, new_id) = (Identity::of(&old).unwrap(), Identity::of(&new).unwrap());
    let path = dir.path().join("j");
    let lower = Volatile::new(vec![0; SIZE]);
    let (j, _) = open(lower.clone(), &path, &old_id, 1 << 20);
    j.write_at(&[1; 512], 0).unwrap();
    j.rebind(&new);
    j.write_at(&[2; 512], 512).unwrap();
    drop(j);
    let (_j, rec) = open(Volatile::new(vec![0; SIZE]), &path, &old_id, 1 << 20);
    assert!(
        rec.refused.is_some(),
        "the frozen image must not take the new top's writes"
    );
    let after = Volatile::new(lower.durable());
    let (_j, rec) = open(after.clone(), &path, &new_id, 1 << 20);
    assert_eq!(rec.replayed, 2);
    assert_eq!(
        read(&*after, 0, 1024),
        [vec![1; 512], vec![2; 512]].concat()
    );
}

/// The request that fills the active segment past its half trims it (switch, flush, empty),
/// so writers do not all wait when the segment is full.
#[test]
fn a_half_full_segment_is_trimmed_by_the_request_that_filled_it() {
    let (_dir, path, lower, j) = fresh();
    // 7 records of 64 KiB + header stay under half of a 1 MiB segment, the 8th crosses it.
    for i in 0..7u64 {
        j.write_at(&[1; 65536], i * 65536).unwrap();
    }
    assert_eq!(lower.flushes.load(Ordering::SeqCst), 0);
    j.write_at(&[2; 65536], 7 * 65536).unwrap();
    assert_eq!(lower.flushes.load(Ordering::SeqCst), 1);
    {
        let st = j.lock_state();
        assert_eq!(st.active, 1, "writers moved to the other segment");
        assert_eq!(st.tail[0], 0, "the trimmed segment is empty");
    }
    let want = read(&*lower, 0, SIZE);
    let (_j, after, rec) = crash_and_restart(j, &lower, &path, &ident(1));
    assert_eq!(rec.replayed, 0);
    assert_eq!(read(&*after, 0, SIZE), want);
}
