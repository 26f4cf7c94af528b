//! `refrag chat`: questions typed on stdin, answered with the models and the index loaded once.
//! Each answer is printed on its own line, then one short line naming its sources (rank, source
//! and character span, how many of the passage's chunks were expanded) and the time to first
//! token. A blank line is skipped; `exit`, `quit` or the end of input ends the session. A question
//! the decoder cannot hold gets its one-line error on stderr and the session goes on. Answers are
//! those of `generate --question` with the same flags (the seed restarts for each question).

use std::io::{BufRead, IsTerminal, Write};

use anyhow::Result;
use serde_json::Value;

use super::generate::{check_one, decoder_limits, with_weights, Session};
use crate::cli::ChatArgs;

pub fn run(a: &ChatArgs) -> Result<()> {
    let g = &a.answer;
    let c = &with_weights(&g.compress, &g.models)?;
    let limits = decoder_limits(&g.models, c)?;
    let session = Session::open(g, c)?;
    let stdin = std::io::stdin();
    let interactive = stdin.is_terminal();
    if interactive {
        eprintln!("refrag: ready; type a question (exit or Ctrl-D to leave)");
    }
    let mut out = std::io::stdout().lock();
    loop {
        if interactive {
            eprint!("> ");
            std::io::stderr().flush()?;
        }
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 {
            break;
        }
        let q = line.trim();
        if q.is_empty() {
            continue;
        }
        if matches!(q, "exit" | "quit") {
            break;
        }
        if let Err(e) = check_one(g, c, &limits, q, "question") {
            eprintln!("refrag: {e:#}");
            continue;
        }
        let v = session.answer(q)?;
        writeln!(out, "{}", v["answer"].as_str().unwrap_or_default())?;
        writeln!(out, "{}", sources_line(&v))?;
        out.flush()?;
    }
    Ok(())
}

/// `sources: [1] notes.md [120..480] 2/5 expanded; [2] ... (TTFT 0.41 s)`.
fn sources_line(v: &Value) -> String {
    let parts: Vec<String> = v["sources"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|s| {
            let name = match s["source"].as_str() {
                Some(n) => n.to_string(),
                None => format!("passage {}", s["id"]),
            };
            let span = match s["span"].as_array().map(Vec::as_slice) {
                Some([a, b]) => format!(" [{a}..{b}]"),
                _ => String::new(),
            };
            format!(
                "[{}] {name}{span} {}/{} expanded",
                s["rank"], s["expanded"], s["chunks"]
            )
        })
        .collect();
    format!(
        "sources: {} (TTFT {:.2} s)",
        parts.join("; "),
        v["TTFT_sec"].as_f64().unwrap_or(0.0)
    )
}
