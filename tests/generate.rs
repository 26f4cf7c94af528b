//! REFRAG inference end to end on tiny random models (nothing downloads): `--p 1` is exactly the
//! full-context input (same embeddings, same logits), the chunk cache changes nothing but the
//! time, the same seed gives the same output, and bad flags get a one-line error.

mod common;
use common::{json, max_diff, refrag};

use std::path::{Path, PathBuf};
use std::process::Output;

use candle_core::{DType, Device, Tensor};
use refrag::compression::chunk_cache::ChunkCache;
use refrag::decoder::sample::Sampler;
use refrag::decoder::Logits;
use refrag::pipeline::{
    ChunkSource, Decode, Encode, Passage, PassageChunks, Prepared, Refrag, StageTimes,
};
use refrag::select::SelectMode;
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
        refrag(&args)
    }

    fn generate(&self, index: &str, extra: &[&str]) -> Output {
        self.generate_with_dec(index, &self.s("llama"), extra)
    }

    fn generate_with_dec(&self, index: &str, dec: &str, extra: &[&str]) -> Output {
        self.ask(index, dec, "Which river flows through City_10007?", extra)
    }

    fn ask(&self, index: &str, dec: &str, question: &str, extra: &[&str]) -> Output {
        self.generate_args(index, dec, &["--question", question], extra)
    }

    /// `generate --questions FILE` (a path relative to the fixture) with the tiny models.
    fn ask_many(&self, index: &str, file: &str, extra: &[&str]) -> Output {
        let file = self.s(file);
        self.generate_args(index, &self.s("llama"), &["--questions", &file], extra)
    }

    fn generate_args(&self, index: &str, dec: &str, ask: &[&str], extra: &[&str]) -> Output {
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
            "--topk",
            "3",
        ]
        .map(String::from)
        .to_vec();
        args.extend(ask.iter().map(|s| s.to_string()));
        args.extend(extra.iter().map(|s| s.to_string()));
        // Defaults unless `extra` sets them; the tiny decoder holds 512 positions, so the
        // default --ctx_max 2048 would not fit.
        for (flag, value) in [("--max_new", "6"), ("--ctx_max", "320")] {
            if !extra.contains(&flag) {
                args.extend([flag, value].map(String::from));
            }
        }
        refrag(&args)
    }
}

fn load(dir: &Path) -> Refrag {
    let s = |r: &str| dir.join(r).to_string_lossy().into_owned();
    Refrag::load(Some(&s("bert")), &s("llama"), None, 0, &Device::Cpu).unwrap()
}

/// [`PASSAGES`] as retrieved passages, ids in order.
fn passages() -> Vec<Passage> {
    PASSAGES
        .iter()
        .enumerate()
        .map(|(id, t)| Passage {
            id,
            text: t.to_string(),
        })
        .collect()
}

