//! Process crash: `snapblk serve` is killed with SIGKILL in the middle of a client workload of
//! writes and flushes (through the vhost-user socket, with the blkio client). Every write that
//! a completed FLUSH covered must survive: the image is checked (snapblk's checker and
//! `qemu-img check`: exit 0 or 3, and they agree), served again by a fresh daemon (which
//! repairs the leaks the dirty bit announces) and read back through it, and reopened by the
//! engine in-process; every sector holds its flushed value or a value written later.
//!
//! Runs on a raw image and on a qcow2 overlay over a random raw base. If `snapblk serve` cannot
//! serve qcow2 yet (the capacity it reports is the file size, not the virtual size), the
//! overlay variant says so and stops, unless `SNAPBLK_REQUIRE_QCOW2_SERVE` is set.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use snapblk_tests::client::{Client, ClientConfig};
use snapblk_tests::crashsim::{
    have_qemu_img, pattern, qemu_img_check, read_all, seed_from_env, snapblk_check, Expectation,
    GuestOp,
};

const DISK: u64 = 32 << 20;

/// A running `snapblk serve`, killed on drop.
struct Daemon {
    child: Child,
    socket: PathBuf,
    log: PathBuf,
}

impl Daemon {
    fn start(
        bin: &Path,
        image: &Path,
        dir: &Path,
        tag: &str,
        queues: usize,
        extra: &[&str],
    ) -> Daemon {
        let socket = dir.join(format!("{tag}.sock"));
        let log = dir.join(format!("{tag}.log"));
        let log_file = fs::File::create(&log).expect("daemon log");
        let child = Command::new(bin)
            .arg("serve")
            .arg("--image")
            .arg(image)
            .arg("--socket")
            .arg(&socket)
            .args(["--cache", "writeback"])
            .args(["--num-queues", &queues.to_string()])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("log fd"))
            .stderr(log_file)
            .spawn()
            .expect("spawn snapblk serve");
        Daemon { child, socket, log }
    }

    fn connect(&self, queues: usize) -> Client {
        let mut cfg = ClientConfig::new(queues);
        cfg.timeout = Duration::from_secs(3);
        cfg.slots_per_queue = 4;
        Client::connect_retry(&self.socket, &cfg, Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("connecting to snapblk: {e}\n{}", self.log_text()))
    }

    fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn signal(&self, sig: &str) {
        let _ = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status();
    }

    /// SIGTERM and wait (bounded); SIGKILL if it does not exit.
    fn stop(mut self) -> Option<i32> {
        self.signal("-TERM");
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(st)) = self.child.try_wait() {
                return st.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    fn kill9(&mut self) {
        self.signal("-KILL");
        let _ = self.child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// One client-side event, in one global order (taken under the log's mutex).
#[derive(Debug, Clone)]
enum Ev {
    /// A request is about to be submitted.
    Submit(GuestOp),
    /// The write submitted at event index `.0` completed successfully.
    WriteDone(usize),
    /// The flush submitted at event index `.0` completed successfully.
    FlushDone(usize),
}

/// What the clients did before the daemon died.
#[derive(Default)]
struct ClientLog {
    events: Vec<Ev>,
    flushes: usize,
}

impl ClientLog {
    fn push(&mut self, e: Ev) -> usize {
        if matches!(e, Ev::FlushDone(_)) {
            self.flushes += 1;
        }
        self.events.push(e);
        self.events.len() - 1
    }
}

/// A random write inside `[lo, hi)` (or a flush).
fn random_op(rng: &mut StdRng, lo: u64, hi: u64) -> GuestOp {
    if rng.random_range(0..6) == 0 {
        return GuestOp::Flush;
    }
    let (first, sectors) = (lo / 512, (hi - lo) / 512);
    let len_sectors = match rng.random_range(0..3) {
        0 => rng.random_range(1..8),       // sub-cluster, unaligned to 4 KiB
        1 => 8 * rng.random_range(1..16),  // 4 KiB multiples
        _ => 128 * rng.random_range(1..4), // whole 64 KiB clusters (if aligned)
    };
    let start = if len_sectors % 128 == 0 {
        128 * rng.random_range(0..(sectors - len_sectors) / 128)
    } else {
        rng.random_range(0..sectors - len_sectors)
    };
    GuestOp::Write {
        offset: (first + start) * 512,
        len: len_sectors * 512,
        seed: rng.next_u64(),
    }
}

/// Runs random writes (inside `[lo, hi)`) and flushes on queue `q` until a request fails (the
/// daemon died) or `stop` is set.
fn workload(
    client: &Client,
    q: usize,
    (lo, hi): (u64, u64),
    seed: u64,
    log: &Mutex<ClientLog>,
    stop: &AtomicBool,
) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut buf = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        let op = random_op(&mut rng, lo, hi);
        let n = log.lock().unwrap().push(Ev::Submit(op.clone()));
        let r = match op {
            GuestOp::Write { offset, len, seed } => {
                buf.resize(len as usize, 0);
                pattern(seed, offset, &mut buf);
                client.write(q, offset, &buf)
            }
            GuestOp::Flush => client.flush(q),
            _ => continue,
        };
        if r.is_err() {
            return;
        }
        let done = if op == GuestOp::Flush {
            Ev::FlushDone(n)
        } else {
            Ev::WriteDone(n)
        };
        log.lock().unwrap().push(done);
    }
}

