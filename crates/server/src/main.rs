//! `model-loader`: with no subcommand (or `serve`), parse flags, start logging, bind, serve until
//! SIGTERM/SIGINT; with a client subcommand (`load`, `ps`, …), run it against a server (`cli`).

use std::{ffi::OsString, process::ExitCode, time::Duration};

use anyhow::Context;
use clap::{CommandFactory as _, FromArgMatches as _, Parser, Subcommand};
use server::{Cli, init_tracing, run, shutdown_signal};

/// How long the runtime waits, after `run` has drained within the grace, for blocking threads
/// to end. A thread stuck in the kernel (a read from a stalled filesystem) never ends, and a
/// plain runtime drop would wait for it for ever: the process exits regardless.
const BLOCKING_THREADS_GRACE: Duration = Duration::from_millis(200);

/// The whole command line: the server's flags, or one subcommand. A subcommand's flags are its
/// own: the server's (and their `MODEL_LOADER_*` variables) are not read for it.
#[derive(Debug, Parser)]
#[command(
    name = "model-loader",
    version,
    about = "model-loader: a gRPC service that loads safetensors models onto a device, keeps them resident, and streams \
             every load's eight steps to its clients. With no subcommand it serves; the subcommands are its clients.",
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true,
    after_help = cli::EXIT_CODES
)]
struct Top {
    #[command(flatten)]
    serve: Cli,
    #[command(subcommand)]
    command: Option<TopCommand>,
}

// Parsed once per process: the size of a variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
enum TopCommand {
    /// Serve (the same as no subcommand).
    Serve(Cli),
    #[command(flatten)]
    Client(cli::Command),
}

fn main() -> anyhow::Result<ExitCode> {
    let top = parse(std::env::args_os().collect());
    let flags = match top.command {
        None => top.serve,
        Some(TopCommand::Serve(flags)) => flags,
        Some(TopCommand::Client(command)) => return Ok(cli::run(command, Top::command)),
    };
    serve(flags)?;
    Ok(ExitCode::SUCCESS)
}

/// The command line. When it names a subcommand (which must come first: the server's flags
/// conflict with subcommands), the top level's `MODEL_LOADER_*` variables are not read, so a
/// variable set for the server (even one it would refuse) cannot fail a client command.
fn parse(args: Vec<OsString>) -> Top {
    let mut command = Top::command();
    let first = args.get(1).and_then(|a| a.to_str()).unwrap_or_default();
    if command.find_subcommand(first).is_some() || first == "help" {
        command = command.mut_args(|arg| arg.env(None));
    }
    let matches = command.get_matches_from(args);
    Top::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())
}

fn serve(flags: Cli) -> anyhow::Result<()> {
    let config = flags.into_config(|name| std::env::var(name).ok())?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the runtime")?;
    // Within the runtime: the trace exporter's gRPC channel is spawned on it.
    let traces = runtime.block_on(async { init_tracing(config.log_format, config.otlp.as_ref()) })?;
    server::raise_open_files_limit();
    let result = runtime.block_on(async {
        let listener =
            tokio::net::TcpListener::bind(config.listen).await.with_context(|| format!("binding {}", config.listen))?;
        run(config, listener, shutdown_signal()).await
    });
    // The last spans (the loads that shutdown ended) go out while the runtime still runs.
    if let Some(traces) = traces {
        traces.shutdown();
    }
    runtime.shutdown_timeout(BLOCKING_THREADS_GRACE);
    result
}
