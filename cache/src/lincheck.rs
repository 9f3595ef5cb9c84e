//! A concurrent-history linearizability checker for any [`BlockDev`] stack, per 512-byte sector.
//!
//! Several threads issue random reads, writes, discards, write-zeroes, large reads and writes
//! (large enough to bypass a cache) and flushes over the first `span` bytes of the device. Every
//! operation's invocation and completion are stamped from one global clock, and every write
//! writes a value unique to (write, sector) into each sector, so every sector a read returns
//! names the write it came from (or is zeros, or the initial content). After the run each read
//! is checked, per sector, against the register rule:
//!
//! > the value must come from the last write or zap that completed before the read was
//! > invoked, or from one concurrent with the read.
//!
//! Precisely: a read `R` may return the value of mutation `M` (write, discard, write-zeroes, or
//! the initial content) of that sector iff `M` was invoked before `R` completed and no other
//! mutation `M'` of the sector was invoked after `M` completed and completed before `R` was
//! invoked. Misplaced or invented sectors are always violations; a sector mixing, byte by byte,
//! values that are each legal for the read is accepted and counted (`torn_sectors`): a host
//! file's page cache copies bytes, not sectors, atomically, so a read racing a write of the
//! same sector may see part of each - never anything older or foreign.
//!
//! Optionally a *crash probe* takes snapshots of what would survive a power loss at random
//! moments during the run; each snapshot is checked against the crash contract of README.md:
//! every sector holds the value of a mutation invoked before the snapshot that was not
//! overwritten by a mutation that completed before a successful flush was invoked (flushes that
//! completed before the snapshot started).
//!
//! The layer under test is usually wrapped in a [`ChaosDev`] (and a qcow2 image's host file in
//! a similar wrapper), which delays, yields or spins before and after every lower I/O at random
//! (seeded), so that the races in the layer above get wide windows.
//!
//! Reproducing: the seed fixes every thread's operations and every delay choice; the OS still
//! interleaves threads, so rerun a failing seed a few times (`SNAPBLK_LIN_SEED`).
//!
//! Locking model: the history is per thread (no shared lock while running); the clock and the
//! write-id counter are atomics; [`ChaosDev`] takes no lock.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use blockdev::{BlockDev, BlockError, Result as DevResult};

use crate::fsx::Rng;

/// Bytes per checked sector.
pub const SECTOR: u64 = 512;

/// What to run.
#[derive(Debug, Clone)]
pub struct LinConfig {
    /// Worker threads.
    pub threads: usize,
    /// Running time.
    pub duration: Duration,
    /// Seed of every random choice.
    pub seed: u64,
    /// Bytes used from offset 0 (a multiple of 512).
    pub span: u64,
    /// Largest small request, in sectors.
    pub max_sectors: u64,
    /// Length of large requests in bytes (0: none); they are meant to bypass a cache.
    pub large_len: u64,
    /// Half of the large requests start and end on a multiple of this many bytes (0 or 512:
    /// none are aligned beyond the sector), so that they cover whole folios of a cache.
    pub large_align: u64,
    /// Whether to issue discards and write-zeroes.
    pub zaps: bool,
    /// Sectors at the start of the span that half of the small requests go to (contention).
    pub hot_sectors: u64,
}

impl Default for LinConfig {
    fn default() -> Self {
        LinConfig {
            threads: 4,
            duration: Duration::from_secs(2),
            seed: 1,
            span: 1 << 20,
            max_sectors: 24,
            large_len: 0,
            large_align: 0,
            zaps: true,
            hot_sectors: 48,
        }
    }
}

impl LinConfig {
    /// The defaults, with `SNAPBLK_LIN_SECS` (running time), `SNAPBLK_LIN_SEED` (default: from
    /// the clock) and `SNAPBLK_LIN_THREADS` applied.
    pub fn from_env() -> Self {
        let mut cfg = LinConfig::default();
        let (duration, seed, threads) = crate::fsx::run_knobs("LIN");
        cfg.duration = duration.unwrap_or(cfg.duration);
        cfg.seed = seed;
        cfg.threads = threads.unwrap_or(cfg.threads);
        cfg
    }

    /// [`LinConfig::from_env`] with 60 s unless `SNAPBLK_LIN_SECS` says otherwise (`make soak`).
    pub fn soak() -> Self {
        let mut cfg = LinConfig::from_env();
        if std::env::var("SNAPBLK_LIN_SECS").is_err() {
            cfg.duration = Duration::from_secs(60);
        }
        cfg
    }
}

/// What a clean run did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LinReport {
    pub seed: u64,
    pub reads: u64,
    pub writes: u64,
    pub zaps: u64,
    pub flushes: u64,
    /// Sectors checked (reads plus crash snapshots).
    pub sectors_checked: u64,
    /// Crash snapshots checked.
    pub crashes: u64,
    /// Sectors a read returned as a byte-wise mix of values legal for it (a read racing writes
    /// of the sector on a layer that copies bytes, not sectors, atomically: a host file).
    pub torn_sectors: u64,
}

/// Why a run failed.
#[derive(Debug, thiserror::Error)]
pub enum LinError {
    #[error("bad configuration: {0}")]
    Config(String),
    #[error("{op} failed on thread {thread} (seed {seed}): {error}")]
    Op {
        seed: u64,
        thread: usize,
        op: String,
        error: BlockError,
    },
    #[error("{0}")]
    Violation(String),
}

