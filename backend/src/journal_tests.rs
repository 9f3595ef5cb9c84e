//! Tests of the crash journal: a "crash" drops the journal and every unflushed write of the
//! lower layer (a [`Volatile`] disk keeps writes in memory until `flush`), then a new journal
//! over what was durable replays.

use super::format::{encode_record_header, Record};
use super::*;
use blockdev::MemDisk;
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::mpsc;
use std::time::Duration;

const SIZE: usize = 4 << 20;

/// A disk whose writes become durable only at `flush` (like the folio cache plus qcow2
/// metadata in memory): `durable()` is what survives a crash.
struct Volatile {
    live: MemDisk,
    durable: Mutex<Vec<u8>>,
    flushes: AtomicUsize,
    /// `flush` fails (and makes nothing durable).
    fail_flush: AtomicBool,
    /// Called inside `write_at`, after the write reached `live` (the lower I/O).
    hook: Mutex<Option<Box<dyn FnMut() + Send>>>,
    /// Called inside `flush`, after what was written before it became durable.
    flush_hook: Mutex<Option<Box<dyn FnMut() + Send>>>,
    /// `write_back` is free (a raw file: completed writes are with the kernel already) instead
    /// of the default, a flush; `write_backs` counts its calls then.
    free_write_back: AtomicBool,
    write_backs: AtomicUsize,
    /// The address of every buffer `write_at` was handed, in order.
    write_ptrs: Mutex<Vec<usize>>,
    /// `persists_in_place` says yes, and `write_in_place_persisted` writes into `live` and
    /// `durable` at once (as a raw file's `pwrite` outlives the process); with
    /// `refuse_persist` it says `Ok(false)` and writes nothing, with `fail_persist` it writes
    /// `live` only and fails.
    persist: AtomicBool,
    refuse_persist: AtomicBool,
    fail_persist: AtomicBool,
    /// Called inside `write_in_place_persisted`, after the write is in place (with
    /// `fail_persist`: after the bytes reached `live`, before the write fails).
    persist_hook: Mutex<Option<Box<dyn FnMut() + Send>>>,
    /// Writes persisted in place.
    persisted: AtomicUsize,
    /// Called inside `discard` and `write_zeroes`, after the lower operation.
    zap_hook: Mutex<Option<Box<dyn FnMut() + Send>>>,
    /// A failed `flush` also drops what was not synced (as a failed writeback of a buffered
    /// file may drop its pages): `durable` goes back to what the last successful flush made
    /// durable, `synced`.
    drop_unsynced: AtomicBool,
    synced: Mutex<Vec<u8>>,
    /// The answer of `writes_in_memory`.
    in_memory: AtomicBool,
}

impl Volatile {
    fn new(content: Vec<u8>) -> Arc<Self> {
        Arc::new(Volatile {
            live: MemDisk::from_vec(content.clone()),
            durable: Mutex::new(content.clone()),
            flushes: AtomicUsize::new(0),
            fail_flush: AtomicBool::new(false),
            hook: Mutex::new(None),
            flush_hook: Mutex::new(None),
            free_write_back: AtomicBool::new(false),
            write_backs: AtomicUsize::new(0),
            write_ptrs: Mutex::new(Vec::new()),
            persist: AtomicBool::new(false),
            refuse_persist: AtomicBool::new(false),
            fail_persist: AtomicBool::new(false),
            persist_hook: Mutex::new(None),
            persisted: AtomicUsize::new(0),
            zap_hook: Mutex::new(None),
            drop_unsynced: AtomicBool::new(false),
            synced: Mutex::new(content.clone()),
            in_memory: AtomicBool::new(false),
        })
    }
    fn durable(&self) -> Vec<u8> {
        self.durable.lock().unwrap().clone()
    }
    fn run_zap_hook(&self) {
        let hook = self.zap_hook.lock().unwrap().take();
        if let Some(mut h) = hook {
            h();
        }
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
        self.write_ptrs.lock().unwrap().push(buf.as_ptr() as usize);
        self.live.write_at(buf, offset)?;
        let hook = self.hook.lock().unwrap().take();
        if let Some(mut h) = hook {
            h();
        }
        Ok(())
    }
    fn flush(&self) -> Result<()> {
        let fail = self.fail_flush.load(Ordering::SeqCst);
        if !fail {
            let now = self.live.snapshot();
            *self.synced.lock().unwrap() = now.clone();
            *self.durable.lock().unwrap() = now;
        } else if self.drop_unsynced.load(Ordering::SeqCst) {
            *self.durable.lock().unwrap() = self.synced.lock().unwrap().clone();
        }
        self.flushes.fetch_add(1, Ordering::SeqCst);
        let hook = self.flush_hook.lock().unwrap().take();
        if let Some(mut h) = hook {
            h();
        }
        if fail {
            return Err(BlockError::Io(io::Error::other("injected writeback error")));
        }
        Ok(())
    }
    fn write_back(&self) -> Result<()> {
        if !self.free_write_back.load(Ordering::SeqCst) {
            return self.flush();
        }
        self.write_backs.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.live.discard(offset, len)?;
        self.run_zap_hook();
        Ok(())
    }
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        self.live.write_zeroes(offset, len, unmap)?;
        self.run_zap_hook();
        Ok(())
    }
    fn persists_in_place(&self, _offset: u64, _len: u64) -> bool {
        self.persist.load(Ordering::SeqCst)
    }
    fn writes_in_memory(&self, _offset: u64, _len: u64) -> bool {
        self.in_memory.load(Ordering::SeqCst)
    }
    fn write_in_place_persisted(&self, buf: &[u8], offset: u64) -> Result<bool> {
        if !self.persist.load(Ordering::SeqCst) || self.refuse_persist.load(Ordering::SeqCst) {
            return Ok(false);
        }
        self.live.write_at(buf, offset)?;
        if self.fail_persist.load(Ordering::SeqCst) {
            let hook = self.persist_hook.lock().unwrap().take();
            if let Some(mut h) = hook {
                h();
            }
            return Err(BlockError::Io(io::Error::other("injected write error")));
        }
        let at = offset as usize;
        self.durable.lock().unwrap()[at..at + buf.len()].copy_from_slice(buf);
        self.persisted.fetch_add(1, Ordering::SeqCst);
        let hook = self.persist_hook.lock().unwrap().take();
        if let Some(mut h) = hook {
            h();
        }
        Ok(true)
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
    assert!(
        j.core.map.is_some(),
        "the journal file is mapped where its space can be allocated"
    );
    acknowledged_writes_survive_a_crash(path, lower, j);
}

