//! Supervised fine-tuning on question/answer pairs (`sft`, the paper's step after CPT): the
//! retrieved passages are compressed with a random expansion fraction drawn uniformly from
//! [0, 1] per example, so the same weights serve every `--p`; the loss is on the answer tokens
//! and the end-of-turn token only. Encoder, projector and (unless frozen) decoder train.
//! With `gold_expand` > 0, that share of the examples expands the chunks holding the gold answer
//! first (the rest of the budget at random), as a policy that finds the answer would at inference.
//! With `next` (`--next_json`), every micro-batch also carries as many next-paragraph sequences
//! of plain text (CPT-B's task) and adds their loss, weighted: the adapter then keeps reading
//! compressed chunks while it learns to answer, where `sft` alone trades the one for the other.
//! Evaluation: answer log-likelihood and token accuracy on held-out pairs at p = 0, 0.25, 1
//! (random expansions), and at p = 0.25 with the gold answer's chunks expanded first.

use anyhow::{bail, Result};
use candle_core::Tensor;
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};

use super::cpt::{next_seq, CptData};
use super::encoder::TrainEncoder;
use super::optim::Group;
use super::parts::{enc_dec_checkpoint, enc_dec_groups, Checkpoint, TrainDecoder};
use super::qa::{
    answer_chunks, answer_seq, qa_layout, retriever, QaData, QaLayoutArgs, TaskRetriever,
};
use super::run::{Drawn, Micro, Task};
use super::seq::{forward_trained, forward_trained_distilled, score_trained, Seq};
use crate::select::{first_then_random, num_expand, random_n};

/// A fine-tuning run.
pub struct SftTask {
    pub enc: TrainEncoder,
    pub dec: TrainDecoder,
    pub data: QaData,
    pub retriever: TaskRetriever,
    pub layout: QaLayoutArgs,
    pub dec_name: String,
    pub dec_lr_scale: f64,
    pub eval_batch: usize,
    /// Expansion fractions are drawn uniform in `[0, expand_max]`.
    pub expand_max: f64,
    /// Share of the examples whose expansions take the gold answer's chunks first.
    pub gold_expand: f64,
    /// Next-paragraph sequences mixed into every micro-batch.
    pub next: Option<NextMix>,
}

/// Next-paragraph training mixed into `sft` (`--next_json`).
pub struct NextMix {
    /// Plain-text (or CPT JSONL) items; every one of them trains.
    pub data: CptData,
    /// Fraction of each sequence's chunks left expanded.
    pub expand_frac: f64,
    /// Weight of the next-paragraph loss beside the answer loss.
    pub weight: f64,
    /// Weight of the full-context distillation within the next-paragraph loss (0: none).
    pub distill: f64,
}

impl SftTask {
    /// The sequence of pair `i` with a fraction `p` of its chunks expanded: chosen at random
    /// with `seed`, the gold answer's chunks first when `gold`.
    fn seq(&mut self, i: usize, p: f64, gold: bool, seed: u64) -> Result<Seq> {
        let passages = self
            .data
            .passages(i, retriever(&mut self.retriever), &self.layout)?;
        let pair = &self.data.pairs[i];
        let layout = qa_layout(
            &self.dec.tok,
            &pair.question,
            &passages,
            self.layout.k,
            self.layout.ctx_max,
        )?;
        let l = layout.chunks.len();
        let mask = if gold {
            let hit = answer_chunks(&self.dec.tok, &layout, &pair.answers)?;
            first_then_random(&hit, num_expand(p, l), seed)
        } else {
            random_n(l, num_expand(p, l), seed)
        };
        answer_seq(&self.dec.tok, layout, mask, pair)
    }