/// The SplitMix64 finalizer.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

// ---- delays ----

/// Seeded random delays for wrappers around lower layers: each call draws one choice from a
/// shared counter hashed with the seed (so the sequence of choices is fixed by the seed).
#[derive(Debug)]
pub struct Delays {
    seed: u64,
    counter: AtomicU64,
    enabled: AtomicBool,
}

impl Delays {
    /// Delays drawn from `seed`.
    pub fn new(seed: u64) -> Self {
        Delays {
            seed,
            counter: AtomicU64::new(0),
            enabled: AtomicBool::new(true),
        }
    }

    /// Turns the delays on or off.
    pub fn set_enabled(&self, on: bool) {
        self.enabled.store(on, Ordering::Relaxed);
    }

    /// Maybe yields, spins or sleeps (up to about half a millisecond).
    pub fn pause(&self) {
        self.pause_weighted(8);
    }

    /// Like [`Delays::pause`], sleeping more often: for the moment right after a lower read
    /// got its bytes, the window in which a racing change makes them stale.
    pub fn pause_long(&self) {
        self.pause_weighted(4);
    }

    /// Out of 16: `none` times nothing, then yields, spins and sleeps.
    fn pause_weighted(&self, none: u64) {
        if !self.enabled.load(Ordering::Relaxed) {
            return;
        }
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let r = mix(self.seed ^ n.wrapping_mul(0x2545_f491_4f6c_dd1d));
        let k = r % 16;
        match k {
            _ if k < none => {}
            _ if k < none + 3 => std::thread::yield_now(),
            _ if k < none + 5 => {
                let until = Instant::now() + Duration::from_micros(r >> 60);
                while Instant::now() < until {
                    std::hint::spin_loop();
                }
            }
            _ => std::thread::sleep(Duration::from_micros(20 + (r >> 32) % 480)),
        }
    }
}

/// A [`BlockDev`] wrapper that pauses at random (see [`Delays`]) before and after every
/// request to the device below, so a layer above it sees its lower I/O take varying time and
/// complete in varying order.
pub struct ChaosDev {
    inner: Arc<dyn BlockDev>,
    delays: Arc<Delays>,
}

impl ChaosDev {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn BlockDev>, delays: Arc<Delays>) -> Arc<Self> {
        Arc::new(ChaosDev { inner, delays })
    }

    fn around<T>(&self, f: impl FnOnce() -> T) -> T {
        self.delays.pause();
        let r = f();
        self.delays.pause();
        r
    }
}

impl BlockDev for ChaosDev {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> DevResult<()> {
        self.delays.pause();
        let r = self.inner.read_at(buf, offset);
        self.delays.pause_long();
        r
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> DevResult<()> {
        self.around(|| self.inner.write_at(buf, offset))
    }
    fn flush(&self) -> DevResult<()> {
        self.around(|| self.inner.flush())
    }
    fn discard(&self, offset: u64, len: u64) -> DevResult<()> {
        self.around(|| self.inner.discard(offset, len))
    }
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> DevResult<()> {
        self.around(|| self.inner.write_zeroes(offset, len, unmap))
    }
    fn is_read_only(&self) -> bool {
        self.inner.is_read_only()
    }
    fn rewrites_in_page_cache(&self, offset: u64, len: u64) -> bool {
        self.inner.rewrites_in_page_cache(offset, len)
    }
    fn persists_in_place(&self, offset: u64, len: u64) -> bool {
        self.inner.persists_in_place(offset, len)
    }
    fn write_in_place_persisted(&self, buf: &[u8], offset: u64) -> DevResult<bool> {
        self.around(|| self.inner.write_in_place_persisted(buf, offset))
    }
}

// ---- values ----

/// The content of sector `lba` written by write `id` (`id >= 1`): a header naming both, and a
/// body derived from them, so torn and misplaced sectors are recognised.
fn fill_sector(id: u64, lba: u64, out: &mut [u8]) {
    out[..8].copy_from_slice(&id.to_le_bytes());
    out[8..16].copy_from_slice(&lba.to_le_bytes());
    let mut r = Rng(id.wrapping_mul(0x1000_0000_01b3) ^ lba);
    for chunk in out[16..].chunks_mut(8) {
        let v = r.next().to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
}

/// What a read found in a sector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Value {
    /// The bytes of write `id`.
    Write(u64),
    /// All zeros.
    Zero,
    /// The content the sector had before the run (not zero).
    Initial,
    /// None of these: torn, mixed, misplaced or invented.
    Garbage,
}

struct Classifier {
    /// The initial content of the span.
    initial: Vec<u8>,
    max_id: u64,
}

impl Classifier {
    fn classify(&self, lba: u64, b: &[u8], scratch: &mut [u8]) -> Value {
        if b.iter().all(|&x| x == 0) {
            return Value::Zero;
        }
        let id = u64::from_le_bytes(b[..8].try_into().unwrap_or_default());
        let at = u64::from_le_bytes(b[8..16].try_into().unwrap_or_default());
        if id >= 1 && id <= self.max_id && at == lba {
            fill_sector(id, lba, scratch);
            if scratch == b {
                return Value::Write(id);
            }
        }
        if self.initial_sector(lba) == Some(b) {
            return Value::Initial;
        }
        Value::Garbage
    }

