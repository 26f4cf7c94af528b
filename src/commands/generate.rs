//! `refrag generate`: retrieve, chunk, compress, select, expand, prefill, decode; print one JSON
//! object with the answer, its sources (each retrieved passage's rank, id, score, source file or
//! id with title and character span, and which of its chunks were expanded), the time to first token split by stage, and the compression achieved.
//! With `--questions FILE`, the models load once and each question gets one compact line
//! ([`super::questions`]).

use std::time::Instant;

use anyhow::{bail, Result};
use serde_json::{json, Value};

use crate::cli::{
    AnswerArgs, CompressArgs, EmbedModelArg, EncDecArgs, GenerateArgs, RetrievalMode, RetrieveArgs,
    RuntimeArgs, SelectMode,
};
use crate::compression::chunk_cache::ChunkCache;
use crate::compression::prompt::PromptLayout;
use crate::decoder::sample::Sampler;
use crate::decoder::DecoderTokenizer;
use crate::io::weights::decoder_arg;
use crate::pipeline::{cache_or_encode, Passage, Refrag, StageTimes};
use crate::retrieval::index::PassageSource;
use crate::retrieval::search::{Hit, Retriever};
use crate::{device, limits, select};
use candle_core::Device;

use super::questions;

/// `c` with `--load_dir` resolved: as given, else the shipped weights when they were trained
/// for these models (unless `--no_weights`).
pub fn with_weights(c: &CompressArgs, models: &EncDecArgs) -> Result<CompressArgs> {
    let load_dir = crate::io::weights::resolve_load_dir(
        c.load_dir.as_deref(),
        c.no_weights,
        models.enc.as_deref(),
        models.dec.as_deref(),
    )?;
    Ok(CompressArgs {
        load_dir,
        ..c.clone()
    })
}

/// The decoder's tokenizer and window, for the limits checked before any model loads.
pub fn decoder_limits(models: &EncDecArgs, c: &CompressArgs) -> Result<(DecoderTokenizer, usize)> {
    let load_dir = c.load_dir.as_deref();
    limits::decoder_window(&decoder_arg(models.dec.as_deref(), load_dir)?, load_dir)
}

/// The index's chunk cache when it was built for this encoder, decoder and k; else `None`, with
/// the reason on stderr.
pub fn usable_cache(
    refrag: &Refrag,
    dir: &std::path::Path,
    k: usize,
) -> Result<Option<ChunkCache>> {
    let Some(cache) = ChunkCache::load(dir)? else {
        eprintln!("refrag: {} has no chunk cache; encoding chunks on the fly (index with --enc/--dec/--k to cache them)", dir.display());
        return Ok(None);
    };
    match cache.mismatch(&refrag.encoder.fingerprint, &refrag.decoder_name, k) {
        None => Ok(Some(cache)),
        Some(why) => {
            eprintln!(
                "refrag: the chunk cache in {} was {why}; encoding chunks on the fly",
                dir.display()
            );
            Ok(None)
        }
    }
}

/// What `generate` and `eval` both start from: the device, the index (its embedder loaded before
/// any clock starts), the decoder argument, the models, and the chunk cache when it fits.
pub fn open_pipeline(
    r: &RetrieveArgs,
    embed: &EmbedModelArg,
    models: &EncDecArgs,
    c: &CompressArgs,
    runtime: &RuntimeArgs,
) -> Result<(Device, Retriever, String, Refrag, Option<ChunkCache>)> {
    let load_dir = c.load_dir.as_deref();
    let dev = device::select(runtime.device)?;
    let retriever = Retriever::open(&r.index_dir, embed.embed_model.as_deref(), &dev)?;
    if r.retrieval != RetrievalMode::Lexical {
        retriever.embedder()?; // load before the clock starts
    }
    let dec = decoder_arg(models.dec.as_deref(), load_dir)?;
    let refrag = Refrag::load_with(
        models.enc.as_deref(),
        &dec,
        load_dir,
        runtime.seed,
        &dev,
        c.quantized,
    )?;
    let cache = usable_cache(&refrag, &r.index_dir, c.k)?;
    Ok((dev, retriever, dec, refrag, cache))
}

