//! Times the retrieval embedder's 8-bit linear layer ([`refrag::kernels::igemm`]: the rows
//! quantized per token, the VNNI product, the dequantization into `c`) against single-threaded
//! `sgemm` (as each of `embed_all`'s side-by-side batches runs it) on MiniLM's shapes, alternating
//! the two, and prints median GOP/s (2 m n k over the time), the relative error of the 8-bit
//! result and the time the weight's quantization (once, at load) takes.
//!
//! ```text
//! cargo run --release --example igemm_bench -- [M] [REPS]
//! ```
use std::time::Instant;

use anyhow::{ensure, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use refrag::kernels::blas;
use refrag::kernels::igemm::{self, QRows, QWeight};

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Row-major `c += x w^T`, `x` `(m, k)`, `w` `(n, k)`, through the Fortran `sgemm_`.
fn sgemm(x: &[f32], w: &[f32], c: &mut [f32], m: usize, n: usize, k: usize) {
    let i = |v: usize| v as i32;
    let (t, nt, one) = (
        b'T' as std::os::raw::c_char,
        b'N' as std::os::raw::c_char,
        1f32,
    );
    assert!(x.len() >= m * k && w.len() >= n * k && c.len() >= m * n);
    // SAFETY: the assert above keeps each matrix inside its slice; column-major `c^T = w x^T`.
    unsafe {
        blas_sys::sgemm_(
            &t,
            &nt,
            &i(n),
            &i(m),
            &i(k),
            &one,
            w.as_ptr(),
            &i(k),
            x.as_ptr(),
            &i(k),
            &one,
            c.as_mut_ptr(),
            &i(n),
        );
    }
}

fn main() -> Result<()> {
    // OpenBLAS's SkylakeX kernels on CPUs newer than the library (else sgemm runs ~4x slower).
    blas::core::ensure();
    ensure!(
        igemm::available(),
        "this CPU lacks AVX-512 VNNI: only the portable reference would run"
    );
    let args: Vec<String> = std::env::args().collect();
    let m: usize = args.get(1).map_or(Ok(4096), |s| s.parse())?;
    let reps: usize = args.get(2).map_or(Ok(9), |s| s.parse())?;
    // One BLAS thread: each of embed_all's batches runs its products on one core.
    let _one = blas::threads::one_thread();
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    println!("m = {m}, {reps} alternating runs each, medians, one thread");
    for (k, n) in [(384usize, 1152usize), (384, 384), (384, 1536), (1536, 384)] {
        // Activations about as spread as a LayerNorm's output, a few large channels included.
        let x: Vec<f32> = (0..m * k)
            .map(|i| rng.random_range(-1.0f32..1.0) * if i % k == 7 { 8.0 } else { 1.0 })
            .collect();
        let w: Vec<f32> = (0..n * k).map(|_| rng.random_range(-0.1f32..0.1)).collect();
        let s = Instant::now();
        let qw = QWeight::new(&w, n, k);
        let t_load = s.elapsed().as_secs_f64();
        let mut qx = QRows::new();
        let (mut cf, mut ci) = (vec![0f32; m * n], vec![0f32; m * n]);
        let (mut t_f32, mut t_i8, mut t_quant) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..reps {
            cf.fill(0.0);
            let s = Instant::now();
            sgemm(&x, &w, &mut cf, m, n, k);
            t_f32.push(s.elapsed().as_secs_f64());
            ci.fill(0.0);
            let s = Instant::now();
            qx.quantize(&x, m, k, k);
            let q = s.elapsed().as_secs_f64();
            igemm::gemm_acc(&qx, &qw, &mut ci, n);
            t_i8.push(s.elapsed().as_secs_f64());
            t_quant.push(q);
        }
        let ops = 2.0 * (m * n * k) as f64;
        let (f, i, q) = (median(&mut t_f32), median(&mut t_i8), median(&mut t_quant));
        let err = cf
            .iter()
            .zip(&ci)
            .map(|(a, b)| (a - b).powi(2))
            .sum::<f32>();
        let norm = cf.iter().map(|a| a * a).sum::<f32>();
        println!(
            "k {k:4} n {n:4}: sgemm {:5.0} GFLOP/s ({:6.2} ms) | int8 {:5.0} GOP/s ({:6.2} ms, \
             quantizing {:4.2} ms) | {:.2}x | rel. error {:.4} | weight quantized once in {:.1} ms",
            ops / f / 1e9,
            f * 1e3,
            ops / i / 1e9,
            i * 1e3,
            q * 1e3,
            f / i,
            (err / norm).sqrt(),
            t_load * 1e3
        );
    }
    Ok(())
}
