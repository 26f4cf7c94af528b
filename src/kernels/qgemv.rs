//! Quantized matrix products for decoding: GGUF Q4_0 / Q4_1 / Q8_0 weights stay in their 4- or
//! 8-bit blocks of 32, each activation row is quantized to 16 bits per block (the default, within
//! ~1e-5 of f32) or 8 (llama.cpp's Q8_0 / Q8_1 scheme), or kept f32, and every block's dot
//! product is an integer (or f32) SIMD dot (AVX2 + FMA when the CPU has them, detected at run
//! time so one binary runs everywhere; a portable loop otherwise), output rows split over
//! threads. A token's decode then reads ~0.6 bytes per weight instead of
//! the 4 of the f32 path: decoding is bound by memory bandwidth, so that is the speed-up.
//!
//! Weights are repacked at load: the f16 block scales (and Q4_1 minimums) become f32 arrays and
//! the quants one contiguous byte array, so the hot loop does no conversion.

use candle_core::quantized::{GgmlDType, QTensor};
use half::f16;

/// Elements per quantization block.
pub const QK: usize = 32;

/// Weight formats with a fast path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QKind {
    /// `d * (q - 8)`, `q` in 0..16.
    Q4_0,
    /// `d * q + m`, `q` in 0..16.
    Q4_1,
    /// `d * q`, `q` in -127..=127.
    Q8_0,
}

impl QKind {
    pub fn from_ggml(t: GgmlDType) -> Option<Self> {
        match t {
            GgmlDType::Q4_0 => Some(QKind::Q4_0),
            GgmlDType::Q4_1 => Some(QKind::Q4_1),
            GgmlDType::Q8_0 => Some(QKind::Q8_0),
            _ => None,
        }
    }

    /// Bytes of one GGUF block.
    fn block_bytes(self) -> usize {
        match self {
            QKind::Q4_0 => 18,
            QKind::Q4_1 => 20,
            QKind::Q8_0 => 34,
        }
    }

    /// Bytes of quants per block after repacking.
    fn quant_bytes(self) -> usize {
        match self {
            QKind::Q4_0 | QKind::Q4_1 => QK / 2,
            QKind::Q8_0 => QK,
        }
    }
}

/// How activations meet the quantized weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Act {
    /// f32 activations times the weights expanded from their blocks in registers: the same
    /// numbers as the f32 product on the dequantized matrix (up to the order of additions).
    F32,
    /// Activations quantized to 8 bits per block and integer dot products: llama.cpp's (and
    /// candle's quantized kernels') arithmetic.
    Q8,
    /// Activations quantized to 16 bits per block (relative error ~1.5e-5 of the block's
    /// largest value, against 4e-3 for 8 bits) and 16-bit integer dot products (`madd`): close
    /// to the f32 numbers at about half the instructions per block.
    Q16,
}

/// A `(rows, cols)` weight matrix in quantized blocks, row-major (`y = W x`).
#[derive(Debug, Clone)]
pub struct QMatrix {
    pub kind: QKind,
    pub rows: usize,
    pub cols: usize,
    /// Block scales, `rows * cols / QK`, f16 as the file stores them (f32 would be a fifth of a
    /// Q4_1 matrix's bytes more to read per token).
    d: Vec<f16>,
    /// Block minimums (Q4_1 only; empty otherwise).
    m: Vec<f16>,
    /// Quants: 16 bytes per Q4 block (low nibble element j, high nibble element j + 16), 32
    /// signed bytes per Q8 block.
    qs: Vec<u8>,
}

/// One activation row, as the product takes it.
pub enum Row {
    F32(F32Row),
    Q8(Q8Row),
    Q16(Q16Row),
}

/// One f32 activation row with the sum of each block (for the Q4 offsets and minimums).
pub struct F32Row {
    x: Vec<f32>,
    sum: Vec<f32>,
}

impl F32Row {
    pub fn new(x: &[f32]) -> Self {
        Self {
            x: x.to_vec(),
            sum: block_sums(x),
        }
    }
}

