//! A hostile vhost-user frontend against `target/release/snapblk serve`.
//!
//! The test speaks raw vhost-user over a `UnixStream` (header: request u32, flags u32, size u32,
//! then the payload; file descriptors ride along as SCM_RIGHTS) and sends what a buggy or
//! malicious frontend could: bogus memory tables (no region, overlapping regions, a region
//! larger than its file, too many regions, fewer fds than regions), ring addresses outside guest
//! memory, invalid ring sizes, a kick before any memory, GET_CONFIG with huge sizes and offsets,
//! messages out of order, truncated and oversized messages, unknown request codes and a flood of
//! file descriptors. After every scenario the daemon process must still be running and a fresh,
//! well-behaved connection (the blkio client) must still write and read back data. The socket
//! file must be created owner-only (0600) by default.
//!
//! A missing daemon binary skips the test with a message (`SNAPBLK_REQUIRE_DAEMONS=1` makes it a
//! failure); `SNAPBLK_BIN` overrides the binary path.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use snapblk_tests::client::{Client, ClientConfig};

const MIB: u64 = 1 << 20;
const DISK_SIZE: u64 = 16 * MIB;
/// How long the daemon may take to accept a connection after the previous one ended.
const CONNECT_WAIT: Duration = Duration::from_secs(15);
/// How long the good client may take to connect, write and read after a scenario.
const GOOD_CLIENT_WAIT: Duration = Duration::from_secs(20);
/// How long a reply may take.
const REPLY_WAIT: Duration = Duration::from_secs(2);

// vhost-user request codes (frontend to backend).
const GET_FEATURES: u32 = 1;
const SET_FEATURES: u32 = 2;
const SET_OWNER: u32 = 3;
const SET_MEM_TABLE: u32 = 5;
const SET_VRING_NUM: u32 = 8;
const SET_VRING_ADDR: u32 = 9;
const SET_VRING_BASE: u32 = 10;
const GET_VRING_BASE: u32 = 11;
const SET_VRING_KICK: u32 = 12;
const SET_VRING_CALL: u32 = 13;
const GET_PROTOCOL_FEATURES: u32 = 15;
const SET_PROTOCOL_FEATURES: u32 = 16;
const SET_VRING_ENABLE: u32 = 18;
const GET_CONFIG: u32 = 24;
const SET_CONFIG: u32 = 25;
const ADD_MEM_REG: u32 = 37;
const REM_MEM_REG: u32 = 38;

/// Header flag: protocol version 1.
const VERSION_1: u32 = 1;
/// Header flag: the frontend wants a REPLY_ACK.
const NEED_REPLY: u32 = 1 << 3;
/// Feature bit: vhost-user protocol features.
const F_PROTOCOL_FEATURES: u64 = 1 << 30;
/// Protocol feature: GET_CONFIG/SET_CONFIG.
const PF_CONFIG: u64 = 1 << 9;
/// Protocol feature: REPLY_ACK.
const PF_REPLY_ACK: u64 = 1 << 3;
/// Protocol feature: ADD_MEM_REG/REM_MEM_REG.
const PF_CONFIGURE_MEM_SLOTS: u64 = 1 << 15;
/// Ring index bit of SET_VRING_KICK/CALL: no fd attached.
const VRING_NOFD: u64 = 1 << 8;
/// Frontend virtual address where the test pretends guest memory lives.
const UADDR: u64 = 0x7f00_0000_0000;

