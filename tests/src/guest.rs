//! Real-guest harness: boots a QEMU (TCG) Linux guest whose disks are vhost-user-blk devices
//! served by a daemon under test (snapblk or the reference peer `qemu-storage-daemon`).
//!
//! What it owns:
//! - locating the environment ([`GuestEnv::prepare`]): `scripts/install-deps.sh`,
//!   `scripts/build-guest.sh` and `scripts/env.sh` are the single source of truth for where
//!   QEMU, its firmware/module dirs, the kernel and the base initramfs are;
//! - the daemon under test ([`Daemon`], configured by [`DaemonConfig`]);
//! - one guest run ([`Guest`], configured by [`GuestConfig`]): the per-test `/test.sh` is
//!   packed into a small `newc` cpio appended to the cached base initramfs; the serial console
//!   is streamed to a log file and kept in memory; lines `RESULT key=value ...` printed by the
//!   guest are parsed into [`GuestOutput`];
//! - host-side checksum helpers ([`md5_file`], [`md5_range`]) and random images.
//!
//! Process model: every child (daemon, QEMU) is killed with SIGKILL when its handle is dropped
//! and also gets `PR_SET_PDEATHSIG=SIGKILL`, so an aborted test leaves nothing behind. A
//! timeout kills QEMU. Guest boots are heavy on a 2-core TCG host, so tests serialize them
//! with [`guest_lock`].
//!
//! Locking model: the serial log is a `Mutex<LogState>` + `Condvar` shared between the reader
//! threads (QEMU stdout and stderr) and the test thread; nothing else is shared.
//!
//! Skipping: when QEMU/kernel are missing and cannot be installed (not root),
//! [`guest_env_or_skip`] returns `None` with a message, unless `SNAPBLK_REQUIRE_GUEST=1`, in
//! which case it panics (CI and `make test` must really run the guests).

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rand::{RngCore, SeedableRng};

/// Environment variable: when `1`, a missing guest environment fails the test instead of
/// skipping it.
pub const REQUIRE_GUEST_ENV: &str = "SNAPBLK_REQUIRE_GUEST";
/// Environment variable: path of a prebuilt `snapblk` binary (skips the `cargo build`).
pub const SNAPBLK_BIN_ENV: &str = "SNAPBLK_BIN";

/// How many lines of a log an error message quotes.
const LOG_TAIL_LINES: usize = 60;

/// What went wrong while preparing or running a guest; each variant names the failed action.
#[derive(Debug)]
pub enum GuestError {
    /// QEMU, the kernel or the guest image is absent and cannot be provided here.
    LocateDeps(String),
    /// A helper script or tool exited with failure.
    RunTool {
        /// The command line.
        tool: String,
        /// Exit status and captured output.
        detail: String,
    },
    /// An OS-level operation (spawn, file I/O, signal) failed.
    Io {
        /// What was being done.
        action: String,
        /// The underlying error.
        source: io::Error,
    },
    /// The daemon exited early or never created its socket.
    StartDaemon {
        /// Why it is considered failed.
        detail: String,
        /// The end of the daemon's log.
        log_tail: String,
    },
    /// The daemon did not exit cleanly after SIGTERM.
    StopDaemon {
        /// Exit status or timeout.
        detail: String,
        /// The end of the daemon's log.
        log_tail: String,
    },
    /// The guest did not finish (or print the awaited line) in time; QEMU was killed.
    WaitGuest {
        /// What was awaited.
        what: String,
        /// The time limit.
        after: Duration,
        /// The end of the serial log.
        log_tail: String,
    },
    /// QEMU exited with failure.
    RunGuest {
        /// Exit status.
        detail: String,
        /// The end of the serial log.
        log_tail: String,
    },
}

impl fmt::Display for GuestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GuestError::LocateDeps(m) => write!(f, "guest environment missing: {m}"),
            GuestError::RunTool { tool, detail } => write!(f, "`{tool}` failed: {detail}"),
            GuestError::Io { action, source } => write!(f, "{action}: {source}"),
            GuestError::StartDaemon { detail, log_tail } => {
                write!(f, "daemon failed to start: {detail}\n--- daemon log tail ---\n{log_tail}")
            }
            GuestError::StopDaemon { detail, log_tail } => {
                write!(f, "daemon did not stop cleanly: {detail}\n--- daemon log tail ---\n{log_tail}")
            }
            GuestError::WaitGuest {
                what,
                after,
                log_tail,
            } => write!(
                f,
                "guest timed out after {after:?} waiting for {what}; QEMU killed\n--- serial log tail ---\n{log_tail}"
            ),
            GuestError::RunGuest { detail, log_tail } => {
                write!(f, "QEMU failed: {detail}\n--- serial log tail ---\n{log_tail}")
            }
        }
    }
}

impl std::error::Error for GuestError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            GuestError::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// Result alias for the harness.
pub type Result<T> = std::result::Result<T, GuestError>;

fn io_err(action: impl Into<String>) -> impl FnOnce(io::Error) -> GuestError {
    let action = action.into();
    move |source| GuestError::Io { action, source }
}

