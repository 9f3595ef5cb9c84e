//! The raw-file layer: a virtual disk that is a plain host file (or block device), byte for byte.
//!
//! Random reads without read-ahead: a read-only raw file (a base image) keeps a second open
//! file description of itself advised `POSIX_FADV_RANDOM`, and reads that are short and do not
//! continue a recent read (within [`SEQUENTIAL_GAP`] after where one of the last
//! [`STREAMS`] reads ended) go through it. The kernel's read-ahead state is per description:
//! on the one description, each cold 4 KiB random read also read its neighbours (5.9 KiB of
//! device reads per read measured, against 4.3 with the advice; cold 4 KiB reads at queue depth
//! 32 on one queue: 65.8-77.5k against 86.7-89.7k IOPS), while sequential and large reads keep
//! the first description and its read-ahead. Both descriptions share the page cache, so what
//! one reads the other finds. Where the second one cannot be opened (no `/proc`, a block
//! device, a sandbox that refuses `open`) every read takes the first, and so does every read
//! after one through the second failed (that read is retried through the first and the
//! failure logged once): the second description is a speed-up, never a new way to fail.
//!
//! Uncached random reads: a read-only raw file also keeps an `O_DIRECT` description of itself
//! ([`crate::DirectReads`]); the plan of a read that takes the random description offers it
//! too when the host page cache does not hold the range ([`crate::page_cache_holds`]), so that
//! the io_uring read path can read cold data straight from the device into the guest's buffers.
//! Synchronous reads (which fill the folio cache) stay buffered, and so does a block's third
//! and every later random read (`ReadCounts`, `direct_reads.rs`): what is read often is worth
//! caching.
//!
//! Locking model: none. Positional `pread`/`pwrite` are thread-safe on a shared descriptor, so
//! requests from every queue go straight to the kernel in parallel; the recent reads' ends are
//! relaxed atomics (a heuristic: a race only picks the other descriptor for one read).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use crate::direct_reads::{ReadCounts, DIRECT_READS_PER_BLOCK};
use crate::{
    check_range, open_file, read_full_at, BlockDev, BlockError, DirectReads, PlanSource, ReadPlan,
    Result,
};

/// Reads of at least this many bytes always take the file's first description (read-ahead
/// costs them little, and sequential scans read in large pieces).
pub const RANDOM_READ_MAX: u64 = 64 << 10;
/// How many recent reads' ends are kept to recognise sequential streams.
pub const STREAMS: usize = 8;
/// A read starting at most this far after where a recent read ended continues it (strided
/// patterns such as copy-on-write fills that skip the part a guest wrote).
pub const SEQUENTIAL_GAP: u64 = 64 << 10;

/// Recognises random reads: remembers where the last [`STREAMS`] reads ended, and calls a read
/// random when it is shorter than [`RANDOM_READ_MAX`] and starts at no point from 0 to
/// [`SEQUENTIAL_GAP`] bytes after one of those ends. Relaxed atomics: a heuristic, where a
/// race only picks the other description for one read.
#[derive(Debug)]
pub struct ReadStreams {
    /// Where recent reads ended (`u64::MAX`: free), and the slot the next new stream takes.
    ends: [AtomicU64; STREAMS],
    next: AtomicUsize,
}

impl Default for ReadStreams {
    fn default() -> Self {
        ReadStreams {
            ends: std::array::from_fn(|_| AtomicU64::new(u64::MAX)),
            next: AtomicUsize::new(0),
        }
    }
}

impl ReadStreams {
    /// Notes a read of `len` bytes at `offset`; whether it is a random one.
    pub fn note_random(&self, offset: u64, len: u64) -> bool {
        let end = offset.saturating_add(len);
        let continues = self.ends.iter().find(|e| {
            let e = e.load(Ordering::Relaxed);
            e != u64::MAX && offset >= e && offset - e <= SEQUENTIAL_GAP
        });
        match continues {
            Some(slot) => {
                slot.store(end, Ordering::Relaxed);
                false
            }
            None => {
                let i = self.next.fetch_add(1, Ordering::Relaxed) % STREAMS;
                self.ends[i].store(end, Ordering::Relaxed);
                len < RANDOM_READ_MAX
            }
        }
    }
}

