//! Read-ahead windows of an NBD export: recently fetched (or being fetched) ranges that serve
//! sequential reads without a command each.
//!
//! - A stream of reads each starting within [`SEQ_SLACK`] of where the previous one ended is
//!   sequential from its third read on; such a read smaller than the window size makes its
//!   thread fetch one window (`Step::FetchWindow`) starting at the read.
//! - A read inside a window is copied from it; once a read passes the middle of a window, the
//!   next window is fetched in the background (the device's prefetch thread), so a sequential
//!   reader finds it ready.
//! - A read inside a window still being fetched waits for it (until the request's deadline),
//!   so concurrent readers of one stream never fetch the same bytes twice.
//! - At most [`SLOTS`] windows are kept; the oldest finished one is dropped first. A failed
//!   fetch removes its window and wakes its waiters, which then read by themselves (and get
//!   the error themselves if the server is still failing).
//!
//! The export is read-only, so a window never goes stale.
//!
//! Locking model: one mutex over the windows and the stream state, held only to look up,
//! add, fill or drop a window (never across I/O), and one condvar for waiters of a window
//! being fetched.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

/// How far from the previous read's end a read still counts as sequential.
pub(crate) const SEQ_SLACK: u64 = 256 << 10;
/// Windows kept at once.
pub(crate) const SLOTS: usize = 8;

struct Window {
    off: u64,
    len: u64,
    /// `None` while being fetched.
    data: Option<Arc<Vec<u8>>>,
}

struct State {
    next: u64,
    streak: u32,
    windows: VecDeque<Window>,
}

/// What a read does after asking the read-ahead state.
pub(crate) enum Step {
    /// Copied from a window; fetch the given next window in the background if `Some`.
    Served(Option<(u64, u64)>),
    /// Fetch this window (it is registered as being fetched) and then call `install`.
    FetchWindow(u64, u64),
    /// Read directly.
    Direct,
}

pub(crate) struct ReadAhead {
    window: u64,
    st: Mutex<State>,
    cv: Condvar,
    /// Readers waiting for a window (tests use it to run a racing reader exactly while a
    /// window's I/O is in flight).
    waiters: std::sync::atomic::AtomicUsize,
}

