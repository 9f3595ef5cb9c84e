//! Helpers shared by the qcow-snapshot integration tests: running qemu-img/qemu-io, making
//! images with QEMU or with the engine, patching image files in place, making patterned
//! data, comparing a device with a reference. Each test binary compiles its own copy (`mod
//! common;`), so not every binary uses every helper.
#![allow(dead_code)]

use std::fs::{self, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use blockdev::BlockDev;
use qcow_snapshot::format::Header;
use qcow_snapshot::{create, CreateOptions, Format};
use rand::{Rng, SeedableRng};

/// A path as a command-line argument.
pub fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// A fresh temporary directory (removed when dropped).
pub fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().expect("tempdir")
}

/// Whether every program in `tools` runs (`--version` succeeds); if not, says that the
/// calling test is skipped, followed by `why`.
pub fn have_tools(tools: &[&str], why: &str) -> bool {
    let ok = tools.iter().all(|t| {
        Command::new(t)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    });
    if !ok {
        eprintln!("{} not installed: skipping{why}", tools.join("/"));
    }
    ok
}

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

/// Creates a qcow2 image `dir/name` with `qemu-img create [-o opts] ... size` (no `-o` when
/// `opts` is empty) and runs each qemu-io command on it.
pub fn qemu_create(dir: &Path, name: &str, opts: &str, size: &str, io: &[&str]) -> PathBuf {
    let p = dir.join(name);
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    args.extend([s(&p), size]);
    run("qemu-img", &args);
    for cmd in io {
        run("qemu-io", &["-f", "qcow2", "-c", cmd, s(&p)]);
    }
    p
}

/// A qcow2 image `name` in `dir` that qemu-img compressed from `len` bytes of compressible,
/// non-zero data (random bytes would be stored uncompressed); returns its path and the data.
pub fn qemu_compressed(dir: &Path, name: &str, len: u64) -> (PathBuf, Vec<u8>) {
    let raw = dir.join(format!("{name}.raw"));
    let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
    std::fs::write(&raw, &data).unwrap();
    let path = dir.join(name);
    run(
        "qemu-img",
        &["convert", "-q", "-c", "-O", "qcow2", s(&raw), s(&path)],
    );
    (path, data)
}

/// Creates a qcow2 overlay `img` with `qemu-img create ... extra -F backing_fmt -b backing img
/// [size]` (`backing` as stored in the header; no size argument when `size` is empty).
pub fn qemu_overlay(img: &Path, backing: &str, backing_fmt: &str, extra: &[&str], size: &str) {
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    args.extend(extra);
    args.extend(["-F", backing_fmt, "-b", backing, s(img)]);
    if !size.is_empty() {
        args.push(size);
    }
    run("qemu-img", &args);
}

/// `qemu-img convert` of a raw file into a new qcow2 image.
pub fn qemu_convert_to_qcow2(raw: &Path, qcow2: &Path) {
    run(
        "qemu-img",
        &["convert", "-q", "-O", "qcow2", s(raw), s(qcow2)],
    );
}

/// `qemu-img check` must pass and `qemu-img compare` must find `img` identical to `want`
/// (written next to `img` as `want.raw`).
pub fn qemu_check_and_compare(img: &Path, want: &[u8]) {
    qemu_check(img);
    let refp = img.with_file_name("want.raw");
    fs::write(&refp, want).expect("write reference");
    qemu_compare(img, &refp);
}

/// Writes `base_data` as `dir/base.raw` and creates the engine overlay `dir/o.qcow2` over it
/// (cluster size `cluster_size`, or the engine default for `None`); returns the overlay path.
pub fn raw_backed_overlay(dir: &Path, base_data: &[u8], cluster_size: Option<u64>) -> PathBuf {
    fs::write(dir.join("base.raw"), base_data).expect("write base.raw");
    let img = dir.join("o.qcow2");
    let defaults = CreateOptions::default();
    create(
        &img,
        &CreateOptions {
            cluster_size: cluster_size.unwrap_or(defaults.cluster_size),
            backing: Some(("base.raw".into(), Format::Raw)),
            ..defaults
        },
    )
    .expect("create overlay");
    img
}

/// Writes `base_data` as `dir/base.raw` and, for `Format::Qcow2`, converts it with qemu-img
/// into `dir/base.qcow2`. Returns the raw file and the base image in `fmt`.
pub fn base_in_format(dir: &Path, base_data: &[u8], fmt: Format) -> (PathBuf, PathBuf) {
    let raw = dir.join("base.raw");
    fs::write(&raw, base_data).expect("write base.raw");
    let base = if fmt == Format::Qcow2 {
        let b = dir.join("base.qcow2");
        qemu_convert_to_qcow2(&raw, &b);
        b
    } else {
        raw.clone()
    };
    (raw, base)
}

/// Writes `bytes` at `off` into the file `p` (in place, no truncation).
pub fn poke(p: &Path, off: u64, bytes: &[u8]) {
    let f = OpenOptions::new().write(true).open(p).expect("open");
    f.write_all_at(bytes, off).expect("pwrite");
}

/// The parsed header of the image file `p`.
pub fn file_header(p: &Path) -> Header {
    Header::parse(&fs::read(p).expect("read")).expect("header")
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
    /// Writes of this length fail with EIO (and change nothing).
    fail_len: Option<usize>,
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

    /// From now on writes of `len` bytes fail with EIO and change nothing (`None`: none fail).
    pub fn fail_writes_of(&self, len: Option<usize>) {
        self.state.lock().unwrap().fail_len = len;
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
        if s.fail_len == Some(buf.len()) {
            return Err(std::io::Error::from_raw_os_error(libc::EIO));
        }
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
