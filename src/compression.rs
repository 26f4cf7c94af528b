//! Compression: the decoder input cut into chunks of `k` tokens (`prompt`), the chunk encoder
//! (`encoder`: BERT pooled per chunk, then the `projector` into the decoder's embedding space),
//! and the chunk cache that precomputes a chunk's tokens, vector and heuristic score per index
//! (`chunk_cache`).

pub mod chunk_cache;
pub mod encoder;
pub mod projector;
pub mod prompt;
