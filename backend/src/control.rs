//! The control socket (`--control-socket PATH`): a QMP-like protocol of one JSON object per
//! line over a unix socket, created owner-only like the vhost-user socket.
//!
//! On connect the server sends a greeting `{"snapblk": {"version": V, "commands": [...]}}`.
//! A client sends `{"execute": NAME, "arguments": {...}, "id": ANY}` (arguments and id are
//! optional) and gets one line back: `{"return": VALUE}` or `{"error": {"class": C, "desc":
//! D}}`, with the `id` echoed. Commands: `query-status`, `query-stats`, `flush`,
//! `set-cache-mode` (`mode`: `writeback` | `writethrough`), `snapshot` (`overlay`: path of the
//! new top), `query-snapshots`, `query-commands`, and `qmp_capabilities` (accepted, no-op).
//!
//! Hostile input is bounded: a line is at most [`MAX_LINE`] bytes (a longer one gets an error and
//! the connection is closed), at most [`MAX_CLIENTS`] clients are served at once (more get an
//! error and are closed), a client idle for [`IDLE_TIMEOUT`] or not reading its replies for
//! [`WRITE_TIMEOUT`] is dropped. Nothing a client sends reaches the request path except through
//! the commands themselves (a snapshot pauses guest requests briefly, by design).
//!
//! Threads and locking: one accept thread polls the listener and a stop eventfd; each client
//! gets its own thread. The registry of clients (a mutex around their stream clones and join
//! handles) is a leaf; [`ControlServer`]'s drop stops the accept thread, shuts every client
//! stream down and joins every thread, so no thread outlives the served disk.

use std::collections::HashMap;
use std::io::{self, BufRead, BufReader, Write};
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use log::{info, warn};
use serde_json::{json, Map, Value};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::live::{snapshot_json, Live, LiveError};
use crate::metrics::StatsSource;

/// Longest request line in bytes.
pub const MAX_LINE: usize = 64 << 10;
/// Most clients served at once.
pub const MAX_CLIENTS: usize = 8;
/// A client that sends nothing for this long is disconnected.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(600);
/// A client that does not take a reply within this time is disconnected.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// The commands, in the greeting's order.
pub const COMMANDS: [&str; 8] = [
    "query-status",
    "query-stats",
    "flush",
    "set-cache-mode",
    "snapshot",
    "query-snapshots",
    "query-commands",
    "qmp_capabilities",
];

#[derive(Default)]
struct Clients {
    next: u64,
    streams: HashMap<u64, UnixStream>,
    threads: Vec<JoinHandle<()>>,
}

struct Shared {
    live: Arc<Live>,
    clients: Mutex<Clients>,
}

impl Shared {
    fn clients(&self) -> MutexGuard<'_, Clients> {
        self.clients.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A running control socket server; stops, joins its threads and removes the socket when
/// dropped.
pub struct ControlServer {
    path: PathBuf,
    stop: Arc<EventFd>,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for ControlServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlServer")
            .field("path", &self.path)
            .finish()
    }
}

/// A command's failure: QMP-style error class and description.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandError {
    /// `GenericError`, `CommandNotFound`, `InvalidArgument`, `TooManyClients`, `LineTooLong`.
    pub class: &'static str,
    /// Human-readable.
    pub desc: String,
}

fn err(class: &'static str, desc: impl Into<String>) -> CommandError {
    CommandError {
        class,
        desc: desc.into(),
    }
}

fn error_value(e: &CommandError) -> Value {
    json!({"error": {"class": e.class, "desc": e.desc}})
}

