//! The image subcommands behave like qemu-img where a user relies on it: outputs never clobber
//! inputs (export onto the source or its backing file, create backing onto itself), a closed
//! pipe ends a command quietly, every error is one line, `create FILE SIZE` with qemu-img's size
//! syntax, `info --output json [--backing-chain]` identical to qemu-img's, `check` on raw exits
//! 63, and a missing backing file is named as the backing file of its image. Comparisons with
//! qemu-img are skipped (with a message) when it is not installed.

mod common;

use std::os::unix::io::FromRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use common::*;

fn have_qemu_img() -> bool {
    let ok = have("qemu-img");
    if !ok {
        eprintln!("skipped: qemu-img is needed");
    }
    ok
}

fn ok(o: Output) -> String {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout).unwrap()
}

/// Failed with exactly one line on stderr containing `needle`.
fn one_line_error(what: &str, o: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{what} succeeded");
    assert_ne!(o.status.code(), Some(101), "{what} panicked: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{what}: {err}");
    assert!(err.contains(needle), "{what}: {err}");
}

fn base_and_overlay(dir: &Path) -> (PathBuf, PathBuf) {
    let base = dir.join("b.raw");
    std::fs::write(&base, vec![0x11; 1 << 20]).unwrap();
    let ov = dir.join("o.qcow2");
    ok(snapblk(&[
        "create",
        "-q",
        "-b",
        "b.raw",
        "-F",
        "raw",
        s(&ov),
    ]));
    (base, ov)
}

#[test]
fn export_refuses_its_source_and_every_file_of_the_chain_by_any_name() {
    let dir = tempfile::tempdir().unwrap();
    let (base, ov) = base_and_overlay(dir.path());
    let base_bytes = std::fs::read(&base).unwrap();
    let ov_bytes = std::fs::read(&ov).unwrap();
    let link = dir.path().join("alias.raw");
    std::fs::hard_link(&base, &link).unwrap();
    let sym = dir.path().join("sym.qcow2");
    std::os::unix::fs::symlink(&ov, &sym).unwrap();
    for target in [&base, &ov, &link, &sym] {
        let o = snapblk(&["export", s(&ov), s(target)]);
        one_line_error("export onto an input", &o, "refusing to overwrite an input");
    }
    assert_eq!(std::fs::read(&base).unwrap(), base_bytes, "base changed");
    assert_eq!(std::fs::read(&ov).unwrap(), ov_bytes, "overlay changed");
    // A real export: complete, no temporary left behind.
    let out = dir.path().join("out.raw");
    std::fs::write(&out, b"old content").unwrap();
    ok(snapblk(&["export", s(&ov), s(&out)]));
    assert_eq!(std::fs::read(&out).unwrap(), base_bytes);
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.contains(".tmp"))
        .collect();
    assert!(names.is_empty(), "temporaries left: {names:?}");
}

#[test]
fn create_refuses_an_image_backing_onto_itself_and_leaves_it_intact() {
    let dir = tempfile::tempdir().unwrap();
    let (_base, ov) = base_and_overlay(dir.path());
    let before = std::fs::read(&ov).unwrap();
    let o = snapblk(&["create", "-b", s(&ov), "-F", "qcow2", s(&ov)]);
    one_line_error("create over itself", &o, "back onto itself");
    let o = snapblk(&["create", "-b", "o.qcow2", "-F", "qcow2", s(&ov), "1M"]);
    one_line_error("create over itself with a size", &o, "back onto itself");
    // Over a file lower in its own chain (b.raw is o.qcow2's backing file).
    let top = dir.path().join("top.qcow2");
    ok(snapblk(&[
        "create",
        "-q",
        "-b",
        "o.qcow2",
        "-F",
        "qcow2",
        s(&top),
    ]));
    let o = snapblk(&[
        "create",
        "-b",
        "top.qcow2",
        "-F",
        "qcow2",
        s(&dir.path().join("b.raw")),
    ]);
    one_line_error("create over its chain", &o, "back onto itself");
    assert_eq!(std::fs::read(&ov).unwrap(), before);
    assert!(std::fs::read(dir.path().join("b.raw"))
        .unwrap()
        .iter()
        .all(|&b| b == 0x11));
}

