//! Metadata write ordering and crash consistency, checked on a recorded log of every host-file
//! write and sync: no L2 entry, L1 entry or refcount-table entry is ever written before the
//! cluster it points to is durable (and refcounted), and a crash at any point never loses,
//! zeroes or corrupts data acknowledged by a flush.

mod common;

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;

use blockdev::{BlockDev, RawFile};
use common::*;
use qcow_snapshot::format::{self, Header, L2Entry};
use qcow_snapshot::{create_on, CreateOptions, Format, MemHost, QcowImage};
use rand::{Rng, SeedableRng};

const SIZE: u64 = 4 << 20;

fn durable_refcount(img: &[u8], h: &Header, host_off: u64) -> u64 {
    let g = h.geometry();
    let idx = g.refcount_table_index(host_off);
    let e = format::table_entry(&img[h.refcount_table_offset as usize..], idx as usize);
    let b = format::reftable_entry_offset(e) as usize;
    if b == 0 || b >= img.len() {
        return 0;
    }
    let end = (b + g.cluster_size() as usize).min(img.len());
    format::refcount_get(
        &img[b..end],
        g.refcount_order,
        g.refcount_block_index(host_off) as u64,
    )
    .unwrap_or(0)
}

/// Applies random guest operations, tracking the expected content in `shadow`.
fn random_ops(
    dev: &dyn BlockDev,
    shadow: &mut [u8],
    rng: &mut rand::rngs::StdRng,
    n: usize,
    cs: u64,
) {
    for _ in 0..n {
        let kind = rng.random_range(0..10);
        let off = rng.random_range(0..SIZE);
        let max = (SIZE - off).min(3 * cs);
        let len = rng.random_range(1..=max);
        match kind {
            0..=6 => {
                let v: u8 = rng.random();
                let data = vec![v; len as usize];
                dev.write_at(&data, off).unwrap();
                shadow[off as usize..(off + len) as usize].fill(v);
            }
            7 => {
                dev.discard(off, len).unwrap();
                shadow[off as usize..(off + len) as usize].fill(0);
            }
            _ => {
                dev.write_zeroes(off, len, kind == 8).unwrap();
                shadow[off as usize..(off + len) as usize].fill(0);
            }
        }
    }
}

fn base_setup(dir: &Path, cs: u64, refcount_order: u32) -> (Vec<u8>, Arc<dyn BlockDev>, CrashHost) {
    let base_data = random_bytes(42, SIZE as usize);
    let base = dir.join("base.raw");
    std::fs::write(&base, &base_data).unwrap();
    let backing: Arc<dyn BlockDev> = Arc::new(RawFile::open(&base, true).unwrap());
    let host = CrashHost::default();
    let opts = CreateOptions {
        size: SIZE,
        cluster_size: cs,
        backing: Some(("base.raw".into(), Format::Raw)),
        refcount_order,
        extended_l2: false,
    };
    create_on(&host, &opts).unwrap();
    (base_data, backing, host)
}

