//! The AVX-512 VNNI block dot of [`super`] for 16-bit activations (the decoding default): two
//! 4-bit blocks (or one 8-bit block) a 512-bit register, widened to 16 bits and multiplied into
//! the activations by `vpdpwssd` (pairs of 16-bit products summed into i32 lanes), scaled per
//! block in f32 with FMA. The integer sums are those of [`super::dot_scalar_q16`] exactly; only
//! the order of the f32 additions differs. Chosen at run time by [`super::simd_level`].
//! Decoding runs [`dot_q16_x4`]: four weight rows a call, sixteen blocks' scales at a time
//! (`cargo run --release --example qgemv_bench`, one thread: the 1536 x 576 Q4_1 product 50 ->
//! 39 us, the Q8_0 LM head 1.75 -> 1.4 ms, against one row a call).

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
    let zero_ps = _mm512_setzero_ps();
    let mut acc = zero_ps;
    // Lanes 0..8 take the first of two scales, 8..16 the second.
    let spread = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    let mut b = 0;
    match kind {
        QKind::Q4_0 | QKind::Q4_1 => {
            let xp = a.pairs.as_ptr();
            while b + 2 <= nb {
                let xlo = _mm512_loadu_si512(xp.add(b * QK) as *const _);
                let xhi = _mm512_loadu_si512(xp.add(b * QK + QK) as *const _);
                let s = q4_pair(qs.as_ptr().add(b * 16), xlo, xhi);
                let sc = scale2(d.as_ptr().add(b), a.d.as_ptr().add(b), spread);
                acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), sc, acc);
                b += 2;
            }
        }
        QKind::Q8_0 => {
            let xp = a.q.as_ptr();
            while b + 2 <= nb {
                let x0 = _mm512_loadu_si512(xp.add(b * QK) as *const _);
                let x1 = _mm512_loadu_si512(xp.add(b * QK + QK) as *const _);
                let s = q8_pair(qs.as_ptr().add(b * QK), x0, x1);
                let sc = scale2(d.as_ptr().add(b), a.d.as_ptr().add(b), spread);
                acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), sc, acc);
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
            QKind::Q4_0 => -8.0 * _mm512_reduce_add_ps(add_dot_half(zero_ps, d, &a.sum, 1.0)),
            QKind::Q4_1 => _mm512_reduce_add_ps(add_dot_half(zero_ps, m, &a.sum, 1.0)),
            QKind::Q8_0 => 0.0,
        }
}