/// `snapblk serve` on a fresh raw image; killed on drop.
struct Daemon {
    child: Child,
    socket: PathBuf,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Daemon {
    fn start() -> Option<Daemon> {
        let bin = snapblk_tests::guest::snapblk_binary().unwrap_or_default();
        if !bin.is_file() {
            snapblk_tests::client::daemon_missing(&format!(
                "snapblk binary not available ({}); skipping",
                bin.display()
            ));
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("disk.raw");
        let socket = dir.path().join("vhost.sock");
        let log = dir.path().join("daemon.log");
        File::create(&image).unwrap().set_len(DISK_SIZE).unwrap();
        let log_file = File::create(&log).unwrap();
        let child = Command::new(bin)
            .arg("serve")
            .arg("--image")
            .arg(&image)
            .arg("--socket")
            .arg(&socket)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().unwrap())
            .stderr(log_file)
            .spawn()
            .unwrap();
        let d = Daemon {
            child,
            socket,
            log,
            _dir: dir,
        };
        let deadline = Instant::now() + CONNECT_WAIT;
        while !d.socket.exists() {
            d.assert_alive("starting");
            assert!(Instant::now() < deadline, "socket never appeared");
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(d)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Panics (with the daemon's log) if the daemon exited.
    fn assert_alive(&self, after: &str) {
        // `try_wait` needs `&mut`; poll the pid instead so `&self` suffices.
        let pid = libc::pid_t::try_from(self.child.id()).expect("a pid fits pid_t");
        let mut status = 0;
        // SAFETY: waitpid on our own child with WNOHANG only reads its state into `status`.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if r == pid {
            let how = if libc::WIFSIGNALED(status) {
                format!("killed by signal {}", libc::WTERMSIG(status))
            } else {
                format!("exited with status {}", libc::WEXITSTATUS(status))
            };
            panic!(
                "daemon died after {after}: {how}\n--- daemon log ---\n{}",
                self.log()
            );
        }
    }

    /// A raw connection, retrying while the daemon is still busy with the previous one.
    fn raw(&self) -> Frontend {
        let deadline = Instant::now() + CONNECT_WAIT;
        loop {
            match UnixStream::connect(&self.socket) {
                Ok(s) => {
                    s.set_read_timeout(Some(REPLY_WAIT)).unwrap();
                    s.set_write_timeout(Some(REPLY_WAIT)).unwrap();
                    return Frontend { sock: s };
                }
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => panic!("cannot connect to {}: {e}", self.socket.display()),
            }
        }
    }

    /// After a hostile scenario: the daemon is alive and a good client can write and read.
    fn assert_serves(&self, after: &str, round: u64) {
        // Give a crash caused by the last message a moment to happen.
        std::thread::sleep(Duration::from_millis(50));
        self.assert_alive(after);
        // The client runs on its own thread: a daemon that stopped serving (for example one
        // stuck joining a queue thread) must fail the test, not hang it.
        let socket = self.socket.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(good_client_round_trip(&socket, round));
        });
        match rx.recv_timeout(GOOD_CLIENT_WAIT) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                self.assert_alive(after);
                panic!(
                    "good client after {after}: {e}\n--- daemon log ---\n{}",
                    self.log()
                );
            }
            Err(_) => {
                self.assert_alive(after);
                panic!(
                    "good client got no service within {GOOD_CLIENT_WAIT:?} after {after}: the \
                     daemon is alive but no longer serves\n--- daemon log ---\n{}",
                    self.log()
                );
            }
        }
        self.assert_alive(after);
    }
}

/// Connects with the blkio client, writes 8 KiB and reads it back.
fn good_client_round_trip(socket: &Path, round: u64) -> Result<(), String> {
    let mut cfg = ClientConfig::new(1);
    cfg.slots_per_queue = 2;
    cfg.slot_size = 64 << 10;
    cfg.timeout = Duration::from_secs(10);
    let c =
        Client::connect_retry(socket, &cfg, CONNECT_WAIT).map_err(|e| format!("connect: {e}"))?;
    if c.capacity() != DISK_SIZE {
        return Err(format!("capacity {} instead of {DISK_SIZE}", c.capacity()));
    }
    let data: Vec<u8> = (0..8192u64)
        .map(|i| (i.wrapping_mul(31) ^ round) as u8)
        .collect();
    let off = (round % 64) * 65536;
    c.write(0, off, &data).map_err(|e| format!("write: {e}"))?;
    let mut back = vec![0u8; data.len()];
    c.read(0, off, &mut back)
        .map_err(|e| format!("read: {e}"))?;
    if back != data {
        return Err("data read back differs from data written".into());
    }
    Ok(())
}

/// One raw vhost-user connection.
struct Frontend {
    sock: UnixStream,
}