#[test]
fn records_written_with_pwritev_survive_a_daemon_crash_like_mapped_ones() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("j");
    let lower = Volatile::new(vec![0; SIZE]);
    let (j, _) = Journal::open_with(lower.clone(), &path, &ident(1), 1 << 20, false).unwrap();
    assert!(j.core.map.is_none());
    acknowledged_writes_survive_a_crash(path, lower, j);
}

/// A record is in the file (the host page cache, which outlives a killed process) as soon as
/// its write returns, while the daemon still runs: what a SIGKILL at that moment leaves.
#[test]
fn a_record_is_in_the_journal_file_when_its_write_returns() {
    let (_dir, path, _lower, j) = fresh();
    j.write_at(&[7; 4096], 8192).unwrap();
    j.write_zeroes(65536, 512, false).unwrap();
    let other = File::open(&path).unwrap();
    let records = scan(&other, 1 << 20).unwrap();
    assert_eq!(
        records.len(),
        2,
        "both records, read through another descriptor"
    );
    assert_eq!((records[0].offset, records[0].kind), (8192, Kind::Write));
    assert_eq!(records[0].data, vec![7; 4096]);
    assert_eq!((records[1].offset, records[1].kind), (65536, Kind::Zeroes));
    drop(j);
}

/// A gathered write (the request path's, for a guest's buffers) is filled straight into its
/// record in the mapped journal file, and the layer below is handed the record's own bytes:
/// the record is the one private copy, no buffer of the caller's in between. After a crash it
/// is replayed like any record.
#[test]
fn a_gathered_write_is_filled_into_its_record_and_the_layer_below_writes_from_the_record() {
    let (_dir, path, lower, j) = fresh();
    assert!(j.gathers_writes());
    let (start, end) = {
        let m = j.core.map.as_ref().unwrap();
        let start = m.0.as_ptr() as usize;
        (start, start + m.0.len())
    };
    let data: Vec<u8> = (0..12288u32).map(|i| (i % 251) as u8).collect();
    let mut calls = 0;
    j.write_gathered(8192, data.len(), &mut |dst| {
        calls += 1;
        assert_eq!(dst.len(), data.len());
        dst.copy_from_slice(&data);
        Ok(())
    })
    .unwrap();
    assert_eq!(calls, 1);
    let ptrs = lower.write_ptrs.lock().unwrap().clone();
    assert_eq!(ptrs.len(), 1);
    assert!(
        (start..end).contains(&ptrs[0]),
        "the layer below was handed a buffer outside the journal's mapping"
    );
    assert_eq!(read(&*lower, 8192, data.len()), data);
    let records = scan(&File::open(&path).unwrap(), 1 << 20).unwrap();
    assert_eq!(records.len(), 1);
    assert_eq!((records[0].offset, records[0].kind), (8192, Kind::Write));
    assert_eq!(records[0].data, data);
    let (_j2, after, rec) = crash_and_restart(j, &lower, &path, &ident(1));
    assert_eq!(rec.replayed, 1);
    assert_eq!(read(&*after, 8192, data.len()), data);
}

