//! `snapblk-bench`: a fio-like benchmark client for any vhost-user-blk daemon.
//!
//! Owns: the command line, the per-queue I/O loops, latency histograms, the daemon CPU/RSS
//! sampling from `/proc`, the report (text or JSON) and the "physical ceiling" measurements
//! (memory copy bandwidth, `pwrite`+`fdatasync` latency) used to put the figures in context.
//!
//! Threads: one worker thread per virtqueue, each holding its own queue lock from
//! [`snapblk_tests::client`] for the whole run, so workers never contend; the main thread only
//! samples `/proc` and merges the per-worker results after joining them.
//!
//! Semantics (close to fio's): `--iodepth` is per queue; `--flush-every N` makes each worker, after
//! every N writes, wait for its writes in flight to complete and then issue a flush and wait for it
//! (what a guest `fsync` does); latencies are measured from submission to the completion being
//! reaped; only completions inside the measurement window (after `--ramp`) are counted.

use std::fmt::Write as _;
use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use snapblk_tests::client::{Client, ClientConfig, Op, Queue};

/// The access pattern.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Rw {
    /// Sequential reads.
    Read,
    /// Sequential writes.
    Write,
    /// Uniformly random reads.
    Randread,
    /// Uniformly random writes.
    Randwrite,
    /// Uniformly random reads and writes, `--mix` percent reads.
    Randrw,
}

impl Rw {
    fn name(self) -> &'static str {
        match self {
            Rw::Read => "read",
            Rw::Write => "write",
            Rw::Randread => "randread",
            Rw::Randwrite => "randwrite",
            Rw::Randrw => "randrw",
        }
    }

    fn sequential(self) -> bool {
        matches!(self, Rw::Read | Rw::Write)
    }
}

/// Benchmark a vhost-user-blk daemon (snapblk, qemu-storage-daemon, ...) without a guest.
#[derive(Debug, Parser)]
#[command(name = "snapblk-bench", version, about)]
struct Args {
    /// vhost-user-blk socket to connect to (required unless --ceiling-dir is given).
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Number of virtqueues, one worker thread each.
    #[arg(long, default_value_t = 1, value_name = "N")]
    queues: usize,
    /// Requests in flight per queue (1..=255).
    #[arg(long, default_value_t = 1, value_name = "D")]
    iodepth: usize,
    /// Request size (suffixes k, m, g = powers of 1024).
    #[arg(long, default_value = "4k", value_parser = parse_size, value_name = "SIZE")]
    bs: u64,
    /// Access pattern.
    #[arg(long, value_enum, default_value_t = Rw::Randread)]
    rw: Rw,
    /// Percentage of reads for --rw randrw.
    #[arg(long, default_value_t = 50, value_name = "PCT",
          value_parser = clap::value_parser!(u32).range(0..=100))]
    mix: u32,
    /// After every N writes (per queue), drain and flush; 0 = never.
    #[arg(long, default_value_t = 0, value_name = "N")]
    flush_every: u64,
    /// Measured run time in seconds (after the ramp).
    #[arg(long, default_value_t = 5.0, value_name = "SECS")]
    runtime: f64,
    /// Unmeasured warm-up time in seconds before the measurement starts.
    #[arg(long, default_value_t = 0.0, value_name = "SECS")]
    ramp: f64,
    /// Bytes of the disk to use, starting at the --offset-range start (default: all of it).
    #[arg(long, value_parser = parse_size, value_name = "BYTES")]
    size: Option<u64>,
    /// Restrict I/O to START:END (bytes, END exclusive and optional).
    #[arg(long, value_name = "START:END")]
    offset_range: Option<String>,
    /// Sequential patterns advance by this many bytes per request (default: --bs).
    #[arg(long, value_parser = parse_size, value_name = "BYTES")]
    stride: Option<u64>,
    /// Sequential patterns stop (end the run early) at the end of the region instead of wrapping:
    /// with --stride larger than --bs this keeps every write a first write (COW path).
    #[arg(long)]
    no_wrap: bool,
    /// When a worker stops submitting (window end or region exhausted), it waits for its requests
    /// in flight, sends one FLUSH and waits for it: the measured window ends when the last
    /// worker's FLUSH completes, and requests completing after the window end still count. Write
    /// rates are then rates of durable data.
    #[arg(long)]
    final_flush: bool,
    /// The daemon's PID: report its CPU time per I/O and peak RSS from /proc.
    #[arg(long, value_name = "PID")]
    daemon_pid: Option<u32>,
    /// Seconds to wait for the socket to accept a connection.
    #[arg(long, default_value_t = 10.0, value_name = "SECS")]
    connect_timeout: f64,
    /// Random seed (offsets, read/write mix, payload bytes).
    #[arg(long, default_value_t = 1, value_name = "N")]
    seed: u64,
    /// Free-form label copied into the report.
    #[arg(long, default_value = "")]
    label: String,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
    /// Instead of benchmarking, check that the device's contents equal FILE (a raw image of the
    /// expected disk): same capacity, and --verify-blocks random 4 KiB blocks plus the first and
    /// last block read back identical. Exit status 1 on any difference.
    #[arg(long, value_name = "FILE")]
    verify_file: Option<PathBuf>,
    /// Number of random blocks --verify-file compares.
    #[arg(long, default_value_t = 2048, value_name = "N")]
    verify_blocks: u64,
    /// Instead of benchmarking a socket, measure the machine's ceiling: memory copy bandwidth and
    /// 4 KiB pwrite+fdatasync latency of a scratch file created in DIR (same file system as the
    /// images).
    #[arg(long, value_name = "DIR")]
    ceiling_dir: Option<PathBuf>,
}

