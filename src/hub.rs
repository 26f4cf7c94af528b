//! Finding a model's files. A model argument is a local Hugging Face folder (`config.json`,
//! `*.safetensors`, `tokenizer.json`), a `.gguf` file, or a hub id resolved through `hf-hub`:
//! the local hub cache first (so a cached model works offline), then a download. A hub GGUF is
//! named `owner/repo:file.gguf`. When nothing is found, one error names the model and every place
//! looked. The defaults resolve to `models/` (filled by `scripts/fetch_models.sh`) when it holds
//! them, else to the hub ids.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};

/// Hub id of the default retrieval embedder and chunk encoder.
pub const DEFAULT_EMBED_HUB: &str = "sentence-transformers/all-MiniLM-L6-v2";
/// Hub id of the default decoder.
pub const DEFAULT_DEC_HUB: &str = "HuggingFaceTB/SmolLM2-135M-Instruct";
/// Folder name of the default embedder under `models/`.
pub const DEFAULT_EMBED_LOCAL: &str = "all-MiniLM-L6-v2";
/// File name of the default decoder under `models/`.
pub const DEFAULT_DEC_LOCAL: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// The files of one resolved model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelFiles {
    /// A Hugging Face folder (local or from the hub cache).
    Hf {
        /// The name the user gave (path or hub id), for manifests and messages.
        name: String,
        config: PathBuf,
        weights: Vec<PathBuf>,
        tokenizer: PathBuf,
        /// Any other file of the folder, looked up by name (e.g. `1_Pooling/config.json`).
        dir: Option<PathBuf>,
    },
    /// A single GGUF file (weights, tokenizer and chat template inside).
    Gguf { name: String, path: PathBuf },
}

impl ModelFiles {
    /// The name the user gave.
    pub fn name(&self) -> &str {
        match self {
            ModelFiles::Hf { name, .. } | ModelFiles::Gguf { name, .. } => name,
        }
    }
}

/// Which default to use when a model flag is absent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Embedder,
    Encoder,
    Decoder,
}

