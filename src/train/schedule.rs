//! Everything a training run decides from the step number alone, so that a resumed run makes the
//! same decisions as an uninterrupted one: the learning rate (linear warm-up, cosine decay), the
//! curriculum's chunk count, which training items a step sees, and the step's random generator.

use anyhow::{bail, Context, Result};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The random generator of one step: ChaCha8 seeded with the run's seed, on the step's own stream
/// (stream 0 is left to weight initialisation).
pub fn step_rng(seed: u64, step: usize) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(step as u64 + 1);
    rng
}

/// The training items (indices into `0..n`) of step `step`, `batch` of them: consecutive slices
/// of a seeded permutation of the items, a new permutation every epoch.
pub fn batch_items(n: usize, batch: usize, seed: u64, step: usize) -> Vec<usize> {
    if n == 0 {
        return Vec::new();
    }
    let mut out = Vec::with_capacity(batch);
    let mut order: Option<(usize, Vec<usize>)> = None;
    for at in step * batch..(step + 1) * batch {
        let epoch = at / n;
        if order.as_ref().is_none_or(|(e, _)| *e != epoch) {
            order = Some((epoch, epoch_order(n, seed, epoch)));
        }
        out.push(order.as_ref().unwrap().1[at % n]);
    }
    out
}

/// The order of the items in `epoch`.
fn epoch_order(n: usize, seed: u64, epoch: usize) -> Vec<usize> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5EED_0FE9);
    rng.set_stream(epoch as u64);
    let mut v: Vec<usize> = (0..n).collect();
    v.shuffle(&mut rng);
    v
}

/// Linear warm-up to `peak` over `warmup` steps, then cosine decay to `min_frac * peak` at
/// `total` steps.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LrSchedule {
    pub peak: f64,
    pub warmup: usize,
    pub total: usize,
    pub min_frac: f64,
}

impl LrSchedule {
    /// The learning rate of step `step` (0-based).
    pub fn at(&self, step: usize) -> f64 {
        if step < self.warmup {
            return self.peak * (step + 1) as f64 / self.warmup as f64;
        }
        let span = self.total.saturating_sub(self.warmup).max(1) as f64;
        let t = ((step - self.warmup) as f64 / span).min(1.0);
        let min = self.min_frac * self.peak;
        min + (self.peak - min) * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())
    }
}

/// The chunks-per-example curriculum of reconstruction training: stages of equal length over the
/// run, each a mixture of chunk counts with weights.
#[derive(Debug, Clone, PartialEq)]
pub struct Curriculum {
    pub stages: Vec<Vec<(usize, f64)>>,
}

impl Curriculum {
    /// The default for up to `max_chunks` chunks: counts 1, 2, 4, ... up to `max_chunks` (always
    /// included); stage `i` mixes the first `i + 1` counts with weights 1, 2, 4, ..., so the run
    /// starts with single chunks only and ends weighted towards the most.
    pub fn default_for(max_chunks: usize) -> Self {
        let mut counts = Vec::new();
        let mut c = 1;
        while c < max_chunks {
            counts.push(c);
            c *= 2;
        }
        counts.push(max_chunks.max(1));
        let stages = (0..counts.len())
            .map(|i| {
                counts[..=i]
                    .iter()
                    .enumerate()
                    .map(|(j, &c)| (c, f64::from(1u32 << j)))
                    .collect()
            })
            .collect();
        Self { stages }
    }

    /// Parse `--curriculum`: stages separated by `;`, each a list of `chunks:weight` separated by
    /// `,` (e.g. `1:1;1:1,2:2;1:1,2:2,4:4`).
    pub fn parse(spec: &str) -> Result<Self> {
        let mut stages = Vec::new();
        for stage in spec.split(';').map(str::trim).filter(|s| !s.is_empty()) {
            let mut mix = Vec::new();
            for pair in stage.split(',').map(str::trim) {
                let (c, w) = pair
                    .split_once(':')
                    .with_context(|| format!("--curriculum: '{pair}' is not chunks:weight"))?;
                let c: usize = c
                    .trim()
                    .parse()
                    .with_context(|| format!("--curriculum: bad chunk count in '{pair}'"))?;
                let w: f64 = w
                    .trim()
                    .parse()
                    .with_context(|| format!("--curriculum: bad weight in '{pair}'"))?;
                if c == 0 || !(w >= 0.0 && w.is_finite()) {
                    bail!("--curriculum: '{pair}' needs chunks >= 1 and a weight >= 0");
                }
                mix.push((c, w));
            }
            if mix.iter().all(|m| m.1 == 0.0) {
                bail!("--curriculum: stage '{stage}' has no positive weight");
            }
            stages.push(mix);
        }
        if stages.is_empty() {
            bail!("--curriculum: no stages in '{spec}'");
        }
        Ok(Self { stages })
    }