/// The expectation after the crash. A completed flush covers every write that completed before
/// the flush was submitted (on any queue); take the latest such flush: those writes, applied in
/// completion order (the queues write disjoint regions), are the flushed content, and every
/// other submitted write may or may not have landed.
fn expectation(initial: &[u8], log: &ClientLog) -> Expectation {
    let cut = log
        .events
        .iter()
        .filter_map(|e| match e {
            Ev::FlushDone(submit) => Some(*submit),
            _ => None,
        })
        .max()
        .unwrap_or(0);
    let mut shadow = initial.to_vec();
    let mut durable = vec![false; log.events.len()];
    for e in &log.events[..cut] {
        if let Ev::WriteDone(i) = *e {
            if let Some(Ev::Submit(GuestOp::Write { offset, len, seed })) = log.events.get(i) {
                let s = *offset as usize;
                pattern(*seed, *offset, &mut shadow[s..s + *len as usize]);
                durable[i] = true;
            }
        }
    }
    let later = log
        .events
        .iter()
        .enumerate()
        .filter_map(|(i, e)| match e {
            Ev::Submit(op @ GuestOp::Write { .. }) if !durable[i] => Some(op.clone()),
            _ => None,
        })
        .collect();
    Expectation {
        flushed: Arc::new(shadow),
        later,
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Raw,
    Qcow2Overlay,
    /// A qcow2 overlay served with `--direct on`: the cache's writebacks go down in batches on
    /// io_uring, straight to the device.
    Qcow2OverlayDirect,
}

impl Kind {
    /// The extra `serve` arguments of the kind.
    fn serve_args(self) -> &'static [&'static str] {
        match self {
            Kind::Qcow2OverlayDirect => &["--direct", "on", "--aio", "io_uring"],
            _ => &[],
        }
    }
}

/// One kill: start the daemon on `image` with `queues` queues, run one workload thread per
/// queue (each on its own slice of the disk), SIGKILL the daemon after a random delay, and
/// return the client log.
fn run_and_kill(
    bin: &Path,
    image: &Path,
    dir: &Path,
    seed: u64,
    round: usize,
    queues: usize,
    kind: Kind,
) -> Option<ClientLog> {
    let mut daemon = Daemon::start(
        bin,
        image,
        dir,
        &format!("serve{round}"),
        queues,
        kind.serve_args(),
    );
    let client = daemon.connect(queues);
    if client.capacity() != DISK {
        eprintln!(
            "snapblk serve reports {} bytes for a {DISK}-byte image: it does not serve this format yet",
            client.capacity()
        );
        return None;
    }
    let log = Mutex::new(ClientLog::default());
    let stop = AtomicBool::new(false);
    let mut rng = StdRng::seed_from_u64(seed ^ 0xdead);
    let slice = DISK / queues as u64;
    std::thread::scope(|s| {
        for q in 0..queues {
            let (client, log, stop) = (&client, &log, &stop);
            let region = (q as u64 * slice, (q as u64 + 1) * slice);
            s.spawn(move || workload(client, q, region, seed.wrapping_add(q as u64), log, stop));
        }
        // Let a few flushes complete, then kill at a random moment.
        let t0 = Instant::now();
        while log.lock().unwrap().flushes < 3 && t0.elapsed() < Duration::from_secs(20) {
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_millis(rng.random_range(20..400)));
        daemon.kill9();
        stop.store(true, Ordering::SeqCst);
    });
    drop(client);
    let log = log.into_inner().unwrap();
    assert!(
        log.flushes >= 3,
        "the workload never got going: {} flushes\n{}",
        log.flushes,
        daemon.log_text()
    );
    Some(log)
}

