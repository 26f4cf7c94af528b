//! The decoder's tokenizer: a `tokenizers::Tokenizer` plus BOS/EOS ids and the chat template.
//!
//! From a Hugging Face folder it is `tokenizer.json`, with the template and special tokens from
//! `tokenizer_config.json` (or `chat_template.jinja`) and extra EOS ids from
//! `generation_config.json`. From a GGUF file it is rebuilt from the metadata: a byte-level BPE
//! (`tokenizer.ggml.model = "gpt2"`) from the tokens and merges, with the pre-tokenizer that
//! llama.cpp uses for `tokenizer.ggml.pre`, control tokens as special added tokens, and the
//! ByteLevel decoder.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::quantized::gguf_file::Value;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::unicode::NFC;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer};

use super::chat::ChatTemplate;
use super::config::OneOrMany;
use super::gguf::md;

/// Llama 3's pre-tokenizer split (from its `tokenizer.json`).
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's pre-tokenizer split (from its `tokenizer.json`).
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Tokenizer, special ids and chat template of a decoder.
#[derive(Debug, Clone)]
pub struct DecoderTokenizer {
    tokenizer: Tokenizer,
    bos: Option<u32>,
    eos: Vec<u32>,
    chat: ChatTemplate,
}

impl DecoderTokenizer {
    /// Wrap a tokenizer. The chat family is detected from `template`; its end-of-turn token
    /// (`<|im_end|>`, `<|eot_id|>`), when in the vocabulary, joins the EOS ids.
    pub fn new(
        tokenizer: Tokenizer,
        bos: Option<u32>,
        mut eos: Vec<u32>,
        template: Option<&str>,
    ) -> Self {
        let bos_text = bos.and_then(|b| tokenizer.id_to_token(b));
        let chat = ChatTemplate::detect(template, bos_text.as_deref());
        if let Some(id) = chat.end_of_turn().and_then(|t| tokenizer.token_to_id(t)) {
            eos.push(id);
        }
        eos.sort_unstable();
        eos.dedup();
        DecoderTokenizer {
            tokenizer,
            bos,
            eos,
            chat,
        }
    }

