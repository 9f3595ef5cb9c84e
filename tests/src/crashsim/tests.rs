//! Unit tests of the crash-state generator and the recorder.

use super::*;
use std::sync::Arc;

use blockdev::BlockDev;

fn w(offset: u64, data: &[u8]) -> Event {
    Event::Write {
        offset,
        data: Arc::from(data),
    }
}

#[test]
fn crash_states_cover_boundaries_prefixes_and_never_apply_past_the_window() {
    let log = CrashLog {
        initial: Arc::new(vec![0u8; 8192]),
        events: vec![
            w(0, &[1; 4096]),
            w(4096, &[2; 4096]),
            Event::Sync,
            w(0, &[3; 8192]),
        ],
    };
    let mut states = Vec::new();
    let n = crash_states(&log, StateBudget::default(), 1, &mut |s| {
        states.push(s);
        true
    });
    assert_eq!(n, states.len());
    // Window 1: boundary (all zero), prefixes 1 and 2, subsets, torn.
    assert!(states[0].bytes.iter().all(|&b| b == 0));
    assert_eq!(states[0].kind, StateKind::SyncBoundary);
    for s in states.iter().filter(|s| s.durable_pos == 0) {
        assert!(
            s.bytes.iter().all(|&b| b <= 2),
            "{:?} applied past the sync",
            s.kind
        );
        assert_eq!(s.window_end, 2);
    }
    // Window 2 starts from the synced state.
    let w2: Vec<_> = states.iter().filter(|s| s.durable_pos == 3).collect();
    assert_eq!(w2[0].kind, StateKind::SyncBoundary);
    assert_eq!(&w2[0].bytes[..4096], &[1; 4096][..]);
    assert_eq!(&w2[0].bytes[4096..], &[2; 4096][..]);
    // Torn states of the 8 KiB write mix old and new 4 KiB sectors but never inside one.
    for s in &w2 {
        for sec in s.bytes.chunks(4096) {
            assert!(
                sec.iter().all(|&b| b == sec[0]),
                "torn inside a 4 KiB sector"
            );
        }
    }
    assert!(w2.iter().any(|s| s.bytes.iter().all(|&b| b == 3)));
}

#[test]
fn faulty_file_fails_exactly_the_planned_operations() {
    let rec = Recorder::new(vec![0; 16]);
    let ctl = FaultControl::new();
    let f = FaultyFile::new(Arc::clone(&rec), Arc::clone(&ctl));
    ctl.arm(Some(FaultPlan::new(
        FaultOn::Write,
        1,
        FaultMode::Once,
        libc::EIO,
    )));
    assert!(f.write_at(&[1], 0).is_ok());
    assert_eq!(
        f.write_at(&[2], 1).unwrap_err().raw_os_error(),
        Some(libc::EIO)
    );
    assert!(f.write_at(&[3], 2).is_ok());
    assert!(f.sync_data().is_ok());
    assert_eq!(&rec.current()[..3], &[1, 0, 3]);
    ctl.arm(Some(FaultPlan::new(
        FaultOn::Sync,
        0,
        FaultMode::Always,
        libc::ENOSPC,
    )));
    assert!(f.sync_data().is_err());
    assert!(f.sync_data().is_err());
    assert!(f.write_at(&[4], 3).is_ok());
    assert_eq!(ctl.injected(), 2);
    // The durable view ends at the last successful sync.
    assert_eq!(rec.durable()[3], 0);
    assert_eq!(rec.current()[3], 4);
}

#[test]
fn expectation_rejects_zeros_and_stale_data_where_a_flushed_value_was() {
    let mut d = Driver::new(vec![7u8; 4096], Box::new(|| 0));
    let dev = blockdev::MemDisk::new(4096);
    dev.write_at(&[7u8; 4096], 0).unwrap();
    d.run(
        &dev,
        &GuestOp::Write {
            offset: 0,
            len: 1024,
            seed: 5,
        },
    )
    .unwrap();
    d.run(&dev, &GuestOp::Flush).unwrap();
    d.run(
        &dev,
        &GuestOp::Write {
            offset: 512,
            len: 512,
            seed: 6,
        },
    )
    .unwrap();
    let exp = d.expectation_now(usize::MAX);
    let mut img = dev.snapshot();
    assert!(exp.verify(&img).is_ok());
    // The later write may be lost.
    pattern(5, 512, &mut img[512..1024]);
    assert!(exp.verify(&img).is_ok());
    // Zeros where the flushed value was: rejected.
    img[0..512].fill(0);
    assert!(exp.verify(&img).is_err());
    // Stale (pre-flush) data: rejected.
    img[0..512].fill(7);
    assert!(exp.verify(&img).is_err());
    assert!(d.verify_live(&dev).is_ok());
}
