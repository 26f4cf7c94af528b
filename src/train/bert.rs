//! A BERT encoder that back-propagates, and the fast one inference runs on the CPU.
//! candle-transformers' `BertModel` normalises with a fused layer-norm kernel that has no
//! backward pass, so gradients would stop at the first LayerNorm; this is the same network (same
//! parameter names, same maths, HF `modeling_bert.py`) with every linear layer through the
//! system BLAS and the fused LayerNorm and GELU (CPU, f32). Without gradients (the retrieval
//! embedder and the chunk encoder at inference, [`crate::retrieval::embed::BertEmbedder`]) the
//! layers run over each sequence's real tokens only ([`encoder_layer`]), their products in 8-bit
//! integers where the embedder asks for it ([`TrainBert::set_int8`]).

use crate::kernels::blas::encoder_layer;
use crate::kernels::{blas, fused};
use candle_core::{CpuStorage, DType, Layout, Module, Result, Storage, Tensor, D};
use candle_nn::{embedding, linear, Embedding, Linear, VarBuilder};
use candle_transformers::models::bert::{Config, HiddenAct};

/// LayerNorm in differentiable ops.
#[derive(Debug, Clone)]
struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    fn new(size: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: vb.get(size, "weight")?,
            bias: vb.get(size, "bias")?,
            eps,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if fused::usable(x) {
            return fused::layer_norm(x, &self.weight, &self.bias, self.eps as f32);
        }
        let mean = x.mean_keepdim(D::Minus1)?;
        let x = x.broadcast_sub(&mean)?;
        let var = x.sqr()?.mean_keepdim(D::Minus1)?;
        let x = x.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        x.broadcast_mul(&self.weight)?.broadcast_add(&self.bias)
    }
}

#[derive(Debug, Clone)]
struct Layer {
    query: Linear,
    key: Linear,
    value: Linear,
    attn_out: Linear,
    attn_norm: LayerNorm,
    inter: Linear,
    out: Linear,
    out_norm: LayerNorm,
    heads: usize,
    eps: f64,
    act: HiddenAct,
}

