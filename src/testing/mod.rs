//! Tiny random models and tokenizers built in code, for tests: nothing downloads.

pub mod bert;
pub mod llama;
