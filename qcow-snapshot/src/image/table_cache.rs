//! The metadata table cache: one generic LRU ([`get_or_load`]) shared by the cached L2 tables
//! ([`CachedL2`]) and the cached refcount blocks ([`CachedBlock`]). Dirty tables are never
//! evicted; they stay until a flush writes them.
//!
//! Locking: the caches live in `Meta` and are only touched with the `meta` lock held (see the
//! parent module).

use super::*;

pub(super) struct CachedL2 {
    pub(super) entries: Vec<u64>,
    pub(super) dirty: bool,
    pub(super) used: u64,
}

pub(super) struct CachedBlock {
    pub(super) data: Vec<u8>,
    pub(super) dirty: bool,
    pub(super) used: u64,
}

/// A cached metadata table as the LRU sees it.
pub(super) trait CacheEntry {
    /// Whether the table differs from disk (dirty tables are never evicted).
    fn is_dirty(&self) -> bool;
    /// The tick of the last lookup.
    fn last_used(&self) -> u64;
    fn set_used(&mut self, tick: u64);
}

/// Both cached table kinds keep their LRU state in `dirty` and `used` fields.
macro_rules! cache_entry {
    ($($t:ty),*) => {$(
        impl CacheEntry for $t {
            fn is_dirty(&self) -> bool {
                self.dirty
            }
            fn last_used(&self) -> u64 {
                self.used
            }
            fn set_used(&mut self, tick: u64) {
                self.used = tick;
            }
        }
    )*};
}
cache_entry!(CachedL2, CachedBlock);

/// The table at host offset `off`, loaded with `load` on a miss. When the cache holds `cap`
/// tables, a miss first evicts the least recently used clean one (a cache of only dirty tables
/// grows until the next flush). Every lookup advances `tick` and stamps the table with it.
/// `what` names the cache in the error a vanished entry would give.
pub(super) fn get_or_load<'a, T: CacheEntry>(
    cache: &'a mut HashMap<u64, T>,
    cap: usize,
    tick: &mut u64,
    off: u64,
    what: &str,
    load: impl FnOnce() -> Result<T>,
) -> Result<&'a mut T> {
    if !cache.contains_key(&off) {
        if cache.len() >= cap {
            if let Some(victim) = cache
                .iter()
                .filter(|(_, t)| !t.is_dirty())
                .min_by_key(|(_, t)| t.last_used())
                .map(|(k, _)| *k)
            {
                cache.remove(&victim);
            }
        }
        let t = load()?;
        cache.insert(off, t);
    }
    *tick += 1;
    let t = cache.get_mut(&off).ok_or_else(|| corrupt(what.into()))?;
    t.set_used(*tick);
    Ok(t)
}
