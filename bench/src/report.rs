//! The benchmark's results: `results.json`, a Markdown table with every figure's ratio to the
//! limits and the peers, and the targets each figure is held to.

use std::{fmt::Write as _, path::Path};

use fixtures::fixture::Expected;
use serde::Serialize;

use crate::{
    Options,
    models::Model,
    server::{CancelTimes, LoadTimes},
    stats::{median, percentile},
};

pub const LIMIT_PREAD: &str = "limit: parallel pread";
pub const LIMIT_READ: &str = "limit: single-thread read";
pub const CANDLE_LOAD: &str = "candle safetensors::load";
pub const CANDLE_MMAP: &str = "candle MmapedSafetensors";
pub const PYTHON: &str = "python safetensors.numpy";
pub const OURS_IN_PROCESS: &str = "ours, in process";
pub const OURS_GRPC: &str = "ours, gRPC end to end";
/// What a Python process attached to maps (checked, not one of the loaders' tables).
pub const OURS_ATTACH: &str = "ours, attached from Python";
/// Every loader, in the order of the tables.
pub const LOADERS: [&str; 7] = [LIMIT_PREAD, LIMIT_READ, CANDLE_LOAD, CANDLE_MMAP, PYTHON, OURS_IN_PROCESS, OURS_GRPC];
/// What the ratios columns compare with.
const BASELINES: [&str; 5] = [LIMIT_PREAD, LIMIT_READ, CANDLE_LOAD, CANDLE_MMAP, PYTHON];

#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub cores: usize,
    pub memory_bytes: u64,
    pub kernel: String,
    pub cpu: String,
}

impl Machine {
    pub fn here(cores: usize) -> Self {
        let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
        let meminfo = read("/proc/meminfo");
        let memory_kib: u64 = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0);
        let cpu = read("/proc/cpuinfo")
            .lines()
            .find_map(|l| {
                l.strip_prefix("model name").and_then(|v| v.split_once(':')).map(|(_, v)| v.trim().to_owned())
            })
            .unwrap_or_default();
        Self { cores, memory_bytes: memory_kib * 1024, kernel: read("/proc/sys/kernel/osrelease").trim().into(), cpu }
    }
}

/// One loader's timed runs on one model.
#[derive(Debug, Clone, Serialize)]
pub struct LoaderRun {
    pub loader: String,
    pub model: String,
    pub bytes: u64,
    pub seconds: Vec<f64>,
    pub median_s: f64,
    pub gb_per_s: f64,
}

impl LoaderRun {
    pub fn new(loader: &str, model: &Model, seconds: Vec<f64>) -> Self {
        let median_s = median(&seconds);
        let gb_per_s = if median_s > 0.0 { model.bytes as f64 / median_s / 1e9 } else { 0.0 };
        Self { loader: loader.into(), model: model.id.clone(), bytes: model.bytes, seconds, median_s, gb_per_s }
    }
}

/// Whether a loader read exactly the tensors the files hold.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Check {
    pub loader: String,
    pub model: String,
    pub same_tensors: bool,
    /// The first tensors that differ (missing, extra or different), for the reader.
    pub differences: Vec<String>,
}

impl Check {
    pub fn compare(loader: &str, model: &Model, got: &Expected) -> Self {
        let mut differences = Vec::new();
        for (name, want) in &model.expected.tensors {
            match got.tensors.get(name) {
                None => differences.push(format!("{name}: missing")),
                Some(have) if have != want => differences.push(format!("{name}: {have:?} instead of {want:?}")),
                Some(_) => {}
            }
        }
        differences.extend(
            got.tensors.keys().filter(|n| !model.expected.tensors.contains_key(*n)).map(|n| format!("{n}: extra")),
        );
        let same_tensors = differences.is_empty();
        differences.truncate(5);
        Self { loader: loader.into(), model: model.id.clone(), same_tensors, differences }
    }
}

/// LoadModel through the server, as its client sees it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Grpc {
    pub model: String,
    pub first_message_ms: Vec<f64>,
    pub first_message_ms_median: f64,
    pub total_s_median: f64,
    pub gb_per_s: f64,
}

impl Grpc {
    pub fn from_runs(model: &Model, runs: &[LoadTimes]) -> Self {
        let first_message_ms: Vec<f64> = runs.iter().map(|r| r.first_message.as_secs_f64() * 1e3).collect();
        let total_s_median = median(&runs.iter().map(|r| r.total.as_secs_f64()).collect::<Vec<_>>());
        Self {
            model: model.id.clone(),
            first_message_ms_median: median(&first_message_ms),
            first_message_ms,
            total_s_median,
            gb_per_s: if total_s_median > 0.0 { model.bytes as f64 / total_s_median / 1e9 } else { 0.0 },
        }
    }
}

