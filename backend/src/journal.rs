//! The crash journal: acknowledged writes survive a daemon crash (SIGKILL, abort, OOM kill).
//!
//! In write-back mode an acknowledged write may live only in the folio cache and in qcow2
//! metadata held in memory until the next flush; a dead process loses both. [`Journal`] is the
//! layer just below the top of the stack (below the probed-raw guard, above the cache): before a
//! write, discard or write-zeroes goes down, its record (kind, offset, length, data, sequence
//! number, CRC) is written to the journal file with `pwrite`. The file's pages are in the host
//! page cache as soon as `pwrite` returns, and the page cache outlives the process, so the
//! request completes to the guest only when its record would survive a SIGKILL. A daemon started
//! later on the same image replays the records into the image (through the whole stack, so the
//! qcow2 engine allocates and publishes what the dead one had only in memory), flushes, and only
//! then serves ([`Journal::open`]).
//!
//! The journal is trimmed by flushes: the file has two segments; new records go to the active
//! one. A flush ([`BlockDev::flush`]) switches the active segment, waits until every request
//! that wrote a record into the old one has finished its lower operation, flushes the stack
//! below (data, qcow2 metadata, fdatasync) and then empties the old segment (its generation
//! number is bumped, so its records no longer count). The request whose record fills the
//! active segment past its half runs such a flush itself once it is complete (so the other
//! segment is empty before writers need it), and a writer that finds the active segment full
//! runs one before appending.
//!
//! What it does not cover, by design: a host crash. The page cache is gone then, and so is the
//! journal's meaning: the file header records the boot id, and a journal written during another
//! boot is discarded (the host-crash contract, FLUSH = durable, is kept by the flush path
//! below). The journal is never fsynced.
//!
//! Recovery refuses rather than guesses: a journal whose header is unreadable or torn, or that
//! holds records for another image (path, device and inode), makes the layer refuse every
//! write, discard, write-zeroes and flush with EIO, and the reason is logged at start and on
//! the first refused request. Reads are served. Moving the journal aside (accepting the loss)
//! and restarting serves writes again.
//!
//! Ordering: records are replayed in sequence order, so for every sector the last record
//! replayed must be the last write that reached the layer below. Two writes whose ranges
//! overlap are therefore serialized across "append record + lower operation" by striped range
//! locks (64 KiB chunks hashed onto [`STRIPES`] mutexes, taken in index order); writes to
//! different chunks run in parallel.
//!
//! Locking model: a request takes its stripe locks (ascending index), then the state mutex only
//! while its record is appended (appends are one at a time, so no hole ever precedes an
//! acknowledged record) and again to count its lower operation done. `flush_lock` serializes
//! journal flushes; a flush takes no stripe lock and holds the state mutex only to switch
//! segments, wait for the old one's requests and empty it (never across the lower flush). A
//! writer that finds the segment full flushes while holding its stripe locks, which cannot
//! deadlock since flushes take none.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use blockdev::{BlockDev, BlockError, Result};
use log::{error, info};

/// File header magic and the segment/record magics.
const FILE_MAGIC: &[u8; 8] = b"SNBLKJNL";
const SEG_MAGIC: u64 = u64::from_le_bytes(*b"SNBLKSEG");
const REC_MAGIC: u32 = u32::from_le_bytes(*b"SJRC");
const VERSION: u32 = 1;
/// Bytes of the file header (the segments follow it).
const FILE_HEADER: u64 = 4096;
/// Bytes of a segment header.
const SEG_HEADER: u64 = 64;
/// Bytes of a record header.
const REC_HEADER: usize = 48;
/// Default bytes of one segment.
pub const DEFAULT_SEGMENT: u64 = 64 << 20;
/// Number of range locks.
pub const STRIPES: usize = 256;
/// Range-lock granularity (bytes, power of two).
const STRIPE_CHUNK_SHIFT: u32 = 16;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Write = 1,
    Discard = 2,
    Zeroes = 3,
    ZeroesUnmap = 4,
}

impl Kind {
    fn from_u32(v: u32) -> Option<Self> {
        Some(match v {
            1 => Kind::Write,
            2 => Kind::Discard,
            3 => Kind::Zeroes,
            4 => Kind::ZeroesUnmap,
            _ => return None,
        })
    }
}

