//! Training on tiny random models (seconds, nothing downloads): one optimiser step lowers each
//! command's loss on a fixed batch, a few dozen reconstruction steps raise token accuracy, a
//! resumed run continues exactly the same schedule, the same seed gives the same weights, and
//! the policy's log-probability is that of exactly the sampled sequence.

mod train_fixture;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::Result;
use candle_core::{Device, Tensor};
use candle_nn::VarMap;
use rand_chacha::ChaCha8Rng;
use refrag::compression::encoder::embedding_std;
use refrag::io::schema::{CptItem, Split};
use refrag::retrieval::embed::Pooling;
use refrag::retrieval::search::RetrievalMode;
use refrag::retrieval::search::{Hit, Retrieve};
use refrag::select::policy::{Policy, PolicyConfig};
use refrag::train::cpt::{CptData, CptMode, CptSettings, CptTask};
use refrag::train::encoder::{ProjectorInit, TrainEncoder};
use refrag::train::optim::{AdamW, AdamWConfig};
use refrag::train::parts::{self, Checkpoint, TrainDecoder};
use refrag::train::policy::{
    answer_mass_loss, init_policy_vars, order_mask, policy_over, reinforce_loss, sample_order,
};
use refrag::train::qa::{answer_chunks, qa_layout, QaData, QaLayoutArgs};
use refrag::train::run::{self, Drawn, LoopConfig, Micro, Outcome, Task};
use refrag::train::schedule::{step_rng, Curriculum, LrSchedule};
use refrag::train::seq::Seq;
use refrag::train::sft::{NextMix, SftTask};
use serde_json::Value;
use train_fixture::{cpt_items, passage, qa_pairs, Fixture};

fn dev() -> Device {
    Device::Cpu
}

fn models(f: &Fixture, dec_trainable: bool, seed: u64) -> (TrainDecoder, TrainEncoder) {
    let training = if dec_trainable {
        parts::DecoderTraining::Full
    } else {
        parts::DecoderTraining::Frozen
    };
    let dec = f.decoder(training);
    let init = ProjectorInit::Fresh {
        out_std: embedding_std(&dec.decoder).unwrap(),
        seed,
    };
    let d = dec.decoder.hidden_size();
    let enc = TrainEncoder::load(&f.s("enc"), None, Pooling::Mean, d, init, &dev()).unwrap();
    (dec, enc)
}

fn cpt_task(f: &Fixture, mode: CptMode, seed: u64) -> CptTask {
    let (dec, enc) = models(f, mode == CptMode::Next, seed);
    let data = CptData::from_items(&cpt_items(8), &dec.tok, 2, None, None).unwrap();
    let settings = CptSettings {
        mode,
        k: 4,
        curriculum: Curriculum::default_for(2),
        expand_frac: 0.25,
        dec_lr_scale: 1.0,
        eval_batch: 2,
        distill: 0.0,
    };
    CptTask::new(settings, enc, dec, data, &f.s("dec")).unwrap()
}

/// Retrieves the passage about the question's city and the next one.
struct FakeRetriever;

impl Retrieve for FakeRetriever {
    fn retrieve(&self, question: &str, topk: usize, _: RetrievalMode) -> Result<Vec<Hit>> {
        let i: usize = question
            .trim_end_matches('?')
            .rsplit('_')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        Ok((i..i + topk)
            .map(|id| Hit {
                id,
                score: 1.0,
                text: passage(id),
                dense_rank: None,
                lexical_rank: None,
            })
            .collect())
    }
}

fn sft_task(f: &Fixture) -> SftTask {
    let (dec, enc) = models(f, true, 0);
    SftTask {
        enc,
        dec,
        data: QaData::new(qa_pairs(8), 2).unwrap(),
        retriever: std::sync::Mutex::new(Box::new(FakeRetriever)),
        layout: QaLayoutArgs {
            topk: 2,
            mode: RetrievalMode::Hybrid,
            k: 4,
            ctx_max: 256,
        },
        dec_name: f.s("dec"),
        dec_lr_scale: 1.0,
        eval_batch: 2,
        expand_max: 1.0,
        gold_expand: 0.0,
        next: None,
    }
}

