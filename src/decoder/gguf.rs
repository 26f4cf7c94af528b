//! Reading a llama.cpp GGUF file into the decoder: hyper-parameters from the metadata, tensors
//! dequantized and renamed to Hugging Face names, and the q/k projections of Llama models
//! un-permuted from llama.cpp's interleaved rotary layout back to HF's half-split one, so a single
//! forward pass (HF rotary) serves both formats. Qwen2 GGUFs are not permuted by llama.cpp.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Seek};
use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{DType, Device, Tensor};

use super::config::{Arch, DecoderConfig, RopeScaling};

/// An opened GGUF file: metadata plus a reader for its tensors.
pub struct GgufFile {
    pub content: Content,
    reader: BufReader<File>,
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let len = file
            .metadata()
            .with_context(|| format!("reading {}", path.display()))?
            .len();
        let mut reader = BufReader::new(file);
        let what = || format!("reading GGUF {}", path.display());
        // Every length the header claims is capped by the file's size before candle allocates it.
        super::gguf_check::check_header(&mut reader, len).with_context(what)?;
        reader.rewind().with_context(what)?;
        let content = Content::read(&mut reader).with_context(what)?;
        super::gguf_check::check_tensors(&content, len).with_context(what)?;
        Ok(GgufFile { content, reader })
    }

    pub fn metadata(&self) -> &HashMap<String, Value> {
        &self.content.metadata
    }

    /// One tensor, dequantized to f32 on `device`.
    fn tensor(&mut self, name: &str, device: &Device) -> Result<Tensor> {
        let q = self
            .content
            .tensor(&mut self.reader, name, device)
            .with_context(|| format!("GGUF tensor {name}"))?;
        Ok(q.dequantize(device)?)
    }

    /// One tensor as stored (quantized), on `device`.
    pub fn qtensor(
        &mut self,
        name: &str,
        device: &Device,
    ) -> Result<candle_core::quantized::QTensor> {
        self.content
            .tensor(&mut self.reader, name, device)
            .with_context(|| format!("GGUF tensor {name}"))
    }

    pub fn has(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }
}

/// A metadata value, with the key named in the error.
pub(crate) fn md<'a>(m: &'a HashMap<String, Value>, key: &str) -> Result<&'a Value> {
    m.get(key)
        .with_context(|| format!("GGUF metadata lacks {key}"))
}

fn md_usize(m: &HashMap<String, Value>, key: &str) -> Result<usize> {
    let v = md(m, key)?;
    v.to_u32()
        .map(|x| x as usize)
        .or_else(|_| v.to_u64().map(|x| x as usize))
        .with_context(|| format!("GGUF metadata {key} is not an integer"))
}

fn md_f32(m: &HashMap<String, Value>, key: &str) -> Result<f32> {
    md(m, key)?
        .to_f32()
        .with_context(|| format!("GGUF metadata {key} is not a float"))
}

/// Hyper-parameters from GGUF metadata (`general.architecture` llama or qwen2).
pub fn config_from_gguf(g: &GgufFile) -> Result<DecoderConfig> {
    let m = g.metadata();
    let arch_name = md(m, "general.architecture")?.to_string()?.clone();
    let arch = match arch_name.as_str() {
        "llama" => Arch::Llama,
        "qwen2" => Arch::Qwen2,
        other => bail!("GGUF architecture '{other}' is not a supported decoder (llama, qwen2)"),
    };
    let a = |k: &str| format!("{arch_name}.{k}");
    let hidden = md_usize(m, &a("embedding_length"))?;
    let heads = md_usize(m, &a("attention.head_count"))?;
    if heads == 0 {
        bail!("GGUF metadata {} is 0", a("attention.head_count"));
    }
    let layers = md_usize(m, &a("block_count"))?;
    if layers > g.content.tensor_infos.len() {
        bail!(
            "GGUF metadata {} is {layers}, but the file has {} tensors",
            a("block_count"),
            g.content.tensor_infos.len()
        );
    }
    let vocab = match md_usize(m, &a("vocab_size")) {
        Ok(v) => v,
        Err(_) => md(m, "tokenizer.ggml.tokens")?.to_vec()?.len(),
    };
    let head_dim = md_usize(m, &a("attention.key_length"))
        .or_else(|_| md_usize(m, &a("rope.dimension_count")))
        .unwrap_or(hidden / heads);
    let bos = md(m, "tokenizer.ggml.bos_token_id")
        .and_then(|v| Ok(v.to_u32()?))
        .ok();
    let eos = md(m, "tokenizer.ggml.eos_token_id")
        .and_then(|v| Ok(v.to_u32()?))
        .ok();
    Ok(DecoderConfig {
        arch,
        vocab_size: vocab,
        hidden_size: hidden,
        intermediate_size: md_usize(m, &a("feed_forward_length"))?,
        num_hidden_layers: layers,
        num_attention_heads: heads,
        num_key_value_heads: md_usize(m, &a("attention.head_count_kv")).unwrap_or(heads),
        head_dim,
        rms_norm_eps: f32_to_f64(md_f32(m, &a("attention.layer_norm_rms_epsilon"))?),
        rope_theta: md_f32(m, &a("rope.freq_base")).unwrap_or(10_000.0),
        rope_scaling: None, // `tensors_from_gguf` reads `rope_freqs.weight`
        max_position_embeddings: md_usize(m, &a("context_length")).unwrap_or(4096),
        tie_word_embeddings: !g.has("output.weight"),
        bos_token_id: bos,
        eos_token_ids: eos.into_iter().collect(),
        attention_bias: arch == Arch::Qwen2,
        o_proj_bias: false,
    })
}