    fn initial_sector(&self, lba: u64) -> Option<&[u8]> {
        let a = usize::try_from(lba * SECTOR).ok()?;
        self.initial.get(a..a + SECTOR as usize)
    }
}

// ---- history ----

#[derive(Debug, Clone, Copy)]
enum MutKind {
    Write(u64),
    Zap,
}

#[derive(Debug, Clone)]
struct Mutation {
    inv: u64,
    comp: u64,
    start: u64,
    end: u64,
    kind: MutKind,
    thread: usize,
}

#[derive(Debug, Clone)]
struct ReadRec {
    inv: u64,
    comp: u64,
    start: u64,
    values: Vec<Value>,
    /// The bytes of the sectors classified as garbage (index in `values`, bytes).
    torn: Vec<(usize, Box<[u8]>)>,
    thread: usize,
    large: bool,
}

#[derive(Debug, Default)]
struct History {
    muts: Vec<Mutation>,
    reads: Vec<ReadRec>,
    /// (invocation, completion) of successful flushes.
    flushes: Vec<(u64, u64)>,
}

/// A snapshot of what survives a power loss, taken between the two clock values.
struct CrashRec {
    after: u64,
    before: u64,
    values: Vec<Value>,
}

/// Takes crash snapshots during a run: `take` returns a device holding what would survive a
/// power loss at the moment it is called (it must not disturb the running stack).
pub struct CrashProbe<'a> {
    /// How often to take one.
    pub every: Duration,
    /// Makes the snapshot device.
    pub take: &'a (dyn Fn() -> DevResult<Arc<dyn BlockDev>> + Sync),
}

struct Clock(AtomicU64);

impl Clock {
    fn tick(&self) -> u64 {
        self.0.fetch_add(1, Ordering::SeqCst)
    }
}

/// Classifies the sectors of `buf` (sector `start` first); the bytes of garbage sectors go to
/// `torn`.
fn read_values(
    cls: &Classifier,
    start: u64,
    buf: &[u8],
    scratch: &mut [u8],
    torn: &mut Vec<(usize, Box<[u8]>)>,
) -> Vec<Value> {
    buf.chunks(SECTOR as usize)
        .enumerate()
        .map(|(i, s)| {
            let v = cls.classify(start + i as u64, s, scratch);
            if v == Value::Garbage {
                torn.push((i, s.into()));
            }
            v
        })
        .collect()
}

/// Whether every byte of a sector read in `[inv, comp]` equals that byte of some value the
/// read may return (see the register rule): a read racing writes of the same sector may get
/// a mix of them, because the layers below (the page cache of a host file) copy bytes, not
/// sectors, atomically. Still never older data, zeros from nowhere or foreign bytes.
#[allow(clippy::too_many_arguments)]
fn composed_of_legal(
    muts: &[Mutation],
    list: &[usize],
    cls: &Classifier,
    lba: u64,
    bytes: &[u8],
    inv: u64,
    comp: u64,
) -> bool {
    let barrier = list
        .iter()
        .map(|&i| &muts[i])
        .filter(|m| m.comp < inv)
        .map(|m| m.inv)
        .max();
    let mut cands: Vec<Vec<u8>> = Vec::new();
    if barrier.is_none() {
        if let Some(init) = cls.initial_sector(lba) {
            cands.push(init.to_vec());
        }
    }
    for m in list.iter().map(|&i| &muts[i]) {
        if m.inv < comp && barrier.is_none_or(|b| b < m.comp) {
            let mut v = vec![0u8; SECTOR as usize];
            if let MutKind::Write(id) = m.kind {
                fill_sector(id, lba, &mut v);
            }
            cands.push(v);
        }
    }
    cands.len() > 1
        && bytes
            .iter()
            .enumerate()
            .all(|(i, b)| cands.iter().any(|c| c.get(i) == Some(b)))
}

