//! `convert`: the output equals the source chain for qemu-img (`qemu-img compare`), passes
//! `qemu-img check`, stays sparse where the source reads zeros, and never clobbers an input.

mod common;

use std::path::Path;

use common::*;
use qcow_snapshot::convert::{convert, ConvertError, ConvertOptions, OutputFormat};
use qcow_snapshot::format::CompressionType;
use qcow_snapshot::Format;

/// raw base (random, with a zero hole) <- qcow2 overlay with extended L2 entries, written by
/// qemu-io (data, zeros over base data, a discard); returns the overlay and what it reads as.
fn chain(dir: &Path) -> (std::path::PathBuf, Vec<u8>) {
    let size = 16usize << 20;
    let mut base = random_bytes(11, size);
    base[4 << 20..6 << 20].fill(0);
    // Compressible data too.
    for (i, b) in base[8 << 20..10 << 20].iter_mut().enumerate() {
        *b = (i / 4096) as u8;
    }
    std::fs::write(dir.join("base.raw"), &base).unwrap();
    let ov = dir.join("ov.qcow2");
    qemu_overlay(&ov, "base.raw", "raw", &["-o", "extended_l2=on"], "");
    for cmd in [
        "write -P 0x5a 100k 6k",
        "write -z 1M 1M",
        "write -P 0x11 12M 3M",
    ] {
        run("qemu-io", &["-f", "qcow2", "-c", cmd, s(&ov)]);
    }
    let view = dir.join("view.raw");
    run("qemu-img", &["convert", "-O", "raw", s(&ov), s(&view)]);
    (ov, std::fs::read(&view).unwrap())
}

fn allocated_bytes(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).unwrap().blocks() * 512
}

#[test]
fn converted_images_equal_the_source_chain_and_pass_qemu_check() {
    let dir = tmp();
    let (ov, want) = chain(dir.path());
    let cases = [
        (
            "zlib.qcow2",
            OutputFormat::Qcow2,
            true,
            CompressionType::Zlib,
            65536u64,
            false,
        ),
        (
            "zstd.qcow2",
            OutputFormat::Qcow2,
            true,
            CompressionType::Zstd,
            65536,
            false,
        ),
        (
            "zlib-2m-ext.qcow2",
            OutputFormat::Qcow2,
            true,
            CompressionType::Zlib,
            2 << 20,
            true,
        ),
        (
            "zstd-512.qcow2",
            OutputFormat::Qcow2,
            true,
            CompressionType::Zstd,
            512,
            false,
        ),
        (
            "plain-ext.qcow2",
            OutputFormat::Qcow2,
            false,
            CompressionType::Zlib,
            16384,
            true,
        ),
        (
            "plain.raw",
            OutputFormat::Raw,
            false,
            CompressionType::Zlib,
            65536,
            false,
        ),
    ];
    for (name, output, compress, compression_type, cluster_size, extended_l2) in cases {
        let out = dir.path().join(name);
        let opts = ConvertOptions {
            output,
            compress,
            compression_type,
            cluster_size,
            extended_l2,
            threads: 2,
            ..ConvertOptions::default()
        };
        let mut calls = 0;
        convert(&ov, &out, &opts, &mut |_, _| calls += 1).unwrap();
        assert!(calls > 0, "{name}: progress");
        let fmt = if output == OutputFormat::Raw {
            "raw"
        } else {
            "qcow2"
        };
        if output == OutputFormat::Qcow2 {
            qemu_check(&out);
            let info = run("qemu-img", &["info", s(&out)]);
            assert!(!info.contains("backing file"), "{name}: {info}");
            if compression_type == CompressionType::Zstd {
                assert!(info.contains("compression type: zstd"), "{name}: {info}");
            }
        }
        run(
            "qemu-img",
            &["compare", "-f", fmt, "-F", "qcow2", s(&out), s(&ov)],
        );
        // snapblk reads it back too.
        let dev = qcow_snapshot::open_image(&out, None, true).unwrap();
        assert_same(&read_all(&*dev), &want, name);
        // The 2 MiB hole of the base (4M..6M) and the 1 MiB written as zeros are never
        // allocated.
        if output == OutputFormat::Raw {
            assert!(
                allocated_bytes(&out) <= want.len() as u64 - (3 << 20),
                "{name}: {} bytes allocated",
                allocated_bytes(&out)
            );
        } else {
            let map = run("qemu-img", &["map", "--output=json", s(&out)]);
            for hole in [1u64 << 20, 4 << 20, 5 << 20] {
                let covering = map
                    .lines()
                    .find(|l| {
                        let num = |k: &str| -> u64 {
                            let i = l.find(&format!("\"{k}\": ")).unwrap() + k.len() + 4;
                            l[i..]
                                .chars()
                                .take_while(char::is_ascii_digit)
                                .collect::<String>()
                                .parse()
                                .unwrap()
                        };
                        l.contains("\"start\"")
                            && num("start") <= hole
                            && hole < num("start") + num("length")
                    })
                    .unwrap_or_else(|| panic!("{name}: {map}"));
                if cluster_size <= 1 << 20 {
                    assert!(
                        covering.contains("\"data\": false"),
                        "{name} at {hole}: {covering}"
                    );
                }
            }
        }
        if compress {
            let map = run("qemu-img", &["check", s(&out)]);
            assert!(map.contains("compressed clusters"), "{name}: {map}");
        }
    }
    // The compressed output is smaller than the uncompressed one (2 MiB compress well).
    assert!(
        std::fs::metadata(dir.path().join("zlib.qcow2"))
            .unwrap()
            .len()
            < std::fs::metadata(dir.path().join("plain-ext.qcow2"))
                .unwrap()
                .len()
    );
}

#[test]
fn convert_refuses_to_overwrite_the_source_or_any_file_of_its_backing_chain() {
    let dir = tmp();
    let (ov, _) = chain(dir.path());
    let base = dir.path().join("base.raw");
    let link = dir.path().join("hardlink.raw");
    std::fs::hard_link(&base, &link).unwrap();
    let before = (std::fs::read(&ov).unwrap(), std::fs::read(&base).unwrap());
    for dst in [&ov, &base, &link] {
        let e = convert(&ov, dst, &ConvertOptions::default(), &mut |_, _| {}).unwrap_err();
        assert!(
            matches!(e, ConvertError::Refused(..)),
            "{}: {e}",
            dst.display()
        );
    }
    let e = convert(&ov, dir.path(), &ConvertOptions::default(), &mut |_, _| {}).unwrap_err();
    assert!(
        matches!(e, ConvertError::Refused(..) | ConvertError::Invalid(_)),
        "{e}"
    );
    assert_eq!(
        (std::fs::read(&ov).unwrap(), std::fs::read(&base).unwrap()),
        before,
        "inputs untouched"
    );
    // No temporary file is left behind, and a failed conversion leaves an existing
    // destination alone.
    let dst = dir.path().join("existing.qcow2");
    std::fs::write(&dst, b"keep me").unwrap();
    let e = convert(
        &dir.path().join("missing.qcow2"),
        &dst,
        &ConvertOptions {
            src_format: Some(Format::Qcow2),
            ..ConvertOptions::default()
        },
        &mut |_, _| {},
    );
    assert!(e.is_err());
    assert_eq!(std::fs::read(&dst).unwrap(), b"keep me");
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    // A successful conversion replaces the existing destination.
    convert(&ov, &dst, &ConvertOptions::default(), &mut |_, _| {}).unwrap();
    qemu_check(&dst);
}
