//! The decoder's hyper-parameters, read from a Hugging Face `config.json` or from GGUF metadata,
//! and the rotary frequencies they imply. One `DecoderConfig` describes every supported family
//! (Llama 2/3, SmolLM2, Mistral without sliding window, Qwen2); it serialises to JSON so a
//! checkpoint folder can say which decoder it was trained on.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

/// Which variant of the Llama block the weights follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    /// Llama 2/3, SmolLM2, Mistral: no projection biases (unless `attention_bias`).
    Llama,
    /// Qwen2 / Qwen2.5: biases on the q/k/v projections.
    Qwen2,
}

/// How the rotary frequencies are rescaled for long contexts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "rope_type", rename_all = "lowercase")]
pub enum RopeScaling {
    /// Llama 3.1's frequency-dependent scaling (HF `rope_scaling.rope_type = "llama3"`).
    Llama3 {
        factor: f32,
        low_freq_factor: f32,
        high_freq_factor: f32,
        original_max_position_embeddings: usize,
    },
    /// Positions divided by `factor` (HF `rope_type = "linear"`).
    Linear { factor: f32 },
    /// One divisor per frequency, as llama.cpp stores them in the `rope_freqs.weight` tensor.
    Factors { factors: Vec<f32> },
}

/// Hyper-parameters of a Llama-family decoder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DecoderConfig {
    pub arch: Arch,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    /// Width of one attention head (usually `hidden_size / num_attention_heads`).
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f32,
    #[serde(default)]
    pub rope_scaling: Option<RopeScaling>,
    pub max_position_embeddings: usize,
    /// The output projection reuses the token embedding matrix.
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    /// Every id that ends generation (the config's eos plus the chat template's end of turn).
    pub eos_token_ids: Vec<u32>,
    /// Biases on the q/k/v projections (always on for Qwen2).
    #[serde(default)]
    pub attention_bias: bool,
    /// A bias on the output projection too (HF Llama with `attention_bias = true`).
    #[serde(default)]
    pub o_proj_bias: bool,
}

/// `eos_token_id` in a config file: one id or a list.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub(crate) enum OneOrMany {
    One(u32),
    Many(Vec<u32>),
}

impl OneOrMany {
    pub(crate) fn into_vec(self) -> Vec<u32> {
        match self {
            OneOrMany::One(x) => vec![x],
            OneOrMany::Many(v) => v,
        }
    }
}

/// The fields of a Hugging Face `config.json` that we read.
#[derive(Debug, Deserialize)]
struct HfConfig {
    model_type: Option<String>,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: f64,
    rope_theta: Option<f32>,
    rope_scaling: Option<serde_json::Value>,
    max_position_embeddings: usize,
    tie_word_embeddings: Option<bool>,
    bos_token_id: Option<u32>,
    eos_token_id: Option<OneOrMany>,
    attention_bias: Option<bool>,
    sliding_window: Option<usize>,
    use_sliding_window: Option<bool>,
}

impl DecoderConfig {
    /// Parse a Hugging Face `config.json` (`model_type` llama, mistral or qwen2).
    pub fn from_hf_json(text: &str) -> Result<Self> {
        let hf: HfConfig = serde_json::from_str(text).context("parsing config.json")?;
        let model_type = hf.model_type.as_deref().unwrap_or("llama");
        let arch = match model_type {
            "llama" => Arch::Llama,
            "mistral" => {
                if hf.sliding_window.is_some_and(|w| w < hf.max_position_embeddings) {
                    bail!("config.json: mistral with sliding_window is not supported");
                }
                Arch::Llama
            }
            "qwen2" => {
                if hf.use_sliding_window == Some(true) {
                    bail!("config.json: qwen2 with use_sliding_window is not supported");
                }
                Arch::Qwen2
            }
            other => bail!(
                "config.json: model_type '{other}' is not a supported decoder (llama, mistral, qwen2)"
            ),
        };
        let rope_scaling = match &hf.rope_scaling {
            None | Some(serde_json::Value::Null) => None,
            Some(v) => parse_rope_scaling(v)?,
        };
        let attention_bias = arch == Arch::Qwen2 || hf.attention_bias.unwrap_or(false);
        Ok(DecoderConfig {
            arch,
            vocab_size: hf.vocab_size,
            hidden_size: hf.hidden_size,
            intermediate_size: hf.intermediate_size,
            num_hidden_layers: hf.num_hidden_layers,
            num_attention_heads: hf.num_attention_heads,
            num_key_value_heads: hf.num_key_value_heads.unwrap_or(hf.num_attention_heads),
            head_dim: match hf.head_dim {
                Some(d) => d,
                None => hf
                    .hidden_size
                    .checked_div(hf.num_attention_heads)
                    .context("config.json: num_attention_heads is 0")?,
            },
            rms_norm_eps: hf.rms_norm_eps,
            rope_theta: hf.rope_theta.unwrap_or(10_000.0),
            rope_scaling,
            max_position_embeddings: hf.max_position_embeddings,
            tie_word_embeddings: hf.tie_word_embeddings.unwrap_or(false),
            bos_token_id: hf.bos_token_id,
            eos_token_ids: hf.eos_token_id.map(OneOrMany::into_vec).unwrap_or_default(),
            attention_bias,
            o_proj_bias: arch == Arch::Llama && hf.attention_bias.unwrap_or(false),
        })
    }

