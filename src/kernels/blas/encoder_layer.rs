//! One BERT encoder layer at inference (no gradients, f32 on the CPU) over packed tokens: the
//! batch's real tokens only, sequence after sequence, so no product touches padding.
//!
//! The tensor-op layer allocates a fresh buffer for each of its steps: three products and three
//! copies into heads for Q, K and V, a bias pass after every product, a residual pass before each
//! norm. Here the products write into buffers that already hold their bias (and residual), BLAS
//! adding to them (`beta = 1`); Q, K and V land side by side in one `(tokens, 3h)` buffer and
//! attention reads each head from it with a row stride, writing its output in place; LayerNorm
//! and GELU run in place. The buffers live for the whole forward.
//!
//! With [`Int8Weights`] (the retrieval embedder where the CPU has AVX-512 VNNI) the four products
//! run in 8-bit integers instead ([`crate::kernels::igemm`]): the input rows quantized per token,
//! Q, K and V one product over their stacked weights. Attention, softmax, LayerNorm and GELU
//! stay f32, the GELU vectorised ([`gelu_in_place`]).

use rayon::prelude::*;

use super::softmax::{exp_poly, simd_dispatch};
use super::{sgemm, softmax_in_place};
use crate::kernels::igemm::{self, QRows, QWeight};

/// The activation between the feed-forward products.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `x * Phi(x)` (BERT's exact GELU).
    GeluErf,
    Relu,
}

/// One layer's parameters, `(out, in)` weights row-major as the checkpoint stores them.
pub struct LayerParams<'a> {
    pub query: (&'a [f32], &'a [f32]),
    pub key: (&'a [f32], &'a [f32]),
    pub value: (&'a [f32], &'a [f32]),
    pub attn_out: (&'a [f32], &'a [f32]),
    /// Weight and bias of the norm after attention.
    pub attn_norm: (&'a [f32], &'a [f32]),
    pub inter: (&'a [f32], &'a [f32]),
    pub out: (&'a [f32], &'a [f32]),
    pub out_norm: (&'a [f32], &'a [f32]),
    pub heads: usize,
    pub eps: f32,
    pub act: Activation,
}

/// One layer's linear weights in 8 bits, quantized once when the model loads: Q, K and V stacked
/// (`(3h, h)`, one product fills the `(tokens, 3h)` buffer), then the attention output and the
/// two feed-forward weights.
#[derive(Debug, Clone)]
pub struct Int8Weights {
    qkv: QWeight,
    attn_out: QWeight,
    inter: QWeight,
    out: QWeight,
}

impl Int8Weights {
    pub fn new(p: &LayerParams) -> Self {
        let h = p.query.1.len();
        let f = p.inter.1.len();
        let qkv = [p.query.0, p.key.0, p.value.0].concat();
        Self {
            qkv: QWeight::new(&qkv, 3 * h, h),
            attn_out: QWeight::new(p.attn_out.0, h, h),
            inter: QWeight::new(p.inter.0, f, h),
            out: QWeight::new(p.out.0, h, f),
        }
    }
}

/// Packed token states: `tokens x h`, sequence `i` rows `starts[i]..starts[i] + lens[i]`.
pub struct Packed {
    pub x: Vec<f32>,
    pub h: usize,
    pub lens: Vec<usize>,
    starts: Vec<usize>,
    // Working buffers, reused layer after layer.
    qkv: Vec<f32>,
    ctx: Vec<f32>,
    ffn: Vec<f32>,
    /// The rows of the next int8 product, quantized.
    quant: QRows,
}

impl Packed {
    /// The real rows of a right-padded `(b, s, h)` batch, sequence `i` holding `lens[i]`.
    pub fn from_padded(x: &[f32], s: usize, h: usize, lens: &[usize]) -> Self {
        let mut starts = Vec::with_capacity(lens.len());
        let mut packed = Vec::with_capacity(lens.iter().sum::<usize>() * h);
        for (i, &len) in lens.iter().enumerate() {
            starts.push(packed.len() / h);
            packed.extend_from_slice(&x[i * s * h..(i * s + len) * h]);
        }
        Self {
            x: packed,
            h,
            lens: lens.to_vec(),
            starts,
            qkv: Vec::new(),
            ctx: Vec::new(),
            ffn: Vec::new(),
            quant: QRows::new(),
        }
    }

