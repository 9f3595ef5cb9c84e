//! Tests of the host files: the replay journal against a file with Linux "fsyncgate"
//! semantics, O_DIRECT files, and buffered files that write large requests directly.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use super::replay::{eio, Change};
use super::*;

/// The methods a test wrapper passes unchanged to its field `$f`.
macro_rules! forward {
    ($f:ident: $($m:ident),+) => { $(forward!(@ $f $m);)+ };
    (@ $f:ident read_at) => {
        fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
            self.$f.read_at(buf, offset)
        }
    };
    (@ $f:ident write_at) => {
        fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
            self.$f.write_at(buf, offset)
        }
    };
    (@ $f:ident sync_data) => {
        fn sync_data(&self) -> io::Result<()> {
            self.$f.sync_data()
        }
    };
    (@ $f:ident len) => {
        fn len(&self) -> io::Result<u64> {
            self.$f.len()
        }
    };
    (@ $f:ident set_len) => {
        fn set_len(&self, len: u64) -> io::Result<()> {
            self.$f.set_len(len)
        }
    };
    (@ $f:ident writes_directly) => {
        fn writes_directly(&self, buf: &[u8], offset: u64) -> bool {
            self.$f.writes_directly(buf, offset)
        }
    };
}

/// A file with Linux "fsyncgate" semantics: a failed sync drops the unsynced writes.
#[derive(Default)]
struct LossyFile {
    state: Mutex<(Vec<u8>, Vec<u8>)>,
    failures_left: std::sync::atomic::AtomicU32,
}

impl HostFile for LossyFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        MemHost::new(self.state.lock().unwrap().0.clone()).read_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut st = self.state.lock().unwrap();
        let m = MemHost::new(std::mem::take(&mut st.0));
        m.write_at(buf, offset)?;
        st.0 = m.contents();
        Ok(())
    }

    fn sync_data(&self) -> io::Result<()> {
        let mut st = self.state.lock().unwrap();
        if self.failures_left.load(Ordering::SeqCst) > 0 {
            self.failures_left.fetch_sub(1, Ordering::SeqCst);
            st.0 = st.1.clone();
            return Err(eio());
        }
        st.1 = st.0.clone();
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.state.lock().unwrap().0.len() as u64)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.state.lock().unwrap().0.resize(len as usize, 0);
        Ok(())
    }
}

fn durable(h: &ReplayHost<std::sync::Arc<LossyFile>>) -> Vec<u8> {
    h.inner.state.lock().unwrap().1.clone()
}

/// A new, empty file `name` in `dir`, open for reading and writing.
fn new_file(dir: &tempfile::TempDir, name: &str) -> std::fs::File {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(dir.path().join(name))
        .unwrap()
}

#[test]
fn one_failed_sync_that_drops_writes_is_repaired_by_replaying_them() {
    let f = std::sync::Arc::new(LossyFile::default());
    let h = ReplayHost::new(f.clone());
    h.write_at(&[1, 2], 0).unwrap();
    h.sync_data().unwrap();
    h.write_at(&[3], 1).unwrap();
    h.write_at(&[4, 5], 2).unwrap();
    f.failures_left.store(1, Ordering::SeqCst);
    h.sync_data().unwrap();
    assert!(!h.is_poisoned());
    assert_eq!(durable(&h), [1, 3, 4, 5]);
    // The journal was retired: a later failure only replays later writes.
    h.write_at(&[6], 0).unwrap();
    f.failures_left.store(1, Ordering::SeqCst);
    h.sync_data().unwrap();
    assert_eq!(durable(&h), [6, 3, 4, 5]);
}

/// A host file that runs a closure once, right after the first write that reaches the file
/// once armed (the write is in the file; its caller has not returned yet).
struct AfterWriteHook {
    inner: std::sync::Arc<LossyFile>,
    hook: Mutex<Option<Box<dyn FnOnce() + Send>>>,
}

impl HostFile for AfterWriteHook {
    forward!(inner: read_at, sync_data, len, set_len);
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.inner.write_at(buf, offset)?;
        let hook = self.hook.lock().unwrap().take();
        if let Some(f) = hook {
            f();
        }
        Ok(())
    }
}

/// A [`ReplayHost`] over an [`AfterWriteHook`] over a [`LossyFile`], all three shared.
type Hooked = (
    std::sync::Arc<LossyFile>,
    std::sync::Arc<AfterWriteHook>,
    std::sync::Arc<ReplayHost<std::sync::Arc<AfterWriteHook>>>,
);

fn hooked_replay_host() -> Hooked {
    let f = std::sync::Arc::new(LossyFile::default());
    let file = std::sync::Arc::new(AfterWriteHook {
        inner: f.clone(),
        hook: Mutex::new(None),
    });
    let h = std::sync::Arc::new(ReplayHost::new(file.clone()));
    (f, file, h)
}

#[test]
fn replay_after_a_failed_sync_keeps_overlapping_writes_in_file_order() {
    use std::sync::Arc;
    use std::time::{Duration, Instant};
    let (f, file, h) = hooked_replay_host();
    h.write_at(&[0; 8], 0).unwrap();
    h.sync_data().unwrap();
    let b_thread = Arc::new(Mutex::new(None));
    let (h2, slot) = (h.clone(), b_thread.clone());
    *file.hook.lock().unwrap() = Some(Box::new(move || {
        // Write A is in the file and not yet journaled. Write B overlaps it from another
        // thread: it must either reach the file after A and be journaled after A, or wait.
        let b = std::thread::spawn(move || h2.write_at(&[2; 4], 2));
        let start = Instant::now();
        while !b.is_finished() && start.elapsed() < Duration::from_millis(200) {
            std::thread::sleep(Duration::from_millis(1));
        }
        *slot.lock().unwrap() = Some(b);
    }));
    h.write_at(&[1; 8], 0).unwrap();
    let b = b_thread.lock().unwrap().take().unwrap();
    b.join().unwrap().unwrap();
    let mut seen = [0u8; 8];
    h.read_at(&mut seen, 0).unwrap();
    assert_eq!(seen, [1, 1, 2, 2, 2, 2, 1, 1]);
    // The sync fails and drops both writes; the replay must rebuild what readers saw.
    f.failures_left.store(1, Ordering::SeqCst);
    h.sync_data().unwrap();
    assert_eq!(
        f.state.lock().unwrap().1,
        seen,
        "the replay reordered two overlapping writes"
    );
}

