//! `refrag eval`: every question of a QA file through retrieval and generation, answered in each
//! selection mode side by side in one run (no context, full context, REFRAG heuristic / random /
//! policy), on the same decoder and the same retrieved passages. Retrieval and tokenization are
//! done once per question and shared by the modes. Writes a JSON report (`--out`) and prints a
//! markdown table: exact match, token F1, recall@topk, TTFT and TTIT, compression achieved.
//! `--rag_json` may also be a SQuAD-format file ([`crate::io::squad`]); without `--index_dir` its
//! paragraphs are indexed into a temporary directory, removed at the end.

use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde::Serialize;
use serde_json::json;

use crate::cli::{EvalArgs, EvalMode, SelectMode};
use crate::commands::generate::{decoder_limits, open_pipeline};
use crate::decoder::sample::Sampler;
use crate::evaluation::metrics::{self, mean, median};
use crate::io::checkpoint::RefragConfig;
use crate::io::jsonio;
use crate::io::schema::QaPair;
use crate::pipeline::{
    cache_or_encode, ChunkSource, Encode, Generated, Passage, Prepared, Refrag, StageTimes,
};
use crate::retrieval::search::Retriever;
use crate::{device, limits, progress};

/// One mode's answer to one question.
#[derive(Debug, Clone, Serialize)]
pub struct ModeAnswer {
    pub mode: EvalMode,
    pub answer: String,
    pub em: f64,
    pub f1: f64,
    pub ttft: f64,
    /// Mean seconds per token after the first; `None` when fewer than two tokens came out.
    pub ttit: Option<f64>,
    pub tokens: usize,
    pub positions: usize,
    pub expanded: usize,
    pub chunks: usize,
    /// Whether the plain tokens the decoder read (its expanded chunks, each run of neighbours
    /// joined) contain a gold answer: selection recall, apart from how well the decoder reads.
    pub answer_in_text: bool,
    pub times: StageTimes,
}

/// One question with the answers of every mode.
#[derive(Debug, Clone, Serialize)]
pub struct QuestionRecord {
    pub id: String,
    pub question: String,
    pub answers: Vec<String>,
    pub passage_ids: Vec<usize>,
    /// Whether a retrieved passage answers the question (recall@topk).
    pub gold_retrieved: bool,
    /// Decoder positions of the full-context input of this question.
    pub positions_full: usize,
    pub results: Vec<ModeAnswer>,
}

/// A mode's figures over all questions.
#[derive(Debug, Clone, Serialize)]
pub struct ModeSummary {
    pub mode: EvalMode,
    /// Fraction of chunks expanded (1 for full context, 0 for no context).
    pub p: f64,
    pub n: usize,
    pub em: f64,
    pub f1: f64,
    pub ttft_mean: f64,
    pub ttft_median: f64,
    pub ttit_mean: f64,
    pub ttit_median: f64,
    /// Fraction of questions whose plain-token context holds a gold answer.
    pub answer_in_text: f64,
    pub positions_mean: f64,
    pub positions_full_mean: f64,
    /// Full-context positions / this mode's positions, summed over questions (none for no-context).
    pub compression: Option<f64>,
    /// Median TTFT of full context / median TTFT of this mode, when full context was run.
    pub speedup_vs_full: Option<f64>,
    /// Mean seconds per stage before the first token.
    pub ttft_breakdown_mean: StageTimes,
}

/// What every question is evaluated with.
struct Evaluator<'a> {
    args: &'a EvalArgs,
    refrag: &'a Refrag,
    retriever: &'a Retriever,
    /// Where chunks come from: the index's chunk cache when it fits, else the encoder.
    source: &'a dyn ChunkSource,
    modes: &'a [EvalMode],
}

/// Check the flags before any model loads; returns the modes asked for (empty = the default).
fn validate(a: &EvalArgs) -> Result<()> {
    if a.compress.select.is_some() || a.compress.heuristic {
        bail!("--select and --heuristic have no effect in eval; pick selections with --modes");
    }
    Ok(())
}

