//! 8-bit integer matrix products for the retrieval embedder's linear layers at inference.
//!
//! On a CPU with AVX-512 VNNI one `vpdpbusd` multiplies 64 unsigned by 64 signed bytes and sums
//! them in fours into 16 i32 lanes: about 4x the multiply-adds per cycle of an f32 FMA (the
//! bf16 dot is only 2x on paper and slower than f32 in practice on these CPUs). So each linear
//! layer `y += x W^T` runs as:
//!
//! - `W` `(n, k)` quantized once (at load) to signed 8 bits, symmetric, one scale per output row
//!   ([`QWeight`]), and laid out in panels the kernel streams;
//! - each activation row (token) quantized at run time to unsigned 8 bits with its own scale and
//!   zero point ([`QRows`]), the range of one token rather than of the whole batch, so that one
//!   token with large values costs the others no precision;
//! - the products summed exactly in i32, the zero point's share (`zero * sum of the row of W`)
//!   taken off, and the sum scaled back to f32 and added into `y` (which already holds the bias
//!   and the residual, as with `sgemm`'s `beta = 1`).
//!
//! [`gemm_acc`] runs the VNNI kernel where the CPU has AVX-512 F, BW and VNNI ([`available`]),
//! else a portable loop of the same integer arithmetic and the same float rounding (results equal
//! bit for bit; a test checks it). The portable loop is a reference, not a fast path: the
//! embedder uses 8 bits only where [`available`]. One call runs on the calling thread; the
//! embedder runs one batch per core ([`super::blas::threads::side_by_side`]).

#[cfg(target_arch = "x86_64")]
mod avx512;

/// Rows of one register tile of the VNNI kernel; [`QRows`] pads its rows to a multiple.
const MR: usize = 8;
/// Output columns of one weight panel: three 16-lane registers.
const NR: usize = 48;
/// Inputs one i32 lane of `vpdpbusd` sums; rows of quants are padded to a multiple.
const GROUP: usize = 4;

/// Whether this CPU runs the VNNI kernels (AVX-512 F, BW and VNNI), detected once.
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static VNNI: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *VNNI.get_or_init(avx512::available)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// A linear layer's `(n, k)` weight in signed 8 bits: `w[j][l] ~ scale[j] * q`, `q` in
/// `-127..=127`. Stored in panels of [`NR`] output rows: in panel `p`, the 4 quants of inputs
/// `4g..4g + 4` of row `p * NR + r` are the bytes `((p * groups + g) * NR + r) * 4..`, so one
/// 64-byte load gives the kernel 16 output rows' next 4 inputs. Rows past `n` (up to the panel)
/// and inputs past `k` are zero.
#[derive(Clone)]
pub struct QWeight {
    n: usize,
    k: usize,
    /// `k` rounded up to [`GROUP`], over [`GROUP`].
    groups: usize,
    q: Vec<i8>,
    /// Per output row, zero past `n` (whole panels).
    scale: Vec<f32>,
    /// Per output row, the sum of its quants: `x ~ s (u - z)` makes `x . w` equal
    /// `s (u . w - z * sum(w))`. Zero past `n`.
    sums: Vec<i32>,
}

impl std::fmt::Debug for QWeight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QWeight")
            .field("n", &self.n)
            .field("k", &self.k)
            .finish_non_exhaustive()
    }
}

impl QWeight {
    /// Quantize the row-major `(n, k)` weight `w` (`y = x w^T`), each row by its largest `|w|`.
    pub fn new(w: &[f32], n: usize, k: usize) -> Self {
        assert_eq!(w.len(), n * k, "QWeight::new: weight is not {n} x {k}");
        let groups = k.div_ceil(GROUP);
        let padded = n.div_ceil(NR) * NR;
        let mut me = Self {
            n,
            k,
            groups,
            q: vec![0; padded * groups * GROUP],
            scale: vec![0.0; padded],
            sums: vec![0; padded],
        };
        for (j, row) in w.chunks_exact(k.max(1)).enumerate().take(n) {
            let amax = row.iter().fold(0f32, |a, v| a.max(v.abs()));
            let inv = if amax > 0.0 { 127.0 / amax } else { 0.0 };
            me.scale[j] = amax / 127.0;
            let (p, r) = (j / NR, j % NR);
            for (l, &v) in row.iter().enumerate() {
                let q = round_even(v * inv).clamp(-127.0, 127.0) as i8;
                me.q[((p * groups + l / GROUP) * NR + r) * GROUP + l % GROUP] = q;
                me.sums[j] += i32::from(q);
            }
        }
        me
    }

