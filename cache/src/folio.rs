//! The in-memory folio: one aligned chunk of the virtual disk plus its per-sector state.
//!
//! Locking model: all mutable state is in [`FolioState`] behind the folio's own mutex; the
//! condition variable `cv` is signalled whenever `writeback` drops to false. The `referenced`
//! bit is a lock-free hint for the eviction clock. Nobody holds a folio lock across lower-layer
//! I/O; the `writeback` flag is what serializes writebacks of one folio.
//!
//! The folio's memory is shared, not copied, with a writeback in flight: the writeback takes a
//! reference to it under the lock and writes from it with the lock released, and whoever
//! changes the bytes meanwhile (a write, a fill) moves the folio to a copy of its own first
//! ([`FolioState::data_mut`]), so the bytes on their way down never change under the
//! writeback. Only a change that races a writeback pays that copy.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};

use blockdev::AlignedBuf;

use crate::bitmap::SectorBitmap;
use crate::SECTOR_SIZE;

/// Mutable state of a folio; protected by [`Folio::state`].
#[derive(Debug)]
pub(crate) struct FolioState {
    /// The folio's bytes (page-aligned, so a writeback from them can go to an O_DIRECT file
    /// as they are); only sectors marked in `uptodate` hold meaningful data. A writeback in
    /// flight holds a second reference: change them only through [`Self::data_mut`].
    pub(crate) data: Arc<AlignedBuf>,
    /// Sectors whose bytes equal the newest content of the disk.
    pub(crate) uptodate: SectorBitmap,
    /// Sectors newer than the lower layer (always a subset of `uptodate`).
    pub(crate) dirty: SectorBitmap,
    /// A writeback of a snapshot of this folio is between snapshot and completion.
    pub(crate) writeback: bool,
    /// Counted in the dirty budget and listed in the dirty list (dirty bits or writeback).
    pub(crate) accounted: bool,
    /// Removed from the cache map; nobody may dirty or fill it any more.
    pub(crate) evicted: bool,
}

impl FolioState {
    /// The folio's bytes, to change. While a writeback holds the memory (it writes from it with
    /// no lock held) the folio first moves to a copy of its own, counted in `copies`; the
    /// writeback's reference keeps the old bytes until it drops it.
    pub(crate) fn data_mut(&mut self, copies: &AtomicU64) -> &mut [u8] {
        if Arc::strong_count(&self.data) > 1 {
            copies.fetch_add(1, Ordering::Relaxed);
        }
        &mut Arc::make_mut(&mut self.data)[..]
    }
}

/// One cached folio.
#[derive(Debug)]
pub(crate) struct Folio {
    /// Folio number: the folio covers `index * folio_size ..` of the disk.
    pub(crate) index: u64,
    /// Byte offset of the folio on the disk.
    pub(crate) start: u64,
    /// Length in bytes (shorter than the folio size only for the disk's last folio).
    pub(crate) len: usize,
    pub(crate) state: Mutex<FolioState>,
    pub(crate) cv: Condvar,
    pub(crate) referenced: AtomicBool,
    /// A copy of `FolioState::writeback`, written under the state lock and read without it: a
    /// hint for choosing writeback batches (whoever writes back checks the state itself).
    pub(crate) in_writeback: AtomicBool,
}

impl Folio {
    /// A folio with nothing uptodate, using `data` as its buffer if it holds exactly `len`
    /// bytes (a recycled folio's), else a fresh one.
    pub(crate) fn new(index: u64, start: u64, len: usize, mut data: AlignedBuf) -> Self {
        if data.len() != len {
            // A fresh buffer comes zeroed from the allocator (calloc: fresh heap or mmap pages
            // are not cleared again), so a folio that only ever sees a 4 KiB write touches one
            // page, not all of them: zeroing 64 KiB per new folio by hand (and faulting every
            // page in) was a quarter of the daemon's CPU on first writes into a fresh disk.
            data = AlignedBuf::zeroed(len);
        }
        let sectors = len.div_ceil(SECTOR_SIZE);
        Folio {
            index,
            start,
            len,
            state: Mutex::new(FolioState {
                data: Arc::new(data),
                uptodate: SectorBitmap::new(sectors),
                dirty: SectorBitmap::new(sectors),
                writeback: false,
                accounted: false,
                evicted: false,
            }),
            cv: Condvar::new(),
            referenced: AtomicBool::new(true),
            in_writeback: AtomicBool::new(false),
        }
    }

    /// Locks the state; a poisoned lock is taken over (state updates are never left half-done
    /// across a panic point that matters for on-disk correctness).
    pub(crate) fn lock(&self) -> MutexGuard<'_, FolioState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits until no writeback of this folio is in flight.
    pub(crate) fn wait_writeback<'a>(
        &'a self,
        mut st: MutexGuard<'a, FolioState>,
    ) -> MutexGuard<'a, FolioState> {
        while st.writeback {
            st = self.cv.wait(st).unwrap_or_else(PoisonError::into_inner);
        }
        st
    }

    /// Marks the folio as recently used.
    pub(crate) fn touch(&self) {
        if !self.referenced.load(Ordering::Relaxed) {
            self.referenced.store(true, Ordering::Relaxed);
        }
    }

    /// Number of sectors.
    pub(crate) fn sectors(&self) -> usize {
        self.len.div_ceil(SECTOR_SIZE)
    }

    /// Byte range `[start, end)` of sector `s` inside the folio.
    pub(crate) fn sector_bytes(&self, s: usize) -> (usize, usize) {
        let a = s.saturating_mul(SECTOR_SIZE).min(self.len);
        let b = a.saturating_add(SECTOR_SIZE).min(self.len);
        (a, b)
    }

    /// The sectors touched by the folio-relative byte range `[a, b)`.
    pub(crate) fn sector_span(&self, a: usize, b: usize) -> (usize, usize) {
        (a / SECTOR_SIZE, b.div_ceil(SECTOR_SIZE))
    }

    /// Whether `[a, b)` covers sector `s` only partly.
    pub(crate) fn partially_covers(&self, s: usize, a: usize, b: usize) -> bool {
        let (sa, sb) = self.sector_bytes(s);
        a > sa || b < sb
    }
}
