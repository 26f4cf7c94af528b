//! Teacher-forced sequences, the unit every trainer computes a loss on. A [`Seq`] is a
//! [`PromptLayout`] (the same layout inference assembles), an expansion mask, and target tokens:
//! the layout's last template segment ends with the targets minus their last token, so the last
//! `targets.len()` positions of the assembled input predict the targets. Reconstruction, next
//! paragraph and answers are all this shape:
//!
//! - CPT-A: BOS, chunks of `x_1..x_s` all compressed, then `x_1..x_{s-1}`; targets `x_1..x_s`;
//! - CPT-B: BOS, chunks of the context (some expanded), then `y_1..y_{o-1}`; targets `y_1..y_o`;
//! - QA: the inference template with the passages' chunks, then the answer; targets the answer
//!   and the end-of-turn token.

use std::collections::BTreeMap;

use anyhow::Result;
use candle_core::{DType, Tensor, D};
use rayon::prelude::*;

use super::encoder::TrainEncoder;
use super::parts::TrainDecoder;
use super::run::Stats;
use crate::compression::prompt::{chunk_tokens, PromptLayout, Segment, Template};
use crate::decoder::{Decoder, DecoderTokenizer, Logits};

/// One teacher-forced sequence.
#[derive(Debug, Clone)]
pub struct Seq {
    pub layout: PromptLayout,
    /// Which chunks are expanded to tokens.
    pub mask: Vec<bool>,
    pub targets: Vec<u32>,
}

impl Seq {
    /// A layout around `chunks` (one passage) with `before` and, after the chunks, the targets
    /// minus the last one.
    pub fn new(
        before: Vec<u32>,
        chunks: Vec<Vec<u32>>,
        targets: Vec<u32>,
        mask: Vec<bool>,
    ) -> Self {
        let template = Template {
            before,
            between: Vec::new(),
            after: targets[..targets.len().saturating_sub(1)].to_vec(),
        };
        let passages = if chunks.is_empty() {
            vec![]
        } else {
            vec![chunks]
        };
        Self {
            layout: PromptLayout::new(&template, &passages),
            mask,
            targets,
        }
    }

    /// CPT-A: reconstruct `tokens` from their chunks of `k`, all compressed, after `bos` (if
    /// any). A chunk vector is never the first position: a decoder's first position is its
    /// attention sink, which later positions read little from, and at inference chunks always
    /// follow the template's opening tokens.
    pub fn reconstruction(tokens: &[u32], k: usize, bos: Option<u32>) -> Self {
        let chunks = chunk_tokens(tokens, k);
        let n = chunks.len();
        Self::new(
            bos.into_iter().collect(),
            chunks,
            tokens.to_vec(),
            vec![false; n],
        )
    }

    /// CPT-B: predict `cont` after `bos` (if any) and the context `ctx` cut in chunks of `k`,
    /// expanded per `mask`.
    pub fn next_paragraph(
        ctx: &[u32],
        cont: &[u32],
        k: usize,
        mask: Vec<bool>,
        bos: Option<u32>,
    ) -> Self {
        Self::new(
            bos.into_iter().collect(),
            chunk_tokens(ctx, k),
            cont.to_vec(),
            mask,
        )
    }

    /// `cont` with no context but `bos` (if any) before it.
    pub fn no_context(bos: Option<u32>, cont: &[u32]) -> Self {
        Self::new(
            bos.into_iter().collect(),
            Vec::new(),
            cont.to_vec(),
            Vec::new(),
        )
    }

    /// A QA layout from inference's `prepare`, with the answer tokens appended after the
    /// template; the targets are the answer and then `end` (end of turn).
    pub fn answer(mut layout: PromptLayout, mask: Vec<bool>, answer: &[u32], end: u32) -> Self {
        if let Some(Segment::Tokens(t)) = layout.segments.last_mut() {
            t.extend_from_slice(answer);
        }
        let mut targets = answer.to_vec();
        targets.push(end);
        Self {
            layout,
            mask,
            targets,
        }
    }

    /// Positions of the assembled input.
    pub fn positions(&self) -> usize {
        self.layout.num_positions(&self.mask)
    }
}

/// Losses and counts of a batch of sequences.
pub struct SeqOut {
    /// Mean negative log-likelihood over every target of the batch (differentiable).
    pub loss: Tensor,
    /// Per sequence: mean negative log-likelihood of its targets.
    pub nll: Vec<f64>,
    pub tokens: usize,
    /// Targets that were the arg-max prediction.
    pub correct: usize,
    /// With a teacher: the mean `KL(teacher || decoder)` over every target (nats).
    pub kl: Option<f64>,
}

