//! A daemon restart loses nothing: a real Linux guest (QEMU TCG, `-chardev ...,reconnect=1`,
//! 2 queues, write-back cache) runs concurrent O_DIRECT and buffered+fsync writers that verify
//! every write by reading it back, while snapblk is SIGKILLed at random moments (or stopped
//! with SIGTERM, the upgrade procedure) and restarted on the same socket and image.
//!
//! What it protects: the requests the guest had in flight when the daemon died are resubmitted
//! by the next one (in-flight tracking, `backend/src/reconnect.rs`), so the guest sees no I/O
//! error and no hang; acknowledged writes survive the crash (the crash journal), so every
//! read-back matches; and the final disk equals the disk of the same workload run without any
//! kill (the workload's final content is fixed: each slot's last write is known).
//!
//! The default variant crashes, upgrades and crashes again in one guest run; `make
//! restart-soak` runs the long one (`#[ignore]`).
//! Guest boots are serialized with `guest_lock()`; skipped without QEMU/kernel unless
//! `SNAPBLK_REQUIRE_GUEST=1`.

use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use snapblk_tests::guest::{
    guest_env_or_skip, guest_lock, log_dir, md5_file, write_random_image, Daemon, DaemonConfig,
    DaemonKind, GuestConfig, GuestEnv,
};

const MIB: u64 = 1 << 20;
const DISK_BYTES: u64 = 64 * MIB;
const GUEST_TIMEOUT: Duration = Duration::from_secs(300);
/// Distinct 1 MiB patterns each writer cycles through.
const PATTERNS: usize = 4;

/// The guest script: two writers in parallel, each for at least `iters` iterations and `secs`
/// seconds. Writer `d` writes with
/// O_DIRECT (64 KiB requests), writer `b` buffered with `conv=fsync`; after each write the
/// writer reads the slot back with O_DIRECT and compares it with the pattern. Iteration `k`
/// writes pattern `k % 4` into slot `k % 4`, so the final disk does not depend on timing or
/// on the number of iterations (at least 4).
fn script(iters: usize, secs: u64) -> String {
    format!(
        r#"
fail=0
writer() {{ # name bs oflag base_mib
    k=0
    while [ $k -lt {iters} ] || [ $(date +%s) -lt $end ]; do
        p=$((k % {PATTERNS}))
        off=$(( ($4 + p) * 1048576 ))
        if ! dd if=/pat/$1$p of=/dev/vda bs=$2 seek=$off oflag=$3,seek_bytes conv=notrunc$5 status=none; then
            echo "RESULT $1_error=write_k$k"; return 1
        fi
        got=$(dd if=/dev/vda bs=64k skip=$off count=1048576 iflag=direct,skip_bytes,count_bytes status=none | md5sum | cut -d' ' -f1)
        want=$(md5sum < /pat/$1$p | cut -d' ' -f1)
        if [ "$got" != "$want" ]; then echo "RESULT $1_error=verify_k$k"; return 1; fi
        k=$((k + 1))
    done
    return 0
}}
end=$(( $(date +%s) + {secs} ))
echo PHASE-WRITING
( writer d 65536 direct 8 "" ) & pd=$!
( writer b 1048576 seek_bytes 24 ",fsync" ) & pb=$!
if wait $pd; then echo "RESULT d_ok=1"; else echo "RESULT d_ok=0"; fail=1; fi
if wait $pb; then echo "RESULT b_ok=1"; else echo "RESULT b_ok=0"; fail=1; fi
echo PHASE-DONE
sync /dev/vda
echo 3 > /proc/sys/vm/drop_caches
echo "RESULT disk_md5=$(md5sum < /dev/vda | cut -d' ' -f1)"
echo "RESULT queues=$(ls /sys/block/vda/mq | wc -l)"
exit $fail
"#
    )
}

/// How the daemon is stopped and restarted during the run, in order: `true` is a SIGKILL at a
/// random moment (a crash), `false` a SIGTERM (the upgrade procedure); each is followed by a
/// new daemon on the same socket.
type Restarts = &'static [bool];

struct RunResult {
    image_md5: String,
    guest_md5: String,
    restarts: usize,
}

