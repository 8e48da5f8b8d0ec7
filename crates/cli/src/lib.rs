//! The command line for people: `model-loader load|ps|get|unload|cancel|watch|resources|tensors|
//! files|completions`. Each subcommand is a thin rendering of one call of the typed client (`client`): a
//! step line and byte bars, a table, or `--json` (one object per line, the proto's JSON mapping).
//!
//! Collaborators: `client` (connection, auth, TLS, typed errors) and the server binary, which
//! parses the top-level command line and hands a client subcommand here. This crate never
//! imports the server's crates and holds no model logic of its own: nothing here reaches past the
//! public gRPC API.

/// `println!` that ends the command quietly (exit 0) when stdout is closed (`| head`), where
/// `println!` would panic.
macro_rules! say {
    ($($arg:tt)*) => {
        $crate::print_line(format_args!($($arg)*))
    };
}

mod exit;
mod load;
mod progress;
mod render;
mod terminal;
mod watch;

use std::{path::PathBuf, process::ExitCode, time::Duration};

use clap::{Args, Subcommand};
use client::{Client, ConnectOptions, LoadRequest};
pub use exit::{TABLE as EXIT_CODES, for_code as exit_code_for};
use terminal::Output;

/// Where the client subcommands connect unless told otherwise.
pub const DEFAULT_SERVER: &str = "http://127.0.0.1:50051";

/// How to reach the server, and how to print. Every client subcommand takes these.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Connection and output")]
pub struct ClientArgs {
    /// The server: `http://HOST:PORT`, `https://HOST:PORT`, or `HOST:PORT` (plain http).
    #[arg(long, env = "MODEL_LOADER_SERVER", default_value = DEFAULT_SERVER, value_name = "ADDR")]
    pub server: String,

    /// Bearer token for a server started with --auth-token-file. Never printed.
    #[arg(long, env = "MODEL_LOADER_TOKEN", hide_env_values = true)]
    pub token: Option<String>,

    /// A file whose first line is the token (wins over --token).
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,

    /// PEM certificates of the CA that signed an https server's certificate [default: the
    /// system's roots].
    #[arg(long, value_name = "FILE")]
    pub ca_file: Option<PathBuf>,

    /// PEM certificate this client presents, for a server with --tls-client-ca (mutual TLS).
    #[arg(long, value_name = "FILE", requires = "client_key")]
    pub client_cert: Option<PathBuf>,

    /// The PEM private key of --client-cert.
    #[arg(long, value_name = "FILE", requires = "client_cert")]
    pub client_key: Option<PathBuf>,

    /// Print one JSON object per line (the proto's JSON mapping) instead of text.
    #[arg(long)]
    pub json: bool,

    /// Limit for connecting and for each call that is not a stream (`load` and `watch` are).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub timeout: Duration,
}

