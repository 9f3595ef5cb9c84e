//! Fault injection under the qcow2 engine, in the spirit of QEMU iotest 026.
//!
//! Each test sets up an overlay, makes some data durable with a flush, and then runs a short
//! workload that exercises one metadata step (new L2 table, new refcount block, refcount table
//! growth, COW copy, in-place data write, zeroing/discard, the folio cache's writeback) with a
//! host file that fails the Nth write or the Nth `fdatasync` (EIO or ENOSPC), once or from then
//! on. N runs over every write and every sync the workload issues (sampled when there are very
//! many). For every run:
//! - the fault surfaces: some request fails with the injected errno (or the engine says
//!   `Corrupt`), and a flush never reports success over data it did not make durable;
//! - the live image still reads back every completed write;
//! - after a power loss right then, and after the process exits, the image checks 0 or 3 with
//!   snapblk's checker (and `qemu-img check` on a sample), reopens with leak repair, and holds
//!   every sector flushed before as flushed or as a later write;
//! - "once" faults: retrying the failed requests and flushing succeeds on the same open image,
//!   and new writes + flush work.
//!
//! The "fsyncgate" variant makes a failed `fdatasync` drop the writes since the last good sync
//! (what Linux does to dirty pages whose writeback failed): the engine must then not report a
//! later flush as successful unless the data really is durable.

use std::sync::Arc;

use blockdev::{BlockDev, BlockError};
use qcow_snapshot::format::{table_from_bytes, Header};
use qcow_snapshot::QcowImage;
use rand::rngs::StdRng;
use rand::SeedableRng;
use snapblk_tests::crashsim::{
    state_dir, BaseKind, Driver, Expectation, FaultControl, FaultMode, FaultOn, FaultPlan,
    FaultyFile, GuestOp, Overlay, Recorder, Referee,
};

/// Most fault positions tried per plan kind; beyond that they are sampled.
const MAX_POSITIONS: u64 = 60;

struct Case {
    name: &'static str,
    kind: BaseKind,
    disk_size: u64,
    cluster_size: u64,
    refcount_order: u32,
    cached: bool,
    setup: Vec<GuestOp>,
    phase: Vec<GuestOp>,
    extra: Vec<GuestOp>,
    /// Checks that the fault-free phase really exercised the step (image before, after).
    exercises: fn(&Layout, &Layout) -> Result<(), String>,
}

/// The parts of an image's layout the `exercises` checks look at.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Layout {
    file_len: u64,
    l1_used: usize,
    reftable_offset: u64,
    reftable_clusters: u32,
    refblocks: usize,
}

fn layout(bytes: &[u8]) -> Layout {
    let h = Header::parse(bytes).expect("header");
    let l1 = &bytes[h.l1_table_offset as usize..][..h.l1_size as usize * 8];
    let cs = 1usize << h.cluster_bits;
    let rt = &bytes[h.refcount_table_offset as usize..][..h.refcount_table_clusters as usize * cs];
    Layout {
        file_len: bytes.len() as u64,
        l1_used: table_from_bytes(l1).iter().filter(|&&e| e != 0).count(),
        reftable_offset: h.refcount_table_offset,
        reftable_clusters: h.refcount_table_clusters,
        refblocks: table_from_bytes(rt).iter().filter(|&&e| e != 0).count(),
    }
}

fn w(offset: u64, len: u64, seed: u64) -> GuestOp {
    GuestOp::Write { offset, len, seed }
}

const F: GuestOp = GuestOp::Flush;

/// One open overlay on a faulty host file, with its shadow.
struct Env {
    rec: Arc<Recorder>,
    ctl: Arc<FaultControl>,
    img: Arc<QcowImage>,
    dev: Arc<dyn BlockDev>,
    driver: Driver,
}

fn cache_cfg() -> cache::CacheConfig {
    cache::CacheConfig {
        folio_size: 4096,
        cache_size: 256 << 10,
        dirty_limit: 128 << 10,
        writeback: true,
        flusher_threads: 0,
        writeback_interval: std::time::Duration::from_secs(3600),
        ..Default::default()
    }
}

