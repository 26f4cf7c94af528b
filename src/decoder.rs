//! The decoder LLM: a Llama-family causal LM that takes input embeddings, with a KV cache.
