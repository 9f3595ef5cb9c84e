//! Interoperability with the real qemu-img / qemu-io, both directions: images QEMU makes are
//! read and written correctly, and every image snapblk writes passes `qemu-img check` and
//! `qemu-img compare` against a raw reference.

mod common;

use std::path::{Path, PathBuf};

use blockdev::BlockDev;
use common::*;
use qcow_snapshot::{create, open_image, open_qcow2, CreateOptions, Format};

fn p(dir: &Path, name: &str) -> PathBuf {
    dir.join(name)
}

/// Writes a scattered set of patterns through the device and into `shadow`.
fn scatter_writes(dev: &dyn BlockDev, shadow: &mut [u8], cs: u64, seed: u64) {
    let size = shadow.len() as u64;
    let data = random_bytes(seed, (3 * cs).max(8192) as usize + 1000);
    let cases = [
        (0u64, 512u64),            // partial first cluster
        (cs + 100, 200),           // partial, unaligned, inside one cluster
        (2 * cs - 300, 600),       // crosses a cluster boundary
        (3 * cs, cs),              // exactly one cluster
        (5 * cs + 7, 2 * cs + 13), // several clusters, unaligned both ends
        (size - 4096, 4096),       // end of disk
    ];
    for (i, &(off, len)) in cases.iter().enumerate() {
        if off >= size {
            continue;
        }
        let len = len.min(size - off);
        let src = &data[i * 97..i * 97 + len as usize];
        dev.write_at(src, off).unwrap();
        shadow[off as usize..(off + len) as usize].copy_from_slice(src);
    }
}

#[test]
fn images_created_by_snapblk_pass_qemu_check_and_compare_for_every_cluster_size() {
    for cs in [512u64, 4096, 65536, 2 << 20] {
        let dir = tmp();
        let img = p(dir.path(), "a.qcow2");
        let size = 10u64 << 20;
        create(
            &img,
            &CreateOptions {
                size,
                cluster_size: cs,
                ..Default::default()
            },
        )
        .unwrap();
        qemu_check(&img);
        let mut shadow = vec![0u8; size as usize];
        {
            let dev = open_image(&img, None, false).unwrap();
            scatter_writes(&*dev, &mut shadow, cs, cs);
            assert_same(&read_all(&*dev), &shadow, "before flush");
            dev.flush().unwrap();
        }
        qemu_check_and_compare(&img, &shadow);
        let dev = open_image(&img, None, true).unwrap();
        assert_same(&read_all(&*dev), &shadow, "after reopen");
    }
}

#[test]
fn overlay_created_by_qemu_over_raw_reads_backing_and_qemu_io_data() {
    let dir = tmp();
    let base = p(dir.path(), "base.raw");
    let size = 8u64 << 20;
    let base_data = random_bytes(1, size as usize);
    std::fs::write(&base, &base_data).unwrap();
    let ov = p(dir.path(), "ov.qcow2");
    qemu_overlay(&ov, "base.raw", "raw", &[], "");
    qemu_io_write(&ov, "qcow2", 0xab, 65536 + 512, 4096);
    qemu_io_write(&ov, "qcow2", 0xcd, 3 << 20, 1 << 20);
    let mut want = base_data.clone();
    want[65536 + 512..65536 + 512 + 4096].fill(0xab);
    want[3 << 20..4 << 20].fill(0xcd);
    let dev = open_image(&ov, None, true).unwrap();
    assert_same(&read_all(&*dev), &want, "qemu-written overlay");
    assert_eq!(
        std::fs::read(&base).unwrap(),
        base_data,
        "backing untouched"
    );
}

