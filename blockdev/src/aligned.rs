//! Byte buffers aligned for direct I/O.
//!
//! An O_DIRECT file accepts a buffer as it is only when its memory address is a multiple of
//! the file's direct-I/O memory alignment (512 bytes on a typical virtio disk, 4096 on some);
//! any other buffer costs a copy into an aligned bounce buffer below (see
//! `qcow_snapshot::direct`). The scratch buffers the data path hands down (the request
//! buffer, the folio cache's writeback and fill buffers) are therefore [`AlignedBuf`]s: their
//! start is aligned to [`IO_ALIGN`], so a slice of one that starts at a multiple of the file's
//! alignment goes to the device without a copy.
//!
//! A request buffer ([`AlignedBuf::zeroed_contiguous`]) of [`HUGE_MIN`] bytes or more lives in
//! memory advised `MADV_HUGEPAGE` (half of a huge page from a pool for 1 MiB, else a mapping of
//! its own in whole [`HUGE_PAGE`]s), so that (where transparent huge pages are on) a 1 MiB
//! request is one physically contiguous piece of memory: the block layer then builds one
//! segment for it instead of one per 4 KiB page. A virtio disk takes at most `max_segments`
//! (254 here) segments per request, so a 1 MiB write from 4 KiB pages (256 of them) was split
//! into two device requests, and the device's own merging of sequential requests stopped at
//! the segment limit (a fresh overlay written with 1 MiB requests reached the disk as 580 KiB
//! requests on average, fio's as 2.9 MiB ones; 1 MiB rewrites of allocated clusters reached
//! 3.1-3.2 GB/s, and 5.2-5.6 GB/s from huge pages). Where huge pages are off, small pages back
//! the same memory.
//!
//! Locking model: an `AlignedBuf` is owned like a `Vec<u8>`; the pool of free halves is a
//! leaf mutex, held only to push or pop one.

use std::alloc::{handle_alloc_error, Layout};
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

/// Alignment of an [`AlignedBuf`]'s start: a page, enough for every direct-I/O memory
/// alignment Linux reports for disks with up to 4 KiB logical blocks.
pub const IO_ALIGN: usize = 4096;

/// The size of a transparent huge page on x86-64 and arm64 with 4 KiB pages.
pub const HUGE_PAGE: usize = 2 << 20;

/// Request buffers of at least this many bytes are backed by huge pages (see the module
/// documentation): about the smallest request the block layer splits for its segment count.
pub const HUGE_MIN: usize = 1 << 20;

/// Where an [`AlignedBuf`]'s memory came from.
#[derive(Clone, Copy)]
enum Backing {
    /// What `calloc` returned.
    Heap(NonNull<u8>),
    /// An anonymous mapping of this many bytes at the buffer's start.
    Mapped(usize),
    /// Half of a huge page, from [`HALVES`] and back there when dropped.
    Half,
}

/// Buffers of up to this many bytes (and at least [`HUGE_MIN`]) take half of a huge page:
/// a 1 MiB request buffer then costs 1 MiB of memory (and of zeroing on first touch), not 2.
pub const HUGE_HALF: usize = HUGE_PAGE / 2;

/// The start of a free half of a huge page, and whether it is all zeros (untouched, or
/// faulted in by [`prefault_huge_halves`]).
struct Half(NonNull<u8>, bool);

// SAFETY: a `Half` is an address of memory nobody uses while it is in the pool.
unsafe impl Send for Half {}

/// Free halves of huge pages. Never unmapped: the pool holds at most as many as were ever in
/// use at once (the executors' request buffers of 1 MiB), and a daemon that served them once
/// serves them again without touching new memory (on a VM, memory touched for the first time
/// is also a fault on the host: about 1 GB/s here).
static HALVES: std::sync::Mutex<Vec<Half>> = std::sync::Mutex::new(Vec::new());

/// Puts `n` halves of huge pages (`n` MiB) into the pool, touched already: a daemon that
/// expects large writes on `n` requests at once calls it before it serves, so that the first
/// of them do not each wait for a huge page to be faulted in and zeroed (on this VM a few
/// milliseconds each, many of them at once up to 100 ms: memory the host had taken back).
/// The halves stay in the pool (see [`HALVES`]). Best effort: stops where the kernel refuses
/// a mapping.
pub fn prefault_huge_halves(n: usize) {
    let halves: Vec<AlignedBuf> = (0..n)
        .map_while(|_| AlignedBuf::mapped(HUGE_HALF))
        .collect();
    for b in &halves {
        // One write per small page: faults in the huge page (or each small one where huge
        // pages are off). The bytes stay zero.
        for off in (0..b.len()).step_by(IO_ALIGN) {
            // SAFETY: inside the buffer; a volatile write so that it is not elided.
            unsafe { std::ptr::write_volatile(b.ptr.as_ptr().add(off), 0) };
        }
    }
    let mut pool = HALVES.lock().unwrap_or_else(|e| e.into_inner());
    for b in halves {
        let b = std::mem::ManuallyDrop::new(b);
        pool.push(Half(b.ptr, true));
    }
}

