//! The buffers the cache hands to its lower layer are aligned for direct I/O: an O_DIRECT
//! image below (`--direct on`) takes them without a bounce copy. For every lower read and
//! write at a sector-aligned offset, the buffer's address is sector-aligned too (the cache's
//! fill and writeback buffers start on a page).

mod common;

use std::sync::{Arc, Mutex};

use blockdev::{BlockDev, MemDisk, Result};
use cache::{CacheConfig, FolioCache};
use common::{pattern, read, read_into};

const SECTOR: usize = 512;

/// A disk that remembers every lower call whose buffer is misaligned for its offset.
struct AlignmentWitness {
    inner: MemDisk,
    calls: Mutex<usize>,
    misaligned: Mutex<Vec<(&'static str, u64, usize)>>,
    /// Writes at page offsets whose memory does not start on a page.
    off_page: Mutex<Vec<(u64, usize)>>,
}

impl AlignmentWitness {
    fn check(&self, what: &'static str, ptr: *const u8, offset: u64) {
        *self.calls.lock().unwrap() += 1;
        if offset.is_multiple_of(SECTOR as u64) && !(ptr as usize).is_multiple_of(SECTOR) {
            self.misaligned
                .lock()
                .unwrap()
                .push((what, offset, ptr as usize % 4096));
        }
    }
}

impl BlockDev for AlignmentWitness {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.check("read", buf.as_ptr(), offset);
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check("write", buf.as_ptr(), offset);
        if offset.is_multiple_of(4096) && !(buf.as_ptr() as usize).is_multiple_of(4096) {
            self.off_page
                .lock()
                .unwrap()
                .push((offset, buf.as_ptr() as usize % 4096));
        }
        self.inner.write_at(buf, offset)
    }
    fn flush(&self) -> Result<()> {
        Ok(())
    }
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.inner.discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        self.inner.write_zeroes(offset, len, unmap)
    }
}

/// A cache of `cache_size` bytes in 64 KiB folios (half of it may be dirty, no flusher) over a
/// 4 MiB witness.
fn witnessed_cache(cache_size: u64) -> (Arc<AlignmentWitness>, Arc<FolioCache>) {
    let lower = Arc::new(AlignmentWitness {
        inner: MemDisk::from_vec(pattern(1, 0, 4 << 20)),
        calls: Mutex::new(0),
        misaligned: Mutex::new(Vec::new()),
        off_page: Mutex::new(Vec::new()),
    });
    let cfg = CacheConfig {
        folio_size: 64 << 10,
        cache_size,
        dirty_limit: cache_size / 2,
        flusher_threads: 0,
        ..CacheConfig::default()
    };
    let cache = FolioCache::new(lower.clone() as Arc<dyn BlockDev>, cfg).unwrap();
    (lower, cache)
}

#[test]
fn fills_and_writebacks_reach_the_lower_layer_in_sector_aligned_memory() {
    let (lower, cache) = witnessed_cache(1 << 20);
    // Partial-sector writes (head and tail fills), whole sectors at odd places, writes that
    // span folios, enough of them to force writebacks under the dirty limit, reads that miss.
    for i in 0..48u64 {
        let off = i * 83 * SECTOR as u64 + (i % 3) * 100;
        cache
            .write_at(&pattern(2, off, 1500 + (i as usize % 5) * SECTOR), off)
            .unwrap();
        let r = (i * 7919 * SECTOR as u64) % (4 << 20) / 2;
        let _ = read(&*cache, r - r % SECTOR as u64, 3 * SECTOR);
        let _ = read_into(&*cache, r / 3 - (r / 3) % SECTOR as u64, 9000);
    }
    cache.flush().unwrap();
    assert!(
        *lower.calls.lock().unwrap() > 48,
        "the lower layer saw too little"
    );
    let bad = lower.misaligned.lock().unwrap().clone();
    assert!(
        bad.is_empty(),
        "lower calls at sector offsets in unaligned memory (kind, offset, address % 4096): \
         {bad:?}"
    );
}

/// A folio's memory starts on a page, so the writeback of a folio alone (which goes down from
/// it) of page-aligned data can go to an O_DIRECT file as it is (`--direct large` sends a
/// flush's page-aligned writebacks direct only from page-aligned memory).
#[test]
fn a_folio_written_back_alone_goes_down_from_page_aligned_memory() {
    let (lower, cache) = witnessed_cache(2 << 20);
    for i in 0..16u64 {
        // 4 KiB at a different page of every other folio.
        let off = i * (128 << 10) + (i % 16) * 4096;
        cache.write_at(&pattern(3, off, 4096), off).unwrap();
    }
    cache.flush().unwrap();
    assert_eq!(*lower.calls.lock().unwrap(), 16);
    let bad = lower.off_page.lock().unwrap().clone();
    assert!(
        bad.is_empty(),
        "writebacks at page offsets from memory off a page (offset, address % 4096): {bad:?}"
    );
}