fn le_u64s(vals: &[u64]) -> Vec<u8> {
    vals.iter().flat_map(|v| v.to_le_bytes()).collect()
}

impl Frontend {
    /// Sends a message with an explicit header size field (may disagree with `payload`).
    fn send_sized(
        &self,
        req: u32,
        flags: u32,
        size: u32,
        payload: &[u8],
        fds: &[RawFd],
    ) -> io::Result<()> {
        let mut msg = Vec::with_capacity(12 + payload.len());
        msg.extend_from_slice(&req.to_le_bytes());
        msg.extend_from_slice(&flags.to_le_bytes());
        msg.extend_from_slice(&size.to_le_bytes());
        msg.extend_from_slice(payload);
        send_with_fds(&self.sock, &msg, fds)
    }

    fn send(&self, req: u32, payload: &[u8], fds: &[RawFd]) -> io::Result<()> {
        self.send_sized(req, VERSION_1, payload.len() as u32, payload, fds)
    }

    /// Reads one reply; `None` on timeout or a closed connection.
    fn reply(&mut self) -> Option<(u32, Vec<u8>)> {
        let mut hdr = [0u8; 12];
        self.sock.read_exact(&mut hdr).ok()?;
        let req = u32::from_le_bytes(hdr[0..4].try_into().unwrap());
        let size = u32::from_le_bytes(hdr[8..12].try_into().unwrap()) as usize;
        if size > 0x1000 {
            return None;
        }
        let mut body = vec![0u8; size];
        self.sock.read_exact(&mut body).ok()?;
        Some((req, body))
    }

    /// Sends a GET-type request and returns the u64 answer, if any.
    fn get_u64(&mut self, req: u32) -> Option<u64> {
        self.send(req, &[], &[]).ok()?;
        let (r, body) = self.reply()?;
        if r != req || body.len() != 8 {
            return None;
        }
        Some(u64::from_le_bytes(body[..8].try_into().unwrap()))
    }

    /// SET_OWNER, then feature negotiation (with or without protocol features).
    fn handshake(&mut self, protocol: u64) -> Option<u64> {
        self.send(SET_OWNER, &[], &[]).ok()?;
        let features = self.get_u64(GET_FEATURES)?;
        let mut acked = features;
        if protocol == 0 {
            acked &= !F_PROTOCOL_FEATURES;
        }
        self.send(SET_FEATURES, &acked.to_le_bytes(), &[]).ok()?;
        if protocol != 0 && features & F_PROTOCOL_FEATURES != 0 {
            let offered = self.get_u64(GET_PROTOCOL_FEATURES)?;
            self.send(
                SET_PROTOCOL_FEATURES,
                &(offered & protocol).to_le_bytes(),
                &[],
            )
            .ok()?;
        }
        Some(acked)
    }

    fn mem_table(&self, regions: &[[u64; 4]], fds: &[RawFd]) -> io::Result<()> {
        let mut p = Vec::new();
        p.extend_from_slice(&(regions.len() as u32).to_le_bytes());
        p.extend_from_slice(&0u32.to_le_bytes());
        for r in regions {
            p.extend_from_slice(&le_u64s(r));
        }
        self.send(SET_MEM_TABLE, &p, fds)
    }

    fn vring_state(&self, req: u32, index: u32, num: u32) -> io::Result<()> {
        let mut p = index.to_le_bytes().to_vec();
        p.extend_from_slice(&num.to_le_bytes());
        self.send(req, &p, &[])
    }

    fn vring_addr(&self, index: u32, desc: u64, used: u64, avail: u64) -> io::Result<()> {
        let mut p = index.to_le_bytes().to_vec();
        p.extend_from_slice(&0u32.to_le_bytes());
        p.extend_from_slice(&le_u64s(&[desc, used, avail, 0]));
        self.send(SET_VRING_ADDR, &p, &[])
    }

    fn vring_fd(&self, req: u32, index: u64, fd: Option<RawFd>) -> io::Result<()> {
        match fd {
            Some(fd) => self.send(req, &index.to_le_bytes(), &[fd]),
            None => self.send(req, &(index | VRING_NOFD).to_le_bytes(), &[]),
        }
    }