/// The workspace root: `$SNAPBLK_ROOT`, else the parent of the `tests` package.
pub fn workspace_root() -> PathBuf {
    if let Some(root) = std::env::var_os("SNAPBLK_ROOT") {
        return PathBuf::from(root);
    }
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// The cargo target dir this test binary was built into (`.../target`), if recognisable.
fn target_dir_of_current_exe() -> Option<(PathBuf, String)> {
    let exe = std::env::current_exe().ok()?;
    // .../target/<profile>/deps/<test-binary>
    let deps = exe.parent()?;
    if deps.file_name()? != "deps" {
        return None;
    }
    let profile_dir = deps.parent()?;
    let profile = profile_dir.file_name()?.to_str()?.to_string();
    Some((profile_dir.parent()?.to_path_buf(), profile))
}

/// A directory for the logs of one test, kept after the run (`<target>/e2e-logs/<name>`).
pub fn log_dir(test_name: &str) -> Result<PathBuf> {
    let base = target_dir_of_current_exe()
        .map(|(t, _)| t)
        .unwrap_or_else(|| workspace_root().join("target"));
    let dir = base.join("e2e-logs").join(test_name);
    if dir.exists() {
        fs::remove_dir_all(&dir).map_err(io_err(format!("clear {}", dir.display())))?;
    }
    fs::create_dir_all(&dir).map_err(io_err(format!("create {}", dir.display())))?;
    Ok(dir)
}

/// Serializes guest boots inside one test process (each guest wants both cores).
pub fn guest_lock() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

/// Makes a child die with its parent thread (no leftovers when a test aborts).
fn die_with_parent(cmd: &mut Command) {
    let hook = || -> io::Result<()> {
        // SAFETY: PR_SET_PDEATHSIG with a valid signal number has no memory effects.
        let rc = unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    };
    // SAFETY: the hook runs between fork and exec; it only calls prctl(2), which is
    // async-signal-safe, allocates nothing and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(hook);
    }
}

fn send_signal(child: &Child, sig: libc::c_int) -> io::Result<()> {
    let pid = libc::pid_t::try_from(child.id())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "pid out of range"))?;
    // SAFETY: kill(2) on the pid of a child we own and have not reaped yet (the caller
    // holds the `Child`, so the pid cannot have been recycled).
    let rc = unsafe { libc::kill(pid, sig) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Waits for `child` up to `limit`; `Ok(None)` on timeout.
fn wait_timeout(child: &mut Child, limit: Duration) -> io::Result<Option<ExitStatus>> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(st) = child.try_wait()? {
            return Ok(Some(st));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn tail_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.len().saturating_sub(n);
    lines.get(start..).unwrap_or_default().join("\n")
}

fn file_tail(path: &Path) -> String {
    match fs::read(path) {
        Ok(bytes) => tail_lines(&String::from_utf8_lossy(&bytes), LOG_TAIL_LINES),
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}

fn run_tool(cmd: &mut Command) -> Result<String> {
    let desc = format!("{cmd:?}");
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(io_err(format!("spawn {desc}")))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        Ok(stdout)
    } else {
        Err(GuestError::RunTool {
            tool: desc,
            detail: format!(
                "{}\n--- stdout ---\n{}\n--- stderr ---\n{}",
                out.status,
                tail_lines(&stdout, LOG_TAIL_LINES),
                tail_lines(&String::from_utf8_lossy(&out.stderr), LOG_TAIL_LINES)
            ),
        })
    }
}

fn is_root() -> bool {
    // /proc/self is owned by the effective uid of the process.
    use std::os::unix::fs::MetadataExt;
    fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

// ---------------------------------------------------------------------------------------------
// Environment
// ---------------------------------------------------------------------------------------------

/// Where QEMU, its support files, the kernel and the base initramfs are.
#[derive(Debug, Clone)]
pub struct GuestEnv {
    /// `qemu-system-x86_64`.
    pub qemu: PathBuf,
    /// Directory for `-L` (firmware), if QEMU needs one.
    pub datadir: Option<PathBuf>,
    /// `QEMU_MODULE_DIR` (accel-tcg module) for an extracted QEMU.
    pub module_dir: Option<PathBuf>,
    /// Guest kernel (`build/guest/vmlinuz`).
    pub kernel: PathBuf,
    /// Base initramfs (`build/guest/initramfs.cpio.gz`).
    pub initramfs: PathBuf,
}

impl GuestEnv {
    /// Locates (installing/building when possible) everything a guest run needs. Runs the
    /// scripts at most once per process.
    pub fn prepare() -> Result<GuestEnv> {
        static ENV: OnceLock<std::result::Result<GuestEnv, String>> = OnceLock::new();
        ENV.get_or_init(|| Self::prepare_uncached().map_err(|e| e.to_string()))
            .clone()
            .map_err(GuestError::LocateDeps)
    }

    fn prepare_uncached() -> Result<GuestEnv> {
        let root = workspace_root();
        let scripts = root.join("scripts");
        let check = run_tool(
            Command::new("bash")
                .arg(scripts.join("install-deps.sh"))
                .arg("--check"),
        );
        if let Err(e) = check {
            if !is_root() {
                return Err(GuestError::LocateDeps(format!(
                    "scripts/install-deps.sh --check failed and not root to install: {e}"
                )));
            }
            run_tool(Command::new("bash").arg(scripts.join("install-deps.sh")))?;
        }
        let guest_dir = root.join("build/guest");
        let have_guest =
            guest_dir.join("vmlinuz").is_file() && guest_dir.join("initramfs.cpio.gz").is_file();
        if is_root() || !have_guest {
            if !is_root() {
                return Err(GuestError::LocateDeps(
                    "build/guest is missing and building it needs root (scripts/build-guest.sh)"
                        .into(),
                ));
            }
            run_tool(Command::new("bash").arg(scripts.join("build-guest.sh")))?;
        }
        let out = run_tool(Command::new("bash").arg("-c").arg(format!(
            ". '{}' && printf '%s\\n' \"$SNAPBLK_ENV_OK\" \"$QEMU\" \"$QEMU_DATADIR\" \"${{QEMU_MODULE_DIR:-}}\" \"$GUEST_DIR\" \"$SNAPBLK_ENV_MISSING\"",
            scripts.join("env.sh").display()
        )))?;
        let fields: Vec<&str> = out.lines().collect();
        let field = |i: usize| fields.get(i).copied().unwrap_or_default();
        if field(0) != "1" {
            return Err(GuestError::LocateDeps(format!(
                "scripts/env.sh: missing{}",
                field(5)
            )));
        }
        let opt = |s: &str| (!s.is_empty()).then(|| PathBuf::from(s));
        let guest_dir = PathBuf::from(field(4));
        let env = GuestEnv {
            qemu: PathBuf::from(field(1)),
            datadir: opt(field(2)),
            module_dir: opt(field(3)),
            kernel: guest_dir.join("vmlinuz"),
            initramfs: guest_dir.join("initramfs.cpio.gz"),
        };
        for p in [&env.qemu, &env.kernel, &env.initramfs] {
            if !p.is_file() {
                return Err(GuestError::LocateDeps(format!("{} not found", p.display())));
            }
        }
        Ok(env)
    }
}

/// [`GuestEnv::prepare`] for tests: `None` (with a message) when the environment is missing,
/// unless `SNAPBLK_REQUIRE_GUEST=1`, which turns that into a panic.
pub fn guest_env_or_skip(test: &str) -> Option<GuestEnv> {
    match GuestEnv::prepare() {
        Ok(env) => Some(env),
        Err(e) => {
            if std::env::var(REQUIRE_GUEST_ENV).as_deref() == Ok("1") {
                panic!("{test}: {e} ({REQUIRE_GUEST_ENV}=1, so this is a failure)");
            }
            eprintln!("SKIPPED {test}: {e} (set {REQUIRE_GUEST_ENV}=1 to make this a failure)");
            None
        }
    }
}

/// Path of an up-to-date `snapblk` binary: `$SNAPBLK_BIN`, else built once per process with
/// `cargo build -p snapblk --bin snapblk` into this test binary's own target dir and profile.
pub fn snapblk_binary() -> Result<PathBuf> {
    static BIN: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    BIN.get_or_init(|| build_snapblk().map_err(|e| e.to_string()))
        .clone()
        .map_err(|e| GuestError::RunTool {
            tool: "cargo build -p snapblk".into(),
            detail: e,
        })
}

fn build_snapblk() -> Result<PathBuf> {
    if let Some(bin) = std::env::var_os(SNAPBLK_BIN_ENV) {
        let bin = PathBuf::from(bin);
        if !bin.is_file() {
            return Err(GuestError::LocateDeps(format!(
                "{SNAPBLK_BIN_ENV}={} is not a file",
                bin.display()
            )));
        }
        return Ok(bin);
    }
    let (target, profile) = target_dir_of_current_exe()
        .unwrap_or_else(|| (workspace_root().join("target"), "release".to_string()));
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo"));
    let mut cmd = Command::new(cargo);
    cmd.current_dir(workspace_root())
        .args(["build", "--quiet", "-p", "snapblk", "--bin", "snapblk"])
        .env("CARGO_TARGET_DIR", &target);
    if profile == "release" {
        cmd.arg("--release");
    } else if profile != "debug" {
        cmd.args(["--profile", &profile]);
    }
    run_tool(&mut cmd)?;
    let bin = target.join(&profile).join("snapblk");
    if bin.is_file() {
        Ok(bin)
    } else {
        Err(GuestError::LocateDeps(format!(
            "{} missing after cargo build",
            bin.display()
        )))
    }
}

// ---------------------------------------------------------------------------------------------
// Daemon under test
// ---------------------------------------------------------------------------------------------

/// Which vhost-user-blk server to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DaemonKind {
    /// `snapblk serve` (the daemon under test).
    Snapblk,
    /// `qemu-storage-daemon` (the reference peer; proves the harness).
    QemuStorageDaemon,
}

/// On-disk format of the served image (used for qemu-storage-daemon; snapblk detects it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageFormat {
    /// Plain raw file.
    Raw,
    /// qcow2 (possibly an overlay with a backing file).
    Qcow2,
}

