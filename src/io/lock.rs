//! One writer per output directory: an exclusive OS advisory lock (`flock` on Unix, `LockFileEx`
//! on Windows, through `std::fs::File::try_lock`) on a file `.NAME.lock` beside the directory
//! `NAME`. Beside, not inside: `index` builds a staging directory and renames it over the old
//! one, and a lock inside would be renamed away with it.
//!
//! The OS drops the lock when its holder exits, killed or not, so a crash never leaves a lock
//! that blocks; the file only carries the holder's pid for the message a second writer gets.
//! [`DirLock`] removes its file when dropped; [`hold_until_exit`] keeps the lock for the rest of
//! the process and leaves the (then unlocked) file behind. Whoever takes the lock first cleans
//! up what a killed writer of the directory left ([`crate::io::recover`]).

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{bail, Context, Result};

/// An exclusive lock on an output directory, held until dropped.
#[derive(Debug)]
pub struct DirLock {
    file: File,
    path: PathBuf,
}

/// The lock file of `dir`: `.NAME.lock` in `dir`'s parent (canonicalized, so that two spellings
/// of one directory share one lock); `dir/.refrag.lock` when `dir` has no name (`.`, `/`).
pub fn lock_path(dir: &Path) -> Result<PathBuf> {
    let (parent, file) = match (dir.parent(), dir.file_name()) {
        (Some(p), Some(name)) => {
            let p = if p.as_os_str().is_empty() {
                Path::new(".")
            } else {
                p
            };
            (p.to_path_buf(), format!(".{}.lock", name.to_string_lossy()))
        }
        _ => (dir.to_path_buf(), ".refrag.lock".to_string()),
    };
    std::fs::create_dir_all(&parent).with_context(|| format!("creating {}", parent.display()))?;
    let parent = std::fs::canonicalize(&parent)
        .with_context(|| format!("resolving {}", parent.display()))?;
    Ok(parent.join(file))
}

impl DirLock {
    /// Take the lock of `dir` or fail at once, naming `flag`, the directory and the holder's pid.
    pub fn acquire(dir: &Path, flag: &str) -> Result<Self> {
        let path = lock_path(dir)?;
        loop {
            let mut file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false) // the holder's pid stays readable until we hold the lock
                .open(&path)
                .with_context(|| format!("{flag} {}: opening {}", dir.display(), path.display()))?;
            match file.try_lock() {
                Ok(()) => {}
                Err(TryLockError::WouldBlock) => bail!(
                    "{flag} {} is being written by another refrag process ({}; lock file {})",
                    dir.display(),
                    holder(&mut file),
                    path.display()
                ),
                Err(TryLockError::Error(e)) => {
                    bail!("{flag} {}: locking {}: {e}", dir.display(), path.display())
                }
            }
            // A holder that was releasing may have removed the file we opened: lock the one
            // that is at the path now.
            if !same_file(&file, &path) {
                continue;
            }
            write_pid(&mut file).with_context(|| format!("writing {}", path.display()))?;
            let lock = Self { file, path };
            crate::io::recover::after_dead_writers(dir)
                .with_context(|| format!("{flag} {}", dir.display()))?;
            return Ok(lock);
        }
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for DirLock {
    fn drop(&mut self) {
        // Removed while still locked; closing the file then releases the lock.
        let _ = std::fs::remove_file(&self.path);
        let _ = self.file.unlock();
    }
}

/// Take the lock of `dir` (as [`DirLock::acquire`]) and keep it until the process exits, also
/// through `std::process::exit`; for commands whose writing ends with the process.
pub fn hold_until_exit(dir: &Path, flag: &str) -> Result<()> {
    // A static is never dropped: the lock lasts until the OS closes the file at exit.
    static HELD: Mutex<Vec<DirLock>> = Mutex::new(Vec::new());
    let lock = DirLock::acquire(dir, flag)?;
    HELD.lock().unwrap_or_else(|e| e.into_inner()).push(lock);
    Ok(())
}

/// "pid N" from the lock file, or why it is not known.
fn holder(file: &mut File) -> String {
    let mut text = String::new();
    match file.read_to_string(&mut text) {
        Ok(_) => match text.trim().parse::<u32>() {
            Ok(pid) => format!("pid {pid}"),
            Err(_) => "pid not yet recorded".to_string(),
        },
        Err(_) => "pid unreadable".to_string(),
    }
}

fn write_pid(file: &mut File) -> std::io::Result<()> {
    file.set_len(0)?;
    file.rewind()?;
    writeln!(file, "{}", std::process::id())?;
    file.flush()
}

/// Whether the open `file` is the file at `path` (always true where this cannot be checked).
#[cfg(unix)]
fn same_file(file: &File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (file.metadata(), std::fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

#[cfg(not(unix))]
fn same_file(_file: &File, path: &Path) -> bool {
    path.exists()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_writer_is_refused_with_the_pid() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let held = DirLock::acquire(&out, "--out_dir").unwrap();
        assert_eq!(held.path(), lock_path(&out).unwrap());
        assert!(held.path().ends_with(".out.lock"));
        let e = DirLock::acquire(&out, "--out_dir").unwrap_err().to_string();
        assert!(e.contains("--out_dir"), "{e}");
        assert!(e.contains(&out.display().to_string()), "{e}");
        assert!(e.contains(&format!("pid {}", std::process::id())), "{e}");
        // Another spelling of the same directory shares the lock.
        let other = dir.path().join("x").join("..").join("out");
        std::fs::create_dir_all(dir.path().join("x")).unwrap();
        assert!(DirLock::acquire(&other, "--out_dir").is_err());
        drop(held);
        assert!(!lock_path(&out).unwrap().exists(), "lock file removed");
        let again = DirLock::acquire(&out, "--out_dir").unwrap();
        drop(again);
    }

    #[test]
    fn a_stale_lock_file_does_not_block() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("idx");
        std::fs::write(lock_path(&out).unwrap(), "999999999\n").unwrap();
        let l = DirLock::acquire(&out, "--index_dir").unwrap();
        let text = std::fs::read_to_string(l.path()).unwrap();
        assert_eq!(text.trim(), std::process::id().to_string());
    }
}
