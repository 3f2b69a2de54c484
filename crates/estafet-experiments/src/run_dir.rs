//! A run directory and the only way estafet writes into it: atomically (temporary file in the
//! same directory, then rename), so that a crash never leaves a half-written file behind and
//! never destroys an earlier good one.
//!
//! ```text
//! RUN_DIR/
//!   config.toml      the resolved config, every default written out
//!   run.json         seed, backend, code version, config source, parameters, state size
//!   metrics.jsonl    one JSON object per logged step and per evaluation
//!   checkpoint/      the latest checkpoint (its format: `checkpoint.rs`)
//!   interrupted.json where a run stopped by SIGINT/SIGTERM stands, and the command to resume
//!   summary.json     final figures, written last: its presence means the run completed
//! ```
//!
//! Every file is replaced whole (temporary file, then rename), except `metrics.jsonl`, which
//! is appended a line at a time and flushed; a resumed run rewrites it (atomically) without
//! the lines logged after its checkpoint.
//!
//! A run directory has one writer: [`RunDir`] holds an advisory lock on `RUN_DIR/.lock` (which
//! names the holder's pid) for as long as it lives. The operating system releases it when the
//! process ends however it ends, so a killed run leaves nothing to clean up, and a second
//! process (a Slurm requeue while the old job is still stopping, two shards given the same
//! index) is refused with the holder's pid instead of writing beside it.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::Serialize;

pub struct RunDir {
    root: PathBuf,
    /// The open lock file: the lock lasts as long as this handle.
    _lock: File,
    /// Whether [`RunDir::create`] made the directory (so [`RunDir::abandon`] may remove it).
    created: bool,
}

/// Another process holds the run directory.
#[derive(Debug, thiserror::Error)]
#[error(
    "run directory {} is in use by another estafet process (pid {holder}); a run directory has \
     one writer at a time",
    dir.display()
)]
pub struct Busy {
    pub dir: PathBuf,
    /// The holder's pid as its lock file names it (`unknown` if it could not be read).
    pub holder: String,
}

impl RunDir {
    /// The lock file inside a run directory.
    pub const LOCK: &str = ".lock";

    /// Creates `root` (and its parents) and takes its lock; refuses a directory that already
    /// holds files, so that no earlier run is overwritten.
    pub fn create(root: &Path) -> Result<Self> {
        let created = !root.exists();
        fs::create_dir_all(root)
            .with_context(|| format!("cannot create run directory {}", root.display()))?;
        let mut dir = Self::lock(root)?;
        dir.created = created;
        let occupied = fs::read_dir(root)
            .with_context(|| format!("cannot read run directory {}", root.display()))?
            .filter_map(|e| e.ok())
            .any(|e| e.file_name() != Self::LOCK);
        if occupied {
            bail!(
                "run directory {} is not empty; choose another --out",
                root.display()
            );
        }
        Ok(dir)
    }

    /// Opens an existing run directory to continue it, and takes its lock.
    pub fn open(root: &Path) -> Result<Self> {
        Self::lock(root)
    }

