//! Crash consistency: `index --force` over a good index, the chunk-cache build, and a training run
//! that checkpoints every step are killed with SIGKILL at seeded random moments across their
//! measured run time. After every kill the index directory must hold, byte for byte, either the
//! index it held before or the complete new one (and `search` must answer as that one does); a
//! checkpoint left by a killed run must continue with `--resume` to exactly the weights and eval
//! of an uninterrupted run. Whatever the killed run left beside or inside the directory must be
//! gone once the next run has finished.
//!
//! `cargo test --release --test crash` runs a few kills per command; the long version is
//! `REFRAG_CRASH_KILLS=100 cargo test --release --test crash -- --ignored --nocapture`.

#![cfg(unix)]

mod train_fixture;

use std::collections::BTreeMap;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::Value;
use train_fixture::Fixture;

const SEED: u64 = 13;
const SIGKILL: i32 = 9;

fn refrag() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_refrag"));
    c.env("OPENBLAS_NUM_THREADS", "1")
        .env("RAYON_NUM_THREADS", "1");
    c
}

/// Run to the end; the output and the wall time in seconds.
fn run_ok(args: &[String]) -> (Output, f64) {
    let t = Instant::now();
    let o = refrag().args(args).output().expect("running refrag");
    assert!(
        o.status.success(),
        "refrag {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    (o, t.elapsed().as_secs_f64())
}

/// Start `args` and SIGKILL it after `delay` unless it ended first; whether it was killed.
fn run_killed(args: &[String], delay: Duration) -> bool {
    let mut child = refrag()
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting refrag");
    let deadline = Instant::now() + delay;
    while Instant::now() < deadline {
        if child.try_wait().expect("waiting for refrag").is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let _ = child.kill(); // SIGKILL on Unix; an error only when it has already been reaped
    let status = child.wait().expect("waiting for refrag");
    if status.signal() == Some(SIGKILL) {
        return true;
    }
    assert!(status.success(), "refrag {args:?} failed: {status}");
    false
}

/// The middle of three run times: one run slowed by the machine's other work does not set the
/// range the kill times are drawn from.
fn median(mut t: [f64; 3]) -> f64 {
    t.sort_by(f64::total_cmp);
    t[1]
}

/// Kills per command: `REFRAG_CRASH_KILLS`, else `default`.
fn kills(default: usize) -> usize {
    std::env::var("REFRAG_CRASH_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn s(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// Every file of `dir` by name, the manifest without its creation time.
fn files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        let mut bytes = std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        if name == "manifest.json" {
            let mut m: Value = serde_json::from_slice(&bytes).unwrap();
            m["created_unix"] = Value::from(0);
            bytes = m.to_string().into_bytes();
        }
        out.insert(name, bytes);
    }
    out
}

/// Names in `dir` a finished run must not leave: temporaries of ours and lock files.
fn leftovers(dir: &Path) -> Vec<String> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    rd.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| {
            n.contains(".building-")
                || n.starts_with(".tmp")
                || n.ends_with(".link")
                || n == ".checkpoint.next"
        })
        .collect()
}

/// Kills of one command and what went wrong after them.
#[derive(Default)]
struct Tally {
    /// The command's measured run time, seconds.
    span: f64,
    tried: usize,
    killed: usize,
    failures: Vec<String>,
}

impl Tally {
    fn finish(self, what: &str) {
        eprintln!(
            "crash: {what}: {} kills tried over a median run of {:.2} s ({} before it ended), {} failures",
            self.tried,
            self.span,
            self.killed,
            self.failures.len()
        );
        assert!(self.failures.is_empty(), "{what}: {:#?}", self.failures);
    }
}

/// An index directory's state and `search` answer for one corpus.
struct IndexState {
    files: BTreeMap<String, Vec<u8>>,
    search: Vec<u8>,
}

struct IndexCase {
    f: Fixture,
    /// Extra `index` flags (the chunk cache's).
    extra: Vec<String>,
}

