//! Greedy decoding's LM head: the one product of a decoding step that only an argmax reads. A
//! 4-bit copy of the head ([`QMatrix::to_q4_0`], about half the bytes of a Q8_0 head) ranks
//! every vocabulary row, and only the best few rows are scored again on the head's own blocks,
//! each exactly as the whole product ([`super::matmul_t_many`]) scores it. The token chosen is
//! the full head's argmax whenever that row ranks among the kept ones in the 4-bit copy: the
//! copy's error is a few hundredths of the logits' spread, so the full head's winner ranks near
//! the top (`REFRAG_HEAD=full` turns this off, for comparison).
//!
//! A decoding step reads every weight once, so it runs at the rate the memory streams them:
//! SmolLM2-135M's Q8_0 head is 30 of the ~96 MB a token reads, its 4-bit copy 16.

use half::f16;

use super::{act_row, simd_level, task_rows, Act, QKind, QMatrix, Row, Simd, QK};

impl QMatrix {
    /// Weight row `r` as f32 values, into `out` (`cols` long).
    fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        let nb = self.cols / QK;
        let qb = self.kind.quant_bytes();
        for (b, o) in out.chunks_exact_mut(QK).enumerate() {
            let at = r * nb + b;
            let d = self.d[at].to_f32();
            let q = &self.qs[at * qb..(at + 1) * qb];
            match self.kind {
                QKind::Q8_0 => o
                    .iter_mut()
                    .zip(q)
                    .for_each(|(o, &q)| *o = d * q as i8 as f32),
                QKind::Q4_0 | QKind::Q4_1 => {
                    let (off, m) = match self.kind {
                        QKind::Q4_0 => (8.0, 0.0),
                        _ => (0.0, self.m[at].to_f32()),
                    };
                    for j in 0..QK / 2 {
                        o[j] = d * ((q[j] & 0x0F) as f32 - off) + m;
                        o[j + QK / 2] = d * ((q[j] >> 4) as f32 - off) + m;
                    }
                }
            }
        }
    }

    /// The same matrix in Q4_0 blocks (llama.cpp's rounding: the block's value of largest
    /// magnitude maps to -8), rows converted in parallel.
    pub fn to_q4_0(&self) -> QMatrix {
        let nb = self.cols / QK;
        let per = task_rows(self.cols);
        let parts = crate::kernels::team::map(self.rows.div_ceil(per.max(1)), |t| {
            let (r0, r1) = (t * per, ((t + 1) * per).min(self.rows));
            let mut row = vec![0f32; self.cols];
            let mut d = Vec::with_capacity((r1 - r0) * nb);
            let mut qs = Vec::with_capacity((r1 - r0) * nb * QK / 2);
            for r in r0..r1 {
                self.dequantize_row(r, &mut row);
                for blk in row.chunks_exact(QK) {
                    let max = blk
                        .iter()
                        .fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
                    let scale = max / -8.0;
                    let inv = if scale != 0.0 { 1.0 / scale } else { 0.0 };
                    let q = |v: f32| ((v * inv + 8.5) as i32).clamp(0, 15) as u8;
                    d.push(f16::from_f32(scale));
                    qs.extend((0..QK / 2).map(|j| q(blk[j]) | (q(blk[j + QK / 2]) << 4)));
                }
            }
            (d, qs)
        });
        let mut out = QMatrix {
            kind: QKind::Q4_0,
            rows: self.rows,
            cols: self.cols,
            d: Vec::with_capacity(self.rows * nb),
            m: Vec::new(),
            qs: Vec::with_capacity(self.rows * nb * QK / 2),
        };
        for (d, qs) in parts {
            out.d.extend(d);
            out.qs.extend(qs);
        }
        out
    }

    /// Row `r`'s product with `a` computed exactly as the one-row product over the whole matrix
    /// computes it (tasks of `per` rows, each in groups of four from its start), so the value
    /// is bit for bit the one the whole product gives.
    fn dot_row_as_in_product(&self, r: usize, per: usize, a: &Row, simd: Simd) -> f32 {
        let start = r / per * per;
        // Where the task's groups of four end; the rows after them go one at a time.
        let fours_end = start + per.min(self.rows - start) / 4 * 4;
        let (group, n) = if r < fours_end {
            (start + (r - start) / 4 * 4, 4)
        } else {
            (r, 1)
        };
        let mut out = [0f32; 4];
        self.dot_rows(group, a, simd, &mut out[..n]);
        out[r - group]
    }
}

/// The `keep` rows of `exact` (the LM head) that rank highest in its 4-bit copy `coarse`
/// against the activation row `x`, each with its product on `exact` as
/// [`super::matmul_t_many`] computes it, best first. Candidates for greedy decoding's argmax:
/// the rows not returned are ones the copy ranks below `keep` others.
pub fn top_rows(
    exact: &QMatrix,
    coarse: &QMatrix,
    x: &[f32],
    keep: usize,
    act: Act,
) -> Vec<(usize, f32)> {
    assert_eq!(
        (exact.rows, exact.cols),
        (coarse.rows, coarse.cols),
        "copy of the head"
    );
    assert_eq!(x.len(), exact.cols, "one activation row");
    let simd = simd_level();
    let a = act_row(x, act);
    // Ranking needs no more than 8-bit activations (the 4-bit weights err far more), which
    // multiply at twice the 16-bit rate where the CPU has no 16-bit dot instruction.
    let a8 = act_row(x, Act::Q8);
    let per = task_rows(exact.cols);
    let mut ranks = vec![0f32; coarse.rows];
    let mut tasks: Vec<(usize, &mut [f32])> = ranks.chunks_mut(per).enumerate().collect();
    crate::kernels::team::for_each_mut(&mut tasks, |_, (t, chunk)| {
        coarse.dot_rows(*t * per, &a8, simd, chunk);
    });
    let mut rows: Vec<(usize, f32)> = best(&ranks, keep)
        .into_iter()
        .map(|r| (r, exact.dot_row_as_in_product(r, per, &a, simd)))
        .collect();
    rows.sort_by(|x, y| y.1.total_cmp(&x.1).then(x.0.cmp(&y.0)));
    rows
}

