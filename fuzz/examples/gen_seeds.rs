//! Regenerates the committed seed corpora under `corpus/<target>/`:
//! `cargo run --example gen_seeds` (from `fuzz/`). Whole-image qcow2 seeds are made with
//! `qemu-img`/`qemu-io` when they are installed (a fresh image, one with data written, a
//! compressed one, one with an internal snapshot, and an overlay over a backing file).

use std::path::{Path, PathBuf};
use std::process::Command;

use snapblk_fuzz::{cacheops, chain, qcow};

fn write_seeds(dir: &Path, seeds: Vec<(&'static str, Vec<u8>)>) {
    std::fs::create_dir_all(dir).unwrap();
    for (name, data) in seeds {
        std::fs::write(dir.join(format!("seed-{name}")), data).unwrap();
    }
}

fn run(cmd: &mut Command) -> bool {
    match cmd.status() {
        Ok(s) if s.success() => true,
        Ok(s) => {
            eprintln!("{cmd:?} failed: {s}");
            false
        }
        Err(e) => {
            eprintln!("{cmd:?} not run: {e}");
            false
        }
    }
}

fn qemu_images(tmp: &Path) -> Vec<(&'static str, Vec<u8>)> {
    let img = |n: &str| tmp.join(n);
    let p = |b: &PathBuf| b.to_str().unwrap().to_string();
    let mut out = Vec::new();
    let create = |path: &PathBuf, extra: &[&str], size: Option<&str>| {
        let mut c = Command::new("qemu-img");
        c.args(["create", "-q", "-f", "qcow2"])
            .args(extra)
            .arg(path);
        c.args(size);
        run(&mut c)
    };
    let io = |path: &PathBuf, cmd: &str| {
        run(Command::new("qemu-io").args(["-f", "qcow2", "-c", cmd, &p(path)]))
    };
    // A fresh 1 MiB image with 4 KiB clusters.
    let a = img("fresh.qcow2");
    if create(
        &a,
        &["-o", "cluster_size=4096", "-o", "refcount_bits=16"],
        Some("1M"),
    ) {
        out.push(("qemu_fresh_4k", std::fs::read(&a).unwrap()));
        // The same with data written at three places and a zeroed range.
        if io(&a, "write -P 0x61 0 8k")
            && io(&a, "write -P 0x62 300k 4k")
            && io(&a, "write -z 500k 8k")
            && io(&a, "write -P 0x63 1020k 4k")
        {
            out.push(("qemu_written_4k", std::fs::read(&a).unwrap()));
            // Compressed copy.
            let c = img("compressed.qcow2");
            if run(Command::new("qemu-img").args([
                "convert",
                "-q",
                "-c",
                "-O",
                "qcow2",
                "-o",
                "cluster_size=4096",
                &p(&a),
                &p(&c),
            ])) {
                out.push(("qemu_compressed_4k", std::fs::read(&c).unwrap()));
            }
            // Internal snapshot, then another write.
            if run(Command::new("qemu-img").args(["snapshot", "-q", "-c", "snap1", &p(&a)]))
                && io(&a, "write -P 0x64 0 4k")
            {
                out.push(("qemu_snapshot_4k", std::fs::read(&a).unwrap()));
            }
        }
    }
    // An overlay over a raw backing file, 512-byte clusters, 1-bit refcounts.
    let base = img("base.raw");
    let ov = img("overlay.qcow2");
    if std::fs::write(&base, vec![0x11u8; 128 << 10]).is_ok()
        && create(
            &ov,
            &[
                "-o",
                "cluster_size=512",
                "-o",
                "refcount_bits=1",
                "-b",
                &p(&base),
                "-F",
                "raw",
            ],
            None,
        )
        && io(&ov, "write -P 0x22 1k 3k")
    {
        out.push(("qemu_overlay_512", std::fs::read(&ov).unwrap()));
    }
    // qcow2 version 2 (compat=0.10).
    let v2 = img("v2.qcow2");
    if create(
        &v2,
        &["-o", "compat=0.10", "-o", "cluster_size=4096"],
        Some("512K"),
    ) && io(&v2, "write -P 0x33 4k 12k")
    {
        out.push(("qemu_v2_4k", std::fs::read(&v2).unwrap()));
    }
    out
}

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    write_seeds(&root.join("virtio_blk_chain"), chain::seeds());
    write_seeds(&root.join("cache_ops"), cacheops::seeds());
    let tmp = std::env::temp_dir().join(format!("snapblk-seeds-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let mut q = qcow::seeds();
    for (name, image) in qemu_images(&tmp) {
        // Whole-image mode: read 8 KiB at 4 KiB, write 4 KiB at 12 KiB + 512. The engine opens
        // images with internal snapshots read-only only, so that seed is opened read-only.
        let mode = if name.contains("snapshot") { 2 } else { 0 };
        q.push((
            name,
            qcow::encode(mode, (4096, 8192), (12800, 4096, 0x5e), &image),
        ));
    }
    write_seeds(&root.join("qcow2_image"), q);
    let _ = std::fs::remove_dir_all(&tmp);
    for t in ["virtio_blk_chain", "qcow2_image", "cache_ops"] {
        let n = std::fs::read_dir(root.join(t)).unwrap().count();
        println!("{t}: {n} seeds");
    }
}
