//! The backing-file policy at the library level: format-less backing files are raw unless the
//! caller asks for probing, trusted files bypass the rules, and refusals name the file and rule.

use std::path::{Path, PathBuf};

use qcow_snapshot::policy::describe_chain;
use qcow_snapshot::{
    create, open_image, open_image_with, BackingPolicy, CreateOptions, Format, OpenImageError,
};

const MIB: u64 = 1 << 20;

/// A qcow2 overlay over `backing` whose header does not record the backing format (the
/// backing-format header extension is turned into an unknown, ignored extension).
fn formatless_overlay(dir: &Path, name: &str, backing: &str, fmt: Format) -> PathBuf {
    let ov = dir.join(name);
    create(
        &ov,
        &CreateOptions {
            size: MIB,
            backing: Some((backing.into(), fmt)),
            ..Default::default()
        },
    )
    .unwrap();
    let mut bytes = std::fs::read(&ov).unwrap();
    let magic = 0xE279_2ACAu32.to_be_bytes();
    let at = bytes[..4096]
        .windows(4)
        .position(|w| w == magic)
        .expect("backing format extension");
    bytes[at..at + 4].copy_from_slice(&0x5AB1_0017u32.to_be_bytes());
    std::fs::write(&ov, bytes).unwrap();
    let spec = qcow_snapshot::api::read_header(&ov)
        .unwrap()
        .backing
        .unwrap();
    assert_eq!(spec.name, backing);
    assert_eq!(spec.format, None, "format no longer recorded");
    ov
}

#[test]
fn formatless_backing_is_opened_as_raw_never_probed() {
    let dir = tempfile::tempdir().unwrap();
    // The backing file is really a qcow2 image with data; probing would open it as qcow2.
    let base = dir.path().join("base.qcow2");
    create(
        &base,
        &CreateOptions {
            size: MIB,
            ..Default::default()
        },
    )
    .unwrap();
    {
        let dev = open_image(&base, Some(Format::Qcow2), false).unwrap();
        dev.write_at(&[0x77; 512], 0).unwrap();
        dev.flush().unwrap();
    }
    let ov = formatless_overlay(dir.path(), "ov.qcow2", "base.qcow2", Format::Qcow2);
    let mut head = [0u8; 512];
    open_image(&ov, None, true)
        .unwrap()
        .read_at(&mut head, 0)
        .unwrap();
    assert_eq!(&head[..4], b"QFI\xfb", "the backing file's bytes, as raw");
    // Only an explicit choice probes it.
    let probing = BackingPolicy::new().probe_unrecorded(true);
    open_image_with(&ov, None, true, &probing)
        .unwrap()
        .read_at(&mut head, 0)
        .unwrap();
    assert!(head.iter().all(|&b| b == 0x77), "probed as qcow2");
    let chain = describe_chain(&ov, &BackingPolicy::new());
    assert_eq!(chain.len(), 1);
    assert_eq!(chain[0].format, Some(Format::Raw));
    assert!(!chain[0].format_recorded);
    assert!(
        chain[0]
            .to_string()
            .ends_with("(raw, format not recorded: opened as raw)"),
        "{}",
        chain[0]
    );
}

fn refused(e: OpenImageError) -> String {
    match e {
        OpenImageError::Refused(p) => p.to_string(),
        other => panic!("not a policy refusal: {other}"),
    }
}

#[test]
fn policy_refuses_devices_and_proc_and_confines_to_allowed_trees() {
    let dir = tempfile::tempdir().unwrap();
    let inside = dir.path().join("in");
    let outside = dir.path().join("out");
    std::fs::create_dir_all(&inside).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("o.raw"), vec![1u8; MIB as usize]).unwrap();
    std::fs::write(inside.join("i.raw"), vec![2u8; MIB as usize]).unwrap();
    let mk = |name: &str, backing: &str| {
        let ov = inside.join(name);
        create(
            &ov,
            &CreateOptions {
                size: MIB,
                backing: Some((backing.into(), Format::Raw)),
                ..Default::default()
            },
        )
        .map(|_| ov)
    };
    let good = mk("good.qcow2", "i.raw").unwrap();
    let escape = mk("escape.qcow2", "../out/o.raw").unwrap();
    let mut confined = BackingPolicy::new();
    confined.allow_dir(&inside).unwrap();
    assert!(open_image_with(&good, None, true, &confined).is_ok());
    let e = refused(
        open_image_with(&escape, None, true, &confined)
            .err()
            .unwrap(),
    );
    assert!(
        e.contains("../out/o.raw (resolves to ")
            && e.contains("refused: it is outside the --allow-backing directories"),
        "{e}"
    );
    // Trusting the file (a user-named --snapshot base) admits it.
    let mut trusted = confined.clone();
    trusted.trust(&outside.join("o.raw")).unwrap();
    assert!(open_image_with(&escape, None, true, &trusted).is_ok());
    // Default policy: any regular file, but no device.
    assert!(open_image(&escape, None, true).is_ok());
    let dev = mk("dev.qcow2", "/dev/zero").unwrap();
    let e = refused(open_image(&dev, None, true).err().unwrap());
    assert_eq!(
        e,
        "backing file /dev/zero refused: it is a character device; a backing chain may only \
         name regular files"
    );
}

#[test]
fn commit_never_guesses_the_format_of_the_file_it_writes() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    std::fs::write(&base, vec![5u8; MIB as usize]).unwrap();
    let ov = formatless_overlay(dir.path(), "ov.qcow2", "base.raw", Format::Raw);
    open_image(&ov, None, false)
        .unwrap()
        .write_at(&[9; 512], 0)
        .unwrap();
    let e = qcow_snapshot::commit(&ov, &mut |_, _| {})
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("does not record the format of its backing file")
            && e.contains("qemu-img rebase -u -F raw|qcow2"),
        "{e}"
    );
    assert!(std::fs::read(&base).unwrap().iter().all(|&b| b == 5));
}
