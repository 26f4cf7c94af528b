//! The training loop every command shares: per step, the scheduled learning rate, the step's
//! items and random generator (both from the seed and the step number only), micro-batches whose
//! gradients are accumulated, one clipped AdamW update; a progress bar with loss and step time;
//! a JSONL log every `log_every` steps; checkpoints every `save_every` steps, at the end and on
//! Ctrl-C; an evaluation on held-out data at the start and at the end (`eval.json`).
//!
//! A [`Task`] is what differs between commands: its trainable groups, the loss of a micro-batch,
//! the evaluation and the checkpoint's parts.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::backprop::GradStore;
use candle_core::Tensor;
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};

use super::optim::{AdamW, AdamWConfig, Group};
use super::parts::{self, Checkpoint, TrainState};
use super::schedule::{batch_items, step_rng, LrSchedule};
use crate::kernels::blas::threads::side_by_side;

/// Counts a micro-batch reports; summed over a step and over a logging window.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    /// Sum of the loss over micro-batches, and their number.
    pub loss: f64,
    pub micro: usize,
    pub tokens: usize,
    pub correct: usize,
    /// Other means to log (name -> (sum, count)).
    pub extra: BTreeMap<String, (f64, f64)>,
}

impl Stats {
    pub fn add(&mut self, o: &Stats) {
        self.loss += o.loss;
        self.micro += o.micro;
        self.tokens += o.tokens;
        self.correct += o.correct;
        for (k, (s, n)) in &o.extra {
            let e = self.extra.entry(k.clone()).or_default();
            e.0 += s;
            e.1 += n;
        }
    }

    /// Record one value of an extra mean.
    pub fn note(&mut self, key: &str, value: f64) {
        let e = self.extra.entry(key.to_string()).or_default();
        e.0 += value;
        e.1 += 1.0;
    }

    pub fn mean_loss(&self) -> f64 {
        self.loss / self.micro.max(1) as f64
    }

    pub fn accuracy(&self) -> Option<f64> {
        (self.tokens > 0).then(|| self.correct as f64 / self.tokens as f64)
    }
}

/// One micro-batch's differentiable loss and its counts.
pub struct Micro {
    pub loss: Tensor,
    pub stats: Stats,
}

/// A micro-batch's inputs as [`Task::draw`] drew them (its sequences, masks and random
/// choices), for [`Task::loss`]; each task downcasts its own kind.
pub type Drawn = Box<dyn std::any::Any + Send + Sync>;

/// What a training command trains. A step's micro-batches are drawn one by one in order on the
/// caller's thread (randomness, caches), then their losses and gradients may be computed side
/// by side on workers ([`LoopConfig::workers`]), so `loss` takes `&self`.
pub trait Task: Sync {
    /// `cpt_recon`, `cpt_next`, `sft` or `train_policy`.
    fn stage(&self) -> &'static str;
    /// The trainable variables, grouped by learning-rate scale.
    fn groups(&self) -> Vec<Group>;
    /// Number of training items (steps draw from `0..num_train()`).
    fn num_train(&self) -> usize;
    /// Decisions shared by the whole step (the curriculum's chunk count), before its micro-batches.
    fn begin_step(&mut self, _step: usize, _total: usize, _rng: &mut ChaCha8Rng) -> Result<()> {
        Ok(())
    }
    /// Draw the inputs of the training items `items`; `None` when they carry no signal.
    fn draw(&mut self, items: &[usize], rng: &mut ChaCha8Rng) -> Result<Option<Drawn>>;
    /// The differentiable loss of inputs this task drew.
    fn loss(&self, drawn: &Drawn) -> Result<Micro>;
    /// The loss of the training items `items` (drawn, then computed); `None` when they carry no
    /// signal.
    fn micro(&mut self, items: &[usize], rng: &mut ChaCha8Rng) -> Result<Option<Micro>> {
        match self.draw(items, rng)? {
            Some(d) => Ok(Some(self.loss(&d)?)),
            None => Ok(None),
        }
    }
    /// Metrics on the held-out split.
    fn evaluate(&mut self) -> Result<Value>;
    /// The parts of a checkpoint after `step` steps.
    fn checkpoint(&self, step: usize) -> Result<Checkpoint<'_>>;
}

/// Settings of the loop.
#[derive(Debug, Clone)]
pub struct LoopConfig {
    pub steps: usize,
    /// Items per optimiser step.
    pub batch_size: usize,
    /// Items per forward/backward pass.
    pub micro_batch: usize,
    pub schedule: LrSchedule,
    pub clip: f64,
    pub optimizer: AdamWConfig,
    pub log_every: usize,
    /// Checkpoint every N steps (0: only at the end).
    pub save_every: usize,
    pub out_dir: PathBuf,
    pub seed: u64,
    pub quiet: bool,
    /// Evaluate at the start and the end.
    pub eval: bool,
    /// Continue from the checkpoint in `out_dir` (its weights are already in the task).
    pub resume: Option<TrainState>,
    /// Compute a step's micro-batches side by side, one per BLAS thread with each product on
    /// its worker ([`crate::kernels::blas::threads::side_by_side`]); else one by one. Their
    /// gradients are summed in micro-batch order either way.
    pub workers: bool,
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Finished {
        step: usize,
    },
    /// Stopped by `stop` (Ctrl-C) after `step` steps, checkpoint saved.
    Interrupted {
        step: usize,
    },
}

