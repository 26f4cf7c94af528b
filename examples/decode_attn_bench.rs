//! A decoding step's attention (one query row per head, SmolLM2-135M's 9 query and 3 KV heads
//! of 64) over an f16 KV cache of 512, 2,048 and 4,096 keys: median of 200 after warm-up, per
//! layer and for 30 layers. `cargo run --release --example decode_attn_bench`
use candle_core::{DType, Device, Tensor};

fn main() -> anyhow::Result<()> {
    let dev = Device::Cpu;
    for t in [512usize, 2048, 4096] {
        let q = Tensor::randn(0f32, 1., (1, 9, 1, 64), &dev)?;
        let k = Tensor::randn(0f32, 1., (1, 3, t, 64), &dev)?.to_dtype(DType::F16)?;
        let v = Tensor::randn(0f32, 1., (1, 3, t, 64), &dev)?.to_dtype(DType::F16)?;
        for _ in 0..20 {
            refrag::kernels::blas::causal_attention(&q, &k, &v, 0.125)?;
        }
        let mut times: Vec<f64> = (0..200)
            .map(|_| {
                let s = std::time::Instant::now();
                refrag::kernels::blas::causal_attention(&q, &k, &v, 0.125).unwrap();
                s.elapsed().as_secs_f64()
            })
            .collect();
        times.sort_by(f64::total_cmp);
        let dt = times[times.len() / 2];
        println!(
            "decode attention over {t} f16 keys: {:.1} us a layer, {:.2} ms for 30 layers",
            dt * 1e6,
            dt * 30e3
        );
    }
    Ok(())
}