/// A fill that fails (a guest buffer that cannot be read), even after writing part of the
/// record's room, records nothing and writes nothing below: its reserved room keeps a record
/// whose checksum fails, the next record goes after it, and a crash replays only that one.
#[test]
fn a_gathered_write_whose_fill_fails_records_and_writes_nothing() {
    let (_dir, path, lower, j) = fresh();
    let e = j
        .write_gathered(0, 8192, &mut |dst| {
            dst[..4096].fill(0x66);
            Err(BlockError::Io(io::Error::other("guest memory")))
        })
        .unwrap_err();
    assert!(e.to_string().contains("guest memory"), "{e}");
    assert!(lower.write_ptrs.lock().unwrap().is_empty());
    assert_eq!(read(&*lower, 0, 8192), vec![0; 8192]);
    assert!(scan(&File::open(&path).unwrap(), 1 << 20)
        .unwrap()
        .is_empty());
    j.write_gathered(65536, 512, &mut |dst| {
        dst.fill(0x77);
        Ok(())
    })
    .unwrap();
    let records = scan(&File::open(&path).unwrap(), 1 << 20).unwrap();
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].offset, 65536);
    let (_j2, after, rec) = crash_and_restart(j, &lower, &path, &ident(1));
    assert_eq!(rec.replayed, 1);
    assert_eq!(read(&*after, 0, 8192), vec![0; 8192]);
    assert_eq!(read(&*after, 65536, 512), vec![0x77; 512]);
}

/// Without a mapping (records written with `pwritev`) the journal keeps no memory to gather
/// into: it says so, and a gathered write still works through a buffer.
#[test]
fn without_a_mapping_the_journal_does_not_gather_and_a_gathered_write_still_survives() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("j");
    let lower = Volatile::new(vec![0; SIZE]);
    let (j, _) = Journal::open_with(lower.clone(), &path, &ident(1), 1 << 20, false).unwrap();
    assert!(!j.gathers_writes());
    j.write_gathered(4096, 4096, &mut |dst| {
        dst.fill(0x31);
        Ok(())
    })
    .unwrap();
    let (_j2, after, rec) = crash_and_restart(j, &lower, &path, &ident(1));
    assert_eq!(rec.replayed, 1);
    assert_eq!(read(&*after, 4096, 4096), vec![0x31; 4096]);
}

/// A second daemon on the same journal (another image served on the same socket path) is
/// refused: it would empty the journal of the first one, or replay its records elsewhere.
#[test]
fn a_journal_in_use_by_another_daemon_cannot_be_opened() {
    let (_dir, path, lower, j) = fresh();
    j.write_at(&[1; 512], 0).unwrap();
    let e = Journal::open(Volatile::new(vec![0; SIZE]), &path, &ident(2), 1 << 20).unwrap_err();
    assert!(e.to_string().contains("in use by another process"), "{e}");
    // The first daemon's record is untouched, and its journal keeps working.
    j.write_at(&[2; 512], 512).unwrap();
    let (_j2, after, rec) = crash_and_restart(j, &lower, &path, &ident(1));
    assert_eq!(rec.replayed, 2);
    assert_eq!(read(&*after, 0, 1024), [[1u8; 512], [2u8; 512]].concat());
}

