//! `model-loader-bench --gpu` (a `cuda` build: `just build-cuda --bench`, run on the GPU
//! machine): loads onto `cuda:0` against the machine's limits and the peer loaders, in one run.
//!
//! - Limits: host→device copies from pinned memory in 16 MiB copies, which run a little faster
//!   than the loader's 4 MiB ones (one thread queuing, nothing read), and page cache → the
//!   loader's own pinned buffers (one thread per core, nothing copied); cold, the same read after
//!   dropping the page cache is the disk's read bandwidth.
//! - Peers: candle's `safetensors::load` to CUDA, `safetensors.torch.load_file(device="cuda")`
//!   and fastsafetensors (its best warm setting), the Python ones in processes of their own.
//! - Ours in process (the facade) and end to end through gRPC; warm and cold; with every core
//!   busy, next to the machine's limit under the same load; the driver's free memory around 5
//!   load/unload cycles; cancels inside step 4.
//!
//! Every loader's tensors are checked against the files (checksums read back from the GPU).

use std::{
    fs::File,
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicUsize, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context, anyhow, bail};
use candle_core::{DType, Device};
use fixtures::fixture::Expected;
use model_manager::resource_manager::{
    gpu::{DeviceBuffer, Gpu, PinnedPool, pinned_pool},
    staging::{BUFFER_BYTES, CopyEngine, chunk_bytes},
};
use serde::{Deserialize, Serialize};

use crate::{
    Options,
    gpu_report::{
        CANDLE, Cycle, FASTSAFETENSORS, FREE_SLACK, GpuReport, LIMIT_BOTH, LIMIT_BOTH_BUSY, LIMIT_DISK, LIMIT_H2D,
        LIMIT_READ, LINK_COPY_BYTES, ModelInfo, OURS_GRPC, OURS_GRPC_AGAIN, OURS_GRPC_BUSY, OURS_GRPC_COLD,
        OURS_IN_PROCESS, TORCH, Timeline, cancel_summary, evaluate, machine, nvidia_smi, row, write,
    },
    in_process, models, peers,
    report::Check,
    server, stats,
};

/// The GPU, a pinned pool of the loader's size (the read limit) and one of larger buffers (the
/// link's limit).
struct Rig {
    gpu: Gpu,
    pool: PinnedPool,
    link_pool: PinnedPool,
}

