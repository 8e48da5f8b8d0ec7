//! `model-loader`: parse flags, start logging, bind, serve until SIGTERM/SIGINT.

use anyhow::Context;
use clap::Parser;
use server::{Cli, init_tracing, run, shutdown_signal};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Cli::parse().into_config(|name| std::env::var(name).ok())?;
    init_tracing(config.log_format);
    let listener =
        tokio::net::TcpListener::bind(config.listen).await.with_context(|| format!("binding {}", config.listen))?;
    run(config, listener, shutdown_signal()).await
}
