//! Crash-state simulation and fault injection under the qcow2 engine.
//!
//! # The durability contract these tools enforce
//!
//! - **Daemon killed (SIGKILL) or host power loss.** Everything the daemon acknowledged a FLUSH
//!   for survives: after reopening the image (the engine sees the dirty bit and repairs leaked
//!   refcounts, like QEMU), every 512-byte sector that was flushed reads back either its flushed
//!   value or a value a *later* request wrote into it. It never reads as zeros, as stale backing
//!   data, or as an older value, unless that was the flushed value. With the cache in writeback
//!   mode, writes acknowledged after the last completed FLUSH may be lost, but a sector is never
//!   half-applied: it holds one request's bytes, never a mix. The image itself stays consistent:
//!   `qemu-img check` exits 0 (clean) or 3 (leaked clusters only), never 2 (corruption).
//! - **I/O error from the image file** (EIO, ENOSPC on a write or on fdatasync). The request that
//!   hit it fails (the virtio layer answers `VIRTIO_BLK_S_IOERR`); data made durable by an earlier
//!   FLUSH stays intact; the image stays consistent (`qemu-img check` 0 or 3). After a one-off
//!   error the same open image keeps serving: other data reads back right, and a retried write
//!   plus FLUSH succeed, unless the engine deliberately marked the image corrupt and says so with
//!   `BlockError::Corrupt`.
//!
//! # What this module owns
//!
//! - [`Recorder`] / [`RecordingFile`]: an in-memory host file for the qcow2 engine that logs
//!   every write (offset and bytes), every length change and every `sync_data`, in the spirit of
//!   dm-log-writes.
//! - [`FaultyFile`]: a host file wrapper that fails the Nth write or the Nth sync with EIO or
//!   ENOSPC, once or from then on (QEMU iotest 026 style).
//! - [`CrashLog`] / [`crash_states`]: turn a recorded log into crash states (CrashMonkey/ALICE
//!   style): the file at every sync boundary, and for the writes in flight between two syncs
//!   their prefixes, random subsets (the writes may reach the disk in any order) and torn
//!   versions (each write cut into 4 KiB sectors of which a random subset lands).
//! - [`Workload`] / [`Driver`] / [`Expectation`]: random guest workloads, the shadow of what the
//!   guest was acknowledged at every flush, and the check of a recovered image against it.
//! - [`qemu_img_check`]: the real `qemu-img check` as a referee.
//!
//! Locking model: a [`Recorder`] keeps its whole state (current bytes, log) behind one mutex, so
//! the log is a total order of the host-file operations even when the engine or the cache issue
//! them from several threads. [`FaultyFile`] counts with atomics. Everything else is owned by
//! one test thread.

use std::io;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use blockdev::BlockDev;
use qcow_snapshot::{HostFile, QcowImage};
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};

/// Granularity at which the verifier compares guest data (the virtio-blk sector).
pub const GUEST_SECTOR: u64 = 512;
/// Largest in-memory file a [`Recorder`] accepts.
pub const MAX_MEM_FILE: u64 = 4 << 30;
/// Granularity at which recorded host writes may tear (a page / a 4Kn disk sector).
pub const TEAR_SECTOR: u64 = 4096;

// ---------------------------------------------------------------------------------------------
// Recording host file
// ---------------------------------------------------------------------------------------------

/// One host-file operation, in the order the engine issued it.
#[derive(Debug, Clone)]
pub enum Event {
    /// `write_at(data, offset)` that succeeded.
    Write {
        /// Byte offset in the host file.
        offset: u64,
        /// The bytes written.
        data: Arc<[u8]>,
    },
    /// `set_len(len)` that succeeded.
    SetLen(u64),
    /// `sync_data()` that succeeded: everything before it is durable.
    Sync,
}

#[derive(Debug)]
struct RecState {
    initial: Arc<Vec<u8>>,
    current: Vec<u8>,
    log: Vec<Event>,
    recording: bool,
}

/// The shared state behind one or more [`RecordingFile`] handles: the file's current bytes (what
/// a reader sees, i.e. the page cache) and the log of every mutation since recording started.
#[derive(Debug)]
pub struct Recorder {
    state: Mutex<RecState>,
}

fn apply_write(buf: &mut Vec<u8>, offset: u64, data: &[u8]) {
    let start = offset as usize;
    let end = start + data.len();
    if buf.len() < end {
        buf.resize(end, 0);
    }
    buf[start..end].copy_from_slice(data);
}

