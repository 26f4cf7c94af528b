//! One BERT encoder layer at inference (no gradients, f32 on the CPU) over packed tokens: the
//! batch's real tokens only, sequence after sequence, so no product touches padding.
//!
//! The tensor-op layer allocates a fresh buffer for each of its steps: three products and three
//! copies into heads for Q, K and V, a bias pass after every product, a residual pass before each
//! norm. Here the products write into buffers that already hold their bias (and residual), BLAS
//! adding to them (`beta = 1`); Q, K and V land side by side in one `(tokens, 3h)` buffer and
//! attention reads each head from it with a row stride, writing its output in place; LayerNorm
//! and GELU run in place. The buffers live for the whole forward.

use rayon::prelude::*;

use super::{sgemm, softmax_in_place};

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

    /// Apply one layer in place.
    pub fn layer(&mut self, p: &LayerParams) {
        let (t, h) = (self.tokens(), self.h);
        let f = p.inter.1.len();
        if t == 0 {
            return;
        }
        // Q | K | V, each `x W^T + b`, side by side.
        fill_rows(&mut self.qkv, t, &[p.query.1, p.key.1, p.value.1]);
        for (j, (w, _)) in [p.query, p.key, p.value].into_iter().enumerate() {
            let c = &mut self.qkv[j * h..];
            sgemm(false, true, t, h, h, 1.0, &self.x, h, w, h, 1.0, c, 3 * h);
        }
        self.attention(p.heads);
        // x = LayerNorm(x + ctx W_o^T + b_o): the residual and the bias are already in `x`.
        add_bias(&mut self.x, p.attn_out.1);
        sgemm(
            false,
            true,
            t,
            h,
            h,
            1.0,
            &self.ctx,
            h,
            p.attn_out.0,
            h,
            1.0,
            &mut self.x,
            h,
        );
        layer_norm_rows(&mut self.x, p.attn_norm, p.eps);
        // x = LayerNorm(x + act(x W_i^T + b_i) W_o^T + b_o).
        fill_rows(&mut self.ffn, t, &[p.inter.1]);
        sgemm(
            false,
            true,
            t,
            f,
            h,
            1.0,
            &self.x,
            h,
            p.inter.0,
            h,
            1.0,
            &mut self.ffn,
            f,
        );
        activate(&mut self.ffn, p.act);
        add_bias(&mut self.x, p.out.1);
        sgemm(
            false,
            true,
            t,
            h,
            f,
            1.0,
            &self.ffn,
            f,
            p.out.0,
            f,
            1.0,
            &mut self.x,
            h,
        );
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

fn activate(x: &mut [f32], act: Activation) {
    x.par_chunks_mut(4096).for_each(|c| match act {
        Activation::GeluErf => c
            .iter_mut()
            .for_each(|v| *v *= crate::kernels::fused::cdf(*v)),
        Activation::Relu => c.iter_mut().for_each(|v| *v = v.max(0.0)),
    });
}
