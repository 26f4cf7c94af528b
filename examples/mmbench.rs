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
    // `len` keys: the split-key kernel against the blocked sgemms, interleaved, median of 51.
    use refrag::kernels::blas::causal_attention_blocked;
    for len in [512usize, 2048, 4096] {
        let q = Tensor::randn(0f32, 1., (1, 9, 1, 64), &Device::Cpu)?;
        let k = Tensor::randn(0f32, 1., (1, 3, len, 64), &Device::Cpu)?;
        let v = Tensor::randn(0f32, 1., (1, 3, len, 64), &Device::Cpu)?;
        let (mut few, mut blocked) = (Vec::new(), Vec::new());
        for _ in 0..51 {
            let s = std::time::Instant::now();
            refrag::kernels::blas::causal_attention(&q, &k, &v, 0.125)?;
            few.push(s.elapsed().as_secs_f64());
            let s = std::time::Instant::now();
            causal_attention_blocked(&q, &k, &v, 0.125)?;
            blocked.push(s.elapsed().as_secs_f64());
        }
        let median = |v: &mut Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let (f, b) = (median(&mut few), median(&mut blocked));
        println!(
            "decode attention, 1 row over {len} keys: split-key {:.1} us/layer, blocked sgemm \
             {:.1} us/layer ({:.2}x); x30 layers = {:.2} / {:.2} ms per token",
            f * 1e6,
            b * 1e6,
            b / f,
            f * 30e3,
            b * 30e3
        );
    }
    Ok(())
}