    /// Check the shapes fit together (heads divide the width, KV heads divide the heads).
    pub fn validate(&self) -> Result<()> {
        if self.num_key_value_heads == 0
            || !self
                .num_attention_heads
                .is_multiple_of(self.num_key_value_heads)
        {
            bail!(
                "decoder config: {} attention heads are not a multiple of {} key/value heads",
                self.num_attention_heads,
                self.num_key_value_heads
            );
        }
        if !self.head_dim.is_multiple_of(2) {
            bail!("decoder config: head_dim {} is odd", self.head_dim);
        }
        Ok(())
    }

    /// Rotary inverse frequencies, one per pair of head dimensions, in f32 as HF computes them.
    pub fn inv_freq(&self) -> Vec<f32> {
        let hd = self.head_dim;
        let base: Vec<f32> = (0..hd)
            .step_by(2)
            .map(|i| 1f32 / self.rope_theta.powf(i as f32 / hd as f32))
            .collect();
        match &self.rope_scaling {
            None => base,
            Some(RopeScaling::Linear { factor }) => base.iter().map(|f| f / factor).collect(),
            Some(RopeScaling::Factors { factors }) => {
                base.iter().zip(factors).map(|(f, d)| f / d).collect()
            }
            Some(RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            }) => {
                let old = *original_max_position_embeddings as f32;
                let low_wavelen = old / low_freq_factor;
                let high_wavelen = old / high_freq_factor;
                base.iter()
                    .map(|&freq| {
                        let wavelen = 2. * std::f32::consts::PI / freq;
                        if wavelen < high_wavelen {
                            freq
                        } else if wavelen > low_wavelen {
                            freq / factor
                        } else {
                            let smooth = (old / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1. - smooth) * freq / factor + smooth * freq
                        }
                    })
                    .collect()
            }
        }
    }
}

fn parse_rope_scaling(v: &serde_json::Value) -> Result<Option<RopeScaling>> {
    let kind = v
        .get("rope_type")
        .or_else(|| v.get("type"))
        .and_then(|t| t.as_str())
        .unwrap_or("default");
    let num = |k: &str| -> Result<f64> {
        v.get(k)
            .and_then(|x| x.as_f64())
            .with_context(|| format!("config.json: rope_scaling.{k} missing"))
    };
    Ok(match kind {
        "default" => None,
        "linear" => Some(RopeScaling::Linear {
            factor: num("factor")? as f32,
        }),
        "llama3" => Some(RopeScaling::Llama3 {
            factor: num("factor")? as f32,
            low_freq_factor: num("low_freq_factor")? as f32,
            high_freq_factor: num("high_freq_factor")? as f32,
            original_max_position_embeddings: num("original_max_position_embeddings")? as usize,
        }),
        other => bail!("config.json: rope_scaling type '{other}' is not supported"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMOL: &str = r#"{"architectures":["LlamaForCausalLM"],"bos_token_id":1,"eos_token_id":2,
        "hidden_size":576,"intermediate_size":1536,"max_position_embeddings":8192,"model_type":"llama",
        "num_attention_heads":9,"num_hidden_layers":30,"num_key_value_heads":3,"rms_norm_eps":1e-05,
        "rope_scaling":null,"rope_theta":100000,"tie_word_embeddings":true,"vocab_size":49152}"#;

    #[test]
    fn reads_smollm2_config() {
        let c = DecoderConfig::from_hf_json(SMOL).unwrap();
        assert_eq!(c.arch, Arch::Llama);
        assert_eq!((c.head_dim, c.num_key_value_heads), (64, 3));
        assert_eq!(c.eos_token_ids, vec![2]);
        assert!(c.tie_word_embeddings && !c.attention_bias);
        c.validate().unwrap();
        let back: DecoderConfig =
            serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn qwen2_has_qkv_bias_and_llama3_scaling_parses() {
        let q = SMOL.replace("\"llama\"", "\"qwen2\"");
        assert!(DecoderConfig::from_hf_json(&q).unwrap().attention_bias);
        let l3 = SMOL.replace(
            "\"rope_scaling\":null",
            r#""rope_scaling":{"factor":8.0,"low_freq_factor":1.0,"high_freq_factor":4.0,
               "original_max_position_embeddings":8192,"rope_type":"llama3"}"#,
        );
        let c = DecoderConfig::from_hf_json(&l3).unwrap();
        let f = c.inv_freq();
        assert_eq!(f[0], 1.0);
        assert!(f[31] < DecoderConfig::from_hf_json(SMOL).unwrap().inv_freq()[31]);
    }

    #[test]
    fn rejects_other_model_types() {
        let g = SMOL.replace("\"llama\"", "\"gemma3\"");
        let e = format!("{:#}", DecoderConfig::from_hf_json(&g).unwrap_err());
        assert!(e.contains("gemma3"), "{e}");
    }
}