#[test]
fn no_metadata_is_written_before_the_cluster_it_points_to_is_durable_and_refcounted() {
    for (cs, order) in [(512u64, 4u32), (512, 6), (4096, 4), (65536, 4)] {
        let dir = tmp();
        let (base_data, backing, host) = base_setup(dir.path(), cs, order);
        let mut shadow = base_data.clone();
        let mut rng = rand::rngs::StdRng::seed_from_u64(cs);
        {
            let img =
                QcowImage::open_with(Box::new(host.clone()), false, Some(backing.clone())).unwrap();
            for _ in 0..6 {
                random_ops(&img, &mut shadow, &mut rng, 40, cs);
                img.flush().unwrap();
            }
            if order == 6 {
                // Outgrow the first refcount table (64 blocks of 64 clusters).
                img.write_at(&vec![0x6d; 3 << 20], 1 << 20).unwrap();
                shadow[1 << 20..4 << 20].fill(0x6d);
                img.flush().unwrap();
            }
            img.close().unwrap();
        }
        // Which clusters are L2 tables, in the final image.
        let fin = host.current();
        let hfin = Header::parse(&fin).unwrap();
        let g = hfin.geometry();
        let l2_tables: HashSet<u64> = (0..hfin.l1_size as usize)
            .map(|i| {
                format::l1_entry_offset(format::table_entry(
                    &fin[hfin.l1_table_offset as usize..],
                    i,
                ))
            })
            .filter(|&o| o != 0)
            .collect();
        assert!(!l2_tables.is_empty());

        let mut durable: Vec<u8> = Vec::new();
        let mut current: Vec<u8> = Vec::new();
        let mut pending: Vec<(u64, Vec<u8>)> = Vec::new();
        let mut dirty_clusters: HashSet<u64> = HashSet::new();
        let (mut l2_checked, mut l1_checked, mut rt_checked, mut relocations) = (0, 0, 0, 0);
        let cluster_of = |o: u64| o >> g.cluster_bits;
        for op in host.log() {
            match op {
                Op::Sync => {
                    for (off, data) in pending.drain(..) {
                        let end = off as usize + data.len();
                        if durable.len() < end {
                            durable.resize(end, 0);
                        }
                        durable[off as usize..end].copy_from_slice(&data);
                    }
                    dirty_clusters.clear();
                }
                Op::Write { off, data } => {
                    if let Ok(h) = Header::parse(&durable) {
                        let l1s = h.l1_table_offset;
                        let l1e = l1s + u64::from(h.l1_size) * 8;
                        let rts = h.refcount_table_offset;
                        let rte = rts + u64::from(h.refcount_table_clusters) * g.cluster_size();
                        let check_target = |t: u64, what: &str, dirty: &HashSet<u64>| {
                            assert!(
                                !dirty.contains(&cluster_of(t)),
                                "{what} {t:#x} referenced before it was synced"
                            );
                            assert!(
                                durable_refcount(&durable, &h, t) >= 1,
                                "{what} {t:#x} referenced with refcount 0"
                            );
                        };
                        if off >= l1s && off < l1e {
                            for (k, chunk) in data.chunks_exact(8).enumerate() {
                                let t = format::l1_entry_offset(u64::from_be_bytes(
                                    chunk.try_into().unwrap(),
                                ));
                                let at = off as usize + k * 8;
                                let old = durable
                                    .get(at..at + 8)
                                    .map_or(0, |b| u64::from_be_bytes(b.try_into().unwrap()));
                                if t != 0 && t != format::l1_entry_offset(old) {
                                    check_target(t, "L2 table", &dirty_clusters);
                                    l1_checked += 1;
                                }
                            }
                        } else if off >= rts && off < rte {
                            for (k, chunk) in data.chunks_exact(8).enumerate() {
                                let b = format::reftable_entry_offset(u64::from_be_bytes(
                                    chunk.try_into().unwrap(),
                                ));
                                let at = off as usize + k * 8;
                                let old = durable
                                    .get(at..at + 8)
                                    .map_or(0, |b| u64::from_be_bytes(b.try_into().unwrap()));
                                if b != 0 && b != format::reftable_entry_offset(old) {
                                    assert!(
                                        !dirty_clusters.contains(&cluster_of(b)),
                                        "refcount block {b:#x} referenced before it was synced"
                                    );
                                    rt_checked += 1;
                                }
                            }
                        } else if off <= 48 && off + data.len() as u64 >= 60 && off < 112 {
                            // Header rewrite: a relocated refcount table and all its blocks
                            // must be durable before the header points at them.
                            let new_h = {
                                let mut hb = current.clone();
                                let end = off as usize + data.len();
                                hb[off as usize..end].copy_from_slice(&data);
                                Header::parse(&hb).unwrap()
                            };
                            if new_h.refcount_table_offset != h.refcount_table_offset {
                                let t0 = new_h.refcount_table_offset;
                                let tlen =
                                    u64::from(new_h.refcount_table_clusters) * g.cluster_size();
                                let mut c = t0;
                                while c < t0 + tlen {
                                    assert!(
                                        !dirty_clusters.contains(&cluster_of(c)),
                                        "new refcount table not synced"
                                    );
                                    c += g.cluster_size();
                                }
                                let table = &current[t0 as usize..(t0 + tlen) as usize];
                                for i in 0..(tlen / 8) as usize {
                                    let b = format::reftable_entry_offset(format::table_entry(
                                        table, i,
                                    ));
                                    if b != 0 {
                                        assert!(
                                            !dirty_clusters.contains(&cluster_of(b)),
                                            "block of new table not synced"
                                        );
                                    }
                                }
                                relocations += 1;
                            }
                        } else if l2_tables.contains(&off) && data.len() as u64 == g.cluster_size()
                        {
                            for (k, chunk) in data.chunks_exact(8).enumerate() {
                                let raw = u64::from_be_bytes(chunk.try_into().unwrap());
                                let at = off as usize + k * 8;
                                let old = durable
                                    .get(at..at + 8)
                                    .map_or(0, |b| u64::from_be_bytes(b.try_into().unwrap()));
                                if raw == old {
                                    continue;
                                }
                                if let Ok(L2Entry::Normal { host: x, .. }) =
                                    L2Entry::decode(raw, &g)
                                {
                                    check_target(x, "data cluster", &dirty_clusters);
                                    l2_checked += 1;
                                }
                            }
                        }
                    }
                    let end = off as usize + data.len();
                    if current.len() < end {
                        current.resize(end, 0);
                    }
                    current[off as usize..end].copy_from_slice(&data);
                    let mut c = cluster_of(off);
                    while c <= cluster_of(end as u64 - 1) {
                        dirty_clusters.insert(c);
                        c += 1;
                    }
                    pending.push((off, data));
                }
            }
        }
        assert!(
            rt_checked > 0 || cs > 512,
            "cs {cs}: new refcount blocks were checked"
        );
        if order == 6 {
            assert!(relocations > 0, "refcount table relocation was exercised");
        }
        assert!(
            l2_checked > 10 && l1_checked > 0,
            "cs {cs}: the log exercised the checks ({l2_checked}, {l1_checked})"
        );
        // And the final image is what the guest wrote.
        let img = QcowImage::open_with(Box::new(MemHost::new(fin)), true, Some(backing)).unwrap();
        assert_same(&read_all(&img), &shadow, "final content");
    }
}