/// Every question non-empty and within the decoder's window with `--ctx_max` and `--max_new`,
/// checked with the decoder's tokenizer alone, before any model loads.
fn check_questions(a: &EvalArgs, qas: &[QaPair]) -> Result<()> {
    let (dtok, window) = decoder_limits(&a.models, &a.compress)?;
    for qa in qas {
        let what = format!("--rag_json {} question {}", a.rag_json.display(), qa.id);
        limits::check_question(&qa.question, &what)?;
        limits::Budget::new(
            &dtok,
            &qa.question,
            a.retrieve.topk,
            a.compress.ctx_max,
            a.max_new,
        )?
        .check(window, &what)?;
    }
    Ok(())
}

/// The modes to run: `--modes` as given (policy only with a trained policy), else all of them,
/// with policy when `--load_dir` holds one.
fn resolve_modes(asked: &[EvalMode], have_policy: bool) -> Result<Vec<EvalMode>> {
    if asked.contains(&EvalMode::Policy) && !have_policy {
        bail!("--modes policy needs a trained policy in --load_dir (train_policy writes one)");
    }
    let mut modes: Vec<EvalMode> = if asked.is_empty() {
        let all = [
            EvalMode::NoContext,
            EvalMode::Full,
            EvalMode::Compressed,
            EvalMode::TopnFull,
            EvalMode::Heuristic,
            EvalMode::Random,
            EvalMode::Policy,
        ];
        all.into_iter()
            .filter(|&m| m != EvalMode::Policy || have_policy)
            .collect()
    } else {
        asked.to_vec()
    };
    let mut seen = std::collections::HashSet::new();
    modes.retain(|m| seen.insert(*m));
    Ok(modes)
}

pub fn run(a: &EvalArgs) -> Result<()> {
    validate(a)?;
    let (qas, squad) = read_questions(a)?;
    let a = &EvalArgs {
        compress: crate::commands::generate::with_weights(&a.compress, &a.models)?,
        ..a.clone()
    };
    check_questions(a, &qas)?;
    let load_dir = a.compress.load_dir.as_deref();
    let trained = load_dir.map(RefragConfig::read).transpose()?;
    let modes = resolve_modes(&a.modes, trained.is_some_and(|c| c.has("policy")))?;
    // A temporary index of a SQuAD file's paragraphs is removed when `run` returns.
    let (retrieve, _tmp) = match (&a.retrieve.index_dir, &squad) {
        (Some(d), _) => (a.retrieve.with_index_dir(d.clone()), None),
        (None, Some(s)) => {
            let tmp = squad_index(a, s)?;
            (
                a.retrieve.with_index_dir(tmp.path().join("index")),
                Some(tmp),
            )
        }
        (None, None) => unreachable!("read_questions refuses it"),
    };
    let (dev, retriever, dec, refrag, cache) =
        open_pipeline(&retrieve, &a.embed, &a.models, &a.compress, &a.runtime)?;
    let ev = Evaluator {
        args: a,
        refrag: &refrag,
        retriever: &retriever,
        source: cache_or_encode(cache.as_ref()),
        modes: &modes,
    };
    let bar = progress::bar(
        qas.len(),
        a.runtime.quiet,
        "eval {bar:40} {pos}/{len} questions [{elapsed_precise} < {eta_precise}]",
    );
    let mut records = Vec::with_capacity(qas.len());
    for (i, qa) in qas.iter().enumerate() {
        records.push(ev.question(i, qa)?);
        bar.inc(1);
    }
    bar.finish_and_clear();
    let summaries: Vec<ModeSummary> = modes
        .iter()
        .map(|&m| summarize(m, a.compress.p, &records))
        .collect();
    let summaries = with_speedups(summaries);
    let recall = mean(
        &records
            .iter()
            .map(|r| f64::from(u8::from(r.gold_retrieved)))
            .collect::<Vec<_>>(),
    );
    let report = json!({
        "config": config_json(a, &refrag, &dec, cache.is_some(), &dev),
        "n": records.len(),
        "recall_at_topk": recall,
        "modes": summaries,
        "questions": records,
    });
    jsonio::write_json(&a.out, &report)?;
    print!(
        "{}",
        markdown(&summaries, recall, a.retrieve.topk, records.len())
    );
    eprintln!("refrag: wrote {}", a.out.display());
    Ok(())
}

