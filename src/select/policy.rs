//! The selective-expansion policy: a small MLP that scores each chunk from its projected embedding,
//! the question (the seed's policy never saw the question) and where the chunk sits (its
//! passage's retrieval rank and its place in the passage; the paper's policy is a transformer
//! over the chunk sequence, which sees the same order). At inference the highest-scoring
//! chunks are expanded; in training, expansion sets are sampled without replacement
//! (Plackett-Luce) and [`Policy::log_prob`] gives the log-probability of exactly that sequence.

use candle_core::{Result, Tensor, D};
use candle_nn::{Linear, Module, VarBuilder};

/// Policy shapes: `d` is the decoder width, `hidden` the MLP width.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PolicyConfig {
    pub d: usize,
    pub hidden: usize,
}

/// Per-chunk features the policy sees besides the embeddings: passage rank, place in the
/// passage, overlap with the question.
pub const POSITION_FEATURES: usize = 3;

/// `(L, POSITION_FEATURES)`: for each chunk of `layout`, its passage's retrieval rank and its
/// index inside the passage, each divided by the number of passages / that passage's chunks,
/// and the fraction of the question's content tokens `question` (distinct decoder token ids)
/// that occur in the chunk: a compressed vector blurs exact words, and the chunk that repeats
/// the question's words is the one worth reading in full.
pub fn position_features(
    layout: &crate::compression::prompt::PromptLayout,
    question: &[u32],
    device: &candle_core::Device,
) -> Result<Tensor> {
    let q: std::collections::HashSet<u32> = question.iter().copied().collect();
    let chunks = &layout.chunks;
    let passages = chunks.iter().map(|c| c.passage + 1).max().unwrap_or(1);
    let mut per_passage = vec![0usize; passages];
    for c in chunks {
        per_passage[c.passage] += 1;
    }
    let mut seen = vec![0usize; passages];
    let mut v = Vec::with_capacity(chunks.len() * POSITION_FEATURES);
    for c in chunks {
        v.push(c.passage as f32 / passages as f32);
        v.push(seen[c.passage] as f32 / per_passage[c.passage] as f32);
        let hits = q.iter().filter(|t| c.tokens.contains(t)).count();
        v.push(hits as f32 / q.len().max(1) as f32);
        seen[c.passage] += 1;
    }
    Tensor::from_vec(v, (chunks.len(), POSITION_FEATURES), device)
}

/// Scores chunks from `[e_i, q, e_i * q, position_i]`.
#[derive(Debug, Clone)]
pub struct Policy {
    l1: Linear,
    l2: Linear,
}

impl Policy {
    /// Variables `fc1.*`, `fc2.*`.
    pub fn new(cfg: &PolicyConfig, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            l1: candle_nn::linear(3 * cfg.d + POSITION_FEATURES, cfg.hidden, vb.pp("fc1"))?,
            l2: candle_nn::linear(cfg.hidden, 1, vb.pp("fc2"))?,
        })
    }

    /// Scores `(L,)` for chunk embeddings `(L, d)`, a question vector `(d,)` and the chunks'
    /// [`position_features`] `(L, POSITION_FEATURES)`.
    pub fn scores(&self, chunks: &Tensor, question: &Tensor, positions: &Tensor) -> Result<Tensor> {
        let l = chunks.dim(0)?;
        let chunks = normalize(chunks)?;
        let q = normalize(&question.unsqueeze(0)?)?.broadcast_as(chunks.shape())?;
        let positions = positions.to_dtype(chunks.dtype())?;
        let x = Tensor::cat(&[&chunks, &q, &(&chunks * &q)?, &positions], 1)?; // (L, 3d + 2)
        self.l2.forward(&self.l1.forward(&x)?.gelu()?)?.reshape(l)
    }

    /// Log-probability of choosing `order` (chunk indices, in the order drawn) without
    /// replacement under the Plackett-Luce model with these scores `(L,)`.
    pub fn log_prob(scores: &Tensor, order: &[usize]) -> Result<Tensor> {
        let l = scores.dim(0)?;
        let mut total = Tensor::zeros((), scores.dtype(), scores.device())?;
        let mut remaining = vec![1f32; l];
        for &i in order {
            let mask =
                Tensor::new(remaining.as_slice(), scores.device())?.to_dtype(scores.dtype())?;
            // log-sum-exp over the chunks still available.
            let masked = (scores + ((mask.ones_like()? - &mask)? * -1e9)?)?;
            let lse = log_sum_exp(&masked)?;
            total = (total + (scores.get(i)? - lse)?)?;
            remaining[i] = 0.0;
        }
        Ok(total)
    }
}

fn normalize(x: &Tensor) -> Result<Tensor> {
    let norm = x
        .sqr()?
        .sum_keepdim(D::Minus1)?
        .sqrt()?
        .clamp(1e-6, f64::MAX)?;
    x.broadcast_div(&norm)
}

/// `log(sum(exp(x)))` of a vector, stably.
pub fn log_sum_exp(x: &Tensor) -> Result<Tensor> {
    let max = x.max(0)?;
    x.broadcast_sub(&max)?.exp()?.sum(0)?.log()? + max
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn position_features_give_passage_rank_and_place_in_passage() {
        use crate::compression::prompt::{ChunkRef, PromptLayout, Template};
        let t = Template {
            before: vec![1],
            between: vec![2],
            after: vec![3],
        };
        // Passage 0 has two chunks, passage 1 one.
        let layout = PromptLayout::new(&t, &[vec![vec![5, 6], vec![7]], vec![vec![8]]]);
        assert_eq!(
            layout.chunks,
            vec![
                ChunkRef {
                    passage: 0,
                    tokens: vec![5, 6]
                },
                ChunkRef {
                    passage: 0,
                    tokens: vec![7]
                },
                ChunkRef {
                    passage: 1,
                    tokens: vec![8]
                },
            ]
        );
        let f: Vec<Vec<f32>> = position_features(&layout, &[7, 8, 9, 7], &Device::Cpu)
            .unwrap()
            .to_vec2()
            .unwrap();
        let third = 1.0 / 3.0;
        assert_eq!(
            f,
            vec![
                vec![0.0, 0.0, 0.0],
                vec![0.0, 0.5, third],
                vec![0.5, 0.0, third]
            ]
        );
    }

    #[test]
    fn plackett_luce_log_prob_matches_hand_computation() {
        let s = Tensor::new(&[1.0f32, 2.0, 0.5], &Device::Cpu).unwrap();
        let got: f32 = Policy::log_prob(&s, &[1, 0]).unwrap().to_scalar().unwrap();
        let e = [1f32.exp(), 2f32.exp(), 0.5f32.exp()];
        let want = (e[1] / (e[0] + e[1] + e[2])).ln() + (e[0] / (e[0] + e[2])).ln();
        assert!((got - want).abs() < 1e-5, "{got} vs {want}");
    }
}
