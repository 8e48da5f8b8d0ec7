//! Our loader end to end: the release `model-loader` binary driven over gRPC by a client in this
//! process, for load times, cancel latency, memory and start-up.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context, anyhow, bail};
use client::{Client, ConnectOptions, LoadRequest, LoadUpdate, pb};
use fixtures::binary::Binary;
use futures::StreamExt;
use rand::Rng;
use tonic::{Code, transport::Channel};

/// A client of the server at `addr`.
pub async fn connect(addr: SocketAddr) -> anyhow::Result<Client> {
    Ok(Client::connect(&ConnectOptions::new(addr.to_string())).await?)
}

/// ListTensors with checksums of a loaded model, as name → (dtype, shape, sha256), the form of
/// [`fixtures::fixture::Expected::observed`].
pub async fn checksums(client: &Client, id: &str) -> anyhow::Result<BTreeMap<String, (String, Vec<u64>, String)>> {
    let tensors = client.tensors(id, true).await.context("ListTensors")?;
    Ok(tensors.into_iter().map(|t| (t.name, (t.dtype, t.shape, t.sha256))).collect())
}

/// GetResources' entry for `device`.
pub async fn device_resources(client: &Client, device: &str) -> anyhow::Result<pb::DeviceResources> {
    let resources = client.resources().await.context("GetResources")?;
    resources.devices.into_iter().find(|d| d.name == device).with_context(|| format!("no device {device}"))
}
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};

/// The service whose health turns SERVING when the server is ready for loads.
const READY_SERVICE: &str = "modelloader.v1.ModelLoader";

/// Starts `exe` serving `model_root` offline, with `extra` flags.
pub async fn start(exe: &Path, model_root: &Path, extra: &[&str]) -> Binary {
    let root = model_root.to_string_lossy();
    let mut args = vec!["--model-root", root.as_ref(), "--offline"];
    args.extend_from_slice(extra);
    Binary::start_exe(exe, model_root, &args, &[]).await
}

/// One LoadModel, timed by the client.
#[derive(Debug, Clone)]
pub struct LoadTimes {
    /// From the call to the first progress message.
    pub first_message: Duration,
    /// From the call to the end of the stream (8/8 received, stream ended OK).
    pub total: Duration,
    /// From the call to the first message of each step, 1 to 8 (`None` for a step never seen).
    pub steps: [Option<Duration>; 8],
    /// The details the server gave after step 4 (steps 5 and 6: how the bytes were read and
    /// copied), in order.
    pub notes: Vec<String>,
}

pub async fn load(client: &Client, id: &str) -> anyhow::Result<LoadTimes> {
    let start = Instant::now();
    let mut stream = client.load(LoadRequest::new(id)).await.context("LoadModel")?;
    let (mut first, mut steps, mut notes, mut last_step) = (None, [None; 8], Vec::new(), 0);
    while let Some(update) = stream.next().await {
        let message = match update {
            LoadUpdate::Progress(p) => p,
            LoadUpdate::Finished(outcome) => {
                outcome.with_context(|| format!("loading {id}"))?;
                break;
            }
        };
        let now = start.elapsed();
        first.get_or_insert(now);
        if let Some(at) = (message.step as usize).checked_sub(1).and_then(|i| steps.get_mut(i)) {
            at.get_or_insert(now);
        }
        if matches!(message.step, 5 | 6) && !message.detail.is_empty() {
            notes.push(message.detail);
        }
        last_step = message.step;
    }
    let total = start.elapsed();
    if last_step != 8 {
        bail!("the load of {id} ended at step {last_step}");
    }
    let first = first.context("no progress message")?;
    Ok(LoadTimes { first_message: first, total, steps, notes })
}

impl LoadTimes {
    /// From the call to the first message of step 4 (LOAD_WEIGHTS).
    pub fn step4(&self) -> Duration {
        self.steps[3].unwrap_or(self.first_message)
    }

    /// From the call to the first message of step 5: the end of LOAD_WEIGHTS.
    pub fn step5(&self) -> Duration {
        self.steps[4].unwrap_or(self.total)
    }
}

