//! `plan_read` of the qcow2 engine (the io_uring read path executes plans after every lock is
//! released): an overlay plans its backing file, zeros and, from a file that offers
//! descriptions for it, its own data clusters, which a flush may free and an allocation reuse
//! for another guest cluster: the plan pins them, and a freed cluster waits until no plan from
//! before its free is left.

mod common;

use std::sync::Arc;

use blockdev::{BlockDev, PlanSource, RawFile};
use common::*;
use qcow_snapshot::{create_on, open_qcow2, CreateOptions, Format, MemHost, QcowImage};

const CS: u64 = 65536;
const SIZE: u64 = 16 * CS;

#[test]
fn an_overlay_plans_its_backing_and_zeros_and_its_own_clusters_only_from_a_file_offering_them() {
    let dir = tmp();
    // The base is shorter than the overlay: its last 2 clusters read as zeros.
    let base_data = random_bytes(7, (SIZE - 2 * CS) as usize);
    let base = dir.path().join("base.raw");
    std::fs::write(&base, &base_data).unwrap();
    let backing: Arc<dyn BlockDev> = Arc::new(RawFile::open(&base, true).unwrap());
    let host = Arc::new(MemHost::default());
    let opts = CreateOptions {
        size: SIZE,
        cluster_size: CS,
        backing: Some(("base.raw".into(), Format::Raw)),
        ..CreateOptions::default()
    };
    create_on(&*host, &opts).unwrap();
    let img = QcowImage::open_with(Box::new(Arc::clone(&host)), false, Some(backing)).unwrap();

    // Unallocated: the base file itself, one piece across clusters, then zeros past its end.
    let plan = img
        .plan_read(CS / 2, SIZE - CS / 2)
        .expect("unallocated range is planned");
    assert!(matches!(plan.pieces[0].1, PlanSource::File { offset, .. } if offset == CS / 2));
    assert_eq!(plan.pieces.len(), 2, "{plan:?}");
    let mut want = base_data[(CS / 2) as usize..].to_vec();
    want.resize((SIZE - CS / 2) as usize, 0);
    assert_same(&plan.read_all().unwrap(), &want, "planned bytes");
    assert!(
        plan.holds.is_empty(),
        "a plan naming no own cluster pins nothing"
    );

    // Written (allocated in the overlay) in a file that names no description for planned
    // reads (memory): not planned, nor any range that touches it, before and after a flush.
    img.write_at(&[0xab; 4096], 3 * CS).unwrap();
    assert!(img.plan_read(3 * CS, 4096).is_none());
    assert!(img.plan_read(2 * CS, 2 * CS).is_none());
    img.flush().unwrap();
    assert!(img.plan_read(3 * CS, CS).is_none());

    // Zeroed over a backing file: planned as zeros, not as the base's bytes.
    img.write_zeroes(5 * CS, CS, false).unwrap();
    let plan = img
        .plan_read(5 * CS, CS)
        .expect("a zero cluster is planned");
    assert!(
        matches!(plan.pieces[..], [(n, PlanSource::Zero)] if n == CS),
        "{plan:?}"
    );

    // Out of range or empty: no plan (the synchronous path reports the error).
    assert!(img.plan_read(SIZE - 512, 1024).is_none());
    assert!(img.plan_read(0, 0).is_none());
}

/// The host offset a one-piece plan of `[off, off + len)` reads from (the range must be one
/// data extent of the image's file).
fn planned_host_offset(img: &QcowImage, off: u64, len: u64) -> u64 {
    let plan = img
        .plan_read(off, len)
        .expect("an allocated cluster is planned");
    match plan.pieces[..] {
        [(n, PlanSource::File { offset, .. })] if n == len => offset,
        _ => panic!("not one file piece: {plan:?}"),
    }
}

#[test]
fn a_planned_read_of_an_own_cluster_reads_what_it_named_even_after_a_free_and_a_new_allocation() {
    let dir = tmp();
    let path = qemu_create(dir.path(), "o.qcow2", "cluster_size=65536", "1M", &[]);
    let img = open_qcow2(&path, false).unwrap();
    let a = random_bytes(1, CS as usize);
    img.write_at(&a, 0).unwrap();
    img.flush().unwrap();
    let h0 = planned_host_offset(&img, 0, CS);
    // Within the cluster, not at its start: the pin is on the cluster all the same.
    let plan = img.plan_read(4096, 8192).unwrap();
    let part = &a[4096..12288];
    assert_eq!(plan.holds.len(), 1, "a plan of an own cluster holds a pin");
    assert_same(&plan.read_all().unwrap(), part, "planned bytes");

    // The interleaving the io_uring path allows between a plan and its execution: the guest
    // cluster is discarded, flushes free its host cluster, and a new allocation would take it.
    img.discard(0, CS).unwrap();
    img.flush().unwrap();
    img.flush().unwrap();
    let b = random_bytes(2, CS as usize);
    img.write_at(&b, 5 * CS).unwrap();
    img.flush().unwrap();
    assert_ne!(
        planned_host_offset(&img, 5 * CS, CS),
        h0,
        "a cluster a live plan names was reused"
    );
    assert_same(
        &plan.read_all().unwrap(),
        part,
        "the plan read another guest cluster's data",
    );

    // Once the plan is gone, the next flush frees the cluster and it is reused.
    drop(plan);
    img.flush().unwrap();
    img.write_at(&random_bytes(3, CS as usize), 6 * CS).unwrap();
    assert_eq!(
        planned_host_offset(&img, 6 * CS, CS),
        h0,
        "the free never came"
    );
    img.close().unwrap();
    drop(img);
    qemu_check(&path);
}

