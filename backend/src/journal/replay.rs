//! What a replay applies: every record of the journal in sequence order, less what a later
//! marker ([`Kind::Persisted`]) covers (the file holds newer bytes there, written in place).
//! No locking: a replay runs at open, before the journal serves.

use std::collections::BTreeMap;
use std::io;

use blockdev::{BlockDev, BlockError, Result};

use super::format::{Kind, Record};

/// For each record (in sequence order), the pieces `(offset, len)` of its range that no later
/// marker ([`Kind::Persisted`]) covers: what its replay still applies. A marker's own pieces
/// are empty. Later records of other kinds cover nothing: they are replayed after it anyway.
/// A segment may hold over a million markers: each record costs a logarithmic lookup.
pub(super) fn uncovered(records: &[Record]) -> Vec<Vec<(u64, u64)>> {
    // Ranges written in place by the markers seen so far (walking back from the newest),
    // disjoint and merged: start -> end.
    let mut covered: BTreeMap<u64, u64> = BTreeMap::new();
    let mut out = vec![Vec::new(); records.len()];
    for (i, r) in records.iter().enumerate().rev() {
        let (start, end) = (r.offset, r.offset.saturating_add(r.len));
        if start >= end {
            continue;
        }
        if r.kind == Kind::Persisted {
            cover(&mut covered, start, end);
            continue;
        }
        // The covered ranges that may overlap: from the last one starting at or before `start`.
        let first = covered
            .range(..=start)
            .next_back()
            .map_or(start, |(&a, _)| a);
        let mut pos = start;
        for (&a, &b) in covered.range(first..end) {
            if b <= pos {
                continue;
            }
            if a > pos {
                out[i].push((pos, a - pos));
            }
            pos = b;
            if pos >= end {
                break;
            }
        }
        if pos < end {
            out[i].push((pos, end - pos));
        }
    }
    out
}

/// Adds `[start, end)` to the disjoint ranges `covered`, merging those it touches.
pub(super) fn cover(covered: &mut BTreeMap<u64, u64>, mut start: u64, mut end: u64) {
    if let Some((&a, &b)) = covered.range(..=start).next_back() {
        if b >= start {
            covered.remove(&a);
            start = a;
            end = end.max(b);
        }
    }
    let inside: Vec<u64> = covered.range(start..=end).map(|(&a, _)| a).collect();
    for a in inside {
        if let Some(b) = covered.remove(&a) {
            end = end.max(b);
        }
    }
    covered.insert(start, end);
}

/// Replays the `pieces` of record `r` (see [`uncovered`]); returns the write bytes applied.
pub(super) fn apply(dev: &dyn BlockDev, r: &Record, pieces: &[(u64, u64)]) -> Result<u64> {
    let mut bytes = 0;
    for &(off, len) in pieces {
        match r.kind {
            Kind::Write => {
                let at = usize::try_from(off - r.offset).unwrap_or(usize::MAX);
                let n = usize::try_from(len).unwrap_or(usize::MAX);
                let data = at
                    .checked_add(n)
                    .and_then(|e| r.data.get(at..e))
                    .ok_or_else(|| BlockError::Io(io::Error::other("record piece out of range")))?;
                dev.write_at(data, off)?;
                bytes += len;
            }
            Kind::Discard => dev.discard(off, len)?,
            Kind::Zeroes => dev.write_zeroes(off, len, false)?,
            Kind::ZeroesUnmap => dev.write_zeroes(off, len, true)?,
            Kind::Persisted => {}
        }
    }
    Ok(bytes)
}