/// `sft_task` with next-paragraph sequences of the CPT items mixed in at `weight`.
fn mixed_sft_task(f: &Fixture, weight: f64) -> SftTask {
    let mut t = sft_task(f);
    let data = CptData::from_items(&cpt_items(8), &t.dec.tok, 0, None, None).unwrap();
    t.next = Some(NextMix {
        data,
        expand_frac: 0.25,
        weight,
        distill: 0.0,
    });
    t
}

/// The loss of items 0 and 1 with a fixed generator, before and after one AdamW step on it.
fn losses_around_one_step(task: &mut dyn Task, lr: f64) -> (f32, f32) {
    let mut opt = AdamW::new(task.groups(), AdamWConfig::default()).unwrap();
    task.begin_step(99, 100, &mut step_rng(3, 0)).unwrap();
    let loss = |task: &mut dyn Task| -> Micro {
        task.micro(&[0, 1], &mut step_rng(3, 1)).unwrap().unwrap()
    };
    let m = loss(task);
    let before = m.loss.to_scalar::<f32>().unwrap();
    let mut acc = opt.zero_grads();
    opt.accumulate(&mut acc, &m.loss.backward().unwrap(), 1.0)
        .unwrap();
    opt.step(&acc, lr, 0.0).unwrap();
    (before, loss(task).loss.to_scalar::<f32>().unwrap())
}

#[test]
fn one_step_lowers_the_reconstruction_loss() {
    let f = Fixture::new();
    let (a, b) = losses_around_one_step(&mut cpt_task(&f, CptMode::Recon, 0), 1e-3);
    assert!(b < a, "cpt_recon: {a} -> {b}");
}

#[test]
fn one_step_lowers_the_next_paragraph_loss() {
    let f = Fixture::new();
    let (a, b) = losses_around_one_step(&mut cpt_task(&f, CptMode::Next, 0), 1e-4);
    assert!(b < a, "cpt_next: {a} -> {b}");
}

#[test]
fn one_step_lowers_the_answer_loss() {
    let f = Fixture::new();
    let (a, b) = losses_around_one_step(&mut sft_task(&f), 1e-4);
    assert!(b < a, "sft: {a} -> {b}");
}

#[test]
fn mixed_next_paragraph_loss_adds_to_the_answer_loss_at_its_weight() {
    let f = Fixture::new();
    let micro = |mut t: SftTask| t.micro(&[0, 1], &mut step_rng(3, 1)).unwrap().unwrap();
    let plain = micro(sft_task(&f));
    let (one, two) = (
        micro(mixed_sft_task(&f, 1.0)),
        micro(mixed_sft_task(&f, 2.0)),
    );
    let loss = |m: &Micro| m.loss.to_scalar::<f32>().unwrap();
    let next = one.stats.extra["next_loss"];
    assert_eq!(next.1, 1.0);
    assert!(next.0 > 0.0);
    // The answer part is the unmixed run's (the next-paragraph draws come after its draws),
    // exactly: the fixture keeps every product of this binary on one BLAS thread.
    assert_eq!(one.stats.loss, plain.stats.loss);
    assert!((loss(&one) - loss(&plain) - next.0 as f32).abs() < 1e-4);
    assert!((loss(&two) - loss(&plain) - 2.0 * next.0 as f32).abs() < 1e-4);
    assert!(!plain.stats.extra.contains_key("next_loss"));
}

#[test]
fn one_step_lowers_the_mixed_sft_loss() {
    let f = Fixture::new();
    let (a, b) = losses_around_one_step(&mut mixed_sft_task(&f, 1.0), 1e-4);
    assert!(b < a, "sft + next: {a} -> {b}");
}

/// A next-paragraph task distilling at `distill`, with `expand_frac` of the chunks expanded.
fn distilled_task(f: &Fixture, distill: f64, expand_frac: f64) -> CptTask {
    let mut t = cpt_task(f, CptMode::Next, 0);
    t.settings.distill = distill;
    t.settings.expand_frac = expand_frac;
    t
}

