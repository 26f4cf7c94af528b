//! Checks on the real SmolLM2-135M-Instruct GGUF (ignored by default: the file comes from
//! `scripts/fetch_models.sh`). Run with
//! `cargo test --test decoder_real -- --ignored --nocapture --test-threads 1`.
//!
//! - the tokenizer rebuilt from the GGUF metadata gives the ids of an independent reference;
//! - greedy continuations equal candle-transformers' `quantized_llama` on the same file (f32
//!   against its dequantized weights; kept quantized against its Q4_1 kernels);
//! - load / prefill / decode timings (printed, not asserted).

use std::io::{Seek, SeekFrom};
use std::path::Path;
use std::time::Instant;

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use candle_transformers::models::quantized_llama::ModelWeights;
use refrag::decoder::{Decoder, DecoderTokenizer, Logits};
use refrag::hub::ModelFiles;

const GGUF: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";

fn files() -> ModelFiles {
    ModelFiles::Gguf {
        name: GGUF.into(),
        path: GGUF.into(),
    }
}

fn load() -> (Decoder, DecoderTokenizer) {
    Decoder::load(&files(), &Device::Cpu, DType::F32).unwrap()
}

fn argmax(logits: &Tensor) -> u32 {
    logits
        .flatten_all()
        .unwrap()
        .argmax(0)
        .unwrap()
        .to_scalar::<u32>()
        .unwrap()
}

/// Expected ids from an independent tokenizer: llama.cpp's algorithm for `pre = "smollm"`
/// (split special tokens; regexes `\p{N}` then GPT-2's, applied in turn keeping every piece;
/// GPT-2 byte-to-unicode; BPE by merge rank) written in Python over the GGUF's vocabulary, read
/// with `pip install gguf regex`:
///
/// ```python
/// r = GGUFReader(path); toks = r.fields['tokenizer.ggml.tokens'].contents()
/// rank = {tuple(m.split(' ', 1)): i for i, m in enumerate(r.fields['tokenizer.ggml.merges'].contents())}
/// pat1, pat2 = regex.compile(r"\p{N}"), regex.compile(r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)")
/// def bpe(word):  # merge the lowest-ranked adjacent pair until none applies
///     syms = [B[b] for b in word.encode()]
///     while len(syms) > 1:
///         r_, i = min((rank.get((syms[i], syms[i+1]), 1e18), i) for i in range(len(syms) - 1))
///         if r_ == 1e18: break
///         syms = syms[:i] + [syms[i] + syms[i+1]] + syms[i+2:]
///     return [vocab[s] for s in syms]
/// ```
const TOKENIZER_CASES: &[(&str, &[u32])] = &[
    ("Hello world", &[19556, 905]),
    (
        "Hello, world! How are you doing today?",
        &[19556, 28, 905, 17, 1073, 359, 346, 2567, 1834, 47],
    ),
    (
        "The year 2024 had 366 days.",
        &[
            504, 713, 216, 34, 32, 34, 36, 761, 216, 35, 38, 38, 2009, 30,
        ],
    ),
    (
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n",
        &[1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198],
    ),
    (
        "  leading spaces and trailing  ",
        &[216, 2899, 5600, 284, 35079, 256],
    ),
    (
        "naïve café, Straße, 東京タワー 🙂",
        &[
            3546, 46494, 37366, 28, 19144, 34878, 85, 28, 17097, 247, 126, 16736, 122, 10391, 140,
            11100, 124, 35130, 47526,
        ],
    ),
    (
        "don't won't it's I'm we've they'll he'd",
        &[
            12420, 982, 3763, 982, 357, 506, 339, 5248, 392, 3543, 502, 3060, 384, 6737,
        ],
    ),
    (
        "def f(x):\n    return x**2 + 3.14159\n",
        &[
            1604, 275, 24, 104, 727, 472, 1003, 1792, 828, 34, 1232, 216, 35, 30, 33, 36, 33, 37,
            41, 198,
        ],
    ),
    (
        "tab\tseparated\tvalues\n\n\nthree newlines",
        &[
            15999, 197, 19509, 483, 197, 6347, 1116, 198, 16347, 725, 5110,
        ],
    ),
];

