//! Least privilege for `snapblk serve`: once the socket is bound and every image of the chain is
//! open, the daemon drops root (`--user USER[:GROUP]`) and confines all its threads with a
//! seccomp allow-list (`--seccomp kill|log|off`, default `kill`), so a guest or a vhost-user
//! frontend that finds a memory bug in the daemon still cannot open a file or a socket, run a
//! program or reach another process.
//!
//! Order of [`enter`] (called by `serve` after the socket is bound, the disk is open and the
//! signal thread runs, before the first connection):
//! 1. The throwaway `--snapshot` overlay is unlinked: its data stays reachable through the open
//!    descriptor and disappears when the daemon exits, even on a crash, and no unlink of it is
//!    needed later.
//! 2. `--user`: the user and group are looked up (NSS may open files, so before the filter);
//!    supplementary groups are set to the one group, then the gid, then the uid (glibc applies
//!    each to every thread of the process). The result is verified: real, effective and saved
//!    ids of every thread (from `/proc/self/task/*/status`), the group list, and that
//!    `setuid(0)` now fails.
//! 3. The filter is installed for all threads at once (`SECCOMP_FILTER_FLAG_TSYNC`): the signal
//!    thread and the cache's writeback threads already run; queue threads, vhost-user threads
//!    and I/O helpers started later inherit it.
//!
//! The allow-list ([`ALLOWED`]) is what the serving path uses after start-up: accepting a new
//! frontend on the already bound listener, the vhost-user protocol (recvmsg/sendmsg with file
//! descriptors, mmap of the guest memory from SET_MEM_TABLE, eventfds, epoll), queue and helper
//! threads (clone/clone3, futex, sigaltstack, thread names via prctl(PR_SET_NAME) only), the data
//! path (pread/pwrite, fdatasync, fallocate punch-hole/zero-range, io_uring_setup/enter/register
//! for the io_uring data path), logging to stderr, the signal thread (rt_sigtimedwait) and the
//! exit path, including unlink of the socket file at shutdown. Unlink is the one call that names
//! a path: it cannot open or read anything, and under `--user` it is limited to what that user
//! may delete. When the chain has an NBD base (`nbd_client::in_use`), socket (stream sockets of
//! the unix, IPv4 and IPv6 families only) and connect are allowed too, for reconnecting to its
//! server after a restart (addresses were resolved at start-up: no file or DNS lookup follows).
//! Not allowed, among others: socket, connect (without an NBD base), bind, execve, ptrace, kill of other
//! processes, mount, ioctl. The open family (open, openat, openat2, creat) fails with EACCES
//! rather than killing ([`DENIED_WITH_EACCES`]): glibc itself opens files lazily on healthy paths
//! (its malloc reads `/proc/sys/vm/overcommit_memory` the first time it shrinks a thread heap and
//! `/sys/devices/system/cpu/online` when it sizes its arenas; the latter is settled before the
//! filter with `mallopt(M_ARENA_MAX)`) and copes with the failure.
//!
//! io_uring: seccomp does not see the operations a ring executes (an IORING_OP_OPENAT or
//! IORING_OP_SOCKET submitted through a ring would bypass this filter). The read path's rings
//! (`crate::uring`, one per queue, made when a frontend connects) are therefore created
//! disabled, restricted with IORING_REGISTER_RESTRICTIONS to IORING_OP_READV, and only then
//! enabled; after that the kernel refuses every other opcode and every further registration
//! on them. `io_uring_setup` itself stays allowed (a connection after start-up needs it).
//!
//! In `kill` mode a call outside the list raises SIGSYS; the handler writes one line naming the
//! system call (number and name) and the thread to stderr and ends the process with exit status
//! 159 (128 + SIGSYS). The guest sees its disk disconnect; nothing else on the host is touched.
//! In `log` mode the call is allowed and the kernel logs it (audit log, `dmesg`), for finding a
//! call the list misses.
//!
//! Test hook: when the environment variable [`TEST_FORBIDDEN_SYSCALL_ENV`] is `1` at start-up,
//! the first queue event makes the queue thread try to open `/etc/passwd` (logging the result)
//! and then call socket(2), as a compromised serving thread would; the kill test uses it. It
//! changes nothing else (without the filter both calls succeed and are closed at once).
//!
//! Locking model: none; [`enter`] runs once on the main thread before the first connection, and
//! the test flag is an atomic written before any queue thread exists.

