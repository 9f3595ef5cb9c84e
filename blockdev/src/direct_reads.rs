//! Reads of a read-only file that bypass the host page cache.
//!
//! A cold random read through the page cache costs the kernel a page allocation, its buffered
//! read path and a copy, and on this kind of machine (a VM whose freed memory goes back to the
//! host) each new page-cache page is a fault on the host too: 4 KiB random reads at queue depth
//! 32 on io_uring reached 23-26k IOPS buffered against 68-73k with O_DIRECT on the same file
//! (fio, 2026-12-01). [`DirectReads`] is a second open file description of a read-only file
//! opened with `O_DIRECT`, with the alignments its reads need; a read plan offers it next to the
//! buffered description ([`crate::PlanSource::File`]) for a short random read whose pages the
//! page cache does not hold ([`page_cache_holds`]), and the io_uring read path takes it when the
//! guest's buffers meet its alignments. What the page cache already holds (a base another
//! daemon read, or one read sequentially) is still read from it.
//!
//! What is read often is worth caching: [`ReadCounts`] counts the reads of each block of the
//! file (saturating at 3), and a plan offers the direct description only for the first
//! [`DIRECT_READS_PER_BLOCK`] reads of a block; later reads go through the page cache, from
//! where the next ones complete at once and the queue moves them to the folio cache path
//! (`backend/src/inflight.rs`). A working set read over and over ends up in memory as before,
//! while a cold random pass (a boot, a scan) reads each block once or twice, from the device.
//!
//! Locking model: none. The description is only read through (positional reads); the failure
//! flag is a relaxed atomic that only goes from clear to set; the read counts are relaxed
//! atomic words (a race loses one count: a heuristic).

use std::fs::File;
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};

/// The alignments direct I/O on `file` needs: `(offset and length, memory)` from `statx`
/// `STATX_DIOALIGN`, 4096 for both where the kernel or file system does not report them.
pub fn dio_alignment(file: &File) -> (u64, usize) {
    // SAFETY: all-zero bytes are a valid `statx` (plain integers).
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: a valid fd, a NUL-terminated empty path with AT_EMPTY_PATH, and a pointer to a
    // `statx` that outlives the call.
    let r = unsafe {
        libc::statx(
            file.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut stx,
        )
    };
    if r == 0
        && stx.stx_mask & libc::STATX_DIOALIGN != 0
        && stx.stx_dio_offset_align != 0
        && stx.stx_dio_mem_align != 0
    {
        (
            u64::from(stx.stx_dio_offset_align),
            stx.stx_dio_mem_align as usize,
        )
    } else {
        (4096, 4096)
    }
}

/// A new open file description of `file` with O_DIRECT, read-only unless `write` (through
/// `/proc/self/fd`: flags are per description, so a dup would turn O_DIRECT on for `file` too).
pub fn reopen_direct(file: &File, write: bool) -> io::Result<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(libc::O_DIRECT | libc::O_CLOEXEC)
        .open(format!("/proc/self/fd/{}", file.as_raw_fd()))
}

/// A new open file description of `file`, read-only and without O_DIRECT whatever `file`'s
/// own flags (through `/proc/self/fd`, as [`reopen_direct`]): for reads through the host page
/// cache of a file whose writes go direct.
pub fn reopen_read_only(file: &File) -> io::Result<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(format!("/proc/self/fd/{}", file.as_raw_fd()))
}

/// `cachestat(2)` (Linux 6.5): one number on every architecture (the seccomp allow-list of
/// `snapblk serve --user` names it too).
pub const SYS_CACHESTAT: libc::c_long = 451;

/// Set once `cachestat` turned out to be missing (old kernel) or refused (seccomp).
static NO_CACHESTAT: AtomicBool = AtomicBool::new(false);

#[repr(C)]
struct CachestatRange {
    off: u64,
    len: u64,
}

#[repr(C)]
#[derive(Default)]
struct Cachestat {
    nr_cache: u64,
    nr_dirty: u64,
    nr_writeback: u64,
    nr_evicted: u64,
    nr_recently_evicted: u64,
}

