//! Base images served over NBD (issue 16): qcow2 overlays whose backing file is an NBD URI.
//!
//! What they protect:
//! - the client ([`nbd_client::NbdDev`]): sparse regions read as zeros without data transfer
//!   (block status), sequential reads go out as few large commands (read-ahead), cold reads
//!   are in flight on several connections at once, a server that limits its clients still
//!   works, a restarted server is reconnected, a failed read is an error (never zeros), and an
//!   export that changed size is refused;
//! - the engine and the CLI: `snapblk create -b nbd+unix://... -F raw` makes an overlay
//!   qemu-img reads; an overlay qemu-img made over NBD is served by snapblk (and
//!   `serve --image URI --snapshot` too); two daemons share one NBD base with their own
//!   overlays;
//! - faults: the server killed mid-read, returning errors (nbdkit's error filter), stalled
//!   past the timeout (delay filter), unreachable at start: the affected reads fail with
//!   VIRTIO_BLK_S_IOERR, writes that need no backing data and reads of overlay data keep
//!   working, and service resumes when the server is back.
//!
//! Every test here takes seconds. Missing qemu-nbd / nbdkit / qemu-img is a failure
//! (scripts/install-deps.sh installs them). The real-guest run is in `nbd_guest.rs`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use blockdev::BlockDev;
use nbd_client::{NbdDev, NbdOptions};
use snapblk_tests::client::{Client, ClientConfig, ClientError, RequestStatus};
use snapblk_tests::guest::{
    host_tool, log_dir, md5_file, snapblk_binary, write_random_image, Daemon, DaemonConfig,
    DaemonKind, ImageFormat,
};
use snapblk_tests::nbd::{
    convert_md5, qemu_img_create_over, qemu_img_create_over_as, snapblk_create_over, NbdServer,
    ServerKind,
};

const MIB: u64 = 1 << 20;
const KIB: u64 = 1 << 10;

fn qemu_nbd() -> ServerKind {
    ServerKind::QemuNbd { shared: 0 }
}

fn nbdkit(filters: &[&str], params: &[&str]) -> ServerKind {
    ServerKind::Nbdkit {
        filters: filters.iter().map(|s| s.to_string()).collect(),
        params: params.iter().map(|s| s.to_string()).collect(),
    }
}

fn open_dev(server: &NbdServer, opts: NbdOptions) -> NbdDev {
    let uri = nbd_client::parse_uri(&server.uri()).expect("uri");
    NbdDev::open_with(&uri, opts).expect("open NBD export")
}

fn read_file(path: &Path, off: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let mut b = vec![0u8; len];
    std::fs::File::open(path)
        .unwrap()
        .read_exact_at(&mut b, off)
        .unwrap();
    b
}

/// `n` threads each read 4 KiB at `i * stride` at once and check it against `base`.
fn read_concurrently(dev: &NbdDev, base: &Path, n: u64, stride: u64) {
    std::thread::scope(|s| {
        for i in 0..n {
            s.spawn(move || {
                let mut b = vec![0u8; 4096];
                dev.read_at(&mut b, i * stride).unwrap();
                assert_eq!(b, read_file(base, i * stride, 4096));
            });
        }
    });
}

/// A temporary directory with a random `size`-byte base served by `kind` on `s.sock` in it.
fn fixture(size: u64, seed: u64, kind: ServerKind) -> (tempfile::TempDir, PathBuf, NbdServer) {
    let dir = tempfile::tempdir().unwrap();
    let base = random_base(dir.path(), size, seed);
    let server = NbdServer::start(kind, &base, &dir.path().join("s.sock"));
    (dir, base, server)
}

fn random_base(dir: &Path, size: u64, seed: u64) -> PathBuf {
    let base = dir.join("base.raw");
    write_random_image(&base, size, seed).expect("base");
    base
}

// ---------------------------------------------------------------------------------------------
// The client
// ---------------------------------------------------------------------------------------------

