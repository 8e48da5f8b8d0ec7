//! `model-loader-bench --gpu-multi` (a `cuda` build, on a machine of two GPUs or more): one model
//! over several GPUs, end to end through gRPC, in one run.
//!
//! - Replicas: the dense BF16 model on every GPU (`cuda:*`, `replicate`) against the same model
//!   on `cuda:0` alone, alternating, warm; each replica's tensors checked against the files.
//! - Replicas for attach: the same on a server with the attach socket (each replica its own VMM
//!   allocation), and the last GPU's replica attached from Python (torch), every tensor on that
//!   GPU with the files' bytes.
//! - Split: a server whose per-device budget is below the model, so `cuda:0` alone refuses it;
//!   the model split over `cuda:0,cuda:1`, every tensor checked against the files, each GPU's
//!   share; attached from Python (torch), each tensor on the GPU ListTensors names, with the
//!   files' bytes.
//! - Every GPU's free memory (the driver's figure) before the first load and after the last
//!   unload.
//!
//! Writes `multi-gpu.json` and `multi-gpu.md` under `--out`.

use std::{collections::BTreeMap, path::Path, process::Command};

use anyhow::{Context, ensure};
use client::{Client, LoadRequest, LoadUpdate};
use fixtures::fixture::Expected;
use futures::StreamExt;
use model_manager::resource_manager::gpu::Gpu;
use serde::{Deserialize, Serialize};

use crate::{
    Options,
    gpu_report::{FREE_SLACK, machine, nvidia_smi},
    models::{self, Model},
    peers::json_of,
    report::Check,
    server, stats,
};

/// The most a load of replicas on every GPU may take, as a multiple of the one-GPU load.
pub const REPLICA_GOAL: f64 = 1.3;

/// What the run measured.
#[derive(Debug, Serialize)]
pub struct GpuMulti {
    pub machine: String,
    pub gpu: String,
    pub gpus: usize,
    pub model: String,
    pub bytes: u64,
    /// The one-GPU load (`cuda:0`), seconds, warm.
    pub one_gpu_s: Vec<f64>,
    /// Replicas on every GPU, seconds, warm.
    pub replicas_s: Vec<f64>,
    /// Median replicas / median one GPU.
    pub replica_ratio: f64,
    /// Replicas on every GPU with the attach socket on (VMM allocations), seconds.
    pub exportable_replicas_s: Vec<f64>,
    /// The last GPU's replica attached: every tensor on that GPU.
    pub replica_attach_on_its_gpu: bool,
    /// The per-device budget of the split server, bytes.
    pub split_budget: u64,
    /// What the split server answered a load onto `cuda:0` alone.
    pub one_gpu_refusal: String,
    /// The split load over `cuda:0,cuda:1`, seconds.
    pub split_s: Vec<f64>,
    /// Bytes on each GPU of the split model, as ListTensors places them.
    pub split_shares: BTreeMap<String, u64>,
    /// Each GPU: free bytes before the first load, after the last unload.
    pub free: Vec<(String, u64, u64)>,
    /// Attached split tensors on the GPU ListTensors names.
    pub attach_on_their_gpus: bool,
    pub checks: Vec<Check>,
}