impl ReadAhead {
    pub(crate) fn new(window: usize) -> ReadAhead {
        ReadAhead {
            window: window as u64,
            st: Mutex::new(State {
                next: u64::MAX,
                streak: 0,
                windows: VecDeque::new(),
            }),
            cv: Condvar::new(),
            waiters: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    #[cfg(test)]
    fn cv_waiters_for_test(&self) -> usize {
        self.waiters.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.st.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers the window after `(off, len)` as being fetched, if there is room in the
    /// export and no window starts there yet.
    fn claim_next(&self, st: &mut State, off: u64, len: u64, size: u64) -> Option<(u64, u64)> {
        let next = off + len;
        if next >= size || st.windows.iter().any(|w| w.off == next) {
            return None;
        }
        let l = self.window.min(size - next);
        push(st, next, l);
        Some((next, l))
    }

    /// Serves `buf` at `offset` from a window, or says how to read it (see [`Step`]).
    pub(crate) fn serve(&self, buf: &mut [u8], offset: u64, size: u64, deadline: Instant) -> Step {
        if self.window == 0 {
            return Step::Direct;
        }
        let len = buf.len() as u64;
        let mut st = self.lock();
        while let Some(i) = st
            .windows
            .iter()
            .position(|w| offset >= w.off && offset + len <= w.off + w.len)
        {
            let (woff, wlen) = (st.windows[i].off, st.windows[i].len);
            match st.windows[i].data.clone() {
                Some(d) => {
                    let s = (offset - woff) as usize;
                    buf.copy_from_slice(&d[s..s + buf.len()]);
                    st.next = offset + len;
                    let next = if offset + len > woff + wlen / 2 {
                        self.claim_next(&mut st, woff, wlen, size)
                    } else {
                        None
                    };
                    return Step::Served(next);
                }
                None => {
                    let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                        return Step::Direct;
                    };
                    self.waiters
                        .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    st = self
                        .cv
                        .wait_timeout(st, left)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                    self.waiters
                        .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                }
            }
        }
        let seq = st.next != u64::MAX && offset.abs_diff(st.next) <= SEQ_SLACK;
        st.streak = if seq { st.streak.saturating_add(1) } else { 0 };
        st.next = offset + len;
        if st.streak >= 2 && len < self.window {
            let wl = self.window.min(size - offset);
            if wl > len {
                push(&mut st, offset, wl);
                return Step::FetchWindow(offset, wl);
            }
        }
        Step::Direct
    }

    /// [`ReadAhead::install`] without claiming the next window (for background fetches).
    pub(crate) fn install_only(&self, off: u64, data: Option<Vec<u8>>) {
        self.install_inner(off, data, None);
    }

    /// Fills (or, on failure, drops) the window being fetched at `off`, wakes its waiters, and
    /// on success claims the window after it for the background fetch.
    pub(crate) fn install(&self, off: u64, data: Option<Vec<u8>>, size: u64) -> Option<(u64, u64)> {
        self.install_inner(off, data, Some(size))
    }

    fn install_inner(
        &self,
        off: u64,
        data: Option<Vec<u8>>,
        size: Option<u64>,
    ) -> Option<(u64, u64)> {
        let mut st = self.lock();
        let pos = st
            .windows
            .iter()
            .position(|w| w.off == off && w.data.is_none());
        let mut next = None;
        if let Some(i) = pos {
            match data {
                Some(d) => {
                    let len = st.windows[i].len;
                    st.windows[i].data = Some(Arc::new(d));
                    if let Some(size) = size {
                        next = self.claim_next(&mut st, off, len, size);
                    }
                }
                None => {
                    st.windows.remove(i);
                }
            }
        }
        drop(st);
        self.cv.notify_all();
        next
    }
}

/// Adds a window being fetched, dropping the oldest finished one when all slots are used (a
/// window being fetched is never dropped here: its waiters expect `install` to wake them; there
/// are at most as many as readers plus one background fetch).
fn push(st: &mut State, off: u64, len: u64) {
    if st.windows.len() >= SLOTS {
        if let Some(victim) = st.windows.iter().position(|w| w.data.is_some()) {
            st.windows.remove(victim);
        }
    }
    st.windows.push_back(Window {
        off,
        len,
        data: None,
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const SIZE: u64 = 64 << 20;

    fn far() -> Instant {
        Instant::now() + Duration::from_secs(10)
    }

    /// Makes `ra` see a sequential stream ending at `end` (two reads), so the next read at
    /// `end` starts a window.
    fn prime(ra: &ReadAhead, end: u64) {
        let mut b = [0u8; 4096];
        for off in [end - 8192, end - 4096] {
            assert!(matches!(ra.serve(&mut b, off, SIZE, far()), Step::Direct));
        }
    }

    #[test]
    fn a_reader_inside_a_window_being_fetched_waits_for_it_instead_of_fetching_again() {
        let ra = ReadAhead::new(1 << 20);
        prime(&ra, 1 << 20);
        let mut b = [0u8; 4096];
        let Step::FetchWindow(off, len) = ra.serve(&mut b, 1 << 20, SIZE, far()) else {
            panic!("the third sequential read fetches a window");
        };
        assert_eq!((off, len), (1 << 20, 1 << 20));
        std::thread::scope(|s| {
            // The racing read runs exactly while the window's I/O is in flight.
            let waiter = s.spawn(|| {
                let mut b = [0u8; 4096];
                let step = ra.serve(&mut b, (1 << 20) + 8192, SIZE, far());
                (matches!(step, Step::Served(_)), b)
            });
            while ra.cv_waiters_for_test() == 0 {
                std::thread::yield_now();
            }
            let data: Vec<u8> = (0..len).map(|i| (i / 4096) as u8).collect();
            let next = ra.install(off, Some(data), SIZE);
            assert_eq!(next, Some((2 << 20, 1 << 20)), "the next window is claimed");
            let (served, b) = waiter.join().unwrap();
            assert!(served, "the waiter is served from the window");
            assert_eq!(b, [2u8; 4096], "with the window's bytes at its offset");
        });
    }

    #[test]
    fn a_failed_window_wakes_its_waiters_who_then_read_by_themselves() {
        let ra = ReadAhead::new(1 << 20);
        prime(&ra, 1 << 20);
        let mut b = [0u8; 4096];
        let Step::FetchWindow(off, _) = ra.serve(&mut b, 1 << 20, SIZE, far()) else {
            panic!("window expected");
        };
        std::thread::scope(|s| {
            let waiter = s.spawn(|| {
                let mut b = [0u8; 4096];
                matches!(
                    ra.serve(&mut b, (1 << 20) + 4096, SIZE, far()),
                    Step::Direct | Step::FetchWindow(..)
                )
            });
            while ra.cv_waiters_for_test() == 0 {
                std::thread::yield_now();
            }
            assert_eq!(ra.install(off, None, SIZE), None);
            assert!(
                waiter.join().unwrap(),
                "the waiter reads by itself, never from a failed window"
            );
        });
    }

    #[test]
    fn a_waiter_gives_up_at_its_deadline() {
        let ra = ReadAhead::new(1 << 20);
        prime(&ra, 1 << 20);
        let mut b = [0u8; 4096];
        assert!(matches!(
            ra.serve(&mut b, 1 << 20, SIZE, far()),
            Step::FetchWindow(..)
        ));
        let t0 = Instant::now();
        let step = ra.serve(
            &mut b,
            (1 << 20) + 4096,
            SIZE,
            Instant::now() + Duration::from_millis(100),
        );
        assert!(matches!(step, Step::Direct));
        assert!(t0.elapsed() < Duration::from_secs(2));
    }

    #[test]
    fn random_reads_never_start_windows() {
        let ra = ReadAhead::new(1 << 20);
        let mut b = [0u8; 4096];
        for i in 0..100u64 {
            let off = (i * 7_919 * 4096) % (SIZE - 4096);
            assert!(
                matches!(ra.serve(&mut b, off, SIZE, far()), Step::Direct),
                "{off}"
            );
        }
    }
}
