//! `refrag bench`: time to first token, time per later token and decoding throughput of REFRAG
//! against the full-context baseline, on the same decoder and the same input, over context
//! lengths, chunk sizes `k`, expansion fractions `p`, with and without the chunk cache.
//!
//! Protocol. A context of exactly N decoder tokens is cut from the corpus's passages (each
//! passage chunked on its own, as `generate` does) and put in the one prompt template. For each
//! context length, every repetition runs the full-context input (p = 1: every chunk expanded,
//! which is exactly the ordinary RAG input, identical for every k) and then each REFRAG
//! configuration, back to back in one process, so noise from other work on the machine hits
//! both sides alike. The first `--warmup` repetitions are discarded; medians of `--repeats` are
//! reported. REFRAG's TTFT counts selection (random, seeded: it needs no decoder pass), chunk
//! encoding (not when cached: the vectors are then computed before the clock starts, as the
//! index's chunk cache holds them), projection and prefill; the full side's TTFT is its prefill.
//! Neither side counts retrieval or tokenization of the passages. Decoding runs `--max_new`
//! steps past the first token whatever the tokens are (EOS does not stop it) so TTIT is always
//! measured over the same number of steps.

use anyhow::{bail, Result};
use candle_core::{Device, Tensor};
use serde_json::json;

use crate::cli::{BenchArgs, CacheArg, SelectMode};
use crate::compression::chunk_cache::ChunkCache;
use crate::compression::prompt::{PromptLayout, Template};
use crate::decoder::sample::Sampler;
use crate::evaluation::bench::{self, BenchRow};
use crate::evaluation::metrics::median;
use crate::io::jsonio;
use crate::io::weights::decoder_arg;
use crate::kernels::blas;
use crate::pipeline::{ChunkSource, Decode, Encode, Prepared, Refrag, StageTimes};
use crate::{device, progress};

/// One REFRAG configuration of a context length.
#[derive(Debug, Clone, Copy)]
struct Cell {
    k: usize,
    p: f64,
    cached: bool,
}

/// Seconds of one timed run.
#[derive(Debug, Clone, Copy, Default)]
struct Sample {
    selection: f64,
    encoding: f64,
    projection: f64,
    prefill: f64,
    ttit: f64,
    tokens_per_sec: f64,
    positions: usize,
    expanded: usize,
}

impl Sample {
    fn ttft(&self) -> f64 {
        self.selection + self.encoding + self.projection + self.prefill
    }
}

/// Check the flags before any model loads.
fn validate(a: &BenchArgs) -> Result<()> {
    for (flag, empty) in [
        ("--contexts", a.contexts.is_empty()),
        ("--ks", a.ks.is_empty()),
        ("--p", a.p.is_empty()),
    ] {
        if empty {
            bail!("{flag} lists nothing to measure");
        }
    }
    Ok(())
}

