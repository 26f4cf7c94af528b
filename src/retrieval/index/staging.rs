//! Building an index directory atomically: a staging directory beside the target, renamed
//! (on Linux, swapped in one step) into place when the build is complete ([`Staging`]), and the
//! check that a target may be written at all ([`check_target`]).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// A temporary directory beside the target index directory; [`Staging::commit`] renames it into
/// place. Dropped without commit, it is removed and the target is untouched.
pub struct Staging {
    tmp: tempfile::TempDir,
    target: PathBuf,
    force: bool,
}

/// Fail unless `target` can be written: absent, an empty directory, or `force`.
pub fn check_target(target: &Path, force: bool) -> Result<()> {
    if force || !target.exists() {
        return Ok(());
    }
    let empty_dir = target.is_dir()
        && std::fs::read_dir(target)
            .with_context(|| format!("reading {}", target.display()))?
            .next()
            .is_none();
    if !empty_dir {
        bail!(
            "{} already exists; pass --force to replace it",
            target.display()
        );
    }
    Ok(())
}

impl Staging {
    /// Check the target, then create the staging directory in its parent.
    pub fn new(target: &Path, force: bool) -> Result<Self> {
        check_target(target, force)?;
        let parent = match target.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
        let name = target
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let tmp = tempfile::Builder::new()
            .prefix(&format!(".{name}.building-"))
            .tempdir_in(parent)
            .with_context(|| format!("creating a temporary directory in {}", parent.display()))?;
        Ok(Self {
            tmp,
            target: target.to_path_buf(),
            force,
        })
    }

    /// Where to write the new index's files.
    pub fn path(&self) -> &Path {
        self.tmp.path()
    }

    /// Move the finished directory into place. An existing target (allowed by `force`) is first
    /// renamed aside, then removed once the new one is in place; if the second rename fails, the
    /// old one is put back.
    pub fn commit(self) -> Result<()> {
        check_target(&self.target, self.force)?;
        let target = self.target.clone();
        let tmp = self.tmp.keep();
        let renamed = |from: &Path, to: &Path| {
            std::fs::rename(from, to)
                .with_context(|| format!("renaming {} to {}", from.display(), to.display()))
        };
        let occupied = target.exists() && check_target(&target, false).is_err();
        if !occupied {
            return renamed(&tmp, &target).inspect_err(|_| {
                let _ = std::fs::remove_dir_all(&tmp);
            });
        }
        // One atomic swap where the OS has it: the target is never missing, even for a moment.
        if exchange(&tmp, &target).is_ok() {
            return if tmp.is_dir() {
                std::fs::remove_dir_all(&tmp)
            } else {
                std::fs::remove_file(&tmp)
            }
            .with_context(|| format!("removing the replaced index {}", tmp.display()));
        }
        let mut aside = tmp.clone().into_os_string();
        aside.push(".old");
        let aside = PathBuf::from(aside);
        renamed(&target, &aside).inspect_err(|_| {
            let _ = std::fs::remove_dir_all(&tmp);
        })?;
        if let Err(e) = renamed(&tmp, &target) {
            let _ = std::fs::rename(&aside, &target);
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
        if aside.is_dir() {
            std::fs::remove_dir_all(&aside)
        } else {
            std::fs::remove_file(&aside)
        }
        .with_context(|| format!("removing the replaced index {}", aside.display()))
    }
}

/// Swap two paths atomically (`renameat2(RENAME_EXCHANGE)`); an error where the OS or the file
/// system cannot, and the caller falls back to two renames.
#[cfg(target_os = "linux")]
fn exchange(a: &Path, b: &Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let a = std::ffi::CString::new(a.as_os_str().as_bytes())?;
    let b = std::ffi::CString::new(b.as_os_str().as_bytes())?;
    // SAFETY: two valid NUL-terminated paths; the syscall reads them and keeps no pointer.
    let r = unsafe {
        libc::syscall(
            libc::SYS_renameat2,
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(not(target_os = "linux"))]
fn exchange(_a: &Path, _b: &Path) -> std::io::Result<()> {
    Err(std::io::ErrorKind::Unsupported.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staging_replaces_only_with_force() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("idx");
        let s = Staging::new(&target, false).unwrap();
        std::fs::write(s.path().join("a"), "1").unwrap();
        s.commit().unwrap();
        assert!(Staging::new(&target, false).is_err());
        let s = Staging::new(&target, true).unwrap();
        std::fs::write(s.path().join("a"), "2").unwrap();
        drop(s); // abandoned build: old index untouched
        assert_eq!(std::fs::read_to_string(target.join("a")).unwrap(), "1");
        let s = Staging::new(&target, true).unwrap();
        std::fs::write(s.path().join("a"), "3").unwrap();
        s.commit().unwrap();
        assert_eq!(std::fs::read_to_string(target.join("a")).unwrap(), "3");
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(left.len(), 1, "{left:?}");
    }
}
