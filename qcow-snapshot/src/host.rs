//! The host-file abstraction the qcow2 engine does all its image-file I/O through.
//!
//! The trait is deliberately tiny so that a crash-recording or fault-injecting layer can sit
//! under the engine and see every write and every `sync_data` in order. [`FileHost`] is the real
//! file; [`MemHost`] keeps the file in memory (tests, crash simulation).
//!
//! [`ReplayHost`] sits between the engine and its file and deals with failed `fdatasync`s: it
//! keeps every write since the last successful sync, replays them when a sync fails, and poisons
//! the file (every later write and sync fails with EIO) when it cannot prove durability. On an
//! O_DIRECT file ([`HostFile::failed_sync_drops_writes`] says no) there is nothing to replay:
//! each write reached the device or failed by itself, so writes pass through uncopied and a
//! failed sync is reported as it is and retried by the next one.
//!
//! Locking model: implementations take `&self` and must be safe to call from several threads at
//! once. `FileHost` relies on positional I/O (no shared cursor); `MemHost` uses one `RwLock`.
//! `ReplayHost`: reads and writes hold `io` shared (writes while they write and journal); a
//! failed sync holds it exclusively while it replays, so no read sees the file half-replayed; `syncs` serializes syncs; `journal` is a leaf lock (its condvar
//! `landed` is where a change waits for the overlapping changes issued before it).
//!
//! Replay ordering: two overlapping changes are never in flight at once. A change takes a ticket
//! in the journal before it touches the file and waits until every change with an earlier
//! ticket that overlaps it has reached the file *and* been journaled; it is journaled before the
//! next overlapping one may start. So for every byte, the journal order of the changes that wrote
//! it is the order in which they reached the file, and replaying the journal in order rebuilds
//! exactly the content readers saw. (Concurrent overlapping `pwrite`s have no order at all - with
//! O_DIRECT they may even interleave page by page - so serializing them is the only way a replay
//! can be exact.) `set_len` overlaps everything.

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, RwLock};

use crate::direct::{set_o_direct, DirectIo};

/// Positional I/O on the file that holds a qcow2 image.
#[allow(clippy::len_without_is_empty)]
pub trait HostFile: Send + Sync {
    /// Fills `buf` from `offset`; bytes past the end of the file read as zeros.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes all of `buf` at `offset`, extending the file if needed.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Makes every completed write durable.
    fn sync_data(&self) -> io::Result<()>;
    /// Current length of the file.
    fn len(&self) -> io::Result<u64>;
    /// Truncates or extends the file.
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Moves the file's data path below the host page cache (O_DIRECT, see [`crate::direct`]).
    /// Files that cannot do so say `Unsupported`.
    fn enable_direct(&self) -> io::Result<()> {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "this image file cannot use O_DIRECT",
        ))
    }
    /// Whether completed writes sit in a host page cache until a sync (a buffered file):
    /// then the image starts syncing written data early in the background (see
    /// `image/early_writeback.rs`). Files without such a cache (O_DIRECT, memory) say no.
    fn page_cached(&self) -> bool {
        false
    }
    /// Whether a failed `sync_data` may have dropped writes that had reported success (a
    /// buffered file: Linux marks the pages it could not write clean). With O_DIRECT each write
    /// reaches the device before it returns, or reports its own error, so a failed sync loses
    /// nothing a later sync could not make durable; such a file says no.
    fn failed_sync_drops_writes(&self) -> bool {
        true
    }
    /// Gives back space the file grew ahead of its writes (an O_DIRECT [`FileHost`]), so that
    /// a cleanly closed image is as long as its writes made it. Called by a clean close.
    fn release_growth(&self) -> io::Result<()> {
        Ok(())
    }
}

/// A shared host file (so a test or a recording layer can keep a handle to it).
impl<T: HostFile + ?Sized> HostFile for std::sync::Arc<T> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        (**self).read_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        (**self).write_at(buf, offset)
    }

    fn sync_data(&self) -> io::Result<()> {
        (**self).sync_data()
    }

    fn len(&self) -> io::Result<u64> {
        (**self).len()
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        (**self).set_len(len)
    }

    fn enable_direct(&self) -> io::Result<()> {
        (**self).enable_direct()
    }

    fn page_cached(&self) -> bool {
        (**self).page_cached()
    }

    fn failed_sync_drops_writes(&self) -> bool {
        (**self).failed_sync_drops_writes()
    }

    fn release_growth(&self) -> io::Result<()> {
        (**self).release_growth()
    }
}

