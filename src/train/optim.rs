//! AdamW with parameter groups (each its own learning-rate scale, e.g. a slower decoder),
//! gradients accumulated over micro-batches, global gradient-norm clipping, and moments that can
//! be saved and restored so a resumed run continues exactly where it stopped.
//!
//! Update (PyTorch's AdamW): `p -= lr * wd * p` for matrices (not biases or norms), then
//! `m = b1 m + (1 - b1) g`, `v = b2 v + (1 - b2) g^2`, `p -= lr * m_hat / (sqrt(v_hat) + eps)`.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor, Var};

/// Variables that share a learning-rate scale.
#[derive(Clone)]
pub struct Group {
    pub name: String,
    pub vars: Vec<(String, Var)>,
    /// Multiplies the scheduled learning rate.
    pub lr_scale: f64,
}

/// AdamW hyper-parameters.
#[derive(Debug, Clone, Copy)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

/// Accumulated gradients, per group and variable (`None`: the variable got no gradient).
pub struct Grads(Vec<Vec<Option<Tensor>>>);

impl Grads {
    /// Multiply every accumulated gradient by `s` (averaging over micro-batches).
    pub fn scale(&mut self, s: f64) -> Result<()> {
        for g in self.0.iter_mut().flatten().flatten() {
            *g = (&*g * s)?;
        }
        Ok(())
    }
}

/// The moments of one variable: host vectors updated in one fused loop on the CPU (a dozen
/// tensor ops per update would each sweep the whole variable), tensors elsewhere.
enum Moments {
    Host { m: Vec<f32>, v: Vec<f32> },
    Device { m: Tensor, v: Tensor },
}

impl Moments {
    fn zeros(var: &Var) -> Result<Self> {
        Ok(if var.device().is_cpu() {
            let n = var.elem_count();
            Moments::Host {
                m: vec![0.0; n],
                v: vec![0.0; n],
            }
        } else {
            Moments::Device {
                m: var.as_tensor().zeros_like()?,
                v: var.as_tensor().zeros_like()?,
            }
        })
    }

    /// `(m, v)` as tensors shaped like `var`.
    fn tensors(&self, var: &Var) -> Result<(Tensor, Tensor)> {
        Ok(match self {
            Moments::Host { m, v } => (
                Tensor::from_vec(m.clone(), var.shape(), var.device())?,
                Tensor::from_vec(v.clone(), var.shape(), var.device())?,
            ),
            Moments::Device { m, v } => (m.clone(), v.clone()),
        })
    }

    fn set(&mut self, m: &Tensor, v: &Tensor) -> Result<()> {
        *self = match self {
            Moments::Host { .. } => Moments::Host {
                m: m.flatten_all()?.to_vec1()?,
                v: v.flatten_all()?.to_vec1()?,
            },
            Moments::Device { .. } => Moments::Device {
                m: m.clone(),
                v: v.clone(),
            },
        };
        Ok(())
    }
}

/// Learning rate, gradient scale and bias corrections of one update.
#[derive(Clone, Copy)]
struct Update {
    lr: f64,
    gscale: f64,
    bc1: f64,
    bc2: f64,
}

pub struct AdamW {
    groups: Vec<Group>,
    moments: Vec<Vec<Moments>>,
    /// Updates done (for bias correction).
    pub t: u64,
    cfg: AdamWConfig,
}

impl AdamW {
    pub fn new(groups: Vec<Group>, cfg: AdamWConfig) -> Result<Self> {
        let moments = groups
            .iter()
            .map(|g| g.vars.iter().map(|(_, v)| Moments::zeros(v)).collect())
            .collect::<Result<_>>()?;
        Ok(Self {
            groups,
            moments,
            t: 0,
            cfg,
        })
    }

    pub fn groups(&self) -> &[Group] {
        &self.groups
    }

    /// Number of trainable scalars.
    pub fn num_params(&self) -> usize {
        self.groups
            .iter()
            .flat_map(|g| &g.vars)
            .map(|(_, v)| v.elem_count())
            .sum()
    }