/// How to start a daemon (builder style).
#[derive(Debug, Clone)]
pub struct DaemonConfig {
    /// Which server.
    pub kind: DaemonKind,
    /// The image file.
    pub image: PathBuf,
    /// Its format.
    pub format: ImageFormat,
    /// Number of virtqueues offered.
    pub num_queues: u16,
    /// snapblk `--cache` mode (`writeback`/`writethrough`); `None` = daemon default.
    pub cache: Option<String>,
    /// Extra command-line arguments appended verbatim.
    pub extra_args: Vec<String>,
    /// How long to wait for the socket to appear.
    pub start_timeout: Duration,
}

impl DaemonConfig {
    /// A daemon of `kind` serving raw `image` with 2 queues.
    pub fn new(kind: DaemonKind, image: impl Into<PathBuf>) -> Self {
        DaemonConfig {
            kind,
            image: image.into(),
            format: ImageFormat::Raw,
            num_queues: 2,
            cache: None,
            extra_args: Vec::new(),
            start_timeout: Duration::from_secs(20),
        }
    }
    /// Sets the image format.
    pub fn format(mut self, format: ImageFormat) -> Self {
        self.format = format;
        self
    }
    /// Sets the number of queues.
    pub fn num_queues(mut self, n: u16) -> Self {
        self.num_queues = n;
        self
    }
    /// Sets snapblk's cache mode.
    pub fn cache(mut self, mode: &str) -> Self {
        self.cache = Some(mode.to_string());
        self
    }
    /// Appends an argument.
    pub fn arg(mut self, a: &str) -> Self {
        self.extra_args.push(a.to_string());
        self
    }
}

