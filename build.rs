//! Records the compiled cargo features so `refrag --version` can print them.

fn main() {
    let mut features = vec!["cpu"];
    for (name, env) in [
        ("cuda", "CARGO_FEATURE_CUDA"),
        ("metal", "CARGO_FEATURE_METAL"),
        ("mkl", "CARGO_FEATURE_MKL"),
        ("accelerate", "CARGO_FEATURE_ACCELERATE"),
    ] {
        if std::env::var_os(env).is_some() {
            features.push(name);
        }
    }
    println!("cargo:rustc-env=REFRAG_FEATURES={}", features.join(","));
}
