//! The on-disk index: FAISS vectors, passages, manifest; built atomically.
//!
//! Layout of an index directory (format 1):
//!
//! ```text
//! index_dir/
//!   manifest.json    typed [`Manifest`]: model, dim, pooling, count, corpus sha256, files, ...
//!   dense.faiss      FAISS index (inner product on L2-normalised vectors), ids = passage ids
//!   passages.jsonl   one {"id": i, "text": "...", "source", "title"?, "span"} per line, in
//!                    corpus order (indexes built before documents have no source fields)
//!   vectors.safetensors  the passages' embeddings, `vectors` (count, dim) f32, so that
//!                    `index --append` rebuilds the FAISS index without embedding them again
//! ```
//!
//! The BM25 index is rebuilt from `passages.jsonl` when the index is opened ([`lexical`]). Other
//! stages may add files or subdirectories (the chunk cache) inside the same staging directory
//! before it is committed; the manifest's `files` lists what `index` itself wrote, and readers
//! ignore what they do not know.
//!
//! A build writes into a temporary directory beside `index_dir` ([`Staging`]) and renames it into
//! place at the end, so an interrupted or failed run never leaves a half-built index, and with
//! `--force` the old index stays until the new one is complete (on Linux the two are swapped in
//! one atomic step; what a killed build leaves beside the index is cleaned by the next writer,
//! [`crate::io::recover`]).

pub mod append;
pub mod documents;
pub mod lexical;
pub mod split;
mod staging;

use std::io::Read;
use std::path::Path;

use anyhow::{bail, Context, Result};
use faiss::index::autotune::ParameterSpace;
use faiss::index::IndexImpl;
use faiss::{Index, MetricType};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::hub::ModelFiles;
use crate::retrieval::embed::Pooling;
pub use documents::{PassageSource, SourcedPassage};
pub use lexical::{Bm25Index, Bm25Params};
pub use staging::{check_target, Staging};

/// The manifest's file name.
pub const MANIFEST: &str = "manifest.json";
/// The FAISS index's file name.
pub const DENSE: &str = "dense.faiss";
/// The passages' file name.
pub const PASSAGES: &str = "passages.jsonl";
/// The stored embeddings' file name.
pub const VECTORS: &str = "vectors.safetensors";
/// The layout version this build writes and reads.
pub const FORMAT: u32 = 1;

/// `manifest.json`: what an index directory holds and how it was built.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Layout version ([`FORMAT`]).
    pub format: u32,
    /// The refrag version that wrote it.
    pub refrag_version: String,
    /// The embedding model as given to `index` (path or hub id).
    pub embed_model: String,
    /// Its absolute path when it was a local folder, so the index opens from any directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub embed_model_path: Option<String>,
    /// sha256 over the model's config, tokenizer, and the weights' sizes, heads and tails
    /// ([`model_fingerprint`]): tells two models apart whatever path they are given by.
    pub embed_model_fingerprint: String,
    /// Embedding width.
    pub dim: usize,
    pub pooling: Pooling,
    pub normalize: bool,
    /// Whether the passages were embedded with 8-bit products
    /// ([`crate::retrieval::embed::BertEmbedder::with_int8`]); queries follow it where the CPU
    /// can (absent, f32: indexes built before the 8-bit path).
    #[serde(default)]
    pub embed_int8: bool,
    /// Tokens per passage the embedder saw (longer passages were truncated for the dense side).
    pub max_seq_len: usize,
    /// Number of passages (= FAISS vectors).
    pub count: usize,
    /// The corpus path as given.
    pub corpus: String,
    pub corpus_sha256: String,
    /// FAISS factory string.
    pub index_type: String,
    /// Always "inner_product".
    pub metric: String,
    /// IVF lists probed per query (IVF indexes only); edit to trade speed for recall.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nprobe: Option<usize>,
    pub bm25: Bm25Manifest,
    /// Files `index` wrote, relative to the index directory.
    pub files: Vec<String>,
    /// `--passage_tokens` and `--passage_overlap` of the documents (absent in older indexes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub passage_tokens: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub passage_overlap: Option<usize>,
    /// The documents, in passage order: each one's passages follow the previous one's.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub documents: Vec<DocumentEntry>,
    /// Seconds since the Unix epoch.
    pub created_unix: u64,
}

/// The lexical index's settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Bm25Manifest {
    pub k1: f32,
    pub b: f32,
    /// [`lexical::TOKENIZER_NAME`].
    pub tokenizer: String,
}

