//! Fault injection: a host-file wrapper that fails the Nth write or sync with EIO or ENOSPC,
//! once or from then on (QEMU iotest 026 style). Counts with atomics.

use super::*;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use qcow_snapshot::HostFile;

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
