//! One function per subcommand. `main` parses the command line and calls [`run`].

use anyhow::Result;

use crate::cli::Command;

pub mod bench;
pub mod chat;
pub mod eval;
pub mod generate;
pub mod index;
pub mod make_corpus;
pub mod questions;
pub mod search;
pub mod train;

/// Run one subcommand.
pub fn run(command: Command) -> Result<()> {
    match command {
        Command::Index(a) => index::run(&a),
        Command::Search(a) => search::run(&a),
        Command::MakeCorpus(a) => make_corpus::run(&a),
        Command::Generate(a) => generate::run(&a),
        Command::Chat(a) => chat::run(&a),
        Command::CptRecon(a) => train::run_cpt(&a, crate::train::cpt::CptMode::Recon),
        Command::CptNext(a) => train::run_cpt(&a, crate::train::cpt::CptMode::Next),
        Command::Sft(a) => train::run_sft(&a),
        Command::TrainPolicy(a) => train::run_policy(&a),
        Command::Eval(a) => eval::run(&a),
        Command::Bench(a) => bench::run(&a),
    }
}
