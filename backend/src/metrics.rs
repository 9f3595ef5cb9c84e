//! Request and disk statistics: per-queue counters and latency histograms recorded on the
//! request path, and their export as JSON (`query-stats` on the control socket) and in the
//! Prometheus/OpenMetrics text format (`--metrics`, encoded with `prometheus-client`).
//!
//! The request path records through [`RequestMetrics::begin`] / [`RequestTimer::finish`]: a
//! handful of relaxed atomic additions, no lock, no allocation. Everything else (cache counters,
//! qcow2 allocations, snapshots) is read from its owner when a snapshot of the statistics is
//! taken ([`StatsSnapshot`]), so the numbers of both exports come from one place.
//!
//! Locking model: only atomics. Counters are monotonic; a snapshot is not atomic as a whole
//! (a request finishing during a scrape may show in its counter and not yet in its histogram),
//! which Prometheus tolerates.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use blockdev::BlockError;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Unit;
use serde_json::{json, Value};

use crate::request::ExecuteRequestError;

/// Upper bounds of the latency histogram buckets, in seconds (the last bucket is +Inf).
pub const LATENCY_BUCKETS: [f64; 18] = [
    5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1,
    0.25, 0.5, 1.0, 5.0,
];

/// The request types, as the `op` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// VIRTIO_BLK_T_IN.
    Read,
    /// VIRTIO_BLK_T_OUT.
    Write,
    /// VIRTIO_BLK_T_FLUSH.
    Flush,
    /// VIRTIO_BLK_T_DISCARD.
    Discard,
    /// VIRTIO_BLK_T_WRITE_ZEROES.
    WriteZeroes,
    /// VIRTIO_BLK_T_GET_ID.
    GetId,
    /// Anything else, including chains too malformed to have a type.
    Other,
}

impl Op {
    /// Every op, in label order.
    pub const ALL: [Op; 7] = [
        Op::Read,
        Op::Write,
        Op::Flush,
        Op::Discard,
        Op::WriteZeroes,
        Op::GetId,
        Op::Other,
    ];

    /// The op of a virtio-blk request type.
    pub fn from_type(t: u32) -> Op {
        use crate::virtio_blk::*;
        match t {
            VIRTIO_BLK_T_IN => Op::Read,
            VIRTIO_BLK_T_OUT => Op::Write,
            VIRTIO_BLK_T_FLUSH => Op::Flush,
            VIRTIO_BLK_T_DISCARD => Op::Discard,
            VIRTIO_BLK_T_WRITE_ZEROES => Op::WriteZeroes,
            VIRTIO_BLK_T_GET_ID => Op::GetId,
            _ => Op::Other,
        }
    }

    /// The label value.
    pub fn name(self) -> &'static str {
        match self {
            Op::Read => "read",
            Op::Write => "write",
            Op::Flush => "flush",
            Op::Discard => "discard",
            Op::WriteZeroes => "write_zeroes",
            Op::GetId => "get_id",
            Op::Other => "other",
        }
    }
}

/// Classes of failed requests, as the `kind` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// EIO or another host I/O error.
    Io,
    /// ENOSPC/EDQUOT: the host file system is full.
    NoSpace,
    /// The image is corrupt.
    Corrupt,
    /// A write-type request to a read-only disk.
    ReadOnly,
    /// An unsupported request type or flag.
    Unsupported,
    /// A malformed request (bad chain, length, alignment, range).
    Invalid,
    /// A guest address outside guest RAM.
    GuestMemory,
}

impl ErrorKind {
    /// Every kind, in label order.
    pub const ALL: [ErrorKind; 7] = [
        ErrorKind::Io,
        ErrorKind::NoSpace,
        ErrorKind::Corrupt,
        ErrorKind::ReadOnly,
        ErrorKind::Unsupported,
        ErrorKind::Invalid,
        ErrorKind::GuestMemory,
    ];

