//! The fence record: how far ahead of its clock a process accepted
//! timestamps, on disk, so that the next process's restart fence covers it
//! even when `future_skew` was lowered in between.
//!
//! Why: the restart fence ([`crate::freshness`]) must refuse every
//! timestamp the previous process could have accepted, up to its last
//! moment plus *its* future skew. Counted with the new process's skew, a
//! lower one (an operator tightening the check, then a restart or a crash)
//! let requests the old process accepted from a clock running ahead be
//! accepted again once the new clock came within the new skew of them.
//!
//! So each process records, synced and before it serves, its future skew
//! and its own fence. The next one fences behind that skew, counted from
//! the previous process's clock mark (the latest time it may have shown),
//! and never below the recorded fence: that one already covers every
//! process before, however their skews went.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::engine::Nanos;
use crate::freshness::{Fence, Predecessor};

/// The record's file, in the store's directory.
pub const FILE_NAME: &str = "fence.json";

#[derive(Debug, thiserror::Error)]
pub enum FenceRecordError {
    #[error("fence record {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error(
        "fence record {path}: not a record warden wrote ({why}). It holds how far ahead of its clock the previous warden process accepted requests; remove it only if that process stopped longer ago than its check.future_skew"
    )]
    Unreadable { path: PathBuf, why: String },
}

/// The file's contents.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Record {
    /// The process's `check.future_skew`, in seconds.
    future_skew_secs: u64,
    /// The first second its restart fence let through (Unix seconds).
    fence: i64,
}

/// What the previous process recorded in `dir`, if it did (`None`: a
/// first start, or a version before the record), with `last_shown`, the
/// clock mark it left.
pub fn read(
    dir: &Path,
    last_shown: Option<Nanos>,
) -> Result<Option<Predecessor>, FenceRecordError> {
    let path = dir.join(FILE_NAME);
    let bytes = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(FenceRecordError::Io { path, source }),
    };
    let record: Record =
        serde_json::from_slice(&bytes).map_err(|e| FenceRecordError::Unreadable {
            path: path.clone(),
            why: e.to_string(),
        })?;
    Ok(Some(Predecessor {
        future_skew: Duration::from_secs(record.future_skew_secs),
        fence: Fence::at(record.fence),
        last_shown,
    }))
}

/// Records this process's future skew and fence in `dir`, replacing the
/// previous record whole (written aside, synced, renamed): a crash leaves
/// one record or the other.
pub fn write(dir: &Path, future_skew: Duration, fence: Fence) -> Result<(), FenceRecordError> {
    let path = dir.join(FILE_NAME);
    let record = Record {
        future_skew_secs: future_skew.as_secs(),
        fence: fence.first_second(),
    };
    let mut text = serde_json::to_vec(&record).expect("a record serializes");
    text.push(b'\n');
    crate::private_file::replace(&path, &text)
        .map_err(|source| FenceRecordError::Io { path, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_written_is_read_back() {
        let dir = tempfile::tempdir().unwrap();
        assert!(read(dir.path(), None).unwrap().is_none());
        write(dir.path(), Duration::from_secs(20), Fence::at(1_000_021)).unwrap();
        let previous = read(dir.path(), None).unwrap().unwrap();
        assert_eq!(previous.future_skew, Duration::from_secs(20));
        assert_eq!(previous.fence, Fence::at(1_000_021));
    }

    #[test]
    fn a_record_warden_did_not_write_refuses_the_start_and_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        for text in [
            "",
            "{",
            "{\"future_skew_secs\":5}",
            "{\"future_skew_secs\":-1,\"fence\":3}",
        ] {
            std::fs::write(dir.path().join(FILE_NAME), text).unwrap();
            let e = read(dir.path(), None).unwrap_err().to_string();
            assert!(
                e.contains(FILE_NAME) && e.contains("remove it only if"),
                "{e}"
            );
        }
    }
}
