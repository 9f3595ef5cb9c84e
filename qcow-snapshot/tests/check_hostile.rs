//! Hostile images: header fields, table offsets and whole files crafted to crash, hang or
//! exhaust the memory of whoever opens them. Both the checker (`check::check`) and the engine
//! (`open_image`) must answer each with a clear error or a finished report, never a panic, a
//! hang or a huge allocation. Where qemu-img is installed, the checker's exit code must also
//! be qemu-img's.

mod common;

use std::fs::{self, OpenOptions};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{file_header, have_tools, poke, qemu_create, qemu_overlay, run, s, tmp};
use qcow_snapshot::check::{check, CheckReport, Repair};
use qcow_snapshot::format::{
    self, L1_SIZE_OFFSET, L1_TABLE_OFFSET_OFFSET, REFCOUNT_TABLE_OFFSET_OFFSET, SIZE_OFFSET,
};
use rand::{Rng, SeedableRng};

fn have_qemu() -> bool {
    have_tools(&["qemu-img"], " (it makes the images these tests damage)")
}

/// A small image with a few allocated clusters, made by qemu-img.
fn base_image(dir: &Path, name: &str, cluster_size: u64) -> PathBuf {
    let first = format!("write -P 0x11 0 {}", 2 * cluster_size);
    qemu_create(
        dir,
        name,
        &format!("cluster_size={cluster_size}"),
        "8M",
        &[&first, "write -P 0x22 4M 4k"],
    )
}

fn qemu_exit(p: &Path) -> Option<i32> {
    let out = Command::new("timeout")
        .args(["60", "qemu-img", "check", "-f", "qcow2", s(p)])
        .output()
        .expect("qemu-img");
    Some(out.status.code().unwrap_or(-1))
}

/// What one hostile image did to the checker and the engine.
#[derive(Debug)]
struct Outcome {
    check_exit: i32,
    engine_error: Option<String>,
}

/// Runs the checker (no repair) and the engine's open on `p`; panics name the case.
fn attack(what: &str, p: &Path) -> Outcome {
    let start = Instant::now();
    let checked = catch_unwind(AssertUnwindSafe(|| check(p, None)));
    let checked = checked.unwrap_or_else(|_| panic!("{what}: check panicked"));
    let check_exit = match &checked {
        Ok(r) => r.exit_code(),
        Err(e) => {
            assert!(!e.to_string().is_empty());
            e.exit_code()
        }
    };
    let check_took = start.elapsed();
    let opened = catch_unwind(AssertUnwindSafe(|| {
        qcow_snapshot::open_image(p, Some(qcow_snapshot::Format::Qcow2), true)
    }));
    let opened = opened.unwrap_or_else(|_| panic!("{what}: engine open_image panicked"));
    let engine_error = match opened {
        Ok(dev) => {
            // Opened: sample reads must not panic either (errors are fine).
            let size = dev.size();
            let mut buf = vec![0u8; 65536];
            for off in [0, size / 2, size.saturating_sub(65536)] {
                let len = (size - off).min(65536) as usize;
                let read = catch_unwind(AssertUnwindSafe(|| dev.read_at(&mut buf[..len], off)));
                assert!(read.is_ok(), "{what}: engine read at {off} panicked");
            }
            None
        }
        Err(e) => Some(e.to_string()),
    };
    let took = start.elapsed();
    eprintln!("{what}: check {check_took:?}, check + engine open {took:?}");
    assert!(
        took < Duration::from_secs(20),
        "{what}: took {took:?} (check {check_took:?})"
    );
    Outcome {
        check_exit,
        engine_error,
    }
}

/// The case must be refused by the checker (exit 1) and the engine, and qemu-img agrees.
fn refused(what: &str, p: &Path) -> Outcome {
    let o = attack(what, p);
    assert_eq!(o.check_exit, 1, "{what}: {o:?}");
    assert!(o.engine_error.is_some(), "{what}: engine opened it");
    if let Some(q) = qemu_exit(p) {
        assert_eq!(q, 1, "{what}: qemu-img exit");
    }
    o
}

/// The checker's verdict must be qemu-img's (the image opens but is inconsistent).
fn same_verdict_as_qemu(what: &str, p: &Path) -> Outcome {
    let o = attack(what, p);
    if let Some(q) = qemu_exit(p) {
        assert_eq!(o.check_exit, q, "{what}: ours {o:?}, qemu-img {q}");
    }
    o
}

