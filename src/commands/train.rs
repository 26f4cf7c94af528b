//! `refrag cpt_recon`, `cpt_next`, `sft` and `train_policy`: check the flags, find where each
//! part's weights come from (the base models, `--load_dir`, or `--out_dir` itself with
//! `--resume`), build the task and run the shared training loop. Ctrl-C saves a checkpoint
//! after the current step and exits with status 130. Prints one JSON object (the evaluation)
//! on stdout at the end.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Once;

use anyhow::{bail, Result};
use candle_core::Device;
use candle_nn::VarMap;
use serde_json::json;

use crate::cli::{CptArgs, RuntimeArgs, SftArgs, TrainArgs, TrainPolicyArgs};
use crate::compression::encoder::{embedding_std, parse_pooling, DEFAULT_POOLING};
use crate::decoder::lora::LoraConfig;
use crate::decoder::DecoderTokenizer;
use crate::hub::{self, Role};
use crate::io::checkpoint::{self, RefragConfig};
use crate::retrieval::embed::Pooling;
use crate::select::policy::PolicyConfig;
use crate::train::cpt::{CptData, CptMode, CptSettings, CptTask};
use crate::train::encoder::{ProjectorInit, TrainEncoder};
use crate::train::optim::AdamWConfig;
use crate::train::parts::{self, DecoderTraining, TrainDecoder, TrainState};
use crate::train::policy::{init_policy_vars, policy_over, PolicyTask};
use crate::train::run::{self, LoopConfig, Outcome, Task};
use crate::train::schedule::{Curriculum, LrSchedule};
use crate::train::sft::{NextMix, SftTask};
use crate::{device, pipeline::Refrag};

mod qa;
use qa::{QaFlags, QaSetup};

/// Set by Ctrl-C; a second Ctrl-C quits at once.
fn stop_flag() -> &'static AtomicBool {
    static STOP: AtomicBool = AtomicBool::new(false);
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        let r = ctrlc::set_handler(|| {
            if STOP.swap(true, Ordering::SeqCst) {
                std::process::exit(130);
            }
            eprintln!("\nrefrag: interrupted: saving a checkpoint after this step (Ctrl-C again to quit now)");
        });
        if let Err(e) = r {
            eprintln!("refrag: cannot catch Ctrl-C ({e}); an interrupt will not save a checkpoint");
        }
    });
    &STOP
}

/// Check the shared training flags.
fn validate_train(t: &TrainArgs) -> Result<()> {
    if t.resume && t.force {
        bail!(
            "--resume and --force contradict each other (continue the checkpoint, or start over)"
        );
    }
    Ok(())
}

/// Where the run writes, and the checkpoint it resumes (`Some` with `--resume`).
fn out_dir_and_resume(t: &TrainArgs, stage: &str) -> Result<(PathBuf, Option<TrainState>)> {
    let dir = t
        .out_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from("runs").join(stage));
    crate::io::lock::hold_until_exit(&dir, "--out_dir")?;
    let state = parts::read_state(&dir)?;
    let has_ckpt = dir.join("config.json").is_file();
    match (t.resume, state) {
        (true, Some(s)) if has_ckpt => {
            if s.stage != stage {
                bail!("--resume: {} holds a {} checkpoint, not {stage}", dir.display(), s.stage);
            }
            Ok((dir, Some(s)))
        }
        (true, _) => bail!(
            "--resume: {} holds no {stage} checkpoint to continue (no config.json / {})",
            dir.display(),
            parts::STATE_FILE
        ),
        (false, _) if has_ckpt && !t.force => bail!(
            "--out_dir {} already holds a checkpoint; pass --resume to continue it or --force to start over",
            dir.display()
        ),
        (false, _) => Ok((dir, None)),
    }
}

/// Items per forward pass: `--micro_batch`, but no more than a step's share of each of the
/// `workers` the loop runs micro-batches on (one per BLAS thread, side by side): a step of one
/// micro-batch would run on one core and leave the others idle (`--batch_size 16 --micro_batch
/// 16` on two cores: one busy). The micro-batches in flight hold as many items as before.
fn micro_batch(batch: usize, asked: usize, workers: usize) -> usize {
    asked.min(batch).min(batch.div_ceil(workers.max(1)))
}