    /// The label value.
    pub fn name(self) -> &'static str {
        match self {
            ErrorKind::Io => "io",
            ErrorKind::NoSpace => "no_space",
            ErrorKind::Corrupt => "corrupt",
            ErrorKind::ReadOnly => "read_only",
            ErrorKind::Unsupported => "unsupported",
            ErrorKind::Invalid => "invalid",
            ErrorKind::GuestMemory => "guest_memory",
        }
    }

    /// The class of a failed request.
    pub fn of(e: &ExecuteRequestError) -> ErrorKind {
        use ExecuteRequestError as E;
        match e {
            E::Disk { source, .. } => match source {
                BlockError::Io(io) => match io.raw_os_error() {
                    Some(libc::ENOSPC) | Some(libc::EDQUOT) => ErrorKind::NoSpace,
                    _ => ErrorKind::Io,
                },
                BlockError::Corrupt(_) => ErrorKind::Corrupt,
                BlockError::ReadOnly => ErrorKind::ReadOnly,
                BlockError::Unsupported(_) => ErrorKind::Unsupported,
                BlockError::OutOfRange { .. } => ErrorKind::Invalid,
            },
            E::ReadOnly => ErrorKind::ReadOnly,
            E::UnsupportedFlags(_) | E::UnsupportedType(_) => ErrorKind::Unsupported,
            E::GuestMemory(_) => ErrorKind::GuestMemory,
            _ => ErrorKind::Invalid,
        }
    }
}

/// A latency histogram of atomics.
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    sum_ns: AtomicU64,
    count: AtomicU64,
}

/// A copy of a [`Histogram`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HistogramSnapshot {
    /// Observations per bucket (not cumulative); the last one is +Inf.
    pub buckets: Vec<u64>,
    /// Sum of the observations, in seconds.
    pub sum: f64,
    /// Number of observations.
    pub count: u64,
}

impl Histogram {
    /// Records one observation.
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = LATENCY_BUCKETS
            .iter()
            .position(|&b| secs <= b)
            .unwrap_or(LATENCY_BUCKETS.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// A copy of the current values.
    pub fn snapshot(&self) -> HistogramSnapshot {
        HistogramSnapshot {
            buckets: self
                .buckets
                .iter()
                .map(|b| b.load(Ordering::Relaxed))
                .collect(),
            sum: self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9,
            count: self.count.load(Ordering::Relaxed),
        }
    }
}

impl HistogramSnapshot {
    fn to_json(&self) -> Value {
        let mut cumulative = 0;
        let buckets: Vec<Value> = self
            .buckets
            .iter()
            .enumerate()
            .map(|(i, n)| {
                cumulative += n;
                let le = LATENCY_BUCKETS.get(i).map_or(json!("+Inf"), |b| json!(b));
                json!({"le": le, "count": cumulative})
            })
            .collect();
        json!({"count": self.count, "sum_seconds": self.sum, "buckets": buckets})
    }

    fn encode(&self, enc: &mut prometheus_client::encoding::MetricEncoder) -> std::fmt::Result {
        let buckets: Vec<(f64, u64)> = self
            .buckets
            .iter()
            .enumerate()
            .map(|(i, &n)| (LATENCY_BUCKETS.get(i).copied().unwrap_or(f64::MAX), n))
            .collect();
        enc.encode_histogram::<NoLabelSet>(self.sum, self.count, &buckets, None)
    }
}

#[derive(Debug, Default)]
struct OpCounters {
    requests: AtomicU64,
    bytes: AtomicU64,
    latency: Histogram,
    errors: [AtomicU64; ErrorKind::ALL.len()],
}

#[derive(Debug, Default)]
struct QueueCounters {
    ops: [OpCounters; Op::ALL.len()],
    in_flight: AtomicI64,
}

/// Per-queue request statistics and the flush statistics of the whole disk.
#[derive(Debug)]
pub struct RequestMetrics {
    queues: Box<[QueueCounters]>,
    flush: Histogram,
}

/// A request being timed; [`RequestTimer::finish`] records it.
#[derive(Debug)]
pub struct RequestTimer<'a> {
    metrics: &'a RequestMetrics,
    queue: usize,
    start: Instant,
    done: bool,
}

impl RequestMetrics {
    /// Statistics for `num_queues` queues (at least one).
    pub fn new(num_queues: usize) -> Self {
        RequestMetrics {
            queues: (0..num_queues.max(1))
                .map(|_| QueueCounters::default())
                .collect(),
            flush: Histogram::default(),
        }
    }

    /// Number of queues tracked.
    pub fn num_queues(&self) -> usize {
        self.queues.len()
    }

