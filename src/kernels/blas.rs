//! f32 matrix products on the CPU through the system BLAS.
//!
//! The vendored FAISS already links the system BLAS (OpenBLAS on Debian/Ubuntu, Accelerate on
//! macOS), and its `sgemm` runs the decoder's shapes about three times faster than candle's CPU
//! matmul on this project's machines (AVX-512 kernels; see `examples/mmbench.rs`). Every linear
//! layer on the CPU in f32 goes through [`linear`]; other devices and dtypes use candle's own
//! matmul. The op is differentiable (its backward pass is two more `sgemm`s) and computes no
//! gradient for a frozen operand, which is what training an encoder through a frozen decoder
//! needs.

use std::os::raw::{c_char, c_int};

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};
use candle_nn::Linear;

mod attention;
pub mod core;
mod decode_attention;
pub(crate) use decode_attention::dot;
pub mod encoder_layer;
mod softmax;
pub mod threads;

pub use attention::{causal_attention, causal_attention_blocked, FEW_ROWS};
pub use softmax::{log_sum_exp_rows, softmax_in_place};

/// `x W^T (+ b)` for a linear layer whose weight is `(out, in)`; `x` is `(.., in)`.
pub fn linear(l: &Linear, x: &Tensor) -> Result<Tensor> {
    let y = matmul_t(x, l.weight())?;
    match l.bias() {
        Some(b) => y.broadcast_add(b),
        None => Ok(y),
    }
}

/// `x W^T` with `x` `(.., k)` and `w` `(n, k)`: `(.., n)`.
pub fn matmul_t(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    if !usable(x, w) {
        return match *x.dims() {
            [b, t, k] => x.reshape((b * t, k))?.matmul(&w.t()?)?.reshape((b, t, ())),
            _ => x.broadcast_matmul(&w.t()?),
        };
    }
    let dims = x.dims().to_vec();
    let k = *dims.last().unwrap_or(&0);
    let rows: usize = dims[..dims.len().saturating_sub(1)].iter().product();
    let y = gemm(&x.reshape((rows, k))?, w, false, true)?;
    let mut out = dims;
    if let Some(last) = out.last_mut() {
        *last = w.dim(0)?;
    }
    y.reshape(out)
}

/// `op(a) op(b)` for 2-D tensors, `op` transposing when its flag is set.
pub fn gemm(a: &Tensor, b: &Tensor, ta: bool, tb: bool) -> Result<Tensor> {
    if !usable(a, b) {
        let a = if ta { a.t()? } else { a.clone() };
        let b = if tb { b.t()? } else { b.clone() };
        return a.matmul(&b);
    }
    a.contiguous()?.apply_op2(&b.contiguous()?, Gemm { ta, tb })
}

/// Whether the BLAS path applies: both operands f32 on the CPU, and a BLAS linked in.
fn usable(a: &Tensor, b: &Tensor) -> bool {
    cfg!(any(target_os = "linux", target_os = "macos"))
        && a.device().is_cpu()
        && a.dtype() == DType::F32
        && b.dtype() == DType::F32
}

/// `C = op(A) op(B)`, row-major, through the Fortran `sgemm_`.
#[derive(Debug, Clone, Copy)]
struct Gemm {
    ta: bool,
    tb: bool,
}

impl Gemm {
    /// `(m, k, n)` for `op(A)` `(m, k)` and `op(B)` `(k, n)`.
    fn dims(&self, a: &Layout, b: &Layout) -> Result<(usize, usize, usize)> {
        let (a0, a1) = a.shape().dims2()?;
        let (b0, b1) = b.shape().dims2()?;
        let (m, k) = if self.ta { (a1, a0) } else { (a0, a1) };
        let (k2, n) = if self.tb { (b1, b0) } else { (b0, b1) };
        if k != k2 {
            candle_core::bail!("gemm: inner dimensions differ ({m}x{k} by {k2}x{n})");
        }
        Ok((m, k, n))
    }
}