use std::ffi::CString;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule,
};

use crate::cli::{SeccompMode, ServeArgs};
use crate::disk::ServedDisk;

/// Test-only: `1` makes the first queue event call a forbidden system call (see module docs).
pub const TEST_FORBIDDEN_SYSCALL_ENV: &str = "SNAPBLK_TEST_FORBIDDEN_SYSCALL";

/// Exit status of a daemon killed by the filter (128 + SIGSYS).
pub const SECCOMP_KILL_STATUS: i32 = 128 + libc::SIGSYS;

static TEST_TRIGGER: AtomicBool = AtomicBool::new(false);

/// Why the daemon could not enter its sandbox.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// `--user` names no user or group.
    #[error("--user {spec}: {reason}")]
    User {
        /// The argument.
        spec: String,
        /// What is wrong.
        reason: String,
    },
    /// Dropping privileges failed or could not be verified.
    #[error("cannot drop privileges to uid {uid} gid {gid}: {reason}")]
    Drop {
        /// Target uid.
        uid: u32,
        /// Target gid.
        gid: u32,
        /// What failed.
        reason: String,
    },
    /// The seccomp filter could not be built or installed.
    #[error("cannot install the seccomp filter: {0}")]
    Seccomp(String),
}

/// The system calls the serving path may make, by name (for the kill message) and number.
#[rustfmt::skip]
pub const ALLOWED: &[(&str, libc::c_long)] = &[
    // Data path and files already open.
    ("read", libc::SYS_read), ("write", libc::SYS_write), ("readv", libc::SYS_readv),
    ("writev", libc::SYS_writev), ("pread64", libc::SYS_pread64),
    ("pwrite64", libc::SYS_pwrite64), ("preadv", libc::SYS_preadv),
    ("pwritev", libc::SYS_pwritev), ("preadv2", libc::SYS_preadv2),
    ("pwritev2", libc::SYS_pwritev2), ("fsync", libc::SYS_fsync),
    ("fdatasync", libc::SYS_fdatasync), ("fallocate", libc::SYS_fallocate),
    // Advice on a description already open: an image file opened at run time (a live
    // snapshot's top) gets its random-read description advised `POSIX_FADV_RANDOM`.
    ("fadvise64", libc::SYS_fadvise64),
    ("ftruncate", libc::SYS_ftruncate), ("lseek", libc::SYS_lseek), ("close", libc::SYS_close),
    ("fstat", libc::SYS_fstat), ("newfstatat", libc::SYS_newfstatat), ("statx", libc::SYS_statx),
    ("fcntl", libc::SYS_fcntl), ("dup", libc::SYS_dup), ("dup3", libc::SYS_dup3),
    ("io_uring_setup", libc::SYS_io_uring_setup), ("io_uring_enter", libc::SYS_io_uring_enter),
    ("io_uring_register", libc::SYS_io_uring_register),
    // Whether the page cache holds a base's range (uncached reads go O_DIRECT).
    ("cachestat", blockdev::SYS_CACHESTAT),
    // Guest memory (SET_MEM_TABLE), heap and thread stacks.
    ("mmap", libc::SYS_mmap), ("munmap", libc::SYS_munmap), ("mprotect", libc::SYS_mprotect),
    ("mremap", libc::SYS_mremap), ("madvise", libc::SYS_madvise), ("brk", libc::SYS_brk),
    // vhost-user: accept on the bound listener, messages with descriptors, eventfds, epoll.
    ("accept4", libc::SYS_accept4), ("recvmsg", libc::SYS_recvmsg),
    ("sendmsg", libc::SYS_sendmsg), ("recvfrom", libc::SYS_recvfrom),
    ("sendto", libc::SYS_sendto), ("shutdown", libc::SYS_shutdown),
    ("getsockopt", libc::SYS_getsockopt), ("eventfd2", libc::SYS_eventfd2),
    // The control socket's and metrics endpoint's client timeouts.
    ("setsockopt", libc::SYS_setsockopt),
    ("epoll_create1", libc::SYS_epoll_create1), ("epoll_ctl", libc::SYS_epoll_ctl),
    ("epoll_pwait", libc::SYS_epoll_pwait), ("ppoll", libc::SYS_ppoll),
    // Threads, time, signals, randomness.
    ("clone", libc::SYS_clone), ("clone3", libc::SYS_clone3), ("futex", libc::SYS_futex),
    ("set_robust_list", libc::SYS_set_robust_list), ("rseq", libc::SYS_rseq),
    ("sched_yield", libc::SYS_sched_yield), ("sched_getaffinity", libc::SYS_sched_getaffinity),
    ("gettid", libc::SYS_gettid), ("getpid", libc::SYS_getpid), ("sigaltstack", libc::SYS_sigaltstack),
    ("rt_sigprocmask", libc::SYS_rt_sigprocmask), ("rt_sigaction", libc::SYS_rt_sigaction),
    ("rt_sigreturn", libc::SYS_rt_sigreturn), ("rt_sigtimedwait", libc::SYS_rt_sigtimedwait),
    ("clock_gettime", libc::SYS_clock_gettime), ("clock_nanosleep", libc::SYS_clock_nanosleep),
    ("nanosleep", libc::SYS_nanosleep), ("getrandom", libc::SYS_getrandom),
    // The runner classifies executor requests by their own thread's CPU time and sleeps.
    ("getrusage", libc::SYS_getrusage),
    // The kernel restarts a sleeping call interrupted by SIGSTOP/SIGCONT with restart_syscall.
    ("restart_syscall", libc::SYS_restart_syscall),
    // Exit paths (abort raises SIGABRT on its own thread) and the socket file's removal.
    ("exit", libc::SYS_exit), ("exit_group", libc::SYS_exit_group), ("tgkill", libc::SYS_tgkill),
    ("unlinkat", libc::SYS_unlinkat),
    // Path resolution of a live snapshot's new overlay (canonicalize): no file is opened.
    ("getcwd", libc::SYS_getcwd), ("readlinkat", libc::SYS_readlinkat),
    // Legacy x86-64 forms glibc or the crates may still use.
    #[cfg(target_arch = "x86_64")] ("poll", libc::SYS_poll),
    #[cfg(target_arch = "x86_64")] ("epoll_wait", libc::SYS_epoll_wait),
    #[cfg(target_arch = "x86_64")] ("accept", libc::SYS_accept),
    #[cfg(target_arch = "x86_64")] ("unlink", libc::SYS_unlink),
    #[cfg(target_arch = "x86_64")] ("readlink", libc::SYS_readlink),
];

