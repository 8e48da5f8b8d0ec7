//! `just bench`: model-loader's load benchmark. It writes its own fixture models, warms the page
//! cache, and measures side by side, in one run, the limits of the machine (parallel `pread`, one
//! plain `read`), the peers (candle's `safetensors::load` and `MmapedSafetensors`, Python's
//! `safetensors.numpy`), our loader in process and end to end through gRPC, cancel latency,
//! fan-out to many watchers, the server's memory and start-up, and attach (loads into a memfd
//! against anonymous memory, and `attach()` from Python against the peers' reloads), and the time
//! to a ready transformers model through `model_loader.transformers` against `from_pretrained`,
//! and vLLM's start-up to its first token with `--load-format model-loader` against `auto`.
//! Every loader's tensors are checked against the files. Results go to `results.json`, a Markdown table and PNG charts.

pub mod adapter;
pub mod attach;
pub mod chart;
pub mod fanout;
#[cfg(feature = "cuda")]
pub mod gpu;
#[cfg(feature = "cuda")]
pub mod gpu_attach;
#[cfg(feature = "cuda")]
pub mod gpu_multi;
pub mod gpu_report;
pub mod in_process;
pub mod limit;
pub mod models;
pub mod object;
pub mod peers;
pub mod report;
pub mod server;
pub mod stats;
pub mod vllm;

use std::{path::PathBuf, time::Duration};

use anyhow::Context;
use clap::Parser;
use fixtures::fixture::Expected;
use models::Model;
use report::{Cancel, Check, Fanout, Grpc, LoaderRun, Report};

