//! A tiny random Llama (or Qwen2) written to disk, for tests: nothing downloads.
//!
//! `write_tiny_llama(dir, seed)` writes a Hugging Face folder (`config.json`, `model.safetensors`,
//! `tokenizer.json`, `tokenizer_config.json` with SmolLM2's ChatML template); `write_tiny_llama_gguf
//! (path, seed)` writes the same weights as a llama.cpp GGUF (f32 tensors, llama.cpp names, q/k
//! permuted for interleaved rotary, the tokenizer in the metadata). The tokenizer is a small
//! byte-level BPE learnt in code from a fixed English text: 3 special tokens (`<|endoftext|>` 0,
//! `<|im_start|>` 1 = BOS, `<|im_end|>` 2 = EOS), the 256 byte symbols, then the merges, like
//! SmolLM2's. The model: 2 layers, width 64, 4 heads / 2 KV heads, FFN 160, tied embeddings.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use anyhow::{Context, Result};
use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::json;

use crate::decoder::{permute_qk, Arch, DecoderConfig};

/// SmolLM2-135M-Instruct's chat template (as its `tokenizer_config.json` has it, `\n` escaped).
pub const SMOLLM2_CHAT_TEMPLATE: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// The special tokens, at ids 0, 1, 2.
pub const SPECIAL_TOKENS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

/// Number of BPE merges learnt for the tiny tokenizer (vocabulary = 3 + 256 + merges).
const N_MERGES: usize = 61;

/// Text the tiny tokenizer's merges are learnt from.
const MERGE_TEXT: &str = "the river flows through the town and the town is on the river. \
    the answer to the question is in the passage. what is the name of the river that flows \
    through the town? the name of the town is written in the passage about the river. \
    there are three passages and the question is about one of them.";

/// The tiny model's hyper-parameters (vocabulary size from the tiny tokenizer).
pub fn tiny_config(arch: Arch) -> DecoderConfig {
    DecoderConfig {
        arch,
        vocab_size: SPECIAL_TOKENS.len() + 256 + N_MERGES,
        hidden_size: 64,
        intermediate_size: 160,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 16,
        rms_norm_eps: 1e-5,
        rope_theta: 10_000.0,
        rope_scaling: None,
        max_position_embeddings: 512,
        tie_word_embeddings: true,
        bos_token_id: Some(1),
        eos_token_ids: vec![2],
        attention_bias: arch == Arch::Qwen2,
        o_proj_bias: false,
    }
}

/// GPT-2's byte -> printable character table (`bytes_to_unicode`), indexed by byte.
pub fn byte_chars() -> Vec<char> {
    let mut printable: Vec<u32> = (b'!' as u32..=b'~' as u32)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut out = vec!['\0'; 256];
    let mut n = 0;
    for b in 0..256u32 {
        if !printable.contains(&b) {
            printable.push(b);
            out[b as usize] = char::from_u32(256 + n).expect("valid char");
            n += 1;
        } else {
            out[b as usize] = char::from_u32(b).expect("valid char");
        }
    }
    out
}

