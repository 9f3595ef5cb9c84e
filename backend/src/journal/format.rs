//! The crash journal's file format (see the parent module for what the journal does).
//!
//! The file: a header of [`FILE_HEADER`] bytes (magic, version, a random id, the boot id of
//! the host that wrote it, the image's device, inode and canonical path, a checksum), then two
//! segments of equal length. A segment: a header of [`SEG_HEADER`] bytes (magic, generation,
//! checksum), then records one after the other. A record: a header of [`REC_HEADER`] bytes
//! (magic, [`Kind`], sequence number, the segment's generation, offset, length, the record's
//! checksum of the first 40 header bytes and the data, and, from version 2 on, the header's
//! own checksum of its first 40 bytes), then the data of a write (no data for the other
//! kinds). All integers little-endian.
//!
//! Version 2 (written now): a record's room is reserved and its header written, with a valid
//! header checksum, while the journal's state lock is held; its data and record checksum follow
//! outside the lock, so records after it may be whole first. A record whose header is whole
//! but whose record checksum fails is one whose data was still being written when the daemon
//! died (never acknowledged): the scan skips it and goes on. A header that is not whole, of
//! another generation or fails its own checksum ends the segment. Version 1 (written by earlier
//! daemons, still read): records were written whole under the lock, and the first one that is
//! not whole or fails its checksum ends the segment ([`scan`]).
//!
//! No locking here: these are pure encoders and decoders, and reads of a file nothing else
//! writes while they run (the journal reads it back only at open, before it serves).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use super::Identity;

/// File header magic and the segment/record magics.
pub(super) const FILE_MAGIC: &[u8; 8] = b"SNBLKJNL";
pub(super) const SEG_MAGIC: u64 = u64::from_le_bytes(*b"SNBLKSEG");
pub(super) const REC_MAGIC: u32 = u32::from_le_bytes(*b"SJRC");
pub(super) const VERSION: u32 = 2;
/// The version written by earlier daemons (no header checksum; still replayed).
pub(super) const VERSION_WHOLE_RECORDS: u32 = 1;
/// Bytes of the file header (the segments follow it).
pub(super) const FILE_HEADER: u64 = 4096;
/// Bytes of a segment header.
pub(super) const SEG_HEADER: u64 = 64;
/// Bytes of a record header.
pub(super) const REC_HEADER: usize = 48;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Kind {
    Write = 1,
    Discard = 2,
    Zeroes = 3,
    ZeroesUnmap = 4,
    /// A marker: the range was written in place below, where a restarted daemon reads it
    /// ([`BlockDev::write_in_place_persisted`]); no data. Replay applies nothing of it and
    /// nothing of older records over its range.
    Persisted = 5,
}

impl Kind {
    fn from_u32(v: u32) -> Option<Self> {
        Some(match v {
            1 => Kind::Write,
            2 => Kind::Discard,
            3 => Kind::Zeroes,
            4 => Kind::ZeroesUnmap,
            5 => Kind::Persisted,
            _ => return None,
        })
    }
}

pub(super) fn boot_id() -> [u8; 16] {
    let mut out = [0u8; 16];
    if let Ok(s) = std::fs::read_to_string("/proc/sys/kernel/random/boot_id") {
        let hex: Vec<u8> = s.bytes().filter(u8::is_ascii_hexdigit).collect();
        for (i, pair) in hex.chunks(2).take(16).enumerate() {
            let v = std::str::from_utf8(pair)
                .ok()
                .and_then(|p| u8::from_str_radix(p, 16).ok());
            out[i] = v.unwrap_or(0);
        }
    }
    out
}

pub(super) fn random_uuid() -> [u8; 16] {
    let mut out = [0u8; 16];
    // SAFETY: writes at most 16 bytes into `out`.
    let n = unsafe { libc::getrandom(out.as_mut_ptr().cast(), out.len(), 0) };
    if n != 16 {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        out = (t ^ u128::from(std::process::id())).to_le_bytes();
    }
    out
}

pub(super) fn crc(parts: &[&[u8]]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    for p in parts {
        h.update(p);
    }
    h.finalize()
}

/// A segment's header: its generation, which every record in it repeats.
pub(super) fn segment_header(gen: u64) -> [u8; SEG_HEADER as usize] {
    let mut h = [0u8; SEG_HEADER as usize];
    h[0..8].copy_from_slice(&SEG_MAGIC.to_le_bytes());
    h[8..16].copy_from_slice(&gen.to_le_bytes());
    let c = crc(&[&h[..16]]);
    h[16..20].copy_from_slice(&c.to_le_bytes());
    h
}

