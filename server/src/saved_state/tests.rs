use super::*;
use crate::clock_mark::Mark;
use crate::engine::{Gcra, Limit, Outcome, Pool, ReplayKey, Request, StateKey, Window, WindowKind};

const NOW: Nanos = Nanos::from_secs(1_764_000_000);

fn master() -> MasterKey {
    MasterKey::from_hex(&MasterKey::generate_hex()).unwrap()
}

/// Five an hour, as a policy's GCRA bucket.
fn five() -> Limit {
    Limit::Gcra(Gcra::new(5, Nanos::from_secs(3600), 5))
}

fn three_a_minute() -> Limit {
    Limit::Window(Window::new(WindowKind::Sliding, 3, Nanos::from_secs(60)))
}

/// The state a client's traffic leaves in an engine: a policy bucket, a
/// request limit's window and a failure budget, and the replay key of a
/// request.
struct Traffic {
    bucket: StateKey,
    window: StateKey,
    nonce: ReplayKey,
}

impl Traffic {
    fn in_engine(engine: &Engine) -> Self {
        let policy = engine.pools().policy("five");
        let per_ip = engine.pools().policy("per-ip");
        Self {
            bucket: engine.key_in(policy, b"wk_a", &[b"policy", b"five"]),
            window: engine.key_in(per_ip, b"", &[b"ip:203.0.113.7"]),
            nonce: engine.replay_key(b"wk_a", &[b"nonce", b"n-1"]),
        }
    }

    /// One request: the nonce (a fresh one when `nonce` differs), the
    /// bucket and the window; whether it was allowed.
    fn send(&self, engine: &Engine, now: Nanos, nonce: ReplayKey) -> Outcome {
        engine.decide(
            now,
            &Request {
                nonce: Some((nonce, now.saturating_add(Nanos::from_secs(300)))),
                limits: &[(self.bucket, five()), (self.window, three_a_minute())],
                cost: 1,
                commit: true,
            },
        )
    }

    /// What each limit would have left after one more request (a look,
    /// which takes nothing).
    fn remaining(&self, engine: &Engine, now: Nanos) -> Vec<u64> {
        let look = Request {
            nonce: None,
            limits: &[(self.bucket, five()), (self.window, three_a_minute())],
            cost: 1,
            commit: false,
        };
        match engine.decide(now, &look) {
            Outcome::Limited { limits, .. } => limits.iter().map(|v| v.remaining).collect(),
            other => panic!("{other:?}"),
        }
    }
}

/// A directory holding the state one request left (a replay key, a bucket
/// and a window spent once), saved.
fn saved_after_one_request(master: &MasterKey) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::new(4, 1000);
    let traffic = Traffic::in_engine(&engine);
    traffic.send(&engine, NOW, traffic.nonce);
    save(dir.path(), master, &engine, NOW, None).unwrap();
    dir
}

/// The file the version before wrote of the state one request left: its
/// seed alone sealed, then the entries.
fn saved_as_the_version_before(master: &MasterKey) -> Vec<u8> {
    let engine = Engine::new(4, 1000);
    let traffic = Traffic::in_engine(&engine);
    traffic.send(&engine, NOW, traffic.nonce);
    let mut bytes = HEADER_V1.to_vec();
    bytes.extend_from_slice(
        master
            .seal(SEED_CONTEXT_V1, engine.seed().as_bytes())
            .as_bytes(),
    );
    bytes.push(b'\n');
    let mut batch = HandOffBatch::default();
    let names = engine.pools().wire_names();
    for entry in engine.take_slots(|_| true, NOW) {
        add_entry(&mut batch, entry, &names);
    }
    // Written before replay keys had extra bits.
    for nonce in &mut batch.nonces {
        nonce.extra = 0;
    }
    batch.encode_length_delimited(&mut bytes).unwrap();
    bytes
}