#[test]
fn distillation_adds_its_weighted_kl_which_vanishes_when_every_chunk_is_expanded() {
    let f = Fixture::new();
    let micro = |mut t: CptTask| {
        t.begin_step(99, 100, &mut step_rng(3, 0)).unwrap();
        t.micro(&[0, 1], &mut step_rng(3, 1)).unwrap().unwrap()
    };
    let loss = |m: &Micro| f64::from(m.loss.to_scalar::<f32>().unwrap());
    let plain = micro(distilled_task(&f, 0.0, 0.25));
    let (one, two) = (
        micro(distilled_task(&f, 1.0, 0.25)),
        micro(distilled_task(&f, 2.0, 0.25)),
    );
    assert!(!plain.stats.extra.contains_key("distill_kl"));
    let kl = one.stats.extra["distill_kl"].0;
    assert!(kl > 1e-4, "compressed against full context: KL {kl}");
    assert_eq!(two.stats.extra["distill_kl"].0, kl);
    // The added term is linear in its weight: soft cross-entropy = KL + teacher entropy.
    let (d1, d2) = (loss(&one) - loss(&plain), loss(&two) - loss(&plain));
    assert!(d1 > kl - 1e-4, "added {d1} below the KL {kl}");
    assert!((d2 - 2.0 * d1).abs() < 1e-3, "{d2} vs 2 x {d1}");
    // With every chunk expanded the student reads what the teacher reads.
    let same = micro(distilled_task(&f, 1.0, 1.0));
    let kl = same.stats.extra["distill_kl"].0;
    assert!(kl.abs() < 1e-4, "full context against itself: KL {kl}");
}

#[test]
fn one_step_lowers_the_distilled_next_paragraph_loss() {
    let f = Fixture::new();
    let (a, b) = losses_around_one_step(&mut distilled_task(&f, 1.0, 0.25), 1e-4);
    assert!(b < a, "cpt_next --distill 1: {a} -> {b}");
}

/// A small seeded policy over six random chunks, a question vector and position features.
struct ToyPolicy {
    vars: VarMap,
    policy: Policy,
    chunks: Tensor,
    q: Tensor,
    pos: Tensor,
}

fn toy_policy(seed: u64) -> ToyPolicy {
    let d = dev();
    let cfg = PolicyConfig { d: 16, hidden: 8 };
    let vars = VarMap::new();
    init_policy_vars(&vars, &cfg, seed, &d).unwrap();
    let policy = policy_over(&vars, &cfg, &d).unwrap();
    ToyPolicy {
        vars,
        policy,
        chunks: Tensor::randn(0f32, 1.0, (6, 16), &d).unwrap(),
        q: Tensor::randn(0f32, 1.0, 16, &d).unwrap(),
        pos: Tensor::randn(
            0f32,
            1.0,
            (6, refrag::select::policy::POSITION_FEATURES),
            &d,
        )
        .unwrap(),
    }
}

/// One AdamW step of the policy's variables on `loss`.
fn policy_step(vars: &VarMap, loss: &Tensor, lr: f64) {
    let group = refrag::train::optim::Group {
        name: "policy".into(),
        vars: refrag::train::vars::named_vars(vars),
        lr_scale: 1.0,
    };
    let mut opt = AdamW::new(vec![group], AdamWConfig::default()).unwrap();
    let mut acc = opt.zero_grads();
    opt.accumulate(&mut acc, &loss.backward().unwrap(), 1.0)
        .unwrap();
    opt.step(&acc, lr, 0.0).unwrap();
}

