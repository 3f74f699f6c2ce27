//! The chain's files on disk: which there are, in order, and their lines
//! read forwards or backwards one at a time, so that nothing here holds
//! more of a file in memory than a line, however long the log has grown.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use super::{ACTIVE, AuditError, Record, io};

/// The rotated files of `dir`, oldest first, then the active one if present.
pub fn chain_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut rotated: Vec<(u64, PathBuf)> = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if let Some(seq) = rotated_first_seq(&path) {
            rotated.push((seq, path));
        }
    }
    rotated.sort();
    let mut files: Vec<PathBuf> = rotated.into_iter().map(|(_, p)| p).collect();
    let active = dir.join(ACTIVE);
    if active.exists() {
        files.push(active);
    }
    Ok(files)
}

#[cfg(test)]
pub(super) fn read_lines(path: &Path) -> std::io::Result<Vec<String>> {
    BufReader::new(File::open(path)?).lines().collect()
}

/// Each line of `path` as a record (or why it is not one), with its
/// 1-based number, until `f` says stop. One line in memory at a time,
/// however large the file.
pub(super) fn for_each_record(
    path: &Path,
    f: impl FnMut(usize, Result<Record, String>) -> bool,
) -> Result<(), AuditError> {
    let mut file = File::open(path).map_err(io(path))?;
    let len = file.metadata().map_err(io(path))?.len();
    for_each_record_in(&mut file, len, f).map_err(io(path))
}

/// [`for_each_record`] over the first `len` bytes of an open file.
pub(super) fn for_each_record_in(
    file: &mut File,
    len: u64,
    mut f: impl FnMut(usize, Result<Record, String>) -> bool,
) -> std::io::Result<()> {
    let mut number = 0;
    read_forward(file, 0, len, |_, _, line| {
        number += 1;
        f(
            number,
            serde_json::from_slice::<Record>(line).map_err(|e| e.to_string()),
        )
    })
}

/// Cuts off what follows the last newline of `path`: the part of a record
/// that a write which never completed (a crash, a full disk) left behind.
/// Left there, the next record would be glued to it, and the chain would
/// read as broken for good at a line nobody tampered with. Records are
/// acknowledged only once fsynced, so no acknowledged record is cut.
/// Returns how many bytes were cut and the first [`MAX_LINE`] of them, if
/// any were.
pub(super) fn cut_torn_tail(path: &Path) -> std::io::Result<Option<(u64, Vec<u8>)>> {
    let mut file = match OpenOptions::new().read(true).write(true).open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let len = file.metadata()?.len();
    if len == 0 || read_at_most(&mut file, len - 1, len)? == b"\n" {
        return Ok(None);
    }
    let mut torn = None;
    read_backward(&mut file, len, |start, _, line| {
        torn = Some((start, line.to_vec()));
        false
    })?;
    let Some((whole, cut)) = torn else {
        return Ok(None);
    };
    file.set_len(whole)?;
    file.sync_all()?;
    Ok(Some((len - whole, cut)))
}

/// The last line of `path` as a record: `None` if empty or not a record.
pub(super) fn last_record(path: &Path) -> std::io::Result<Option<Record>> {
    let mut file = File::open(path)?;
    let len = file.metadata()?.len();
    let mut last = None;
    read_backward(&mut file, len, |_, _, line| {
        last = serde_json::from_slice(line).ok();
        false
    })?;
    Ok(last)
}

/// Of a line, at most this much is held: far more than any record warden
/// writes, so only a file written by someone else has longer ones, and
/// those are not records either way.
const MAX_LINE: usize = 1 << 20;

/// The bytes of `file` from `start` to `end`, or the first [`MAX_LINE`]
/// of them.
fn read_at_most(file: &mut File, start: u64, end: u64) -> std::io::Result<Vec<u8>> {
    use std::io::{Read, Seek, SeekFrom};
    let mut bytes = vec![0; (end - start).min(MAX_LINE as u64) as usize];
    file.seek(SeekFrom::Start(start))?;
    file.read_exact(&mut bytes)?;
    Ok(bytes)
}

/// Where the line that `end` falls in (or ends at) begins: just after the
/// last newline before `end`, or 0. Read backwards a block at a time.
fn line_start(file: &mut File, end: u64) -> std::io::Result<u64> {
    use std::io::{Read, Seek, SeekFrom};
    let mut end = end;
    while end > 0 {
        let start = end.saturating_sub(64 * 1024);
        let mut block = vec![0; (end - start) as usize];
        file.seek(SeekFrom::Start(start))?;
        file.read_exact(&mut block)?;
        if let Some(i) = block.iter().rposition(|&b| b == b'\n') {
            return Ok(start + i as u64 + 1);
        }
        end = start;
    }
    Ok(0)
}

/// The first sequence number a file of the chain is named after, or
/// `None` for the active file.
pub(super) fn rotated_first_seq(path: &Path) -> Option<u64> {
    path.file_name()?
        .to_str()?
        .strip_prefix("audit.")?
        .strip_suffix(".log")?
        .parse()
        .ok()
}