impl IndexCase {
    fn new(cache: bool) -> Self {
        let f = Fixture::new();
        let corpus = |r: std::ops::Range<usize>| {
            r.map(train_fixture::passage).collect::<Vec<_>>().join("\n") + "\n"
        };
        std::fs::write(f.path("a.txt"), corpus(0..12)).unwrap();
        std::fs::write(f.path("b.txt"), corpus(20..34)).unwrap();
        let extra = if cache {
            ["--enc", &f.s("enc"), "--dec", &f.s("dec"), "--k", "8"]
                .map(String::from)
                .to_vec()
        } else {
            Vec::new()
        };
        Self { f, extra }
    }

    fn index_args(&self, corpus: &str, dir: &Path) -> Vec<String> {
        let mut a: Vec<String> = [
            "index",
            "--corpus",
            &self.f.s(corpus),
            "--index_dir",
            &s(dir),
            "--embed_model",
            &self.f.s("enc"),
            "--force",
            "--quiet",
        ]
        .map(String::from)
        .to_vec();
        a.extend(self.extra.iter().cloned());
        a
    }

    fn state(&self, dir: &Path) -> Result<IndexState, String> {
        if !dir.join("manifest.json").is_file() {
            return Err(format!("{} holds no index", dir.display()));
        }
        let args = [
            "search",
            "--index_dir",
            &s(dir),
            "--question",
            "Which river flows through City_3?",
            "--quiet",
        ]
        .map(String::from);
        let o = refrag().args(args).output().unwrap();
        if !o.status.success() {
            return Err(String::from_utf8_lossy(&o.stderr).into_owned());
        }
        if !self.extra.is_empty() {
            let cache = refrag::compression::chunk_cache::ChunkCache::load(dir)
                .map_err(|e| format!("{e:#}"))?;
            cache.ok_or_else(|| format!("{}: no chunk cache", dir.display()))?;
        }
        Ok(IndexState {
            files: files(dir),
            search: o.stdout,
        })
    }
}

fn same(a: &IndexState, b: &IndexState) -> bool {
    a.files == b.files && a.search == b.search
}

/// Kill `index --force` (with `cache`, the chunk-cache build) `n` times, alternating corpora.
fn index_kills(cache: bool, n: usize, what: &str) {
    let case = IndexCase::new(cache);
    let idx = case.f.path("idx");
    let (_, ta) = run_ok(&case.index_args("a.txt", &idx));
    let ref_a = case.state(&idx).unwrap();
    let ref_b_dir = case.f.path("ref_b");
    let (_, tb) = run_ok(&case.index_args("b.txt", &ref_b_dir));
    let ref_b = case.state(&ref_b_dir).unwrap();
    assert!(
        ref_a.files != ref_b.files,
        "the two corpora give two indexes"
    );
    let (_, tc) = run_ok(&case.index_args("b.txt", &ref_b_dir));
    let span = median([ta, tb, tc]);
    let mut rng = ChaCha8Rng::seed_from_u64(SEED + cache as u64);
    let mut tally = Tally {
        span,
        ..Tally::default()
    };
    let mut on_a = true; // which index `idx` holds
    for i in 0..n {
        let corpus = if on_a { "b.txt" } else { "a.txt" };
        let delay = Duration::from_secs_f64(rng.random_range(0.0..span));
        let killed = run_killed(&case.index_args(corpus, &idx), delay);
        tally.tried += 1;
        tally.killed += killed as usize;
        let (old, new) = if on_a {
            (&ref_a, &ref_b)
        } else {
            (&ref_b, &ref_a)
        };
        match case.state(&idx) {
            Ok(st) if same(&st, new) => on_a = !on_a,
            Ok(st) if killed && same(&st, old) => {}
            Ok(_) => tally.failures.push(format!(
                "kill {i} after {delay:?}: the index is neither the old nor the new one"
            )),
            Err(e) => tally.failures.push(format!(
                "kill {i} after {delay:?}: the index does not load: {e}"
            )),
        }
    }
    // The next complete run cleans what the killed ones left beside the index.
    let corpus = if on_a { "b.txt" } else { "a.txt" };
    run_ok(&case.index_args(corpus, &idx));
    let left = leftovers(case.f.dir.path());
    if !left.is_empty() || case.f.path(".idx.lock").exists() {
        tally
            .failures
            .push(format!("left beside the index after a clean run: {left:?}"));
    }
    tally.finish(what);
}

