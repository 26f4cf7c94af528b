//! REFRAG inference end to end on tiny random models (nothing downloads): `--p 1` is exactly the
//! full-context input (same embeddings, same logits), the chunk cache changes nothing but the
//! time, the same seed gives the same output, and bad flags get a one-line error.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_core::{DType, Device, Tensor};
use refrag::cli::SelectMode;
use refrag::decoder::Logits;
use refrag::pipeline::{Passage, Refrag, StageTimes};
use serde_json::Value;

const PASSAGES: &[&str] = &[
    "TITLE: Atlas Entry — City_10007. City_10007 lies on the banks of River_042 and was founded in 1320. Its landmark is Landmark_17.",
    "TITLE: Encyclopedia of Materials — Alloy_10002. Composition: Metal_05 61%. Melting point: 903 °C. It is used in bearings.",
    "TITLE: Biography — Person_10003. Person_10003 is a researcher in Field_05 affiliated with Institution_074.",
    "TITLE: Historical Timeline — Event_10004. The Event_10004 occurred in 1639 near City_021. It involved trade reforms.",
];

struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        refrag::testing::bert::write_tiny_bert(&dir.path().join("bert"), 1, Some("mean")).unwrap();
        refrag::testing::llama::write_tiny_llama(&dir.path().join("llama"), 2).unwrap();
        let mut corpus = String::new();
        for i in 0..6 {
            for p in PASSAGES {
                corpus.push_str(&p.replace("100", &format!("10{i}")));
                corpus.push('\n');
            }
        }
        std::fs::write(dir.path().join("corpus.txt"), corpus).unwrap();
        Self { dir }
    }

    fn s(&self, rel: &str) -> String {
        self.path(rel).to_string_lossy().into_owned()
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// `index` with the tiny models; `cache_k` adds the chunk cache.
    fn index(&self, name: &str, cache_k: Option<usize>) -> Output {
        let mut args: Vec<String> = [
            "index",
            "--corpus",
            &self.s("corpus.txt"),
            "--index_dir",
            &self.s(name),
            "--embed_model",
            &self.s("bert"),
            "--quiet",
        ]
        .map(String::from)
        .to_vec();
        if let Some(k) = cache_k {
            args.extend(
                [
                    "--enc",
                    &self.s("bert"),
                    "--dec",
                    &self.s("llama"),
                    "--k",
                    &k.to_string(),
                ]
                .map(String::from),
            );
        }
        run(&args)
    }

    fn generate(&self, index: &str, extra: &[&str]) -> Output {
        self.generate_with_dec(index, &self.s("llama"), extra)
    }

    fn generate_with_dec(&self, index: &str, dec: &str, extra: &[&str]) -> Output {
        self.ask(index, dec, "Which river flows through City_10007?", extra)
    }

    fn ask(&self, index: &str, dec: &str, question: &str, extra: &[&str]) -> Output {
        let mut args: Vec<String> = [
            "generate",
            "--index_dir",
            &self.s(index),
            "--embed_model",
            &self.s("bert"),
            "--enc",
            &self.s("bert"),
            "--dec",
            dec,
            "--question",
            question,
            "--topk",
            "3",
        ]
        .map(String::from)
        .to_vec();
        args.extend(extra.iter().map(|s| s.to_string()));
        // Defaults unless `extra` sets them; the tiny decoder holds 512 positions, so the
        // default --ctx_max 2048 would not fit.
        for (flag, value) in [("--max_new", "6"), ("--ctx_max", "320")] {
            if !extra.contains(&flag) {
                args.extend([flag, value].map(String::from));
            }
        }
        run(&args)
    }
}

fn run(args: &[String]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_refrag"))
        .args(args)
        .output()
        .expect("running refrag")
}

fn json(o: &Output) -> Value {
    assert!(
        o.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).expect("one JSON object on stdout")
}

