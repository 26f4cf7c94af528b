//! `refrag index` over a directory of documents and `index --append`, end to end: the real
//! binary on a tiny random BERT (nothing downloads). With random weights dense retrieval is
//! meaningless, so retrieval of text deep inside a long file is checked with BM25 here, and with
//! the real all-MiniLM-L6-v2 in an ignored test.

mod common;
use common::{refrag, stderr};

use std::path::{Path, PathBuf};
use std::process::Output;

use refrag::retrieval::index::documents::Splitter;
use serde_json::Value;

fn ok(o: Output) -> Output {
    assert!(o.status.success(), "stderr: {}", stderr(&o));
    o
}

/// The sentence deep inside `long.txt` that the questions ask about.
const NEEDLE: &str =
    "The lighthouse keeper Zorbulon_77 hid the brass key beneath the third stair of the tower.";

/// About 5,000 words of paragraphs about grain and roads, with [`NEEDLE`] four fifths in.
fn long_text() -> String {
    let mut paras = Vec::new();
    for p in 0..60 {
        let mut sentences: Vec<String> = (0..6)
            .map(|s| {
                let i = p * 6 + s;
                format!("In year {i} the council of Town_{i} debated the price of grain, the repair of the old roads and the wages of the millers.")
            })
            .collect();
        if p == 48 {
            sentences.insert(3, NEEDLE.to_string());
        }
        paras.push(sentences.join(" "));
    }
    paras.join("\n\n") + "\n"
}

struct Fixture {
    dir: tempfile::TempDir,
    model: String,
}

impl Fixture {
    /// A tiny BERT and `docs/`: a Markdown guide, the long text, a JSONL of records, a
    /// one-passage-per-line text file and two files of other kinds.
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let bert = dir.path().join("bert");
        refrag::testing::bert::write_tiny_bert(&bert, 1, Some("mean")).unwrap();
        let f = Self {
            model: bert.to_string_lossy().into_owned(),
            dir,
        };
        let docs = f.path("docs");
        std::fs::create_dir_all(docs.join("notes")).unwrap();
        let w = |rel: &str, text: &str| std::fs::write(docs.join(rel), text).unwrap();
        w(
            "notes/guide.md",
            "# Guide to the river\n\nThe river rises in the hills.\n\nCity_3 lies on the river.\n",
        );
        w("long.txt", &long_text());
        w(
            "recs.jsonl",
            "{\"id\":\"r1\",\"title\":\"Alloys\",\"text\":\"Alloy_5 melts at 900 degrees.\"}\n{\"id\":2,\"text\":\"Person_9 was born in City_4.\"}\n\n{\"text\":\"Event_1 happened in 1500.\"}\n",
        );
        w(
            "lines.txt",
            "City_1 lies on River_1.\nCity_2 lies on River_2.\n",
        );
        w("image.png", "not text");
        w("notes/table.csv", "a,b\n");
        f
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn s(&self, rel: &str) -> String {
        self.path(rel).to_string_lossy().into_owned()
    }

    fn index(&self, corpus: &str, idx: &str, extra: &[&str]) -> Output {
        let (c, i) = (self.s(corpus), self.s(idx));
        let mut args = vec!["index", "--corpus", &c, "--index_dir", &i];
        args.extend(["--embed_model", &self.model, "--quiet"]);
        args.extend_from_slice(extra);
        refrag(&args)
    }

    /// A tiny decoder in `dec/` and the flags that build a chunk cache with it (k = 4).
    fn cache_flags(&self) -> Vec<String> {
        refrag::testing::llama::write_tiny_llama(&self.path("dec"), 3).unwrap();
        ["--enc", &self.model, "--dec", &self.s("dec"), "--k", "4"]
            .map(String::from)
            .to_vec()
    }

    fn chunk_cache(&self, idx: &str) -> refrag::compression::chunk_cache::ChunkCache {
        refrag::compression::chunk_cache::ChunkCache::load(&self.path(idx))
            .unwrap()
            .expect("a chunk cache")
    }