/// [`dot_q16`] for four consecutive weight rows (`d`, `m` and `qs` hold the four rows back to
/// back, `nb` blocks each): the activations are loaded once for the four, the four running
/// sums are independent chains, the offsets or minimums are added in the lanes, and the four
/// sums are folded together at the end. Each row's integer block sums are [`dot_q16`]'s; only
/// the order of the f32 additions differs.
#[target_feature(enable = "avx,avx2,fma,avx512f,avx512bw,avx512vnni,f16c")]
pub unsafe fn dot_q16_x4(
    kind: QKind,
    nb: usize,
    d: &[f16],
    m: &[f16],
    qs: &[u8],
    a: &Q16Row,
) -> [f32; 4] {
    debug_assert_eq!(d.len(), 4 * nb);
    let mut acc = [_mm512_setzero_ps(); 4];
    let spread = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    let dp = d.as_ptr();
    let mut b = 0;
    match kind {
        QKind::Q4_0 | QKind::Q4_1 => {
            debug_assert_eq!(qs.len(), 4 * nb * QK / 2);
            let xp = a.pairs.as_ptr();
            // Sixteen blocks at a time, each row's sixteen scales `d * a.d` computed at once
            // and spread to a pair's lanes by one permute.
            while b + 16 <= nb {
                let sv = scales16(dp, nb, b, a);
                for j in 0..8 {
                    let bj = b + 2 * j;
                    let xlo = _mm512_loadu_si512(xp.add(bj * QK) as *const _);
                    let xhi = _mm512_loadu_si512(xp.add(bj * QK + QK) as *const _);
                    let idx = _mm512_add_epi32(spread, _mm512_set1_epi32(2 * j as i32));
                    for (r, acc) in acc.iter_mut().enumerate() {
                        let s = q4_pair(qs.as_ptr().add((r * nb + bj) * 16), xlo, xhi);
                        let sc = _mm512_permutexvar_ps(idx, sv[r]);
                        *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), sc, *acc);
                    }
                }
                b += 16;
            }
            while b + 2 <= nb {
                let xlo = _mm512_loadu_si512(xp.add(b * QK) as *const _);
                let xhi = _mm512_loadu_si512(xp.add(b * QK + QK) as *const _);
                for (r, acc) in acc.iter_mut().enumerate() {
                    let at = r * nb + b;
                    let s = q4_pair(qs.as_ptr().add(at * 16), xlo, xhi);
                    let sc = scale2(dp.add(at), a.d.as_ptr().add(b), spread);
                    *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), sc, *acc);
                }
                b += 2;
            }
        }
        QKind::Q8_0 => {
            debug_assert_eq!(qs.len(), 4 * nb * QK);
            let xp = a.q.as_ptr();
            // Sixteen blocks at a time, as above; each block's 16 lanes scaled by its own
            // scale (broadcast by a permute), so no lanes are folded.
            while b + 16 <= nb {
                let sv = scales16(dp, nb, b, a);
                for j in 0..16 {
                    let bj = b + j;
                    let x = _mm512_loadu_si512(xp.add(bj * QK) as *const _);
                    let idx = _mm512_set1_epi32(j as i32);
                    for (r, acc) in acc.iter_mut().enumerate() {
                        let s = q8_block(qs.as_ptr().add((r * nb + bj) * QK), x);
                        let sc = _mm512_permutexvar_ps(idx, sv[r]);
                        *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), sc, *acc);
                    }
                }
                b += 16;
            }
            while b + 2 <= nb {
                let x0 = _mm512_loadu_si512(xp.add(b * QK) as *const _);
                let x1 = _mm512_loadu_si512(xp.add(b * QK + QK) as *const _);
                for (r, acc) in acc.iter_mut().enumerate() {
                    let at = r * nb + b;
                    let s = q8_pair(qs.as_ptr().add(at * QK), x0, x1);
                    let sc = scale2(dp.add(at), a.d.as_ptr().add(b), spread);
                    *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), sc, *acc);
                }
                b += 2;
            }
        }
    }
    // The Q4 offsets and minimums against each block's exact sum, in the lanes.
    for (r, acc) in acc.iter_mut().enumerate() {
        *acc = match kind {
            QKind::Q4_0 => add_dot_half(*acc, &d[r * nb..(r + 1) * nb], &a.sum, -8.0),
            QKind::Q4_1 => add_dot_half(*acc, &m[r * nb..(r + 1) * nb], &a.sum, 1.0),
            QKind::Q8_0 => *acc,
        };
    }
    let mut out = sum4(acc);
    // An odd last block, as the portable kernel does it.
    if b < nb {
        let qb = qs.len() / (4 * nb);
        for (r, o) in out.iter_mut().enumerate() {
            let s = super::int_block_dot(
                kind,
                &qs[r * nb * qb..(r + 1) * nb * qb],
                b,
                &a.q[b * QK..(b + 1) * QK],
            );
            *o += d[r * nb + b].to_f32() * a.d[b] * s as f32;
        }
    }
    out
}

/// Each of the four rows' scales of blocks `b..b + 16` times the activations' (`d` holds the
/// four rows, `nb` blocks each).
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,f16c")]
unsafe fn scales16(d: *const f16, nb: usize, b: usize, a: &Q16Row) -> [__m512; 4] {
    let ad = _mm512_loadu_ps(a.d.as_ptr().add(b));
    let row = |r: usize| {
        let dv = _mm512_cvtph_ps(_mm256_loadu_si256(d.add(r * nb + b) as *const __m256i));
        _mm512_mul_ps(dv, ad)
    };
    [row(0), row(1), row(2), row(3)]
}

