//! The embedded key store: one append-only journal file (`store.jsonl`) in
//! the store directory. Every change is a whole record (the key or policy as
//! it is after the change), written and fsynced before it is acknowledged,
//! so an acknowledged change survives `kill -9`. Opening the store replays
//! the journal; the newest record of each key or policy wins. When most of
//! its lines are superseded, the journal is rewritten with one line per key
//! and policy, atomically (at open, and by the write that tips it over), so
//! its size follows what it holds, not how often keys changed.
//!
//! With `postgres_url`, keys and policies live in PostgreSQL instead (tables
//! `warden_keys`, `warden_policies`, `warden_meta`, one JSON record per row),
//! shared by every warden process pointing at it: each change is committed
//! before it is acknowledged and announced with `NOTIFY warden_changes`, and
//! every process reloads on the notification (see [`watch_postgres`]).
//!
//! HMAC secrets are sealed with the master key (see `crypto`); bearer API
//! keys are stored as hashes only. The store never holds a secret in clear.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};
use serde::{Deserialize, Serialize};

use crate::crypto::{CryptoError, MasterKey};
use crate::dir_lock::DirLock;
use crate::model::{PolicySpec, Secret};
use crate::private_file::Appended;

pub const JOURNAL: &str = "store.jsonl";

/// Where the store lives and how to get its master key.
#[derive(Clone, Debug)]
pub struct StoreSettings {
    /// The embedded store and the audit log live here.
    pub dir: PathBuf,
    pub master_key: MasterKeySource,
    /// When set, keys and policies live in PostgreSQL.
    pub postgres_url: Option<String>,
    /// How often a single process checkpoints its rate-limit state
    /// (`saved_state`); zero: never, only on a graceful stop.
    pub save_state_every: std::time::Duration,
}

/// Checkpoints of the rate-limit state, by default: a crash loses at most
/// this much of what limits and lockouts were spent.
pub const SAVE_STATE_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

#[derive(Clone, Debug)]
pub enum MasterKeySource {
    File(PathBuf),
    Env(String),
}

/// Why the store cannot be used. Never contains secret material.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("key store {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("key store {path} line {line}: not a valid record; the file was damaged or edited")]
    Corrupt { path: String, line: usize },
    #[error("key store {0} was written with another master key")]
    WrongMasterKey(String),
    #[error("master key: {0}")]
    MasterKey(#[from] CryptoError),
    #[error("master key: environment variable {0} is not set")]
    MasterKeyEnvMissing(String),
    #[error("key store (PostgreSQL): {0}")]
    Postgres(String),
    /// A write whose outcome is not known: PostgreSQL did not confirm it
    /// (no answer within [`POSTGRES_TIMEOUT`], or the connection broke
    /// and could not be made again). It may have been committed.
    #[error("key store (PostgreSQL): the change was not confirmed ({0}); it may have been made")]
    Unconfirmed(String),
    #[error("{0} is not supported with a PostgreSQL store")]
    Unsupported(&'static str),
    #[error("{0}")]
    Audit(String),
    #[error(transparent)]
    InUse(#[from] crate::dir_lock::LockError),
}

impl From<tokio_postgres::Error> for StoreError {
    fn from(e: tokio_postgres::Error) -> Self {
        // The error text names the failing step and its cause (beneath
        // tokio-postgres's "db error"), never the connection URL.
        StoreError::Postgres(warden_client::error_chain(&e))
    }
}

/// A stored secret: sealed, with its lifetime.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretRecord {
    pub id: String,
    /// `MasterKey::seal` output, bound to "key_id/secret_id".
    pub sealed: String,
    pub created_at: i64,
    /// Unix seconds after which it no longer verifies.
    pub valid_until: Option<i64>,
    pub revoked: bool,
}

/// Whether a key signs requests or presents a bearer API key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyKind {
    Hmac,
    Bearer,
}

/// A stored key, as it is after its latest change.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRecord {
    pub id: String,
    pub owner: String,
    pub scopes: Vec<String>,
    pub policies: Vec<String>,
    pub routes: Vec<String>,
    pub bound_identities: Vec<String>,
    pub kind: KeyKind,
    pub revoked: bool,
    pub created_at: i64,
    pub secrets: Vec<SecretRecord>,
    /// Bearer keys: SHA-256 of the API key, hex.
    pub api_key_hash: Option<String>,
}

/// One journal line.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Entry {
    /// First line: which master key sealed this store.
    MasterKey {
        fingerprint: String,
    },
    Key(KeyRecord),
    Policy(PolicySpec),
}

#[derive(Default)]
struct State {
    keys: BTreeMap<String, KeyRecord>,
    /// Every owner's key ids, so that listing one owner's keys reads only
    /// that owner's: a page of one owner's few keys among 100,000 scanned
    /// every id under the read lock (2-5 ms, holding up every admin write
    /// behind it). An owner is kept once, an id as a `Box<str>`: about 63 B
    /// per key (measured, README).
    by_owner: BTreeMap<String, BTreeSet<Box<str>>>,
    policies: BTreeMap<String, PolicySpec>,
}

impl KeyRecord {
    /// Its lists without spare room. Decoded from JSON, each list grew one
    /// element at a time and holds room for four: three unused secret
    /// records (240 B) on every key held in memory, most of it for as long
    /// as warden runs.
    fn shrink_to_fit(&mut self) {
        self.scopes.shrink_to_fit();
        self.policies.shrink_to_fit();
        self.routes.shrink_to_fit();
        self.bound_identities.shrink_to_fit();
        self.secrets.shrink_to_fit();
    }
}

impl State {
    /// Takes in one change (the record replaces the one of its id).
    fn apply(&mut self, entry: Entry) {
        match entry {
            Entry::MasterKey { .. } => {}
            Entry::Key(mut k) => {
                k.shrink_to_fit();
                let (id, owner) = (k.id.clone(), k.owner.clone());
                if let Some(old) = self.keys.insert(id.clone(), k)
                    && old.owner != owner
                    && let Some(ids) = self.by_owner.get_mut(&old.owner)
                {
                    ids.remove(id.as_str());
                    if ids.is_empty() {
                        self.by_owner.remove(&old.owner);
                    }
                }
                self.by_owner
                    .entry(owner)
                    .or_default()
                    .insert(id.into_boxed_str());
            }
            Entry::Policy(p) => {
                self.policies.insert(p.name.clone(), p);
            }
        }
    }

    /// Keys in id order, starting after `after`; with `owner`, only that
    /// owner's, found through the owner index (a page costs its own size,
    /// however many keys other owners hold).
    fn keys_after(&self, after: &str, owner: Option<&str>, limit: usize) -> Vec<KeyRecord> {
        use std::ops::Bound::{Excluded, Unbounded};
        match owner {
            None => {
                let start = match after.is_empty() {
                    true => Unbounded,
                    false => Excluded(after.to_owned()),
                };
                self.keys
                    .range((start, Unbounded))
                    .map(|(_, k)| k.clone())
                    .take(limit)
                    .collect()
            }
            Some(owner) => {
                let Some(ids) = self.by_owner.get(owner) else {
                    return Vec::new();
                };
                let start = match after.is_empty() {
                    true => Unbounded,
                    false => Excluded(after),
                };
                ids.range::<str, _>((start, Unbounded))
                    .filter_map(|id| self.keys.get(&**id).cloned())
                    .take(limit)
                    .collect()
            }
        }
    }

