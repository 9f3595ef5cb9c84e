//! Daemon lifecycle of `snapblk serve`: bind the socket, serve one frontend connection at a time,
//! survive disconnects, and shut down cleanly on SIGTERM/SIGINT.
//!
//! Lifecycle:
//! 1. [`Server::bind`] opens the disk (through [`crate::disk::open_disk`]), derives the device
//!    configuration and binds the unix socket with the requested permissions (created under a
//!    restrictive umask, so it is never more open than asked, even for an instant).
//! 2. [`Server::run`] waits for a frontend, serves it with a fresh [`VhostUserBlk`] (fresh queue
//!    state, fresh worker threads), and when the frontend goes away joins the queue threads (so
//!    every request the daemon picked up has completed), flushes the disk and listens again.
//! 3. [`StopHandle::stop`] (called by the signal thread on SIGTERM/SIGINT) makes `run` stop
//!    accepting, close the current connection, wait for in-flight requests, flush the disk and
//!    remove the socket file.
//!
//! Locking model: the main thread owns the listener and the per-connection daemon. The only
//! shared state is the [`StopHandle`]: an atomic flag, an eventfd that wakes the main thread's
//! poll, and a mutex around the shutdown handle of the current connection.

use std::fs::{self, Permissions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;

use blockdev::BlockError;
use log::{error, info, warn};
use vhost::vhost_user::Listener;
use vhost_user_backend::{ShutdownHandle, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::cli::ServeArgs;
use crate::device::{BlkDevice, ConfigureDeviceError, DeviceConfig};
use crate::disk::{open_disk, OpenDiskError, ServedDisk};
use crate::vhu_blk::VhostUserBlk;

/// Why the daemon could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The image could not be opened.
    #[error(transparent)]
    OpenDisk(#[from] OpenDiskError),
    /// The device could not be configured for this disk.
    #[error("cannot configure the device: {0}")]
    Configure(#[from] ConfigureDeviceError),
    /// Something that is not a socket is in the way of the socket path.
    #[error("{0} exists and is not a socket")]
    SocketPathTaken(PathBuf),
    /// Another daemon is listening on the socket path.
    #[error("{0} is in use by another daemon")]
    SocketInUse(PathBuf),
    /// The socket could not be created.
    #[error("cannot create socket {path}: {source}")]
    Bind {
        /// Socket path.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// Signal handling could not be set up.
    #[error("cannot set up signal handling: {0}")]
    Signals(io::Error),
    /// Waiting for a connection failed.
    #[error("cannot wait for a connection: {0}")]
    Poll(io::Error),
    /// The vhost-user daemon could not be created.
    #[error("cannot start the vhost-user daemon: {0}")]
    Daemon(String),
    /// The daemon could not drop its privileges or install its system-call filter.
    #[error(transparent)]
    Sandbox(#[from] crate::sandbox::SandboxError),
    /// The metrics endpoint could not be started.
    #[error("cannot serve metrics on {addr}: {source}")]
    Metrics {
        /// The address.
        addr: String,
        /// The error.
        source: io::Error,
    },
    /// The final flush failed: acknowledged writes may not be durable.
    #[error("final flush failed: {0}")]
    FinalFlush(BlockError),
}

struct StopState {
    stopped: AtomicBool,
    wake: EventFd,
    connection: Mutex<Option<ShutdownHandle>>,
}

/// Asks a running [`Server`] to shut down; cheap to clone, safe to call from any thread.
#[derive(Clone)]
pub struct StopHandle {
    state: Arc<StopState>,
}

impl std::fmt::Debug for StopHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StopHandle")
            .field("stopped", &self.is_stopped())
            .finish()
    }
}

impl StopHandle {
    fn new() -> io::Result<Self> {
        Ok(StopHandle {
            state: Arc::new(StopState {
                stopped: AtomicBool::new(false),
                wake: EventFd::new(EFD_NONBLOCK)?,
                connection: Mutex::new(None),
            }),
        })
    }

    /// Stops the server: no new connection is accepted and the current one is closed.
    pub fn stop(&self) {
        self.state.stopped.store(true, Ordering::SeqCst);
        if let Err(e) = self.state.wake.write(1) {
            warn!("cannot wake the accept loop: {e}");
        }
        let conn = self
            .state
            .connection
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(handle) = conn.as_ref() {
            handle.shutdown();
        }
    }

    /// Whether [`StopHandle::stop`] was called.
    pub fn is_stopped(&self) -> bool {
        self.state.stopped.load(Ordering::SeqCst)
    }

    fn set_connection(&self, handle: Option<ShutdownHandle>) {
        let mut conn = self
            .state
            .connection
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        *conn = handle;
        // A stop that raced with the connection being published still closes it.
        if self.is_stopped() {
            if let Some(h) = conn.as_ref() {
                h.shutdown();
            }
        }
    }
}

/// A bound, not yet running vhost-user-blk server.
pub struct Server {
    listener: Listener,
    socket_path: PathBuf,
    disk: ServedDisk,
    cfg: Arc<DeviceConfig>,
    stop: StopHandle,
    /// Backs the in-flight buffers handed to frontends (created before the sandbox forbids
    /// `memfd_create`); `None` if it could not be created (tracking is then not offered).
    inflight_file: Option<Arc<crate::reconnect::InflightFile>>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("socket_path", &self.socket_path)
            .field("disk", &self.disk)
            .field("cfg", &self.cfg)
            .finish()
    }
}

/// Binds `path` as a listening socket with permissions `mode`, replacing a stale socket.
pub(crate) fn bind_socket(path: &Path, mode: u32) -> Result<UnixListener, ServeError> {
    let bind_err = |source| ServeError::Bind {
        path: path.to_path_buf(),
        source,
    };
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if UnixStream::connect(path).is_ok() {
                return Err(ServeError::SocketInUse(path.to_path_buf()));
            }
            fs::remove_file(path).map_err(bind_err)?;
        }
        Ok(_) => return Err(ServeError::SocketPathTaken(path.to_path_buf())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(bind_err(e)),
    }
    // SAFETY: umask only swaps the process's file-mode creation mask; it cannot fail.
    let old_mask = unsafe { libc::umask(0o177) };
    let bound = UnixListener::bind(path);
    // SAFETY: as above, restoring the previous mask.
    unsafe { libc::umask(old_mask) };
    let listener = bound.map_err(bind_err)?;
    if let Err(e) = fs::set_permissions(path, Permissions::from_mode(mode)) {
        let _ = fs::remove_file(path);
        return Err(bind_err(e));
    }
    Ok(listener)
}

enum Wake {
    Connection,
    Stop,
}

/// Waits until `listener` has a pending connection or `wake` is signalled.
fn wait_for_connection(listener: &Listener, wake: &EventFd) -> io::Result<Wake> {
    Ok(
        if crate::control::wait_readable(listener.as_raw_fd(), wake)? {
            Wake::Connection
        } else {
            Wake::Stop
        },
    )
}

/// Request buffers of 1 MiB per queue faulted in at start (`blockdev::prefault_huge_halves`,
/// 8 MiB a queue): eight large writes in flight per queue start without a page fault (a fresh
/// overlay written with 1 MiB requests at QD8 on 2 queues: 1.54-1.73 GB/s and a p99 of
/// 87-118 ms without, 1.83-2.02 GB/s and 21-22 ms with); deeper queues fault the rest in on
/// first use. At most [`PREFAULT_HALVES_MAX`] in all, whatever the number of queues.
const PREFAULT_HALVES_PER_QUEUE: usize = 8;

/// The most request buffers of 1 MiB faulted in at start (32 MiB).
const PREFAULT_HALVES_MAX: usize = 32;

impl Server {
    /// Opens the disk for `args` and binds the socket.
    pub fn bind(args: &ServeArgs) -> Result<Self, ServeError> {
        let disk = open_disk(args)?;
        let cfg = DeviceConfig::from_args(args, disk.dev.as_ref())?;
        if !cfg.read_only {
            // The request buffers of the first large writes, faulted in before serving.
            let n = PREFAULT_HALVES_PER_QUEUE * usize::from(cfg.num_queues);
            blockdev::prefault_huge_halves(n.min(PREFAULT_HALVES_MAX));
        }
        Self::with_disk(disk, cfg, &args.socket, args.socket_mode)
    }

    /// Serves an already opened disk with configuration `cfg` on `socket`.
    pub fn with_disk(
        disk: ServedDisk,
        cfg: DeviceConfig,
        socket: &Path,
        socket_mode: u32,
    ) -> Result<Self, ServeError> {
        let stop = StopHandle::new().map_err(ServeError::Signals)?;
        let listener = bind_socket(socket, socket_mode)?;
        info!(
            "serving {} bytes ({}-byte blocks, {} queue(s) of {}, {}{}) on {}",
            cfg.size_bytes,
            cfg.logical_block_size,
            cfg.num_queues,
            cfg.queue_size,
            if cfg.writeback_default {
                "write-back"
            } else {
                "write-through"
            },
            if cfg.read_only { ", read-only" } else { "" },
            socket.display()
        );
        Ok(Server {
            listener: Listener::from(listener),
            socket_path: socket.to_path_buf(),
            disk,
            cfg: Arc::new(cfg),
            stop,
            inflight_file: match crate::reconnect::InflightFile::create() {
                Ok(f) => Some(Arc::new(f)),
                Err(e) => {
                    warn!("cannot create the in-flight tracking buffer ({e}): a restarted daemon will not resubmit requests in flight");
                    None
                }
            },
        })
    }

    /// The handle that stops [`Server::run`].
    pub fn stop_handle(&self) -> StopHandle {
        self.stop.clone()
    }

    /// The socket path.
    pub fn socket_path(&self) -> &Path {
        &self.socket_path
    }

    /// The state the control socket and the metrics endpoint serve.
    pub fn live(&self) -> Arc<crate::live::Live> {
        Arc::clone(&self.disk.live)
    }

    /// Serves frontends one after the other until stopped; then flushes the disk and removes
    /// the socket file.
    pub fn run(mut self) -> Result<(), ServeError> {
        let result = self.accept_loop();
        info!("shutting down: flushing the disk");
        let flushed = if self.cfg.read_only {
            Ok(())
        } else {
            self.disk.dev.flush()
        };
        if let Err(e) = fs::remove_file(&self.socket_path) {
            warn!("cannot remove socket {}: {e}", self.socket_path.display());
        }
        result?;
        flushed.map_err(ServeError::FinalFlush)
    }

    fn accept_loop(&mut self) -> Result<(), ServeError> {
        let mut connection = 0u64;
        while !self.stop.is_stopped() {
            match wait_for_connection(&self.listener, &self.stop.state.wake)
                .map_err(ServeError::Poll)?
            {
                Wake::Stop => break,
                Wake::Connection => {}
            }
            connection += 1;
            self.serve_connection(connection)?;
            if !self.cfg.read_only {
                if let Err(e) = self.disk.dev.flush() {
                    error!("flush after disconnect failed: {e}");
                }
            }
        }
        Ok(())
    }

    /// Accepts and serves one connection until the frontend leaves or the server is stopped.
    fn serve_connection(&mut self, id: u64) -> Result<(), ServeError> {
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let dev = Arc::new(BlkDevice::new(self.disk.clone(), self.cfg.clone()));
        let backend = Arc::new(
            VhostUserBlk::with_inflight(dev, mem.clone(), self.inflight_file.clone())
                .map_err(|e| ServeError::Daemon(e.to_string()))?,
        );
        let mut daemon =
            VhostUserDaemon::new(format!("snapblk-conn{id}"), Arc::clone(&backend), mem)
                .map_err(|e| ServeError::Daemon(e.to_string()))?;
        // Each queue thread watches its queue's io_uring completions next to its kick.
        for (q, handler) in daemon.get_epoll_handlers().iter().enumerate() {
            if let Some(fd) = backend.uring_event_fd(q) {
                let event = u64::from(backend.uring_event());
                if let Err(e) = handler.register_listener(fd, EventSet::IN, event) {
                    return Err(ServeError::Daemon(format!(
                        "queue {q}: cannot watch its io_uring: {e}"
                    )));
                }
            }
        }
        if let Err(e) = daemon.start(&mut self.listener) {
            warn!("connection {id}: accept failed: {e}");
            return Ok(());
        }
        info!("connection {id}: frontend connected");
        self.stop.set_connection(daemon.shutdown_handle());
        self.disk.live.set_frontend(Some(id));
        let ended = daemon.wait();
        self.disk.live.set_frontend(None);
        self.stop.set_connection(None);
        // Dropping the daemon stops and joins the queue threads: every request picked up from a
        // queue has completed once this returns.
        drop(daemon);
        // Requests the queue threads handed to executors may still run: wait for them too, so
        // the flush that follows covers every write the guest saw complete.
        backend.wait_idle();
        match ended {
            Ok(()) => info!("connection {id}: frontend disconnected"),
            Err(e) if self.stop.is_stopped() => info!("connection {id}: closed for shutdown ({e})"),
            Err(vhost_user_backend::Error::HandleRequest(
                vhost::vhost_user::Error::Disconnected
                | vhost::vhost_user::Error::PartialMessage
                | vhost::vhost_user::Error::SocketBroken(_),
            )) => info!("connection {id}: frontend disconnected"),
            Err(e) => warn!("connection {id}: ended with error: {e}"),
        }
        Ok(())
    }
}

/// Blocks SIGTERM and SIGINT in the calling thread and every thread it spawns afterwards, and
/// returns the signal set. Must run before any layer starts a thread (the folio cache's
/// writeback threads), or the default action of the signal would kill the daemon unflushed.
fn block_stop_signals() -> Result<libc::sigset_t, ServeError> {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it before use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid, exclusively borrowed sigset_t for each call.
    let ret = unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut())
    };
    if ret != 0 {
        return Err(ServeError::Signals(io::Error::from_raw_os_error(ret)));
    }
    Ok(set)
}

