//! The training commands end to end: the real binary on tiny random models in a fresh temporary
//! directory. Each command writes `config.json`, its safetensors parts, `train_log.jsonl` and
//! `eval.json`; the next stage and `generate --load_dir` use them (a trained decoder, a trained
//! policy); misuse fails with one line naming the flag.

mod common;
use common::{refrag, stderr};

mod train_fixture;

use std::path::Path;
use std::process::Output;

use serde_json::Value;
use train_fixture::Fixture;

fn ok_json(o: &Output) -> Value {
    assert!(o.status.success(), "stderr: {}", stderr(o));
    serde_json::from_slice(&o.stdout).expect("stdout is one JSON object")
}

/// The last stderr line of a failed run.
fn error_line(o: &Output) -> String {
    assert!(
        !o.status.success(),
        "expected failure; stderr: {}",
        stderr(o)
    );
    stderr(o).lines().last().unwrap_or_default().to_string()
}

fn config(dir: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap()
}

/// A run's 1-chunk reconstruction loss in its evaluation `at` (`start` or `end`).
fn recon_1_nll(dir: &Path, at: &str) -> f64 {
    let e: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("eval.json")).unwrap()).unwrap();
    e[at]["recon_1_chunks"]["nll"].as_f64().unwrap()
}

fn parts(dir: &Path) -> Vec<String> {
    config(dir)["parts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap().to_string())
        .collect()
}

impl Fixture {
    fn cpt(&self, cmd: &str, out: &str, extra: &[&str]) -> Output {
        let (t, e, d, o) = (
            self.s("cpt.jsonl"),
            self.s("enc"),
            self.s("dec"),
            self.s(out),
        );
        let mut defaults = vec![
            ("--train_json", t.as_str()),
            ("--k", "4"),
            ("--max_chunks", "2"),
            ("--steps", "3"),
            ("--batch_size", "2"),
            ("--eval_items", "2"),
            ("--log_every", "1"),
            ("--out_dir", o.as_str()),
            ("--device", "cpu"),
        ];
        if !extra.contains(&"--load_dir") && !extra.contains(&"--resume") {
            defaults.extend([("--enc", e.as_str()), ("--dec", d.as_str())]);
        }
        refrag(&with_defaults(cmd, &defaults, extra))
    }

    fn index(&self) {
        self.index_into("idx", &[]);
    }

    /// `index` of the corpus into `index`, with `extra` flags (a chunk cache's).
    fn index_into(&self, index: &str, extra: &[&str]) {
        let (c, i, e) = (self.s("corpus.txt"), self.s(index), self.s("enc"));
        let mut args = vec![
            "index",
            "--corpus",
            &c,
            "--index_dir",
            &i,
            "--embed_model",
            &e,
            "--quiet",
        ];
        args.extend_from_slice(extra);
        let o = refrag(&args);
        assert!(o.status.success(), "{}", stderr(&o));
    }

    fn qa(&self, cmd: &str, out: &str, extra: &[&str]) -> Output {
        let (q, i, o) = (self.s("qa.jsonl"), self.s("idx"), self.s(out));
        let defaults = [
            ("--rag_json", q.as_str()),
            ("--index_dir", i.as_str()),
            ("--topk", "2"),
            ("--k", "4"),
            ("--steps", "2"),
            ("--batch_size", "2"),
            ("--eval_items", "2"),
            ("--log_every", "1"),
            ("--out_dir", o.as_str()),
            ("--device", "cpu"),
        ];
        refrag(&with_defaults(cmd, &defaults, extra))
    }

    fn generate(&self, load_dir: &str) -> Value {
        self.generate_in("idx", load_dir)
    }

    /// `generate` over the index `index` with the weights in `load_dir`.
    fn generate_in(&self, index: &str, load_dir: &str) -> Value {
        let (i, l) = (self.s(index), self.s(load_dir));
        ok_json(&refrag(&[
            "generate",
            "--index_dir",
            &i,
            "--load_dir",
            &l,
            "--question",
            "Which river flows through City_3?",
            "--topk",
            "2",
            "--k",
            "4",
            "--max_new",
            "3",
            "--ctx_max", // the tiny decoder holds 512 positions
            "320",
            "--quiet",
            "--device",
            "cpu",
        ]))
    }
}

/// `cmd`, the `defaults` whose flag `extra` does not give, `extra`, and `--quiet`.
fn with_defaults<'a>(
    cmd: &'a str,
    defaults: &[(&'a str, &'a str)],
    extra: &[&'a str],
) -> Vec<&'a str> {
    let mut args = vec![cmd, "--quiet"];
    for (flag, value) in defaults {
        if !extra.contains(flag) {
            args.extend([*flag, *value]);
        }
    }
    args.extend_from_slice(extra);
    args
}

