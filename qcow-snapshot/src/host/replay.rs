//! [`ReplayHost`]: a host file that survives a failed `fdatasync` honestly. It keeps every write
//! since the last successful sync, replays them when a sync fails, and poisons the file (every
//! later write and sync fails with EIO) when it cannot prove durability. On an O_DIRECT file
//! ([`HostFile::failed_sync_drops_writes`] says no) there is nothing to replay: each write
//! reached the device or failed by itself, so writes pass through uncopied and a failed sync is
//! reported as it is and retried by the next one. On a buffered file whose large aligned writes
//! go with O_DIRECT ([`HostFile::writes_directly`]) those are not copied either; once one is in
//! the file, the kept older writes lose the bytes it covers, so a replay never puts them back
//! over it.
//!
//! Locking model: reads and writes hold `io` shared (writes while they write and journal); a
//! failed sync holds it exclusively while it replays, so no read sees the file half-replayed;
//! `syncs` serializes syncs; `journal` is a leaf lock (its condvar `landed` is where a change
//! waits for the overlapping changes issued before it).
//!
//! Replay ordering: two overlapping changes are never in flight at once. A change takes a ticket
//! in the journal before it touches the file and waits until every change with an earlier
//! ticket that overlaps it has reached the file *and* been journaled; it is journaled before the
//! next overlapping one may start. So for every byte, the journal order of the changes that wrote
//! it is the order in which they reached the file, and replaying the journal in order rebuilds
//! exactly the content readers saw. (Concurrent overlapping `pwrite`s have no order at all - with
//! O_DIRECT they may even interleave page by page - so serializing them is the only way a replay
//! can be exact.) `set_len` overlaps everything; a direct write takes its ticket like any change,
//! and the direct writes of a batch to sync ([`HostFile::write_batch_to_sync`]) take theirs
//! together, as consecutive tickets (see `take_tickets`).
//! The replay itself writes each byte once, with the bytes of the newest change that wrote it
//! (the same final content, see `newest_pieces`): a planned read ([`HostFile::plan_source`]),
//! which the caller executes without taking `io`, never sees an older write put back for a
//! moment. Only while a `set_len` is kept does the replay go change by change, in order.

use std::collections::{BTreeMap, VecDeque};
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, RwLock};

use super::HostFile;

/// Most bytes of unsynced writes a [`ReplayHost`] keeps for replay. Past this, a failed sync
/// poisons the file instead of replaying (like QEMU's file-posix does after any failure).
pub const REPLAY_LIMIT_BYTES: usize = 64 << 20;

/// One journaled file change.
#[derive(Debug)]
pub(super) enum Change {
    Write { offset: u64, data: Box<[u8]> },
    SetLen(u64),
}

impl Change {
    /// The file bytes `[start, end)` the change may alter (`set_len`: all of them).
    fn span(&self) -> (u64, u64) {
        match self {
            Change::Write { offset, data } => (*offset, offset.saturating_add(data.len() as u64)),
            Change::SetLen(_) => (0, u64::MAX),
        }
    }
}

/// A change between its ticket and its journal entry (it may be in the file already).
#[derive(Debug)]
struct InFlight {
    ticket: u64,
    start: u64,
    end: u64,
}

/// The changes since the last successful sync, numbered in the order they were journaled (which,
/// for overlapping changes, is the order they reached the file), plus the changes in flight.
#[derive(Debug, Default)]
pub(super) struct Journal {
    pub(super) changes: VecDeque<(u64, Change)>,
    pub(super) bytes: usize,
    next_seq: u64,
    /// Changes up to this sequence number were not kept (the limit was reached).
    pub(super) dropped_through: Option<u64>,
    /// Changes that took a ticket and are not journaled yet, in ticket order.
    in_flight: Vec<InFlight>,
    next_ticket: u64,
}

impl Journal {
    /// Nothing to replay: no change kept and none dropped since the last good sync.
    fn is_empty(&self) -> bool {
        self.changes.is_empty() && self.dropped_through.is_none()
    }

