//! The crash journal: acknowledged writes survive a daemon crash (SIGKILL, abort, OOM kill).
//!
//! Files: this one is the layer (appends, trims, the `BlockDev` implementation); the on-disk
//! format (file header, segments, records, the scan at open) is in `journal/format.rs`, and
//! what a replay applies of the records scanned (less what later markers cover) in
//! `journal/replay.rs`.
//!
//! In write-back mode an acknowledged write may live only in the folio cache and in qcow2
//! metadata held in memory until the next flush; a dead process loses both. [`Journal`] is the
//! layer just below the top of the stack (below the probed-raw guard, above the cache): before a
//! write, discard or write-zeroes goes down, its record (kind, offset, length, data, sequence
//! number, CRC) is copied into the journal file through a shared mapping of it ([`Mapping`];
//! `pwritev` where the file's space cannot be allocated). Either way the record is in the
//! file's pages in the host page cache when the copy returns, and the page cache outlives the
//! process, so the request completes to the guest only when its record would survive a
//! SIGKILL. A caller that holds a write's data in pieces (a guest's buffers) has them gathered
//! straight into the record ([`BlockDev::write_gathered`], with a mapping only): the record is
//! then the write's one private copy, and the layer below is handed the record's bytes, which
//! stay as they are until the request has counted its lower operation done. The file is
//! `flock`ed: one daemon per journal. A daemon started
//! later on the same image replays the records into the image (through the whole stack, so the
//! qcow2 engine allocates and publishes what the dead one had only in memory), flushes, and only
//! then serves ([`Journal::open`]).
//!
//! Writes persisted in place: a write that the layers below put where a restarted daemon
//! reads it ([`BlockDev::write_in_place_persisted`]: whole folios the cache sends around
//! itself, into a raw file or into clusters of a qcow2 image whose L2 entries are in the file)
//! needs no copy here; its record is a *marker* ([`Kind::Persisted`]: range, no data), appended
//! once the write is in place, with the range's stripes still locked. A replay applies no
//! part of an older record that a later marker covers (the file holds newer bytes there), and
//! applies every record after the marker. A daemon that dies between the write and its marker
//! replays the older records over the range: the write was not acknowledged. Such a write is
//! gathered into a buffer of the calling thread, not into the mapping. While a flush below has
//! failed (until one succeeds), every write is recorded with its data: a failed writeback may
//! have dropped pages of the file, and the records are what a restarted daemon can put back.
//! That is checked again when a persisted write's marker would be appended (state lock held):
//! a flush that failed while the write was in its lower I/O may have dropped the pages it put
//! in place, so such a write is recorded with its data after all
//! (`a_write_completing_after_a_flush_failed_keeps_its_data_in_the_journal`).
//!
//! The journal is trimmed by flushes, in the background: the file has two segments; new
//! records go to the active one. A record that does not fit the active segment *seals* it and
//! moves the writers to the other one (if that is empty) and wakes the journal's trimmer thread,
//! which waits until every request that wrote a record into the sealed segment has finished its
//! lower operation, writes the stack below back ([`BlockDev::write_back`]) and then empties the
//! sealed segment (its generation number is bumped, so its records no longer count). A
//! background trim needs the sealed records' writes to outlive the daemon, not a host crash
//! (after which the journal is discarded anyway, see below): over a raw image that is the
//! cache's writeback into the host page cache, without an `fdatasync`, so a stream of writes
//! that never FLUSHes is not paced by the device; over qcow2 the dirty metadata goes into the
//! file too, in its crash-consistent order, with an `fdatasync` only where that order needs one
//! (data and refcounts before the L2 tables that name them, L2 tables before new L1 entries),
//! and none when no metadata changed (writes into allocated clusters).
//! Writers keep appending to the active segment during that flush; a writer waits only when
//! both segments are full (backpressure), never for the flush otherwise. A guest FLUSH
//! ([`BlockDev::flush`]) seals the active segment too, flushes below and empties the sealed
//! segment (twice if it found an older sealed segment the trimmer had not taken yet), so
//! nothing older than a completed guest FLUSH stays in the journal. Only the sealed
//! segment is emptied, and it always holds older records than the active one: what stays is
//! newer than what was dropped, so a replay never writes stale data over a trimmed write.
//!
//! Errors: a failed flush below (in the background or a guest's) trims nothing: its records
//! stay, the guest's FLUSH reports the error, and the trimmer does not retry on its own. The
//! next guest FLUSH flushes below again and trims only if that succeeds. That is truthful
//! because the layers below keep a lost write lost: the folio cache fails every flush after a
//! failed flush of *its* lower layer (the kernel reports a writeback error only once), and the
//! qcow2 engine's `ReplayHost` replays or poisons after a failed `fdatasync`; what can succeed
//! on a retry is a flush whose writeback could not be done (an unreachable NBD base, a
//! transient EIO on a write), whose data the cache still holds dirty. While a flush has
//! failed, a writer that finds both segments full fails with EIO rather than wait for a trim
//! that only a successful FLUSH can bring. A panic in the background flush poisons the
//! journal: writes and flushes fail from then on and the records stay for the next daemon.
//!
//! What it does not cover, by design: a host crash. The page cache is gone then, and so is the
//! journal's meaning: the file header records the boot id, and a journal written during another
//! boot is discarded (the host-crash contract, FLUSH = durable, is kept by the flush path
//! below). The journal is never fsynced.
//!
//! Recovery refuses rather than guesses: a journal whose header is unreadable or torn, or that
//! holds records for another image (path, device and inode), makes the layer refuse every
//! write, discard, write-zeroes and flush with EIO, and the reason is logged at start and on
//! the first refused request. Reads are served. Moving the journal aside (accepting the loss)
//! and restarting serves writes again.
//!
//! Ordering: records are replayed in sequence order (less what later markers cover), so for
//! every sector the last record replayed must be the last write that reached the layer below.
//! Two writes whose ranges overlap are therefore serialized across "append record + lower
//! operation" (or "persisted write + marker") by striped range locks (64 KiB chunks hashed
//! onto [`STRIPES`] mutexes, taken in index order); writes to different chunks run in
//! parallel.
//!
//! Appends: a record's room is reserved under the state mutex, one at a time in sequence
//! order, and its opening header (every field, and a checksum of the header alone) goes into
//! the mapping then; its data, the data's checksum and the final header are written after the
//! lock is released, so writers fill their records in parallel. A record still being filled
//! when the daemon dies has a whole header and a failing checksum: the replay skips it (never
//! acknowledged, its lower operation not started) and replays the records after it
//! (`journal/format.rs`, version 2). Without a mapping, a record is written whole with
//! `pwritev` under the state mutex (a hole the process did not write would end the scan).
//!
//! Locking model (top to bottom): stripe locks (ascending index), then `flush_lock`, then the
//! state mutex. A request takes its stripe locks, then the state mutex only while its record's
//! room is reserved and again to count its lower operation done; it waits for room (both
//! segments full) on a condvar of the state mutex while holding its stripe locks, which cannot
//! deadlock since flushes take no stripe lock. `flush_lock` serializes flushes (the trimmer's
//! and the guest's) and is held across the lower flush; the state mutex is held only to seal,
//! to wait for the sealed segment's requests and to empty it, never across the lower flush
//! (the state mutex is held across the write of a record's opening header, of a whole record
//! without a mapping, or of a segment header into the journal file only). A persisted write
//! holds its stripe locks, and no other lock of the journal, across its lower write.
//! The trimmer takes only `flush_lock` and the state mutex and calls only downward.
//! [`Journal::rebind`] (a live snapshot, guest requests paused) takes only the state mutex, so
//! it never waits for a background flush. Dropping the [`Journal`] stops the trimmer and joins
//! it.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use blockdev::{BlockDev, BlockError, Result};
use log::{error, info};

