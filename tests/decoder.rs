//! Decoder invariants on tiny random models written in code (nothing downloads): parity with
//! candle-transformers' `llama` / `quantized_llama` (and the Qwen2 pair), HF and GGUF loading
//! agree, cached decoding equals a full forward, embedding input equals token input, a batch
//! equals one-by-one, gradients reach the input embeddings, and the GGUF-rebuilt tokenizer
//! equals `tokenizer.json`.

mod common;
use common::max_diff;

use std::path::{Path, PathBuf};

use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, IndexOp, Tensor, Var, D};
use candle_nn::{Optimizer, VarBuilder, VarMap};
use candle_transformers::models::{llama, quantized_llama, quantized_qwen2, qwen2};
use refrag::decoder::{self, Arch, Decoder, DecoderTokenizer, KvCache, Logits};
use refrag::hub::{self, ModelFiles};
use refrag::testing::llama as tiny;

const IDS: [u32; 12] = [1, 40, 250, 7, 99, 300, 12, 2, 150, 61, 3, 200];

fn ids(v: &[u32]) -> Tensor {
    Tensor::new(v, &Device::Cpu).unwrap().unsqueeze(0).unwrap()
}

fn load(path: &Path) -> (Decoder, DecoderTokenizer) {
    let files = hub::resolve(path.to_str().unwrap()).unwrap();
    Decoder::load(&files, &Device::Cpu, DType::F32).unwrap()
}

fn hf_model(dir: &Path, arch: Arch) -> (Decoder, DecoderTokenizer) {
    tiny::write_tiny_decoder(dir, 7, arch).unwrap();
    load(dir)
}

/// candle-transformers' `quantized_llama` over the GGUF at `path`: the reference kernels.
fn llama_reference(path: &Path) -> quantized_llama::ModelWeights {
    let mut f = std::fs::File::open(path).unwrap();
    let content = candle_core::quantized::gguf_file::Content::read(&mut f).unwrap();
    quantized_llama::ModelWeights::from_gguf(content, &mut f, &Device::Cpu).unwrap()
}

/// The tiny Llama (seed 7) as a GGUF named `name` in `dir`, every matrix stored as `dtype`.
fn tiny_quantized_gguf(dir: &Path, name: &str, dtype: GgmlDType) -> (PathBuf, ModelFiles) {
    let path = dir.join(name);
    tiny::write_tiny_decoder_gguf_as(&path, 7, Arch::Llama, dtype).unwrap();
    let files = hub::resolve(path.to_str().unwrap()).unwrap();
    (path, files)
}

fn gguf_model(dir: &Path, arch: Arch) -> (Decoder, DecoderTokenizer) {
    let path = dir.join("tiny.gguf");
    tiny::write_tiny_decoder_gguf(&path, 7, arch).unwrap();
    load(&path)
}

#[test]
fn hf_logits_match_candle_llama() {
    let dir = tempfile::tempdir().unwrap();
    let (ours, _) = hf_model(dir.path(), Arch::Llama);
    let text = std::fs::read_to_string(dir.path().join("config.json")).unwrap();
    let cfg: llama::LlamaConfig = serde_json::from_str(&text).unwrap();
    let cfg = cfg.into_config(false);
    let files = [dir.path().join("model.safetensors")];
    let vb =
        unsafe { VarBuilder::from_mmaped_safetensors(&files, DType::F32, &Device::Cpu) }.unwrap();
    let reference = llama::Llama::load(vb, &cfg).unwrap();
    let all = ours.forward_ids(&ids(&IDS), None, Logits::All).unwrap(); // (1, t, v)
    for end in [1, 5, IDS.len()] {
        let mut cache = llama::Cache::new(false, DType::F32, &cfg, &Device::Cpu).unwrap();
        let want = reference.forward(&ids(&IDS[..end]), 0, &mut cache).unwrap(); // (1, v)
        let got = all.i((.., end - 1, ..)).unwrap();
        let d = max_diff(&got, &want);
        assert!(d < 1e-4, "prefix {end}: max diff {d}");
    }
}