fn put32(p: &Path, off: usize, v: u32) {
    poke(p, off as u64, &v.to_be_bytes());
}

fn put64(p: &Path, off: usize, v: u64) {
    poke(p, off as u64, &v.to_be_bytes());
}

fn fresh(dir: &Path, name: &str) -> PathBuf {
    base_image(dir, name, 65536)
}

#[test]
fn table_offsets_past_eof_are_reported_not_followed() {
    if !have_qemu() {
        return;
    }
    let d = tmp();
    let p = fresh(d.path(), "l1-eof.qcow2");
    put64(&p, L1_TABLE_OFFSET_OFFSET, 1 << 40);
    let o = same_verdict_as_qemu("L1 table past EOF", &p);
    assert_eq!(o.check_exit, 2);

    let p = fresh(d.path(), "reft-eof.qcow2");
    put64(&p, REFCOUNT_TABLE_OFFSET_OFFSET, 1 << 40);
    let o = same_verdict_as_qemu("refcount table past EOF", &p);
    assert_eq!(o.check_exit, 2);

    // Offsets so large that offset + size overflows.
    let p = fresh(d.path(), "l1-huge.qcow2");
    put64(&p, L1_TABLE_OFFSET_OFFSET, u64::MAX - 0xffff);
    refused("L1 table offset near 2^64", &p);

    // Misaligned or 2^63 table offsets are refused even for empty tables, like QEMU.
    let p = fresh(d.path(), "snap-misaligned.qcow2");
    put64(&p, 64, 0x200);
    same_verdict_as_qemu("empty snapshot table at a misaligned offset", &p);
    let p = fresh(d.path(), "snap-2-63.qcow2");
    put64(&p, 64, 1 << 63);
    let o = same_verdict_as_qemu("empty snapshot table at 2^63", &p);
    assert_eq!(o.check_exit, 1);

    let p = fresh(d.path(), "snap-huge.qcow2");
    put32(&p, 60, 3);
    put64(&p, 64, 1 << 50);
    same_verdict_as_qemu("snapshot table past EOF", &p);
}

#[test]
fn damaged_snapshot_tables_get_qemus_verdict() {
    if !have_qemu() {
        return;
    }
    let d = tmp();
    let snap = |name: &str| {
        let p = fresh(d.path(), name);
        run("qemu-img", &["snapshot", "-c", "s1", s(&p)]);
        let at = file_header(&p).snapshots_offset;
        (p, at)
    };
    let (p, at) = snap("sn-extra.qcow2");
    poke(&p, at + 36, &2000u32.to_be_bytes());
    let o = same_verdict_as_qemu("snapshot extra data 2000 bytes", &p);
    assert_eq!(o.check_exit, 1);
    let (p, _) = snap("sn-count.qcow2");
    put32(&p, 60, 65537);
    let o = same_verdict_as_qemu("65537 snapshots", &p);
    assert_eq!(o.check_exit, 1);
    let (p, _) = snap("sn-more.qcow2");
    put32(&p, 60, 5);
    same_verdict_as_qemu("5 snapshots announced, 1 present", &p);
    let (p, at) = snap("sn-l1.qcow2");
    poke(&p, at + 8, &0x0100_0000u32.to_be_bytes());
    let o = same_verdict_as_qemu("snapshot L1 size 16M entries", &p);
    assert_eq!(o.check_exit, 2);
    let (p, at) = snap("sn-l1-eof.qcow2");
    poke(&p, at, &(1u64 << 40).to_be_bytes());
    same_verdict_as_qemu("snapshot L1 table past EOF", &p);
}

#[test]
fn tables_overlapping_the_header_are_caught() {
    if !have_qemu() {
        return;
    }
    let d = tmp();
    let p = fresh(d.path(), "l1-hdr.qcow2");
    put64(&p, L1_TABLE_OFFSET_OFFSET, 0);
    let o = same_verdict_as_qemu("L1 table over the header", &p);
    assert_ne!(o.check_exit, 0);

    let p = fresh(d.path(), "reft-hdr.qcow2");
    put64(&p, REFCOUNT_TABLE_OFFSET_OFFSET, 0);
    let o = same_verdict_as_qemu("refcount table over the header", &p);
    assert_ne!(o.check_exit, 0);
    // Repair must not make things worse or panic either.
    let r = check(&p, Some(Repair::All));
    assert!(r.is_ok() || r.is_err());
}

