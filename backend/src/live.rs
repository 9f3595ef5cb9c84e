//! What makes the daemon operable while it runs: the state shared by the request path, the
//! control socket and the metrics endpoint ([`Live`]), and the host-side write-cache override
//! ([`ModePolicy`]).
//!
//! The request path calls [`Live::begin`] once per request (it enters the [`PauseGate`] and
//! starts the request's timer) and [`InFlight::finish`] once when the status is known.
//!
//! Locking model: `Live` itself holds only atomics and `Arc`s; the gate, the metrics, the chain
//! and the mode policy each document their own. The policy's mutex is a leaf that is held while
//! the cache switches mode (which may flush), never taken by the request path.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use blockdev::BlockDev;
use cache::FolioCache;
use serde_json::{json, Value};

use crate::disk::WriteCacheControl;
use crate::metrics::{CacheSnapshot, Op, RequestMetrics, RequestTimer, StatsSnapshot, StatsSource};
use crate::pause::{Entered, PauseGate};
use crate::request::ExecuteRequestError;
use crate::snapshot::{Chain, SnapshotError, SnapshotRecord};

/// The guest's write-cache choice combined with a host-side override (`set-cache-mode`): the
/// cache writes back only when the guest enabled its write cache and the host did not force
/// write-through. The host can never turn write-back on behind a guest that turned it off
/// (the guest would not send the flushes that make its writes durable).
pub struct ModePolicy {
    inner: Arc<dyn WriteCacheControl>,
    /// (guest wants write-back, host forces write-through)
    state: Mutex<(bool, bool)>,
}

impl ModePolicy {
    /// A policy over `inner`, following the guest, initially write-back.
    pub fn new(inner: Arc<dyn WriteCacheControl>) -> Self {
        ModePolicy {
            inner,
            state: Mutex::new((true, false)),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (bool, bool)> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Forces write-through (`true`) or lets the guest decide again (`false`).
    pub fn force_writethrough(&self, force: bool) {
        let mut s = self.lock();
        s.1 = force;
        self.inner.set_writeback(s.0 && !force);
    }

    /// (guest wants write-back, host forces write-through).
    pub fn state(&self) -> (bool, bool) {
        *self.lock()
    }
}

impl WriteCacheControl for ModePolicy {
    fn set_writeback(&self, writeback: bool) {
        let mut s = self.lock();
        s.0 = writeback;
        self.inner.set_writeback(writeback && !s.1);
    }
}

/// Static facts `query-status` reports.
#[derive(Debug, Clone, Default)]
pub struct LiveInfo {
    /// Request queues.
    pub num_queues: u16,
    /// Queue size.
    pub queue_size: u16,
    /// Served read-only.
    pub read_only: bool,
}

/// See the module documentation.
pub struct Live {
    /// The request pause gate (taken exclusively by live snapshots).
    pub gate: PauseGate,
    /// Per-queue request statistics.
    pub metrics: RequestMetrics,
    upper: Arc<dyn BlockDev>,
    chain: Option<Arc<Chain>>,
    cache: Option<Arc<FolioCache>>,
    journal: Option<Arc<crate::journal::Journal>>,
    mode: Option<Arc<ModePolicy>>,
    info: LiveInfo,
    /// Id of the connected frontend connection, 0 when none.
    frontend: AtomicU64,
}

impl std::fmt::Debug for Live {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Live").field("info", &self.info).finish()
    }
}

/// A request inside the gate being timed.
#[derive(Debug)]
pub struct InFlight<'a> {
    timer: RequestTimer<'a>,
    _gate: Entered<'a>,
}

impl InFlight<'_> {
    /// Records the request (see [`RequestTimer::finish`]) and leaves the gate.
    pub fn finish(self, op: Op, bytes: u64, error: Option<&ExecuteRequestError>) {
        self.timer.finish(op, bytes, error);
    }
}

/// Why a control command failed.
#[derive(Debug, thiserror::Error)]
pub enum LiveError {
    /// Not possible for this disk.
    #[error("{0}")]
    Unsupported(String),
    /// The snapshot failed.
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    /// The flush failed.
    #[error("flush failed: {0}")]
    Flush(blockdev::BlockError),
}