/// Distillation targets for a batch of sequences: per sequence, the teacher's next-token
/// distributions `(m, vocab)` over its `m` targets, and the loss weight of
/// `KL(teacher || decoder)` beside the targets' cross-entropy.
pub struct Teacher {
    pub probs: Vec<Tensor>,
    /// Per sequence: the summed entropy of its rows (turns the soft cross-entropy into a KL).
    pub entropy: Vec<f64>,
    pub weight: f64,
}

impl Teacher {
    /// The decoder's own distributions over each sequence's targets with every chunk expanded
    /// (the full context the compressed input stands for), detached: distilling them teaches the
    /// compressed reading to predict what reading the text would, a distribution per target
    /// rather than one token.
    pub fn full_context(decoder: &Decoder, seqs: &[Seq], weight: f64) -> Result<Self> {
        let dev = decoder.device();
        let full: Vec<Seq> = seqs
            .iter()
            .map(|s| Seq {
                mask: vec![true; s.mask.len()],
                ..s.clone()
            })
            .collect();
        let mut probs: Vec<Option<Tensor>> = vec![None; seqs.len()];
        let mut entropy = vec![0f64; seqs.len()];
        let no_tables = vec![None; full.len()];
        for ((_, m), idx) in length_groups(&full) {
            let x = group_input(decoder, &full, &no_tables, &idx)?;
            let logits = decoder.forward_embeds(&x, None, Logits::Tail(m))?.detach();
            let vocab = logits.dim(D::Minus1)?;
            let mut rows = logits
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            rows.par_chunks_mut(vocab)
                .for_each(crate::kernels::blas::softmax_in_place);
            let h = super::xent::row_entropy(&rows, vocab);
            for (j, &i) in idx.iter().enumerate() {
                let part = rows[j * m * vocab..(j + 1) * m * vocab].to_vec();
                probs[i] = Some(Tensor::from_vec(part, (m, vocab), dev)?);
                entropy[i] = h[j * m..(j + 1) * m].iter().sum();
            }
        }
        Ok(Self {
            probs: probs
                .into_iter()
                .map(|p| p.expect("every sequence is in a group"))
                .collect(),
            entropy,
            weight,
        })
    }
}