#[test]
fn huge_virtual_sizes_and_l1_sizes_are_refused_without_allocating() {
    if !have_qemu() {
        return;
    }
    let d = tmp();
    let p = fresh(d.path(), "size.qcow2");
    put64(&p, SIZE_OFFSET, 1 << 62);
    refused("virtual size 2^62 with a small L1", &p);

    let p = fresh(d.path(), "size-max.qcow2");
    put64(&p, SIZE_OFFSET, u64::MAX);
    refused("virtual size 2^64-1", &p);

    let p = fresh(d.path(), "l1-max.qcow2");
    put32(&p, L1_SIZE_OFFSET, u32::MAX);
    refused("l1_size 2^32-1", &p);

    // The largest L1 QEMU accepts, far past EOF: read as zeros, never allocated per entry.
    let p = fresh(d.path(), "l1-big.qcow2");
    put32(&p, L1_SIZE_OFFSET, (format::MAX_L1_BYTES / 8) as u32);
    put64(&p, SIZE_OFFSET, 1 << 50);
    same_verdict_as_qemu("4M-entry L1 table", &p);

    let p = fresh(d.path(), "reft-big.qcow2");
    put32(&p, REFCOUNT_TABLE_OFFSET_OFFSET + 8, u32::MAX);
    refused("refcount_table_clusters 2^32-1", &p);
}

#[test]
fn bad_geometry_is_refused() {
    if !have_qemu() {
        return;
    }
    let d = tmp();
    let p = fresh(d.path(), "order7.qcow2");
    put32(&p, 96, 7);
    refused("refcount_order 7", &p);
    for bits in [0u32, 8, 22, 63, u32::MAX] {
        let p = fresh(d.path(), &format!("bits{bits}.qcow2"));
        put32(&p, 20, bits);
        refused(&format!("cluster_bits {bits}"), &p);
    }
    let p = base_image(d.path(), "hdrlen.qcow2", 4096);
    put32(&p, 100, 8192);
    refused("header_length 8192 with 4 KiB clusters", &p);
    let p = fresh(d.path(), "hdrlen-short.qcow2");
    put32(&p, 100, 8);
    refused("header_length 8", &p);
    let p = fresh(d.path(), "version.qcow2");
    put32(&p, 4, 4);
    refused("version 4", &p);
    let p = fresh(d.path(), "incompat.qcow2");
    put64(&p, 72, 1 << 40);
    refused("unknown incompatible feature", &p);
    let p = fresh(d.path(), "backing-name.qcow2");
    put64(&p, 8, 0x200);
    put32(&p, 16, 60000);
    refused("backing file name longer than the cluster", &p);
}

#[test]
fn truncated_files_give_clear_errors_or_reports() {
    if !have_qemu() {
        return;
    }
    let d = tmp();
    let orig = fresh(d.path(), "orig.qcow2");
    let len = fs::metadata(&orig).expect("stat").len();
    for cut in [
        0u64,
        4,
        50,
        71,
        100,
        200,
        65536,
        2 * 65536,
        3 * 65536 + 4096,
        len - 65536,
        len - 1,
    ] {
        let p = d.path().join(format!("cut{cut}.qcow2"));
        fs::copy(&orig, &p).expect("copy");
        OpenOptions::new()
            .write(true)
            .open(&p)
            .expect("open")
            .set_len(cut)
            .expect("truncate");
        let what = format!("truncated to {cut} bytes");
        let o = same_verdict_as_qemu(&what, &p);
        if cut < u64::from(format::V2_HEADER_LEN) {
            assert_eq!(o.check_exit, 1, "{what}");
        }
    }
}

#[test]
fn backing_chain_loops_are_refused_by_the_engine() {
    if !have_qemu() {
        return;
    }
    let d = tmp();
    // An overlay whose backing file is itself.
    let a = qemu_create(d.path(), "self.qcow2", "", "8M", &[]);
    let name = "self.qcow2";
    let h = file_header(&a);
    let at = u64::from(h.header_length) + 512;
    poke(&a, at, name.as_bytes());
    put64(&a, 8, at);
    put32(&a, 16, name.len() as u32);
    let o = attack("overlay backed by itself", &a);
    assert!(o.engine_error.is_some(), "{o:?}");
    // The checker does not follow backing files (like qemu-img check): the image is fine.
    assert_eq!(o.check_exit, 0);

    // A -> B -> A.
    let a = qemu_create(d.path(), "a.qcow2", "", "8M", &[]);
    let b = d.path().join("b.qcow2");
    qemu_overlay(&b, s(&a), "qcow2", &[], "");
    run(
        "qemu-img",
        &[
            "rebase",
            "-u",
            "-f",
            "qcow2",
            "-F",
            "qcow2",
            "-b",
            s(&b),
            s(&a),
        ],
    );
    let o = attack("A -> B -> A", &b);
    assert!(o.engine_error.is_some(), "{o:?}");
    let o = attack("A -> B -> A from A", &a);
    assert!(o.engine_error.is_some(), "{o:?}");
}