/// What the next process takes back from `dir` at `now`, the file then
/// removed or left (`afterwards`): its engine, keyed with the saved seed,
/// and what was restored.
fn taken_back(
    dir: &std::path::Path,
    master: &MasterKey,
    now: Nanos,
    afterwards: Afterwards,
) -> (Engine, Restored) {
    let saved = open(dir, master).expect("a saved state");
    let engine = Engine::with_seed(4, 1000, saved.seed());
    let restored = saved.restore(&engine, now, afterwards).unwrap();
    (engine, restored)
}

fn fresh_nonce(engine: &Engine, i: u32) -> ReplayKey {
    engine.replay_key(b"wk_a", &[b"nonce", &i.to_be_bytes()])
}

/// Two requests spent two of the bucket's five and two of the window's
/// three (a third would leave 2 and 0), and the first one's replay key is
/// kept: the next process, keyed alike by the seed it reads back, sees
/// exactly that.
#[test]
fn the_next_process_takes_back_every_limit_spent_and_every_replay_key() {
    let dir = tempfile::tempdir().unwrap();
    let master = master();
    let before = Engine::new(4, 1000);
    let traffic = Traffic::in_engine(&before);
    assert!(matches!(
        traffic.send(&before, NOW, traffic.nonce),
        Outcome::Limited { allowed: true, .. }
    ));
    assert!(matches!(
        traffic.send(&before, NOW, fresh_nonce(&before, 2)),
        Outcome::Limited { allowed: true, .. }
    ));
    assert_eq!(traffic.remaining(&before, NOW), vec![2, 0]);
    assert_eq!(save(dir.path(), &master, &before, NOW, None).unwrap(), 4);

    let later = NOW.saturating_add(Nanos::from_secs(1));
    let (after, restored) = taken_back(dir.path(), &master, later, Afterwards::Remove);
    assert_eq!(restored.entries, 4);
    assert!(!dir.path().join(FILE_NAME).exists(), "taken back once");
    let traffic = Traffic::in_engine(&after);
    assert_eq!(traffic.remaining(&after, later), vec![2, 0]);
    assert_eq!(traffic.send(&after, later, traffic.nonce), Outcome::Replay);
}

/// Policies may be renumbered between two processes (one added before
/// another in the config): state follows the policy's name.
#[test]
fn state_follows_its_policy_by_name_when_pools_are_numbered_otherwise() {
    let master = master();
    let dir = saved_after_one_request(&master);
    let saved = open(dir.path(), &master).expect("saved");
    let after = Engine::with_seed(4, 1000, saved.seed());
    let newer = after.pools().policy("a-new-policy");
    // Numbered otherwise than by the process that saved, which knew its
    // two policies first.
    let as_saved = Engine::new(4, 1000);
    Traffic::in_engine(&as_saved);
    assert_ne!(newer, as_saved.pools().policy("a-new-policy"));
    saved.restore(&after, NOW, Afterwards::Remove).unwrap();
    let traffic = Traffic::in_engine(&after);
    assert_ne!(Pool::of(traffic.bucket.id), newer);
    assert_eq!(traffic.remaining(&after, NOW), vec![3, 1]);
}

/// What cannot be read is set aside, and the process starts as after a
/// crash: another master key, a file that is not warden's, a damaged
/// entry. Never a panic, never a refusal to start.
#[test]
fn a_state_file_that_cannot_be_read_is_set_aside_and_nothing_is_restored() {
    let master = master();
    let saved_dir = || saved_after_one_request(&master);
    let path = |dir: &tempfile::TempDir| dir.path().join(FILE_NAME);
    let aside = |dir: &tempfile::TempDir| dir.path().join("state.saved.unreadable");

    let other_key = saved_dir();
    assert!(open(other_key.path(), &self::master()).is_none());
    assert!(!path(&other_key).exists() && aside(&other_key).exists());

    let not_ours = saved_dir();
    std::fs::write(path(&not_ours), b"{\"state\": 1}\n").unwrap();
    assert!(open(not_ours.path(), &master).is_none());
    assert!(aside(&not_ours).exists());

    // Cut short, or changed: the entries are not those sealed.
    let damaged = saved_dir();
    let mut bytes = std::fs::read(path(&damaged)).unwrap();
    let len = bytes.len();
    bytes.truncate(len - 3);
    std::fs::write(path(&damaged), &bytes).unwrap();
    assert!(open(damaged.path(), &master).is_none());
    assert!(aside(&damaged).exists());

    // A file of the version before is sealed only in its seed: a damaged
    // entry is found as it is read, and what came before it stays.
    let older = tempfile::tempdir().unwrap();
    let mut bytes = saved_as_the_version_before(&master);
    let len = bytes.len();
    bytes.truncate(len - 3);
    std::fs::write(path(&older), &bytes).unwrap();
    let saved = open(older.path(), &master).expect("the header is whole");
    let engine = Engine::with_seed(4, 1000, saved.seed());
    assert!(matches!(
        saved.restore(&engine, NOW, Afterwards::Remove),
        Err(Unreadable::Entries(_))
    ));
    assert!(aside(&older).exists());
    let traffic = Traffic::in_engine(&engine);
    assert_eq!(traffic.remaining(&engine, NOW), vec![4, 2]);

    let none = tempfile::tempdir().unwrap();
    assert!(open(none.path(), &master).is_none());
    assert!(!aside(&none).exists());
}