/// Runs it (see the module's doc).
pub async fn run(options: &Options) -> anyhow::Result<GpuMulti> {
    let exe = options.server_exe()?;
    let gpus = Gpu::all();
    ensure!(gpus.len() >= 2, "--gpu-multi needs two GPUs or more; this machine has {}", gpus.len());
    let root = std::path::absolute(options.work.join("gpu-models"))?;
    let dense = models::dense_bf16(&root, "gpu-dense", options.gpu_dense_mib, options.gpu_shards, 16)?;
    crate::limit::warm(&dense.files)?;
    let free_before: Vec<u64> = gpus.iter().map(Gpu::free).collect();
    let mut checks = Vec::new();

    say(format!("replicas on {} GPUs against cuda:0 alone, {} bytes", gpus.len(), dense.bytes));
    let server = server::start(&exe, &root, &[]).await;
    let client = server::connect(server.addr).await?;
    let (one_gpu, every) = (request(&dense.id, "cuda:0", None), request(&dense.id, "cuda:*", Some("replicate")));
    timed(&client, one_gpu.clone()).await?;
    server::unload(&client, &dense.id).await?;
    timed(&client, every.clone()).await?;
    for (device, tensors) in by_device(&client, &dense.id).await? {
        checks.push(Check::compare(&format!("replica on {device}"), &dense, &Expected::observed(tensors)));
    }
    server::unload(&client, &dense.id).await?;
    let (mut one_gpu_s, mut replicas_s) = (Vec::new(), Vec::new());
    for round in 0..options.gpu_runs {
        for k in 0..2 {
            let (samples, asked) =
                if (k + round) % 2 == 0 { (&mut one_gpu_s, &one_gpu) } else { (&mut replicas_s, &every) };
            samples.push(timed(&client, asked.clone()).await?);
            server::unload(&client, &dense.id).await?;
        }
        say(format!("  round {}: one GPU {:.3} s, replicas {:.3} s", round + 1, one_gpu_s[round], replicas_s[round]));
    }
    drop(server);

    let exportable = exportable_replicas(options, &exe, &root, &dense, &mut checks).await?;
    let split = split(options, &exe, &root, &dense, &mut checks).await?;
    let free_after: Vec<u64> = gpus.iter().map(Gpu::free).collect();
    let report = GpuMulti {
        machine: machine(std::thread::available_parallelism().map_or(1, |n| n.get())),
        gpu: nvidia_smi(),
        gpus: gpus.len(),
        model: dense.id.clone(),
        bytes: dense.bytes,
        replica_ratio: stats::median(&replicas_s) / stats::median(&one_gpu_s).max(1e-9),
        one_gpu_s,
        replicas_s,
        exportable_replicas_s: exportable.0,
        replica_attach_on_its_gpu: exportable.1,
        split_budget: split.budget,
        one_gpu_refusal: split.refusal,
        split_s: split.seconds,
        split_shares: split.shares,
        free: gpus.iter().zip(free_before.iter().zip(&free_after)).map(|(g, (&b, &a))| (cuda(g), b, a)).collect(),
        attach_on_their_gpus: split.attach_on_their_gpus,
        checks,
    };
    write(&options.out, &report)?;
    ensure!(report.checks.iter().all(|c| c.same_tensors), "tensors that differ from the files: {:?}", report.checks);
    Ok(report)
}

/// Replicas on a server with the attach socket: their load times, and whether the last GPU's
/// replica, attached, has every tensor there.
async fn exportable_replicas(
    options: &Options,
    exe: &Path,
    root: &Path,
    dense: &Model,
    checks: &mut Vec<Check>,
) -> anyhow::Result<(Vec<f64>, bool)> {
    let socket = std::path::absolute(options.work.join("attach-replicas.sock"))?;
    let server = server::start(exe, root, &["--attach-socket", socket.to_str().context("UTF-8")?]).await;
    let client = server::connect(server.addr).await?;
    let every = request(&dense.id, "cuda:*", Some("replicate"));
    let mut seconds = Vec::new();
    for _ in 0..options.gpu_runs {
        seconds.push(timed(&client, every.clone()).await?);
        server::unload(&client, &dense.id).await?;
    }
    timed(&client, every).await?;
    let by_device = by_device(&client, &dense.id).await?;
    for (device, tensors) in &by_device {
        checks.push(Check::compare(
            &format!("replica on {device}, attach on"),
            dense,
            &Expected::observed(tensors.clone()),
        ));
    }
    let last = by_device.keys().next_back().context("no replica listed")?.clone();
    let attached = attach(&socket, &dense.id, Some(&last))?;
    checks.push(Check::compare(
        &format!("replica on {last}, attached (torch)"),
        dense,
        &Expected::observed(attached.tensors),
    ));
    let on_its_gpu = !attached.devices.is_empty() && attached.devices.values().all(|d| *d == last);
    server::unload(&client, &dense.id).await?;
    say(format!(
        "  replicas for attach: {:.3} s (median); {last}'s replica attached there: {on_its_gpu}",
        stats::median(&seconds)
    ));
    Ok((seconds, on_its_gpu))
}

