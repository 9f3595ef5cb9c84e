//! One NBD connection: a libnbd handle over a socket this module connected, driven with the
//! asynchronous calls and `nbd_poll` so that every wait has a deadline.
//!
//! Safe wrapper rules (the `unsafe` below relies on them):
//! - a [`Conn`] owns its handle and is `Send` but used by one thread at a time (`&mut self`);
//! - every command's buffer or callback data lives on the caller's stack until the command is
//!   retired (`nbd_aio_command_completed` returned non-zero) or the handle is closed; on a
//!   timeout or a dead connection the connection is marked broken and gets no further call
//!   but `nbd_close` (libnbd has no threads of its own and does I/O only inside calls), so
//!   libnbd never writes into a buffer that is gone.
//!
//! Locking model: none inside; the pool in [`crate`] decides which thread holds a connection.

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::Instant;

use crate::ffi;

/// How a failed command failed.
#[derive(Debug)]
pub(crate) enum CmdError {
    /// The server answered with an error; the connection is still good.
    Server(io::Error),
    /// The connection is gone (closed, reset, timed out); it was closed here.
    Connection(io::Error),
}

/// The last libnbd error on this thread as an `io::Error` (errno kept when there is one).
fn last_error(what: &str) -> io::Error {
    // SAFETY: both calls only read libnbd's thread-local error state; the message pointer is
    // valid until the next libnbd call on this thread and copied at once.
    let (errno, msg) = unsafe {
        let errno = ffi::nbd_get_errno();
        let p = ffi::nbd_get_error();
        let msg = if p.is_null() {
            String::new()
        } else {
            CStr::from_ptr(p).to_string_lossy().into_owned()
        };
        (errno, msg)
    };
    let kind_src = if errno > 0 {
        io::Error::from_raw_os_error(errno)
    } else {
        io::Error::from_raw_os_error(libc::EIO)
    };
    io::Error::new(kind_src.kind(), format!("{what}: {msg} ({kind_src})"))
}

fn timed_out(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        format!("{what}: no answer from the NBD server within the request timeout"),
    )
}

/// Milliseconds left until `deadline` (at least 1 while it is in the future), or `None`.
fn remaining_ms(deadline: Instant) -> Option<c_int> {
    let left = deadline.checked_duration_since(Instant::now())?;
    if left.is_zero() {
        return None;
    }
    Some(left.as_millis().clamp(1, c_int::MAX as u128) as c_int)
}

/// Connects a non-blocking stream socket to `addr` (a `sockaddr` of `len` bytes) by `deadline`.
fn connect_raw(
    family: c_int,
    addr: *const libc::sockaddr,
    len: libc::socklen_t,
    deadline: Instant,
) -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the result is checked and owned right away.
    let fd = unsafe {
        libc::socket(
            family,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just created and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: `addr` points to a valid sockaddr of `len` bytes (the callers build it).
    if unsafe { libc::connect(fd.as_raw_fd(), addr, len) } == 0 {
        return Ok(fd);
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() != Some(libc::EINPROGRESS) && e.raw_os_error() != Some(libc::EAGAIN) {
        return Err(e);
    }
    loop {
        let Some(ms) = remaining_ms(deadline) else {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "connect timed out"));
        };
        let mut pfd = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLOUT,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let r = unsafe { libc::poll(&mut pfd, 1, ms) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if r == 0 {
            continue;
        }
        let mut err: c_int = 0;
        let mut elen = std::mem::size_of::<c_int>() as libc::socklen_t;
        // SAFETY: SO_ERROR into a c_int of the given length.
        let r = unsafe {
            libc::getsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_ERROR,
                (&raw mut err).cast(),
                &mut elen,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        if err == libc::EINPROGRESS || err == libc::EAGAIN {
            continue;
        }
        if err != 0 {
            return Err(io::Error::from_raw_os_error(err));
        }
        return Ok(fd);
    }
}

/// Connects to a unix socket by `deadline`.
pub(crate) fn connect_unix(path: &Path, deadline: Instant) -> io::Result<OwnedFd> {
    // SAFETY: sockaddr_un is plain old data; zero is a valid value.
    let mut sa: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    sa.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    if bytes.len() >= sa.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "unix socket path too long or contains a NUL byte",
        ));
    }
    for (d, s) in sa.sun_path.iter_mut().zip(bytes) {
        *d = s.cast_signed();
    }
    let len =
        (std::mem::offset_of!(libc::sockaddr_un, sun_path) + bytes.len() + 1) as libc::socklen_t;
    connect_raw(libc::AF_UNIX, (&raw const sa).cast(), len, deadline)
}

