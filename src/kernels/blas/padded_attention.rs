//! Bidirectional attention over a padded batch without gradients (the BERT encoders at
//! inference, f32 on the CPU): each sequence's real tokens attend to its real tokens only, two
//! `sgemm`s per sequence and head around the vectorised in-place softmax, sequences and heads
//! in parallel. Padding rows are left at zero: no real row reads them, and pooling masks them.

use candle_core::{CpuStorage, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{contiguous_f32, sgemm, softmax_in_place};

/// Attention of `q`, `k`, `v` `(b, h, s, hd)` where sequence `i` holds `lens[i]` real tokens
/// (the rest padding), scaled by `scale`. Returns `(b, s, h, hd)`, ready to be flattened to
/// `(b, s, h * hd)`; padding rows are zero.
pub fn padded_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    lens: &[usize],
    scale: f32,
) -> Result<Tensor> {
    let op = PaddedAttention {
        lens: lens.to_vec(),
        scale,
    };
    q.contiguous()?
        .apply_op3_no_bwd(&k.contiguous()?, &v.contiguous()?, &op)
}

struct PaddedAttention {
    lens: Vec<usize>,
    scale: f32,
}

impl candle_core::CustomOp3 for PaddedAttention {
    fn name(&self) -> &'static str {
        "blas-padded-attention"
    }

    fn cpu_fwd(
        &self,
        sq: &CpuStorage,
        lq: &Layout,
        sk: &CpuStorage,
        lk: &Layout,
        sv: &CpuStorage,
        lv: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, h, s, hd) = lq.shape().dims4()?;
        if lk.shape() != lq.shape() || lv.shape() != lq.shape() || self.lens.len() != b {
            candle_core::bail!(
                "padded attention: q {:?}, k {:?}, v {:?}, {} lengths",
                lq.shape(),
                lk.shape(),
                lv.shape(),
                self.lens.len()
            );
        }
        if let Some(&l) = self.lens.iter().find(|&&l| l > s) {
            candle_core::bail!("padded attention: length {l} over {s} positions");
        }
        let (q, k, v) = (
            contiguous_f32(sq, lq)?,
            contiguous_f32(sk, lk)?,
            contiguous_f32(sv, lv)?,
        );
        let span = s * hd;
        // One task per (sequence, head): its `len x hd` output.
        let outs: Vec<Vec<f32>> = (0..b * h)
            .into_par_iter()
            .map(|task| {
                let len = self.lens[task / h];
                let at = task * span;
                let mut out = vec![0f32; len * hd];
                if len == 0 {
                    return out;
                }
                let mut scores = vec![0f32; len * len];
                sgemm(
                    false,
                    true,
                    len,
                    len,
                    hd,
                    self.scale,
                    &q[at..at + len * hd],
                    hd,
                    &k[at..at + len * hd],
                    hd,
                    0.0,
                    &mut scores,
                    len,
                );
                scores.chunks_mut(len).for_each(softmax_in_place);
                sgemm(
                    false,
                    false,
                    len,
                    hd,
                    len,
                    1.0,
                    &scores,
                    len,
                    &v[at..at + len * hd],
                    hd,
                    0.0,
                    &mut out,
                    hd,
                );
                out
            })
            .collect();
        let mut y = vec![0f32; b * s * h * hd];
        for (task, o) in outs.iter().enumerate() {
            let (bi, head) = (task / h, task % h);
            for (i, row) in o.chunks(hd).enumerate() {
                let dst = ((bi * s + i) * h + head) * hd;
                y[dst..dst + hd].copy_from_slice(row);
            }
        }
        Ok((CpuStorage::F32(y), Shape::from((b, s, h, hd))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::blas::tests::close;
    use candle_core::{Device, D};

    #[test]
    fn real_rows_match_masked_softmax_attention() {
        let dev = Device::Cpu;
        let (b, h, s, hd) = (3, 2, 9, 8);
        let lens = [9, 4, 1];
        let q = Tensor::randn(0f32, 1., (b, h, s, hd), &dev).unwrap();
        let k = Tensor::randn(0f32, 1., (b, h, s, hd), &dev).unwrap();
        let v = Tensor::randn(0f32, 1., (b, h, s, hd), &dev).unwrap();
        let got = padded_attention(&q, &k, &v, &lens, 0.3).unwrap(); // (b, s, h, hd)
                                                                     // Reference: BertModel's additive mask over padded keys.
        let mask: Vec<f32> = lens
            .iter()
            .flat_map(|&l| (0..s).map(move |j| if j < l { 0.0 } else { f32::MIN }))
            .collect();
        let mask = Tensor::from_vec(mask, (b, 1, 1, s), &dev).unwrap();
        let att = (q.matmul(&k.t().unwrap()).unwrap() * 0.3)
            .unwrap()
            .broadcast_add(&mask)
            .unwrap();
        let want = candle_nn::ops::softmax(&att, D::Minus1)
            .unwrap()
            .matmul(&v)
            .unwrap()
            .transpose(1, 2)
            .unwrap(); // (b, s, h, hd)
        for (bi, &l) in lens.iter().enumerate() {
            let g = got.narrow(0, bi, 1).unwrap();
            let w = want.narrow(0, bi, 1).unwrap();
            let d = close(&g.narrow(1, 0, l).unwrap(), &w.narrow(1, 0, l).unwrap());
            assert!(d < 1e-5, "sequence {bi}: {d}");
            if l < s {
                let pad = g.narrow(1, l, s - l).unwrap();
                assert_eq!(
                    pad.abs()
                        .unwrap()
                        .sum_all()
                        .unwrap()
                        .to_scalar::<f32>()
                        .unwrap(),
                    0.0
                );
            }
        }
    }
}
