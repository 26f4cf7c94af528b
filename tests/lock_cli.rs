//! One writer per training `--out_dir`: while another process holds the directory's lock (here
//! the test process itself), every training command fails at once with a one-line error naming
//! the directory and the holder's pid, and a run that ended (even with an error) leaves no lock
//! behind. The `index` side is tested with its fixture in `cli_retrieval.rs`.

mod common;
use common::refrag;

use std::process::Output;

use refrag::io::lock::DirLock;

fn error_line(o: &Output) -> String {
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(o.status.code(), Some(1), "{err}");
    let lines: Vec<&str> = err
        .lines()
        .filter(|l| !l.starts_with("refrag: device"))
        .collect();
    assert_eq!(lines.len(), 1, "{err}");
    lines[0].to_string()
}

#[test]
fn a_second_writer_of_an_out_dir_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let o = out.to_string_lossy().into_owned();
    let missing = dir.path().join("missing.jsonl");
    let m = missing.to_string_lossy().into_owned();
    let held = DirLock::acquire(&out, "--out_dir").unwrap();
    let pid = format!("pid {}", std::process::id());
    let qa = ["--rag_json", &m, "--index_dir", &m];
    for (cmd, data) in [
        ("cpt_recon", &["--train_json", &m][..]),
        ("cpt_next", &["--train_json", &m][..]),
        ("sft", &qa[..]),
        ("train_policy", &qa[..]),
    ] {
        let mut args = vec![cmd, "--out_dir", &o, "--quiet"];
        args.extend_from_slice(data);
        let err = error_line(&refrag(&args));
        for needle in [
            "--out_dir",
            o.as_str(),
            "another refrag process",
            pid.as_str(),
        ] {
            assert!(err.contains(needle), "{cmd}: {needle:?} not in {err}");
        }
    }
    drop(held);
    // Unlocked, the same command gets past the lock (and fails on the data it lacks); the lock
    // it took ended with the process.
    let err = error_line(&refrag(&[
        "sft",
        "--out_dir",
        &o,
        "--quiet",
        "--rag_json",
        &m,
        "--index_dir",
        &m,
    ]));
    assert!(!err.contains("another refrag process"), "{err}");
    DirLock::acquire(&out, "--out_dir").expect("the lock ended with the process");
}