/// Runs the checker on `dev` (the span must be inside it). Returns the counts, or the first
/// violation with the seed, the sector and the history around it.
pub fn run(
    dev: &Arc<dyn BlockDev>,
    cfg: &LinConfig,
    crash: Option<&CrashProbe<'_>>,
) -> Result<LinReport, LinError> {
    if cfg.span == 0 || !cfg.span.is_multiple_of(SECTOR) || cfg.span > dev.size() {
        return Err(LinError::Config(format!(
            "span {} must be a non-zero multiple of 512 within the device ({} bytes)",
            cfg.span,
            dev.size()
        )));
    }
    let nsec = cfg.span / SECTOR;
    let seed = cfg.seed;
    // The initial content of every sector.
    let mut initial = Vec::with_capacity(cfg.span as usize);
    let mut chunk = vec![0u8; 64 << 10];
    let mut off = 0;
    while off < cfg.span {
        let n = (cfg.span - off).min(chunk.len() as u64) as usize;
        dev.read_at(&mut chunk[..n], off)
            .map_err(|error| LinError::Op {
                seed,
                thread: 0,
                op: "initial read".into(),
                error,
            })?;
        initial.extend_from_slice(&chunk[..n]);
        off += n as u64;
    }
    let clock = Clock(AtomicU64::new(1));
    let next_id = AtomicU64::new(1);
    let stop = AtomicBool::new(false);
    let deadline = Instant::now() + cfg.duration;
    // Writers can only use ids they draw; the classifier accepts any id below this bound.
    let cls_bound = u64::MAX >> 1;
    let cls = Classifier {
        initial,
        max_id: cls_bound,
    };

    let (histories, crashes) = std::thread::scope(|s| {
        let workers: Vec<_> = (0..cfg.threads)
            .map(|t| {
                let (clock, next_id, cls) = (&clock, &next_id, &cls);
                s.spawn(move || worker(dev, cfg, t, clock, next_id, cls, deadline))
            })
            .collect();
        let prober = crash.map(|p| {
            let (clock, cls, stop) = (&clock, &cls, &stop);
            s.spawn(move || {
                let mut out = Vec::new();
                let mut buf = vec![0u8; cfg.span as usize];
                let mut scratch = vec![0u8; SECTOR as usize];
                while !stop.load(Ordering::SeqCst) {
                    std::thread::sleep(p.every);
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let after = clock.tick();
                    let snap = (p.take)();
                    let before = clock.tick();
                    let snap = snap.and_then(|d| d.read_at(&mut buf, 0).map(|()| d));
                    match snap {
                        Ok(_) => out.push(Ok(CrashRec {
                            after,
                            before,
                            // Torn sectors are never legal in a crash image (checked as garbage).
                            values: read_values(cls, 0, &buf, &mut scratch, &mut Vec::new()),
                        })),
                        Err(e) => {
                            out.push(Err(e));
                            break;
                        }
                    }
                }
                out
            })
        });
        let histories: Vec<_> = workers
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect();
        stop.store(true, Ordering::SeqCst);
        let crashes = prober
            .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .unwrap_or_default();
        (histories, crashes)
    });

    let mut hist = History::default();
    for h in histories {
        let h = h?;
        hist.muts.extend(h.muts);
        hist.reads.extend(h.reads);
        hist.flushes.extend(h.flushes);
    }
    // A final quiescent read of everything is one more read of the history.
    {
        let mut buf = vec![0u8; cfg.span as usize];
        let mut scratch = vec![0u8; SECTOR as usize];
        let inv = clock.tick();
        dev.read_at(&mut buf, 0).map_err(|error| LinError::Op {
            seed,
            thread: usize::MAX,
            op: "final read".into(),
            error,
        })?;
        let comp = clock.tick();
        let mut torn = Vec::new();
        hist.reads.push(ReadRec {
            inv,
            comp,
            start: 0,
            values: read_values(&cls, 0, &buf, &mut scratch, &mut torn),
            torn,
            thread: usize::MAX,
            large: true,
        });
    }
    let mut report = LinReport {
        seed,
        reads: hist.reads.len() as u64,
        writes: hist
            .muts
            .iter()
            .filter(|m| matches!(m.kind, MutKind::Write(_)))
            .count() as u64,
        zaps: hist
            .muts
            .iter()
            .filter(|m| matches!(m.kind, MutKind::Zap))
            .count() as u64,
        flushes: hist.flushes.len() as u64,
        ..LinReport::default()
    };
    let per_sector = index_by_sector(&hist.muts, nsec);
    let index: Vec<SectorIndex> = per_sector
        .iter()
        .map(|list| SectorIndex::new(&hist.muts, list))
        .collect();
    let mut by_id = vec![usize::MAX; hist.muts.len() + 2];
    for (i, m) in hist.muts.iter().enumerate() {
        if let MutKind::Write(id) = m.kind {
            if let Some(slot) = by_id.get_mut(id as usize) {
                *slot = i;
            }
        }
    }
    for r in &hist.reads {
        for (i, &v) in r.values.iter().enumerate() {
            let lba = r.start + i as u64;
            let list = &per_sector[lba as usize];
            if v == Value::Garbage {
                let torn_ok = r.torn.iter().find(|t| t.0 == i).is_some_and(|(_, b)| {
                    composed_of_legal(&hist.muts, list, &cls, lba, b, r.inv, r.comp)
                });
                if torn_ok {
                    report.torn_sectors += 1;
                    report.sectors_checked += 1;
                    continue;
                }
            }
            if !index[lba as usize].legal(&hist.muts, &by_id, lba, v, r.inv, r.comp) {
                return Err(LinError::Violation(describe(
                    seed,
                    &format!(
                        "{}read on thread {} (invoked {}, completed {})",
                        if r.large { "large " } else { "" },
                        r.thread,
                        r.inv,
                        r.comp
                    ),
                    lba,
                    v,
                    &hist.muts,
                    list,
                    r.inv,
                    r.comp,
                )));
            }
            report.sectors_checked += 1;
        }
    }
    check_no_new_old_inversion(&hist, &by_id, nsec, seed)?;
    for c in crashes {
        let c = c.map_err(|error| LinError::Op {
            seed,
            thread: usize::MAX,
            op: "crash snapshot".into(),
            error,
        })?;
        // Writes completed before a successful flush was invoked must be there (or newer).
        let required_before = hist
            .flushes
            .iter()
            .filter(|f| f.1 < c.after)
            .map(|f| f.0)
            .max()
            .unwrap_or(0);
        for (lba, &v) in c.values.iter().enumerate() {
            let list = &per_sector[lba];
            if !index[lba].legal(&hist.muts, &by_id, lba as u64, v, required_before, c.before) {
                return Err(LinError::Violation(describe(
                    seed,
                    &format!(
                        "crash snapshot taken between {} and {} (flushes invoked before {} \
                         completed before it)",
                        c.after, c.before, required_before
                    ),
                    lba as u64,
                    v,
                    &hist.muts,
                    list,
                    required_before,
                    c.before,
                )));
            }
            report.sectors_checked += 1;
        }
        report.crashes += 1;
    }
    Ok(report)
}