fn assert_run_files(dir: &Path, stage: &str, steps: usize) {
    for f in [
        "config.json",
        "train_log.jsonl",
        "eval.json",
        "optimizer.safetensors",
        "train_state.json",
    ] {
        assert!(dir.join(f).is_file(), "{stage}: no {f}");
    }
    for p in parts(dir) {
        let path = dir.join(format!("{p}.safetensors"));
        assert!(path.is_file(), "{stage}: no {p}.safetensors");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(
                mode & 0o777,
                0o644,
                "{stage}: {p}.safetensors mode {mode:o}"
            );
        }
    }
    let c = config(dir);
    assert_eq!(c["stage"], stage);
    assert_eq!(c["step"], steps);
    let log = std::fs::read_to_string(dir.join("train_log.jsonl")).unwrap();
    let last: Value = serde_json::from_str(log.lines().last().unwrap()).unwrap();
    assert_eq!(last["step"], steps);
    for key in ["loss", "lr", "sec_per_step"] {
        assert!(last[key].is_number(), "{stage}: log lacks {key}: {last}");
    }
}

#[test]
fn cpt_recon_then_cpt_next_then_generate_with_the_trained_decoder() {
    let f = Fixture::new();
    let out = ok_json(&f.cpt("cpt_recon", "recon", &[]));
    assert_eq!(out["stage"], "cpt_recon");
    assert!(
        out["eval"]["start"]["recon_2_chunks"]["token_acc"].is_number(),
        "{out}"
    );
    assert!(
        out["eval"]["end"]["recon_1_chunks"]["ppl"].is_number(),
        "{out}"
    );
    assert_run_files(&f.path("recon"), "cpt_recon", 3);
    assert_eq!(parts(&f.path("recon")), ["encoder", "projector"]);
    assert_eq!(config(&f.path("recon"))["encoder_pooling"], "mean");

    // Starting again over a checkpoint needs --resume or --force.
    let line = error_line(&f.cpt("cpt_recon", "recon", &[]));
    assert!(
        line.contains("--resume") && line.contains("--force"),
        "{line}"
    );

    let recon = f.s("recon");
    // Another pooling than the weights were trained with is refused, naming the flag.
    let line = error_line(&f.cpt(
        "cpt_next",
        "next_cls",
        &["--load_dir", &recon, "--pooling", "cls"],
    ));
    assert!(
        line.contains("--pooling cls differs") && line.contains("(mean)"),
        "{line}"
    );
    // ... except that mean-pooled weights go on with segment pooling, the projector widened
    // to read the runs side by side, starting from what it computed before.
    let out = ok_json(&f.cpt(
        "cpt_recon",
        "recon_seg",
        &["--load_dir", &recon, "--pooling", "seg4"],
    ));
    let c = config(&f.path("recon_seg"));
    assert_eq!(c["encoder_pooling"], "seg4");
    assert_eq!(
        c["projector"]["in_dim"],
        4 * config(&f.path("recon"))["projector"]["in_dim"]
            .as_u64()
            .unwrap()
    );
    let (before, after) = (
        recon_1_nll(&f.path("recon"), "end"),
        out["eval"]["start"]["recon_1_chunks"]["nll"]
            .as_f64()
            .unwrap(),
    );
    assert!(
        (before - after).abs() < 0.05 * before.abs().max(1.0),
        "{before} -> {after}"
    );
    let out = ok_json(&f.cpt(
        "cpt_next",
        "next",
        &["--load_dir", &recon, "--s", "16", "--o", "8"],
    ));
    assert!(
        out["eval"]["end"]["next_full_p1"]["ppl"].is_number(),
        "{out}"
    );
    assert!(
        out["eval"]["end"]["next_no_context"]["ppl"].is_number(),
        "{out}"
    );
    assert_run_files(&f.path("next"), "cpt_next", 3);
    // The decoder trains through a LoRA adapter by default: megabytes, not the whole model.
    assert_eq!(
        parts(&f.path("next")),
        ["encoder", "projector", "decoder_lora"]
    );
    assert_eq!(config(&f.path("next"))["lora"]["rank"], 8);
    assert!(!f.path("next/decoder_config.json").exists());

    // --lora_rank 0 fine-tunes every decoder weight instead.
    let out = ok_json(&f.cpt(
        "cpt_next",
        "next_full",
        &[
            "--load_dir",
            &recon,
            "--s",
            "16",
            "--o",
            "8",
            "--lora_rank",
            "0",
        ],
    ));
    assert!(
        out["eval"]["end"]["next_full_p1"]["ppl"].is_number(),
        "{out}"
    );
    assert_eq!(
        parts(&f.path("next_full")),
        ["encoder", "projector", "decoder"]
    );
    assert!(f.path("next_full/decoder_config.json").is_file());

    f.index();
    for dir in ["next", "next_full"] {
        let g = f.generate(dir);
        assert_eq!(g["meta"]["projector_trained"], true, "{g}");
        assert!(g["meta"]["generated_tokens"].as_u64().unwrap() <= 3);
    }

    // Segment-pooled weights: a chunk cache built with them serves generate the answer that
    // encoding the chunks per question gives.
    let plain = f.generate("recon_seg");
    f.index_into("idx_seg", &["--load_dir", &f.s("recon_seg"), "--k", "4"]);
    let cache = refrag::compression::chunk_cache::ChunkCache::load(&f.path("idx_seg"))
        .unwrap()
        .expect("a chunk cache");
    // The cache holds the pooled runs side by side, what the widened projector reads.
    let in_dim = config(&f.path("recon_seg"))["projector"]["in_dim"]
        .as_u64()
        .unwrap();
    assert_eq!(cache.meta.dim as u64, in_dim);
    let cached = f.generate_in("idx_seg", "recon_seg");
    assert_eq!(cached["meta"]["chunk_cache"], true, "{cached}");
    assert_eq!(plain["meta"]["chunk_cache"], false, "{plain}");
    assert_eq!(plain["meta"]["expand_mask"], cached["meta"]["expand_mask"]);
    assert_eq!(plain["answer"], cached["answer"]);
}

