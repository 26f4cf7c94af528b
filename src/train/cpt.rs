//! Continual pretraining of the encoder and projector (and, in CPT-B, the decoder).
//!
//! - CPT-A, reconstruction (`cpt_recon`): `n` chunks of `k` tokens are compressed and the frozen
//!   decoder reconstructs their `n * k` tokens, teacher-forced; `n` follows the curriculum (one
//!   draw per step, from mostly one chunk towards many).
//! - CPT-B, next paragraph (`cpt_next`): the first `s` tokens of an item are compressed, a
//!   random `expand_frac` of their chunks expanded, and the next `o` tokens predicted; with
//!   `distill`, also matched to the decoder's own distributions with the whole context expanded.
//!
//! Held-out items are the last `eval_items` of the file: reconstruction token accuracy and
//! perplexity (CPT-A), next-paragraph perplexity compressed / partly expanded / full context / no
//! context (CPT-B).

use std::path::Path;

use anyhow::{bail, Result};
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};

use super::encoder::TrainEncoder;
use super::optim::Group;
use super::parts::{enc_dec_checkpoint, enc_dec_groups, Checkpoint, TrainDecoder};
use super::run::{Drawn, Micro, Task};
use super::schedule::Curriculum;
use super::seq::{
    forward_trained, forward_trained_distilled, perplexity, score_trained, Seq, SeqOut,
};
use crate::decoder::DecoderTokenizer;
use crate::io::schema::{CptItem, Split};
use crate::select::{num_expand, random_n};

/// Reconstruction windows evaluated per held-out item.
pub const EVAL_WINDOWS: usize = 4;

/// CPT items as decoder tokens, with their context / continuation split and a held-out split.
pub struct CptData {
    pub tokens: Vec<Vec<u32>>,
    /// Context tokens `s` of each item (within its token count).
    pub s: Vec<usize>,
    /// Continuation tokens `o` of each item (0 when the text holds no more).
    pub o: Vec<usize>,
    pub train: Vec<usize>,
    pub eval: Vec<usize>,
}

impl CptData {
    /// Read `path`, tokenize, clip splits to what each text holds (and to `s_cap` / `o_cap`),
    /// and hold out the last `eval_items` items. A `.jsonl` / `.json` file is the seed's
    /// `cpt_train.jsonl` (`tokens` + `split`); anything else is plain text, one paragraph per
    /// line (blank lines skipped), split into context and continuation by [`text_split`].
    pub fn load(
        path: &Path,
        dtok: &DecoderTokenizer,
        eval_items: usize,
        s_cap: Option<usize>,
        o_cap: Option<usize>,
    ) -> Result<Self> {
        let items = read_items(path, dtok, s_cap, o_cap)?;
        Self::from_tokenized(items, eval_items, s_cap, o_cap)
    }

    /// Train on every item of `train`, hold out the first `eval_items` items of `eval` (a file
    /// of the same kinds, such as whole articles no training step sees). Errors name the file
    /// and its flag (`--train_json` / `--eval_json`).
    pub fn load_with_eval(
        train: &Path,
        eval: &Path,
        dtok: &DecoderTokenizer,
        eval_items: usize,
        s_cap: Option<usize>,
        o_cap: Option<usize>,
    ) -> Result<Self> {
        let named = |flag: &str, p: &Path, e: anyhow::Error| {
            anyhow::anyhow!("{flag} {}: {e:#}", p.display())
        };
        let mut items =
            read_items(train, dtok, s_cap, o_cap).map_err(|e| named("--train_json", train, e))?;
        let n_train = items.len();
        let held =
            read_items(eval, dtok, s_cap, o_cap).map_err(|e| named("--eval_json", eval, e))?;
        let n_eval = eval_items.min(held.len());
        items.extend(held.into_iter().take(n_eval));
        let mut d = Self::from_tokenized(items, n_eval, s_cap, o_cap)?;
        d.train.truncate(n_train);
        Ok(d)
    }

    /// Tokenize `items` and build the data set ([`CptData::from_tokenized`]).
    pub fn from_items(
        items: &[CptItem],
        dtok: &DecoderTokenizer,
        eval_items: usize,
        s_cap: Option<usize>,
        o_cap: Option<usize>,
    ) -> Result<Self> {
        let tokenized = items
            .iter()
            .map(|it| Ok((dtok.encode(&it.tokens, false)?, it.split)))
            .collect::<Result<Vec<_>>>()?;
        Self::from_tokenized(tokenized, eval_items, s_cap, o_cap)
    }

