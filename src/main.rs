//! The `refrag` binary: parse the command line, dispatch to one function per subcommand, and turn
//! an error into one line on stderr and a non-zero exit status.

use clap::Parser;

fn main() {
    let cli = refrag::cli::Cli::parse();
    if let Err(err) = refrag::commands::run(cli.command) {
        eprintln!("refrag: {err:#}");
        std::process::exit(1);
    }
}