/// Parses `4096`, `4k`, `4K`, `4KiB`, `128k`, `1m`, `2G` (binary multiples).
fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, suffix) = t.split_at(digits_end);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size (e.g. 4k, 128k, 1g)"))?;
    let mult: u64 = match suffix.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        other => return Err(format!("unknown size suffix {other:?} in {s:?}")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("{s:?} overflows 64 bits"))
}

/// Latency histogram: exact below 64 ns, then 32 sub-buckets per power of two (~3 % error).
#[derive(Clone)]
struct Hist {
    buckets: Vec<u64>,
    count: u64,
    sum_ns: u128,
    max_ns: u64,
}

const SUB_BITS: u32 = 5;
const SUB: u64 = 1 << SUB_BITS;
const HIST_BUCKETS: usize = 64 * SUB as usize;

impl Hist {
    fn new() -> Self {
        Hist {
            buckets: vec![0; HIST_BUCKETS],
            count: 0,
            sum_ns: 0,
            max_ns: 0,
        }
    }

    fn index(v: u64) -> usize {
        if v < 2 * SUB {
            return v as usize;
        }
        let exp = 63 - v.leading_zeros(); // >= SUB_BITS + 1
        let shift = exp - SUB_BITS;
        let mant = (v >> shift) - SUB; // 0..SUB
        ((u64::from(shift) + 1) * SUB + mant) as usize
    }

    /// Midpoint of the values that land in bucket `i`.
    fn value(i: usize) -> u64 {
        let i = i as u64;
        if i < 2 * SUB {
            return i;
        }
        let shift = i / SUB - 1;
        let mant = i % SUB + SUB;
        let lo = mant << shift;
        lo + ((1u64 << shift) >> 1)
    }

    fn record(&mut self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let i = Self::index(ns).min(HIST_BUCKETS - 1);
        if let Some(b) = self.buckets.get_mut(i) {
            *b += 1;
        }
        self.count += 1;
        self.sum_ns += u128::from(ns);
        self.max_ns = self.max_ns.max(ns);
    }

    fn merge(&mut self, other: &Hist) {
        for (a, b) in self.buckets.iter_mut().zip(&other.buckets) {
            *a += b;
        }
        self.count += other.count;
        self.sum_ns += other.sum_ns;
        self.max_ns = self.max_ns.max(other.max_ns);
    }

    fn mean_us(&self) -> f64 {
        if self.count == 0 {
            return 0.0;
        }
        self.sum_ns as f64 / self.count as f64 / 1000.0
    }

    /// The latency at each of [`CURVE_PERCENTILES`] (for the latency plots), keyed like fio's
    /// `clat_ns.percentile` ("99.900000").
    fn curve(&self) -> Vec<(String, f64)> {
        CURVE_PERCENTILES
            .iter()
            .map(|&p| (format!("{p:.6}"), self.percentile_us(p)))
            .collect()
    }

    fn percentile_us(&self, p: f64) -> f64 {
        if self.count == 0 {
            return 0.0;
        }
        let rank = ((p / 100.0) * self.count as f64).ceil().max(1.0) as u64;
        let mut seen = 0u64;
        for (i, &n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return Self::value(i).min(self.max_ns) as f64 / 1000.0;
            }
        }
        self.max_ns as f64 / 1000.0
    }
}

/// Percentiles reported as a latency curve, the points fio reports (so both plot alike).
const CURVE_PERCENTILES: [f64; 17] = [
    1.0, 5.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0, 95.0, 99.0, 99.5, 99.9, 99.95,
    99.99,
];

/// xorshift64*: fast, deterministic, good enough for offsets.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `0..n` (`n > 0`).
    fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next()) * u128::from(n)) >> 64) as u64
    }
}

