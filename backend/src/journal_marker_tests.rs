//! Tests of the crash journal's markers: writes the layer below persists in place are recorded
//! as a marker (no data), which replay must order against every record, trim and flush around
//! it. The helpers (`Volatile`, `fresh`, `gate`, ...) are the parent module's.

use super::*;

/// The records of the journal file at `path`, read through a descriptor of its own.
fn records_in(path: &Path) -> Vec<Record> {
    scan(&File::open(path).unwrap(), 1 << 20).unwrap()
}

/// The kinds of [`records_in`].
fn kinds_in(path: &Path) -> Vec<Kind> {
    records_in(path).iter().map(|r| r.kind).collect()
}

/// [`fresh`], over a lower layer that persists writes in place.
fn fresh_persisting() -> (tempfile::TempDir, PathBuf, Arc<Volatile>, Journal) {
    let (dir, path, lower, j) = fresh();
    lower.persist.store(true, Ordering::SeqCst);
    (dir, path, lower, j)
}

/// A write the layer below persists in place leaves a marker (no data) in the journal, and a
/// replay puts no older record back over its range: the parts of an older record outside it
/// are replayed, and so is a record written after the marker.
#[test]
fn a_persisted_write_leaves_a_marker_and_replay_puts_no_older_record_over_it() {
    let (_dir, path, lower, j) = fresh();
    j.write_at(&[1; 8192], 0).unwrap();
    j.discard(65536, 8192).unwrap();
    lower.persist.store(true, Ordering::SeqCst);
    j.write_at(&[2; 4096], 0).unwrap();
    j.write_at(&[4; 4096], 65536).unwrap();
    lower.persist.store(false, Ordering::SeqCst);
    j.write_at(&[3; 512], 512).unwrap();
    assert_eq!(lower.persisted.load(Ordering::SeqCst), 2);
    assert_eq!(j.persisted_writes(), 2);
    let kinds: Vec<(Kind, usize)> = records_in(&path)
        .iter()
        .map(|r| (r.kind, r.data.len()))
        .collect();
    assert_eq!(
        kinds,
        [
            (Kind::Write, 8192),
            (Kind::Discard, 0),
            (Kind::Persisted, 0),
            (Kind::Persisted, 0),
            (Kind::Write, 512)
        ],
        "a persisted write records no data"
    );
    let want = read(&*lower, 0, SIZE);
    let (_j, after, rec) = crash_and_restart(j, &lower, &path, &ident(1));
    assert_eq!(rec.replayed, 5);
    assert_eq!(
        rec.bytes,
        4096 + 512,
        "only the uncovered half of the first write and the last write are replayed"
    );
    assert_eq!(read(&*after, 0, SIZE), want);
    assert_eq!(
        read(&*after, 0, 8192),
        [vec![2; 512], vec![3; 512], vec![2; 3072], vec![1; 4096]].concat()
    );
    assert_eq!(
        read(&*after, 65536, 8192),
        [vec![4; 4096], vec![0; 4096]].concat(),
        "the discard is replayed only past the persisted write"
    );
}

/// Which pieces of each record a replay applies: a marker covers the ranges of older records
/// (several markers together, touching or overlapping), never of newer ones, and a record of
/// another kind covers nothing.
#[test]
fn replay_skips_exactly_what_later_markers_cover() {
    let rec = |seq, kind, offset, len| Record {
        seq,
        kind,
        offset,
        len,
        data: if kind == Kind::Write {
            vec![0; len as usize]
        } else {
            Vec::new()
        },
    };
    let records = [
        rec(1, Kind::Write, 0, 100),
        rec(2, Kind::Zeroes, 50, 100),
        rec(3, Kind::Persisted, 10, 10),
        rec(4, Kind::Persisted, 20, 10),
        rec(5, Kind::Persisted, 60, 20),
        rec(6, Kind::Write, 0, 30),
        rec(7, Kind::Persisted, 140, 100),
        rec(8, Kind::Persisted, 145, 5),
    ];
    assert_eq!(
        uncovered(&records),
        [
            vec![(0, 10), (30, 30), (80, 20)],
            vec![(50, 10), (80, 60)],
            vec![],
            vec![],
            vec![],
            vec![(0, 30)],
            vec![],
            vec![],
        ]
    );
    assert_eq!(uncovered(&[]), Vec::<Vec<(u64, u64)>>::new());
}

