//! `refrag index`: read a corpus of documents ([`crate::retrieval::index::documents`]), embed its passages,
//! build the FAISS and BM25 indexes, write the index directory.
//!
//! Everything is checked before any work (the target directory, the corpus, the model, the FAISS
//! factory string and whether there are enough passages to train it); the directory is built in a
//! staging directory beside `--index_dir` and renamed into place only when complete. Stages added
//! later (the chunk cache) write into the same staging directory before the commit. One writer at
//! a time: a second `index` into the same `--index_dir` is refused while the first runs
//! ([`crate::io::lock`]).

use std::time::Instant;

use anyhow::{bail, Context, Result};
use faiss::Index;

use crate::cli::IndexArgs;
use crate::compression::chunk_cache;
use crate::hub::{self, ModelFiles, Role};
use crate::progress;
use crate::retrieval::embed::BertEmbedder;
use crate::retrieval::index::append::Origin;
use crate::retrieval::index::documents::{self, Document, Splitter};
use crate::retrieval::index::{
    self, lexical, Bm25Manifest, Bm25Params, DocumentEntry, Manifest, SourcedPassage, Staging,
};

pub fn run(args: &IndexArgs) -> Result<()> {
    let cache_k = chunk_cache_k(args);
    // Held until the staging directory is renamed into place (dropped at the end of `run`).
    let _lock = crate::io::lock::DirLock::acquire(&args.index_dir, "--index_dir")?;
    if !args.corpus.exists() {
        bail!(
            "--corpus {}: no such file or directory",
            args.corpus.display()
        );
    }
    if args.append {
        return append(args, cache_k);
    }
    index::check_target(&args.index_dir, args.force)?;
    let model_arg = hub::model_arg(args.embed.embed_model.as_deref(), Role::Embedder);
    let files = hub::resolve(&model_arg)?;
    let splitter = splitter(args, &files)?;
    let corpus = documents::read(&args.corpus, &splitter, args.strict)?;
    let passages: Vec<SourcedPassage> = corpus.passages().cloned().collect();
    let device = crate::device::select(args.runtime.device)?;
    let embedder = BertEmbedder::load(&files, &device)?;
    let want = args.int8 || embedder.int8();
    let embedder = embedder.with_int8_where_fast(want);
    if want && !embedder.int8() {
        eprintln!("refrag: --int8: this CPU has no AVX-512 VNNI; embedding in f32");
    }
    let mut dense = index::new_dense_index(embedder.dim(), &args.index_type)?;
    if !dense.is_trained() {
        index::check_training_size(&args.index_type, passages.len())?;
    }
    let staging = Staging::new(&args.index_dir, args.force)?;
    let start = Instant::now();
    let texts: Vec<&str> = passages.iter().map(|p| p.text.as_str()).collect();
    let vectors = embed_with_progress(&embedder, &texts, args.batch_size, args.runtime.quiet)?;
    let embed_secs = start.elapsed().as_secs_f64();
    index::fill_dense_index(&mut dense, &args.index_type, &vectors)?;
    index::write_dense(&dense, &staging.path().join(index::DENSE))?;
    index::write_vectors(staging.path(), &vectors, embedder.dim())?;
    index::write_passages(&staging.path().join(index::PASSAGES), &passages)?;
    let built = Built {
        model_arg: &model_arg,
        files: &files,
        embedder: &embedder,
        splitter: &splitter,
    };
    let manifest = manifest(args, &built, &corpus.documents, passages.len())?;
    index::write_manifest(staging.path(), &manifest)?;
    if let Some(k) = cache_k {
        let texts: Vec<String> = passages.iter().map(|p| p.text.clone()).collect();
        let cache = build_cache(args, &texts, k, &device)?;
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
            "refrag: indexed {} passages of {} documents into {} in {:.1} s (embedding {:.1} passages/s)",
            passages.len(),
            corpus.documents.len(),
            args.index_dir.display(),
            start.elapsed().as_secs_f64(),
            passages.len() as f64 / embed_secs.max(1e-9)
        );
    }
    Ok(())
}