    /// Whether a `set_len` is kept: replaying it could cut off bytes only the file holds.
    fn has_set_len(&self) -> bool {
        self.changes
            .iter()
            .any(|(_, c)| matches!(c, Change::SetLen(_)))
    }

    /// Removes the bytes `[start, end)` from every kept write: a newer write that the file
    /// holds without a journal copy (a direct write) covers them, so a replay must not put the
    /// older bytes back over it. A kept write split in two keeps its sequence number.
    fn clip(&mut self, start: u64, end: u64) {
        if !self.changes.iter().any(|(_, c)| {
            let (a, b) = c.span();
            matches!(c, Change::Write { .. }) && a < end && start < b
        }) {
            return;
        }
        let old = std::mem::take(&mut self.changes);
        for (seq, c) in old {
            let Change::Write { offset, data } = c else {
                self.changes.push_back((seq, c));
                continue;
            };
            let (a, b) = (offset, offset.saturating_add(data.len() as u64));
            if b <= start || end <= a {
                self.changes
                    .push_back((seq, Change::Write { offset, data }));
                continue;
            }
            self.bytes -= data.len();
            if a < start {
                let keep: Box<[u8]> = data[..(start - a) as usize].into();
                self.bytes += keep.len();
                self.changes.push_back((
                    seq,
                    Change::Write {
                        offset: a,
                        data: keep,
                    },
                ));
            }
            if end < b {
                let keep: Box<[u8]> = data[(end - a) as usize..].into();
                self.bytes += keep.len();
                self.changes.push_back((
                    seq,
                    Change::Write {
                        offset: end,
                        data: keep,
                    },
                ));
            }
        }
    }

    /// Journals a direct write of `buf` at `offset` that is in the file: it clips the kept
    /// writes it covers, or, while a `set_len` is kept (whose replay could cut the file below
    /// it), is kept as a copy.
    fn record_direct(&mut self, buf: &[u8], offset: u64) {
        if self.has_set_len() {
            self.push(Change::Write {
                offset,
                data: buf.into(),
            });
        } else {
            self.clip(offset, offset.saturating_add(buf.len() as u64));
        }
    }

