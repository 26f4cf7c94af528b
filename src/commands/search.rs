//! `refrag search`: retrieve passages for a question and print them with scores as JSON.
//!
//! Output (stdout): `{"question": .., "retrieval": "hybrid", "hits": [{"rank", "id", "score",
//! "text", "dense_rank"?, "lexical_rank"?}, ..]}`; ranks are 1-based.

use anyhow::{bail, Result};
use serde::Serialize;

use crate::cli::{RetrievalMode, SearchArgs};
use crate::retrieve::{Hit, Retriever};

#[derive(Serialize)]
struct SearchOutput<'a> {
    question: &'a str,
    retrieval: RetrievalMode,
    hits: Vec<RankedHit>,
}

#[derive(Serialize)]
struct RankedHit {
    rank: usize,
    #[serde(flatten)]
    hit: Hit,
}

pub fn run(args: &SearchArgs) -> Result<()> {
    let r = &args.retrieve;
    if r.topk == 0 {
        bail!("--topk must be at least 1");
    }
    if args.question.trim().is_empty() {
        bail!("--question is empty");
    }
    let device = crate::device::select(args.runtime.device)?;
    let retriever = Retriever::open(&r.index_dir, args.embed.embed_model.as_deref(), &device)?;
    let hits = retriever.retrieve(&args.question, r.topk, r.retrieval)?;
    let out = SearchOutput {
        question: &args.question,
        retrieval: r.retrieval,
        hits: hits
            .into_iter()
            .enumerate()
            .map(|(i, hit)| RankedHit { rank: i + 1, hit })
            .collect(),
    };
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}
