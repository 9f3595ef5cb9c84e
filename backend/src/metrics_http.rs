//! The `--metrics ADDR` endpoint: a minimal HTTP/1.0 responder serving the OpenMetrics text
//! exposition at `GET /metrics`, on TCP (`127.0.0.1:9187`) or a unix socket (`unix:PATH`,
//! created owner-only).
//!
//! Robustness: one request per connection (`Connection: close`); the request head is read for at
//! most [`HEAD_TIMEOUT`] and at most [`MAX_HEAD`] bytes; at most [`MAX_CONNECTIONS`] connections
//! are handled at once (more are closed at once). Anything but `GET /metrics` gets 404 or 405.
//!
//! Threads and locking: one accept thread polls the listener and a stop eventfd; each connection
//! gets a short-lived thread (counted by an atomic). Drop stops the accept thread and joins the
//! connection threads (each ends within its timeouts).

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use log::{info, warn};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::live::Live;

/// Longest request head read.
pub const MAX_HEAD: usize = 8 << 10;
/// Time a client has to send its request head.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(2);
/// Time a client has to take the response.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections handled at once.
pub const MAX_CONNECTIONS: usize = 4;

/// Where `--metrics` listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetricsAddr {
    /// A TCP address.
    Tcp(SocketAddr),
    /// A unix socket path.
    Unix(PathBuf),
}

impl FromStr for MetricsAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(p) = s.strip_prefix("unix:") {
            if p.is_empty() {
                return Err("unix: needs a path".into());
            }
            return Ok(MetricsAddr::Unix(PathBuf::from(p)));
        }
        s.parse::<SocketAddr>()
            .map(MetricsAddr::Tcp)
            .map_err(|e| format!("expected HOST:PORT or unix:PATH ({e})"))
    }
}

impl std::fmt::Display for MetricsAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MetricsAddr::Tcp(a) => write!(f, "{a}"),
            MetricsAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

trait Conn: Read + Write + Send {
    fn set_timeouts(&self, read: Duration, write: Duration) -> io::Result<()>;
}

impl Conn for std::net::TcpStream {
    fn set_timeouts(&self, r: Duration, w: Duration) -> io::Result<()> {
        self.set_read_timeout(Some(r))?;
        self.set_write_timeout(Some(w))
    }
}

impl Conn for std::os::unix::net::UnixStream {
    fn set_timeouts(&self, r: Duration, w: Duration) -> io::Result<()> {
        self.set_read_timeout(Some(r))?;
        self.set_write_timeout(Some(w))
    }
}

impl Listener {
    fn fd(&self) -> RawFd {
        match self {
            Listener::Tcp(l) => l.as_raw_fd(),
            Listener::Unix(l, _) => l.as_raw_fd(),
        }
    }

    fn accept(&self) -> io::Result<Box<dyn Conn>> {
        Ok(match self {
            Listener::Tcp(l) => Box::new(l.accept()?.0),
            Listener::Unix(l, _) => Box::new(l.accept()?.0),
        })
    }
}

/// The running endpoint; stops when dropped.
pub struct MetricsServer {
    addr: String,
    stop: Arc<EventFd>,
    accept: Option<JoinHandle<()>>,
    conns: Arc<Mutex<Vec<JoinHandle<()>>>>,
    unix_path: Option<PathBuf>,
}

impl std::fmt::Debug for MetricsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetricsServer")
            .field("addr", &self.addr)
            .finish()
    }
}

impl MetricsServer {
    /// Listens on `addr` and serves the statistics of `live`.
    pub fn start(addr: &MetricsAddr, live: Arc<Live>) -> io::Result<Self> {
        let listener = match addr {
            MetricsAddr::Tcp(a) => Listener::Tcp(TcpListener::bind(a)?),
            MetricsAddr::Unix(p) => {
                let l = crate::serve::bind_socket(p, 0o600)
                    .map_err(|e| io::Error::other(e.to_string()))?;
                Listener::Unix(l, p.clone())
            }
        };
        let bound = match &listener {
            Listener::Tcp(l) => l.local_addr()?.to_string(),
            Listener::Unix(_, p) => format!("unix:{}", p.display()),
        };
        let unix_path = match &listener {
            Listener::Unix(_, p) => Some(p.clone()),
            Listener::Tcp(_) => None,
        };
        let stop = Arc::new(EventFd::new(EFD_NONBLOCK)?);
        let conns = Arc::new(Mutex::new(Vec::new()));
        let accept = {
            let stop = stop.clone();
            let conns = conns.clone();
            thread::Builder::new()
                .name("snapblk-metrics".into())
                .spawn(move || accept_loop(&listener, &stop, &live, &conns))?
        };
        info!("metrics on http://{bound}/metrics");
        Ok(MetricsServer {
            addr: bound,
            stop,
            accept: Some(accept),
            conns,
            unix_path,
        })
    }

    /// The address actually bound (with the port chosen by the kernel for port 0).
    pub fn addr(&self) -> &str {
        &self.addr
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
        let conns = std::mem::take(&mut *self.conns.lock().unwrap_or_else(|e| e.into_inner()));
        for t in conns {
            let _ = t.join();
        }
        if let Some(p) = &self.unix_path {
            let _ = std::fs::remove_file(p);
        }
    }
}