#[test]
fn cpt_trains_on_plain_text_and_evaluates_on_a_held_out_file() {
    let f = Fixture::new();
    let text: Vec<String> = (0..10)
        .map(|i| {
            format!(
                "{} {}",
                train_fixture::passage(i),
                train_fixture::passage(i + 20)
            )
        })
        .collect();
    std::fs::write(f.path("train.txt"), text.join("\n\n") + "\n").unwrap();
    let held: Vec<String> = (40..44).map(train_fixture::passage).collect();
    std::fs::write(f.path("held.txt"), held.join("\n") + "\n").unwrap();
    let (t, h) = (f.s("train.txt"), f.s("held.txt"));
    let args = ["--train_json", &t, "--eval_json", &h, "--eval_items", "3"];
    let out = ok_json(&f.cpt("cpt_recon", "recon", &args));
    let tokens = out["eval"]["end"]["recon_1_chunks"]["tokens"]
        .as_u64()
        .unwrap();
    assert!(tokens > 0, "{out}");
    let recon = f.s("recon");
    let mut next = args.to_vec();
    next.extend(["--load_dir", &recon]);
    let out = ok_json(&f.cpt("cpt_next", "next", &next));
    assert!(
        out["eval"]["end"]["next_compressed_p0"]["ppl"].is_number(),
        "{out}"
    );
}

