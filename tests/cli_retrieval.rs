//! `refrag index` and `refrag search` end to end: the real binary on a tiny random BERT in a
//! fresh temporary directory (nothing downloads). Bad input must give a one-line error, a
//! non-zero exit, and leave an existing index untouched.

mod common;
use common::{json, refrag, stderr};

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

/// The error lines of stderr: everything but the device report and FAISS/refrag warnings.
fn error_lines(o: &Output) -> Vec<String> {
    stderr(o)
        .lines()
        .filter(|l| {
            !l.starts_with("refrag: device") && !l.contains("warning") && !l.contains("WARNING")
        })
        .map(String::from)
        .collect()
}

/// Assert a failed run with exactly one error line containing every `needles`.
fn assert_one_line_error(o: &Output, needles: &[&str]) {
    assert!(
        !o.status.success(),
        "expected failure; stderr: {}",
        stderr(o)
    );
    let lines = error_lines(o);
    assert_eq!(lines.len(), 1, "expected one error line, got {lines:?}");
    for n in needles {
        assert!(lines[0].contains(n), "{n:?} not in {:?}", lines[0]);
    }
}

/// A scratch directory with a tiny BERT (`bert/`) and a small corpus (`corpus.txt`) in which
/// exactly one passage names `City_7`.
struct Fixture {
    dir: tempfile::TempDir,
}

const CITY7: &str =
    "TITLE: Atlas Entry — City_7. City_7 lies on the banks of River_042 and was founded in 1320.";

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        refrag::testing::bert::write_tiny_bert(&dir.path().join("bert"), 1, Some("mean")).unwrap();
        let f = Self { dir };
        std::fs::write(f.path("corpus.txt"), corpus(40)).unwrap();
        f
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn s(&self, rel: &str) -> String {
        self.path(rel).to_string_lossy().into_owned()
    }

    fn index(&self, corpus: &str, index_dir: &str, extra: &[&str]) -> Output {
        let (c, i, m) = (self.s(corpus), self.s(index_dir), self.s("bert"));
        let mut args = vec![
            "index",
            "--corpus",
            &c,
            "--index_dir",
            &i,
            "--embed_model",
            &m,
        ];
        args.push("--quiet");
        args.extend_from_slice(extra);
        refrag(&args)
    }

    fn search(&self, index_dir: &str, question: &str, extra: &[&str]) -> Output {
        let i = self.s(index_dir);
        let mut args = vec![
            "search",
            "--index_dir",
            &i,
            "--question",
            question,
            "--quiet",
        ];
        args.extend_from_slice(extra);
        refrag(&args)
    }

    /// Every file of an index directory, by name, for before/after comparisons.
    fn snapshot(&self, index_dir: &str) -> Vec<(String, Vec<u8>)> {
        let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(self.path(index_dir))
            .unwrap()
            .map(|e| e.unwrap().path())
            .map(|p| {
                (
                    p.file_name().unwrap().to_string_lossy().into_owned(),
                    std::fs::read(&p).unwrap(),
                )
            })
            .collect();
        files.sort();
        files
    }
}

/// `n` passages: City_7's, then distractors that share words or numbers with it.
fn corpus(n: usize) -> String {
    let mut lines = vec![CITY7.to_string()];
    for i in 1..n {
        lines.push(match i % 4 {
            0 => format!("TITLE: Atlas Entry — City_{}. City_{} lies on the banks of River_{:03} and was founded in {}.", i + 100, i + 100, i, 1200 + i),
            1 => format!("TITLE: Biography — Person_7{i}. Person_7{i} is a researcher born in City_70 near River_7."),
            2 => format!("TITLE: Encyclopedia of Materials — Alloy_{i}. Melting point: {} °C; used in bearings.", 700 + i),
            _ => format!("TITLE: Historical Timeline — Event_{i}. The Event_{i} occurred in {} near City_17.", 1500 + i),
        });
    }
    lines.join("\n") + "\n"
}

/// Whether hybrid hits hold passage 0 (City_7) with lexical rank 1.
fn city7_kept(out: &Value) -> bool {
    out["hits"]
        .as_array()
        .unwrap()
        .iter()
        .any(|h| h["id"] == 0 && h["lexical_rank"] == 1)
}