/// Whether the host page cache holds every page of `[offset, offset + len)` of `file`
/// (`cachestat`, which starts no I/O); `None` where the kernel cannot say.
pub fn page_cache_holds(file: &File, offset: u64, len: u64) -> Option<bool> {
    if len == 0 {
        return Some(true);
    }
    let pages = (offset.checked_add(len - 1)? / 4096) - offset / 4096 + 1;
    Some(page_cache_pages(file, offset, len)? >= pages)
}

/// How many pages of `[offset, offset + len)` of `file` the host page cache holds
/// (`cachestat`); `None` where the kernel cannot say.
pub fn page_cache_pages(file: &File, offset: u64, len: u64) -> Option<u64> {
    if len == 0 {
        return Some(0);
    }
    if NO_CACHESTAT.load(Ordering::Relaxed) {
        return None;
    }
    const PAGE: u64 = 4096;
    let first = offset / PAGE;
    let last = offset.checked_add(len - 1)? / PAGE;
    let range = CachestatRange {
        off: first * PAGE,
        len: (last - first + 1) * PAGE,
    };
    let mut cs = Cachestat::default();
    // SAFETY: cachestat reads `range` and writes `cs`, both valid for the call; the descriptor
    // is open for its duration.
    let r = unsafe {
        libc::syscall(
            SYS_CACHESTAT,
            file.as_raw_fd(),
            &range as *const CachestatRange,
            &mut cs as *mut Cachestat,
            0u32,
        )
    };
    if r != 0 {
        let e = io::Error::last_os_error().raw_os_error();
        if matches!(
            e,
            Some(libc::ENOSYS) | Some(libc::EPERM) | Some(libc::EACCES)
        ) {
            NO_CACHESTAT.store(true, Ordering::Relaxed);
        }
        return None;
    }
    Some(cs.nr_cache)
}

/// An `O_DIRECT` description of a read-only file and the alignments its reads need (see the
/// module documentation).
#[derive(Debug)]
pub struct DirectReads {
    file: File,
    /// Offset and length alignment.
    block: u64,
    /// Memory alignment.
    mem: usize,
    /// Set once a read through it was refused (EINVAL): reads go buffered from then on.
    refused: AtomicBool,
}

impl DirectReads {
    /// An `O_DIRECT` description of `file` ([`reopen_direct`]); `None` for anything but a
    /// regular file, or where it cannot be opened so.
    pub fn open(file: &File) -> Option<DirectReads> {
        if !file.metadata().ok()?.is_file() {
            return None;
        }
        let direct = reopen_direct(file, false).ok()?;
        let (block, mem) = dio_alignment(&direct);
        Some(DirectReads::with_alignment(direct, block, mem))
    }

    /// Reads through `file` (meant to be opened `O_DIRECT`) with the given alignments (rounded
    /// up to powers of two); tests use it to claim alignments the file system does not have.
    pub fn with_alignment(file: File, block: u64, mem: usize) -> DirectReads {
        DirectReads {
            file,
            block: block.max(1).next_power_of_two(),
            mem: mem.max(1).next_power_of_two(),
            refused: AtomicBool::new(false),
        }
    }

    /// The `O_DIRECT` description.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Whether reads may still take it.
    pub fn usable(&self) -> bool {
        !self.refused.load(Ordering::Relaxed)
    }

    /// Whether a plan reading `[offset, offset + len)` of `file` (a buffered description of
    /// the same file) offers it: reads may still take it and the host page cache does not
    /// hold the whole range (what it holds is cheaper read from there).
    pub fn offers(&self, file: &File, offset: u64, len: u64) -> bool {
        self.usable() && page_cache_holds(file, offset, len) != Some(true)
    }

    /// Whether a read at `offset` into buffers `segments` (address, length) meets the
    /// alignments: offset and every segment's length a multiple of the block, every address a
    /// multiple of the memory alignment.
    pub fn takes(&self, offset: u64, segments: impl IntoIterator<Item = (usize, usize)>) -> bool {
        offset.is_multiple_of(self.block)
            && segments.into_iter().all(|(addr, len)| {
                addr.is_multiple_of(self.mem) && (len as u64).is_multiple_of(self.block)
            })
    }