/// The marker is appended only once the write is in place: a daemon killed between the two
/// (the hook inside the lower write takes a copy of the journal file and of what would
/// survive) replays the older record over the range, since the write was never acknowledged;
/// a daemon killed after the write returned replays nothing over it.
#[test]
fn a_marker_is_appended_only_after_the_persisted_write_is_in_place() {
    let (dir, path, lower, j) = fresh();
    j.write_at(&[1; 4096], 0).unwrap();
    lower.persist.store(true, Ordering::SeqCst);
    // The journal file's bytes and what survives, at the moment of death.
    type Frozen = (Vec<u8>, Vec<u8>);
    let at_death: Arc<Mutex<Option<Frozen>>> = Arc::default();
    {
        let (path, lower2, at_death) = (path.clone(), Arc::clone(&lower), Arc::clone(&at_death));
        *lower.persist_hook.lock().unwrap() = Some(Box::new(move || {
            let file = std::fs::read(&path).unwrap();
            *at_death.lock().unwrap() = Some((file, lower2.durable()));
        }));
    }
    j.write_at(&[2; 4096], 0).unwrap();
    let (file, durable) = at_death.lock().unwrap().take().unwrap();
    let killed = dir.path().join("killed");
    std::fs::write(&killed, &file).unwrap();
    let kinds = kinds_in(&killed);
    assert_eq!(
        kinds,
        [Kind::Write],
        "no marker while the write is in its lower I/O"
    );
    assert_eq!(&durable[..4096], &[2; 4096][..], "the write was in place");
    let after = Volatile::new(durable);
    let (_k, rec) = open(after.clone(), &killed, &ident(1), 1 << 20);
    assert_eq!(rec.replayed, 1);
    assert_eq!(read(&*after, 0, 4096), vec![1; 4096]);

    let kinds = kinds_in(&path);
    assert_eq!(kinds, [Kind::Write, Kind::Persisted]);
    let (_j, after, rec) = crash_and_restart(j, &lower, &path, &ident(1));
    assert_eq!((rec.replayed, rec.bytes), (2, 0));
    assert_eq!(read(&*after, 0, 4096), vec![2; 4096]);
}

/// A write the layer below refuses to persist after its hint said it would (its state
/// changed in between) is recorded with its data and written as usual; a persisted write that
/// fails fails the request and appends nothing.
#[test]
fn a_refused_persisted_write_is_recorded_and_a_failed_one_appends_nothing() {
    let (_dir, path, lower, j) = fresh_persisting();
    lower.refuse_persist.store(true, Ordering::SeqCst);
    j.write_at(&[5; 4096], 4096).unwrap();
    let records = records_in(&path);
    assert_eq!(records.len(), 1);
    assert_eq!(
        (records[0].kind, &records[0].data[..]),
        (Kind::Write, &[5; 4096][..])
    );
    assert_eq!(read(&*lower, 4096, 4096), vec![5; 4096]);

    lower.refuse_persist.store(false, Ordering::SeqCst);
    lower.fail_persist.store(true, Ordering::SeqCst);
    assert!(j.write_at(&[6; 4096], 8192).is_err());
    assert_eq!(
        records_in(&path).len(),
        1,
        "a failed write appends no marker"
    );
    assert_eq!(j.lock_state().pending, [0, 0]);
    let (_j, after, rec) = crash_and_restart(j, &lower, &path, &ident(1));
    assert_eq!(rec.replayed, 1);
    assert_eq!(read(&*after, 4096, 4096), vec![5; 4096]);
}

/// A gathered write (a guest's buffers) that the layer below persists is gathered into a
/// buffer of the calling thread, not into the journal's mapping, and only its marker is
/// recorded; a fill that fails writes and records nothing.
#[test]
fn a_gathered_persisted_write_records_only_its_marker() {
    let (_dir, path, lower, j) = fresh_persisting();
    let data: Vec<u8> = (0..8192u32).map(|i| (i % 253) as u8).collect();
    j.write_gathered(16384, data.len(), &mut |dst| {
        dst.copy_from_slice(&data);
        Ok(())
    })
    .unwrap();
    let e = j.write_gathered(32768, 4096, &mut |dst| {
        dst.fill(9);
        Err(BlockError::Io(io::Error::other("unreadable guest buffer")))
    });
    assert!(e.is_err());
    assert_eq!(lower.persisted.load(Ordering::SeqCst), 1);
    assert_eq!(read(&*lower, 32768, 4096), vec![0; 4096]);
    let records = records_in(&path);
    assert_eq!(records.len(), 1);
    assert_eq!(
        (records[0].kind, records[0].offset, records[0].len),
        (Kind::Persisted, 16384, 8192)
    );
    assert_eq!(j.lock_state().tail[0], REC_HEADER as u64);
    let (_j, after, _) = crash_and_restart(j, &lower, &path, &ident(1));
    assert_eq!(read(&*after, 16384, data.len()), data);
}

