//! Files only their owner may read: secrets, keys, the key store and the
//! audit log. Two ways to write them, so every such file is made the same
//! way: appended to, or replaced whole and atomically.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// A file written by appending whole records, each fsynced before it
/// counts. Why: a write that fails partway (a full disk) leaves part of a
/// record, and a later record after it would be damage in the middle of
/// the file (the key store's journal refuses to open; the audit chain
/// reads as broken). So a failed write is cut back to the last whole
/// record, and if even that fails, the next write cuts first or fails.
#[derive(Debug)]
pub struct Appended {
    file: File,
    /// Bytes of whole records.
    len: u64,
    /// A failed write left part of a record past `len`, and cutting it off
    /// failed too.
    partial: bool,
}

impl Appended {
    /// `file`, holding `len` bytes of whole records, open for writing at
    /// its end.
    pub fn new(file: File, len: u64) -> Self {
        Self {
            file,
            len,
            partial: false,
        }
    }

    /// Writes and fsyncs `bytes`, whole or not at all.
    pub fn append(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        if self.partial {
            self.cut_back()?;
            self.partial = false;
        }
        let written = self
            .file
            .write_all(bytes)
            .and_then(|()| self.file.sync_data());
        if let Err(e) = written {
            self.partial = self.cut_back().is_err();
            return Err(e);
        }
        self.len += bytes.len() as u64;
        Ok(())
    }

    /// Bytes of whole records written to (or found in) the file.
    pub fn whole_bytes(&self) -> u64 {
        self.len
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    fn cut_back(&mut self) -> std::io::Result<()> {
        self.file.set_len(self.len)?;
        // A file not opened for appending goes on writing where it was.
        self.file.seek(SeekFrom::Start(self.len)).map(drop)
    }
}

/// Opens `path` for appending, created with mode 0600 (and made 0600 if an
/// older file was not).
pub fn open_append(path: &Path) -> std::io::Result<File> {
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)?;
    file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    Ok(file)
}

/// Replaces `path` with `bytes` atomically: written and fsynced to a
/// temporary file beside it (mode 0600), renamed over it, and the directory
/// fsynced, so a reader never sees half a file and a crash leaves the old
/// one or the new one.
pub fn replace(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    replace_and_keep(path, bytes).map(drop)
}

/// [`replace`], returning the new file open for writing at its end: a
/// writer that goes on appending to it never holds the replaced file (as
/// reopening by name after the rename could fail and leave it doing).
pub fn replace_and_keep(path: &Path, bytes: &[u8]) -> std::io::Result<File> {
    replace_with(path, |out| out.write_all(bytes)).map(|(file, ())| file)
}

/// [`replace_and_keep`], with the new file's bytes written by `write` as
/// it makes them. Why: a file as large as the rate-limit state, made in
/// memory first, needed that memory again beside the state.
pub fn replace_with<T>(
    path: &Path,
    write: impl FnOnce(&mut BufWriter<&File>) -> std::io::Result<T>,
) -> std::io::Result<(File, T)> {
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(".tmp");
    let tmp = Path::new(&tmp_name);
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(tmp)?;
    let written = (|| {
        let mut out = BufWriter::with_capacity(1 << 16, &file);
        let made = write(&mut out)?;
        out.flush()?;
        drop(out);
        file.sync_all()?;
        std::fs::rename(tmp, path)?;
        Ok(made)
    })();
    match written {
        Ok(made) => {
            File::open(parent_dir(path))?.sync_all()?;
            Ok((file, made))
        }
        Err(e) => {
            // On a full disk, what was written of it would only take more room.
            let _ = std::fs::remove_file(tmp);
            Err(e)
        }
    }
}

/// Removes `path` and fsyncs its directory, so that the removal outlasts
/// a crash right after it.
pub fn remove(path: &Path) -> std::io::Result<()> {
    std::fs::remove_file(path)?;
    File::open(parent_dir(path))?.sync_all()
}

fn parent_dir(path: &Path) -> &Path {
    path.parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaced_and_appended_files_are_the_owners_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        replace(&path, b"one").unwrap();
        replace(&path, b"two").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        let log = dir.path().join("log");
        std::fs::write(&log, b"old\n").unwrap();
        open_append(&log).unwrap().write_all(b"new\n").unwrap();
        assert_eq!(std::fs::read(&log).unwrap(), b"old\nnew\n");
        for p in [&path, &log] {
            let mode = std::fs::metadata(p).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{p:?}");
        }
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            2,
            "no temporary left"
        );
    }

    #[test]
    fn a_failed_replacement_leaves_no_temporary_behind() {
        let dir = tempfile::tempdir().unwrap();
        // A directory in the way: the rename over it fails.
        let path = dir.path().join("in-the-way");
        std::fs::create_dir(&path).unwrap();
        std::fs::write(path.join("inside"), b"x").unwrap();
        assert!(replace(&path, b"new contents").is_err());
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["in-the-way"], "no temporary left");
    }
}
