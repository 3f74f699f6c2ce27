//! The clock mark: on disk, how late a time this process may have shown,
//! so that the next process never shows an earlier one.
//!
//! Why: nonces live in memory, and a restarted process refuses every
//! timestamp its predecessor could have accepted by its restart fence,
//! counted from its start ([`crate::freshness`]). Counted from the system
//! clock alone, that trusts the clock not to have gone back across the
//! restart, and clocks do: a VM booted with a wrong hardware clock before
//! NTP corrects it, a clock set back by hand, a spoofed NTP server and a
//! crash. Started `d` seconds behind, a process would accept again, as its
//! clock caught up, what its predecessor accepted in its last `d` seconds.
//!
//! So the process's clock ([`ForwardOnly`]) never shows a time past the
//! mark on disk: a task writes `now + LOOKAHEAD`, synced, twice a second,
//! and only then lets the clock show up to it. The next process holds its
//! clock at the mark until the system clock passes it, and its restart
//! fence counts from there. After a crash, a restart is ready up to
//! [`LOOKAHEAD`] later than the fence alone would make it (a clean stop
//! writes the exact time instead).
//!
//! A process that does not run for a while (stopped, paused, starved of
//! CPU) does not write marks either, and wakes with its clock's ceiling
//! seconds behind the requests waiting for it: a ceiling not renewed for
//! [`CEILING_LAPSES_AFTER`] lapses ([`ForwardOnly`]), and the wait is
//! logged (`process_stalled`).
//!
//! A disk that fails or hangs must not stop warden serving: checks never
//! wait for a disk. So a mark that fails, or is not written within
//! [`LATE`], lets the clock go on without one (logged, and counted as
//! `warden_durable_write_failures_total{what="clock_mark"}`), and the cap
//! comes back with the next mark written. A crash meanwhile leaves the next
//! start protected up to the last mark written, not beyond.
//!
//! The file holds two records, written in turn, each with its own check
//! sum: a write torn by a crash leaves the other one whole.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use sha2::{Digest, Sha256};

use crate::engine::clock::{CEILING_LAPSES_AFTER, Clock, ForwardOnly, Nanos};

/// The mark's file, in the store's directory.
pub const FILE_NAME: &str = "clock.mark";

/// How far ahead of the time shown each mark is written: how much later
/// than its fence alone a process restarted after a crash is ready.
pub const LOOKAHEAD: Duration = Duration::from_secs(2);

/// How often a new mark is written.
const EVERY: Duration = Duration::from_millis(500);

/// How long a write may take before the clock goes on without it: by then
/// the clock has stood at the last mark for half a second.
const LATE: Duration = LOOKAHEAD;

// A keeper that runs lets the clock go on by itself (a mark written, or one
// late) before the clock's ceiling lapses: the lapse is only for a keeper
// that did not run.
const _: () = assert!(LOOKAHEAD.as_millis() + LATE.as_millis() <= CEILING_LAPSES_AFTER.as_millis());

/// While writes fail, how often that is logged again.
const REPEAT_FAILURE_LOG: Duration = Duration::from_secs(30);

const MAGIC: &[u8; 8] = b"wdnmark1";
const RECORD: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum MarkError {
    #[error("clock mark {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error(
        "clock mark {path}: neither of its records is whole. It holds how late a time the previous warden process may have shown; remove it only if the system clock cannot have gone back since that process stopped"
    )]
    Corrupt { path: PathBuf },
}

/// One record of the mark: its number, which grows by one with each
/// record any process writes, and the time it caps the clock at. Two
/// processes never write the same number, so a mark read at start equal
/// to the one a process wrote last says that no process ran since.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mark {
    pub seq: u64,
    pub until: Nanos,
}

/// What a mark file held when it was opened.
#[derive(Debug, PartialEq, Eq)]
enum Previous {
    /// A new (or never written) file.
    Nothing,
    /// The newest whole record.
    Mark { seq: u64, until: Nanos },
    /// Bytes, but no whole record: not a file a crash can leave.
    Corrupt,
}