/// Deterministic interleaving of the stripe locks held across "persisted write + marker": a
/// recorded write to the same range, started while the persisted one is inside its lower
/// write, appends its record only after the marker, so a replay applies it (not the marker's
/// older neighbour) last.
#[test]
fn a_write_racing_a_persisted_one_on_its_range_records_after_the_marker() {
    let (_dir, path, lower, j) = fresh();
    let j = Arc::new(j);
    j.write_at(&[1; 4096], 0).unwrap();
    lower.persist.store(true, Ordering::SeqCst);
    let (hook, in_lower_rx, release_tx) = gate();
    *lower.persist_hook.lock().unwrap() = Some(hook);
    let a = {
        let j = Arc::clone(&j);
        std::thread::spawn(move || j.write_at(&[2; 4096], 0).unwrap())
    };
    in_lower_rx
        .recv_timeout(MUST)
        .expect("the write never reached its lower write");
    let b = {
        let (j, lower) = (Arc::clone(&j), Arc::clone(&lower));
        std::thread::spawn(move || {
            lower.persist.store(false, Ordering::SeqCst);
            j.write_at(&[3; 512], 1024).unwrap()
        })
    };
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        j.lock_state().next_seq,
        2,
        "the racing write appended while the persisted one was in its lower write"
    );
    release_tx.send(()).unwrap();
    a.join().unwrap();
    b.join().unwrap();
    let kinds = kinds_in(&path);
    assert_eq!(kinds, [Kind::Write, Kind::Persisted, Kind::Write]);
    let want = read(&*lower, 0, SIZE);
    let j = Arc::try_unwrap(j).unwrap_or_else(|_| panic!("writers joined"));
    let (_j, after, _) = crash_and_restart(j, &lower, &path, &ident(1));
    assert_eq!(read(&*after, 0, SIZE), want);
    assert_eq!(read(&*after, 1024, 512), vec![3; 512]);
}

/// After a flush below failed, and until one succeeds, a write the layer below would persist
/// in place is recorded with its data: the records of that time are what a restarted daemon
/// can still put back if the failed writeback dropped pages of the file.
#[test]
fn after_a_failed_flush_writes_keep_their_data_in_the_journal_until_one_succeeds() {
    let (_dir, path, lower, j) = fresh_persisting();
    lower.fail_flush.store(true, Ordering::SeqCst);
    assert!(j.flush().is_err());
    j.write_at(&[1; 4096], 0).unwrap();
    lower.fail_flush.store(false, Ordering::SeqCst);
    let kinds = kinds_in(&path);
    assert_eq!(kinds, [Kind::Write]);
    assert_eq!(lower.persisted.load(Ordering::SeqCst), 0);
    j.flush().unwrap();
    j.write_at(&[2; 4096], 0).unwrap();
    let kinds = kinds_in(&path);
    assert_eq!(kinds, [Kind::Persisted]);
    assert_eq!(j.persisted_writes(), 1);
}

/// [`uncovered`] against a byte-by-byte model on random journals: a byte of a record is
/// replayed exactly when no marker after it covers that byte.
#[test]
fn replay_pieces_match_a_byte_model_of_later_markers() {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = |n: u64| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state % n
    };
    for _ in 0..300 {
        let n = 1 + next(40) as usize;
        let records: Vec<Record> = (0..n)
            .map(|i| {
                let kind = match next(4) {
                    0 | 1 => Kind::Persisted,
                    2 => Kind::Write,
                    _ => Kind::Discard,
                };
                let (offset, len) = (next(200), next(60));
                Record {
                    seq: i as u64,
                    kind,
                    offset,
                    len,
                    data: if kind == Kind::Write {
                        vec![0; len as usize]
                    } else {
                        Vec::new()
                    },
                }
            })
            .collect();
        let got = uncovered(&records);
        for (i, r) in records.iter().enumerate() {
            let mut want: Vec<(u64, u64)> = Vec::new();
            if r.kind != Kind::Persisted {
                for b in r.offset..r.offset + r.len {
                    let hidden = records[i + 1..].iter().any(|m| {
                        m.kind == Kind::Persisted && m.offset <= b && b < m.offset + m.len
                    });
                    if hidden {
                        continue;
                    }
                    match want.last_mut() {
                        Some((o, l)) if *o + *l == b => *l += 1,
                        _ => want.push((b, 1)),
                    }
                }
            }
            assert_eq!(got[i], want, "record {i} of {records:?}");
        }
    }
}

