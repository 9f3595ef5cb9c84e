//! A flush of many dirty folios writes them back on several threads at once, so that a slow
//! lower write (a copy-on-write that reads its backing file) does not hold up all the others.

use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use blockdev::{BlockDev, MemDisk, Result};
use cache::{CacheConfig, FolioCache};

/// A lower layer whose writes wait (up to a timeout) until `want` of them are inside at once,
/// and which records the highest number it saw (after one timeout, writes stop waiting).
struct Rendezvous {
    disk: MemDisk,
    want: usize,
    state: Mutex<(usize, usize, bool)>,
    cv: Condvar,
}

impl BlockDev for Rendezvous {
    fn size(&self) -> u64 {
        self.disk.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.disk.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        let mut st = self.state.lock().unwrap();
        st.0 += 1;
        st.1 = st.1.max(st.0);
        self.cv.notify_all();
        let (mut st, t) = self
            .cv
            .wait_timeout_while(st, Duration::from_secs(5), |s| s.1 < self.want && !s.2)
            .unwrap();
        st.2 |= t.timed_out();
        st.0 -= 1;
        drop(st);
        self.disk.write_at(buf, offset)
    }
    fn flush(&self) -> Result<()> {
        Ok(())
    }
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.disk.discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        self.disk.write_zeroes(offset, len, unmap)
    }
}

#[test]
fn a_flush_of_many_dirty_folios_writes_them_back_concurrently_and_completely() {
    let folio = 4096u64;
    let folios = 256u64;
    let lower = Arc::new(Rendezvous {
        disk: MemDisk::new((folio * folios) as usize),
        want: 4,
        state: Mutex::new((0, 0, false)),
        cv: Condvar::new(),
    });
    let cfg = CacheConfig {
        folio_size: folio,
        cache_size: folio * folios,
        dirty_limit: folio * folios,
        flusher_threads: 0,
        writeback_interval: Duration::from_secs(3600),
        ..CacheConfig::default()
    };
    let c = FolioCache::new(lower.clone(), cfg).unwrap();
    // One sector at the start of every folio: no writeback can merge two folios.
    for i in 0..folios {
        c.write_at(&[i as u8 + 1; 512], i * folio).unwrap();
    }
    c.flush().unwrap();
    let seen = lower.state.lock().unwrap().1;
    assert!(
        seen >= lower.want,
        "the flush had at most {seen} writebacks in flight at once"
    );
    for i in 0..folios {
        let mut b = [0u8; 512];
        lower.disk.read_at(&mut b, i * folio).unwrap();
        assert_eq!(b, [i as u8 + 1; 512], "folio {i} was not written back");
    }
}
