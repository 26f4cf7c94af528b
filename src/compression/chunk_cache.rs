//! The chunk cache beside an index (the paper's "cached" mode): for every passage, its chunks of
//! `k` decoder tokens, their encoder vectors `c_i`, and their perplexity-heuristic scores, so that
//! `generate` runs neither the encoder nor the decoder over retrieved passages before prefill.
//! The cache records which encoder (with trained weights' digest), pooling, decoder and `k` built
//! it; `generate` uses it only when all match.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::compression::encoder::ChunkEncoder;
use crate::compression::prompt::chunk_tokens;
use crate::decoder::{Decoder, DecoderTokenizer};
use crate::pipeline;

/// File names inside the index directory.
pub const CACHE_FILE: &str = "chunks.safetensors";
pub const META_FILE: &str = "chunks.json";

/// What built the cache.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkCacheMeta {
    pub encoder: String,
    pub decoder: String,
    pub k: usize,
    pub passages: usize,
    pub chunks: usize,
    pub dim: usize,
}

/// Chunks, vectors and scores of every passage of an index.
pub struct ChunkCache {
    pub meta: ChunkCacheMeta,
    chunk_offsets: Vec<u32>,
    token_offsets: Vec<u32>,
    tokens: Vec<u32>,
    vectors: Tensor,
    scores: Vec<f32>,
}

impl ChunkCache {
    /// Chunk every passage, encode every chunk and score it with the decoder. `progress` gets the
    /// number of passages done.
    pub fn build(
        passages: &[String],
        meta_names: (&str, &str),
        dtok: &DecoderTokenizer,
        decoder: &Decoder,
        encoder: &ChunkEncoder,
        k: usize,
        mut progress: impl FnMut(usize),
    ) -> Result<Self> {
        let chunked: Vec<Vec<Vec<u32>>> = passages
            .iter()
            .map(|p| Ok(chunk_tokens(&dtok.encode(p, false)?, k)))
            .collect::<Result<_>>()?;
        // One decoder pass per passage (the heuristic's scores), passages side by side.
        let mut per_passage: Vec<Vec<f32>> = vec![Vec::new(); passages.len()];
        crate::kernels::blas::threads::side_by_side(
            passages.len(),
            |i| pipeline::chunk_scores_batch(decoder, dtok, &chunked[i..i + 1]),
            |i, s| {
                per_passage[i] = s?.pop().unwrap_or_default();
                progress(1);
                Ok(())
            },
        )?;
        let mut chunk_offsets = vec![0u32];
        let mut token_offsets = vec![0u32];
        let mut tokens = Vec::new();
        let mut texts = Vec::new();
        for chunks in &chunked {
            for c in chunks {
                texts.push(dtok.decode(c)?);
                tokens.extend_from_slice(c);
                token_offsets.push(tokens.len() as u32);
            }
            chunk_offsets.push(token_offsets.len() as u32 - 1);
        }
        let scores = per_passage.concat();
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        let vectors = encoder.encode(&refs, 64)?.to_device(&Device::Cpu)?;
        let meta = ChunkCacheMeta {
            encoder: meta_names.0.to_string(),
            decoder: meta_names.1.to_string(),
            k,
            passages: passages.len(),
            chunks: scores.len(),
            dim: encoder.dim(),
        };
        Ok(Self {
            meta,
            chunk_offsets,
            token_offsets,
            tokens,
            vectors,
            scores,
        })
    }

