//! Test doubles for the cache's integration tests: a lower layer that fails chosen requests and
//! records the order of everything that reaches it.
//!
//! Locking model: the content is a `MemDisk` (its own lock); the fault lists and the event log
//! each have a mutex taken only for the bookkeeping of one request.

#![allow(dead_code)]

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};

use blockdev::{BlockDev, BlockError, MemDisk, Result};
use cache::{CacheConfig, CacheHooks, FolioCache, HookPoint};

/// One request that reached the lower layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Write {
        offset: u64,
        data: Vec<u8>,
    },
    Flush,
    /// `BlockDev::write_back`: free, like a raw file's (its writes are with the kernel).
    WriteBack,
    Zap {
        offset: u64,
        len: u64,
    },
}

/// Which lower request an after-I/O hook waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Io {
    /// Before a read gets its bytes.
    ReadStart,
    /// After a read got its bytes.
    Read,
    /// After a write reached the memory.
    Write,
    /// Before a write reaches the memory.
    WriteStart,
    /// After a discard or write-zeroes reached the memory.
    Zap,
}

/// A closure run once right after a lower request of the given kind and range completed.
pub type AfterIo = (Io, u64, u64, Box<dyn FnOnce() + Send>);

/// A `MemDisk` with injectable failures, an event log and a hook after a read.
pub struct FaultyDisk {
    pub mem: MemDisk,
    fail_reads: Mutex<Vec<(u64, u64)>>,
    fail_writes: Mutex<Vec<(u64, u64)>>,
    fail_flush: Mutex<bool>,
    /// Discards and write-zeroes change the memory, then report EIO (a device that failed
    /// part-way through).
    fail_zaps_after_applying: Mutex<bool>,
    /// Writes change the memory, then report EIO.
    fail_writes_after_applying: Mutex<bool>,
    log: Mutex<Vec<Event>>,
    after_io: Mutex<Option<AfterIo>>,
    pub flushes: AtomicU64,
    pub reads: AtomicU64,
    /// The number of writes of every `write_batch` call, in order.
    batches: Mutex<Vec<usize>>,
    /// (offset, length) of every `write_uncached_at` call, in order.
    uncached: Mutex<Vec<(u64, usize)>>,
    /// The number of writes of every `write_batch_to_sync` call, in order.
    to_sync: Mutex<Vec<usize>>,
    /// Ranges whose writes `rewrites_in_page_cache` says land in place (none at first).
    in_place: Mutex<Vec<(u64, u64)>>,
    /// (offset, length) of every `rewrites_in_page_cache` question, in order.
    asked_in_place: Mutex<Vec<(u64, u64)>>,
    /// Runs once, on the asking thread, right after the next `rewrites_in_page_cache` answered.
    after_in_place: Mutex<Option<Box<dyn FnOnce() + Send>>>,
    /// Ranges whose writes `persists_in_place` and `write_in_place_persisted` take (none at
    /// first), unless `refuse_persist`.
    persist: Mutex<Vec<(u64, u64)>>,
    refuse_persist: AtomicBool,
    /// (offset, length) of every write `write_in_place_persisted` took, in order.
    persisted: Mutex<Vec<(u64, usize)>>,
}

impl std::fmt::Debug for FaultyDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultyDisk")
            .field("mem", &self.mem)
            .finish()
    }
}

/// EIO (errno 5 on Linux).
fn eio() -> BlockError {
    BlockError::Io(io::Error::from_raw_os_error(5))
}

fn overlaps(list: &[(u64, u64)], offset: u64, len: u64) -> bool {
    list.iter().any(|&(a, b)| a < offset + len && offset < b)
}

impl FaultyDisk {
    pub fn new(data: Vec<u8>) -> Arc<Self> {
        Arc::new(FaultyDisk {
            mem: MemDisk::from_vec(data),
            fail_reads: Mutex::new(Vec::new()),
            fail_writes: Mutex::new(Vec::new()),
            fail_flush: Mutex::new(false),
            fail_zaps_after_applying: Mutex::new(false),
            fail_writes_after_applying: Mutex::new(false),
            log: Mutex::new(Vec::new()),
            after_io: Mutex::new(None),
            flushes: AtomicU64::new(0),
            reads: AtomicU64::new(0),
            batches: Mutex::new(Vec::new()),
            uncached: Mutex::new(Vec::new()),
            to_sync: Mutex::new(Vec::new()),
            in_place: Mutex::new(Vec::new()),
            asked_in_place: Mutex::new(Vec::new()),
            after_in_place: Mutex::new(None),
            persist: Mutex::new(Vec::new()),
            refuse_persist: AtomicBool::new(false),
            persisted: Mutex::new(Vec::new()),
        })
    }

