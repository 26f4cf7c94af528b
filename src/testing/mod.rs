//! Tiny random models and tokenizers built in code, for tests: nothing downloads.

pub mod bert;
pub mod llama;

use candle_core::Tensor;

/// The largest absolute difference between two tensors of one shape (0 when equal).
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .and_then(|d| d.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>())
        .expect("tensors of one shape")
}
