//! The command line: one clap-derived struct per subcommand, with the seed's exact flag spellings
//! (`--index_dir`) and kebab-case aliases (`--index-dir`). Shared flags are flattened structs.
//! Nothing here loads a model: parsing and validation only.

use std::path::PathBuf;

use clap::{ArgGroup, Args, Parser, Subcommand, ValueEnum};

// Domain types the flags name live with the code that uses them.
pub use crate::device::DeviceArg;
pub use crate::retrieval::search::RetrievalMode;
pub use crate::select::SelectMode;

mod range;
mod train;

use range::{non_negative_f64, open_unit_interval, positive_f64, positive_usize, unit_interval};

pub use train::{CptArgs, PolicyCompressArgs, QaDataArgs, SftArgs, TrainArgs, TrainPolicyArgs};

/// REFRAG-style retrieval-augmented generation: compress, sense/select, expand.
#[derive(Debug, Parser)]
#[command(name = "refrag", version = crate::VERSION_LONG, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Embed a corpus (one passage per line) and build the FAISS + BM25 index.
    Index(IndexArgs),
    /// Retrieve passages for a question and print them with scores as JSON.
    Search(SearchArgs),
    /// Answer a question: retrieve, compress, select, expand, decode.
    Generate(GenerateArgs),
    /// Answer questions typed on stdin, the models loaded once: each answer, then its sources.
    Chat(ChatArgs),
    /// Continual pretraining, phase A: reconstruct tokens from chunk embeddings (decoder frozen).
    #[command(name = "cpt_recon", alias = "cpt-recon")]
    CptRecon(CptArgs),
    /// Continual pretraining, phase B: predict the next paragraph from a compressed context.
    #[command(name = "cpt_next", alias = "cpt-next")]
    CptNext(CptArgs),
    /// Supervised fine-tuning on question/answer pairs with compressed retrieved context.
    Sft(SftArgs),
    /// Train the selective-expansion policy with REINFORCE.
    #[command(name = "train_policy", alias = "train-policy")]
    TrainPolicy(TrainPolicyArgs),
    /// Write the synthetic data set (corpora, QA pairs, CPT items) deterministically.
    #[command(name = "make_corpus", alias = "make-corpus")]
    MakeCorpus(MakeCorpusArgs),
    /// Answer quality and latency of no-context, full-context and REFRAG selections, side by side.
    Eval(EvalArgs),
    /// Time to first token of REFRAG against the full-context baseline over context lengths.
    Bench(BenchArgs),
}

/// Flags every command that runs a model shares.
#[derive(Debug, Clone, Args)]
pub struct RuntimeArgs {
    /// Device to run on (auto = CUDA, then Metal, then CPU).
    #[arg(long, value_enum, default_value_t = DeviceArg::Auto)]
    pub device: DeviceArg,
    /// Random seed (sampling, random selection, training).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Hide progress bars.
    #[arg(long, short)]
    pub quiet: bool,
    /// Accepted for compatibility with the seed's Python CLI; has no effect (there is no
    /// torch.compile in a Rust binary).
    #[arg(long = "torch_compile", alias = "torch-compile")]
    pub torch_compile: bool,
}

/// The retrieval embedding model.
#[derive(Debug, Clone, Args)]
pub struct EmbedModelArg {
    /// Retrieval embedding model: local HF folder or hub id
    /// [default: models/all-MiniLM-L6-v2 if present, else sentence-transformers/all-MiniLM-L6-v2].
    #[arg(long = "embed_model", alias = "embed-model")]
    pub embed_model: Option<String>,
}

/// The chunk encoder and the decoder.
#[derive(Debug, Clone, Args)]
pub struct EncDecArgs {
    /// Chunk encoder (BERT family): local HF folder or hub id
    /// [default: models/all-MiniLM-L6-v2 if present, else sentence-transformers/all-MiniLM-L6-v2].
    #[arg(long)]
    pub enc: Option<String>,
    /// Decoder LLM: local HF folder, .gguf file, or hub id
    /// [default: models/SmolLM2-135M-Instruct.Q4_1.gguf if present, else HuggingFaceTB/SmolLM2-135M-Instruct].
    #[arg(long)]
    pub dec: Option<String>,
}