    /// From now on `rewrites_in_page_cache` says yes to writes inside `[offset, offset + len)`.
    pub fn answer_in_page_cache(&self, offset: u64, len: u64) {
        self.in_place.lock().unwrap().push((offset, offset + len));
    }

    /// From now on writes inside `[offset, offset + len)` persist in place
    /// (`write_in_place_persisted` takes them).
    pub fn answer_persisted(&self, offset: u64, len: u64) {
        self.persist.lock().unwrap().push((offset, offset + len));
    }

    /// `write_in_place_persisted` refuses everything (`Ok(false)`, nothing written) while set,
    /// although `persists_in_place` still says yes.
    pub fn refuse_persist(&self, refuse: bool) {
        self.refuse_persist.store(refuse, Ordering::SeqCst);
    }

    /// (offset, length) of every write persisted in place so far, in order.
    pub fn persisted_writes(&self) -> Vec<(u64, usize)> {
        self.persisted.lock().unwrap().clone()
    }

    /// (offset, length) of every `rewrites_in_page_cache` question so far, in order.
    pub fn asked_in_place(&self) -> Vec<(u64, u64)> {
        self.asked_in_place.lock().unwrap().clone()
    }

    /// Runs `f` once, on the asking thread, right after the next `rewrites_in_page_cache` question
    /// was answered (before the answer reaches the caller).
    pub fn after_in_place(&self, f: impl FnOnce() + Send + 'static) {
        *self.after_in_place.lock().unwrap() = Some(Box::new(f));
    }

    /// Reads overlapping `[offset, offset + len)` fail with EIO.
    pub fn fail_reads(&self, offset: u64, len: u64) {
        self.fail_reads.lock().unwrap().push((offset, offset + len));
    }

    /// Writes overlapping `[offset, offset + len)` fail with EIO (without writing anything).
    pub fn fail_writes(&self, offset: u64, len: u64) {
        self.fail_writes
            .lock()
            .unwrap()
            .push((offset, offset + len));
    }

    /// Runs `f` once, on the reading thread, right after the next read overlapping
    /// `[offset, offset + len)` got its bytes (and before they are returned to the caller).
    pub fn after_read(&self, offset: u64, len: u64, f: impl FnOnce() + Send + 'static) {
        *self.after_io.lock().unwrap() = Some((Io::Read, offset, offset + len, Box::new(f)));
    }

    /// Runs `f` once, on the writing thread, right after the next write overlapping
    /// `[offset, offset + len)` reached the memory (before it returns to the caller).
    pub fn after_write(&self, offset: u64, len: u64, f: impl FnOnce() + Send + 'static) {
        *self.after_io.lock().unwrap() = Some((Io::Write, offset, offset + len, Box::new(f)));
    }

    /// Runs `f` once, on the calling thread, at `io` for the next request of that kind
    /// overlapping `[offset, offset + len)`.
    pub fn at(&self, io: Io, offset: u64, len: u64, f: impl FnOnce() + Send + 'static) {
        *self.after_io.lock().unwrap() = Some((io, offset, offset + len, Box::new(f)));
    }

    /// Whether the after-I/O hook has run (or none was set).
    pub fn after_read_fired(&self) -> bool {
        self.after_io.lock().unwrap().is_none()
    }

    fn run_after(&self, io: Io, offset: u64, len: u64) {
        let hook = {
            let mut h = self.after_io.lock().unwrap();
            match &*h {
                Some((k, a, b, _)) if *k == io && *a < offset + len && offset < *b => h.take(),
                _ => None,
            }
        };
        if let Some((_, _, _, f)) = hook {
            f();
        }
    }

    pub fn fail_flushes(&self, fail: bool) {
        *self.fail_flush.lock().unwrap() = fail;
    }