#[test]
fn gguf_logits_match_quantized_llama_prefill_and_cached_steps() {
    let dir = tempfile::tempdir().unwrap();
    let (ours, _) = gguf_model(dir.path(), Arch::Llama);
    let path = dir.path().join("tiny.gguf");
    let mut reference = llama_reference(&path);
    let mut cache = ours.new_cache(64);
    let (prompt, rest) = IDS.split_at(7);
    let want = reference.forward(&ids(prompt), 0).unwrap();
    let got = ours
        .forward_ids(&ids(prompt), Some(&mut cache), Logits::Last)
        .unwrap();
    assert!(
        max_diff(&got, &want) < 1e-4,
        "prefill: {}",
        max_diff(&got, &want)
    );
    for (i, &tok) in rest.iter().enumerate() {
        let want = reference.forward(&ids(&[tok]), prompt.len() + i).unwrap();
        let got = ours
            .forward_ids(&ids(&[tok]), Some(&mut cache), Logits::Last)
            .unwrap();
        let d = max_diff(&got, &want);
        assert!(d < 1e-4, "step {i}: max diff {d}");
    }
    assert_eq!(cache.len(), IDS.len());
}

#[test]
fn quantized_gguf_kept_quantized_equals_quantized_llama() {
    // Q8_0 matrices (the real SmolLM2 file is Q4_1, whose kernel needs an even number of
    // blocks per row; the tiny MLP has five): kept quantized, our decoder runs the same
    // kernels as the reference (activations quantized too), so logits agree to float noise.
    let dir = tempfile::tempdir().unwrap();
    let (path, files) = tiny_quantized_gguf(dir.path(), "tiny_q4.gguf", GgmlDType::Q8_0);
    let (ours, _) = Decoder::load_quantized(&files, &Device::Cpu).unwrap();
    let (dense, _) = Decoder::load(&files, &Device::Cpu, DType::F32).unwrap();
    let mut reference = llama_reference(&path);
    let mut cache = ours.new_cache(64);
    let (prompt, rest) = IDS.split_at(7);
    let want = reference.forward(&ids(prompt), 0).unwrap();
    let got = ours
        .forward_ids(&ids(prompt), Some(&mut cache), Logits::Last)
        .unwrap();
    let d = max_diff(&got, &want);
    assert!(d < 1e-4, "prefill: {d}");
    // The dequantized f32 path differs by the activation quantization only.
    let f32_diff = max_diff(
        &dense.forward_ids(&ids(prompt), None, Logits::Last).unwrap(),
        &want,
    );
    assert!(f32_diff > d, "dequantized {f32_diff} vs quantized {d}");
    for (i, &tok) in rest.iter().enumerate() {
        let want = reference.forward(&ids(&[tok]), prompt.len() + i).unwrap();
        let got = ours
            .forward_ids(&ids(&[tok]), Some(&mut cache), Logits::Last)
            .unwrap();
        let d = max_diff(&got, &want);
        assert!(d < 1e-4, "step {i}: max diff {d}");
    }
    // An HF folder cannot be kept quantized.
    let hf = dir.path().join("hf");
    tiny::write_tiny_decoder(&hf, 7, Arch::Llama).unwrap();
    let err = Decoder::load_quantized(&hub::resolve(hf.to_str().unwrap()).unwrap(), &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("--quantized needs a GGUF"), "{err}");
}

/// One-token steps of `a` and `b` after the same prompt, and their largest logit difference.
fn step_diffs(a: &Decoder, b: &Decoder, prompt: &[u32], rest: &[u32]) -> Vec<f32> {
    let (mut ca, mut cb) = (a.new_cache(64), b.new_cache(64));
    let mut out = Vec::new();
    if !prompt.is_empty() {
        let x = a
            .forward_ids(&ids(prompt), Some(&mut ca), Logits::Last)
            .unwrap();
        let y = b
            .forward_ids(&ids(prompt), Some(&mut cb), Logits::Last)
            .unwrap();
        out.push(max_diff(&x, &y));
    }
    for &tok in rest {
        let x = a
            .forward_ids(&ids(&[tok]), Some(&mut ca), Logits::Last)
            .unwrap();
        let y = b
            .forward_ids(&ids(&[tok]), Some(&mut cb), Logits::Last)
            .unwrap();
        out.push(max_diff(&x, &y));
    }
    out
}

