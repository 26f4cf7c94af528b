//! The trainable parts against their inference counterparts, and checkpoints: the
//! differentiable BERT equals candle's `BertModel` and its gradient equals finite differences;
//! the frozen decoder's input gradient equals the trainable decoder's; a saved encoder +
//! projector loads into inference's `ChunkEncoder` and gives the same vectors; a trained decoder
//! loads into the pipeline with the same logits; the QA layout is `generate`'s; mismatched
//! checkpoints fail naming the tensor.

mod common;
use common::max_diff;

mod train_fixture;

use std::sync::atomic::AtomicBool;

use candle_core::{Device, Tensor, Var};
use refrag::compression::encoder::{embedding_std, ChunkEncoder};
use refrag::decoder::{Decoder, Logits};
use refrag::hub;
use refrag::io::checkpoint::part_path;
use refrag::pipeline::{Passage, Refrag};
use refrag::retrieval::embed::{BertEmbedder, Pooling};
use refrag::train::cpt::{CptData, CptMode, CptSettings, CptTask};
use refrag::train::encoder::{ProjectorInit, TrainEncoder};
use refrag::train::optim::AdamWConfig;
use refrag::train::parts;
use refrag::train::qa::qa_layout;
use refrag::train::run::{self, LoopConfig};
use refrag::train::schedule::{Curriculum, LrSchedule};
use train_fixture::{cpt_items, passage, Fixture};

const TEXTS: [&str; 3] = ["City_7 lies on the river", "founded in 1320, the town", "x"];

fn dev() -> Device {
    Device::Cpu
}

fn train_encoder(f: &Fixture, pooling: Pooling) -> TrainEncoder {
    let init = ProjectorInit::Fresh {
        out_std: 0.5,
        seed: 3,
    };
    TrainEncoder::load(&f.s("enc"), None, pooling, 64, init, &dev()).unwrap()
}

#[test]
fn differentiable_bert_equals_candle_bert() {
    let f = Fixture::new();
    let files = hub::resolve(&f.s("enc")).unwrap();
    for pooling in [Pooling::Mean, Pooling::Cls, Pooling::Seg4] {
        let ours = train_encoder(&f, pooling).encode(&TEXTS).unwrap();
        // The f32 inference path (the retrieval model's int8 products are not the reference).
        let theirs = BertEmbedder::load(&files, &dev())
            .unwrap()
            .with_int8(false)
            .with_pooling(pooling)
            .with_normalize(false)
            .embed(&TEXTS)
            .unwrap();
        let theirs = Tensor::new(theirs, &dev()).unwrap();
        assert!(max_diff(&ours, &theirs) < 1e-4, "{pooling}");
    }
}