/// A running daemon; SIGKILLed on drop unless stopped with [`Daemon::terminate`].
#[derive(Debug)]
pub struct Daemon {
    child: Option<Child>,
    socket: PathBuf,
    log_path: PathBuf,
    kind: DaemonKind,
    /// How it was started (for [`Daemon::restart`]).
    cfg: DaemonConfig,
    _dir: tempfile::TempDir,
}

/// qemu option values escape `,` as `,,`.
fn qemu_opt_escape(p: &Path) -> String {
    p.display().to_string().replace(',', ",,")
}

impl Daemon {
    /// Starts the daemon on a fresh socket; its output goes to `log_dir/<name>.log`.
    pub fn start(cfg: &DaemonConfig, log_dir: &Path, name: &str) -> Result<Daemon> {
        let dir = tempfile::Builder::new()
            .prefix("snapblk-vu")
            .tempdir()
            .map_err(io_err("create socket dir"))?;
        let socket = dir.path().join("vu.sock");
        let log_path = log_dir.join(format!("{name}.log"));
        File::create(&log_path).map_err(io_err(format!("create {}", log_path.display())))?;
        let child = Self::spawn(cfg, &socket, &log_path)?;
        let mut d = Daemon {
            child: Some(child),
            socket,
            log_path,
            kind: cfg.kind,
            cfg: cfg.clone(),
            _dir: dir,
        };
        d.wait_for_socket(cfg.start_timeout)?;
        Ok(d)
    }

