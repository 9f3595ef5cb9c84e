//! A writeback goes down from the folio's own memory (a group of several folios from one merged
//! copy), not from a snapshot copy; whatever changes a folio while a writeback writes from its
//! memory (a write, a fill) moves the folio to a copy of its own first. So the bytes the lower
//! layer is handed never change under it, writes to a byte still reach it in completion order,
//! and only a change that races a writeback pays a copy.

mod common;

use std::sync::Arc;

use blockdev::BlockDev;
use common::*;

const K4: u64 = 4096;

/// The bytes from `offset` on of every lower write that covered `offset`, in order.
fn writes_at(lower: &Arc<FaultyDisk>, offset: u64) -> Vec<Vec<u8>> {
    lower
        .events()
        .into_iter()
        .filter_map(|e| match e {
            Event::Write { offset: o, data } if o <= offset && offset < o + data.len() as u64 => {
                Some(data[(offset - o) as usize..].to_vec())
            }
            _ => None,
        })
        .collect()
}

#[test]
fn a_write_into_a_folio_while_its_writeback_is_below_moves_it_to_a_copy_and_the_writeback_keeps_the_old_bytes(
) {
    for flush in [true, false] {
        let lower = FaultyDisk::new(vec![0; 16 * K4 as usize]);
        let cache = cache_over(&lower, small_cfg(K4, 16, 16));
        cache.write_at(&[0x11; K4 as usize], 2 * K4).unwrap();
        let c = cache.clone();
        lower.at(Io::WriteStart, 2 * K4, K4, move || {
            // The lower layer holds the writeback's buffer now: change the same bytes.
            c.write_at(&[0x22; 512], 2 * K4 + 512).unwrap();
        });
        if flush {
            cache.flush().unwrap();
        } else {
            cache.write_back().unwrap();
        }
        assert!(lower.after_read_fired(), "the hook did not run");
        let first = writes_at(&lower, 2 * K4);
        assert_eq!(first.len(), 1);
        assert_eq!(
            &first[0][..K4 as usize],
            &[0x11; K4 as usize][..],
            "the writeback's bytes changed under it (flush: {flush})"
        );
        assert_eq!(cache.stats().cow_copies, 1, "flush: {flush}");
        let mut newest = vec![0x11; K4 as usize];
        newest[512..1024].fill(0x22);
        assert_eq!(read(&*cache, 2 * K4, K4 as usize), newest);
        cache.flush().unwrap();
        assert_eq!(lower.bytes(2 * K4, K4 as usize), newest);
        assert_eq!(
            writes_at(&lower, 2 * K4 + 512)
                .last()
                .map(|w| w[..512].to_vec()),
            Some(vec![0x22; 512])
        );
    }
}

#[test]
fn a_write_into_one_folio_of_a_merged_writeback_leaves_the_merged_bytes_as_they_were() {
    let lower = FaultyDisk::new(vec![0; 16 * K4 as usize]);
    let cache = cache_over(&lower, small_cfg(K4, 16, 16));
    // From the third sector of a folio to the third sector of the folio after the next: one
    // group, whose first run starts and last run ends mid-folio.
    let (at, len) = (4 * K4 + 1024, 2 * K4 as usize);
    cache.write_at(&pattern(3, at, len), at).unwrap();
    let c = cache.clone();
    lower.at(Io::WriteStart, 4 * K4, 3 * K4, move || {
        c.write_at(&[0x44; 512], 5 * K4).unwrap();
    });
    cache.flush().unwrap();
    let first = writes_at(&lower, at);
    assert_eq!(
        first.len(),
        1,
        "three touching folios went down in one write"
    );
    assert_eq!(first[0], pattern(3, at, len));
    let stats = cache.stats();
    assert_eq!(
        stats.merged_bytes, len as u64,
        "a group's dirty bytes are merged once"
    );
    // The merged copy already holds the bytes: the write changed the folio's own memory.
    assert_eq!(stats.cow_copies, 0);
    cache.flush().unwrap();
    assert_eq!(lower.bytes(5 * K4, 512), vec![0x44; 512]);
}

#[test]
fn a_fill_into_a_folio_while_its_writeback_is_below_moves_it_to_a_copy() {
    let base = pattern(7, 0, 16 * K4 as usize);
    let lower = FaultyDisk::new(base.clone());
    let cache = cache_over(&lower, small_cfg(16 * K4, 4, 4));
    // One dirty sector in a 64 KiB folio; the rest of it is not in the cache.
    cache.write_at(&[0x55; 512], 0).unwrap();
    let c = cache.clone();
    let got = Arc::new(std::sync::Mutex::new(Vec::new()));
    let g = got.clone();
    lower.at(Io::WriteStart, 0, 512, move || {
        // A read of the folio's other sectors fills them while the writeback is below.
        *g.lock().unwrap() = read(&*c, 8 * K4, K4 as usize);
    });
    cache.flush().unwrap();
    assert_eq!(
        &got.lock().unwrap()[..],
        &base[8 * K4 as usize..9 * K4 as usize]
    );
    assert_eq!(writes_at(&lower, 0)[0][..512], [0x55; 512]);
    assert_eq!(cache.stats().cow_copies, 1);
    let mut expected = base.clone();
    expected[..512].fill(0x55);
    assert_eq!(read(&*cache, 0, 16 * K4 as usize), expected);
}

#[test]
fn a_folio_written_back_alone_is_not_copied() {
    let lower = FaultyDisk::new(vec![0; 64 * K4 as usize]);
    let cache = cache_over(&lower, small_cfg(K4, 64, 64));
    // Every other folio: no two merge.
    for i in (0..64u64).step_by(2) {
        cache
            .write_at(&pattern(i as u8, i * K4, 1024), i * K4)
            .unwrap();
    }
    cache.flush().unwrap();
    for i in (0..64u64).step_by(2) {
        cache
            .write_at(&pattern(i as u8 + 1, i * K4, 512), i * K4 + 2048)
            .unwrap();
        cache.write_back().unwrap();
    }
    let stats = cache.stats();
    assert_eq!((stats.merged_bytes, stats.cow_copies), (0, 0));
    assert_eq!(stats.writebacks, 64);
    for i in (0..64u64).step_by(2) {
        assert_eq!(lower.bytes(i * K4, 1024), pattern(i as u8, i * K4, 1024));
        assert_eq!(
            lower.bytes(i * K4 + 2048, 512),
            pattern(i as u8 + 1, i * K4, 512)
        );
    }
}
