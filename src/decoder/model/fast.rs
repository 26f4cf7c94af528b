//! The decoding fast path of a GGUF decoder: beside each dense (dequantized f32) projection, the
//! same matrix in the file's own quantized blocks ([`crate::kernels::qgemv`]). A forward pass
//! of a few rows (one token a step while decoding) multiplies the quantized blocks, reading ~0.6
//! bytes a weight instead of 4; longer inputs (prefill, scoring) and anything that needs a
//! gradient keep the f32 BLAS product. A merged LoRA adapter stays in the dense weights and runs
//! as a low-rank side path beside the quantized ones, so both paths compute the same map.

use std::sync::{Arc, OnceLock};

use candle_core::quantized::QTensor;
use candle_core::{DType, Result, Tensor};
use candle_nn::Linear;

use super::{Decoder, Proj};
use crate::kernels::qgemv::{matmul_t_many, top_rows, Act, LowRank, QMatrix};

/// Inputs of at most this many rows take the quantized product.
pub const FAST_ROWS: usize = 4;

#[derive(Debug, Clone)]
pub struct FastProj {
    pub dense: Linear,
    pub q: Arc<QMatrix>,
    pub act: Act,
    /// A merged adapter, applied beside `q` inside its product.
    pub side: Option<LowRank>,
    /// `q` in 4-bit blocks, made on first use by greedy decoding's LM head
    /// ([`Decoder::greedy_logits`]); shared by clones.
    pub coarse: Arc<OnceLock<QMatrix>>,
}

impl FastProj {
    /// Whether `x` takes the quantized product.
    fn takes_fast_path(&self, x: &Tensor) -> bool {
        let cols = x.dims().last().copied().unwrap_or(0);
        cols == self.q.cols
            && x.elem_count() / cols.max(1) <= FAST_ROWS
            && x.dtype() == DType::F32
            && x.device().is_cpu()
            && !x.track_op()
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut y = forward_group(&[self], x)?;
        Ok(y.pop().expect("one output"))
    }

    /// The side path of the adapter `(a (r, in), b (out, r), scale)`.
    pub fn low_rank(a: &Tensor, b: &Tensor, scale: f64) -> Result<LowRank> {
        Ok(LowRank::new(
            a.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?,
            &b.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?,
            a.dim(0)?,
            scale as f32,
        ))
    }
}

/// The products of several projections over the same input `x`: one quantized pass over all
/// of them when `x` takes the fast path (a decoding step's q / k / v, or gate / up), each
/// projection's own product otherwise.
pub fn forward_group(projs: &[&FastProj], x: &Tensor) -> Result<Vec<Tensor>> {
    if projs.is_empty() || !projs.iter().all(|p| p.takes_fast_path(x)) {
        return projs
            .iter()
            .map(|p| super::proj::linear(&p.dense, x))
            .collect();
    }
    let rows = x.elem_count() / projs[0].q.cols;
    let xv: Vec<f32> = x.flatten_all()?.to_vec1()?;
    projs
        .iter()
        .zip(quantized_products(projs, &xv, rows))
        .map(|(p, y)| {
            let mut shape = x.dims().to_vec();
            *shape.last_mut().expect("a last dimension") = p.q.rows;
            let y = Tensor::from_vec(y, shape, x.device())?;
            match p.dense.bias() {
                Some(b) => y.broadcast_add(b),
                None => Ok(y),
            }
        })
        .collect()
}

/// `x W_i^T` of each projection's quantized matrix (and adapter side path, no bias) over the
/// `rows` rows of `x`, in one quantized pass; each output `(rows, out_i)`, row-major.
pub(super) fn quantized_products(projs: &[&FastProj], x: &[f32], rows: usize) -> Vec<Vec<f32>> {
    let mut outs: Vec<Vec<f32>> = projs.iter().map(|p| vec![0f32; rows * p.q.rows]).collect();
    let parts: Vec<(&QMatrix, Option<&LowRank>)> =
        projs.iter().map(|p| (&*p.q, p.side.as_ref())).collect();
    let mut ys: Vec<&mut [f32]> = outs.iter_mut().map(|o| o.as_mut_slice()).collect();
    matmul_t_many(&parts, x, rows, &mut ys, projs[0].act);
    outs
}