    /// `n` next-paragraph sequences drawn at random, when mixing is on (no draw otherwise).
    fn next_seqs(&self, n: usize, rng: &mut ChaCha8Rng) -> Vec<Seq> {
        let Some(m) = &self.next else {
            return Vec::new();
        };
        let bos = self.dec.tok.bos_id();
        (0..n)
            .map(|_| {
                let i = m.data.train[rng.random_range(0..m.data.train.len())];
                next_seq(&m.data, i, self.layout.k, m.expand_frac, bos, rng.random())
            })
            .collect()
    }

    /// The mean loss of the next-paragraph sequences `seqs` and its weight, when mixing is on.
    fn next_loss(&self, seqs: &[Seq]) -> Result<Option<(Tensor, f64)>> {
        let Some(m) = &self.next else {
            return Ok(None);
        };
        let loss = forward_trained_distilled(&self.enc, &self.dec, seqs, m.distill)?.loss;
        Ok(Some((loss, m.weight)))
    }
}

/// An `sft` micro-batch: the answer sequences, their expansion fractions, and the mixed
/// next-paragraph sequences (none without `--next_json`).
struct SftDrawn {
    seqs: Vec<Seq>,
    fracs: Vec<f64>,
    next: Vec<Seq>,
}

impl Task for SftTask {
    fn stage(&self) -> &'static str {
        "sft"
    }

    fn groups(&self) -> Vec<Group> {
        enc_dec_groups(&self.enc, &self.dec, self.dec_lr_scale)
    }

    fn num_train(&self) -> usize {
        self.data.train.len()
    }

    fn draw(&mut self, items: &[usize], rng: &mut ChaCha8Rng) -> Result<Option<Drawn>> {
        let mut seqs = Vec::with_capacity(items.len());
        let mut fracs = Vec::new();
        for &j in items {
            let p: f64 = rng.random::<f64>() * self.expand_max;
            // No draw when off, so runs without --gold_expand keep their random stream.
            let gold = self.gold_expand > 0.0 && rng.random::<f64>() < self.gold_expand;
            fracs.push(p);
            seqs.push(self.seq(self.data.train[j], p, gold, rng.random())?);
        }
        let next = self.next_seqs(items.len(), rng);
        Ok(Some(Box::new(SftDrawn { seqs, fracs, next })))
    }

    fn loss(&self, drawn: &Drawn) -> Result<Micro> {
        let Some(d) = drawn.downcast_ref::<SftDrawn>() else {
            bail!("sft: a micro-batch drawn by another task");
        };
        let out = forward_trained(&self.enc, &self.dec, &d.seqs, true)?;
        let mut stats = out.stats()?;
        for &p in &d.fracs {
            stats.note("p", p);
        }
        let mut loss = out.loss;
        if let Some((next, w)) = self.next_loss(&d.next)? {
            stats.note("next_loss", f64::from(next.to_scalar::<f32>()?));
            loss = (loss + next.affine(w, 0.0)?)?;
        }
        Ok(Micro { loss, stats })
    }

    fn evaluate(&mut self) -> Result<Value> {
        let mut out = serde_json::Map::new();
        for (name, p, gold) in [
            ("answer_p0", 0.0, false),
            ("answer_p0.25", 0.25, false),
            ("answer_p1", 1.0, false),
            ("answer_p0.25_gold", 0.25, true),
        ] {
            let ids = self.data.eval.clone();
            let seqs = ids
                .iter()
                .map(|&i| self.seq(i, p, gold, i as u64))
                .collect::<Result<Vec<_>>>()?;
            let s = score_trained(&self.enc, &self.dec, &seqs, self.eval_batch)?;
            out.insert(
                name.to_string(),
                json!({
                    "answer_loglik": -s.nll,
                    "token_acc": s.accuracy(),
                    "tokens": s.tokens,
                }),
            );
        }
        Ok(Value::Object(out))
    }

    fn checkpoint(&self, step: usize) -> Result<Checkpoint<'_>> {
        Ok(enc_dec_checkpoint(
            &self.enc,
            &self.dec,
            "sft",
            &self.dec_name,
            self.layout.k,
            step,
        ))
    }
}
