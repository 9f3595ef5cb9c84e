//! Image locking against the real QEMU tools, in both directions: while qemu-storage-daemon
//! holds an overlay read-write, snapblk's writers (`commit`, `check --repair`, `serve`) and plain
//! readers refuse with one line naming the file and saying it is in use, while `-U` inspection
//! works; while `snapblk serve` holds an overlay, `qemu-io` writes, `qemu-img commit` and a second
//! `snapblk serve` are refused, `qemu-img info -U` works, and everything works again once the
//! daemon has exited. Skipped (with a message) when the QEMU tools are not installed.

mod common;

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use common::*;

fn tools_present() -> bool {
    let ok = ["qemu-img", "qemu-io", "qemu-storage-daemon"]
        .iter()
        .all(|t| have(t));
    if !ok {
        eprintln!("skipped: qemu-img, qemu-io and qemu-storage-daemon are needed");
    }
    ok
}

/// The command failed with exactly one stderr line that names `file` and says it is in use.
fn assert_in_use(what: &str, o: &Output, file: &Path) {
    let err = stderr(o);
    assert!(!o.status.success(), "{what} succeeded: {err}");
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "{what}: not one line: {err}"
    );
    assert!(err.contains("in use"), "{what}: {err}");
    assert!(
        err.contains(s(file)),
        "{what} does not name {}: {err}",
        file.display()
    );
}

