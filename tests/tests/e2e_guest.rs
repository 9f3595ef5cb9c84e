//! End-to-end tests with a real Linux guest (QEMU TCG) whose disk is a vhost-user-blk device.
//!
//! What they protect: every write the guest saw completed and flushed is in the image file,
//! at the right place, after the daemon stops on SIGTERM; nothing outside the written
//! regions changes; a daemon survives its VM being SIGKILLed and serves the next VM.
//! The same scenarios run against the reference peer `qemu-storage-daemon` to prove that the
//! harness and the guest scripts themselves are right.
//!
//! Guest boots are serialized with `guest_lock()` (each wants both host cores). They skip
//! when QEMU/kernel are unavailable, unless `SNAPBLK_REQUIRE_GUEST=1` (`make test`, CI).

use std::path::Path;
use std::time::{Duration, Instant};

use snapblk_tests::guest::{
    guest_env_or_skip, guest_lock, log_dir, md5_file, md5_range, write_random_image, Daemon,
    DaemonConfig, DaemonKind, GuestConfig, GuestEnv, GuestOutput,
};

const MIB: u64 = 1 << 20;
/// Size of the test disk.
const DISK_MIB: u64 = 128;
/// Time the daemon gets to exit after SIGTERM (it flushes its cache first).
const STOP_TIMEOUT: Duration = Duration::from_secs(60);
/// Upper bound for one guest run under TCG on a loaded 2-core host.
const GUEST_TIMEOUT: Duration = Duration::from_secs(240);

/// How a region is written by the guest.
#[derive(Clone, Copy, Debug)]
enum WriteMode {
    /// `dd oflag=direct` with this block size.
    Direct(u64),
    /// Two `dd oflag=direct` passes with different data over the same range, one after the
    /// other; the second must win.
    DirectTwice(u64),
    /// Buffered `dd`, then `fsync` of the device (busybox `sync FILE`).
    BufferedThenFsync(u64),
    /// Buffered `dd conv=fsync`.
    BufferedConvFsync(u64),
    /// Buffered `dd`, then global `sync`.
    BufferedThenSync(u64),
}

/// One region written by one concurrent guest writer.
#[derive(Clone, Copy, Debug)]
struct Region {
    name: &'static str,
    off_mib: u64,
    len_mib: u64,
    mode: WriteMode,
}

const REGIONS: &[Region] = &[
    Region {
        name: "r0",
        off_mib: 8,
        len_mib: 8,
        mode: WriteMode::Direct(64 * 1024),
    },
    Region {
        name: "r1",
        off_mib: 24,
        len_mib: 4,
        mode: WriteMode::Direct(4096),
    },
    Region {
        name: "r2",
        off_mib: 40,
        len_mib: 8,
        mode: WriteMode::BufferedThenFsync(MIB),
    },
    Region {
        name: "r3",
        off_mib: 56,
        len_mib: 8,
        mode: WriteMode::BufferedConvFsync(128 * 1024),
    },
    Region {
        name: "r4",
        off_mib: 72,
        len_mib: 4,
        mode: WriteMode::DirectTwice(256 * 1024),
    },
    Region {
        name: "r5",
        off_mib: 88,
        len_mib: 1,
        mode: WriteMode::BufferedThenSync(512),
    },
    Region {
        name: "r6",
        // Last MiB of the disk: the end-of-device boundary.
        off_mib: DISK_MIB - 1,
        len_mib: 1,
        mode: WriteMode::Direct(512),
    },
];

/// Byte ranges of the disk that no writer touches: (offset, length).
fn untouched_ranges(regions: &[Region]) -> Vec<(u64, u64)> {
    let mut sorted: Vec<Region> = regions.to_vec();
    sorted.sort_by_key(|r| r.off_mib);
    let mut out = Vec::new();
    let mut pos = 0;
    for r in sorted {
        if r.off_mib > pos {
            out.push((pos * MIB, (r.off_mib - pos) * MIB));
        }
        pos = r.off_mib + r.len_mib;
    }
    if pos < DISK_MIB {
        out.push((pos * MIB, (DISK_MIB - pos) * MIB));
    }
    out
}

