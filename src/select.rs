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

/// The expansion mask for `mode`, given per-chunk scores where the mode needs them (heuristic:
/// perplexities; policy: the policy's scores). Fails when a scored mode has no scores, or
/// scores of another length than `chunks`.
pub fn expansion_mask(
    mode: SelectMode,
    p: f64,
    scores: Option<&[f32]>,
    chunks: usize,
    seed: u64,
) -> anyhow::Result<Vec<bool>> {
    Ok(match mode {
        SelectMode::None => vec![false; chunks],
        SelectMode::All => vec![true; chunks],
        SelectMode::Random => random_n(chunks, num_expand(p, chunks), seed),
        SelectMode::Heuristic | SelectMode::Policy => match scores {
            Some(s) if s.len() == chunks => top_n(s, num_expand(p, chunks)),
            Some(s) => anyhow::bail!(
                "{mode:?} selection got {} scores for {chunks} chunks",
                s.len()
            ),
            None => anyhow::bail!("{mode:?} selection needs a score per chunk"),
        },
    })
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

    #[test]
    fn p_one_expands_everything() {
        let m = expansion_mask(SelectMode::Heuristic, 1.0, Some(&[0.0; 6]), 6, 0).unwrap();
        assert!(m.iter().all(|&x| x));
        // A scored mode without scores, or with the wrong number, is an error, not a panic.
        assert!(expansion_mask(SelectMode::Policy, 0.5, None, 6, 0).is_err());
        assert!(expansion_mask(SelectMode::Policy, 0.5, Some(&[0.0; 5]), 6, 0).is_err());
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
