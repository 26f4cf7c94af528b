//! `refrag eval` end to end: the real binary on a tiny random BERT (retrieval and chunk encoder)
//! and a tiny random Llama (decoder), in a fresh temporary directory. Checks the JSON report's
//! fields, that p = 1 gives exactly the full-context answers and positions, that p < 1
//! compresses, and that bad flags fail in one line.

mod common;
use common::{refrag, stderr};

use std::path::PathBuf;
use std::process::Output;

use serde_json::Value;

/// A scratch directory with `bert/`, `dec/`, a corpus of entity passages, its QA pairs, and an
/// index `idx` (no chunk cache) plus `idx_cached` (chunk cache for `dec`, k = 4).
struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        refrag::testing::bert::write_tiny_bert(&dir.path().join("bert"), 1, Some("mean")).unwrap();
        refrag::testing::llama::write_tiny_llama(&dir.path().join("dec"), 3).unwrap();
        let f = Self { dir };
        let (mut corpus, mut qa) = (String::new(), String::new());
        for i in 0..10 {
            let city = 10_000 + i;
            let river = 400 + 7 * i;
            corpus.push_str(&format!("TITLE: Atlas Entry — City_{city}. City_{city} lies on the banks of River_{river} and was founded in {}.\n", 1500 + i));
            qa.push_str(&format!("{{\"id\":\"q{i}\",\"question\":\"Which river flows through City_{city}?\",\"answers\":[\"River_{river}\"]}}\n"));
        }
        std::fs::write(f.path("corpus.txt"), corpus).unwrap();
        std::fs::write(f.path("qa.jsonl"), qa).unwrap();
        let (c, b, d) = (f.s("corpus.txt"), f.s("bert"), f.s("dec"));
        for (idx, extra) in [
            ("idx", vec![]),
            ("idx_cached", vec!["--enc", &b, "--dec", &d, "--k", "4"]),
        ] {
            let i = f.s(idx);
            let mut args = vec![
                "index",
                "--corpus",
                &c,
                "--index_dir",
                &i,
                "--embed_model",
                &b,
                "--quiet",
            ];
            args.extend(extra);
            let o = refrag(&args);
            assert!(o.status.success(), "index: {}", stderr(&o));
        }
        f
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn s(&self, rel: &str) -> String {
        self.path(rel).to_string_lossy().into_owned()
    }

    /// Run eval on `idx` writing `out`; `extra` flags after the common ones.
    fn eval(&self, idx: &str, out: &str, extra: &[&str]) -> Output {
        let (q, i, b, d, o) = (
            self.s("qa.jsonl"),
            self.s(idx),
            self.s("bert"),
            self.s("dec"),
            self.s(out),
        );
        let mut args = vec![
            "eval",
            "--rag_json",
            &q,
            "--index_dir",
            &i,
            "--embed_model",
            &b,
            "--enc",
            &b,
            "--dec",
            &d,
            "--k",
            "4",
            "--topk",
            "2",
            "--out",
            &o,
            "--quiet",
        ];
        args.extend_from_slice(extra);
        // Defaults unless `extra` sets them; the tiny decoder holds 512 positions.
        for (flag, value) in [("--max_new", "4"), ("--ctx_max", "320")] {
            if !extra.contains(&flag) {
                args.extend([flag, value]);
            }
        }
        refrag(&args)
    }

    fn report(&self, out: &str) -> Value {
        serde_json::from_slice(&std::fs::read(self.path(out)).unwrap()).unwrap()
    }
}

/// The results of `mode` in question record `q`.
fn result<'a>(q: &'a Value, mode: &str) -> &'a Value {
    q["results"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["mode"] == mode)
        .unwrap_or_else(|| panic!("no {mode} in {q}"))
}

fn summary<'a>(report: &'a Value, mode: &str) -> &'a Value {
    report["modes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["mode"] == mode)
        .unwrap_or_else(|| panic!("no {mode} summary"))
}