#[test]
fn partial_write_into_unallocated_cluster_keeps_backing_bytes() {
    for (bfmt, cs) in [
        ("raw", 65536u64),
        ("qcow2", 4096),
        ("raw", 512),
        ("qcow2", 2 << 20),
    ] {
        let dir = tmp();
        let size = 6u64 << 20;
        let base_data = random_bytes(2, size as usize);
        let fmt = if bfmt == "qcow2" {
            Format::Qcow2
        } else {
            Format::Raw
        };
        let (rawbase, base) = base_in_format(dir.path(), &base_data, fmt);
        let ov = p(dir.path(), "ov.qcow2");
        let bname = base.file_name().unwrap().to_str().unwrap().to_string();
        create(
            &ov,
            &CreateOptions {
                size: 0,
                cluster_size: cs,
                backing: Some((bname, fmt)),
                ..Default::default()
            },
        )
        .unwrap();
        let mut want = base_data.clone();
        {
            let dev = open_image(&ov, None, false).unwrap();
            assert_eq!(dev.size(), size);
            scatter_writes(&*dev, &mut want, cs, 77);
            dev.flush().unwrap();
            assert_same(&read_all(&*dev), &want, "overlay view");
        }
        qemu_check_and_compare(&ov, &want);
        assert_eq!(
            std::fs::read(&rawbase).unwrap(),
            base_data,
            "base untouched"
        );
        let info = run("qemu-img", &["info", s(&ov)]);
        assert!(
            info.contains(&format!("backing file format: {bfmt}")),
            "{info}"
        );
    }
}

#[test]
fn qemu_created_images_of_every_cluster_size_are_read_and_written_correctly() {
    for cs in [512u64, 4096, 65536, 2 << 20] {
        let dir = tmp();
        let size = 6u64 << 20;
        let img = qemu_create(
            dir.path(),
            "q.qcow2",
            &format!("cluster_size={cs}"),
            "6M",
            &[],
        );
        qemu_io_write(&img, "qcow2", 0x11, 0, 3 * cs);
        qemu_io_write(&img, "qcow2", 0x22, 4 << 20, 8192);
        let mut want = vec![0u8; size as usize];
        want[..3 * cs as usize].fill(0x11);
        want[4 << 20..(4 << 20) + 8192].fill(0x22);
        {
            let dev = open_image(&img, None, false).unwrap();
            assert_same(&read_all(&*dev), &want, "qemu data");
            // Overwrite allocated data in place, and allocate new clusters.
            scatter_writes(&*dev, &mut want, cs, 5);
            dev.write_zeroes(4 << 20, 4096, false).unwrap();
            want[4 << 20..(4 << 20) + 4096].fill(0);
        }
        qemu_check_and_compare(&img, &want);
    }
}

#[test]
fn compressed_clusters_from_qemu_convert_read_back_for_zlib_and_zstd() {
    for ctype in ["zlib", "zstd"] {
        let dir = tmp();
        let size = 4u64 << 20;
        // Compressible but not trivial data.
        let mut data = vec![0u8; size as usize];
        for (i, b) in data.iter_mut().enumerate() {
            *b = ((i / 7) % 13) as u8 ^ ((i >> 12) as u8);
        }
        data[1 << 20..(1 << 20) + 65536].copy_from_slice(&random_bytes(9, 65536));
        let raw = p(dir.path(), "src.raw");
        std::fs::write(&raw, &data).unwrap();
        let img = p(dir.path(), "c.qcow2");
        run(
            "qemu-img",
            &[
                "convert",
                "-q",
                "-c",
                "-O",
                "qcow2",
                "-o",
                &format!("compression_type={ctype}"),
                s(&raw),
                s(&img),
            ],
        );
        let q = open_qcow2(&img, true).unwrap();
        let ext = q.map(0, size).unwrap();
        assert!(
            ext.iter()
                .any(|e| matches!(e.mapping, qcow_snapshot::Mapping::Compressed(_))),
            "{ctype}: image has compressed clusters"
        );
        assert_same(&read_all(&q), &data, ctype);
        drop(q);
        // Writing into compressed clusters COWs them and drops their refcounts.
        let mut want = data.clone();
        {
            let dev = open_image(&img, None, false).unwrap();
            scatter_writes(&*dev, &mut want, 65536, 3);
            dev.discard(2 << 20, 65536).unwrap();
            want[2 << 20..(2 << 20) + 65536].fill(0);
            assert_same(&read_all(&*dev), &want, "after writes");
        }
        qemu_check_and_compare(&img, &want);
    }
}