/// The body of the crash tests above: unflushed writes of every kind are replayed after a
/// crash, flushed ones are not, and a second crash replays nothing.
fn acknowledged_writes_survive_a_crash(path: PathBuf, lower: Arc<Volatile>, j: Journal) {
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

/// Over a layer whose completed writes are with the kernel (a raw file), a segment that fills
/// is trimmed by writing back, not by a flush: no `fdatasync` while writes stream without a
/// FLUSH, nothing acknowledged lost when the daemon dies (the kernel keeps what the lower layer
/// holds, and the records not trimmed are replayed), and a guest FLUSH still flushes.
#[test]
fn a_background_trim_writes_back_below_and_only_a_guest_flush_flushes() {
    let (_dir, path, lower, j) = fresh();
    lower.free_write_back.store(true, Ordering::SeqCst);
    let flushes = lower.flushes.load(Ordering::SeqCst);
    let j = Arc::new(j);
    let writer = Arc::clone(&j);
    must_finish("48 writes through two segments of 1 MiB", move || {
        for i in 0..48u64 {
            writer.write_at(&[i as u8 + 1; 65536], i * 65536).unwrap();
        }
    });
    let j = Arc::try_unwrap(j).unwrap_or_else(|_| panic!("the writer is done"));
    assert!(
        lower.write_backs.load(Ordering::SeqCst) >= 2,
        "segments of 1 MiB must have been written back"
    );
    assert_eq!(
        lower.flushes.load(Ordering::SeqCst),
        flushes,
        "a background trim flushed"
    );
    let want = read(&*lower, 0, SIZE);
    // The daemon dies; the host (and what the lower layer handed it) lives on.
    drop(j);
    let after = Volatile::new(lower.live.snapshot());
    let (j, rec) = open(after.clone(), &path, &ident(1), 1 << 20);
    assert!(rec.replayed < 48, "written-back records were trimmed");
    assert_eq!(read(&*after, 0, SIZE), want);
    after.free_write_back.store(true, Ordering::SeqCst);
    j.write_at(&[0xee; 4096], 0).unwrap();
    let flushes = after.flushes.load(Ordering::SeqCst);
    j.flush().unwrap();
    assert_eq!(after.flushes.load(Ordering::SeqCst), flushes + 1);
    assert_eq!(after.durable()[..4096], [0xee; 4096]);
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

/// Starts a gathered write of 8 KiB of 0xee at 0 whose fill parks halfway (its record's room
/// reserved, half its data in the mapping); returns once it is parked, with the sender that
/// lets it finish and its thread.
fn park_a_gathered_fill(
    j: &Arc<Journal>,
) -> (mpsc::Sender<()>, std::thread::JoinHandle<Result<()>>) {
    let (mut hook, in_fill_rx, release_tx) = gate();
    let t = {
        let j = Arc::clone(j);
        std::thread::spawn(move || {
            j.write_gathered(0, 8192, &mut |dst| {
                dst[..4096].fill(0xee);
                hook();
                dst[4096..].fill(0xee);
                Ok(())
            })
        })
    };
    in_fill_rx
        .recv_timeout(MUST)
        .expect("the gathered write never reached its fill");
    (release_tx, t)
}

/// A record's room is reserved under the state lock and its data filled outside it: a write
/// to another range is recorded and acknowledged while an earlier record is still being
/// filled. If the daemon dies then, the replay skips the unfinished record (never
/// acknowledged, its lower write not started) and still replays the acknowledged one after it.
#[test]
fn an_acknowledged_record_after_one_still_being_filled_is_replayed() {
    let (dir, path, lower, j) = fresh();
    let j = Arc::new(j);
    let (release_tx, parked) = park_a_gathered_fill(&j);
    {
        let j = Arc::clone(&j);
        must_finish("a write while another record is being filled", move || {
            j.write_at(&[0x5a; 4096], 1 << 20).unwrap();
        });
    }
    // The daemon dies here: the host keeps the journal file as it is now.
    let frozen = dir.path().join("frozen");
    std::fs::write(&frozen, std::fs::read(&path).unwrap()).unwrap();
    let records = scan(&File::open(&frozen).unwrap(), 1 << 20).unwrap();
    assert_eq!(records.len(), 1, "only the finished record counts");
    assert_eq!((records[0].seq, records[0].offset), (2, 1 << 20));
    release_tx.send(()).unwrap();
    parked.join().unwrap().unwrap();
    let after = Volatile::new(lower.durable());
    let (_j2, rec) = open(after.clone(), &frozen, &ident(1), 1 << 20);
    assert_eq!(rec.replayed, 1);
    assert_eq!(read(&*after, 1 << 20, 4096), vec![0x5a; 4096]);
    assert_eq!(read(&*after, 0, 8192), vec![0; 8192]);
    // Had it lived, both records would be replayed.
    let (_j3, after, rec) = crash_and_restart(
        Arc::try_unwrap(j).unwrap_or_else(|_| panic!("journal still shared")),
        &lower,
        &path,
        &ident(1),
    );
    assert_eq!(rec.replayed, 2);
    assert_eq!(read(&*after, 0, 8192), vec![0xee; 8192]);
}

/// A record header whose own checksum fails is where the appends ended (a header is written
/// whole under the state lock before any later one): the scan stops there and reads no
/// length or record past it, even a whole one.
#[test]
fn a_record_header_that_fails_its_own_checksum_ends_the_segment() {
    let (_dir, path, _lower, j) = fresh();
    j.write_at(&[1; 512], 0).unwrap();
    let tail = { j.lock_state().tail[0] };
    drop(j);
    let f = OpenOptions::new().write(true).open(&path).unwrap();
    let at = FILE_HEADER + SEG_HEADER + tail;
    let data = [3u8; 512];
    let mut torn = encode_record_header(Kind::Write, 2, 1, 1024, 512, &data);
    torn[44] ^= 1;
    f.write_all_at(&torn, at).unwrap();
    f.write_all_at(&data, at + REC_HEADER as u64).unwrap();
    let next = at + (REC_HEADER + data.len()) as u64;
    f.write_all_at(
        &encode_record_header(Kind::Write, 3, 1, 2048, 512, &data),
        next,
    )
    .unwrap();
    f.write_all_at(&data, next + REC_HEADER as u64).unwrap();
    let records = scan(&File::open(&path).unwrap(), 1 << 20).unwrap();
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].seq, 1);
}

