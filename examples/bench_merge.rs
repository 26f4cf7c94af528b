//! Merge the `bench.json` files of several `refrag bench` runs (for example one per context
//! length, when the longest contexts take too long to run with the short ones) into one table
//! and one TTFT plot.
//!
//! ```text
//! cargo run --example bench_merge -- --out_dir runs/bench_all runs/bench_a runs/bench_b
//! ```
//!
//! Writes `bench.json` and `ttft.svg` into `--out_dir` and prints the markdown tables.

use std::path::PathBuf;

use anyhow::Result;
use clap::Parser;
use refrag::evaluation::bench::{self, BenchRow};

#[derive(Parser)]
struct Args {
    /// Where to write the merged bench.json and ttft.svg.
    #[arg(long = "out_dir")]
    out_dir: PathBuf,
    /// Output directories of `refrag bench` runs.
    #[arg(required = true)]
    runs: Vec<PathBuf>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let mut rows: Vec<BenchRow> = Vec::new();
    for dir in &args.runs {
        rows.extend(refrag::io::jsonio::read_json::<Vec<BenchRow>>(
            &dir.join("bench.json"),
        )?);
    }
    rows.sort_by_key(|r| r.context_tokens);
    refrag::io::jsonio::write_json(&args.out_dir.join("bench.json"), &rows)?;
    bench::plot_svg(&rows, &args.out_dir.join("ttft.svg"))?;
    print!("{}", bench::markdown(&rows));
    Ok(())
}
