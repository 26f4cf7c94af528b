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

/// Causal attention on the CPU in f32, without gradients: `q` `(b, h, t, hd)`, `k` and `v`
/// `(b, kv, L, hd)` (strided views of a KV cache are read in place; the last axis must be
/// contiguous), `L = past + t`, query `i` sees keys `0 ..= past + i`; grouped-query heads share
/// their KV head. Returns `(b, t, h, hd)`, ready to be flattened to `(b, t, h * hd)`.
///
/// Queries go in blocks of `BLOCK` rows, each against only its causal prefix of keys: two
/// `sgemm`s per block and head around an in-place masked softmax, so the score buffer stays
/// `BLOCK x L` and the masked triangle is never multiplied.
pub fn causal_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f32) -> Result<Tensor> {
    q.contiguous()?
        .apply_op3_no_bwd(k, v, &CausalAttention { scale })
}

struct CausalAttention {
    scale: f32,
}

const BLOCK: usize = 256;

/// A `(rows, hd)` matrix inside a strided 4-D buffer: its first element and row stride.
fn kv_rows(l: &Layout, b: usize, head: usize) -> Result<(usize, usize)> {
    let st = l.stride();
    if st.len() != 4 || st[3] != 1 {
        candle_core::bail!("attention: keys/values need a contiguous last axis");
    }
    Ok((l.start_offset() + b * st[0] + head * st[1], st[2]))
}

fn f32_data(s: &CpuStorage) -> Result<&[f32]> {
    match s {
        CpuStorage::F32(v) => Ok(v.as_slice()),
        _ => candle_core::bail!("attention: expected f32"),
    }
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

impl candle_core::CustomOp3 for CausalAttention {
    fn name(&self) -> &'static str {
        "blas-causal-attention"
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
        use rayon::prelude::*;
        let (b, h, t, hd) = lq.shape().dims4()?;
        let (bk, nkv, len, hdk) = lk.shape().dims4()?;
        if lv.shape() != lk.shape() || bk != b || hdk != hd || len < t || nkv == 0 || h % nkv != 0 {
            candle_core::bail!(
                "attention: q {:?}, k {:?}, v {:?} do not fit",
                lq.shape(),
                lk.shape(),
                lv.shape()
            );
        }
        let past = len - t;
        let rep = h / nkv;
        let q = contiguous_f32(sq, lq)?;
        let (kd, vd) = (f32_data(sk)?, f32_data(sv)?);
        let mut out = vec![0f32; b * t * h * hd];
        let mut scores = vec![0f32; BLOCK.min(t) * len];
        for bi in 0..b {
            for head in 0..h {
                let (k0, ldk) = kv_rows(lk, bi, head / rep)?;
                let (v0, ldv) = kv_rows(lv, bi, head / rep)?;
                for i0 in (0..t).step_by(BLOCK) {
                    let n = BLOCK.min(t - i0);
                    let keys = past + i0 + n;
                    let s = &mut scores[..n * keys];
                    let q0 = ((bi * h + head) * t + i0) * hd;
                    let kspan = (keys - 1) * ldk + hd;
                    // S = scale * Q K^T over the block's causal prefix.
                    sgemm(
                        false,
                        true,
                        n,
                        keys,
                        hd,
                        self.scale,
                        &q[q0..q0 + n * hd],
                        hd,
                        &kd[k0..k0 + kspan],
                        ldk,
                        0.0,
                        s,
                        keys,
                    );
                    // Row r (query past + i0 + r) sees keys 0 ..= past + i0 + r.
                    s.par_chunks_mut(keys).enumerate().for_each(|(r, row)| {
                        let seen = past + i0 + r + 1;
                        let (live, masked) = row.split_at_mut(seen);
                        softmax_in_place(live);
                        masked.fill(0.0);
                    });
                    // O = S V, written straight into the (b, t, h, hd) output.
                    let o0 = ((bi * t + i0) * h + head) * hd;
                    let ospan = (n - 1) * h * hd + hd;
                    let vspan = (keys - 1) * ldv + hd;
                    sgemm(
                        false,
                        false,
                        n,
                        hd,
                        keys,
                        1.0,
                        s,
                        keys,
                        &vd[v0..v0 + vspan],
                        ldv,
                        0.0,
                        &mut out[o0..o0 + ospan],
                        h * hd,
                    );
                }
            }
        }
        Ok((CpuStorage::F32(out), Shape::from((b, t, h, hd))))
    }
}