pub fn run(a: &BenchArgs) -> Result<()> {
    validate(a)?;
    let peak_measured = a.peak_gflops.is_none();
    if let Some(note) = crate::kernels::blas::core::user_choice_note() {
        eprintln!("{note}");
    }
    let a = &BenchArgs {
        peak_gflops: Some(a.peak_gflops.unwrap_or_else(blas::sgemm_peak_gflops)),
        ..a.clone()
    };
    let corpus = jsonio::read_corpus(&a.corpus, false)?;
    let load_dir = crate::io::weights::resolve_load_dir(
        a.load_dir.as_deref(),
        a.no_weights,
        a.models.enc.as_deref(),
        a.models.dec.as_deref(),
    )?;
    let load_dir = load_dir.as_deref();
    let dev = device::select(a.runtime.device)?;
    let dec = decoder_arg(a.models.dec.as_deref(), load_dir)?;
    let refrag = Refrag::load_with(
        a.models.enc.as_deref(),
        &dec,
        load_dir,
        a.runtime.seed,
        &dev,
        a.quantized,
    )?;
    let (before, after) = refrag.dtok.chat_parts(None);
    let template = Template::new(&before, &after, &a.question, |t| {
        refrag.dtok.encode(t, false)
    })?;
    let longest = a.contexts.iter().copied().max().unwrap_or(0);
    let passages = passage_tokens(&refrag, &corpus, longest)?;
    let (contexts, skipped) = fitting_contexts(a, &refrag, &template, &passages)?;
    if contexts.is_empty() {
        bail!(
            "--contexts: none of {:?} fits the decoder's {} positions with the template and --max_new",
            a.contexts,
            refrag.decoder.config().max_position_embeddings
        );
    }
    let bar = progress::bar(
        contexts.len() * (a.warmup + a.repeats),
        a.runtime.quiet,
        "bench {bar:40} {pos}/{len} runs [{elapsed_precise} < {eta_precise}]",
    );
    let mut rows = Vec::new();
    for &n in &contexts {
        rows.extend(bench_context(a, &refrag, &template, &passages, n, &bar)?);
    }
    bar.finish_and_clear();
    std::fs::create_dir_all(&a.out_dir)
        .map_err(|e| anyhow::anyhow!("--out_dir {}: {e}", a.out_dir.display()))?;
    jsonio::write_json(&a.out_dir.join("bench.json"), &rows)?;
    let meta = meta_json(a, &refrag, &dec, &dev, &skipped, peak_measured);
    jsonio::write_json(&a.out_dir.join("meta.json"), &meta)?;
    bench::plot_svg(&rows, &a.out_dir.join("ttft.svg"))?;
    print!("{}", bench::markdown(&rows));
    eprintln!(
        "refrag: wrote bench.json, meta.json and ttft.svg in {}",
        a.out_dir.display()
    );
    Ok(())
}

/// The context lengths (sorted) whose full input plus `--max_new` tokens fits the decoder's
/// positions, and those skipped, announced on stderr.
fn fitting_contexts(
    a: &BenchArgs,
    refrag: &Refrag,
    t: &Template,
    passages: &[Vec<u32>],
) -> Result<(Vec<usize>, Vec<usize>)> {
    let max = refrag.decoder.config().max_position_embeddings;
    let (mut fit, mut skip) = (Vec::new(), Vec::new());
    let mut contexts = a.contexts.clone();
    contexts.sort_unstable();
    contexts.dedup();
    for n in contexts {
        let positions = match bench::context_chunks(passages, n, n) {
            Some(ch) => {
                let layout = PromptLayout::new(t, &ch);
                layout.num_positions(&vec![true; layout.chunks.len()])
            }
            None => n + t.before.len() + t.after.len(), // a lower bound
        };
        if positions + a.max_new + 1 > max {
            skip.push(n);
        } else if bench::context_chunks(passages, n, n).is_none() {
            let total: usize = passages.iter().map(Vec::len).sum();
            bail!(
                "--corpus {} holds only {total} decoder tokens; --contexts asks for {n}",
                a.corpus.display()
            );
        } else {
            fit.push(n);
        }
    }
    if !skip.is_empty() {
        eprintln!("refrag: skipping --contexts {skip:?}: the decoder holds {max} positions");
    }
    Ok((fit, skip))
}

/// Decoder tokens of the corpus's first passages, up to `n` tokens or the whole corpus.
fn passage_tokens(refrag: &Refrag, corpus: &[String], n: usize) -> Result<Vec<Vec<u32>>> {
    let mut out = Vec::new();
    let mut total = 0;
    for p in corpus {
        if total >= n {
            break;
        }
        let ids = refrag.dtok.encode(p, false)?;
        total += ids.len();
        out.push(ids);
    }
    Ok(out)
}

/// The cells of one context length, in table order.
fn cells(a: &BenchArgs) -> Vec<Cell> {
    let cached: &[bool] = match a.cache {
        CacheArg::Both => &[true, false],
        CacheArg::On => &[true],
        CacheArg::Off => &[false],
    };
    let mut out = Vec::new();
    for &k in &a.ks {
        for &c in cached {
            for &p in &a.p {
                out.push(Cell { k, p, cached: c });
            }
        }
    }
    out
}

/// The context laid out for one `k`: as `generate` sees it without a chunk cache (`plain`) and
/// with one (`cached`, served by `cache`, whose vectors are computed before any clock starts,
/// as an index's chunk cache holds them).
struct KPrep {
    k: usize,
    plain: Prepared,
    cached: Prepared,
    cache: ChunkCache,
}