/// The loop settings from the flags.
fn loop_config(
    t: &TrainArgs,
    rt: &RuntimeArgs,
    dev: &Device,
    lr: f64,
    out_dir: PathBuf,
    resume: Option<TrainState>,
) -> LoopConfig {
    if let Some(s) = &resume {
        if s.steps != t.steps || s.seed != rt.seed {
            eprintln!(
                "refrag: note: the checkpoint was written by a run with --steps {} --seed {}; the schedule now follows --steps {} --seed {}",
                s.steps, s.seed, t.steps, rt.seed
            );
        }
    }
    // The workers are CPU threads each running its products on one BLAS thread: on a GPU a
    // step's micro-batches stay as asked.
    let workers = if dev.is_cpu() {
        crate::kernels::blas::threads::workers()
    } else {
        1
    };
    let micro_batch = micro_batch(t.batch_size, t.micro_batch, workers);
    if micro_batch < t.micro_batch.min(t.batch_size) {
        eprintln!(
            "refrag: micro-batches of {micro_batch}, so that a step's micro-batches run side by side on all {workers} cores (--micro_batch {} would leave some idle)",
            t.micro_batch
        );
    }
    LoopConfig {
        steps: t.steps,
        batch_size: t.batch_size,
        micro_batch,
        schedule: LrSchedule {
            peak: lr,
            warmup: t.warmup.unwrap_or((t.steps / 20).max(1)),
            total: t.steps,
            min_frac: 0.1,
        },
        clip: t.clip,
        optimizer: AdamWConfig {
            weight_decay: t.weight_decay,
            ..Default::default()
        },
        log_every: t.log_every,
        save_every: t.save_every,
        out_dir,
        seed: rt.seed,
        quiet: rt.quiet,
        eval: t.eval_items > 0,
        resume,
        // Micro-batches side by side on the BLAS's threads (one by one where it has one, as
        // with OPENBLAS_NUM_THREADS=1).
        workers: true,
    }
}

/// Run the loop and report: the evaluation on stdout, or exit 130 after an interrupt.
fn finish(task: &mut dyn Task, cfg: &LoopConfig) -> Result<()> {
    if let Some(note) = crate::kernels::blas::core::user_choice_note() {
        eprintln!("{note}");
    }
    // A training step is many mid-sized products between elementwise work, and OpenBLAS's
    // threads spin between them: on two cores a cpt_next step (batch 8) took 14 s with two BLAS
    // threads and 10 s with one BLAS and one rayon thread while a second run used the other
    // core. Unless OPENBLAS_NUM_THREADS says otherwise, products run on the calling thread and
    // a step's micro-batches on as many workers as the BLAS had threads (distilled cpt_next,
    // batch 8 in micro-batches of 4: 26.2 s a step one by one, 16.3 s side by side).
    let _one_thread = match std::env::var_os("OPENBLAS_NUM_THREADS") {
        None => crate::kernels::blas::threads::one_thread(),
        Some(_) => None,
    };
    match run::train(task, cfg, stop_flag())? {
        Outcome::Interrupted { step } => {
            eprintln!(
                "refrag: stopped after step {step}; checkpoint saved in {} (continue with --resume)",
                cfg.out_dir.display()
            );
            std::process::exit(130);
        }
        Outcome::Finished { step } => {
            let eval_path = cfg.out_dir.join("eval.json");
            let eval: serde_json::Value = if eval_path.is_file() {
                crate::io::jsonio::read_json(&eval_path)?
            } else {
                json!(null)
            };
            let out = json!({
                "stage": task.stage(),
                "out_dir": cfg.out_dir,
                "step": step,
                "eval": eval,
            });
            println!("{}", serde_json::to_string_pretty(&out)?);
            Ok(())
        }
    }
}

/// Where each part's weights come from.
struct Sources {
    enc: String,
    dec: String,
    pooling: Pooling,
    /// Directory whose `config.json` the run starts from (`--load_dir`, or `--out_dir` on resume).
    dir: Option<PathBuf>,
    cfg: Option<RefragConfig>,
}