#[test]
fn index_force_killed_keeps_the_previous_index() {
    index_kills(false, kills(4), "index --force");
}

#[test]
fn chunk_cache_build_killed_keeps_the_previous_index() {
    index_kills(true, kills(3), "index --force with the chunk cache");
}

#[test]
#[ignore = "long: REFRAG_CRASH_KILLS kills per command (default 100)"]
fn index_and_chunk_cache_many_kills() {
    index_kills(false, kills(100), "index --force");
    index_kills(true, kills(100), "index --force with the chunk cache");
}

/// The training run under test and its reference result.
struct TrainCase {
    f: Fixture,
}

/// The files a finished run must reproduce exactly, and its final eval.
fn train_result(dir: &Path) -> (BTreeMap<String, Vec<u8>>, Value) {
    let all = files(dir);
    let kept = all
        .into_iter()
        .filter(|(n, _)| n.ends_with(".safetensors") || n == "train_state.json")
        .collect();
    let eval: Value =
        serde_json::from_slice(&std::fs::read(dir.join("eval.json")).unwrap()).unwrap();
    (kept, eval["end"].clone())
}

impl TrainCase {
    fn args(&self, out: &Path, resume: bool) -> Vec<String> {
        let f = &self.f;
        let mut a: Vec<String> = [
            "cpt_recon",
            "--quiet",
            "--train_json",
            &f.s("cpt.jsonl"),
            "--k",
            "4",
            "--max_chunks",
            "2",
            "--steps",
            "4",
            "--batch_size",
            "2",
            "--eval_items",
            "2",
            "--save_every",
            "1",
            "--out_dir",
            &s(out),
            "--device",
            "cpu",
        ]
        .map(String::from)
        .to_vec();
        if resume {
            a.push("--resume".into());
        } else {
            a.extend(["--enc", &f.s("enc"), "--dec", &f.s("dec")].map(String::from));
        }
        a
    }
}

/// Kill `cpt_recon --save_every 1` `n` times; each time continue (or, with no checkpoint yet,
/// start) the run and compare it with an uninterrupted one.
fn train_kills(n: usize) {
    let case = TrainCase { f: Fixture::new() };
    let reference = case.f.path("ref");
    let (_, t1) = run_ok(&case.args(&reference, false));
    let want = train_result(&reference);
    let mut times = [t1, 0.0, 0.0];
    for (k, t) in times.iter_mut().enumerate().skip(1) {
        let again = case.f.path(&format!("ref{k}"));
        *t = run_ok(&case.args(&again, false)).1;
        // What the kills are judged by: the same seed gives the same weights and eval.
        assert!(train_result(&again) == want, "training is not reproducible");
    }
    let span = median(times);
    let mut rng = ChaCha8Rng::seed_from_u64(SEED + 7);
    let mut tally = Tally {
        span,
        ..Tally::default()
    };
    for i in 0..n {
        let out: PathBuf = case.f.path(&format!("run{i}"));
        let delay = Duration::from_secs_f64(rng.random_range(0.0..span));
        let killed = run_killed(&case.args(&out, false), delay);
        tally.tried += 1;
        tally.killed += killed as usize;
        if killed {
            let resumable = out.join("config.json").is_file();
            let o = refrag().args(case.args(&out, resumable)).output().unwrap();
            if !o.status.success() {
                let e = String::from_utf8_lossy(&o.stderr).into_owned();
                tally.failures.push(format!(
                    "kill {i} after {delay:?}: continuing (resume: {resumable}) failed: {e}"
                ));
                continue;
            }
        }
        if train_result(&out) != want {
            tally.failures.push(format!(
                "kill {i} after {delay:?}: the finished run differs from the uninterrupted one"
            ));
        }
        let left = leftovers(&out);
        if !left.is_empty() {
            tally.failures.push(format!(
                "kill {i}: left in the checkpoint after a clean run: {left:?}"
            ));
        }
    }
    tally.finish("cpt_recon --save_every 1");
}

#[test]
fn training_killed_resumes_to_the_same_weights() {
    train_kills(kills(3));
}

#[test]
#[ignore = "long: REFRAG_CRASH_KILLS kills (default 100)"]
fn training_many_kills() {
    train_kills(kills(100));
}
