//! A read-only NBD client for backing images: [`NbdDev`] is a [`BlockDev`] over an export of
//! qemu-nbd, qemu-storage-daemon, nbdkit or any NBD server, through libnbd ([`ffi`], a thin
//! hand-written binding of the calls used).
//!
//! What it does:
//! - **Names**: [`uri`] parses backing names exactly as QEMU does (`nbd://HOST[:PORT]/EXPORT`,
//!   `nbd+unix:///EXPORT?socket=PATH`, QEMU's older `nbd:...` forms).
//! - **Depth**: a pool of up to [`NbdOptions::connections`] connections (default 16, as many
//!   requests as QEMU's NBD client keeps in flight on its one connection). A request
//!   takes an idle connection, or opens a new one while the pool is below its cap, or waits. An
//!   extra connection whose handshake does not finish within [`EXTRA_CONNECT_TIMEOUT`] while
//!   other connections work (a server limiting its clients, e.g. qemu-nbd without `--shared`)
//!   lowers the cap to what the server accepts, once, with a warning. So up to `connections`
//!   cold reads are on the wire at once.
//! - **Structured replies** are requested on every connection: a read of a hole comes back as
//!   one hole chunk (no data bytes) and reads as zeros.
//! - **Block status** (`base:allocation`): reads of at least [`BLOCK_STATUS_MIN_READ`] consult a
//!   map of 64 KiB granules learned from block-status queries (one query per 4 MiB region, on
//!   first touch); granules the server reports as zero are filled locally without a read.
//! - **Read-ahead**: a sequential stream (each read starting where the previous ended, within
//!   256 KiB) of reads smaller than [`NbdOptions::readahead`] fetches that much in one command
//!   and serves the following reads from it.
//! - **Bounded time**: every request has a deadline ([`NbdOptions::timeout`], default 30 s)
//!   covering waiting for a connection, connecting and the command; past it the request fails
//!   with `ETIMEDOUT` and its connection is dropped.
//! - **Reconnect**: a connection that fails (server killed, restarted, network reset) is
//!   dropped together with every idle connection of the pool, the request is retried once on
//!   a fresh connection within its deadline, and later requests connect anew. The export must
//!   keep its size across reconnects (otherwise `EIO`: the base changed under the overlay).
//! - **Errors** are `BlockError::Io` (EIO from the server, ETIMEDOUT, ECONNREFUSED, ...); a
//!   failed read never returns zeros or stale data. Writes, discards and zeroing are refused
//!   (`BlockError::ReadOnly`): a base is only ever read.
//!
//! Threads and locking: no thread of its own; every request runs on its caller's thread.
//! `pool` (a mutex and a condvar) is held only to take or return a connection, never across
//! I/O; a connection is used by one request at a time. The read-ahead window has its own
//! mutex, held only to look up or install a window (never across I/O). The zero map is
//! lock-free (atomic bitmaps; a granule's bits only ever go from unknown to known). Lock
//! order: none needed, no two of these are held at once.

pub(crate) mod conn;
pub mod ffi;
mod readahead;
pub mod uri;

use std::io;
use std::net::ToSocketAddrs;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, RwLock, Weak};
use std::time::{Duration, Instant};

use blockdev::{check_range, BlockDev, BlockError, Result};
use conn::{CmdError, Conn};
pub use uri::{is_nbd_name, parse as parse_uri, NbdUri, Transport, UriError};

/// How long an extra connection's handshake may take while others work (see module docs).
pub const EXTRA_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Reads at least this long consult block status.
pub const BLOCK_STATUS_MIN_READ: usize = 64 << 10;
/// Granule of the zero map.
const GRANULE_SHIFT: u32 = 16;
/// Region one block-status query covers.
const BLOCK_STATUS_REGION: u64 = 4 << 20;

/// Client settings (the daemon sets them once from its command line).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NbdOptions {
    /// Most connections per export (at least 1).
    pub connections: usize,
    /// Deadline of one request.
    pub timeout: Duration,
    /// Read-ahead window for sequential reads (0: off).
    pub readahead: usize,
}

impl Default for NbdOptions {
    fn default() -> Self {
        NbdOptions {
            connections: 16,
            timeout: Duration::from_secs(30),
            readahead: 1 << 20,
        }
    }
}

static OPTIONS: RwLock<Option<NbdOptions>> = RwLock::new(None);
static IN_USE: AtomicBool = AtomicBool::new(false);

