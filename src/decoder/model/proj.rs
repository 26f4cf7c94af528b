//! A decoder projection ([`Proj`]): dense weights (trainable or frozen), llama.cpp-quantized
//! ones, dense plus a quantized twin for decoding, or a base plus a LoRA side path; and the
//! frozen-weight linear product whose backward pass computes only the input's gradient.

use candle_core::{
    CpuStorage, CudaStorage, CustomOp2, DType, Layout, MetalStorage, Module, Result, Shape, Tensor,
};
use candle_nn::Linear;

use super::fast;

/// A linear map: dense weights (any source, trainable or not), or a llama.cpp-quantized GGUF
/// tensor multiplied by candle's quantized kernels (inference only; activations are quantized
/// the way llama.cpp does, so results match `quantized_llama` exactly).
#[derive(Debug, Clone)]
pub(super) enum Proj {
    Dense(Linear),
    Quant {
        mm: candle_core::quantized::QMatMul,
        bias: Option<Tensor>,
    },
    /// Dense weights plus their quantized twin for few-row inputs (decoding; [`fast`]).
    Fast(Box<fast::FastProj>),
    /// A frozen projection plus a low-rank adapter: `base(x) + scale (x A^T) B^T`.
    Lora {
        base: Box<Proj>,
        /// `(r, in)`.
        a: Tensor,
        /// `(out, r)`.
        b: Tensor,
        scale: f64,
    },
}

impl Proj {
    pub(super) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Proj::Dense(l) => linear(l, x),
            Proj::Quant { mm, bias } => {
                let y = mm.forward(x)?;
                match bias {
                    Some(b) => y.broadcast_add(b),
                    None => Ok(y),
                }
            }
            Proj::Fast(f) => f.forward(x),
            Proj::Lora { base, a, b, scale } => {
                let low = crate::kernels::blas::matmul_t(x, a)?;
                let side = (crate::kernels::blas::matmul_t(&low, b)? * *scale)?;
                base.forward(x)? + side
            }
        }
    }

    /// `[p.forward(x) for p in projs]`, with the quantized products of decoding projections
    /// over the same input in one pass ([`fast::forward_group`]).
    pub(super) fn forward_group<const N: usize>(
        projs: [&Proj; N],
        x: &Tensor,
    ) -> Result<[Tensor; N]> {
        let fast: Vec<&fast::FastProj> = projs
            .iter()
            .filter_map(|p| match p {
                Proj::Fast(f) => Some(&**f),
                _ => None,
            })
            .collect();
        let outs = if fast.len() == N {
            fast::forward_group(&fast, x)?
        } else {
            projs
                .iter()
                .map(|p| p.forward(x))
                .collect::<Result<Vec<_>>>()?
        };
        outs.try_into()
            .map_err(|_| candle_core::Error::Msg("one output per projection".into()))
    }

    pub(super) fn is_variable(&self) -> bool {
        matches!(self, Proj::Dense(l) if l.weight().is_variable())
    }

    pub(super) fn bias(&self) -> Option<Tensor> {
        match self {
            Proj::Dense(l) => l.bias().cloned(),
            Proj::Quant { bias, .. } => bias.clone(),
            Proj::Fast(f) => f.dense.bias().cloned(),
            Proj::Lora { base, .. } => base.bias(),
        }
    }

    /// `(out, in)` of a dense projection.
    pub(super) fn dense_dims(&self) -> Result<(usize, usize)> {
        match self {
            Proj::Dense(l) => l.weight().dims2(),
            Proj::Quant { mm, .. } => match mm {
                candle_core::quantized::QMatMul::QTensor(q) => q.shape().dims2(),
                candle_core::quantized::QMatMul::Tensor(t)
                | candle_core::quantized::QMatMul::TensorF16(t) => t.dims2(),
            },
            Proj::Fast(f) => f.dense.weight().dims2(),
            Proj::Lora { base, .. } => base.dense_dims(),
        }
    }

    /// Put the adapter `(a, b, scale)` on this projection: merged into dense weights
    /// (`W + scale B A`, inference), or as a side path (`train`, or quantized weights).
    pub(super) fn with_lora(self, a: Tensor, b: Tensor, scale: f64, train: bool) -> Result<Proj> {
        match self {
            Proj::Dense(l) if !train => Ok(Proj::Dense(merged(&l, &a, &b, scale)?)),
            // Merged into the dense weights, and beside the quantized twin as a side path.
            Proj::Fast(f) if !train && f.side.is_none() => {
                Ok(Proj::Fast(Box::new(fast::FastProj {
                    dense: merged(&f.dense, &a, &b, scale)?,
                    q: f.q,
                    act: f.act,
                    side: Some(fast::FastProj::low_rank(&a, &b, scale)?),
                    coarse: Default::default(),
                })))
            }
            Proj::Fast(f) => Proj::Dense(f.dense).with_lora(a, b, scale, train),
            base => Ok(Proj::Lora {
                base: Box::new(base),
                a,
                b,
                scale,
            }),
        }
    }

    pub(super) fn quant(q: candle_core::quantized::QTensor, bias: Option<Tensor>) -> Result<Self> {
        Ok(Proj::Quant {
            mm: candle_core::quantized::QMatMul::from_qtensor(q)?,
            bias,
        })
    }
}