    /// Stops the daemon (SIGKILL if `kill`, else SIGTERM and a clean exit) and starts a new
    /// one with the same arguments on the same socket, appending to the same log; returns once
    /// the new one listens. The "daemon crash" and "upgrade" cases of a frontend that
    /// reconnects.
    pub fn restart(&mut self, kill: bool) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            if kill {
                let _ = child.kill();
                let _ = child.wait();
            } else {
                send_signal(&child, libc::SIGTERM).map_err(io_err("SIGTERM daemon"))?;
                match wait_timeout(&mut child, Duration::from_secs(60))
                    .map_err(io_err("wait for daemon"))?
                {
                    Some(st) if st.success() => {}
                    other => {
                        let _ = child.kill();
                        let _ = child.wait();
                        return Err(GuestError::StopDaemon {
                            detail: format!("SIGTERM before restart: {other:?}"),
                            log_tail: file_tail(&self.log_path),
                        });
                    }
                }
            }
        }
        // A killed daemon leaves its socket file: remove it, so waiting for the socket waits
        // for the new daemon (which would replace a stale socket anyway).
        let _ = fs::remove_file(&self.socket);
        {
            let mut f = OpenOptions::new()
                .append(true)
                .open(&self.log_path)
                .map_err(io_err("reopen daemon log"))?;
            let _ = writeln!(f, "=== test harness: daemon restarted (kill={kill}) ===");
        }
        self.child = Some(Self::spawn(&self.cfg, &self.socket, &self.log_path)?);
        let limit = self.cfg.start_timeout;
        self.wait_for_socket(limit)
    }

    fn spawn(cfg: &DaemonConfig, socket: &Path, log_path: &Path) -> Result<Child> {
        let socket = socket.to_path_buf();
        let log = OpenOptions::new()
            .append(true)
            .open(log_path)
            .map_err(io_err(format!("open {}", log_path.display())))?;
        let log2 = log.try_clone().map_err(io_err("dup log fd"))?;
        let mut cmd = match cfg.kind {
            DaemonKind::Snapblk => {
                let mut c = Command::new(snapblk_binary()?);
                c.arg("serve")
                    .arg("--image")
                    .arg(&cfg.image)
                    .arg("--socket")
                    .arg(&socket)
                    .arg("--num-queues")
                    .arg(cfg.num_queues.to_string());
                if let Some(mode) = &cfg.cache {
                    c.arg("--cache").arg(mode);
                }
                if std::env::var_os("RUST_LOG").is_none() {
                    c.env("RUST_LOG", "info");
                }
                c
            }
            DaemonKind::QemuStorageDaemon => {
                let mut c = Command::new("qemu-storage-daemon");
                c.arg("--blockdev").arg(format!(
                    "driver=file,node-name=file0,filename={}",
                    qemu_opt_escape(&cfg.image)
                ));
                let node = match cfg.format {
                    ImageFormat::Raw => "file0",
                    ImageFormat::Qcow2 => {
                        c.arg("--blockdev")
                            .arg("driver=qcow2,node-name=fmt0,file=file0");
                        "fmt0"
                    }
                };
                c.arg("--export").arg(format!(
                    "type=vhost-user-blk,id=exp0,node-name={node},addr.type=unix,addr.path={},writable=on,num-queues={}",
                    qemu_opt_escape(&socket),
                    cfg.num_queues
                ));
                c
            }
        };
        cmd.args(&cfg.extra_args)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2);
        die_with_parent(&mut cmd);
        cmd.spawn().map_err(io_err(format!("spawn {:?}", cfg.kind)))
    }

    fn wait_for_socket(&mut self, limit: Duration) -> Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            if self.socket.exists() {
                // bind() creates the file just before listen(); give it a moment.
                std::thread::sleep(Duration::from_millis(100));
                return Ok(());
            }
            if let Some(child) = self.child.as_mut() {
                if let Some(st) = child.try_wait().map_err(io_err("wait for daemon"))? {
                    self.child = None;
                    return Err(GuestError::StartDaemon {
                        detail: format!(
                            "{:?} exited with {st} before creating its socket",
                            self.kind
                        ),
                        log_tail: file_tail(&self.log_path),
                    });
                }
            }
            if Instant::now() >= deadline {
                return Err(GuestError::StartDaemon {
                    detail: format!("no socket {} after {limit:?}", self.socket.display()),
                    log_tail: file_tail(&self.log_path),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The daemon's process id while it has not been reaped.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }
    /// The vhost-user socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }
    /// The daemon's log file.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }
    /// The whole daemon log so far.
    pub fn log(&self) -> String {
        String::from_utf8_lossy(&fs::read(&self.log_path).unwrap_or_default()).into_owned()
    }
    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Sends SIGTERM and waits up to `limit`; succeeds only on exit status 0. On timeout the
    /// daemon is SIGKILLed and an error returned.
    pub fn terminate(mut self, limit: Duration) -> Result<ExitStatus> {
        let Some(mut child) = self.child.take() else {
            return Err(GuestError::StopDaemon {
                detail: "already exited".into(),
                log_tail: file_tail(&self.log_path),
            });
        };
        if let Ok(Some(st)) = child.try_wait() {
            return Err(GuestError::StopDaemon {
                detail: format!("exited on its own before SIGTERM with {st}"),
                log_tail: file_tail(&self.log_path),
            });
        }
        send_signal(&child, libc::SIGTERM).map_err(io_err("SIGTERM daemon"))?;
        match wait_timeout(&mut child, limit).map_err(io_err("wait for daemon"))? {
            Some(st) if st.success() => Ok(st),
            Some(st) => Err(GuestError::StopDaemon {
                detail: format!("exit status {st} after SIGTERM"),
                log_tail: file_tail(&self.log_path),
            }),
            None => {
                let _ = child.kill();
                let _ = child.wait();
                Err(GuestError::StopDaemon {
                    detail: format!("still running {limit:?} after SIGTERM; killed"),
                    log_tail: file_tail(&self.log_path),
                })
            }
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Guest
// ---------------------------------------------------------------------------------------------

/// One vhost-user-blk disk of the guest.
#[derive(Debug, Clone)]
pub struct DiskAttach {
    /// The daemon's socket.
    pub socket: PathBuf,
    /// `num-queues` of the virtio device.
    pub num_queues: u16,
    /// QEMU reconnects to the socket (every second) when the daemon goes away.
    pub reconnect: bool,
}

/// How to run one guest (builder style).
#[derive(Debug, Clone)]
pub struct GuestConfig {
    /// Name used for log files.
    pub name: String,
    /// Contents of `/test.sh` (run by busybox `sh`).
    pub script: String,
    /// Extra files placed in the guest's root (path relative to `/`, contents, mode).
    pub files: Vec<(String, Vec<u8>, u32)>,
    /// Disks, in order (`/dev/vda`, `/dev/vdb`, ...).
    pub disks: Vec<DiskAttach>,
    /// vCPUs.
    pub smp: u32,
    /// RAM in MiB (shared memfd, required by vhost-user).
    pub mem_mib: u32,
    /// Kill QEMU after this long.
    pub timeout: Duration,
    /// Extra kernel command-line words.
    pub extra_append: String,
}

impl GuestConfig {
    /// A 2-vCPU, 512 MiB guest running `script`, 120 s time limit, no disks yet.
    pub fn new(name: &str, script: &str) -> Self {
        GuestConfig {
            name: name.to_string(),
            script: script.to_string(),
            files: Vec::new(),
            disks: Vec::new(),
            smp: 2,
            mem_mib: 512,
            timeout: Duration::from_secs(120),
            extra_append: String::new(),
        }
    }
    /// Adds a disk served on `socket`.
    pub fn disk(mut self, socket: &Path, num_queues: u16) -> Self {
        self.disks.push(DiskAttach {
            socket: socket.to_path_buf(),
            num_queues,
            reconnect: false,
        });
        self
    }
    /// Adds a disk served on `socket` whose chardev reconnects (`reconnect=1`) when the daemon
    /// dies or restarts.
    pub fn disk_reconnecting(mut self, socket: &Path, num_queues: u16) -> Self {
        self.disks.push(DiskAttach {
            socket: socket.to_path_buf(),
            num_queues,
            reconnect: true,
        });
        self
    }
    /// Sets the time limit.
    pub fn timeout(mut self, t: Duration) -> Self {
        self.timeout = t;
        self
    }
    /// Sets the vCPU count.
    pub fn smp(mut self, n: u32) -> Self {
        self.smp = n;
        self
    }
    /// Adds a file to the guest's root filesystem.
    pub fn file(mut self, path: &str, contents: &[u8], mode: u32) -> Self {
        self.files.push((path.to_string(), contents.to_vec(), mode));
        self
    }
}

/// Appends one `newc` cpio entry.
fn cpio_entry(out: &mut Vec<u8>, ino: u32, name: &str, mode: u32, data: &[u8]) -> io::Result<()> {
    let namesize = u32::try_from(name.len() + 1)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "cpio name too long"))?;
    let filesize = u32::try_from(data.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "cpio file too large"))?;
    let fields = [ino, mode, 0, 0, 1, 0, filesize, 0, 0, 0, 0, namesize, 0];
    out.extend_from_slice(b"070701");
    for f in fields {
        out.extend_from_slice(format!("{f:08X}").as_bytes());
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    out.resize(out.len().next_multiple_of(4), 0);
    out.extend_from_slice(data);
    out.resize(out.len().next_multiple_of(4), 0);
    Ok(())
}

/// Builds an uncompressed `newc` archive of regular files (parent dirs are created).
pub fn newc_archive(files: &[(String, Vec<u8>, u32)]) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut ino = 0x5_0000u32;
    let mut dirs: Vec<String> = Vec::new();
    for (path, data, mode) in files {
        let rel = path.trim_start_matches('/');
        if rel.is_empty() || rel.split('/').any(|c| c == ".." || c.is_empty()) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("bad guest path {path:?}"),
            ));
        }
        let comps: Vec<&str> = rel.split('/').collect();
        for i in 1..comps.len() {
            let d = comps.get(..i).unwrap_or_default().join("/");
            if !dirs.contains(&d) {
                ino += 1;
                cpio_entry(&mut out, ino, &d, 0o040_755, &[])?;
                dirs.push(d);
            }
        }
        ino += 1;
        cpio_entry(&mut out, ino, rel, 0o100_000 | (mode & 0o7777), data)?;
    }
    cpio_entry(&mut out, 0, "TRAILER!!!", 0, &[])?;
    Ok(out)
}