    fn config(&self, req: u32, offset: u32, size: u32, payload_len: usize) -> io::Result<()> {
        let mut p = offset.to_le_bytes().to_vec();
        p.extend_from_slice(&size.to_le_bytes());
        p.extend_from_slice(&0u32.to_le_bytes());
        p.resize(12 + payload_len, 0);
        self.send(req, &p, &[])
    }
}

/// `sendmsg` of `msg` with `fds` as SCM_RIGHTS.
fn send_with_fds(sock: &UnixStream, msg: &[u8], fds: &[RawFd]) -> io::Result<()> {
    if fds.is_empty() {
        return (&*sock).write_all(msg);
    }
    let fd_bytes = std::mem::size_of_val(fds);
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(fd_bytes as u32) } as usize;
    let mut cbuf = vec![0u64; space.div_ceil(8)];
    let mut iov = libc::iovec {
        iov_base: msg.as_ptr() as *mut libc::c_void,
        iov_len: msg.len(),
    };
    // SAFETY: an all-zero msghdr is a valid empty header; the fields are set below.
    let mut mh: libc::msghdr = unsafe { std::mem::zeroed() };
    mh.msg_iov = &mut iov;
    mh.msg_iovlen = 1;
    mh.msg_control = cbuf.as_mut_ptr() as *mut libc::c_void;
    mh.msg_controllen = space as _;
    // SAFETY: `mh` points at `cbuf`, which is CMSG_SPACE(fd_bytes) bytes long, so the first
    // header and its data (fd_bytes) fit; the copy writes exactly fd_bytes bytes.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&mh);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(fd_bytes as u32) as _;
        std::ptr::copy_nonoverlapping(fds.as_ptr() as *const u8, libc::CMSG_DATA(cmsg), fd_bytes);
    }
    // SAFETY: `mh` and everything it points to live across the call.
    let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &mh, libc::MSG_NOSIGNAL) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    if (n as usize) < msg.len() {
        (&*sock).write_all(&msg[n as usize..])?;
    }
    Ok(())
}