fn start(case: &Case, ov: &Overlay) -> Env {
    let rec = Recorder::new(ov.fresh.clone());
    let ctl = FaultControl::new();
    let img = Arc::new(
        ov.open(Box::new(FaultyFile::new(
            Arc::clone(&rec),
            Arc::clone(&ctl),
        )))
        .unwrap_or_else(|e| panic!("{}: open: {e}", case.name)),
    );
    let dev: Arc<dyn BlockDev> = if case.cached {
        cache::FolioCache::new(img.clone() as Arc<dyn BlockDev>, cache_cfg()).expect("cache")
    } else {
        img.clone()
    };
    let rec2 = Arc::clone(&rec);
    let mut driver = Driver::new(ov.guest_initial.clone(), Box::new(move || rec2.position()));
    for op in &case.setup {
        driver
            .run(&*dev, op)
            .unwrap_or_else(|e| panic!("{}: setup {op:?}: {e}", case.name));
    }
    Env {
        rec,
        ctl,
        img,
        dev,
        driver,
    }
}

/// Closes the stack: the cache (if any) first, then the engine. Returns the engine's close
/// result.
fn close(env: Env) -> (Arc<Recorder>, Driver, blockdev::Result<()>) {
    let Env {
        rec,
        ctl,
        img,
        dev,
        driver,
    } = env;
    drop(ctl);
    drop(dev);
    let r = img.close();
    drop(img);
    (rec, driver, r)
}

#[derive(Debug, Default)]
struct Tally {
    runs: usize,
    injected: u64,
    corrupt: usize,
    swallowed_once: usize,
    poisoned: usize,
}

/// Which faults a run enumerates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PlanSet {
    /// EIO/ENOSPC on writes (once, always) and EIO on syncs (once, always).
    Standard,
    /// EIO on syncs that also drops the writes since the last good sync ("fsyncgate").
    LossySync,
}

fn positions(count: u64) -> Vec<u64> {
    if count <= MAX_POSITIONS {
        (0..count).collect()
    } else {
        // Every position near the end (the flush's metadata writes), spread samples before.
        let tail = MAX_POSITIONS / 2;
        let mut v: Vec<u64> = (0..tail).map(|i| i * (count - tail) / tail).collect();
        v.extend(count - tail..count);
        v.dedup();
        v
    }
}

fn plans(set: PlanSet, writes: u64, syncs: u64) -> Vec<FaultPlan> {
    let mut out = Vec::new();
    match set {
        PlanSet::Standard => {
            for n in positions(writes) {
                for (mode, errno) in [
                    (FaultMode::Once, libc::EIO),
                    (FaultMode::Always, libc::EIO),
                    (FaultMode::Once, libc::ENOSPC),
                    (FaultMode::Always, libc::ENOSPC),
                ] {
                    out.push(FaultPlan::new(FaultOn::Write, n, mode, errno));
                }
            }
            for n in positions(syncs) {
                out.push(FaultPlan::new(FaultOn::Sync, n, FaultMode::Once, libc::EIO));
                out.push(FaultPlan::new(
                    FaultOn::Sync,
                    n,
                    FaultMode::Always,
                    libc::EIO,
                ));
            }
        }
        PlanSet::LossySync => {
            for n in positions(syncs) {
                let mut lossy = FaultPlan::new(FaultOn::Sync, n, FaultMode::Once, libc::EIO);
                lossy.sync_error_loses_writes = true;
                out.push(lossy);
            }
        }
    }
    out
}

fn error_is_expected(e: &BlockError, plan: &FaultPlan) -> bool {
    matches!(e, BlockError::Corrupt(_)) || e.raw_os_error() == Some(plan.errno)
}

