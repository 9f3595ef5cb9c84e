//! Deterministic interleaving tests of the second read rule: reads never go back in time. Once a
//! read has returned a value for a sector, a read invoked after it completed must not return a
//! value that was already overwritten before the first read started (`cache::lincheck` checks
//! the same rule at random; this is the interleaving it found).
//!
//! The interleaving: a discard, write-zeroes or bypassing large write R has changed the lower
//! layer and has not yet dropped the cached copies of its range. A read that looked at the cache
//! before a fill installed the old bytes there reads R's result from below; a read that starts
//! after it must not then find the old bytes in the cache. Each step is pinned by a lower layer
//! that parks the request at exactly that point.

mod common;

use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread;

use blockdev::BlockDev;
use cache::{CacheConfig, CacheHooks, FolioCache, HookPoint};
use common::{gate, pattern, read, read_into, small_cfg, FaultyDisk, Io};

const K4: u64 = 4096;
const SECTOR: usize = 512;
/// Eight folios: the racer's range, which bypasses the cache.
const LARGE: usize = 8 * K4 as usize;

/// The requests that change a range below the cache before they drop its cached sectors.
#[derive(Debug, Clone, Copy)]
enum Racer {
    Discard,
    WriteZeroes,
    LargeWrite,
}

impl Racer {
    fn run(self, dev: &dyn BlockDev) {
        match self {
            Racer::Discard => dev.discard(0, LARGE as u64).unwrap(),
            Racer::WriteZeroes => dev.write_zeroes(0, LARGE as u64, false).unwrap(),
            Racer::LargeWrite => dev.write_at(&pattern(77, 0, LARGE), 0).unwrap(),
        }
    }

    /// The lower-layer request at which the racer is parked, once its change is below.
    fn io(self) -> Io {
        match self {
            Racer::Discard | Racer::WriteZeroes => Io::Zap,
            Racer::LargeWrite => Io::Write,
        }
    }

    fn result(self, off: u64) -> Vec<u8> {
        match self {
            Racer::Discard | Racer::WriteZeroes => vec![0; SECTOR],
            Racer::LargeWrite => pattern(77, off, SECTOR),
        }
    }
}

/// What the last read does: read the one sector (through the folio), the same through
/// `read_into` (the request path's read into guest memory, which copies a hit straight from
/// the folio), or the whole range (bypassing the cache, overlaying its uptodate sectors).
#[derive(Debug, Clone, Copy)]
enum LastRead {
    Small,
    SmallInto,
    Large,
}

/// Reports when a read is about to wait for a zap of its range.
#[derive(Default)]
struct WaitReporter {
    tx: Mutex<Option<Sender<Event>>>,
}

impl CacheHooks for WaitReporter {
    fn at(&self, point: HookPoint, folio: u64) {
        if point == HookPoint::ReadWaitsForZap {
            if let Some(tx) = &*self.tx.lock().unwrap() {
                let _ = tx.send(Event::Waiting(folio));
            }
        }
    }
}

enum Event {
    /// The read is waiting; the hook named this folio.
    Waiting(u64),
    Done(Vec<u8>),
}

/// A one-shot lower-layer hook that reports it was reached, then waits to be released.
fn park(lower: &FaultyDisk, io: Io, offset: u64, len: u64) -> (Receiver<()>, Sender<()>) {
    let (hook, reached, go) = gate();
    lower.at(io, offset, len, hook);
    (reached, go)
}

