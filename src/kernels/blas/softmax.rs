//! The vectorised softmax and log-sum-exp: a polynomial exponential the compiler turns into
//! SIMD code, compiled for AVX-512 or AVX2+FMA and chosen at run time.

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
pub(super) use simd_dispatch;

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
pub(super) fn max_of(x: &[f32]) -> f32 {
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
    let inv = 1.0 / exp_sum(x, max);
    x.iter_mut().for_each(|v| *v *= inv);
}

/// `x <- exp(x - max)`, returning the sum, in independent lane sums so that the exponentials
/// vectorise (one running sum would keep them scalar). Inlined into its callers, so it is
/// compiled for whatever SIMD level they are.
#[inline(always)]
pub(super) fn exp_sum(x: &mut [f32], max: f32) -> f32 {
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
    sum
}

/// `e^x` for `x <= 0` (softmax arguments), relative error below 2e-7: `x = n ln2 + r`,
/// `|r| <= ln2 / 2`, `e^r` by a degree-6 polynomial, `2^n` built in the exponent bits.
/// Branch-free so that loops over it vectorise; arguments below -87 give ~0.
#[inline(always)]
pub(super) fn exp_poly(x: f32) -> f32 {
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
}
