//! Retrieval: the on-disk index of passages (FAISS dense vectors and a BM25 lexical index,
//! `index`), the retrieval embedder (`embed`), and the dense / lexical / hybrid search over an
//! index (`search`, [`search::Retriever`]).

pub mod embed;
pub mod index;
pub mod search;
