//! The audit log: every admin change and every security denial, append-only
//! and hash-chained under a key ([`chain`]). `warden audit verify` walks
//! every file of the chain and names the first broken record.
//!
//! - Admin changes are written and fsynced before the change is
//!   acknowledged.
//! - Security denials are aggregated per subject and window ([`denials`])
//!   and written once per window; other background records (alerts) go
//!   through a bounded queue to a writer that appends and fsyncs in
//!   batches. Nothing on the check path ever waits for the disk; what does
//!   not fit, or cannot be written, is dropped and counted
//!   (`warden_audit_dropped_total`).
//! - The active file is `audit.log`; past `max_file_bytes` it is renamed to
//!   `audit.<first seq, 20 digits>.log` and a new one begun, the chain
//!   carried across. A start reads the active file only (and the last
//!   record before it); `audit verify` walks every file.
//! - Before every write the log checks that `audit.log` is still the file
//!   it has open, of at least the length it wrote. A file replaced,
//!   removed or truncated under it is reported (`audit_file_tampered`),
//!   reopened, and the event recorded as the next record, so nothing
//!   acknowledged goes to a deleted file.
//! - The chain key is random, stored in `audit.key` sealed under the master
//!   key, so rewriting the log and recomputing the chain needs the master
//!   key. What the chain cannot show: the newest records cut off the end
//!   (keep an off-box copy for that).

pub mod chain;
pub mod denials;
mod files;
mod pages;

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::mpsc;

pub use chain::{Broken, ChainKey, GENESIS, Intact, Record, Verifier, record_hash};
pub use denials::Subject;
pub use files::chain_files;
pub use pages::{Direction, PAGE_SCAN_LINES, PageError, Position};

use files::{cut_torn_tail, for_each_record, for_each_record_in, last_record, rotated_first_seq};

use crate::crypto::MasterKey;
use crate::private_file::{Appended, open_append};

/// The file being written.
pub const ACTIVE: &str = "audit.log";
/// The sealed chain key, beside the log.
pub const KEY_FILE: &str = "audit.key";
const KEY_CONTEXT: &str = "warden audit chain key";

/// What is recorded; sequence, time and hashes are added by the log.
#[derive(Clone, Debug)]
pub struct Event {
    pub actor: String,
    pub action: &'static str,
    pub key_id: String,
    pub detail: String,
}

/// How the log grows and aggregates.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditSettings {
    /// Past this size the active file is rotated.
    pub max_file_bytes: u64,
    /// Security denials are written once per subject per window.
    pub denial_window: Duration,
    /// Subjects tallied apart per window; beyond, summed under `*`.
    pub max_denial_subjects: usize,
}

impl Default for AuditSettings {
    fn default() -> Self {
        Self {
            max_file_bytes: 64 * 1024 * 1024,
            denial_window: Duration::from_secs(60),
            max_denial_subjects: 1000,
        }
    }
}