/// A segment full of markers (a stream of persisted writes that never FLUSHes holds over a
/// million in 64 MiB) is worked out in one pass: the replay of the records among them still
/// skips exactly what comes after them.
#[test]
fn a_million_markers_are_worked_out_in_one_pass() {
    let mut records = vec![Record {
        seq: 0,
        kind: Kind::Write,
        offset: 0,
        len: 1 << 30,
        data: Vec::new(),
    }];
    for i in 0..1_000_000u64 {
        // Every other 4 KiB block of the first 8 GB, in a scattered order.
        let block = (i * 7_919) % 1_000_000;
        records.push(Record {
            seq: i + 1,
            kind: Kind::Persisted,
            offset: block * 8192,
            len: 4096,
            data: Vec::new(),
        });
    }
    let pieces = uncovered(&records);
    assert_eq!(pieces[0].len(), (1 << 30) / 8192);
    assert_eq!(pieces[0][0], (4096, 4096));
    assert!(pieces[1..].iter().all(Vec::is_empty));
}

/// The statistics count every record appended (markers too) with its bytes, what the journal
/// holds until a flush empties it, and what a restarted journal replayed.
#[test]
fn the_statistics_count_records_markers_held_bytes_and_replays() {
    let (_dir, path, lower, j) = fresh();
    let rec = REC_HEADER as u64;
    j.write_at(&[1; 4096], 0).unwrap();
    j.discard(65536, 8192).unwrap();
    lower.persist.store(true, Ordering::SeqCst);
    j.write_at(&[2; 8192], 131072).unwrap();
    lower.persist.store(false, Ordering::SeqCst);
    let s = j.stats();
    assert_eq!(
        (s.records, s.record_bytes, s.persisted_writes),
        (3, (rec + 4096) + rec + rec, 1)
    );
    assert_eq!(s.held_bytes, s.record_bytes, "nothing trimmed yet");
    assert_eq!(
        (s.replayed_records, s.replayed_bytes, s.refusing),
        (0, 0, false)
    );
    j.flush().unwrap();
    let s = j.stats();
    assert_eq!(s.held_bytes, 0, "a guest FLUSH empties the journal");
    assert_eq!(s.trims, 1);
    assert_eq!(
        s.records, 3,
        "the counters are since the start, not what is held"
    );
    j.write_at(&[3; 512], 512).unwrap();
    assert_eq!(j.stats().held_bytes, rec + 512);
    let (j, _after, _) = crash_and_restart(j, &lower, &path, &ident(1));
    let s = j.stats();
    assert_eq!((s.replayed_records, s.replayed_bytes), (1, 512));
    assert_eq!(
        (s.records, s.held_bytes),
        (0, 0),
        "the replay is flushed at open"
    );
    j.write_at(&[4; 512], 0).unwrap();
    drop(j);
    let (j, _) = open(Volatile::new(vec![0; SIZE]), &path, &ident(2), 1 << 20);
    assert!(
        j.stats().refusing,
        "a journal holding another image's records refuses writes"
    );
}

// ---- Persisted writes racing other requests, deterministically (review of the marker path) ----

/// Starts `f` on a thread and returns its handle once the lower layer's hook (the gate whose
/// "reached" end is `reached`) says the request is parked inside its lower I/O.
fn parked_in_lower<T: Send + 'static>(
    reached: &mpsc::Receiver<()>,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    let t = std::thread::spawn(f);
    reached
        .recv_timeout(MUST)
        .expect("the request reaches its lower I/O");
    t
}

/// Records 4 KiB of ones at byte 0, then parks a rewrite of it with twos that the lower layer
/// persists in place inside its lower write; returns the rewrite's thread and the sender that
/// lets it go on.
fn park_a_persisted_rewrite(
    j: &Arc<Journal>,
    lower: &Volatile,
) -> (std::thread::JoinHandle<()>, mpsc::Sender<()>) {
    j.write_at(&[1; 4096], 0).unwrap();
    lower.persist.store(true, Ordering::SeqCst);
    let (hook, in_lower, release) = gate();
    *lower.persist_hook.lock().unwrap() = Some(hook);
    let j = Arc::clone(j);
    let persisted = parked_in_lower(&in_lower, move || j.write_at(&[2; 4096], 0).unwrap());
    (persisted, release)
}