/// CancelLoad at random points of step 4.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Cancel {
    pub tries: usize,
    /// Cancels that arrived after the load had finished (not counted, tried again).
    pub too_late: usize,
    pub stream_end_ms_p50: f64,
    pub stream_end_ms_p99: f64,
    pub released_ms_p50: f64,
    pub released_ms_p99: f64,
    pub stream_end_ms: Vec<f64>,
    pub released_ms: Vec<f64>,
}

impl Cancel {
    pub fn from_runs(runs: &[CancelTimes], too_late: usize) -> Self {
        let stream_end_ms: Vec<f64> = runs.iter().map(|r| r.stream_end.as_secs_f64() * 1e3).collect();
        let released_ms: Vec<f64> = runs.iter().map(|r| r.released.as_secs_f64() * 1e3).collect();
        Self {
            tries: runs.len(),
            too_late,
            stream_end_ms_p50: percentile(&stream_end_ms, 50.0),
            stream_end_ms_p99: percentile(&stream_end_ms, 99.0),
            released_ms_p50: percentile(&released_ms, 50.0),
            released_ms_p99: percentile(&released_ms, 99.0),
            stream_end_ms,
            released_ms,
        }
    }
}

/// WatchModels streams on one load.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Fanout {
    pub watchers: usize,
    pub loads: usize,
    /// Watchers (over all loads) that received every step.
    pub complete: usize,
    pub all_received: bool,
    pub samples: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    #[serde(skip)]
    pub latencies_ms: Vec<f64>,
}

impl Fanout {
    pub fn from_rounds(rounds: &[crate::fanout::Round]) -> Self {
        let latencies_ms: Vec<f64> = rounds.iter().flat_map(|r| r.latencies_ms.iter().copied()).collect();
        let watchers = rounds.first().map_or(0, |r| r.watchers);
        let complete = rounds.iter().map(|r| r.complete).sum();
        Self {
            watchers,
            loads: rounds.len(),
            complete,
            all_received: complete == watchers * rounds.len() && !rounds.is_empty(),
            samples: latencies_ms.len(),
            p50_ms: percentile(&latencies_ms, 50.0),
            p99_ms: percentile(&latencies_ms, 99.0),
            max_ms: percentile(&latencies_ms, 100.0),
            latencies_ms,
        }
    }
}

/// The server's memory and start-up.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Memory {
    pub idle_rss_bytes: u64,
    /// RSS after each unload of the load/unload cycles.
    pub after_unload_rss_bytes: Vec<u64>,
    /// Last over first of `after_unload_rss_bytes`.
    pub cycles_ratio: f64,
    pub start_to_serving_ms: Vec<f64>,
    pub start_to_serving_ms_median: f64,
}

impl Memory {
    pub fn summarised(mut self) -> Self {
        if let (Some(&first), Some(&last)) = (self.after_unload_rss_bytes.first(), self.after_unload_rss_bytes.last()) {
            self.cycles_ratio = last as f64 / first.max(1) as f64;
        }
        self.start_to_serving_ms_median = median(&self.start_to_serving_ms);
        self
    }
}

/// A target of the benchmark and whether this run met it.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Target {
    pub name: String,
    pub target: String,
    pub measured: String,
    pub met: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub machine: Machine,
    pub options: Options,
    pub models: Vec<Model>,
    pub loaders: Vec<LoaderRun>,
    pub checks: Vec<Check>,
    pub grpc: Vec<Grpc>,
    pub cancel: Cancel,
    pub fanout: Fanout,
    pub memory: Memory,
    pub attach: crate::attach::Attach,
    pub adapter: crate::adapter::Adapter,
    /// Run when `--vllm-python` is given.
    pub vllm: Option<crate::vllm::Vllm>,
    pub targets: Vec<Target>,
}

impl Report {
    pub fn new(options: &Options, cores: usize, models: [&Model; 2]) -> Self {
        Self {
            machine: Machine::here(cores),
            options: options.clone(),
            models: models.into_iter().cloned().collect(),
            loaders: Vec::new(),
            checks: Vec::new(),
            grpc: Vec::new(),
            cancel: Cancel::default(),
            fanout: Fanout::default(),
            memory: Memory::default(),
            attach: crate::attach::Attach::default(),
            adapter: crate::adapter::Adapter::default(),
            vllm: None,
            targets: Vec::new(),
        }
    }

    /// The median seconds of `loader` on `model`.
    pub fn seconds(&self, loader: &str, model: &str) -> Option<f64> {
        self.loaders.iter().find(|r| r.loader == loader && r.model == model).map(|r| r.median_s)
    }

    fn gb_per_s(&self, loader: &str, model: &str) -> f64 {
        self.loaders.iter().find(|r| r.loader == loader && r.model == model).map_or(0.0, |r| r.gb_per_s)
    }