/// What one worker does.
#[derive(Clone, Copy)]
struct Job {
    rw: Rw,
    mix: u32,
    bs: u64,
    depth: usize,
    flush_every: u64,
    region_start: u64,
    region_len: u64,
    stride: u64,
    wrap: bool,
    /// After the last request, drain and FLUSH; the window ends when that FLUSH completes.
    final_flush: bool,
    seed: u64,
    measure_start: Instant,
    end: Instant,
}

/// What one worker measured.
struct WorkerResult {
    reads: u64,
    writes: u64,
    flushes: u64,
    bytes: u64,
    lat: Hist,
    read_lat: Hist,
    write_lat: Hist,
    flush_lat: Hist,
    errors: u64,
    first_error: Option<String>,
    /// When the worker stopped counting (the window end, or earlier if the region ran out).
    finished: Instant,
}

const FLUSH_TAG: u64 = u64::MAX;

fn run_worker(
    q: &mut Queue,
    job: Job,
    stop: &AtomicBool,
) -> Result<WorkerResult, snapblk_tests::client::ClientError> {
    let mut rng = Rng::new(job.seed);
    let bs = usize::try_from(job.bs).unwrap_or(usize::MAX);
    for slot in 0..job.depth {
        for b in q.slot_mut(slot)?.iter_mut() {
            *b = (rng.next() >> 56) as u8 | 1;
        }
    }
    let mut res = WorkerResult {
        reads: 0,
        writes: 0,
        flushes: 0,
        bytes: 0,
        lat: Hist::new(),
        read_lat: Hist::new(),
        write_lat: Hist::new(),
        flush_lat: Hist::new(),
        errors: 0,
        first_error: None,
        finished: job.end,
    };
    let blocks = job.region_len / job.bs;
    let region_end = job.region_start + job.region_len;
    let mut free: Vec<usize> = (0..job.depth).rev().collect();
    let mut started = vec![Instant::now(); job.depth];
    let mut done = Vec::with_capacity(job.depth + 1);
    let mut in_flight = 0usize;
    let mut next_seq = job.region_start;
    let mut writes_since_flush = 0u64;
    let mut flush_pending = false;
    let mut flush_started: Option<Instant> = None;
    let mut exhausted = false;
    let mut last_counted = job.measure_start;
    // With --final-flush: the completion time of the final FLUSH, once it is done.
    let mut final_flush_done: Option<Instant> = None;

    loop {
        let now = Instant::now();
        let stopping = now >= job.end || exhausted || stop.load(Ordering::Relaxed);
        if !stopping && !flush_pending {
            while let Some(slot) = free.pop() {
                let is_read = match job.rw {
                    Rw::Read | Rw::Randread => true,
                    Rw::Write | Rw::Randwrite => false,
                    Rw::Randrw => rng.below(100) < u64::from(job.mix),
                };
                let offset = if job.rw.sequential() {
                    if next_seq + job.bs > region_end {
                        if job.wrap {
                            next_seq = job.region_start;
                        } else {
                            exhausted = true;
                            free.push(slot);
                            break;
                        }
                    }
                    let o = next_seq;
                    next_seq += job.stride;
                    o
                } else {
                    job.region_start + rng.below(blocks) * job.bs
                };
                let op = if is_read {
                    Op::Read {
                        slot,
                        offset,
                        len: bs,
                    }
                } else {
                    Op::Write {
                        slot,
                        offset,
                        len: bs,
                        fua: false,
                    }
                };
                if let Some(s) = started.get_mut(slot) {
                    *s = Instant::now();
                }
                q.submit(op, slot as u64)?;
                in_flight += 1;
                if !is_read {
                    writes_since_flush += 1;
                    if job.flush_every > 0 && writes_since_flush >= job.flush_every {
                        flush_pending = true;
                        break;
                    }
                }
            }
        }
        if flush_pending && flush_started.is_none() && in_flight == 0 {
            flush_started = Some(Instant::now());
            q.submit(Op::Flush, FLUSH_TAG)?;
            in_flight += 1;
        }
        if in_flight == 0 {
            if stopping {
                if job.final_flush && final_flush_done.is_none() {
                    flush_started = Some(Instant::now());
                    q.submit(Op::Flush, FLUSH_TAG)?;
                    q.wait(1, &mut done)?;
                    let now = Instant::now();
                    for c in done.drain(..) {
                        if let Err(status) = c.result {
                            res.errors += 1;
                            res.first_error.get_or_insert_with(|| {
                                format!("final flush failed: status {status}")
                            });
                        }
                    }
                    if let Some(t) = flush_started.take() {
                        res.flush_lat.record(now - t);
                        res.flushes += 1;
                    }
                    final_flush_done = Some(now);
                }
                break;
            }
            continue;
        }
        q.wait(1, &mut done)?;
        let now = Instant::now();
        let counting = now >= job.measure_start && (job.final_flush || now <= job.end);
        for c in done.drain(..) {
            in_flight -= 1;
            if let Err(status) = c.result {
                res.errors += 1;
                if res.first_error.is_none() {
                    res.first_error = Some(
                        c.into_result()
                            .err()
                            .map_or_else(|| status.to_string(), |e| e.to_string()),
                    );
                }
                // A benchmark with failing I/O is meaningless: stop submitting.
                exhausted = true;
            }
            if c.tag == FLUSH_TAG {
                if let (Some(t), true) = (flush_started.take(), counting) {
                    res.flush_lat.record(now - t);
                    res.flushes += 1;
                }
                flush_pending = false;
                writes_since_flush = 0;
                continue;
            }
            let slot = usize::try_from(c.tag).unwrap_or(usize::MAX);
            if counting && c.result.is_ok() {
                last_counted = now;
                let lat = now - started.get(slot).copied().unwrap_or(now);
                res.lat.record(lat);
                res.bytes += job.bs;
                match c.op {
                    Op::Read { .. } => {
                        res.reads += 1;
                        res.read_lat.record(lat);
                    }
                    _ => {
                        res.writes += 1;
                        res.write_lat.record(lat);
                    }
                }
            }
            if slot < job.depth {
                free.push(slot);
            }
        }
    }
    res.finished = match final_flush_done {
        Some(t) => t,
        None if exhausted => last_counted,
        None => job.end,
    };
    Ok(res)
}