/// One question non-empty and within the decoder's window; `what` names it in the error.
pub(crate) fn check_one(
    a: &AnswerArgs,
    c: &CompressArgs,
    (dtok, window): &(DecoderTokenizer, usize),
    question: &str,
    what: &str,
) -> Result<()> {
    limits::check_question(question, what)?;
    limits::Budget::new(dtok, question, a.retrieve.topk, c.ctx_max, a.max_new)?.check(*window, what)
}

/// Each retrieved passage as a source of the answer: its rank, index id and score (and its
/// ranks in the dense and BM25 lists when it is in them), and what became of its chunks: how
/// many reached the decoder (0 when `--ctx_max` cut the passage off), which of them (0-based
/// within the passage) were expanded and how many stayed compressed, and `chunk_range`, the
/// indices `[start, end)` of its chunks in `meta.expand_mask`; and, from `origins`, its `source`,
/// `title` and character `span` in the source (absent for an index built before documents). The
/// layout keeps the passages in retrieval order, each one's chunks contiguous.
pub fn sources(
    hits: &[Hit],
    origins: &[Option<&PassageSource>],
    layout: &PromptLayout,
    mask: &[bool],
) -> Vec<Value> {
    let mut at = 0;
    hits.iter()
        .enumerate()
        .map(|(p, h)| {
            let start = at;
            while at < layout.chunks.len() && layout.chunks[at].passage == p {
                at += 1;
            }
            let expanded: Vec<usize> = (start..at)
                .filter(|&i| mask[i])
                .map(|i| i - start)
                .collect();
            let mut s = json!({
                "rank": p + 1,
                "id": h.id,
                "score": f32_json(h.score),
                "chunks": at - start,
                "expanded": expanded.len(),
                "compressed": at - start - expanded.len(),
                "expanded_chunks": expanded,
                "chunk_range": [start, at],
            });
            if let Some(r) = h.dense_rank {
                s["dense_rank"] = r.into();
            }
            if let Some(r) = h.lexical_rank {
                s["lexical_rank"] = r.into();
            }
            if let Some(Some(o)) = origins.get(p) {
                s["source"] = o.source.clone().into();
                if let Some(t) = &o.title {
                    s["title"] = t.clone().into();
                }
                s["span"] = json!(o.span);
            }
            s
        })
        .collect()
}

/// An `f32` as the JSON number it prints as (`search` writes `0.03`, not `0.029999999329447746`).
fn f32_json(x: f32) -> Value {
    x.to_string()
        .parse::<f64>()
        .ok()
        .and_then(serde_json::Number::from_f64)
        .map_or(Value::Null, Value::Number)
}

/// The models, index and settings `generate` loads once, for one question or many.
pub(crate) struct Session<'a> {
    a: &'a AnswerArgs,
    c: &'a CompressArgs,
    dev: Device,
    retriever: Retriever,
    dec: String,
    refrag: Refrag,
    cache: Option<ChunkCache>,
    mode: SelectMode,
}

impl<'a> Session<'a> {
    pub(crate) fn open(a: &'a AnswerArgs, c: &'a CompressArgs) -> Result<Self> {
        let (dev, retriever, dec, refrag, cache) =
            open_pipeline(&a.retrieve, &a.embed, &a.models, c, &a.runtime)?;
        let mode = select::resolve_mode(c.select, c.heuristic, refrag.policy.is_some());
        Ok(Self {
            a,
            c,
            dev,
            retriever,
            dec,
            refrag,
            cache,
            mode,
        })
    }