use crate::shared_map::SharedMap;

mod format;
mod replay;

use format::{
    boot_id, break_record_checksum, decode_header, encode_header, pwritev_all, random_uuid,
    read_upto, record_header, record_opening, scan, segment_header, Kind, FILE_HEADER, REC_HEADER,
    SEG_HEADER,
};
use replay::{apply, uncovered};

/// Default bytes of one segment.
pub const DEFAULT_SEGMENT: u64 = 64 << 20;
/// Number of range locks.
pub const STRIPES: usize = 256;
/// Range-lock granularity (bytes, power of two).
const STRIPE_CHUNK_SHIFT: u32 = 16;

/// Which image a journal belongs to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// Canonical path of the image.
    pub path: String,
    /// Its device and inode.
    pub dev: u64,
    /// Inode number.
    pub ino: u64,
}

impl Identity {
    /// The identity of the image file at `path`.
    pub fn of(path: &Path) -> io::Result<Self> {
        let canon = std::fs::canonicalize(path)?;
        let meta = std::fs::metadata(&canon)?;
        Ok(Identity {
            path: canon.to_string_lossy().into_owned(),
            dev: meta.dev(),
            ino: meta.ino(),
        })
    }
}

/// What [`Journal::open`] found and did.
#[derive(Debug, Default, Clone)]
pub struct Recovery {
    /// Records replayed into the image.
    pub replayed: usize,
    /// Bytes of write data replayed.
    pub bytes: u64,
    /// Why writes are refused, if they are.
    pub refused: Option<String>,
}

/// The journal's counters since the daemon started, for `query-stats` and `--metrics`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JournalStats {
    /// Records appended: writes with their data, discards, write-zeroes and markers.
    pub records: u64,
    /// Bytes appended to the journal file (record headers and data).
    pub record_bytes: u64,
    /// Writes the stack below persisted in place, recorded as markers without their data.
    pub persisted_writes: u64,
    /// Bytes of records the journal holds now (both segments): what a replay would read.
    pub held_bytes: u64,
    /// Segments emptied by flushes.
    pub trims: u64,
    /// Times a writer found both segments full and waited for a trim.
    pub waits_for_room: u64,
    /// Records a crashed daemon had left, replayed at start, and their bytes of data.
    pub replayed_records: u64,
    pub replayed_bytes: u64,
    /// Writes are refused (an untrusted journal at start, or a journal poisoned since).
    pub refusing: bool,
}

struct State {
    /// The segment new records go to.
    active: usize,
    /// The other segment holds records waiting for a flush (no record is appended to it until
    /// the flush empties it). When false, the other segment is empty.
    sealed: bool,
    /// Bytes used in each segment (after its header).
    tail: [u64; 2],
    /// Requests that appended a record to the segment and have not finished their lower op.
    pending: [usize; 2],
    generation: [u64; 2],
    next_seq: u64,
    /// Why nothing can be trimmed any more (a lower flush failed, or the new top of a live
    /// snapshot could not be recorded): writes and flushes fail from then on, and every record
    /// stays for the next daemon to replay.
    poisoned: Option<String>,
    /// The last flush below failed (cleared by the next one that succeeds): the trimmer waits
    /// for a guest FLUSH, and writers that find both segments full fail instead of waiting.
    flush_failed: Option<String>,
    /// The trimmer is inside a flush it started.
    trimming: bool,
    /// Segments emptied, and times a writer found both segments full (logged at the end).
    trims: u64,
    waits_for_room: u64,
    /// Writes persisted in place below, recorded as markers.
    persisted: u64,
    /// Records appended since the start (markers included), and their bytes with headers.
    records: u64,
    record_bytes: u64,
    /// The journal is being dropped: the trimmer exits.
    stop: bool,
}

/// The room of one record, reserved under the state lock ([`Core::append_unless`]): its
/// segment (whose `pending` count the request holds), sequence number, the segment's
/// generation and the record's position in the file.
struct Slot {
    seg: usize,
    seq: u64,
    gen: u64,
    at: u64,
}

