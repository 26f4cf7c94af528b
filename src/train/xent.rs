//! Cross-entropy of logits against target ids as one op: per row, the negative log-likelihood
//! `lse(row) - row[target]` in one pass (the vectorised log-sum-exp of `kernels/blas/softmax.rs`), and in the
//! backward pass `softmax(row) - onehot(target)` scaled by the row's incoming gradient, written
//! straight into the one gradient tensor. candle's `log_softmax` + `gather` builds several
//! vocabulary-wide temporaries per row forward and more backward: with a 49K vocabulary and a
//! batch of a few hundred targets those are hundreds of megabytes per step (measured: about 8%
//! of a 64-item reconstruction step). Other devices use the plain candle ops.
//!
//! [`soft_cross_entropy_rows`] is the same against a distribution per row (distillation from a
//! teacher): `lse(row) - p . row`, whose gradient is `softmax(row) - p`.

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

/// Negative log-likelihood `(n,)` of `targets` `(n,)` u32 under `logits` `(n, vocab)`.
pub fn cross_entropy_rows(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    if logits.device().is_cpu() && logits.dtype() == DType::F32 {
        return logits.contiguous()?.apply_op2(&targets.contiguous()?, Xent);
    }
    let logp = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    logp.gather(&targets.unsqueeze(1)?, 1)?.squeeze(1)?.neg()
}

/// Cross-entropy `(n,)` of each row of `logits` `(n, vocab)` against the distribution in the
/// same row of `probs` (`-sum_j p_j log softmax(row)_j`); gradients flow to `logits` only. Minus
/// the teacher's entropy it is `KL(p || softmax(row))`.
pub fn soft_cross_entropy_rows(logits: &Tensor, probs: &Tensor) -> Result<Tensor> {
    let probs = probs.detach();
    if logits.device().is_cpu() && logits.dtype() == DType::F32 && probs.dtype() == DType::F32 {
        return logits
            .contiguous()?
            .apply_op2(&probs.contiguous()?, SoftXent);
    }
    let logp = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    (logp * probs)?.sum(D::Minus1)?.neg()
}

/// Entropy (nats) of each row of a distribution `(n, vocab)`, on the host.
pub fn row_entropy(probs: &[f32], vocab: usize) -> Vec<f64> {
    probs
        .par_chunks(vocab)
        .map(|row| {
            -row.iter()
                .filter(|&&p| p > 0.0)
                .map(|&p| f64::from(p) * f64::from(p).ln())
                .sum::<f64>()
        })
        .collect()
}

fn rows<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    match s {
        CpuStorage::F32(v) => Ok(&v[l.start_offset()..l.start_offset() + l.shape().elem_count()]),
        _ => candle_core::bail!("cross entropy: logits must be f32"),
    }
}

fn ids<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [u32]> {
    match s {
        CpuStorage::U32(v) => Ok(&v[l.start_offset()..l.start_offset() + l.shape().elem_count()]),
        _ => candle_core::bail!("cross entropy: targets must be u32"),
    }
}

/// `(logits, targets) -> nll`; its backward gives the logits `(softmax - onehot) * grad`.
struct Xent;

impl CustomOp2 for Xent {
    fn name(&self) -> &'static str {
        "cross-entropy-rows"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, v) = l1.shape().dims2()?;
        let x = rows(s1, l1)?;
        let t = ids(s2, l2)?;
        if t.len() != n {
            candle_core::bail!("cross entropy: {} targets for {n} rows", t.len());
        }
        let out: Vec<f32> = x
            .par_chunks(v)
            .zip(t.par_iter())
            .map(|(row, &id)| {
                let lse = crate::kernels::blas::log_sum_exp_rows(row, v)[0];
                lse - row[id as usize]
            })
            .collect();
        Ok((CpuStorage::F32(out), Shape::from(n)))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (n, v) = logits.dims2()?;
        let g: Vec<f32> = grad.to_dtype(DType::F32)?.to_vec1()?;
        let t: Vec<u32> = targets.to_vec1()?;
        let mut out = logits.flatten_all()?.to_vec1::<f32>()?;
        out.par_chunks_mut(v)
            .zip(t.par_iter().zip(g.par_iter()))
            .for_each(|(row, (&id, &gi))| {
                crate::kernels::blas::softmax_in_place(row);
                row[id as usize] -= 1.0;
                row.iter_mut().for_each(|r| *r *= gi);
            });
        let dx = Tensor::from_vec(out, (n, v), logits.device())?;
        Ok((Some(dx), None))
    }
}

/// `(logits, probs) -> soft cross-entropy`; its backward gives the logits `(softmax - p) * grad`.
struct SoftXent;

