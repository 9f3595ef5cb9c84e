//! Lifecycle of the real `snapblk` binary: socket permissions, vhost-user negotiation and config
//! space over the socket, surviving frontend disconnects, refusing a socket in use, and clean
//! shutdown (exit 0, socket removed) on SIGTERM/SIGINT with or without a connected frontend.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use snapblk::virtio_blk::*;
use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::VhostBackend;

struct Daemon {
    child: Child,
    socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl Daemon {
    fn start(image_len: u64, extra: &[&str]) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("disk.img");
        std::fs::File::create(&image)
            .unwrap()
            .set_len(image_len)
            .unwrap();
        let socket = dir.path().join("vhost.sock");
        let child = spawn(&image, &socket, extra);
        wait_for_socket(&socket);
        Daemon {
            child,
            socket,
            _dir: dir,
        }
    }

    fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill only sends a signal to our own child process.
        let ret = unsafe {
            libc::kill(
                libc::pid_t::try_from(self.child.id()).expect("a pid fits pid_t"),
                sig,
            )
        };
        assert_eq!(ret, 0);
    }

    fn wait_exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "daemon did not exit");
            sleep(Duration::from_millis(20));
        }
    }

    fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn(image: &Path, socket: &Path, extra: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_snapblk"))
        .arg("serve")
        .arg("--image")
        .arg(image)
        .arg("--socket")
        .arg(socket)
        .args(extra)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .spawn()
        .unwrap()
}

fn wait_for_socket(socket: &Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while UnixStream::connect(socket).is_err() {
        assert!(Instant::now() < deadline, "socket never appeared");
        sleep(Duration::from_millis(20));
    }
}

/// Negotiates like QEMU does up to the config space and returns (features, config, queues).
fn negotiate(socket: &Path) -> (Frontend, u64, BlkConfigSpace, u64) {
    let mut fe = Frontend::connect(socket, 16).unwrap();
    fe.set_owner().unwrap();
    let features = fe.get_features().unwrap();
    fe.set_features(features).unwrap();
    let proto = fe.get_protocol_features().unwrap();
    assert!(proto.contains(VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::MQ));
    fe.set_protocol_features(
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK,
    )
    .unwrap();
    let queues = fe.get_queue_num().unwrap();
    let size = BlkConfigSpace::SIZE as u32;
    let (_, payload) = fe
        .get_config(
            0,
            size,
            VhostUserConfigFlags::WRITABLE,
            &[0u8; BlkConfigSpace::SIZE],
        )
        .unwrap();
    let cfg = BlkConfigSpace::from_bytes(&payload[..].try_into().unwrap());
    (fe, features, cfg, queues)
}

#[test]
fn socket_is_created_with_the_requested_mode_and_negotiates_the_configured_device() {
    let mut d = Daemon::start(
        8 << 20,
        &[
            "--num-queues",
            "3",
            "--socket-mode",
            "640",
            "--logical-block-size",
            "4096",
        ],
    );
    let meta = std::fs::metadata(&d.socket).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o640);

    let (mut fe, features, cfg, queues) = negotiate(&d.socket);
    assert_eq!(queues, 3);
    assert_eq!(cfg.num_queues, 3);
    assert_eq!(cfg.capacity, (8 << 20) / 512);
    assert_eq!(cfg.blk_size, 4096);
    assert_eq!(cfg.writeback, 1);
    assert_ne!(features & feature(VIRTIO_BLK_F_MQ), 0);
    assert_ne!(features & feature(VIRTIO_BLK_F_DISCARD), 0);
    assert_eq!(features & feature(VIRTIO_BLK_F_RO), 0);
    // The driver turns the write cache off through the config space.
    fe.set_config(
        BlkConfigSpace::WRITEBACK_OFFSET as u32,
        VhostUserConfigFlags::WRITABLE,
        &[0],
    )
    .unwrap();
    let (_, b) = fe
        .get_config(0, 60, VhostUserConfigFlags::WRITABLE, &[0u8; 60])
        .unwrap();
    assert_eq!(b[BlkConfigSpace::WRITEBACK_OFFSET], 0);
    drop(fe);

    d.signal(libc::SIGTERM);
    assert!(d.wait_exit().success());
    assert!(!d.socket.exists(), "socket file left behind");
}

#[test]
fn daemon_survives_disconnects_and_serves_the_next_frontend() {
    let mut d = Daemon::start(1 << 20, &["--readonly"]);
    // Frontends that connect and vanish, with and without a half-sent message.
    drop(UnixStream::connect(&d.socket).unwrap());
    {
        use std::io::Write;
        let mut s = UnixStream::connect(&d.socket).unwrap();
        s.write_all(&[1, 0, 0]).unwrap();
    }
    let (fe, features, cfg, _) = negotiate(&d.socket);
    assert_ne!(features & feature(VIRTIO_BLK_F_RO), 0);
    assert_eq!(features & feature(VIRTIO_BLK_F_DISCARD), 0);
    assert_eq!(cfg.capacity, (1 << 20) / 512);
    drop(fe);
    // A fresh connection after a full negotiation starts from a fresh device.
    let (fe, _, cfg, queues) = negotiate(&d.socket);
    assert_eq!((queues, cfg.num_queues), (1, 1));
    assert!(d.is_running());
    drop(fe);
    d.signal(libc::SIGTERM);
    assert!(d.wait_exit().success());
}

#[test]
fn signal_while_a_frontend_is_connected_shuts_down_cleanly() {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        let mut d = Daemon::start(1 << 20, &[]);
        let (fe, _, _, _) = negotiate(&d.socket);
        d.signal(sig);
        let status = d.wait_exit();
        assert!(status.success(), "signal {sig}: {status:?}");
        assert!(!d.socket.exists());
        drop(fe);
    }
}

#[test]
fn second_daemon_refuses_a_socket_in_use_and_paths_that_are_not_sockets() {
    let mut d = Daemon::start(1 << 20, &[]);
    let image = d._dir.path().join("disk.img");
    let status = spawn(&image, &d.socket, &[]).wait().unwrap();
    assert!(!status.success());
    assert!(d.is_running());
    wait_for_socket(&d.socket);
    // A regular file in the way is never deleted.
    let status = spawn(&image, &image, &[]).wait().unwrap();
    assert!(!status.success());
    assert_eq!(std::fs::metadata(&image).unwrap().len(), 1 << 20);
    d.signal(libc::SIGTERM);
    assert!(d.wait_exit().success());
}

#[test]
fn stale_socket_file_is_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let socket = dir.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    assert!(socket.exists());
    let mut child = spawn(&image, &socket, &[]);
    wait_for_socket(&socket);
    let (fe, _, _, _) = negotiate(&socket);
    drop(fe);
    // SAFETY: signals our own child.
    unsafe {
        libc::kill(
            libc::pid_t::try_from(child.id()).expect("a pid fits pid_t"),
            libc::SIGTERM,
        )
    };
    assert!(child.wait().unwrap().success());
}