impl KPrep {
    fn new(
        refrag: &Refrag,
        template: &Template,
        chunks: &[Vec<Vec<u32>>],
        question: &str,
        k: usize,
    ) -> Result<Self> {
        let prepared = |source_ids| Prepared {
            layout: PromptLayout::new(template, chunks),
            source_ids,
            question: question.to_string(),
        };
        let plain = prepared(None);
        let all: Vec<usize> = (0..plain.layout.chunks.len()).collect();
        let vectors = Encode.vectors(refrag, &plain, &all)?;
        let names = (
            refrag.encoder.fingerprint.as_str(),
            refrag.decoder_name.as_str(),
        );
        let cache = ChunkCache::in_memory(names, k, chunks, vectors)?;
        Ok(Self {
            k,
            cached: prepared(Some(all)),
            plain,
            cache,
        })
    }
}

/// Every cell of context length `n`, interleaved with the full-context baseline.
fn bench_context(
    a: &BenchArgs,
    refrag: &Refrag,
    template: &Template,
    passages: &[Vec<u32>],
    n: usize,
    bar: &indicatif::ProgressBar,
) -> Result<Vec<BenchRow>> {
    let cells = cells(a);
    let mut preps = Vec::new(); // one layout per k, and its chunk cache
    for &k in &a.ks {
        let Some(chunks) = bench::context_chunks(passages, n, k) else {
            bail!("--corpus holds fewer than {n} decoder tokens");
        };
        preps.push(KPrep::new(refrag, template, &chunks, &a.question, k)?);
    }
    let prep_of = |k: usize| preps.iter().find(|p| p.k == k).expect("a layout per k");
    let mut full = Vec::new();
    let mut refrag_samples = vec![Vec::new(); cells.len()];
    for rep in 0..a.warmup + a.repeats {
        let f = run_full(refrag, &preps[0].plain, a.max_new)?;
        let mut s = Vec::with_capacity(cells.len());
        for c in &cells {
            let kp = prep_of(c.k);
            let (prep, source): (_, &dyn ChunkSource) = match c.cached {
                true => (&kp.cached, &kp.cache),
                false => (&kp.plain, &Encode),
            };
            s.push(run_refrag(
                refrag,
                prep,
                c.p,
                source,
                a.runtime.seed,
                a.max_new,
            )?);
        }
        if rep >= a.warmup {
            full.push(f);
            for (acc, x) in refrag_samples.iter_mut().zip(s) {
                acc.push(x);
            }
        }
        bar.inc(1);
    }
    let full_layout = &preps[0].plain.layout;
    let cfg = refrag.decoder.config();
    Ok(cells
        .iter()
        .zip(&refrag_samples)
        .map(|(c, s)| {
            let chunks = prep_of(c.k).plain.layout.chunks.len();
            make_row(a, cfg, *c, n, chunks, &full, s, full_layout)
        })
        .collect())
}

/// Medians of the samples of one cell, as a row.
#[allow(clippy::too_many_arguments)]
fn make_row(
    a: &BenchArgs,
    cfg: &crate::decoder::DecoderConfig,
    c: Cell,
    n: usize,
    chunks: usize,
    full: &[Sample],
    s: &[Sample],
    full_layout: &PromptLayout,
) -> BenchRow {
    let med = |xs: &[Sample], f: fn(&Sample) -> f64| median(&xs.iter().map(f).collect::<Vec<_>>());
    let positions_full = full_layout.num_positions(&vec![true; full_layout.chunks.len()]);
    let (ttft_full, ttft_refrag) = (med(full, Sample::ttft), med(s, Sample::ttft));
    let prefill_full = med(full, |x| x.prefill);
    let (tps, tps_full) = (
        med(s, |x| x.tokens_per_sec),
        med(full, |x| x.tokens_per_sec),
    );
    let gflops = bench::prefill_flops(cfg, positions_full) / 1e9 / prefill_full;
    BenchRow {
        k: c.k,
        p: c.p,
        context_tokens: n,
        cached: c.cached,
        chunks,
        expanded: s[0].expanded,
        positions_full,
        positions_refrag: s[0].positions,
        ttft_full_sec: ttft_full,
        ttft_refrag_sec: ttft_refrag,
        speedup: ttft_full / ttft_refrag,
        flop_speedup: bench::prefill_flops(cfg, positions_full)
            / bench::prefill_flops(cfg, s[0].positions),
        selection_sec: med(s, |x| x.selection),
        encoding_sec: med(s, |x| x.encoding),
        projection_sec: med(s, |x| x.projection),
        prefill_refrag_sec: med(s, |x| x.prefill),
        ttit_sec: med(s, |x| x.ttit),
        tokens_per_sec: tps,
        ttit_full_sec: med(full, |x| x.ttit),
        tokens_per_sec_full: tps_full,
        throughput_speedup: tps / tps_full,
        prefill_tok_per_sec_full: positions_full as f64 / prefill_full,
        prefill_gflops_full: gflops,
        peak_fraction_full: gflops / a.peak_gflops.unwrap_or(f64::NAN),
    }
}