/// Reads the whole disk through a fresh daemon on `image` and stops it with SIGTERM; also says
/// whether it exited with status 0.
fn read_through_daemon(bin: &Path, image: &Path, dir: &Path, tag: &str) -> (Vec<u8>, bool) {
    let daemon = Daemon::start(bin, image, dir, tag, 1, &[]);
    let client = daemon.connect(1);
    let mut got = vec![0u8; DISK as usize];
    for (i, chunk) in got.chunks_mut(1 << 20).enumerate() {
        client
            .read(0, (i as u64) << 20, chunk)
            .unwrap_or_else(|e| panic!("reading after restart: {e}\n{}", daemon.log_text()));
    }
    drop(client);
    let code = daemon.stop();
    (got, code == Some(0))
}

fn snapblk_cli_check(bin: &Path, image: &Path) -> Option<i32> {
    let help = Command::new(bin).args(["check", "--help"]).output().ok()?;
    if !help.status.success() {
        return None;
    }
    Command::new(bin)
        .arg("check")
        .arg(image)
        .output()
        .ok()?
        .status
        .code()
}

fn crash_rounds(kind: Kind, queues: usize, rounds: usize, test: &str) {
    let bin = match snapblk_tests::guest::snapblk_binary() {
        Ok(b) => b,
        Err(e) => panic!("no snapblk binary: {e}"),
    };
    let seed = seed_from_env(test);
    let dir = tempfile::tempdir().expect("tempdir");
    let mut rng = StdRng::seed_from_u64(seed);
    let mut base = vec![0u8; DISK as usize];
    rng.fill_bytes(&mut base);
    let base_path = dir.path().join("base.raw");
    fs::write(&base_path, &base).expect("base");
    let image = match kind {
        Kind::Raw => base_path.clone(),
        Kind::Qcow2Overlay | Kind::Qcow2OverlayDirect => {
            let p = dir.path().join("overlay.qcow2");
            let opts = qcow_snapshot::CreateOptions {
                size: DISK,
                backing: Some((base_path.display().to_string(), qcow_snapshot::Format::Raw)),
                ..Default::default()
            };
            qcow_snapshot::create(&p, &opts).expect("create overlay");
            p
        }
    };
    let qemu = have_qemu_img();
    let mut initial = base.clone();
    for round in 0..rounds {
        let Some(log) = run_and_kill(
            &bin,
            &image,
            dir.path(),
            seed.wrapping_add(round as u64),
            round,
            queues,
            kind,
        ) else {
            if std::env::var_os("SNAPBLK_REQUIRE_QCOW2_SERVE").is_some() {
                panic!("snapblk serve cannot serve a qcow2 overlay");
            }
            eprintln!("{test}: skipped: snapblk serve does not serve qcow2 overlays yet");
            return;
        };
        let exp = expectation(&initial, &log);
        let what = format!(
            "round {round} ({queues} queue(s), {} events, {} flushes completed, seed {seed})",
            log.events.len(),
            log.flushes
        );
        if kind != Kind::Raw {
            // The crashed image as the daemon left it: consistent, maybe leaky.
            let (code, report) =
                snapblk_check(&image).unwrap_or_else(|e| panic!("{what}: snapblk check: {e}"));
            assert!(
                code == 0 || code == 3,
                "{what}: snapblk check exit {code}:\n{report}"
            );
            if qemu {
                let (qcode, text) = qemu_img_check(&image).expect("qemu-img");
                assert!(
                    qcode == 0 || qcode == 3,
                    "{what}: qemu-img check exit {qcode}:\n{text}"
                );
                assert_eq!(
                    code, qcode,
                    "{what}: snapblk check and qemu-img check disagree:\n{report}\n{text}"
                );
            }
            if let Some(cli) = snapblk_cli_check(&bin, &image) {
                assert_eq!(
                    cli, code,
                    "{what}: `snapblk check` CLI exit differs from the library's"
                );
            }
            // The engine in-process, on a copy (it repairs what the dirty bit announces).
            let copy = dir.path().join("copy.qcow2");
            fs::copy(&image, &copy).expect("copy");
            let img = qcow_snapshot::open_qcow2(&copy, false)
                .unwrap_or_else(|e| panic!("{what}: reopen: {e}"));
            let mut got = vec![0u8; DISK as usize];
            read_all(&img, &mut got).expect("read");
            exp.verify(&got)
                .unwrap_or_else(|e| panic!("{what}: engine reopen: {e}"));
            img.close().expect("close");
            drop(img);
            let (code, report) = snapblk_check(&copy).expect("check");
            assert_eq!(code, 0, "{what}: after repair and clean close:\n{report}");
        } else {
            let got = fs::read(&image).expect("read raw");
            exp.verify(&got)
                .unwrap_or_else(|e| panic!("{what}: raw file after the kill: {e}"));
        }
        // A fresh daemon serves the crashed image (repairing it) and reads back what was flushed.
        let (got, clean_exit) =
            read_through_daemon(&bin, &image, dir.path(), &format!("restart{round}"));
        exp.verify(&got)
            .unwrap_or_else(|e| panic!("{what}: read through a restarted daemon: {e}"));
        if kind != Kind::Raw && qemu {
            // After a clean exit (SIGTERM handled) the image must be clean; otherwise (the
            // daemon died of the signal) leaks are allowed, corruption never.
            let (qcode, text) = qemu_img_check(&image).expect("qemu-img");
            let allowed: &[i32] = if clean_exit { &[0] } else { &[0, 3] };
            assert!(
                allowed.contains(&qcode),
                "{what}: qemu-img check exit {qcode} after the restarted daemon stopped \
                 (clean exit: {clean_exit}):\n{text}"
            );
        }
        if !clean_exit {
            eprintln!("{test}: note: snapblk serve did not exit with status 0 on SIGTERM");
        }
        // The next round starts from what is on disk now.
        initial = got;
        println!("{test}: {what}: every flushed sector survived");
    }
}