/// The decoder input `(b, p, d)` of the group `idx` of equal-length sequences: each one's
/// token embeddings with its compressed chunks' rows taken from its table.
fn group_input(
    decoder: &Decoder,
    seqs: &[Seq],
    tables: &[Option<Tensor>],
    idx: &[usize],
) -> Result<Tensor> {
    let dev = decoder.device();
    let xs = idx
        .iter()
        .map(|&i| {
            let embed = |ids: &Tensor| Ok(decoder.embed(ids)?);
            seqs[i]
                .layout
                .assemble(embed, tables[i].as_ref(), &seqs[i].mask, dev)
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Tensor::cat(&xs, 0)?)
}

/// Sequences grouped by (positions, targets): each group is one batched forward pass.
fn length_groups(seqs: &[Seq]) -> BTreeMap<(usize, usize), Vec<usize>> {
    let mut groups: BTreeMap<(usize, usize), Vec<usize>> = BTreeMap::new();
    for (i, s) in seqs.iter().enumerate() {
        groups
            .entry((s.positions(), s.targets.len()))
            .or_default()
            .push(i);
    }
    groups
}

/// Run the decoder on each sequence (sequences of equal length share one forward pass) and
/// score the targets. `embed_chunks` maps chunk texts to projected embeddings `(n, d)`; only
/// the compressed chunks are encoded. Gradients flow to whatever `embed_chunks` and the
/// decoder's variables track.
pub fn forward_seqs(
    embed_chunks: &dyn Fn(&[&str]) -> Result<Tensor>,
    decoder: &Decoder,
    dtok: &DecoderTokenizer,
    seqs: &[Seq],
) -> Result<SeqOut> {
    let tables = chunk_tables(embed_chunks, decoder, dtok, seqs)?;
    forward_with_tables(decoder, seqs, tables, None)
}

/// [`forward_seqs`] with each sequence's `(L, d)` chunk-embedding table given (rows of
/// expanded chunks are not read; `None` when every chunk is expanded). With a `teacher`, the
/// loss adds its weight times the mean soft cross-entropy against the teacher's distributions.
pub fn forward_with_tables(
    decoder: &Decoder,
    seqs: &[Seq],
    tables: Vec<Option<Tensor>>,
    teacher: Option<&Teacher>,
) -> Result<SeqOut> {
    let dev = decoder.device();
    let mut total: Option<Tensor> = None;
    let (mut tokens, mut correct) = (0usize, 0usize);
    let mut soft_sum = 0f64;
    let mut nll = vec![0f64; seqs.len()];
    for ((p, m), idx) in length_groups(seqs) {
        let g = score_group(decoder, seqs, &tables, &idx, p, m, teacher)?;
        for (&i, v) in idx.iter().zip(g.nll) {
            nll[i] = v;
        }
        correct += g.correct;
        tokens += idx.len() * m;
        let mut sum = g.sum;
        if let (Some(soft), Some(t)) = (g.soft, teacher) {
            soft_sum += f64::from(soft.to_scalar::<f32>()?);
            sum = (sum + soft.affine(t.weight, 0.0)?)?;
        }
        total = Some(match total {
            Some(t) => (t + sum)?,
            None => sum,
        });
    }
    let loss = match total {
        Some(t) => (t / tokens.max(1) as f64)?,
        None => Tensor::zeros((), DType::F32, dev)?,
    };
    let kl = teacher.map(|t| (soft_sum - t.entropy.iter().sum::<f64>()) / tokens.max(1) as f64);
    Ok(SeqOut {
        loss,
        nll,
        tokens,
        correct,
        kl,
    })
}

/// The scores of one group of sequences with `p` positions and `m` targets each.
struct GroupScore {
    /// Sum of the targets' negative log-likelihoods (differentiable).
    sum: Tensor,
    /// With a teacher: the sum of the targets' soft cross-entropies against it (differentiable).
    soft: Option<Tensor>,
    /// Per sequence of the group: mean negative log-likelihood.
    nll: Vec<f64>,
    correct: usize,
}

fn score_group(
    decoder: &Decoder,
    seqs: &[Seq],
    tables: &[Option<Tensor>],
    idx: &[usize],
    p: usize,
    m: usize,
    teacher: Option<&Teacher>,
) -> Result<GroupScore> {
    let dev = decoder.device();
    let x = group_input(decoder, seqs, tables, idx)?; // (b, p, d)
    debug_assert!(m <= p);
    let logits = decoder.forward_embeds(&x, None, Logits::Tail(m))?; // (b, m, V)
    let logits = logits.reshape((idx.len() * m, ()))?;
    let targets: Vec<u32> = idx.iter().flat_map(|&i| seqs[i].targets.clone()).collect();
    let t = Tensor::new(targets.as_slice(), dev)?;
    let logits = logits.to_dtype(DType::F32)?;
    let tok_nll = super::xent::cross_entropy_rows(&logits, &t)?; // (b * m)
    let soft = match teacher {
        Some(teacher) => {
            let probs: Vec<&Tensor> = idx.iter().map(|&i| &teacher.probs[i]).collect();
            let probs = Tensor::cat(&probs, 0)?;
            Some(super::xent::soft_cross_entropy_rows(&logits, &probs)?.sum_all()?)
        }
        None => None,
    };
    let per: Vec<f32> = tok_nll.to_vec1()?;
    let nll = per
        .chunks(m)
        .map(|c| c.iter().map(|&x| f64::from(x)).sum::<f64>() / m as f64)
        .collect();
    let pred: Vec<u32> = logits.argmax(D::Minus1)?.to_vec1()?;
    let correct = pred.iter().zip(&targets).filter(|(a, b)| a == b).count();
    Ok(GroupScore {
        sum: tok_nll.sum_all()?,
        soft,
        nll,
        correct,
    })
}

/// For each sequence, the `(L, d)` table of chunk embeddings (rows of expanded chunks zero), or
/// `None` when it has no compressed chunk. All compressed chunks go through `embed_chunks` once.
fn chunk_tables(
    embed_chunks: &dyn Fn(&[&str]) -> Result<Tensor>,
    decoder: &Decoder,
    dtok: &DecoderTokenizer,
    seqs: &[Seq],
) -> Result<Vec<Option<Tensor>>> {
    let mut texts = Vec::new();
    for s in seqs {
        for (c, &expanded) in s.layout.chunks.iter().zip(&s.mask) {
            if !expanded {
                texts.push(dtok.decode(&c.tokens)?);
            }
        }
    }
    if texts.is_empty() {
        return Ok(vec![None; seqs.len()]);
    }
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let e = embed_chunks(&refs)?; // (n, d)
    let d = e.dim(1)?;
    let table = Tensor::cat(&[&Tensor::zeros((1, d), e.dtype(), e.device())?, &e], 0)?;
    let mut next = 1u32;
    let mut out = Vec::with_capacity(seqs.len());
    for s in seqs {
        if s.mask.iter().all(|&m| m) {
            out.push(None);
            continue;
        }
        let rows: Vec<u32> = s
            .mask
            .iter()
            .map(|&expanded| {
                if expanded {
                    0
                } else {
                    next += 1;
                    next - 1
                }
            })
            .collect();
        let rows = Tensor::new(rows, decoder.device())?;
        out.push(Some(table.index_select(&rows, 0)?));
    }
    Ok(out)
}

impl SeqOut {
    /// The counts a training micro-batch of these sequences reports.
    pub fn stats(&self) -> Result<Stats> {
        let mut stats = Stats {
            loss: f64::from(self.loss.to_scalar::<f32>()?),
            micro: 1,
            tokens: self.tokens,
            correct: self.correct,
            ..Default::default()
        };
        if let Some(kl) = self.kl {
            stats.note("distill_kl", kl);
        }
        Ok(stats)
    }
}

/// [`forward_seqs`] with the chunks encoded by a training run's encoder and its decoder:
/// differentiable when `grad`, detached from the encoder otherwise.
pub fn forward_trained(
    enc: &TrainEncoder,
    dec: &TrainDecoder,
    seqs: &[Seq],
    grad: bool,
) -> Result<SeqOut> {
    let embed = |texts: &[&str]| -> Result<Tensor> {
        let e = enc.embed(texts)?;
        Ok(if grad { e } else { e.detach() })
    };
    forward_seqs(&embed, &dec.decoder, &dec.tok, seqs)
}

/// [`forward_trained`] with gradients, and with `distill` > 0 the loss plus `distill` times
/// `KL(full context || compressed)` per target ([`Teacher::full_context`]).
pub fn forward_trained_distilled(
    enc: &TrainEncoder,
    dec: &TrainDecoder,
    seqs: &[Seq],
    distill: f64,
) -> Result<SeqOut> {
    if distill <= 0.0 {
        return forward_trained(enc, dec, seqs, true);
    }
    let teacher = Teacher::full_context(&dec.decoder, seqs, distill)?;
    let embed = |texts: &[&str]| -> Result<Tensor> { enc.embed(texts) };
    let tables = chunk_tables(&embed, &dec.decoder, &dec.tok, seqs)?;
    forward_with_tables(&dec.decoder, seqs, tables, Some(&teacher))
}

/// How well a training run's models predict held-out sequences.
#[derive(Debug, Clone, Copy)]
pub struct Scored {
    /// Mean negative log-likelihood over every target.
    pub nll: f64,
    pub tokens: usize,
    /// Targets that were the arg-max prediction.
    pub correct: usize,
}

impl Scored {
    pub fn accuracy(&self) -> f64 {
        self.correct as f64 / self.tokens.max(1) as f64
    }
}

/// Score `seqs` without gradients, `batch` sequences per forward pass.
pub fn score_trained(
    enc: &TrainEncoder,
    dec: &TrainDecoder,
    seqs: &[Seq],
    batch: usize,
) -> Result<Scored> {
    let (mut nll, mut tokens, mut correct) = (Vec::new(), 0, 0);
    // The batches side by side, one per BLAS thread (each product on its worker), taken in
    // order: the same sums as one by one.
    let batches: Vec<&[Seq]> = seqs.chunks(batch.max(1)).collect();
    let mut outs: Vec<Option<SeqOut>> = (0..batches.len()).map(|_| None).collect();
    crate::kernels::blas::threads::side_by_side(
        batches.len(),
        |i| forward_trained(enc, dec, batches[i], false),
        |i, out| {
            outs[i] = Some(out?);
            Ok(())
        },
    )?;
    for out in outs.into_iter().flatten() {
        nll.extend(out.nll);
        tokens += out.tokens;
        correct += out.correct;
    }
    Ok(Scored {
        nll: weighted_mean(&nll, &target_counts(seqs)),
        tokens,
        correct,
    })
}

/// Perplexity of a mean negative log-likelihood.
pub fn perplexity(mean_nll: f64) -> f64 {
    mean_nll.exp()
}

/// Mean of per-sequence values weighted by their target counts.
pub fn weighted_mean(values: &[f64], counts: &[usize]) -> f64 {
    let n: usize = counts.iter().sum();
    values
        .iter()
        .zip(counts)
        .map(|(v, &c)| v * c as f64)
        .sum::<f64>()
        / n.max(1) as f64
}

/// Target counts of sequences.
pub fn target_counts(seqs: &[Seq]) -> Vec<usize> {
    seqs.iter().map(|s| s.targets.len()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconstruction_layout_predicts_every_token_from_the_chunks() {
        let s = Seq::reconstruction(&[5, 6, 7, 8, 9], 2, None);
        assert_eq!(s.layout.chunks.len(), 3);
        // 3 chunk positions, then x1..x4: the last 5 positions predict x1..x5.
        assert_eq!(s.positions(), 3 + 4);
        assert_eq!(s.targets, vec![5, 6, 7, 8, 9]);
        let n = Seq::next_paragraph(&[1, 2, 3, 4], &[7, 8], 2, vec![true, false], None);
        assert_eq!(n.positions(), 2 + 1 + 1);
        let b = Seq::reconstruction(&[5, 6, 7, 8, 9], 2, Some(1));
        assert_eq!(b.positions(), 1 + 3 + 4);
        assert_eq!(b.layout.segments.len(), s.layout.segments.len());
        let z = Seq::no_context(Some(1), &[7, 8]);
        assert_eq!(z.positions(), 2);
    }
}
