//! Choosing which chunks to expand back to tokens: `round(p * L)` of the `L` chunks, by the
//! trained policy's scores, by the perplexity heuristic (the chunks the decoder finds hardest),
//! at random, or none / all for ablations.

pub mod heuristic;
pub mod policy;

use clap::ValueEnum;
use rand::seq::index::sample;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// Which chunks to expand back to tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SelectMode {
    None,
    All,
    Random,
    Heuristic,
    Policy,
}

/// How many of `chunks` chunks `p` expands: `round(p * chunks)`, within `0..=chunks`.
pub fn num_expand(p: f64, chunks: usize) -> usize {
    ((p.clamp(0.0, 1.0) * chunks as f64).round() as usize).min(chunks)
}

/// Expand the `n` chunks with the highest scores (ties go to the earlier chunk).
pub fn top_n(scores: &[f32], n: usize) -> Vec<bool> {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    let mut mask = vec![false; scores.len()];
    for &i in order.iter().take(n) {
        mask[i] = true;
    }
    mask
}

/// Expand `n` of `chunks` chunks chosen uniformly at random with `seed`.
pub fn random_n(chunks: usize, n: usize, seed: u64) -> Vec<bool> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut mask = vec![false; chunks];
    for i in sample(&mut rng, chunks, n.min(chunks)) {
        mask[i] = true;
    }
    mask
}

/// Expand `n` of the chunks (at least one when `first` marks any): the chunks `first` marks,
/// in order, up to `n`, then others chosen uniformly at random with `seed` until `n` are
/// expanded. `sft --gold_expand` lays out its examples this way, with `first` the chunks that
/// hold the gold answer, so that fine-tuning sees the expansions a good policy makes.
pub fn first_then_random(first: &[bool], n: usize, seed: u64) -> Vec<bool> {
    let chunks = first.len();
    let marked: Vec<usize> = (0..chunks).filter(|&i| first[i]).collect();
    let n = if marked.is_empty() { n } else { n.max(1) }.min(chunks);
    let mut mask = vec![false; chunks];
    for &i in marked.iter().take(n) {
        mask[i] = true;
    }
    let rest: Vec<usize> = (0..chunks).filter(|&i| !mask[i]).collect();
    let more = n - marked.len().min(n);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    for j in sample(&mut rng, rest.len(), more) {
        mask[rest[j]] = true;
    }
    mask
}

/// The selection rule actually used, from `--select`, `--heuristic` and whether a trained policy
/// is available: an explicit `--select` wins, then `--heuristic`, then the policy when present,
/// else the heuristic.
pub fn resolve_mode(select: Option<SelectMode>, heuristic: bool, have_policy: bool) -> SelectMode {
    match (select, heuristic, have_policy) {
        (Some(m), _, _) => m,
        (None, true, _) => SelectMode::Heuristic,
        (None, false, true) => SelectMode::Policy,
        (None, false, false) => SelectMode::Heuristic,
    }
}

/// What a [`Selector`] may ask about one question's chunks. Scores are computed when asked
/// (the heuristic costs decoder passes, the policy the chunks' projected embeddings), so a
/// selector that needs none costs nothing.
pub trait ChunkScores {
    /// Chunks in the question's layout.
    fn chunks(&self) -> usize;
    /// The perplexity heuristic's score of each chunk (higher: expand first).
    fn heuristic(&mut self) -> anyhow::Result<Vec<f32>>;
    /// The trained policy's score of each chunk (higher: expand first).
    fn policy(&mut self) -> anyhow::Result<Vec<f32>>;
}

/// A rule that chooses which chunks to expand: a mask over the chunks, `round(p * L)` of them
/// for the budgeted rules. `generate`, `eval`, `bench` and `chat` reach every rule through
/// this one seam ([`SelectMode::selector`]); a new rule is a new implementation.
pub trait Selector: Sync {
    /// The expansion mask over `scores.chunks()` chunks at expansion fraction `p`.
    fn mask(&self, scores: &mut dyn ChunkScores, p: f64, seed: u64) -> anyhow::Result<Vec<bool>>;
}

