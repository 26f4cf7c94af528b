//! The decoder LLM: a Llama-family causal LM (SmolLM2, Llama 2/3, Mistral, Qwen2) that takes
//! input embeddings, with a KV cache, plus its tokenizer and chat template.
//!
//! - `model`: the transformer (`Decoder`), embeddings in, logits out;
//! - `cache`: the preallocated per-layer KV cache;
//! - `config`: hyper-parameters from `config.json` or GGUF metadata;
//! - `gguf`: GGUF tensors dequantized, renamed and un-permuted to the HF layout;
//! - `tokenizer`, `chat`: the tokenizer (also rebuilt from GGUF metadata) and the chat template
//!   reduced to the text before and after the user message;
//! - `weights`: every weight as a tensor (for training) and loading a trained decoder back.
//!
//! `Decoder::load` takes any resolved model (`hub::ModelFiles`): a Hugging Face folder of
//! safetensors or a GGUF file (dequantized to `dtype`).

mod cache;
mod chat;
mod config;
mod gguf;
mod gguf_check;
pub mod lora;
mod model;
pub mod sample;
mod tokenizer;
mod weights;

pub use cache::KvCache;
pub use chat::ChatTemplate;
pub use config::{Arch, DecoderConfig, RopeScaling};
pub use gguf::{permute_qk, unpermute_qk};
pub use model::{Decoder, Logits, GREEDY_KEEP};
pub use tokenizer::{build_bpe, tokenizer_from_file, DecoderTokenizer};
pub use weights::{load_tokenizer, load_trained};

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use crate::hub::{self, ModelFiles};

/// A decoder before it is built: its config, its weights under Hugging Face names, its
/// tokenizer. For a trainable decoder, build `Decoder::new` on a `VarMap` and copy `weights` into
/// it (`VarMap::set_one`).
pub struct DecoderParts {
    pub config: DecoderConfig,
    pub weights: HashMap<String, Tensor>,
    pub tokenizer: DecoderTokenizer,
}

impl Decoder {
    /// Load a decoder and its tokenizer from a Hugging Face folder or a GGUF file, weights in
    /// `dtype` on `device` (f32 on CPU; bf16/f16 on GPUs, see `device::compute_dtype`). HF
    /// safetensors are memory-mapped; GGUF tensors are dequantized.
    pub fn load(
        files: &ModelFiles,
        device: &Device,
        dtype: DType,
    ) -> Result<(Decoder, DecoderTokenizer)> {
        let (config, tokenizer, vb) = match files {
            ModelFiles::Hf { weights, .. } => {
                let (config, tokenizer) = hf_config_and_tokenizer(files)?;
                // SAFETY: the safetensors files are memory-mapped read-only; nothing else in
                // this process writes to them while the decoder lives.
                let vb = unsafe { VarBuilder::from_mmaped_safetensors(weights, dtype, device)? };
                (config, tokenizer, vb)
            }
            ModelFiles::Gguf { .. } => {
                let parts = load_parts(files, device, dtype)?;
                let vb = VarBuilder::from_tensors(parts.weights, dtype, device);
                (parts.config, parts.tokenizer, vb)
            }
        };
        let decoder = Decoder::new(&config, vb)
            .with_context(|| format!("loading the decoder weights of '{}'", files.name()))?;
        Ok((decoder, tokenizer))
    }
}

impl Decoder {
    /// Load a GGUF decoder keeping its matrices quantized as stored (see
    /// [`Decoder::quantize_from`]); embeddings and norms are dequantized to f32.
    pub fn load_quantized(
        files: &ModelFiles,
        device: &Device,
    ) -> Result<(Decoder, DecoderTokenizer)> {
        let ModelFiles::Gguf { path, .. } = files else {
            anyhow::bail!(
                "--quantized needs a GGUF decoder; '{}' is a Hugging Face folder",
                files.name()
            );
        };
        let (mut decoder, tokenizer) = Decoder::load(files, device, DType::F32)?;
        let mut g = gguf::GgufFile::open(path)?;
        let head = if g.has("output.weight") {
            "output.weight"
        } else {
            "token_embd.weight"
        };
        decoder
            .quantize_from(|name| g.qtensor(name, device), head)
            .with_context(|| format!("keeping '{}' quantized", files.name()))?;
        Ok((decoder, tokenizer))
    }
}

/// How one-token decoding steps multiply, from `REFRAG_DECODE`: `fast` (the default: the
/// GGUF's quantized blocks times activations quantized to 16 bits per block, 16-bit integer
/// dots; every greedy continuation of the real SmolLM2 the f32 path's), `f32act` (the blocks
/// times f32 activations: the f32 path's numbers up to rounding, ~10-15% slower), `q8`
/// (activations quantized to 8 bits: llama.cpp's arithmetic, near-ties flip), `f32` (the
/// dequantized f32 matrices).
pub fn decode_mode() -> Result<Option<crate::kernels::qgemv::Act>> {
    use crate::kernels::qgemv::Act;
    match std::env::var("REFRAG_DECODE").as_deref() {
        Err(_) | Ok("") | Ok("fast") | Ok("q16") => Ok(Some(Act::Q16)),
        Ok("f32act") => Ok(Some(Act::F32)),
        Ok("q8") => Ok(Some(Act::Q8)),
        Ok("f32") => Ok(None),
        Ok(other) => anyhow::bail!("REFRAG_DECODE={other}: expected fast (q16), f32act, q8 or f32"),
    }
}

