//! Throughput of the qcow2 engine on a real file: allocating sequential writes, in-place random
//! writes, random reads, and flush latency.
//!
//! Run: `cargo run --release -p qcow-snapshot --example qcow_bench [dir]`

use std::time::Instant;

use qcow_snapshot::{create, open_image, CreateOptions, Format};

fn mbps(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / secs / (1 << 20) as f64
}

fn main() {
    let dir = std::env::args()
        .nth(1)
        .map(std::path::PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let base = dir.join("qcow-bench-base.raw");
    let img = dir.join("qcow-bench.qcow2");
    let size: u64 = 1 << 30;
    std::fs::write(&base, vec![0x5au8; 64 << 20]).expect("base");
    create(
        &img,
        &CreateOptions {
            size,
            backing: Some(("qcow-bench-base.raw".into(), Format::Raw)),
            ..Default::default()
        },
    )
    .expect("create");
    let dev = open_image(&img, None, false).expect("open");

    let buf = vec![0xa5u8; 1 << 20];
    let t = Instant::now();
    for i in 0..512u64 {
        dev.write_at(&buf, i << 20).expect("write");
    }
    dev.flush().expect("flush");
    println!(
        "sequential 1 MiB allocating writes: {:.0} MiB/s",
        mbps(512 << 20, t.elapsed().as_secs_f64())
    );

    let mut x: u64 = 12345;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let n = 50_000u64;
    let t = Instant::now();
    for _ in 0..n {
        let off = (next() % (512 << 20)) & !4095;
        dev.write_at(&buf[..4096], off).expect("write");
    }
    let s = t.elapsed().as_secs_f64();
    println!("random 4 KiB in-place writes: {:.0} IOPS", n as f64 / s);

    let t = Instant::now();
    for _ in 0..n {
        let off = (next() % (512 << 20)) & !4095;
        dev.write_at(&buf[..4096], (512 << 20) + off)
            .expect("write");
    }
    let s = t.elapsed().as_secs_f64();
    println!(
        "random 4 KiB allocating (COW from backing) writes: {:.0} IOPS",
        n as f64 / s
    );
    let t = Instant::now();
    dev.flush().expect("flush");
    println!(
        "flush after them: {:.1} ms",
        t.elapsed().as_secs_f64() * 1e3
    );

    let mut rb = vec![0u8; 4096];
    let t = Instant::now();
    for _ in 0..n {
        let off = (next() % size) & !4095;
        dev.read_at(&mut rb, off).expect("read");
    }
    println!(
        "random 4 KiB reads: {:.0} IOPS",
        n as f64 / t.elapsed().as_secs_f64()
    );

    let mut big = vec![0u8; 1 << 20];
    let t = Instant::now();
    for i in 0..1024u64 {
        dev.read_at(&mut big, i << 20).expect("read");
    }
    println!(
        "sequential 1 MiB reads: {:.0} MiB/s",
        mbps(1 << 30, t.elapsed().as_secs_f64())
    );

    let t = Instant::now();
    for i in 0..200u64 {
        dev.write_at(&buf[..4096], i * 4096).expect("write");
        dev.flush().expect("flush");
    }
    println!(
        "4 KiB write + flush (in place): {:.2} ms each",
        t.elapsed().as_secs_f64() * 1e3 / 200.0
    );
    drop(dev);
    // Baseline: the same random 4 KiB pwrites straight into the image file.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .expect("raw open");
    let t = Instant::now();
    for _ in 0..n {
        let off = (next() % (512 << 20)) & !4095;
        std::os::unix::fs::FileExt::write_all_at(&f, &buf[..4096], (1 << 20) + off)
            .expect("pwrite");
    }
    println!(
        "baseline: random 4 KiB pwrite on the host file: {:.0} IOPS",
        n as f64 / t.elapsed().as_secs_f64()
    );
    let _ = std::fs::remove_file(&img);
    let _ = std::fs::remove_file(&base);
}
