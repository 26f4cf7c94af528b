//! Property tests (proptest) of the readers of files that come from elsewhere or may be damaged:
//! GGUF (metadata, tensors, the tokenizer rebuilt from it), safetensors (checkpoint parts and
//! model weights), a Hugging Face folder's `config.json` and tokenizer files, a checkpoint's
//! `config.json` and `train_state.json`, an index's manifest and passages, the chunk cache and
//! JSONL. Each valid file is truncated at a random point, bit-flipped, or given an absurd size
//! (a length field, a count or a number in the text set to 2^32, 2^62, u64::MAX, ...). The
//! property: the reader returns, `Ok` or `Err`, without a panic, a hang or an allocation the file
//! cannot back (an unbounded allocation aborts the test process).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use proptest::prelude::*;
use proptest::sample::Index;
use refrag::hub::ModelFiles;

/// Cases per property: a few hundred, a few seconds each.
const CASES: u32 = 256;

const HUGE: [u64; 9] = [
    u64::MAX,
    u64::MAX / 2,
    1 << 62,
    1 << 40,
    1 << 32,
    u32::MAX as u64,
    1 << 31,
    1 << 20,
    0,
];
const BIG_NUMBERS: [&str; 7] = [
    "18446744073709551615",
    "4294967296",
    "1e308",
    "-1",
    "0",
    "99999999999999999999999",
    "1.5",
];

/// One way to damage a file.
#[derive(Debug, Clone)]
enum Mutation {
    Truncate(Index),
    Flip(Vec<(Index, u8)>),
    /// A little-endian value at any offset, 8 bytes wide or 4.
    Huge(Index, u64, bool),
    /// A value in one of the format's length or count fields.
    Field(Index, u64),
    /// A number of the text replaced.
    Number(Index, &'static str),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        any::<Index>().prop_map(Mutation::Truncate),
        prop::collection::vec((any::<Index>(), 0u8..8), 1..6).prop_map(Mutation::Flip),
        (
            any::<Index>(),
            prop::sample::select(HUGE.to_vec()),
            any::<bool>()
        )
            .prop_map(|(i, v, w)| Mutation::Huge(i, v, w)),
        (any::<Index>(), prop::sample::select(HUGE.to_vec()))
            .prop_map(|(i, v)| Mutation::Field(i, v)),
        (any::<Index>(), prop::sample::select(BIG_NUMBERS.to_vec()))
            .prop_map(|(i, v)| Mutation::Number(i, v)),
    ]
}

/// `bytes` damaged by `m`; `fields` are the (offset, width) of the format's length fields.
fn apply(bytes: &[u8], fields: &[(usize, usize)], m: &Mutation) -> Vec<u8> {
    let mut b = bytes.to_vec();
    let put = |b: &mut Vec<u8>, at: usize, v: u64, width: usize| {
        let le = v.to_le_bytes();
        for (k, byte) in le.iter().take(width).enumerate() {
            if let Some(x) = b.get_mut(at + k) {
                *x = *byte;
            }
        }
    };
    match m {
        Mutation::Truncate(i) => b.truncate(i.index(bytes.len() + 1)),
        Mutation::Flip(flips) => {
            for (i, bit) in flips {
                let at = i.index(b.len());
                b[at] ^= 1 << bit;
            }
        }
        Mutation::Huge(i, v, wide) => {
            let at = i.index(b.len());
            put(&mut b, at, *v, if *wide { 8 } else { 4 })
        }
        Mutation::Field(i, v) if !fields.is_empty() => {
            let (at, width) = fields[i.index(fields.len())];
            put(&mut b, at, *v, width);
        }
        Mutation::Field(i, v) => {
            let at = i.index(b.len());
            put(&mut b, at, *v, 8)
        }
        Mutation::Number(i, text) => {
            let spans = number_spans(&b);
            if !spans.is_empty() {
                let (s, e) = spans[i.index(spans.len())];
                b.splice(s..e, text.bytes());
            }
        }
    }
    b
}

/// Byte ranges of the runs of ASCII digits in `b`.
fn number_spans(b: &[u8]) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i].is_ascii_digit() {
            let s = i;
            while i < b.len() && b[i].is_ascii_digit() {
                i += 1;
            }
            out.push((s, i));
        }
        i += 1;
    }
    out
}