/// A free half of a huge page: from the pool, else one half of a new huge page whose other
/// half goes into the pool.
fn take_half() -> Option<Half> {
    let mut pool = HALVES.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(h) = pool.pop() {
        return Some(h);
    }
    let page = map_huge(HUGE_PAGE)?;
    // SAFETY: `HUGE_HALF` bytes into a mapping of `HUGE_PAGE` bytes.
    pool.push(Half(unsafe { page.add(HUGE_HALF) }, true));
    Some(Half(page, true))
}

/// An anonymous mapping of `size` bytes (a multiple of [`HUGE_PAGE`]) aligned to
/// [`HUGE_PAGE`] and advised `MADV_HUGEPAGE`; `None` if the kernel refused it.
fn map_huge(size: usize) -> Option<NonNull<u8>> {
    let over = size.checked_add(HUGE_PAGE)?;
    // SAFETY: a fresh private anonymous mapping; the kernel picks the address; checked below.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            over,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return None;
    }
    let base = p.cast::<u8>();
    let (head, tail) = huge_trim(base as usize);
    // SAFETY: `head + size + tail == over` (`huge_trim`), so `base + head .. + size` lies
    // inside the `over` bytes mapped; the pieces before and after it are unmapped (each lies
    // inside the mapping and nothing refers to them; an empty one is not unmapped), and the
    // advice covers exactly what is kept.
    unsafe {
        let start = base.add(head);
        if head > 0 {
            libc::munmap(base.cast(), head);
        }
        if tail > 0 {
            libc::munmap(start.add(size).cast(), tail);
        }
        // Advice only: where huge pages are off, small pages back the mapping.
        libc::madvise(start.cast(), size, libc::MADV_HUGEPAGE);
        NonNull::new(start)
    }
}

/// The bytes before and after the [`HUGE_PAGE`]-aligned part of a mapping at `base` of
/// `HUGE_PAGE` more bytes than that part: the first aligned address is `head` bytes in, and
/// `head + tail == HUGE_PAGE`.
fn huge_trim(base: usize) -> (usize, usize) {
    let head = base.next_multiple_of(HUGE_PAGE) - base;
    (head, HUGE_PAGE - head)
}

/// A zero-initialised byte buffer whose start is aligned to [`IO_ALIGN`].
pub struct AlignedBuf {
    /// Its memory (`None` for an empty buffer).
    raw: Option<Backing>,
    /// The aligned start inside it.
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: an `AlignedBuf` owns its allocation exclusively, like a `Vec<u8>`.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared access only reads through `&[u8]`.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// An empty buffer (no allocation).
    pub const fn new() -> Self {
        AlignedBuf {
            raw: None,
            ptr: NonNull::dangling(),
            len: 0,
        }
    }

    /// A buffer of `len` zero bytes. Allocated with `calloc` and aligned inside: a large one
    /// comes as fresh pages the kernel zeroes on first touch, so nothing is written until it is
    /// used (a scratch buffer of 1 MiB per flush thread would otherwise be zeroed by hand).
    pub fn zeroed(len: usize) -> Self {
        Self::zeroed_aligned(len, IO_ALIGN)
    }

    /// [`Self::zeroed`], in huge-page memory from [`HUGE_MIN`] bytes on (see the module
    /// documentation): for a long-lived buffer that large requests go to the device from
    /// (a queue's request buffer). Huge-page memory costs a fault and the zeroing of a whole
    /// huge page the first time it is touched (on this VM about 2 ms, memory the host gets
    /// back first), so a buffer made and dropped per operation stays on the heap.
    pub fn zeroed_contiguous(len: usize) -> Self {
        if len >= HUGE_MIN {
            if let Some(b) = Self::mapped(len) {
                return b;
            }
        }
        Self::zeroed(len)
    }

