//! Differentiable CPU kernels for the training path (f32): the decoder's RMS norm, SwiGLU,
//! rotary embedding (half-split layout) and causal attention, BERT's LayerNorm and GELU, each
//! one op forward and one op backward.
//! The same maths in candle's plain tensor ops builds and frees a temporary per elementwise step
//! (a dozen per layer forward, more backward), single-threaded: on a 2-core machine that was
//! most of a training step. Here each op reads its inputs once, writes one output, runs its rows
//! in parallel, and attention multiplies through the system BLAS, recomputing its probabilities
//! in the backward pass instead of keeping `t x t` per head.
//!
//! [`usable`] says when they apply (CPU, f32, contiguous-able); callers fall back to candle's ops.

use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor,
};
use rayon::prelude::*;

mod attention;
mod layer_norm;

pub use attention::causal_attention;
pub use layer_norm::layer_norm;
pub(crate) use layer_norm::layer_norm_row;

/// Whether the fused ops serve `x` (CPU f32).
pub fn usable(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == DType::F32
}

fn data<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    match s {
        CpuStorage::F32(v) => match l.contiguous_offsets() {
            Some((a, b)) => Ok(&v[a..b]),
            None => candle_core::bail!("fused op: input not contiguous"),
        },
        _ => candle_core::bail!("fused op: expected f32"),
    }
}

fn vec_of(t: &Tensor) -> Result<Vec<f32>> {
    t.contiguous()?.flatten_all()?.to_vec1::<f32>()
}

// ---------------------------------------------------------------------------------------------
// RMS norm: y = x / sqrt(mean(x^2) + eps) * w, rows of the last axis.

/// RMS norm of `x` `(.., d)` with weight `w` `(d,)`.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f32) -> Result<Tensor> {
    x.contiguous()?.apply_op2(&w.contiguous()?, RmsNorm { eps })
}

struct RmsNorm {
    eps: f32,
}

fn inv_rms(row: &[f32], eps: f32) -> f32 {
    let ms = row.iter().map(|v| v * v).sum::<f32>() / row.len() as f32;
    1.0 / (ms + eps).sqrt()
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "fused-rms-norm"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sw: &CpuStorage,
        lw: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = data(sx, lx)?;
        let w = data(sw, lw)?;
        let d = w.len();
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(d)
            .zip(x.par_chunks(d))
            .for_each(|(yr, xr)| {
                let r = inv_rms(xr, self.eps);
                for ((o, &a), &g) in yr.iter_mut().zip(xr).zip(w) {
                    *o = a * r * g;
                }
            });
        Ok((CpuStorage::F32(y), lx.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (xv, wv, dyv) = (vec_of(x)?, vec_of(w)?, vec_of(dy)?);
        let d = wv.len();
        let eps = self.eps;
        let mut dx = vec![0f32; xv.len()];
        // Per row: xhat = x r, g = dy w; dx = r (g - xhat mean(g xhat)); dw = sum dy xhat.
        let dw_parts: Vec<Vec<f32>> = dx
            .par_chunks_mut(d * 64)
            .zip(xv.par_chunks(d * 64).zip(dyv.par_chunks(d * 64)))
            .map(|(dxb, (xb, dyb))| {
                let mut dw = vec![0f32; d];
                for ((dxr, xr), dyr) in dxb.chunks_mut(d).zip(xb.chunks(d)).zip(dyb.chunks(d)) {
                    let r = inv_rms(xr, eps);
                    let mut dot = 0f32;
                    for i in 0..d {
                        dot += dyr[i] * wv[i] * xr[i] * r;
                        dw[i] += dyr[i] * xr[i] * r;
                    }
                    let m = dot / d as f32;
                    for i in 0..d {
                        dxr[i] = r * (dyr[i] * wv[i] - xr[i] * r * m);
                    }
                }
                dw
            })
            .collect();
        let mut dw = vec![0f32; d];
        for p in dw_parts {
            for (a, b) in dw.iter_mut().zip(p) {
                *a += b;
            }
        }
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), x.device())?),
            Some(Tensor::from_vec(dw, w.shape(), w.device())?),
        ))
    }
}

// ---------------------------------------------------------------------------------------------
// SwiGLU: h = silu(g) * u.

/// `silu(g) * u`, same shapes.
pub fn swiglu(g: &Tensor, u: &Tensor) -> Result<Tensor> {
    g.contiguous()?.apply_op2(&u.contiguous()?, SwiGlu)
}

