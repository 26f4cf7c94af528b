//! The Llama-family transformer itself: embeddings in, logits out, with a KV cache and a causal
//! mask. Parameter names follow Hugging Face (`model.embed_tokens`, `model.layers.N.self_attn.
//! q_proj`, ..., `lm_head`), so the same code loads safetensors, dequantized GGUF tensors
//! (renamed and un-permuted in `gguf.rs`), or a `VarMap` for training.
//!
//! Two numerically identical paths: the fused candle kernels (rotary, softmax, RMS norm) for
//! inference, and the same maths in plain tensor ops when gradients are needed, because the fused
//! kernels do not back-propagate. The slow path is chosen automatically when the input tracks
//! gradients or the weights are trainable variables.

use candle_core::{
    CpuStorage, CudaStorage, CustomOp2, DType, Device, IndexOp, Layout, MetalStorage, Module,
    Result, Shape, Tensor, D,
};
use candle_nn::{linear_b, Embedding, Init, Linear, VarBuilder};

use super::cache::KvCache;
use super::config::DecoderConfig;

mod fast;

/// Which positions to return logits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// Every position: `(b, t, vocab)` (training, scoring).
    All,
    /// Only the last position: `(b, vocab)` (generation).
    Last,
    /// The last `n` positions: `(b, n, vocab)` (training: only the targets' positions go
    /// through the LM head, and no vocabulary-wide tensor is cut afterwards).
    Tail(usize),
}

/// RMS norm with its weight kept at hand so either path can use it.
#[derive(Debug, Clone)]
struct RmsNorm {
    weight: Tensor,
    eps: f32,
}

impl RmsNorm {
    fn new(size: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get_with_hints(size, "weight", Init::Const(1.0))?;
        Ok(RmsNorm {
            weight,
            eps: eps as f32,
        })
    }

    fn forward(&self, x: &Tensor, grad: bool) -> Result<Tensor> {
        if grad && crate::kernels::fused::usable(x) {
            crate::kernels::fused::rms_norm(x, &self.weight, self.eps)
        } else if grad {
            candle_nn::ops::rms_norm_slow(x, &self.weight, self.eps)
        } else {
            candle_nn::ops::rms_norm(&x.contiguous()?, &self.weight, self.eps)
        }
    }
}

/// What every layer needs for one forward call.
struct Step<'a> {
    /// Rotary tables for the positions of this call, `(t, head_dim / 2)` each.
    cos: &'a Tensor,
    sin: &'a Tensor,
    /// Additive causal mask `(t, past + t)` in `softmax_dtype`, `None` for a single position.
    mask: Option<&'a Tensor>,
    /// Use plain (differentiable) tensor ops instead of the fused kernels.
    grad: bool,
}

#[derive(Debug, Clone)]
struct Attention {
    q_proj: Proj,
    k_proj: Proj,
    v_proj: Proj,
    o_proj: Proj,
    /// q/k rows in llama.cpp's interleaved rotary layout (quantized GGUF weights, kept as
    /// stored): rotate adjacent pairs instead of the two halves.
    interleaved: bool,
    /// Attend in candle-transformers' `quantized_llama` order of operations (kept-quantized
    /// weights), not through the fused BLAS op.
    reference_order: bool,
    n_head: usize,
    n_kv: usize,
    head_dim: usize,
}