/// The questions of `--rag_json` (QA JSONL or SQuAD, up to `--limit`), and the SQuAD file when
/// it is one; without `--index_dir` it must be one.
fn read_questions(a: &EvalArgs) -> Result<(Vec<QaPair>, Option<crate::io::squad::Squad>)> {
    let squad = crate::io::squad::read_if_squad(&a.rag_json)?;
    let mut qas: Vec<QaPair> = match &squad {
        Some(s) => s.qas.clone(),
        None => crate::io::schema::read_qa(&a.rag_json)?,
    };
    if a.retrieve.index_dir.is_none() && squad.is_none() {
        bail!(
            "--index_dir is required: --rag_json {} is QA JSONL, not a SQuAD-format file whose paragraphs could be indexed",
            a.rag_json.display()
        );
    }
    qas.truncate(a.limit.unwrap_or(usize::MAX));
    Ok((qas, squad))
}

/// Index the paragraphs of a SQuAD file into `index/` of a temporary directory, with the
/// retrieval model of `--embed_model` and default passage settings.
fn squad_index(a: &EvalArgs, squad: &crate::io::squad::Squad) -> Result<tempfile::TempDir> {
    let tmp = tempfile::Builder::new()
        .prefix("refrag-squad-")
        .tempdir()
        .context("creating a temporary directory for the SQuAD index")?;
    let corpus = tmp.path().join("paragraphs.jsonl");
    crate::io::squad::write_corpus(&squad.paragraphs, &corpus)?;
    let args = crate::cli::IndexArgs {
        corpus,
        strict: false,
        passage_tokens: None,
        passage_overlap: 32,
        append: false,
        prune: false,
        index_dir: tmp.path().join("index"),
        embed: a.embed.clone(),
        index_type: "Flat".to_string(),
        batch_size: 64,
        int8: false,
        enc: None,
        dec: None,
        k: None,
        load_dir: None,
        no_weights: false,
        force: false,
        runtime: a.runtime.clone(),
    };
    crate::commands::index::run(&args)?;
    eprintln!(
        "refrag: indexed the {} paragraphs of {} into a temporary index",
        squad.paragraphs.len(),
        a.rag_json.display()
    );
    Ok(tmp)
}