/// Train `task` for `cfg.steps` steps (from the resumed step), honouring `stop`.
pub fn train(task: &mut dyn Task, cfg: &LoopConfig, stop: &AtomicBool) -> Result<Outcome> {
    let mut opt = AdamW::new(task.groups(), cfg.optimizer)?;
    let start = restore_optimizer(&mut opt, cfg)?;
    let stage = task.stage();
    eprintln!(
        "refrag: {stage}: {} trainable parameters, steps {start}..{} (batch {}, micro-batch {})",
        opt.num_params(),
        cfg.steps,
        cfg.batch_size,
        cfg.micro_batch
    );
    let mut evals = read_evals(&cfg.out_dir, cfg.resume.is_some())?;
    if cfg.eval && !evals.contains_key("start") {
        evaluate(task, cfg, &mut evals, "start", start)?;
    }
    let mut log = Log::open(&cfg.out_dir, cfg.resume.is_some())?;
    let bar = crate::progress::bar(
        cfg.steps,
        cfg.quiet,
        "{prefix} [{bar:30}] {pos}/{len} {msg} ({eta})",
    );
    bar.set_prefix(stage);
    bar.set_position(start as u64);
    let mut window = (Stats::default(), 0f64, 0usize);
    for step in start..cfg.steps {
        let t0 = Instant::now();
        let lr = cfg.schedule.at(step);
        let (stats, norm) = one_step(task, &mut opt, cfg, step, lr)?;
        let secs = t0.elapsed().as_secs_f64();
        window.0.add(&stats);
        window.1 += secs;
        window.2 += 1;
        bar.set_message(format!("loss {:.4} {:.2}s/step", stats.mean_loss(), secs));
        bar.inc(1);
        let done = step + 1;
        if done % cfg.log_every.max(1) == 0 || done == cfg.steps {
            log.write(done, lr, norm, &window)?;
            window = (Stats::default(), 0.0, 0);
        }
        if stop.load(Ordering::SeqCst) {
            save(task, &opt, cfg, done)?;
            bar.abandon();
            return Ok(Outcome::Interrupted { step: done });
        }
        if cfg.save_every > 0 && done % cfg.save_every == 0 && done < cfg.steps {
            save(task, &opt, cfg, done)?;
        }
    }
    bar.finish();
    let end = cfg.steps.max(start);
    save(task, &opt, cfg, end)?;
    if cfg.eval {
        evaluate(task, cfg, &mut evals, "end", end)?;
    }
    Ok(Outcome::Finished { step: end })
}

/// One optimiser step: micro-batches, accumulated gradients, update. Returns the step's counts
/// and the gradient norm before clipping.
fn one_step(
    task: &mut dyn Task,
    opt: &mut AdamW,
    cfg: &LoopConfig,
    step: usize,
    lr: f64,
) -> Result<(Stats, f64)> {
    let mut rng = step_rng(cfg.seed, step);
    task.begin_step(step, cfg.steps, &mut rng)?;
    let items = batch_items(task.num_train(), cfg.batch_size, cfg.seed, step);
    let mut acc = opt.zero_grads();
    let mut stats = Stats::default();
    let t = Instant::now();
    let mut drawn = Vec::new();
    for mb in items.chunks(cfg.micro_batch.max(1)) {
        drawn.extend(task.draw(mb, &mut rng)?);
    }
    let draw_sec = t.elapsed().as_secs_f64();
    let n = drawn.len();
    let (mut fwd, mut bwd) = (0f64, 0f64);
    let task: &dyn Task = task;
    let work = |i: usize| -> Result<(Stats, GradStore, f64, f64)> {
        let t = Instant::now();
        let m = task.loss(&drawn[i])?;
        let f = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let grads = m.loss.backward()?;
        Ok((m.stats, grads, f, t.elapsed().as_secs_f64()))
    };
    // Gradients are summed in micro-batch order whatever order the workers finish in (same
    // seed, same sums), each as soon as the ones before it are in.
    let mut waiting: Vec<Option<(Stats, GradStore)>> = (0..n).map(|_| None).collect();
    let mut next = 0;
    let mut take = |i: usize, r: Result<(Stats, GradStore, f64, f64)>| -> Result<()> {
        let (s, g, f, b) = r?;
        fwd += f;
        bwd += b;
        waiting[i] = Some((s, g));
        while let Some((s, g)) = waiting.get_mut(next).and_then(Option::take) {
            opt.accumulate(&mut acc, &g, 1.0)?;
            stats.add(&s);
            next += 1;
        }
        Ok(())
    };
    if cfg.workers {
        side_by_side(n, work, &mut take)?;
    } else {
        for i in 0..n {
            take(i, work(i))?;
        }
    }
    if n == 0 {
        return Ok((stats, 0.0));
    }
    let t = Instant::now();
    acc.scale(1.0 / n as f64)?;
    let norm = opt.step(&acc, lr, cfg.clip)?;
    // Where a step's time goes (drawing / forward / backward / optimiser), logged as means;
    // forward and backward are summed over the micro-batches, so side by side they add up the
    // workers' seconds, not the wall clock's.
    stats.note("draw_sec", draw_sec);
    stats.note("forward_sec", fwd);
    stats.note("backward_sec", bwd);
    stats.note("optimizer_sec", t.elapsed().as_secs_f64());
    Ok((stats, norm))
}