#[test]
fn p_one_is_exactly_the_full_context_input() {
    let f = Fixture::new();
    let r = load(f.dir.path());
    let passages = passages();
    let prep = r
        .prepare(
            "Which river flows through City_10007?",
            &passages,
            &Encode,
            4,
            4096,
        )
        .unwrap();
    let mut times = StageTimes::default();
    let (mask, embeds) = r
        .select_and_embed(&prep, SelectMode::Heuristic, 1.0, 0, &Encode, &mut times)
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

/// What `bench` runs (an in-memory chunk cache of the context, decoding past EOS) is the
/// pipeline `generate` runs: the same mask, the same projected rows, the same first tokens, and
/// exactly `max_new` tokens from `max_new - 1` forward passes.
#[test]
fn bench_path_is_the_generate_path() {
    let f = Fixture::new();
    let r = load(f.dir.path());
    let passages = passages();
    let q = "Which river flows through City_10007?";
    let plain = r.prepare(q, &passages, &Encode, 4, 4096).unwrap();
    let l = plain.layout.chunks.len();
    let all: Vec<usize> = (0..l).collect();
    let per_passage: Vec<Vec<Vec<u32>>> = plain
        .layout
        .chunks
        .chunk_by(|a, b| a.passage == b.passage)
        .map(|g| g.iter().map(|c| c.tokens.clone()).collect())
        .collect();
    let vectors = Encode.vectors(&r, &plain, &all).unwrap();
    let cache = ChunkCache::in_memory(("enc", "dec"), 4, &per_passage, vectors).unwrap();
    let cached = Prepared {
        layout: r.prepare(q, &passages, &Encode, 4, 4096).unwrap().layout,
        source_ids: Some(all),
        question: q.into(),
    };
    let mut t = StageTimes::default();
    let (m1, e1) = r
        .select_and_embed(&plain, SelectMode::Random, 0.25, 3, &Encode, &mut t)
        .unwrap();
    let (m2, e2) = r
        .select_and_embed(&cached, SelectMode::Random, 0.25, 3, &cache, &mut t)
        .unwrap();
    assert_eq!(m1, m2);
    assert!(m1.iter().any(|&m| m) && m1.iter().any(|&m| !m));
    let (e1, e2) = (e1.unwrap(), e2.unwrap());
    assert!(max_diff(&e1, &e2) < 1e-5);
    let stop = |stop_at_eos| Decode {
        max_new: 12,
        stop_at_eos,
    };
    let gen = |o: Decode| {
        let mut s = Sampler::new(0.0, 1.0, 0);
        r.generate_with(&cached, &m2, Some(&e2), o, &mut s, StageTimes::default())
            .unwrap()
    };
    let (bench, plain_gen) = (gen(stop(false)), gen(stop(true)));
    assert_eq!(bench.tokens.len(), 12);
    assert_eq!(bench.decode_forwards, 11);
    assert!(bench.ttit > 0.0 && bench.times.prefill > 0.0);
    let n = plain_gen.tokens.len();
    assert_eq!(bench.tokens[..n], plain_gen.tokens[..]);
    assert_eq!(bench.positions, plain_gen.positions);
}

/// A chunk source that numbers chunks from 100 and scores them as told: the pipeline reads
/// chunks, ids, vectors and heuristic scores from the source it is given, and nowhere else.
struct Scored(Vec<f32>);

impl ChunkSource for Scored {
    fn passage_chunks(&self, r: &Refrag, p: &Passage, k: usize) -> anyhow::Result<PassageChunks> {
        let mut chunks = Encode.passage_chunks(r, p, k)?;
        let from = 100 + 10 * p.id;
        chunks.ids = Some((from..from + chunks.tokens.len()).collect());
        Ok(chunks)
    }

    fn vectors(&self, r: &Refrag, prep: &Prepared, which: &[usize]) -> anyhow::Result<Tensor> {
        Encode.vectors(r, prep, which)
    }

    fn scores(&self, prep: &Prepared) -> Option<Vec<f32>> {
        Some(
            prep.layout
                .chunks
                .iter()
                .enumerate()
                .map(|(i, _)| self.0[i])
                .collect(),
        )
    }
}

#[test]
fn stages_read_chunks_from_the_source_they_are_given() {
    let f = Fixture::new();
    let r = load(f.dir.path());
    let passages = passages();
    let q = "Which river flows through City_10007?";
    let plain = r.prepare(q, &passages, &Encode, 4, 4096).unwrap();
    assert!(plain.source_ids.is_none());
    let l = plain.layout.chunks.len();
    assert!(l >= 4, "{l} chunks");
    // Scores that put the last chunk first, then the first: the heuristic must follow them
    // (the decoder's own perplexities are never computed), and other scores move the mask.
    let mut scores = vec![0.0f32; l];
    scores[l - 1] = 2.0;
    scores[0] = 1.0;
    let src = Scored(scores);
    let prep = r.prepare(q, &passages, &src, 4, 4096).unwrap();
    let ids = prep.source_ids.clone().unwrap();
    assert_eq!(ids.len(), l);
    assert_eq!(ids[0], 100 + 10 * passages[0].id);
    assert_eq!(prep.layout.chunks.len(), plain.layout.chunks.len());
    let p = 2.0 / l as f64;
    let mut t = StageTimes::default();
    let (mask, embeds) = r
        .select_and_embed(&prep, SelectMode::Heuristic, p, 0, &src, &mut t)
        .unwrap();
    let want: Vec<bool> = (0..l).map(|i| i == 0 || i == l - 1).collect();
    assert_eq!(mask, want);
    assert!(embeds.is_some());
    let mut other = vec![0.0f32; l];
    other[1] = 1.0;
    other[2] = 1.0;
    let (mask2, _) = r
        .select_and_embed(&prep, SelectMode::Heuristic, p, 0, &Scored(other), &mut t)
        .unwrap();
    assert_ne!(mask, mask2);
    assert!(mask2[1] && mask2[2]);
}

#[test]
fn compression_shrinks_the_input_and_keeps_the_template() {
    let f = Fixture::new();
    let r = load(f.dir.path());
    let passages = passages();
    let prep = r.prepare("q?", &passages, &Encode, 4, 4096).unwrap();
    let mut times = StageTimes::default();
    let (mask, embeds) = r
        .select_and_embed(&prep, SelectMode::None, 0.0, 0, &Encode, &mut times)
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
    // Out-of-range values are usage errors, refused by the flag's parser (exit status 2).
    for (flag, value, needle) in [
        ("--p", "1.5", "'--p <P>': must be in [0, 1]"),
        ("--k", "0", "'--k <K>': must be at least 1"),
        ("--top_p", "0", "'--top_p <TOP_P>': must be in (0, 1]"),
        (
            "--max_new",
            "0",
            "'--max_new <MAX_NEW>': must be at least 1",
        ),
    ] {
        let o = f.generate("idx", &[flag, value]);
        assert_eq!(o.status.code(), Some(2));
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
fn empty_question_is_refused() {
    let f = Fixture::new();
    assert!(f.index("idx", None).status.success());
    for q in ["", "   \t"] {
        let err = error_line(&f.ask("idx", &f.s("llama"), q, &[]));
        assert!(err.contains("--question is empty"), "{err}");
    }
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
        .map(|p| refrag::compression::prompt::chunk_tokens(&r.dtok.encode(p, false).unwrap(), 5))
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

/// The JSON lines of a `--questions` run's stdout.
fn lines(o: &Output) -> Vec<Value> {
    assert!(
        o.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect()
}

/// `sources` agrees with `meta`: one per retrieved passage in rank order, with its id, and the
/// passages' chunk ranges tile `meta.expand_mask` in order, their expanded chunks being exactly
/// the mask's `true` entries.
fn assert_sources_match_the_mask(g: &Value) {
    let sources = g["sources"].as_array().expect("sources");
    let ids = g["meta"]["passage_ids"].as_array().unwrap();
    let mask: Vec<bool> = g["meta"]["expand_mask"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m.as_bool().unwrap())
        .collect();
    assert_eq!(sources.len(), ids.len(), "{g}");
    let mut at = 0;
    let mut expanded = 0;
    for (i, s) in sources.iter().enumerate() {
        assert_eq!(s["rank"], i + 1);
        assert_eq!(&s["id"], &ids[i]);
        assert!(s["score"].is_number(), "{s}");
        // Where the passage lies in the corpus: its file and character span (one line here).
        assert!(
            s["source"].is_string() && s["span"][1].as_u64() > s["span"][0].as_u64(),
            "{s}"
        );
        let u = |k: &str| s[k].as_u64().unwrap() as usize;
        let range = [
            s["chunk_range"][0].as_u64().unwrap() as usize,
            s["chunk_range"][1].as_u64().unwrap() as usize,
        ];
        assert_eq!(range[0], at, "chunk ranges tile the mask: {s}");
        assert_eq!(range[1] - range[0], u("chunks"));
        let want: Vec<usize> = (range[0]..range[1])
            .filter(|&j| mask[j])
            .map(|j| j - range[0])
            .collect();
        let got: Vec<usize> = s["expanded_chunks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as usize)
            .collect();
        assert_eq!(got, want, "{s}");
        assert_eq!(u("expanded"), want.len());
        assert_eq!(u("expanded") + u("compressed"), u("chunks"));
        expanded += want.len();
        at = range[1];
    }
    assert_eq!(at, mask.len(), "every chunk belongs to a passage");
    assert_eq!(g["meta"]["expanded"], expanded);
}

const QUESTIONS: [&str; 3] = [
    "Which river flows through City_10007?",
    "What is the melting point of Alloy_10102?",
    "Where is Person_10203 affiliated?",
];

#[test]
fn questions_file_equals_single_generate_calls() {
    let f = Fixture::new();
    assert!(f.index("idx", None).status.success());
    // Sampling, so that equal answers show each question starts from --seed afresh.
    let args = ["--p", "0.25", "--temperature", "1.5", "--seed", "11"];
    std::fs::write(
        f.path("q.jsonl"),
        format!(
            "{{\"id\":\"river\",\"question\":\"{}\",\"answers\":[\"x\"]}}\n\n{{\"question\":\"{}\"}}\n{{\"id\":7,\"question\":\"{}\"}}\n",
            QUESTIONS[0], QUESTIONS[1], QUESTIONS[2]
        ),
    )
    .unwrap();
    let o = f.ask_many("idx", "q.jsonl", &args);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(err.contains("skipped 1 blank line in"), "{err}");
    let got = lines(&o);
    assert_eq!(got.len(), 3);
    let ids: Vec<(&str, u64)> = got
        .iter()
        .map(|g| (g["id"].as_str().unwrap(), g["line"].as_u64().unwrap()))
        .collect();
    assert_eq!(ids, vec![("river", 1), ("3", 3), ("7", 4)]);
    for (g, q) in got.iter().zip(QUESTIONS) {
        let one = json(&f.ask("idx", &f.s("llama"), q, &args));
        assert_eq!(g["question"], q);
        for key in [
            "answer",
            "passages",
            "sources",
            "positions",
            "positions_full",
        ] {
            assert_eq!(g[key], one[key], "{q}: {key}");
        }
        for key in ["expand_mask", "passage_ids", "select", "expanded"] {
            assert_eq!(g["meta"][key], one["meta"][key], "{q}: {key}");
        }
        // Every key of the single-question output is on the line.
        for key in one.as_object().unwrap().keys() {
            assert!(g.get(key).is_some(), "{key} missing");
        }
        assert_sources_match_the_mask(g);
    }
    // Plain text, one question per line, into --out: nothing on stdout, the file in place.
    std::fs::write(
        f.path("q.txt"),
        format!("{}\n{}\n", QUESTIONS[1], QUESTIONS[0]),
    )
    .unwrap();
    let out = f.s("answers.jsonl");
    let o = f.ask_many("idx", "q.txt", &[&args[..], &["--out", &out]].concat());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(o.stdout.is_empty());
    let text = std::fs::read_to_string(&out).unwrap();
    let from_file: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(from_file.len(), 2);
    assert_eq!(
        (&from_file[0]["id"], &from_file[1]["id"]),
        (&"1".into(), &"2".into())
    );
    assert_eq!(from_file[0]["answer"], got[1]["answer"]);
    assert_eq!(from_file[1]["answer"], got[0]["answer"]);
    let leftovers: Vec<_> = std::fs::read_dir(f.dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".partial"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn sources_say_which_chunks_of_each_passage_were_expanded() {
    let f = Fixture::new();
    assert!(f.index("idx", None).status.success());
    for extra in [
        &["--p", "0.5", "--k", "4"][..],
        &["--p", "1"][..],
        &["--p", "0", "--select", "none"][..],
        // A context cap that cuts the later passages off: they are sources with no chunks.
        &["--p", "0.25", "--k", "8", "--ctx_max", "40"][..],
    ] {
        let g = json(&f.generate("idx", extra));
        assert_sources_match_the_mask(&g);
        let sources = g["sources"].as_array().unwrap();
        assert_eq!(sources.len(), 3, "{extra:?}");
        if extra.contains(&"40") {
            let last = sources.last().unwrap();
            assert_eq!(last["chunks"], 0, "{g}");
            assert_eq!(last["expanded_chunks"], serde_json::json!([]));
        }
        if extra == ["--p", "1"] {
            assert!(sources.iter().all(|s| s["compressed"] == 0));
        }
    }
}

#[test]
fn question_and_questions_are_mutually_exclusive() {
    let f = Fixture::new();
    assert!(f.index("idx", None).status.success());
    std::fs::write(f.path("q.txt"), "Which river?\n").unwrap();
    let q = f.s("q.txt");
    let o = f.generate("idx", &["--questions", &q]); // generate() also passes --question
    assert_eq!(
        o.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(String::from_utf8_lossy(&o.stderr).contains("cannot be used with"));
    // Neither: a usage error too.
    let o = refrag(&["generate", "--index_dir", &f.s("idx")].map(String::from));
    assert_eq!(o.status.code(), Some(2));
    // --out belongs to --questions.
    let err = error_line(&f.generate("idx", &["--out", &f.s("o.jsonl")]));
    assert!(
        err.contains("--out writes the answers of --questions"),
        "{err}"
    );
    assert!(!f.path("o.jsonl").exists());
}

#[test]
fn a_bad_question_line_fails_before_any_model_loads() {
    let f = Fixture::new();
    assert!(f.index("idx", None).status.success());
    let long = vec!["river"; 20_000].join(" ");
    std::fs::write(f.path("out.jsonl"), "old\n").unwrap();
    let out = f.s("out.jsonl");
    for (name, text, needle) in [
        (
            "empty.jsonl",
            "{\"question\":\"Which river?\"}\n{\"id\":\"e\",\"question\":\"  \"}\n".to_string(),
            "empty.jsonl:2: question is empty",
        ),
        (
            "long.txt",
            format!("Which river?\n\n{long}\n"),
            "long.txt:3: question is too long for the decoder",
        ),
        (
            "broken.jsonl",
            "{\"question\":\"ok\"}\n{\"question\":\n".to_string(),
            "broken.jsonl:2: malformed JSONL line",
        ),
        (
            "noq.jsonl",
            "{\"text\":\"ok\"}\n".to_string(),
            "noq.jsonl:1: no \"question\" string",
        ),
    ] {
        std::fs::write(f.path(name), text).unwrap();
        // The index dir is missing: had anything loaded, the error would be about it.
        let t = std::time::Instant::now();
        let o = f.ask_many("missing_idx", name, &["--out", &out]);
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        let lines: Vec<&str> = err.lines().filter(|l| !l.contains("skipped")).collect();
        assert_eq!(o.status.code(), Some(1), "{err}");
        assert_eq!(lines.len(), 1, "{err}");
        assert!(lines[0].contains(needle), "{needle}: {err}");
        assert!(
            !err.contains("refrag: device"),
            "a model was about to load: {err}"
        );
        assert!(t.elapsed().as_secs_f64() < 10.0);
        assert_eq!(std::fs::read_to_string(&out).unwrap(), "old\n");
    }
}

/// `chat` answers each stdin line as `generate --question` does, with a sources line after
/// it; blank lines are skipped, a question too long for the window is refused on stderr without
/// ending the session, and `exit` ends it.
#[test]
fn chat_answers_stdin_questions_like_generate() {
    use std::io::Write;
    let f = Fixture::new();
    assert!(f.index("idx", None).status.success());
    let q1 = "Which river flows through City_10007?";
    let q2 = "What is the melting point of Alloy_10002?";
    let single: Vec<String> = [q1, q2]
        .iter()
        .map(|q| {
            json(&f.ask("idx", &f.s("llama"), q, &[]))["answer"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    let long = "word ".repeat(3000);
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_refrag"))
        .args([
            "chat",
            "--index_dir",
            &f.s("idx"),
            "--embed_model",
            &f.s("bert"),
        ])
        .args(["--enc", &f.s("bert"), "--dec", &f.s("llama"), "--topk", "3"])
        .args(["--max_new", "6", "--ctx_max", "320"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let input = format!("{q1}\n\n{long}\n{q2}\nexit\n{q1}\n");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = String::from_utf8(o.stdout).unwrap();
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 4, "{out}");
    assert_eq!(lines[0], single[0]);
    assert_eq!(lines[2], single[1]);
    for l in [lines[1], lines[3]] {
        assert!(
            l.starts_with("sources: [1] ") && l.contains("expanded"),
            "{l}"
        );
    }
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("question") && err.contains("window"), "{err}");
}