/// CPU time (user + system) of a process in seconds, from `/proc/PID/stat`.
fn proc_cpu_secs(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces and parentheses: fields start after the last ')'.
    let rest = stat.get(stat.rfind(')')? + 1..)?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Field 14 (utime) and 15 (stime) of proc(5); `rest` starts at field 3.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    // SAFETY: sysconf only reads a configuration value; no memory is passed.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = if hz > 0 { hz as f64 } else { 100.0 };
    Some((utime + stime) as f64 / hz)
}

/// A `kB` line of `/proc/PID/status` (e.g. `VmHWM`), in KiB.
fn proc_status_kib(pid: &str, key: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| {
        let v = l.strip_prefix(key)?.strip_prefix(':')?;
        v.split_whitespace().next()?.parse().ok()
    })
}

/// Minimal JSON object builder (numbers, strings, booleans).
struct Json(String);

impl Json {
    fn new() -> Self {
        Json(String::from("{"))
    }

    fn key(&mut self, k: &str) {
        if self.0.len() > 1 {
            self.0.push(',');
        }
        let _ = write!(self.0, "\"{k}\":");
    }

    fn num(&mut self, k: &str, v: f64) -> &mut Self {
        self.key(k);
        if v.is_finite() {
            let _ = write!(self.0, "{}", (v * 1000.0).round() / 1000.0);
        } else {
            self.0.push_str("null");
        }
        self
    }

    fn int(&mut self, k: &str, v: u64) -> &mut Self {
        self.key(k);
        let _ = write!(self.0, "{v}");
        self
    }

    fn opt(&mut self, k: &str, v: Option<f64>) -> &mut Self {
        match v {
            Some(v) => self.num(k, v),
            None => {
                self.key(k);
                self.0.push_str("null");
                self
            }
        }
    }

    fn str(&mut self, k: &str, v: &str) -> &mut Self {
        self.key(k);
        self.0.push('"');
        for c in v.chars() {
            match c {
                '"' => self.0.push_str("\\\""),
                '\\' => self.0.push_str("\\\\"),
                c if (c as u32) < 0x20 => {
                    let _ = write!(self.0, "\\u{:04x}", c as u32);
                }
                c => self.0.push(c),
            }
        }
        self.0.push('"');
        self
    }

    fn bool(&mut self, k: &str, v: bool) -> &mut Self {
        self.key(k);
        self.0.push_str(if v { "true" } else { "false" });
        self
    }

    /// A JSON object of `name: number` pairs.
    fn map(&mut self, k: &str, pairs: &[(String, f64)]) -> &mut Self {
        self.key(k);
        self.0.push('{');
        for (i, (name, v)) in pairs.iter().enumerate() {
            if i > 0 {
                self.0.push(',');
            }
            let v = if v.is_finite() { *v } else { 0.0 };
            let _ = write!(self.0, "\"{name}\":{}", (v * 1000.0).round() / 1000.0);
        }
        self.0.push('}');
        self
    }

    fn finish(&mut self) -> String {
        self.0.push('}');
        std::mem::take(&mut self.0)
    }
}

