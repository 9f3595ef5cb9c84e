//! [`ChaosFile`]: an in-memory host file for the qcow2 engine that delays every operation at
//! random (seeded, see `cache::lincheck::Delays`), fails every Nth `fdatasync` the way Linux
//! does, and tells what would survive a power loss at any moment - the host-file counterpart of
//! `cache::lincheck::ChaosDev`, for the linearizability and crash checks of the full stack.
//!
//! Failed-sync model ("fsyncgate"): the writes since the last successful sync are *not* made
//! durable by any later sync (the kernel marked their pages clean), but readers keep seeing
//! them (the pages stay cached). Only a rewrite makes them durable again - which is what the
//! engine's replay journal does.
//!
//! Locking model: one mutex over the file's state (current bytes, durable bytes, the changes
//! since the last sync); delays run outside it.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use cache::lincheck::Delays;
use qcow_snapshot::HostFile;

#[derive(Debug, Clone)]
enum Pending {
    Write(u64, Arc<[u8]>),
    SetLen(u64),
}

#[derive(Debug)]
struct State {
    current: Vec<u8>,
    durable: Vec<u8>,
    /// Changes since the last sync, in the order they reached the file.
    pending: Vec<Pending>,
}

/// See the module documentation.
#[derive(Debug)]
pub struct ChaosFile {
    state: Mutex<State>,
    delays: Arc<Delays>,
    fail_every: u64,
    syncs: AtomicU64,
    failed: AtomicU64,
}

fn apply(buf: &mut Vec<u8>, p: &Pending) {
    match p {
        Pending::Write(off, data) => {
            let (s, e) = (*off as usize, *off as usize + data.len());
            if buf.len() < e {
                buf.resize(e, 0);
            }
            buf[s..e].copy_from_slice(data);
        }
        Pending::SetLen(l) => buf.resize(*l as usize, 0),
    }
}

impl ChaosFile {
    /// A file holding `initial` (durably); every `fail_every`-th sync fails (0: none).
    pub fn new(initial: Vec<u8>, delays: Arc<Delays>, fail_every: u64) -> Arc<Self> {
        Arc::new(ChaosFile {
            state: Mutex::new(State {
                durable: initial.clone(),
                current: initial,
                pending: Vec::new(),
            }),
            delays,
            fail_every,
            syncs: AtomicU64::new(0),
            failed: AtomicU64::new(0),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The bytes that survive a power loss now.
    pub fn durable(&self) -> Vec<u8> {
        self.lock().durable.clone()
    }

    /// How many syncs failed on purpose.
    pub fn failed_syncs(&self) -> u64 {
        self.failed.load(Ordering::SeqCst)
    }
}

impl HostFile for ChaosFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.delays.pause();
        {
            let st = self.lock();
            buf.fill(0);
            if let Some(avail) = st.current.get(offset as usize..) {
                let n = avail.len().min(buf.len());
                buf[..n].copy_from_slice(&avail[..n]);
            }
        }
        self.delays.pause_long();
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if offset
            .checked_add(buf.len() as u64)
            .is_none_or(|e| e > 1 << 32)
        {
            return Err(io::Error::from_raw_os_error(libc::EFBIG));
        }
        self.delays.pause();
        {
            let mut st = self.lock();
            let p = Pending::Write(offset, Arc::from(buf));
            apply(&mut st.current, &p);
            st.pending.push(p);
        }
        // The window between a write reaching the file and its caller going on.
        self.delays.pause_long();
        Ok(())
    }

    fn sync_data(&self) -> io::Result<()> {
        self.delays.pause();
        let n = self.syncs.fetch_add(1, Ordering::SeqCst);
        let mut st = self.lock();
        if self.fail_every > 0 && n % self.fail_every == self.fail_every - 1 {
            // The kernel could not write the pages back and marked them clean: they are lost
            // for durability, yet readers still see them.
            st.pending.clear();
            self.failed.fetch_add(1, Ordering::SeqCst);
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        let pending = std::mem::take(&mut st.pending);
        for p in &pending {
            apply(&mut st.durable, p);
        }
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.lock().current.len() as u64)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        if len > 1 << 32 {
            return Err(io::Error::from_raw_os_error(libc::EFBIG));
        }
        self.delays.pause();
        let mut st = self.lock();
        let p = Pending::SetLen(len);
        apply(&mut st.current, &p);
        st.pending.push(p);
        Ok(())
    }
}
