//! The REFRAG inference pipeline after retrieval: lay the passages out in chunks, select the
//! chunks to expand, encode and project only the chunks that stay compressed, prefill the decoder
//! with the mixed input, and decode with a KV cache. Every stage is timed after a device sync.

use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use serde::Serialize;

use crate::compression::encoder::ChunkEncoder;
use crate::compression::prompt::{cap_chunks, PromptLayout, Template};
use crate::decoder::sample::Sampler;
use crate::decoder::{Decoder, DecoderTokenizer, Logits};
use crate::io::checkpoint::{self, RefragConfig};
use crate::select;
pub use crate::select::heuristic::{chunk_scores, chunk_scores_batch};
pub use source::{cache_or_encode, ChunkSource, Encode, PassageChunks};

mod source;
use crate::select::policy::{Policy, PolicyConfig};
use crate::select::SelectMode;

/// The scores a [`select::Selector`] asks for, computed on demand for one prepared question:
/// the heuristic's from the chunk source (a chunk cache holds them) or the decoder, the policy's
/// over the projected embeddings of every chunk, which are kept so that the chunks left
/// compressed are not embedded twice.
struct Scores<'a> {
    refrag: &'a Refrag,
    prep: &'a Prepared,
    source: &'a dyn ChunkSource,
    times: &'a mut StageTimes,
    embeds: Option<Tensor>,
}

impl select::ChunkScores for Scores<'_> {
    fn chunks(&self) -> usize {
        self.prep.layout.chunks.len()
    }

    fn heuristic(&mut self) -> Result<Vec<f32>> {
        let t = Instant::now();
        let s = match self.source.scores(self.prep) {
            Some(s) => s,
            None => self.refrag.layout_scores(&self.prep.layout)?,
        };
        crate::device::sync(&self.refrag.device)?;
        self.times.selection += t.elapsed().as_secs_f64();
        Ok(s)
    }

    fn policy(&mut self) -> Result<Vec<f32>> {
        let r = self.refrag;
        let Some(policy) = &r.policy else {
            bail!("--select policy needs a trained policy in --load_dir (train_policy writes one)");
        };
        let all: Vec<usize> = (0..self.chunks()).collect();
        let e = r.timed_embed(self.prep, &all, self.source, self.times)?;
        let t = Instant::now();
        let q = r.question_vector(&self.prep.question)?;
        let pos = r.policy_features(self.prep)?;
        let s: Vec<f32> = policy
            .scores(&e, &q, &pos)?
            .to_dtype(DType::F32)?
            .to_vec1()?;
        self.times.selection += t.elapsed().as_secs_f64();
        self.embeds = Some(e);
        Ok(s)
    }
}

/// Seconds spent in each stage before the first token.
#[derive(Debug, Clone, Default, Serialize)]
pub struct StageTimes {
    pub retrieval: f64,
    pub tokenize: f64,
    pub encoding: f64,
    pub projection: f64,
    pub selection: f64,
    pub prefill: f64,
}

impl StageTimes {
    /// Time to first token: the sum of the stages.
    pub fn ttft(&self) -> f64 {
        self.retrieval
            + self.tokenize
            + self.encoding
            + self.projection
            + self.selection
            + self.prefill
    }
}

/// A retrieved passage: its id in the index and its text.
#[derive(Debug, Clone)]
pub struct Passage {
    pub id: usize,
    pub text: String,
}

impl From<&crate::retrieval::search::Hit> for Passage {
    fn from(h: &crate::retrieval::search::Hit) -> Self {
        Self {
            id: h.id,
            text: h.text.clone(),
        }
    }
}

/// Models of the pipeline.
pub struct Refrag {
    pub decoder: Decoder,
    pub dtok: DecoderTokenizer,
    pub decoder_name: String,
    pub encoder: ChunkEncoder,
    pub policy: Option<Policy>,
    pub device: Device,
}