/// `--append`: the documents of `--corpus` into the existing index, embedding only the passages
/// of new and changed documents ([`index::append`]); the FAISS index is rebuilt from the stored
/// vectors, and the whole directory is built beside the old one and renamed over it.
fn append(args: &IndexArgs, cache_k: Option<usize>) -> Result<()> {
    let dir = &args.index_dir;
    let old = index::read_manifest(dir).context("--append")?;
    if old.documents.is_empty() {
        bail!("--append: index dir {} records no documents (built by an older refrag); rebuild it without --append", dir.display());
    }
    let files = hub::resolve(&append_model(args, &old))?;
    crate::retrieval::search::check_model(dir, &old, &files)?;
    let splitter = splitter(args, &files)?;
    let split = (Some(splitter.max_tokens), Some(splitter.overlap));
    if split != (old.passage_tokens, old.passage_overlap) {
        bail!(
            "--append: index dir {} was split with --passage_tokens {} --passage_overlap {}; pass the same",
            dir.display(),
            old.passage_tokens.unwrap_or(0),
            old.passage_overlap.unwrap_or(0)
        );
    }
    let old_cache = chunk_cache::ChunkCache::load(dir)?;
    if let (Some(c), Some(k)) = (&old_cache, cache_k) {
        if c.meta.k != k {
            bail!(
                "--append: the index's chunk cache has k={}, not --k {k}",
                c.meta.k
            );
        }
    }
    let corpus = documents::read(&args.corpus, &splitter, args.strict)?;
    let records = index::read_passage_records(dir, &old)?;
    let plan = index::append::plan(&old.documents, &records, &corpus.documents, args.prune)?;
    let device = crate::device::select(args.runtime.device)?;
    let vectors = append_vectors(args, &old, &files, &plan, &device)?;
    let mut dense = index::new_dense_index(old.dim, &old.index_type)?;
    index::fill_dense_index(&mut dense, &old.index_type, &vectors)?;
    let staging = Staging::new(dir, true)?;
    index::write_dense(&dense, &staging.path().join(index::DENSE))?;
    index::write_vectors(staging.path(), &vectors, old.dim)?;
    index::write_passages(&staging.path().join(index::PASSAGES), &plan.passages)?;
    let manifest = Manifest {
        count: plan.passages.len(),
        corpus: args.corpus.display().to_string(),
        corpus_sha256: entries_sha256(&plan.documents),
        documents: plan.documents.clone(),
        created_unix: now_unix(),
        refrag_version: env!("CARGO_PKG_VERSION").to_string(),
        ..old
    };
    index::write_manifest(staging.path(), &manifest)?;
    if let Some(old_cache) = &old_cache {
        append_cache(args, old_cache, &plan, &device)?.save(staging.path())?;
    }
    staging.commit()?;
    eprintln!(
        "refrag: appended to {}: {} documents added, {} replaced, {} unchanged{}; embedded {} of {} passages",
        dir.display(),
        plan.added,
        plan.replaced,
        plan.unchanged,
        match args.prune {
            true => format!(", {} removed", plan.removed),
            false => String::new(),
        },
        plan.to_embed.len(),
        plan.passages.len()
    );
    Ok(())
}

/// The embedding model of `--append`: `--embed_model`, else the index's own.
fn append_model(args: &IndexArgs, old: &Manifest) -> String {
    match &args.embed.embed_model {
        Some(m) => m.clone(),
        None => old
            .embed_model_path
            .clone()
            .filter(|p| std::path::Path::new(p).is_dir())
            .unwrap_or_else(|| old.embed_model.clone()),
    }
}

/// Every passage's vector in the appended index: stored ones for kept passages, fresh ones for
/// the passages of `plan.to_embed` (the embedder loads only when there are any).
fn append_vectors(
    args: &IndexArgs,
    old: &Manifest,
    files: &ModelFiles,
    plan: &index::append::Plan,
    device: &candle_core::Device,
) -> Result<Vec<f32>> {
    let old_vectors = index::read_vectors(&args.index_dir, old)?;
    let new_vectors = if plan.to_embed.is_empty() {
        Vec::new()
    } else {
        let embedder = BertEmbedder::load(files, device)?
            .with_int8_where_fast(old.embed_int8)
            .with_pooling(old.pooling)
            .with_normalize(old.normalize);
        let texts: Vec<&str> = plan.to_embed.iter().map(String::as_str).collect();
        embed_with_progress(&embedder, &texts, args.batch_size, args.runtime.quiet)?
    };
    let dim = old.dim;
    let mut vectors = Vec::with_capacity(plan.from.len() * dim);
    for f in &plan.from {
        vectors.extend_from_slice(match *f {
            Origin::Old(id) => &old_vectors[id * dim..(id + 1) * dim],
            Origin::New(j) => &new_vectors[j * dim..(j + 1) * dim],
        });
    }
    Ok(vectors)
}

/// The appended index's chunk cache: the old cache's chunks for kept passages, a cache built now
/// (same models and `k`, checked) for the embedded ones.
fn append_cache(
    args: &IndexArgs,
    old: &chunk_cache::ChunkCache,
    plan: &index::append::Plan,
    device: &candle_core::Device,
) -> Result<chunk_cache::ChunkCache> {
    let new = match plan.to_embed.is_empty() {
        true => None,
        false => Some(build_cache(args, &plan.to_embed, old.meta.k, device)?),
    };
    let from: Vec<(bool, usize)> = plan
        .from
        .iter()
        .map(|f| match *f {
            Origin::Old(id) => (false, id),
            Origin::New(j) => (true, j),
        })
        .collect();
    old.assemble(new.as_ref(), &from)
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// sha256 over the documents' names and hashes (a directory corpus's `corpus_sha256`).
fn entries_sha256(docs: &[DocumentEntry]) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for d in docs {
        h.update(format!("{}\t{}\n", d.source, d.sha256));
    }
    format!("{:x}", h.finalize())
}