/// The f32 sum of each block of [`QK`] values of `x`.
fn block_sums(x: &[f32]) -> Vec<f32> {
    x.chunks_exact(QK).map(|b| b.iter().sum()).collect()
}

/// One activation row quantized per block, as llama.cpp's Q8_0 / Q8_1 store it: the scale
/// (rounded to f16), the sum of the quants, the scaled sum (f16, for Q4_1's minimums), and
/// the quants. Rounding the scales as llama.cpp does makes the products equal to its kernels'
/// (and candle's) up to the order of float additions.
pub struct Q8Row {
    d: Vec<f32>,
    qsum: Vec<f32>,
    s: Vec<f32>,
    q: Vec<i8>,
}

/// One activation row quantized to 16 bits per block: `x ~ d * q`, `d = max|x| / 32767`, with
/// the exact f32 sum of each block (for the Q4 offsets and minimums).
pub struct Q16Row {
    d: Vec<f32>,
    sum: Vec<f32>,
    q: Vec<i16>,
    /// `q` in the AVX-512 kernel's pair order (empty when that kernel does not run here).
    pairs: Vec<i16>,
}

impl Q16Row {
    pub fn new(x: &[f32]) -> Self {
        let nb = x.len() / QK;
        let mut r = Self {
            d: Vec::with_capacity(nb),
            sum: block_sums(x),
            q: Vec::with_capacity(x.len()),
            pairs: Vec::new(),
        };
        for blk in x.chunks_exact(QK) {
            let amax = blk.iter().fold(0f32, |a, v| a.max(v.abs()));
            let d = amax / 32767.0;
            let id = if d > 0.0 { 1.0 / d } else { 0.0 };
            r.q.extend(
                blk.iter()
                    .map(|v| (v * id).round().clamp(-32767.0, 32767.0) as i16),
            );
            r.d.push(d);
        }
        #[cfg(target_arch = "x86_64")]
        if simd_level() == Simd::Avx512 {
            r.pairs = avx512::pair_layout(&r.q);
        }
        r
    }
}

fn f16_at(b: &[u8], at: usize) -> f16 {
    f16::from_le_bytes([b[at], b[at + 1]])
}

impl QMatrix {
    /// Repack a 2-D GGUF tensor `(rows, cols)`; `None` when its format has no fast path.
    pub fn from_qtensor(q: &QTensor) -> candle_core::Result<Option<Self>> {
        let Some(kind) = QKind::from_ggml(q.dtype()) else {
            return Ok(None);
        };
        let (rows, cols) = q.shape().dims2()?;
        Self::from_blocks(kind, rows, cols, &q.data()?).map(Some)
    }

    /// Repack `rows * cols / QK` GGUF blocks of `kind`.
    pub fn from_blocks(
        kind: QKind,
        rows: usize,
        cols: usize,
        raw: &[u8],
    ) -> candle_core::Result<Self> {
        if !cols.is_multiple_of(QK) {
            candle_core::bail!("quantized matrix: {cols} columns is not a multiple of {QK}");
        }
        let blocks = rows * cols / QK;
        let bb = kind.block_bytes();
        if raw.len() != blocks * bb {
            candle_core::bail!(
                "quantized matrix ({rows}, {cols}) {kind:?}: {} bytes, expected {}",
                raw.len(),
                blocks * bb
            );
        }
        let mut d = Vec::with_capacity(blocks);
        let mut m = Vec::new();
        let mut qs = Vec::with_capacity(blocks * kind.quant_bytes());
        for blk in raw.chunks_exact(bb) {
            d.push(f16_at(blk, 0));
            let quants = match kind {
                QKind::Q4_1 => {
                    m.push(f16_at(blk, 2));
                    &blk[4..]
                }
                QKind::Q4_0 | QKind::Q8_0 => &blk[2..],
            };
            qs.extend_from_slice(quants);
        }
        Ok(Self {
            kind,
            rows,
            cols,
            d,
            m,
            qs,
        })
    }