impl Live {
    /// State for a disk stack with no chain or cache of its own (tests, embedding).
    pub fn detached(upper: Arc<dyn BlockDev>) -> Self {
        Live {
            gate: PauseGate::new(),
            metrics: RequestMetrics::new(usize::from(crate::cli::MAX_NUM_QUEUES)),
            upper,
            chain: None,
            cache: None,
            journal: None,
            mode: None,
            info: LiveInfo::default(),
            frontend: AtomicU64::new(0),
        }
    }

    /// State for the served stack `journal (if on) → cache → chain`; `upper` is its top (the
    /// journal if on, else the cache): what `flush` goes through, so a control-socket flush
    /// also empties the journal of what it made durable.
    pub fn new(
        upper: Arc<dyn BlockDev>,
        cache: Arc<FolioCache>,
        journal: Option<Arc<crate::journal::Journal>>,
        chain: Arc<Chain>,
        mode: Arc<ModePolicy>,
        info: LiveInfo,
    ) -> Self {
        Live {
            gate: PauseGate::new(),
            metrics: RequestMetrics::new(usize::from(info.num_queues)),
            upper,
            chain: Some(chain),
            cache: Some(cache),
            journal,
            mode: Some(mode),
            info,
            frontend: AtomicU64::new(0),
        }
    }

    /// Enters the pause gate and starts timing a request of `queue`.
    pub fn begin(&self, queue: usize) -> InFlight<'_> {
        let gate = self.gate.enter();
        InFlight {
            timer: self.metrics.begin(queue),
            _gate: gate,
        }
    }

    /// Enters the pause gate only (a request whose I/O outlives the call that submits it
    /// leaves the gate once it is submitted; see `crate::uring`).
    pub fn enter_gate(&self) -> crate::pause::Entered<'_> {
        self.gate.enter()
    }

    /// The request statistics.
    pub fn request_metrics(&self) -> &RequestMetrics {
        &self.metrics
    }

    /// Records which frontend connection is being served (`None`: nobody).
    pub fn set_frontend(&self, connection: Option<u64>) {
        self.frontend
            .store(connection.unwrap_or(0), Ordering::Relaxed);
    }

    /// Flushes the whole stack; returns how long it took.
    pub fn flush(&self) -> Result<std::time::Duration, LiveError> {
        if self.info.read_only {
            return Ok(std::time::Duration::ZERO);
        }
        let t = Instant::now();
        self.upper.flush().map_err(LiveError::Flush)?;
        let d = t.elapsed();
        self.metrics.record_flush(d);
        Ok(d)
    }

    /// Forces write-through or lets the guest decide (`set-cache-mode`).
    pub fn set_cache_mode(&self, writethrough: bool) -> Result<Value, LiveError> {
        let mode = self
            .mode
            .as_ref()
            .ok_or_else(|| LiveError::Unsupported("this disk has no cache".into()))?;
        mode.force_writethrough(writethrough);
        Ok(self.cache_json())
    }

    /// Takes a live snapshot with its new top at `overlay`. Its flushes go to the cache, not
    /// through the crash journal: a journal flush waits for a background trim's write-back to
    /// finish, which would lengthen the pause, and the journal's records stay true for the new
    /// top (see `Journal::rebind`).
    pub fn snapshot(&self, overlay: &Path) -> Result<SnapshotRecord, LiveError> {
        let chain = self
            .chain
            .as_ref()
            .ok_or_else(|| LiveError::Unsupported("this disk has no image chain".into()))?;
        let flushed: &dyn BlockDev = match &self.cache {
            Some(c) => c.as_ref(),
            None => self.upper.as_ref(),
        };
        let cache = self.cache.clone();
        let dirty = move || {
            cache
                .as_ref()
                .map_or(0, |c| c.stats().dirty_folios as u64 * c.config().folio_size)
        };
        Ok(chain.snapshot(overlay, flushed, &dirty, &self.gate)?)
    }

    /// The `query-snapshots` answer.
    pub fn snapshots_json(&self) -> Value {
        let records = self.chain.as_ref().map(|c| c.records()).unwrap_or_default();
        Value::Array(records.iter().map(record_json).collect())
    }

    fn cache_json(&self) -> Value {
        let Some(cache) = &self.cache else {
            return Value::Null;
        };
        let (guest, forced) = self.mode.as_ref().map_or((true, false), |m| m.state());
        let cfg = cache.config();
        json!({
            "mode": if cache.writeback_enabled() { "writeback" } else { "writethrough" },
            "guest_writeback": guest,
            "host_writethrough": forced,
            "size": cfg.cache_size,
            "dirty_limit": cfg.dirty_limit,
            "folio_size": cfg.folio_size,
        })
    }

    /// The `query-status` answer.
    pub fn status_json(&self) -> Value {
        let image = self.chain.as_ref().map(|c| {
            let (top, format) = c.top();
            let chain: Vec<Value> = c
                .entries()
                .into_iter()
                .map(|e| json!({"path": e.path, "format": e.format}))
                .collect();
            json!({"top": top, "format": format.to_string(), "chain": chain})
        });
        let (queues, _) = self.metrics.snapshot();
        let in_flight: Vec<i64> = queues
            .iter()
            .take(usize::from(self.info.num_queues.max(1)))
            .map(|q| q.in_flight)
            .collect();
        let conn = self.frontend.load(Ordering::Relaxed);
        json!({
            "version": env!("CARGO_PKG_VERSION"),
            "paused": self.gate.is_paused(),
            "size": self.upper.size(),
            "read_only": self.info.read_only,
            "image": image,
            "cache": self.cache_json(),
            "frontend": {"connected": conn != 0, "connection": (conn != 0).then_some(conn)},
            "queues": {"count": self.info.num_queues, "size": self.info.queue_size,
                       "in_flight": in_flight},
            "snapshots": self.chain.as_ref().map_or(0, |c| c.snapshots_taken()),
        })
    }
}