/// Directory that holds the locally fetched default models: `$REFRAG_MODELS_DIR`, else `models/`.
pub fn models_dir() -> PathBuf {
    std::env::var_os("REFRAG_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("models"))
}

/// The model argument to use for `role`: the flag's value, else `models/...` when present, else
/// the hub id.
pub fn model_arg(flag: Option<&str>, role: Role) -> String {
    if let Some(f) = flag {
        return f.to_string();
    }
    let (local, hub) = match role {
        Role::Embedder | Role::Encoder => (DEFAULT_EMBED_LOCAL, DEFAULT_EMBED_HUB),
        Role::Decoder => (DEFAULT_DEC_LOCAL, DEFAULT_DEC_HUB),
    };
    let path = models_dir().join(local);
    if path.exists() {
        path.to_string_lossy().into_owned()
    } else {
        hub.to_string()
    }
}

/// Resolve a model argument to its files, or fail with one line naming every place looked.
pub fn resolve(arg: &str) -> Result<ModelFiles> {
    let mut looked: Vec<String> = Vec::new();
    let path = Path::new(arg);
    if path.exists() {
        if path.is_file() {
            if arg.ends_with(".gguf") {
                return Ok(ModelFiles::Gguf {
                    name: arg.to_string(),
                    path: path.to_path_buf(),
                });
            }
            bail!("model '{arg}': {arg} is a file but not a .gguf; give a Hugging Face folder, a .gguf file or a hub id");
        }
        return local_folder(arg, path);
    }
    looked.push(format!("{} (no such file or folder)", path.display()));
    if looks_like_hub_id(arg) {
        match from_hub(arg, &mut looked) {
            Ok(files) => return Ok(files),
            Err(e) => looked.push(format!("hub download ({e})")),
        }
    }
    bail!(
        "model '{arg}' not found; looked in: {}{}",
        looked.join("; "),
        if models_dir().join(DEFAULT_EMBED_LOCAL).exists() {
            ""
        } else {
            " (scripts/fetch_models.sh puts the default models into models/)"
        }
    )
}

fn local_folder(arg: &str, dir: &Path) -> Result<ModelFiles> {
    let config = dir.join("config.json");
    let tokenizer = dir.join("tokenizer.json");
    let mut weights: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    weights.sort();
    let mut missing = Vec::new();
    if !config.is_file() {
        missing.push("config.json");
    }
    if weights.is_empty() {
        missing.push("*.safetensors");
    }
    if !tokenizer.is_file() {
        missing.push("tokenizer.json");
    }
    if !missing.is_empty() {
        bail!(
            "model '{arg}': folder {} lacks {}",
            dir.display(),
            missing.join(", ")
        );
    }
    Ok(ModelFiles::Hf {
        name: arg.to_string(),
        config,
        weights,
        tokenizer,
        dir: Some(dir.to_path_buf()),
    })
}

fn looks_like_hub_id(arg: &str) -> bool {
    let repo = arg.split(':').next().unwrap_or(arg);
    let parts: Vec<&str> = repo.split('/').collect();
    parts.len() == 2
        && parts.iter().all(|p| {
            !p.is_empty()
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        })
}

/// Files of a hub model: from the hub cache if there, else downloaded.
fn from_hub(arg: &str, looked: &mut Vec<String>) -> Result<ModelFiles> {
    let (repo_id, gguf) = match arg.split_once(':') {
        Some((r, f)) => (r, Some(f)),
        None => (arg, None),
    };
    let cache = hf_hub::Cache::from_env();
    let cached = cache.model(repo_id.to_string());
    let wanted: Vec<&str> = match gguf {
        Some(f) => vec![f],
        None => vec!["config.json", "tokenizer.json", "model.safetensors"],
    };
    let in_cache: Vec<Option<PathBuf>> = wanted.iter().map(|f| cached.get(f)).collect();
    let paths: Vec<PathBuf> = if in_cache.iter().all(|p| p.is_some()) {
        in_cache.into_iter().flatten().collect()
    } else {
        looked.push(format!("hub cache {}", cache.path().display()));
        let api = hf_hub::api::sync::ApiBuilder::from_env()
            .with_progress(false)
            .build()?;
        let repo = api.model(repo_id.to_string());
        let mut out = Vec::new();
        for f in &wanted {
            out.push(repo.get(f)?);
        }
        out
    };
    let name = arg.to_string();
    Ok(match gguf {
        Some(_) => ModelFiles::Gguf {
            name,
            path: paths[0].clone(),
        },
        None => ModelFiles::Hf {
            name,
            config: paths[0].clone(),
            tokenizer: paths[1].clone(),
            weights: vec![paths[2].clone()],
            dir: paths[0].parent().map(Path::to_path_buf),
        },
    })
}

/// A file of a resolved HF model beside config.json (`1_Pooling/config.json`, say), fetched from
/// the hub cache or downloaded when the model came from the hub. `None` when it does not exist.
pub fn sibling(files: &ModelFiles, rel: &str) -> Option<PathBuf> {
    match files {
        ModelFiles::Hf {
            dir: Some(d), name, ..
        } => {
            let p = d.join(rel);
            if p.is_file() {
                return Some(p);
            }
            if looks_like_hub_id(name) {
                let cache = hf_hub::Cache::from_env();
                if let Some(p) = cache.model(name.clone()).get(rel) {
                    return Some(p);
                }
                let api = hf_hub::api::sync::ApiBuilder::from_env()
                    .with_progress(false)
                    .build()
                    .ok()?;
                return api.model(name.clone()).get(rel).ok();
            }
            None
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_model_names_every_place() {
        let e = format!("{:#}", resolve("no/such-model-xyz").unwrap_err());
        assert!(e.contains("model 'no/such-model-xyz' not found"), "{e}");
        assert!(e.contains("no such file or folder"), "{e}");
        assert!(e.contains("hub"), "{e}");
    }

    #[test]
    fn local_folder_lists_missing_files() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("config.json"), "{}").unwrap();
        let arg = dir.path().to_string_lossy().into_owned();
        let e = format!("{:#}", resolve(&arg).unwrap_err());
        assert!(e.contains("lacks *.safetensors, tokenizer.json"), "{e}");
    }

    #[test]
    fn hub_ids() {
        assert!(looks_like_hub_id("sentence-transformers/all-MiniLM-L6-v2"));
        assert!(looks_like_hub_id("owner/repo:file.gguf"));
        assert!(!looks_like_hub_id("models/a/b"));
        assert!(!looks_like_hub_id("plain"));
    }
}
