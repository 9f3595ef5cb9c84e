//! The libnbd calls snapblk uses, declared by hand from `<libnbd.h>` (libnbd 1.14, Debian 12's
//! `libnbd-dev`; every call here exists since libnbd 1.2). Nothing else of libnbd is bound.
//!
//! Only [`crate::conn`] calls these; it keeps the rules libnbd documents in libnbd(3):
//! - a handle is used by one thread at a time here (the connection pool hands a [`crate::conn`]
//!   connection to one request at a time), although libnbd would lock it itself;
//! - a buffer passed to `nbd_aio_pread` and the user data of a callback must stay valid until
//!   the command is retired by `nbd_aio_command_completed` or the handle is closed with
//!   `nbd_close` (which retires every command still in flight);
//! - `nbd_get_error` / `nbd_get_errno` describe the last failed call on the calling thread.
//!
//! Handles are created with `nbd_create`, configured (export name, meta context, structured
//! replies) before the connection, then connected with `nbd_aio_connect_socket` to a socket this
//! crate connected itself (so reconnecting needs no name resolution and no file access).

#![allow(non_camel_case_types)]

use std::ffi::{c_char, c_int, c_void};

/// An opaque libnbd handle (`struct nbd_handle`).
#[repr(C)]
pub struct nbd_handle {
    _private: [u8; 0],
}

/// `nbd_completion_callback`: called when a command completes (we pass a null callback and poll
/// `nbd_aio_command_completed` instead).
#[repr(C)]
pub struct nbd_completion_callback {
    pub callback: Option<unsafe extern "C" fn(user_data: *mut c_void, error: *mut c_int) -> c_int>,
    pub user_data: *mut c_void,
    pub free: Option<unsafe extern "C" fn(user_data: *mut c_void)>,
}

impl nbd_completion_callback {
    /// `NBD_NULL_COMPLETION`.
    pub const NULL: Self = nbd_completion_callback {
        callback: None,
        user_data: std::ptr::null_mut(),
        free: None,
    };
}

/// `nbd_extent_callback`: receives block-status extents as (length, flags) pairs.
#[repr(C)]
pub struct nbd_extent_callback {
    pub callback: Option<
        unsafe extern "C" fn(
            user_data: *mut c_void,
            metacontext: *const c_char,
            offset: u64,
            entries: *mut u32,
            nr_entries: usize,
            error: *mut c_int,
        ) -> c_int,
    >,
    pub user_data: *mut c_void,
    pub free: Option<unsafe extern "C" fn(user_data: *mut c_void)>,
}

/// `LIBNBD_STATE_HOLE`: the extent is not allocated on the server.
pub const LIBNBD_STATE_HOLE: u32 = 1;
/// `LIBNBD_STATE_ZERO`: the extent reads as zeros.
pub const LIBNBD_STATE_ZERO: u32 = 2;
/// `LIBNBD_SIZE_MINIMUM` for `nbd_get_block_size`.
pub const LIBNBD_SIZE_MINIMUM: c_int = 0;
/// `LIBNBD_SIZE_MAXIMUM` for `nbd_get_block_size`.
pub const LIBNBD_SIZE_MAXIMUM: c_int = 2;
/// `LIBNBD_SHUTDOWN_ABANDON_PENDING`.
pub const LIBNBD_SHUTDOWN_ABANDON_PENDING: u32 = 0x10000;
/// The meta context that carries allocation and zero status.
pub const BASE_ALLOCATION: &std::ffi::CStr = c"base:allocation";

#[link(name = "nbd")]
extern "C" {
    /// New handle, or null (see `nbd_get_error`).
    pub fn nbd_create() -> *mut nbd_handle;
    /// Closes the connection (if any) and frees the handle, retiring in-flight commands.
    pub fn nbd_close(h: *mut nbd_handle);
    /// Message of the last error on this thread (valid until the next libnbd call).
    pub fn nbd_get_error() -> *const c_char;
    /// errno of the last error on this thread (0 if none applies).
    pub fn nbd_get_errno() -> c_int;
    /// Export name to ask for during the handshake.
    pub fn nbd_set_export_name(h: *mut nbd_handle, export_name: *const c_char) -> c_int;
    /// Requests a meta context (here `base:allocation`) during the handshake.
    pub fn nbd_add_meta_context(h: *mut nbd_handle, name: *const c_char) -> c_int;
    /// Whether to request structured replies (default: yes).
    pub fn nbd_set_request_structured_replies(h: *mut nbd_handle, request: bool) -> c_int;
    /// 1 when the server agreed to structured replies.
    pub fn nbd_get_structured_replies_negotiated(h: *mut nbd_handle) -> c_int;
    /// Whether `nbd_pread` zeroes the buffer before reading (not needed: a successful read fills
    /// all of it, holes included).
    pub fn nbd_set_pread_initialize(h: *mut nbd_handle, request: bool) -> c_int;
    /// Starts the handshake on an already connected socket; libnbd owns `sock` from now on.
    pub fn nbd_aio_connect_socket(h: *mut nbd_handle, sock: c_int) -> c_int;
    /// Runs the state machine for at most `timeout` ms: 1 progress, 0 timeout, -1 error.
    pub fn nbd_poll(h: *mut nbd_handle, timeout: c_int) -> c_int;
    /// 1 when the handshake is done and commands may be issued.
    pub fn nbd_aio_is_ready(h: *mut nbd_handle) -> c_int;
    /// 1 when the connection failed.
    pub fn nbd_aio_is_dead(h: *mut nbd_handle) -> c_int;
    /// 1 when the connection was closed.
    pub fn nbd_aio_is_closed(h: *mut nbd_handle) -> c_int;
    /// Export size in bytes.
    pub fn nbd_get_size(h: *mut nbd_handle) -> i64;
    /// A block-size constraint the server announced (0 if none).
    pub fn nbd_get_block_size(h: *mut nbd_handle, size_type: c_int) -> i64;
    /// 1 when the named meta context was negotiated.
    pub fn nbd_can_meta_context(h: *mut nbd_handle, metacontext: *const c_char) -> c_int;
    /// Issues a read of `count` bytes at `offset` into `buf`; returns a cookie or -1.
    pub fn nbd_aio_pread(
        h: *mut nbd_handle,
        buf: *mut c_void,
        count: usize,
        offset: u64,
        completion_callback: nbd_completion_callback,
        flags: u32,
    ) -> i64;
    /// Issues a block-status query; returns a cookie or -1.
    pub fn nbd_aio_block_status(
        h: *mut nbd_handle,
        count: u64,
        offset: u64,
        extent_callback: nbd_extent_callback,
        completion_callback: nbd_completion_callback,
        flags: u32,
    ) -> i64;
    /// 1 when the command completed successfully (and is retired), 0 still in flight, -1 when
    /// it failed (retired; `nbd_get_errno` says why).
    pub fn nbd_aio_command_completed(h: *mut nbd_handle, cookie: u64) -> c_int;
    /// Asks the server to close the connection after pending commands.
    pub fn nbd_shutdown(h: *mut nbd_handle, flags: u32) -> c_int;
}
