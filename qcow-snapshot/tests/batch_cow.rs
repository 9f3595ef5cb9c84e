//! Copy-on-write inside a batch of writes (`QcowImage::write_batch`, what the cache's batched
//! writebacks hand down): the clusters a batch assembles go down with the batch, and those next
//! to each other in the file as one write. What must hold: every write of the batch reads back
//! as written; a merged write that fails fails every write it carried, and only those; a batch
//! whose assembly outgrows its arena writes the rest as it goes and loses nothing.

mod common;

use std::sync::Arc;

use blockdev::{BlockDev, MemDisk};
use common::{CrashHost, Op};
use qcow_snapshot::image::COW_ARENA_MAX;
use qcow_snapshot::{create_on, CreateOptions, Format, QcowImage};

const CS: u64 = 65536;

/// A fresh overlay of `size` bytes (64 KiB clusters) over a patterned base, on a recording host.
fn overlay(size: u64, extended_l2: bool) -> (CrashHost, QcowImage, Vec<u8>) {
    let base: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
    let backing: Arc<dyn BlockDev> = Arc::new(MemDisk::from_vec(base.clone()));
    let host = CrashHost::new(Vec::new());
    create_on(
        &host,
        &CreateOptions {
            size,
            cluster_size: CS,
            extended_l2,
            backing: Some(("base.raw".into(), Format::Raw)),
            ..CreateOptions::default()
        },
    )
    .unwrap();
    let img = QcowImage::open_with(Box::new(host.clone()), false, Some(backing)).unwrap();
    (host, img, base)
}

/// The lengths of the writes the host saw after the first `from` operations of its log.
fn write_lens(host: &CrashHost, from: usize) -> Vec<usize> {
    host.log()[from..]
        .iter()
        .filter_map(|op| match op {
            Op::Write { data, .. } => Some(data.len()),
            Op::Sync => None,
        })
        .collect()
}

fn read(img: &QcowImage, off: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0; len];
    img.read_at(&mut b, off).unwrap();
    b
}

/// Runs `writes` as one batch; each must succeed.
fn write_all(img: &QcowImage, writes: &[(Vec<u8>, u64)]) {
    let batch: Vec<(&[u8], u64)> = writes.iter().map(|(b, o)| (&b[..], *o)).collect();
    for (i, r) in img.write_batch(&batch).into_iter().enumerate() {
        r.unwrap_or_else(|e| panic!("write {i}: {e}"));
    }
}

/// `shadow` with `writes` applied.
fn apply(shadow: &mut [u8], writes: &[(Vec<u8>, u64)]) {
    for (b, o) in writes {
        shadow[*o as usize..*o as usize + b.len()].copy_from_slice(b);
    }
}

/// Runs `writes` as one batch, checks each succeeded and that the image reads as `shadow` with
/// the writes applied, then that it reads the same after a flush and a reopen.
fn batch_and_check(host: &CrashHost, img: QcowImage, shadow: &mut [u8], writes: &[(Vec<u8>, u64)]) {
    write_all(&img, writes);
    apply(shadow, writes);
    let size = shadow.len();
    assert!(
        read(&img, 0, size) == shadow,
        "the batch does not read back"
    );
    img.flush().unwrap();
    img.close().unwrap();
    drop(img);
    let backing: Arc<dyn BlockDev> = Arc::new(MemDisk::from_vec(
        (0..size as u64).map(|i| (i % 251) as u8).collect(),
    ));
    let durable = host.crash_image(&mut |_| false);
    let again =
        QcowImage::open_with(Box::new(CrashHost::new(durable)), true, Some(backing)).unwrap();
    assert!(
        read(&again, 0, size) == shadow,
        "the flushed batch does not read back after a reopen"
    );
}

#[test]
fn copy_on_writes_of_a_batch_into_clusters_next_to_each_other_in_the_file_go_down_as_one_write() {
    // Eight 4 KiB writes, each into a fresh cluster of its own (at different offsets in their
    // clusters), are planned in order and get host clusters one after another: their eight
    // assembled clusters are one write of 512 KiB. Nothing else is written before the flush.
    let (host, img, base) = overlay(4 << 20, false);
    let from = host.log().len();
    let writes: Vec<(Vec<u8>, u64)> = (0..8u64)
        .map(|i| (vec![0xa0 + i as u8; 4096], i * 3 * CS + i * 4096))
        .collect();
    write_all(&img, &writes);
    assert_eq!(write_lens(&host, from), vec![8 * CS as usize]);
    let mut shadow = base;
    apply(&mut shadow, &writes);
    batch_and_check(&host, img, &mut shadow, &[]);
}