fn record_json(r: &SnapshotRecord) -> Value {
    json!({
        "frozen": r.frozen,
        "frozen_format": r.frozen_format.to_string(),
        "overlay": r.overlay,
        "taken_at": r.taken_at,
        "pause_ms": r.pause.as_secs_f64() * 1e3,
        "preflush_ms": r.preflush.as_secs_f64() * 1e3,
        "dirty_bytes_before": r.dirty_before,
        "dirty_bytes_at_pause": r.dirty_at_pause,
    })
}

/// The `snapshot` answer.
pub fn snapshot_json(r: &SnapshotRecord) -> Value {
    record_json(r)
}

impl StatsSource for Live {
    fn stats(&self) -> StatsSnapshot {
        let (mut queues, flush) = self.metrics.snapshot();
        if self.info.num_queues > 0 {
            queues.truncate(usize::from(self.info.num_queues));
        }
        StatsSnapshot {
            queues,
            flush,
            cache: self.cache.as_ref().map(|c| CacheSnapshot {
                stats: c.stats(),
                folio_size: c.config().folio_size,
                writeback: c.writeback_enabled(),
            }),
            journal: self.journal.as_ref().map(|j| j.stats()),
            clusters_allocated: self.chain.as_ref().map_or(0, |c| c.clusters_allocated()),
            snapshots: self.chain.as_ref().map_or(0, |c| c.snapshots_taken()),
            last_snapshot_pause: self
                .chain
                .as_ref()
                .map_or(0.0, |c| c.last_pause().as_secs_f64()),
            frontend_connected: self.frontend.load(Ordering::Relaxed) != 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Recorder(Mutex<Vec<bool>>);
    impl WriteCacheControl for Recorder {
        fn set_writeback(&self, wb: bool) {
            self.0.lock().unwrap().push(wb);
        }
    }

    #[test]
    fn host_override_never_enables_writeback_behind_the_guest() {
        let rec = Arc::new(Recorder(Mutex::new(Vec::new())));
        let p = ModePolicy::new(rec.clone());
        p.set_writeback(false); // the guest turns its cache off
        p.force_writethrough(false); // "writeback" from the host: still write-through
        p.force_writethrough(true);
        p.set_writeback(true); // the guest turns it on: the host override still holds
        p.force_writethrough(false); // now both agree on write-back
        assert_eq!(
            *rec.0.lock().unwrap(),
            vec![false, false, false, false, true]
        );
        assert_eq!(p.state(), (true, false));
    }
}
