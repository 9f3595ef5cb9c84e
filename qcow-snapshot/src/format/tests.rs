//! Unit tests of the wire format.
use super::*;

fn sample_v3() -> Header {
    let mut h = Header::new_v3(1 << 30, 16, 4);
    h.l1_size = 2;
    h.l1_table_offset = 3 << 16;
    h.refcount_table_offset = 1 << 16;
    h.refcount_table_clusters = 1;
    h
}

#[test]
fn v3_header_round_trips_through_bytes() {
    let mut h = sample_v3();
    h.incompatible_features = incompat::DIRTY;
    h.compatible_features = compat::LAZY_REFCOUNTS;
    h.autoclear_features = autoclear::BITMAPS;
    h.compression_type = 1;
    h.incompatible_features |= incompat::COMPRESSION_TYPE;
    let b = h.serialize();
    assert_eq!(b.len(), 112);
    assert_eq!(&b[..4], b"QFI\xfb");
    assert_eq!(b[COMPRESSION_TYPE_OFFSET], 1);
    let p = Header::parse(&b).unwrap();
    assert_eq!(p, h);
    assert_eq!(p.compression().unwrap(), CompressionType::Zstd);
    p.validate(4 << 16).unwrap();
}

#[test]
fn v2_header_round_trips_and_assumes_refcount_order_4() {
    let mut h = sample_v3();
    h.version = 2;
    h.header_length = 72;
    h.unknown_fields.clear();
    let b = h.serialize();
    assert_eq!(b.len(), 72);
    let p = Header::parse(&b).unwrap();
    assert_eq!(p.refcount_order, 4);
    assert_eq!(p.header_length, 72);
    assert_eq!(p.version, 2);
    p.validate(4 << 16).unwrap();
}

#[test]
fn unknown_header_fields_are_preserved() {
    let mut h = sample_v3();
    h.header_length = 128;
    h.unknown_fields = (0..23).collect();
    let p = Header::parse(&h.serialize()).unwrap();
    assert_eq!(p.unknown_fields, h.unknown_fields);
}

#[test]
fn header_parse_rejects_bad_magic_version_and_truncation() {
    let b = sample_v3().serialize();
    let mut bad = b.clone();
    bad[0] = 0;
    assert!(matches!(Header::parse(&bad), Err(DecodeError::BadMagic(_))));
    let mut bad = b.clone();
    bad[7] = 4;
    assert!(matches!(
        Header::parse(&bad),
        Err(DecodeError::UnsupportedVersion(4))
    ));
    assert!(matches!(
        Header::parse(&b[..50]),
        Err(DecodeError::Truncated { .. })
    ));
    assert!(matches!(
        Header::parse(&b[..100]),
        Err(DecodeError::Truncated { .. })
    ));
    let mut bad = b;
    put32(&mut bad, 100, 106);
    assert!(matches!(
        Header::parse(&bad),
        Err(DecodeError::HeaderLength(106))
    ));
}