/// The other order of `a_write_racing_a_persisted_one_on_its_range_records_after_the_marker`:
/// a persisted write that arrives while a recorded write of the same range is inside its lower
/// write waits for it (stripes), so its marker follows that record and a replay puts nothing
/// of the older write over the newer bytes in place.
#[test]
fn a_persisted_write_behind_a_recorded_one_on_its_range_appends_its_marker_after_it() {
    let (_dir, path, lower, j) = fresh();
    let j = Arc::new(j);
    let (hook, in_lower, release) = gate();
    *lower.hook.lock().unwrap() = Some(hook);
    let recorded = {
        let j = Arc::clone(&j);
        parked_in_lower(&in_lower, move || j.write_at(&[1; 8192], 0).unwrap())
    };
    lower.persist.store(true, Ordering::SeqCst);
    let persisted = {
        let j = Arc::clone(&j);
        blocked(
            "a persisted write over a recorded one in flight",
            move || j.write_at(&[2; 4096], 4096).unwrap(),
        )
    };
    assert_eq!(lower.persisted.load(Ordering::SeqCst), 0);
    release.send(()).unwrap();
    recorded.join().unwrap();
    persisted.join().unwrap();
    assert_eq!(kinds_in(&path), [Kind::Write, Kind::Persisted]);
    let want = [vec![1; 4096], vec![2; 4096]].concat();
    assert_eq!(read(&*lower, 0, 8192), want);
    crash_and_check(j, &lower, &path, 2, "the record and the marker");
}

/// A persisted write inside its lower write while a segment holding an older record of its
/// range is sealed, flushed below and emptied (its generation bumped): the marker goes to the
/// active segment after the trim, and a crash then replays nothing over the newer bytes.
#[test]
fn a_persisted_write_across_a_background_trim_of_an_older_record_keeps_the_newer_bytes() {
    let (_dir, path, lower, j) = fresh();
    let j = Arc::new(j);
    let (persisted, release) = park_a_persisted_rewrite(&j, &lower);
    // Fill segment 0 (recorded writes elsewhere) so that it is sealed and trimmed while the
    // persisted write is in its lower write: no stripe of it is held by the trim.
    lower.persist.store(false, Ordering::SeqCst);
    for i in 1..=PER_SEGMENT + 1 {
        write_nth(&j, i);
    }
    j.wait_trimmer_idle();
    {
        let st = j.lock_state();
        assert_eq!(st.trims, 1, "the segment with the older record was emptied");
        assert_eq!(st.active, 1);
    }
    release.send(()).unwrap();
    persisted.join().unwrap();
    assert_eq!(kinds_in(&path).last(), Some(&Kind::Persisted));
    assert_eq!(read(&*lower, 0, 4096), vec![2; 4096]);
    let replayed = records_in(&path).len() as u64;
    crash_and_check(j, &lower, &path, replayed, "the records after the trim");
}