/// `CASES` cases from seed 13, the same on every run; `REFRAG_FUZZ_CASES` and
/// `REFRAG_FUZZ_SEED` run a longer or another campaign.
fn config() -> ProptestConfig {
    let env = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<u64>().ok());
    ProptestConfig {
        cases: env("REFRAG_FUZZ_CASES").map_or(CASES, |c| c as u32),
        failure_persistence: None,
        rng_seed: proptest::test_runner::RngSeed::Fixed(env("REFRAG_FUZZ_SEED").unwrap_or(13)),
        max_shrink_iters: 256,
        ..ProptestConfig::default()
    }
}

/// The (offset, width) of every count and length of a GGUF v2/v3 file: the tensor and metadata
/// counts, each string's and array's length, each 32- and 64-bit value, each tensor's dimension
/// count, dimensions and offset.
fn gguf_fields(b: &[u8]) -> Vec<(usize, usize)> {
    let u32_at = |p: usize| u32::from_le_bytes(b[p..p + 4].try_into().unwrap()) as usize;
    let u64_at = |p: usize| u64::from_le_bytes(b[p..p + 8].try_into().unwrap()) as usize;
    let mut f = vec![(8, 8), (16, 8)];
    let (tensors, kvs) = (u64_at(8), u64_at(16));
    let mut p = 24;
    fn value(b: &[u8], p: &mut usize, ty: usize, f: &mut Vec<(usize, usize)>) {
        let u32_at = |p: usize| u32::from_le_bytes(b[p..p + 4].try_into().unwrap()) as usize;
        let u64_at = |p: usize| u64::from_le_bytes(b[p..p + 8].try_into().unwrap()) as usize;
        match ty {
            8 => {
                f.push((*p, 8));
                *p += 8 + u64_at(*p);
            }
            9 => {
                let inner = u32_at(*p);
                f.push((*p + 4, 8));
                let n = u64_at(*p + 4);
                *p += 12;
                for _ in 0..n {
                    value(b, p, inner, f);
                }
            }
            0 | 1 | 7 => *p += 1,
            2 | 3 => *p += 2,
            // Integer values too: head counts, block counts, alignment, token ids.
            4..=6 => {
                f.push((*p, 4));
                *p += 4;
            }
            _ => {
                f.push((*p, 8));
                *p += 8;
            }
        }
    }
    for _ in 0..kvs {
        value(b, &mut p, 8, &mut f); // key
        let ty = u32_at(p);
        p += 4;
        value(b, &mut p, ty, &mut f);
    }
    for _ in 0..tensors {
        value(b, &mut p, 8, &mut f); // name
        f.push((p, 4));
        let dims = u32_at(p);
        p += 4;
        for _ in 0..dims {
            f.push((p, 8));
            p += 8;
        }
        p += 4; // type
        f.push((p, 8));
        p += 8;
    }
    f
}

fn write(path: &Path, bytes: &[u8]) {
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn gguf_reader_survives_damaged_files() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.gguf");
    refrag::testing::llama::write_tiny_llama_gguf(&base, 1).unwrap();
    let valid = std::fs::read(&base).unwrap();
    let fields = gguf_fields(&valid);
    assert!(fields.len() > 20, "{} length fields", fields.len());
    let path = dir.path().join("m.gguf");
    let files = ModelFiles::Gguf {
        name: path.to_string_lossy().into_owned(),
        path: path.clone(),
    };
    write(&path, &valid);
    refrag::decoder::load_parts(&files, &Device::Cpu, DType::F32).expect("the valid file loads");
    proptest!(config(), |(m in mutation())| {
        write(&path, &apply(&valid, &fields, &m));
        if let Ok(parts) = refrag::decoder::load_parts(&files, &Device::Cpu, DType::F32) {
            let _ = parts.tokenizer.encode("City_3 lies on the river", true);
        }
        let _ = refrag::decoder::load_config_and_tokenizer(&files);
    });
}

/// A Hugging Face folder's files: the tiny decoder's.
fn hf_files(dir: &Path) -> ModelFiles {
    ModelFiles::Hf {
        name: dir.to_string_lossy().into_owned(),
        config: dir.join("config.json"),
        weights: vec![dir.join("model.safetensors")],
        tokenizer: dir.join("tokenizer.json"),
        dir: Some(dir.to_path_buf()),
    }
}