/// The passage splitter of `--passage_tokens` / `--passage_overlap`, counting with the
/// embedder's tokenizer; the default budget is the embedder's window less its two special tokens.
fn splitter(args: &IndexArgs, files: &ModelFiles) -> Result<Splitter> {
    let ModelFiles::Hf {
        config, tokenizer, ..
    } = files
    else {
        bail!(
            "embedding model '{}' is a GGUF file; the retrieval model must be a BERT-family Hugging Face folder",
            files.name()
        );
    };
    let window = crate::retrieval::embed::max_seq_len(
        files,
        &crate::retrieval::embed::read_config(config)?,
    )?;
    let max = args
        .passage_tokens
        .unwrap_or_else(|| window.saturating_sub(2).max(1));
    Splitter::new(tokenizer, max, args.passage_overlap)
}

/// The chunk cache of `passages` for the `--enc`/`--dec`/`--load_dir` of `args`.
fn build_cache(
    args: &IndexArgs,
    passages: &[String],
    k: usize,
    device: &candle_core::Device,
) -> Result<chunk_cache::ChunkCache> {
    let bar = progress::bar(
        passages.len(),
        args.runtime.quiet,
        "chunk cache {bar:40} {pos}/{len} passages ({per_sec}, eta {eta})",
    );
    let load_dir = crate::io::weights::resolve_load_dir(
        args.load_dir.as_deref(),
        args.no_weights,
        args.enc.as_deref(),
        args.dec.as_deref(),
    )?;
    let cache = chunk_cache::build_for_index(
        passages,
        args.enc.as_deref(),
        args.dec.as_deref(),
        load_dir.as_deref(),
        k,
        device,
        |n| bar.inc(n as u64),
    )?;
    bar.finish_and_clear();
    Ok(cache)
}

/// What the manifest records about the models and the splitter.
struct Built<'a> {
    model_arg: &'a str,
    files: &'a ModelFiles,
    embedder: &'a BertEmbedder,
    splitter: &'a Splitter,
}

/// The manifest of the index being built.
fn manifest(args: &IndexArgs, b: &Built, docs: &[Document], count: usize) -> Result<Manifest> {
    let (model_arg, files, embedder) = (b.model_arg, b.files, b.embedder);
    let params = Bm25Params::default();
    let entries: Vec<DocumentEntry> = docs
        .iter()
        .map(|d| DocumentEntry {
            source: d.source.clone(),
            sha256: d.sha256.clone(),
            passages: d.passages.len(),
        })
        .collect();
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
        embed_int8: embedder.int8(),
        max_seq_len: embedder
            .tokenizer()
            .get_truncation()
            .map_or(0, |t| t.max_length),
        count,
        corpus: args.corpus.display().to_string(),
        corpus_sha256: corpus_sha256(&args.corpus, &entries)?,
        index_type: args.index_type.clone(),
        metric: "inner_product".to_string(),
        nprobe: index::default_nprobe(&args.index_type),
        bm25: Bm25Manifest {
            k1: params.k1,
            b: params.b,
            tokenizer: lexical::TOKENIZER_NAME.to_string(),
        },
        files: [
            index::DENSE,
            index::VECTORS,
            index::PASSAGES,
            index::MANIFEST,
        ]
        .map(String::from)
        .to_vec(),
        passage_tokens: Some(b.splitter.max_tokens),
        passage_overlap: Some(b.splitter.overlap),
        documents: entries,
        created_unix: now_unix(),
    })
}

/// The sha256 of the corpus file, or for a directory, over its documents' names and hashes.
fn corpus_sha256(corpus: &std::path::Path, docs: &[DocumentEntry]) -> Result<String> {
    if corpus.is_file() {
        return index::file_sha256(corpus);
    }
    Ok(entries_sha256(docs))
}

/// Embed all passages with a progress bar on stderr.
fn embed_with_progress(
    embedder: &BertEmbedder,
    texts: &[&str],
    batch_size: usize,
    quiet: bool,
) -> Result<Vec<f32>> {
    let bar = progress::bar(
        texts.len(),
        quiet,
        "embedding {bar:40} {pos}/{len} passages ({per_sec}, eta {eta})",
    );
    let vectors = embedder.embed_all(texts, batch_size, |n| bar.inc(n as u64))?;
    bar.finish_and_clear();
    Ok(vectors)
}

/// The chunk cache's `k` when the cache is asked for (any of --enc, --dec, --k, --load_dir).
fn chunk_cache_k(args: &IndexArgs) -> Option<usize> {
    let asked =
        args.enc.is_some() || args.dec.is_some() || args.k.is_some() || args.load_dir.is_some();
    asked.then(|| args.k.unwrap_or(16))
}