/// The decoding fast path (dense f32 weights for prefill, the file's quantized blocks for
/// one-row products). With f32 activations its logits are the dense path's up to rounding, with
/// 16-bit ones (the default) within their quantization and far closer than 8-bit ones; with
/// 8-bit activations (`REFRAG_DECODE=q8`), token by token, they are the quantized
/// reference's (`quantized_llama`), far closer than the dense path's. Q4_1 (the real file's
/// format) with a merged LoRA adapter: the same, through the adapter's side path.
#[test]
fn fast_decode_matches_the_dense_path_and_the_quantized_reference() {
    use refrag::kernels::qgemv::Act;
    let dir = tempfile::tempdir().unwrap();
    let (path, files) = tiny_quantized_gguf(dir.path(), "tiny_q8.gguf", GgmlDType::Q8_0);
    let load = |act: Option<Act>| {
        let (mut d, _) = Decoder::load(&files, &Device::Cpu, DType::F32).unwrap();
        if let Some(a) = act {
            assert!(
                decoder::enable_fast_decode_as(&files, &mut d, a)
                    .unwrap()
                    .unwrap()
                    > 0
            );
        }
        d
    };
    let (dense, fast, q8) = (load(None), load(Some(Act::F32)), load(Some(Act::Q8)));
    let (prompt, rest) = IDS.split_at(7);
    for d in step_diffs(&dense, &fast, prompt, rest) {
        assert!(d < 1e-4, "f32 activations: {d}");
    }
    // 16-bit activations (the default): within rounding of the activations' 16-bit quants,
    // ten times closer to the dense path than 8-bit ones at every step.
    let q16 = load(Some(Act::Q16));
    let (d16, d8) = (
        step_diffs(&dense, &q16, prompt, rest),
        step_diffs(&dense, &q8, prompt, rest),
    );
    for (a, b) in d16.iter().zip(&d8) {
        assert!(
            *a < 1e-2 && *a < b / 10.0,
            "16-bit activations {a}, 8-bit {b}"
        );
    }
    let mut reference = llama_reference(&path);
    let (mut cd, mut cq) = (dense.new_cache(64), q8.new_cache(64));
    for (i, &tok) in IDS.iter().enumerate() {
        let want = reference.forward(&ids(&[tok]), i).unwrap();
        let d = dense
            .forward_ids(&ids(&[tok]), Some(&mut cd), Logits::Last)
            .unwrap();
        let q = q8
            .forward_ids(&ids(&[tok]), Some(&mut cq), Logits::Last)
            .unwrap();
        let (dq, dd) = (max_diff(&q, &want), max_diff(&d, &want));
        assert!(dq < 1e-3 && dq < dd / 10.0, "step {i}: q8 {dq}, dense {dd}");
    }
    // Q4_1 with a LoRA adapter whose B is random (a first decoder creates the variables).
    let (_, files) = tiny_quantized_gguf(dir.path(), "tiny_q4.gguf", GgmlDType::Q4_1);
    let lora = decoder::lora::LoraConfig::all(2, 3);
    let vars = VarMap::new();
    let load = |act: Option<Act>, adapter: bool| {
        let (mut d, _) = Decoder::load(&files, &Device::Cpu, DType::F32).unwrap();
        if let Some(a) = act {
            decoder::enable_fast_decode_as(&files, &mut d, a).unwrap();
        }
        if adapter {
            d.add_lora(&lora, &vars, false).unwrap();
        }
        d
    };
    load(None, true);
    for (name, v) in vars.data().lock().unwrap().iter() {
        if name.ends_with("lora_b") {
            // Deterministic "random" values, so the test is the same every run.
            let n = v.shape().elem_count();
            let vals: Vec<f32> = (0..n).map(|i| 0.5 * ((i as f32) * 1.618).sin()).collect();
            v.set(&Tensor::from_vec(vals, v.shape(), &Device::Cpu).unwrap())
                .unwrap();
        }
    }
    let dense = load(None, true);
    let scale: f32 = dense
        .forward_ids(&ids(prompt), None, Logits::Last)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap();
    // f32 activations: the dense path's logits up to float rounding (the adapter's side path
    // adds in another order than the merged weights).
    for d in step_diffs(&dense, &load(Some(Act::F32), true), prompt, rest) {
        assert!(
            d < 1e-5 * scale.max(1.0),
            "Q4_1 + LoRA, f32 activations: {d} (scale {scale})"
        );
    }
    for d in step_diffs(&dense, &load(Some(Act::Q16), true), prompt, rest) {
        assert!(
            d < 1e-3 * scale.max(1.0),
            "Q4_1 + LoRA, 16-bit activations: {d} (scale {scale})"
        );
    }
    for d in step_diffs(&dense, &load(Some(Act::Q8), true), prompt, rest) {
        assert!(
            d < 0.05 * scale,
            "Q4_1 + LoRA, 8-bit activations: {d} (scale {scale})"
        );
    }
    // Without its adapter the fast decoder is far off: the checks above can fail.
    let off = step_diffs(&dense, &load(Some(Act::F32), false), prompt, &[]);
    assert!(off[0] > 0.2 * scale, "the adapter changes the logits");
}