/// The journal proper, shared by the [`Journal`] handle and its trimmer thread.
struct Core {
    lower: Arc<dyn BlockDev>,
    file: File,
    path: PathBuf,
    seg_len: u64,
    state: Mutex<State>,
    /// Signalled when a segment's `pending` count drops to zero.
    drained: Condvar,
    /// Signalled when the trimmer has work (a sealed segment) or must stop.
    work: Condvar,
    /// Signalled when a flush ends (the sealed segment emptied, or the journal poisoned): the
    /// writers waiting for room and [`Journal::wait_trimmer_idle`] re-check.
    trimmed: Condvar,
    flush_lock: Mutex<()>,
    stripes: Vec<Mutex<()>>,
    refused: Option<String>,
    refusal_logged: AtomicBool,
    /// Writers waiting for room (both segments full) now: while any does, a write does not
    /// complete from memory ([`BlockDev::writes_in_memory`]).
    room_waiters: AtomicUsize,
    /// The file mapped shared, when its space is allocated (see [`Mapping`]); `None` when
    /// it could not be (records are then written with `pwritev`) or writes are refused.
    map: Option<Mapping>,
    /// Test hook: run by the trimmer once it has work, before it takes `flush_lock`.
    #[cfg(test)]
    before_trim: Mutex<Option<Box<dyn FnMut() + Send>>>,
}

/// The crash-journal layer (see the module documentation).
pub struct Journal {
    core: Arc<Core>,
    /// What the replay at open did (for the statistics).
    recovery: Recovery,
    /// The trimmer thread (none when writes are refused); joined on drop.
    trimmer: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Journal")
            .field("path", &self.core.path)
            .field("refused", &self.core.refused)
            .finish()
    }
}

fn io_err(e: io::Error) -> BlockError {
    BlockError::Io(e)
}

/// The journal file mapped shared (`MAP_SHARED`): a record is a memory copy into the file's
/// page-cache pages, which survive the process as a `pwrite`'s would, without a system call or
/// the inode lock (a page pays one write fault the first time it is written after the kernel
/// wrote it out). Only a file whose whole space is allocated is mapped, and its pages are
/// faulted in when it is opened (`MADV_POPULATE_READ`: clean, reclaimable pages; no disk I/O
/// for the unwritten extents of a fresh journal), so an append never allocates blocks: a
/// SIGBUS could come only from a page the kernel evicted and then failed to read back, or from
/// another process truncating the file (the journal is `flock`ed against a second daemon).
/// Trimmed segments keep their pages: the kernel writes each dirty page out at most once per
/// writeback interval, whatever the number of records that went through it.
struct Mapping(SharedMap);

// SAFETY: the mapping is plain shared memory; appends write disjoint ranges (each record's
// room is reserved under the state lock), and nothing reads through it but a record's own
// request.
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

impl Mapping {
    fn new(file: &File, len: u64) -> io::Result<Self> {
        let len = usize::try_from(len).map_err(io::Error::other)?;
        let map = SharedMap::new(file, 0, len)?;
        // Fault every page in now. Best effort: before Linux 5.14 (no MADV_POPULATE_READ)
        // appends fault their pages in themselves.
        // SAFETY: the whole of the mapping just made.
        unsafe {
            libc::madvise(map.as_ptr().cast(), len, libc::MADV_POPULATE_READ);
        }
        Ok(Mapping(map))
    }

    /// The `len` bytes at `at`, checked to lie inside the mapping.
    fn range(&self, at: u64, len: usize) -> *mut u8 {
        let at = usize::try_from(at).unwrap_or(usize::MAX);
        assert!(
            at <= self.0.len() && len <= self.0.len() - at,
            "a journal record outside the mapping"
        );
        // SAFETY: `at` is inside the mapping (checked above).
        unsafe { self.0.as_ptr().add(at) }
    }

    /// The `len` bytes at `at`, to read.
    ///
    /// # Safety
    /// The range is the data of a record whose request has not counted its lower operation
    /// done ([`Core::done`]): its segment is not emptied or reused, so nothing writes it while
    /// the borrow lives.
    unsafe fn record(&self, at: u64, len: usize) -> &[u8] {
        // SAFETY: inside the mapping (`range`), and unchanged by the caller's contract.
        unsafe { std::slice::from_raw_parts(self.range(at, len), len) }
    }

    /// Copies `a` then `b` to `at`.
    fn copy(&self, at: u64, a: &[u8], b: &[u8]) {
        let at = usize::try_from(at).unwrap_or(usize::MAX);
        let len = self.0.len();
        assert!(
            at <= len && a.len() + b.len() <= len - at,
            "a journal record outside the mapping"
        );
        let dst = self.0.as_ptr();
        // SAFETY: the destination range is inside the mapping (checked above) and not
        // borrowed by anything; the sources are live slices that cannot overlap it.
        unsafe {
            std::ptr::copy_nonoverlapping(a.as_ptr(), dst.add(at), a.len());
            std::ptr::copy_nonoverlapping(b.as_ptr(), dst.add(at + a.len()), b.len());
        }
    }
}

impl Journal {
    /// Opens (or creates) the journal at `path` for the image `identity` over `lower`, replays
    /// what a previous daemon left in it, flushes, and empties it. A journal that cannot be
    /// trusted makes the layer refuse writes (see the module documentation); only an I/O error
    /// on the journal file itself or on the replay is an error.
    pub fn open(
        lower: Arc<dyn BlockDev>,
        path: &Path,
        identity: &Identity,
        seg_len: u64,
    ) -> io::Result<(Self, Recovery)> {
        Self::open_with(lower, path, identity, seg_len, true)
    }