/// Runs the GPU benchmark and writes `results.json`, `README.md` and `throughput.png` under
/// `options.out`.
#[allow(clippy::too_many_lines)] // the benchmark's sections in order, read top to bottom
pub async fn run(options: &Options) -> anyhow::Result<GpuReport> {
    let exe = options.server_exe()?;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let root = std::path::absolute(options.work.join("gpu-models"))?;
    say(format!("writing the fixture models under {}", root.display()));
    let dense = models::dense_bf16(&root, "gpu-dense", options.gpu_dense_mib, options.gpu_shards, 16)?;
    let small = models::many_small_bf16(&root, "gpu-small", options.small_tensors)?;
    let gpu = Gpu::all().into_iter().next().context("no CUDA device: run this on the GPU machine")?;
    let pool =
        pinned_pool(&gpu, (model_manager::DEFAULT_PINNED_POOL_BYTES / BUFFER_BYTES as u64) as usize, BUFFER_BYTES)
            .map_err(|e| anyhow!(e))?;
    let link_pool = pinned_pool(&gpu, 8, LINK_COPY_BYTES).map_err(|e| anyhow!(e))?;
    let rig = Rig { gpu, pool, link_pool };
    let mut report = GpuReport {
        machine: machine(threads),
        gpu: nvidia_smi(),
        cold_cache: String::new(),
        models: [&dense, &small]
            .iter()
            .map(|m| ModelInfo { id: m.id.clone(), files: m.files_count, tensors: m.tensors, bytes: m.bytes })
            .collect(),
        rows: Vec::new(),
        cycles: Vec::new(),
        cancel: Default::default(),
        checks: Vec::new(),
        peer_settings: Vec::new(),
        targets: Vec::new(),
        timelines: Vec::new(),
    };

    let manager = in_process::manager_on(&root, model_manager::resource_manager::DeviceRequest::Cuda(Some(0)))?;
    let server = server::start(&exe, &root, &["--device", "cuda:0"]).await;
    let client = server::connect(server.addr).await?;
    let mut step4 = Duration::ZERO;
    for model in [&dense, &small] {
        say(format!("{}: {} tensors, {} bytes in {} files", model.id, model.tensors, model.bytes, model.files_count));
        crate::limit::warm(&model.files)?;
        // The untimed first runs, which check what each loader read.
        say("checking every loader's tensors");
        in_process::load(&manager, &model.id).await?;
        report.checks.push(Check::compare(OURS_IN_PROCESS, model, &in_process::resident(&manager, &model.id).await?));
        in_process::unload(&manager, &model.id).await?;
        say("  in process checked");
        server::load(&client, &model.id).await?;
        let tensors = Expected::observed(server::checksums(&client, &model.id).await?);
        report.checks.push(Check::compare(OURS_GRPC, model, &tensors));
        server::unload(&client, &model.id).await?;

        let mut times: Vec<(&str, Vec<f64>)> =
            [LIMIT_H2D, LIMIT_READ, LIMIT_BOTH, OURS_IN_PROCESS, OURS_GRPC].iter().map(|&n| (n, Vec::new())).collect();
        let mut grpc = Vec::new();
        for round in 0..options.gpu_runs {
            say(format!("{}: round {} of {}", model.id, round + 1, options.gpu_runs));
            for k in 0..5 {
                let (name, took) = match (k + round) % 5 {
                    0 => (LIMIT_H2D, h2d(&rig, model.bytes as usize)?),
                    1 => (LIMIT_READ, read_to_pinned(&rig, &model.files, threads)?),
                    2 => (LIMIT_BOTH, read_while_copying(&rig, &model.files, threads, model.bytes as usize)?),
                    3 => {
                        let took = in_process::load(&manager, &model.id).await?;
                        in_process::unload(&manager, &model.id).await?;
                        (OURS_IN_PROCESS, took)
                    }
                    _ => {
                        let t = server::load(&client, &model.id).await?;
                        server::unload(&client, &model.id).await?;
                        say(format!(
                            "  (gRPC: first message {:.1} ms, step 4 began {:.1} ms, step 5 {:.1} ms)",
                            t.first_message.as_secs_f64() * 1e3,
                            t.step4().as_secs_f64() * 1e3,
                            t.step5().as_secs_f64() * 1e3
                        ));
                        let total = t.total;
                        grpc.push(t);
                        (OURS_GRPC, total)
                    }
                };
                say(format!("  {name}: {:.3} s", took.as_secs_f64()));
                if let Some((_, v)) = times.iter_mut().find(|(n, _)| *n == name) {
                    v.push(took.as_secs_f64());
                }
            }
        }
        report.timelines.push(Timeline::of(&model.id, &grpc));
        if model.id == dense.id {
            let spans: Vec<f64> = grpc.iter().map(|t| t.step5().saturating_sub(t.step4()).as_secs_f64()).collect();
            step4 = Duration::from_secs_f64(stats::median(&spans));
        }
        say(format!("{}: {CANDLE}", model.id));
        match candle_peer(&model.files, options.gpu_runs) {
            Ok(peer) => {
                report.checks.push(Check::compare(CANDLE, model, &Expected::observed(peer.tensors)));
                times.push((CANDLE, peer.seconds));
            }
            Err(e) => say(format!("{CANDLE} could not run: {e:#}")),
        }
        for (loader, script_loader) in [(TORCH, "torch"), (FASTSAFETENSORS, "fastsafetensors")] {
            say(format!("{}: {loader}", model.id));
            match python_peer(&options.gpu_python_script, script_loader, &model.files, options.gpu_runs) {
                Ok(peer) => {
                    let tensors = Expected::observed(peer.tensors);
                    report.checks.push(Check::compare(loader, model, &tensors));
                    if let Some(setting) = peer.setting {
                        report.peer_settings.push(format!("{loader} on {}: {setting}", model.id));
                    }
                    report.peer_settings.push(format!("{loader}: version {}", peer.version));
                    times.push((loader, peer.seconds));
                }
                Err(e) => say(format!("{loader} could not run: {e:#}")),
            }
        }
        // Ours once more, right after the peers: these machines drift over minutes, and this
        // compares with the peer measured just before it rather than minutes before.
        let mut again = Vec::new();
        for _ in 0..options.gpu_runs {
            again.push(server::load(&client, &model.id).await?.total.as_secs_f64());
            server::unload(&client, &model.id).await?;
        }
        times.push((OURS_GRPC_AGAIN, again));
        for (loader, seconds) in times {
            report.rows.push(row(model, loader, seconds));
        }
    }

    // Cold: the page cache dropped before every run.
    match drop_caches() {
        Ok(()) => {
            report.cold_cache = "page cache dropped (sync; echo 3 > /proc/sys/vm/drop_caches) before each run".into();
            let (mut disk, mut ours) = (Vec::new(), Vec::new());
            for _ in 0..options.gpu_cold_runs {
                drop_caches()?;
                disk.push(read_to_pinned(&rig, &dense.files, threads)?.as_secs_f64());
                drop_caches()?;
                let t = server::load(&client, &dense.id).await?;
                server::unload(&client, &dense.id).await?;
                ours.push(t.total.as_secs_f64());
            }
            report.rows.push(row(&dense, LIMIT_DISK, disk));
            report.rows.push(row(&dense, OURS_GRPC_COLD, ours));
            crate::limit::warm(&dense.files)?;
        }
        Err(e) => report.cold_cache = format!("not measured: dropping the page cache is not permitted here ({e})"),
    }

    // Every core also running a busy loop (the host threads of an inference server, a noisy
    // neighbour): the loader against what the machine gives reading and copying under that load.
    say("every core busy");
    let (mut both, mut ours) = (Vec::new(), Vec::new());
    {
        let _busy = BusyCores::start(threads)?;
        for _ in 0..options.gpu_runs {
            both.push(read_while_copying(&rig, &dense.files, threads, dense.bytes as usize)?.as_secs_f64());
            ours.push(server::load(&client, &dense.id).await?.total.as_secs_f64());
            server::unload(&client, &dense.id).await?;
        }
    }
    report.rows.push(row(&dense, LIMIT_BOTH_BUSY, both));
    report.rows.push(row(&dense, OURS_GRPC_BUSY, ours));

    say("GPU memory over 5 cycles, cancels");
    for _ in 0..5 {
        let free = |d: proto::v1::DeviceResources| d.available_bytes;
        let free_before = free(server::device_resources(&client, "cuda:0").await?);
        server::load(&client, &dense.id).await?;
        let free_loaded = free(server::device_resources(&client, "cuda:0").await?);
        server::unload(&client, &dense.id).await?;
        let free_after_unload = free(server::device_resources(&client, "cuda:0").await?);
        report.cycles.push(Cycle { free_before, free_loaded, free_after_unload });
    }
    let floor = server::device_resources(&client, "cuda:0").await?.available_bytes.saturating_sub(FREE_SLACK);
    let (mut cancels, mut late) = (Vec::new(), 0);
    while cancels.len() < options.gpu_cancels {
        match server::cancel_once(&client, &dense.id, step4 * 9 / 10, "cuda:0", floor).await? {
            Some(times) => cancels.push(times),
            None if late < 10 * options.gpu_cancels => late += 1,
            None => bail!("{late} cancels arrived after the load had finished"),
        }
    }
    report.cancel = cancel_summary(&cancels);
    drop(server);

    evaluate(&mut report, &dense.id, &small.id);
    write(&options.out, &report)?;
    let failed: Vec<_> = report.checks.iter().filter(|c| !c.same_tensors).collect();
    anyhow::ensure!(failed.is_empty(), "loaders that read different tensors than the files hold: {failed:?}");
    Ok(report)
}

