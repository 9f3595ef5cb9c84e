//! The vhost-user-blk client ([`snapblk_tests::client`]) against real daemons, no guest needed.
//!
//! Every check runs against the reference peer, qemu-storage-daemon (`qsd_*` tests), which proves
//! the client itself: payload slots, chunking, queue-depth submission and error mapping. The same
//! checks then run against `target/release/snapblk serve` (`snapblk_*` tests), so a failure there
//! that passes on qsd points at the daemon. A test whose daemon binary is missing prints why and
//! returns (set `SNAPBLK_REQUIRE_DAEMONS=1` to make that a failure instead; `make test` builds
//! snapblk first).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use snapblk_tests::client::{Client, ClientConfig, ClientError, Op, RequestStatus};

const MIB: u64 = 1 << 20;
/// How long a freshly spawned daemon may take to accept its first connection.
const START_WAIT: Duration = Duration::from_secs(15);

/// Which daemon serves the image.
#[derive(Clone, Copy, Debug)]
enum Kind {
    Qsd,
    Snapblk,
}

/// A daemon serving a fresh sparse raw image in a temporary directory; killed on drop, and its
/// log printed if the test is failing (the directory, log included, goes with it).
struct Daemon {
    child: Child,
    socket: PathBuf,
    image: PathBuf,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "--- daemon log ({}) ---\n{}",
                self.log.display(),
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
    }
}

fn find_in_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    })
}

impl Daemon {
    /// Starts `kind` on a zero-filled raw image of `size` bytes with `num_queues` queues, or
    /// returns `None` (after saying why) if the daemon binary is not available.
    fn start(kind: Kind, size: u64, num_queues: usize) -> Option<Daemon> {
        Self::start_with(kind, size, num_queues, false)
    }

    /// Like [`Daemon::start`], optionally exporting the disk read-only.
    fn start_with(kind: Kind, size: u64, num_queues: usize, readonly: bool) -> Option<Daemon> {
        let program = match kind {
            Kind::Qsd => find_in_path("qemu-storage-daemon"),
            Kind::Snapblk => snapblk_tests::guest::snapblk_binary().ok(),
        };
        let Some(program) = program else {
            snapblk_tests::client::daemon_missing(&format!(
                "{kind:?} binary not available; skipping"
            ));
            return None;
        };
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("disk.raw");
        let socket = dir.path().join("vhost.sock");
        let log = dir.path().join("daemon.log");
        File::create(&image).unwrap().set_len(size).unwrap();
        let mut cmd = Command::new(program);
        match kind {
            Kind::Qsd => {
                cmd.arg("--blockdev")
                    .arg(format!(
                        "driver=file,node-name=f,filename={},cache.direct=off",
                        image.display()
                    ))
                    .arg("--export")
                    .arg(format!(
                        "type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path={},\
                         writable={},num-queues={num_queues}",
                        socket.display(),
                        if readonly { "off" } else { "on" }
                    ));
            }
            Kind::Snapblk => {
                cmd.arg("serve")
                    .arg("--image")
                    .arg(&image)
                    .arg("--socket")
                    .arg(&socket)
                    .arg("--num-queues")
                    .arg(num_queues.to_string())
                    .arg("--cache")
                    .arg("writeback");
                if readonly {
                    cmd.arg("--readonly");
                }
            }
        }
        let log_file = File::create(&log).unwrap();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().unwrap())
            .stderr(log_file)
            .spawn()
            .unwrap();
        Some(Daemon {
            child,
            socket,
            image,
            log,
            _dir: dir,
        })
    }

    /// Connects, or panics with the daemon's log if it never accepts.
    fn connect(&self, cfg: &ClientConfig) -> Client {
        match Client::connect_retry(&self.socket, cfg, START_WAIT) {
            Ok(c) => c,
            Err(e) => panic!(
                "connecting to {}: {e}\n--- daemon log ---\n{}",
                self.socket.display(),
                std::fs::read_to_string(&self.log).unwrap_or_default()
            ),
        }
    }
}

