//! The training commands' flags: `cpt_recon` / `cpt_next` ([`CptArgs`]), `sft` ([`SftArgs`]),
//! `train_policy` ([`TrainPolicyArgs`]), and the optimiser and schedule flags they share
//! ([`TrainArgs`]). Re-exported from [`crate::cli`].

use std::path::PathBuf;

use clap::Args;

use super::range::{at_least, non_negative_f64, positive_f64, positive_usize, unit_interval};
use super::{AnswerableArg, EmbedModelArg, EncDecArgs, RetrieveArgs, RuntimeArgs};
use crate::retrieval::embed::Pooling;

/// Flags of the training commands.
#[derive(Debug, Clone, Args)]
pub struct TrainArgs {
    /// Optimiser steps.
    #[arg(long, default_value_t = 300, value_parser = positive_usize)]
    pub steps: usize,
    /// Peak learning rate [default: 2e-4 cpt_recon, 5e-5 cpt_next, 2e-5 sft, 1e-4 train_policy].
    #[arg(long, value_parser = positive_f64)]
    pub lr: Option<f64>,
    /// Log every N steps.
    #[arg(long = "log_every", alias = "log-every", default_value_t = 20)]
    pub log_every: usize,
    /// Output directory for checkpoints, config.json and the training log [default: runs/<command>].
    #[arg(long = "out_dir", alias = "out-dir")]
    pub out_dir: Option<PathBuf>,
    /// Continue from the last checkpoint in --out_dir (same schedule: step counter, learning rate,
    /// per-step batches and AdamW moments continue).
    #[arg(long)]
    pub resume: bool,
    /// Start afresh even if --out_dir already holds a checkpoint (it is overwritten).
    #[arg(long)]
    pub force: bool,
    /// Warm-up steps of the learning rate (0: none) [default: 5% of --steps, at least 1].
    #[arg(long)]
    pub warmup: Option<usize>,
    /// Training examples (questions for train_policy) per optimiser step.
    #[arg(long = "batch_size", alias = "batch-size", default_value_t = 2, value_parser = positive_usize)]
    pub batch_size: usize,
    /// Examples per forward/backward pass; gradients are accumulated over the batch.
    #[arg(long = "micro_batch", alias = "micro-batch", default_value_t = 1, value_parser = positive_usize)]
    pub micro_batch: usize,
    /// Clip the global gradient norm to this (0 = no clipping).
    #[arg(long, default_value_t = 1.0, value_parser = non_negative_f64)]
    pub clip: f64,
    /// AdamW weight decay (matrices only).
    #[arg(long = "weight_decay", alias = "weight-decay", default_value_t = 0.01, value_parser = non_negative_f64)]
    pub weight_decay: f64,
    /// Checkpoint every N steps (0 = only at the end; always at the end and on Ctrl-C).
    #[arg(long = "save_every", alias = "save-every", default_value_t = 100)]
    pub save_every: usize,
    /// Held-out items (the last N of the data file) evaluated at the start and the end; 0 = no
    /// evaluation.
    #[arg(long = "eval_items", alias = "eval-items", default_value_t = 16)]
    pub eval_items: usize,
}