/// Processes that each spin on a core until dropped.
struct BusyCores(Vec<std::process::Child>);

impl BusyCores {
    fn start(count: usize) -> anyhow::Result<Self> {
        let mut busy = Self(Vec::new());
        for _ in 0..count {
            busy.0.push(Command::new("sh").args(["-c", "while :; do :; done"]).spawn()?);
        }
        Ok(busy)
    }
}

impl Drop for BusyCores {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A line of progress on stderr, with the seconds since the benchmark started.
fn say(line: impl AsRef<str>) {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let t = START.get_or_init(Instant::now).elapsed().as_secs_f64();
    eprintln!("[bench gpu {t:7.1}s] {}", line.as_ref());
}

/// `bytes` copied from pinned buffers into one device allocation in 16 MiB copies, queued from
/// one thread: the link's speed with nothing read.
fn h2d(rig: &Rig, bytes: usize) -> anyhow::Result<Duration> {
    on_device(rig, bytes, |to| copy_all(rig, to, bytes))
}

/// Reading `files` into the loader's pinned buffers (as [`read_to_pinned`]) while as many bytes
/// are copied to the device from other pinned buffers (as [`h2d`]), each at its own pace: what
/// this machine gives both at once, which no loader that overlaps them can beat.
fn read_while_copying(rig: &Rig, files: &[PathBuf], threads: usize, bytes: usize) -> anyhow::Result<Duration> {
    on_device(rig, bytes, |to| {
        std::thread::scope(|scope| {
            let copier = scope.spawn(|| copy_all(rig, to, bytes));
            read_to_pinned(rig, files, threads)?;
            copier.join().map_err(|_| anyhow!("the copying thread panicked"))?
        })
    })
}

/// Times `work` on a device allocation of `bytes`, until the device has finished it too.
fn on_device(
    rig: &Rig,
    bytes: usize,
    work: impl FnOnce(&DeviceBuffer) -> anyhow::Result<()>,
) -> anyhow::Result<Duration> {
    let to = rig.gpu.allocate(DType::U8, bytes).map_err(|e| anyhow!(e))?;
    rig.gpu.synchronize().map_err(|e| anyhow!(e))?;
    let start = Instant::now();
    work(&to)?;
    rig.gpu.synchronize().map_err(|e| anyhow!(e))?;
    let took = start.elapsed();
    drop(to);
    rig.gpu.release_free_memory();
    Ok(took)
}

/// Queues copies of `bytes` from the link pool's buffers into `to`, 16 MiB at a time.
fn copy_all(rig: &Rig, to: &DeviceBuffer, bytes: usize) -> anyhow::Result<()> {
    let mut at = 0;
    while at < bytes {
        let len = LINK_COPY_BYTES.min(bytes - at);
        let mut lease = rig.link_pool.take(|| false).context("a staging buffer")?;
        lease.fill(&rig.gpu).map_err(|e| anyhow!(e))?;
        lease.copy_to(&rig.gpu, len, to, at).map_err(|e| anyhow!(e))?;
        at += len;
    }
    Ok(())
}

/// Every byte of `files` read into the pinned buffers on `threads` threads, in `pread`s of the
/// loader's chunk size, nothing copied: what the page cache (or, cold, the disk) delivers.
fn read_to_pinned(rig: &Rig, files: &[PathBuf], threads: usize) -> anyhow::Result<Duration> {
    let opened = files.iter().map(File::open).collect::<Result<Vec<_>, _>>()?;
    let total = opened.iter().map(|f| f.metadata().map(|m| m.len())).sum::<Result<u64, _>>()?;
    // The loader's own piece size for a load of this size.
    let piece = chunk_bytes(total, threads, BUFFER_BYTES);
    let mut pieces = Vec::new();
    for (i, f) in opened.iter().enumerate() {
        let len = f.metadata()?.len();
        pieces.extend((0..len).step_by(piece).map(|at| (i, at, (len - at).min(piece as u64) as usize)));
    }
    let next = AtomicUsize::new(0);
    let start = Instant::now();
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| -> anyhow::Result<()> {
                    while let Some(&(file, at, len)) = pieces.get(next.fetch_add(1, Ordering::Relaxed)) {
                        let mut lease = rig.pool.take(|| false).context("a staging buffer")?;
                        let buffer = lease.fill(&rig.gpu).map_err(|e| anyhow!(e))?;
                        opened[file].read_exact_at(&mut buffer[..len], at)?;
                    }
                    Ok(())
                })
            })
            .collect();
        workers.into_iter().try_for_each(|w| w.join().map_err(|_| anyhow!("a reader panicked"))?)
    })?;
    Ok(start.elapsed())
}