#[test]
fn a_batch_reads_back_whatever_it_mixes_and_merges_only_what_is_next_to_each_other() {
    // Copy-on-write of whole clusters and of partly covered subclusters, whole subclusters from
    // the caller's buffer, a whole cluster, writes across a cluster boundary, in-place writes:
    // arena pieces next to each other in the arena but not in the file (subcluster runs of
    // different clusters) must not be merged.
    for extended_l2 in [false, true] {
        let size = 4u64 << 20;
        let (host, img, base) = overlay(size, extended_l2);
        let mut shadow = base;
        // Allocated first, so that later writes into it are in place.
        let first = vec![0x11; CS as usize];
        img.write_batch(&[(&first[..], 10 * CS)])[0]
            .as_ref()
            .unwrap();
        shadow[10 * CS as usize..11 * CS as usize].fill(0x11);
        let shapes: [(u64, usize); 11] = [
            (100, 3000),               // partial subclusters at a cluster's start
            (CS + 5000, 1000),         // partial subclusters inside the next cluster
            (2 * CS + 8192, 4096),     // whole subclusters (copy-on-write without)
            (3 * CS - 512, 1024),      // across a cluster boundary
            (5 * CS, CS as usize),     // a whole cluster
            (6 * CS + 7, 9),           // a few bytes
            (7 * CS, 3000),            // a subcluster's start, not its end
            (8 * CS + 1000, 3096),     // a subcluster's end, not its start
            (10 * CS + 4096, 4096),    // in place
            (11 * CS + 60000, 8000),   // across into a fresh cluster
            (size - 4096 + 100, 3996), // the end of the disk
        ];
        let writes: Vec<(Vec<u8>, u64)> = shapes
            .iter()
            .enumerate()
            .map(|(i, &(off, len))| (vec![0x30 + i as u8; len], off))
            .collect();
        write_all(&img, &writes);
        // The arena was sized for all of the batch's copy-on-write.
        assert_eq!(
            img.batch_cow_written_alone(),
            0,
            "extended_l2={extended_l2}"
        );
        apply(&mut shadow, &writes);
        batch_and_check(&host, img, &mut shadow, &[]);
    }
}

#[test]
fn a_failed_merged_write_fails_every_write_it_carried_and_only_those() {
    // Clusters 0 and 1 are copied on write and merged into one 128 KiB write, which fails with
    // EIO: both writes report it, neither is published (the disk still reads the base there),
    // while an in-place write of the same batch succeeds. The same writes again succeed.
    let (host, img, base) = overlay(1 << 20, false);
    let c5 = vec![0x55; CS as usize];
    img.write_batch(&[(&c5[..], 5 * CS)])[0].as_ref().unwrap();
    host.fail_writes_of(Some(2 * CS as usize));
    let (a, b, c) = (vec![0xaa; 4096], vec![0xbb; 4096], vec![0xcc; 4096]);
    let results = img.write_batch(&[(&a[..], 4096), (&b[..], CS + 8192), (&c[..], 5 * CS)]);
    for r in &results[..2] {
        match r {
            Err(blockdev::BlockError::Io(e)) => assert_eq!(e.raw_os_error(), Some(libc::EIO)),
            other => panic!("a write of the failed merged write reported {other:?}"),
        }
    }
    results[2].as_ref().unwrap();
    assert!(read(&img, 0, 2 * CS as usize) == base[..2 * CS as usize]);
    assert!(read(&img, 5 * CS, 4096) == c);
    host.fail_writes_of(None);
    let mut shadow = base;
    shadow[5 * CS as usize..6 * CS as usize].fill(0x55);
    shadow[5 * CS as usize..5 * CS as usize + 4096].fill(0xcc);
    batch_and_check(&host, img, &mut shadow, &[(a, 4096), (b, CS + 8192)]);
}

#[test]
fn a_batch_whose_copy_on_write_outgrows_its_arena_writes_the_rest_as_it_goes() {
    // Two clusters more than the arena holds: those two are written while the batch is
    // assembled, the arena's clusters with the batch (as one write), and all read back.
    let fit = COW_ARENA_MAX / CS as usize;
    let n = fit + 2;
    let size = (n as u64 * CS).next_power_of_two();
    let (host, img, base) = overlay(size, false);
    let from = host.log().len();
    let writes: Vec<(Vec<u8>, u64)> = (0..n as u64)
        .map(|i| (vec![(i % 200) as u8 + 1; 4096], i * CS + 512))
        .collect();
    write_all(&img, &writes);
    assert_eq!(
        write_lens(&host, from),
        vec![CS as usize, CS as usize, fit * CS as usize]
    );
    assert_eq!(img.batch_cow_written_alone(), 2);
    let mut shadow = base;
    apply(&mut shadow, &writes);
    batch_and_check(&host, img, &mut shadow, &[]);
}

#[test]
fn a_failed_merged_write_does_not_fail_a_write_between_its_pieces_that_it_did_not_carry() {
    // A and C are copied on write into clusters next to each other and merged into one write;
    // B, between them in the batch, goes into A's cluster, which A is allocating: it has no
    // piece in the merged write and is written after the batch, alone. The merged write fails:
    // A and C report it, B does not, and B's bytes are on the disk.
    let (host, img, base) = overlay(1 << 20, false);
    host.fail_writes_of(Some(2 * CS as usize));
    let (a, b, c) = (vec![0xaa; 4096], vec![0xbb; 4096], vec![0xcc; 4096]);
    let results = img.write_batch(&[(&a[..], 0), (&b[..], 32768), (&c[..], CS)]);
    assert!(results[0].is_err() && results[2].is_err(), "{results:?}");
    results[1]
        .as_ref()
        .unwrap_or_else(|e| panic!("B failed with the merged write it was not in: {e}"));
    let mut want = base[..2 * CS as usize].to_vec();
    want[32768..36864].fill(0xbb);
    assert!(read(&img, 0, 2 * CS as usize) == want);
}
