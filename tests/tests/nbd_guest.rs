//! A real Linux guest (QEMU TCG) on a qcow2 overlay whose base is served by qemu-nbd on a unix
//! socket (issue 16).
//!
//! What it protects: the guest's view of its disk equals the host's view of the same overlay
//! through `qemu-img convert` (with the NBD base); bytes the guest never wrote are the base's;
//! while the NBD server is down the guest gets I/O errors for reads of base data it never read
//! (never zeros) and its whole-cluster writes and fsyncs still succeed; once the server is back
//! the same reads succeed. The overlay is made by `snapblk create -b nbd+unix://...`, so QEMU's
//! block layer (qemu-img) opening it is checked too.
//!
//! Runs with the other guest tests (skips without QEMU/kernel unless `SNAPBLK_REQUIRE_GUEST=1`).

use std::time::Duration;

use snapblk_tests::guest::{
    guest_env_or_skip, guest_lock, host_tool, log_dir, md5_file, md5_range, write_random_image,
    Daemon, DaemonConfig, DaemonKind, GuestConfig, ImageFormat,
};
use snapblk_tests::nbd::{convert_md5, snapblk_create_over, NbdServer, ServerKind};

const MIB: u64 = 1 << 20;
const KIB: u64 = 1 << 10;
const DISK: u64 = 64 * MIB;

/// Regions the guest writes before the outage: (name, offset, length, dd block size).
const WRITES: &[(&str, u64, u64, u64)] = &[
    ("w0", MIB + 4 * KIB, 512, 512), // inside a cluster: COW from the NBD base
    ("w1", 2 * MIB + 60 * KIB, 8 * KIB, 4 * KIB), // straddles two clusters
    ("w2", 8 * MIB, 4 * MIB, 64 * KIB),
    ("w3", 20 * MIB + 512, MIB, 64 * KIB),
    ("w4", DISK - 64 * KIB, 64 * KIB, 64 * KIB),
];
/// Whole cluster written while the server is down (needs no base data).
const DOWN_WRITE: (u64, u64) = (30 * MIB, 64 * KIB);
/// Where the guest probes base reads during the outage (one fresh 64 KiB per try).
const PROBE_BASE: u64 = 40 * MIB;

fn script() -> String {
    let mut s = String::from(
        "fail=0\n\
         rd() { dd if=/dev/vda bs=4096 skip=$1 count=1 iflag=direct,skip_bytes status=none 2>/dev/null | md5sum | cut -d' ' -f1; }\n\
         rd_ok() { dd if=/dev/vda of=/dev/null bs=4096 skip=$1 count=1 iflag=direct,skip_bytes status=none 2>/dev/null; }\n",
    );
    for (name, off, len, bs) in WRITES {
        s.push_str(&format!(
            "dd if=/dev/urandom of=/tmp/{name} bs={len} count=1 iflag=fullblock status=none\n\
             dd if=/tmp/{name} of=/dev/vda bs={bs} seek={off} oflag=direct,seek_bytes conv=notrunc status=none || fail=1\n"
        ));
    }
    s.push_str("sync /dev/vda\necho \"RESULT phase=written fail=$fail\"\n");
    // Wait for the outage: a read of base data never read before fails (each try a fresh
    // 64 KiB, so the daemon's cache cannot answer it).
    s.push_str(&format!(
        "i=0; down=no\n\
         while [ $i -lt 120 ]; do off=$(( {PROBE_BASE} + i * 65536 )); if rd_ok $off; then usleep 500000; else down=yes; break; fi; i=$((i+1)); done\n\
         echo \"RESULT down_read_failed=$down down_off=$off\"\n"
    ));
    let (doff, dlen) = DOWN_WRITE;
    s.push_str(&format!(
        "dd if=/dev/urandom of=/tmp/down bs={dlen} count=1 status=none\n\
         if dd if=/tmp/down of=/dev/vda bs={dlen} seek={doff} oflag=direct,seek_bytes conv=notrunc status=none && sync /dev/vda; then echo 'RESULT down_write=ok'; else echo 'RESULT down_write=fail'; fi\n\
         echo \"RESULT down_readback=$( [ \"$(dd if=/dev/vda bs={dlen} skip={doff} count=1 iflag=direct,skip_bytes status=none | md5sum | cut -d' ' -f1)\" = \"$(md5sum < /tmp/down | cut -d' ' -f1)\" ] && echo ok || echo bad)\"\n\
         echo 'RESULT phase=down_checked'\n"
    ));
    // Wait for the server to be back: the read that failed succeeds.
    s.push_str(
        "j=0; up=no\n\
         while [ $j -lt 120 ]; do if rd_ok $off; then up=yes; break; fi; usleep 500000; j=$((j+1)); done\n\
         echo \"RESULT up_read=$up\"\n\
         echo 3 > /proc/sys/vm/drop_caches\n\
         echo \"RESULT disk_md5=$(md5sum < /dev/vda | cut -d' ' -f1)\"\n\
         exit $fail\n",
    );
    s
}