    /// Items as decoder tokens with their splits, clipped to what each holds (and to `s_cap` /
    /// `o_cap`); the last `eval_items` held out.
    fn from_tokenized(
        items: Vec<(Vec<u32>, Split)>,
        eval_items: usize,
        s_cap: Option<usize>,
        o_cap: Option<usize>,
    ) -> Result<Self> {
        let mut d = Self {
            tokens: Vec::new(),
            s: Vec::new(),
            o: Vec::new(),
            train: Vec::new(),
            eval: Vec::new(),
        };
        for (t, split) in items {
            let s = split.s.min(s_cap.unwrap_or(usize::MAX)).min(t.len());
            let o = split.o.min(o_cap.unwrap_or(usize::MAX)).min(t.len() - s);
            d.tokens.push(t);
            d.s.push(s);
            d.o.push(o);
        }
        let n = d.tokens.len();
        if eval_items >= n {
            bail!("--eval_items {eval_items} leaves no training item of {n}");
        }
        d.train = (0..n - eval_items).collect();
        d.eval = (n - eval_items..n).collect();
        Ok(d)
    }
}

/// Whether a training file is JSONL (by its extension) rather than plain text.
pub fn is_jsonl(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("jsonl" | "json")
    )
}

/// Default context tokens of a plain-text paragraph (cpt_next), when `--s` is not given.
pub const TEXT_S: usize = 128;
/// Default continuation tokens of a plain-text paragraph, when `--o` is not given.
pub const TEXT_O: usize = 64;

/// Paragraphs shorter than this many decoder tokens are skipped (headings, stray lines).
pub const MIN_TEXT_TOKENS: usize = 8;

/// The context / continuation split of a paragraph of `n` decoder tokens: the first
/// `min(s_cap, n / 2)` tokens are context, then up to `o_cap` continuation tokens, so a short
/// paragraph still has both halves.
pub fn text_split(n: usize, s_cap: Option<usize>, o_cap: Option<usize>) -> (usize, usize) {
    let s = s_cap.unwrap_or(TEXT_S).min(n / 2);
    let o = o_cap.unwrap_or(TEXT_O).min(n - s);
    (s, o)
}

/// The items of a JSONL or plain-text file, tokenized once, with their splits.
fn read_items(
    path: &Path,
    dtok: &DecoderTokenizer,
    s_cap: Option<usize>,
    o_cap: Option<usize>,
) -> Result<Vec<(Vec<u32>, Split)>> {
    if is_jsonl(path) {
        let items: Vec<CptItem> = crate::io::jsonio::read_jsonl(path)?;
        items
            .iter()
            .map(|it| Ok((dtok.encode(&it.tokens, false)?, it.split)))
            .collect()
    } else {
        text_items(path, dtok, s_cap, o_cap)
    }
}

/// Plain text, one paragraph per line, tokenized, with [`text_split`].
fn text_items(
    path: &Path,
    dtok: &DecoderTokenizer,
    s_cap: Option<usize>,
    o_cap: Option<usize>,
) -> Result<Vec<(Vec<u32>, Split)>> {
    let text = crate::io::jsonio::read_utf8(path)?;
    let mut items = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let t = dtok.encode(line, false)?;
        if t.len() < MIN_TEXT_TOKENS {
            continue;
        }
        let (s, o) = text_split(t.len(), s_cap, o_cap);
        items.push((t, Split { s, o }));
    }
    if items.is_empty() {
        bail!("no paragraphs of {MIN_TEXT_TOKENS} or more decoder tokens");
    }
    Ok(items)
}

/// The next-paragraph sequence of item `i` of `data`: its `s` context tokens compressed into
/// chunks of `k`, a random `expand_frac` of them (drawn with `seed`) left expanded, and its `o`
/// continuation tokens as the target.
pub fn next_seq(
    data: &CptData,
    i: usize,
    k: usize,
    expand_frac: f64,
    bos: Option<u32>,
    seed: u64,
) -> Seq {
    let (t, s, o) = (&data.tokens[i], data.s[i], data.o[i]);
    let l = s.div_ceil(k);
    let mask = random_n(l, num_expand(expand_frac, l), seed);
    Seq::next_paragraph(&t[..s], &t[s..s + o], k, mask, bos)
}

/// CPT-A or CPT-B.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CptMode {
    Recon,
    Next,
}

