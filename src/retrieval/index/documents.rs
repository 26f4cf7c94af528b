//! Reading a corpus of documents for `refrag index`: a file or a directory (recursive, sorted) of
//! `.txt`, `.md` and `.jsonl` files, cut into passages that each remember their source.
//!
//! The rules (also in the README's index section):
//! - A `.txt` file is read one passage per line, exactly as before documents existed (blank lines
//!   skipped and counted, or refused with `--strict`), unless it is a document: it has a blank
//!   line and a paragraph of two or more lines (hard-wrapped prose), or a blank line and a line
//!   over `--passage_tokens` retrieval-model tokens (one paragraph per line), or is one line over
//!   the budget. So the seed's format (no blank lines, any line length) stays line per passage.
//!   Every `.md` file is one document.
//! - A `.jsonl` file holds one document per line: `text` (required), `id` (string or integer)
//!   and `title` (optional); a record without an `id` is named `FILE:LINE`.
//! - A document is cut at blank lines into paragraphs; whole paragraphs are packed into passages
//!   of at most `--passage_tokens` tokens. A paragraph longer than that is cut at sentence ends
//!   (`.`, `!`, `?` and their CJK forms, before white space), the next passage repeating up to
//!   `--passage_overlap` tokens of whole sentences; a sentence longer than the budget is cut into
//!   windows of `--passage_tokens` tokens overlapping by `--passage_overlap`.
//! - Every passage's text is exactly `source_text[span]`, the span `[start, end)` counted in
//!   characters (Unicode scalar values) of the file (`.txt`/`.md`) or of the record's `text`.
//! - In a directory, other files are skipped and counted on stderr and names starting with `.`
//!   are ignored; a file given as `--corpus` itself is read as `.txt` whatever its extension.

use std::path::{Path, PathBuf};

pub use super::split::Splitter;
use super::split::{char_offsets, lines};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

/// Where a passage comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PassageSource {
    /// The file's path relative to `--corpus` (its name when `--corpus` is a file), or the
    /// `.jsonl` record's `id` (`FILE:LINE` without one).
    pub source: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    /// Characters `[start, end)` of the source text.
    pub span: [usize; 2],
}

/// One passage and its source.
#[derive(Debug, Clone, PartialEq)]
pub struct SourcedPassage {
    pub text: String,
    pub source: PassageSource,
}

/// One document: a file, or a record of a `.jsonl` file.
#[derive(Debug, Clone, PartialEq)]
pub struct Document {
    /// [`PassageSource::source`] of its passages; unique in a corpus.
    pub source: String,
    /// Hex sha256 of its content (the file's bytes, or the record's line).
    pub sha256: String,
    pub passages: Vec<SourcedPassage>,
}

/// Passages of `text` at byte ranges `ranges`, with their source.
fn sourced(
    text: &str,
    ranges: &[(usize, usize)],
    source: &str,
    title: Option<&str>,
) -> Vec<SourcedPassage> {
    let flat: Vec<usize> = ranges.iter().flat_map(|&(s, e)| [s, e]).collect();
    let chars = char_offsets(text, &flat);
    ranges
        .iter()
        .zip(chars.chunks(2))
        .map(|(&(s, e), c)| SourcedPassage {
            text: text[s..e].to_string(),
            source: PassageSource {
                source: source.to_string(),
                title: title.map(str::to_string),
                span: [c[0], c[1]],
            },
        })
        .collect()
}

fn sha256_hex(bytes: &[u8]) -> String {
    format!("{:x}", Sha256::digest(bytes))
}

/// What reading a corpus found.
#[derive(Debug, Default)]
pub struct Corpus {
    pub documents: Vec<Document>,
    /// Files skipped for their extension.
    pub skipped_files: usize,
}

impl Corpus {
    /// All passages, in document order.
    pub fn passages(&self) -> impl Iterator<Item = &SourcedPassage> {
        self.documents.iter().flat_map(|d| &d.passages)
    }
}

/// The readable files under `root` (itself when a file), sorted by relative path, and the count of
/// other files.
fn corpus_files(root: &Path) -> Result<(Vec<PathBuf>, usize)> {
    if !root.exists() {
        bail!("--corpus {}: no such file or directory", root.display());
    }
    if !root.is_dir() {
        return Ok((vec![root.to_path_buf()], 0));
    }
    let (mut files, mut skipped) = (Vec::new(), 0);
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let entries =
            std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))?;
        for e in entries {
            let e = e.with_context(|| format!("reading {}", dir.display()))?;
            let path = e.path();
            if e.file_name().to_string_lossy().starts_with('.') {
                continue;
            }
            let ft = e.file_type()?;
            if ft.is_dir() {
                stack.push(path);
            } else if kind(&path).is_some() {
                files.push(path);
            } else {
                skipped += 1;
            }
        }
    }
    files.sort();
    Ok((files, skipped))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Txt,
    Md,
    Jsonl,
}