/// A marker appended to the active segment covers an older record of its range in the sealed
/// segment that the trimmer has not flushed yet: a crash at that moment replays the sealed
/// segment's other records but nothing over the newer bytes.
#[test]
fn a_marker_in_the_active_segment_covers_an_older_record_in_the_sealed_one() {
    let (_dir, path, lower, j) = fresh();
    let j = Arc::new(j);
    let (hook, parked, release_trimmer) = gate();
    *j.core.before_trim.lock().unwrap() = Some(hook);
    for i in 0..=PER_SEGMENT {
        write_nth(&j, i);
    }
    parked.recv_timeout(MUST).expect("the trimmer has work");
    assert!(j.lock_state().sealed);
    lower.persist.store(true, Ordering::SeqCst);
    j.write_at(&[0xaa; 8192], 4096).unwrap();
    assert_eq!(kinds_in(&path).last(), Some(&Kind::Persisted));
    let want = read(&*lower, 0, SIZE);
    assert_eq!(
        want[..65536],
        [vec![1; 4096], vec![0xaa; 8192], vec![1; 65536 - 12288]].concat()
    );
    // Die with the trimmer parked: the sealed segment was never flushed.
    let durable = lower.durable();
    let file = std::fs::read(&path).unwrap();
    release_trimmer.send(()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let killed = dir.path().join("killed");
    std::fs::write(&killed, &file).unwrap();
    let after = Volatile::new(durable);
    let (_k, rec) = open(after.clone(), &killed, &ident(1), 1 << 20);
    assert_eq!(rec.replayed as u64, PER_SEGMENT + 2);
    assert_eq!(read(&*after, 0, SIZE), want);
}

/// A guest FLUSH does not wait for a persisted write still in its lower write (it is not
/// acknowledged, and it holds no record), and empties the older record of its range; the
/// marker appended afterwards is what a crash then replays, over the newer bytes.
#[test]
fn a_guest_flush_during_a_persisted_write_trims_the_older_record_and_the_marker_follows() {
    let (_dir, path, lower, j) = fresh();
    let j = Arc::new(j);
    let (persisted, release) = park_a_persisted_rewrite(&j, &lower);
    {
        let j = Arc::clone(&j);
        must_finish("a guest FLUSH beside a persisted write", move || {
            j.flush().unwrap()
        });
    }
    assert!(kinds_in(&path).is_empty(), "the FLUSH emptied the journal");
    release.send(()).unwrap();
    persisted.join().unwrap();
    assert_eq!(kinds_in(&path), [Kind::Persisted]);
    crash_and_check(j, &lower, &path, 1, "the marker alone");
    assert_eq!(lower.durable()[..4096], [2; 4096]);
}

/// A discard of a range a persisted write is writing waits for the write and its marker, so
/// its record follows the marker and a replay zeroes the range again.
#[test]
fn a_discard_racing_a_persisted_write_of_its_range_orders_after_the_marker() {
    let (_dir, path, lower, j) = fresh_persisting();
    let j = Arc::new(j);
    let (hook, in_lower, release) = gate();
    *lower.persist_hook.lock().unwrap() = Some(hook);
    let persisted = {
        let j = Arc::clone(&j);
        parked_in_lower(&in_lower, move || j.write_at(&[2; 8192], 0).unwrap())
    };
    let discard = {
        let j = Arc::clone(&j);
        blocked("a discard of a range being persisted", move || {
            j.discard(4096, 8192).unwrap()
        })
    };
    release.send(()).unwrap();
    persisted.join().unwrap();
    discard.join().unwrap();
    assert_eq!(kinds_in(&path), [Kind::Persisted, Kind::Discard]);
    assert_eq!(
        read(&*lower, 0, 12288),
        [vec![2; 4096], vec![0; 8192]].concat()
    );
    crash_and_check(j, &lower, &path, 2, "the marker and the discard");
}

/// A persisted write of a range a write-zeroes is zeroing waits for it (stripes), so its
/// marker follows the zeroes' record: a replay zeroes only what the persisted write did not
/// rewrite.
#[test]
fn a_persisted_write_racing_a_write_zeroes_of_its_range_orders_after_its_record() {
    let (_dir, path, lower, j) = fresh();
    let j = Arc::new(j);
    j.write_at(&[1; 16384], 0).unwrap();
    let (hook, in_lower, release) = gate();
    *lower.zap_hook.lock().unwrap() = Some(hook);
    let zeroes = {
        let j = Arc::clone(&j);
        parked_in_lower(&in_lower, move || j.write_zeroes(0, 12288, false).unwrap())
    };
    lower.persist.store(true, Ordering::SeqCst);
    let persisted = {
        let j = Arc::clone(&j);
        blocked("a persisted write of a range being zeroed", move || {
            j.write_at(&[2; 4096], 4096).unwrap()
        })
    };
    release.send(()).unwrap();
    zeroes.join().unwrap();
    persisted.join().unwrap();
    assert_eq!(
        kinds_in(&path),
        [Kind::Write, Kind::Zeroes, Kind::Persisted]
    );
    let want = [vec![0; 4096], vec![2; 4096], vec![0; 4096], vec![1; 4096]].concat();
    assert_eq!(read(&*lower, 0, 16384), want);
    crash_and_check(j, &lower, &path, 3, "the record, the zeroes and the marker");
}

/// A persisted write that fails (EIO after part of it reached the layer below) appends no
/// marker: a crash replays the older record of its range, the last acknowledged write there.
#[test]
fn a_failed_persisted_write_leaves_the_older_record_to_the_replay() {
    let (_dir, path, lower, j) = fresh();
    j.write_at(&[1; 8192], 0).unwrap();
    lower.persist.store(true, Ordering::SeqCst);
    lower.fail_persist.store(true, Ordering::SeqCst);
    assert!(j.write_at(&[2; 8192], 0).is_err());
    assert_eq!(kinds_in(&path), [Kind::Write]);
    let (_j, after, rec) = crash_and_restart(j, &lower, &path, &ident(1));
    assert_eq!(rec.replayed, 1);
    assert_eq!(read(&*after, 0, 8192), vec![1; 8192]);
}

/// The check "a flush below has failed: keep the data" is made when the write's record is
/// appended, not only before its lower write: a flush that fails while a persisted write is in
/// its lower I/O may have dropped the pages that write put in place (a failed writeback of a
/// buffered file), so the write, which completes after the failure, is recorded with its data
/// and a crash replays it, instead of a marker that hides the older record too.
#[test]
fn a_write_completing_after_a_flush_failed_keeps_its_data_in_the_journal() {
    let (_dir, path, lower, j) = fresh();
    let j = Arc::new(j);
    let (persisted, release) = park_a_persisted_rewrite(&j, &lower);
    lower.fail_flush.store(true, Ordering::SeqCst);
    lower.drop_unsynced.store(true, Ordering::SeqCst);
    {
        let j = Arc::clone(&j);
        let failed = must_finish("a failing guest FLUSH", move || j.flush().is_err());
        assert!(failed);
    }
    assert_eq!(
        lower.durable()[..4096],
        [0; 4096],
        "the failed writeback dropped the page the persisted write had put in place"
    );
    release.send(()).unwrap();
    persisted.join().unwrap();
    let records = records_in(&path);
    assert_eq!(
        records
            .iter()
            .map(|r| (r.kind, r.data.len()))
            .collect::<Vec<_>>(),
        [(Kind::Write, 4096), (Kind::Write, 4096)],
        "a write acknowledged after a failed flush keeps its data in the journal"
    );
    assert_eq!(j.persisted_writes(), 0);
    let j = Arc::try_unwrap(j).unwrap_or_else(|_| panic!("writers joined"));
    let (_j, after, rec) = crash_and_restart(j, &lower, &path, &ident(1));
    assert_eq!(rec.replayed, 2);
    assert_eq!(read(&*after, 0, 4096), vec![2; 4096]);
}

/// The journal over the real folio cache over [`Volatile`]: writes of 128 KiB and more of
/// whole folios go around the cache (and are persisted where the lower layer says so),
/// smaller ones are cached; no background flusher, so only the journal's trims and guest
/// FLUSHes write the cache back.
fn fresh_over_cache() -> (
    tempfile::TempDir,
    PathBuf,
    Arc<Volatile>,
    Arc<cache::FolioCache>,
    Journal,
) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("j");
    let lower = Volatile::new(vec![0; SIZE]);
    let cfg = cache::CacheConfig {
        folio_size: 4096,
        cache_size: 8 << 20,
        dirty_limit: 4 << 20,
        writeback: true,
        flusher_threads: 0,
        writeback_interval: Duration::from_secs(3600),
        bypass_threshold: 128 << 10,
        read_bypass_threshold: 128 << 10,
        rewrite_bypass_threshold: 0,
    };
    let fc = cache::FolioCache::new(lower.clone(), cfg).unwrap();
    let (j, rec) = Journal::open(fc.clone(), &path, &ident(1), 1 << 20).unwrap();
    assert_eq!(rec.replayed, 0);
    (dir, path, lower, fc, j)
}