#[test]
fn backing_chain_of_three_levels_with_relative_names_reads_the_topmost_data() {
    let dir = tmp();
    let sub = dir.path().join("sub");
    std::fs::create_dir(&sub).unwrap();
    let base = sub.join("base.raw");
    let size = 2u64 << 20;
    let mut want = random_bytes(4, size as usize);
    std::fs::write(&base, &want).unwrap();
    let mid = sub.join("mid.qcow2");
    qemu_overlay(&mid, "base.raw", "raw", &[], "");
    qemu_io_write(&mid, "qcow2", 0x5a, 65536, 65536);
    want[65536..131072].fill(0x5a);
    let top = dir.path().join("top.qcow2");
    create(
        &top,
        &CreateOptions {
            backing: Some(("sub/mid.qcow2".into(), Format::Qcow2)),
            cluster_size: 4096,
            ..Default::default()
        },
    )
    .unwrap();
    {
        let dev = open_image(&top, None, false).unwrap();
        assert_same(&read_all(&*dev), &want, "chain");
        dev.write_at(&[0xee; 10], 65536 + 5).unwrap();
        want[65536 + 5..65536 + 15].fill(0xee);
        dev.write_zeroes(0, 8192, true).unwrap();
        want[..8192].fill(0);
        assert_same(&read_all(&*dev), &want, "chain after write");
    }
    qemu_check_and_compare(&top, &want);
}

#[test]
fn qemu_img_info_agrees_with_snapblk_created_header() {
    let dir = tmp();
    let base = p(dir.path(), "b.raw");
    std::fs::write(&base, vec![0u8; 1 << 20]).unwrap();
    let img = p(dir.path(), "o.qcow2");
    create(
        &img,
        &CreateOptions {
            backing: Some(("b.raw".into(), Format::Raw)),
            refcount_order: 3,
            ..Default::default()
        },
    )
    .unwrap();
    let out = run("qemu-img", &["info", s(&img)]);
    assert!(out.contains("virtual size: 1 MiB (1048576 bytes)"), "{out}");
    assert!(out.contains("backing file: b.raw"), "{out}");
    assert!(out.contains("backing file format: raw"), "{out}");
    assert!(out.contains("compat: 1.1"), "{out}");
    assert!(out.contains("refcount bits: 8"), "{out}");
    let ours = qcow_snapshot::info(&img).unwrap();
    assert_eq!(ours.virtual_size, 1 << 20);
    assert_eq!(ours.backing_file.as_deref(), Some("b.raw"));
    assert_eq!(ours.backing_format.as_deref(), Some("raw"));
    assert_eq!(ours.refcount_bits, Some(8));
    assert!(!ours.dirty);
    let text = ours.to_string();
    assert!(
        text.contains("file format: qcow2") && text.contains("cluster_size: 65536"),
        "{text}"
    );
}

/// Subcluster-granular writes, zero writes and discards of both sizes through `dev` (and into
/// `shadow`), for a cluster size `cs` with 32 subclusters.
fn subcluster_ops(dev: &dyn BlockDev, shadow: &mut [u8], cs: u64, seed: u64) {
    let sc = cs / 32;
    let data = random_bytes(seed, 3 * cs as usize);
    // (offset, length, Some(unmap) for a zero write / None for data)
    let ops = [
        (8 * cs, 4096, None),                  // first subcluster(s) of a fresh cluster
        (9 * cs + 3 * sc + 100, 200, None),    // inside one subcluster, unaligned both ends
        (10 * cs + sc - 512, sc + 1024, None), // crosses two subcluster boundaries
        (11 * cs - 512, 1024, None),           // crosses a cluster boundary
        (9 * cs + 20 * sc, 5 * sc, None),      // a second run in a partly allocated cluster
        (9 * cs + 21 * sc, 2 * sc, Some(false)), // whole allocated subclusters
        (12 * cs + 2 * sc, 3 * sc, Some(true)), // whole unallocated subclusters over backing
        (12 * cs + 7 * sc + 512, 512, Some(false)), // part of a subcluster
        (13 * cs, cs, Some(false)),            // a whole cluster
        (10 * cs + 100, 3 * sc, Some(true)),   // unaligned, mixed
        (13 * cs + 5 * sc, sc, None),          // a write into a zero cluster
    ];
    for (off, len, zero) in ops {
        let range = off as usize..(off + len) as usize;
        match zero {
            Some(unmap) => {
                dev.write_zeroes(off, len, unmap).unwrap();
                shadow[range].fill(0);
            }
            None => {
                let src = &data[(off % cs) as usize..(off % cs + len) as usize];
                dev.write_at(src, off).unwrap();
                shadow[range].copy_from_slice(src);
            }
        }
    }
}

