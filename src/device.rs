//! Picks the device a command runs on: `--device auto` tries CUDA, then Metal, then the CPU.
//! The choice is printed to stderr so a run's log always says where it ran.

use anyhow::{bail, Result};
use candle_core::{DType, Device};
use clap::ValueEnum;

/// Where to run: `auto` picks CUDA, then Metal, then the CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum DeviceArg {
    #[default]
    Auto,
    Cpu,
    Cuda,
    Metal,
}

/// Resolve `--device` to a candle device and report the choice on stderr.
pub fn select(arg: DeviceArg) -> Result<Device> {
    let device = resolve(arg)?;
    eprintln!("refrag: device {}", describe(&device));
    Ok(device)
}

/// Resolve `--device` without printing anything.
pub fn resolve(arg: DeviceArg) -> Result<Device> {
    match arg {
        DeviceArg::Cpu => Ok(Device::Cpu),
        DeviceArg::Cuda => {
            if !cfg!(feature = "cuda") {
                bail!("--device cuda: this binary was built without the `cuda` feature (cargo build --release --features cuda)");
            }
            Ok(Device::new_cuda(0)?)
        }
        DeviceArg::Metal => {
            if !cfg!(feature = "metal") {
                bail!("--device metal: this binary was built without the `metal` feature (cargo build --release --features metal)");
            }
            Ok(Device::new_metal(0)?)
        }
        DeviceArg::Auto => {
            if candle_core::utils::cuda_is_available() {
                if let Ok(d) = Device::new_cuda(0) {
                    return Ok(d);
                }
            }
            if candle_core::utils::metal_is_available() {
                if let Ok(d) = Device::new_metal(0) {
                    return Ok(d);
                }
            }
            Ok(Device::Cpu)
        }
    }
}

/// "cpu", "cuda:0" or "metal:0".
pub fn describe(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".to_string(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

/// The float type models compute in: f32 on the CPU, bf16 on CUDA, f16 on Metal.
pub fn compute_dtype(device: &Device) -> DType {
    match device {
        Device::Cpu => DType::F32,
        Device::Cuda(_) => DType::BF16,
        Device::Metal(_) => DType::F16,
    }
}

/// Wait for queued device work to finish, so that a clock read afterwards is honest.
pub fn sync(device: &Device) -> Result<()> {
    device.synchronize()?;
    Ok(())
}