#[test]
fn a_read_during_a_replay_never_sees_an_older_write_replayed_before_a_newer_one() {
    use std::sync::Arc;
    use std::time::{Duration, Instant};
    let (f, file, h) = hooked_replay_host();
    h.write_at(&[1; 4], 0).unwrap();
    h.write_at(&[2; 4], 0).unwrap();
    let seen = Arc::new(Mutex::new(None));
    let (h2, slot) = (h.clone(), seen.clone());
    // Runs after the replay rewrote the older write and before it rewrites the newer one.
    *file.hook.lock().unwrap() = Some(Box::new(move || {
        let reader = std::thread::spawn(move || {
            let mut b = [0u8; 4];
            h2.read_at(&mut b, 0).unwrap();
            b
        });
        let start = Instant::now();
        while !reader.is_finished() && start.elapsed() < Duration::from_millis(100) {
            std::thread::sleep(Duration::from_millis(1));
        }
        *slot.lock().unwrap() = Some(reader);
    }));
    f.failures_left.store(1, Ordering::SeqCst);
    h.sync_data().unwrap();
    let reader = seen
        .lock()
        .unwrap()
        .take()
        .expect("the replay wrote nothing");
    assert_eq!(
        reader.join().unwrap(),
        [2; 4],
        "a read saw the file half-replayed"
    );
}

#[test]
fn a_sync_failing_again_after_the_replay_poisons_writes_and_syncs_but_not_reads() {
    let f = std::sync::Arc::new(LossyFile::default());
    let h = ReplayHost::new(f.clone());
    h.write_at(&[7; 4], 0).unwrap();
    f.failures_left.store(2, Ordering::SeqCst);
    let e = h.sync_data().unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO));
    assert!(h.is_poisoned());
    // The file would now sync fine, but the lost write must never be reported durable.
    assert_eq!(h.sync_data().unwrap_err().raw_os_error(), Some(libc::EIO));
    assert_eq!(
        h.write_at(&[1], 0).unwrap_err().raw_os_error(),
        Some(libc::EIO)
    );
    assert!(h.set_len(0).is_err());
    let mut b = [9u8; 2];
    h.read_at(&mut b, 0).unwrap();
    assert_eq!(durable(&h), Vec::<u8>::new());
}

#[test]
fn unsynced_writes_beyond_the_journal_limit_poison_on_a_failed_sync() {
    let f = std::sync::Arc::new(LossyFile::default());
    let h = ReplayHost::new(f.clone());
    let big = vec![1u8; REPLAY_LIMIT_BYTES / 2 + 1];
    h.write_at(&big, 0).unwrap();
    h.write_at(&big, big.len() as u64).unwrap();
    assert!(h.journal().dropped_through.is_some());
    assert_eq!(h.journal().bytes, 0);
    f.failures_left.store(1, Ordering::SeqCst);
    assert!(h.sync_data().is_err());
    assert!(h.is_poisoned());
}

#[test]
fn a_successful_sync_forgets_the_journal_including_an_overflow() {
    let f = std::sync::Arc::new(LossyFile::default());
    let h = ReplayHost::new(f.clone());
    let big = vec![1u8; REPLAY_LIMIT_BYTES + 1];
    h.write_at(&big, 0).unwrap();
    // More writes past the limit, counted and not kept: the sync forgets them too.
    h.write_at(&[3; 8], 0).unwrap();
    h.write_at(&[4; 8], 8).unwrap();
    h.sync_data().unwrap();
    assert!(h.journal().dropped_through.is_none());
    h.write_at(&[2], 0).unwrap();
    f.failures_left.store(1, Ordering::SeqCst);
    h.sync_data().unwrap();
    assert_eq!(durable(&h).first(), Some(&2));
}

#[test]
fn writes_past_the_journal_limit_are_not_kept_and_one_landing_after_a_sync_still_poisons() {
    let (f, file, h) = hooked_replay_host();
    let big = vec![1u8; REPLAY_LIMIT_BYTES + 1];
    h.write_at(&big, 0).unwrap();
    // Over the limit: a later write is counted, not kept.
    h.write_at(&[2; 8], 0).unwrap();
    assert!(h.journal().dropped_through.is_some());
    assert!(h.journal().changes.is_empty());
    assert_eq!(h.journal().bytes, 0);
    // Write C starts while the journal is over its limit (so it takes no copy); while it is
    // in the file and not yet counted, a sync succeeds and empties the journal.
    let h2 = h.clone();
    *file.hook.lock().unwrap() = Some(Box::new(move || {
        let s = std::thread::spawn(move || h2.sync_data());
        s.join().unwrap().unwrap();
    }));
    h.write_at(&[3; 8], 16).unwrap();
    // C was not copied, so the journal must count as over its limit again: a failed sync
    // that drops C cannot be repaired and must poison, never report success.
    assert!(
        h.journal().dropped_through.is_some(),
        "a write that was not kept left the journal looking complete"
    );
    f.failures_left.store(1, Ordering::SeqCst);
    assert!(h.sync_data().is_err());
    assert!(h.is_poisoned());
}

/// An O_DIRECT-like file: a failed sync keeps every write (nothing sat in a page cache).
#[derive(Default)]
struct DirectLikeFile {
    inner: LossyFile,
    sync_failures_left: std::sync::atomic::AtomicU32,
    syncs: std::sync::atomic::AtomicU32,
}

impl HostFile for DirectLikeFile {
    forward!(inner: read_at, write_at, len, set_len);
    fn sync_data(&self) -> io::Result<()> {
        self.syncs.fetch_add(1, Ordering::SeqCst);
        if self.sync_failures_left.load(Ordering::SeqCst) > 0 {
            self.sync_failures_left.fetch_sub(1, Ordering::SeqCst);
            return Err(eio());
        }
        self.inner.sync_data()
    }

    fn failed_sync_drops_writes(&self) -> bool {
        false
    }
}