#[test]
fn sft_then_train_policy_then_generate_selects_with_the_policy() {
    let f = Fixture::new();
    ok_json(&f.cpt("cpt_recon", "recon", &["--steps", "1"]));
    f.index();
    let recon = f.s("recon");
    let o = f.qa(
        "sft",
        "sft",
        &[
            "--load_dir",
            &recon,
            "--eval_items",
            "1",
            "--gold_expand",
            "0.5",
        ],
    );
    assert!(
        stderr(&o).contains("are held out; the rest have no gold answer"),
        "{}",
        stderr(&o)
    );
    let out = ok_json(&o);
    for key in [
        "answer_p0",
        "answer_p0.25",
        "answer_p1",
        "answer_p0.25_gold",
    ] {
        assert!(
            out["eval"]["end"][key]["answer_loglik"].is_number(),
            "{key}: {out}"
        );
    }
    assert_run_files(&f.path("sft"), "sft", 2);
    assert_eq!(
        parts(&f.path("sft")),
        ["encoder", "projector", "decoder_lora"]
    );

    let sft = f.s("sft");
    let pol = [
        "--load_dir",
        &sft,
        "--p",
        "0.5",
        "--group",
        "3",
        "--policy_hidden",
        "8",
        "--topk",
        "3",
    ];
    let out = ok_json(&f.qa("train_policy", "pol", &pol));
    assert!(
        out["eval"]["start"]["answer_loglik_policy"].is_number(),
        "{out}"
    );
    assert!(
        out["eval"]["end"]["answer_loglik_random"].is_number(),
        "{out}"
    );
    assert_run_files(&f.path("pol"), "train_policy", 2);
    assert_eq!(
        parts(&f.path("pol")),
        ["projector", "policy", "encoder", "decoder_lora"]
    );
    assert_eq!(config(&f.path("pol"))["policy_hidden"], 8);

    let g = f.generate("pol");
    assert_eq!(g["meta"]["select"], "policy", "{g}");

    // --resume continues the checkpoint's step counter.
    let mut more: Vec<&str> = pol.to_vec();
    more.extend(["--resume", "--steps", "3"]);
    let out = ok_json(&f.qa("train_policy", "pol", &more));
    assert_eq!(out["step"], 3);
    let log = std::fs::read_to_string(f.path("pol/train_log.jsonl")).unwrap();
    let steps: Vec<u64> = log
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["step"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(steps, [1, 2, 3]);
}

#[test]
fn misuse_fails_in_one_line_naming_the_flag() {
    let f = Fixture::new();
    let line = error_line(&f.cpt("cpt_recon", "none", &["--resume"]));
    assert!(
        line.contains("--resume") && line.contains("no cpt_recon checkpoint"),
        "{line}"
    );
    let line = error_line(&f.cpt("cpt_recon", "x", &["--curriculum", "1:1;2"]));
    assert!(line.contains("--curriculum"), "{line}");
    ok_json(&f.cpt("cpt_recon", "recon", &["--steps", "1", "--eval_items", "0"]));
    let (recon, enc) = (f.s("recon"), f.s("enc"));
    let line = error_line(&f.cpt("cpt_next", "next", &["--load_dir", &recon, "--dec", &enc]));
    assert!(line.contains("--dec") && line.contains("differs"), "{line}");
    let line = error_line(&f.cpt("cpt_next", "recon", &["--resume"]));
    assert!(
        line.contains("holds a cpt_recon checkpoint, not cpt_next"),
        "{line}"
    );
    let line = error_line(&f.cpt("cpt_recon", "y", &["--eval_items", "8"]));
    assert!(line.contains("--eval_items 8"), "{line}");
    // QA pairs whose answers the index cannot retrieve: nothing to learn from.
    f.index();
    let bad = f.path("bad_qa.jsonl");
    let lines: Vec<String> = (0..4)
        .map(|i| format!(r#"{{"id":"b{i}","question":"Which river flows through City_{i}?","answers":["Zzyzx"]}}"#))
        .collect();
    std::fs::write(&bad, lines.join("\n")).unwrap();
    let bad = f.s("bad_qa.jsonl");
    let line = error_line(&f.qa("sft", "bad", &["--rag_json", &bad, "--load_dir", &recon]));
    assert!(
        line.contains("--rag_json") && line.contains("only 0 of the 4 pairs"),
        "{line}"
    );
    ok_json(&f.qa(
        "sft",
        "bad",
        &[
            "--rag_json",
            &bad,
            "--load_dir",
            &recon,
            "--keep_unanswerable",
            "--steps",
            "1",
        ],
    ));
    let none = f.s("none.txt");
    let line = error_line(&f.qa("sft", "mix", &["--load_dir", &recon, "--next_json", &none]));
    assert!(
        line.contains("--next_json") && line.contains("no such file"),
        "{line}"
    );
}

#[test]
fn sft_mixes_next_paragraph_batches_from_text() {
    let f = Fixture::new();
    f.index();
    ok_json(&f.cpt("cpt_recon", "recon", &["--steps", "1", "--eval_items", "0"]));
    let (recon, text) = (f.s("recon"), f.s("cpt.jsonl"));
    let args = ["--load_dir", &recon, "--steps", "2", "--log_every", "1"];
    let mix = [&args[..], &["--next_json", &text, "--next_weight", "0.5"]].concat();
    ok_json(&f.qa("sft", "mix", &mix));
    let log = std::fs::read_to_string(f.path("mix").join("train_log.jsonl")).unwrap();
    let next: Vec<f64> = log
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).unwrap()["next_loss"].as_f64())
        .collect();
    assert_eq!(next.len(), 2, "{log}");
    assert!(next.iter().all(|&l| l.is_finite() && l > 0.0), "{log}");
    ok_json(&f.qa("sft", "plain", &args));
    let log = std::fs::read_to_string(f.path("plain").join("train_log.jsonl")).unwrap();
    assert!(!log.contains("next_loss"), "{log}");
}

/// The bytes of every safetensors file of `dir` (weights and optimiser state), by name.
fn safetensors_bytes(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&p).unwrap())
        })
        .collect();
    files.sort();
    files
}