#[test]
fn hf_and_gguf_of_the_same_weights_agree() {
    for arch in [Arch::Llama, Arch::Qwen2] {
        let dir = tempfile::tempdir().unwrap();
        let (hf, _) = hf_model(dir.path(), arch);
        let (gg, _) = gguf_model(dir.path(), arch);
        let mut a = hf.config().clone();
        let b = gg.config().clone();
        a.max_position_embeddings = b.max_position_embeddings;
        assert_eq!(a, b, "{arch:?} configs");
        let x = hf.forward_ids(&ids(&IDS), None, Logits::All).unwrap();
        let y = gg.forward_ids(&ids(&IDS), None, Logits::All).unwrap();
        assert!(max_diff(&x, &y) < 1e-4, "{arch:?}: {}", max_diff(&x, &y));
    }
}

#[test]
fn qwen2_matches_candle_qwen2_and_quantized_qwen2() {
    let dir = tempfile::tempdir().unwrap();
    let (ours, _) = hf_model(dir.path(), Arch::Qwen2);
    let text = std::fs::read_to_string(dir.path().join("config.json")).unwrap();
    let cfg: qwen2::Config = serde_json::from_str(&text).unwrap();
    let files = [dir.path().join("model.safetensors")];
    let vb =
        unsafe { VarBuilder::from_mmaped_safetensors(&files, DType::F32, &Device::Cpu) }.unwrap();
    let mut reference = qwen2::ModelForCausalLM::new(&cfg, vb).unwrap();
    let want = reference
        .forward(&ids(&IDS), 0)
        .unwrap()
        .squeeze(1)
        .unwrap();
    let got = ours.forward_ids(&ids(&IDS), None, Logits::Last).unwrap();
    assert!(
        max_diff(&got, &want) < 1e-4,
        "hf: {}",
        max_diff(&got, &want)
    );

    let (ours, _) = gguf_model(dir.path(), Arch::Qwen2);
    let mut f = std::fs::File::open(dir.path().join("tiny.gguf")).unwrap();
    let content = candle_core::quantized::gguf_file::Content::read(&mut f).unwrap();
    let mut reference =
        quantized_qwen2::ModelWeights::from_gguf(content, &mut f, &Device::Cpu).unwrap();
    let want = reference.forward(&ids(&IDS), 0).unwrap();
    let got = ours.forward_ids(&ids(&IDS), None, Logits::Last).unwrap();
    assert!(
        max_diff(&got, &want) < 1e-4,
        "gguf: {}",
        max_diff(&got, &want)
    );
}

#[test]
fn cached_decoding_equals_full_forward() {
    let dir = tempfile::tempdir().unwrap();
    let (m, _) = hf_model(dir.path(), Arch::Llama);
    let full = m.forward_ids(&ids(&IDS), None, Logits::All).unwrap(); // (1, 12, v)
                                                                      // Prefill in uneven chunks, then one token at a time; a small capacity forces growth.
    let mut cache = KvCache::new(m.config().num_hidden_layers, 4);
    let mut start = 0;
    for end in [3, 7, 8, 9, 10, 11, 12] {
        let got = m
            .forward_ids(&ids(&IDS[start..end]), Some(&mut cache), Logits::All)
            .unwrap();
        let want = full.i((.., start..end, ..)).unwrap();
        let d = max_diff(&got, &want);
        assert!(d < 1e-4, "positions {start}..{end}: {d}");
        start = end;
    }
    // Truncating rolls back: re-decoding the last token gives the same logits.
    cache.truncate(11);
    let got = m
        .forward_ids(&ids(&IDS[11..]), Some(&mut cache), Logits::Last)
        .unwrap();
    assert!(max_diff(&got, &full.i((.., 11, ..)).unwrap()) < 1e-4);
    cache.reset();
    assert!(cache.is_empty());
}

