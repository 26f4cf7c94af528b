use candle_core::{Device, Tensor};
fn main() -> anyhow::Result<()> {
    for t in [512usize, 2048, 4096] {
        let q = Tensor::randn(0f32, 1., (1, 9, t, 64), &Device::Cpu)?;
        let k = Tensor::randn(0f32, 1., (1, 3, t, 64), &Device::Cpu)?;
        let v = Tensor::randn(0f32, 1., (1, 3, t, 64), &Device::Cpu)?;
        refrag::kernels::blas::causal_attention(&q, &k, &v, 0.125)?;
        let r = 5;
        let s = std::time::Instant::now();
        for _ in 0..r {
            refrag::kernels::blas::causal_attention(&q, &k, &v, 0.125)?;
        }
        let dt = s.elapsed().as_secs_f64() / r as f64;
        let flops = 9.0 * (t * t) as f64 / 2.0 * 64.0 * 4.0;
        println!(
            "attention t={t}: {:.1} ms/layer, {:.1} GFLOP/s, x30 layers = {:.2} s",
            dt * 1e3,
            flops / dt / 1e9,
            dt * 30.0
        );
    }
    // One decoding step (SmolLM2-135M: 9 query heads over 3 KV heads of 64) over a cache of
    // `len` keys in each of 30 layers (their own buffers, so the cache streams from memory as
    // in decoding): the split-key kernel over f32 and over f16 (a half cache) against the
    // blocked sgemms, interleaved, median of 21.
    use candle_core::DType;
    use refrag::kernels::blas::causal_attention_blocked;
    for len in [512usize, 2048, 4096] {
        let q = Tensor::randn(0f32, 1., (1, 9, 1, 64), &Device::Cpu)?;
        let layers = (0..30)
            .map(|_| {
                let k = Tensor::randn(0f32, 1., (1, 3, len, 64), &Device::Cpu)?;
                let v = Tensor::randn(0f32, 1., (1, 3, len, 64), &Device::Cpu)?;
                let (kh, vh) = (k.to_dtype(DType::F16)?, v.to_dtype(DType::F16)?);
                Ok((k, v, kh, vh))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let mut times = [Vec::new(), Vec::new(), Vec::new()];
        for _ in 0..21 {
            for (i, t) in times.iter_mut().enumerate() {
                let s = std::time::Instant::now();
                for (k, v, kh, vh) in &layers {
                    match i {
                        0 => refrag::kernels::blas::causal_attention(&q, k, v, 0.125)?,
                        1 => refrag::kernels::blas::causal_attention(&q, kh, vh, 0.125)?,
                        _ => causal_attention_blocked(&q, k, v, 0.125)?,
                    };
                }
                t.push(s.elapsed().as_secs_f64());
            }
        }
        let [f, h, b] = times.map(|mut v| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2] * 1e3
        });
        println!(
            "decode attention, 1 row over {len} keys x 30 layers: split-key f32 {f:.2} ms, \
             f16 cache {h:.2} ms, blocked sgemm {b:.2} ms per token"
        );
    }
    Ok(())
}