#[derive(Debug, Clone, Args)]
pub struct CptArgs {
    /// Training text: JSONL of long items with `tokens` (text) and `split` ({"s": .., "o": ..}),
    /// or plain text with one paragraph per line (any extension but .jsonl / .json).
    #[arg(long = "train_json", alias = "train-json")]
    pub train_json: PathBuf,
    /// Held-out text in the same formats: the evaluation reads its first --eval_items items and
    /// training reads all of --train_json [default: hold out the last --eval_items of --train_json].
    #[arg(long = "eval_json", alias = "eval-json")]
    pub eval_json: Option<PathBuf>,
    #[command(flatten)]
    pub models: EncDecArgs,
    /// Decoder tokens per chunk.
    #[arg(long, default_value_t = 16, value_parser = positive_usize)]
    pub k: usize,
    /// Fraction of chunks left expanded during next-paragraph training (cpt_next).
    #[arg(long = "expand_frac", alias = "expand-frac", default_value_t = 0.25, value_parser = unit_interval)]
    pub expand_frac: f64,
    /// cpt_next: also distil the decoder's own predictions with the whole context expanded into
    /// the compressed reading, adding this weight times KL(full context || compressed) per
    /// continuation token to the loss (0: off). Costs one more forward pass of the full context.
    #[arg(long, default_value_t = 0.0, value_parser = non_negative_f64)]
    pub distill: f64,
    /// Weights to start from (cpt_next: the cpt_recon output).
    #[arg(long = "load_dir", alias = "load-dir")]
    pub load_dir: Option<PathBuf>,
    /// Keep the decoder frozen in cpt_next.
    #[arg(long = "freeze_dec", alias = "freeze-dec")]
    pub freeze_dec: bool,
    /// Keep the chunk encoder frozen and train only the projector (the first phase of a
    /// schedule that aligns the projector before the encoder moves).
    #[arg(long = "freeze_enc", alias = "freeze-enc")]
    pub freeze_enc: bool,
    /// Learning rate of the chunk encoder (BERT) when it trains; the projector keeps --lr
    /// [default: --lr].
    #[arg(long = "enc_lr", alias = "enc-lr", value_parser = positive_f64)]
    pub enc_lr: Option<f64>,
    /// Rank of the decoder's LoRA adapter where it trains (0: fine-tune every weight)
    /// [default: 8 in cpt_next; cpt_recon keeps the decoder frozen unless given].
    #[arg(long = "lora_rank", alias = "lora-rank")]
    pub lora_rank: Option<usize>,
    /// Learning rate of the decoder when it trains (cpt_next) [default: --lr / 5].
    #[arg(long = "dec_lr", alias = "dec-lr", value_parser = positive_f64)]
    pub dec_lr: Option<f64>,
    /// Most chunks reconstructed together in cpt_recon (the default curriculum grows 1, 2, 4, ..
    /// up to this).
    #[arg(long = "max_chunks", alias = "max-chunks", default_value_t = 8, value_parser = positive_usize)]
    pub max_chunks: usize,
    /// cpt_recon curriculum: stages separated by ';', each 'chunks:weight,...' (e.g.
    /// '1:1;1:1,2:2;1:1,2:2,4:4'); stages split --steps evenly [default: from --max_chunks].
    #[arg(long)]
    pub curriculum: Option<String>,
    /// Chunk encoder pooling for a fresh encoder (cpt_recon): mean, cls, or seg4 / seg8 (the
    /// chunk's tokens in 4 / 8 runs, each averaged, side by side: the order one mean loses). A
    /// --load_dir fixes its own, except that mean-pooled weights widen to seg4 / seg8.
    #[arg(long, value_enum)]
    pub pooling: Option<Pooling>,
    /// Cap on the context tokens `s` of each item (cpt_next) [default: the item's split].
    #[arg(long, value_parser = positive_usize)]
    pub s: Option<usize>,
    /// Cap on the continuation tokens `o` of each item (cpt_next) [default: the item's split].
    #[arg(long, value_parser = positive_usize)]
    pub o: Option<usize>,
    #[command(flatten)]
    pub train: TrainArgs,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
}

/// The compression flags `train_policy` reads: the layout it trains on and the weights it
/// starts from (no selection flags: the policy is what it trains).
#[derive(Debug, Clone, Args)]
pub struct PolicyCompressArgs {
    /// Keep a GGUF decoder's matrices quantized (see `generate --quantized`).
    #[arg(long)]
    pub quantized: bool,
    /// Decoder tokens per chunk.
    #[arg(long, default_value_t = 16, value_parser = positive_usize)]
    pub k: usize,
    /// Fraction of chunks the policy expands (its REINFORCE steps sample this many).
    #[arg(long, default_value_t = 0.25, value_parser = unit_interval)]
    pub p: f64,
    /// Cap on context tokens (decoder tokens of retrieved passages) before compression.
    #[arg(long = "ctx_max", alias = "ctx-max", default_value_t = 2048, value_parser = positive_usize)]
    pub ctx_max: usize,
    /// Weights to start from (the sft output).
    #[arg(long = "load_dir", alias = "load-dir")]
    pub load_dir: Option<PathBuf>,
}

