//! Retrieval recall@k of an index on a QA file, for dense, lexical and hybrid retrieval.
//!
//! A question counts as found when one of its top-k hits contains both the question's entity
//! (its `Kind_123` name, matched as a whole word) and one of its answer strings.
//!
//! ```text
//! refrag index --corpus data/corpus_large.txt --index_dir /tmp/idx
//! cargo run --example recall -- --index_dir /tmp/idx --rag_json data/rag_test.jsonl --topk 8
//! ```
//!
//! Prints one JSON line: `{"n": .., "topk": .., "dense": .., "lexical": .., "hybrid": ..}`.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use clap::Parser;
use refrag::retrieval::search::RetrievalMode;
use refrag::retrieval::search::Retriever;
use serde::Deserialize;

#[derive(Parser)]
struct Args {
    #[arg(long = "index_dir")]
    index_dir: PathBuf,
    /// JSONL with `question` and `answers`.
    #[arg(long = "rag_json")]
    rag_json: PathBuf,
    #[arg(long, default_value_t = 8)]
    topk: usize,
    /// Print the questions each mode misses.
    #[arg(long)]
    misses: bool,
}

#[derive(Deserialize)]
struct Qa {
    question: String,
    answers: Vec<String>,
}

/// Words shaped like `City_10004`: letters, `_`, digits.
fn entities(question: &str) -> Vec<&str> {
    question
        .split(|c: char| !(c.is_alphanumeric() || c == '_'))
        .filter(|w| {
            w.split_once('_').is_some_and(|(a, b)| {
                !a.is_empty()
                    && a.chars().all(char::is_alphabetic)
                    && !b.is_empty()
                    && b.chars().all(|c| c.is_ascii_digit())
            })
        })
        .collect()
}

/// `word` occurs in `text` not followed or preceded by another word character.
fn has_word(text: &str, word: &str) -> bool {
    let is_word = |c: char| c.is_alphanumeric() || c == '_';
    text.match_indices(word).any(|(at, _)| {
        let before = text[..at].chars().next_back();
        let after = text[at + word.len()..].chars().next();
        !before.is_some_and(is_word) && !after.is_some_and(is_word)
    })
}

fn found(qa: &Qa, texts: &[&str]) -> bool {
    let ents = entities(&qa.question);
    texts.iter().any(|t| {
        ents.iter().all(|e| has_word(t, e)) && qa.answers.iter().any(|a| t.contains(a.as_str()))
    })
}

fn main() -> Result<()> {
    let args = Args::parse();
    let qas: Vec<Qa> = refrag::io::jsonio::read_jsonl(&args.rag_json)?;
    let retriever = Retriever::open(&args.index_dir, None, &candle_core::Device::Cpu)?;
    let questions: Vec<&str> = qas.iter().map(|q| q.question.as_str()).collect();
    let mut out = serde_json::json!({"n": qas.len(), "topk": args.topk});
    for (name, mode) in [
        ("dense", RetrievalMode::Dense),
        ("lexical", RetrievalMode::Lexical),
        ("hybrid", RetrievalMode::Hybrid),
    ] {
        let start = Instant::now();
        let mut hit = 0usize;
        for (chunk, qa_chunk) in questions.chunks(64).zip(qas.chunks(64)) {
            for (hits, qa) in retriever
                .retrieve_many(chunk, args.topk, mode)?
                .iter()
                .zip(qa_chunk)
            {
                let texts: Vec<&str> = hits.iter().map(|h| h.text.as_str()).collect();
                if found(qa, &texts) {
                    hit += 1;
                } else if args.misses {
                    eprintln!("{name} miss: {}", qa.question);
                }
            }
        }
        let secs = start.elapsed().as_secs_f64();
        eprintln!(
            "{name}: recall@{} = {hit}/{} ({:.1} ms/question)",
            args.topk,
            qas.len(),
            1e3 * secs / qas.len() as f64
        );
        out[name] = serde_json::json!((hit as f64 / qas.len() as f64 * 1e4).round() / 1e4);
    }
    println!("{out}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entity_matching() {
        assert_eq!(
            entities("Which river flows through City_10004?"),
            vec!["City_10004"]
        );
        assert!(has_word("near City_10004.", "City_10004"));
        assert!(!has_word("near City_100045.", "City_10004"));
        let qa = Qa {
            question: "Where is Person_7?".into(),
            answers: vec!["Inst_1".into()],
        };
        assert!(found(&qa, &["x", "Person_7 is at Inst_1."]));
        assert!(!found(&qa, &["Person_70 is at Inst_1."]));
    }
}