/// A question laid out over its passages.
pub struct Prepared {
    pub layout: PromptLayout,
    /// Each layout chunk's id in the [`ChunkSource`] that prepared it, when that source keeps
    /// ids (the chunk cache: global chunk ids).
    pub source_ids: Option<Vec<usize>>,
    /// Question vector for the policy: mean of the decoder's embeddings of its tokens.
    pub question: String,
}

/// How far to decode.
#[derive(Debug, Clone, Copy)]
pub struct Decode {
    /// Most tokens generated, the first (from the prefill) included.
    pub max_new: usize,
    /// Stop at the end-of-sequence token (else decode `max_new` tokens whatever they are).
    pub stop_at_eos: bool,
}

/// The result of one generation.
#[derive(Debug, Clone, Serialize)]
pub struct Generated {
    pub answer: String,
    pub tokens: Vec<u32>,
    pub times: StageTimes,
    /// Mean seconds per decoding forward pass (each after the prefill), 0 when there was none.
    pub ttit: f64,
    /// Decoding forward passes per second.
    pub throughput: f64,
    /// Decoding forward passes after the prefill: one per token after the first, plus the one
    /// that produced the end-of-sequence token when decoding stopped there.
    pub decode_forwards: usize,
    pub positions: usize,
    pub positions_full: usize,
}

impl Refrag {
    /// Load the decoder, the chunk encoder + projector, and the policy when `load_dir` has one.
    pub fn load(
        enc: Option<&str>,
        dec: &str,
        load_dir: Option<&Path>,
        seed: u64,
        device: &Device,
    ) -> Result<Self> {
        Self::load_with(enc, dec, load_dir, seed, device, false)
    }

    /// [`Refrag::load`], with the decoder's GGUF matrices kept quantized when `quantized`
    /// (`--quantized`; not for a decoder that was fine-tuned, whose weights are f32).
    pub fn load_with(
        enc: Option<&str>,
        dec: &str,
        load_dir: Option<&Path>,
        seed: u64,
        device: &Device,
        quantized: bool,
    ) -> Result<Self> {
        let cfg = load_dir.map(RefragConfig::read).transpose()?;
        if let Some(c) = &cfg {
            if crate::io::weights::model_key(&c.decoder_model) != crate::io::weights::model_key(dec)
            {
                bail!("--dec {dec} differs from the decoder the weights in --load_dir were trained with ({})", c.decoder_model);
            }
        }
        let files = crate::hub::resolve(dec)?;
        let dtype = crate::device::compute_dtype(device);
        let (mut decoder, dtok) = match (load_dir, &cfg) {
            (Some(dir), Some(c)) if c.has("decoder") => {
                if quantized {
                    bail!(
                        "--quantized: the decoder in {} was fine-tuned and is stored in f32; \
                         run without --quantized",
                        dir.display()
                    );
                }
                load_trained_decoder(&files, dir, device, dtype)?
            }
            _ if quantized => Decoder::load_quantized(&files, device)?,
            _ => {
                let (mut d, t) = Decoder::load(&files, device, dtype)?;
                crate::decoder::enable_fast_decode(&files, &mut d)?;
                (d, t)
            }
        };
        if let (Some(dir), Some(c)) = (load_dir, &cfg) {
            apply_lora(&mut decoder, dir, c, device)?;
        }
        let encoder = ChunkEncoder::load(enc, load_dir, &decoder, seed, device)?;
        let policy = match (load_dir, &cfg) {
            (Some(dir), Some(c)) if c.has("policy") => Some(load_policy(dir, c, &decoder, device)?),
            _ => None,
        };
        Ok(Self {
            decoder,
            dtok,
            decoder_name: dec.to_string(),
            encoder,
            policy,
            device: device.clone(),
        })
    }