/// Connects to one TCP address by `deadline` (no name resolution here: addresses are resolved
/// once when the device is opened, so reconnecting works inside the daemon's sandbox).
pub(crate) fn connect_tcp(addr: &std::net::SocketAddr, deadline: Instant) -> io::Result<OwnedFd> {
    let fd = match addr {
        std::net::SocketAddr::V4(a) => {
            let sa = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            connect_raw(
                libc::AF_INET,
                (&raw const sa).cast(),
                std::mem::size_of_val(&sa) as libc::socklen_t,
                deadline,
            )?
        }
        std::net::SocketAddr::V6(a) => {
            let sa = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            connect_raw(
                libc::AF_INET6,
                (&raw const sa).cast(),
                std::mem::size_of_val(&sa) as libc::socklen_t,
                deadline,
            )?
        }
    };
    let one: c_int = 1;
    // SAFETY: TCP_NODELAY with a c_int value; failure only costs latency.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_NODELAY,
            (&raw const one).cast(),
            std::mem::size_of::<c_int>() as libc::socklen_t,
        );
    }
    Ok(fd)
}

/// What the handshake learned.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ExportInfo {
    pub size: u64,
    pub min_block: u64,
    pub max_block: u64,
    pub structured: bool,
    pub base_allocation: bool,
}

/// One connected libnbd handle.
pub(crate) struct Conn {
    h: *mut ffi::nbd_handle,
    broken: bool,
    pub info: ExportInfo,
}

// SAFETY: a libnbd handle may be used from any thread (libnbd locks it internally); a Conn is
// only ever used by the one thread that holds it (`&mut self` methods).
unsafe impl Send for Conn {}

impl Drop for Conn {
    fn drop(&mut self) {
        // SAFETY: `h` came from nbd_create and is closed exactly once, here.
        unsafe { ffi::nbd_close(self.h) };
    }
}

