//! An fsx-style randomized model checker for any [`BlockDev`] stack (the cache over a file, the
//! full cache -> qcow2 overlay -> file stack, ...).
//!
//! The first `span` bytes of the device are cut into one private region per thread plus one
//! shared region. Region boundaries are deliberately not folio-aligned, so neighbouring threads
//! write different bytes of the same folios at the same time. Every operation locks the
//! region(s) it touches, performs the request on the device and updates an in-memory shadow, so
//! each read is compared byte for byte against the exact expected content, whichever thread
//! wrote it. Operations: reads, writes (sub-folio, cross-folio, unaligned unless `align` says
//! otherwise), flushes (unlocked, concurrent with everything), discards and write-zeroes, plus
//! occasional operations spanning two neighbouring regions.
//!
//! Each round opens the stack, runs for `duration / rounds`, flushes, checks every byte through
//! the stack, drops the stack, reopens the lower layer cold and checks every byte again.
//!
//! Locking model: one mutex per region shadow; an operation spanning two regions takes both in
//! ascending order. Flushes take no lock.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use blockdev::{BlockDev, BlockError};

/// Opens a device (the stack under test, or the cold lower layer).
pub type OpenFn<'a> = dyn Fn() -> Result<Arc<dyn BlockDev>, BlockError> + Sync + 'a;

/// What to run.
#[derive(Debug, Clone)]
pub struct FsxConfig {
    /// Worker threads (each with a private region; plus one shared region).
    pub threads: usize,
    /// Total running time over all rounds.
    pub duration: Duration,
    /// Open/run/verify/close cycles.
    pub rounds: usize,
    /// Seed of all random choices (each thread derives its own stream).
    pub seed: u64,
    /// Bytes used from offset 0; `None`: the whole device, at most 32 MiB.
    pub span: Option<u64>,
    /// Offset and length granularity of every request (1: byte-granular; 512: sectors).
    pub align: u64,
    /// Largest request length.
    pub max_len: usize,
    /// Whether to issue discards and write-zeroes.
    pub zaps: bool,
    /// Percentage of operations that go to the shared region.
    pub shared_percent: u32,
}

impl Default for FsxConfig {
    fn default() -> Self {
        FsxConfig {
            threads: 4,
            duration: Duration::from_secs(5),
            rounds: 2,
            seed: 1,
            span: None,
            align: 1,
            max_len: 256 << 10,
            zaps: true,
            shared_percent: 20,
        }
    }
}

impl FsxConfig {
    /// The default configuration, overridden by `SNAPBLK_FSX_SECS` (duration in seconds),
    /// `SNAPBLK_FSX_SEED` (default: from the clock) and `SNAPBLK_FSX_THREADS`.
    pub fn from_env() -> Self {
        let mut cfg = FsxConfig::default();
        let (duration, seed, threads) = run_knobs("FSX");
        cfg.duration = duration.unwrap_or(cfg.duration);
        cfg.seed = seed;
        cfg.threads = threads.unwrap_or(cfg.threads);
        cfg
    }

    /// The soak configuration of `make soak`: [`FsxConfig::from_env`] with 6 rounds and, unless
    /// `SNAPBLK_FSX_SECS` says otherwise, 120 s.
    pub fn soak() -> Self {
        let mut cfg = FsxConfig::from_env();
        if std::env::var("SNAPBLK_FSX_SECS").is_err() {
            cfg.duration = Duration::from_secs(120);
        }
        cfg.rounds = 6;
        cfg
    }
}

/// What a successful run did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FsxReport {
    /// The seed (rerun with `SNAPBLK_FSX_SEED` to replay the same choices).
    pub seed: u64,
    /// Operations per kind.
    pub reads: u64,
    pub writes: u64,
    pub flushes: u64,
    pub discards: u64,
    pub zeroes: u64,
    /// Bytes compared against the shadow (reads plus the end-of-round checks).
    pub bytes_verified: u64,
}

/// Why a run failed.
#[derive(Debug, thiserror::Error)]
pub enum FsxError {
    /// The configuration does not fit the device.
    #[error("bad fsx configuration: {0}")]
    Config(String),
    /// Opening the stack or the cold lower layer failed.
    #[error("opening the device failed (seed {seed}): {error}")]
    Open { seed: u64, error: BlockError },
    /// A request failed.
    #[error("{op} failed on thread {thread} (seed {seed}): {error}")]
    Op {
        seed: u64,
        thread: usize,
        op: String,
        error: BlockError,
    },
    /// A byte differs from the shadow.
    #[error("{phase}: byte at {offset:#x} is {found:#04x}, expected {expected:#04x} (seed {seed}); recent ops on that region, oldest first: {recent:?}")]
    Mismatch {
        seed: u64,
        phase: String,
        offset: u64,
        expected: u8,
        found: u8,
        recent: Vec<String>,
    },
}

