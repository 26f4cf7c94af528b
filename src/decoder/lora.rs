//! Low-rank adapters (LoRA) for the decoder: what a training run fine-tunes instead of the whole
//! decoder, so a trained decoder is a few megabytes (its adapter) on top of the unchanged base
//! model, and the optimiser keeps moments for those few parameters only. At inference the
//! adapter is merged into dense weights (no extra cost) or runs beside quantized ones.

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// Every projection of a Llama block.
pub const ALL_TARGETS: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// Shape of an adapter, recorded in a checkpoint's `config.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraConfig {
    pub rank: usize,
    /// The update is scaled by `alpha / rank`.
    pub alpha: f64,
    /// Projection names (`q_proj`, ..., `down_proj`).
    pub targets: Vec<String>,
    /// Seed of the adapters' initial `A` matrices.
    #[serde(default)]
    pub seed: u64,
}

impl LoraConfig {
    /// Rank `rank` on every projection, `alpha = 2 rank`.
    pub fn all(rank: usize, seed: u64) -> Self {
        Self {
            rank,
            alpha: 2.0 * rank as f64,
            targets: ALL_TARGETS.iter().map(|t| t.to_string()).collect(),
            seed,
        }
    }

    pub fn scale(&self) -> f64 {
        self.alpha / self.rank as f64
    }

    pub fn check(&self) -> Result<()> {
        if self.rank == 0 {
            bail!("LoRA rank must be at least 1");
        }
        if let Some(t) = self
            .targets
            .iter()
            .find(|t| !ALL_TARGETS.contains(&t.as_str()))
        {
            bail!("LoRA target '{t}' is not one of {}", ALL_TARGETS.join(", "));
        }
        Ok(())
    }
}

/// A saved adapter (`decoder_lora.safetensors`) as variables, in f32 on `device`, ready for
/// [`crate::decoder::Decoder::add_lora`].
pub fn load_vars(path: &std::path::Path, device: &Device) -> Result<VarMap> {
    use anyhow::Context;
    let file = candle_core::safetensors::load(path, device)
        .with_context(|| format!("reading {}", path.display()))?;
    let vars = VarMap::new();
    {
        let mut data = vars.data().lock().unwrap();
        for (name, t) in file {
            data.insert(name, Var::from_tensor(&t.to_dtype(DType::F32)?)?);
        }
    }
    Ok(vars)
}

/// The variable `name` of `vars`, created with `init` (seeded uniform in `[-bound, bound]` from
/// a generator keyed by the name, or zero) when absent.
pub(crate) fn lora_var(
    vars: &VarMap,
    name: &str,
    shape: (usize, usize),
    bound: Option<f64>,
    seed: u64,
    device: &Device,
) -> Result<Tensor> {
    let mut data = vars.data().lock().unwrap();
    if let Some(v) = data.get(name) {
        if v.dims() != [shape.0, shape.1] {
            bail!(
                "LoRA tensor '{name}' has shape {:?}, the decoder needs {:?}",
                v.dims(),
                shape
            );
        }
        return Ok(v.as_tensor().clone());
    }
    let t = match bound {
        Some(b) => {
            let mut h = seed;
            for byte in name.bytes() {
                h = h
                    .wrapping_mul(0x100_0000_01b3)
                    .wrapping_add(u64::from(byte));
            }
            let mut rng = ChaCha8Rng::seed_from_u64(h);
            crate::compression::projector::uniform(&mut rng, shape, b, device)?
        }
        None => Tensor::zeros(shape, DType::F32, device)?,
    };
    let v = Var::from_tensor(&t)?;
    let out = v.as_tensor().clone();
    data.insert(name.to_string(), v);
    Ok(out)
}
