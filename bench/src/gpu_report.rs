//! The GPU benchmark's report (`model-loader-bench --gpu`, see `gpu`): its figures, the targets
//! they are held to, and how they are written (`results.json`, `README.md`, `throughput.png`).
//! Compiled in every build, so CI checks it and `--gpu-render DIR` can redraw a committed run.

use std::{path::Path, process::Command, time::Duration};

use serde::{Deserialize, Serialize};

use crate::{
    chart,
    models::Model,
    report::{Check, Target},
    server, stats,
};

/// The copies the link's limit is measured with: a little faster than the loader's.
pub const LINK_COPY_BYTES: usize = 16 << 20;
pub const LIMIT_H2D: &str = "limit: pinned host→device copy";
pub const LIMIT_READ: &str = "limit: page cache → pinned (parallel pread)";
pub const LIMIT_BOTH: &str = "limit: both at once, independent (read while copying)";
pub const LIMIT_DISK: &str = "limit: disk → pinned, cold (parallel pread)";
pub const CANDLE: &str = "candle safetensors::load to CUDA";
pub const TORCH: &str = "safetensors.torch load_file(cuda)";
pub const FASTSAFETENSORS: &str = "fastsafetensors (nogds, best warm setting)";
pub const OURS_IN_PROCESS: &str = "model-loader in process";
pub const OURS_GRPC: &str = "model-loader gRPC";
pub const OURS_GRPC_AGAIN: &str = "model-loader gRPC, again after the peers";
pub const OURS_GRPC_COLD: &str = "model-loader gRPC, cold";
pub const LIMIT_BOTH_BUSY: &str = "limit: both at once, every core busy";
pub const OURS_GRPC_BUSY: &str = "model-loader gRPC, every core busy";

/// The GPU report: what `results.json` holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GpuReport {
    pub machine: String,
    pub gpu: String,
    pub cold_cache: String,
    pub models: Vec<ModelInfo>,
    pub rows: Vec<Row>,
    pub cycles: Vec<Cycle>,
    pub cancel: CancelSummary,
    pub checks: Vec<Check>,
    pub peer_settings: Vec<String>,
    pub targets: Vec<Target>,
    /// Where a gRPC load's time goes, per model.
    #[serde(default)]
    pub timelines: Vec<Timeline>,
}

/// When each step of a gRPC load began, as the client saw its first message: medians over the
/// timed runs, in ms from the call, and the server's notes on reading and copying (of the run
/// nearest the median).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Timeline {
    pub model: String,
    /// Steps 1 to 8, then the end of the stream.
    pub step_ms: Vec<f64>,
    pub notes: Vec<String>,
}