/// Damage one file of a folder at a time (chosen by the case), restoring the others.
fn one_of(dir: &Path, names: &[&str], valid: &[Vec<u8>], pick: &Index, m: &Mutation) -> PathBuf {
    let k = pick.index(names.len());
    for (n, v) in names.iter().zip(valid) {
        write(&dir.join(n), v);
    }
    let p = dir.join(names[k]);
    let fields: &[(usize, usize)] = if names[k].ends_with(".safetensors") {
        &[(0, 8)]
    } else {
        &[]
    };
    write(&p, &apply(&valid[k], fields, m));
    p
}

fn read_all(dir: &Path, names: &[&str]) -> Vec<Vec<u8>> {
    names
        .iter()
        .map(|n| std::fs::read(dir.join(n)).unwrap())
        .collect()
}

#[test]
fn hf_config_tokenizer_and_weights_survive_damaged_files() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("dec");
    refrag::testing::llama::write_tiny_llama(&d, 1).unwrap();
    let names: Vec<String> = std::fs::read_dir(&d)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    assert!(names.contains(&"model.safetensors") && names.contains(&"tokenizer.json"));
    let valid = read_all(&d, &names);
    let files = hf_files(&d);
    refrag::decoder::load_parts(&files, &Device::Cpu, DType::F32).expect("the valid folder loads");
    proptest!(config(), |(pick in any::<Index>(), m in mutation())| {
        one_of(&d, &names, &valid, &pick, &m);
        let _ = refrag::decoder::load_parts(&files, &Device::Cpu, DType::F32);
    });
}

#[test]
fn checkpoint_parts_and_config_survive_damaged_files() {
    use candle_nn::{Init, VarMap};
    use refrag::io::checkpoint::{self, RefragConfig};
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let vm = VarMap::new();
    vm.get((3, 4), "w", Init::Const(0.5), DType::F32, &Device::Cpu)
        .unwrap();
    vm.get(5, "b", Init::Const(1.0), DType::F32, &Device::Cpu)
        .unwrap();
    checkpoint::save_varmap(&vm, &d.join("projector.safetensors")).unwrap();
    let cfg = RefragConfig {
        format_version: checkpoint::FORMAT_VERSION,
        refrag_version: "0.1.0".into(),
        stage: "cpt_recon".into(),
        encoder_model: "enc".into(),
        encoder_pooling: "mean".into(),
        decoder_model: "dec".into(),
        k: 16,
        projector: refrag::compression::projector::ProjectorConfig {
            in_dim: 4,
            hidden: 8,
            out_dim: 4,
        },
        policy_hidden: Some(8),
        parts: vec!["encoder".into(), "projector".into()],
        step: 3,
        lora: None,
    };
    refrag::io::jsonio::write_json(&d.join("config.json"), &cfg).unwrap();
    let state = refrag::train::parts::TrainState {
        stage: "cpt_recon".into(),
        step: 3,
        steps: 4,
        seed: 1,
        optimizer_t: 3,
    };
    refrag::io::jsonio::write_json(&d.join("train_state.json"), &state).unwrap();
    let names = ["projector.safetensors", "config.json", "train_state.json"];
    let valid = read_all(d, &names);
    let part = d.join("projector.safetensors");
    checkpoint::load_varmap_strict(&vm, &part, &Device::Cpu).expect("the valid part loads");
    proptest!(config(), |(pick in any::<Index>(), m in mutation())| {
        one_of(d, &names, &valid, &pick, &m);
        let _ = checkpoint::load_varmap_strict(&vm, &part, &Device::Cpu);
        let _ = candle_core::safetensors::load(&part, &Device::Cpu);
        let _ = RefragConfig::read(d);
        let _ = refrag::train::parts::read_state(d);
    });
}