/// Runs `case` under one fault plan; Err describes the broken invariant.
fn run_plan(
    case: &Case,
    ov: &Overlay,
    plan: FaultPlan,
    referee: &mut Referee,
    tally: &mut Tally,
) -> Result<(), String> {
    let mut env = start(case, ov);
    env.ctl.arm(Some(plan));
    let mut errors = Vec::new();
    for op in &case.phase {
        if let Err(e) = env.driver.run(&*env.dev, op) {
            errors.push((op.clone(), e));
        }
    }
    let injected = env.ctl.injected();
    tally.runs += 1;
    tally.injected += injected;
    if injected == 0 {
        return Err(format!(
            "the planned fault never fired (the workload took another path): {plan:?}"
        ));
    }
    for (op, e) in &errors {
        if !error_is_expected(e, &plan) {
            return Err(format!("{op:?} failed with an unexpected error: {e}"));
        }
    }
    if env.img.is_corrupt() {
        tally.corrupt += 1;
        // The engine chose to stop: it must say so on every later write.
        return match env.dev.write_at(&[0u8; 512], 0) {
            Err(BlockError::Corrupt(_)) => Ok(()),
            other => Err(format!(
                "image marked corrupt but a later write returned {other:?}"
            )),
        };
    }
    if errors.is_empty() {
        if plan.mode == FaultMode::Always {
            return Err(format!(
                "{injected} injected faults were swallowed: every request and flush succeeded"
            ));
        }
        tally.swallowed_once += 1;
    }
    if !plan.sync_error_loses_writes {
        // (After a lost fdatasync even data the engine wrote itself, such as a COW fill, is
        // gone from the file; what the guest reads until it rewrites is not checked, only what
        // a later successful flush claims.)
        env.driver
            .verify_live(&*env.dev)
            .map_err(|e| format!("after the fault: {e}"))?;
    }

    let mut poisoned = false;
    if plan.mode == FaultMode::Once {
        env.ctl.disarm();
        // The guest retries what failed; everything must work again on the same open image.
        for (op, _) in &errors {
            if matches!(op, GuestOp::Flush) {
                continue;
            }
            env.driver
                .run(&*env.dev, op)
                .map_err(|e| format!("retrying {op:?} after a one-off fault failed: {e}"))?;
        }
        match env.driver.run(&*env.dev, &F) {
            Ok(()) => {}
            // After a lost fdatasync the only honest answer may be to fail every later flush
            // (QEMU's file-posix does that).
            // The folio cache cannot tell whether a failed lower flush lost data, so it fails
            // every later flush and says so; accepted (and counted) as a deliberate stop.
            Err(BlockError::Io(_)) if plan.sync_error_loses_writes || case.cached => {
                poisoned = true;
                tally.poisoned += 1;
                // If a later flush does succeed after all, the power-loss check below holds it
                // to its word.
                let _ = env.driver.run(&*env.dev, &F);
            }
            Err(e) => return Err(format!("flush after retrying failed: {e}")),
        }
        if !poisoned {
            for op in &case.extra {
                env.driver.run(&*env.dev, op).map_err(|e| {
                    format!("a new request {op:?} after a one-off fault failed: {e}")
                })?;
            }
            env.driver
                .verify_live(&*env.dev)
                .map_err(|e| format!("after the retry: {e}"))?;
        }
    }

    // Power loss now.
    let durable = env.rec.durable();
    let exp = env.driver.expectation_now(env.rec.durable_position());
    referee
        .judge(ov, &durable, &exp)
        .map_err(|e| format!("power loss after the fault: {e}"))?;

    let clean = plan.mode == FaultMode::Once && !poisoned;
    let (rec, driver, closed) = close(env);
    if clean {
        closed.map_err(|e| format!("closing after a one-off fault failed: {e}"))?;
    }
    // Process exit (no power loss): whatever reached the file.
    let exp = driver.expectation_now(rec.durable_position());
    referee
        .judge(ov, &rec.current(), &exp)
        .map_err(|e| format!("image after close: {e}"))?;
    if clean {
        // Everything was flushed and the image closed cleanly: the file holds exactly the shadow.
        let exact = Expectation {
            flushed: Arc::new(driver.shadow.clone()),
            later: Vec::new(),
        };
        referee
            .judge(ov, &rec.current(), &exact)
            .map_err(|e| format!("image after clean close: {e}"))?;
    }
    Ok(())
}