/// The benchmark's options: the defaults are the committed run; tests use tiny sizes.
#[derive(Debug, Clone, Parser, serde::Serialize)]
#[command(name = "model-loader-bench")]
pub struct Options {
    /// Size of the dense sharded model, in MiB.
    #[arg(long, default_value_t = 2048)]
    pub dense_mib: usize,
    /// Shards of the dense model.
    #[arg(long, default_value_t = 4)]
    pub shards: usize,
    /// Tensors per shard of the dense model.
    #[arg(long, default_value_t = 8)]
    pub per_shard: usize,
    /// Tensors of the many-small-tensors model (1 to 256 KiB each).
    #[arg(long, default_value_t = 5000)]
    pub small_tensors: usize,
    /// Timed runs of each loader (after one untimed run that checks its tensors).
    #[arg(long, default_value_t = 7)]
    pub runs: usize,
    /// Cancels inside step 4.
    #[arg(long, default_value_t = 50)]
    pub cancel_tries: usize,
    /// WatchModels streams on one load.
    #[arg(long, default_value_t = 1000)]
    pub watchers: usize,
    /// Loads watched by the watchers (each a fresh set of streams).
    #[arg(long, default_value_t = 3)]
    pub fanout_loads: usize,
    /// Load/unload cycles for the memory figure.
    #[arg(long, default_value_t = 20)]
    pub cycles: usize,
    /// Server starts timed to SERVING.
    #[arg(long, default_value_t = 5)]
    pub starts: usize,
    /// Where the fixture models are written (deleted and rewritten on every run).
    #[arg(long, default_value = "target/bench")]
    pub work: PathBuf,
    /// Where results.json, README.md and the charts go.
    #[arg(long, default_value = "docs/benchmarks")]
    pub out: PathBuf,
    /// The server binary [default: `model-loader` next to this program].
    #[arg(long)]
    pub server: Option<PathBuf>,
    /// Run the GPU benchmark instead (a `cuda` build, on a machine with a GPU): loads onto cuda:0,
    /// written to `--out` (use docs/benchmarks/gpu).
    #[arg(long)]
    pub gpu: bool,
    /// Run attach on the GPU instead (a `cuda` build): the dense BF16 model loaded for attach,
    /// attached from Python against the Python GPU peers' reloads; `attach-bench.json` in `--out`.
    #[arg(long)]
    pub gpu_attach: bool,
    /// Run several GPUs instead (a `cuda` build, on a machine of two GPUs or more): replicas on
    /// every GPU against one, a split under a per-device budget below the model, attach of the
    /// split model, free memory after; `multi-gpu.json` and `multi-gpu.md` in `--out`.
    #[arg(long)]
    pub gpu_multi: bool,
    /// GPU mode: size of the dense BF16 model, in MiB (16 tensors per shard).
    #[arg(long, default_value_t = 8192)]
    pub gpu_dense_mib: usize,
    /// GPU mode: shards of the dense model.
    #[arg(long, default_value_t = 2)]
    pub gpu_shards: usize,
    /// GPU mode: timed runs of each loader, warm.
    #[arg(long, default_value_t = 5)]
    pub gpu_runs: usize,
    /// GPU mode: runs with the page cache dropped first.
    #[arg(long, default_value_t = 3)]
    pub gpu_cold_runs: usize,
    /// GPU mode: cancels inside step 4.
    #[arg(long, default_value_t = 20)]
    pub gpu_cancels: usize,
    /// Redraw the GPU report (README.md, throughput.png) from DIR/results.json and exit.
    #[arg(long, value_name = "DIR")]
    pub gpu_render: Option<PathBuf>,
    /// Internal: run candle's loader on `PEER_FILES` in this process and print its runs (the GPU
    /// mode starts this as its candle peer).
    #[arg(long, hide = true)]
    pub gpu_candle_peer: bool,
    #[arg(hide = true)]
    #[serde(skip)]
    pub peer_files: Vec<PathBuf>,
    /// GPU mode: the Python GPU peers' script.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/peer_gpu.py"))]
    #[serde(skip)]
    pub gpu_python_script: PathBuf,
    /// Run only the attach section, on the dense model (`--dense-mib`, `--runs`), and print its
    /// Markdown (nothing is written to `--out`): to measure a change to attach alone.
    #[arg(long)]
    pub attach_only: bool,
    /// Run only the adapter section (`model_loader.transformers.from_server` against
    /// `from_pretrained`, warm) on `--adapter-device`, print its Markdown and write
    /// `adapter-KIND.json` in `--out` (on a GPU: a `cuda` build, `--out docs/benchmarks/gpu`).
    #[arg(long)]
    pub adapter: bool,
    /// The adapter section's device: `cpu`, or `cuda:0` with a `cuda` build.
    #[arg(long, default_value = "cpu")]
    pub adapter_device: String,
    /// The adapter section's Python script (clients/python with the `transformers` extra).
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/adapter_peer.py"))]
    #[serde(skip)]
    pub adapter_script: PathBuf,
    /// The adapter section's model: `llama` (transformers) or `sd` (an SD-1.5-shaped diffusers
    /// pipeline, about 2 GB).
    #[arg(long, default_value = "llama")]
    pub adapter_kind: String,
    /// The adapter section's Llama, in MiB (F32 on the CPU, BF16 on a GPU).
    #[arg(long, default_value_t = 512)]
    pub adapter_mib: usize,
    /// The Python of the vLLM environment (`scripts/vllm-env`; `just bench` passes it): the vLLM
    /// section runs only with it.
    #[arg(long)]
    #[serde(skip)]
    pub vllm_python: Option<PathBuf>,
    /// Run only the vLLM section (needs `--vllm-python`), print its Markdown and write
    /// `vllm.json` in `--out`.
    #[arg(long)]
    pub vllm: bool,
    /// The vLLM section's script.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/vllm_peer.py"))]
    #[serde(skip)]
    pub vllm_script: PathBuf,
    /// The vLLM section's Llama, in MiB (F32).
    #[arg(long, default_value_t = 512)]
    pub vllm_mib: usize,
    /// The attach benchmark's Python script (clients/python).
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/attach_peer.py"))]
    #[serde(skip)]
    pub attach_script: PathBuf,
    /// Run the object-storage benchmark instead: a local S3 server, ours against the Run:ai
    /// streamer, boto3 and the limit; written to `--out`/object.
    #[arg(long)]
    pub object: bool,
    /// Object mode: size of the dense F32 model, in MiB (4 shards).
    #[arg(long, default_value_t = 1024)]
    pub object_mib: usize,
    /// Object mode: timed runs of each loader, after a warm-up.
    #[arg(long, default_value_t = 3)]
    pub object_runs: usize,
    /// Object mode: where ours loads to: `cpu`, or `cuda:0` with the `cuda` feature (the limit
    /// and the peers fetch into host memory either way).
    #[arg(long, default_value = "cpu")]
    pub object_device: String,
    /// Object mode: the Python with the peers installed (runai-model-streamer, boto3).
    #[arg(long, default_value = "python3")]
    #[serde(skip)]
    pub object_python: PathBuf,
    /// Object mode: the peers' script.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/peer_object.py"))]
    #[serde(skip)]
    pub object_script: PathBuf,
    /// The Python peer's script.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/peer_safetensors.py"))]
    #[serde(skip)]
    pub python_script: PathBuf,
}