    /// Notes that the kernel refused a read through it (`errno`): after an EINVAL (an alignment
    /// the file system wants and did not report) reads take the buffered description for good.
    /// Returns whether this call is the one that stopped them.
    pub fn refused(&self, errno: i32) -> bool {
        errno == libc::EINVAL && !self.refused.swap(true, Ordering::Relaxed)
    }
}

/// Reads of a block that a plan may still send through the direct description; later ones go
/// through the page cache (see the module documentation).
pub(crate) const DIRECT_READS_PER_BLOCK: u8 = 2;

/// Most counters [`ReadCounts`] keeps (2 bits each: 4 MiB); a larger file counts in larger
/// blocks.
const MAX_COUNTERS: u64 = 1 << 24;

/// Saturating 2-bit read counts per block of a file (see the module documentation).
#[derive(Debug)]
pub(crate) struct ReadCounts {
    /// log2 of the block size (at least 4 KiB).
    shift: u32,
    words: Box<[std::sync::atomic::AtomicU64]>,
}

impl ReadCounts {
    /// Counts for a file of `size` bytes.
    pub(crate) fn new(size: u64) -> ReadCounts {
        let mut shift = 12;
        while size.div_ceil(1 << shift) > MAX_COUNTERS {
            shift += 1;
        }
        let counters = size.div_ceil(1 << shift).max(1);
        let words = counters.div_ceil(32) as usize;
        ReadCounts {
            shift,
            words: (0..words)
                .map(|_| std::sync::atomic::AtomicU64::new(0))
                .collect(),
        }
    }