#[test]
fn on_a_direct_file_writes_are_not_copied_and_a_failed_sync_fails_without_poisoning() {
    let f = std::sync::Arc::new(DirectLikeFile::default());
    let h = ReplayHost::new(f.clone());
    h.write_at(&[1, 2, 3, 4], 0).unwrap();
    h.set_len(6).unwrap();
    assert!(h.journal().changes.is_empty(), "a direct write was copied");
    assert_eq!(h.journal().bytes, 0);
    f.sync_failures_left.store(1, Ordering::SeqCst);
    // The failure is reported once, as it is: no replay (one sync only), no poison.
    assert_eq!(h.sync_data().unwrap_err().raw_os_error(), Some(libc::EIO));
    assert_eq!(f.syncs.load(Ordering::SeqCst), 1);
    assert!(!h.is_poisoned());
    // The file keeps serving, and the next good sync makes the writes durable.
    h.write_at(&[9], 5).unwrap();
    h.sync_data().unwrap();
    assert_eq!(f.inner.state.lock().unwrap().1, [1, 2, 3, 4, 0, 9]);
}

#[test]
fn a_change_journaled_before_the_file_went_direct_is_still_replayed() {
    // The file turns direct after one buffered write (ReplayHost asks at every call).
    struct Switching {
        lossy: LossyFile,
        direct: AtomicBool,
    }
    impl HostFile for Switching {
        forward!(lossy: read_at, write_at, sync_data, len, set_len);
        fn failed_sync_drops_writes(&self) -> bool {
            !self.direct.load(Ordering::SeqCst)
        }
    }
    let f = std::sync::Arc::new(Switching {
        lossy: LossyFile::default(),
        direct: AtomicBool::new(false),
    });
    let h = ReplayHost::new(f.clone());
    h.write_at(&[5, 5], 0).unwrap();
    f.direct.store(true, Ordering::SeqCst);
    f.lossy.failures_left.store(1, Ordering::SeqCst);
    h.sync_data().unwrap();
    assert_eq!(f.lossy.state.lock().unwrap().1, [5, 5]);
}

#[test]
fn a_file_host_says_a_failed_sync_drops_writes_until_it_is_direct() {
    let dir = tempfile::tempdir().unwrap();
    let file = new_file(&dir, "f.img");
    let h = ReplayHost::new(FileHost::new(file));
    assert!(h.inner.failed_sync_drops_writes());
    h.write_at(&[1; 4096], 0).unwrap();
    assert_eq!(h.journal().bytes, 4096);
    h.sync_data().unwrap();
    if let Err(e) = h.enable_direct() {
        // tmpfs and a few others refuse O_DIRECT; the buffered half above still ran.
        assert_eq!(e.raw_os_error(), Some(libc::EINVAL), "{e}");
        return;
    }
    assert!(!h.inner.failed_sync_drops_writes());
    h.write_at(&[2; 4096], 4096).unwrap();
    assert_eq!(h.journal().bytes, 0, "a direct write was journaled");
    let mut b = [0u8; 4096];
    h.read_at(&mut b, 4096).unwrap();
    assert_eq!(b, [2; 4096]);
}

/// A buffered file with Linux "fsyncgate" semantics that writes requests of 4 bytes and more
/// directly: those reach the durable state at once, a failed sync drops only the others.
#[derive(Default)]
struct SplitFile {
    lossy: LossyFile,
}

impl HostFile for SplitFile {
    forward!(lossy: read_at, sync_data, len, set_len);
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.lossy.write_at(buf, offset)?;
        if self.writes_directly(buf, offset) {
            let mut st = self.lossy.state.lock().unwrap();
            let m = MemHost::new(std::mem::take(&mut st.1));
            m.write_at(buf, offset)?;
            st.1 = m.contents();
        }
        Ok(())
    }
    fn writes_directly(&self, buf: &[u8], _offset: u64) -> bool {
        buf.len() >= 4
    }
}

/// A replay host over a [`SplitFile`] of `len` zero bytes, synced, then written with 1s in
/// 2-byte pieces over its first 8 bytes (buffered: kept for replay).
fn split_with_kept_pieces(
    len: usize,
) -> (
    std::sync::Arc<SplitFile>,
    ReplayHost<std::sync::Arc<SplitFile>>,
) {
    let f = std::sync::Arc::new(SplitFile::default());
    let h = ReplayHost::new(f.clone());
    h.write_at(&vec![0; len], 0).unwrap();
    h.sync_data().unwrap();
    for at in (0..8).step_by(2) {
        h.write_at(&[1, 1], at).unwrap();
    }
    (f, h)
}

#[test]
fn a_replay_never_puts_an_older_write_back_over_a_newer_direct_one() {
    // Buffered, kept for replay (2-byte pieces), then a direct write over its middle.
    let (f, h) = split_with_kept_pieces(8);
    h.write_at(&[2; 4], 2).unwrap();
    assert_eq!(
        h.journal().bytes,
        4,
        "the direct write was copied, or not clipped"
    );
    f.lossy.failures_left.store(1, Ordering::SeqCst);
    h.sync_data().unwrap();
    assert_eq!(
        f.lossy.state.lock().unwrap().1,
        [1, 1, 2, 2, 2, 2, 1, 1],
        "the replay wrote older bytes over the direct write"
    );
}

/// A [`SplitFile`] that runs a closure once, right after the first buffered write (or with
/// `after_direct`, direct write) that reaches it once armed (in the file, not landed yet).
#[derive(Default)]
struct HookedSplit {
    split: SplitFile,
    after_direct: bool,
    hook: Mutex<Option<Box<dyn FnOnce() + Send>>>,
}

impl HostFile for HookedSplit {
    forward!(split: read_at, sync_data, len, set_len, writes_directly);
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.split.write_at(buf, offset)?;
        if self.split.writes_directly(buf, offset) == self.after_direct {
            let hook = self.hook.lock().unwrap().take();
            if let Some(f) = hook {
                f();
            }
        }
        Ok(())
    }
}

