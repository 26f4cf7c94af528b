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

/// [`dot_q16`] for four consecutive weight rows (`d`, `m`, `qs` hold the four rows, `nb`
/// blocks each) against one activation row: each block's activations are loaded once for the
/// four rows, the four running sums are independent chains, and eight blocks' scales are
/// widened and multiplied at once, then broadcast to a block's lanes by one permute. A 4-bit
/// block is widened to 16 bits in one step (byte `j` in lane `j`): its low nibbles are
/// elements 0..16, its high nibbles (a shift, as the byte is zero-extended) elements 16..32.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot_q16_x4(
    kind: QKind,
    nb: usize,
    d: &[f16],
    m: &[f16],
    qs: &[u8],
    a: &Q16Row,
) -> [f32; 4] {
    debug_assert_eq!(d.len(), 4 * nb);
    let mut acc = [_mm256_setzero_ps(); 4];
    let low = _mm256_set1_epi16(0x0F);
    let (qp, xq) = (qs.as_ptr(), a.q.as_ptr());
    let mut b = 0;
    while b < nb {
        let n = (nb - b).min(8);
        let sv = scales8(d, nb, b, n, &a.d);
        for j in 0..n {
            let bj = b + j;
            let xp = xq.add(bj * QK) as *const __m256i;
            let (x0, x1) = (_mm256_loadu_si256(xp), _mm256_loadu_si256(xp.add(1)));
            let idx = _mm256_set1_epi32(j as i32);
            for (r, acc) in acc.iter_mut().enumerate() {
                let at = r * nb + bj;
                let s = match kind {
                    QKind::Q4_0 | QKind::Q4_1 => {
                        let w = _mm256_cvtepu8_epi16(_mm_loadu_si128(qp.add(at * 16) as *const _));
                        let lo = _mm256_madd_epi16(_mm256_and_si256(w, low), x0);
                        _mm256_add_epi32(lo, _mm256_madd_epi16(_mm256_srli_epi16(w, 4), x1))
                    }
                    QKind::Q8_0 => {
                        let p = qp.add(at * QK);
                        let w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(p as *const __m128i));
                        let w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128(p.add(16) as *const _));
                        _mm256_add_epi32(_mm256_madd_epi16(w0, x0), _mm256_madd_epi16(w1, x1))
                    }
                };
                let sc = _mm256_permutevar8x32_ps(sv[r], idx);
                *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), sc, *acc);
            }
        }
        b += n;
    }
    let mut out = [0f32; 4];
    for (r, o) in out.iter_mut().enumerate() {
        let row = r * nb..(r + 1) * nb;
        *o = hsum(acc[r])
            + match kind {
                QKind::Q4_0 => -8.0 * dot_half(&d[row], &a.sum),
                QKind::Q4_1 => dot_half(&m[row], &a.sum),
                QKind::Q8_0 => 0.0,
            };
    }
    out
}

/// [`dot`] for four consecutive 4-bit weight rows (Q4_0 or Q4_1; `d`, `m`, `qs` hold the four
/// rows, `nb` blocks each) against one 8-bit activation row: each block's activations are
/// loaded once for the four rows, whose sums are independent chains, and eight blocks' scales
/// are widened and multiplied at once, then broadcast to a block's lanes by one permute.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot_x4(
    kind: QKind,
    nb: usize,
    d: &[f16],
    m: &[f16],
    qs: &[u8],
    a: &Q8Row,
) -> [f32; 4] {
    debug_assert!(kind != QKind::Q8_0 && d.len() == 4 * nb);
    let mut acc = [_mm256_setzero_ps(); 4];
    let (ones, low) = (_mm256_set1_epi16(1), _mm256_set1_epi8(0x0F));
    let (qp, xq) = (qs.as_ptr(), a.q.as_ptr());
    let mut b = 0;
    while b < nb {
        let n = (nb - b).min(8);
        let sv = scales8(d, nb, b, n, &a.d);
        for j in 0..n {
            let bj = b + j;
            let x = _mm256_loadu_si256(xq.add(bj * QK) as *const __m256i);
            let idx = _mm256_set1_epi32(j as i32);
            for (r, acc) in acc.iter_mut().enumerate() {
                // Low nibbles (elements 0..16) in the low lane, high ones (16..32) in the high.
                let raw = _mm_loadu_si128(qp.add((r * nb + bj) * 16) as *const __m128i);
                let both = _mm256_set_m128i(_mm_srli_epi16(raw, 4), raw);
                let p16 = _mm256_maddubs_epi16(_mm256_and_si256(both, low), x);
                let s = _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, ones));
                *acc = _mm256_fmadd_ps(s, _mm256_permutevar8x32_ps(sv[r], idx), *acc);
            }
        }
        b += n;
    }
    let mut out = [0f32; 4];
    for (r, o) in out.iter_mut().enumerate() {
        let row = r * nb..(r + 1) * nb;
        *o = hsum(acc[r])
            + match kind {
                // The offset 8 of each quant: -8 d_w d_x sum(x_q) per block.
                QKind::Q4_0 => {
                    let mut e = 0f32;
                    for (b, db) in d[row].iter().enumerate() {
                        e -= 8.0 * widen(*db) * a.d[b] * a.qsum[b];
                    }
                    e
                }
                QKind::Q4_1 => dot_half(&m[row], &a.s),
                QKind::Q8_0 => 0.0,
            };
    }
    out
}

/// The products `d_w d_x` of blocks `b..b + n` (`n` at most 8) for each of four rows (`d`
/// holds the four, `nb` blocks each) and the activations' scales `ad`, eight blocks widened
/// and multiplied at once; lanes past `n` are zero.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn scales8(d: &[f16], nb: usize, b: usize, n: usize, ad: &[f32]) -> [__m256; 4] {
    let mut sv = [_mm256_setzero_ps(); 4];
    for (r, sv) in sv.iter_mut().enumerate() {
        *sv = if n == 8 {
            let dv = _mm256_cvtph_ps(_mm_loadu_si128(d.as_ptr().add(r * nb + b) as *const _));
            _mm256_mul_ps(dv, _mm256_loadu_ps(ad.as_ptr().add(b)))
        } else {
            let mut v = [0f32; 8];
            for (j, v) in v.iter_mut().enumerate().take(n) {
                *v = widen(d[r * nb + b + j]) * ad[b + j];
            }
            _mm256_loadu_ps(v.as_ptr())
        };
    }
    sv
}

/// `sum x[i] y[i]` of f16 `x` and f32 `y`, eight at a time.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_half(x: &[f16], y: &[f32]) -> f32 {
    let n = x.len().min(y.len());
    let mut acc = _mm256_setzero_ps();
    let mut i = 0;
    while i + 8 <= n {
        let xv = _mm256_cvtph_ps(_mm_loadu_si128(x.as_ptr().add(i) as *const __m128i));
        acc = _mm256_fmadd_ps(xv, _mm256_loadu_ps(y.as_ptr().add(i)), acc);
        i += 8;
    }
    let mut tail = 0f32;
    while i < n {
        tail += widen(x[i]) * y[i];
        i += 1;
    }
    hsum(acc) + tail
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