#[test]
fn one_step_lowers_the_policy_surrogate_on_fixed_samples() {
    let ToyPolicy {
        vars,
        policy,
        chunks,
        q,
        pos,
    } = toy_policy(1);
    let s: Vec<f32> = policy.scores(&chunks, &q, &pos).unwrap().to_vec1().unwrap();
    let mut rng = step_rng(0, 0);
    let orders: Vec<Vec<usize>> = (0..4).map(|_| sample_order(&s, 2, &mut rng)).collect();
    let adv = [1.0, -1.0, 0.5, -0.5];
    let loss =
        |p: &Policy| reinforce_loss(&p.scores(&chunks, &q, &pos).unwrap(), &orders, &adv).unwrap();
    let before = loss(&policy);
    policy_step(&vars, &before, 1e-2);
    let (a, b) = (
        before.to_scalar::<f32>().unwrap(),
        loss(&policy).to_scalar::<f32>().unwrap(),
    );
    assert!(b < a, "policy: {a} -> {b}");
}

#[test]
fn sampled_orders_are_sets_of_n_and_log_prob_is_sequential_plackett_luce() {
    let scores = [0.5f32, 2.0, -1.0, 1.0];
    let mut rng = step_rng(1, 2);
    let mut first = [0usize; 4];
    for _ in 0..20_000 {
        let o = sample_order(&scores, 2, &mut rng);
        let m = order_mask(&o, 4);
        assert_eq!(m.iter().filter(|&&x| x).count(), 2);
        assert!(o.iter().all(|&i| m[i]) && o[0] != o[1]);
        first[o[0]] += 1;
    }
    // The first pick follows softmax(scores).
    let z: f32 = scores.iter().map(|s| s.exp()).sum();
    for (i, s) in scores.iter().enumerate() {
        let p = first[i] as f32 / 20_000.0;
        assert!(
            (p - s.exp() / z).abs() < 0.015,
            "chunk {i}: {p} vs {}",
            s.exp() / z
        );
    }
    let t = Tensor::new(&scores, &dev()).unwrap();
    let got: f32 = Policy::log_prob(&t, &[3, 0]).unwrap().to_scalar().unwrap();
    let e: Vec<f32> = scores.iter().map(|s| s.exp()).collect();
    let want = (e[3] / z).ln() + (e[0] / (z - e[3])).ln();
    assert!((got - want).abs() < 1e-5, "{got} vs {want}");
}

fn loop_config(dir: &Path, steps: usize, seed: u64, resume: bool) -> LoopConfig {
    LoopConfig {
        steps,
        batch_size: 2,
        micro_batch: 2,
        schedule: LrSchedule {
            peak: 3e-3,
            warmup: 2,
            total: steps,
            min_frac: 0.1,
        },
        clip: 1.0,
        optimizer: AdamWConfig::default(),
        log_every: 1,
        save_every: 0,
        out_dir: dir.to_path_buf(),
        seed,
        quiet: true,
        eval: true,
        resume: if resume {
            parts::read_state(dir).unwrap()
        } else {
            None
        },
        workers: false,
    }
}

/// Token accuracy of reconstructing every window of `chunks * k` tokens of the training items.
fn window_accuracy(task: &CptTask, chunks: usize) -> f64 {
    let n = chunks * task.settings.k;
    let mut seqs = Vec::new();
    for &i in &task.data.train {
        let t = &task.data.tokens[i];
        for off in 0..=t.len() - n {
            let bos = task.dec.tok.bos_id();
            seqs.push(Seq::reconstruction(&t[off..off + n], task.settings.k, bos));
        }
    }
    let out = task.forward(&seqs, false).unwrap();
    out.correct as f64 / out.tokens as f64
}

