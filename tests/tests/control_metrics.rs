//! The control socket, live snapshots and the metrics endpoint against a running
//! `snapblk serve`, with the libblkio client as the frontend (no guest needed).
//!
//! What they protect: every control command answers over the socket; malformed, oversized,
//! unknown and abandoned requests get error objects (or a closed connection) and never disturb
//! guest I/O; a live snapshot taken while a client writes freezes exactly what was written and
//! flushed before it, leaves a read-only image that `qemu-img` and `snapblk checksum` read
//! while the daemon runs, and the disk stays right afterwards; the metrics change by exactly
//! the counts of a known workload. A missing daemon binary skips (see `daemon_missing`).

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};
use snapblk_tests::client::{Client, ClientConfig};
use snapblk_tests::guest::{
    host_tool, snapblk_binary, Daemon, DaemonConfig, DaemonKind, ImageFormat,
};

const MIB: u64 = 1 << 20;
const DISK: u64 = 64 * MIB;

struct Setup {
    dir: tempfile::TempDir,
    top: PathBuf,
    control: PathBuf,
    daemon: Daemon,
}

/// A daemon serving a qcow2 overlay over a zero raw base, with a control socket and `extra`
/// arguments; `None` when the binary is missing.
fn start(extra: &[&str]) -> Option<Setup> {
    if snapblk_binary().is_err() {
        snapblk_tests::client::daemon_missing("snapblk binary not available; skipping");
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    std::fs::File::create(&base).unwrap().set_len(DISK).unwrap();
    let top = dir.path().join("top.qcow2");
    qcow_snapshot::create(
        &top,
        &qcow_snapshot::CreateOptions {
            backing: Some((base.to_str().unwrap().into(), qcow_snapshot::Format::Raw)),
            ..Default::default()
        },
    )
    .unwrap();
    let control = dir.path().join("control.sock");
    let mut cfg = DaemonConfig::new(DaemonKind::Snapblk, &top)
        .format(ImageFormat::Qcow2)
        .num_queues(2)
        .arg("--control-socket")
        .arg(control.to_str().unwrap());
    for a in extra {
        cfg = cfg.arg(a);
    }
    let daemon = Daemon::start(&cfg, dir.path(), "daemon").unwrap_or_else(|e| panic!("{e}"));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !control.exists() {
        assert!(Instant::now() < deadline, "no control socket");
        std::thread::sleep(Duration::from_millis(20));
    }
    Some(Setup {
        dir,
        top,
        control,
        daemon,
    })
}

fn ctl(sock: &Path, cmd: &str, args: Value) -> Result<Value, snapblk::ctl::CtlError> {
    let args: Map<String, Value> = match args {
        Value::Object(m) => m,
        _ => Map::new(),
    };
    snapblk::ctl::call(sock, cmd, args, Duration::from_secs(120))
}

/// A raw protocol connection: greeting read, then line in / line out.
struct Raw {
    stream: UnixStream,
    reader: BufReader<UnixStream>,
}

impl Raw {
    fn connect(sock: &Path) -> (Raw, Value) {
        let stream = UnixStream::connect(sock).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        let greeting = serde_json::from_str(&line).unwrap();
        (Raw { stream, reader }, greeting)
    }

    fn request(&mut self, bytes: &[u8]) -> Value {
        self.stream.write_all(bytes).unwrap();
        let mut line = String::new();
        self.reader.read_line(&mut line).unwrap();
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"))
    }
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_mul(31).wrapping_add((i / 512) as u8) ^ (i as u8))
        .collect()
}

fn connect_client(sock: &Path) -> Client {
    Client::connect_retry(sock, &ClientConfig::new(2), Duration::from_secs(10)).unwrap()
}

fn assert_guest_io_works(client: &Client, seed: u8) {
    let data = pattern(seed, 64 << 10);
    client.write(1, 32 * MIB, &data).unwrap();
    let mut back = vec![0u8; data.len()];
    client.read(0, 32 * MIB, &mut back).unwrap();
    assert!(back == data, "guest I/O disturbed (seed {seed})");
}

/// The guest-visible bytes of an image (through snapblk's own chain reader).
fn image_bytes(path: &Path) -> Vec<u8> {
    let dev = qcow_snapshot::open_image(path, None, true).unwrap();
    let mut buf = vec![0u8; dev.size() as usize];
    dev.read_at(&mut buf, 0).unwrap();
    buf
}