#[test]
fn crash_at_any_point_keeps_every_flushed_write_and_leaves_a_repairable_image() {
    let cs = 4096;
    let dir = tmp();
    let (base_data, backing, host) = base_setup(dir.path(), cs, 4);
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut shadow = base_data.clone();
    let img = QcowImage::open_with(Box::new(host.clone()), false, Some(backing.clone())).unwrap();
    let mut crashes = 0;
    for round in 0..6 {
        random_ops(&img, &mut shadow, &mut rng, 30, cs);
        img.flush().unwrap();
        let flushed = shadow.clone();
        // Unflushed work after the flush, then a crash with a random subset of it on disk.
        let mut touched = vec![false; SIZE as usize];
        let before = shadow.clone();
        random_ops(&img, &mut shadow, &mut rng, 10, cs);
        for (i, t) in touched.iter_mut().enumerate() {
            *t = before[i] != shadow[i];
        }
        for variant in 0..2 {
            let mut r2 = rand::rngs::StdRng::seed_from_u64(round * 10 + variant);
            let crashed = host.crash_image(&mut |_| r2.random_bool(0.5));
            // Read-only, unrepaired: every flushed byte is intact.
            let ro = QcowImage::open_with(
                Box::new(MemHost::new(crashed.clone())),
                true,
                Some(backing.clone()),
            )
            .unwrap();
            let got = read_all(&ro);
            for i in 0..SIZE as usize {
                if !touched[i] {
                    assert_eq!(
                        got[i], flushed[i],
                        "round {round}: flushed byte {i:#x} lost"
                    );
                }
            }
            drop(ro);
            // qemu-img check of the unrepaired crash image: leaks allowed, errors not.
            let path = dir.path().join("crash.qcow2");
            std::fs::write(&path, &crashed).unwrap();
            let st = std::process::Command::new("qemu-img")
                .args(["check", path.to_str().unwrap()])
                .output()
                .unwrap();
            assert!(
                matches!(st.status.code(), Some(0) | Some(3)),
                "round {round}: crash image has errors:\n{}",
                String::from_utf8_lossy(&st.stdout)
            );
            // Read-write open repairs (dirty bit); after a clean close qemu-img check is clean.
            {
                let rw = qcow_snapshot::open_qcow2(&path, false).unwrap();
                let got2 = read_all(&rw);
                assert_same(&got2, &got, "content after repair");
                rw.write_at(&[1, 2, 3], 4096 * 3).unwrap();
                rw.close().unwrap();
            }
            qemu_check(&path);
            crashes += 1;
        }
    }
    assert_eq!(crashes, 12);
    img.close().unwrap();
}