impl Recorder {
    /// A recorder whose file initially (and durably) holds `initial`. Recording is on.
    pub fn new(initial: Vec<u8>) -> Arc<Recorder> {
        Arc::new(Recorder {
            state: Mutex::new(RecState {
                current: initial.clone(),
                initial: Arc::new(initial),
                log: Vec::new(),
                recording: true,
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, RecState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A new handle on the file, for the engine.
    pub fn file(self: &Arc<Self>) -> RecordingFile {
        RecordingFile {
            rec: Arc::clone(self),
        }
    }

    /// Number of events logged so far (a position in the log).
    pub fn position(&self) -> usize {
        self.lock().log.len()
    }

    /// The file's current bytes (everything written, synced or not).
    pub fn current(&self) -> Vec<u8> {
        self.lock().current.clone()
    }

    /// Drops the log and makes the current bytes the new durable starting point.
    pub fn checkpoint(&self) {
        let mut st = self.lock();
        st.initial = Arc::new(st.current.clone());
        st.log.clear();
    }

    /// Turns logging on or off (writes still change the current bytes).
    pub fn set_recording(&self, on: bool) {
        self.lock().recording = on;
    }

    /// A copy of the log and its starting bytes.
    pub fn log(&self) -> CrashLog {
        let st = self.lock();
        CrashLog {
            initial: Arc::clone(&st.initial),
            events: st.log.clone(),
        }
    }

    /// The bytes that survive a power loss now: the starting bytes plus every event up to and
    /// including the last sync.
    pub fn durable(&self) -> Vec<u8> {
        let log = self.log();
        let upto = log
            .events
            .iter()
            .rposition(|e| matches!(e, Event::Sync))
            .map_or(0, |i| i + 1);
        log.apply_prefix(upto)
    }

    /// Forgets every write since the last sync: the current bytes become the durable ones and
    /// the log is cut after the last sync.
    pub fn revert_unsynced(&self) {
        let mut st = self.lock();
        let upto = st
            .log
            .iter()
            .rposition(|e| matches!(e, Event::Sync))
            .map_or(0, |i| i + 1);
        st.log.truncate(upto);
        let mut b = (*st.initial).clone();
        for e in &st.log {
            apply_event(&mut b, e);
        }
        st.current = b;
    }

    /// Log position just after the last sync (0 if none): everything before it is durable.
    pub fn durable_position(&self) -> usize {
        let st = self.lock();
        st.log
            .iter()
            .rposition(|e| matches!(e, Event::Sync))
            .map_or(0, |i| i + 1)
    }

    /// Reads like `pread`; bytes past the end read as zeros (the engine asks for exact ranges).
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let st = self.lock();
        let len = st.current.len() as u64;
        buf.fill(0);
        if offset < len {
            let start = offset as usize;
            let n = buf.len().min((len - offset) as usize);
            buf[..n].copy_from_slice(&st.current[start..start + n]);
        }
        Ok(())
    }

    /// Writes like `pwrite`, extending the file if needed, and logs the write.
    pub fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        // An in-memory file: refuse offsets that would allocate absurdly (EFBIG, like a real
        // file system past its maximum file size).
        if offset
            .checked_add(data.len() as u64)
            .is_none_or(|e| e > MAX_MEM_FILE)
        {
            return Err(io::Error::from_raw_os_error(libc::EFBIG));
        }
        let mut st = self.lock();
        apply_write(&mut st.current, offset, data);
        if st.recording {
            st.log.push(Event::Write {
                offset,
                data: Arc::from(data),
            });
        }
        Ok(())
    }

    /// Logs a sync.
    pub fn sync_data(&self) -> io::Result<()> {
        let mut st = self.lock();
        if st.recording {
            st.log.push(Event::Sync);
        }
        Ok(())
    }

    /// Current length of the file.
    pub fn len(&self) -> u64 {
        self.lock().current.len() as u64
    }

    /// Whether the file is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Truncates or extends the file and logs it.
    pub fn set_len(&self, len: u64) -> io::Result<()> {
        if len > MAX_MEM_FILE {
            return Err(io::Error::from_raw_os_error(libc::EFBIG));
        }
        let mut st = self.lock();
        st.current.resize(len as usize, 0);
        if st.recording {
            st.log.push(Event::SetLen(len));
        }
        Ok(())
    }
}

/// A host file for the qcow2 engine that lives in memory and logs into a [`Recorder`].
#[derive(Debug, Clone)]
pub struct RecordingFile {
    rec: Arc<Recorder>,
}

impl RecordingFile {
    /// The recorder behind this handle.
    pub fn recorder(&self) -> &Arc<Recorder> {
        &self.rec
    }
}

// ---------------------------------------------------------------------------------------------
// Fault injection
// ---------------------------------------------------------------------------------------------

/// Which host-file operation a [`FaultPlan`] counts and fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultOn {
    /// `write_at` (and `set_len`, which allocates like a write).
    Write,
    /// `sync_data`.
    Sync,
}

/// Whether the fault hits one operation or every one from the Nth on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultMode {
    /// Only the Nth operation fails.
    Once,
    /// The Nth and every later operation of that kind fail.
    Always,
}

/// When and how a [`FaultyFile`] fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FaultPlan {
    /// Which operations are counted.
    pub on: FaultOn,
    /// Zero-based index (among the counted operations since arming) of the first failing one.
    pub nth: u64,
    /// Once or always.
    pub mode: FaultMode,
    /// The errno returned (`libc::EIO`, `libc::ENOSPC`).
    pub errno: i32,
    /// Linux page-cache semantics of a failed `fdatasync` ("fsyncgate"): the writes since the
    /// last successful sync are dropped (the kernel marked the pages clean after the failed
    /// writeback), so a later successful sync does not make them durable.
    pub sync_error_loses_writes: bool,
}

impl FaultPlan {
    /// A plan with the given parameters and `sync_error_loses_writes` off.
    pub fn new(on: FaultOn, nth: u64, mode: FaultMode, errno: i32) -> FaultPlan {
        FaultPlan {
            on,
            nth,
            mode,
            errno,
            sync_error_loses_writes: false,
        }
    }
}

/// Counters and the plan shared between a [`FaultyFile`] and the test that drives it.
#[derive(Debug, Default)]
pub struct FaultControl {
    plan: Mutex<Option<FaultPlan>>,
    armed: AtomicBool,
    writes: AtomicU64,
    syncs: AtomicU64,
    injected: AtomicU64,
}

impl FaultControl {
    /// A control with no plan; counting starts when [`FaultControl::arm`] is called.
    pub fn new() -> Arc<FaultControl> {
        Arc::new(FaultControl::default())
    }

    /// Resets the counters and starts counting; `plan` (if any) applies from now on.
    pub fn arm(&self, plan: Option<FaultPlan>) {
        *self.plan.lock().unwrap_or_else(|e| e.into_inner()) = plan;
        self.writes.store(0, Ordering::SeqCst);
        self.syncs.store(0, Ordering::SeqCst);
        self.injected.store(0, Ordering::SeqCst);
        self.armed.store(true, Ordering::SeqCst);
    }

    /// Stops counting and failing.
    pub fn disarm(&self) {
        self.armed.store(false, Ordering::SeqCst);
        *self.plan.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// Writes (incl. `set_len`) seen since arming.
    pub fn writes(&self) -> u64 {
        self.writes.load(Ordering::SeqCst)
    }

    /// Syncs seen since arming.
    pub fn syncs(&self) -> u64 {
        self.syncs.load(Ordering::SeqCst)
    }

    /// How many operations failed on purpose since arming.
    pub fn injected(&self) -> u64 {
        self.injected.load(Ordering::SeqCst)
    }

    /// Counts one operation of kind `on` and says whether it must fail.
    fn check(&self, on: FaultOn) -> io::Result<()> {
        if !self.armed.load(Ordering::SeqCst) {
            return Ok(());
        }
        let n = match on {
            FaultOn::Write => self.writes.fetch_add(1, Ordering::SeqCst),
            FaultOn::Sync => self.syncs.fetch_add(1, Ordering::SeqCst),
        };
        let plan = *self.plan.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = plan {
            let hit = p.on == on
                && match p.mode {
                    FaultMode::Once => n == p.nth,
                    FaultMode::Always => n >= p.nth,
                };
            if hit {
                self.injected.fetch_add(1, Ordering::SeqCst);
                return Err(io::Error::from_raw_os_error(p.errno));
            }
        }
        Ok(())
    }
}

/// A host file over a [`Recorder`] that fails chosen operations. A failed write or sync does not
/// reach the recorder at all (the failed write changed nothing, which is one of the outcomes a
/// real failed write may have).
#[derive(Debug, Clone)]
pub struct FaultyFile {
    rec: Arc<Recorder>,
    ctl: Arc<FaultControl>,
}

impl FaultyFile {
    /// Wraps `rec`, failing as `ctl` says.
    pub fn new(rec: Arc<Recorder>, ctl: Arc<FaultControl>) -> FaultyFile {
        FaultyFile { rec, ctl }
    }