#[test]
fn control_socket_answers_every_command_and_hostile_clients_never_disturb_guest_io() {
    let Some(s) = start(&[]) else { return };
    let client = connect_client(s.daemon.socket());

    // Greeting.
    let (mut raw, greeting) = Raw::connect(&s.control);
    let cmds = greeting["snapblk"]["commands"].as_array().unwrap();
    for c in [
        "query-status",
        "query-stats",
        "flush",
        "set-cache-mode",
        "snapshot",
        "query-snapshots",
    ] {
        assert!(
            cmds.iter().any(|x| x == c),
            "greeting lacks {c}: {greeting}"
        );
    }
    assert!(greeting["snapblk"]["version"].is_string());

    // query-status.
    let st = ctl(&s.control, "query-status", json!({})).unwrap();
    let top = std::fs::canonicalize(&s.top).unwrap();
    assert_eq!(st["image"]["top"], top.to_str().unwrap(), "{st}");
    assert_eq!(st["image"]["chain"].as_array().unwrap().len(), 2, "{st}");
    assert_eq!(st["frontend"]["connected"], true, "{st}");
    assert_eq!(st["queues"]["count"], 2);
    assert_eq!(st["cache"]["mode"], "writeback");

    // Some guest I/O, then query-stats and flush.
    assert_guest_io_works(&client, 1);
    let stats = ctl(&s.control, "query-stats", json!({})).unwrap();
    assert!(
        stats["queues"][1]["ops"]["write"]["requests"]
            .as_u64()
            .unwrap()
            >= 1
    );
    assert!(stats["queues"][0]["ops"]["read"]["bytes"].as_u64().unwrap() >= 64 << 10);
    let f = ctl(&s.control, "flush", json!({})).unwrap();
    assert!(f["duration_ms"].is_number(), "{f}");

    // set-cache-mode both ways; the host override never turns write-back on behind the guest.
    let m = ctl(
        &s.control,
        "set-cache-mode",
        json!({"mode": "writethrough"}),
    )
    .unwrap();
    assert_eq!(m["mode"], "writethrough", "{m}");
    assert_guest_io_works(&client, 2);
    let m = ctl(&s.control, "set-cache-mode", json!({"mode": "writeback"})).unwrap();
    assert_eq!(m["mode"], "writeback", "{m}");
    assert_eq!(m["guest_writeback"], true);

    // snapshot and query-snapshots; a second snapshot onto an existing file is refused.
    let snap = s.dir.path().join("snap1.qcow2");
    let r = ctl(
        &s.control,
        "snapshot",
        json!({"overlay": snap.to_str().unwrap()}),
    )
    .unwrap();
    assert_eq!(r["frozen"], top.to_str().unwrap(), "{r}");
    assert!(r["pause_ms"].as_f64().unwrap() >= 0.0);
    let list = ctl(&s.control, "query-snapshots", json!({})).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
    let again = ctl(
        &s.control,
        "snapshot",
        json!({"overlay": snap.to_str().unwrap()}),
    );
    assert!(
        matches!(&again, Err(snapblk::ctl::CtlError::Command { desc, .. }) if desc.contains("exists")),
        "{again:?}"
    );
    assert_guest_io_works(&client, 3);

    // Malformed and unknown requests: error objects, connection stays usable.
    for (line, class) in [
        (&b"{\"execute\": \"query-status\"\n"[..], "GenericError"),
        (b"[]\n", "GenericError"),
        (b"\"x\"\n", "GenericError"),
        (b"{\"execute\": \"format-disk\"}\n", "CommandNotFound"),
        (
            b"{\"execute\": \"snapshot\", \"arguments\": {\"overlay\": 5}}\n",
            "InvalidArgument",
        ),
        (b"\xc3\x28\n", "GenericError"),
    ] {
        let r = raw.request(line);
        assert_eq!(r["error"]["class"], class, "{r}");
    }
    let r = raw.request(b"{\"execute\": \"query-status\", \"id\": 42}\n");
    assert_eq!(r["id"], 42);
    assert!(r["return"].is_object());
    assert_guest_io_works(&client, 4);

    // An oversized line: error object, then the connection is closed.
    let (mut big, _) = Raw::connect(&s.control);
    // The server may close before all of it is written: the write's result does not matter.
    let _ = big.stream.write_all(&vec![b'x'; 100 << 10]);
    let mut line = String::new();
    big.reader.read_line(&mut line).unwrap();
    let r: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(r["error"]["class"], "LineTooLong", "{r}");
    // Closed: end of file, or a reset because the rest of the line was never read.
    let mut rest = Vec::new();
    match big.reader.read_to_end(&mut rest) {
        Ok(_) => assert!(rest.is_empty(), "more after LineTooLong"),
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
    }

    // Clients that go away mid-reply or before the greeting.
    for _ in 0..5 {
        let mut s2 = UnixStream::connect(&s.control).unwrap();
        let many = "{\"execute\": \"query-stats\"}\n".repeat(200);
        let _ = s2.write_all(many.as_bytes());
        drop(s2);
        drop(UnixStream::connect(&s.control).unwrap());
    }
    assert_guest_io_works(&client, 5);

    // Bounded clients: with the limit reached, one more gets TooManyClients.
    drop(raw);
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut held = Vec::new();
    loop {
        let (c, g) = Raw::connect(&s.control);
        if g.get("error").is_some() {
            assert_eq!(g["error"]["class"], "TooManyClients", "{g}");
            break;
        }
        held.push(c);
        assert!(held.len() <= 8, "more than 8 clients served at once");
        assert!(Instant::now() < deadline);
    }
    assert_guest_io_works(&client, 6);
    drop(held);
    // Slots come back once those clients are gone.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_c, g) = Raw::connect(&s.control);
        if g.get("snapblk").is_some() {
            break;
        }
        assert!(Instant::now() < deadline, "client slots never freed");
        std::thread::sleep(Duration::from_millis(50));
    }
    let st = ctl(&s.control, "query-status", json!({})).unwrap();
    assert_eq!(st["snapshots"], 1);
    // The command-line client: exit 0 and the return value as JSON; 1 for a command error;
    // 2 for a malformed argument.
    let bin = snapblk_binary().unwrap();
    let run = |args: &[&str]| {
        std::process::Command::new(&bin)
            .arg("ctl")
            .arg(&s.control)
            .args(args)
            .output()
            .unwrap()
    };
    let out = run(&["query-snapshots"]);
    assert!(out.status.success(), "{out:?}");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 1);
    let out = run(&["set-cache-mode", "mode=sideways"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("InvalidArgument"));
    assert_eq!(run(&["flush", "oops"]).status.code(), Some(2));
    drop(client);
    s.daemon
        .terminate(Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(!s.control.exists(), "control socket not removed at exit");
    host_tool("qemu-img", &["check", snap.to_str().unwrap()]);
}

#[test]
fn live_snapshot_under_writes_freezes_what_was_flushed_and_the_disk_stays_right() {
    let Some(s) = start(&["--cache-size", "128M", "--dirty-limit", "96M"]) else {
        return;
    };
    let client = Arc::new(connect_client(s.daemon.socket()));
    // Phase 1: region A written and flushed.
    let a = pattern(7, 8 << 20);
    client.write(0, 0, &a).unwrap();
    client.flush(0).unwrap();
    // Also dirty data that was acknowledged but not flushed: the snapshot must include it.
    let unflushed = pattern(9, 4 << 20);
    client.write(0, 16 * MIB, &unflushed).unwrap();

    // A writer keeps writing region B (its own blocks, a sequence number in each) during the
    // snapshot.
    let stop = Arc::new(AtomicBool::new(false));
    let completed = Arc::new(AtomicU64::new(0));
    let writer = {
        let (client, stop, completed) = (client.clone(), stop.clone(), completed.clone());
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let block = n % 256;
                let mut buf = vec![0u8; 64 << 10];
                buf[..8].copy_from_slice(&(n + 1).to_le_bytes());
                client
                    .write(1, 32 * MIB + block * (64 << 10), &buf)
                    .unwrap();
                n += 1;
                completed.store(n, Ordering::SeqCst);
            }
            n
        })
    };
    while completed.load(Ordering::SeqCst) < 20 {
        std::thread::sleep(Duration::from_millis(5));
    }
    let before = completed.load(Ordering::SeqCst);
    let snap = s.dir.path().join("snap.qcow2");
    let r = ctl(
        &s.control,
        "snapshot",
        json!({"overlay": snap.to_str().unwrap()}),
    )
    .unwrap();
    let after = completed.load(Ordering::SeqCst);
    // After the snapshot the writer goes on, and region A is overwritten.
    while completed.load(Ordering::SeqCst) < after + 20 {
        std::thread::sleep(Duration::from_millis(5));
    }
    let a2 = pattern(8, 1 << 20);
    client.write(0, 0, &a2).unwrap();
    client.flush(1).unwrap();

    // The frozen image is readable by qemu-img and snapblk while the daemon runs.
    let frozen = PathBuf::from(r["frozen"].as_str().unwrap());
    host_tool("qemu-img", &["check", frozen.to_str().unwrap()]);
    let bin = snapblk_binary().unwrap();
    host_tool(
        bin.to_str().unwrap(),
        &["checksum", frozen.to_str().unwrap()],
    );
    let img = image_bytes(&frozen);
    assert!(
        img[..a.len()] == a[..],
        "region A in the frozen image is not what was flushed"
    );
    assert!(
        img[16 * MIB as usize..][..unflushed.len()] == unflushed[..],
        "acknowledged, unflushed data before the snapshot is missing from it"
    );
    // Region B: every block holds a sequence number the writer wrote; the newest of them is at
    // least what had completed before the snapshot was asked for and at most what had
    // completed when it returned.
    let newest = newest_sequence(&img);
    assert!(
        newest >= before && newest <= after,
        "frozen region B holds write #{newest}, not within [{before}, {after}]"
    );

    stop.store(true, Ordering::SeqCst);
    let total = writer.join().unwrap();
    // The final disk: region A rewritten, B's last writes, everything else as before.
    let mut live = vec![0u8; DISK as usize];
    for (i, chunk) in live.chunks_mut(MIB as usize).enumerate() {
        client.read(0, i as u64 * MIB, chunk).unwrap();
    }
    assert!(live[..a2.len()] == a2[..]);
    assert!(live[a2.len()..a.len()] == a[a2.len()..]);
    drop(client);
    s.daemon
        .terminate(Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{e}"));
    let top_now = image_bytes(&snap);
    assert!(
        top_now == live,
        "final image chain differs from what the client read"
    );
    let newest_final = newest_sequence(&top_now);
    assert_eq!(newest_final, total, "the last write is in the final image");
    for img in [&snap, &s.top] {
        host_tool("qemu-img", &["check", img.to_str().unwrap()]);
    }
    eprintln!(
        "live snapshot under writes: pause {} ms, pre-flush {} ms",
        r["pause_ms"], r["preflush_ms"]
    );
}