/// Settings of a CPT run.
#[derive(Debug, Clone)]
pub struct CptSettings {
    pub mode: CptMode,
    pub k: usize,
    pub curriculum: Curriculum,
    pub expand_frac: f64,
    /// Decoder learning rate / base learning rate (when the decoder trains).
    pub dec_lr_scale: f64,
    /// Sequences per forward pass in the evaluation.
    pub eval_batch: usize,
    /// CPT-B: weight of `KL(full context || compressed)` per target beside the cross-entropy
    /// (0: none; `--distill`).
    pub distill: f64,
}

/// A CPT-A or CPT-B run.
pub struct CptTask {
    pub settings: CptSettings,
    pub enc: TrainEncoder,
    pub dec: TrainDecoder,
    pub data: CptData,
    pub dec_name: String,
    /// The chunk count of the current step (CPT-A).
    chunks: usize,
}

impl CptTask {
    pub fn new(
        settings: CptSettings,
        enc: TrainEncoder,
        dec: TrainDecoder,
        data: CptData,
        dec_name: &str,
    ) -> Result<Self> {
        if settings.mode == CptMode::Next && data.train.iter().any(|&i| data.o[i] == 0) {
            bail!("cpt_next: some items have no continuation tokens after their context (check --s and the texts' length)");
        }
        Ok(Self {
            settings,
            enc,
            dec,
            data,
            dec_name: dec_name.to_string(),
            chunks: 1,
        })
    }

    /// The training sequence of item `i`.
    fn train_seq(&self, i: usize, chunks: usize, rng: &mut ChaCha8Rng) -> Seq {
        let t = &self.data.tokens[i];
        let k = self.settings.k;
        match self.settings.mode {
            CptMode::Recon => {
                let len = (chunks * k).min(t.len());
                let off = rng.random_range(0..=t.len() - len);
                Seq::reconstruction(&t[off..off + len], k, self.dec.tok.bos_id())
            }
            CptMode::Next => next_seq(
                &self.data,
                i,
                k,
                self.settings.expand_frac,
                self.dec.tok.bos_id(),
                rng.random(),
            ),
        }
    }

    /// Forward sequences with the trainable encoder (`grad`) or a detached one.
    pub fn forward(&self, seqs: &[Seq], grad: bool) -> Result<SeqOut> {
        forward_trained(&self.enc, &self.dec, seqs, grad)
    }

    /// Token accuracy and perplexity of sequences, in batches.
    fn score(&self, seqs: &[Seq]) -> Result<Value> {
        let s = score_trained(&self.enc, &self.dec, seqs, self.settings.eval_batch)?;
        Ok(json!({
            "token_acc": s.accuracy(),
            "ppl": perplexity(s.nll),
            "nll": s.nll,
            "tokens": s.tokens,
        }))
    }

    /// Up to [`EVAL_WINDOWS`] consecutive windows of `len` tokens from the start of each
    /// held-out item (one shorter window when the item is shorter).
    fn eval_windows(&self, len: usize) -> Vec<&[u32]> {
        let mut out = Vec::new();
        for &i in &self.data.eval {
            let t = &self.data.tokens[i];
            let n = (t.len() / len.max(1)).clamp(1, EVAL_WINDOWS);
            out.extend((0..n).map(|w| &t[w * len..((w + 1) * len).min(t.len())]));
        }
        out
    }

    /// Reconstruction of windows of `n * k` tokens of each held-out item from their `n` chunks,
    /// for `n` = 1, 2, 4, 8 (and every other count of the curriculum); and, as the baseline the chunk vectors must
    /// beat, the same teacher-forced targets with no chunk vector (BOS only): a decoder that
    /// merely continues the text it is fed gets that accuracy for free.
    fn eval_recon(&self) -> Result<Value> {
        let k = self.settings.k;
        let mut out = serde_json::Map::new();
        // The curve over 1, 2, 4, 8 chunks (as far as the curriculum's largest count, at least
        // 8), plus any other count the curriculum trains.
        let max = self.settings.curriculum.max_chunks().max(8);
        let mut counts = self.settings.curriculum.counts();
        counts.extend((0..).map(|i| 1usize << i).take_while(|&n| n <= max));
        counts.sort_unstable();
        counts.dedup();
        for &n in &counts {
            let spans = self.eval_windows(n * k);
            let bos = self.dec.tok.bos_id();
            let seqs: Vec<Seq> = spans
                .iter()
                .map(|t| Seq::reconstruction(t, k, bos))
                .collect();
            out.insert(format!("recon_{n}_chunks"), self.score(&seqs)?);
            let plain: Vec<Seq> = spans.iter().map(|t| Seq::no_context(bos, t)).collect();
            out.insert(format!("no_chunks_{n}"), self.score(&plain)?);
        }
        Ok(Value::Object(out))
    }

