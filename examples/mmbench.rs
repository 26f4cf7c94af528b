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
    Ok(())
}