/// Resolves `--offset-range` and `--size` against the disk capacity into `(start, len)`.
fn io_region(args: &Args, capacity: u64) -> Result<(u64, u64), String> {
    let (mut start, mut end) = (0, capacity);
    if let Some(r) = &args.offset_range {
        let (s, e) = r.split_once(':').unwrap_or((r.as_str(), ""));
        start = if s.is_empty() { 0 } else { parse_size(s)? };
        end = if e.is_empty() {
            capacity
        } else {
            parse_size(e)?
        };
    }
    if let Some(size) = args.size {
        end = end.min(start.saturating_add(size));
    }
    if end > capacity || start >= end {
        return Err(format!(
            "I/O region {start}..{end} is empty or outside the {capacity}-byte disk"
        ));
    }
    if !start.is_multiple_of(512) {
        return Err(format!("region start {start} is not a multiple of 512"));
    }
    let len = end - start;
    if len < args.bs {
        return Err(format!("I/O region of {len} bytes is smaller than --bs"));
    }
    Ok((start, len))
}

fn bench(args: &Args) -> Result<bool, String> {
    let socket = args
        .socket
        .as_ref()
        .ok_or("--socket is required (or --ceiling-dir for the ceiling measurements)")?;
    if !(1..=255).contains(&args.iodepth) {
        return Err("--iodepth must be in 1..=255".into());
    }
    if args.bs == 0 || !args.bs.is_multiple_of(512) {
        return Err("--bs must be a positive multiple of 512".into());
    }
    let runtime_ok = args.runtime > 0.0 && args.runtime.is_finite();
    let ramp_ok = args.ramp >= 0.0 && args.ramp.is_finite();
    if !runtime_ok || !ramp_ok {
        return Err("--runtime must be > 0 and --ramp >= 0".into());
    }
    let stride = args.stride.unwrap_or(args.bs);
    if stride == 0 || !stride.is_multiple_of(512) {
        return Err("--stride must be a positive multiple of 512".into());
    }
    let slot_size = usize::try_from(args.bs.div_ceil(4096) * 4096).map_err(|e| e.to_string())?;
    let mut cfg = ClientConfig::new(args.queues);
    cfg.slots_per_queue = args.iodepth;
    cfg.slot_size = slot_size;
    let client = Client::connect_retry(
        socket,
        &cfg,
        Duration::from_secs_f64(args.connect_timeout.max(0.0)),
    )
    .map_err(|e| e.to_string())?;
    let capacity = client.capacity();
    let (region_start, region_len) = io_region(args, capacity)?;

    let pid = args.daemon_pid.map(|p| p.to_string());
    let t0 = Instant::now();
    let measure_start = t0 + Duration::from_secs_f64(args.ramp);
    let end = measure_start + Duration::from_secs_f64(args.runtime);
    // Sequential workers each own a contiguous, bs-aligned part of the region.
    let part = if args.rw.sequential() {
        (region_len / args.queues as u64) / args.bs * args.bs
    } else {
        region_len
    };
    if part < args.bs {
        return Err("I/O region too small for one request per queue".into());
    }
    let stop = AtomicBool::new(false);
    let (tx, rx) = mpsc::channel::<()>();

    let mut cpu_before = None;
    let mut self_cpu_before = None;
    let results: Vec<Result<WorkerResult, String>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..args.queues)
            .map(|i| {
                let job = Job {
                    rw: args.rw,
                    mix: args.mix,
                    bs: args.bs,
                    depth: args.iodepth,
                    flush_every: args.flush_every,
                    region_start: if args.rw.sequential() {
                        region_start + i as u64 * part
                    } else {
                        region_start
                    },
                    region_len: part,
                    stride,
                    wrap: !args.no_wrap,
                    final_flush: args.final_flush,
                    seed: args.seed.wrapping_add(i as u64 * 0x1000_0001),
                    measure_start,
                    end,
                };
                let client = &client;
                let stop = &stop;
                let tx = tx.clone();
                s.spawn(move || {
                    let r = client
                        .queue(i)
                        .map_err(|e| e.to_string())
                        .and_then(|mut q| {
                            run_worker(&mut q, job, stop).map_err(|e| format!("queue {i}: {e}"))
                        });
                    if r.is_err() {
                        stop.store(true, Ordering::Relaxed);
                    }
                    let _ = tx.send(());
                    r
                })
            })
            .collect();
        drop(tx);
        // Sample the daemon at the window edges; the window closes early if every worker stops.
        let sleep_until = |t: Instant| {
            let now = Instant::now();
            if t > now {
                std::thread::sleep(t - now);
            }
        };
        sleep_until(measure_start);
        cpu_before = pid.as_deref().and_then(proc_cpu_secs);
        self_cpu_before = proc_cpu_secs("self");
        let mut finished = 0;
        while finished < args.queues {
            // With --final-flush the window lasts until every worker's FLUSH has completed.
            let left = if args.final_flush {
                Duration::from_secs(3600)
            } else {
                end.saturating_duration_since(Instant::now())
            };
            match rx.recv_timeout(left) {
                Ok(()) => finished += 1,
                Err(_) => break,
            }
        }
        let cpu_after = pid.as_deref().and_then(proc_cpu_secs);
        let self_after = proc_cpu_secs("self");
        let out = handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err("worker panicked".into())))
            .collect();
        cpu_before = cpu_before.zip(cpu_after).map(|(a, b)| b - a);
        self_cpu_before = self_cpu_before.zip(self_after).map(|(a, b)| b - a);
        out
    });
    let daemon_cpu = cpu_before;
    let client_cpu = self_cpu_before;

    let mut lat = Hist::new();
    let mut read_lat = Hist::new();
    let mut write_lat = Hist::new();
    let mut flush_lat = Hist::new();
    let (mut reads, mut writes, mut flushes, mut bytes, mut errors) = (0, 0, 0, 0, 0);
    let mut first_error = None;
    let mut last_finish = measure_start;
    for r in results {
        let r = r?;
        lat.merge(&r.lat);
        read_lat.merge(&r.read_lat);
        write_lat.merge(&r.write_lat);
        flush_lat.merge(&r.flush_lat);
        reads += r.reads;
        writes += r.writes;
        flushes += r.flushes;
        bytes += r.bytes;
        errors += r.errors;
        if first_error.is_none() {
            first_error = r.first_error;
        }
        last_finish = last_finish.max(r.finished);
    }
    // Workers that ran out of region end the window at their last counted completion.
    let elapsed = last_finish
        .saturating_duration_since(measure_start)
        .as_secs_f64()
        .max(1e-9);
    let ios = reads + writes;
    let iops = ios as f64 / elapsed;
    let mbps = bytes as f64 / elapsed / 1e6;
    let per_io = |cpu: Option<f64>| cpu.filter(|_| ios > 0).map(|c| c * 1e6 / ios as f64);
    let hwm = pid.as_deref().and_then(|p| proc_status_kib(p, "VmHWM"));
    let rss = pid.as_deref().and_then(|p| proc_status_kib(p, "VmRSS"));
    let info = client.info().clone();
    drop(client);

    if args.json {
        let mut j = Json::new();
        j.str("label", &args.label)
            .str("rw", args.rw.name())
            .int("bs", args.bs)
            .int("iodepth", args.iodepth as u64)
            .int("queues", args.queues as u64)
            .int("mix_read_pct", u64::from(args.mix))
            .int("flush_every", args.flush_every)
            .int("region_start", region_start)
            .int("region_len", region_len)
            .int("stride", stride)
            .bool("wrap", !args.no_wrap)
            .bool("final_flush", args.final_flush)
            .int("capacity", capacity)
            .bool("device_writeback", info.flush_needed)
            .num("ramp_s", args.ramp)
            .num("elapsed_s", elapsed)
            .int("ios", ios)
            .int("reads", reads)
            .int("writes", writes)
            .int("flushes", flushes)
            .int("bytes", bytes)
            .num("iops", iops)
            .num("mb_per_s", mbps)
            .num("lat_mean_us", lat.mean_us())
            .num("lat_p50_us", lat.percentile_us(50.0))
            .num("lat_p99_us", lat.percentile_us(99.0))
            .num("lat_max_us", lat.max_ns as f64 / 1000.0)
            .map("lat_pct_us", &lat.curve())
            .num("read_lat_mean_us", read_lat.mean_us())
            .num("read_lat_p99_us", read_lat.percentile_us(99.0))
            .num("write_lat_mean_us", write_lat.mean_us())
            .num("write_lat_p99_us", write_lat.percentile_us(99.0))
            .num("flush_lat_mean_us", flush_lat.mean_us())
            .num("flush_lat_p99_us", flush_lat.percentile_us(99.0))
            .opt("daemon_cpu_s", daemon_cpu)
            .opt("daemon_cpu_us_per_io", per_io(daemon_cpu))
            .opt("daemon_cpu_util", daemon_cpu.map(|c| c / elapsed))
            .opt("daemon_vmhwm_kib", hwm.map(|v| v as f64))
            .opt("daemon_vmrss_kib", rss.map(|v| v as f64))
            .opt("client_cpu_us_per_io", per_io(client_cpu))
            .int("errors", errors)
            .str("first_error", first_error.as_deref().unwrap_or(""));
        println!("{}", j.finish());
    } else {
        println!(
            "{} {} bs={} iodepth={} queues={}{}: {:.0} IOPS, {:.1} MB/s, lat mean {:.1} us \
             p50 {:.1} us p99 {:.1} us max {:.1} us ({} I/Os in {:.2} s)",
            args.label,
            args.rw.name(),
            args.bs,
            args.iodepth,
            args.queues,
            if args.flush_every > 0 {
                format!(" flush-every={}", args.flush_every)
            } else {
                String::new()
            },
            iops,
            mbps,
            lat.mean_us(),
            lat.percentile_us(50.0),
            lat.percentile_us(99.0),
            lat.max_ns as f64 / 1000.0,
            ios,
            elapsed
        );
        if flushes > 0 {
            println!(
                "  flushes: {flushes}, latency mean {:.1} us p99 {:.1} us",
                flush_lat.mean_us(),
                flush_lat.percentile_us(99.0)
            );
        }
        if let Some(c) = daemon_cpu {
            println!(
                "  daemon: {:.2} s CPU ({:.0} % of one core), {:.2} us CPU per I/O, \
                 peak RSS {} KiB",
                c,
                100.0 * c / elapsed,
                per_io(Some(c)).unwrap_or(0.0),
                hwm.map_or_else(|| "?".into(), |v| v.to_string())
            );
        }
        if let Some(c) = per_io(client_cpu) {
            println!("  client: {c:.2} us CPU per I/O");
        }
        if let Some(e) = &first_error {
            println!("  {errors} failed I/O(s), first: {e}");
        }
    }
    Ok(errors == 0)
}

