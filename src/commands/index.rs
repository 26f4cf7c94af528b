//! `refrag index`: embed a corpus, build the FAISS and BM25 indexes, write the index directory.
//!
//! Everything is checked before any work (the target directory, the corpus, the model, the FAISS
//! factory string and whether there are enough passages to train it); the directory is built in a
//! staging directory beside `--index_dir` and renamed into place only when complete. Stages added
//! later (the chunk cache) write into the same staging directory before the commit. One writer at
//! a time: a second `index` into the same `--index_dir` is refused while the first runs
//! ([`crate::lock`]).

use std::time::Instant;

use anyhow::{bail, Result};
use faiss::Index;

use crate::cli::IndexArgs;
use crate::embed::BertEmbedder;
use crate::hub::{self, ModelFiles, Role};
use crate::index::{self, lexical, Bm25Manifest, Bm25Params, Manifest, Staging};
use crate::{chunk_cache, progress};

pub fn run(args: &IndexArgs) -> Result<()> {
    if args.batch_size == 0 {
        bail!("--batch_size must be at least 1");
    }
    let cache_k = chunk_cache_k(args)?;
    // Held until the staging directory is renamed into place (dropped at the end of `run`).
    let _lock = crate::lock::DirLock::acquire(&args.index_dir, "--index_dir")?;
    index::check_target(&args.index_dir, args.force)?;
    let passages = crate::jsonio::read_corpus(&args.corpus, args.strict)?;
    let model_arg = hub::model_arg(args.embed.embed_model.as_deref(), Role::Embedder);
    let files = hub::resolve(&model_arg)?;
    let device = crate::device::select(args.runtime.device)?;
    let embedder = BertEmbedder::load(&files, &device)?;
    let mut dense = index::new_dense_index(embedder.dim(), &args.index_type)?;
    if !dense.is_trained() {
        index::check_training_size(&args.index_type, passages.len())?;
    }
    let staging = Staging::new(&args.index_dir, args.force)?;
    let start = Instant::now();
    let vectors = embed_with_progress(&embedder, &passages, args.batch_size, args.runtime.quiet)?;
    let embed_secs = start.elapsed().as_secs_f64();
    index::fill_dense_index(&mut dense, &args.index_type, &vectors)?;
    index::write_dense(&dense, &staging.path().join(index::DENSE))?;
    index::write_passages(&staging.path().join(index::PASSAGES), &passages)?;
    let manifest = manifest(args, &model_arg, &files, &embedder, passages.len())?;
    index::write_manifest(staging.path(), &manifest)?;
    if let Some(k) = cache_k {
        let bar = progress::bar(
            passages.len(),
            args.runtime.quiet,
            "chunk cache {bar:40} {pos}/{len} passages ({per_sec}, eta {eta})",
        );
        let load_dir = crate::weights::resolve_load_dir(
            args.load_dir.as_deref(),
            args.no_weights,
            args.enc.as_deref(),
            args.dec.as_deref(),
        )?;
        let cache = chunk_cache::build_for_index(
            &passages,
            args.enc.as_deref(),
            args.dec.as_deref(),
            load_dir.as_deref(),
            k,
            &device,
            |n| bar.inc(n as u64),
        )?;
        bar.finish_and_clear();
        cache.save(staging.path())?;
        eprintln!(
            "refrag: cached {} chunks (k={k}) of {} passages",
            cache.meta.chunks,
            passages.len()
        );
    }
    staging.commit()?;
    if !args.runtime.quiet {
        eprintln!(
            "refrag: indexed {} passages into {} in {:.1} s (embedding {:.1} passages/s)",
            passages.len(),
            args.index_dir.display(),
            start.elapsed().as_secs_f64(),
            passages.len() as f64 / embed_secs.max(1e-9)
        );
    }
    Ok(())
}

/// The manifest of the index being built.
fn manifest(
    args: &IndexArgs,
    model_arg: &str,
    files: &ModelFiles,
    embedder: &BertEmbedder,
    count: usize,
) -> Result<Manifest> {
    let params = Bm25Params::default();
    Ok(Manifest {
        format: index::FORMAT,
        refrag_version: env!("CARGO_PKG_VERSION").to_string(),
        embed_model: model_arg.to_string(),
        embed_model_path: std::fs::canonicalize(model_arg)
            .ok()
            .map(|p| p.display().to_string()),
        embed_model_fingerprint: index::model_fingerprint(files)?,
        dim: embedder.dim(),
        pooling: embedder.pooling(),
        normalize: embedder.normalize(),
        max_seq_len: embedder
            .tokenizer()
            .get_truncation()
            .map_or(0, |t| t.max_length),
        count,
        corpus: args.corpus.display().to_string(),
        corpus_sha256: index::file_sha256(&args.corpus)?,
        index_type: args.index_type.clone(),
        metric: "inner_product".to_string(),
        nprobe: index::default_nprobe(&args.index_type),
        bm25: Bm25Manifest {
            k1: params.k1,
            b: params.b,
            tokenizer: lexical::TOKENIZER_NAME.to_string(),
        },
        files: [index::DENSE, index::PASSAGES, index::MANIFEST]
            .map(String::from)
            .to_vec(),
        created_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    })
}

/// Embed all passages with a progress bar on stderr.
fn embed_with_progress(
    embedder: &BertEmbedder,
    passages: &[String],
    batch_size: usize,
    quiet: bool,
) -> Result<Vec<f32>> {
    let bar = progress::bar(
        passages.len(),
        quiet,
        "embedding {bar:40} {pos}/{len} passages ({per_sec}, eta {eta})",
    );
    let texts: Vec<&str> = passages.iter().map(String::as_str).collect();
    let vectors = embedder.embed_all(&texts, batch_size, |n| bar.inc(n as u64))?;
    bar.finish_and_clear();
    Ok(vectors)
}

/// The chunk cache's `k` when the cache is asked for (any of --enc, --dec, --k, --load_dir).
fn chunk_cache_k(args: &IndexArgs) -> Result<Option<usize>> {
    let asked =
        args.enc.is_some() || args.dec.is_some() || args.k.is_some() || args.load_dir.is_some();
    match args.k {
        Some(0) => bail!("--k must be at least 1"),
        _ if !asked => Ok(None),
        k => Ok(Some(k.unwrap_or(16))),
    }
}