/// A crash of the stack of [`fresh_over_cache`]: the cache's dirty folios die with the
/// daemon; a new stack over what was durable replays. Returns the new top.
fn crash_over_cache(
    j: Journal,
    fc: Arc<cache::FolioCache>,
    lower: &Volatile,
    path: &Path,
) -> (Journal, Recovery) {
    drop(j);
    drop(fc);
    let after = Volatile::new(lower.durable());
    Journal::open(after, path, &ident(1), 1 << 20).unwrap()
}

/// A persisted write over a range whose folio holds a dirty (journaled) write: the cache
/// drops the dirty copy once the write is in place, never writes it back over it, and a crash
/// replays nothing of the older record over the newer bytes; a small write into the range
/// afterwards (cached again) is replayed on top.
#[test]
fn a_persisted_write_over_a_dirty_folio_keeps_the_newer_bytes_across_a_crash() {
    let (_dir, path, lower, fc, j) = fresh_over_cache();
    j.write_at(&[1; 4096], 4096).unwrap();
    lower.persist.store(true, Ordering::SeqCst);
    j.write_at(&[2; 128 << 10], 0).unwrap();
    assert_eq!(lower.persisted.load(Ordering::SeqCst), 1);
    j.write_at(&[3; 512], 8192).unwrap();
    assert_eq!(kinds_in(&path), [Kind::Write, Kind::Persisted, Kind::Write]);
    // A writeback now must not bring the older folio back over the persisted bytes.
    fc.write_back().unwrap();
    let mut want = vec![2; 128 << 10];
    want[8192..8704].fill(3);
    assert_eq!(read(&j, 0, 128 << 10), want);
    assert_eq!(read(&*lower, 0, 128 << 10), want);
    let (after, rec) = crash_over_cache(j, fc, &lower, &path);
    assert_eq!(rec.replayed, 3);
    assert_eq!(read(&after, 0, 128 << 10), want);
}

