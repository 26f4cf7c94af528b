//! LayerNorm (BERT's): `y = (x - mean) / sqrt(var + eps) * w + b` over the last axis, one op
//! forward and one backward, rows in parallel. In plain tensor ops it was five elementwise
//! passes forward (each allocating), more backward, on every one of BERT's 13 norms.

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{data, vec_of};

/// LayerNorm of `x` `(.., d)` with weight and bias `(d,)`.
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f32) -> Result<Tensor> {
    x.contiguous()?
        .apply_op3(&w.contiguous()?, &b.contiguous()?, LayerNorm { eps })
}

struct LayerNorm {
    eps: f32,
}

/// The row's mean and `1 / sqrt(var + eps)` (two passes, as the plain ops compute them).
fn moments(row: &[f32], eps: f32) -> (f32, f32) {
    let n = row.len() as f32;
    let mean = row.iter().sum::<f32>() / n;
    let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
    (mean, 1.0 / (var + eps).sqrt())
}

/// LayerNorm of one row in place (the forward of [`layer_norm`] on a row).
pub(crate) fn layer_norm_row(row: &mut [f32], w: &[f32], b: &[f32], eps: f32) {
    let (mean, r) = moments(row, eps);
    for ((v, &wi), &bi) in row.iter_mut().zip(w).zip(b) {
        *v = (*v - mean) * r * wi + bi;
    }
}

/// Rows per parallel task in the backward pass (each keeps its own `dw`, `db`).
const ROWS_PER_TASK: usize = 64;

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "fused-layer-norm"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sw: &CpuStorage,
        lw: &Layout,
        sb: &CpuStorage,
        lb: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, w, b) = (data(sx, lx)?, data(sw, lw)?, data(sb, lb)?);
        let d = w.len();
        if d == 0 || b.len() != d || x.len() % d != 0 {
            candle_core::bail!("layer norm: x {:?}, w {d}, b {}", lx.shape(), b.len());
        }
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(d)
            .zip(x.par_chunks(d))
            .for_each(|(yr, xr)| {
                let (mean, r) = moments(xr, self.eps);
                for i in 0..d {
                    yr[i] = (xr[i] - mean) * r * w[i] + b[i];
                }
            });
        Ok((CpuStorage::F32(y), lx.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (xv, wv, dyv) = (vec_of(x)?, vec_of(w)?, vec_of(dy)?);
        let d = wv.len();
        let eps = self.eps;
        let mut dx = vec![0f32; xv.len()];
        // Per row: xhat = (x - mean) r, g = dy w;
        // dx = r (g - mean(g) - xhat mean(g xhat)); dw = sum dy xhat; db = sum dy.
        let parts: Vec<(Vec<f32>, Vec<f32>)> = dx
            .par_chunks_mut(d * ROWS_PER_TASK)
            .zip(
                xv.par_chunks(d * ROWS_PER_TASK)
                    .zip(dyv.par_chunks(d * ROWS_PER_TASK)),
            )
            .map(|(dxb, (xb, dyb))| {
                let (mut dw, mut db) = (vec![0f32; d], vec![0f32; d]);
                let mut xhat = vec![0f32; d];
                for ((dxr, xr), dyr) in dxb.chunks_mut(d).zip(xb.chunks(d)).zip(dyb.chunks(d)) {
                    let (mean, r) = moments(xr, eps);
                    let (mut sg, mut sgx) = (0f32, 0f32);
                    for i in 0..d {
                        xhat[i] = (xr[i] - mean) * r;
                        let g = dyr[i] * wv[i];
                        sg += g;
                        sgx += g * xhat[i];
                        dw[i] += dyr[i] * xhat[i];
                        db[i] += dyr[i];
                    }
                    let (mg, mgx) = (sg / d as f32, sgx / d as f32);
                    for i in 0..d {
                        dxr[i] = r * (dyr[i] * wv[i] - mg - xhat[i] * mgx);
                    }
                }
                (dw, db)
            })
            .collect();
        let (mut dw, mut db) = (vec![0f32; d], vec![0f32; d]);
        for (pw, pb) in parts {
            dw.iter_mut().zip(pw).for_each(|(a, v)| *a += v);
            db.iter_mut().zip(pb).for_each(|(a, v)| *a += v);
        }
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), x.device())?),
            Some(Tensor::from_vec(dw, w.shape(), w.device())?),
            Some(Tensor::from_vec(db, b.shape(), b.device())?),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{same_grads, var};
    use super::*;
    use candle_core::D;

    #[test]
    fn layer_norm_matches_plain_ops_forward_and_backward() {
        let x = var(&[3, 5, 16], 21);
        // Rows with an offset and a scale, as hidden states have.
        let xs = ((x.as_tensor() * 3.0).unwrap() + 0.7).unwrap();
        let w = var(&[16], 22);
        let b = var(&[16], 23);
        let f = layer_norm(&xs, w.as_tensor(), b.as_tensor(), 1e-12).unwrap();
        let mean = xs.mean_keepdim(D::Minus1).unwrap();
        let c = xs.broadcast_sub(&mean).unwrap();
        let var_ = c.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
        let p = c
            .broadcast_div(&(var_ + 1e-12).unwrap().sqrt().unwrap())
            .unwrap()
            .broadcast_mul(w.as_tensor())
            .unwrap()
            .broadcast_add(b.as_tensor())
            .unwrap();
        same_grads(&f, &p, &[&x, &w, &b]);
    }
}
