//! Training the selective-expansion policy with REINFORCE (`train_policy`). For each question,
//! the policy scores every chunk from its projected embedding and the question vector; a group
//! of expansion sets of `round(p * L)` chunks is sampled without replacement (Plackett-Luce, by
//! Gumbel top-k, whose order is distributed as sequential sampling); the reward of a set is the
//! mean log-likelihood of the gold answer (and end-of-turn token) under the frozen decoder with
//! that input; the baseline is the group's mean reward and advantages are divided by the
//! group's standard deviation (GRPO). The loss is `-mean(advantage * log P(order))`, the
//! log-probability of exactly the sampled sequence. Only the policy trains: encoder, projector
//! and decoder are the inference pipeline's own ([`Refrag`]).
//!
//! REINFORCE from a random policy needs many decoder passes per question before the scores mean
//! anything, which a CPU cannot afford; `--warm_start N` first fits the policy for N steps to
//! the chunks that hold the gold answer ([`answer_chunks`], training questions only): the loss
//! is `-log` of the softmax mass on those chunks, and a step needs no decoder pass at all.
//! REINFORCE then refines what the decoder actually reads best.

use std::path::PathBuf;

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};

use super::optim::Group;
use super::parts::{Checkpoint, ConfigFields};
use super::qa::{
    answer_chunks, answer_seq, qa_layout, retriever, QaData, QaLayoutArgs, TaskRetriever,
};
use super::run::{Drawn, Micro, Stats, Task};
use super::seq::{forward_with_tables, weighted_mean, Seq};
use super::vars::named_vars;
use crate::compression::projector::uniform;
use crate::compression::prompt::PromptLayout;
use crate::pipeline::{ChunkSource, Encode, Prepared, Refrag};
use crate::select::policy::{log_sum_exp, Policy, PolicyConfig};
use crate::select::{num_expand, random_n, top_n};

/// Seeded initial policy weights (Kaiming-uniform first layer, small output layer) in `varmap`.
pub fn init_policy_vars(
    varmap: &VarMap,
    cfg: &PolicyConfig,
    seed: u64,
    device: &Device,
) -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut data = varmap.data().lock().unwrap();
    let inputs = 3 * cfg.d + crate::select::policy::POSITION_FEATURES;
    let b1 = (3.0 / inputs as f64).sqrt();
    let b2 = 0.1 * (3.0 / cfg.hidden as f64).sqrt();
    let tensors = [
        (
            "fc1.weight",
            uniform(&mut rng, (cfg.hidden, inputs), b1, device)?,
        ),
        ("fc1.bias", Tensor::zeros(cfg.hidden, DType::F32, device)?),
        (
            "fc2.weight",
            uniform(&mut rng, (1, cfg.hidden), b2, device)?,
        ),
        ("fc2.bias", Tensor::zeros(1, DType::F32, device)?),
    ];
    for (name, t) in tensors {
        data.insert(name.to_string(), candle_core::Var::from_tensor(&t)?);
    }
    Ok(())
}

/// Draw `n` of the chunks without replacement under Plackett-Luce with `scores`, in the order
/// drawn (Gumbel top-k: sort by score plus Gumbel noise).
pub fn sample_order(scores: &[f32], n: usize, rng: &mut ChaCha8Rng) -> Vec<usize> {
    let mut keyed: Vec<(f64, usize)> = scores
        .iter()
        .enumerate()
        .map(|(i, &s)| {
            let u: f64 = rng.random_range(f64::MIN_POSITIVE..1.0);
            (f64::from(s) - (-u.ln()).ln(), i)
        })
        .collect();
    keyed.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    keyed.into_iter().take(n).map(|k| k.1).collect()
}

/// The expansion mask of an order.
pub fn order_mask(order: &[usize], chunks: usize) -> Vec<bool> {
    let mut m = vec![false; chunks];
    for &i in order {
        m[i] = true;
    }
    m
}

