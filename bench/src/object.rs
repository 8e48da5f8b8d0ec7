//! `just bench --object`: loads from object storage, side by side in one run against one local
//! S3-compatible server (SeaweedFS, as the tests start it) holding one dense sharded model:
//!
//! - the limit: the same bytes fetched with N parallel ranged GETs of 16 MiB (object_store, the
//!   client our loader uses) into fresh buffers and discarded, best of a few N;
//! - ours: LoadModel of `s3://…` through gRPC to the release server, to CPU (or to
//!   `--object-device cuda:0`);
//! - the Run:ai Model Streamer (`SafetensorsStreamer`), best of a few concurrencies;
//! - boto3: each object downloaded to a file, then loaded with safetensors.numpy.
//!
//! Every loader's tensors are checked against the files. Writes `results.json` and `README.md`
//! to `--out` (docs/benchmarks/object). The server shares this machine's cores with every loader:
//! the figures are this machine's, not a network's.

use std::{path::Path, process::Command, sync::Arc};

use anyhow::Context;
use fixtures::{
    binary::Binary,
    fixture::Expected,
    stores::{ACCESS_KEY, S3Server, SECRET_KEY},
};
use futures::{StreamExt, TryStreamExt};
use object_store::{ObjectStore, ObjectStoreExt, aws::AmazonS3Builder, path::Path as ObjectPath};
use serde::{Deserialize, Serialize};

use crate::{
    Options, models,
    report::{Check, Machine, Target},
    server,
    stats::median,
};

const BUCKET: &str = "bench";
const PREFIX: &str = "dense";
/// The limit's and the streamer's request size, and ours (`--object-chunk`'s default).
const CHUNK: usize = 16 << 20;