    /// [`Journal::open`]; without `may_map` records are always written with `pwritev` (the
    /// path taken where the file's space cannot be allocated).
    fn open_with(
        lower: Arc<dyn BlockDev>,
        path: &Path,
        identity: &Identity,
        seg_len: u64,
        may_map: bool,
    ) -> io::Result<(Self, Recovery)> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)?;
        // One daemon per journal: a second one (another image served on the same socket
        // path) would empty it under the first one's feet.
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = io::Error::last_os_error();
            return Err(if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                io::Error::other(
                    "in use by another process (another daemon on the same socket path?)",
                )
            } else {
                e
            });
        }
        let seg_len = seg_len.max(1 << 20);
        let mut recovery = Recovery::default();
        let len = file.metadata()?.len();
        let mut refused = None;
        let mut allocated = false;
        if len > 0 {
            let mut hb = vec![0u8; FILE_HEADER as usize];
            let n = read_upto(&file, &mut hb, 0)?;
            match decode_header(&hb[..n]) {
                Err(why) => {
                    refused = Some(format!(
                        "crash journal {} is unreadable ({why}): acknowledged writes of a crashed daemon may be in it; move it aside to accept their loss",
                        path.display()
                    ));
                }
                Ok(h) if h.boot != boot_id() => {
                    info!(
                        "crash journal {} was written before the host rebooted: discarded (a host crash keeps only flushed writes)",
                        path.display()
                    );
                }
                Ok(h) => {
                    let records = scan(&file, seg_len)?;
                    if !records.is_empty() && h.identity != *identity {
                        refused = Some(format!(
                            "crash journal {} holds {} unflushed write(s) of image {} (dev {} inode {}), not of {} (dev {} inode {}); serve that image, or move the journal aside to accept their loss",
                            path.display(),
                            records.len(),
                            h.identity.path,
                            h.identity.dev,
                            h.identity.ino,
                            identity.path,
                            identity.dev,
                            identity.ino
                        ));
                    } else if !records.is_empty() {
                        for (r, pieces) in records.iter().zip(uncovered(&records)) {
                            let bytes = apply(&*lower, r, &pieces).map_err(|e| {
                                io::Error::other(format!(
                                    "replaying crash journal {} (record {}): {e}",
                                    path.display(),
                                    r.seq
                                ))
                            })?;
                            recovery.replayed += 1;
                            recovery.bytes += bytes;
                        }
                        lower.flush().map_err(|e| {
                            io::Error::other(format!(
                                "flushing the replayed crash journal {}: {e}",
                                path.display()
                            ))
                        })?;
                        info!(
                            "crash journal {}: replayed {} record(s), {} bytes of acknowledged writes a crashed daemon had not flushed",
                            path.display(),
                            recovery.replayed,
                            recovery.bytes
                        );
                    }
                }
            }
        }
        if let Some(why) = &refused {
            error!("{why}; writes are refused");
            recovery.refused = Some(why.clone());
        } else {
            // A fresh journal: new header, both segments empty (generation 1 and 2 after any
            // earlier ones, so stale records never count).
            file.set_len(0)?;
            // Allocate the whole file now: appends then never extend it (no size update per
            // record) and never fail for lack of space. Where fallocate is not supported, a
            // sparse file of the same size.
            let total = FILE_HEADER + 2 * seg_len;
            let total_off = libc::off_t::try_from(total).map_err(io::Error::other)?;
            // SAFETY: fallocate on a descriptor we own, mode 0, a valid range.
            allocated = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, total_off) } == 0;
            if !allocated {
                file.set_len(total)?;
            }
            file.write_all_at(&encode_header(identity, random_uuid()), 0)?;
        }
        // Appends copy into a shared mapping of the file, only where its space is allocated
        // (a write fault on a hole could need space the file system no longer has: SIGBUS).
        let map = if allocated && may_map {
            match Mapping::new(&file, FILE_HEADER + 2 * seg_len) {
                Ok(m) => Some(m),
                Err(e) => {
                    info!(
                        "crash journal {}: not mapped ({e}); records are written with pwritev",
                        path.display()
                    );
                    None
                }
            }
        } else {
            None
        };
        let core = Arc::new(Core {
            map,
            lower,
            file,
            path: path.to_path_buf(),
            seg_len,
            state: Mutex::new(State {
                active: 0,
                sealed: false,
                tail: [0; 2],
                pending: [0; 2],
                generation: [1, 1],
                next_seq: 1,
                poisoned: None,
                flush_failed: None,
                trimming: false,
                trims: 0,
                persisted: 0,
                records: 0,
                record_bytes: 0,
                waits_for_room: 0,
                stop: false,
            }),
            drained: Condvar::new(),
            work: Condvar::new(),
            trimmed: Condvar::new(),
            flush_lock: Mutex::new(()),
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            refused,
            refusal_logged: AtomicBool::new(false),
            room_waiters: AtomicUsize::new(0),
            #[cfg(test)]
            before_trim: Mutex::new(None),
        });
        let mut trimmer = None;
        if core.refused.is_none() {
            for seg in 0..2 {
                core.write_segment_header(seg, 1)?;
            }
            let c = Arc::clone(&core);
            trimmer = Some(
                std::thread::Builder::new()
                    .name("snapblk-journal".into())
                    .spawn(move || c.trimmer())?,
            );
        }
        let journal = Journal {
            core,
            trimmer,
            recovery: recovery.clone(),
        };
        Ok((journal, recovery))
    }

    /// Records that the image is now `top` (a live snapshot switched the top; called while
    /// guest requests are paused). The records already in the journal were flushed into the
    /// frozen image, which the new top shows through, so replaying them into the new top
    /// changes nothing; later records belong to the new top. On failure writes are refused
    /// from then on (a journal naming the wrong image would be refused at restart anyway).
    ///
    /// Takes only the state lock (not the flush lock): a background trim inside its lower
    /// flush does not lengthen the snapshot's pause.
    pub fn rebind(&self, top: &Path) {
        let c = &self.core;
        if c.refused.is_some() {
            return;
        }
        let mut st = c.lock_state();
        let done = Identity::of(top).and_then(|id| {
            c.file
                .write_all_at(&encode_header(&id, random_uuid()), 0)
                .map(|()| id)
        });
        match done {
            Ok(id) => info!(
                "crash journal {} now records writes of {}",
                c.path.display(),
                id.path
            ),
            Err(e) => {
                let why = format!(
                    "crash journal {}: cannot record the new top {}: {e}",
                    c.path.display(),
                    top.display()
                );
                error!("{why}; writes are refused");
                c.poison(&mut st, why);
            }
        }
    }

    /// The journal file.
    pub fn path(&self) -> &Path {
        &self.core.path
    }

    /// Why writes are refused, if they are.
    pub fn refused(&self) -> Option<&str> {
        self.core.refused.as_deref()
    }

    /// How many writes the layer below persisted in place, each recorded as a marker instead
    /// of with its data.
    pub fn persisted_writes(&self) -> u64 {
        self.core.lock_state().persisted
    }

    /// The journal's counters (the daemon's statistics).
    pub fn stats(&self) -> JournalStats {
        let st = self.core.lock_state();
        JournalStats {
            records: st.records,
            record_bytes: st.record_bytes,
            persisted_writes: st.persisted,
            held_bytes: st.tail[0] + st.tail[1],
            trims: st.trims,
            waits_for_room: st.waits_for_room,
            replayed_records: self.recovery.replayed as u64,
            replayed_bytes: self.recovery.bytes,
            refusing: self.core.refused.is_some() || st.poisoned.is_some(),
        }
    }

    /// Waits until the trimmer has nothing left to do (no sealed segment, or the journal is
    /// poisoned) and is not inside a flush. For tests and benchmarks that want a settled state.
    pub fn wait_trimmer_idle(&self) {
        let c = &self.core;
        let mut st = c.lock_state();
        while st.trimming
            || (st.sealed
                && st.poisoned.is_none()
                && st.flush_failed.is_none()
                && self.trimmer.is_some())
        {
            st = c.trimmed.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }

    #[cfg(test)]
    fn lock_state(&self) -> MutexGuard<'_, State> {
        self.core.lock_state()
    }
}

