//! Retrieval embeddings: a BERT-family model, pooled per its `1_Pooling/config.json`, L2-normalised.
//!
//! [`BertEmbedder`] is the retrieval model (`index`, `search`, every command that retrieves). The
//! lower level is public for the REFRAG chunk encoder, which runs the same BERT loading: read the
//! config ([`read_config`]), the tokenizer ([`load_tokenizer`]), tokenize ([`BertEmbedder::tokenize`]),
//! run the encoder ([`BertEmbedder::hidden_states`]) and pool ([`pool`]).

use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, IndexOp, Tensor, D};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config};
use serde::{Deserialize, Serialize};
use tokenizers::{Encoding, Tokenizer, TruncationParams};

use crate::hub::{self, ModelFiles};
use crate::kernels::{blas, igemm};

/// How token states become one vector per text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Pooling {
    /// Mean over the real (non-padding) tokens, `[CLS]` and `[SEP]` included, as
    /// sentence-transformers does.
    #[default]
    Mean,
    /// The first token's (`[CLS]`) state.
    Cls,
    /// The real tokens cut into 4 contiguous runs of (nearly) equal length, each averaged, the
    /// four means side by side: `4 x hidden` values that keep the order of the text's parts,
    /// which one mean loses (a chunk encoder's pooling; never a retrieval model's).
    Seg4,
    /// As `Seg4`, in 8 runs.
    Seg8,
}

impl Pooling {
    /// How many vectors of the model's width one pooled text takes.
    pub fn segments(self) -> usize {
        match self {
            Pooling::Mean | Pooling::Cls => 1,
            Pooling::Seg4 => 4,
            Pooling::Seg8 => 8,
        }
    }
}

impl std::fmt::Display for Pooling {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Pooling::Mean => "mean",
            Pooling::Cls => "cls",
            Pooling::Seg4 => "seg4",
            Pooling::Seg8 => "seg8",
        })
    }
}

/// The fields of a sentence-transformers `1_Pooling/config.json` that we read.
#[derive(Debug, Deserialize)]
struct PoolingConfig {
    #[serde(default)]
    pooling_mode_cls_token: bool,
    #[serde(default)]
    pooling_mode_mean_tokens: bool,
    #[serde(default)]
    pooling_mode_max_tokens: bool,
    #[serde(default)]
    pooling_mode_mean_sqrt_len_tokens: bool,
}

/// The pooling a model asks for in `1_Pooling/config.json`; mean when the file is absent.
pub fn read_pooling(files: &ModelFiles) -> Result<Pooling> {
    let Some(path) = hub::sibling(files, "1_Pooling/config.json") else {
        return Ok(Pooling::Mean);
    };
    let cfg: PoolingConfig = crate::io::jsonio::read_json(&path)?;
    if cfg.pooling_mode_max_tokens || cfg.pooling_mode_mean_sqrt_len_tokens {
        bail!(
            "{}: max and mean-sqrt-len pooling are not supported (use mean or cls)",
            path.display()
        );
    }
    match (cfg.pooling_mode_cls_token, cfg.pooling_mode_mean_tokens) {
        (true, false) => Ok(Pooling::Cls),
        (false, true) => Ok(Pooling::Mean),
        _ => bail!(
            "{}: exactly one of pooling_mode_cls_token and pooling_mode_mean_tokens must be true",
            path.display()
        ),
    }
}

/// Pool token states `(b, s, d)` with an attention mask `(b, s)` (1 = token, 0 = padding, any
/// dtype; real tokens first) into `(b, d * pooling.segments())` in f32.
pub fn pool(hidden: &Tensor, mask: &Tensor, pooling: Pooling) -> candle_core::Result<Tensor> {
    let hidden = hidden.to_dtype(DType::F32)?;
    match pooling {
        Pooling::Cls => hidden.i((.., 0, ..))?.contiguous(),
        Pooling::Mean => {
            let mask = mask.to_dtype(DType::F32)?.unsqueeze(D::Minus1)?; // (b, s, 1)
            let summed = hidden.broadcast_mul(&mask)?.sum(1)?; // (b, d)
            let counts = mask.sum(1)?.clamp(1e-9f32, f32::MAX)?; // (b, 1)
            summed.broadcast_div(&counts)
        }
        Pooling::Seg4 | Pooling::Seg8 => {
            let (b, s, d) = hidden.dims3()?;
            let n = pooling.segments();
            let lens: Vec<f32> = mask.to_dtype(DType::F32)?.sum(1)?.to_vec1()?;
            let weights = segment_weights(&lens, n, s);
            let w = Tensor::from_vec(weights, (b, n, s), hidden.device())?;
            w.matmul(&hidden.contiguous()?)?.reshape((b, n * d))
        }
    }
}

