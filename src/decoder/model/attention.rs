//! A decoder layer's self-attention: q/k/v/o projections, rotary embedding, grouped-query
//! heads over an optional KV cache, and the attention itself by whichever path applies (the
//! quantized reference order, the fused differentiable kernel, the blocked BLAS kernel, or
//! plain tensor ops with a blocked causal prefix).

use candle_core::{DType, Result, Tensor, D};
use candle_nn::{linear_b, VarBuilder};

use super::proj::Proj;
use super::softmax_dtype;
use crate::decoder::cache::KvCache;
use crate::decoder::config::DecoderConfig;
use crate::kernels::blas::FEW_ROWS;

/// What every layer needs for one forward call.
pub(super) struct Step<'a> {
    /// Rotary tables for the positions of this call, `(t, head_dim / 2)` each.
    pub(super) cos: &'a Tensor,
    pub(super) sin: &'a Tensor,
    /// Additive causal mask `(t, past + t)` in `softmax_dtype`, `None` for a single position.
    pub(super) mask: Option<&'a Tensor>,
    /// Use plain (differentiable) tensor ops instead of the fused kernels.
    pub(super) grad: bool,
}

#[derive(Debug, Clone)]
pub(super) struct Attention {
    pub(super) q_proj: Proj,
    pub(super) k_proj: Proj,
    pub(super) v_proj: Proj,
    pub(super) o_proj: Proj,
    /// q/k rows in llama.cpp's interleaved rotary layout (quantized GGUF weights, kept as
    /// stored): rotate adjacent pairs instead of the two halves.
    pub(super) interleaved: bool,
    /// Attend in candle-transformers' `quantized_llama` order of operations (kept-quantized
    /// weights), not through the fused BLAS op.
    pub(super) reference_order: bool,
    pub(super) n_head: usize,
    pub(super) n_kv: usize,
    pub(super) head_dim: usize,
}

impl Attention {
    pub(super) fn new(cfg: &DecoderConfig, vb: VarBuilder) -> Result<Self> {
        let (d, hd) = (cfg.hidden_size, cfg.head_dim);
        let (nq, nkv) = (cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd);
        let bias = cfg.attention_bias;
        Ok(Attention {
            q_proj: Proj::Dense(linear_b(d, nq, bias, vb.pp("q_proj"))?),
            k_proj: Proj::Dense(linear_b(d, nkv, bias, vb.pp("k_proj"))?),
            v_proj: Proj::Dense(linear_b(d, nkv, bias, vb.pp("v_proj"))?),
            o_proj: Proj::Dense(linear_b(nq, d, cfg.o_proj_bias, vb.pp("o_proj"))?),
            interleaved: false,
            reference_order: false,
            n_head: cfg.num_attention_heads,
            n_kv: cfg.num_key_value_heads,
            head_dim: hd,
        })
    }