/// A document of the index: its name, content hash and number of passages.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DocumentEntry {
    pub source: String,
    pub sha256: String,
    pub passages: usize,
}

/// One stored passage (the source fields are absent in indexes built before documents).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PassageRecord {
    pub id: usize,
    pub text: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub span: Option<[usize; 2]>,
}

impl PassageRecord {
    /// Its source, when the index recorded one.
    pub fn origin(&self) -> Option<PassageSource> {
        Some(PassageSource {
            source: self.source.clone()?,
            title: self.title.clone(),
            span: self.span?,
        })
    }
}

/// Read `manifest.json`, checking that `dir` is an index of a format this build reads.
pub fn read_manifest(dir: &Path) -> Result<Manifest> {
    let path = dir.join(MANIFEST);
    if !dir.is_dir() {
        bail!(
            "index dir {} does not exist (build it with `refrag index`)",
            dir.display()
        );
    }
    if !path.is_file() {
        bail!(
            "{} is not an index directory: it has no {MANIFEST}",
            dir.display()
        );
    }
    let m: Manifest = crate::io::jsonio::read_json(&path)?;
    if m.format > FORMAT {
        bail!(
            "{}: index format {} is newer than this refrag reads ({FORMAT}); rebuild the index or update refrag",
            path.display(),
            m.format
        );
    }
    Ok(m)
}