    /// Holds the figures to the targets.
    pub fn evaluate(&mut self) {
        let dense = self.models.first().map(|m| m.id.clone()).unwrap_or_default();
        let small = self.models.get(1).map(|m| m.id.clone()).unwrap_or_default();
        let ours = self.gb_per_s(OURS_GRPC, &dense);
        let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
        let mut targets = Vec::new();
        let mut at_least = |name: &str, measured: f64, target: f64, unit: &str| {
            targets.push(Target {
                name: name.into(),
                target: format!("≥ {target}{unit}"),
                // Three decimals, so a figure just under its goal does not print as the goal.
                measured: format!("{measured:.3}{unit}"),
                met: measured >= target,
            })
        };
        at_least("warm load (gRPC) vs parallel pread", ratio(ours, self.gb_per_s(LIMIT_PREAD, &dense)), 0.85, "×");
        at_least(
            "warm load (gRPC) vs candle safetensors::load",
            ratio(ours, self.gb_per_s(CANDLE_LOAD, &dense)),
            2.0,
            "×",
        );
        at_least(
            "5,000-tensor model vs dense model (GB/s, gRPC)",
            ratio(self.gb_per_s(OURS_GRPC, &small), ours),
            0.7,
            "×",
        );
        at_least(
            "gRPC end to end vs in process (speed)",
            ratio(self.gb_per_s(OURS_GRPC, &dense), self.gb_per_s(OURS_IN_PROCESS, &dense)),
            0.95,
            "×",
        );
        at_least("load ready for attach vs into anonymous memory", self.attach.ready_ratio, 0.9, "×");
        at_least("attach to usable tensors vs the fastest peer's warm reload", self.attach.speedup, 20.0, "×");
        // On the CPU both map the same page cache: the adapter must not be slower, while needing
        // nothing but the socket and sharing the server's memory (on a GPU it skips the copy).
        at_least("ready transformers model: adapter vs from_pretrained (warm)", self.adapter.speedup, 0.9, "×");
        if let Some(vllm) = &self.vllm {
            // On the CPU vLLM copies either way (from the page cache or from shared memory).
            at_least("vLLM to first token: load format model-loader vs auto (warm)", vllm.speedup, 0.9, "×");
        }
        let mut at_most = |name: &str, measured: f64, target: f64, unit: &str| {
            targets.push(Target {
                name: name.into(),
                target: format!("≤ {target} {unit}"),
                measured: format!("{measured:.2} {unit}"),
                met: measured <= target,
            })
        };
        let first = self.grpc.iter().find(|g| g.model == dense).map_or(f64::MAX, |g| g.first_message_ms_median);
        at_most("first progress message after LoadModel", first, 20.0, "ms");
        at_most("cancel: stream ends, p99", self.cancel.stream_end_ms_p99, 50.0, "ms");
        at_most("cancel: reservation released, p99", self.cancel.released_ms_p99, 100.0, "ms");
        at_most("fan-out: delivery p99", self.fanout.p99_ms, 20.0, "ms");
        at_most("idle RSS", self.memory.idle_rss_bytes as f64 / 1e6, 30.0, "MB");
        at_most("RSS after the cycles vs after the first unload", self.memory.cycles_ratio, 1.1, "×");
        at_most("start to SERVING", self.memory.start_to_serving_ms_median, 200.0, "ms");

        targets.push(Target {
            name: "fan-out: every watcher receives every step".into(),
            target: "all".into(),
            measured: format!("{} of {}", self.fanout.complete, self.fanout.watchers * self.fanout.loads),
            met: self.fanout.all_received,
        });
        let same = self.checks.iter().all(|c| c.same_tensors);
        targets.push(Target {
            name: "every loader read the same tensors as the files hold".into(),
            target: "all".into(),
            measured: format!("{} of {}", self.checks.iter().filter(|c| c.same_tensors).count(), self.checks.len()),
            met: same && !self.checks.is_empty(),
        });
        self.targets = targets;
    }

