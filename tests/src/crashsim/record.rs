//! The recording host file: an in-memory file for the qcow2 engine that logs every write,
//! length change and sync (dm-log-writes style). One mutex holds the whole state, so the log is
//! a total order of the host-file operations.

use super::*;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

use qcow_snapshot::HostFile;

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

pub(super) fn apply_write(buf: &mut Vec<u8>, offset: u64, data: &[u8]) {
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