/// Defines `pub? fn $name($arg: $ty) -> $ret`, which runs `$generic` compiled for AVX-512 or
/// AVX2+FMA when the CPU has them (chosen at run time), else as built.
macro_rules! simd_dispatch {
    ($(#[$doc:meta])* $vis:vis fn $name:ident($arg:ident: $ty:ty) -> $ret:ty = $generic:ident) => {
        $(#[$doc])*
        $vis fn $name($arg: $ty) -> $ret {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                unsafe fn avx512($arg: $ty) -> $ret {
                    $generic($arg)
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($arg: $ty) -> $ret {
                    $generic($arg)
                }
                if std::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU supports the features the function is compiled for.
                    return unsafe { avx512($arg) };
                }
                if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                    // SAFETY: as above.
                    return unsafe { avx2($arg) };
                }
            }
            $generic($arg)
        }
    };
}

simd_dispatch! {
    /// `x <- softmax(x)`, vectorised: the exponential is a polynomial the compiler turns into
    /// SIMD code, since `f32::exp` is a scalar libm call and a long prefill takes billions.
    pub fn softmax_in_place(x: &mut [f32]) -> () = softmax_generic
}

/// `log(sum(exp(row)))` of each `cols`-long row of `x` (e.g. logits over a vocabulary), with the
/// same vectorised exponential as [`softmax_in_place`].
pub fn log_sum_exp_rows(x: &[f32], cols: usize) -> Vec<f32> {
    x.chunks(cols.max(1)).map(log_sum_exp).collect()
}

simd_dispatch! {
    fn log_sum_exp(x: &[f32]) -> f32 = lse_generic
}