    /// Starts timing a request of `queue` (an out-of-range queue counts as the last one).
    pub fn begin(&self, queue: usize) -> RequestTimer<'_> {
        let queue = queue.min(self.queues.len() - 1);
        self.queues[queue].in_flight.fetch_add(1, Ordering::Relaxed);
        RequestTimer {
            metrics: self,
            queue,
            start: Instant::now(),
            done: false,
        }
    }

    /// Records a flush of the disk asked for on the control socket; guest FLUSH requests are
    /// recorded by [`RequestTimer::finish`].
    pub fn record_flush(&self, d: Duration) {
        self.flush.observe(d);
    }

    /// A copy of every per-queue value.
    pub fn snapshot(&self) -> (Vec<QueueSnapshot>, HistogramSnapshot) {
        let queues = self
            .queues
            .iter()
            .map(|q| QueueSnapshot {
                in_flight: q.in_flight.load(Ordering::Relaxed),
                ops: q
                    .ops
                    .iter()
                    .map(|o| OpSnapshot {
                        requests: o.requests.load(Ordering::Relaxed),
                        bytes: o.bytes.load(Ordering::Relaxed),
                        latency: o.latency.snapshot(),
                        errors: o.errors.iter().map(|e| e.load(Ordering::Relaxed)).collect(),
                    })
                    .collect(),
            })
            .collect();
        (queues, self.flush.snapshot())
    }
}

/// A request's timer that is not tied to a borrow of the statistics (a read in flight on
/// io_uring, completed from another call): [`RequestMetrics::finish_detached`] records it.
#[derive(Debug)]
pub struct DetachedTimer {
    queue: usize,
    start: Instant,
}

impl RequestMetrics {
    /// Like [`Self::begin`], for a request that completes later ([`DetachedTimer`]).
    pub fn begin_detached(&self, queue: usize) -> DetachedTimer {
        let t = self.begin(queue);
        let d = DetachedTimer {
            queue: t.queue,
            start: t.start,
        };
        std::mem::forget(t);
        d
    }

    /// Forgets a request started with [`Self::begin_detached`] without recording it (it is
    /// executed again, and recorded, another way).
    pub fn abandon_detached(&self, t: DetachedTimer) {
        self.queues[t.queue]
            .in_flight
            .fetch_sub(1, Ordering::Relaxed);
    }

    /// Records a request started with [`Self::begin_detached`].
    pub fn finish_detached(
        &self,
        t: DetachedTimer,
        op: Op,
        bytes: u64,
        error: Option<&ExecuteRequestError>,
    ) {
        RequestTimer {
            metrics: self,
            queue: t.queue,
            start: t.start,
            done: false,
        }
        .finish(op, bytes, error);
    }
}

impl RequestTimer<'_> {
    /// Records the request: its type, the bytes it moved (data, or the range of a discard or
    /// write-zeroes) and its error, if any.
    pub fn finish(mut self, op: Op, bytes: u64, error: Option<&ExecuteRequestError>) {
        self.done = true;
        let elapsed = self.start.elapsed();
        let q = &self.metrics.queues[self.queue];
        let i = Op::ALL.iter().position(|&o| o == op).unwrap_or(0);
        let c = &q.ops[i];
        c.requests.fetch_add(1, Ordering::Relaxed);
        c.latency.observe(elapsed);
        match error {
            None => {
                c.bytes.fetch_add(bytes, Ordering::Relaxed);
            }
            Some(e) => {
                let kind = ErrorKind::of(e);
                let k = ErrorKind::ALL.iter().position(|&x| x == kind).unwrap_or(0);
                c.errors[k].fetch_add(1, Ordering::Relaxed);
            }
        }
        if op == Op::Flush {
            self.metrics.flush.observe(elapsed);
        }
        q.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Drop for RequestTimer<'_> {
    fn drop(&mut self) {
        if !self.done {
            // Not finished (a panic unwound through the request): keep the gauge honest.
            self.metrics.queues[self.queue]
                .in_flight
                .fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// Statistics of one request type on one queue.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct OpSnapshot {
    /// Completed requests (successful or not).
    pub requests: u64,
    /// Bytes moved by successful requests.
    pub bytes: u64,
    /// Latency from entering the disk path to the status.
    pub latency: HistogramSnapshot,
    /// Failed requests per [`ErrorKind`].
    pub errors: Vec<u64>,
}

/// Statistics of one queue.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct QueueSnapshot {
    /// Requests executing now.
    pub in_flight: i64,
    /// Per [`Op`].
    pub ops: Vec<OpSnapshot>,
}

/// Cache values exported.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CacheSnapshot {
    /// The cache's counters.
    pub stats: cache::CacheStats,
    /// Folio size, to turn folio counts into bytes.
    pub folio_size: u64,
    /// Whether the cache currently writes back (false: write-through).
    pub writeback: bool,
}

