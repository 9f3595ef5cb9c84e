//! snapblk's write-back folio cache: a [`BlockDev`](blockdev::BlockDev) layer that keeps the
//! virtual disk's bytes in fixed-size, power-of-two *folios* and writes dirty data back to the
//! layer below with strict ordering.
//!
//! What this crate owns:
//! - [`FolioCache`] (module `cache`): the cache itself, its background writeback thread, flush,
//!   write-through mode, discard/write-zeroes handling and eviction.
//! - [`CacheConfig`] and [`parse_size`]: configuration and the CLI size parser.
//! - [`CacheHooks`]/[`HookPoint`]: test-only interleaving points.
//! - [`fsx`]: a reusable randomized model checker for any `BlockDev` stack.
//! - [`lincheck`]: a concurrent-history linearizability checker (per 512-byte sector) for any
//!   `BlockDev` stack, with a random-delay wrapper for the layer below.
//!
//! The design goals, each covered by a test named after it in `tests/invariants.rs`:
//! read-your-writes, no lost writes, never zero what was there, no stale mappings after
//! discard/write-zeroes, per-byte write ordering plus honest flush, and durable write-through.
//! See the `cache` module documentation for the state machine and the locking order.

mod bitmap;
mod cache;
mod folio;
pub mod fsx;
pub mod lincheck;

use std::time::Duration;

pub use crate::cache::{CacheStats, FolioCache};

/// Smallest accepted folio size.
pub const MIN_FOLIO_SIZE: u64 = 4 << 10;
/// Largest accepted folio size.
pub const MAX_FOLIO_SIZE: u64 = 2 << 20;
/// Granularity of the uptodate/dirty tracking inside a folio.
pub const SECTOR_SIZE: usize = 512;

/// How the cache is sized and how it writes back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheConfig {
    /// Bytes per folio: a power of two from 4 KiB to 2 MiB.
    pub folio_size: u64,
    /// Upper bound on cached data, in bytes (rounded down to whole folios).
    pub cache_size: u64,
    /// Upper bound on dirty (not yet written back) data, in bytes; at most `cache_size`.
    pub dirty_limit: u64,
    /// Write-back (true) or write-through (false) at start; see [`FolioCache::set_writeback`].
    pub writeback: bool,
    /// Number of background writeback threads (0: dirty data is only written by flushes and by
    /// writers that hit the dirty limit).
    pub flusher_threads: usize,
    /// Dirty data older than about this is written back even below the dirty limit.
    pub writeback_interval: Duration,
    /// Reads and writes of at least this many bytes bypass the cache (streaming I/O): reads
    /// come from the lower layer overlaid with cached data, the whole folios of writes go
    /// straight down. 0 disables the bypass.
    pub bypass_threshold: u64,
    /// Reads bypass the cache from the smaller of this and `bypass_threshold` on (0: from
    /// `bypass_threshold`; none when `bypass_threshold` is 0). The default, 128 KiB, reads 128 KiB streams with one copy (from
    /// the host page cache into the guest's buffers, or none with O_DIRECT) where through the
    /// cache they were copied out of a fill buffer into folios and then to the guest; 64 KiB
    /// reads measured faster still around the cache, but a read that small is as often one
    /// the cache serves again.
    pub read_bypass_threshold: u64,
    /// Writes bypass the cache from the smaller of this and `bypass_threshold` on where the
    /// lower layer says they rewrite what it stores in place through the host page cache
    /// ([`BlockDev::rewrites_in_page_cache`]: every cluster of a buffered qcow2 image
    /// allocated and its own, any range of a raw file); 0, or a `bypass_threshold` of 0, turns
    /// this off. The default, 128 KiB, sends a stream of 128 KiB rewrites down with the copy
    /// into the host page cache only (BENCHMARKS.md, 2026-12-02 17:00 UTC: 0.43-0.53x ->
    /// 0.81-0.82x of qemu-storage-daemon), where through the cache each byte was copied into a
    /// folio, into a merged writeback buffer and then down. Writes that allocate, and every
    /// write of an O_DIRECT image, keep `bypass_threshold` (256 KiB): around the cache, 128 KiB
    /// writes filling a fresh standard-L2 overlay went through the host page cache from every
    /// request thread at once and spun on the file's inode lock (a quarter of the rate of the
    /// cache's writebacks, which merge sequential folios into large direct writes), and 128 KiB
    /// rewrites of an O_DIRECT image each went to the device alone.
    pub rewrite_bypass_threshold: u64,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            folio_size: 64 << 10,
            cache_size: 256 << 20,
            dirty_limit: 64 << 20,
            writeback: true,
            flusher_threads: 1,
            writeback_interval: Duration::from_secs(1),
            bypass_threshold: 256 << 10,
            read_bypass_threshold: 128 << 10,
            rewrite_bypass_threshold: 128 << 10,
        }
    }
}