#[derive(Debug, Default)]
struct LogState {
    text: String,
    streams_open: usize,
}

#[derive(Debug, Default)]
struct SerialLog {
    state: Mutex<LogState>,
    cond: Condvar,
}

impl SerialLog {
    fn lock(&self) -> MutexGuard<'_, LogState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
    fn snapshot(&self) -> String {
        self.lock().text.clone()
    }
}

/// What a finished guest run produced.
#[derive(Debug, Clone)]
pub struct GuestOutput {
    /// QEMU's exit status.
    pub status: ExitStatus,
    /// The whole serial console (and QEMU stderr) log.
    pub log: String,
    /// `RESULT key=value` pairs in order of appearance.
    pub results: Vec<(String, String)>,
    /// Wall-clock time of the run.
    pub elapsed: Duration,
}

impl GuestOutput {
    /// The last value printed for `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.results
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
    /// The last value for `key`; panics (quoting the log) if absent. For tests.
    pub fn require(&self, key: &str) -> &str {
        match self.get(key) {
            Some(v) => v,
            None => panic!(
                "guest printed no RESULT {key}=...\n--- serial log tail ---\n{}",
                self.log_tail()
            ),
        }
    }
    /// All results as a map (last value wins).
    pub fn map(&self) -> BTreeMap<String, String> {
        self.results.iter().cloned().collect()
    }
    /// The end of the log, for error messages.
    pub fn log_tail(&self) -> String {
        tail_lines(&self.log, LOG_TAIL_LINES)
    }
    /// Panics unless the guest's `/test.sh` exited 0 (`RESULT init_test_exit=0`).
    pub fn assert_script_ok(&self) {
        assert_eq!(
            self.get("init_test_exit"),
            Some("0"),
            "guest test script failed\n--- serial log tail ---\n{}",
            self.log_tail()
        );
    }
}

/// Parses every `RESULT k=v k2=v2` line (anywhere in a line; CRs and junk before it ignored).
pub fn parse_results(log: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for line in log.lines() {
        let Some(pos) = line.find("RESULT ") else {
            continue;
        };
        let rest = line.get(pos + "RESULT ".len()..).unwrap_or_default();
        for tok in rest.split_whitespace() {
            if let Some((k, v)) = tok.split_once('=') {
                if !k.is_empty() {
                    out.push((k.to_string(), v.to_string()));
                }
            }
        }
    }
    out
}

/// A running QEMU guest; killed (SIGKILL) on drop.
#[derive(Debug)]
pub struct Guest {
    child: Option<Child>,
    log: Arc<SerialLog>,
    readers: Vec<JoinHandle<()>>,
    started: Instant,
    deadline: Instant,
    timeout: Duration,
    log_path: PathBuf,
    _stdin: Option<ChildStdin>,
    _dir: tempfile::TempDir,
}

impl GuestEnv {
    /// Boots a guest as configured; its serial log goes to `log_dir/<cfg.name>.serial.log`.
    pub fn boot(&self, cfg: &GuestConfig, log_dir: &Path) -> Result<Guest> {
        let dir = tempfile::Builder::new()
            .prefix("snapblk-guest")
            .tempdir()
            .map_err(io_err("create guest temp dir"))?;
        // initrd = cached base archive + per-test archive holding /test.sh.
        let mut files = vec![(
            "test.sh".to_string(),
            cfg.script.clone().into_bytes(),
            0o755,
        )];
        files.extend(cfg.files.iter().cloned());
        let extra = newc_archive(&files).map_err(io_err("build test cpio"))?;
        let initrd = dir.path().join("initrd");
        let mut base = fs::read(&self.initramfs)
            .map_err(io_err(format!("read {}", self.initramfs.display())))?;
        base.resize(base.len().next_multiple_of(4), 0);
        base.extend_from_slice(&extra);
        fs::write(&initrd, &base).map_err(io_err("write initrd"))?;

        let mem = cfg.mem_mib;
        let mut cmd = Command::new(&self.qemu);
        if let Some(d) = &self.datadir {
            cmd.arg("-L").arg(d);
        }
        if let Some(m) = &self.module_dir {
            cmd.env("QEMU_MODULE_DIR", m);
        }
        cmd.args([
            "-machine",
            "q35",
            "-accel",
            "tcg",
            "-nodefaults",
            "-no-reboot",
        ])
        .args(["-display", "none", "-monitor", "none", "-serial", "stdio"])
        .args(["-smp", &cfg.smp.to_string(), "-m", &mem.to_string()])
        .arg("-object")
        .arg(format!("memory-backend-memfd,id=mem,size={mem}M,share=on"))
        .args(["-numa", "node,memdev=mem"]);
        for (i, d) in cfg.disks.iter().enumerate() {
            cmd.arg("-chardev")
                .arg(format!(
                    "socket,id=vu{i},path={}{}",
                    qemu_opt_escape(&d.socket),
                    if d.reconnect { ",reconnect=1" } else { "" }
                ))
                .arg("-device")
                .arg(format!(
                    "vhost-user-blk-pci,chardev=vu{i},num-queues={},id=vblk{i}",
                    d.num_queues
                ));
        }
        cmd.arg("-kernel")
            .arg(&self.kernel)
            .arg("-initrd")
            .arg(&initrd)
            .arg("-append")
            .arg(format!(
                "console=ttyS0 panic=-1 loglevel=4 no_timer_check {}",
                cfg.extra_append
            ))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        die_with_parent(&mut cmd);
        let log_path = log_dir.join(format!("{}.serial.log", cfg.name));
        let file = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(&log_path)
            .map_err(io_err(format!("create {}", log_path.display())))?;
        writeln!(&file, "# {cmd:?}").map_err(io_err("write serial log"))?;
        let file = Arc::new(Mutex::new(file));
        let started = Instant::now();
        let mut child = cmd.spawn().map_err(io_err("spawn qemu-system-x86_64"))?;
        let log = Arc::new(SerialLog::default());
        let mut readers = Vec::new();
        let streams: Vec<Box<dyn Read + Send>> = [
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
        ]
        .into_iter()
        .flatten()
        .collect();
        log.lock().streams_open = streams.len();
        for stream in streams {
            let log = Arc::clone(&log);
            let file = Arc::clone(&file);
            readers.push(std::thread::spawn(move || pump_serial(stream, &log, &file)));
        }
        Ok(Guest {
            _stdin: child.stdin.take(),
            child: Some(child),
            log,
            readers,
            started,
            deadline: started + cfg.timeout,
            timeout: cfg.timeout,
            log_path,
            _dir: dir,
        })
    }

