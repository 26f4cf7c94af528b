//! Evaluation: answer metrics (exact match, F1, recall@k, `metrics`) and the benchmark's
//! contexts, FLOPs, tables and plot (`bench`).

pub mod bench;
pub mod metrics;
