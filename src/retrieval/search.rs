//! Dense, lexical (BM25) and hybrid (reciprocal-rank fusion) retrieval over an index.
//!
//! [`Retriever`] is the one retrieval code path: `search`, `generate`, the trainers and the
//! evaluation all call [`Retriever::retrieve`] (or [`Retriever::retrieve_many`] for a batch of
//! questions). Code that only needs retrieval can take a `&dyn Retrieve`, so tests can pass fakes.

use clap::ValueEnum;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use anyhow::{bail, Context, Result};
use candle_core::Device;
use faiss::index::IndexImpl;
use faiss::Index;
use serde::Serialize;

use crate::hub::{self, ModelFiles};
use crate::retrieval::embed::BertEmbedder;
use crate::retrieval::index::{self, Bm25Index, Bm25Params, Manifest};

/// Which ranking `search`, `generate` and the trainers retrieve with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RetrievalMode {
    Dense,
    Lexical,
    /// Reciprocal-rank fusion of the dense and lexical rankings.
    #[default]
    Hybrid,
}

/// The `k` of reciprocal-rank fusion: a passage at rank `r` (1-based) in a list adds `1/(k + r)`.
pub const RRF_K: f32 = 60.0;

/// In hybrid retrieval, a BM25 hit joins the fusion only when it scores at least this fraction of
/// the best BM25 score. An exact identifier match (`City_10016`) scores far above passages that
/// share only common words with the question (15.5 against 5.1 on our corpus), but RRF sees only
/// ranks: without this cut, a passage ranked fairly high in both lists outranks the one passage
/// that names the entity. Measured on data/rag_test.jsonl with all-MiniLM-L6-v2 (dense alone
/// 0.31): hybrid recall@8 0.917 without the cut, 1.0 with it (recall@1 0.97). When BM25 is not
/// decisive, scores fall off gently and the list stays long, so such questions fuse as plain RRF.
pub const LEXICAL_MIN_RATIO: f32 = 0.5;

/// Keep the BM25 hits that score at least [`LEXICAL_MIN_RATIO`] of the best one.
pub fn confident_lexical(hits: &[(usize, f32)]) -> &[(usize, f32)] {
    let Some(best) = hits.first().map(|h| h.1) else {
        return hits;
    };
    let keep = hits
        .iter()
        .take_while(|h| h.1 >= LEXICAL_MIN_RATIO * best)
        .count();
    &hits[..keep]
}

/// How many candidates each ranking contributes to the fusion for a final `topk`.
pub fn fusion_depth(topk: usize) -> usize {
    (topk * 4).max(50)
}

/// One retrieved passage.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Hit {
    /// Passage id (its line in the corpus, from 0).
    pub id: usize,
    /// Inner product (dense), BM25 (lexical) or fused RRF score (hybrid); higher is better.
    pub score: f32,
    pub text: String,
    /// Rank (1-based) in the dense list, when the passage is in it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dense_rank: Option<usize>,
    /// Rank (1-based) in the BM25 list, when the passage is in it (in hybrid retrieval, the
    /// list before the [`LEXICAL_MIN_RATIO`] cut: a hit below the cut shows its rank but got no
    /// lexical share of its score).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lexical_rank: Option<usize>,
}

/// Anything that retrieves passages for a question.
pub trait Retrieve {
    fn retrieve(&self, question: &str, topk: usize, mode: RetrievalMode) -> Result<Vec<Hit>>;
}

/// Fuse rankings (ids, best first) by reciprocal rank: `score(d) = sum 1/(k + rank)`. Returns
/// `(id, score)` best first. Ties go to the passage with the better best rank, then to the one
/// from the earlier list (so a passage first only in list 0 beats one first only in list 1),
/// then to the smaller id.
pub fn rrf(rankings: &[&[usize]], k: f32) -> Vec<(usize, f32)> {
    /// A passage's fused score and its best `(rank, list)`.
    struct Fused {
        id: usize,
        score: f32,
        best: (usize, usize),
    }
    let mut fused: std::collections::HashMap<usize, Fused> = Default::default();
    for (list, ranking) in rankings.iter().enumerate() {
        for (r, &id) in ranking.iter().enumerate() {
            let e = fused.entry(id).or_insert(Fused {
                id,
                score: 0.0,
                best: (r, list),
            });
            e.score += 1.0 / (k + (r + 1) as f32);
            e.best = e.best.min((r, list));
        }
    }
    let mut fused: Vec<Fused> = fused.into_values().collect();
    fused.sort_by(|a, b| {
        (b.score.total_cmp(&a.score))
            .then(a.best.cmp(&b.best))
            .then(a.id.cmp(&b.id))
    });
    fused.into_iter().map(|f| (f.id, f.score)).collect()
}

