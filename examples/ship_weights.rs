//! Turn a training checkpoint into the shipped weights (`weights/`): every part in f16, the
//! encoder without the tensors training never changed (its token-embedding table, read back from
//! the base model at load time), no optimiser state, `config.json` last. Refuses to write more
//! than `--max_mb` in all.
//!
//! ```text
//! cargo run --release --example ship_weights -- --from runs/policy --to weights
//! ```

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use clap::Parser;
use refrag::io::checkpoint::{part_path, RefragConfig};

#[derive(Parser)]
struct Args {
    /// Checkpoint directory written by a training command.
    #[arg(long)]
    from: PathBuf,
    /// Output directory (created; its weight files and config.json are replaced).
    #[arg(long)]
    to: PathBuf,
    /// Largest total size allowed, in MB.
    #[arg(long = "max_mb", default_value_t = 32.0)]
    max_mb: f64,
}

fn main() -> Result<()> {
    let a = Args::parse();
    let cfg = RefragConfig::read(&a.from)?;
    std::fs::create_dir_all(&a.to).with_context(|| format!("creating {}", a.to.display()))?;
    let dev = Device::Cpu;
    let mut total = 0u64;
    for part in &cfg.parts {
        if part == "decoder" {
            bail!("{}: holds a fully fine-tuned decoder (hundreds of MB); ship a LoRA adapter instead", a.from.display());
        }
        let src = part_path(&a.from, part);
        let tensors = candle_core::safetensors::load(&src, &dev)
            .with_context(|| format!("reading {}", src.display()))?;
        let kept: HashMap<String, Tensor> = tensors
            .into_iter()
            .filter(|(name, _)| {
                !(part == "encoder" && name.ends_with(refrag::train::parts::FROZEN_ENCODER_SUFFIX))
            })
            .map(|(name, t)| Ok((name, t.to_dtype(DType::F16)?)))
            .collect::<Result<_>>()?;
        let dst = part_path(&a.to, part);
        let tmp = a.to.join(format!(".{part}.safetensors.tmp"));
        candle_core::safetensors::save(&kept, &tmp)?;
        std::fs::rename(&tmp, &dst)?;
        let size = std::fs::metadata(&dst)?.len();
        eprintln!(
            "ship_weights: {} ({} tensors, {:.1} MB)",
            dst.display(),
            kept.len(),
            size as f64 / 1e6
        );
        total += size;
    }
    if total as f64 / 1e6 > a.max_mb {
        bail!(
            "{:.1} MB in all, over --max_mb {}",
            total as f64 / 1e6,
            a.max_mb
        );
    }
    refrag::io::jsonio::write_json(&a.to.join("config.json"), &cfg)?;
    eprintln!(
        "ship_weights: {:.1} MB in all, config.json written",
        total as f64 / 1e6
    );
    Ok(())
}