    /// Discards and write-zeroes apply, then fail with EIO.
    pub fn fail_zaps_after_applying(&self, fail: bool) {
        *self.fail_zaps_after_applying.lock().unwrap() = fail;
    }

    /// Writes apply, then fail with EIO.
    pub fn fail_writes_after_applying(&self, fail: bool) {
        *self.fail_writes_after_applying.lock().unwrap() = fail;
    }

    /// Removes every injected failure.
    pub fn heal(&self) {
        self.fail_reads.lock().unwrap().clear();
        self.fail_writes.lock().unwrap().clear();
        self.fail_flushes(false);
        self.fail_zaps_after_applying(false);
        self.fail_writes_after_applying(false);
    }

    pub fn events(&self) -> Vec<Event> {
        self.log.lock().unwrap().clone()
    }

    /// How many requests reached the lower layer so far (`events().len()` without the copy).
    pub fn event_count(&self) -> usize {
        self.log.lock().unwrap().len()
    }

    /// (offset, length) of every write that reached the memory, in order.
    pub fn writes(&self) -> Vec<(u64, usize)> {
        self.events()
            .iter()
            .filter_map(|e| match e {
                Event::Write { offset, data } => Some((*offset, data.len())),
                _ => None,
            })
            .collect()
    }

    /// The number of writes of every batch handed down so far.
    pub fn batches(&self) -> Vec<usize> {
        self.batches.lock().unwrap().clone()
    }

    /// The number of writes of every batch handed down to be synced (`write_batch_to_sync`).
    pub fn batches_to_sync(&self) -> Vec<usize> {
        self.to_sync.lock().unwrap().clone()
    }

    /// (offset, length) of every write handed down as uncached (`write_uncached_at`).
    pub fn uncached_writes(&self) -> Vec<(u64, usize)> {
        self.uncached.lock().unwrap().clone()
    }

    pub fn clear_events(&self) {
        self.log.lock().unwrap().clear();
    }

    pub fn bytes(&self, offset: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        self.mem.read_at(&mut b, offset).unwrap();
        b
    }
}

impl BlockDev for FaultyDisk {
    fn size(&self) -> u64 {
        self.mem.size()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.reads.fetch_add(1, Ordering::Relaxed);
        if overlaps(&self.fail_reads.lock().unwrap(), offset, buf.len() as u64) {
            return Err(eio());
        }
        self.run_after(Io::ReadStart, offset, buf.len() as u64);
        self.mem.read_at(buf, offset)?;
        self.run_after(Io::Read, offset, buf.len() as u64);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        if overlaps(&self.fail_writes.lock().unwrap(), offset, buf.len() as u64) {
            return Err(eio());
        }
        self.run_after(Io::WriteStart, offset, buf.len() as u64);
        {
            let mut log = self.log.lock().unwrap();
            self.mem.write_at(buf, offset)?;
            log.push(Event::Write {
                offset,
                data: buf.to_vec(),
            });
        }
        self.run_after(Io::Write, offset, buf.len() as u64);
        if *self.fail_writes_after_applying.lock().unwrap() {
            return Err(eio());
        }
        Ok(())
    }

    fn rewrites_in_page_cache(&self, offset: u64, len: u64) -> bool {
        self.asked_in_place.lock().unwrap().push((offset, len));
        let yes = self
            .in_place
            .lock()
            .unwrap()
            .iter()
            .any(|&(a, b)| a <= offset && offset + len <= b);
        let after = self.after_in_place.lock().unwrap().take();
        if let Some(f) = after {
            f();
        }
        yes
    }

    fn persists_in_place(&self, offset: u64, len: u64) -> bool {
        self.persist
            .lock()
            .unwrap()
            .iter()
            .any(|&(a, b)| a <= offset && offset + len <= b)
    }

    fn write_in_place_persisted(&self, buf: &[u8], offset: u64) -> Result<bool> {
        if self.refuse_persist.load(Ordering::SeqCst)
            || !self.persists_in_place(offset, buf.len() as u64)
        {
            return Ok(false);
        }
        self.write_at(buf, offset)?;
        self.persisted.lock().unwrap().push((offset, buf.len()));
        Ok(true)
    }