    fn search(&self, idx: &str, question: &str, mode: &str) -> Value {
        let i = self.s(idx);
        let o = ok(refrag(&[
            "search",
            "--index_dir",
            &i,
            "--question",
            question,
            "--retrieval",
            mode,
            "--topk",
            "5",
            "--quiet",
        ]));
        serde_json::from_slice(&o.stdout).unwrap()
    }

    fn passages(&self, idx: &str) -> Vec<Value> {
        std::fs::read_to_string(self.path(&format!("{idx}/passages.jsonl")))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    fn manifest(&self, idx: &str) -> Value {
        serde_json::from_slice(&std::fs::read(self.path(&format!("{idx}/manifest.json"))).unwrap())
            .unwrap()
    }

    /// The characters `[s, e)` of the source of passage `p`: a file of `docs/`, or the `text` of
    /// the `.jsonl` record it names.
    fn source_slice(&self, p: &Value) -> String {
        let source = p["source"].as_str().unwrap();
        let text = match std::fs::read_to_string(self.path("docs").join(source)) {
            Ok(t) => t,
            Err(_) => {
                let recs = std::fs::read_to_string(self.path("docs/recs.jsonl")).unwrap();
                let line = |i: usize| recs.lines().nth(i).unwrap().to_string();
                let rec: Value = match source {
                    "r1" => serde_json::from_str(&line(0)).unwrap(),
                    "2" => serde_json::from_str(&line(1)).unwrap(),
                    "recs.jsonl:4" => serde_json::from_str(&line(3)).unwrap(),
                    other => panic!("unknown source {other}"),
                };
                rec["text"].as_str().unwrap().to_string()
            }
        };
        let span = &p["span"];
        let (s, e) = (span[0].as_u64().unwrap(), span[1].as_u64().unwrap());
        text.chars()
            .skip(s as usize)
            .take((e - s) as usize)
            .collect()
    }
}

fn count<'a>(ps: &'a [Value], source: &str) -> Vec<&'a Value> {
    ps.iter().filter(|p| p["source"] == source).collect()
}