/// The open mark file, and the number of the last record written.
struct MarkFile {
    file: File,
    path: PathBuf,
    seq: u64,
}

impl MarkFile {
    /// Opens the mark in `dir` (made, empty, if there is none), with the
    /// mark the previous process left.
    fn open(dir: &Path) -> Result<(Self, Option<Mark>), MarkError> {
        let path = dir.join(FILE_NAME);
        let failed = |source| MarkError::Io {
            path: path.clone(),
            source,
        };
        let open = || OpenOptions::new().read(true).write(true).open(&path);
        let file = match open() {
            Ok(file) => file,
            // Made whole and durable (its directory synced) before use.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                crate::private_file::replace(&path, &[0; 2 * RECORD])
                    .and_then(|()| open())
                    .map_err(failed)?
            }
            Err(e) => return Err(failed(e)),
        };
        let mut bytes = [0; 2 * RECORD];
        let mut len = 0;
        while len < bytes.len() {
            match file.read_at(&mut bytes[len..], len as u64) {
                Ok(0) => break,
                Ok(n) => len += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(failed(e)),
            }
        }
        let (seq, mark) = match previous(&bytes[..len]) {
            Previous::Nothing => (0, None),
            Previous::Mark { seq, until } => (seq, Some(Mark { seq, until })),
            Previous::Corrupt => return Err(MarkError::Corrupt { path }),
        };
        Ok((Self { file, path, seq }, mark))
    }

    /// Writes `until` durably, over the older of the two records.
    fn write(&mut self, until: Nanos) -> io::Result<Mark> {
        let seq = self.seq + 1;
        let offset = (seq % 2) * RECORD as u64;
        self.file.write_all_at(&record(seq, until), offset)?;
        self.file.sync_data()?;
        self.seq = seq;
        Ok(Mark { seq, until })
    }
}

fn record(seq: u64, until: Nanos) -> [u8; RECORD] {
    let mut r = [0; RECORD];
    r[..8].copy_from_slice(MAGIC);
    r[8..16].copy_from_slice(&seq.to_le_bytes());
    r[16..24].copy_from_slice(&until.get().to_le_bytes());
    let sum = Sha256::digest(&r[..24]);
    r[24..].copy_from_slice(&sum[..8]);
    r
}

/// A record's number and mark, if it is whole.
fn parse(r: &[u8]) -> Option<(u64, Nanos)> {
    let r: &[u8; RECORD] = r.try_into().ok()?;
    let whole = &r[..8] == MAGIC && Sha256::digest(&r[..24])[..8] == r[24..];
    whole.then(|| {
        let number = |b: &[u8]| u64::from_le_bytes(b.try_into().expect("eight bytes"));
        (number(&r[8..16]), Nanos::new(number(&r[16..24])))
    })
}

fn previous(bytes: &[u8]) -> Previous {
    match bytes
        .chunks(RECORD)
        .filter_map(parse)
        .max_by_key(|(seq, _)| *seq)
    {
        Some((seq, until)) => Previous::Mark { seq, until },
        None if bytes.iter().all(|b| *b == 0) => Previous::Nothing,
        None => Previous::Corrupt,
    }
}

/// Keeps a clock within its mark on disk, from [`Keeper::arm`] until it is
/// stopped ([`Keeper::stop`], or dropped). Stopping it stops the clock
/// where it is and writes that time, so a clean stop costs the next
/// process no wait beyond its fence.
pub struct Keeper<C: Clock> {
    file: Arc<Mutex<MarkFile>>,
    clock: &'static ForwardOnly<C>,
    task: tokio::task::JoinHandle<()>,
    previous: Option<Mark>,
    stopped: bool,
}