/// Taken back by a process that writes checkpoints, the file stays until
/// the first one replaces it: a crash before then takes the same state
/// back once more (the crash's own fence in front of it), where it once
/// found nothing. Without checkpoints it is removed.
#[test]
fn a_state_taken_back_stays_until_a_checkpoint_replaces_it() {
    let master = master();
    let dir = saved_after_one_request(&master);
    let path = dir.path().join(FILE_NAME);
    let saved = open(dir.path(), &master).expect("saved");
    let first = Engine::with_seed(4, 1000, saved.seed());
    saved
        .restore(&first, NOW, Afterwards::LeaveToTheFirstCheckpoint)
        .unwrap();
    assert!(path.exists());

    // The process crashed before its first checkpoint: the next one takes
    // back the same state.
    let (after, restored) = taken_back(dir.path(), &master, NOW, Afterwards::Remove);
    assert_eq!(restored.entries, 3);
    let traffic = Traffic::in_engine(&after);
    assert_eq!(traffic.send(&after, NOW, traffic.nonce), Outcome::Replay);
    assert!(!path.exists());
}

/// Saving replaces the file whole: the state of the last stop, not an
/// older one beside or under it.
#[test]
fn each_stop_replaces_the_state_saved_before() {
    let master = master();
    let dir = saved_after_one_request(&master);
    let empty = Engine::new(4, 1000);
    assert_eq!(save(dir.path(), &master, &empty, NOW, None).unwrap(), 0);
    let (_, restored) = taken_back(dir.path(), &master, NOW, Afterwards::Remove);
    assert_eq!(restored.entries, 0);
}

/// Caps lowered between the two processes hold: what is past them is
/// dropped and counted, never every replay key (a nonce dropped could be
/// replayed).
#[test]
fn caps_lowered_since_the_save_hold_but_every_replay_key_is_kept() {
    let master = master();
    let dir = saved_after_one_request(&master);
    let saved = open(dir.path(), &master).expect("saved");
    let after = Engine::with_seed(4, 1000, saved.seed());
    after.pools().set_cap(after.pools().policy("five"), Some(0));
    let restored = saved.restore(&after, NOW, Afterwards::Remove).unwrap();
    assert_eq!(
        restored,
        Restored {
            entries: 3,
            dropped: 1,
            handover: None,
        }
    );
    let traffic = Traffic::in_engine(&after);
    assert_eq!(traffic.send(&after, NOW, traffic.nonce), Outcome::Replay);
}

/// A file the version before wrote is taken back (an upgrade keeps its
/// limits spent), but says nothing of being whole: the fence stands. Its
/// replay keys, without extra bits, refuse their requests all the same.
#[test]
fn a_state_saved_by_the_version_before_is_taken_back_behind_a_fence() {
    let master = master();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join(FILE_NAME),
        saved_as_the_version_before(&master),
    )
    .unwrap();
    let (after, restored) = taken_back(dir.path(), &master, NOW, Afterwards::Remove);
    assert_eq!(restored.entries, 3);
    assert_eq!(
        Handover::fence_after(restored.handover, None, PAST_SKEW),
        Err(NotWhole::NotHandedOver)
    );
    let traffic = Traffic::in_engine(&after);
    assert_eq!(traffic.send(&after, NOW, traffic.nonce), Outcome::Replay);
}