/// The split part's figures.
struct Split {
    budget: u64,
    refusal: String,
    seconds: Vec<f64>,
    shares: BTreeMap<String, u64>,
    attach_on_their_gpus: bool,
}

/// A server whose budget per device is 60% of the model: `cuda:0` alone refuses it, and it loads
/// split over `cuda:0,cuda:1`.
async fn split(
    options: &Options,
    exe: &Path,
    root: &Path,
    dense: &Model,
    checks: &mut Vec<Check>,
) -> anyhow::Result<Split> {
    let budget = dense.bytes * 6 / 10;
    say(format!("split over cuda:0,cuda:1 with {budget} bytes a device"));
    let socket = std::path::absolute(options.work.join("attach-multi.sock"))?;
    let flags = ["--memory-budget", &budget.to_string(), "--attach-socket", socket.to_str().context("UTF-8")?];
    let server = server::start(exe, root, &flags).await;
    let client = server::connect(server.addr).await?;
    let refusal = match timed(&client, request(&dense.id, "cuda:0", None)).await {
        Ok(_) => anyhow::bail!("cuda:0 took the whole model under a budget of {budget} bytes"),
        Err(e) => format!("{e:#}"),
    };
    let asked = request(&dense.id, "cuda:0,cuda:1", None);
    let mut seconds = Vec::new();
    for _ in 0..options.gpu_runs {
        seconds.push(timed(&client, asked.clone()).await?);
        server::unload(&client, &dense.id).await?;
    }
    timed(&client, asked).await?;
    let listed = client.tensors(&dense.id, true).await.context("ListTensors")?;
    let mut shares = BTreeMap::new();
    for t in &listed {
        *shares.entry(t.device.clone()).or_insert(0) += t.size_bytes;
    }
    let files = listed.iter().map(|t| (t.name.clone(), (t.dtype.clone(), t.shape.clone(), t.sha256.clone())));
    checks.push(Check::compare("split over cuda:0,cuda:1", dense, &Expected::observed(files.collect())));
    let attached = attach(&socket, &dense.id, None)?;
    checks.push(Check::compare("split, attached (torch)", dense, &Expected::observed(attached.tensors)));
    let on_their_gpus = listed.iter().all(|t| attached.devices.get(&t.name) == Some(&t.device));
    server::unload(&client, &dense.id).await?;
    Ok(Split { budget, refusal, seconds, shares, attach_on_their_gpus: on_their_gpus })
}

/// What the attach script printed.
#[derive(Debug, Deserialize)]
struct Attached {
    tensors: BTreeMap<String, (String, Vec<u64>, String)>,
    /// Each tensor's torch device (`cuda:1`).
    devices: BTreeMap<String, String>,
}

/// `id` attached from Python as torch tensors (the replica on `device`, if named).
fn attach(socket: &Path, id: &str, device: Option<&str>) -> anyhow::Result<Attached> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("attach_peer.py");
    let mut command = Command::new("python3");
    command.arg(&script).args(["--torch", "--runs", "1"]);
    if let Some(device) = device {
        command.args(["--device", device]);
    }
    json_of(command.arg(socket).arg(id), "the attach script")
}

fn request(id: &str, device: &str, placement: Option<&str>) -> LoadRequest {
    LoadRequest { device: Some(device.into()), placement: placement.map(Into::into), ..LoadRequest::new(id) }
}

/// One load to 8/8, seconds from the call.
async fn timed(client: &Client, request: LoadRequest) -> anyhow::Result<f64> {
    let start = std::time::Instant::now();
    let id = request.model_id.clone();
    let mut stream = client.load(request).await.context("LoadModel")?;
    while let Some(update) = stream.next().await {
        if let LoadUpdate::Finished(outcome) = update {
            outcome.with_context(|| format!("loading {id}"))?;
            return Ok(start.elapsed().as_secs_f64());
        }
    }
    anyhow::bail!("the load of {id} ended without an outcome")
}