#[test]
fn a_sparse_nbd_base_reads_zeros_without_transferring_data() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("sparse.raw");
    let f = std::fs::File::create(&base).unwrap();
    f.set_len(64 * MIB).unwrap();
    use std::os::unix::fs::FileExt;
    f.write_all_at(&[0xa5; MIB as usize], 8 * MIB).unwrap();
    f.sync_all().unwrap();
    let server = NbdServer::start(qemu_nbd(), &base, &dir.path().join("s.sock"));
    let dev = open_dev(&server, NbdOptions::default());
    assert!(
        dev.structured_replies(),
        "qemu-nbd offers structured replies"
    );
    assert!(dev.has_block_status(), "qemu-nbd offers base:allocation");

    let mut hole = vec![0xffu8; 4 * MIB as usize];
    dev.read_at(&mut hole, 32 * MIB).unwrap();
    assert!(hole.iter().all(|&b| b == 0), "a hole must read as zeros");
    let s = dev.stats();
    assert_eq!(s.bytes_from_server, 0, "no data was read for a hole: {s:?}");
    assert_eq!(s.zero_bytes_local, 4 * MIB, "{s:?}");
    assert!(s.block_status_queries >= 1, "{s:?}");
    let ext = dev.block_status(32 * MIB, MIB).unwrap();
    assert!(
        ext[0].2 & nbd_client::ffi::LIBNBD_STATE_ZERO != 0,
        "{ext:?}"
    );

    let mut data = vec![0u8; MIB as usize];
    dev.read_at(&mut data, 8 * MIB).unwrap();
    assert!(data.iter().all(|&b| b == 0xa5), "allocated data reads back");
    assert!(dev.stats().bytes_from_server >= MIB);
}

#[test]
fn sequential_small_reads_go_out_as_few_readahead_commands() {
    let (_dir, base, server) = fixture(8 * MIB, 11, qemu_nbd());
    let dev = open_dev(&server, NbdOptions::default());
    let want = std::fs::read(&base).unwrap();
    let mut got = vec![0u8; 4 * MIB as usize];
    for (i, chunk) in got.chunks_mut(4096).enumerate() {
        dev.read_at(chunk, MIB + i as u64 * 4096).unwrap();
    }
    assert_eq!(
        got,
        want[MIB as usize..5 * MIB as usize],
        "sequential reads"
    );
    let s = dev.stats();
    assert_eq!(s.reads, 1024);
    assert!(
        s.read_commands <= 16 && s.readahead_hits >= 1000,
        "1024 sequential 4 KiB reads should be served by ~4 read-ahead windows: {s:?}"
    );
}

#[test]
fn cold_reads_are_in_flight_on_several_connections_at_once() {
    // Every read takes 400 ms at the server: four reads one after another take 1.6 s.
    let (_dir, base, server) = fixture(16 * MIB, 12, nbdkit(&["delay"], &["delay-read=400ms"]));
    let dev = open_dev(&server, NbdOptions::default());
    let t0 = Instant::now();
    read_concurrently(&dev, &base, 4, 3 * MIB);
    let took = t0.elapsed();
    assert_eq!(dev.open_connections(), 4, "{:?}", dev.stats());
    assert!(
        took < Duration::from_millis(1100),
        "4 cold reads of 400 ms each took {took:?}: they were not in flight together"
    );
}

#[test]
fn a_server_that_limits_its_clients_lowers_the_pool_and_reads_still_work() {
    // qemu-nbd's default: one client at a time; a second connection is never answered.
    let (_dir, base, server) = fixture(8 * MIB, 13, ServerKind::QemuNbd { shared: 1 });
    let dev = open_dev(&server, NbdOptions::default());
    // The pool learns the limit when reads overlap and a second connection goes unanswered;
    // on a loaded machine three threads may run one after another, so give them a few rounds.
    // (Other offsets each round: read-ahead must not answer them without the server.)
    for round in 0..20 {
        read_concurrently(&dev, &base, 3, 2 * MIB + round * 64 * 1024);
        if dev.connection_cap() == 1 {
            break;
        }
    }
    assert_eq!(dev.connection_cap(), 1, "{:?}", dev.stats());
    let mut b = vec![0u8; 4096];
    dev.read_at(&mut b, 5 * MIB).unwrap();
    assert_eq!(b, read_file(&base, 5 * MIB, 4096));
}

