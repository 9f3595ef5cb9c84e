//! Image locking that QEMU honours: the advisory lock protocol of QEMU's `file-posix` driver.
//!
//! QEMU describes what a user of an image file does with four permission bits (`BLK_PERM_*` in
//! `include/block/block-common.h`): bit 0 consistent read, bit 1 write, bit 2 write-unchanged,
//! bit 3 resize (bit 4 was the removed graph-mod permission). A user *holds* a permission by
//! taking a shared (read) open-file-description lock on byte `100 + bit`, and declares that it
//! does *not share* a permission with others by taking a shared lock on byte `200 + bit`. Before
//! locking, it tests for conflicts (an exclusive test lock, `F_OFD_GETLK`): for every permission
//! it wants, nobody may hold byte `200 + bit` (somebody refuses to share it); for every permission
//! it does not share, nobody may hold byte `100 + bit` (somebody already uses it). This module
//! does exactly that, so QEMU, qemu-img, qemu-io and qemu-storage-daemon see snapblk as one more
//! QEMU, and two snapblk processes exclude each other the same way.
//!
//! Locking model: the locks belong to the open file description. They are held for as long as
//! the `File` (or any descriptor duplicated from it) stays open, so a layer keeps its image locked
//! by keeping its `File`; they are dropped by the kernel when the last descriptor closes, also on
//! a crash. Two descriptions of one file in one process conflict like two processes do. The
//! test-then-lock sequence has the same small window QEMU's has (two openers racing in it may both
//! succeed); it is advisory locking between cooperating programs, not a security boundary.
//! The force-share setting is per thread ([`with_force_share`]).

use std::cell::Cell;
use std::fs::File;
use std::io;
use std::os::unix::io::AsRawFd;

/// First byte of the "holds permission" range (QEMU's `RAW_LOCK_PERM_BASE`).
pub const PERM_BASE: u64 = 100;
/// First byte of the "does not share permission" range (QEMU's `RAW_LOCK_SHARED_BASE`).
pub const SHARED_BASE: u64 = 200;

/// `BLK_PERM_CONSISTENT_READ`: the reader sees a complete, self-consistent disk.
pub const PERM_CONSISTENT_READ: u64 = 0x01;
/// `BLK_PERM_WRITE`: may change the visible content.
pub const PERM_WRITE: u64 = 0x02;
/// `BLK_PERM_WRITE_UNCHANGED`: may write without changing the visible content.
pub const PERM_WRITE_UNCHANGED: u64 = 0x04;
/// `BLK_PERM_RESIZE`: may change the size.
pub const PERM_RESIZE: u64 = 0x08;
/// `BLK_PERM_ALL`.
pub const PERM_ALL: u64 = 0x0f;

/// How long a conflicting lock is re-tested before it counts (see [`lock_image`]).
pub const CONFLICT_GRACE: std::time::Duration = std::time::Duration::from_millis(250);

/// Number of permission bits QEMU locks.
const PERM_BITS: u32 = 4;

/// What an opener does with an image file and what it lets others do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Perms {
    /// Permissions taken (`BLK_PERM_*` bits).
    pub perm: u64,
    /// Permissions other users may hold at the same time.
    pub shared: u64,
}

impl Perms {
    /// A writable image (a served overlay, a commit target, a repair): consistent read, write and
    /// resize; others may only read and do unchanging writes. Like a read-write qcow2 node's file
    /// in QEMU.
    pub const WRITER: Perms = Perms {
        perm: PERM_CONSISTENT_READ | PERM_WRITE | PERM_RESIZE,
        shared: PERM_CONSISTENT_READ | PERM_WRITE_UNCHANGED,
    };
    /// A read-only image or a backing file: consistent read; shares everything except write and
    /// resize, like QEMU does for backing files and `qemu-img info`.
    pub const READER: Perms = Perms {
        perm: PERM_CONSISTENT_READ,
        shared: PERM_ALL & !(PERM_WRITE | PERM_RESIZE),
    };
    /// `-U/--force-share`: read for inspection and share everything, like `qemu-img -U`.
    pub const FORCE_SHARE: Perms = Perms {
        perm: PERM_CONSISTENT_READ,
        shared: PERM_ALL,
    };

