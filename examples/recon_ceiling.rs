//! How much of a 16-token chunk can the decoder read back from one input vector at all?
//!
//! Reconstruction (CPT-A) asks the decoder to repeat a chunk from its one projected vector. The
//! shipped encoder + projector reach some perplexity; this measures the decoder's side of the
//! bound: for each held-out chunk, one free 576-value vector optimised directly (Adam on the
//! vector alone, decoder frozen with the shipped adapter, the same teacher-forced layout as
//! `cpt_recon`'s evaluation: BOS, the vector, the chunk's tokens). If free vectors reconstruct
//! far better than the encoder's, the encoder and projector are the bottleneck (capacity and
//! training), not the decoder's ability to read one vector.
//!
//! ```text
//! cargo run --release --example recon_ceiling -- --text runs/squad/dev_corpus.txt \
//!   --weights weights --items 16 --steps 150 --lr 0.01
//! ```
//!
//! Prints, every `--log_every` steps, the windows' perplexity and token accuracy; the first
//! line (step 0) is the starting vector (`--init mean`: the mean of the chunk's token
//! embeddings; `--init encoder`: the trained encoder + projector's, so that `--steps 0` scores
//! the compressor on the same windows), and a no-chunk line gives the baseline (BOS, then the
//! tokens).

use std::path::PathBuf;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use clap::Parser;
use refrag::compression::encoder::parse_pooling;
use refrag::io::checkpoint::{part_path, RefragConfig};
use refrag::train::encoder::{ProjectorInit, TrainEncoder};
use refrag::train::parts::{load_decoder, DecoderTraining};
use refrag::train::seq::{forward_with_tables, perplexity, Seq, SeqOut};

#[derive(Parser)]
#[command(rename_all = "snake_case")]
struct Args {
    /// Held-out text, one paragraph per line.
    #[arg(long)]
    text: PathBuf,
    /// Weights directory whose decoder model and adapter to use.
    #[arg(long, default_value = "weights")]
    weights: PathBuf,
    /// Paragraphs (one 16-token window each: the first).
    #[arg(long, default_value_t = 16)]
    items: usize,
    #[arg(long, default_value_t = 16)]
    k: usize,
    #[arg(long, default_value_t = 150)]
    steps: usize,
    #[arg(long, default_value_t = 0.01)]
    lr: f64,
    #[arg(long, default_value_t = 10)]
    log_every: usize,
    /// Where each vector starts: `mean` (of the chunk's token embeddings) or `encoder` (the
    /// weights' own encoder + projector output for the chunk: step 0 is then what the trained
    /// compressor gives on these very windows).
    #[arg(long, default_value = "mean")]
    init: String,
    /// Multiply every starting vector by this (how much the input's length, not its
    /// direction, matters to the decoder: with `--steps 0`, a free rescaling of the
    /// compressor's own output).
    #[arg(long, default_value_t = 1.0)]
    scale: f64,
}

fn main() -> Result<()> {
    let a = Args::parse();
    let dev = Device::Cpu;
    let cfg = RefragConfig::read(&a.weights)?;
    let lora = cfg
        .lora
        .as_ref()
        .filter(|_| cfg.has("decoder_lora"))
        .map(|c| (a.weights.as_path(), c));
    let dec = load_decoder(
        &cfg.decoder_model,
        None,
        lora,
        &DecoderTraining::Frozen,
        &dev,
    )?;
    let text = std::fs::read_to_string(&a.text).with_context(|| a.text.display().to_string())?;
    let bos = dec.tok.bos_id();
    let mut windows = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let t = dec.tok.encode(line, false)?;
        if t.len() >= a.k {
            windows.push(t[..a.k].to_vec());
        }
        if windows.len() == a.items {
            break;
        }
    }
    let n = windows.len();
    eprintln!("{n} windows of {} tokens from {}", a.k, a.text.display());
    let seqs: Vec<Seq> = windows
        .iter()
        .map(|t| Seq::reconstruction(t, a.k, bos))
        .collect();
    let plain: Vec<Seq> = windows.iter().map(|t| Seq::no_context(bos, t)).collect();
    let base = forward_with_tables(&dec.decoder, &plain, vec![None; n], None)?;
    report("no chunk", &base)?;
    let starts: Vec<Tensor> = match a.init.as_str() {
        "mean" => windows
            .iter()
            .map(|t| {
                let ids = Tensor::new(t.as_slice(), &dev)?;
                let e = dec.decoder.embed(&ids)?.to_dtype(DType::F32)?;
                Ok(e.mean_keepdim(0)?)
            })
            .collect::<Result<_>>()?,
        "encoder" => {
            let enc = TrainEncoder::load(
                &cfg.encoder_model,
                Some(&part_path(&a.weights, "encoder")),
                parse_pooling(&cfg.encoder_pooling)?,
                dec.decoder.hidden_size(),
                ProjectorInit::File(&part_path(&a.weights, "projector")),
                &dev,
            )?;
            let texts = windows
                .iter()
                .map(|t| dec.tok.decode(t))
                .collect::<Result<Vec<_>>>()?;
            let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
            let e = enc.embed(&refs)?.detach();
            (0..n)
                .map(|i| Ok(e.narrow(0, i, 1)?.contiguous()?))
                .collect::<Result<_>>()?
        }
        other => anyhow::bail!("--init {other}: expected mean or encoder"),
    };
    let vars = starts
        .iter()
        .map(|t| Ok(Var::from_tensor(&(t * a.scale)?)?))
        .collect::<Result<Vec<Var>>>()?;
    let mut opt = AdamW::new(
        vars.clone(),
        ParamsAdamW {
            lr: a.lr,
            weight_decay: 0.0,
            ..Default::default()
        },
    )?;
    let t0 = std::time::Instant::now();
    for step in 0..=a.steps {
        let tables = vars.iter().map(|v| Some(v.as_tensor().clone())).collect();
        let out = forward_with_tables(&dec.decoder, &seqs, tables, None)?;
        if step % a.log_every == 0 || step == a.steps {
            let norm: f32 = vars
                .iter()
                .map(|v| v.as_tensor().sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>())
                .sum::<candle_core::Result<f32>>()?
                / n as f32;
            report(
                &format!(
                    "step {step} ({:.0} s, mean |v| {norm:.2})",
                    t0.elapsed().as_secs_f64()
                ),
                &out,
            )?;
        }
        if step < a.steps {
            opt.backward_step(&out.loss)?;
        }
    }
    Ok(())
}

/// Perplexity of the mean loss over every target, and token accuracy.
fn report(what: &str, out: &SeqOut) -> Result<()> {
    let nll = f64::from(out.loss.to_scalar::<f32>()?);
    println!(
        "{what}: ppl {:.2}, token acc {:.3}",
        perplexity(nll),
        out.correct as f64 / out.tokens.max(1) as f64
    );
    Ok(())
}