    /// How many records a compacted journal holds (besides its header).
    fn live(&self) -> usize {
        self.keys.len() + self.policies.len()
    }
}

/// Where changes are made durable: the one thing the two stores do
/// differently. Reads always come from the in-memory [`State`].
enum Backend {
    Journal(Journal),
    Database(Database),
}

/// The embedded store: an append-only journal file, fsynced per change.
struct Journal {
    path: PathBuf,
    /// The master key's, written first in the journal (and again when it
    /// is compacted).
    fingerprint: String,
    file: Arc<Mutex<JournalFile>>,
}

/// The journal as it is being written. Held (locked) from a change's write
/// until the change is in memory, so that a compaction, which rewrites the
/// journal from memory under the same lock, has every line it replaces.
struct JournalFile {
    file: Appended,
    /// Lines of complete records.
    lines: usize,
    /// After a compaction failed: the line count at which to try again (not
    /// at every write, each a rewrite of everything).
    compact_from: usize,
}

/// The shared store: a PostgreSQL database that several processes use,
/// with every change announced on [`CHANGES_CHANNEL`].
struct Database {
    /// Made again when closed or given up on (none until then): a database
    /// restart or failover closes every connection, a network that drops
    /// everything leaves one hanging, and the store must work again once
    /// the database is back, without restarting warden.
    client: tokio::sync::Mutex<Option<tokio_postgres::Client>>,
    url: String,
}

/// How long a write or read of the PostgreSQL store may take (waiting for
/// the connection and connecting included) before warden gives up on it
/// and on its connection. They take milliseconds; without a bound, a
/// database that stopped answering held every admin change (and the
/// admin) for as long as TCP kept the connection open.
pub const POSTGRES_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

impl Backend {
    /// Makes one change durable, then puts it in `state`.
    async fn write(&self, entry: Entry, state: &Arc<RwLock<State>>) -> Result<(), StoreError> {
        match self {
            Backend::Journal(journal) => journal.write(entry, state.clone()).await,
            Backend::Database(database) => {
                database.append(&entry).await?;
                state.write().apply(entry);
                Ok(())
            }
        }
    }
}

impl Journal {
    /// Appends and fsyncs one line, puts the change in `state`, and compacts
    /// the journal if that change tipped it over; off the async workers.
    async fn write(&self, entry: Entry, state: Arc<RwLock<State>>) -> Result<(), StoreError> {
        let line = journal_line(&entry);
        let (file, path, fingerprint) = (
            self.file.clone(),
            self.path.clone(),
            self.fingerprint.clone(),
        );
        tokio::task::spawn_blocking(move || {
            let mut journal = file.lock();
            journal.append(line.as_bytes()).map_err(io(&path))?;
            let mut state = state.write();
            state.apply(entry);
            let live = state.live();
            let state = parking_lot::RwLockWriteGuard::downgrade(state);
            if journal.lines >= journal.compact_from && worth_compacting(journal.lines, live) {
                journal.compact(&path, &fingerprint, &state);
            }
            Ok(())
        })
        .await
        .unwrap_or_else(|e| Err(io(&self.path)(std::io::Error::other(e))))
    }
}

impl JournalFile {
    /// Writes and fsyncs one line, whole or not at all ([`Appended`]).
    fn append(&mut self, line: &[u8]) -> std::io::Result<()> {
        self.file.append(line)?;
        self.lines += 1;
        Ok(())
    }

    /// Rewrites the journal from `state`, which holds every line written
    /// (the caller holds this journal). A failure leaves the old journal
    /// in use, and is tried again some writes later.
    fn compact(&mut self, path: &Path, fingerprint: &str, state: &State) {
        let lines_before = self.lines;
        match replace_journal(
            path,
            fingerprint,
            state.keys.values().cloned(),
            state.policies.values().cloned(),
        ) {
            Ok((file, lines, len)) => {
                *self = Self {
                    file: Appended::new(file, len),
                    lines,
                    compact_from: 0,
                };
                tracing::info!(
                    event = "store_compacted",
                    lines_before,
                    lines_after = lines,
                    "compacted the key store journal: one line per key and policy"
                );
            }
            Err(e) => {
                self.compact_from = lines_before + COMPACT_AFTER_SUPERSEDED;
                tracing::warn!(
                    event = "store_compaction_failed",
                    error = %e,
                    "could not compact the key store journal; it goes on growing until the next attempt"
                );
            }
        }
    }
}

impl Database {
    /// Commits one change and announces it to the other processes.
    async fn append(&self, entry: &Entry) -> Result<(), StoreError> {
        let (sql, id, record, announced) = match entry {
            Entry::Key(k) => (
                "INSERT INTO warden_keys (id, record) VALUES ($1, $2) ON CONFLICT (id) DO UPDATE SET record = EXCLUDED.record",
                &k.id,
                serde_json::to_string(k).expect("records serialize"),
                format!("{KEY_CHANGED}{}", k.id),
            ),
            Entry::Policy(p) => (
                "INSERT INTO warden_policies (name, record) VALUES ($1, $2) ON CONFLICT (name) DO UPDATE SET record = EXCLUDED.record",
                &p.name,
                serde_json::to_string(p).expect("records serialize"),
                format!("policy:{}", p.name),
            ),
            Entry::MasterKey { .. } => return Ok(()),
        };
        let upsert = async |client: &tokio_postgres::Client| {
            client.execute(sql, &[id, &record]).await?;
            client
                .execute("SELECT pg_notify($1, $2)", &[&CHANGES_CHANNEL, &announced])
                .await?;
            Ok::<_, StoreError>(())
        };
        let written = self.within_timeout(async |slot: &mut Option<tokio_postgres::Client>| {
            let client = connected(slot, &self.url).await?;
            match upsert(client).await {
                // The connection broke under the write, which may or may
                // not have been committed. It writes the whole record (and
                // an announcement, which is only ever a cue to reload), so
                // making it again on a new connection is safe.
                Err(_) if client.is_closed() => {
                    let client = connected(slot, &self.url).await.map_err(|e| {
                        StoreError::Unconfirmed(format!("the connection broke, then: {e}"))
                    })?;
                    upsert(client).await
                }
                written => written,
            }
        });
        written
            .await
            .unwrap_or_else(|| Err(StoreError::Unconfirmed(no_answer())))
    }