impl Drop for Journal {
    /// Stops the trimmer and joins it. A trim it is running finishes first (its lower flush
    /// cannot be interrupted); a sealed segment it has not started on is left to the next
    /// daemon's replay (the daemon's final flush, which goes through [`BlockDev::flush`], has
    /// emptied both segments before a clean shutdown gets here).
    fn drop(&mut self) {
        {
            let mut st = self.core.lock_state();
            st.stop = true;
            self.core.work.notify_all();
            self.core.drained.notify_all();
            info!(
                "crash journal {}: {} segment(s) trimmed; writers waited for room {} time(s); {} write(s) persisted in place, recorded as markers",
                self.core.path.display(),
                st.trims,
                st.waits_for_room,
                st.persisted
            );
        }
        if let Some(t) = self.trimmer.take() {
            if t.join().is_err() {
                error!(
                    "crash journal {}: the trimmer thread panicked",
                    self.core.path.display()
                );
            }
        }
    }
}

/// What an append that nothing refuses returns (`None` cannot come back from it; an error, not
/// a panic, if it ever did).
fn appended<T>(appended: Option<T>) -> Result<T> {
    appended.ok_or_else(|| BlockError::Io(io::Error::other("crash journal: append refused")))
}

impl Core {
    fn seg_base(&self, seg: usize) -> u64 {
        FILE_HEADER + seg as u64 * self.seg_len
    }

    fn write_segment_header(&self, seg: usize, gen: u64) -> io::Result<()> {
        self.file
            .write_all_at(&segment_header(gen), self.seg_base(seg))
    }

    fn lock_state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Nothing is trimmed from now on; writers waiting for room and the idle waiters re-check.
    fn poison(&self, st: &mut State, why: String) {
        if st.poisoned.is_none() {
            st.poisoned = Some(why);
        }
        self.trimmed.notify_all();
    }

    fn poisoned_error(why: &str) -> BlockError {
        BlockError::Io(io::Error::other(format!(
            "{why}; the crash journal keeps every record since (restart the daemon to replay them)"
        )))
    }

    fn check_refused(&self) -> Result<()> {
        match &self.refused {
            None => Ok(()),
            Some(why) => {
                if !self.refusal_logged.swap(true, Ordering::Relaxed) {
                    error!("refusing a write: {why}");
                }
                Err(BlockError::Io(io::Error::other(why.clone())))
            }
        }
    }

