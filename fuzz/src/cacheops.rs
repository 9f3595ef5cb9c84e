//! `cache_ops`: an op sequence against a tiny [`cache::FolioCache`] over a [`blockdev::MemDisk`],
//! compared with a shadow `Vec<u8>`.
//!
//! Oracles: no panic; an in-range op always succeeds (the lower layer never fails) and an
//! out-of-range one always fails without changing anything; every read returns the shadow's
//! bytes; after every flush (and at the end) the lower disk equals the shadow byte for byte, so
//! a write that the cache lost, reordered, zeroed or never wrote back is caught.
//!
//! Input format: `cfg:u8 size:u16` then ops `op:u8 ...`:
//! read/write/discard/write-zeroes take `off:u32 len:u16` (offsets modulo a little more than
//! the disk size, so out-of-range requests happen too); a write also takes `fill:u8`. Config
//! byte: bits 0-1 cache size (2, 8, 16 or 32 folios of 4 KiB), bit 2 a background flusher thread, bit 3
//! bypass threshold 8 KiB, bit 4 start in write-through, bits 5-6 dirty limit fraction, bit 7
//! an odd disk size (not a multiple of 512).

use std::sync::Arc;
use std::time::Duration;

use blockdev::{BlockDev, MemDisk};
use cache::{CacheConfig, FolioCache};

use crate::{Reader, Writer};

/// Folio size of the harness cache.
pub const FOLIO: u64 = 4096;
/// Most ops per input.
const MAX_OPS: usize = 400;

/// Op codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum CacheOp {
    /// `off:u32 len:u16`.
    Read = 0,
    /// `off:u32 len:u16 fill:u8`.
    Write = 1,
    /// Flush, then compare the lower disk with the shadow.
    Flush = 2,
    /// `off:u32 len:u16`.
    Discard = 3,
    /// `off:u32 len:u16`, unmap.
    WriteZeroes = 4,
    /// `off:u32 len:u16`, no unmap.
    WriteZeroesNoUnmap = 5,
    /// Toggle write-back/write-through.
    ToggleWriteback = 6,
    /// Evict clean folios.
    DropClean = 7,
}

const OPS: u8 = 8;

/// Runs one input.
pub fn run(data: &[u8]) {
    let mut r = Reader::new(data);
    let cfg_byte = r.u8();
    // 16 KiB..256 KiB, a multiple of 4 bytes or (bit 7) not even of 512: the last folio is partial.
    let size =
        (16 << 10) + usize::from(r.u16()) * 4 % (240 << 10) + usize::from(cfg_byte >> 7) * 333;
    let folios = [2u64, 8, 16, 32][usize::from(cfg_byte & 3)];
    let cache_size = folios * FOLIO;
    let dirty_limit = match (cfg_byte >> 5) & 3 {
        0 => FOLIO,
        1 => cache_size / 2,
        2 => cache_size,
        _ => (cache_size * 3 / 4).max(FOLIO),
    };
    let cfg = CacheConfig {
        folio_size: FOLIO,
        cache_size,
        dirty_limit,
        writeback: cfg_byte & 0x10 == 0,
        flusher_threads: usize::from(cfg_byte & 4 != 0),
        writeback_interval: Duration::from_millis(1),
        bypass_threshold: if cfg_byte & 8 != 0 { 8 << 10 } else { 0 },
        read_bypass_threshold: 0,
        // The memory disk below never says a write lands in place: no rewrite bypass.
        rewrite_bypass_threshold: 0,
    };
    let initial: Vec<u8> = (0..size).map(|i| (i % 251) as u8 ^ 0x3c).collect();
    let lower = Arc::new(MemDisk::from_vec(initial.clone()));
    let cache = FolioCache::new(lower.clone(), cfg).expect("valid cache config");
    let mut shadow = initial;
    let span = size as u64 + 2 * FOLIO;

    let mut ops = 0;
    while !r.is_empty() && ops < MAX_OPS {
        ops += 1;
        let op = r.u8() % OPS;
        match op {
            0 | 1 | 3 | 4 | 5 => {
                let off = u64::from(r.u32()) % span;
                let len = u64::from(r.u16());
                let in_range = off + len <= size as u64;
                let (s, e) = (off as usize, (off + len) as usize);
                let res = match op {
                    0 => {
                        let mut buf = vec![0u8; len as usize];
                        let res = cache.read_at(&mut buf, off);
                        if res.is_ok() {
                            assert!(in_range, "read past the end succeeded at {off}+{len}");
                            if let Some(pos) =
                                buf.iter().zip(&shadow[s..e]).position(|(a, b)| a != b)
                            {
                                panic!(
                                    "read at {off}+{len}: byte {} is {:#x}, expected {:#x}",
                                    off + pos as u64,
                                    buf[pos],
                                    shadow[s + pos]
                                );
                            }
                        }
                        res
                    }
                    1 => {
                        let fill = r.u8();
                        let buf: Vec<u8> = (0..len).map(|i| fill ^ (i as u8)).collect();
                        let res = cache.write_at(&buf, off);
                        if res.is_ok() {
                            shadow[s..e].copy_from_slice(&buf);
                        }
                        res
                    }
                    3 => {
                        let res = cache.discard(off, len);
                        if res.is_ok() {
                            shadow[s..e].fill(0);
                        }
                        res
                    }
                    _ => {
                        let res = cache.write_zeroes(off, len, op == 4);
                        if res.is_ok() {
                            shadow[s..e].fill(0);
                        }
                        res
                    }
                };
                match res {
                    Ok(()) => assert!(in_range, "op {op} past the end succeeded at {off}+{len}"),
                    Err(e) => assert!(!in_range, "in-range op {op} at {off}+{len} failed: {e}"),
                }
                if op != 0 && in_range && !cache.writeback_enabled() {
                    // Write-through: a completed write-type op is already in the lower layer.
                    let mut low = vec![0u8; e - s];
                    lower.read_at(&mut low, off).expect("lower read");
                    assert!(
                        low == shadow[s..e],
                        "write-through op {op} at {off}+{len} is not in the lower layer"
                    );
                }
            }
            2 => {
                cache.flush().expect("flush over MemDisk");
                assert_lower_matches(&lower, &shadow, "after flush");
            }
            6 => {
                let wb = cache.writeback_enabled();
                cache
                    .set_writeback(!wb)
                    .expect("set_writeback over MemDisk");
                if wb {
                    // Going to write-through flushes everything.
                    assert_lower_matches(&lower, &shadow, "after switching to write-through");
                }
            }
            _ => {
                cache.drop_clean();
            }
        }
    }
    cache.flush().expect("final flush over MemDisk");
    assert_lower_matches(&lower, &shadow, "after the final flush");
    let mut all = vec![0u8; size];
    cache.read_at(&mut all, 0).expect("full read");
    assert!(all == shadow, "final full read differs from the shadow");
    cache.shutdown().expect("shutdown");
    assert_lower_matches(&lower, &shadow, "after shutdown");
}

