//! The decode-shaped products of SmolLM2-135M (one activation row): the quantized kernels of
//! `refrag::kernels::qgemv` against the f32 BLAS product on the dequantized matrix, median of
//! 50 after warm-up. `cargo run --release --example qgemv_bench`. Then the same 1536 x 576 Q4_1
//! product over 180 different copies of the matrix in turn (~100 MB, a token's weight bytes), so
//! that each pass reads its weights from beyond the core's own caches, as decoding does: the
//! gap between the two is what memory, not arithmetic, costs.
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Module, Tensor};
use refrag::decoder::GREEDY_KEEP;
use refrag::kernels::qgemv::{simd_level, top_rows, Act, QMatrix};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn time(mut f: impl FnMut()) -> f64 {
    for _ in 0..5 {
        f();
    }
    median(
        (0..50)
            .map(|_| {
                let t = std::time::Instant::now();
                f();
                t.elapsed().as_secs_f64()
            })
            .collect(),
    )
}

fn main() -> anyhow::Result<()> {
    println!(
        "kernels: {:?} (REFRAG_QGEMV=avx2 or portable caps them)",
        simd_level()
    );
    let dev = Device::Cpu;
    for (name, rows, cols, t) in [
        ("ffn_up", 1536, 576, GgmlDType::Q4_1),
        ("ffn_down", 576, 1536, GgmlDType::Q4_1),
        ("lm_head", 49152, 576, GgmlDType::Q8_0),
    ] {
        let w = Tensor::randn(0f32, 1.0, (rows, cols), &dev)?;
        let q = QTensor::quantize(&w, t)?;
        let mat = QMatrix::from_qtensor(&q)?.expect("a fast format");
        let lin = candle_nn::Linear::new(q.dequantize(&dev)?, None);
        let bytes = mat.bytes();
        let x = Tensor::randn(0f32, 1.0, (1, cols), &dev)?;
        let xv: Vec<f32> = x.flatten_all()?.to_vec1()?;
        let mut y = vec![0f32; rows];
        let tq = time(|| mat.matmul_t(&xv, 1, &mut y, Act::F32));
        let t8 = time(|| mat.matmul_t(&xv, 1, &mut y, Act::Q8));
        let t16 = time(|| mat.matmul_t(&xv, 1, &mut y, Act::Q16));
        let tf = time(|| {
            refrag::kernels::blas::linear(&lin, &x).unwrap();
        });
        let qmm = candle_core::quantized::QMatMul::from_qtensor(q)?;
        let tc = time(|| {
            qmm.forward(&x).unwrap();
        });
        println!(
            "{name} ({rows}x{cols} {t:?}): quantized x f32 {:.1} us ({:.1} GB/s), quantized x q16 {:.1} us, quantized x q8 {:.1} us, f32 BLAS {:.1} us, candle QMatMul {:.1} us: {:.1}x over f32",
            tq * 1e6,
            bytes as f64 / tq / 1e9,
            t16 * 1e6,
            t8 * 1e6,
            tf * 1e6,
            tc * 1e6,
            tf / tq
        );
    }
    let (rows, cols, copies) = (1536, 576, 180);
    let mats: Vec<QMatrix> = (0..copies)
        .map(|_| {
            let w = Tensor::randn(0f32, 1.0, (rows, cols), &dev)?;
            let q = QTensor::quantize(&w, GgmlDType::Q4_1)?;
            Ok(QMatrix::from_qtensor(&q)?.expect("a fast format"))
        })
        .collect::<anyhow::Result<_>>()?;
    let xv: Vec<f32> = Tensor::randn(0f32, 1.0, (1, cols), &dev)?
        .flatten_all()?
        .to_vec1()?;
    let mut y = vec![0f32; rows];
    let hot = time(|| mats[0].matmul_t(&xv, 1, &mut y, Act::Q16));
    let mut next = 0;
    let cold = time(|| {
        mats[next % copies].matmul_t(&xv, 1, &mut y, Act::Q16);
        next += 1;
    });
    let bytes: usize = mats.iter().map(QMatrix::bytes).sum();
    println!(
        "ffn_up x q16, one matrix again and again {:.1} us; {copies} matrices ({:.0} MB) in turn {:.1} us ({:.1} GB/s): {:.1}x",
        hot * 1e6,
        bytes as f64 / 1e6,
        cold * 1e6,
        mats[0].bytes() as f64 / cold / 1e9,
        cold / hot
    );
    // Greedy decoding's LM head against the whole one, each timed after the 180 copies have
    // pushed it out of the caches, as a decoding step's layers do.
    let w = Tensor::randn(0f32, 1.0, (49152, cols), &dev)?;
    let head = QMatrix::from_qtensor(&QTensor::quantize(&w, GgmlDType::Q8_0)?)?.expect("Q8_0");
    let copy = head.to_q4_0();
    let mut logits = vec![0f32; head.rows];
    let mut cold_time = |f: &mut dyn FnMut()| {
        median(
            (0..15)
                .map(|_| {
                    for m in &mats {
                        m.matmul_t(&xv, 1, &mut y, Act::Q16);
                    }
                    let t = std::time::Instant::now();
                    f();
                    t.elapsed().as_secs_f64()
                })
                .collect(),
        )
    };
    let whole = cold_time(&mut || head.matmul_t(&xv, 1, &mut logits, Act::Q16));
    let top = cold_time(&mut || {
        top_rows(&head, &copy, &xv, GREEDY_KEEP, Act::Q16);
    });
    println!(
        "LM head (49152x576 Q8_0) from memory: whole {:.0} us, greedy ({GREEDY_KEEP} rows of its Q4_0 copy's best re-scored) {:.0} us: {:.2}x",
        whole * 1e6,
        top * 1e6,
        whole / top
    );
    Ok(())
}