/// The averaging weights `(b, n, s)` of segment pooling: row `j` of text `t` (of `lens[t]` real
/// tokens) weighs its `j`-th run of tokens `[j len / n, (j + 1) len / n)` evenly; a run that
/// would be empty (a text shorter than `n` tokens) takes the token where it starts.
fn segment_weights(lens: &[f32], n: usize, s: usize) -> Vec<f32> {
    let mut w = vec![0f32; lens.len() * n * s];
    for (t, &len) in lens.iter().enumerate() {
        let len = (len.round() as usize).clamp(1, s);
        for j in 0..n {
            let a = (j * len / n).min(len - 1);
            let e = ((j + 1) * len / n).clamp(a + 1, len);
            let row = &mut w[(t * n + j) * s..(t * n + j + 1) * s];
            row[a..e].fill(1.0 / (e - a) as f32);
        }
    }
    w
}

/// Scale each row of `(b, d)` to unit L2 norm (rows of zeros stay zero).
pub fn l2_normalize(x: &Tensor) -> candle_core::Result<Tensor> {
    let norm = x
        .sqr()?
        .sum_keepdim(D::Minus1)?
        .sqrt()?
        .clamp(1e-12f32, f32::MAX)?;
    x.broadcast_div(&norm)
}

/// Read and parse a BERT `config.json`.
pub fn read_config(path: &Path) -> Result<Config> {
    crate::io::jsonio::read_json(path)
        .with_context(|| format!("reading BERT config {}", path.display()))
}

/// Tokens per text the model sees: sentence-transformers' `max_seq_length` when
/// `sentence_bert_config.json` gives one, else the model's position limit.
pub fn max_seq_len(files: &ModelFiles, config: &Config) -> Result<usize> {
    #[derive(Deserialize)]
    struct SbertConfig {
        max_seq_length: Option<usize>,
    }
    let limit = config.max_position_embeddings;
    let Some(path) = hub::sibling(files, "sentence_bert_config.json") else {
        return Ok(limit);
    };
    let cfg: SbertConfig = crate::io::jsonio::read_json(&path)?;
    Ok(cfg.max_seq_length.map_or(limit, |m| m.min(limit)))
}

/// Load `tokenizer.json`, truncating to `max_len` tokens and without padding (batches are padded
/// by [`BertEmbedder::tokenize`]).
pub fn load_tokenizer(path: &Path, max_len: usize) -> Result<Tokenizer> {
    let mut tok = crate::decoder::tokenizer_from_file(path)?;
    tok.with_padding(None);
    tok.with_truncation(Some(TruncationParams {
        max_length: max_len,
        ..Default::default()
    }))
    .map_err(anyhow::Error::msg)?;
    Ok(tok)
}

/// A padded token batch: `ids`, `type_ids` and `mask` are `(b, s)` u32.
#[derive(Debug, Clone)]
pub struct TokenBatch {
    pub ids: Tensor,
    pub type_ids: Tensor,
    pub mask: Tensor,
}

