//! The decoder input REFRAG builds: one fixed template (the chat template's user turn holding an
//! instruction, the retrieved passages and the question), where each passage is cut into chunks of
//! `k` decoder tokens. An expanded chunk contributes its `k` token embeddings, a compressed one a
//! single projected vector. With every chunk expanded the input is exactly the ordinary
//! full-context RAG input, `E(full_ids())`: the baseline every figure is compared with.

use anyhow::{ensure, Result};
use candle_core::{Device, Tensor};

/// The instruction that opens the user turn, in training and inference alike.
pub const INSTRUCTION: &str =
    "Answer the question using the passages below. Reply with the answer only.";

/// One piece of the input, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    /// Template text: always full tokens.
    Tokens(Vec<u32>),
    /// A chunk of a retrieved passage, by index into [`PromptLayout::chunks`].
    Chunk(usize),
}

/// A chunk of at most `k` decoder tokens of one passage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkRef {
    /// Which retrieved passage (0-based, retrieval order).
    pub passage: usize,
    /// Its decoder tokens.
    pub tokens: Vec<u32>,
}

/// The template text around the passages: what comes before the first passage, between two
/// passages, and after the last one (up to where the answer starts).
#[derive(Debug, Clone)]
pub struct Template {
    pub before: Vec<u32>,
    pub between: Vec<u32>,
    pub after: Vec<u32>,
}

impl Template {
    /// Build the template from the chat template's text around the user content (`chat_before`,
    /// `chat_after`) and an encoder of text to decoder ids (no special tokens added).
    pub fn new(
        chat_before: &str,
        chat_after: &str,
        question: &str,
        encode: impl Fn(&str) -> Result<Vec<u32>>,
    ) -> Result<Self> {
        Ok(Self {
            before: encode(&format!("{chat_before}{INSTRUCTION}\n\nPassages:\n"))?,
            between: encode("\n")?,
            after: encode(&format!("\n\nQuestion: {question}{chat_after}"))?,
        })
    }
}

/// Cut a passage's tokens into chunks of `k` (the last may be shorter).
pub fn chunk_tokens(tokens: &[u32], k: usize) -> Vec<Vec<u32>> {
    tokens.chunks(k.max(1)).map(<[u32]>::to_vec).collect()
}

/// Keep whole chunks, passage by passage in retrieval order, while their tokens fit in
/// `ctx_max`; passages left with no chunk are dropped. Capping at chunk boundaries keeps every
/// kept chunk identical to the one cached at index time.
pub fn cap_chunks(passage_chunks: &[Vec<Vec<u32>>], ctx_max: usize) -> Vec<Vec<Vec<u32>>> {
    let mut left = ctx_max;
    let mut out = Vec::new();
    'passages: for pc in passage_chunks {
        let mut kept = Vec::new();
        for c in pc {
            if c.len() > left {
                if !kept.is_empty() {
                    out.push(kept);
                }
                break 'passages;
            }
            left -= c.len();
            kept.push(c.clone());
        }
        out.push(kept);
    }
    out
}

/// The layout of one decoder input.
#[derive(Debug, Clone)]
pub struct PromptLayout {
    pub segments: Vec<Segment>,
    pub chunks: Vec<ChunkRef>,
}

impl PromptLayout {
    /// Lay out the template around passages already chunked (`passage_chunks[p]` = its chunks).
    pub fn new(template: &Template, passage_chunks: &[Vec<Vec<u32>>]) -> Self {
        let mut segments = vec![Segment::Tokens(template.before.clone())];
        let mut chunks = Vec::new();
        for (p, pc) in passage_chunks.iter().enumerate() {
            if p > 0 {
                segments.push(Segment::Tokens(template.between.clone()));
            }
            for c in pc {
                segments.push(Segment::Chunk(chunks.len()));
                chunks.push(ChunkRef {
                    passage: p,
                    tokens: c.clone(),
                });
            }
        }
        segments.push(Segment::Tokens(template.after.clone()));
        Self { segments, chunks }
    }

    /// The ordinary full-context input as token ids (every chunk expanded).
    pub fn full_ids(&self) -> Vec<u32> {
        self.ids_and_rows(&vec![true; self.chunks.len()]).0
    }

    /// Decoder positions of the input with this expansion mask.
    pub fn num_positions(&self, expand: &[bool]) -> usize {
        self.segments
            .iter()
            .map(|s| match s {
                Segment::Tokens(t) => t.len(),
                Segment::Chunk(i) if expand[*i] => self.chunks[*i].tokens.len(),
                Segment::Chunk(_) => 1,
            })
            .sum()
    }

    /// The token ids that are embedded with `E`, and for each input position its row in the table
    /// `[E(ids); chunk_embeds]` (a compressed chunk `i` is row `ids.len() + i`).
    fn ids_and_rows(&self, expand: &[bool]) -> (Vec<u32>, Vec<Row>) {
        let mut ids = Vec::new();
        let mut rows = Vec::new();
        for s in &self.segments {
            let tokens: &[u32] = match s {
                Segment::Tokens(t) => t,
                Segment::Chunk(i) if expand[*i] => &self.chunks[*i].tokens,
                Segment::Chunk(i) => {
                    rows.push(Row::Chunk(*i));
                    continue;
                }
            };
            for &id in tokens {
                rows.push(Row::Token(ids.len()));
                ids.push(id);
            }
        }
        (ids, rows)
    }