/// Deterministic non-zero-heavy bytes (xorshift), so misplaced blocks are told apart.
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn written_bytes_read_back_across_queues_and_chunks(kind: Kind) {
    let Some(d) = Daemon::start(kind, 16 * MIB, 2) else {
        return;
    };
    let mut cfg = ClientConfig::new(2);
    // Small slots force the synchronous helpers to split into many chunks.
    cfg.slot_size = 8192;
    cfg.slots_per_queue = 4;
    let c = d.connect(&cfg);
    assert_eq!(c.capacity(), 16 * MIB);
    assert_eq!(c.num_queues(), 2);

    let data = pattern(100 * 1024 + 512, 7);
    c.write(0, 3 * 4096, &data).unwrap();
    let mut back = vec![0u8; data.len()];
    // Read through the other queue: both queues see one disk.
    c.read(1, 3 * 4096, &mut back).unwrap();
    assert!(back == data, "bytes read back differ from bytes written");
    c.flush(0).unwrap();
    drop(c);

    // After the flush the image file holds the same bytes at the same place.
    let file = std::fs::read(&d.image).unwrap();
    assert!(
        file.get(3 * 4096..3 * 4096 + data.len()) == Some(&data[..]),
        "image file does not hold the flushed bytes"
    );
    assert!(
        file[..3 * 4096].iter().all(|&b| b == 0),
        "bytes before the write changed"
    );
}

fn write_zeroes_leaves_zeroes_and_spares_neighbours(kind: Kind) {
    let Some(d) = Daemon::start(kind, 8 * MIB, 1) else {
        return;
    };
    let c = d.connect(&ClientConfig::new(1));
    let data = pattern(MIB as usize, 3);
    c.write(0, 0, &data).unwrap();
    if c.info().max_write_zeroes_len == 0 {
        eprintln!("{kind:?}: device offers no write-zeroes; checking only that it is refused");
        let err = c.write_zeroes(0, 4096, 65536, false).unwrap_err();
        assert!(matches!(
            err,
            ClientError::Request {
                status: RequestStatus::Unsupported,
                ..
            }
        ));
        return;
    }
    c.write_zeroes(0, 4096, 65536, false).unwrap();
    c.write_zeroes(0, 256 * 1024, 65536, true).unwrap();
    let mut back = vec![0xffu8; MIB as usize];
    c.read(0, 0, &mut back).unwrap();
    let zero = |r: std::ops::Range<usize>| back[r].iter().all(|&b| b == 0);
    assert!(
        back[..4096] == data[..4096],
        "bytes before the zeroed range changed"
    );
    assert!(zero(4096..4096 + 65536), "write-zeroes range is not zero");
    assert!(
        back[4096 + 65536..256 * 1024] == data[4096 + 65536..256 * 1024],
        "bytes between the zeroed ranges changed"
    );
    assert!(
        zero(256 * 1024..320 * 1024),
        "write-zeroes (unmap) range is not zero"
    );
    assert!(
        back[320 * 1024..] == data[320 * 1024..],
        "bytes after the zeroed ranges changed"
    );
    if c.info().max_discard_len > 0 {
        // Discard is only a hint: the device must accept it and leave neighbours alone.
        let before = back.clone();
        c.discard(0, 512 * 1024, 64 * 1024).unwrap();
        c.read(0, 0, &mut back).unwrap();
        assert!(
            back[..512 * 1024] == before[..512 * 1024],
            "discard touched bytes before it"
        );
        assert!(
            back[576 * 1024..] == before[576 * 1024..],
            "discard touched bytes after it"
        );
    }
}