/// The result of a training command without its timings.
fn without_timings(mut v: Value) -> Value {
    if let Some(o) = v.as_object_mut() {
        o.retain(|k, _| !k.contains("sec") && !k.contains("time") && !k.contains("dir"));
        for x in o.values_mut() {
            *x = without_timings(x.take());
        }
    }
    v
}

#[test]
fn every_training_stage_and_generate_are_bit_identical_under_the_same_seed() {
    let f = Fixture::new();
    f.index();
    // Each stage's result with the suffix of the directory it wrote (`TAG_SUFFIX`; none for
    // generate).
    let run = |tag: &str, seed: &str| -> Vec<(&'static str, Option<&'static str>, Value)> {
        let dir = |suffix: &str| format!("{tag}_{suffix}");
        let recon = ok_json(&f.cpt("cpt_recon", &dir("recon"), &["--seed", seed]));
        let from = f.s(&dir("recon"));
        let next = ok_json(&f.cpt(
            "cpt_next",
            &dir("next"),
            &["--load_dir", &from, "--s", "16", "--o", "8", "--seed", seed],
        ));
        let from = f.s(&dir("next"));
        let sft = ok_json(&f.qa("sft", &dir("sft"), &["--load_dir", &from, "--seed", seed]));
        let from = f.s(&dir("sft"));
        let pol = [
            "--load_dir",
            &from,
            "--p",
            "0.5",
            "--group",
            "3",
            "--warm_start",
            "1",
            "--policy_hidden",
            "8",
            "--topk",
            "3",
            "--seed",
            seed,
        ];
        let pol = ok_json(&f.qa("train_policy", &dir("pol"), &pol));
        let answer = f.generate(&dir("pol"));
        vec![
            ("cpt_recon", Some("recon"), recon),
            ("cpt_next", Some("next"), next),
            ("sft", Some("sft"), sft),
            ("train_policy", Some("pol"), pol),
            ("generate", None, answer),
        ]
    };
    let (a, b) = (run("a", "7"), run("b", "7"));
    run("c", "8");
    for ((stage, suffix, x), (_, _, y)) in a.iter().zip(&b) {
        let (x, y) = (without_timings(x.clone()), without_timings(y.clone()));
        assert_eq!(x, y, "{stage}: same seed, different results");
        let Some(suffix) = suffix else { continue };
        let weights = |tag: &str| safetensors_bytes(&f.path(&format!("{tag}_{suffix}")));
        let (wa, wb, wc) = (weights("a"), weights("b"), weights("c"));
        assert!(wa.len() >= 3, "{stage}: {} safetensors files", wa.len());
        assert_eq!(
            wa.len(),
            wb.len(),
            "{stage}: other files under the same seed"
        );
        for ((name, bytes), (_, other)) in wa.iter().zip(&wb) {
            assert!(
                bytes == other,
                "{stage}: {name} differs under the same seed"
            );
        }
        assert!(
            wa.iter().zip(&wc).any(|((_, p), (_, q))| p != q),
            "{stage}: another seed gave the same weights"
        );
    }
}
