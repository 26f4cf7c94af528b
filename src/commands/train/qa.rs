//! The set-up `sft` and `train_policy` share: one [`QaSetup`] opened from their common flags.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::Device;

use super::{out_dir_and_resume, Sources};
use crate::cli::{QaDataArgs, RuntimeArgs, TrainArgs};
use crate::device;
use crate::retrieval::search::Retriever;
use crate::train::parts::TrainState;
use crate::train::qa::{QaData, QaLayoutArgs};

/// The flags `sft` and `train_policy` share.
pub(super) struct QaFlags<'a> {
    pub(super) train: &'a TrainArgs,
    pub(super) runtime: &'a RuntimeArgs,
    pub(super) qa: &'a QaDataArgs,
    pub(super) k: usize,
    pub(super) ctx_max: usize,
    pub(super) load_dir: Option<&'a Path>,
}

/// What `sft` and `train_policy` open alike: where the run writes and starts from (`--load_dir`,
/// or `--out_dir` itself on `--resume`), the models' sources, the device, the retriever, the
/// prompt layout and the QA pairs that train (only those whose retrieved passages hold a gold
/// answer, unless `--keep_unanswerable`; stderr says how many).
pub(super) struct QaSetup {
    pub(super) out_dir: PathBuf,
    pub(super) resume: Option<TrainState>,
    pub(super) start: Option<PathBuf>,
    pub(super) src: Sources,
    pub(super) dev: Device,
    pub(super) retriever: Retriever,
    pub(super) layout: QaLayoutArgs,
    pub(super) data: QaData,
}

impl QaSetup {
    pub(super) fn open(stage: &str, f: QaFlags<'_>) -> Result<Self> {
        let (out_dir, resume) = out_dir_and_resume(f.train, stage)?;
        let start = match &resume {
            Some(_) => Some(out_dir.clone()),
            None => f.load_dir.map(Path::to_path_buf),
        };
        let src = Sources::resolve(
            f.qa.models.enc.as_deref(),
            f.qa.models.dec.as_deref(),
            None,
            start.as_deref(),
        )?;
        src.warn_k(f.k);
        let dev = device::select(f.runtime.device)?;
        let mut data = QaData::load(&f.qa.rag_json, f.train.eval_items)?;
        let retriever = Retriever::open(
            &f.qa.retrieve.index_dir,
            f.qa.embed.embed_model.as_deref(),
            &dev,
        )?;
        let layout = QaLayoutArgs {
            topk: f.qa.retrieve.topk,
            mode: f.qa.retrieve.retrieval,
            k: f.k,
            ctx_max: f.ctx_max,
        };
        if !f.qa.answerable.keep_unanswerable {
            let (kept, of) = data
                .keep_answerable(&retriever, &layout)
                .with_context(|| format!("--rag_json {}", f.qa.rag_json.display()))?;
            eprintln!(
                "refrag: {stage}: {kept} of the {of} pairs train and {} are held out; the rest \
                 have no gold answer in their retrieved passages (--keep_unanswerable keeps them)",
                data.eval.len()
            );
        }
        Ok(Self {
            out_dir,
            resume,
            start,
            src,
            dev,
            retriever,
            layout,
            data,
        })
    }
}