/// Retrieval flags.
#[derive(Debug, Clone, Args)]
pub struct RetrieveArgs {
    /// Index directory written by `refrag index`.
    #[arg(long = "index_dir", alias = "index-dir")]
    pub index_dir: PathBuf,
    /// Number of passages to retrieve.
    #[arg(long, default_value_t = 8, value_parser = positive_usize)]
    pub topk: usize,
    /// Ranking to retrieve with.
    #[arg(long, value_enum, default_value_t = RetrievalMode::Hybrid)]
    pub retrieval: RetrievalMode,
}

/// Retrieval flags of `eval`, where `--index_dir` may be left out for a SQuAD-format file.
#[derive(Debug, Clone, Args)]
pub struct EvalRetrieveArgs {
    /// Index directory written by `refrag index` [default for a SQuAD-format --rag_json: a
    /// temporary index of its paragraphs, removed at the end].
    #[arg(long = "index_dir", alias = "index-dir")]
    pub index_dir: Option<PathBuf>,
    /// Number of passages to retrieve.
    #[arg(long, default_value_t = 8, value_parser = positive_usize)]
    pub topk: usize,
    /// Ranking to retrieve with.
    #[arg(long, value_enum, default_value_t = RetrievalMode::Hybrid)]
    pub retrieval: RetrievalMode,
}

impl EvalRetrieveArgs {
    /// These flags with `index_dir` as the index.
    pub fn with_index_dir(&self, index_dir: PathBuf) -> RetrieveArgs {
        RetrieveArgs {
            index_dir,
            topk: self.topk,
            retrieval: self.retrieval,
        }
    }
}

/// Which question/answer pairs a QA training run uses.
#[derive(Debug, Clone, Args)]
pub struct AnswerableArg {
    /// Also train on pairs whose retrieved passages contain no gold answer (by default they are
    /// skipped: the model could only learn to guess on them).
    #[arg(long = "keep_unanswerable", alias = "keep-unanswerable")]
    pub keep_unanswerable: bool,
}

/// Compression and selection flags.
#[derive(Debug, Clone, Args)]
pub struct CompressArgs {
    /// Keep a GGUF decoder's matrices quantized and multiply with candle's quantized kernels
    /// (a quarter of the memory for Q4 weights; the arithmetic of llama.cpp-style inference)
    /// instead of dequantizing them to f32. Not for a fine-tuned decoder.
    #[arg(long)]
    pub quantized: bool,
    /// Decoder tokens per chunk.
    #[arg(long, default_value_t = 16, value_parser = positive_usize)]
    pub k: usize,
    /// Fraction of chunks expanded back to full tokens (0 = all compressed, 1 = full context).
    #[arg(long, default_value_t = 0.25, value_parser = unit_interval)]
    pub p: f64,
    /// Cap on context tokens (decoder tokens of retrieved passages) before compression.
    #[arg(long = "ctx_max", alias = "ctx-max", default_value_t = 2048, value_parser = positive_usize)]
    pub ctx_max: usize,
    /// Use the perplexity heuristic instead of the trained policy (same as --select heuristic).
    #[arg(long)]
    pub heuristic: bool,
    /// Selection rule; default: the policy when --load_dir holds one, else the heuristic.
    #[arg(long, value_enum)]
    pub select: Option<SelectMode>,
    /// Directory with trained weights (encoder, projector, policy, decoder) and its config.json
    /// [default: the shipped weights/ when they were trained for these models].
    #[arg(long = "load_dir", alias = "load-dir")]
    pub load_dir: Option<PathBuf>,
    /// Do not use the shipped weights: an untrained projector unless --load_dir is given.
    #[arg(long = "no_weights", alias = "no-weights")]
    pub no_weights: bool,
}