/// A half KV cache (`Decoder::set_kv_storage(F16)`, the CPU default for decoding): prefill in
/// uneven chunks (a chunk after the first attends rounded past keys), then token by token (the
/// split-key kernel reads the f16 rows): every position within f16 rounding of the full
/// forward, with the same arg-max.
#[test]
fn a_half_kv_cache_decodes_within_rounding_of_the_full_forward() {
    let dir = tempfile::tempdir().unwrap();
    let (mut m, _) = hf_model(dir.path(), Arch::Llama);
    let full = m.forward_ids(&ids(&IDS), None, Logits::All).unwrap();
    m.set_kv_storage(Some(DType::F16));
    let mut cache = m.new_cache(4);
    assert_eq!(cache.storage(), Some(DType::F16));
    let mut start = 0;
    for end in [6, 7, 8, 9, 10, 11, 12] {
        let got = m
            .forward_ids(&ids(&IDS[start..end]), Some(&mut cache), Logits::All)
            .unwrap();
        let want = full.i((.., start..end, ..)).unwrap();
        let scale = want
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let d = max_diff(&got, &want) / scale;
        assert!(
            d > 0.0 || start == 0,
            "positions {start}..{end}: rounding left no trace"
        );
        assert!(
            d < 2e-3,
            "positions {start}..{end}: {d} of the largest logit {scale}"
        );
        let (a, b): (Vec<u32>, Vec<u32>) = (
            got.argmax(D::Minus1)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap(),
            want.argmax(D::Minus1)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap(),
        );
        assert_eq!(a, b, "positions {start}..{end}");
        start = end;
    }
    // The model's own dtype means no conversion at all.
    m.set_kv_storage(Some(DType::F32));
    assert_eq!(m.new_cache(4).storage(), None);
}

#[test]
fn blocked_long_prefill_equals_unblocked_attention() {
    // Inference attends long inputs in blocks of queries over their causal prefix; the
    // differentiable path (a `Var` input) attends all rows at once. Same logits, with and
    // without a cache holding earlier positions.
    let dir = tempfile::tempdir().unwrap();
    let (m, _) = hf_model(dir.path(), Arch::Llama);
    let long: Vec<u32> = (0..500u32).map(|i| (i * 37 + 11) % 300 + 3).collect();
    let e = m.embed(&ids(&long)).unwrap();
    let want = m
        .forward_embeds(&Var::from_tensor(&e).unwrap(), None, Logits::All)
        .unwrap();
    let got = m.forward_embeds(&e, None, Logits::All).unwrap();
    let d = max_diff(&got, &want);
    assert!(d < 1e-4, "blocked vs unblocked: {d}");
    let mut cache = KvCache::new(m.config().num_hidden_layers, 16);
    let head = m
        .forward_ids(&ids(&long[..100]), Some(&mut cache), Logits::All)
        .unwrap();
    let tail = m
        .forward_ids(&ids(&long[100..]), Some(&mut cache), Logits::All)
        .unwrap();
    let got = Tensor::cat(&[head, tail], 1).unwrap();
    let d = max_diff(&got, &want);
    assert!(d < 1e-4, "cached blocked vs unblocked: {d}");
}

#[test]
fn embedding_input_equals_token_input() {
    let dir = tempfile::tempdir().unwrap();
    let (m, _) = hf_model(dir.path(), Arch::Llama);
    let e = m.embed(&ids(&IDS)).unwrap();
    assert_eq!(e.dims(), &[1, IDS.len(), 64]);
    let a = m.forward_embeds(&e, None, Logits::All).unwrap();
    let b = m.forward_ids(&ids(&IDS), None, Logits::All).unwrap();
    assert_eq!(max_diff(&a, &b), 0.0);
    let last = m.forward_embeds(&e, None, Logits::Last).unwrap();
    assert_eq!(last.dims(), &[1, m.config().vocab_size]);
    assert!(max_diff(&last, &b.i((.., IDS.len() - 1, ..)).unwrap()) < 1e-5);
}