fn contiguous_f32<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    let data = match s {
        CpuStorage::F32(v) => v.as_slice(),
        _ => candle_core::bail!("gemm: expected f32"),
    };
    match l.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("gemm: operand is not contiguous"),
    }
}

impl CustomOp2 for Gemm {
    fn name(&self) -> &'static str {
        "blas-sgemm"
    }

    fn cpu_fwd(
        &self,
        sa: &CpuStorage,
        la: &Layout,
        sb: &CpuStorage,
        lb: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (m, k, n) = self.dims(la, lb)?;
        let a = contiguous_f32(sa, la)?;
        let b = contiguous_f32(sb, lb)?;
        let mut c = vec![0f32; m * n];
        if m > 0 && n > 0 {
            if k == 0 {
                return Ok((CpuStorage::F32(c), Shape::from((m, n))));
            }
            let int = |v: usize| {
                c_int::try_from(v)
                    .map_err(|_| candle_core::Error::Msg(format!("gemm: {v} too large")))
            };
            // Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T: hand BLAS the
            // operands in swapped order; each row-major buffer read column-major is its transpose.
            let (mi, ni, ki) = (int(m)?, int(n)?, int(k)?);
            let trans_b: c_char = if self.tb { b'T' } else { b'N' } as c_char;
            let trans_a: c_char = if self.ta { b'T' } else { b'N' } as c_char;
            let ldb = if self.tb { ki } else { ni };
            let lda = if self.ta { mi } else { ki };
            let (alpha, beta) = (1f32, 0f32);
            // SAFETY: the slices hold exactly the (m, k), (k, n) and (m, n) matrices described
            // by the leading dimensions passed; BLAS only reads `a`, `b` and writes `c`.
            unsafe {
                blas_sys::sgemm_(
                    &trans_b,
                    &trans_a,
                    &ni,
                    &mi,
                    &ki,
                    &alpha,
                    b.as_ptr(),
                    &ldb,
                    a.as_ptr(),
                    &lda,
                    &beta,
                    c.as_mut_ptr(),
                    &ni,
                );
            }
        }
        Ok((CpuStorage::F32(c), Shape::from((m, n))))
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _c: &Tensor,
        dc: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // C = op(A) op(B); each gradient is another product of the same three matrices.
        let da = if a.track_op() {
            Some(match (self.ta, self.tb) {
                (false, false) => gemm(dc, b, false, true)?, // dC B^T
                (false, true) => gemm(dc, b, false, false)?, // dC B
                (true, false) => gemm(b, dc, false, true)?,  // B dC^T
                (true, true) => gemm(b, dc, true, true)?,    // B^T dC^T
            })
        } else {
            None
        };
        let db = if b.track_op() {
            Some(match (self.ta, self.tb) {
                (false, false) => gemm(a, dc, true, false)?, // A^T dC
                (false, true) => gemm(dc, a, true, false)?,  // dC^T A
                (true, false) => gemm(a, dc, false, false)?, // A dC
                (true, true) => gemm(dc, a, true, true)?,    // dC^T A^T
            })
        } else {
            None
        };
        Ok((da, db))
    }
}

/// This machine's practical f32 peak in GFLOP/s: the best of five `1536^3` products through
/// [`gemm`] after a warm-up (the BLAS on the CPU), the yardstick for `bench`'s
/// fraction-of-peak column.
pub fn sgemm_peak_gflops() -> f64 {
    let n = 1536;
    let dev = candle_core::Device::Cpu;
    let (Ok(a), Ok(b)) = (
        Tensor::ones((n, n), DType::F32, &dev),
        Tensor::ones((n, n), DType::F32, &dev),
    ) else {
        return f64::NAN;
    };
    let _ = gemm(&a, &b, false, true);
    (0..5)
        .filter_map(|_| {
            let t = std::time::Instant::now();
            gemm(&a, &b, false, true).ok()?;
            Some(2.0 * (n * n * n) as f64 / t.elapsed().as_secs_f64() / 1e9)
        })
        .fold(f64::NAN, f64::max)
}

