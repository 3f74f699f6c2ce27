//! Reading the log a page at a time, through the admin API: from either
//! end, with a filter, each page bounded in what it reads.

use std::fs::File;
use std::path::PathBuf;

use super::files::{chain_files, read_backward, read_forward, rotated_first_seq};
use super::{AuditLog, Record};

/// Lines a page of [`AuditLog::page`] reads at most, returned or passed
/// over by its filter: a page of a rare key's records in a large log
/// comes back short, with where to go on, rather than holding the reader
/// for the whole log.
pub const PAGE_SCAN_LINES: usize = 100_000;

/// Which end of the log a page starts from and moves away from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    Oldest,
    Newest,
}

/// Where a page of the log begins: a byte offset in the file whose first
/// record has sequence number `file` (for a page of the newest records,
/// where the next line back ends). Rotated files never change and the
/// active one only grows, and keeps its first sequence number when it is
/// rotated, so a position stays good while the log grows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Position {
    pub file: u64,
    pub offset: u64,
}

/// As a page token says it: `file:offset`.
impl std::fmt::Display for Position {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.file, self.offset)
    }
}

impl std::str::FromStr for Position {
    type Err = ();

    fn from_str(text: &str) -> Result<Self, ()> {
        let (file, offset) = text.split_once(':').ok_or(())?;
        Ok(Self {
            file: file.parse().map_err(drop)?,
            offset: offset.parse().map_err(drop)?,
        })
    }
}

/// Why a page could not be read.
#[derive(Debug, thiserror::Error)]
pub enum PageError {
    #[error("the audit file this position points into is gone (archived?)")]
    Gone,
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Of a line that is not a record, at most this much is shown: whatever
/// was written into the file, a page must still fit in an answer.
const UNREADABLE_SHOWN: usize = 1024;

/// A line of the log as a record, or as what it is when it is not one.
fn parse_line(line: &[u8]) -> Record {
    serde_json::from_slice::<Record>(line).unwrap_or_else(|_| {
        let mut detail =
            String::from_utf8_lossy(&line[..line.len().min(UNREADABLE_SHOWN)]).into_owned();
        if line.len() > UNREADABLE_SHOWN {
            detail.push_str(&format!("… ({} bytes in all)", line.len()));
        }
        Record {
            seq: 0,
            time_ms: 0,
            actor: String::new(),
            action: "unreadable".into(),
            key_id: String::new(),
            detail,
            prev_hash: String::new(),
            hash: String::new(),
        }
    })
}

impl AuditLog {
    /// One page of records that pass `filter`, read from `from` (or from
    /// the oldest record, or the newest, by `direction`), and where the
    /// next page begins when there may be more. A page reads only what it
    /// returns and what it passes over, and at most [`PAGE_SCAN_LINES`]
    /// lines: then it returns what it found and where to go on, however
    /// large the log. Writers are held up only while the active file is
    /// looked up. Lines that are not records come back as
    /// `action = "unreadable"` with the line (its first KiB) as `detail`,
    /// so that reading through the API shows what is on disk.
    pub fn page(
        &self,
        from: Option<Position>,
        direction: Direction,
        size: usize,
        filter: impl Fn(&Record) -> bool,
    ) -> Result<(Vec<Record>, Option<Position>), PageError> {
        self.page_scanning(from, direction, size, PAGE_SCAN_LINES, filter)
    }