/// qemu-img map of the top layer only: (offset, length, data) for each range.
fn top_layer_map(img: &Path) -> Vec<(u64, u64, bool)> {
    let out = run("qemu-img", &["map", "--output=json", s(img)]);
    let mut v = Vec::new();
    for line in out.lines() {
        let num = |k: &str| -> u64 {
            let i = line.find(&format!("\"{k}\": ")).unwrap() + k.len() + 4;
            line[i..]
                .chars()
                .take_while(|c| c.is_ascii_digit())
                .collect::<String>()
                .parse()
                .unwrap()
        };
        if !line.contains("\"start\"") {
            continue;
        }
        let top = num("depth") == 0;
        v.push((
            num("start"),
            num("length"),
            top && line.contains("\"data\": true"),
        ));
    }
    v
}

#[test]
fn extended_l2_overlay_written_by_snapblk_allocates_only_touched_subclusters_and_qemu_agrees() {
    for (bfmt, cs) in [
        (Format::Raw, 65536u64),
        (Format::Qcow2, 16384),
        (Format::Raw, 2 << 20),
    ] {
        let dir = tmp();
        let size = 40 * cs;
        let base_data = random_bytes(9, size as usize);
        let (_, base) = base_in_format(dir.path(), &base_data, bfmt);
        let ov = p(dir.path(), "ov.qcow2");
        create(
            &ov,
            &CreateOptions {
                cluster_size: cs,
                backing: Some((base.file_name().unwrap().to_str().unwrap().into(), bfmt)),
                extended_l2: true,
                ..Default::default()
            },
        )
        .unwrap();
        let info = run("qemu-img", &["info", s(&ov)]);
        assert!(info.contains("extended l2: true"), "{info}");
        let mut want = base_data.clone();
        {
            let dev = open_image(&ov, None, false).unwrap();
            subcluster_ops(&*dev, &mut want, cs, cs);
            assert_same(&read_all(&*dev), &want, "snapblk view");
            dev.flush().unwrap();
        }
        qemu_check_and_compare(&ov, &want);
        // The 4 KiB write into cluster 8 allocated only its own subclusters: qemu-img sees
        // the rest of that cluster in the backing file.
        let sc = cs / 32;
        let top: Vec<_> = top_layer_map(&ov)
            .into_iter()
            .filter(|&(o, l, data)| data && o < 9 * cs && o + l > 8 * cs)
            .collect();
        assert_eq!(top, vec![(8 * cs, 4096u64.max(sc), true)], "{cs}");
        let dev = open_image(&ov, None, true).unwrap();
        assert_same(&read_all(&*dev), &want, "after reopen");
    }
}