    /// Tokenize the template and the passages (chunks from `source`) and cap the context at
    /// `ctx_max` tokens.
    pub fn prepare(
        &self,
        question: &str,
        passages: &[Passage],
        source: &dyn ChunkSource,
        k: usize,
        ctx_max: usize,
    ) -> Result<Prepared> {
        let mut per_passage = Vec::new();
        let mut ids = Vec::new();
        for p in passages {
            let chunks = source.passage_chunks(self, p, k)?;
            per_passage.push(chunks.tokens);
            ids.push(chunks.ids);
        }
        let (layout, capped) = question_layout(&self.dtok, question, &per_passage, ctx_max)?;
        // Ids of the chunks kept, when the source gave every passage's.
        let source_ids = ids
            .into_iter()
            .zip(&capped)
            .map(|(g, kept)| g.map(|g| g[..kept.len()].to_vec()))
            .collect::<Option<Vec<_>>>()
            .map(|v| v.concat());
        Ok(Prepared {
            layout,
            source_ids,
            question: question.to_string(),
        })
    }

    /// Choose the chunks to expand with `mode`'s [`select::Selector`], and return with the mask
    /// the projected embeddings `(L, d)` of the chunks that need one (the prefill reads only the
    /// compressed chunks' rows: the others are zero, or the policy's embeddings). Times
    /// encoding, projection and selection (the scores the selector asks for) into `times`.
    pub fn select_and_embed(
        &self,
        prep: &Prepared,
        mode: SelectMode,
        p: f64,
        seed: u64,
        source: &dyn ChunkSource,
        times: &mut StageTimes,
    ) -> Result<(Vec<bool>, Option<Tensor>)> {
        let l = prep.layout.chunks.len();
        let mut scores = Scores {
            refrag: self,
            prep,
            source,
            times,
            embeds: None,
        };
        let mask = mode.selector().mask(&mut scores, p, seed)?;
        if mask.len() != l {
            bail!(
                "{mode:?} selection gave {} flags for {l} chunks",
                mask.len()
            );
        }
        let Scores {
            times, mut embeds, ..
        } = scores;
        let compressed: Vec<usize> = (0..l).filter(|&i| !mask[i]).collect();
        if embeds.is_none() && !compressed.is_empty() {
            let e = self.timed_embed(prep, &compressed, source, times)?;
            // Scatter the compressed rows into an (L, d) table; expanded rows stay zero.
            let d = e.dim(1)?;
            let mut rows = vec![0u32; l];
            for (r, &i) in compressed.iter().enumerate() {
                rows[i] = r as u32 + 1;
            }
            let table = Tensor::cat(&[&Tensor::zeros((1, d), e.dtype(), e.device())?, &e], 0)?;
            embeds = Some(table.index_select(&Tensor::new(rows, &self.device)?, 0)?);
        }
        Ok((mask, embeds))
    }

    /// Encode (timed as encoding) and project (timed as projection) the chunks `which`.
    fn timed_embed(
        &self,
        prep: &Prepared,
        which: &[usize],
        source: &dyn ChunkSource,
        times: &mut StageTimes,
    ) -> Result<Tensor> {
        let t = Instant::now();
        let v = source.vectors(self, prep, which)?;
        crate::device::sync(&self.device)?;
        times.encoding += t.elapsed().as_secs_f64();
        let t = Instant::now();
        let e = self.encoder.project(&v)?;
        crate::device::sync(&self.device)?;
        times.projection += t.elapsed().as_secs_f64();
        Ok(e)
    }

    /// Heuristic scores of every chunk of a layout, computed with the decoder passage by passage.
    pub fn layout_scores(&self, layout: &PromptLayout) -> Result<Vec<f32>> {
        let mut out = Vec::with_capacity(layout.chunks.len());
        let mut start = 0;
        while start < layout.chunks.len() {
            let p = layout.chunks[start].passage;
            let end = (start..layout.chunks.len())
                .find(|&i| layout.chunks[i].passage != p)
                .unwrap_or(layout.chunks.len());
            let chunks: Vec<Vec<u32>> = layout.chunks[start..end]
                .iter()
                .map(|c| c.tokens.clone())
                .collect();
            out.extend(chunk_scores(&self.decoder, &self.dtok, &chunks)?);
            start = end;
        }
        Ok(out)
    }