/// An owned host file of any kind.
impl<T: HostFile + ?Sized> HostFile for Box<T> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        (**self).read_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        (**self).write_at(buf, offset)
    }

    fn sync_data(&self) -> io::Result<()> {
        (**self).sync_data()
    }

    fn len(&self) -> io::Result<u64> {
        (**self).len()
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        (**self).set_len(len)
    }

    fn enable_direct(&self) -> io::Result<()> {
        (**self).enable_direct()
    }

    fn page_cached(&self) -> bool {
        (**self).page_cached()
    }

    fn failed_sync_drops_writes(&self) -> bool {
        (**self).failed_sync_drops_writes()
    }

    fn release_growth(&self) -> io::Result<()> {
        (**self).release_growth()
    }
}

/// Bytes an O_DIRECT file grows ahead of a write past its end (see [`FileHost`]).
pub const GROW_AHEAD: u64 = 64 << 20;

/// A real file, buffered or (after [`HostFile::enable_direct`]) with O_DIRECT.
///
/// With O_DIRECT the file grows ahead of its writes: a write past the end first extends the
/// file by [`GROW_AHEAD`] with `fallocate`. On ext4 (and others) a direct write that
/// allocates blocks takes the inode lock exclusively and so runs alone, one at a time: the
/// writebacks of a fresh overlay would queue behind each other (about 5,000 4 KiB writes a
/// second here, whatever the number of threads). Into blocks already allocated, aligned
/// direct writes run in parallel. QEMU's `preallocate` filter does the same. A clean close
/// ([`HostFile::release_growth`]) truncates the file to the end of what was written, so the
/// image is as long as buffered writes would have left it; a crash leaves the grown tail
/// (zeros no metadata points at: qemu-img check finds nothing to report).
#[derive(Debug)]
pub struct FileHost {
    file: File,
    direct: std::sync::OnceLock<DirectIo>,
    growth: Growth,
}

/// The grow-ahead state of an O_DIRECT [`FileHost`].
#[derive(Debug, Default)]
struct Growth {
    /// The file is at least this long (0: not known yet); writes below it allocate nothing new.
    grown_to: AtomicU64,
    /// End of what was written (or set by `set_len`), block-aligned, or the length at the
    /// switch to O_DIRECT if larger: where a clean close cuts the file.
    written_to: AtomicU64,
    /// Whether the file was ever grown ahead (only then does a close truncate it).
    grew: AtomicBool,
    /// `fallocate` failed once (unsupported, or no space): stop trying.
    off: AtomicBool,
    /// Serializes growing.
    lock: Mutex<()>,
}

impl FileHost {
    /// Wraps an open file.
    pub fn new(file: File) -> Self {
        FileHost {
            file,
            direct: std::sync::OnceLock::new(),
            growth: Growth::default(),
        }
    }

    /// Makes sure `[.., end)` lies inside the file before a direct write: extends the file by
    /// [`GROW_AHEAD`] past `end` if it is shorter. Failing to grow is not an error (the write
    /// then allocates its own blocks, and reports ENOSPC itself).
    fn grow_for(&self, end: u64) {
        let g = &self.growth;
        if end <= g.grown_to.load(Ordering::Acquire) || g.off.load(Ordering::Relaxed) {
            return;
        }
        let _one = g.lock.lock().unwrap_or_else(|e| e.into_inner());
        if end <= g.grown_to.load(Ordering::Acquire) {
            return;
        }
        let Ok(len) = blockdev::file_size(&self.file) else {
            return;
        };
        if end <= len {
            g.grown_to.store(len, Ordering::Release);
            return;
        }
        let to = end.saturating_add(GROW_AHEAD).next_multiple_of(1 << 20);
        let (Ok(from), Ok(n)) = (i64::try_from(len), i64::try_from(to - len)) else {
            return;
        };
        // SAFETY: fallocate on a valid fd with plain integer arguments.
        let r = unsafe { libc::fallocate(self.file.as_raw_fd(), 0, from, n) };
        if r == 0 {
            g.grew.store(true, Ordering::Release);
            g.grown_to.store(to, Ordering::Release);
        } else {
            log::debug!(
                "cannot grow the image file ahead of its writes: {}",
                io::Error::last_os_error()
            );
            g.off.store(true, Ordering::Relaxed);
        }
    }

    /// Whether the file's I/O bypasses the host page cache.
    pub fn is_direct(&self) -> bool {
        self.direct.get().is_some()
    }

    /// The underlying file.
    pub fn file(&self) -> &File {
        &self.file
    }
}