    /// Reads never fail.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.rec.read_at(buf, offset)
    }

    /// Fails if the plan says so, otherwise writes.
    pub fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        self.ctl.check(FaultOn::Write)?;
        self.rec.write_at(data, offset)
    }

    /// Fails if the plan says so (dropping unsynced writes if the plan models that), otherwise
    /// syncs.
    pub fn sync_data(&self) -> io::Result<()> {
        if let Err(e) = self.ctl.check(FaultOn::Sync) {
            let lose = self
                .ctl
                .plan
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .is_some_and(|p| p.sync_error_loses_writes);
            if lose {
                self.rec.revert_unsynced();
            }
            return Err(e);
        }
        self.rec.sync_data()
    }

    /// Current length.
    pub fn len(&self) -> u64 {
        self.rec.len()
    }

    /// Whether the file is empty.
    pub fn is_empty(&self) -> bool {
        self.rec.is_empty()
    }

    /// Fails like a write if the plan says so, otherwise resizes.
    pub fn set_len(&self, len: u64) -> io::Result<()> {
        self.ctl.check(FaultOn::Write)?;
        self.rec.set_len(len)
    }
}

impl HostFile for RecordingFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.rec.read_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.rec.write_at(buf, offset)
    }

    fn sync_data(&self) -> io::Result<()> {
        self.rec.sync_data()
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.rec.len())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.rec.set_len(len)
    }
}

impl HostFile for FaultyFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        FaultyFile::read_at(self, buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        FaultyFile::write_at(self, buf, offset)
    }

    fn sync_data(&self) -> io::Result<()> {
        FaultyFile::sync_data(self)
    }

    fn len(&self) -> io::Result<u64> {
        Ok(FaultyFile::len(self))
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        FaultyFile::set_len(self, len)
    }
}

// ---------------------------------------------------------------------------------------------
// Crash states
// ---------------------------------------------------------------------------------------------

/// A recorded log: the durable bytes when recording started, and every event since.
#[derive(Debug, Clone)]
pub struct CrashLog {
    /// The file's bytes at the start of the log (durable).
    pub initial: Arc<Vec<u8>>,
    /// The events in order.
    pub events: Vec<Event>,
}

/// How a crash state was built, for failure messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StateKind {
    /// Exactly the file as of a sync (or the start).
    SyncBoundary,
    /// The boundary plus the first `n` events of the in-flight window.
    Prefix(usize),
    /// The boundary plus a random subset of the window's events, in log order.
    Subset(usize),
    /// The boundary plus a random subset of the window's events, each write torn into 4 KiB
    /// sectors of which a random subset landed.
    Torn(usize),
}

/// One crash state: the host file's bytes after a simulated power loss.
#[derive(Debug, Clone)]
pub struct CrashState {
    /// The bytes.
    pub bytes: Vec<u8>,
    /// Every event before this log position is fully in `bytes` (it is just after a sync).
    pub durable_pos: usize,
    /// No event at or after this position is in `bytes`.
    pub window_end: usize,
    /// How it was made.
    pub kind: StateKind,
}

impl CrashLog {
    /// The file after applying the first `upto` events.
    pub fn apply_prefix(&self, upto: usize) -> Vec<u8> {
        let mut b = (*self.initial).clone();
        for e in self.events.iter().take(upto) {
            apply_event(&mut b, e);
        }
        b
    }

    /// Number of sync events.
    pub fn syncs(&self) -> usize {
        self.events
            .iter()
            .filter(|e| matches!(e, Event::Sync))
            .count()
    }

    /// Number of write events.
    pub fn writes(&self) -> usize {
        self.events
            .iter()
            .filter(|e| matches!(e, Event::Write { .. }))
            .count()
    }
}

fn apply_event(b: &mut Vec<u8>, e: &Event) {
    match e {
        Event::Write { offset, data } => apply_write(b, *offset, data),
        Event::SetLen(l) => b.resize(*l as usize, 0),
        Event::Sync => {}
    }
}

/// Applies the parts of `data` (written at `offset`) that fall into the 4 KiB sectors selected by
/// `keep(sector_index_within_write)`.
fn apply_torn(b: &mut Vec<u8>, offset: u64, data: &[u8], keep: &mut dyn FnMut(usize) -> bool) {
    let end = offset + data.len() as u64;
    let mut pos = offset;
    let mut idx = 0;
    while pos < end {
        let next = ((pos / TEAR_SECTOR) + 1) * TEAR_SECTOR;
        let piece_end = next.min(end);
        if keep(idx) {
            let s = (pos - offset) as usize;
            let e = (piece_end - offset) as usize;
            apply_write(b, pos, &data[s..e]);
        }
        idx += 1;
        pos = piece_end;
    }
}

/// How many states of each kind [`crash_states`] makes per in-flight window.
#[derive(Debug, Clone, Copy)]
pub struct StateBudget {
    /// Prefix states per window (all of them if the window is shorter).
    pub prefixes: usize,
    /// Random-subset states per window.
    pub subsets: usize,
    /// Torn-write states per window.
    pub torn: usize,
}

impl Default for StateBudget {
    fn default() -> Self {
        StateBudget {
            prefixes: 6,
            subsets: 4,
            torn: 4,
        }
    }
}