/// Why the log could not be opened or verified.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("audit log {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "{0}: cannot be opened with this master key (sealed under another one? `warden store rotate-master-key` re-seals it)"
    )]
    WrongKey(String),
    #[error(
        "{0}: missing, but the audit log beside it holds records keyed by it; restore it from a backup (it is sealed under the master key), or move the audit files aside to begin a new chain"
    )]
    KeyMissing(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> AuditError + '_ {
    move |source| AuditError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// The head of the chain: what the next record links to, and the file it
/// goes to.
struct Head {
    /// The active file, with the bytes this log has written to (or found
    /// in) it.
    file: Appended,
    seq: u64,
    hash: String,
    /// The sequence number of the active file's first record (or of the
    /// next record, while it is empty): it names the file when rotated.
    first_seq: u64,
}

/// The append-only log.
pub struct AuditLog {
    dir: PathBuf,
    path: PathBuf,
    key: ChainKey,
    settings: AuditSettings,
    head: Mutex<Head>,
    queue: Mutex<Option<mpsc::Sender<Event>>>,
    ledger: Mutex<denials::Ledger>,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// Records queued for the batch writer at most.
const QUEUE: usize = 4096;
/// How often queued records are written and synced.
const FLUSH_EVERY: Duration = Duration::from_millis(50);

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Reads (or, the first time, makes) the sealed chain key of `dir`.
fn chain_key(dir: &Path, master: &MasterKey) -> Result<ChainKey, AuditError> {
    let path = dir.join(KEY_FILE);
    match std::fs::read_to_string(&path) {
        Ok(sealed) => {
            let bytes = master
                .open(KEY_CONTEXT, sealed.trim())
                .map_err(|_| AuditError::WrongKey(path.display().to_string()))?;
            let bytes: [u8; 32] = bytes
                .try_into()
                .map_err(|_| AuditError::WrongKey(path.display().to_string()))?;
            Ok(ChainKey::new(bytes))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let bytes = crate::crypto::random_bytes::<32>();
            let mut file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
                .map_err(io(&path))?;
            file.write_all(master.seal(KEY_CONTEXT, &bytes).as_bytes())
                .and_then(|()| file.sync_all())
                .map_err(io(&path))?;
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(io(dir))?;
            Ok(ChainKey::new(bytes))
        }
        Err(e) => Err(io(&path)(e)),
    }
}

/// Re-seals the chain key of `dir` under a new master key (part of
/// `warden store rotate-master-key`); whether it did. Nothing to do
/// without one, or when it is already sealed under `new`.
pub fn reseal_key(dir: &Path, old: &MasterKey, new: &MasterKey) -> Result<bool, AuditError> {
    let path = dir.join(KEY_FILE);
    if !path.exists() {
        return Ok(false);
    }
    let key = match chain_key(dir, old) {
        Ok(key) => key,
        // Re-sealed by an earlier run.
        Err(AuditError::WrongKey(_)) if chain_key(dir, new).is_ok() => return Ok(false),
        Err(e) => return Err(e),
    };
    crate::private_file::replace(&path, new.seal(KEY_CONTEXT, key.bytes()).as_bytes())
        .map_err(io(&path))?;
    Ok(true)
}

/// Verifies every file of the chain in `dir`, from the first record ever
/// written, with the chain key sealed under `master`.
pub fn verify_dir(dir: &Path, master: &MasterKey) -> Result<Result<Intact, Broken>, AuditError> {
    let key = chain_key_existing(dir, master)?;
    verify_files(dir, &key)
}

/// Verifies one file on its own (a rotated or copied one): every record in
/// it links to the one before; the first one's link is taken as given.
pub fn verify_file(
    file: &Path,
    dir: &Path,
    master: &MasterKey,
) -> Result<Result<Intact, Broken>, AuditError> {
    let key = chain_key_existing(dir, master)?;
    let mut v = Verifier::from_anywhere(&key);
    if let Err(b) = verify_into(&mut v, file)? {
        return Ok(Err(b));
    }
    Ok(v.finish())
}

/// Like [`chain_key`], but never makes one (verification changes nothing).
fn chain_key_existing(dir: &Path, master: &MasterKey) -> Result<ChainKey, AuditError> {
    let path = dir.join(KEY_FILE);
    if !path.exists() {
        return Err(io(&path)(std::io::ErrorKind::NotFound.into()));
    }
    chain_key(dir, master)
}

fn verify_files(dir: &Path, key: &ChainKey) -> Result<Result<Intact, Broken>, AuditError> {
    let mut v = Verifier::from_genesis(key);
    for path in chain_files(dir).map_err(io(dir))? {
        if let Err(b) = verify_into(&mut v, &path)? {
            return Ok(Err(b));
        }
    }
    Ok(v.finish())
}

/// Gives every line of `path` to `v`.
fn verify_into(v: &mut Verifier<'_>, path: &Path) -> Result<Result<(), Broken>, AuditError> {
    let mut file = File::open(path).map_err(io(path))?;
    let len = file.metadata().map_err(io(path))?.len();
    verify_in(v, &mut file, len, path)
}

/// [`verify_into`] over the first `len` bytes of `path`, open as `file`.
fn verify_in(
    v: &mut Verifier<'_>,
    file: &mut File,
    len: u64,
    path: &Path,
) -> Result<Result<(), Broken>, AuditError> {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
    let mut broken = None;
    for_each_record_in(file, len, |number, record| {
        match v.next(record, number, name.as_deref()) {
            Ok(()) => true,
            Err(b) => {
                broken = Some(b);
                false
            }
        }
    })
    .map_err(io(path))?;
    Ok(broken.map_or(Ok(()), Err))
}

/// What the log needs to go on from, found at open.
struct HeadScan {
    /// The active file, verified as linked to the record before it.
    verified: Result<Intact, Broken>,
    /// The newest readable record.
    last: Option<Record>,
    /// The sequence number of the active file's first record.
    active_first_seq: Option<u64>,
}

/// Reads the active file and the last record of the file rotated before
/// it: not the whole chain, which grows for years (`audit verify` walks
/// it), so a start reads at most `max_file_bytes` and one line more.
fn scan_head(dir: &Path, key: &ChainKey) -> Result<HeadScan, AuditError> {
    let mut files = chain_files(dir).map_err(io(dir))?;
    let active = match files.last() {
        Some(p) if p.file_name().is_some_and(|n| n == ACTIVE) => files.pop(),
        _ => None,
    };
    let before = match files.last() {
        Some(rotated) => last_record(rotated).map_err(io(rotated))?,
        None => None,
    };
    let mut v = match (&before, files.is_empty()) {
        (Some(r), _) => Verifier::after(key, r),
        (None, true) => Verifier::from_genesis(key),
        (None, false) => Verifier::from_anywhere(key),
    };
    let (mut broken, mut last, mut active_first_seq) = (None, before, None);
    if let Some(path) = &active {
        for_each_record(path, |number, record| {
            if let Ok(r) = &record {
                active_first_seq.get_or_insert(r.seq);
                last = Some(r.clone());
            }
            if broken.is_none()
                && let Err(b) = v.next(record, number, Some(ACTIVE))
            {
                broken = Some(b);
            }
            true
        })?;
    }
    Ok(HeadScan {
        verified: match broken {
            Some(b) => Err(b),
            None => v.finish(),
        },
        last,
        active_first_seq,
    })
}

/// Whether any record of the chain in `dir` is keyed (a log from before
/// the chain was keyed holds none). Reads until it finds one: only asked
/// when the chain key is missing.
fn holds_keyed_records(dir: &Path) -> Result<bool, AuditError> {
    let mut keyed = false;
    for path in chain_files(dir).map_err(io(dir))?.iter().rev() {
        for_each_record(path, |_, record| {
            keyed = record.is_ok_and(|r| r.hash.starts_with(chain::KEYED));
            !keyed
        })?;
        if keyed {
            return Ok(true);
        }
    }
    Ok(false)
}

impl AuditLog {
    /// Opens (or creates) the log in `dir` and finds its head, reading the
    /// active file and the last record before it (`scan_head`). A broken
    /// chain there is reported in the log but does not stop the server:
    /// new records keep linking to the last one, and `audit verify` keeps
    /// reporting the break.
    pub fn open(
        dir: &Path,
        master: &MasterKey,
        settings: AuditSettings,
    ) -> Result<Self, AuditError> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let path = dir.join(ACTIVE);
        let torn = cut_torn_tail(&path).map_err(io(&path))?;
        // A new chain key beside records keyed by the old one would leave
        // every one of them unverifiable, and the log's history with them:
        // deleting audit.key must not be a way to start a clean chain.
        let key_file = dir.join(KEY_FILE);
        if !key_file.exists() && holds_keyed_records(dir)? {
            return Err(AuditError::KeyMissing(key_file.display().to_string()));
        }
        let key = chain_key(dir, master)?;
        let scanned = scan_head(dir, &key)?;
        if let Err(b) = &scanned.verified {
            tracing::error!(event = "audit_chain_broken", at = %b, "the audit log chain is broken");
        }
        let (seq, hash) = scanned
            .last
            .map_or((0, GENESIS.to_owned()), |r| (r.seq, r.hash));
        let first_seq = scanned.active_first_seq.unwrap_or(seq + 1);
        let file = open_append(&path).map_err(io(&path))?;
        let bytes = file.metadata().map_err(io(&path))?.len();
        let unkeyed_head = seq > 0 && !hash.starts_with("hmac:");
        let log = Self {
            dir: dir.to_owned(),
            path,
            key,
            ledger: Mutex::new(denials::Ledger::new(settings.max_denial_subjects)),
            settings,
            head: Mutex::new(Head {
                file: Appended::new(file, bytes),
                seq,
                hash,
                first_seq,
            }),
            queue: Mutex::new(None),
        };
        if unkeyed_head {
            // A chain from before keying: vouch for it under the key now,
            // so it cannot be rewritten unkeyed later.
            log.append_durable(&[Event {
                actor: "warden".into(),
                action: chain::ADOPTED,
                key_id: String::new(),
                detail: format!("records 1 to {seq}, written before the chain was keyed"),
            }])
            .map_err(io(dir))?;
        }
        if let Some((bytes, cut)) = torn {
            tracing::warn!(
                event = "audit_torn_tail_cut",
                bytes,
                "cut off a partial record at the end of the audit log, left by a write that never completed"
            );
            log.append_durable(&[Event {
                actor: "warden".into(),
                action: "audit.torn_tail_cut",
                key_id: String::new(),
                detail: format!(
                    "{bytes} bytes at the end of {ACTIVE} were not a whole record (a write that never completed) and were cut off; sha256 of the first {} of them={}",
                    cut.len(),
                    hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&cut)),
                ),
            }])
            .map_err(io(dir))?;
        }
        Ok(log)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends and fsyncs records; returns them once they are durable.
    pub fn append_durable(&self, events: &[Event]) -> std::io::Result<Vec<Record>> {
        let started = std::time::Instant::now();
        let mut head = self.head.lock();
        let reopened = self.ensure_file(&mut head)?;
        let mut out = String::new();
        let mut records = Vec::with_capacity(events.len() + 1);
        let (mut seq, mut prev) = (head.seq, head.hash.clone());
        for e in reopened.iter().chain(events) {
            seq += 1;
            let mut r = Record {
                seq,
                time_ms: now_ms(),
                actor: e.actor.clone(),
                action: e.action.to_owned(),
                key_id: e.key_id.clone(),
                detail: e.detail.clone(),
                prev_hash: prev,
                hash: String::new(),
            };
            r.hash = record_hash(&self.key, &r);
            prev = r.hash.clone();
            out.push_str(&serde_json::to_string(&r).expect("record serializes"));
            out.push('\n');
            records.push(r);
        }
        // Whole or not at all: part of a record left by a full disk would
        // be an unreadable line in the middle of the chain.
        if let Err(e) = head.file.append(out.as_bytes()) {
            metrics::counter!("warden_durable_write_failures_total", "what" => "audit")
                .increment(1);
            return Err(e);
        }
        head.seq = seq;
        head.hash = prev;
        if head.file.whole_bytes() >= self.settings.max_file_bytes
            && let Err(e) = self.rotate(&mut head)
        {
            // The records are durable: the change they record goes ahead,
            // and the next write tries the rotation again.
            tracing::error!(
                event = "audit_rotation_failed",
                error = %e,
                "could not rotate the audit log; writing on in the active file"
            );
        }
        metrics::histogram!("warden_store_write_seconds", "what" => "audit")
            .record(started.elapsed().as_secs_f64());
        if reopened.is_some() {
            records.remove(0);
        }
        Ok(records)
    }

    /// Checks that `audit.log` is still the file this log has open, and no
    /// shorter than what it wrote; if not, reports it, reopens the path and
    /// returns the record that says so.
    fn ensure_file(&self, head: &mut Head) -> std::io::Result<Option<Event>> {
        let open = head.file.file().metadata()?;
        let what = match std::fs::metadata(&self.path) {
            Err(_) => "removed",
            Ok(d) if (d.dev(), d.ino()) != (open.dev(), open.ino()) => "replaced",
            Ok(d) if d.len() < head.file.whole_bytes() => "truncated",
            Ok(_) => return Ok(None),
        };
        tracing::error!(
            event = "audit_file_tampered",
            what,
            path = %self.path.display(),
            "the audit log file was changed under the server; reopening it and recording the event"
        );
        metrics::counter!("warden_audit_tampered_total", "what" => what).increment(1);
        let file = open_append(&self.path)?;
        let len = file.metadata()?.len();
        head.file = Appended::new(file, len);
        Ok(Some(Event {
            actor: "warden".into(),
            action: "audit.reopened",
            key_id: String::new(),
            detail: format!("{ACTIVE} was {what} while open; writing on in a reopened file"),
        }))
    }

    /// Renames the full active file after its first record and begins a
    /// new one; the next record links to the last of the old file.
    fn rotate(&self, head: &mut Head) -> std::io::Result<()> {
        let rotated = self.dir.join(format!("audit.{:020}.log", head.first_seq));
        std::fs::rename(&self.path, &rotated)?;
        let file = match open_append(&self.path) {
            Ok(file) => file,
            Err(e) => {
                // Put the full file back: the next write must find the
                // file it wrote, or it reports it removed.
                let _ = std::fs::rename(&rotated, &self.path);
                return Err(e);
            }
        };
        head.file = Appended::new(file, 0);
        head.first_seq = head.seq + 1;
        tracing::info!(event = "audit_rotated", file = %rotated.display(), "audit log rotated");
        File::open(&self.dir)?.sync_all()
    }

    /// Queues a record without waiting (alerts, refused admin calls).
    /// Needs [`Self::start_writer`]; before that, or when the queue is full,
    /// the record is dropped and counted.
    pub fn record_later(&self, event: Event) {
        let queued = match self.queue.lock().as_ref() {
            Some(tx) => tx.try_send(event).is_ok(),
            None => false,
        };
        if !queued {
            metrics::counter!("warden_audit_dropped_total", "cause" => "queue_full").increment(1);
        }
    }

    /// Counts one security denial; written with its window's tally.
    pub fn count_denial(&self, subject: Subject) {
        self.ledger.lock().count(subject, now_ms());
    }

    fn write_in_background(
        self: &std::sync::Arc<Self>,
        events: Vec<Event>,
    ) -> tokio::task::JoinHandle<()> {
        let log = self.clone();
        tokio::task::spawn_blocking(move || {
            if let Err(e) = log.append_durable(&events) {
                metrics::counter!("warden_audit_dropped_total", "cause" => "write_failed")
                    .increment(events.len() as u64);
                tracing::error!(
                    event = "audit_write_failed",
                    error = %e,
                    records = events.len(),
                    "could not write audit records; they are lost"
                );
            }
        })
    }

    /// Starts the batch writer for [`Self::record_later`] and the tallies
    /// of [`Self::count_denial`]; it ends after [`Self::close_queue`],
    /// having written everything.
    pub fn start_writer(self: &std::sync::Arc<Self>) -> tokio::task::JoinHandle<()> {
        let (tx, mut rx) = mpsc::channel::<Event>(QUEUE);
        *self.queue.lock() = Some(tx);
        let log = self.clone();
        tokio::spawn(async move {
            let mut window = tokio::time::interval(log.settings.denial_window);
            window.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            window.tick().await;
            loop {
                tokio::select! {
                    first = rx.recv() => {
                        let Some(first) = first else { break };
                        // Gather what arrives meanwhile: one fsync for the batch.
                        tokio::time::sleep(FLUSH_EVERY).await;
                        let mut batch = vec![first];
                        while let Ok(e) = rx.try_recv() {
                            batch.push(e);
                        }
                        let _ = log.write_in_background(batch).await;
                    }
                    _ = window.tick() => {
                        let tallies = log.ledger.lock().drain();
                        if !tallies.is_empty() {
                            let _ = log.write_in_background(tallies).await;
                        }
                    }
                }
            }
            let tallies = log.ledger.lock().drain();
            if !tallies.is_empty() {
                let _ = log.write_in_background(tallies).await;
            }
        })
    }

    /// Stops queueing; the writer writes what is queued and tallied, then
    /// ends.
    pub fn close_queue(&self) {
        self.queue.lock().take();
    }

    /// Every line of every file of the chain, oldest first, as stored.
    #[cfg(test)]
    pub fn read_lines(&self) -> std::io::Result<Vec<String>> {
        let _head = self.head.lock();
        let mut lines = Vec::new();
        for path in chain_files(&self.dir)? {
            lines.extend(files::read_lines(&path)?);
        }
        Ok(lines)
    }

    /// Verifies the whole chain, every file, from the first record. What
    /// the files hold is fixed under the lock (the rotated files, and the
    /// active one open, at its length), then read without it: rotated
    /// files never change and the active one only grows, so a walk of
    /// years of files holds up no writer (it would stall admin changes
    /// and fill the background queue).
    pub fn verify(&self) -> Result<Result<Intact, Broken>, AuditError> {
        let (rotated, mut active, len) = {
            let _head = self.head.lock();
            let rotated: Vec<PathBuf> = chain_files(&self.dir)
                .map_err(io(&self.dir))?
                .into_iter()
                .filter(|p| rotated_first_seq(p).is_some())
                .collect();
            let active = File::open(&self.path).map_err(io(&self.path))?;
            let len = active.metadata().map_err(io(&self.path))?.len();
            (rotated, active, len)
        };
        let mut v = Verifier::from_genesis(&self.key);
        for path in &rotated {
            if let Err(b) = verify_into(&mut v, path)? {
                return Ok(Err(b));
            }
        }
        if let Err(b) = verify_in(&mut v, &mut active, len, &self.path)? {
            return Ok(Err(b));
        }
        Ok(v.finish())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    pub(super) fn event(n: u32) -> Event {
        Event {
            actor: "spiffe://t/admin".into(),
            action: "key.create",
            key_id: format!("k{n}"),
            detail: String::new(),
        }
    }

    pub(super) fn master() -> MasterKey {
        MasterKey::from_hex(&MasterKey::generate_hex()).unwrap()
    }

    pub(super) fn open(dir: &Path, master: &MasterKey) -> AuditLog {
        AuditLog::open(dir, master, AuditSettings::default()).unwrap()
    }

    /// A log rotated past `max_file_bytes`, holding `events(0..records)`.
    pub(super) fn rotating(
        dir: &Path,
        master: &MasterKey,
        max_file_bytes: u64,
        records: u32,
    ) -> AuditLog {
        let settings = AuditSettings {
            max_file_bytes,
            ..AuditSettings::default()
        };
        let log = AuditLog::open(dir, master, settings).unwrap();
        for i in 0..records {
            log.append_durable(&[event(i)]).unwrap();
        }
        log
    }

    /// A write that never completed (a crash, a full disk) leaves part of
    /// a record at the end. Left there, the next record would be glued to
    /// it and the chain would read as broken for good; it is cut at open,
    /// and a record says how much was cut. Tails longer than the block
    /// the end is searched in, and a file that is all partial, too.
    #[test]
    fn a_partial_record_at_the_end_is_cut_at_open_and_the_chain_verifies() {
        for (records, tail) in [(2, 37), (2, 100 * 1024), (0, 50)] {
            let dir = tempfile::tempdir().unwrap();
            let m = master();
            let log = open(dir.path(), &m);
            for n in 0..records {
                log.append_durable(&[event(n)]).unwrap();
            }
            drop(log);
            let path = dir.path().join(ACTIVE);
            let whole = std::fs::read(&path).unwrap();
            let partial: Vec<u8> = b"{\"seq\":3,\"time_ms\":1796035374547,\"actor\":\"spiffe"
                .iter()
                .copied()
                .cycle()
                .take(tail)
                .collect();
            std::fs::write(&path, [whole.as_slice(), &partial].concat()).unwrap();

            let log = open(dir.path(), &m);
            log.append_durable(&[event(9)]).unwrap();
            let lines = log.read_lines().unwrap();
            assert_eq!(lines.len(), records as usize + 2, "{tail}: {lines:?}");
            let cut: Record = serde_json::from_str(&lines[records as usize]).unwrap();
            assert_eq!(cut.action, "audit.torn_tail_cut");
            assert!(
                cut.detail.starts_with(&format!("{tail} bytes ")),
                "{}",
                cut.detail
            );
            assert!(lines.last().unwrap().contains("\"k9\""));
            assert_eq!(
                log.verify().unwrap().unwrap().records,
                records as u64 + 2,
                "{tail}"
            );
            // A file that ends on a whole record is left as it is.
            drop(log);
            let log = open(dir.path(), &m);
            assert_eq!(log.read_lines().unwrap().len(), records as usize + 2);
        }
    }

    /// Bytes that are not text where a record was: verification names the
    /// record, as for any other edit, instead of failing to read the file.
    #[test]
    fn a_record_overwritten_with_binary_is_named_as_the_break() {
        let dir = tempfile::tempdir().unwrap();
        let m = master();
        let log = open(dir.path(), &m);
        log.append_durable(&[event(1), event(2), event(3)]).unwrap();
        let path = log.path().to_owned();
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        let mut bytes = Vec::new();
        bytes.extend_from_slice(format!("{}\n", lines[0]).as_bytes());
        bytes.extend_from_slice(b"\xff\xfe\x00 not text\n");
        bytes.extend_from_slice(format!("{}\n", lines[2]).as_bytes());
        std::fs::write(&path, bytes).unwrap();
        let broken = log.verify().unwrap().unwrap_err();
        assert_eq!(broken.line, 2, "{broken}");
        assert!(broken.why.contains("not a record"), "{broken}");
    }

    /// Deleting audit.key must not start a clean chain beside the old
    /// one (every old record would become unverifiable): the log refuses
    /// to open and says what to do. A log from before the chain was keyed
    /// has no key yet, and opens.
    #[test]
    fn a_missing_chain_key_beside_keyed_records_refuses_to_open() {
        let dir = tempfile::tempdir().unwrap();
        let m = master();
        let log = open(dir.path(), &m);
        log.append_durable(&[event(1), event(2)]).unwrap();
        drop(log);
        std::fs::remove_file(dir.path().join(KEY_FILE)).unwrap();
        let refused = AuditLog::open(dir.path(), &m, AuditSettings::default()).unwrap_err();
        assert!(matches!(refused, AuditError::KeyMissing(_)), "{refused}");
        assert!(refused.to_string().contains("restore it from a backup"));
        assert!(!dir.path().join(KEY_FILE).exists(), "no new key was made");
    }

    #[test]
    fn an_untouched_chain_verifies_and_any_edit_delete_or_swap_is_caught() {
        let dir = tempfile::tempdir().unwrap();
        let m = master();
        let log = open(dir.path(), &m);
        log.append_durable(&[event(1), event(2)]).unwrap();
        log.append_durable(&[event(3), event(4)]).unwrap();
        let lines = log.read_lines().unwrap();
        let key = &log.key;
        assert_eq!(chain::verify(key, lines.clone()).unwrap().records, 4);

        let mut edited = lines.clone();
        edited[1] = edited[1].replace("\"k2\"", "\"k9\"");
        assert_eq!(chain::verify(key, edited).unwrap_err().line, 2);

        let mut deleted = lines.clone();
        deleted.remove(2);
        assert_eq!(chain::verify(key, deleted).unwrap_err().line, 3);

        let mut swapped = lines.clone();
        swapped.swap(1, 2);
        assert_eq!(chain::verify(key, swapped).unwrap_err().line, 2);
    }

    /// The outside attack's finding: the chain was unkeyed, so a record
    /// could be rewritten and the chain recomputed. Recomputing it now
    /// needs the chain key; without it (plain SHA-256, or another key) the
    /// rewrite is caught.
    #[test]
    fn a_rewritten_record_with_a_recomputed_chain_fails_verification() {
        let dir = tempfile::tempdir().unwrap();
        let m = master();
        let log = open(dir.path(), &m);
        log.append_durable(&[event(1), event(2), event(3)]).unwrap();
        let lines = log.read_lines().unwrap();
        let mut records: Vec<Record> = lines
            .iter()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        records[1].key_id = "k-forged".into();
        for forger in [
            ChainKey::new([7; 32]),
            ChainKey::new(crate::crypto::random_bytes()),
        ] {
            let mut prev = records[0].hash.clone();
            let mut forged = records.clone();
            for r in forged.iter_mut().skip(1) {
                r.prev_hash = prev;
                r.hash = record_hash(&forger, r);
                prev = r.hash.clone();
            }
            let text: Vec<String> = forged
                .iter()
                .map(|r| serde_json::to_string(r).unwrap())
                .collect();
            std::fs::write(log.path(), text.join("\n") + "\n").unwrap();
            let broken = verify_dir(dir.path(), &m).unwrap().unwrap_err();
            assert_eq!(broken.line, 2, "{broken}");
        }
        // A downgrade to the old, unkeyed hashes (which need no key) is
        // caught too.
        let mut prev = GENESIS.to_owned();
        let mut unkeyed = records.clone();
        for r in unkeyed.iter_mut() {
            r.prev_hash = prev;
            r.hash = chain::legacy_hash(r);
            prev = r.hash.clone();
        }
        let lines = |rs: &[Record]| -> Vec<String> {
            rs.iter()
                .map(|r| serde_json::to_string(r).unwrap())
                .collect()
        };
        assert_eq!(
            chain::verify(&log.key, lines(&unkeyed)).unwrap_err().line,
            1
        );
        // Only the keyed adoption record vouches for unkeyed ones before it.
        let mut adopted = unkeyed.clone();
        let mut vouch = Record {
            seq: 4,
            action: chain::ADOPTED.into(),
            prev_hash: unkeyed[2].hash.clone(),
            ..records[2].clone()
        };
        vouch.hash = record_hash(&log.key, &vouch);
        adopted.push(vouch.clone());
        let intact = chain::verify(&log.key, lines(&adopted)).unwrap();
        assert_eq!((intact.records, intact.unkeyed), (4, 3));
        let mut not_adopted = unkeyed.clone();
        vouch.action = "key.create".into();
        vouch.hash = record_hash(&log.key, &vouch);
        not_adopted.push(vouch);
        assert_eq!(
            chain::verify(&log.key, lines(&not_adopted))
                .unwrap_err()
                .line,
            4
        );
    }

    #[test]
    fn a_log_from_before_keying_is_adopted_once_and_then_verifies() {
        let dir = tempfile::tempdir().unwrap();
        let mut prev = GENESIS.to_owned();
        let mut text = String::new();
        for seq in 1..=3 {
            let mut r = Record {
                seq,
                time_ms: 1,
                actor: "a".into(),
                action: "key.create".into(),
                key_id: format!("k{seq}"),
                detail: String::new(),
                prev_hash: prev,
                hash: String::new(),
            };
            r.hash = chain::legacy_hash(&r);
            prev = r.hash.clone();
            text.push_str(&(serde_json::to_string(&r).unwrap() + "\n"));
        }
        std::fs::write(dir.path().join(ACTIVE), text).unwrap();
        let m = master();
        let log = open(dir.path(), &m);
        let intact = log.verify().unwrap().unwrap();
        assert_eq!((intact.records, intact.unkeyed), (4, 3));
        drop(log);
        // Not adopted twice.
        let log = open(dir.path(), &m);
        log.append_durable(&[event(5)]).unwrap();
        assert_eq!(log.verify().unwrap().unwrap().records, 5);
    }

    #[test]
    fn reopening_continues_the_chain() {
        let dir = tempfile::tempdir().unwrap();
        let m = master();
        open(dir.path(), &m).append_durable(&[event(1)]).unwrap();
        let log = open(dir.path(), &m);
        let r = log.append_durable(&[event(2)]).unwrap();
        assert_eq!(r[0].seq, 2);
        assert_eq!(log.verify().unwrap().unwrap().records, 2);
    }

    #[test]
    fn the_chain_key_opens_only_with_its_master_key_and_survives_a_reseal() {
        let dir = tempfile::tempdir().unwrap();
        let (old, new) = (master(), master());
        open(dir.path(), &old).append_durable(&[event(1)]).unwrap();
        assert!(matches!(
            AuditLog::open(dir.path(), &new, AuditSettings::default()),
            Err(AuditError::WrongKey(_))
        ));
        assert!(reseal_key(dir.path(), &old, &new).unwrap());
        assert_eq!(verify_dir(dir.path(), &new).unwrap().unwrap().records, 1);
        let mode = std::fs::metadata(dir.path().join(KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn rotation_carries_the_chain_across_files_and_verify_walks_them_all() {
        let dir = tempfile::tempdir().unwrap();
        let m = master();
        let log = rotating(dir.path(), &m, 1000, 40);
        let files = chain_files(dir.path()).unwrap();
        assert!(files.len() > 3, "{files:?}");
        assert_eq!(verify_dir(dir.path(), &m).unwrap().unwrap().records, 40);
        for f in &files {
            let mode = std::fs::metadata(f).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{f:?}");
        }
        // Reopened, it continues the chain in the active file.
        drop(log);
        let log = rotating(dir.path(), &m, 1000, 0);
        assert_eq!(log.append_durable(&[event(99)]).unwrap()[0].seq, 41);
        // A rotated file gone from the middle breaks the chain there.
        std::fs::remove_file(&files[1]).unwrap();
        let broken = verify_dir(dir.path(), &m).unwrap().unwrap_err();
        assert!(broken.why.contains("sequence"), "{broken}");
    }

    /// A start reads the active file and the last record of the file
    /// before it, not years of rotated files: an old file that cannot be
    /// read at all does not stop it, while `audit verify` still walks
    /// everything and fails on it. The link to the file before is checked:
    /// the last record of that file cut off shows at open.
    #[test]
    fn a_start_reads_the_active_file_and_the_record_before_it_only() {
        let dir = tempfile::tempdir().unwrap();
        let m = master();
        drop(rotating(dir.path(), &m, 1000, 41));
        let files = chain_files(dir.path()).unwrap();
        let key = chain_key(dir.path(), &m).unwrap();
        let head = scan_head(dir.path(), &key).unwrap();
        let active = files::read_lines(&dir.path().join(ACTIVE)).unwrap().len() as u64;
        assert!(active > 0);
        assert_eq!(head.verified.unwrap().records, active);
        assert_eq!(head.last.unwrap().seq, 41);

        // The oldest file, unreadable: the start goes on, verify does not.
        std::fs::remove_file(&files[0]).unwrap();
        std::fs::create_dir(&files[0]).unwrap();
        let log = rotating(dir.path(), &m, 1000, 0);
        assert_eq!(log.append_durable(&[event(99)]).unwrap()[0].seq, 42);
        assert!(log.verify().is_err());
        drop(log);

        // The newest rotated file loses its last record: the active file
        // no longer links to what is before it.
        let rotated = chain_files(dir.path()).unwrap();
        let newest = &rotated[rotated.len() - 2];
        let text = std::fs::read_to_string(newest).unwrap();
        let kept: Vec<&str> = text.lines().collect();
        std::fs::write(newest, kept[..kept.len() - 1].join("\n") + "\n").unwrap();
        let broken = scan_head(dir.path(), &key).unwrap().verified.unwrap_err();
        assert!(broken.why.contains("sequence"), "{broken}");
    }

    /// The outside attack's finding: replacing audit.log (copy + rename)
    /// made warden keep writing to the deleted file, so an acknowledged
    /// change was missing on disk while verify said intact.
    #[test]
    fn a_replaced_or_removed_file_is_reopened_and_nothing_goes_to_a_deleted_file() {
        let dir = tempfile::tempdir().unwrap();
        let m = master();
        let log = open(dir.path(), &m);
        log.append_durable(&[event(1)]).unwrap();
        let path = log.path().to_owned();
        let copy = dir.path().join("copy");
        std::fs::copy(&path, &copy).unwrap();
        std::fs::rename(&copy, &path).unwrap();
        log.append_durable(&[event(2)]).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.contains("\"k2\"") && text.contains("audit.reopened"),
            "{text}"
        );
        assert_eq!(log.verify().unwrap().unwrap().records, 3);

        std::fs::remove_file(&path).unwrap();
        log.append_durable(&[event(3)]).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.contains("\"k3\"") && text.contains("was removed"),
            "{text}"
        );
        // The records before the removal are gone: verify says where.
        assert!(log.verify().unwrap().is_err());
    }

    #[test]
    fn a_truncated_file_is_detected_and_verification_shows_the_gap() {
        let dir = tempfile::tempdir().unwrap();
        let m = master();
        let log = open(dir.path(), &m);
        log.append_durable(&[event(1), event(2), event(3)]).unwrap();
        let path = log.path().to_owned();
        let text = std::fs::read_to_string(&path).unwrap();
        let first_line = text.lines().next().unwrap().len() + 1;
        OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(first_line as u64)
            .unwrap();
        log.append_durable(&[event(4)]).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("was truncated"), "{text}");
        let broken = log.verify().unwrap().unwrap_err();
        assert_eq!(broken.line, 2, "{broken}");
    }
}