/// Writes `first` through a [`ReplayHost`] over a [`HookedSplit`] whose hook (after a direct
/// write with `after_direct`, else after a buffered one) runs `racer`'s write from another
/// thread while `first` is in the file and has not landed, waiting up to 200 ms for it. Then
/// checks what readers see, and that a replay after a failed sync rebuilds exactly that.
fn race_while_in_the_file(
    after_direct: bool,
    first: (&[u8], u64),
    racer: (&'static [u8], u64),
    seen_want: [u8; 8],
    replay_msg: &str,
) {
    race_while_in_the_file_of(
        after_direct,
        |h| h.write_at(first.0, first.1).unwrap(),
        racer,
        seen_want,
        replay_msg,
    );
}

/// [`race_while_in_the_file`] with the first change made by `first`.
fn race_while_in_the_file_of(
    after_direct: bool,
    first: impl FnOnce(&ReplayHost<std::sync::Arc<HookedSplit>>),
    racer: (&'static [u8], u64),
    seen_want: [u8; 8],
    replay_msg: &str,
) {
    use std::sync::Arc;
    use std::time::{Duration, Instant};
    let f = Arc::new(HookedSplit {
        after_direct,
        ..HookedSplit::default()
    });
    let h = Arc::new(ReplayHost::new(f.clone()));
    h.write_at(&[0; 8], 0).unwrap();
    h.sync_data().unwrap();
    let slot = Arc::new(Mutex::new(None));
    let (h2, s2) = (h.clone(), slot.clone());
    *f.hook.lock().unwrap() = Some(Box::new(move || {
        let r = std::thread::spawn(move || h2.write_at(racer.0, racer.1));
        let start = Instant::now();
        while !r.is_finished() && start.elapsed() < Duration::from_millis(200) {
            std::thread::sleep(Duration::from_millis(1));
        }
        *s2.lock().unwrap() = Some(r);
    }));
    first(&h);
    let r = slot.lock().unwrap().take().expect("the hook did not run");
    r.join().unwrap().unwrap();
    let mut seen = [0u8; 8];
    h.read_at(&mut seen, 0).unwrap();
    assert_eq!(seen, seen_want);
    f.split.lossy.failures_left.store(1, Ordering::SeqCst);
    h.sync_data().unwrap();
    assert_eq!(f.split.lossy.state.lock().unwrap().1, seen, "{replay_msg}");
}

#[test]
fn a_direct_write_racing_an_older_buffered_one_waits_until_it_is_journaled() {
    // The buffered write is in the file, not journaled: the direct write over it from another
    // thread must wait until it is (else its clip misses it, and a replay puts the older
    // bytes back over the direct ones).
    race_while_in_the_file(
        false,
        (&[1, 1], 2),
        (&[2; 4], 0),
        [2, 2, 2, 2, 0, 0, 0, 0],
        "the replay put an older buffered write back over a direct one",
    );
}

#[test]
fn a_buffered_write_racing_an_older_direct_one_reaches_the_file_after_it() {
    // The direct write is in the file and has not landed: a buffered write over it must wait,
    // so that it is on top in the file and in the journal alike.
    race_while_in_the_file(
        true,
        (&[2; 4], 0),
        (&[1, 1], 2),
        [2, 2, 1, 1, 0, 0, 0, 0],
        "the replay lost a buffered write that readers saw on top of a direct one",
    );
}

/// Writes `batch` to sync while `racer` (a buffered write) races it from the moment its first
/// direct write is in the file (see [`race_while_in_the_file_of`]).
fn race_a_batch_to_sync(batch: &[(&[u8], u64)], racer: (&'static [u8], u64), want: [u8; 8]) {
    race_while_in_the_file_of(
        true,
        |h| {
            for r in h.write_batch_to_sync(batch) {
                r.unwrap();
            }
        },
        racer,
        want,
        "the replay lost a buffered write that readers saw on top of a batch to sync",
    );
}

#[test]
fn a_buffered_write_racing_a_batch_to_sync_waits_for_every_write_of_it() {
    // The batch's first direct write is in the file, neither has landed: a buffered write
    // over both must wait for both, so that it is on top in the file and in the journal.
    race_a_batch_to_sync(
        &[(&[2; 4], 0), (&[3; 4], 4)],
        (&[1, 1], 3),
        [2, 2, 2, 1, 1, 3, 3, 3],
    );
    // Over the second alone (not in the file yet): its ticket is the batch's last, and the
    // racer's must come after it.
    race_a_batch_to_sync(
        &[(&[2; 4], 0), (&[3; 4], 4)],
        (&[1, 1], 5),
        [2, 2, 2, 2, 3, 1, 1, 3],
    );
    // A batch of one: the racer's ticket must come after it, not before.
    race_a_batch_to_sync(&[(&[2; 4], 2)], (&[1, 1], 4), [0, 0, 2, 2, 1, 1, 0, 0]);
}

#[test]
fn a_batch_to_sync_is_not_copied_and_a_replay_keeps_it_over_older_writes() {
    // What the file takes direct in a batch to sync is neither copied nor put back under the
    // older kept writes by a replay; what it takes buffered (too small here) is kept.
    let (f, h) = split_with_kept_pieces(12);
    for r in h.write_batch_to_sync(&[(&[2; 4], 2), (&[7, 7], 10)]) {
        r.unwrap();
    }
    assert_eq!(
        h.journal().bytes,
        6,
        "the direct write was copied or did not clip, or the buffered one was not kept"
    );
    f.lossy.failures_left.store(1, Ordering::SeqCst);
    h.sync_data().unwrap();
    assert_eq!(
        f.lossy.state.lock().unwrap().1,
        [1, 1, 2, 2, 2, 2, 1, 1, 0, 0, 7, 7],
        "the replay wrote older bytes over the batch's direct write or lost its buffered one"
    );
}

#[test]
fn a_direct_write_splits_an_older_kept_write_it_covers_the_middle_of() {
    let f = std::sync::Arc::new(SplitFile::default());
    let h = ReplayHost::new(f.clone());
    h.write_at(&[0; 12], 0).unwrap();
    h.sync_data().unwrap();
    // A 12-byte write is direct too: a buffered one is built from 3-byte pieces.
    for at in (0..12).step_by(3) {
        h.write_at(&[at as u8 + 10; 3], at).unwrap();
    }
    h.write_at(&[9; 5], 4).unwrap();
    {
        let j = h.journal();
        let kept: Vec<(u64, usize)> = j
            .changes
            .iter()
            .map(|(_, c)| match c {
                Change::Write { offset, data } => (*offset, data.len()),
                Change::SetLen(l) => (*l, usize::MAX),
            })
            .collect();
        assert_eq!(kept, [(0, 3), (3, 1), (9, 3)]);
        assert_eq!(j.bytes, 7);
    }
    f.lossy.failures_left.store(1, Ordering::SeqCst);
    h.sync_data().unwrap();
    assert_eq!(
        f.lossy.state.lock().unwrap().1,
        [10, 10, 10, 13, 9, 9, 9, 9, 9, 19, 19, 19]
    );
}

#[test]
fn while_a_set_len_is_kept_a_direct_write_is_kept_as_a_copy() {
    let f = std::sync::Arc::new(SplitFile::default());
    let h = ReplayHost::new(f.clone());
    h.set_len(4).unwrap();
    h.write_at(&[5; 8], 8).unwrap();
    assert_eq!(h.journal().bytes, 8);
    f.lossy.failures_left.store(1, Ordering::SeqCst);
    h.sync_data().unwrap();
    // The replayed set_len cut the file to 4 bytes; the copy put the write back.
    assert_eq!(
        f.lossy.state.lock().unwrap().1,
        [0, 0, 0, 0, 0, 0, 0, 0, 5, 5, 5, 5, 5, 5, 5, 5]
    );
}

#[test]
fn a_buffered_file_writes_large_aligned_requests_directly_and_reads_them_back() {
    let dir = tempfile::tempdir().unwrap();
    let file = new_file(&dir, "f.img");
    let h = ReplayHost::new(FileHost::new(file));
    if let Err(e) = h.enable_direct_large(8192) {
        assert_eq!(e.raw_os_error(), Some(libc::EINVAL), "{e}");
        return;
    }
    let mut big = blockdev::AlignedBuf::zeroed(16384);
    big.fill(1);
    // Buffered first (too small, then unaligned memory), then direct over it.
    h.write_at(&big[..4096], 0).unwrap();
    h.write_at(&[1; 16384], 4096).unwrap();
    assert!(!h.inner.writes_directly(&big[..4096], 0));
    assert_eq!(h.journal().bytes, 4096 + 16384);
    big.fill(2);
    assert!(h.inner.writes_directly(&big, 0));
    // Sector-aligned but not covering whole pages: buffered (the kernel could not drop a page
    // a buffered write into its other half dirtied).
    assert!(!h.inner.writes_directly(&big[..8192 + 512], 0));
    assert!(!h.inner.writes_directly(&big[..8192], 512));
    h.write_at(&big, 0).unwrap();
    assert_eq!(
        h.journal().bytes,
        4096,
        "the direct write was copied or not clipped"
    );
    let mut back = vec![0u8; 20480];
    h.read_at(&mut back, 0).unwrap();
    assert!(
        back[..16384].iter().all(|&b| b == 2),
        "a buffered read saw stale pages"
    );
    assert!(back[16384..].iter().all(|&b| b == 1));
    // A direct write past the end grows the file ahead; a clean close gives it back.
    h.write_at(&big, 1 << 20).unwrap();
    assert!(h.len().unwrap() >= (1 << 20) + GROW_AHEAD);
    h.release_growth().unwrap();
    assert_eq!(h.len().unwrap(), (1 << 20) + 16384);
    h.sync_data().unwrap();
}

#[test]
fn a_batch_to_sync_on_a_real_file_goes_direct_on_a_ring_and_leaves_no_stale_page() {
    // A buffered file whose large writes go direct: in a batch to sync, 4 KiB page-aligned
    // writes go direct too, together on a ring, and buffered reads do not see the old bytes
    // the pages of earlier buffered writes held; a piece in the middle of a page stays
    // buffered and is kept for replay.
    let dir = tempfile::tempdir().unwrap();
    let file = new_file(&dir, "f.img");
    let h = ReplayHost::new(FileHost::new(file));
    if let Err(e) = h.enable_direct_large(256 << 10) {
        assert_eq!(e.raw_os_error(), Some(libc::EINVAL), "{e}");
        return;
    }
    h.write_at(&[1; 32768], 0).unwrap();
    h.sync_data().unwrap();
    let mut a = blockdev::AlignedBuf::zeroed(4096);
    a.fill(2);
    let mut b = blockdev::AlignedBuf::zeroed(4096);
    b.fill(3);
    assert!(!h.inner.writes_directly(&a, 0), "4 KiB is not large");
    assert!(h.inner.syncs_directly(&a, 0) && !h.inner.syncs_directly(&a[..512], 512));
    let rings_before = h.inner.ring_writes();
    for r in h.write_batch_to_sync(&[(&a, 0), (&b, 8192), (&[4; 512], 16384 + 512)]) {
        r.unwrap();
    }
    assert_eq!(h.journal().bytes, 512, "only the buffered piece is kept");
    assert_eq!(
        h.inner.ring_writes(),
        rings_before + 2,
        "not on a ring together"
    );
    let mut back = vec![0u8; 32768];
    h.read_at(&mut back, 0).unwrap();
    let mut want = vec![1u8; 32768];
    want[..4096].fill(2);
    want[8192..12288].fill(3);
    want[16384 + 512..16384 + 1024].fill(4);
    assert!(back == want, "a buffered read saw stale pages");
    h.sync_data().unwrap();
}

/// A buffered [`FileHost`] whose writes of 256 KiB and more go direct, or `None` where the file
/// system refuses O_DIRECT (tmpfs: nothing to check).
fn large_direct_host(dir: &tempfile::TempDir, name: &str) -> Option<FileHost> {
    let h = FileHost::new(new_file(dir, name));
    if let Err(e) = h.enable_direct_large(256 << 10) {
        assert_eq!(e.raw_os_error(), Some(libc::EINVAL), "{e}");
        return None;
    }
    Some(h)
}

#[test]
fn a_page_the_page_cache_still_holds_after_a_direct_write_is_written_again_through_it() {
    // The kernel cannot drop a large folio that read-ahead brought in during a direct write and
    // a buffered write of a neighbour dirtied: it keeps the old bytes of the direct range. That
    // state is simulated here by a cached page with old bytes under a direct write that did not
    // reach it: the mend after the write must make buffered reads see the new bytes, and must
    // bring nothing into the page cache where it holds no page of the range.
    let dir = tempfile::tempdir().unwrap();
    let Some(h) = large_direct_host(&dir, "f.img") else {
        return;
    };
    h.write_at(&[1; 4096], 0).unwrap();
    h.sync_data().unwrap();
    let Some(held) = blockdev::page_cache_pages(h.file(), 0, 4096) else {
        eprintln!("no cachestat on this kernel: nothing to check");
        return;
    };
    assert_eq!(held, 1);
    h.mend_after_direct(&[2; 4096], 0).unwrap();
    let mut back = [0u8; 4096];
    h.read_at(&mut back, 0).unwrap();
    assert_eq!(back, [2; 4096], "a buffered read still sees the stale page");
    // Not cached: nothing is written and nothing is brought in.
    h.mend_after_direct(&[3; 4096], 1 << 20).unwrap();
    assert_eq!(blockdev::page_cache_pages(h.file(), 1 << 20, 4096), Some(0));
    h.read_at(&mut back, 1 << 20).unwrap();
    assert_eq!(
        back, [0; 4096],
        "the mend wrote a range the page cache did not hold"
    );
}

#[test]
fn buffered_writes_past_the_end_grow_the_file_ahead_once_large_writes_go_direct() {
    // Buffered writes into preallocated blocks skip the file system's delayed allocation: with
    // large writes direct (the default), a buffered write past the end grows the file too, and
    // a clean close cuts it back to the end of what was written. A plain buffered file (the
    // `--direct off` mode) does not grow.
    let dir = tempfile::tempdir().unwrap();
    let open = |name: &str| new_file(&dir, name);
    let plain = FileHost::new(open("plain.img"));
    plain.write_at(&[3; 4096], 65536).unwrap();
    assert_eq!(
        plain.len().unwrap(),
        65536 + 4096,
        "a plain buffered file grew"
    );
    let h = ReplayHost::new(FileHost::new(open("f.img")));
    if let Err(e) = h.enable_direct_large(256 << 10) {
        assert_eq!(e.raw_os_error(), Some(libc::EINVAL), "{e}");
        return;
    }
    h.write_at(&[7; 4096], 65536).unwrap();
    let grown = h.len().unwrap();
    assert!(
        grown >= 65536 + 4096 + GROW_AHEAD,
        "not grown ahead: {grown}"
    );
    h.write_at(&[8; 100], 2 << 20).unwrap();
    assert_eq!(
        h.len().unwrap(),
        grown,
        "a write inside the grown part grows nothing"
    );
    let mut back = vec![1u8; 8192];
    h.read_at(&mut back, 61440).unwrap();
    assert!(
        back[..4096].iter().all(|&b| b == 0),
        "the hole before the write"
    );
    assert!(back[4096..].iter().all(|&b| b == 7));
    h.sync_data().unwrap();
    h.release_growth().unwrap();
    assert_eq!(
        h.len().unwrap(),
        (2 << 20) + 100,
        "cut back to the buffered writes' end"
    );
    let mut tail = [0u8; 100];
    h.read_at(&mut tail, 2 << 20).unwrap();
    assert_eq!(tail, [8; 100]);
}

#[test]
fn the_file_grows_again_before_its_writes_reach_the_end_and_a_writer_inside_never_waits() {
    // Growth starts once a write comes within half of GROW_AHEAD of the file's end, so the
    // writers after it still find allocated blocks; a writer whose range lies inside the file
    // does not wait while another grows it (fallocate waits for the file system's journal,
    // which a concurrent fdatasync holds), and one past the end does.
    let dir = tempfile::tempdir().unwrap();
    let Some(h) = large_direct_host(&dir, "g.img") else {
        return;
    };
    h.write_at(&[1; 4096], 0).unwrap();
    let grown = h.len().unwrap();
    assert!(grown >= GROW_AHEAD, "not grown ahead: {grown}");
    // Well inside the first half: nothing grows.
    h.write_at(&[2; 4096], grown - GROW_AHEAD / 2 - 8192)
        .unwrap();
    assert_eq!(
        h.len().unwrap(),
        grown,
        "grew with half the space still ahead"
    );
    // Another grower holds the lock: a write inside the file but in its last half goes on
    // without growing; a write past the end waits for the lock and then grows.
    let held = h.growth.lock.lock().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::scope(|s| {
        s.spawn(|| {
            h.write_at(&[3; 4096], grown - 8192).unwrap();
            tx.send("inside").unwrap();
            h.write_at(&[4; 4096], grown + 4096).unwrap();
            tx.send("past").unwrap();
        });
        assert_eq!(
            rx.recv_timeout(std::time::Duration::from_secs(10)),
            Ok("inside"),
            "a write inside the file waited for another's growth"
        );
        assert_eq!(h.len().unwrap(), grown);
        assert!(
            rx.recv_timeout(std::time::Duration::from_millis(100))
                .is_err(),
            "a write past the end went on while the file was being grown"
        );
        drop(held);
        assert_eq!(
            rx.recv_timeout(std::time::Duration::from_secs(10)),
            Ok("past")
        );
    });
    let regrown = h.len().unwrap();
    assert!(
        (grown + 8192 + GROW_AHEAD..=grown + 8192 + GROW_AHEAD + (1 << 20)).contains(&regrown),
        "not grown by GROW_AHEAD past the write past the end: {regrown}"
    );
    // The next write into the last half of the space grows it again, with no wait.
    h.write_at(&[5; 4096], regrown - 8192).unwrap();
    let third = h.len().unwrap();
    assert!(
        (regrown + GROW_AHEAD - 8192..=regrown + GROW_AHEAD + (1 << 20)).contains(&third),
        "not grown by GROW_AHEAD past the write: {third}"
    );
    // Once growing failed (no fallocate, or no space) the file is not grown again: writes
    // allocate their own blocks.
    h.growth.off.store(true, Ordering::Relaxed);
    h.write_at(&[6; 4096], third + 4096).unwrap();
    assert_eq!(h.len().unwrap(), third + 8192, "grew after growing failed");
    // A clean close gives the growth back; a write inside the file after it (the header's
    // dirty bit) grows nothing.
    h.growth.off.store(false, Ordering::Relaxed);
    h.release_growth().unwrap();
    let closed = h.len().unwrap();
    h.write_at(&[9; 4096], closed - 4096).unwrap();
    assert_eq!(
        h.len().unwrap(),
        closed,
        "a write inside the file grew it after the close"
    );
    let mut back = [0u8; 4096];
    h.read_at(&mut back, grown + 4096).unwrap();
    assert_eq!(back, [4; 4096]);
}

#[test]
fn mem_host_reads_zeros_past_end_and_grows_on_write() {
    let h = MemHost::default();
    h.write_at(&[1, 2, 3], 10).unwrap();
    assert_eq!(h.len().unwrap(), 13);
    let mut b = [9u8; 6];
    h.read_at(&mut b, 9).unwrap();
    assert_eq!(b, [0, 1, 2, 3, 0, 0]);
    assert!(h.write_at(&[1], u64::MAX).is_err());
    h.set_len(4).unwrap();
    assert_eq!(h.len().unwrap(), 4);
}

/// An O_DIRECT [`FileHost`] in `dir` (rings off when asked), or `None` where the file system
/// refuses O_DIRECT (tmpfs and a few others).
fn direct_file_host(dir: &tempfile::TempDir, name: &str, rings: bool) -> Option<FileHost> {
    let h = FileHost::new(new_file(dir, name));
    if !rings {
        h.disable_write_rings();
    }
    match h.enable_direct() {
        Ok(()) => Some(h),
        Err(e) => {
            assert_eq!(e.raw_os_error(), Some(libc::EINVAL), "{e}");
            None
        }
    }
}

#[test]
fn a_batch_of_direct_writes_lands_as_its_writes_one_by_one_would_on_a_ring_or_without() {
    // Aligned writes go on the ring together, unaligned ones (read-modify-write of their end
    // blocks) one at a time; with the rings off, all go one at a time. Either way the file
    // reads back as the writes made it, and a replay journal above copies none of them.
    let dir = tempfile::tempdir().unwrap();
    for rings in [true, false] {
        let Some(fh) = direct_file_host(&dir, &format!("batch-{rings}.img"), rings) else {
            return;
        };
        let h = std::sync::Arc::new(fh);
        let replay = ReplayHost::new(h.clone());
        let mut model = vec![0u8; 4 << 20];
        let mut bufs: Vec<(blockdev::AlignedBuf, u64)> = Vec::new();
        for i in 0..40u64 {
            let (len, off) = match i % 4 {
                0 | 1 => (4096usize, i * 65536),
                2 => (65536, i * 65536),
                _ => (1000, i * 65536 + 300),
            };
            let mut b = blockdev::AlignedBuf::zeroed_aligned(len, 4096);
            b.fill(i as u8 + 1);
            model[off as usize..off as usize + len].fill(i as u8 + 1);
            bufs.push((b, off));
        }
        let writes: Vec<(&[u8], u64)> = bufs.iter().map(|(b, o)| (&b[..], *o)).collect();
        let results = replay.write_batch(&writes);
        assert_eq!(results.len(), writes.len());
        for (i, r) in results.into_iter().enumerate() {
            r.unwrap_or_else(|e| panic!("write {i} failed: {e}"));
        }
        let aligned = writes.iter().filter(|(b, _)| b.len() % 4096 == 0).count() as u64;
        assert_eq!(
            h.ring_writes(),
            if rings { aligned } else { 0 },
            "rings={rings}: the aligned writes did not (or did) go on the ring"
        );
        assert!(
            replay.journal().changes.is_empty(),
            "a direct write was copied"
        );
        let mut back = vec![0u8; model.len()];
        replay.read_at(&mut back, 0).unwrap();
        assert!(
            back == model,
            "rings={rings}: the file differs from the writes"
        );
    }
}

#[test]
fn a_failed_write_of_a_batch_reports_its_own_error_and_the_others_land() {
    // An offset past what a file may hold fails on the ring (and with `pwrite`) with its own
    // errno; the writes around it in the same batch land.
    let dir = tempfile::tempdir().unwrap();
    for rings in [true, false] {
        let Some(h) = direct_file_host(&dir, &format!("fail-{rings}.img"), rings) else {
            return;
        };
        let mut good = blockdev::AlignedBuf::zeroed_aligned(4096, 4096);
        good.fill(0x5a);
        let writes: Vec<(&[u8], u64)> =
            vec![(&good[..], 0), (&good[..], 1 << 62), (&good[..], 8192)];
        let results = h.write_batch(&writes);
        assert!(results[0].is_ok() && results[2].is_ok(), "{results:?}");
        let e = results[1]
            .as_ref()
            .expect_err("a write past the file size limit succeeded");
        assert!(
            matches!(e.raw_os_error(), Some(libc::EFBIG | libc::EINVAL)),
            "rings={rings}: {e}"
        );
        let mut back = blockdev::AlignedBuf::zeroed_aligned(12288, 4096);
        h.read_at(&mut back, 0).unwrap();
        assert!(back[..4096].iter().all(|&b| b == 0x5a));
        assert!(back[4096..8192].iter().all(|&b| b == 0));
        assert!(back[8192..].iter().all(|&b| b == 0x5a));
    }
}

#[test]
fn a_short_or_interrupted_ring_write_is_finished_with_pwrites_and_a_failed_one_keeps_its_errno() {
    let dir = tempfile::tempdir().unwrap();
    let f = new_file(&dir, "short.img");
    let d = crate::direct::DirectIo::with_alignment(512, 512);
    let mut buf = blockdev::AlignedBuf::zeroed_aligned(8192, 4096);
    buf.fill(7);
    let read = |off: u64, len: usize| {
        let mut b = vec![0u8; len];
        blockdev::read_full_at(&f, &mut b, off).unwrap();
        b
    };
    // The kernel reports 4096 of 8192 bytes written: the rest follows at the right place, and
    // what it reported written is not written again (here the file never got it: zeros stay).
    super::batch::finish(&d, &f, &buf, 65536, 4096).unwrap();
    assert_eq!(read(65536, 4096), vec![0; 4096]);
    assert_eq!(read(69632, 4096), vec![7; 4096]);
    // A count that ends inside a block is rounded down to the block: that block is rewritten.
    super::batch::finish(&d, &f, &buf, 131072, 4096 + 100).unwrap();
    assert_eq!(read(131072, 4096), vec![0; 4096]);
    assert_eq!(read(135168, 4096), vec![7; 4096]);
    // Interrupted, or nothing written: the whole write is done with pwrite.
    super::batch::finish(&d, &f, &buf, 0, -libc::EINTR).unwrap();
    assert_eq!(read(0, 8192), vec![7; 8192]);
    super::batch::finish(&d, &f, &buf, 16384, 0).unwrap();
    assert_eq!(read(16384, 8192), vec![7; 8192]);
    // A failure is that write's error, and writes nothing.
    let e = super::batch::finish(&d, &f, &buf, 32768, -libc::ENOSPC).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENOSPC));
    assert_eq!(read(32768, 8192), vec![0; 8192]);
    // Complete: nothing more is written.
    super::batch::finish(&d, &f, &buf, 200_000 * 512, 8192).unwrap();
    assert_eq!(blockdev::file_size(&f).unwrap(), 139264);
}

#[test]
fn a_short_or_interrupted_ring_read_is_finished_with_preads_and_a_failed_one_keeps_its_errno() {
    let dir = tempfile::tempdir().unwrap();
    let f = new_file(&dir, "short-read.img");
    let data: Vec<u8> = (0..40960u32).map(|i| (i % 251) as u8 + 1).collect();
    std::os::unix::fs::FileExt::write_all_at(&f, &data, 0).unwrap();
    let d = crate::direct::DirectIo::with_alignment(512, 512);
    let mut buf = blockdev::AlignedBuf::zeroed_aligned(8192, 4096);
    // The kernel reports 4096 of 8192 bytes read: the rest is read at the right place, and
    // what it reported read is kept (here the ring never filled it: zeros stay).
    super::batch::finish_read(&d, &f, &mut buf, 8192, 4096).unwrap();
    assert_eq!(&buf[..4096], &[0; 4096][..]);
    assert_eq!(&buf[4096..], &data[12288..16384]);
    // A count that ends inside a block is rounded down to the block: that block is read again.
    buf.fill(0);
    super::batch::finish_read(&d, &f, &mut buf, 0, 4096 + 100).unwrap();
    assert_eq!(&buf[..4096], &[0; 4096][..]);
    assert_eq!(&buf[4096..], &data[4096..8192]);
    // Interrupted, or nothing read: the whole read is done with pread.
    super::batch::finish_read(&d, &f, &mut buf, 16384, -libc::EINTR).unwrap();
    assert_eq!(&buf[..], &data[16384..24576]);
    buf.fill(0);
    super::batch::finish_read(&d, &f, &mut buf, 24576, 0).unwrap();
    assert_eq!(&buf[..], &data[24576..32768]);
    // Past the end of the file: zeros.
    super::batch::finish_read(&d, &f, &mut buf, 36864, 4096).unwrap();
    assert_eq!(&buf[4096..], &[0; 4096][..]);
    // A failure is that read's error.
    let e = super::batch::finish_read(&d, &f, &mut buf, 0, -libc::EIO).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO));
}

