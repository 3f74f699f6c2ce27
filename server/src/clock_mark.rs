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
//! mark on disk: a thread writes `now + LOOKAHEAD`, synced, twice a
//! second, and only then lets the clock show up to it. The next process
//! holds its clock at the mark until the system clock passes it, and its
//! restart fence counts from there. The costs:
//!
//! - after a crash, a restart is ready up to [`LOOKAHEAD`] later than the
//!   fence alone would make it (a clean stop writes the exact time instead);
//! - while no mark can be written (a disk that stalls or fails), warden's
//!   time stands still once it reaches the last one: limits do not refill
//!   and, past the future skew, fresh requests are STALE. For a service
//!   that promises no replay, refusing is the safe side; it is logged and
//!   counted (`warden_durable_write_failures_total{what="clock_mark"}`).
//!
//! The file holds two records, written in turn, each with its own check
//! sum: a write torn by a crash leaves the other one whole.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::engine::clock::{Clock, ForwardOnly, Nanos};

/// The mark's file, in the store's directory.
pub const FILE_NAME: &str = "clock.mark";

/// How far ahead of the time shown each mark is written: how long a write
/// may take before time stands still, and how much later than its fence
/// alone a process restarted after a crash is ready.
pub const LOOKAHEAD: Duration = Duration::from_secs(2);

