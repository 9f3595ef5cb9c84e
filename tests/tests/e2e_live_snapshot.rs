//! A live snapshot taken through the control socket while a real Linux guest (QEMU TCG) writes.
//!
//! What it protects: the frozen image holds exactly what the guest had written and synced at the
//! snapshot moment (the guest prints the md5 of the region it synced, then waits), it is a
//! consistent read-only image that `qemu-img check`/`convert` and `snapblk checksum` read while
//! the guest keeps writing, bytes the guest never wrote are the base's, and the guest's final
//! disk is exactly the new overlay chain after the daemon stops.
//!
//! Skips when QEMU/kernel are unavailable, unless `SNAPBLK_REQUIRE_GUEST=1`.

use std::path::Path;
use std::time::Duration;

use serde_json::Value;
use snapblk_tests::guest::{
    guest_env_or_skip, guest_lock, host_tool, log_dir, md5_file, md5_range, snapblk_binary,
    write_random_image, Daemon, DaemonConfig, DaemonKind, GuestConfig, ImageFormat,
};

const MIB: u64 = 1 << 20;
const DISK: u64 = 64 * MIB;
/// Region the guest writes and syncs before the snapshot, and partly rewrites after it.
const A: (u64, u64) = (0, 8 * MIB);
/// Region a background writer keeps writing through the snapshot.
const B: (u64, u64) = (32 * MIB, 8 * MIB);

const SCRIPT: &str = r#"
MiB=1048576
region_md5() { dd if=/dev/vda bs=64k skip=$1 count=$2 iflag=direct,skip_bytes,count_bytes status=none | md5sum | cut -d' ' -f1; }
dd if=/dev/urandom of=/tmp/a bs=1M count=8 iflag=fullblock status=none
# Background workload on region B (32 MiB .. 40 MiB) for the whole test.
( i=0; while [ ! -e /tmp/stop ]; do
    dd if=/dev/urandom of=/dev/vda bs=64k count=16 seek=$(( 512 + (i % 8) * 16 )) oflag=direct conv=notrunc status=none
    i=$((i+1))
  done; echo "RESULT bg_loops=$i" ) &
bg=$!
# Region A: buffered writes, then sync (the guest's FLUSH).
dd if=/tmp/a of=/dev/vda bs=1M seek=0 conv=notrunc status=none
sync
echo "RESULT a_md5=$(region_md5 0 $((8*MiB)))"
echo "RESULT snap_ready=1"
# The host takes the snapshot now, while region B keeps being written.
sleep 10
echo "RESULT phase2=1"
dd if=/dev/urandom of=/dev/vda bs=1M count=4 seek=2 oflag=direct conv=notrunc status=none
touch /tmp/stop
wait $bg
sync
echo 3 > /proc/sys/vm/drop_caches
echo "RESULT disk_md5=$(md5sum < /dev/vda | cut -d' ' -f1)"
"#;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn live_snapshot_mid_workload_freezes_what_the_guest_synced_and_final_disk_matches() {
    let test = "live_snapshot_mid_workload";
    let Some(env) = guest_env_or_skip(test) else {
        return;
    };
    let _serial = guest_lock();
    let logs = log_dir(test).expect("log dir");
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    write_random_image(&base, DISK, 0x5eed_0015).unwrap();
    let base_md5 = md5_file(&base).unwrap();
    let top = dir.path().join("top.qcow2");
    let bin = snapblk_binary().unwrap();
    host_tool(
        s(&bin),
        &[
            "create",
            "--backing",
            s(&base),
            "--backing-format",
            "raw",
            s(&top),
        ],
    );
    let control = dir.path().join("control.sock");
    let cfg = DaemonConfig::new(DaemonKind::Snapblk, &top)
        .format(ImageFormat::Qcow2)
        .num_queues(2)
        .arg("--control-socket")
        .arg(s(&control));
    let daemon = Daemon::start(&cfg, &logs, "daemon").unwrap_or_else(|e| panic!("{e}"));
    let gcfg = GuestConfig::new("guest", SCRIPT)
        .disk(daemon.socket(), 2)
        .timeout(Duration::from_secs(240));
    let mut guest = env.boot(&gcfg, &logs).unwrap_or_else(|e| panic!("{e}"));
    guest
        .wait_for("RESULT snap_ready=1")
        .unwrap_or_else(|e| panic!("{e}"));

    let new_top = dir.path().join("after.qcow2");
    let mut args = serde_json::Map::new();
    args.insert("overlay".into(), Value::String(s(&new_top).into()));
    let r = snapblk::ctl::call(&control, "snapshot", args, Duration::from_secs(120))
        .unwrap_or_else(|e| panic!("snapshot: {e}\n{}", daemon.log()));
    assert!(
        !guest.log().contains("RESULT phase2=1"),
        "the snapshot took longer than the guest's wait; the test cannot tell what it froze"
    );
    eprintln!("snapshot under a guest workload: {r}");

    // While the guest keeps writing: the frozen image is consistent and readable.
    let frozen = std::fs::canonicalize(&top).unwrap();
    assert_eq!(r["frozen"], s(&frozen));
    host_tool("qemu-img", &["check", s(&frozen)]);
    let flat = dir.path().join("frozen.raw");
    host_tool("qemu-img", &["convert", "-O", "raw", s(&frozen), s(&flat)]);
    let ours = host_tool(s(&bin), &["checksum", s(&frozen)]);
    let flat_sha = host_tool("sha256sum", &[s(&flat)]);
    assert_eq!(
        ours.split_whitespace().next(),
        flat_sha.split_whitespace().next(),
        "snapblk checksum of the frozen image != sha256 of its qemu-img convert"
    );

    let out = guest.wait().unwrap_or_else(|e| panic!("{e}"));
    out.assert_script_ok();
    assert_eq!(
        md5_range(&flat, A.0, A.1).unwrap(),
        out.require("a_md5"),
        "frozen region A differs from what the guest had synced at the snapshot"
    );
    for (off, len) in [(A.0 + A.1, B.0 - A.0 - A.1), (B.0 + B.1, DISK - B.0 - B.1)] {
        assert_eq!(
            md5_range(&flat, off, len).unwrap(),
            md5_range(&base, off, len).unwrap(),
            "frozen bytes the guest never wrote differ from the base: [{off}, +{len})"
        );
    }
    assert!(out.require("bg_loops").parse::<u64>().unwrap() > 0);

    daemon
        .terminate(Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{e}"));
    host_tool("qemu-img", &["check", s(&new_top)]);
    let final_flat = dir.path().join("final.raw");
    host_tool(
        "qemu-img",
        &["convert", "-O", "raw", s(&new_top), s(&final_flat)],
    );
    assert_eq!(
        md5_file(&final_flat).unwrap(),
        out.require("disk_md5"),
        "the new top chain != the guest's final disk"
    );
    let info = host_tool("qemu-img", &["info", s(&new_top)]);
    assert!(
        info.contains(s(&frozen)),
        "new top's backing is not the frozen image: {info}"
    );
    assert_eq!(md5_file(&base).unwrap(), base_md5, "base modified");
}