    /// A cache held in memory only, of one passage per entry of `passages` (each a list of
    /// chunks) with their encoder `vectors` `(chunks, h)` in the same order and no heuristic
    /// scores (0): what `bench` measures the cached path with, through the same lookups as an
    /// index's cache.
    pub fn in_memory(
        meta_names: (&str, &str),
        k: usize,
        passages: &[Vec<Vec<u32>>],
        vectors: Tensor,
    ) -> Result<Self> {
        let mut chunk_offsets = vec![0u32];
        let mut token_offsets = vec![0u32];
        let mut tokens = Vec::new();
        for chunks in passages {
            for c in chunks {
                tokens.extend_from_slice(c);
                token_offsets.push(tokens.len() as u32);
            }
            chunk_offsets.push(token_offsets.len() as u32 - 1);
        }
        let n = token_offsets.len() - 1;
        if vectors.dim(0)? != n {
            bail!("chunk cache: {} vectors for {n} chunks", vectors.dim(0)?);
        }
        let meta = ChunkCacheMeta {
            encoder: meta_names.0.to_string(),
            decoder: meta_names.1.to_string(),
            k,
            passages: passages.len(),
            chunks: n,
            dim: vectors.dim(1)?,
        };
        Ok(Self {
            meta,
            chunk_offsets,
            token_offsets,
            tokens,
            vectors: vectors.to_device(&Device::Cpu)?,
            scores: vec![0.0; n],
        })
    }

    /// Write the cache files into `dir`.
    pub fn save(&self, dir: &Path) -> Result<()> {
        let dev = Device::Cpu;
        let mut t = HashMap::new();
        t.insert("vectors".to_string(), self.vectors.clone());
        t.insert(
            "chunk_offsets".to_string(),
            Tensor::new(self.chunk_offsets.as_slice(), &dev)?,
        );
        t.insert(
            "token_offsets".to_string(),
            Tensor::new(self.token_offsets.as_slice(), &dev)?,
        );
        t.insert(
            "tokens".to_string(),
            Tensor::new(self.tokens.as_slice(), &dev)?,
        );
        t.insert(
            "scores".to_string(),
            Tensor::new(self.scores.as_slice(), &dev)?,
        );
        let path = dir.join(CACHE_FILE);
        candle_core::safetensors::save(&t, &path)
            .with_context(|| format!("writing {}", path.display()))?;
        crate::io::jsonio::write_json(&dir.join(META_FILE), &self.meta)
    }

    /// Read the cache of an index directory; `None` when it has none.
    pub fn load(dir: &Path) -> Result<Option<Self>> {
        let meta_path = dir.join(META_FILE);
        if !meta_path.is_file() {
            return Ok(None);
        }
        let meta: ChunkCacheMeta = crate::io::jsonio::read_json(&meta_path)?;
        let path = dir.join(CACHE_FILE);
        let t = candle_core::safetensors::load(&path, &Device::Cpu)
            .with_context(|| format!("reading {}", path.display()))?;
        let get = |n: &str| -> Result<Tensor> {
            t.get(n)
                .cloned()
                .with_context(|| format!("{}: no tensor '{n}'", path.display()))
        };
        let cache = Self {
            chunk_offsets: get("chunk_offsets")?.to_vec1()?,
            token_offsets: get("token_offsets")?.to_vec1()?,
            tokens: get("tokens")?.to_vec1()?,
            vectors: get("vectors")?.to_dtype(DType::F32)?,
            scores: get("scores")?.to_vec1()?,
            meta,
        };
        if !cache.consistent() {
            bail!("{}: inconsistent with {}", path.display(), META_FILE);
        }
        Ok(Some(cache))
    }

    /// Whether every offset, count and shape agrees, so that no accessor can index out of range.
    fn consistent(&self) -> bool {
        let m = &self.meta;
        let ordered = |o: &[u32], last: usize| {
            o.first() == Some(&0)
                && o.windows(2).all(|w| w[0] <= w[1])
                && o.last().is_some_and(|&l| l as usize == last)
        };
        self.chunk_offsets.len() == m.passages.saturating_add(1)
            && self.scores.len() == m.chunks
            && self.token_offsets.len() == m.chunks.saturating_add(1)
            && ordered(&self.chunk_offsets, m.chunks)
            && ordered(&self.token_offsets, self.tokens.len())
            && self.vectors.dims() == [m.chunks, m.dim]
    }

    /// Why this cache cannot serve `encoder` / `decoder` / `k`, or `None` when it can.
    pub fn mismatch(&self, encoder: &str, decoder: &str, k: usize) -> Option<String> {
        if self.meta.encoder != encoder {
            return Some(format!(
                "built with encoder {}, not {encoder}",
                self.meta.encoder
            ));
        }
        if self.meta.decoder != decoder {
            return Some(format!(
                "built with decoder {}, not {decoder}",
                self.meta.decoder
            ));
        }
        if self.meta.k != k {
            return Some(format!("built with k={}, not {k}", self.meta.k));
        }
        None
    }