/// Names of calls that are not allowed but worth naming in the kill message.
#[rustfmt::skip]
const FORBIDDEN_NAMES: &[(&str, libc::c_long)] = &[
    ("openat", libc::SYS_openat), ("openat2", libc::SYS_openat2), ("socket", libc::SYS_socket),
    ("connect", libc::SYS_connect), ("bind", libc::SYS_bind), ("listen", libc::SYS_listen),
    ("execve", libc::SYS_execve), ("execveat", libc::SYS_execveat), ("ptrace", libc::SYS_ptrace),
    ("kill", libc::SYS_kill), ("mount", libc::SYS_mount), ("prctl", libc::SYS_prctl),
    ("ioctl", libc::SYS_ioctl), ("setuid", libc::SYS_setuid), ("memfd_create", libc::SYS_memfd_create),
    ("socketpair", libc::SYS_socketpair), ("wait4", libc::SYS_wait4),
    #[cfg(target_arch = "x86_64")] ("open", libc::SYS_open),
    #[cfg(target_arch = "x86_64")] ("fork", libc::SYS_fork),
    #[cfg(target_arch = "x86_64")] ("vfork", libc::SYS_vfork),
];

/// The name of system call `nr`, if the daemon knows it.
pub fn syscall_name(nr: libc::c_long) -> Option<&'static str> {
    ALLOWED
        .iter()
        .chain(FORBIDDEN_NAMES)
        .find(|(_, n)| *n == nr)
        .map(|(name, _)| *name)
}

/// Target ids of `--user`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ids {
    /// User id.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
}

fn c_string(spec: &str, s: &str) -> Result<CString, SandboxError> {
    CString::new(s).map_err(|_| SandboxError::User {
        spec: spec.into(),
        reason: "contains a NUL byte".into(),
    })
}