const PAST_SKEW: Duration = Duration::from_secs(300);

/// The final clock mark of the process that saved, and its fence.
fn final_mark() -> (Mark, Fence) {
    let mark = Mark {
        seq: 41,
        until: NOW,
    };
    (mark, Fence::at(1_763_999_000))
}

/// The state one request left, saved as handed over whole.
fn handed_over(master: &MasterKey) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::new(4, 1000);
    let traffic = Traffic::in_engine(&engine);
    traffic.send(&engine, NOW, traffic.nonce);
    let (mark, fence) = final_mark();
    let handover = Handover::new(mark, fence, PAST_SKEW);
    save(dir.path(), master, &engine, NOW, Some(handover)).unwrap();
    dir
}

/// Taken back whole, by the next process to read the mark: it keeps the
/// saving process's fence, and every replay key is there to refuse what
/// that process accepted.
#[test]
fn a_state_handed_over_whole_keeps_the_fence_of_the_process_that_saved_it() {
    let master = master();
    let dir = handed_over(&master);
    let (after, restored) = taken_back(dir.path(), &master, NOW, Afterwards::Remove);
    let (mark, fence) = final_mark();
    assert_eq!(
        Handover::fence_after(restored.handover, Some(mark), PAST_SKEW),
        Ok(fence)
    );
    // A past skew lowered since keeps nonces longer than needed: whole.
    assert_eq!(
        Handover::fence_after(restored.handover, Some(mark), PAST_SKEW / 2),
        Ok(fence)
    );
    let traffic = Traffic::in_engine(&after);
    assert_eq!(traffic.send(&after, NOW, traffic.nonce), Outcome::Replay);
}

/// Whatever happened after the save that its nonces cannot account for
/// puts the fence back: another process that started (a mark of another
/// number or time, or none at all: the file was removed and made anew), or
/// a past skew raised, which makes requests fresh again whose nonces the
/// saving process had forgotten.
#[test]
fn a_state_is_not_whole_once_another_process_ran_or_the_past_skew_grew() {
    let master = master();
    let dir = handed_over(&master);
    let (_, restored) = taken_back(dir.path(), &master, NOW, Afterwards::Remove);
    let handover = restored.handover;
    let (mark, _) = final_mark();
    let later = Mark {
        seq: mark.seq + 1,
        ..mark
    };
    let moved = Mark {
        until: NOW.saturating_add(Nanos::from_secs(2)),
        ..mark
    };
    for previous in [Some(later), Some(moved), None] {
        assert_eq!(
            Handover::fence_after(handover, previous, PAST_SKEW),
            Err(NotWhole::AnotherProcessRan),
            "{previous:?}"
        );
    }
    assert_eq!(
        Handover::fence_after(handover, Some(mark), PAST_SKEW + Duration::from_secs(1)),
        Err(NotWhole::PastSkewRaised)
    );
}

/// The attack on a whole state: its replay keys taken out (or entries of
/// another file put in) under the seal that says it is whole. The seal
/// covers the entries' digest, so such a file is set aside, and can lift
/// no fence.
#[test]
fn entries_changed_under_a_whole_states_seal_are_not_taken_back() {
    let master = master();
    let whole = handed_over(&master);
    let path = whole.path().join(FILE_NAME);
    let bytes = std::fs::read(&path).unwrap();

    // Its entries swapped for those of a state with no replay key.
    let other = tempfile::tempdir().unwrap();
    save(other.path(), &master, &Engine::new(4, 1000), NOW, None).unwrap();
    let other_bytes = std::fs::read(other.path().join(FILE_NAME)).unwrap();
    let mut forged = HEADER.to_vec();
    forged.extend_from_slice(&other_bytes[entries_in(&other_bytes)]);
    forged.extend_from_slice(&bytes[entries_in(&bytes).end..]);
    std::fs::write(&path, &forged).unwrap();
    assert!(open(whole.path(), &master).is_none());
    assert!(whole.path().join("state.saved.unreadable").exists());

    // One byte of an entry changed.
    let whole = handed_over(&master);
    let path = whole.path().join(FILE_NAME);
    let mut changed = std::fs::read(&path).unwrap();
    let last = entries_in(&changed).end - 1;
    changed[last] ^= 1;
    std::fs::write(&path, &changed).unwrap();
    assert!(open(whole.path(), &master).is_none());
}