    /// Boots a guest and waits for it to power off (see [`Guest::wait`]).
    pub fn run(&self, cfg: &GuestConfig, log_dir: &Path) -> Result<GuestOutput> {
        self.boot(cfg, log_dir)?.wait()
    }
}

fn pump_serial(stream: Box<dyn Read + Send>, log: &SerialLog, file: &Mutex<File>) {
    let mut reader = BufReader::new(stream);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match reader.read_until(b'\n', &mut buf) {
            Ok(0) | Err(_) => break,
            Ok(_) => {
                if let Ok(mut f) = file.lock() {
                    let _ = f.write_all(&buf);
                }
                let text = String::from_utf8_lossy(&buf).replace('\r', "");
                log.lock().text.push_str(&text);
                log.cond.notify_all();
            }
        }
    }
    log.lock().streams_open -= 1;
    log.cond.notify_all();
}

impl Guest {
    /// The serial log so far.
    pub fn log(&self) -> String {
        self.log.snapshot()
    }
    /// QEMU's process id while it has not been reaped.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }
    /// The serial log file.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Waits until the serial log contains `needle` (or the guest's deadline passes, or QEMU
    /// closes its output). On failure QEMU is killed.
    pub fn wait_for(&mut self, needle: &str) -> Result<()> {
        let mut st = self.log.lock();
        loop {
            if st.text.contains(needle) {
                return Ok(());
            }
            let now = Instant::now();
            if now >= self.deadline || st.streams_open == 0 {
                let log_tail = tail_lines(&st.text, LOG_TAIL_LINES);
                drop(st);
                self.kill();
                return Err(GuestError::WaitGuest {
                    what: format!("{needle:?}"),
                    after: self.timeout,
                    log_tail,
                });
            }
            let wait = (self.deadline - now).min(Duration::from_millis(500));
            st = self
                .log
                .cond
                .wait_timeout(st, wait)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
    }

    /// SIGKILLs QEMU (the "guest crashed / host killed the VM" case) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
    }

    /// Waits for QEMU to exit (guest `poweroff -f`); kills it at the deadline. Fails unless
    /// QEMU exits with status 0 and the guest kernel did not panic.
    pub fn wait(mut self) -> Result<GuestOutput> {
        let Some(mut child) = self.child.take() else {
            return Err(GuestError::RunGuest {
                detail: "QEMU was already killed".into(),
                log_tail: tail_lines(&self.log(), LOG_TAIL_LINES),
            });
        };
        let remaining = self.deadline.saturating_duration_since(Instant::now());
        let status = match wait_timeout(&mut child, remaining) {
            Ok(Some(st)) => st,
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                self.kill();
                return Err(GuestError::WaitGuest {
                    what: "poweroff".into(),
                    after: self.timeout,
                    log_tail: tail_lines(&self.log(), LOG_TAIL_LINES),
                });
            }
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                self.kill();
                return Err(GuestError::Io {
                    action: "wait for QEMU".into(),
                    source: e,
                });
            }
        };
        // Readers end when QEMU's pipes close.
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
        let log = self.log();
        if log.contains("Kernel panic - not syncing") {
            return Err(GuestError::RunGuest {
                detail: format!("guest kernel panicked (QEMU {status})"),
                log_tail: tail_lines(&log, LOG_TAIL_LINES),
            });
        }
        if !status.success() {
            let detail = match status.signal() {
                Some(sig) => format!("killed by signal {sig}"),
                None => format!("{status}"),
            };
            return Err(GuestError::RunGuest {
                detail,
                log_tail: tail_lines(&log, LOG_TAIL_LINES),
            });
        }
        Ok(GuestOutput {
            status,
            results: parse_results(&log),
            log,
            elapsed: self.started.elapsed(),
        })
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        self.kill();
    }
}

// ---------------------------------------------------------------------------------------------
// Host-side data helpers
// ---------------------------------------------------------------------------------------------