/// Memory copy bandwidth (GB/s) over buffers larger than the last-level cache.
fn memcpy_bandwidth(secs: f64) -> f64 {
    const LEN: usize = 64 << 20;
    let src = vec![0x5au8; LEN];
    let mut dst = vec![0u8; LEN];
    dst.copy_from_slice(&src); // fault both buffers in before timing
    let t = Instant::now();
    let mut copied = 0u64;
    while t.elapsed().as_secs_f64() < secs {
        dst.copy_from_slice(std::hint::black_box(&src));
        std::hint::black_box(&mut dst);
        copied += LEN as u64;
    }
    copied as f64 / t.elapsed().as_secs_f64() / 1e9
}

/// Latency of 4 KiB `pwrite` + `fdatasync` at random offsets of a 16 MiB scratch file in `dir`.
fn fdatasync_latency(dir: &Path, secs: f64) -> Result<Hist, String> {
    const FILE_LEN: u64 = 16 << 20;
    let tmp = tempfile::Builder::new()
        .prefix("snapblk-bench-sync")
        .tempfile_in(dir)
        .map_err(|e| format!("creating scratch file in {}: {e}", dir.display()))?;
    let f: &File = tmp.as_file();
    let chunk = vec![0xa5u8; 1 << 20];
    for i in 0..FILE_LEN / (1 << 20) {
        f.write_all_at(&chunk, i << 20).map_err(|e| e.to_string())?;
    }
    f.sync_all().map_err(|e| e.to_string())?;
    let f = OpenOptions::new()
        .write(true)
        .open(tmp.path())
        .map_err(|e| e.to_string())?;
    let mut rng = Rng::new(7);
    let block = vec![0x3cu8; 4096];
    let mut h = Hist::new();
    let t = Instant::now();
    while t.elapsed().as_secs_f64() < secs || h.count < 10 {
        let off = rng.below(FILE_LEN / 4096) * 4096;
        let s = Instant::now();
        f.write_all_at(&block, off).map_err(|e| e.to_string())?;
        f.sync_data().map_err(|e| e.to_string())?;
        h.record(s.elapsed());
    }
    Ok(h)
}

