//! NBD servers for tests: `qemu-nbd` and `nbdkit` on a unix socket, killed on drop.
//!
//! A missing tool is a failure (panic), never a skip: `scripts/install-deps.sh` installs
//! qemu-utils (qemu-nbd) and nbdkit.
//!
//! Locking model: none; a server belongs to the test that started it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::guest::{host_tool, md5_file, snapblk_binary};

/// `snapblk create -b URI -F raw OVERLAY` (size from the server); panics on failure.
pub fn snapblk_create_over(uri: &str, overlay: &Path) {
    let bin = snapblk_binary().expect("snapblk binary");
    let o = overlay.to_str().expect("UTF-8 path");
    host_tool(
        bin.to_str().expect("UTF-8 path"),
        &["create", "-q", "-b", uri, "-F", "raw", o],
    );
}

/// `qemu-img create -f qcow2 -b URI -F raw OVERLAY` (size from the server).
pub fn qemu_img_create_over(uri: &str, overlay: &Path) {
    qemu_img_create_over_as(uri, "raw", overlay);
}

/// `qemu-img create -f qcow2 -b URI -F FORMAT OVERLAY` (size from the server).
pub fn qemu_img_create_over_as(uri: &str, format: &str, overlay: &Path) {
    let o = overlay.to_str().expect("UTF-8 path");
    host_tool(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "-b", uri, "-F", format, o],
    );
}

/// `qemu-img convert -O raw OVERLAY OUT` (the host's view of the whole chain); returns the md5.
pub fn convert_md5(overlay: &Path, out: &Path) -> String {
    let (o, r) = (
        overlay.to_str().expect("UTF-8"),
        out.to_str().expect("UTF-8"),
    );
    host_tool("qemu-img", &["convert", "-O", "raw", o, r]);
    md5_file(out).expect("md5 of the converted image")
}

/// Which server program.
#[derive(Debug, Clone)]
pub enum ServerKind {
    /// `qemu-nbd -r -t --shared=N -f raw -x base`: read-only, persistent, at most N clients
    /// at once (0: any number).
    QemuNbd {
        /// `--shared`.
        shared: u32,
    },
    /// `nbdkit -r` with the given filters (`--filter=NAME`) and plugin arguments after the file
    /// plugin (`file=` is added), e.g. `error-pread=EIO`.
    Nbdkit {
        /// Filter names.
        filters: Vec<String>,
        /// `key=value` parameters.
        params: Vec<String>,
    },
}

/// A running NBD server exporting `file` as `base` on `socket`.
#[derive(Debug)]
pub struct NbdServer {
    kind: ServerKind,
    file: PathBuf,
    socket: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

fn require_tool(tool: &str) {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "{tool} not found on PATH: run scripts/install-deps.sh (it installs qemu-utils and nbdkit)"
    );
}

impl NbdServer {
    /// Starts `kind` exporting `file` on the unix socket `socket` and waits until it accepts.
    pub fn start(kind: ServerKind, file: &Path, socket: &Path) -> NbdServer {
        let mut s = NbdServer {
            kind,
            file: file.to_path_buf(),
            socket: socket.to_path_buf(),
            log: socket.with_extension("log"),
            child: None,
        };
        s.spawn();
        s
    }

    /// The URI of the export (`nbd+unix:///base?socket=...`).
    pub fn uri(&self) -> String {
        format!("nbd+unix:///base?socket={}", self.socket.display())
    }

    /// The socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    fn spawn(&mut self) {
        let _ = std::fs::remove_file(&self.socket);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("server log");
        let mut cmd = match &self.kind {
            ServerKind::QemuNbd { shared } => {
                require_tool("qemu-nbd");
                let mut c = Command::new("qemu-nbd");
                c.arg(format!("--shared={shared}"))
                    .args(["-r", "-t", "-f", "raw", "-x", "base", "-k"])
                    .arg(&self.socket)
                    .arg(&self.file);
                c
            }
            ServerKind::Nbdkit { filters, params } => {
                require_tool("nbdkit");
                let mut c = Command::new("nbdkit");
                c.args(["-f", "-r", "-U"]).arg(&self.socket);
                for f in filters {
                    c.arg(format!("--filter={f}"));
                }
                c.arg("file").arg(format!("file={}", self.file.display()));
                c.args(params);
                c
            }
        };
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log);
        let child = cmd.spawn().expect("spawn NBD server");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::os::unix::net::UnixStream::connect(&self.socket).is_err() {
            if let Some(st) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "NBD server exited with {st}: {}",
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            assert!(
                Instant::now() < deadline,
                "NBD server did not listen on {}",
                self.socket.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILLs the server (the socket file stays, connects are refused).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the same server again on the same socket.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}

impl Drop for NbdServer {
    fn drop(&mut self) {
        self.kill();
    }
}