    /// Back to a right-padded `(b, s, h)` batch, padding rows zero.
    pub fn to_padded(&self, s: usize) -> Vec<f32> {
        let h = self.h;
        let mut y = vec![0f32; self.lens.len() * s * h];
        for (i, (&start, &len)) in self.starts.iter().zip(&self.lens).enumerate() {
            y[i * s * h..(i * s + len) * h].copy_from_slice(&self.x[start * h..(start + len) * h]);
        }
        y
    }

    fn tokens(&self) -> usize {
        self.x.len() / self.h
    }

    /// Apply one layer in place, its products in f32 (`sgemm`) or, given `int8` (this layer's
    /// [`Int8Weights`]), in 8-bit integers.
    pub fn layer(&mut self, p: &LayerParams, int8: Option<&Int8Weights>) {
        let (t, h) = (self.tokens(), self.h);
        let f = p.inter.1.len();
        if t == 0 {
            return;
        }
        // Q | K | V, each `x W^T + b`, side by side.
        fill_rows(&mut self.qkv, t, &[p.query.1, p.key.1, p.value.1]);
        match int8 {
            Some(q) => {
                self.quant.quantize(&self.x, t, h, h);
                igemm::gemm_acc(&self.quant, &q.qkv, &mut self.qkv, 3 * h);
            }
            None => {
                for (j, (w, _)) in [p.query, p.key, p.value].into_iter().enumerate() {
                    let c = &mut self.qkv[j * h..];
                    sgemm(false, true, t, h, h, 1.0, &self.x, h, w, h, 1.0, c, 3 * h);
                }
            }
        }
        self.attention(p.heads);
        // x = LayerNorm(x + ctx W_o^T + b_o): the residual and the bias are already in `x`.
        add_bias(&mut self.x, p.attn_out.1);
        let w = (p.attn_out.0, int8.map(|q| &q.attn_out));
        linear_acc(&mut self.quant, &self.ctx, t, h, w, &mut self.x, h);
        layer_norm_rows(&mut self.x, p.attn_norm, p.eps);
        // x = LayerNorm(x + act(x W_i^T + b_i) W_o^T + b_o).
        fill_rows(&mut self.ffn, t, &[p.inter.1]);
        let w = (p.inter.0, int8.map(|q| &q.inter));
        linear_acc(&mut self.quant, &self.x, t, h, w, &mut self.ffn, f);
        activate(&mut self.ffn, p.act, int8.is_some());
        add_bias(&mut self.x, p.out.1);
        let w = (p.out.0, int8.map(|q| &q.out));
        linear_acc(&mut self.quant, &self.ffn, t, f, w, &mut self.x, h);
        layer_norm_rows(&mut self.x, p.out_norm, p.eps);
    }

    /// `ctx` = softmax(Q K^T / sqrt(hd)) V per sequence and head, heads side by side.
    fn attention(&mut self, heads: usize) {
        let (t, h) = (self.tokens(), self.h);
        let hd = h / heads;
        let scale = 1.0 / (hd as f32).sqrt();
        self.ctx.resize(t * h, 0.0);
        // Each sequence's rows of `ctx` are its own: split them off and run sequences in parallel.
        let mut rest: &mut [f32] = &mut self.ctx;
        let mut parts = Vec::with_capacity(self.lens.len());
        for (&start, &len) in self.starts.iter().zip(&self.lens) {
            let (mine, tail) = std::mem::take(&mut rest).split_at_mut(len * h);
            parts.push((start, len, mine));
            rest = tail;
        }
        let qkv = &self.qkv;
        parts.into_par_iter().for_each(|(start, len, ctx)| {
            if len == 0 {
                return;
            }
            let rows = &qkv[start * 3 * h..(start + len) * 3 * h];
            let mut scores = vec![0f32; len * len];
            for head in 0..heads {
                let (q, k, v) = (
                    &rows[head * hd..],
                    &rows[h + head * hd..],
                    &rows[2 * h + head * hd..],
                );
                sgemm(
                    false,
                    true,
                    len,
                    len,
                    hd,
                    scale,
                    q,
                    3 * h,
                    k,
                    3 * h,
                    0.0,
                    &mut scores,
                    len,
                );
                scores.chunks_mut(len).for_each(softmax_in_place);
                let out = &mut ctx[head * hd..];
                sgemm(
                    false,
                    false,
                    len,
                    hd,
                    len,
                    1.0,
                    &scores,
                    len,
                    v,
                    3 * h,
                    0.0,
                    out,
                    h,
                );
            }
        });
    }
}