/// The second rule, between reads: once a read has returned some value, a read invoked after
/// it completed must not return the value of a write that had completed before the first read
/// was even invoked (the first read's value was then newer, and the old value cannot come
/// back). The register rule alone misses this: both values may be legal for each read on its
/// own. Only values naming one mutation (a write, or the initial content) are checked here;
/// zeros may come from several zaps.
fn check_no_new_old_inversion(
    hist: &History,
    by_id: &[usize],
    nsec: u64,
    seed: u64,
) -> Result<(), LinError> {
    // Per sector: (completion, invocation, value, read index).
    let mut obs: Vec<Vec<(u64, u64, Value, usize)>> = vec![Vec::new(); nsec as usize];
    for (ri, r) in hist.reads.iter().enumerate() {
        for (i, &v) in r.values.iter().enumerate() {
            obs[r.start as usize + i].push((r.comp, r.inv, v, ri));
        }
    }
    for (lba, list) in obs.iter_mut().enumerate() {
        list.sort_unstable_by_key(|o| o.0);
        // Prefix maxima of the invocation, keeping the best for two different values:
        // (inv, value, read) of the latest-invoked read, and the latest among other values.
        type Best = Option<(u64, Value, usize)>;
        let mut top: Vec<(Best, Best)> = Vec::with_capacity(list.len());
        let (mut a, mut b): (Best, Best) = (None, None);
        for &(_, inv, v, ri) in list.iter() {
            let cand = Some((inv, v, ri));
            match a {
                Some((ai, av, _)) if av == v => {
                    if inv > ai {
                        a = cand;
                    }
                }
                Some((ai, _, _)) if inv > ai => {
                    b = a;
                    a = cand;
                }
                Some(_) => {
                    if b.is_none_or(|(bi, _, _)| inv > bi) {
                        b = cand;
                    }
                }
                None => a = cand,
            }
            top.push((a, b));
        }
        for &(_, inv, v, ri) in list.iter() {
            let written_done = match v {
                Value::Initial => 0,
                Value::Write(id) => match by_id.get(id as usize).and_then(|&i| hist.muts.get(i)) {
                    Some(m) => m.comp,
                    None => continue,
                },
                _ => continue,
            };
            let n = list.partition_point(|o| o.0 < inv);
            let Some(&(a, b)) = n.checked_sub(1).and_then(|i| top.get(i)) else {
                continue;
            };
            let other = match a {
                Some((_, av, _)) if av == v => b,
                x => x,
            };
            if let Some((oi, ov, ori)) = other {
                if oi > written_done {
                    let (r1, r2) = (&hist.reads[ori], &hist.reads[ri]);
                    return Err(LinError::Violation(
                        format!(
                            "linearizability violation (seed {seed}, rerun with \
                         SNAPBLK_LIN_SEED={seed}): sector {lba} (byte {:#x}) went back in time: \
                         a read on thread {} (invoked {}, completed {}) returned {ov:?}, then a \
                         read on thread {} (invoked {}, completed {}) returned {v:?}, which \
                         had completed at {written_done}, before the first read started",
                            lba as u64 * SECTOR,
                            r1.thread,
                            r1.inv,
                            r1.comp,
                            r2.thread,
                            r2.inv,
                            r2.comp
                        ) + &inversion_context(hist, lba as u64, r1, r2),
                    ));
                }
            }
        }
    }
    Ok(())
}

/// The two reads of an inversion (range, large or not) and the mutations of the sector around
/// them, so that a failure report says which paths were involved.
fn inversion_context(hist: &History, lba: u64, r1: &ReadRec, r2: &ReadRec) -> String {
    let mut s = String::from("\n");
    for (name, r) in [("first", r1), ("second", r2)] {
        s.push_str(&format!(
            "  {name} read: sectors {}..{}{}\n",
            r.start,
            r.start + r.values.len() as u64,
            if r.large { " (large)" } else { "" }
        ));
    }
    s.push_str("  mutations of that sector (invoked, completed, thread, range, kind):\n");
    let lo = r1.inv.min(r2.inv);
    let hi = r1.comp.max(r2.comp);
    let mut near: Vec<&Mutation> = hist
        .muts
        .iter()
        .filter(|m| m.start <= lba && lba < m.end && m.comp + 2000 >= lo && m.inv <= hi + 200)
        .collect();
    near.sort_by_key(|m| m.inv);
    for m in near.iter().rev().take(24).rev() {
        s.push_str(&format!(
            "  {:>8} {:>8} t{} sectors {}..{} {:?}\n",
            m.inv, m.comp, m.thread, m.start, m.end, m.kind
        ));
    }
    s
}

/// For every sector, the indices of the mutations touching it, in invocation order.
fn index_by_sector(muts: &[Mutation], nsec: u64) -> Vec<Vec<usize>> {
    let mut per = vec![Vec::new(); nsec as usize];
    let mut order: Vec<usize> = (0..muts.len()).collect();
    order.sort_by_key(|&i| muts[i].inv);
    for i in order {
        let m = &muts[i];
        for lba in m.start..m.end.min(nsec) {
            per[lba as usize].push(i);
        }
    }
    per
}