/// The tiny tokenizer: tokens in id order, merges (`"a b"`), and llama.cpp token types
/// (3 = control for the special tokens, 1 = normal).
pub fn tiny_tokenizer_parts() -> (Vec<String>, Vec<String>, Vec<i32>) {
    let chars = byte_chars();
    let mut tokens: Vec<String> = SPECIAL_TOKENS.iter().map(|s| s.to_string()).collect();
    tokens.extend(chars.iter().map(|c| c.to_string()));
    // Words as GPT-2 pre-tokenizes plain lowercase text: a leading space joins the word.
    let mut words: BTreeMap<Vec<String>, usize> = BTreeMap::new();
    for (i, w) in MERGE_TEXT.split_whitespace().enumerate() {
        let text = if i == 0 {
            w.to_string()
        } else {
            format!(" {w}")
        };
        let syms = text
            .bytes()
            .map(|b| chars[b as usize].to_string())
            .collect();
        *words.entry(syms).or_default() += 1;
    }
    let mut merges = Vec::new();
    while merges.len() < N_MERGES {
        let mut pairs: BTreeMap<(String, String), usize> = BTreeMap::new();
        for (syms, n) in &words {
            for p in syms.windows(2) {
                *pairs.entry((p[0].clone(), p[1].clone())).or_default() += n;
            }
        }
        // Most frequent pair; ties go to the first in sorted order (deterministic).
        let best = pairs.iter().max_by(|a, b| a.1.cmp(b.1).then(b.0.cmp(a.0)));
        let Some(((a, b), _)) = best.map(|(k, v)| (k.clone(), v)) else {
            break;
        };
        let joined = format!("{a}{b}");
        words = words
            .into_iter()
            .map(|(syms, n)| (merge_pair(&syms, &a, &b, &joined), n))
            .fold(BTreeMap::new(), |mut m, (k, n)| {
                *m.entry(k).or_default() += n;
                m
            });
        merges.push(format!("{a} {b}"));
        tokens.push(joined);
    }
    let types = (0..tokens.len())
        .map(|i| if i < SPECIAL_TOKENS.len() { 3 } else { 1 })
        .collect();
    (tokens, merges, types)
}

fn merge_pair(syms: &[String], a: &str, b: &str, joined: &str) -> Vec<String> {
    let mut out = Vec::with_capacity(syms.len());
    let mut i = 0;
    while i < syms.len() {
        if i + 1 < syms.len() && syms[i] == a && syms[i + 1] == b {
            out.push(joined.to_string());
            i += 2;
        } else {
            out.push(syms[i].clone());
            i += 1;
        }
    }
    out
}

/// The tiny tokenizer as a Hugging Face `tokenizer.json` value, laid out like SmolLM2's
/// (Digits + ByteLevel pre-tokenizer, BPE model, ByteLevel decoder, special added tokens).
pub fn tiny_tokenizer_json() -> serde_json::Value {
    let (tokens, merges, _) = tiny_tokenizer_parts();
    let vocab: serde_json::Map<String, serde_json::Value> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), json!(i)))
        .collect();
    let added: Vec<serde_json::Value> = SPECIAL_TOKENS
        .iter()
        .enumerate()
        .map(|(i, t)| {
            json!({"id": i, "content": t, "single_word": false, "lstrip": false,
                             "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}]},
        "post_processor": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                  "vocab": vocab, "merges": merges}
    })
}

/// Random weights of the tiny model under Hugging Face names, reproducible from `seed`.
pub fn tiny_weights(cfg: &DecoderConfig, seed: u64) -> Result<HashMap<String, Tensor>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut normal = |shape: &[usize], std: f32, mean: f32| -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|_| {
                // Box-Muller from two uniforms in (0, 1].
                let (u1, u2): (f32, f32) = (1.0 - rng.random::<f32>(), rng.random::<f32>());
                mean + std * (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
            })
            .collect();
        Ok(Tensor::from_vec(v, shape, &Device::Cpu)?)
    };
    let (d, f, hd) = (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim);
    let (nq, nkv) = (cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd);
    let w_std = |fan_in: usize| 1.5 / (fan_in as f32).sqrt();
    let mut w = HashMap::new();
    w.insert(
        "model.embed_tokens.weight".into(),
        normal(&[cfg.vocab_size, d], 1.0, 0.0)?,
    );
    w.insert("model.norm.weight".into(), normal(&[d], 0.1, 1.0)?);
    for i in 0..cfg.num_hidden_layers {
        let p = |s: &str| format!("model.layers.{i}.{s}");
        for (name, shape) in [
            ("self_attn.q_proj.weight", [nq, d]),
            ("self_attn.k_proj.weight", [nkv, d]),
            ("self_attn.v_proj.weight", [nkv, d]),
            ("self_attn.o_proj.weight", [d, nq]),
            ("mlp.gate_proj.weight", [f, d]),
            ("mlp.up_proj.weight", [f, d]),
            ("mlp.down_proj.weight", [d, f]),
        ] {
            w.insert(p(name), normal(&shape, w_std(shape[1]), 0.0)?);
        }
        if cfg.attention_bias {
            for (name, n) in [("q_proj", nq), ("k_proj", nkv), ("v_proj", nkv)] {
                w.insert(
                    p(&format!("self_attn.{name}.bias")),
                    normal(&[n], 0.3, 0.0)?,
                );
            }
        }
        for name in ["input_layernorm.weight", "post_attention_layernorm.weight"] {
            w.insert(p(name), normal(&[d], 0.1, 1.0)?);
        }
    }
    Ok(w)
}