/// Everything the daemon exports, taken at one moment.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StatsSnapshot {
    /// Per queue.
    pub queues: Vec<QueueSnapshot>,
    /// Flushes of the disk asked for by guest requests and on the control socket.
    pub flush: HistogramSnapshot,
    /// The folio cache, if the disk has one.
    pub cache: Option<CacheSnapshot>,
    /// The crash journal, if it is on.
    pub journal: Option<crate::journal::JournalStats>,
    /// qcow2 data clusters allocated by guest writes since start (all tops together).
    pub clusters_allocated: u64,
    /// Live snapshots taken.
    pub snapshots: u64,
    /// Guest-request pause of the last live snapshot, in seconds.
    pub last_snapshot_pause: f64,
    /// Whether a frontend is connected.
    pub frontend_connected: bool,
}

impl StatsSnapshot {
    /// The `query-stats` answer.
    pub fn to_json(&self) -> Value {
        let queues: Vec<Value> = self
            .queues
            .iter()
            .enumerate()
            .map(|(qi, q)| {
                let mut ops = serde_json::Map::new();
                for (op, o) in Op::ALL.iter().zip(&q.ops) {
                    let mut errors = serde_json::Map::new();
                    for (k, n) in ErrorKind::ALL.iter().zip(&o.errors) {
                        errors.insert(k.name().into(), json!(n));
                    }
                    ops.insert(
                        op.name().into(),
                        json!({
                            "requests": o.requests,
                            "bytes": o.bytes,
                            "errors": errors,
                            "latency": o.latency.to_json(),
                        }),
                    );
                }
                json!({"queue": qi, "in_flight": q.in_flight, "ops": ops})
            })
            .collect();
        let cache = self.cache.as_ref().map(|c| {
            json!({
                "writeback": c.writeback,
                "read_hits": c.stats.read_hits,
                "read_misses": c.stats.read_misses,
                "evictions": c.stats.evictions,
                "writebacks": c.stats.writebacks,
                "writeback_bytes": c.stats.writeback_bytes,
                "writeback_errors": c.stats.writeback_errors,
                "dirty_bytes": c.stats.dirty_folios as u64 * c.folio_size,
                "cached_bytes": c.stats.cached_folios as u64 * c.folio_size,
                "throttled": c.stats.throttled,
                "bypassed": c.stats.bypassed,
                "cow_copies": c.stats.cow_copies,
                "merged_bytes": c.stats.merged_bytes,
            })
        });
        let journal = self.journal.as_ref().map(|j| {
            json!({
                "records": j.records,
                "record_bytes": j.record_bytes,
                "persisted_writes": j.persisted_writes,
                "held_bytes": j.held_bytes,
                "trims": j.trims,
                "waits_for_room": j.waits_for_room,
                "replayed_records": j.replayed_records,
                "replayed_bytes": j.replayed_bytes,
                "refusing": j.refusing,
            })
        });
        json!({
            "queues": queues,
            "flush": self.flush.to_json(),
            "cache": cache,
            "crash_journal": journal,
            "qcow2_clusters_allocated": self.clusters_allocated,
            "snapshots": self.snapshots,
            "last_snapshot_pause_seconds": self.last_snapshot_pause,
            "frontend_connected": self.frontend_connected,
        })
    }