/// Sets the options every later [`NbdDev::open`] uses.
pub fn set_default_options(opts: NbdOptions) {
    *OPTIONS.write().unwrap_or_else(|e| e.into_inner()) = Some(opts);
}

/// The options [`NbdDev::open`] uses.
pub fn default_options() -> NbdOptions {
    OPTIONS
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .unwrap_or_default()
}

/// Whether this process opened an NBD export (the daemon's sandbox then allows the calls that
/// reconnecting needs: socket, connect, poll).
pub fn in_use() -> bool {
    IN_USE.load(Ordering::Acquire)
}

/// Counters of one [`NbdDev`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NbdStats {
    /// `read_at` calls.
    pub reads: u64,
    /// Read commands sent to the server.
    pub read_commands: u64,
    /// Bytes asked from the server by read commands.
    pub bytes_from_server: u64,
    /// Bytes served as zeros from the block-status map without a read command.
    pub zero_bytes_local: u64,
    /// Block-status queries sent.
    pub block_status_queries: u64,
    /// Reads served from a read-ahead window.
    pub readahead_hits: u64,
    /// Read-ahead windows fetched in the background.
    pub prefetches: u64,
    /// Connections established (including the first).
    pub connects: u64,
    /// Connections lost or failed to establish.
    pub connection_failures: u64,
    /// Requests that failed.
    pub errors: u64,
}

#[derive(Default)]
struct Counters {
    reads: AtomicU64,
    read_commands: AtomicU64,
    bytes_from_server: AtomicU64,
    zero_bytes_local: AtomicU64,
    block_status_queries: AtomicU64,
    readahead_hits: AtomicU64,
    prefetches: AtomicU64,
    connects: AtomicU64,
    connection_failures: AtomicU64,
    errors: AtomicU64,
}

fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

enum Endpoint {
    Unix(PathBuf),
    Tcp(Vec<std::net::SocketAddr>),
}

struct Pool {
    idle: Vec<Conn>,
    open: usize,
    cap: usize,
}

/// Granules known to read as zero, learned from block status (see module docs).
struct ZeroMap {
    known: Vec<AtomicU64>,
    zero: Vec<AtomicU64>,
    granules: u64,
}

impl ZeroMap {
    fn new(size: u64) -> ZeroMap {
        let granules = size.div_ceil(1 << GRANULE_SHIFT);
        let words = granules.div_ceil(64) as usize;
        ZeroMap {
            known: (0..words).map(|_| AtomicU64::new(0)).collect(),
            zero: (0..words).map(|_| AtomicU64::new(0)).collect(),
            granules,
        }
    }

    fn bit(map: &[AtomicU64], g: u64) -> bool {
        map[(g / 64) as usize].load(Ordering::Acquire) & (1 << (g % 64)) != 0
    }

    fn set(map: &[AtomicU64], g: u64) {
        map[(g / 64) as usize].fetch_or(1 << (g % 64), Ordering::AcqRel);
    }

    /// `Some(true)` granule reads as zero, `Some(false)` holds data, `None` unknown.
    fn state(&self, g: u64) -> Option<bool> {
        // The zero bit is set before the known bit, so a known granule's zero bit is final.
        Self::bit(&self.known, g).then(|| Self::bit(&self.zero, g))
    }

    /// Records extents `(offset, length, flags)`; `size` is the export size (the last granule
    /// may be short).
    fn record(&self, extents: &[(u64, u64, u32)], size: u64) {
        for &(off, len, flags) in extents {
            let end = off.saturating_add(len).min(size);
            if len == 0 || off >= end {
                continue;
            }
            let first = off >> GRANULE_SHIFT;
            let last = (end - 1) >> GRANULE_SHIFT;
            for g in first..=last.min(self.granules.saturating_sub(1)) {
                let gs = g << GRANULE_SHIFT;
                let ge = (gs + (1 << GRANULE_SHIFT)).min(size);
                if flags & ffi::LIBNBD_STATE_ZERO == 0 {
                    Self::set(&self.known, g);
                } else if off <= gs && end >= ge && self.state(g).is_none() {
                    Self::set(&self.zero, g);
                    Self::set(&self.known, g);
                }
            }
        }
    }
}

/// A read-only NBD export as a block device (see the module docs).
pub struct NbdDev {
    inner: Arc<Inner>,
    /// Background fetches of the next read-ahead window (the thread starts on first use and
    /// ends when this sender is dropped with the device).
    prefetch: Mutex<Option<mpsc::Sender<(u64, u64)>>>,
}