/// A raw image file.
#[derive(Debug)]
pub struct RawFile {
    file: Arc<File>,
    /// The same file advised `POSIX_FADV_RANDOM`, for random reads (see the module
    /// documentation); only for a read-only regular file.
    random: Option<Arc<File>>,
    /// Set once a read through `random` failed: from then on every read takes `file`.
    random_failed: AtomicBool,
    /// The same file opened `O_DIRECT`, offered by plans of random reads the page cache does
    /// not hold; only for a read-only regular file.
    direct: Option<Arc<DirectReads>>,
    /// How often each block was planned for a random read (with `direct`): only the first
    /// reads of a block are offered `direct`, later ones fill the page cache.
    counts: Option<ReadCounts>,
    /// Which reads are random.
    streams: ReadStreams,
    size: u64,
    read_only: bool,
}

/// A second open file description of `file` (through `/proc/self/fd`: advice is per
/// description, a dup would share it) advised `POSIX_FADV_RANDOM`; `None` for anything but a
/// regular file, or where it cannot be opened or advised.
pub fn random_twin(file: &File) -> Option<Arc<File>> {
    if !file.metadata().ok()?.is_file() {
        return None;
    }
    let twin = File::open(format!("/proc/self/fd/{}", file.as_raw_fd())).ok()?;
    // SAFETY: posix_fadvise on a descriptor we own, with plain integer arguments.
    let r = unsafe { libc::posix_fadvise(twin.as_raw_fd(), 0, 0, libc::POSIX_FADV_RANDOM) };
    (r == 0).then(|| Arc::new(twin))
}

impl RawFile {
    /// Opens a raw image. Its size is the file's size at open time.
    pub fn open(path: &Path, read_only: bool) -> io::Result<Self> {
        let file = open_file(path, read_only)?;
        Self::from_file(file, read_only)
    }

    /// Wraps an open file.
    pub fn from_file(file: File, read_only: bool) -> io::Result<Self> {
        let size = file_size(&file)?;
        let random = if read_only { random_twin(&file) } else { None };
        let direct = if read_only {
            DirectReads::open(&file).map(Arc::new)
        } else {
            None
        };
        Ok(RawFile {
            file: Arc::new(file),
            random,
            random_failed: AtomicBool::new(false),
            counts: direct.as_ref().map(|_| ReadCounts::new(size)),
            direct,
            streams: ReadStreams::default(),
            size,
            read_only,
        })
    }

    /// The underlying file.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Whether reads can go through a second description advised `POSIX_FADV_RANDOM`.
    pub fn has_random_reads(&self) -> bool {
        self.random_reads().is_some()
    }

    /// The random-access description, unless there is none or a read through it failed.
    fn random_reads(&self) -> Option<&Arc<File>> {
        self.random
            .as_ref()
            .filter(|_| !self.random_failed.load(Ordering::Relaxed))
    }

    /// The description a read of `len` bytes at `offset` goes through, noting where it ends:
    /// the random one for a short read that continues no recent read, else the first.
    fn for_read(&self, offset: u64, len: u64) -> &Arc<File> {
        let Some(random) = self.random_reads() else {
            return &self.file;
        };
        if self.streams.note_random(offset, len) {
            random
        } else {
            &self.file
        }
    }

    fn check_writable(&self) -> Result<()> {
        if self.read_only {
            return Err(BlockError::ReadOnly);
        }
        Ok(())
    }

    fn fallocate(&self, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
        let arg = |v: u64| {
            libc::off_t::try_from(v).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))
        };
        let (offset, len) = (arg(offset)?, arg(len)?);
        // SAFETY: fallocate only reads its integer arguments; the descriptor is owned by `self.file`
        // and stays open for the duration of the call.
        let ret = unsafe { libc::fallocate(self.file.as_raw_fd(), mode, offset, len) };
        if ret == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    fn write_zero_bytes(&self, offset: u64, len: u64) -> Result<()> {
        const CHUNK: u64 = 1 << 20;
        let zeros = vec![0u8; CHUNK.min(len) as usize];
        let mut done = 0;
        while done < len {
            let n = CHUNK.min(len - done);
            self.file
                .write_all_at(&zeros[..n as usize], offset + done)?;
            done += n;
        }
        Ok(())
    }
}

/// The size of a regular file or of a block device.
pub fn file_size(file: &File) -> io::Result<u64> {
    use std::io::{Seek, SeekFrom};
    let meta = file.metadata()?;
    if meta.is_file() {
        return Ok(meta.len());
    }
    let mut f = file.try_clone()?;
    f.seek(SeekFrom::End(0))
}

