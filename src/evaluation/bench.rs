//! The library side of `refrag bench`: contexts of exactly N decoder tokens cut from corpus
//! passages (each passage chunked on its own, as `generate` does), the decoder's FLOPs from its
//! config, one row of results per configuration, the markdown tables and the SVG plot of TTFT
//! against context length.

use std::path::Path;

use anyhow::{Context, Result};
use plotters::prelude::*;
use serde::{Deserialize, Serialize};

use crate::compression::prompt::chunk_tokens;
use crate::decoder::DecoderConfig;

/// The first passages of `passages` (decoder tokens each), the last one cut short, so that they
/// hold exactly `n` tokens; each passage is then cut into chunks of `k`. `None` when the
/// passages hold fewer than `n` tokens.
pub fn context_chunks(passages: &[Vec<u32>], n: usize, k: usize) -> Option<Vec<Vec<Vec<u32>>>> {
    let mut left = n;
    let mut out = Vec::new();
    for p in passages {
        if left == 0 {
            break;
        }
        let take = p.len().min(left);
        if take > 0 {
            out.push(chunk_tokens(&p[..take], k));
        }
        left -= take;
    }
    (left == 0).then_some(out)
}

/// FLOPs of the linear layers of one decoder layer for one token (a multiply-add counts 2):
/// q, k, v, o projections and the gated MLP.
fn layer_linear_flops(c: &DecoderConfig) -> f64 {
    let (d, f) = (c.hidden_size as f64, c.intermediate_size as f64);
    let q = (c.num_attention_heads * c.head_dim) as f64;
    let kv = (c.num_key_value_heads * c.head_dim) as f64;
    2.0 * (d * q + 2.0 * d * kv + q * d + 3.0 * d * f)
}

/// FLOPs of one decoding step at short context: every layer's linear maps plus the LM head
/// (attention over the cache excluded).
pub fn token_flops(c: &DecoderConfig) -> f64 {
    c.num_hidden_layers as f64 * layer_linear_flops(c) + 2.0 * (c.hidden_size * c.vocab_size) as f64
}

/// FLOPs of a prefill of `t` positions that returns the last position's logits: the linear maps
/// of every position, causal attention (`q k^T` and `a v` over the lower triangle,
/// `2 * heads * head_dim * t * (t + 1)` per layer), and the LM head once.
pub fn prefill_flops(c: &DecoderConfig, t: usize) -> f64 {
    let t = t as f64;
    let layers = c.num_hidden_layers as f64;
    let attn = 2.0 * (c.num_attention_heads * c.head_dim) as f64 * t * (t + 1.0);
    layers * (t * layer_linear_flops(c) + attn) + 2.0 * (c.hidden_size * c.vocab_size) as f64
}

/// One configuration's medians, REFRAG against full context on the same input.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BenchRow {
    pub k: usize,
    pub p: f64,
    pub context_tokens: usize,
    /// Chunk encoder vectors precomputed outside the timed region.
    pub cached: bool,
    pub chunks: usize,
    pub expanded: usize,
    pub positions_full: usize,
    pub positions_refrag: usize,
    pub ttft_full_sec: f64,
    pub ttft_refrag_sec: f64,
    /// `ttft_full_sec / ttft_refrag_sec`.
    pub speedup: f64,
    /// Prefill FLOPs of the full input / of the REFRAG input: the speed-up an implementation
    /// equally efficient at every length would show, encoding aside.
    #[serde(default)]
    pub flop_speedup: f64,
    pub selection_sec: f64,
    pub encoding_sec: f64,
    pub projection_sec: f64,
    pub prefill_refrag_sec: f64,
    /// Mean seconds per decoded token after the first, REFRAG side.
    pub ttit_sec: f64,
    /// Decoded tokens per second, REFRAG side.
    pub tokens_per_sec: f64,
    pub ttit_full_sec: f64,
    pub tokens_per_sec_full: f64,
    /// `tokens_per_sec / tokens_per_sec_full`.
    pub throughput_speedup: f64,
    /// Full-context prefill: input positions per second.
    pub prefill_tok_per_sec_full: f64,
    /// Full-context prefill: GFLOP/s achieved, from [`prefill_flops`].
    pub prefill_gflops_full: f64,
    /// `prefill_gflops_full` / the peak given with `--peak_gflops`.
    pub peak_fraction_full: f64,
}