    /// A read on the connection (made again first if closed or given up
    /// on), within the same bound as a write.
    async fn query_opt(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Option<tokio_postgres::Row>, StoreError> {
        self.within_timeout(async |slot: &mut Option<tokio_postgres::Client>| {
            Ok(connected(slot, &self.url)
                .await?
                .query_opt(sql, params)
                .await?)
        })
        .await
        .unwrap_or_else(|| Err(StoreError::Postgres(no_answer())))
    }

    /// Everything in the store, as [`load_postgres`] reads it, within the
    /// same bound.
    async fn load(&self) -> Result<State, StoreError> {
        self.within_timeout(async |slot: &mut Option<tokio_postgres::Client>| {
            load_postgres(connected(slot, &self.url).await?).await
        })
        .await
        .unwrap_or_else(|| Err(StoreError::Postgres(no_answer())))
    }

    /// Runs `f` on the connection, waiting for it included, for at most
    /// [`POSTGRES_TIMEOUT`]; `None` when it was given up on. A connection
    /// given up on is dropped, so the next use starts on a new one.
    async fn within_timeout<T>(
        &self,
        f: impl AsyncFnOnce(&mut Option<tokio_postgres::Client>) -> Result<T, StoreError>,
    ) -> Option<Result<T, StoreError>> {
        let deadline = tokio::time::Instant::now() + POSTGRES_TIMEOUT;
        let mut slot = tokio::time::timeout_at(deadline, self.client.lock())
            .await
            .ok()?;
        let done = tokio::time::timeout_at(deadline, f(&mut slot)).await;
        if done.is_err() {
            *slot = None;
        }
        done.ok()
    }
}

/// What a use of the database given up on at [`POSTGRES_TIMEOUT`] says.
fn no_answer() -> String {
    format!("no answer within {} s", POSTGRES_TIMEOUT.as_secs())
}

/// `slot`'s connection, made first if there is none or it was closed.
async fn connected<'a>(
    slot: &'a mut Option<tokio_postgres::Client>,
    url: &str,
) -> Result<&'a tokio_postgres::Client, StoreError> {
    if slot.as_ref().is_none_or(|c| c.is_closed()) {
        *slot = Some(open_client(url).await?);
        tracing::info!(event = "store_reconnected", "connected to PostgreSQL again");
    }
    Ok(slot.as_ref().expect("just connected"))
}

/// A connection whose messages are handled by a task of its own, which
/// logs how it ended.
async fn open_client(url: &str) -> Result<tokio_postgres::Client, StoreError> {
    let (client, connection) = connect(url).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            let error = warden_client::error_chain(&e);
            tracing::error!(event = "store_connection_lost", %error, "PostgreSQL connection lost");
        }
    });
    Ok(client)
}

/// The store. Reads come from memory; writes go to disk (or the database)
/// first.
pub struct Store {
    backend: Backend,
    dir: PathBuf,
    state: Arc<RwLock<State>>,
    master: MasterKey,
    /// `dir` is this process's alone while the store is open.
    _lock: Arc<DirLock>,
}

/// The key store's tables.
pub const TABLES: crate::postgres::Tables = crate::postgres::Tables {
    read: "SELECT k, v FROM warden_meta WHERE false;
SELECT id, record FROM warden_keys WHERE false;
SELECT name, record FROM warden_policies WHERE false;",
    create: "
CREATE TABLE IF NOT EXISTS warden_meta (k text PRIMARY KEY, v text NOT NULL);
CREATE TABLE IF NOT EXISTS warden_keys (id text PRIMARY KEY, record text NOT NULL);
CREATE TABLE IF NOT EXISTS warden_policies (name text PRIMARY KEY, record text NOT NULL);
",
};

/// The channel every change is announced on, as `key:<id>` or
/// `policy:<name>` (before 2026-11-30, the bare id or name).
pub const CHANGES_CHANNEL: &str = "warden_changes";

/// How an announcement of one key's change starts.
const KEY_CHANGED: &str = "key:";

/// What an announced change touched, once this process's copy has it.
#[derive(Debug)]
pub enum StoreChange {
    /// One key, as it is now: only it needs loading again.
    Key(Box<KeyRecord>),
    /// Possibly anything: a policy (keys count against it), changes missed
    /// while the feed was down, or an announcement that does not say what
    /// (from a node of an older version).
    Everything,
}

async fn connect(
    url: &str,
) -> Result<(tokio_postgres::Client, crate::postgres::Connection), StoreError> {
    crate::postgres::connect(url)
        .await
        .map_err(StoreError::Postgres)
}

async fn load_postgres(client: &tokio_postgres::Client) -> Result<State, StoreError> {
    let mut state = State::default();
    for row in client.query("SELECT record FROM warden_keys", &[]).await? {
        let text: String = row.get(0);
        let key: KeyRecord = serde_json::from_str(&text)
            .map_err(|e| StoreError::Postgres(format!("a stored key is not valid JSON: {e}")))?;
        state.apply(Entry::Key(key));
    }
    for row in client
        .query("SELECT record FROM warden_policies", &[])
        .await?
    {
        let text: String = row.get(0);
        let policy: PolicySpec = serde_json::from_str(&text)
            .map_err(|e| StoreError::Postgres(format!("a stored policy is not valid JSON: {e}")))?;
        state.apply(Entry::Policy(policy));
    }
    Ok(state)
}

/// Keeps a process in step with a shared PostgreSQL store: LISTENs for
/// changes and calls `changed` after reloading what each touched, and with
/// [`StoreChange::Everything`] after every reconnect (changes may have been
/// missed while disconnected). Runs until dropped.
pub async fn watch_postgres<F, Fut>(store: std::sync::Arc<Store>, changed: F)
where
    F: Fn(StoreChange) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let Backend::Database(Database { url, .. }) = &store.backend else {
        return;
    };
    let url = url.clone();
    loop {
        let Err(error) = listen(&store, &url, &changed).await;
        tracing::warn!(event = "store_listen_lost", %error, "the PostgreSQL change feed stopped; reconnecting");
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
}