/// Which image a journal belongs to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// Canonical path of the image.
    pub path: String,
    /// Its device and inode.
    pub dev: u64,
    /// Inode number.
    pub ino: u64,
}

impl Identity {
    /// The identity of the image file at `path`.
    pub fn of(path: &Path) -> io::Result<Self> {
        let canon = std::fs::canonicalize(path)?;
        let meta = std::fs::metadata(&canon)?;
        Ok(Identity {
            path: canon.to_string_lossy().into_owned(),
            dev: meta.dev(),
            ino: meta.ino(),
        })
    }
}

/// What [`Journal::open`] found and did.
#[derive(Debug, Default, Clone)]
pub struct Recovery {
    /// Records replayed into the image.
    pub replayed: usize,
    /// Bytes of write data replayed.
    pub bytes: u64,
    /// Why writes are refused, if they are.
    pub refused: Option<String>,
}

struct State {
    active: usize,
    /// Bytes used in each segment (after its header).
    tail: [u64; 2],
    /// Requests that appended a record to the segment and have not finished their lower op.
    pending: [usize; 2],
    generation: [u64; 2],
    next_seq: u64,
    /// A lower flush failed: nothing can be trimmed any more.
    poisoned: bool,
}

/// The crash-journal layer (see the module documentation).
pub struct Journal {
    lower: Arc<dyn BlockDev>,
    file: File,
    path: PathBuf,
    seg_len: u64,
    state: Mutex<State>,
    drained: Condvar,
    flush_lock: Mutex<()>,
    stripes: Vec<Mutex<()>>,
    refused: Option<String>,
    refusal_logged: AtomicBool,
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Journal")
            .field("path", &self.path)
            .field("refused", &self.refused)
            .finish()
    }
}