/// Generates crash states from `log` and hands each to `visit`; stops early when `visit` returns
/// `false`. Returns the number of states visited. Windows are visited in log order; within a
/// window, the sync boundary first, then prefixes (evenly spread, always including the full
/// window), subsets and torn states.
pub fn crash_states(
    log: &CrashLog,
    budget: StateBudget,
    seed: u64,
    visit: &mut dyn FnMut(CrashState) -> bool,
) -> usize {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut base = (*log.initial).clone();
    let mut start = 0usize;
    let mut count = 0usize;
    loop {
        let end = log.events[start..]
            .iter()
            .position(|e| matches!(e, Event::Sync))
            .map_or(log.events.len(), |i| start + i);
        let window = &log.events[start..end];
        let n = window.len();
        count += 1;
        if !visit(CrashState {
            bytes: base.clone(),
            durable_pos: start,
            window_end: end,
            kind: StateKind::SyncBoundary,
        }) {
            return count;
        }
        if n > 0 {
            // Prefixes: spread over 1..=n, always including n.
            let want = budget.prefixes.min(n);
            let mut lens: Vec<usize> = (1..=want).map(|i| (i * n).div_ceil(want)).collect();
            lens.dedup();
            let mut cur = base.clone();
            let mut applied = 0;
            for l in lens {
                while applied < l {
                    apply_event(&mut cur, &window[applied]);
                    applied += 1;
                }
                count += 1;
                if !visit(CrashState {
                    bytes: cur.clone(),
                    durable_pos: start,
                    window_end: end,
                    kind: StateKind::Prefix(l),
                }) {
                    return count;
                }
            }
            if n > 1 {
                for _ in 0..budget.subsets {
                    let mut b = base.clone();
                    let mut k = 0;
                    for e in window {
                        if rng.random_bool(0.5) {
                            apply_event(&mut b, e);
                            k += 1;
                        }
                    }
                    count += 1;
                    if !visit(CrashState {
                        bytes: b,
                        durable_pos: start,
                        window_end: end,
                        kind: StateKind::Subset(k),
                    }) {
                        return count;
                    }
                }
            }
            let has_write = window.iter().any(|e| matches!(e, Event::Write { .. }));
            if has_write {
                for _ in 0..budget.torn {
                    let mut b = base.clone();
                    let mut k = 0;
                    for e in window {
                        match e {
                            Event::Write { offset, data } => {
                                if rng.random_bool(0.7) {
                                    k += 1;
                                    apply_torn(&mut b, *offset, data, &mut |_| {
                                        rng.random_bool(0.5)
                                    });
                                }
                            }
                            other => {
                                if rng.random_bool(0.5) {
                                    apply_event(&mut b, other);
                                }
                            }
                        }
                    }
                    count += 1;
                    if !visit(CrashState {
                        bytes: b,
                        durable_pos: start,
                        window_end: end,
                        kind: StateKind::Torn(k),
                    }) {
                        return count;
                    }
                }
            }
        }
        if end >= log.events.len() {
            return count;
        }
        for e in window {
            apply_event(&mut base, e);
        }
        start = end + 1;
    }
}

// ---------------------------------------------------------------------------------------------
// Workloads, shadows, expectations
// ---------------------------------------------------------------------------------------------

/// One guest request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestOp {
    /// Write `len` bytes of pattern `seed` at `offset`.
    Write { offset: u64, len: u64, seed: u64 },
    /// Write zeroes, optionally allowing deallocation.
    WriteZeroes { offset: u64, len: u64, unmap: bool },
    /// Discard.
    Discard { offset: u64, len: u64 },
    /// Flush.
    Flush,
}

/// Fills `buf` with a pattern derived from `seed` and the absolute guest offset of each sector,
/// so that every (write, sector) pair has distinct, non-zero content.
pub fn pattern(seed: u64, offset: u64, buf: &mut [u8]) {
    for (i, chunk) in buf.chunks_mut(GUEST_SECTOR as usize).enumerate() {
        let sector = offset / GUEST_SECTOR + i as u64;
        let mut x = seed
            .wrapping_mul(0x9e37_79b9_7f4a_7c15)
            .wrapping_add(sector.wrapping_mul(0xbf58_476d_1ce4_e5b9))
            | 1;
        for b in chunk.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let bytes = (x | 0x0101_0101_0101_0101).to_le_bytes();
            b.copy_from_slice(&bytes[..b.len()]);
        }
    }
}

/// Parameters of a random workload.
#[derive(Debug, Clone, Copy)]
pub struct WorkloadSpec {
    /// Virtual disk size (multiple of 512).
    pub disk_size: u64,
    /// Cluster size of the image under test (to aim at partial/whole-cluster cases).
    pub cluster_size: u64,
    /// Number of requests (flushes included).
    pub ops: usize,
    /// Probability weights: write, write-zeroes, discard, flush.
    pub weights: [u32; 4],
    /// Largest request, in bytes.
    pub max_len: u64,
}

/// A random workload: writes (sub-cluster, cluster-aligned, cross-cluster), write-zeroes,
/// discards and flushes, always ending with a flush.
pub fn random_workload(spec: &WorkloadSpec, rng: &mut StdRng) -> Vec<GuestOp> {
    let sectors = spec.disk_size / GUEST_SECTOR;
    let total: u32 = spec.weights.iter().sum();
    let mut ops = Vec::with_capacity(spec.ops + 1);
    for _ in 0..spec.ops {
        let pick = rng.random_range(0..total.max(1));
        let (offset, len) = random_range(spec, sectors, rng);
        let mut acc = 0;
        let mut kind = 3;
        for (i, w) in spec.weights.iter().enumerate() {
            acc += w;
            if pick < acc {
                kind = i;
                break;
            }
        }
        ops.push(match kind {
            0 => GuestOp::Write {
                offset,
                len,
                seed: rng.next_u64(),
            },
            1 => GuestOp::WriteZeroes {
                offset,
                len,
                unmap: rng.random_bool(0.5),
            },
            2 => GuestOp::Discard { offset, len },
            _ => GuestOp::Flush,
        });
    }
    ops.push(GuestOp::Flush);
    ops
}

fn random_range(spec: &WorkloadSpec, sectors: u64, rng: &mut StdRng) -> (u64, u64) {
    let cs = spec.cluster_size.max(GUEST_SECTOR);
    let max_sectors = (spec.max_len / GUEST_SECTOR).clamp(1, sectors);
    match rng.random_range(0..4) {
        // Whole clusters, aligned.
        0 if cs <= spec.max_len && cs < spec.disk_size => {
            let clusters = spec.disk_size / cs;
            let n = rng.random_range(1..=(spec.max_len / cs).clamp(1, clusters));
            let first = rng.random_range(0..=clusters - n);
            (first * cs, n * cs)
        }
        // Inside one cluster.
        1 if cs > GUEST_SECTOR => {
            let clusters = spec.disk_size / cs;
            let c = rng.random_range(0..clusters);
            let per = cs / GUEST_SECTOR;
            let s = rng.random_range(0..per);
            let n = rng.random_range(1..=(per - s).min(max_sectors));
            (c * cs + s * GUEST_SECTOR, n * GUEST_SECTOR)
        }
        // Anything.
        _ => {
            let n = rng.random_range(1..=max_sectors);
            let s = rng.random_range(0..=sectors - n);
            (s * GUEST_SECTOR, n * GUEST_SECTOR)
        }
    }
}

/// What one request did to the guest-visible disk.
#[derive(Debug, Clone)]
pub struct OpRecord {
    /// The request.
    pub op: GuestOp,
    /// Log position when it was submitted.
    pub start_pos: usize,
    /// Whether it completed successfully.
    pub ok: bool,
}