/// A journal an earlier daemon wrote (version 1: records written whole under the lock, no
/// header checksum) is still replayed after an upgrade, up to its first record that is not
/// whole.
#[test]
fn a_journal_of_the_previous_version_is_replayed() {
    let (_dir, path, lower, j) = fresh();
    j.write_at(&[1; 512], 0).unwrap();
    j.write_at(&[2; 512], 512).unwrap();
    let tail = { j.lock_state().tail[0] };
    drop(j);
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    // The file header as version 1 wrote it.
    let mut h = vec![0u8; FILE_HEADER as usize];
    f.read_exact_at(&mut h, 0).unwrap();
    h[8..12].copy_from_slice(&format::VERSION_WHOLE_RECORDS.to_le_bytes());
    let plen = u32::from_le_bytes(h[60..64].try_into().unwrap()) as usize;
    let c = format::crc(&[&h[..64 + plen]]);
    h[64 + plen..68 + plen].copy_from_slice(&c.to_le_bytes());
    f.write_all_at(&h, 0).unwrap();
    // Its records had no header checksum; then one whose data is not whole, then a whole one
    // that version 1 never reads past it.
    let seg = FILE_HEADER + SEG_HEADER;
    for at in [seg, seg + (REC_HEADER + 512) as u64] {
        f.write_all_at(&[0; 4], at + 44).unwrap();
    }
    let data = [3u8; 512];
    let mut at = seg + tail;
    let mut unfinished = encode_record_header(Kind::Write, 3, 1, 1024, 512, &data);
    unfinished[44..48].fill(0);
    f.write_all_at(&unfinished, at).unwrap();
    f.write_all_at(&data[..100], at + REC_HEADER as u64)
        .unwrap();
    at += (REC_HEADER + 512) as u64;
    let mut whole = encode_record_header(Kind::Write, 4, 1, 2048, 512, &data);
    whole[44..48].fill(0);
    f.write_all_at(&whole, at).unwrap();
    f.write_all_at(&data, at + REC_HEADER as u64).unwrap();
    let after = Volatile::new(lower.durable());
    let (j2, rec) = open(after.clone(), &path, &ident(1), 1 << 20);
    assert!(rec.refused.is_none(), "{:?}", rec.refused);
    assert_eq!(rec.replayed, 2);
    assert_eq!(
        read(&*after, 0, 2560),
        [vec![1; 512], vec![2; 512], vec![0; 1536]].concat()
    );
    // The journal starts anew in the current version.
    drop(j2);
    let mut v = [0u8; 4];
    File::open(&path).unwrap().read_exact_at(&mut v, 8).unwrap();
    assert_eq!(u32::from_le_bytes(v), format::VERSION);
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
    in_lower_rx
        .recv_timeout(MUST)
        .expect("the first write never reached its lower write");
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
    in_flush_rx
        .recv_timeout(MUST)
        .expect("the flush never reached its lower flush");
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
    let (refusing, rec) = open(Volatile::new(vec![0; SIZE]), &path, &old_id, 1 << 20);
    assert!(
        rec.refused.is_some(),
        "the frozen image must not take the new top's writes"
    );
    drop(refusing);
    let after = Volatile::new(lower.durable());
    let (_j, rec) = open(after.clone(), &path, &new_id, 1 << 20);
    assert_eq!(rec.replayed, 2);
    assert_eq!(
        read(&*after, 0, 1024),
        [vec![1; 512], vec![2; 512]].concat()
    );
}

/// Records of 64 KiB that fit one 1 MiB segment (the next one seals it).
const PER_SEGMENT: u64 = 15;
/// How long a test waits for something that must happen.
const MUST: Duration = Duration::from_secs(10);
/// How long a test waits to see that something does not happen.
const MUST_NOT: Duration = Duration::from_millis(150);

/// Writes record `i` (64 KiB of byte `i + 1` at `i * 64 KiB`).
fn write_nth(j: &Journal, i: u64) {
    j.write_at(&[i as u8 + 1; 65536], i * 65536).unwrap();
}

/// Fills segment 0 and writes one more record, which seals it and wakes the trimmer; returns
/// when the trimmer is parked inside its lower flush (the gate armed on `lower`'s flush).
fn seal_first_segment_and_park_the_trimmer(
    j: &Journal,
    lower: &Volatile,
) -> (mpsc::Receiver<()>, mpsc::Sender<()>) {
    let (hook, in_flush_rx, release_tx) = gate();
    *lower.flush_hook.lock().unwrap() = Some(hook);
    for i in 0..=PER_SEGMENT {
        write_nth(j, i);
    }
    in_flush_rx
        .recv_timeout(MUST)
        .expect("the trimmer flushes the sealed segment");
    {
        let st = j.lock_state();
        assert!(st.sealed && st.trimming && st.active == 1);
    }
    (in_flush_rx, release_tx)
}

/// Seals the first segment with the trimmer parked in its lower flush, fills the second, and
/// starts one more writer, which must be blocked waiting for room; returns the trimmer's release
/// and that writer.
fn fill_both_segments_and_block_a_writer(
    j: &Arc<Journal>,
    lower: &Volatile,
) -> (mpsc::Sender<()>, std::thread::JoinHandle<()>) {
    let (_in_flush, release) = seal_first_segment_and_park_the_trimmer(j, lower);
    for i in PER_SEGMENT + 1..2 * PER_SEGMENT {
        write_nth(j, i);
    }
    let j = Arc::clone(j);
    let writer = blocked("both segments are full", move || {
        write_nth(&j, 2 * PER_SEGMENT)
    });
    (release, writer)
}