fn no_read_goes_back_in_time(racer: Racer, last: LastRead) {
    let lower = FaultyDisk::new(pattern(1, 0, 64 << 10));
    let hooks = Arc::new(WaitReporter::default());
    let cfg = CacheConfig {
        bypass_threshold: 4 * K4,
        read_bypass_threshold: 0,
        ..small_cfg(K4, 16, 8)
    };
    let cache =
        FolioCache::with_hooks(lower.clone() as Arc<dyn BlockDev>, cfg, hooks.clone()).unwrap();
    let hot = K4 + 3 * SECTOR as u64;
    let old = pattern(1, hot, SECTOR);

    // F, a small read of the hot sector, has read the old bytes from below and not yet
    // installed them.
    let (f_reached, f_go) = park(&lower, Io::Read, hot, SECTOR as u64);
    let c = cache.clone();
    let f = thread::spawn(move || read(&*c, hot, SECTOR));
    f_reached.recv().unwrap();

    // R1, a large read, looks at the cache (the hot sector is missing) and is parked just
    // before its lower read.
    let (r1_reached, r1_go) = park(&lower, Io::ReadStart, 0, LARGE as u64);
    let c = cache.clone();
    let r1 = thread::spawn(move || read(&*c, 0, LARGE));
    r1_reached.recv().unwrap();

    // F installs the old bytes (nothing changed the range yet, so rightly).
    f_go.send(()).unwrap();
    assert_eq!(f.join().unwrap(), old);

    // The racer changes the lower layer and is parked before it drops the cached sectors.
    let (z_reached, z_go) = park(&lower, racer.io(), 0, LARGE as u64);
    let c = cache.clone();
    let z = thread::spawn(move || racer.run(&*c));
    z_reached.recv().unwrap();

    // R1 reads from below: the racer's bytes.
    r1_go.send(()).unwrap();
    let first = r1.join().unwrap();
    let at = hot as usize;
    assert_eq!(
        first[at..at + SECTOR],
        racer.result(hot)[..],
        "{racer:?}: the first read did not see the racer's bytes from below"
    );

    // R2 starts after R1 completed: it must not return the old bytes.
    let (tx, rx) = channel();
    *hooks.tx.lock().unwrap() = Some(tx.clone());
    let c = cache.clone();
    let r2 = thread::spawn(move || {
        let got = match last {
            LastRead::Small => read(&*c, hot, SECTOR),
            LastRead::SmallInto => read_into(&*c, hot, SECTOR),
            LastRead::Large => read(&*c, 0, LARGE)[at..at + SECTOR].to_vec(),
        };
        tx.send(Event::Done(got.clone())).unwrap();
        got
    });
    let got = match rx.recv().unwrap() {
        Event::Done(got) => got,
        Event::Waiting(folio) => {
            let first = match last {
                LastRead::Small | LastRead::SmallInto => hot / K4,
                LastRead::Large => 0,
            };
            assert_eq!(folio, first, "the hook names the read's first folio");
            z_go.send(()).unwrap();
            r2.join().unwrap()
        }
    };
    assert!(
        got != old,
        "{racer:?}, {last:?} read: a read invoked after another read returned the {racer:?}'s \
         bytes returned the older bytes still cached (it went back in time)"
    );
    assert_eq!(got, racer.result(hot), "{racer:?}, {last:?} read");
    let _ = z_go.send(());
    z.join().unwrap();
}

#[test]
fn a_small_read_after_a_read_that_saw_a_bypassing_write_never_sees_older_cached_bytes() {
    no_read_goes_back_in_time(Racer::LargeWrite, LastRead::Small);
}

#[test]
fn a_large_read_after_a_read_that_saw_a_bypassing_write_never_sees_older_cached_bytes() {
    no_read_goes_back_in_time(Racer::LargeWrite, LastRead::Large);
}

#[test]
fn reads_after_a_read_that_saw_a_discard_never_see_older_cached_bytes() {
    no_read_goes_back_in_time(Racer::Discard, LastRead::Small);
    no_read_goes_back_in_time(Racer::Discard, LastRead::Large);
}

#[test]
fn reads_after_a_read_that_saw_write_zeroes_never_see_older_cached_bytes() {
    no_read_goes_back_in_time(Racer::WriteZeroes, LastRead::Small);
    no_read_goes_back_in_time(Racer::WriteZeroes, LastRead::Large);
}

#[test]
fn a_cache_hit_copied_straight_into_guest_memory_never_goes_back_in_time() {
    no_read_goes_back_in_time(Racer::LargeWrite, LastRead::SmallInto);
    no_read_goes_back_in_time(Racer::Discard, LastRead::SmallInto);
    no_read_goes_back_in_time(Racer::WriteZeroes, LastRead::SmallInto);
}
