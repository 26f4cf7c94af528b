//! `refrag search`: retrieve passages for a question and print them with scores as JSON.
//!
//! Output (stdout): `{"question": .., "retrieval": "hybrid", "hits": [{"rank", "id", "score",
//! "text", "dense_rank"?, "lexical_rank"?, "source", "title"?, "span"}, ..]}` (`span`: the
//! passage's characters `[start, end)` in its source; the three source fields are absent for an
//! index built before documents); ranks are 1-based, `id` is the passage's id in
//! the index. With `--questions FILE`, one such object per question and line, compact, with the
//! question's `id` and `line` first ([`super::questions`]); the index is opened once.

use anyhow::{bail, Result};
use serde::Serialize;

use crate::cli::{RetrievalMode, SearchArgs};
use crate::retrieval::index::PassageSource;
use crate::retrieval::search::{Hit, Retriever};

use super::questions;

#[derive(Serialize)]
struct SearchOutput {
    question: String,
    retrieval: RetrievalMode,
    hits: Vec<RankedHit>,
}

#[derive(Serialize)]
struct RankedHit {
    rank: usize,
    #[serde(flatten)]
    hit: Hit,
    /// `source`, `title`?, `span` (absent for an index built before documents).
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    source: Option<PassageSource>,
}

pub fn run(args: &SearchArgs) -> Result<()> {
    let r = &args.retrieve;
    if args.out.is_some() && args.questions.is_none() {
        bail!("--out writes the answers of --questions FILE; without it the answer goes to stdout");
    }
    let batch = match (&args.question, &args.questions) {
        (Some(q), _) => {
            if q.trim().is_empty() {
                bail!("--question is empty");
            }
            None
        }
        (None, Some(path)) => {
            let qs = questions::read(path)?;
            for q in &qs {
                crate::limits::check_question(&q.text, &questions::what(path, q))?;
            }
            Some((path, qs, questions::Sink::create(args.out.as_deref())?))
        }
        (None, None) => bail!("give --question or --questions"),
    };
    let device = crate::device::select(args.runtime.device)?;
    let retriever = Retriever::open(&r.index_dir, args.embed.embed_model.as_deref(), &device)?;
    let search = |question: &str| -> Result<SearchOutput> {
        let hits = retriever.retrieve(question, r.topk, r.retrieval)?;
        Ok(SearchOutput {
            question: question.to_string(),
            retrieval: r.retrieval,
            hits: hits
                .into_iter()
                .enumerate()
                .map(|(i, hit)| RankedHit {
                    rank: i + 1,
                    source: retriever.source(hit.id).cloned(),
                    hit,
                })
                .collect(),
        })
    };
    match batch {
        None => {
            let q = args.question.as_deref().unwrap_or_default();
            println!("{}", serde_json::to_string_pretty(&search(q)?)?);
        }
        Some((path, qs, mut sink)) => {
            questions::answer_all(&qs, path, &mut sink, args.runtime.quiet, "search", search)?;
            sink.finish()?;
        }
    }
    Ok(())
}