/// Runs snapblk with stdout a pipe whose reading end is already closed.
fn with_closed_stdout(args: &[&str]) -> Output {
    let mut fds = [0; 2];
    // SAFETY: pipe fills two descriptors that we own from here on.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: fds[0] is ours; closing it leaves the writing end without a reader.
    unsafe { libc::close(fds[0]) };
    // SAFETY: fds[1] is ours and moved into the File exactly once.
    let w = unsafe { std::fs::File::from_raw_fd(fds[1]) };
    Command::new(env!("CARGO_BIN_EXE_snapblk"))
        .args(args)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::from(w))
        .stderr(Stdio::piped())
        .output()
        .unwrap()
}

#[test]
fn a_closed_pipe_ends_every_printing_command_quietly_without_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let (_base, ov) = base_and_overlay(dir.path());
    for args in [
        &["info", s(&ov)][..],
        &["info", "--output", "json", "--backing-chain", s(&ov)],
        &["checksum", s(&ov)],
        &["check", "--output", "json", s(&ov)],
        &["check", s(&ov)],
    ] {
        let o = with_closed_stdout(args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.is_empty(), "{args:?} wrote to stderr: {err}");
        assert_ne!(o.status.code(), Some(101), "{args:?} panicked");
    }
}

#[test]
fn errors_are_one_line_with_a_non_zero_exit() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.qcow2");
    one_line_error(
        "info of a missing file",
        &snapblk(&["info", s(&missing)]),
        "missing.qcow2",
    );
    one_line_error(
        "unknown flag",
        &snapblk(&["info", "--bogus", "x"]),
        "--bogus",
    );
    one_line_error("missing argument", &snapblk(&["create"]), "required");
    one_line_error(
        "bad size",
        &snapblk(&["create", s(&missing), "1.5"]),
        "invalid image size",
    );
    one_line_error(
        "too large",
        &snapblk(&["create", s(&missing), "8E"]),
        "between 0 and",
    );
    one_line_error(
        "unknown -o",
        &snapblk(&["create", "-o", "preallocation=full", s(&missing), "1M"]),
        "preallocation",
    );
    assert!(!missing.exists());
}

#[test]
fn a_missing_backing_file_is_named_as_the_backing_file_of_its_image() {
    let dir = tempfile::tempdir().unwrap();
    let (base, ov) = base_and_overlay(dir.path());
    std::fs::remove_file(&base).unwrap();
    for args in [
        &["checksum", s(&ov)][..],
        &["commit", s(&ov)],
        &["info", "--backing-chain", s(&ov)],
    ] {
        let o = snapblk(args);
        one_line_error(&format!("{args:?}"), &o, "backing file of");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("b.raw") && err.contains(s(&ov)), "{err}");
    }
}

#[test]
fn check_on_a_raw_image_exits_63_like_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("r.raw");
    std::fs::write(&raw, vec![0; 65536]).unwrap();
    let o = snapblk(&["check", s(&raw)]);
    assert_eq!(o.status.code(), Some(63));
    let o = snapblk(&["check", "-f", "raw", s(&raw)]);
    assert_eq!(o.status.code(), Some(63));
    if have_qemu_img() {
        assert_eq!(run("qemu-img", &["check", s(&raw)]).status.code(), Some(63));
    }
}

fn virtual_size(img: &Path) -> u64 {
    let json = ok(snapblk(&["info", "--output", "json", s(img)]));
    let line = json
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with("\"virtual-size\""))
        .unwrap();
    line.trim()
        .trim_start_matches("\"virtual-size\": ")
        .trim_end_matches(',')
        .parse()
        .unwrap()
}

