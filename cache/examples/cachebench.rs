//! Micro-benchmark of the folio cache against the bare lower layer (a RawFile in a temp dir).
//! Run: `cargo run --release -p cache --example cachebench [seconds-per-case]`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use blockdev::{BlockDev, RawFile};
use cache::{CacheConfig, FolioCache};

const DISK: u64 = 256 << 20;

fn run(
    name: &str,
    dev: &Arc<dyn BlockDev>,
    threads: u64,
    secs: f64,
    op: impl Fn(&dyn BlockDev, u64, &mut Vec<u8>) -> u64 + Sync,
) {
    let ops = AtomicU64::new(0);
    let bytes = AtomicU64::new(0);
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let start = Instant::now();
    std::thread::scope(|s| {
        for t in 0..threads {
            let (ops, bytes, op, dev) = (&ops, &bytes, &op, dev.clone());
            s.spawn(move || {
                let mut buf = Vec::new();
                let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ (t << 32);
                while Instant::now() < deadline {
                    for _ in 0..64 {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        bytes.fetch_add(op(&*dev, x, &mut buf), Ordering::Relaxed);
                        ops.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        }
    });
    let el = start.elapsed().as_secs_f64();
    let o = ops.load(Ordering::Relaxed) as f64;
    let b = bytes.load(Ordering::Relaxed) as f64;
    println!(
        "{name:<48} {:>10.0} IOPS {:>9.1} MiB/s",
        o / el,
        b / el / 1048576.0
    );
}

fn rand_read(bs: u64, span: u64) -> impl Fn(&dyn BlockDev, u64, &mut Vec<u8>) -> u64 + Sync {
    move |d, x, buf| {
        buf.resize(bs as usize, 0);
        d.read_at(buf, (x % (span / bs)) * bs).unwrap();
        bs
    }
}

fn rand_write(bs: u64, span: u64) -> impl Fn(&dyn BlockDev, u64, &mut Vec<u8>) -> u64 + Sync {
    move |d, x, buf| {
        buf.resize(bs as usize, x as u8);
        d.write_at(buf, (x % (span / bs)) * bs).unwrap();
        bs
    }
}

fn seq_write(bs: u64) -> impl Fn(&dyn BlockDev, u64, &mut Vec<u8>) -> u64 + Sync {
    let pos = AtomicU64::new(0);
    move |d, x, buf| {
        buf.resize(bs as usize, x as u8);
        let off = pos.fetch_add(bs, Ordering::Relaxed) % DISK;
        d.write_at(buf, off).unwrap();
        bs
    }
}

fn main() {
    let secs: f64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(2.0);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.raw");
    std::fs::write(&path, vec![1u8; DISK as usize]).unwrap();
    let raw: Arc<dyn BlockDev> = Arc::new(RawFile::open(&path, false).unwrap());
    let fc = FolioCache::new(raw.clone(), CacheConfig::default()).unwrap();
    let cache: Arc<dyn BlockDev> = fc.clone();
    // Warm 64 MiB (in 64 KiB reads: larger ones bypass the cache).
    let mut warm = vec![0u8; 64 << 10];
    for i in 0..1024 {
        cache.read_at(&mut warm, i * (64 << 10)).unwrap();
    }
    for threads in [1, 2] {
        run(
            &format!("raw    4K rand read 64M (page cache), {threads}T"),
            &raw,
            threads,
            secs,
            rand_read(4096, 64 << 20),
        );
        run(
            &format!("cache  4K rand read 64M (hot), {threads}T"),
            &cache,
            threads,
            secs,
            rand_read(4096, 64 << 20),
        );
        run(
            &format!("raw    4K rand write 64M, {threads}T"),
            &raw,
            threads,
            secs,
            rand_write(4096, 64 << 20),
        );
        run(
            &format!("cache  4K rand write 64M, {threads}T"),
            &cache,
            threads,
            secs,
            rand_write(4096, 64 << 20),
        );
        run(
            &format!("raw    4K rand write 256M, {threads}T"),
            &raw,
            threads,
            secs,
            rand_write(4096, DISK),
        );
        run(
            &format!("cache  4K rand write 256M, {threads}T"),
            &cache,
            threads,
            secs,
            rand_write(4096, DISK),
        );
        run(
            &format!("raw    1M seq write, {threads}T"),
            &raw,
            threads,
            secs,
            seq_write(1 << 20),
        );
        run(
            &format!("cache  1M seq write, {threads}T"),
            &cache,
            threads,
            secs,
            seq_write(1 << 20),
        );
        run(
            &format!("cache  1M rand read 256M, {threads}T"),
            &cache,
            threads,
            secs,
            rand_read(1 << 20, DISK),
        );
        run(
            &format!("raw    1M rand read 256M, {threads}T"),
            &raw,
            threads,
            secs,
            rand_read(1 << 20, DISK),
        );
    }
    let t = Instant::now();
    cache.flush().unwrap();
    println!("final flush: {:?}", t.elapsed());
    println!("{:?}", fc.stats());
}