/// ListTensors with checksums, each device's tensors apart.
async fn by_device(
    client: &Client,
    id: &str,
) -> anyhow::Result<BTreeMap<String, BTreeMap<String, (String, Vec<u64>, String)>>> {
    let mut out: BTreeMap<String, BTreeMap<_, _>> = BTreeMap::new();
    for t in client.tensors(id, true).await.context("ListTensors")? {
        out.entry(t.device).or_default().insert(t.name, (t.dtype, t.shape, t.sha256));
    }
    Ok(out)
}

fn cuda(gpu: &Gpu) -> String {
    format!("cuda:{}", gpu.ordinal)
}

fn say(line: impl AsRef<str>) {
    eprintln!("[bench] {}", line.as_ref());
}

fn write(out: &Path, report: &GpuMulti) -> anyhow::Result<()> {
    std::fs::create_dir_all(out)?;
    std::fs::write(out.join("multi-gpu.json"), serde_json::to_string_pretty(report)? + "\n")?;
    let (one, every) = (stats::median(&report.one_gpu_s), stats::median(&report.replicas_s));
    let worst_free = report.free.iter().map(|(_, before, after)| before.saturating_sub(*after)).max().unwrap_or(0);
    let mut md = format!(
        "# Several GPUs\n\nWritten by `model-loader-bench --gpu-multi`.\n\n- Machine: {}\n- GPUs: {} × {}\n\
         - Model `{}`: {} bytes, BF16\n\n",
        report.machine, report.gpus, report.gpu, report.model, report.bytes
    );
    md += "| what | median s (min–max) |\n|---|---|\n";
    for (what, s) in [
        ("cuda:0 alone".to_owned(), &report.one_gpu_s),
        (format!("replicas on all {} GPUs", report.gpus), &report.replicas_s),
        (format!("replicas on all {} GPUs, attach socket on", report.gpus), &report.exportable_replicas_s),
        ("split over cuda:0,cuda:1".to_owned(), &report.split_s),
    ] {
        let (lo, hi) = (s.iter().copied().fold(f64::MAX, f64::min), s.iter().copied().fold(0.0, f64::max));
        md += &format!("| {what} | {:.3} ({lo:.3}–{hi:.3}) |\n", stats::median(s));
    }
    md += "\n| target | goal | measured | met |\n|---|---|---|---|\n";
    let met = |ok: bool| if ok { "yes" } else { "**no**" };
    md += &format!(
        "| replicas on every GPU vs one GPU | ≤ {REPLICA_GOAL}× | {:.2}× ({every:.3} / {one:.3} s) | {} |\n",
        report.replica_ratio,
        met(report.replica_ratio <= REPLICA_GOAL)
    );
    md += &format!(
        "| every GPU's free memory after the last unload | within {} MiB | {:.1} MiB less at worst | {} |\n",
        FREE_SLACK >> 20,
        worst_free as f64 / (1 << 20) as f64,
        met(worst_free <= FREE_SLACK)
    );
    md += &format!(
        "| every tensor equal to the files (each replica, the split model, attached) | all | {} of {} | {} |\n",
        report.checks.iter().filter(|c| c.same_tensors).count(),
        report.checks.len(),
        met(report.checks.iter().all(|c| c.same_tensors))
    );
    md += &format!(
        "| attached split tensors on their GPUs | all | {} | {} |\n",
        report.attach_on_their_gpus,
        met(report.attach_on_their_gpus)
    );
    md += &format!(
        "| an attached replica's tensors on its GPU | all | {} | {} |\n",
        report.replica_attach_on_its_gpu,
        met(report.replica_attach_on_its_gpu)
    );
    let shares = report.split_shares.iter().map(|(d, b)| format!("{d} {b} bytes")).collect::<Vec<_>>().join(", ");
    md += &format!(
        "\nSplit under a budget of {} bytes a device: `cuda:0` alone was refused ({}); the split put {shares}.\n",
        report.split_budget, report.one_gpu_refusal
    );
    std::fs::write(out.join("multi-gpu.md"), md)?;
    Ok(())
}
