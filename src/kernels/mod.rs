//! Hand-written compute kernels where no crate is fast enough (measured in `bench`):
//! quantized matrix-vector products for decoding.

pub mod qgemv;