#[test]
fn index_then_search_dense_lexical_hybrid() {
    let f = Fixture::new();
    let o = f.index("corpus.txt", "idx", &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let m: Value =
        serde_json::from_slice(&std::fs::read(f.path("idx/manifest.json")).unwrap()).unwrap();
    assert_eq!(m["count"], 40);
    assert_eq!(m["dim"], 32);
    assert_eq!(m["pooling"], "mean");
    assert_eq!(m["index_type"], "Flat");
    for mode in ["dense", "lexical", "hybrid"] {
        let out = json(&f.search(
            "idx",
            "Which river flows through City_7?",
            &["--topk", "3", "--retrieval", mode],
        ));
        assert_eq!(out["retrieval"], mode);
        let hits = out["hits"].as_array().unwrap();
        assert_eq!(hits.len(), 3, "{mode}: {out}");
        let scores: Vec<f64> = hits.iter().map(|h| h["score"].as_f64().unwrap()).collect();
        assert!(
            scores.windows(2).all(|w| w[0] >= w[1]),
            "{mode}: {scores:?}"
        );
        for (i, h) in hits.iter().enumerate() {
            assert_eq!(h["rank"], i + 1);
            let id = h["id"].as_u64().unwrap() as usize;
            assert_eq!(
                h["text"].as_str().unwrap(),
                corpus(40).lines().nth(id).unwrap()
            );
        }
        if mode == "lexical" {
            // BM25 must put the passage naming City_7 first.
            assert_eq!(hits[0]["id"], 0, "{mode}: {out}");
        }
    }
    // The random tiny model ranks arbitrarily, so hybrid need only keep BM25's first passage.
    let out = json(&f.search("idx", "Which river flows through City_7?", &[]));
    assert_eq!(out["retrieval"], "hybrid");
    assert!(city7_kept(&out), "{out}");
    // --embed_model given explicitly (same model) is accepted.
    let bert = f.s("bert");
    let out = json(&f.search(
        "idx",
        "City_7",
        &["--retrieval", "dense", "--embed_model", &bert],
    ));
    assert_eq!(out["hits"].as_array().unwrap().len(), 8);
    // f32 unless asked: the manifest records the precision its queries follow.
    assert_eq!(m["embed_int8"], false);
}

#[test]
fn index_int8_is_recorded_and_searched_in_its_precision() {
    let f = Fixture::new();
    let o = f.index("corpus.txt", "idx8", &["--int8"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let m: Value =
        serde_json::from_slice(&std::fs::read(f.path("idx8/manifest.json")).unwrap()).unwrap();
    // 8-bit only where the CPU has AVX-512 VNNI; elsewhere f32, said on stderr.
    let vnni = refrag::kernels::igemm::available();
    assert_eq!(m["embed_int8"], vnni);
    if !vnni {
        assert!(stderr(&o).contains("no AVX-512 VNNI"), "{}", stderr(&o));
    }
    let out = json(&f.search(
        "idx8",
        "Which river flows through City_7?",
        &["--topk", "3"],
    ));
    assert_eq!(out["hits"].as_array().unwrap().len(), 3);
    assert!(city7_kept(&out), "{out}");
}

#[test]
fn bad_corpora_fail_in_one_line_and_leave_the_index() {
    let f = Fixture::new();
    assert!(f.index("corpus.txt", "idx", &[]).status.success());
    let before = f.snapshot("idx");
    std::fs::write(f.path("empty.txt"), "").unwrap();
    std::fs::write(f.path("blank.txt"), "one\n\ntwo\n").unwrap();
    std::fs::write(f.path("bad.txt"), b"one\ntw\xffo\n").unwrap();
    let cases = [
        ("missing.txt", "missing.txt"),
        ("empty.txt", "empty corpus"),
        ("blank.txt", "blank.txt:2: blank line"),
        ("bad.txt", "bad.txt:2: invalid UTF-8"),
    ];
    for (corpus, needle) in cases {
        let o = f.index(corpus, "idx", &["--force", "--strict"]);
        assert_one_line_error(&o, &[needle]);
        assert!(f.snapshot("idx") == before, "{corpus}: index changed");
    }
    // Without --force an existing index is never touched.
    let o = f.index("corpus.txt", "idx", &[]);
    assert_one_line_error(&o, &["already exists", "--force"]);
    assert!(f.snapshot("idx") == before);
    // A FAISS factory string that cannot be trained on 40 passages, or is not one at all.
    let o = f.index(
        "corpus.txt",
        "idx",
        &["--force", "--index_type", "IVF4096,Flat"],
    );
    assert_one_line_error(&o, &["IVF4096,Flat", "too few"]);
    let o = f.index("corpus.txt", "idx", &["--force", "--index_type", "Bogus"]);
    assert_one_line_error(&o, &["--index_type Bogus"]);
    assert!(f.snapshot("idx") == before);
    let leftovers = std::fs::read_dir(f.dir.path()).unwrap().count();
    assert_eq!(leftovers, 6, "staging directories left behind"); // bert, idx, 4 corpora
}

#[test]
fn blank_corpus_lines_are_skipped_and_counted_unless_strict() {
    let f = Fixture::new();
    // Blank and whitespace-only lines before, between and after the passages.
    let text = format!("\n{}\n  \n\t\n", corpus(40).replace('\n', "\n\n"));
    std::fs::write(f.path("gappy.txt"), text).unwrap();
    // These lines are longer than the tiny BERT's 62-token passage budget, and long lines between
    // blank lines read as the paragraphs of a document (see `index`), so the budget is raised to
    // what the real embedder's 254 tokens are to such lines.
    let o = f.index("gappy.txt", "doc", &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let m: Value =
        serde_json::from_slice(&std::fs::read(f.path("doc/manifest.json")).unwrap()).unwrap();
    assert!(m["count"].as_u64().unwrap() > 40, "{m}");
    let budget = ["--passage_tokens", "1000"];
    let o = f.index("gappy.txt", "idx", &budget);
    assert!(o.status.success(), "{}", stderr(&o));
    let gappy = f.s("gappy.txt");
    assert!(
        stderr(&o).contains(&format!("refrag: skipped 44 blank lines in {gappy}")),
        "{}",
        stderr(&o)
    );
    let m: Value =
        serde_json::from_slice(&std::fs::read(f.path("idx/manifest.json")).unwrap()).unwrap();
    assert_eq!(m["count"], 40);
    // Ids count passages, not lines: the same ids as the corpus without blank lines.
    let out = json(&f.search("idx", "City_7", &["--retrieval", "lexical"]));
    for h in out["hits"].as_array().unwrap() {
        let id = h["id"].as_u64().unwrap() as usize;
        assert_eq!(
            h["text"].as_str().unwrap(),
            corpus(40).lines().nth(id).unwrap()
        );
    }
    assert_eq!(out["hits"][0]["id"], 0, "{out}");
    let o = f.index(
        "gappy.txt",
        "idx2",
        &["--strict", "--passage_tokens", "1000"],
    );
    assert_one_line_error(&o, &["gappy.txt:1: blank line", "--strict"]);
    assert!(!f.path("idx2").exists());
}

#[test]
fn a_second_writer_of_an_index_dir_is_refused() {
    let f = Fixture::new();
    let held = refrag::io::lock::DirLock::acquire(&f.path("idx"), "--index_dir").unwrap();
    let pid = format!("pid {}", std::process::id());
    for extra in [&[][..], &["--force"][..]] {
        let o = f.index("corpus.txt", "idx", extra);
        assert_one_line_error(
            &o,
            &["--index_dir", &f.s("idx"), "another refrag process", &pid],
        );
    }
    assert!(!f.path("idx").exists());
    drop(held);
    let o = f.index("corpus.txt", "idx", &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    // The lock file goes with the writer: nothing is left beside the index.
    assert!(!f.path(".idx.lock").exists());
    let o = f.index("corpus.txt", "idx", &["--force"]);
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn another_embedding_model_at_search_is_refused() {
    let f = Fixture::new();
    assert!(f.index("corpus.txt", "idx", &[]).status.success());
    refrag::testing::bert::write_tiny_bert(&f.path("other"), 2, Some("mean")).unwrap();
    let other = f.s("other");
    let o = f.search("idx", "City_7", &["--embed_model", &other]);
    assert_one_line_error(&o, &[&f.s("idx"), &f.s("bert"), &other]);
    let o = f.search("missing_idx", "City_7", &[]);
    assert_one_line_error(&o, &["missing_idx", "does not exist"]);
}

#[test]
fn unknown_flag_and_bad_values_exit_non_zero() {
    let o = refrag(&["index", "--corpus", "c.txt", "--index_dir", "i", "--bogus"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--bogus"));
    let o = refrag(&[
        "search",
        "--index_dir",
        "i",
        "--question",
        "q",
        "--retrieval",
        "fuzzy",
    ]);
    assert!(!o.status.success());
    let f = Fixture::new();
    assert!(f.index("corpus.txt", "idx", &[]).status.success());
    assert_one_line_error(&f.search("idx", "q", &["--topk", "0"]), &["--topk"]);
}

#[test]
fn ivf_and_hnsw_factory_strings() {
    let f = Fixture::new();
    std::fs::write(f.path("big.txt"), corpus(200)).unwrap();
    for (t, dir) in [
        ("IVF4,Flat", "ivf"),
        ("HNSW16", "hnsw"),
        ("IVF2,PQ4x4", "pq"),
    ] {
        let o = f.index("big.txt", dir, &["--index_type", t]);
        assert!(o.status.success(), "{t}: {}", stderr(&o));
        for mode in ["dense", "hybrid"] {
            let out = json(&f.search(
                dir,
                "Which river flows through City_7?",
                &["--retrieval", mode],
            ));
            assert_eq!(out["hits"].as_array().unwrap().len(), 8, "{t} {mode}");
            if mode == "hybrid" {
                assert!(city7_kept(&out), "{t}: {out}");
            }
        }
    }
    let m: Value =
        serde_json::from_slice(&std::fs::read(f.path("ivf/manifest.json")).unwrap()).unwrap();
    assert_eq!(m["nprobe"], 4);
}

/// Kill `index --force` while it is embedding: the old index must still load and answer.
#[test]
fn interrupted_rebuild_leaves_the_old_index() {
    let f = Fixture::new();
    assert!(f.index("corpus.txt", "idx", &[]).status.success());
    let before = f.snapshot("idx");
    std::fs::write(f.path("huge.txt"), corpus(40).repeat(1500)).unwrap();
    let (c, i, m) = (f.s("huge.txt"), f.s("idx"), f.s("bert"));
    let mut child = Command::new(env!("CARGO_BIN_EXE_refrag"))
        .args([
            "index",
            "--corpus",
            &c,
            "--index_dir",
            &i,
            "--embed_model",
            &m,
            "--force",
            "--quiet",
        ])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    while !staging_exists(f.dir.path()) {
        assert!(
            child.try_wait().unwrap().is_none(),
            "index finished before it could be interrupted"
        );
        assert!(
            started.elapsed().as_secs() < 60,
            "no staging directory appeared"
        );
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    child.kill().unwrap();
    let status = child.wait().unwrap();
    assert!(!status.success());
    assert!(
        f.snapshot("idx") == before,
        "index changed by an interrupted build"
    );
    let out = json(&f.search(
        "idx",
        "Which river flows through City_7?",
        &["--retrieval", "lexical"],
    ));
    assert_eq!(out["hits"][0]["id"], 0);
}

fn staging_exists(dir: &Path) -> bool {
    std::fs::read_dir(dir).unwrap().any(|e| {
        e.unwrap()
            .file_name()
            .to_string_lossy()
            .starts_with(".idx.building-")
    })
}

#[test]
fn search_questions_file_equals_single_searches() {
    let f = Fixture::new();
    assert!(f.index("corpus.txt", "idx", &[]).status.success());
    let qs = [
        "Which river flows through City_7?",
        "Alloy_10 melting point",
    ];
    std::fs::write(f.path("q.txt"), format!("{}\n\n  \n{}\n", qs[0], qs[1])).unwrap();
    let (i, q) = (f.s("idx"), f.s("q.txt"));
    for mode in ["lexical", "hybrid"] {
        let o = refrag(&[
            "search",
            "--index_dir",
            &i,
            "--questions",
            &q,
            "--retrieval",
            mode,
            "--topk",
            "4",
            "--quiet",
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        assert!(
            stderr(&o).contains("skipped 2 blank lines in"),
            "{}",
            stderr(&o)
        );
        let text = String::from_utf8_lossy(&o.stdout).into_owned();
        let got: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(got.len(), 2, "{text}");
        for ((g, question), line) in got.iter().zip(qs).zip([1, 4]) {
            assert_eq!(g["id"], line.to_string());
            assert_eq!(g["line"], line);
            let mut one = json(&f.search("idx", question, &["--retrieval", mode, "--topk", "4"]));
            let one = one.as_object_mut().unwrap();
            one.insert("id".into(), line.to_string().into());
            one.insert("line".into(), line.into());
            assert_eq!(g, &Value::Object(one.clone()), "{mode}: {question}");
        }
    }
    // JSONL with ids, into --out (atomically: the old file stays until the run ends).
    std::fs::write(
        f.path("q.jsonl"),
        format!("{{\"id\":\"c7\",\"question\":\"{}\"}}\n", qs[0]),
    )
    .unwrap();
    std::fs::write(f.path("hits.jsonl"), "old\n").unwrap();
    let (qj, out) = (f.s("q.jsonl"), f.s("hits.jsonl"));
    let o = refrag(&[
        "search",
        "--index_dir",
        &i,
        "--questions",
        &qj,
        "--out",
        &out,
        "--quiet",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(o.stdout.is_empty());
    let line: Value =
        serde_json::from_str(std::fs::read_to_string(&out).unwrap().trim_end()).unwrap();
    assert_eq!(line["id"], "c7");
    assert!(city7_kept(&line), "{line}");
}

#[test]
fn search_questions_refused_with_question_or_a_bad_line() {
    let f = Fixture::new();
    std::fs::write(f.path("q.txt"), "City_7\n").unwrap();
    let q = f.s("q.txt");
    let o = f.search("idx", "City_7", &["--questions", &q]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let o = refrag(&["search", "--index_dir", &f.s("idx")]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    // A bad line fails before the (missing) index is opened, naming the file and line.
    std::fs::write(
        f.path("q.jsonl"),
        "{\"question\":\"City_7\"}\n{\"question\":\"\"}\n",
    )
    .unwrap();
    let qj = f.s("q.jsonl");
    let o = refrag(&["search", "--index_dir", &f.s("idx"), "--questions", &qj]);
    assert_one_line_error(&o, &["q.jsonl:2: question is empty"]);
    assert!(!stderr(&o).contains("does not exist"), "{}", stderr(&o));
}