#[test]
fn training_drives_reconstruction_accuracy_up() {
    // Short texts (16 tokens each), one chunk of 4 tokens: the tiny random decoder is no language
    // model, so the encoder must learn to steer it; 200 steps of a few ms each.
    let f = Fixture::new();
    let (dec, _) = models(&f, false, 0);
    let init = ProjectorInit::Fresh {
        out_std: embedding_std(&dec.decoder).unwrap(),
        seed: 0,
    };
    let enc = TrainEncoder::load(&f.s("enc"), None, Pooling::Cls, 64, init, &dev()).unwrap();
    let items: Vec<CptItem> = (0..8)
        .map(|i| CptItem {
            id: format!("{i}"),
            tokens: format!("City_{} River_{}", 10 + i * 7, 300 + i * 13),
            split: Split { s: 8, o: 8 },
        })
        .collect();
    let data = CptData::from_items(&items, &dec.tok, 2, None, None).unwrap();
    let settings = CptSettings {
        mode: CptMode::Recon,
        k: 4,
        curriculum: Curriculum::default_for(1),
        expand_frac: 0.0,
        dec_lr_scale: 1.0,
        eval_batch: 2,
        distill: 0.0,
    };
    let mut task = CptTask::new(settings, enc, dec, data, &f.s("dec")).unwrap();
    let before = window_accuracy(&task, 1);
    let out = f.path("recon");
    // 200 steps: the encoder's token-embedding table stays frozen, so the tiny random BERT
    // steers the decoder through its layers alone.
    let mut cfg = loop_config(&out, 200, 0, false);
    cfg.schedule.peak = 3e-2;
    run::train(&mut task, &cfg, &AtomicBool::new(false)).unwrap();
    let after = window_accuracy(&task, 1);
    assert!(
        after > before + 0.05,
        "training-window token accuracy {before} -> {after}"
    );
    eprintln!("training-window token accuracy {before} -> {after}");
    let eval: Value =
        serde_json::from_slice(&std::fs::read(out.join("eval.json")).unwrap()).unwrap();
    let nll = |w: &str| eval[w]["recon_1_chunks"]["nll"].as_f64().unwrap();
    assert!(
        nll("end") < nll("start") - 1.0,
        "held-out reconstruction: {eval}"
    );
    let log = std::fs::read_to_string(out.join("train_log.jsonl")).unwrap();
    assert_eq!(log.lines().count(), 200);
}

/// A task that raises `stop` (as Ctrl-C does) when step `at` begins.
struct StopAt<'a> {
    inner: &'a mut dyn Task,
    at: usize,
    stop: Arc<AtomicBool>,
}

impl Task for StopAt<'_> {
    fn stage(&self) -> &'static str {
        self.inner.stage()
    }
    fn groups(&self) -> Vec<refrag::train::optim::Group> {
        self.inner.groups()
    }
    fn num_train(&self) -> usize {
        self.inner.num_train()
    }
    fn begin_step(&mut self, step: usize, total: usize, rng: &mut ChaCha8Rng) -> Result<()> {
        if step + 1 == self.at {
            self.stop.store(true, Ordering::SeqCst);
        }
        self.inner.begin_step(step, total, rng)
    }
    fn draw(&mut self, items: &[usize], rng: &mut ChaCha8Rng) -> Result<Option<Drawn>> {
        self.inner.draw(items, rng)
    }
    fn loss(&self, drawn: &Drawn) -> Result<Micro> {
        self.inner.loss(drawn)
    }
    fn evaluate(&mut self) -> Result<Value> {
        self.inner.evaluate()
    }
    fn checkpoint(&self, step: usize) -> Result<Checkpoint<'_>> {
        self.inner.checkpoint(step)
    }
}

/// A CPT-A task whose encoder and projector come from `dir` (a checkpoint).
fn recon_from(f: &Fixture, dir: &Path) -> CptTask {
    let dec = f.decoder(parts::DecoderTraining::Frozen);
    let enc_file = dir.join("encoder.safetensors");
    let proj = dir.join("projector.safetensors");
    let d = dec.decoder.hidden_size();
    let enc = TrainEncoder::load(
        &f.s("enc"),
        Some(&enc_file),
        Pooling::Mean,
        d,
        ProjectorInit::File(&proj),
        &dev(),
    )
    .unwrap();
    let mut t = cpt_task(f, CptMode::Recon, 0);
    t.enc = enc;
    t
}

