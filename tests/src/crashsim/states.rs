//! Crash states from a recorded log: the file at every sync boundary, prefixes, random
//! subsets and torn versions of the writes in flight between two syncs.

use super::*;
use std::sync::Arc;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// A recorded log: the durable bytes when recording started, and every event since.
#[derive(Debug, Clone)]
pub struct CrashLog {
    /// The file's bytes at the start of the log (durable).
    pub initial: Arc<Vec<u8>>,
    /// The events in order.
    pub events: Vec<Event>,
}

/// How a crash state was built, for failure messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StateKind {
    /// Exactly the file as of a sync (or the start).
    SyncBoundary,
    /// The boundary plus the first `n` events of the in-flight window.
    Prefix(usize),
    /// The boundary plus a random subset of the window's events, in log order.
    Subset(usize),
    /// The boundary plus a random subset of the window's events, each write torn into 4 KiB
    /// sectors of which a random subset landed.
    Torn(usize),
}

/// One crash state: the host file's bytes after a simulated power loss.
#[derive(Debug, Clone)]
pub struct CrashState {
    /// The bytes.
    pub bytes: Vec<u8>,
    /// Every event before this log position is fully in `bytes` (it is just after a sync).
    pub durable_pos: usize,
    /// No event at or after this position is in `bytes`.
    pub window_end: usize,
    /// How it was made.
    pub kind: StateKind,
}

impl CrashLog {
    /// The file after applying the first `upto` events.
    pub fn apply_prefix(&self, upto: usize) -> Vec<u8> {
        let mut b = (*self.initial).clone();
        for e in self.events.iter().take(upto) {
            apply_event(&mut b, e);
        }
        b
    }

    /// Number of sync events.
    pub fn syncs(&self) -> usize {
        self.events
            .iter()
            .filter(|e| matches!(e, Event::Sync))
            .count()
    }

    /// Number of write events.
    pub fn writes(&self) -> usize {
        self.events
            .iter()
            .filter(|e| matches!(e, Event::Write { .. }))
            .count()
    }
}

pub(super) fn apply_event(b: &mut Vec<u8>, e: &Event) {
    match e {
        Event::Write { offset, data } => apply_write(b, *offset, data),
        Event::SetLen(l) => b.resize(*l as usize, 0),
        Event::Sync => {}
    }
}

/// Applies the parts of `data` (written at `offset`) that fall into the 4 KiB sectors selected by
/// `keep(sector_index_within_write)`.
pub(super) fn apply_torn(
    b: &mut Vec<u8>,
    offset: u64,
    data: &[u8],
    keep: &mut dyn FnMut(usize) -> bool,
) {
    let end = offset + data.len() as u64;
    let mut pos = offset;
    let mut idx = 0;
    while pos < end {
        let next = ((pos / TEAR_SECTOR) + 1) * TEAR_SECTOR;
        let piece_end = next.min(end);
        if keep(idx) {
            let s = (pos - offset) as usize;
            let e = (piece_end - offset) as usize;
            apply_write(b, pos, &data[s..e]);
        }
        idx += 1;
        pos = piece_end;
    }
}

/// How many states of each kind [`crash_states`] makes per in-flight window.
#[derive(Debug, Clone, Copy)]
pub struct StateBudget {
    /// Prefix states per window (all of them if the window is shorter).
    pub prefixes: usize,
    /// Random-subset states per window.
    pub subsets: usize,
    /// Torn-write states per window.
    pub torn: usize,
}

impl Default for StateBudget {
    fn default() -> Self {
        StateBudget {
            prefixes: 6,
            subsets: 4,
            torn: 4,
        }
    }
}

/// Generates crash states from `log` and hands each to `visit`; stops early when `visit` returns
/// `false`. Returns the number of states visited. Windows are visited in log order; within a
/// window, the sync boundary first, then prefixes (evenly spread, always including the full
/// window), subsets and torn states.
pub fn crash_states(
    log: &CrashLog,
    budget: StateBudget,
    seed: u64,
    visit: &mut dyn FnMut(CrashState) -> bool,
) -> usize {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut base = (*log.initial).clone();
    let mut start = 0usize;
    let mut count = 0usize;
    loop {
        let end = log.events[start..]
            .iter()
            .position(|e| matches!(e, Event::Sync))
            .map_or(log.events.len(), |i| start + i);
        let window = &log.events[start..end];
        let n = window.len();
        count += 1;
        if !visit(CrashState {
            bytes: base.clone(),
            durable_pos: start,
            window_end: end,
            kind: StateKind::SyncBoundary,
        }) {
            return count;
        }
        if n > 0 {
            // Prefixes: spread over 1..=n, always including n.
            let want = budget.prefixes.min(n);
            let mut lens: Vec<usize> = (1..=want).map(|i| (i * n).div_ceil(want)).collect();
            lens.dedup();
            let mut cur = base.clone();
            let mut applied = 0;
            for l in lens {
                while applied < l {
                    apply_event(&mut cur, &window[applied]);
                    applied += 1;
                }
                count += 1;
                if !visit(CrashState {
                    bytes: cur.clone(),
                    durable_pos: start,
                    window_end: end,
                    kind: StateKind::Prefix(l),
                }) {
                    return count;
                }
            }
            if n > 1 {
                for _ in 0..budget.subsets {
                    let mut b = base.clone();
                    let mut k = 0;
                    for e in window {
                        if rng.random_bool(0.5) {
                            apply_event(&mut b, e);
                            k += 1;
                        }
                    }
                    count += 1;
                    if !visit(CrashState {
                        bytes: b,
                        durable_pos: start,
                        window_end: end,
                        kind: StateKind::Subset(k),
                    }) {
                        return count;
                    }
                }
            }
            let has_write = window.iter().any(|e| matches!(e, Event::Write { .. }));
            if has_write {
                for _ in 0..budget.torn {
                    let mut b = base.clone();
                    let mut k = 0;
                    for e in window {
                        match e {
                            Event::Write { offset, data } => {
                                if rng.random_bool(0.7) {
                                    k += 1;
                                    apply_torn(&mut b, *offset, data, &mut |_| {
                                        rng.random_bool(0.5)
                                    });
                                }
                            }
                            other => {
                                if rng.random_bool(0.5) {
                                    apply_event(&mut b, other);
                                }
                            }
                        }
                    }
                    count += 1;
                    if !visit(CrashState {
                        bytes: b,
                        durable_pos: start,
                        window_end: end,
                        kind: StateKind::Torn(k),
                    }) {
                        return count;
                    }
                }
            }
        }
        if end >= log.events.len() {
            return count;
        }
        for e in window {
            apply_event(&mut base, e);
        }
        start = end + 1;
    }
}