/// Hex sha256 of a file's bytes.
pub fn file_sha256(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).with_context(|| format!("reading {}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(format!("{:x}", h.finalize()))
}

/// A cheap identity of an HF model: sha256 over `config.json`, `tokenizer.json`, and each weights
/// file's size plus its first and last MiB (random or trained weights differ there).
pub fn model_fingerprint(files: &ModelFiles) -> Result<String> {
    let ModelFiles::Hf {
        config,
        weights,
        tokenizer,
        ..
    } = files
    else {
        bail!(
            "embedding model '{}' is not a Hugging Face folder",
            files.name()
        );
    };
    let mut h = Sha256::new();
    for p in [config, tokenizer] {
        h.update(std::fs::read(p).with_context(|| format!("reading {}", p.display()))?);
    }
    for w in weights {
        let bytes = head_and_tail(w, 1 << 20)?;
        h.update(bytes);
    }
    Ok(format!("{:x}", h.finalize()))
}

/// A file's length (8 bytes LE), first `n` bytes and last `n` bytes.
fn head_and_tail(path: &Path, n: u64) -> Result<Vec<u8>> {
    use std::io::{Seek, SeekFrom};
    let ctx = || format!("reading {}", path.display());
    let mut f = std::fs::File::open(path).with_context(ctx)?;
    let len = f.metadata().with_context(ctx)?.len();
    let mut out = len.to_le_bytes().to_vec();
    let mut head = Vec::new();
    (&mut f).take(n).read_to_end(&mut head).with_context(ctx)?;
    out.extend(head);
    if len > n {
        f.seek(SeekFrom::Start(len.saturating_sub(n).max(n)))
            .with_context(ctx)?;
        f.read_to_end(&mut out).with_context(ctx)?;
    }
    Ok(out)
}

/// A FAISS error as one line (FAISS messages span lines and name C++ source files).
pub fn faiss_err(e: faiss::error::Error) -> anyhow::Error {
    let msg = e.to_string();
    anyhow::anyhow!("{}", msg.split_whitespace().collect::<Vec<_>>().join(" "))
}

/// The number right after `key` in a factory string (`IVF64,Flat` -> 64 for "IVF").
fn factory_number(index_type: &str, key: &str) -> Option<usize> {
    let at = index_type.find(key)? + key.len();
    let digits: String = index_type[at..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

/// IVF lists probed per query: an eighth of the lists, at least 8 (all of them for small nlist).
/// FAISS's default of 1 misses too much for retrieval.
pub fn default_nprobe(index_type: &str) -> Option<usize> {
    let nlist = factory_number(index_type, "IVF")?;
    Some(nlist.min((nlist / 8).max(8)))
}

/// Fail with a clear message when `n` vectors are too few to train `index_type`; warn when FAISS
/// would warn (fewer than 39 training points per IVF list).
pub fn check_training_size(index_type: &str, n: usize) -> Result<()> {
    if let Some(nlist) = factory_number(index_type, "IVF") {
        if n < nlist {
            bail!("--index_type {index_type}: {n} passages are too few to train {nlist} IVF lists (need at least {nlist}, ideally {}); use fewer lists, e.g. IVF{},Flat, or Flat", 39 * nlist, (n / 39).max(1));
        }
        if n < 39 * nlist {
            eprintln!("refrag: warning: --index_type {index_type}: {n} passages for {nlist} IVF lists (FAISS recommends at least {}); clustering may be poor", 39 * nlist);
        }
    }
    if let Some(at) = index_type.find("PQ") {
        let rest = &index_type[at + 2..];
        let bits = rest
            .find('x')
            .and_then(|x| factory_number(&rest[x..], "x"))
            .unwrap_or(8);
        let need = 1usize << bits.min(24);
        if n < need {
            bail!("--index_type {index_type}: {n} passages are too few to train a product quantizer with {bits}-bit codes (need at least {need}); use Flat, HNSW32 or fewer bits");
        }
    }
    Ok(())
}

/// An empty FAISS index from a factory string, inner-product metric.
pub fn new_dense_index(dim: usize, index_type: &str) -> Result<IndexImpl> {
    faiss::index_factory(dim as u32, index_type, MetricType::InnerProduct)
        .map_err(faiss_err)
        .with_context(|| {
            format!(
                "--index_type {index_type}: not a FAISS index factory string for dimension {dim}"
            )
        })
}

/// Train (when the index type needs it) and fill `index` with row-major `vectors`.
pub fn fill_dense_index(index: &mut IndexImpl, index_type: &str, vectors: &[f32]) -> Result<()> {
    let n = vectors.len() / index.d() as usize;
    if !index.is_trained() {
        check_training_size(index_type, n)?;
        index
            .train(vectors)
            .map_err(faiss_err)
            .with_context(|| format!("training FAISS index {index_type} on {n} vectors"))?;
    }
    index
        .add(vectors)
        .map_err(faiss_err)
        .with_context(|| format!("adding {n} vectors to FAISS index {index_type}"))?;
    if let Some(nprobe) = default_nprobe(index_type) {
        set_nprobe(index, nprobe)?;
    }
    Ok(())
}

/// Set an IVF index's `nprobe` (saved with the index; also re-applied from the manifest on load).
pub fn set_nprobe(index: &IndexImpl, nprobe: usize) -> Result<()> {
    ParameterSpace::new()
        .and_then(|ps| ps.set_index_parameter(index, "nprobe", nprobe as f64))
        .map_err(faiss_err)
        .context("setting the FAISS nprobe parameter")
}

/// Write a FAISS index to `path`.
pub fn write_dense(index: &IndexImpl, path: &Path) -> Result<()> {
    let p = path
        .to_str()
        .with_context(|| format!("{}: path is not UTF-8", path.display()))?;
    faiss::write_index(index, p)
        .map_err(faiss_err)
        .with_context(|| format!("writing {}", path.display()))
}

/// Read the FAISS index of an index directory, checking it against the manifest.
pub fn read_dense(dir: &Path, m: &Manifest) -> Result<IndexImpl> {
    let path = dir.join(DENSE);
    let p = path
        .to_str()
        .with_context(|| format!("{}: path is not UTF-8", path.display()))?;
    let index = faiss::read_index(p)
        .map_err(faiss_err)
        .with_context(|| format!("reading {}", path.display()))?;
    if index.d() as usize != m.dim || index.ntotal() as usize != m.count {
        bail!(
            "{}: holds {} vectors of dimension {}, but {MANIFEST} says {} of dimension {}; rebuild the index",
            path.display(), index.ntotal(), index.d(), m.count, m.dim
        );
    }
    if let Some(nprobe) = m.nprobe {
        set_nprobe(&index, nprobe)?;
    }
    Ok(index)
}

/// Write a file of a staging directory (the directory as a whole is renamed into place, so the
/// files need no atomic write of their own).
fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    std::fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))
}

/// Write passages with their sources as JSONL.
pub fn write_passages(path: &Path, passages: &[SourcedPassage]) -> Result<()> {
    let rows: Vec<PassageRecord> = passages
        .iter()
        .enumerate()
        .map(|(id, p)| PassageRecord {
            id,
            text: p.text.clone(),
            source: Some(p.source.source.clone()),
            title: p.source.title.clone(),
            span: Some(p.source.span),
        })
        .collect();
    write_file(path, crate::io::jsonio::to_jsonl(&rows)?.as_bytes())
}