#[derive(Debug, Clone, Args)]
pub struct IndexArgs {
    /// A file or a directory (recursive) of .txt, .md and .jsonl (`text`, optional `id`,
    /// `title`) documents; a .txt is one passage per line unless it reads as prose (see the
    /// README) (blank lines skipped and counted; passage ids count the passages, not the lines).
    #[arg(long)]
    pub corpus: PathBuf,
    /// Refuse a one-passage-per-line corpus with a blank line instead of skipping it.
    #[arg(long)]
    pub strict: bool,
    /// Most retrieval-model tokens per passage of a document [default: the embedder's window
    /// less its two special tokens, 254 for all-MiniLM-L6-v2].
    #[arg(long = "passage_tokens", alias = "passage-tokens", value_parser = positive_usize)]
    pub passage_tokens: Option<usize>,
    /// Tokens of whole sentences a passage repeats from the one before when a paragraph is cut.
    #[arg(
        long = "passage_overlap",
        alias = "passage-overlap",
        default_value_t = 32
    )]
    pub passage_overlap: usize,
    /// Add the documents of --corpus to the existing --index_dir: new ones are added, changed
    /// ones (same name, other content) replace their passages, unchanged ones are not embedded
    /// again.
    #[arg(long, conflicts_with = "force")]
    pub append: bool,
    /// With --append: drop the index's documents that --corpus no longer holds (files deleted
    /// from the folder), so appending the folder an index was built from equals a rebuild.
    #[arg(long, requires = "append")]
    pub prune: bool,
    /// Output directory (written atomically: a temporary directory renamed at the end).
    #[arg(long = "index_dir", alias = "index-dir")]
    pub index_dir: PathBuf,
    #[command(flatten)]
    pub embed: EmbedModelArg,
    /// FAISS index factory string (inner product), e.g. Flat, IVF64,Flat, HNSW32, IVF64,PQ16.
    #[arg(long = "index_type", alias = "index-type", default_value = "Flat")]
    pub index_type: String,
    /// Passages embedded per batch.
    #[arg(long = "batch_size", alias = "batch-size", default_value_t = 64, value_parser = positive_usize)]
    pub batch_size: usize,
    /// Embed in 8-bit integer products where the CPU has AVX-512 VNNI (about 2x the passages
    /// per second; embeddings at cosine ~0.999 of f32, so near-tied passages can swap ranks).
    /// The index records it and its queries follow. Also REFRAG_BERT_INT8=1.
    #[arg(long)]
    pub int8: bool,
    /// Chunk encoder whose chunk vectors are cached beside the index (the chunk cache is built
    /// when any of --enc, --dec, --k or --load_dir is given; the others take their defaults).
    #[arg(long)]
    pub enc: Option<String>,
    /// Decoder whose tokenizer chunks the passages for the chunk cache.
    #[arg(long)]
    pub dec: Option<String>,
    /// Decoder tokens per chunk for the chunk cache [default: 16 when the cache is built].
    #[arg(long, value_parser = positive_usize)]
    pub k: Option<usize>,
    /// Trained weights whose encoder computes the cached chunk vectors [default: the shipped
    /// weights/ when they were trained for these models and a chunk cache is built].
    #[arg(long = "load_dir", alias = "load-dir")]
    pub load_dir: Option<PathBuf>,
    /// Do not use the shipped weights for the chunk cache.
    #[arg(long = "no_weights", alias = "no-weights")]
    pub no_weights: bool,
    /// Replace an existing index directory.
    #[arg(long)]
    pub force: bool,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
}