/// The shared state of an [`NbdDev`] (also reached by its prefetch thread).
struct Inner {
    uri: NbdUri,
    endpoint: Endpoint,
    opts: NbdOptions,
    size: u64,
    min_block: u64,
    max_block: u64,
    structured: bool,
    base_allocation: bool,
    pool: Mutex<Pool>,
    pool_cv: Condvar,
    zeros: ZeroMap,
    ra: readahead::ReadAhead,
    counters: Counters,
    /// Test hook run right after a connect or a command's I/O, with the pool unlocked (see
    /// [`NbdDev::set_io_hook`]).
    io_hook: Mutex<Option<IoHook>>,
}

/// Where [`NbdDev::set_io_hook`]'s hook runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoPoint {
    /// A new connection finished its handshake; it is counted in the pool but not handed out.
    Connected,
    /// A command finished on a checked-out connection, before the connection is returned.
    Command,
}

type IoHook = Arc<dyn Fn(IoPoint) + Send + Sync>;

impl std::fmt::Debug for NbdDev {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let i = &self.inner;
        f.debug_struct("NbdDev")
            .field("uri", &i.uri.text)
            .field("size", &i.size)
            .field("structured", &i.structured)
            .field("base_allocation", &i.base_allocation)
            .finish()
    }
}

fn eio(msg: String) -> io::Error {
    io::Error::other(msg)
}

impl NbdDev {
    /// Connects to the export `uri` names with [`default_options`]. Fails when the server is
    /// unreachable or refuses the export within the timeout (the caller names the export).
    pub fn open(uri: &NbdUri) -> io::Result<NbdDev> {
        Self::open_with(uri, default_options())
    }

    /// [`NbdDev::open`] with explicit options.
    pub fn open_with(uri: &NbdUri, opts: NbdOptions) -> io::Result<NbdDev> {
        let endpoint = match &uri.transport {
            Transport::Unix(p) => Endpoint::Unix(p.clone()),
            Transport::Tcp { host, port } => Endpoint::Tcp(
                (host.as_str(), *port)
                    .to_socket_addrs()
                    .map_err(|e| io::Error::new(e.kind(), format!("{uri}: {host}: {e}")))?
                    .collect(),
            ),
        };
        IN_USE.store(true, Ordering::Release);
        let mut dev = Inner {
            uri: uri.clone(),
            endpoint,
            opts: NbdOptions {
                connections: opts.connections.max(1),
                ..opts
            },
            size: 0,
            min_block: 1,
            max_block: 32 << 20,
            structured: false,
            base_allocation: false,
            pool: Mutex::new(Pool {
                idle: Vec::new(),
                open: 0,
                cap: opts.connections.max(1),
            }),
            pool_cv: Condvar::new(),
            zeros: ZeroMap::new(0),
            ra: readahead::ReadAhead::new(opts.readahead),
            io_hook: Mutex::new(None),
            counters: Counters::default(),
        };
        let first = dev.connect(Instant::now() + dev.opts.timeout, None)?;
        dev.size = first.info.size;
        dev.min_block = first.info.min_block.max(1);
        dev.max_block = first.info.max_block.max(dev.min_block);
        dev.structured = first.info.structured;
        dev.base_allocation = first.info.base_allocation;
        dev.zeros = ZeroMap::new(dev.size);
        {
            let pool = dev.pool.get_mut().unwrap_or_else(|e| e.into_inner());
            pool.idle.push(first);
            pool.open = 1;
        }
        log::debug!(
            "NBD export {uri}: {} bytes, structured replies {}, base:allocation {}, up to {} \
             connections",
            dev.size,
            if dev.structured { "on" } else { "off" },
            if dev.base_allocation { "on" } else { "off" },
            dev.opts.connections
        );
        Ok(NbdDev {
            inner: Arc::new(dev),
            prefetch: Mutex::new(None),
        })
    }

    /// The name the device was opened with.
    pub fn uri(&self) -> &NbdUri {
        &self.inner.uri
    }

    /// The options in effect.
    pub fn options(&self) -> NbdOptions {
        self.inner.opts
    }

    /// Whether the server agreed to structured replies.
    pub fn structured_replies(&self) -> bool {
        self.inner.structured
    }