/// Runs `f` on a thread; its result within `MUST`, or a panic saying `what`.
fn must_finish<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || tx.send(f()).unwrap());
    rx.recv_timeout(MUST)
        .unwrap_or_else(|_| panic!("{what} did not finish"))
}

/// Runs `f` on a thread that must still be blocked after `MUST_NOT`; returns its handle.
fn blocked<T: Send + 'static>(
    what: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    let t = std::thread::spawn(f);
    std::thread::sleep(MUST_NOT);
    assert!(!t.is_finished(), "{what} did not wait");
    t
}

/// Crashes (see [`crash_and_restart`]) and checks the restarted daemon replayed `replayed`
/// records and reads exactly what the lower layer showed before the crash.
fn crash_and_check(j: Arc<Journal>, lower: &Volatile, path: &Path, replayed: u64, why: &str) {
    let want = read(lower, 0, SIZE);
    let j = Arc::try_unwrap(j).unwrap_or_else(|_| panic!("journal still shared"));
    let (_j, after, rec) = crash_and_restart(j, lower, path, &ident(1));
    assert_eq!(rec.replayed, replayed as usize, "{why}");
    assert_eq!(read(&*after, 0, SIZE), want);
}

/// The trim drops the state lock before its lower flush: writers fill the other segment
/// meanwhile without waiting for it, and the flush empties only the sealed segment (the records
/// written during it stay in the journal).
#[test]
fn writers_fill_the_other_segment_while_the_background_trim_is_in_its_lower_flush() {
    let (_dir, path, lower, j) = fresh();
    let j = Arc::new(j);
    let (_in_flush, release) = seal_first_segment_and_park_the_trimmer(&j, &lower);
    let j2 = Arc::clone(&j);
    must_finish("a write during the background flush", move || {
        for i in PER_SEGMENT + 1..2 * PER_SEGMENT {
            write_nth(&j2, i);
        }
    });
    assert_eq!(lower.flushes.load(Ordering::SeqCst), 1);
    release.send(()).unwrap();
    j.wait_trimmer_idle();
    {
        let st = j.lock_state();
        assert!(!st.sealed, "the sealed segment was emptied");
        assert_eq!((st.active, st.tail[0]), (1, 0));
        assert!(st.poisoned.is_none());
    }
    assert_eq!(lower.flushes.load(Ordering::SeqCst), 1);
    crash_and_check(
        j,
        &lower,
        &path,
        PER_SEGMENT,
        "the records written during the flush were kept",
    );
}

/// Backpressure: with both segments full a writer waits (without appending) until the
/// background flush empties the sealed one, then goes on.
#[test]
fn a_writer_waits_for_the_background_trim_only_when_both_segments_are_full() {
    let (_dir, path, lower, j) = fresh();
    let j = Arc::new(j);
    let (release, writer) = fill_both_segments_and_block_a_writer(&j, &lower);
    {
        let st = j.lock_state();
        assert_eq!(
            st.next_seq,
            2 * PER_SEGMENT + 1,
            "the waiting writer appended nothing"
        );
        assert_eq!(st.waits_for_room, 1);
    }
    release.send(()).unwrap();
    writer.join().unwrap();
    j.wait_trimmer_idle();
    // The waiting writer sealed the second segment: the trimmer flushed it too.
    assert_eq!(lower.flushes.load(Ordering::SeqCst), 2);
    crash_and_check(j, &lower, &path, 1, "only the last record is unflushed");
}

/// The trimmer holds the flush lock across its lower flush: a guest FLUSH arriving meanwhile
/// waits, then flushes again, so the writes made during the background flush are durable when
/// the guest's FLUSH completes.
#[test]
fn a_guest_flush_during_a_background_trim_covers_the_writes_made_meanwhile() {
    let (_dir, path, lower, j) = fresh();
    let j = Arc::new(j);
    let (_in_flush, release) = seal_first_segment_and_park_the_trimmer(&j, &lower);
    write_nth(&j, PER_SEGMENT + 1);
    let guest_flush = {
        let j = Arc::clone(&j);
        blocked("the guest's FLUSH behind the background flush", move || {
            j.flush()
        })
    };
    release.send(()).unwrap();
    guest_flush.join().unwrap().unwrap();
    j.wait_trimmer_idle();
    assert_eq!(lower.flushes.load(Ordering::SeqCst), 2);
    let want = read(&*lower, 0, SIZE);
    assert_eq!(
        lower.durable(),
        want,
        "the guest's FLUSH made everything durable"
    );
    let j = Arc::try_unwrap(j).unwrap();
    let (_j, after, rec) = crash_and_restart(j, &lower, &path, &ident(1));
    assert_eq!(rec.replayed, 0, "both segments were trimmed");
    assert_eq!(read(&*after, 0, SIZE), want);
}