fn run(
    env: &GuestEnv,
    test: &str,
    tag: &str,
    iters: usize,
    secs: u64,
    plan: Restarts,
    seed: u64,
) -> RunResult {
    let logs = log_dir(test).expect("log dir");
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("disk.raw");
    write_random_image(&image, DISK_BYTES, 0x5eed_1400).expect("image");
    let mut cfg =
        GuestConfig::new(&format!("{tag}-guest"), &script(iters, secs)).timeout(GUEST_TIMEOUT);
    let mut prng = StdRng::seed_from_u64(0x1400);
    for w in ["d", "b"] {
        for p in 0..PATTERNS {
            let mut data = vec![0u8; MIB as usize];
            prng.fill_bytes(&mut data);
            cfg = cfg.file(&format!("pat/{w}{p}"), &data, 0o644);
        }
    }
    let dcfg = DaemonConfig::new(DaemonKind::Snapblk, &image)
        .num_queues(2)
        .cache(&std::env::var("SNAPBLK_RESTART_CACHE").unwrap_or_else(|_| "writeback".into()));
    let mut daemon =
        Daemon::start(&dcfg, &logs, &format!("{tag}-daemon")).unwrap_or_else(|e| panic!("{e}"));
    cfg = cfg.disk_reconnecting(daemon.socket(), 2);
    let mut guest = env.boot(&cfg, &logs).expect("boot guest");
    guest
        .wait_for("PHASE-WRITING")
        .unwrap_or_else(|e| panic!("{tag}: {e}"));
    let mut rng = StdRng::seed_from_u64(seed);
    let mut restarts = 0;
    for &kill in plan {
        std::thread::sleep(Duration::from_millis(rng.random_range(500..3000)));
        if guest.log().contains("PHASE-DONE") {
            break;
        }
        daemon
            .restart(kill)
            .unwrap_or_else(|e| panic!("{tag}: restart: {e}"));
        restarts += 1;
    }
    let t0 = Instant::now();
    let out = match guest.wait() {
        Ok(o) => o,
        Err(e) => panic!(
            "{tag}: guest failed after {restarts} restart(s): {e}\n--- daemon log ---\n{}",
            daemon.log()
        ),
    };
    let tail = t0.elapsed();
    let daemon_log = daemon.log();
    daemon
        .terminate(Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        out.require("queues"),
        "2",
        "{tag}: guest should use 2 queues"
    );
    assert_eq!(
        out.require("d_ok"),
        "1",
        "{tag}: O_DIRECT writer failed ({:?}) after {restarts} restart(s)\n{}\n--- daemon log ---\n{daemon_log}",
        out.get("d_error"),
        out.log_tail()
    );
    assert_eq!(
        out.require("b_ok"),
        "1",
        "{tag}: buffered writer failed ({:?}) after {restarts} restart(s)\n{}\n--- daemon log ---\n{daemon_log}",
        out.get("b_error"),
        out.log_tail()
    );
    out.assert_script_ok();
    let image_md5 = md5_file(&image).expect("md5");
    assert_eq!(
        image_md5,
        out.require("disk_md5"),
        "{tag}: host image != the guest's /dev/vda"
    );
    eprintln!(
        "{tag}: {restarts} restart(s), guest finished {:.1} s after the last one, total {:.1} s",
        tail.as_secs_f64(),
        out.elapsed.as_secs_f64()
    );
    RunResult {
        image_md5,
        guest_md5: out.require("disk_md5").to_string(),
        restarts,
    }
}

fn compare_with_no_kill_run(test: &str, iters: usize, plan: Restarts) {
    let Some(env) = guest_env_or_skip(test) else {
        return;
    };
    let _serial = guest_lock();
    let seed = std::env::var("SNAPBLK_RESTART_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::rng().random());
    eprintln!("{test}: seed {seed} (SNAPBLK_RESTART_SEED)");
    // Long enough for every planned restart (at most 3 s apart plus a reconnect each) on a fast
    // host; the slot contents do not depend on how many iterations run.
    let secs = 6 + 5 * plan.len() as u64;
    let reference = run(&env, test, "reference", iters, secs, &[], seed);
    let restarted = run(&env, test, "restarted", iters, secs, plan, seed);
    assert_eq!(
        restarted.restarts,
        plan.len(),
        "the workload ended before every planned restart happened; make it longer"
    );
    assert_eq!(reference.guest_md5, reference.image_md5);
    assert_eq!(
        restarted.image_md5, reference.image_md5,
        "the disk after restarts differs from the same workload's disk without them"
    );
}

/// Default suite: a crash, an upgrade (SIGTERM and a new daemon) and another crash in one
/// guest run, plus the no-kill reference run.
#[test]
fn guest_io_survives_daemon_sigkill_and_upgrade_and_disk_equals_the_no_kill_run() {
    compare_with_no_kill_run(
        "guest_io_survives_daemon_sigkill_and_upgrade_and_disk_equals_the_no_kill_run",
        24,
        &[true, false, true],
    );
}

/// `make restart-soak`: more iterations, more kills.
#[test]
#[ignore = "long: several minutes under TCG; make restart-soak"]
fn soak_guest_io_survives_many_daemon_sigkills() {
    compare_with_no_kill_run(
        "soak_guest_io_survives_many_daemon_sigkills",
        120,
        &[true, true, false, true, true, true, false, true, true, true],
    );
}