pub async fn unload(client: &Client, id: &str) -> anyhow::Result<()> {
    client.unload(id, false).await.context("UnloadModel")?;
    Ok(())
}

/// One cancel inside step 4.
#[derive(Debug, Clone, Copy)]
pub struct CancelTimes {
    /// From sending CancelLoad to the end of the LoadModel stream (CANCELLED).
    pub stream_end: Duration,
    /// From sending CancelLoad to GetResources showing nothing used or reserved.
    pub released: Duration,
}

/// Starts a load of `id`, waits for step 4, waits a random time below `within`, cancels, and
/// times the end of the stream and the release of the memory: GetResources showing nothing used
/// or reserved on `device` and at least `free_floor` bytes available there (the driver's free
/// memory, for a GPU). `None` when the load finished before the cancel arrived (the caller tries
/// again).
pub async fn cancel_once(
    client: &Client,
    id: &str,
    within: Duration,
    device: &str,
    free_floor: u64,
) -> anyhow::Result<Option<CancelTimes>> {
    let mut stream = client.load(LoadRequest::new(id)).await.context("LoadModel")?;
    loop {
        match stream.next().await {
            Some(LoadUpdate::Progress(p)) if p.step >= 4 => break,
            Some(LoadUpdate::Progress(_)) => {}
            Some(LoadUpdate::Finished(Err(e))) => bail!("the load of {id} failed before step 4: {e}"),
            Some(LoadUpdate::Finished(Ok(()))) | None => bail!("the load of {id} ended before step 4"),
        }
    }
    let delay = rand::rng().random_range(Duration::ZERO..within.max(Duration::from_micros(1)));
    tokio::time::sleep(delay).await;
    let cancelled_at = Instant::now();
    let cancel = client.cancel(id);
    let stream_end = async {
        loop {
            match stream.next().await {
                Some(LoadUpdate::Progress(_)) => {}
                Some(LoadUpdate::Finished(Err(e))) if e.code() == Code::Cancelled => {
                    return Ok(Some(cancelled_at.elapsed()));
                }
                Some(LoadUpdate::Finished(Err(e))) => bail!("the load of {id} failed instead of being cancelled: {e}"),
                Some(LoadUpdate::Finished(Ok(()))) | None => return Ok(None),
            }
        }
    };
    let poller = client.clone();
    let device = device.to_owned();
    let released = async move {
        let device = device.as_str();
        loop {
            if let Ok(d) = device_resources(&poller, device).await
                && d.used_bytes == 0
                && d.reserved_bytes == 0
                && d.available_bytes >= free_floor
            {
                return cancelled_at.elapsed();
            }
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
    };
    let (cancel, stream_end) = tokio::join!(cancel, stream_end);
    cancel.context("CancelLoad")?;
    let Some(stream_end) = stream_end? else {
        // Too late: the load had finished. Unload and let the caller try again.
        unload(client, id).await?;
        return Ok(None);
    };
    let released = tokio::time::timeout(Duration::from_secs(30), released)
        .await
        .map_err(|_| anyhow!("the memory of a cancelled load of {id} did not come back within 30 s"))?;
    Ok(Some(CancelTimes { stream_end, released }))
}

/// From spawning the binary to its readiness service answering SERVING.
pub async fn start_to_serving(exe: &Path, model_root: &Path) -> anyhow::Result<Duration> {
    let start = Instant::now();
    let server = self::start(exe, model_root, &[]).await;
    let channel = Channel::from_shared(format!("http://{}", server.addr))?.connect_lazy();
    let mut health = HealthClient::new(channel);
    loop {
        let request = HealthCheckRequest { service: READY_SERVICE.into() };
        if let Ok(response) = health.check(request).await
            && response.into_inner().status() == ServingStatus::Serving
        {
            return Ok(start.elapsed());
        }
        if start.elapsed() > Duration::from_secs(30) {
            bail!("the server was not SERVING within 30 s");
        }
        tokio::time::sleep(Duration::from_micros(500)).await;
    }
}