/// Resolves `USER[:GROUP]` (names or numbers; the group defaults to the user's primary group).
pub fn resolve_user(spec: &str) -> Result<Ids, SandboxError> {
    let err = |reason: String| SandboxError::User {
        spec: spec.into(),
        reason,
    };
    let (user, group) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    if user.is_empty() || group == Some("") {
        return Err(err("expected USER or USER:GROUP".into()));
    }
    let mut buf = vec![0 as libc::c_char; 16 << 10];
    let (uid, primary_gid) = {
        let name = c_string(spec, user)?;
        // SAFETY: passwd is plain data; getpwnam_r fills it with pointers into `buf`.
        let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: all pointers are valid for the call; `buf` outlives every use of `pw`.
        let rc = unsafe {
            libc::getpwnam_r(
                name.as_ptr(),
                &mut pw,
                buf.as_mut_ptr(),
                buf.len(),
                &mut result,
            )
        };
        if rc == 0 && !result.is_null() {
            (pw.pw_uid, Some(pw.pw_gid))
        } else if let Ok(n) = user.parse::<u32>() {
            (n, None)
        } else {
            return Err(err(format!("no such user {user:?}")));
        }
    };
    let gid = match group {
        None => primary_gid.ok_or_else(|| {
            err(format!(
                "user {user} has no passwd entry; give the group as {user}:GROUP"
            ))
        })?,
        Some(g) => {
            let name = c_string(spec, g)?;
            // SAFETY: group is plain data; getgrnam_r fills it with pointers into `buf`.
            let mut gr: libc::group = unsafe { std::mem::zeroed() };
            let mut result: *mut libc::group = std::ptr::null_mut();
            // SAFETY: all pointers are valid for the call.
            let rc = unsafe {
                libc::getgrnam_r(
                    name.as_ptr(),
                    &mut gr,
                    buf.as_mut_ptr(),
                    buf.len(),
                    &mut result,
                )
            };
            if rc == 0 && !result.is_null() {
                gr.gr_gid
            } else if let Ok(n) = g.parse::<u32>() {
                n
            } else {
                return Err(err(format!("no such group {g:?}")));
            }
        }
    };
    Ok(Ids { uid, gid })
}

fn last_os(what: &str) -> String {
    format!("{what}: {}", io::Error::last_os_error())
}

/// The (real, effective, saved) uid and gid lines of every thread of this process.
fn thread_ids() -> io::Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    for task in std::fs::read_dir("/proc/self/task")? {
        let status = std::fs::read_to_string(task?.path().join("status"))?;
        let field = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .map(|v| v.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
                .unwrap_or_default()
        };
        out.push((field("Uid:"), field("Gid:")));
    }
    Ok(out)
}

/// Switches every thread to `ids` (groups, then gid, then uid) and verifies it.
pub fn drop_privileges(ids: Ids) -> Result<(), SandboxError> {
    let err = |reason: String| SandboxError::Drop {
        uid: ids.uid,
        gid: ids.gid,
        reason,
    };
    let gid = ids.gid as libc::gid_t;
    // SAFETY: setgroups reads one gid from a valid pointer; setgid/setuid take plain ids. glibc
    // applies each to every thread of the process.
    unsafe {
        if libc::setgroups(1, &gid) != 0 {
            return Err(err(last_os("setgroups")));
        }
        if libc::setgid(gid) != 0 {
            return Err(err(last_os("setgid")));
        }
        if libc::setuid(ids.uid as libc::uid_t) != 0 {
            return Err(err(last_os("setuid")));
        }
    }
    let want_uid = format!("{0} {0} {0}", ids.uid);
    let want_gid = format!("{0} {0} {0}", ids.gid);
    let threads = thread_ids().map_err(|e| err(format!("cannot read /proc/self/task: {e}")))?;
    if let Some((u, g)) = threads
        .iter()
        .find(|(u, g)| *u != want_uid || *g != want_gid)
    {
        return Err(err(format!(
            "a thread still has uids {u} / gids {g} after the switch"
        )));
    }
    const GROUPS_LEN: libc::c_int = 8;
    let mut groups = [0 as libc::gid_t; GROUPS_LEN as usize];
    // SAFETY: getgroups writes at most `groups.len()` entries into the valid array.
    let n = unsafe { libc::getgroups(GROUPS_LEN, groups.as_mut_ptr()) };
    if n < 0 || groups[..n as usize].iter().any(|&g| g != gid) {
        return Err(err(format!(
            "supplementary groups are {:?}",
            &groups[..n.max(0) as usize]
        )));
    }
    // SAFETY: setuid with a plain id; it must fail now.
    if ids.uid != 0 && unsafe { libc::setuid(0) } == 0 {
        return Err(err("setuid(0) still succeeds".into()));
    }
    Ok(())
}

