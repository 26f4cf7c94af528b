//! Runs the real `refrag make_corpus`: its output must equal the committed `data/` byte for byte,
//! it must never overwrite existing files without `--force`, and `--mega` must extend the large
//! corpus.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const FILES: [&str; 7] = [
    "corpus_small.txt",
    "corpus_medium.txt",
    "corpus_large.txt",
    "rag_train.jsonl",
    "rag_test.jsonl",
    "cpt_train.jsonl",
    "README_DATA.md",
];

fn committed(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("data")
        .join(name)
}

fn make_corpus(out_dir: &Path, extra: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_refrag"))
        .arg("make_corpus")
        .arg("--out_dir")
        .arg(out_dir)
        .args(extra)
        .output()
        .expect("running refrag")
}

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// Every data file in `dir` equals the committed one, and nothing else is there.
fn assert_matches_committed(dir: &Path) {
    for name in FILES {
        let (ours, theirs) = (read(&dir.join(name)), read(&committed(name)));
        assert!(ours == theirs, "{name} differs from data/{name}");
    }
    let n = std::fs::read_dir(dir).unwrap().count();
    assert_eq!(n, FILES.len(), "stray files in {}", dir.display());
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn regenerates_committed_data_and_never_overwrites_without_force() {
    let dir = tempfile::tempdir().unwrap();
    let out = make_corpus(dir.path(), &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_matches_committed(dir.path());

    let again = make_corpus(dir.path(), &[]);
    assert!(!again.status.success());
    let err = stderr(&again);
    assert_eq!(err.trim_end().lines().count(), 1, "one-line error: {err}");
    assert!(
        err.contains("corpus_small.txt") && err.contains("--force"),
        "{err}"
    );
    assert_matches_committed(dir.path());

    std::fs::write(dir.path().join("rag_test.jsonl"), "changed\n").unwrap();
    let forced = make_corpus(dir.path(), &["--force"]);
    assert!(forced.status.success(), "{}", stderr(&forced));
    assert_matches_committed(dir.path());
}

#[test]
fn one_existing_file_blocks_the_whole_write() {
    let dir = tempfile::tempdir().unwrap();
    let mine = dir.path().join("README_DATA.md");
    std::fs::write(&mine, "my notes\n").unwrap();
    let out = make_corpus(dir.path(), &[]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("README_DATA.md") && err.contains("--force"),
        "{err}"
    );
    assert_eq!(read(&mine), b"my notes\n");
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        1,
        "wrote nothing else"
    );
}

#[test]
fn mega_extends_the_large_corpus() {
    let dir = tempfile::tempdir().unwrap();
    let out = make_corpus(dir.path(), &["--mega", "10000"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let mega = String::from_utf8(read(&dir.path().join("corpus_mega.txt"))).unwrap();
    let large = String::from_utf8(read(&committed("corpus_large.txt"))).unwrap();
    assert_eq!(mega.lines().count(), 10_000);
    assert!(mega.starts_with(&large));
    assert!(mega.ends_with('\n'));
    let last = mega.lines().last().unwrap();
    assert!(
        last.starts_with("TITLE: Historical Timeline — Event_12499. "),
        "{last}"
    );

    let small = tempfile::tempdir().unwrap();
    let out = make_corpus(small.path(), &["--mega", "100"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--mega 100"), "{}", stderr(&out));
    assert_eq!(std::fs::read_dir(small.path()).unwrap().count(), 0);
}