/// How often the change feed makes a round trip on its own connection. A
/// connection that silently stopped carrying anything (a database host
/// gone without a word, a failover behind a stale TCP path) would
/// otherwise never hear another change: a key revoked through another
/// node would go on working here.
const FEED_CHECK_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// Listens for changes on a connection of its own and loads each one, until
/// the connection fails, stops answering, or a change cannot be loaded;
/// returns why. Every (re)connection first loads everything, since changes
/// may have been missed while nothing listened.
async fn listen<F, Fut>(
    store: &Store,
    url: &str,
    changed: &F,
) -> Result<std::convert::Infallible, String>
where
    F: Fn(StoreChange) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let (client, mut connection) =
        match tokio::time::timeout(POSTGRES_TIMEOUT, crate::postgres::connect(url)).await {
            Ok(connected) => connected.map_err(|e| format!("connecting: {e}"))?,
            Err(_) => return Err(format!("connecting: {}", no_answer())),
        };
    let (tx, mut notifications) = tokio::sync::mpsc::unbounded_channel();
    let feed = tokio::spawn(async move {
        while let Some(message) = std::future::poll_fn(|cx| connection.poll_message(cx)).await {
            match message {
                Ok(tokio_postgres::AsyncMessage::Notification(n)) => {
                    if tx.send(Ok(n)).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    let _ = tx.send(Err(warden_client::error_chain(&e)));
                    return;
                }
            }
        }
    });
    let _feed = AbortOnDrop(feed);
    bounded(
        "listening",
        client.batch_execute(&format!("LISTEN {CHANGES_CHANNEL}")),
    )
    .await?;
    store
        .reload()
        .await
        .map_err(|e| format!("loading every key: {e}"))?;
    changed(StoreChange::Everything).await;
    let mut check = tokio::time::interval(FEED_CHECK_EVERY);
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            notification = notifications.recv() => {
                let notification = notification.unwrap_or_else(|| Err("the connection ended".into()))?;
                let change = store
                    .reload_announced(notification.payload())
                    .await
                    .map_err(|e| format!("loading a change: {e}"))?;
                changed(change).await;
            }
            _ = check.tick() => {
                bounded("checking the connection", client.simple_query("SELECT 1")).await?;
            }
        }
    }
}

/// `step` within [`POSTGRES_TIMEOUT`], its failure said as what it was.
async fn bounded<T>(
    what: &str,
    step: impl std::future::Future<Output = Result<T, tokio_postgres::Error>>,
) -> Result<T, String> {
    match tokio::time::timeout(POSTGRES_TIMEOUT, step).await {
        Ok(Ok(done)) => Ok(done),
        Ok(Err(e)) => Err(format!("{what}: {}", warden_client::error_chain(&e))),
        Err(_) => Err(format!("{what}: {}", no_answer())),
    }
}

/// Aborts a task when dropped: the change feed's connection ends with the
/// feed.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Loads the master key from where the settings say.
pub fn master_key(source: &MasterKeySource) -> Result<MasterKey, StoreError> {
    match source {
        MasterKeySource::File(path) => Ok(MasterKey::from_file(path)?),
        MasterKeySource::Env(name) => {
            let text =
                std::env::var(name).map_err(|_| StoreError::MasterKeyEnvMissing(name.clone()))?;
            Ok(MasterKey::from_hex(&text)?)
        }
    }
}

/// A journal is compacted when it has at least this many superseded lines,
/// and more of them than live records: its size stays within about twice
/// what it holds (or this many lines), and a rewrite of everything comes
/// after at least as many writes as it rewrites.
const COMPACT_AFTER_SUPERSEDED: usize = 1000;

/// One journal line: the entry's JSON and a newline.
fn journal_line(entry: &Entry) -> String {
    let mut line = serde_json::to_string(entry).expect("entries serialize");
    line.push('\n');
    line
}

/// Whether a journal of `lines` (its header included) holding `live`
/// records is mostly superseded lines (see [`COMPACT_AFTER_SUPERSEDED`]).
fn worth_compacting(lines: usize, live: usize) -> bool {
    let superseded = lines.saturating_sub(live + 1);
    superseded >= COMPACT_AFTER_SUPERSEDED && superseded > live
}

/// Reads the journal one line at a time, handing each entry to `take` as it
/// is read: at start, memory holds the records, not the whole journal and
/// every entry in it besides (a journal is up to about twice its records).
/// Returns how many lines it has, and the length of its complete lines when
/// a torn last line follows them (a write cut by a crash before its fsync
/// returned, so never acknowledged: it is dropped, and cut off before the
/// next write).
fn read_entries(
    path: &Path,
    mut take: impl FnMut(Entry) -> Result<(), StoreError>,
) -> Result<(usize, Option<u64>), StoreError> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((0, None)),
        Err(e) => return Err(io(path)(e)),
    };
    let mut reader = std::io::BufReader::with_capacity(64 * 1024, file);
    let (mut line, mut lines, mut complete) = (Vec::new(), 0, 0u64);
    loop {
        line.clear();
        let read = reader.read_until(b'\n', &mut line).map_err(io(path))?;
        if read == 0 {
            return Ok((lines, None));
        }
        if line.last() != Some(&b'\n') {
            tracing::warn!(
                event = "store_torn_write",
                "ignoring an incomplete last record (crash during a write)"
            );
            return Ok((lines, Some(complete)));
        }
        lines += 1;
        let entry = serde_json::from_slice::<Entry>(&line[..read - 1]).map_err(|_| {
            StoreError::Corrupt {
                path: path.display().to_string(),
                line: lines,
            }
        })?;
        take(entry)?;
        complete += read as u64;
    }
}

impl Store {
    /// Opens (or creates) the store: the journal in `settings.dir`, or the
    /// PostgreSQL database.
    pub async fn open(settings: &StoreSettings) -> Result<Self, StoreError> {
        let master = master_key(&settings.master_key)?;
        std::fs::create_dir_all(&settings.dir).map_err(io(&settings.dir))?;
        match &settings.postgres_url {
            None => Self::open_with(&settings.dir, master),
            Some(url) => Self::open_postgres(url, &settings.dir, master).await,
        }
    }

    async fn open_postgres(url: &str, dir: &Path, master: MasterKey) -> Result<Self, StoreError> {
        let lock = Arc::new(DirLock::take(dir)?);
        let client = open_client(url).await?;
        crate::postgres::create_missing(&client, &TABLES)
            .await
            .map_err(StoreError::Postgres)?;
        client
            .execute(
                "INSERT INTO warden_meta (k, v) VALUES ('master_key_fingerprint', $1) ON CONFLICT (k) DO NOTHING",
                &[&master.fingerprint()],
            )
            .await?;
        let row = client
            .query_one(
                "SELECT v FROM warden_meta WHERE k = 'master_key_fingerprint'",
                &[],
            )
            .await?;
        if row.get::<_, String>(0) != master.fingerprint() {
            return Err(StoreError::WrongMasterKey("the PostgreSQL store".into()));
        }
        let state = load_postgres(&client).await?;
        let store = Self {
            backend: Backend::Database(Database {
                client: tokio::sync::Mutex::new(Some(client)),
                url: url.to_owned(),
            }),
            dir: dir.to_owned(),
            state: Arc::new(RwLock::new(state)),
            master,
            _lock: lock,
        };
        store.check_secrets_open()?;
        Ok(store)
    }

    /// Re-reads everything from PostgreSQL (no-op for the file store, which
    /// only this process writes).
    pub async fn reload(&self) -> Result<(), StoreError> {
        if let Backend::Database(database) = &self.backend {
            let state = database.load().await?;
            *self.state.write() = state;
        }
        Ok(())
    }