    /// Token ids of `text`. Special tokens written in the text (`<|im_start|>`) map to their ids;
    /// `add_special` applies the tokenizer's post-processor (e.g. a leading BOS for Llama).
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        let enc = self
            .tokenizer
            .encode(text, add_special)
            .map_err(anyhow::Error::msg)?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids`, special tokens skipped.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer.decode(ids, true).map_err(anyhow::Error::msg)
    }

    /// Does `id` end generation?
    pub fn is_eos(&self, id: u32) -> bool {
        self.eos.contains(&id)
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.bos
    }

    pub fn eos_ids(&self) -> &[u32] {
        &self.eos
    }

    pub fn chat(&self) -> &ChatTemplate {
        &self.chat
    }

    /// `(before, after)` the user content in the chat template; see `ChatTemplate::parts`.
    /// Encode both with `add_special = false` (the template text holds any BOS itself).
    pub fn chat_parts(&self, system: Option<&str>) -> (String, String) {
        self.chat.parts(system)
    }

    /// The full chat prompt for one user message.
    pub fn chat_prompt(&self, system: Option<&str>, user: &str) -> String {
        self.chat.prompt(system, user)
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    /// The underlying `tokenizers` tokenizer.
    pub fn inner(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// From a Hugging Face folder: `tokenizer.json` and, beside it, `tokenizer_config.json`,
    /// `chat_template.jinja`, `generation_config.json` when present.
    pub fn from_hf(
        tokenizer_json: &Path,
        sibling: impl Fn(&str) -> Option<std::path::PathBuf>,
        bos: Option<u32>,
        eos: &[u32],
    ) -> Result<Self> {
        let tokenizer = tokenizer_from_file(tokenizer_json)?;
        let read_json = |name: &str| -> Result<Option<serde_json::Value>> {
            let Some(p) = sibling(name) else {
                return Ok(None);
            };
            let text =
                std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
            Ok(Some(
                serde_json::from_str(&text).with_context(|| format!("parsing {}", p.display()))?,
            ))
        };
        let tc = read_json("tokenizer_config.json")?.unwrap_or_default();
        let mut template = chat_template_of(&tc);
        if template.is_none() {
            if let Some(p) = sibling("chat_template.jinja") {
                template = Some(
                    std::fs::read_to_string(&p)
                        .with_context(|| format!("reading {}", p.display()))?,
                );
            }
        }
        let token_id =
            |key: &str| special_token_text(&tc, key).and_then(|t| tokenizer.token_to_id(&t));
        let bos = bos.or_else(|| token_id("bos_token"));
        let mut eos_ids = eos.to_vec();
        eos_ids.extend(token_id("eos_token"));
        if let Some(gc) = read_json("generation_config.json")? {
            if let Some(e) = gc.get("eos_token_id") {
                if let Ok(e) = serde_json::from_value::<OneOrMany>(e.clone()) {
                    eos_ids.extend(e.into_vec());
                }
            }
        }
        Ok(Self::new(tokenizer, bos, eos_ids, template.as_deref()))
    }

    /// Rebuild the tokenizer stored in GGUF metadata (byte-level BPE only).
    pub fn from_gguf(m: &HashMap<String, Value>) -> Result<Self> {
        let model = md(m, "tokenizer.ggml.model")?.to_string()?;
        if model != "gpt2" {
            bail!("GGUF tokenizer model '{model}' is not supported (only byte-level BPE, 'gpt2'); use the model's Hugging Face folder instead");
        }
        let strings = |key: &str| -> Result<Vec<String>> {
            md(m, key)?
                .to_vec()?
                .iter()
                .map(|v| Ok(v.to_string()?.clone()))
                .collect()
        };
        let tokens = strings("tokenizer.ggml.tokens")?;
        let merges = strings("tokenizer.ggml.merges")?;
        let types: Vec<i32> = match m.get("tokenizer.ggml.token_type") {
            Some(v) => v
                .to_vec()?
                .iter()
                .map(|x| x.to_i32())
                .collect::<candle_core::Result<_>>()?,
            None => vec![1; tokens.len()],
        };
        let pre = m
            .get("tokenizer.ggml.pre")
            .and_then(|v| v.to_string().ok())
            .map(String::as_str);
        let id = |key: &str| m.get(key).and_then(|v| v.to_u32().ok());
        let bos = id("tokenizer.ggml.bos_token_id");
        let add_bos = m
            .get("tokenizer.ggml.add_bos_token")
            .and_then(|v| v.to_bool().ok())
            .unwrap_or(false);
        let tokenizer = build_bpe(
            &tokens,
            &merges,
            &types,
            pre.unwrap_or("default"),
            bos.filter(|_| add_bos),
        )?;
        let eos: Vec<u32> = ["tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"]
            .iter()
            .filter_map(|k| id(k))
            .collect();
        let template = m
            .get("tokenizer.chat_template")
            .and_then(|v| v.to_string().ok());
        Ok(Self::new(tokenizer, bos, eos, template.map(String::as_str)))
    }
}

/// Read a `tokenizer.json`. The tokenizers crate panics on some malformed files (an `expect`
/// in its decoder deserializer): that is caught, silently, and becomes an error naming the file.
pub fn tokenizer_from_file(path: &Path) -> Result<Tokenizer> {
    let prev = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let read = std::panic::catch_unwind(|| Tokenizer::from_file(path));
    std::panic::set_hook(prev);
    match read {
        Ok(r) => r
            .map_err(anyhow::Error::msg)
            .with_context(|| format!("reading {}", path.display())),
        Err(_) => bail!("reading {}: malformed tokenizer file", path.display()),
    }
}

/// A byte-level BPE tokenizer from a vocabulary (in id order) and merges (`"a b"`), with the
/// pre-tokenizer llama.cpp uses for `pre`. Tokens of type 3 (control) and 4 (user-defined)
/// become special added tokens; `bos`, if given, is prepended by the post-processor.
pub fn build_bpe(
    tokens: &[String],
    merges: &[String],
    types: &[i32],
    pre: &str,
    bos: Option<u32>,
) -> Result<Tokenizer> {
    let vocab: Vocab = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect();
    let merges = merges
        .iter()
        .map(|m| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .with_context(|| format!("GGUF merge '{m}' is not two tokens"))
        })
        .collect::<Result<Vec<_>>>()?;
    let family = pre_family(pre)?;
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        // Llama 3 looks whole pre-tokens up in the vocabulary before merging (HF and llama.cpp).
        .ignore_merges(family == PreFamily::Llama3)
        .build()
        .map_err(anyhow::Error::msg)?;
    let mut tk = Tokenizer::new(bpe);
    if family == PreFamily::Qwen2 {
        tk.with_normalizer(Some(NFC)); // as Qwen2's tokenizer.json
    }
    tk.with_pre_tokenizer(Some(pre_tokenizer(family)?));
    tk.with_decoder(Some(ByteLevelDecoder::default()));
    let special: Vec<AddedToken> = tokens
        .iter()
        .zip(types)
        .filter(|(_, &ty)| ty == 3 || ty == 4)
        .map(|(t, _)| AddedToken::from(t.clone(), true))
        .collect();
    tk.add_special_tokens(&special);
    if let Some(b) = bos {
        let text = tokens
            .get(b as usize)
            .context("GGUF bos id outside the vocabulary")?;
        let post = TemplateProcessing::builder()
            .try_single(format!("{text} $A"))
            .map_err(anyhow::Error::msg)?
            .try_pair(format!("{text} $A {text} $B"))
            .map_err(anyhow::Error::msg)?
            .special_tokens(vec![(text.clone(), b)])
            .build()
            .map_err(anyhow::Error::msg)?;
        tk.with_post_processor(Some(post));
    }
    Ok(tk)
}

/// The pre-tokenizers llama.cpp distinguishes, for the `tokenizer.ggml.pre` names we support.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PreFamily {
    /// GPT-2's regex.
    Gpt2,
    /// Every digit apart, then GPT-2's regex (SmolLM, StarCoder).
    Digits,
    /// Llama 3's regex (numbers in groups of up to three).
    Llama3,
    /// Qwen2's regex (single digits).
    Qwen2,
}

fn pre_family(pre: &str) -> Result<PreFamily> {
    Ok(match pre {
        "default" | "gpt2" | "gpt-2" | "mpt" | "olmo" => PreFamily::Gpt2,
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" => PreFamily::Digits,
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "dbrx" | "smaug-bpe" => PreFamily::Llama3,
        "qwen2" | "stablelm2" => PreFamily::Qwen2,
        other => bail!("GGUF tokenizer.ggml.pre '{other}' is not supported (gpt2, smollm, llama-bpe, qwen2 and their aliases are)"),
    })
}

/// llama.cpp's pre-tokenizer for a family, as a `tokenizers` pre-tokenizer.
fn pre_tokenizer(family: PreFamily) -> Result<PreTokenizerWrapper> {
    let byte_level = |regex: bool| ByteLevel::new(false, true, regex).into();
    let split = |re: &str| -> Result<PreTokenizerWrapper> {
        Ok(Split::new(
            SplitPattern::Regex(re.into()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(anyhow::Error::msg)?
        .into())
    };
    Ok(match family {
        PreFamily::Gpt2 => byte_level(true),
        PreFamily::Digits => Sequence::new(vec![Digits::new(true).into(), byte_level(true)]).into(),
        PreFamily::Llama3 => Sequence::new(vec![split(LLAMA3_SPLIT)?, byte_level(false)]).into(),
        PreFamily::Qwen2 => Sequence::new(vec![split(QWEN2_SPLIT)?, byte_level(false)]).into(),
    })
}

/// `chat_template` of a `tokenizer_config.json`: a string, or a list of named templates of which
/// we take `default`.
fn chat_template_of(tc: &serde_json::Value) -> Option<String> {
    match tc.get("chat_template")? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Array(list) => list
            .iter()
            .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
            .or(list.first())
            .and_then(|t| t.get("template"))
            .and_then(|t| t.as_str())
            .map(str::to_string),
        _ => None,
    }
}

/// `bos_token` / `eos_token` of a `tokenizer_config.json`: a string or `{"content": ...}`.
fn special_token_text(tc: &serde_json::Value, key: &str) -> Option<String> {
    match tc.get(key)? {
        serde_json::Value::String(s) => Some(s.clone()),
        v => v
            .get("content")
            .and_then(|c| c.as_str())
            .map(str::to_string),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokenizers::{OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer};

    fn pieces(pre: &str, text: &str) -> Vec<String> {
        let pt = pre_tokenizer(pre_family(pre).unwrap()).unwrap();
        let mut s = PreTokenizedString::from(text);
        pt.pre_tokenize(&mut s).unwrap();
        s.get_splits(OffsetReferential::Original, OffsetType::Byte)
            .into_iter()
            .map(|(p, _, _)| p.to_string())
            .collect()
    }

    #[test]
    fn pre_tokenizers_split_numbers_like_llama_cpp() {
        assert_eq!(pieces("smollm", "in 2024"), ["in", "Ġ", "2", "0", "2", "4"]);
        assert_eq!(pieces("gpt2", "in 2024"), ["in", "Ġ2024"]);
        assert_eq!(pieces("llama-bpe", "in 12345"), ["in", "Ġ", "123", "45"]);
        assert_eq!(pieces("qwen2", "in 123"), ["in", "Ġ", "1", "2", "3"]);
        assert_eq!(pieces("llama-bpe", "I'M here"), ["I", "'M", "Ġhere"]);
        assert!(pre_family("bloom").is_err());
    }
}
