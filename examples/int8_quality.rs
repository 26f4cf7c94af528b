//! How close the retrieval embedder's 8-bit path is to f32: embeds the first N paragraphs of a
//! text file both ways (normalised, as `index` stores them) and prints the mean and minimum
//! cosine, and how often each passage's nearest neighbour among the others stays the same.
//!
//! ```text
//! cargo run --release --example int8_quality -- runs/squad/dev_corpus.txt 500
//! ```
use anyhow::Result;
use candle_core::Device;
use refrag::retrieval::embed::BertEmbedder;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let path = args.get(1).map_or("data/corpus_large.txt", |s| s.as_str());
    let n: usize = args.get(2).map_or(Ok(500), |s| s.parse())?;
    let dev = Device::Cpu;
    let files = refrag::hub::resolve("models/all-MiniLM-L6-v2")?;
    let f32e = BertEmbedder::load(&files, &dev)?.with_int8(false);
    let i8e = BertEmbedder::load(&files, &dev)?.with_int8(true);
    let text = std::fs::read_to_string(path)?;
    let texts: Vec<&str> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .take(n)
        .collect();
    let (a, b) = (embed(&f32e, &texts)?, embed(&i8e, &texts)?);
    let cos: Vec<f32> = a.iter().zip(&b).map(|(x, y)| dot(x, y)).collect();
    let mean = cos.iter().sum::<f32>() / cos.len() as f32;
    let min = cos.iter().copied().fold(1f32, f32::min);
    let nearest = |v: &[Vec<f32>], i: usize| {
        (0..v.len())
            .filter(|&j| j != i)
            .max_by(|&p, &q| dot(&v[i], &v[p]).total_cmp(&dot(&v[i], &v[q])))
    };
    let same = (0..a.len())
        .filter(|&i| nearest(&a, i) == nearest(&b, i))
        .count();
    println!(
        "{} passages of {path}: cosine mean {mean:.5}, min {min:.5}, 1 - mean {:.2e}; nearest neighbour kept {same}/{}",
        a.len(),
        1.0 - mean,
        a.len()
    );
    Ok(())
}

/// The texts' vectors as `index` computes them (sorted batches of 32).
fn embed(e: &BertEmbedder, texts: &[&str]) -> Result<Vec<Vec<f32>>> {
    let flat = e.embed_all(texts, 32, |_| {})?;
    Ok(flat.chunks(e.dim()).map(<[f32]>::to_vec).collect())
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}