    /// A cache whose passage `i` is passage `from[i].1` of `new` when `from[i].0`, else of
    /// `self` (for `index --append`: unchanged passages keep their chunks, the others come from
    /// a cache of the embedded passages alone, built with the same models and `k`).
    pub fn assemble(&self, new: Option<&ChunkCache>, from: &[(bool, usize)]) -> Result<Self> {
        if let Some(n) = new {
            let (a, b) = (&self.meta, &n.meta);
            if (&a.encoder, &a.decoder, a.k, a.dim) != (&b.encoder, &b.decoder, b.k, b.dim) {
                bail!(
                    "the index's chunk cache was built with encoder {}, decoder {}, k={}; pass the same --enc, --dec, --k and --load_dir to --append",
                    a.encoder, a.decoder, a.k
                );
            }
        }
        let mut out = Self {
            meta: self.meta.clone(),
            chunk_offsets: vec![0],
            token_offsets: vec![0],
            tokens: Vec::new(),
            vectors: self.vectors.clone(),
            scores: Vec::new(),
        };
        let mut rows = Vec::new();
        for &(is_new, id) in from {
            let (c, base) = match (is_new, new) {
                (true, Some(n)) => (n, self.scores.len()),
                (true, None) => bail!("chunk cache: passage {id} has no new cache"),
                (false, _) => (self, 0),
            };
            for g in c.chunk_range(id) {
                out.tokens.extend_from_slice(c.chunk_tokens(g));
                out.token_offsets.push(out.tokens.len() as u32);
                out.scores.push(c.score(g));
                rows.push((base + g) as u32);
            }
            out.chunk_offsets.push(out.token_offsets.len() as u32 - 1);
        }
        let all = match new {
            Some(n) => Tensor::cat(&[&self.vectors, &n.vectors], 0)?,
            None => self.vectors.clone(),
        };
        out.vectors = all.index_select(&Tensor::new(rows, &Device::Cpu)?, 0)?;
        out.meta.passages = from.len();
        out.meta.chunks = out.scores.len();
        Ok(out)
    }

    /// Global chunk indices of passage `id`.
    pub fn chunk_range(&self, id: usize) -> std::ops::Range<usize> {
        self.chunk_offsets[id] as usize..self.chunk_offsets[id + 1] as usize
    }

    /// Tokens of global chunk `c`.
    pub fn chunk_tokens(&self, c: usize) -> &[u32] {
        &self.tokens[self.token_offsets[c] as usize..self.token_offsets[c + 1] as usize]
    }

    /// Heuristic score of global chunk `c`.
    pub fn score(&self, c: usize) -> f32 {
        self.scores[c]
    }

    /// Encoder vectors `(n, h)` of global chunks `ids`, on `device`.
    pub fn vectors(&self, ids: &[usize], device: &Device) -> Result<Tensor> {
        let idx: Vec<u32> = ids.iter().map(|&i| i as u32).collect();
        let idx = Tensor::new(idx, &Device::Cpu)?;
        Ok(self.vectors.index_select(&idx, 0)?.to_device(device)?)
    }
}

/// Build the chunk cache of `passages` for the encoder `enc`, decoder `dec` and `k` (with the
/// trained encoder of `load_dir` when given), reporting progress with `progress`.
pub fn build_for_index(
    passages: &[String],
    enc: Option<&str>,
    dec: Option<&str>,
    load_dir: Option<&Path>,
    k: usize,
    device: &Device,
    progress: impl FnMut(usize),
) -> Result<ChunkCache> {
    let dec = crate::io::weights::decoder_arg(dec, load_dir)?;
    let refrag = crate::pipeline::Refrag::load(enc, &dec, load_dir, 0, device)?;
    ChunkCache::build(
        passages,
        (&refrag.encoder.fingerprint, &dec),
        &refrag.dtok,
        &refrag.decoder,
        &refrag.encoder,
        k,
        progress,
    )
}