/// A background flush that fails is not lost: the guest's FLUSH waiting behind it flushes below
/// again, reports that failure, and every record stays for the next daemon.
#[test]
fn a_failed_background_flush_fails_the_next_guest_flush_and_keeps_every_record() {
    let (_dir, path, lower, j) = fresh();
    lower.fail_flush.store(true, Ordering::SeqCst);
    let j = Arc::new(j);
    let (_in_flush, release) = seal_first_segment_and_park_the_trimmer(&j, &lower);
    let guest_flush = {
        let j = Arc::clone(&j);
        blocked("the guest's FLUSH behind the background flush", move || {
            j.flush()
        })
    };
    release.send(()).unwrap();
    let err = guest_flush
        .join()
        .unwrap()
        .expect_err("the guest's FLUSH reports the failure below");
    assert!(
        err.to_string().contains("injected writeback error"),
        "{err}"
    );
    assert!(j.lock_state().flush_failed.is_some());
    crash_and_check(j, &lower, &path, PER_SEGMENT + 1, "every record stays");
}

/// After a failed flush below, the trimmer does not retry on its own: a writer that finds both
/// segments full fails at once instead of waiting for a trim that never comes, and the next
/// guest FLUSH that succeeds below trims both segments (a flush whose writeback could not be
/// done, e.g. an unreachable NBD base, can truthfully succeed later; a lost write is kept lost
/// by the layers below, which fail every later flush).
#[test]
fn after_a_failed_flush_full_segments_fail_writes_and_a_successful_flush_trims_everything() {
    let (_dir, path, lower, j) = fresh();
    lower.fail_flush.store(true, Ordering::SeqCst);
    let j = Arc::new(j);
    for i in 0..=PER_SEGMENT {
        write_nth(&j, i);
    }
    assert!(j.flush().is_err());
    j.wait_trimmer_idle();
    assert!(j.lock_state().flush_failed.is_some());
    // Segment 1 holds one record; fill it, then one more record finds both segments full.
    for i in 0..PER_SEGMENT - 1 {
        write_nth(&j, i);
    }
    let jj = Arc::clone(&j);
    let full = must_finish(
        "a write into a full journal after a failed flush",
        move || jj.write_at(&[7; 65536], 0),
    );
    assert!(
        full.unwrap_err()
            .to_string()
            .contains("crash journal is full"),
        "the writer fails instead of waiting"
    );
    lower.fail_flush.store(false, Ordering::SeqCst);
    j.flush().expect("a flush that succeeds below");
    assert!(j.lock_state().flush_failed.is_none());
    write_nth(&j, 3);
    j.flush().unwrap();
    crash_and_check(
        j,
        &lower,
        &path,
        0,
        "a successful FLUSH trimmed both segments",
    );
}

/// Shutdown while the trimmer is inside its lower flush: dropping the journal waits for that
/// flush to finish and joins the thread (nothing of the journal is left running).
#[test]
fn dropping_the_journal_while_the_trimmer_is_in_its_lower_flush_joins_it() {
    let (_dir, path, lower, j) = fresh();
    let (_in_flush, release) = seal_first_segment_and_park_the_trimmer(&j, &lower);
    let dropper = std::thread::spawn(move || drop(j));
    std::thread::sleep(MUST_NOT);
    assert!(!dropper.is_finished(), "the drop waits for the flush");
    release.send(()).unwrap();
    dropper.join().unwrap();
    assert_eq!(
        Arc::strong_count(&lower),
        1,
        "the trimmer thread ended and released the stack"
    );
    let after = Volatile::new(lower.durable());
    let (_j, rec) = open(after.clone(), &path, &ident(1), 1 << 20);
    assert_eq!(
        rec.replayed, 1,
        "the finished trim emptied the sealed segment"
    );
    assert_eq!(read(&*after, 0, SIZE), read(&*lower, 0, SIZE));
}

/// A live snapshot re-binds the journal with guest requests paused: it must not wait for a
/// background flush (which may be slow), and the records then belong to the new top.
#[test]
fn a_live_snapshot_rebind_does_not_wait_for_a_background_trim() {
    let dir = tempfile::tempdir().unwrap();
    let new = dir.path().join("new.qcow2");
    std::fs::write(&new, b"y").unwrap();
    let new_id = Identity::of(&new).unwrap();
    let path = dir.path().join("j");
    let lower = Volatile::new(vec![0; SIZE]);
    let (j, _) = open(lower.clone(), &path, &ident(1), 1 << 20);
    let j = Arc::new(j);
    let (_in_flush, release) = seal_first_segment_and_park_the_trimmer(&j, &lower);
    let j2 = Arc::clone(&j);
    must_finish("the re-bind during a background flush", move || {
        j2.rebind(&new)
    });
    release.send(()).unwrap();
    j.wait_trimmer_idle();
    let want = read(&*lower, 0, SIZE);
    drop(Arc::try_unwrap(j).unwrap());
    let after = Volatile::new(lower.durable());
    let (_j, rec) = open(after.clone(), &path, &new_id, 1 << 20);
    assert!(rec.refused.is_none());
    assert_eq!(rec.replayed, 1);
    assert_eq!(read(&*after, 0, SIZE), want);
}

