//! Random guest workloads, the shadow of what the guest was acknowledged at every flush, and
//! the check of a recovered image against it.

use super::*;
use std::sync::Arc;

use blockdev::BlockDev;
use rand::rngs::StdRng;
use rand::{Rng, RngCore};

/// One guest request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestOp {
    /// Write `len` bytes of pattern `seed` at `offset`.
    Write { offset: u64, len: u64, seed: u64 },
    /// Write zeroes, optionally allowing deallocation.
    WriteZeroes { offset: u64, len: u64, unmap: bool },
    /// Discard.
    Discard { offset: u64, len: u64 },
    /// Flush.
    Flush,
    /// Write-back ([`BlockDev::write_back`], what the crash journal's trims call): every
    /// acknowledged write must be in the file afterwards, durable or not; nothing becomes
    /// flushed.
    WriteBack,
}

/// Fills `buf` with a pattern derived from `seed` and the absolute guest offset of each sector,
/// so that every (write, sector) pair has distinct, non-zero content.
pub fn pattern(seed: u64, offset: u64, buf: &mut [u8]) {
    for (i, chunk) in buf.chunks_mut(GUEST_SECTOR as usize).enumerate() {
        let sector = offset / GUEST_SECTOR + i as u64;
        let mut x = seed
            .wrapping_mul(0x9e37_79b9_7f4a_7c15)
            .wrapping_add(sector.wrapping_mul(0xbf58_476d_1ce4_e5b9))
            | 1;
        for b in chunk.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let bytes = (x | 0x0101_0101_0101_0101).to_le_bytes();
            b.copy_from_slice(&bytes[..b.len()]);
        }
    }
}

/// Parameters of a random workload.
#[derive(Debug, Clone, Copy)]
pub struct WorkloadSpec {
    /// Virtual disk size (multiple of 512).
    pub disk_size: u64,
    /// Cluster size of the image under test (to aim at partial/whole-cluster cases).
    pub cluster_size: u64,
    /// Number of requests (flushes included).
    pub ops: usize,
    /// Probability weights: write, write-zeroes, discard, flush, write-back.
    pub weights: [u32; 5],
    /// Largest request, in bytes.
    pub max_len: u64,
}

/// A random workload: writes (sub-cluster, cluster-aligned, cross-cluster), write-zeroes,
/// discards, flushes and write-backs, always ending with a flush.
pub fn random_workload(spec: &WorkloadSpec, rng: &mut StdRng) -> Vec<GuestOp> {
    let sectors = spec.disk_size / GUEST_SECTOR;
    let total: u32 = spec.weights.iter().sum();
    let mut ops = Vec::with_capacity(spec.ops + 1);
    for _ in 0..spec.ops {
        let pick = rng.random_range(0..total.max(1));
        let (offset, len) = random_range(spec, sectors, rng);
        let mut acc = 0;
        let mut kind = 3;
        for (i, w) in spec.weights.iter().enumerate() {
            acc += w;
            if pick < acc {
                kind = i;
                break;
            }
        }
        ops.push(match kind {
            0 => GuestOp::Write {
                offset,
                len,
                seed: rng.next_u64(),
            },
            1 => GuestOp::WriteZeroes {
                offset,
                len,
                unmap: rng.random_bool(0.5),
            },
            2 => GuestOp::Discard { offset, len },
            3 => GuestOp::Flush,
            _ => GuestOp::WriteBack,
        });
    }
    ops.push(GuestOp::Flush);
    ops
}