/// Load the optimiser moments of a resumed run; returns the step to start from.
fn restore_optimizer(opt: &mut AdamW, cfg: &LoopConfig) -> Result<usize> {
    let Some(state) = &cfg.resume else {
        return Ok(0);
    };
    let path = cfg.out_dir.join(parts::OPTIMIZER_FILE);
    if path.is_file() {
        let dev = opt
            .groups()
            .iter()
            .flat_map(|g| &g.vars)
            .next()
            .map(|v| v.1.device().clone())
            .unwrap_or(candle_core::Device::Cpu);
        opt.load(&path, state.optimizer_t, &dev)?;
    } else {
        eprintln!(
            "refrag: {} has no {}: AdamW moments restart from zero",
            cfg.out_dir.display(),
            parts::OPTIMIZER_FILE
        );
    }
    Ok(state.step)
}

fn save(task: &dyn Task, opt: &AdamW, cfg: &LoopConfig, step: usize) -> Result<()> {
    let ck = task.checkpoint(step)?;
    let state = TrainState {
        stage: task.stage().to_string(),
        step,
        steps: cfg.steps,
        seed: cfg.seed,
        optimizer_t: opt.t,
    };
    parts::write_checkpoint(&cfg.out_dir, &ck, opt, &state)
}

/// Evaluate, report on stderr, and record the result as `when` in `eval.json`.
fn evaluate(
    task: &mut dyn Task,
    cfg: &LoopConfig,
    evals: &mut BTreeMap<String, Value>,
    when: &str,
    step: usize,
) -> Result<()> {
    let stage = task.stage();
    let e = task
        .evaluate()
        .with_context(|| format!("evaluating at step {step} ({when})"))?;
    eprintln!("refrag: {stage}: eval at step {step}: {e}");
    evals.insert(when.into(), with_step(e, step));
    write_evals(&cfg.out_dir, stage, evals)
}

fn with_step(mut e: Value, step: usize) -> Value {
    if let Value::Object(m) = &mut e {
        m.insert("step".into(), json!(step));
    }
    e
}

fn read_evals(dir: &Path, resume: bool) -> Result<BTreeMap<String, Value>> {
    let p = dir.join("eval.json");
    if !resume || !p.is_file() {
        return Ok(BTreeMap::new());
    }
    let v: Value = crate::io::jsonio::read_json(&p)?;
    Ok(v.as_object()
        .map(|m| {
            m.iter()
                .filter(|(k, _)| k.as_str() == "start")
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        })
        .unwrap_or_default())
}

fn write_evals(dir: &Path, stage: &str, evals: &BTreeMap<String, Value>) -> Result<()> {
    let mut m = serde_json::Map::new();
    m.insert("stage".into(), json!(stage));
    for (k, v) in evals {
        m.insert(k.clone(), v.clone());
    }
    crate::io::jsonio::write_json(&dir.join("eval.json"), &Value::Object(m))
}

/// `train_log.jsonl`, appended to.
struct Log {
    file: std::fs::File,
    path: PathBuf,
    t0: Instant,
}

impl Log {
    fn open(dir: &Path, append: bool) -> Result<Self> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating --out_dir {}", dir.display()))?;
        let path = dir.join("train_log.jsonl");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(append)
            .write(true)
            .truncate(!append)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        Ok(Self {
            file,
            path,
            t0: Instant::now(),
        })
    }

    fn write(&mut self, step: usize, lr: f64, norm: f64, w: &(Stats, f64, usize)) -> Result<()> {
        let (stats, secs, n) = w;
        let mut line = json!({
            "step": step,
            "loss": stats.mean_loss(),
            "lr": lr,
            "grad_norm": norm,
            "sec_per_step": secs / (*n).max(1) as f64,
            "elapsed_sec": self.t0.elapsed().as_secs_f64(),
        });
        if let Some(a) = stats.accuracy() {
            line["token_acc"] = json!(a);
        }
        for (k, (s, c)) in &stats.extra {
            line[k] = json!(s / c.max(1.0));
        }
        writeln!(self.file, "{line}").with_context(|| format!("writing {}", self.path.display()))
    }
}