    fn push(&mut self, change: Change) {
        let len = match &change {
            Change::Write { data, .. } => data.len(),
            Change::SetLen(_) => 0,
        };
        if self.dropped_through.is_some() || self.bytes + len > REPLAY_LIMIT_BYTES {
            self.push_dropped();
            return;
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.bytes += len;
        self.changes.push_back((seq, change));
    }

    /// Counts a change that is not kept: keeping only part of the changes could replay an
    /// incomplete state, so everything kept is dropped and a failed sync poisons until a
    /// sync that started after this change succeeds.
    fn push_dropped(&mut self) {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.changes.clear();
        self.bytes = 0;
        self.dropped_through = Some(seq);
    }

    /// Whether a change issued earlier than `ticket` and overlapping `[start, end)` is in flight.
    fn earlier_overlap(&self, ticket: u64, start: u64, end: u64) -> bool {
        self.in_flight
            .iter()
            .take_while(|c| c.ticket < ticket)
            .any(|c| c.start < end && start < c.end)
    }

    fn land(&mut self, ticket: u64) {
        self.in_flight.retain(|c| c.ticket != ticket);
    }

    /// Forgets the changes numbered below `seq` (a sync that started after them succeeded).
    fn retire(&mut self, seq: u64) {
        while let Some((s, c)) = self.changes.front() {
            if *s >= seq {
                break;
            }
            if let Change::Write { data, .. } = c {
                self.bytes -= data.len();
            }
            self.changes.pop_front();
        }
        if self.dropped_through.is_some_and(|d| d < seq) {
            self.dropped_through = None;
        }
    }
}

/// What a replay of `changes` (writes only) writes: every byte they cover once, with the bytes
/// of the newest change that wrote it, as pieces that do not overlap (in no particular order).
/// The file ends up as an in-order replay would leave it, and a read that runs during the
/// replay without its exclusion (a planned read, [`HostFile::plan_source`], executed by the
/// caller on its own) sees for every byte either what the file held or its final bytes, never
/// an older write put back for a moment.
fn newest_pieces(changes: &VecDeque<(u64, Change)>) -> Vec<(u64, &[u8])> {
    // Byte ranges a newer change covers: start -> end, disjoint.
    let mut covered: BTreeMap<u64, u64> = BTreeMap::new();
    let mut out = Vec::new();
    for (_, c) in changes.iter().rev() {
        let Change::Write { offset, data } = c else {
            continue;
        };
        let (a, b) = c.span();
        if a >= b {
            continue;
        }
        // The covered ranges that overlap or touch [a, b), in order.
        let before = covered
            .range(..=a)
            .next_back()
            .filter(|&(_, &e)| e >= a)
            .map(|(&s, &e)| (s, e));
        let within: Vec<(u64, u64)> = covered
            .range(a.saturating_add(1)..=b)
            .map(|(&s, &e)| (s, e))
            .collect();
        let (mut lo, mut hi, mut pos) = (a, b, a);
        for (s, e) in before.into_iter().chain(within) {
            if s > pos {
                out.push((
                    pos,
                    &data[(pos - offset) as usize..(s.min(b) - offset) as usize],
                ));
            }
            pos = pos.max(e);
            lo = lo.min(s);
            hi = hi.max(e);
            covered.remove(&s);
        }
        if pos < b {
            out.push((pos, &data[(pos - offset) as usize..]));
        }
        covered.insert(lo, hi);
    }
    out
}

/// A host file that survives a failed `fdatasync` honestly.
///
/// On Linux a failed `fdatasync` may drop the dirty pages it could not write and report the
/// error only once; the next `fdatasync` then succeeds although the data is gone ("fsyncgate").
/// `ReplayHost` therefore keeps a copy of every write since the last successful sync (up to
/// [`REPLAY_LIMIT_BYTES`]). When a sync fails it rewrites them all, in order, and syncs again:
/// if that succeeds, everything really is durable and the sync reports success. Otherwise (the
/// second sync fails too, a replayed write fails, or the journal was over its limit) the file
/// is poisoned: every later write, `set_len` and sync fails with EIO, so nothing can claim
/// durability or write metadata that points at possibly lost data. Reads keep working.
#[derive(Debug)]
pub struct ReplayHost<H: HostFile> {
    pub(super) inner: H,
    io: RwLock<()>,
    syncs: Mutex<()>,
    journal: Mutex<Journal>,
    /// Signalled whenever an in-flight change is journaled or abandoned.
    landed: Condvar,
    poisoned: AtomicBool,
}

pub(super) fn eio() -> io::Error {
    io::Error::from_raw_os_error(libc::EIO)
}

impl<H: HostFile> ReplayHost<H> {
    /// Wraps `inner`; nothing is journaled yet.
    pub fn new(inner: H) -> Self {
        ReplayHost {
            inner,
            io: RwLock::new(()),
            syncs: Mutex::new(()),
            journal: Mutex::new(Journal::default()),
            landed: Condvar::new(),
            poisoned: AtomicBool::new(false),
        }
    }

    /// Whether a sync failure could not be repaired: durability can no longer be promised.
    pub fn is_poisoned(&self) -> bool {
        self.poisoned.load(Ordering::Acquire)
    }

    pub(super) fn journal(&self) -> MutexGuard<'_, Journal> {
        self.journal.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn check_poisoned(&self) -> io::Result<()> {
        if self.is_poisoned() {
            return Err(eio());
        }
        Ok(())
    }

    fn poison(&self, why: &str) -> io::Error {
        if !self.poisoned.swap(true, Ordering::AcqRel) {
            log::error!(
                "image file sync failed and durability cannot be restored ({why}); every later \
                 write and flush fails with EIO"
            );
        }
        eio()
    }

