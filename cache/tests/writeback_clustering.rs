//! Clustered writeback: a writeback whose dirty data reaches the end of its folio takes the
//! following folios along (up to 1 MiB) in one lower write. Two rules keep that safe, each a
//! surviving mutant of the focused `make mutants` run until these tests: a folio whose own
//! writeback is in flight never joins another (two writebacks of one folio in flight could land
//! out of order, an older snapshot last), and a cluster never grows past its buffer.

mod common;

use std::sync::mpsc::channel;
use std::sync::Arc;
use std::thread;

use blockdev::BlockDev;
use cache::{FolioCache, HookPoint};
use common::{gate, pattern, read, small_cfg, FaultyDisk, Io, OnceHook};

const K4: u64 = 4096;

#[test]
fn a_folio_under_writeback_never_joins_another_folios_writeback() {
    let lower = FaultyDisk::new(pattern(1, 0, 64 << 10));
    let (park, parked_rx, go_tx) = gate();
    let hooks = OnceHook::new(HookPoint::AfterWritebackSnapshot, 1);
    hooks.arm(park);
    let cache = FolioCache::with_hooks(
        lower.clone() as Arc<dyn BlockDev>,
        small_cfg(K4, 8, 8),
        hooks,
    )
    .unwrap();
    let (a, b, c) = (
        pattern(2, K4, K4 as usize),
        pattern(3, K4, K4 as usize),
        pattern(4, 0, K4 as usize),
    );
    // W1: folio 1's writeback has snapshotted A and is parked before its lower write.
    cache.write_at(&a, K4).unwrap();
    let c1 = cache.clone();
    let w1 = thread::spawn(move || c1.flush().unwrap());
    parked_rx.recv().unwrap();
    // B completes into folio 1 (dirty again) and C fills folio 0 to its end, so a writeback of
    // folio 0 would like to take folio 1 along.
    cache.write_at(&b, K4).unwrap();
    cache.write_at(&c, 0).unwrap();
    // W2 writes folio 0 back; once its lower write is done, W1 may write A.
    let (w2_tx, w2_rx) = channel();
    lower.at(Io::Write, 0, K4, move || w2_tx.send(()).unwrap());
    let c2 = cache.clone();
    let w2 = thread::spawn(move || c2.flush().unwrap());
    w2_rx.recv().unwrap();
    go_tx.send(()).unwrap();
    w1.join().unwrap();
    w2.join().unwrap();
    cache.flush().unwrap();
    assert_eq!(
        lower.bytes(K4, K4 as usize),
        b,
        "folio 1's older snapshot (A) landed after its newer data (B): it joined folio 0's \
         writeback while its own was in flight"
    );
    cache.drop_clean();
    assert_eq!(read(&*cache, K4, K4 as usize), b);
    assert_eq!(read(&*cache, 0, K4 as usize), c);
}

#[test]
fn clustered_writeback_of_more_than_a_mebibyte_stays_in_bounds_and_writes_everything() {
    // 300 consecutive dirty 4 KiB folios: more than one cluster (256 folios) of them.
    let folios = 300u64;
    let lower = FaultyDisk::new(pattern(1, 0, (folios as usize + 4) * K4 as usize));
    let cache =
        FolioCache::new(lower.clone() as Arc<dyn BlockDev>, small_cfg(K4, 512, 512)).unwrap();
    let data = pattern(6, 0, (folios * K4) as usize);
    for i in 0..folios {
        let at = (i * K4) as usize;
        cache.write_at(&data[at..at + K4 as usize], i * K4).unwrap();
    }
    lower.clear_events();
    cache.flush().unwrap();
    assert_eq!(lower.bytes(0, data.len()), data);
    let writes = lower.writes();
    assert!(
        writes.iter().all(|&(_, len)| len <= 1 << 20),
        "a clustered writeback grew past 1 MiB: {writes:?}"
    );
    assert_eq!(
        writes.iter().map(|&(_, len)| len as u64).sum::<u64>(),
        folios * K4,
        "every dirty byte is written exactly once: {writes:?}"
    );
}