impl Evaluator<'_> {
    /// Retrieve once, lay the passages out once, and answer in every mode.
    fn question(&self, i: usize, qa: &QaPair) -> Result<QuestionRecord> {
        let (a, c) = (self.args, &self.args.compress);
        let t = Instant::now();
        let hits = self
            .retriever
            .retrieve(&qa.question, a.retrieve.topk, a.retrieve.retrieval)?;
        let retrieval = t.elapsed().as_secs_f64();
        let texts = hits.iter().map(|h| h.text.as_str());
        let gold_retrieved = metrics::gold_retrieved(texts, &qa.question, &qa.answers);
        let passages: Vec<Passage> = hits.iter().map(Passage::from).collect();
        let t = Instant::now();
        let prep = self
            .refrag
            .prepare(&qa.question, &passages, self.source, c.k, c.ctx_max)?;
        let tokenize = t.elapsed().as_secs_f64();
        let positions_full = prep
            .layout
            .num_positions(&vec![true; prep.layout.chunks.len()]);
        let seed = a.runtime.seed.wrapping_add(i as u64);
        let mut results = Vec::with_capacity(self.modes.len());
        for &mode in self.modes {
            let (g, expanded, chunks, in_text) = match mode {
                EvalMode::NoContext => (self.no_context(&qa.question)?, 0, 0, false),
                EvalMode::TopnFull => {
                    let times = StageTimes {
                        retrieval,
                        ..StageTimes::default()
                    };
                    self.top_n_full(qa, &passages, &prep, times)?
                }
                _ => {
                    let times = StageTimes {
                        retrieval,
                        tokenize,
                        ..StageTimes::default()
                    };
                    self.answer(&prep, mode, seed, times, qa)?
                }
            };
            results.push(mode_answer(mode, g, qa, expanded, chunks, in_text));
        }
        Ok(QuestionRecord {
            id: qa.id.clone(),
            question: qa.question.clone(),
            answers: qa.answers.clone(),
            passage_ids: hits.iter().map(|h| h.id).collect(),
            gold_retrieved,
            positions_full,
            results,
        })
    }

    /// Answer from the retrieved passages with one selection; returns the generation, how
    /// many of how many chunks were expanded, and whether their text holds a gold answer.
    fn answer(
        &self,
        prep: &Prepared,
        mode: EvalMode,
        seed: u64,
        mut times: StageTimes,
        qa: &QaPair,
    ) -> Result<(Generated, usize, usize, bool)> {
        let p = self.args.compress.p;
        let (select, p) = match mode {
            EvalMode::Full => (SelectMode::All, 1.0),
            EvalMode::Compressed => (SelectMode::None, 0.0),
            EvalMode::TopnFull => unreachable!("top-n full is answered by top_n_full"),
            EvalMode::Heuristic => (SelectMode::Heuristic, p),
            EvalMode::Random => (SelectMode::Random, p),
            EvalMode::Policy => (SelectMode::Policy, p),
            EvalMode::NoContext => (SelectMode::None, 0.0),
        };
        let (mask, embeds) =
            self.refrag
                .select_and_embed(prep, select, p, seed, self.source, &mut times)?;
        let g = self.generate(prep, &mask, embeds.as_ref(), times)?;
        let in_text = self.answer_in_text(prep, &mask, qa)?;
        Ok((g, mask.iter().filter(|&&m| m).count(), mask.len(), in_text))
    }

    /// Whether the expanded chunks of `prep` (`mask`), each run of neighbours in one passage
    /// read as one text, contain a gold answer of `qa`.
    fn answer_in_text(&self, prep: &Prepared, mask: &[bool], qa: &QaPair) -> Result<bool> {
        let chunks = &prep.layout.chunks;
        let mut run: Vec<u32> = Vec::new();
        for (i, c) in chunks.iter().enumerate() {
            if mask.get(i).copied().unwrap_or(false) {
                run.extend_from_slice(&c.tokens);
            }
            let ends = chunks.get(i + 1).is_none_or(|n| n.passage != c.passage)
                || !mask.get(i + 1).copied().unwrap_or(false);
            if ends && !run.is_empty() {
                let text = self.refrag.dtok.decode(&run)?;
                if metrics::answers_question(&text, &qa.question, &qa.answers) {
                    return Ok(true);
                }
                run.clear();
            }
        }
        Ok(false)
    }

    /// The equal-budget baseline: the passages as plain tokens, in rank order, capped at the
    /// context positions REFRAG at `--p` uses on this question ([`refrag_budget`]).
    fn top_n_full(
        &self,
        qa: &QaPair,
        passages: &[Passage],
        prep: &Prepared,
        mut times: StageTimes,
    ) -> Result<(Generated, usize, usize, bool)> {
        let question = qa.question.as_str();
        let c = &self.args.compress;
        let budget = refrag_budget(&prep.layout, c.k, c.p);
        let t = Instant::now();
        let cut = self
            .refrag
            .prepare(question, passages, self.source, c.k, budget.max(1))?;
        times.tokenize = t.elapsed().as_secs_f64();
        let n = cut.layout.chunks.len();
        let mask = vec![true; n];
        // A budget below one chunk leaves no passage: the template alone.
        let (cut, mask) = if budget == 0 {
            (
                self.refrag.prepare(question, &[], &Encode, 1, 1)?,
                Vec::new(),
            )
        } else {
            (cut, mask)
        };
        let g = self.generate(&cut, &mask, None, times)?;
        let in_text = self.answer_in_text(&cut, &mask, qa)?;
        Ok((g, mask.len(), mask.len(), in_text))
    }

    /// The same template with zero passages.
    fn no_context(&self, question: &str) -> Result<Generated> {
        let t = Instant::now();
        let prep = self.refrag.prepare(question, &[], &Encode, 1, 1)?;
        let times = StageTimes {
            tokenize: t.elapsed().as_secs_f64(),
            ..StageTimes::default()
        };
        self.generate(&prep, &[], None, times)
    }

    /// Greedy generation of up to `--max_new` tokens.
    fn generate(
        &self,
        prep: &Prepared,
        mask: &[bool],
        embeds: Option<&candle_core::Tensor>,
        times: StageTimes,
    ) -> Result<Generated> {
        let mut sampler = Sampler::new(0.0, 1.0, self.args.runtime.seed);
        self.refrag
            .generate(prep, mask, embeds, self.args.max_new, &mut sampler, times)
    }
}