/// `c += x W^T` for `x` `(t, k)` and `W` `(n, k)` (`n = ldc`): in 8 bits when `w` holds the
/// quantized weight (`quant` takes `x`'s rows), else through `sgemm` on the f32 one.
fn linear_acc(
    quant: &mut QRows,
    x: &[f32],
    t: usize,
    k: usize,
    w: (&[f32], Option<&QWeight>),
    c: &mut [f32],
    ldc: usize,
) {
    match w {
        (_, Some(q)) => {
            quant.quantize(x, t, k, k);
            igemm::gemm_acc(quant, q, c, ldc);
        }
        (w, None) => sgemm(false, true, t, ldc, k, 1.0, x, k, w, k, 1.0, c, ldc),
    }
}

/// `buf` resized to `rows` rows of the `parts` laid side by side (each row `parts` concatenated).
fn fill_rows(buf: &mut Vec<f32>, rows: usize, parts: &[&[f32]]) {
    let width: usize = parts.iter().map(|p| p.len()).sum();
    buf.clear();
    buf.reserve(rows * width);
    for _ in 0..rows {
        for p in parts {
            buf.extend_from_slice(p);
        }
    }
}

fn add_bias(x: &mut [f32], b: &[f32]) {
    x.par_chunks_mut(b.len() * 64).for_each(|block| {
        for row in block.chunks_mut(b.len()) {
            row.iter_mut().zip(b).for_each(|(v, &bi)| *v += bi);
        }
    });
}

fn layer_norm_rows(x: &mut [f32], (w, b): (&[f32], &[f32]), eps: f32) {
    x.par_chunks_mut(w.len() * 16).for_each(|block| {
        for row in block.chunks_mut(w.len()) {
            crate::kernels::fused::layer_norm_row(row, w, b, eps);
        }
    });
}

/// `x <- act(x)`. `vectorised` takes the GELU through [`gelu_in_place`] (the 8-bit layers,
/// whose numbers are approximate anyway); else libm's exponential as in training, so that the
/// f32 layers give the numbers they always gave.
fn activate(x: &mut [f32], act: Activation, vectorised: bool) {
    x.par_chunks_mut(4096).for_each(|c| match act {
        Activation::GeluErf if vectorised => gelu_in_place(c),
        Activation::GeluErf => c
            .iter_mut()
            .for_each(|v| *v *= crate::kernels::fused::cdf(*v)),
        Activation::Relu => c.iter_mut().for_each(|v| *v = v.max(0.0)),
    });
}

simd_dispatch! {
    /// `x <- x Phi(x)`, vectorised: the erf of [`crate::kernels::fused::cdf`] (Abramowitz &
    /// Stegun 7.1.26) with softmax's polynomial exponential instead of libm's scalar one, which
    /// took a quarter of an 8-bit forward (within 1e-6 of it).
    fn gelu_in_place(x: &mut [f32]) -> () = gelu_generic
}

#[inline(always)]
fn gelu_generic(x: &mut [f32]) {
    for v in x {
        let erf = crate::kernels::fused::erf_with(*v * std::f32::consts::FRAC_1_SQRT_2, exp_poly);
        *v *= 0.5 * (1.0 + erf);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vectorised_gelu_matches_the_libm_one() {
        let xs: Vec<f32> = (0..4000).map(|i| (i as f32 - 2000.0) * 0.005).collect();
        let mut fast = xs.clone();
        gelu_in_place(&mut fast);
        for (&x, &y) in xs.iter().zip(&fast) {
            let want = x * crate::kernels::fused::cdf(x);
            assert!(
                (y - want).abs() <= 1e-6 * (1.0 + x.abs()),
                "gelu({x}): {y} vs {want}"
            );
        }
    }
}