/// Group-normalised advantages: reward minus the group mean, divided by the group's standard
/// deviation when it is not ~0.
pub fn advantages(rewards: &[f64]) -> Vec<f64> {
    let n = rewards.len().max(1) as f64;
    let mean = rewards.iter().sum::<f64>() / n;
    let var = rewards.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / n;
    let std = var.sqrt();
    let d = if std > 1e-6 { std } else { 1.0 };
    rewards.iter().map(|r| (r - mean) / d).collect()
}

/// The REINFORCE surrogate `-mean_g(adv_g * log P(order_g))` over a group of sampled orders.
pub fn reinforce_loss(scores: &Tensor, orders: &[Vec<usize>], adv: &[f64]) -> Result<Tensor> {
    let mut loss = Tensor::zeros((), DType::F32, scores.device())?;
    for (o, a) in orders.iter().zip(adv) {
        let lp = Policy::log_prob(scores, o)?;
        loss = (loss - (lp * *a)?)?;
    }
    Ok((loss / orders.len().max(1) as f64)?)
}

/// The warm start's loss: `-log` of the softmax mass of `scores` `(L,)` on the `gold` chunks;
/// `None` when no chunk or every chunk is gold (nothing to learn).
pub fn answer_mass_loss(scores: &Tensor, gold: &[bool]) -> Result<Option<Tensor>> {
    let pos: Vec<u32> = (0..gold.len() as u32)
        .filter(|&i| gold[i as usize])
        .collect();
    if pos.is_empty() || pos.len() == gold.len() {
        return Ok(None);
    }
    let idx = Tensor::new(pos.as_slice(), scores.device())?;
    let on_gold = log_sum_exp(&scores.index_select(&idx, 0)?)?;
    Ok(Some((log_sum_exp(scores)? - on_gold)?))
}

/// Of the questions with an answer chunk, the fraction whose `mask` expands at least one, and
/// the fraction of all answer chunks it expands.
fn answer_hits(mask: &[bool], gold: &[bool]) -> (f64, f64) {
    let total = gold.iter().filter(|&&g| g).count();
    let hit = mask.iter().zip(gold).filter(|(&m, &g)| m && g).count();
    (
        f64::from(u8::from(hit > 0)),
        hit as f64 / total.max(1) as f64,
    )
}

/// A policy-training run.
pub struct PolicyTask {
    pub refrag: Refrag,
    pub policy: Policy,
    pub vars: VarMap,
    pub hidden: usize,
    pub data: QaData,
    pub retriever: TaskRetriever,
    pub layout: QaLayoutArgs,
    pub p: f64,
    pub group: usize,
    /// Where the frozen encoder / trained decoder came from (copied into checkpoints).
    pub load_dir: Option<PathBuf>,
    pub encoder_model: String,
    /// Steps of the supervised warm start (see the module docs).
    pub warm_start: usize,
    /// The current step.
    pub step: usize,
}

/// One question's layout and chunk embeddings.
struct Question {
    layout: PromptLayout,
    embeds: Tensor,
    question: Tensor,
    /// [`crate::select::policy::position_features`] of the layout.
    positions: Tensor,
}

impl PolicyTask {
    fn question(&mut self, i: usize) -> Result<Question> {
        let passages = self
            .data
            .passages(i, retriever(&mut self.retriever), &self.layout)?;
        let q = &self.data.pairs[i].question;
        let layout = qa_layout(
            &self.refrag.dtok,
            q,
            &passages,
            self.layout.k,
            self.layout.ctx_max,
        )?;
        let prep = Prepared {
            layout,
            source_ids: None,
            question: q.clone(),
        };
        let all: Vec<usize> = (0..prep.layout.chunks.len()).collect();
        let embeds = if all.is_empty() {
            Tensor::zeros(
                (0, self.refrag.decoder.hidden_size()),
                DType::F32,
                &self.refrag.device,
            )?
        } else {
            let v = Encode.vectors(&self.refrag, &prep, &all)?;
            self.refrag.encoder.project(&v)?.detach()
        };
        let question = self.refrag.question_vector(q)?;
        let positions = self.refrag.policy_features(&prep)?;
        Ok(Question {
            layout: prep.layout,
            embeds,
            question,
            positions,
        })
    }