impl Sources {
    fn resolve(
        enc: Option<&str>,
        dec: Option<&str>,
        pooling: Option<Pooling>,
        dir: Option<&Path>,
    ) -> Result<Self> {
        let cfg = dir.map(RefragConfig::read).transpose()?;
        let pick = |flag: Option<&str>,
                    saved: Option<&str>,
                    name: &str,
                    role: Role|
         -> Result<String> {
            match (flag, saved) {
                (Some(f), Some(s)) if f != s => bail!(
                    "--{name} {f} differs from the {name} the weights in {} were trained with ({s})",
                    dir.map(|d| d.display().to_string()).unwrap_or_default()
                ),
                (Some(f), _) => Ok(f.to_string()),
                (None, Some(s)) => Ok(s.to_string()),
                (None, None) => Ok(hub::model_arg(None, role)),
            }
        };
        let c = cfg.as_ref();
        let enc = pick(
            enc,
            c.map(|c| c.encoder_model.as_str()),
            "enc",
            Role::Encoder,
        )?;
        let dec = pick(
            dec,
            c.map(|c| c.decoder_model.as_str()),
            "dec",
            Role::Decoder,
        )?;
        let pooling = match (pooling, c) {
            // Mean-pooled weights may go on with segment pooling: the projector is widened.
            (Some(p), Some(c))
                if p.segments() > 1 && parse_pooling(&c.encoder_pooling)? == Pooling::Mean =>
            {
                p
            }
            (Some(p), Some(c)) if p != parse_pooling(&c.encoder_pooling)? => bail!(
                "--pooling {p} differs from the pooling the weights were trained with ({}); only mean-pooled weights widen, to seg4 or seg8",
                c.encoder_pooling
            ),
            (_, Some(c)) => parse_pooling(&c.encoder_pooling)?,
            (Some(p), None) => p,
            (None, None) => DEFAULT_POOLING,
        };
        Ok(Self {
            enc,
            dec,
            pooling,
            dir: dir.map(Path::to_path_buf),
            cfg,
        })
    }

    /// The directory holding `part`, when the starting weights have it.
    fn part(&self, part: &str) -> Option<&Path> {
        match (&self.dir, &self.cfg) {
            (Some(d), Some(c)) if c.has(part) => Some(d.as_path()),
            _ => None,
        }
    }

    fn warn_k(&self, k: usize) {
        if let Some(c) = &self.cfg {
            if c.k != k {
                eprintln!("refrag: note: the starting weights were trained with --k {}, this run uses --k {k}", c.k);
            }
        }
    }

    /// The decoder, then the encoder + projector sized and scaled for it.
    fn load_models(
        &self,
        training: &DecoderTraining,
        seed: u64,
        dev: &Device,
    ) -> Result<(TrainDecoder, TrainEncoder)> {
        let lora = match (
            self.part("decoder_lora"),
            self.cfg.as_ref().and_then(|c| c.lora.as_ref()),
        ) {
            (Some(d), Some(c)) => Some((d, c)),
            _ => None,
        };
        let dec = parts::load_decoder(&self.dec, self.part("decoder"), lora, training, dev)?;
        let enc_file = self
            .part("encoder")
            .map(|d| checkpoint::part_path(d, "encoder"));
        let proj_file = self
            .part("projector")
            .map(|d| checkpoint::part_path(d, "projector"));
        let widen = self
            .cfg
            .as_ref()
            .is_some_and(|c| c.encoder_pooling != self.pooling.to_string());
        let init = match &proj_file {
            Some(p) if widen => {
                eprintln!(
                    "refrag: widening the projector of {} from mean to {} pooling",
                    p.display(),
                    self.pooling
                );
                ProjectorInit::Widen(p)
            }
            Some(p) => ProjectorInit::File(p),
            None => ProjectorInit::Fresh {
                out_std: embedding_std(&dec.decoder)?,
                seed,
            },
        };
        let enc = TrainEncoder::load(
            &self.enc,
            enc_file.as_deref(),
            self.pooling,
            dec.decoder.hidden_size(),
            init,
            dev,
        )?;
        Ok((dec, enc))
    }
}

/// LoRA rank of the decoder where it trains, unless `--lora_rank` says otherwise.
pub const DEFAULT_LORA_RANK: usize = 8;

/// How the decoder trains: frozen (`--freeze_dec`, or `frozen_default` and no `--lora_rank`),
/// fully (`--lora_rank 0`), or through a low-rank adapter of `rank` on every projection.
fn decoder_training(freeze: bool, rank: usize, frozen_default: bool, seed: u64) -> DecoderTraining {
    if freeze || frozen_default {
        DecoderTraining::Frozen
    } else if rank == 0 {
        DecoderTraining::Full
    } else {
        DecoderTraining::Lora(LoraConfig::all(rank, seed))
    }
}