/// Context positions REFRAG spends at `p` on `layout`: one per compressed chunk plus `k` per
/// expanded one (every chunk counted at its full `k`, so the baseline is never short-changed).
pub fn refrag_budget(layout: &crate::compression::prompt::PromptLayout, k: usize, p: f64) -> usize {
    let l = layout.chunks.len();
    let e = crate::select::num_expand(p, l);
    (l - e) + e * k
}

fn mode_answer(
    mode: EvalMode,
    g: Generated,
    qa: &QaPair,
    expanded: usize,
    chunks: usize,
    answer_in_text: bool,
) -> ModeAnswer {
    ModeAnswer {
        mode,
        em: metrics::exact_match(&g.answer, &qa.answers),
        f1: metrics::best_f1(&g.answer, &qa.answers),
        ttft: g.times.ttft(),
        ttit: (g.decode_forwards > 0).then_some(g.ttit),
        tokens: g.tokens.len(),
        positions: g.positions,
        expanded,
        chunks,
        answer_in_text,
        times: g.times,
        answer: g.answer,
    }
}

/// A mode's figures over all records.
pub fn summarize(mode: EvalMode, p: f64, records: &[QuestionRecord]) -> ModeSummary {
    let rows: Vec<(&ModeAnswer, usize)> = records
        .iter()
        .filter_map(|r| {
            r.results
                .iter()
                .find(|x| x.mode == mode)
                .map(|x| (x, r.positions_full))
        })
        .collect();
    let col = |f: &dyn Fn(&ModeAnswer) -> f64| rows.iter().map(|(x, _)| f(x)).collect::<Vec<_>>();
    let ttft = col(&|x| x.ttft);
    let ttit: Vec<f64> = rows.iter().filter_map(|(x, _)| x.ttit).collect();
    let positions: usize = rows.iter().map(|(x, _)| x.positions).sum();
    let full: usize = rows.iter().map(|(_, f)| f).sum();
    let stage = |f: &dyn Fn(&StageTimes) -> f64| mean(&col(&|x| f(&x.times)));
    let n = rows.len().max(1) as f64;
    ModeSummary {
        mode,
        p: match mode {
            EvalMode::NoContext | EvalMode::Compressed => 0.0,
            EvalMode::Full => 1.0,
            _ => p,
        },
        n: rows.len(),
        em: mean(&col(&|x| x.em)),
        f1: mean(&col(&|x| x.f1)),
        ttft_mean: mean(&ttft),
        ttft_median: median(&ttft),
        ttit_mean: mean(&ttit),
        ttit_median: median(&ttit),
        answer_in_text: mean(&col(&|x| f64::from(u8::from(x.answer_in_text)))),
        positions_mean: positions as f64 / n,
        positions_full_mean: full as f64 / n,
        compression: (mode != EvalMode::NoContext).then(|| full as f64 / positions.max(1) as f64),
        speedup_vs_full: None,
        ttft_breakdown_mean: StageTimes {
            retrieval: stage(&|t| t.retrieval),
            tokenize: stage(&|t| t.tokenize),
            encoding: stage(&|t| t.encoding),
            projection: stage(&|t| t.projection),
            selection: stage(&|t| t.selection),
            prefill: stage(&|t| t.prefill),
        },
    }
}

