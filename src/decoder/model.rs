//! The Llama-family transformer itself: embeddings in, logits out, with a KV cache and a causal
//! mask. Parameter names follow Hugging Face (`model.embed_tokens`, `model.layers.N.self_attn.
//! q_proj`, ..., `lm_head`), so the same code loads safetensors, dequantized GGUF tensors
//! (renamed and un-permuted in `gguf.rs`), or a `VarMap` for training.
//!
//! Two numerically identical paths: the fused candle kernels (rotary, softmax, RMS norm) for
//! inference, and the same maths in plain tensor ops when gradients are needed, because the fused
//! kernels do not back-propagate. The slow path is chosen automatically when the input tracks
//! gradients or the weights are trainable variables.

use candle_core::{DType, Device, IndexOp, Module, Result, Tensor};
use candle_nn::{linear_b, Embedding, Init, Linear, VarBuilder};

use super::cache::KvCache;
use super::config::DecoderConfig;

mod attention;
mod decode_step;
mod fast;
mod proj;

use attention::{Attention, Step};
pub use fast::GREEDY_KEEP;
use proj::Proj;

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
    /// The last position for greedy decoding, `(b, vocab)`: only the argmax has to be right,
    /// so on the decoding fast path only the rows that can win are scored and the rest are
    /// minus infinity ([`Decoder::greedy_logits`]); as `Last` elsewhere.
    Greedy,
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
        let [g, u] = Proj::forward_group([&self.gate_proj, &self.up_proj], x)?;
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
    /// Storage dtype of the KV caches [`Decoder::new_cache`] makes (`None`: `dtype`).
    kv_store: Option<DType>,
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
            kv_store: None,
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

    /// An empty KV cache with room for `capacity` positions (grows if exceeded), storing keys
    /// and values as [`Decoder::set_kv_storage`] says.
    pub fn new_cache(&self, capacity: usize) -> KvCache {
        KvCache::new(self.cfg.num_hidden_layers, capacity).stored_as(self.kv_store)
    }

    /// Store the keys and values of new caches as `dtype` (`None`: the model's dtype). F16
    /// halves what a decoding step reads after a long context; the CPU's decoding attention
    /// reads it in place, prefill attends its own unrounded keys.
    pub fn set_kv_storage(&mut self, dtype: Option<DType>) {
        self.kv_store = dtype.filter(|&d| d != self.dtype);
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
        let grad = self.trainable || x.track_op() || self.dtype == DType::F64;
        if t == 1 && x.dim(0)? == 1 && !grad && self.has_fast_step() {
            if let Some(c) = cache.as_deref_mut() {
                let h = self.decode_step(x, c)?;
                c.advance(1);
                return self.logits(&h, logits, false);
            }
        }
        let past = cache.as_deref().map_or(0, KvCache::len);
        let (cos, sin) = self.rotary(past, t)?;
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
        self.logits(&h, logits, step.grad)
    }

    /// The final norm and the LM head over the positions `logits` asks for of `h` `(b, t, d)`.
    fn logits(&self, h: &Tensor, logits: Logits, grad: bool) -> Result<Tensor> {
        let t = h.dim(1)?;
        if logits == Logits::Greedy && !grad {
            if let Some(l) = self.greedy_logits(h)? {
                return Ok(l);
            }
        }
        let h = match logits {
            Logits::All => h.clone(),
            Logits::Last | Logits::Greedy => h.i((.., t - 1, ..))?.contiguous()?, // (b, d)
            Logits::Tail(n) => h.narrow(1, t - n.min(t), n.min(t))?.contiguous()?, // (b, n, d)
        };
        let h = self.norm.forward(&h, grad)?;
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
