//! `model-loader-bench --gpu-attach` (a `cuda` build, on the GPU machine): attach on a GPU in one
//! run: the dense BF16 model loaded for attach onto `cuda:0` (one CUDA VMM allocation), then
//! `attach()` to usable torch tensors from Python (clients/python), against warm reloads of the
//! same files by the Python GPU peers measured in the same run. The attached tensors are checked
//! against the files. Writes `attach.json` and `attach-bench.md` under `--out`.

use std::{path::Path, process::Command};

use anyhow::Context;
use fixtures::fixture::Expected;
use serde::{Deserialize, Serialize};

use crate::{
    Options,
    gpu_report::{FASTSAFETENSORS, TORCH},
    models,
    peers::json_of,
    report::Check,
    server, stats,
};

#[derive(Debug, Deserialize)]
struct Peer {
    seconds: Vec<f64>,
    tensors: std::collections::BTreeMap<String, (String, Vec<u64>, String)>,
}

/// What the run measured.
#[derive(Debug, Serialize)]
pub struct GpuAttach {
    pub model: String,
    pub bytes: u64,
    /// LoadModel for attach, to 8/8, seconds.
    pub load_s: Vec<f64>,
    pub attach_s: Vec<f64>,
    pub attach_ms_median: f64,
    /// Each peer's median warm reload, seconds.
    pub peers: Vec<(String, f64)>,
    pub fastest_peer: String,
    pub speedup: f64,
    pub checks: Vec<Check>,
}

/// Runs it (see the module's doc).
pub async fn run(options: &Options) -> anyhow::Result<GpuAttach> {
    let exe = options.server_exe()?;
    let root = std::path::absolute(options.work.join("gpu-models"))?;
    let dense = models::dense_bf16(&root, "gpu-dense", options.gpu_dense_mib, options.gpu_shards, 16)?;
    crate::limit::warm(&dense.files)?;
    let socket = std::path::absolute(options.work.join("attach.sock"))?;
    let server =
        server::start(&exe, &root, &["--device", "cuda:0", "--attach-socket", socket.to_str().context("UTF-8")?]).await;
    let client = server::connect(server.addr).await?;
    let mut load_s = Vec::new();
    for _ in 0..options.gpu_runs {
        load_s.push(server::load(&client, &dense.id).await?.total.as_secs_f64());
        server::unload(&client, &dense.id).await?;
    }
    server::load(&client, &dense.id).await?;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("attach_peer.py");
    let attach: Peer = json_of(
        Command::new("python3")
            .arg(&script)
            .args(["--torch", "--runs", &options.gpu_runs.to_string()])
            .arg(&socket)
            .arg(&dense.id),
        "the attach script",
    )?;
    server::unload(&client, &dense.id).await?;
    drop(server);
    let mut checks = vec![Check::compare("model-loader attach (torch)", &dense, &Expected::observed(attach.tensors))];
    let mut peers = Vec::new();
    for (loader, name) in [(TORCH, "torch"), (FASTSAFETENSORS, "fastsafetensors")] {
        let mut command = Command::new("python3");
        let runs = options.gpu_runs.to_string();
        match json_of::<Peer>(
            command.arg(&options.gpu_python_script).args(["--loader", name, "--runs", &runs]).args(&dense.files),
            loader,
        ) {
            Ok(peer) => {
                checks.push(Check::compare(loader, &dense, &Expected::observed(peer.tensors)));
                peers.push((loader.to_owned(), stats::median(&peer.seconds)));
            }
            Err(e) => eprintln!("[bench] {loader} could not run: {e:#}"),
        }
    }
    let attach_median = stats::median(&attach.seconds);
    let (fastest_peer, fastest) =
        peers.iter().min_by(|a, b| a.1.total_cmp(&b.1)).cloned().unwrap_or_else(|| (String::new(), 0.0));
    let report = GpuAttach {
        model: dense.id.clone(),
        bytes: dense.bytes,
        load_s,
        attach_ms_median: attach_median * 1e3,
        attach_s: attach.seconds,
        speedup: if attach_median > 0.0 { fastest / attach_median } else { 0.0 },
        peers,
        fastest_peer,
        checks,
    };
    std::fs::create_dir_all(&options.out)?;
    std::fs::write(options.out.join("attach-bench.json"), serde_json::to_string_pretty(&report)? + "\n")?;
    eprintln!(
        "[bench] attach {:.2} ms vs {} {:.3} s: {:.0}× (goal ≥ 20×); load for attach {:.3} s; tensors match: {}",
        report.attach_ms_median,
        report.fastest_peer,
        fastest,
        report.speedup,
        stats::median(&report.load_s),
        report.checks.iter().all(|c| c.same_tensors)
    );
    anyhow::ensure!(
        report.checks.iter().all(|c| c.same_tensors),
        "loaders that read other tensors: {:?}",
        report.checks
    );
    Ok(report)
}