/// Parsed file header.
pub(super) struct Header {
    pub(super) boot: [u8; 16],
    pub(super) identity: Identity,
}

pub(super) fn encode_header(identity: &Identity, uuid: [u8; 16]) -> Vec<u8> {
    let mut h = Vec::with_capacity(FILE_HEADER as usize);
    h.extend_from_slice(FILE_MAGIC);
    h.extend_from_slice(&VERSION.to_le_bytes());
    h.extend_from_slice(&uuid);
    h.extend_from_slice(&boot_id());
    h.extend_from_slice(&identity.dev.to_le_bytes());
    h.extend_from_slice(&identity.ino.to_le_bytes());
    let path = identity.path.as_bytes();
    let plen = path.len().min(3900);
    h.extend_from_slice(&(plen as u32).to_le_bytes());
    h.extend_from_slice(&path[..plen]);
    let c = crc(&[&h]);
    h.extend_from_slice(&c.to_le_bytes());
    h.resize(FILE_HEADER as usize, 0);
    h
}

pub(super) fn decode_header(b: &[u8]) -> std::result::Result<Header, String> {
    if b.len() < 64 || &b[..8] != FILE_MAGIC {
        return Err("not a snapblk crash journal (bad magic)".into());
    }
    let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap_or([0; 4]));
    let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap_or([0; 8]));
    let version = u32_at(8);
    if version != VERSION && version != VERSION_WHOLE_RECORDS {
        return Err(format!("unknown journal version {version}"));
    }
    let mut boot = [0u8; 16];
    boot.copy_from_slice(&b[28..44]);
    let dev = u64_at(44);
    let ino = u64_at(52);
    let plen = u32_at(60) as usize;
    if 64 + plen + 4 > b.len() {
        return Err("torn header (path length)".into());
    }
    let want = u32_at(64 + plen);
    if crc(&[&b[..64 + plen]]) != want {
        return Err("torn header (checksum)".into());
    }
    Ok(Header {
        boot,
        identity: Identity {
            path: String::from_utf8_lossy(&b[64..64 + plen]).into_owned(),
            dev,
            ino,
        },
    })
}

/// One valid record found by a scan.
#[derive(Debug)]
pub(super) struct Record {
    pub(super) seq: u64,
    pub(super) kind: Kind,
    pub(super) offset: u64,
    pub(super) len: u64,
    pub(super) data: Vec<u8>,
}

/// A record's opening header, written under the state lock when its room is reserved: every
/// field and the header's own checksum (bytes 44..48, of the first 40), but a record checksum
/// that fails until [`record_header`] replaces it: the one of empty data, inverted (what the
/// room holds meanwhile matches it only by a 1 in 2^32 chance).
pub(super) fn record_opening(
    kind: Kind,
    seq: u64,
    gen: u64,
    offset: u64,
    len: u64,
) -> [u8; REC_HEADER] {
    let mut h = record_header(kind, seq, gen, offset, len, &crc32fast::Hasher::new());
    break_record_checksum(&mut h);
    h
}

/// A record's header; its record checksum covers the first 40 header bytes and the data,
/// whose CRC state `data_crc` the caller computed (outside the state lock).
pub(super) fn record_header(
    kind: Kind,
    seq: u64,
    gen: u64,
    offset: u64,
    len: u64,
    data_crc: &crc32fast::Hasher,
) -> [u8; REC_HEADER] {
    let mut h = [0u8; REC_HEADER];
    h[0..4].copy_from_slice(&REC_MAGIC.to_le_bytes());
    h[4..8].copy_from_slice(&(kind as u32).to_le_bytes());
    h[8..16].copy_from_slice(&seq.to_le_bytes());
    h[16..24].copy_from_slice(&gen.to_le_bytes());
    h[24..32].copy_from_slice(&offset.to_le_bytes());
    h[32..40].copy_from_slice(&len.to_le_bytes());
    let head = crc(&[&h[..40]]);
    let mut c = crc32fast::Hasher::new();
    c.update(&h[..40]);
    c.combine(data_crc);
    h[40..44].copy_from_slice(&c.finalize().to_le_bytes());
    h[44..48].copy_from_slice(&head.to_le_bytes());
    h
}

/// Makes the record checksum of `h` fail for the data it was computed over (a record whose
/// data never became whole: skipped by a replay).
pub(super) fn break_record_checksum(h: &mut [u8; REC_HEADER]) {
    for b in &mut h[40..44] {
        *b = !*b;
    }
}