    /// The same matrix with its rows in the order `order` (row `i` of the result is row
    /// `order[i]` of this one).
    pub fn permute_rows(&self, order: &[usize]) -> Self {
        let nb = self.cols / QK;
        let qb = nb * self.kind.quant_bytes();
        let mut out = Self {
            d: Vec::with_capacity(self.d.len()),
            m: Vec::with_capacity(self.m.len()),
            qs: Vec::with_capacity(self.qs.len()),
            ..*self
        };
        for &r in order {
            out.d.extend_from_slice(&self.d[r * nb..(r + 1) * nb]);
            if !self.m.is_empty() {
                out.m.extend_from_slice(&self.m[r * nb..(r + 1) * nb]);
            }
            out.qs.extend_from_slice(&self.qs[r * qb..(r + 1) * qb]);
        }
        out
    }

    /// Bytes the matrix occupies.
    pub fn bytes(&self) -> usize {
        2 * (self.d.len() + self.m.len()) + self.qs.len()
    }

    /// `y = x W^T` for `m` activation rows `x` `(m, cols)`, into `y` `(m, rows)`.
    pub fn matmul_t(&self, x: &[f32], m: usize, y: &mut [f32], act: Act) {
        matmul_t_many(&[(self, None)], x, m, &mut [y], act);
    }

    /// Rows `r0..r0 + out.len()` against one activation row, into `out`: four rows a call
    /// (the activations loaded once for the four) where a four-row kernel fits, one at a time
    /// otherwise.
    fn dot_rows(&self, r0: usize, a: &Row, simd: Simd, out: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        {
            let q4 = self.kind != QKind::Q8_0;
            // AVX2 keeps Q8_0 (an LM head) one row at a time: measured, its four-row kernel
            // streamed a 30 MB head at half the rate.
            let four = match a {
                Row::Q16(q) if simd == Simd::Avx512 && q.pairs.len() == q.q.len() => {
                    Some(Four::Avx512Q16(q))
                }
                Row::Q16(q) if simd == Simd::Avx2 && q4 => Some(Four::Avx2Q16(q)),
                Row::Q8(q) if simd >= Simd::Avx2 && q4 => Some(Four::Avx2Q8(q)),
                _ => None,
            };
            if let Some(four) = four {
                let nb = self.cols / QK;
                let qb = nb * self.kind.quant_bytes();
                let mut groups = out.chunks_exact_mut(4);
                let mut r = r0;
                for o in &mut groups {
                    let m = if self.m.is_empty() {
                        &[][..]
                    } else {
                        &self.m[r * nb..(r + 4) * nb]
                    };
                    let (d, qs) = (
                        &self.d[r * nb..(r + 4) * nb],
                        &self.qs[r * qb..(r + 4) * qb],
                    );
                    // SAFETY: `simd` is `Avx512` only where `simd_level` found AVX-512 F / BW /
                    // VNNI and F16C, and at least `Avx2` where it found AVX2 + FMA + F16C (a test
                    // passing a level checks it first); `Avx512Q16` has the pair layout (checked
                    // above), the `Avx2Q8` kernel takes 4-bit rows only; the slices are four
                    // whole rows.
                    let v = unsafe {
                        match four {
                            Four::Avx512Q16(q) => avx512::dot_q16_x4(self.kind, nb, d, m, qs, q),
                            Four::Avx2Q16(q) => avx2::dot_q16_x4(self.kind, nb, d, m, qs, q),
                            Four::Avx2Q8(q) => avx2::dot_x4(self.kind, nb, d, m, qs, q),
                        }
                    };
                    o.copy_from_slice(&v);
                    r += 4;
                }
                for o in groups.into_remainder() {
                    *o = self.dot_row(r, a, simd);
                    r += 1;
                }
                return;
            }
        }
        for (k, o) in out.iter_mut().enumerate() {
            *o = self.dot_row(r0 + k, a, simd);
        }
    }

