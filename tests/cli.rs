//! The command line: every command line of the seed README (with `python refrag.py` replaced by
//! `refrag`) parses, kebab-case aliases work, and usage errors are one line with exit status 2.

mod common;
use common::refrag;

use clap::Parser;
use refrag::cli::{Cli, Command as Cmd};

/// The seed README's command lines, verbatim after the program name.
const SEED_LINES: &[&str] = &[
    "index --corpus data/wiki_lines.txt --index_dir runs/index --embed_model BAAI/bge-small-en-v1.5",
    "generate --index_dir runs/index --embed_model BAAI/bge-small-en-v1.5 --enc roberta-base --dec meta-llama/Llama-3.2-3B --question 'Who discovered penicillin?' --topk 4 --k 32 --p 0.25 --ctx_max 1024 --max_new 128 --temperature 0.0",
    "generate --index_dir runs/index --embed_model BAAI/bge-small-en-v1.5 --enc roberta-base --dec meta-llama/Llama-3.2-3B --question 'Who discovered penicillin?' --topk 4 --k 32 --p 0.25 --heuristic",
    "cpt_recon --train_json data/cpt_train.jsonl --enc roberta-base --dec meta-llama/Llama-3.2-3B --k 64 --steps 300 --lr 2e-5 --log_every 20 --out_dir runs/cpt_recon",
    "cpt_next --train_json data/cpt_train.jsonl --enc roberta-base --dec meta-llama/Llama-3.2-3B --k 64 --steps 300 --lr 2e-5 --expand_frac 0.25 --log_every 20 --load_dir runs/cpt_recon --out_dir runs/cpt_next",
    "train_policy --rag_json data/rag_train.jsonl --index_dir runs/index --embed_model BAAI/bge-small-en-v1.5 --enc roberta-base --dec meta-llama/Llama-3.2-3B --k 32 --steps 300 --lr 1e-4 --p 0.25 --topk 4 --log_every 20 --out_dir runs/policy",
    "generate --index_dir runs/index --embed_model BAAI/bge-small-en-v1.5 --enc roberta-base --dec meta-llama/Llama-3.2-3B --load_dir runs/cpt_next --question 'Explain how penicillin was discovered and by whom.' --topk 4 --k 32 --p 0.25 --max_new 192",
    "index --corpus data/corpus_large.txt --index_dir runs/index_large --embed_model BAAI/bge-small-en-v1.5",
    "train_policy --rag_json data/rag_train.jsonl --index_dir runs/index_large --topk 8 --k 64 --p 0.25",
    "generate --index_dir runs/index_large --question 'Which river flows through City_101?' --topk 8 --k 64 --p 0.25",
    "cpt_recon --train_json data/cpt_train.jsonl --enc roberta-base --dec meta-llama/Llama-3.2-3B --k 64 --steps 1000",
    "cpt_next --train_json data/cpt_train.jsonl --enc roberta-base --dec meta-llama/Llama-3.2-3B --k 64 --steps 1000 --expand_frac 0.25 --load_dir runs/cpt_recon",
    "train_policy --rag_json data/rag_train.jsonl --index_dir runs/index_large --topk 8 --k 64 --p 0.25 --policy_hidden 128 --torch_compile",
];

