//! The decoder's weights as plain tensors under Hugging Face names, for training (a trainable
//! copy starts from them), and loading a trained decoder back: `decoder.safetensors` (every
//! weight, HF names, dequantized when the base was a GGUF, so the file stands alone) plus
//! `decoder_config.json`, with the tokenizer and chat template still read from the base model.

use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use candle_nn::VarBuilder;

use super::config::DecoderConfig;
use super::gguf;
use super::model::Decoder;
use super::tokenizer::DecoderTokenizer;
use crate::hub::{self, ModelFiles};

/// The tokenizer of a base model (HF folder or GGUF metadata), without touching its weights.
pub fn load_tokenizer(files: &ModelFiles, cfg: &DecoderConfig) -> Result<DecoderTokenizer> {
    match files {
        ModelFiles::Hf { tokenizer, .. } => DecoderTokenizer::from_hf(
            tokenizer,
            |name| hub::sibling(files, name),
            cfg.bos_token_id,
            &cfg.eos_token_ids,
        ),
        ModelFiles::Gguf { path, .. } => {
            let g = gguf::GgufFile::open(path)?;
            DecoderTokenizer::from_gguf(g.metadata())
                .with_context(|| format!("tokenizer of {}", path.display()))
        }
    }
}

/// Load a trained decoder: hyper-parameters from `config_path` (`decoder_config.json`), weights
/// from `weights` (`decoder.safetensors`, HF names), tokenizer from the base model `files`. Every
/// weight the model needs must be in the file with its shape, and the file may hold nothing else.
pub fn load_trained(
    files: &ModelFiles,
    config_path: &Path,
    weights: &Path,
    device: &Device,
    dtype: DType,
) -> Result<(Decoder, DecoderTokenizer)> {
    let cfg: DecoderConfig = crate::io::jsonio::read_json(config_path)?;
    cfg.validate()
        .with_context(|| format!("in {}", config_path.display()))?;
    let tensors = candle_core::safetensors::load(weights, device)
        .with_context(|| format!("reading {}", weights.display()))?;
    let names: Vec<String> = tensors.keys().cloned().collect();
    let vb = VarBuilder::from_tensors(tensors, dtype, device);
    let decoder = Decoder::new(&cfg, vb)
        .with_context(|| format!("loading trained decoder weights {}", weights.display()))?;
    // `from_tensors` ignores unused tensors: check that each one is a weight of this model.
    for name in &names {
        if !needed(&cfg, name) {
            bail!(
                "{}: unexpected tensor '{name}' (trained for another decoder?)",
                weights.display()
            );
        }
    }
    let tok = load_tokenizer(files, &cfg)?;
    Ok((decoder, tok))
}

/// Whether `name` is a weight `Decoder::new` reads for `cfg`.
fn needed(cfg: &DecoderConfig, name: &str) -> bool {
    match name {
        "model.embed_tokens.weight" | "model.norm.weight" => true,
        "lm_head.weight" => !cfg.tie_word_embeddings,
        _ => {
            let Some(rest) = name.strip_prefix("model.layers.") else {
                return false;
            };
            let Some((i, suffix)) = rest.split_once('.') else {
                return false;
            };
            let Ok(i) = i.parse::<usize>() else {
                return false;
            };
            let bias_ok = |p: &str| match p {
                "q_proj" | "k_proj" | "v_proj" => cfg.attention_bias,
                "o_proj" => cfg.o_proj_bias,
                _ => false,
            };
            i < cfg.num_hidden_layers
                && match suffix.strip_suffix(".bias") {
                    Some(p) => p.strip_prefix("self_attn.").is_some_and(bias_ok),
                    None => LAYER_WEIGHTS.contains(&suffix),
                }
        }
    }
}

const LAYER_WEIGHTS: &[&str] = &[
    "input_layernorm.weight",
    "post_attention_layernorm.weight",
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
];