    /// Locks the stripes covering `[offset, offset + len)`, in ascending index order.
    fn lock_range(&self, offset: u64, len: u64) -> Vec<MutexGuard<'_, ()>> {
        let first = offset >> STRIPE_CHUNK_SHIFT;
        let last = offset.saturating_add(len.max(1) - 1) >> STRIPE_CHUNK_SHIFT;
        let mut idx: Vec<usize> = if last - first + 1 >= STRIPES as u64 {
            (0..STRIPES).collect()
        } else {
            (first..=last)
                .map(|c| (c % STRIPES as u64) as usize)
                .collect()
        };
        idx.sort_unstable();
        idx.dedup();
        idx.into_iter()
            .map(|i| self.stripes[i].lock().unwrap_or_else(|e| e.into_inner()))
            .collect()
    }

    /// Appends a record; returns the segment it went to (whose `pending` count it holds).
    /// A record that does not fit the active segment seals it and moves the writers to the
    /// other one if that is empty (waking the trimmer); if the other one is still sealed, the
    /// writer waits until a flush empties it (backpressure: both segments are full).
    fn append(&self, kind: Kind, offset: u64, len: u64, data: &[u8]) -> Result<usize> {
        appended(self.append_record_unless(kind, offset, len, data, |_| false)?)
    }

    /// [`Core::append`], except that it appends nothing and returns `None` if `refuse` says so
    /// (see [`Core::append_unless`]). With a mapping, a record with data is copied into its
    /// room outside the state lock ([`Core::append_filled`]).
    fn append_record_unless(
        &self,
        kind: Kind,
        offset: u64,
        len: u64,
        data: &[u8],
        refuse: impl Fn(&State) -> bool,
    ) -> Result<Option<usize>> {
        if let Some(map) = self.map.as_ref().filter(|_| !data.is_empty()) {
            let mut copy = |dst: &mut [u8]| {
                dst.copy_from_slice(data);
                Ok(())
            };
            let appended = self.append_filled(map, kind, offset, data.len(), refuse, &mut copy)?;
            return Ok(appended.map(|(seg, _)| seg));
        }
        // The data's checksum does not depend on the position: computed before the lock.
        let mut data_crc = crc32fast::Hasher::new();
        data_crc.update(data);
        let slot = self.append_unless(data.len(), refuse, |s| {
            let header = record_header(kind, s.seq, s.gen, offset, len, &data_crc);
            self.put_record(s.at, &header, data)
        })?;
        Ok(slot.map(|s| s.seg))
    }

    /// Writes a record (`header`, then `data`) at `at` of the journal file.
    fn put_record(&self, at: u64, header: &[u8], data: &[u8]) -> Result<()> {
        match &self.map {
            Some(m) => m.copy(at, header, data),
            None => pwritev_all(&self.file, header, data, at).map_err(io_err)?,
        }
        Ok(())
    }

    /// Appends a write record of `len` bytes whose data `fill` writes into the mapping itself
    /// (no copy of the caller's; see [`Core::append_filled`]). Returns the segment and the
    /// record's data, which stays as it is until the request counts its lower operation done.
    fn append_gathered<'a>(
        &self,
        map: &'a Mapping,
        offset: u64,
        len: usize,
        fill: &mut dyn FnMut(&mut [u8]) -> Result<()>,
    ) -> Result<(usize, &'a [u8])> {
        appended(self.append_filled(map, Kind::Write, offset, len, |_| false, fill)?)
    }

    /// Appends a record with `data_len` bytes of data (its length too) that `fill` writes into
    /// its room in the mapping. The room and the opening header are taken under the state lock; the fill, the
    /// data's checksum and the final header follow outside it, so writers fill their records in
    /// parallel. Returns the segment and the record's data, or `None` if `refuse` said so (see
    /// [`Core::append_unless`]). A failing `fill` leaves a record whose checksum fails (a
    /// replay skips it) and counts its request done.
    fn append_filled<'a>(
        &self,
        map: &'a Mapping,
        kind: Kind,
        offset: u64,
        data_len: usize,
        refuse: impl Fn(&State) -> bool,
        fill: &mut dyn FnMut(&mut [u8]) -> Result<()>,
    ) -> Result<Option<(usize, &'a [u8])>> {
        let len = data_len as u64;
        let Some(slot) = self.append_unless(data_len, refuse, |s| {
            map.copy(s.at, &record_opening(kind, s.seq, s.gen, offset, len), &[]);
            Ok(())
        })?
        else {
            return Ok(None);
        };
        let start = slot.at + REC_HEADER as u64;
        // SAFETY: `range` checked the bytes lie inside the mapping; they are the room this
        // record reserved past the segment's tail, which nothing else reads or writes until
        // its request counts its lower operation done (the segment is not emptied before), and
        // `dst` is gone before the data is borrowed again below.
        let dst = unsafe { std::slice::from_raw_parts_mut(map.range(start, data_len), data_len) };
        let filled = fill(dst);
        let mut data_crc = crc32fast::Hasher::new();
        data_crc.update(dst);
        let mut header = record_header(kind, slot.seq, slot.gen, offset, len, &data_crc);
        if let Err(e) = filled {
            break_record_checksum(&mut header);
            map.copy(slot.at, &header, &[]);
            self.done(slot.seg);
            return Err(e);
        }
        map.copy(slot.at, &header, &[]);
        // SAFETY: the record just appended; its request counts its lower operation done only
        // after the caller is done with the data (`in_record`).
        Ok(Some((slot.seg, unsafe { map.record(start, data_len) })))
    }

    /// Finds room for a record with `data_len` bytes of data and reserves it: `put(slot)` runs
    /// with the state lock held (it writes the record, or with a mapping its opening header),
    /// so rooms are taken one at a time in sequence order and every record's header is in the
    /// file before any later record's. A failing `put` reserves nothing. Appends nothing and
    /// returns `None` if `refuse` says so of the state it would append under (checked with the
    /// state lock held, each time the writer finds room, so nothing that `refuse` looks at
    /// changes before the record is in). The slot's segment counts the request as pending.
    fn append_unless(
        &self,
        data_len: usize,
        refuse: impl Fn(&State) -> bool,
        mut put: impl FnMut(&Slot) -> Result<()>,
    ) -> Result<Option<Slot>> {
        let rec_len = (REC_HEADER + data_len) as u64;
        if rec_len > self.seg_len - SEG_HEADER {
            return Err(BlockError::Io(io::Error::other(format!(
                "request of {data_len} bytes does not fit the crash journal's {}-byte segment",
                self.seg_len
            ))));
        }
        let mut st = self.lock_state();
        loop {
            if let Some(why) = &st.poisoned {
                return Err(Self::poisoned_error(why));
            }
            let seg = st.active;
            if SEG_HEADER + st.tail[seg] + rec_len <= self.seg_len {
                if refuse(&st) {
                    return Ok(None);
                }
                let slot = Slot {
                    seg,
                    seq: st.next_seq,
                    gen: st.generation[seg],
                    at: self.seg_base(seg) + SEG_HEADER + st.tail[seg],
                };
                put(&slot)?;
                st.next_seq += 1;
                st.tail[seg] += rec_len;
                st.records += 1;
                st.record_bytes += rec_len;
                st.pending[seg] += 1;
                return Ok(Some(slot));
            }
            if !st.sealed {
                // The other segment is empty: it takes the records from now on, the trimmer
                // flushes this one.
                st.sealed = true;
                st.active = 1 - seg;
                self.work.notify_all();
                continue;
            }
            // Both segments are full: wait for the flush that empties the sealed one, unless
            // the last one failed (only a successful guest FLUSH can make room then).
            if let Some(why) = &st.flush_failed {
                return Err(BlockError::Io(io::Error::other(format!(
                    "the crash journal is full and {why}; a successful FLUSH empties it"
                ))));
            }
            st.waits_for_room += 1;
            self.room_waiters.fetch_add(1, Ordering::Relaxed);
            st = self.trimmed.wait(st).unwrap_or_else(|e| e.into_inner());
            self.room_waiters.fetch_sub(1, Ordering::Relaxed);
        }
    }

    fn done(&self, seg: usize) {
        let mut st = self.lock_state();
        st.pending[seg] -= 1;
        if st.pending[seg] == 0 {
            self.drained.notify_all();
        }
    }

    /// One flush of the stack below, which empties the sealed segment. With `seal_active` (a
    /// guest FLUSH) the active segment is sealed first if the other one is empty, so the flush
    /// trims everything written before it; without (the trimmer) nothing is flushed unless a
    /// segment is sealed. Only the sealed segment is ever emptied, and it always holds the
    /// older records: the records kept are newer than every record dropped, so a replay never
    /// writes stale data over a trimmed write. A failed flush below trims nothing (see the
    /// module documentation on errors); once poisoned, it fails without flushing.
    ///
    /// A guest FLUSH that finds a sealed segment the trimmer has not taken yet, and records in
    /// the active one, runs a second round (seal the active one, flush, empty it): the journal
    /// holds nothing older than a completed guest FLUSH, so a clean shutdown leaves it empty.
    fn flush_and_trim(&self, seal_active: bool) -> Result<()> {
        let _one = self.flush_lock.lock().unwrap_or_else(|e| e.into_inner());
        let again = {
            let st = self.lock_state();
            seal_active && st.sealed && st.tail[st.active] > 0
        };
        self.flush_round(seal_active)?;
        if again {
            self.flush_round(true)?;
        }
        Ok(())
    }

    /// One round of [`Core::flush_and_trim`]; the caller holds `flush_lock`.
    fn flush_round(&self, seal_active: bool) -> Result<()> {
        let mut st = self.lock_state();
        if let Some(why) = &st.poisoned {
            return Err(Self::poisoned_error(why));
        }
        if seal_active && !st.sealed && st.tail[st.active] > 0 {
            st.sealed = true;
            st.active = 1 - st.active;
        }
        if !seal_active && !st.sealed {
            return Ok(());
        }
        let old = 1 - st.active;
        let trim = st.sealed;
        // Every request that appended to the sealed segment has reached the lower layer before
        // the lower flush starts; new ones append to the active segment.
        while trim && st.pending[old] > 0 {
            if st.stop {
                // The journal is being dropped, so no request is in flight: a count that says
                // otherwise is wrong, and waiting on it would hang the drop. Nothing is
                // trimmed; the records stay for the next daemon's replay.
                error!(
                    "crash journal {}: {} request(s) still counted in a sealed segment at stop; it is left to the replay",
                    self.path.display(),
                    st.pending[old]
                );
                return Ok(());
            }
            st = self.drained.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        drop(st);
        // A background trim needs only the sealed records' writes to outlive the daemon (a
        // journal is discarded after a host crash: see the module documentation); a guest
        // FLUSH makes them durable.
        let flushed = if seal_active {
            self.lower.flush()
        } else {
            self.lower.write_back()
        };
        let mut st = self.lock_state();
        if let Err(e) = flushed {
            // Nothing is trimmed; the records stay until a flush below succeeds.
            st.flush_failed = Some(format!("a flush below the crash journal failed: {e}"));
            self.trimmed.notify_all();
            return Err(e);
        }
        st.flush_failed = None;
        if trim {
            let gen = st.generation[old] + 1;
            // Bumping the generation invalidates every record of the old segment at once.
            if let Err(e) = self.write_segment_header(old, gen) {
                let why = format!(
                    "crash journal {}: cannot empty a flushed segment: {e}",
                    self.path.display()
                );
                self.poison(&mut st, why);
                return Err(io_err(e));
            }
            st.generation[old] = gen;
            st.tail[old] = 0;
            st.sealed = false;
            st.trims += 1;
            self.trimmed.notify_all();
        }
        Ok(())
    }

    /// The trimmer thread: flushes a sealed segment as soon as there is one, so writers keep
    /// appending to the other segment meanwhile. After a failed flush it waits until a guest
    /// FLUSH succeeds (see [`Core::flush_and_trim`]); a panic poisons the journal.
    fn trimmer(&self) {
        loop {
            {
                let mut st = self.lock_state();
                let has_work =
                    |st: &State| st.sealed && st.poisoned.is_none() && st.flush_failed.is_none();
                while !st.stop && !has_work(&st) {
                    st = self.work.wait(st).unwrap_or_else(|e| e.into_inner());
                }
                if st.stop {
                    return;
                }
                st.trimming = true;
            }
            #[cfg(test)]
            {
                let hook = self
                    .before_trim
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .take();
                if let Some(mut h) = hook {
                    h();
                }
            }
            // A panic below must not leave writers waiting for a trim that never comes.
            let flushed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                self.flush_and_trim(false)
            }));
            let mut st = self.lock_state();
            match flushed {
                Ok(Ok(())) => {}
                Ok(Err(e)) => error!(
                    "crash journal {}: background flush failed: {e}; its records stay until a guest FLUSH succeeds",
                    self.path.display()
                ),
                Err(_) => {
                    let why = format!(
                        "crash journal {}: the background flush panicked",
                        self.path.display()
                    );
                    error!("{why}; writes and flushes fail from now on");
                    self.poison(&mut st, why);
                }
            }
            st.trimming = false;
            self.trimmed.notify_all();
        }
    }

    fn journaled(
        &self,
        kind: Kind,
        offset: u64,
        len: u64,
        data: &[u8],
        op: impl FnOnce() -> Result<()>,
    ) -> Result<()> {
        self.in_record(
            offset,
            len,
            || Ok((self.append(kind, offset, len, data)?, ())),
            |()| op(),
        )
    }

    /// A write whose data `fill` puts straight into its record (see
    /// [`BlockDev::write_gathered`]); the layer below is handed the record's data. Only with
    /// a mapping.
    fn journaled_gathered(
        &self,
        map: &Mapping,
        offset: u64,
        len: usize,
        fill: &mut dyn FnMut(&mut [u8]) -> Result<()>,
    ) -> Result<()> {
        self.in_record(
            offset,
            len as u64,
            || self.append_gathered(map, offset, len, fill),
            |data| self.lower.write_at(data, offset),
        )
    }

    /// A write that the layer below persists in place ([`BlockDev::write_in_place_persisted`]):
    /// its record is a marker, appended once the write is in place (while the range's stripes
    /// are still locked, so no overlapping record comes between them), which keeps a replay
    /// from putting older records back over the range. A daemon that dies between the two
    /// replays the older records: the write was never acknowledged. `Ok(false)`: the layer
    /// below refused and nothing was written; the caller records the write as usual.
    fn persisted(&self, offset: u64, buf: &[u8]) -> Result<bool> {
        self.check_refused()?;
        let len = buf.len() as u64;
        blockdev::check_range(offset, len, self.lower.size())?;
        let range = self.lock_range(offset, len);
        {
            let st = self.lock_state();
            if let Some(why) = &st.poisoned {
                return Err(Self::poisoned_error(why));
            }
            if st.flush_failed.is_some() {
                // Until a flush below succeeds again, every write keeps its data here (see
                // the module documentation on errors).
                return Ok(false);
            }
        }
        if !self.lower.write_in_place_persisted(buf, offset)? {
            return Ok(false);
        }
        crate::reconnect::test_abort_point("persisted");
        // A flush below that failed while the write was in its lower I/O may have dropped the
        // pages it put in place: checked again as the record goes in (state lock held), and
        // then the write is recorded with its data after all.
        let marker = self.append_record_unless(Kind::Persisted, offset, len, &[], |st| {
            st.flush_failed.is_some()
        })?;
        let seg = match marker {
            Some(seg) => {
                self.lock_state().persisted += 1;
                seg
            }
            None => self.append(Kind::Write, offset, len, buf)?,
        };
        self.done(seg);
        drop(range);
        Ok(true)
    }

    /// A write of `buf`: persisted in place with a marker where the layer below takes it so
    /// ([`Core::persisted`]; `try_persist`: its hint said it would), else recorded with its
    /// data.
    fn write(&self, buf: &[u8], offset: u64, try_persist: bool) -> Result<()> {
        if try_persist && self.persisted(offset, buf)? {
            return Ok(());
        }
        self.journaled(Kind::Write, offset, buf.len() as u64, buf, || {
            self.lower.write_at(buf, offset)
        })
    }

    /// Appends a record with `append` (the segment and what `op` needs) while the range's
    /// stripes are locked, runs `op`, and counts the lower operation done.
    fn in_record<T>(
        &self,
        offset: u64,
        len: u64,
        append: impl FnOnce() -> Result<(usize, T)>,
        op: impl FnOnce(T) -> Result<()>,
    ) -> Result<()> {
        self.check_refused()?;
        blockdev::check_range(offset, len, self.lower.size())?;
        let range = self.lock_range(offset, len);
        let (seg, arg) = append()?;
        crate::reconnect::test_abort_point("executing");
        let r = op(arg);
        self.done(seg);
        drop(range);
        r
    }
}