    /// Brings this process's copy up to date with one announced change:
    /// a key's record alone when the announcement names a key, else
    /// everything.
    async fn reload_announced(&self, announced: &str) -> Result<StoreChange, StoreError> {
        if let (Backend::Database(database), Some(id)) =
            (&self.backend, announced.strip_prefix(KEY_CHANGED))
            && let Some(row) = database
                .query_opt("SELECT record FROM warden_keys WHERE id = $1", &[&id])
                .await?
        {
            let text: String = row.get(0);
            let key: KeyRecord = serde_json::from_str(&text).map_err(|e| {
                StoreError::Postgres(format!("a stored key is not valid JSON: {e}"))
            })?;
            self.state.write().apply(Entry::Key(key.clone()));
            return Ok(StoreChange::Key(Box::new(key)));
        }
        self.reload().await?;
        Ok(StoreChange::Everything)
    }

    pub fn is_shared(&self) -> bool {
        matches!(self.backend, Backend::Database(_))
    }

    fn check_secrets_open(&self) -> Result<(), StoreError> {
        for key in self.state.read().keys.values() {
            for s in &key.secrets {
                self.master.open(&seal_context(&key.id, &s.id), &s.sealed)?;
            }
        }
        Ok(())
    }

    pub fn open_with(dir: &Path, master: MasterKey) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let lock = Arc::new(DirLock::take(dir)?);
        Self::open_journal(dir, master, lock)
    }

    /// The embedded store in `dir`, which `lock` holds for this process
    /// (taken before the journal is read: a torn tail cut here must be no
    /// other process's record being written).
    fn open_journal(dir: &Path, master: MasterKey, lock: Arc<DirLock>) -> Result<Self, StoreError> {
        let path = dir.join(JOURNAL);
        let mut state = State::default();
        let mut has_header = false;
        let (lines, torn) = read_entries(&path, |entry| {
            match entry {
                Entry::MasterKey { fingerprint: f } if f != master.fingerprint() => {
                    return Err(StoreError::WrongMasterKey(path.display().to_string()));
                }
                Entry::MasterKey { .. } => has_header = true,
                entry => state.apply(entry),
            }
            Ok(())
        })?;
        // Cut a torn tail away and make sure the header is there.
        let file = crate::private_file::open_append(&path).map_err(io(&path))?;
        let len = match torn {
            Some(len) => {
                file.set_len(len)
                    .and_then(|()| file.sync_data())
                    .map_err(io(&path))?;
                len
            }
            None => file.metadata().map_err(io(&path))?.len(),
        };
        let mut journal = JournalFile {
            file: Appended::new(file, len),
            lines,
            compact_from: 0,
        };
        let fingerprint = master.fingerprint().to_owned();
        if !has_header {
            let header = Entry::MasterKey {
                fingerprint: fingerprint.clone(),
            };
            journal
                .append(journal_line(&header).as_bytes())
                .map_err(io(&path))?;
        }
        // Every change appends a whole record: keys rotated for years would
        // leave a journal of mostly superseded lines, all read at start (a
        // journal written by a version that compacted only at open).
        if worth_compacting(journal.lines, state.live()) {
            journal.compact(&path, &fingerprint, &state);
        }
        let store = Self {
            backend: Backend::Journal(Journal {
                path,
                fingerprint,
                file: Arc::new(Mutex::new(journal)),
            }),
            dir: dir.to_owned(),
            state: Arc::new(RwLock::new(state)),
            master,
            _lock: lock,
        };
        // Every secret must open: better to refuse to start than to fail
        // checks one by one later.
        store.check_secrets_open()?;
        Ok(store)
    }

    /// The key that seals secrets here (and the audit chain key beside).
    pub fn master(&self) -> &MasterKey {
        &self.master
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Writes one change durably (fsynced to the journal, or committed to
    /// PostgreSQL and announced to the other processes), then makes it
    /// visible.
    async fn write(&self, entry: Entry) -> Result<(), StoreError> {
        let started = std::time::Instant::now();
        let written = self.backend.write(entry, &self.state).await;
        metrics::histogram!("warden_store_write_seconds", "what" => "store")
            .record(started.elapsed().as_secs_f64());
        if written.is_err() {
            metrics::counter!("warden_durable_write_failures_total", "what" => "store")
                .increment(1);
        }
        written
    }

    pub async fn put_key(&self, key: KeyRecord) -> Result<(), StoreError> {
        self.write(Entry::Key(key)).await
    }

    pub async fn put_policy(&self, policy: PolicySpec) -> Result<(), StoreError> {
        self.write(Entry::Policy(policy)).await
    }

    pub fn key(&self, id: &str) -> Option<KeyRecord> {
        self.state.read().keys.get(id).cloned()
    }

    /// Keys in id order, starting after `after`; with `owner`, only that
    /// owner's.
    pub fn keys_after(&self, after: &str, owner: Option<&str>, limit: usize) -> Vec<KeyRecord> {
        self.state.read().keys_after(after, owner, limit)
    }

    /// Calls `f` with every key, in id order, until it fails. Under the
    /// store's read lock, so that building every key does not first copy
    /// every record (at 100,000 keys, some 70 MB of short-lived copies,
    /// which the allocator then keeps). `f` must not call back into the
    /// store's records: writes wait for it.
    pub fn for_each_key<E>(&self, f: impl FnMut(&KeyRecord) -> Result<(), E>) -> Result<(), E> {
        self.state.read().keys.values().try_for_each(f)
    }

    pub fn policies(&self) -> Vec<PolicySpec> {
        self.state.read().policies.values().cloned().collect()
    }

    /// Seals a new secret for `key_id`.
    pub fn seal(&self, key_id: &str, secret_id: &str, secret: &[u8]) -> String {
        self.master.seal(&seal_context(key_id, secret_id), secret)
    }

    /// Opens a stored secret.
    pub fn open_secret(&self, key_id: &str, secret: &SecretRecord) -> Result<Secret, StoreError> {
        Ok(Secret::new(
            self.master
                .open(&seal_context(key_id, &secret.id), &secret.sealed)?,
        ))
    }
}

/// Which store a master-key rotation rewrites.
#[derive(Clone, Copy, Debug)]
pub enum RotationTarget<'a> {
    /// The embedded store in this directory (its audit chain key too).
    Journal(&'a Path),
    /// The shared PostgreSQL store, and optionally one node's directory
    /// whose audit chain key is re-sealed too (run once per node).
    Database {
        url: &'a str,
        node_dir: Option<&'a Path>,
    },
}

/// What a master-key rotation did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rotated {
    /// Secrets re-encrypted; `None` when the store was already under the
    /// new key (a rotation run before, for another node or cut short).
    pub secrets: Option<usize>,
    /// Whether this directory's audit chain key was re-sealed now (not
    /// when there is none, or it already was).
    pub audit_key: bool,
}