/// Why [`FolioCache::new`] refused to build a cache.
#[derive(Debug, thiserror::Error)]
pub enum NewCacheError {
    /// The folio size is not a power of two between 4 KiB and 2 MiB.
    #[error("folio size {0} is not a power of two between 4 KiB and 2 MiB")]
    BadFolioSize(u64),
    /// The cache cannot hold a single folio.
    #[error("cache size {cache_size} is smaller than one folio ({folio_size} bytes)")]
    CacheTooSmall { cache_size: u64, folio_size: u64 },
    /// The dirty limit is below one folio or above the cache size.
    #[error("dirty limit {dirty_limit} must be between one folio ({folio_size}) and the cache size ({cache_size})")]
    BadDirtyLimit {
        dirty_limit: u64,
        folio_size: u64,
        cache_size: u64,
    },
    /// The background writeback thread could not be started.
    #[error("cannot start the writeback thread: {0}")]
    SpawnWriteback(#[source] std::io::Error),
}

impl CacheConfig {
    /// Checks the sizes against each other.
    pub fn validate(&self) -> Result<(), NewCacheError> {
        let f = self.folio_size;
        if !f.is_power_of_two() || !(MIN_FOLIO_SIZE..=MAX_FOLIO_SIZE).contains(&f) {
            return Err(NewCacheError::BadFolioSize(f));
        }
        if self.cache_size < f {
            return Err(NewCacheError::CacheTooSmall {
                cache_size: self.cache_size,
                folio_size: f,
            });
        }
        if self.dirty_limit < f || self.dirty_limit > self.cache_size {
            return Err(NewCacheError::BadDirtyLimit {
                dirty_limit: self.dirty_limit,
                folio_size: f,
                cache_size: self.cache_size,
            });
        }
        Ok(())
    }
}

/// Why [`parse_size`] rejected a size string.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ParseSizeError {
    /// Nothing to parse.
    #[error("empty size")]
    Empty,
    /// The text is not `<digits>[K|M|G|T][i][B]`.
    #[error("invalid size {0:?}: expected digits with an optional K, M, G or T suffix")]
    Invalid(String),
    /// The value does not fit in 64 bits.
    #[error("size {0:?} is too large")]
    Overflow(String),
}

/// Parses a byte count such as `4096`, `64K`, `1M`, `256M`, `2G` or `1GiB` (binary multiples).
pub fn parse_size(text: &str) -> Result<u64, ParseSizeError> {
    let t = text.trim();
    if t.is_empty() {
        return Err(ParseSizeError::Empty);
    }
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, suffix) = t.split_at(digits_end);
    if num.is_empty() {
        return Err(ParseSizeError::Invalid(text.to_string()));
    }
    let value: u64 = num
        .parse()
        .map_err(|_| ParseSizeError::Overflow(text.to_string()))?;
    let suffix = suffix.trim();
    let unit = suffix.strip_suffix(['B', 'b']).unwrap_or(suffix);
    let unit = unit.strip_suffix('i').unwrap_or(unit);
    let shift = match unit {
        "" if suffix.is_empty() || suffix.eq_ignore_ascii_case("b") => 0,
        "k" | "K" => 10,
        "m" | "M" => 20,
        "g" | "G" => 30,
        "t" | "T" => 40,
        _ => return Err(ParseSizeError::Invalid(text.to_string())),
    };
    value
        .checked_mul(1u64 << shift)
        .ok_or_else(|| ParseSizeError::Overflow(text.to_string()))
}