    /// Runs `op` as a change of the file bytes `[start, end)`: after every overlapping change
    /// issued earlier has been applied and journaled (see the module documentation), and
    /// journaled by `record` (under the journal's lock) when it succeeded. `op` learns whether
    /// the journal is over its limit; what it returns besides its outcome goes to `record`.
    fn ordered_change<K>(
        &self,
        start: u64,
        end: u64,
        op: impl FnOnce(bool) -> (io::Result<()>, K),
        record: impl FnOnce(&mut Journal, K),
    ) -> io::Result<()> {
        let _shared = self.io.read().unwrap_or_else(|e| e.into_inner());
        self.check_poisoned()?;
        let (ticket, dropping) = self.take_ticket(start, end);
        let (result, kept) = op(dropping);
        self.land(ticket, |j| {
            if result.is_ok() {
                record(j, kept);
            }
        });
        result
    }

    /// Changes the file's length and journals it (a `set_len` overlaps everything).
    fn set_len_change(&self, len: u64) -> io::Result<()> {
        self.ordered_change(
            0,
            u64::MAX,
            |_| (self.inner.set_len(len), ()),
            |j, ()| j.push(Change::SetLen(len)),
        )
    }

    /// A write through the page cache, kept for replay as a copy (so buffered whatever its
    /// size: the caller found that `write_at` would not route it around the page cache, or
    /// asked for the cache). While the journal is over its limit (a stream of writes with no
    /// sync: a failed sync would poison anyway), the write is not copied, only counted.
    fn cached_change(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let end = offset.saturating_add(buf.len() as u64);
        self.ordered_change(
            offset,
            end,
            |dropping| {
                // Copied before the write, outside the journal's lock.
                let copy: Option<Box<[u8]>> = (!dropping).then(|| buf.into());
                (self.inner.write_cached_at(buf, offset), copy)
            },
            |j, copy| match copy {
                Some(data) => j.push(Change::Write { offset, data }),
                // A sync may have emptied the journal meanwhile: the write is still not kept,
                // so the journal counts as over its limit again until a later sync.
                None => j.push_dropped(),
            },
        )
    }

    /// A write the file takes with O_DIRECT although it is buffered
    /// ([`HostFile::writes_directly`]): ordered like every change, but not copied. Once it is
    /// in the file, the older kept writes lose the bytes it covers, so that a replay after a
    /// failed sync cannot put them back over it. While a `set_len` is kept (whose replay
    /// could cut the file below this write), the write is kept as a copy instead.
    fn direct_change(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let end = offset.saturating_add(buf.len() as u64);
        self.ordered_change(
            offset,
            end,
            |_| (self.inner.write_at(buf, offset), ()),
            |j, ()| j.record_direct(buf, offset),
        )
    }

    /// `writes` (none overlapping another), which the file takes with O_DIRECT
    /// ([`HostFile::syncs_directly`]), in flight together
    /// ([`HostFile::write_batch_to_sync`]) as direct changes: each is ordered after the
    /// overlapping changes issued before it, not copied, and clips the kept writes it covers
    /// once it is in the file (see [`Self::direct_change`]). Their tickets are taken together
    /// ([`Self::take_tickets`]).
    fn direct_changes(&self, writes: &[(&[u8], u64)]) -> Vec<io::Result<()>> {
        let _shared = self.io.read().unwrap_or_else(|e| e.into_inner());
        if self.is_poisoned() {
            return writes.iter().map(|_| Err(eio())).collect();
        }
        let spans: Vec<(u64, u64)> = writes
            .iter()
            .map(|&(b, o)| (o, o.saturating_add(b.len() as u64)))
            .collect();
        let tickets = self.take_tickets(&spans);
        let results = self.inner.write_batch_to_sync(writes);
        {
            let mut j = self.journal();
            // Every ticket lands, whatever the file answered.
            for (i, (&(b, o), &ticket)) in writes.iter().zip(&tickets).enumerate() {
                if results.get(i).is_some_and(|r| r.is_ok()) {
                    j.record_direct(b, o);
                }
                j.land(ticket);
            }
        }
        self.landed.notify_all();
        results
    }