    /// Mean answer log-likelihood (reward) of pair `i` for each mask.
    fn rewards(&self, i: usize, qn: &Question, masks: Vec<Vec<bool>>) -> Result<Vec<f64>> {
        let pair = &self.data.pairs[i];
        let seqs = masks
            .into_iter()
            .map(|m| answer_seq(&self.refrag.dtok, qn.layout.clone(), m, pair))
            .collect::<Result<Vec<Seq>>>()?;
        let tables = vec![Some(qn.embeds.clone()); seqs.len()];
        let out = forward_with_tables(&self.refrag.decoder, &seqs, tables, None)?;
        Ok(out.nll.iter().map(|n| -n).collect())
    }

    /// The surrogate loss of one question, or `None` when `p` leaves nothing to choose.
    fn question_loss(
        &mut self,
        i: usize,
        rng: &mut ChaCha8Rng,
        stats: &mut Stats,
    ) -> Result<Option<Tensor>> {
        let qn = self.question(i)?;
        let l = qn.layout.chunks.len();
        let n = num_expand(self.p, l);
        if n == 0 || n == l {
            return Ok(None);
        }
        let scores = self
            .policy
            .scores(&qn.embeds, &qn.question, &qn.positions)?;
        if self.step < self.warm_start {
            let gold = answer_chunks(&self.refrag.dtok, &qn.layout, &self.data.pairs[i].answers)?;
            let loss = answer_mass_loss(&scores, &gold)?;
            if let Some(l) = &loss {
                stats.note("answer_mass", (-l.to_scalar::<f32>()? as f64).exp());
            }
            return Ok(loss);
        }
        let s: Vec<f32> = scores.to_vec1()?;
        let orders: Vec<Vec<usize>> = (0..self.group).map(|_| sample_order(&s, n, rng)).collect();
        let masks = orders.iter().map(|o| order_mask(o, l)).collect();
        let rewards = self.rewards(i, &qn, masks)?;
        for r in &rewards {
            stats.note("reward", *r);
        }
        Ok(Some(reinforce_loss(
            &scores,
            &orders,
            &advantages(&rewards),
        )?))
    }
}

/// A policy micro-batch, its surrogate loss already computed.
struct PolicyDrawn(Tensor, Stats);

