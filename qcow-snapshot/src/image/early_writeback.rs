//! Early writeback: the host kernel writes guest data to the device while the guest is still
//! writing, not only when a FLUSH arrives.
//!
//! On a buffered image file ([`HostFile::page_cached`]) guest data waits in the host page
//! cache. The kernel writes those pages back on its own only after seconds or past its dirty
//! thresholds, so without help a FLUSH after a burst of writes waits for all of them inside one
//! `fdatasync` (for a fresh overlay written with 4 KiB into each cluster, 16384 scattered pages
//! per GiB, each its own device write: most of the FLUSH's time, with the device idle before).
//! Every [`KICK_BYTES`] of guest data written into the page cache, a background thread syncs
//! the file through the image's [`ReplayHost`](crate::host::ReplayHost), so the device works
//! while the guest keeps writing and the FLUSH's own sync finds little left. (QEMU's qcow2 gets
//! the same effect from the periodic flushes of its metadata caches.) Writes that went to the
//! device with O_DIRECT (the large ones with `--direct large`) do not count: they left no dirty
//! pages, and a sync for them only flushed the device's cache and held ext4's journal, which
//! the writers' `fallocate` waits for (a fresh overlay written with 1 MiB requests: 114-121
//! syncs per GiB with the crash journal's trims; 37 without these and with one sync fewer per
//! flush). Nor do writes in place, into clusters the image already has: a stream rewriting
//! allocated clusters is what the page cache absorbs (as for a raw image, and as QEMU's
//! qcow2, whose metadata flushes come only with allocations); syncing it every 8 MiB made the
//! device write each page out and each later rewrite of it start from a clean page (4 KiB
//! random rewrites at QD32 over an allocated 1 GiB image, 2 queues, warm: 38-52k IOPS at
//! 32-43 us of daemon CPU per write with the kicks, 63-69k at 26-29 us without).
//!
//! Why a full sync and not `sync_file_range(SYNC_FILE_RANGE_WRITE)`: the latter chases pages
//! dirtied while it runs (measured: one call running for 0.9 s behind the writer) and its
//! write errors would be consumed by nobody; a sync writes what was dirty when it started, and
//! going through `ReplayHost::sync_data` keeps invariant 6: a failed background sync replays
//! the journal or poisons the image, so no later FLUSH can report a false success. A good one
//! retires the journal early.
//!
//! Ordering: an extra sync only makes things durable earlier. The crash-consistency order
//! (data, then refcounts, then L2, then L1, each step synced before the next is written) is
//! about what is *written* after each of the flush's own syncs, which this does not change.
//!
//! When not: while the image reads from its backing chain (copy-on-write fills of standard
//! clusters, guest reads of unallocated ones), those reads are what requests wait for, and
//! background write bursts on the same device only queue in front of them; the writes then
//! wait for the FLUSH as before, when the device is otherwise idle. Measured with 4 KiB into
//! each cluster of a fresh overlay over a cold raw base: with extended L2 (no backing reads)
//! early writeback about halved the final FLUSH; with standard clusters (a 60 KiB backing read
//! per write) kicking anyway made the runs slower. So a kick is skipped when any backing read
//! happened since the previous kick point.
//!
//! Why a thread: the sync takes as long as the device needs; no request may wait for it
//! (requests never take `ReplayHost`'s sync mutex; a FLUSH that arrives meanwhile waits for it
//! and then syncs once more, as two FLUSHes would).
//!
//! Locking model: `state` is a leaf mutex (the thread's wake-up flags), never held across the
//! sync or with any other lock; the byte counter is an atomic; `thread` is taken only to start
//! or join the thread. The thread is started on the first kick and holds only an `Arc` of the
//! file; dropping [`EarlyWriteback`] stops and joins it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;

use crate::host::HostFile;

/// Data bytes written between two kicks.
pub(crate) const KICK_BYTES: u64 = 8 << 20;

#[derive(Default)]
struct Flags {
    kick: bool,
    stop: bool,
}

