//! Times the retrieval embedder's BERT forward on the CPU: candle-transformers' `BertModel`
//! (as `REFRAG_BERT=candle` runs it, linear weights stored transposed) against
//! [`refrag::retrieval::embed::BertEmbedder`]'s default network (every linear layer through the system
//! BLAS, fused LayerNorm, GELU and attention over the real tokens), on the same sorted token
//! batches of `data/corpus_large.txt`, interleaved, and checks that the pooled embeddings agree.
//!
//! ```text
//! cargo run --release --example embed_bench -- [N_PASSAGES] [BATCH]
//! ```
use std::time::Instant;

use anyhow::Result;
use candle_core::Device;
use refrag::retrieval::embed::{pool, BertEmbedder, Pooling, TokenBatch};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let n: usize = args.get(1).map_or(Ok(256), |s| s.parse())?;
    let bs: usize = args.get(2).map_or(Ok(32), |s| s.parse())?;
    let dev = Device::Cpu;
    let files = refrag::hub::resolve("models/all-MiniLM-L6-v2")?;
    let emb = BertEmbedder::load(&files, &dev)?;
    std::env::set_var("REFRAG_BERT", "candle");
    let candle = BertEmbedder::load(&files, &dev)?;
    let text = std::fs::read_to_string("data/corpus_large.txt")?;
    let passages: Vec<&str> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .take(n)
        .collect();
    let enc = emb.encode(&passages)?;
    let mut order: Vec<usize> = (0..enc.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(enc[i].len()));
    let batches: Vec<TokenBatch> = order
        .chunks(bs)
        .map(|c| {
            let refs: Vec<_> = c.iter().map(|&i| &enc[i]).collect();
            TokenBatch::from_encodings(&refs, 0, &dev)
        })
        .collect::<candle_core::Result<_>>()?;
    let (mut t_candle, mut t_ours, mut diff) = (0f64, 0f64, 0f32);
    for b in &batches {
        let s = Instant::now();
        let a = candle.hidden_states(b)?;
        t_candle += s.elapsed().as_secs_f64();
        let s = Instant::now();
        let c = emb.hidden_states(b)?;
        t_ours += s.elapsed().as_secs_f64();
        let (a, c) = (
            pool(&a, &b.mask, Pooling::Mean)?,
            pool(&c, &b.mask, Pooling::Mean)?,
        );
        let d = (a - c)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        diff = diff.max(d);
    }
    let tokens: usize = enc.iter().map(|e| e.len()).sum();
    let k = passages.len() as f64;
    println!(
        "{k} passages ({tokens} tokens) in batches of {bs}: candle BertModel {t_candle:.2} s \
         ({:.1} passages/s), refrag {t_ours:.2} s ({:.1} passages/s), {:.2}x; max |pooled \
         diff| {diff:.2e}",
        k / t_candle,
        k / t_ours,
        t_candle / t_ours
    );
    Ok(())
}