/// Where the entries lie in a file of this version: after the header, up
/// to the line break before the seal, the last line.
fn entries_in(bytes: &[u8]) -> std::ops::Range<usize> {
    assert!(bytes.starts_with(HEADER));
    let seal_break = bytes[..bytes.len() - 1]
        .iter()
        .rposition(|&b| b == b'\n')
        .unwrap();
    HEADER.len()..seal_break
}

/// A file cut short at any byte (a crash in the middle of writing it, or
/// a full disk) is set aside: a cut file never opens, whichever part it
/// lost, and never panics the start.
#[test]
fn a_state_file_cut_short_anywhere_is_set_aside() {
    let master = master();
    let dir = handed_over(&master);
    let path = dir.path().join(FILE_NAME);
    let bytes = std::fs::read(&path).unwrap();
    for len in 0..bytes.len() {
        std::fs::write(&path, &bytes[..len]).unwrap();
        assert!(open(dir.path(), &master).is_none(), "cut to {len} bytes");
        assert!(!path.exists(), "cut to {len} bytes: not set aside");
    }
    std::fs::write(&path, &bytes).unwrap();
    assert!(open(dir.path(), &master).is_some());
}

/// The file changed after its digest was checked at the start, before it
/// was read (its entries are read a second time, in batches): what was
/// read is hashed again, and a file that no longer matches its seal takes
/// nothing back: the engine is left empty, not holding what the change
/// put in.
#[test]
fn a_state_file_changed_after_it_was_opened_takes_back_nothing() {
    let master = master();
    let dir = handed_over(&master);
    let path = dir.path().join(FILE_NAME);
    let saved = open(dir.path(), &master).expect("saved");
    // Changed in place (the open file is the same file), in its last
    // entry: every batch before it is read and imported first.
    let mut bytes = std::fs::read(&path).unwrap();
    let last = entries_in(&bytes).end - 1;
    bytes[last] ^= 1;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .write_all(&bytes)
        .unwrap();
    let after = Engine::with_seed(4, 1000, saved.seed());
    assert!(matches!(
        saved.restore(&after, NOW, Afterwards::Remove),
        Err(Unreadable::Changed)
    ));
    assert_eq!(after.occupancy(), Default::default());
    assert!(dir.path().join("state.saved.unreadable").exists());
}

/// A file the version before this one wrote (`warden-state 2`: the seal
/// on the line after the header, the entries after it) is taken back as
/// this version's: an upgrade keeps every limit spent, and a state handed
/// over whole keeps its fence.
#[test]
fn a_state_saved_by_version_2_is_taken_back_and_keeps_its_fence() {
    let master = master();
    let engine = Engine::new(4, 1000);
    let traffic = Traffic::in_engine(&engine);
    traffic.send(&engine, NOW, traffic.nonce);
    let mut entries = Encoded::new(Vec::new(), &engine);
    engine.take_each(|_| true, NOW, |each| entries.add(each));
    let (entries, digest, count) = entries.finish().unwrap();
    assert_eq!(count, 3);
    let (mark, fence) = final_mark();
    let seal = Seal {
        seed: hex::encode(engine.seed().as_bytes()),
        entries_sha256: hex::encode(digest),
        handover: Some(Handover::new(mark, fence, PAST_SKEW)),
    };
    let mut bytes = HEADER_V2.to_vec();
    bytes.extend_from_slice(
        master
            .seal(SEAL_CONTEXT, &serde_json::to_vec(&seal).unwrap())
            .as_bytes(),
    );
    bytes.push(b'\n');
    bytes.extend_from_slice(&entries);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(FILE_NAME), &bytes).unwrap();

    let (after, restored) = taken_back(dir.path(), &master, NOW, Afterwards::Remove);
    assert_eq!(restored.entries, 3);
    assert_eq!(
        Handover::fence_after(restored.handover, Some(mark), PAST_SKEW),
        Ok(fence)
    );
    let traffic = Traffic::in_engine(&after);
    assert_eq!(traffic.send(&after, NOW, traffic.nonce), Outcome::Replay);
    assert_eq!(traffic.remaining(&after, NOW), vec![3, 1]);

    // Its entries changed under that seal: set aside, as this version's.
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(dir.path().join(FILE_NAME), &bytes).unwrap();
    assert!(open(dir.path(), &master).is_none());
}