#[test]
fn extended_l2_images_written_by_qemu_io_are_read_and_extended_by_snapblk_through_the_chain() {
    let dir = tmp();
    let size = 4u64 << 20;
    let cs = 65536u64;
    let base_data = random_bytes(5, size as usize);
    let (_, base) = base_in_format(dir.path(), &base_data, Format::Qcow2);
    // base.qcow2 <- mid.qcow2 (extended L2, written by qemu-io) <- top.qcow2 (extended L2).
    let mid = p(dir.path(), "mid.qcow2");
    qemu_overlay(
        &mid,
        s(&base),
        "qcow2",
        &["-o", "extended_l2=on,cluster_size=64k"],
        "",
    );
    let mut want = base_data;
    let io = |img: &Path, cmd: &str| run("qemu-io", &["-f", "qcow2", "-c", cmd, s(img)]);
    for (cmd, off, len, pat) in [
        ("write -P 0x11", 2048u64, 2048u64, Some(0x11u8)),
        ("write -P 0x22", cs + 4096, 6144, Some(0x22)),
        ("write -z", 2 * cs + 8192, 4096, None),
        ("write -P 0x33", 3 * cs, cs, Some(0x33)),
        ("discard", 3 * cs + 2048, 4096, None),
        ("write -z", 5 * cs, 2 * cs, None),
    ] {
        io(&mid, &format!("{cmd} {off} {len}"));
        want[off as usize..(off + len) as usize].fill(pat.unwrap_or(0));
    }
    // What QEMU itself reads (a discard may fall through to the backing file).
    let qemu_view = p(dir.path(), "qemu_view.raw");
    run(
        "qemu-img",
        &["convert", "-O", "raw", s(&mid), s(&qemu_view)],
    );
    let qemu_view = std::fs::read(&qemu_view).unwrap();
    assert_same(
        &qemu_view[..3 * cs as usize],
        &want[..3 * cs as usize],
        "qemu's own view",
    );
    let mut want = qemu_view;
    {
        let dev = open_image(&mid, None, true).unwrap();
        assert_same(&read_all(&*dev), &want, "qemu-written extended L2 image");
    }
    let top = p(dir.path(), "top.qcow2");
    create(
        &top,
        &CreateOptions {
            backing: Some(("mid.qcow2".into(), Format::Qcow2)),
            extended_l2: true,
            ..Default::default()
        },
    )
    .unwrap();
    {
        let dev = open_image(&top, None, false).unwrap();
        subcluster_ops(&*dev, &mut want, cs, 3);
        dev.flush().unwrap();
    }
    qemu_check(&mid);
    qemu_check_and_compare(&top, &want);
    // snapblk writes into the qemu-made image itself too.
    {
        let dev = open_image(&mid, None, false).unwrap();
        let mut mid_want = vec![0u8; size as usize];
        dev.read_at(&mut mid_want, 0).unwrap();
        subcluster_ops(&*dev, &mut mid_want, cs, 4);
        dev.flush().unwrap();
        drop(dev);
        qemu_check_and_compare(&mid, &mid_want);
    }
}

#[test]
fn images_with_an_external_data_file_are_refused_with_the_reason_and_the_data_file_is_untouched() {
    let dir = tmp();
    let data = p(dir.path(), "data.raw");
    for raw in ["off", "on"] {
        let img = p(dir.path(), "ext.qcow2");
        let _ = std::fs::remove_file(&data);
        let opts = &format!("data_file={},data_file_raw={raw}", s(&data));
        run(
            "qemu-img",
            &["create", "-q", "-f", "qcow2", "-o", opts, s(&img), "4M"],
        );
        qemu_io_write(&img, "qcow2", 0x42, 0, 65536);
        let before = std::fs::read(&data).unwrap();
        for ro in [true, false] {
            let e = match open_image(&img, None, ro) {
                Ok(_) => panic!("{opts}: opened"),
                Err(e) => e.to_string(),
            };
            assert!(
                e.contains(&format!("external data file '{}'", s(&data)))
                    && e.contains("never follows"),
                "{opts}: {e}"
            );
        }
        assert_eq!(std::fs::read(&data).unwrap(), before, "{opts}");
    }
}