fn log_lines(dir: &Path) -> Vec<Value> {
    std::fs::read_to_string(dir.join("train_log.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn two_plus_two_resumed_steps_equal_four() {
    let f = Fixture::new();
    let (full, split) = (f.path("full"), f.path("split"));
    let stop = AtomicBool::new(false);
    run::train(
        &mut cpt_task(&f, CptMode::Recon, 0),
        &loop_config(&full, 4, 9, false),
        &stop,
    )
    .unwrap();

    let flag = Arc::new(AtomicBool::new(false));
    let mut inner = cpt_task(&f, CptMode::Recon, 0);
    let mut first = StopAt {
        inner: &mut inner,
        at: 2,
        stop: flag.clone(),
    };
    let out = run::train(&mut first, &loop_config(&split, 4, 9, false), &flag).unwrap();
    assert_eq!(out, Outcome::Interrupted { step: 2 });
    let state = parts::read_state(&split).unwrap().unwrap();
    assert_eq!((state.step, state.optimizer_t), (2, 2));

    let mut resumed = recon_from(&f, &split);
    let out = run::train(&mut resumed, &loop_config(&split, 4, 9, true), &stop).unwrap();
    assert_eq!(out, Outcome::Finished { step: 4 });
    for part in [
        "encoder.safetensors",
        "projector.safetensors",
        "optimizer.safetensors",
    ] {
        assert!(
            std::fs::read(full.join(part)).unwrap() == std::fs::read(split.join(part)).unwrap(),
            "{part} differs between 4 steps and 2 + 2 resumed steps"
        );
    }
    let (a, b) = (log_lines(&full), log_lines(&split));
    assert_eq!(a.len(), 4);
    assert_eq!(b.len(), 4);
    for (x, y) in a.iter().zip(&b) {
        for key in ["step", "lr", "loss", "chunks"] {
            assert_eq!(x[key], y[key], "{key}: {x} vs {y}");
        }
    }
}

#[test]
fn micro_batches_side_by_side_equal_one_by_one() {
    // Four micro-batches a step, their losses and gradients computed on the BLAS's threads as
    // workers, against one by one: the gradients are summed in micro-batch order either way.
    let f = Fixture::new();
    let stop = AtomicBool::new(false);
    for (dir, workers) in [("one", false), ("side", true)] {
        let mut task = cpt_task(&f, CptMode::Next, 2);
        let mut cfg = loop_config(&f.path(dir), 3, 2, false);
        (cfg.batch_size, cfg.micro_batch, cfg.workers, cfg.eval) = (4, 1, workers, false);
        run::train(&mut task, &cfg, &stop).unwrap();
    }
    let (a, b) = (log_lines(&f.path("one")), log_lines(&f.path("side")));
    assert_eq!(a.len(), 3);
    for (x, y) in a.iter().zip(&b) {
        let (lx, ly) = (x["loss"].as_f64().unwrap(), y["loss"].as_f64().unwrap());
        assert!((lx - ly).abs() <= 1e-5 * lx.abs(), "loss {x} vs {y}");
        let (nx, ny) = (
            x["grad_norm"].as_f64().unwrap(),
            y["grad_norm"].as_f64().unwrap(),
        );
        assert!(
            (nx - ny).abs() <= 1e-4 * nx.abs(),
            "gradient norm {x} vs {y}"
        );
    }
    let read = |d: &str| {
        let p = f.path(d).join("projector.safetensors");
        candle_core::safetensors::load(p, &dev()).unwrap()
    };
    let (wa, wb) = (read("one"), read("side"));
    for (name, t) in &wa {
        let d = refrag::testing::max_abs_diff(t, &wb[name]);
        assert!(d < 1e-5, "{name}: side by side differs by {d}");
    }
}

#[test]
fn same_seed_same_weights_other_seed_other_weights() {
    let f = Fixture::new();
    let stop = AtomicBool::new(false);
    for (dir, seed) in [("a", 5), ("b", 5), ("c", 6)] {
        let mut task = cpt_task(&f, CptMode::Recon, seed);
        let mut cfg = loop_config(&f.path(dir), 3, seed, false);
        cfg.eval = false;
        run::train(&mut task, &cfg, &stop).unwrap();
    }
    let read = |d: &str, p: &str| std::fs::read(f.path(d).join(p)).unwrap();
    for p in ["encoder.safetensors", "projector.safetensors"] {
        assert!(
            read("a", p) == read("b", p),
            "{p}: same seed, different weights"
        );
        assert!(
            read("a", p) != read("c", p),
            "{p}: other seed, same weights"
        );
    }
}

#[test]
fn cpt_data_clips_splits_and_holds_out_the_last_items() {
    let f = Fixture::new();
    let dec = f.decoder(parts::DecoderTraining::Frozen);
    let d = CptData::from_items(&cpt_items(5), &dec.tok, 2, Some(20), Some(1000)).unwrap();
    assert_eq!(d.train, vec![0, 1, 2]);
    assert_eq!(d.eval, vec![3, 4]);
    for i in 0..5 {
        assert_eq!(d.s[i], 20);
        assert_eq!(d.o[i], (d.tokens[i].len() - 20).min(16));
    }
    let e = CptData::from_items(&cpt_items(2), &dec.tok, 2, None, None)
        .err()
        .unwrap();
    assert!(format!("{e:#}").contains("--eval_items 2 leaves no training item"));
}

#[test]
fn answer_chunks_mark_every_chunk_an_answer_touches_in_its_own_passage() {
    let f = Fixture::new();
    let tok = f.decoder(parts::DecoderTraining::Frozen).tok;
    let passages = vec![
        "the river runs north past the old mill to the sea".to_string(),
        "nothing here mentions it".to_string(),
    ];
    let layout = qa_layout(&tok, "where does the river run?", &passages, 4, 1000).unwrap();
    let answers = vec!["Old Mill".to_string()];
    let gold = answer_chunks(&tok, &layout, &answers).unwrap();
    assert_eq!(gold.len(), layout.chunks.len());
    // Every marked chunk is in passage 0 and its text overlaps "old mill"; at least one is.
    let text = |i: usize| tok.decode(&layout.chunks[i].tokens).unwrap();
    assert!(gold.iter().any(|&g| g));
    for (i, &g) in gold.iter().enumerate() {
        let c = &layout.chunks[i];
        if g {
            assert_eq!(c.passage, 0, "chunk {i} {:?}", text(i));
        }
    }
    let joined: String = (0..layout.chunks.len())
        .filter(|&i| gold[i])
        .map(text)
        .collect();
    assert!(joined.to_lowercase().contains("old mill"), "{joined:?}");
    // No answer in the passages: nothing marked.
    let none = answer_chunks(&tok, &layout, &["zebra".to_string()]).unwrap();
    assert!(none.iter().all(|&g| !g));
}

#[test]
fn warm_start_loss_raises_the_mass_on_answer_chunks() {
    let ToyPolicy {
        vars,
        policy,
        chunks,
        q,
        pos,
    } = toy_policy(2);
    let gold = [false, false, true, false, true, false];
    let scores = |p: &Policy| p.scores(&chunks, &q, &pos).unwrap();
    assert!(answer_mass_loss(&scores(&policy), &[false; 6])
        .unwrap()
        .is_none());
    assert!(answer_mass_loss(&scores(&policy), &[true; 6])
        .unwrap()
        .is_none());
    let before = answer_mass_loss(&scores(&policy), &gold).unwrap().unwrap();
    // The loss is -log of the softmax mass on the gold chunks.
    let s: Vec<f32> = scores(&policy).to_vec1().unwrap();
    let z: f32 = s.iter().map(|x| x.exp()).sum();
    let mass = (s[2].exp() + s[4].exp()) / z;
    assert!((before.to_scalar::<f32>().unwrap() + mass.ln()).abs() < 1e-4);
    policy_step(&vars, &before, 1e-2);
    let after = answer_mass_loss(&scores(&policy), &gold).unwrap().unwrap();
    assert!(after.to_scalar::<f32>().unwrap() < before.to_scalar::<f32>().unwrap());
}