    /// The largest chunk count any stage uses.
    pub fn max_chunks(&self) -> usize {
        self.stages.iter().flatten().map(|m| m.0).max().unwrap_or(1)
    }

    /// Every chunk count the curriculum uses, ascending.
    pub fn counts(&self) -> Vec<usize> {
        let mut c: Vec<usize> = self.stages.iter().flatten().map(|m| m.0).collect();
        c.sort_unstable();
        c.dedup();
        c
    }

    /// The stage of step `step` of `total`.
    pub fn stage(&self, step: usize, total: usize) -> usize {
        (step * self.stages.len() / total.max(1)).min(self.stages.len() - 1)
    }

    /// Draw the chunk count of step `step` of `total`.
    pub fn sample(&self, step: usize, total: usize, rng: &mut ChaCha8Rng) -> usize {
        let mix = &self.stages[self.stage(step, total)];
        let sum: f64 = mix.iter().map(|m| m.1).sum();
        let mut x = rng.random::<f64>() * sum;
        for &(c, w) in mix {
            if x < w {
                return c;
            }
            x -= w;
        }
        mix.iter().rev().find(|m| m.1 > 0.0).map_or(1, |m| m.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_cosine() {
        let s = LrSchedule {
            peak: 1.0,
            warmup: 4,
            total: 104,
            min_frac: 0.1,
        };
        assert_eq!(s.at(0), 0.25);
        assert_eq!(s.at(3), 1.0);
        assert!((s.at(4) - 1.0).abs() < 1e-12);
        assert!((s.at(54) - 0.55).abs() < 1e-12);
        assert!((s.at(104) - 0.1).abs() < 1e-12);
        assert!((s.at(500) - 0.1).abs() < 1e-12);
    }

    #[test]
    fn default_curriculum_grows_from_one_chunk() {
        let c = Curriculum::default_for(8);
        assert_eq!(c.stages.len(), 4);
        assert_eq!(c.stages[0], vec![(1, 1.0)]);
        assert_eq!(c.stages[3], vec![(1, 1.0), (2, 2.0), (4, 4.0), (8, 8.0)]);
        assert_eq!(Curriculum::default_for(6).max_chunks(), 6);
        assert_eq!(Curriculum::default_for(1).stages, vec![vec![(1, 1.0)]]);
        let mut rng = step_rng(0, 0);
        assert!((0..50).all(|_| c.sample(0, 100, &mut rng) == 1));
        assert_eq!(c.stage(99, 100), 3);
        let p = Curriculum::parse("1:1; 1:1, 4:3").unwrap();
        assert_eq!(p.stages[1], vec![(1, 1.0), (4, 3.0)]);
        assert!(Curriculum::parse("1:1;2").is_err());
        assert!(Curriculum::parse("0:1").is_err());
    }

    #[test]
    fn batches_cover_each_epoch_and_depend_only_on_the_step() {
        let mut seen: Vec<usize> = (0..5).flat_map(|s| batch_items(10, 2, 3, s)).collect();
        seen.sort();
        assert_eq!(seen, (0..10).collect::<Vec<_>>());
        assert_eq!(batch_items(10, 3, 3, 7), batch_items(10, 3, 3, 7));
        assert_ne!(batch_items(10, 3, 3, 7), batch_items(10, 3, 4, 7));
        let a: u64 = step_rng(1, 5).random();
        assert_eq!(a, step_rng(1, 5).random::<u64>());
        assert_ne!(a, step_rng(1, 6).random::<u64>());
    }
}
