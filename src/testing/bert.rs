//! A tiny random BERT (safetensors + config + WordPiece tokenizer) written to a folder.
//!
//! The layout is that of a real sentence-transformers folder (`config.json`, `model.safetensors`,
//! `tokenizer.json`, `1_Pooling/config.json`), so every code path that loads all-MiniLM-L6-v2 loads
//! this too, in milliseconds. Same seed, same bytes.

use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use candle_transformers::models::bert::BertModel;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tokenizers::models::wordpiece::WordPiece;
use tokenizers::normalizers::BertNormalizer;
use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
use tokenizers::processors::bert::BertProcessing;
use tokenizers::Tokenizer;

/// Hidden width of the tiny model.
pub const TINY_HIDDEN: usize = 32;

/// Whole words in the tiny vocabulary (everything else falls back to letters and digits).
const WORDS: &[&str] = &[
    "the",
    "is",
    "in",
    "of",
    "and",
    "a",
    "city",
    "river",
    "country",
    "which",
    "what",
    "flows",
    "through",
    "lies",
    "on",
    "was",
    "founded",
    "alloy",
    "person",
    "university",
    "event",
];

/// The vocabulary: specials, words, punctuation, then letters and digits, plain and `##`.
fn vocab() -> Vec<String> {
    let mut v: Vec<String> = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    v.extend(WORDS.iter().map(|s| s.to_string()));
    v.extend("_.,?!:;-%()'\"/".chars().map(String::from));
    let chars: Vec<char> = ('a'..='z').chain('0'..='9').collect();
    v.extend(chars.iter().map(|c| c.to_string()));
    v.extend(chars.iter().map(|c| format!("##{c}")));
    v
}

/// `config.json` of the tiny model.
fn config_json(vocab_size: usize) -> serde_json::Value {
    serde_json::json!({
        "architectures": ["BertModel"],
        "model_type": "bert",
        "vocab_size": vocab_size,
        "hidden_size": TINY_HIDDEN,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 64,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "max_position_embeddings": 64,
        "type_vocab_size": 2,
        "initializer_range": 0.02,
        "layer_norm_eps": 1e-12,
        "pad_token_id": 0,
        "position_embedding_type": "absolute",
    })
}

/// A BERT WordPiece tokenizer over `vocab.txt` (one token per line, id = line), built in code.
fn tokenizer(vocab_txt: &Path) -> Result<Tokenizer> {
    let path = vocab_txt.to_str().context("vocab path is not UTF-8")?;
    let wp = WordPiece::from_file(path)
        .unk_token("[UNK]".into())
        .build()
        .map_err(anyhow::Error::msg)?;
    let mut tok = Tokenizer::new(wp);
    tok.with_normalizer(Some(BertNormalizer::default()));
    tok.with_pre_tokenizer(Some(BertPreTokenizer));
    tok.with_post_processor(Some(BertProcessing::new(
        ("[SEP]".into(), 3),
        ("[CLS]".into(), 2),
    )));
    Ok(tok)
}

/// Random weights for every tensor `BertModel::load` asks for, drawn from `seed` (names sorted, so
/// the stream does not depend on hash order). LayerNorm weights stay near 1.
fn random_weights(cfg: &candle_transformers::models::bert::Config, seed: u64) -> Result<VarMap> {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    BertModel::load(vb, cfg)?;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let data = varmap.data().lock().expect("varmap lock");
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    for name in names {
        let var = &data[name];
        let n = var.elem_count();
        let (base, scale) = match name {
            n if n.ends_with("LayerNorm.weight") => (1.0, 0.1),
            n if n.contains("embeddings") => (0.0, 1.0),
            _ => (0.0, 0.3),
        };
        let values: Vec<f32> = (0..n)
            .map(|_| base + scale * rng.random_range(-1.0f32..1.0))
            .collect();
        var.set(&Tensor::from_vec(values, var.shape(), &Device::Cpu)?)?;
    }
    drop(data);
    Ok(varmap)
}

/// Write a tiny random BERT (2 layers, hidden 32, 4 heads, ~100-token WordPiece vocabulary, 64
/// positions) into `dir`, with its `vocab.txt`. `pooling`: `Some("mean")` or `Some("cls")` writes
/// `1_Pooling/config.json`; `None` writes none (readers then default to mean).
pub fn write_tiny_bert(dir: &Path, seed: u64, pooling: Option<&str>) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let vocab = vocab();
    let config = config_json(vocab.len());
    crate::io::jsonio::write_json(&dir.join("config.json"), &config)?;
    let cfg: candle_transformers::models::bert::Config = serde_json::from_value(config)?;
    random_weights(&cfg, seed)?.save(dir.join("model.safetensors"))?;
    let vocab_txt = dir.join("vocab.txt");
    std::fs::write(&vocab_txt, vocab.join("\n") + "\n")
        .with_context(|| format!("writing {}", vocab_txt.display()))?;
    tokenizer(&vocab_txt)?
        .save(dir.join("tokenizer.json"), false)
        .map_err(anyhow::Error::msg)?;
    if let Some(p) = pooling {
        let (cls, mean) = match p {
            "mean" => (false, true),
            "cls" => (true, false),
            other => bail!("tiny BERT pooling must be mean or cls, not {other}"),
        };
        let pool = serde_json::json!({
            "word_embedding_dimension": TINY_HIDDEN,
            "pooling_mode_cls_token": cls,
            "pooling_mode_mean_tokens": mean,
            "pooling_mode_max_tokens": false,
            "pooling_mode_mean_sqrt_len_tokens": false,
        });
        crate::io::jsonio::write_json(&dir.join("1_Pooling/config.json"), &pool)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_bytes_and_tokenizer_covers_text() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        write_tiny_bert(a.path(), 3, Some("mean")).unwrap();
        write_tiny_bert(b.path(), 3, None).unwrap();
        let wa = std::fs::read(a.path().join("model.safetensors")).unwrap();
        let wb = std::fs::read(b.path().join("model.safetensors")).unwrap();
        assert_eq!(wa, wb);
        let tok = Tokenizer::from_file(a.path().join("tokenizer.json")).unwrap();
        let enc = tok
            .encode("Which river flows through City_7?", true)
            .unwrap();
        assert_eq!(enc.get_ids()[0], 2);
        assert!(!enc.get_ids().contains(&1), "{:?}", enc.get_tokens());
    }
}