impl BlockDev for Journal {
    fn size(&self) -> u64 {
        self.core.lower.size()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.core.lower.read_at(buf, offset)
    }

    fn read_into(&self, dst: &dyn blockdev::ReadSink, offset: u64) -> Result<()> {
        self.core.lower.read_into(dst, offset)
    }

    fn plan_read(&self, offset: u64, len: u64) -> Option<blockdev::ReadPlan> {
        self.core.lower.plan_read(offset, len)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        let c = &self.core;
        c.write(
            buf,
            offset,
            c.lower.persists_in_place(offset, buf.len() as u64),
        )
    }

    /// With a mapping the record is filled from memory, so the write completes from memory
    /// where the layer below says so of it, unless writers are waiting for the journal's room.
    /// Without one (`pwritev`, or writes refused: a refused journal is never mapped) `false`.
    fn writes_in_memory(&self, offset: u64, len: u64) -> bool {
        let c = &self.core;
        c.map.is_some()
            && c.room_waiters.load(Ordering::Relaxed) == 0
            && c.lower.writes_in_memory(offset, len)
    }

    /// With a mapping: the record is the private copy of the data, so the caller's pieces go
    /// straight into it and the layer below gets the record's bytes.
    fn gathers_writes(&self) -> bool {
        self.core.map.is_some()
    }