#[test]
fn sigkill_of_the_daemon_keeps_every_flushed_write_on_a_raw_image() {
    crash_rounds(Kind::Raw, 1, 3, "sigkill_raw");
}

#[test]
fn sigkill_of_the_daemon_keeps_every_flushed_write_and_a_consistent_qcow2_overlay() {
    crash_rounds(Kind::Qcow2Overlay, 1, 3, "sigkill_qcow2");
}

#[test]
fn sigkill_of_a_daemon_writing_back_in_batches_on_io_uring_keeps_every_flushed_write() {
    crash_rounds(Kind::Qcow2OverlayDirect, 1, 3, "sigkill_qcow2_direct");
}

/// Two queues, each writing its own half of the disk and flushing on its own queue: a flush on
/// either queue must cover every write completed before it on both.
#[test]
fn sigkill_with_two_queues_keeps_writes_completed_before_any_completed_flush() {
    crash_rounds(Kind::Qcow2Overlay, 2, 2, "sigkill_qcow2_two_queues");
}

#[test]
fn expectation_from_a_client_log_allows_only_flushed_or_later_data() {
    // The oracle of the tests above must be able to fail.
    let initial = vec![1u8; 8192];
    let w = |offset, len, seed| Ev::Submit(GuestOp::Write { offset, len, seed });
    let log = ClientLog {
        events: vec![
            w(0, 4096, 3),
            Ev::WriteDone(0),
            Ev::Submit(GuestOp::Flush),
            w(4096, 512, 4),
            Ev::WriteDone(3),
            Ev::FlushDone(2),
        ],
        flushes: 1,
    };
    let exp = expectation(&initial, &log);
    let mut img = initial.clone();
    pattern(3, 0, &mut img[..4096]);
    assert!(exp.verify(&img).is_ok());
    pattern(4, 4096, &mut img[4096..4608]);
    assert!(exp.verify(&img).is_ok(), "a later write may land");
    img[..512].fill(1);
    assert!(
        exp.verify(&img).is_err(),
        "stale data where a flushed write was"
    );
    img[..512].fill(0);
    assert!(exp.verify(&img).is_err(), "zeros where a flushed write was");
}

