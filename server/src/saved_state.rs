//! Rate-limit state kept across a restart of a single process: whole
//! across a graceful one, up to the last checkpoint across a crash.
//!
//! Buckets, windows, failure budgets and nonces live in memory. A cluster
//! node hands them to the next owners when it stops (SIGTERM); a single
//! process had nowhere to put them, so every restart for a config change or
//! an upgrade gave each limit its burst again and each source locked out
//! for guessing signatures a fresh budget. So a single process with
//! `[store]` writes its state to `state.saved` once the last call is
//! answered, and the next process takes it back before it serves and
//! removes the file.
//!
//! While it serves, the process also writes checkpoints of its state to
//! the same file (`[store] save_state_every`), copied without stopping
//! checks ([`checkpoint`]): a crash then loses only what changed since the
//! last one. A checkpoint is never whole (below).
//!
//! A state handed over whole lets the next process go without the restart
//! fence (`freshness`): DESIGN.md's "the fence covers it (or state
//! is handed over)". The fence is there because a process that starts
//! cannot know which nonces the one before accepted; a state that holds
//! every one of them can. So when the whole of it is certain, the next
//! process keeps the saving process's fence and serves fresh requests at
//! once, where after a crash they are STALE for the future skew. Whole
//! means ([`Handover`]):
//! - written after the last call was answered (a drain that timed out
//!   may have let a call change state after the save: not whole);
//! - after the process's final clock mark, whose number the file carries:
//!   the next process reads that same mark at start, or another process
//!   ran in between (one that did not remove the file, then crashed) and
//!   its nonces are not in it;
//! - and kept at least as long as the next process would keep them: a
//!   past skew raised since makes requests fresh again whose nonces the
//!   saving process had already forgotten.
//!
//! Anything less, and the state is still taken back but the fence stands,
//! as it always did.
//!
//! The state ids are keyed with the process's state seed, so the file
//! carries the seed (it is what keeps an attacker from choosing
//! descriptors that collide), and the next process keys its ids with it.
//! The entries are written as a cluster handover sends them:
//! length-delimited `HandOffBatch` messages, pools by name. The seed, the
//! entries' SHA-256 and the handover are sealed with the master key: a
//! file someone else wrote or changed is not taken back, and cannot lift a
//! fence.
//!
//! A file that cannot be read (damaged, changed, another master key) is
//! set aside as `state.saved.unreadable` with a warning, and the process
//! starts with no state, as after a crash: it is never a reason not to
//! serve. A file written by the version before (`warden-state 1`, seed
//! alone sealed) is taken back, and never lifts a fence.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use prost::Message;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use warden_client::proto::HandOffBatch;

use crate::clock_mark::Mark;
use crate::cluster::state::{HANDOFF_BATCH, add_entry, entries_of};
use crate::crypto::MasterKey;
use crate::engine::{Engine, Entry, Nanos, StateSeed};
use crate::freshness::Fence;

/// The file, in the store's directory.
pub const FILE_NAME: &str = "state.saved";

const HEADER: &[u8] = b"warden-state 2\n";
/// Room enough for the sealed line ahead of the entries (a few hundred
/// bytes), so that putting it in moves the entries without growing.
const SEAL_ROOM: usize = 4096;
const SEAL_CONTEXT: &str = "warden saved state";
/// The version before: its seed alone sealed, and no handover.
const HEADER_V1: &[u8] = b"warden-state 1\n";
const SEED_CONTEXT_V1: &str = "warden saved state seed";

/// The saving process's word that the file holds all it accepted (see the
/// module's doc), and what the next process needs to go on from it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Handover {
    /// Its final clock mark, written after the last call was answered.
    pub mark_seq: u64,
    pub mark_until_ns: u64,
    /// The first second its restart fence let through: it covers every
    /// process before it, as the next process's fence must.
    pub fence: i64,
    /// How long after its timestamp it kept a request's nonce.
    pub past_skew_s: u64,
}

/// Why a state taken back does not lift the restart fence. Each is said
/// in the start's log line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NotWhole {
    /// Saved by the version before, or after a drain that timed out, or
    /// without a final clock mark.
    NotHandedOver,
    /// The clock mark moved since the save: another process ran.
    AnotherProcessRan,
    /// The past skew was raised since: the saving process forgot nonces
    /// that are fresh again.
    PastSkewRaised,
}

