//! A tiny random Llama (safetensors + config + byte-level BPE tokenizer) written to a folder.