impl TokenBatch {
    /// Pad encodings to the longest one (`pad_id`, mask 0) and move them to `device`.
    pub fn from_encodings(
        encodings: &[&Encoding],
        pad_id: u32,
        device: &Device,
    ) -> candle_core::Result<Self> {
        let b = encodings.len();
        let s = encodings.iter().map(|e| e.len()).max().unwrap_or(0).max(1);
        let mut ids = vec![pad_id; b * s];
        let mut type_ids = vec![0u32; b * s];
        let mut mask = vec![0u32; b * s];
        for (row, e) in encodings.iter().enumerate() {
            let at = row * s;
            ids[at..at + e.len()].copy_from_slice(e.get_ids());
            type_ids[at..at + e.len()].copy_from_slice(e.get_type_ids());
            mask[at..at + e.len()].fill(1);
        }
        Ok(Self {
            ids: Tensor::from_vec(ids, (b, s), device)?,
            type_ids: Tensor::from_vec(type_ids, (b, s), device)?,
            mask: Tensor::from_vec(mask, (b, s), device)?,
        })
    }
}

/// Safetensors weights with every linear layer's `(out, in)` weight stored transposed in memory,
/// so that `Linear`'s `x @ w.t()` hands the CPU matmul a contiguous right-hand side (about 1.5x
/// faster than the strided one with candle's gemm). Shapes and values are unchanged.
struct CpuLayout(candle_core::safetensors::MmapedSafetensors);

impl CpuLayout {
    fn relayout(name: &str, t: Tensor) -> candle_core::Result<Tensor> {
        let linear = name.ends_with(".weight")
            && t.rank() == 2
            && !name.contains("embeddings")
            && !name.contains("LayerNorm");
        if linear {
            t.t()?.contiguous()?.t()
        } else {
            Ok(t)
        }
    }
}

impl candle_nn::var_builder::SimpleBackend for CpuLayout {
    fn get(
        &self,
        s: candle_core::Shape,
        name: &str,
        h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let backend: &dyn candle_nn::var_builder::SimpleBackend = &self.0;
        Self::relayout(name, backend.get(s, name, h, dtype, dev)?)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let backend: &dyn candle_nn::var_builder::SimpleBackend = &self.0;
        Self::relayout(name, backend.get_unchecked(name, dtype, dev)?)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        candle_nn::var_builder::SimpleBackend::contains_tensor(&self.0, name)
    }
}

/// The network behind a [`BertEmbedder`]: on the CPU in f32 the BLAS-backed BERT of
/// [`crate::train::bert`] (fused LayerNorm, GELU and attention over the real tokens only); on
/// other devices and dtypes candle-transformers' `BertModel`. The same maths and weights.
enum Network {
    Blas(crate::train::bert::TrainBert),
    Candle(BertModel),
}

/// Whether BERT inference on the CPU in f32 runs the BLAS network, from `REFRAG_BERT`: `blas`
/// (the default) or `candle` (candle-transformers' `BertModel`, the reference it is measured
/// against by `examples/embed_bench.rs`).
fn blas_network() -> Result<bool> {
    match std::env::var("REFRAG_BERT").as_deref() {
        Err(_) | Ok("blas") => Ok(true),
        Ok("candle") => Ok(false),
        Ok(other) => bail!("REFRAG_BERT={other}: expected blas or candle"),
    }
}

/// Whether [`BertEmbedder::load`] runs the linear layers in 8 bits: with `REFRAG_BERT_INT8=1`
/// where the CPU has AVX-512 VNNI ([`igemm::available`]; elsewhere the integer products would be
/// slower than f32). Off by default: the 8-bit embeddings reorder near-tied passages, which
/// moved answers on `rag_test` (top-n full 0.575 -> 0.525 EM, full context 0.500 -> 0.375).
fn int8_default() -> Result<bool> {
    match std::env::var("REFRAG_BERT_INT8").as_deref() {
        Ok("1") => Ok(igemm::available()),
        Err(_) | Ok("0") => Ok(false),
        Ok(other) => bail!("REFRAG_BERT_INT8={other}: expected 0 or 1"),
    }
}

/// A BERT-family sentence embedder: tokenizer + encoder + pooling (+ L2 normalisation).
pub struct BertEmbedder {
    model: Network,
    config: Config,
    tokenizer: Tokenizer,
    pooling: Pooling,
    normalize: bool,
    name: String,
    device: Device,
}

impl BertEmbedder {
    /// Load a Hugging Face BERT folder in f32 (weights memory-mapped), with the pooling of its
    /// `1_Pooling/config.json` and L2 normalisation (the linear layers in 8 bits with
    /// `REFRAG_BERT_INT8=1` where the CPU has VNNI, [`BertEmbedder::with_int8`]).
    pub fn load(files: &ModelFiles, device: &Device) -> Result<Self> {
        Self::load_with(files, device, DType::F32)
    }