struct SwiGlu;

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "fused-swiglu"
    }

    fn cpu_fwd(
        &self,
        sg: &CpuStorage,
        lg: &Layout,
        su: &CpuStorage,
        lu: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (g, u) = (data(sg, lg)?, data(su, lu)?);
        if g.len() != u.len() {
            candle_core::bail!("swiglu: shapes {:?} and {:?}", lg.shape(), lu.shape());
        }
        let mut h = vec![0f32; g.len()];
        h.par_chunks_mut(4096)
            .zip(g.par_chunks(4096).zip(u.par_chunks(4096)))
            .for_each(|(hc, (gc, uc))| {
                for ((o, &a), &b) in hc.iter_mut().zip(gc).zip(uc) {
                    *o = a * sigmoid(a) * b;
                }
            });
        Ok((CpuStorage::F32(h), lg.shape().clone()))
    }

    fn bwd(
        &self,
        g: &Tensor,
        u: &Tensor,
        _h: &Tensor,
        dh: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (gv, uv, dhv) = (vec_of(g)?, vec_of(u)?, vec_of(dh)?);
        let mut dg = vec![0f32; gv.len()];
        let mut du = vec![0f32; gv.len()];
        dg.par_chunks_mut(4096)
            .zip(du.par_chunks_mut(4096))
            .zip(
                gv.par_chunks(4096)
                    .zip(uv.par_chunks(4096).zip(dhv.par_chunks(4096))),
            )
            .for_each(|((dgc, duc), (gc, (uc, dhc)))| {
                for i in 0..gc.len() {
                    let s = sigmoid(gc[i]);
                    let silu = gc[i] * s;
                    dgc[i] = dhc[i] * uc[i] * s * (1.0 + gc[i] * (1.0 - s));
                    duc[i] = dhc[i] * silu;
                }
            });
        Ok((
            Some(Tensor::from_vec(dg, g.shape(), g.device())?),
            Some(Tensor::from_vec(du, u.shape(), u.device())?),
        ))
    }
}

// ---------------------------------------------------------------------------------------------
// Rotary embedding, half-split layout: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin).

/// Rotary embedding of `x` `(b, h, t, hd)` with `cos`, `sin` `(t, hd / 2)`.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op3(
        &cos.contiguous()?,
        &sin.contiguous()?,
        Rope { inverse: false },
    )
}

struct Rope {
    /// Rotate by minus the angle (the backward pass).
    inverse: bool,
}

impl Rope {
    fn apply(&self, x: &[f32], cos: &[f32], sin: &[f32], t: usize, hd: usize) -> Vec<f32> {
        let half = hd / 2;
        let sign = if self.inverse { -1.0 } else { 1.0 };
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(t * hd)
            .zip(x.par_chunks(t * hd))
            .for_each(|(yh, xh)| {
                for p in 0..t {
                    let (c, s) = (
                        &cos[p * half..(p + 1) * half],
                        &sin[p * half..(p + 1) * half],
                    );
                    let xr = &xh[p * hd..(p + 1) * hd];
                    let yr = &mut yh[p * hd..(p + 1) * hd];
                    for i in 0..half {
                        let (a, b) = (xr[i], xr[i + half]);
                        let si = sign * s[i];
                        yr[i] = a * c[i] - b * si;
                        yr[i + half] = b * c[i] + a * si;
                    }
                }
            });
        y
    }
}

impl CustomOp3 for Rope {
    fn name(&self) -> &'static str {
        "fused-rope"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sc: &CpuStorage,
        lc: &Layout,
        ss: &CpuStorage,
        ls: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (_b, _h, t, hd) = lx.shape().dims4()?;
        if lc.shape().dims2()? != (t, hd / 2) || ls.shape() != lc.shape() {
            candle_core::bail!("rope: cos/sin {:?} for x {:?}", lc.shape(), lx.shape());
        }
        let y = self.apply(data(sx, lx)?, data(sc, lc)?, data(ss, ls)?, t, hd);
        Ok((CpuStorage::F32(y), lx.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (_b, _h, t, hd) = x.dims4()?;
        let back = Rope {
            inverse: !self.inverse,
        };
        let dx = back.apply(&vec_of(dy)?, &vec_of(cos)?, &vec_of(sin)?, t, hd);
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), x.device())?),
            None,
            None,
        ))
    }
}

// ---------------------------------------------------------------------------------------------
// GELU (the erf form BERT uses): y = x Phi(x).

/// `x * Phi(x)` elementwise, `Phi` the standard normal CDF.
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(GeluErf)
}

struct GeluErf;

/// `erf(x)`, Abramowitz & Stegun 7.1.26 (absolute error below 1.5e-7), branch-light so that
/// loops over it vectorise; libm's `erff` is a scalar call that dominated BERT's backward.
fn erf(x: f32) -> f32 {
    erf_with(x, f32::exp)
}