fn out_of_range_request_fails_with_ioerr_not_hang(kind: Kind) {
    let Some(d) = Daemon::start(kind, 4 * MIB, 1) else {
        return;
    };
    let c = d.connect(&ClientConfig::new(1));
    let mut buf = vec![0u8; 4096];
    match c.read(0, 4 * MIB, &mut buf) {
        Err(ClientError::Request { status, .. }) => assert_eq!(status, RequestStatus::IoErr),
        other => panic!("expected a device error, got {other:?}"),
    }
    // Straddling the end is refused as a whole, too.
    assert!(c.write(0, 4 * MIB - 512, &buf).is_err());
    // The queue still works afterwards.
    c.read(0, 0, &mut buf).unwrap();
}

fn async_submissions_complete_with_their_own_tags_and_data(kind: Kind) {
    let Some(d) = Daemon::start(kind, 8 * MIB, 1) else {
        return;
    };
    let mut cfg = ClientConfig::new(1);
    cfg.slots_per_queue = 16;
    cfg.slot_size = 4096;
    let c = d.connect(&cfg);
    let mut q = c.queue(0).unwrap();
    for slot in 0..16usize {
        q.slot_mut(slot).unwrap().fill(slot as u8 + 1);
        let op = Op::Write {
            slot,
            offset: slot as u64 * 8192,
            len: 4096,
            fua: slot % 2 == 0,
        };
        q.submit(op, 1000 + slot as u64).unwrap();
    }
    // A busy slot is refused rather than handed out twice.
    assert!(q.slot_mut(0).is_err());
    let mut done = Vec::new();
    while done.len() < 16 {
        q.wait(1, &mut done).unwrap();
    }
    let mut tags: Vec<u64> = done.iter().map(|c| c.tag).collect();
    tags.sort_unstable();
    assert_eq!(tags, (1000..1016).collect::<Vec<_>>());
    assert!(done.iter().all(|c| c.result.is_ok()));
    assert_eq!(q.in_flight(), 0);

    for slot in 0..16usize {
        q.slot_mut(slot).unwrap().fill(0);
        let op = Op::Read {
            slot,
            offset: (15 - slot) as u64 * 8192,
            len: 4096,
        };
        q.submit(op, slot as u64).unwrap();
    }
    q.submit(Op::Flush, 99).unwrap();
    let mut done = Vec::new();
    while done.len() < 17 {
        q.wait(1, &mut done).unwrap();
    }
    for slot in 0..16usize {
        let expect = (15 - slot) as u8 + 1;
        assert!(
            q.slot(slot).unwrap().iter().all(|&b| b == expect),
            "slot {slot} holds the wrong block"
        );
    }
    // Waiting for more than is outstanding is an error, not a hang.
    assert!(q.wait(1, &mut done).is_err());
    // A synchronous call on the same queue still works after asynchronous traffic.
    drop(q);
    let mut buf = vec![0u8; 4096];
    c.read(0, 8192, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 2));
}