impl<C: Clock> Keeper<C> {
    /// Reads the previous process's mark in `dir` and holds `clock` from it,
    /// writes this process's first mark and caps `clock` there, then keeps
    /// writing marks (a task on the runtime, the writes on its blocking
    /// threads). One per process.
    pub fn arm(dir: &Path, clock: &'static ForwardOnly<C>) -> Result<Self, MarkError> {
        let (mut file, previous) = MarkFile::open(dir)?;
        if let Some(previous) = previous {
            clock.hold_from(previous.until);
            report_previous(&file.path, clock.held_back());
        }
        renew(&mut file, clock).map_err(|source| MarkError::Io {
            path: file.path.clone(),
            source,
        })?;
        let path = file.path.clone();
        let file = Arc::new(Mutex::new(file));
        let task = tokio::spawn(keep(file.clone(), path, clock));
        Ok(Self {
            file,
            clock,
            task,
            previous,
            stopped: false,
        })
    }

    /// The mark the previous process left: no time it showed was later
    /// (`until`), and no process wrote one since (`seq`).
    pub fn previous(&self) -> Option<Mark> {
        self.previous
    }

    /// Stops the clock where it is, for good, and writes that time as the
    /// final mark: the mark returned, or `None` when it could not be
    /// written (the one before it stands).
    pub fn stop(mut self) -> Option<Mark> {
        self.finish()
    }

    fn finish(&mut self) -> Option<Mark> {
        if std::mem::replace(&mut self.stopped, true) {
            return None;
        }
        self.task.abort();
        // Waits for a write under way, if any, but not for a disk that
        // hangs: the process must still end.
        let Some(mut file) = self.file.try_lock_for(LATE) else {
            tracing::warn!(
                event = "clock_mark_write_failed",
                error = "a write under way did not end",
                "cannot write the final clock mark"
            );
            return None;
        };
        // Stopping: nothing may be shown past the time written last.
        let last = self.clock.uncapped().min(self.clock.ceiling());
        self.clock.cap_for_good_at(last);
        match file.write(last) {
            Ok(mark) => Some(mark),
            Err(e) => {
                // The mark before it stands: only a longer wait for the
                // next process (or, if the marks were failing, the last
                // one written).
                tracing::warn!(
                    event = "clock_mark_write_failed",
                    path = %file.path.display(),
                    error = %e,
                    "cannot write the final clock mark"
                );
                None
            }
        }
    }
}

impl<C: Clock> Drop for Keeper<C> {
    fn drop(&mut self) {
        self.finish();
    }
}