/// Opening a file fails with EACCES instead of killing the daemon: glibc's malloc opens
/// `/proc/sys/vm/overcommit_memory` the first time it shrinks a thread's heap (and similar lazy
/// look-ups exist) and copes with the failure; killing a healthy daemon there would be wrong.
/// Nothing is opened either way.
#[rustfmt::skip]
pub const DENIED_WITH_EACCES: &[(&str, libc::c_long)] = &[
    ("openat", libc::SYS_openat), ("openat2", libc::SYS_openat2),
    #[cfg(target_arch = "x86_64")] ("open", libc::SYS_open),
    #[cfg(target_arch = "x86_64")] ("creat", libc::SYS_creat),
];

/// A system call number as seccompiler's key (`c_long` is 32 bits on 32-bit targets).
#[allow(clippy::unnecessary_cast)]
fn nr64(nr: libc::c_long) -> i64 {
    nr as i64
}

/// The BPF programs for `mode` (none for `off`): the allow-list, and in `kill` mode a second
/// filter that turns the open family into EACCES (the kernel applies the strictest verdict of
/// all filters, so the open calls are on the allow-list of the first one and refused by the
/// second).
///
/// `allow_open`: the daemon serves a control socket, whose live snapshots create and open image
/// files; the open family is then allowed (everything else stays as it is).
pub fn build_filter(mode: SeccompMode, allow_open: bool) -> Result<Vec<BpfProgram>, SandboxError> {
    let mismatch = match mode {
        SeccompMode::Off => return Ok(Vec::new()),
        SeccompMode::Kill => SeccompAction::Trap,
        SeccompMode::Log => SeccompAction::Log,
    };
    let serr = |e: seccompiler::BackendError| SandboxError::Seccomp(e.to_string());
    let arch: seccompiler::TargetArch = std::env::consts::ARCH
        .try_into()
        .map_err(|e: seccompiler::BackendError| SandboxError::Seccomp(e.to_string()))?;
    let mut programs = Vec::new();
    let mut rules: std::collections::BTreeMap<i64, Vec<SeccompRule>> = ALLOWED
        .iter()
        .map(|&(_, nr)| (nr64(nr), Vec::new()))
        .collect();
    if allow_open {
        rules.extend(
            DENIED_WITH_EACCES
                .iter()
                .map(|&(_, nr)| (nr64(nr), Vec::new())),
        );
    } else if mode == SeccompMode::Kill {
        let opens: std::collections::BTreeMap<i64, Vec<SeccompRule>> = DENIED_WITH_EACCES
            .iter()
            .map(|&(_, nr)| (nr64(nr), Vec::new()))
            .collect();
        rules.extend(opens.clone());
        let deny = SeccompFilter::new(
            opens,
            SeccompAction::Allow,
            SeccompAction::Errno(libc::EACCES as u32),
            arch,
        )
        .map_err(serr)?;
        programs.push(deny.try_into().map_err(serr)?);
    }
    // An NBD backing export reconnects after a server restart: stream sockets of the unix,
    // IPv4 and IPv6 families, and connect. Addresses were resolved at start-up, so no name
    // lookup (and no file) is needed. Only when this process opened an export.
    if nbd_client::in_use() {
        let mut socket_rules = Vec::new();
        for family in [libc::AF_UNIX, libc::AF_INET, libc::AF_INET6] {
            let c =
                SeccompCondition::new(0, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, family as u64)
                    .map_err(serr)?;
            socket_rules.push(SeccompRule::new(vec![c]).map_err(serr)?);
        }
        rules.insert(nr64(libc::SYS_socket), socket_rules);
        rules.insert(nr64(libc::SYS_connect), Vec::new());
    }
    // Threads name themselves with prctl(PR_SET_NAME); nothing else of prctl is allowed.
    let set_name = SeccompCondition::new(
        0,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::Eq,
        libc::PR_SET_NAME as u64,
    )
    .map_err(serr)?;
    rules.insert(
        nr64(libc::SYS_prctl),
        vec![SeccompRule::new(vec![set_name]).map_err(serr)?],
    );
    let filter = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, arch).map_err(serr)?;
    programs.push(filter.try_into().map_err(serr)?);
    Ok(programs)
}