    /// Empty accumulators.
    pub fn zero_grads(&self) -> Grads {
        Grads(
            self.groups
                .iter()
                .map(|g| vec![None; g.vars.len()])
                .collect(),
        )
    }

    /// Add `scale * grad` of every variable from one backward pass.
    pub fn accumulate(&self, acc: &mut Grads, store: &GradStore, scale: f64) -> Result<()> {
        for (gi, g) in self.groups.iter().enumerate() {
            for (vi, (_, var)) in g.vars.iter().enumerate() {
                let Some(grad) = store.get(var.as_tensor()) else {
                    continue;
                };
                let grad = if scale == 1.0 {
                    grad.clone()
                } else {
                    (grad * scale)?
                };
                let slot = &mut acc.0[gi][vi];
                *slot = Some(match slot.take() {
                    Some(s) => (s + grad)?,
                    None => grad,
                });
            }
        }
        Ok(())
    }

    /// Global L2 norm of the accumulated gradients.
    pub fn grad_norm(grads: &Grads) -> Result<f64> {
        let mut sq = 0f64;
        for g in grads.0.iter().flatten().flatten() {
            sq += f64::from(g.sqr()?.sum_all()?.to_scalar::<f32>()?);
        }
        Ok(sq.sqrt())
    }

    /// One update with base learning rate `lr`, after clipping the global gradient norm to `clip`
    /// (0 = no clipping). Returns the norm before clipping.
    pub fn step(&mut self, grads: &Grads, lr: f64, clip: f64) -> Result<f64> {
        let norm = Self::grad_norm(grads)?;
        if !norm.is_finite() {
            bail!("gradient norm is {norm}: the loss diverged (try a lower --lr)");
        }
        let gscale = if clip > 0.0 && norm > clip {
            clip / (norm + 1e-6)
        } else {
            1.0
        };
        self.t += 1;
        let c = self.cfg;
        let u = |scale: f64| Update {
            lr: lr * scale,
            gscale,
            bc1: 1.0 - c.beta1.powi(self.t as i32),
            bc2: 1.0 - c.beta2.powi(self.t as i32),
        };
        for (gi, g) in self.groups.iter().enumerate() {
            let u = u(g.lr_scale);
            for (vi, (_, var)) in g.vars.iter().enumerate() {
                let Some(grad) = &grads.0[gi][vi] else {
                    continue;
                };
                match &mut self.moments[gi][vi] {
                    Moments::Host { m, v } => update_host(&c, u, var, grad, m, v)?,
                    Moments::Device { m, v } => update_device(&c, u, var, grad, m, v)?,
                }
            }
        }
        Ok(norm)
    }

    /// Save the moments (`<group>/<var>/m`, `.../v`) to `path` atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut map = HashMap::new();
        for (gi, g) in self.groups.iter().enumerate() {
            for (vi, (name, _)) in g.vars.iter().enumerate() {
                let (m, v) = self.moments[gi][vi].tensors(&g.vars[vi].1)?;
                map.insert(format!("{}/{name}/m", g.name), m);
                map.insert(format!("{}/{name}/v", g.name), v);
            }
        }
        let dir = path.parent().unwrap_or(Path::new("."));
        let tmp = tempfile::Builder::new()
            .suffix(".safetensors")
            .tempfile_in(dir)
            .with_context(|| format!("creating a temporary file in {}", dir.display()))?;
        candle_core::safetensors::save(&map, tmp.path())
            .with_context(|| format!("writing {}", path.display()))?;
        tmp.persist(path)
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(())
    }

    /// Restore moments saved by [`AdamW::save`] for the same groups and shapes, and the update
    /// count `t`; anything missing or of another shape is an error naming it.
    pub fn load(&mut self, path: &Path, t: u64, device: &Device) -> Result<()> {
        let file = candle_core::safetensors::load(path, device)
            .with_context(|| format!("reading {}", path.display()))?;
        let expected: usize = self.groups.iter().map(|g| 2 * g.vars.len()).sum();
        if file.len() != expected {
            bail!(
                "{}: {} tensors, the optimiser has {expected} (other trainable parts?)",
                path.display(),
                file.len()
            );
        }
        for (gi, g) in self.groups.iter().enumerate() {
            for (vi, (name, var)) in g.vars.iter().enumerate() {
                let mut mv = Vec::with_capacity(2);
                for kind in ["m", "v"] {
                    let key = format!("{}/{name}/{kind}", g.name);
                    let Some(t) = file.get(&key) else {
                        bail!("{}: missing tensor '{key}'", path.display());
                    };
                    if t.dims() != var.dims() {
                        bail!(
                            "{}: tensor '{key}' has shape {:?}, expected {:?}",
                            path.display(),
                            t.dims(),
                            var.dims()
                        );
                    }
                    mv.push(t.to_dtype(var.dtype())?);
                }
                self.moments[gi][vi].set(&mv[0], &mv[1])?;
            }
        }
        self.t = t;
        Ok(())
    }
}

