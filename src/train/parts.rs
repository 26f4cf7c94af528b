//! The decoder a trainer runs (frozen or trainable, from the base model or a trained
//! `decoder.safetensors`) and writing a checkpoint directory: one safetensors file per part,
//! `decoder_config.json` beside a trained decoder, the optimiser state and `train_state.json`
//! for `--resume`, and `config.json` last. All of a checkpoint's files are written into a staging
//! directory and then moved into place ([`checkpoint::begin_staged`]), so a crash leaves the
//! previous checkpoint or the new one, never a mix of two steps, and a `config.json` never names a
//! part that was not yet written.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::{DType, Device};
use candle_nn::VarMap;
use serde::{Deserialize, Serialize};

use super::optim::AdamW;
use super::vars::{build_trainable, read_tensors};
use crate::decoder::lora::LoraConfig;
use crate::decoder::{self, Decoder, DecoderConfig, DecoderTokenizer};
use crate::hub;
use crate::io::checkpoint::{self, RefragConfig};

/// File name of a trained decoder's hyper-parameters.
pub const DECODER_CONFIG: &str = "decoder_config.json";
/// File name of the optimiser moments.
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
/// File name of the resume state.
pub const STATE_FILE: &str = "train_state.json";

/// The decoder of a training run.
pub struct TrainDecoder {
    pub decoder: Decoder,
    pub tok: DecoderTokenizer,
    /// Its variables when it trains: every weight, or only the low-rank adapter's (`lora`).
    pub vars: Option<VarMap>,
    /// The weights directory of a trained decoder that stays frozen (carried into checkpoints).
    pub frozen_from: Option<PathBuf>,
    /// The adapter on the decoder (training, or frozen and merged), and where a frozen one came
    /// from (carried into checkpoints).
    pub lora: Option<LoraConfig>,
    pub frozen_lora_from: Option<PathBuf>,
}

/// How the decoder of a run trains.
#[derive(Debug, Clone, PartialEq)]
pub enum DecoderTraining {
    Frozen,
    /// Every weight.
    Full,
    /// A low-rank adapter (continued from the starting weights' adapter when they have one).
    Lora(LoraConfig),
}

/// Load the decoder `dec`: from `trained` (a directory holding `decoder.safetensors`) when
/// given, else the base model; with the adapter of `lora_from` (a directory holding
/// `decoder_lora.safetensors`, and its shape) when given; trained as `training` says.
pub fn load_decoder(
    dec: &str,
    trained: Option<&Path>,
    lora_from: Option<(&Path, &LoraConfig)>,
    training: &DecoderTraining,
    device: &Device,
) -> Result<TrainDecoder> {
    let files = hub::resolve(dec)?;
    let full = *training == DecoderTraining::Full;
    if full && lora_from.is_some() {
        anyhow::bail!("the starting weights hold a LoRA adapter: train it further (--lora_rank > 0) or freeze the decoder, not a full fine-tune");
    }
    let (decoder, tok, vars) = match (trained, full) {
        (None, false) => {
            let (d, t) = Decoder::load(&files, device, DType::F32)?;
            (d, t, None)
        }
        (Some(dir), false) => {
            let (d, t) = decoder::load_trained(
                &files,
                &dir.join(DECODER_CONFIG),
                &checkpoint::part_path(dir, "decoder"),
                device,
                DType::F32,
            )?;
            (d, t, None)
        }
        (None, true) => {
            let parts = decoder::load_parts(&files, device, DType::F32)?;
            let cfg = parts.config.clone();
            let (d, vm) = build_trainable(parts.weights, true, dec, device, |vb| {
                Decoder::new(&cfg, vb)
            })?;
            (d, parts.tokenizer, Some(vm))
        }
        (Some(dir), true) => {
            let cfg_path = dir.join(DECODER_CONFIG);
            let cfg: DecoderConfig = crate::io::jsonio::read_json(&cfg_path)?;
            let path = checkpoint::part_path(dir, "decoder");
            let tensors = read_tensors(&path, device)?;
            let (d, vm) =
                build_trainable(tensors, false, &path.display().to_string(), device, |vb| {
                    Decoder::new(&cfg, vb)
                })?;
            let tok = decoder::load_tokenizer(&files, &cfg)?;
            (d, tok, Some(vm))
        }
    };
    let mut out = TrainDecoder {
        decoder,
        tok,
        vars,
        frozen_from: if full {
            None
        } else {
            trained.map(Path::to_path_buf)
        },
        lora: None,
        frozen_lora_from: None,
    };
    let train_lora = match training {
        DecoderTraining::Lora(c) => Some(c),
        _ => None,
    };
    let adapter = match (lora_from, train_lora) {
        (Some((dir, cfg)), new) => {
            if let Some(n) = new {
                if n.rank != cfg.rank || n.targets != cfg.targets {
                    eprintln!(
                        "refrag: note: continuing the rank-{} LoRA adapter of {} (not a new rank-{} one)",
                        cfg.rank,
                        dir.display(),
                        n.rank
                    );
                }
            }
            let vm = crate::decoder::lora::load_vars(
                &checkpoint::part_path(dir, "decoder_lora"),
                device,
            )?;
            Some((cfg.clone(), vm, Some(dir)))
        }
        (None, Some(n)) => Some((n.clone(), VarMap::new(), None)),
        (None, None) => None,
    };
    if let Some((cfg, vm, from)) = adapter {
        let train = train_lora.is_some();
        out.decoder.add_lora(&cfg, &vm, train)?;
        if train {
            out.vars = Some(vm);
        } else {
            out.frozen_lora_from = from.map(Path::to_path_buf);
        }
        out.lora = Some(cfg);
    }
    Ok(out)
}

