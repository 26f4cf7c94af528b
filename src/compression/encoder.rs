//! The REFRAG chunk encoder: a BERT-family model pooled per chunk (`c_i`), then the projector
//! (`e_i = phi(c_i)`) into the decoder's embedding space. Weights come from the encoder model
//! itself, or from a weights directory (`--load_dir`) written by training; a fresh projector is
//! seeded and announced on stderr as untrained.

use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{VarBuilder, VarMap};
use sha2::{Digest, Sha256};

use crate::compression::projector::{Projector, ProjectorConfig};
use crate::decoder::Decoder;
use crate::hub::{self, ModelFiles};
use crate::io::checkpoint::{self, RefragConfig};
use crate::io::weights::{model_key, recorded_or_default};
use crate::retrieval::embed::{BertEmbedder, Pooling};

/// Pooling of the chunk encoder when nothing says otherwise. all-MiniLM-L6-v2 was trained for
/// mean pooling, so an untrained projector sees more of the chunk's content through it than
/// through the CLS state.
pub const DEFAULT_POOLING: Pooling = Pooling::Mean;

/// Chunk encoder plus projector.
pub struct ChunkEncoder {
    bert: BertEmbedder,
    projector: Projector,
    projector_cfg: ProjectorConfig,
    /// Variables of the projector (trainable).
    pub projector_vars: VarMap,
    /// Whether the projector came from trained weights.
    pub trained: bool,
    /// Identity of the encoder weights, for the chunk cache: model name, pooling and a digest of
    /// trained encoder weights when they came from a weights directory.
    pub fingerprint: String,
}

impl ChunkEncoder {
    /// Load the encoder `enc_arg` (or the one recorded in `load_dir`), and the projector from
    /// `load_dir` when it holds one, else a fresh seeded projector sized for `decoder`.
    pub fn load(
        enc_arg: Option<&str>,
        load_dir: Option<&Path>,
        decoder: &Decoder,
        seed: u64,
        device: &Device,
    ) -> Result<Self> {
        let cfg = load_dir.map(RefragConfig::read).transpose()?;
        let enc_name = match (enc_arg, &cfg) {
            (Some(e), Some(c)) if model_key(e) != model_key(&c.encoder_model) => bail!(
                "--enc {e} differs from the encoder the weights in --load_dir were trained from ({})",
                c.encoder_model
            ),
            (Some(e), _) => e.to_string(),
            (None, Some(c)) => recorded_or_default(&c.encoder_model, hub::Role::Encoder),
            (None, None) => hub::model_arg(None, hub::Role::Encoder),
        };
        let mut files = hub::resolve(&enc_name)?;
        let pooling = match &cfg {
            Some(c) => parse_pooling(&c.encoder_pooling)?,
            None => DEFAULT_POOLING,
        };
        let mut fingerprint = format!("{enc_name}|{pooling}");
        if let (Some(dir), Some(c)) = (load_dir, &cfg) {
            if c.has("encoder") {
                let path = checkpoint::part_path(dir, "encoder");
                fingerprint.push_str(&format!("|{}", file_digest(&path)?));
                // The trained file's tensors override the base model's; tensors it leaves out
                // (frozen in training, such as the token-embedding table) come from the base.
                if let ModelFiles::Hf { weights, .. } = &mut files {
                    weights.push(path);
                }
            }
        }
        let bert = BertEmbedder::load(&files, device)?
            .with_int8(false)
            .with_pooling(pooling)
            .with_normalize(false);
        let projector_cfg = ProjectorConfig {
            in_dim: bert.dim(),
            hidden: decoder.hidden_size(),
            out_dim: decoder.hidden_size(),
        };
        let vars = VarMap::new();
        let trained = match (load_dir, &cfg) {
            (Some(dir), Some(c)) if c.has("projector") => {
                if c.projector != projector_cfg {
                    bail!(
                        "--load_dir {}: projector {:?} does not fit encoder width {} and decoder width {}",
                        dir.display(),
                        c.projector,
                        bert.dim(),
                        decoder.hidden_size()
                    );
                }
                Projector::init_vars(&vars, "", &projector_cfg, 1.0, seed, device)?;
                checkpoint::load_varmap_strict(
                    &vars,
                    &checkpoint::part_path(dir, "projector"),
                    device,
                )?;
                true
            }
            _ => {
                let std = embedding_std(decoder)?;
                Projector::init_vars(&vars, "", &projector_cfg, std, seed, device)?;
                eprintln!("refrag: the projector is untrained (seeded random weights); train it with cpt_recon / cpt_next and pass --load_dir");
                false
            }
        };
        let projector = Projector::new(
            &projector_cfg,
            VarBuilder::from_varmap(&vars, DType::F32, device),
        )?;
        Ok(Self {
            bert,
            projector,
            projector_cfg,
            projector_vars: vars,
            trained,
            fingerprint,
        })
    }

    /// Pooled encoder states `c_i`, `(n, h)` f32, of chunk texts (in batches of `batch`).
    pub fn encode(&self, texts: &[&str], batch: usize) -> Result<Tensor> {
        let h = self.bert.dim();
        if texts.is_empty() {
            return Ok(Tensor::zeros((0, h), DType::F32, self.bert.device())?);
        }
        let flat = self.bert.embed_all(texts, batch, |_| {})?;
        Ok(Tensor::from_vec(
            flat,
            (texts.len(), h),
            self.bert.device(),
        )?)
    }

    /// Projected chunk embeddings `e_i`, `(n, d)`.
    pub fn project(&self, c: &Tensor) -> Result<Tensor> {
        Ok(self.projector.forward(&c.to_dtype(DType::F32)?)?)
    }

    /// Encoder width `h`.
    pub fn dim(&self) -> usize {
        self.bert.dim()
    }

    pub fn pooling(&self) -> Pooling {
        self.bert.pooling()
    }

    pub fn projector_config(&self) -> ProjectorConfig {
        self.projector_cfg
    }

    pub fn model_name(&self) -> &str {
        self.bert.model_name()
    }
}

/// Root-mean-square of the decoder's token embeddings (over the first 4096 ids), the scale a
/// fresh projector's output is given.
pub fn embedding_std(decoder: &Decoder) -> Result<f64> {
    let n = decoder.config().vocab_size.min(4096) as u32;
    let ids = Tensor::arange(0u32, n, decoder.device())?.unsqueeze(0)?;
    let e = decoder.embed(&ids)?.to_dtype(DType::F32)?;
    Ok(f64::from(e.sqr()?.mean_all()?.sqrt()?.to_scalar::<f32>()?))
}

/// Short hex digest of a file's bytes.
fn file_digest(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let d = Sha256::digest(&bytes);
    Ok(d.iter().take(8).map(|b| format!("{b:02x}")).collect())
}

/// `cls`, `mean`, `seg4` or `seg8`.
pub fn parse_pooling(s: &str) -> Result<Pooling> {
    match s {
        "cls" => Ok(Pooling::Cls),
        "mean" => Ok(Pooling::Mean),
        "seg4" => Ok(Pooling::Seg4),
        "seg8" => Ok(Pooling::Seg8),
        other => bail!("unknown pooling '{other}' (expected cls, mean, seg4 or seg8)"),
    }
}
