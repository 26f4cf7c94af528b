//! The perplexity heuristic's scores: how hard the decoder finds each chunk of a passage (its
//! mean negative log-likelihood given the passage so far), in one batched decoder pass.

use anyhow::Result;
use candle_core::{DType, Tensor};

use crate::decoder::{Decoder, DecoderTokenizer, Logits};

/// Perplexity-heuristic score of each chunk of one passage: the decoder's mean negative
/// log-likelihood of the chunk's tokens given the passage so far (higher = harder).
pub fn chunk_scores(
    decoder: &Decoder,
    dtok: &DecoderTokenizer,
    chunks: &[Vec<u32>],
) -> Result<Vec<f32>> {
    Ok(chunk_scores_batch(decoder, dtok, &[chunks.to_vec()])?.remove(0))
}

/// [`chunk_scores`] of several passages in one decoder pass (right-padded: the mask is causal,
/// so padding after a passage does not change its scores).
pub fn chunk_scores_batch(
    decoder: &Decoder,
    dtok: &DecoderTokenizer,
    passages: &[Vec<Vec<u32>>],
) -> Result<Vec<Vec<f32>>> {
    let bos: Vec<u32> = dtok.bos_id().into_iter().collect();
    let offset = bos.len();
    let rows: Vec<Vec<u32>> = passages
        .iter()
        .map(|p| [bos.clone(), p.concat()].concat())
        .collect();
    let t = rows.iter().map(Vec::len).max().unwrap_or(0);
    if t <= 1 {
        return Ok(passages.iter().map(|p| vec![0.0; p.len()]).collect());
    }
    let mut flat = Vec::with_capacity(rows.len() * t);
    for r in &rows {
        flat.extend_from_slice(r);
        flat.resize(flat.len() + t - r.len(), 0);
    }
    let ids = Tensor::from_vec(flat, (rows.len(), t), decoder.device())?;
    let logits = decoder.forward_ids(&ids, None, Logits::All)?; // (b, t, V)
    let vocab = logits.dim(2)?;
    // On the host: -log p(target) = logsumexp(row) - row[target], with the vectorised exp
    // (candle's log_softmax over a 49K vocabulary took most of the scoring time).
    let flat: Vec<f32> = logits
        .narrow(1, 0, t - 1)?
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1()?;
    let lse = crate::kernels::blas::log_sum_exp_rows(&flat, vocab);
    // Row b, position i predicts rows[b][i + 1].
    let nll: Vec<Vec<f32>> = rows
        .iter()
        .enumerate()
        .map(|(b, r)| {
            (1..t)
                .map(|i| {
                    let at = b * (t - 1) + i - 1;
                    let target = r.get(i).copied().unwrap_or(0) as usize;
                    lse[at] - flat[at * vocab + target]
                })
                .collect()
        })
        .collect();
    Ok(passages
        .iter()
        .zip(&nll)
        .map(|(chunks, row)| per_chunk_mean(chunks, row, offset))
        .collect())
}

/// Mean of `nll` over each chunk's tokens; `nll[i]` is the loss of input token `i + 1`, and the
/// passage's tokens start at input position `offset` (1 after a BOS, else 0, in which case the
/// first token has no loss).
fn per_chunk_mean(chunks: &[Vec<u32>], nll: &[f32], offset: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(chunks.len());
    let mut at = offset;
    for c in chunks {
        let lo = at.max(1) - 1;
        let hi = at + c.len() - 1;
        let s = &nll[lo.min(hi)..hi];
        out.push(if s.is_empty() {
            0.0
        } else {
            s.iter().sum::<f32>() / s.len() as f32
        });
        at += c.len();
    }
    out
}
