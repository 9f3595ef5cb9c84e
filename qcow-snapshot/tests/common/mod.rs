//! Helpers shared by the qcow-snapshot integration tests: running qemu-img/qemu-io, making
//! patterned files, comparing a device with a reference.
#![allow(dead_code)]

use std::path::Path;
use std::process::Command;

use blockdev::BlockDev;
use rand::{Rng, SeedableRng};

/// Runs `prog args`, panicking with its output if it fails; returns stdout.
pub fn run(prog: &str, args: &[&str]) -> String {
    let out = Command::new(prog)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{prog}: {e}"));
    assert!(
        out.status.success(),
        "{prog} {args:?} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `qemu-img check` must exit 0 (no errors, no leaks).
pub fn qemu_check(img: &Path) {
    run("qemu-img", &["check", img.to_str().unwrap()]);
}

/// `qemu-img compare` of the image (any chain) with a raw reference must say identical.
pub fn qemu_compare(img: &Path, raw: &Path) {
    run(
        "qemu-img",
        &[
            "compare",
            "-f",
            "qcow2",
            "-F",
            "raw",
            img.to_str().unwrap(),
            raw.to_str().unwrap(),
        ],
    );
}

/// qemu-io writes pattern bytes into an image.
pub fn qemu_io_write(img: &Path, fmt: &str, pattern: u8, off: u64, len: u64) {
    let cmd = format!("write -P {pattern:#x} {off} {len}");
    run("qemu-io", &["-f", fmt, "-c", &cmd, img.to_str().unwrap()]);
}

/// Deterministic pseudo-random bytes.
pub fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut r = rand::rngs::StdRng::seed_from_u64(seed);
    let mut v = vec![0u8; len];
    r.fill(&mut v[..]);
    v
}

/// Reads the whole device.
pub fn read_all(dev: &dyn BlockDev) -> Vec<u8> {
    let mut v = vec![0u8; dev.size() as usize];
    dev.read_at(&mut v, 0).unwrap();
    v
}

/// Asserts two buffers are equal, reporting the first differing offset.
pub fn assert_same(got: &[u8], want: &[u8], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if got == want {
        return;
    }
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!(
            "{what}: first difference at byte {i:#x}: got {:#04x}, want {:#04x}",
            got[i], want[i]
        );
    }
}

/// One host-file operation, as recorded by [`CrashHost`].
#[derive(Debug, Clone)]
pub enum Op {
    /// A write of `data` at `off`.
    Write { off: u64, data: Vec<u8> },
    /// `sync_data`.
    Sync,
}

#[derive(Default)]
struct CrashState {
    current: Vec<u8>,
    log: Vec<Op>,
}

/// An in-memory host file that records every write and sync, so tests can rebuild the durable
/// state at any point (crash simulation) and check write ordering.
#[derive(Default, Clone)]
pub struct CrashHost {
    state: std::sync::Arc<std::sync::Mutex<CrashState>>,
}

fn apply(buf: &mut Vec<u8>, off: u64, data: &[u8]) {
    let end = off as usize + data.len();
    if buf.len() < end {
        buf.resize(end, 0);
    }
    buf[off as usize..end].copy_from_slice(data);
}

impl CrashHost {
    /// A host file starting with `data` (treated as durable).
    pub fn new(data: Vec<u8>) -> Self {
        let h = CrashHost::default();
        {
            let mut s = h.state.lock().unwrap();
            s.current = data.clone();
            s.log.push(Op::Write { off: 0, data });
            s.log.push(Op::Sync);
        }
        h
    }

    /// A copy of the log.
    pub fn log(&self) -> Vec<Op> {
        self.state.lock().unwrap().log.clone()
    }

    /// The current (not necessarily durable) content.
    pub fn current(&self) -> Vec<u8> {
        self.state.lock().unwrap().current.clone()
    }

    /// The file after a crash: everything up to the last sync, plus the unsynced writes for
    /// which `keep(i)` says yes (in order).
    pub fn crash_image(&self, keep: &mut dyn FnMut(usize) -> bool) -> Vec<u8> {
        let log = self.log();
        let last_sync = log.iter().rposition(|o| matches!(o, Op::Sync)).unwrap_or(0);
        let mut img = Vec::new();
        for (i, op) in log.iter().enumerate() {
            if let Op::Write { off, data } = op {
                if i < last_sync || keep(i) {
                    apply(&mut img, *off, data);
                }
            }
        }
        img
    }
}

impl qcow_snapshot::HostFile for CrashHost {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let s = self.state.lock().unwrap();
        buf.fill(0);
        if let Some(avail) = s.current.get(offset as usize..) {
            let n = avail.len().min(buf.len());
            buf[..n].copy_from_slice(&avail[..n]);
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        let mut s = self.state.lock().unwrap();
        apply(&mut s.current, offset, buf);
        s.log.push(Op::Write {
            off: offset,
            data: buf.to_vec(),
        });
        Ok(())
    }

    fn sync_data(&self) -> std::io::Result<()> {
        self.state.lock().unwrap().log.push(Op::Sync);
        Ok(())
    }

    fn len(&self) -> std::io::Result<u64> {
        Ok(self.state.lock().unwrap().current.len() as u64)
    }

    fn set_len(&self, len: u64) -> std::io::Result<()> {
        let mut s = self.state.lock().unwrap();
        let old = s.current.len() as u64;
        s.current.resize(len as usize, 0);
        if len > old {
            // Growth is recorded as a write of zeros so crash images keep the new length.
            s.log.push(Op::Write {
                off: old,
                data: vec![0; (len - old) as usize],
            });
        }
        Ok(())
    }
}