/// `cpt_recon` and `cpt_next`.
pub fn run_cpt(a: &CptArgs, mode: CptMode) -> Result<()> {
    validate_train(&a.train)?;
    let stage = if mode == CptMode::Recon {
        "cpt_recon"
    } else {
        "cpt_next"
    };
    let curriculum = match &a.curriculum {
        Some(s) => Curriculum::parse(s)?,
        None => Curriculum::default_for(a.max_chunks),
    };
    let (out_dir, resume) = out_dir_and_resume(&a.train, stage)?;
    let start = if resume.is_some() {
        Some(out_dir.as_path())
    } else {
        a.load_dir.as_deref()
    };
    let src = Sources::resolve(
        a.models.enc.as_deref(),
        a.models.dec.as_deref(),
        a.pooling,
        start,
    )?;
    src.warn_k(a.k);
    let dev = device::select(a.runtime.device)?;
    let training = decoder_training(
        a.freeze_dec,
        a.lora_rank.unwrap_or(if mode == CptMode::Recon {
            0
        } else {
            DEFAULT_LORA_RANK
        }),
        mode == CptMode::Recon && a.lora_rank.is_none(),
        a.runtime.seed,
    );
    if a.enc_lr.is_some() && a.freeze_enc {
        bail!("--enc_lr: the encoder is frozen (--freeze_enc), so it has no learning rate");
    }
    // Missing data fails before the models load.
    for (flag, path) in [
        ("--train_json", Some(&a.train_json)),
        ("--eval_json", a.eval_json.as_ref()),
    ] {
        if let Some(p) = path.filter(|p| !p.is_file()) {
            bail!("{flag} {}: no such file", p.display());
        }
    }
    let (dec, mut enc) = src.load_models(&training, a.runtime.seed, &dev)?;
    enc.frozen = a.freeze_enc;
    let data = match &a.eval_json {
        Some(e) => {
            CptData::load_with_eval(&a.train_json, e, &dec.tok, a.train.eval_items, a.s, a.o)?
        }
        None => CptData::load(&a.train_json, &dec.tok, a.train.eval_items, a.s, a.o)
            .map_err(|err| anyhow::anyhow!("--train_json {}: {err:#}", a.train_json.display()))?,
    };
    let lr = a
        .train
        .lr
        .unwrap_or(if mode == CptMode::Recon { 2e-4 } else { 5e-5 });
    let settings = CptSettings {
        mode,
        k: a.k,
        curriculum,
        expand_frac: a.expand_frac,
        distill: a.distill,
        dec_lr_scale: a.dec_lr.map_or(0.2, |d| d / lr),
        eval_batch: a.train.micro_batch,
    };
    enc.lr_scale = a.enc_lr.map_or(1.0, |e| e / lr);
    let mut task = CptTask::new(settings, enc, dec, data, &src.dec)?;
    let cfg = loop_config(&a.train, &a.runtime, &dev, lr, out_dir, resume);
    finish(&mut task, &cfg)
}

/// `sft`.
pub fn run_sft(a: &SftArgs) -> Result<()> {
    validate_train(&a.train)?;
    if let Some(p) = a.next_json.as_ref().filter(|p| !p.is_file()) {
        bail!("--next_json {}: no such file", p.display());
    }
    let q = QaSetup::open(
        "sft",
        QaFlags {
            train: &a.train,
            runtime: &a.runtime,
            qa: &a.qa,
            k: a.k,
            ctx_max: a.ctx_max,
            load_dir: a.load_dir.as_deref(),
        },
    )?;
    let training = decoder_training(
        a.freeze_dec,
        a.lora_rank.unwrap_or(DEFAULT_LORA_RANK),
        false,
        a.runtime.seed,
    );
    let (dec, enc) = q.src.load_models(&training, a.runtime.seed, &q.dev)?;
    let next = match &a.next_json {
        Some(p) => Some(NextMix {
            data: next_mix_data(p, &dec.tok)?,
            expand_frac: a.next_expand_frac,
            weight: a.next_weight,
            distill: a.next_distill,
        }),
        None => None,
    };
    let lr = a.train.lr.unwrap_or(2e-5);
    let mut task = SftTask {
        enc,
        dec,
        data: q.data,
        retriever: std::sync::Mutex::new(Box::new(q.retriever)),
        layout: q.layout,
        dec_name: q.src.dec.clone(),
        dec_lr_scale: a.dec_lr.map_or(1.0, |d| d / lr),
        eval_batch: a.train.micro_batch,
        expand_max: a.expand_max,
        gold_expand: a.gold_expand,
        next,
    };
    let cfg = loop_config(&a.train, &a.runtime, &q.dev, lr, q.out_dir, q.resume);
    finish(&mut task, &cfg)
}