impl Layer {
    fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let (h, f, eps) = (cfg.hidden_size, cfg.intermediate_size, cfg.layer_norm_eps);
        let a = vb.pp("attention");
        Ok(Self {
            query: linear(h, h, a.pp("self.query"))?,
            key: linear(h, h, a.pp("self.key"))?,
            value: linear(h, h, a.pp("self.value"))?,
            attn_out: linear(h, h, a.pp("output.dense"))?,
            attn_norm: LayerNorm::new(h, eps, a.pp("output.LayerNorm"))?,
            inter: linear(h, f, vb.pp("intermediate.dense"))?,
            out: linear(f, h, vb.pp("output.dense"))?,
            out_norm: LayerNorm::new(h, eps, vb.pp("output.LayerNorm"))?,
            heads: cfg.num_attention_heads,
            eps,
            act: cfg.hidden_act,
        })
    }

    /// Whether any parameter trains (is a variable or depends on one).
    fn trains(&self) -> bool {
        self.tensors()
            .iter()
            .any(|t| t.is_some_and(Tensor::track_op))
    }

    /// Weights and biases in the order of [`encoder_layer::LayerParams`]'s fields.
    fn tensors(&self) -> [Option<&Tensor>; 16] {
        fn lin(l: &Linear) -> [Option<&Tensor>; 2] {
            [Some(l.weight()), l.bias()]
        }
        fn norm(n: &LayerNorm) -> [Option<&Tensor>; 2] {
            [Some(&n.weight), Some(&n.bias)]
        }
        let [a, b] = lin(&self.query);
        let [c, d] = lin(&self.key);
        let [e, f] = lin(&self.value);
        let [g, h] = lin(&self.attn_out);
        let [i, j] = norm(&self.attn_norm);
        let [k, l] = lin(&self.inter);
        let [m, n] = lin(&self.out);
        let [o, p] = norm(&self.out_norm);
        [a, b, c, d, e, f, g, h, i, j, k, l, m, n, o, p]
    }

    /// Run `f` on this layer's parameters as slices; `None` where the packed layer cannot
    /// stand in for [`Layer::forward`] (a missing bias, the tanh GELU).
    fn with_params<R>(
        &self,
        f: impl FnOnce(&encoder_layer::LayerParams) -> R,
    ) -> Result<Option<R>> {
        let act = match self.act {
            HiddenAct::Gelu => encoder_layer::Activation::GeluErf,
            HiddenAct::Relu => encoder_layer::Activation::Relu,
            HiddenAct::GeluApproximate => return Ok(None),
        };
        let Some(tensors) = self.tensors().into_iter().collect::<Option<Vec<_>>>() else {
            return Ok(None);
        };
        let held: Vec<_> = tensors.iter().map(|t| t.storage_and_layout()).collect();
        let v = held
            .iter()
            .map(|(s, l)| cpu_f32(s, l))
            .collect::<Result<Vec<_>>>()?;
        let p = encoder_layer::LayerParams {
            query: (v[0], v[1]),
            key: (v[2], v[3]),
            value: (v[4], v[5]),
            attn_out: (v[6], v[7]),
            attn_norm: (v[8], v[9]),
            inter: (v[10], v[11]),
            out: (v[12], v[13]),
            out_norm: (v[14], v[15]),
            heads: self.heads,
            eps: self.eps as f32,
            act,
        };
        Ok(Some(f(&p)))
    }

    /// `(b, s, h)` -> `(b, heads, s, hd)`.
    fn split(&self, x: Tensor) -> Result<Tensor> {
        let (b, s, h) = x.dims3()?;
        x.reshape((b, s, self.heads, h / self.heads))?
            .transpose(1, 2)?
            .contiguous()
    }

    /// `x` `(b, s, h)`, `mask` additive `(b, 1, 1, s)`.
    fn forward(&self, x: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let (b, s, h) = x.dims3()?;
        let q = self.split(blas::linear(&self.query, x)?)?;
        let k = self.split(blas::linear(&self.key, x)?)?;
        let v = self.split(blas::linear(&self.value, x)?)?;
        let scale = 1.0 / ((h / self.heads) as f64).sqrt();
        let att = (q.matmul(&k.t()?)? * scale)?.broadcast_add(mask)?; // (b, heads, s, s)
        let att = candle_nn::ops::softmax(&att, D::Minus1)?;
        let ctx = att.matmul(&v)?.transpose(1, 2)?.reshape((b, s, h))?;
        let x = self
            .attn_norm
            .forward(&(blas::linear(&self.attn_out, &ctx)? + x)?)?;
        let f = blas::linear(&self.inter, &x)?;
        let f = match self.act {
            HiddenAct::Gelu if fused::usable(&f) => fused::gelu_erf(&f)?,
            HiddenAct::Gelu => f.gelu_erf()?,
            HiddenAct::GeluApproximate => f.gelu()?,
            HiddenAct::Relu => f.relu()?,
        };
        self.out_norm.forward(&(blas::linear(&self.out, &f)? + x)?)
    }
}

/// BERT embeddings + encoder layers, differentiable.
#[derive(Debug, Clone)]
pub struct TrainBert {
    words: Embedding,
    positions: Embedding,
    types: Embedding,
    norm: LayerNorm,
    layers: Vec<Layer>,
    /// Each layer's linear weights in 8 bits, for the packed layers (`None`: f32 products).
    int8: Option<Vec<encoder_layer::Int8Weights>>,
}