/// The mutations of one sector, arranged so that the register rule is answered in logarithmic
/// time.
#[derive(Debug, Default)]
struct SectorIndex {
    /// (completion, invocation) of every mutation, by completion; and the running maximum of
    /// the invocations.
    by_comp: Vec<(u64, u64)>,
    prefix_max_inv: Vec<u64>,
    /// The same for zaps only, with the minimum invocation of each suffix.
    zaps: Vec<(u64, u64)>,
    zap_suffix_min_inv: Vec<u64>,
}

impl SectorIndex {
    fn new(muts: &[Mutation], list: &[usize]) -> Self {
        let mut by_comp: Vec<(u64, u64)> =
            list.iter().map(|&i| (muts[i].comp, muts[i].inv)).collect();
        by_comp.sort_unstable();
        let mut prefix_max_inv = Vec::with_capacity(by_comp.len());
        let mut m = 0;
        for &(_, inv) in &by_comp {
            m = m.max(inv);
            prefix_max_inv.push(m);
        }
        let mut zaps: Vec<(u64, u64)> = list
            .iter()
            .map(|&i| &muts[i])
            .filter(|m| matches!(m.kind, MutKind::Zap))
            .map(|m| (m.comp, m.inv))
            .collect();
        zaps.sort_unstable();
        let mut zap_suffix_min_inv = vec![u64::MAX; zaps.len()];
        let mut m = u64::MAX;
        for (i, &(_, inv)) in zaps.iter().enumerate().rev() {
            m = m.min(inv);
            zap_suffix_min_inv[i] = m;
        }
        SectorIndex {
            by_comp,
            prefix_max_inv,
            zaps,
            zap_suffix_min_inv,
        }
    }

    /// The register rule (see `legal` in the tests, the plain definition), using `by_id` (write id to mutation) for written values.
    fn legal(
        &self,
        muts: &[Mutation],
        by_id: &[usize],
        lba: u64,
        v: Value,
        inv: u64,
        comp: u64,
    ) -> bool {
        let n = self.by_comp.partition_point(|&(c, _)| c < inv);
        let barrier = n.checked_sub(1).map(|i| self.prefix_max_inv[i]);
        match v {
            Value::Garbage => false,
            Value::Initial => barrier.is_none(),
            Value::Write(id) => by_id
                .get(id as usize)
                .and_then(|&i| muts.get(i))
                .is_some_and(|m| {
                    (m.start..m.end).contains(&lba)
                        && m.inv < comp
                        && barrier.is_none_or(|b| b < m.comp)
                }),
            Value::Zero => {
                let from = match barrier {
                    Some(b) => self.zaps.partition_point(|&(c, _)| c <= b),
                    None => 0,
                };
                self.zap_suffix_min_inv
                    .get(from)
                    .is_some_and(|&min_inv| min_inv < comp)
            }
        }
    }
}

/// Whether value `v` may be seen by an observation invoked at `inv` and completed at `comp`:
/// from a mutation `M` invoked before `comp` that no mutation invoked after `M` completed and
/// completed before `inv` overwrote. The initial content is a mutation completed at time 0.
#[cfg(test)]
fn legal(muts: &[Mutation], list: &[usize], v: Value, inv: u64, comp: u64) -> bool {
    // The latest invocation among mutations that completed before `inv`.
    let barrier = list
        .iter()
        .map(|&i| &muts[i])
        .filter(|m| m.comp < inv)
        .map(|m| m.inv)
        .max();
    let ok = |m: &Mutation| m.inv < comp && barrier.is_none_or(|b| b < m.comp);
    let initial_ok = barrier.is_none();
    match v {
        Value::Garbage => false,
        Value::Initial => initial_ok,
        Value::Write(id) => list
            .iter()
            .map(|&i| &muts[i])
            .any(|m| matches!(m.kind, MutKind::Write(w) if w == id) && ok(m)),
        Value::Zero => list
            .iter()
            .map(|&i| &muts[i])
            .any(|m| matches!(m.kind, MutKind::Zap) && ok(m)),
    }
}

#[allow(clippy::too_many_arguments)]
fn describe(
    seed: u64,
    what: &str,
    lba: u64,
    v: Value,
    muts: &[Mutation],
    list: &[usize],
    inv: u64,
    comp: u64,
) -> String {
    let mut s = format!(
        "linearizability violation (seed {seed}, rerun with SNAPBLK_LIN_SEED={seed}): {what} \
         found {v:?} in sector {lba} (byte {:#x}); mutations of that sector (invoked, \
         completed, thread, range, kind), those around the read:\n",
        lba * SECTOR
    );
    let near: Vec<&Mutation> = list
        .iter()
        .map(|&i| &muts[i])
        .filter(|m| m.comp + 2000 >= inv && m.inv <= comp + 200)
        .collect();
    let shown = if near.is_empty() {
        list.iter().rev().take(8).map(|&i| &muts[i]).collect()
    } else {
        near
    };
    for m in shown.iter().rev().take(24).rev() {
        s.push_str(&format!(
            "  {:>8} {:>8} t{} sectors {}..{} {:?}\n",
            m.inv, m.comp, m.thread, m.start, m.end, m.kind
        ));
    }
    s
}

struct ThreadHistory {
    muts: Vec<Mutation>,
    reads: Vec<ReadRec>,
    flushes: Vec<(u64, u64)>,
}