fn load(dir: &Path) -> Refrag {
    let s = |r: &str| dir.join(r).to_string_lossy().into_owned();
    Refrag::load(Some(&s("bert")), &s("llama"), None, 0, &Device::Cpu).unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

#[test]
fn p_one_is_exactly_the_full_context_input() {
    let f = Fixture::new();
    let r = load(f.dir.path());
    let passages: Vec<Passage> = PASSAGES
        .iter()
        .enumerate()
        .map(|(id, t)| Passage {
            id,
            text: t.to_string(),
        })
        .collect();
    let prep = r
        .prepare(
            "Which river flows through City_10007?",
            &passages,
            None,
            4,
            4096,
        )
        .unwrap();
    let mut times = StageTimes::default();
    let (mask, embeds) = r
        .select_and_embed(&prep, SelectMode::Heuristic, 1.0, 0, None, &mut times)
        .unwrap();
    assert!(mask.iter().all(|&m| m) && embeds.is_none());
    let x = prep
        .layout
        .assemble(|ids| Ok(r.decoder.embed(ids)?), None, &mask, &Device::Cpu)
        .unwrap();
    let ids = Tensor::new(prep.layout.full_ids(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    assert_eq!(max_diff(&x, &r.decoder.embed(&ids).unwrap()), 0.0);
    let a = r.decoder.forward_embeds(&x, None, Logits::Last).unwrap();
    let b = r.decoder.forward_ids(&ids, None, Logits::Last).unwrap();
    assert_eq!(max_diff(&a, &b), 0.0);
    // The full-context ids are the template around the passages' own tokens, in order.
    let full = prep.layout.full_ids();
    for p in PASSAGES {
        let t = r.dtok.encode(p, false).unwrap();
        assert!(
            full.windows(t.len()).any(|w| w == t.as_slice()),
            "passage tokens not contiguous"
        );
    }
}

#[test]
fn compression_shrinks_the_input_and_keeps_the_template() {
    let f = Fixture::new();
    let r = load(f.dir.path());
    let passages: Vec<Passage> = PASSAGES
        .iter()
        .enumerate()
        .map(|(id, t)| Passage {
            id,
            text: t.to_string(),
        })
        .collect();
    let prep = r.prepare("q?", &passages, None, 4, 4096).unwrap();
    let mut times = StageTimes::default();
    let (mask, embeds) = r
        .select_and_embed(&prep, SelectMode::None, 0.0, 0, None, &mut times)
        .unwrap();
    let l = prep.layout.chunks.len();
    let x = prep
        .layout
        .assemble(
            |ids| Ok(r.decoder.embed(ids)?),
            embeds.as_ref(),
            &mask,
            &Device::Cpu,
        )
        .unwrap();
    let full = prep.layout.num_positions(&vec![true; l]);
    let tokens: usize = prep.layout.chunks.iter().map(|c| c.tokens.len()).sum();
    assert_eq!(x.dim(1).unwrap(), full - tokens + l);
    assert_eq!(x.dtype(), DType::F32);
}

#[test]
fn generate_cli_full_context_and_compressed() {
    let f = Fixture::new();
    assert!(f.index("idx", None).status.success());
    let full = json(&f.generate("idx", &["--p", "1"]));
    assert_eq!(full["positions"], full["positions_full"]);
    assert_eq!(full["meta"]["chunk_cache"], false);
    let all = json(&f.generate("idx", &["--select", "all", "--p", "0.3"]));
    assert_eq!(
        all["answer"], full["answer"],
        "--select all must equal --p 1"
    );
    let comp = json(&f.generate("idx", &["--p", "0.25"]));
    assert!(comp["positions"].as_u64() < comp["positions_full"].as_u64());
    assert!(comp["compression"].as_f64().unwrap() > 1.0);
    for key in ["TTFT_sec", "TTIT_avg_sec", "throughput_tok_per_sec"] {
        assert!(comp[key].is_number(), "{key}");
    }
    // TTIT is per decoding forward pass: one per token after the first, plus the pass that
    // produced EOS when decoding stopped before --max_new (6 in this fixture).
    for g in [&full, &comp] {
        let (n, fw) = (
            g["answer_tokens"].as_u64().unwrap(),
            g["decode_forwards"].as_u64().unwrap(),
        );
        let expect = if n == 6 { n - 1 } else { n };
        assert_eq!(fw, expect, "{g}");
    }
    for stage in [
        "retrieval",
        "encoding",
        "projection",
        "selection",
        "prefill",
    ] {
        assert!(comp["ttft_breakdown_sec"][stage].is_number(), "{stage}");
    }
    let mask = comp["meta"]["expand_mask"].as_array().unwrap();
    let expanded = mask.iter().filter(|m| m.as_bool().unwrap()).count();
    assert_eq!(expanded, (0.25 * mask.len() as f64).round() as usize);
}

#[test]
fn chunk_cache_gives_the_same_answer_without_encoding() {
    let f = Fixture::new();
    assert!(f.index("plain", None).status.success());
    let o = f.index("cached", Some(4));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(f.path("cached/chunks.safetensors").is_file());
    for select in ["heuristic", "random", "none"] {
        let a = json(&f.generate("plain", &["--p", "0.5", "--k", "4", "--select", select]));
        let b = json(&f.generate("cached", &["--p", "0.5", "--k", "4", "--select", select]));
        assert_eq!(b["meta"]["chunk_cache"], true);
        assert_eq!(
            a["meta"]["expand_mask"], b["meta"]["expand_mask"],
            "{select}"
        );
        assert_eq!(a["answer"], b["answer"], "{select}");
        assert_eq!(a["positions"], b["positions"]);
    }
    // A cache built for another k is not used, and generate says why.
    let o = f.generate("cached", &["--p", "0.5", "--k", "8"]);
    let v = json(&o);
    assert_eq!(v["meta"]["chunk_cache"], false);
    assert!(String::from_utf8_lossy(&o.stderr).contains("built with k=4, not 8"));
}

#[test]
fn same_seed_same_sample() {
    let f = Fixture::new();
    assert!(f.index("idx", None).status.success());
    let args = [
        "--p",
        "0.25",
        "--temperature",
        "1.5",
        "--top_p",
        "0.95",
        "--seed",
        "11",
    ];
    let a = json(&f.generate("idx", &args));
    let b = json(&f.generate("idx", &args));
    assert_eq!(a["answer"], b["answer"]);
    assert_eq!(a["meta"]["expand_mask"], b["meta"]["expand_mask"]);
}

#[test]
fn quantized_gguf_decoder_generates_and_an_hf_one_is_refused() {
    let f = Fixture::new();
    assert!(f.index("idx", None).status.success());
    let gguf = f.path("tiny_q8.gguf");
    refrag::testing::llama::write_tiny_decoder_gguf_as(
        &gguf,
        2,
        refrag::decoder::Arch::Llama,
        candle_core::quantized::GgmlDType::Q8_0,
    )
    .unwrap();
    let g = f.s("tiny_q8.gguf");
    let out = json(&f.generate_with_dec("idx", &g, &["--quantized", "--p", "0.5"]));
    assert!(out["answer"].is_string(), "{out}");
    let o = f.generate("idx", &["--quantized"]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    let last = err.trim_end().lines().last().unwrap_or_default();
    assert!(last.contains("--quantized needs a GGUF"), "{err}");
}

#[test]
fn bad_flags_are_one_line_errors() {
    let f = Fixture::new();
    assert!(f.index("idx", None).status.success());
    for (flag, value, needle) in [
        ("--p", "1.5", "--p must be in [0, 1]"),
        ("--k", "0", "--k must be at least 1"),
        ("--top_p", "0", "--top_p"),
    ] {
        let o = f.generate("idx", &[flag, value]);
        assert_eq!(o.status.code(), Some(1));
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
        assert!(err.contains(needle), "{err}");
    }
    let o = f.generate("idx", &["--select", "policy"]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("needs a trained policy"));
}

/// The one error line of a failed run (exit status 1).
fn error_line(o: &Output) -> String {
    assert_eq!(
        o.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    err
}

#[test]
fn empty_question_and_max_new_zero_are_refused() {
    let f = Fixture::new();
    assert!(f.index("idx", None).status.success());
    for q in ["", "   \t"] {
        let err = error_line(&f.ask("idx", &f.s("llama"), q, &[]));
        assert!(err.contains("--question is empty"), "{err}");
    }
    let err = error_line(&f.generate("idx", &["--max_new", "0"]));
    assert!(err.contains("--max_new must be at least 1"), "{err}");
}

#[test]
fn too_long_a_question_fails_fast_with_the_numbers() {
    let f = Fixture::new();
    assert!(f.index("idx", None).status.success());
    let words = vec!["river"; 20_000].join(" ");
    let t = std::time::Instant::now();
    let o = f.ask("idx", &f.s("llama"), &words, &[]);
    let secs = t.elapsed().as_secs_f64();
    let err = error_line(&o);
    assert!(
        err.contains("--question is too long for the decoder"),
        "{err}"
    );
    for n in [
        "question tokens",
        "template tokens",
        "--ctx_max 320",
        "--max_new 6",
    ] {
        assert!(err.contains(n), "{n}: {err}");
    }
    assert!(err.contains("window of 512"), "{err}");
    assert!(secs < 10.0, "took {secs:.1} s to fail");
    // A question that fits, with a context cap that does not: the message says what would fit.
    let err = error_line(&f.generate("idx", &["--ctx_max", "2048"]));
    assert!(err.contains("--ctx_max 2048 leaves no room"), "{err}");
    assert!(err.contains("or less"), "{err}");
}

#[test]
fn batched_chunk_scores_equal_one_by_one() {
    let f = Fixture::new();
    let r = load(f.dir.path());
    let chunked: Vec<Vec<Vec<u32>>> = PASSAGES
        .iter()
        .map(|p| refrag::prompt::chunk_tokens(&r.dtok.encode(p, false).unwrap(), 5))
        .collect();
    let batch = refrag::pipeline::chunk_scores_batch(&r.decoder, &r.dtok, &chunked).unwrap();
    for (chunks, got) in chunked.iter().zip(&batch) {
        let one = refrag::pipeline::chunk_scores(&r.decoder, &r.dtok, chunks).unwrap();
        assert_eq!(one.len(), chunks.len());
        for (a, b) in one.iter().zip(got) {
            assert!((a - b).abs() < 1e-4, "{a} vs {b}");
            assert!(*a > 0.0, "a chunk's mean NLL is positive");
        }
    }
}