/// `[d[0] a[0]; 8] ++ [d[1] a[1]; 8]`, `d` widened from f16.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,f16c")]
unsafe fn scale2(d: *const f16, a: *const f32, spread: __m512i) -> __m512 {
    let dv = _mm_cvtph_ps(_mm_cvtsi32_si128((d as *const i32).read_unaligned()));
    let av = _mm_castsi128_ps(_mm_loadl_epi64(a as *const __m128i));
    _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(_mm_mul_ps(dv, av)))
}

/// The integer sums of two 4-bit blocks (16 bytes each from `q`) against the activations'
/// pair layout (`xlo`: both blocks' first halves, `xhi`: their second halves), widened to
/// 16 bits and multiplied by `vpdpwssd`: lanes 0..8 the first block, 8..16 the second.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,f16c")]
unsafe fn q4_pair(q: *const u8, xlo: __m512i, xhi: __m512i) -> __m512i {
    let w = _mm512_cvtepu8_epi16(_mm256_loadu_si256(q as *const __m256i));
    let lo = _mm512_and_si512(w, _mm512_set1_epi16(0x0F));
    let hi = _mm512_srli_epi16(w, 4);
    _mm512_dpwssd_epi32(
        _mm512_dpwssd_epi32(_mm512_setzero_si512(), lo, xlo),
        hi,
        xhi,
    )
}

/// The integer sums of one 8-bit block (32 bytes from `q`) against its 16-bit activations, in
/// 16 lanes.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,f16c")]
unsafe fn q8_block(q: *const u8, x: __m512i) -> __m512i {
    let w = _mm512_cvtepi8_epi16(_mm256_loadu_si256(q as *const __m256i));
    _mm512_dpwssd_epi32(_mm512_setzero_si512(), w, x)
}

/// [`q8_block`] of two consecutive blocks, each folded to 8 lanes: lanes 0..8 the first,
/// 8..16 the second (the layout of [`q4_pair`] and [`scale2`]).
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,f16c")]
unsafe fn q8_pair(q: *const u8, x0: __m512i, x1: __m512i) -> __m512i {
    let s0 = q8_block(q, x0);
    let s1 = q8_block(q.add(QK), x1);
    let f0 = _mm512_add_epi32(s0, _mm512_shuffle_i64x2(s0, s0, 0b1110_1110));
    let f1 = _mm512_add_epi32(s1, _mm512_shuffle_i64x2(s1, s1, 0b0100_0100));
    _mm512_mask_blend_epi32(0xFF00, f0, f1)
}

/// `acc + scale * x * y` lane by lane over `x`'s length, `x` widened from f16, the tail masked.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,f16c")]
unsafe fn add_dot_half(mut acc: __m512, x: &[f16], y: &[f32], scale: f32) -> __m512 {
    let n = x.len().min(y.len());
    let s = _mm512_set1_ps(scale);
    let mut i = 0;
    while i < n {
        let k = (n - i).min(16);
        let mask: __mmask16 = if k == 16 { 0xFFFF } else { (1u16 << k) - 1 };
        let xv = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(
            mask,
            x.as_ptr().add(i) as *const i16,
        ));
        let yv = _mm512_mul_ps(_mm512_maskz_loadu_ps(mask, y.as_ptr().add(i)), s);
        acc = _mm512_fmadd_ps(xv, yv, acc);
        i += 16;
    }
    acc
}

/// The four lane sums of `v`.
#[target_feature(enable = "avx,avx2,fma,avx512f")]
unsafe fn sum4(v: [__m512; 4]) -> [f32; 4] {
    let half = |x: __m512| {
        _mm256_add_ps(
            _mm512_castps512_ps256(x),
            _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x), 1)),
        )
    };
    // [a01 a23 b01 b23 a45 a67 b45 b67], then [a b c d] per 128-bit half.
    let ab = _mm256_hadd_ps(half(v[0]), half(v[1]));
    let cd = _mm256_hadd_ps(half(v[2]), half(v[3]));
    let abcd = _mm256_hadd_ps(ab, cd);
    let s = _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1));
    let mut out = [0f32; 4];
    _mm_storeu_ps(out.as_mut_ptr(), s);
    out
}