impl NotWhole {
    pub fn as_str(self) -> &'static str {
        match self {
            NotWhole::NotHandedOver => {
                "the process that saved it did not say it was whole (a drain that timed out, a final clock mark not written, or an older version)"
            }
            NotWhole::AnotherProcessRan => {
                "the clock mark moved since it was saved: another process ran in between"
            }
            NotWhole::PastSkewRaised => {
                "check.past_skew was raised since: requests whose nonces it forgot are fresh again"
            }
        }
    }
}

impl Handover {
    /// What the saving process hands over, stopped after its last call
    /// with `mark` as its final clock mark.
    pub fn new(mark: Mark, fence: Fence, past_skew: Duration) -> Self {
        Self {
            mark_seq: mark.seq,
            mark_until_ns: mark.until.get(),
            fence: fence.first_second(),
            past_skew_s: past_skew.as_secs(),
        }
    }

    /// The fence of the next process, which read `previous` as the clock
    /// mark at its start and keeps nonces for `past_skew`: the saving
    /// process's own, or why it must fence as after a crash.
    pub fn fence_after(
        handover: Option<Self>,
        previous: Option<Mark>,
        past_skew: Duration,
    ) -> Result<Fence, NotWhole> {
        let h = handover.ok_or(NotWhole::NotHandedOver)?;
        let saved_at = Mark {
            seq: h.mark_seq,
            until: Nanos::new(h.mark_until_ns),
        };
        if previous != Some(saved_at) {
            return Err(NotWhole::AnotherProcessRan);
        }
        if past_skew.as_secs() > h.past_skew_s {
            return Err(NotWhole::PastSkewRaised);
        }
        Ok(Fence::at(h.fence))
    }
}

/// What is sealed at the head of the file.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Seal {
    /// The state seed, in hex.
    seed: String,
    /// SHA-256 of the entries (every byte after the seal's line), in hex.
    entries_sha256: String,
    handover: Option<Handover>,
}

/// State a previous process saved, opened: its seed, to key this process's
/// state ids with, and its entries, to restore once the engine exists.
pub struct Saved {
    path: PathBuf,
    seed: StateSeed,
    handover: Option<Handover>,
    bytes: Vec<u8>,
    /// Where the batches begin in `bytes`.
    batches_at: usize,
}

/// What [`Saved::restore`] took back.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Restored {
    /// Entries read from the file.
    pub entries: usize,
    /// Buckets and windows lost for the state caps (those past them that
    /// forgave the least).
    pub dropped: usize,
    /// The saving process's word that they are all it accepted.
    pub handover: Option<Handover>,
}

/// Why a saved state was set aside.
#[derive(Debug, thiserror::Error)]
pub enum Unreadable {
    #[error("{0}")]
    Io(io::Error),
    #[error("not a state file warden wrote")]
    Header,
    #[error("its seal does not open with this master key")]
    Seal,
    #[error("its entries are not those it was saved with")]
    Changed,
    #[error("an entry is damaged: {0}")]
    Entries(String),
}

/// Opens the state the previous process saved in `dir`; `None` when there
/// is none, or when it cannot be read (set aside, with a warning).
pub fn open(dir: &Path, master: &MasterKey) -> Option<Saved> {
    let path = dir.join(FILE_NAME);
    let bytes = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return None,
        Err(e) => {
            set_aside(&path, &Unreadable::Io(e));
            return None;
        }
    };
    match parse(&bytes, master) {
        Ok(Head {
            seed,
            handover,
            batches_at,
        }) => Some(Saved {
            path,
            seed,
            handover,
            bytes,
            batches_at,
        }),
        Err(why) => {
            set_aside(&path, &why);
            None
        }
    }
}

/// Says so when a cluster node finds a state a single process saved in
/// its directory (the process became a node): a node's state comes from
/// the other nodes and its slots' fences, so the file is left as it is.
pub fn not_taken_back(dir: &Path) {
    let path = dir.join(FILE_NAME);
    if path.exists() {
        tracing::warn!(
            event = "saved_state_not_taken_back",
            path = %path.display(),
            "a single process saved its rate-limit state here; a cluster node does not take it back (its limits start full, as after a crash). Remove the file once this directory serves a cluster for good"
        );
    }
}

/// What the head of the file says.
struct Head {
    seed: StateSeed,
    handover: Option<Handover>,
    /// Where the batches begin.
    batches_at: usize,
}

