//! The request pause gate: lets a live snapshot stop guest requests at a request boundary.
//!
//! Every guest request enters the gate ([`PauseGate::enter`]) before it touches the disk and
//! leaves it when its status is known. [`PauseGate::pause`] stops new requests from entering,
//! waits until every request inside has left, and keeps the gate closed until its guard is
//! dropped. Requests that arrive meanwhile wait in `enter` (their queue thread blocks, the
//! descriptors stay on the available ring or in the popped batch), and run on resume.
//!
//! Locking model: the fast path is one atomic (`state`: bit 63 = paused, low bits = requests
//! inside). Waiting uses `mutex`/`cv`: a request that finds the gate paused waits on `cv` until
//! it opens; the pauser waits on `cv` until the count is zero. A request that leaves as the last
//! one while paused takes `mutex` before notifying, and the pauser checks the count under
//! `mutex`, so no wake-up is lost. Pausers are serialised by `pausers` (held by the guard).
//! The gate is a leaf: nothing is locked inside it except `mutex`, never held across I/O.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

const PAUSED: u64 = 1 << 63;
const COUNT: u64 = PAUSED - 1;

/// See the module documentation.
#[derive(Debug, Default)]
pub struct PauseGate {
    state: AtomicU64,
    mutex: Mutex<()>,
    cv: Condvar,
    pausers: Mutex<()>,
}

/// A request inside the gate; leaves it when dropped.
#[derive(Debug)]
pub struct Entered<'a> {
    gate: &'a PauseGate,
}

/// The gate held closed with no request inside; reopens it when dropped.
#[derive(Debug)]
pub struct Paused<'a> {
    gate: &'a PauseGate,
    _serial: MutexGuard<'a, ()>,
    /// How long it took until every request inside had left.
    pub drain_time: Duration,
}

fn lock(m: &Mutex<()>) -> MutexGuard<'_, ()> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl PauseGate {
    /// An open gate.
    pub fn new() -> Self {
        Self::default()
    }

    /// Enters the gate, waiting while it is paused.
    pub fn enter(&self) -> Entered<'_> {
        let mut s = self.state.load(Ordering::Acquire);
        loop {
            if s & PAUSED != 0 {
                let mut g = lock(&self.mutex);
                while self.state.load(Ordering::Acquire) & PAUSED != 0 {
                    g = self.cv.wait(g).unwrap_or_else(|e| e.into_inner());
                }
                drop(g);
                s = self.state.load(Ordering::Acquire);
                continue;
            }
            match self
                .state
                .compare_exchange_weak(s, s + 1, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return Entered { gate: self },
                Err(now) => s = now,
            }
        }
    }

    /// Requests inside the gate now.
    pub fn inside(&self) -> u64 {
        self.state.load(Ordering::Acquire) & COUNT
    }

    /// Whether the gate is paused.
    pub fn is_paused(&self) -> bool {
        self.state.load(Ordering::Acquire) & PAUSED != 0
    }

    /// Closes the gate and waits until no request is inside.
    pub fn pause(&self) -> Paused<'_> {
        let serial = lock(&self.pausers);
        let start = Instant::now();
        self.state.fetch_or(PAUSED, Ordering::AcqRel);
        let mut g = lock(&self.mutex);
        while self.state.load(Ordering::Acquire) & COUNT != 0 {
            g = self.cv.wait(g).unwrap_or_else(|e| e.into_inner());
        }
        drop(g);
        Paused {
            gate: self,
            _serial: serial,
            drain_time: start.elapsed(),
        }
    }
}

impl Drop for Entered<'_> {
    fn drop(&mut self) {
        let prev = self.gate.state.fetch_sub(1, Ordering::AcqRel);
        if prev & PAUSED != 0 && prev & COUNT == 1 {
            let _g = lock(&self.gate.mutex);
            self.gate.cv.notify_all();
        }
    }
}

impl Drop for Paused<'_> {
    fn drop(&mut self) {
        let _g = lock(&self.gate.mutex);
        self.gate.state.fetch_and(!PAUSED, Ordering::AcqRel);
        self.gate.cv.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use std::sync::{mpsc, Arc};

    #[test]
    fn pause_waits_for_requests_inside_and_holds_new_ones_until_resume() {
        let gate = Arc::new(PauseGate::new());
        let inside = gate.enter();
        let (ptx, prx) = mpsc::channel();
        let pauser = {
            let gate = gate.clone();
            std::thread::spawn(move || {
                let p = gate.pause();
                ptx.send(()).unwrap();
                // Hold the pause until told.
                std::thread::sleep(Duration::from_millis(100));
                drop(p);
            })
        };
        assert!(
            prx.recv_timeout(Duration::from_millis(100)).is_err(),
            "paused with a request inside"
        );
        // Wait until the pauser has closed the gate.
        while !gate.is_paused() {
            std::thread::yield_now();
        }
        let entered_late = Arc::new(AtomicBool::new(false));
        let late = {
            let gate = gate.clone();
            let flag = entered_late.clone();
            std::thread::spawn(move || {
                let _e = gate.enter();
                flag.store(true, Ordering::SeqCst);
            })
        };
        std::thread::sleep(Duration::from_millis(20));
        assert!(
            !entered_late.load(Ordering::SeqCst),
            "entered a closing gate"
        );
        drop(inside);
        prx.recv().unwrap();
        assert!(
            !entered_late.load(Ordering::SeqCst),
            "entered a paused gate"
        );
        pauser.join().unwrap();
        late.join().unwrap();
        assert!(entered_late.load(Ordering::SeqCst));
        assert_eq!(gate.inside(), 0);
        assert!(!gate.is_paused());
    }

    #[test]
    fn pause_of_an_idle_gate_is_immediate_and_pausers_are_serialised() {
        let gate = PauseGate::new();
        let p = gate.pause();
        assert!(gate.is_paused());
        drop(p);
        let p = gate.pause();
        drop(p);
        let _e = gate.enter();
        assert_eq!(gate.inside(), 1);
    }
}