    /// The quant of output row `j`, input `l`.
    fn at(&self, j: usize, l: usize) -> i8 {
        let (p, r) = (j / NR, j % NR);
        self.q[((p * self.groups + l / GROUP) * NR + r) * GROUP + l % GROUP]
    }
}

/// Activation rows in unsigned 8 bits, one scale and zero point per row:
/// `x[i][l] ~ scale[i] * (q - zero[i])`. A buffer reused call after call ([`QRows::quantize`]).
#[derive(Debug, Default)]
pub struct QRows {
    m: usize,
    k: usize,
    /// Bytes per row: `k` rounded up to [`GROUP`].
    stride: usize,
    /// At least `m` rounded up to [`MR`] rows of `stride` bytes (the kernel computes whole tiles
    /// and stores only the real rows); bytes past `k` meet zero weights.
    q: Vec<u8>,
    /// Per row, at least as many as `q` has rows.
    scale: Vec<f32>,
    zero: Vec<i32>,
}

impl QRows {
    pub fn new() -> Self {
        Self::default()
    }

    /// Quantize the `(m, k)` rows of `x` (row stride `ldx`), each over its own range.
    pub fn quantize(&mut self, x: &[f32], m: usize, k: usize, ldx: usize) {
        self.quantize_with(kernel(), x, m, k, ldx);
    }

    fn quantize_with(&mut self, kernel: Kernel, x: &[f32], m: usize, k: usize, ldx: usize) {
        assert!(m == 0 || x.len() >= (m - 1) * ldx + k, "QRows: x too short");
        let stride = k.div_ceil(GROUP) * GROUP;
        let rows = m.div_ceil(MR) * MR;
        (self.m, self.k, self.stride) = (m, k, stride);
        // Not cleared: every real row is written below, and what the padding holds from an
        // earlier call meets zero weights or lands in rows never stored.
        self.q.resize(rows * stride, 0);
        self.scale.resize(rows, 0.0);
        self.zero.resize(rows, 0);
        for i in 0..m {
            let (row, out) = (
                &x[i * ldx..i * ldx + k],
                &mut self.q[i * stride..i * stride + k],
            );
            (self.scale[i], self.zero[i]) = match kernel {
                Kernel::Portable => quantize_row(row, out),
                #[cfg(target_arch = "x86_64")]
                // SAFETY: `Kernel::Vnni` is only chosen where `available()` (AVX-512 F, BW).
                Kernel::Vnni => unsafe { avx512::quantize_row(row, out) },
            };
        }
    }
}

/// Scale, its inverse and the zero point of a row whose values span `[lo, hi]` (`lo <= 0 <=
/// hi`: the range always holds 0, so an all-zero row and zero-filled SIMD lanes need no special
/// case). A range too small to invert (or not finite) maps the row to zero.
fn row_params(lo: f32, hi: f32) -> (f32, f32, i32) {
    let range = hi - lo;
    if !range.is_finite() || range <= 1e-30 {
        return (0.0, 0.0, 0);
    }
    let inv = 255.0 / range;
    (range / 255.0, inv, round_even(-lo * inv) as i32)
}

/// `x` rounded to the nearest integer, ties to even, for `|x| < 2^22` (every caller's values are
/// within 256): adding and subtracting 1.5 * 2^23 rounds in the default rounding mode, as the
/// SIMD conversion does. `round_ties_even` is a libm call on baseline x86-64 (no SSE4.1):
/// quantizing MiniLM's weights took ~0.1 s with it.
fn round_even(x: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0;
    (x + MAGIC) - MAGIC
}