#[test]
fn validate_rejects_hostile_fields() {
    let ok = sample_v3();
    let file = 4u64 << 16;
    ok.validate(file).unwrap();
    let mut h = ok.clone();
    h.cluster_bits = 8;
    assert!(matches!(h.validate(file), Err(DecodeError::ClusterBits(8))));
    h.cluster_bits = 22;
    assert!(matches!(
        h.validate(file),
        Err(DecodeError::ClusterBits(22))
    ));
    let mut h = ok.clone();
    h.refcount_order = 7;
    assert!(matches!(
        h.validate(file),
        Err(DecodeError::RefcountOrder(7))
    ));
    let mut h = ok.clone();
    h.l1_table_offset += 512;
    assert!(matches!(
        h.validate(file),
        Err(DecodeError::Misaligned { .. })
    ));
    let mut h = ok.clone();
    h.l1_table_offset = 0;
    assert!(matches!(
        h.validate(file),
        Err(DecodeError::OutOfFile { .. })
    ));
    let mut h = ok.clone();
    h.l1_table_offset = !0xffff;
    assert!(matches!(
        h.validate(file),
        Err(DecodeError::Overflow(_)) | Err(DecodeError::OutOfFile { .. })
    ));
    let mut h = ok.clone();
    h.size = u64::MAX;
    assert!(h.validate(file).is_err());
    let mut h = ok.clone();
    h.size = 1 << 40;
    assert!(matches!(
        h.validate(file),
        Err(DecodeError::L1TooSmall { .. })
    ));
    let mut h = ok.clone();
    h.l1_size = u32::MAX;
    assert!(matches!(
        h.validate(file),
        Err(DecodeError::TooLarge { .. })
    ));
    let mut h = ok.clone();
    h.refcount_table_clusters = u32::MAX;
    assert!(matches!(
        h.validate(file),
        Err(DecodeError::TooLarge { .. })
    ));
    let mut h = ok.clone();
    h.refcount_table_clusters = 0;
    assert!(h.validate(file).is_err());
    let mut h = ok.clone();
    h.backing_file_offset = 200;
    h.backing_file_size = 2000;
    assert!(matches!(h.validate(file), Err(DecodeError::BackingName(_))));
    let mut h = ok.clone();
    h.crypt_method = 2;
    assert!(matches!(h.validate(file), Err(DecodeError::Encrypted(2))));
    let mut h = ok.clone();
    h.compression_type = 1;
    assert!(matches!(
        h.validate(file),
        Err(DecodeError::CompressionType(1))
    ));
    let mut h = ok;
    h.header_length = 1 << 17;
    assert!(h.validate(file).is_err());
}

#[test]
fn geometry_math_matches_spec_examples() {
    let g = Geometry::standard(16, 4);
    assert_eq!(g.cluster_size(), 65536);
    assert_eq!(g.l2_entries(), 8192);
    assert_eq!(g.l2_coverage(), 512 << 20);
    assert_eq!(g.l1_index(512 << 20), 1);
    assert_eq!(g.l2_index((512 << 20) + 3 * 65536 + 7), 3);
    assert_eq!(g.l1_entries_for(1 << 30), Some(2));
    assert_eq!(g.l1_entries_for(0), Some(0));
    assert_eq!(g.l1_entries_for(u64::MAX), None);
    assert_eq!(g.refcount_block_entries(), 32768);
    assert_eq!(g.refcount_table_index(32768 << 16), 1);
    assert_eq!(g.refcount_block_index((32769 << 16) + 5), 1);
    assert_eq!(g.align_up(1), Some(65536));
    assert_eq!(g.align_up(u64::MAX), None);
    let small = Geometry::standard(9, 6);
    assert_eq!(small.l2_entries(), 64);
    assert_eq!(small.refcount_block_entries(), 64);
    assert_eq!(small.refcount_max(), u64::MAX);
    assert_eq!(Geometry::standard(9, 0).refcount_max(), 1);
}

