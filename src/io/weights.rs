//! The trained compressor shipped with refrag (`weights/` in the repository): found and used by
//! default when the models in use are the ones it was trained for, so a new user gets a
//! compressor that carries meaning without training one. `--load_dir` overrides it,
//! `--no_weights` opts out, `REFRAG_WEIGHTS` points elsewhere.

use std::path::{Path, PathBuf};

use anyhow::Result;

use crate::hub::{self, Role};
use crate::io::checkpoint::RefragConfig;

/// Environment variable naming a weights directory to use by default instead of `weights/`
/// (`none` disables the default).
pub const WEIGHTS_ENV: &str = "REFRAG_WEIGHTS";

/// Where shipped weights are looked for: `$REFRAG_WEIGHTS`, else `weights/` in the working
/// directory, else beside the sources this binary was built from.
pub fn candidates() -> Vec<PathBuf> {
    if let Ok(v) = std::env::var(WEIGHTS_ENV) {
        if v.is_empty() || v == "none" {
            return Vec::new();
        }
        return vec![PathBuf::from(v)];
    }
    let mut out = vec![PathBuf::from("weights")];
    let built = Path::new(env!("CARGO_MANIFEST_DIR")).join("weights");
    if std::fs::canonicalize(&built).ok() != std::fs::canonicalize(&out[0]).ok() {
        out.push(built);
    }
    out
}

/// A model argument reduced to what identifies the model: its last path component without a
/// `.gguf` extension, lower-cased (`models/SmolLM2-135M-Instruct.Q4_1.gguf` ->
/// `smollm2-135m-instruct.q4_1`; `sentence-transformers/all-MiniLM-L6-v2` -> `all-minilm-l6-v2`).
pub fn model_key(arg: &str) -> String {
    let last = arg
        .trim_end_matches(['/', '\\'])
        .rsplit(['/', '\\', ':'])
        .next()
        .unwrap_or(arg);
    last.strip_suffix(".gguf")
        .unwrap_or(last)
        .to_ascii_lowercase()
}

/// The weights directory a command uses: `--load_dir` when given; none with `--no_weights`;
/// else the first shipped directory trained for these models (said on stderr), if any.
pub fn resolve_load_dir(
    load_dir: Option<&Path>,
    no_weights: bool,
    enc: Option<&str>,
    dec: Option<&str>,
) -> Result<Option<PathBuf>> {
    if let Some(d) = load_dir {
        return Ok(Some(d.to_path_buf()));
    }
    if no_weights {
        return Ok(None);
    }
    let enc = hub::model_arg(enc, Role::Encoder);
    let dec = hub::model_arg(dec, Role::Decoder);
    for dir in candidates() {
        if !dir.join("config.json").is_file() {
            continue;
        }
        let cfg = RefragConfig::read(&dir)?;
        if matches(&cfg, &enc, &dec) {
            eprintln!(
                "refrag: using the shipped weights in {} ({} stage, k={}; --load_dir overrides, --no_weights opts out)",
                dir.display(),
                cfg.stage,
                cfg.k
            );
            return Ok(Some(dir));
        }
    }
    Ok(None)
}

/// The model a weights directory recorded (`recorded`), as this machine finds it: the default
/// model for `role` when it is the same model (the recorded path may be another machine's, or a
/// hub id where `models/` now holds the files), else the recorded argument itself.
pub fn recorded_or_default(recorded: &str, role: Role) -> String {
    let default = hub::model_arg(None, role);
    if model_key(&default) == model_key(recorded) {
        default
    } else {
        recorded.to_string()
    }
}

/// Whether `dir` was trained for exactly `enc` and `dec` (by [`model_key`]).
pub fn matches(cfg: &RefragConfig, enc: &str, dec: &str) -> bool {
    model_key(&cfg.encoder_model) == model_key(enc)
        && model_key(&cfg.decoder_model) == model_key(dec)
}

/// The decoder argument: `--dec`, else the one recorded in `--load_dir`, else the default.
pub fn decoder_arg(dec: Option<&str>, load_dir: Option<&Path>) -> Result<String> {
    if let Some(d) = dec {
        return Ok(d.to_string());
    }
    if let Some(dir) = load_dir {
        let recorded = RefragConfig::read(dir)?.decoder_model;
        return Ok(recorded_or_default(&recorded, Role::Decoder));
    }
    Ok(hub::model_arg(None, Role::Decoder))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_keys_ignore_folders_hub_owners_and_extension() {
        assert_eq!(
            model_key("models/SmolLM2-135M-Instruct.Q4_1.gguf"),
            "smollm2-135m-instruct.q4_1"
        );
        assert_eq!(
            model_key("/x/y/SmolLM2-135M-Instruct.Q4_1.gguf"),
            model_key("models/SmolLM2-135M-Instruct.Q4_1.gguf")
        );
        assert_eq!(
            model_key("sentence-transformers/all-MiniLM-L6-v2"),
            model_key("models/all-MiniLM-L6-v2/")
        );
        assert_ne!(
            model_key("HuggingFaceTB/SmolLM2-135M-Instruct"),
            model_key("models/SmolLM2-135M-Instruct.Q4_1.gguf")
        );
    }
}
