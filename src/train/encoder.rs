//! The chunk encoder and projector as trainable variables: the differentiable BERT
//! ([`TrainBert`]) started from the encoder model's own safetensors (or from a trained
//! `encoder.safetensors`), pooled like inference pools, then the projector. The saved encoder
//! keeps exactly the variable names of the original file (all-MiniLM has no `bert.` prefix), so
//! inference's `ChunkEncoder::load` reads it with candle's `BertModel` unchanged.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{VarBuilder, VarMap};
use candle_transformers::models::bert::Config;
use tokenizers::{Encoding, Tokenizer};

use super::bert::TrainBert;
use super::vars::{build_trainable, read_tensors};
use crate::compression::projector::{Projector, ProjectorConfig};
use crate::hub::{self, ModelFiles};
use crate::retrieval::embed::{self, Pooling, TokenBatch};

/// Where the projector's weights come from.
#[derive(Debug, Clone)]
pub enum ProjectorInit<'a> {
    /// Seeded random weights with output spread `out_std` (the decoder's embedding spread).
    Fresh { out_std: f64, seed: u64 },
    /// A saved `projector.safetensors`.
    File(&'a Path),
    /// A saved projector of mean pooling, widened to read segment pooling
    /// ([`Projector::widen_vars`]): it starts out computing what it computed before, and can
    /// then learn to use the order the segments keep.
    Widen(&'a Path),
}

/// Trainable chunk encoder + projector.
pub struct TrainEncoder {
    bert: TrainBert,
    pub bert_vars: VarMap,
    projector: Projector,
    pub projector_vars: VarMap,
    pub projector_cfg: ProjectorConfig,
    tokenizer: Tokenizer,
    pad_id: u32,
    pub pooling: Pooling,
    /// The encoder model argument (HF folder or hub id) the weights started from.
    pub model_name: String,
    /// Keep the encoder as it is and train only the projector (`--freeze_enc`): the pooled
    /// states are detached, so no gradient flows back through BERT.
    pub frozen: bool,
    /// The encoder's learning rate over the run's base rate (`--enc_lr`; the projector keeps
    /// the base rate).
    pub lr_scale: f64,
    device: Device,
}

impl TrainEncoder {
    /// Load the encoder `enc` (its own weights, or `trained` = a saved `encoder.safetensors`),
    /// and the projector to decoder width `out_dim`.
    pub fn load(
        enc: &str,
        trained: Option<&Path>,
        pooling: Pooling,
        out_dim: usize,
        projector: ProjectorInit,
        device: &Device,
    ) -> Result<Self> {
        let files = hub::resolve(enc)?;
        let ModelFiles::Hf {
            config,
            weights,
            tokenizer,
            ..
        } = &files
        else {
            bail!("--enc {enc}: the chunk encoder must be a BERT-family Hugging Face folder, not a GGUF file");
        };
        let cfg = embed::read_config(config)?;
        let tok = embed::load_tokenizer(tokenizer, embed::max_seq_len(&files, &cfg)?)?;
        let weights = match trained {
            Some(p) => BertWeights::Trained {
                base: weights,
                file: p,
            },
            None => BertWeights::Base(weights),
        };
        let (bert, bert_vars) = load_bert(enc, &cfg, weights, device)?;
        let projector_cfg = ProjectorConfig {
            in_dim: cfg.hidden_size * pooling.segments(),
            hidden: out_dim,
            out_dim,
        };
        let (projector, projector_vars) =
            load_projector(&projector_cfg, projector, pooling.segments(), device)?;
        Ok(Self {
            bert,
            bert_vars,
            projector,
            projector_vars,
            projector_cfg,
            tokenizer: tok,
            pad_id: cfg.pad_token_id as u32,
            pooling,
            model_name: enc.to_string(),
            frozen: false,
            lr_scale: 1.0,
            device: device.clone(),
        })
    }

    /// Pooled encoder states `c_i` `(n, h)` of chunk texts, differentiable.
    pub fn encode(&self, texts: &[&str]) -> Result<Tensor> {
        let enc: Vec<Encoding> = self
            .tokenizer
            .encode_batch(texts.to_vec(), true)
            .map_err(anyhow::Error::msg)
            .context("tokenizing chunks for the encoder")?;
        let refs: Vec<&Encoding> = enc.iter().collect();
        let batch = TokenBatch::from_encodings(&refs, self.pad_id, &self.device)?;
        let hidden = self
            .bert
            .forward(&batch.ids, &batch.type_ids, &batch.mask)?;
        Ok(embed::pool(&hidden, &batch.mask, self.pooling)?)
    }

    /// Projected chunk embeddings `e_i` `(n, d)` of chunk texts, differentiable.
    pub fn embed(&self, texts: &[&str]) -> Result<Tensor> {
        let c = self.encode(texts)?;
        let c = if self.frozen { c.detach() } else { c };
        Ok(self.projector.forward(&c)?)
    }
}

/// Where a trainable BERT's weights come from.
enum BertWeights<'a> {
    /// The model's own files (extra tensors such as a pooler are allowed).
    Base(&'a [PathBuf]),
    /// A saved `encoder.safetensors` over the model's own files: every tensor it holds must be
    /// one of the model's, and the ones it leaves out (frozen in training) come from the base.
    Trained { base: &'a [PathBuf], file: &'a Path },
}

/// A trainable BERT over its variables, named as in its file.
fn load_bert(
    enc: &str,
    cfg: &Config,
    weights: BertWeights,
    device: &Device,
) -> Result<(TrainBert, VarMap)> {
    let read_all = |files: &[PathBuf]| -> Result<HashMap<String, Tensor>> {
        let mut all = HashMap::new();
        for w in files {
            all.extend(read_tensors(w, device)?);
        }
        Ok(all)
    };
    let mut trained_names = Vec::new();
    let (tensors, source) = match weights {
        BertWeights::Trained { base, file } => {
            let mut all = read_all(base)?;
            let source = file.display().to_string();
            let trained = read_tensors(file, device)?;
            trained_names = trained.keys().cloned().collect();
            let base_prefix = bert_prefix(&all).unwrap_or_default();
            for (name, t) in trained {
                if !all.contains_key(&name) && !all.contains_key(&format!("{base_prefix}{name}")) {
                    bail!(
                        "{source}: unexpected tensor '{name}' (checkpoint from another encoder?)"
                    );
                }
                all.insert(name, t);
            }
            (all, source)
        }
        BertWeights::Base(files) => (read_all(files)?, format!("encoder '{enc}'")),
    };
    let prefix = bert_prefix(&tensors).with_context(|| format!("{source}: not a BERT"))?;
    let (bert, vars) = build_trainable(tensors, true, &source, device, |vb| {
        let vb = if prefix.is_empty() {
            vb
        } else {
            vb.pp(prefix.trim_end_matches('.'))
        };
        TrainBert::new(cfg, vb)
    })?;
    // Every tensor of a trained file must be one the model uses (a file from a deeper encoder
    // would otherwise load with its extra layers silently dropped).
    {
        let data = vars.data().lock().unwrap();
        trained_names.sort();
        if let Some(extra) = trained_names.iter().find(|n| !data.contains_key(*n)) {
            bail!("{source}: unexpected tensor '{extra}' (checkpoint from another encoder?)");
        }
    }
    Ok((bert, vars))
}

/// The projector over its variables, fresh or from a file.
fn load_projector(
    cfg: &ProjectorConfig,
    init: ProjectorInit,
    segments: usize,
    device: &Device,
) -> Result<(Projector, VarMap)> {
    let vars = VarMap::new();
    match init {
        ProjectorInit::Fresh { out_std, seed } => {
            Projector::init_vars(&vars, "", cfg, out_std, seed, device)?
        }
        ProjectorInit::File(path) => {
            Projector::init_vars(&vars, "", cfg, 1.0, 0, device)?;
            crate::io::checkpoint::load_varmap_strict(&vars, path, device)?;
        }
        ProjectorInit::Widen(path) => {
            let narrow = ProjectorConfig {
                in_dim: cfg.in_dim / segments,
                ..*cfg
            };
            let saved = VarMap::new();
            Projector::init_vars(&saved, "", &narrow, 1.0, 0, device)?;
            Projector::init_vars(&vars, "", cfg, 1.0, 0, device)?;
            crate::io::checkpoint::load_varmap_strict(&saved, path, device)?;
            Projector::widen_vars(&saved, &vars, segments)?;
        }
    }
    let projector = Projector::new(cfg, VarBuilder::from_varmap(&vars, DType::F32, device))?;
    Ok((projector, vars))
}

/// The prefix of a BERT file's names: `""` (all-MiniLM) or e.g. `"bert."`.
fn bert_prefix(tensors: &HashMap<String, Tensor>) -> Option<String> {
    const KEY: &str = "embeddings.word_embeddings.weight";
    let mut prefixes: Vec<&str> = tensors.keys().filter_map(|k| k.strip_suffix(KEY)).collect();
    prefixes.sort_by_key(|p| p.len());
    prefixes.first().map(|p| p.to_string())
}