fn ceiling(args: &Args, dir: &Path) -> Result<bool, String> {
    let secs = args.runtime.clamp(0.5, 5.0);
    let gbps = memcpy_bandwidth(secs.min(2.0));
    let h = fdatasync_latency(dir, secs)?;
    if args.json {
        let mut j = Json::new();
        j.str("label", &args.label)
            .num("memcpy_gb_per_s", gbps)
            .int("fdatasync_samples", h.count)
            .num("fdatasync_mean_us", h.mean_us())
            .num("fdatasync_p50_us", h.percentile_us(50.0))
            .num("fdatasync_p99_us", h.percentile_us(99.0))
            .num("fdatasync_max_us", h.max_ns as f64 / 1000.0);
        println!("{}", j.finish());
    } else {
        println!("memory copy: {gbps:.2} GB/s (64 MiB buffers)");
        println!(
            "4 KiB pwrite + fdatasync in {}: mean {:.1} us, p50 {:.1} us, p99 {:.1} us \
             ({} samples)",
            dir.display(),
            h.mean_us(),
            h.percentile_us(50.0),
            h.percentile_us(99.0),
            h.count
        );
    }
    let _ = std::io::stdout().flush();
    Ok(true)
}

/// Compares the device with the raw file `reference` (see `--verify-file`).
fn verify(args: &Args, reference: &Path) -> Result<bool, String> {
    const BLOCK: u64 = 4096;
    let socket = args.socket.as_ref().ok_or("--verify-file needs --socket")?;
    let file =
        File::open(reference).map_err(|e| format!("opening {}: {e}", reference.display()))?;
    let ref_len = file.metadata().map_err(|e| e.to_string())?.len();
    let client = Client::connect_retry(
        socket,
        &ClientConfig::new(1),
        Duration::from_secs_f64(args.connect_timeout.max(0.0)),
    )
    .map_err(|e| e.to_string())?;
    let capacity = client.capacity();
    let mut problem = None;
    let mut checked = 0u64;
    if capacity != ref_len {
        problem = Some(format!(
            "device capacity {capacity} differs from the reference's {ref_len} bytes \
             (image format not understood?)"
        ));
    } else if capacity >= BLOCK {
        let blocks = capacity / BLOCK;
        let mut rng = Rng::new(args.seed);
        let picks = [0, blocks - 1]
            .into_iter()
            .chain((0..args.verify_blocks).map(|_| rng.below(blocks)));
        let mut want = vec![0u8; BLOCK as usize];
        let mut got = vec![0u8; BLOCK as usize];
        for b in picks {
            let off = b * BLOCK;
            file.read_exact_at(&mut want, off)
                .map_err(|e| format!("reading the reference at {off}: {e}"))?;
            client.read(0, off, &mut got).map_err(|e| e.to_string())?;
            checked += 1;
            if want != got {
                let at = want.iter().zip(&got).position(|(a, b)| a != b).unwrap_or(0);
                problem = Some(format!(
                    "block at offset {off} differs from the reference (first at byte {at}: \
                     device {:#04x}, reference {:#04x})",
                    got.get(at).copied().unwrap_or(0),
                    want.get(at).copied().unwrap_or(0)
                ));
                break;
            }
        }
    }
    if args.json {
        let mut j = Json::new();
        j.str("label", &args.label)
            .int("capacity", capacity)
            .int("reference_len", ref_len)
            .int("blocks_checked", checked)
            .bool("ok", problem.is_none())
            .str("problem", problem.as_deref().unwrap_or(""));
        println!("{}", j.finish());
    } else {
        match &problem {
            None => println!("verified: {checked} blocks match {}", reference.display()),
            Some(p) => println!("MISMATCH: {p}"),
        }
    }
    Ok(problem.is_none())
}

