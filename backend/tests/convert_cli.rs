//! `snapblk convert` and `snapblk create --extended-l2` from the command line: qemu-img style
//! flags, output equal to the source for `qemu-img compare`, one-line errors for bad options and
//! for a destination that is an input.

use std::path::Path;
use std::process::{Command, Output};

fn snapblk(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_snapblk"))
        .args(args)
        .output()
        .expect("run snapblk")
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn qemu_img(args: &[&str]) -> String {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img");
    assert!(out.status.success(), "qemu-img {args:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn convert_with_qemu_img_flags_writes_an_equal_compressed_image_and_refuses_its_inputs() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    let data: Vec<u8> = (0..4u32 << 20).map(|i| (i / 777) as u8).collect();
    std::fs::write(&base, &data).unwrap();
    let ov = dir.path().join("ov.qcow2");
    let out = snapblk(&[
        "create",
        "--backing",
        s(&base),
        "--backing-format",
        "raw",
        "--extended-l2",
        s(&ov),
    ]);
    assert!(out.status.success(), "{out:?}");
    assert!(qemu_img(&["info", s(&ov)]).contains("extended l2: true"));
    let small = dir.path().join("small.qcow2");
    let out = snapblk(&[
        "create",
        "--size",
        "1M",
        "--cluster-size",
        "4K",
        "--extended-l2",
        s(&small),
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("at least 16384"),
        "{out:?}"
    );

    let dst = dir.path().join("out.qcow2");
    let out = snapblk(&[
        "convert",
        "-f",
        "qcow2",
        "-O",
        "qcow2",
        "-c",
        "-o",
        "compression_type=zstd,cluster_size=32k,extended_l2=on",
        "-p",
        s(&ov),
        s(&dst),
    ]);
    assert!(out.status.success(), "{out:?}");
    let info = qemu_img(&["info", s(&dst)]);
    assert!(
        info.contains("compression type: zstd") && info.contains("cluster_size: 32768"),
        "{info}"
    );
    qemu_img(&["check", s(&dst)]);
    qemu_img(&["compare", "-f", "qcow2", "-F", "raw", s(&dst), s(&base)]);

    for (args, says) in [
        (
            vec!["convert", "-o", "compression_type=lz4", s(&ov), s(&dst)],
            "zlib or zstd",
        ),
        (
            vec!["convert", "-o", "bogus=1", s(&ov), s(&dst)],
            "unknown option",
        ),
        (vec!["convert", s(&ov), s(&base)], "backing chain"),
        (vec!["convert", s(&ov), s(&ov)], "backing chain"),
    ] {
        let out = snapblk(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(says),
            "{args:?}: {err}"
        );
        assert_eq!(err.trim().lines().count(), 1, "{err}");
    }
    assert_eq!(std::fs::read(&base).unwrap(), data, "base untouched");
}
