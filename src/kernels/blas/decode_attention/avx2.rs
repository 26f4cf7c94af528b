//! The split-key decoding attention of one task in AVX2 + FMA intrinsics, over f32 or f16 keys
//! and values (F16C widens them in registers, so a half cache is read at half the bytes and
//! never copied). The portable kernel loses most of its time in one horizontal sum per key and
//! row and in storing its output row after every key; here eight keys' dot products are
//! reduced together (two rounds of `hadd`), and each row's output stays in eight registers
//! across the whole block. (Sharing each key load between a KV head's query rows, twelve
//! accumulators a group, measured slower: register spills.)

use std::arch::x86_64::*;

use half::f16;

use super::super::softmax::{exp_sum, max_of};
use super::{KvHead, Partial};

/// Whether this CPU runs the kernels (AVX2, FMA and F16C; checked once per process).
pub fn available() -> bool {
    static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OK.get_or_init(|| {
        is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
    })
}

/// Head sizes the kernels take: whole 64-float slices of each output row (eight registers).
pub fn fits(hd: usize) -> bool {
    hd > 0 && hd.is_multiple_of(64)
}

#[inline(always)]
unsafe fn load_f32(p: *const f32) -> __m256 {
    _mm256_loadu_ps(p)
}

#[inline(always)]
unsafe fn load_f16(p: *const f16) -> __m256 {
    _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
}

#[inline(always)]
unsafe fn hsum(a: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    _mm_cvtss_f32(s)
}

/// The eight lane sums of eight vectors, in order.
#[inline(always)]
unsafe fn hsum8(a: &[__m256; 8]) -> __m256 {
    let g0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
    let g1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
    _mm256_add_ps(
        _mm256_permute2f128_ps(g0, g1, 0x20),
        _mm256_permute2f128_ps(g0, g1, 0x31),
    )
}

/// One kernel per storage type: `$name(q, seen, k, v, kv, (j0, j1), hd)` is the portable
/// `attend_block` of the same task (query rows `q`, pre-scaled; row `r` sees keys below
/// `seen[r]`).
macro_rules! kernel {
    ($name:ident, $t:ty, $load:ident, $features:literal) => {
        /// # Safety
        /// The CPU has the features named; `hd` [`fits`]; `k` and `v` hold rows `j0..j1` of
        /// `kv`'s head.
        #[target_feature(enable = $features)]
        pub unsafe fn $name(
            q: &[f32],
            seen: &[usize],
            k: &[$t],
            v: &[$t],
            kv: &KvHead,
            (j0, j1): (usize, usize),
            hd: usize,
        ) -> Partial {
            let rows = seen.len();
            let mut p = Partial {
                m: vec![f32::NEG_INFINITY; rows],
                l: vec![0f32; rows],
                o: vec![0f32; rows * hd],
            };
            assert!(j1 > j0 && kv.k0 + (j1 - 1) * kv.ldk + hd <= k.len());
            assert!(kv.v0 + (j1 - 1) * kv.ldv + hd <= v.len() && q.len() >= rows * hd);
            let mut s = vec![0f32; j1 - j0];
            let (kp, vp) = (k.as_ptr().add(kv.k0), v.as_ptr().add(kv.v0));
            let key = |i: usize| kp.add((j0 + i) * kv.ldk);
            for r in 0..rows {
                let live = seen[r].clamp(j0, j1) - j0;
                if live == 0 {
                    continue;
                }
                let qr = q.as_ptr().add(r * hd);
                // Scores, eight keys at a time, reduced together.
                let mut i = 0;
                while i + 8 <= live {
                    let mut acc = [_mm256_setzero_ps(); 8];
                    for c in (0..hd).step_by(8) {
                        let qv = _mm256_loadu_ps(qr.add(c));
                        for (u, a) in acc.iter_mut().enumerate() {
                            *a = _mm256_fmadd_ps(qv, $load(key(i + u).add(c)), *a);
                        }
                    }
                    _mm256_storeu_ps(s.as_mut_ptr().add(i), hsum8(&acc));
                    i += 8;
                }
                for (i, si) in s.iter_mut().enumerate().take(live).skip(i) {
                    let mut acc = _mm256_setzero_ps();
                    for c in (0..hd).step_by(8) {
                        let qv = _mm256_loadu_ps(qr.add(c));
                        acc = _mm256_fmadd_ps(qv, $load(key(i).add(c)), acc);
                    }
                    *si = hsum(acc);
                }
                let row = &mut s[..live];
                let m = max_of(row);
                let l = exp_sum(row, m);
                // The output in 64-float slices held in eight registers across the keys.
                let o = p.o.as_mut_ptr().add(r * hd);
                for c0 in (0..hd).step_by(64) {
                    let mut acc = [_mm256_setzero_ps(); 8];
                    for (i, &w) in row.iter().enumerate() {
                        let w = _mm256_set1_ps(w);
                        let vi = vp.add((j0 + i) * kv.ldv + c0);
                        for (u, a) in acc.iter_mut().enumerate() {
                            *a = _mm256_fmadd_ps(w, $load(vi.add(8 * u)), *a);
                        }
                    }
                    for (u, a) in acc.iter().enumerate() {
                        _mm256_storeu_ps(o.add(c0 + 8 * u), *a);
                    }
                }
                p.m[r] = m;
                p.l[r] = l;
            }
            p
        }
    };
}

kernel!(attend_f32, f32, load_f32, "avx2,fma");
kernel!(attend_f16, f16, load_f16, "avx2,fma,f16c");
