//! One decoding step (one token, one sequence, a KV cache) of a decoder whose projections all
//! have the quantized fast path ([`super::fast`]), on plain vectors: RMS norms, rotary
//! embedding, SiLU gate and residual adds as loops over the 576 (or so) values of the hidden
//! state, the products by [`quantized_products`] straight into them. The tensor path spends most of
//! a step's serial time creating, dispatching and freeing ~20 small tensors per layer while the
//! product threads wait; here only the cache append and the attention kernel see tensors. The
//! same maths as [`super::Block::forward`] in the same order, up to the order of float sums.

use candle_core::{Result, Tensor};

use super::fast::{quantized_products, FastProj};
use super::proj::Proj;
use super::{Block, Decoder, RmsNorm};
use crate::decoder::cache::KvCache;

/// A layer's projections when every one has the fast path.
struct Fast<'a> {
    q: &'a FastProj,
    k: &'a FastProj,
    v: &'a FastProj,
    o: &'a FastProj,
    gate: &'a FastProj,
    up: &'a FastProj,
    down: &'a FastProj,
}

fn fast(p: &Proj) -> Option<&FastProj> {
    match p {
        Proj::Fast(f) => Some(f),
        _ => None,
    }
}

impl Block {
    fn fast_projs(&self) -> Option<Fast<'_>> {
        let (a, m) = (&self.self_attn, &self.mlp);
        if a.interleaved || a.reference_order {
            return None;
        }
        Some(Fast {
            q: fast(&a.q_proj)?,
            k: fast(&a.k_proj)?,
            v: fast(&a.v_proj)?,
            o: fast(&a.o_proj)?,
            gate: fast(&m.gate_proj)?,
            up: fast(&m.up_proj)?,
            down: fast(&m.down_proj)?,
        })
    }
}

/// `ys[i] = x W_i^T + b_i` for one row `x`.
fn products(projs: &[&FastProj], x: &[f32]) -> Result<Vec<Vec<f32>>> {
    let mut outs = quantized_products(projs, x, 1);
    for (p, y) in projs.iter().zip(outs.iter_mut()) {
        if let Some(b) = p.dense.bias() {
            for (o, b) in y.iter_mut().zip(b.to_vec1::<f32>()?) {
                *o += b;
            }
        }
    }
    Ok(outs)
}

/// `x / rms(x) * w`, as candle's `rms_norm` computes it.
fn rms_norm(x: &[f32], norm: &RmsNorm) -> Result<Vec<f32>> {
    let w: Vec<f32> = norm.weight.to_vec1()?;
    let ms = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let r = 1.0 / (ms + norm.eps).sqrt();
    Ok(x.iter().zip(&w).map(|(v, w)| v * r * w).collect())
}

/// Rotate each head of `x` (heads of `cos.len() * 2` values, the two halves as a pair).
fn rope(x: &mut [f32], cos: &[f32], sin: &[f32]) {
    let half = cos.len();
    for head in x.chunks_exact_mut(2 * half) {
        let (a, b) = head.split_at_mut(half);
        for i in 0..half {
            let (x1, x2) = (a[i], b[i]);
            a[i] = x1 * cos[i] - x2 * sin[i];
            b[i] = x2 * cos[i] + x1 * sin[i];
        }
    }
}

impl Decoder {
    /// Whether [`Decoder::decode_step`] runs this decoder.
    pub(super) fn has_fast_step(&self) -> bool {
        self.device.is_cpu()
            && self.dtype == candle_core::DType::F32
            && !self.trainable
            && !self.quantized
            && self.layers.iter().all(|l| l.fast_projs().is_some())
    }

    /// The hidden state `(1, 1, d)` after every layer for the one input embedding `x`
    /// `(1, 1, d)` at the cache's position; appends to the cache (the caller advances it).
    pub(super) fn decode_step(&self, x: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let pos = cache.len();
        let cos: Vec<f32> = self
            .inv_freq
            .iter()
            .map(|f| (pos as f32 * f).cos())
            .collect();
        let sin: Vec<f32> = self
            .inv_freq
            .iter()
            .map(|f| (pos as f32 * f).sin())
            .collect();
        let dev = x.device();
        let mut h: Vec<f32> = x.flatten_all()?.to_vec1()?;
        for (i, layer) in self.layers.iter().enumerate() {
            let f = layer.fast_projs().ok_or_else(|| {
                candle_core::Error::Msg("decode step: a layer without the fast path".into())
            })?;
            let a = &layer.self_attn;
            let (nh, nkv, hd) = (a.n_head, a.n_kv, a.head_dim);
            let normed = rms_norm(&h, &layer.input_layernorm)?;
            let mut qkv = products(&[f.q, f.k, f.v], &normed)?;
            let v = qkv.pop().expect("v");
            let mut k = qkv.pop().expect("k");
            let mut q = qkv.pop().expect("q");
            rope(&mut q, &cos, &sin);
            rope(&mut k, &cos, &sin);
            let k = Tensor::from_vec(k, (1, nkv, 1, hd), dev)?;
            let v = Tensor::from_vec(v, (1, nkv, 1, hd), dev)?;
            let (kc, vc) = cache.append(i, &k, &v)?;
            let q = Tensor::from_vec(q, (1, nh, 1, hd), dev)?;
            let scale = 1.0 / (hd as f32).sqrt();
            let y: Vec<f32> = crate::kernels::blas::causal_attention(&q, &kc, &vc, scale)?
                .flatten_all()?
                .to_vec1()?;
            let o = products(&[f.o], &y)?;
            h.iter_mut().zip(&o[0]).for_each(|(h, o)| *h += o);
            let normed = rms_norm(&h, &layer.post_attention_layernorm)?;
            let mut gu = products(&[f.gate, f.up], &normed)?;
            let u = gu.pop().expect("up");
            let mut g = gu.pop().expect("gate");
            for (g, u) in g.iter_mut().zip(&u) {
                *g = *g / (1.0 + (-*g).exp()) * u;
            }
            let d = products(&[f.down], &g)?;
            h.iter_mut().zip(&d[0]).for_each(|(h, d)| *h += d);
        }
        let d = h.len();
        Tensor::from_vec(h, (1, 1, d), dev)
    }
}
