//! A scratch directory for the training tests: a tiny random Llama (`dec/`), a tiny random BERT
//! (`enc/`), a few CPT items (`cpt.jsonl`), QA pairs (`qa.jsonl`) and the corpus their answers
//! come from (`corpus.txt`). Nothing downloads; everything is a function of fixed seeds.

#![allow(dead_code)]

use std::path::PathBuf;

use refrag::io::schema::{CptItem, QaPair, Split};

pub struct Fixture {
    pub dir: tempfile::TempDir,
}

/// Passage `i` of the tiny corpus.
pub fn passage(i: usize) -> String {
    format!(
        "City_{i} lies on the river River_{r} and was founded in {y}. The town of City_{i} is known for the bridge over River_{r}.",
        r = 100 + 7 * i,
        y = 1300 + 11 * i
    )
}

pub fn cpt_items(n: usize) -> Vec<CptItem> {
    (0..n)
        .map(|i| CptItem {
            id: format!("cpt-{i}"),
            tokens: (0..4)
                .map(|j| passage(i * 4 + j))
                .collect::<Vec<_>>()
                .join(" "),
            split: Split { s: 32, o: 16 },
        })
        .collect()
}

pub fn qa_pairs(n: usize) -> Vec<QaPair> {
    (0..n)
        .map(|i| QaPair {
            id: format!("q-{i}"),
            question: format!("Which river flows through City_{i}?"),
            answers: vec![format!("River_{}", 100 + 7 * i)],
        })
        .collect()
}

/// Every product of this test binary on one BLAS thread, for the whole process. The thread count
/// is process-wide, and the training loop and the evaluations set it to one while they run
/// micro-batches side by side: without this, one test's products would run on one thread or two
/// depending on what another test was doing, and sgemm sums in a different order on each (the
/// 7th digit moves), so runs compared bit for bit (resume against uninterrupted) could differ.
/// Side by side still runs on as many workers as the BLAS had threads ([`workers`]).
///
/// [`workers`]: refrag::kernels::blas::threads::workers
fn one_blas_thread() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if let Some((_, guard)) = refrag::kernels::blas::threads::one_thread() {
            std::mem::forget(guard);
        }
    });
}

impl Fixture {
    pub fn new() -> Self {
        one_blas_thread();
        let dir = tempfile::tempdir().unwrap();
        let f = Self { dir };
        refrag::testing::llama::write_tiny_llama(&f.path("dec"), 1).unwrap();
        refrag::testing::bert::write_tiny_bert(&f.path("enc"), 2, Some("mean")).unwrap();
        let jsonl = |rows: Vec<serde_json::Value>| {
            rows.iter()
                .map(|r| r.to_string() + "\n")
                .collect::<String>()
        };
        let cpt = cpt_items(8)
            .iter()
            .map(|c| serde_json::to_value(c).unwrap())
            .collect();
        std::fs::write(f.path("cpt.jsonl"), jsonl(cpt)).unwrap();
        let qa = qa_pairs(8)
            .iter()
            .map(|q| serde_json::to_value(q).unwrap())
            .collect();
        std::fs::write(f.path("qa.jsonl"), jsonl(qa)).unwrap();
        let corpus: Vec<String> = (0..12).map(passage).collect();
        std::fs::write(f.path("corpus.txt"), corpus.join("\n") + "\n").unwrap();
        f
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// The tiny decoder `dec/` (base weights) on the CPU, trained as `training` says.
    pub fn decoder(
        &self,
        training: refrag::train::parts::DecoderTraining,
    ) -> refrag::train::parts::TrainDecoder {
        refrag::train::parts::load_decoder(
            &self.s("dec"),
            None,
            None,
            &training,
            &candle_core::Device::Cpu,
        )
        .unwrap()
    }

    pub fn s(&self, rel: &str) -> String {
        self.path(rel).to_string_lossy().into_owned()
    }
}
