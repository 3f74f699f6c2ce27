//! The audit log: every admin change and every security denial, append-only
//! and hash-chained. Each record's hash covers the previous record's hash, so
//! editing, deleting or reordering any record breaks the chain from there on,
//! and `warden audit verify` names the first broken record.
//!
//! Admin changes are written and fsynced before the change is acknowledged.
//! Denials and alerts go through a bounded queue to a writer that appends
//! and fsyncs in batches, so a flood of bad requests cannot turn into a flood
//! of fsyncs; if the queue is full the record is dropped and counted
//! (`warden_audit_dropped_total`), never waited for.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

/// The hash before the first record.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// One record, as stored (one JSON object per line).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub seq: u64,
    pub time_ms: i64,
    pub actor: String,
    pub action: String,
    pub key_id: String,
    pub detail: String,
    pub prev_hash: String,
    pub hash: String,
}

/// What is recorded; sequence, time and hashes are added by the log.
#[derive(Clone, Debug)]
pub struct Event {
    pub actor: String,
    pub action: &'static str,
    pub key_id: String,
    pub detail: String,
}

/// The hash of a record: SHA-256 over `prev_hash`, a newline and the JSON
/// of the record without its `hash` (fields in the order above).
pub fn record_hash(r: &Record) -> String {
    #[derive(Serialize)]
    struct Unhashed<'a> {
        seq: u64,
        time_ms: i64,
        actor: &'a str,
        action: &'a str,
        key_id: &'a str,
        detail: &'a str,
        prev_hash: &'a str,
    }
    let body = serde_json::to_string(&Unhashed {
        seq: r.seq,
        time_ms: r.time_ms,
        actor: &r.actor,
        action: &r.action,
        key_id: &r.key_id,
        detail: &r.detail,
        prev_hash: &r.prev_hash,
    })
    .expect("plain struct serializes");
    let mut h = Sha256::new();
    h.update(r.prev_hash.as_bytes());
    h.update(b"\n");
    h.update(body.as_bytes());
    hex::encode(h.finalize())
}

/// Where the chain first breaks.
#[derive(Debug, PartialEq, Eq)]
pub struct Broken {
    /// 1-based line number in the file.
    pub line: usize,
    /// The sequence number written on that line, if it could be read.
    pub seq: Option<u64>,
    pub why: String,
}

/// Checks a whole chain of stored lines. `Ok(n)` when all `n` records
/// link up.
pub fn verify(lines: impl IntoIterator<Item = String>) -> Result<u64, Broken> {
    verify_records(
        lines
            .into_iter()
            .map(|line| serde_json::from_str::<Record>(&line).map_err(|e| e.to_string())),
    )
}

/// Checks a chain of records (`Err` for one that could not be read).
pub fn verify_records(
    records: impl IntoIterator<Item = Result<Record, String>>,
) -> Result<u64, Broken> {
    let mut prev = GENESIS.to_owned();
    let mut expected_seq = 1u64;
    for (i, r) in records.into_iter().enumerate() {
        let r = r.map_err(|e| Broken {
            line: i + 1,
            seq: None,
            why: format!("not a record ({e})"),
        })?;
        let broken = |why: String| Broken {
            line: i + 1,
            seq: Some(r.seq),
            why,
        };
        if r.seq != expected_seq {
            return Err(broken(format!(
                "sequence {} where {expected_seq} was expected (deleted or reordered)",
                r.seq
            )));
        }
        if r.prev_hash != prev {
            return Err(broken(
                "does not link to the record before it (deleted, reordered or edited)".into(),
            ));
        }
        if record_hash(&r) != r.hash {
            return Err(broken(
                "its hash does not match its contents (edited)".into(),
            ));
        }
        prev = r.hash;
        expected_seq += 1;
    }
    Ok(expected_seq - 1)
}

/// The head of the chain: what the next record links to.
struct Head {
    file: File,
    seq: u64,
    hash: String,
}