fn boot_id() -> [u8; 16] {
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

fn random_uuid() -> [u8; 16] {
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

fn crc(parts: &[&[u8]]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    for p in parts {
        h.update(p);
    }
    h.finalize()
}

fn io_err(e: io::Error) -> BlockError {
    BlockError::Io(e)
}

/// Parsed file header.
struct Header {
    boot: [u8; 16],
    identity: Identity,
}

fn encode_header(identity: &Identity, uuid: [u8; 16]) -> Vec<u8> {
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

fn decode_header(b: &[u8]) -> std::result::Result<Header, String> {
    if b.len() < 64 || &b[..8] != FILE_MAGIC {
        return Err("not a snapblk crash journal (bad magic)".into());
    }
    let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap_or([0; 4]));
    let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap_or([0; 8]));
    if u32_at(8) != VERSION {
        return Err(format!("unknown journal version {}", u32_at(8)));
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
struct Record {
    seq: u64,
    kind: Kind,
    offset: u64,
    len: u64,
    data: Vec<u8>,
}

fn encode_record_header(
    kind: Kind,
    seq: u64,
    gen: u64,
    offset: u64,
    len: u64,
    data: &[u8],
) -> [u8; REC_HEADER] {
    let mut h = [0u8; REC_HEADER];
    h[0..4].copy_from_slice(&REC_MAGIC.to_le_bytes());
    h[4..8].copy_from_slice(&(kind as u32).to_le_bytes());
    h[8..16].copy_from_slice(&seq.to_le_bytes());
    h[16..24].copy_from_slice(&gen.to_le_bytes());
    h[24..32].copy_from_slice(&offset.to_le_bytes());
    h[32..40].copy_from_slice(&len.to_le_bytes());
    let c = crc(&[&h[..40], data]);
    h[40..44].copy_from_slice(&c.to_le_bytes());
    h
}

impl Journal {
    /// Opens (or creates) the journal at `path` for the image `identity` over `lower`, replays
    /// what a previous daemon left in it, flushes, and empties it. A journal that cannot be
    /// trusted makes the layer refuse writes (see the module documentation); only an I/O error
    /// on the journal file itself or on the replay is an error.
    pub fn open(
        lower: Arc<dyn BlockDev>,
        path: &Path,
        identity: &Identity,
        seg_len: u64,
    ) -> io::Result<(Self, Recovery)> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)?;
        let seg_len = seg_len.max(1 << 20);
        let mut recovery = Recovery::default();
        let len = file.metadata()?.len();
        let mut refused = None;
        if len > 0 {
            let mut hb = vec![0u8; FILE_HEADER as usize];
            let n = read_upto(&file, &mut hb, 0)?;
            match decode_header(&hb[..n]) {
                Err(why) => {
                    refused = Some(format!(
                        "crash journal {} is unreadable ({why}): acknowledged writes of a crashed daemon may be in it; move it aside to accept their loss",
                        path.display()
                    ));
                }
                Ok(h) if h.boot != boot_id() => {
                    info!(
                        "crash journal {} was written before the host rebooted: discarded (a host crash keeps only flushed writes)",
                        path.display()
                    );
                }
                Ok(h) => {
                    let records = scan(&file, seg_len)?;
                    if !records.is_empty() && h.identity != *identity {
                        refused = Some(format!(
                            "crash journal {} holds {} unflushed write(s) of image {} (dev {} inode {}), not of {} (dev {} inode {}); serve that image, or move the journal aside to accept their loss",
                            path.display(),
                            records.len(),
                            h.identity.path,
                            h.identity.dev,
                            h.identity.ino,
                            identity.path,
                            identity.dev,
                            identity.ino
                        ));
                    } else if !records.is_empty() {
                        for r in &records {
                            apply(&*lower, r).map_err(|e| {
                                io::Error::other(format!(
                                    "replaying crash journal {} (record {}): {e}",
                                    path.display(),
                                    r.seq
                                ))
                            })?;
                            recovery.replayed += 1;
                            recovery.bytes += r.data.len() as u64;
                        }
                        lower.flush().map_err(|e| {
                            io::Error::other(format!(
                                "flushing the replayed crash journal {}: {e}",
                                path.display()
                            ))
                        })?;
                        info!(
                            "crash journal {}: replayed {} record(s), {} bytes of acknowledged writes a crashed daemon had not flushed",
                            path.display(),
                            recovery.replayed,
                            recovery.bytes
                        );
                    }
                }
            }
        }
        if let Some(why) = &refused {
            error!("{why}; writes are refused");
            recovery.refused = Some(why.clone());
        } else {
            // A fresh journal: new header, both segments empty (generation 1 and 2 after any
            // earlier ones, so stale records never count).
            file.set_len(0)?;
            // Allocate the whole file now: appends then never extend it (no size update per
            // record) and never fail for lack of space. Where fallocate is not supported, a
            // sparse file of the same size.
            let total = FILE_HEADER + 2 * seg_len;
            let total_off = libc::off_t::try_from(total).map_err(io::Error::other)?;
            // SAFETY: fallocate on a descriptor we own, mode 0, a valid range.
            if unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, total_off) } != 0 {
                file.set_len(total)?;
            }
            file.write_all_at(&encode_header(identity, random_uuid()), 0)?;
        }
        let j = Journal {
            lower,
            file,
            path: path.to_path_buf(),
            seg_len,
            state: Mutex::new(State {
                active: 0,
                tail: [0; 2],
                pending: [0; 2],
                generation: [1, 1],
                next_seq: 1,
                poisoned: false,
            }),
            drained: Condvar::new(),
            flush_lock: Mutex::new(()),
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            refused,
            refusal_logged: AtomicBool::new(false),
        };
        if j.refused.is_none() {
            for seg in 0..2 {
                j.write_segment_header(seg, 1)?;
            }
        }
        Ok((j, recovery))
    }

    /// Records that the image is now `top` (a live snapshot switched the top; called while
    /// guest requests are paused). The records already in the journal were flushed into the
    /// frozen image, which the new top shows through, so replaying them into the new top
    /// changes nothing; later records belong to the new top. On failure writes are refused
    /// from then on (a journal naming the wrong image would be refused at restart anyway).
    pub fn rebind(&self, top: &Path) {
        if self.refused.is_some() {
            return;
        }
        let _one = self.flush_lock.lock().unwrap_or_else(|e| e.into_inner());
        let mut st = self.lock_state();
        let done = Identity::of(top).and_then(|id| {
            self.file
                .write_all_at(&encode_header(&id, random_uuid()), 0)
                .map(|()| id)
        });
        match done {
            Ok(id) => info!(
                "crash journal {} now records writes of {}",
                self.path.display(),
                id.path
            ),
            Err(e) => {
                error!(
                    "crash journal {}: cannot record the new top {}: {e}; writes are refused",
                    self.path.display(),
                    top.display()
                );
                st.poisoned = true;
            }
        }
    }

    /// The journal file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Why writes are refused, if they are.
    pub fn refused(&self) -> Option<&str> {
        self.refused.as_deref()
    }

    fn seg_base(&self, seg: usize) -> u64 {
        FILE_HEADER + seg as u64 * self.seg_len
    }

    fn write_segment_header(&self, seg: usize, gen: u64) -> io::Result<()> {
        let mut h = [0u8; SEG_HEADER as usize];
        h[0..8].copy_from_slice(&SEG_MAGIC.to_le_bytes());
        h[8..16].copy_from_slice(&gen.to_le_bytes());
        let c = crc(&[&h[..16]]);
        h[16..20].copy_from_slice(&c.to_le_bytes());
        self.file.write_all_at(&h, self.seg_base(seg))
    }

    fn lock_state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn check_refused(&self) -> Result<()> {
        match &self.refused {
            None => Ok(()),
            Some(why) => {
                if !self.refusal_logged.swap(true, Ordering::Relaxed) {
                    error!("refusing a write: {why}");
                }
                Err(BlockError::Io(io::Error::other(why.clone())))
            }
        }
    }

    /// Locks the stripes covering `[offset, offset + len)`, in ascending index order.
    fn lock_range(&self, offset: u64, len: u64) -> Vec<MutexGuard<'_, ()>> {
        let first = offset >> STRIPE_CHUNK_SHIFT;
        let last = offset.saturating_add(len.max(1) - 1) >> STRIPE_CHUNK_SHIFT;
        let mut idx: Vec<usize> = if last - first + 1 >= STRIPES as u64 {
            (0..STRIPES).collect()
        } else {
            (first..=last)
                .map(|c| (c % STRIPES as u64) as usize)
                .collect()
        };
        idx.sort_unstable();
        idx.dedup();
        idx.into_iter()
            .map(|i| self.stripes[i].lock().unwrap_or_else(|e| e.into_inner()))
            .collect()
    }

    /// Appends a record; returns the segment it went to (whose `pending` count it holds).
    /// Also returns whether this record filled the segment past its half (time to trim).
    fn append(&self, kind: Kind, offset: u64, len: u64, data: &[u8]) -> Result<(usize, bool)> {
        let rec_len = (REC_HEADER + data.len()) as u64;
        if rec_len > self.seg_len - SEG_HEADER {
            return Err(BlockError::Io(io::Error::other(format!(
                "request of {} bytes does not fit the crash journal's {}-byte segment",
                data.len(),
                self.seg_len
            ))));
        }
        loop {
            let mut st = self.lock_state();
            if st.poisoned {
                return Err(BlockError::Io(io::Error::other(
                    "a flush failed earlier: the crash journal cannot be trimmed",
                )));
            }
            let seg = st.active;
            if SEG_HEADER + st.tail[seg] + rec_len <= self.seg_len {
                let seq = st.next_seq;
                let gen = st.generation[seg];
                let at = self.seg_base(seg) + SEG_HEADER + st.tail[seg];
                let header = encode_record_header(kind, seq, gen, offset, len, data);
                // One record at a time (state lock held): no hole can precede an acknowledged
                // record.
                pwritev_all(&self.file, &header, data, at).map_err(io_err)?;
                st.next_seq += 1;
                let half = (self.seg_len - SEG_HEADER) / 2;
                let crossed = st.tail[seg] < half && st.tail[seg] + rec_len >= half;
                st.tail[seg] += rec_len;
                st.pending[seg] += 1;
                return Ok((seg, crossed));
            }
            drop(st);
            // The active segment is full: flush, which empties it for later.
            self.flush_and_trim()?;
        }
    }

    /// Trims now, from the request that filled the active segment past its half, so the
    /// segment is empty again before writers fill the other one (otherwise every writer would
    /// wait for the flush when both are full). Skipped if a flush is running anyway. The
    /// request itself is complete; a failure here is the flush's (sticky, reported by the
    /// guest's next FLUSH).
    fn early_trim(&self) {
        let running = match self.flush_lock.try_lock() {
            Ok(g) => {
                drop(g);
                false
            }
            Err(_) => true,
        };
        if !running {
            if let Err(e) = self.flush_and_trim() {
                log::warn!(
                    "crash journal {}: flush to trim it failed: {e}",
                    self.path.display()
                );
            }
        }
    }

    fn done(&self, seg: usize) {
        let mut st = self.lock_state();
        st.pending[seg] -= 1;
        if st.pending[seg] == 0 {
            self.drained.notify_all();
        }
    }

    /// Switches segments, waits for the old one's requests, flushes below, empties the old one.
    fn flush_and_trim(&self) -> Result<()> {
        let _one = self.flush_lock.lock().unwrap_or_else(|e| e.into_inner());
        let mut st = self.lock_state();
        let old = st.active;
        // The other segment was emptied by the previous flush (flushes are serialized).
        st.active = 1 - old;
        while st.pending[old] > 0 {
            st = self.drained.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        drop(st);
        if let Err(e) = self.lower.flush() {
            let mut st = self.lock_state();
            st.poisoned = true;
            // Keep both segments' records (they are not durable).
            st.active = old;
            return Err(e);
        }
        let mut st = self.lock_state();
        let gen = st.generation[old] + 1;
        // Bumping the generation invalidates every record of the old segment at once.
        if let Err(e) = self.write_segment_header(old, gen) {
            st.poisoned = true;
            st.active = old;
            return Err(io_err(e));
        }
        st.generation[old] = gen;
        st.tail[old] = 0;
        Ok(())
    }

    fn journaled(
        &self,
        kind: Kind,
        offset: u64,
        len: u64,
        data: &[u8],
        op: impl FnOnce() -> Result<()>,
    ) -> Result<()> {
        self.check_refused()?;
        blockdev::check_range(offset, len, self.lower.size())?;
        let range = self.lock_range(offset, len);
        let (seg, half_full) = self.append(kind, offset, len, data)?;
        crate::reconnect::test_abort_point("executing");
        let r = op();
        self.done(seg);
        drop(range);
        if half_full {
            self.early_trim();
        }
        r
    }
}