    /// The decoder input `(1, positions, d)`: token embeddings from `embed` (ids `(1, n)` to
    /// `(1, n, d)`) and, for compressed chunks, rows of `chunk_embeds` `(chunks, d)`.
    pub fn assemble(
        &self,
        embed: impl Fn(&Tensor) -> Result<Tensor>,
        chunk_embeds: Option<&Tensor>,
        expand: &[bool],
        device: &Device,
    ) -> Result<Tensor> {
        ensure!(
            expand.len() == self.chunks.len(),
            "expansion mask has {} entries for {} chunks",
            expand.len(),
            self.chunks.len()
        );
        let (ids, rows) = self.ids_and_rows(expand);
        let n = ids.len();
        let tok = embed(&Tensor::new(ids, device)?.unsqueeze(0)?)?.squeeze(0)?; // (n, d)
        if rows.iter().all(|r| matches!(r, Row::Token(_))) {
            return Ok(tok.unsqueeze(0)?);
        }
        let Some(ce) = chunk_embeds else {
            anyhow::bail!("compressed chunks need chunk embeddings");
        };
        let table = Tensor::cat(&[&tok, &ce.to_dtype(tok.dtype())?], 0)?; // (n + chunks, d)
        let index: Vec<u32> = rows
            .iter()
            .map(|r| match r {
                Row::Token(j) => *j as u32,
                Row::Chunk(i) => (n + i) as u32,
            })
            .collect();
        let index = Tensor::new(index, device)?;
        Ok(table.index_select(&index, 0)?.unsqueeze(0)?)
    }
}

#[derive(Debug, Clone, Copy)]
enum Row {
    Token(usize),
    Chunk(usize),
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;

    fn layout() -> PromptLayout {
        let t = Template {
            before: vec![1, 2],
            between: vec![3],
            after: vec![4, 5],
        };
        let p0 = chunk_tokens(&[10, 11, 12, 13, 14], 2);
        let p1 = chunk_tokens(&[20, 21], 2);
        PromptLayout::new(&t, &[p0, p1])
    }

    #[test]
    fn chunks_never_span_passages() {
        let l = layout();
        assert_eq!(l.chunks.len(), 4);
        assert_eq!(l.chunks[2].tokens, vec![14]);
        assert_eq!(l.chunks[3].passage, 1);
        assert_eq!(
            l.full_ids(),
            vec![1, 2, 10, 11, 12, 13, 14, 3, 20, 21, 4, 5]
        );
        assert_eq!(l.num_positions(&[false; 4]), 2 + 3 + 1 + 1 + 2);
    }

    #[test]
    fn cap_keeps_whole_chunks() {
        let p = |t: &[u32]| chunk_tokens(t, 2);
        let c = cap_chunks(&[p(&[1, 2, 3]), p(&[4, 5, 6]), p(&[7])], 5);
        assert_eq!(c, vec![vec![vec![1, 2], vec![3]], vec![vec![4, 5]]]);
        assert_eq!(cap_chunks(&[p(&[1, 2, 3])], 1), Vec::<Vec<Vec<u32>>>::new());
    }

    #[test]
    fn all_expanded_is_the_full_context_input() {
        let dev = Device::Cpu;
        let table = Tensor::randn(0f32, 1.0, (32, 4), &dev).unwrap();
        let embed = |ids: &Tensor| -> Result<Tensor> {
            Ok(table.index_select(&ids.squeeze(0)?, 0)?.unsqueeze(0)?)
        };
        let l = layout();
        let ce = Tensor::zeros((4, 4), DType::F32, &dev).unwrap();
        let got = l.assemble(embed, Some(&ce), &[true; 4], &dev).unwrap();
        let full = Tensor::new(l.full_ids(), &dev)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let want = embed(&full).unwrap();
        assert_eq!(crate::testing::max_abs_diff(&got, &want), 0.0);
    }

    #[test]
    fn compressed_chunks_take_one_position_each() {
        let dev = Device::Cpu;
        let embed = |ids: &Tensor| -> Result<Tensor> {
            Ok(ids.to_dtype(DType::F32)?.unsqueeze(2)?.repeat((1, 1, 2))?)
        };
        let ce = Tensor::new(&[[-1f32, -1.], [-2., -2.], [-3., -3.], [-4., -4.]], &dev).unwrap();
        let l = layout();
        let x = l
            .assemble(embed, Some(&ce), &[false, true, false, false], &dev)
            .unwrap();
        let col: Vec<f32> = x
            .squeeze(0)
            .unwrap()
            .narrow(1, 0, 1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(col, vec![1., 2., -1., 12., 13., -3., 3., -4., 4., 5.]);
    }
}