    fn eval_next(&self) -> Result<Value> {
        let k = self.settings.k;
        let seqs = |mask: &dyn Fn(usize, usize) -> Vec<bool>| -> Vec<Seq> {
            self.data
                .eval
                .iter()
                .map(|&i| {
                    let (t, s, o) = (&self.data.tokens[i], self.data.s[i], self.data.o[i]);
                    let m = mask(i, s.div_ceil(k));
                    Seq::next_paragraph(&t[..s], &t[s..s + o], k, m, self.dec.tok.bos_id())
                })
                .collect()
        };
        let frac = self.settings.expand_frac;
        let none: Vec<Seq> = self
            .data
            .eval
            .iter()
            .map(|&i| {
                let (t, s, o) = (&self.data.tokens[i], self.data.s[i], self.data.o[i]);
                Seq::no_context(self.dec.tok.bos_id(), &t[s..s + o])
            })
            .collect();
        Ok(json!({
            "next_compressed_p0": self.score(&seqs(&|_, l| vec![false; l]))?,
            "next_expand_frac": self.score(&seqs(&|i, l| random_n(l, num_expand(frac, l), i as u64)))?,
            "next_full_p1": self.score(&seqs(&|_, l| vec![true; l]))?,
            "next_no_context": self.score(&none)?,
        }))
    }
}

/// A CPT micro-batch: its sequences and their chunk count.
struct CptDrawn {
    seqs: Vec<Seq>,
    chunks: usize,
}

impl Task for CptTask {
    fn stage(&self) -> &'static str {
        match self.settings.mode {
            CptMode::Recon => "cpt_recon",
            CptMode::Next => "cpt_next",
        }
    }

    fn groups(&self) -> Vec<Group> {
        enc_dec_groups(&self.enc, &self.dec, self.settings.dec_lr_scale)
    }

    fn num_train(&self) -> usize {
        self.data.train.len()
    }

    fn begin_step(&mut self, step: usize, total: usize, rng: &mut ChaCha8Rng) -> Result<()> {
        self.chunks = self.settings.curriculum.sample(step, total, rng);
        Ok(())
    }

    fn draw(&mut self, items: &[usize], rng: &mut ChaCha8Rng) -> Result<Option<Drawn>> {
        let ids: Vec<usize> = items.iter().map(|&j| self.data.train[j]).collect();
        // Every sequence of a micro-batch gets the same chunk count, so they batch together.
        let k = self.settings.k;
        let fit = ids.iter().map(|&i| self.data.tokens[i].len() / k).min();
        let chunks = self.chunks.min(fit.unwrap_or(1)).max(1);
        let seqs: Vec<Seq> = ids
            .iter()
            .map(|&i| self.train_seq(i, chunks, rng))
            .collect();
        Ok(Some(Box::new(CptDrawn { seqs, chunks })))
    }

    fn loss(&self, drawn: &Drawn) -> Result<Micro> {
        let Some(d) = drawn.downcast_ref::<CptDrawn>() else {
            bail!("cpt: a micro-batch drawn by another task");
        };
        let out = match self.settings.mode {
            CptMode::Next => {
                forward_trained_distilled(&self.enc, &self.dec, &d.seqs, self.settings.distill)?
            }
            CptMode::Recon => self.forward(&d.seqs, true)?,
        };
        let mut stats = out.stats()?;
        if self.settings.mode == CptMode::Recon {
            stats.note("chunks", d.chunks as f64);
        }
        Ok(Micro {
            loss: out.loss,
            stats,
        })
    }

    fn evaluate(&mut self) -> Result<Value> {
        match self.settings.mode {
            CptMode::Recon => self.eval_recon(),
            CptMode::Next => self.eval_next(),
        }
    }

    fn checkpoint(&self, step: usize) -> Result<Checkpoint<'_>> {
        Ok(enc_dec_checkpoint(
            &self.enc,
            &self.dec,
            self.stage(),
            &self.dec_name,
            self.settings.k,
            step,
        ))
    }
}