    /// The policy's per-chunk features of a prepared question
    /// ([`crate::select::policy::position_features`]).
    pub fn policy_features(&self, prep: &Prepared) -> Result<Tensor> {
        let q = self.question_content_ids(&prep.question)?;
        Ok(crate::select::policy::position_features(
            &prep.layout,
            &q,
            &self.device,
        )?)
    }

    /// The question's content tokens: decoder token ids whose text has at least four letters
    /// or digits, or is a number (function words and punctuation left out).
    pub fn question_content_ids(&self, question: &str) -> Result<Vec<u32>> {
        let ids = self.dtok.encode(question, false)?;
        let mut out = Vec::new();
        for id in ids {
            let text = self.dtok.decode(&[id])?;
            let alnum = text.chars().filter(|c| c.is_alphanumeric()).count();
            let number = alnum > 0 && text.trim().chars().all(|c| c.is_ascii_digit());
            if (alnum >= 4 || number) && !out.contains(&id) {
                out.push(id);
            }
        }
        Ok(out)
    }

    /// Mean decoder embedding of the question's tokens, `(d,)`.
    pub fn question_vector(&self, question: &str) -> Result<Tensor> {
        let ids = self.dtok.encode(question, false)?;
        let ids = Tensor::new(ids, &self.device)?.unsqueeze(0)?;
        Ok(self
            .decoder
            .embed(&ids)?
            .squeeze(0)?
            .to_dtype(DType::F32)?
            .mean(0)?)
    }

    /// Prefill with the mixed input and decode up to `max_new` tokens, stopping at EOS.
    pub fn generate(
        &self,
        prep: &Prepared,
        mask: &[bool],
        embeds: Option<&Tensor>,
        max_new: usize,
        sampler: &mut Sampler,
        times: StageTimes,
    ) -> Result<Generated> {
        let opts = Decode {
            max_new,
            stop_at_eos: true,
        };
        self.generate_with(prep, mask, embeds, opts, sampler, times)
    }

    /// Prefill with the mixed input and decode up to `opts.max_new` tokens (`bench` decodes
    /// past EOS so every run times the same number of forward passes).
    pub fn generate_with(
        &self,
        prep: &Prepared,
        mask: &[bool],
        embeds: Option<&Tensor>,
        opts: Decode,
        sampler: &mut Sampler,
        mut times: StageTimes,
    ) -> Result<Generated> {
        let max_new = opts.max_new;
        let t = Instant::now();
        let x = prep
            .layout
            .assemble(
                |ids| Ok(self.decoder.embed(ids)?),
                embeds,
                mask,
                &self.device,
            )?
            // Inference: the trainable projector's output must not drag the decoder onto its
            // differentiable (slow, graph-building) path.
            .detach();
        let positions = x.dim(1)?;
        let mut kv = self.decoder.new_cache(positions + max_new + 1);
        let want = if sampler.is_greedy() {
            Logits::Greedy
        } else {
            Logits::Last
        };
        let logits = self.decoder.forward_embeds(&x, Some(&mut kv), want)?;
        let mut tok = sampler.sample(&logits)?;
        times.prefill += t.elapsed().as_secs_f64();
        let mut tokens = Vec::new();
        let mut forwards = 0usize;
        let t = Instant::now();
        // The whole loop runs on a worker of the thread pool that splits each step's products
        // and attention: the parallel parts then run as joins from inside the pool, where a
        // caller outside it would sleep and be woken for every product (hundreds a token).
        rayon::scope(|_| -> Result<()> {
            while !(opts.stop_at_eos && self.dtok.is_eos(tok)) && tokens.len() < max_new {
                tokens.push(tok);
                if tokens.len() == max_new {
                    break;
                }
                let ids = Tensor::new(&[[tok]], &self.device)?;
                let logits = self.decoder.forward_ids(&ids, Some(&mut kv), want)?;
                forwards += 1;
                tok = sampler.sample(&logits)?;
            }
            Ok(())
        })?;
        let decode = t.elapsed().as_secs_f64();
        // Time per forward pass actually run: when decoding stops at EOS, the pass that
        // produced it counts too (dividing by tokens - 1 overstated TTIT for short answers).
        let per = forwards.max(1) as f64;
        Ok(Generated {
            answer: self.dtok.decode(&tokens)?.trim().to_string(),
            tokens,
            times,
            ttit: if forwards > 0 { decode / per } else { 0.0 },
            throughput: if decode > 0.0 && forwards > 0 {
                forwards as f64 / decode
            } else {
                0.0
            },
            decode_forwards: forwards,
            positions,
            positions_full: prep.layout.num_positions(&vec![true; mask.len()]),
        })
    }
}