impl Options {
    pub(crate) fn server_exe(&self) -> anyhow::Result<PathBuf> {
        if let Some(server) = &self.server {
            return Ok(server.clone());
        }
        let exe = std::env::current_exe()?;
        // target/<profile>/model-loader-bench, or target/<profile>/deps/<test> in tests.
        let dir = exe.parent().context("the program's folder")?;
        [dir.join("model-loader"), dir.join("../model-loader")]
            .into_iter()
            .find(|p| p.exists())
            .context("no model-loader binary next to this program: build it (`cargo build --release -p server`)")
    }
}

/// Prints a line of progress to stderr (the results go to files).
macro_rules! say {
    ($($arg:tt)*) => { eprintln!("[bench] {}", format!($($arg)*)) };
}

/// Runs the attach section alone on the dense model and returns its Markdown (no peers ran: the
/// attach row's comparison with their reloads is left empty).
pub async fn attach_only(options: &Options) -> anyhow::Result<String> {
    let exe = options.server_exe()?;
    let root = std::path::absolute(options.work.join("models"))?;
    let dense = models::dense(&root, "dense", options.dense_mib, options.shards, options.per_shard)?;
    limit::warm(&dense.files)?;
    say!("attach: {} loaded for attach and attached from Python", dense.id);
    let runs = attach::run(&exe, &root, &options.work, &options.attach_script, &dense, options.runs).await?;
    let check = Check::compare(report::OURS_ATTACH, &dense, &runs.tensors);
    anyhow::ensure!(check.same_tensors, "the attached tensors are not the files': {check:?}");
    Ok(attach::Attach::from_runs(&dense, &runs, &[]).markdown())
}

/// Runs the adapter section alone and returns its Markdown; `adapter-KIND.json` goes to `options.out`.
pub async fn adapter_only(options: &Options) -> anyhow::Result<String> {
    say!("adapter: {} ({} MiB for a Llama) on {}", options.adapter_kind, options.adapter_mib, options.adapter_device);
    let kind = &options.adapter_kind;
    let adapter = adapter::run(options, kind, &options.adapter_device, options.adapter_mib, options.runs).await?;
    std::fs::create_dir_all(&options.out)?;
    std::fs::write(options.out.join(format!("adapter-{kind}.json")), serde_json::to_string_pretty(&adapter)? + "\n")?;
    anyhow::ensure!(adapter.same, "the adapter's model and from_pretrained's give different {}", adapter.compared);
    Ok(adapter.markdown())
}

/// Runs the vLLM section alone and returns its Markdown; `vllm.json` goes to `options.out`.
pub async fn vllm_only(options: &Options) -> anyhow::Result<String> {
    let python =
        options.vllm_python.as_deref().context("--vllm needs --vllm-python (scripts/vllm-env prints its venv)")?;
    say!("vllm: a Llama of {} MiB, load format model-loader against auto", options.vllm_mib);
    let vllm = vllm::run(options, python, options.vllm_mib, options.runs).await?;
    std::fs::create_dir_all(&options.out)?;
    std::fs::write(options.out.join("vllm.json"), serde_json::to_string_pretty(&vllm)? + "\n")?;
    anyhow::ensure!(vllm.same, "vLLM generated different tokens with load format model-loader than with auto");
    Ok(vllm.markdown())
}