/// An O_DIRECT image grows its file ahead of the writes (parallel direct writes need the
/// blocks allocated), closes at the length buffered writes leave, and a crash that leaves the
/// grown tail behind leaves an image qemu-img checks clean and reads the same.
#[test]
fn a_direct_image_grows_ahead_while_open_and_closes_at_the_length_buffered_writes_leave() {
    for extended_l2 in [false, true] {
        let dir = tmp();
        let size = 256u64 << 20;
        let make = |name: &str| {
            let img = p(dir.path(), name);
            create(
                &img,
                &CreateOptions {
                    size,
                    extended_l2,
                    ..Default::default()
                },
            )
            .unwrap();
            img
        };
        let (buffered, direct, live) = (make("b.qcow2"), make("d.qcow2"), make("c.qcow2"));
        let crashed = p(dir.path(), "crashed.qcow2");
        let mut shadow = vec![0u8; size as usize];
        let len = |img: &Path| std::fs::metadata(img).unwrap().len();
        {
            let b = open_qcow2(&buffered, false).unwrap();
            let d = open_qcow2(&direct, false).unwrap();
            if let Err(e) = d.enable_direct() {
                // tmpfs and a few others refuse O_DIRECT: nothing to grow there.
                assert_eq!(e.raw_os_error(), Some(libc::EINVAL), "{e}");
                return;
            }
            let mut other = shadow.clone();
            scatter_writes(&b, &mut shadow, 65536, 7);
            scatter_writes(&d, &mut other, 65536, 7);
            let far = random_bytes(9, 4096);
            for dev in [&b as &dyn BlockDev, &d] {
                dev.write_at(&far, 100 << 20).unwrap();
                dev.flush().unwrap();
            }
            shadow[100 << 20..(100 << 20) + 4096].copy_from_slice(&far);
            assert!(
                len(&direct) >= len(&buffered) + qcow_snapshot::GROW_AHEAD / 2,
                "the direct image did not grow ahead ({} against {})",
                len(&direct),
                len(&buffered)
            );
            assert_same(&read_all(&d), &shadow, "direct image while open");
        }
        assert_eq!(len(&direct), len(&buffered), "extended_l2={extended_l2}");
        let raw = p(dir.path(), "want.raw");
        std::fs::write(&raw, &shadow).unwrap();
        qemu_check(&direct);
        qemu_compare(&direct, &raw);
        // A crash after a flush (the file as it is then, copied while the image is open): the
        // grown tail stays; the image is still clean and whole.
        let c = open_qcow2(&live, false).unwrap();
        c.enable_direct().unwrap();
        let mut third = vec![0u8; size as usize];
        scatter_writes(&c, &mut third, 65536, 7);
        c.write_at(&shadow[100 << 20..(100 << 20) + 4096], 100 << 20)
            .unwrap();
        c.flush().unwrap();
        std::fs::copy(&live, &crashed).unwrap();
        drop(c);
        assert!(len(&crashed) > len(&buffered));
        qemu_check(&crashed);
        qemu_compare(&crashed, &raw);
        let reopened = open_qcow2(&crashed, false).unwrap();
        assert_same(&read_all(&reopened), &shadow, "reopened after the crash");
        // The first write after reopening lands past the tail, and a clean close keeps it.
        reopened.write_at(&[7u8; 4096], 0).unwrap();
        drop(reopened);
        qemu_check(&crashed);
    }
}

#[test]
fn batches_of_writes_into_a_direct_overlay_check_and_compare_like_the_same_writes_one_by_one() {
    // Batches (what the cache's writeback hands down) into an O_DIRECT overlay over a raw base:
    // whole subclusters, copy-on-write of partly covered clusters or subclusters, two writes
    // into one fresh cluster, in-place overwrites of allocated clusters, unaligned writes. The
    // image reads back as the writes made it, and qemu-img finds it clean and equal. Also on a
    // buffered overlay whose large writes go direct (`--direct large`), where a batch's merged
    // copy-on-write clusters are such a write.
    for (extended_l2, large) in [(false, false), (true, false), (false, true)] {
        let dir = tmp();
        let cs = 65536u64;
        let size = 8u64 << 20;
        let base = random_bytes(3, size as usize);
        let img = overlay_over_raw(dir.path(), &base, size, extended_l2);
        let q = open_qcow2(&img, false).unwrap();
        let direct = if large {
            q.enable_direct_large(256 << 10)
        } else {
            q.enable_direct()
        };
        if let Err(e) = direct {
            assert_eq!(e.raw_os_error(), Some(libc::EINVAL), "{e}");
            return;
        }
        // Copy-on-write fills read the base with O_DIRECT, as `serve` sets it up.
        q.enable_direct_backing().unwrap();
        let mut shadow = base.clone();
        let shapes: [(u64, usize); 12] = [
            (0, 4096),                 // one subcluster pair at a cluster's start
            (cs + 8192, 4096),         // inside a fresh cluster
            (cs + 32768, 4096),        // a second write into the same fresh cluster
            (3 * cs + 100, 3000),      // unaligned, partial subclusters
            (5 * cs, cs as usize),     // a whole cluster
            (7 * cs - 512, 1024),      // across a cluster boundary
            (9 * cs, 3 * cs as usize), // several whole clusters
            (size - 4096, 4096),       // the end of the disk
            // Four fresh clusters in a row (copied on write without subclusters: with the
            // one before them, 320 KiB go down as one write, direct in `large` mode too).
            (40 * cs + 512, 4096),
            (41 * cs + 512, 4096),
            (42 * cs + 512, 4096),
            (43 * cs + 512, 4096),
        ];
        for round in 0..2u64 {
            let bufs: Vec<(blockdev::AlignedBuf, u64)> = shapes
                .iter()
                .enumerate()
                .map(|(i, &(off, len))| {
                    let mut b = blockdev::AlignedBuf::zeroed_aligned(len, 4096);
                    b.copy_from_slice(&random_bytes(round * 100 + i as u64, len));
                    (b, off)
                })
                .collect();
            let writes: Vec<(&[u8], u64)> = bufs.iter().map(|(b, o)| (&b[..], *o)).collect();
            batch_round(&q, &writes, &mut shadow, round);
        }
        close_and_compare(q, dir.path(), &img, &shadow);
    }
}