    /// Takes a ticket for a change of `[start, end)` and waits until no change with an earlier
    /// ticket overlapping it is in flight. Also says whether the journal is over its limit.
    fn take_ticket(&self, start: u64, end: u64) -> (u64, bool) {
        let mut j = self.journal();
        let ticket = j.next_ticket;
        j.next_ticket += 1;
        j.in_flight.push(InFlight { ticket, start, end });
        while j.earlier_overlap(ticket, start, end) {
            j = self.landed.wait(j).unwrap_or_else(|e| e.into_inner());
        }
        (ticket, j.dropped_through.is_some())
    }

    /// Takes consecutive tickets for changes of the `spans` (none overlapping another) and
    /// waits until no change with an earlier ticket overlaps any of them. Taken one by one,
    /// another change could take a ticket between two of them, overlap both, and wait for the
    /// first while the second waits for it: the first lands only after the second is written.
    fn take_tickets(&self, spans: &[(u64, u64)]) -> Vec<u64> {
        let mut j = self.journal();
        let first = j.next_ticket;
        j.next_ticket += spans.len() as u64;
        for (i, &(start, end)) in spans.iter().enumerate() {
            j.in_flight.push(InFlight {
                ticket: first + i as u64,
                start,
                end,
            });
        }
        // (Changes older than the group: a group that did overlap itself could not wait.)
        while spans
            .iter()
            .any(|&(start, end)| j.earlier_overlap(first, start, end))
        {
            j = self.landed.wait(j).unwrap_or_else(|e| e.into_inner());
        }
        (first..first + spans.len() as u64).collect()
    }

    /// Records the outcome of the change holding `ticket` (`journal`) and lets the changes
    /// waiting for it go.
    fn land(&self, ticket: u64, journal: impl FnOnce(&mut Journal)) {
        {
            let mut j = self.journal();
            journal(&mut j);
            j.land(ticket);
        }
        self.landed.notify_all();
    }

    /// A change of a file whose failed sync drops nothing (O_DIRECT): nothing will be replayed,
    /// so it is neither copied nor ordered against overlapping changes (the layers above order
    /// those, [`crate::direct::DirectIo`] its read-modify-writes).
    fn unjournaled(&self, op: impl FnOnce() -> io::Result<()>) -> io::Result<()> {
        let _shared = self.io.read().unwrap_or_else(|e| e.into_inner());
        self.check_poisoned()?;
        op()
    }

