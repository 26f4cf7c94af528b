//! One function per subcommand. `main` parses the command line and calls [`run`].

use anyhow::{bail, Result};

use crate::cli::Command;

pub mod bench;
pub mod eval;
pub mod generate;
pub mod index;
pub mod make_corpus;
pub mod search;

/// Run one subcommand.
pub fn run(command: Command) -> Result<()> {
    match command {
        Command::Index(a) => index::run(&a),
        Command::Search(a) => search::run(&a),
        Command::MakeCorpus(a) => make_corpus::run(&a),
        Command::Generate(a) => generate::run(&a),
        Command::CptRecon(_) => not_yet("cpt_recon"),
        Command::CptNext(_) => not_yet("cpt_next"),
        Command::Sft(_) => not_yet("sft"),
        Command::TrainPolicy(_) => not_yet("train_policy"),
        Command::Eval(a) => eval::run(&a),
        Command::Bench(a) => bench::run(&a),
    }
}

/// A subcommand that parses but is not implemented in this build.
fn not_yet(name: &str) -> Result<()> {
    bail!("{name} is not implemented yet in this version of refrag (its flags parse; the command itself is still being built)")
}