/// `W + scale B A`: an adapter merged into a dense projection.
fn merged(l: &Linear, a: &Tensor, b: &Tensor, scale: f64) -> Result<Linear> {
    let w = (l.weight() + (b.matmul(a)? * scale)?.to_dtype(l.weight().dtype())?)?;
    Ok(Linear::new(w, l.bias().cloned()))
}

/// `l.forward(x)`, except that when `x` needs a gradient and the weight is frozen (a plain
/// tensor, not a `Var`) the backward pass computes only the input's gradient: candle's matmul
/// backward always computes both operands' gradients, and for a frozen decoder the weights' are
/// thrown away (in training the encoder through a frozen decoder, they were most of the work).
pub(super) fn linear(l: &Linear, x: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::F32 {
        // The system BLAS: faster, and it skips a frozen weight's gradient by itself.
        return crate::kernels::blas::linear(l, x);
    }
    if !x.track_op() || l.weight().is_variable() {
        return l.forward(x);
    }
    let y = l.forward(&x.detach())?;
    y.apply_op2(x, InputGradOnly(l.weight().clone()))
}

/// Passes its first argument `y = x W^T (+ b)` through unchanged; its backward gives the second
/// argument `x` the gradient `grad W` and `y` none (`y` was computed from a detached `x`).
struct InputGradOnly(Tensor);

impl InputGradOnly {
    fn pass<S: candle_core::backend::BackendStorage>(s: &S, l: &Layout) -> Result<(S, Shape)> {
        if !l.is_contiguous() || l.start_offset() != 0 {
            candle_core::bail!("frozen linear: output is not a fresh contiguous tensor");
        }
        Ok((s.try_clone(l)?, l.shape().clone()))
    }
}

impl CustomOp2 for InputGradOnly {
    fn name(&self) -> &'static str {
        "frozen-linear-input-grad"
    }

    fn cpu_fwd(
        &self,
        s: &CpuStorage,
        l: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        Self::pass(s, l)
    }

    fn cuda_fwd(
        &self,
        s: &CudaStorage,
        l: &Layout,
        _: &CudaStorage,
        _: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        Self::pass(s, l)
    }

    fn metal_fwd(
        &self,
        s: &MetalStorage,
        l: &Layout,
        _: &MetalStorage,
        _: &Layout,
    ) -> Result<(MetalStorage, Shape)> {
        Self::pass(s, l)
    }

    fn bwd(
        &self,
        _y: &Tensor,
        _x: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // (.., out) @ (out, in) -> (.., in)
        Ok((None, Some(grad.broadcast_matmul(&self.0)?)))
    }
}