/// The f64 that prints like this f32 (GGUF's 1e-5 is 9.99999974e-6 as f32; we want 1e-5 back).
fn f32_to_f64(x: f32) -> f64 {
    x.to_string().parse().unwrap_or(x as f64)
}

/// GGUF tensor name -> Hugging Face name, for one layer's suffixes.
const LAYER_NAMES: &[(&str, &str)] = &[
    ("attn_norm.weight", "input_layernorm.weight"),
    ("ffn_norm.weight", "post_attention_layernorm.weight"),
    ("attn_q.weight", "self_attn.q_proj.weight"),
    ("attn_q.bias", "self_attn.q_proj.bias"),
    ("attn_k.weight", "self_attn.k_proj.weight"),
    ("attn_k.bias", "self_attn.k_proj.bias"),
    ("attn_v.weight", "self_attn.v_proj.weight"),
    ("attn_v.bias", "self_attn.v_proj.bias"),
    ("attn_output.weight", "self_attn.o_proj.weight"),
    ("ffn_gate.weight", "mlp.gate_proj.weight"),
    ("ffn_up.weight", "mlp.up_proj.weight"),
    ("ffn_down.weight", "mlp.down_proj.weight"),
];

/// Undo llama.cpp's permutation of a q or k projection (weight `(n_head * hd, in)` or bias
/// `(n_head * hd,)`): rows `(head, i, pair)` of the interleaved layout become `(head, pair, i)`.
pub fn unpermute_qk(w: &Tensor, n_head: usize) -> candle_core::Result<Tensor> {
    let dims = w.dims().to_vec();
    if dims
        .first()
        .is_none_or(|&d| d == 0 || n_head == 0 || d % (2 * n_head) != 0)
    {
        candle_core::bail!("a q/k projection of shape {dims:?} does not split into {n_head} heads");
    }
    let rest = w.elem_count() / dims[0];
    let hd = dims[0] / n_head;
    w.reshape((n_head, hd / 2, 2, rest))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(dims)
}

/// The inverse of `unpermute_qk`: HF half-split rows to llama.cpp's interleaved rows (used when
/// writing test GGUFs).
pub fn permute_qk(w: &Tensor, n_head: usize) -> candle_core::Result<Tensor> {
    let dims = w.dims().to_vec();
    let rest = w.elem_count() / dims[0];
    let hd = dims[0] / n_head;
    w.reshape((n_head, 2, hd / 2, rest))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(dims)
}

/// Every tensor of the file under its HF name, dequantized and converted to `dtype`. Also returns
/// llama.cpp's rotary frequency factors (`rope_freqs.weight`) when present.
pub fn tensors_from_gguf(
    g: &mut GgufFile,
    cfg: &DecoderConfig,
    device: &Device,
    dtype: DType,
) -> Result<(HashMap<String, Tensor>, Option<RopeScaling>)> {
    let mut out = HashMap::new();
    let mut put = |name: String, t: Tensor| -> Result<()> {
        out.insert(name, t.to_dtype(dtype)?);
        Ok(())
    };
    put(
        "model.embed_tokens.weight".into(),
        g.tensor("token_embd.weight", device)?,
    )?;
    put(
        "model.norm.weight".into(),
        g.tensor("output_norm.weight", device)?,
    )?;
    if g.has("output.weight") {
        put("lm_head.weight".into(), g.tensor("output.weight", device)?)?;
    }
    for i in 0..cfg.num_hidden_layers {
        for (src, dst) in LAYER_NAMES {
            let name = format!("blk.{i}.{src}");
            if !g.has(&name) {
                continue; // missing required weights are reported by `Decoder::new` by HF name
            }
            let mut t = g.tensor(&name, device)?;
            if cfg.arch == Arch::Llama {
                if src.starts_with("attn_q.") {
                    t = unpermute_qk(&t, cfg.num_attention_heads)?;
                } else if src.starts_with("attn_k.") {
                    t = unpermute_qk(&t, cfg.num_key_value_heads)?;
                }
            }
            put(format!("model.layers.{i}.{dst}"), t)?;
        }
    }
    let factors = if g.has("rope_freqs.weight") {
        let f = g
            .tensor("rope_freqs.weight", &Device::Cpu)?
            .to_vec1::<f32>()?;
        Some(RopeScaling::Factors { factors: f })
    } else {
        None
    };
    Ok((out, factors))
}
