//! `refrag search`.

use anyhow::{bail, Result};

use crate::cli::SearchArgs;

pub fn run(_args: &SearchArgs) -> Result<()> {
    bail!("search is not implemented yet")
}