/// A checkpoint copies the state and leaves it: checks go on with it, and
/// a process started after a crash takes back what it held, behind its
/// fence (a checkpoint is never whole).
#[test]
fn a_checkpoint_leaves_the_state_in_place_and_is_taken_back_behind_a_fence() {
    let master = master();
    let dir = tempfile::tempdir().unwrap();
    let before = Engine::new(4, 1000);
    let traffic = Traffic::in_engine(&before);
    traffic.send(&before, NOW, traffic.nonce);
    assert_eq!(checkpoint(dir.path(), &master, &before, NOW).unwrap(), 3);
    assert_eq!(traffic.remaining(&before, NOW), vec![3, 1], "left in place");
    assert_eq!(traffic.send(&before, NOW, traffic.nonce), Outcome::Replay);

    let (after, restored) = taken_back(dir.path(), &master, NOW, Afterwards::Remove);
    assert_eq!(restored.entries, 3);
    assert_eq!(restored.handover, None);
    let traffic = Traffic::in_engine(&after);
    assert_eq!(traffic.remaining(&after, NOW), vec![3, 1]);
    assert_eq!(traffic.send(&after, NOW, traffic.nonce), Outcome::Replay);
}

/// Once the final save is written, a checkpoint still under way when the
/// process stops writes nothing: an older state, never whole, must not
/// replace the whole one.
#[test]
fn no_checkpoint_replaces_the_final_save() {
    let master = master();
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::new(4, 1000);
    let traffic = Traffic::in_engine(&engine);
    traffic.send(&engine, NOW, traffic.nonce);
    let writer = Writer::default();
    assert_eq!(
        writer
            .checkpoint(dir.path(), &master, &engine, NOW)
            .unwrap()
            .unwrap(),
        3
    );
    let (mark, fence) = final_mark();
    let handover = Handover::new(mark, fence, PAST_SKEW);
    writer
        .save(dir.path(), &master, &engine, NOW, Some(handover))
        .unwrap();
    assert!(
        writer
            .checkpoint(dir.path(), &master, &engine, NOW)
            .is_none()
    );
    let (_, restored) = taken_back(dir.path(), &master, NOW, Afterwards::Remove);
    assert_eq!((restored.entries, restored.handover), (3, Some(handover)));
}