/// Shell helpers shared by the guest scripts (busybox sh).
const SCRIPT_PRELUDE: &str = r#"
MiB=1048576
fail=0
# md5 of LEN_MIB MiB at OFF_MIB, read with O_DIRECT (bypasses the guest page cache).
region_md5() { dd if=/dev/vda bs=1M skip=$(($1 * MiB)) count=$2 iflag=direct,skip_bytes status=none | md5sum | cut -d' ' -f1; }
file_md5() { md5sum < "$1" | cut -d' ' -f1; }
check_region() { # name off_mib len_mib pattern_file
    got=$(region_md5 $2 $3)
    want=$(file_md5 $4)
    if [ "$got" = "$want" ]; then ok=1; else ok=0; fail=1; fi
    echo "RESULT $1_md5=$got $1_ok=$ok"
}
"#;

/// The concurrent-writers guest script for `regions`.
fn writers_script(regions: &[Region]) -> String {
    let mut s = String::from(SCRIPT_PRELUDE);
    s.push_str("t0=$(date +%s)\n");
    for r in regions {
        let n = r.len_mib;
        s.push_str(&format!(
            "dd if=/dev/urandom of=/tmp/{0} bs=1M count={n} status=none\n",
            r.name
        ));
        if let WriteMode::DirectTwice(_) = r.mode {
            s.push_str(&format!(
                "dd if=/dev/urandom of=/tmp/{0}_first bs=1M count={n} status=none\n",
                r.name
            ));
        }
    }
    s.push_str("echo 'RESULT phase=patterns_ready'\n");
    for r in regions {
        let (name, off) = (r.name, r.off_mib);
        let dd = |src: &str, bs: u64, oflag: &str| {
            format!("dd if=/tmp/{src} of=/dev/vda bs={bs} seek=$(({off} * MiB)) oflag={oflag} conv=notrunc status=none")
        };
        let body = match r.mode {
            WriteMode::Direct(bs) => dd(name, bs, "direct,seek_bytes"),
            WriteMode::DirectTwice(bs) => format!(
                "{} && {}",
                dd(&format!("{name}_first"), bs, "direct,seek_bytes"),
                dd(name, bs, "direct,seek_bytes")
            ),
            WriteMode::BufferedThenFsync(bs) => {
                format!("{} && sync /dev/vda", dd(name, bs, "seek_bytes"))
            }
            WriteMode::BufferedConvFsync(bs) => {
                dd(name, bs, "seek_bytes").replace("conv=notrunc", "conv=notrunc,fsync")
            }
            WriteMode::BufferedThenSync(bs) => format!("{} && sync", dd(name, bs, "seek_bytes")),
        };
        s.push_str(&format!("( {body} ) & pid_{name}=$!\n"));
    }
    for r in regions {
        let name = r.name;
        s.push_str(&format!(
            "if wait $pid_{name}; then echo 'RESULT {name}_write=ok'; else echo 'RESULT {name}_write=fail'; fail=1; fi\n"
        ));
    }
    s.push_str("echo \"RESULT write_secs=$(( $(date +%s) - t0 ))\"\n");
    // Flush everything, forget the guest's cache, read back through the daemon.
    s.push_str("sync /dev/vda\necho 3 > /proc/sys/vm/drop_caches\n");
    for r in regions {
        s.push_str(&format!(
            "check_region {0} {1} {2} /tmp/{0}\n",
            r.name, r.off_mib, r.len_mib
        ));
    }
    s.push_str("echo 3 > /proc/sys/vm/drop_caches\n");
    s.push_str("echo \"RESULT disk_md5=$(md5sum < /dev/vda | cut -d' ' -f1)\"\n");
    s.push_str("echo \"RESULT disk_bytes=$(blockdev --getsize64 /dev/vda) queues=$(ls /sys/block/vda/mq | wc -l)\"\n");
    s.push_str("echo \"RESULT total_secs=$(( $(date +%s) - t0 ))\"\n");
    s.push_str("exit $fail\n");
    s
}

/// Boots one guest running `script` against `daemon`, waits for poweroff.
fn run_guest(
    env: &GuestEnv,
    daemon: &Daemon,
    name: &str,
    script: &str,
    logs: &Path,
) -> GuestOutput {
    let cfg = GuestConfig::new(name, script)
        .disk(daemon.socket(), 2)
        .timeout(GUEST_TIMEOUT);
    match env.run(&cfg, logs) {
        Ok(out) => out,
        Err(e) => panic!(
            "{name}: {e}\n--- daemon log tail ---\n{}",
            daemon.log().lines().rev().take(40).collect::<Vec<_>>().join("\n")
        ),
    }
}

