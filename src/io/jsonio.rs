//! Reading and writing the project's files: corpora (one passage per line), JSONL with errors that
//! name the file and line, and atomic writes (temporary file, then rename) so that an interrupted
//! run never leaves a half-written output behind.

use std::io::Write;
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Read a text file as UTF-8, naming the file and the line of the first invalid byte.
pub fn read_utf8(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    match String::from_utf8(bytes) {
        Ok(s) => Ok(s),
        Err(e) => {
            let at = e.utf8_error().valid_up_to();
            let line = e.as_bytes()[..at].iter().filter(|&&b| b == b'\n').count() + 1;
            bail!("{}:{line}: invalid UTF-8", path.display())
        }
    }
}

/// Read a corpus: one passage per line, blank (or whitespace-only) lines skipped with their count
/// on stderr; with `strict` a blank line is an error naming the file and line. A final newline is
/// fine; an empty file (or one of blank lines only) or invalid UTF-8 is an error naming the file.
/// A passage's id is its position among the passages read (0-based), so blank lines take no id.
pub fn read_corpus(path: &Path, strict: bool) -> Result<Vec<String>> {
    let (passages, blank) = read_corpus_counted(path, strict)?;
    note_blank_lines(blank, path);
    Ok(passages)
}

/// The seed's corpus format in `text` (read from `path`): the byte ranges of its non-blank lines
/// (one passage each, without the line ending) and the number of blank lines skipped; with
/// `strict` a blank line is an error naming the file and line.
pub fn corpus_lines(path: &Path, text: &str, strict: bool) -> Result<(Vec<(usize, usize)>, usize)> {
    let mut out = Vec::new();
    let (mut blank, mut at) = (0, 0);
    for (i, l) in text.split_inclusive('\n').enumerate() {
        let (s, body) = (at, l.trim_end_matches(['\n', '\r']));
        at += l.len();
        if body.trim().is_empty() {
            if strict {
                bail!(
                    "{}:{}: blank line (--strict: a corpus holds one passage per line)",
                    path.display(),
                    i + 1
                );
            }
            blank += 1;
        } else {
            out.push((s, s + body.len()));
        }
    }
    Ok((out, blank))
}

/// Say on stderr that `blank` blank lines of `path` were skipped (nothing when none were).
pub fn note_blank_lines(blank: usize, path: &Path) {
    if blank > 0 {
        let s = if blank == 1 { "" } else { "s" };
        eprintln!(
            "refrag: skipped {blank} blank line{s} in {}",
            path.display()
        );
    }
}

/// [`read_corpus`] without the message: the passages and the number of blank lines skipped.
pub fn read_corpus_counted(path: &Path, strict: bool) -> Result<(Vec<String>, usize)> {
    let text = read_utf8(path)?;
    let (ranges, blank) = corpus_lines(path, &text, strict)?;
    let passages: Vec<String> = ranges
        .iter()
        .map(|&(s, e)| text[s..e].to_string())
        .collect();
    if passages.is_empty() {
        bail!("{}: empty corpus (no passages)", path.display());
    }
    Ok((passages, blank))
}

/// Read a JSONL file into typed records; a malformed line is an error naming file and line.
/// Blank lines are skipped. An empty file is an error.
pub fn read_jsonl<T: DeserializeOwned>(path: &Path) -> Result<Vec<T>> {
    Ok(read_jsonl_numbered(path)?
        .into_iter()
        .map(|(_, row)| row)
        .collect())
}

/// [`read_jsonl`], each record with its 1-based line number.
pub fn read_jsonl_numbered<T: DeserializeOwned>(path: &Path) -> Result<Vec<(usize, T)>> {
    let text = read_utf8(path)?;
    let mut rows = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let row = serde_json::from_str(line)
            .with_context(|| format!("{}:{}: malformed JSONL line", path.display(), i + 1))?;
        rows.push((i + 1, row));
    }
    if rows.is_empty() {
        bail!("{}: no records", path.display());
    }
    Ok(rows)
}

/// Write `bytes` to `path` atomically: a temporary file in the same directory, then a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut builder = tempfile::Builder::new();
    #[cfg(unix)]
    {
        // Outputs are ordinary data files, not secrets: rw-r--r-- like any file we'd create.
        use std::os::unix::fs::PermissionsExt;
        builder.permissions(std::fs::Permissions::from_mode(0o644));
    }
    let mut tmp = builder
        .tempfile_in(dir)
        .with_context(|| format!("creating a temporary file in {}", dir.display()))?;
    tmp.write_all(bytes)
        .with_context(|| format!("writing {}", path.display()))?;
    tmp.persist(path)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Serialize records as JSONL (one compact object per line).
pub fn to_jsonl<T: Serialize>(rows: &[T]) -> Result<String> {
    let mut out = String::new();
    for row in rows {
        out.push_str(&serde_json::to_string(row)?);
        out.push('\n');
    }
    Ok(out)
}

/// Write a pretty JSON file atomically.
pub fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let mut s = serde_json::to_string_pretty(value)?;
    s.push('\n');
    write_atomic(path, s.as_bytes())
}

/// Read a JSON file into a typed value, naming the file on error.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text = read_utf8(path)?;
    serde_json::from_str(&text).with_context(|| format!("{}: malformed JSON", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn corpus_errors_name_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.txt");
        std::fs::write(&p, "a\n\nb\n").unwrap();
        let e = format!("{:#}", read_corpus(&p, true).unwrap_err());
        assert!(e.contains("c.txt:2: blank line"), "{e}");
        std::fs::write(&p, "").unwrap();
        assert!(format!("{:#}", read_corpus(&p, false).unwrap_err()).contains("empty corpus"));
        std::fs::write(&p, " \n\t\n").unwrap();
        assert!(format!("{:#}", read_corpus(&p, false).unwrap_err()).contains("empty corpus"));
        std::fs::write(&p, b"ok\n\xff\n").unwrap();
        let e = format!("{:#}", read_corpus(&p, false).unwrap_err());
        assert!(e.contains("c.txt:2: invalid UTF-8"), "{e}");
        std::fs::write(&p, "one\r\ntwo").unwrap();
        assert_eq!(read_corpus(&p, true).unwrap(), vec!["one", "two"]);
    }

    #[test]
    fn blank_corpus_lines_are_skipped_and_counted() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.txt");
        std::fs::write(&p, "\na\n  \r\nb\n\t\n\nc\n\n").unwrap();
        let (passages, blank) = read_corpus_counted(&p, false).unwrap();
        assert_eq!(passages, vec!["a", "b", "c"]); // ids 0, 1, 2: blank lines take none
        assert_eq!(blank, 5);
        assert!(read_corpus_counted(&p, true).is_err());
    }

    #[test]
    fn jsonl_error_names_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("q.jsonl");
        std::fs::write(&p, "{\"a\":1}\n{\"a\":\n").unwrap();
        let e = format!("{:#}", read_jsonl::<serde_json::Value>(&p).unwrap_err());
        assert!(e.contains("q.jsonl:2: malformed JSONL line"), "{e}");
    }

    #[test]
    fn atomic_write_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.json");
        write_atomic(&p, b"1").unwrap();
        write_atomic(&p, b"2").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"2");
    }
}
