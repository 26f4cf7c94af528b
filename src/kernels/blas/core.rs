//! OpenBLAS's kernels for CPUs it does not know.
//!
//! A `DYNAMIC_ARCH` OpenBLAS picks its kernels from the CPU model when it loads; a CPU newer than
//! the library (Debian 12's OpenBLAS 0.3.21 on a Sapphire Rapids Xeon) falls back to
//! `Prescott`, SSE3 kernels, and every product runs 3-4x slower than the CPU allows (measured:
//! prefill 212 tokens/s with Prescott, 705 with SkylakeX, on the same 2-core Xeon). The choice
//! is made before `main`, so the only remedy is the one OpenBLAS documents: `OPENBLAS_CORETYPE`
//! in the environment. [`ensure`] sets it from the CPU's features and runs the binary again, once,
//! when the library fell back; a user's own `OPENBLAS_CORETYPE` is always left alone.

use std::ffi::CStr;
use std::os::raw::c_char;

/// The kernel family to ask for when OpenBLAS chose `corename`: `None` unless it fell back to
/// `Prescott` while the CPU has AVX-512 (`SkylakeX`) or AVX2 + FMA (`Haswell`).
pub fn better_core(corename: &str, avx512: bool, avx2_fma: bool) -> Option<&'static str> {
    if !corename.eq_ignore_ascii_case("prescott") {
        return None;
    }
    if avx512 {
        Some("SkylakeX")
    } else if avx2_fma {
        Some("Haswell")
    } else {
        None
    }
}

/// Whether OpenBLAS's kernel family `corename` uses AVX-512 (OpenBLAS's names for the Intel
/// families with it; its AMD names, `Zen`, run the Haswell kernels).
pub fn uses_avx512(corename: &str) -> bool {
    ["skylakex", "cooperlake", "sapphirerapids"]
        .iter()
        .any(|n| corename.eq_ignore_ascii_case(n))
}

/// This CPU has the AVX-512 subsets OpenBLAS's SkylakeX kernels need.
#[cfg(target_arch = "x86_64")]
fn cpu_avx512() -> bool {
    std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bw")
        && std::arch::is_x86_feature_detected!("avx512vl")
        && std::arch::is_x86_feature_detected!("avx512dq")
        && std::arch::is_x86_feature_detected!("avx512cd")
}

/// A one-line note when the user's own `OPENBLAS_CORETYPE` keeps OpenBLAS below what this CPU
/// runs (e.g. `Haswell` on an AVX-512 CPU: half the sgemm rate, measured 108 against 200
/// GFLOP/s a core on a Zen 5 EPYC). [`ensure`] leaves a user's choice alone; the commands whose
/// time is mostly products (training, `bench`) say so instead of silently running slower.
pub fn user_choice_note() -> Option<String> {
    #[cfg(target_arch = "x86_64")]
    {
        let set = std::env::var("OPENBLAS_CORETYPE").ok()?;
        let name = corename()?;
        (cpu_avx512() && !uses_avx512(&name)).then(|| {
            format!(
                "refrag: OPENBLAS_CORETYPE={set} keeps OpenBLAS on its {name} kernels on this \
                 AVX-512 CPU (about half the sgemm rate); unset it or set SkylakeX"
            )
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        None
    }
}

/// OpenBLAS's name for the kernels it chose, when the process has OpenBLAS.
pub fn corename() -> Option<String> {
    // SAFETY: dlsym with RTLD_DEFAULT only looks a symbol up; a non-null result for this name is
    // OpenBLAS's `char *openblas_get_corename(void)`, which returns a static C string.
    unsafe {
        let f = libc::dlsym(libc::RTLD_DEFAULT, c"openblas_get_corename".as_ptr());
        if f.is_null() {
            return None;
        }
        let f =
            std::mem::transmute::<*mut libc::c_void, unsafe extern "C" fn() -> *const c_char>(f);
        let name = f();
        (!name.is_null()).then(|| CStr::from_ptr(name).to_string_lossy().into_owned())
    }
}

/// When OpenBLAS fell back to generic kernels on a CPU with AVX2 or AVX-512 and the user set no
/// `OPENBLAS_CORETYPE`, run this binary again (same arguments, same process id) with the kernel
/// family the CPU supports. Returns only when nothing is to be done or the re-run failed.
pub fn ensure() {
    #[cfg(all(target_arch = "x86_64", unix))]
    {
        use std::os::unix::process::CommandExt;
        if std::env::var_os("OPENBLAS_CORETYPE").is_some() {
            return;
        }
        let Some(name) = corename() else {
            return;
        };
        let avx512 = cpu_avx512();
        let avx2_fma = std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma");
        let Some(core) = better_core(&name, avx512, avx2_fma) else {
            return;
        };
        let Ok(exe) = std::env::current_exe() else {
            return;
        };
        // `exec` only returns on failure; then this process goes on with the slow kernels.
        let _ = std::process::Command::new(exe)
            .args(std::env::args_os().skip(1))
            .env("OPENBLAS_CORETYPE", core)
            .exec();
    }
}

#[cfg(test)]
mod tests {
    use super::{better_core, uses_avx512};

    #[test]
    fn avx512_families_are_named() {
        assert!(uses_avx512("SkylakeX") && uses_avx512("COOPERLAKE"));
        assert!(!uses_avx512("Haswell") && !uses_avx512("Zen") && !uses_avx512("Prescott"));
    }

    #[test]
    fn only_a_fallback_is_replaced() {
        assert_eq!(better_core("Prescott", true, true), Some("SkylakeX"));
        assert_eq!(better_core("prescott", false, true), Some("Haswell"));
        assert_eq!(better_core("Prescott", false, false), None);
        assert_eq!(better_core("Zen", true, true), None);
        assert_eq!(better_core("SkylakeX", true, true), None);
    }
}