#[test]
fn a_killed_server_fails_reads_with_an_error_never_zeros_and_a_restarted_one_is_reconnected() {
    let (_dir, base, mut server) = fixture(8 * MIB, 14, qemu_nbd());
    let dev = open_dev(
        &server,
        NbdOptions {
            timeout: Duration::from_secs(3),
            ..NbdOptions::default()
        },
    );
    let mut b = vec![0u8; 4096];
    dev.read_at(&mut b, 0).unwrap();
    server.kill();
    let mut b = vec![0x5au8; 4096];
    let t0 = Instant::now();
    let e = dev.read_at(&mut b, MIB).unwrap_err();
    assert!(
        t0.elapsed() < Duration::from_secs(3),
        "bounded by the timeout"
    );
    assert!(matches!(e, blockdev::BlockError::Io(_)), "{e}");
    assert!(
        b.iter().all(|&x| x == 0x5a),
        "a failed read must not hand out zeros"
    );
    server.restart();
    dev.read_at(&mut b, MIB).unwrap();
    assert_eq!(b, read_file(&base, MIB, 4096));
    let s = dev.stats();
    assert!(s.connection_failures >= 1 && s.connects >= 2, "{s:?}");
}

#[test]
fn an_export_that_changed_size_is_refused_on_reconnect() {
    let (_dir, base, mut server) = fixture(8 * MIB, 15, qemu_nbd());
    let dev = open_dev(&server, NbdOptions::default());
    server.kill();
    std::fs::File::options()
        .write(true)
        .open(&base)
        .unwrap()
        .set_len(16 * MIB)
        .unwrap();
    server.restart();
    let mut b = vec![0u8; 4096];
    let e = dev.read_at(&mut b, MIB).unwrap_err().to_string();
    assert!(e.contains("size changed"), "{e}");
}

// ---------------------------------------------------------------------------------------------
// Overlays over NBD: create, serve, share
// ---------------------------------------------------------------------------------------------

fn snapblk(args: &[&str]) -> std::process::Output {
    let bin = snapblk_binary().expect("snapblk");
    Command::new(bin).args(args).output().expect("run snapblk")
}