#[test]
fn bert_gradient_equals_finite_differences() {
    let f = Fixture::new();
    let enc = train_encoder(&f, Pooling::Mean);
    let probe = Tensor::randn(0f32, 1.0, (3, 64), &dev()).unwrap();
    let loss = |e: &TrainEncoder| {
        (e.embed(&TEXTS).unwrap() * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
    };
    let grads = loss(&enc).backward().unwrap();
    let data = enc.bert_vars.data().lock().unwrap();
    for name in [
        "encoder.layer.0.attention.self.query.weight",
        "encoder.layer.1.output.LayerNorm.weight",
        "encoder.layer.0.attention.self.key.weight",
        "embeddings.LayerNorm.weight",
    ] {
        let var: &Var = &data[name];
        let g = grads.get(var.as_tensor()).unwrap().flatten_all().unwrap();
        // The coordinate with the largest gradient, nudged both ways.
        let i = g
            .abs()
            .unwrap()
            .argmax(0)
            .unwrap()
            .to_scalar::<u32>()
            .unwrap() as usize;
        let analytic = g.get(i).unwrap().to_scalar::<f32>().unwrap();
        // A copy: `flatten_all` of a contiguous tensor is a view of the storage `set` rewrites.
        let orig: Vec<f32> = var.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        let at = |delta: f32| -> f32 {
            let mut v = orig.clone();
            v[i] += delta;
            var.set(&Tensor::from_vec(v, var.shape(), &dev()).unwrap())
                .unwrap();
            loss(&enc).to_scalar::<f32>().unwrap()
        };
        let h = 1e-2;
        let numeric = (at(h) - at(-h)) / (2.0 * h);
        at(0.0);
        let tol = 0.05 * analytic.abs().max(1.0);
        assert!(
            (analytic - numeric).abs() < tol,
            "{name}: {analytic} vs {numeric}"
        );
    }
}

#[test]
fn frozen_decoder_passes_the_same_input_gradient_as_a_trainable_one() {
    let f = Fixture::new();
    let frozen = f.decoder(parts::DecoderTraining::Frozen);
    let trainable = f.decoder(parts::DecoderTraining::Full);
    let x0 = Tensor::randn(0f32, 1.0, (2, 5, 64), &dev()).unwrap();
    let probe = Tensor::randn(
        0f32,
        1.0,
        (2, 5, frozen.decoder.config().vocab_size),
        &dev(),
    )
    .unwrap();
    let grad = |d: &Decoder| {
        let x = Var::from_tensor(&x0).unwrap();
        let y = d.forward_embeds(x.as_tensor(), None, Logits::All).unwrap();
        let g = (y * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        g.get(x.as_tensor()).unwrap().clone()
    };
    let (a, b) = (grad(&frozen.decoder), grad(&trainable.decoder));
    assert!(max_diff(&a, &b) < 1e-3, "{}", max_diff(&a, &b));
}

fn run_cpt(f: &Fixture, mode: CptMode, load: Option<&str>, out: &str) -> std::path::PathBuf {
    let dir = load.map(|d| f.path(d));
    let dec = f.decoder(if mode == CptMode::Next {
        parts::DecoderTraining::Full
    } else {
        parts::DecoderTraining::Frozen
    });
    let d = dec.decoder.hidden_size();
    let (enc_file, proj) = match &dir {
        Some(d) => (
            Some(part_path(d, "encoder")),
            Some(part_path(d, "projector")),
        ),
        None => (None, None),
    };
    let init = match &proj {
        Some(p) => ProjectorInit::File(p),
        None => ProjectorInit::Fresh {
            out_std: embedding_std(&dec.decoder).unwrap(),
            seed: 0,
        },
    };
    let enc = TrainEncoder::load(
        &f.s("enc"),
        enc_file.as_deref(),
        Pooling::Mean,
        d,
        init,
        &dev(),
    )
    .unwrap();
    let data = CptData::from_items(&cpt_items(6), &dec.tok, 1, None, None).unwrap();
    let settings = CptSettings {
        mode,
        k: 4,
        curriculum: Curriculum::default_for(2),
        expand_frac: 0.5,
        dec_lr_scale: 1.0,
        eval_batch: 1,
        distill: 0.0,
    };
    let mut task = CptTask::new(settings, enc, dec, data, &f.s("dec")).unwrap();
    let out = f.path(out);
    let cfg = LoopConfig {
        steps: 3,
        batch_size: 2,
        micro_batch: 1,
        schedule: LrSchedule {
            peak: 1e-3,
            warmup: 1,
            total: 3,
            min_frac: 0.1,
        },
        clip: 1.0,
        optimizer: AdamWConfig::default(),
        log_every: 1,
        save_every: 2,
        out_dir: out.clone(),
        seed: 1,
        quiet: true,
        eval: false,
        resume: None,
        workers: false,
    };
    run::train(&mut task, &cfg, &AtomicBool::new(false)).unwrap();
    out
}

#[test]
fn saved_encoder_and_projector_give_inference_the_same_vectors() {
    let f = Fixture::new();
    let out = run_cpt(&f, CptMode::Recon, None, "recon");
    let cfg = refrag::io::checkpoint::RefragConfig::read(&out).unwrap();
    assert_eq!(cfg.parts, vec!["encoder", "projector"]);
    assert_eq!((cfg.stage.as_str(), cfg.step, cfg.k), ("cpt_recon", 3, 4));
    let dec = f.decoder(parts::DecoderTraining::Frozen);
    let trained = TrainEncoder::load(
        &f.s("enc"),
        Some(&part_path(&out, "encoder")),
        Pooling::Mean,
        64,
        ProjectorInit::File(&part_path(&out, "projector")),
        &dev(),
    )
    .unwrap();
    let ours = trained.embed(&TEXTS).unwrap();
    let inf = ChunkEncoder::load(None, Some(&out), &dec.decoder, 0, &dev()).unwrap();
    assert!(inf.trained);
    let theirs = inf.project(&inf.encode(&TEXTS, 8).unwrap()).unwrap();
    assert!(
        max_diff(&ours, &theirs) < 1e-4,
        "{}",
        max_diff(&ours, &theirs)
    );
    // The base encoder gives other vectors: the trained weights were really used.
    let base = train_encoder(&f, Pooling::Mean).encode(&TEXTS).unwrap();
    assert!(max_diff(&base, &trained.encode(&TEXTS).unwrap()) > 1e-4);
}

#[test]
fn trained_decoder_loads_into_the_pipeline_with_the_same_logits() {
    let f = Fixture::new();
    run_cpt(&f, CptMode::Recon, None, "recon");
    let out = run_cpt(&f, CptMode::Next, Some("recon"), "next");
    let cfg = refrag::io::checkpoint::RefragConfig::read(&out).unwrap();
    assert_eq!(cfg.parts, vec!["encoder", "projector", "decoder"]);
    let trained = parts::load_decoder(
        &f.s("dec"),
        Some(&out),
        None,
        &parts::DecoderTraining::Full,
        &dev(),
    )
    .unwrap();
    let refrag = Refrag::load(None, &f.s("dec"), Some(&out), 0, &dev()).unwrap();
    let base = f.decoder(parts::DecoderTraining::Frozen);
    let ids = Tensor::new(&[[1u32, 40, 250, 7, 99]], &dev()).unwrap();
    let logits = |d: &Decoder| d.forward_ids(&ids, None, Logits::All).unwrap();
    let (a, b) = (logits(&trained.decoder), logits(&refrag.decoder));
    assert!(max_diff(&a, &b) < 1e-4);
    assert!(
        max_diff(&a, &logits(&base.decoder)) > 1e-4,
        "the decoder did not train"
    );
    assert_eq!(refrag.dtok.eos_ids(), base.tok.eos_ids());
}

#[test]
fn mismatched_checkpoints_fail_naming_the_tensor() {
    let f = Fixture::new();
    let out = run_cpt(&f, CptMode::Recon, None, "recon");
    // A projector for another decoder width.
    let e = TrainEncoder::load(
        &f.s("enc"),
        None,
        Pooling::Mean,
        32,
        ProjectorInit::File(&part_path(&out, "projector")),
        &dev(),
    )
    .err()
    .unwrap();
    assert!(format!("{e:#}").contains("has shape"), "{e:#}");
    // An encoder with one layer fewer than the checkpoint.
    let small = f.path("enc1");
    std::fs::create_dir_all(&small).unwrap();
    for name in ["tokenizer.json", "model.safetensors", "vocab.txt"] {
        std::fs::copy(f.path("enc").join(name), small.join(name)).unwrap();
    }
    let mut cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(f.path("enc/config.json")).unwrap()).unwrap();
    cfg["num_hidden_layers"] = 1.into();
    std::fs::write(small.join("config.json"), cfg.to_string()).unwrap();
    let e = TrainEncoder::load(
        small.to_str().unwrap(),
        Some(&part_path(&out, "encoder")),
        Pooling::Mean,
        64,
        ProjectorInit::File(&part_path(&out, "projector")),
        &dev(),
    )
    .err()
    .unwrap();
    assert!(
        format!("{e:#}").contains("unexpected tensor 'encoder.layer.1."),
        "{e:#}"
    );
    // A decoder file missing a tensor.
    let next = run_cpt(&f, CptMode::Next, Some("recon"), "next");
    let p = part_path(&next, "decoder");
    let mut t = candle_core::safetensors::load(&p, &dev()).unwrap();
    t.remove("model.norm.weight");
    candle_core::safetensors::save(&t, &p).unwrap();
    let e = Refrag::load(None, &f.s("dec"), Some(&next), 0, &dev())
        .err()
        .unwrap();
    assert!(format!("{e:#}").contains("model.norm.weight"), "{e:#}");
}

#[test]
fn qa_layout_is_the_layout_generate_prepares() {
    let f = Fixture::new();
    let refrag = Refrag::load(Some(&f.s("enc")), &f.s("dec"), None, 0, &dev()).unwrap();
    let passages: Vec<Passage> = (0..3)
        .map(|i| Passage {
            id: i,
            text: passage(i),
        })
        .collect();
    let texts: Vec<String> = passages.iter().map(|p| p.text.clone()).collect();
    let q = "Which river flows through City_1?";
    for (k, ctx_max) in [(4, 1000), (16, 40)] {
        let want = refrag
            .prepare(q, &passages, &refrag::pipeline::Encode, k, ctx_max)
            .unwrap()
            .layout;
        let got = qa_layout(&refrag.dtok, q, &texts, k, ctx_max).unwrap();
        assert_eq!(got.segments, want.segments);
        assert_eq!(got.chunks, want.chunks);
    }
}
