//! Dense, lexical (BM25) and hybrid (reciprocal-rank fusion) retrieval over an index.
