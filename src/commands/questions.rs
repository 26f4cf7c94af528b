//! `--questions FILE` of `generate` and `search`: many questions answered with the models loaded
//! once, one compact JSON object per question and line, on stdout or in `--out` (a temporary file
//! beside it, renamed at the end, so an interrupted run never leaves a half file in place of an
//! old one).
//!
//! FILE is JSONL (`.jsonl` / `.json`: one object per line with a `question` string and an
//! optional `id`, string or integer; other fields ignored) or plain text (any other extension:
//! one question per line). Blank lines are skipped and counted on stderr. A question without an
//! `id` gets its 1-based line number.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde::Serialize;
use serde_json::Value;

/// One question of a `--questions` file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Question {
    /// Its `id` field, else its line number.
    pub id: String,
    /// Its line in the file, 1-based.
    pub line: usize,
    pub text: String,
}

/// Whether `path` is read as JSONL (by its extension, as the CPT readers decide).
pub fn is_jsonl(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("jsonl" | "json")
    )
}

/// Read a questions file, with the count of blank lines skipped on stderr.
pub fn read(path: &Path) -> Result<Vec<Question>> {
    let (questions, blank) = read_counted(path)?;
    if blank > 0 {
        let s = if blank == 1 { "" } else { "s" };
        eprintln!(
            "refrag: skipped {blank} blank line{s} in {}",
            path.display()
        );
    }
    Ok(questions)
}

/// [`read`] without the message: the questions and the number of blank lines skipped.
pub fn read_counted(path: &Path) -> Result<(Vec<Question>, usize)> {
    let text = crate::io::jsonio::read_utf8(path)?;
    let jsonl = is_jsonl(path);
    let mut out = Vec::new();
    let mut blank = 0;
    for (i, line) in text.lines().enumerate() {
        let (n, line) = (i + 1, line.trim_end_matches('\r'));
        if line.trim().is_empty() {
            blank += 1;
            continue;
        }
        let at = || format!("{}:{n}", path.display());
        out.push(if jsonl {
            parse_jsonl_line(line, n).with_context(at)?
        } else {
            Question {
                id: n.to_string(),
                line: n,
                text: line.to_string(),
            }
        });
    }
    if out.is_empty() {
        bail!("--questions {}: no questions", path.display());
    }
    Ok((out, blank))
}

fn parse_jsonl_line(line: &str, n: usize) -> Result<Question> {
    let v: Value = serde_json::from_str(line).context("malformed JSONL line")?;
    let Value::Object(obj) = v else {
        bail!("not a JSON object (JSONL: one object with a \"question\" per line)");
    };
    let Some(Value::String(text)) = obj.get("question") else {
        bail!("no \"question\" string");
    };
    let id = match obj.get("id") {
        None | Some(Value::Null) => n.to_string(),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(x)) if x.is_u64() || x.is_i64() => x.to_string(),
        Some(other) => bail!("\"id\" must be a string or an integer, got {other}"),
    };
    Ok(Question {
        id,
        line: n,
        text: text.clone(),
    })
}

/// How a question is named in an error: `FILE:LINE: question`.
pub fn what(path: &Path, q: &Question) -> String {
    format!("{}:{}: question", path.display(), q.line)
}

/// One output line: the question's id and line, then the single-question output's fields.
#[derive(Serialize)]
struct Line<'a, T: Serialize> {
    id: &'a str,
    line: usize,
    #[serde(flatten)]
    record: T,
}

/// Where the lines go: stdout, or a temporary file beside `--out` that [`Sink::finish`] renames.
pub struct Sink {
    file: Option<(tempfile::NamedTempFile, PathBuf)>,
}

impl Sink {
    /// Open the output (before any model loads, so an unwritable `--out` fails at once).
    pub fn create(out: Option<&Path>) -> Result<Self> {
        let Some(path) = out else {
            return Ok(Self { file: None });
        };
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let prefix = format!(".{name}.");
        let mut builder = tempfile::Builder::new();
        builder.prefix(&prefix).suffix(".partial");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            builder.permissions(std::fs::Permissions::from_mode(0o644));
        }
        let tmp = builder
            .tempfile_in(dir)
            .with_context(|| format!("--out {}: creating a temporary file", path.display()))?;
        Ok(Self {
            file: Some((tmp, path.to_path_buf())),
        })
    }

    fn write_line(&mut self, line: &str) -> Result<()> {
        match &mut self.file {
            None => {
                let mut out = std::io::stdout().lock();
                writeln!(out, "{line}")?;
                out.flush()?;
            }
            Some((tmp, path)) => writeln!(tmp, "{line}")
                .with_context(|| format!("writing --out {}", path.display()))?,
        }
        Ok(())
    }

    /// Put the finished output in place (nothing to do for stdout).
    pub fn finish(self) -> Result<()> {
        if let Some((mut tmp, path)) = self.file {
            tmp.flush()?;
            tmp.as_file().sync_all()?;
            tmp.persist(&path)
                .with_context(|| format!("writing --out {}", path.display()))?;
        }
        Ok(())
    }
}