/// A state of several batches spread over every shard, written a shard
/// at a time as the engine hands it over (a checkpoint copies, a save
/// takes), comes back entry for entry: none lost or doubled at a shard's
/// or a batch's end, every replay key still refused, every bucket as
/// spent.
#[test]
fn a_state_of_many_batches_comes_back_entry_for_entry() {
    let master = master();
    let nonces = 3 * HANDOFF_BATCH + 17;
    let buckets = 1_000;
    let before = Engine::new(8, nonces + 1);
    // Of 64 keys, so in every shard.
    let nonce = |engine: &Engine, i: usize| {
        engine.replay_key(&(i % 64).to_be_bytes(), &[b"nonce", &i.to_be_bytes()])
    };
    let bucket = |engine: &Engine, i: usize| engine.key(&i.to_be_bytes(), &[b"policy", b"five"]);
    let send = |engine: &Engine, nonce: Option<ReplayKey>, limits: &[(StateKey, Limit)]| {
        engine.decide(
            NOW,
            &Request {
                nonce: nonce.map(|n| (n, NOW.saturating_add(Nanos::from_secs(300)))),
                limits,
                cost: 1,
                commit: true,
            },
        )
    };
    for i in 0..nonces {
        send(&before, Some(nonce(&before, i)), &[]);
    }
    for i in 0..buckets {
        send(&before, None, &[(bucket(&before, i), five())]);
    }
    let held = before.occupancy();
    assert_eq!((held.nonces, held.buckets), (nonces, buckets));

    for take in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let written = if take {
            save(dir.path(), &master, &before, NOW, None).unwrap()
        } else {
            checkpoint(dir.path(), &master, &before, NOW).unwrap()
        };
        assert_eq!(written, nonces + buckets);
        let left = before.occupancy();
        assert_eq!(left.nonces + left.buckets, if take { 0 } else { written });

        let saved = open(dir.path(), &master).expect("saved");
        let after = Engine::with_seed(8, nonces + 1, saved.seed());
        let restored = saved.restore(&after, NOW, Afterwards::Remove).unwrap();
        assert_eq!((restored.entries, restored.dropped), (written, 0));
        assert_eq!(after.occupancy(), held, "taken={take}");
        for i in 0..nonces {
            assert_eq!(send(&after, Some(nonce(&after, i)), &[]), Outcome::Replay);
        }
        for i in 0..buckets {
            match send(&after, None, &[(bucket(&after, i), five())]) {
                Outcome::Limited { limits, .. } => assert_eq!(limits[0].remaining, 3, "{i}"),
                other => panic!("{other:?}"),
            }
        }
    }
}

/// Checks go on while a checkpoint is copied, a shard at a time: every
/// replay key accepted before it began (of 64 keys, so of every shard) is
/// in it (nonces are never dropped to make room), and nothing is in it
/// that the engine did not hold.
#[test]
fn a_checkpoint_taken_while_checks_go_on_holds_every_replay_key_accepted_before_it() {
    let master = master();
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::new(8, 1_000_000);
    let send = |i: u64| nonce_only(&engine, i, true);
    let before = 5_000;
    for i in 0..before {
        assert!(matches!(send(i), Outcome::Limited { allowed: true, .. }));
    }
    let checking = std::sync::atomic::AtomicBool::new(true);
    let (written, sent) = std::thread::scope(|scope| {
        let checks = scope.spawn(|| {
            let mut i = before;
            while checking.load(std::sync::atomic::Ordering::Relaxed) || i < before + 1_000 {
                send(i);
                i += 1;
            }
            i
        });
        let written = checkpoint(dir.path(), &master, &engine, NOW).unwrap();
        checking.store(false, std::sync::atomic::Ordering::Relaxed);
        (written, checks.join().unwrap())
    });
    assert!(written >= before as usize, "{written}");
    assert!(written <= sent as usize, "{written} of {sent}");

    let saved = open(dir.path(), &master).expect("saved");
    let after = Engine::with_seed(8, 1_000_000, saved.seed());
    assert_eq!(
        saved
            .restore(&after, NOW, Afterwards::Remove)
            .unwrap()
            .entries,
        written
    );
    let replayed = |i: u64| nonce_only(&after, i, false) == Outcome::Replay;
    assert!(
        (0..before).all(replayed),
        "a replay key accepted before the checkpoint is missing"
    );
    let kept = (before..sent).filter(|&i| replayed(i)).count();
    assert_eq!(
        kept,
        written - before as usize,
        "entries the engine never held"
    );
}

/// Request `i`, with a nonce and no limit, of one of 64 keys (so of every
/// shard); stored when `commit`.
fn nonce_only(engine: &Engine, i: u64, commit: bool) -> Outcome {
    engine.decide(
        NOW,
        &Request {
            nonce: Some((
                engine.replay_key(&(i % 64).to_be_bytes(), &[b"nonce", &i.to_be_bytes()]),
                NOW.saturating_add(Nanos::from_secs(300)),
            )),
            limits: &[],
            cost: 1,
            commit,
        },
    )
}