fn kind(path: &Path) -> Option<Kind> {
    match path.extension()?.to_str()? {
        "txt" => Some(Kind::Txt),
        "md" | "markdown" => Some(Kind::Md),
        "jsonl" => Some(Kind::Jsonl),
        _ => None,
    }
}

/// Read `--corpus` (a file or a directory) into documents and passages. Messages about skipped
/// blank lines and files go to stderr.
pub fn read(root: &Path, splitter: &Splitter, strict: bool) -> Result<Corpus> {
    let (files, skipped_files) = corpus_files(root)?;
    let mut corpus = Corpus {
        skipped_files,
        ..Corpus::default()
    };
    for path in &files {
        let name = if root.is_dir() {
            path.strip_prefix(root).unwrap_or(path)
        } else {
            Path::new(path.file_name().unwrap_or(path.as_os_str()))
        };
        let name = name.to_string_lossy().replace('\\', "/");
        // A file named by --corpus itself is text whatever its extension (as before documents).
        match kind(path).unwrap_or(Kind::Txt) {
            Kind::Jsonl => corpus.documents.extend(read_jsonl(path, &name, splitter)?),
            k => corpus
                .documents
                .push(read_text(path, &name, k, splitter, strict)?),
        }
    }
    let mut seen = std::collections::HashSet::new();
    for d in &corpus.documents {
        if !seen.insert(d.source.as_str()) {
            bail!(
                "--corpus {}: two documents named '{}'; give each .jsonl record a unique id",
                root.display(),
                d.source
            );
        }
    }
    if skipped_files > 0 {
        let s = if skipped_files == 1 { "" } else { "s" };
        eprintln!(
            "refrag: skipped {skipped_files} file{s} in {}: not .txt, .md or .jsonl",
            root.display()
        );
    }
    if corpus.passages().next().is_none() {
        bail!("{}: empty corpus (no passages)", root.display());
    }
    Ok(corpus)
}

/// A `.txt` or `.md` file: one passage per line when it is a `.txt` whose lines all fit, else a
/// document.
fn read_text(
    path: &Path,
    name: &str,
    kind: Kind,
    splitter: &Splitter,
    strict: bool,
) -> Result<Document> {
    let text = crate::io::jsonio::read_utf8(path)?;
    let sha256 = sha256_hex(text.as_bytes());
    let line_corpus = kind == Kind::Txt && !is_document(&text, splitter)?;
    let ranges = if line_corpus {
        line_passages(path, &text, strict)?
    } else {
        splitter.split(&text)?
    };
    let title = (kind == Kind::Md)
        .then(|| {
            text.lines()
                .find_map(|l| l.strip_prefix("# ").map(|t| t.trim().to_string()))
        })
        .flatten();
    Ok(Document {
        source: name.to_string(),
        sha256,
        passages: sourced(&text, &ranges, name, title.as_deref()),
    })
}

/// Whether a `.txt` file is a document rather than one passage per line: it has a paragraph of
/// two or more lines and a blank line (hard-wrapped prose), or a blank line and a line over the
/// budget (one paragraph per line), or a single line over the budget.
fn is_document(text: &str, splitter: &Splitter) -> Result<bool> {
    let (mut blank, mut multi, mut run, mut lines_seen) = (false, false, 0, 0);
    for (s, e) in lines(text) {
        if text[s..e].trim().is_empty() {
            (blank, run) = (true, 0);
        } else {
            (run, lines_seen) = (run + 1, lines_seen + 1);
            multi |= run >= 2;
        }
    }
    if blank && multi {
        return Ok(true);
    }
    if !blank && lines_seen > 1 {
        return Ok(false);
    }
    for (s, e) in lines(text) {
        if splitter.count(&text[s..e])? > splitter.max_tokens {
            return Ok(true);
        }
    }
    Ok(false)
}

/// The seed's format: every non-blank line a passage, as [`crate::io::jsonio::read_corpus`] reads.
fn line_passages(path: &Path, text: &str, strict: bool) -> Result<Vec<(usize, usize)>> {
    let (out, blank) = crate::io::jsonio::corpus_lines(path, text, strict)?;
    crate::io::jsonio::note_blank_lines(blank, path);
    Ok(out)
}