/// The items of `sft --next_json`, every one with a continuation to predict.
fn next_mix_data(path: &Path, tok: &DecoderTokenizer) -> Result<CptData> {
    let mut d = CptData::load(path, tok, 0, None, None)
        .map_err(|e| anyhow::anyhow!("--next_json {}: {e:#}", path.display()))?;
    d.train.retain(|&i| d.o[i] > 0);
    if d.train.is_empty() {
        bail!(
            "--next_json {}: no item has continuation tokens after its context",
            path.display()
        );
    }
    Ok(d)
}

/// The policy's variables: from the starting weights when they hold a policy of this width
/// (always on resume, where a mismatch is an error), else fresh from `seed`.
fn policy_vars(
    src: &Sources,
    pc: &PolicyConfig,
    resume: bool,
    seed: u64,
    dev: &Device,
) -> Result<VarMap> {
    let vars = VarMap::new();
    init_policy_vars(&vars, pc, seed, dev)?;
    if let Some(dir) = src.part("policy") {
        let same = src.cfg.as_ref().and_then(|c| c.policy_hidden) == Some(pc.hidden);
        if resume || same {
            checkpoint::load_varmap_strict(&vars, &checkpoint::part_path(dir, "policy"), dev)?;
        } else {
            eprintln!(
                "refrag: note: the policy in {} has another --policy_hidden; starting a fresh one",
                dir.display()
            );
        }
    }
    Ok(vars)
}

/// `train_policy`.
pub fn run_policy(a: &TrainPolicyArgs) -> Result<()> {
    validate_train(&a.train)?;
    let c = &a.compress;
    let q = QaSetup::open(
        "train_policy",
        QaFlags {
            train: &a.train,
            runtime: &a.runtime,
            qa: &a.qa,
            k: c.k,
            ctx_max: c.ctx_max,
            load_dir: c.load_dir.as_deref(),
        },
    )?;
    let enc_arg = if q.start.is_some() {
        None
    } else {
        Some(q.src.enc.as_str())
    };
    let refrag = Refrag::load_with(
        enc_arg,
        &q.src.dec,
        q.start.as_deref(),
        a.runtime.seed,
        &q.dev,
        c.quantized,
    )?;
    let pc = PolicyConfig {
        d: refrag.decoder.hidden_size(),
        hidden: a.policy_hidden,
    };
    let vars = policy_vars(&q.src, &pc, q.resume.is_some(), a.runtime.seed, &q.dev)?;
    let policy = policy_over(&vars, &pc, &q.dev)?;
    let mut task = PolicyTask {
        refrag,
        policy,
        vars,
        hidden: a.policy_hidden,
        data: q.data,
        retriever: std::sync::Mutex::new(Box::new(q.retriever)),
        layout: q.layout,
        p: c.p,
        group: a.group,
        load_dir: q.start,
        encoder_model: q.src.enc.clone(),
        warm_start: a.warm_start,
        step: 0,
    };
    let cfg = loop_config(
        &a.train,
        &a.runtime,
        &q.dev,
        a.train.lr.unwrap_or(1e-4),
        q.out_dir,
        q.resume,
    );
    finish(&mut task, &cfg)
}

#[cfg(test)]
mod tests {
    use super::micro_batch;

    #[test]
    fn a_step_is_split_over_the_workers() {
        assert_eq!(micro_batch(16, 16, 2), 8);
        assert_eq!(micro_batch(16, 4, 2), 4);
        assert_eq!(micro_batch(3, 3, 2), 2);
        assert_eq!(micro_batch(16, 16, 1), 16);
        assert_eq!(micro_batch(2, 8, 1), 2);
        assert_eq!(micro_batch(1, 1, 4), 1);
    }
}
