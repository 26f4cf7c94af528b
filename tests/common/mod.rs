//! Helpers shared by the integration tests: run the binary, read its output, compare tensors.
//! Each test binary compiles this module and uses part of it.
#![allow(dead_code)]

use std::ffi::OsStr;
use std::process::{Command, Output};

use candle_core::{DType, Tensor};
use serde_json::Value;

/// Run the `refrag` binary with `args`.
pub fn refrag<S: AsRef<OsStr>>(args: &[S]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_refrag"))
        .args(args)
        .output()
        .expect("running refrag")
}

/// stderr as text.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The one JSON value on stdout of a run that must have succeeded.
pub fn json(o: &Output) -> Value {
    assert!(o.status.success(), "stderr: {}", stderr(o));
    serde_json::from_slice(&o.stdout).expect("one JSON value on stdout")
}

/// Largest absolute difference of two tensors of the same shape (any float dtype).
pub fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    let a = a.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
    let b = b.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}
