//! `model-loader`: parse flags, start logging, bind, serve until SIGTERM/SIGINT.

use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use server::{Cli, init_tracing, run, shutdown_signal};

/// How long the runtime waits, after `run` has drained within the grace, for blocking threads
/// to end. A thread stuck in the kernel (a read from a stalled filesystem) never ends, and a
/// plain runtime drop would wait for it for ever: the process exits regardless.
const BLOCKING_THREADS_GRACE: Duration = Duration::from_millis(200);

fn main() -> anyhow::Result<()> {
    let config = Cli::parse().into_config(|name| std::env::var(name).ok())?;
    init_tracing(config.log_format);
    server::raise_open_files_limit();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the runtime")?;
    let result = runtime.block_on(async {
        let listener =
            tokio::net::TcpListener::bind(config.listen).await.with_context(|| format!("binding {}", config.listen))?;
        run(config, listener, shutdown_signal()).await
    });
    runtime.shutdown_timeout(BLOCKING_THREADS_GRACE);
    result
}