    /// Counts a read of `[offset, offset + len)` and returns the largest count its blocks had
    /// before it (0 for a range never read).
    pub(crate) fn note(&self, offset: u64, len: u64) -> u8 {
        let first = offset >> self.shift;
        let last = (offset + len.max(1) - 1) >> self.shift;
        let mut most = 0u8;
        for block in first..=last {
            let Some(word) = self.words.get((block / 32) as usize) else {
                break;
            };
            let bit = (block % 32) * 2;
            let old = word
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |w| {
                    let c = (w >> bit) & 3;
                    (c < 3).then(|| w + (1 << bit))
                })
                .unwrap_or_else(|w| w);
            most = most.max(((old >> bit) & 3) as u8);
        }
        most
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A read is taken when its offset and every segment's length are multiples of the block
    /// and every address a multiple of the memory alignment; only an EINVAL stops the
    /// description, once.
    #[test]
    fn direct_reads_take_only_aligned_reads_and_stop_after_a_refusal() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, vec![1u8; 1 << 16]).unwrap();
        let d = DirectReads::open(&File::open(&path).unwrap()).expect("O_DIRECT in the temp dir");
        let (block, mem) = dio_alignment(d.file());
        assert_eq!((d.block, d.mem), (block, mem));
        assert!(d.block >= 512 && d.mem >= 1);
        let d = DirectReads::with_alignment(d.file, 4096, 512);
        assert!(d.takes(8192, [(0x1000, 4096), (0x3000, 8192)]));
        assert!(d.takes(0, []));
        assert!(!d.takes(512, [(0x1000, 4096)]), "offset");
        assert!(!d.takes(4096, [(0x1000, 4096), (0x3000, 2048)]), "length");
        assert!(!d.takes(4096, [(0x1100, 4096)]), "address");
        assert!(
            d.takes(4096, [(0x1200, 4096)]),
            "address at the memory alignment"
        );
        assert!(d.usable());
        assert!(!d.refused(libc::EIO), "an I/O error is no refusal");
        assert!(d.usable());
        assert!(d.refused(libc::EINVAL));
        assert!(!d.usable());
        assert!(!d.refused(libc::EINVAL), "stopped once");
        let odd = DirectReads::with_alignment(tempfile::tempfile().unwrap(), 3000, 0);
        assert_eq!((odd.block, odd.mem), (4096, 1));
        assert!(DirectReads::open(&File::open("/dev/null").unwrap()).is_none());
    }

    /// `cachestat` answers for every page of the range: one page missing at its end, or in
    /// its middle, makes it not held; a range of held pages is held.
    #[test]
    fn the_page_cache_holds_a_range_only_with_every_page_of_it() {
        use std::os::unix::fs::FileExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, vec![3u8; 1 << 20]).unwrap();
        let f = File::open(&path).unwrap();
        f.sync_all().unwrap();
        // Nothing cached, no read-ahead: then exactly the pages read are held (page 103 not).
        for advice in [libc::POSIX_FADV_DONTNEED, libc::POSIX_FADV_RANDOM] {
            // SAFETY: posix_fadvise on an open descriptor, integer arguments.
            let r = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, advice) };
            assert_eq!(r, 0);
        }
        let mut buf = vec![0u8; 7 * 4096];
        f.read_exact_at(&mut buf, 96 * 4096).unwrap();
        f.read_exact_at(&mut buf[..3 * 4096], 104 * 4096).unwrap();
        f.read_exact_at(&mut buf[..5 * 4096], 200 * 4096).unwrap();
        const P: u64 = 4096;
        assert_eq!(page_cache_holds(&f, 96 * P, 4 * P), Some(true));
        assert_eq!(page_cache_holds(&f, 200 * P + 100, 3 * P), Some(true));
        assert_eq!(
            page_cache_holds(&f, 100 * P, 4 * P),
            Some(false),
            "last page missing"
        );
        assert_eq!(
            page_cache_holds(&f, 102 * P, 3 * P),
            Some(false),
            "middle page missing"
        );
        assert_eq!(
            page_cache_holds(&f, 100 * P + 100, 3 * P),
            Some(false),
            "unaligned"
        );
        assert_eq!(page_cache_holds(&f, 103 * P + 4095, 1), Some(false));
        assert_eq!(page_cache_holds(&f, 104 * P, 1), Some(true));
        assert_eq!(page_cache_holds(&f, 5, 0), Some(true));
    }

    /// The offset alignment reported is the one the block device enforces (its logical block
    /// size, from sysfs), not the 4096 fallback.
    #[test]
    fn the_direct_alignment_is_the_block_device_s_logical_block_size() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, [0u8; 4096]).unwrap();
        let dev = std::fs::metadata(&path).unwrap().dev();
        let (major, minor) = (libc::major(dev), libc::minor(dev));
        let sys = format!("/sys/dev/block/{major}:{minor}");
        let lbs = std::fs::read_to_string(format!("{sys}/queue/logical_block_size"))
            .or_else(|_| std::fs::read_to_string(format!("{sys}/../queue/logical_block_size")))
            .expect("the temporary directory lies on a block device");
        let lbs: u64 = lbs.trim().parse().unwrap();
        let (block, mem) = dio_alignment(&File::open(&path).unwrap());
        assert_eq!(block, lbs);
        assert!(mem >= 1 && mem as u64 <= block);
    }

    #[test]
    fn read_counts_saturate_per_block_and_a_huge_file_counts_in_larger_blocks() {
        let c = ReadCounts::new(1 << 30);
        assert_eq!(c.shift, 12);
        assert_eq!(c.note(8192, 4096), 0);
        assert_eq!(c.note(8192, 1), 1);
        assert_eq!(c.note(8192 + 4095, 1), 2);
        assert_eq!(c.note(8192, 4096), 3);
        assert_eq!(c.note(8192, 4096), 3, "saturated");
        // A range counts every block it touches and answers the most-read one; its
        // neighbours in the same word keep their own counts.
        assert_eq!(c.note(4096, 12288), 3);
        assert_eq!(c.note(4096, 4096), 1);
        assert_eq!(c.note(12288, 4096), 1);
        // The last block of the file, and a range past it (not counted, not a panic).
        assert_eq!(c.note((1 << 30) - 4096, 4096), 0);
        assert_eq!(c.note(1 << 31, 4096), 0);
        let huge = ReadCounts::new(1 << 40);
        assert_eq!(1u64 << 40 >> huge.shift, MAX_COUNTERS);
        assert_eq!(huge.words.len() as u64, MAX_COUNTERS / 32);
        assert_eq!(huge.note(0, 4096), 0);
        assert_eq!(huge.note(4096, 4096), 1, "the same 64 KiB block");
    }
}
