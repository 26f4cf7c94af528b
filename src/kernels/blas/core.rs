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
        let avx512 = std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vl")
            && std::arch::is_x86_feature_detected!("avx512dq")
            && std::arch::is_x86_feature_detected!("avx512cd");
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
    use super::better_core;

    #[test]
    fn only_a_fallback_is_replaced() {
        assert_eq!(better_core("Prescott", true, true), Some("SkylakeX"));
        assert_eq!(better_core("prescott", false, true), Some("Haswell"));
        assert_eq!(better_core("Prescott", false, false), None);
        assert_eq!(better_core("Zen", true, true), None);
        assert_eq!(better_core("SkylakeX", true, true), None);
    }
}