impl BlockDev for RawFile {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(offset, buf.len() as u64, self.size)?;
        let file = self.for_read(offset, buf.len() as u64);
        match read_full_at(file, buf, offset) {
            Err(e) if !Arc::ptr_eq(file, &self.file) => {
                if !self.random_failed.swap(true, Ordering::Relaxed) {
                    log::warn!(
                        "a read of {} bytes at {offset} through the raw file's random-access \
                         description failed ({e}); every read takes its first description \
                         from now",
                        buf.len()
                    );
                }
                read_full_at(&self.file, buf, offset)?;
            }
            r => r?,
        }
        Ok(())
    }

    fn plan_read(&self, offset: u64, len: u64) -> Option<ReadPlan> {
        check_range(offset, len, self.size).ok()?;
        let file = self.for_read(offset, len);
        let direct = self
            .direct
            .as_ref()
            .filter(|d| !Arc::ptr_eq(file, &self.file) && d.offers(file, offset, len))
            .filter(|_| {
                self.counts
                    .as_ref()
                    .is_none_or(|c| c.note(offset, len) < DIRECT_READS_PER_BLOCK)
            })
            .cloned();
        Some(ReadPlan::one(
            len,
            PlanSource::File {
                file: Arc::clone(file),
                offset,
                direct,
            },
        ))
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_writable()?;
        check_range(offset, buf.len() as u64, self.size)?;
        self.file.write_all_at(buf, offset)?;
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.file.sync_data()?;
        Ok(())
    }

    /// Nothing to do: every completed write went to the kernel with `pwrite` (or to the device
    /// with O_DIRECT), where it outlives this process.
    fn write_back(&self) -> Result<()> {
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.write_zeroes(offset, len, true)
    }

    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        self.check_writable()?;
        check_range(offset, len, self.size)?;
        if len == 0 {
            return Ok(());
        }
        let mode = if unmap {
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
        } else {
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
        };
        match self.fallocate(mode, offset, len) {
            Ok(()) => Ok(()),
            // Block devices and some file systems lack these modes: write zeros instead.
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EOPNOTSUPP) | Some(libc::ENODEV)
                ) =>
            {
                self.write_zero_bytes(offset, len)
            }
            Err(e) => Err(e.into()),
        }
    }

    fn is_read_only(&self) -> bool {
        self.read_only
    }

    /// A raw file has no metadata of its own and its writes are buffered: every write of a
    /// writable one lands in place in the host page cache.
    fn rewrites_in_page_cache(&self, offset: u64, len: u64) -> bool {
        !self.read_only && check_range(offset, len, self.size).is_ok()
    }

    /// Any range of a writable one: a completed `pwrite` is with the kernel, where the next
    /// process reads it, and there is no metadata of its own.
    fn persists_in_place(&self, offset: u64, len: u64) -> bool {
        self.rewrites_in_page_cache(offset, len)
    }

    fn write_in_place_persisted(&self, buf: &[u8], offset: u64) -> Result<bool> {
        if !self.persists_in_place(offset, buf.len() as u64) {
            return Ok(false);
        }
        self.write_at(buf, offset).map(|()| true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::page_cache_holds;

    #[test]
    fn raw_file_round_trips_and_zeroes_without_touching_neighbours() {
        let tmp = tempfile::NamedTempFile::new().unwrap();
        tmp.as_file().set_len(1 << 20).unwrap();
        let dev = RawFile::open(tmp.path(), false).unwrap();
        assert_eq!(dev.size(), 1 << 20);
        dev.write_at(&[0xaa; 8192], 4096).unwrap();
        dev.write_zeroes(8192, 512, false).unwrap();
        dev.discard(4096, 4096).unwrap();
        let mut b = vec![0u8; 12288];
        dev.read_at(&mut b, 0).unwrap();
        assert!(b[..8192].iter().all(|&x| x == 0));
        assert!(b[8192..8704].iter().all(|&x| x == 0));
        assert!(b[8704..12288].iter().all(|&x| x == 0xaa));
        dev.flush().unwrap();
    }

    #[test]
    fn every_write_of_a_writable_raw_file_is_in_place_and_none_of_a_read_only_one() {
        let tmp = tempfile::NamedTempFile::new().unwrap();
        tmp.as_file().set_len(1 << 20).unwrap();
        let dev = RawFile::open(tmp.path(), false).unwrap();
        assert!(dev.rewrites_in_page_cache(0, 1 << 20));
        assert!(
            dev.rewrites_in_page_cache(4096, 128 << 10),
            "a hole is in place too"
        );
        assert!(
            !dev.rewrites_in_page_cache((1 << 20) - 512, 1024),
            "past the end"
        );
        assert!(dev.persists_in_place(4096, 128 << 10));
        assert!(dev.write_in_place_persisted(&[3; 4096], 4096).unwrap());
        assert!(
            !dev.write_in_place_persisted(&[3; 1024], (1 << 20) - 512)
                .unwrap(),
            "past the end: refused, not failed"
        );
        drop(dev);
        let mut b = [0u8; 4096];
        tmp.as_file().read_exact_at(&mut b, 4096).unwrap();
        assert_eq!(b, [3; 4096], "the persisted write is in the file");
        let ro = RawFile::open(tmp.path(), true).unwrap();
        assert!(!ro.rewrites_in_page_cache(0, 4096));
        assert!(!ro.persists_in_place(0, 4096));
        assert!(!ro.write_in_place_persisted(&[3; 4096], 0).unwrap());
    }

    /// Reads that continue no recent read and are short go through the second description
    /// (the same file, advised random), sequential, strided and large ones through the first;
    /// a writable file has only the first.
    #[test]
    fn short_random_reads_of_a_read_only_file_skip_read_ahead_and_streams_keep_it() {
        use std::os::unix::fs::MetadataExt;
        let tmp = tempfile::NamedTempFile::new().unwrap();
        let data: Vec<u8> = (0..4u32 << 20).map(|i| (i % 251) as u8).collect();
        std::fs::write(tmp.path(), &data).unwrap();
        let writable = RawFile::open(tmp.path(), false).unwrap();
        assert!(!writable.has_random_reads());
        drop(writable);
        let dev = RawFile::open(tmp.path(), true).unwrap();
        assert!(
            dev.has_random_reads(),
            "no second description on a regular file"
        );
        let planned = |off: u64, len: u64| -> Arc<File> {
            match &dev.plan_read(off, len).unwrap().pieces[..] {
                [(_, PlanSource::File { file, offset, .. })] => {
                    assert_eq!(*offset, off);
                    file.clone()
                }
                other => panic!("unexpected plan {other:?}"),
            }
        };
        let first = |f: &Arc<File>| std::ptr::eq(&**f, dev.file());
        let r = planned(1 << 20, 4096);
        assert!(
            !first(&r),
            "a random 4 KiB read took the read-ahead description"
        );
        let (a, b) = (r.metadata().unwrap(), dev.file().metadata().unwrap());
        assert_eq!((a.dev(), a.ino()), (b.dev(), b.ino()), "not the same file");
        let mut back = vec![0u8; 4096];
        r.read_exact_at(&mut back, 1 << 20).unwrap();
        assert_eq!(back, data[1 << 20..(1 << 20) + 4096]);
        // The next 4 KiB continue it; so does a read after a gap of a written part.
        assert!(first(&planned((1 << 20) + 4096, 4096)));
        assert!(first(&planned((1 << 20) + 12288, 61440)));
        // Far from every recent read: random again; a large read is never.
        assert!(!first(&planned(3 << 20, 4096)));
        assert!(first(&planned(2 << 20, RANDOM_READ_MAX)));
        // STREAMS interleaved streams each keep their read-ahead.
        let starts: Vec<u64> = (0..STREAMS as u64).map(|i| i * (400 << 10)).collect();
        for s in &starts {
            planned(*s, 4096);
        }
        for s in &starts {
            assert!(first(&planned(s + 4096, 4096)), "stream at {s} lost");
        }
        // read_at takes the same way and reads the same bytes.
        let mut b2 = vec![0u8; 8192];
        dev.read_at(&mut b2, 3 << 20).unwrap();
        assert_eq!(b2, data[3 << 20..(3 << 20) + 8192]);
    }

    /// A read through the second description that fails is read again through the first and
    /// returns the file's bytes; from then on reads and plans take only the first.
    #[test]
    fn a_failing_random_description_falls_back_to_the_first_for_good() {
        let tmp = tempfile::NamedTempFile::new().unwrap();
        let data: Vec<u8> = (0..1u32 << 20).map(|i| (i % 253) as u8).collect();
        std::fs::write(tmp.path(), &data).unwrap();
        let mut dev = RawFile::open(tmp.path(), true).unwrap();
        // A write-only description of the same file: every read through it fails (EBADF).
        let write_only = std::fs::OpenOptions::new()
            .write(true)
            .open(tmp.path())
            .unwrap();
        dev.random = Some(Arc::new(write_only));
        assert!(dev.has_random_reads());
        let mut b = vec![0u8; 4096];
        dev.read_at(&mut b, 512 << 10).unwrap();
        assert_eq!(b, data[512 << 10..(512 << 10) + 4096]);
        assert!(
            !dev.has_random_reads(),
            "the failing description stays in use"
        );
        match &dev.plan_read(100 << 10, 4096).unwrap().pieces[..] {
            [(_, PlanSource::File { file, .. })] => {
                assert!(std::ptr::eq(&**file, dev.file()), "planned through it");
            }
            other => panic!("unexpected plan {other:?}"),
        }
        dev.read_at(&mut b, 0).unwrap();
        assert_eq!(b, data[..4096]);
    }

    /// The O_DIRECT description a plan of a random read offers, if any.
    fn offered(dev: &RawFile, off: u64, len: u64) -> Option<Arc<DirectReads>> {
        match dev.plan_read(off, len).unwrap().pieces.into_iter().next() {
            Some((_, PlanSource::File { direct, .. })) => direct,
            other => panic!("unexpected plan {other:?}"),
        }
    }

    /// A plan of a short random read of a read-only file offers its O_DIRECT description
    /// while the host page cache does not hold the range, and not once it does; sequential
    /// and large reads (which keep read-ahead) and a writable file never offer it. Read
    /// through it, the offered description returns the file's bytes.
    #[test]
    fn random_reads_the_page_cache_does_not_hold_are_offered_the_direct_description() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("base");
        let data: Vec<u8> = (0..4u32 << 20).map(|i| (i % 241) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let f = File::open(&path).unwrap();
        f.sync_all().unwrap();
        // SAFETY: posix_fadvise on an open descriptor, integer arguments.
        let r = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        assert_eq!(r, 0);
        let writable = RawFile::open(&path, false).unwrap();
        assert!(offered(&writable, 1 << 20, 4096).is_none());
        drop(writable);
        let dev = RawFile::open(&path, true).unwrap();
        assert_eq!(
            page_cache_holds(dev.file(), 1 << 20, 4096),
            Some(false),
            "cachestat (Linux 6.5) is needed to tell cached ranges from cold ones"
        );
        let d = offered(&dev, 1 << 20, 4096).expect("a cold random read is not offered it");
        let mut buf = crate::AlignedBuf::zeroed(4096);
        d.file().read_exact_at(&mut buf, 1 << 20).unwrap();
        assert_eq!(&buf[..], &data[1 << 20..(1 << 20) + 4096]);
        // The direct read left the page cache as it was: still offered, for a second read of
        // the block; the third goes through the page cache (what is read often gets cached).
        assert!(offered(&dev, 1 << 20, 4096).is_some());
        assert!(offered(&dev, 1 << 20, 4096).is_none());
        assert!(offered(&dev, (1 << 20) + 2048, 512).is_none(), "same block");
        assert!(
            offered(&dev, (1 << 20) - 4096, 4096).is_some(),
            "the block before"
        );
        // Continuing a recent read, or large: the read-ahead description, never direct.
        assert!(offered(&dev, (1 << 20) + 4096, 4096).is_none());
        assert!(offered(&dev, 3 << 20, RANDOM_READ_MAX).is_none());
        // Once the page cache holds the range (a buffered read), not offered.
        let mut b = vec![0u8; 4096];
        dev.read_at(&mut b, 2 << 20).unwrap();
        assert_eq!(page_cache_holds(dev.file(), 2 << 20, 4096), Some(true));
        assert!(offered(&dev, 2 << 20, 4096).is_none());
        // Partly held (one page of two): offered.
        assert!(offered(&dev, (2 << 20) - 4096, 8192).is_some());
    }

    #[test]
    fn raw_file_read_only_refuses_writes() {
        let tmp = tempfile::NamedTempFile::new().unwrap();
        tmp.as_file().set_len(4096).unwrap();
        let dev = RawFile::open(tmp.path(), true).unwrap();
        assert!(matches!(dev.write_at(&[1], 0), Err(BlockError::ReadOnly)));
        assert!(matches!(
            dev.write_zeroes(0, 1, false),
            Err(BlockError::ReadOnly)
        ));
    }
}