impl HostFile for FileHost {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        match self.direct.get() {
            Some(d) => d.read_at(&self.file, buf, offset),
            None => blockdev::read_full_at(&self.file, buf, offset),
        }
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        match self.direct.get() {
            Some(d) => {
                let end = offset.saturating_add(buf.len() as u64);
                self.grow_for(end);
                d.write_at(&self.file, buf, offset)?;
                // Direct writes cover whole blocks: the file reaches the block's end.
                self.growth
                    .written_to
                    .fetch_max(end.next_multiple_of(d.block()), Ordering::AcqRel);
                Ok(())
            }
            None => self.file.write_all_at(buf, offset),
        }
    }

    fn sync_data(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn len(&self) -> io::Result<u64> {
        // Works for block devices too (their metadata length is 0).
        blockdev::file_size(&self.file)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let g = &self.growth;
        let _one = g.lock.lock().unwrap_or_else(|e| e.into_inner());
        self.file.set_len(len)?;
        g.written_to.store(len, Ordering::Release);
        g.grown_to.store(len, Ordering::Release);
        Ok(())
    }

    fn release_growth(&self) -> io::Result<()> {
        let g = &self.growth;
        let _one = g.lock.lock().unwrap_or_else(|e| e.into_inner());
        if !g.grew.load(Ordering::Acquire) {
            return Ok(());
        }
        let keep = g.written_to.load(Ordering::Acquire);
        if blockdev::file_size(&self.file)? > keep {
            self.file.set_len(keep)?;
        }
        g.grown_to.store(keep, Ordering::Release);
        g.grew.store(false, Ordering::Release);
        Ok(())
    }

    fn enable_direct(&self) -> io::Result<()> {
        if self.is_direct() {
            return Ok(());
        }
        let d = DirectIo::for_file(&self.file);
        self.growth
            .written_to
            .fetch_max(blockdev::file_size(&self.file)?, Ordering::AcqRel);
        set_o_direct(&self.file, true)?;
        // Callers switch before any I/O of the image runs, so no request sees half a switch.
        let _ = self.direct.set(d);
        Ok(())
    }

    fn page_cached(&self) -> bool {
        !self.is_direct()
    }

    fn failed_sync_drops_writes(&self) -> bool {
        !self.is_direct()
    }
}

/// An image file held in memory.
#[derive(Debug, Default)]
pub struct MemHost {
    data: RwLock<Vec<u8>>,
}

/// Largest in-memory file, to keep a hostile offset from allocating without bound.
const MEM_HOST_MAX: u64 = 4 << 30;

impl MemHost {
    /// A file with `data` as its content.
    pub fn new(data: Vec<u8>) -> Self {
        MemHost {
            data: RwLock::new(data),
        }
    }

    /// A copy of the content.
    pub fn contents(&self) -> Vec<u8> {
        self.data.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

fn mem_range(offset: u64, len: usize) -> io::Result<(usize, usize)> {
    let end = offset
        .checked_add(len as u64)
        .filter(|&e| e <= MEM_HOST_MAX)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "offset too large"))?;
    Ok((offset as usize, end as usize))
}

impl HostFile for MemHost {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let data = self.data.read().unwrap_or_else(|e| e.into_inner());
        buf.fill(0);
        let (start, _) = mem_range(offset, buf.len())?;
        if let Some(avail) = data.get(start..) {
            let n = avail.len().min(buf.len());
            buf[..n].copy_from_slice(&avail[..n]);
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut data = self.data.write().unwrap_or_else(|e| e.into_inner());
        let (start, end) = mem_range(offset, buf.len())?;
        if data.len() < end {
            data.resize(end, 0);
        }
        data[start..end].copy_from_slice(buf);
        Ok(())
    }

    fn sync_data(&self) -> io::Result<()> {
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.data.read().unwrap_or_else(|e| e.into_inner()).len() as u64)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let (_, end) = mem_range(len, 0)?;
        self.data
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .resize(end, 0);
        Ok(())
    }
}

/// Most bytes of unsynced writes a [`ReplayHost`] keeps for replay. Past this, a failed sync
/// poisons the file instead of replaying (like QEMU's file-posix does after any failure).
pub const REPLAY_LIMIT_BYTES: usize = 64 << 20;

/// One journaled file change.
#[derive(Debug)]
enum Change {
    Write { offset: u64, data: Box<[u8]> },
    SetLen(u64),
}

impl Change {
    /// The file bytes `[start, end)` the change may alter (`set_len`: all of them).
    fn span(&self) -> (u64, u64) {
        match self {
            Change::Write { offset, data } => (*offset, offset.saturating_add(data.len() as u64)),
            Change::SetLen(_) => (0, u64::MAX),
        }
    }
}

/// A change between its ticket and its journal entry (it may be in the file already).
#[derive(Debug)]
struct InFlight {
    ticket: u64,
    start: u64,
    end: u64,
}