/// The client subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Load a model, showing each step and the bytes of its download and read; joins a load in
    /// flight. Ctrl-C asks whether to cancel the load or leave it running.
    Load {
        /// A Hugging Face repo id (`org/name`), a folder of the server's model root, or an object
        /// store URL.
        model_id: String,
        /// Branch, tag or commit [default: main].
        #[arg(long)]
        revision: Option<String>,
        /// `cpu`, `cuda` or `cuda:N`; several GPUs as `cuda:0,cuda:1` or `cuda:*` [default: the
        /// server's --device].
        #[arg(long)]
        device: Option<String>,
        /// `f32`, `f16` or `bf16` [default: as stored, or the server's --dtype].
        #[arg(long)]
        dtype: Option<String>,
        /// Over several GPUs: `split` (each tensor on one, balanced by bytes) or `replicate` (the
        /// whole model on each) [default: split].
        #[arg(long)]
        placement: Option<String>,
        /// For a split load, where a module goes: `PREFIX=DEVICE` (`model.layers.0=cuda:1`; an
        /// empty prefix, `=cuda:0`, for the rest); repeatable.
        #[arg(long = "device-map", value_name = "PREFIX=DEVICE", value_parser = map_entry)]
        device_map: Vec<(String, String)>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// The models loaded, loading or failed: state, step, device, dtype, size, source, attached
    /// clients, last use.
    Ps {
        /// Every model the server knows, UNLOADED ones too.
        #[arg(long, short)]
        all: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// One model's status, every field.
    Get {
        model_id: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Free a model's memory (idempotent).
    Unload {
        model_id: String,
        /// Unload even while processes are attached (their connections are closed).
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Cancel a load in flight: the model ends UNLOADED.
    Cancel {
        model_id: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Follow every model (or one) live: states, steps and bytes, redrawn in place on a terminal.
    Watch {
        model_id: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Memory per device: budget, used, reserved and free, as bars.
    Resources {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// The tensors of a loaded model: name, dtype, shape, size.
    Tensors {
        model_id: String,
        /// Add each tensor's sha256 (the server reads every byte back).
        #[arg(long)]
        checksums: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// The small files kept with a loaded model (configs, tokenizer): path, size, sha256; with
    /// PATH, that file's bytes on stdout.
    Files {
        model_id: String,
        /// A file of the model (`config.json`, `tokenizer/vocab.json`): print its bytes.
        path: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Print a shell completion script (e.g. `model-loader completions bash > ~/.local/share/bash-completion/completions/model-loader`).
    Completions { shell: clap_complete::Shell },
    /// Print the man page (roff), or with DIR write one page per subcommand there
    /// (`just man`: target/man/model-loader.1 and model-loader-SUBCOMMAND.1).
    #[command(hide = true)]
    Man { dir: Option<PathBuf> },
}

/// Runs a client subcommand and returns the process's exit code. `app` is the whole command line
/// (the server's flags and these subcommands), for completions and the man page.
pub fn run(command: Command, app: impl FnOnce() -> clap::Command) -> ExitCode {
    let client_args = match command {
        Command::Completions { shell } => {
            let mut app = app();
            let name = app.get_name().to_owned();
            clap_complete::generate(shell, &mut app, name, &mut std::io::stdout());
            return ExitCode::SUCCESS;
        }
        Command::Man { dir } => {
            let written = match &dir {
                Some(dir) => clap_mangen::generate_to(app(), dir),
                None => clap_mangen::Man::new(app()).render(&mut std::io::stdout()),
            };
            return match written {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: writing the man page: {e}");
                    exit::code(exit::OTHER)
                }
            };
        }
        Command::Load { ref client, .. }
        | Command::Ps { ref client, .. }
        | Command::Get { ref client, .. }
        | Command::Unload { ref client, .. }
        | Command::Cancel { ref client, .. }
        | Command::Watch { ref client, .. }
        | Command::Resources { ref client }
        | Command::Tensors { ref client, .. }
        | Command::Files { ref client, .. } => client.clone(),
    };
    let output = Output::detect(client_args.json);
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a tokio runtime starts");
    match runtime.block_on(execute(command, &client_args, output)) {
        Ok(code) => exit::code(code),
        Err(e) => {
            report(&e, output);
            exit::code(exit::for_code(e.code()))
        }
    }
}

/// One `--device-map` entry, `PREFIX=DEVICE`; the server checks the device.
fn map_entry(entry: &str) -> Result<(String, String), String> {
    entry
        .rsplit_once('=')
        .map(|(prefix, device)| (prefix.to_owned(), device.to_owned()))
        .ok_or_else(|| format!("{entry:?} is not PREFIX=DEVICE"))
}

/// Prints an error for people (or as JSON with `--json`) on stderr.
fn report(e: &client::Error, output: Output) {
    if output == Output::Json {
        let error = serde_json::json!({
            "error": { "code": e.code() as i32, "kind": e.kind(), "message": e.message() }
        });
        eprintln!("{error}");
    } else {
        eprintln!("error: {e}");
    }
}

/// The connection options of the flags.
fn options(args: &ClientArgs) -> Result<ConnectOptions, client::Error> {
    let mut options =
        ConnectOptions::new(args.server.clone()).connect_timeout(args.timeout).request_timeout(Some(args.timeout));
    if let Some(token) = &args.token {
        options = options.token(token.clone());
    }
    if let Some(file) = &args.token_file {
        options = options.token_file(file)?;
    }
    if let Some(ca) = &args.ca_file {
        options = options.ca_file(ca);
    }
    if let (Some(cert), Some(key)) = (&args.client_cert, &args.client_key) {
        options = options.identity(cert, key);
    }
    Ok(options)
}

/// Runs one client subcommand; `Ok` holds the exit code.
async fn execute(command: Command, args: &ClientArgs, output: Output) -> Result<u8, client::Error> {
    let client = Client::connect(&options(args)?).await?;
    match command {
        Command::Load { model_id, revision, device, dtype, placement, device_map, .. } => {
            let request = LoadRequest { model_id, revision, device, dtype, placement, device_map };
            load::run(&client, request, output).await
        }
        Command::Ps { all, .. } => {
            let models: Vec<_> = client
                .list()
                .await?
                .into_iter()
                .filter(|m| all || m.state() != client::pb::ModelState::Unloaded)
                .collect();
            print_all(output, &models, render::models);
            Ok(exit::OK)
        }
        Command::Get { model_id, .. } => {
            let status = client.get(&model_id).await?;
            print_all(output, std::slice::from_ref(&status), |s| render::model(&s[0]));
            Ok(exit::OK)
        }
        Command::Unload { model_id, force, .. } => {
            let was_loaded = client.unload(&model_id, force).await?;
            let json = serde_json::json!({ "modelId": model_id, "wasLoaded": was_loaded });
            let text = if was_loaded { format!("{model_id}: UNLOADED") } else { format!("{model_id}: was not loaded") };
            print_one(output, &json, &text);
            Ok(exit::OK)
        }
        Command::Cancel { model_id, .. } => {
            let was_loading = client.cancel(&model_id).await?;
            let json = serde_json::json!({ "modelId": model_id, "wasLoading": was_loading });
            let text = if was_loading {
                format!("{model_id}: load cancelled")
            } else {
                format!("{model_id}: was not loading")
            };
            print_one(output, &json, &text);
            Ok(exit::OK)
        }
        Command::Watch { model_id, .. } => watch::run(&client, model_id.as_deref(), output).await,
        Command::Resources { .. } => {
            let devices = client.resources().await?.devices;
            print_all(output, &devices, render::resources);
            Ok(exit::OK)
        }
        Command::Tensors { model_id, checksums, .. } => {
            let tensors = client.tensors(&model_id, checksums).await?;
            print_all(output, &tensors, |t| render::tensors(t, checksums));
            Ok(exit::OK)
        }
        Command::Files { model_id, path: None, .. } => {
            let files = client.files(&model_id).await?;
            print_all(output, &files, render::files);
            Ok(exit::OK)
        }
        Command::Files { model_id, path: Some(path), .. } => {
            let content = client.read_file(&model_id, &path).await?;
            write_stdout(&content);
            Ok(exit::OK)
        }
        Command::Completions { .. } | Command::Man { .. } => unreachable!("run answers these without a server"),
    }
}

/// Items as JSON lines, or their text.
fn print_all<T: serde::Serialize>(output: Output, items: &[T], text: impl FnOnce(&[T]) -> Vec<String>) {
    if output == Output::Json {
        items.iter().for_each(print_json);
    } else {
        text(items).iter().for_each(|line| say!("{line}"));
    }
}

/// A JSON object or a line of text.
fn print_one(output: Output, json: &serde_json::Value, text: &str) {
    if output == Output::Json {
        say!("{json}");
    } else {
        say!("{text}");
    }
}

/// One line on stdout; a reader that went away ends the command.
pub(crate) fn print_line(text: std::fmt::Arguments<'_>) {
    use std::io::Write as _;
    let mut stdout = std::io::stdout().lock();
    if let Err(e) = writeln!(stdout, "{text}") {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(i32::from(exit::OK));
        }
        eprintln!("error: writing to stdout: {e}");
        std::process::exit(i32::from(exit::OTHER));
    }
}

/// Bytes as they are on stdout; a reader that went away ends the command.
fn write_stdout(bytes: &[u8]) {
    use std::io::Write as _;
    let mut stdout = std::io::stdout().lock();
    if let Err(e) = stdout.write_all(bytes).and_then(|()| stdout.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(i32::from(exit::OK));
        }
        eprintln!("error: writing to stdout: {e}");
        std::process::exit(i32::from(exit::OTHER));
    }
}

/// One JSON object on a line of stdout.
pub(crate) fn print_json<T: serde::Serialize + ?Sized>(value: &T) {
    say!("{}", serde_json::to_string(value).expect("a proto message or JSON value serialises"));
}
