//! Helpers shared by the CLI integration tests: running `snapblk` and the QEMU tools.

#![allow(dead_code)]

use std::path::Path;
use std::process::{Command, Output, Stdio};

/// Whether `tool --version` runs.
pub fn have(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Runs `tool args` with stdin closed and collects its output.
pub fn run(tool: &str, args: &[&str]) -> Output {
    Command::new(tool)
        .args(args)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{tool}: {e}"))
}

/// Runs the `snapblk` binary under test.
pub fn snapblk(args: &[&str]) -> Output {
    run(env!("CARGO_BIN_EXE_snapblk"), args)
}

/// A UTF-8 path as `&str`.
pub fn s(p: &Path) -> &str {
    p.to_str().expect("UTF-8 test path")
}

/// The command's stderr as text.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}