#[inline(always)]
fn lse_generic(x: &[f32]) -> f32 {
    let max = max_of(x);
    if !max.is_finite() {
        return max;
    }
    let mut acc = [0f32; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for c in &mut chunks {
        for (a, b) in acc.iter_mut().zip(c) {
            *a += exp_poly(*b - max);
        }
    }
    let sum: f32 = acc.iter().sum::<f32>()
        + chunks
            .remainder()
            .iter()
            .map(|v| exp_poly(*v - max))
            .sum::<f32>();
    max + sum.ln()
}

#[inline(always)]
fn max_of(x: &[f32]) -> f32 {
    let mut m = [f32::NEG_INFINITY; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for c in &mut chunks {
        for (a, b) in m.iter_mut().zip(c) {
            *a = a.max(*b);
        }
    }
    chunks
        .remainder()
        .iter()
        .chain(m.iter())
        .copied()
        .fold(f32::NEG_INFINITY, f32::max)
}

const LANES: usize = 16;

#[inline(always)]
fn softmax_generic(x: &mut [f32]) {
    let max = max_of(x);
    let mut acc = [0f32; LANES];
    let mut chunks = x.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for (a, b) in acc.iter_mut().zip(c) {
            *b = exp_poly(*b - max);
            *a += *b;
        }
    }
    let mut sum: f32 = acc.iter().sum();
    for v in chunks.into_remainder() {
        *v = exp_poly(*v - max);
        sum += *v;
    }
    let inv = 1.0 / sum;
    x.iter_mut().for_each(|v| *v *= inv);
}

/// `e^x` for `x <= 0` (softmax arguments), relative error below 2e-7: `x = n ln2 + r`,
/// `|r| <= ln2 / 2`, `e^r` by a degree-6 polynomial, `2^n` built in the exponent bits.
/// Branch-free so that loops over it vectorise; arguments below -87 give ~0.
#[inline(always)]
fn exp_poly(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // Rounding by adding and subtracting 1.5 * 2^23 (round-to-nearest, vectorisable).
    const MAGIC: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 0.0);
    let shifted = x * LOG2E + MAGIC;
    let n = shifted - MAGIC;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    // `shifted`'s low mantissa bits hold n (two's complement): 2^n without a float-to-int cast.
    let scale = f32::from_bits(
        shifted
            .to_bits()
            .wrapping_sub(MAGIC.to_bits())
            .wrapping_add(127)
            << 23,
    );
    p * scale
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn close(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    #[test]
    fn softmax_matches_libm_exp() {
        let xs: Vec<f32> = (0..1000)
            .map(|i| ((i * 7919) % 1000) as f32 * 0.05 - 30.0)
            .collect();
        let mut got = xs.clone();
        softmax_in_place(&mut got);
        let max = xs.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let e: Vec<f64> = xs.iter().map(|&v| ((v - max) as f64).exp()).collect();
        let sum: f64 = e.iter().sum();
        for (g, w) in got.iter().zip(&e) {
            let w = w / sum;
            assert!((*g as f64 - w).abs() <= 1e-6 * w + 1e-12, "{g} vs {w}");
        }
        let lse = log_sum_exp_rows(&xs, 250);
        for (row, got) in xs.chunks(250).zip(lse) {
            let want = row.iter().map(|&v| (v as f64).exp()).sum::<f64>().ln();
            assert!((got as f64 - want).abs() < 1e-5, "{got} vs {want}");
        }
        for x in [0.0f32, -0.5, -1.0, -10.0, -50.0, -86.0] {
            let rel = (exp_poly(x) as f64 / (x as f64).exp() - 1.0).abs();
            assert!(rel < 1e-6, "exp({x}): {rel}");
        }
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

    #[test]
    fn causal_attention_matches_a_plain_reference() {
        // Past positions, more rows than one block, grouped-query heads, keys/values read
        // from a strided view of a larger (cache-like) buffer.
        let dev = Device::Cpu;
        let (h, kv, hd, past, t) = (4, 2, 8, 37, BLOCK + 45);
        let len = past + t;
        let q = Tensor::randn(0f32, 1., (1, h, t, hd), &dev).unwrap();
        let kbuf = Tensor::randn(0f32, 1., (1, kv, len + 20, hd), &dev).unwrap();
        let vbuf = Tensor::randn(0f32, 1., (1, kv, len + 20, hd), &dev).unwrap();
        let (k, v) = (
            kbuf.narrow(2, 0, len).unwrap(),
            vbuf.narrow(2, 0, len).unwrap(),
        );
        let scale = 0.3f32;
        let got = causal_attention(&q, &k, &v, scale).unwrap(); // (1, t, h, hd)
        let mask: Vec<f32> = (0..t)
            .flat_map(|i| (0..len).map(move |j| if j > past + i { f32::NEG_INFINITY } else { 0.0 }))
            .collect();
        let mask = Tensor::from_vec(mask, (t, len), &dev).unwrap();
        for head in 0..h {
            let qh = q
                .narrow(1, head, 1)
                .unwrap()
                .squeeze(0)
                .unwrap()
                .squeeze(0)
                .unwrap();
            let kh = k
                .narrow(1, head / (h / kv), 1)
                .unwrap()
                .squeeze(0)
                .unwrap()
                .squeeze(0)
                .unwrap();
            let vh = v
                .narrow(1, head / (h / kv), 1)
                .unwrap()
                .squeeze(0)
                .unwrap()
                .squeeze(0)
                .unwrap();
            let att =
                ((qh.matmul(&kh.t().unwrap()).unwrap() * scale as f64).unwrap() + &mask).unwrap();
            let want = candle_nn::ops::softmax_last_dim(&att)
                .unwrap()
                .matmul(&vh)
                .unwrap();
            let gh = got
                .narrow(2, head, 1)
                .unwrap()
                .squeeze(2)
                .unwrap()
                .squeeze(0)
                .unwrap();
            let d = close(&gh, &want);
            assert!(d < 1e-5, "head {head}: {d}");
        }
    }
}
