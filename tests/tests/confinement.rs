//! A guest never reaches beyond its own disk (issue 17), checked on the real `snapblk` binary
//! with the libblkio client standing in for the guest:
//! - a probed raw image refuses a guest-written qcow2 header, and a restart still serves it as
//!   raw (the CVE-2008-2004 attack);
//! - backing files that are devices, FIFOs, /proc entries, or outside `--allow-backing` are
//!   refused at start with a one-line message naming the file and the rule;
//! - under `--user` and the seccomp filter the daemon serves I/O, and a forbidden system call
//!   from a queue thread kills only the daemon, with a log line naming the call.
//!
//! A test whose daemon binary is missing prints why and returns (see `client::daemon_missing`).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use snapblk_tests::client::{Client, ClientConfig, ClientError, RequestStatus};

const MIB: u64 = 1 << 20;
const START_WAIT: Duration = Duration::from_secs(15);

fn snapblk() -> Option<PathBuf> {
    match snapblk_tests::guest::snapblk_binary() {
        Ok(p) => Some(p),
        Err(e) => {
            snapblk_tests::client::daemon_missing(&format!("snapblk not available ({e}); skip"));
            None
        }
    }
}

/// A running `snapblk serve`; killed on drop.
struct Serve {
    child: Child,
    socket: PathBuf,
    log: PathBuf,
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Serve {
    fn start(bin: &Path, dir: &Path, name: &str, args: &[&str], env: &[(&str, &str)]) -> Serve {
        let socket = dir.join(format!("{name}.sock"));
        let log = dir.join(format!("{name}.log"));
        let log_file = File::create(&log).unwrap();
        let mut cmd = Command::new(bin);
        cmd.arg("serve").arg("--socket").arg(&socket).args(args);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().unwrap())
            .stderr(log_file)
            .spawn()
            .unwrap();
        Serve { child, socket, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn connect(&self) -> Client {
        Client::connect_retry(&self.socket, &ClientConfig::new(1), START_WAIT)
            .unwrap_or_else(|e| panic!("connect: {e}\n--- daemon log ---\n{}", self.log()))
    }

    /// SIGTERM, then waits for the exit status.
    fn stop(mut self) -> (ExitStatus, String) {
        // SAFETY: kill with our own child's pid.
        unsafe {
            libc::kill(
                libc::pid_t::try_from(self.child.id()).expect("a pid fits pid_t"),
                libc::SIGTERM,
            )
        };
        let status = self.wait(Duration::from_secs(20));
        (status, self.log())
    }

    fn wait(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "daemon did not exit\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Runs `snapblk serve` that must refuse to start; returns its stderr.
fn serve_refused(bin: &Path, dir: &Path, args: &[&str]) -> String {
    let out = Command::new(bin)
        .arg("serve")
        .arg("--socket")
        .arg(dir.join("refused.sock"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "served: {stderr}");
    assert!(
        !dir.join("refused.sock").exists(),
        "socket bound before the chain was checked"
    );
    stderr
}

/// A qcow2 header (first 512 bytes of a real overlay) whose backing file is `/etc/passwd`.
fn hostile_header(dir: &Path) -> Vec<u8> {
    let ov = dir.join("hostile.qcow2");
    qcow_snapshot::create(
        &ov,
        &qcow_snapshot::CreateOptions {
            size: 4 * MIB,
            backing: Some(("/etc/passwd".into(), qcow_snapshot::Format::Raw)),
            ..Default::default()
        },
    )
    .unwrap();
    std::fs::read(&ov).unwrap()[..512].to_vec()
}

fn first_sector(path: &Path) -> Vec<u8> {
    let mut b = vec![0u8; 512];
    File::open(path).unwrap().read_exact_at(&mut b, 0).unwrap();
    b
}

#[test]
fn probed_raw_image_refuses_a_guest_written_qcow2_header_and_stays_raw_across_restart() {
    let Some(bin) = snapblk() else { return };
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("g.raw");
    File::create(&image).unwrap().set_len(8 * MIB).unwrap();
    let header = hostile_header(dir.path());
    let img = image.to_str().unwrap();

    // As README's first example: no --format.
    let d = Serve::start(&bin, dir.path(), "a", &["--image", img], &[]);
    let c = d.connect();
    match c.write(0, 0, &header) {
        Err(ClientError::Request {
            status: RequestStatus::IoErr,
            ..
        }) => {}
        other => panic!("the header write was not refused with IOERR: {other:?}"),
    }
    // The same header one sector later is just data; a harmless write to sector 0 is served.
    c.write(0, 512, &header).unwrap();
    c.write(0, 0, &[0x5a; 512]).unwrap();
    c.write(0, 0, &[0; 512]).unwrap();
    c.flush(0).unwrap();
    drop(c);
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
    assert!(
        log.contains("was probed as raw: probing a writable raw image is dangerous")
            && log.contains("--format raw"),
        "no start-up warning: {log}"
    );
    assert!(
        log.contains("refused a guest write at offset 0 (512 bytes)")
            && log.contains("probe as qcow2"),
        "no refusal warning: {log}"
    );
    assert_eq!(first_sector(&image), vec![0u8; 512], "first sector changed");

    // Restart with the same command: still raw, and the guest sees its own bytes.
    let d = Serve::start(&bin, dir.path(), "b", &["--image", img], &[]);
    let c = d.connect();
    assert_eq!(c.capacity(), 8 * MIB, "served as raw (its own size)");
    let mut b = vec![0u8; 1024];
    c.read(0, 0, &mut b).unwrap();
    assert_eq!(&b[..512], &[0u8; 512][..]);
    assert_eq!(&b[512..], &header[..], "the guest's own data at sector 1");
    drop(c);
    assert!(d.stop().0.success());

    // An explicit --format raw lifts the restriction (the user said what the file is).
    let d = Serve::start(
        &bin,
        dir.path(),
        "c",
        &["--image", img, "--format", "raw"],
        &[],
    );
    let c = d.connect();
    c.write(0, 0, &header).unwrap();
    drop(c);
    let (status, log) = d.stop();
    assert!(status.success());
    assert!(!log.contains("probed as raw"), "{log}");
    assert_eq!(first_sector(&image), header);
}

/// A qcow2 overlay in `dir` named `name` whose backing file name is `backing` (format raw).
fn overlay(dir: &Path, name: &str, backing: &str) -> PathBuf {
    let ov = dir.join(name);
    let out = Command::new("qemu-img")
        .args([
            "create", "-q", "-f", "qcow2", "-u", "-F", "raw", "-b", backing,
        ])
        .arg(&ov)
        .arg("1M")
        .output()
        .expect("qemu-img");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    ov
}

#[test]
fn backing_files_that_are_devices_fifos_or_proc_entries_are_refused_at_start() {
    let Some(bin) = snapblk() else { return };
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("fifo");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    for (name, backing, want) in [
        (
            "null.qcow2",
            "/dev/null",
            "backing file /dev/null refused: it is a character device; a backing chain may only name regular files",
        ),
        (
            "zero.qcow2",
            "/dev/zero",
            "backing file /dev/zero refused: it is a character device",
        ),
        (
            "fifo.qcow2",
            "fifo",
            "fifo refused: it is a FIFO; a backing chain may only name regular files",
        ),
        (
            "proc.qcow2",
            "/proc/self/environ",
            "refused: a backing chain may not name files under /proc",
        ),
        (
            "sys.qcow2",
            "/sys/kernel/mm/transparent_hugepage/enabled",
            "refused: a backing chain may not name files under /sys",
        ),
    ] {
        let ov = overlay(dir.path(), name, backing);
        let err = serve_refused(&bin, dir.path(), &["--image", ov.to_str().unwrap()]);
        assert!(err.contains(want), "{name}: {err}");
        assert_eq!(
            err.lines().filter(|l| l.contains("refused")).count(),
            1,
            "one line: {err}"
        );
    }
}

#[test]
fn allow_backing_confines_the_chain_to_its_trees() {
    let Some(bin) = snapblk() else { return };
    let root = tempfile::tempdir().unwrap();
    let images = root.path().join("images");
    let other = root.path().join("other");
    let sub = images.join("vm");
    std::fs::create_dir_all(&sub).unwrap();
    std::fs::create_dir_all(&other).unwrap();
    let outside = other.join("secret.raw");
    std::fs::write(&outside, vec![0x11; MIB as usize]).unwrap();
    std::fs::write(images.join("base.raw"), vec![0x22; MIB as usize]).unwrap();
    std::os::unix::fs::symlink(&outside, images.join("link.raw")).unwrap();
    let allow = images.to_str().unwrap();

    let passwd = overlay(&sub, "passwd.qcow2", "/etc/passwd");
    let link = overlay(&sub, "link.qcow2", "../link.raw");
    let escape = overlay(&sub, "escape.qcow2", "../../other/secret.raw");
    let inside = overlay(&sub, "inside.qcow2", "../base.raw");
    let allow_dir = |ov: &Path| {
        serve_refused(
            &bin,
            root.path(),
            &["--image", ov.to_str().unwrap(), "--allow-backing", allow],
        )
    };
    let real_images = std::fs::canonicalize(&images).unwrap();
    let real_outside = std::fs::canonicalize(&outside).unwrap();
    let rule = format!(
        "it is outside the --allow-backing directories ({})",
        real_images.display()
    );
    let e = allow_dir(&passwd);
    assert!(
        e.contains("backing file /etc/passwd refused: ") && e.contains(&rule),
        "{e}"
    );
    let e = allow_dir(&link);
    assert!(
        e.contains(&format!(
            "(resolves to {}) refused: ",
            real_outside.display()
        )) && e.contains(&rule),
        "symlink out of the tree: {e}"
    );
    let e = allow_dir(&escape);
    assert!(
        e.contains("../../other/secret.raw") && e.contains(&rule),
        "../../ escape: {e}"
    );
    // A file inside the tree is served, and `/etc/passwd` without --allow-backing is a regular
    // file: the default policy admits it (the tree rule is what confines foreign images).
    let d = Serve::start(
        &bin,
        root.path(),
        "inside",
        &[
            "--image",
            inside.to_str().unwrap(),
            "--allow-backing",
            allow,
        ],
        &[],
    );
    let c = d.connect();
    let mut b = vec![0u8; 4096];
    c.read(0, 0, &mut b)
        .unwrap_or_else(|e| panic!("read: {e}\n--- daemon log ---\n{}", d.log()));
    assert!(b.iter().all(|&x| x == 0x22));
    drop(c);
    assert!(d.stop().0.success());
    // `info` shows the chain with resolved paths, formats and the default policy's verdict.
    let out = Command::new(&bin).arg("info").arg(&link).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(
        text.contains(&format!(
            "Backing chain:\n    1: {} -> {} (raw)",
            sub.join("../link.raw").display(),
            real_outside.display()
        )),
        "{text}"
    );
    let fifo_ov = overlay(&sub, "dev.qcow2", "/dev/zero");
    let out = Command::new(&bin)
        .arg("info")
        .arg(&fifo_ov)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(
            "1: /dev/zero REFUSED: backing file /dev/zero refused: it is a character device"
        ),
        "{text}"
    );
}

fn uid_of(pid: u32) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .map(|v| v.split_whitespace().collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn am_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

#[test]
fn daemon_under_user_and_seccomp_serves_io_and_reconnects() {
    let Some(bin) = snapblk() else { return };
    if !am_root() {
        eprintln!("not root: --user cannot be tested; skip");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.raw");
    File::create(&image).unwrap().set_len(16 * MIB).unwrap();
    let d = Serve::start(
        &bin,
        dir.path(),
        "user",
        &[
            "--image",
            image.to_str().unwrap(),
            "--format",
            "raw",
            "--user",
            "nobody",
            "--seccomp",
            "kill",
            "--io-threads",
            "2",
        ],
        &[],
    );
    for round in 0..2u8 {
        let c = d.connect();
        assert_eq!(uid_of(d.child.id()), "65534 65534 65534 65534");
        let data: Vec<u8> = (0..256 * 1024).map(|i| (i as u8) ^ round).collect();
        c.write(0, MIB, &data).unwrap();
        c.flush(0).unwrap();
        let mut back = vec![0u8; data.len()];
        c.read(0, MIB, &mut back).unwrap();
        assert_eq!(back, data);
        c.write_zeroes(0, MIB, 64 * 1024, true).unwrap();
        c.discard(0, 2 * MIB, 64 * 1024).unwrap();
        c.read(0, MIB, &mut back[..64 * 1024]).unwrap();
        assert!(back[..64 * 1024].iter().all(|&b| b == 0));
        drop(c);
    }
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
    assert!(log.contains("running as uid 65534 gid 65534"), "{log}");
    assert!(log.contains("seccomp filter on"), "{log}");
    assert!(!log.contains("forbidden system call"), "{log}");
    let mut b = vec![0u8; 4096];
    File::open(&image)
        .unwrap()
        .read_exact_at(&mut b, MIB + 64 * 1024)
        .unwrap();
    assert!(b.iter().enumerate().all(|(i, &x)| x == ((i as u8) ^ 1)));
}

#[test]
fn forbidden_syscall_from_a_queue_thread_kills_only_the_daemon_with_a_log_line() {
    let Some(bin) = snapblk() else { return };
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.raw");
    File::create(&image).unwrap().set_len(4 * MIB).unwrap();
    let mut d = Serve::start(
        &bin,
        dir.path(),
        "kill",
        &["--image", image.to_str().unwrap(), "--format", "raw"],
        &[(snapblk::sandbox::TEST_FORBIDDEN_SYSCALL_ENV, "1")],
    );
    // The hook fires on the first queue event, which may come while the client still sets up
    // its queue: either connecting or the first request fails.
    let mut b = vec![0u8; 4096];
    if let Ok(c) = Client::connect_retry(&d.socket, &ClientConfig::new(1), START_WAIT) {
        // A dead daemon never completes the request: do not wait the default 30 s for it.
        c.queue(0).unwrap().set_timeout(Duration::from_secs(2));
        let r = c.read(0, 0, &mut b);
        assert!(r.is_err(), "the request completed although the daemon died");
    }
    let status = d.wait(Duration::from_secs(20));
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(
        status.code(),
        Some(snapblk::sandbox::SECCOMP_KILL_STATUS),
        "{status:?}: {}",
        d.log()
    );
    let log = d.log();
    let line = format!(
        "snapblk: seccomp: forbidden system call {} (socket) in thread ",
        libc::SYS_socket
    );
    assert!(log.contains(&line), "{log}");
    assert!(
        log.contains("test hook: open /etc/passwd from a queue thread: Permission denied"),
        "a serving thread could open a file: {log}"
    );
    assert!(status.signal().is_none());
    // The test process (the "frontend") lives on and the image is intact.
    assert_eq!(std::fs::metadata(&image).unwrap().len(), 4 * MIB);
    // In log mode the same calls are allowed (and kernel-logged): the daemon keeps serving.
    let d = Serve::start(
        &bin,
        dir.path(),
        "log",
        &[
            "--image",
            image.to_str().unwrap(),
            "--format",
            "raw",
            "--seccomp",
            "log",
        ],
        &[(snapblk::sandbox::TEST_FORBIDDEN_SYSCALL_ENV, "1")],
    );
    let c = d.connect();
    c.read(0, 0, &mut b).unwrap();
    drop(c);
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
    assert!(log.contains("test hook: opened /etc/passwd"), "{log}");
}

#[test]
fn snapshot_overlay_is_unlinked_before_the_sandbox_and_the_base_is_never_written() {
    let Some(bin) = snapblk() else { return };
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    std::fs::write(&base, vec![0x3c; 4 * MIB as usize]).unwrap();
    let kept_dir = dir.path().join("tmp");
    std::fs::create_dir(&kept_dir).unwrap();
    let mut args = vec!["--image", base.to_str().unwrap(), "--snapshot"];
    if am_root() {
        args.extend(["--user", "nobody"]);
    }
    let d = Serve::start(
        &bin,
        dir.path(),
        "snap",
        &args,
        &[("TMPDIR", kept_dir.to_str().unwrap())],
    );
    let c = d.connect();
    assert_eq!(
        std::fs::read_dir(&kept_dir).unwrap().count(),
        0,
        "the throwaway overlay is still linked"
    );
    // The probed base is read-only under the overlay: a qcow2 header is just guest data here.
    let header = hostile_header(dir.path());
    c.write(0, 0, &header).unwrap();
    let mut b = vec![0u8; 1024];
    c.read(0, 0, &mut b).unwrap();
    assert_eq!(&b[..512], &header[..]);
    assert!(b[512..].iter().all(|&x| x == 0x3c));
    drop(c);
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
    assert!(log.contains("unlinked snapshot overlay"), "{log}");
    assert!(!log.contains("probed as raw"), "no guard needed: {log}");
    assert!(std::fs::read(&base).unwrap().iter().all(|&x| x == 0x3c));
}