/// What `--resume` needs besides the weights.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    pub stage: String,
    /// Optimiser steps done.
    pub step: usize,
    /// `--steps` of the run that wrote it.
    pub steps: usize,
    pub seed: u64,
    /// AdamW's update count (bias correction).
    pub optimizer_t: u64,
}

/// Read `train_state.json` of `dir`, if there is one.
pub fn read_state(dir: &Path) -> Result<Option<TrainState>> {
    let p = dir.join(STATE_FILE);
    if !p.is_file() {
        return Ok(None);
    }
    Ok(Some(crate::io::jsonio::read_json(&p)?))
}

/// The parts of a checkpoint.
pub struct Checkpoint<'a> {
    pub config: RefragConfig,
    /// Parts saved from variables: (`encoder`, map), ...
    pub vars: Vec<(&'static str, &'a VarMap)>,
    /// Parts copied from another weights directory (frozen trained parts the run used).
    pub copies: Vec<(&'static str, PathBuf)>,
    /// Hyper-parameters of a trained decoder, when one is saved.
    pub decoder_config: Option<DecoderConfig>,
}

/// Write `ck`, the optimiser and the state into `dir`; `config.json` last.
pub fn write_checkpoint(
    dir: &Path,
    ck: &Checkpoint,
    opt: &AdamW,
    state: &TrainState,
) -> Result<()> {
    // All files into a staging directory first, then moved into place: a run killed while
    // writing leaves the previous checkpoint whole, never a mix of two steps' files.
    let staging = checkpoint::begin_staged(dir)?;
    write_checkpoint_files(&staging, ck, opt, state)?;
    checkpoint::commit_staged(dir)
}

fn write_checkpoint_files(
    dir: &Path,
    ck: &Checkpoint,
    opt: &AdamW,
    state: &TrainState,
) -> Result<()> {
    for (part, vm) in &ck.vars {
        let path = checkpoint::part_path(dir, part);
        checkpoint::save_varmap(vm, &path)?;
        readable(&path)?;
    }
    for (part, from) in &ck.copies {
        let src = checkpoint::part_path(from, part);
        let dst = checkpoint::part_path(dir, part);
        if src != dst {
            copy_atomic(&src, &dst)?;
            if *part == "decoder" {
                copy_atomic(&from.join(DECODER_CONFIG), &dir.join(DECODER_CONFIG))?;
            }
        }
    }
    if let Some(c) = &ck.decoder_config {
        crate::io::jsonio::write_json(&dir.join(DECODER_CONFIG), c)?;
    }
    opt.save(&dir.join(OPTIMIZER_FILE))?;
    readable(&dir.join(OPTIMIZER_FILE))?;
    crate::io::jsonio::write_json(&dir.join(STATE_FILE), state)?;
    crate::io::jsonio::write_json(&dir.join("config.json"), &ck.config)?;
    Ok(())
}

/// Put `src` at `dst` atomically: a hard link when both are on one file system (a frozen
/// 500 MB decoder is then not duplicated; writers here always replace files by renaming, so the
/// link keeps its content), else a copy.
fn copy_atomic(src: &Path, dst: &Path) -> Result<()> {
    let dir = dst.parent().unwrap_or(Path::new("."));
    let name = dst.file_name().unwrap_or_default().to_string_lossy();
    let link = dir.join(format!(".{name}.{}.link", std::process::id()));
    let _ = std::fs::remove_file(&link);
    if std::fs::hard_link(src, &link).is_ok() {
        return std::fs::rename(&link, dst).with_context(|| format!("writing {}", dst.display()));
    }
    let tmp = tempfile::NamedTempFile::new_in(dir)
        .with_context(|| format!("creating a temporary file in {}", dir.display()))?;
    std::fs::copy(src, tmp.path())
        .with_context(|| format!("copying {} to {}", src.display(), dst.display()))?;
    tmp.persist(dst)
        .with_context(|| format!("writing {}", dst.display()))?;
    readable(dst)
}