/// Acknowledged writes that never saw a FLUSH survive a SIGKILL of the daemon on a raw image
/// after the crash journal trimmed segments of them in the background. Those trims write the
/// cache back into the host page cache without an `fdatasync` (a raw file's writes are with
/// the kernel once written back), so what they dropped from the journal must be in the image
/// file that the next daemon reads.
#[test]
fn sigkill_after_background_trims_on_a_raw_image_keeps_every_acknowledged_write() {
    sigkill_after_background_trims(false);
}

/// The same over a fresh qcow2 image: every write allocates, and a trim puts the new L2 tables
/// and L1 entries into the file in their crash-consistent order with only the syncs that order
/// needs (not a whole flush), so the next daemon must find every cluster named.
#[test]
fn sigkill_after_background_trims_on_a_fresh_qcow2_image_keeps_every_acknowledged_write() {
    sigkill_after_background_trims(true);
}

/// A new image with a crash journal beside it, for daemons started on it one after another.
struct JournaledImage {
    bin: PathBuf,
    dir: PathBuf,
    image: PathBuf,
    /// `--format` and `--crash-journal` with their values.
    args: Vec<String>,
}

impl JournaledImage {
    /// An image of `size` bytes in `dir`: a qcow2 image or a raw file, empty, or with every
    /// byte `fill` (a qcow2 image then has every cluster allocated and named in the file, as a
    /// long-used overlay's are).
    fn new(dir: &Path, size: u64, qcow2: bool, fill: Option<u8>) -> Self {
        let bin = match snapblk_tests::guest::snapblk_binary() {
            Ok(b) => b,
            Err(e) => panic!("no snapblk binary: {e}"),
        };
        let (image, format) = if qcow2 {
            let p = dir.join("disk.qcow2");
            let opts = qcow_snapshot::CreateOptions {
                size,
                ..Default::default()
            };
            qcow_snapshot::create(&p, &opts).expect("create image");
            if let Some(b) = fill {
                let img = qcow_snapshot::open_qcow2(&p, false).expect("open image");
                blockdev::BlockDev::write_at(&img, &vec![b; size as usize], 0).expect("fill");
                img.close().expect("close");
            }
            (p, "qcow2")
        } else {
            let p = dir.join("disk.raw");
            let f = fs::File::create(&p).expect("image");
            f.set_len(size).expect("image size");
            if let Some(b) = fill {
                std::os::unix::fs::FileExt::write_all_at(&f, &vec![b; size as usize], 0)
                    .expect("fill");
            }
            (p, "raw")
        };
        let journal = dir.join("disk.journal");
        let args = vec![
            "--format".to_string(),
            format.to_string(),
            "--crash-journal".to_string(),
            journal.to_str().expect("utf-8 path").to_string(),
        ];
        JournaledImage {
            bin,
            dir: dir.to_path_buf(),
            image,
            args,
        }
    }

    /// A daemon on the image, one queue, its socket and log named after `tag`.
    fn start(&self, tag: &str) -> Daemon {
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        Daemon::start(&self.bin, &self.image, &self.dir, tag, 1, &args)
    }
}

fn sigkill_after_background_trims(qcow2: bool) {
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = JournaledImage::new(dir.path(), 192 << 20, qcow2, None);
    let mut d = disk.start("a");
    let c = d.connect(1);
    // 160 MiB of 64 KiB writes (cached: below the bypass size), no FLUSH: more than the
    // journal's two 64 MiB segments, so at least one was trimmed in the background.
    let chunk = 64 << 10;
    let fill = |i: u64| -> Vec<u8> {
        (0..chunk)
            .map(|k| (i.wrapping_mul(131) ^ (k as u64 / 512)) as u8 | 1)
            .collect()
    };
    let n = (160u64 << 20) / chunk as u64;
    for i in 0..n {
        c.write(0, i * chunk as u64, &fill(i)).expect("write");
    }
    // Killed while the frontend is still connected: a disconnect first would let the daemon
    // flush (which empties the journal) before the kill, and nothing would be left to replay.
    d.kill9();
    drop(c);
    let log = d.log_text();
    drop(d);
    let d = disk.start("b");
    let c = d.connect(1);
    let mut back = vec![0u8; chunk];
    for i in 0..n {
        c.read(0, i * chunk as u64, &mut back).expect("read");
        assert!(
            back == fill(i),
            "64 KiB block {i} lost after the SIGKILL\n--- first daemon ---\n{log}\n--- second ---\n{}",
            d.log_text()
        );
    }
    let tail = c.read(0, n * chunk as u64, &mut back);
    assert!(tail.is_ok() && back.iter().all(|&b| b == 0));
    drop(c);
    let second = d.log_text();
    assert!(d.stop() == Some(0), "{second}");
    assert!(
        second.contains("replayed"),
        "the second daemon did not replay the journal: {second}"
    );
    if qcow2 && have_qemu_img() {
        let (code, text) = qemu_img_check(&disk.image).expect("qemu-img check");
        assert_eq!(code, 0, "qemu-img check after the restart: {text}");
    }
}