impl BenchRow {
    /// The configuration's name in the table and the plot's legend.
    pub fn label(&self) -> String {
        let cache = if self.cached { "cached" } else { "uncached" };
        format!("REFRAG k={} p={} {cache}", self.k, self.p)
    }
}

/// The markdown tables: REFRAG against full context per configuration, then the full-context
/// prefill throughput per context length.
pub fn markdown(rows: &[BenchRow]) -> String {
    let mut out = String::from(
        "| k | context | p | cached | positions (REFRAG / full) | TTFT full (s) | TTFT REFRAG (s) | speed-up | FLOP ratio | encode (s) | TTIT REFRAG / full (ms) | tok/s REFRAG / full |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} / {} | {:.3} | {:.3} | {:.2}x | {:.1}x | {:.3} | {:.1} / {:.1} | {:.1} / {:.1} |\n",
            r.k, r.context_tokens, r.p, if r.cached { "yes" } else { "no" },
            r.positions_refrag, r.positions_full, r.ttft_full_sec, r.ttft_refrag_sec, r.speedup,
            r.flop_speedup, r.encoding_sec, r.ttit_sec * 1e3, r.ttit_full_sec * 1e3, r.tokens_per_sec,
            r.tokens_per_sec_full,
        ));
    }
    out.push_str("\n| context | positions | TTFT full (s) | prefill tok/s | GFLOP/s | of peak |\n|---|---|---|---|---|---|\n");
    let mut seen = Vec::new();
    for r in rows {
        if seen.contains(&r.context_tokens) {
            continue;
        }
        seen.push(r.context_tokens);
        out.push_str(&format!(
            "| {} | {} | {:.3} | {:.0} | {:.1} | {:.1}% |\n",
            r.context_tokens,
            r.positions_full,
            r.ttft_full_sec,
            r.prefill_tok_per_sec_full,
            r.prefill_gflops_full,
            100.0 * r.peak_fraction_full
        ));
    }
    out
}