    /// [`Self::zeroed`] with its start aligned to `align` too (rounded up to a power of two;
    /// never less than [`IO_ALIGN`]).
    pub fn zeroed_aligned(len: usize, align: usize) -> Self {
        let align = align.max(IO_ALIGN).next_power_of_two();
        if len == 0 {
            return Self::new();
        }
        let Some(total) = len.checked_add(align) else {
            handle_alloc_error(Layout::new::<[u8; IO_ALIGN]>());
        };
        // SAFETY: calloc with a non-zero size; the result is checked for null.
        let raw = unsafe { libc::calloc(1, total) }.cast::<u8>();
        let Some(raw) = NonNull::new(raw) else {
            handle_alloc_error(Layout::from_size_align(total, 1).unwrap_or(Layout::new::<u8>()));
        };
        let off = raw.as_ptr().align_offset(align);
        // SAFETY: `off < align`, so `raw + off .. raw + off + len` lies inside the allocation.
        let ptr = unsafe { raw.add(off) };
        AlignedBuf {
            raw: Some(Backing::Heap(raw)),
            ptr,
            len,
        }
    }

    /// A buffer of `len` (at least [`HUGE_MIN`]) zero bytes in huge-page memory: half of a
    /// huge page from the pool of halves for up to [`HUGE_HALF`], else an anonymous mapping of
    /// its own rounded up to whole huge pages; `None` if the kernel refused the mapping (the
    /// caller then takes memory from the heap).
    fn mapped(len: usize) -> Option<Self> {
        if len <= HUGE_HALF {
            let Half(half, untouched) = take_half()?;
            if !untouched {
                // SAFETY: a free half of `HUGE_HALF` bytes, ours until it goes back to the
                // pool; zeroed as `zeroed` promises (untouched memory is zero already).
                unsafe { std::ptr::write_bytes(half.as_ptr(), 0, len) };
            }
            return Some(AlignedBuf {
                raw: Some(Backing::Half),
                ptr: half,
                len,
            });
        }
        let size = len.checked_next_multiple_of(HUGE_PAGE)?;
        let start = map_huge(size)?;
        Some(AlignedBuf {
            raw: Some(Backing::Mapped(size)),
            ptr: start,
            len,
        })
    }

    /// Whether this buffer is in huge-page memory (for the tests).
    #[cfg(test)]
    fn is_huge(&self) -> bool {
        matches!(self.raw, Some(Backing::Mapped(_) | Backing::Half))
    }

    /// This buffer if it holds at least `len` bytes, else a fresh zeroed one of `len` bytes
    /// (scratch contents never matter to the callers, so nothing is copied over).
    pub fn at_least(self, len: usize) -> Self {
        if self.len >= len {
            self
        } else {
            Self::zeroed(len)
        }
    }
}