/// The full-context baseline: every chunk expanded, prefill and decode, through the pipeline's
/// own generation.
fn run_full(refrag: &Refrag, prep: &Prepared, max_new: usize) -> Result<Sample> {
    let mask = vec![true; prep.layout.chunks.len()];
    decode(refrag, prep, &mask, None, max_new, StageTimes::default())
}

/// REFRAG through the pipeline that `generate` runs: random (seeded) selection, the compressed
/// chunks' vectors from `source` (the in-memory cache of this context, or the encoder),
/// projection, prefill of the mixed input and decoding.
fn run_refrag(
    refrag: &Refrag,
    prep: &Prepared,
    p: f64,
    source: &dyn ChunkSource,
    seed: u64,
    max_new: usize,
) -> Result<Sample> {
    let mut times = StageTimes::default();
    let (mask, embeds) =
        refrag.select_and_embed(prep, SelectMode::Random, p, seed, source, &mut times)?;
    decode(refrag, prep, &mask, embeds.as_ref(), max_new, times)
}

/// Prefill the input of `mask` and decode `max_new` tokens past the first one greedily, EOS or
/// not ([`Refrag::generate_with`]), as a sample.
fn decode(
    refrag: &Refrag,
    prep: &Prepared,
    mask: &[bool],
    embeds: Option<&Tensor>,
    max_new: usize,
    times: StageTimes,
) -> Result<Sample> {
    let opts = Decode {
        max_new: max_new + 1,
        stop_at_eos: false,
    };
    let mut sampler = Sampler::new(0.0, 1.0, 0);
    let g = refrag.generate_with(prep, mask, embeds, opts, &mut sampler, times)?;
    Ok(Sample {
        selection: g.times.selection,
        encoding: g.times.encoding,
        projection: g.times.projection,
        prefill: g.times.prefill,
        ttit: g.ttit,
        tokens_per_sec: g.throughput,
        positions: g.positions,
        expanded: mask.iter().filter(|&&e| e).count(),
    })
}

fn meta_json(
    a: &BenchArgs,
    refrag: &Refrag,
    dec: &str,
    dev: &Device,
    skipped: &[usize],
    peak_measured: bool,
) -> serde_json::Value {
    let cfg = refrag.decoder.config();
    json!({
        "decoder": dec, "encoder": refrag.encoder.model_name(),
        "projector_trained": refrag.encoder.trained, "device": device::describe(dev),
        "corpus": a.corpus, "question": a.question, "warmup": a.warmup, "repeats": a.repeats,
        "max_new": a.max_new, "seed": a.runtime.seed, "selection": "random (seeded)",
        "contexts_skipped": skipped, "peak_gflops": a.peak_gflops,
        "peak_gflops_source": if peak_measured { "measured: best of 5 1536^3 sgemm" } else { "--peak_gflops" },
        "decoder_gflop_per_token": bench::token_flops(cfg) / 1e9,
        "flops": "linear maps of every position + causal attention 2*heads*head_dim*t*(t+1) per layer + LM head once",
        "ttft_refrag": "selection + encoding (0 when cached) + projection + prefill",
        "ttft_full": "prefill of the full-context input (p = 1)",
        "threads": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "openblas_core": crate::kernels::blas::core::corename(),
    })
}
