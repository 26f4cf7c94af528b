//! Question/answer data for `sft` and `train_policy`: the pairs of `--rag_json` (the last
//! `eval_items` held out), their retrieved passages (the same [`Retriever`] `generate` uses,
//! fetched once per question), and the decoder input laid out exactly as `generate` lays it
//! out ([`crate::pipeline::question_layout`]: the chat template, passages cut in chunks of `k`,
//! capped at `ctx_max`) with the gold answer and the end-of-turn token as targets.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context, Result};

use super::seq::Seq;
use crate::compression::prompt::{chunk_tokens, PromptLayout};
use crate::decoder::DecoderTokenizer;
use crate::io::schema::QaPair;
use crate::retrieval::search::RetrievalMode;
use crate::retrieval::search::Retrieve;

/// How passages are retrieved and laid out.
#[derive(Debug, Clone, Copy)]
pub struct QaLayoutArgs {
    pub topk: usize,
    pub mode: RetrievalMode,
    pub k: usize,
    pub ctx_max: usize,
}

/// QA pairs with a held-out split and a cache of retrieved passages.
pub struct QaData {
    pub pairs: Vec<QaPair>,
    pub train: Vec<usize>,
    pub eval: Vec<usize>,
    passages: HashMap<usize, Vec<String>>,
}

impl QaData {
    /// Read `--rag_json` and hold out its last `eval_items` pairs.
    pub fn load(path: &Path, eval_items: usize) -> Result<Self> {
        let pairs: Vec<QaPair> = crate::io::schema::read_qa(path)?;
        if let Some(p) = pairs.iter().find(|p| p.answers.is_empty()) {
            bail!(
                "--rag_json {}: pair '{}' has no answer",
                path.display(),
                p.id
            );
        }
        Self::new(pairs, eval_items).with_context(|| format!("--rag_json {}", path.display()))
    }

    pub fn new(pairs: Vec<QaPair>, eval_items: usize) -> Result<Self> {
        let n = pairs.len();
        if eval_items >= n {
            bail!("--eval_items {eval_items} leaves no training pair of {n}");
        }
        Ok(Self {
            pairs,
            train: (0..n - eval_items).collect(),
            eval: (n - eval_items..n).collect(),
            passages: HashMap::new(),
        })
    }

    /// The retrieved passages of pair `i` (cached).
    pub fn passages(
        &mut self,
        i: usize,
        retriever: &dyn Retrieve,
        a: &QaLayoutArgs,
    ) -> Result<Vec<String>> {
        if let Some(p) = self.passages.get(&i) {
            return Ok(p.clone());
        }
        let hits = retriever.retrieve(&self.pairs[i].question, a.topk, a.mode)?;
        let texts: Vec<String> = hits.into_iter().map(|h| h.text).collect();
        self.passages.insert(i, texts.clone());
        Ok(texts)
    }
}

impl QaData {
    /// Drop the pairs whose retrieved passages contain none of their gold answers
    /// (case-insensitive): on such a pair the model can only learn to guess. The held-out split
    /// is then re-drawn as the last of the answerable pairs, as many as before, so that the
    /// evaluation measures answers that can be read off the passages. Returns how many training
    /// pairs were kept and how many pairs there were.
    pub fn keep_answerable(
        &mut self,
        retriever: &dyn Retrieve,
        a: &QaLayoutArgs,
    ) -> Result<(usize, usize)> {
        let held_out = self.eval.len();
        let mut kept = Vec::new();
        for i in 0..self.pairs.len() {
            let text = self.passages(i, retriever, a)?.join("\n").to_lowercase();
            if self.pairs[i]
                .answers
                .iter()
                .any(|ans| text.contains(&ans.to_lowercase()))
            {
                kept.push(i);
            }
        }
        if kept.len() <= held_out {
            bail!(
                "only {} of the {} pairs have a gold answer in their {} retrieved passages, not \
                 enough for --eval_items {held_out} plus training (is the index built from the \
                 corpus these questions are about?)",
                kept.len(),
                self.pairs.len(),
                a.topk
            );
        }
        self.eval = kept.split_off(kept.len() - held_out);
        self.train = kept;
        Ok((self.train.len(), self.pairs.len()))
    }
}