    fn write_uncached_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.uncached.lock().unwrap().push((offset, buf.len()));
        self.write_at(buf, offset)
    }

    fn write_batch(&self, writes: &[(&[u8], u64)]) -> Vec<Result<()>> {
        self.batches.lock().unwrap().push(writes.len());
        writes.iter().map(|&(b, o)| self.write_at(b, o)).collect()
    }

    fn write_batch_to_sync(&self, writes: &[(&[u8], u64)]) -> Vec<Result<()>> {
        self.to_sync.lock().unwrap().push(writes.len());
        self.write_batch(writes)
    }

    fn flush(&self) -> Result<()> {
        if *self.fail_flush.lock().unwrap() {
            return Err(eio());
        }
        self.flushes.fetch_add(1, Ordering::SeqCst);
        self.log.lock().unwrap().push(Event::Flush);
        Ok(())
    }

    fn write_back(&self) -> Result<()> {
        self.log.lock().unwrap().push(Event::WriteBack);
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.write_zeroes(offset, len, true)
    }

    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        if overlaps(&self.fail_writes.lock().unwrap(), offset, len) {
            return Err(eio());
        }
        {
            let mut log = self.log.lock().unwrap();
            self.mem.write_zeroes(offset, len, unmap)?;
            log.push(Event::Zap { offset, len });
        }
        self.run_after(Io::Zap, offset, len);
        if *self.fail_zaps_after_applying.lock().unwrap() {
            return Err(eio());
        }
        Ok(())
    }
}

/// A deterministic pattern that differs per offset and per `seed`, never all zeros.
pub fn pattern(seed: u8, offset: u64, len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|i| (((offset + i) * 7 + u64::from(seed) * 31) % 251) as u8 + 1)
        .collect()
}

/// A small cache without background writeback (deterministic tests).
pub fn small_cfg(folio: u64, folios: u64, dirty_folios: u64) -> CacheConfig {
    CacheConfig {
        folio_size: folio,
        cache_size: folio * folios,
        dirty_limit: folio * dirty_folios,
        writeback: true,
        flusher_threads: 0,
        ..CacheConfig::default()
    }
}

pub fn cache_over(lower: &Arc<FaultyDisk>, cfg: CacheConfig) -> Arc<FolioCache> {
    FolioCache::new(lower.clone() as Arc<dyn BlockDev>, cfg).unwrap()
}

pub fn read(dev: &dyn BlockDev, offset: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    dev.read_at(&mut b, offset).unwrap();
    b
}

/// [`read`] through `BlockDev::read_into` (the request path's read into guest memory).
#[allow(dead_code)]
pub fn read_into(dev: &dyn BlockDev, offset: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    dev.read_into(&std::cell::RefCell::new(&mut b[..]), offset)
        .unwrap();
    b
}

/// Hooks that run a closure once, the first time `point` is reached for `folio`.
pub struct OnceHook {
    point: HookPoint,
    folio: u64,
    fired: AtomicBool,
    action: Mutex<Option<Box<dyn FnOnce() + Send>>>,
}

impl OnceHook {
    pub fn new(point: HookPoint, folio: u64) -> Arc<Self> {
        Arc::new(OnceHook {
            point,
            folio,
            fired: AtomicBool::new(false),
            action: Mutex::new(None),
        })
    }
    pub fn arm(&self, f: impl FnOnce() + Send + 'static) {
        *self.action.lock().unwrap() = Some(Box::new(f));
    }
    pub fn fired(&self) -> bool {
        self.fired.load(Ordering::SeqCst)
    }
}

impl CacheHooks for OnceHook {
    fn at(&self, point: HookPoint, folio: u64) {
        if point != self.point || folio != self.folio {
            return;
        }
        let action = self.action.lock().unwrap().take();
        if let Some(f) = action {
            self.fired.store(true, Ordering::SeqCst);
            f();
        }
    }
}

/// A gate for parking a request at a hook: the returned closure (run at the hook) reports that
/// it was reached on the first receiver, then waits until the sender releases it.
pub fn gate() -> (impl FnOnce() + Send + 'static, Receiver<()>, Sender<()>) {
    let (reached_tx, reached_rx) = channel();
    let (go_tx, go_rx) = channel::<()>();
    let park = move || {
        reached_tx.send(()).unwrap();
        go_rx.recv().unwrap();
    };
    (park, reached_rx, go_tx)
}