#[test]
fn index_manifest_and_passages_survive_damaged_files() {
    use refrag::retrieval::index::{self, Bm25Manifest, Manifest};
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let passages: Vec<String> = (0..4)
        .map(|i| format!("City_{i} lies on River_{i}."))
        .collect();
    let m = Manifest {
        format: index::FORMAT,
        refrag_version: "0.1.0".into(),
        embed_model: "bert".into(),
        embed_model_path: None,
        embed_model_fingerprint: "ab".repeat(32),
        dim: 32,
        pooling: refrag::retrieval::embed::Pooling::Mean,
        normalize: true,
        embed_int8: false,
        max_seq_len: 128,
        count: passages.len(),
        corpus: "corpus.txt".into(),
        corpus_sha256: "cd".repeat(32),
        index_type: "IVF4,Flat".into(),
        metric: "inner_product".into(),
        nprobe: Some(4),
        bm25: Bm25Manifest {
            k1: 1.2,
            b: 0.75,
            tokenizer: "x".into(),
        },
        files: vec![index::DENSE.into()],
        passage_tokens: Some(254),
        passage_overlap: Some(32),
        documents: vec![index::DocumentEntry {
            source: "corpus.txt".into(),
            sha256: "ef".repeat(32),
            passages: passages.len(),
        }],
        created_unix: 1,
    };
    let sourced: Vec<index::SourcedPassage> = passages
        .iter()
        .enumerate()
        .map(|(i, t)| index::SourcedPassage {
            text: t.clone(),
            source: index::PassageSource {
                source: format!("corpus.txt:{}", i + 1),
                title: (i % 2 == 0).then(|| format!("Title {i}")),
                span: [0, t.chars().count()],
            },
        })
        .collect();
    index::write_manifest(d, &m).unwrap();
    index::write_passages(&d.join(index::PASSAGES), &sourced).unwrap();
    let names = [index::MANIFEST, index::PASSAGES];
    let valid = read_all(d, &names);
    proptest!(config(), |(pick in any::<Index>(), m in mutation())| {
        one_of(d, &names, &valid, &pick, &m);
        if let Ok(m) = index::read_manifest(d) {
            let _ = index::read_passages(d, &m);
            let _ = index::default_nprobe(&m.index_type);
        }
    });
}

#[test]
fn chunk_cache_survives_damaged_files() {
    use refrag::compression::chunk_cache::{ChunkCache, ChunkCacheMeta, CACHE_FILE, META_FILE};
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let dev = Device::Cpu;
    // Two passages: of 2 and 1 chunks, 3 tokens each but the last (2), vectors of width 4.
    let u32s = |v: &[u32]| Tensor::new(v, &dev).unwrap();
    let tensors = std::collections::HashMap::from([
        ("chunk_offsets".to_string(), u32s(&[0, 2, 3])),
        ("token_offsets".to_string(), u32s(&[0, 3, 6, 8])),
        ("tokens".to_string(), u32s(&[5, 6, 7, 8, 9, 10, 11, 12])),
        (
            "scores".to_string(),
            Tensor::new(&[0.5f32, 0.25, 1.0], &dev).unwrap(),
        ),
        (
            "vectors".to_string(),
            Tensor::ones((3, 4), DType::F32, &dev).unwrap(),
        ),
    ]);
    candle_core::safetensors::save(&tensors, d.join(CACHE_FILE)).unwrap();
    let meta = ChunkCacheMeta {
        encoder: "enc".into(),
        decoder: "dec".into(),
        k: 3,
        passages: 2,
        chunks: 3,
        dim: 4,
    };
    refrag::io::jsonio::write_json(&d.join(META_FILE), &meta).unwrap();
    let names = [CACHE_FILE, META_FILE];
    let valid = read_all(d, &names);
    let cache = ChunkCache::load(d).unwrap().expect("the valid cache loads");
    assert_eq!(cache.chunk_tokens(2), &[11, 12]);
    proptest!(config(), |(pick in any::<Index>(), m in mutation())| {
        one_of(d, &names, &valid, &pick, &m);
        if let Ok(Some(c)) = ChunkCache::load(d) {
            // Every accessor over every passage and chunk the cache claims stays in range.
            for id in 0..c.meta.passages {
                for ch in c.chunk_range(id) {
                    let _ = c.chunk_tokens(ch);
                    let _ = c.score(ch);
                    c.vectors(&[ch], &dev).unwrap();
                }
            }
        }
    });
}

#[test]
fn jsonl_and_corpus_readers_survive_damaged_files() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("qa.jsonl");
    let rows: String = (0..5)
        .map(|i| {
            format!(
                "{{\"id\":\"q{i}\",\"question\":\"Which river flows through City_{i}?\",\"answers\":[\"River_{i}\"]}}\n"
            )
        })
        .collect();
    proptest!(config(), |(m in mutation())| {
        write(&p, &apply(rows.as_bytes(), &[], &m));
        let _ = refrag::io::jsonio::read_jsonl::<refrag::io::schema::QaPair>(&p);
        let _ = refrag::io::jsonio::read_jsonl::<serde_json::Value>(&p);
        let _ = refrag::io::jsonio::read_corpus_counted(&p, false);
        let _ = refrag::io::jsonio::read_corpus_counted(&p, true);
    });
}