/// Write the tiny Llama as a Hugging Face folder: `config.json`, `model.safetensors`,
/// `tokenizer.json`, `tokenizer_config.json` (SmolLM2's chat template, BOS `<|im_start|>`,
/// EOS `<|im_end|>`). The same `seed` always gives the same weights.
pub fn write_tiny_llama(dir: &Path, seed: u64) -> Result<()> {
    write_tiny_decoder(dir, seed, Arch::Llama)
}

/// `write_tiny_llama` for either architecture (Qwen2 adds q/k/v biases, `model_type: qwen2`).
pub fn write_tiny_decoder(dir: &Path, seed: u64, arch: Arch) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let cfg = tiny_config(arch);
    let model_type = match arch {
        Arch::Llama => "llama",
        Arch::Qwen2 => "qwen2",
    };
    let config = json!({
        "architectures": [if arch == Arch::Llama { "LlamaForCausalLM" } else { "Qwen2ForCausalLM" }],
        "model_type": model_type, "hidden_act": "silu",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads, "num_key_value_heads": cfg.num_key_value_heads,
        "rms_norm_eps": cfg.rms_norm_eps, "rope_theta": cfg.rope_theta, "rope_scaling": null,
        "max_position_embeddings": cfg.max_position_embeddings, "tie_word_embeddings": true,
        "bos_token_id": 1, "eos_token_id": 2,
        "sliding_window": cfg.max_position_embeddings, "max_window_layers": cfg.num_hidden_layers,
        "use_sliding_window": false
    });
    let write = |name: &str, v: &serde_json::Value| -> Result<()> {
        let p = dir.join(name);
        std::fs::write(&p, serde_json::to_string_pretty(v)?)
            .with_context(|| format!("writing {}", p.display()))
    };
    write("config.json", &config)?;
    write("tokenizer.json", &tiny_tokenizer_json())?;
    write(
        "tokenizer_config.json",
        &json!({"chat_template": SMOLLM2_CHAT_TEMPLATE, "bos_token": "<|im_start|>",
                "eos_token": "<|im_end|>", "add_bos_token": false}),
    )?;
    let w = tiny_weights(&cfg, seed)?;
    candle_core::safetensors::save(&w, dir.join("model.safetensors"))?;
    Ok(())
}

/// Write the tiny Llama of `write_tiny_llama(_, seed)` as a llama.cpp GGUF file.
pub fn write_tiny_llama_gguf(path: &Path, seed: u64) -> Result<()> {
    write_tiny_decoder_gguf(path, seed, Arch::Llama)
}

/// `write_tiny_llama_gguf` for either architecture. Tensors are f32 (no quantization noise);
/// Llama's q/k projections are permuted as llama.cpp's converter does (Qwen2's are not).
pub fn write_tiny_decoder_gguf(path: &Path, seed: u64, arch: Arch) -> Result<()> {
    write_tiny_decoder_gguf_as(path, seed, arch, GgmlDType::F32)
}