/// Answer every question in order with `answer`, one line each into `sink`, with a progress bar
/// on stderr (hidden by `--quiet`) and the wall time on stderr at the end. An error names the
/// question's file and line.
pub fn answer_all<T: Serialize>(
    questions: &[Question],
    path: &Path,
    sink: &mut Sink,
    quiet: bool,
    command: &str,
    mut answer: impl FnMut(&str) -> Result<T>,
) -> Result<()> {
    let bar = crate::progress::bar(
        questions.len(),
        quiet,
        &format!("{command} {{bar:40}} {{pos}}/{{len}} questions [{{elapsed_precise}} < {{eta_precise}}]"),
    );
    let t = Instant::now();
    for q in questions {
        let record = answer(&q.text).with_context(|| what(path, q))?;
        let line = serde_json::to_string(&Line {
            id: &q.id,
            line: q.line,
            record,
        })?;
        bar.suspend(|| sink.write_line(&line))?;
        bar.inc(1);
    }
    bar.finish_and_clear();
    if !quiet {
        let secs = t.elapsed().as_secs_f64();
        eprintln!(
            "refrag: {command}: {} questions in {secs:.2} s ({:.3} s each, models loaded once)",
            questions.len(),
            secs / questions.len() as f64
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jsonl_and_plain_text_with_ids_and_blank_lines() {
        let dir = tempfile::tempdir().unwrap();
        let j = dir.path().join("q.jsonl");
        std::fs::write(
            &j,
            "{\"id\":\"a\",\"question\":\"one?\",\"answers\":[]}\n\n{\"question\":\"two?\"}\n{\"id\":7,\"question\":\"three?\"}\n",
        )
        .unwrap();
        let (qs, blank) = read_counted(&j).unwrap();
        assert_eq!(blank, 1);
        let ids: Vec<(&str, usize, &str)> = qs
            .iter()
            .map(|q| (q.id.as_str(), q.line, q.text.as_str()))
            .collect();
        assert_eq!(
            ids,
            vec![("a", 1, "one?"), ("3", 3, "two?"), ("7", 4, "three?")]
        );
        let t = dir.path().join("q.txt");
        std::fs::write(&t, "one?\r\n  \nthree?").unwrap();
        let (qs, blank) = read_counted(&t).unwrap();
        assert_eq!(blank, 1);
        assert_eq!(qs[1].id, "3");
        assert_eq!(qs[1].text, "three?");
    }

    #[test]
    fn bad_lines_name_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let j = dir.path().join("q.jsonl");
        for (text, needle) in [
            (
                "{\"question\":\"ok\"}\n{\"question\":",
                "q.jsonl:2: malformed JSONL line",
            ),
            ("{\"q\":\"ok\"}\n", "q.jsonl:1: no \"question\" string"),
            ("[1]\n", "q.jsonl:1: not a JSON object"),
            (
                "{\"question\":\"a\",\"id\":[1]}\n",
                "q.jsonl:1: \"id\" must be",
            ),
            ("\n \n", "no questions"),
        ] {
            std::fs::write(&j, text).unwrap();
            let e = format!("{:#}", read_counted(&j).unwrap_err());
            assert!(e.contains(needle), "{e}");
        }
    }

    #[test]
    fn out_file_appears_only_when_finished() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("answers.jsonl");
        std::fs::write(&out, "old\n").unwrap();
        let qs = vec![Question {
            id: "x".into(),
            line: 1,
            text: "q".into(),
        }];
        let mut sink = Sink::create(Some(&out)).unwrap();
        answer_all(&qs, &out, &mut sink, true, "t", |q| {
            Ok(serde_json::json!({ "question": q }))
        })
        .unwrap();
        assert_eq!(std::fs::read_to_string(&out).unwrap(), "old\n");
        sink.finish().unwrap();
        assert_eq!(
            std::fs::read_to_string(&out).unwrap(),
            "{\"id\":\"x\",\"line\":1,\"question\":\"q\"}\n"
        );
        // A failed run drops its temporary file and leaves the old output.
        let mut sink = Sink::create(Some(&out)).unwrap();
        let e = answer_all(&qs, &out, &mut sink, true, "t", |_| -> Result<Value> {
            bail!("boom")
        })
        .unwrap_err();
        assert!(format!("{e:#}").contains("answers.jsonl:1: question: boom"));
        drop(sink);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        assert!(std::fs::read_to_string(&out)
            .unwrap()
            .starts_with("{\"id\""));
    }
}