#[test]
fn a_directory_of_documents_indexes_with_sources_and_spans() {
    let f = Fixture::new();
    let o = ok(f.index("docs", "idx", &[]));
    assert!(stderr(&o).contains("skipped 2 files in"), "{}", stderr(&o));
    let ps = f.passages("idx");
    let m = f.manifest("idx");
    assert_eq!(m["count"], ps.len());
    assert_eq!(m["passage_tokens"], 62); // the tiny BERT's 64 positions less [CLS] and [SEP]
    let docs: Vec<&str> = m["documents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["source"].as_str().unwrap())
        .collect();
    assert_eq!(
        docs,
        [
            "lines.txt",
            "long.txt",
            "notes/guide.md",
            "r1",
            "2",
            "recs.jsonl:4"
        ]
    );
    // Every passage is exactly its source's characters at its span.
    for p in &ps {
        assert_eq!(p["text"].as_str().unwrap(), f.source_slice(p), "{p}");
    }
    // The one-passage-per-line file is read as before; the short Markdown file is one passage.
    let lines: Vec<&str> = count(&ps, "lines.txt")
        .iter()
        .map(|p| p["text"].as_str().unwrap())
        .collect();
    assert_eq!(
        lines,
        ["City_1 lies on River_1.", "City_2 lies on River_2."]
    );
    let guide = count(&ps, "notes/guide.md");
    assert_eq!(guide.len(), 1);
    assert_eq!(guide[0]["title"], "Guide to the river");
    assert_eq!(count(&ps, "r1")[0]["title"], "Alloys");
    // The long file is cut into many passages within the token budget, in order.
    let tok = f.path("bert/tokenizer.json");
    let splitter = Splitter::new(&tok, 62, 32).unwrap();
    let long = count(&ps, "long.txt");
    assert!(long.len() > 50, "{}", long.len());
    for w in long.windows(2) {
        assert!(w[1]["span"][0].as_u64() > w[0]["span"][0].as_u64());
    }
    for p in &long {
        assert!(splitter.count(p["text"].as_str().unwrap()).unwrap() <= 62);
    }
    // A question about the text four fifths into the long file finds that source and span.
    let out = f.search(
        "idx",
        "Where did Zorbulon_77 hide the brass key?",
        "lexical",
    );
    let top = &out["hits"][0];
    assert_eq!(top["source"], "long.txt", "{out}");
    assert!(top["text"].as_str().unwrap().contains("Zorbulon_77"));
    let at = long_text().find("Zorbulon_77").unwrap();
    let span = (
        top["span"][0].as_u64().unwrap(),
        top["span"][1].as_u64().unwrap(),
    );
    assert!(span.0 as usize <= at && at < span.1 as usize, "{span:?}");
    assert!(span.0 as usize > long_text().len() / 2);
}

#[test]
fn seed_corpus_file_indexes_exactly_as_lines() {
    let f = Fixture::new();
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/corpus_small.txt");
    let text = std::fs::read_to_string(&corpus).unwrap();
    let c = corpus.to_string_lossy().into_owned();
    let i = f.s("seed");
    ok(refrag(&[
        "index",
        "--corpus",
        &c,
        "--index_dir",
        &i,
        "--embed_model",
        &f.model,
        "--quiet",
        "--passage_tokens",
        "100000",
    ]));
    let ps = f.passages("seed");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(ps.len(), lines.len());
    for (id, (p, line)) in ps.iter().zip(&lines).enumerate() {
        assert_eq!(
            (p["id"].as_u64(), p["text"].as_str()),
            (Some(id as u64), Some(*line))
        );
        assert_eq!(p["source"], "corpus_small.txt");
    }
}

#[test]
fn append_embeds_only_changed_documents_and_equals_a_rebuild() {
    let f = Fixture::new();
    ok(f.index("docs", "idx", &[]));
    // Unchanged corpus: nothing embedded.
    let o = ok(f.index("docs", "idx", &["--append"]));
    assert!(
        stderr(&o).contains("0 documents added, 0 replaced, 6 unchanged; embedded 0 of"),
        "{}",
        stderr(&o)
    );
    // One changed file and one new one.
    std::fs::write(
        f.path("docs/notes/guide.md"),
        "# Guide to the river\n\nThe river rises in the hills.\n\nCity_3 lies on River_8 now.\n\nA second paragraph.\n",
    )
    .unwrap();
    std::fs::write(f.path("docs/new.md"), "Alloy_6 is hard.\n").unwrap();
    let o = ok(f.index("docs", "idx", &["--append"]));
    ok(f.index("docs", "full", &[]));
    let full = f.passages("full");
    let embedded = count(&full, "notes/guide.md").len() + count(&full, "new.md").len();
    assert!(
        stderr(&o).contains(&format!(
            "1 documents added, 1 replaced, 5 unchanged; embedded {embedded} of {}",
            full.len()
        )),
        "{}",
        stderr(&o)
    );
    // The same passages, ids and sources as the rebuild, and the same search results.
    assert_eq!(f.passages("idx"), full);
    let (ma, mb) = (f.manifest("idx"), f.manifest("full"));
    assert_eq!(ma["documents"].as_array().unwrap().len(), 7);
    for key in ["count", "corpus_sha256"] {
        assert_eq!(ma[key], mb[key], "{key}");
    }
    for mode in ["dense", "lexical", "hybrid"] {
        for q in ["Which river flows through City_3?", "Zorbulon_77 brass key"] {
            let (a, b) = (f.search("idx", q, mode), f.search("full", q, mode));
            let ids = |v: &Value| -> Vec<Value> {
                v["hits"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|h| h["id"].clone())
                    .collect()
            };
            assert_eq!(ids(&a), ids(&b), "{mode} {q}");
            for (x, y) in a["hits"]
                .as_array()
                .unwrap()
                .iter()
                .zip(b["hits"].as_array().unwrap())
            {
                let d = x["score"].as_f64().unwrap() - y["score"].as_f64().unwrap();
                assert!(d.abs() < 1e-4, "{mode}: {x} vs {y}");
                assert_eq!((&x["source"], &x["span"]), (&y["source"], &y["span"]));
            }
        }
    }
}

/// The chunk cache of `idx` holds what `full`'s does: metadata, each passage's chunks, their
/// tokens, scores and vectors.
fn assert_same_cache(f: &Fixture, idx: &str, full: &str) {
    let (a, full) = (f.chunk_cache(idx), f.chunk_cache(full));
    assert_eq!(a.meta, full.meta);
    let cpu = candle_core::Device::Cpu;
    for id in 0..full.meta.passages {
        assert_eq!(a.chunk_range(id), full.chunk_range(id), "passage {id}");
        let chunks: Vec<usize> = full.chunk_range(id).collect();
        for &c in &chunks {
            assert_eq!(a.chunk_tokens(c), full.chunk_tokens(c));
            assert!((a.score(c) - full.score(c)).abs() < 1e-4, "chunk {c}");
        }
        let (va, vf) = (
            a.vectors(&chunks, &cpu).unwrap(),
            full.vectors(&chunks, &cpu).unwrap(),
        );
        let diff = (va - vf).unwrap().abs().unwrap().max_all().unwrap();
        assert!(diff.to_scalar::<f32>().unwrap() < 1e-4, "passage {id}");
    }
}

#[test]
fn append_extends_the_chunk_cache_as_a_rebuild_builds_it() {
    let f = Fixture::new();
    let flags = f.cache_flags();
    let cache: Vec<&str> = flags.iter().map(String::as_str).collect();
    ok(f.index("docs", "idx", &cache));
    std::fs::write(
        f.path("docs/notes/guide.md"),
        "# Guide\n\nCity_3 lies on River_8.\n",
    )
    .unwrap();
    std::fs::write(f.path("docs/new.md"), "Alloy_6 is hard.\n").unwrap();
    ok(f.index("docs", "idx", &[&cache[..], &["--append"]].concat()));
    ok(f.index("docs", "full", &cache));
    assert_same_cache(&f, "idx", "full");
    // Another k than the cache's is refused before anything is written.
    let o = f.index(
        "docs",
        "idx",
        &[&["--append"], &cache[..4], &["--k", "8"]].concat(),
    );
    assert!(
        stderr(&o).contains("chunk cache has k=4, not --k 8"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn append_with_prune_drops_deleted_documents_as_a_rebuild_would() {
    let f = Fixture::new();
    let flags = f.cache_flags();
    let cache: Vec<&str> = flags.iter().map(String::as_str).collect();
    ok(f.index("docs", "idx", &cache));
    ok(f.index("docs", "kept", &cache));
    std::fs::remove_file(f.path("docs/lines.txt")).unwrap();
    std::fs::write(f.path("docs/new.md"), "Alloy_6 is hard.\n").unwrap();
    // Without --prune the deleted file's passages stay.
    ok(f.index("docs", "kept", &[&cache[..], &["--append"]].concat()));
    assert_eq!(count(&f.passages("kept"), "lines.txt").len(), 2);
    ok(f.index("docs", "full", &cache));
    let o = ok(f.index(
        "docs",
        "idx",
        &[&cache[..], &["--append", "--prune"]].concat(),
    ));
    assert!(
        stderr(&o).contains("1 documents added, 0 replaced, 5 unchanged, 1 removed; embedded 1 of"),
        "{}",
        stderr(&o)
    );
    let full = f.passages("full");
    assert_eq!(f.passages("idx"), full);
    assert!(count(&full, "lines.txt").is_empty());
    let (ma, mb) = (f.manifest("idx"), f.manifest("full"));
    for key in ["count", "corpus_sha256", "documents"] {
        assert_eq!(ma[key], mb[key], "{key}");
    }
    assert_same_cache(&f, "idx", "full");
    for q in ["City_1 lies on River_1", "Alloy_6 is hard"] {
        assert_eq!(
            f.search("idx", q, "hybrid")["hits"],
            f.search("full", q, "hybrid")["hits"]
        );
    }
    // --prune means nothing without --append.
    let o = f.index("docs", "other", &["--prune"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--append"), "{}", stderr(&o));
}

#[test]
fn a_failed_append_leaves_the_index_and_old_indexes_still_load() {
    let f = Fixture::new();
    ok(f.index("docs", "idx", &[]));
    let snapshot = || -> Vec<(PathBuf, Vec<u8>)> {
        let mut v: Vec<_> = std::fs::read_dir(f.path("idx"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .map(|p| (p.clone(), std::fs::read(&p).unwrap()))
            .collect();
        v.sort();
        v
    };
    let before = snapshot();
    std::fs::write(f.path("docs/bad.txt"), b"ok\n\xff\n").unwrap();
    let o = f.index("docs", "idx", &["--append"]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("bad.txt:2: invalid UTF-8"),
        "{}",
        stderr(&o)
    );
    assert!(snapshot() == before);
    std::fs::remove_file(f.path("docs/bad.txt")).unwrap();
    let o = f.index("docs", "idx", &["--append", "--passage_tokens", "40"]);
    assert!(
        stderr(&o).contains("--passage_tokens 62 --passage_overlap 32"),
        "{}",
        stderr(&o)
    );
    let o = f.index("docs", "missing", &["--append"]);
    assert!(stderr(&o).contains("--append: index dir"), "{}", stderr(&o));
    // An index written before documents (no sources, no documents) still searches.
    let ps: String = f
        .passages("idx")
        .iter()
        .map(|p| format!("{{\"id\":{},\"text\":{}}}\n", p["id"], p["text"]))
        .collect();
    std::fs::write(f.path("idx/passages.jsonl"), ps).unwrap();
    let mut m = f.manifest("idx");
    for k in ["documents", "passage_tokens", "passage_overlap"] {
        m.as_object_mut().unwrap().remove(k);
    }
    std::fs::write(f.path("idx/manifest.json"), m.to_string()).unwrap();
    std::fs::remove_file(f.path("idx/vectors.safetensors")).unwrap();
    let out = f.search("idx", "Zorbulon_77", "lexical");
    assert!(out["hits"][0]["text"]
        .as_str()
        .unwrap()
        .contains("Zorbulon_77"));
    assert!(out["hits"][0].get("source").is_none(), "{out}");
    let o = f.index("docs", "idx", &["--append"]);
    assert!(
        stderr(&o).contains("records no documents"),
        "{}",
        stderr(&o)
    );
}

#[test]
#[ignore = "needs models/all-MiniLM-L6-v2"]
fn real_embedder_finds_the_deep_passage_by_meaning() {
    let f = Fixture::new();
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/all-MiniLM-L6-v2");
    let m = model.to_string_lossy().into_owned();
    let (c, i) = (f.s("docs"), f.s("real"));
    ok(refrag(&[
        "index",
        "--corpus",
        &c,
        "--index_dir",
        &i,
        "--embed_model",
        &m,
        "--quiet",
    ]));
    assert_eq!(f.manifest("real")["passage_tokens"], 254);
    let out = f.search(
        "real",
        "Where did the lighthouse keeper hide the brass key?",
        "dense",
    );
    let top = &out["hits"][0];
    assert_eq!(top["source"], "long.txt", "{out}");
    assert!(top["text"].as_str().unwrap().contains("brass key"), "{out}");
    assert_eq!(top["text"].as_str().unwrap(), f.source_slice(top));
}