/// One row to unsigned 8 bits: `q = clamp(round(x * inv) + zero, 0, 255)`, rounding half to
/// even ([`round_even`]). Returns `(scale, zero)`.
fn quantize_row(x: &[f32], out: &mut [u8]) -> (f32, i32) {
    let (lo, hi) = x
        .iter()
        .fold((0f32, 0f32), |(lo, hi), &v| (lo.min(v), hi.max(v)));
    let (scale, inv, zero) = row_params(lo, hi);
    for (o, &v) in out.iter_mut().zip(x) {
        *o = (round_even(v * inv) as i32 + zero).clamp(0, 255) as u8;
    }
    (scale, zero)
}

/// Which implementation runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kernel {
    Portable,
    Vnni,
}

fn kernel() -> Kernel {
    if available() {
        Kernel::Vnni
    } else {
        Kernel::Portable
    }
}

/// `c[i][j] += x[i] . w[j]` for the quantized rows `a` `(m, k)` and weight `w` `(n, k)`, `c`
/// row-major with row stride `ldc`; the integer sums exact, then
/// `c += float(sum - zero[i] * sums[j]) * (scale[i] * scale[j])` as one fused multiply-add.
pub fn gemm_acc(a: &QRows, w: &QWeight, c: &mut [f32], ldc: usize) {
    gemm_acc_with(kernel(), a, w, c, ldc);
}

