//! `refrag index`.

use anyhow::{bail, Result};

use crate::cli::IndexArgs;

pub fn run(_args: &IndexArgs) -> Result<()> {
    bail!("index is not implemented yet")
}