/// rw-r--r--, like every other output (temporary files start as rw-------).
fn readable(path: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644))
            .with_context(|| format!("setting permissions of {}", path.display()))?;
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

/// A `config.json` for a checkpoint of `stage`.
pub struct ConfigFields<'a> {
    pub stage: &'a str,
    pub encoder_model: &'a str,
    pub pooling: crate::retrieval::embed::Pooling,
    pub decoder_model: &'a str,
    pub k: usize,
    pub projector: crate::compression::projector::ProjectorConfig,
    pub policy_hidden: Option<usize>,
    pub parts: Vec<&'a str>,
    pub step: usize,
    pub lora: Option<LoraConfig>,
}

impl ConfigFields<'_> {
    pub fn build(self) -> RefragConfig {
        RefragConfig {
            format_version: checkpoint::FORMAT_VERSION,
            refrag_version: env!("CARGO_PKG_VERSION").to_string(),
            stage: self.stage.to_string(),
            encoder_model: self.encoder_model.to_string(),
            encoder_pooling: self.pooling.to_string(),
            decoder_model: self.decoder_model.to_string(),
            k: self.k,
            projector: self.projector,
            policy_hidden: self.policy_hidden,
            parts: self.parts.iter().map(|s| s.to_string()).collect(),
            step: self.step,
            lora: self.lora,
        }
    }
}

/// The encoder tensor that never trains (its token-embedding table).
pub const FROZEN_ENCODER_SUFFIX: &str = "embeddings.word_embeddings.weight";

/// The optimiser groups of an encoder + projector (+ trainable decoder at `dec_lr_scale`) run.
pub fn enc_dec_groups(
    enc: &super::encoder::TrainEncoder,
    dec: &TrainDecoder,
    dec_lr_scale: f64,
) -> Vec<super::optim::Group> {
    use super::optim::Group;
    use super::vars::named_vars;
    // The encoder's token-embedding table stays as pretrained: it is half of all-MiniLM's
    // parameters, shared with the retriever's vocabulary, and leaving it out halves the
    // optimiser state and lets shipped weights omit it.
    let encoder: Vec<_> = named_vars(&enc.bert_vars)
        .into_iter()
        .filter(|(n, _)| !n.ends_with(FROZEN_ENCODER_SUFFIX))
        .collect();
    let mut g = vec![Group {
        name: "projector".into(),
        vars: named_vars(&enc.projector_vars),
        lr_scale: 1.0,
    }];
    if !enc.frozen {
        g.insert(
            0,
            Group {
                name: "encoder".into(),
                vars: encoder,
                lr_scale: enc.lr_scale,
            },
        );
    }
    if let Some(vm) = &dec.vars {
        g.push(Group {
            name: "decoder".into(),
            vars: named_vars(vm),
            lr_scale: dec_lr_scale,
        });
    }
    g
}

/// The checkpoint of an encoder + projector (+ decoder) run: the decoder is saved when it
/// trained, copied when it is a frozen trained one, and absent when it is the base model.
pub fn enc_dec_checkpoint<'a>(
    enc: &'a super::encoder::TrainEncoder,
    dec: &'a TrainDecoder,
    stage: &str,
    dec_name: &str,
    k: usize,
    step: usize,
) -> Checkpoint<'a> {
    let mut parts = vec!["encoder", "projector"];
    let mut vars = vec![
        ("encoder", &enc.bert_vars),
        ("projector", &enc.projector_vars),
    ];
    let (mut copies, mut decoder_config) = (Vec::new(), None);
    match (&dec.vars, &dec.lora) {
        (Some(vm), Some(_)) => {
            vars.push(("decoder_lora", vm));
            parts.push("decoder_lora");
        }
        (Some(vm), None) => {
            vars.push(("decoder", vm));
            decoder_config = Some(dec.decoder.config().clone());
            parts.push("decoder");
        }
        (None, _) => {
            if let Some(dir) = &dec.frozen_lora_from {
                copies.push(("decoder_lora", dir.clone()));
                parts.push("decoder_lora");
            }
        }
    }
    if let Some(dir) = &dec.frozen_from {
        copies.push(("decoder", dir.clone()));
        parts.push("decoder");
    }
    let config = ConfigFields {
        stage,
        encoder_model: &enc.model_name,
        pooling: enc.pooling,
        decoder_model: dec_name,
        k,
        projector: enc.projector_cfg,
        policy_hidden: None,
        parts,
        step,
        lora: dec.lora.clone(),
    }
    .build();
    Checkpoint {
        config,
        vars,
        copies,
        decoder_config,
    }
}
