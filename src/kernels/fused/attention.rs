//! The differentiable causal attention over a whole sequence (no cache):
//! `softmax(scale Q K^T + causal) V`, multiplied through the system BLAS, with the backward pass
//! recomputing each head's probabilities instead of keeping `t x t` per head.

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{data, vec_of};
use crate::kernels::blas;

/// Causal attention of `q` `(b, h, t, hd)` over `k`, `v` `(b, kv, t, hd)` (grouped-query heads
/// share their KV head); returns `(b, h, t, hd)`.
pub fn causal_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f32) -> Result<Tensor> {
    q.contiguous()?
        .apply_op3(&k.contiguous()?, &v.contiguous()?, Attention { scale })
}

struct Attention {
    scale: f32,
}

/// Shapes of one attention call.
#[derive(Clone, Copy)]
struct Dims {
    h: usize,
    kv: usize,
    t: usize,
    hd: usize,
}

impl Dims {
    fn of(q: &Shape, k: &Shape, v: &Shape) -> Result<Self> {
        let (b, h, t, hd) = q.dims4()?;
        let (bk, kv, tk, hdk) = k.dims4()?;
        if k != v || bk != b || tk != t || hdk != hd || kv == 0 || h % kv != 0 {
            candle_core::bail!("attention: q {q:?}, k {k:?}, v {v:?} do not fit");
        }
        Ok(Self { h, kv, t, hd })
    }
}

/// `P = softmax(scale q k^T + causal)` `(t, t)` of one head into `p`.
fn probs(q: &[f32], k: &[f32], t: usize, hd: usize, scale: f32, p: &mut [f32]) {
    blas::sgemm(false, true, t, t, hd, scale, q, hd, k, hd, 0.0, p, t);
    for i in 0..t {
        let row = &mut p[i * t..(i + 1) * t];
        blas::softmax_in_place(&mut row[..=i]);
        row[i + 1..].iter_mut().for_each(|v| *v = 0.0);
    }
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "fused-causal-attention"
    }

    fn cpu_fwd(
        &self,
        sq: &CpuStorage,
        lq: &Layout,
        sk: &CpuStorage,
        lk: &Layout,
        sv: &CpuStorage,
        lv: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let d = Dims::of(lq.shape(), lk.shape(), lv.shape())?;
        let (q, k, v) = (data(sq, lq)?, data(sk, lk)?, data(sv, lv)?);
        let (t, hd) = (d.t, d.hd);
        let rep = d.h / d.kv;
        let mut out = vec![0f32; q.len()];
        out.par_chunks_mut(t * hd).enumerate().for_each_init(
            || vec![0f32; t * t],
            |p, (bh, o)| {
                let (bi, head) = (bh / d.h, bh % d.h);
                let kvi = (bi * d.kv + head / rep) * t * hd;
                let qi = bh * t * hd;
                probs(
                    &q[qi..qi + t * hd],
                    &k[kvi..kvi + t * hd],
                    t,
                    hd,
                    self.scale,
                    p,
                );
                blas::sgemm(false, false, t, hd, t, 1.0, p, t, &v[kvi..], hd, 0.0, o, hd);
            },
        );
        Ok((CpuStorage::F32(out), lq.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _o: &Tensor,
        dout: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let d = Dims::of(q.shape(), k.shape(), v.shape())?;
        let (qv, kv, vv, dov) = (vec_of(q)?, vec_of(k)?, vec_of(v)?, vec_of(dout)?);
        let (t, hd) = (d.t, d.hd);
        let rep = d.h / d.kv;
        let mut dq = vec![0f32; qv.len()];
        let mut dk = vec![0f32; kv.len()];
        let mut dvv = vec![0f32; vv.len()];
        // One task per (batch, KV head): it owns that head's dK and dV and the dQ of its
        // `rep` query heads, so no two tasks write the same memory.
        dk.par_chunks_mut(t * hd)
            .zip(dvv.par_chunks_mut(t * hd))
            .zip(dq.par_chunks_mut(rep * t * hd))
            .enumerate()
            .for_each_init(
                || (vec![0f32; t * t], vec![0f32; t * t]),
                |(p, dp), (g, ((dkg, dvg), dqg))| {
                    let bi = g / d.kv;
                    let kvh = g % d.kv;
                    let ko = g * t * hd;
                    let (kh, vh) = (&kv[ko..ko + t * hd], &vv[ko..ko + t * hd]);
                    for r in 0..rep {
                        let head = kvh * rep + r;
                        let qo = (bi * d.h + head) * t * hd;
                        let (qh, doh) = (&qv[qo..qo + t * hd], &dov[qo..qo + t * hd]);
                        probs(qh, kh, t, hd, self.scale, p);
                        // dV += P^T dO
                        blas::sgemm(true, false, t, hd, t, 1.0, p, t, doh, hd, 1.0, dvg, hd);
                        // dP = dO V^T
                        blas::sgemm(false, true, t, t, hd, 1.0, doh, hd, vh, hd, 0.0, dp, t);
                        // dS = P (dP - rowsum(P dP)), scaled
                        for i in 0..t {
                            let (pr, dr) = (&p[i * t..(i + 1) * t], &mut dp[i * t..(i + 1) * t]);
                            let s: f32 = pr.iter().zip(dr.iter()).map(|(a, b)| a * b).sum();
                            for (dv, &pv) in dr.iter_mut().zip(pr) {
                                *dv = pv * (*dv - s) * self.scale;
                            }
                        }
                        // dQ = dS K ; dK += dS^T Q
                        let dqh = &mut dqg[r * t * hd..(r + 1) * t * hd];
                        blas::sgemm(false, false, t, hd, t, 1.0, dp, t, kh, hd, 0.0, dqh, hd);
                        blas::sgemm(true, false, t, hd, t, 1.0, dp, t, qh, hd, 1.0, dkg, hd);
                    }
                },
            );
        let dev = q.device();
        Ok((
            Some(Tensor::from_vec(dq, q.shape(), dev)?),
            Some(Tensor::from_vec(dk, k.shape(), dev)?),
            Some(Tensor::from_vec(dvv, v.shape(), dev)?),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::fused::tests::{same_grads, var};
    use candle_core::{Device, D};

    #[test]
    fn causal_attention_matches_candle_forward_and_backward() {
        // 4 query heads over 2 KV heads (grouped-query), 6 positions.
        let (b, h, kv, t, hd) = (2, 4, 2, 6, 8);
        let q = var(&[b, h, t, hd], 7);
        let k = var(&[b, kv, t, hd], 8);
        let v = var(&[b, kv, t, hd], 9);
        let scale = 1.0 / (hd as f32).sqrt();
        let f = causal_attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), scale).unwrap();
        let mask: Vec<f32> = (0..t)
            .flat_map(|i| (0..t).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
            .collect();
        let mask = Tensor::from_vec(mask, (t, t), &Device::Cpu).unwrap();
        let rep = |x: &Tensor| {
            candle_transformers::utils::repeat_kv(x.clone(), h / kv)
                .unwrap()
                .contiguous()
                .unwrap()
        };
        let (kr, vr) = (rep(k.as_tensor()), rep(v.as_tensor()));
        let s = ((q.as_tensor().matmul(&kr.t().unwrap()).unwrap()) * scale as f64)
            .unwrap()
            .broadcast_add(&mask)
            .unwrap();
        let p = candle_nn::ops::softmax(&s, D::Minus1)
            .unwrap()
            .matmul(&vr)
            .unwrap();
        same_grads(&f, &p, &[&q, &k, &v]);
    }
}