/// Points `(context tokens, TTFT seconds)` of each line of the plot: full context first, then
/// each REFRAG configuration, in the order they first appear in `rows`.
pub fn plot_series(rows: &[BenchRow]) -> Vec<(String, Vec<(f64, f64)>)> {
    let mut series: Vec<(String, Vec<(f64, f64)>)> = vec![("full context (p=1)".into(), vec![])];
    for r in rows {
        let x = r.context_tokens as f64;
        if !series[0].1.iter().any(|&(cx, _)| cx == x) {
            series[0].1.push((x, r.ttft_full_sec));
        }
        let label = r.label();
        match series.iter_mut().find(|(l, _)| *l == label) {
            Some((_, pts)) => pts.push((x, r.ttft_refrag_sec)),
            None => series.push((label, vec![(x, r.ttft_refrag_sec)])),
        }
    }
    for (_, pts) in &mut series {
        pts.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
    series
}

/// Draw TTFT against context length, both axes logarithmic, one line per configuration, as SVG.
pub fn plot_svg(rows: &[BenchRow], path: &Path) -> Result<()> {
    let series = plot_series(rows);
    let pts = series.iter().flat_map(|(_, p)| p.iter());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in pts {
        (x0, x1) = (x0.min(x), x1.max(x));
        (y0, y1) = (y0.min(y.max(1e-6)), y1.max(y.max(1e-6)));
    }
    if x0 > x1 {
        anyhow::bail!("no rows to plot into {}", path.display());
    }
    let root = SVGBackend::new(path, (960, 640)).into_drawing_area();
    let draw = |e: &dyn std::fmt::Display| anyhow::anyhow!("drawing {}: {e}", path.display());
    root.fill(&WHITE).map_err(|e| draw(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption("Time to first token vs context length", ("sans-serif", 24))
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(64)
        .build_cartesian_2d(
            (x0 / 1.2..x1 * 1.2).log_scale(),
            (y0 / 1.5..y1 * 1.5).log_scale(),
        )
        .map_err(|e| draw(&e))?;
    chart
        .configure_mesh()
        .x_desc("context tokens")
        .y_desc("TTFT (s)")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| format!("{y}"))
        .draw()
        .map_err(|e| draw(&e))?;
    for (i, (label, pts)) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let width = if i == 0 { 3 } else { 2 };
        chart
            .draw_series(LineSeries::new(
                pts.iter().copied(),
                color.stroke_width(width),
            ))
            .map_err(|e| draw(&e))?
            .label(label.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()
        .map_err(|e| draw(&e))?;
    root.present()
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decoder::Arch;

    #[test]
    fn contexts_hold_exactly_n_tokens_chunked_per_passage() {
        let passages = vec![vec![1u32; 5], vec![2; 7], vec![3; 4]];
        let c = context_chunks(&passages, 9, 4).unwrap();
        assert_eq!(c.len(), 2);
        assert_eq!(c[0], vec![vec![1; 4], vec![1]]);
        assert_eq!(c[1], vec![vec![2; 4]]);
        let total: usize = c.iter().flatten().map(Vec::len).sum();
        assert_eq!(total, 9);
        assert_eq!(context_chunks(&passages, 16, 4).unwrap().len(), 3);
        assert!(context_chunks(&passages, 17, 4).is_none());
    }

    #[test]
    fn flops_of_smollm2_135m() {
        // SmolLM2-135M: 30 layers, width 576, 9 heads / 3 KV heads of 64, MLP 1536, vocab 49152.
        let c = DecoderConfig {
            hidden_size: 576,
            intermediate_size: 1536,
            num_hidden_layers: 30,
            num_attention_heads: 9,
            num_key_value_heads: 3,
            head_dim: 64,
            vocab_size: 49152,
            ..crate::testing::llama::tiny_config(Arch::Llama)
        };
        let per_token = token_flops(&c);
        assert!((per_token / 1e9 - 0.269).abs() < 0.001, "{per_token}");
        // One position: linear maps + a 1x1 attention + the LM head = one decoding step + 2*9*64*2*30.
        let one = prefill_flops(&c, 1);
        assert!((one - per_token - 30.0 * 2.0 * 576.0 * 2.0).abs() < 1.0);
        // Attention grows quadratically: at 4096 positions it adds ~0.58 TFLOP.
        let attn = prefill_flops(&c, 4096) - 4096.0 * (per_token - 2.0 * 576.0 * 49152.0);
        assert!((attn / 1e12 - 0.58).abs() < 0.01, "{attn}");
    }

    fn row(k: usize, ctx: usize, cached: bool, full: f64, refrag: f64) -> BenchRow {
        BenchRow {
            k,
            p: 0.0,
            context_tokens: ctx,
            cached,
            chunks: ctx / k,
            expanded: 0,
            positions_full: ctx + 10,
            positions_refrag: ctx / k + 10,
            ttft_full_sec: full,
            ttft_refrag_sec: refrag,
            speedup: full / refrag,
            flop_speedup: 1.0,
            selection_sec: 0.0,
            encoding_sec: 0.0,
            projection_sec: 0.0,
            prefill_refrag_sec: refrag,
            ttit_sec: 0.01,
            tokens_per_sec: 100.0,
            ttit_full_sec: 0.02,
            tokens_per_sec_full: 50.0,
            throughput_speedup: 2.0,
            prefill_tok_per_sec_full: 1000.0,
            prefill_gflops_full: 10.0,
            peak_fraction_full: 0.1,
        }
    }

    #[test]
    fn plot_has_one_line_per_configuration() {
        let rows = vec![
            row(8, 1024, true, 2.0, 0.2),
            row(8, 512, true, 1.0, 0.1),
            row(8, 512, false, 1.0, 0.3),
            row(16, 512, true, 1.0, 0.05),
        ];
        let s = plot_series(&rows);
        let labels: Vec<&str> = s.iter().map(|(l, _)| l.as_str()).collect();
        assert_eq!(
            labels,
            [
                "full context (p=1)",
                "REFRAG k=8 p=0 cached",
                "REFRAG k=8 p=0 uncached",
                "REFRAG k=16 p=0 cached"
            ]
        );
        assert_eq!(s[0].1, vec![(512.0, 1.0), (1024.0, 2.0)]);
        assert_eq!(s[1].1, vec![(512.0, 0.1), (1024.0, 0.2)]);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ttft.svg");
        plot_svg(&rows, &path).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("REFRAG k=16 p=0 cached"));
        let md = markdown(&rows);
        assert!(md.contains("| 8 | 1024 | 0 | yes | 138 / 1034 | 2.000 | 0.200 | 10.00x | 1.0x"));
    }
}