/// Expand nothing (every chunk compressed; `eval`'s compressed and no-context modes).
pub struct ExpandNone;
/// Expand everything (full context).
pub struct ExpandAll;
/// `round(p * L)` chunks uniformly at random.
pub struct RandomChunks;
/// The `round(p * L)` chunks with the highest heuristic scores.
pub struct HeuristicTop;
/// The `round(p * L)` chunks with the highest policy scores.
pub struct PolicyTop;

impl Selector for ExpandNone {
    fn mask(&self, s: &mut dyn ChunkScores, _p: f64, _seed: u64) -> anyhow::Result<Vec<bool>> {
        Ok(vec![false; s.chunks()])
    }
}

impl Selector for ExpandAll {
    fn mask(&self, s: &mut dyn ChunkScores, _p: f64, _seed: u64) -> anyhow::Result<Vec<bool>> {
        Ok(vec![true; s.chunks()])
    }
}

impl Selector for RandomChunks {
    fn mask(&self, s: &mut dyn ChunkScores, p: f64, seed: u64) -> anyhow::Result<Vec<bool>> {
        let l = s.chunks();
        Ok(random_n(l, num_expand(p, l), seed))
    }
}

/// The top `round(p * L)` of per-chunk `scores`, which must number `l`.
fn top_scored(name: &str, scores: Vec<f32>, l: usize, p: f64) -> anyhow::Result<Vec<bool>> {
    anyhow::ensure!(
        scores.len() == l,
        "{name} selection got {} scores for {l} chunks",
        scores.len()
    );
    Ok(top_n(&scores, num_expand(p, l)))
}

impl Selector for HeuristicTop {
    fn mask(&self, s: &mut dyn ChunkScores, p: f64, _seed: u64) -> anyhow::Result<Vec<bool>> {
        let l = s.chunks();
        top_scored("heuristic", s.heuristic()?, l, p)
    }
}

impl Selector for PolicyTop {
    fn mask(&self, s: &mut dyn ChunkScores, p: f64, _seed: u64) -> anyhow::Result<Vec<bool>> {
        let l = s.chunks();
        top_scored("policy", s.policy()?, l, p)
    }
}