impl Decoder {
    /// Give every projection and the LM head the decoding fast path, from the GGUF tensors this
    /// decoder was dequantized from (`tensor` reads one by its llama.cpp name; `lm_head` names
    /// the output matrix). Call before adapters are merged. Formats without a fast kernel keep
    /// the dense path. Returns the bytes of quantized weights kept.
    pub fn enable_fast_decode(
        &mut self,
        mut tensor: impl FnMut(&str) -> anyhow::Result<QTensor>,
        lm_head: &str,
        act: Act,
    ) -> anyhow::Result<usize> {
        if self.trainable || self.quantized || self.dtype != DType::F32 || !self.device.is_cpu() {
            anyhow::bail!("the decoding fast path is for a frozen f32 decoder on the CPU");
        }
        let llama = self.cfg.arch == crate::decoder::Arch::Llama;
        let (nq, nkv) = (self.cfg.num_attention_heads, self.cfg.num_key_value_heads);
        let mut bytes = 0;
        for (i, l) in self.layers.iter_mut().enumerate() {
            let a = &mut l.self_attn;
            let m = &mut l.mlp;
            let slots: [(&str, &mut Proj, Option<usize>); 7] = [
                ("attn_q", &mut a.q_proj, llama.then_some(nq)),
                ("attn_k", &mut a.k_proj, llama.then_some(nkv)),
                ("attn_v", &mut a.v_proj, None),
                ("attn_output", &mut a.o_proj, None),
                ("ffn_gate", &mut m.gate_proj, None),
                ("ffn_up", &mut m.up_proj, None),
                ("ffn_down", &mut m.down_proj, None),
            ];
            for (name, slot, heads) in slots {
                bytes += attach(
                    slot,
                    &tensor(&format!("blk.{i}.{name}.weight"))?,
                    heads,
                    act,
                )?;
            }
        }
        bytes += attach(&mut self.lm_head, &tensor(lm_head)?, None, act)?;
        Ok(bytes)
    }
}

/// Rows of the LM head greedy decoding scores exactly, of those its 4-bit copy ranks best.
pub const GREEDY_KEEP: usize = 64;

/// Whether greedy decoding ranks the LM head's rows on its 4-bit copy first (`REFRAG_HEAD`:
/// `top`, the default, or `full`: every row on the head's own blocks).
fn greedy_head() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var("REFRAG_HEAD").as_deref() != Ok("full"))
}

impl Decoder {
    /// Greedy decoding's logits for the last position of the final hidden states `h`
    /// `(1, t, d)`: the [`GREEDY_KEEP`] rows the LM head's 4-bit copy ranks best, each scored
    /// on the head's own blocks exactly as the whole head scores it, and minus infinity
    /// elsewhere, `(1, vocab)`; their argmax is the whole head's whenever its winner ranks
    /// among those rows in the copy ([`crate::kernels::qgemv::top_rows`]). `None` where the
    /// head has no quantized twin (or an adapter or bias beside it), for a batch, or with
    /// `REFRAG_HEAD=full`.
    pub(super) fn greedy_logits(&self, h: &Tensor) -> Result<Option<Tensor>> {
        let Proj::Fast(f) = &self.lm_head else {
            return Ok(None);
        };
        let (b, t, _) = h.dims3()?;
        if b != 1 || !greedy_head() || f.side.is_some() || f.dense.bias().is_some() {
            return Ok(None);
        }
        let last = h.narrow(1, t - 1, 1)?;
        if !f.takes_fast_path(&last) {
            return Ok(None);
        }
        let x: Vec<f32> = self.norm.forward(&last, false)?.flatten_all()?.to_vec1()?;
        let coarse = f.coarse.get_or_init(|| f.q.to_q4_0());
        let mut logits = vec![f32::NEG_INFINITY; f.q.rows];
        for (r, v) in top_rows(&f.q, coarse, &x, GREEDY_KEEP, f.act) {
            logits[r] = v;
        }
        Ok(Some(Tensor::from_vec(logits, (1, f.q.rows), h.device())?))
    }
}

/// Put the quantized twin `q` beside the dense projection in `slot` (rows un-permuted from
/// llama.cpp's interleaved rotary layout for a Llama q / k with `heads`); 0 bytes when the
/// format has no fast kernel or the slot is not plain dense.
fn attach(slot: &mut Proj, q: &QTensor, heads: Option<usize>, act: Act) -> anyhow::Result<usize> {
    let Proj::Dense(dense) = slot else {
        return Ok(0);
    };
    let Some(mut mat) = QMatrix::from_qtensor(q)? else {
        return Ok(0);
    };
    if mat.rows != dense.weight().dim(0)? || mat.cols != dense.weight().dim(1)? {
        anyhow::bail!(
            "GGUF tensor ({}, {}) does not match the projection {:?}",
            mat.rows,
            mat.cols,
            dense.weight().dims()
        );
    }
    if let Some(h) = heads {
        mat = mat.permute_rows(&unpermuted_order(mat.rows, h)?);
    }
    let bytes = mat.bytes();
    *slot = Proj::Fast(Box::new(FastProj {
        dense: dense.clone(),
        q: Arc::new(mat),
        act,
        side: None,
        coarse: Arc::default(),
    }));
    Ok(bytes)
}

/// Row `i` of the un-permuted q / k matrix is row `order[i]` of the GGUF one: the permutation
/// of [`crate::decoder::unpermute_qk`], applied to the row indices.
fn unpermuted_order(rows: usize, heads: usize) -> Result<Vec<usize>> {
    let idx: Vec<f32> = (0..rows).map(|r| r as f32).collect();
    let t = Tensor::from_vec(idx, (rows, 1), &candle_core::Device::Cpu)?;
    let p = crate::decoder::unpermute_qk(&t, heads)?;
    Ok(p.flatten_all()?
        .to_vec1::<f32>()?
        .into_iter()
        .map(|v| v as usize)
        .collect())
}