#[test]
fn guest_on_an_overlay_over_an_nbd_base_matches_qemu_img_and_survives_a_server_outage() {
    let test = "guest_on_an_overlay_over_an_nbd_base";
    let Some(env) = guest_env_or_skip(test) else {
        return;
    };
    let _serial = guest_lock();
    let logs = log_dir(test).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    write_random_image(&base, DISK, 0x5eed_0016).unwrap();
    let base_md5 = md5_file(&base).unwrap();
    let mut server = NbdServer::start(
        ServerKind::QemuNbd { shared: 0 },
        &base,
        &dir.path().join("nbd.sock"),
    );
    let overlay = dir.path().join("overlay.qcow2");
    snapblk_create_over(&server.uri(), &overlay);
    let cfg = DaemonConfig::new(DaemonKind::Snapblk, &overlay)
        .format(ImageFormat::Qcow2)
        .num_queues(2)
        .arg("--nbd-timeout")
        .arg("5");
    let daemon = Daemon::start(&cfg, &logs, "daemon").unwrap_or_else(|e| panic!("{e}"));
    let gcfg = GuestConfig::new("guest", &script())
        .disk(daemon.socket(), 2)
        .timeout(Duration::from_secs(300));
    let mut guest = env.boot(&gcfg, &logs).unwrap_or_else(|e| panic!("{e}"));
    guest.wait_for("RESULT phase=written").unwrap();
    server.kill();
    guest.wait_for("RESULT phase=down_checked").unwrap();
    server.restart();
    let out = guest
        .wait()
        .unwrap_or_else(|e| panic!("{e}\n{}", daemon.log()));
    out.assert_script_ok();
    assert_eq!(out.require("down_read_failed"), "yes", "{}", out.log_tail());
    assert_eq!(out.require("down_write"), "ok", "{}", out.log_tail());
    assert_eq!(out.require("down_readback"), "ok");
    assert_eq!(out.require("up_read"), "yes");
    daemon.terminate(Duration::from_secs(60)).unwrap();

    host_tool("qemu-img", &["check", overlay.to_str().unwrap()]);
    let flat = dir.path().join("flat.raw");
    assert_eq!(
        convert_md5(&overlay, &flat),
        out.require("disk_md5"),
        "qemu-img convert of the overlay (NBD base) != the guest's md5 of /dev/vda"
    );
    // The read that failed during the outage left nothing behind: base bytes there.
    let down_off: u64 = out.require("down_off").parse().unwrap();
    assert_eq!(
        md5_range(&flat, down_off, 4096).unwrap(),
        md5_range(&base, down_off, 4096).unwrap()
    );
    // Outside the written regions the disk is the base.
    let mut written: Vec<(u64, u64)> = WRITES.iter().map(|w| (w.1, w.2)).collect();
    written.push(DOWN_WRITE);
    written.sort();
    let mut pos = 0;
    for (off, len) in written.iter().copied().chain([(DISK, 0)]) {
        if off > pos {
            assert_eq!(
                md5_range(&flat, pos, off - pos).unwrap(),
                md5_range(&base, pos, off - pos).unwrap(),
                "bytes the guest never wrote differ from the NBD base: [{pos}, {off})"
            );
        }
        pos = pos.max(off + len);
    }
    assert_eq!(
        md5_file(&base).unwrap(),
        base_md5,
        "the NBD base was written"
    );
}