/// The changes since the last successful sync, numbered in the order they were journaled (which,
/// for overlapping changes, is the order they reached the file), plus the changes in flight.
#[derive(Debug, Default)]
struct Journal {
    changes: VecDeque<(u64, Change)>,
    bytes: usize,
    next_seq: u64,
    /// Changes up to this sequence number were not kept (the limit was reached).
    dropped_through: Option<u64>,
    /// Changes that took a ticket and are not journaled yet, in ticket order.
    in_flight: Vec<InFlight>,
    next_ticket: u64,
}

impl Journal {
    /// Nothing to replay: no change kept and none dropped since the last good sync.
    fn is_empty(&self) -> bool {
        self.changes.is_empty() && self.dropped_through.is_none()
    }

    fn push(&mut self, change: Change) {
        let seq = self.next_seq;
        self.next_seq += 1;
        let len = match &change {
            Change::Write { data, .. } => data.len(),
            Change::SetLen(_) => 0,
        };
        if self.dropped_through.is_some() || self.bytes + len > REPLAY_LIMIT_BYTES {
            // Keeping only part of the changes could replay an incomplete state: drop all.
            self.changes.clear();
            self.bytes = 0;
            self.dropped_through = Some(seq);
            return;
        }
        self.bytes += len;
        self.changes.push_back((seq, change));
    }

    /// Whether a change issued earlier than `ticket` and overlapping `[start, end)` is in flight.
    fn earlier_overlap(&self, ticket: u64, start: u64, end: u64) -> bool {
        self.in_flight
            .iter()
            .take_while(|c| c.ticket < ticket)
            .any(|c| c.start < end && start < c.end)
    }

    fn land(&mut self, ticket: u64) {
        self.in_flight.retain(|c| c.ticket != ticket);
    }

    /// Forgets the changes numbered below `seq` (a sync that started after them succeeded).
    fn retire(&mut self, seq: u64) {
        while let Some((s, c)) = self.changes.front() {
            if *s >= seq {
                break;
            }
            if let Change::Write { data, .. } = c {
                self.bytes -= data.len();
            }
            self.changes.pop_front();
        }
        if self.dropped_through.is_some_and(|d| d < seq) {
            self.dropped_through = None;
        }
    }
}

/// A host file that survives a failed `fdatasync` honestly.
///
/// On Linux a failed `fdatasync` may drop the dirty pages it could not write and report the
/// error only once; the next `fdatasync` then succeeds although the data is gone ("fsyncgate").
/// `ReplayHost` therefore keeps a copy of every write since the last successful sync (up to
/// [`REPLAY_LIMIT_BYTES`]). When a sync fails it rewrites them all, in order, and syncs again:
/// if that succeeds, everything really is durable and the sync reports success. Otherwise (the
/// second sync fails too, a replayed write fails, or the journal was over its limit) the file
/// is poisoned: every later write, `set_len` and sync fails with EIO, so nothing can claim
/// durability or write metadata that points at possibly lost data. Reads keep working.
#[derive(Debug)]
pub struct ReplayHost<H: HostFile> {
    inner: H,
    io: RwLock<()>,
    syncs: Mutex<()>,
    journal: Mutex<Journal>,
    /// Signalled whenever an in-flight change is journaled or abandoned.
    landed: Condvar,
    poisoned: AtomicBool,
}

fn eio() -> io::Error {
    io::Error::from_raw_os_error(libc::EIO)
}

impl<H: HostFile> ReplayHost<H> {
    /// Wraps `inner`; nothing is journaled yet.
    pub fn new(inner: H) -> Self {
        ReplayHost {
            inner,
            io: RwLock::new(()),
            syncs: Mutex::new(()),
            journal: Mutex::new(Journal::default()),
            landed: Condvar::new(),
            poisoned: AtomicBool::new(false),
        }
    }

    /// Whether a sync failure could not be repaired: durability can no longer be promised.
    pub fn is_poisoned(&self) -> bool {
        self.poisoned.load(Ordering::Acquire)
    }

    fn journal(&self) -> MutexGuard<'_, Journal> {
        self.journal.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn check_poisoned(&self) -> io::Result<()> {
        if self.is_poisoned() {
            return Err(eio());
        }
        Ok(())
    }

    fn poison(&self, why: &str) -> io::Error {
        if !self.poisoned.swap(true, Ordering::AcqRel) {
            log::error!(
                "image file sync failed and durability cannot be restored ({why}); every later \
                 write and flush fails with EIO"
            );
        }
        eio()
    }