/// The question/answer pairs `sft` and `train_policy` train on, the retrieval over them and the
/// models, flags the two share.
#[derive(Debug, Clone, Args)]
pub struct QaDataArgs {
    /// JSONL of question/answer pairs (`question`, `answers`; sft's target is the first answer).
    #[arg(long = "rag_json", alias = "rag-json")]
    pub rag_json: PathBuf,
    #[command(flatten)]
    pub retrieve: RetrieveArgs,
    #[command(flatten)]
    pub answerable: AnswerableArg,
    #[command(flatten)]
    pub embed: EmbedModelArg,
    #[command(flatten)]
    pub models: EncDecArgs,
}

#[derive(Debug, Clone, Args)]
pub struct TrainPolicyArgs {
    #[command(flatten)]
    pub qa: QaDataArgs,
    #[command(flatten)]
    pub compress: PolicyCompressArgs,
    /// Hidden width of the policy network.
    #[arg(long = "policy_hidden", alias = "policy-hidden", default_value_t = 256, value_parser = positive_usize)]
    pub policy_hidden: usize,
    /// Expansion sets sampled per question, at least 2 (their mean reward is the baseline).
    #[arg(long, default_value_t = 4, value_parser = at_least::<2>)]
    pub group: usize,
    /// First steps that fit the policy to the chunks holding the gold answer (supervised, no
    /// decoder pass) before REINFORCE takes over.
    #[arg(long = "warm_start", alias = "warm-start", default_value_t = 0)]
    pub warm_start: usize,
    #[command(flatten)]
    pub train: TrainArgs,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
}

#[derive(Debug, Clone, Args)]
pub struct SftArgs {
    #[command(flatten)]
    pub qa: QaDataArgs,
    /// Decoder tokens per chunk.
    #[arg(long, default_value_t = 16, value_parser = positive_usize)]
    pub k: usize,
    /// Cap on context tokens (decoder tokens of retrieved passages) before compression.
    #[arg(long = "ctx_max", alias = "ctx-max", default_value_t = 2048, value_parser = positive_usize)]
    pub ctx_max: usize,
    /// Weights to start from (the cpt_next output).
    #[arg(long = "load_dir", alias = "load-dir")]
    pub load_dir: Option<PathBuf>,
    /// Keep the decoder frozen.
    #[arg(long = "freeze_dec", alias = "freeze-dec")]
    pub freeze_dec: bool,
    /// Rank of the decoder's LoRA adapter (0: fine-tune every weight) [default: 8].
    #[arg(long = "lora_rank", alias = "lora-rank")]
    pub lora_rank: Option<usize>,
    /// Largest expansion fraction drawn per training example (uniform in [0, this]): below 1
    /// spends the steps on the compressed inputs inference uses.
    #[arg(long = "expand_max", alias = "expand-max", default_value_t = 1.0, value_parser = unit_interval)]
    pub expand_max: f64,
    /// Share of the training examples (in [0, 1]) whose expansions take the chunks holding the
    /// gold answer first, as a policy that finds the answer would; the rest of each budget, and
    /// the other examples, expand at random. At least one chunk is expanded in such an example.
    #[arg(long = "gold_expand", alias = "gold-expand", default_value_t = 0.0, value_parser = unit_interval)]
    pub gold_expand: f64,
    /// Learning rate of the decoder [default: --lr].
    #[arg(long = "dec_lr", alias = "dec-lr", value_parser = positive_f64)]
    pub dec_lr: Option<f64>,
    /// Text to mix next-paragraph training (cpt_next's task, same formats as its --train_json)
    /// into every micro-batch: as many sequences as questions, their loss added with
    /// --next_weight, so the decoder keeps reading compressed chunks while it learns to answer.
    #[arg(long = "next_json", alias = "next-json")]
    pub next_json: Option<PathBuf>,
    /// Weight of the mixed next-paragraph loss beside the answer loss.
    #[arg(long = "next_weight", alias = "next-weight", default_value_t = 1.0, value_parser = positive_f64)]
    pub next_weight: f64,
    /// Fraction of the mixed next-paragraph sequences' chunks left expanded.
    #[arg(long = "next_expand_frac", alias = "next-expand-frac", default_value_t = 0.1, value_parser = unit_interval)]
    pub next_expand_frac: f64,
    /// Distillation weight of the mixed next-paragraph sequences (see `cpt_next --distill`).
    #[arg(long = "next_distill", alias = "next-distill", default_value_t = 0.0, value_parser = non_negative_f64)]
    pub next_distill: f64,
    #[command(flatten)]
    pub train: TrainArgs,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
}
