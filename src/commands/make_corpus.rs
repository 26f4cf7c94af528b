//! `refrag make_corpus`.

use anyhow::{bail, Result};

use crate::cli::MakeCorpusArgs;

pub fn run(_args: &MakeCorpusArgs) -> Result<()> {
    bail!("make_corpus is not implemented yet")
}