/// The highest sequence number the region-B writer left in the 256 blocks of `disk`.
fn newest_sequence(disk: &[u8]) -> u64 {
    (0..256u64)
        .map(|b| {
            let off = (32 * MIB + b * (64 << 10)) as usize;
            u64::from_le_bytes(disk[off..off + 8].try_into().unwrap())
        })
        .max()
        .unwrap_or(0)
}

/// `name{labels} value` lines of an exposition.
fn parse_metrics(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

fn http_get(addr: &str, request: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

fn scrape(addr: &str) -> HashMap<String, f64> {
    let resp = http_get(addr, "GET /metrics HTTP/1.0\r\n\r\n");
    let (head, body) = resp.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.0 200"), "{head}");
    assert!(body.ends_with("# EOF\n"), "not a complete exposition");
    parse_metrics(body)
}

#[test]
fn metrics_change_by_exactly_the_known_workload() {
    let Some(s) = start(&["--metrics", "127.0.0.1:0"]) else {
        return;
    };
    let log = s.daemon.log();
    let addr = log
        .split("metrics on http://")
        .nth(1)
        .and_then(|r| r.split("/metrics").next())
        .unwrap_or_else(|| panic!("no metrics address in the log:\n{log}"))
        .to_string();
    let client = connect_client(s.daemon.socket());
    let m0 = scrape(&addr);
    // 16 writes of 4 KiB on queue 1, each into its own 64 KiB qcow2 cluster; 8 reads of them on
    // queue 0; one flush on queue 1.
    let data = pattern(3, 4096);
    for i in 0..16u64 {
        client.write(1, i * MIB, &data).unwrap();
    }
    let mut buf = vec![0u8; 4096];
    for i in 0..8u64 {
        client.read(0, i * MIB, &mut buf).unwrap();
        assert!(buf == data);
    }
    client.flush(1).unwrap();
    let m1 = scrape(&addr);
    let d = |k: &str| {
        m1.get(k).unwrap_or_else(|| panic!("no {k}"))
            - m0.get(k).unwrap_or_else(|| panic!("no {k} before"))
    };
    assert_eq!(d(r#"snapblk_requests_total{queue="1",op="write"}"#), 16.0);
    assert_eq!(
        d(r#"snapblk_request_bytes_total{queue="1",op="write"}"#),
        65536.0
    );
    assert_eq!(
        d(r#"snapblk_request_duration_seconds_count{queue="1",op="write"}"#),
        16.0
    );
    assert_eq!(d(r#"snapblk_requests_total{queue="0",op="read"}"#), 8.0);
    assert_eq!(
        d(r#"snapblk_request_bytes_total{queue="0",op="read"}"#),
        32768.0
    );
    assert_eq!(d(r#"snapblk_requests_total{queue="1",op="flush"}"#), 1.0);
    assert_eq!(d(r#"snapblk_requests_total{queue="0",op="write"}"#), 0.0);
    assert!(d("snapblk_flushes_total") >= 1.0);
    assert_eq!(d("snapblk_qcow2_clusters_allocated_total"), 16.0);
    assert_eq!(d("snapblk_cache_writeback_bytes_total"), 65536.0);
    assert!(d("snapblk_cache_read_hits_total") >= 8.0);
    assert_eq!(m1[r#"snapblk_requests_in_flight{queue="0"}"#], 0.0);
    assert_eq!(m1["snapblk_cache_dirty_bytes"], 0.0);
    assert_eq!(m1["snapblk_frontend_connected"], 1.0);
    assert_eq!(
        d(r#"snapblk_request_errors_total{queue="1",op="write",kind="io"}"#),
        0.0
    );
    // The crash journal recorded each write with its data (48-byte record header), and the
    // FLUSH emptied it.
    assert_eq!(d("snapblk_journal_records_total"), 16.0);
    assert_eq!(
        d("snapblk_journal_record_bytes_total"),
        16.0 * (48.0 + 4096.0)
    );
    assert_eq!(d("snapblk_journal_persisted_writes_total"), 0.0);
    assert_eq!(m1["snapblk_journal_held_bytes"], 0.0);
    assert_eq!(m1["snapblk_journal_refusing"], 0.0);
    assert_eq!(m1["snapblk_journal_replayed_records_total"], 0.0);
    // A 256 KiB write that allocates is recorded with its data; once a FLUSH has put its
    // clusters' L2 entries into the file, the same rewrite is persisted in place and recorded
    // as a marker only.
    let big = pattern(5, 256 << 10);
    client.write(0, 40 * MIB, &big).unwrap();
    client.flush(0).unwrap();
    client.write(0, 40 * MIB, &big).unwrap();
    let m1b = scrape(&addr);
    let dj = |k: &str| m1b[k] - m1[k];
    assert_eq!(dj("snapblk_journal_records_total"), 2.0);
    assert_eq!(
        dj("snapblk_journal_record_bytes_total"),
        (48.0 + 262144.0) + 48.0
    );
    assert_eq!(dj("snapblk_journal_persisted_writes_total"), 1.0);
    assert_eq!(m1b["snapblk_journal_held_bytes"], 48.0);
    let stats = ctl(&s.control, "query-stats", json!({})).unwrap();
    assert_eq!(stats["crash_journal"]["persisted_writes"], json!(1));
    assert_eq!(stats["crash_journal"]["held_bytes"], json!(48));
    assert_eq!(stats["crash_journal"]["refusing"], json!(false));
    // The control socket's `flush` flushes the whole stack, the crash journal included: what
    // it made durable is no longer held for a replay.
    let trims = m1b["snapblk_journal_trims_total"];
    ctl(&s.control, "flush", json!({})).unwrap();
    let stats = ctl(&s.control, "query-stats", json!({})).unwrap();
    assert_eq!(stats["crash_journal"]["held_bytes"], json!(0));
    assert!(scrape(&addr)["snapblk_journal_trims_total"] > trims);

    // Hostile HTTP clients: wrong path and method, garbage, silent connections.
    assert!(http_get(&addr, "GET / HTTP/1.0\r\n\r\n").starts_with("HTTP/1.0 404"));
    assert!(http_get(&addr, "POST /metrics HTTP/1.0\r\n\r\n").starts_with("HTTP/1.0 405"));
    assert!(http_get(&addr, "\u{1}\u{2}\r\n\r\n").starts_with("HTTP/1.0 405"));
    let silent: Vec<_> = (0..6)
        .map(|_| std::net::TcpStream::connect(&addr).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(2500));
    drop(silent);
    let m2 = scrape(&addr);
    assert_eq!(
        m2[r#"snapblk_requests_total{queue="1",op="write"}"#],
        m1[r#"snapblk_requests_total{queue="1",op="write"}"#]
    );
    assert_guest_io_works(&client, 9);
    drop(client);
    s.daemon
        .terminate(Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e}"));
}

/// Writes `total` bytes in cache-sized (not bypassing) requests on queue `q`.
fn fill_dirty(client: &Client, q: usize, base: u64, total: u64, seed: u8) {
    let chunk = pattern(seed, 128 << 10);
    let mut off = 0;
    while off < total {
        client.write(q, base + off, &chunk).unwrap();
        off += chunk.len() as u64;
    }
}

/// The pause of a live snapshot with 256 MiB dirty in the cache, idle and with a writer going
/// on during the snapshot. Prints the numbers (the target is under 50 ms); asserts a loose
/// bound only, since the machine may be loaded.
#[test]
#[ignore = "measurement: 512 MiB disk, 256 MiB dirty; run with --ignored --nocapture"]
fn live_snapshot_pause_with_256_mib_dirty() {
    // The cache's flusher drains in the background too, so the dirty amount when the snapshot
    // is asked for is reported alongside the pause.
    if snapblk_binary().is_err() {
        snapblk_tests::client::daemon_missing("snapblk binary not available; skipping");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let top = dir.path().join("big.qcow2");
    qcow_snapshot::create(
        &top,
        &qcow_snapshot::CreateOptions {
            size: 512 * MIB,
            ..Default::default()
        },
    )
    .unwrap();
    let control = dir.path().join("c.sock");
    let cfg = DaemonConfig::new(DaemonKind::Snapblk, &top)
        .format(ImageFormat::Qcow2)
        .num_queues(2)
        .arg("--control-socket")
        .arg(control.to_str().unwrap())
        .arg("--cache-size")
        .arg("600M")
        .arg("--dirty-limit")
        .arg("512M");
    let daemon = Daemon::start(&cfg, dir.path(), "daemon").unwrap_or_else(|e| panic!("{e}"));
    let client = Arc::new(connect_client(daemon.socket()));
    let mut report = Vec::new();
    for (i, with_writer) in [(1, false), (2, true), (3, true)] {
        fill_dirty(&client, 0, 0, 256 * MIB, i as u8);
        let stop = Arc::new(AtomicBool::new(false));
        let writer = with_writer.then(|| {
            let (client, stop) = (client.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    fill_dirty(&client, 1, 300 * MIB + (n % 64) * MIB, MIB, n as u8);
                    n += 1;
                }
            })
        });
        let snap = dir.path().join(format!("s{i}.qcow2"));
        let r = ctl(
            &control,
            "snapshot",
            json!({"overlay": snap.to_str().unwrap()}),
        )
        .unwrap();
        stop.store(true, Ordering::SeqCst);
        if let Some(w) = writer {
            w.join().unwrap();
        }
        report.push(format!(
            "snapshot {i} (writer during snapshot: {with_writer}): dirty before {} MiB, \
             pre-flush {:.1} ms, dirty at pause {} MiB, pause {:.1} ms",
            r["dirty_bytes_before"].as_u64().unwrap() >> 20,
            r["preflush_ms"].as_f64().unwrap(),
            r["dirty_bytes_at_pause"].as_u64().unwrap() >> 20,
            r["pause_ms"].as_f64().unwrap()
        ));
        assert!(r["pause_ms"].as_f64().unwrap() < 1000.0, "{r}");
    }
    for l in &report {
        eprintln!("{l}");
    }
    drop(client);
    daemon
        .terminate(Duration::from_secs(120))
        .unwrap_or_else(|e| panic!("{e}"));
}
