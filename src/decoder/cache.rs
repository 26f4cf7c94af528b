//! The key/value cache: one preallocated buffer per layer, written in place.
//!
//! Each layer's keys and values live in a `(b, kv_heads, capacity, head_dim)` tensor allocated on
//! the first write; later tokens are copied into it with `slice_set`, and attention reads a
//! narrowed view. Nothing is re-allocated per token; if a sequence outgrows the capacity the
//! buffer doubles (one copy, amortised). `truncate` rolls the cache back, e.g. to reuse a shared
//! prompt prefix. The cache is for inference: writes in place do not back-propagate.
//!
//! A cache may store its keys and values in another dtype than the model computes in
//! ([`KvCache::stored_as`]): f16 halves the bytes a decoding step reads after a long context
//! (the split-key attention kernel reads f16 rows directly, as llama.cpp's default cache does).

use candle_core::{DType, Result, Tensor};

/// Keys and values of one layer.
#[derive(Debug, Clone, Default)]
struct LayerKv {
    /// `(b, kv_heads, capacity, head_dim)` each, allocated on first use.
    buf: Option<(Tensor, Tensor)>,
}

/// Per-layer key/value cache; its length is the position the next token gets.
#[derive(Debug, Clone)]
pub struct KvCache {
    layers: Vec<LayerKv>,
    len: usize,
    capacity: usize,
    /// Storage dtype of keys and values (`None`: the dtype they come in).
    store: Option<DType>,
}

impl KvCache {
    /// An empty cache for `num_layers` layers that holds `capacity` positions before it grows.
    pub fn new(num_layers: usize, capacity: usize) -> Self {
        KvCache {
            layers: vec![LayerKv::default(); num_layers],
            len: 0,
            capacity: capacity.max(1),
            store: None,
        }
    }

    /// The same cache storing keys and values as `dtype` (`None`: as they come in).
    pub fn stored_as(mut self, dtype: Option<DType>) -> Self {
        self.store = dtype;
        self
    }

    /// The storage dtype, when it is fixed.
    pub fn storage(&self) -> Option<DType> {
        self.store
    }

    /// Number of cached positions.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Positions that fit before the buffers grow.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Forget everything (keeps the buffers, so the next sequence reuses the memory; a new batch
    /// size allocates afresh).
    pub fn reset(&mut self) {
        self.len = 0;
    }

    /// Keep only the first `len` positions (no-op when `len >= self.len()`).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    pub(crate) fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Write `k`, `v` (b, kv_heads, t, head_dim) of layer `layer` at the current length and
    /// return all cached keys and values (b, kv_heads, len + t, head_dim), in the storage dtype.
    /// The length itself advances in `advance`, once every layer has been written.
    pub(crate) fn append(
        &mut self,
        layer: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let (k, v) = match self.store {
            Some(dt) if dt != k.dtype() => (k.to_dtype(dt)?, v.to_dtype(dt)?),
            _ => (k.clone(), v.clone()),
        };
        let (b, h, t, d) = k.dims4()?;
        let end = self.len + t;
        if end > self.capacity {
            self.capacity = end.max(2 * self.capacity);
        }
        let len = self.len;
        let capacity = self.capacity;
        let slot = &mut self.layers[layer];
        let (same_shape, big_enough) = match &slot.buf {
            Some((kb, _)) => {
                let (bb, bh, bt, bd) = kb.dims4()?;
                (
                    (bb, bh, bd) == (b, h, d) && kb.dtype() == k.dtype(),
                    bt >= end,
                )
            }
            None => (false, false),
        };
        if !same_shape && len > 0 {
            candle_core::bail!(
                "kv cache: layer {layer} holds {len} positions of another batch shape or dtype; reset it first"
            );
        }
        if !(same_shape && big_enough) {
            let kb = Tensor::zeros((b, h, capacity, d), k.dtype(), k.device())?;
            let vb = Tensor::zeros((b, h, capacity, d), v.dtype(), v.device())?;
            if let (Some((old_k, old_v)), true) = (&slot.buf, len > 0) {
                kb.slice_set(&old_k.narrow(2, 0, len)?.contiguous()?, 2, 0)?;
                vb.slice_set(&old_v.narrow(2, 0, len)?.contiguous()?, 2, 0)?;
            }
            slot.buf = Some((kb, vb));
        }
        let (kb, vb) = slot.buf.as_ref().expect("allocated above");
        kb.slice_set(&k.contiguous()?, 2, self.len)?;
        vb.slice_set(&v.contiguous()?, 2, self.len)?;
        Ok((kb.narrow(2, 0, end)?, vb.narrow(2, 0, end)?))
    }

    /// Advance the length by `t` positions after every layer has appended them.
    pub(crate) fn advance(&mut self, t: usize) {
        self.len += t;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn appends_grows_and_truncates() -> Result<()> {
        let dev = Device::Cpu;
        let mut c = KvCache::new(1, 3);
        let a = Tensor::arange(0f32, 8., &dev)?.reshape((1, 1, 2, 4))?;
        let (k, _) = c.append(0, &a, &a)?;
        c.advance(2);
        assert_eq!(k.dims(), &[1, 1, 2, 4]);
        let b = Tensor::ones((1, 1, 2, 4), DType::F32, &dev)?;
        let (k, v) = c.append(0, &b, &b)?; // grows past 3
        c.advance(2);
        assert_eq!(c.len(), 4);
        assert!(c.capacity() >= 4);
        let want = Tensor::cat(&[&a, &b], 2)?;
        let diff = (k - &want)?.abs()?.sum_all()?.to_scalar::<f32>()?;
        assert_eq!(diff, 0.0);
        assert_eq!(v.dims(), &[1, 1, 4, 4]);
        c.truncate(1);
        let (k, _) = c.append(0, &b, &b)?;
        c.advance(2);
        assert_eq!(k.dims(), &[1, 1, 3, 4]);
        assert_eq!(c.len(), 3);
        Ok(())
    }

    #[test]
    fn a_half_cache_stores_f16_and_reads_back_the_values_rounded() -> Result<()> {
        let dev = Device::Cpu;
        let mut c = KvCache::new(1, 2).stored_as(Some(DType::F16));
        let a = (Tensor::arange(0f32, 8., &dev)?.reshape((1, 1, 2, 4))? * 0.3)?;
        c.append(0, &a, &a)?;
        c.advance(2);
        let (k, v) = c.append(0, &a, &a)?; // grows, copying the f16 rows
        assert_eq!((k.dtype(), v.dtype()), (DType::F16, DType::F16));
        let want = Tensor::cat(&[&a, &a], 2)?;
        let back = k.to_dtype(DType::F32)?;
        let diff = (back - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 2e-3, "{diff}");
        Ok(())
    }
}