/// Runs the whole benchmark and returns its report (also written to `options.out`).
pub async fn run(options: &Options) -> anyhow::Result<Report> {
    let exe = options.server_exe()?;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    // Absolute: the server runs in a folder of its own choosing.
    let root = std::path::absolute(options.work.join("models"))?;
    say!("writing the fixture models under {}", root.display());
    let dense = models::dense(&root, "dense", options.dense_mib, options.shards, options.per_shard)?;
    let small = models::many_small(&root, "small", options.small_tensors)?;
    let mut report = Report::new(options, threads, [&dense, &small]);

    let mut step4 = Duration::ZERO;
    for model in [&dense, &small] {
        say!("{}: {} tensors, {} bytes in {} files", model.id, model.tensors, model.bytes, model.files_count);
        limit::warm(&model.files)?;
        let (runs, checks, grpc) = loaders(options, &exe, &root, model, threads).await?;
        report.loaders.extend(runs);
        report.checks.extend(checks);
        report.grpc.push(Grpc::from_runs(model, &grpc));
        if model.id == dense.id {
            let spans: Vec<f64> = grpc.iter().map(|t| t.step5().saturating_sub(t.step4()).as_secs_f64()).collect();
            step4 = Duration::from_secs_f64(stats::median(&spans));
        }
    }

    say!("gRPC end to end, cancel latency, memory");
    let server = server::start(&exe, &root, &[]).await;
    let client = server::connect(server.addr).await?;
    report.memory.idle_rss_bytes = fixtures::rss_bytes(Some(server.pid()));
    let mut cancels = Vec::new();
    let mut late = 0;
    while cancels.len() < options.cancel_tries {
        match server::cancel_once(&client, &dense.id, step4 * 9 / 10, "cpu", 0).await? {
            Some(times) => cancels.push(times),
            // A cancel that lands after the load finished says nothing; a few are expected.
            None if late < 10 * options.cancel_tries => late += 1,
            None => anyhow::bail!("{late} cancels arrived after the load had finished"),
        }
    }
    report.cancel = Cancel::from_runs(&cancels, late);
    let mut after_unload = Vec::new();
    for _ in 0..options.cycles {
        server::load(&client, &dense.id).await?;
        server::unload(&client, &dense.id).await?;
        after_unload.push(fixtures::rss_bytes(Some(server.pid())));
    }
    report.memory.after_unload_rss_bytes = after_unload;
    drop(server);

    let mut starts = Vec::new();
    for _ in 0..options.starts {
        starts.push(server::start_to_serving(&exe, &root).await?);
    }
    report.memory.start_to_serving_ms = starts.iter().map(|d| d.as_secs_f64() * 1e3).collect();
    report.memory = std::mem::take(&mut report.memory).summarised();

    say!("attach: {} loaded for attach and attached from Python", dense.id);
    let runs = attach::run(&exe, &root, &options.work, &options.attach_script, &dense, options.runs).await?;
    report.checks.push(Check::compare(report::OURS_ATTACH, &dense, &runs.tensors));
    let peers: Vec<(&str, f64)> = [report::CANDLE_LOAD, report::CANDLE_MMAP, report::PYTHON]
        .into_iter()
        .filter_map(|p| Some((p, report.seconds(p, &dense.id)?)))
        .collect();
    report.attach = attach::Attach::from_runs(&dense, &runs, &peers);

    engines(options, &mut report).await?;

    say!("fan-out: {} watchers × {} loads", options.watchers, options.fanout_loads);
    let server = server::start(&exe, &root, &["--log-format", "json"]).await;
    let mut rounds = Vec::new();
    for _ in 0..options.fanout_loads {
        rounds.push(fanout::round(&server, &small.id, options.watchers).await?);
    }
    report.fanout = Fanout::from_rounds(&rounds);
    drop(server);

    report.evaluate();
    report::write(&options.out, &report)?;
    chart::write(&options.out, &report)?;
    say!("wrote {}", options.out.display());
    let failed: Vec<_> = report.checks.iter().filter(|c| !c.same_tensors).collect();
    anyhow::ensure!(failed.is_empty(), "loaders that read different tensors than the files hold: {failed:?}");
    anyhow::ensure!(report.adapter.same, "the adapter's model and from_pretrained's give different logits");
    anyhow::ensure!(
        report.vllm.as_ref().is_none_or(|v| v.same),
        "vLLM generated different tokens with load format model-loader than with auto"
    );
    Ok(report)
}

