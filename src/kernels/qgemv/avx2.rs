//! The AVX2 + FMA block dots of [`super`]: 4- and 8-bit weights against 8-bit, 16-bit or f32
//! activations, chosen at run time by [`super::simd_level`].

use super::{F32Row, Q16Row, Q8Row, QKind, QK};
use half::f16;
use std::arch::x86_64::*;

/// [`super::dot_scalar`] with 32-lane integer products: unsigned 4-bit (or absolute 8-bit)
/// weights times signed 8-bit activations in `maddubs`, pairs summed to i32 by `madd`,
/// scaled per block in f32 with FMA.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot(kind: QKind, d: &[f16], m: &[f16], qs: &[u8], a: &Q8Row) -> f32 {
    let nb = d.len();
    let ones = _mm256_set1_epi16(1);
    let mut acc = _mm256_setzero_ps();
    let mut extra = 0f32;
    for b in 0..nb {
        let (db, mb) = scales(d, m, b);
        let x = _mm256_loadu_si256(a.q.as_ptr().add(b * QK) as *const __m256i);
        let p16 = match kind {
            QKind::Q4_0 | QKind::Q4_1 => {
                let (lo, hi) = nibbles(qs, b);
                _mm256_maddubs_epi16(_mm256_set_m128i(hi, lo), x)
            }
            QKind::Q8_0 => {
                let w = _mm256_loadu_si256(qs.as_ptr().add(b * QK) as *const __m256i);
                _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w))
            }
        };
        let s = _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, ones));
        acc = _mm256_fmadd_ps(_mm256_set1_ps(db * a.d[b]), s, acc);
        match kind {
            QKind::Q4_0 => extra -= 8.0 * db * a.d[b] * a.qsum[b],
            QKind::Q4_1 => extra += mb * a.s[b],
            QKind::Q8_0 => {}
        }
    }
    hsum(acc) + extra
}

/// [`super::dot_scalar_f32`] in 8-lane f32: each block's quants widened to i32 and
/// converted in registers, multiplied into the activations with FMA.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot_f32(kind: QKind, d: &[f16], m: &[f16], qs: &[u8], a: &F32Row) -> f32 {
    let mut acc = _mm256_setzero_ps();
    let mut extra = 0f32;
    let xp = a.x.as_ptr();
    for b in 0..d.len() {
        let (db, mb) = scales(d, m, b);
        // Quants of elements 0..8, 8..16, 16..24, 24..32 as 8 x i32 each.
        let parts: [__m256i; 4] = match kind {
            QKind::Q4_0 | QKind::Q4_1 => {
                let (lo, hi) = nibbles(qs, b);
                [
                    _mm256_cvtepu8_epi32(lo),
                    _mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)),
                    _mm256_cvtepu8_epi32(hi),
                    _mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)),
                ]
            }
            QKind::Q8_0 => {
                let p = qs.as_ptr().add(b * QK);
                let w0 = _mm_loadu_si128(p as *const __m128i);
                let w1 = _mm_loadu_si128(p.add(16) as *const __m128i);
                [
                    _mm256_cvtepi8_epi32(w0),
                    _mm256_cvtepi8_epi32(_mm_srli_si128(w0, 8)),
                    _mm256_cvtepi8_epi32(w1),
                    _mm256_cvtepi8_epi32(_mm_srli_si128(w1, 8)),
                ]
            }
        };
        let x = xp.add(b * QK);
        let mut s = _mm256_mul_ps(_mm256_cvtepi32_ps(parts[0]), _mm256_loadu_ps(x));
        s = _mm256_fmadd_ps(_mm256_cvtepi32_ps(parts[1]), _mm256_loadu_ps(x.add(8)), s);
        s = _mm256_fmadd_ps(_mm256_cvtepi32_ps(parts[2]), _mm256_loadu_ps(x.add(16)), s);
        s = _mm256_fmadd_ps(_mm256_cvtepi32_ps(parts[3]), _mm256_loadu_ps(x.add(24)), s);
        acc = _mm256_fmadd_ps(_mm256_set1_ps(db), s, acc);
        match kind {
            QKind::Q4_0 => extra -= 8.0 * db * a.sum[b],
            QKind::Q4_1 => extra += mb * a.sum[b],
            QKind::Q8_0 => {}
        }
    }
    hsum(acc) + extra
}

/// [`super::dot_scalar_q16`]: each block's 32 weights widened to 16 bits in two registers,
/// multiplied into the 16-bit activations and summed in pairs to i32 by `madd`, scaled in
/// f32 with FMA. Sums stay far inside i32 (four products of at most 127 * 32767 a lane).
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot_q16(kind: QKind, d: &[f16], m: &[f16], qs: &[u8], a: &Q16Row) -> f32 {
    let mut acc = _mm256_setzero_ps();
    let mut extra = 0f32;
    for b in 0..d.len() {
        let (db, mb) = scales(d, m, b);
        let xp = a.q.as_ptr().add(b * QK) as *const __m256i;
        let (x0, x1) = (_mm256_loadu_si256(xp), _mm256_loadu_si256(xp.add(1)));
        let (w0, w1) = match kind {
            QKind::Q4_0 | QKind::Q4_1 => {
                let (lo, hi) = nibbles(qs, b);
                (_mm256_cvtepu8_epi16(lo), _mm256_cvtepu8_epi16(hi))
            }
            QKind::Q8_0 => {
                let p = qs.as_ptr().add(b * QK);
                (
                    _mm256_cvtepi8_epi16(_mm_loadu_si128(p as *const __m128i)),
                    _mm256_cvtepi8_epi16(_mm_loadu_si128(p.add(16) as *const __m128i)),
                )
            }
        };
        let s = _mm256_add_epi32(_mm256_madd_epi16(w0, x0), _mm256_madd_epi16(w1, x1));
        acc = _mm256_fmadd_ps(_mm256_set1_ps(db * a.d[b]), _mm256_cvtepi32_ps(s), acc);
        match kind {
            QKind::Q4_0 => extra -= 8.0 * db * a.sum[b],
            QKind::Q4_1 => extra += mb * a.sum[b],
            QKind::Q8_0 => {}
        }
    }
    hsum(acc) + extra
}

/// Block `b`'s 32 4-bit quants, 16 bytes: its elements 0..16 (the low nibbles) and 16..32 (the
/// high nibbles), one byte each.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn nibbles(qs: &[u8], b: usize) -> (__m128i, __m128i) {
    let low = _mm_set1_epi8(0x0F);
    let raw = _mm_loadu_si128(qs.as_ptr().add(b * 16) as *const __m128i);
    (
        _mm_and_si128(raw, low),
        _mm_and_si128(_mm_srli_epi16(raw, 4), low),
    )
}

/// Block `b`'s scale and minimum (0 without minimums) as f32, widened by F16C.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn scales(d: &[f16], m: &[f16], b: usize) -> (f32, f32) {
    let mb = if m.is_empty() { 0.0 } else { widen(m[b]) };
    (widen(d[b]), mb)
}

/// One f16 as f32 by F16C.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn widen(h: f16) -> f32 {
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(h.to_bits()))))
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn hsum(acc: __m256) -> f32 {
    let h = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    let h = _mm_add_ss(h, _mm_shuffle_ps(h, h, 1));
    _mm_cvtss_f32(h)
}