fn assert_lower_matches(lower: &MemDisk, shadow: &[u8], when: &str) {
    let got = lower.snapshot();
    if let Some(pos) = got.iter().zip(shadow).position(|(a, b)| a != b) {
        panic!(
            "lower disk differs from the shadow {when} at byte {pos}: {:#x} != {:#x}",
            got[pos], shadow[pos]
        );
    }
    assert_eq!(got.len(), shadow.len(), "lower disk size changed");
}

/// Builds inputs for [`run`].
#[derive(Debug, Default, Clone)]
pub struct CacheInput {
    w: Writer,
}

impl CacheInput {
    /// A program with config byte `cfg` and size word `size`.
    pub fn new(cfg: u8, size: u16) -> Self {
        let mut w = Writer::default();
        w.u8(cfg).u16(size);
        CacheInput { w }
    }

    /// A ranged op (read, discard, write-zeroes).
    pub fn ranged(&mut self, op: CacheOp, off: u32, len: u16) -> &mut Self {
        self.w.u8(op as u8).u32(off).u16(len);
        self
    }

    /// A write.
    pub fn write(&mut self, off: u32, len: u16, fill: u8) -> &mut Self {
        self.w.u8(CacheOp::Write as u8).u32(off).u16(len).u8(fill);
        self
    }

    /// An op without arguments.
    pub fn op(&mut self, op: CacheOp) -> &mut Self {
        self.w.u8(op as u8);
        self
    }

    /// The encoded program.
    pub fn build(&self) -> Vec<u8> {
        self.w.out.clone()
    }
}

/// Seed programs.
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    use CacheOp::*;
    let mut out = Vec::new();
    let mut s = CacheInput::new(0x01, 100);
    s.write(100, 5000, 1)
        .ranged(Read, 0, 9000)
        .write(4000, 200, 2)
        .op(Flush)
        .ranged(Discard, 4096, 8192)
        .ranged(Read, 3000, 10000)
        .write(20000, 30000, 3)
        .op(DropClean)
        .ranged(Read, 19000, 33000);
    out.push(("write_read_discard_evict", s.build()));
    let mut s = CacheInput::new(0x08 | 0x40 | 0x80, 7);
    s.write(0, 16384, 4)
        .ranged(WriteZeroes, 1000, 3000)
        .op(ToggleWriteback)
        .write(8192, 9000, 5)
        .op(ToggleWriteback)
        .ranged(WriteZeroesNoUnmap, 8000, 600)
        .ranged(Read, 0, 20000)
        .write(18000, 60000, 6)
        .op(Flush);
    out.push(("bypass_zeroes_writethrough", s.build()));
    let mut s = CacheInput::new(0x04 | 0x03, 1000);
    for i in 0..40u32 {
        s.write(i * 3000 + 7, 2500, i as u8);
    }
    s.ranged(Read, 0, 65535)
        .op(Flush)
        .ranged(Read, 100_000, 30_000);
    out.push(("flusher_many_writes", s.build()));
    out
}
