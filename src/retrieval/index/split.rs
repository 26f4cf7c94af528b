//! Cutting a document's text into passages of at most `--passage_tokens` retrieval-model
//! tokens: whole paragraphs packed together, over-long paragraphs cut at sentence ends with
//! `--passage_overlap` tokens of whole sentences repeated, over-long sentences cut into token
//! windows (the rules: [`super::documents`]). Ranges are byte offsets into the text.

use std::path::Path;

use anyhow::{bail, Context, Result};
use tokenizers::Tokenizer;

/// Cuts texts into passages of at most `max_tokens` tokens of `tok`.
pub struct Splitter {
    tok: Tokenizer,
    pub max_tokens: usize,
    pub overlap: usize,
}

/// A piece of a text: bytes `[start, end)` and its token count.
#[derive(Debug, Clone, Copy)]
struct Piece {
    start: usize,
    end: usize,
    tokens: usize,
}

impl Splitter {
    /// A splitter counting with the tokenizer at `path` (no truncation, no special tokens).
    pub fn new(tokenizer: &Path, max_tokens: usize, overlap: usize) -> Result<Self> {
        // A budget of 0 tokens is refused here too (no overlap is smaller than it).
        if overlap >= max_tokens {
            bail!("--passage_overlap {overlap} must be smaller than --passage_tokens {max_tokens}");
        }
        let mut tok = Tokenizer::from_file(tokenizer)
            .map_err(anyhow::Error::msg)
            .with_context(|| format!("reading tokenizer {}", tokenizer.display()))?;
        tok.with_padding(None);
        tok.with_truncation(None).map_err(anyhow::Error::msg)?;
        Ok(Self {
            tok,
            max_tokens,
            overlap,
        })
    }

    /// Tokens of `text`, without special tokens.
    pub fn count(&self, text: &str) -> Result<usize> {
        Ok(self
            .tok
            .encode(text, false)
            .map_err(anyhow::Error::msg)?
            .len())
    }

    fn piece(&self, text: &str, start: usize, end: usize) -> Result<Piece> {
        let tokens = self.count(&text[start..end])?;
        Ok(Piece { start, end, tokens })
    }

    /// Byte ranges of the passages of a document `text`.
    pub fn split(&self, text: &str) -> Result<Vec<(usize, usize)>> {
        let mut out = Vec::new();
        let mut cur: Option<Piece> = None;
        for (start, end) in paragraphs(text) {
            let p = self.piece(text, start, end)?;
            if p.tokens > self.max_tokens {
                out.extend(cur.take().map(|c| (c.start, c.end)));
                out.extend(self.split_long(text, p)?);
                continue;
            }
            cur = match cur {
                Some(c) if c.tokens + p.tokens <= self.max_tokens => Some(Piece {
                    end: p.end,
                    tokens: c.tokens + p.tokens,
                    ..c
                }),
                Some(c) => {
                    out.push((c.start, c.end));
                    Some(p)
                }
                None => Some(p),
            };
        }
        out.extend(cur.map(|c| (c.start, c.end)));
        Ok(out)
    }

    /// A paragraph over the budget: its sentences (or windows of an over-long sentence) packed
    /// greedily, each passage after the first starting with up to `overlap` tokens of the last.
    fn split_long(&self, text: &str, para: Piece) -> Result<Vec<(usize, usize)>> {
        let mut units = Vec::new();
        for (s, e) in sentences(text, para.start, para.end) {
            let p = self.piece(text, s, e)?;
            if p.tokens > self.max_tokens {
                units.extend(self.windows(text, p)?);
            } else {
                units.push(p);
            }
        }
        let mut out = Vec::new();
        let mut i = 0;
        while i < units.len() {
            let (mut j, mut total) = (i, 0);
            while j < units.len() && (j == i || total + units[j].tokens <= self.max_tokens) {
                total += units[j].tokens;
                j += 1;
            }
            out.push((units[i].start, units[j - 1].end));
            if j == units.len() {
                break;
            }
            let (mut k, mut ov) = (j, 0);
            while k > i + 1 && ov + units[k - 1].tokens <= self.overlap {
                k -= 1;
                ov += units[k].tokens;
            }
            i = k;
        }
        Ok(out)
    }

    /// Windows of `max_tokens` tokens of an over-long sentence, `overlap` tokens apart from
    /// their neighbours.
    fn windows(&self, text: &str, p: Piece) -> Result<Vec<Piece>> {
        let enc = self
            .tok
            .encode(&text[p.start..p.end], false)
            .map_err(anyhow::Error::msg)?;
        let offsets = enc.get_offsets();
        let step = self.max_tokens - self.overlap;
        let mut out = Vec::new();
        let mut a = 0;
        while a < offsets.len() {
            let b = (a + self.max_tokens).min(offsets.len());
            out.push(Piece {
                start: p.start + offsets[a].0,
                end: p.start + offsets[b - 1].1,
                tokens: b - a,
            });
            if b == offsets.len() {
                break;
            }
            a += step;
        }
        Ok(out)
    }
}

/// Byte ranges of the lines of `text`, without their line ending.
pub(super) fn lines(text: &str) -> impl Iterator<Item = (usize, usize)> + '_ {
    let mut at = 0;
    text.split_inclusive('\n').map(move |l| {
        let start = at;
        at += l.len();
        let body = l.trim_end_matches(['\n', '\r']);
        (start, start + body.len())
    })
}

