//! Training: the four commands `cpt_recon`, `cpt_next`, `sft` and `train_policy` share one loop
//! ([`run`]) over a [`run::Task`], in the same framework and with the same input layout as
//! inference.
//!
//! - `schedule`: learning rate, curriculum, per-step items and random generator (resumable);
//! - `optim`: AdamW with groups, accumulation, clipping and saved moments;
//! - `vars`: trainable copies of models from safetensors (strict names and shapes);
//! - `bert`, `encoder`: the differentiable chunk encoder + projector;
//! - `parts`: the decoder (frozen or trainable) and checkpoint writing;
//! - `seq`: teacher-forced sequences over a `PromptLayout`, the unit of every loss;
//! - `xent`: the fused cross-entropy of those losses;
//! - `cpt`, `qa`, `sft`, `policy`: the tasks.

pub mod bert;
pub mod cpt;
pub mod encoder;
pub mod optim;
pub mod parts;
pub mod policy;
pub mod qa;
pub mod run;
pub mod schedule;
pub mod seq;
pub mod sft;
pub mod vars;
pub mod xent;