/// One loader's runs.
#[derive(Debug, Clone, Serialize)]
pub struct Run {
    pub loader: String,
    /// Its setting (concurrency) of the best median.
    pub setting: String,
    pub seconds: Vec<f64>,
    pub seconds_median: f64,
    pub gb_per_s: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ObjectReport {
    pub machine: Machine,
    pub model_bytes: u64,
    pub files: usize,
    pub runs: Vec<Run>,
    /// Every other setting tried, for the reader.
    pub tried: Vec<Run>,
    pub checks: Vec<Check>,
    pub targets: Vec<Target>,
}

fn run_of(loader: &str, setting: String, seconds: Vec<f64>, bytes: u64) -> Run {
    let seconds_median = median(&seconds);
    Run { loader: loader.into(), setting, gb_per_s: bytes as f64 / seconds_median / 1e9, seconds, seconds_median }
}

/// The best (lowest median) of `runs`; the others go to `tried`.
fn best(mut runs: Vec<Run>, tried: &mut Vec<Run>) -> Run {
    runs.sort_by(|a, b| a.seconds_median.total_cmp(&b.seconds_median));
    let best = runs.remove(0);
    tried.extend(runs);
    best
}

pub async fn run(options: &Options) -> anyhow::Result<ObjectReport> {
    let work = options.work.join("object");
    let _ = std::fs::remove_dir_all(&work);
    let model = models::dense(&work, "dense", options.object_mib, 4, 4)?;
    let bytes = model.expected.bytes();
    eprintln!("[bench] object: {} MiB in {} files; starting the S3 server", bytes >> 20, model.files.len());
    let s3 = S3Server::start().await?;
    s3.upload(&model.dir, BUCKET, PREFIX).await?;
    let urls: Vec<String> = model
        .files
        .iter()
        .map(|f| format!("s3://{BUCKET}/{PREFIX}/{}", f.file_name().expect("a file").to_string_lossy()))
        .collect();
    let mut tried = Vec::new();
    let mut checks = Vec::new();

    let limit = best(limits(options, &s3, bytes).await?, &mut tried);
    eprintln!("[bench] object: limit {:.2} GB/s ({})", limit.gb_per_s, limit.setting);

    let mut loads = Vec::new();
    for concurrency in [16, 32] {
        loads.push(ours(options, &s3, &model, bytes, concurrency, &mut checks).await?);
    }
    let ours = best(loads, &mut tried);
    eprintln!("[bench] object: ours {:.2} GB/s ({})", ours.gb_per_s, ours.setting);

    // A peer that cannot run here (its wheels missing) is reported, and its target unmet.
    let mut streamers = Vec::new();
    for concurrency in [8, 16, 32] {
        let args = ["runai", "--concurrency", &concurrency.to_string(), "--chunk", &CHUNK.to_string()];
        match python_peer(options, &s3, &args, &urls) {
            Ok(peer) => {
                checks.push(Check::compare(&peer.version, &model, &peer.tensors));
                streamers.push(run_of(&peer.version, format!("concurrency {concurrency}"), peer.seconds, bytes));
            }
            Err(e) => eprintln!("[bench] object: the Run:ai streamer could not run: {e:#}"),
        }
    }
    let runai = (!streamers.is_empty()).then(|| best(streamers, &mut tried));
    if let Some(runai) = &runai {
        eprintln!("[bench] object: Run:ai streamer {:.2} GB/s ({})", runai.gb_per_s, runai.setting);
    }

    let boto3 = match python_peer(options, &s3, &["boto3", "--work", &work.join("boto3").to_string_lossy()], &urls) {
        Ok(boto) => {
            checks.push(Check::compare(&boto.version, &model, &boto.tensors));
            Some(run_of(&boto.version, "download, then load".into(), boto.seconds, bytes))
        }
        Err(e) => {
            eprintln!("[bench] object: boto3 could not run: {e:#}");
            None
        }
    };

    let targets = targets(&ours, runai.as_ref(), &limit);
    let report = ObjectReport {
        machine: Machine::here(std::thread::available_parallelism().map_or(1, |n| n.get())),
        model_bytes: bytes,
        files: model.files.len(),
        runs: [Some(limit), Some(ours), runai, boto3].into_iter().flatten().collect(),
        tried,
        checks,
        targets,
    };
    write(&options.out.join("object"), &report)?;
    Ok(report)
}

/// The limit at 8, 16 and 32 ranged GETs at once.
async fn limits(options: &Options, s3: &S3Server, bytes: u64) -> anyhow::Result<Vec<Run>> {
    let store = Arc::new(
        AmazonS3Builder::new()
            .with_bucket_name(BUCKET)
            .with_endpoint(&s3.endpoint)
            .with_allow_http(true)
            .with_access_key_id(ACCESS_KEY)
            .with_secret_access_key(SECRET_KEY)
            .with_region("us-east-1")
            .build()?,
    );
    let mut limits = Vec::new();
    for concurrency in [8, 16, 32] {
        let mut seconds = Vec::new();
        for run in 0..=options.object_runs {
            let started = std::time::Instant::now();
            let fetched = fetch_all(store.clone(), concurrency).await?;
            anyhow::ensure!(fetched >= bytes, "the limit fetched {fetched} bytes of {bytes}");
            if run > 0 {
                seconds.push(started.elapsed().as_secs_f64());
            }
        }
        limits.push(run_of("limit: ranged GETs, discarded", format!("{concurrency} at once"), seconds, bytes));
    }
    Ok(limits)
}

/// The goals: ≥ 1.2× the Run:ai streamer, ≥ 0.85× the limit (ratios of median times).
fn targets(ours: &Run, runai: Option<&Run>, limit: &Run) -> Vec<Target> {
    let vs_runai = runai.map(|runai| runai.seconds_median / ours.seconds_median);
    let vs_limit = limit.seconds_median / ours.seconds_median;
    vec![
        Target {
            name: "object store: ours vs the Run:ai streamer (time ratio)".into(),
            target: "≥ 1.20×".into(),
            measured: vs_runai.map_or("not measured (the streamer could not run)".into(), |r| format!("{r:.2}×")),
            met: vs_runai.is_some_and(|r| r >= 1.2),
        },
        Target {
            name: "object store: ours vs the limit (ranged GETs discarded)".into(),
            target: "≥ 0.85×".into(),
            measured: format!("{vs_limit:.2}×"),
            met: vs_limit >= 0.85,
        },
    ]
}

/// Every object of the prefix in `CHUNK` ranged GETs, `concurrency` at once, each into a fresh
/// buffer that is dropped. Returns the bytes fetched.
async fn fetch_all(store: Arc<dyn ObjectStore>, concurrency: usize) -> anyhow::Result<u64> {
    let metas: Vec<_> = store.list(Some(&ObjectPath::from(PREFIX))).try_collect().await?;
    let ranges: Vec<(ObjectPath, std::ops::Range<u64>)> = metas
        .iter()
        .flat_map(|m| {
            (0..m.size).step_by(CHUNK).map(move |at| (m.location.clone(), at..(at + CHUNK as u64).min(m.size)))
        })
        .collect();
    let sizes: Vec<u64> = futures::stream::iter(ranges)
        .map(|(path, range)| {
            let store = store.clone();
            async move { store.get_range(&path, range).await.map(|b| b.len() as u64) }
        })
        .buffer_unordered(concurrency)
        .try_collect()
        .await?;
    Ok(sizes.iter().sum())
}

/// LoadModel of the model's `s3://` id through gRPC, to `--object-device`, with `--object-concurrency
/// concurrency`, then UnloadModel; the first run checks its tensors and is not timed.
async fn ours(
    options: &Options,
    s3: &S3Server,
    model: &models::Model,
    bytes: u64,
    concurrency: usize,
    checks: &mut Vec<Check>,
) -> anyhow::Result<Run> {
    let root = tempfile::tempdir()?;
    let env = s3.env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let exe = options.server_exe()?;
    let root_arg = root.path().to_string_lossy().to_string();
    let concurrency_arg = concurrency.to_string();
    let args = [
        "--model-root",
        &root_arg,
        "--offline",
        "--object-endpoint",
        &s3.endpoint,
        "--object-concurrency",
        &concurrency_arg,
    ];
    let server = Binary::start_exe(&exe, root.path(), &args, &env).await;
    let client = server::connect(server.addr).await?;
    let id = format!("s3://{BUCKET}/{PREFIX}");
    let request = client::LoadRequest { device: Some(options.object_device.clone()), ..client::LoadRequest::new(&id) };
    let mut seconds = Vec::new();
    for run in 0..=options.object_runs {
        let started = std::time::Instant::now();
        client.load(request.clone()).await?.finish().await.with_context(|| format!("LoadModel {id}"))?;
        let took = started.elapsed().as_secs_f64();
        if run == 0 {
            let got = Expected::observed(server::checksums(&client, &id).await?);
            checks.push(Check::compare("model-loader", model, &got));
        } else {
            seconds.push(took);
        }
        client.unload(&id, false).await.context("UnloadModel")?;
    }
    let loader = format!("model-loader (gRPC, to {})", options.object_device);
    Ok(run_of(&loader, format!("16 MiB chunks, {concurrency} at once"), seconds, bytes))
}

#[derive(Debug, Deserialize)]
struct PeerOutput {
    version: String,
    seconds: Vec<f64>,
    tensors: std::collections::HashMap<String, (String, Vec<u64>, String)>,
}

struct Peer {
    version: String,
    seconds: Vec<f64>,
    tensors: Expected,
}

/// `bench/peer_object.py ARGS --runs R URLS` with the server's endpoint and credentials.
fn python_peer(options: &Options, s3: &S3Server, args: &[&str], urls: &[String]) -> anyhow::Result<Peer> {
    let mut command = Command::new(&options.object_python);
    command.arg(&options.object_script).args(args).arg("--runs").arg(options.object_runs.to_string()).args(urls);
    for (k, v) in s3.env() {
        command.env(k, v);
    }
    command.env("AWS_ENDPOINT_URL", &s3.endpoint);
    let out = command.output().context("running the object-store peer")?;
    anyhow::ensure!(
        out.status.success(),
        "{} {args:?} failed (pip install runai-model-streamer runai-model-streamer-s3 boto3): {}",
        options.object_script.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let parsed: PeerOutput = serde_json::from_slice(&out.stdout).context("the peer's JSON")?;
    Ok(Peer {
        version: parsed.version,
        seconds: parsed.seconds,
        tensors: Expected::observed(parsed.tensors.into_iter().collect()),
    })
}

fn write(dir: &Path, report: &ObjectReport) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("results.json"), serde_json::to_string_pretty(report)?)?;
    let m = &report.machine;
    let mut md = format!(
        "# Loading from object storage\n\nWritten by `just bench --object`. A dense F32 model of {:.2} GB in {} \
         safetensors files on a local S3-compatible server (SeaweedFS `weed mini`, on this machine), \
         loaded side by side in one run; medians of {} runs after a warm-up.\n\nMachine: {} cores, {:.0} GiB, {}, \
         Linux {}. The S3 server runs on the same cores as every loader: these are this machine's \
         figures, not a network's.\n\n| loader | setting | median s | GB/s |\n|---|---|---|---|\n",
        report.model_bytes as f64 / 1e9,
        report.files,
        report.runs.first().map_or(0, |r| r.seconds.len()),
        m.cores,
        m.memory_bytes as f64 / (1u64 << 30) as f64,
        m.cpu,
        m.kernel,
    );
    for r in &report.runs {
        md.push_str(&format!("| {} | {} | {:.3} | {:.2} |\n", r.loader, r.setting, r.seconds_median, r.gb_per_s));
    }
    md.push_str("\nAlso tried:\n\n| loader | setting | median s | GB/s |\n|---|---|---|---|\n");
    for r in &report.tried {
        md.push_str(&format!("| {} | {} | {:.3} | {:.2} |\n", r.loader, r.setting, r.seconds_median, r.gb_per_s));
    }
    md.push_str("\n| target | goal | measured | met |\n|---|---|---|---|\n");
    for t in &report.targets {
        md.push_str(&format!(
            "| {} | {} | {} | {} |\n",
            t.name,
            t.target,
            t.measured,
            if t.met { "yes" } else { "MISSED" }
        ));
    }
    md.push_str("\nEvery loader's tensors equal the files' (sha256 of each): ");
    md.push_str(if report.checks.iter().all(|c| c.same_tensors) { "yes.\n" } else { "NO, see results.json.\n" });
    std::fs::write(dir.join("README.md"), md)?;
    Ok(())
}