#[test]
fn snapblk_create_over_an_nbd_base_makes_an_overlay_qemu_img_reads() {
    let (dir, base, server) = fixture(16 * MIB, 21, qemu_nbd());
    let overlay = dir.path().join("o.qcow2");
    let uri = server.uri();
    snapblk_create_over(&uri, &overlay);
    let info = host_tool("qemu-img", &["info", "-U", overlay.to_str().unwrap()]);
    assert!(info.contains(&format!("backing file: {uri}")), "{info}");
    assert!(
        info.contains("virtual size: 16 MiB"),
        "size from the server: {info}"
    );
    host_tool("qemu-img", &["check", overlay.to_str().unwrap()]);
    assert_eq!(
        convert_md5(&overlay, &dir.path().join("flat.raw")),
        md5_file(&base).unwrap()
    );
    // snapblk's own reader agrees, and `info` lists the export as the chain's raw base.
    let sum = snapblk(&["checksum", overlay.to_str().unwrap()]);
    let host = host_tool("sha256sum", &[base.to_str().unwrap()]);
    assert_eq!(
        String::from_utf8_lossy(&sum.stdout)
            .split_whitespace()
            .next(),
        host.split_whitespace().next()
    );
    let info = snapblk(&["info", overlay.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&info.stdout);
    assert!(text.contains(&format!("1: {uri} (raw)")), "{text}");
    // convert reads the whole chain into a standalone image.
    let conv = dir.path().join("conv.raw");
    let out = snapblk(&[
        "convert",
        "-O",
        "raw",
        overlay.to_str().unwrap(),
        conv.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(md5_file(&conv).unwrap(), md5_file(&base).unwrap());
    // A commit into an NBD base is refused: the base is only ever read.
    let commit = snapblk(&["commit", "-q", overlay.to_str().unwrap()]);
    assert!(!commit.status.success());
    assert!(String::from_utf8_lossy(&commit.stderr).contains("only ever read"));
}

/// Writes `len` bytes of pattern `seed` at `off` through the client and into `model`.
fn write_pattern(c: &Client, model: &mut [u8], off: u64, len: usize, seed: u8) {
    let data: Vec<u8> = (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect();
    c.write(0, off, &data).expect("write");
    model[off as usize..off as usize + len].copy_from_slice(&data);
}

fn read_all(c: &Client, size: u64) -> Vec<u8> {
    let mut out = vec![0u8; size as usize];
    for (i, chunk) in out.chunks_mut(MIB as usize).enumerate() {
        c.read(0, i as u64 * MIB, chunk).expect("read");
    }
    out
}

fn start_snapblk(image: &Path, logs: &Path, name: &str, extra: &[&str]) -> Daemon {
    let mut cfg = DaemonConfig::new(DaemonKind::Snapblk, image)
        .format(ImageFormat::Qcow2)
        .num_queues(1);
    for a in extra {
        cfg = cfg.arg(a);
    }
    Daemon::start(&cfg, logs, name).unwrap_or_else(|e| panic!("{e}"))
}

fn connect(d: &Daemon) -> Client {
    let mut cfg = ClientConfig::new(1);
    cfg.timeout = Duration::from_secs(20);
    Client::connect_retry(d.socket(), &cfg, Duration::from_secs(10)).expect("connect")
}

#[test]
fn an_overlay_qemu_img_made_over_nbd_is_served_by_snapblk_and_the_base_is_only_read() {
    let size = 16 * MIB;
    let (dir, base, server) = fixture(size, 22, qemu_nbd());
    let logs = log_dir("an_overlay_qemu_img_made_over_nbd_is_served_by_snapblk").unwrap();
    let base_md5 = md5_file(&base).unwrap();
    let overlay = dir.path().join("o.qcow2");
    qemu_img_create_over(&server.uri(), &overlay);
    let daemon = start_snapblk(&overlay, &logs, "daemon", &[]);
    let c = connect(&daemon);
    let mut model = std::fs::read(&base).unwrap();
    assert_eq!(read_all(&c, size), model, "the served disk is the base");
    write_pattern(&c, &mut model, 4096, 512, 1); // partial cluster: COW from the NBD base
    write_pattern(&c, &mut model, 3 * MIB + 60 * KIB, 8 * KIB as usize, 2); // straddles clusters
    write_pattern(&c, &mut model, 8 * MIB, MIB as usize, 3);
    c.flush(0).unwrap();
    assert_eq!(read_all(&c, size), model);
    drop(c);
    daemon.terminate(Duration::from_secs(30)).unwrap();
    host_tool("qemu-img", &["check", overlay.to_str().unwrap()]);
    let flat = dir.path().join("flat.raw");
    convert_md5(&overlay, &flat);
    assert!(
        std::fs::read(&flat).unwrap() == model,
        "qemu-img's view of the overlay"
    );
    assert_eq!(
        md5_file(&base).unwrap(),
        base_md5,
        "the NBD base was written"
    );

    // `serve --image URI --snapshot`: a throwaway overlay over the export.
    let snap = start_snapblk(Path::new(&server.uri()), &logs, "snapshot", &["--snapshot"]);
    let c = connect(&snap);
    assert_eq!(read_all(&c, size), std::fs::read(&base).unwrap());
    c.write(0, 0, &[7u8; 4096]).unwrap();
    c.flush(0).unwrap();
    drop(c);
    snap.terminate(Duration::from_secs(30)).unwrap();
    assert_eq!(
        md5_file(&base).unwrap(),
        base_md5,
        "the NBD base was written"
    );
}

#[test]
fn two_daemons_share_one_nbd_base_with_their_own_overlays() {
    let size = 8 * MIB;
    let (dir, base, server) = fixture(size, 23, nbdkit(&[], &[]));
    let logs = log_dir("two_daemons_share_one_nbd_base_with_their_own_overlays").unwrap();
    let base_md5 = md5_file(&base).unwrap();
    let (oa, ob) = (dir.path().join("a.qcow2"), dir.path().join("b.qcow2"));
    qemu_img_create_over(&server.uri(), &oa);
    snapblk_create_over(&server.uri(), &ob);
    let da = start_snapblk(&oa, &logs, "a", &[]);
    let db = start_snapblk(&ob, &logs, "b", &[]);
    let (ca, cb) = (connect(&da), connect(&db));
    let mut ma = std::fs::read(&base).unwrap();
    let mut mb = ma.clone();
    // Interleaved: same offsets, different data; each daemon sees only its own writes.
    for i in 0..8u64 {
        write_pattern(&ca, &mut ma, i * MIB + 512 * i, 4096, 0x10 + i as u8);
        write_pattern(&cb, &mut mb, i * MIB + 512 * i, 4096, 0x80 + i as u8);
    }
    ca.flush(0).unwrap();
    cb.flush(0).unwrap();
    assert_eq!(read_all(&ca, size), ma);
    assert_eq!(read_all(&cb, size), mb);
    drop((ca, cb));
    da.terminate(Duration::from_secs(30)).unwrap();
    db.terminate(Duration::from_secs(30)).unwrap();
    for (o, m) in [(&oa, &ma), (&ob, &mb)] {
        let flat = o.with_extension("raw");
        convert_md5(o, &flat);
        assert!(std::fs::read(&flat).unwrap() == *m, "{}", o.display());
    }
    assert_eq!(md5_file(&base).unwrap(), base_md5);
}

// ---------------------------------------------------------------------------------------------
// Faults
// ---------------------------------------------------------------------------------------------

fn assert_ioerr(r: Result<(), ClientError>, what: &str) {
    match r {
        Err(ClientError::Request {
            status: RequestStatus::IoErr,
            ..
        }) => {}
        other => panic!("{what}: expected VIRTIO_BLK_S_IOERR, got {other:?}"),
    }
}

#[test]
fn nbd_server_killed_mid_read_fails_only_the_affected_reads_and_service_resumes() {
    let size = 16 * MIB;
    let (dir, base, mut server) = fixture(size, 31, nbdkit(&["delay"], &["delay-read=700ms"]));
    let logs = log_dir("nbd_server_killed_mid_read").unwrap();
    let overlay = dir.path().join("o.qcow2");
    qemu_img_create_over(&server.uri(), &overlay);
    let daemon = start_snapblk(&overlay, &logs, "daemon", &["--nbd-timeout", "5"]);
    let c = connect(&daemon);
    // Overlay data written while the server is up.
    c.write(0, 4 * MIB, &[0x42; 64 * KIB as usize]).unwrap();
    c.flush(0).unwrap();

    std::thread::scope(|s| {
        let reader = s.spawn(|| {
            let mut b = vec![0x5au8; 4096];
            let r = c.read(0, 9 * MIB, &mut b);
            (r, b)
        });
        std::thread::sleep(Duration::from_millis(250));
        server.kill();
        let (r, b) = reader.join().unwrap();
        assert_ioerr(r, "read in flight when the server died");
        drop(b);
    });
    // Server down: base reads fail, overlay reads and writes that need no base data work.
    let mut b = vec![0u8; 4096];
    assert_ioerr(
        c.read(0, 12 * MIB, &mut b),
        "base read with the server down",
    );
    c.read(0, 4 * MIB, &mut b).unwrap();
    assert_eq!(b, vec![0x42; 4096], "overlay data while the server is down");
    c.write(0, 6 * MIB, &[0x43; 64 * KIB as usize]).unwrap(); // a whole cluster: no COW
    c.flush(0).unwrap();
    let mut w = vec![0u8; 64 * KIB as usize];
    c.read(0, 6 * MIB, &mut w).unwrap();
    assert!(w.iter().all(|&x| x == 0x43));
    // A partial-cluster write needs base data for its cluster: it is accepted by the cache,
    // but the flush that would make it durable fails while the base is unreachable.
    c.write(0, 7 * MIB + 4096, &[0x44; 4096]).unwrap();
    assert_ioerr(
        c.flush(0),
        "flush of a write whose cluster needs the unreachable base",
    );
    // Back: the same reads succeed with the base's bytes.
    server.restart();
    c.read(0, 9 * MIB, &mut b).unwrap();
    assert_eq!(b, read_file(&base, 9 * MIB, 4096));
    c.read(0, 12 * MIB, &mut b).unwrap();
    assert_eq!(b, read_file(&base, 12 * MIB, 4096));
    // The write kept in the cache becomes durable at the next flush, its cluster filled from
    // the base.
    c.flush(0).unwrap();
    let mut cl = vec![0u8; 64 * KIB as usize];
    c.read(0, 7 * MIB, &mut cl).unwrap();
    let mut want = read_file(&base, 7 * MIB, 64 * KIB as usize);
    want[4096..8192].fill(0x44);
    assert!(cl == want, "the partial write over its base cluster");
    drop(c);
    daemon.terminate(Duration::from_secs(30)).unwrap();
    host_tool("qemu-img", &["check", overlay.to_str().unwrap()]);
    let flat = dir.path().join("flat.raw");
    convert_md5(&overlay, &flat);
    assert!(
        read_file(&flat, 7 * MIB, 64 * KIB as usize) == want,
        "durable in the overlay"
    );
}

#[test]
fn nbd_server_errors_fail_the_affected_reads_with_ioerr_and_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let logs = log_dir("nbd_server_errors_fail_the_affected_reads").unwrap();
    let size = 16 * MIB;
    let base = random_base(dir.path(), size, 32);
    let trigger = dir.path().join("fail-reads");
    let server = NbdServer::start(
        nbdkit(
            &["error"],
            &[
                "error-pread=EIO",
                "error-pread-rate=100%",
                &format!("error-pread-file={}", trigger.display()),
            ],
        ),
        &base,
        &dir.path().join("s.sock"),
    );
    let overlay = dir.path().join("o.qcow2");
    qemu_img_create_over(&server.uri(), &overlay);
    let daemon = start_snapblk(&overlay, &logs, "daemon", &["--nbd-timeout", "5"]);
    let c = connect(&daemon);
    let mut b = vec![0u8; 4096];
    c.read(0, MIB, &mut b).unwrap();
    assert_eq!(b, read_file(&base, MIB, 4096));
    c.write(0, 2 * MIB, &[0x61; 64 * KIB as usize]).unwrap();
    std::fs::write(&trigger, b"").unwrap();
    for off in [5 * MIB, 7 * MIB + 4096, 15 * MIB] {
        assert_ioerr(
            c.read(0, off, &mut b),
            "base read while the server fails reads",
        );
    }
    // Cached base data, overlay data and whole-cluster writes are unaffected.
    c.read(0, MIB, &mut b).unwrap();
    assert_eq!(b, read_file(&base, MIB, 4096));
    c.read(0, 2 * MIB, &mut b).unwrap();
    assert_eq!(b, vec![0x61; 4096]);
    c.write(0, 10 * MIB, &[0x62; 64 * KIB as usize]).unwrap();
    c.flush(0).unwrap();
    std::fs::remove_file(&trigger).unwrap();
    c.read(0, 5 * MIB, &mut b).unwrap();
    assert_eq!(b, read_file(&base, 5 * MIB, 4096));
    drop(c);
    daemon.terminate(Duration::from_secs(30)).unwrap();
    assert!(daemon_log_ok(&logs.join("daemon.log")));
}

fn daemon_log_ok(log: &Path) -> bool {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    !text.contains("panicked")
}

#[test]
fn a_stalled_nbd_server_gives_ioerr_within_the_timeout_not_a_hang() {
    let (dir, _base, server) = fixture(8 * MIB, 33, nbdkit(&["delay"], &["delay-read=20"]));
    let logs = log_dir("a_stalled_nbd_server_gives_ioerr").unwrap();
    let overlay = dir.path().join("o.qcow2");
    qemu_img_create_over(&server.uri(), &overlay);
    let daemon = start_snapblk(&overlay, &logs, "daemon", &["--nbd-timeout", "1"]);
    let c = connect(&daemon);
    c.write(0, 0, &[0x33; 64 * KIB as usize]).unwrap();
    let mut b = vec![0u8; 4096];
    let t0 = Instant::now();
    assert_ioerr(c.read(0, 3 * MIB, &mut b), "read from a stalled server");
    let took = t0.elapsed();
    assert!(
        took < Duration::from_secs(4),
        "bounded by --nbd-timeout 1: {took:?}"
    );
    c.read(0, 0, &mut b).unwrap();
    assert_eq!(
        b,
        vec![0x33; 4096],
        "overlay data is not behind the stalled base"
    );
    drop(c);
    daemon.terminate(Duration::from_secs(30)).unwrap();
}

#[test]
fn an_unreachable_nbd_server_at_start_is_one_line_naming_the_export() {
    let dir = tempfile::tempdir().unwrap();
    let base = random_base(dir.path(), 4 * MIB, 34);
    let sock = dir.path().join("s.sock");
    let uri;
    {
        let server = NbdServer::start(qemu_nbd(), &base, &sock);
        uri = server.uri();
        let overlay = dir.path().join("o.qcow2");
        qemu_img_create_over(&uri, &overlay);
    }
    std::fs::remove_file(&sock).ok();
    let overlay = dir.path().join("o.qcow2");
    let t0 = Instant::now();
    let out = snapblk(&[
        "serve",
        "--image",
        overlay.to_str().unwrap(),
        "--socket",
        dir.path().join("vu.sock").to_str().unwrap(),
        "--nbd-timeout",
        "2",
    ]);
    assert!(!out.status.success());
    assert!(t0.elapsed() < Duration::from_secs(10));
    let err = String::from_utf8_lossy(&out.stderr);
    let last = err.lines().last().unwrap_or_default();
    assert!(last.contains(&uri), "one line naming the export: {err}");
    // `info` needs no connection.
    let info = snapblk(&["info", overlay.to_str().unwrap()]);
    assert!(info.status.success());
    // And a confined chain refuses an NBD socket outside its trees.
    let other = tempfile::tempdir().unwrap();
    let server = NbdServer::start(qemu_nbd(), &base, &sock);
    let out = snapblk(&[
        "serve",
        "--image",
        overlay.to_str().unwrap(),
        "--socket",
        dir.path().join("vu.sock").to_str().unwrap(),
        "--allow-backing",
        other.path().to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("outside the --allow-backing"), "{err}");
    drop(server);
}

#[test]
fn a_qcow2_image_on_an_nbd_export_is_read_when_the_overlay_records_qcow2() {
    let dir = tempfile::tempdir().unwrap();
    let raw = random_base(dir.path(), 8 * MIB, 35);
    let q = dir.path().join("base.qcow2");
    host_tool(
        "qemu-img",
        &[
            "convert",
            "-O",
            "qcow2",
            raw.to_str().unwrap(),
            q.to_str().unwrap(),
        ],
    );
    // qemu-nbd exports the qcow2 file's bytes (-f raw); the overlay says they are qcow2.
    let server = NbdServer::start(qemu_nbd(), &q, &dir.path().join("s.sock"));
    let overlay = dir.path().join("o.qcow2");
    qemu_img_create_over_as(&server.uri(), "qcow2", &overlay);
    let sum = snapblk(&["checksum", overlay.to_str().unwrap()]);
    assert!(
        sum.status.success(),
        "{}",
        String::from_utf8_lossy(&sum.stderr)
    );
    let host = host_tool("sha256sum", &[raw.to_str().unwrap()]);
    assert_eq!(
        String::from_utf8_lossy(&sum.stdout)
            .split_whitespace()
            .next(),
        host.split_whitespace().next(),
        "the guest-visible disk of a qcow2 base read over NBD"
    );
}

/// Deterministic interleaving over the two places where the pool lock is released around I/O
/// (`NbdDev::set_io_hook`): right after a command on a checked-out connection, a second read
/// runs and has to open a new connection; right after that connection's handshake, the server
/// restarts (killing both connections). Every read still returns the base's bytes (the read on
/// the just-opened dead connection retries on a fresh one, the later read that takes the dead
/// connection returned to the pool retries too), and the pool's count stays exact.
#[test]
fn reads_survive_a_server_restart_exactly_while_the_pool_lock_is_released_around_io() {
    use nbd_client::IoPoint;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex, Weak};

    let (_dir, base, server) = fixture(8 * MIB, 41, qemu_nbd());
    let server = Arc::new(Mutex::new(server));
    let dev = Arc::new(open_dev(
        &server.lock().unwrap(),
        NbdOptions {
            connections: 2,
            readahead: 0,
            timeout: Duration::from_secs(5),
        },
    ));
    let step = Arc::new(AtomicUsize::new(0));
    let weak: Weak<NbdDev> = Arc::downgrade(&dev);
    let (srv, st, b2) = (server.clone(), step.clone(), base.clone());
    dev.set_io_hook(Some(Arc::new(move |at: IoPoint| {
        match (at, st.load(Ordering::SeqCst)) {
            // After the first read's command, with its connection checked out: a second read.
            (IoPoint::Command, 0) => {
                st.store(1, Ordering::SeqCst);
                let dev = weak.upgrade().unwrap();
                let mut b = vec![0u8; 4096];
                dev.read_at(&mut b, 5 * MIB).unwrap();
                assert_eq!(b, read_file(&b2, 5 * MIB, 4096), "the second read");
            }
            // That read opened a connection; right after its handshake the server restarts.
            (IoPoint::Connected, 1) => {
                st.store(2, Ordering::SeqCst);
                srv.lock().unwrap().restart();
            }
            _ => {}
        }
    })));
    let mut b = vec![0u8; 4096];
    dev.read_at(&mut b, MIB).unwrap();
    assert_eq!(b, read_file(&base, MIB, 4096), "the first read");
    assert_eq!(step.load(Ordering::SeqCst), 2, "both racing operations ran");
    dev.set_io_hook(None);
    // The first read's connection went back to the pool dead; this read finds out and retries.
    dev.read_at(&mut b, 3 * MIB).unwrap();
    assert_eq!(
        b,
        read_file(&base, 3 * MIB, 4096),
        "the read after the restart"
    );
    let s = dev.stats();
    assert_eq!(s.connection_failures, 2, "the two dead connections: {s:?}");
    assert_eq!(
        dev.open_connections(),
        1,
        "the pool counts only live connections: {s:?}"
    );
}