#[derive(Debug, Clone, Args)]
#[command(group(ArgGroup::new("ask").required(true).args(["question", "questions"])))]
pub struct SearchArgs {
    #[command(flatten)]
    pub retrieve: RetrieveArgs,
    /// The query.
    #[arg(long)]
    pub question: Option<String>,
    /// Many queries, the index loaded once: JSONL (.jsonl/.json: `question`, optional `id`) or
    /// plain text, one question per line; prints one JSON object per question and line.
    #[arg(long)]
    pub questions: Option<PathBuf>,
    /// Write the --questions output to this file (atomically: a temporary file renamed at the
    /// end) instead of stdout.
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[command(flatten)]
    pub embed: EmbedModelArg,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
}

/// The flags `generate` and `chat` share: retrieval, models, compression and decoding.
#[derive(Debug, Clone, Args)]
pub struct AnswerArgs {
    #[command(flatten)]
    pub retrieve: RetrieveArgs,
    #[command(flatten)]
    pub embed: EmbedModelArg,
    #[command(flatten)]
    pub models: EncDecArgs,
    #[command(flatten)]
    pub compress: CompressArgs,
    /// Maximum new tokens to generate.
    #[arg(long = "max_new", alias = "max-new", default_value_t = 64, value_parser = positive_usize)]
    pub max_new: usize,
    /// Sampling temperature (0 = greedy).
    #[arg(long, default_value_t = 0.0, value_parser = non_negative_f64)]
    pub temperature: f64,
    /// Nucleus sampling threshold.
    #[arg(long = "top_p", alias = "top-p", default_value_t = 0.9, value_parser = open_unit_interval)]
    pub top_p: f64,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
}

#[derive(Debug, Clone, Args)]
#[command(group(ArgGroup::new("ask").required(true).args(["question", "questions"])))]
pub struct GenerateArgs {
    /// The question to answer.
    #[arg(long)]
    pub question: Option<String>,
    /// Many questions, the models loaded once: JSONL (.jsonl/.json: `question`, optional `id`)
    /// or plain text, one question per line; prints one JSON object per question and line.
    #[arg(long)]
    pub questions: Option<PathBuf>,
    /// Write the --questions output to this file (atomically: a temporary file renamed at the
    /// end) instead of stdout.
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[command(flatten)]
    pub answer: AnswerArgs,
}

/// `chat`: the flags of `generate` but the question, which comes from stdin.
#[derive(Debug, Clone, Args)]
pub struct ChatArgs {
    #[command(flatten)]
    pub answer: AnswerArgs,
}

#[derive(Debug, Clone, Args)]
pub struct MakeCorpusArgs {
    /// Output directory for the data set.
    #[arg(long = "out_dir", alias = "out-dir")]
    pub out_dir: PathBuf,
    /// Generator seed (the committed data/ uses the default).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Also write corpus_mega.txt with N passages (10,000+).
    #[arg(long)]
    pub mega: Option<usize>,
    /// Allow writing into an existing directory that already holds data files.
    #[arg(long)]
    pub force: bool,
}

/// One way `eval` answers a question.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum EvalMode {
    /// The same template with zero passages.
    NoContext,
    /// Every chunk expanded (p = 1): the ordinary full-context RAG input.
    Full,
    /// REFRAG with every chunk compressed (p = 0).
    Compressed,
    /// The equal-budget baseline: the retrieved passages as plain tokens, in rank order, cut
    /// (at a chunk boundary) where the decoder positions of REFRAG at --p run out; the rest
    /// dropped. The paper's comparison of compressed passages against the plain ones that fit.
    TopnFull,
    /// REFRAG, expanding the chunks the perplexity heuristic picks.
    Heuristic,
    /// REFRAG, expanding chunks at random.
    Random,
    /// REFRAG, expanding the chunks the trained policy picks (needs --load_dir with a policy).
    Policy,
}