    /// [`BertEmbedder::load`] in another float type (pooling always returns f32).
    pub fn load_with(files: &ModelFiles, device: &Device, dtype: DType) -> Result<Self> {
        let ModelFiles::Hf {
            name,
            config,
            weights,
            tokenizer,
            ..
        } = files
        else {
            bail!(
                "embedding model '{}' is a GGUF file; the retrieval model must be a BERT-family Hugging Face folder",
                files.name()
            );
        };
        let cfg = read_config(config)?;
        let tok = load_tokenizer(tokenizer, max_seq_len(files, &cfg)?)?;
        // SAFETY: the weights are memory-mapped read-only; the files must not change while mapped.
        let st = unsafe { candle_core::safetensors::MmapedSafetensors::multi(weights) }
            .with_context(|| format!("reading weights of '{name}'"))?;
        let context = || format!("loading '{name}' as a BERT model ({})", config.display());
        let model = if device.is_cpu() && dtype == DType::F32 && blas_network()? {
            let vb = VarBuilder::from_backend(Box::new(st), dtype, device.clone());
            // Tensors named as in BertModel (`embeddings.*`), or under the model type
            // (`bert.embeddings.*`), as BertModel::load also accepts.
            let vb = match &cfg.model_type {
                Some(t) if !vb.contains_tensor("embeddings.word_embeddings.weight") => vb.pp(t),
                _ => vb,
            };
            Network::Blas(crate::train::bert::TrainBert::new(&cfg, vb).with_context(context)?)
        } else if device.is_cpu() {
            let vb = VarBuilder::from_backend(Box::new(CpuLayout(st)), dtype, device.clone());
            Network::Candle(BertModel::load(vb, &cfg).with_context(context)?)
        } else {
            let vb = VarBuilder::from_backend(Box::new(st), dtype, device.clone());
            Network::Candle(BertModel::load(vb, &cfg).with_context(context)?)
        };
        let me = Self {
            model,
            config: cfg,
            tokenizer: tok,
            pooling: read_pooling(files)?,
            normalize: true,
            name: name.clone(),
            device: device.clone(),
        };
        Ok(me.with_int8(int8_default()?))
    }

    /// Run the encoder's linear layers in 8-bit integers (`on`) or f32. Only the BLAS network
    /// (CPU, f32) has an 8-bit path; elsewhere this changes nothing. `index --int8` runs the
    /// retrieval model in 8 bits where the CPU has VNNI: about 2x the passages per second of f32
    /// (`refrag index` on a 2-core Xeon), its embeddings at cosine 0.9986 of the f32 ones
    /// (MiniLM-L6, mean over 3,000 passages), so near-tied passages may swap ranks. A model
    /// whose outputs must match training's (the chunk encoder) keeps it off. Turning it on
    /// where the CPU lacks VNNI runs the portable integer loop (the same numbers, slowly: for
    /// tests).
    pub fn with_int8(mut self, on: bool) -> Self {
        if let Network::Blas(m) = &mut self.model {
            m.set_int8(on);
        }
        self
    }

    /// [`BertEmbedder::with_int8`] where the CPU has the fast 8-bit path, f32 elsewhere (`want`
    /// false, or no AVX-512 VNNI): how the retrieval model picks its precision.
    pub fn with_int8_where_fast(self, want: bool) -> Self {
        self.with_int8(want && igemm::available())
    }

    /// Whether the linear layers run in 8 bits ([`BertEmbedder::with_int8`]).
    pub fn int8(&self) -> bool {
        matches!(&self.model, Network::Blas(m) if m.int8())
    }

    /// Override the pooling (the chunk encoder may pool by CLS).
    pub fn with_pooling(mut self, pooling: Pooling) -> Self {
        self.pooling = pooling;
        self
    }

    /// Turn L2 normalisation on or off.
    pub fn with_normalize(mut self, normalize: bool) -> Self {
        self.normalize = normalize;
        self
    }