    /// Dot product of weight row `r` with one activation row.
    fn dot_row(&self, r: usize, a: &Row, simd: Simd) -> f32 {
        let nb = self.cols / QK;
        let qb = self.kind.quant_bytes();
        let d = &self.d[r * nb..(r + 1) * nb];
        let qs = &self.qs[r * nb * qb..(r + 1) * nb * qb];
        let m = if self.m.is_empty() {
            &[][..]
        } else {
            &self.m[r * nb..(r + 1) * nb]
        };
        #[cfg(target_arch = "x86_64")]
        if simd != Simd::Portable {
            // SAFETY: `simd` is at most what `simd_level` found this CPU runs (AVX2 + FMA, and
            // for `Avx512` also AVX-512 F / BW / VNNI), and `pairs` is filled whenever
            // `simd_level` is `Avx512` (a test passing `Avx512` checks that level first).
            return unsafe {
                match a {
                    Row::Q16(a) if simd == Simd::Avx512 && a.pairs.len() == a.q.len() => {
                        avx512::dot_q16(self.kind, d, m, qs, a)
                    }
                    Row::Q8(a) => avx2::dot(self.kind, d, m, qs, a),
                    Row::F32(a) => avx2::dot_f32(self.kind, d, m, qs, a),
                    Row::Q16(a) => avx2::dot_q16(self.kind, d, m, qs, a),
                }
            };
        }
        match a {
            Row::Q8(a) => dot_scalar(self.kind, d, m, qs, a),
            Row::F32(a) => dot_scalar_f32(self.kind, d, m, qs, a),
            Row::Q16(a) => dot_scalar_q16(self.kind, d, m, qs, a),
        }
    }
}

