//! The on-disk index: FAISS vectors, passages, manifest; built atomically.