impl Default for AlignedBuf {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        match self.raw {
            // SAFETY: `raw` came from calloc and is freed once.
            Some(Backing::Heap(raw)) => unsafe { libc::free(raw.as_ptr().cast()) },
            // SAFETY: the mapping of `size` bytes made in `mapped`, unmapped once.
            Some(Backing::Mapped(size)) => unsafe {
                libc::munmap(self.ptr.as_ptr().cast(), size);
            },
            Some(Backing::Half) => HALVES
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(Half(self.ptr, false)),
            None => {}
        }
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        // SAFETY: `ptr` is valid for `len` initialised bytes (or dangling with `len` 0).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`, and `&mut self` makes the access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

/// A copy in memory of its own (on the heap, aligned like [`AlignedBuf::zeroed`]): what
/// `Arc::make_mut` makes when a buffer it must change is shared (the folio cache's memory of a
/// folio while a writeback writes from it).
impl Clone for AlignedBuf {
    fn clone(&self) -> Self {
        let mut copy = Self::zeroed(self.len);
        copy.copy_from_slice(self);
        copy
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlignedBuf")
            .field("len", &self.len)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_huge_mapping_keeps_exactly_its_aligned_part() {
        for (base, head) in [
            (HUGE_PAGE, 0),
            (HUGE_PAGE + 4096, HUGE_PAGE - 4096),
            (7 * HUGE_PAGE - 4096, 4096),
            (3 * HUGE_PAGE + HUGE_HALF, HUGE_HALF),
        ] {
            let (h, t) = huge_trim(base);
            assert_eq!((h, t), (head, HUGE_PAGE - head), "base {base:#x}");
            assert_eq!((base + h) % HUGE_PAGE, 0);
        }
        let b = AlignedBuf::zeroed_contiguous(HUGE_MIN);
        assert_eq!(
            format!("{b:?}"),
            format!("AlignedBuf {{ len: {HUGE_MIN} }}")
        );
    }

    /// Serializes the tests that take halves from the pool and look at which they got.
    static POOL_TESTS: std::sync::Mutex<()> = std::sync::Mutex::new(());

    /// Whether every page of `len` bytes at `p` is resident (`mincore`).
    fn resident(p: *const u8, len: usize) -> bool {
        let mut v = vec![0u8; len.div_ceil(IO_ALIGN)];
        // SAFETY: a page-aligned range of mapped memory; `v` has a byte per page.
        let r = unsafe { libc::mincore(p as *mut libc::c_void, len, v.as_mut_ptr()) };
        assert_eq!(r, 0, "mincore: {}", std::io::Error::last_os_error());
        v.iter().all(|&b| b & 1 == 1)
    }

    #[test]
    fn prefaulted_halves_are_resident_zero_and_handed_out_first() {
        let _one = POOL_TESTS.lock().unwrap_or_else(|e| e.into_inner());
        // Halves used before are resident anyway: start from new ones (the old ones leak).
        HALVES.lock().unwrap().clear();
        prefault_huge_halves(3);
        let bufs: Vec<AlignedBuf> = (0..3)
            .map(|_| AlignedBuf::zeroed_contiguous(HUGE_MIN))
            .collect();
        for b in &bufs {
            assert!(b.is_huge());
            assert!(
                resident(b.as_ptr(), b.len()),
                "a prefaulted half is not resident"
            );
            assert!(b.iter().all(|&x| x == 0));
        }
    }

    #[test]
    fn large_buffers_are_huge_page_aligned_zeroed_even_when_reused_and_halves_come_back() {
        let _one = POOL_TESTS.lock().unwrap_or_else(|e| e.into_inner());
        // A 1 MiB buffer is half of a huge page (physically contiguous where huge pages are
        // on), a larger one whole huge pages; both read as zeros, also after a dirty half went
        // back to the pool and is handed out again.
        let mut bufs: Vec<AlignedBuf> = (0..3)
            .map(|_| AlignedBuf::zeroed_contiguous(HUGE_MIN))
            .collect();
        for b in &mut bufs {
            assert!(b.is_huge());
            assert_eq!(b.as_ptr() as usize % HUGE_HALF, 0);
            assert!(b.iter().all(|&x| x == 0));
            b.fill(0xee);
        }
        let small = AlignedBuf::zeroed_contiguous(HUGE_MIN - 4096);
        assert!(!small.is_huge());
        assert!(
            !AlignedBuf::zeroed(HUGE_MIN).is_huge(),
            "a scratch buffer went huge"
        );
        let addrs: Vec<usize> = bufs.iter().map(|b| b.as_ptr() as usize).collect();
        drop(bufs);
        // (Other tests may take halves meanwhile: look for ours among several.)
        let again: Vec<AlignedBuf> = (0..8)
            .map(|_| AlignedBuf::zeroed_contiguous(HUGE_MIN))
            .collect();
        assert!(
            again.iter().any(|b| addrs.contains(&(b.as_ptr() as usize))),
            "no half came back from the pool"
        );
        for b in &again {
            assert!(b.iter().all(|&x| x == 0), "a reused half was not zeroed");
        }
        let big = AlignedBuf::zeroed_contiguous(HUGE_PAGE + 1);
        assert!(big.is_huge());
        assert_eq!(big.as_ptr() as usize % HUGE_PAGE, 0);
        assert_eq!(big.len(), HUGE_PAGE + 1);
        assert!(big.iter().all(|&x| x == 0));
    }

    #[test]
    fn a_buffer_starts_page_aligned_zeroed_and_is_reused_only_when_large_enough() {
        for len in [1usize, 511, 4096, 65_537, 1 << 20] {
            let b = AlignedBuf::zeroed(len);
            assert_eq!(b.as_ptr() as usize % IO_ALIGN, 0, "len {len}");
            assert_eq!(b.len(), len);
            assert!(b.iter().all(|&x| x == 0));
        }
        let mut b = AlignedBuf::zeroed(8192);
        b[100] = 7;
        let p = b.as_ptr();
        let b = b.at_least(4096);
        assert_eq!(
            (b.as_ptr(), b[100]),
            (p, 7),
            "a large enough buffer was replaced"
        );
        let b = b.at_least(8193);
        assert_eq!(b.len(), 8193);
        assert_eq!(b.as_ptr() as usize % IO_ALIGN, 0);
        let big = AlignedBuf::zeroed_aligned(100, 3 * IO_ALIGN);
        assert_eq!(big.as_ptr() as usize % (4 * IO_ALIGN), 0);
        assert!(AlignedBuf::new().is_empty());
        assert!(AlignedBuf::zeroed(0).is_empty());
    }
}