/// Byte ranges of the paragraphs of `text`: runs of non-blank lines, trimmed.
fn paragraphs(text: &str) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut cur: Option<(usize, usize)> = None;
    for (s, e) in lines(text) {
        if text[s..e].trim().is_empty() {
            out.extend(cur.take());
        } else {
            cur = Some(cur.map_or((s, e), |(cs, _)| (cs, e)));
        }
    }
    out.extend(cur);
    out.into_iter().map(|(s, e)| trimmed(text, s, e)).collect()
}

/// `[s, e)` without leading and trailing white space.
fn trimmed(text: &str, s: usize, e: usize) -> (usize, usize) {
    let t = &text[s..e];
    let lead = t.len() - t.trim_start().len();
    (s + lead, s + t.trim_end().len())
}

/// Byte ranges of the sentences of `text[start..end]`: cut after `.`, `!`, `?` (and closing
/// quotes or brackets) before white space, and after `。`, `！`, `？`.
fn sentences(text: &str, start: usize, end: usize) -> Vec<(usize, usize)> {
    let t = &text[start..end];
    let mut out = Vec::new();
    let mut from = 0;
    let mut chars = t.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        let cut = match c {
            '。' | '！' | '？' => Some(i + c.len_utf8()),
            '.' | '!' | '?' => {
                let mut after = i + c.len_utf8();
                while let Some(&(j, q)) = chars.peek() {
                    if !matches!(q, '"' | '\'' | ')' | ']' | '”' | '’') {
                        break;
                    }
                    after = j + q.len_utf8();
                    chars.next();
                }
                t[after..].starts_with(char::is_whitespace).then_some(after)
            }
            _ => None,
        };
        if let Some(cut) = cut {
            let (s, e) = trimmed(t, from, cut);
            if s < e {
                out.push((start + s, start + e));
            }
            from = cut;
        }
    }
    let (s, e) = trimmed(t, from, t.len());
    if s < e {
        out.push((start + s, start + e));
    }
    out
}

/// Character offsets of sorted-or-not byte offsets of `text`.
pub(super) fn char_offsets(text: &str, bytes: &[usize]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..bytes.len()).collect();
    order.sort_by_key(|&i| bytes[i]);
    let mut out = vec![0; bytes.len()];
    let (mut b, mut c) = (0, 0);
    let mut it = text.chars();
    for i in order {
        while b < bytes[i] {
            b += it.next().map_or(1, char::len_utf8);
            c += 1;
        }
        out[i] = c;
    }
    out
}

/// A splitter over the tiny test BERT's tokenizer (the folder must outlive it).
#[cfg(test)]
pub(crate) fn test_splitter(max: usize, overlap: usize) -> (tempfile::TempDir, Splitter) {
    let dir = tempfile::tempdir().unwrap();
    crate::testing::bert::write_tiny_bert(dir.path(), 1, None).unwrap();
    let s = Splitter::new(&dir.path().join("tokenizer.json"), max, overlap).unwrap();
    (dir, s)
}

#[cfg(test)]
mod tests {
    use super::test_splitter as splitter;
    use super::*;

    #[test]
    fn sentences_and_paragraphs() {
        let t = "One. Two (x)! \"Three?\" 3.5 stays\n\n  Para two.\nstill two\n \nThree。四";
        let p: Vec<&str> = paragraphs(t).iter().map(|&(s, e)| &t[s..e]).collect();
        assert_eq!(
            p,
            [
                "One. Two (x)! \"Three?\" 3.5 stays",
                "Para two.\nstill two",
                "Three。四"
            ]
        );
        let (s, e) = paragraphs(t)[0];
        let got: Vec<&str> = sentences(t, s, e).iter().map(|&(a, b)| &t[a..b]).collect();
        assert_eq!(got, ["One.", "Two (x)!", "\"Three?\"", "3.5 stays"]);
        let (s, e) = paragraphs(t)[2];
        assert_eq!(sentences(t, s, e).len(), 2);
        assert_eq!(char_offsets("aé b", &[4, 0, 3]), vec![3, 0, 2]);
    }

    #[test]
    fn long_text_packs_paragraphs_and_overlaps_sentences() {
        let (d, sp) = splitter(12, 4);
        // Budget: three sentences; overlap: one.
        let n = sp.count("the city lies.").unwrap();
        let sp = Splitter::new(&d.path().join("tokenizer.json"), 3 * n, n).unwrap();
        let long = "the city lies. ".repeat(30);
        let text = format!("the river.\n\nthe city.\n\n{long}\n\nend.");
        let ranges = sp.split(&text).unwrap();
        // The two short paragraphs share a passage; the long one is cut; "end." stands alone.
        assert_eq!(&text[ranges[0].0..ranges[0].1], "the river.\n\nthe city.");
        assert_eq!(&text[ranges.last().unwrap().0..], "end.");
        for w in ranges.windows(2) {
            assert!(w[1].0 > w[0].0, "{ranges:?}");
        }
        for &(s, e) in &ranges {
            assert!(sp.count(&text[s..e]).unwrap() <= 3 * n, "{}", &text[s..e]);
        }
        // Inside the long paragraph consecutive passages overlap (a sentence repeated).
        assert!(ranges[1..ranges.len() - 1]
            .windows(2)
            .any(|w| w[1].0 < w[0].1));
        // One sentence over the budget is cut into windows.
        let words = "river ".repeat(40 * n);
        let ranges = sp.split(words.trim()).unwrap();
        assert!(ranges.len() >= 4, "{ranges:?}");
        assert!(ranges
            .windows(2)
            .all(|w| w[1].0 < w[0].1 && w[1].1 > w[0].1));
    }
}