impl ControlServer {
    /// Binds `path` (owner-only, a stale socket is replaced) and starts serving `live`.
    pub fn start(path: &Path, live: Arc<Live>) -> Result<Self, crate::serve::ServeError> {
        let listener = crate::serve::bind_socket(path, 0o600)?;
        let stop = Arc::new(EventFd::new(EFD_NONBLOCK).map_err(crate::serve::ServeError::Signals)?);
        let shared = Arc::new(Shared {
            live,
            clients: Mutex::new(Clients::default()),
        });
        let accept = {
            let stop = stop.clone();
            let shared = shared.clone();
            thread::Builder::new()
                .name("snapblk-control".into())
                .spawn(move || accept_loop(&listener, &stop, &shared))
                .map_err(crate::serve::ServeError::Signals)?
        };
        info!("control socket on {}", path.display());
        Ok(ControlServer {
            path: path.to_path_buf(),
            stop,
            shared,
            accept: Some(accept),
        })
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        if let Err(e) = self.stop.write(1) {
            warn!("cannot stop the control socket thread: {e}");
        }
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
        let threads = {
            let mut c = self.shared.clients();
            for s in c.streams.values() {
                let _ = s.shutdown(Shutdown::Both);
            }
            std::mem::take(&mut c.threads)
        };
        for t in threads {
            let _ = t.join();
        }
        if let Err(e) = std::fs::remove_file(&self.path) {
            warn!("cannot remove control socket {}: {e}", self.path.display());
        }
    }
}