/// A memfd of `len` bytes.
fn memfd(len: u64) -> OwnedFd {
    // SAFETY: memfd_create with a valid NUL-terminated name; the result is checked.
    let fd = unsafe { libc::memfd_create(c"snapblk-hostile".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", io::Error::last_os_error());
    // SAFETY: `fd` is a fresh descriptor we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    File::from(fd.try_clone().unwrap()).set_len(len).unwrap();
    fd
}

/// An eventfd.
fn eventfd() -> OwnedFd {
    // SAFETY: plain eventfd creation; the result is checked.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    assert!(fd >= 0, "eventfd: {}", io::Error::last_os_error());
    // SAFETY: `fd` is a fresh descriptor we own.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

fn kick(fd: &OwnedFd) {
    let one = 1u64.to_ne_bytes();
    // SAFETY: writes 8 bytes from a live buffer to an eventfd we own.
    let _ = unsafe { libc::write(fd.as_raw_fd(), one.as_ptr() as *const libc::c_void, 8) };
}

/// Sets up queue 0 of `size` entries at frontend addresses `desc/avail/used`, then kicks it.
fn start_queue(f: &Frontend, size: u32, desc: u64, avail: u64, used: u64) -> (OwnedFd, OwnedFd) {
    let _ = f.vring_state(SET_VRING_NUM, 0, size);
    let _ = f.vring_state(SET_VRING_BASE, 0, 0);
    let _ = f.vring_addr(0, desc, used, avail);
    let call = eventfd();
    let kickfd = eventfd();
    let _ = f.vring_fd(SET_VRING_CALL, 0, Some(call.as_raw_fd()));
    let _ = f.vring_fd(SET_VRING_KICK, 0, Some(kickfd.as_raw_fd()));
    let _ = f.vring_state(SET_VRING_ENABLE, 0, 1);
    kick(&kickfd);
    (call, kickfd)
}

/// Gives the daemon time to act on what was sent, then closes the connection.
fn settle(f: Frontend) {
    std::thread::sleep(Duration::from_millis(100));
    drop(f);
}

#[test]
fn socket_is_created_owner_only_by_default() {
    let Some(d) = Daemon::start() else {
        return;
    };
    let mode = std::fs::metadata(&d.socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "socket mode is {mode:o}, expected 600");
}

#[test]
fn malformed_and_out_of_order_messages_leave_the_daemon_serving() {
    let Some(d) = Daemon::start() else {
        return;
    };
    let started = Instant::now();
    let mem = memfd(MIB);
    let small = memfd(4096);

    let mut round = 0u64;
    let mut check = |name: &str| {
        round += 1;
        d.assert_serves(name, round);
        eprintln!("hostile frontend: daemon survived {name}");
    };
    check("nothing (baseline)");

    // Unknown request codes, with and without NEED_REPLY, before and after SET_OWNER.
    let f = d.raw();
    for req in [0u32, 99, 0x7fff, u32::MAX] {
        let _ = f.send_sized(req, VERSION_1 | NEED_REPLY, 8, &[0xab; 8], &[]);
    }
    let _ = f.send(SET_OWNER, &[], &[]);
    let _ = f.send(200, &[1, 2, 3], &[]);
    settle(f);
    check("unknown request codes");

    // Bad header flags (version 0, reply bit set by the frontend).
    let f = d.raw();
    let _ = f.send_sized(GET_FEATURES, 0, 0, &[], &[]);
    settle(f);
    let f = d.raw();
    let _ = f.send_sized(GET_FEATURES, VERSION_1 | 4, 0, &[], &[]);
    settle(f);
    check("bad header flags");

    // Truncated messages: a partial header; a payload shorter than announced.
    let f = d.raw();
    let _ = (&f.sock).write_all(&[3, 0, 0, 0, 1, 0]);
    settle(f);
    let f = d.raw();
    let _ = f.send_sized(SET_FEATURES, VERSION_1, 8, &[1, 2, 3], &[]);
    settle(f);
    let f = d.raw();
    let _ = f.send_sized(SET_MEM_TABLE, VERSION_1, 40, &[1, 0, 0, 0, 0, 0, 0, 0], &[]);
    settle(f);
    check("truncated messages");

    // Oversized and undersized payloads for fixed-size requests.
    let f = d.raw();
    let _ = f.send_sized(SET_OWNER, VERSION_1, 0x10_0000, &[0; 64], &[]);
    settle(f);
    let f = d.raw();
    let _ = f.send(SET_OWNER, &[], &[]);
    let _ = f.send(SET_FEATURES, &[0xff; 16], &[]);
    let _ = f.send(SET_VRING_NUM, &[1, 0, 0, 0], &[]);
    let _ = f.send(SET_VRING_ADDR, &[0; 8], &[]);
    settle(f);
    check("wrongly sized payloads");

    // Out of order: ring setup before SET_OWNER / SET_FEATURES / any memory table.
    let f = d.raw();
    let _ = f.vring_addr(0, 0x1000, 0x2000, 0x3000);
    let _ = f.vring_state(SET_VRING_NUM, 0, 16);
    let _ = f.send(SET_FEATURES, &u64::MAX.to_le_bytes(), &[]);
    settle(f);
    check("vring setup before SET_OWNER");

    // SET_VRING_KICK (and a kick) before any memory table.
    let mut f = d.raw();
    f.handshake(0);
    let (_call, _kick) = start_queue(&f, 16, UADDR, UADDR + 0x1000, UADDR + 0x2000);
    settle(f);
    check("kick before memory");

    // Features: everything set, then protocol features: everything set.
    let mut f = d.raw();
    let _ = f.send(SET_OWNER, &[], &[]);
    let _ = f.get_u64(GET_FEATURES);
    let _ = f.send(SET_FEATURES, &u64::MAX.to_le_bytes(), &[]);
    let _ = f.send(SET_PROTOCOL_FEATURES, &u64::MAX.to_le_bytes(), &[]);
    let _ = f.get_u64(GET_PROTOCOL_FEATURES);
    settle(f);
    check("all feature bits");

    // Memory tables: zero regions; too many regions; fewer fds than regions; zero-sized region.
    let mut f = d.raw();
    f.handshake(0);
    let _ = f.mem_table(&[], &[]);
    settle(f);
    let mut f = d.raw();
    f.handshake(0);
    let regions: Vec<[u64; 4]> = (0..9).map(|i| [i * MIB, MIB, UADDR + i * MIB, 0]).collect();
    let fds: Vec<RawFd> = (0..9).map(|_| mem.as_raw_fd()).collect();
    let _ = f.mem_table(&regions, &fds);
    settle(f);
    let mut f = d.raw();
    f.handshake(0);
    let _ = f.mem_table(
        &[[0, MIB, UADDR, 0], [2 * MIB, MIB, UADDR + 2 * MIB, 0]],
        &[mem.as_raw_fd()],
    );
    settle(f);
    let mut f = d.raw();
    f.handshake(0);
    let _ = f.mem_table(&[[0, 0, UADDR, 0]], &[mem.as_raw_fd()]);
    settle(f);
    check("zero / too many / fd-less / empty memory regions");

    // Overlapping regions (guest and frontend addresses), and overflowing ones.
    let mut f = d.raw();
    f.handshake(0);
    let _ = f.mem_table(
        &[[0, MIB, UADDR, 0], [MIB / 2, MIB, UADDR + MIB / 2, 0]],
        &[mem.as_raw_fd(), mem.as_raw_fd()],
    );
    settle(f);
    let mut f = d.raw();
    f.handshake(0);
    let _ = f.mem_table(&[[u64::MAX - 4095, 8192, UADDR, 0]], &[mem.as_raw_fd()]);
    settle(f);
    let mut f = d.raw();
    f.handshake(0);
    let _ = f.mem_table(
        &[[0, MIB, u64::MAX - 4095, u64::MAX - 4095]],
        &[mem.as_raw_fd()],
    );
    settle(f);
    check("overlapping / overflowing memory regions");

    // Ring addresses outside guest memory, and rings that straddle the end of the region.
    let mut f = d.raw();
    f.handshake(0);
    let _ = f.mem_table(&[[0, MIB, UADDR, 0]], &[mem.as_raw_fd()]);
    let (_call, _kick) = start_queue(&f, 16, 0x1000, UADDR + 0x1000, u64::MAX - 8);
    settle(f);
    let mut f = d.raw();
    f.handshake(0);
    let _ = f.mem_table(&[[0, MIB, UADDR, 0]], &[mem.as_raw_fd()]);
    let (_call, _kick) = start_queue(&f, 256, UADDR + MIB - 64, UADDR, UADDR + 0x1000);
    settle(f);
    check("ring addresses outside guest memory");

    // Invalid ring sizes (0, not a power of two, larger than the maximum) and queue indices.
    for size in [0u32, 3, 100, 1 << 15, u32::MAX] {
        let mut f = d.raw();
        f.handshake(0);
        let _ = f.mem_table(&[[0, MIB, UADDR, 0]], &[mem.as_raw_fd()]);
        let (_call, _kick) = start_queue(&f, size, UADDR, UADDR + 0x8000, UADDR + 0x9000);
        settle(f);
    }
    let mut f = d.raw();
    f.handshake(0);
    let _ = f.vring_state(SET_VRING_NUM, 7, 16);
    let _ = f.vring_state(SET_VRING_NUM, u32::MAX, 16);
    let _ = f.vring_state(SET_VRING_ENABLE, 99, 1);
    let _ = f.vring_fd(SET_VRING_KICK, 0xff, None);
    let _ = f.vring_state(GET_VRING_BASE, 42, 0);
    let _ = f.reply();
    settle(f);
    check("invalid ring sizes and queue indices");

    // GET_CONFIG / SET_CONFIG with huge sizes and offsets, and payloads that disagree.
    let mut f = d.raw();
    f.handshake(PF_CONFIG | PF_REPLY_ACK);
    for (off, size, payload) in [
        (0u32, u32::MAX, 60usize),
        (u32::MAX, 60, 60),
        (u32::MAX - 4, 60, 60),
        (0x1000, 0x1000, 0x1000 - 12),
        (0, 60, 0),
        (0, 0, 0),
    ] {
        let _ = f.config(GET_CONFIG, off, size, payload);
        let _ = f.reply();
    }
    let _ = f.config(SET_CONFIG, u32::MAX - 1, 8, 8);
    let _ = f.config(SET_CONFIG, 32, u32::MAX, 1);
    settle(f);
    check("GET_CONFIG/SET_CONFIG with huge sizes and offsets");

    // ADD_MEM_REG without an fd, with a huge region; REM_MEM_REG of something never added.
    let mut f = d.raw();
    f.handshake(PF_CONFIGURE_MEM_SLOTS | PF_REPLY_ACK);
    let reg = le_u64s(&[0, 0, MIB, UADDR, 0]);
    let _ = f.send(ADD_MEM_REG, &reg, &[]);
    let reg = le_u64s(&[0, 0, u64::MAX, UADDR, 0]);
    let _ = f.send(ADD_MEM_REG, &reg, &[small.as_raw_fd()]);
    let reg = le_u64s(&[0, 0x4000_0000, MIB, UADDR, 0]);
    let _ = f.send(REM_MEM_REG, &reg, &[]);
    settle(f);
    check("ADD_MEM_REG/REM_MEM_REG abuse");

    // A flood of file descriptors on a request that takes none.
    let f = d.raw();
    let many: Vec<RawFd> = (0..64).map(|_| mem.as_raw_fd()).collect();
    let _ = f.send(GET_FEATURES, &[], &many);
    let _ = f.send(SET_OWNER, &[], &many);
    settle(f);
    check("file descriptor flood");

    // The whole hostile run, with the good-client checks, stays well under a minute.
    eprintln!(
        "hostile frontend: {} scenarios in {:.1}s",
        round,
        started.elapsed().as_secs_f64()
    );
}

/// A frontend whose virtqueue is garbage (descriptors pointing anywhere, the avail index far
/// ahead of the device, EVENT_IDX negotiated) must not stop the daemon serving the next
/// connection: the queue thread must give up on the ring instead of spinning, so the daemon can
/// join it when the frontend leaves.
#[test]
fn garbage_virtqueue_does_not_stop_the_daemon_serving() {
    let Some(d) = Daemon::start() else {
        return;
    };
    // A garbage ring in valid memory: every descriptor points everywhere, avail index far ahead.
    let mut f = d.raw();
    f.handshake(0);
    let garbage = memfd(MIB);
    {
        let mut bytes: Vec<u8> = (0..MIB as usize)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        // The avail ring is at 0x4000: index 0xfff0, far more than a queue size ahead of 0.
        bytes[0x4002..0x4004].copy_from_slice(&0xfff0u16.to_le_bytes());
        let mut file = File::from(garbage.try_clone().unwrap());
        file.write_all(&bytes).unwrap();
    }
    let _ = f.mem_table(&[[0, MIB, UADDR, 0]], &[garbage.as_raw_fd()]);
    let (_call, _kick) = start_queue(&f, 256, UADDR, UADDR + 0x4000, UADDR + 0x6000);
    settle(f);
    d.assert_serves("a garbage virtqueue", 1);
}

/// A memory table whose region is larger than the file behind it, with the rings past the
/// file's end: touching them would raise SIGBUS, so the daemon must refuse such a table (or
/// survive the fault) and keep serving.
#[test]
fn memory_region_larger_than_its_file_does_not_crash_the_daemon() {
    let Some(d) = Daemon::start() else {
        return;
    };
    let small = memfd(4096);
    let mut f = d.raw();
    f.handshake(0);
    let _ = f.mem_table(&[[0, MIB, UADDR, 0]], &[small.as_raw_fd()]);
    let (_call, _kick) = start_queue(&f, 16, UADDR + 0x8_0000, UADDR + 0x8_1000, UADDR + 0x8_2000);
    settle(f);
    d.assert_serves("a memory region larger than its file", 1);
}