    fn write_gathered(
        &self,
        offset: u64,
        len: usize,
        fill: &mut dyn FnMut(&mut [u8]) -> Result<()>,
    ) -> Result<()> {
        let c = &self.core;
        match &c.map {
            // Persisted in place, the caller's pieces are gathered into a buffer of this
            // thread's (no record holds them).
            Some(_) if c.lower.persists_in_place(offset, len as u64) => {
                blockdev::with_bounce(len, |buf| {
                    fill(buf)?;
                    c.write(buf, offset, true)
                })
            }
            Some(map) => c.journaled_gathered(map, offset, len, fill),
            None => blockdev::write_via_buffer(self, offset, len, fill),
        }
    }

    fn flush(&self) -> Result<()> {
        self.core.check_refused()?;
        self.core.flush_and_trim(true)
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        let c = &self.core;
        c.journaled(Kind::Discard, offset, len, &[], || {
            c.lower.discard(offset, len)
        })
    }

    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        let kind = if unmap {
            Kind::ZeroesUnmap
        } else {
            Kind::Zeroes
        };
        let c = &self.core;
        c.journaled(kind, offset, len, &[], || {
            c.lower.write_zeroes(offset, len, unmap)
        })
    }

    fn is_read_only(&self) -> bool {
        self.core.lower.is_read_only()
    }
}

#[cfg(test)]
#[path = "journal_tests.rs"]
mod tests;