/// A `.jsonl` file: one document per record.
fn read_jsonl(path: &Path, name: &str, splitter: &Splitter) -> Result<Vec<Document>> {
    let text = crate::io::jsonio::read_utf8(path)?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = || format!("{}:{}", path.display(), i + 1);
        let v: Value = serde_json::from_str(line)
            .context("malformed JSONL line")
            .with_context(at)?;
        let Some(Value::String(body)) = v.get("text") else {
            bail!("{}: no \"text\" string", at());
        };
        let source = match v.get("id") {
            None | Some(Value::Null) => format!("{name}:{}", i + 1),
            Some(Value::String(s)) => s.clone(),
            Some(Value::Number(x)) if x.is_u64() || x.is_i64() => x.to_string(),
            Some(other) => bail!(
                "{}: \"id\" must be a string or an integer, got {other}",
                at()
            ),
        };
        let title = match v.get("title") {
            None | Some(Value::Null) => None,
            Some(Value::String(t)) => Some(t.as_str()),
            Some(other) => bail!("{}: \"title\" must be a string, got {other}", at()),
        };
        let ranges = splitter.split(body)?;
        out.push(Document {
            passages: sourced(body, &ranges, &source, title),
            source,
            sha256: sha256_hex(line.as_bytes()),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    use super::super::split::test_splitter as splitter;

    #[test]
    fn txt_files_are_lines_unless_they_look_like_prose() {
        let (_d, sp) = splitter(8, 2);
        let long = "river ".repeat(20);
        let cases = [
            ("a b\nc d\n".to_string(), false),
            (format!("{long}\n{long}\n"), false), // the seed's format, long lines
            ("a b\n\nc d\n".to_string(), false),
            ("a b\nc d\n\ne f\n".to_string(), true), // hard-wrapped paragraphs
            (format!("{long}\n\ne f\n"), true),      // one paragraph per line
            (format!("{long}\n"), true),
        ];
        for (text, doc) in cases {
            assert_eq!(is_document(&text, &sp).unwrap(), doc, "{text:?}");
        }
    }

    #[test]
    fn directory_of_mixed_files() {
        let (_d, sp) = splitter(16, 4);
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        std::fs::create_dir_all(r.join("sub/.hidden")).unwrap();
        std::fs::write(r.join("lines.txt"), "a b\n\nc d\n").unwrap();
        std::fs::write(r.join("sub/doc.md"), "# Rivers\n\nthe river. the city.\n").unwrap();
        std::fs::write(
            r.join("sub/recs.jsonl"),
            "{\"id\":7,\"title\":\"T\",\"text\":\"é river\"}\n{\"text\":\"city\"}\n",
        )
        .unwrap();
        std::fs::write(r.join("image.png"), "x").unwrap();
        std::fs::write(r.join("sub/.hidden/x.txt"), "x").unwrap();
        let c = read(r, &sp, false).unwrap();
        assert_eq!(c.skipped_files, 1);
        let names: Vec<&str> = c.documents.iter().map(|d| d.source.as_str()).collect();
        assert_eq!(names, ["lines.txt", "sub/doc.md", "7", "sub/recs.jsonl:2"]);
        let p: Vec<&SourcedPassage> = c.passages().collect();
        assert_eq!(p.len(), 5);
        assert_eq!((p[1].text.as_str(), p[1].source.span), ("c d", [5, 8]));
        assert_eq!(p[2].source.title.as_deref(), Some("Rivers"));
        assert_eq!(p[3].source.span, [0, 7]);
        assert!(read(r, &sp, true).is_err()); // the blank line of lines.txt
                                              // A file given as --corpus is read as text whatever its extension.
        let one = read(&r.join("image.png"), &sp, false).unwrap();
        assert_eq!(one.passages().next().unwrap().text, "x");
        std::fs::write(
            r.join("sub/recs.jsonl"),
            "{\"id\":\"sub/doc.md\",\"text\":\"x\"}\n",
        )
        .unwrap();
        let e = format!("{:#}", read(r, &sp, false).unwrap_err());
        assert!(e.contains("two documents named 'sub/doc.md'"), "{e}");
        std::fs::write(r.join("sub/recs.jsonl"), "{\"txt\":\"x\"}\n").unwrap();
        let e = format!("{:#}", read(r, &sp, false).unwrap_err());
        assert!(e.contains("recs.jsonl:1: no \"text\" string"), "{e}");
    }
}