#[test]
fn p_one_equals_full_context_and_p_below_one_compresses() {
    let f = Fixture::new();
    let o = f.eval("idx", "p1.json", &["--p", "1"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let table = String::from_utf8_lossy(&o.stdout);
    for mode in [
        "no-context",
        "full",
        "compressed",
        "topn-full",
        "heuristic",
        "random",
    ] {
        assert!(table.contains(&format!("| {mode} |")), "{table}");
    }
    assert!(table.contains("recall@2"), "{table}");
    let r = f.report("p1.json");
    assert_eq!(r["n"], 10);
    let recall = r["recall_at_topk"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&recall));
    assert_eq!(r["config"]["chunk_cache"], false);
    for q in r["questions"].as_array().unwrap() {
        let full = result(q, "full");
        assert_eq!(full["positions"], q["positions_full"]);
        for mode in ["heuristic", "random"] {
            let x = result(q, mode);
            assert_eq!(x["answer"], full["answer"], "{mode}: {q}");
            assert_eq!(x["positions"], full["positions"], "{mode}");
            assert_eq!(x["expanded"], x["chunks"]);
        }
        // At p = 1 the equal-budget baseline holds every passage: it is full context.
        let topn = result(q, "topn-full");
        assert_eq!(topn["answer"], full["answer"], "{q}");
        assert_eq!(topn["positions"], full["positions"]);
        let comp = result(q, "compressed");
        assert_eq!(comp["expanded"], 0);
        assert!(comp["positions"].as_u64() < full["positions"].as_u64());
        let none = result(q, "no-context");
        assert!(none["positions"].as_u64() < full["positions"].as_u64());
        for x in q["results"].as_array().unwrap() {
            assert!(x["em"] == 0.0 || x["em"] == 1.0);
            assert!((0.0..=1.0).contains(&x["f1"].as_f64().unwrap()));
            assert!(x["ttft"].as_f64().unwrap() > 0.0);
        }
    }
    for mode in ["full", "heuristic", "random"] {
        let m = summary(&r, mode);
        assert_eq!(m["compression"], 1.0, "{mode}");
        assert_eq!(m["p"], 1.0);
        assert!(m["ttft_median"].as_f64().unwrap() > 0.0);
    }
    assert_eq!(summary(&r, "no-context")["compression"], Value::Null);
    assert_eq!(summary(&r, "full")["speedup_vs_full"], 1.0);
}

#[test]
fn top_n_full_spends_no_more_positions_than_refrag() {
    let f = Fixture::new();
    let o = f.eval(
        "idx",
        "budget.json",
        &[
            "--p",
            "0.25",
            "--limit",
            "4",
            "--modes",
            "random,topn-full,full",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let r = f.report("budget.json");
    for q in r["questions"].as_array().unwrap() {
        let (topn, refrag, full) = (
            result(q, "topn-full"),
            result(q, "random"),
            result(q, "full"),
        );
        let (t, rf, fl) = (
            topn["positions"].as_u64().unwrap(),
            refrag["positions"].as_u64().unwrap(),
            full["positions"].as_u64().unwrap(),
        );
        // Plain passages cut at REFRAG's budget (every chunk counted at k): never more than
        // REFRAG's positions plus the short last chunks, and fewer than full context.
        assert!(t < fl, "{q}");
        assert!(t <= rf + 4 * refrag["expanded"].as_u64().unwrap(), "{q}");
        assert_eq!(topn["expanded"], topn["chunks"]);
    }
}

#[test]
fn compressed_modes_with_the_chunk_cache() {
    let f = Fixture::new();
    let o = f.eval(
        "idx_cached",
        "p0.json",
        &[
            "--p",
            "0.25",
            "--limit",
            "3",
            "--modes",
            "full,heuristic,random",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let r = f.report("p0.json");
    assert_eq!(r["n"], 3);
    assert_eq!(r["config"]["chunk_cache"], true);
    assert_eq!(r["modes"].as_array().unwrap().len(), 3);
    for mode in ["heuristic", "random"] {
        let m = summary(&r, mode);
        assert!(m["compression"].as_f64().unwrap() > 1.0, "{mode}: {m}");
        assert!(m["positions_mean"].as_f64() < m["positions_full_mean"].as_f64());
        // Cached: neither the encoder nor the decoder runs over the passages before prefill.
        let b = &m["ttft_breakdown_mean"];
        assert!(b["encoding"].as_f64().unwrap() < m["ttft_mean"].as_f64().unwrap());
    }
    for q in r["questions"].as_array().unwrap() {
        let x = result(q, "heuristic");
        let chunks = x["chunks"].as_u64().unwrap();
        assert_eq!(x["expanded"], (chunks as f64 * 0.25).round() as u64);
        assert!(q["results"].as_array().unwrap().len() == 3);
    }
}

#[test]
fn bad_flags_fail_in_one_line() {
    let f = Fixture::new();
    for (extra, needle) in [
        (vec!["--modes", "policy"], "--modes policy"),
        (vec!["--select", "random"], "--select"),
        (vec!["--p", "2"], "--p"),
        (vec!["--limit", "0"], "--limit"),
        (
            vec!["--max_new", "0"],
            "'--max_new <MAX_NEW>': must be at least 1",
        ),
        (vec!["--ctx_max", "2048"], "--ctx_max 2048 leaves no room"),
    ] {
        let o = f.eval("idx", "bad.json", &extra);
        assert!(!o.status.success(), "{extra:?} succeeded");
        let err: Vec<String> = stderr(&o)
            .lines()
            .filter(|l| !l.starts_with("refrag: device") && !l.contains("untrained"))
            .map(String::from)
            .collect();
        assert_eq!(err.len(), 1, "{extra:?}: {err:?}");
        assert!(err[0].contains(needle), "{extra:?}: {err:?}");
    }
    assert!(!f.path("bad.json").exists());
    // A question of the file that is blank, or too long, is named by its id (line number).
    let long = vec!["river"; 20_000].join(" ");
    for (question, needle) in [
        ("  ", "question 2 is empty"),
        (long.as_str(), "question 2 is too long"),
    ] {
        let qa = format!(
            "{{\"id\":\"q0\",\"question\":\"Which river?\",\"answers\":[\"x\"]}}\n{}\n",
            serde_json::json!({"question": question, "answers": ["y"]})
        );
        std::fs::write(f.path("qa.jsonl"), qa).unwrap();
        let err = stderr(&f.eval("idx", "bad.json", &[]));
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
        assert!(
            err.contains("qa.jsonl question 2") && err.contains(needle),
            "{err}"
        );
    }
    assert!(!f.path("bad.json").exists());
    let q = f.s("missing.jsonl");
    let o = refrag(&["eval", "--rag_json", &q, "--index_dir", "x", "--quiet"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("missing.jsonl"), "{}", stderr(&o));
}

#[test]
fn squad_file_runs_without_conversion_or_index() {
    let f = Fixture::new();
    let mut paragraphs = Vec::new();
    for i in 0..6 {
        let (city, river) = (20_000 + i, 500 + 3 * i);
        paragraphs.push(serde_json::json!({
            "context": format!("City_{city} lies on the banks of River_{river}. It was founded in {}.", 1600 + i),
            "qas": [
                {"id": format!("s{i}"), "question": format!("Which river flows through City_{city}?"),
                 "answers": [{"text": format!("River_{river}"), "answer_start": 25}]},
                {"id": format!("u{i}"), "question": "Unanswerable?", "answers": [], "is_impossible": true},
            ],
        }));
    }
    let squad = serde_json::json!({"version": "v2.0", "data": [
        {"title": "Atlas", "paragraphs": paragraphs[..3]},
        {"title": "Gazetteer", "paragraphs": paragraphs[3..]},
    ]});
    std::fs::write(f.path("dev.json"), squad.to_string()).unwrap();
    let (q, b, d, o) = (f.s("dev.json"), f.s("bert"), f.s("dec"), f.s("squad.json"));
    let common = [
        "eval",
        "--rag_json",
        &q,
        "--embed_model",
        &b,
        "--enc",
        &b,
        "--dec",
        &d,
        "--k",
        "4",
        "--topk",
        "1",
        "--retrieval",
        "lexical",
        "--max_new",
        "2",
        "--ctx_max",
        "320",
        "--modes",
        "full",
        "--quiet",
    ];
    // No --index_dir: the paragraphs become a temporary index, removed at the end.
    let tmp_before = squad_tmp_dirs();
    let mut args = common.to_vec();
    args.extend(["--out", &o]);
    let out = refrag(&args);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("skipped 6 questions without answers"),
        "{}",
        stderr(&out)
    );
    assert!(
        stderr(&out).contains("indexed the 6 paragraphs"),
        "{}",
        stderr(&out)
    );
    assert_eq!(squad_tmp_dirs(), tmp_before);
    let report = f.report("squad.json");
    assert_eq!(report["n"], 6);
    assert_eq!(report["recall_at_topk"], 1.0, "{report}");
    assert_eq!(report["questions"][0]["id"], "s0");
    assert_eq!(report["questions"][0]["answers"][0], "River_500");
    // With --index_dir the given index is used instead.
    let i = f.s("idx");
    let mut args = common.to_vec();
    args.extend(["--out", &o, "--index_dir", &i]);
    let out = refrag(&args);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!stderr(&out).contains("temporary index"));
    assert_eq!(f.report("squad.json")["recall_at_topk"], 0.0);
    // A QA JSONL file has no paragraphs to index: --index_dir is required.
    let qa = f.s("qa.jsonl");
    let out = refrag(&["eval", "--rag_json", &qa, "--out", &o, "--quiet"]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.contains("--index_dir is required"), "{err}");
}

/// The `refrag-squad-*` temporary directories that exist now.
fn squad_tmp_dirs() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("refrag-squad-")
        })
        .collect();
    v.sort();
    v
}