#[test]
fn batch_equals_one_by_one() {
    let dir = tempfile::tempdir().unwrap();
    let (m, _) = hf_model(dir.path(), Arch::Llama);
    let other: Vec<u32> = IDS.iter().rev().copied().collect();
    let batch = Tensor::stack(
        &[
            ids(&IDS).squeeze(0).unwrap(),
            ids(&other).squeeze(0).unwrap(),
        ],
        0,
    )
    .unwrap();
    let mut cache = m.new_cache(16);
    let got = m
        .forward_ids(
            &batch.narrow(1, 0, 10).unwrap(),
            Some(&mut cache),
            Logits::All,
        )
        .unwrap();
    let step = m
        .forward_ids(
            &batch.narrow(1, 10, 1).unwrap(),
            Some(&mut cache),
            Logits::Last,
        )
        .unwrap();
    for (i, seq) in [&IDS[..], &other[..]].iter().enumerate() {
        let one = m.forward_ids(&ids(&seq[..11]), None, Logits::All).unwrap();
        assert!(max_diff(&got.i(i).unwrap(), &one.i((0, ..10, ..)).unwrap()) < 1e-4);
        assert!(max_diff(&step.i(i).unwrap(), &one.i((0, 10, ..)).unwrap()) < 1e-4);
    }
}

/// Sum of the log-probabilities of `IDS[1..]` given `x` (teacher forcing).
fn log_likelihood(m: &Decoder, x: &Tensor) -> Tensor {
    let logits = m.forward_embeds(x, None, Logits::All).unwrap(); // (1, t, v)
    let logits = logits.to_dtype(x.dtype()).unwrap();
    let lp = candle_nn::ops::log_softmax(&logits.i((0, ..IDS.len() - 1, ..)).unwrap(), D::Minus1)
        .unwrap();
    let targets = Tensor::new(&IDS[1..], &Device::Cpu)
        .unwrap()
        .unsqueeze(1)
        .unwrap();
    lp.gather(&targets, 1).unwrap().sum_all().unwrap()
}

#[test]
fn gradients_reach_input_embeddings() {
    let dir = tempfile::tempdir().unwrap();
    tiny::write_tiny_llama(dir.path(), 7).unwrap();
    let files = hub::resolve(dir.path().to_str().unwrap()).unwrap();
    // f64, so that a central finite difference is a sharp reference.
    let (m, _) = Decoder::load(&files, &Device::Cpu, DType::F64).unwrap();
    let ll = |x: &Tensor| log_likelihood(&m, x);
    let e = m.embed(&ids(&IDS)).unwrap();
    let x = Var::from_tensor(&e).unwrap();
    let value = ll(x.as_tensor());
    // The differentiable path computes the same values as the fused one.
    let fast = ll(&e).to_scalar::<f64>().unwrap();
    assert!((value.to_scalar::<f64>().unwrap() - fast).abs() < 1e-9);
    let grads = value.backward().unwrap();
    let g = grads.get(&x).expect("gradient for the input embeddings");
    // Central difference along a fixed direction.
    let n = e.elem_count();
    let dirn: Vec<f64> = (0..n)
        .map(|i| ((i * 7919) % 13) as f64 / 13.0 - 0.5)
        .collect();
    let dirn = Tensor::from_vec(dirn, e.shape(), &Device::Cpu).unwrap();
    let eps = 1e-5;
    let at = |s: f64| {
        ll(&(&e + (&dirn * s).unwrap()).unwrap())
            .to_scalar::<f64>()
            .unwrap()
    };
    let numeric = (at(eps) - at(-eps)) / (2.0 * eps);
    let analytic = (g * &dirn)
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    assert!(analytic.abs() > 1e-3, "gradient is zero");
    assert!(
        (numeric - analytic).abs() < 1e-5 * analytic.abs().max(1.0),
        "numeric {numeric} vs analytic {analytic}"
    );
}

#[test]
fn a_varmap_decoder_from_loaded_weights_matches_and_trains() {
    let dir = tempfile::tempdir().unwrap();
    let (reference, _) = hf_model(dir.path(), Arch::Llama);
    let want = reference
        .forward_ids(&ids(&IDS), None, Logits::All)
        .unwrap();
    let gguf = dir.path().join("tiny.gguf");
    tiny::write_tiny_llama_gguf(&gguf, 7).unwrap();
    for path in [dir.path().to_path_buf(), gguf] {
        let files = hub::resolve(path.to_str().unwrap()).unwrap();
        let parts = decoder::load_parts(&files, &Device::Cpu, DType::F32).unwrap();
        let mut varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let m = Decoder::new(&parts.config, vb).unwrap();
        for (name, t) in &parts.weights {
            varmap.set_one(name, t).unwrap();
        }
        assert_eq!(varmap.all_vars().len(), parts.weights.len(), "{path:?}");
        let got = m.forward_ids(&ids(&IDS), None, Logits::All).unwrap();
        assert!(
            max_diff(&got, &want) < 1e-4,
            "{path:?}: {}",
            max_diff(&got, &want)
        );
        // One AdamW step on the likelihood of IDS lowers the loss.
        let mut opt = candle_nn::AdamW::new_lr(varmap.all_vars(), 1e-3).unwrap();
        let loss = |m: &Decoder| {
            log_likelihood(m, &m.embed(&ids(&IDS)).unwrap())
                .neg()
                .unwrap()
        };
        let before = loss(&m);
        opt.backward_step(&before).unwrap();
        let (before, after) = (
            before.to_scalar::<f32>().unwrap(),
            loss(&m).to_scalar::<f32>().unwrap(),
        );
        assert!(after < before, "{path:?}: loss {before} -> {after}");
    }
}

