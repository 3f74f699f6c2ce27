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
//! fence. The file (`warden-state 3`):
//!
//! ```text
//! warden-state 3\n
//! <the entries: length-delimited HandOffBatch messages>
//! \n<the seal, in hex>\n
//! ```
//!
//! The seal comes last so that the entries go to disk as they are encoded
//! and come back as they are read: the file is never held in memory,
//! whose size is the state's (a state the caps fill is 257 MB; its file
//! made in memory once took 247 MB more at every checkpoint's peak).
//!
//! A file that cannot be read (damaged, changed, another master key) is
//! set aside as `state.saved.unreadable` with a warning, and the process
//! starts with no state, as after a crash: it is never a reason not to
//! serve. Files the versions before wrote are taken back: `warden-state
//! 2` (its seal on the line after the header) as this version's, and
//! `warden-state 1` (seed alone sealed) never lifting a fence. A version
//! before this one cannot read this one's file: it sets it aside and
//! starts as after a crash.

use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::ops::Range;
use std::os::unix::fs::FileExt;
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

const HEADER: &[u8] = b"warden-state 3\n";
/// The longest seal line read (a seal is under a thousand bytes).
const SEAL_ROOM: usize = 4096;
/// The largest batch taken back (one of `HANDOFF_BATCH` entries of the
/// largest kind is well under 1 MiB): a damaged length asks for no more.
const BATCH_ROOM: u64 = 16 << 20;
const SEAL_CONTEXT: &str = "warden saved state";
/// The version before: the seal on the line after the header, ahead of
/// the entries.
const HEADER_V2: &[u8] = b"warden-state 2\n";
/// The version before that: its seed alone sealed, and no handover.
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

/// State a previous process saved, opened and its seal checked: its seed,
/// to key this process's state ids with, and its entries, to restore once
/// the engine exists.
pub struct Saved {
    path: PathBuf,
    file: File,
    head: Head,
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

/// What becomes of the file once its state is taken back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Afterwards {
    /// Removed: with no checkpoint to replace it, it would be taken back
    /// again after any crash, however long the process served after it
    /// (safe, as an older state always is, but it would bring back a
    /// replay key `Forget` removed since).
    Remove,
    /// Left until the process's first checkpoint replaces it. Why: removed,
    /// a crash before that checkpoint was written (it is written at once,
    /// but a large state takes a second, and a checkpoint can fail: a full
    /// disk) left the next process no state at all, every limit full again.
    LeaveToTheFirstCheckpoint,
}

/// Why a saved state was set aside.
#[derive(Debug, thiserror::Error)]
pub enum Unreadable {
    #[error("{0}")]
    Io(io::Error),
    #[error("not a state file warden wrote")]
    Header,
    #[error("it does not end in a seal: cut short")]
    Cut,
    #[error("its seal does not open with this master key")]
    Seal,
    #[error("its entries are not those it was saved with")]
    Changed,
    #[error("an entry is damaged: {0}")]
    Entries(String),
}