/// [`write_tiny_decoder_gguf`] with every matrix stored as `dtype` (e.g. `Q4_1`, as the real
/// SmolLM2 file); vectors (norms, biases) stay f32, as llama.cpp stores them.
pub fn write_tiny_decoder_gguf_as(
    path: &Path,
    seed: u64,
    arch: Arch,
    dtype: GgmlDType,
) -> Result<()> {
    let cfg = tiny_config(arch);
    let w = tiny_weights(&cfg, seed)?;
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    let mut put = |name: String, t: &Tensor| -> Result<()> {
        let dt = if t.rank() == 2 { dtype } else { GgmlDType::F32 };
        tensors.push((name, QTensor::quantize(t, dt)?));
        Ok(())
    };
    put("token_embd.weight".into(), &w["model.embed_tokens.weight"])?;
    put("output_norm.weight".into(), &w["model.norm.weight"])?;
    for i in 0..cfg.num_hidden_layers {
        for (gg, hf) in [
            ("attn_norm.weight", "input_layernorm.weight"),
            ("ffn_norm.weight", "post_attention_layernorm.weight"),
            ("attn_q.weight", "self_attn.q_proj.weight"),
            ("attn_k.weight", "self_attn.k_proj.weight"),
            ("attn_v.weight", "self_attn.v_proj.weight"),
            ("attn_output.weight", "self_attn.o_proj.weight"),
            ("ffn_gate.weight", "mlp.gate_proj.weight"),
            ("ffn_up.weight", "mlp.up_proj.weight"),
            ("ffn_down.weight", "mlp.down_proj.weight"),
            ("attn_q.bias", "self_attn.q_proj.bias"),
            ("attn_k.bias", "self_attn.k_proj.bias"),
            ("attn_v.bias", "self_attn.v_proj.bias"),
        ] {
            let Some(t) = w.get(&format!("model.layers.{i}.{hf}")) else {
                continue;
            };
            let t = match (arch, &gg[..6]) {
                (Arch::Llama, "attn_q") => permute_qk(t, cfg.num_attention_heads)?,
                (Arch::Llama, "attn_k") => permute_qk(t, cfg.num_key_value_heads)?,
                _ => t.clone(),
            };
            put(format!("blk.{i}.{gg}"), &t)?;
        }
    }
    let md = gguf_metadata(&cfg, arch);
    let md_refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut f =
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    candle_core::quantized::gguf_file::write(&mut f, &md_refs, &t_refs)?;
    Ok(())
}

fn gguf_metadata(cfg: &DecoderConfig, arch: Arch) -> Vec<(String, Value)> {
    let a = match arch {
        Arch::Llama => "llama",
        Arch::Qwen2 => "qwen2",
    };
    let (tokens, merges, types) = tiny_tokenizer_parts();
    let strings = |v: Vec<String>| Value::Array(v.into_iter().map(Value::String).collect());
    let u = |x: usize| Value::U32(x as u32);
    vec![
        ("general.architecture".into(), Value::String(a.into())),
        (format!("{a}.block_count"), u(cfg.num_hidden_layers)),
        (
            format!("{a}.context_length"),
            u(cfg.max_position_embeddings),
        ),
        (format!("{a}.embedding_length"), u(cfg.hidden_size)),
        (format!("{a}.feed_forward_length"), u(cfg.intermediate_size)),
        (
            format!("{a}.attention.head_count"),
            u(cfg.num_attention_heads),
        ),
        (
            format!("{a}.attention.head_count_kv"),
            u(cfg.num_key_value_heads),
        ),
        (format!("{a}.rope.freq_base"), Value::F32(cfg.rope_theta)),
        (format!("{a}.rope.dimension_count"), u(cfg.head_dim)),
        (
            format!("{a}.attention.layer_norm_rms_epsilon"),
            Value::F32(cfg.rms_norm_eps as f32),
        ),
        (format!("{a}.vocab_size"), u(cfg.vocab_size)),
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), Value::String("smollm".into())),
        ("tokenizer.ggml.tokens".into(), strings(tokens)),
        ("tokenizer.ggml.merges".into(), strings(merges)),
        (
            "tokenizer.ggml.token_type".into(),
            Value::Array(types.into_iter().map(Value::I32).collect()),
        ),
        ("tokenizer.ggml.bos_token_id".into(), Value::U32(1)),
        ("tokenizer.ggml.eos_token_id".into(), Value::U32(2)),
        ("tokenizer.ggml.add_bos_token".into(), Value::Bool(false)),
        (
            "tokenizer.chat_template".into(),
            Value::String(SMOLLM2_CHAT_TEMPLATE.replace("\\n", "\n")),
        ),
    ]
}