fn stalled_daemon_times_out_instead_of_hanging(kind: Kind) {
    let Some(d) = Daemon::start(kind, 4 * MIB, 1) else {
        return;
    };
    let c = d.connect(&ClientConfig::new(1));
    let mut q = c.queue(0).unwrap();
    let mut buf = vec![0u8; 4096];
    q.read(0, &mut buf).unwrap();
    let pid = d.child.id().to_string();
    let signal = |sig: &str| {
        let ok = Command::new("kill")
            .args([sig, &pid])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {sig} {pid} failed");
    };
    signal("-STOP");
    // `kill` returns once the signal is sent; wait until every thread has really stopped.
    let stopped = || {
        std::fs::read_dir(format!("/proc/{pid}/task"))
            .map(|tasks| {
                tasks.flatten().all(|t| {
                    std::fs::read_to_string(t.path().join("stat"))
                        .ok()
                        .and_then(|st| {
                            st.rsplit(')')
                                .next()
                                .map(|r| r.trim_start().starts_with('T'))
                        })
                        .unwrap_or(false)
                })
            })
            .unwrap_or(false)
    };
    let t0 = std::time::Instant::now();
    while !stopped() {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "daemon {pid} did not stop"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    q.set_timeout(Duration::from_millis(300));
    let started = std::time::Instant::now();
    let err = q.read(4096, &mut buf).unwrap_err();
    signal("-CONT");
    assert!(matches!(err, ClientError::Timeout { .. }), "got {err}");
    assert!(started.elapsed() < Duration::from_secs(10));
    // The timed-out request keeps its slot (the daemon may still fill it); others still work.
    q.set_timeout(Duration::from_secs(30));
    q.read(8192, &mut buf).unwrap();
}

fn queues_driven_from_two_threads_keep_their_own_data(kind: Kind) {
    let Some(d) = Daemon::start(kind, 16 * MIB, 2) else {
        return;
    };
    let mut cfg = ClientConfig::new(2);
    cfg.slots_per_queue = 8;
    cfg.slot_size = 4096;
    let c = d.connect(&cfg);
    std::thread::scope(|s| {
        for qi in 0..2usize {
            let c = &c;
            s.spawn(move || {
                let mut q = c.queue(qi).unwrap();
                // Queue qi owns the 4 KiB blocks whose index is qi modulo 2, in the first 8 MiB.
                let blocks: Vec<u64> = (0..1024u64).filter(|b| b % 2 == qi as u64).collect();
                for chunk in blocks.chunks(8) {
                    for (slot, &b) in chunk.iter().enumerate() {
                        let bytes = pattern(4096, b + 1);
                        q.slot_mut(slot).unwrap().copy_from_slice(&bytes);
                        let op = Op::Write {
                            slot,
                            offset: b * 4096,
                            len: 4096,
                            fua: false,
                        };
                        q.submit(op, b).unwrap();
                    }
                    let mut done = Vec::new();
                    while done.len() < chunk.len() {
                        q.wait(1, &mut done).unwrap();
                    }
                    for c in done {
                        c.into_result().unwrap();
                    }
                }
                q.flush().unwrap();
            });
        }
    });
    let mut disk = vec![0u8; 4 * MIB as usize];
    c.read(0, 0, &mut disk).unwrap();
    for (b, block) in disk.chunks(4096).enumerate() {
        assert!(
            block == pattern(4096, b as u64 + 1),
            "block {b} holds the wrong data"
        );
    }
}

fn read_only_export_refuses_writes_and_serves_reads(kind: Kind) {
    let Some(d) = Daemon::start_with(kind, 4 * MIB, 1, true) else {
        return;
    };
    // blkio refuses to start a read-only device unless asked for read-only access.
    match Client::connect_retry(&d.socket, &ClientConfig::new(1), START_WAIT) {
        Err(ClientError::Start { .. }) => {}
        other => panic!("expected a start error on a read-only device, got {other:?}"),
    }
    drop(d);
    let Some(d) = Daemon::start_with(kind, 4 * MIB, 1, true) else {
        return;
    };
    let mut cfg = ClientConfig::new(1);
    cfg.read_only = true;
    let c = d.connect(&cfg);
    let mut buf = vec![0xffu8; 4096];
    c.read(0, 0, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
    match c.write(0, 0, &buf) {
        Err(ClientError::Request { status, .. }) => {
            assert_eq!(status, RequestStatus::Errno(libc::EBADF))
        }
        other => panic!("expected a refused write, got {other:?}"),
    }
}

#[test]
fn connecting_to_a_missing_socket_fails_fast() {
    let dir = tempfile::tempdir().unwrap();
    let err = Client::connect(dir.path().join("nobody.sock"), 1).unwrap_err();
    assert!(matches!(err, ClientError::Connect { .. }), "got {err}");
}

#[test]
fn asking_for_more_queues_than_offered_fails_to_start() {
    let Some(d) = Daemon::start(Kind::Qsd, MIB, 1) else {
        return;
    };
    match Client::connect_retry(&d.socket, &ClientConfig::new(4), START_WAIT) {
        Err(ClientError::Start { max_queues, .. }) => assert_eq!(max_queues, 1),
        other => panic!("expected a start error, got {other:?}"),
    }
}

macro_rules! both_daemons {
    ($($check:ident),* $(,)?) => {
        mod qsd {
            $(#[test] fn $check() { super::$check(super::Kind::Qsd) })*
        }
        mod snapblk {
            $(#[test] fn $check() { super::$check(super::Kind::Snapblk) })*
        }
    };
}

both_daemons!(
    written_bytes_read_back_across_queues_and_chunks,
    write_zeroes_leaves_zeroes_and_spares_neighbours,
    out_of_range_request_fails_with_ioerr_not_hang,
    async_submissions_complete_with_their_own_tags_and_data,
    stalled_daemon_times_out_instead_of_hanging,
    queues_driven_from_two_threads_keep_their_own_data,
    read_only_export_refuses_writes_and_serves_reads,
);

/// The numeric value of `"key":` in a flat JSON object printed by snapblk-bench.
fn json_number(json: &str, key: &str) -> Option<f64> {
    let pat = format!("\"{key}\":");
    let rest = &json[json.find(&pat)? + pat.len()..];
    let end = rest.find([',', '}']).unwrap_or(rest.len());
    rest[..end].trim().parse().ok()
}

#[test]
fn bench_tool_completes_io_on_every_queue_and_reports_daemon_cpu() {
    let Some(d) = Daemon::start(Kind::Qsd, 16 * MIB, 2) else {
        return;
    };
    let out = Command::new(env!("CARGO_BIN_EXE_snapblk-bench"))
        .arg("--socket")
        .arg(&d.socket)
        .args([
            "--queues",
            "2",
            "--iodepth",
            "4",
            "--bs",
            "4k",
            "--rw",
            "randrw",
        ])
        .args([
            "--mix",
            "70",
            "--flush-every",
            "8",
            "--runtime",
            "1",
            "--json",
        ])
        .args(["--daemon-pid", &d.child.id().to_string()])
        .output()
        .unwrap();
    let json = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "bench failed: {json} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let num = |k: &str| json_number(&json, k).unwrap_or_else(|| panic!("no {k} in {json}"));
    assert!(num("reads") > 0.0 && num("writes") > 0.0, "{json}");
    // A FLUSH follows every 8 writes of a queue; on a loaded machine a short run may complete
    // too few writes for one (the peer's first requests can take long), so the count is
    // checked once some queue has written enough for several.
    if num("writes") >= 64.0 {
        assert!(num("flushes") > 0.0, "{json}");
    }
    assert_eq!(num("errors"), 0.0);
    assert_eq!(num("ios"), num("reads") + num("writes"));
    assert!(num("lat_p99_us") >= num("lat_p50_us"));
    assert!(num("daemon_vmhwm_kib") > 0.0, "{json}");
}

#[test]
fn bench_verify_accepts_the_served_image_and_rejects_a_different_one() {
    let Some(d) = Daemon::start(Kind::Qsd, 4 * MIB, 1) else {
        return;
    };
    let c = d.connect(&ClientConfig::new(1));
    c.write(0, 0, &pattern(4 * MIB as usize, 11)).unwrap();
    c.flush(0).unwrap();
    drop(c);
    let verify = |reference: &Path| {
        Command::new(env!("CARGO_BIN_EXE_snapblk-bench"))
            .arg("--socket")
            .arg(&d.socket)
            .arg("--verify-file")
            .arg(reference)
            .output()
            .unwrap()
    };
    let same = verify(&d.image);
    assert!(
        same.status.success(),
        "{}",
        String::from_utf8_lossy(&same.stdout)
    );

    // One changed byte in the last block (always checked) must be reported.
    let mut bytes = std::fs::read(&d.image).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    let other = d.image.with_extension("other");
    std::fs::write(&other, &bytes).unwrap();
    let differs = verify(&other);
    assert_eq!(differs.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&differs.stdout).contains("MISMATCH"));

    // A reference of another size is a capacity mismatch.
    std::fs::write(&other, &bytes[..MIB as usize]).unwrap();
    assert_eq!(verify(&other).status.code(), Some(1));
}