#[test]
#[ignore = "needs models/SmolLM2-135M-Instruct.Q4_1.gguf (scripts/fetch_models.sh)"]
fn smollm2_gguf_config_and_tokenizer() {
    let (m, tok) = load();
    let c = m.config();
    assert_eq!(
        (c.num_hidden_layers, c.hidden_size, c.num_attention_heads),
        (30, 576, 9)
    );
    assert_eq!(
        (c.num_key_value_heads, c.intermediate_size, c.vocab_size),
        (3, 1536, 49152)
    );
    assert!(c.tie_word_embeddings);
    assert_eq!((c.rope_theta, c.rms_norm_eps), (100_000.0, 1e-5));
    assert_eq!((tok.bos_id(), tok.eos_ids()), (Some(1), &[2u32][..]));
    for (text, want) in TOKENIZER_CASES {
        let got = tok.encode(text, false).unwrap();
        assert_eq!(&got, want, "{text:?}");
        let back = tok.inner().decode(&got, false).unwrap();
        assert_eq!(&back, text);
    }
    let (before, after) = tok.chat_parts(None);
    assert!(before.contains("You are a helpful AI assistant named SmolLM"));
    assert_eq!(after, "<|im_end|>\n<|im_start|>assistant\n");
}

const PROMPTS: [&str; 20] = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain photosynthesis in one sentence.",
    "List three primary colors.",
    "What is 12 times 7?",
    "Translate 'good morning' into Spanish.",
    "Who wrote Romeo and Juliet?",
    "Give me a tip for learning to code.",
    "What does a thermometer measure?",
    "Describe a cat in five words.",
    "Why is the sky blue?",
    "Name a planet in our solar system.",
    "What is the boiling point of water in Celsius?",
    "Suggest a name for a pet goldfish.",
    "Context: The river Xyl flows through Bramton. Question: Which river flows through Bramton?",
    "How many legs does a spider have?",
    "What is the opposite of 'hot'?",
    "Write one sentence about autumn.",
    "What language is spoken in Brazil?",
    "Summarize: The meeting was moved from Monday to Wednesday because the room was booked.",
];

/// Greedy continuation with our decoder: `n` tokens after `prompt`.
fn ours_greedy(m: &Decoder, prompt: &[u32], n: usize) -> Vec<u32> {
    let mut cache = m.new_cache(prompt.len() + n);
    let ids = Tensor::new(prompt, m.device())
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let mut logits = m.forward_ids(&ids, Some(&mut cache), Logits::Last).unwrap();
    let mut out = Vec::new();
    for _ in 0..n {
        let next = argmax(&logits);
        out.push(next);
        let x = Tensor::new(&[next], m.device())
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        logits = m.forward_ids(&x, Some(&mut cache), Logits::Last).unwrap();
    }
    out
}

/// Greedy continuation with `quantized_llama`, and the gap between its two best logits at each
/// step.
fn reference_greedy(r: &mut ModelWeights, prompt: &[u32], n: usize) -> (Vec<u32>, Vec<f32>) {
    let dev = Device::Cpu;
    let ids = Tensor::new(prompt, &dev).unwrap().unsqueeze(0).unwrap();
    let mut logits = r.forward(&ids, 0).unwrap();
    let (mut out, mut gaps) = (Vec::new(), Vec::new());
    for i in 0..n {
        let mut v = logits.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let next = argmax(&logits);
        v.sort_by(|a, b| b.total_cmp(a));
        gaps.push(v[0] - v[1]);
        out.push(next);
        let x = Tensor::new(&[next], &dev).unwrap().unsqueeze(0).unwrap();
        logits = r.forward(&x, prompt.len() + i).unwrap();
    }
    (out, gaps)
}