/// Row-major `C (m, n) = alpha * op(A) op(B) + beta * C`: `op(A)` is `(m, k)` (`A` stored
/// `(k, m)` when `ta`), `op(B)` is `(k, n)` (`B` stored `(n, k)` when `tb`), with row strides
/// `lda`, `ldb`, `ldc`. The slices start at each matrix's first element.
#[allow(clippy::too_many_arguments)]
pub(crate) fn sgemm(
    ta: bool,
    tb: bool,
    m: usize,
    n: usize,
    k: usize,
    alpha: f32,
    a: &[f32],
    lda: usize,
    b: &[f32],
    ldb: usize,
    beta: f32,
    c: &mut [f32],
    ldc: usize,
) {
    if m == 0 || n == 0 || k == 0 {
        return;
    }
    let i = |v: usize| v as c_int;
    let trans_b: c_char = if tb { b'T' } else { b'N' } as c_char;
    let trans_a: c_char = if ta { b'T' } else { b'N' } as c_char;
    let a_rows = if ta { k } else { m };
    let b_rows = if tb { n } else { k };
    assert!(a.len() >= (a_rows - 1) * lda + if ta { m } else { k });
    assert!(b.len() >= (b_rows - 1) * ldb + if tb { k } else { n });
    assert!(c.len() >= (m - 1) * ldc + n);
    // SAFETY: the asserts above check that every matrix lies inside its slice.
    unsafe {
        blas_sys::sgemm_(
            &trans_b,
            &trans_a,
            &i(n),
            &i(m),
            &i(k),
            &alpha,
            b.as_ptr(),
            &i(ldb),
            a.as_ptr(),
            &i(lda),
            &beta,
            c.as_mut_ptr(),
            &i(ldc),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    pub(super) fn close(a: &Tensor, b: &Tensor) -> f32 {
        crate::testing::max_abs_diff(a, b)
    }

    #[test]
    fn every_transpose_combination_matches_candle() {
        let dev = Device::Cpu;
        let a = Tensor::randn(0f32, 1., (5, 7), &dev).unwrap();
        let b = Tensor::randn(0f32, 1., (7, 3), &dev).unwrap();
        let want = a.matmul(&b).unwrap();
        let at = a.t().unwrap().contiguous().unwrap();
        let bt = b.t().unwrap().contiguous().unwrap();
        for (x, y, ta, tb) in [
            (&a, &b, false, false),
            (&a, &bt, false, true),
            (&at, &b, true, false),
            (&at, &bt, true, true),
        ] {
            let got = gemm(x, y, ta, tb).unwrap();
            assert!(close(&got, &want) < 1e-5, "ta={ta} tb={tb}");
        }
    }

    #[test]
    fn gradients_match_candle_and_skip_frozen_operands() {
        let dev = Device::Cpu;
        let x = Var::randn(0f32, 1., (2, 4, 6), &dev).unwrap();
        let w = Var::randn(0f32, 1., (3, 6), &dev).unwrap();
        let ours = matmul_t(&x, &w).unwrap().sqr().unwrap().sum_all().unwrap();
        let theirs = x
            .broadcast_matmul(&w.t().unwrap())
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap();
        let (g1, g2) = (ours.backward().unwrap(), theirs.backward().unwrap());
        for v in [x.as_tensor(), w.as_tensor()] {
            let d = close(g1.get(v).unwrap(), g2.get(v).unwrap());
            assert!(d < 1e-4, "{d}");
        }
        // A frozen weight (a plain tensor) gets no gradient; the input still does.
        let frozen = w.as_tensor().detach();
        let g = matmul_t(&x, &frozen)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert!(g.get(&frozen).is_none());
        assert!(g.get(x.as_tensor()).is_some());
    }
}