#[test]
fn a_fresh_varmap_decoder_trains() {
    let cfg = tiny::tiny_config(Arch::Llama);
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let m = Decoder::new(&cfg, vb).unwrap();
    let mut opt = candle_nn::AdamW::new_lr(varmap.all_vars(), 1e-2).unwrap();
    let loss = |m: &Decoder| {
        log_likelihood(m, &m.embed(&ids(&IDS)).unwrap())
            .neg()
            .unwrap()
    };
    let before = loss(&m);
    opt.backward_step(&before).unwrap();
    let after = loss(&m);
    assert!(after.to_scalar::<f32>().unwrap() < before.to_scalar::<f32>().unwrap());
}

#[test]
fn gguf_tokenizer_equals_tokenizer_json() {
    let dir = tempfile::tempdir().unwrap();
    let (_, hf) = hf_model(dir.path(), Arch::Llama);
    let (_, gg) = gguf_model(dir.path(), Arch::Llama);
    for text in [
        "the river flows through the town",
        "The answer is 42, not 1999!",
        "<|im_start|>user\nwhat is the name?<|im_end|>\n",
        "  spaces   and\ttabs\n\nnewlines ",
        "unicode: café, naïve, 東京, 🙂",
    ] {
        let a = hf.encode(text, false).unwrap();
        let b = gg.encode(text, false).unwrap();
        assert_eq!(a, b, "{text:?}");
        assert_eq!(
            gg.decode(&b).unwrap(),
            text.replace("<|im_start|>", "").replace("<|im_end|>", "")
        );
    }
    assert_eq!(
        gg.encode("<|im_start|><|im_end|>", false).unwrap(),
        vec![1, 2]
    );
    assert_eq!(
        gg.encode("1999", false).unwrap().len(),
        4,
        "digits split one by one"
    );
    let merged = gg.encode("the river", false).unwrap();
    assert!(merged.len() < "the river".len(), "merges apply: {merged:?}");
    for t in [&hf, &gg] {
        assert_eq!(t.bos_id(), Some(1));
        assert!(t.is_eos(2) && !t.is_eos(1));
    }
}

#[test]
fn chat_parts_reproduce_the_smollm2_template() {
    let dir = tempfile::tempdir().unwrap();
    let (_, hf) = hf_model(dir.path(), Arch::Llama);
    let (_, gg) = gguf_model(dir.path(), Arch::Llama);
    let want_before = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\n";
    let want_after = "<|im_end|>\n<|im_start|>assistant\n";
    for t in [&hf, &gg] {
        let (before, after) = t.chat_parts(None);
        assert_eq!((before.as_str(), after.as_str()), (want_before, want_after));
        let (before, _) = t.chat_parts(Some("Answer briefly."));
        assert_eq!(
            before,
            "<|im_start|>system\nAnswer briefly.<|im_end|>\n<|im_start|>user\n"
        );
        let ids = t.encode(&before, false).unwrap();
        assert_eq!(ids[0], 1);
    }
}

#[test]
fn half_precision_runs_close_to_f32() {
    // The GPU dtypes' code path (half weights, f32 softmax and logits), exercised on the CPU in
    // f16 (the CPU has no bf16 matmul).
    let dir = tempfile::tempdir().unwrap();
    tiny::write_tiny_llama(dir.path(), 7).unwrap();
    let files = hub::resolve(dir.path().to_str().unwrap()).unwrap();
    let (m32, _) = Decoder::load(&files, &Device::Cpu, DType::F32).unwrap();
    let (m16, _) = Decoder::load(&files, &Device::Cpu, DType::F16).unwrap();
    assert_eq!(m16.dtype(), DType::F16);
    let a = m32.forward_ids(&ids(&IDS), None, Logits::All).unwrap();
    let mut cache = m16.new_cache(16);
    let b = m16
        .forward_ids(&ids(&IDS[..8]), Some(&mut cache), Logits::All)
        .unwrap();
    let c = m16
        .forward_ids(&ids(&IDS[8..]), Some(&mut cache), Logits::All)
        .unwrap();
    assert_eq!(b.dtype(), DType::F32);
    let b = Tensor::cat(&[b, c], 1).unwrap();
    let scale = a
        .abs()
        .unwrap()
        .max_keepdim(D::Minus1)
        .unwrap()
        .mean_all()
        .unwrap();
    let d = max_diff(&a, &b) / scale.to_scalar::<f32>().unwrap();
    assert!(d < 0.05, "relative max diff {d}");
}

