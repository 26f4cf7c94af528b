//! A weights directory (`--load_dir`, `--out_dir`): `config.json` saying what it holds, and one
//! safetensors file per trained part (`encoder`, `projector`, `policy`, and `decoder` only when the
//! decoder was trained). Loading checks names and shapes and fails on any mismatch: weights are
//! never silently skipped.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use candle_nn::VarMap;
use serde::{Deserialize, Serialize};

use crate::compression::projector::ProjectorConfig;

/// Version of the checkpoint layout.
pub const FORMAT_VERSION: u32 = 1;

/// `config.json` of a weights directory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RefragConfig {
    pub format_version: u32,
    pub refrag_version: String,
    /// Which command wrote it (`cpt_recon`, `cpt_next`, `sft`, `train_policy`).
    pub stage: String,
    /// Encoder model argument (HF folder or hub id) the encoder weights started from.
    pub encoder_model: String,
    /// `cls` or `mean`.
    pub encoder_pooling: String,
    /// Decoder model argument.
    pub decoder_model: String,
    /// Decoder tokens per chunk the weights were trained with.
    pub k: usize,
    pub projector: ProjectorConfig,
    /// Policy hidden width, when a policy is stored.
    pub policy_hidden: Option<usize>,
    /// Which parts have a safetensors file here.
    pub parts: Vec<String>,
    /// Optimiser steps done.
    pub step: usize,
    /// Shape of the decoder's low-rank adapter, when `decoder_lora` is a part.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora: Option<crate::decoder::lora::LoraConfig>,
}

impl RefragConfig {
    /// Read `dir/config.json`.
    pub fn read(dir: &Path) -> Result<Self> {
        recover_staged(dir, false)?;
        let path = dir.join("config.json");
        if !path.is_file() {
            bail!(
                "--load_dir {}: no config.json (not a refrag weights directory)",
                dir.display()
            );
        }
        let cfg: Self = crate::io::jsonio::read_json(&path)?;
        if cfg.format_version != FORMAT_VERSION {
            bail!(
                "{}: checkpoint format {} (this refrag reads {FORMAT_VERSION})",
                path.display(),
                cfg.format_version
            );
        }
        Ok(cfg)
    }

    /// Whether `part` has weights here.
    pub fn has(&self, part: &str) -> bool {
        self.parts.iter().any(|p| p == part)
    }
}

/// The staging directory of a checkpoint being written, inside the weights directory: every file
/// of a checkpoint goes there first, then [`commit_staged`] moves them into place, so a run
/// killed while writing leaves the previous checkpoint whole (or the new one, finished by
/// [`recover_staged`] on the next read or write).
pub const STAGING: &str = ".checkpoint.next";
/// Written into [`STAGING`] once every file of the checkpoint is there.
const STAGED_COMPLETE: &str = ".complete";

/// An empty staging directory in `dir` (created if needed); a leftover one is removed.
pub fn begin_staged(dir: &Path) -> Result<PathBuf> {
    let staging = dir.join(STAGING);
    if staging.exists() {
        std::fs::remove_dir_all(&staging)
            .with_context(|| format!("removing {}", staging.display()))?;
    }
    std::fs::create_dir_all(&staging)
        .with_context(|| format!("creating --out_dir {}", dir.display()))?;
    Ok(staging)
}

/// Mark the staged checkpoint complete and move its files into `dir`, `config.json` last.
pub fn commit_staged(dir: &Path) -> Result<()> {
    let marker = dir.join(STAGING).join(STAGED_COMPLETE);
    std::fs::write(&marker, b"").with_context(|| format!("writing {}", marker.display()))?;
    recover_staged(dir, false)?;
    Ok(())
}

