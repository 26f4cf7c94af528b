//! The file formats the commands read and write beside the corpus: question / answer pairs
//! (`rag_train.jsonl`, `rag_test.jsonl`, any QA JSONL) and continual-pretraining items
//! (`cpt_train.jsonl`). The synthetic generator ([`crate::synthetic`]) writes them; training and
//! evaluation read them from any source.

use serde::{Deserialize, Serialize};

/// One question and its accepted answers (a line of `rag_train.jsonl` / `rag_test.jsonl`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QaPair {
    /// The line number (1-based) when the file has no `id` (SQuAD-style files often do not).
    #[serde(default)]
    pub id: String,
    pub question: String,
    pub answers: Vec<String>,
}

/// Read a QA JSONL file (`question`, `answers`, optional `id`; other fields ignored); a pair
/// without an `id` gets its line number.
pub fn read_qa(path: &std::path::Path) -> anyhow::Result<Vec<QaPair>> {
    let rows: Vec<(usize, QaPair)> = crate::io::jsonio::read_jsonl_numbered(path)?;
    Ok(rows
        .into_iter()
        .map(|(line, mut row)| {
            if row.id.is_empty() {
                row.id = line.to_string();
            }
            row
        })
        .collect())
}

/// How a CPT text is cut: `s` decoder tokens of context, then `o` tokens of continuation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Split {
    pub s: usize,
    pub o: usize,
}

/// One continual-pretraining item (a line of `cpt_train.jsonl`). `tokens` is plain text; the key
/// name is the seed's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CptItem {
    pub id: String,
    pub tokens: String,
    pub split: Split,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qa_lines_without_id_get_their_line_number() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("qa.jsonl");
        std::fs::write(
            &p,
            "{\"question\":\"a?\",\"answers\":[\"x\"],\"title\":\"T\"}\n\n{\"id\":\"k\",\"question\":\"b?\",\"answers\":[\"y\"]}\n{\"question\":\"c?\",\"answers\":[\"z\"]}\n",
        )
        .unwrap();
        let ids: Vec<String> = read_qa(&p).unwrap().into_iter().map(|q| q.id).collect();
        assert_eq!(ids, ["1", "k", "4"]);
    }
}