/// `quantized_llama` on the real GGUF. With `dequantize`, on a copy of the file whose tensors
/// are all dequantized to f32, so that its matmuls are f32 matmuls on the dequantized weights
/// (the same arithmetic as ours); without, it runs candle's Q4_1 x Q8_1 kernels, which also
/// quantize the activations.
fn reference(dequantize: bool) -> ModelWeights {
    let mut f = std::fs::File::open(Path::new(GGUF)).unwrap();
    let content = gguf_file::Content::read(&mut f).unwrap();
    if !dequantize {
        return ModelWeights::from_gguf(content, &mut f, &Device::Cpu).unwrap();
    }
    let mut tensors = Vec::new();
    for name in content.tensor_infos.keys() {
        let q = content.tensor(&mut f, name, &Device::Cpu).unwrap();
        let t = q.dequantize(&Device::Cpu).unwrap();
        tensors.push((name.clone(), QTensor::quantize(&t, GgmlDType::F32).unwrap()));
    }
    let md: Vec<(&str, &gguf_file::Value)> = content
        .metadata
        .iter()
        .map(|(k, v)| (k.as_str(), v))
        .collect();
    let ts: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut tmp = tempfile::tempfile().unwrap();
    gguf_file::write(&mut tmp, &md, &ts).unwrap();
    tmp.seek(SeekFrom::Start(0)).unwrap();
    let content = gguf_file::Content::read(&mut tmp).unwrap();
    ModelWeights::from_gguf(content, &mut tmp, &Device::Cpu).unwrap()
}

/// Greedy 16-token continuations of the 20 chat prompts, ours against `reference`: how many
/// are identical; where they part, the reference's top-2 logit gap at that step must be below
/// `max_gap` (a near-tie that rounding may flip).
fn compare_greedy(m: &Decoder, tok: &DecoderTokenizer, mut r: ModelWeights, max_gap: f32) -> usize {
    let n = 16;
    let mut same = 0;
    for p in PROMPTS {
        let prompt = tok.encode(&tok.chat_prompt(None, p), false).unwrap();
        let ours = ours_greedy(m, &prompt, n);
        let (theirs, gaps) = reference_greedy(&mut r, &prompt, n);
        match ours.iter().zip(&theirs).position(|(a, b)| a != b) {
            None => same += 1,
            Some(i) => {
                println!(
                    "part at step {i} (reference top-2 gap {:.3}): {p:?}\n  ours:   {:?}\n  theirs: {:?}",
                    gaps[i],
                    tok.decode(&ours).unwrap(),
                    tok.decode(&theirs).unwrap()
                );
                assert!(
                    gaps[i] < max_gap,
                    "parted where the reference was sure: gap {}",
                    gaps[i]
                );
            }
        }
        println!("{p:?} -> {:?}", tok.decode(&ours).unwrap());
    }
    same
}

#[test]
#[ignore = "needs models/SmolLM2-135M-Instruct.Q4_1.gguf (scripts/fetch_models.sh)"]
fn greedy_continuations_match_quantized_llama() {
    let (m, tok) = load();
    // Same arithmetic (f32 on dequantized weights): every continuation must be identical.
    let same_f32 = compare_greedy(&m, &tok, reference(true), 1e-3);
    println!("identical greedy continuations vs dequantized quantized_llama: {same_f32} of 20");
    assert_eq!(same_f32, PROMPTS.len());
    // Against the Q4_1 x Q8_1 kernels, near-ties may flip.
    let same_q = compare_greedy(&m, &tok, reference(false), 1.0);
    println!("identical greedy continuations vs quantized quantized_llama: {same_q} of 20");
    // Kept quantized (`--quantized`), ours runs the reference's kernels: the same tokens.
    let (mq, _) = Decoder::load_quantized(&files(), &Device::Cpu).unwrap();
    let same_qq = compare_greedy(&mq, &tok, reference(false), 1.0);
    println!("identical greedy continuations, ours --quantized vs quantized quantized_llama: {same_qq} of 20");
    assert!(same_qq >= 16, "{same_qq} of 20");
}

