//! Hostile and damaged images: bad headers and tables give clear errors, inconsistencies found
//! during I/O mark the image corrupt, backing loops are refused, and random damage never
//! panics.

mod common;

use std::sync::Arc;

use blockdev::{BlockDev, BlockError, MemDisk};
use common::*;
use qcow_snapshot::api::MAX_CHAIN_DEPTH;
use qcow_snapshot::format::{self, incompat, Header};
use qcow_snapshot::{
    create, create_on, open_image, CreateImageError, CreateOptions, Format, MemHost,
    OpenImageError, QcowImage,
};
use rand::{Rng, SeedableRng};

const CS: u64 = 4096;

/// A small populated image (no backing) as bytes.
fn populated() -> Vec<u8> {
    let host = Arc::new(MemHost::default());
    create_on(
        &*host,
        &CreateOptions {
            size: 1 << 20,
            cluster_size: CS,
            ..Default::default()
        },
    )
    .unwrap();
    let img = QcowImage::open_with(Box::new(SharedMem(host.clone())), false, None).unwrap();
    img.write_at(&random_bytes(3, 100_000), 5000).unwrap();
    img.close().unwrap();
    drop(img);
    host.contents()
}

struct SharedMem(Arc<MemHost>);

impl qcow_snapshot::HostFile for SharedMem {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.0.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.0.write_at(buf, offset)
    }
    fn sync_data(&self) -> std::io::Result<()> {
        self.0.sync_data()
    }
    fn len(&self) -> std::io::Result<u64> {
        self.0.len()
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.0.set_len(len)
    }
}

fn open(bytes: Vec<u8>, ro: bool) -> Result<QcowImage, OpenImageError> {
    QcowImage::open_with(Box::new(MemHost::new(bytes)), ro, None)
}

fn with_header(bytes: &[u8], f: impl FnOnce(&mut Header)) -> Vec<u8> {
    let mut h = Header::parse(bytes).unwrap();
    f(&mut h);
    let mut out = bytes.to_vec();
    let hb = h.serialize();
    out[..hb.len()].copy_from_slice(&hb);
    out
}

#[test]
fn hostile_header_fields_are_refused_with_clear_errors() {
    let good = populated();
    assert!(open(good.clone(), true).is_ok());
    type Mutation = Box<dyn Fn(&mut Header)>;
    let cases: Vec<(&str, Mutation)> = vec![
        ("l1 over header", Box::new(|h| h.l1_table_offset = 0)),
        ("l1 past eof", Box::new(|h| h.l1_table_offset = 1 << 40)),
        ("l1 misaligned", Box::new(|h| h.l1_table_offset += 8)),
        ("huge size", Box::new(|h| h.size = u64::MAX)),
        ("l1 too small", Box::new(|h| h.size = 1 << 50)),
        ("l1 too large", Box::new(|h| h.l1_size = u32::MAX)),
        ("cluster bits", Box::new(|h| h.cluster_bits = 40)),
        ("refcount order", Box::new(|h| h.refcount_order = 9)),
        (
            "reftable past eof",
            Box::new(|h| h.refcount_table_offset = 1 << 30),
        ),
        (
            "reftable huge",
            Box::new(|h| h.refcount_table_clusters = 1 << 30),
        ),
        ("encrypted", Box::new(|h| h.crypt_method = 2)),
        (
            "unknown incompatible bit",
            Box::new(|h| h.incompatible_features |= 1 << 20),
        ),
        (
            "external data file",
            Box::new(|h| h.incompatible_features |= incompat::EXTERNAL_DATA_FILE),
        ),
        (
            "extended l2",
            Box::new(|h| h.incompatible_features |= incompat::EXTENDED_L2),
        ),
        (
            "backing name too long",
            Box::new(|h| {
                h.backing_file_offset = 512;
                h.backing_file_size = 4000;
            }),
        ),
        (
            "compression type without bit",
            Box::new(|h| h.compression_type = 1),
        ),
    ];
    for (what, f) in cases {
        let bad = with_header(&good, f);
        let e = open(bad.clone(), true).expect_err(what);
        let msg = e.to_string();
        assert!(!msg.is_empty(), "{what}");
        assert!(open(bad, false).is_err(), "{what} read-write");
    }
    let e = open(
        with_header(&good, |h| h.incompatible_features |= 1 << 20),
        true,
    )
    .unwrap_err();
    assert!(matches!(e, OpenImageError::Unsupported(_)), "{e}");
    // Truncated file and wrong magic.
    assert!(open(good[..50].to_vec(), true).is_err());
    assert!(matches!(
        open(vec![0u8; 8192], true),
        Err(OpenImageError::Format(format::DecodeError::BadMagic(0)))
    ));
}