/// The concurrent-writers scenario against `kind`; returns nothing, asserts everything.
fn concurrent_writers_match_host_image(kind: DaemonKind, test: &str) {
    let Some(env) = guest_env_or_skip(test) else {
        return;
    };
    let _serial = guest_lock();
    let logs = log_dir(test).expect("log dir");
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("disk.raw");
    write_random_image(&image, DISK_MIB * MIB, 0x5eed_0001).expect("create image");
    let gaps = untouched_ranges(REGIONS);
    let gap_md5_before: Vec<String> = gaps
        .iter()
        .map(|&(off, len)| md5_range(&image, off, len).expect("md5 gap"))
        .collect();

    let t0 = Instant::now();
    let daemon = Daemon::start(&DaemonConfig::new(kind, &image).num_queues(2), &logs, "daemon")
        .unwrap_or_else(|e| panic!("{e}"));
    let out = run_guest(&env, &daemon, "guest", &writers_script(REGIONS), &logs);
    let guest_secs = t0.elapsed().as_secs_f64();
    daemon
        .terminate(STOP_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));

    out.assert_script_ok();
    assert_eq!(out.require("init_disks"), "1", "guest saw no disk");
    assert_eq!(out.require("queues"), "2", "guest should use 2 virtqueues");
    assert_eq!(
        out.require("disk_bytes"),
        (DISK_MIB * MIB).to_string(),
        "guest-visible disk size"
    );
    for r in REGIONS {
        assert_eq!(out.require(&format!("{}_write", r.name)), "ok", "{r:?}");
        assert_eq!(
            out.require(&format!("{}_ok", r.name)),
            "1",
            "guest read back different data for {r:?}\n{}",
            out.log_tail()
        );
        let host = md5_range(&image, r.off_mib * MIB, r.len_mib * MIB).expect("md5 region");
        assert_eq!(
            host,
            out.require(&format!("{}_md5", r.name)),
            "image file differs from what the guest wrote in {r:?}"
        );
    }
    for (&(off, len), before) in gaps.iter().zip(&gap_md5_before) {
        let after = md5_range(&image, off, len).expect("md5 gap");
        assert_eq!(
            &after, before,
            "bytes the guest never wrote changed: [{off}, +{len})"
        );
    }
    let host_md5 = md5_file(&image).expect("md5 image");
    assert_eq!(
        host_md5,
        out.require("disk_md5"),
        "host md5 of the image != guest md5 of /dev/vda"
    );
    eprintln!(
        "{test}: guest run {guest_secs:.1} s (in-guest writes {} s, total {} s), md5 {host_md5} on both sides",
        out.require("write_secs"),
        out.require("total_secs"),
    );
}

#[test]
fn snapblk_concurrent_guest_writes_land_in_image_after_sigterm() {
    concurrent_writers_match_host_image(
        DaemonKind::Snapblk,
        "snapblk_concurrent_guest_writes_land_in_image_after_sigterm",
    );
}

#[test]
fn reference_qsd_concurrent_guest_writes_land_in_image_after_sigterm() {
    concurrent_writers_match_host_image(
        DaemonKind::QemuStorageDaemon,
        "reference_qsd_concurrent_guest_writes_land_in_image_after_sigterm",
    );
}

/// First VM: writes+fsyncs region A, announces it, then keeps writing region C until killed.
const RECONNECT_FIRST: &str = r#"
dd if=/dev/urandom of=/tmp/a bs=1M count=4 status=none
dd if=/dev/urandom of=/tmp/c bs=1M count=4 status=none
dd if=/tmp/a of=/dev/vda bs=64k seek=$((8 * MiB)) oflag=direct,seek_bytes conv=notrunc status=none || fail=1
sync /dev/vda || fail=1
check_region a 8 4 /tmp/a
echo "RESULT first_fail=$fail"
echo PHASE1-SYNCED
# Keep I/O in flight until QEMU is killed.
while true; do
    dd if=/tmp/c of=/dev/vda bs=64k seek=$((32 * MiB)) oflag=direct,seek_bytes conv=notrunc status=none
    dd if=/dev/vda of=/dev/null bs=64k skip=$((32 * MiB)) count=16 iflag=direct,skip_bytes status=none
done
"#;

/// Second VM on the same daemon: region A must still be there; writes+fsyncs region B.
const RECONNECT_SECOND: &str = r#"
echo "RESULT a_after_md5=$(region_md5 8 4)"
dd if=/dev/urandom of=/tmp/b bs=1M count=4 status=none
dd if=/tmp/b of=/dev/vda bs=128k seek=$((16 * MiB)) oflag=direct,seek_bytes conv=notrunc status=none || fail=1
dd if=/tmp/b of=/dev/vda bs=1M seek=$((48 * MiB)) oflag=seek_bytes conv=notrunc,fsync status=none || fail=1
sync /dev/vda || fail=1
echo 3 > /proc/sys/vm/drop_caches
check_region b 16 4 /tmp/b
check_region b2 48 4 /tmp/b
echo "RESULT disk_md5=$(md5sum < /dev/vda | cut -d' ' -f1)"
exit $fail
"#;