/// The trained decoder of a weights directory: `decoder.safetensors` (every weight, HF names)
/// with `decoder_config.json`, the tokenizer from the base model `files`.
fn load_trained_decoder(
    files: &crate::hub::ModelFiles,
    dir: &Path,
    device: &Device,
    dtype: DType,
) -> Result<(Decoder, DecoderTokenizer)> {
    crate::decoder::load_trained(
        files,
        &dir.join("decoder_config.json"),
        &checkpoint::part_path(dir, "decoder"),
        device,
        dtype,
    )
}

/// Merge the LoRA adapter of a weights directory into the decoder (beside its matrices when
/// they stay quantized), when the directory has one.
pub fn apply_lora(
    decoder: &mut Decoder,
    dir: &Path,
    cfg: &RefragConfig,
    device: &Device,
) -> Result<()> {
    if !cfg.has("decoder_lora") {
        return Ok(());
    }
    let Some(lora) = &cfg.lora else {
        bail!(
            "{}: config.json lists decoder_lora but not its shape (\"lora\")",
            dir.join("config.json").display()
        );
    };
    let path = checkpoint::part_path(dir, "decoder_lora");
    let vars = crate::decoder::lora::load_vars(&path, device)?;
    let expected = vars.all_vars().len();
    decoder
        .add_lora(lora, &vars, false)
        .with_context(|| format!("applying {}", path.display()))?;
    let needed = 2 * lora.targets.len() * decoder.config().num_hidden_layers;
    if vars.all_vars().len() != expected || expected != needed {
        bail!(
            "{}: {expected} LoRA tensors, this decoder needs {needed} (checkpoint from another model?)",
            path.display()
        );
    }
    Ok(())
}

fn load_policy(
    dir: &Path,
    cfg: &RefragConfig,
    decoder: &Decoder,
    device: &Device,
) -> Result<Policy> {
    let pc = PolicyConfig {
        d: decoder.hidden_size(),
        hidden: cfg.policy_hidden.unwrap_or(256),
    };
    let vars = VarMap::new();
    let vb = VarBuilder::from_varmap(&vars, DType::F32, device);
    let policy = Policy::new(&pc, vb)?;
    checkpoint::load_varmap_strict(&vars, &checkpoint::part_path(dir, "policy"), device)?;
    Ok(policy)
}

/// The prompt of `question` over passages already cut into chunks (`per_passage`): the
/// decoder's chat template around the chunks that fit in `ctx_max` tokens. Returns the layout
/// and the chunks kept of each passage. The one layout `generate`, `eval`, `bench` and the
/// QA training stages (`train::qa::qa_layout`) build.
pub fn question_layout(
    dtok: &DecoderTokenizer,
    question: &str,
    per_passage: &[Vec<Vec<u32>>],
    ctx_max: usize,
) -> Result<(PromptLayout, Vec<Vec<Vec<u32>>>)> {
    let (before, after) = dtok.chat_parts(None);
    let template = Template::new(&before, &after, question, |t| dtok.encode(t, false))?;
    let capped = cap_chunks(per_passage, ctx_max);
    Ok((PromptLayout::new(&template, &capped), capped))
}