/// The lines of `file` from `start` up to `end`, in order, each with
/// where it begins and ends, until `f` says stop. A last line without its
/// newline is given as it is; a line longer than [`MAX_LINE`] is given
/// cut to that, without holding the rest.
pub(super) fn read_forward(
    file: &mut File,
    start: u64,
    end: u64,
    mut f: impl FnMut(u64, u64, &[u8]) -> bool,
) -> std::io::Result<()> {
    use std::io::{Read, Seek, SeekFrom};
    file.seek(SeekFrom::Start(start))?;
    let mut reader = BufReader::new(file.take(end - start));
    let (mut at, mut line) = (start, Vec::new());
    loop {
        line.clear();
        let mut n = 0;
        loop {
            let buffered = reader.fill_buf()?;
            if buffered.is_empty() {
                break;
            }
            let (used, ended) = match buffered.iter().position(|&b| b == b'\n') {
                Some(i) => (i + 1, true),
                None => (buffered.len(), false),
            };
            let room = MAX_LINE.saturating_sub(line.len());
            line.extend_from_slice(&buffered[..used.min(room)]);
            reader.consume(used);
            n += used as u64;
            if ended {
                break;
            }
        }
        if n == 0 {
            return Ok(());
        }
        let text = line.strip_suffix(b"\n").unwrap_or(&line);
        if !f(at, at + n, text) {
            return Ok(());
        }
        at += n;
    }
}

/// The lines of `file` that end at or before `end`, newest first, each
/// with where it begins and ends, until `f` says stop. Read backwards a
/// block at a time; a line longer than [`MAX_LINE`] is given cut to its
/// first [`MAX_LINE`] bytes, found without holding the rest.
pub(super) fn read_backward(
    file: &mut File,
    end: u64,
    mut f: impl FnMut(u64, u64, &[u8]) -> bool,
) -> std::io::Result<()> {
    use std::io::{Read, Seek, SeekFrom};
    const BLOCK: u64 = 64 * 1024;
    // `buf` holds the file's bytes from `buf_start` to `line_end`, where
    // the next line back ends.
    let (mut buf, mut buf_start, mut line_end) = (Vec::new(), end, end);
    while line_end > 0 {
        let start = loop {
            // The newline before the line, not the one that ends it.
            let before_last = buf.len().saturating_sub(1);
            if let Some(i) = buf[..before_last].iter().rposition(|&b| b == b'\n') {
                break buf_start + i as u64 + 1;
            }
            if buf_start == 0 {
                break 0;
            }
            if buf.len() > MAX_LINE {
                break line_start(file, line_end - 1)?;
            }
            let from = buf_start.saturating_sub(BLOCK);
            let mut block = vec![0; (buf_start - from) as usize];
            file.seek(SeekFrom::Start(from))?;
            file.read_exact(&mut block)?;
            block.extend_from_slice(&buf);
            buf = block;
            buf_start = from;
        };
        if start < buf_start {
            // A line too long to hold.
            let line = read_at_most(file, start, line_end)?;
            if !f(start, line_end, line.strip_suffix(b"\n").unwrap_or(&line)) {
                return Ok(());
            }
            (buf, buf_start) = (Vec::new(), start);
        } else {
            let at = (start - buf_start) as usize;
            let line = &buf[at..];
            if !f(start, line_end, line.strip_suffix(b"\n").unwrap_or(line)) {
                return Ok(());
            }
            buf.truncate(at);
        }
        line_end = start;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Forwards and backwards give the same lines at the same places,
    /// whatever their lengths: empty ones, lines across the backward
    /// reader's blocks, one longer than `MAX_LINE` (given cut), and a last
    /// line without its newline.
    #[test]
    fn lines_read_forwards_and_backwards_agree_and_long_ones_are_cut() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lines");
        let long = vec![b'y'; 3 * MAX_LINE + 7];
        let mut lines: Vec<Vec<u8>> = vec![b"first".to_vec(), Vec::new(), vec![b'x'; 70_000]];
        lines.push(long.clone());
        lines.extend((0..50).map(|i| format!("line {i}").into_bytes()));
        lines.push(b"no newline at the end".to_vec());
        let bytes = lines.join(&b'\n');
        std::fs::write(&path, &bytes).unwrap();
        let len = bytes.len() as u64;

        let mut file = File::open(&path).unwrap();
        let mut forward = Vec::new();
        read_forward(&mut file, 0, len, |start, end, line| {
            forward.push((start, end, line.to_vec()));
            true
        })
        .unwrap();
        let mut backward = Vec::new();
        read_backward(&mut file, len, |start, end, line| {
            backward.push((start, end, line.to_vec()));
            true
        })
        .unwrap();
        backward.reverse();
        assert_eq!(forward.len(), lines.len());
        assert_eq!(forward, backward);
        let mut at = 0;
        for ((start, end, line), whole) in forward.iter().zip(&lines) {
            assert_eq!(*start, at);
            let shown = &whole[..whole.len().min(MAX_LINE)];
            assert_eq!(line.as_slice(), shown);
            at = *end;
        }
        assert_eq!(at, len);

        // Stopping, either way, stops.
        let mut seen = 0;
        read_backward(&mut file, len, |_, _, _| {
            seen += 1;
            seen < 3
        })
        .unwrap();
        assert_eq!(seen, 3);
    }
}
