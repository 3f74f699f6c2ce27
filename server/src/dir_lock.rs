//! One warden process per store directory.
//!
//! Why: two processes given one `[store] dir` (a second unit or container
//! on the same volume, a manual start beside the service, a master-key
//! rotation run while warden serves) would each keep their own copy of the
//! keys, so a key revoked through one goes on working in the other, and
//! their own nonces, so a request accepted by one is accepted by the
//! other. They would also write one journal, one audit chain and one clock
//! mark over each other, and a process starting cuts what looks like a torn
//! record off the end of the journal: the record the other is writing.
//!
//! So a process holds an exclusive lock on `lock` in the directory for as
//! long as it uses it. The kernel lets it go when the process ends, however
//! it ends: a `kill -9` leaves nothing stale behind.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// The lock's file, in the store's directory.
pub const FILE_NAME: &str = "lock";

/// This process's hold on a store directory, until dropped.
#[derive(Debug)]
pub struct DirLock {
    _file: File,
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(
        "store directory {dir} is in use by another warden process{holder}: one process per directory; stop that one first, or give this one a [store] dir of its own"
    )]
    InUse { dir: PathBuf, holder: String },
    #[error("store directory {dir}: cannot lock {FILE_NAME}: {source}")]
    Io {
        dir: PathBuf,
        source: std::io::Error,
    },
}

impl DirLock {
    /// Takes `dir` for this process, or says which process has it.
    pub fn take(dir: &Path) -> Result<Self, LockError> {
        let failed = |source| LockError::Io {
            dir: dir.to_owned(),
            source,
        };
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(dir.join(FILE_NAME))
            .map_err(failed)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                // Written by the holder when it took the lock: only for the
                // message, so an unreadable one is no error.
                let mut pid = String::new();
                let _ = file.read_to_string(&mut pid);
                let pid = pid.trim();
                let holder = if !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()) {
                    format!(" (pid {pid})")
                } else {
                    String::new()
                };
                return Err(LockError::InUse {
                    dir: dir.to_owned(),
                    holder,
                });
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(failed(e)),
        }
        file.set_len(0)
            .and_then(|()| file.seek(SeekFrom::Start(0)))
            .and_then(|_| writeln!(file, "{}", std::process::id()))
            .map_err(failed)?;
        Ok(Self { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_held_by_one_holder_is_refused_to_another_until_it_lets_go() {
        let dir = tempfile::tempdir().unwrap();
        let first = DirLock::take(dir.path()).unwrap();
        // Another open file is another holder, as another process would be.
        let err = DirLock::take(dir.path()).unwrap_err();
        assert!(matches!(err, LockError::InUse { .. }), "{err}");
        let pid = std::process::id().to_string();
        assert!(err.to_string().contains(&format!("(pid {pid})")), "{err}");
        drop(first);
        DirLock::take(dir.path()).unwrap();
    }
}