    /// Answer one question: the JSON object `generate` prints. The sampler and the random
    /// selection start from `--seed` for every question, so an answer does not depend on the
    /// questions before it.
    pub(crate) fn answer(&self, question: &str) -> Result<Value> {
        let (a, c, refrag, cache) = (self.a, self.c, &self.refrag, self.cache.as_ref());
        let source = cache_or_encode(cache);
        let mut times = StageTimes::default();
        let t = Instant::now();
        let hits = self
            .retriever
            .retrieve(question, a.retrieve.topk, a.retrieve.retrieval)?;
        times.retrieval = t.elapsed().as_secs_f64();
        let origins: Vec<_> = hits.iter().map(|h| self.retriever.source(h.id)).collect();
        let passages: Vec<Passage> = hits.iter().map(Passage::from).collect();
        let t = Instant::now();
        let prep = refrag.prepare(question, &passages, source, c.k, c.ctx_max)?;
        times.tokenize = t.elapsed().as_secs_f64();
        let (mask, embeds) =
            refrag.select_and_embed(&prep, self.mode, c.p, a.runtime.seed, source, &mut times)?;
        let mut sampler = Sampler::new(a.temperature, a.top_p, a.runtime.seed);
        let g = refrag.generate(
            &prep,
            &mask,
            embeds.as_ref(),
            a.max_new,
            &mut sampler,
            times,
        )?;
        Ok(json!({
            "question": question,
            "passages": hits.iter().map(|h| &h.text).collect::<Vec<_>>(),
            "sources": sources(&hits, &origins, &prep.layout, &mask),
            "answer": g.answer,
            "TTFT_sec": g.times.ttft(),
            "TTIT_avg_sec": g.ttit,
            "throughput_tok_per_sec": g.throughput,
            "answer_tokens": g.tokens.len(),
            "decode_forwards": g.decode_forwards,
            "ttft_breakdown_sec": g.times,
            "positions": g.positions,
            "positions_full": g.positions_full,
            "compression": g.positions_full as f64 / g.positions.max(1) as f64,
            "device": device::describe(&self.dev),
            "meta": {
                "expand_mask": mask,
                "select": self.mode,
                "k": c.k,
                "p": c.p,
                "chunks": mask.len(),
                "expanded": mask.iter().filter(|&&m| m).count(),
                "chunk_cache": cache.is_some(),
                "projector_trained": refrag.encoder.trained,
                "retrieval": a.retrieve.retrieval,
                "passage_ids": hits.iter().map(|h| h.id).collect::<Vec<_>>(),
                "generated_tokens": g.tokens.len(),
                "decoder": self.dec,
                "encoder": refrag.encoder.model_name(),
            },
        }))
    }
}

pub fn run(args: &GenerateArgs) -> Result<()> {
    let a = &args.answer;
    if args.out.is_some() && args.questions.is_none() {
        bail!("--out writes the answers of --questions FILE; without it the answer goes to stdout");
    }
    // The questions are read (and a bad line refused) before any model's file is touched.
    let batch = match (&args.question, &args.questions) {
        (Some(q), _) => {
            limits::check_question(q, "--question")?;
            None
        }
        (None, Some(path)) => Some((path, questions::read(path)?)),
        (None, None) => bail!("give --question or --questions"),
    };
    let c = &with_weights(&a.compress, &a.models)?;
    let limits = decoder_limits(&a.models, c)?;
    match batch {
        None => {
            let q = args.question.as_deref().unwrap_or_default();
            check_one(a, c, &limits, q, "--question")?;
            let out = Session::open(a, c)?.answer(q)?;
            println!("{}", serde_json::to_string_pretty(&out)?);
        }
        Some((path, qs)) => {
            for q in &qs {
                check_one(a, c, &limits, &q.text, &questions::what(path, q))?;
            }
            let mut sink = questions::Sink::create(args.out.as_deref())?;
            let session = Session::open(a, c)?;
            questions::answer_all(&qs, path, &mut sink, a.runtime.quiet, "generate", |q| {
                session.answer(q)
            })?;
            sink.finish()?;
        }
    }
    Ok(())
}