/// A persisted write that fails while the journal trims the segment holding the older
/// (cached, dirty) write of its range: the trim's writeback of that folio waits for the write
/// around the cache to end, then writes the folio the failure left dirty, so the older record
/// is trimmed only once its bytes are below, and a crash keeps them.
#[test]
fn a_failed_persisted_write_racing_a_trim_keeps_the_older_write_across_a_crash() {
    let (_dir, path, lower, fc, j) = fresh_over_cache();
    let j = Arc::new(j);
    j.write_at(&[1; 4096], 0).unwrap();
    lower.persist.store(true, Ordering::SeqCst);
    lower.fail_persist.store(true, Ordering::SeqCst);
    let (hook, in_lower, release) = gate();
    *lower.persist_hook.lock().unwrap() = Some(hook);
    let persisted = {
        let j = Arc::clone(&j);
        parked_in_lower(&in_lower, move || j.write_at(&[2; 128 << 10], 0).is_err())
    };
    // Seal segment 0 with cached writes elsewhere; the trimmer's writeback reaches the folio
    // the persisted write has registered and waits.
    for i in 0..=PER_SEGMENT {
        j.write_at(&[i as u8 + 3; 65536], (2 << 20) + i * 65536)
            .unwrap();
    }
    std::thread::sleep(MUST_NOT);
    {
        let st = j.lock_state();
        assert!(
            st.sealed && st.trimming && st.trims == 0,
            "the trim waits for the write around the cache"
        );
    }
    release.send(()).unwrap();
    assert!(persisted.join().unwrap(), "the persisted write failed");
    j.wait_trimmer_idle();
    assert_eq!(j.lock_state().trims, 1);
    assert_eq!(
        kinds_in(&path)
            .iter()
            .filter(|k| **k == Kind::Persisted)
            .count(),
        0
    );
    assert_eq!(read(&*j, 0, 4096), vec![1; 4096]);
    let j = Arc::try_unwrap(j).unwrap_or_else(|_| panic!("writers joined"));
    let (after, _) = crash_over_cache(j, fc, &lower, &path);
    assert_eq!(
        read(&after, 0, 4096),
        vec![1; 4096],
        "the last acknowledged write of the range survives"
    );
}

/// A documented limitation (README, "What survives a crash"), kept as a test to run with
/// `--ignored`: a persisted write that completed *before* a flush below fails has only its
/// marker in the journal. If the failed writeback dropped its pages (a buffered raw file keeps
/// no copy of unsynced writes to put back, unlike the qcow2 engine's `ReplayHost`), the running
/// daemon has lost it already, a crash keeps it lost, and its marker keeps the replay from
/// putting back even the older record of its range. Recording such rewrites with their data
/// again would halve 128 KiB rewrites of a raw image (measured).
#[test]
#[ignore = "documented limitation: a marker appended before a flush below failed and dropped its pages"]
fn a_marker_appended_before_a_failed_flush_does_not_hide_the_older_record_of_dropped_pages() {
    let (_dir, path, lower, j) = fresh();
    j.write_at(&[1; 4096], 0).unwrap();
    lower.persist.store(true, Ordering::SeqCst);
    j.write_at(&[2; 4096], 0).unwrap();
    lower.fail_flush.store(true, Ordering::SeqCst);
    lower.drop_unsynced.store(true, Ordering::SeqCst);
    assert!(j.flush().is_err());
    assert_eq!(kinds_in(&path), [Kind::Write, Kind::Persisted]);
    let (_j, after, _) = crash_and_restart(j, &lower, &path, &ident(1));
    let got = read(&*after, 0, 4096);
    assert!(
        got == vec![2; 4096] || got == vec![1; 4096],
        "neither the persisted write nor the older one survived: {:?}",
        &got[..8]
    );
}