/// Writes `a` then `b` at `off` with as few `pwritev` calls as it takes.
fn pwritev_all(file: &File, a: &[u8], b: &[u8], off: u64) -> io::Result<()> {
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
fn read_upto(file: &File, buf: &mut [u8], off: u64) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read_at(&mut buf[n..], off + n as u64)? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Every valid record of both segments, in sequence order. A segment is read up to its first
/// record that is not whole, not of the segment's generation or fails its checksum: the record
/// being appended when the daemon died, which was never acknowledged.
fn scan(file: &File, seg_len: u64) -> io::Result<Vec<Record>> {
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
                break;
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

fn apply(dev: &dyn BlockDev, r: &Record) -> Result<()> {
    match r.kind {
        Kind::Write => dev.write_at(&r.data, r.offset),
        Kind::Discard => dev.discard(r.offset, r.len),
        Kind::Zeroes => dev.write_zeroes(r.offset, r.len, false),
        Kind::ZeroesUnmap => dev.write_zeroes(r.offset, r.len, true),
    }
}

impl BlockDev for Journal {
    fn size(&self) -> u64 {
        self.lower.size()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.lower.read_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.journaled(Kind::Write, offset, buf.len() as u64, buf, || {
            self.lower.write_at(buf, offset)
        })
    }

    fn flush(&self) -> Result<()> {
        self.check_refused()?;
        self.flush_and_trim()
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.journaled(Kind::Discard, offset, len, &[], || {
            self.lower.discard(offset, len)
        })
    }

    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        let kind = if unmap {
            Kind::ZeroesUnmap
        } else {
            Kind::Zeroes
        };
        self.journaled(kind, offset, len, &[], || {
            self.lower.write_zeroes(offset, len, unmap)
        })
    }

    fn is_read_only(&self) -> bool {
        self.lower.is_read_only()
    }
}

#[cfg(test)]
#[path = "journal_tests.rs"]
mod tests;