/// Rewrites that the stack below the crash journal persisted in place (128 KiB and more,
/// whole folios, into a raw file or into an allocated qcow2 image whose metadata is all in the
/// file) leave only a marker in the journal, not their data. After a SIGKILL, the replay must
/// put no older journaled write back over them, and must still replay what came after them
/// and the parts of older writes they did not cover. Nothing here was ever flushed.
#[test]
fn sigkill_after_rewrites_persisted_in_place_keeps_the_newest_data_on_a_raw_image() {
    sigkill_after_persisted_rewrites(false);
}

/// The same over an allocated qcow2 image.
#[test]
fn sigkill_after_rewrites_persisted_in_place_keeps_the_newest_data_on_a_qcow2_image() {
    sigkill_after_persisted_rewrites(true);
}

fn sigkill_after_persisted_rewrites(qcow2: bool) {
    let dir = tempfile::tempdir().expect("tempdir");
    let size: u64 = 16 << 20;
    let disk = JournaledImage::new(dir.path(), size, qcow2, Some(0xee));
    let mut d = disk.start("a");
    let c = d.connect(1);
    let mut shadow = vec![0xeeu8; size as usize];
    let mut write = |off: u64, len: usize, seed: u64| {
        let mut buf = vec![0u8; len];
        pattern(seed, off, &mut buf);
        c.write(0, off, &buf).expect("write");
        shadow[off as usize..off as usize + len].copy_from_slice(&buf);
    };
    // 64 KiB writes (through the folio cache, journaled with their data) over 8 MiB; 128 KiB
    // rewrites of the first 4 MiB (persisted in place: markers); then 4 KiB writes into the
    // rewritten range (journaled again, after the markers).
    for i in 0..128u64 {
        write(i * (64 << 10), 64 << 10, 1000 + i);
    }
    for i in 0..32u64 {
        write(i * (128 << 10), 128 << 10, 2000 + i);
    }
    for i in 0..16u64 {
        write(i * (256 << 10) + 8192, 4096, 3000 + i);
    }
    // Killed while the frontend is still connected (a disconnect would flush first).
    d.kill9();
    drop(c);
    let first = d.log_text();
    drop(d);
    let d = disk.start("b");
    let c = d.connect(1);
    let second = d.log_text();
    let mut back = vec![0u8; 64 << 10];
    for (i, want) in shadow.chunks(64 << 10).enumerate() {
        c.read(0, i as u64 * (64 << 10), &mut back).expect("read");
        assert!(
            back == want,
            "64 KiB block {i} is not the last write to it after the SIGKILL\n--- first daemon ---\n{first}\n--- second ---\n{second}"
        );
    }
    drop(c);
    // Replayed: the 4 MiB of 64 KiB writes that no rewrite covered and the 4 KiB writes, but
    // none of the rewritten range's older data.
    let bytes = (4u64 << 20) + 16 * 4096;
    assert!(
        second.contains(&format!("{bytes} bytes of acknowledged writes")),
        "the replay did not skip exactly the persisted range: {second}"
    );
    assert!(d.stop() == Some(0));
    if qcow2 && have_qemu_img() {
        let (code, text) = qemu_img_check(&disk.image).expect("qemu-img check");
        assert_eq!(code, 0, "qemu-img check after the restart: {text}");
    }
}
