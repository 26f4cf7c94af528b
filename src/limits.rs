//! Limits checked before any model runs, so that a bad question fails in a second instead of
//! after a prefill that cannot end well: an empty question, and a question that cannot fit the
//! decoder's window with the largest context and answer asked for,
//! `ctx_max + question + template + max_new <= window`. Only the decoder's config and tokenizer
//! are read ([`decoder_window`]), never its weights.

use std::path::Path;

use anyhow::{bail, Result};

use crate::compression::prompt::Template;
use crate::decoder::{DecoderConfig, DecoderTokenizer};
use crate::io::checkpoint::RefragConfig;

/// Fail when `question` is empty or only whitespace; `what` names it (`--question`).
pub fn check_question(question: &str, what: &str) -> Result<()> {
    if question.trim().is_empty() {
        bail!("{what} is empty (or only whitespace); ask a question");
    }
    Ok(())
}

/// The decoder's tokenizer and window (positions) for the decoder argument `dec`, without
/// loading its weights: the window of the fine-tuned decoder when `load_dir` holds one.
pub fn decoder_window(dec: &str, load_dir: Option<&Path>) -> Result<(DecoderTokenizer, usize)> {
    let files = crate::hub::resolve(dec)?;
    let (config, tokenizer) = crate::decoder::load_config_and_tokenizer(&files)?;
    let mut window = config.max_position_embeddings;
    if let Some(dir) = load_dir {
        if RefragConfig::read(dir)?.has("decoder") {
            let path = dir.join("decoder_config.json");
            let trained: DecoderConfig = crate::io::jsonio::read_json(&path)?;
            window = trained.max_position_embeddings;
        }
    }
    Ok((tokenizer, window))
}

/// The decoder positions one answer may take, split the way the error reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    /// Tokens of the question.
    pub question: usize,
    /// Tokens of the template around the passages and the question (chat turn, instruction,
    /// separators between `topk` passages).
    pub template: usize,
    /// `--ctx_max`: the most context tokens (all chunks expanded).
    pub ctx_max: usize,
    /// `--max_new`.
    pub max_new: usize,
}

impl Budget {
    /// The budget of `question` with `topk` passages, exactly as `Refrag::prepare` lays it out.
    pub fn new(
        dtok: &DecoderTokenizer,
        question: &str,
        topk: usize,
        ctx_max: usize,
        max_new: usize,
    ) -> Result<Self> {
        let (before, after) = dtok.chat_parts(None);
        let t = Template::new(&before, &after, question, |s| dtok.encode(s, false))?;
        let all = t.before.len() + t.after.len() + t.between.len() * topk.saturating_sub(1);
        let question = dtok.encode(question, false)?.len().min(all);
        Ok(Self {
            question,
            template: all - question,
            ctx_max,
            max_new,
        })
    }

    /// Positions needed at most.
    pub fn total(&self) -> usize {
        self.question + self.template + self.ctx_max + self.max_new
    }

    /// Fail unless the budget fits `window` positions, with every number in the message and the
    /// flag to change named; `what` names the question (`--question`).
    pub fn check(&self, window: usize, what: &str) -> Result<()> {
        if self.total() <= window {
            return Ok(());
        }
        let numbers = format!(
            "{} question tokens + {} template tokens + --ctx_max {} + --max_new {} = {} positions, more than the decoder's window of {window}",
            self.question,
            self.template,
            self.ctx_max,
            self.max_new,
            self.total()
        );
        if self.template + self.max_new >= window {
            bail!(
                "--max_new {} does not fit the decoder: {numbers}",
                self.max_new
            );
        }
        if self.question + self.template + self.max_new >= window {
            bail!("{what} is too long for the decoder: {numbers}");
        }
        let room = window - self.question - self.template - self.max_new;
        bail!(
            "--ctx_max {} leaves no room for {what} in the decoder: {numbers}; use --ctx_max {room} or less",
            self.ctx_max
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(question: usize, ctx_max: usize) -> Budget {
        Budget {
            question,
            template: 40,
            ctx_max,
            max_new: 24,
        }
    }

    #[test]
    fn fits_up_to_the_window_exactly() {
        assert!(budget(36, 412).check(512, "--question").is_ok());
        assert!(budget(36, 413).check(512, "--question").is_err());
    }

    #[test]
    fn errors_name_the_flag_and_carry_the_numbers() {
        let e = budget(30_000, 2048).check(8192, "--question").unwrap_err();
        let e = e.to_string();
        assert!(e.starts_with("--question is too long"), "{e}");
        for n in [
            "30000 question",
            "40 template",
            "--ctx_max 2048",
            "--max_new 24",
        ] {
            assert!(e.contains(n), "{n}: {e}");
        }
        assert!(
            e.contains("= 32112 positions") && e.contains("window of 8192"),
            "{e}"
        );
        let e = budget(36, 2048).check(512, "--question").unwrap_err();
        assert!(e.to_string().contains("use --ctx_max 412 or less"), "{e}");
        let e = Budget {
            max_new: 600,
            ..budget(1, 1)
        };
        let e = e.check(512, "--question").unwrap_err().to_string();
        assert!(e.starts_with("--max_new 600"), "{e}");
    }

    #[test]
    fn blank_questions_are_refused() {
        for q in ["", "  ", "\n\t"] {
            let e = check_question(q, "--question").unwrap_err().to_string();
            assert!(e.starts_with("--question is empty"), "{e}");
        }
        assert!(check_question(" why? ", "--question").is_ok());
    }
}