/// candle's own loader to the GPU, every file, until the copies completed.
fn candle_to_cuda(device: &Device, files: &[PathBuf]) -> anyhow::Result<(Duration, peers::Loaded)> {
    let start = Instant::now();
    let mut all = peers::Loaded::new();
    for file in files {
        all.extend(candle_core::safetensors::load(file, device)?);
    }
    device.synchronize()?;
    Ok((start.elapsed(), all))
}

/// The candle peer's runs, as it prints them.
#[derive(Serialize, Deserialize)]
struct PeerRuns {
    seconds: Vec<f64>,
    tensors: std::collections::BTreeMap<String, (String, Vec<u64>, String)>,
}

/// `model-loader-bench --gpu-candle-peer FILES`: candle's loader in a process of its own (as the
/// Python peers are: nothing shared with our loader's CUDA state): a warm-up that checks the
/// tensors, then `runs` timed runs; prints [`PeerRuns`] as JSON.
pub fn candle_peer_main(files: &[PathBuf], runs: usize) -> anyhow::Result<()> {
    let device = Device::new_cuda(0)?;
    let (_, loaded) = candle_to_cuda(&device, files)?;
    let tensors = peers::checksums(&loaded)?.tensors;
    drop(loaded);
    let mut seconds = Vec::new();
    for _ in 0..runs {
        let (took, loaded) = candle_to_cuda(&device, files)?;
        seconds.push(took.as_secs_f64());
        drop(loaded);
    }
    println!("{}", serde_json::to_string(&PeerRuns { seconds, tensors })?);
    Ok(())
}

fn candle_peer(files: &[PathBuf], runs: usize) -> anyhow::Result<PeerRuns> {
    let mut command = Command::new(std::env::current_exe()?);
    peers::json_of(command.args(["--gpu-candle-peer", "--gpu-runs", &runs.to_string()]).args(files), "the candle peer")
}

/// What `peer_gpu.py` prints.
#[derive(Deserialize)]
struct PythonPeer {
    version: String,
    setting: Option<serde_json::Value>,
    seconds: Vec<f64>,
    tensors: std::collections::BTreeMap<String, (String, Vec<u64>, String)>,
}

fn python_peer(script: &Path, loader: &str, files: &[PathBuf], runs: usize) -> anyhow::Result<PythonPeer> {
    let mut command = Command::new("python3");
    peers::json_of(command.arg(script).args(["--loader", loader, "--runs", &runs.to_string()]).args(files), loader)
}

fn drop_caches() -> anyhow::Result<()> {
    Command::new("sync").status()?;
    std::fs::write("/proc/sys/vm/drop_caches", "3").context("writing /proc/sys/vm/drop_caches")
}