impl Attention {
    fn new(cfg: &DecoderConfig, vb: VarBuilder) -> Result<Self> {
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

    fn forward(
        &self,
        x: &Tensor,
        s: &Step,
        cache: Option<(&mut KvCache, usize)>,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let q = self.rope(&self.heads(self.q_proj.forward(x)?, self.n_head)?, s)?; // (b, h, t, hd)
        let k = self.rope(&self.heads(self.k_proj.forward(x)?, self.n_kv)?, s)?; // (b, kv, t, hd)
        let v = self.heads(self.v_proj.forward(x)?, self.n_kv)?; // (b, kv, t, hd)
        let (k, v) = match cache {
            Some((c, layer)) => c.append(layer, &k, &v)?, // (b, kv, L, hd)
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
        if !s.grad && k.device().is_cpu() && k.dtype() == DType::F32 {
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

#[derive(Debug, Clone)]
struct Mlp {
    gate_proj: Proj,
    up_proj: Proj,
    down_proj: Proj,
}

impl Mlp {
    fn new(cfg: &DecoderConfig, vb: VarBuilder) -> Result<Self> {
        let (d, f) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(Mlp {
            gate_proj: Proj::Dense(linear_b(d, f, false, vb.pp("gate_proj"))?),
            up_proj: Proj::Dense(linear_b(d, f, false, vb.pp("up_proj"))?),
            down_proj: Proj::Dense(linear_b(f, d, false, vb.pp("down_proj"))?),
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let g = self.gate_proj.forward(x)?;
        let u = self.up_proj.forward(x)?;
        let h = if (g.track_op() || u.track_op()) && crate::kernels::fused::usable(&g) {
            crate::kernels::fused::swiglu(&g, &u)?
        } else {
            (candle_nn::ops::silu(&g)? * u)?
        };
        self.down_proj.forward(&h)
    }
}

#[derive(Debug, Clone)]
struct Block {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
}

impl Block {
    fn new(cfg: &DecoderConfig, vb: VarBuilder) -> Result<Self> {
        let (d, eps) = (cfg.hidden_size, cfg.rms_norm_eps);
        Ok(Block {
            input_layernorm: RmsNorm::new(d, eps, vb.pp("input_layernorm"))?,
            self_attn: Attention::new(cfg, vb.pp("self_attn"))?,
            post_attention_layernorm: RmsNorm::new(d, eps, vb.pp("post_attention_layernorm"))?,
            mlp: Mlp::new(cfg, vb.pp("mlp"))?,
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        s: &Step,
        cache: Option<(&mut KvCache, usize)>,
    ) -> Result<Tensor> {
        let h = self.input_layernorm.forward(x, s.grad)?;
        let x = (x + self.self_attn.forward(&h, s, cache)?)?;
        let h = self.post_attention_layernorm.forward(&x, s.grad)?;
        x + self.mlp.forward(&h)?
    }
}

/// A Llama-family causal LM that reads input embeddings.
#[derive(Debug, Clone)]
pub struct Decoder {
    cfg: DecoderConfig,
    embed_tokens: Embedding,
    layers: Vec<Block>,
    norm: RmsNorm,
    lm_head: Proj,
    inv_freq: Vec<f32>,
    /// Some weight is a trainable `Var`: always take the differentiable path.
    trainable: bool,
    /// Projections kept quantized ([`Decoder::quantize_from`]).
    quantized: bool,
    device: Device,
    dtype: DType,
}

impl Decoder {
    /// Build from weights with Hugging Face names (`model.embed_tokens.weight`, ...). With a
    /// `VarBuilder` over a `VarMap`, missing weights are created (training from scratch or
    /// fine-tuning after `VarMap::load`).
    pub fn new(cfg: &DecoderConfig, vb: VarBuilder) -> Result<Self> {
        let m = vb.pp("model");
        // Fresh variables (an empty `VarMap`) start like HF's `initializer_range = 0.02`.
        let init = Init::Randn {
            mean: 0.0,
            stdev: 0.02,
        };
        let embed = m.get_with_hints(
            (cfg.vocab_size, cfg.hidden_size),
            "embed_tokens.weight",
            init,
        )?;
        let embed_tokens = Embedding::new(embed.clone(), cfg.hidden_size);
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| Block::new(cfg, m.pp(format!("layers.{i}"))))
            .collect::<Result<Vec<_>>>()?;
        let norm = RmsNorm::new(cfg.hidden_size, cfg.rms_norm_eps, m.pp("norm"))?;
        let lm_head = if cfg.tie_word_embeddings {
            Linear::new(embed.clone(), None)
        } else {
            linear_b(cfg.hidden_size, cfg.vocab_size, false, vb.pp("lm_head"))?
        };
        let trainable = embed.is_variable()
            || lm_head.weight().is_variable()
            || layers
                .first()
                .is_some_and(|l| l.self_attn.q_proj.is_variable());
        let lm_head = Proj::Dense(lm_head);
        Ok(Decoder {
            cfg: cfg.clone(),
            embed_tokens,
            layers,
            norm,
            lm_head,
            inv_freq: cfg.inv_freq(),
            trainable,
            quantized: false,
            device: vb.device().clone(),
            dtype: embed.dtype(),
        })
    }

    /// Replace every projection and the LM head with the quantized tensors of the GGUF file this
    /// decoder was loaded from, multiplied by candle's quantized kernels: a quarter of the
    /// memory for Q4 weights, and the same arithmetic as candle-transformers'
    /// `quantized_llama` (its activations are quantized too). Inference only. `tensor` reads a
    /// GGUF tensor by its llama.cpp name, `lm_head` names the output matrix (`output.weight`, or
    /// `token_embd.weight` when tied); Llama q/k rows stay in llama.cpp's interleaved rotary
    /// layout and are rotated accordingly.
    pub fn quantize_from(
        &mut self,
        mut tensor: impl FnMut(&str) -> anyhow::Result<candle_core::quantized::QTensor>,
        lm_head: &str,
    ) -> anyhow::Result<()> {
        if self.trainable {
            anyhow::bail!("a trainable decoder cannot be quantized");
        }
        let interleaved = self.cfg.arch == super::config::Arch::Llama;
        for (i, l) in self.layers.iter_mut().enumerate() {
            let mut q = |name: &str, p: &Proj| -> anyhow::Result<Proj> {
                Ok(Proj::quant(
                    tensor(&format!("blk.{i}.{name}.weight"))?,
                    p.bias(),
                )?)
            };
            let a = &mut l.self_attn;
            a.q_proj = q("attn_q", &a.q_proj)?;
            a.k_proj = q("attn_k", &a.k_proj)?;
            a.v_proj = q("attn_v", &a.v_proj)?;
            a.o_proj = q("attn_output", &a.o_proj)?;
            a.interleaved = interleaved;
            a.reference_order = true;
            let m = &mut l.mlp;
            m.gate_proj = q("ffn_gate", &m.gate_proj)?;
            m.up_proj = q("ffn_up", &m.up_proj)?;
            m.down_proj = q("ffn_down", &m.down_proj)?;
        }
        self.lm_head = Proj::quant(tensor(lm_head)?, None)?;
        self.quantized = true;
        Ok(())
    }

    /// Put low-rank adapters on the projections `cfg.targets` of every layer, their weights
    /// taken from (or, when absent, created in) `vars` under `model.layers.N.<module>.<proj>.
    /// lora_{a,b}`: `A` seeded small random, `B` zero, so a fresh adapter changes nothing.
    /// With `train` they stay a differentiable side path and the decoder takes the gradient
    /// path; without, they are merged into dense weights (inference costs nothing extra) or
    /// run beside quantized ones.
    pub fn add_lora(
        &mut self,
        cfg: &super::lora::LoraConfig,
        vars: &candle_nn::VarMap,
        train: bool,
    ) -> anyhow::Result<()> {
        cfg.check()?;
        let scale = cfg.scale();
        let dev = self.device.clone();
        for (i, l) in self.layers.iter_mut().enumerate() {
            for target in &cfg.targets {
                let (module, slot) = match target.as_str() {
                    "q_proj" => ("self_attn", &mut l.self_attn.q_proj),
                    "k_proj" => ("self_attn", &mut l.self_attn.k_proj),
                    "v_proj" => ("self_attn", &mut l.self_attn.v_proj),
                    "o_proj" => ("self_attn", &mut l.self_attn.o_proj),
                    "gate_proj" => ("mlp", &mut l.mlp.gate_proj),
                    "up_proj" => ("mlp", &mut l.mlp.up_proj),
                    "down_proj" => ("mlp", &mut l.mlp.down_proj),
                    other => anyhow::bail!("LoRA target '{other}' is not a decoder projection"),
                };
                let (out, inp) = slot.dense_dims()?;
                let name = format!("model.layers.{i}.{module}.{target}");
                let bound = (3.0 / inp as f64).sqrt();
                let a = super::lora::lora_var(
                    vars,
                    &format!("{name}.lora_a"),
                    (cfg.rank, inp),
                    Some(bound),
                    cfg.seed,
                    &dev,
                )?;
                let b = super::lora::lora_var(
                    vars,
                    &format!("{name}.lora_b"),
                    (out, cfg.rank),
                    None,
                    cfg.seed,
                    &dev,
                )?;
                let (a, b) = if train {
                    (a, b)
                } else {
                    (a.detach(), b.detach())
                };
                let base = std::mem::replace(slot, Proj::Dense(Linear::new(a.clone(), None)));
                *slot = base.with_lora(a, b, scale, train)?;
            }
        }
        if train {
            self.trainable = true;
        }
        Ok(())
    }

    pub fn config(&self) -> &DecoderConfig {
        &self.cfg
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The dtype the weights and hidden states are in.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn hidden_size(&self) -> usize {
        self.cfg.hidden_size
    }

    /// An empty KV cache with room for `capacity` positions (grows if exceeded).
    pub fn new_cache(&self, capacity: usize) -> KvCache {
        KvCache::new(self.cfg.num_hidden_layers, capacity)
    }

    /// Token embeddings: ids `(b, t)` u32 -> `(b, t, d)`.
    pub fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        self.embed_tokens.forward(ids)
    }

    /// Run the decoder on input embeddings `x` `(b, t, d)`. Positions continue from the cache's
    /// length (0 without a cache); the new keys and values are appended to it. Returns f32
    /// logits (f64 for an f64 model), `(b, t, vocab)` or `(b, vocab)`. Sequences of a batch share one length; right
    /// padding is harmless (the mask is causal), left padding is not supported.
    pub fn forward_embeds(
        &self,
        x: &Tensor,
        mut cache: Option<&mut KvCache>,
        logits: Logits,
    ) -> Result<Tensor> {
        let (_b, t, _d) = x.dims3()?;
        if t == 0 {
            candle_core::bail!("decoder: empty input (t = 0)");
        }
        if let Some(c) = cache.as_deref() {
            if c.num_layers() != self.layers.len() {
                candle_core::bail!(
                    "decoder: cache for {} layers, model has {}",
                    c.num_layers(),
                    self.layers.len()
                );
            }
        }
        let past = cache.as_deref().map_or(0, KvCache::len);
        let (cos, sin) = self.rotary(past, t)?;
        let grad = self.trainable || x.track_op() || self.dtype == DType::F64;
        // The fused CPU attention (f32, no gradients) applies the causal mask itself.
        let fused = !grad && !self.quantized && self.device.is_cpu() && self.dtype == DType::F32;
        let mask = if t > 1 && !fused {
            Some(causal_mask(past, t, &self.device)?.to_dtype(softmax_dtype(self.dtype))?)
        } else {
            None
        };
        let step = Step {
            cos: &cos,
            sin: &sin,
            mask: mask.as_ref(),
            // The fused kernels neither back-propagate nor take f64.
            grad,
        };
        let mut h = x.to_dtype(self.dtype)?;
        for (i, layer) in self.layers.iter().enumerate() {
            h = layer.forward(&h, &step, cache.as_deref_mut().map(|c| (c, i)))?;
        }
        if let Some(c) = cache {
            c.advance(t);
        }
        let h = match logits {
            Logits::All => h,
            Logits::Last => h.i((.., t - 1, ..))?.contiguous()?, // (b, d)
            Logits::Tail(n) => h.narrow(1, t - n.min(t), n.min(t))?.contiguous()?, // (b, n, d)
        };
        let h = self.norm.forward(&h, step.grad)?;
        self.lm_head
            .forward(&h)?
            .to_dtype(softmax_dtype(self.dtype))
    }

    /// `forward_embeds` on `embed(ids)`; ids `(b, t)` u32.
    pub fn forward_ids(
        &self,
        ids: &Tensor,
        cache: Option<&mut KvCache>,
        logits: Logits,
    ) -> Result<Tensor> {
        self.forward_embeds(&self.embed(ids)?, cache, logits)
    }

    /// Rotary cos/sin for positions `past .. past + t`, `(t, head_dim / 2)` each.
    fn rotary(&self, past: usize, t: usize) -> Result<(Tensor, Tensor)> {
        let half = self.inv_freq.len();
        let angles: Vec<f32> = (past..past + t)
            .flat_map(|p| self.inv_freq.iter().map(move |f| p as f32 * f))
            .collect();
        let angles = Tensor::from_vec(angles, (t, half), &self.device)?;
        Ok((
            angles.cos()?.to_dtype(self.dtype)?,
            angles.sin()?.to_dtype(self.dtype)?,
        ))
    }
}

/// A linear map: dense weights (any source, trainable or not), or a llama.cpp-quantized GGUF
/// tensor multiplied by candle's quantized kernels (inference only; activations are quantized
/// the way llama.cpp does, so results match `quantized_llama` exactly).
#[derive(Debug, Clone)]
enum Proj {
    Dense(Linear),
    Quant {
        mm: candle_core::quantized::QMatMul,
        bias: Option<Tensor>,
    },
    /// Dense weights plus their quantized twin for few-row inputs (decoding; [`fast`]).
    Fast(Box<fast::FastProj>),
    /// A frozen projection plus a low-rank adapter: `base(x) + scale (x A^T) B^T`.
    Lora {
        base: Box<Proj>,
        /// `(r, in)`.
        a: Tensor,
        /// `(out, r)`.
        b: Tensor,
        scale: f64,
    },
}

impl Proj {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Proj::Dense(l) => linear(l, x),
            Proj::Quant { mm, bias } => {
                let y = mm.forward(x)?;
                match bias {
                    Some(b) => y.broadcast_add(b),
                    None => Ok(y),
                }
            }
            Proj::Fast(f) => f.forward(x),
            Proj::Lora { base, a, b, scale } => {
                let low = crate::kernels::blas::matmul_t(x, a)?;
                let side = (crate::kernels::blas::matmul_t(&low, b)? * *scale)?;
                base.forward(x)? + side
            }
        }
    }

    fn is_variable(&self) -> bool {
        matches!(self, Proj::Dense(l) if l.weight().is_variable())
    }

    fn bias(&self) -> Option<Tensor> {
        match self {
            Proj::Dense(l) => l.bias().cloned(),
            Proj::Quant { bias, .. } => bias.clone(),
            Proj::Fast(f) => f.dense.bias().cloned(),
            Proj::Lora { base, .. } => base.bias(),
        }
    }

    /// `(out, in)` of a dense projection.
    fn dense_dims(&self) -> Result<(usize, usize)> {
        match self {
            Proj::Dense(l) => l.weight().dims2(),
            Proj::Quant { mm, .. } => match mm {
                candle_core::quantized::QMatMul::QTensor(q) => q.shape().dims2(),
                candle_core::quantized::QMatMul::Tensor(t)
                | candle_core::quantized::QMatMul::TensorF16(t) => t.dims2(),
            },
            Proj::Fast(f) => f.dense.weight().dims2(),
            Proj::Lora { base, .. } => base.dense_dims(),
        }
    }

    /// Put the adapter `(a, b, scale)` on this projection: merged into dense weights
    /// (`W + scale B A`, inference), or as a side path (`train`, or quantized weights).
    fn with_lora(self, a: Tensor, b: Tensor, scale: f64, train: bool) -> Result<Proj> {
        match self {
            Proj::Dense(l) if !train => Ok(Proj::Dense(merged(&l, &a, &b, scale)?)),
            // Merged into the dense weights, and beside the quantized twin as a side path.
            Proj::Fast(f) if !train && f.side.is_none() => {
                Ok(Proj::Fast(Box::new(fast::FastProj {
                    dense: merged(&f.dense, &a, &b, scale)?,
                    q: f.q,
                    act: f.act,
                    side: Some((a, b, scale)),
                })))
            }
            Proj::Fast(f) => Proj::Dense(f.dense).with_lora(a, b, scale, train),
            base => Ok(Proj::Lora {
                base: Box::new(base),
                a,
                b,
                scale,
            }),
        }
    }

    fn quant(q: candle_core::quantized::QTensor, bias: Option<Tensor>) -> Result<Self> {
        Ok(Proj::Quant {
            mm: candle_core::quantized::QMatMul::from_qtensor(q)?,
            bias,
        })
    }
}

/// `W + scale B A`: an adapter merged into a dense projection.
fn merged(l: &Linear, a: &Tensor, b: &Tensor, scale: f64) -> Result<Linear> {
    let w = (l.weight() + (b.matmul(a)? * scale)?.to_dtype(l.weight().dtype())?)?;
    Ok(Linear::new(w, l.bias().cloned()))
}

/// `l.forward(x)`, except that when `x` needs a gradient and the weight is frozen (a plain
/// tensor, not a `Var`) the backward pass computes only the input's gradient: candle's matmul
/// backward always computes both operands' gradients, and for a frozen decoder the weights' are
/// thrown away (in training the encoder through a frozen decoder, they were most of the work).
fn linear(l: &Linear, x: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::F32 {
        // The system BLAS: faster, and it skips a frozen weight's gradient by itself.
        return crate::kernels::blas::linear(l, x);
    }
    if !x.track_op() || l.weight().is_variable() {
        return l.forward(x);
    }
    let y = l.forward(&x.detach())?;
    y.apply_op2(x, InputGradOnly(l.weight().clone()))
}

/// Passes its first argument `y = x W^T (+ b)` through unchanged; its backward gives the second
/// argument `x` the gradient `grad W` and `y` none (`y` was computed from a detached `x`).
struct InputGradOnly(Tensor);

impl InputGradOnly {
    fn pass<S: candle_core::backend::BackendStorage>(s: &S, l: &Layout) -> Result<(S, Shape)> {
        if !l.is_contiguous() || l.start_offset() != 0 {
            candle_core::bail!("frozen linear: output is not a fresh contiguous tensor");
        }
        Ok((s.try_clone(l)?, l.shape().clone()))
    }
}

impl CustomOp2 for InputGradOnly {
    fn name(&self) -> &'static str {
        "frozen-linear-input-grad"
    }

    fn cpu_fwd(
        &self,
        s: &CpuStorage,
        l: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        Self::pass(s, l)
    }

    fn cuda_fwd(
        &self,
        s: &CudaStorage,
        l: &Layout,
        _: &CudaStorage,
        _: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        Self::pass(s, l)
    }

    fn metal_fwd(
        &self,
        s: &MetalStorage,
        l: &Layout,
        _: &MetalStorage,
        _: &Layout,
    ) -> Result<(MetalStorage, Shape)> {
        Self::pass(s, l)
    }

    fn bwd(
        &self,
        _y: &Tensor,
        _x: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // (.., out) @ (out, in) -> (.., in)
        Ok((None, Some(grad.broadcast_matmul(&self.0)?)))
    }
}

/// Attention scores are normalised, and logits returned, in f32 (f64 stays f64).
fn softmax_dtype(dtype: DType) -> DType {
    if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// Additive causal mask `(t, past + t)`: 0 where query `i` (at position `past + i`) may attend to
/// key `j`, minus infinity where `j > past + i`.
fn causal_mask(past: usize, t: usize, device: &Device) -> Result<Tensor> {
    let l = past + t;
    let mask: Vec<f32> = (0..t)
        .flat_map(|i| (0..l).map(move |j| if j > past + i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_vec(mask, (t, l), device)
}