    /// Whether the server offers `base:allocation` block status.
    pub fn has_block_status(&self) -> bool {
        self.inner.base_allocation
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> NbdStats {
        let c = &self.inner.counters;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        NbdStats {
            reads: l(&c.reads),
            read_commands: l(&c.read_commands),
            bytes_from_server: l(&c.bytes_from_server),
            zero_bytes_local: l(&c.zero_bytes_local),
            block_status_queries: l(&c.block_status_queries),
            readahead_hits: l(&c.readahead_hits),
            prefetches: l(&c.prefetches),
            connects: l(&c.connects),
            connection_failures: l(&c.connection_failures),
            errors: l(&c.errors),
        }
    }

    /// Connections currently open (idle or in use).
    pub fn open_connections(&self) -> usize {
        self.inner.lock_pool().open
    }

    /// Most connections the pool will open now (lowered when the server refuses more).
    pub fn connection_cap(&self) -> usize {
        self.inner.lock_pool().cap
    }

    /// Block status of `[offset, offset+len)` as (offset, length, flags) extents
    /// (`ffi::LIBNBD_STATE_HOLE` / `ffi::LIBNBD_STATE_ZERO`); also feeds the zero map.
    pub fn block_status(&self, offset: u64, len: u64) -> Result<Vec<(u64, u64, u32)>> {
        self.inner.block_status(offset, len)
    }

    /// Test hook: `hook` runs on the requesting thread right after each connect and each
    /// command, while the pool lock is released, so a test can run a racing operation (a
    /// server restart, another read) exactly there. `None` removes it.
    #[doc(hidden)]
    pub fn set_io_hook(&self, hook: Option<Arc<dyn Fn(IoPoint) + Send + Sync>>) {
        *self.inner.io_hook.lock().unwrap_or_else(|e| e.into_inner()) = hook;
    }

    /// Hands the window `(off, len)` to the prefetch thread (started on first use). If that
    /// is impossible the window is dropped again, so nobody waits for it.
    fn start_prefetch(&self, off: u64, len: u64) {
        bump(&self.inner.counters.prefetches, 1);
        let mut tx = self.prefetch.lock().unwrap_or_else(|e| e.into_inner());
        if tx.is_none() {
            let (s, r) = mpsc::channel();
            let weak = Arc::downgrade(&self.inner);
            let spawned = std::thread::Builder::new()
                .name("nbd-prefetch".into())
                .spawn(move || prefetch_worker(&weak, &r));
            match spawned {
                Ok(_) => *tx = Some(s),
                Err(e) => log::warn!("cannot start the NBD prefetch thread: {e}"),
            }
        }
        let sent = tx.as_ref().is_some_and(|s| s.send((off, len)).is_ok());
        drop(tx);
        if !sent {
            self.inner.ra.install(off, None, self.inner.size);
        }
    }
}

/// The prefetch thread: fetches windows until the device is gone.
fn prefetch_worker(inner: &Weak<Inner>, rx: &mpsc::Receiver<(u64, u64)>) {
    while let Ok((off, len)) = rx.recv() {
        let Some(inner) = inner.upgrade() else {
            return;
        };
        let mut w = vec![0u8; len as usize];
        let ok = inner.read_mapped(&mut w, off).is_ok();
        // The window after a background window is claimed by the reader that passes its
        // middle, not here, so prefetching stays one window ahead of the reader.
        inner.ra.install_only(off, ok.then_some(w));
    }
}

impl Inner {
    fn run_hook(&self, at: IoPoint) {
        let hook = self
            .io_hook
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Some(h) = hook {
            h(at);
        }
    }

    fn lock_pool(&self) -> std::sync::MutexGuard<'_, Pool> {
        self.pool.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A new connection by `deadline`; checks the export kept `expect_size`.
    fn connect(&self, deadline: Instant, expect_size: Option<u64>) -> io::Result<Conn> {
        let sock = match &self.endpoint {
            Endpoint::Unix(p) => conn::connect_unix(p, deadline)
                .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", p.display())))?,
            Endpoint::Tcp(addrs) => {
                let mut last = io::Error::new(io::ErrorKind::NotFound, "no address");
                let mut got = None;
                for a in addrs {
                    match conn::connect_tcp(a, deadline) {
                        Ok(s) => {
                            got = Some(s);
                            break;
                        }
                        Err(e) => last = io::Error::new(e.kind(), format!("{a}: {e}")),
                    }
                }
                got.ok_or(last)?
            }
        };
        let c = Conn::handshake(sock, &self.uri.export, deadline)?;
        if let Some(size) = expect_size {
            if c.info.size != size {
                return Err(eio(format!(
                    "the export's size changed from {size} to {} bytes: it is not the base \
                     this overlay was made over",
                    c.info.size
                )));
            }
        }
        bump(&self.counters.connects, 1);
        Ok(c)
    }