/// The decoding fast path (the default for a GGUF decoder on the CPU): one-row products on the
/// file's quantized blocks. With f32 activations its greedy continuations are the f32 path's
/// (the same numbers up to rounding: every continuation identical to the dequantized
/// reference's), and with 16-bit ones (the default) all but near-ties at most, also over the
/// default f16 KV cache; with 8-bit activations (`REFRAG_DECODE=q8`) they follow the
/// reference's quantized kernels, where near-ties may flip (gap bounded where they part).
#[test]
#[ignore = "needs models/SmolLM2-135M-Instruct.Q4_1.gguf (scripts/fetch_models.sh)"]
fn fast_decode_continuations_match_the_f32_path() {
    use refrag::kernels::qgemv::Act;
    let (mut m, tok) = load();
    let bytes = refrag::decoder::enable_fast_decode_as(&files(), &mut m, Act::F32).unwrap();
    println!(
        "quantized weights kept for decoding: {:.1} MB",
        bytes.unwrap() as f64 / 1e6
    );
    let same_f32 = compare_greedy(&m, &tok, reference(true), 1e-2);
    println!("identical greedy continuations, fast decode vs dequantized f32: {same_f32} of 20");
    assert!(same_f32 >= 19, "{same_f32} of 20");
    let (mut q8, _) = load();
    refrag::decoder::enable_fast_decode_as(&files(), &mut q8, Act::Q8).unwrap();
    let same_q = compare_greedy(&q8, &tok, reference(false), 1.0);
    println!(
        "identical greedy continuations, q8 decode vs quantized quantized_llama: {same_q} of 20"
    );
    let same_q8_f32 = compare_greedy(&q8, &tok, reference(true), 1.0);
    println!("identical greedy continuations, q8 decode vs dequantized f32: {same_q8_f32} of 20");
    let (mut q16, _) = load();
    refrag::decoder::enable_fast_decode_as(&files(), &mut q16, Act::Q16).unwrap();
    let same_q16 = compare_greedy(&q16, &tok, reference(true), 1e-2);
    println!("identical greedy continuations, q16 decode vs dequantized f32: {same_q16} of 20");
    assert!(same_q16 >= 19, "{same_q16} of 20");
    // The decoding default in full: 16-bit activations over a half KV cache.
    q16.set_kv_storage(Some(candle_core::DType::F16));
    let same_half = compare_greedy(&q16, &tok, reference(true), 1e-1);
    println!(
        "identical greedy continuations, q16 decode + f16 KV cache vs dequantized f32: {same_half} of 20"
    );
    assert!(same_half >= 18, "{same_half} of 20");
}

/// Greedy decoding's LM head (its 4-bit copy ranks the vocabulary, the kept rows are scored on
/// the head's own blocks) picks the whole head's argmax: two caches in lockstep over each
/// prompt's greedy continuation, one asking for every logit, one for `Logits::Greedy`.
#[test]
#[ignore = "needs models/SmolLM2-135M-Instruct.Q4_1.gguf (scripts/fetch_models.sh)"]
fn greedy_head_picks_the_whole_heads_argmax() {
    let (mut m, tok) = load();
    refrag::decoder::enable_fast_decode(&files(), &mut m).unwrap();
    let n = 48;
    let (mut steps, mut same) = (0, 0);
    for p in PROMPTS {
        let prompt = tok.encode(&tok.chat_prompt(None, p), false).unwrap();
        let mut caches = [m.new_cache(prompt.len() + n), m.new_cache(prompt.len() + n)];
        let mut x = Tensor::new(prompt.as_slice(), m.device())
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        for _ in 0..n {
            let [full, top] = &mut caches;
            let all = m.forward_ids(&x, Some(full), Logits::Last).unwrap();
            let kept = m.forward_ids(&x, Some(top), Logits::Greedy).unwrap();
            let (a, b) = (argmax(&all), argmax(&kept));
            steps += 1;
            same += usize::from(a == b);
            if a != b {
                println!("{p:?}: whole head {a}, greedy head {b}");
            }
            x = Tensor::new(&[a], m.device()).unwrap().unsqueeze(0).unwrap();
        }
    }
    println!("greedy head = whole head's argmax at {same} of {steps} steps");
    assert_eq!(same, steps);
}