/// How often a new mark is written.
const EVERY: Duration = Duration::from_millis(500);

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
    fn open(dir: &Path) -> Result<(Self, Option<Nanos>), MarkError> {
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
        let (seq, until) = match previous(&bytes[..len]) {
            Previous::Nothing => (0, None),
            Previous::Mark { seq, until } => (seq, Some(until)),
            Previous::Corrupt => return Err(MarkError::Corrupt { path }),
        };
        Ok((Self { file, path, seq }, until))
    }

    /// Writes `until` durably, over the older of the two records.
    fn write(&mut self, until: Nanos) -> io::Result<()> {
        let seq = self.seq + 1;
        let offset = (seq % 2) * RECORD as u64;
        self.file.write_all_at(&record(seq, until), offset)?;
        self.file.sync_data()?;
        self.seq = seq;
        Ok(())
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
/// dropped. Dropping it stops the clock where it is and writes that time,
/// so a clean stop costs the next process no wait beyond its fence.
pub struct Keeper {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Keeper {
    /// Reads the previous process's mark in `dir` and holds `clock` from it,
    /// writes this process's first mark and caps `clock` there, then keeps
    /// writing marks on a thread of its own (a stalled disk stalls no
    /// request; time only stands still at the last mark). One per process.
    pub fn arm<C: Clock>(dir: &Path, clock: &'static ForwardOnly<C>) -> Result<Self, MarkError> {
        let (mut file, previous) = MarkFile::open(dir)?;
        if let Some(previous) = previous {
            clock.hold_from(previous);
            report_previous(&file.path, clock.held_back());
        }
        renew(&mut file, clock).map_err(|source| MarkError::Io {
            path: file.path.clone(),
            source,
        })?;
        let (stop, stopped) = mpsc::channel();
        let path = file.path.clone();
        let thread = std::thread::Builder::new()
            .name("warden-clock-mark".into())
            .spawn(move || keep(file, clock, stopped))
            .map_err(|source| MarkError::Io { path, source })?;
        Ok(Self {
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for Keeper {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The keeper's thread: a new mark every [`EVERY`] until told to stop, then
/// the exact time.
fn keep<C: Clock>(mut file: MarkFile, clock: &'static ForwardOnly<C>, stop: mpsc::Receiver<()>) {
    let mut failing: Option<(Instant, Instant)> = None;
    while let Err(RecvTimeoutError::Timeout) = stop.recv_timeout(EVERY) {
        match renew(&mut file, clock) {
            Ok(()) => {
                if let Some((since, _)) = failing.take() {
                    tracing::info!(
                        event = "clock_mark_written",
                        failed_for_ms = since.elapsed().as_millis() as u64,
                        "the clock mark is written again; warden's time moves on"
                    );
                }
            }
            Err(e) => {
                metrics::counter!("warden_durable_write_failures_total", "what" => "clock_mark")
                    .increment(1);
                let now = Instant::now();
                let log = match failing {
                    None => {
                        failing = Some((now, now));
                        true
                    }
                    Some((since, logged)) if now - logged >= REPEAT_FAILURE_LOG => {
                        failing = Some((since, now));
                        true
                    }
                    Some(_) => false,
                };
                if log {
                    tracing::error!(
                        event = "clock_mark_write_failed",
                        path = %file.path.display(),
                        error = %e,
                        stood_still_ms = clock.past_ceiling().ceil_millis(),
                        "cannot write the clock mark: warden's time stands still at the last mark until it can (limits do not refill; fresh requests become STALE past the future skew)"
                    );
                }
            }
        }
    }
    // Stopping: nothing may be shown past the time written last.
    let last = clock.uncapped().min(clock.ceiling());
    clock.cap_at(last);
    if let Err(e) = file.write(last) {
        // The mark before it stands, and is later: safe, only a longer
        // wait for the next process.
        tracing::warn!(
            event = "clock_mark_write_failed",
            path = %file.path.display(),
            error = %e,
            "cannot write the final clock mark; the next start waits for the one before it"
        );
    }
}

/// One turn of the keeper: a new mark on disk, and only then may the clock
/// show up to it. A write that fails leaves the clock where it was capped.
fn renew<C: Clock>(file: &mut MarkFile, clock: &ForwardOnly<C>) -> io::Result<()> {
    let until = clock.uncapped() + Nanos::from(LOOKAHEAD);
    file.write(until)?;
    clock.cap_at(until);
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

    #[test]
    fn a_process_never_shows_a_time_its_mark_does_not_cover() {
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
        // nothing past the mark on disk, until a new one is written.
        source.set(Nanos::new(2_000 * S));
        for _ in 0..100 {
            let shown = clock.now();
            let on_disk = written(dir.path());
            assert!(shown <= on_disk, "{shown:?} shown, {on_disk:?} written");
            if on_disk > Nanos::new(2_000 * S) {
                assert_eq!(clock.now(), Nanos::new(2_000 * S));
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("the mark never moved on");
    }

    #[test]
    fn the_next_process_holds_its_clock_at_the_mark_whatever_the_system_clock_says() {
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
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("held at {:?}", next.now());
    }

    #[test]
    fn a_clean_stop_writes_the_time_it_stopped_at() {
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

    #[test]
    fn a_mark_that_cannot_be_written_stops_time_at_the_last_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        std::fs::write(&path, [0; 2 * RECORD]).unwrap();
        let source = Arc::new(FakeClock::new(Nanos::new(1_000 * S)));
        let clock = ForwardOnly::new(source.clone());
        clock.cap_at(Nanos::new(1_002 * S));
        // Opened for reading only: every write fails, as on a failed disk.
        let mut failing = MarkFile {
            file: File::open(&path).unwrap(),
            path: path.clone(),
            seq: 0,
        };
        source.set(Nanos::new(1_010 * S));
        assert!(renew(&mut failing, &clock).is_err());
        assert_eq!(clock.now(), Nanos::new(1_002 * S));
        assert_eq!(clock.past_ceiling(), Nanos::new(8 * S));
        // Once a mark is written again, time moves on.
        let (mut working, previous) = MarkFile::open(dir.path()).unwrap();
        assert_eq!(previous, None);
        renew(&mut working, &clock).unwrap();
        assert_eq!(clock.now(), Nanos::new(1_010 * S));
        assert_eq!(
            mark_in(dir.path()),
            Previous::Mark {
                seq: 1,
                until: Nanos::new(1_010 * S) + Nanos::from(LOOKAHEAD)
            }
        );
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

    #[test]
    fn a_mark_with_no_whole_record_is_refused_not_ignored() {
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