/// One AdamW update of `var` with host moments, in a single pass over its values.
fn update_host(
    c: &AdamWConfig,
    u: Update,
    var: &Var,
    grad: &Tensor,
    m: &mut [f32],
    v: &mut [f32],
) -> Result<()> {
    let mut p: Vec<f32> = var.as_tensor().flatten_all()?.to_vec1()?;
    let g: Vec<f32> = grad
        .flatten_all()?
        .to_dtype(candle_core::DType::F32)?
        .to_vec1()?;
    let decay = if var.rank() >= 2 {
        (1.0 - u.lr * c.weight_decay) as f32
    } else {
        1.0
    };
    let (b1, b2, eps) = (c.beta1 as f32, c.beta2 as f32, c.eps as f32);
    let (gs, lr) = (u.gscale as f32, u.lr as f32);
    let (inv_bc1, inv_bc2) = (1.0 / u.bc1 as f32, 1.0 / u.bc2 as f32);
    // Element-wise over up to 10^8 parameters: in parallel blocks, in a form that vectorises.
    use rayon::prelude::*;
    const BLOCK: usize = 1 << 16;
    p.par_chunks_mut(BLOCK)
        .zip(m.par_chunks_mut(BLOCK))
        .zip(v.par_chunks_mut(BLOCK))
        .zip(g.par_chunks(BLOCK))
        .for_each(|(((p, m), v), g)| {
            for (((p, m), v), g) in p.iter_mut().zip(m).zip(v).zip(g) {
                let gi = g * gs;
                *m = b1 * *m + (1.0 - b1) * gi;
                *v = b2 * *v + (1.0 - b2) * gi * gi;
                *p = *p * decay - lr * (*m * inv_bc1) / ((*v * inv_bc2).sqrt() + eps);
            }
        });
    var.set(&Tensor::from_vec(p, var.shape(), var.device())?)?;
    Ok(())
}

