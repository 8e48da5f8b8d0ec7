//! `--metrics-listen`: Prometheus text at `/metrics`. The loads record counters and histograms
//! through the `metrics` facade (loader-service); this module installs the exporter, keeps the
//! watcher gauge, and reads the gauges of models and devices from the manager, and the process's
//! own (`process_*`, as Prometheus' client libraries name them), at each scrape.

use std::sync::{Arc, LazyLock, OnceLock};

use anyhow::Context;
use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use model_manager::{ModelManager, state_manager::ModelState};
use tokio::net::TcpListener;

/// Seconds: from a 10 ms step to a 10-minute download.
const BUCKETS: &[f64] =
    &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0];

/// The process's CPU time, memory, file descriptors, threads and start time, read at each scrape.
static PROCESS: LazyLock<metrics_process::Collector> = LazyLock::new(metrics_process::Collector::default);

/// The commit the binary was built from, where the build had a git checkout (not in the image's
/// build, whose context leaves `.git` out): empty otherwise.
const GIT_SHA: &str =
    git_version::git_version!(args = ["--always", "--dirty=-modified", "--abbrev=12", "--exclude=*"], fallback = "");

/// Installs the process-wide recorder once (a second server in the same process shares it).
pub fn install() -> anyhow::Result<PrometheusHandle> {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    if let Some(handle) = HANDLE.get() {
        return Ok(handle.clone());
    }
    let handle = PrometheusBuilder::new()
        .set_buckets(BUCKETS)
        .context("histogram buckets")?
        .install_recorder()
        .context("installing the metrics recorder")?;
    describe();
    Ok(HANDLE.get_or_init(|| handle).clone())
}

fn describe() {
    describe_counter!(
        "model_loader_loads_started_total",
        "Loads started (joins of a load in flight are not new loads)."
    );
    describe_counter!(
        "model_loader_loads_finished_total",
        "Loads ended, by outcome (succeeded, failed, cancelled) and error kind (none when succeeded)."
    );
    describe_histogram!("model_loader_load_duration_seconds", "Time from the start of a load to its end, by outcome.");
    describe_histogram!("model_loader_step_duration_seconds", "Time a load spent in each of the eight steps.");
    describe_counter!("model_loader_loaded_bytes_total", "Weight bytes of the loads that succeeded.");
    describe_counter!(
        "model_loader_download_bytes_total",
        "Bytes of model files downloaded from the hub (header reads ahead of a download aside)."
    );
    describe_gauge!("model_loader_models", "Models the server knows, by state.");
    describe_gauge!("model_loader_device_used_bytes", "Bytes held by loaded models, per device.");
    describe_gauge!("model_loader_device_reserved_bytes", "Bytes reserved by loads in flight, per device.");
    describe_gauge!("model_loader_device_budget_bytes", "The memory budget, per device.");
    describe_gauge!("model_loader_device_total_bytes", "The device's capacity, per device.");
    describe_gauge!("model_loader_watchers", "Open WatchModels streams.");
    describe_gauge!("model_loader_attached_clients", "Connections holding a lease on the attach socket.");
    describe_gauge!("model_loader_connections", "Open gRPC connections.");
    describe_counter!(
        "model_loader_connections_refused_total",
        "gRPC connections refused: every place taken by a connection with requests in flight."
    );
    describe_counter!("model_loader_watchers_refused_total", "WatchModels refused past --max-watchers.");
    describe_counter!("model_loader_auth_refused_total", "Requests refused by auth, by gRPC code.");
    describe_gauge!(
        "model_loader_build_info",
        "Always 1: the version, the commit (git_sha, where the build knew it) and whether it was built with CUDA."
    );
    PROCESS.describe();
    build_info();
    // Shown from the first scrape, at zero until something happens: a dashboard's query then
    // finds a value rather than no data. (Registering leaves a value set before alone.)
    for name in [
        "model_loader_loads_started_total",
        "model_loader_loaded_bytes_total",
        "model_loader_download_bytes_total",
        "model_loader_connections_refused_total",
        "model_loader_watchers_refused_total",
    ] {
        counter!(name).increment(0);
    }
    for name in ["model_loader_watchers", "model_loader_attached_clients", "model_loader_connections"] {
        gauge!(name).increment(0.0);
    }
}

/// `model_loader_build_info{version, git_sha, cuda} 1`, the convention for joining a version to
/// other series.
fn build_info() {
    let mut labels = vec![metrics::Label::new("version", env!("CARGO_PKG_VERSION"))];
    if !GIT_SHA.is_empty() {
        labels.push(metrics::Label::new("git_sha", GIT_SHA));
    }
    labels.push(metrics::Label::new("cuda", if cfg!(feature = "cuda") { "true" } else { "false" }));
    gauge!("model_loader_build_info", labels).set(1.0);
}

/// The open gRPC connections gauge.
pub fn set_open_connections(open: usize) {
    gauge!("model_loader_connections").set(open as f64);
}

/// Serves `/metrics` on `listener` until the task is aborted.
pub async fn serve(listener: TcpListener, manager: Arc<ModelManager>, handle: PrometheusHandle) -> anyhow::Result<()> {
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let (manager, handle) = (manager.clone(), handle.clone());
            async move {
                refresh(&manager);
                ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], handle.render())
            }
        }),
    );
    axum::serve(listener, app).await.context("serving /metrics")
}

/// The gauges that are the manager's state now, and the process's.
fn refresh(manager: &ModelManager) {
    PROCESS.collect();
    let statuses = manager.list();
    for state in
        [ModelState::Unloaded, ModelState::Loading, ModelState::Loaded, ModelState::Unloading, ModelState::Failed]
    {
        let name: &'static str = state.into();
        let count = statuses.iter().filter(|s| s.state == state).count();
        gauge!("model_loader_models", "state" => name.to_ascii_lowercase()).set(count as f64);
    }
    for device in manager.resources() {
        let name = device.device.to_string();
        gauge!("model_loader_device_used_bytes", "device" => name.clone()).set(device.used_bytes as f64);
        gauge!("model_loader_device_reserved_bytes", "device" => name.clone()).set(device.reserved_bytes as f64);
        gauge!("model_loader_device_budget_bytes", "device" => name.clone()).set(device.budget_bytes as f64);
        gauge!("model_loader_device_total_bytes", "device" => name).set(device.total_bytes as f64);
    }
}

/// Counts an open WatchModels stream for as long as it lives.
pub struct Watcher(());

impl Watcher {
    pub fn open() -> Self {
        gauge!("model_loader_watchers").increment(1.0);
        Self(())
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        gauge!("model_loader_watchers").decrement(1.0);
    }
}