fn gemm_acc_with(kernel: Kernel, a: &QRows, w: &QWeight, c: &mut [f32], ldc: usize) {
    assert_eq!(a.k, w.k, "gemm_acc: inner dimensions differ");
    if a.m == 0 || w.n == 0 {
        return;
    }
    assert!(
        ldc >= w.n && c.len() >= (a.m - 1) * ldc + w.n,
        "gemm_acc: c too short"
    );
    match kernel {
        Kernel::Portable => gemm_acc_portable(a, w, c, ldc),
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Kernel::Vnni` is only chosen where `available()`; the assert above keeps every
        // stored row inside `c`, and `QRows` / `QWeight` pad their buffers to whole tiles.
        Kernel::Vnni => unsafe { avx512::gemm_acc(a, w, c, ldc) },
    }
}

/// [`gemm_acc`] one output at a time.
fn gemm_acc_portable(a: &QRows, w: &QWeight, c: &mut [f32], ldc: usize) {
    for i in 0..a.m {
        let row = &a.q[i * a.stride..i * a.stride + a.k];
        for j in 0..w.n {
            let dot: i32 = row
                .iter()
                .enumerate()
                .map(|(l, &u)| i32::from(u) * i32::from(w.at(j, l)))
                .sum();
            let sum = dot - a.zero[i] * w.sums[j];
            let out = &mut c[i * ldc + j];
            *out = (sum as f32).mul_add(a.scale[i] * w.scale[j], *out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn random(rng: &mut ChaCha8Rng, len: usize, amp: f32) -> Vec<f32> {
        (0..len).map(|_| rng.random_range(-amp..amp)).collect()
    }

    #[test]
    fn igemm_vnni_equals_the_portable_reference() {
        if !available() {
            eprintln!("skipped: this CPU lacks AVX-512 VNNI, only the portable kernel runs");
            return;
        }
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        // Rows, outputs and inputs off the tiles (8 rows, 48 outputs, 4 inputs, 16 lanes).
        for &(m, n, k) in &[
            (1, 1, 1),
            (13, 50, 37),
            (9, 97, 130),
            (20, 48, 64),
            (3, 145, 5),
        ] {
            let mut x = random(&mut rng, m * (k + 3), 2.0);
            // Rows that test the range: all zero, all positive, one outlier.
            x[..k].fill(0.0);
            if m > 2 {
                x[k + 3..2 * k + 3].iter_mut().for_each(|v| *v = v.abs());
                x[2 * (k + 3)] = 40.0;
            }
            let w = QWeight::new(&random(&mut rng, n * k, 0.3), n, k);
            let (mut a, mut b) = (QRows::new(), QRows::new());
            a.quantize_with(Kernel::Portable, &x, m, k, k + 3);
            b.quantize_with(Kernel::Vnni, &x, m, k, k + 3);
            assert_eq!((&a.q, &a.scale, &a.zero), (&b.q, &b.scale, &b.zero));
            let ldc = n + 2;
            let c0 = random(&mut rng, m * ldc, 1.0);
            let (mut want, mut got) = (c0.clone(), c0.clone());
            gemm_acc_with(Kernel::Portable, &a, &w, &mut want, ldc);
            gemm_acc_with(Kernel::Vnni, &a, &w, &mut got, ldc);
            // Equal bit for bit, and the gap columns between rows untouched.
            assert_eq!(want, got, "m {m} n {n} k {k}");
            for i in 0..m {
                assert_eq!(
                    got[i * ldc + n..(i + 1) * ldc],
                    c0[i * ldc + n..(i + 1) * ldc]
                );
            }
        }
    }

    #[test]
    fn igemm_linear_is_close_to_f32() {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let (m, n, k) = (11, 60, 96);
        let x = random(&mut rng, m * k, 1.5);
        let w = random(&mut rng, n * k, 0.2);
        let bias = random(&mut rng, n, 0.5);
        let mut a = QRows::new();
        a.quantize(&x, m, k, k);
        let mut got: Vec<f32> = (0..m).flat_map(|_| bias.iter().copied()).collect();
        gemm_acc(&a, &QWeight::new(&w, n, k), &mut got, n);
        // Each product is off by at most half a step of `x` times |w| plus half a step of `w`
        // times |x|: the bound below is that sum over the row, the errors all of one sign.
        for i in 0..m {
            let xr = &x[i * k..(i + 1) * k];
            let (lo, hi) = xr
                .iter()
                .fold((0f32, 0f32), |(l, h), &v| (l.min(v), h.max(v)));
            let sx = (hi - lo) / 255.0;
            for j in 0..n {
                let wr = &w[j * k..(j + 1) * k];
                let sw = wr.iter().fold(0f32, |a, v| a.max(v.abs())) / 127.0;
                let exact: f32 = bias[j] + xr.iter().zip(wr).map(|(a, b)| a * b).sum::<f32>();
                let bound: f32 = xr
                    .iter()
                    .zip(wr)
                    .map(|(a, b)| sx / 2.0 * (b.abs() + sw / 2.0) + sw / 2.0 * a.abs())
                    .sum();
                let err = (got[i * n + j] - exact).abs();
                assert!(err <= bound * 1.01 + 1e-5, "({i}, {j}): {err} > {bound}");
            }
            // And in practice far inside it: the errors mostly cancel.
            let row_err: f32 = (0..n)
                .map(|j| {
                    let wr = &w[j * k..(j + 1) * k];
                    let e: f32 = bias[j] + xr.iter().zip(wr).map(|(a, b)| a * b).sum::<f32>();
                    (got[i * n + j] - e).powi(2)
                })
                .sum::<f32>()
                .sqrt();
            let row_norm: f32 = (0..n)
                .map(|j| {
                    let wr = &w[j * k..(j + 1) * k];
                    (bias[j] + xr.iter().zip(wr).map(|(a, b)| a * b).sum::<f32>()).powi(2)
                })
                .sum::<f32>()
                .sqrt();
            assert!(
                row_err < 0.02 * row_norm,
                "row {i}: {row_err} of {row_norm}"
            );
        }
    }

    #[test]
    fn igemm_zero_rows_and_weights_give_the_bias() {
        let (m, n, k) = (3, 5, 7);
        let mut a = QRows::new();
        a.quantize(&[0.0; 21], m, k, k);
        let w = QWeight::new(&vec![0.25; n * k], n, k);
        let mut c = vec![1.5; m * n];
        gemm_acc(&a, &w, &mut c, n);
        assert_eq!(c, vec![1.5; m * n]);
        a.quantize(&[1.0; 21], m, k, k);
        gemm_acc(&a, &QWeight::new(&vec![0.0; n * k], n, k), &mut c, n);
        assert_eq!(c, vec![1.5; m * n]);
    }
}