impl Conn {
    /// Creates a handle for `export`, hands it the connected socket `sock` and completes the
    /// handshake (structured replies and `base:allocation` requested) by `deadline`.
    pub(crate) fn handshake(sock: OwnedFd, export: &str, deadline: Instant) -> io::Result<Conn> {
        let export = CString::new(export)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "export name has a NUL"))?;
        // SAFETY: nbd_create has no preconditions; null is checked.
        let h = unsafe { ffi::nbd_create() };
        if h.is_null() {
            return Err(last_error("nbd_create"));
        }
        let mut conn = Conn {
            h,
            broken: false,
            info: ExportInfo {
                size: 0,
                min_block: 1,
                max_block: 32 << 20,
                structured: false,
                base_allocation: false,
            },
        };
        // SAFETY: `h` is a fresh handle; the strings outlive the calls (libnbd copies them).
        unsafe {
            if ffi::nbd_set_export_name(h, export.as_ptr()) < 0
                || ffi::nbd_set_request_structured_replies(h, true) < 0
                || ffi::nbd_add_meta_context(h, ffi::BASE_ALLOCATION.as_ptr()) < 0
                || ffi::nbd_set_pread_initialize(h, false) < 0
            {
                return Err(last_error("configuring the NBD handle"));
            }
            if ffi::nbd_aio_connect_socket(h, sock.into_raw_fd()) < 0 {
                return Err(last_error("NBD handshake"));
            }
        }
        loop {
            // SAFETY: state queries on a valid handle.
            let (ready, dead, closed) = unsafe {
                (
                    ffi::nbd_aio_is_ready(h),
                    ffi::nbd_aio_is_dead(h),
                    ffi::nbd_aio_is_closed(h),
                )
            };
            if ready == 1 {
                break;
            }
            if dead == 1 || closed == 1 {
                return Err(last_error("NBD handshake"));
            }
            let Some(ms) = remaining_ms(deadline) else {
                return Err(timed_out("NBD handshake"));
            };
            // SAFETY: polling a valid handle.
            if unsafe { ffi::nbd_poll(h, ms) } < 0 {
                return Err(last_error("NBD handshake"));
            }
        }
        // SAFETY: queries on a connected handle.
        unsafe {
            let size = ffi::nbd_get_size(h);
            if size < 0 {
                return Err(last_error("NBD export size"));
            }
            conn.info.size = size as u64;
            let min = ffi::nbd_get_block_size(h, ffi::LIBNBD_SIZE_MINIMUM);
            if min > 0 {
                conn.info.min_block = min as u64;
            }
            let max = ffi::nbd_get_block_size(h, ffi::LIBNBD_SIZE_MAXIMUM);
            if max > 0 {
                conn.info.max_block = (max as u64).min(32 << 20);
            }
            conn.info.structured = ffi::nbd_get_structured_replies_negotiated(h) == 1;
            conn.info.base_allocation =
                ffi::nbd_can_meta_context(h, ffi::BASE_ALLOCATION.as_ptr()) == 1;
        }
        Ok(conn)
    }

    /// Waits for command `cookie` until `deadline`. On a timeout or a dead connection the
    /// handle is shut down and closed here (retiring the command) before returning.
    fn wait(&mut self, cookie: i64, what: &str, deadline: Instant) -> Result<(), CmdError> {
        if cookie < 0 {
            return Err(self.fail(last_error(what)));
        }
        loop {
            // SAFETY: `cookie` was returned by this handle and not retired yet.
            match unsafe { ffi::nbd_aio_command_completed(self.h, cookie as u64) } {
                1 => return Ok(()),
                0 => {}
                _ => {
                    let e = last_error(what);
                    return Err(if self.is_alive() {
                        CmdError::Server(e)
                    } else {
                        self.fail(e)
                    });
                }
            }
            let Some(ms) = remaining_ms(deadline) else {
                return Err(self.fail(timed_out(what)));
            };
            // SAFETY: polling a valid handle.
            if unsafe { ffi::nbd_poll(self.h, ms) } < 0 {
                return Err(self.fail(last_error(what)));
            }
        }
    }

    fn is_alive(&self) -> bool {
        // SAFETY: state queries on a valid handle.
        unsafe { ffi::nbd_aio_is_dead(self.h) != 1 && ffi::nbd_aio_is_closed(self.h) != 1 }
    }

    /// Marks the connection failed. libnbd does I/O only inside calls on the handle, and a
    /// broken connection gets no call but `nbd_close` (the pool drops it before the request
    /// returns), so no buffer of an abandoned command is ever written after this.
    fn fail(&mut self, e: io::Error) -> CmdError {
        self.broken = true;
        CmdError::Connection(e)
    }

    /// Whether a command found the connection gone (the pool then drops it).
    pub(crate) fn is_broken(&self) -> bool {
        self.broken
    }

    /// Reads `buf.len()` bytes at `offset` (holes in structured replies read as zeros).
    pub(crate) fn pread(
        &mut self,
        buf: &mut [u8],
        offset: u64,
        deadline: Instant,
    ) -> Result<(), CmdError> {
        // SAFETY: `buf` stays borrowed until `wait` returns, and `wait` retires the command or
        // closes the handle before it returns.
        let cookie = unsafe {
            ffi::nbd_aio_pread(
                self.h,
                buf.as_mut_ptr().cast::<c_void>(),
                buf.len(),
                offset,
                ffi::nbd_completion_callback::NULL,
                0,
            )
        };
        self.wait(cookie, "NBD read", deadline)
    }

    /// Block status of `[offset, offset+len)` in the `base:allocation` context: extents as
    /// (offset, length, flags), covering at least the start of the range.
    pub(crate) fn block_status(
        &mut self,
        offset: u64,
        len: u64,
        deadline: Instant,
    ) -> Result<Vec<(u64, u64, u32)>, CmdError> {
        let mut out: Vec<(u64, u64, u32)> = Vec::new();
        unsafe extern "C" fn extent(
            user_data: *mut c_void,
            metacontext: *const c_char,
            offset: u64,
            entries: *mut u32,
            nr_entries: usize,
            _error: *mut c_int,
        ) -> c_int {
            // SAFETY: libnbd passes the user data we gave (a live Vec on the caller's stack),
            // a NUL-terminated context name and `nr_entries` u32s.
            unsafe {
                if CStr::from_ptr(metacontext) != ffi::BASE_ALLOCATION {
                    return 0;
                }
                let out = &mut *user_data.cast::<Vec<(u64, u64, u32)>>();
                let e = std::slice::from_raw_parts(entries, nr_entries);
                let mut pos = offset;
                for pair in e.chunks_exact(2) {
                    out.push((pos, u64::from(pair[0]), pair[1]));
                    pos += u64::from(pair[0]);
                }
            }
            0
        }
        let cb = ffi::nbd_extent_callback {
            callback: Some(extent),
            user_data: (&raw mut out).cast(),
            free: None,
        };
        let len = len.min(u64::from(u32::MAX) & !0xfff);
        // SAFETY: `out` lives until `wait` retires the command or closes the handle.
        let cookie = unsafe {
            ffi::nbd_aio_block_status(
                self.h,
                len,
                offset,
                cb,
                ffi::nbd_completion_callback::NULL,
                0,
            )
        };
        self.wait(cookie, "NBD block status", deadline)?;
        Ok(out)
    }

    /// Polite disconnect (best effort, never waits).
    pub(crate) fn shutdown(&mut self) {
        // SAFETY: valid handle; failure is ignored (Drop closes it anyway).
        unsafe {
            ffi::nbd_shutdown(self.h, ffi::LIBNBD_SHUTDOWN_ABANDON_PENDING);
        }
    }
}