/// [`erf`] with the exponential `exp` (a vectorisable polynomial one in the 8-bit encoder
/// layers' GELU, libm's here).
#[inline(always)]
pub(crate) fn erf_with(x: f32, exp: impl Fn(f32) -> f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly = t
        * (0.254_829_6
            + t * (-0.284_496_74 + t * (1.421_413_7 + t * (-1.453_152_1 + t * 1.061_405_4))));
    let r = 1.0 - poly * exp(-a * a);
    r.copysign(x)
}

/// The standard normal CDF, `Phi(x)`.
pub(crate) fn cdf(x: f32) -> f32 {
    0.5 * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

impl CustomOp1 for GeluErf {
    fn name(&self) -> &'static str {
        "fused-gelu-erf"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = data(s, l)?;
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(4096)
            .zip(x.par_chunks(4096))
            .for_each(|(yc, xc)| {
                for (o, &v) in yc.iter_mut().zip(xc) {
                    *o = v * cdf(v);
                }
            });
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        let (xv, dyv) = (vec_of(x)?, vec_of(dy)?);
        let mut dx = vec![0f32; xv.len()];
        let c = 1.0 / (2.0 * std::f32::consts::PI).sqrt();
        dx.par_chunks_mut(4096)
            .zip(xv.par_chunks(4096).zip(dyv.par_chunks(4096)))
            .for_each(|(dc, (xc, gc))| {
                for i in 0..xc.len() {
                    let v = xc[i];
                    dc[i] = gc[i] * (cdf(v) + v * c * (-0.5 * v * v).exp());
                }
            });
        Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    pub(super) fn close(a: &Tensor, b: &Tensor, tol: f32) {
        let d = crate::testing::max_abs_diff(a, b);
        assert!(d < tol, "max difference {d}");
    }

    pub(super) fn var(shape: &[usize], seed: u64) -> Var {
        let n: usize = shape.iter().product();
        let mut x = seed;
        let v: Vec<f32> = (0..n)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect();
        Var::from_tensor(&Tensor::from_vec(v, shape, &Device::Cpu).unwrap()).unwrap()
    }

    /// Forward values and the gradients of `sum(out * w)` w.r.t. `inputs` agree.
    pub(super) fn same_grads(fused: &Tensor, plain: &Tensor, inputs: &[&Var]) {
        close(fused, plain, 1e-4);
        let w = var(fused.dims(), 99);
        let gf = (fused * w.as_tensor())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let gp = (plain * w.as_tensor())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for v in inputs {
            close(
                gf.get(v.as_tensor()).unwrap(),
                gp.get(v.as_tensor()).unwrap(),
                1e-4,
            );
        }
    }

    #[test]
    fn rms_norm_matches_candle_forward_and_backward() {
        let x = var(&[3, 5, 16], 1);
        let w = var(&[16], 2);
        let f = rms_norm(x.as_tensor(), w.as_tensor(), 1e-5).unwrap();
        let p = candle_nn::ops::rms_norm_slow(x.as_tensor(), w.as_tensor(), 1e-5).unwrap();
        same_grads(&f, &p, &[&x, &w]);
    }

    #[test]
    fn gelu_erf_matches_candle_forward_and_backward() {
        let x = var(&[6, 50], 11);
        let big = (x.as_tensor() * 4.0).unwrap();
        let f = gelu_erf(&big).unwrap();
        let p = big.gelu_erf().unwrap();
        same_grads(&f, &p, &[&x]);
    }

    #[test]
    fn swiglu_matches_candle_forward_and_backward() {
        let g = var(&[4, 7, 9], 3);
        let u = var(&[4, 7, 9], 4);
        let f = swiglu(g.as_tensor(), u.as_tensor()).unwrap();
        let p = (candle_nn::ops::silu(g.as_tensor()).unwrap() * u.as_tensor()).unwrap();
        same_grads(&f, &p, &[&g, &u]);
    }

    #[test]
    fn rope_matches_candle_forward_and_backward() {
        let x = var(&[2, 3, 5, 8], 5);
        let ang = var(&[5, 4], 6);
        let ang = ang.as_tensor().detach();
        let (c, s) = (ang.cos().unwrap(), ang.sin().unwrap());
        let f = rope(x.as_tensor(), &c, &s).unwrap();
        let p = candle_nn::rotary_emb::rope_slow(x.as_tensor(), &c, &s).unwrap();
        same_grads(&f, &p, &[&x]);
    }
}