/// A raw base with a pattern and a qcow2 overlay over it with some data of its own.
fn overlay(dir: &Path) -> (PathBuf, PathBuf) {
    let base = dir.join("base.raw");
    std::fs::write(&base, vec![0x5a; 1 << 20]).unwrap();
    let ov = dir.join("o.qcow2");
    let o = run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            s(&base),
            "-F",
            "raw",
            s(&ov),
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let o = run(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 7 0 64k", s(&ov)],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    (base, ov)
}

struct Holder(Child);

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_until(what: &str, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ready() {
        assert!(Instant::now() < deadline, "{what} never became ready");
        sleep(Duration::from_millis(20));
    }
}

/// qemu-storage-daemon with the overlay opened read-write as a qcow2 node (its backing chain
/// opened read-only below it), ready when its pid file appears.
fn qsd_holding(dir: &Path, ov: &Path) -> Holder {
    let pidfile = dir.join("qsd.pid");
    let child = Command::new("qemu-storage-daemon")
        .args([
            "--blockdev",
            &format!("driver=file,filename={},node-name=f", s(ov)),
            "--blockdev",
            "driver=qcow2,file=f,node-name=q",
            "--pidfile",
            s(&pidfile),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .expect("qemu-storage-daemon");
    wait_until("qemu-storage-daemon", || pidfile.exists());
    Holder(child)
}

/// `snapblk serve` on `image`, ready when its socket accepts (the image is opened before).
fn serving(dir: &Path, image: &Path, name: &str, extra: &[&str]) -> Holder {
    let socket = dir.join(format!("{name}.sock"));
    let child = Command::new(env!("CARGO_BIN_EXE_snapblk"))
        .args(["serve", "--image", s(image), "--socket", s(&socket)])
        .args(extra)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .spawn()
        .expect("snapblk serve");
    let mut h = Holder(child);
    wait_until("snapblk serve", || {
        assert!(h.0.try_wait().unwrap().is_none(), "snapblk serve exited");
        UnixStream::connect(&socket).is_ok()
    });
    h
}

#[test]
fn an_overlay_qemu_storage_daemon_writes_is_refused_by_every_snapblk_writer_and_reader() {
    if !tools_present() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (base, ov) = overlay(dir.path());
    let base_before = std::fs::read(&base).unwrap();
    let qsd = qsd_holding(dir.path(), &ov);

    assert_in_use("commit", &snapblk(&["commit", s(&ov)]), &ov);
    assert_in_use(
        "check -r all",
        &snapblk(&["check", "-r", "all", s(&ov)]),
        &ov,
    );
    assert_in_use(
        "check -r leaks",
        &snapblk(&["check", "-r", "leaks", s(&ov)]),
        &ov,
    );
    let sock = dir.path().join("x.sock");
    assert_in_use(
        "serve",
        &snapblk(&["serve", "--image", s(&ov), "--socket", s(&sock)]),
        &ov,
    );
    assert_in_use("info", &snapblk(&["info", s(&ov)]), &ov);
    assert_in_use("checksum", &snapblk(&["checksum", s(&ov)]), &ov);
    let out = dir.path().join("out.raw");
    assert_in_use("export", &snapblk(&["export", s(&ov), s(&out)]), &ov);
    assert!(!out.exists(), "a refused export left an output");
    // The backing file is only read (a node without users does not even lock it): reading it
    // works.
    let o = snapblk(&["checksum", s(&base)]);
    assert!(o.status.success(), "{}", stderr(&o));

    // -U inspects without conflicting locks, like qemu-img -U.
    for args in [
        &["info", "-U", s(&ov)][..],
        &["info", "-U", "--output", "json", "--backing-chain", s(&ov)],
        &["check", "-U", s(&ov)],
        &["checksum", "-U", s(&ov)],
        &["export", "-U", s(&ov), s(&out)],
    ] {
        let o = snapblk(args);
        assert!(o.status.success(), "{args:?}: {}", stderr(&o));
    }
    let o = snapblk(&["check", "-U", "-r", "all", s(&ov)]);
    assert!(!o.status.success(), "-U with a repair must be refused");
    drop(qsd);

    // Released with the holder: the commit goes ahead now.
    let o = snapblk(&["commit", s(&ov)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let after = std::fs::read(&base).unwrap();
    assert!(after[..65536].iter().all(|&b| b == 7));
    assert_eq!(after[65536..], base_before[65536..]);
}

#[test]
fn an_overlay_snapblk_serves_is_refused_to_qemu_writers_and_a_second_daemon() {
    if !tools_present() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (base, ov) = overlay(dir.path());
    let daemon = serving(dir.path(), &ov, "a", &[]);

    let o = run(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 1 0 512", s(&ov)],
    );
    assert!(!o.status.success(), "qemu-io wrote a served overlay");
    assert!(stderr(&o).contains("lock"), "{}", stderr(&o));
    let o = run("qemu-img", &["commit", "-f", "qcow2", s(&ov)]);
    assert!(!o.status.success(), "qemu-img committed a served overlay");
    let o = run("qemu-img", &["info", s(&ov)]);
    assert!(
        !o.status.success(),
        "qemu-img info read a written image unshared"
    );
    // Backing files are shared for reading only.
    let o = run(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 1 0 512", s(&base)],
    );
    assert!(
        !o.status.success(),
        "qemu-io wrote the base of a served overlay"
    );
    let o = run("qemu-img", &["info", s(&base)]);
    assert!(o.status.success(), "readers share the base: {}", stderr(&o));
    // A second daemon on the same image exits at once with an in-use error.
    let sock = dir.path().join("b.sock");
    let o = snapblk(&["serve", "--image", s(&ov), "--socket", s(&sock)]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("in use"), "{}", stderr(&o));
    assert!(stderr(&o).contains(s(&ov)), "{}", stderr(&o));
    // Inspection with -U works on both sides.
    let o = run("qemu-img", &["info", "-U", s(&ov)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = snapblk(&["info", "-U", s(&ov)]);
    assert!(o.status.success(), "{}", stderr(&o));
    drop(daemon);

    let o = run(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 1 0 512", s(&ov)],
    );
    assert!(
        o.status.success(),
        "lock not released at exit: {}",
        stderr(&o)
    );
}

#[test]
fn a_read_only_served_image_is_shared_with_readers_but_not_writers() {
    if !tools_present() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.raw");
    std::fs::write(&img, vec![3u8; 1 << 20]).unwrap();
    let _daemon = serving(dir.path(), &img, "ro", &["--readonly", "--format", "raw"]);
    let o = run("qemu-img", &["info", "-f", "raw", s(&img)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = snapblk(&["checksum", s(&img)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let _second = serving(dir.path(), &img, "ro2", &["--readonly", "--format", "raw"]);
    let o = run("qemu-io", &["-f", "raw", "-c", "write 0 512", s(&img)]);
    assert!(
        !o.status.success(),
        "qemu-io wrote a read-only served image"
    );
    assert!(std::fs::read(&img).unwrap().iter().all(|&b| b == 3));
}

#[test]
fn a_base_qemu_io_holds_blocks_commit_into_it_only_while_qemu_io_runs() {
    if !tools_present() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (base, ov) = overlay(dir.path());
    // qemu-io holds the base read-write while it waits for commands on stdin.
    let spawn = || {
        Command::new("qemu-io")
            .args(["-f", "raw", s(&base)])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("qemu-io")
    };
    let mut qio = spawn();
    wait_until("qemu-io", || {
        // A probe that holds the base's reader lock at the instant qemu-io opens it makes
        // qemu-io exit ("Failed to get write lock"): start it again then.
        if qio.try_wait().ok().flatten().is_some() {
            qio = spawn();
        }
        !snapblk(&["checksum", s(&base)]).status.success()
    });
    // commit writes the base: refused, naming the base as the backing file of the overlay.
    let o = snapblk(&["commit", s(&ov)]);
    assert_in_use("commit into a held base", &o, &base);
    assert!(stderr(&o).contains("backing file of"), "{}", stderr(&o));
    drop(qio.stdin.take());
    let _ = qio.wait();
    let o = snapblk(&["commit", "-q", s(&ov)]);
    assert!(o.status.success(), "{}", stderr(&o));
}
