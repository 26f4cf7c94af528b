//! Trainable copies of models whose weights come from files. A model is built through a
//! `VarBuilder` whose backend hands out each requested tensor as a fresh `Var` recorded in a
//! `VarMap`, so the map ends up holding exactly the model's variables under the names it asked
//! for (the names the file uses, so a saved map loads back into the same model or into the
//! inference code). Missing tensors and wrong shapes are errors naming the tensor; tensors in the
//! file that the model never asked for are an error too unless the caller allows extras (a
//! pretrained BERT file carries a pooler the encoder does not use).

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Mutex;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder, VarMap};

/// Backend that turns tensors into recorded variables.
struct Capture {
    tensors: HashMap<String, Tensor>,
    varmap: VarMap,
    used: Mutex<HashSet<String>>,
}

impl SimpleBackend for Capture {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _h: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = self.get_unchecked(name, dtype, dev)?;
        if t.shape() != &s {
            candle_core::bail!(
                "tensor '{name}' has shape {:?}, the model expects {:?}",
                t.dims(),
                s.dims()
            );
        }
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let mut data = self.varmap.data().lock().unwrap();
        if let Some(v) = data.get(name) {
            return Ok(v.as_tensor().clone());
        }
        let Some(t) = self.tensors.get(name) else {
            candle_core::bail!("missing tensor '{name}'");
        };
        let var = Var::from_tensor(&t.to_dtype(dtype)?.to_device(dev)?)?;
        let out = var.as_tensor().clone();
        data.insert(name.to_string(), var);
        self.used.lock().unwrap().insert(name.to_string());
        Ok(out)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }
}

/// Build a model with `build` over variables initialised from `tensors`; returns the model and
/// the map of its variables. `source` names the tensors' origin in errors.
pub fn build_trainable<M>(
    tensors: HashMap<String, Tensor>,
    allow_extra: bool,
    source: &str,
    device: &Device,
    build: impl FnOnce(VarBuilder) -> candle_core::Result<M>,
) -> Result<(M, VarMap)> {
    let varmap = VarMap::new();
    let names: Vec<String> = tensors.keys().cloned().collect();
    let backend = Capture {
        tensors,
        varmap: varmap.clone(),
        used: Mutex::new(HashSet::new()),
    };
    let vb = VarBuilder::from_backend(Box::new(backend), DType::F32, device.clone());
    let model = build(vb).with_context(|| format!("building from {source}"))?;
    let n_used = varmap.data().lock().unwrap().len();
    if !allow_extra && n_used != names.len() {
        let data = varmap.data().lock().unwrap();
        let extra: Vec<&String> = names.iter().filter(|n| !data.contains_key(*n)).collect();
        if let Some(first) = extra.first() {
            bail!(
                "{source}: unexpected tensor '{first}' ({} not used by the model; checkpoint from another model?)",
                extra.len()
            );
        }
    }
    Ok((model, varmap))
}

/// Read a safetensors file to f32 tensors on `device`.
pub fn read_tensors(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    let t = candle_core::safetensors::load(path, device)
        .with_context(|| format!("reading {}", path.display()))?;
    t.into_iter()
        .map(|(k, v)| Ok((k, v.to_dtype(DType::F32)?)))
        .collect()
}

/// Every variable of `varmap` by name, sorted (a stable order for optimisers and hashes).
pub fn named_vars(varmap: &VarMap) -> Vec<(String, Var)> {
    let data = varmap.data().lock().unwrap();
    let mut v: Vec<(String, Var)> = data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tensors() -> HashMap<String, Tensor> {
        let dev = Device::Cpu;
        HashMap::from([
            (
                "l.weight".to_string(),
                Tensor::ones((3, 2), DType::F32, &dev).unwrap(),
            ),
            (
                "l.bias".to_string(),
                Tensor::zeros(3, DType::F32, &dev).unwrap(),
            ),
            (
                "pooler".to_string(),
                Tensor::zeros(1, DType::F32, &dev).unwrap(),
            ),
        ])
    }

    #[test]
    fn extras_only_when_allowed_and_missing_never() {
        let dev = Device::Cpu;
        let lin = |vb: VarBuilder| candle_nn::linear(2, 3, vb.pp("l"));
        let (l, vm) = build_trainable(tensors(), true, "t", &dev, lin).unwrap();
        assert_eq!(named_vars(&vm).len(), 2);
        assert!(l.weight().is_variable());
        let e = build_trainable(tensors(), false, "t", &dev, lin)
            .err()
            .unwrap();
        assert!(
            format!("{e:#}").contains("unexpected tensor 'pooler'"),
            "{e:#}"
        );
        let wide = |vb: VarBuilder| candle_nn::linear(4, 3, vb.pp("l"));
        let e = build_trainable(tensors(), true, "t", &dev, wide)
            .err()
            .unwrap();
        assert!(
            format!("{e:#}").contains("'l.weight' has shape [3, 2]"),
            "{e:#}"
        );
        let other = |vb: VarBuilder| candle_nn::linear(2, 3, vb.pp("m"));
        let e = build_trainable(tensors(), true, "t", &dev, other)
            .err()
            .unwrap();
        assert!(
            format!("{e:#}").contains("missing tensor 'm.weight'"),
            "{e:#}"
        );
    }
}