    /// The permissions for an ordinary open: [`Perms::WRITER`] for read-write, otherwise
    /// [`Perms::READER`], or [`Perms::FORCE_SHARE`] inside [`with_force_share`].
    pub fn for_open(read_only: bool) -> Perms {
        match (read_only, force_share_active()) {
            (false, _) => Perms::WRITER,
            (true, false) => Perms::READER,
            (true, true) => Perms::FORCE_SHARE,
        }
    }
}

/// QEMU's name of one permission bit (as in its "Failed to get ... lock" errors).
pub fn perm_name(bit: u64) -> &'static str {
    match bit {
        PERM_CONSISTENT_READ => "consistent read",
        PERM_WRITE => "write",
        PERM_WRITE_UNCHANGED => "write unchanged",
        PERM_RESIZE => "resize",
        _ => "unknown",
    }
}

thread_local! {
    static FORCE_SHARE: Cell<bool> = const { Cell::new(false) };
}

fn force_share_active() -> bool {
    FORCE_SHARE.with(Cell::get)
}

/// Runs `f` with force-share on for this thread: every image opened read-only inside takes
/// [`Perms::FORCE_SHARE`] instead of [`Perms::READER`] (`qemu-img -U`). Read-write opens are not
/// affected.
pub fn with_force_share<R>(f: impl FnOnce() -> R) -> R {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            FORCE_SHARE.with(|c| c.set(self.0));
        }
    }
    let _restore = Restore(FORCE_SHARE.with(|c| c.replace(true)));
    f()
}

/// The image is locked by another user in a way that conflicts with `perms`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LockConflict {
    /// Somebody does not share a permission we want.
    #[error("failed to get \"{}\" lock: the image is in use by another process (QEMU or snapblk)", perm_name(*.0))]
    Perm(u64),
    /// Somebody holds a permission we do not share.
    #[error("failed to get shared \"{}\" lock: the image is in use by another process (QEMU or snapblk); use -U to inspect it read-only", perm_name(*.0))]
    Shared(u64),
}

fn flock(kind: libc::c_short, byte: u64) -> libc::flock {
    // SAFETY: `flock` is a plain C struct of integers; all-zero is a valid value.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    // The lock bytes are 100..=299: always in range.
    fl.l_start = libc::off_t::try_from(byte).unwrap_or(libc::off_t::MAX);
    fl.l_len = 1;
    fl.l_pid = 0; // required by OFD locks
    fl
}

/// Whether somebody else (another open file description) holds a lock on `byte`.
fn byte_is_locked(file: &File, byte: u64) -> io::Result<bool> {
    let mut fl = flock(libc::F_WRLCK as libc::c_short, byte);
    // SAFETY: F_OFD_GETLK reads and writes only `fl`, which lives for the whole call; the
    // descriptor is owned by `file`.
    let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) };
    if r == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(fl.l_type != libc::F_UNLCK as libc::c_short)
}

/// Takes a shared lock on `byte` (never waits).
fn lock_byte(file: &File, byte: u64) -> io::Result<()> {
    let fl = flock(libc::F_RDLCK as libc::c_short, byte);
    // SAFETY: F_OFD_SETLK only reads `fl`; the descriptor is owned by `file`.
    let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &fl) };
    if r == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn bits() -> impl Iterator<Item = u64> {
    (0..PERM_BITS).map(|i| 1u64 << i)
}

/// Tests whether `perms` conflict with the locks other users hold on `file`, without locking.
pub fn check_conflict(file: &File, perms: Perms) -> io::Result<Option<LockConflict>> {
    for (i, bit) in bits().enumerate() {
        if perms.perm & bit != 0 && byte_is_locked(file, SHARED_BASE + i as u64)? {
            return Ok(Some(LockConflict::Perm(bit)));
        }
    }
    for (i, bit) in bits().enumerate() {
        if perms.shared & bit == 0 && byte_is_locked(file, PERM_BASE + i as u64)? {
            return Ok(Some(LockConflict::Shared(bit)));
        }
    }
    Ok(None)
}

/// Whether an error from [`lock_image`] means "in use by another process".
pub fn is_conflict(e: &io::Error) -> bool {
    e.get_ref()
        .is_some_and(|inner| inner.downcast_ref::<LockConflict>().is_some())
}

fn conflict_error(c: LockConflict) -> io::Error {
    io::Error::new(io::ErrorKind::WouldBlock, c)
}

/// Whether the file system cannot lock at all (QEMU's `locking=auto` then goes on unlocked).
fn locking_unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ENOLCK) | Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS)
    )
}

