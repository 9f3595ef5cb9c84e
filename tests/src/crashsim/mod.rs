//! Crash-state simulation and fault injection under the qcow2 engine.
//!
//! # The durability contract these tools enforce
//!
//! - **Daemon killed (SIGKILL) or host power loss.** Everything the daemon acknowledged a FLUSH
//!   for survives: after reopening the image (the engine sees the dirty bit and repairs leaked
//!   refcounts, like QEMU), every 512-byte sector that was flushed reads back either its flushed
//!   value or a value a *later* request wrote into it. It never reads as zeros, as stale backing
//!   data, or as an older value, unless that was the flushed value. With the cache in writeback
//!   mode, writes acknowledged after the last completed FLUSH may be lost, but a sector is never
//!   half-applied: it holds one request's bytes, never a mix. The image itself stays consistent:
//!   `qemu-img check` exits 0 (clean) or 3 (leaked clusters only), never 2 (corruption).
//! - **I/O error from the image file** (EIO, ENOSPC on a write or on fdatasync). The request that
//!   hit it fails (the virtio layer answers `VIRTIO_BLK_S_IOERR`); data made durable by an earlier
//!   FLUSH stays intact; the image stays consistent (`qemu-img check` 0 or 3). After a one-off
//!   error the same open image keeps serving: other data reads back right, and a retried write
//!   plus FLUSH succeed, unless the engine deliberately marked the image corrupt and says so with
//!   `BlockError::Corrupt`.
//!
//! # What this module owns (one submodule each)
//!
//! - [`Recorder`] / [`RecordingFile`]: an in-memory host file for the qcow2 engine that logs
//!   every write (offset and bytes), every length change and every `sync_data`, in the spirit of
//!   dm-log-writes.
//! - [`FaultyFile`]: a host file wrapper that fails the Nth write or the Nth sync with EIO or
//!   ENOSPC, once or from then on (QEMU iotest 026 style).
//! - [`CrashLog`] / [`crash_states`]: turn a recorded log into crash states (CrashMonkey/ALICE
//!   style): the file at every sync boundary, and for the writes in flight between two syncs
//!   their prefixes, random subsets (the writes may reach the disk in any order) and torn
//!   versions (each write cut into 4 KiB sectors of which a random subset lands).
//! - [`Workload`] / [`Driver`] / [`Expectation`]: random guest workloads, the shadow of what the
//!   guest was acknowledged at every flush, and the check of a recovered image against it.
//! - [`qemu_img_check`]: the real `qemu-img check` as a referee.
//!
//! Locking model: a [`Recorder`] keeps its whole state (current bytes, log) behind one mutex, so
//! the log is a total order of the host-file operations even when the engine or the cache issue
//! them from several threads. [`FaultyFile`] counts with atomics. Everything else is owned by
//! one test thread.

mod fault;
mod overlay;
mod record;
mod states;
#[cfg(test)]
mod tests;
mod workload;

pub use fault::*;
pub use overlay::*;
pub use record::*;
pub use states::*;
pub use workload::*;

use std::io;
use std::path::Path;
use std::process::Command;

/// Granularity at which the verifier compares guest data (the virtio-blk sector).
pub const GUEST_SECTOR: u64 = 512;
/// Largest in-memory file a [`Recorder`] accepts.
pub const MAX_MEM_FILE: u64 = 4 << 30;
/// Granularity at which recorded host writes may tear (a page / a 4Kn disk sector).
pub const TEAR_SECTOR: u64 = 4096;

// ---------------------------------------------------------------------------------------------
// Referees
// ---------------------------------------------------------------------------------------------

/// Whether `qemu-img` can be run.
pub fn have_qemu_img() -> bool {
    Command::new("qemu-img")
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// Runs `qemu-img check -f qcow2 PATH`; returns its exit code and output.
pub fn qemu_img_check(path: &Path) -> io::Result<(i32, String)> {
    let out = Command::new("qemu-img")
        .args(["check", "-f", "qcow2"])
        .arg(path)
        .output()?;
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    let lines: Vec<&str> = text.lines().collect();
    if lines.len() > 16 {
        text = format!(
            "{}\n... {} more lines",
            lines[..16].join("\n"),
            lines.len() - 16
        );
    }
    Ok((out.status.code().unwrap_or(-1), text))
}

/// A seed from `SNAPBLK_CRASH_SEED` or the clock, printed so a failure can be replayed.
pub fn seed_from_env(test: &str) -> u64 {
    let seed = std::env::var("SNAPBLK_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(42)
        });
    eprintln!("{test}: seed {seed} (replay with SNAPBLK_CRASH_SEED={seed})");
    seed
}

/// A directory for crash-state files: on tmpfs when there is one.
pub fn state_dir() -> io::Result<tempfile::TempDir> {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        if let Ok(d) = tempfile::Builder::new()
            .prefix("snapblk-crash")
            .tempdir_in(shm)
        {
            return Ok(d);
        }
    }
    tempfile::Builder::new().prefix("snapblk-crash").tempdir()
}