/// A lossy file that records every write reaching it once armed.
struct RecordingLossy {
    inner: std::sync::Arc<LossyFile>,
    armed: AtomicBool,
    writes: Mutex<Vec<(u64, Vec<u8>)>>,
}

impl HostFile for RecordingLossy {
    forward!(inner: read_at, sync_data, len, set_len);
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if self.armed.load(Ordering::SeqCst) {
            self.writes.lock().unwrap().push((offset, buf.to_vec()));
        }
        self.inner.write_at(buf, offset)
    }
}

#[test]
fn a_replay_writes_every_byte_once_with_its_newest_bytes() {
    let f = std::sync::Arc::new(LossyFile::default());
    let file = std::sync::Arc::new(RecordingLossy {
        inner: f.clone(),
        armed: AtomicBool::new(false),
        writes: Mutex::new(Vec::new()),
    });
    let h = ReplayHost::new(file.clone());
    h.write_at(&[9; 32], 0).unwrap();
    h.sync_data().unwrap();
    // Overlapping in every way: covered whole, covering, at either end, touching, apart, and
    // exactly the range of a newer one.
    for (fill, off, len) in [
        (10u8, 24u64, 4usize),
        (1, 4, 8),
        (2, 6, 2),
        (3, 2, 4),
        (4, 10, 6),
        (5, 16, 4),
        (6, 0, 1),
        (7, 24, 4),
        (8, 5, 2),
    ] {
        h.write_at(&vec![fill; len], off).unwrap();
    }
    let mut want = vec![0u8; 32];
    h.read_at(&mut want, 0).unwrap();
    file.armed.store(true, Ordering::SeqCst);
    f.failures_left.store(1, Ordering::SeqCst);
    h.sync_data().unwrap();
    assert_eq!(
        f.state.lock().unwrap().1,
        want,
        "the replay rebuilt another content"
    );
    let mut written = [0u32; 32];
    for (off, bytes) in file.writes.lock().unwrap().iter() {
        assert!(!bytes.is_empty(), "an empty replay write at {off}");
        for (i, b) in bytes.iter().enumerate() {
            let at = *off as usize + i;
            written[at] += 1;
            // What a read running during the replay may see here: the final byte only.
            assert_eq!(
                *b, want[at],
                "byte {at} was replayed with an older write's value"
            );
        }
    }
    for (at, n) in written.iter().enumerate() {
        let kept = at < 1 || (2..20).contains(&at) || (24..28).contains(&at);
        assert_eq!(*n, u32::from(kept), "byte {at} was replayed {n} times");
    }
}