/// The guest-visible disk as acknowledged by a completed flush.
#[derive(Debug, Clone)]
pub struct FlushRecord {
    /// Log position when the flush returned.
    pub pos: usize,
    /// How many requests were submitted before the flush.
    pub ops_before: usize,
    /// The guest-visible content the flush made durable.
    pub shadow: Arc<Vec<u8>>,
    /// Failed requests before the flush whose sectors may hold their value instead.
    pub uncertain_ops: Vec<GuestOp>,
}

/// Drives a [`BlockDev`] with guest requests, keeps the shadow of what it acknowledged, and the
/// shadow as of every completed flush.
pub struct Driver {
    /// What the guest must read now (exact for every sector written by a completed request; for
    /// sectors of a failed request see [`Driver::uncertain`]).
    pub shadow: Vec<u8>,
    /// Sectors whose content is one of several values because a write-type request failed.
    pub uncertain: Vec<bool>,
    /// Every request submitted.
    pub ops: Vec<OpRecord>,
    /// Every completed flush, the first one being the starting state (position 0).
    pub flushes: Vec<FlushRecord>,
    /// Failed write-type requests whose range is still (partly) uncertain.
    failed: Vec<GuestOp>,
    position: Box<dyn Fn() -> usize + Send + Sync>,
}

impl std::fmt::Debug for Driver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Driver")
            .field("ops", &self.ops.len())
            .field("flushes", &self.flushes.len())
            .finish()
    }
}

impl Driver {
    /// A driver whose disk initially (and durably) shows `initial`; `position` reads the
    /// recorder's log position.
    pub fn new(initial: Vec<u8>, position: Box<dyn Fn() -> usize + Send + Sync>) -> Driver {
        let sectors = initial.len() / GUEST_SECTOR as usize;
        let shadow0 = Arc::new(initial.clone());
        Driver {
            shadow: initial,
            uncertain: vec![false; sectors],
            ops: Vec::new(),
            flushes: vec![FlushRecord {
                pos: 0,
                ops_before: 0,
                shadow: shadow0,
                uncertain_ops: Vec::new(),
            }],
            failed: Vec::new(),
            position,
        }
    }

    /// Submits `op` to `dev`, updating the shadows. Returns the request's result.
    pub fn run(&mut self, dev: &dyn BlockDev, op: &GuestOp) -> blockdev::Result<()> {
        let start_pos = (self.position)();
        let res = match *op {
            GuestOp::Write { offset, len, seed } => {
                let mut buf = vec![0u8; len as usize];
                pattern(seed, offset, &mut buf);
                let r = dev.write_at(&buf, offset);
                self.note(op, r.is_ok(), Some(&buf));
                r
            }
            GuestOp::WriteZeroes { offset, len, unmap } => {
                let r = dev.write_zeroes(offset, len, unmap);
                self.note(op, r.is_ok(), None);
                r
            }
            GuestOp::Discard { offset, len } => {
                let r = dev.discard(offset, len);
                self.note(op, r.is_ok(), None);
                r
            }
            GuestOp::Flush => {
                let r = dev.flush();
                if r.is_ok() {
                    self.flushes.push(FlushRecord {
                        pos: (self.position)(),
                        ops_before: self.ops.len(),
                        shadow: Arc::new(self.shadow.clone()),
                        uncertain_ops: self.failed.clone(),
                    });
                }
                r
            }
        };
        self.ops.push(OpRecord {
            op: op.clone(),
            start_pos,
            ok: res.is_ok(),
        });
        res
    }

    fn note(&mut self, op: &GuestOp, ok: bool, data: Option<&[u8]>) {
        let Some((offset, len)) = op_range(op) else {
            return;
        };
        let s = offset as usize;
        let e = s + len as usize;
        let (first, last) = (s / GUEST_SECTOR as usize, e.div_ceil(GUEST_SECTOR as usize));
        if ok {
            match data {
                Some(d) => self.shadow[s..e].copy_from_slice(d),
                None => self.shadow[s..e].fill(0),
            }
            for u in &mut self.uncertain[first..last] {
                *u = false;
            }
        } else {
            for u in &mut self.uncertain[first..last] {
                *u = true;
            }
            self.failed.push(op.clone());
        }
        let unc = &self.uncertain;
        self.failed.retain(|op| {
            op_range(op).is_some_and(|(o, l)| {
                let a = (o / GUEST_SECTOR) as usize;
                let b = (o + l).div_ceil(GUEST_SECTOR) as usize;
                unc[a..b].iter().any(|&u| u)
            })
        });
    }

    /// Reads the whole device and compares it with the live shadow: sectors written by completed
    /// requests must match exactly; sectors made uncertain by a failed request may hold their old
    /// value or the failed request's value.
    pub fn verify_live(&self, dev: &dyn BlockDev) -> Result<(), String> {
        let mut got = vec![0u8; self.shadow.len()];
        read_all(dev, &mut got).map_err(|e| format!("reading the device back failed: {e}"))?;
        let ss = GUEST_SECTOR as usize;
        let exp = Expectation {
            flushed: Arc::new(Vec::new()),
            later: self.failed.clone(),
        };
        let mut nbad = 0;
        let mut first = Vec::new();
        for (i, (g, s)) in got.chunks(ss).zip(self.shadow.chunks(ss)).enumerate() {
            if g == s || (self.uncertain[i] && exp.later_explains((i * ss) as u64, g)) {
                continue;
            }
            nbad += 1;
            if first.len() < 8 {
                first.push(describe_sector((i * ss) as u64, g, s));
            }
        }
        if nbad == 0 {
            Ok(())
        } else {
            Err(format!(
                "live image differs from the shadow in {nbad} sector(s): {}",
                first.join("; ")
            ))
        }
    }

    /// What a crash state with everything before `durable_pos` durable and nothing at or after
    /// `window_end` must show.
    pub fn expectation(&self, durable_pos: usize, window_end: usize) -> Expectation {
        let f = self
            .flushes
            .iter()
            .rev()
            .find(|f| f.pos <= durable_pos)
            .unwrap_or(&self.flushes[0]);
        let mut later = f.uncertain_ops.clone();
        later.extend(
            self.ops[f.ops_before..]
                .iter()
                .filter(|o| o.start_pos < window_end)
                .map(|o| o.op.clone()),
        );
        Expectation {
            flushed: Arc::clone(&f.shadow),
            later,
        }
    }

    /// The expectation for the image as it is now on disk, with everything before `durable_pos`
    /// known to be durable (every request so far may have landed).
    pub fn expectation_now(&self, durable_pos: usize) -> Expectation {
        self.expectation(durable_pos, usize::MAX)
    }

    /// The shadow as of the last completed flush.
    pub fn last_flushed(&self) -> &FlushRecord {
        self.flushes.last().unwrap_or(&self.flushes[0])
    }