fn reconnect_after_qemu_sigkill(kind: DaemonKind, test: &str) {
    let Some(env) = guest_env_or_skip(test) else {
        return;
    };
    let _serial = guest_lock();
    let logs = log_dir(test).expect("log dir");
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("disk.raw");
    write_random_image(&image, DISK_MIB * MIB, 0x5eed_0002).expect("create image");
    let daemon = Daemon::start(&DaemonConfig::new(kind, &image).num_queues(2), &logs, "daemon")
        .unwrap_or_else(|e| panic!("{e}"));

    // VM 1: killed with SIGKILL while it has I/O in flight.
    let first_script = format!("{SCRIPT_PRELUDE}{RECONNECT_FIRST}");
    let cfg = GuestConfig::new("guest1", &first_script)
        .disk(daemon.socket(), 2)
        .timeout(GUEST_TIMEOUT);
    let mut vm1 = env.boot(&cfg, &logs).expect("boot first guest");
    vm1.wait_for("PHASE1-SYNCED")
        .unwrap_or_else(|e| panic!("first guest: {e}"));
    std::thread::sleep(Duration::from_secs(2));
    let first_log = vm1.log();
    vm1.kill();
    let first = snapblk_tests::guest::parse_results(&first_log)
        .into_iter()
        .collect::<std::collections::BTreeMap<_, _>>();
    assert_eq!(
        first.get("first_fail").map(String::as_str),
        Some("0"),
        "{first_log}"
    );
    assert_eq!(first.get("a_ok").map(String::as_str), Some("1"), "{first_log}");
    let a_md5 = first.get("a_md5").cloned().expect("a_md5");

    // The daemon must still be there, ready for the next VM.
    std::thread::sleep(Duration::from_millis(500));
    let mut daemon = daemon;
    assert!(
        daemon.is_running(),
        "daemon exited after its VM was killed:\n{}",
        daemon.log()
    );

    // VM 2: same socket, same daemon process.
    let second_script = format!("{SCRIPT_PRELUDE}{RECONNECT_SECOND}");
    let out = run_guest(&env, &daemon, "guest2", &second_script, &logs);
    daemon
        .terminate(STOP_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
    out.assert_script_ok();
    assert_eq!(
        out.require("a_after_md5"),
        a_md5,
        "data fsynced by the killed VM is gone for the next VM"
    );
    assert_eq!(out.require("b_ok"), "1");
    assert_eq!(out.require("b2_ok"), "1");
    assert_eq!(
        md5_range(&image, 8 * MIB, 4 * MIB).expect("md5"),
        a_md5,
        "region fsynced by the killed VM"
    );
    assert_eq!(
        md5_range(&image, 16 * MIB, 4 * MIB).expect("md5"),
        out.require("b_md5")
    );
    assert_eq!(
        md5_range(&image, 48 * MIB, 4 * MIB).expect("md5"),
        out.require("b2_md5")
    );
    assert_eq!(
        md5_file(&image).expect("md5"),
        out.require("disk_md5"),
        "host md5 of the image != second guest's md5 of /dev/vda"
    );
}

#[test]
fn snapblk_serves_new_vm_after_qemu_sigkill_and_keeps_fsynced_data() {
    reconnect_after_qemu_sigkill(
        DaemonKind::Snapblk,
        "snapblk_serves_new_vm_after_qemu_sigkill_and_keeps_fsynced_data",
    );
}

#[test]
fn reference_qsd_serves_new_vm_after_qemu_sigkill_and_keeps_fsynced_data() {
    reconnect_after_qemu_sigkill(
        DaemonKind::QemuStorageDaemon,
        "reference_qsd_serves_new_vm_after_qemu_sigkill_and_keeps_fsynced_data",
    );
}

#[test]
fn untouched_ranges_cover_exactly_the_gaps() {
    let r = untouched_ranges(REGIONS);
    let written: u64 = REGIONS.iter().map(|r| r.len_mib * MIB).sum();
    let gaps: u64 = r.iter().map(|&(_, l)| l).sum();
    assert_eq!(written + gaps, DISK_MIB * MIB);
    assert_eq!(r.first(), Some(&(0, 8 * MIB)));
}
