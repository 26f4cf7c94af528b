//! Hand-written compute kernels where no crate is fast enough (measured in `bench`): f32
//! products through the system BLAS (`blas`), the decoder's and encoder's differentiable
//! training ops (`fused`), 8-bit integer products for the retrieval embedder's linear layers
//! (`igemm`), quantized matrix-vector products for decoding (`qgemv`), and the spinning thread
//! team their many small parallel regions run on (`team`).

pub mod blas;
pub mod fused;
pub mod igemm;
pub mod qgemv;
pub mod team;