/// Places in the cache's state machines where a test can run code to force a racy interleaving.
/// Every hook runs with no cache lock held, on the thread doing the work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HookPoint {
    /// A fill has read the missing sectors from the lower layer and is about to install them.
    AfterFillRead,
    /// Writeback has copied a folio's dirty sectors and is about to write them to the lower layer.
    AfterWritebackSnapshot,
    /// A clean folio has just been evicted.
    AfterEvict,
    /// A discard/write-zeroes or the bypass part of a large write has been registered and is
    /// about to reach the lower layer.
    BeforeLowerZap,
    /// A flush wrote back everything and is about to call the lower layer's flush.
    BeforeLowerFlush,
    /// A read found a discard/write-zeroes or bypassing write of its range in flight and is
    /// about to wait for it to end.
    ReadWaitsForZap,
    /// A planned read (`BlockDev::plan_read`) found no cached folio holding a sector of its
    /// range and is about to ask the lower layer for its plan.
    ReadPlanned,
}

/// Test-only callbacks at the [`HookPoint`]s; `folio_index` is the folio concerned (for
/// `BeforeLowerZap` and `BeforeLowerFlush`, the first folio of the range, or 0).
pub trait CacheHooks: Send + Sync {
    /// Called at `point`.
    fn at(&self, point: HookPoint, folio_index: u64);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_size_accepts_cli_forms_and_rejects_garbage() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64K"), Ok(64 << 10));
        assert_eq!(parse_size("1M"), Ok(1 << 20));
        assert_eq!(parse_size("256M"), Ok(256 << 20));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert_eq!(parse_size("2g"), Ok(2 << 30));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("512B"), Ok(512));
        assert_eq!(parse_size(""), Err(ParseSizeError::Empty));
        assert!(matches!(parse_size("M"), Err(ParseSizeError::Invalid(_))));
        assert!(matches!(parse_size("12X"), Err(ParseSizeError::Invalid(_))));
        assert!(matches!(
            parse_size("1.5G"),
            Err(ParseSizeError::Invalid(_))
        ));
        assert!(matches!(parse_size("-1"), Err(ParseSizeError::Invalid(_))));
        assert!(matches!(
            parse_size("99999999999T"),
            Err(ParseSizeError::Overflow(_))
        ));
        assert!(matches!(
            parse_size("99999999999999999999999"),
            Err(ParseSizeError::Overflow(_))
        ));
    }

    #[test]
    fn config_validation_rejects_inconsistent_sizes() {
        assert!(CacheConfig::default().validate().is_ok());
        let bad_folio = CacheConfig {
            folio_size: 3000,
            ..Default::default()
        };
        assert!(matches!(
            bad_folio.validate(),
            Err(NewCacheError::BadFolioSize(3000))
        ));
        let big_folio = CacheConfig {
            folio_size: 4 << 20,
            ..Default::default()
        };
        assert!(big_folio.validate().is_err());
        let dirty = CacheConfig {
            dirty_limit: 512 << 20,
            ..Default::default()
        };
        assert!(matches!(
            dirty.validate(),
            Err(NewCacheError::BadDirtyLimit { .. })
        ));
        let tiny = CacheConfig {
            cache_size: 1024,
            dirty_limit: 1024,
            ..Default::default()
        };
        assert!(matches!(
            tiny.validate(),
            Err(NewCacheError::CacheTooSmall { .. })
        ));
    }
}