    /// Number of completed flushes (without the starting state).
    pub fn flush_count(&self) -> usize {
        self.flushes.len() - 1
    }
}

/// Reads the whole device into `buf` in 256 KiB pieces.
pub fn read_all(dev: &dyn BlockDev, buf: &mut [u8]) -> blockdev::Result<()> {
    for (i, chunk) in buf.chunks_mut(256 << 10).enumerate() {
        dev.read_at(chunk, (i as u64) * (256 << 10))?;
    }
    Ok(())
}

/// The allowed content of a recovered disk: each sector holds its flushed value, or the value of
/// one of the requests issued after that flush.
#[derive(Debug, Clone)]
pub struct Expectation {
    /// Guest content at the last durable flush.
    pub flushed: Arc<Vec<u8>>,
    /// Requests issued after it (and before the crash point).
    pub later: Vec<GuestOp>,
}

impl Expectation {
    /// Checks `got` (the whole recovered disk); the error names the first bad sectors.
    pub fn verify(&self, got: &[u8]) -> Result<(), String> {
        if got.len() != self.flushed.len() {
            return Err(format!(
                "disk size {} != expected {}",
                got.len(),
                self.flushed.len()
            ));
        }
        let ss = GUEST_SECTOR as usize;
        let mut bad = Vec::new();
        let mut nbad = 0usize;
        for (i, (g, f)) in got.chunks(ss).zip(self.flushed.chunks(ss)).enumerate() {
            if g == f {
                continue;
            }
            let off = (i * ss) as u64;
            let ok = self.later_explains(off, g);
            if !ok {
                nbad += 1;
                if bad.len() < 8 {
                    bad.push(describe_sector(off, g, f));
                }
            }
        }
        if nbad == 0 {
            Ok(())
        } else {
            Err(format!(
                "{nbad} sector(s) hold neither the flushed value nor a later write: {}",
                bad.join("; ")
            ))
        }
    }
}

impl Expectation {
    /// Whether one of the later requests wrote exactly `got` into the sector at `off`.
    pub fn later_explains(&self, off: u64, got: &[u8]) -> bool {
        let mut tmp = vec![0u8; got.len()];
        self.later.iter().any(|op| match *op {
            GuestOp::Write { offset, len, seed } if covers(offset, len, off) => {
                pattern(seed, off, &mut tmp);
                got == &tmp[..]
            }
            GuestOp::WriteZeroes { offset, len, .. } | GuestOp::Discard { offset, len } => {
                covers(offset, len, off) && got.iter().all(|&b| b == 0)
            }
            _ => false,
        })
    }
}

/// The byte range a write-type request touches.
pub fn op_range(op: &GuestOp) -> Option<(u64, u64)> {
    match *op {
        GuestOp::Write { offset, len, .. }
        | GuestOp::WriteZeroes { offset, len, .. }
        | GuestOp::Discard { offset, len } => Some((offset, len)),
        GuestOp::Flush => None,
    }
}

fn covers(offset: u64, len: u64, sector_off: u64) -> bool {
    sector_off >= offset && sector_off < offset + len
}

fn describe_sector(off: u64, got: &[u8], flushed: &[u8]) -> String {
    let what = if got.iter().all(|&b| b == 0) {
        "zeros".to_string()
    } else {
        format!("{:02x?}..", &got[..8.min(got.len())])
    };
    format!(
        "sector at {off:#x}: got {what}, flushed {:02x?}..",
        &flushed[..8.min(flushed.len())]
    )
}

// ---------------------------------------------------------------------------------------------
// Overlays under test
// ---------------------------------------------------------------------------------------------

/// What the overlay under test sits on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BaseKind {
    /// No backing file: unallocated clusters read as zeros.
    None,
    /// A raw backing file with random content.
    Raw,
    /// A qcow2 backing file with random content, zero and unallocated clusters.
    Qcow2,
}

/// A fresh qcow2 overlay (in memory) over a backing device, ready to be opened many times.
pub struct Overlay {
    /// The backing kind.
    pub kind: BaseKind,
    /// Virtual disk size.
    pub disk_size: u64,
    /// Cluster size of the overlay.
    pub cluster_size: u64,
    /// The backing device handed to the engine (read-only).
    pub backing: Option<Arc<dyn BlockDev>>,
    /// What the guest sees before the first write (the backing content, or zeros).
    pub guest_initial: Vec<u8>,
    /// The bytes of the newly created overlay file.
    pub fresh: Vec<u8>,
}

impl std::fmt::Debug for Overlay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Overlay")
            .field("kind", &self.kind)
            .field("disk_size", &self.disk_size)
            .field("cluster_size", &self.cluster_size)
            .finish()
    }
}