    /// Encodes the snapshot as metric families named `snapblk_*`.
    pub fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        use prometheus_client::encoding::MetricEncoder;
        type Labels<'a> = Vec<(&'static str, String)>;

        fn counter(me: &mut MetricEncoder, labels: &Labels, v: u64) -> std::fmt::Result {
            me.encode_family(labels)?
                .encode_counter::<NoLabelSet, u64, u64>(&v, None)
        }
        fn plain_counter(
            enc: &mut DescriptorEncoder,
            name: &str,
            help: &str,
            unit: Option<&Unit>,
            v: u64,
        ) -> std::fmt::Result {
            let mut me = enc.encode_descriptor(name, help, unit, MetricType::Counter)?;
            me.encode_counter::<NoLabelSet, u64, u64>(&v, None)
        }
        fn gauge(
            enc: &mut DescriptorEncoder,
            name: &str,
            help: &str,
            unit: Option<&Unit>,
            v: f64,
        ) -> std::fmt::Result {
            let mut me = enc.encode_descriptor(name, help, unit, MetricType::Gauge)?;
            me.encode_gauge(&v)
        }

        let per_op = |q: usize, op: Op| -> Labels {
            vec![("queue", q.to_string()), ("op", op.name().to_string())]
        };
        {
            let mut me = enc.encode_descriptor(
                "requests",
                "Guest requests completed, by queue and type.",
                None,
                MetricType::Counter,
            )?;
            for (qi, q) in self.queues.iter().enumerate() {
                for (op, o) in Op::ALL.iter().zip(&q.ops) {
                    counter(&mut me, &per_op(qi, *op), o.requests)?;
                }
            }
        }
        {
            let mut me = enc.encode_descriptor(
                "request",
                "Bytes moved by successful guest requests (the range of discard and write-zeroes).",
                Some(&Unit::Bytes),
                MetricType::Counter,
            )?;
            for (qi, q) in self.queues.iter().enumerate() {
                for (op, o) in Op::ALL.iter().zip(&q.ops) {
                    counter(&mut me, &per_op(qi, *op), o.bytes)?;
                }
            }
        }
        {
            let mut me = enc.encode_descriptor(
                "request_duration",
                "Time from a guest request entering the disk path to its status.",
                Some(&Unit::Seconds),
                MetricType::Histogram,
            )?;
            for (qi, q) in self.queues.iter().enumerate() {
                for (op, o) in Op::ALL.iter().zip(&q.ops) {
                    let labels = per_op(qi, *op);
                    o.latency.encode(&mut me.encode_family(&labels)?)?;
                }
            }
        }
        {
            let mut me = enc.encode_descriptor(
                "request_errors",
                "Failed guest requests, by queue, type and kind of error.",
                None,
                MetricType::Counter,
            )?;
            for (qi, q) in self.queues.iter().enumerate() {
                for (op, o) in Op::ALL.iter().zip(&q.ops) {
                    for (k, n) in ErrorKind::ALL.iter().zip(&o.errors) {
                        let mut labels = per_op(qi, *op);
                        labels.push(("kind", k.name().to_string()));
                        counter(&mut me, &labels, *n)?;
                    }
                }
            }
        }
        {
            let mut me = enc.encode_descriptor(
                "requests_in_flight",
                "Guest requests executing now, by queue.",
                None,
                MetricType::Gauge,
            )?;
            for (qi, q) in self.queues.iter().enumerate() {
                let labels: Labels = vec![("queue", qi.to_string())];
                me.encode_family(&labels)?.encode_gauge(&q.in_flight)?;
            }
        }
        plain_counter(
            &mut enc,
            "flushes",
            "Flushes of the disk asked for by guest requests and on the control socket.",
            None,
            self.flush.count,
        )?;
        {
            let mut me = enc.encode_descriptor(
                "flush_duration",
                "Time to make everything acknowledged durable.",
                Some(&Unit::Seconds),
                MetricType::Histogram,
            )?;
            self.flush.encode(&mut me)?;
        }
        if let Some(c) = &self.cache {
            let s = &c.stats;
            plain_counter(
                &mut enc,
                "cache_read_hits",
                "Reads served from the cache.",
                None,
                s.read_hits,
            )?;
            plain_counter(
                &mut enc,
                "cache_read_misses",
                "Reads that filled from the image.",
                None,
                s.read_misses,
            )?;
            plain_counter(
                &mut enc,
                "cache_evictions",
                "Folios evicted.",
                None,
                s.evictions,
            )?;
            plain_counter(
                &mut enc,
                "cache_writebacks",
                "Folio writebacks that reached the image.",
                None,
                s.writebacks,
            )?;
            plain_counter(
                &mut enc,
                "cache_writeback",
                "Bytes written back to the image.",
                Some(&Unit::Bytes),
                s.writeback_bytes,
            )?;
            plain_counter(
                &mut enc,
                "cache_writeback_errors",
                "Failed writebacks (the data stayed dirty).",
                None,
                s.writeback_errors,
            )?;
            plain_counter(
                &mut enc,
                "cache_cow_copies",
                "Folios copied because a write or fill changed them while a writeback wrote from their memory.",
                None,
                s.cow_copies,
            )?;
            plain_counter(
                &mut enc,
                "cache_writeback_merged",
                "Bytes copied into merged buffers by writebacks of several folios together.",
                Some(&Unit::Bytes),
                s.merged_bytes,
            )?;
            gauge(
                &mut enc,
                "cache_dirty",
                "Bytes in dirty folios (folio granularity).",
                Some(&Unit::Bytes),
                (s.dirty_folios as u64 * c.folio_size) as f64,
            )?;
            gauge(
                &mut enc,
                "cache_cached",
                "Bytes in cached folios.",
                Some(&Unit::Bytes),
                (s.cached_folios as u64 * c.folio_size) as f64,
            )?;
            gauge(
                &mut enc,
                "cache_writeback_mode",
                "1 when the cache writes back, 0 when it writes through.",
                None,
                if c.writeback { 1.0 } else { 0.0 },
            )?;
        }
        if let Some(j) = &self.journal {
            plain_counter(
                &mut enc,
                "journal_records",
                "Crash-journal records appended: writes with their data, discards, write-zeroes and markers.",
                None,
                j.records,
            )?;
            plain_counter(
                &mut enc,
                "journal_record",
                "Bytes appended to the crash journal (record headers and data).",
                Some(&Unit::Bytes),
                j.record_bytes,
            )?;
            plain_counter(
                &mut enc,
                "journal_persisted_writes",
                "Writes the stack below persisted in place, recorded in the crash journal as markers without their data.",
                None,
                j.persisted_writes,
            )?;
            plain_counter(
                &mut enc,
                "journal_trims",
                "Crash-journal segments emptied by flushes.",
                None,
                j.trims,
            )?;
            plain_counter(
                &mut enc,
                "journal_waits_for_room",
                "Times a write found both crash-journal segments full and waited for a trim.",
                None,
                j.waits_for_room,
            )?;
            plain_counter(
                &mut enc,
                "journal_replayed_records",
                "Records a crashed daemon left in the crash journal, replayed at start.",
                None,
                j.replayed_records,
            )?;
            gauge(
                &mut enc,
                "journal_held",
                "Bytes of records the crash journal holds now (what a replay would read).",
                Some(&Unit::Bytes),
                j.held_bytes as f64,
            )?;
            gauge(
                &mut enc,
                "journal_refusing",
                "1 when the crash journal refuses writes (untrusted at start, or poisoned since).",
                None,
                if j.refusing { 1.0 } else { 0.0 },
            )?;
        }
        plain_counter(
            &mut enc,
            "qcow2_clusters_allocated",
            "qcow2 data clusters allocated by guest writes (copy-on-write and first writes).",
            None,
            self.clusters_allocated,
        )?;
        plain_counter(
            &mut enc,
            "snapshots",
            "Live snapshots taken.",
            None,
            self.snapshots,
        )?;
        gauge(
            &mut enc,
            "snapshot_last_pause",
            "Guest-request pause of the last live snapshot.",
            Some(&Unit::Seconds),
            self.last_snapshot_pause,
        )?;
        gauge(
            &mut enc,
            "frontend_connected",
            "1 while a vhost-user frontend is connected.",
            None,
            if self.frontend_connected { 1.0 } else { 0.0 },
        )
    }
}