/// The environment variable `name` as a number, if set and numeric.
fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
}

/// A randomized test's run knobs from `SNAPBLK_{name}_SECS`, `SNAPBLK_{name}_SEED` (default: from
/// the clock) and `SNAPBLK_{name}_THREADS` (clamped to 1..=64): (duration, seed, threads).
pub(crate) fn run_knobs(name: &str) -> (Option<Duration>, u64, Option<usize>) {
    (
        env_u64(&format!("SNAPBLK_{name}_SECS")).map(Duration::from_secs),
        seed_from_env(&format!("SNAPBLK_{name}_SEED")),
        env_u64(&format!("SNAPBLK_{name}_THREADS"))
            .map(|t| usize::try_from(t).unwrap_or(64).clamp(1, 64)),
    )
}

/// The seed in the environment variable `name`, or one from the clock.
fn seed_from_env(name: &str) -> u64 {
    env_u64(name).unwrap_or_else(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
    })
}

/// SplitMix64: small, fast, good enough for choosing operations.
pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform-ish in `0..n` (`n > 0`).
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

const RECENT_OPS: usize = 24;

struct RegionState {
    data: Vec<u8>,
    recent: VecDeque<String>,
}

struct Region {
    start: u64,
    end: u64,
    state: Mutex<RegionState>,
}

#[derive(Default)]
struct Totals {
    reads: AtomicU64,
    writes: AtomicU64,
    flushes: AtomicU64,
    discards: AtomicU64,
    zeroes: AtomicU64,
    verified: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Index of the first differing byte (a fast equality check first: this runs on every read).
fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    if a == b {
        return None;
    }
    a.iter()
        .zip(b)
        .position(|(x, y)| x != y)
        .or(Some(a.len().min(b.len())))
}

fn align_down(v: u64, align: u64) -> u64 {
    v - v % align
}

/// Runs the model checker. `open` opens the stack under test (called once per round, on the
/// same lower storage); `open_cold` opens the bare lower layer for the end-of-round check.
pub fn run(
    open: &OpenFn<'_>,
    open_cold: &OpenFn<'_>,
    cfg: &FsxConfig,
) -> Result<FsxReport, FsxError> {
    let seed = cfg.seed;
    let align = cfg.align.max(1);
    let threads = cfg.threads.max(1);
    let rounds = cfg.rounds.max(1);
    let dev = open().map_err(|error| FsxError::Open { seed, error })?;
    let span = align_down(cfg.span.unwrap_or(32 << 20).min(dev.size()), align);
    let nregions = threads as u64 + 1;
    if span < nregions * 4 * align.max(4096) {
        return Err(FsxError::Config(format!(
            "span {span} too small for {threads} threads"
        )));
    }
    // Region boundaries, skewed off any power-of-two folio boundary.
    let skew = if align == 1 { 3 * 512 + 7 } else { 3 * 512 };
    let mut bounds = vec![0u64];
    for k in 1..nregions {
        bounds.push(align_down(span * k / nregions + skew, align));
    }
    bounds.push(span);

    // Initial shadow: whatever the device holds now.
    let mut regions = Vec::new();
    for w in bounds.windows(2) {
        let (start, end) = (w[0], w[1]);
        let mut data = vec![0u8; (end - start) as usize];
        read_chunked(&*dev, &mut data, start).map_err(|error| FsxError::Op {
            seed,
            thread: 0,
            op: "initial read".into(),
            error,
        })?;
        regions.push(Region {
            start,
            end,
            state: Mutex::new(RegionState {
                data,
                recent: VecDeque::new(),
            }),
        });
    }
    let totals = Totals::default();
    let per_round = cfg.duration / rounds as u32;
    let mut dev = Some(dev);
    for round in 0..rounds {
        let dev_now = match dev.take() {
            Some(d) => d,
            None => open().map_err(|error| FsxError::Open { seed, error })?,
        };
        let failed = AtomicBool::new(false);
        let deadline = Instant::now() + per_round;
        let results: Vec<Result<(), FsxError>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..threads)
                .map(|t| {
                    let ctx = Worker {
                        dev: &*dev_now,
                        regions: &regions,
                        totals: &totals,
                        failed: &failed,
                        cfg,
                        align,
                        thread: t,
                        rng: Rng(seed
                            ^ ((round as u64 + 1) << 48)
                            ^ (t as u64).wrapping_mul(0xa076_1d64_78bd_642f)),
                    };
                    s.spawn(move || ctx.run(deadline))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join().unwrap_or_else(|_| {
                        Err(FsxError::Config("an fsx worker thread panicked".into()))
                    })
                })
                .collect()
        });
        for r in results {
            r?;
        }
        dev_now.flush().map_err(|error| FsxError::Op {
            seed,
            thread: 0,
            op: "final flush".into(),
            error,
        })?;
        verify_all(
            &*dev_now,
            &regions,
            seed,
            &format!("round {round}: read through the stack"),
            &totals,
        )?;
        drop(dev_now);
        let cold = open_cold().map_err(|error| FsxError::Open { seed, error })?;
        verify_all(
            &*cold,
            &regions,
            seed,
            &format!("round {round}: cold reopen of the lower layer"),
            &totals,
        )?;
    }
    Ok(FsxReport {
        seed,
        reads: totals.reads.load(Ordering::Relaxed),
        writes: totals.writes.load(Ordering::Relaxed),
        flushes: totals.flushes.load(Ordering::Relaxed),
        discards: totals.discards.load(Ordering::Relaxed),
        zeroes: totals.zeroes.load(Ordering::Relaxed),
        bytes_verified: totals.verified.load(Ordering::Relaxed),
    })
}

