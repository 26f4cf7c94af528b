//! Retrieval embeddings: a BERT-family model, pooled per its `1_Pooling/config.json`, L2-normalised.
