//! refrag: REFRAG-style retrieval-augmented generation in one binary.
//!
//! The modules follow the pipeline: `corpus` (data in and out, the synthetic generator),
//! `embed` (retrieval embeddings), `index` and `retrieve` (FAISS + BM25, fused), then the
//! compression stages, and `commands` (one function per subcommand).

pub mod bench;
pub mod checkpoint;
pub mod chunk_cache;
pub mod cli;
pub mod commands;
pub mod corpus;
pub mod decoder;
pub mod device;
pub mod embed;
pub mod encoder;
pub mod eval;
pub mod hub;
pub mod index;
pub mod jsonio;
pub mod kernels;
pub mod limits;
pub mod lock;
pub mod pipeline;
pub mod policy;
pub mod progress;
pub mod projector;
pub mod prompt;
pub mod recover;
pub mod retrieve;
pub mod sample;
pub mod schema;
pub mod select;
pub mod squad;
pub mod testing;
pub mod train;
pub mod weights;

/// Version plus the compiled cargo features, for `refrag --version`.
pub const VERSION_LONG: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (features: ",
    env!("REFRAG_FEATURES"),
    ")"
);
