//! The hash chain of audit records, and its verification.
//!
//! Each record's hash covers the previous record's hash, so editing,
//! deleting or reordering any record breaks the chain from there on. A plain
//! SHA-256 chain can be recomputed by anyone who can write the file, so the
//! chain is keyed: each hash is an HMAC-SHA256 under a [`ChainKey`] that is
//! stored sealed under the master key. Records written by earlier versions
//! (plain SHA-256, no `hmac:` prefix) are accepted only at the start of the
//! chain, and only when the first keyed record after them is the
//! `audit.adopted` record the log writes when it first keys a chain: its
//! HMAC links to the last unkeyed hash, so it vouches for all of them. A
//! chain rewritten as unkeyed records (to avoid needing the key) fails.

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// The hash before the first record.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// How a keyed hash is marked in the file.
pub(crate) const KEYED: &str = "hmac:";

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

/// The key of the chain's HMACs. Never written in clear.
#[derive(Clone)]
pub struct ChainKey([u8; 32]);

impl std::fmt::Debug for ChainKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ChainKey(..)")
    }
}

impl ChainKey {
    pub fn new(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    pub fn bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

/// The JSON the hash covers: the record without its `hash`, fields in order.
fn hashed_body(r: &Record) -> String {
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
    serde_json::to_string(&Unhashed {
        seq: r.seq,
        time_ms: r.time_ms,
        actor: &r.actor,
        action: &r.action,
        key_id: &r.key_id,
        detail: &r.detail,
        prev_hash: &r.prev_hash,
    })
    .expect("plain struct serializes")
}

/// The keyed hash of a record: `hmac:` + hex HMAC-SHA256 under `key` of
/// `prev_hash`, a newline, and the record's JSON without `hash`.
pub fn record_hash(key: &ChainKey, r: &Record) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(key.bytes()).expect("any key length");
    mac.update(r.prev_hash.as_bytes());
    mac.update(b"\n");
    mac.update(hashed_body(r).as_bytes());
    format!("{KEYED}{}", hex::encode(mac.finalize().into_bytes()))
}

/// The action of the keyed record that vouches for the unkeyed ones before
/// it.
pub const ADOPTED: &str = "audit.adopted";

/// The unkeyed hash earlier versions wrote: hex SHA-256 of the same input.
pub(crate) fn legacy_hash(r: &Record) -> String {
    let mut h = Sha256::new();
    h.update(r.prev_hash.as_bytes());
    h.update(b"\n");
    h.update(hashed_body(r).as_bytes());
    hex::encode(h.finalize())
}

/// Where the chain first breaks.
#[derive(Debug, PartialEq, Eq)]
pub struct Broken {
    /// Which file, when several were verified.
    pub file: Option<String>,
    /// 1-based line number in that file.
    pub line: usize,
    /// The sequence number written on that line, if it could be read.
    pub seq: Option<u64>,
    pub why: String,
}

impl std::fmt::Display for Broken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "record {}", self.line)?;
        if let Some(seq) = self.seq {
            write!(f, " (seq {seq})")?;
        }
        if let Some(file) = &self.file {
            write!(f, " of {file}")?;
        }
        write!(f, ": {}", self.why)
    }
}

/// What an intact chain holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Intact {
    pub records: u64,
    /// Records from before the chain was keyed (at its start only).
    pub unkeyed: u64,
    /// The sequence number of the first record verified.
    pub first_seq: u64,
}

/// Verifies records in order, as one chain.
pub struct Verifier<'k> {
    key: &'k ChainKey,
    prev: Option<String>,
    expected_seq: Option<u64>,
    keyed_seen: bool,
    /// Where the unkeyed records not yet vouched for begin.
    unvouched: Option<(usize, Option<String>, u64)>,
    intact: Intact,
}

impl<'k> Verifier<'k> {
    /// A chain that must start at the first record ever written.
    pub fn from_genesis(key: &'k ChainKey) -> Self {
        Self {
            key,
            prev: Some(GENESIS.to_owned()),
            expected_seq: Some(1),
            keyed_seen: false,
            unvouched: None,
            intact: Intact {
                first_seq: 1,
                ..Intact::default()
            },
        }
    }