/// Fill in each mode's speed-up over full context (median TTFT ratio) when full context ran.
fn with_speedups(mut s: Vec<ModeSummary>) -> Vec<ModeSummary> {
    let Some(full) = s
        .iter()
        .find(|m| m.mode == EvalMode::Full)
        .map(|m| m.ttft_median)
    else {
        return s;
    };
    for m in &mut s {
        m.speedup_vs_full = (m.ttft_median > 0.0).then(|| full / m.ttft_median);
    }
    s
}

fn config_json(
    a: &EvalArgs,
    refrag: &Refrag,
    dec: &str,
    cached: bool,
    dev: &candle_core::Device,
) -> serde_json::Value {
    let c = &a.compress;
    json!({
        "rag_json": a.rag_json, "index_dir": a.retrieve.index_dir, "topk": a.retrieve.topk,
        "retrieval": a.retrieve.retrieval, "k": c.k, "p": c.p, "ctx_max": c.ctx_max,
        "max_new": a.max_new, "limit": a.limit, "seed": a.runtime.seed, "decoder": dec,
        "encoder": refrag.encoder.model_name(), "projector_trained": refrag.encoder.trained,
        "load_dir": c.load_dir.as_deref().map(Path::display).map(|d| d.to_string()),
        "chunk_cache": cached, "device": device::describe(dev), "decoding": "greedy",
        "exact_match": "normalised gold contained in normalised output, as whole words",
    })
}

/// The markdown table of the summaries, with recall@topk under it.
pub fn markdown(s: &[ModeSummary], recall: f64, topk: usize, n: usize) -> String {
    let mut out = String::from(
        "| mode | p | EM | F1 | answer in text | TTFT mean (s) | TTFT median (s) | TTIT mean (ms) | positions | compression | TTFT speed-up |\n|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    let opt = |x: Option<f64>| x.map_or("n/a".to_string(), |v| format!("{v:.2}x"));
    for m in s {
        let mode = serde_json::to_value(m.mode).unwrap_or_default();
        out.push_str(&format!(
            "| {} | {:.2} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {:.1} | {:.0} / {:.0} | {} | {} |\n",
            mode.as_str().unwrap_or("?"),
            m.p,
            m.em,
            m.f1,
            m.answer_in_text,
            m.ttft_mean,
            m.ttft_median,
            m.ttit_mean * 1e3,
            m.positions_mean,
            m.positions_full_mean,
            opt(m.compression),
            opt(m.speedup_vs_full),
        ));
    }
    out.push_str(&format!(
        "\nrecall@{topk}: {recall:.3} over {n} questions\n"
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_modes_add_policy_only_when_trained() {
        let m = resolve_modes(&[], false).unwrap();
        assert_eq!(m.len(), 6);
        assert!(m.contains(&EvalMode::Compressed) && m.contains(&EvalMode::TopnFull));
        assert!(!m.contains(&EvalMode::Policy));
        assert!(resolve_modes(&[], true)
            .unwrap()
            .contains(&EvalMode::Policy));
        let e = resolve_modes(&[EvalMode::Policy], false).unwrap_err();
        assert!(e.to_string().contains("--modes policy"));
        let m = resolve_modes(&[EvalMode::Full, EvalMode::Random, EvalMode::Full], false).unwrap();
        assert_eq!(m, vec![EvalMode::Full, EvalMode::Random]);
    }
}