#[test]
fn corrupt_bit_and_snapshots_allow_read_only_open_only() {
    let good = populated();
    let c = with_header(&good, |h| h.incompatible_features |= incompat::CORRUPT);
    assert!(matches!(
        open(c.clone(), false),
        Err(OpenImageError::ReadOnlyOnly(_))
    ));
    let img = open(c, true).unwrap();
    assert_eq!(read_all(&img)[5000..5010], random_bytes(3, 10)[..]);
    let s = with_header(&good, |h| {
        h.nb_snapshots = 1;
        h.snapshots_offset = CS;
    });
    assert!(matches!(
        open(s.clone(), false),
        Err(OpenImageError::ReadOnlyOnly(_))
    ));
    assert!(open(s, true).is_ok());
}

#[test]
fn l2_entry_pointing_past_eof_or_into_metadata_marks_the_image_corrupt() {
    let good = populated();
    let h = Header::parse(&good).unwrap();
    let l1 = format::table_entry(&good[h.l1_table_offset as usize..], 0);
    let l2 = format::l1_entry_offset(l1) as usize;
    for target in [
        1u64 << 40,
        0x200, /* misaligned */
        h.l1_table_offset,
        h.refcount_table_offset,
    ] {
        let mut bad = good.clone();
        // Guest cluster 1 (bytes 4096..8192) is allocated; repoint it.
        format::set_table_entry(&mut bad[l2..], 1, format::OFLAG_COPIED | target);
        let host = Arc::new(MemHost::new(bad));
        let img = QcowImage::open_with(Box::new(SharedMem(host.clone())), false, None).unwrap();
        let mut b = [0u8; 512];
        assert!(
            matches!(img.read_at(&mut b, 4096), Err(BlockError::Corrupt(_))),
            "target {target:#x}"
        );
        assert!(img.is_corrupt());
        // Everything fails afterwards, even unrelated ranges.
        assert!(matches!(
            img.read_at(&mut b, 0),
            Err(BlockError::Corrupt(_))
        ));
        assert!(matches!(
            img.write_at(&b, 900_000),
            Err(BlockError::Corrupt(_))
        ));
        drop(img);
        let h2 = Header::parse(&host.contents()).unwrap();
        assert!(
            h2.incompatible_features & incompat::CORRUPT != 0,
            "corrupt bit persisted"
        );
        assert!(open(host.contents(), false).is_err());
    }
    // A garbage compressed descriptor is an error, not a panic.
    let mut bad = good.clone();
    format::set_table_entry(&mut bad[l2..], 1, format::OFLAG_COMPRESSED | (CS * 2 + 17));
    let img = open(bad, true).unwrap();
    let mut b = [0u8; 512];
    assert!(img.read_at(&mut b, 4096).is_err());
}