    /// `(b, t, n * hd)` -> `(b, n, t, hd)`, contiguous.
    fn heads(&self, x: Tensor, n: usize) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        x.reshape((b, t, n, self.head_dim))?
            .transpose(1, 2)?
            .contiguous()
    }

    fn rope(&self, x: &Tensor, s: &Step) -> Result<Tensor> {
        if self.interleaved {
            candle_nn::rotary_emb::rope_i(x, s.cos, s.sin)
        } else if s.grad && crate::kernels::fused::usable(x) {
            crate::kernels::fused::rope(x, s.cos, s.sin)
        } else if s.grad {
            candle_nn::rotary_emb::rope_slow(x, s.cos, s.sin)
        } else {
            candle_nn::rotary_emb::rope(x, s.cos, s.sin)
        }
    }

    pub(super) fn forward(
        &self,
        x: &Tensor,
        s: &Step,
        cache: Option<(&mut KvCache, usize)>,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let [q, k, v] = Proj::forward_group([&self.q_proj, &self.k_proj, &self.v_proj], x)?;
        let q = self.rope(&self.heads(q, self.n_head)?, s)?; // (b, h, t, hd)
        let k = self.rope(&self.heads(k, self.n_kv)?, s)?; // (b, kv, t, hd)
        let v = self.heads(v, self.n_kv)?; // (b, kv, t, hd)
        let (k, v) = match cache {
            Some((c, layer)) => {
                let past = c.len();
                let (kc, vc) = c.append(layer, &k, &v)?; // (b, kv, L, hd)
                if kc.dtype() == k.dtype() || (self.reads_half_cache(&q, s) && t <= FEW_ROWS) {
                    (kc, vc)
                } else if past == 0 {
                    // A prefill from empty: its own keys are the whole cache, unrounded.
                    (k, v)
                } else {
                    (kc.to_dtype(k.dtype())?, vc.to_dtype(k.dtype())?)
                }
            }
            None => (k, v),
        };
        if self.reference_order {
            // Kept-quantized GGUF weights: attention in quantized_llama's exact order of
            // operations, so the activations its kernels quantize are bit-identical too.
            let rep = self.n_head / self.n_kv;
            let k = candle_transformers::utils::repeat_kv(k.contiguous()?, rep)?;
            let v = candle_transformers::utils::repeat_kv(v.contiguous()?, rep)?;
            let mut att = (q.matmul(&k.t()?)? / (self.head_dim as f64).sqrt())?;
            if let Some(mask) = s.mask {
                att = att.broadcast_add(mask)?;
            }
            let y = candle_nn::ops::softmax_last_dim(&att)?.matmul(&v)?;
            let y = y
                .transpose(1, 2)?
                .reshape((b, t, self.n_head * self.head_dim))?;
            return self.o_proj.forward(&y);
        }
        if s.grad && crate::kernels::fused::usable(&k) && k.dim(2)? == t {
            // Training: the whole sequence at once, forward and backward fused.
            let scale = 1.0 / (self.head_dim as f32).sqrt();
            let y = crate::kernels::fused::causal_attention(&q, &k, &v, scale)?; // (b, h, t, hd)
            let y = y
                .transpose(1, 2)?
                .reshape((b, t, self.n_head * self.head_dim))?;
            return self.o_proj.forward(&y);
        }
        if !s.grad && k.device().is_cpu() && q.dtype() == DType::F32 {
            // Fused blocked attention through the system BLAS, reading the cache in place.
            let scale = 1.0 / (self.head_dim as f32).sqrt();
            let y = crate::kernels::blas::causal_attention(&q, &k, &v, scale)?; // (b, t, h, hd)
            return self
                .o_proj
                .forward(&y.reshape((b, t, self.n_head * self.head_dim))?);
        }
        // The CPU matmul reads the cache's strided views in place; other backends (not tested
        // here) get contiguous copies, cheap next to their memory bandwidth.
        let (k, v) = if k.device().is_cpu() {
            (k, v)
        } else {
            (k.contiguous()?, v.contiguous()?)
        };
        let y = self.attend(&q, &k, &v, s)?; // (b, h, t, hd)
        let y = y
            .transpose(1, 2)?
            .reshape((b, t, self.n_head * self.head_dim))?;
        self.o_proj.forward(&y)
    }

    /// Whether a decoding step reads an f16 cache in place: the CPU's split-key kernel does,
    /// for f32 queries without gradients; the other paths get f32 copies.
    fn reads_half_cache(&self, q: &Tensor, s: &Step) -> bool {
        !s.grad && !self.reference_order && q.device().is_cpu() && q.dtype() == DType::F32
    }

    /// Scaled dot-product attention of `q` (b, h, t, hd) over `k`, `v` (b, kv, L, hd), with the
    /// step's causal mask; returns (b, h, t, hd).
    ///
    /// Without gradients, long inputs are attended in blocks of `ATTN_BLOCK` queries, each over
    /// only the keys it may see (the causal prefix): the score matrix never exceeds
    /// `ATTN_BLOCK x L` per head, and the masked upper triangle is never computed, which halves
    /// the attention FLOPs of a long prefill and keeps its working set in cache. Every row is
    /// the same sum over the same keys, so the result equals the unblocked one.
    fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor, s: &Step) -> Result<Tensor> {
        let t = q.dim(2)?;
        let past = k.dim(2)? - t;
        if s.grad || t <= ATTN_BLOCK {
            return self.attend_rows(q, k, v, s.mask, s.grad);
        }
        let mut out = Vec::with_capacity(t.div_ceil(ATTN_BLOCK));
        for i0 in (0..t).step_by(ATTN_BLOCK) {
            let n = ATTN_BLOCK.min(t - i0);
            let keys = past + i0 + n;
            let mask = s.mask.map(|m| m.narrow(0, i0, n)?.narrow(1, 0, keys));
            let mask = mask.transpose()?;
            out.push(self.attend_rows(
                &q.narrow(2, i0, n)?,
                &k.narrow(2, 0, keys)?,
                &v.narrow(2, 0, keys)?,
                mask.as_ref(),
                false,
            )?);
        }
        Tensor::cat(&out, 2)
    }

    /// Attention of the query rows `q` (b, h, n, hd) over keys/values (b, kv, L, hd) with an
    /// additive mask `(n, L)`.
    fn attend_rows(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: Option<&Tensor>,
        grad: bool,
    ) -> Result<Tensor> {
        let (b, _, t, _) = q.dims4()?;
        let kv_len = k.dim(2)?;
        // Grouped-query attention without copying K/V: the `rep` query heads that share one KV
        // head are stacked along the time axis.
        let rep = self.n_head / self.n_kv;
        // The 1/sqrt(hd) scale goes on q, the smaller tensor (t rows, not t x L scores).
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let q = (q
            .contiguous()?
            .reshape((b, self.n_kv, rep * t, self.head_dim))?
            * scale)?;
        let att = q.matmul(&k.t()?)?; // (b, kv, rep * t, L)
        let in_dtype = att.dtype();
        let mut att = att.to_dtype(softmax_dtype(in_dtype))?;
        if let Some(mask) = mask {
            att = att
                .reshape((b, self.n_kv, rep, t, kv_len))?
                .broadcast_add(mask)?
                .reshape((b, self.n_kv, rep * t, kv_len))?;
        }
        let att = if grad {
            candle_nn::ops::softmax(&att, D::Minus1)?
        } else {
            candle_nn::ops::softmax_last_dim(&att)?
        };
        att.to_dtype(in_dtype)?
            .matmul(v)? // (b, kv, rep * t, hd)
            .reshape((b, self.n_head, t, self.head_dim))
    }
}

/// Query rows attended at once in a long prefill (see `Attention::attend`).
const ATTN_BLOCK: usize = 256;