/// Formats `n` in decimal into `buf` without allocating; returns the digits.
fn fmt_u64(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    &buf[i..]
}

/// The SIGSYS handler of `kill` mode: one line on stderr, then exit(159). Only write(2) and
/// exit_group(2), both allowed, and no allocation.
extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // The SIGSYS layout of siginfo on 64-bit Linux: signo, errno, code (3 x i32, padded to 16),
    // call address (8 bytes), then the system call number (i32) at byte 24.
    // SAFETY: the kernel passes a valid siginfo for an SA_SIGINFO handler; SIGSYS from seccomp
    // fills the _sigsys member read here.
    let nr = unsafe { *(info as *const u8).add(24).cast::<i32>() };
    // SAFETY: gettid has no preconditions.
    let tid = unsafe { libc::syscall(libc::SYS_gettid) } as u64;
    let mut line = [0u8; 256];
    let mut len = 0;
    let mut push = |s: &[u8]| {
        let n = s.len().min(line.len() - len);
        line[len..len + n].copy_from_slice(&s[..n]);
        len += n;
    };
    let mut digits = [0u8; 20];
    push(b"snapblk: seccomp: forbidden system call ");
    push(fmt_u64(nr as u64, &mut digits));
    push(b" (");
    push(
        syscall_name(libc::c_long::from(nr))
            .unwrap_or("unknown; see ausyscall")
            .as_bytes(),
    );
    push(b") in thread ");
    push(fmt_u64(tid, &mut digits));
    push(b"; the daemon is killed (serve with --seccomp log to find missing calls)\n");
    // SAFETY: write and _exit are async-signal-safe; `line[..len]` is initialised.
    unsafe {
        libc::write(2, line.as_ptr().cast(), len);
        libc::_exit(SECCOMP_KILL_STATUS);
    }
}

fn install_sigsys_handler() -> Result<(), SandboxError> {
    // SAFETY: sigaction is plain data, initialised field by field below.
    let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
    let handler: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) = on_sigsys;
    sa.sa_sigaction = handler as usize;
    sa.sa_flags = libc::SA_SIGINFO;
    // SAFETY: `sa` is valid; the handler only uses async-signal-safe calls.
    let rc = unsafe {
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(libc::SIGSYS, &sa, std::ptr::null_mut())
    };
    if rc != 0 {
        return Err(SandboxError::Seccomp(last_os("sigaction(SIGSYS)")));
    }
    Ok(())
}

/// Settles what glibc would otherwise look up lazily from a file after the filter is on: the
/// malloc arena limit, which glibc computes from `/sys/devices/system/cpu/online` the first time a
/// new thread needs an arena beyond the first eight. Fixing it here to glibc's own default
/// (8 arenas per CPU) changes nothing but when the CPU count is read.
fn settle_lazy_lookups() {
    #[cfg(target_env = "gnu")]
    {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let arenas = libc::c_int::try_from(cpus.saturating_mul(8)).unwrap_or(libc::c_int::MAX);
        // SAFETY: mallopt only sets a malloc tunable.
        if unsafe { libc::mallopt(libc::M_ARENA_MAX, arenas) } != 1 {
            log::warn!("cannot set the malloc arena limit; a new thread may hit the filter");
        }
    }
}

/// Installs the filter of `mode` on every thread of the process.
pub fn apply_seccomp(mode: SeccompMode, allow_open: bool) -> Result<(), SandboxError> {
    let programs = build_filter(mode, allow_open)?;
    if programs.is_empty() {
        return Ok(());
    }
    settle_lazy_lookups();
    if mode == SeccompMode::Kill {
        install_sigsys_handler()?;
    }
    for prog in &programs {
        seccompiler::apply_filter_all_threads(prog)
            .map_err(|e| SandboxError::Seccomp(e.to_string()))?;
    }
    Ok(())
}