impl SelectMode {
    /// The rule behind this `--select` value.
    pub fn selector(self) -> &'static dyn Selector {
        match self {
            SelectMode::None => &ExpandNone,
            SelectMode::All => &ExpandAll,
            SelectMode::Random => &RandomChunks,
            SelectMode::Heuristic => &HeuristicTop,
            SelectMode::Policy => &PolicyTop,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_round() {
        assert_eq!(num_expand(0.25, 10), 3);
        assert_eq!(num_expand(0.0, 10), 0);
        assert_eq!(num_expand(1.0, 7), 7);
        assert_eq!(num_expand(1.5, 7), 7);
    }

    #[test]
    fn top_n_takes_highest() {
        assert_eq!(
            top_n(&[0.1, 0.9, 0.5, 0.9], 2),
            vec![false, true, false, true]
        );
    }

    #[test]
    fn random_is_seeded() {
        let a = random_n(20, 5, 3);
        assert_eq!(a.iter().filter(|&&x| x).count(), 5);
        assert_eq!(a, random_n(20, 5, 3));
        assert_ne!(a, random_n(20, 5, 4));
    }

    #[test]
    fn first_then_random_takes_the_marked_chunks_first() {
        let first = [false, true, false, false, true, false, false, false];
        // Budget above the marked chunks: both marked, plus two others at random.
        let m = first_then_random(&first, 4, 7);
        assert_eq!(m.iter().filter(|&&x| x).count(), 4);
        assert!(m[1] && m[4]);
        assert_eq!(m, first_then_random(&first, 4, 7));
        assert_ne!(
            (0..20)
                .map(|s| first_then_random(&first, 4, s))
                .collect::<std::collections::HashSet<_>>()
                .len(),
            1,
            "the other chunks are drawn at random"
        );
        // Budget below them: the first marked chunk only.
        let m = first_then_random(&first, 1, 7);
        assert_eq!(m.iter().filter(|&&x| x).count(), 1);
        assert!(m[1]);
        // A zero budget still expands one marked chunk, and none when nothing is marked.
        assert_eq!(
            first_then_random(&first, 0, 7)
                .iter()
                .filter(|&&x| x)
                .count(),
            1
        );
        assert_eq!(first_then_random(&[false; 8], 0, 7), vec![false; 8]);
        assert_eq!(
            first_then_random(&[false; 8], 3, 7)
                .iter()
                .filter(|&&x| x)
                .count(),
            3
        );
    }

    /// Fixed scores that count how often each is asked for.
    struct Fixed {
        chunks: usize,
        heuristic: Result<Vec<f32>, String>,
        policy: Result<Vec<f32>, String>,
        asked: (usize, usize),
    }

    impl Fixed {
        fn new(heuristic: Vec<f32>, policy: Vec<f32>) -> Self {
            Self {
                chunks: heuristic.len(),
                heuristic: Ok(heuristic),
                policy: Ok(policy),
                asked: (0, 0),
            }
        }
    }

    impl ChunkScores for Fixed {
        fn chunks(&self) -> usize {
            self.chunks
        }
        fn heuristic(&mut self) -> anyhow::Result<Vec<f32>> {
            self.asked.0 += 1;
            self.heuristic.clone().map_err(anyhow::Error::msg)
        }
        fn policy(&mut self) -> anyhow::Result<Vec<f32>> {
            self.asked.1 += 1;
            self.policy.clone().map_err(anyhow::Error::msg)
        }
    }

    #[test]
    fn each_selector_asks_only_for_what_it_needs() {
        let h = vec![0.1, 0.9, 0.5, 0.2];
        let pol = vec![0.8, 0.1, 0.2, 0.7];
        let run = |mode: SelectMode, p: f64| {
            let mut s = Fixed::new(h.clone(), pol.clone());
            let m = mode.selector().mask(&mut s, p, 3).unwrap();
            (m, s.asked)
        };
        assert_eq!(run(SelectMode::None, 0.5), (vec![false; 4], (0, 0)));
        assert_eq!(run(SelectMode::All, 0.0), (vec![true; 4], (0, 0)));
        let (m, asked) = run(SelectMode::Random, 0.5);
        assert_eq!((m.iter().filter(|&&x| x).count(), asked), (2, (0, 0)));
        assert_eq!(m, random_n(4, 2, 3));
        assert_eq!(
            run(SelectMode::Heuristic, 0.5),
            (vec![false, true, true, false], (1, 0))
        );
        assert_eq!(
            run(SelectMode::Policy, 0.5),
            (vec![true, false, false, true], (0, 1))
        );
        // p = 1 expands every chunk whatever the scores.
        assert_eq!(run(SelectMode::Heuristic, 1.0).0, vec![true; 4]);
    }

    #[test]
    fn scored_selectors_fail_on_missing_or_miscounted_scores() {
        let mut s = Fixed::new(vec![0.0; 6], vec![0.0; 5]);
        let e = SelectMode::Policy
            .selector()
            .mask(&mut s, 0.5, 0)
            .unwrap_err();
        assert!(e.to_string().contains("5 scores for 6 chunks"), "{e}");
        s.heuristic = Err("needs a trained policy".into());
        assert!(SelectMode::Heuristic
            .selector()
            .mask(&mut s, 0.5, 0)
            .is_err());
        // No scores asked, no error.
        assert!(SelectMode::Random.selector().mask(&mut s, 0.5, 0).is_ok());
    }

    #[test]
    fn explicit_select_wins() {
        assert_eq!(
            resolve_mode(Some(SelectMode::Random), true, true),
            SelectMode::Random
        );
        assert_eq!(resolve_mode(None, true, true), SelectMode::Heuristic);
        assert_eq!(resolve_mode(None, false, true), SelectMode::Policy);
        assert_eq!(resolve_mode(None, false, false), SelectMode::Heuristic);
    }
}