    /// Applies `change` to the file and journals it, after every overlapping change issued
    /// earlier has been applied and journaled (see the module documentation).
    fn change(&self, change: Change) -> io::Result<()> {
        let _shared = self.io.read().unwrap_or_else(|e| e.into_inner());
        self.check_poisoned()?;
        let (start, end) = change.span();
        let ticket = {
            let mut j = self.journal();
            let ticket = j.next_ticket;
            j.next_ticket += 1;
            j.in_flight.push(InFlight { ticket, start, end });
            while j.earlier_overlap(ticket, start, end) {
                j = self.landed.wait(j).unwrap_or_else(|e| e.into_inner());
            }
            ticket
        };
        let result = match &change {
            Change::Write { offset, data } => self.inner.write_at(data, *offset),
            Change::SetLen(len) => self.inner.set_len(*len),
        };
        {
            let mut j = self.journal();
            if result.is_ok() {
                j.push(change);
            }
            j.land(ticket);
        }
        self.landed.notify_all();
        result
    }

    /// A change of a file whose failed sync drops nothing (O_DIRECT): nothing will be replayed,
    /// so it is neither copied nor ordered against overlapping changes (the layers above order
    /// those, [`crate::direct::DirectIo`] its read-modify-writes).
    fn unjournaled(&self, op: impl FnOnce() -> io::Result<()>) -> io::Result<()> {
        let _shared = self.io.read().unwrap_or_else(|e| e.into_inner());
        self.check_poisoned()?;
        op()
    }

    /// After a failed sync: rewrite every change since the last good sync and sync again.
    fn recover(&self, err: io::Error) -> io::Result<()> {
        // Exclusive: every write that reached the file has been journaled.
        let _excl = self.io.write().unwrap_or_else(|e| e.into_inner());
        let mut j = self.journal();
        if j.dropped_through.is_some() {
            return Err(self.poison(&format!(
                "{err}; more than {REPLAY_LIMIT_BYTES} bytes were unsynced, too many to replay"
            )));
        }
        log::warn!(
            "image file sync failed ({err}); rewriting {} changes since the last good sync",
            j.changes.len()
        );
        for (_, c) in &j.changes {
            let r = match c {
                Change::Write { offset, data } => self.inner.write_at(data, *offset),
                Change::SetLen(len) => self.inner.set_len(*len),
            };
            if let Err(e) = r {
                return Err(self.poison(&format!("{err}; replaying a write failed: {e}")));
            }
        }
        match self.inner.sync_data() {
            Ok(()) => {
                let next = j.next_seq;
                j.retire(next);
                Ok(())
            }
            Err(e) => Err(self.poison(&format!("{err}; the sync after the replay failed: {e}"))),
        }
    }
}