/// [`record_header`] for `data`.
#[cfg(test)]
pub(super) fn encode_record_header(
    kind: Kind,
    seq: u64,
    gen: u64,
    offset: u64,
    len: u64,
    data: &[u8],
) -> [u8; REC_HEADER] {
    let mut d = crc32fast::Hasher::new();
    d.update(data);
    record_header(kind, seq, gen, offset, len, &d)
}

/// Writes `a` then `b` at `off` with as few `pwritev` calls as it takes.
pub(super) fn pwritev_all(file: &File, a: &[u8], b: &[u8], off: u64) -> io::Result<()> {
    let total = a.len() + b.len();
    let mut done = 0usize;
    while done < total {
        let (first, second) = if done < a.len() {
            (&a[done..], b)
        } else {
            (&b[done - a.len()..], &b[..0])
        };
        let iov = [
            libc::iovec {
                iov_base: first.as_ptr() as *mut libc::c_void,
                iov_len: first.len(),
            },
            libc::iovec {
                iov_base: second.as_ptr() as *mut libc::c_void,
                iov_len: second.len(),
            },
        ];
        let at = libc::off_t::try_from(off + done as u64).map_err(io::Error::other)?;
        // SAFETY: both iovecs describe live, readable slices; the descriptor is ours.
        let n = unsafe { libc::pwritev(file.as_raw_fd(), iov.as_ptr(), 2, at) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        done += n as usize;
    }
    Ok(())
}

/// Reads up to `buf.len()` bytes at `off` (short at end of file).
pub(super) fn read_upto(file: &File, buf: &mut [u8], off: u64) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read_at(&mut buf[n..], off + n as u64)? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Every valid record of both segments, in sequence order, read as the file header's version
/// says (see the module documentation): a segment is read up to its first record header that
/// is not whole, not of the segment's generation or fails its checksum (the end of what was
/// appended); in version 2 a record whose header is whole but whose data fails the record
/// checksum is skipped (its data was being written when the daemon died: never acknowledged),
/// in version 1 it ends the segment too.
pub(super) fn scan(file: &File, seg_len: u64) -> io::Result<Vec<Record>> {
    let mut v = [0u8; 4];
    read_upto(file, &mut v, 8)?;
    let headed = u32::from_le_bytes(v) != VERSION_WHOLE_RECORDS;
    let mut out = Vec::new();
    for seg in 0..2u64 {
        let base = FILE_HEADER + seg * seg_len;
        let mut h = [0u8; SEG_HEADER as usize];
        if read_upto(file, &mut h, base)? < h.len() {
            continue;
        }
        let magic = u64::from_le_bytes(h[0..8].try_into().unwrap_or([0; 8]));
        let gen = u64::from_le_bytes(h[8..16].try_into().unwrap_or([0; 8]));
        let c = u32::from_le_bytes(h[16..20].try_into().unwrap_or([0; 4]));
        if magic != SEG_MAGIC || crc(&[&h[..16]]) != c {
            continue;
        }
        let mut pos = SEG_HEADER;
        loop {
            let mut rh = [0u8; REC_HEADER];
            if pos + REC_HEADER as u64 > seg_len
                || read_upto(file, &mut rh, base + pos)? < REC_HEADER
            {
                break;
            }
            let u32_at = |o: usize| u32::from_le_bytes(rh[o..o + 4].try_into().unwrap_or([0; 4]));
            let u64_at = |o: usize| u64::from_le_bytes(rh[o..o + 8].try_into().unwrap_or([0; 8]));
            let Some(kind) = Kind::from_u32(u32_at(4)) else {
                break;
            };
            if u32_at(0) != REC_MAGIC || u64_at(16) != gen {
                break;
            }
            if headed && crc(&[&rh[..40]]) != u32_at(44) {
                break;
            }
            let len = u64_at(32);
            let data_len = if kind == Kind::Write { len } else { 0 };
            if pos + REC_HEADER as u64 + data_len > seg_len {
                break;
            }
            let mut data = vec![0u8; usize::try_from(data_len).unwrap_or(0)];
            if read_upto(file, &mut data, base + pos + REC_HEADER as u64)? < data.len() {
                break;
            }
            if crc(&[&rh[..40], &data]) != u32_at(40) {
                if !headed {
                    break;
                }
                pos += REC_HEADER as u64 + data_len;
                continue;
            }
            out.push(Record {
                seq: u64_at(8),
                kind,
                offset: u64_at(24),
                len,
                data,
            });
            pos += REC_HEADER as u64 + data_len;
        }
    }
    out.sort_by_key(|r| r.seq);
    Ok(out)
}