    /// After a failed sync: rewrite every change since the last good sync and sync again.
    fn recover(&self, err: io::Error) -> io::Result<()> {
        // Exclusive: every write that reached the file has been journaled.
        let _excl = self.io.write().unwrap_or_else(|e| e.into_inner());
        let mut j = self.journal();
        if j.dropped_through.is_some() {
            return Err(self.poison(&format!(
                "{err}; more than {REPLAY_LIMIT_BYTES} bytes were unsynced, too many to replay"
            )));
        }
        log::warn!(
            "image file sync failed ({err}); rewriting {} changes since the last good sync",
            j.changes.len()
        );
        let r = if j.has_set_len() {
            // In order: a `set_len` cuts off or zeroes what older writes put past it. (The
            // qcow2 engine changes its file's length only through the grow-ahead of
            // `FileHost`, below this layer, so its journals keep none while serving.)
            j.changes.iter().try_for_each(|(_, c)| match c {
                Change::Write { offset, data } => self.inner.write_at(data, *offset),
                Change::SetLen(len) => self.inner.set_len(*len),
            })
        } else {
            newest_pieces(&j.changes)
                .into_iter()
                .try_for_each(|(offset, data)| self.inner.write_at(data, offset))
        };
        if let Err(e) = r {
            return Err(self.poison(&format!("{err}; replaying a write failed: {e}")));
        }
        match self.inner.sync_data() {
            Ok(()) => {
                let next = j.next_seq;
                j.retire(next);
                Ok(())
            }
            Err(e) => Err(self.poison(&format!("{err}; the sync after the replay failed: {e}"))),
        }
    }
}

impl<H: HostFile> HostFile for ReplayHost<H> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        // Shared with writes, excluded by a replay: a replay rewrites older changes before the
        // newer ones over them, so a read in the middle of it could see the past.
        let _shared = self.io.read().unwrap_or_else(|e| e.into_inner());
        self.inner.read_at(buf, offset)
    }

    fn plan_source(&self, offset: u64, len: u64) -> Option<blockdev::PlanSource> {
        // A replay writes every byte at most once, with its newest kept bytes (see `recover`),
        // so a planned read executing during one sees what the file held or the final bytes.
        self.inner.plan_source(offset, len)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if !self.inner.failed_sync_drops_writes() {
            return self.unjournaled(|| self.inner.write_at(buf, offset));
        }
        if self.inner.writes_directly(buf, offset) {
            return self.direct_change(buf, offset);
        }
        self.cached_change(buf, offset)
    }

    fn write_batch(&self, writes: &[(&[u8], u64)]) -> Vec<io::Result<()>> {
        if self.inner.failed_sync_drops_writes() {
            // Kept for replay, ordered against overlapping changes: one at a time.
            return writes.iter().map(|&(b, o)| self.write_at(b, o)).collect();
        }
        let _shared = self.io.read().unwrap_or_else(|e| e.into_inner());
        if self.is_poisoned() {
            return writes.iter().map(|_| Err(eio())).collect();
        }
        self.inner.write_batch(writes)
    }

    fn write_batch_to_sync(&self, writes: &[(&[u8], u64)]) -> Vec<io::Result<()>> {
        if !self.inner.failed_sync_drops_writes() {
            let _shared = self.io.read().unwrap_or_else(|e| e.into_inner());
            if self.is_poisoned() {
                return writes.iter().map(|_| Err(eio())).collect();
            }
            return self.inner.write_batch_to_sync(writes);
        }
        // The ones the file sends direct go together, as direct changes; the rest as `write_at`
        // (kept for replay where buffered).
        super::split_batch(
            writes,
            |b, o| self.inner.syncs_directly(b, o),
            |direct| self.direct_changes(direct),
            |b, o| self.write_at(b, o),
        )
    }

    fn syncs_directly(&self, buf: &[u8], offset: u64) -> bool {
        self.inner.syncs_directly(buf, offset)
    }

    fn page_cached(&self) -> bool {
        self.inner.page_cached()
    }

    fn writes_directly(&self, buf: &[u8], offset: u64) -> bool {
        self.inner.writes_directly(buf, offset)
    }

    fn write_cached_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if !self.inner.failed_sync_drops_writes() {
            return self.unjournaled(|| self.inner.write_cached_at(buf, offset));
        }
        // Through the page cache: a failed sync may drop it, so it is kept for replay.
        self.cached_change(buf, offset)
    }

    fn failed_sync_drops_writes(&self) -> bool {
        // A failed sync is replayed or poisons: it never silently drops a write.
        false
    }

    fn sync_data(&self) -> io::Result<()> {
        let _one = self.syncs.lock().unwrap_or_else(|e| e.into_inner());
        self.check_poisoned()?;
        let start = self.journal().next_seq;
        match self.inner.sync_data() {
            Ok(()) => {
                self.journal().retire(start);
                Ok(())
            }
            // A file whose failed sync drops nothing (O_DIRECT) reports the error and stays
            // usable: a later sync that succeeds is true (QEMU's file-posix does the same). What
            // was journaled before the file switched to O_DIRECT is still replayed.
            Err(e) if !self.inner.failed_sync_drops_writes() && self.journal().is_empty() => Err(e),
            Err(e) => self.recover(e),
        }
    }

    fn len(&self) -> io::Result<u64> {
        let _shared = self.io.read().unwrap_or_else(|e| e.into_inner());
        self.inner.len()
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        if !self.inner.failed_sync_drops_writes() {
            return self.unjournaled(|| self.inner.set_len(len));
        }
        self.set_len_change(len)
    }

    fn enable_direct(&self) -> io::Result<()> {
        self.inner.enable_direct()
    }

    fn release_growth(&self) -> io::Result<()> {
        let _shared = self.io.read().unwrap_or_else(|e| e.into_inner());
        self.inner.release_growth()
    }

    fn enable_direct_large(&self, min: usize) -> io::Result<()> {
        self.inner.enable_direct_large(min)
    }
}
