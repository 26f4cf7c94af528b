//! The AVX-512 VNNI block dot of [`super`] for 16-bit activations (the decoding default): two
//! 4-bit blocks (or one 8-bit block) a 512-bit register, widened to 16 bits and multiplied into
//! the activations by `vpdpwssd` (pairs of 16-bit products summed into i32 lanes), scaled per
//! block in f32 with FMA. The integer sums are those of [`super::dot_scalar_q16`] exactly; only
//! the order of the f32 additions differs. Chosen at run time by [`super::simd_level`].

use super::{Q16Row, QKind, QK};
use half::f16;
use std::arch::x86_64::*;

/// `x`'s 16-bit quants in the order the 4-bit kernel reads them: for each pair of blocks
/// `(b, b + 1)`, the first halves of both blocks (the elements the low nibbles hold), then the
/// second halves (the high nibbles). A trailing odd block stays as it is.
pub fn pair_layout(q: &[i16]) -> Vec<i16> {
    let mut out = Vec::with_capacity(q.len());
    let pairs = q.chunks_exact(2 * QK);
    let tail = pairs.remainder();
    for p in pairs {
        let (b0, b1) = p.split_at(QK);
        out.extend_from_slice(&b0[..QK / 2]);
        out.extend_from_slice(&b1[..QK / 2]);
        out.extend_from_slice(&b0[QK / 2..]);
        out.extend_from_slice(&b1[QK / 2..]);
    }
    out.extend_from_slice(tail);
    out
}

/// Whether this CPU runs [`dot_q16`].
pub fn available() -> bool {
    is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vnni")
        && is_x86_feature_detected!("f16c")
}

/// [`super::dot_scalar_q16`] with `vpdpwssd`. `a.pairs` must hold [`pair_layout`] of `a.q`
/// for 4-bit weights.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,f16c")]
pub unsafe fn dot_q16(kind: QKind, d: &[f16], m: &[f16], qs: &[u8], a: &Q16Row) -> f32 {
    let nb = d.len();
    let mut acc = _mm512_setzero_ps();
    let zero = _mm512_setzero_si512();
    // Lanes 0..8 take the first of two scales, 8..16 the second.
    let spread = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    let mut b = 0;
    match kind {
        QKind::Q4_0 | QKind::Q4_1 => {
            let low = _mm512_set1_epi16(0x0F);
            let xp = a.pairs.as_ptr();
            while b + 2 <= nb {
                // 32 bytes: block b's 16, then block b + 1's, one byte per 16-bit lane.
                let w = _mm512_cvtepu8_epi16(_mm256_loadu_si256(
                    qs.as_ptr().add(b * 16) as *const __m256i
                ));
                let lo = _mm512_and_si512(w, low);
                let hi = _mm512_srli_epi16(w, 4);
                let xlo = _mm512_loadu_si512(xp.add(b * QK) as *const _);
                let xhi = _mm512_loadu_si512(xp.add(b * QK + QK) as *const _);
                let s = _mm512_dpwssd_epi32(_mm512_dpwssd_epi32(zero, lo, xlo), hi, xhi);
                acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), scales2(d, &a.d, b, spread), acc);
                b += 2;
            }
        }
        QKind::Q8_0 => {
            let xp = a.q.as_ptr();
            while b + 2 <= nb {
                let w0 = _mm512_cvtepi8_epi16(_mm256_loadu_si256(
                    qs.as_ptr().add(b * QK) as *const __m256i
                ));
                let w1 = _mm512_cvtepi8_epi16(_mm256_loadu_si256(
                    qs.as_ptr().add(b * QK + QK) as *const __m256i
                ));
                let s0 =
                    _mm512_dpwssd_epi32(zero, w0, _mm512_loadu_si512(xp.add(b * QK) as *const _));
                let s1 = _mm512_dpwssd_epi32(
                    zero,
                    w1,
                    _mm512_loadu_si512(xp.add(b * QK + QK) as *const _),
                );
                // Fold each block's 16 lanes to 8: lanes 0..8 block b, 8..16 block b + 1.
                let f0 = _mm512_add_epi32(s0, _mm512_shuffle_i64x2(s0, s0, 0b1110_1110));
                let f1 = _mm512_add_epi32(s1, _mm512_shuffle_i64x2(s1, s1, 0b0100_0100));
                let s = _mm512_mask_blend_epi32(0xFF00, f0, f1);
                acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), scales2(d, &a.d, b, spread), acc);
                b += 2;
            }
        }
    }
    let mut total = _mm512_reduce_add_ps(acc);
    // An odd last block, as the portable kernel does it.
    if b < nb {
        let s = super::int_block_dot(kind, qs, b, &a.q[b * QK..(b + 1) * QK]);
        total += d[b].to_f32() * a.d[b] * s as f32;
    }
    // The Q4 offsets and minimums against each block's exact sum.
    total
        + match kind {
            QKind::Q4_0 => -8.0 * dot_half(d, &a.sum),
            QKind::Q4_1 => dot_half(m, &a.sum),
            QKind::Q8_0 => 0.0,
        }
}

/// `[d[b] a[b]; 8] ++ [d[b + 1] a[b + 1]; 8]`, `d` widened from f16.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,f16c")]
unsafe fn scales2(d: &[f16], a: &[f32], b: usize, spread: __m512i) -> __m512 {
    let two = (d.as_ptr().add(b) as *const i32).read_unaligned();
    let dv = _mm_cvtph_ps(_mm_cvtsi32_si128(two));
    let av = _mm_castsi128_ps(_mm_loadl_epi64(a.as_ptr().add(b) as *const __m128i));
    _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(_mm_mul_ps(dv, av)))
}

/// `sum(x y)` in 16 lanes, `x` widened from f16, the tail masked.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,f16c")]
unsafe fn dot_half(x: &[f16], y: &[f32]) -> f32 {
    let n = x.len().min(y.len());
    let mut acc = _mm512_setzero_ps();
    let mut i = 0;
    while i < n {
        let k = (n - i).min(16);
        let mask: __mmask16 = if k == 16 { 0xFFFF } else { (1u16 << k) - 1 };
        let xv = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(
            mask,
            x.as_ptr().add(i) as *const i16,
        ));
        let yv = _mm512_maskz_loadu_ps(mask, y.as_ptr().add(i));
        acc = _mm512_fmadd_ps(xv, yv, acc);
        i += 16;
    }
    _mm512_reduce_add_ps(acc)
}