/// Opens the state the previous process saved in `dir` and checks its
/// seal and its entries' digest; `None` when there is none, or when it
/// cannot be read (set aside, with a warning).
pub fn open(dir: &Path, master: &MasterKey) -> Option<Saved> {
    let path = dir.join(FILE_NAME);
    let file = match File::open(&path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return None,
        Err(e) => {
            set_aside(&path, &Unreadable::Io(e));
            return None;
        }
    };
    match read_head(&file, master) {
        Ok(head) => Some(Saved { path, file, head }),
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

/// What a file's seal says, and where its entries lie.
struct Head {
    seed: StateSeed,
    handover: Option<Handover>,
    entries: Range<u64>,
    /// The entries' SHA-256, sealed (none in a file of version 1).
    digest: Option<[u8; 32]>,
}

/// Reads the seal and checks it, then the entries' digest: nothing of a
/// file someone changed enters the engine.
fn read_head(file: &File, master: &MasterKey) -> Result<Head, Unreadable> {
    let len = file.metadata().map_err(Unreadable::Io)?.len();
    let first = read_at(file, 0, len.min((HEADER.len() + SEAL_ROOM) as u64))?;
    let (sealed, entries) = if first.starts_with(HEADER) {
        // The seal is the last line; the entries end at the line's break
        // before it (a seal, in hex, holds none).
        let after_header = len - HEADER.len() as u64;
        let tail_len = after_header.min(SEAL_ROOM as u64 + 2);
        let tail = read_at(file, len - tail_len, tail_len)?;
        let line = tail.strip_suffix(b"\n").ok_or(Unreadable::Cut)?;
        let at = line
            .iter()
            .rposition(|&b| b == b'\n')
            .ok_or(Unreadable::Cut)?;
        let sealed = &line[at + 1..];
        if sealed.is_empty() || !sealed.iter().all(u8::is_ascii_hexdigit) {
            return Err(Unreadable::Cut);
        }
        let entries_end = len - tail_len + at as u64;
        (sealed.to_vec(), HEADER.len() as u64..entries_end)
    } else {
        let header = [HEADER_V2, HEADER_V1]
            .into_iter()
            .find(|h| first.starts_with(h))
            .ok_or(Unreadable::Header)?;
        let rest = &first[header.len()..];
        let end = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or(Unreadable::Header)?;
        let entries_at = (header.len() + end + 1) as u64;
        (rest[..end].to_vec(), entries_at..len)
    };
    let sealed = std::str::from_utf8(&sealed).map_err(|_| Unreadable::Header)?;
    if first.starts_with(HEADER_V1) {
        let seed = master
            .open(SEED_CONTEXT_V1, sealed)
            .ok()
            .and_then(|s| <[u8; 16]>::try_from(s).ok())
            .ok_or(Unreadable::Seal)?;
        return Ok(Head {
            seed: StateSeed::from_bytes(seed),
            handover: None,
            entries,
            digest: None,
        });
    }
    let seal: Seal = master
        .open(SEAL_CONTEXT, sealed)
        .ok()
        .and_then(|json| serde_json::from_slice(&json).ok())
        .ok_or(Unreadable::Seal)?;
    let mut seed = [0; 16];
    hex::decode_to_slice(&seal.seed, &mut seed).map_err(|_| Unreadable::Seal)?;
    let mut digest = [0; 32];
    hex::decode_to_slice(&seal.entries_sha256, &mut digest).map_err(|_| Unreadable::Seal)?;
    let mut read = Hashed::new(entries_of_file(file, &entries)?);
    io::copy(&mut read, &mut io::sink()).map_err(Unreadable::Io)?;
    if read.digest() != digest {
        return Err(Unreadable::Changed);
    }
    Ok(Head {
        seed: StateSeed::from_bytes(seed),
        handover: seal.handover,
        entries,
        digest: Some(digest),
    })
}

fn read_at(file: &File, at: u64, len: u64) -> Result<Vec<u8>, Unreadable> {
    let mut bytes = vec![0; len as usize];
    file.read_exact_at(&mut bytes, at).map_err(Unreadable::Io)?;
    Ok(bytes)
}

/// The bytes of `file` in `range`, read through a buffer.
fn entries_of_file<'a>(
    file: &'a File,
    range: &Range<u64>,
) -> Result<impl Read + use<'a>, Unreadable> {
    let mut file = file;
    file.seek(SeekFrom::Start(range.start))
        .map_err(Unreadable::Io)?;
    Ok(BufReader::with_capacity(
        1 << 16,
        file.take(range.end - range.start),
    ))
}

/// A reader that hashes what passes through it.
struct Hashed<R> {
    inner: R,
    sha: Sha256,
}

impl<R: Read> Hashed<R> {
    fn new(inner: R) -> Self {
        Self {
            inner,
            sha: Sha256::new(),
        }
    }

    fn digest(self) -> [u8; 32] {
        self.sha.finalize().into()
    }
}

impl<R: Read> Read for Hashed<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.sha.update(&buf[..n]);
        Ok(n)
    }
}

