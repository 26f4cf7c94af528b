//! SQuAD-format QA files (`{"data": [{"title", "paragraphs": [{"context", "qas": [{"id",
//! "question", "answers": [{"text"}]}]}]}]}`), the format most QA sets ship in, read as
//! [`QaPair`]s plus their paragraphs, which `eval` indexes when no `--index_dir` is given.
//!
//! A file is SQuAD when its whole content is one JSON object with a `data` field (a QA JSONL file
//! holds one object per line, without `data`). Questions without answers (SQuAD 2.0's
//! `is_impossible`) are skipped and counted on stderr; answers are de-duplicated in order.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::Deserialize;

use crate::io::schema::QaPair;

/// A SQuAD file's questions and paragraphs.
#[derive(Debug, Clone, PartialEq)]
pub struct Squad {
    pub qas: Vec<QaPair>,
    pub paragraphs: Vec<Paragraph>,
    /// Questions skipped for having no answer.
    pub unanswerable: usize,
}

/// One paragraph: `id` is `data[D].paragraphs[P]`, unique in the file.
#[derive(Debug, Clone, PartialEq)]
pub struct Paragraph {
    pub id: String,
    pub title: Option<String>,
    pub context: String,
}

#[derive(Deserialize)]
struct File {
    data: Vec<Article>,
}

#[derive(Deserialize)]
struct Article {
    #[serde(default)]
    title: Option<String>,
    paragraphs: Vec<Para>,
}

#[derive(Deserialize)]
struct Para {
    context: String,
    #[serde(default)]
    qas: Vec<Qa>,
}

#[derive(Deserialize)]
struct Qa {
    #[serde(default)]
    id: Option<serde_json::Value>,
    question: String,
    #[serde(default)]
    answers: Vec<Answer>,
}

#[derive(Deserialize)]
struct Answer {
    text: String,
}

/// Read `path` as SQuAD when its content is one JSON object with `data`; `None` otherwise (then
/// it is a QA JSONL file). A SQuAD file of the wrong shape is an error naming the file.
pub fn read_if_squad(path: &Path) -> Result<Option<Squad>> {
    let text = crate::io::jsonio::read_utf8(path)?;
    let Ok(serde_json::Value::Object(obj)) = serde_json::from_str::<serde_json::Value>(&text)
    else {
        return Ok(None);
    };
    if !obj.contains_key("data") {
        return Ok(None);
    }
    let file: File = serde_json::from_value(serde_json::Value::Object(obj))
        .with_context(|| format!("{}: not a SQuAD-format file", path.display()))?;
    let squad = from_file(file);
    if squad.qas.is_empty() {
        bail!("{}: no answerable questions", path.display());
    }
    if squad.unanswerable > 0 {
        eprintln!(
            "refrag: skipped {} questions without answers in {}",
            squad.unanswerable,
            path.display()
        );
    }
    Ok(Some(squad))
}

fn from_file(file: File) -> Squad {
    let mut squad = Squad {
        qas: Vec::new(),
        paragraphs: Vec::new(),
        unanswerable: 0,
    };
    for (d, article) in file.data.into_iter().enumerate() {
        for (p, para) in article.paragraphs.into_iter().enumerate() {
            for (q, qa) in para.qas.into_iter().enumerate() {
                let mut answers: Vec<String> = Vec::new();
                for a in qa.answers {
                    if !a.text.trim().is_empty() && !answers.contains(&a.text) {
                        answers.push(a.text);
                    }
                }
                if answers.is_empty() {
                    squad.unanswerable += 1;
                    continue;
                }
                let id = match qa.id {
                    Some(serde_json::Value::String(s)) => s,
                    Some(v @ serde_json::Value::Number(_)) => v.to_string(),
                    _ => format!("{d}.{p}.{q}"),
                };
                squad.qas.push(QaPair {
                    id,
                    question: qa.question,
                    answers,
                });
            }
            squad.paragraphs.push(Paragraph {
                id: format!("data[{d}].paragraphs[{p}]"),
                title: article.title.clone(),
                context: para.context,
            });
        }
    }
    squad
}

/// Write the paragraphs as a `.jsonl` corpus (`id`, `title`, `text`) for `refrag index`.
pub fn write_corpus(paragraphs: &[Paragraph], path: &Path) -> Result<()> {
    let rows: Vec<serde_json::Value> = paragraphs
        .iter()
        .map(|p| serde_json::json!({"id": p.id, "title": p.title, "text": p.context}))
        .collect();
    crate::io::jsonio::write_atomic(path, crate::io::jsonio::to_jsonl(&rows)?.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn squad_is_told_from_jsonl_by_content() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("dev.json");
        std::fs::write(
            &p,
            r#"{"version": "v2", "data": [{"title": "Rivers", "paragraphs": [
                {"context": "River_4 flows through City_1.", "qas": [
                    {"id": "a", "question": "Which river?", "answers": [{"text": "River_4", "answer_start": 0}, {"text": "River_4"}]},
                    {"id": "b", "question": "Impossible?", "answers": [], "is_impossible": true}]},
                {"context": "No questions here.", "qas": []}]}]}"#,
        )
        .unwrap();
        let s = read_if_squad(&p).unwrap().unwrap();
        assert_eq!(s.qas.len(), 1);
        assert_eq!(s.qas[0].answers, ["River_4"]);
        assert_eq!(s.unanswerable, 1);
        assert_eq!(s.paragraphs.len(), 2);
        assert_eq!(s.paragraphs[1].id, "data[0].paragraphs[1]");
        let j = dir.path().join("qa.json");
        std::fs::write(&j, "{\"question\":\"q\",\"answers\":[\"a\"]}\n").unwrap();
        assert!(read_if_squad(&j).unwrap().is_none());
        std::fs::write(&j, "{\"data\": [{\"paragraphs\": 3}]}").unwrap();
        let e = format!("{:#}", read_if_squad(&j).unwrap_err());
        assert!(e.contains("qa.json: not a SQuAD-format file"), "{e}");
    }
}