/// Why an overlay scenario could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildOverlayError {
    /// Creating an image failed.
    #[error("creating an image failed: {0}")]
    Create(#[from] qcow_snapshot::CreateImageError),
    /// Opening an image failed.
    #[error("opening an image failed: {0}")]
    Open(#[from] qcow_snapshot::OpenImageError),
    /// An I/O on the base failed.
    #[error("base image I/O failed: {0}")]
    Block(#[from] blockdev::BlockError),
    /// Writing the base file failed.
    #[error("writing the base file failed: {0}")]
    Io(#[from] io::Error),
}

impl Overlay {
    /// Builds a base of `kind` (also written into `dir`, so `qemu-img` can find it) and a fresh
    /// overlay of `disk_size` bytes with `cluster_size` clusters over it (with extended L2
    /// entries, i.e. subclusters, when `extended_l2`).
    pub fn build(
        dir: &Path,
        kind: BaseKind,
        disk_size: u64,
        cluster_size: u64,
        refcount_order: u32,
        extended_l2: bool,
        rng: &mut StdRng,
    ) -> Result<Overlay, BuildOverlayError> {
        let mut content = vec![0u8; disk_size as usize];
        let (backing, backing_opt): (Option<Arc<dyn BlockDev>>, _) = match kind {
            BaseKind::None => (None, None),
            BaseKind::Raw => {
                rng.fill_bytes(&mut content);
                // Some zero runs, so "zeros" is not always a wrong answer.
                for chunk in content.chunks_mut(8192) {
                    if rng.random_bool(0.15) {
                        chunk.fill(0);
                    }
                }
                let path = dir.join("base.raw");
                std::fs::write(&path, &content)?;
                let dev: Arc<dyn BlockDev> = Arc::new(blockdev::MemDisk::from_vec(content.clone()));
                (
                    Some(dev),
                    Some((path.display().to_string(), qcow_snapshot::Format::Raw)),
                )
            }
            BaseKind::Qcow2 => {
                let host = Arc::new(qcow_snapshot::MemHost::default());
                let opts = qcow_snapshot::CreateOptions {
                    size: disk_size,
                    cluster_size: 4096,
                    ..Default::default()
                };
                qcow_snapshot::create_on(&*host, &opts)?;
                {
                    let img =
                        QcowImage::open_with(Box::new(SharedMem(Arc::clone(&host))), false, None)?;
                    let mut buf = vec![0u8; 4096];
                    for off in (0..disk_size).step_by(4096) {
                        match rng.random_range(0..10) {
                            0..=5 => {
                                rng.fill_bytes(&mut buf);
                                img.write_at(&buf, off)?;
                            }
                            6 => img.write_zeroes(off, 4096, true)?,
                            _ => {}
                        }
                    }
                    img.close()?;
                }
                let bytes = host.contents();
                let path = dir.join("base.qcow2");
                std::fs::write(&path, &bytes)?;
                let img =
                    QcowImage::open_with(Box::new(qcow_snapshot::MemHost::new(bytes)), true, None)?;
                read_all(&img, &mut content)?;
                let dev: Arc<dyn BlockDev> = Arc::new(img);
                (
                    Some(dev),
                    Some((path.display().to_string(), qcow_snapshot::Format::Qcow2)),
                )
            }
        };
        let host = qcow_snapshot::MemHost::default();
        let opts = qcow_snapshot::CreateOptions {
            size: disk_size,
            cluster_size,
            backing: backing_opt,
            refcount_order,
            extended_l2,
        };
        qcow_snapshot::create_on(&host, &opts)?;
        Ok(Overlay {
            kind,
            disk_size,
            cluster_size,
            backing,
            guest_initial: content,
            fresh: host.contents(),
        })
    }

    /// Opens the overlay stored in `host` read-write over this scenario's backing device.
    pub fn open(
        &self,
        host: Box<dyn HostFile>,
    ) -> Result<QcowImage, qcow_snapshot::OpenImageError> {
        QcowImage::open_with(host, false, self.backing.clone())
    }
}

/// A [`qcow_snapshot::MemHost`] shared with the test, so its bytes can be read after the engine
/// took ownership of the handle.
#[derive(Debug, Clone)]
pub struct SharedMem(pub Arc<qcow_snapshot::MemHost>);

impl HostFile for SharedMem {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.0.read_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.0.write_at(buf, offset)
    }

    fn sync_data(&self) -> io::Result<()> {
        self.0.sync_data()
    }

    fn len(&self) -> io::Result<u64> {
        self.0.len()
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }
}

/// Judges recovered images: the in-process checker on every one, `qemu-img check` on a sample,
/// then the engine's own recovery (dirty-bit repair) and a byte comparison against the
/// expectation, then both checkers again on the repaired and cleanly closed image.
#[derive(Debug)]
pub struct Referee {
    path: std::path::PathBuf,
    /// Run `qemu-img check` on every `qemu_every`-th judged image (0: never).
    pub qemu_every: usize,
    /// Images judged.
    pub judged: usize,
    /// `qemu-img check` runs.
    pub qemu_runs: usize,
    /// Judged images that needed a leak repair (checker exit 3 before reopening).
    pub leaky: usize,
    have_qemu: bool,
}

impl Referee {
    /// A referee writing its scratch image into `dir`.
    pub fn new(dir: &Path, qemu_every: usize) -> Referee {
        Referee {
            path: dir.join("state.qcow2"),
            qemu_every,
            judged: 0,
            qemu_runs: 0,
            leaky: 0,
            have_qemu: have_qemu_img(),
        }
    }

    fn checkers(
        &mut self,
        bytes: &[u8],
        allowed: &[i32],
        qemu: bool,
        stage: &str,
    ) -> Result<i32, String> {
        std::fs::write(&self.path, bytes).map_err(|e| format!("writing the state file: {e}"))?;
        let code = match snapblk_check(&self.path) {
            Ok((code, _)) if allowed.contains(&code) => code,
            Ok((code, text)) => {
                return Err(format!(
                    "{stage}: snapblk check exit {code} (allowed {allowed:?}):\n{text}"
                ));
            }
            Err(e) => return Err(format!("{stage}: snapblk check could not run: {e}")),
        };
        if qemu {
            self.qemu_runs += 1;
            let (qcode, text) = qemu_img_check(&self.path)
                .map_err(|e| format!("{stage}: running qemu-img: {e}"))?;
            if !allowed.contains(&qcode) {
                return Err(format!(
                    "{stage}: qemu-img check exit {qcode} (allowed {allowed:?}):\n{text}"
                ));
            }
            if qcode != code {
                return Err(format!(
                    "{stage}: snapblk check (exit {code}) and qemu-img check (exit {qcode}) disagree:\n{text}"
                ));
            }
        }
        Ok(code)
    }

    /// Judges one recovered image file `bytes` of overlay `ov` against `exp`. With
    /// `SNAPBLK_CRASH_DUMP=DIR` set, a failing image is saved there for inspection.
    pub fn judge(&mut self, ov: &Overlay, bytes: &[u8], exp: &Expectation) -> Result<(), String> {
        let r = self.judge_inner(ov, bytes, exp);
        if let (Err(e), Some(dir)) = (&r, std::env::var_os("SNAPBLK_CRASH_DUMP")) {
            let path = Path::new(&dir).join(format!(
                "failed-{}-{}.qcow2",
                std::process::id(),
                self.judged
            ));
            if std::fs::write(&path, bytes).is_ok() {
                return Err(format!("{e}\n(image saved as {})", path.display()));
            }
        }
        r
    }

    fn judge_inner(&mut self, ov: &Overlay, bytes: &[u8], exp: &Expectation) -> Result<(), String> {
        self.judged += 1;
        let qemu = self.have_qemu
            && self.qemu_every > 0
            && self.judged % self.qemu_every == 1 % self.qemu_every;
        let code = self.checkers(bytes, &[0, 3], qemu, "before recovery")?;
        if code == 3 {
            self.leaky += 1;
        }
        let rec = Recorder::new(bytes.to_vec());
        rec.set_recording(false);
        let img = ov
            .open(Box::new(rec.file()))
            .map_err(|e| format!("the engine cannot reopen the image: {e}"))?;
        let mut got = vec![0u8; ov.disk_size as usize];
        read_all(&img, &mut got).map_err(|e| format!("reading the recovered image failed: {e}"))?;
        exp.verify(&got)?;
        img.close()
            .map_err(|e| format!("closing the recovered image failed: {e}"))?;
        drop(img);
        self.checkers(&rec.current(), &[0], qemu, "after recovery and clean close")?;
        Ok(())
    }
}

/// Runs snapblk's own checker (`qcow_snapshot::check::check`) on `path`: exit code and report.
pub fn snapblk_check(path: &Path) -> Result<(i32, String), qcow_snapshot::check::CheckError> {
    let r = qcow_snapshot::check::check(path, None)?;
    let mut text = format!("{r}");
    for m in r.messages.iter().take(12) {
        text.push('\n');
        text.push_str(m);
    }
    if r.messages.len() > 12 {
        text.push_str(&format!("\n... {} more messages", r.messages.len() - 12));
    }
    Ok((r.exit_code(), text))
}

// ---------------------------------------------------------------------------------------------
// Referees
// ---------------------------------------------------------------------------------------------

/// Whether `qemu-img` can be run.
pub fn have_qemu_img() -> bool {
    Command::new("qemu-img")
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// Runs `qemu-img check -f qcow2 PATH`; returns its exit code and output.
pub fn qemu_img_check(path: &Path) -> io::Result<(i32, String)> {
    let out = Command::new("qemu-img")
        .args(["check", "-f", "qcow2"])
        .arg(path)
        .output()?;
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    let lines: Vec<&str> = text.lines().collect();
    if lines.len() > 16 {
        text = format!(
            "{}\n... {} more lines",
            lines[..16].join("\n"),
            lines.len() - 16
        );
    }
    Ok((out.status.code().unwrap_or(-1), text))
}

/// A seed from `SNAPBLK_CRASH_SEED` or the clock, printed so a failure can be replayed.
pub fn seed_from_env(test: &str) -> u64 {
    let seed = std::env::var("SNAPBLK_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(42)
        });
    eprintln!("{test}: seed {seed} (replay with SNAPBLK_CRASH_SEED={seed})");
    seed
}

/// A directory for crash-state files: on tmpfs when there is one.
pub fn state_dir() -> io::Result<tempfile::TempDir> {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        if let Ok(d) = tempfile::Builder::new()
            .prefix("snapblk-crash")
            .tempdir_in(shm)
        {
            return Ok(d);
        }
    }
    tempfile::Builder::new().prefix("snapblk-crash").tempdir()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(offset: u64, data: &[u8]) -> Event {
        Event::Write {
            offset,
            data: Arc::from(data),
        }
    }

    #[test]
    fn crash_states_cover_boundaries_prefixes_and_never_apply_past_the_window() {
        let log = CrashLog {
            initial: Arc::new(vec![0u8; 8192]),
            events: vec![
                w(0, &[1; 4096]),
                w(4096, &[2; 4096]),
                Event::Sync,
                w(0, &[3; 8192]),
            ],
        };
        let mut states = Vec::new();
        let n = crash_states(&log, StateBudget::default(), 1, &mut |s| {
            states.push(s);
            true
        });
        assert_eq!(n, states.len());
        // Window 1: boundary (all zero), prefixes 1 and 2, subsets, torn.
        assert!(states[0].bytes.iter().all(|&b| b == 0));
        assert_eq!(states[0].kind, StateKind::SyncBoundary);
        for s in states.iter().filter(|s| s.durable_pos == 0) {
            assert!(
                s.bytes.iter().all(|&b| b <= 2),
                "{:?} applied past the sync",
                s.kind
            );
            assert_eq!(s.window_end, 2);
        }
        // Window 2 starts from the synced state.
        let w2: Vec<_> = states.iter().filter(|s| s.durable_pos == 3).collect();
        assert_eq!(w2[0].kind, StateKind::SyncBoundary);
        assert_eq!(&w2[0].bytes[..4096], &[1; 4096][..]);
        assert_eq!(&w2[0].bytes[4096..], &[2; 4096][..]);
        // Torn states of the 8 KiB write mix old and new 4 KiB sectors but never inside one.
        for s in &w2 {
            for sec in s.bytes.chunks(4096) {
                assert!(
                    sec.iter().all(|&b| b == sec[0]),
                    "torn inside a 4 KiB sector"
                );
            }
        }
        assert!(w2.iter().any(|s| s.bytes.iter().all(|&b| b == 3)));
    }

    #[test]
    fn faulty_file_fails_exactly_the_planned_operations() {
        let rec = Recorder::new(vec![0; 16]);
        let ctl = FaultControl::new();
        let f = FaultyFile::new(Arc::clone(&rec), Arc::clone(&ctl));
        ctl.arm(Some(FaultPlan::new(
            FaultOn::Write,
            1,
            FaultMode::Once,
            libc::EIO,
        )));
        assert!(f.write_at(&[1], 0).is_ok());
        assert_eq!(
            f.write_at(&[2], 1).unwrap_err().raw_os_error(),
            Some(libc::EIO)
        );
        assert!(f.write_at(&[3], 2).is_ok());
        assert!(f.sync_data().is_ok());
        assert_eq!(&rec.current()[..3], &[1, 0, 3]);
        ctl.arm(Some(FaultPlan::new(
            FaultOn::Sync,
            0,
            FaultMode::Always,
            libc::ENOSPC,
        )));
        assert!(f.sync_data().is_err());
        assert!(f.sync_data().is_err());
        assert!(f.write_at(&[4], 3).is_ok());
        assert_eq!(ctl.injected(), 2);
        // The durable view ends at the last successful sync.
        assert_eq!(rec.durable()[3], 0);
        assert_eq!(rec.current()[3], 4);
    }

    #[test]
    fn expectation_rejects_zeros_and_stale_data_where_a_flushed_value_was() {
        let mut d = Driver::new(vec![7u8; 4096], Box::new(|| 0));
        let dev = blockdev::MemDisk::new(4096);
        dev.write_at(&[7u8; 4096], 0).unwrap();
        d.run(
            &dev,
            &GuestOp::Write {
                offset: 0,
                len: 1024,
                seed: 5,
            },
        )
        .unwrap();
        d.run(&dev, &GuestOp::Flush).unwrap();
        d.run(
            &dev,
            &GuestOp::Write {
                offset: 512,
                len: 512,
                seed: 6,
            },
        )
        .unwrap();
        let exp = d.expectation_now(usize::MAX);
        let mut img = dev.snapshot();
        assert!(exp.verify(&img).is_ok());
        // The later write may be lost.
        pattern(5, 512, &mut img[512..1024]);
        assert!(exp.verify(&img).is_ok());
        // Zeros where the flushed value was: rejected.
        img[0..512].fill(0);
        assert!(exp.verify(&img).is_err());
        // Stale (pre-flush) data: rejected.
        img[0..512].fill(7);
        assert!(exp.verify(&img).is_err());
        assert!(d.verify_live(&dev).is_ok());
    }
}