/// Give a GGUF decoder, loaded dequantized on the CPU, its decoding fast path: each matrix also
/// kept in the file's quantized blocks for one-row products ([`Decoder::enable_fast_decode`],
/// [`decode_mode`]). Off (`Ok(None)`) for other decoders and devices and with
/// `REFRAG_DECODE=f32`. Returns the bytes of quantized weights kept.
pub fn enable_fast_decode(files: &ModelFiles, decoder: &mut Decoder) -> Result<Option<usize>> {
    let bytes = match decode_mode()? {
        Some(act) => enable_fast_decode_as(files, decoder, act)?,
        None => None,
    };
    if decoder.device().is_cpu() && decoder.dtype() == DType::F32 {
        decoder.set_kv_storage(kv_mode()?);
    }
    Ok(bytes)
}

/// The KV cache's storage on the CPU, from `REFRAG_KV`: `f16` (the default: half the bytes a
/// decoding step reads after a long context, as llama.cpp's default cache) or `f32`.
pub fn kv_mode() -> Result<Option<DType>> {
    match std::env::var("REFRAG_KV").as_deref() {
        Err(_) | Ok("") | Ok("f16") => Ok(Some(DType::F16)),
        Ok("f32") => Ok(None),
        Ok(other) => anyhow::bail!("REFRAG_KV={other}: expected f16 or f32"),
    }
}

/// [`enable_fast_decode`] with the activations' kind given.
pub fn enable_fast_decode_as(
    files: &ModelFiles,
    decoder: &mut Decoder,
    act: crate::kernels::qgemv::Act,
) -> Result<Option<usize>> {
    let ModelFiles::Gguf { path, .. } = files else {
        return Ok(None);
    };
    if !decoder.device().is_cpu() || decoder.dtype() != DType::F32 {
        return Ok(None);
    }
    let mut g = gguf::GgufFile::open(path)?;
    let head = if g.has("output.weight") {
        "output.weight"
    } else {
        "token_embd.weight"
    };
    let bytes = decoder
        .enable_fast_decode(|name| g.qtensor(name, &Device::Cpu), head, act)
        .with_context(|| format!("the decoding fast path of '{}'", files.name()))?;
    Ok(Some(bytes))
}

/// Config, weights (all read into memory, in `dtype` on `device`) and tokenizer of a Hugging
/// Face folder or a GGUF file.
pub fn load_parts(files: &ModelFiles, device: &Device, dtype: DType) -> Result<DecoderParts> {
    match files {
        ModelFiles::Hf { weights: paths, .. } => {
            let (config, tokenizer) = hf_config_and_tokenizer(files)?;
            let mut weights = HashMap::new();
            for p in paths {
                let ts = candle_core::safetensors::load(p, device)
                    .with_context(|| format!("reading {}", p.display()))?;
                for (name, t) in ts {
                    weights.insert(name, t.to_dtype(dtype)?);
                }
            }
            Ok(DecoderParts {
                config,
                weights,
                tokenizer,
            })
        }
        ModelFiles::Gguf { path, .. } => gguf_parts(path, device, dtype),
    }
}

/// Config and tokenizer of a Hugging Face folder or a GGUF file without reading any weight (a
/// GGUF's metadata only): what the checks before a model load need, e.g. the decoder's window.
pub fn load_config_and_tokenizer(files: &ModelFiles) -> Result<(DecoderConfig, DecoderTokenizer)> {
    match files {
        ModelFiles::Hf { .. } => hf_config_and_tokenizer(files),
        ModelFiles::Gguf { path, .. } => {
            let in_file = || format!("in {}", path.display());
            let g = gguf::GgufFile::open(path)?;
            let mut config = gguf::config_from_gguf(&g).with_context(in_file)?;
            let tokenizer = DecoderTokenizer::from_gguf(g.metadata())
                .with_context(|| format!("tokenizer of {}", path.display()))?;
            config.eos_token_ids = tokenizer.eos_ids().to_vec();
            Ok((config, tokenizer))
        }
    }
}

/// `config.json` and the tokenizer files of a Hugging Face folder. The config's EOS ids become
/// the tokenizer's full set (config, `tokenizer_config.json`, `generation_config.json`, end of
/// turn).
fn hf_config_and_tokenizer(files: &ModelFiles) -> Result<(DecoderConfig, DecoderTokenizer)> {
    let ModelFiles::Hf {
        config, tokenizer, ..
    } = files
    else {
        anyhow::bail!("'{}' is not a Hugging Face folder", files.name());
    };
    let text =
        std::fs::read_to_string(config).with_context(|| format!("reading {}", config.display()))?;
    let mut cfg =
        DecoderConfig::from_hf_json(&text).with_context(|| format!("in {}", config.display()))?;
    cfg.validate()?;
    let tok = DecoderTokenizer::from_hf(
        tokenizer,
        |name| hub::sibling(files, name),
        cfg.bos_token_id,
        &cfg.eos_token_ids,
    )?;
    cfg.eos_token_ids = tok.eos_ids().to_vec();
    Ok((cfg, tok))
}

fn gguf_parts(path: &Path, device: &Device, dtype: DType) -> Result<DecoderParts> {
    let in_file = || format!("in {}", path.display());
    let mut g = gguf::GgufFile::open(path)?;
    let mut config = gguf::config_from_gguf(&g).with_context(in_file)?;
    config.validate().with_context(in_file)?;
    let (weights, factors) =
        gguf::tensors_from_gguf(&mut g, &config, device, dtype).with_context(in_file)?;
    config.rope_scaling = factors;
    let tokenizer = DecoderTokenizer::from_gguf(g.metadata())
        .with_context(|| format!("tokenizer of {}", path.display()))?;
    config.eos_token_ids = tokenizer.eos_ids().to_vec();
    Ok(DecoderParts {
        config,
        weights,
        tokenizer,
    })
}