#[derive(Debug, Clone, Args)]
pub struct EvalArgs {
    /// JSONL of question/answer pairs (`id`, `question`, `answers`), or a SQuAD-format JSON
    /// file (`data[].paragraphs[].qas[]`, told apart by its content).
    #[arg(long = "rag_json", alias = "rag-json")]
    pub rag_json: PathBuf,
    #[command(flatten)]
    pub retrieve: EvalRetrieveArgs,
    #[command(flatten)]
    pub embed: EmbedModelArg,
    #[command(flatten)]
    pub models: EncDecArgs,
    #[command(flatten)]
    pub compress: CompressArgs,
    /// Modes to compare, comma-separated [default: all; policy only when --load_dir has one].
    #[arg(long, value_enum, value_delimiter = ',')]
    pub modes: Vec<EvalMode>,
    /// Evaluate only the first N questions.
    #[arg(long, value_parser = positive_usize)]
    pub limit: Option<usize>,
    /// Maximum new tokens per answer (greedy decoding).
    #[arg(long = "max_new", alias = "max-new", default_value_t = 24, value_parser = positive_usize)]
    pub max_new: usize,
    /// Where to write the JSON report (the markdown table goes to stdout).
    #[arg(long, default_value = "runs/eval.json")]
    pub out: PathBuf,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
}

/// Which chunk-cache settings `bench` measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CacheArg {
    /// Both: chunk vectors precomputed, and encoded inside TTFT.
    Both,
    /// Chunk encoder vectors precomputed outside the timed region (as the index's cache holds them).
    On,
    /// Chunk encoding inside TTFT.
    Off,
}

#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// Keep a GGUF decoder's matrices quantized (see `generate --quantized`).
    #[arg(long)]
    pub quantized: bool,
    /// Text file, one passage per line, that the contexts are cut from.
    #[arg(long, default_value = "data/corpus_large.txt")]
    pub corpus: PathBuf,
    #[command(flatten)]
    pub models: EncDecArgs,
    /// Directory with trained weights (encoder, projector) and its config.json [default: the
    /// shipped weights/ when they were trained for these models].
    #[arg(long = "load_dir", alias = "load-dir")]
    pub load_dir: Option<PathBuf>,
    /// Do not use the shipped weights.
    #[arg(long = "no_weights", alias = "no-weights")]
    pub no_weights: bool,
    /// Context lengths in decoder tokens, comma-separated (those the decoder cannot hold are skipped).
    #[arg(long, value_delimiter = ',', default_values_t = [512usize, 1024, 2048, 4096, 8192], value_parser = positive_usize)]
    pub contexts: Vec<usize>,
    /// Decoder tokens per chunk, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = [8usize, 16, 32], value_parser = positive_usize)]
    pub ks: Vec<usize>,
    /// Fractions of chunks expanded on the REFRAG side, comma-separated (0 = the paper's headline
    /// full compression; 0.25 = generate's default).
    #[arg(long, value_delimiter = ',', default_values_t = [0.0f64, 0.25], value_parser = unit_interval)]
    pub p: Vec<f64>,
    /// Chunk-cache settings to measure.
    #[arg(long, value_enum, default_value_t = CacheArg::Both)]
    pub cache: CacheArg,
    /// Untimed runs per cell before measuring.
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// Timed runs per cell; the median is reported.
    #[arg(long, default_value_t = 3, value_parser = positive_usize)]
    pub repeats: usize,
    /// Tokens decoded after the first (for TTIT and throughput; EOS does not stop them).
    #[arg(long = "max_new", alias = "max-new", default_value_t = 8, value_parser = positive_usize)]
    pub max_new: usize,
    /// The question placed after the passages.
    #[arg(long, default_value = "Which river flows through City_10000?")]
    pub question: String,
    /// Peak f32 GFLOP/s of this machine, for the fraction-of-peak column [default: measured,
    /// the best of a few large square matrix products through the same BLAS the decoder uses].
    #[arg(long = "peak_gflops", alias = "peak-gflops", value_parser = positive_f64)]
    pub peak_gflops: Option<f64>,
    /// Output directory: bench.json, meta.json and ttft.svg.
    #[arg(long = "out_dir", alias = "out-dir", default_value = "runs/bench")]
    pub out_dir: PathBuf,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
}