/// Re-encrypts every stored secret (and the audit chain key) from `old` to
/// `new`. Run it with every warden process of that store stopped: a
/// running one still holds the old key. It can be run again: a store or a
/// chain key already under `new` is left as it is, so a rotation cut short
/// between the two is finished by running it once more, and a cluster's
/// shared store is rotated by the run for the first node's directory and
/// left alone by the runs for the others.
pub async fn rotate_master_key(
    target: RotationTarget<'_>,
    old: &MasterKey,
    new: &MasterKey,
) -> Result<Rotated, StoreError> {
    // The directory is this run's alone (a warden process using it is
    // refused): it holds the old key, and would write its journal and audit
    // chain over this run's.
    let (secrets, audit_dir, _lock) = match target {
        RotationTarget::Journal(dir) => {
            let lock = Arc::new(DirLock::take(dir)?);
            (
                rotate_journal(dir, lock.clone(), old, new)?,
                Some(dir),
                Some(lock),
            )
        }
        RotationTarget::Database { url, node_dir } => {
            let lock = node_dir.map(DirLock::take).transpose()?.map(Arc::new);
            (rotate_database(url, old, new).await?, node_dir, lock)
        }
    };
    let audit_key = match audit_dir {
        Some(dir) => {
            crate::audit::reseal_key(dir, old, new).map_err(|e| StoreError::Audit(e.to_string()))?
        }
        None => false,
    };
    Ok(Rotated { secrets, audit_key })
}

/// The journal, compacted (one record per key and policy) and re-sealed,
/// replaces the old one atomically.
fn rotate_journal(
    dir: &Path,
    lock: Arc<DirLock>,
    old: &MasterKey,
    new: &MasterKey,
) -> Result<Option<usize>, StoreError> {
    let store = match Store::open_journal(dir, old.clone(), lock.clone()) {
        Ok(store) => store,
        Err(StoreError::WrongMasterKey(_))
            if Store::open_journal(dir, new.clone(), lock).is_ok() =>
        {
            return Ok(None);
        }
        Err(e) => return Err(e),
    };
    let Backend::Journal(Journal { path, .. }) = &store.backend else {
        return Err(StoreError::Unsupported("master key rotation"));
    };
    let state = store.state.read();
    let mut keys = Vec::with_capacity(state.keys.len());
    let mut resealed = 0;
    for key in state.keys.values() {
        let mut key = key.clone();
        for s in &mut key.secrets {
            let plain = store
                .master
                .open(&seal_context(&key.id, &s.id), &s.sealed)?;
            s.sealed = new.seal(&seal_context(&key.id, &s.id), &plain);
            resealed += 1;
        }
        keys.push(key);
    }
    replace_journal(
        path,
        new.fingerprint(),
        keys,
        state.policies.values().cloned(),
    )?;
    Ok(Some(resealed))
}

/// Replaces the journal atomically (a crash leaves the old journal or the
/// new one) with one line per key and policy after the master key's
/// fingerprint; returns it open at its end, with its lines and bytes.
fn replace_journal(
    path: &Path,
    fingerprint: &str,
    keys: impl IntoIterator<Item = KeyRecord>,
    policies: impl IntoIterator<Item = PolicySpec>,
) -> Result<(File, usize, u64), StoreError> {
    let header = Entry::MasterKey {
        fingerprint: fingerprint.to_owned(),
    };
    let entries = std::iter::once(header)
        .chain(keys.into_iter().map(Entry::Key))
        .chain(policies.into_iter().map(Entry::Policy));
    let (mut journal, mut lines) = (String::new(), 0);
    for entry in entries {
        journal.push_str(&journal_line(&entry));
        lines += 1;
    }
    let file = crate::private_file::replace_and_keep(path, journal.as_bytes()).map_err(io(path))?;
    Ok((file, lines, journal.len() as u64))
}

/// Every secret re-sealed and the fingerprint switched in one transaction,
/// with the keys table locked.
async fn rotate_database(
    url: &str,
    old: &MasterKey,
    new: &MasterKey,
) -> Result<Option<usize>, StoreError> {
    let (mut client, connection) = connect(url).await?;
    tokio::spawn(connection);
    let tx = client.transaction().await?;
    tx.batch_execute("LOCK TABLE warden_keys IN EXCLUSIVE MODE")
        .await?;
    let current: String = tx
        .query_one(
            "SELECT v FROM warden_meta WHERE k = 'master_key_fingerprint'",
            &[],
        )
        .await?
        .get(0);
    if current == new.fingerprint() && current != old.fingerprint() {
        return Ok(None);
    }
    if current != old.fingerprint() {
        return Err(StoreError::WrongMasterKey("the PostgreSQL store".into()));
    }
    let mut resealed = 0;
    for row in tx.query("SELECT record FROM warden_keys", &[]).await? {
        let text: String = row.get(0);
        let mut key: KeyRecord = serde_json::from_str(&text)
            .map_err(|e| StoreError::Postgres(format!("a stored key is not valid JSON: {e}")))?;
        for s in &mut key.secrets {
            let plain = old.open(&seal_context(&key.id, &s.id), &s.sealed)?;
            s.sealed = new.seal(&seal_context(&key.id, &s.id), &plain);
            resealed += 1;
        }
        let record = serde_json::to_string(&key).expect("records serialize");
        tx.execute(
            "UPDATE warden_keys SET record = $2 WHERE id = $1",
            &[&key.id, &record],
        )
        .await?;
    }
    tx.execute(
        "UPDATE warden_meta SET v = $1 WHERE k = 'master_key_fingerprint'",
        &[&new.fingerprint()],
    )
    .await?;
    tx.commit().await?;
    Ok(Some(resealed))
}