fn random_range(spec: &WorkloadSpec, sectors: u64, rng: &mut StdRng) -> (u64, u64) {
    let cs = spec.cluster_size.max(GUEST_SECTOR);
    let max_sectors = (spec.max_len / GUEST_SECTOR).clamp(1, sectors);
    match rng.random_range(0..4) {
        // Whole clusters, aligned.
        0 if cs <= spec.max_len && cs < spec.disk_size => {
            let clusters = spec.disk_size / cs;
            let n = rng.random_range(1..=(spec.max_len / cs).clamp(1, clusters));
            let first = rng.random_range(0..=clusters - n);
            (first * cs, n * cs)
        }
        // Inside one cluster.
        1 if cs > GUEST_SECTOR => {
            let clusters = spec.disk_size / cs;
            let c = rng.random_range(0..clusters);
            let per = cs / GUEST_SECTOR;
            let s = rng.random_range(0..per);
            let n = rng.random_range(1..=(per - s).min(max_sectors));
            (c * cs + s * GUEST_SECTOR, n * GUEST_SECTOR)
        }
        // Anything.
        _ => {
            let n = rng.random_range(1..=max_sectors);
            let s = rng.random_range(0..=sectors - n);
            (s * GUEST_SECTOR, n * GUEST_SECTOR)
        }
    }
}

/// What one request did to the guest-visible disk.
#[derive(Debug, Clone)]
pub struct OpRecord {
    /// The request.
    pub op: GuestOp,
    /// Log position when it was submitted.
    pub start_pos: usize,
    /// Whether it completed successfully.
    pub ok: bool,
}

/// The guest-visible disk as acknowledged by a completed flush.
#[derive(Debug, Clone)]
pub struct FlushRecord {
    /// Log position when the flush returned.
    pub pos: usize,
    /// How many requests were submitted before the flush.
    pub ops_before: usize,
    /// The guest-visible content the flush made durable.
    pub shadow: Arc<Vec<u8>>,
    /// Failed requests before the flush whose sectors may hold their value instead.
    pub uncertain_ops: Vec<GuestOp>,
}

/// Drives a [`BlockDev`] with guest requests, keeps the shadow of what it acknowledged, and the
/// shadow as of every completed flush.
pub struct Driver {
    /// What the guest must read now (exact for every sector written by a completed request; for
    /// sectors of a failed request see [`Driver::uncertain`]).
    pub shadow: Vec<u8>,
    /// Sectors whose content is one of several values because a write-type request failed.
    pub uncertain: Vec<bool>,
    /// Every request submitted.
    pub ops: Vec<OpRecord>,
    /// Every completed flush, the first one being the starting state (position 0).
    pub flushes: Vec<FlushRecord>,
    /// Failed write-type requests whose range is still (partly) uncertain.
    failed: Vec<GuestOp>,
    position: Box<dyn Fn() -> usize + Send + Sync>,
}

impl std::fmt::Debug for Driver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Driver")
            .field("ops", &self.ops.len())
            .field("flushes", &self.flushes.len())
            .finish()
    }
}

impl Driver {
    /// A driver whose disk initially (and durably) shows `initial`; `position` reads the
    /// recorder's log position.
    pub fn new(initial: Vec<u8>, position: Box<dyn Fn() -> usize + Send + Sync>) -> Driver {
        let sectors = initial.len() / GUEST_SECTOR as usize;
        let shadow0 = Arc::new(initial.clone());
        Driver {
            shadow: initial,
            uncertain: vec![false; sectors],
            ops: Vec::new(),
            flushes: vec![FlushRecord {
                pos: 0,
                ops_before: 0,
                shadow: shadow0,
                uncertain_ops: Vec::new(),
            }],
            failed: Vec::new(),
            position,
        }
    }