impl ThreadHistory {
    fn record(&mut self, inv: u64, comp: u64, start: u64, count: u64, kind: MutKind, t: usize) {
        self.muts.push(Mutation {
            inv,
            comp,
            start,
            end: start + count,
            kind,
            thread: t,
        });
    }
}

fn worker(
    dev: &Arc<dyn BlockDev>,
    cfg: &LinConfig,
    t: usize,
    clock: &Clock,
    next_id: &AtomicU64,
    cls: &Classifier,
    deadline: Instant,
) -> Result<ThreadHistory, LinError> {
    let seed = cfg.seed;
    let mut rng = Rng(seed ^ mix(t as u64 + 1));
    let nsec = cfg.span / SECTOR;
    let large_sec = (cfg.large_len / SECTOR).min(nsec);
    let mut h = ThreadHistory {
        muts: Vec::new(),
        reads: Vec::new(),
        flushes: Vec::new(),
    };
    let mut buf = Vec::new();
    let mut scratch = vec![0u8; SECTOR as usize];
    let fail = |op: String, error: BlockError| LinError::Op {
        seed,
        thread: t,
        op,
        error,
    };
    while Instant::now() < deadline {
        let roll = rng.below(100);
        let large = large_sec > 0 && (79..91).contains(&roll);
        let zap = cfg.zaps && (65..79).contains(&roll);
        let (start, count) = if large {
            let count = large_sec + rng.below(large_sec / 2 + 1);
            let count = count.min(nsec);
            let start = rng.below(nsec - count + 1);
            let align = (cfg.large_align / SECTOR).max(1);
            if align > 1 && count >= align && rng.below(2) == 0 {
                let count = count - count % align;
                (start - start % align, count)
            } else {
                (start, count)
            }
        } else {
            // Half of the zaps hit one or two sectors: the races between a zap and a read that
            // needs the sectors around it are the interesting ones.
            let max = if zap && rng.below(2) == 0 {
                2
            } else {
                cfg.max_sectors.max(1)
            };
            let count = (1 + rng.below(max)).min(nsec);
            let window = if rng.below(2) == 0 {
                cfg.hot_sectors.clamp(count, nsec)
            } else {
                nsec
            };
            (rng.below(window - count + 1), count)
        };
        let (off, len) = (start * SECTOR, count * SECTOR);
        buf.resize(len as usize, 0);
        match roll {
            _ if (91..95).contains(&roll) => {
                let inv = clock.tick();
                dev.flush().map_err(|e| fail("flush".into(), e))?;
                h.flushes.push((inv, clock.tick()));
            }
            _ if (35..65).contains(&roll) || (large && roll >= 85) => {
                let id = next_id.fetch_add(1, Ordering::Relaxed);
                for (i, s) in buf.chunks_mut(SECTOR as usize).enumerate() {
                    fill_sector(id, start + i as u64, s);
                }
                let inv = clock.tick();
                dev.write_at(&buf, off)
                    .map_err(|e| fail(format!("write {off:#x}+{len:#x}"), e))?;
                h.record(inv, clock.tick(), start, count, MutKind::Write(id), t);
            }
            _ if zap => {
                let inv = clock.tick();
                let r = if roll < 72 {
                    dev.discard(off, len)
                } else {
                    dev.write_zeroes(off, len, roll.is_multiple_of(2))
                };
                r.map_err(|e| fail(format!("zap {off:#x}+{len:#x}"), e))?;
                h.record(inv, clock.tick(), start, count, MutKind::Zap, t);
            }
            _ => {
                let inv = clock.tick();
                dev.read_at(&mut buf, off)
                    .map_err(|e| fail(format!("read {off:#x}+{len:#x}"), e))?;
                let comp = clock.tick();
                let mut torn = Vec::new();
                h.reads.push(ReadRec {
                    inv,
                    comp,
                    start,
                    values: read_values(cls, start, &buf, &mut scratch, &mut torn),
                    torn,
                    thread: t,
                    large,
                });
            }
        }
    }
    Ok(h)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(inv: u64, comp: u64, kind: MutKind) -> Mutation {
        Mutation {
            inv,
            comp,
            start: 0,
            end: 1,
            kind,
            thread: 0,
        }
    }

    #[test]
    fn register_rule_accepts_last_or_concurrent_and_rejects_overwritten_values() {
        // w1 [1,2], w2 [3,4], zap [5,9].
        let muts = vec![
            m(1, 2, MutKind::Write(1)),
            m(3, 4, MutKind::Write(2)),
            m(5, 9, MutKind::Zap),
        ];
        let list = [0, 1, 2];
        // A read in [6,7]: w2 (last completed) or the zap (concurrent); not w1, not initial.
        assert!(legal(&muts, &list, Value::Write(2), 6, 7));
        assert!(legal(&muts, &list, Value::Zero, 6, 7));
        assert!(!legal(&muts, &list, Value::Write(1), 6, 7));
        assert!(!legal(&muts, &list, Value::Initial, 6, 7));
        // A read after everything: only the zap.
        assert!(legal(&muts, &list, Value::Zero, 10, 11));
        assert!(!legal(&muts, &list, Value::Write(2), 10, 11));
        // A read before everything: only the initial content; a read overlapping w1 either.
        assert!(legal(&muts, &list, Value::Initial, 0, 1));
        assert!(!legal(&muts, &list, Value::Write(1), 0, 1));
        assert!(
            legal(&muts, &list, Value::Write(1), 0, 2)
                || legal(&muts, &list, Value::Write(1), 1, 3)
        );
        assert!(!legal(&muts, &list, Value::Garbage, 0, 100));
        // Two overlapping writes both completed before the read: either may be last.
        let muts = vec![m(1, 5, MutKind::Write(1)), m(2, 4, MutKind::Write(2))];
        assert!(legal(&muts, &[0, 1], Value::Write(1), 6, 7));
        assert!(legal(&muts, &[0, 1], Value::Write(2), 6, 7));
    }

    #[test]
    fn fast_sector_index_agrees_with_the_register_rule_on_random_histories() {
        let mut rng = Rng(42);
        for _ in 0..300 {
            let mut muts = Vec::new();
            for id in 1..=rng.below(12) + 1 {
                let inv = rng.below(60) + 1;
                let comp = inv + rng.below(20) + 1;
                let kind = if rng.below(3) == 0 {
                    MutKind::Zap
                } else {
                    MutKind::Write(id)
                };
                muts.push(m(inv, comp, kind));
            }
            let list: Vec<usize> = (0..muts.len()).collect();
            let idx = SectorIndex::new(&muts, &list);
            let mut by_id = vec![usize::MAX; muts.len() + 2];
            for (i, mm) in muts.iter().enumerate() {
                if let MutKind::Write(id) = mm.kind {
                    by_id[id as usize] = i;
                }
            }
            for _ in 0..40 {
                let inv = rng.below(90);
                let comp = inv + rng.below(10) + 1;
                let mut values = vec![Value::Zero, Value::Initial, Value::Garbage];
                values.extend((1..=muts.len() as u64 + 1).map(Value::Write));
                for v in values {
                    assert_eq!(
                        idx.legal(&muts, &by_id, 0, v, inv, comp),
                        legal(&muts, &list, v, inv, comp),
                        "{v:?} [{inv},{comp}] {muts:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_value_older_than_one_already_read_is_a_violation() {
        let read = |inv, comp, v| ReadRec {
            inv,
            comp,
            start: 0,
            values: vec![v],
            torn: Vec::new(),
            thread: 0,
            large: false,
        };
        // w1 [1,2], w2 [3,4]; both legal for a read in [5,6] only if nothing newer was seen.
        let hist = |second: Value| History {
            muts: vec![m(1, 2, MutKind::Write(1)), m(3, 4, MutKind::Write(2))],
            reads: vec![read(5, 6, Value::Write(2)), read(7, 8, second)],
            flushes: Vec::new(),
        };
        let by_id = vec![usize::MAX, 0, 1];
        assert!(check_no_new_old_inversion(&hist(Value::Write(2)), &by_id, 1, 0).is_ok());
        assert!(check_no_new_old_inversion(&hist(Value::Write(1)), &by_id, 1, 0).is_err());
        assert!(check_no_new_old_inversion(&hist(Value::Initial), &by_id, 1, 0).is_err());
        // Overlapping reads may disagree.
        let mut h = hist(Value::Write(1));
        h.reads[1].inv = 5;
        assert!(check_no_new_old_inversion(&h, &by_id, 1, 0).is_ok());
    }

    #[test]
    fn a_byte_mix_of_values_legal_for_the_read_is_accepted_and_nothing_else() {
        let cls = Classifier {
            initial: vec![9u8; 512],
            max_id: 10,
        };
        // w1 [1,2] completed before the read [5,9]; w2 [4,8] and a zap [6,7] run alongside.
        let muts = vec![
            m(1, 2, MutKind::Write(1)),
            m(4, 8, MutKind::Write(2)),
            m(6, 7, MutKind::Zap),
        ];
        let list = [0, 1, 2];
        let (mut a, mut b) = (vec![0u8; 512], vec![0u8; 512]);
        fill_sector(1, 0, &mut a);
        fill_sector(2, 0, &mut b);
        let mut mix = a.clone();
        mix[200..].copy_from_slice(&b[200..]);
        mix[400..].fill(0);
        assert!(composed_of_legal(&muts, &list, &cls, 0, &mix, 5, 9));
        // The initial bytes were overwritten by w1 before the read: never legal again.
        let mut stale = a.clone();
        stale[300..].fill(9);
        assert!(!composed_of_legal(&muts, &list, &cls, 0, &stale, 5, 9));
        // After w2 completed and overwrote w1, w1's bytes may not show up.
        assert!(!composed_of_legal(&muts, &list, &cls, 0, &mix, 9, 10));
    }

    #[test]
    fn sectors_are_classified_by_writer_and_torn_ones_are_garbage() {
        let mut a = vec![0u8; 512];
        fill_sector(7, 3, &mut a);
        let init = vec![5u8; 512];
        let mut initial = vec![0u8; 3 * 512];
        initial.extend_from_slice(&init);
        let cls = Classifier {
            initial,
            max_id: 100,
        };
        let mut scratch = vec![0u8; 512];
        assert_eq!(cls.classify(3, &a, &mut scratch), Value::Write(7));
        assert_eq!(cls.classify(2, &a, &mut scratch), Value::Garbage);
        assert_eq!(cls.classify(3, &init, &mut scratch), Value::Initial);
        assert_eq!(cls.classify(3, &[0u8; 512], &mut scratch), Value::Zero);
        let mut torn = a.clone();
        torn[300..].copy_from_slice(&init[300..]);
        assert_eq!(cls.classify(3, &torn, &mut scratch), Value::Garbage);
    }
}