/// Something that can produce a [`StatsSnapshot`] at scrape time.
pub trait StatsSource: Send + Sync + 'static {
    /// The current statistics.
    fn stats(&self) -> StatsSnapshot;
}

/// The `prometheus-client` collector over a [`StatsSource`].
pub struct Collector<S: StatsSource>(pub std::sync::Arc<S>);

impl<S: StatsSource> std::fmt::Debug for Collector<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Collector")
    }
}

impl<S: StatsSource> prometheus_client::collector::Collector for Collector<S> {
    fn encode(&self, enc: DescriptorEncoder) -> std::fmt::Result {
        self.0.stats().encode(enc)
    }
}

/// The OpenMetrics text exposition of `source`.
pub fn render<S: StatsSource>(source: std::sync::Arc<S>) -> String {
    let mut registry = prometheus_client::registry::Registry::with_prefix("snapblk");
    registry.register_collector(Box::new(Collector(source)));
    let mut out = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &registry) {
        log::error!("encoding the metrics failed: {e}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed(StatsSnapshot);
    impl StatsSource for Fixed {
        fn stats(&self) -> StatsSnapshot {
            self.0.clone()
        }
    }

    #[test]
    fn request_counts_bytes_latency_and_errors_land_in_their_queue_and_op() {
        let m = RequestMetrics::new(2);
        let t = m.begin(1);
        assert_eq!(m.snapshot().0[1].in_flight, 1);
        t.finish(Op::Write, 4096, None);
        m.begin(1).finish(
            Op::Read,
            512,
            Some(&ExecuteRequestError::Disk {
                op: "read",
                source: BlockError::Io(std::io::Error::from_raw_os_error(libc::ENOSPC)),
            }),
        );
        m.begin(7).finish(Op::Flush, 0, None);
        let (q, flush) = m.snapshot();
        assert_eq!(q[0].ops[0].requests, 0);
        assert_eq!(q[1].ops[1].requests, 1);
        assert_eq!(q[1].ops[1].bytes, 4096);
        assert_eq!(q[1].ops[1].latency.count, 1);
        assert_eq!(q[1].ops[0].requests, 1);
        assert_eq!(q[1].ops[0].bytes, 0, "failed requests move no bytes");
        assert_eq!(q[1].ops[0].errors[1], 1, "ENOSPC is no_space");
        assert_eq!(q[1].ops[2].requests, 1, "queue 7 clamps to the last queue");
        assert_eq!(flush.count, 1);
        assert_eq!(q[1].in_flight, 0);
        drop(m.begin(0));
        assert_eq!(m.snapshot().0[0].in_flight, 0);
    }

    #[test]
    fn exposition_names_follow_prometheus_conventions() {
        let m = RequestMetrics::new(1);
        m.begin(0).finish(Op::Read, 8192, None);
        let (queues, flush) = m.snapshot();
        let snap = StatsSnapshot {
            queues,
            flush,
            cache: Some(CacheSnapshot {
                folio_size: 65536,
                ..Default::default()
            }),
            journal: Some(crate::journal::JournalStats {
                persisted_writes: 5,
                held_bytes: 96,
                ..Default::default()
            }),
            clusters_allocated: 3,
            ..Default::default()
        };
        let text = render(std::sync::Arc::new(Fixed(snap.clone())));
        for line in [
            "snapblk_requests_total{queue=\"0\",op=\"read\"} 1",
            "snapblk_request_bytes_total{queue=\"0\",op=\"read\"} 8192",
            "snapblk_request_duration_seconds_count{queue=\"0\",op=\"read\"} 1",
            "snapblk_request_duration_seconds_bucket{le=\"+Inf\",queue=\"0\",op=\"read\"} 1",
            "snapblk_request_errors_total{queue=\"0\",op=\"read\",kind=\"io\"} 0",
            "snapblk_requests_in_flight{queue=\"0\"} 0",
            "snapblk_flushes_total 0",
            "snapblk_cache_writeback_bytes_total 0",
            "snapblk_cache_dirty_bytes 0",
            "snapblk_qcow2_clusters_allocated_total 3",
            "snapblk_journal_persisted_writes_total 5",
            "snapblk_journal_record_bytes_total 0",
            "snapblk_journal_held_bytes 96",
            "snapblk_journal_refusing 0",
            "# EOF",
        ] {
            assert!(
                text.lines().any(|l| l.starts_with(line)),
                "missing {line:?} in\n{text}"
            );
        }
        let j = snap.to_json();
        assert_eq!(j["queues"][0]["ops"]["read"]["bytes"], 8192);
        assert_eq!(j["qcow2_clusters_allocated"], 3);
        assert_eq!(j["crash_journal"]["persisted_writes"], 5);
        assert_eq!(j["crash_journal"]["held_bytes"], 96);
    }
}
