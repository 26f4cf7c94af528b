//! Causal attention without gradients (prefill and decoding on the CPU, f32): blocks of
//! queries against their causal prefix of keys, two `sgemm`s per block and head around the
//! vectorised in-place softmax.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, Layout, Result, Shape, Tensor};

use super::decode_attention::{few_rows, Dims, Kv, KvHead};
use super::{contiguous_f32, sgemm, softmax_in_place};

/// Causal attention on the CPU in f32, without gradients: `q` `(b, h, t, hd)`, `k` and `v`
/// `(b, kv, L, hd)` (strided views of a KV cache are read in place; the last axis must be
/// contiguous; f16 keys and values are read for at most [`FEW_ROWS`] query rows), `L = past + t`, query `i` sees keys `0 ..= past + i`; grouped-query heads share
/// their KV head. Returns `(b, t, h, hd)`, ready to be flattened to `(b, t, h * hd)`.
///
/// Queries go in blocks of `BLOCK` rows, each against only its causal prefix of keys: two
/// `sgemm`s per block and head around an in-place masked softmax, so the score buffer stays
/// `BLOCK x L` and the masked triangle is never multiplied.
///
/// At most [`FEW_ROWS`] query rows (a decoding step) go to a split-key kernel instead, which
/// spreads one row's keys over the threads and reads each key once for its query heads.
pub fn causal_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f32) -> Result<Tensor> {
    let few_rows = true;
    q.contiguous()?
        .apply_op3_no_bwd(k, v, &CausalAttention { scale, few_rows })
}

/// [`causal_attention`] always through the blocked `sgemm`s, also for a few rows: the
/// reference the split-key kernel is tested and timed against.
pub fn causal_attention_blocked(q: &Tensor, k: &Tensor, v: &Tensor, scale: f32) -> Result<Tensor> {
    let few_rows = false;
    q.contiguous()?
        .apply_op3_no_bwd(k, v, &CausalAttention { scale, few_rows })
}

struct CausalAttention {
    scale: f32,
    few_rows: bool,
}

const BLOCK: usize = 256;

/// Inputs of at most this many query rows (decoding steps) take [`few_rows`], split over
/// blocks of keys; longer ones (prefill) the blocked `sgemm`s.
pub const FEW_ROWS: usize = 4;

/// A `(rows, hd)` matrix inside a strided 4-D buffer: its first element and row stride.
fn kv_rows(l: &Layout, b: usize, head: usize) -> Result<(usize, usize)> {
    let st = l.stride();
    if st.len() != 4 || st[3] != 1 {
        candle_core::bail!("attention: keys/values need a contiguous last axis");
    }
    Ok((l.start_offset() + b * st[0] + head * st[1], st[2]))
}

fn f32_data(s: &CpuStorage) -> Result<&[f32]> {
    match s {
        CpuStorage::F32(v) => Ok(v.as_slice()),
        _ => candle_core::bail!(
            "attention: expected f32 keys and values (f16 only for a few query rows)"
        ),
    }
}

/// Keys and values of one storage type, f32 or f16.
fn kv_data<'a>(k: &'a CpuStorage, v: &'a CpuStorage) -> Result<Kv<'a>> {
    match (k, v) {
        (CpuStorage::F32(k), CpuStorage::F32(v)) => Ok(Kv::F32 { k, v }),
        (CpuStorage::F16(k), CpuStorage::F16(v)) => Ok(Kv::F16 { k, v }),
        (k, v) => candle_core::bail!(
            "attention: keys ({:?}) and values ({:?}) must both be f32 or both f16",
            k.dtype(),
            v.dtype()
        ),
    }
}

