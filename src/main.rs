//! The `refrag` binary: parse the command line, dispatch to one function per subcommand, and turn
//! an error into one line on stderr and a non-zero exit status (2 for a usage error, 1 otherwise).

use clap::error::ErrorKind;
use clap::Parser;

fn main() {
    // Before any work: an OpenBLAS older than the CPU would run generic SSE3 kernels.
    refrag::kernels::blas::core::ensure();
    let cli = match refrag::cli::Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => match e.kind() {
            ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => e.exit(),
            _ => {
                eprintln!("refrag: {} (see 'refrag --help')", first_line(&e));
                std::process::exit(2);
            }
        },
    };
    if let Err(err) = refrag::commands::run(cli.command) {
        eprintln!("refrag: {err:#}");
        std::process::exit(1);
    }
}

/// The first line of clap's message, without its "error: " prefix; when that line ends in a colon
/// (missing required arguments), the indented lines it introduces follow it on the same line.
fn first_line(e: &clap::Error) -> String {
    let text = e.render().to_string();
    let mut lines = text.lines();
    let mut line = lines
        .next()
        .unwrap_or("invalid command line")
        .trim_start_matches("error: ")
        .to_string();
    if line.ends_with(':') {
        let items: Vec<&str> = lines
            .take_while(|l| l.starts_with(' '))
            .map(str::trim)
            .collect();
        line = format!("{} {}", line, items.join(", "));
    }
    line
}