impl TrainBert {
    /// Variables under `vb` with HF names (`embeddings.word_embeddings.weight`,
    /// `encoder.layer.0.attention.self.query.weight`, ...); give `vb.pp("bert")` for files that
    /// prefix them.
    pub fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let e = vb.pp("embeddings");
        let h = cfg.hidden_size;
        Ok(Self {
            words: embedding(cfg.vocab_size, h, e.pp("word_embeddings"))?,
            positions: embedding(cfg.max_position_embeddings, h, e.pp("position_embeddings"))?,
            types: embedding(cfg.type_vocab_size, h, e.pp("token_type_embeddings"))?,
            norm: LayerNorm::new(h, cfg.layer_norm_eps, e.pp("LayerNorm"))?,
            layers: (0..cfg.num_hidden_layers)
                .map(|i| Layer::new(cfg, vb.pp(format!("encoder.layer.{i}"))))
                .collect::<Result<_>>()?,
            int8: None,
        })
    }

    /// Run the packed layers' products (a forward without gradients on the CPU in f32) in 8-bit
    /// integers (`on`) or in f32 (the default). Turning it on quantizes every linear weight now,
    /// once; the weights must not change afterwards (an inference model's never do: a model
    /// that trains keeps its f32 path, see [`TrainBert::forward_with`]). Where the packed layers
    /// do not apply (no biases, the tanh GELU) it stays off.
    pub fn set_int8(&mut self, on: bool) {
        // An error here (a tensor not contiguous f32 on the CPU) is the packed path's own: left
        // off, the f32 forward reports it.
        self.int8 = if on {
            self.layers
                .iter()
                .map(|l| l.with_params(encoder_layer::Int8Weights::new))
                .collect::<Result<Option<Vec<_>>>>()
                .ok()
                .flatten()
        } else {
            None
        };
    }

    /// Whether the packed layers' products run in 8 bits ([`TrainBert::set_int8`]).
    pub fn int8(&self) -> bool {
        self.int8.is_some()
    }

    /// Last-layer states `(b, s, h)` of ids, type ids and attention mask `(b, s)` u32.
    pub fn forward(&self, ids: &Tensor, type_ids: &Tensor, mask: &Tensor) -> Result<Tensor> {
        self.forward_with(ids, type_ids, mask, true)
    }

    /// [`TrainBert::forward`]; `packed` lets a forward without gradients on the CPU in f32 run
    /// its layers over the real tokens only ([`encoder_layer`]), else every layer is tensor ops.
    pub(crate) fn forward_with(
        &self,
        ids: &Tensor,
        type_ids: &Tensor,
        mask: &Tensor,
        packed: bool,
    ) -> Result<Tensor> {
        let (_b, s) = ids.dims2()?;
        let pos = Tensor::arange(0u32, s as u32, ids.device())?;
        // The token-embedding table never trains (see `train::parts::FROZEN_ENCODER_SUFFIX`):
        // looked up detached, so the backward pass does not scatter into a 30K-row gradient.
        let table = self.words.embeddings();
        let words = Embedding::new(table.detach(), table.dim(1)?).forward(ids)?;
        let x = (words + self.types.forward(type_ids)?)?
            .broadcast_add(&self.positions.forward(&pos)?)?;
        let mut x = self.norm.forward(&x)?;
        // Additive mask: 0 for tokens, f32::MIN for padding, as `BertModel` does.
        let m = mask.to_dtype(DType::F32)?;
        let add = ((m.ones_like()? - &m)? * f64::from(f32::MIN))?
            .unsqueeze(1)?
            .unsqueeze(1)?;
        // Only the packed CPU f32 layers use the lengths; elsewhere reading the mask back
        // would cost a device sync per forward.
        if packed && fused::usable(&x) && !x.track_op() {
            if let Some(lens) = prefix_lengths(&mask.to_dtype(DType::U32)?.to_vec2::<u32>()?) {
                if let Some(y) = self.packed_layers(&x, &lens)? {
                    return Ok(y);
                }
            }
        }
        for layer in &self.layers {
            x = layer.forward(&x, &add)?;
        }
        Ok(x)
    }

    /// The layers over the packed real tokens of `x` `(b, s, h)`, or `None` where that path does
    /// not apply (gradients to track, an activation it lacks, a layer without biases).
    fn packed_layers(&self, x: &Tensor, lens: &[usize]) -> Result<Option<Tensor>> {
        if x.track_op() || self.layers.iter().any(Layer::trains) {
            return Ok(None);
        }
        let (b, s, h) = x.dims3()?;
        let xv = x.flatten_all()?.to_vec1::<f32>()?;
        let mut packed = encoder_layer::Packed::from_padded(&xv, s, h, lens);
        for (i, layer) in self.layers.iter().enumerate() {
            let int8 = self.int8.as_ref().map(|q| &q[i]);
            if layer.with_params(|p| packed.layer(p, int8))?.is_none() {
                return Ok(None);
            }
        }
        Tensor::from_vec(packed.to_padded(s), (b, s, h), x.device()).map(Some)
    }
}

/// The f32 data of a CPU tensor's storage, for a contiguous layout.
fn cpu_f32<'a>(storage: &'a Storage, layout: &Layout) -> Result<&'a [f32]> {
    match (storage, layout.contiguous_offsets()) {
        (Storage::Cpu(CpuStorage::F32(v)), Some((a, b))) => Ok(&v[a..b]),
        _ => candle_core::bail!("packed BERT layer: expected a contiguous f32 CPU tensor"),
    }
}

/// The number of real tokens of each mask row when every row is ones then zeros (right
/// padding, as [`crate::retrieval::embed::TokenBatch`] pads), else `None`.
fn prefix_lengths(mask: &[Vec<u32>]) -> Option<Vec<usize>> {
    mask.iter()
        .map(|row| {
            let len = row.iter().take_while(|&&v| v != 0).count();
            row[len..].iter().all(|&v| v == 0).then_some(len)
        })
        .collect()
}