/// Finish a checkpoint whose staging directory was marked complete (moving its files into `dir`);
/// with `writer` (the caller holds `dir`'s lock) an incomplete one is removed instead. Several
/// processes may finish the same checkpoint at once: a file another one moved is skipped.
/// Returns whether there was anything to do.
pub fn recover_staged(dir: &Path, writer: bool) -> Result<bool> {
    let staging = dir.join(STAGING);
    if !staging.is_dir() {
        return Ok(false);
    }
    if !staging.join(STAGED_COMPLETE).is_file() {
        if writer {
            std::fs::remove_dir_all(&staging)
                .with_context(|| format!("removing {}", staging.display()))?;
        }
        return Ok(writer);
    }
    let mut files: Vec<PathBuf> = match std::fs::read_dir(&staging) {
        Ok(rd) => rd.filter_map(|e| e.ok().map(|e| e.path())).collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e).with_context(|| format!("reading {}", staging.display())),
    };
    // config.json last: it names the parts, so it must not be in place before them.
    files.sort_by_key(|p| (p.ends_with("config.json"), p.clone()));
    for from in files {
        let Some(name) = from.file_name() else {
            continue;
        };
        if name == STAGED_COMPLETE || name.to_string_lossy().starts_with(".tmp") {
            continue;
        }
        match std::fs::rename(&from, dir.join(name)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(e)
                    .with_context(|| format!("moving {} into {}", from.display(), dir.display()))
            }
            _ => {}
        }
    }
    match std::fs::remove_dir_all(&staging) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing {}", staging.display()))
        }
        _ => Ok(true),
    }
}

/// Path of a part's weights file.
pub fn part_path(dir: &Path, part: &str) -> PathBuf {
    dir.join(format!("{part}.safetensors"))
}

/// Save every variable of `varmap` to `path` atomically.
pub fn save_varmap(varmap: &VarMap, path: &Path) -> Result<()> {
    let data = varmap.data().lock().unwrap();
    let tensors: HashMap<String, Tensor> = data
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
        .collect();
    drop(data);
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = tempfile::Builder::new()
        .suffix(".safetensors")
        .tempfile_in(dir)
        .with_context(|| format!("creating a temporary file in {}", dir.display()))?;
    candle_core::safetensors::save(&tensors, tmp.path())
        .with_context(|| format!("writing {}", path.display()))?;
    tmp.persist(path)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Load `path` into `varmap`, whose variables must all be present with the same shapes; a file
/// with extra or missing tensors, or other shapes, is an error naming the tensor.
pub fn load_varmap_strict(varmap: &VarMap, path: &Path, device: &Device) -> Result<()> {
    let file = candle_core::safetensors::load(path, device)
        .with_context(|| format!("reading {}", path.display()))?;
    let data = varmap.data().lock().unwrap();
    for name in file.keys() {
        if !data.contains_key(name) {
            bail!(
                "{}: unexpected tensor '{name}' (checkpoint from another model?)",
                path.display()
            );
        }
    }
    for (name, var) in data.iter() {
        let Some(t) = file.get(name) else {
            bail!("{}: missing tensor '{name}'", path.display());
        };
        if t.dims() != var.dims() {
            bail!(
                "{}: tensor '{name}' has shape {:?}, the model expects {:?} (checkpoint from another model or k?)",
                path.display(),
                t.dims(),
                var.dims()
            );
        }
        var.set(&t.to_dtype(var.dtype())?)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;
    use candle_nn::Init;

    fn varmap(shape: (usize, usize)) -> VarMap {
        let vm = VarMap::new();
        vm.get(shape, "w", Init::Const(1.0), DType::F32, &Device::Cpu)
            .unwrap();
        vm
    }

    #[test]
    fn round_trip_and_shape_mismatch() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("projector.safetensors");
        save_varmap(&varmap((2, 3)), &p).unwrap();
        load_varmap_strict(&varmap((2, 3)), &p, &Device::Cpu).unwrap();
        let e = format!(
            "{:#}",
            load_varmap_strict(&varmap((3, 3)), &p, &Device::Cpu).unwrap_err()
        );
        assert!(e.contains("tensor 'w' has shape [2, 3]"), "{e}");
        let other = VarMap::new();
        other
            .get((2, 3), "v", Init::Const(0.0), DType::F32, &Device::Cpu)
            .unwrap();
        let e = format!(
            "{:#}",
            load_varmap_strict(&other, &p, &Device::Cpu).unwrap_err()
        );
        assert!(e.contains("unexpected tensor 'w'"), "{e}");
    }
}