fn accept_loop(
    listener: &Listener,
    stop: &EventFd,
    live: &Arc<Live>,
    conns: &Arc<Mutex<Vec<JoinHandle<()>>>>,
) {
    let active = Arc::new(AtomicUsize::new(0));
    loop {
        match crate::control::wait_readable(listener.fd(), stop) {
            Ok(true) => {}
            Ok(false) => return,
            Err(e) => {
                warn!("metrics: poll failed: {e}");
                return;
            }
        }
        let conn = match listener.accept() {
            Ok(c) => c,
            Err(e) => {
                warn!("metrics: accept failed: {e}");
                thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        if active.load(Ordering::Acquire) >= MAX_CONNECTIONS {
            continue; // dropped: closed at once
        }
        active.fetch_add(1, Ordering::AcqRel);
        let live = live.clone();
        let act = active.clone();
        let spawned = thread::Builder::new()
            .name("snapblk-metrics-conn".into())
            .spawn(move || {
                if let Err(e) = serve_conn(conn, &live) {
                    log::debug!("metrics connection: {e}");
                }
                act.fetch_sub(1, Ordering::AcqRel);
            });
        let mut list = conns.lock().unwrap_or_else(|e| e.into_inner());
        list.retain(|t| !t.is_finished());
        match spawned {
            Ok(t) => list.push(t),
            Err(e) => {
                active.fetch_sub(1, Ordering::AcqRel);
                warn!("metrics: cannot start a connection thread: {e}");
            }
        }
    }
}

/// Reads the request head; `None` if it did not arrive in time or is too long.
fn read_head(conn: &mut dyn Conn) -> io::Result<Option<Vec<u8>>> {
    let deadline = Instant::now() + HEAD_TIMEOUT;
    let mut head = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(None);
        }
        conn.set_timeouts(left, WRITE_TIMEOUT)?;
        let n = match conn.read(&mut chunk) {
            Ok(0) => return Ok(None),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Ok(None)
            }
            Err(e) => return Err(e),
        };
        head.extend_from_slice(&chunk[..n]);
        if head.windows(4).any(|w| w == b"\r\n\r\n") || head.windows(2).any(|w| w == b"\n\n") {
            return Ok(Some(head));
        }
        if head.len() > MAX_HEAD {
            return Ok(None);
        }
    }
}

/// What a request head asks for: status line and body.
pub fn respond(head: &[u8], body: impl FnOnce() -> String) -> (&'static str, &'static str, String) {
    let text = String::from_utf8_lossy(head);
    let first = text.lines().next().unwrap_or("");
    let mut parts = first.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    const OM: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
    const TEXT: &str = "text/plain; charset=utf-8";
    match (method, path) {
        ("GET", "/metrics") => ("200 OK", OM, body()),
        ("GET", _) => ("404 Not Found", TEXT, "not found; try /metrics\n".into()),
        ("", _) => ("400 Bad Request", TEXT, "bad request\n".into()),
        _ => ("405 Method Not Allowed", TEXT, "only GET\n".into()),
    }
}

fn serve_conn(mut conn: Box<dyn Conn>, live: &Arc<Live>) -> io::Result<()> {
    let Some(head) = read_head(conn.as_mut())? else {
        return Ok(());
    };
    let (status, ctype, body) = respond(&head, || crate::metrics::render(live.clone()));
    let resp = format!(
        "HTTP/1.0 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    conn.write_all(resp.as_bytes())?;
    conn.write_all(body.as_bytes())?;
    conn.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse_as_tcp_or_unix() {
        assert_eq!(
            "127.0.0.1:9187".parse::<MetricsAddr>().unwrap(),
            MetricsAddr::Tcp("127.0.0.1:9187".parse().unwrap())
        );
        assert_eq!(
            "unix:/run/m.sock".parse::<MetricsAddr>().unwrap(),
            MetricsAddr::Unix("/run/m.sock".into())
        );
        assert!("unix:".parse::<MetricsAddr>().is_err());
        assert!("localhost".parse::<MetricsAddr>().is_err());
    }

    #[test]
    fn only_get_metrics_gets_the_exposition() {
        assert_eq!(
            respond(b"GET /metrics HTTP/1.0\r\n\r\n", || "x".into()).0,
            "200 OK"
        );
        assert_eq!(
            respond(b"GET /metrics?a=b HTTP/1.1\r\n\r\n", || "x".into()).2,
            "x"
        );
        assert_eq!(
            respond(b"GET / HTTP/1.0\r\n\r\n", || "x".into()).0,
            "404 Not Found"
        );
        assert!(respond(b"POST /metrics HTTP/1.0\r\n\r\n", || "x".into())
            .0
            .starts_with("405"));
        assert!(respond(b"\r\n\r\n", || "x".into()).0.starts_with("400"));
        assert!(respond(b"\xff\xfe /metrics\n\n", || "x".into())
            .0
            .starts_with("405"));
    }
}