/// The engines' front doors: the transformers adapter and, with `--vllm-python`, vLLM's plugin.
async fn engines(options: &Options, report: &mut Report) -> anyhow::Result<()> {
    say!("adapter: a Llama of {} MiB through model_loader.transformers against from_pretrained", options.adapter_mib);
    report.adapter = adapter::run(options, "llama", "cpu", options.adapter_mib, options.runs).await?;
    match &options.vllm_python {
        Some(python) => {
            say!("vllm: a Llama of {} MiB, load format model-loader against auto", options.vllm_mib);
            report.vllm = Some(vllm::run(options, python, options.vllm_mib, options.runs).await?);
        }
        None => say!("vllm: skipped (no --vllm-python; `just bench` passes scripts/vllm-env's)"),
    }
    Ok(())
}

/// Every loader on one model, in rounds (one run of each per round, so drift in the machine hits
/// all alike), after an untimed run of each that checks its tensors.
async fn loaders(
    options: &Options,
    exe: &std::path::Path,
    root: &std::path::Path,
    model: &Model,
    threads: usize,
) -> anyhow::Result<(Vec<LoaderRun>, Vec<Check>, Vec<server::LoadTimes>)> {
    let manager = in_process::manager(root)?;
    let server = server::start(exe, root, &[]).await;
    let client = server::connect(server.addr).await?;
    let check = |loader: &str, got: &Expected| Check::compare(loader, model, got);
    let mut checks = Vec::new();

    // The untimed first runs, which check what each loader read.
    let (_, loaded) = peers::candle_load(&model.files)?;
    checks.push(check(report::CANDLE_LOAD, &peers::checksums(&loaded)?));
    drop(loaded);
    let (_, loaded) = peers::candle_mmap(&model.files)?;
    checks.push(check(report::CANDLE_MMAP, &peers::checksums(&loaded)?));
    drop(loaded);
    in_process::load(&manager, &model.id).await?;
    checks.push(check(report::OURS_IN_PROCESS, &in_process::resident(&manager, &model.id).await?));
    in_process::unload(&manager, &model.id).await?;
    server::load(&client, &model.id).await?;
    checks.push(check(report::OURS_GRPC, &Expected::observed(server::checksums(&client, &model.id).await?)));
    server::unload(&client, &model.id).await?;

    let mut runs: Vec<(&str, Vec<f64>)> = report::LOADERS.iter().map(|&name| (name, Vec::new())).collect();
    let mut record = |name: &str, d: Duration| {
        if let Some((_, times)) = runs.iter_mut().find(|(n, _)| *n == name) {
            times.push(d.as_secs_f64());
        }
    };
    let mut grpc = Vec::new();
    for round in 0..options.runs {
        say!("{}: round {} of {}", model.id, round + 1, options.runs);
        // Each round starts with another loader, so none always runs right after the same one
        // (memory the previous one freed, the machine may be slow to hand out again).
        for k in 0..6 {
            match (k + round) % 6 {
                0 => record(report::LIMIT_PREAD, limit::parallel_pread(&model.files, threads)?.0),
                1 => record(report::LIMIT_READ, limit::single_read(&model.files)?.0),
                2 => record(report::CANDLE_LOAD, peers::candle_load(&model.files)?.0),
                3 => record(report::CANDLE_MMAP, peers::candle_mmap(&model.files)?.0),
                4 => {
                    record(report::OURS_IN_PROCESS, in_process::load(&manager, &model.id).await?);
                    in_process::unload(&manager, &model.id).await?;
                }
                _ => {
                    let times = server::load(&client, &model.id).await?;
                    record(report::OURS_GRPC, times.total);
                    grpc.push(times);
                    server::unload(&client, &model.id).await?;
                }
            }
        }
    }
    say!("{}: the Python peer", model.id);
    let python = peers::python(&options.python_script, &model.files, options.runs)?;
    checks.push(check(report::PYTHON, &python.tensors));
    for d in python.runs {
        record(report::PYTHON, d);
    }
    let runs = runs.into_iter().map(|(name, seconds)| LoaderRun::new(name, model, seconds)).collect();
    Ok((runs, checks, grpc))
}