fn read_chunked(dev: &dyn BlockDev, buf: &mut [u8], offset: u64) -> Result<(), BlockError> {
    const CHUNK: usize = 1 << 20;
    for (i, chunk) in buf.chunks_mut(CHUNK).enumerate() {
        dev.read_at(chunk, offset + (i * CHUNK) as u64)?;
    }
    Ok(())
}

fn verify_all(
    dev: &dyn BlockDev,
    regions: &[Region],
    seed: u64,
    phase: &str,
    totals: &Totals,
) -> Result<(), FsxError> {
    for r in regions {
        let st = lock(&r.state);
        let mut found = vec![0u8; st.data.len()];
        read_chunked(dev, &mut found, r.start).map_err(|error| FsxError::Op {
            seed,
            thread: 0,
            op: format!("{phase}: read"),
            error,
        })?;
        if let Some(i) = first_difference(&st.data, &found) {
            return Err(FsxError::Mismatch {
                seed,
                phase: phase.to_string(),
                offset: r.start + i as u64,
                expected: st.data[i],
                found: found[i],
                recent: st.recent.iter().cloned().collect(),
            });
        }
        totals
            .verified
            .fetch_add(found.len() as u64, Ordering::Relaxed);
    }
    Ok(())
}

struct Worker<'a> {
    dev: &'a dyn BlockDev,
    regions: &'a [Region],
    totals: &'a Totals,
    failed: &'a AtomicBool,
    cfg: &'a FsxConfig,
    align: u64,
    thread: usize,
    rng: Rng,
}

#[derive(Debug, Clone, Copy)]
enum Op {
    Read,
    Write,
    Discard,
    Zeroes { unmap: bool },
}