fn run_case(case: Case, set: PlanSet) -> Result<(), String> {
    let dir = state_dir().expect("state dir");
    let mut rng = StdRng::seed_from_u64(0x026);
    let ov = Overlay::build(
        dir.path(),
        case.kind,
        case.disk_size,
        case.cluster_size,
        case.refcount_order,
        false,
        &mut rng,
    )
    .expect("build overlay");
    // Dry run: count the phase's writes and syncs, and check it exercises the step.
    let mut env = start(&case, &ov);
    let before = layout(&env.rec.current());
    env.ctl.arm(None);
    for op in &case.phase {
        env.driver
            .run(&*env.dev, op)
            .unwrap_or_else(|e| panic!("{}: fault-free {op:?}: {e}", case.name));
    }
    let (writes, syncs) = (env.ctl.writes(), env.ctl.syncs());
    let after = layout(&env.rec.current());
    (case.exercises)(&before, &after).unwrap_or_else(|e| {
        panic!(
            "{}: the workload does not exercise its step: {e}\n{before:?}\n{after:?}",
            case.name
        )
    });
    let mut referee = Referee::new(dir.path(), 7);
    // Fault-free baseline: the step itself must leave a clean, correct image.
    let (rec, driver, closed) = close(env);
    closed.unwrap_or_else(|e| panic!("{}: fault-free close: {e}", case.name));
    let exact = Expectation {
        flushed: Arc::new(driver.shadow.clone()),
        later: Vec::new(),
    };
    referee
        .judge(&ov, &rec.current(), &exact)
        .unwrap_or_else(|e| {
            panic!(
                "{}: the fault-free run already breaks the image: {e}",
                case.name
            )
        });

    let mut tally = Tally::default();
    let mut failures = Vec::new();
    for plan in plans(set, writes, syncs) {
        if let Err(e) = run_plan(&case, &ov, plan, &mut referee, &mut tally) {
            failures.push(format!("{plan:?}: {e}"));
        }
    }
    println!(
        "{} ({set:?}): {writes} writes, {syncs} syncs in the step; {} runs, {} faults injected, \
         {} images judged ({} by qemu-img), {} marked corrupt, {} one-off faults absorbed without \
         an error, {} runs where every later flush was refused",
        case.name,
        tally.runs,
        tally.injected,
        referee.judged,
        referee.qemu_runs,
        tally.corrupt,
        tally.swallowed_once,
        tally.poisoned
    );
    if failures.is_empty() {
        return Ok(());
    }
    let shown: Vec<&str> = failures.iter().take(4).map(|s| s.as_str()).collect();
    Err(format!(
        "{} ({set:?}): {} of {} fault runs broke an invariant; first ones:\n{}",
        case.name,
        failures.len(),
        tally.runs,
        shown.join("\n---\n")
    ))
}

fn check(case: Case, set: PlanSet) {
    if let Err(e) = run_case(case, set) {
        panic!("{e}");
    }
}

fn l2_allocation() -> Case {
    Case {
        name: "l2_allocation",
        kind: BaseKind::Raw,
        disk_size: 8 << 20,
        cluster_size: 4096,
        refcount_order: 4,
        cached: false,
        setup: vec![w(0, 8192, 1), F],
        phase: vec![w((5 << 20) + 1024, 2048, 2), w(7 << 20, 4096, 3), F],
        extra: vec![w(3 << 20, 4096, 4), F],
        exercises: |b, a| {
            if a.l1_used >= b.l1_used + 2 {
                Ok(())
            } else {
                Err("no new L2 tables".into())
            }
        },
    }
}

fn refcount_block_allocation() -> Case {
    Case {
        name: "refcount_block_allocation",
        kind: BaseKind::Raw,
        disk_size: 1 << 20,
        cluster_size: 512,
        refcount_order: 4,
        cached: false,
        setup: vec![w(0, 100 << 10, 1), F],
        phase: vec![w(512 << 10, 32 << 10, 2), w(900 << 10, 512, 3), F],
        extra: vec![w(300 << 10, 1024, 4), F],
        exercises: |b, a| {
            if a.refblocks > b.refblocks {
                Ok(())
            } else {
                Err("no new refcount block".into())
            }
        },
    }
}

fn refcount_table_growth() -> Case {
    Case {
        name: "refcount_table_growth",
        kind: BaseKind::None,
        disk_size: 4 << 20,
        cluster_size: 512,
        refcount_order: 6,
        cached: false,
        setup: vec![w(0, 1900 << 10, 1), F],
        phase: vec![w(2 << 20, 256 << 10, 2), F],
        extra: vec![w(3 << 20, 4096, 4), F],
        exercises: |b, a| {
            if a.reftable_offset != b.reftable_offset || a.reftable_clusters > b.reftable_clusters {
                Ok(())
            } else {
                Err("refcount table did not grow".into())
            }
        },
    }
}

fn cow_copy() -> Case {
    Case {
        name: "cow_copy",
        kind: BaseKind::Qcow2,
        disk_size: 2 << 20,
        cluster_size: 65536,
        refcount_order: 4,
        cached: false,
        setup: vec![w(0, 65536, 1), F],
        phase: vec![w(65536 + 8192, 4096, 2), w((1 << 20) + 51200, 512, 3), F],
        extra: vec![w(512 << 10, 8192, 4), F],
        exercises: |b, a| {
            if a.file_len >= b.file_len + 2 * 65536 {
                Ok(())
            } else {
                Err("no new data clusters".into())
            }
        },
    }
}

