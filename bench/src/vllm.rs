//! vLLM's start-up to its first token with `--load-format model-loader` (the client's plugin:
//! weights from the server over the attach socket) against `auto` (vLLM's own loader reading
//! the folder, page cache warm), the same model, alternating, each run a fresh engine
//! (`vllm_peer.py`, run with the Python of the vLLM environment, `scripts/vllm-env`). Also the
//! model load's share of the start-up and whether both generated the same greedy tokens.

use std::{fmt::Write as _, path::Path, process::Command};

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::{Options, peers::json_of, server, stats::median};

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Times {
    pub auto: Vec<f64>,
    pub model_loader: Vec<f64>,
}

/// What the script prints.
#[derive(Debug, Deserialize)]
struct Peer {
    seconds: Times,
    model_load_s: Times,
    same: bool,
    tokens: Vec<u64>,
    versions: String,
}

/// The vLLM section of the report.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Vllm {
    pub bytes: u64,
    /// From `LLM(...)` to the first generated token, per run.
    pub first_token_s: Times,
    /// Of those, vLLM's model load (build, weights, post-processing), per run.
    pub model_load_s: Times,
    pub auto_first_token_s_median: f64,
    pub model_loader_first_token_s_median: f64,
    pub auto_model_load_s_median: f64,
    pub model_loader_model_load_s_median: f64,
    /// auto's median start-to-first-token over model-loader's.
    pub speedup: f64,
    /// Whether both generated the same greedy tokens.
    pub same: bool,
    pub tokens: Vec<u64>,
    pub versions: String,
}

/// Writes a Llama of about `mib` MiB, serves it with an attach socket, loads it, writes its
/// small files for vLLM's `--model`, and times both load formats `runs` times with `python`.
pub async fn run(options: &Options, python: &Path, mib: usize, runs: usize) -> anyhow::Result<Vllm> {
    let exe = options.server_exe()?;
    let root = std::path::absolute(options.work.join("vllm-models"))?;
    let folder = root.join("llama");
    let small = std::path::absolute(options.work.join("vllm-small"))?;
    let script = &options.vllm_script;
    for dir in [&folder, &small] {
        let _ = std::fs::remove_dir_all(dir);
    }
    #[derive(Deserialize)]
    struct Made {
        bytes: u64,
    }
    let what = "the vLLM script (the Python of scripts/vllm-env)";
    let made: Made = json_of(
        Command::new(python).arg(script).args(["make", "--mib", &mib.to_string(), "--out"]).arg(&folder),
        what,
    )?;
    let socket = std::path::absolute(options.work.join("vllm.sock"))?;
    let socket_arg = socket.to_str().context("a UTF-8 path")?;
    let server = server::start(&exe, &root, &["--attach-socket", socket_arg]).await;
    let client = server::connect(server.addr).await?;
    server::load(&client, "llama").await?;
    let files = Command::new(python)
        .args(["-m", "model_loader.vllm", "files", "llama"])
        .arg(&small)
        .args(["--socket", socket_arg])
        .output()
        .context("python -m model_loader.vllm files")?;
    anyhow::ensure!(files.status.success(), "model_loader.vllm files: {}", String::from_utf8_lossy(&files.stderr));
    let address = server.addr.to_string();
    let peer: Peer = json_of(
        Command::new(python)
            .arg(script)
            .args(["time", "--runs", &runs.to_string(), "--model-id", "llama", "--socket", socket_arg])
            .args(["--server", &address, "--folder"])
            .arg(&folder)
            .arg("--small")
            .arg(&small),
        what,
    )?;
    server::unload(&client, "llama").await?;
    let (auto, ours) = (median(&peer.seconds.auto), median(&peer.seconds.model_loader));
    Ok(Vllm {
        bytes: made.bytes,
        auto_first_token_s_median: auto,
        model_loader_first_token_s_median: ours,
        auto_model_load_s_median: median(&peer.model_load_s.auto),
        model_loader_model_load_s_median: median(&peer.model_load_s.model_loader),
        speedup: if ours > 0.0 { auto / ours } else { 0.0 },
        first_token_s: peer.seconds,
        model_load_s: peer.model_load_s,
        same: peer.same,
        tokens: peer.tokens,
        versions: peer.versions,
    })
}

impl Vllm {
    pub fn markdown(&self) -> String {
        let mut md = String::new();
        let _ = writeln!(
            md,
            "## vLLM: start-up to the first token, `--load-format model-loader` against `auto`\n\n\
             A Llama of {:.2} GB (F32) on the CPU ({}); medians of {} runs each, alternating, each a fresh engine \
             (`LLM(...)` to its first greedy token, the engine in the timing process). `auto` reads the folder from a \
             warm page cache; `model-loader` takes the weights from the server (the model resident there, as when an \
             engine restarts) and its config and tokenizer from the served small files. Same greedy tokens: {}.\n",
            self.bytes as f64 / 1e9,
            self.versions,
            self.first_token_s.model_loader.len(),
            if self.same { "yes" } else { "**no**" },
        );
        let _ = writeln!(
            md,
            "| load format | to first token | of which the model load | auto's time over it |\n|---|---|---|---|"
        );
        let share = |load: f64, total: f64| if total > 0.0 { 100.0 * load / total } else { 0.0 };
        let _ = writeln!(
            md,
            "| `auto` | {:.2} s | {:.2} s ({:.0} %) | 1.00× |",
            self.auto_first_token_s_median,
            self.auto_model_load_s_median,
            share(self.auto_model_load_s_median, self.auto_first_token_s_median)
        );
        let _ = writeln!(
            md,
            "| `model-loader` | {:.2} s | {:.2} s ({:.0} %) | {:.2}× |\n",
            self.model_loader_first_token_s_median,
            self.model_loader_model_load_s_median,
            share(self.model_loader_model_load_s_median, self.model_loader_first_token_s_median),
            self.speedup
        );
        md
    }
}
