//! Files: the formats beside a corpus (`schema`, `squad`), corpora and JSONL with errors that
//! name the line and atomic writes (`jsonio`), weights directories (`checkpoint`) and the
//! shipped `weights/` (`weights`), one writer per directory (`lock`) and cleaning up after a
//! killed writer (`recover`).

pub mod checkpoint;
pub mod jsonio;
pub mod lock;
pub mod recover;
pub mod schema;
pub mod squad;
pub mod weights;