#[test]
fn extended_l2_geometry_halves_the_entries_and_splits_clusters_in_32() {
    let g = Geometry {
        extended_l2: true,
        ..Geometry::standard(16, 4)
    };
    assert_eq!(g.l2_entry_words(), 2);
    assert_eq!(g.l2_entries(), 4096);
    assert_eq!(g.l2_coverage(), 256 << 20);
    assert_eq!(g.l1_index(256 << 20), 1);
    assert_eq!(g.l2_index((256 << 20) + 5 * 65536), 5);
    assert_eq!(g.subcluster_size(), 2048);
    assert_eq!(g.subcluster_index(65536 + 4095), 1);
    assert_eq!(subcluster_mask(0, 31), L2_BITMAP_ALL_ALLOC);
    assert_eq!(subcluster_mask(3, 4), 0b11000);
    assert_eq!(subcluster_state(0b10 | (1 << 35), 1), Subcluster::Data);
    assert_eq!(subcluster_state(0b10 | (1 << 35), 3), Subcluster::Zero);
    assert_eq!(subcluster_state(0b10, 2), Subcluster::Unallocated);
    // Bit 0 is reserved with extended L2 entries: never a zero cluster.
    assert_eq!(
        L2Entry::decode(OFLAG_COPIED | 0x30000 | 1, &g).unwrap(),
        L2Entry::Normal {
            host: 0x30000,
            copied: true
        }
    );
    let normal = L2Entry::Normal {
        host: 0x30000,
        copied: true,
    };
    assert!(check_l2_bitmap(&normal, 0x3 | (0x4 << 32)).is_ok());
    assert!(check_l2_bitmap(&normal, 0x3 | (0x2 << 32)).is_err());
    assert!(check_l2_bitmap(&L2Entry::Unallocated, L2_BITMAP_ALL_ZERO).is_ok());
    assert!(check_l2_bitmap(&L2Entry::Unallocated, 1).is_err());
    let d = CompressedDescriptor {
        host_offset: 0x30000,
        sectors: 1,
    };
    assert!(check_l2_bitmap(&L2Entry::Compressed(d), 1 << 40).is_err());
    // QEMU's limit: subclusters of at least 512 bytes.
    let mut h = Header::new_v3(1 << 20, 13, 4);
    h.incompatible_features |= incompat::EXTENDED_L2;
    h.l1_size = 1;
    h.l1_table_offset = 1 << 13;
    h.refcount_table_offset = 2 << 13;
    h.refcount_table_clusters = 1;
    assert!(matches!(
        h.validate(4 << 13),
        Err(DecodeError::SubclusterSize(13))
    ));
    h.cluster_bits = 14;
    h.l1_table_offset = 1 << 14;
    h.refcount_table_offset = 2 << 14;
    h.validate(4 << 14).unwrap();
}

#[test]
fn compressed_descriptor_split_depends_on_cluster_bits() {
    for bits in MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS {
        let g = Geometry::standard(bits, 4);
        let off = (5u64 << bits) + 1234;
        let len = (g.cluster_size() / 2).max(600);
        let raw = CompressedDescriptor::encode(off, len, &g).unwrap();
        assert!(raw & OFLAG_COMPRESSED != 0);
        let d = CompressedDescriptor::decode(raw, &g);
        assert_eq!(d.host_offset, off);
        assert!(d.byte_len() >= len && d.byte_len() < len + 512);
        assert_eq!(L2Entry::decode(raw, &g).unwrap(), L2Entry::Compressed(d));
        assert_eq!(L2Entry::Compressed(d).encode(&g), raw);
    }
    // 64 KiB clusters: the offset field is 54 bits wide.
    let g = Geometry::standard(16, 4);
    assert_eq!(g.compressed_sector_shift(), 54);
    let raw = OFLAG_COMPRESSED | (3u64 << 54) | 0x1_0200;
    let d = CompressedDescriptor::decode(raw, &g);
    assert_eq!(
        d,
        CompressedDescriptor {
            host_offset: 0x1_0200,
            sectors: 4
        }
    );
    assert_eq!(d.byte_len(), 2048);
    assert!(CompressedDescriptor::encode(1 << 60, 10, &g).is_none());
}

#[test]
fn l2_entry_decodes_every_cluster_kind() {
    let g = Geometry::standard(16, 4);
    assert_eq!(L2Entry::decode(0, &g).unwrap(), L2Entry::Unallocated);
    assert_eq!(
        L2Entry::decode(1, &g).unwrap(),
        L2Entry::Zero { host: None }
    );
    assert_eq!(
        L2Entry::decode(OFLAG_COPIED | 0x30000 | 1, &g).unwrap(),
        L2Entry::Zero {
            host: Some(0x30000)
        }
    );
    assert_eq!(
        L2Entry::decode(OFLAG_COPIED | 0x30000, &g).unwrap(),
        L2Entry::Normal {
            host: 0x30000,
            copied: true
        }
    );
    assert_eq!(
        L2Entry::decode(0x30000, &g).unwrap(),
        L2Entry::Normal {
            host: 0x30000,
            copied: false
        }
    );
    assert!(L2Entry::decode(0x30200, &g).is_err());
    for e in [
        L2Entry::Unallocated,
        L2Entry::Zero { host: None },
        L2Entry::Normal {
            host: 0x50000,
            copied: true,
        },
    ] {
        assert_eq!(L2Entry::decode(e.encode(&g), &g).unwrap(), e);
    }
}