#[test]
fn lora_fresh_is_identity_merged_equals_side_path_and_training_path_equals_inference() {
    use refrag::decoder::lora::LoraConfig;
    let dir = tempfile::tempdir().unwrap();
    let (base, _) = hf_model(dir.path(), Arch::Llama);
    let want = base.forward_ids(&ids(&IDS), None, Logits::All).unwrap();
    let cfg = LoraConfig::all(2, 5);
    // A fresh adapter (B = 0) changes nothing.
    let vars = VarMap::new();
    let mut side = base.clone();
    side.add_lora(&cfg, &vars, true).unwrap();
    let got = side.forward_ids(&ids(&IDS), None, Logits::All).unwrap();
    assert!(max_diff(&want, &got) < 1e-4, "{}", max_diff(&want, &got));
    // Give B values: the merged decoder (inference) equals the side path (training), and the
    // adapter moved the logits.
    for (name, v) in vars.data().lock().unwrap().iter() {
        if name.ends_with("lora_b") {
            v.set(&Tensor::randn(0f32, 0.05, v.shape(), &Device::Cpu).unwrap())
                .unwrap();
        }
    }
    let mut side = base.clone();
    side.add_lora(&cfg, &vars, true).unwrap();
    let mut merged = base.clone();
    merged.add_lora(&cfg, &vars, false).unwrap();
    let a = side.forward_ids(&ids(&IDS), None, Logits::All).unwrap();
    let b = merged.forward_ids(&ids(&IDS), None, Logits::All).unwrap();
    assert!(max_diff(&a, &b) < 1e-4, "{}", max_diff(&a, &b));
    assert!(max_diff(&a, &want) > 1e-3);
    // Gradients reach the adapter.
    let loss = a.sum_all().unwrap();
    let g = loss.backward().unwrap();
    let any_b = vars
        .all_vars()
        .into_iter()
        .filter(|v| g.get(v.as_tensor()).is_some())
        .count();
    assert_eq!(any_b, vars.all_vars().len());
    // Same seed, same adapter initialisation.
    let again = VarMap::new();
    base.clone().add_lora(&cfg, &again, true).unwrap();
    let name = "model.layers.0.self_attn.q_proj.lora_a";
    let x = vars.data().lock().unwrap()[name].as_tensor().clone();
    let y = again.data().lock().unwrap()[name].as_tensor().clone();
    assert_eq!(max_diff(&x, &y), 0.0);
}

#[test]
fn training_path_kernels_equal_the_inference_path() {
    // A decoder whose input tracks gradients takes the fused differentiable kernels (RMS norm,
    // rotary, attention, SwiGLU); its logits must equal the inference path's.
    let dir = tempfile::tempdir().unwrap();
    let (dec, _) = hf_model(dir.path(), Arch::Llama);
    let x = dec.embed(&ids(&IDS)).unwrap();
    let infer = dec.forward_embeds(&x, None, Logits::All).unwrap();
    let v = Var::from_tensor(&x).unwrap();
    let train = dec
        .forward_embeds(v.as_tensor(), None, Logits::All)
        .unwrap();
    assert!(
        max_diff(&infer, &train) < 1e-4,
        "{}",
        max_diff(&infer, &train)
    );
    let tail = dec
        .forward_embeds(v.as_tensor(), None, Logits::Tail(3))
        .unwrap();
    // The LM head over 3 rows instead of all: the BLAS may block the product differently
    // (it does on AVX-512 OpenBLAS builds), so equal up to float rounding, not bit for bit.
    let d = max_diff(&tail, &train.narrow(1, IDS.len() - 3, 3).unwrap());
    assert!(d < 1e-5, "{d}");
}