impl<H: HostFile> HostFile for ReplayHost<H> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        // Shared with writes, excluded by a replay: a replay rewrites older changes before the
        // newer ones over them, so a read in the middle of it could see the past.
        let _shared = self.io.read().unwrap_or_else(|e| e.into_inner());
        self.inner.read_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if !self.inner.failed_sync_drops_writes() {
            return self.unjournaled(|| self.inner.write_at(buf, offset));
        }
        self.change(Change::Write {
            offset,
            data: buf.into(),
        })
    }

    fn page_cached(&self) -> bool {
        self.inner.page_cached()
    }

    fn failed_sync_drops_writes(&self) -> bool {
        // A failed sync is replayed or poisons: it never silently drops a write.
        false
    }

    fn sync_data(&self) -> io::Result<()> {
        let _one = self.syncs.lock().unwrap_or_else(|e| e.into_inner());
        self.check_poisoned()?;
        let start = self.journal().next_seq;
        match self.inner.sync_data() {
            Ok(()) => {
                self.journal().retire(start);
                Ok(())
            }
            // A file whose failed sync drops nothing (O_DIRECT) reports the error and stays
            // usable: a later sync that succeeds is true (QEMU's file-posix does the same). What
            // was journaled before the file switched to O_DIRECT is still replayed.
            Err(e) if !self.inner.failed_sync_drops_writes() && self.journal().is_empty() => Err(e),
            Err(e) => self.recover(e),
        }
    }

    fn len(&self) -> io::Result<u64> {
        let _shared = self.io.read().unwrap_or_else(|e| e.into_inner());
        self.inner.len()
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        if !self.inner.failed_sync_drops_writes() {
            return self.unjournaled(|| self.inner.set_len(len));
        }
        self.change(Change::SetLen(len))
    }

    fn enable_direct(&self) -> io::Result<()> {
        self.inner.enable_direct()
    }

    fn release_growth(&self) -> io::Result<()> {
        let _shared = self.io.read().unwrap_or_else(|e| e.into_inner());
        self.inner.release_growth()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file with Linux "fsyncgate" semantics: a failed sync drops the unsynced writes.
    #[derive(Default)]
    struct LossyFile {
        state: Mutex<(Vec<u8>, Vec<u8>)>,
        failures_left: std::sync::atomic::AtomicU32,
    }

    impl HostFile for LossyFile {
        fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
            MemHost::new(self.state.lock().unwrap().0.clone()).read_at(buf, offset)
        }

        fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
            let mut st = self.state.lock().unwrap();
            let m = MemHost::new(std::mem::take(&mut st.0));
            m.write_at(buf, offset)?;
            st.0 = m.contents();
            Ok(())
        }

        fn sync_data(&self) -> io::Result<()> {
            let mut st = self.state.lock().unwrap();
            if self.failures_left.load(Ordering::SeqCst) > 0 {
                self.failures_left.fetch_sub(1, Ordering::SeqCst);
                st.0 = st.1.clone();
                return Err(eio());
            }
            st.1 = st.0.clone();
            Ok(())
        }

        fn len(&self) -> io::Result<u64> {
            Ok(self.state.lock().unwrap().0.len() as u64)
        }

        fn set_len(&self, len: u64) -> io::Result<()> {
            self.state.lock().unwrap().0.resize(len as usize, 0);
            Ok(())
        }
    }

    fn durable(h: &ReplayHost<std::sync::Arc<LossyFile>>) -> Vec<u8> {
        h.inner.state.lock().unwrap().1.clone()
    }

    #[test]
    fn one_failed_sync_that_drops_writes_is_repaired_by_replaying_them() {
        let f = std::sync::Arc::new(LossyFile::default());
        let h = ReplayHost::new(f.clone());
        h.write_at(&[1, 2], 0).unwrap();
        h.sync_data().unwrap();
        h.write_at(&[3], 1).unwrap();
        h.write_at(&[4, 5], 2).unwrap();
        f.failures_left.store(1, Ordering::SeqCst);
        h.sync_data().unwrap();
        assert!(!h.is_poisoned());
        assert_eq!(durable(&h), [1, 3, 4, 5]);
        // The journal was retired: a later failure only replays later writes.
        h.write_at(&[6], 0).unwrap();
        f.failures_left.store(1, Ordering::SeqCst);
        h.sync_data().unwrap();
        assert_eq!(durable(&h), [6, 3, 4, 5]);
    }

    /// A host file that runs a closure once, right after the first write that reaches the file
    /// once armed (the write is in the file; its caller has not returned yet).
    struct AfterWriteHook {
        inner: std::sync::Arc<LossyFile>,
        hook: Mutex<Option<Box<dyn FnOnce() + Send>>>,
    }

    impl HostFile for AfterWriteHook {
        fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
            self.inner.read_at(buf, offset)
        }

        fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
            self.inner.write_at(buf, offset)?;
            let hook = self.hook.lock().unwrap().take();
            if let Some(f) = hook {
                f();
            }
            Ok(())
        }

        fn sync_data(&self) -> io::Result<()> {
            self.inner.sync_data()
        }

        fn len(&self) -> io::Result<u64> {
            self.inner.len()
        }

        fn set_len(&self, len: u64) -> io::Result<()> {
            self.inner.set_len(len)
        }
    }

    #[test]
    fn replay_after_a_failed_sync_keeps_overlapping_writes_in_file_order() {
        use std::sync::Arc;
        use std::time::{Duration, Instant};
        let f = Arc::new(LossyFile::default());
        let file = Arc::new(AfterWriteHook {
            inner: f.clone(),
            hook: Mutex::new(None),
        });
        let h = Arc::new(ReplayHost::new(file.clone()));
        h.write_at(&[0; 8], 0).unwrap();
        h.sync_data().unwrap();
        let b_thread = Arc::new(Mutex::new(None));
        let (h2, slot) = (h.clone(), b_thread.clone());
        *file.hook.lock().unwrap() = Some(Box::new(move || {
            // Write A is in the file and not yet journaled. Write B overlaps it from another
            // thread: it must either reach the file after A and be journaled after A, or wait.
            let b = std::thread::spawn(move || h2.write_at(&[2; 4], 2));
            let start = Instant::now();
            while !b.is_finished() && start.elapsed() < Duration::from_millis(200) {
                std::thread::sleep(Duration::from_millis(1));
            }
            *slot.lock().unwrap() = Some(b);
        }));
        h.write_at(&[1; 8], 0).unwrap();
        let b = b_thread.lock().unwrap().take().unwrap();
        b.join().unwrap().unwrap();
        let mut seen = [0u8; 8];
        h.read_at(&mut seen, 0).unwrap();
        assert_eq!(seen, [1, 1, 2, 2, 2, 2, 1, 1]);
        // The sync fails and drops both writes; the replay must rebuild what readers saw.
        f.failures_left.store(1, Ordering::SeqCst);
        h.sync_data().unwrap();
        assert_eq!(
            f.state.lock().unwrap().1,
            seen,
            "the replay reordered two overlapping writes"
        );
    }

    #[test]
    fn a_read_during_a_replay_never_sees_an_older_write_replayed_before_a_newer_one() {
        use std::sync::Arc;
        use std::time::{Duration, Instant};
        let f = Arc::new(LossyFile::default());
        let file = Arc::new(AfterWriteHook {
            inner: f.clone(),
            hook: Mutex::new(None),
        });
        let h = Arc::new(ReplayHost::new(file.clone()));
        h.write_at(&[1; 4], 0).unwrap();
        h.write_at(&[2; 4], 0).unwrap();
        let seen = Arc::new(Mutex::new(None));
        let (h2, slot) = (h.clone(), seen.clone());
        // Runs after the replay rewrote the older write and before it rewrites the newer one.
        *file.hook.lock().unwrap() = Some(Box::new(move || {
            let reader = std::thread::spawn(move || {
                let mut b = [0u8; 4];
                h2.read_at(&mut b, 0).unwrap();
                b
            });
            let start = Instant::now();
            while !reader.is_finished() && start.elapsed() < Duration::from_millis(100) {
                std::thread::sleep(Duration::from_millis(1));
            }
            *slot.lock().unwrap() = Some(reader);
        }));
        f.failures_left.store(1, Ordering::SeqCst);
        h.sync_data().unwrap();
        let reader = seen
            .lock()
            .unwrap()
            .take()
            .expect("the replay wrote nothing");
        assert_eq!(
            reader.join().unwrap(),
            [2; 4],
            "a read saw the file half-replayed"
        );
    }

    #[test]
    fn a_sync_failing_again_after_the_replay_poisons_writes_and_syncs_but_not_reads() {
        let f = std::sync::Arc::new(LossyFile::default());
        let h = ReplayHost::new(f.clone());
        h.write_at(&[7; 4], 0).unwrap();
        f.failures_left.store(2, Ordering::SeqCst);
        let e = h.sync_data().unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EIO));
        assert!(h.is_poisoned());
        // The file would now sync fine, but the lost write must never be reported durable.
        assert_eq!(h.sync_data().unwrap_err().raw_os_error(), Some(libc::EIO));
        assert_eq!(
            h.write_at(&[1], 0).unwrap_err().raw_os_error(),
            Some(libc::EIO)
        );
        assert!(h.set_len(0).is_err());
        let mut b = [9u8; 2];
        h.read_at(&mut b, 0).unwrap();
        assert_eq!(durable(&h), Vec::<u8>::new());
    }

    #[test]
    fn unsynced_writes_beyond_the_journal_limit_poison_on_a_failed_sync() {
        let f = std::sync::Arc::new(LossyFile::default());
        let h = ReplayHost::new(f.clone());
        let big = vec![1u8; REPLAY_LIMIT_BYTES / 2 + 1];
        h.write_at(&big, 0).unwrap();
        h.write_at(&big, big.len() as u64).unwrap();
        assert!(h.journal().dropped_through.is_some());
        assert_eq!(h.journal().bytes, 0);
        f.failures_left.store(1, Ordering::SeqCst);
        assert!(h.sync_data().is_err());
        assert!(h.is_poisoned());
    }

    #[test]
    fn a_successful_sync_forgets_the_journal_including_an_overflow() {
        let f = std::sync::Arc::new(LossyFile::default());
        let h = ReplayHost::new(f.clone());
        let big = vec![1u8; REPLAY_LIMIT_BYTES + 1];
        h.write_at(&big, 0).unwrap();
        h.sync_data().unwrap();
        assert!(h.journal().dropped_through.is_none());
        h.write_at(&[2], 0).unwrap();
        f.failures_left.store(1, Ordering::SeqCst);
        h.sync_data().unwrap();
        assert_eq!(durable(&h).first(), Some(&2));
    }

    /// An O_DIRECT-like file: a failed sync keeps every write (nothing sat in a page cache).
    #[derive(Default)]
    struct DirectLikeFile {
        inner: LossyFile,
        sync_failures_left: std::sync::atomic::AtomicU32,
        syncs: std::sync::atomic::AtomicU32,
    }

    impl HostFile for DirectLikeFile {
        fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
            self.inner.read_at(buf, offset)
        }

        fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
            self.inner.write_at(buf, offset)
        }

        fn sync_data(&self) -> io::Result<()> {
            self.syncs.fetch_add(1, Ordering::SeqCst);
            if self.sync_failures_left.load(Ordering::SeqCst) > 0 {
                self.sync_failures_left.fetch_sub(1, Ordering::SeqCst);
                return Err(eio());
            }
            self.inner.sync_data()
        }

        fn len(&self) -> io::Result<u64> {
            self.inner.len()
        }

        fn set_len(&self, len: u64) -> io::Result<()> {
            self.inner.set_len(len)
        }

        fn failed_sync_drops_writes(&self) -> bool {
            false
        }
    }

    #[test]
    fn on_a_direct_file_writes_are_not_copied_and_a_failed_sync_fails_without_poisoning() {
        let f = std::sync::Arc::new(DirectLikeFile::default());
        let h = ReplayHost::new(f.clone());
        h.write_at(&[1, 2, 3, 4], 0).unwrap();
        h.set_len(6).unwrap();
        assert!(h.journal().changes.is_empty(), "a direct write was copied");
        assert_eq!(h.journal().bytes, 0);
        f.sync_failures_left.store(1, Ordering::SeqCst);
        // The failure is reported once, as it is: no replay (one sync only), no poison.
        assert_eq!(h.sync_data().unwrap_err().raw_os_error(), Some(libc::EIO));
        assert_eq!(f.syncs.load(Ordering::SeqCst), 1);
        assert!(!h.is_poisoned());
        // The file keeps serving, and the next good sync makes the writes durable.
        h.write_at(&[9], 5).unwrap();
        h.sync_data().unwrap();
        assert_eq!(f.inner.state.lock().unwrap().1, [1, 2, 3, 4, 0, 9]);
    }

    #[test]
    fn a_change_journaled_before_the_file_went_direct_is_still_replayed() {
        // The file turns direct after one buffered write (ReplayHost asks at every call).
        struct Switching {
            lossy: LossyFile,
            direct: AtomicBool,
        }
        impl HostFile for Switching {
            fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
                self.lossy.read_at(buf, offset)
            }
            fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
                self.lossy.write_at(buf, offset)
            }
            fn sync_data(&self) -> io::Result<()> {
                self.lossy.sync_data()
            }
            fn len(&self) -> io::Result<u64> {
                self.lossy.len()
            }
            fn set_len(&self, len: u64) -> io::Result<()> {
                self.lossy.set_len(len)
            }
            fn failed_sync_drops_writes(&self) -> bool {
                !self.direct.load(Ordering::SeqCst)
            }
        }
        let f = std::sync::Arc::new(Switching {
            lossy: LossyFile::default(),
            direct: AtomicBool::new(false),
        });
        let h = ReplayHost::new(f.clone());
        h.write_at(&[5, 5], 0).unwrap();
        f.direct.store(true, Ordering::SeqCst);
        f.lossy.failures_left.store(1, Ordering::SeqCst);
        h.sync_data().unwrap();
        assert_eq!(f.lossy.state.lock().unwrap().1, [5, 5]);
    }

    #[test]
    fn a_file_host_says_a_failed_sync_drops_writes_until_it_is_direct() {
        let dir = tempfile::tempdir().unwrap();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("f.img"))
            .unwrap();
        let h = ReplayHost::new(FileHost::new(file));
        assert!(h.inner.failed_sync_drops_writes());
        h.write_at(&[1; 4096], 0).unwrap();
        assert_eq!(h.journal().bytes, 4096);
        h.sync_data().unwrap();
        if let Err(e) = h.enable_direct() {
            // tmpfs and a few others refuse O_DIRECT; the buffered half above still ran.
            assert_eq!(e.raw_os_error(), Some(libc::EINVAL), "{e}");
            return;
        }
        assert!(!h.inner.failed_sync_drops_writes());
        h.write_at(&[2; 4096], 4096).unwrap();
        assert_eq!(h.journal().bytes, 0, "a direct write was journaled");
        let mut b = [0u8; 4096];
        h.read_at(&mut b, 4096).unwrap();
        assert_eq!(b, [2; 4096]);
    }

    #[test]
    fn mem_host_reads_zeros_past_end_and_grows_on_write() {
        let h = MemHost::default();
        h.write_at(&[1, 2, 3], 10).unwrap();
        assert_eq!(h.len().unwrap(), 13);
        let mut b = [9u8; 6];
        h.read_at(&mut b, 9).unwrap();
        assert_eq!(b, [0, 1, 2, 3, 0, 0]);
        assert!(h.write_at(&[1], u64::MAX).is_err());
        h.set_len(4).unwrap();
        assert_eq!(h.len().unwrap(), 4);
    }
}