fn main() -> ExitCode {
    let args = Args::parse();
    let outcome = match (&args.ceiling_dir, &args.verify_file) {
        (Some(dir), _) => ceiling(&args, dir),
        (None, Some(reference)) => verify(&args, reference),
        (None, None) => bench(&args),
    };
    match outcome {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("snapblk-bench: {e}");
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_suffixes_are_binary_multiples() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("4k"), Ok(4096));
        assert_eq!(parse_size("128KiB"), Ok(128 << 10));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert!(parse_size("4q").is_err());
        assert!(parse_size("k").is_err());
        assert!(parse_size("99999999999999t").is_err());
    }

    #[test]
    fn histogram_bucket_midpoint_is_within_four_percent() {
        for v in [
            0u64,
            1,
            63,
            64,
            65,
            100,
            1000,
            4567,
            1_000_000,
            123_456_789_012,
        ] {
            let mid = Hist::value(Hist::index(v));
            let err = (mid as f64 - v as f64).abs() / (v.max(1) as f64);
            assert!(err < 0.04, "value {v} -> bucket midpoint {mid}");
        }
        // Bucket indices increase with the value (percentiles walk them in order).
        let mut last = 0;
        for v in (0..100_000u64).step_by(7) {
            let i = Hist::index(v);
            assert!(i >= last);
            last = i;
        }
    }

    #[test]
    fn percentiles_follow_the_recorded_distribution() {
        let mut h = Hist::new();
        for us in 1..=100u64 {
            h.record(Duration::from_micros(us));
        }
        let p50 = h.percentile_us(50.0);
        let p99 = h.percentile_us(99.0);
        assert!((48.0..=52.0).contains(&p50), "p50 {p50}");
        assert!((96.0..=100.0).contains(&p99), "p99 {p99}");
        assert!((h.mean_us() - 50.5).abs() < 0.01);
    }

    #[test]
    fn random_offsets_stay_inside_the_region() {
        let mut r = Rng::new(3);
        for n in [1u64, 2, 7, 1 << 20] {
            for _ in 0..1000 {
                assert!(r.below(n) < n);
            }
        }
    }

    #[test]
    fn proc_parsing_reads_own_process() {
        assert!(proc_cpu_secs("self").is_some());
        assert!(proc_status_kib("self", "VmHWM").is_some_and(|k| k > 0));
    }
}