    /// Takes the lock of `root`, or fails with [`Busy`] naming the holder; then checks that
    /// the directory is writable (now, not after an hour of training).
    fn lock(root: &Path) -> Result<Self> {
        let path = root.join(Self::LOCK);
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                return Err(Busy {
                    dir: root.to_path_buf(),
                    holder: holder_of(&path),
                }
                .into());
            }
            Err(fs::TryLockError::Error(e)) => {
                return Err(e).with_context(|| format!("cannot lock {}", path.display()));
            }
        }
        file.set_len(0)
            .and_then(|()| writeln!(file, "{}", std::process::id()))
            .and_then(|()| file.sync_data())
            .with_context(|| format!("cannot write {}", path.display()))?;
        let dir = Self {
            root: root.to_path_buf(),
            _lock: file,
            created: false,
        };
        dir.write_atomic(".write-test", b"")?;
        fs::remove_file(root.join(".write-test")).ok();
        Ok(dir)
    }

    /// Gives up a run directory before anything was written into it (the model could not be
    /// built): removes the lock file and, if [`RunDir::create`] made the directory, the
    /// directory, so that a refused run leaves nothing behind.
    pub fn abandon(self) {
        fs::remove_file(self.root.join(Self::LOCK)).ok();
        if self.created {
            fs::remove_dir(&self.root).ok();
        }
    }

    /// The pid of the process that holds `root`'s lock, if one does (a sweep asks before it
    /// starts a run there).
    pub fn holder(root: &Path) -> Option<String> {
        let path = root.join(Self::LOCK);
        let file = File::open(&path).ok()?;
        match file.try_lock_shared() {
            Ok(()) => None,
            Err(fs::TryLockError::WouldBlock) => Some(holder_of(&path)),
            Err(fs::TryLockError::Error(_)) => None,
        }
    }

    /// Keeps the complete lines of `name` whose `step` is at most `step` (what a resumed run
    /// has not yet redone), rewriting the file atomically.
    pub fn truncate_jsonl(&self, name: &str, step: usize) -> Result<()> {
        let path = self.root.join(name);
        let text = fs::read_to_string(&path).unwrap_or_default();
        let kept: String = text
            .split_inclusive('\n')
            .filter(|line| line.ends_with('\n'))
            .filter(|line| {
                serde_json::from_str::<serde_json::Value>(line)
                    .ok()
                    .and_then(|v| v["step"].as_u64())
                    .is_some_and(|s| s as usize <= step)
            })
            .collect();
        self.write_atomic(name, kept.as_bytes())
    }

    pub fn path(&self) -> &Path {
        &self.root
    }

    /// The file a run writes last: its presence means the run completed.
    pub const SUMMARY: &str = "summary.json";

    /// Whether the run in `root` completed (its [`RunDir::SUMMARY`] is written last).
    pub fn is_complete(root: &Path) -> bool {
        root.join(Self::SUMMARY).is_file()
    }

    /// Removes `name` if it exists.
    pub fn remove(&self, name: &str) -> Result<()> {
        let path = self.root.join(name);
        match fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(e).with_context(|| format!("cannot remove {}", path.display()))
            }
            _ => Ok(()),
        }
    }

    pub fn write_atomic(&self, name: &str, bytes: &[u8]) -> Result<()> {
        write_atomic(&self.root.join(name), bytes)
    }

    pub fn write_json(&self, name: &str, value: &impl Serialize) -> Result<()> {
        let mut text = serde_json::to_string_pretty(value)?;
        text.push('\n');
        self.write_atomic(name, text.as_bytes())
    }

    /// Appends one JSON line to `name` and flushes it to disk.
    pub fn append_jsonl(&self, name: &str, value: &impl Serialize) -> Result<()> {
        let path = self.root.join(name);
        let mut line = serde_json::to_string(value)?;
        line.push('\n');
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        file.write_all(line.as_bytes())
            .and_then(|()| file.sync_data())
            .with_context(|| format!("cannot write {}", path.display()))
    }
}

fn holder_of(lock: &Path) -> String {
    fs::read_to_string(lock)
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

/// Writes `bytes` to `path` through a temporary file in the same directory and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let name = path
        .file_name()
        .with_context(|| format!("{} names no file", path.display()))?;
    let tmp = path.with_file_name(format!(".{}.tmp", name.to_string_lossy()));
    let result = File::create(&tmp)
        .and_then(|mut f| f.write_all(bytes).and_then(|()| f.sync_all()))
        .and_then(|()| fs::rename(&tmp, path));
    if result.is_err() {
        fs::remove_file(&tmp).ok();
    }
    result.with_context(|| format!("cannot write {}", path.display()))
}

/// `runs/STEM-YYYYMMDD-HHMMSS`: where a command writes when it is given no `--out`.
pub fn default_path(stem: &str) -> PathBuf {
    let stamp = humantime::format_rfc3339_seconds(std::time::SystemTime::now())
        .to_string()
        .replace(['-', ':'], "")
        .replace('T', "-")
        .trim_end_matches('Z')
        .to_string();
    PathBuf::from("runs").join(format!("{stem}-{stamp}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("estafet-rundir-{name}-{}", std::process::id()));
        fs::remove_dir_all(&dir).ok();
        dir
    }

    #[test]
    fn refuses_a_directory_with_results() {
        let root = scratch("occupied");
        let dir = RunDir::create(&root).unwrap();
        dir.write_json("summary.json", &[1, 2]).unwrap();
        drop(dir);
        let e = RunDir::create(&root).err().unwrap().to_string();
        assert!(e.contains("not empty"), "{e}");
        assert_eq!(
            fs::read_to_string(root.join("summary.json")).unwrap(),
            "[\n  1,\n  2\n]\n"
        );
        fs::remove_dir_all(root).ok();
    }

    #[test]
    fn one_writer_at_a_time() {
        let root = scratch("busy");
        let first = RunDir::create(&root).unwrap();
        assert_eq!(RunDir::holder(&root), Some(std::process::id().to_string()));
        let e = RunDir::open(&root).err().unwrap();
        let busy = e.downcast_ref::<Busy>().expect("a Busy error");
        assert_eq!(busy.holder, std::process::id().to_string());
        assert!(e.to_string().contains("in use"), "{e}");
        let e = RunDir::create(&root).err().unwrap();
        assert!(e.downcast_ref::<Busy>().is_some(), "{e}");
        drop(first);
        assert_eq!(RunDir::holder(&root), None);
        // The lock file alone does not make a directory occupied.
        let again = RunDir::create(&root).unwrap();
        drop(again);
        RunDir::open(&root).unwrap();
        fs::remove_dir_all(root).ok();
    }
}
