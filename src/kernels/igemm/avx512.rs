//! The AVX-512 VNNI kernels of [`super`]: a register tile of [`MR`] activation rows by [`NR`]
//! outputs (24 i32 accumulators, 3 weight registers, the activations broadcast from memory),
//! one `vpdpbusd` per 4 inputs of 16 outputs. Rows go in blocks of [`MB`] whose quants stay in
//! L1 while every weight panel streams past them from L2. The results equal
//! [`super::gemm_acc_portable`]'s bit for bit: the same integer sums, the same conversion and
//! one fused multiply-add per output.

use super::{row_params, QRows, QWeight, GROUP, MR, NR};
use std::arch::x86_64::*;

/// Activation rows per block: `MB * k` bytes (24 KiB at `k = 384`) stay in L1.
const MB: usize = 64;

/// Whether this CPU runs [`gemm_acc`] and [`quantize_row`].
pub fn available() -> bool {
    is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vnni")
}

/// The lanes of a 16-lane register that hold `left` (< 16 when the row ends) values.
fn lanes(left: usize) -> __mmask16 {
    if left >= 16 {
        0xffff
    } else {
        (1u16 << left) - 1
    }
}

/// [`super::quantize_row`] 16 values at a time: the range by lane-wise min and max (zero-filled
/// tail lanes change nothing, the range holds 0 anyway), the conversion rounding to nearest even
/// (MXCSR's default, as [`super::round_even`]).
#[target_feature(enable = "avx512f,avx512bw")]
pub unsafe fn quantize_row(x: &[f32], out: &mut [u8]) -> (f32, i32) {
    let k = x.len().min(out.len());
    let (mut lo, mut hi) = (_mm512_setzero_ps(), _mm512_setzero_ps());
    for l in (0..k).step_by(16) {
        let v = _mm512_maskz_loadu_ps(lanes(k - l), x.as_ptr().add(l));
        lo = _mm512_min_ps(lo, v);
        hi = _mm512_max_ps(hi, v);
    }
    let (scale, inv, zero) = row_params(_mm512_reduce_min_ps(lo), _mm512_reduce_max_ps(hi));
    let (vinv, vzero) = (_mm512_set1_ps(inv), _mm512_set1_epi32(zero));
    let (floor, ceil) = (_mm512_setzero_si512(), _mm512_set1_epi32(255));
    for l in (0..k).step_by(16) {
        let mask = lanes(k - l);
        let v = _mm512_maskz_loadu_ps(mask, x.as_ptr().add(l));
        let q = _mm512_add_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(v, vinv)), vzero);
        let q = _mm512_min_epi32(_mm512_max_epi32(q, floor), ceil);
        _mm512_mask_cvtepi32_storeu_epi8(out.as_mut_ptr().add(l).cast(), mask, q);
    }
    (scale, zero)
}

/// [`super::gemm_acc`]. The caller checks that `c` holds `a.m` rows of `w.n` outputs at stride
/// `ldc`; `a` and `w` hold whole tiles ([`QRows`] rows padded to [`MR`], [`QWeight`] panels).
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
pub unsafe fn gemm_acc(a: &QRows, w: &QWeight, c: &mut [f32], ldc: usize) {
    let rows = a.m.div_ceil(MR) * MR;
    let panels = w.n.div_ceil(NR);
    for m0 in (0..rows).step_by(MB) {
        for p in 0..panels {
            for r0 in (m0..rows.min(m0 + MB)).step_by(MR) {
                tile(a, w, p, r0, c, ldc);
            }
        }
    }
}

/// Rows `r0..r0 + MR` (the real ones stored) by panel `p`'s outputs.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn tile(a: &QRows, w: &QWeight, p: usize, r0: usize, c: &mut [f32], ldc: usize) {
    let col0 = p * NR;
    let load_i = |at: usize| _mm512_loadu_si512(w.sums.as_ptr().add(at).cast());
    let sums = [load_i(col0), load_i(col0 + 16), load_i(col0 + 32)];
    // The zero point's share first: each accumulator starts at `-zero[i] * sums[j]`.
    let mut acc = [[_mm512_setzero_si512(); 3]; MR];
    for (i, row) in acc.iter_mut().enumerate() {
        let z = _mm512_set1_epi32(-a.zero[r0 + i]);
        for (v, lane) in row.iter_mut().enumerate() {
            *lane = _mm512_mullo_epi32(z, sums[v]);
        }
    }
    let panel = w.q.as_ptr().add(p * w.groups * NR * GROUP);
    let quants = a.q.as_ptr().add(r0 * a.stride);
    for g in 0..w.groups {
        let b = panel.add(g * NR * GROUP);
        let b = [
            _mm512_loadu_si512(b.cast()),
            _mm512_loadu_si512(b.add(64).cast()),
            _mm512_loadu_si512(b.add(128).cast()),
        ];
        for (i, row) in acc.iter_mut().enumerate() {
            let four = quants
                .add(i * a.stride + g * GROUP)
                .cast::<i32>()
                .read_unaligned();
            let x = _mm512_set1_epi32(four);
            for (lane, &bv) in row.iter_mut().zip(&b) {
                *lane = _mm512_dpbusd_epi32(*lane, x, bv);
            }
        }
    }
    let load_f = |at: usize| _mm512_loadu_ps(w.scale.as_ptr().add(at));
    let scales = [load_f(col0), load_f(col0 + 16), load_f(col0 + 32)];
    for (i, row) in acc.iter().enumerate() {
        if r0 + i >= a.m {
            break;
        }
        let sx = _mm512_set1_ps(a.scale[r0 + i]);
        let out = c.as_mut_ptr().add((r0 + i) * ldc);
        for (v, &lane) in row.iter().enumerate() {
            let col = col0 + 16 * v;
            if col >= w.n {
                break;
            }
            let mask = lanes(w.n - col);
            let old = _mm512_maskz_loadu_ps(mask, out.add(col));
            let y = _mm512_fmadd_ps(_mm512_cvtepi32_ps(lane), _mm512_mul_ps(sx, scales[v]), old);
            _mm512_mask_storeu_ps(out.add(col), mask, y);
        }
    }
}