/// The four-row kernel [`QMatrix::dot_rows`] runs, with its activations.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
enum Four<'a> {
    Avx512Q16(&'a Q16Row),
    Avx2Q16(&'a Q16Row),
    Avx2Q8(&'a Q8Row),
}

/// A low-rank side path beside a quantized product, `y += scale (x A^T) B^T` (a LoRA adapter
/// beside the quantized weights it was merged into the dense twin of).
#[derive(Debug, Clone)]
pub struct LowRank {
    /// `A` `(r, cols)`, row-major.
    a: Vec<f32>,
    /// `B^T` `(r, rows)`, row-major: a product row block adds `low_k * B^T[k, rows]`, a
    /// contiguous (vectorised) update per rank, not a short sum per row.
    bt: Vec<f32>,
    r: usize,
    scale: f32,
}

impl LowRank {
    /// From `a` `(r, cols)` and `b` `(rows, r)`, row-major.
    pub fn new(a: Vec<f32>, b: &[f32], r: usize, scale: f32) -> Self {
        let rows = b.len().checked_div(r).unwrap_or(0);
        let mut bt = vec![0f32; b.len()];
        for (i, row) in b.chunks_exact(r.max(1)).enumerate() {
            for (k, v) in row.iter().enumerate() {
                bt[k * rows + i] = *v;
            }
        }
        Self { a, bt, r, scale }
    }

    /// `scale (x A^T)` for each of the `m` rows of `x`, `(m, r)`.
    fn low(&self, x: &[f32], cols: usize) -> Vec<f32> {
        let mut out = Vec::with_capacity(x.len() / cols * self.r);
        for row in x.chunks_exact(cols) {
            out.extend(
                self.a
                    .chunks_exact(cols)
                    .map(|a| self.scale * crate::kernels::blas::dot(a, row)),
            );
        }
        out
    }
}

/// `ys[i] = x W_i^T (+ side_i)` for several matrices of the same width over the same `m`
/// activation rows `x` `(m, cols)`, each `ys[i]` `(m, rows_i)`: the activations are quantized
/// once and all the products' row tasks run in one parallel pass (one fork-join a group, not one
/// a matrix: a decoding step's q / k / v, or gate / up, are small next to a thread hop).
pub fn matmul_t_many(
    parts: &[(&QMatrix, Option<&LowRank>)],
    x: &[f32],
    m: usize,
    ys: &mut [&mut [f32]],
    act: Act,
) {
    assert_eq!(parts.len(), ys.len(), "one output per matrix");
    let Some(cols) = parts.first().map(|(w, _)| w.cols) else {
        return;
    };
    assert_eq!(x.len(), m * cols, "activations");
    for ((w, side), y) in parts.iter().zip(ys.iter()) {
        assert_eq!(w.cols, cols, "matrices of one width");
        assert_eq!(y.len(), m * w.rows, "output");
        if let Some(s) = side {
            assert_eq!(s.a.len(), s.r * cols, "side path A");
            assert_eq!(s.bt.len(), w.rows * s.r, "side path B");
        }
    }
    let acts: Vec<Row> = x.chunks_exact(cols).map(|r| act_row(r, act)).collect();
    let lows: Vec<Option<Vec<f32>>> = parts
        .iter()
        .map(|(_, s)| s.map(|s| s.low(x, cols)))
        .collect();
    let simd = simd_level();
    let per = task_rows(cols);
    // Tasks write whole weight rows, so the products land as (rows, m); with one activation row
    // (every decoding step) that is `y` itself, otherwise a buffer transposed into `y`.
    let mut bufs: Vec<Vec<f32>> = if m == 1 {
        Vec::new()
    } else {
        parts.iter().map(|(w, _)| vec![0f32; w.rows * m]).collect()
    };
    let mut tasks: Vec<(usize, usize, &mut [f32])> = Vec::new();
    if m == 1 {
        for (i, y) in ys.iter_mut().enumerate() {
            tasks.extend(y.chunks_mut(per).enumerate().map(|(t, c)| (i, t, c)));
        }
    } else {
        for (i, b) in bufs.iter_mut().enumerate() {
            tasks.extend(b.chunks_mut(per * m).enumerate().map(|(t, c)| (i, t, c)));
        }
    }
    crate::kernels::team::for_each_mut(&mut tasks, |_, (i, t, chunk)| {
        let (w, side) = parts[*i];
        let r0 = *t * per;
        let chunk = &mut **chunk;
        if m == 1 {
            w.dot_rows(r0, &acts[0], simd, chunk);
        } else {
            for (k, o) in chunk.chunks_exact_mut(m).enumerate() {
                for (a, slot) in acts.iter().zip(o.iter_mut()) {
                    *slot = w.dot_row(r0 + k, a, simd);
                }
            }
        }
        if let (Some(s), Some(low)) = (side, &lows[*i]) {
            let n = chunk.len() / m;
            for (j, l) in low.chunks_exact(s.r).enumerate() {
                for (kr, c) in l.iter().enumerate() {
                    let bt = &s.bt[kr * w.rows + r0..kr * w.rows + r0 + n];
                    if m == 1 {
                        // Contiguous: vectorised.
                        for (o, b) in chunk.iter_mut().zip(bt) {
                            *o += c * b;
                        }
                    } else {
                        for (o, b) in chunk.iter_mut().skip(j).step_by(m).zip(bt) {
                            *o += c * b;
                        }
                    }
                }
            }
        }
    });
    for ((w, _), (buf, y)) in parts.iter().zip(bufs.iter().zip(ys.iter_mut())) {
        for (r, col) in buf.chunks_exact(m).enumerate() {
            for (j, v) in col.iter().enumerate() {
                y[j * w.rows + r] = *v;
            }
        }
    }
}

/// One activation row as the products take it.
fn act_row(x: &[f32], act: Act) -> Row {
    match act {
        Act::F32 => Row::F32(F32Row::new(x)),
        Act::Q8 => Row::Q8(quantize_row(x)),
        Act::Q16 => Row::Q16(Q16Row::new(x)),
    }
}

/// Weight rows per parallel task of a one-row product: at least ~64K weights each, enough
/// work to pay for a thread hop.
fn task_rows(cols: usize) -> usize {
    (65_536 / cols.max(1)).max(16)
}

/// The block-dot kernels a CPU runs, each level including the ones before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Simd {
    /// Plain loops (any CPU).
    Portable,
    /// AVX2 + FMA + F16C (x86-64 since 2013).
    Avx2,
    /// AVX2 + FMA and AVX-512 F / BW / VNNI (Intel since Cascade Lake, AMD since Zen 4): the
    /// 16-bit activation kernel in `vpdpwssd`.
    Avx512,
}

/// The best kernels this CPU runs, detected once per process. `REFRAG_QGEMV=avx2` or
/// `portable` caps the level (to compare kernels, or to step around one).
pub fn simd_level() -> Simd {
    static LEVEL: std::sync::OnceLock<Simd> = std::sync::OnceLock::new();
    *LEVEL.get_or_init(|| {
        let cap = match std::env::var("REFRAG_QGEMV").as_deref() {
            Ok("portable") => Simd::Portable,
            Ok("avx2") => Simd::Avx2,
            _ => Simd::Avx512,
        };
        detected().min(cap)
    })
}

fn detected() -> Simd {
    #[cfg(target_arch = "x86_64")]
    {
        if !(is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c"))
        {
            Simd::Portable
        } else if avx512::available() {
            Simd::Avx512
        } else {
            Simd::Avx2
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        Simd::Portable
    }
}

/// Quantize one row (a multiple of [`QK`] long) to 8 bits per block: `d = max|x| / 127`,
/// quants rounded from the f32 scale, the scale kept as f16 (llama.cpp's `quantize_row_q8_0`).
pub fn quantize_row(x: &[f32]) -> Q8Row {
    let nb = x.len() / QK;
    let mut r = Q8Row {
        d: Vec::with_capacity(nb),
        qsum: Vec::with_capacity(nb),
        s: Vec::with_capacity(nb),
        q: Vec::with_capacity(x.len()),
    };
    let f16 = |v: f32| half::f16::from_f32(v).to_f32();
    for blk in x.chunks_exact(QK) {
        let amax = blk.iter().fold(0f32, |a, v| a.max(v.abs()));
        let d = amax / 127.0;
        let id = if d > 0.0 { 1.0 / d } else { 0.0 };
        let mut sum = 0i32;
        for v in blk {
            let q = (v * id).round().clamp(-127.0, 127.0) as i8;
            sum += q as i32;
            r.q.push(q);
        }
        r.d.push(f16(d));
        r.qsum.push(sum as f32);
        r.s.push(f16(d * sum as f32));
    }
    r
}

/// `sum(q x)` over block `b`'s raw weight quants (Q4: unsigned nibbles, low nibble element j,
/// high j + 16; Q8_0: signed bytes) and the block's integer activation quants `x`.
fn int_block_dot<T: Copy + Into<i32>>(kind: QKind, qs: &[u8], b: usize, x: &[T]) -> i32 {
    match kind {
        QKind::Q4_0 | QKind::Q4_1 => {
            let q = &qs[b * 16..(b + 1) * 16];
            (0..16)
                .map(|j| (q[j] & 0x0F) as i32 * x[j].into() + (q[j] >> 4) as i32 * x[j + 16].into())
                .sum()
        }
        QKind::Q8_0 => qs[b * 32..(b + 1) * 32]
            .iter()
            .zip(x)
            .map(|(&w, &v)| w as i8 as i32 * v.into())
            .sum(),
    }
}

/// The portable kernel (and the reference the SIMD one is tested against).
fn dot_scalar(kind: QKind, d: &[f16], m: &[f16], qs: &[u8], a: &Q8Row) -> f32 {
    let mut acc = 0f32;
    for (b, db) in d.iter().enumerate() {
        let (db, mb) = (db.to_f32(), m.get(b).map_or(0.0, |m| m.to_f32()));
        let s = int_block_dot(kind, qs, b, &a.q[b * QK..(b + 1) * QK]) as f32;
        let da = db * a.d[b];
        acc += match kind {
            QKind::Q4_0 => da * (s - 8.0 * a.qsum[b]),
            QKind::Q4_1 => da * s + mb * a.s[b],
            QKind::Q8_0 => da * s,
        };
    }
    acc
}

/// The portable kernel on f32 activations: `d * sum(q x) (+ m * sum(x))` per block.
fn dot_scalar_f32(kind: QKind, d: &[f16], m: &[f16], qs: &[u8], a: &F32Row) -> f32 {
    let mut acc = 0f32;
    for b in 0..d.len() {
        let (db, mb) = (d[b].to_f32(), m.get(b).map_or(0.0, |m| m.to_f32()));
        let x = &a.x[b * QK..(b + 1) * QK];
        acc += match kind {
            QKind::Q4_0 | QKind::Q4_1 => {
                let q = &qs[b * 16..(b + 1) * 16];
                let mut s = 0f32;
                for j in 0..16 {
                    s += (q[j] & 0x0F) as f32 * x[j] + (q[j] >> 4) as f32 * x[j + 16];
                }
                match kind {
                    QKind::Q4_0 => db * (s - 8.0 * a.sum[b]),
                    _ => db * s + mb * a.sum[b],
                }
            }
            QKind::Q8_0 => {
                let q = &qs[b * 32..(b + 1) * 32];
                let s: f32 = q.iter().zip(x).map(|(&w, &v)| w as i8 as f32 * v).sum();
                db * s
            }
        };
    }
    acc
}

/// The portable kernel on 16-bit activations: `d_w d_x sum(q xq)` per block, plus the Q4
/// offset or minimum times the block's exact sum.
fn dot_scalar_q16(kind: QKind, d: &[f16], m: &[f16], qs: &[u8], a: &Q16Row) -> f32 {
    let mut acc = 0f32;
    for (b, db) in d.iter().enumerate() {
        let (db, mb) = (db.to_f32(), m.get(b).map_or(0.0, |m| m.to_f32()));
        let s = int_block_dot(kind, qs, b, &a.q[b * QK..(b + 1) * QK]);
        acc += db * a.d[b] * s as f32
            + match kind {
                QKind::Q4_0 => -8.0 * db * a.sum[b],
                QKind::Q4_1 => mb * a.sum[b],
                QKind::Q8_0 => 0.0,
            };
    }
    acc
}

#[cfg(target_arch = "x86_64")]
mod avx2;
mod head;
pub use head::top_rows;
#[cfg(target_arch = "x86_64")]
mod avx512;

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};
    use rand::{Rng, SeedableRng};

    fn random(rows: usize, cols: usize, seed: u64) -> Tensor {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let v: Vec<f32> = (0..rows * cols)
            .map(|_| rng.random_range(-1.0f32..1.0))
            .collect();
        Tensor::from_vec(v, (rows, cols), &Device::Cpu).unwrap()
    }

    fn values(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    /// `x w^T`, flattened: the reference product.
    fn product_t(x: &Tensor, w: &Tensor) -> Vec<f32> {
        values(&x.matmul(&w.t().unwrap()).unwrap())
    }

    /// Every format against the dequantized weights times the f32 activations: with f32
    /// activations equal up to rounding; with 8-bit ones the activations' rounding is left (well
    /// under 1% of the row's scale); the SIMD kernels equal the portable ones.
    #[test]
    fn quantized_products_match_the_dequantized_matrix() {
        for (t, kind) in [
            (GgmlDType::Q4_0, QKind::Q4_0),
            (GgmlDType::Q4_1, QKind::Q4_1),
            (GgmlDType::Q8_0, QKind::Q8_0),
        ] {
            for (cols, m) in [(64, 3), (96, 1), (352, 3), (576, 1), (576, 3), (1056, 1)] {
                let rows = 70;
                let q = QTensor::quantize(&random(rows, cols, 1), t).unwrap();
                let w = q.dequantize(&Device::Cpu).unwrap();
                let mat = QMatrix::from_qtensor(&q).unwrap().unwrap();
                assert_eq!(mat.kind, kind);
                let x = random(m, cols, 2);
                let want = product_t(&x, &w);
                let xv = values(&x);
                let scale = want.iter().fold(0f32, |a, v| a.max(v.abs()));
                for (act, tol) in [(Act::Q8, 0.01), (Act::Q16, 1e-4), (Act::F32, 1e-5)] {
                    let mut got = vec![0f32; m * rows];
                    mat.matmul_t(&xv, m, &mut got, act);
                    for (g, e) in got.iter().zip(&want) {
                        assert!((g - e).abs() < tol * scale, "{kind:?} {act:?}: {g} vs {e}");
                    }
                }
                for a in [
                    Row::Q8(quantize_row(&xv[..cols])),
                    Row::F32(F32Row::new(&xv[..cols])),
                    Row::Q16(Q16Row::new(&xv[..cols])),
                ] {
                    for level in [Simd::Avx2, Simd::Avx512] {
                        if level > simd_level() {
                            continue;
                        }
                        // Rows 1..rows: four at a time from an odd start, and a remainder.
                        let mut many = vec![0f32; rows - 1];
                        mat.dot_rows(1, &a, level, &mut many);
                        for r in 0..rows {
                            let s = mat.dot_row(r, &a, Simd::Portable);
                            let tol = 1e-4 * s.abs().max(1.0);
                            let v = mat.dot_row(r, &a, level);
                            assert!((s - v).abs() <= tol, "{kind:?} {level:?} row {r}");
                            if r > 0 {
                                let v = many[r - 1];
                                assert!((s - v).abs() <= tol, "{kind:?} {level:?} rows, {r}");
                            }
                        }
                    }
                }
            }
        }
    }

    /// Several matrices over the same activations in one pass equal their products one by
    /// one, and a low-rank side path equals the product with `scale B A` added to the weights.
    #[test]
    fn grouped_products_with_side_paths_equal_one_by_one() {
        let cols = 128;
        let mats: Vec<(Tensor, QMatrix)> = [(300, GgmlDType::Q4_1), (40, GgmlDType::Q8_0)]
            .into_iter()
            .enumerate()
            .map(|(i, (rows, t))| {
                let q = QTensor::quantize(&random(rows, cols, 10 + i as u64), t).unwrap();
                (
                    q.dequantize(&Device::Cpu).unwrap(),
                    QMatrix::from_qtensor(&q).unwrap().unwrap(),
                )
            })
            .collect();
        let (r, scale) = (4, 0.5f32);
        let a = random(r, cols, 20);
        let b = random(mats[0].1.rows, r, 21);
        let side = LowRank::new(values(&a), &values(&b), r, scale);
        let merged = (&mats[0].0 + (b.matmul(&a).unwrap() * scale as f64).unwrap()).unwrap();
        for m in [1, 3] {
            let x = random(m, cols, 22 + m as u64);
            let xv = values(&x);
            let want = product_t(&x, &merged);
            let mut one = vec![0f32; m * mats[1].1.rows];
            mats[1].1.matmul_t(&xv, m, &mut one, Act::F32);
            let mut y0 = vec![0f32; m * mats[0].1.rows];
            let mut y1 = vec![0f32; m * mats[1].1.rows];
            matmul_t_many(
                &[(&mats[0].1, Some(&side)), (&mats[1].1, None)],
                &xv,
                m,
                &mut [&mut y0, &mut y1],
                Act::F32,
            );
            assert_eq!(y1, one, "m = {m}");
            let tol = 1e-5 * want.iter().fold(1f32, |a, v| a.max(v.abs()));
            for (g, e) in y0.iter().zip(&want) {
                assert!((g - e).abs() < tol, "m = {m}: {g} vs {e}");
            }
        }
    }

    #[test]
    fn permuted_rows_and_bad_sizes() {
        let q = QTensor::quantize(&random(4, 64, 3), GgmlDType::Q4_1).unwrap();
        let mat = QMatrix::from_qtensor(&q).unwrap().unwrap();
        let p = mat.permute_rows(&[2, 0, 3, 1]);
        let x = vec![0.5f32; 64];
        let (mut a, mut b) = (vec![0f32; 4], vec![0f32; 4]);
        mat.matmul_t(&x, 1, &mut a, Act::F32);
        p.matmul_t(&x, 1, &mut b, Act::F32);
        assert_eq!(b, vec![a[2], a[0], a[3], a[1]]);
        assert!(QMatrix::from_blocks(QKind::Q4_1, 4, 64, &[0u8; 10]).is_err());
        assert!(QMatrix::from_blocks(QKind::Q8_0, 1, 40, &[0u8; 34]).is_err());
        let f = QTensor::quantize(&random(4, 64, 3), GgmlDType::F32).unwrap();
        assert!(QMatrix::from_qtensor(&f).unwrap().is_none());
    }
}