    /// The Markdown page of the results, written top to bottom in the order it reads.
    #[allow(clippy::too_many_lines)]
    pub fn markdown(&self) -> String {
        let mut md = String::new();
        let m = &self.machine;
        let _ = writeln!(md, "# Benchmarks\n");
        let _ = writeln!(
            md,
            "Written by `just bench` (the `bench` crate); every figure below comes from one run of it on this \
             machine: {} cores ({}), {:.1} GiB of memory, Linux {}. Warm page cache; times are medians of {} runs \
             after an untimed run that checks every loader's tensors against the files. Raw figures: \
             [results.json](results.json).\n",
            m.cores,
            m.cpu,
            m.memory_bytes as f64 / (1u64 << 30) as f64,
            m.kernel,
            self.options.runs
        );
        let _ = writeln!(md, "![load throughput](throughput.png)\n");
        for model in &self.models {
            let _ = writeln!(
                md,
                "## Loading `{}`: {} tensors, {:.2} GB in {} file(s)\n",
                model.id,
                model.tensors,
                model.bytes as f64 / 1e9,
                model.files_count
            );
            let _ = write!(md, "| loader | median s (min–max) | GB/s |");
            for b in BASELINES {
                let _ = write!(md, " × {b} |");
            }
            let _ = write!(md, "\n|---|---:|---:|");
            for _ in BASELINES {
                let _ = write!(md, "---:|");
            }
            md.push('\n');
            for run in self.loaders.iter().filter(|r| r.model == model.id) {
                let min = run.seconds.iter().copied().fold(f64::INFINITY, f64::min);
                let max = run.seconds.iter().copied().fold(0.0, f64::max);
                let _ =
                    write!(md, "| {} | {:.3} ({min:.3}–{max:.3}) | {:.2} |", run.loader, run.median_s, run.gb_per_s);
                for b in BASELINES {
                    match self.seconds(b, &model.id) {
                        // A ratio of speeds: above 1 is faster than the baseline.
                        Some(base) if run.median_s > 0.0 => {
                            let _ = write!(md, " {:.2} |", base / run.median_s);
                        }
                        _ => md.push_str(" – |"),
                    }
                }
                md.push('\n');
            }
            md.push('\n');
        }
        let _ = writeln!(md, "## gRPC, cancel, fan-out, memory\n");
        let _ = writeln!(md, "| figure | value |\n|---|---:|");
        for g in &self.grpc {
            let _ = writeln!(
                md,
                "| `{}`: first progress message after LoadModel (median) | {:.2} ms |",
                g.model, g.first_message_ms_median
            );
            let _ = writeln!(
                md,
                "| `{}`: LoadModel to 8/8 (median) | {:.3} s, {:.2} GB/s |",
                g.model, g.total_s_median, g.gb_per_s
            );
        }
        let c = &self.cancel;
        let _ = writeln!(
            md,
            "| cancel inside step 4: stream ends, p50 / p99 ({} tries) | {:.2} / {:.2} ms |",
            c.tries, c.stream_end_ms_p50, c.stream_end_ms_p99
        );
        let _ = writeln!(
            md,
            "| cancel inside step 4: reservation released, p50 / p99 | {:.2} / {:.2} ms |",
            c.released_ms_p50, c.released_ms_p99
        );
        let f = &self.fanout;
        let _ = writeln!(
            md,
            "| fan-out: {} watchers × {} loads, watchers with every step | {} of {} |",
            f.watchers,
            f.loads,
            f.complete,
            f.watchers * f.loads
        );
        let _ = writeln!(
            md,
            "| fan-out: delivery latency p50 / p99 / max ({} samples) | {:.2} / {:.2} / {:.2} ms |",
            f.samples, f.p50_ms, f.p99_ms, f.max_ms
        );
        let mem = &self.memory;
        let _ = writeln!(md, "| idle RSS of the server | {:.1} MB |", mem.idle_rss_bytes as f64 / 1e6);
        if let (Some(first), Some(last)) = (mem.after_unload_rss_bytes.first(), mem.after_unload_rss_bytes.last()) {
            let _ = writeln!(
                md,
                "| RSS after unload: first / after {} cycles | {:.1} / {:.1} MB ({:.3}×) |",
                mem.after_unload_rss_bytes.len(),
                *first as f64 / 1e6,
                *last as f64 / 1e6,
                mem.cycles_ratio
            );
        }
        let _ = writeln!(md, "| start to health SERVING (median) | {:.1} ms |\n", mem.start_to_serving_ms_median);
        let _ = writeln!(md, "![fan-out latency](fanout.png)\n");
        md += &self.attach.markdown();
        md += &self.adapter.markdown();
        if let Some(vllm) = &self.vllm {
            md += &vllm.markdown();
        }
        let _ = writeln!(md, "## Targets\n\n| target | goal | measured | met |\n|---|---|---|---|");
        for t in &self.targets {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} |",
                t.name,
                t.target,
                t.measured,
                if t.met { "yes" } else { "**no**" }
            );
        }
        md
    }
}

/// Writes `results.json` and `README.md` into `out`.
pub fn write(out: &Path, report: &Report) -> anyhow::Result<()> {
    std::fs::create_dir_all(out)?;
    std::fs::write(out.join("results.json"), serde_json::to_string_pretty(report)? + "\n")?;
    std::fs::write(out.join("README.md"), report.markdown())?;
    Ok(())
}