#[test]
fn l1_entries_all_pointing_at_one_l2_table_are_bounded_in_time() {
    if !have_qemu() {
        return;
    }
    let d = tmp();
    let p = base_image(d.path(), "fan.qcow2", 65536);
    let h = file_header(&p);
    let first = fs::read(&p).expect("read");
    let l2 = format::table_entry(&first[h.l1_table_offset as usize..], 0);
    // A 1M-entry L1 table in the file, every entry pointing at the same L2 table.
    let entries = 1u64 << 20;
    let l1_at = first.len() as u64;
    let table: Vec<u8> = (0..entries).flat_map(|_| l2.to_be_bytes()).collect();
    poke(&p, l1_at, &table);
    put64(&p, L1_TABLE_OFFSET_OFFSET, l1_at);
    put32(&p, L1_SIZE_OFFSET, entries as u32);
    put64(&p, SIZE_OFFSET, entries << 29);
    let start = Instant::now();
    let r = check(&p, None).expect("check runs");
    assert_eq!(r.exit_code(), 1, "{r}");
    assert!(
        r.failure.as_deref().unwrap_or("").contains("too many"),
        "{r:?}"
    );
    assert!(start.elapsed() < Duration::from_secs(20));
    let opened =
        catch_unwind(|| qcow_snapshot::open_image(&p, Some(qcow_snapshot::Format::Qcow2), true));
    assert!(opened.is_ok(), "engine open_image panicked");
}

#[test]
fn random_metadata_corruption_never_panics_the_checker_or_the_engine() {
    if !have_qemu() {
        return;
    }
    let d = tmp();
    let orig = base_image(d.path(), "fuzz.qcow2", 512);
    if have_qemu() {
        // A snapshot and a compressed cluster make more structures to damage.
        run("qemu-img", &["snapshot", "-c", "s", s(&orig)]);
        run("qemu-io", &["-c", "write -c -P 0x33 8k 512", s(&orig)]);
    }
    let bytes = fs::read(&orig).expect("read");
    let metadata_end = bytes.len().min(64 * 512);
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
    let p = d.path().join("victim.qcow2");
    let mut exits = [0u32; 4];
    let mut engine_opened = 0u32;
    for round in 0..300 {
        let mut img = bytes.clone();
        for _ in 0..rng.random_range(1..8) {
            let at = rng.random_range(0..metadata_end);
            img[at] = match rng.random_range(0..4) {
                0 => 0xff,
                1 => 0,
                2 => img[at] ^ (1 << rng.random_range(0..8)),
                _ => rng.random(),
            };
        }
        fs::write(&p, &img).expect("write");
        let what = format!("fuzz round {round}");
        let o = attack(&what, &p);
        if std::env::var_os("CHECK_FUZZ_VS_QEMU").is_some() {
            let q = qemu_exit(&p);
            if q != Some(o.check_exit) {
                let _ = fs::copy(&p, format!("/tmp/fuzz-mismatch-{round}.qcow2"));
                eprintln!("MISMATCH {what}: ours {} qemu {q:?}", o.check_exit);
            }
        }
        exits[o.check_exit.clamp(0, 3) as usize] += 1;
        engine_opened += u32::from(o.engine_error.is_none());
        // Repair must not panic either, and must leave something the checker can read.
        let repaired = catch_unwind(AssertUnwindSafe(|| check(&p, Some(Repair::All))));
        let repaired = repaired.unwrap_or_else(|_| panic!("{what}: repair panicked"));
        if let Ok(r) = repaired {
            let again: Result<CheckReport, _> = check(&p, None);
            if let Ok(again) = again {
                assert_eq!(
                    again.exit_code(),
                    r.exit_code(),
                    "{what}: {r}\n---\n{again}"
                );
            }
        }
    }
    eprintln!("check exit codes 0/1/2/3: {exits:?}; engine opened {engine_opened} of 300");
    // The mutations must actually reach the interesting paths.
    assert!(exits[2] > 0 && exits[1] > 0, "{exits:?}");
}