fn parse(bytes: &[u8], master: &MasterKey) -> Result<Head, Unreadable> {
    let (version, rest) = if let Some(rest) = bytes.strip_prefix(HEADER) {
        (2, rest)
    } else if let Some(rest) = bytes.strip_prefix(HEADER_V1) {
        (1, rest)
    } else {
        return Err(Unreadable::Header);
    };
    let end = rest
        .iter()
        .position(|&b| b == b'\n')
        .ok_or(Unreadable::Header)?;
    let sealed = std::str::from_utf8(&rest[..end]).map_err(|_| Unreadable::Header)?;
    let batches_at = bytes.len() - rest.len() + end + 1;
    if version == 1 {
        let seed = master
            .open(SEED_CONTEXT_V1, sealed)
            .ok()
            .and_then(|s| <[u8; 16]>::try_from(s).ok())
            .ok_or(Unreadable::Seal)?;
        return Ok(Head {
            seed: StateSeed::from_bytes(seed),
            handover: None,
            batches_at,
        });
    }
    let seal: Seal = master
        .open(SEAL_CONTEXT, sealed)
        .ok()
        .and_then(|json| serde_json::from_slice(&json).ok())
        .ok_or(Unreadable::Seal)?;
    let mut seed = [0; 16];
    hex::decode_to_slice(&seal.seed, &mut seed).map_err(|_| Unreadable::Seal)?;
    if hex::encode(Sha256::digest(&bytes[batches_at..])) != seal.entries_sha256 {
        return Err(Unreadable::Changed);
    }
    Ok(Head {
        seed: StateSeed::from_bytes(seed),
        handover: seal.handover,
        batches_at,
    })
}

fn set_aside(path: &Path, why: &Unreadable) {
    let mut aside = path.as_os_str().to_owned();
    aside.push(".unreadable");
    let moved = std::fs::rename(path, &aside);
    tracing::warn!(
        event = "saved_state_unreadable",
        path = %path.display(),
        error = %why,
        set_aside = moved.is_ok(),
        "the rate-limit state the previous process saved cannot be read; starting without it (limits start full, as after a crash)"
    );
}

impl Saved {
    /// The seed the saved state ids are keyed with.
    pub fn seed(&self) -> StateSeed {
        self.seed
    }

    /// Restores every entry into `engine` (keyed with [`Self::seed`]) and
    /// removes the file. Entries a damaged batch holds are not restored,
    /// nor any after it (what came before stays: a partial state is still
    /// a truer one than none), and the file is set aside. The engine's
    /// caps hold: with caps lowered since the state was saved, what is
    /// past them is dropped ([`Engine::import`]).
    pub fn restore(self, engine: &Engine, now: Nanos) -> Result<Restored, Unreadable> {
        let mut rest = &self.bytes[self.batches_at..];
        let mut restored = Restored {
            handover: self.handover,
            ..Restored::default()
        };
        let mut damaged = None;
        while !rest.is_empty() {
            let batch = match HandOffBatch::decode_length_delimited(&mut rest) {
                Ok(batch) => batch,
                Err(e) => {
                    damaged = Some(e.to_string());
                    break;
                }
            };
            match entries_of(&batch, engine) {
                Ok(entries) => {
                    restored.dropped += engine.import(&entries, now);
                    restored.entries += entries.len();
                }
                Err(why) => {
                    damaged = Some(why.to_owned());
                    break;
                }
            }
        }
        if let Some(why) = damaged {
            let why = Unreadable::Entries(why);
            set_aside(&self.path, &why);
            return Err(why);
        }
        // Taken back: a crash later must not bring back this older state
        // over whatever came after it. Left behind, it would be taken back
        // once more at the next start: older, and so no stricter than the
        // state it joins, and never whole again (the clock mark moved).
        if let Err(e) = crate::private_file::remove(&self.path) {
            tracing::warn!(
                event = "saved_state_not_removed",
                path = %self.path.display(),
                error = %e,
                "took the saved rate-limit state back but could not remove its file"
            );
        }
        Ok(restored)
    }
}

/// The file's one writer at a time: checkpoints while the process serves,
/// then the final save, after which no checkpoint may replace it (one
/// under way when the process stops would otherwise put an older, never
/// whole state over the whole one).
#[derive(Default)]
pub struct Writer {
    /// Set by the final save.
    closed: parking_lot::Mutex<bool>,
}

impl Writer {
    /// Writes a checkpoint ([`checkpoint`]); `None` once the final save
    /// has been written.
    pub fn checkpoint(
        &self,
        dir: &Path,
        master: &MasterKey,
        engine: &Engine,
        now: Nanos,
    ) -> Option<io::Result<usize>> {
        let closed = self.closed.lock();
        (!*closed).then(|| checkpoint(dir, master, engine, now))
    }

