//! What a killed writer leaves behind, finished or removed by the next writer of the same
//! directory. [`crate::io::lock::DirLock`] calls [`after_dead_writers`] once it holds the lock of a
//! directory: no other refrag process is then writing it, so whatever temporary it finds there
//! belongs to a writer that died (SIGKILL, power cut) and is safe to act on. Each action is
//! reported on stderr in one line.
//!
//! - `.NAME.building-*` beside `NAME`: an index staging directory ([`crate::retrieval::index::Staging`]),
//!   removed; when `NAME` itself is missing, a staging directory ending in `.old` holds the
//!   previous index (the writer died between its two renames) and is put back instead.
//! - `NAME/.checkpoint.next`: a checkpoint being written ([`crate::io::checkpoint::begin_staged`]),
//!   moved into place when it was marked complete, else removed.
//! - `NAME/.tmp*` (temporary files of atomic writes) and `NAME/.*.link` (hard links being
//!   renamed into place): removed.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// Clean up after dead writers of `dir` (see the module doc); call with `dir`'s lock held.
pub fn after_dead_writers(dir: &Path) -> Result<()> {
    staging_beside(dir)?;
    if dir.is_dir() {
        if crate::io::checkpoint::recover_staged(dir, true)? {
            report("finished", &dir.join(crate::io::checkpoint::STAGING));
        }
        for p in entries(dir)? {
            let name = file_name(&p);
            let temp =
                name.starts_with(".tmp") || (name.starts_with('.') && name.ends_with(".link"));
            if temp && p.is_file() {
                std::fs::remove_file(&p).with_context(|| format!("removing {}", p.display()))?;
                report("removed", &p);
            }
        }
    }
    Ok(())
}

/// Index staging directories `.NAME.building-*` in `dir`'s parent.
fn staging_beside(dir: &Path) -> Result<()> {
    let (Some(parent), Some(name)) = (dir.parent(), dir.file_name()) else {
        return Ok(());
    };
    let parent = if parent.as_os_str().is_empty() {
        Path::new(".")
    } else {
        parent
    };
    let prefix = format!(".{}.building-", name.to_string_lossy());
    let mut found: Vec<PathBuf> = entries(parent)?
        .into_iter()
        .filter(|p| file_name(p).starts_with(&prefix))
        .collect();
    found.sort();
    for p in found {
        if !dir.exists() && file_name(&p).ends_with(".old") && p.is_dir() {
            std::fs::rename(&p, dir)
                .with_context(|| format!("restoring {} to {}", p.display(), dir.display()))?;
            report("restored the previous index from", &p);
            continue;
        }
        if p.is_dir() {
            std::fs::remove_dir_all(&p)
        } else {
            std::fs::remove_file(&p)
        }
        .with_context(|| format!("removing {}", p.display()))?;
        report("removed", &p);
    }
    Ok(())
}

fn entries(dir: &Path) -> Result<Vec<PathBuf>> {
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", dir.display())),
    };
    Ok(rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn report(what: &str, p: &Path) {
    eprintln!(
        "refrag: {what} {} (left by an interrupted run)",
        p.display()
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_temporaries_are_removed_and_a_lost_index_restored() {
        let root = tempfile::tempdir().unwrap();
        let idx = root.path().join("idx");
        std::fs::create_dir_all(root.path().join(".idx.building-ab12")).unwrap();
        std::fs::create_dir_all(root.path().join(".idx2.building-cd34")).unwrap();
        let old = root.path().join(".idx.building-ef56.old");
        std::fs::create_dir_all(&old).unwrap();
        std::fs::write(old.join("manifest.json"), "{}").unwrap();
        after_dead_writers(&idx).unwrap();
        assert!(
            idx.join("manifest.json").is_file(),
            "previous index put back"
        );
        let mut left: Vec<String> = entries(root.path())
            .unwrap()
            .iter()
            .map(|p| file_name(p))
            .collect();
        left.sort();
        assert_eq!(left, vec![".idx2.building-cd34", "idx"]);
        std::fs::write(idx.join(".tmpAbC123"), "x").unwrap();
        std::fs::write(idx.join(".decoder.safetensors.77.link"), "x").unwrap();
        after_dead_writers(&idx).unwrap();
        assert_eq!(entries(&idx).unwrap(), vec![idx.join("manifest.json")]);
    }
}