struct Shared {
    file: Arc<dyn HostFile>,
    state: Mutex<Flags>,
    cv: Condvar,
    /// Background syncs that ran (statistics and tests).
    kicks: AtomicU64,
}

/// The per-image early-writeback state (see the module documentation).
pub(crate) struct EarlyWriteback {
    shared: Arc<Shared>,
    /// Data bytes written since the last kick point.
    unkicked: AtomicU64,
    /// A read from the backing chain happened since the last kick point.
    backing_reads: AtomicBool,
    thread: Mutex<Option<JoinHandle<()>>>,
    enabled: bool,
}

impl EarlyWriteback {
    /// Early writeback of `file` (the image's journaled file); `enabled` false (read-only
    /// images) makes every call a no-op, as does a file that is not [`HostFile::page_cached`].
    pub(crate) fn new(file: Arc<dyn HostFile>, enabled: bool) -> Self {
        EarlyWriteback {
            shared: Arc::new(Shared {
                file,
                state: Mutex::new(Flags::default()),
                cv: Condvar::new(),
                kicks: AtomicU64::new(0),
            }),
            unkicked: AtomicU64::new(0),
            backing_reads: AtomicBool::new(false),
            thread: Mutex::new(None),
            enabled,
        }
    }

    /// Counts `bytes` of guest data written into the file's page cache; wakes the thread every
    /// [`KICK_BYTES`].
    pub(crate) fn wrote(&self, bytes: u64) {
        if !self.enabled {
            return;
        }
        let before = self.unkicked.fetch_add(bytes, Ordering::Relaxed);
        if before < KICK_BYTES && before + bytes >= KICK_BYTES {
            self.unkicked.store(0, Ordering::Relaxed);
            if !self.backing_reads.swap(false, Ordering::Relaxed) {
                self.kick();
            }
        }
    }

    /// Notes a read from the backing chain: the next kick point is skipped.
    pub(crate) fn backing_read(&self) {
        // Load first: a store on every read would bounce the cache line between queues.
        if self.enabled && !self.backing_reads.load(Ordering::Relaxed) {
            self.backing_reads.store(true, Ordering::Relaxed);
        }
    }

    /// How many background syncs ran.
    pub(crate) fn kicks(&self) -> u64 {
        self.shared.kicks.load(Ordering::Relaxed)
    }

    fn kick(&self) {
        // Checked here, not at open: `--direct` switches the file after the image is open.
        if !self.shared.file.page_cached() {
            return;
        }
        let mut thread = self.thread.lock().unwrap_or_else(PoisonError::into_inner);
        if thread.is_none() {
            let shared = self.shared.clone();
            match std::thread::Builder::new()
                .name("qcow-early-wb".into())
                .spawn(move || run(&shared))
            {
                Ok(h) => *thread = Some(h),
                Err(e) => {
                    // Without the thread the next FLUSH does all the writing, as before.
                    log::debug!("cannot start the early-writeback thread: {e}");
                    return;
                }
            }
        }
        drop(thread);
        let mut st = self
            .shared
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        st.kick = true;
        drop(st);
        self.shared.cv.notify_one();
    }
}

fn run(shared: &Shared) {
    loop {
        let mut st = shared.state.lock().unwrap_or_else(PoisonError::into_inner);
        while !st.kick && !st.stop {
            st = shared.cv.wait(st).unwrap_or_else(PoisonError::into_inner);
        }
        if st.stop {
            return;
        }
        st.kick = false;
        drop(st);
        if let Err(e) = shared.file.sync_data() {
            // The journal was replayed or the image poisoned; the next FLUSH reports it.
            log::warn!("background sync of the image file failed: {e}");
        }
        shared.kicks.fetch_add(1, Ordering::Relaxed);
    }
}

impl Drop for EarlyWriteback {
    fn drop(&mut self) {
        let handle = self
            .thread
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(h) = handle {
            self.shared
                .state
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .stop = true;
            self.shared.cv.notify_one();
            let _ = h.join();
        }
    }
}