/// Creates (or truncates) `path` as `size` bytes of seeded pseudo-random data.
pub fn write_random_image(path: &Path, size: u64, seed: u64) -> Result<()> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let f = File::create(path).map_err(io_err(format!("create {}", path.display())))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0u64;
    while off < size {
        let n = usize::try_from((size - off).min(buf.len() as u64)).unwrap_or(buf.len());
        let chunk = buf.get_mut(..n).unwrap_or_default();
        rng.fill_bytes(chunk);
        f.write_all_at(chunk, off)
            .map_err(io_err(format!("write {}", path.display())))?;
        off += n as u64;
    }
    f.sync_all().map_err(io_err("fsync image"))?;
    Ok(())
}

/// md5 (hex) of a whole file, via `md5sum`.
pub fn md5_file(path: &Path) -> Result<String> {
    let out = run_tool(Command::new("md5sum").arg(path))?;
    out.split_whitespace()
        .next()
        .map(str::to_string)
        .ok_or_else(|| GuestError::RunTool {
            tool: "md5sum".into(),
            detail: "no output".into(),
        })
}

/// Runs a host tool (qemu-img, sha256sum, snapblk, ...), panicking with its output unless it
/// exits 0; returns its stdout and stderr. For tests.
pub fn host_tool<S: AsRef<std::ffi::OsStr> + std::fmt::Debug>(cmd: &str, args: &[S]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("spawn {cmd}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}\n{text}",
        out.status
    );
    text
}

/// md5 (hex) of `len` bytes of `path` at `off` (a short file is an error).
pub fn md5_range(path: &Path, off: u64, len: u64) -> Result<String> {
    let f = File::open(path).map_err(io_err(format!("open {}", path.display())))?;
    let mut child = Command::new("md5sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(io_err("spawn md5sum"))?;
    let mut stdin = child.stdin.take().ok_or_else(|| GuestError::RunTool {
        tool: "md5sum".into(),
        detail: "no stdin".into(),
    })?;
    let mut buf = vec![0u8; 1 << 20];
    let mut done = 0u64;
    let mut result = Ok(());
    while done < len {
        let n = usize::try_from((len - done).min(buf.len() as u64)).unwrap_or(buf.len());
        let chunk = buf.get_mut(..n).unwrap_or_default();
        if let Err(e) = f.read_exact_at(chunk, off.saturating_add(done)) {
            result = Err(io_err(format!("read {} at {}", path.display(), off + done))(e));
            break;
        }
        if let Err(e) = stdin.write_all(chunk) {
            result = Err(io_err("feed md5sum")(e));
            break;
        }
        done += n as u64;
    }
    drop(stdin);
    let out = child.wait_with_output().map_err(io_err("wait md5sum"))?;
    result?;
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .map(str::to_string)
        .ok_or_else(|| GuestError::RunTool {
            tool: "md5sum".into(),
            detail: "no output".into(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn result_lines_parse_with_console_junk_and_crlf() {
        let log = "\x1b[2Jsnapblk-init: x\r\nRESULT a=1 b=two\r\nnoise RESULT c=3 junk\nRESULTx=9\nRESULT a=4\n";
        let r = parse_results(log);
        assert_eq!(
            r,
            vec![
                ("a".to_string(), "1".to_string()),
                ("b".to_string(), "two".to_string()),
                ("c".to_string(), "3".to_string()),
                ("a".to_string(), "4".to_string()),
            ]
        );
    }

    #[test]
    fn newc_archive_lists_dirs_files_and_trailer_aligned() {
        let a = newc_archive(&[("etc/x/test.sh".into(), b"echo hi\n".to_vec(), 0o755)])
            .expect("archive");
        assert_eq!(a.len() % 4, 0);
        let text = String::from_utf8_lossy(&a);
        let etc = text.find("etc\0").expect("etc dir");
        let sub = text.find("etc/x\0").expect("etc/x dir");
        let file = text.find("etc/x/test.sh\0").expect("file");
        let trailer = text.find("TRAILER!!!\0").expect("trailer");
        assert!(etc < sub && sub < file && file < trailer);
        assert!(text.contains("echo hi\n"));
        assert!(newc_archive(&[("../evil".into(), vec![], 0o644)]).is_err());
    }

    #[test]
    fn newc_archive_is_readable_by_gnu_cpio() {
        let Ok(true) = Command::new("cpio")
            .arg("--version")
            .stdout(Stdio::null())
            .status()
            .map(|s| s.success())
        else {
            eprintln!("cpio not installed; skipping");
            return;
        };
        let a = newc_archive(&[
            ("test.sh".into(), b"#!/bin/sh\necho 1\n".to_vec(), 0o755),
            ("d/data.bin".into(), vec![7u8; 1001], 0o644),
        ])
        .expect("archive");
        let mut child = Command::new("cpio")
            .args(["-t", "-v", "--quiet"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn cpio");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(&a)
            .expect("feed cpio");
        let out = child.wait_with_output().expect("cpio output");
        assert!(out.status.success());
        let listing = String::from_utf8_lossy(&out.stdout);
        assert!(listing.contains("test.sh"), "{listing}");
        assert!(listing.contains("1001"), "{listing}");
        assert!(listing.contains("d/data.bin"), "{listing}");
    }

    #[test]
    fn md5_range_matches_md5_of_the_same_bytes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let img = dir.path().join("img");
        write_random_image(&img, 3 << 20, 7).expect("image");
        let bytes = fs::read(&img).expect("read");
        let part = dir.path().join("part");
        fs::write(&part, bytes.get(1000..1000 + (1 << 20)).expect("slice")).expect("write");
        assert_eq!(
            md5_range(&img, 1000, 1 << 20).expect("range"),
            md5_file(&part).expect("file")
        );
        assert_eq!(
            md5_range(&img, 0, 3 << 20).expect("range"),
            md5_file(&img).expect("file")
        );
        assert!(
            md5_range(&img, 3 << 20, 1).is_err(),
            "reading past EOF must fail"
        );
    }
}