/// The next length-delimited batch of `read`, its bytes read into `buf`;
/// `None` at the end.
fn next_batch(read: &mut impl Read, buf: &mut Vec<u8>) -> Result<Option<HandOffBatch>, String> {
    let mut len = 0u64;
    for i in 0..10 {
        let mut byte = [0];
        match read.read_exact(&mut byte) {
            Err(e) if i == 0 && e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                return Err("cut short in a batch's length".into());
            }
            Err(e) => return Err(e.to_string()),
            Ok(()) => {}
        }
        len |= u64::from(byte[0] & 0x7f) << (7 * i);
        if byte[0] < 0x80 {
            if len > BATCH_ROOM {
                return Err(format!("a batch of {len} bytes"));
            }
            buf.resize(len as usize, 0);
            read.read_exact(buf).map_err(|e| match e.kind() {
                io::ErrorKind::UnexpectedEof => "cut short in a batch".to_owned(),
                _ => e.to_string(),
            })?;
            return HandOffBatch::decode(&buf[..])
                .map(Some)
                .map_err(|e| e.to_string());
        }
    }
    Err("a batch's length runs past ten bytes".into())
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
        self.head.seed
    }

    /// Restores every entry into `engine` (keyed with [`Self::seed`]), and
    /// removes the file or leaves it ([`Afterwards`]). Entries a damaged batch holds are not restored,
    /// nor any after it (what came before stays: a partial state is still
    /// a truer one than none), and the file is set aside. The engine's
    /// caps hold: with caps lowered since the state was saved, what is
    /// past them is dropped ([`Engine::import`]). Read a batch at a time,
    /// and hashed again as it is: a file changed since [`open`] checked it
    /// takes back nothing (`engine`, which nothing reads yet, is emptied).
    pub fn restore(
        self,
        engine: &Engine,
        now: Nanos,
        afterwards: Afterwards,
    ) -> Result<Restored, Unreadable> {
        let mut restored = Restored {
            handover: self.head.handover,
            ..Restored::default()
        };
        let mut read = match entries_of_file(&self.file, &self.head.entries) {
            Ok(read) => Hashed::new(read),
            Err(why) => {
                set_aside(&self.path, &why);
                return Err(why);
            }
        };
        let mut buf = Vec::new();
        let mut damaged = None;
        loop {
            let batch = match next_batch(&mut read, &mut buf) {
                Ok(Some(batch)) => batch,
                Ok(None) => break,
                Err(why) => {
                    damaged = Some(why);
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
        if let Some(sealed) = self.head.digest {
            let unverified = match io::copy(&mut read, &mut io::sink()) {
                Err(e) => Some(Unreadable::Io(e)),
                Ok(_) if read.digest() != sealed => Some(Unreadable::Changed),
                Ok(_) => None,
            };
            if let Some(why) = unverified {
                engine.take_each(|_| true, now, |_| {});
                set_aside(&self.path, &why);
                return Err(why);
            }
        }
        if let Some(why) = damaged {
            let why = Unreadable::Entries(why);
            set_aside(&self.path, &why);
            return Err(why);
        }
        // Left behind, it is taken back once more after a crash: older, and
        // so no stricter than the state it joins, and never whole again
        // (the clock mark moved).
        if afterwards == Afterwards::Remove
            && let Err(e) = crate::private_file::remove(&self.path)
        {
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
    write(dir, master, engine, handover, |each| {
        engine.take_each(|_| true, now, each)
    })
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
    write(dir, master, engine, None, |each| {
        engine.copy_each(now, each)
    })
}

/// Replaces the file in `dir` with the entries `walk` hands over a shard
/// at a time, written as they come, then their seal ([`Seal`]); the
/// number written.
fn write(
    dir: &Path,
    master: &MasterKey,
    engine: &Engine,
    handover: Option<Handover>,
    walk: impl FnOnce(&mut dyn FnMut(&[Entry])),
) -> io::Result<usize> {
    let path = dir.join(FILE_NAME);
    let written = crate::private_file::replace_with(&path, |out| {
        out.write_all(HEADER)?;
        let mut entries = Encoded::new(out, engine);
        walk(&mut |each| entries.add(each));
        let (out, digest, count) = entries.finish()?;
        let seal = Seal {
            seed: hex::encode(engine.seed().as_bytes()),
            entries_sha256: hex::encode(digest),
            handover,
        };
        let seal = serde_json::to_vec(&seal).expect("a seal serializes");
        out.write_all(b"\n")?;
        out.write_all(master.seal(SEAL_CONTEXT, &seal).as_bytes())?;
        out.write_all(b"\n")?;
        Ok(count)
    })?;
    Ok(written.1)
}

/// A state file's entries, encoded and written as the engine hands them
/// over a shard at a time, and hashed for the seal. Why: gathered into
/// one list first, a state was held twice more while it was written (a
/// 192 MB state took 580 MB more at the peak of each checkpoint: an OOM
/// kill in a container sized for the state, and with it the loss the
/// checkpoint is there to prevent); encoded into the file's bytes first,
/// 0.85 times more. Now one shard's entries and one batch are.
struct Encoded<W> {
    out: W,
    sha: Sha256,
    batch: HandOffBatch,
    in_batch: usize,
    count: usize,
    names: Vec<String>,
    encoded: Vec<u8>,
    /// The first write that failed: the walk goes on (it cannot be
    /// stopped), and nothing more is written.
    failed: Option<io::Error>,
}

impl<W: Write> Encoded<W> {
    fn new(out: W, engine: &Engine) -> Self {
        Self {
            out,
            sha: Sha256::new(),
            batch: HandOffBatch::default(),
            in_batch: 0,
            count: 0,
            names: engine.pools().wire_names(),
            encoded: Vec::new(),
            failed: None,
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
        let batch = std::mem::take(&mut self.batch);
        self.in_batch = 0;
        if self.failed.is_some() {
            return;
        }
        self.encoded.clear();
        batch
            .encode_length_delimited(&mut self.encoded)
            .expect("a Vec grows as needed");
        self.sha.update(&self.encoded);
        if let Err(e) = self.out.write_all(&self.encoded) {
            self.failed = Some(e);
        }
    }

    /// Ends the last batch: the writer, the entries' SHA-256 and their
    /// number, or the first write that failed.
    fn finish(mut self) -> io::Result<(W, [u8; 32], usize)> {
        if self.in_batch > 0 {
            self.end_batch();
        }
        match self.failed {
            Some(e) => Err(e),
            None => Ok((self.out, self.sha.finalize().into(), self.count)),
        }
    }
}

#[cfg(test)]
mod tests;