/// A panic inside the background flush poisons the journal instead of leaving writers waiting
/// for room forever: writes and flushes fail, the records stay.
#[test]
fn a_panicking_background_flush_fails_later_requests_instead_of_hanging_them() {
    let (_dir, path, lower, j) = fresh();
    *lower.flush_hook.lock().unwrap() = Some(Box::new(|| panic!("injected panic in a flush")));
    for i in 0..=PER_SEGMENT {
        write_nth(&j, i);
    }
    j.wait_trimmer_idle();
    assert!(j.lock_state().poisoned.is_some());
    let j = Arc::new(j);
    let j2 = Arc::clone(&j);
    let (w, f) = must_finish("requests after the panic", move || {
        (j2.write_at(&[1; 512], 0), j2.flush())
    });
    assert!(w.is_err() && f.is_err());
    crash_and_check(j, &lower, &path, PER_SEGMENT + 1, "every record stays");
}

/// The trimmer drops the state lock between finding a sealed segment and taking the flush
/// lock: a guest FLUSH that gets the flush lock there finds an older sealed segment and newer
/// records in the active one. It must trim both (two rounds), so nothing older than the
/// completed FLUSH stays in the journal; the trimmer then finds nothing left to flush.
#[test]
fn a_guest_flush_ahead_of_the_trimmer_leaves_nothing_older_than_itself_in_the_journal() {
    let (_dir, path, lower, j) = fresh();
    let (hook, trimmer_ready, release) = gate();
    *j.core.before_trim.lock().unwrap() = Some(hook);
    for i in 0..=PER_SEGMENT + 1 {
        write_nth(&j, i);
    }
    trimmer_ready
        .recv_timeout(MUST)
        .expect("the trimmer has work");
    {
        let st = j.lock_state();
        assert!(st.sealed && st.tail[st.active] > 0);
    }
    j.flush().unwrap();
    assert_eq!(lower.flushes.load(Ordering::SeqCst), 2, "two rounds");
    {
        let st = j.lock_state();
        assert!(!st.sealed);
        assert_eq!(st.tail, [0, 0], "both segments are empty");
    }
    release.send(()).unwrap();
    j.wait_trimmer_idle();
    assert_eq!(
        lower.flushes.load(Ordering::SeqCst),
        2,
        "the trimmer found nothing to flush"
    );
    crash_and_check(
        Arc::new(j),
        &lower,
        &path,
        0,
        "a completed FLUSH leaves nothing",
    );
}

// ---- writes persisted in place below, with a marker record ----

#[path = "journal_marker_tests.rs"]
mod markers;

/// A write completes from memory through the journal (the hint on which the request layer runs
/// it on the queue thread) only where the layer below says so of it, its record is filled in
/// memory (a mapping, not `pwritev`), writes are not refused, and no writer waits for the
/// journal's room: while one does, the next write may wait behind it.
#[test]
fn a_write_completes_in_memory_only_where_the_layer_below_does_and_no_writer_waits_for_room() {
    let (_dir, path, lower, j) = fresh();
    assert!(!j.writes_in_memory(0, 4096), "the layer below says no");
    lower.in_memory.store(true, Ordering::SeqCst);
    assert!(j.writes_in_memory(0, 4096));
    let j = Arc::new(j);
    let (release, writer) = fill_both_segments_and_block_a_writer(&j, &lower);
    assert!(!j.writes_in_memory(0, 4096), "a writer waits for room");
    release.send(()).unwrap();
    writer.join().unwrap();
    j.wait_trimmer_idle();
    assert!(j.writes_in_memory(0, 4096), "nobody waits any more");
    drop(j);

    let dir = tempfile::tempdir().unwrap();
    let plain = Volatile::new(vec![0; SIZE]);
    plain.in_memory.store(true, Ordering::SeqCst);
    let (j, _) = Journal::open_with(
        plain.clone(),
        &dir.path().join("j"),
        &ident(1),
        1 << 20,
        false,
    )
    .unwrap();
    assert!(!j.writes_in_memory(0, 4096), "records written with pwritev");

    let other = Volatile::new(vec![0; SIZE]);
    other.in_memory.store(true, Ordering::SeqCst);
    let (j, rec) = open(other, &path, &ident(2), 1 << 20);
    assert!(rec.refused.is_some());
    assert!(!j.writes_in_memory(0, 4096), "writes are refused");
}