impl Worker<'_> {
    fn run(mut self, deadline: Instant) -> Result<(), FsxError> {
        let mut buf = Vec::new();
        let mut expect = Vec::new();
        while Instant::now() < deadline && !self.failed.load(Ordering::Relaxed) {
            let r = self.step(&mut buf, &mut expect);
            if r.is_err() {
                self.failed.store(true, Ordering::Relaxed);
                return r;
            }
        }
        Ok(())
    }

    fn step(&mut self, buf: &mut Vec<u8>, expect: &mut Vec<u8>) -> Result<(), FsxError> {
        let seed = self.cfg.seed;
        let roll = self.rng.below(100);
        if roll < 3 {
            self.totals.flushes.fetch_add(1, Ordering::Relaxed);
            return self.dev.flush().map_err(|error| FsxError::Op {
                seed,
                thread: self.thread,
                op: "flush".into(),
                error,
            });
        }
        let op = match roll {
            3..=47 => Op::Read,
            48..=89 => Op::Write,
            90..=94 if self.cfg.zaps => Op::Discard,
            95..=99 if self.cfg.zaps => Op::Zeroes {
                unmap: self.rng.below(2) == 0,
            },
            _ => Op::Write,
        };
        // Pick one region (own or shared), or occasionally two neighbours.
        let n = self.regions.len();
        let shared = n - 1;
        let first = if self.rng.below(100) < u64::from(self.cfg.shared_percent) {
            shared
        } else {
            self.thread
        };
        let (r0, r1) = if self.rng.below(100) < 5 {
            let i = self.rng.below(n as u64 - 1) as usize;
            (i, i + 1)
        } else {
            (first, first)
        };
        let (lo, hi) = (self.regions[r0].start, self.regions[r1].end);
        let cross = (r0 != r1).then(|| self.regions[r0].end);
        let (offset, len) = self.pick_range(lo, hi, cross);
        let mut guards: Vec<_> = (r0..=r1).map(|i| lock(&self.regions[i].state)).collect();
        let desc = format!("t{} {:?} {:#x}+{:#x}", self.thread, op, offset, len);
        let len_usize = len as usize;
        let result = match op {
            Op::Read => {
                buf.resize(len_usize, 0);
                self.dev.read_at(&mut buf[..len_usize], offset)
            }
            Op::Write => {
                buf.resize(len_usize, 0);
                self.rng.fill(&mut buf[..len_usize]);
                self.dev.write_at(&buf[..len_usize], offset)
            }
            Op::Discard => self.dev.discard(offset, len),
            Op::Zeroes { unmap } => self.dev.write_zeroes(offset, len, unmap),
        };
        if let Err(error) = result {
            return Err(FsxError::Op {
                seed,
                thread: self.thread,
                op: desc,
                error,
            });
        }
        // Apply to / compare with the shadow, region by region.
        let mut pos = offset;
        let end = offset + len;
        for (k, g) in guards.iter_mut().enumerate() {
            let region = &self.regions[r0 + k];
            let (a, b) = (pos.max(region.start), end.min(region.end));
            if a < b {
                let (ra, rb) = ((a - region.start) as usize, (b - region.start) as usize);
                let (ba, bb) = ((a - offset) as usize, (b - offset) as usize);
                match op {
                    Op::Read => {
                        expect.clear();
                        expect.extend_from_slice(&g.data[ra..rb]);
                        if let Some(i) = first_difference(expect, &buf[ba..bb]) {
                            return Err(FsxError::Mismatch {
                                seed,
                                phase: format!("read by {desc}"),
                                offset: a + i as u64,
                                expected: expect[i],
                                found: buf[ba + i],
                                recent: g.recent.iter().cloned().collect(),
                            });
                        }
                    }
                    Op::Write => g.data[ra..rb].copy_from_slice(&buf[ba..bb]),
                    Op::Discard | Op::Zeroes { .. } => g.data[ra..rb].fill(0),
                }
                pos = b;
            }
            if !matches!(op, Op::Read) {
                if g.recent.len() >= RECENT_OPS {
                    g.recent.pop_front();
                }
                g.recent.push_back(desc.clone());
            }
        }
        let counter = match op {
            Op::Read => {
                self.totals.verified.fetch_add(len, Ordering::Relaxed);
                &self.totals.reads
            }
            Op::Write => &self.totals.writes,
            Op::Discard => &self.totals.discards,
            Op::Zeroes { .. } => &self.totals.zeroes,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// An aligned range inside `[lo, hi)`; when `cross` is given, one that contains the byte
    /// just before and the byte at `cross` (a region boundary).
    fn pick_range(&mut self, lo: u64, hi: u64, cross: Option<u64>) -> (u64, u64) {
        let align = self.align;
        let max_len = (self.cfg.max_len as u64).max(align);
        let want = match self.rng.below(100) {
            0..=39 => 1 + self.rng.below(4096),
            40..=69 => 1 + self.rng.below(64 << 10),
            70..=94 => 1 + self.rng.below(max_len),
            _ => max_len,
        };
        let len = (want.div_ceil(align) * align).clamp(align, align_down(hi - lo, align));
        let offset = match cross {
            Some(b) if len > align => {
                let back = align + align_down(self.rng.below(len - align), align);
                b.saturating_sub(back).max(lo)
            }
            _ => lo + align_down(self.rng.below(hi - lo - len + 1), align),
        };
        (offset, len.min(hi - offset))
    }
}