/// Indices of the `k` largest values of `v` (ties: the lower index), in no particular order.
fn best(v: &[f32], k: usize) -> Vec<usize> {
    let k = k.min(v.len());
    if k == 0 {
        return Vec::new();
    }
    // Sorted best first; a value enters only when it beats the current k-th.
    let mut top: Vec<(f32, usize)> = v[..k].iter().copied().zip(0..).collect();
    top.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    let mut floor = top[k - 1].0;
    for (i, &x) in v.iter().enumerate().skip(k) {
        if x > floor {
            let at = top.partition_point(|t| t.0 >= x);
            top.insert(at, (x, i));
            top.pop();
            floor = top[k - 1].0;
        }
    }
    top.into_iter().map(|t| t.1).collect()
}

#[cfg(test)]
mod tests {
    use super::super::{matmul_t_many, Act, QMatrix};
    use super::{best, top_rows};
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Tensor};
    use rand::{Rng, SeedableRng};

    fn q8_head(rows: usize, cols: usize, seed: u64) -> (QMatrix, Vec<f32>) {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let w: Vec<f32> = (0..rows * cols)
            .map(|_| rng.random_range(-1.0f32..1.0))
            .collect();
        let x: Vec<f32> = (0..cols).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        let t = Tensor::from_vec(w, (rows, cols), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&t, GgmlDType::Q8_0).unwrap();
        (QMatrix::from_qtensor(&q).unwrap().unwrap(), x)
    }

    #[test]
    fn best_keeps_the_largest_values() {
        let v = [0.5, 3.0, -1.0, 3.0, 2.0, f32::NAN, 7.0];
        let mut b = best(&v, 3);
        b.sort();
        assert_eq!(b, vec![1, 3, 6]);
        assert_eq!(best(&v, 0), Vec::<usize>::new());
        assert_eq!(best(&v[..2], 5).len(), 2);
    }

    /// The 4-bit copy equals candle's own Q4_0 conversion of the Q8_0 values, and dequantizes
    /// to within one step of them (half a step but where the top level, 7 steps, clips; the
    /// scale is rounded to f16).
    #[test]
    fn the_4_bit_copy_is_llama_cpps_q4_0() {
        let (head, _) = q8_head(37, 96, 1);
        let copy = head.to_q4_0();
        let mut w = vec![0f32; 37 * 96];
        for (r, row) in w.chunks_exact_mut(96).enumerate() {
            head.dequantize_row(r, row);
        }
        let t = Tensor::from_vec(w.clone(), (37, 96), &Device::Cpu).unwrap();
        let theirs = QTensor::quantize(&t, GgmlDType::Q4_0).unwrap();
        let theirs = QMatrix::from_qtensor(&theirs).unwrap().unwrap();
        assert_eq!(copy.qs, theirs.qs);
        assert_eq!(copy.d, theirs.d);
        let mut row = vec![0f32; 96];
        for r in 0..37 {
            copy.dequantize_row(r, &mut row);
            for (b, (x, y)) in row.chunks(32).zip(w[r * 96..].chunks(32)).enumerate() {
                let step = copy.d[r * 3 + b].to_f32().abs();
                for (x, y) in x.iter().zip(y) {
                    assert!((x - y).abs() <= 1.01 * step, "row {r}: {x} vs {y}");
                }
            }
        }
    }

    /// Kept rows carry the whole product's values bit for bit (every row kept: the whole
    /// product, reordered), and with a few kept the best of them is the whole product's argmax.
    #[test]
    fn kept_rows_equal_the_whole_products() {
        for rows in [300, 1000, 4099] {
            let (head, x) = q8_head(rows, 576, rows as u64);
            let copy = head.to_q4_0();
            for act in [Act::Q16, Act::Q8, Act::F32] {
                let mut full = vec![0f32; rows];
                matmul_t_many(&[(&head, None)], &x, 1, &mut [&mut full], act);
                let all = top_rows(&head, &copy, &x, rows, act);
                assert_eq!(all.len(), rows);
                for &(r, v) in &all {
                    assert_eq!(v.to_bits(), full[r].to_bits(), "{act:?} row {r} of {rows}");
                }
                let argmax = crate::decoder::sample::argmax(&full) as usize;
                let few = top_rows(&head, &copy, &x, 32, act);
                assert_eq!(few.len(), 32);
                assert_eq!(few[0].0, argmax, "{act:?}, {rows} rows");
                assert!(few.windows(2).all(|w| w[0].1 >= w[1].1));
            }
        }
    }
}
