//! The lexical half of the index: BM25 (the `bm25` crate) over a tokenizer that keeps identifiers
//! such as `City_101` whole.
//!
//! Splitting `City_101` into `city` + `101` would make every passage that mentions any `*_101`
//! entity match, so a token is a maximal run of letters, digits and underscores, lower-cased. An
//! identifier also yields its parts that hold a letter (`river_044` gives `river_044` and `river`,
//! never `044`), so "which river" still matches passages naming `River_044`. CJK ideographs are one
//! token each (those scripts do not separate words by spaces).
//!
//! The BM25 index is not stored: it is rebuilt from the stored passages when an index is opened
//! (about 0.1 s for 3,000 passages), so there is no second format to keep in step.

use serde::{Deserialize, Serialize};

/// Name of the tokenizer below, recorded in the manifest; change it when the rules change.
pub const TOKENIZER_NAME: &str = "identifier-v1";

/// BM25 parameters, recorded in the manifest.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Bm25Params {
    pub k1: f32,
    pub b: f32,
}

impl Default for Bm25Params {
    fn default() -> Self {
        Self { k1: 1.2, b: 0.75 }
    }
}

fn is_cjk(c: char) -> bool {
    matches!(c as u32,
        0x3040..=0x30FF   // kana
        | 0x3400..=0x4DBF // CJK extension A
        | 0x4E00..=0x9FFF // CJK unified ideographs
        | 0xAC00..=0xD7AF // Hangul syllables
        | 0xF900..=0xFAFF // compatibility ideographs
        | 0x20000..=0x2FFFF)
}

/// Push `word` (leading/trailing `_` trimmed) and, for an identifier, its parts that hold a letter.
fn push_word(word: &str, out: &mut Vec<String>) {
    let t = word.trim_matches('_');
    if t.is_empty() {
        return;
    }
    out.push(t.to_string());
    if t.contains('_') {
        for part in t.split('_') {
            if part.chars().any(char::is_alphabetic) {
                out.push(part.to_string());
            }
        }
    }
}

/// Lower-cased tokens: runs of alphanumerics and `_` (plus the lettered parts of identifiers),
/// each CJK character on its own.
pub fn lexical_tokens(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let flush = |cur: &mut String, out: &mut Vec<String>| {
        push_word(cur, out);
        cur.clear();
    };
    for c in text.chars() {
        if is_cjk(c) {
            flush(&mut cur, &mut out);
            out.push(c.to_string());
        } else if c.is_alphanumeric() || c == '_' {
            cur.extend(c.to_lowercase());
        } else {
            flush(&mut cur, &mut out);
        }
    }
    flush(&mut cur, &mut out);
    out
}

/// [`lexical_tokens`] as a `bm25` tokenizer.
#[derive(Debug, Clone, Copy, Default)]
pub struct IdentifierTokenizer;

impl bm25::Tokenizer for IdentifierTokenizer {
    fn tokenize(&self, input_text: &str) -> Vec<String> {
        lexical_tokens(input_text)
    }
}

/// A BM25 index over passages `0..n`.
pub struct Bm25Index {
    embedder: bm25::Embedder<u64, IdentifierTokenizer>,
    scorer: bm25::Scorer<usize, u64>,
}

impl Bm25Index {
    /// Index `passages` (ids are positions).
    pub fn build(passages: &[String], params: Bm25Params) -> Self {
        let refs: Vec<&str> = passages.iter().map(String::as_str).collect();
        let embedder =
            bm25::EmbedderBuilder::<u64, IdentifierTokenizer>::with_tokenizer_and_fit_to_corpus(
                IdentifierTokenizer,
                &refs,
            )
            .k1(params.k1)
            .b(params.b)
            .build();
        let mut scorer = bm25::Scorer::<usize, u64>::new();
        for (id, text) in refs.iter().enumerate() {
            scorer.upsert(&id, embedder.embed(text));
        }
        Self { embedder, scorer }
    }

    /// The `n` best passages as `(id, score)`, best first; ties broken by id so results do not
    /// depend on hash order. Passages sharing no token with the query are not returned.
    pub fn search(&self, query: &str, n: usize) -> Vec<(usize, f32)> {
        let q = self.embedder.embed(query);
        let mut hits: Vec<(usize, f32)> = self
            .scorer
            .matches(&q)
            .into_iter()
            .map(|d| (d.id, d.score))
            .collect();
        hits.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        hits.truncate(n);
        hits
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_stay_whole() {
        assert_eq!(
            lexical_tokens("Which river flows through City_101? (see River_044, -60.0)"),
            vec![
                "which",
                "river",
                "flows",
                "through",
                "city_101",
                "city",
                "see",
                "river_044",
                "river",
                "60",
                "0"
            ]
        );
        assert_eq!(lexical_tokens("__x__ Ünïcode"), vec!["x", "ünïcode"]);
        assert_eq!(
            lexical_tokens("Metal_05a_7"),
            vec!["metal_05a_7", "metal", "05a"]
        );
        assert_eq!(lexical_tokens("这座城市"), vec!["这", "座", "城", "市"]);
        assert!(lexical_tokens(" .,; ").is_empty());
    }

    #[test]
    fn bm25_finds_the_identifier_not_its_number() {
        let mut passages: Vec<String> = [
            "City_7 lies on River_101.",
            "City_101 lies on River_7.",
            "Person_7 was born in City_70.",
            "City_7 hosts Event_3.",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        passages.extend((10..30).map(|i| format!("River_{i} flows through City_{i}.")));
        let idx = Bm25Index::build(&passages, Bm25Params::default());
        let hits = idx.search("Which river flows through City_7?", 10);
        let ids: Vec<usize> = hits.iter().map(|h| h.0).collect();
        // Only passages 0 and 3 name City_7; `city`/`river` give the others a little score.
        assert!(ids[..2].contains(&0) && ids[..2].contains(&3), "{hits:?}");
        assert!(hits[1].1 > 1.5 * hits[2].1, "{hits:?}");
        assert!(idx.search("nothing matches", 5).is_empty());
    }
}
