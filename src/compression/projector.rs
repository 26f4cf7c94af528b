//! The projector `phi`: a 2-layer MLP (Linear, GELU, Linear) from the chunk encoder's width to the
//! decoder's token-embedding width. A fresh projector is initialised from a seeded generator (same
//! seed, same weights) with its output scaled to the spread of the decoder's token embeddings, so
//! even an untrained projector feeds the decoder vectors of a plausible size.

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::{Linear, Module, VarBuilder, VarMap};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::kernels::blas;

/// Projector shapes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ProjectorConfig {
    pub in_dim: usize,
    pub hidden: usize,
    pub out_dim: usize,
}

/// `phi: R^in -> R^out`.
#[derive(Debug, Clone)]
pub struct Projector {
    l1: Linear,
    l2: Linear,
}

impl Projector {
    /// Build from variables named `fc1.{weight,bias}` and `fc2.{weight,bias}`.
    pub fn new(cfg: &ProjectorConfig, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            l1: candle_nn::linear(cfg.in_dim, cfg.hidden, vb.pp("fc1"))?,
            l2: candle_nn::linear(cfg.hidden, cfg.out_dim, vb.pp("fc2"))?,
        })
    }

    /// Put seeded initial weights for `cfg` into `varmap` (under `prefix`), the output layer
    /// scaled so projected vectors have about `out_std` per coordinate.
    pub fn init_vars(
        varmap: &VarMap,
        prefix: &str,
        cfg: &ProjectorConfig,
        out_std: f64,
        seed: u64,
        device: &Device,
    ) -> Result<()> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut data = varmap.data().lock().unwrap();
        let mut put = |name: &str, t: Tensor| -> Result<()> {
            data.insert(
                format!("{prefix}{name}"),
                candle_core::Var::from_tensor(&t)?,
            );
            Ok(())
        };
        // Kaiming-uniform for the first layer; the second scaled so that its output has out_std.
        let b1 = (1.0 / cfg.in_dim as f64).sqrt() * 3f64.sqrt();
        put(
            "fc1.weight",
            uniform(&mut rng, (cfg.hidden, cfg.in_dim), b1, device)?,
        )?;
        put("fc1.bias", Tensor::zeros(cfg.hidden, DType::F32, device)?)?;
        let b2 = out_std * (3.0 / cfg.hidden as f64).sqrt() * 2.0;
        put(
            "fc2.weight",
            uniform(&mut rng, (cfg.out_dim, cfg.hidden), b2, device)?,
        )?;
        put("fc2.bias", Tensor::zeros(cfg.out_dim, DType::F32, device)?)?;
        Ok(())
    }

    /// Copy the projector in `from` (reading `in` values) into `to` (reading `segments x in`
    /// values: segment pooling's runs side by side), its first layer's weight split evenly over
    /// the runs. Over runs of equal length, whose mean is the mean pooling, the widened
    /// projector gives what the narrow one gave.
    pub fn widen_vars(from: &VarMap, to: &VarMap, segments: usize) -> Result<()> {
        let src = from.data().lock().unwrap();
        let dst = to.data().lock().unwrap();
        if dst.len() != src.len() {
            candle_core::bail!(
                "widening the projector: {} tensors into {}",
                src.len(),
                dst.len()
            );
        }
        for (name, var) in dst.iter() {
            let Some(t) = src.get(name) else {
                candle_core::bail!("widening the projector: no '{name}' in the saved one");
            };
            let t = t.as_tensor();
            let t = if name == "fc1.weight" && segments > 1 {
                let parts = vec![(t / segments as f64)?; segments];
                Tensor::cat(&parts, 1)?
            } else {
                t.clone()
            };
            if t.dims() != var.dims() {
                candle_core::bail!(
                    "widening the projector: '{name}' is {:?}, the widened one {:?}",
                    t.dims(),
                    var.dims()
                );
            }
            var.set(&t)?;
        }
        Ok(())
    }
}

impl Module for Projector {
    /// `(.., in) -> (.., out)`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        blas::linear(&self.l2, &blas::linear(&self.l1, x)?.gelu()?)
    }
}

/// A tensor of uniform values in `[-bound, bound]` from `rng`.
pub fn uniform(
    rng: &mut ChaCha8Rng,
    shape: (usize, usize),
    bound: f64,
    device: &Device,
) -> Result<Tensor> {
    let n = shape.0 * shape.1;
    let v: Vec<f32> = (0..n)
        .map(|_| rng.random_range(-bound..=bound) as f32)
        .collect();
    Tensor::from_vec(v, shape, device)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn build(seed: u64) -> Projector {
        let dev = Device::Cpu;
        let vm = VarMap::new();
        let cfg = ProjectorConfig {
            in_dim: 8,
            hidden: 16,
            out_dim: 4,
        };
        Projector::init_vars(&vm, "", &cfg, 0.5, seed, &dev).unwrap();
        Projector::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &dev)).unwrap()
    }

    #[test]
    fn a_widened_projector_of_repeated_inputs_gives_the_narrow_output() {
        let dev = Device::Cpu;
        let narrow = build(3);
        let vm = VarMap::new();
        let narrow_vm = VarMap::new();
        let cfg = ProjectorConfig {
            in_dim: 8,
            hidden: 16,
            out_dim: 4,
        };
        Projector::init_vars(&narrow_vm, "", &cfg, 0.5, 3, &dev).unwrap();
        let wide = ProjectorConfig { in_dim: 32, ..cfg };
        Projector::init_vars(&vm, "", &wide, 0.5, 9, &dev).unwrap();
        Projector::widen_vars(&narrow_vm, &vm, 4).unwrap();
        let wide_p = Projector::new(&wide, VarBuilder::from_varmap(&vm, DType::F32, &dev)).unwrap();
        let x = Tensor::randn(0f32, 1.0, (5, 8), &dev).unwrap();
        let x4 = Tensor::cat(&[&x, &x, &x, &x], 1).unwrap();
        let a = narrow.forward(&x).unwrap();
        let b = wide_p.forward(&x4).unwrap();
        assert!(crate::testing::max_abs_diff(&a, &b) < 1e-5);
        // A projector of another width does not widen into it.
        let other = VarMap::new();
        Projector::init_vars(
            &other,
            "",
            &ProjectorConfig { in_dim: 6, ..cfg },
            0.5,
            3,
            &dev,
        )
        .unwrap();
        assert!(Projector::widen_vars(&other, &vm, 4).is_err());
    }

    #[test]
    fn same_seed_same_projection_with_the_asked_spread() {
        let x = Tensor::randn(0f32, 1.0, (256, 8), &Device::Cpu).unwrap();
        let a = build(1).forward(&x).unwrap();
        let b = build(1).forward(&x).unwrap();
        assert_eq!(crate::testing::max_abs_diff(&a, &b), 0.0);
        let std: f32 = a
            .sqr()
            .unwrap()
            .mean_all()
            .unwrap()
            .sqrt()
            .unwrap()
            .to_scalar()
            .unwrap();
        assert!(std > 0.1 && std < 2.0, "std {std}");
    }
}
