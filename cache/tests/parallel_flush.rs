//! A flush of many dirty folios whose writebacks wait (a copy-on-write that reads its backing
//! file, an O_DIRECT write) writes them back on several threads at once, so that one slow lower
//! write does not hold up all the others; a flush whose writebacks never wait (they only copy
//! into a page cache, however long that takes) stays on the flushing thread, since starting
//! threads would cost more than it saves.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::thread::ThreadId;
use std::time::Duration;

use blockdev::{BlockDev, MemDisk, Result};
use cache::{CacheConfig, FolioCache};

/// How a lower write of [`Recording`] takes its time.
#[derive(Clone, Copy)]
enum Cost {
    /// At once (a copy into a page cache).
    None,
    /// Sleeps this long (a write that waits for the device).
    Sleep(Duration),
    /// Spins this long without sleeping (a long copy on a busy CPU).
    Spin(Duration),
}

/// A lower layer that records which threads wrote and the most writes it had inside at once,
/// each write taking its time as `cost` says.
struct Recording {
    disk: MemDisk,
    cost: Cost,
    /// (writes inside now, most inside at once, the threads that wrote).
    state: Mutex<(usize, usize, HashSet<ThreadId>)>,
}

impl BlockDev for Recording {
    fn size(&self) -> u64 {
        self.disk.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.disk.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        {
            let mut st = self.state.lock().unwrap();
            st.0 += 1;
            st.1 = st.1.max(st.0);
            st.2.insert(std::thread::current().id());
        }
        match self.cost {
            Cost::None => {}
            Cost::Sleep(d) => std::thread::sleep(d),
            Cost::Spin(d) => {
                let until = std::time::Instant::now() + d;
                while std::time::Instant::now() < until {
                    std::hint::spin_loop();
                }
            }
        }
        let r = self.disk.write_at(buf, offset);
        self.state.lock().unwrap().0 -= 1;
        r
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

const FOLIO: u64 = 4096;
const FOLIOS: u64 = 256;

/// Dirties one sector at the start of every folio (no writeback can merge two folios: 256
/// runs), flushes, checks that every folio reached the lower layer, and returns the most
/// writes the lower layer had at once and how many threads wrote.
fn flush_runs(cost: Cost) -> (usize, usize) {
    let lower = Arc::new(Recording {
        disk: MemDisk::new((FOLIO * FOLIOS) as usize),
        cost,
        state: Mutex::new((0, 0, HashSet::new())),
    });
    let cfg = CacheConfig {
        folio_size: FOLIO,
        cache_size: FOLIO * FOLIOS,
        dirty_limit: FOLIO * FOLIOS,
        flusher_threads: 0,
        writeback_interval: Duration::from_secs(3600),
        ..CacheConfig::default()
    };
    let c = FolioCache::new(lower.clone(), cfg).unwrap();
    for i in 0..FOLIOS {
        c.write_at(&[i as u8 + 1; 512], i * FOLIO).unwrap();
    }
    c.flush().unwrap();
    for i in 0..FOLIOS {
        let mut b = [0u8; 512];
        lower.disk.read_at(&mut b, i * FOLIO).unwrap();
        assert_eq!(b, [i as u8 + 1; 512], "folio {i} was not written back");
    }
    let st = lower.state.lock().unwrap();
    (st.1, st.2.len())
}

#[test]
fn a_flush_of_many_dirty_folios_whose_writebacks_wait_writes_them_back_concurrently_and_completely()
{
    let (at_once, threads) = flush_runs(Cost::Sleep(Duration::from_millis(1)));
    assert!(
        at_once >= 4,
        "the flush had at most {at_once} writebacks in flight at once ({threads} threads)"
    );
}

#[test]
fn a_flush_whose_writebacks_never_wait_writes_them_back_on_the_flushing_thread_alone() {
    let (at_once, threads) = flush_runs(Cost::None);
    assert_eq!(
        (at_once, threads),
        (1, 1),
        "writebacks that never sleep started helper threads"
    );
}

#[test]
fn a_flush_whose_writebacks_are_slow_without_waiting_stays_on_the_flushing_thread() {
    // Each writeback far slower than `FLUSH_SLOW_RUN`, but busy, not waiting: more threads
    // would only compete for the same CPUs.
    let (at_once, threads) = flush_runs(Cost::Spin(Duration::from_micros(200)));
    assert_eq!(
        (at_once, threads),
        (1, 1),
        "writebacks that were slow but never slept started helper threads"
    );
}