#[test]
fn a_live_plan_holds_back_exactly_the_clusters_it_names() {
    let dir = tmp();
    let path = qemu_create(dir.path(), "o.qcow2", "cluster_size=65536", "1M", &[]);
    let img = open_qcow2(&path, false).unwrap();
    // Host clusters in this order: guest cluster 2's, then 0's, then 3's.
    for (gc, seed) in [(2, 11), (0, 12), (3, 13)] {
        img.write_at(&random_bytes(seed, CS as usize), gc * CS)
            .unwrap();
        img.flush().unwrap();
    }
    let (h2, h0, h3) = (
        planned_host_offset(&img, 2 * CS, CS),
        planned_host_offset(&img, 0, CS),
        planned_host_offset(&img, 3 * CS, CS),
    );
    assert!(h2 < h0 && h0 < h3, "{h2:#x} {h0:#x} {h3:#x}");
    let plan = img.plan_read(0, CS).unwrap();
    // The clusters on either side of the pinned one are freed and reused at once.
    img.discard(2 * CS, CS).unwrap();
    img.discard(3 * CS, CS).unwrap();
    img.flush().unwrap();
    img.flush().unwrap();
    img.write_at(&random_bytes(14, CS as usize), 7 * CS)
        .unwrap();
    img.write_at(&random_bytes(15, CS as usize), 8 * CS)
        .unwrap();
    let mut reused = [
        planned_host_offset(&img, 7 * CS, CS),
        planned_host_offset(&img, 8 * CS, CS),
    ];
    reused.sort_unstable();
    assert_eq!(
        reused,
        [h2, h3],
        "a cluster the plan does not name was held back"
    );
    assert_same(
        &plan.read_all().unwrap(),
        &random_bytes(12, CS as usize),
        "planned bytes",
    );
}

#[test]
fn a_short_random_read_of_an_own_cluster_the_page_cache_does_not_hold_is_offered_o_direct() {
    let dir = tmp();
    let path = qemu_create(dir.path(), "o.qcow2", "cluster_size=65536", "1M", &[]);
    let data = random_bytes(4, 4 * CS as usize);
    let img = open_qcow2(&path, false).unwrap();
    img.write_at(&data, 2 * CS).unwrap();
    img.flush().unwrap();
    let direct_of =
        |img: &QcowImage, off: u64, len: u64| match &img.plan_read(off, len).unwrap().pieces[..] {
            [(_, PlanSource::File { direct, .. })] => direct.is_some(),
            p => panic!("not one file piece: {p:?}"),
        };
    // Just written through the host page cache: read from there.
    assert!(
        !direct_of(&img, 3 * CS, 4096),
        "cached pages are read buffered"
    );
    let f = std::fs::File::open(&path).unwrap();
    // SAFETY: fadvise on a valid descriptor with plain integer arguments.
    let r = unsafe {
        libc::posix_fadvise(
            std::os::fd::AsRawFd::as_raw_fd(&f),
            0,
            0,
            libc::POSIX_FADV_DONTNEED,
        )
    };
    assert_eq!(r, 0);
    let cold = direct_of(&img, 2 * CS + 8192, 4096);
    if blockdev::DirectReads::open(&f).is_none() {
        eprintln!("no O_DIRECT on this file system: only the buffered description is checked");
        assert!(!cold);
    } else {
        assert!(
            cold,
            "a cold random read of an own cluster is not offered O_DIRECT"
        );
    }
    // A large read keeps the buffered description and its read-ahead.
    assert!(
        !direct_of(&img, 4 * CS, 2 * CS),
        "a large read was offered O_DIRECT"
    );
    assert_same(
        &img.plan_read(2 * CS, 4 * CS).unwrap().read_all().unwrap(),
        &data,
        "planned bytes",
    );
}

#[test]
fn on_an_all_direct_image_a_large_read_the_page_cache_does_not_hold_is_offered_o_direct_too() {
    let dir = tmp();
    let path = qemu_create(dir.path(), "o.qcow2", "cluster_size=65536", "1M", &[]);
    let img = open_qcow2(&path, false).unwrap();
    if img.enable_direct().is_err() {
        eprintln!("no O_DIRECT on this file system: skipping");
        return;
    }
    let data = random_bytes(6, 4 * CS as usize);
    img.write_at(&data, 0).unwrap();
    img.flush().unwrap();
    let plan = img.plan_read(0, 4 * CS).unwrap();
    assert!(
        matches!(
            &plan.pieces[..],
            [(
                _,
                PlanSource::File {
                    direct: Some(_),
                    ..
                }
            )]
        ),
        "{plan:?}"
    );
    assert_same(&plan.read_all().unwrap(), &data, "planned bytes");
}

#[test]
fn compressed_clusters_are_never_planned() {
    let dir = tmp();
    let (path, data) = qemu_compressed(dir.path(), "c.qcow2", 4 * CS);
    let img = open_qcow2(&path, true).unwrap();
    assert!(img.plan_read(CS, 4096).is_none());
    let mut got = vec![0u8; 4096];
    img.read_at(&mut got, CS).unwrap();
    assert_same(
        &got,
        &data[CS as usize..CS as usize + 4096],
        "compressed bytes",
    );
}