/// The layout `generate` builds for `question` over `passages` (no chunk cache).
pub fn qa_layout(
    dtok: &DecoderTokenizer,
    question: &str,
    passages: &[String],
    k: usize,
    ctx_max: usize,
) -> Result<PromptLayout> {
    let per_passage = passages
        .iter()
        .map(|p| Ok(chunk_tokens(&dtok.encode(p, false)?, k)))
        .collect::<Result<Vec<_>>>()?;
    Ok(crate::pipeline::question_layout(dtok, question, &per_passage, ctx_max)?.0)
}

/// The retriever a QA task draws its passages with. Only drawing uses it (with the task
/// borrowed mutably, so the lock never waits); the lock makes the task shareable with the
/// workers that compute its micro-batches' losses.
pub type TaskRetriever = std::sync::Mutex<Box<dyn Retrieve + Send>>;

/// The retriever of a task being drawn from.
pub fn retriever(r: &mut TaskRetriever) -> &dyn Retrieve {
    let b: &mut Box<dyn Retrieve + Send> = match r.get_mut() {
        Ok(b) => b,
        Err(poisoned) => poisoned.into_inner(),
    };
    &**b
}

/// The token that ends an answer: the chat template's end of turn, else the first EOS id.
pub fn end_token(dtok: &DecoderTokenizer) -> Result<u32> {
    if let Some(text) = dtok.chat().end_of_turn() {
        if let [id] = dtok.encode(text, false)?.as_slice() {
            return Ok(*id);
        }
    }
    match dtok.eos_ids().first() {
        Some(&id) => Ok(id),
        None => {
            bail!("the decoder's tokenizer has no end-of-turn or EOS token to end answers with")
        }
    }
}

/// Which chunks of `layout` hold (part of) one of `answers`, matched case-insensitively inside
/// each passage (the passage's chunks decoded and joined, so an answer that straddles two chunks
/// marks both). The supervised target of the policy's warm start and of its answer-chunk recall.
pub fn answer_chunks(
    dtok: &DecoderTokenizer,
    layout: &PromptLayout,
    answers: &[String],
) -> Result<Vec<bool>> {
    let mut hit = vec![false; layout.chunks.len()];
    let mut first = 0; // index of the passage's first chunk in the layout
    for chunks in layout.chunks.chunk_by(|a, b| a.passage == b.passage) {
        // The passage's text and where each chunk's text starts in it.
        let (mut text, mut offsets) = (String::new(), Vec::with_capacity(chunks.len() + 1));
        for c in chunks {
            offsets.push(text.len());
            text.push_str(&dtok.decode(&c.tokens)?.to_lowercase());
        }
        offsets.push(text.len());
        for ans in answers {
            let ans = ans.trim().to_lowercase();
            if ans.is_empty() {
                continue;
            }
            for (at, _) in text.match_indices(ans.as_str()) {
                let span = at..at + ans.len();
                for j in 0..chunks.len() {
                    if offsets[j] < span.end && span.start < offsets[j + 1] {
                        hit[first + j] = true;
                    }
                }
            }
        }
        first += chunks.len();
    }
    Ok(hit)
}

/// The training sequence of pair `pair` over its layout with expansion `mask`.
pub fn answer_seq(
    dtok: &DecoderTokenizer,
    layout: PromptLayout,
    mask: Vec<bool>,
    pair: &QaPair,
) -> Result<Seq> {
    let answer = dtok.encode(&pair.answers[0], false)?;
    Ok(Seq::answer(layout, mask, &answer, end_token(dtok)?))
}
