//! `plan_read` of the qcow2 engine (the io_uring read path executes plans after every lock is
//! released): an overlay plans only what no flush can move, its backing file and zeros, and
//! never its own clusters, which a flush may free and reuse for another guest cluster.

mod common;

use std::sync::Arc;

use blockdev::{BlockDev, PlanSource, RawFile};
use common::*;
use qcow_snapshot::{create_on, CreateOptions, Format, MemHost, QcowImage};

const CS: u64 = 65536;
const SIZE: u64 = 16 * CS;

#[test]
fn an_overlay_plans_its_backing_and_zeros_and_never_its_own_clusters() {
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

    // Written (allocated in the overlay): never planned, nor any range that touches it, before
    // and after the flush that could free and reuse clusters.
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