    /// The final save ([`save`]): after it, no checkpoint is written.
    pub fn save(
        &self,
        dir: &Path,
        master: &MasterKey,
        engine: &Engine,
        now: Nanos,
        handover: Option<Handover>,
    ) -> io::Result<usize> {
        let mut closed = self.closed.lock();
        *closed = true;
        save(dir, master, engine, now, handover)
    }
}

/// Takes every entry out of `engine` and writes them, with the seed their
/// ids are keyed with and the handover when the process can give its word
/// on it, to `dir`, replacing any file there atomically; the number
/// written. Called once the last call is answered.
pub fn save(
    dir: &Path,
    master: &MasterKey,
    engine: &Engine,
    now: Nanos,
    handover: Option<Handover>,
) -> io::Result<usize> {
    let mut file = Encoded::new(engine);
    engine.take_each(|_| true, now, |entries| file.add(entries));
    file.write(dir, master, engine, handover)
}

/// Writes a copy of every entry, left in `engine`, to `dir` as [`save`]
/// does: a checkpoint, so that a process killed (-9) or crashed loses
/// only what changed since. Never whole (checks go on while it is
/// copied): the next process takes it back behind its fence. Taking it
/// back is safe however old it is: each entry is one the engine held, so
/// the state it makes lies between none, as after a crash without it, and
/// the one the process held when it stopped.
pub fn checkpoint(
    dir: &Path,
    master: &MasterKey,
    engine: &Engine,
    now: Nanos,
) -> io::Result<usize> {
    let mut file = Encoded::new(engine);
    engine.copy_each(now, |entries| file.add(entries));
    file.write(dir, master, engine, None)
}

/// A state file's entries, encoded as the engine hands them over a shard
/// at a time. Why: gathered into one list first, a state was held twice
/// more while it was written (a 192 MB state took 580 MB more at the peak
/// of each checkpoint: an OOM kill in a container sized for the state,
/// and with it the loss the checkpoint is there to prevent). Now only the
/// file's bytes, about 15 per entry, and one shard's entries are.
struct Encoded {
    bytes: Vec<u8>,
    batch: HandOffBatch,
    in_batch: usize,
    count: usize,
    names: Vec<String>,
}

impl Encoded {
    fn new(engine: &Engine) -> Self {
        let held = engine.occupancy();
        let entries = held.buckets + held.windows + held.nonces;
        let mut bytes = Vec::with_capacity(HEADER.len() + SEAL_ROOM + entries * 16);
        bytes.extend_from_slice(HEADER);
        Self {
            bytes,
            batch: HandOffBatch::default(),
            in_batch: 0,
            count: 0,
            names: engine.pools().wire_names(),
        }
    }

    fn add(&mut self, entries: &[Entry]) {
        for &entry in entries {
            add_entry(&mut self.batch, entry, &self.names);
            self.in_batch += 1;
            if self.in_batch == HANDOFF_BATCH {
                self.end_batch();
            }
        }
        self.count += entries.len();
    }

    fn end_batch(&mut self) {
        std::mem::take(&mut self.batch)
            .encode_length_delimited(&mut self.bytes)
            .expect("a Vec grows as needed");
        self.in_batch = 0;
    }

    /// Seals what was added (see [`Seal`]) and replaces the file in `dir`
    /// with it; the number of entries written.
    fn write(
        mut self,
        dir: &Path,
        master: &MasterKey,
        engine: &Engine,
        handover: Option<Handover>,
    ) -> io::Result<usize> {
        if self.in_batch > 0 {
            self.end_batch();
        }
        let mut bytes = self.bytes;
        let seal = Seal {
            seed: hex::encode(engine.seed().as_bytes()),
            entries_sha256: hex::encode(Sha256::digest(&bytes[HEADER.len()..])),
            handover,
        };
        let seal = serde_json::to_vec(&seal).expect("a seal serializes");
        let mut line = master.seal(SEAL_CONTEXT, &seal).into_bytes();
        line.push(b'\n');
        // Put in after the header, ahead of the entries it seals (moved in
        // place, into room reserved for it: the entries of a large state
        // are not copied aside).
        bytes.splice(HEADER.len()..HEADER.len(), line);
        crate::private_file::replace(&dir.join(FILE_NAME), &bytes)?;
        Ok(self.count)
    }
}

#[cfg(test)]
mod tests;