/// The same update in tensor ops (GPU variables).
fn update_device(
    c: &AdamWConfig,
    u: Update,
    var: &Var,
    grad: &Tensor,
    m: &mut Tensor,
    v: &mut Tensor,
) -> Result<()> {
    let grad = (grad * u.gscale)?;
    *m = ((&*m * c.beta1)? + (&grad * (1.0 - c.beta1))?)?;
    *v = ((&*v * c.beta2)? + (grad.sqr()? * (1.0 - c.beta2))?)?;
    let mut p = var.as_tensor().clone();
    if c.weight_decay > 0.0 && p.rank() >= 2 {
        p = (p * (1.0 - u.lr * c.weight_decay))?;
    }
    let denom = ((&*v / u.bc2)?.sqrt()? + c.eps)?;
    let upd = ((&*m / u.bc1)? / denom)?;
    var.set(&(p - (upd * u.lr)?)?)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;

    fn quad() -> (Var, AdamW) {
        let x = Var::from_tensor(&Tensor::new(&[[3f32, -2.]], &Device::Cpu).unwrap()).unwrap();
        let g = Group {
            name: "p".into(),
            vars: vec![("x".into(), x.clone())],
            lr_scale: 1.0,
        };
        let cfg = AdamWConfig {
            weight_decay: 0.0,
            ..Default::default()
        };
        (x, AdamW::new(vec![g], cfg).unwrap())
    }

    fn step(x: &Var, opt: &mut AdamW, clip: f64) -> f64 {
        let loss = x.as_tensor().sqr().unwrap().sum_all().unwrap();
        let mut acc = opt.zero_grads();
        opt.accumulate(&mut acc, &loss.backward().unwrap(), 1.0)
            .unwrap();
        opt.step(&acc, 0.1, clip).unwrap()
    }

    #[test]
    fn first_step_moves_each_coordinate_by_lr_and_clipping_reports_the_raw_norm() {
        let (x, mut opt) = quad();
        let norm = step(&x, &mut opt, 1.0);
        assert!((norm - (36f64 + 16.).sqrt()).abs() < 1e-4);
        let v = x.as_tensor().to_vec2::<f32>().unwrap();
        assert!(
            (v[0][0] - 2.9).abs() < 1e-5 && (v[0][1] + 1.9).abs() < 1e-5,
            "{v:?}"
        );
    }

    #[test]
    fn saved_moments_resume_identically() {
        let dir = tempfile::tempdir().unwrap();
        let (x, mut a) = quad();
        step(&x, &mut a, 0.0);
        a.save(&dir.path().join("o.safetensors")).unwrap();
        let (y, mut b) = quad();
        y.set(x.as_tensor()).unwrap();
        b.load(&dir.path().join("o.safetensors"), a.t, &Device::Cpu)
            .unwrap();
        step(&x, &mut a, 0.0);
        step(&y, &mut b, 0.0);
        let d = (x.as_tensor() - y.as_tensor()).unwrap().abs().unwrap();
        assert_eq!(d.sum_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
        let z = Var::zeros((2, 2), DType::F32, &Device::Cpu).unwrap();
        let g = Group {
            name: "p".into(),
            vars: vec![("x".into(), z)],
            lr_scale: 1.0,
        };
        let mut c = AdamW::new(vec![g], AdamWConfig::default()).unwrap();
        let e = c.load(&dir.path().join("o.safetensors"), 1, &Device::Cpu);
        assert!(format!("{:#}", e.unwrap_err()).contains("has shape [1, 2]"));
    }
}

#[cfg(test)]
mod fused_tests {
    use super::*;

    #[test]
    fn host_loop_equals_tensor_ops() {
        let dev = Device::Cpu;
        let c = AdamWConfig::default();
        let u = Update {
            lr: 0.01,
            gscale: 0.5,
            bc1: 0.1,
            bc2: 0.001,
        };
        let w = Tensor::new(&[[0.5f32, -1.0], [2.0, 0.25]], &dev).unwrap();
        let g = Tensor::new(&[[0.1f32, -0.3], [0.7, 0.0]], &dev).unwrap();
        let (a, b) = (Var::from_tensor(&w).unwrap(), Var::from_tensor(&w).unwrap());
        let (mut hm, mut hv) = (vec![0.2f32; 4], vec![0.1f32; 4]);
        let mut dm = Tensor::full(0.2f32, (2, 2), &dev).unwrap();
        let mut dv = Tensor::full(0.1f32, (2, 2), &dev).unwrap();
        update_host(&c, u, &a, &g, &mut hm, &mut hv).unwrap();
        update_device(&c, u, &b, &g, &mut dm, &mut dv).unwrap();
        let d = (a.as_tensor() - b.as_tensor()).unwrap().abs().unwrap();
        assert!(d.max_all().unwrap().to_scalar::<f32>().unwrap() < 1e-6);
        let dm: Vec<f32> = dm.flatten_all().unwrap().to_vec1().unwrap();
        assert!(hm.iter().zip(&dm).all(|(x, y)| (x - y).abs() < 1e-7));
    }
}