fn seal_context(key_id: &str, secret_id: &str) -> String {
    format!("{key_id}/{secret_id}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn master() -> (String, MasterKey) {
        let hex = MasterKey::generate_hex();
        let key = MasterKey::from_hex(&hex).unwrap();
        (hex, key)
    }

    fn key(store: &Store, id: &str, secret: &[u8]) -> KeyRecord {
        KeyRecord {
            secrets: vec![SecretRecord {
                id: "s1".into(),
                sealed: store.seal(id, "s1", secret),
                created_at: 1,
                valid_until: None,
                revoked: false,
            }],
            ..owned(id, "o")
        }
    }

    /// A key record of `owner`'s, without secrets.
    fn owned(id: &str, owner: &str) -> KeyRecord {
        KeyRecord {
            id: id.into(),
            owner: owner.into(),
            scopes: vec![],
            policies: vec![],
            routes: vec![],
            bound_identities: vec![],
            kind: KeyKind::Hmac,
            revoked: false,
            created_at: 1,
            secrets: vec![],
            api_key_hash: None,
        }
    }

    proptest::proptest! {
        /// Listing one owner's keys through the index gives exactly what
        /// filtering every key by owner gives, page by page, however keys
        /// change hands; and the index keeps no entry for an owner a key
        /// has left.
        #[test]
        fn an_owners_page_is_the_owner_filter_of_all_keys(
            puts in proptest::collection::vec((0u8..12, 0u8..4), 0..60),
            after in 0u8..13,
            limit in 1usize..6,
        ) {
            let mut state = State::default();
            for (id, owner) in &puts {
                state.apply(Entry::Key(owned(&format!("k{id:02}"), &format!("o{owner}"))));
            }
            let indexed: usize = state.by_owner.values().map(|ids| ids.len()).sum();
            proptest::prop_assert_eq!(indexed, state.keys.len());
            proptest::prop_assert!(state.by_owner.values().all(|ids| !ids.is_empty()));
            let after = if after == 12 { String::new() } else { format!("k{after:02}") };
            for owner in ["o0", "o1", "o2", "o3", "nobody"] {
                let ids = |keys: Vec<KeyRecord>| keys.into_iter().map(|k| k.id).collect::<Vec<_>>();
                let expected: Vec<String> = state
                    .keys
                    .values()
                    .filter(|k| k.id > after && k.owner == owner)
                    .take(limit)
                    .map(|k| k.id.clone())
                    .collect();
                proptest::prop_assert_eq!(ids(state.keys_after(&after, Some(owner), limit)), expected);
            }
        }
    }

    #[tokio::test]
    async fn a_key_that_changed_owner_is_listed_under_its_new_owner_after_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let (hex, m) = master();
        let store = Store::open_with(dir.path(), m).unwrap();
        store.put_key(owned("k1", "alice")).await.unwrap();
        store.put_key(owned("k2", "alice")).await.unwrap();
        store.put_key(owned("k1", "bob")).await.unwrap();
        drop(store);
        let store = Store::open_with(dir.path(), MasterKey::from_hex(&hex).unwrap()).unwrap();
        let ids = |owner| {
            store
                .keys_after("", Some(owner), 10)
                .into_iter()
                .map(|k| k.id)
                .collect::<Vec<_>>()
        };
        assert_eq!(ids("alice"), ["k2"]);
        assert_eq!(ids("bob"), ["k1"]);
        assert_eq!(store.keys_after("k1", Some("bob"), 10), []);
    }

    #[tokio::test]
    async fn changes_survive_reopening_and_no_secret_is_stored_in_clear() {
        let dir = tempfile::tempdir().unwrap();
        let (hex, m) = master();
        let store = Store::open_with(dir.path(), m).unwrap();
        store
            .put_key(key(&store, "k1", b"super-secret-value-0123456789abcdef"))
            .await
            .unwrap();
        drop(store);
        let bytes = std::fs::read(dir.path().join(JOURNAL)).unwrap();
        assert!(!String::from_utf8_lossy(&bytes).contains("super-secret-value"));
        let store = Store::open_with(dir.path(), MasterKey::from_hex(&hex).unwrap()).unwrap();
        let k = store.key("k1").unwrap();
        assert_eq!(
            store.open_secret("k1", &k.secrets[0]).unwrap().expose(),
            b"super-secret-value-0123456789abcdef"
        );
    }

    #[tokio::test]
    async fn the_wrong_master_key_is_refused_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_with(dir.path(), master().1).unwrap();
        store.put_key(key(&store, "k1", b"x")).await.unwrap();
        drop(store);
        assert!(matches!(
            Store::open_with(dir.path(), master().1),
            Err(StoreError::WrongMasterKey(_))
        ));
    }

    #[tokio::test]
    async fn a_torn_last_line_is_dropped_but_damage_elsewhere_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (hex, m) = master();
        let store = Store::open_with(dir.path(), m).unwrap();
        store.put_key(key(&store, "k1", b"x")).await.unwrap();
        drop(store);
        let path = dir.path().join(JOURNAL);
        let mut text = std::fs::read_to_string(&path).unwrap();
        text.push_str("{\"key\":{\"id\":\"half");
        std::fs::write(&path, &text).unwrap();
        let store = Store::open_with(dir.path(), MasterKey::from_hex(&hex).unwrap()).unwrap();
        assert!(store.key("k1").is_some());
        // Writing after the torn line must not glue onto it.
        store.put_key(key(&store, "k2", b"y")).await.unwrap();
        drop(store);
        let store = Store::open_with(dir.path(), MasterKey::from_hex(&hex).unwrap()).unwrap();
        assert!(store.key("k1").is_some() && store.key("k2").is_some());
        drop(store);
        let damaged = text.replacen("\"key\"", "\"kex\"", 1) + "\n";
        std::fs::write(&path, damaged).unwrap();
        assert!(matches!(
            Store::open_with(dir.path(), MasterKey::from_hex(&hex).unwrap()),
            Err(StoreError::Corrupt { .. })
        ));
    }

    #[tokio::test]
    async fn a_journal_of_mostly_superseded_lines_is_compacted_at_open_and_keeps_every_record() {
        let dir = tempfile::tempdir().unwrap();
        let (hex, m) = master();
        let store = Store::open_with(dir.path(), m).unwrap();
        store.put_key(key(&store, "k2", b"two")).await.unwrap();
        let k1 = key(&store, "k1", b"one");
        drop(store);
        // Versions of k1 as a long life of rotations would leave them, and
        // a torn last line from a crash.
        let path = dir.path().join(JOURNAL);
        let mut text = std::fs::read_to_string(&path).unwrap();
        for v in 0..=COMPACT_AFTER_SUPERSEDED {
            let version = KeyRecord {
                owner: format!("owner-{v}"),
                ..k1.clone()
            };
            text.push_str(&serde_json::to_string(&Entry::Key(version)).unwrap());
            text.push('\n');
        }
        text.push_str("{\"key\":{\"id\":\"half");
        std::fs::write(&path, &text).unwrap();

        let reopen = || Store::open_with(dir.path(), MasterKey::from_hex(&hex).unwrap()).unwrap();
        let store = reopen();
        let lines = || std::fs::read_to_string(&path).unwrap().lines().count();
        assert_eq!(lines(), 3, "the header and one line per key");
        let latest = store.key("k1").unwrap();
        assert_eq!(latest.owner, format!("owner-{COMPACT_AFTER_SUPERSEDED}"));
        assert_eq!(
            store
                .open_secret("k1", &latest.secrets[0])
                .unwrap()
                .expose(),
            b"one"
        );
        // Appends go to the new journal, not to the replaced one.
        store.put_key(key(&store, "k3", b"three")).await.unwrap();
        drop(store);
        let store = reopen();
        assert_eq!(
            lines(),
            4,
            "nothing to compact: the journal is left as it is"
        );
        for (id, secret) in [("k1", b"one".as_slice()), ("k2", b"two"), ("k3", b"three")] {
            let k = store.key(id).unwrap();
            assert_eq!(
                store.open_secret(id, &k.secrets[0]).unwrap().expose(),
                secret
            );
        }
    }

    /// Records decoded from the journal keep no spare room in their lists
    /// (decoded one element at a time, each list had room for four).
    #[tokio::test]
    async fn records_read_back_keep_no_spare_room() {
        let dir = tempfile::tempdir().unwrap();
        let (hex, m) = master();
        let store = Store::open_with(dir.path(), m).unwrap();
        let mut k = key(&store, "k", b"secret");
        k.policies = vec!["p1".into()];
        k.scopes = vec!["read".into(), "write".into()];
        store.put_key(k).await.unwrap();
        drop(store);
        let store = Store::open_with(dir.path(), MasterKey::from_hex(&hex).unwrap()).unwrap();
        let k = store.key("k").unwrap();
        let record = store.state.read();
        let held = &record.keys["k"];
        assert_eq!(
            (k.secrets.len(), k.policies.len(), k.scopes.len()),
            (1, 1, 2)
        );
        assert_eq!(held.secrets.capacity(), 1);
        assert_eq!(held.policies.capacity(), 1);
        assert_eq!(held.scopes.capacity(), 2);
    }

    #[tokio::test]
    async fn the_write_that_tips_the_journal_over_is_in_the_compacted_journal() {
        let dir = tempfile::tempdir().unwrap();
        let (hex, m) = master();
        let store = Store::open_with(dir.path(), m).unwrap();
        let base = key(&store, "k", b"secret");
        // The header and one key: the 1,001st version leaves 1,000
        // superseded lines, and compacts.
        let last = COMPACT_AFTER_SUPERSEDED as i64 + 1;
        for v in 1..=last {
            let version = KeyRecord {
                created_at: v,
                ..base.clone()
            };
            store.put_key(version).await.unwrap();
        }
        let path = dir.path().join(JOURNAL);
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 2, "the header and the key");
        drop(store);
        let store = Store::open_with(dir.path(), MasterKey::from_hex(&hex).unwrap()).unwrap();
        assert_eq!(store.key("k").unwrap().created_at, last);
    }

    /// A long-running server: writers on several threads rotate a few
    /// keys far past the compaction threshold. The journal is rewritten
    /// while they write, never lags a write it should hold, and every
    /// acknowledged change (each key's last version) is there on reopening.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_running_store_compacts_its_journal_and_loses_no_acknowledged_change() {
        let dir = tempfile::tempdir().unwrap();
        let (hex, m) = master();
        let store = Arc::new(Store::open_with(dir.path(), m).unwrap());
        let path = dir.path().join(JOURNAL);
        let lines = || std::fs::read_to_string(&path).unwrap().lines().count();
        const WRITERS: usize = 4;
        const VERSIONS: usize = COMPACT_AFTER_SUPERSEDED * 3 / 4;
        let mut writers = Vec::new();
        for w in 0..WRITERS {
            let store = store.clone();
            writers.push(tokio::spawn(async move {
                let id = format!("k{w}");
                let base = key(&store, &id, id.as_bytes());
                for v in 1..=VERSIONS {
                    let version = KeyRecord {
                        created_at: v as i64,
                        ..base.clone()
                    };
                    store.put_key(version).await.unwrap();
                }
            }));
        }
        for w in writers {
            w.await.unwrap();
        }
        let written = WRITERS * VERSIONS + 1;
        let after = lines();
        assert!(
            after < written - COMPACT_AFTER_SUPERSEDED,
            "{after} lines after {written} writes: not compacted while running"
        );
        assert!(
            after <= 1 + WRITERS + COMPACT_AFTER_SUPERSEDED,
            "{after} lines: more superseded lines than the threshold were left"
        );
        drop(store);
        let store = Store::open_with(dir.path(), MasterKey::from_hex(&hex).unwrap()).unwrap();
        for w in 0..WRITERS {
            let id = format!("k{w}");
            let k = store.key(&id).expect("every key survives");
            assert_eq!(k.created_at, VERSIONS as i64, "{id}: its last version");
            assert_eq!(
                store.open_secret(&id, &k.secrets[0]).unwrap().expose(),
                id.as_bytes()
            );
        }
    }

    #[tokio::test]
    async fn rotating_the_master_key_reseals_every_secret() {
        let dir = tempfile::tempdir().unwrap();
        let (old_hex, old) = master();
        let store = Store::open_with(dir.path(), old).unwrap();
        store
            .put_key(key(&store, "k1", b"secret-one"))
            .await
            .unwrap();
        store
            .put_key(key(&store, "k2", b"secret-two"))
            .await
            .unwrap();
        drop(store);
        let (new_hex, new) = master();
        let old = MasterKey::from_hex(&old_hex).unwrap();
        let n = rotate_master_key(RotationTarget::Journal(dir.path()), &old, &new)
            .await
            .unwrap();
        assert_eq!(
            n,
            Rotated {
                secrets: Some(2),
                audit_key: false
            }
        );
        assert!(Store::open_with(dir.path(), MasterKey::from_hex(&old_hex).unwrap()).is_err());
        let store = Store::open_with(dir.path(), MasterKey::from_hex(&new_hex).unwrap()).unwrap();
        let k2 = store.key("k2").unwrap();
        assert_eq!(
            store.open_secret("k2", &k2.secrets[0]).unwrap().expose(),
            b"secret-two"
        );
    }

    /// A rotation cut short after the journal (a crash, a full disk on
    /// the audit key) left the store under the new key and the audit
    /// chain key under the old one: the node refuses to start. Running
    /// the rotation again finishes it, and a third run changes nothing.
    /// A key that is neither is still refused.
    #[tokio::test]
    async fn a_rotation_cut_short_is_finished_by_running_it_again() {
        let dir = tempfile::tempdir().unwrap();
        let (_, old) = master();
        let (_, new) = master();
        let (_, other) = master();
        let store = Store::open_with(dir.path(), old.clone()).unwrap();
        store
            .put_key(key(&store, "k1", b"secret-one"))
            .await
            .unwrap();
        drop(store);
        let audit = crate::audit::AuditLog::open(dir.path(), &old, Default::default()).unwrap();
        drop(audit);

        let target = RotationTarget::Journal(dir.path());
        assert!(matches!(
            rotate_master_key(target, &other, &new).await,
            Err(StoreError::WrongMasterKey(_))
        ));
        // Cut short after the journal, before the chain key.
        let lock = Arc::new(DirLock::take(dir.path()).unwrap());
        assert_eq!(
            rotate_journal(dir.path(), lock, &old, &new).unwrap(),
            Some(1)
        );
        assert!(crate::audit::AuditLog::open(dir.path(), &new, Default::default()).is_err());
        // Neither the old key nor the new one: the chain key stays sealed.
        assert!(rotate_master_key(target, &other, &new).await.is_err());

        let finished = rotate_master_key(target, &old, &new).await.unwrap();
        assert_eq!(
            finished,
            Rotated {
                secrets: None,
                audit_key: true
            }
        );
        let again = rotate_master_key(target, &old, &new).await.unwrap();
        assert_eq!(
            again,
            Rotated {
                secrets: None,
                audit_key: false
            }
        );
        let store = Store::open_with(dir.path(), new.clone()).unwrap();
        let k1 = store.key("k1").unwrap();
        assert_eq!(
            store.open_secret("k1", &k1.secrets[0]).unwrap().expose(),
            b"secret-one"
        );
        crate::audit::AuditLog::open(dir.path(), &new, Default::default()).unwrap();
    }
}