impl candle_core::CustomOp3 for CausalAttention {
    fn name(&self) -> &'static str {
        "blas-causal-attention"
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
        use rayon::prelude::*;
        let (b, h, t, hd) = lq.shape().dims4()?;
        let (bk, nkv, len, hdk) = lk.shape().dims4()?;
        if lv.shape() != lk.shape() || bk != b || hdk != hd || len < t || nkv == 0 || h % nkv != 0 {
            candle_core::bail!(
                "attention: q {:?}, k {:?}, v {:?} do not fit",
                lq.shape(),
                lk.shape(),
                lv.shape()
            );
        }
        let past = len - t;
        let rep = h / nkv;
        let q = contiguous_f32(sq, lq)?;
        let mut out = vec![0f32; b * t * h * hd];
        if t <= FEW_ROWS && self.few_rows {
            let mut kv = Vec::with_capacity(b * nkv);
            for bi in 0..b {
                for g in 0..nkv {
                    let (k0, ldk) = kv_rows(lk, bi, g)?;
                    let (v0, ldv) = kv_rows(lv, bi, g)?;
                    kv.push(KvHead { k0, ldk, v0, ldv });
                }
            }
            let d = Dims {
                b,
                h,
                nkv,
                t,
                hd,
                len,
            };
            few_rows(q, kv_data(sk, sv)?, &kv, &d, self.scale, &mut out);
            return Ok((CpuStorage::F32(out), Shape::from((b, t, h, hd))));
        }
        let (kd, vd) = (f32_data(sk)?, f32_data(sv)?);
        let mut scores = vec![0f32; BLOCK.min(t) * len];
        for bi in 0..b {
            for head in 0..h {
                let (k0, ldk) = kv_rows(lk, bi, head / rep)?;
                let (v0, ldv) = kv_rows(lv, bi, head / rep)?;
                for i0 in (0..t).step_by(BLOCK) {
                    let n = BLOCK.min(t - i0);
                    let keys = past + i0 + n;
                    let s = &mut scores[..n * keys];
                    let q0 = ((bi * h + head) * t + i0) * hd;
                    let kspan = (keys - 1) * ldk + hd;
                    // S = scale * Q K^T over the block's causal prefix.
                    sgemm(
                        false,
                        true,
                        n,
                        keys,
                        hd,
                        self.scale,
                        &q[q0..q0 + n * hd],
                        hd,
                        &kd[k0..k0 + kspan],
                        ldk,
                        0.0,
                        s,
                        keys,
                    );
                    // Row r (query past + i0 + r) sees keys 0 ..= past + i0 + r.
                    s.par_chunks_mut(keys).enumerate().for_each(|(r, row)| {
                        let seen = past + i0 + r + 1;
                        let (live, masked) = row.split_at_mut(seen);
                        softmax_in_place(live);
                        masked.fill(0.0);
                    });
                    // O = S V, written straight into the (b, t, h, hd) output.
                    let o0 = ((bi * t + i0) * h + head) * hd;
                    let ospan = (n - 1) * h * hd + hd;
                    let vspan = (keys - 1) * ldv + hd;
                    sgemm(
                        false,
                        false,
                        n,
                        hd,
                        keys,
                        1.0,
                        s,
                        keys,
                        &vd[v0..v0 + vspan],
                        ldv,
                        0.0,
                        &mut out[o0..o0 + ospan],
                        h * hd,
                    );
                }
            }
        }
        Ok((CpuStorage::F32(out), Shape::from((b, t, h, hd))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::blas::tests::close;
    use candle_core::Device;

    #[test]
    fn few_rows_match_the_blocked_sgemms() {
        // Decoding steps (1 to FEW_ROWS rows) over caches shorter than, equal to and longer
        // than one key block, two batch rows, grouped-query heads, a strided cache view; head
        // sizes the AVX2 kernel takes (64, 128) and one it leaves to the portable one (24).
        let dev = Device::Cpu;
        let (h, kv) = (6, 2);
        for (t, past, hd) in [
            (1, 0, 24),
            (1, 255, 24),
            (2, 256, 24),
            (3, 700, 24),
            (FEW_ROWS, 513, 24),
            (1, 0, 64),
            (1, 13, 64),
            (1, 300, 64),
            (2, 517, 64),
            (FEW_ROWS, 255, 128),
        ] {
            let len = past + t;
            let q = Tensor::randn(0f32, 1., (2, h, t, hd), &dev).unwrap();
            let kbuf = Tensor::randn(0f32, 1., (2, kv, len + 9, hd), &dev).unwrap();
            let vbuf = Tensor::randn(0f32, 1., (2, kv, len + 9, hd), &dev).unwrap();
            let k = kbuf.narrow(2, 0, len).unwrap();
            let v = vbuf.narrow(2, 0, len).unwrap();
            let got = causal_attention(&q, &k, &v, 0.4).unwrap();
            let want = causal_attention_blocked(&q, &k, &v, 0.4).unwrap();
            assert_eq!(got.dims(), want.dims());
            let d = close(&got, &want);
            assert!(d < 1e-5, "t {t}, past {past}, hd {hd}: {d}");
        }
        // More rows than FEW_ROWS take the blocked path: identical.
        let hd = 24;
        let q = Tensor::randn(0f32, 1., (1, h, FEW_ROWS + 1, hd), &dev).unwrap();
        let k = Tensor::randn(0f32, 1., (1, kv, 40, hd), &dev).unwrap();
        let v = Tensor::randn(0f32, 1., (1, kv, 40, hd), &dev).unwrap();
        let (a, b) = (
            causal_attention(&q, &k, &v, 0.4).unwrap(),
            causal_attention_blocked(&q, &k, &v, 0.4).unwrap(),
        );
        assert_eq!(close(&a, &b), 0.0);
    }

    #[test]
    fn few_rows_read_f16_keys_and_values_as_their_f32_values() {
        // A half KV cache: the kernel widens f16 rows; the result equals attention over the
        // same (rounded) values in f32, across key blocks and a strided view.
        let dev = Device::Cpu;
        let (h, kv) = (6, 2);
        for (t, past, hd) in [
            (1, 0, 24),
            (1, 300, 24),
            (3, 600, 24),
            (1, 5, 64),
            (3, 700, 64),
        ] {
            let len = past + t;
            let q = Tensor::randn(0f32, 1., (1, h, t, hd), &dev).unwrap();
            let kbuf = Tensor::randn(0f32, 1., (1, kv, len + 5, hd), &dev).unwrap();
            let vbuf = Tensor::randn(0f32, 1., (1, kv, len + 5, hd), &dev).unwrap();
            let (kh, vh) = (
                kbuf.to_dtype(candle_core::DType::F16).unwrap(),
                vbuf.to_dtype(candle_core::DType::F16).unwrap(),
            );
            let (k16, v16) = (kh.narrow(2, 0, len).unwrap(), vh.narrow(2, 0, len).unwrap());
            let wide = |x: &Tensor| x.to_dtype(candle_core::DType::F32).unwrap();
            let (k32, v32) = (wide(&k16), wide(&v16));
            let got = causal_attention(&q, &k16, &v16, 0.4).unwrap();
            let want = causal_attention_blocked(&q, &k32, &v32, 0.4).unwrap();
            let d = close(&got, &want);
            assert!(d < 1e-5, "t {t}, past {past}, hd {hd}: {d}");
        }
        // More rows than FEW_ROWS need f32: a one-line error, not a wrong answer.
        let hd = 24;
        let q = Tensor::randn(0f32, 1., (1, h, FEW_ROWS + 1, hd), &dev).unwrap();
        let k = Tensor::zeros((1, kv, 40, hd), candle_core::DType::F16, &dev).unwrap();
        assert!(causal_attention(&q, &k, &k, 0.4).is_err());
    }

    #[test]
    fn causal_attention_matches_a_plain_reference() {
        // Past positions, more rows than one block, grouped-query heads, keys/values read
        // from a strided view of a larger (cache-like) buffer.
        let dev = Device::Cpu;
        let (h, kv, hd, past, t) = (4, 2, 8, 37, BLOCK + 45);
        let len = past + t;
        let q = Tensor::randn(0f32, 1., (1, h, t, hd), &dev).unwrap();
        let kbuf = Tensor::randn(0f32, 1., (1, kv, len + 20, hd), &dev).unwrap();
        let vbuf = Tensor::randn(0f32, 1., (1, kv, len + 20, hd), &dev).unwrap();
        let (k, v) = (
            kbuf.narrow(2, 0, len).unwrap(),
            vbuf.narrow(2, 0, len).unwrap(),
        );
        let scale = 0.3f32;
        let got = causal_attention(&q, &k, &v, scale).unwrap(); // (1, t, h, hd)
        let mask: Vec<f32> = (0..t)
            .flat_map(|i| (0..len).map(move |j| if j > past + i { f32::NEG_INFINITY } else { 0.0 }))
            .collect();
        let mask = Tensor::from_vec(mask, (t, len), &dev).unwrap();
        // Head `i` of a (1, heads, len, hd) tensor as (len, hd).
        let head_of = |x: &Tensor, i: usize| {
            x.narrow(1, i, 1)
                .unwrap()
                .squeeze(0)
                .unwrap()
                .squeeze(0)
                .unwrap()
        };
        for head in 0..h {
            let (qh, kh, vh) = (
                head_of(&q, head),
                head_of(&k, head / (h / kv)),
                head_of(&v, head / (h / kv)),
            );
            let att =
                ((qh.matmul(&kh.t().unwrap()).unwrap() * scale as f64).unwrap() + &mask).unwrap();
            let want = candle_nn::ops::softmax_last_dim(&att)
                .unwrap()
                .matmul(&vh)
                .unwrap();
            let gh = got
                .narrow(2, head, 1)
                .unwrap()
                .squeeze(2)
                .unwrap()
                .squeeze(0)
                .unwrap();
            let d = close(&gh, &want);
            assert!(d < 1e-5, "head {head}: {d}");
        }
    }
}