/// Enters the sandbox for `serve` (see the module documentation for the order).
pub fn enter(args: &ServeArgs, disk: &ServedDisk) -> Result<(), SandboxError> {
    TEST_TRIGGER.store(
        std::env::var_os(TEST_FORBIDDEN_SYSCALL_ENV).is_some_and(|v| v == "1"),
        Ordering::SeqCst,
    );
    // A live snapshot names the current top as its backing file by path, so with a control
    // socket the throwaway overlay must keep its name (it is removed at exit instead).
    if args.control_socket.is_none() {
        disk.unlink_throwaway_overlay();
    }
    if let Some(spec) = &args.user {
        let ids = resolve_user(spec)?;
        drop_privileges(ids)?;
        log::info!("running as uid {} gid {}", ids.uid, ids.gid);
    }
    let allow_open = args.control_socket.is_some();
    apply_seccomp(args.seccomp, allow_open)?;
    match args.seccomp {
        SeccompMode::Kill if allow_open => log::info!(
            "seccomp filter on: {} system calls allowed, opening files too (the control socket's \
             live snapshots create image files), any other call kills the daemon",
            ALLOWED.len() + 1
        ),
        SeccompMode::Kill => log::info!(
            "seccomp filter on: {} system calls allowed, opening files fails with EACCES, any \
             other call kills the daemon",
            ALLOWED.len() + 1
        ),
        SeccompMode::Log => {
            log::warn!("seccomp filter in log mode: forbidden calls are only logged")
        }
        SeccompMode::Off => log::warn!("seccomp filter off"),
    }
    Ok(())
}

/// Test hook (see the module documentation): makes the calling queue thread try socket(2) once.
pub fn test_trigger_forbidden_syscall() {
    // A plain load first: the hot path never writes the shared flag.
    if TEST_TRIGGER.load(Ordering::Relaxed) && TEST_TRIGGER.swap(false, Ordering::SeqCst) {
        match std::fs::File::open("/etc/passwd") {
            Ok(_) => log::warn!("test hook: opened /etc/passwd from a queue thread"),
            Err(e) => log::warn!("test hook: open /etc/passwd from a queue thread: {e}"),
        }
        log::warn!("test hook {TEST_FORBIDDEN_SYSCALL_ENV}: calling socket(2) from a queue thread");
        // SAFETY: socket takes plain integers; a descriptor it may return is closed at once.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
        if fd >= 0 {
            // SAFETY: `fd` was just returned by socket and is owned here.
            unsafe { libc::close(fd) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allow_list_has_no_duplicates_and_names_the_io_uring_calls() {
        let mut nrs: Vec<_> = ALLOWED.iter().map(|(_, n)| *n).collect();
        nrs.sort_unstable();
        nrs.dedup();
        assert_eq!(nrs.len(), ALLOWED.len());
        for name in ["io_uring_setup", "io_uring_enter", "io_uring_register"] {
            assert!(ALLOWED.iter().any(|(n, _)| *n == name), "{name}");
        }
        for forbidden in [libc::SYS_openat, libc::SYS_socket, libc::SYS_execve] {
            assert!(!ALLOWED.iter().any(|(_, n)| *n == forbidden));
        }
        assert_eq!(syscall_name(libc::SYS_socket), Some("socket"));
    }

    #[test]
    fn filters_build_for_every_mode() {
        assert!(build_filter(SeccompMode::Off, false).unwrap().is_empty());
        let kill = build_filter(SeccompMode::Kill, false).unwrap();
        assert_eq!(kill.len(), 2, "allow-list and the EACCES filter for opens");
        assert!(kill.iter().all(|p| !p.is_empty()));
        assert_eq!(build_filter(SeccompMode::Log, false).unwrap().len(), 1);
    }

    #[test]
    fn user_spec_resolves_names_numbers_and_refuses_unknown_names() {
        assert_eq!(resolve_user("root").unwrap(), Ids { uid: 0, gid: 0 });
        assert_eq!(
            resolve_user("root:12345").unwrap(),
            Ids { uid: 0, gid: 12345 }
        );
        assert_eq!(
            resolve_user("4242:4343").unwrap(),
            Ids {
                uid: 4242,
                gid: 4343
            }
        );
        for bad in [
            "",
            ":",
            "root:",
            "no-such-user-snapblk",
            "root:no-such-group-snapblk",
        ] {
            let e = resolve_user(bad).unwrap_err().to_string();
            assert!(e.starts_with(&format!("--user {bad}:")), "{e}");
        }
        let e = resolve_user("4242").unwrap_err().to_string();
        assert!(e.contains("give the group"), "{e}");
    }

    #[test]
    fn decimal_formatting_without_allocation() {
        let mut b = [0u8; 20];
        assert_eq!(fmt_u64(0, &mut b), b"0");
        assert_eq!(fmt_u64(41, &mut b), b"41");
        assert_eq!(fmt_u64(u64::MAX, &mut b), b"18446744073709551615");
    }
}
