//! The plugin's `logFile`, bounded: one JSON line per write, appended; past [`MAX_BYTES`] the
//! file is renamed to `<logFile>.1` (the one older file kept, replacing the previous one) and a
//! new one begun.
//!
//! Every ADD and DEL is a process of its own, and several run at once on a busy node, so the
//! file is shared. Each line is one `write` to a descriptor opened with `O_APPEND`: the kernel
//! appends it whole, never interleaved with another process's. The size is read with one
//! `fstat` per line, the only cost on the ADD path. Rotation is rare and done under an exclusive
//! `flock` of the full file's own inode, after checking that the path still names that inode:
//! of two processes that find the same file full, one renames it and the other, finding the path
//! moved on, only reopens it, so a fresh `.1` is never overwritten by the file that came after.
//! A process still writing to the renamed file appends to `.1`: its lines are kept.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

/// Where the log is rotated: a node's worth of ADD and DEL lines for days, in bounded space.
pub const MAX_BYTES: u64 = 10 << 20;

/// The log file, rotated at `max_bytes`.
pub struct RotatingLog {
    path: PathBuf,
    file: File,
    max_bytes: u64,
}

fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

/// `<path>.1`.
pub fn rotated_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".1");
    PathBuf::from(name)
}

impl RotatingLog {
    pub fn open(path: &Path, max_bytes: u64) -> io::Result<Self> {
        Ok(RotatingLog { path: path.to_path_buf(), file: open_append(path)?, max_bytes })
    }

    /// Renames the full file to `.1` unless another process did already, then reopens the path.
    fn rotate(&mut self) -> io::Result<()> {
        let mine = self.file.metadata()?;
        let full = self.file.try_clone()?;
        let locked = Flock::lock(full, FlockArg::LockExclusive).map_err(|(_, e)| io::Error::from(e))?;
        let same = |m: &std::fs::Metadata| m.dev() == mine.dev() && m.ino() == mine.ino();
        if std::fs::metadata(&self.path).is_ok_and(|now| same(&now)) {
            std::fs::rename(&self.path, rotated_path(&self.path))?;
        }
        drop(locked);
        self.file = open_append(&self.path)?;
        Ok(())
    }
}

impl Write for RotatingLog {
    /// One line (the formatter writes each event whole): rotated first when the file is full.
    fn write(&mut self, line: &[u8]) -> io::Result<usize> {
        if self.file.metadata()?.len() >= self.max_bytes {
            // A log that cannot rotate still takes the line: never lose it for the bound.
            let _ = self.rotate();
        }
        self.file.write(line)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A line of its writer and number, padded to a length that varies, so that a torn or
    /// interleaved line cannot read as a whole one.
    fn line(writer: usize, n: usize) -> String {
        let pad = "x".repeat((writer * 31 + n * 7) % 200);
        format!("{{\"writer\":{writer},\"n\":{n},\"pad\":\"{pad}\",\"end\":{}}}\n", writer * 100_000 + n)
    }

    fn whole(text: &str) -> bool {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(text) else { return false };
        let (Some(w), Some(n)) = (v["writer"].as_u64(), v["n"].as_u64()) else { return false };
        line(w as usize, n as usize).trim_end() == text
    }

    /// Four writers, each with its own descriptor as separate plugin processes have, write far
    /// past the bound: the file and its `.1` stay near the bound, every line in them is whole,
    /// and the newest lines are all there.
    #[test]
    fn concurrent_writers_rotate_at_the_bound_without_tearing_a_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cni.log");
        let max = 16 << 10;
        let (writers, lines) = (4, 2000);
        std::thread::scope(|s| {
            for w in 0..writers {
                let path = path.clone();
                s.spawn(move || {
                    let mut log = RotatingLog::open(&path, max).unwrap();
                    for n in 0..lines {
                        log.write_all(line(w, n).as_bytes()).unwrap();
                    }
                });
            }
        });
        let longest = (0..writers).flat_map(|w| (0..lines).map(move |n| line(w, n).len())).max().unwrap() as u64;
        let current = std::fs::read_to_string(&path).unwrap();
        // Past the bound by at most the lines written between one writer's fstat and its write.
        let slack = longest * writers as u64;
        assert!((current.len() as u64) < max + slack, "current {} bytes", current.len());
        let older = std::fs::read_to_string(rotated_path(&path)).unwrap();
        assert!((older.len() as u64) < max + slack, "rotated {} bytes", older.len());
        assert!(older.len() as u64 >= max, "rotated only when full: {} bytes", older.len());
        for text in current.lines().chain(older.lines()) {
            assert!(whole(text), "torn or interleaved line: {text:?}");
        }
        let written = writers * lines * 200;
        assert!(current.len() + older.len() < written, "rotation dropped the oldest lines");
        // The last line written (some writer's last) is kept, and each writer's lines read in the
        // order it wrote them, the older file first.
        let kept = |w| current.contains(&line(w, lines - 1)) || older.contains(&line(w, lines - 1));
        assert!((0..writers).any(kept), "the newest line is kept");
        for w in 0..writers {
            let ns: Vec<u64> = older
                .lines()
                .chain(current.lines())
                .map(|t| serde_json::from_str::<serde_json::Value>(t).unwrap())
                .filter(|v| v["writer"].as_u64() == Some(w as u64))
                .map(|v| v["n"].as_u64().unwrap())
                .collect();
            assert!(ns.windows(2).all(|p| p[0] < p[1]), "writer {w}'s lines out of order: {ns:?}");
        }
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names.len(), 2, "the log and one older file: {names:?}");
    }

    #[test]
    fn a_log_under_the_bound_is_appended_to_and_never_rotated() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cni.log");
        std::fs::write(&path, "earlier\n").unwrap();
        let mut log = RotatingLog::open(&path, 1 << 20).unwrap();
        log.write_all(b"{\"a\":1}\n").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "earlier\n{\"a\":1}\n");
        assert!(!rotated_path(&path).exists());
    }
}