#[test]
fn copy_on_write_fills_of_batches_read_a_raw_base_with_o_direct_and_compare_equal() {
    // First writes into a standard-L2 overlay whose raw base is read with O_DIRECT for the
    // copy-on-write fills (all fills of a batch on a ring, straight into the batch's buffer).
    // The base is shorter than the disk and ends inside a block: fills of whole base clusters,
    // of the base's partial last cluster and of clusters past its end (zeros). The overlay
    // reads back as written, and qemu-img finds it clean and equal.
    let dir = tmp();
    let cs = 65536u64;
    let size = 4u64 << 20;
    let base = random_bytes(5, (1 << 20) + 1000);
    let img = overlay_over_raw(dir.path(), &base, size, false);
    let q = open_qcow2(&img, false).unwrap();
    if let Err(e) = q.enable_direct_backing() {
        // tmpfs and a few others refuse O_DIRECT.
        assert_eq!(e.raw_os_error(), Some(libc::EINVAL), "{e}");
        return;
    }
    let mut shadow = base.clone();
    shadow.resize(size as usize, 0);
    for round in 0..2u64 {
        let clusters: &[u64] = if round == 0 {
            &[0, 1, 2, 15, 16, 17, 40]
        } else {
            &[3, 4, 5, 6, 20, 63]
        };
        let bufs: Vec<(Vec<u8>, u64)> = clusters
            .iter()
            .map(|&c| {
                let off = c * cs + 4096 * (c % 8) + 512 * round;
                (random_bytes(round * 1000 + c, 4096), off)
            })
            .collect();
        let writes: Vec<(&[u8], u64)> = bufs.iter().map(|(b, o)| (&b[..], *o)).collect();
        batch_round(&q, &writes, &mut shadow, round);
    }
    assert!(q.backing_ring_reads() > 0, "no fill was read on a ring");
    close_and_compare(q, dir.path(), &img, &shadow);
}

/// `dir/o.qcow2`: a fresh overlay of `size` bytes (64 KiB clusters, subclusters with
/// `extended_l2`) over `dir/base.raw` holding `base`.
fn overlay_over_raw(dir: &Path, base: &[u8], size: u64, extended_l2: bool) -> PathBuf {
    std::fs::write(p(dir, "base.raw"), base).unwrap();
    let img = p(dir, "o.qcow2");
    create(
        &img,
        &CreateOptions {
            size,
            cluster_size: 65536,
            extended_l2,
            backing: Some(("base.raw".into(), Format::Raw)),
            ..Default::default()
        },
    )
    .unwrap();
    img
}

/// Writes `writes` as one batch into `q`, each must succeed, and checks that `q` reads as
/// `shadow` with them applied.
fn batch_round(
    q: &qcow_snapshot::QcowImage,
    writes: &[(&[u8], u64)],
    shadow: &mut [u8],
    round: u64,
) {
    for (i, r) in q.write_batch(writes).into_iter().enumerate() {
        r.unwrap_or_else(|e| panic!("round {round} write {i}: {e}"));
    }
    for (b, o) in writes {
        shadow[*o as usize..*o as usize + b.len()].copy_from_slice(b);
    }
    assert_same(&read_all(q), shadow, &format!("round {round}"));
}

/// Flushes and closes `q` (the image at `img`), then has qemu-img check it and compare it
/// with `shadow`.
fn close_and_compare(q: qcow_snapshot::QcowImage, dir: &Path, img: &Path, shadow: &[u8]) {
    q.flush().unwrap();
    drop(q);
    let raw = p(dir, "want.raw");
    std::fs::write(&raw, shadow).unwrap();
    qemu_check(img);
    qemu_compare(img, &raw);
}