/// Polls `fd` (a listening socket) and `stop`: `Ok(true)` when `fd` has a connection to
/// accept, `Ok(false)` when `stop` was signalled, an error when `fd` reports an error condition.
pub(crate) fn wait_readable(fd: i32, stop: &EventFd) -> io::Result<bool> {
    loop {
        let mut fds = [
            libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stop.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is a valid array of two pollfd for the duration of the call and both
        // descriptors stay open while it runs.
        let ret = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if ret < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if fds[1].revents != 0 {
            return Ok(false);
        }
        if fds[0].revents & libc::POLLIN != 0 {
            return Ok(true);
        }
        if fds[0].revents != 0 {
            return Err(io::Error::other(format!(
                "listening socket reported events {:#x}",
                fds[0].revents
            )));
        }
    }
}

fn accept_loop(listener: &UnixListener, stop: &EventFd, shared: &Arc<Shared>) {
    loop {
        match wait_readable(listener.as_raw_fd(), stop) {
            Ok(true) => {}
            Ok(false) => return,
            Err(e) => {
                warn!("control socket: poll failed: {e}");
                return;
            }
        }
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) => {
                // EMFILE and friends: do not spin.
                warn!("control socket: accept failed: {e}");
                thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        let _ = stream.set_write_timeout(Some(WRITE_TIMEOUT));
        let mut clients = shared.clients();
        clients.threads.retain(|t| !t.is_finished());
        if clients.streams.len() >= MAX_CLIENTS {
            drop(clients);
            let e = err(
                "TooManyClients",
                format!("at most {MAX_CLIENTS} control clients at once"),
            );
            let _ = send(&stream, &error_value(&e));
            continue;
        }
        let id = clients.next;
        clients.next += 1;
        let Ok(clone) = stream.try_clone() else {
            continue;
        };
        clients.streams.insert(id, clone);
        let sh = shared.clone();
        match thread::Builder::new()
            .name(format!("snapblk-ctl{id}"))
            .spawn(move || {
                serve_client(&sh.live, stream);
                sh.clients().streams.remove(&id);
            }) {
            Ok(t) => clients.threads.push(t),
            Err(e) => {
                warn!("control socket: cannot start a client thread: {e}");
                clients.streams.remove(&id);
            }
        }
    }
}

fn send(mut stream: &UnixStream, v: &Value) -> io::Result<()> {
    let mut line = v.to_string();
    line.push('\n');
    stream.write_all(line.as_bytes())
}

enum Line {
    Complete,
    TooLong,
    Eof,
}

/// Reads one line of at most [`MAX_LINE`] bytes (without the newline) into `buf`.
fn read_line(r: &mut impl BufRead, buf: &mut Vec<u8>) -> io::Result<Line> {
    buf.clear();
    loop {
        let avail = r.fill_buf()?;
        if avail.is_empty() {
            return Ok(if buf.is_empty() {
                Line::Eof
            } else {
                Line::Complete
            });
        }
        match avail.iter().position(|&b| b == b'\n') {
            Some(pos) => {
                let fits = buf.len() + pos <= MAX_LINE;
                if fits {
                    buf.extend_from_slice(&avail[..pos]);
                }
                r.consume(pos + 1);
                return Ok(if fits { Line::Complete } else { Line::TooLong });
            }
            None => {
                let n = avail.len();
                if buf.len() + n > MAX_LINE {
                    r.consume(n);
                    return Ok(Line::TooLong);
                }
                buf.extend_from_slice(avail);
                r.consume(n);
            }
        }
    }
}

/// The greeting line.
pub fn greeting() -> Value {
    json!({"snapblk": {"version": env!("CARGO_PKG_VERSION"), "commands": COMMANDS}})
}

fn serve_client(live: &Live, stream: UnixStream) {
    let _ = stream.set_read_timeout(Some(IDLE_TIMEOUT));
    if send(&stream, &greeting()).is_err() {
        return;
    }
    let Ok(read_half) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::with_capacity(8192, read_half);
    let mut buf = Vec::new();
    loop {
        match read_line(&mut reader, &mut buf) {
            Ok(Line::Eof) | Err(_) => return,
            Ok(Line::TooLong) => {
                let e = err(
                    "LineTooLong",
                    format!("a request is at most {MAX_LINE} bytes"),
                );
                let _ = send(&stream, &error_value(&e));
                return;
            }
            Ok(Line::Complete) => {}
        }
        if buf.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let reply = handle_line(live, &buf);
        if send(&stream, &reply).is_err() {
            // The client went away mid-reply: nothing else to do.
            return;
        }
    }
}

/// Executes one request line and returns the reply object.
pub fn handle_line(live: &Live, line: &[u8]) -> Value {
    let parsed: Value = match serde_json::from_slice(line) {
        Ok(v) => v,
        Err(e) => return error_value(&err("GenericError", format!("invalid JSON: {e}"))),
    };
    let Value::Object(obj) = parsed else {
        return error_value(&err("GenericError", "expected a JSON object"));
    };
    let id = obj.get("id").cloned();
    let mut reply = match execute(live, &obj) {
        Ok(v) => json!({ "return": v }),
        Err(e) => error_value(&e),
    };
    if let (Some(id), Value::Object(m)) = (id, &mut reply) {
        m.insert("id".into(), id);
    }
    reply
}

fn execute(live: &Live, obj: &Map<String, Value>) -> Result<Value, CommandError> {
    for key in obj.keys() {
        if !matches!(key.as_str(), "execute" | "arguments" | "id") {
            return Err(err("GenericError", format!("unknown member {key:?}")));
        }
    }
    let cmd = match obj.get("execute") {
        Some(Value::String(s)) => s.as_str(),
        Some(_) => return Err(err("GenericError", "\"execute\" must be a string")),
        None => return Err(err("GenericError", "missing \"execute\"")),
    };
    let empty = Map::new();
    let args = match obj.get("arguments") {
        None => &empty,
        Some(Value::Object(m)) => m,
        Some(_) => return Err(err("GenericError", "\"arguments\" must be an object")),
    };
    let allowed: &[&str] = match cmd {
        "set-cache-mode" => &["mode"],
        "snapshot" => &["overlay"],
        c if COMMANDS.contains(&c) => &[],
        other => {
            return Err(err(
                "CommandNotFound",
                format!("the command {other} has not been found"),
            ))
        }
    };
    if let Some(k) = args.keys().find(|k| !allowed.contains(&k.as_str())) {
        return Err(err(
            "InvalidArgument",
            format!("{cmd} has no argument {k:?}"),
        ));
    }
    let string_arg = |name: &str| -> Result<&str, CommandError> {
        match args.get(name) {
            Some(Value::String(s)) => Ok(s.as_str()),
            Some(_) => Err(err("InvalidArgument", format!("{name} must be a string"))),
            None => Err(err("InvalidArgument", format!("{cmd} needs {name}"))),
        }
    };
    let live_err = |e: LiveError| err("GenericError", e.to_string());
    match cmd {
        "qmp_capabilities" => Ok(json!({})),
        "query-commands" => Ok(json!(COMMANDS
            .iter()
            .map(|c| json!({ "name": c }))
            .collect::<Vec<_>>())),
        "query-status" => Ok(live.status_json()),
        "query-stats" => Ok(live.stats().to_json()),
        "flush" => {
            let d = live.flush().map_err(live_err)?;
            Ok(json!({"duration_ms": d.as_secs_f64() * 1e3}))
        }
        "set-cache-mode" => {
            let writethrough = match string_arg("mode")? {
                "writeback" => false,
                "writethrough" => true,
                other => {
                    return Err(err(
                        "InvalidArgument",
                        format!("mode must be writeback or writethrough, not {other:?}"),
                    ))
                }
            };
            live.set_cache_mode(writethrough).map_err(live_err)
        }
        "snapshot" => {
            let overlay = string_arg("overlay")?;
            let rec = live.snapshot(Path::new(overlay)).map_err(live_err)?;
            Ok(snapshot_json(&rec))
        }
        "query-snapshots" => Ok(live.snapshots_json()),
        _ => Err(err(
            "CommandNotFound",
            format!("the command {cmd} has not been found"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use blockdev::MemDisk;

    fn live() -> Live {
        Live::detached(Arc::new(MemDisk::new(1 << 20)))
    }

    #[test]
    fn malformed_requests_get_error_objects() {
        let l = live();
        for (line, class) in [
            (&b"{not json"[..], "GenericError"),
            (b"[1,2]", "GenericError"),
            (b"{\"arguments\": {}}", "GenericError"),
            (b"{\"execute\": 7}", "GenericError"),
            (b"{\"execute\": \"no-such\"}", "CommandNotFound"),
            (
                b"{\"execute\": \"flush\", \"arguments\": 3}",
                "GenericError",
            ),
            (
                b"{\"execute\": \"flush\", \"arguments\": {\"x\": 1}}",
                "InvalidArgument",
            ),
            (
                b"{\"execute\": \"set-cache-mode\", \"arguments\": {\"mode\": \"fast\"}}",
                "InvalidArgument",
            ),
            (b"{\"execute\": \"snapshot\"}", "InvalidArgument"),
            (b"\xff\xfe", "GenericError"),
        ] {
            let r = handle_line(&l, line);
            assert_eq!(
                r["error"]["class"],
                class,
                "{}: {r}",
                String::from_utf8_lossy(line)
            );
        }
    }

    #[test]
    fn id_is_echoed_and_commands_answer() {
        let l = live();
        let r = handle_line(&l, br#"{"execute": "flush", "id": {"n": 1}}"#);
        assert_eq!(r["id"]["n"], 1);
        assert!(r["return"]["duration_ms"].is_number(), "{r}");
        let r = handle_line(&l, br#"{"execute": "query-commands"}"#);
        assert_eq!(r["return"].as_array().unwrap().len(), COMMANDS.len());
        // A disk without chain or cache refuses what it cannot do, with an error object.
        let r = handle_line(
            &l,
            br#"{"execute": "snapshot", "arguments": {"overlay": "/x"}}"#,
        );
        assert_eq!(r["error"]["class"], "GenericError");
    }

    #[test]
    fn read_line_bounds_the_line_length() {
        let mut long = vec![b'a'; MAX_LINE + 1];
        long.push(b'\n');
        long.extend_from_slice(b"next\n");
        let mut r = BufReader::with_capacity(1000, &long[..]);
        let mut buf = Vec::new();
        assert!(matches!(
            read_line(&mut r, &mut buf).unwrap(),
            Line::TooLong
        ));
        let mut exact = vec![b'b'; MAX_LINE];
        exact.push(b'\n');
        let mut r = BufReader::with_capacity(1000, &exact[..]);
        assert!(matches!(
            read_line(&mut r, &mut buf).unwrap(),
            Line::Complete
        ));
        assert_eq!(buf.len(), MAX_LINE);
        assert!(matches!(read_line(&mut r, &mut buf).unwrap(), Line::Eof));
    }
}