#[test]
fn refcounts_of_every_order_round_trip_without_touching_neighbours() {
    for order in 0..=MAX_REFCOUNT_ORDER {
        let mut block = vec![0u8; 512];
        let g = Geometry::standard(9, order);
        let n = g.refcount_block_entries();
        let max = g.refcount_max();
        for i in 0..n {
            let v = if i % 3 == 0 { max } else { (i * 7) & max };
            refcount_set(&mut block, order, i, v).unwrap();
        }
        for i in 0..n {
            let v = if i % 3 == 0 { max } else { (i * 7) & max };
            assert_eq!(
                refcount_get(&block, order, i),
                Some(v),
                "order {order} index {i}"
            );
        }
        assert_eq!(refcount_get(&block, order, n), None);
        assert!(refcount_set(&mut block, order, n, 1).is_err());
        if order < 6 {
            assert!(refcount_set(&mut block, order, 0, max + 1).is_err());
        }
    }
    // Sub-byte widths: bit 0 is the least significant bit.
    let mut b = [0u8; 1];
    refcount_set(&mut b, 0, 0, 1).unwrap();
    assert_eq!(b[0], 1);
    refcount_set(&mut b, 2, 1, 0xf).unwrap();
    assert_eq!(b[0], 0xf1);
    // 16-bit refcounts are big endian.
    let mut b = [0u8; 4];
    refcount_set(&mut b, 4, 1, 0x0102).unwrap();
    assert_eq!(b, [0, 0, 1, 2]);
}

#[test]
fn extensions_round_trip_and_unknown_ones_are_preserved() {
    let exts = vec![
        HeaderExtension::BackingFormat("raw".into()),
        HeaderExtension::FeatureNames(default_feature_names()),
        HeaderExtension::Unknown {
            kind: 0x1234_5678,
            data: vec![1, 2, 3],
        },
    ];
    let b = serialize_extensions(&exts);
    assert_eq!(b.len() % 8, 0);
    assert_eq!(parse_extensions(&b).unwrap(), exts);
    let mut padded = b.clone();
    padded.resize(4096, 0);
    assert_eq!(parse_extensions(&padded).unwrap(), exts);
}

#[test]
fn malformed_extensions_are_rejected() {
    let mut b = serialize_extensions(&[HeaderExtension::BackingFormat("qcow2".into())]);
    put32(&mut b, 4, 1000);
    assert!(parse_extensions(&b).is_err());
    let twice = serialize_extensions(&[
        HeaderExtension::BackingFormat("raw".into()),
        HeaderExtension::BackingFormat("raw".into()),
    ]);
    assert!(parse_extensions(&twice).is_err());
    assert!(parse_extensions(&[1, 2, 3]).is_err());
    assert_eq!(parse_extensions(&[]).unwrap(), vec![]);
}

#[test]
fn table_entries_are_big_endian_and_bounds_checked() {
    let t = [OFLAG_COPIED | 0x10000, 0];
    let b = table_to_bytes(&t);
    assert_eq!(b[0], 0x80);
    assert_eq!(table_from_bytes(&b), t);
    assert_eq!(table_entry(&b, 0), t[0]);
    assert_eq!(table_entry(&b, 9), 0);
    let mut b2 = b.clone();
    set_table_entry(&mut b2, 1, 5);
    set_table_entry(&mut b2, 100, 5);
    assert_eq!(table_entry(&b2, 1), 5);
    assert_eq!(l1_entry_offset(OFLAG_COPIED | 0x10000), 0x10000);
    assert_eq!(reftable_entry_offset(0x20000 | 0x1ff), 0x20000);
}