/// A FAISS index that may move between threads.
struct DenseIndex(IndexImpl);

// SAFETY: `IndexImpl` owns a heap-allocated FAISS index that is not tied to the thread that
// created it; the `Mutex` around it serialises every use.
unsafe impl Send for DenseIndex {}

/// An opened index directory: passages, FAISS and BM25 indexes, and the embedding model, loaded
/// on first dense use.
pub struct Retriever {
    dir: PathBuf,
    manifest: Manifest,
    passages: Vec<String>,
    /// Each passage's source, when the index recorded one.
    sources: Vec<Option<index::PassageSource>>,
    dense: Mutex<DenseIndex>,
    lexical: Bm25Index,
    embed_arg: String,
    device: Device,
    embedder: OnceLock<BertEmbedder>,
}

impl Retriever {
    /// Open `dir`. `embed_model` (the `--embed_model` flag) must be the model the index was built
    /// with; `None` means the manifest's model.
    pub fn open(dir: &Path, embed_model: Option<&str>, device: &Device) -> Result<Self> {
        let manifest = index::read_manifest(dir)?;
        if let Some(arg) = embed_model {
            let files = hub::resolve(arg)?;
            check_model(dir, &manifest, &files)?;
        }
        let records = index::read_passage_records(dir, &manifest)?;
        let sources = records.iter().map(index::PassageRecord::origin).collect();
        let passages = records.into_iter().map(|r| r.text).collect::<Vec<_>>();
        let dense = index::read_dense(dir, &manifest)?;
        let params = Bm25Params {
            k1: manifest.bm25.k1,
            b: manifest.bm25.b,
        };
        if manifest.bm25.tokenizer != index::lexical::TOKENIZER_NAME {
            bail!(
                "index dir {}: its BM25 tokenizer '{}' is not this build's '{}'; rebuild the index",
                dir.display(),
                manifest.bm25.tokenizer,
                index::lexical::TOKENIZER_NAME
            );
        }
        let lexical = Bm25Index::build(&passages, params);
        Ok(Self {
            dir: dir.to_path_buf(),
            embed_arg: embed_model.map_or_else(|| manifest_model(&manifest), str::to_string),
            manifest,
            passages,
            sources,
            dense: Mutex::new(DenseIndex(dense)),
            lexical,
            device: device.clone(),
            embedder: OnceLock::new(),
        })
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    pub fn index_dir(&self) -> &Path {
        &self.dir
    }

    /// All passages, by id.
    pub fn passages(&self) -> &[String] {
        &self.passages
    }

    /// Where passage `id` comes from (`None` in an index built before documents).
    pub fn source(&self, id: usize) -> Option<&index::PassageSource> {
        self.sources.get(id).and_then(Option::as_ref)
    }

    /// The embedding model, loaded (and checked against the manifest) on first call.
    pub fn embedder(&self) -> Result<&BertEmbedder> {
        if let Some(e) = self.embedder.get() {
            return Ok(e);
        }
        let files = hub::resolve(&self.embed_arg).with_context(|| {
            format!(
                "loading the embedding model of index {} (pass --embed_model to give its location)",
                self.dir.display()
            )
        })?;
        check_model(&self.dir, &self.manifest, &files)?;
        // Queries in the index's precision: 8-bit only where the passages were (and this CPU
        // has the 8-bit path), so an index built in f32 is searched in f32.
        let e = BertEmbedder::load(&files, &self.device)?
            .with_int8_where_fast(self.manifest.embed_int8)
            .with_pooling(self.manifest.pooling)
            .with_normalize(self.manifest.normalize);
        if e.dim() != self.manifest.dim {
            bail!(
                "index dir {} holds {}-dimensional vectors from '{}', but '{}' embeds in {} dimensions; rebuild the index",
                self.dir.display(), self.manifest.dim, self.manifest.embed_model, self.embed_arg, e.dim()
            );
        }
        Ok(self.embedder.get_or_init(|| e))
    }

    /// The `n` nearest passages by inner product for each question, best first.
    pub fn dense_search(&self, questions: &[&str], n: usize) -> Result<Vec<Vec<(usize, f32)>>> {
        let embedder = self.embedder()?;
        let q: Vec<f32> = embedder.embed(questions)?.concat();
        let n = n.min(self.passages.len());
        let mut dense = self.dense.lock().expect("dense index lock poisoned");
        let res = dense.0.search(&q, n).map_err(index::faiss_err)?;
        Ok(res
            .labels
            .chunks(n.max(1))
            .zip(res.distances.chunks(n.max(1)))
            .map(|(labels, dists)| {
                labels
                    .iter()
                    .zip(dists)
                    .filter_map(|(l, &d)| l.get().map(|id| (id as usize, d)))
                    .collect()
            })
            .collect())
    }

    /// The `n` best passages by BM25, best first.
    pub fn lexical_search(&self, question: &str, n: usize) -> Vec<(usize, f32)> {
        self.lexical.search(question, n)
    }

    /// Retrieve for many questions at once (one embedding batch, one FAISS search).
    pub fn retrieve_many(
        &self,
        questions: &[&str],
        topk: usize,
        mode: RetrievalMode,
    ) -> Result<Vec<Vec<Hit>>> {
        let depth = match mode {
            RetrievalMode::Hybrid => fusion_depth(topk),
            _ => topk,
        };
        let dense = match mode {
            RetrievalMode::Lexical => vec![Vec::new(); questions.len()],
            _ => self.dense_search(questions, depth)?,
        };
        Ok(questions
            .iter()
            .zip(dense)
            .map(|(q, d)| {
                let lexical = match mode {
                    RetrievalMode::Dense => Vec::new(),
                    _ => self.lexical_search(q, depth),
                };
                self.hits(&d, &lexical, topk, mode)
            })
            .collect())
    }

    /// Turn ranked lists into the final `topk` hits of `mode`.
    fn hits(
        &self,
        dense: &[(usize, f32)],
        lexical: &[(usize, f32)],
        topk: usize,
        mode: RetrievalMode,
    ) -> Vec<Hit> {
        let rank_in =
            |list: &[(usize, f32)], id: usize| list.iter().position(|h| h.0 == id).map(|r| r + 1);
        let scored: Vec<(usize, f32)> = match mode {
            RetrievalMode::Dense => dense.to_vec(),
            RetrievalMode::Lexical => lexical.to_vec(),
            RetrievalMode::Hybrid => {
                let d: Vec<usize> = dense.iter().map(|h| h.0).collect();
                let l: Vec<usize> = confident_lexical(lexical).iter().map(|h| h.0).collect();
                // BM25 first: a hit that survives the cut is an exact term match, so it wins a
                // tie against a passage that only the dense list ranks as high.
                rrf(&[&l, &d], RRF_K)
            }
        };
        scored
            .into_iter()
            .take(topk)
            .map(|(id, score)| Hit {
                id,
                score,
                text: self.passages[id].clone(),
                dense_rank: rank_in(dense, id),
                lexical_rank: rank_in(lexical, id),
            })
            .collect()
    }
}

impl Retriever {
    /// Retrieve the `topk` passages for `question`, best first.
    pub fn retrieve(&self, question: &str, topk: usize, mode: RetrievalMode) -> Result<Vec<Hit>> {
        Ok(self.retrieve_many(&[question], topk, mode)?.remove(0))
    }
}

impl Retrieve for Retriever {
    fn retrieve(&self, question: &str, topk: usize, mode: RetrievalMode) -> Result<Vec<Hit>> {
        Retriever::retrieve(self, question, topk, mode)
    }
}

/// The model to load when `--embed_model` is absent: the absolute path recorded at index time
/// when it still exists, else the name as given then.
fn manifest_model(m: &Manifest) -> String {
    match &m.embed_model_path {
        Some(p) if Path::new(p).is_dir() => p.clone(),
        _ => m.embed_model.clone(),
    }
}

/// Fail with one line naming the index dir and both models unless `files` is the model the
/// index was built with.
pub fn check_model(dir: &Path, m: &Manifest, files: &ModelFiles) -> Result<()> {
    let fp = index::model_fingerprint(files)?;
    if fp != m.embed_model_fingerprint {
        bail!(
            "index dir {} was built with embedding model '{}' (dim {}), not '{}'; rebuild the index with that model or drop --embed_model",
            dir.display(),
            m.embed_model,
            m.dim,
            files.name()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rrf_on_hand_made_rankings() {
        // d: 1 2 3; l: 3 4 1. 1: 1/61 + 1/63; 3: 1/63 + 1/61; 2: 1/62; 4: 1/62.
        let fused = rrf(&[&[1, 2, 3], &[3, 4, 1]], 60.0);
        let ids: Vec<usize> = fused.iter().map(|f| f.0).collect();
        assert_eq!(ids, vec![1, 3, 2, 4]);
        assert!((fused[0].1 - (1.0 / 61.0 + 1.0 / 63.0)).abs() < 1e-7);
        assert_eq!(fused[0].1, fused[1].1);
        // Ties: 5 and 6 are both first in one list; the earlier list wins.
        let fused = rrf(&[&[5], &[6]], 60.0);
        assert_eq!(fused.iter().map(|f| f.0).collect::<Vec<_>>(), vec![5, 6]);
        let fused = rrf(&[&[6], &[5]], 60.0);
        assert_eq!(fused.iter().map(|f| f.0).collect::<Vec<_>>(), vec![6, 5]);
        // Second in both lists beats first in only one.
        let fused = rrf(&[&[7, 8], &[9, 8]], 60.0);
        assert_eq!(fused[0].0, 8);
        assert!(rrf(&[], 60.0).is_empty());
    }

    #[test]
    fn lexical_cut_keeps_decisive_matches_only() {
        let decisive = [(4, 15.5), (1, 5.1), (2, 5.0)];
        assert_eq!(confident_lexical(&decisive), &decisive[..1]);
        let gentle = [(4, 9.0), (1, 8.0), (2, 5.0), (3, 4.4)];
        assert_eq!(confident_lexical(&gentle), &gentle[..3]);
        assert!(confident_lexical(&[]).is_empty());
    }

    #[test]
    fn manifest_mismatch_names_dir_and_both_models() {
        let tmp = tempfile::tempdir().unwrap();
        let model = |name: &str, seed: u64| {
            let dir = tmp.path().join(name);
            crate::testing::bert::write_tiny_bert(&dir, seed, Some("mean")).unwrap();
            hub::resolve(dir.to_str().unwrap()).unwrap()
        };
        let (a, a_copy, b) = (model("a", 1), model("a_copy", 1), model("b", 2));
        let manifest: Manifest = serde_json::from_value(serde_json::json!({
            "format": 1, "refrag_version": "0", "embed_model": a.name(),
            "embed_model_fingerprint": index::model_fingerprint(&a).unwrap(),
            "dim": 32, "pooling": "mean", "normalize": true, "max_seq_len": 64, "count": 1,
            "corpus": "c.txt", "corpus_sha256": "", "index_type": "Flat",
            "metric": "inner_product", "bm25": {"k1": 1.2, "b": 0.75, "tokenizer": "x"},
            "files": [], "created_unix": 0
        }))
        .unwrap();
        let dir = Path::new("/some/idx");
        check_model(dir, &manifest, &a).unwrap();
        check_model(dir, &manifest, &a_copy).unwrap(); // same model, other path
        let e = format!("{:#}", check_model(dir, &manifest, &b).unwrap_err());
        assert!(
            e.contains("/some/idx") && e.contains(a.name()) && e.contains(b.name()),
            "{e}"
        );
        assert!(!e.contains('\n'));
    }

    #[test]
    fn fusion_depth_is_at_least_50() {
        assert_eq!(fusion_depth(8), 50);
        assert_eq!(fusion_depth(20), 80);
    }
}