/// Split a command line on spaces, honouring single quotes.
fn words(line: &str) -> Vec<String> {
    let mut out = vec!["refrag".to_string()];
    let mut cur = String::new();
    let mut quoted = false;
    for c in line.chars() {
        match c {
            '\'' => quoted = !quoted,
            ' ' if !quoted => {
                if !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
            }
            _ => cur.push(c),
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

#[test]
fn every_seed_command_line_parses() {
    for line in SEED_LINES {
        if let Err(e) = Cli::try_parse_from(words(line)) {
            panic!("{line}\n{e}");
        }
    }
}

#[test]
fn seed_values_reach_the_structs() {
    let cli = Cli::try_parse_from(words(SEED_LINES[1])).unwrap();
    let Cmd::Generate(g) = cli.command else {
        panic!("not generate")
    };
    assert_eq!(g.answer.retrieve.topk, 4);
    assert_eq!(g.answer.compress.k, 32);
    assert_eq!(g.answer.compress.p, 0.25);
    assert_eq!(g.answer.compress.ctx_max, 1024);
    assert_eq!(g.answer.max_new, 128);
    assert_eq!(
        g.answer.models.dec.as_deref(),
        Some("meta-llama/Llama-3.2-3B")
    );
    assert_eq!(g.question.as_deref(), Some("Who discovered penicillin?"));
}

#[test]
fn kebab_case_aliases_parse() {
    let line =
        "cpt-next --train-json a.jsonl --expand-frac 0.5 --load-dir x --out-dir y --log-every 5";
    let cli = Cli::try_parse_from(words(line)).unwrap();
    let Cmd::CptNext(c) = cli.command else {
        panic!("not cpt_next")
    };
    assert_eq!(c.expand_frac, 0.5);
    assert_eq!(c.train.log_every, 5);
    for line in [
        "train-policy --rag-json a --index-dir b --policy-hidden 8",
        "make-corpus --out-dir d",
        "search --index-dir d --question q --embed-model m",
        "generate --index-dir d --question q --ctx-max 10 --max-new 3 --top-p 0.5",
    ] {
        Cli::try_parse_from(words(line)).unwrap_or_else(|e| panic!("{line}\n{e}"));
    }
}

#[test]
fn unknown_flag_is_one_line_and_exit_2() {
    let out = refrag(&["index", "--corpus", "x", "--index_dir", "y", "--bogus"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.contains("--bogus"), "{err}");
}

/// A numeric flag out of its range is refused while parsing: exit status 2 and one line that
/// names the flag and the range, before any file is read.
#[test]
fn out_of_range_values_are_one_line_and_exit_2() {
    let generate = ["generate", "--index_dir", "idx", "--question", "q"];
    let sft = ["sft", "--rag_json", "q.jsonl", "--index_dir", "idx"];
    let next = ["cpt_next", "--train_json", "t.jsonl"];
    for (base, flag, value, range) in [
        (&generate[..], "--topk", "0", "must be at least 1"),
        (&generate[..], "--p", "1.5", "must be in [0, 1]"),
        (&generate[..], "--top_p", "0", "must be in (0, 1]"),
        (&sft[..], "--expand_max", "2", "must be in [0, 1]"),
        (&sft[..], "--dec_lr", "0", "must be a finite number > 0"),
        (&next[..], "--s", "0", "must be at least 1"),
        (&next[..], "--o", "0", "must be at least 1"),
    ] {
        let mut args = base.to_vec();
        args.extend([flag, value]);
        let out = refrag(&args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
        let upper = flag.trim_start_matches('-').to_uppercase();
        let needle = format!("invalid value '{value}' for '{flag} <{upper}>': {range}");
        assert!(
            err.starts_with("refrag: ") && err.contains(&needle),
            "{err}"
        );
    }
}

#[test]
fn version_lists_features() {
    let out = refrag(&["--version"]);
    assert!(out.status.success());
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(
        s.contains(env!("CARGO_PKG_VERSION")) && s.contains("features: cpu"),
        "{s}"
    );
}

/// `train_policy` trains the selection policy: selection flags it would ignore are refused.
#[test]
fn train_policy_takes_no_selection_flags() {
    let base = "train_policy --rag_json q.jsonl --index_dir idx --k 16 --p 0.25 --load_dir w";
    assert!(Cli::try_parse_from(words(base)).is_ok());
    for extra in ["--select random", "--heuristic", "--no_weights"] {
        let line = format!("{base} {extra}");
        assert!(Cli::try_parse_from(words(&line)).is_err(), "{line}");
    }
}