#[test]
fn backing_loops_and_overlong_chains_are_refused() {
    let dir = tmp();
    let a = dir.path().join("a.qcow2");
    let b = dir.path().join("b.qcow2");
    std::fs::write(dir.path().join("base.raw"), vec![0u8; 65536]).unwrap();
    create(
        &b,
        &CreateOptions {
            backing: Some(("base.raw".into(), Format::Raw)),
            ..Default::default()
        },
    )
    .unwrap();
    create(
        &a,
        &CreateOptions {
            backing: Some(("b.qcow2".into(), Format::Qcow2)),
            ..Default::default()
        },
    )
    .unwrap();
    // Recreating b over a (a -> b -> a) is refused: b is part of a's chain.
    let e = create(
        &b,
        &CreateOptions {
            size: 65536,
            backing: Some(("a.qcow2".into(), Format::Qcow2)),
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(matches!(e, CreateImageError::SelfBacking(_)), "{e}");
    // A loop made behind snapblk's back (write elsewhere, rename over b) is refused at open.
    let b2 = dir.path().join("b2.qcow2");
    create(
        &b2,
        &CreateOptions {
            size: 65536,
            backing: Some(("a.qcow2".into(), Format::Qcow2)),
            ..Default::default()
        },
    )
    .unwrap();
    std::fs::rename(&b2, &b).unwrap();
    let e = open_image(&a, None, true).err().unwrap();
    assert!(matches!(e, OpenImageError::BackingLoop(_)), "{e}");
    // Self loop: refused by create, and refused at open when made by renaming.
    let e = create(
        &a,
        &CreateOptions {
            size: 65536,
            backing: Some(("a.qcow2".into(), Format::Qcow2)),
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(matches!(e, CreateImageError::SelfBacking(_)), "{e}");
    let a2 = dir.path().join("a2.qcow2");
    create(
        &a2,
        &CreateOptions {
            size: 65536,
            backing: Some(("a.qcow2".into(), Format::Qcow2)),
            ..Default::default()
        },
    )
    .unwrap();
    std::fs::rename(&a2, &a).unwrap();
    assert!(matches!(
        open_image(&a, None, false),
        Err(OpenImageError::BackingLoop(_))
    ));
    // Chains as deep as MAX_CHAIN_DEPTH open (QEMU has no fixed limit; it opens 500-deep
    // chains); one more is refused. Created top down, so each create is O(1).
    let n = MAX_CHAIN_DEPTH;
    for i in (0..=n).rev() {
        let (prev, fmt) = if i == 0 {
            ("base.raw".to_string(), Format::Raw)
        } else {
            (format!("c{}.qcow2", i - 1), Format::Qcow2)
        };
        create(
            &dir.path().join(format!("c{i}.qcow2")),
            &CreateOptions {
                size: 65536,
                backing: Some((prev, fmt)),
                ..Default::default()
            },
        )
        .unwrap();
    }
    // c{i} has i + 1 images below it: c{n-1} has exactly MAX_CHAIN_DEPTH, c{n} one more.
    let e = open_image(&dir.path().join(format!("c{n}.qcow2")), None, true)
        .err()
        .unwrap();
    assert!(matches!(e, OpenImageError::ChainTooDeep(_)), "{e}");
    let deep = open_image(&dir.path().join(format!("c{}.qcow2", n - 1)), None, true).unwrap();
    let mut buf = [1u8; 512];
    deep.read_at(&mut buf, 0).unwrap();
    assert_eq!(buf, [0u8; 512]);
    // Unknown backing format.
    let x = dir.path().join("x.qcow2");
    qemu_overlay(&x, "base.raw", "vmdk", &["-u"], "64K");
    assert!(matches!(
        open_image(&x, None, true),
        Err(OpenImageError::BackingFormat(_))
    ));
}

#[test]
fn image_with_backing_name_but_no_backing_device_is_refused() {
    let host = MemHost::default();
    create_on(
        &host,
        &CreateOptions {
            size: 65536,
            backing: Some(("b".into(), Format::Raw)),
            ..Default::default()
        },
    )
    .unwrap();
    let bytes = host.contents();
    assert!(matches!(
        open(bytes.clone(), true),
        Err(OpenImageError::MissingBacking(_))
    ));
    let backing: Arc<dyn BlockDev> = Arc::new(MemDisk::new(1000));
    let img = QcowImage::open_with(Box::new(MemHost::new(bytes)), true, Some(backing)).unwrap();
    // A backing device smaller than the overlay reads as zeros past its end.
    assert!(read_all(&img).iter().all(|&b| b == 0));
}

#[test]
fn random_damage_to_metadata_never_panics() {
    let good = populated();
    let h = Header::parse(&good).unwrap();
    let meta_end = (h.refcount_table_offset as usize + 3 * CS as usize).min(good.len());
    let mut rng = rand::rngs::StdRng::seed_from_u64(99);
    for _ in 0..400 {
        let mut bad = good.clone();
        for _ in 0..rng.random_range(1..6) {
            let i = if rng.random_bool(0.3) {
                rng.random_range(0..112)
            } else {
                rng.random_range(0..meta_end)
            };
            bad[i] = rng.random();
        }
        // Also damage an L2 table / data area sometimes.
        if rng.random_bool(0.5) {
            let i = rng.random_range(0..bad.len());
            bad[i] ^= 0xff;
        }
        let ro = rng.random_bool(0.5);
        if let Ok(img) = open(bad, ro) {
            let mut b = vec![0u8; 70000];
            let _ = img.read_at(&mut b, rng.random_range(0..(1 << 20) - 70000));
            if !ro {
                let _ = img.write_at(&b[..5000], rng.random_range(0..(1 << 20) - 5000));
                let _ = img.discard(0, 65536);
                let _ = img.flush();
            }
        }
    }
}

#[test]
fn corrupt_subcluster_bitmaps_mark_the_image_corrupt_and_never_panic() {
    let cs = 65536u64;
    let build = || {
        let host = Arc::new(MemHost::default());
        create_on(
            &*host,
            &CreateOptions {
                size: 4 << 20,
                cluster_size: cs,
                extended_l2: true,
                ..CreateOptions::default()
            },
        )
        .unwrap();
        let img = QcowImage::open_with(Box::new(host.clone()), false, None).unwrap();
        img.write_at(&[7; 4096], 0).unwrap();
        img.close().unwrap();
        drop(img);
        host.contents()
    };
    let clean = build();
    let h = Header::parse(&clean).unwrap();
    let l2 = format::table_entry(&clean[h.l1_table_offset as usize..], 0) & format::L1E_OFFSET_MASK;
    // (entry index, bitmap): allocated and zero at once; allocated subclusters in an
    // unallocated cluster.
    for (i, bitmap) in [(0u64, 0x3 | (1u64 << 33)), (5, 0x10)] {
        let mut bytes = clean.clone();
        let at = (l2 + 16 * i + 8) as usize;
        bytes[at..at + 8].copy_from_slice(&bitmap.to_be_bytes());
        let img = QcowImage::open_with(Box::new(MemHost::new(bytes)), false, None).unwrap();
        let mut b = vec![0u8; cs as usize];
        let e = img.read_at(&mut b, i * cs).unwrap_err();
        assert!(matches!(e, BlockError::Corrupt(_)), "{e}");
        assert!(img.is_corrupt());
        assert!(img.write_at(&[1; 512], i * cs).is_err());
    }
}