    /// A chain that may start anywhere (one rotated file on its own): the
    /// first record's link to its predecessor is taken as given.
    pub fn from_anywhere(key: &'k ChainKey) -> Self {
        Self {
            key,
            prev: None,
            expected_seq: None,
            keyed_seen: false,
            unvouched: None,
            intact: Intact::default(),
        }
    }

    /// A chain that goes on after `record` (the last of the file before):
    /// the first record must link to it.
    pub fn after(key: &'k ChainKey, record: &Record) -> Self {
        Self {
            key,
            prev: Some(record.hash.clone()),
            expected_seq: Some(record.seq + 1),
            keyed_seen: record.hash.starts_with(KEYED),
            unvouched: None,
            intact: Intact::default(),
        }
    }

    /// Checks the next record (`Err` for a line that is not one). `line`
    /// and `file` only label a break.
    pub fn next(
        &mut self,
        record: Result<Record, String>,
        line: usize,
        file: Option<&str>,
    ) -> Result<(), Broken> {
        let broken = |seq: Option<u64>, why: String| Broken {
            file: file.map(str::to_owned),
            line,
            seq,
            why,
        };
        let r = record.map_err(|e| broken(None, format!("not a record ({e})")))?;
        let seq = Some(r.seq);
        if let Some(expected) = self.expected_seq
            && r.seq != expected
        {
            return Err(broken(
                seq,
                format!(
                    "sequence {} where {expected} was expected (deleted or reordered)",
                    r.seq
                ),
            ));
        }
        if let Some(prev) = &self.prev
            && &r.prev_hash != prev
        {
            return Err(broken(
                seq,
                "does not link to the record before it (deleted, reordered or edited)".into(),
            ));
        }
        if r.hash.starts_with(KEYED) {
            let expected = record_hash(self.key, &r);
            if !bool::from(expected.as_bytes().ct_eq(r.hash.as_bytes())) {
                return Err(broken(
                    seq,
                    "its hash does not match its contents (edited, or another chain key)".into(),
                ));
            }
            if self.unvouched.is_some() && r.action != ADOPTED {
                return Err(broken(
                    seq,
                    "unkeyed records before it are not adopted by the chain key".into(),
                ));
            }
            self.unvouched = None;
            self.keyed_seen = true;
        } else {
            if self.keyed_seen {
                return Err(broken(
                    seq,
                    "an unkeyed record after keyed ones (rewritten without the chain key)".into(),
                ));
            }
            if legacy_hash(&r) != r.hash {
                return Err(broken(
                    seq,
                    "its hash does not match its contents (edited)".into(),
                ));
            }
            self.intact.unkeyed += 1;
            if self.unvouched.is_none() {
                self.unvouched = Some((line, file.map(str::to_owned), r.seq));
            }
        }
        if self.intact.records == 0 {
            self.intact.first_seq = r.seq;
        }
        self.intact.records += 1;
        self.expected_seq = Some(r.seq + 1);
        self.prev = Some(r.hash);
        Ok(())
    }

    /// The result, once every record was given: unkeyed records that no
    /// keyed record vouches for break the chain where they begin.
    pub fn finish(self) -> Result<Intact, Broken> {
        match self.unvouched {
            Some((line, file, seq)) => Err(Broken {
                file,
                line,
                seq: Some(seq),
                why: "unkeyed records that the chain key does not vouch for (rewritten without the key?)"
                    .into(),
            }),
            None => Ok(self.intact),
        }
    }
}

/// Checks a whole chain of stored lines from the first record ever written.
pub fn verify(key: &ChainKey, lines: impl IntoIterator<Item = String>) -> Result<Intact, Broken> {
    let mut v = Verifier::from_genesis(key);
    for (i, line) in lines.into_iter().enumerate() {
        v.next(
            serde_json::from_str::<Record>(&line).map_err(|e| e.to_string()),
            i + 1,
            None,
        )?;
    }
    v.finish()
}