    /// Embedding width (the model's hidden size, times the pooling's segments).
    pub fn dim(&self) -> usize {
        self.config.hidden_size * self.pooling.segments()
    }

    pub fn pooling(&self) -> Pooling {
        self.pooling
    }

    pub fn normalize(&self) -> bool {
        self.normalize
    }

    /// The model name as given (path or hub id).
    pub fn model_name(&self) -> &str {
        &self.name
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Tokenize (with `[CLS]`/`[SEP]`, truncated) without padding.
    pub fn encode(&self, texts: &[&str]) -> Result<Vec<Encoding>> {
        self.tokenizer
            .encode_batch(texts.to_vec(), true)
            .map_err(anyhow::Error::msg)
            .context("tokenizing")
    }

    /// Tokenize and pad into one batch on the model's device.
    pub fn tokenize(&self, texts: &[&str]) -> Result<TokenBatch> {
        let enc = self.encode(texts)?;
        let refs: Vec<&Encoding> = enc.iter().collect();
        Ok(TokenBatch::from_encodings(
            &refs,
            self.config.pad_token_id as u32,
            &self.device,
        )?)
    }

    /// Last-layer token states `(b, s, hidden)`.
    pub fn hidden_states(&self, batch: &TokenBatch) -> candle_core::Result<Tensor> {
        match &self.model {
            Network::Blas(m) => m.forward(&batch.ids, &batch.type_ids, &batch.mask),
            Network::Candle(m) => m.forward(&batch.ids, &batch.type_ids, Some(&batch.mask)),
        }
    }

    /// Pooled (and normalised) embeddings `(b, dim)` in f32 of one token batch.
    pub fn embed_tokens(&self, batch: &TokenBatch) -> candle_core::Result<Tensor> {
        let hidden = self.hidden_states(batch)?;
        let pooled = pool(&hidden, &batch.mask, self.pooling)?;
        if self.normalize {
            l2_normalize(&pooled)
        } else {
            Ok(pooled)
        }
    }

    /// Embed texts as one batch.
    pub fn embed(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>> {
        if texts.is_empty() {
            return Ok(Vec::new());
        }
        let batch = self.tokenize(texts)?;
        Ok(self.embed_tokens(&batch)?.to_vec2::<f32>()?)
    }

    /// Embed many texts in batches of `batch_size`, sorted by token length so that little is
    /// padded; returns row-major `(n, dim)` in the input order. `progress` gets the number of texts
    /// done after each batch. On the BLAS network the batches run side by side, one per BLAS
    /// thread, each product on its worker's thread ([`blas::threads`]): the same numbers as one
    /// by one, and about 1.6x the passages per second on two cores.
    pub fn embed_all(
        &self,
        texts: &[&str],
        batch_size: usize,
        mut progress: impl FnMut(usize),
    ) -> Result<Vec<f32>> {
        let encodings = self.encode(texts)?;
        let mut order: Vec<usize> = (0..texts.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(encodings[i].len()));
        let batches: Vec<&[usize]> = order.chunks(batch_size.max(1)).collect();
        let dim = self.dim();
        let mut out = vec![0f32; texts.len() * dim];
        let mut place = |chunk: &[usize], rows: Vec<Vec<f32>>| {
            for (&i, row) in chunk.iter().zip(rows) {
                out[i * dim..(i + 1) * dim].copy_from_slice(&row);
            }
            progress(chunk.len());
        };
        let embed = |chunk: &[usize]| -> Result<Vec<Vec<f32>>> {
            let refs: Vec<&Encoding> = chunk.iter().map(|&i| &encodings[i]).collect();
            let batch =
                TokenBatch::from_encodings(&refs, self.config.pad_token_id as u32, &self.device)?;
            Ok(self.embed_tokens(&batch)?.to_vec2::<f32>()?)
        };
        if !matches!(self.model, Network::Blas(_)) {
            for chunk in batches {
                place(chunk, embed(chunk)?);
            }
            return Ok(out);
        }
        blas::threads::side_by_side(
            batches.len(),
            |b| embed(batches[b]),
            |b, rows| {
                place(batches[b], rows?);
                Ok(())
            },
        )?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    #[test]
    fn segment_pooling_averages_runs_in_order_and_ignores_padding() {
        let dev = Device::Cpu;
        // Row 0: 10 real tokens, state of token i = (i, -i); row 1: 2 real tokens, then junk.
        let mut v = Vec::new();
        for i in 0..10 {
            v.extend([i as f32, -(i as f32)]);
        }
        for i in 0..10 {
            v.extend(if i < 2 {
                [10. + i as f32, 0.]
            } else {
                [999., 999.]
            });
        }
        let hidden = Tensor::from_vec(v, (2, 10, 2), &dev).unwrap();
        let mut m = vec![1u32; 10];
        m.extend([1, 1, 0, 0, 0, 0, 0, 0, 0, 0]);
        let mask = Tensor::from_vec(m, (2, 10), &dev).unwrap();
        let p = pool(&hidden, &mask, Pooling::Seg4)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        // Runs of row 0: [0, 2), [2, 5), [5, 7), [7, 10).
        let want0 = [0.5f32, -0.5, 3., -3., 5.5, -5.5, 8., -8.];
        assert!(max_abs_diff(&p[0], &want0) < 1e-6, "{:?}", p[0]);
        // Row 1 is shorter than the runs: each run takes the token where it starts.
        let want1 = [10f32, 0., 10., 0., 11., 0., 11., 0.];
        assert!(max_abs_diff(&p[1], &want1) < 1e-6, "{:?}", p[1]);
        // The mean of equal runs is the mean pooling.
        let h8 = hidden.narrow(1, 0, 8).unwrap();
        let m8 = Tensor::ones((2, 8), DType::U32, &dev).unwrap();
        let seg = pool(&h8, &m8, Pooling::Seg8)
            .unwrap()
            .reshape((2, 8, 2))
            .unwrap();
        let mean = pool(&h8, &m8, Pooling::Mean).unwrap();
        let diff = (seg.mean(1).unwrap() - mean).unwrap().abs().unwrap();
        assert!(diff.max_all().unwrap().to_scalar::<f32>().unwrap() < 1e-5);
    }

    #[test]
    fn mean_pooling_ignores_padding() {
        let dev = Device::Cpu;
        // Two rows; the second has one real token and two padded positions holding junk.
        let hidden = Tensor::new(
            &[
                [[1f32, 2.], [3., 4.], [5., 6.]],
                [[2f32, 2.], [100., 100.], [-100., 7.]],
            ],
            &dev,
        )
        .unwrap();
        let mask = Tensor::new(&[[1u32, 1, 1], [1, 0, 0]], &dev).unwrap();
        let mean = pool(&hidden, &mask, Pooling::Mean)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert_eq!(mean, vec![vec![3., 4.], vec![2., 2.]]);
        let cls = pool(&hidden, &mask, Pooling::Cls)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert_eq!(cls, vec![vec![1., 2.], vec![2., 2.]]);
        let n = l2_normalize(&Tensor::new(&[[3f32, 4.]], &dev).unwrap()).unwrap();
        assert_eq!(n.to_vec2::<f32>().unwrap(), vec![vec![0.6, 0.8]]);
    }

    fn tiny(pooling: Option<&str>) -> (tempfile::TempDir, BertEmbedder) {
        let dir = tempfile::tempdir().unwrap();
        crate::testing::bert::write_tiny_bert(dir.path(), 7, pooling).unwrap();
        let files = hub::resolve(dir.path().to_str().unwrap()).unwrap();
        let e = BertEmbedder::load(&files, &Device::Cpu).unwrap();
        (dir, e)
    }

    #[test]
    fn batch_equals_one_by_one() {
        let cases = [(Some("mean"), false), (Some("cls"), false), (None, true)];
        // In 8 bits too: each token is quantized over its own range, so a text's rows do not
        // depend on the others in its batch.
        for ((pooling, seg), int8) in cases.into_iter().flat_map(|c| [(c, false), (c, true)]) {
            let (_dir, e) = tiny(pooling);
            let e = e.with_int8(int8);
            assert_eq!(e.int8(), int8);
            // Segment pooling, as the chunk encoder may pool (the runs follow each text's own
            // length, not the batch's padded one).
            let e = if seg {
                e.with_pooling(Pooling::Seg8)
            } else {
                e
            };
            assert_eq!(e.dim(), e.config().hidden_size * if seg { 8 } else { 1 });
            let texts = [
                "City_7 lies on River_003.",
                "a much longer passage about the history of city_12 and its many rivers and bridges",
                "x",
                "Alloy_1 melts at 903 degrees.",
            ];
            let batch = e.embed(&texts).unwrap();
            for (t, row) in texts.iter().zip(&batch) {
                let one = &e.embed(&[t]).unwrap()[0];
                assert!(max_abs_diff(one, row) < 1e-5, "{pooling:?} int8 {int8} {t}");
                let norm: f32 = row.iter().map(|x| x * x).sum::<f32>().sqrt();
                assert!((norm - 1.0).abs() < 1e-5);
            }
            // Several batches (side by side where the BLAS has threads to give): rows in input
            // order, every text counted once.
            for size in [1, 3] {
                let mut done = 0;
                let all = e.embed_all(&texts, size, |n| done += n).unwrap();
                assert!(max_abs_diff(&all, &batch.concat()) < 1e-5, "batch {size}");
                assert_eq!(done, texts.len());
            }
        }
    }

    #[test]
    fn int8_embeddings_are_close_to_f32() {
        let (dir, e) = tiny(Some("mean"));
        let files = hub::resolve(dir.path().to_str().unwrap()).unwrap();
        let f32e = BertEmbedder::load(&files, &Device::Cpu)
            .unwrap()
            .with_int8(false);
        let e = e.with_int8(true);
        let texts = [
            "City_7 lies on River_003.",
            "a much longer passage about the history of city_12 and its many rivers and bridges",
            "x",
            "which university was person_3 in? the event of 1871 was founded there.",
        ];
        let (a, b) = (e.embed(&texts).unwrap(), f32e.embed(&texts).unwrap());
        for (t, (a, b)) in texts.iter().zip(a.iter().zip(&b)) {
            let cos: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
            assert!(cos > 0.99, "{t}: cosine {cos}");
            assert!(max_abs_diff(a, b) > 0.0, "{t}: the 8-bit path did not run");
        }
    }

    #[test]
    fn packed_layers_match_the_tensor_op_layers() {
        let (_dir, e) = tiny(Some("mean"));
        // The f32 packed layers (the 8-bit ones are compared with f32 above).
        let e = e.with_int8(false);
        let Network::Blas(m) = &e.model else {
            panic!("the CPU f32 embedder runs the BLAS network");
        };
        let texts = [
            "a much longer passage about the history of city_12 and its many rivers and bridges",
            "City_7 lies on River_003.",
            "x",
        ];
        let b = e.tokenize(&texts).unwrap();
        let packed = m.forward_with(&b.ids, &b.type_ids, &b.mask, true).unwrap();
        let plain = m.forward_with(&b.ids, &b.type_ids, &b.mask, false).unwrap();
        // Real rows agree; the packed path leaves padding rows zero (pooling masks them).
        let max_abs = |t: Tensor| -> f32 {
            t.abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        let real = b.mask.to_dtype(DType::F32).unwrap().unsqueeze(2).unwrap();
        let pad = (1.0 - &real).unwrap();
        let on = |t: &Tensor, m: &Tensor| t.broadcast_mul(m).unwrap();
        let diff = max_abs((on(&packed, &real) - on(&plain, &real)).unwrap());
        assert!(diff < 1e-5, "packed vs tensor ops: {diff}");
        assert_eq!(max_abs(on(&packed, &pad)), 0.0);
        assert!(max_abs(plain) > 0.1);
    }

    #[test]
    fn pooling_read_from_folder() {
        assert_eq!(tiny(Some("cls")).1.pooling(), Pooling::Cls);
        assert_eq!(tiny(Some("mean")).1.pooling(), Pooling::Mean);
        assert_eq!(tiny(None).1.pooling(), Pooling::Mean);
        assert_eq!(tiny(None).1.dim(), 32);
    }
}