/// CPU seconds this process has used (user + system, all threads), from `/proc/self/stat`.
fn cpu_secs() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or("", |(_, rest)| rest)
        .split_whitespace()
        .collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / 100.0 // utime, stime (fields 14, 15) in 1/100 s
}

/// Wall and CPU seconds of `f`.
fn timed(f: impl FnOnce()) -> (f64, f64) {
    let (t, c) = (Instant::now(), cpu_secs());
    f();
    (t.elapsed().as_secs_f64(), cpu_secs() - c)
}

/// Load, 512-token prefill and KV-cached greedy decoding times. On a shared machine the wall
/// times depend on the neighbours, so the CPU seconds (all threads) are printed too, with the
/// load average: on an idle machine with `n` cores wall time approaches CPU time / n.
#[test]
#[ignore = "needs models/SmolLM2-135M-Instruct.Q4_1.gguf (scripts/fetch_models.sh)"]
fn speed_on_this_cpu() {
    let mut loaded = None;
    let (load_s, _) = timed(|| loaded = Some(load()));
    let (m, tok) = loaded.unwrap();
    let text = "The river Xyl flows through the town of Bramton, where the old mill stands. ";
    let mut ids = tok.encode(&text.repeat(40), false).unwrap();
    ids.truncate(512);
    assert_eq!(ids.len(), 512);
    let x = Tensor::new(ids.as_slice(), m.device())
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let prefill = || {
        let mut cache = m.new_cache(1024);
        let l = m.forward_ids(&x, Some(&mut cache), Logits::Last).unwrap();
        l.to_vec2::<f32>().unwrap();
    };
    prefill(); // warm-up
    let runs: Vec<(f64, f64)> = (0..3).map(|_| timed(prefill)).collect();
    let (prefill_wall, prefill_cpu) = runs
        .iter()
        .fold((f64::MAX, f64::MAX), |a, r| (a.0.min(r.0), a.1.min(r.1)));
    // Greedy decoding of `n` tokens after `ctx` (prefill not timed): tokens per second, wall and CPU.
    let decode = |ctx: &[u32], n: usize| -> (f64, f64) {
        let mut cache = m.new_cache(ctx.len() + n);
        let x = Tensor::new(ctx, m.device()).unwrap().unsqueeze(0).unwrap();
        let mut logits = m.forward_ids(&x, Some(&mut cache), Logits::Last).unwrap();
        let (wall, cpu) = timed(|| {
            for _ in 0..n {
                let x = Tensor::new(&[argmax(&logits)], m.device())
                    .unwrap()
                    .unsqueeze(0)
                    .unwrap();
                logits = m.forward_ids(&x, Some(&mut cache), Logits::Last).unwrap();
            }
        });
        (n as f64 / wall, n as f64 / cpu)
    };
    let short = tok
        .encode(&tok.chat_prompt(None, "Tell me about rivers."), false)
        .unwrap();
    decode(&short, 4); // warm-up
    let (short_wall, short_cpu) = decode(&short, 64);
    let (long_wall, long_cpu) = decode(&ids, 64);
    let loadavg = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "{{\"load_s\":{load_s:.3},\"prefill_512_wall_s\":{prefill_wall:.3},\"prefill_512_cpu_s\":{prefill_cpu:.2},\"decode_tok_per_wall_s_ctx{}\":{short_wall:.1},\"decode_tok_per_cpu_s_ctx{}\":{short_cpu:.1},\"decode_tok_per_wall_s_ctx512\":{long_wall:.1},\"decode_tok_per_cpu_s_ctx512\":{long_cpu:.1},\"cores\":{cores},\"loadavg\":\"{}\"}}",
        short.len(),
        short.len(),
        loadavg.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
    );
}