    /// Submits `op` to `dev`, updating the shadows. Returns the request's result.
    pub fn run(&mut self, dev: &dyn BlockDev, op: &GuestOp) -> blockdev::Result<()> {
        let start_pos = (self.position)();
        let res = match *op {
            GuestOp::Write { offset, len, seed } => {
                let mut buf = vec![0u8; len as usize];
                pattern(seed, offset, &mut buf);
                let r = dev.write_at(&buf, offset);
                self.note(op, r.is_ok(), Some(&buf));
                r
            }
            GuestOp::WriteZeroes { offset, len, unmap } => {
                let r = dev.write_zeroes(offset, len, unmap);
                self.note(op, r.is_ok(), None);
                r
            }
            GuestOp::Discard { offset, len } => {
                let r = dev.discard(offset, len);
                self.note(op, r.is_ok(), None);
                r
            }
            GuestOp::Flush => {
                let r = dev.flush();
                if r.is_ok() {
                    self.flushes.push(FlushRecord {
                        pos: (self.position)(),
                        ops_before: self.ops.len(),
                        shadow: Arc::new(self.shadow.clone()),
                        uncertain_ops: self.failed.clone(),
                    });
                }
                r
            }
            GuestOp::WriteBack => dev.write_back(),
        };
        self.ops.push(OpRecord {
            op: op.clone(),
            start_pos,
            ok: res.is_ok(),
        });
        res
    }

    fn note(&mut self, op: &GuestOp, ok: bool, data: Option<&[u8]>) {
        let Some((offset, len)) = op_range(op) else {
            return;
        };
        let s = offset as usize;
        let e = s + len as usize;
        let (first, last) = (s / GUEST_SECTOR as usize, e.div_ceil(GUEST_SECTOR as usize));
        if ok {
            match data {
                Some(d) => self.shadow[s..e].copy_from_slice(d),
                None => self.shadow[s..e].fill(0),
            }
            for u in &mut self.uncertain[first..last] {
                *u = false;
            }
        } else {
            for u in &mut self.uncertain[first..last] {
                *u = true;
            }
            self.failed.push(op.clone());
        }
        let unc = &self.uncertain;
        self.failed.retain(|op| {
            op_range(op).is_some_and(|(o, l)| {
                let a = (o / GUEST_SECTOR) as usize;
                let b = (o + l).div_ceil(GUEST_SECTOR) as usize;
                unc[a..b].iter().any(|&u| u)
            })
        });
    }

    /// Reads the whole device and compares it with the live shadow: sectors written by completed
    /// requests must match exactly; sectors made uncertain by a failed request may hold their old
    /// value or the failed request's value.
    pub fn verify_live(&self, dev: &dyn BlockDev) -> Result<(), String> {
        let mut got = vec![0u8; self.shadow.len()];
        read_all(dev, &mut got).map_err(|e| format!("reading the device back failed: {e}"))?;
        let ss = GUEST_SECTOR as usize;
        let exp = Expectation {
            flushed: Arc::new(Vec::new()),
            later: self.failed.clone(),
        };
        let mut nbad = 0;
        let mut first = Vec::new();
        for (i, (g, s)) in got.chunks(ss).zip(self.shadow.chunks(ss)).enumerate() {
            if g == s || (self.uncertain[i] && exp.later_explains((i * ss) as u64, g)) {
                continue;
            }
            nbad += 1;
            if first.len() < 8 {
                first.push(describe_sector((i * ss) as u64, g, s));
            }
        }
        if nbad == 0 {
            Ok(())
        } else {
            Err(format!(
                "live image differs from the shadow in {nbad} sector(s): {}",
                first.join("; ")
            ))
        }
    }

    /// What the image must show when every acknowledged request landed (the file as written,
    /// after a write-back): the live shadow, with failed requests' sectors uncertain.
    pub fn expectation_acknowledged(&self) -> Expectation {
        Expectation {
            flushed: Arc::new(self.shadow.clone()),
            later: self.failed.clone(),
        }
    }

    /// What a crash state with everything before `durable_pos` durable and nothing at or after
    /// `window_end` must show.
    pub fn expectation(&self, durable_pos: usize, window_end: usize) -> Expectation {
        let f = self
            .flushes
            .iter()
            .rev()
            .find(|f| f.pos <= durable_pos)
            .unwrap_or(&self.flushes[0]);
        let mut later = f.uncertain_ops.clone();
        later.extend(
            self.ops[f.ops_before..]
                .iter()
                .filter(|o| o.start_pos < window_end)
                .map(|o| o.op.clone()),
        );
        Expectation {
            flushed: Arc::clone(&f.shadow),
            later,
        }
    }

