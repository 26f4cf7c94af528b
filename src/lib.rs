//! refrag: REFRAG-style retrieval-augmented generation in one binary.
//!
//! The folders follow the pipeline (see `docs/architecture.md`): `retrieval` (the index,
//! retrieval embeddings, dense / lexical / hybrid search), `compression` (the prompt layout cut
//! into chunks, the chunk encoder, the projector, the chunk cache), `select` (which chunks to
//! expand: heuristic, trained policy, random), `decoder` (the LLM), `pipeline` (the one home of
//! the flow), `kernels` (BLAS / SIMD code), `train` (the four training stages), `evaluation`
//! (metrics and the benchmark's tables), `synthetic` (the generated data set), `io` (file
//! formats, weights directories, locks), and `commands` / `cli` on top.

pub mod cli;
pub mod commands;
pub mod compression;
pub mod decoder;
pub mod device;
pub mod evaluation;
pub mod hub;
pub mod io;
pub mod kernels;
pub mod limits;
pub mod pipeline;
pub mod progress;
pub mod retrieval;
pub mod select;
pub mod synthetic;
pub mod testing;
pub mod train;

/// Version plus the compiled cargo features, for `refrag --version`.
pub const VERSION_LONG: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (features: ",
    env!("REFRAG_FEATURES"),
    ")"
);