/// Write the embeddings (`n * dim` row-major) beside the index.
pub fn write_vectors(dir: &Path, vectors: &[f32], dim: usize) -> Result<()> {
    let path = dir.join(VECTORS);
    let t = candle_core::Tensor::from_slice(
        vectors,
        (vectors.len() / dim.max(1), dim),
        &candle_core::Device::Cpu,
    )?;
    candle_core::safetensors::save(&std::collections::HashMap::from([("vectors", t)]), &path)
        .with_context(|| format!("writing {}", path.display()))
}

/// Read the stored embeddings of an index directory, checked against the manifest.
pub fn read_vectors(dir: &Path, m: &Manifest) -> Result<Vec<f32>> {
    let path = dir.join(VECTORS);
    if !path.is_file() {
        bail!(
            "index dir {}: no {VECTORS} (built by an older refrag); rebuild it without --append",
            dir.display()
        );
    }
    let t = candle_core::safetensors::load(&path, &candle_core::Device::Cpu)
        .with_context(|| format!("reading {}", path.display()))?;
    let v = t
        .get("vectors")
        .with_context(|| format!("{}: no tensor 'vectors'", path.display()))?;
    if v.dims() != [m.count, m.dim] {
        bail!(
            "{}: shape {:?}, but {MANIFEST} says ({}, {}); rebuild the index",
            path.display(),
            v.dims(),
            m.count,
            m.dim
        );
    }
    Ok(v.flatten_all()?.to_vec1()?)
}

/// Write `manifest.json` into `dir`.
pub fn write_manifest(dir: &Path, m: &Manifest) -> Result<()> {
    let mut s = serde_json::to_string_pretty(m)?;
    s.push('\n');
    write_file(&dir.join(MANIFEST), s.as_bytes())
}

/// Read the passages of an index directory, checking ids and count against the manifest.
pub fn read_passages(dir: &Path, m: &Manifest) -> Result<Vec<String>> {
    Ok(read_passage_records(dir, m)?
        .into_iter()
        .map(|r| r.text)
        .collect())
}

/// [`read_passages`] with the sources.
pub fn read_passage_records(dir: &Path, m: &Manifest) -> Result<Vec<PassageRecord>> {
    let path = dir.join(PASSAGES);
    let rows: Vec<PassageRecord> = crate::io::jsonio::read_jsonl(&path)?;
    if rows.len() != m.count || rows.iter().enumerate().any(|(i, r)| r.id != i) {
        bail!(
            "{}: expected passages with ids 0..{} as {MANIFEST} says; rebuild the index",
            path.display(),
            m.count
        );
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn factory_strings_parsed() {
        assert_eq!(default_nprobe("Flat"), None);
        assert_eq!(default_nprobe("IVF4,Flat"), Some(4));
        assert_eq!(default_nprobe("IVF64,Flat"), Some(8));
        assert_eq!(default_nprobe("IVF1024,PQ16"), Some(128));
        assert!(check_training_size("IVF64,Flat", 63).is_err());
        assert!(check_training_size("IVF4,PQ8", 255).is_err());
        assert!(check_training_size("IVF4,PQ8x4", 100).is_ok());
        assert!(check_training_size("HNSW32", 3).is_ok());
    }

    #[test]
    fn flat_ivf_hnsw_pq_build_and_search() {
        use rand::{Rng, SeedableRng};
        let (n, dim) = (400, 16);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let mut v: Vec<f32> = (0..n * dim)
            .map(|_| rng.random_range(-1.0f32..1.0))
            .collect();
        for row in v.chunks_mut(dim) {
            let norm = row.iter().map(|x| x * x).sum::<f32>().sqrt();
            row.iter_mut().for_each(|x| *x /= norm);
        }
        for t in ["Flat", "IVF4,Flat", "HNSW16", "IVF4,PQ4x4", "PQ4x4"] {
            let mut idx = new_dense_index(dim, t).unwrap();
            fill_dense_index(&mut idx, t, &v).unwrap();
            assert_eq!(idx.ntotal(), n as u64);
            let r = idx.search(&v[dim * 5..dim * 6], 3).unwrap();
            // Product quantization is lossy: the query's own vector need only be near the top.
            let found = if t.contains("PQ") {
                &r.labels[..]
            } else {
                &r.labels[..1]
            };
            assert!(found.iter().any(|l| l.get() == Some(5)), "{t}: {r:?}");
        }
        let e = format!("{:#}", new_dense_index(dim, "Bogus").err().unwrap());
        assert!(e.contains("--index_type Bogus") && !e.contains('\n'), "{e}");
    }
}