impl CustomOp2 for SoftXent {
    fn name(&self) -> &'static str {
        "soft-cross-entropy-rows"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, v) = l1.shape().dims2()?;
        if l2.shape().dims() != [n, v] {
            candle_core::bail!(
                "soft cross entropy: probs {:?} for logits ({n}, {v})",
                l2.shape()
            );
        }
        let x = rows(s1, l1)?;
        let p = rows(s2, l2)?;
        let out: Vec<f32> = x
            .par_chunks(v)
            .zip(p.par_chunks(v))
            .map(|(row, pr)| {
                let lse = crate::kernels::blas::log_sum_exp_rows(row, v)[0];
                let dot: f32 = row.iter().zip(pr).map(|(a, b)| a * b).sum();
                let mass: f32 = pr.iter().sum();
                lse * mass - dot
            })
            .collect();
        Ok((CpuStorage::F32(out), Shape::from(n)))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        probs: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (n, v) = logits.dims2()?;
        let g: Vec<f32> = grad.to_dtype(DType::F32)?.to_vec1()?;
        let p = probs.flatten_all()?.to_vec1::<f32>()?;
        let mut out = logits.flatten_all()?.to_vec1::<f32>()?;
        out.par_chunks_mut(v)
            .zip(p.par_chunks(v).zip(g.par_iter()))
            .for_each(|(row, (pr, &gi))| {
                crate::kernels::blas::softmax_in_place(row);
                let mass: f32 = pr.iter().sum();
                row.iter_mut()
                    .zip(pr)
                    .for_each(|(r, &q)| *r = (*r * mass - q) * gi);
            });
        let dx = Tensor::from_vec(out, (n, v), logits.device())?;
        Ok((Some(dx), None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// `fused` and `plain` (per-row losses of `x`) agree, and so do the gradients of their sums
    /// weighted by `w` with respect to `x`.
    fn same_values_and_gradients(x: &Var, fused: &Tensor, plain: &Tensor, w: &Tensor) {
        let a: Vec<f32> = fused.to_vec1().unwrap();
        let b: Vec<f32> = plain.to_vec1().unwrap();
        for (p, q) in a.iter().zip(&b) {
            assert!((p - q).abs() < 1e-4, "{p} vs {q}");
        }
        let grad = |y: &Tensor| -> Vec<Vec<f32>> {
            let g = (y * w).unwrap().sum_all().unwrap().backward().unwrap();
            g.get(x.as_tensor()).unwrap().to_vec2().unwrap()
        };
        for (ra, rb) in grad(fused).iter().zip(&grad(plain)) {
            for (p, q) in ra.iter().zip(rb) {
                assert!((p - q).abs() < 1e-5, "{p} vs {q}");
            }
        }
    }

    #[test]
    fn fused_cross_entropy_equals_log_softmax_gather_forward_and_backward() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 3.0, (5, 37), &dev).unwrap()).unwrap();
        let t = Tensor::new(&[0u32, 36, 5, 5, 17], &dev).unwrap();
        let w = Tensor::new(&[1f32, 0.5, 2.0, -1.0, 0.25], &dev).unwrap();
        let fused = cross_entropy_rows(x.as_tensor(), &t).unwrap();
        let plain = candle_nn::ops::log_softmax(x.as_tensor(), D::Minus1)
            .unwrap()
            .gather(&t.unsqueeze(1).unwrap(), 1)
            .unwrap()
            .squeeze(1)
            .unwrap()
            .neg()
            .unwrap();
        same_values_and_gradients(&x, &fused, &plain, &w);
    }

    #[test]
    fn soft_cross_entropy_equals_log_softmax_dot_forward_and_backward() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 3.0, (4, 29), &dev).unwrap()).unwrap();
        let teacher = Tensor::randn(0f32, 2.0, (4, 29), &dev).unwrap();
        let p = candle_nn::ops::softmax(&teacher, D::Minus1).unwrap();
        let w = Tensor::new(&[1f32, -0.5, 2.0, 0.25], &dev).unwrap();
        let fused = soft_cross_entropy_rows(x.as_tensor(), &p).unwrap();
        let plain = (candle_nn::ops::log_softmax(x.as_tensor(), D::Minus1).unwrap() * &p)
            .unwrap()
            .sum(D::Minus1)
            .unwrap()
            .neg()
            .unwrap();
        same_values_and_gradients(&x, &fused, &plain, &w);
    }

    #[test]
    fn soft_cross_entropy_minus_entropy_is_a_kl_zero_at_the_teacher_and_positive_elsewhere() {
        let dev = Device::Cpu;
        let t = Tensor::randn(0f32, 2.0, (3, 17), &dev).unwrap();
        let p = candle_nn::ops::softmax(&t, D::Minus1).unwrap();
        let h = row_entropy(&p.flatten_all().unwrap().to_vec1().unwrap(), 17);
        let kl = |logits: &Tensor| -> Vec<f64> {
            let s: Vec<f32> = soft_cross_entropy_rows(logits, &p)
                .unwrap()
                .to_vec1()
                .unwrap();
            s.iter().zip(&h).map(|(&c, e)| f64::from(c) - e).collect()
        };
        // Logits that differ from the teacher's by a constant per row are the same distribution.
        for v in kl(&(t.clone() + 5.0).unwrap()) {
            assert!(v.abs() < 1e-4, "KL at the teacher {v}");
        }
        let other = Tensor::randn(0f32, 2.0, (3, 17), &dev).unwrap();
        for v in kl(&other) {
            assert!(v > 1e-3, "KL away from the teacher {v}");
        }
    }
}