impl Timeline {
    pub fn of(model: &str, runs: &[server::LoadTimes]) -> Self {
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let mut step_ms: Vec<f64> = (0..8)
            .map(|i| stats::median(&runs.iter().filter_map(|r| r.steps[i]).map(ms).collect::<Vec<_>>()))
            .collect();
        let totals: Vec<f64> = runs.iter().map(|r| ms(r.total)).collect();
        let median = stats::median(&totals);
        step_ms.push(median);
        let nearest = runs.iter().min_by(|a, b| (ms(a.total) - median).abs().total_cmp(&(ms(b.total) - median).abs()));
        Self { model: model.into(), step_ms, notes: nearest.map(|r| r.notes.clone()).unwrap_or_default() }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelInfo {
    pub id: String,
    pub files: usize,
    pub tensors: usize,
    pub bytes: u64,
}

/// One loader on one model: seconds of each timed run and the median's GB/s.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Row {
    pub model: String,
    pub loader: String,
    pub seconds: Vec<f64>,
    pub median_s: f64,
    pub gb_per_s: f64,
}

/// The driver's free memory on cuda:0 around one load and unload of the dense model.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Cycle {
    pub free_before: u64,
    pub free_loaded: u64,
    pub free_after_unload: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CancelSummary {
    pub tries: usize,
    pub stream_end_ms: Vec<f64>,
    pub released_ms: Vec<f64>,
    pub stream_end_p50_ms: f64,
    pub stream_end_max_ms: f64,
    pub released_p50_ms: f64,
    pub released_max_ms: f64,
}

/// Bytes of free GPU memory a cycle may lose and still count as "back" (the bound).
pub const FREE_SLACK: u64 = 64 << 20;

pub fn row(model: &Model, loader: &str, seconds: Vec<f64>) -> Row {
    let median_s = stats::median(&seconds);
    Row {
        model: model.id.clone(),
        loader: loader.into(),
        gb_per_s: model.bytes as f64 / median_s.max(1e-9) / 1e9,
        median_s,
        seconds,
    }
}

pub fn cancel_summary(cancels: &[server::CancelTimes]) -> CancelSummary {
    let ms = |f: fn(&server::CancelTimes) -> Duration| -> Vec<f64> {
        cancels.iter().map(|c| f(c).as_secs_f64() * 1e3).collect()
    };
    let (end, released) = (ms(|c| c.stream_end), ms(|c| c.released));
    let max = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
    CancelSummary {
        tries: cancels.len(),
        stream_end_p50_ms: stats::median(&end),
        stream_end_max_ms: max(&end),
        released_p50_ms: stats::median(&released),
        released_max_ms: max(&released),
        stream_end_ms: end,
        released_ms: released,
    }
}

impl GpuReport {
    /// The GB/s of `loader` on `model`, if measured.
    pub fn gb_per_s(&self, model: &str, loader: &str) -> Option<f64> {
        self.rows.iter().find(|r| r.model == model && r.loader == loader).map(|r| r.gb_per_s)
    }
}

pub fn evaluate(report: &mut GpuReport, dense: &str, small: &str) {
    let gbps = |model: &str, loader: &str| report.gb_per_s(model, loader);
    let mut targets = Vec::new();
    let mut ratio = |name: &str, goal: f64, ours: Option<f64>, base: Option<f64>| {
        let (measured, met) = match (ours, base) {
            (Some(o), Some(b)) if b > 0.0 => (format!("{:.2}× ({o:.2} / {b:.2} GB/s)", o / b), o / b >= goal),
            _ => ("not measured".into(), false),
        };
        targets.push(Target { name: name.into(), target: format!("≥ {goal}×"), measured, met });
    };
    let d = dense;
    let ours = gbps(d, OURS_GRPC);
    let limit = match (gbps(d, LIMIT_H2D), gbps(d, LIMIT_READ)) {
        (Some(a), Some(b)) => Some(a.min(b)),
        _ => None,
    };
    ratio("warm gRPC vs min(pinned H2D, page cache→pinned)", 0.9, ours, limit);
    ratio("warm in process vs min(pinned H2D, page cache→pinned)", 0.9, gbps(d, OURS_IN_PROCESS), limit);
    ratio("warm gRPC vs safetensors.torch", 4.5, ours, gbps(d, TORCH));
    ratio("warm gRPC vs fastsafetensors", 1.0, ours, gbps(d, FASTSAFETENSORS));
    ratio("cold gRPC vs the disk's read bandwidth", 0.95, gbps(d, OURS_GRPC_COLD), gbps(d, LIMIT_DISK));
    ratio("5,000-tensor checkpoint vs the dense one (gRPC GB/s)", 0.8, gbps(small, OURS_GRPC), ours);
    let worst = report.cycles.iter().map(|c| c.free_before.saturating_sub(c.free_after_unload)).max();
    targets.push(Target {
        name: "GPU free memory after unload vs before the load, worst of 5 cycles".into(),
        target: "within 64 MiB".into(),
        measured: worst.map_or("not measured".into(), |w| format!("{:.1} MiB less", w as f64 / 1048576.0)),
        met: worst.is_some_and(|w| w <= FREE_SLACK),
    });
    let c = &report.cancel;
    targets.push(Target {
        name: "cancel during a GPU load: stream end (max)".into(),
        target: "≤ 50 ms".into(),
        measured: format!("{:.1} ms (p50 {:.1}, {} cancels)", c.stream_end_max_ms, c.stream_end_p50_ms, c.tries),
        met: c.tries > 0 && c.stream_end_max_ms <= 50.0,
    });
    targets.push(Target {
        name: "cancel during a GPU load: memory back (max)".into(),
        target: "≤ 200 ms".into(),
        measured: format!("{:.1} ms (p50 {:.1})", c.released_max_ms, c.released_p50_ms),
        met: c.tries > 0 && c.released_max_ms <= 200.0,
    });
    report.targets = targets;
}

// A report page, written top to bottom in the order it reads.
#[allow(clippy::too_many_lines)]
pub fn write(out: &Path, report: &GpuReport) -> anyhow::Result<()> {
    std::fs::create_dir_all(out)?;
    std::fs::write(out.join("results.json"), serde_json::to_string_pretty(report)?)?;
    let mut md = String::new();
    let p = |md: &mut String, line: String| {
        md.push_str(&line);
        md.push('\n');
    };
    p(&mut md, "# GPU load benchmark\n".into());
    p(&mut md, "Written by `model-loader-bench --gpu`; the project README (Benchmarks) says how to run it.\n".into());
    p(&mut md, format!("- Machine: {}", report.machine));
    p(&mut md, format!("- GPU: {}", describe_gpu(&report.gpu)));
    p(&mut md, format!("- Cold runs: {}", report.cold_cache));
    for m in &report.models {
        p(&mut md, format!("- Model `{}`: {} tensors, {} bytes in {} files, BF16", m.id, m.tensors, m.bytes, m.files));
    }
    let mut settings = report.peer_settings.clone();
    settings.sort();
    settings.dedup();
    for s in &settings {
        p(&mut md, format!("- {s}"));
    }
    p(&mut md, "\nEach figure is the median of the timed runs (after untimed runs that check the tensors); min–max in brackets.".into());
    p(
        &mut md,
        format!(
            "Limits: host→device copies from pinned memory in {} MiB copies queued by one thread, nothing read; \
             page cache → the loader's own {} MiB pinned buffers on one thread per core, nothing copied; \
             both at once, each at its own pace on its own buffers (the time until both are done: \
             the most a loader that overlaps them can do on this machine).\n",
            LINK_COPY_BYTES >> 20,
            model_manager::resource_manager::staging::BUFFER_BYTES >> 20
        ),
    );
    p(&mut md, "| model | loader | median s (min–max) | GB/s |".into());
    p(&mut md, "|---|---|---|---|".into());
    for r in &report.rows {
        let min = r.seconds.iter().copied().fold(f64::INFINITY, f64::min);
        let max = r.seconds.iter().copied().fold(0.0, f64::max);
        p(
            &mut md,
            format!("| {} | {} | {:.3} ({min:.3}–{max:.3}) | {:.2} |", r.model, r.loader, r.median_s, r.gb_per_s),
        );
    }
    p(&mut md, "\n## Targets\n".into());
    p(&mut md, "| target | goal | measured | met |".into());
    p(&mut md, "|---|---|---|---|".into());
    for t in &report.targets {
        p(
            &mut md,
            format!("| {} | {} | {} | {} |", t.name, t.target, t.measured, if t.met { "yes" } else { "**no**" }),
        );
    }
    if let Some(dense) = report.models.first() {
        let gbps = |loader| report.gb_per_s(&dense.id, loader);
        let mut scale = Vec::new();
        if let (Some(both), Some(ours)) = (gbps(LIMIT_BOTH), gbps(OURS_GRPC)) {
            scale.push(format!(
                "reading and copying at once, each on its own, the machine gave {both:.2} GB/s for `{}`; the gRPC \
                 load ran at {:.2}× that",
                dense.id,
                ours / both
            ));
        }
        if let (Some(again), Some(peer)) = (gbps(OURS_GRPC_AGAIN), gbps(FASTSAFETENSORS)) {
            scale.push(format!(
                "measured again right after the peers, the gRPC load ran at {again:.2} GB/s, {:.2}× fastsafetensors \
                 measured just before it",
                again / peer
            ));
        }
        if let (Some(both), Some(ours)) = (gbps(LIMIT_BOTH_BUSY), gbps(OURS_GRPC_BUSY)) {
            scale.push(format!(
                "with every core also running a busy loop, the gRPC load ran at {ours:.2} GB/s, {:.2}× what the \
                 machine gave reading and copying at once under the same load ({both:.2})",
                ours / both
            ));
        }
        if !scale.is_empty() {
            p(&mut md, format!("\nNot targets, for scale: {}.", scale.join("; ")));
        }
    }
    if !report.timelines.is_empty() {
        p(&mut md, "\n## Where a gRPC load's time goes\n".into());
        p(
            &mut md,
            "When the client received the first message of each step, in ms from its LoadModel call \
             (medians of the timed runs); the server's own notes on step 4 follow.\n"
                .into(),
        );
        p(&mut md, "| model | 1 | 2 | 3 | 4 | 5 | 6 | 7 | 8 | end |".into());
        p(&mut md, "|---|---|---|---|---|---|---|---|---|---|".into());
        for t in &report.timelines {
            let cells: Vec<String> = t.step_ms.iter().map(|ms| format!("{ms:.1}")).collect();
            p(&mut md, format!("| {} | {} |", t.model, cells.join(" | ")));
        }
        p(&mut md, String::new());
        for t in &report.timelines {
            for note in &t.notes {
                p(&mut md, format!("- {}: {note}", t.model));
            }
        }
    }
    p(&mut md, "\n## GPU memory (driver's free bytes on cuda:0), 5 cycles of the dense model\n".into());
    p(&mut md, "| cycle | before load | loaded | after unload | after − before |".into());
    p(&mut md, "|---|---|---|---|---|".into());
    for (i, c) in report.cycles.iter().enumerate() {
        let diff = c.free_after_unload as i64 - c.free_before as i64;
        p(&mut md, format!("| {} | {} | {} | {} | {diff} |", i + 1, c.free_before, c.free_loaded, c.free_after_unload));
    }
    p(&mut md, "\n## Checks (every loader's tensors against the files)\n".into());
    for c in &report.checks {
        p(
            &mut md,
            format!("- {} on {}: {}", c.loader, c.model, if c.same_tensors { "identical" } else { "DIFFERENT" }),
        );
    }
    p(&mut md, "\n![throughput](throughput.png)".into());
    std::fs::write(out.join("README.md"), md)?;
    let groups: Vec<&str> = report.models.iter().map(|m| m.id.as_str()).collect();
    let bars: Vec<(String, f64, usize)> = report
        .rows
        .iter()
        .map(|r| {
            let group = if r.loader.contains("cold") {
                2
            } else if r.loader.contains("busy") {
                3
            } else {
                groups.iter().position(|g| *g == r.model).unwrap_or(0)
            };
            (format!("{} ({})", r.loader, r.model), r.gb_per_s, group)
        })
        .collect();
    chart::bars(&out.join("throughput.png"), "Loads to an H100 (GB/s, higher is better)", &bars)
}

/// The machine in one line: cores, CPU, memory, kernel.
pub fn machine(threads: usize) -> String {
    let m = crate::report::Machine::here(threads);
    format!(
        "{} cores ({}), {:.0} GiB memory, Linux {}",
        m.cores,
        m.cpu,
        m.memory_bytes as f64 / (1u64 << 30) as f64,
        m.kernel
    )
}

/// `name, driver, memory, PCIe gen, PCIe width` as nvidia-smi prints them, in words.
fn describe_gpu(csv: &str) -> String {
    match csv.split(", ").collect::<Vec<_>>().as_slice() {
        [name, driver, memory, generation, width] => {
            format!("{name} (driver {driver}, {memory}, PCIe gen {generation} x{width})")
        }
        _ => csv.to_owned(),
    }
}

pub fn nvidia_smi() -> String {
    Command::new("nvidia-smi")
        .args([
            "--query-gpu=name,driver_version,memory.total,pcie.link.gen.max,pcie.link.width.max",
            "--format=csv,noheader",
        ])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|e| format!("nvidia-smi: {e}"))
}