impl Task for PolicyTask {
    fn stage(&self) -> &'static str {
        "train_policy"
    }

    fn groups(&self) -> Vec<Group> {
        vec![Group {
            name: "policy".into(),
            vars: named_vars(&self.vars),
            lr_scale: 1.0,
        }]
    }

    fn num_train(&self) -> usize {
        self.data.train.len()
    }

    fn begin_step(&mut self, step: usize, _total: usize, _rng: &mut ChaCha8Rng) -> Result<()> {
        self.step = step;
        Ok(())
    }

    /// The whole loss is computed here, in order: each question's embeddings come from a cache
    /// that drawing fills, and REINFORCE's rewards need the decoder passes of its samples.
    fn draw(&mut self, items: &[usize], rng: &mut ChaCha8Rng) -> Result<Option<Drawn>> {
        let mut stats = Stats::default();
        let mut losses = Vec::new();
        for &j in items {
            if let Some(l) = self.question_loss(self.data.train[j], rng, &mut stats)? {
                losses.push(l);
            }
        }
        if losses.is_empty() {
            return Ok(None);
        }
        let loss = (Tensor::stack(&losses, 0)?.sum_all()? / losses.len() as f64)?;
        stats.loss = f64::from(loss.to_scalar::<f32>()?);
        stats.micro = 1;
        Ok(Some(Box::new(PolicyDrawn(loss, stats))))
    }

    fn loss(&self, drawn: &Drawn) -> Result<Micro> {
        let Some(PolicyDrawn(loss, stats)) = drawn.downcast_ref::<PolicyDrawn>() else {
            bail!("train_policy: a micro-batch drawn by another task");
        };
        Ok(Micro {
            loss: loss.clone(),
            stats: stats.clone(),
        })
    }

    fn evaluate(&mut self) -> Result<Value> {
        let names = ["policy", "heuristic", "random", "none_p0", "all_p1"];
        let mut sums = [Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new()];
        let mut counts = Vec::new();
        // Answer-chunk hits (any, recall) per selection, over questions with an answer chunk.
        let mut hits = [(0.0, 0.0); 5];
        let mut with_gold = 0usize;
        for i in self.data.eval.clone() {
            let qn = self.question(i)?;
            let l = qn.layout.chunks.len();
            let n = num_expand(self.p, l);
            let s: Vec<f32> = if l == 0 {
                Vec::new()
            } else {
                self.policy
                    .scores(&qn.embeds, &qn.question, &qn.positions)?
                    .to_vec1()?
            };
            let heuristic = self.refrag.layout_scores(&qn.layout)?;
            let masks = vec![
                top_n(&s, n),
                top_n(&heuristic, n),
                random_n(l, n, i as u64),
                vec![false; l],
                vec![true; l],
            ];
            let gold = answer_chunks(&self.refrag.dtok, &qn.layout, &self.data.pairs[i].answers)?;
            if gold.iter().any(|&g| g) {
                with_gold += 1;
                for (h, m) in hits.iter_mut().zip(&masks) {
                    let (any, recall) = answer_hits(m, &gold);
                    h.0 += any;
                    h.1 += recall;
                }
            }
            let r = self.rewards(i, &qn, masks)?;
            for (k, v) in r.into_iter().enumerate() {
                sums[k].push(-v);
            }
            let answer = self
                .refrag
                .dtok
                .encode(&self.data.pairs[i].answers[0], false)?;
            counts.push(answer.len() + 1);
        }
        let mut out = serde_json::Map::new();
        let q = with_gold.max(1) as f64;
        for ((name, nll), h) in names.iter().zip(&sums).zip(hits) {
            out.insert(
                format!("answer_loglik_{name}"),
                json!(-weighted_mean(nll, &counts)),
            );
            out.insert(format!("answer_chunk_hit_{name}"), json!(h.0 / q));
            out.insert(format!("answer_chunk_recall_{name}"), json!(h.1 / q));
        }
        out.insert("questions_with_answer_chunk".into(), json!(with_gold));
        out.insert("p".into(), json!(self.p));
        Ok(Value::Object(out))
    }

    fn checkpoint(&self, step: usize) -> Result<Checkpoint<'_>> {
        let mut parts = vec!["projector", "policy"];
        let mut copies = Vec::new();
        if let Some(dir) = &self.load_dir {
            let cfg = crate::io::checkpoint::RefragConfig::read(dir)?;
            for part in ["encoder", "decoder", "decoder_lora"] {
                if cfg.has(part) {
                    copies.push((part, dir.clone()));
                    parts.push(part);
                }
            }
        }
        let config = ConfigFields {
            stage: "train_policy",
            encoder_model: &self.encoder_model,
            pooling: self.refrag.encoder.pooling(),
            decoder_model: &self.refrag.decoder_name,
            k: self.layout.k,
            projector: self.refrag.encoder.projector_config(),
            policy_hidden: Some(self.hidden),
            parts,
            step,
            lora: self
                .load_dir
                .as_deref()
                .map(crate::io::checkpoint::RefragConfig::read)
                .transpose()?
                .and_then(|c| c.lora),
        }
        .build();
        Ok(Checkpoint {
            config,
            vars: vec![
                ("projector", &self.refrag.encoder.projector_vars),
                ("policy", &self.vars),
            ],
            copies,
            decoder_config: None,
        })
    }
}

/// Build a policy over `varmap` (already initialised or loaded).
pub fn policy_over(varmap: &VarMap, cfg: &PolicyConfig, device: &Device) -> Result<Policy> {
    Ok(Policy::new(
        cfg,
        VarBuilder::from_varmap(varmap, DType::F32, device),
    )?)
}