    fn page_scanning(
        &self,
        from: Option<Position>,
        direction: Direction,
        size: usize,
        max_scan: usize,
        filter: impl Fn(&Record) -> bool,
    ) -> Result<(Vec<Record>, Option<Position>), PageError> {
        // (first seq, path, the file once open, bytes to read): rotated
        // files, opened when read, then the active one, up to its length
        // under the lock (whole records, never a write under way). Listed
        // under the lock: a rotation meanwhile would leave its file out.
        let mut files: Vec<(u64, PathBuf, Option<File>, u64)> = Vec::new();
        {
            let head = self.head.lock();
            for path in chain_files(&self.dir)? {
                if let Some(first) = rotated_first_seq(&path) {
                    let len = std::fs::metadata(&path)?.len();
                    files.push((first, path, None, len));
                }
            }
            let active = File::open(&self.path)?;
            let len = active.metadata()?.len();
            files.push((head.first_seq, self.path.clone(), Some(active), len));
        }
        let mut index = match from {
            Some(p) => files
                .iter()
                .position(|(first, ..)| *first == p.file)
                .ok_or(PageError::Gone)?,
            None if direction == Direction::Oldest => 0,
            None => files.len() - 1,
        };
        let mut offset = match from {
            Some(p) => p.offset,
            None if direction == Direction::Oldest => 0,
            None => files[index].3,
        };
        let mut records = Vec::new();
        let mut scanned = 0;
        loop {
            let (first, path, file, len) = &mut files[index];
            let file = match file {
                Some(file) => file,
                None => file.insert(File::open(&*path).map_err(|e| match e.kind() {
                    std::io::ErrorKind::NotFound => PageError::Gone,
                    _ => PageError::Io(e),
                })?),
            };
            let mut next = None;
            // Each line, with where it begins and ends: taken, or the page
            // ends before it, where the next page begins.
            let take = |start: u64, end: u64, line: &[u8]| {
                if records.len() == size || scanned == max_scan {
                    next = Some(match direction {
                        Direction::Oldest => start,
                        Direction::Newest => end,
                    });
                    return false;
                }
                scanned += 1;
                let record = parse_line(line);
                if filter(&record) {
                    records.push(record);
                }
                true
            };
            match direction {
                Direction::Oldest => read_forward(file, offset.min(*len), *len, take)?,
                Direction::Newest => read_backward(file, offset.min(*len), take)?,
            }
            if let Some(offset) = next {
                let first = *first;
                return Ok((
                    records,
                    Some(Position {
                        file: first,
                        offset,
                    }),
                ));
            }
            match direction {
                Direction::Oldest if index + 1 < files.len() => {
                    index += 1;
                    offset = 0;
                }
                Direction::Newest if index > 0 => {
                    index -= 1;
                    offset = files[index].3;
                }
                _ => return Ok((records, None)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::tests::{event, master, open, rotating};
    use crate::audit::{ACTIVE, chain_files};

    #[test]
    fn a_position_reads_back_from_its_token_text_and_nothing_else_does() {
        let p = Position {
            file: 41,
            offset: 12_345,
        };
        assert_eq!(p.to_string().parse::<Position>(), Ok(p));
        for junk in ["", "41", "41:", ":5", "41:x", "-1:5", "41:5:6", "17"] {
            assert_eq!(junk.parse::<Position>(), Err(()), "{junk:?}");
        }
    }

    /// Every page of a log, following the tokens, as sequence numbers.
    fn pages(
        log: &AuditLog,
        direction: Direction,
        size: usize,
        max_scan: usize,
        filter: impl Fn(&Record) -> bool + Copy,
    ) -> (Vec<Vec<u64>>, usize) {
        let (mut pages, mut from, mut empty) = (Vec::new(), None, 0);
        loop {
            let (records, next) = log
                .page_scanning(from, direction, size, max_scan, filter)
                .unwrap();
            assert!(records.len() <= size);
            if records.is_empty() {
                empty += 1;
            }
            pages.push(records.iter().map(|r| r.seq).collect());
            match next {
                Some(p) => from = Some(p),
                None => return (pages, empty),
            }
        }
    }

    /// Pages read every record exactly once, in order, oldest or newest
    /// first, across rotated files and the active one, with a filter, and
    /// with a cap on the lines one page reads (pages of a rare key come
    /// back short or empty, each with where to go on).
    #[test]
    fn pages_read_every_record_once_in_order_either_way_across_files() {
        let dir = tempfile::tempdir().unwrap();
        let m = master();
        let log = rotating(dir.path(), &m, 3000, 100);
        assert!(chain_files(dir.path()).unwrap().len() > 5);
        let all: Vec<u64> = (1..=100).collect();
        let every_7th =
            |r: &Record| r.key_id.trim_start_matches('k').parse::<u64>().unwrap() % 7 == 0;
        let sevenths: Vec<u64> = all.iter().copied().filter(|s| (s - 1) % 7 == 0).collect();
        for (size, max_scan) in [(1, 1000), (7, 1000), (1000, 1000), (3, 5)] {
            let (oldest, _) = pages(&log, Direction::Oldest, size, max_scan, |_| true);
            assert_eq!(oldest.concat(), all, "{size} {max_scan}");
            let (newest, _) = pages(&log, Direction::Newest, size, max_scan, |_| true);
            let mut newest = newest.concat();
            newest.reverse();
            assert_eq!(newest, all, "{size} {max_scan}");
            let (filtered, empty) = pages(&log, Direction::Oldest, size, max_scan, every_7th);
            assert_eq!(filtered.concat(), sevenths, "{size} {max_scan}");
            if max_scan == 5 {
                assert!(empty > 0, "pages that found nothing in their 5 lines");
                assert!(filtered.len() >= 100 / 5);
            }
            let (filtered, _) = pages(&log, Direction::Newest, size, max_scan, every_7th);
            let mut filtered = filtered.concat();
            filtered.reverse();
            assert_eq!(filtered, sevenths, "{size} {max_scan}");
        }
    }

    /// A line that is not a record comes back as "unreadable", shown up
    /// to 1 KiB however long it is: a page still fits in an answer.
    #[test]
    fn an_unreadable_line_is_shown_cut_to_a_kilobyte() {
        let dir = tempfile::tempdir().unwrap();
        let m = master();
        let log = open(dir.path(), &m);
        log.append_durable(&[event(1)]).unwrap();
        drop(log);
        let path = dir.path().join(ACTIVE);
        let mut text = std::fs::read(&path).unwrap();
        text.extend_from_slice(&[b'x'; 5000]);
        text.push(b'\n');
        std::fs::write(&path, text).unwrap();
        // Opened after the garbage went in, the log reads up to its end.
        let log = open(dir.path(), &m);
        let (records, _) = log.page(None, Direction::Oldest, 10, |_| true).unwrap();
        assert_eq!(records.len(), 2);
        assert_eq!(records[1].action, "unreadable");
        assert!(records[1].detail.starts_with(&"x".repeat(1024)));
        assert!(
            records[1].detail.ends_with("… (5000 bytes in all)"),
            "{}",
            &records[1].detail[1000..]
        );
    }

    /// A position in the active file stays good when that file is rotated
    /// meanwhile; one into a file that is gone says so.
    #[test]
    fn a_position_survives_rotation_and_a_removed_file_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let m = master();
        let log = rotating(dir.path(), &m, 3000, 2);
        let (first, next) = log.page(None, Direction::Oldest, 1, |_| true).unwrap();
        assert_eq!(first[0].seq, 1);
        for i in 2..40 {
            log.append_durable(&[event(i)]).unwrap();
        }
        assert!(chain_files(dir.path()).unwrap().len() > 3);
        let (rest, _) = log.page(next, Direction::Oldest, 1000, |_| true).unwrap();
        let seqs: Vec<u64> = rest.iter().map(|r| r.seq).collect();
        assert_eq!(seqs, (2..=40).collect::<Vec<u64>>());

        let (_, next) = log.page(None, Direction::Oldest, 1, |_| true).unwrap();
        std::fs::remove_file(&chain_files(dir.path()).unwrap()[0]).unwrap();
        assert!(matches!(
            log.page(next, Direction::Oldest, 1, |_| true),
            Err(PageError::Gone)
        ));
    }
}
