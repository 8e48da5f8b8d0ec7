//! The engines' front door: the time from `model_loader.transformers.from_server` to a ready
//! model (the weights attached from the server's memory) against transformers' own
//! `from_pretrained` of the same folder, warm, in the same Python process and the same rounds
//! (`adapter_peer.py`, which also checks that both give the same logits). On the CPU in `just
//! bench`; with `--adapter --adapter-device cuda:0` on a GPU machine (a `cuda` build).

use std::{fmt::Write as _, process::Command};

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::{Options, peers::json_of, server, stats::median};

/// What the script prints.
#[derive(Debug, Deserialize)]
struct Peer {
    seconds: Times,
    same: bool,
    compared: String,
    stats: serde_json::Value,
    gpu_free_drop_bytes: i64,
    torch: String,
    /// `transformers 5.25.0` or `diffusers 0.42.1`.
    framework: String,
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Times {
    pub from_pretrained: Vec<f64>,
    pub from_server: Vec<f64>,
}

/// The adapter section of the report.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Adapter {
    /// `llama` (transformers) or `sd` (a diffusers pipeline).
    pub kind: String,
    pub device: String,
    pub bytes: u64,
    pub seconds: Times,
    pub from_pretrained_s_median: f64,
    pub from_server_s_median: f64,
    /// from_pretrained's median over the adapter's: how many times sooner the model is ready.
    pub speedup: f64,
    /// Whether both gave the same output, bit for bit.
    pub same: bool,
    /// What was compared: logits, or a pipeline's 2-step image.
    pub compared: String,
    /// What the adapter said it attached and copied.
    pub stats: serde_json::Value,
    /// On a GPU: how much the GPU's free memory fell while the consumer built its model (the
    /// server's copy is not duplicated: far less than `bytes`).
    pub gpu_free_drop_bytes: i64,
    pub versions: String,
}

/// Writes a Llama of about `mib` MiB (or, `kind` `sd`, an SD-1.5-shaped pipeline), serves it
/// with an attach socket, loads it onto `device` and times both paths `runs` times.
pub async fn run(options: &Options, kind: &str, device: &str, mib: usize, runs: usize) -> anyhow::Result<Adapter> {
    let exe = options.server_exe()?;
    let root = std::path::absolute(options.work.join("adapter-models"))?;
    let folder = root.join(kind);
    let script = &options.adapter_script;
    let dtype = match (kind, device) {
        (_, "cpu") => "float32",
        ("sd", _) => "float16",
        _ => "bfloat16",
    };
    let _ = std::fs::remove_dir_all(&folder);
    #[derive(Deserialize)]
    struct Made {
        bytes: u64,
    }
    let made: Made = json_of(
        Command::new("python3")
            .arg(script)
            .args(["make", "--kind", kind, "--mib", &mib.to_string(), "--dtype", dtype, "--out"])
            .arg(&folder),
        "the adapter script (pip install './clients/python[transformers]')",
    )?;
    let socket = std::path::absolute(options.work.join("adapter.sock"))?;
    let server =
        server::start(&exe, &root, &["--device", device, "--attach-socket", socket.to_str().context("a UTF-8 path")?])
            .await;
    let client = server::connect(server.addr).await?;
    server::load(&client, kind).await?;
    let peer: Peer = json_of(
        Command::new("python3")
            .arg(script)
            .args(["time", "--kind", kind, "--runs", &runs.to_string(), "--model-id", kind, "--device", device])
            .arg("--socket")
            .arg(&socket)
            .arg("--folder")
            .arg(&folder),
        "the adapter script",
    )?;
    server::unload(&client, kind).await?;
    let (pretrained, attached) = (median(&peer.seconds.from_pretrained), median(&peer.seconds.from_server));
    Ok(Adapter {
        kind: kind.to_owned(),
        device: device.to_owned(),
        bytes: made.bytes,
        from_pretrained_s_median: pretrained,
        from_server_s_median: attached,
        speedup: if attached > 0.0 { pretrained / attached } else { 0.0 },
        seconds: peer.seconds,
        same: peer.same,
        compared: peer.compared,
        stats: peer.stats,
        gpu_free_drop_bytes: peer.gpu_free_drop_bytes,
        versions: format!("torch {}, {}", peer.torch, peer.framework),
    })
}

impl Adapter {
    pub fn markdown(&self) -> String {
        let mut md = String::new();
        let (what, module) = match self.kind.as_str() {
            "sd" => ("An SD-1.5-shaped diffusers pipeline", "diffusers"),
            _ => ("A Llama", "transformers"),
        };
        let _ = writeln!(
            md,
            "## A ready {module} model: the adapter against from_pretrained\n\n\
             {what} of {:.2} GB of weights on {}, served for attach; medians of {} warm runs each, alternating, \
             in one Python process ({}). Both give the same {}, bit for bit: {}.\n",
            self.bytes as f64 / 1e9,
            self.device,
            self.seconds.from_server.len(),
            self.versions,
            self.compared,
            if self.same { "yes" } else { "**no**" },
        );
        let _ = writeln!(md, "| path | median | from_pretrained's time over it |\n|---|---|---|");
        let _ = writeln!(md, "| `from_pretrained(folder)`, warm | {:.3} s | 1.00× |", self.from_pretrained_s_median);
        let _ = writeln!(
            md,
            "| `model_loader.{module}.from_server(id)` | {:.3} s | {:.2}× |",
            self.from_server_s_median, self.speedup
        );
        let _ = writeln!(md, "\nWhat the adapter reported: `{}`", self.stats);
        if self.device != "cpu" {
            let _ = writeln!(
                md,
                "\nThe GPU's free memory fell by {:.2} GB while the consumer built its model ({:.2} GB of weights).",
                self.gpu_free_drop_bytes as f64 / 1e9,
                self.bytes as f64 / 1e9
            );
        }
        md.push('\n');
        md
    }
}