    /// The expectation for the image as it is now on disk, with everything before `durable_pos`
    /// known to be durable (every request so far may have landed).
    pub fn expectation_now(&self, durable_pos: usize) -> Expectation {
        self.expectation(durable_pos, usize::MAX)
    }

    /// The shadow as of the last completed flush.
    pub fn last_flushed(&self) -> &FlushRecord {
        self.flushes.last().unwrap_or(&self.flushes[0])
    }

    /// Number of completed flushes (without the starting state).
    pub fn flush_count(&self) -> usize {
        self.flushes.len() - 1
    }
}

/// Reads the whole device into `buf` in 256 KiB pieces.
pub fn read_all(dev: &dyn BlockDev, buf: &mut [u8]) -> blockdev::Result<()> {
    for (i, chunk) in buf.chunks_mut(256 << 10).enumerate() {
        dev.read_at(chunk, (i as u64) * (256 << 10))?;
    }
    Ok(())
}

/// The allowed content of a recovered disk: each sector holds its flushed value, or the value of
/// one of the requests issued after that flush.
#[derive(Debug, Clone)]
pub struct Expectation {
    /// Guest content at the last durable flush.
    pub flushed: Arc<Vec<u8>>,
    /// Requests issued after it (and before the crash point).
    pub later: Vec<GuestOp>,
}

impl Expectation {
    /// Checks `got` (the whole recovered disk); the error names the first bad sectors.
    pub fn verify(&self, got: &[u8]) -> Result<(), String> {
        if got.len() != self.flushed.len() {
            return Err(format!(
                "disk size {} != expected {}",
                got.len(),
                self.flushed.len()
            ));
        }
        let ss = GUEST_SECTOR as usize;
        let mut bad = Vec::new();
        let mut nbad = 0usize;
        for (i, (g, f)) in got.chunks(ss).zip(self.flushed.chunks(ss)).enumerate() {
            if g == f {
                continue;
            }
            let off = (i * ss) as u64;
            let ok = self.later_explains(off, g);
            if !ok {
                nbad += 1;
                if bad.len() < 8 {
                    bad.push(describe_sector(off, g, f));
                }
            }
        }
        if nbad == 0 {
            Ok(())
        } else {
            Err(format!(
                "{nbad} sector(s) hold neither the flushed value nor a later write: {}",
                bad.join("; ")
            ))
        }
    }
}

impl Expectation {
    /// Whether one of the later requests wrote exactly `got` into the sector at `off`.
    pub fn later_explains(&self, off: u64, got: &[u8]) -> bool {
        let mut tmp = vec![0u8; got.len()];
        self.later.iter().any(|op| match *op {
            GuestOp::Write { offset, len, seed } if covers(offset, len, off) => {
                pattern(seed, off, &mut tmp);
                got == &tmp[..]
            }
            GuestOp::WriteZeroes { offset, len, .. } | GuestOp::Discard { offset, len } => {
                covers(offset, len, off) && got.iter().all(|&b| b == 0)
            }
            _ => false,
        })
    }
}

/// The byte range a write-type request touches.
pub fn op_range(op: &GuestOp) -> Option<(u64, u64)> {
    match *op {
        GuestOp::Write { offset, len, .. }
        | GuestOp::WriteZeroes { offset, len, .. }
        | GuestOp::Discard { offset, len } => Some((offset, len)),
        GuestOp::Flush | GuestOp::WriteBack => None,
    }
}

fn covers(offset: u64, len: u64, sector_off: u64) -> bool {
    sector_off >= offset && sector_off < offset + len
}

fn describe_sector(off: u64, got: &[u8], flushed: &[u8]) -> String {
    let what = if got.iter().all(|&b| b == 0) {
        "zeros".to_string()
    } else {
        format!("{:02x?}..", &got[..8.min(got.len())])
    };
    format!(
        "sector at {off:#x}: got {what}, flushed {:02x?}..",
        &flushed[..8.min(flushed.len())]
    )
}
