//! Chat templates, reduced to what REFRAG needs: the text before and after one user message.
//!
//! REFRAG builds the decoder input as embeddings with compressed chunk vectors inside the user
//! message, so instead of rendering Jinja we recognise the template family from its text and
//! produce the two strings around the user content. The families: ChatML (`<|im_start|>`:
//! SmolLM2, Qwen2), Llama 3 (`<|start_header_id|>`), Llama 2 / Mistral (`[INST]`), and plain (no
//! template: the user text as is). A default system prompt that the template renders when none is
//! given (SmolLM2's "You are a helpful AI assistant named SmolLM, ...", Qwen's) is reproduced.

/// A recognised chat template family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChatTemplate {
    /// `<|im_start|>role\ncontent<|im_end|>\n`; `default_system` is rendered when no system
    /// prompt is given.
    ChatMl { default_system: Option<String> },
    /// Llama 3: header tokens, `<|eot_id|>`. `bos` starts the text; Llama 3.1+ templates always
    /// render a system block with knowledge/today dates (`dates`).
    Llama3 { bos: String, dates: bool },
    /// Llama 2 / Mistral: `<s>[INST] <<SYS>>\nsys\n<</SYS>>\n\nuser [/INST]`.
    Llama2 { bos: String },
    /// No template: the user text alone (a system prompt, if any, goes before it).
    Plain,
}

impl ChatTemplate {
    /// Recognise the family of a Jinja chat template (`None`: plain). `bos` is the text of the
    /// BOS token, for the families whose template starts with `bos_token`.
    pub fn detect(template: Option<&str>, bos: Option<&str>) -> Self {
        let Some(t) = template else {
            return ChatTemplate::Plain;
        };
        let bos_text = if t.contains("bos_token") {
            bos.unwrap_or("")
        } else {
            ""
        };
        if t.contains("<|im_start|>") {
            ChatTemplate::ChatMl {
                default_system: default_chatml_system(t),
            }
        } else if t.contains("<|start_header_id|>") {
            let bos_text = if t.contains("<|begin_of_text|>") {
                "<|begin_of_text|>"
            } else {
                bos_text
            };
            ChatTemplate::Llama3 {
                bos: bos_text.to_string(),
                dates: t.contains("Cutting Knowledge Date"),
            }
        } else if t.contains("[INST]") {
            ChatTemplate::Llama2 {
                bos: bos_text.to_string(),
            }
        } else {
            ChatTemplate::Plain
        }
    }

    /// The token text that ends an assistant turn, if the family has its own.
    pub fn end_of_turn(&self) -> Option<&'static str> {
        match self {
            ChatTemplate::ChatMl { .. } => Some("<|im_end|>"),
            ChatTemplate::Llama3 { .. } => Some("<|eot_id|>"),
            ChatTemplate::Llama2 { .. } | ChatTemplate::Plain => None,
        }
    }

    /// `(before, after)`: the rendered conversation is `before + user + after`, where `after`
    /// ends where the assistant's answer starts (the generation prompt). Special tokens appear
    /// as text; encode them without adding special tokens again.
    pub fn parts(&self, system: Option<&str>) -> (String, String) {
        match self {
            ChatTemplate::ChatMl { default_system } => {
                let sys = system.or(default_system.as_deref());
                let mut before = String::new();
                if let Some(s) = sys {
                    before += &format!("<|im_start|>system\n{s}<|im_end|>\n");
                }
                before += "<|im_start|>user\n";
                (before, "<|im_end|>\n<|im_start|>assistant\n".into())
            }
            ChatTemplate::Llama3 { bos, dates } => {
                let head = |role: &str| format!("<|start_header_id|>{role}<|end_header_id|>\n\n");
                let mut before = bos.clone();
                if *dates || system.is_some() {
                    let mut sys = String::new();
                    if *dates {
                        sys += "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n";
                    }
                    sys += system.unwrap_or("").trim();
                    before += &format!("{}{sys}<|eot_id|>", head("system"));
                }
                before += &head("user");
                (before, format!("<|eot_id|>{}", head("assistant")))
            }
            ChatTemplate::Llama2 { bos } => {
                let sys = system
                    .map(|s| format!("<<SYS>>\n{s}\n<</SYS>>\n\n"))
                    .unwrap_or_default();
                (format!("{bos}[INST] {sys}"), " [/INST]".into())
            }
            ChatTemplate::Plain => (
                system.map(|s| format!("{s}\n\n")).unwrap_or_default(),
                String::new(),
            ),
        }
    }

    /// The whole prompt for one user message: `before + user + after`.
    pub fn prompt(&self, system: Option<&str>, user: &str) -> String {
        let (before, after) = self.parts(system);
        format!("{before}{user}{after}")
    }
}

/// The system prompt a ChatML template renders when the conversation has none: the first literal
/// `<|im_start|>system\n...<|im_end|>` whose content is plain text (not an expression).
fn default_chatml_system(t: &str) -> Option<String> {
    let t = t.replace("\\n", "\n");
    let key = "<|im_start|>system\n";
    let mut rest = t.as_str();
    while let Some(i) = rest.find(key) {
        rest = &rest[i + key.len()..];
        let end = rest.find("<|im_end|>")?;
        let content = &rest[..end];
        if !content.is_empty() && !content.contains(['\'', '"', '{', '}', '+']) {
            return Some(content.to_string());
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SmolLM2-135M-Instruct's template, as stored in its GGUF.
    const SMOL: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn smollm2_renders_its_default_system_prompt() {
        let c = ChatTemplate::detect(Some(SMOL), Some("<|im_start|>"));
        assert_eq!(
            c.prompt(None, "Hi"),
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        assert_eq!(
            c.prompt(Some("Be brief."), "Hi"),
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        // The same template with escaped newlines, as in a tokenizer_config.json.
        let escaped = SMOL.replace('\n', "\\n");
        assert_eq!(ChatTemplate::detect(Some(&escaped), None), c);
    }

    #[test]
    fn qwen25_default_system_is_found_past_the_tools_branch() {
        let t = "{%- if tools %}{{- '<|im_start|>system\\n' }}{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}{%- else %}{{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}{%- endif %}{%- else %}{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}{%- else %}{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}{%- endif %}{%- endif %}";
        let c = ChatTemplate::detect(Some(t), None);
        assert_eq!(
            c,
            ChatTemplate::ChatMl {
                default_system: Some(
                    "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.".into()
                )
            }
        );
    }

    #[test]
    fn chatml_without_default_system() {
        let t = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}";
        let c = ChatTemplate::detect(Some(t), None);
        assert_eq!(
            c,
            ChatTemplate::ChatMl {
                default_system: None
            }
        );
        assert_eq!(c.parts(None).0, "<|im_start|>user\n");
    }

    #[test]
    fn llama3_and_llama2_and_plain() {
        let l3 = "{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + m['content'] | trim + '<|eot_id|>' }}{% endfor %}";
        let c = ChatTemplate::detect(Some(l3), Some("<|begin_of_text|>"));
        assert_eq!(
            c.prompt(None, "Hi"),
            "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
        );
        let l2 = "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}";
        let c = ChatTemplate::detect(Some(l2), Some("<s>"));
        assert_eq!(
            c.prompt(Some("S"), "Hi"),
            "<s>[INST] <<SYS>>\nS\n<</SYS>>\n\nHi [/INST]"
        );
        assert_eq!(ChatTemplate::detect(None, None).prompt(None, "Hi"), "Hi");
    }
}