#[test]
fn create_takes_a_positional_size_in_qemu_img_syntax_and_rounds_up_to_sectors() {
    let dir = tempfile::tempdir().unwrap();
    for (size, want) in [
        ("1.5G", 3u64 << 29),
        ("1000", 1024),
        ("1.5k", 1536),
        ("0x100", 512),
        ("2T", 2 << 40),
    ] {
        let img = dir.path().join(format!("s{size}.qcow2"));
        ok(snapblk(&["create", "-q", s(&img), size]));
        assert_eq!(virtual_size(&img), want, "{size}");
        if have_qemu_img() {
            let q = dir.path().join(format!("q{size}.qcow2"));
            ok(run(
                "qemu-img",
                &["create", "-q", "-f", "qcow2", s(&q), size],
            ));
            let info = ok(run("qemu-img", &["info", s(&q)]));
            assert!(info.contains(&format!("({want} bytes)")), "{size}: {info}");
        }
    }
    // --size and -o keep working; -o cluster_size; -f raw; -q prints nothing.
    let a = dir.path().join("a.qcow2");
    assert!(ok(snapblk(&["create", "-q", "--size", "1M", s(&a)])).is_empty());
    assert_eq!(virtual_size(&a), 1 << 20);
    let b = dir.path().join("b.qcow2");
    let out = ok(snapblk(&[
        "create",
        "-o",
        "cluster_size=4096,size=2M",
        s(&b),
    ]));
    assert!(out.contains("cluster_size=4096"), "{out}");
    assert_eq!(virtual_size(&b), 2 << 20);
    let r = dir.path().join("r.raw");
    ok(snapblk(&["create", "-q", "-f", "raw", s(&r), "1.5M"]));
    assert_eq!(std::fs::metadata(&r).unwrap().len(), 3 << 19);
}

#[test]
fn info_json_and_backing_chain_match_qemu_img_field_for_field() {
    if !have_qemu_img() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (_base, ov) = base_and_overlay(dir.path());
    // Internal snapshot and persistent bitmap, made by qemu-img.
    ok(run("qemu-img", &["snapshot", "-c", "snap1", s(&ov)]));
    ok(run("qemu-img", &["bitmap", "--add", s(&ov), "bm0"]));
    // External data file, extended L2 and zstd compression.
    let d = dir.path().join("d.qcow2");
    // qemu-img creates a relative data file in its working directory: name it absolutely.
    let data_opts = format!(
        "data_file={},extended_l2=on,compression_type=zstd",
        s(&dir.path().join("d.raw"))
    );
    ok(run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "-o", &data_opts, s(&d), "1M"],
    ));
    let base = dir.path().join("b.raw");
    for (img, extra) in [
        (&ov, &[][..]),
        (&ov, &["--backing-chain"][..]),
        (&d, &[][..]),
        (&base, &[][..]),
    ] {
        for output in ["json", "human"] {
            let mut args = vec!["info", "--output", output];
            args.extend(extra);
            args.push(s(img));
            let mut ours = ok(snapblk(&args));
            let theirs = ok(run("qemu-img", &args));
            // snapblk's human `info` of a single image ends with its own section, the backing
            // chain with the policy's verdict (what serving it would open); everything before it
            // is qemu-img's text to the letter.
            if output == "human" && extra.is_empty() {
                let section = ours.find("Backing chain:\n");
                assert_eq!(
                    section.is_some(),
                    img == &ov,
                    "a backing-chain section exactly for images with a backing file: {ours}"
                );
                if let Some(at) = section {
                    assert!(
                        ours[at..].contains(&format!("1: {} (raw)", s(&base))),
                        "{ours}"
                    );
                    ours.truncate(at);
                }
            }
            // qemu-img's JSON printer puts a blank line inside empty containers.
            let strip = |t: &str| {
                t.lines()
                    .filter(|l| !l.trim().is_empty())
                    .collect::<Vec<_>>()
                    .join("\n")
            };
            assert_eq!(strip(&ours), strip(&theirs), "{args:?}");
        }
    }
}

#[test]
fn create_o_extended_l2_makes_an_image_qemu_img_reads_as_extended_l2() {
    if !have_qemu_img() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for (opts, want) in [
        ("extended_l2=on,cluster_size=64k", true),
        ("extended_l2=off", false),
    ] {
        let img = dir.path().join(format!("e{want}.qcow2"));
        ok(snapblk(&["create", "-q", "-o", opts, s(&img), "4M"]));
        let info = ok(run("qemu-img", &["info", "--output", "json", s(&img)]));
        assert!(
            info.contains(&format!("\"extended-l2\": {want}")),
            "{opts}: {info}"
        );
    }
    // A value that is neither on nor off, and extended L2 with clusters below 16 KiB (QEMU refuses
    // both), are one-line errors that leave no image behind.
    for opts in ["extended_l2=maybe", "extended_l2=on,cluster_size=4k"] {
        let img = dir.path().join("bad.qcow2");
        let o = snapblk(&["create", "-o", opts, s(&img), "4M"]);
        one_line_error("create", &o, "extended");
        assert!(!img.exists(), "{opts}");
    }
}
