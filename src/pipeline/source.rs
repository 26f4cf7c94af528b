//! Where a question's chunks come from: their tokens, their encoder vectors `c_i` and their
//! perplexity-heuristic scores. [`Encode`] computes them on the fly (the decoder's tokenizer,
//! the chunk encoder, the heuristic over the decoder); an index's
//! [`ChunkCache`] serves what it precomputed. [`Refrag`]'s stages take a `&dyn ChunkSource`, so
//! a command picks the source once and every stage reads from it.

use anyhow::Result;
use candle_core::Tensor;

use super::{Passage, Prepared, Refrag};
use crate::compression::chunk_cache::ChunkCache;
use crate::compression::prompt::chunk_tokens;

/// A passage's chunks of `k` decoder tokens, and each chunk's id in the source that cut them
/// when that source keeps ids.
pub struct PassageChunks {
    pub tokens: Vec<Vec<u32>>,
    pub ids: Option<Vec<usize>>,
}

/// A source of chunk tokens, vectors and scores.
pub trait ChunkSource {
    /// The chunks of `k` decoder tokens of passage `p`, and each chunk's id in this source when
    /// the source keeps them (`None`: later stages compute from the tokens).
    fn passage_chunks(&self, r: &Refrag, p: &Passage, k: usize) -> Result<PassageChunks>;

    /// Encoder vectors `(n, h)` of the chunks `which` (indices into `prep`'s layout).
    fn vectors(&self, r: &Refrag, prep: &Prepared, which: &[usize]) -> Result<Tensor>;

    /// Heuristic scores of every chunk of `prep`'s layout, when this source holds them.
    fn scores(&self, prep: &Prepared) -> Option<Vec<f32>>;
}

/// Chunks computed when a question needs them: tokenized with the decoder's tokenizer, encoded
/// by the chunk encoder, scored by the decoder.
pub struct Encode;

impl ChunkSource for Encode {
    fn passage_chunks(&self, r: &Refrag, p: &Passage, k: usize) -> Result<PassageChunks> {
        Ok(PassageChunks {
            tokens: chunk_tokens(&r.dtok.encode(&p.text, false)?, k),
            ids: None,
        })
    }

    fn vectors(&self, r: &Refrag, prep: &Prepared, which: &[usize]) -> Result<Tensor> {
        let texts: Vec<String> = which
            .iter()
            .map(|&i| r.dtok.decode(&prep.layout.chunks[i].tokens))
            .collect::<Result<_>>()?;
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        r.encoder.encode(&refs, 64)
    }

    fn scores(&self, _prep: &Prepared) -> Option<Vec<f32>> {
        None
    }
}

/// The index's chunk cache: chunks by passage id, vectors and scores by global chunk id. A
/// question prepared by another source (no ids) falls back to [`Encode`].
impl ChunkSource for ChunkCache {
    fn passage_chunks(&self, _r: &Refrag, p: &Passage, _k: usize) -> Result<PassageChunks> {
        let ids: Vec<usize> = self.chunk_range(p.id).collect();
        let tokens = ids.iter().map(|&i| self.chunk_tokens(i).to_vec()).collect();
        Ok(PassageChunks {
            tokens,
            ids: Some(ids),
        })
    }

    fn vectors(&self, r: &Refrag, prep: &Prepared, which: &[usize]) -> Result<Tensor> {
        match &prep.source_ids {
            Some(ids) => ChunkCache::vectors(
                self,
                &which.iter().map(|&i| ids[i]).collect::<Vec<_>>(),
                &r.device,
            ),
            None => Encode.vectors(r, prep, which),
        }
    }

    fn scores(&self, prep: &Prepared) -> Option<Vec<f32>> {
        let ids = prep.source_ids.as_ref()?;
        Some(ids.iter().map(|&i| self.score(i)).collect())
    }
}

/// The source of a command that may have a chunk cache: the cache when there is one, else
/// [`Encode`].
pub fn cache_or_encode(cache: Option<&ChunkCache>) -> &dyn ChunkSource {
    match cache {
        Some(c) => c,
        None => &Encode,
    }
}