/// The append-only log file.
pub struct AuditLog {
    path: PathBuf,
    head: Mutex<Head>,
    queue: Mutex<Option<mpsc::Sender<Event>>>,
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

impl AuditLog {
    /// Opens (or creates) the log and finds its head. A broken chain is
    /// reported in the log but does not stop the server: new records keep
    /// linking to the last one, and `audit verify` keeps reporting the break.
    pub fn open(path: &Path) -> std::io::Result<Self> {
        let mut seq = 0;
        let mut hash = GENESIS.to_owned();
        if let Ok(f) = File::open(path) {
            let lines: Vec<String> = BufReader::new(f).lines().collect::<Result<_, _>>()?;
            if let Err(b) = verify(lines.iter().cloned()) {
                tracing::error!(event = "audit_chain_broken", line = b.line, why = %b.why, "the audit log chain is broken");
            }
            if let Some(last) = lines
                .iter()
                .rev()
                .find_map(|l| serde_json::from_str::<Record>(l).ok())
            {
                seq = last.seq;
                hash = last.hash;
            }
        }
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        Ok(Self {
            path: path.to_owned(),
            head: Mutex::new(Head { file, seq, hash }),
            queue: Mutex::new(None),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends and fsyncs records; returns them once they are durable.
    pub fn append_durable(&self, events: &[Event]) -> std::io::Result<Vec<Record>> {
        let started = std::time::Instant::now();
        let mut head = self.head.lock();
        let mut out = String::new();
        let mut records = Vec::with_capacity(events.len());
        let (mut seq, mut prev) = (head.seq, head.hash.clone());
        for e in events {
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
            r.hash = record_hash(&r);
            prev = r.hash.clone();
            out.push_str(&serde_json::to_string(&r).expect("record serializes"));
            out.push('\n');
            records.push(r);
        }
        head.file.write_all(out.as_bytes())?;
        head.file.sync_data()?;
        head.seq = seq;
        head.hash = prev;
        metrics::histogram!("warden_store_write_seconds", "what" => "audit")
            .record(started.elapsed().as_secs_f64());
        Ok(records)
    }

    /// Queues a record without waiting (denials, alerts). Needs
    /// [`Self::start_writer`]; before that, or when the queue is full, the
    /// record is dropped and counted.
    pub fn record_later(&self, event: Event) {
        let queued = match self.queue.lock().as_ref() {
            Some(tx) => tx.try_send(event).is_ok(),
            None => false,
        };
        if !queued {
            metrics::counter!("warden_audit_dropped_total").increment(1);
        }
    }

    /// Starts the batch writer for [`Self::record_later`].
    pub fn start_writer(self: &std::sync::Arc<Self>) -> tokio::task::JoinHandle<()> {
        let (tx, mut rx) = mpsc::channel::<Event>(QUEUE);
        *self.queue.lock() = Some(tx);
        let log = self.clone();
        tokio::spawn(async move {
            let mut batch = Vec::new();
            loop {
                let Some(first) = rx.recv().await else { return };
                batch.push(first);
                // Gather what arrives meanwhile: one fsync for the batch.
                tokio::time::sleep(FLUSH_EVERY).await;
                while let Ok(e) = rx.try_recv() {
                    batch.push(e);
                }
                let events = std::mem::take(&mut batch);
                let log = log.clone();
                let written =
                    tokio::task::spawn_blocking(move || log.append_durable(&events)).await;
                if !matches!(written, Ok(Ok(_))) {
                    tracing::error!(
                        event = "audit_write_failed",
                        "could not write audit records"
                    );
                }
            }
        })
    }

    /// Stops queueing; the writer writes what is queued, then ends.
    pub fn close_queue(&self) {
        self.queue.lock().take();
    }

    /// Every line of the file, as stored (for verification and listing).
    pub fn read_lines(&self) -> std::io::Result<Vec<String>> {
        let _head = self.head.lock();
        let f = File::open(&self.path)?;
        BufReader::new(f).lines().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(n: u32) -> Event {
        Event {
            actor: "spiffe://t/admin".into(),
            action: "key.create",
            key_id: format!("k{n}"),
            detail: String::new(),
        }
    }

    #[test]
    fn an_untouched_chain_verifies_and_any_edit_delete_or_swap_is_caught() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let log = AuditLog::open(&path).unwrap();
        log.append_durable(&[event(1), event(2)]).unwrap();
        log.append_durable(&[event(3), event(4)]).unwrap();
        let lines = log.read_lines().unwrap();
        assert_eq!(verify(lines.clone()), Ok(4));

        let mut edited = lines.clone();
        edited[1] = edited[1].replace("\"k2\"", "\"k9\"");
        assert_eq!(verify(edited).unwrap_err().line, 2);

        let mut deleted = lines.clone();
        deleted.remove(2);
        assert_eq!(verify(deleted).unwrap_err().line, 3);

        let mut swapped = lines.clone();
        swapped.swap(1, 2);
        assert_eq!(verify(swapped).unwrap_err().line, 2);

        let mut truncated_tail = lines.clone();
        truncated_tail.pop();
        assert_eq!(
            verify(truncated_tail),
            Ok(3),
            "dropping the newest record is only caught against a remembered head"
        );
    }

    #[test]
    fn reopening_continues_the_chain() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        AuditLog::open(&path)
            .unwrap()
            .append_durable(&[event(1)])
            .unwrap();
        let log = AuditLog::open(&path).unwrap();
        let r = log.append_durable(&[event(2)]).unwrap();
        assert_eq!(r[0].seq, 2);
        assert_eq!(verify(log.read_lines().unwrap()), Ok(2));
    }
}