    /// Takes an idle connection, opens one if the pool may grow, or waits, by `deadline`.
    fn acquire(&self, deadline: Instant) -> io::Result<Conn> {
        let mut pool = self.lock_pool();
        loop {
            if let Some(c) = pool.idle.pop() {
                return Ok(c);
            }
            if pool.open < pool.cap {
                pool.open += 1;
                let others = pool.open > 1;
                drop(pool);
                let until = if others {
                    deadline.min(Instant::now() + EXTRA_CONNECT_TIMEOUT)
                } else {
                    deadline
                };
                match self.connect(until, Some(self.size)) {
                    Ok(c) => {
                        self.run_hook(IoPoint::Connected);
                        return Ok(c);
                    }
                    Err(e) => {
                        bump(&self.counters.connection_failures, 1);
                        pool = self.lock_pool();
                        pool.open -= 1;
                        self.pool_cv.notify_all();
                        if others && pool.open > 0 && e.kind() == io::ErrorKind::TimedOut {
                            pool.cap = pool.open;
                            log::warn!(
                                "NBD export {}: the server does not accept more than {} \
                                 connections (qemu-nbd: --shared=N); using {}",
                                self.uri,
                                pool.open,
                                pool.open
                            );
                            continue;
                        }
                        return Err(e);
                    }
                }
            }
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "timed out waiting for a free NBD connection",
                ));
            };
            pool = self
                .pool_cv
                .wait_timeout(pool, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Returns a connection; a broken one is dropped together with the idle ones (they lead to
    /// the same server, which just failed).
    fn release(&self, c: Conn) {
        let mut pool = self.lock_pool();
        let dropped = if c.is_broken() {
            bump(&self.counters.connection_failures, 1);
            let mut gone = std::mem::take(&mut pool.idle);
            pool.open -= gone.len() + 1;
            gone.push(c);
            gone
        } else {
            pool.idle.push(c);
            Vec::new()
        };
        drop(pool);
        if dropped.is_empty() {
            // One idle connection more: one waiter can take it (waking all of them would
            // only make the others go back to sleep).
            self.pool_cv.notify_one();
        } else {
            // The pool shrank: every waiter may now open a connection.
            self.pool_cv.notify_all();
        }
        drop(dropped);
    }

    /// Runs `op` on a pooled connection by the request's deadline, retrying once on a fresh
    /// connection when the connection (not the server's answer) failed.
    fn with_conn<T>(
        &self,
        what: &str,
        offset: u64,
        mut op: impl FnMut(&mut Conn, Instant) -> std::result::Result<T, CmdError>,
    ) -> io::Result<T> {
        let deadline = Instant::now() + self.opts.timeout;
        let mut tries = 0;
        loop {
            tries += 1;
            let mut c = self.acquire(deadline)?;
            let r = op(&mut c, deadline);
            self.run_hook(IoPoint::Command);
            self.release(c);
            match r {
                Ok(v) => return Ok(v),
                Err(CmdError::Server(e)) => return Err(e),
                Err(CmdError::Connection(e)) => {
                    log::warn!("NBD export {}: {what} at {offset}: {e}", self.uri);
                    if tries >= 2 || Instant::now() >= deadline {
                        return Err(e);
                    }
                }
            }
        }
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<(u64, u64, u32)>> {
        check_range(offset, len, self.size)?;
        if !self.base_allocation {
            return Err(BlockError::Unsupported(
                "the NBD server offers no block status",
            ));
        }
        bump(&self.counters.block_status_queries, 1);
        let ext = self
            .with_conn("block status", offset, |c, d| {
                c.block_status(offset, len, d)
            })
            .map_err(|e| self.fail(e))?;
        self.zeros.record(&ext, self.size);
        Ok(ext)
    }

    fn fail(&self, e: io::Error) -> BlockError {
        bump(&self.counters.errors, 1);
        BlockError::Io(io::Error::new(e.kind(), format!("{}: {e}", self.uri)))
    }

    /// Reads from the server, split at the server's maximum request size and widened to its
    /// minimum block size.
    fn read_remote(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let n = (buf.len() - done).min(self.max_block as usize);
            let off = offset + done as u64;
            let part = &mut buf[done..done + n];
            let mb = self.min_block;
            if off.is_multiple_of(mb)
                && ((n as u64).is_multiple_of(mb) || off + n as u64 == self.size)
            {
                self.read_cmd(part, off)?;
            } else {
                let start = off / mb * mb;
                let end = (off + n as u64).div_ceil(mb) * mb;
                let end = end.min(self.size);
                let mut tmp = vec![0u8; (end - start) as usize];
                self.read_cmd(&mut tmp, start)?;
                let s = (off - start) as usize;
                part.copy_from_slice(&tmp[s..s + n]);
            }
            done += n;
        }
        Ok(())
    }

    fn read_cmd(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        bump(&self.counters.read_commands, 1);
        bump(&self.counters.bytes_from_server, buf.len() as u64);
        self.with_conn("read", offset, |c, d| c.pread(buf, offset, d))
            .map_err(|e| self.fail(e))
    }

    /// Reads `buf` at `offset`, filling granules the zero map knows as zero locally.
    fn read_mapped(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let len = buf.len() as u64;
        if self.base_allocation && buf.len() >= BLOCK_STATUS_MIN_READ {
            let g0 = offset >> GRANULE_SHIFT;
            let g1 = (offset + len - 1) >> GRANULE_SHIFT;
            if (g0..=g1).any(|g| self.zeros.state(g).is_none()) {
                let start = offset / BLOCK_STATUS_REGION * BLOCK_STATUS_REGION;
                let end = (offset + len)
                    .div_ceil(BLOCK_STATUS_REGION)
                    .saturating_mul(BLOCK_STATUS_REGION)
                    .min(self.size);
                // A failed query only costs the optimisation; the read reports real errors.
                if let Err(e) = self.block_status(start, end - start) {
                    log::debug!("NBD block status failed: {e}");
                }
            }
            // Runs of granules: zero-known ones filled here, the others read.
            let mut pos = offset;
            while pos < offset + len {
                let g = pos >> GRANULE_SHIFT;
                let zero = self.zeros.state(g) == Some(true);
                let mut end = ((g + 1) << GRANULE_SHIFT).min(offset + len);
                while end < offset + len
                    && (self.zeros.state(end >> GRANULE_SHIFT) == Some(true)) == zero
                {
                    end = (((end >> GRANULE_SHIFT) + 1) << GRANULE_SHIFT).min(offset + len);
                }
                let part = &mut buf[(pos - offset) as usize..(end - offset) as usize];
                if zero {
                    part.fill(0);
                    bump(&self.counters.zero_bytes_local, part.len() as u64);
                } else {
                    self.read_remote(part, pos)?;
                }
                pos = end;
            }
            return Ok(());
        }
        self.read_remote(buf, offset)
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        let pool = self.pool.get_mut().unwrap_or_else(|e| e.into_inner());
        for c in &mut pool.idle {
            c.shutdown();
        }
    }
}

impl BlockDev for NbdDev {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let inner = &*self.inner;
        check_range(offset, buf.len() as u64, inner.size)?;
        bump(&inner.counters.reads, 1);
        if buf.is_empty() {
            return Ok(());
        }
        let deadline = Instant::now() + inner.opts.timeout;
        match inner.ra.serve(buf, offset, inner.size, deadline) {
            readahead::Step::Served(next) => {
                bump(&inner.counters.readahead_hits, 1);
                if let Some((o, l)) = next {
                    self.start_prefetch(o, l);
                }
                Ok(())
            }
            readahead::Step::FetchWindow(off, len) => {
                let mut w = vec![0u8; len as usize];
                match inner.read_mapped(&mut w, off) {
                    Ok(()) => {
                        buf.copy_from_slice(&w[..buf.len()]);
                        if let Some((o, l)) = inner.ra.install(off, Some(w), inner.size) {
                            self.start_prefetch(o, l);
                        }
                        Ok(())
                    }
                    Err(e) => {
                        inner.ra.install(off, None, inner.size);
                        Err(e)
                    }
                }
            }
            readahead::Step::Direct => inner.read_mapped(buf, offset),
        }
    }

    fn size(&self) -> u64 {
        self.inner.size
    }

    fn write_at(&self, _buf: &[u8], _offset: u64) -> Result<()> {
        Err(BlockError::ReadOnly)
    }

    fn flush(&self) -> Result<()> {
        Ok(())
    }

    fn discard(&self, _offset: u64, _len: u64) -> Result<()> {
        Err(BlockError::ReadOnly)
    }

    fn write_zeroes(&self, _offset: u64, _len: u64, _unmap: bool) -> Result<()> {
        Err(BlockError::ReadOnly)
    }

    fn is_read_only(&self) -> bool {
        true
    }
}
