//! A tiny random BERT (safetensors + config + WordPiece tokenizer) written to a folder.
