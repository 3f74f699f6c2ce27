//! Rate-limit state kept across a graceful restart of a single process.
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
//! What this does not replace: the restart fence. A process killed (-9)
//! writes nothing, a disk may refuse the file, and a call still running at
//! the drain timeout may change state after it was written; nothing
//! accepted before the fence passes either way. Restored nonces matter for
//! the requests the fence cannot see: webhook deliveries that carry no
//! time (GitHub's), kept for `unsigned_replay_window`.
//!
//! The state ids are keyed with the process's state seed, so the file
//! carries the seed, sealed with the master key (it is what keeps an
//! attacker from choosing descriptors that collide), and the next process
//! keys its ids with it. The entries are written as a cluster handover
//! sends them: length-delimited `HandOffBatch` messages, pools by name.
//!
//! A file that cannot be read (damaged, another master key) is set aside
//! as `state.saved.unreadable` with a warning, and the process starts with
//! no state, as it did before this file existed: it is never a reason not
//! to serve. The entries themselves are not sealed: whoever can write the
//! store's directory can do worse (remove the key store), and a forged
//! file can only spend limits or keep replay keys, as traffic could, or
//! leave them full, as a crash does.

use std::io;
use std::path::{Path, PathBuf};

use prost::Message;
use warden_client::proto::HandOffBatch;

use crate::cluster::state::{add_entry, entries_of};
use crate::crypto::MasterKey;
use crate::engine::{Engine, Nanos, StateSeed};

/// The file, in the store's directory.
pub const FILE_NAME: &str = "state.saved";

const HEADER: &[u8] = b"warden-state 1\n";
const SEED_CONTEXT: &str = "warden saved state seed";
/// Entries per batch in the file (as a handover sends them).
const BATCH: usize = 8192;

/// State a previous process saved, opened: its seed, to key this process's
/// state ids with, and its entries, to restore once the engine exists.
pub struct Saved {
    path: PathBuf,
    seed: StateSeed,
    bytes: Vec<u8>,
    /// Where the batches begin in `bytes`.
    batches_at: usize,
}

/// What [`Saved::restore`] took back.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Restored {
    /// Entries read from the file.
    pub entries: usize,
    /// Of those, buckets and windows dropped for the state caps.
    pub dropped: usize,
}

/// Why a saved state was set aside.
#[derive(Debug, thiserror::Error)]
pub enum Unreadable {
    #[error("{0}")]
    Io(io::Error),
    #[error("not a state file warden wrote")]
    Header,
    #[error("its seed does not open with this master key")]
    Seed,
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
        Ok((seed, batches_at)) => Some(Saved {
            path,
            seed,
            bytes,
            batches_at,
        }),
        Err(why) => {
            set_aside(&path, &why);
            None
        }
    }
}

/// The seed and where the batches begin.
fn parse(bytes: &[u8], master: &MasterKey) -> Result<(StateSeed, usize), Unreadable> {
    let rest = bytes.strip_prefix(HEADER).ok_or(Unreadable::Header)?;
    let end = rest
        .iter()
        .position(|&b| b == b'\n')
        .ok_or(Unreadable::Header)?;
    let sealed = std::str::from_utf8(&rest[..end]).map_err(|_| Unreadable::Header)?;
    let seed: [u8; 16] = master
        .open(SEED_CONTEXT, sealed)
        .ok()
        .and_then(|s| s.try_into().ok())
        .ok_or(Unreadable::Seed)?;
    Ok((StateSeed::from_bytes(seed), HEADER.len() + end + 1))
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
    /// a truer one than none). The engine's caps hold: with caps lowered
    /// since the state was saved, what is past them is dropped
    /// ([`Engine::import`]).
    pub fn restore(self, engine: &Engine, now: Nanos) -> Result<Restored, Unreadable> {
        let mut rest = &self.bytes[self.batches_at..];
        let mut restored = Restored::default();
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
        // state it joins.
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

/// Takes every entry out of `engine` and writes them, with the seed their
/// ids are keyed with, to `dir`, replacing any file there atomically; the
/// number written. Called once the last call is answered.
pub fn save(dir: &Path, master: &MasterKey, engine: &Engine, now: Nanos) -> io::Result<usize> {
    let entries = engine.take_slots(|_| true, now);
    let names = engine.pools().wire_names();
    let mut bytes = HEADER.to_vec();
    bytes.extend_from_slice(
        master
            .seal(SEED_CONTEXT, engine.seed().as_bytes())
            .as_bytes(),
    );
    bytes.push(b'\n');
    for chunk in entries.chunks(BATCH) {
        let mut batch = HandOffBatch::default();
        for &entry in chunk {
            add_entry(&mut batch, entry, &names);
        }
        batch
            .encode_length_delimited(&mut bytes)
            .expect("a Vec grows as needed");
    }
    crate::private_file::replace(&dir.join(FILE_NAME), &bytes)?;
    Ok(entries.len())
}

#[cfg(test)]
mod tests;