/// The keeper's task: a new mark every [`EVERY`]. A write that fails, or
/// is still not done after [`LATE`], lets the clock go on without a mark
/// rather than stop every check for a disk: the clock mark protects a
/// restart, and must never stop warden serving. It is logged and counted,
/// and the cap comes back with the next mark written.
/// `path` is the file's, kept apart: a write that hangs holds the file.
async fn keep<C: Clock>(file: Arc<Mutex<MarkFile>>, path: PathBuf, clock: &'static ForwardOnly<C>) {
    let mut tick = tokio::time::interval(EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    let mut trouble = Trouble::default();
    let mut pulse = Pulse::new();
    loop {
        tick.tick().await;
        pulse.beat();
        let write = tokio::task::spawn_blocking({
            let file = file.clone();
            move || renew(&mut file.lock(), clock)
        });
        tokio::pin!(write);
        // Looked at every EVERY while the write is under way: a process
        // stopped meanwhile gives the disk its LATE again from waking,
        // rather than blame a disk that was stopped with it.
        let mut late_at = Instant::now() + LATE;
        let mut reported = false;
        let written = loop {
            tokio::select! {
                done = &mut write => break done,
                () = tokio::time::sleep(EVERY) => {
                    if pulse.beat() {
                        late_at = Instant::now() + LATE;
                    }
                    if !reported && Instant::now() >= late_at {
                        trouble.report(clock, &path, &format!("not written within {LATE:?}"));
                        reported = true;
                    }
                }
            }
        };
        match written.unwrap_or_else(|e| Err(io::Error::other(e))) {
            Ok(()) => trouble.over(),
            Err(e) => trouble.report(clock, &path, &e.to_string()),
        }
        pulse.beat();
    }
}

/// When the keeper last ran, to tell a process that did not run (stopped,
/// paused or starved of CPU) from a disk that is slow: the keeper runs at
/// least every [`EVERY`] while it waits for either.
struct Pulse {
    last: Instant,
}

impl Pulse {
    fn new() -> Self {
        Self {
            last: Instant::now(),
        }
    }

    /// Notes that the keeper runs; says so (and returns true) when it had
    /// not run for longer than [`LATE`]: the clock stood still meanwhile,
    /// or went on without a mark once its ceiling lapsed, and checks
    /// decided around then waited. The operator should know why.
    fn beat(&mut self) -> bool {
        let idle = self.last.elapsed();
        self.last = Instant::now();
        let stalled = idle > LATE;
        if stalled {
            tracing::warn!(
                event = "process_stalled",
                stalled_ms = idle.as_millis() as u64,
                "warden did not run for a while (stopped, paused or starved of CPU); checks waited, and its clock may have gone on without a new clock mark"
            );
        }
        stalled
    }
}

/// Since when marks are failing or late, and when that was last logged.
#[derive(Default)]
struct Trouble(Option<(Instant, Instant)>);

impl Trouble {
    /// A mark failed or is late: the clock goes on without one, and that is
    /// counted and (not too often) logged.
    fn report<C: Clock>(&mut self, clock: &ForwardOnly<C>, path: &Path, error: &str) {
        clock.cap_at(Nanos::MAX);
        metrics::counter!("warden_durable_write_failures_total", "what" => "clock_mark")
            .increment(1);
        let now = Instant::now();
        let log = match self.0 {
            None => {
                self.0 = Some((now, now));
                true
            }
            Some((since, logged)) if now - logged >= REPEAT_FAILURE_LOG => {
                self.0 = Some((since, now));
                true
            }
            Some(_) => false,
        };
        if log {
            tracing::error!(
                event = "clock_mark_write_failed",
                path = %path.display(),
                error,
                "cannot write the clock mark: warden serves on, but a restart after a crash is protected only up to the last mark written"
            );
        }
    }

    fn over(&mut self) {
        if let Some((since, _)) = self.0.take() {
            tracing::info!(
                event = "clock_mark_written",
                failed_for_ms = since.elapsed().as_millis() as u64,
                "the clock mark is written again"
            );
        }
    }
}

/// One turn of the keeper: a new mark on disk, and only then may the clock
/// show up to it. A write that fails leaves the cap as it was. So does one
/// that took so long that the clock, let go meanwhile, has run past it:
/// capped there, it would stand still until the next mark.
fn renew<C: Clock>(file: &mut MarkFile, clock: &ForwardOnly<C>) -> io::Result<()> {
    let until = clock.uncapped() + Nanos::from(LOOKAHEAD);
    file.write(until)?;
    if until > clock.uncapped() {
        clock.cap_at(until);
    }
    Ok(())
}

/// Says at start how far the system clock is behind the previous
/// process's mark, when that is more than a crash explains.
fn report_previous(path: &Path, behind: Nanos) {
    let explained = Nanos::from(LOOKAHEAD + Duration::from_secs(1));
    if behind > explained {
        tracing::warn!(
            event = "clock_behind_mark",
            behind_ms = behind.ceil_millis(),
            path = %path.display(),
            "the system clock is behind the latest time the previous warden process may have shown: warden's clock holds there, and serves once the system clock has passed it (README: Lifecycle). If that process's clock was wrong (set ahead) and this one is right, stop warden and remove the mark"
        );
    } else if behind > Nanos::ZERO {
        tracing::info!(
            event = "clock_held_at_mark",
            behind_ms = behind.ceil_millis(),
            "the previous process stopped without writing its final clock mark; warden's clock holds at its last one"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::FakeClock;
    use std::sync::Arc;

    const S: u64 = 1_000_000_000;

    fn leaked(source: Arc<FakeClock>) -> &'static ForwardOnly<Arc<FakeClock>> {
        Box::leak(Box::new(ForwardOnly::new(source)))
    }

    fn mark_in(dir: &Path) -> Previous {
        previous(&std::fs::read(dir.join(FILE_NAME)).unwrap())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_process_never_shows_a_time_its_mark_does_not_cover() {
        let dir = tempfile::tempdir().unwrap();
        let source = Arc::new(FakeClock::new(Nanos::new(1_000 * S)));
        let clock = leaked(source.clone());
        let _keeper = Keeper::arm(dir.path(), clock).unwrap();
        let written = |dir: &Path| match mark_in(dir) {
            Previous::Mark { until, .. } => until,
            other => panic!("no mark: {other:?}"),
        };
        assert_eq!(
            written(dir.path()),
            Nanos::new(1_000 * S) + Nanos::from(LOOKAHEAD)
        );
        // The system clock leaps ahead of what is written: the clock shows
        // nothing past the mark on disk, until a new one is written. (The
        // mark is written first and the clock let go after, so a turn can
        // find the new mark on disk and the clock still held: read the
        // clock first, then the disk.)
        source.set(Nanos::new(2_000 * S));
        for _ in 0..100 {
            let shown = clock.now();
            let on_disk = written(dir.path());
            assert!(shown <= on_disk, "{shown:?} shown, {on_disk:?} written");
            if shown == Nanos::new(2_000 * S) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the clock never moved on to the system clock");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_next_process_holds_its_clock_at_the_mark_whatever_the_system_clock_says() {
        let (dir, crashed) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let source = Arc::new(FakeClock::new(Nanos::new(1_000 * S)));
        let first = leaked(source.clone());
        let keeper = Keeper::arm(dir.path(), first).unwrap();
        source.set(Nanos::new(1_001 * S));
        let shown = first.now();
        // A crash leaves the mark as last written (a clean stop would write
        // its final one over it).
        std::fs::copy(dir.path().join(FILE_NAME), crashed.path().join(FILE_NAME)).unwrap();
        drop(keeper);
        // The next process starts on a clock set back a minute.
        source.set(Nanos::new(950 * S));
        let next = leaked(source.clone());
        let _keeper = Keeper::arm(crashed.path(), next).unwrap();
        assert!(next.now() >= shown, "{:?} < {shown:?}", next.now());
        assert!(next.held_back() > Nanos::new(50 * S));
        // Served on once the system clock has passed the mark (and the next
        // mark is written).
        source.set(Nanos::new(1_100 * S));
        for _ in 0..40 {
            if next.now() == Nanos::new(1_100 * S) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("held at {:?}", next.now());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_clean_stop_writes_the_time_it_stopped_at() {
        let dir = tempfile::tempdir().unwrap();
        let source = Arc::new(FakeClock::new(Nanos::new(1_000 * S)));
        let clock = leaked(source.clone());
        let keeper = Keeper::arm(dir.path(), clock).unwrap();
        source.set(Nanos::new(1_000 * S + S / 2));
        let shown = clock.now();
        drop(keeper);
        let Previous::Mark { until, .. } = mark_in(dir.path()) else {
            panic!("no mark written");
        };
        assert!(until >= shown && until < shown + Nanos::from(LOOKAHEAD));
        // Stopped: nothing later is shown.
        source.set(Nanos::new(1_100 * S));
        assert!(clock.now() <= until);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_mark_that_cannot_be_written_never_stops_the_clock() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        std::fs::write(&path, [0; 2 * RECORD]).unwrap();
        let source = Arc::new(FakeClock::new(Nanos::new(1_000 * S)));
        let clock = leaked(source.clone());
        clock.cap_at(Nanos::new(1_002 * S));
        // Opened for reading only: every write fails, as on a failed disk.
        let failing = MarkFile {
            file: File::open(&path).unwrap(),
            path: path.clone(),
            seq: 0,
        };
        source.set(Nanos::new(1_010 * S));
        let mut file = failing;
        assert!(renew(&mut file, clock).is_err());
        // One failed turn holds the cap...
        assert_eq!(clock.now(), Nanos::new(1_002 * S));
        // ...but the keeper lets the clock go on without a mark rather
        // than stop every check.
        let keeper = tokio::spawn(keep(Arc::new(Mutex::new(file)), path, clock));
        until(|| clock.now() == Nanos::new(1_010 * S)).await;
        keeper.abort();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_write_that_hangs_never_stops_the_clock_and_the_next_mark_caps_it_again() {
        let dir = tempfile::tempdir().unwrap();
        let source = Arc::new(FakeClock::new(Nanos::new(1_000 * S)));
        let clock = leaked(source.clone());
        let keeper = Keeper::arm(dir.path(), clock).unwrap();
        // The disk hangs: the next write waits (here, for the file, held
        // by a thread until told to let go).
        let (held, release) = (std::sync::mpsc::channel(), std::sync::mpsc::channel::<()>());
        let file = keeper.file.clone();
        let hang = std::thread::spawn(move || {
            let _file = file.lock();
            held.0.send(()).unwrap();
            let _ = release.1.recv();
        });
        held.1.recv().unwrap();
        source.set(Nanos::new(1_010 * S));
        assert!(clock.now() < Nanos::new(1_010 * S));
        until(|| clock.now() == Nanos::new(1_010 * S)).await;
        // Written again: capped at a mark on disk again.
        release.0.send(()).unwrap();
        hang.join().unwrap();
        until(|| clock.ceiling() != Nanos::MAX).await;
        match mark_in(dir.path()) {
            Previous::Mark { until, .. } => assert!(clock.ceiling() <= until),
            other => panic!("{other:?}"),
        }
    }

    /// Waits (up to 5 s) until `done`.
    async fn until(done: impl Fn() -> bool) {
        for _ in 0..100 {
            if done() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("not within 5 s");
    }

    #[test]
    fn a_torn_write_leaves_the_record_before_it() {
        let first = record(7, Nanos::new(10 * S));
        let mut torn = record(8, Nanos::new(12 * S));
        torn[20..].fill(0);
        let mut bytes = torn.to_vec();
        bytes.extend_from_slice(&first);
        assert_eq!(
            previous(&bytes),
            Previous::Mark {
                seq: 7,
                until: Nanos::new(10 * S)
            }
        );
        // Both whole: the later record wins, wherever it is.
        let mut bytes = record(9, Nanos::new(14 * S)).to_vec();
        bytes.extend_from_slice(&first);
        assert_eq!(
            previous(&bytes),
            Previous::Mark {
                seq: 9,
                until: Nanos::new(14 * S)
            }
        );
        assert_eq!(previous(&[0; 2 * RECORD]), Previous::Nothing);
        assert_eq!(previous(&[]), Previous::Nothing);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_mark_with_no_whole_record_is_refused_not_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let mut bytes = record(3, Nanos::new(10 * S)).to_vec();
        bytes[17] ^= 1;
        bytes.extend_from_slice(b"not a mark at all, not a mark at");
        std::fs::write(dir.path().join(FILE_NAME), &bytes).unwrap();
        let clock = leaked(Arc::new(FakeClock::new(Nanos::new(1_000 * S))));
        let err = Keeper::arm(dir.path(), clock).err().expect("refused");
        assert!(matches!(err, MarkError::Corrupt { .. }), "{err}");
        assert!(err.to_string().contains("remove it only if"), "{err}");
    }
}