/// Locks `file` for `perms` the way QEMU's file driver does: refuses with a [`LockConflict`]
/// error (kind `WouldBlock`, see [`is_conflict`]) if another user's locks conflict, otherwise
/// takes the permission and shared-permission bytes. The locks live as long as the file's open
/// file description. On a file system without lock support it logs a warning and succeeds, like
/// QEMU's default `locking=auto`.
///
/// A conflict is re-tested for up to [`CONFLICT_GRACE`] before it is reported: a description
/// closed a moment ago can still be alive in a child process that another thread has forked but
/// that has not yet reached `exec` (close-on-exec descriptors live until then), which would
/// otherwise make an image just closed by this very process look in use.
pub fn lock_image(file: &File, perms: Perms) -> io::Result<()> {
    let deadline = std::time::Instant::now() + CONFLICT_GRACE;
    loop {
        match check_conflict(file, perms) {
            Ok(None) => break,
            Ok(Some(c)) => {
                if std::time::Instant::now() >= deadline {
                    return Err(conflict_error(c));
                }
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            Err(e) if locking_unsupported(&e) => {
                log::warn!("image locking is not supported here ({e}); opening unlocked");
                return Ok(());
            }
            Err(e) => return Err(e),
        }
    }
    take_over(file, perms)
}

/// Takes the lock bytes for `perms` on `file` without testing for conflicts first. Only for a
/// process that opens an image it already holds through another description (a live snapshot
/// reopening its top read-only): the test would report that very description, which the caller
/// retires right after. The bytes are shared locks, so they never block on another holder.
pub fn take_over(file: &File, perms: Perms) -> io::Result<()> {
    for (i, bit) in bits().enumerate() {
        if perms.perm & bit != 0 {
            take(file, PERM_BASE + i as u64, LockConflict::Shared(bit))?;
        }
    }
    for (i, bit) in bits().enumerate() {
        if perms.shared & bit == 0 {
            take(file, SHARED_BASE + i as u64, LockConflict::Perm(bit))?;
        }
    }
    Ok(())
}

fn take(file: &File, byte: u64, on_busy: LockConflict) -> io::Result<()> {
    match lock_byte(file, byte) {
        Ok(()) => Ok(()),
        Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EACCES)) => {
            Err(conflict_error(on_busy))
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::OpenOptions;

    fn open(path: &std::path::Path, rw: bool) -> File {
        OpenOptions::new().read(true).write(rw).open(path).unwrap()
    }

    fn locked_bytes(file: &File) -> Vec<u64> {
        (PERM_BASE..PERM_BASE + 4)
            .chain(SHARED_BASE..SHARED_BASE + 4)
            .filter(|&b| byte_is_locked(file, b).unwrap())
            .collect()
    }

    #[test]
    fn writer_locks_exactly_the_bytes_qemu_uses_for_a_read_write_qcow2_file() {
        let tmp = tempfile::NamedTempFile::new().unwrap();
        let w = open(tmp.path(), true);
        lock_image(&w, Perms::WRITER).unwrap();
        let probe = open(tmp.path(), false);
        // holds read (100), write (101), resize (103); does not share write (201), resize (203)
        assert_eq!(locked_bytes(&probe), vec![100, 101, 103, 201, 203]);
        // its own description sees no conflict with itself
        assert!(check_conflict(&w, Perms::WRITER).unwrap().is_none());
    }

    #[test]
    fn two_writers_exclude_each_other_and_readers_need_force_share() {
        let tmp = tempfile::NamedTempFile::new().unwrap();
        let w = open(tmp.path(), true);
        lock_image(&w, Perms::WRITER).unwrap();
        let e = lock_image(&open(tmp.path(), true), Perms::WRITER).unwrap_err();
        assert!(is_conflict(&e), "{e}");
        assert!(e.to_string().contains("in use"), "{e}");
        let e = lock_image(&open(tmp.path(), false), Perms::READER).unwrap_err();
        assert!(is_conflict(&e), "{e}");
        lock_image(&open(tmp.path(), false), Perms::FORCE_SHARE).unwrap();
    }

    #[test]
    fn readers_share_with_readers_but_block_writers_until_closed() {
        let tmp = tempfile::NamedTempFile::new().unwrap();
        let r1 = open(tmp.path(), false);
        lock_image(&r1, Perms::READER).unwrap();
        let r2 = open(tmp.path(), false);
        lock_image(&r2, Perms::READER).unwrap();
        let w = open(tmp.path(), true);
        assert!(is_conflict(&lock_image(&w, Perms::WRITER).unwrap_err()));
        drop(r1);
        drop(r2);
        lock_image(&w, Perms::WRITER).unwrap();
    }

    #[test]
    fn a_conflict_names_the_permission_as_qemu_does() {
        assert_eq!(perm_name(PERM_CONSISTENT_READ), "consistent read");
        assert_eq!(perm_name(PERM_WRITE), "write");
        assert_eq!(perm_name(PERM_WRITE_UNCHANGED), "write unchanged");
        assert_eq!(perm_name(PERM_RESIZE), "resize");
        assert_eq!(perm_name(0x10), "unknown");
        let tmp = tempfile::NamedTempFile::new().unwrap();
        let w = open(tmp.path(), true);
        lock_image(&w, Perms::WRITER).unwrap();
        // The second writer wants write, which the first does not share.
        let e = lock_image(&open(tmp.path(), true), Perms::WRITER).unwrap_err();
        assert!(
            e.to_string().contains("failed to get \"write\" lock"),
            "{e}"
        );
        // A reader does not share write, which the writer holds.
        let e = lock_image(&open(tmp.path(), false), Perms::READER).unwrap_err();
        assert!(
            e.to_string()
                .contains("failed to get shared \"write\" lock"),
            "{e}"
        );
    }

    #[test]
    fn a_conflict_that_ends_within_the_grace_period_is_waited_for() {
        let tmp = tempfile::NamedTempFile::new().unwrap();
        let holder = open(tmp.path(), true);
        lock_image(&holder, Perms::WRITER).unwrap();
        let closer = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(20));
            drop(holder);
        });
        // Re-tested until the holder's description is gone (well within CONFLICT_GRACE).
        lock_image(&open(tmp.path(), true), Perms::WRITER).unwrap();
        closer.join().unwrap();
    }

    #[test]
    fn an_image_whose_locks_cannot_be_tested_or_taken_fails_and_is_not_a_conflict() {
        use std::os::unix::fs::OpenOptionsExt;
        let tmp = tempfile::NamedTempFile::new().unwrap();
        // An O_PATH descriptor: fcntl locking on it fails with EBADF.
        let path_only = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_PATH)
            .open(tmp.path())
            .unwrap();
        for e in [
            check_conflict(&path_only, Perms::WRITER).unwrap_err(),
            lock_image(&path_only, Perms::WRITER).unwrap_err(),
            take_over(&path_only, Perms::WRITER).unwrap_err(),
        ] {
            assert_eq!(e.raw_os_error(), Some(libc::EBADF), "{e}");
            assert!(!is_conflict(&e), "{e}");
        }
        // Only a file system without locks goes on unlocked.
        for errno in [libc::ENOLCK, libc::EOPNOTSUPP, libc::ENOSYS] {
            assert!(locking_unsupported(&io::Error::from_raw_os_error(errno)));
        }
        assert!(!locking_unsupported(&io::Error::from_raw_os_error(
            libc::EBADF
        )));
    }

    #[test]
    fn a_byte_another_description_holds_exclusively_is_a_conflict_when_taken_over() {
        let tmp = tempfile::NamedTempFile::new().unwrap();
        let other = open(tmp.path(), true);
        // Not what QEMU does (its locks are shared), but what a foreign locker could.
        let fl = flock(libc::F_WRLCK as libc::c_short, PERM_BASE + 1);
        // SAFETY: F_OFD_SETLK only reads `fl`; the descriptor is owned by `other`.
        let r = unsafe { libc::fcntl(other.as_raw_fd(), libc::F_OFD_SETLK, &fl) };
        assert_eq!(r, 0, "{}", io::Error::last_os_error());
        let e = take_over(&open(tmp.path(), true), Perms::WRITER).unwrap_err();
        assert!(is_conflict(&e), "{e}");
        assert!(e.to_string().contains("shared \"write\" lock"), "{e}");
    }

    #[test]
    fn force_share_scope_applies_to_read_only_opens_of_this_thread_only() {
        assert_eq!(Perms::for_open(true), Perms::READER);
        with_force_share(|| {
            assert_eq!(Perms::for_open(true), Perms::FORCE_SHARE);
            assert_eq!(Perms::for_open(false), Perms::WRITER);
            std::thread::spawn(|| assert_eq!(Perms::for_open(true), Perms::READER))
                .join()
                .unwrap();
        });
        assert_eq!(Perms::for_open(true), Perms::READER);
    }
}