fn in_place_data_write() -> Case {
    Case {
        name: "in_place_data_write",
        kind: BaseKind::Raw,
        disk_size: 1 << 20,
        cluster_size: 65536,
        refcount_order: 4,
        cached: false,
        setup: vec![w(0, 256 << 10, 1), F],
        phase: vec![
            w(8192, 4096, 2),
            w(65536, 65536, 3),
            w(200 << 10, 512, 4),
            F,
        ],
        extra: vec![w(4096, 512, 5), F],
        exercises: |b, a| {
            if a == b {
                Ok(())
            } else {
                Err("overwriting allocated clusters changed the layout".into())
            }
        },
    }
}

fn zeroes_and_discard() -> Case {
    Case {
        name: "zeroes_and_discard",
        kind: BaseKind::Raw,
        disk_size: 1 << 20,
        cluster_size: 4096,
        refcount_order: 4,
        cached: false,
        setup: vec![w(0, 128 << 10, 1), F],
        phase: vec![
            GuestOp::WriteZeroes {
                offset: 16 << 10,
                len: 8192,
                unmap: true,
            },
            GuestOp::Discard {
                offset: 64 << 10,
                len: 16 << 10,
            },
            GuestOp::WriteZeroes {
                offset: (100 << 10) + 512,
                len: 1024,
                unmap: false,
            },
            GuestOp::WriteZeroes {
                offset: 512 << 10,
                len: 8192,
                unmap: false,
            },
            F,
            w(64 << 10, 8192, 2),
            F,
        ],
        extra: vec![w(16 << 10, 4096, 3), F],
        exercises: |_, _| Ok(()),
    }
}

fn folio_cache_writeback() -> Case {
    Case {
        name: "folio_cache_writeback",
        kind: BaseKind::Raw,
        disk_size: 8 << 20,
        cluster_size: 4096,
        refcount_order: 4,
        cached: true,
        setup: vec![w(0, 16 << 10, 1), F],
        phase: vec![
            w(4096, 8192, 2),
            w(3 << 20, 4096, 3),
            w((5 << 20) + 512, 1024, 4),
            F,
        ],
        extra: vec![w(6 << 20, 4096, 5), F],
        exercises: |b, a| {
            if a.l1_used > b.l1_used && a.file_len > b.file_len {
                Ok(())
            } else {
                Err("no new L2 table or data cluster".into())
            }
        },
    }
}

#[test]
fn io_errors_during_l2_table_allocation_keep_flushed_data() {
    check(l2_allocation(), PlanSet::Standard);
}

#[test]
fn io_errors_during_refcount_block_allocation_keep_flushed_data() {
    check(refcount_block_allocation(), PlanSet::Standard);
}

#[test]
fn io_errors_during_refcount_table_growth_keep_flushed_data() {
    check(refcount_table_growth(), PlanSet::Standard);
}

#[test]
fn io_errors_during_cow_copy_keep_backing_and_flushed_data() {
    check(cow_copy(), PlanSet::Standard);
}

#[test]
fn io_errors_during_in_place_data_writes_keep_flushed_data() {
    check(in_place_data_write(), PlanSet::Standard);
}

#[test]
fn io_errors_during_zeroes_and_discard_keep_flushed_data() {
    check(zeroes_and_discard(), PlanSet::Standard);
}

#[test]
fn io_errors_under_the_folio_cache_fail_the_flush_and_a_retry_succeeds() {
    check(folio_cache_writeback(), PlanSet::Standard);
}

/// Linux drops dirty pages whose writeback failed and reports the error once ("fsyncgate");
/// a later fdatasync succeeds although the data is gone. After a failed sync the stack must
/// therefore never again report a flush as successful unless the data really is durable.
#[test]
fn failed_fdatasync_that_drops_dirty_pages_is_never_followed_by_a_false_flush_success() {
    let mut failures = Vec::new();
    for case in [
        l2_allocation(),
        refcount_block_allocation(),
        cow_copy(),
        in_place_data_write(),
        zeroes_and_discard(),
        folio_cache_writeback(),
    ] {
        if let Err(e) = run_case(case, PlanSet::LossySync) {
            failures.push(e);
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n=====\n"));
}
