//! Answer-quality metrics for `refrag eval`: SQuAD-style answer normalisation, exact match
//! (the normalised gold answer occurs in the normalised output as whole words), token F1, and
//! whether the retrieved passages hold the one that answers the question (recall@k); plus the
//! small statistics (mean, median) the reports use.

use std::collections::HashMap;

use crate::synthetic;

/// SQuAD's normalisation: lower-case, drop ASCII punctuation, drop the articles `a`, `an`,
/// `the`, and collapse white space. Returns the remaining words.
pub fn normalize_words(s: &str) -> Vec<String> {
    let lower = s.to_lowercase();
    let no_punct: String = lower
        .chars()
        .filter(|c| !c.is_ascii_punctuation())
        .collect();
    no_punct
        .split_whitespace()
        .filter(|w| !matches!(*w, "a" | "an" | "the"))
        .map(str::to_string)
        .collect()
}

/// The normalised text: [`normalize_words`] joined by single spaces.
pub fn normalize_answer(s: &str) -> String {
    normalize_words(s).join(" ")
}

/// Exact match against one gold answer: the gold's normalised words occur, in order and
/// contiguous, among the output's normalised words. Containment (not equality) because a
/// decoder often wraps the answer in a sentence; whole words so that `Field_4` does not match
/// an output naming `Field_44`. An empty gold never matches.
pub fn contains_answer(output: &str, gold: &str) -> bool {
    let (out, gold) = (normalize_words(output), normalize_words(gold));
    !gold.is_empty() && out.windows(gold.len()).any(|w| w == gold.as_slice())
}

/// Exact match (0 or 1) of `output` against the best of `golds`.
pub fn exact_match(output: &str, golds: &[String]) -> f64 {
    f64::from(u8::from(golds.iter().any(|g| contains_answer(output, g))))
}

/// Token F1 of `output` against one gold answer, over normalised words (SQuAD's definition:
/// the harmonic mean of precision and recall of the shared words, counted with multiplicity).
pub fn f1(output: &str, gold: &str) -> f64 {
    let (out, gold) = (normalize_words(output), normalize_words(gold));
    if out.is_empty() || gold.is_empty() {
        return f64::from(u8::from(out == gold));
    }
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for w in &gold {
        *counts.entry(w).or_default() += 1;
    }
    let mut same = 0usize;
    for w in &out {
        if let Some(c) = counts.get_mut(w.as_str()) {
            if *c > 0 {
                *c -= 1;
                same += 1;
            }
        }
    }
    if same == 0 {
        return 0.0;
    }
    let precision = same as f64 / out.len() as f64;
    let recall = same as f64 / gold.len() as f64;
    2.0 * precision * recall / (precision + recall)
}

/// Token F1 of `output` against the best of `golds`.
pub fn best_f1(output: &str, golds: &[String]) -> f64 {
    golds.iter().map(|g| f1(output, g)).fold(0.0, f64::max)
}

/// Whether `passage` answers the question: it names the question's entity (`City_10003`, as a
/// whole name) and contains one of the answer strings. A question without an entity name falls
/// back to the answer string alone. Nothing here depends on line numbers of a corpus.
pub fn answers_question(passage: &str, question: &str, answers: &[String]) -> bool {
    let has_answer = answers
        .iter()
        .any(|a| !a.is_empty() && passage.contains(a.as_str()));
    match synthetic::question_entity(question) {
        Some(entity) => has_answer && synthetic::names_in(passage).contains(&entity),
        None => has_answer,
    }
}

/// Recall@k for one question: whether any of the retrieved passages answers it.
pub fn gold_retrieved<'a>(
    passages: impl IntoIterator<Item = &'a str>,
    question: &str,
    answers: &[String],
) -> bool {
    passages
        .into_iter()
        .any(|p| answers_question(p, question, answers))
}

/// Mean of `xs` (0 when empty).
pub fn mean(xs: &[f64]) -> f64 {
    if xs.is_empty() {
        0.0
    } else {
        xs.iter().sum::<f64>() / xs.len() as f64
    }
}

/// Median of `xs` (mean of the two middle values for an even count; 0 when empty).
pub fn median(xs: &[f64]) -> f64 {
    if xs.is_empty() {
        return 0.0;
    }
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn golds(g: &[&str]) -> Vec<String> {
        g.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn normalisation_is_squads() {
        assert_eq!(normalize_answer("The  Eiffel Tower!"), "eiffel tower");
        assert_eq!(normalize_answer("An apple, a day."), "apple day");
        assert_eq!(normalize_answer("Field_44."), "field44");
        assert_eq!(normalize_answer("662 °C"), "662 °c");
        assert_eq!(normalize_answer("  "), "");
        // Articles only as whole words.
        assert_eq!(normalize_answer("Theatre Anna"), "theatre anna");
    }

    #[test]
    fn exact_match_is_whole_word_containment() {
        let g = golds(&["Field_44"]);
        assert_eq!(exact_match("Field_44", &g), 1.0);
        assert_eq!(exact_match("He works in field_44.", &g), 1.0);
        assert_eq!(exact_match("Field_444", &g), 0.0);
        assert_eq!(exact_match("Field_4", &golds(&["Field_44"])), 0.0);
        assert_eq!(exact_match("Field 4 4", &g), 0.0);
        assert_eq!(exact_match("It melts at 662 °C.", &golds(&["662 °C"])), 1.0);
        assert_eq!(exact_match("anything", &golds(&["", "x"])), 0.0);
        assert_eq!(exact_match("x", &[]), 0.0);
        // The best of several golds.
        assert_eq!(
            exact_match("River_465", &golds(&["River_1", "River_465"])),
            1.0
        );
    }

    #[test]
    fn f1_counts_shared_words() {
        assert_eq!(f1("Field_44", "Field_44"), 1.0);
        assert_eq!(f1("in Field_44", "Field_44"), 2.0 / 3.0);
        assert_eq!(f1("nothing here", "Field_44"), 0.0);
        // precision 1/2, recall 1/3: F1 = 0.4.
        assert!((f1("662 kelvin", "662 °C exactly") - 0.4).abs() < 1e-12);
        // Multiplicity: two "red" in the output, one in the gold.
        assert!((f1("red red", "red") - 2.0 / 3.0).abs() < 1e-12);
        assert_eq!(f1("", ""), 1.0);
        assert_eq!(f1("the", "x"), 0.0);
        assert_eq!(best_f1("Field_44", &golds(&["x", "Field_44"])), 1.0);
    }

    #[test]
    fn gold_passage_needs_entity_and_answer() {
        let q = "Which river flows through City_10004?";
        let a = golds(&["River_465"]);
        let gold = "TITLE: Atlas Entry — City_10004. It lies on the banks of River_465.";
        assert!(answers_question(gold, q, &a));
        assert!(!answers_question(
            "TITLE: Atlas Entry — City_100045. River_465.",
            q,
            &a
        ));
        assert!(!answers_question(
            "TITLE: Atlas Entry — City_10004. River_46.",
            q,
            &a
        ));
        assert!(gold_retrieved(["x", gold], q, &a));
        assert!(!gold_retrieved(["x"], q, &a));
        // No entity in the question: the answer string decides.
        assert!(answers_question(
            "Paris is in France.",
            "Capital?",
            &golds(&["Paris"])
        ));
    }

    #[test]
    fn stats() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median(&[]), 0.0);
        assert_eq!(mean(&[1.0, 2.0]), 1.5);
    }
}