/// Blocks SIGTERM and SIGINT in the calling thread (and every thread it spawns afterwards) and
/// starts a thread that calls `stop.stop()` when one of them arrives.
pub fn stop_on_signals(stop: StopHandle) -> Result<(), ServeError> {
    let set = block_stop_signals()?;
    thread::Builder::new()
        .name("snapblk-signals".into())
        .spawn(move || loop {
            let mut sig: libc::c_int = 0;
            // SAFETY: `set` is initialised and `sig` is a valid out-pointer for the call.
            let ret = unsafe { libc::sigwait(&set, &mut sig) };
            if ret == 0 {
                info!("received signal {sig}, stopping");
                stop.stop();
            }
        })
        .map_err(ServeError::Signals)?;
    Ok(())
}

/// `snapblk serve`: serves until SIGTERM/SIGINT.
pub fn serve(args: &ServeArgs) -> Result<(), ServeError> {
    // Block the signals before opening the disk starts the cache's writeback threads and before
    // the first connection spawns queue threads.
    block_stop_signals()?;
    if args.aio == crate::cli::AioMode::Threads {
        // No io_uring anywhere: batched writebacks of an O_DIRECT image go one `pwrite` at a
        // time, and copy-on-write fills from a direct backing file one `pread` at a time.
        qcow_snapshot::host::disable_rings();
    }
    let server = Server::bind(args)?;
    // Dropped after `run`: their threads are joined before the disk's last handle goes away.
    let _control = match &args.control_socket {
        Some(path) => Some(crate::control::ControlServer::start(path, server.live())?),
        None => None,
    };
    let _metrics = match &args.metrics {
        Some(addr) => Some(
            crate::metrics_http::MetricsServer::start(addr, server.live()).map_err(|e| {
                ServeError::Metrics {
                    addr: addr.to_string(),
                    source: e,
                }
            })?,
        ),
        None => None,
    };
    stop_on_signals(server.stop_handle())?;
    // Socket bound, every image of the chain open, signal thread running: drop what serving
    // does not need.
    crate::sandbox::enter(args, &server.disk)?;
    server.run()
}
