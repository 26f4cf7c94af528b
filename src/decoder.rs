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
mod model;
mod tokenizer;
mod weights;

pub use cache::KvCache;
pub use chat::ChatTemplate;
pub use config::{Arch, DecoderConfig, RopeScaling};
pub use gguf::{permute_qk, unpermute_qk};
pub use model::{Decoder, Logits};
pub use tokenizer::{build_bpe, DecoderTokenizer};
pub use weights::{load_parts, load_tokenizer, load_trained, DecoderParts};

use anyhow::{Context, Result};
use candle_core::{DType, Device};
use candle_nn::VarBuilder;

use crate::hub::{self, ModelFiles};

impl Decoder {
    /// Load a decoder and its tokenizer from a Hugging Face folder or a GGUF file, weights in
    /// `dtype` on `device` (f32 on CPU; bf16/f16 on GPUs, see `device::compute_dtype`).
    pub fn load(
        files: &ModelFiles,
        device: &Device,
        dtype: DType,
    ) -> Result<(Decoder, DecoderTokenizer)> {
        match files {
            ModelFiles::Hf {
                config,
                weights,
                tokenizer,
                ..
            } => {
                let text = std::fs::read_to_string(config)
                    .with_context(|| format!("reading {}", config.display()))?;
                let cfg = DecoderConfig::from_hf_json(&text)
                    .with_context(|| format!("in {}", config.display()))?;
                cfg.validate()?;
                // SAFETY: the safetensors files are memory-mapped read-only; nothing else in
                // this process writes to them while the decoder lives.
                let vb = unsafe { VarBuilder::from_mmaped_safetensors(weights, dtype, device)? };
                let decoder = Decoder::new(&cfg, vb)
                    .with_context(|| format!("loading decoder weights of '{}'", files.name()))?;
                let tok = DecoderTokenizer::from_hf(
                    tokenizer,
                    |name| hub::sibling(files, name),
                    cfg.bos_token_id,
                    &cfg.eos_token_ids,
                )?;
                Ok((with_eos(decoder, &tok), tok))
            }
            ModelFiles::Gguf { path, .. } => {
                let mut g = gguf::GgufFile::open(path)?;
                let mut cfg =
                    gguf::config_from_gguf(&g).with_context(|| format!("in {}", path.display()))?;
                cfg.validate()?;
                let (tensors, factors) = gguf::tensors_from_gguf(&mut g, &cfg, device, dtype)
                    .with_context(|| format!("in {}", path.display()))?;
                cfg.rope_scaling = factors;
                let tok = DecoderTokenizer::from_gguf(g.metadata())
                    .with_context(|| format!("tokenizer of {}", path.display()))?;
                let vb = VarBuilder::from_tensors(tensors, dtype, device);
                let decoder = Decoder::new(&cfg, vb)
                    .with_context(|| format!("loading decoder weights of {}", path.display()))?;
                Ok((with_eos(decoder, &tok), tok))
            }
        }
    }
}

/// Record the tokenizer's full EOS set (config eos plus end of turn) in the decoder's config, so
/// a saved config names every stop id.
fn with_eos(mut decoder: Decoder, tok: &DecoderTokenizer) -> Decoder {
    decoder.set_eos_token_ids(tok.eos_ids().to_vec());
    decoder
}
