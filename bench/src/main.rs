//! `model-loader-bench`: see the `bench` crate. `just bench` builds it in release and runs it.

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let options = bench::Options::parse();
    let report = bench::run(&options).await?;
    for target in &report.targets {
        eprintln!(
            "[bench] {:<55} {:>12} (goal {}){}",
            target.name,
            target.measured,
            target.target,
            if target.met { "" } else { "  MISSED" }
        );
    }
    Ok(())
}
