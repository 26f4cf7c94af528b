//! `refrag bench` end to end: the real binary on a tiny random BERT (chunk encoder) and a tiny
//! random Llama (decoder) in a fresh temporary directory. Checks the rows of `bench.json`, that
//! p = 1 gives the full-context input, that p < 1 compresses, that contexts the decoder cannot
//! hold are skipped, and that the plot is written.

mod common;
use common::{refrag, stderr};

use std::path::PathBuf;
use std::process::Output;

use serde_json::Value;

struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        refrag::testing::bert::write_tiny_bert(&dir.path().join("bert"), 1, Some("mean")).unwrap();
        refrag::testing::llama::write_tiny_llama(&dir.path().join("dec"), 3).unwrap();
        let corpus: String = (0..20)
            .map(|i| format!("TITLE: Atlas Entry — City_{0}. City_{0} lies on the banks of River_{1} and was founded in {2}.\n", 10_000 + i, 400 + i, 1500 + i))
            .collect();
        std::fs::write(dir.path().join("corpus.txt"), corpus).unwrap();
        Self { dir }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn s(&self, rel: &str) -> String {
        self.path(rel).to_string_lossy().into_owned()
    }

    fn bench(&self, out_dir: &str, extra: &[&str]) -> Output {
        let (c, b, d, o) = (
            self.s("corpus.txt"),
            self.s("bert"),
            self.s("dec"),
            self.s(out_dir),
        );
        let mut args = vec![
            "bench",
            "--corpus",
            &c,
            "--enc",
            &b,
            "--dec",
            &d,
            "--out_dir",
            &o,
            "--warmup",
            "1",
            "--repeats",
            "2",
            "--max_new",
            "2",
            "--quiet",
        ];
        args.extend_from_slice(extra);
        refrag(&args)
    }
}

#[test]
fn rows_plot_and_the_p_one_invariant() {
    let f = Fixture::new();
    // The tiny decoder holds 512 positions: 4096 cannot fit and is skipped.
    let o = f.bench(
        "out",
        &["--contexts", "64,128,4096", "--ks", "4,8", "--p", "0,0.5,1"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("skipping --contexts [4096]"),
        "{}",
        stderr(&o)
    );
    let rows: Vec<Value> =
        serde_json::from_slice(&std::fs::read(f.path("out/bench.json")).unwrap()).unwrap();
    assert_eq!(rows.len(), 2 * 2 * 2 * 3); // contexts x ks x cached x p
    for r in &rows {
        for key in [
            "k",
            "context_tokens",
            "cached",
            "ttft_full_sec",
            "ttft_refrag_sec",
            "speedup",
            "ttit_sec",
            "tokens_per_sec",
            "prefill_tok_per_sec_full",
            "peak_fraction_full",
        ] {
            assert!(!r[key].is_null(), "{key} missing in {r}");
        }
        let (full, refrag) = (
            r["ttft_full_sec"].as_f64().unwrap(),
            r["ttft_refrag_sec"].as_f64().unwrap(),
        );
        assert!(full > 0.0 && refrag > 0.0);
        assert!((r["speedup"].as_f64().unwrap() - full / refrag).abs() < 1e-9);
        let flop = r["flop_speedup"].as_f64().unwrap();
        assert!(
            if r["p"] == 1.0 {
                flop == 1.0
            } else {
                flop > 1.0
            },
            "{r}"
        );
        let (pf, pr) = (
            r["positions_full"].as_u64().unwrap(),
            r["positions_refrag"].as_u64().unwrap(),
        );
        let ctx = r["context_tokens"].as_u64().unwrap();
        assert!(pf > ctx, "the template adds positions");
        if r["p"] == 1.0 {
            assert_eq!(pr, pf, "p=1 is the full-context input: {r}");
            assert_eq!(r["expanded"], r["chunks"]);
            assert_eq!(r["encoding_sec"], 0.0);
        } else {
            assert!(pr < pf, "{r}");
        }
        if r["p"] == 0.0 {
            // Every chunk is one position: L chunks replace the context's tokens.
            assert_eq!(pf - pr, ctx - r["chunks"].as_u64().unwrap());
        }
        if r["cached"] == true && r["p"] != 1.0 {
            // The chunk encoder does not run inside TTFT when its vectors are cached.
            assert!(r["encoding_sec"].as_f64().unwrap() < 0.05, "{r}");
        }
        assert!(r["tokens_per_sec"].as_f64().unwrap() > 0.0);
        assert!(r["peak_fraction_full"].as_f64().unwrap() > 0.0);
    }
    // Rows of one context share the full-context baseline.
    let full64: Vec<f64> = rows
        .iter()
        .filter(|r| r["context_tokens"] == 64)
        .map(|r| r["ttft_full_sec"].as_f64().unwrap())
        .collect();
    assert!(full64.windows(2).all(|w| w[0] == w[1]));
    let svg = std::fs::read_to_string(f.path("out/ttft.svg")).unwrap();
    assert!(svg.contains("<svg") && svg.contains("full context (p=1)"));
    let meta: Value =
        serde_json::from_slice(&std::fs::read(f.path("out/meta.json")).unwrap()).unwrap();
    assert_eq!(meta["contexts_skipped"], serde_json::json!([4096]));
    assert!(meta["decoder_gflop_per_token"].as_f64().unwrap() > 0.0);
    let table = String::from_utf8_lossy(&o.stdout);
    assert!(table.contains("| k | context | p | cached |"), "{table}");
    assert!(table.contains("prefill tok/s"), "{table}");
}

#[test]
fn cache_flag_and_bad_flags() {
    let f = Fixture::new();
    let o = f.bench(
        "on",
        &["--contexts", "32", "--ks", "8", "--p", "0", "--cache", "on"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let rows: Vec<Value> =
        serde_json::from_slice(&std::fs::read(f.path("on/bench.json")).unwrap()).unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["cached"], true);
    assert_eq!(rows[0]["chunks"], 4);
    for (extra, needle) in [
        (vec!["--contexts", "0"], "--contexts"),
        (vec!["--ks", "0"], "--ks"),
        (vec!["--p", "1.5"], "--p"),
        (vec!["--repeats", "0"], "--repeats"),
        (vec!["--contexts", "4096"], "--contexts"),
    ] {
        let o = f.bench("bad", &extra);
        assert!(!o.status.success(), "{extra:?} succeeded");
        let last = stderr(&o).lines().last().unwrap_or("").to_string();
        assert!(last.contains(needle), "{extra:?}: {}", stderr(&o));
    }
    let o = refrag(&["bench", "--corpus", &f.s("missing.txt"), "--quiet"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("missing.txt"), "{}", stderr(&o));
}
