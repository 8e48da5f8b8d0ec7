//! The attach socket (`--attach-socket`): a Unix socket beside gRPC where a process attaches to a
//! LOADED model and receives its memory's file descriptors (SCM_RIGHTS) and every tensor's place
//! in them. The connection is the lease: the model stays resident while it is open; a forced
//! unload or shutdown closes it. The wire is `attach::wire`; the messages are in the proto.
//!
//! The socket file is this server's alone: a path that is not a socket, another user's socket or
//! a directory others may replace it in is refused at bind, and at shutdown only the file bound
//! here is removed. Connections are bounded by `--attach-max-clients` and by the open-file limit.

use std::{
    collections::{BTreeMap, HashMap},
    os::{
        fd::{AsFd, AsRawFd, BorrowedFd},
        unix::fs::{FileTypeExt, MetadataExt, PermissionsExt},
    },
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::Context;
use attach::wire;
use model_manager::{
    ModelManager, TargetDtype,
    pipeline_manager::Lease,
    resource_manager::{DeviceId, TargetRequest},
};
use pipeline_manager::MemoryKind;
use prost::Message;
use proto::v1 as pb;
use rustix::io::Errno;
use tokio::{
    io::{AsyncReadExt, Interest},
    net::{UnixListener, UnixStream},
};
use tokio_util::sync::CancellationToken;
use tonic::{Code, Status};

use crate::{convert, status, throttle::LogThrottle};

/// The attach socket's settings.
#[derive(Debug, Clone)]
pub struct AttachConfig {
    pub path: PathBuf,
    /// Its permissions (0660 unless set): who may attach.
    pub mode: u32,
    /// Connections open at once (fewer where the open-file limit is low); past it, a connection
    /// that has not sent its request yet makes way, or the new one gets RESOURCE_EXHAUSTED.
    pub max_clients: usize,
    /// How long a client may take to send its request before the server closes the connection.
    pub request_timeout: Duration,
}

/// The bound attach socket, and the file it made at its path.
#[derive(Debug)]
pub struct Bound {
    listener: UnixListener,
    made: Made,
}

/// The socket file a server made: its path and identity (device, inode), so that it removes only
/// that file, never one that has replaced it since (another server's socket, anything else).
#[derive(Debug)]
struct Made {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl Made {
    fn remove(&self) {
        match std::fs::symlink_metadata(&self.path) {
            Ok(now) if (now.dev(), now.ino()) == (self.dev, self.ino) => {
                let _ = std::fs::remove_file(&self.path);
            }
            Ok(_) => {
                tracing::warn!(path = %self.path.display(), "the attach socket's path now holds another file: left alone")
            }
            Err(_) => {}
        }
    }
}

/// Binds the socket, replacing a stale one of ours; refuses one a live server holds, a path that
/// is not a socket, another user's socket, and a directory where others could replace it.
pub fn bind(config: &AttachConfig) -> anyhow::Result<Bound> {
    let path = &config.path;
    check_directory(path)?;
    match std::fs::symlink_metadata(path) {
        Ok(existing) => take_over(path, &existing)?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("the attach socket {}", path.display())),
    }
    let listener = UnixListener::bind(path).with_context(|| format!("binding the attach socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(config.mode))
        .with_context(|| format!("setting the mode of {}", path.display()))?;
    let made = std::fs::symlink_metadata(path).with_context(|| format!("the attach socket {}", path.display()))?;
    tracing::info!(path = %path.display(), mode = format!("{:o}", config.mode), "serving the attach socket");
    Ok(Bound { listener, made: Made { path: path.clone(), dev: made.dev(), ino: made.ino() } })
}

/// Refuses a directory anyone may write to without the sticky bit: another user could remove the
/// socket and put their own in its place. (Under the sticky bit, as in /tmp, only the socket's
/// owner may remove it, and [`take_over`] refuses a path another user took first.)
fn check_directory(path: &Path) -> anyhow::Result<()> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let mode =
        std::fs::metadata(dir).with_context(|| format!("the attach socket's directory {}", dir.display()))?.mode();
    if mode & 0o002 != 0 && mode & 0o1000 == 0 {
        anyhow::bail!(
            "the attach socket's directory {} is world-writable and not sticky: another user could replace the \
             socket; choose a directory only trusted users may write to",
            dir.display()
        );
    }
    Ok(())
}

/// Removes what is at `path` if it is a stale socket of this user's (no server answers on it);
/// refuses anything else.
fn take_over(path: &Path, existing: &std::fs::Metadata) -> anyhow::Result<()> {
    if !existing.file_type().is_socket() {
        anyhow::bail!("{} exists and is not a socket: refusing to replace it with the attach socket", path.display());
    }
    let me = rustix::process::geteuid().as_raw();
    if existing.uid() != me {
        anyhow::bail!(
            "the socket {} is owned by uid {}, not by this server's uid {me}: refusing to take it over",
            path.display(),
            existing.uid()
        );
    }
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        anyhow::bail!("another live server holds the attach socket {}", path.display());
    }
    // A socket file of ours nobody answers on is a previous server's: bind over it.
    std::fs::remove_file(path).with_context(|| format!("removing the stale attach socket {}", path.display()))
}

/// Descriptors kept for everything but attach connections (gRPC connections, loads, mapped
/// files): a quarter of the open-file limit, and at least this many.
const MIN_RESERVED_DESCRIPTORS: u64 = 64;

/// How many attach connections may be open at once: `--attach-max-clients`, lowered where the
/// open-file limit would leave too few descriptors for the rest of the server.
fn max_connections(max_clients: usize) -> usize {
    let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile).current.unwrap_or(u64::MAX);
    let reserved = (limit / 4).max(MIN_RESERVED_DESCRIPTORS);
    let fit = usize::try_from(limit.saturating_sub(reserved)).unwrap_or(usize::MAX).max(1);
    if fit < max_clients {
        tracing::warn!(
            max_clients,
            open_files_limit = limit,
            reserved,
            "attach connections capped at {fit} to keep descriptors for gRPC and loads"
        );
    }
    max_clients.min(fit)
}

/// How often accept failures and replaced connections are logged at most.
const LOG_EVERY: Duration = Duration::from_secs(5);
/// How long the accept loop waits after a failure; out of descriptors, it doubles up to the max.
const ACCEPT_RETRY: Duration = Duration::from_millis(50);
const ACCEPT_RETRY_MAX: Duration = Duration::from_secs(1);

/// Serves the bound socket until `stop`, then removes it.
pub async fn serve(bound: Bound, config: AttachConfig, manager: Arc<ModelManager>, stop: CancellationToken) {
    let Bound { listener, made } = bound;
    let places = Arc::new(Places::new(max_connections(config.max_clients)));
    let (mut retry, mut failures, accept_log) = (ACCEPT_RETRY, 0u64, LogThrottle::default());
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of descriptors the listener stays readable: retrying at once would spin.
                    let out_of_fds = [Errno::MFILE, Errno::NFILE].iter().any(|n| e.raw_os_error() == Some(n.raw_os_error()));
                    retry = if out_of_fds { (retry * 2).min(ACCEPT_RETRY_MAX) } else { ACCEPT_RETRY };
                    failures += 1;
                    if accept_log.allow(LOG_EVERY) {
                        tracing::warn!(cause = %e, failures, retry = ?retry, "accepting attach connections fails; backing off");
                        failures = 0;
                    }
                    tokio::select! { () = tokio::time::sleep(retry) => continue, () = stop.cancelled() => break }
                }
            },
            () = stop.cancelled() => break,
        };
        retry = ACCEPT_RETRY;
        let place = places.admit();
        let (manager, stop, config, places) = (manager.clone(), stop.clone(), config.clone(), places.clone());
        tokio::spawn(async move {
            match place {
                Some(place) => connection(stream, &manager, place, config.request_timeout, &stop).await,
                None => {
                    if places.log_now() {
                        tracing::warn!(max = places.max, "attach connection refused: too many clients hold leases");
                    }
                    let refusal = Status::resource_exhausted("too many attach connections open; try again later");
                    let _ = respond(&stream, &error_response(&refusal), &[]).await;
                }
            }
        });
    }
    made.remove();
}

/// The attach connections open: at most `max`. When every place is taken, a new connection takes
/// the place of the one that has waited longest without sending its request (as the gRPC listener
/// does with idle connections), so connections that never speak cannot lock out real clients;
/// when every connection holds a lease, the new one is refused.
#[derive(Debug)]
struct Places {
    max: usize,
    open: Mutex<Open>,
    /// Replacements and refusals, logged once every [`LOG_EVERY`].
    log: LogThrottle,
}

#[derive(Debug, Default)]
struct Open {
    next_id: u64,
    /// By age (ids grow): whether each is still waiting for its request, and its closer.
    connections: BTreeMap<u64, (bool, CancellationToken)>,
}

/// One connection's place, given back when dropped.
struct Place {
    id: u64,
    places: Arc<Places>,
    /// Cancelled when a newer connection takes this place before the request came.
    replaced: CancellationToken,
}

impl Places {
    fn new(max: usize) -> Self {
        Self { max, open: Mutex::new(Open::default()), log: LogThrottle::default() }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Open> {
        self.open.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn admit(self: &Arc<Self>) -> Option<Place> {
        let mut open = self.lock();
        if open.connections.len() >= self.max {
            let oldest_waiting = open.connections.iter().find(|(_, (waiting, _))| *waiting).map(|(&id, _)| id)?;
            if let Some((_, replaced)) = open.connections.remove(&oldest_waiting) {
                replaced.cancel();
            }
            metrics::counter!("model_loader_attach_connections_replaced_total").increment(1);
            if self.log.allow(LOG_EVERY) {
                tracing::info!(
                    max = self.max,
                    "attach connections at the cap: closing the one waiting longest for its request"
                );
            }
        }
        let (id, replaced) = (open.next_id, CancellationToken::new());
        open.next_id += 1;
        open.connections.insert(id, (true, replaced.clone()));
        Some(Place { id, places: self.clone(), replaced })
    }

    /// Whether to log a refusal now (not within [`LOG_EVERY`] of the last line).
    fn log_now(&self) -> bool {
        self.log.allow(LOG_EVERY)
    }
}

impl Place {
    /// The request came: no newer connection may take this place any more.
    fn requested(&self) {
        if let Some(entry) = self.places.lock().connections.get_mut(&self.id) {
            entry.0 = false;
        }
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        self.places.lock().connections.remove(&self.id);
    }
}

/// One client: its request, the lease and the answer, then the open connection until the client
/// goes, the lease is revoked or the server stops.
async fn connection(
    mut stream: UnixStream,
    manager: &ModelManager,
    place: Place,
    timeout: Duration,
    stop: &CancellationToken,
) {
    let peer = rustix::net::sockopt::socket_peercred(&stream).ok();
    let (pid, uid) = peer.map_or((0, 0), |p| (p.pid.as_raw_nonzero().get(), p.uid.as_raw()));
    let read = tokio::select! {
        read = tokio::time::timeout(timeout, read_request(&mut stream)) => read,
        () = place.replaced.cancelled() => return tracing::debug!(pid, uid, "attach connection replaced before its request"),
        () = stop.cancelled() => return,
    };
    let request = match read {
        Ok(Ok(request)) => request,
        Ok(Err(refusal)) => {
            tracing::info!(pid, uid, reason = %refusal.message(), "attach request refused");
            let _ = respond(&stream, &error_response(&refusal), &[]).await;
            return;
        }
        Err(_) => {
            tracing::info!(pid, uid, "attach client sent no request in time; closed");
            return;
        }
    };
    place.requested();
    let (lease, replica) = match lease(manager, &request).await {
        Ok(lease) => lease,
        Err(refusal) => {
            tracing::info!(pid, uid, model_id = %request.model_id, reason = %refusal.message(), "attach refused");
            let _ = respond(&stream, &error_response(&refusal), &[]).await;
            return;
        }
    };
    let (response, memories) = match answer(manager, &lease, request.include_files, replica) {
        Ok(answer) => answer,
        Err(refusal) => {
            let _ = respond(&stream, &error_response(&refusal), &[]).await;
            return;
        }
    };
    let fds: Vec<BorrowedFd<'_>> = memories.iter().map(|m| m.fd()).collect();
    let revoked = lease.revoked();
    // A client that does not read its answer must not hold the lease past a forced unload.
    let delivered = tokio::select! {
        sent = respond(&stream, &response, &fds) => sent.map_err(|e| e.to_string()),
        () = revoked.cancelled() => Err("the model was unloaded by force".to_owned()),
        () = stop.cancelled() => Err("the server is shutting down".to_owned()),
    };
    if let Err(cause) = delivered {
        tracing::info!(pid, uid, %cause, "attach answer not delivered");
        return;
    }
    let model_id = request.model_id.as_str();
    tracing::info!(pid, uid, model_id, clients = lease.clients(), "client attached");
    metrics::gauge!("model_loader_attached_clients").increment(1);
    let mut byte = [0u8; 1];
    let reason = tokio::select! {
        // The client sends nothing more: any byte, or the end, ends the lease.
        _ = stream.read(&mut byte) => "the client closed the connection",
        () = revoked.cancelled() => "the model was unloaded by force",
        () = stop.cancelled() => "the server is shutting down",
    };
    metrics::gauge!("model_loader_attached_clients").decrement(1);
    drop(lease);
    tracing::info!(pid, uid, model_id, reason, "client detached");
}

/// Reads and validates one request frame.
async fn read_request(stream: &mut UnixStream) -> Result<pb::AttachRequest, Status> {
    let mut len = [0u8; 4];
    let cut = |e: std::io::Error| Status::invalid_argument(format!("the request was cut short: {e}"));
    stream.read_exact(&mut len).await.map_err(cut)?;
    let len = u32::from_le_bytes(len);
    if len > wire::MAX_REQUEST_BYTES {
        return Err(Status::invalid_argument(format!("a request of {len} bytes; at most {}", wire::MAX_REQUEST_BYTES)));
    }
    let mut body = vec![0u8; len as usize];
    stream.read_exact(&mut body).await.map_err(cut)?;
    pb::AttachRequest::decode(body.as_slice())
        .map_err(|e| Status::invalid_argument(format!("the request is not an AttachRequest: {e}")))
}

/// The lease the request asks for, loading the model first where asked to. A device or dtype
/// the request names must be the resident model's, compared parsed ("cuda" is "cuda:0", "bf16"
/// is "BF16"), never as strings; an unparsable one is INVALID_ARGUMENT before anything loads.
/// For a model replicated on several GPUs, also the one replica the request names (a consumer
/// attaches the copy on its own GPU).
async fn lease(manager: &ModelManager, request: &pb::AttachRequest) -> Result<(Lease, Option<DeviceId>), Status> {
    // LoadModel's own conversion: the same checks and the same errors for the same fields.
    let asked = convert::load_request(pb::LoadModelRequest {
        model_id: request.model_id.clone(),
        revision: request.revision.clone(),
        device: request.device.clone(),
        dtype: request.dtype.clone(),
        ..Default::default()
    })?;
    let (id, device, dtype) = (asked.model_id.clone(), asked.device.clone(), asked.dtype);
    let load = request.load_if_needed.then_some(asked);
    let lease = manager.attach(&id, load).await.map_err(|e| status::from_manager(&e))?;
    let pipeline = lease.pipeline();
    // Every device the request lists must hold the model (`cuda:*`: any GPUs do).
    let listed: Vec<DeviceId> = match &device {
        Some(TargetRequest::Devices(devices)) => devices.iter().map(|d| d.id()).collect(),
        Some(TargetRequest::AllGpus) | None => Vec::new(),
    };
    if let Some(device) = listed.iter().copied().find(|&d| !pipeline.target.contains(d)) {
        let resident = &pipeline.target;
        return Err(Status::failed_precondition(format!("model {id} is resident on {resident}, not {device}")));
    }
    let replica = match listed.as_slice() {
        _ if !pipeline.is_replicated() => None,
        [one] => Some(*one),
        _ => {
            let target = &pipeline.target;
            return Err(Status::failed_precondition(format!(
                "model {id} has a copy on each of {target}: name the one device to attach ({})",
                target.first()
            )));
        }
    };
    if let Some(dtype) = dtype {
        let resident = pipeline.dtype_summary();
        if resident.parse::<TargetDtype>().ok() != Some(dtype) {
            let resident = if resident.is_empty() { "no tensors" } else { resident.as_str() };
            return Err(Status::failed_precondition(format!(
                "model {id} is resident as {resident}, not {dtype}: unload it first to load it so"
            )));
        }
    }
    Ok((lease, replica))
}

/// The answer for a lease: the model's status, its buffers, its tensors and its small files
/// (with their bytes when asked: at most `MAX_MODEL_FILES_BYTES`, 128 MiB, which with the tensor
/// table of the most tensors a model may have, about 25 MB, stays under the 256 MiB a client
/// reads, `wire::MAX_RESPONSE_BYTES`); and the memories whose descriptors go with it, in buffer
/// order.
fn answer<'a>(
    manager: &ModelManager,
    lease: &'a Lease,
    include_files: bool,
    replica: Option<DeviceId>,
) -> Result<(pb::AttachResponse, Vec<&'a dyn pipeline_manager::SharedMemory>), Status> {
    let pipeline = lease.pipeline();
    let mut memories: Vec<&dyn pipeline_manager::SharedMemory> = Vec::new();
    // Each buffer's device: the device of the tensors in it (a model split over GPUs has some
    // on each).
    let mut devices = Vec::new();
    let mut index: HashMap<i32, u32> = HashMap::new();
    let mut tensors = Vec::new();
    for (component, t) in pipeline.tensors().filter(|(_, t)| replica.is_none_or(|d| pipeline.device_of(t) == d)) {
        let name = pipeline_manager::tensor_name(&component.name, &t.name);
        let region = t.data.region().ok_or_else(|| {
            Status::failed_precondition(format!(
                "tensor {name} of {} is not in memory another process can map: it was loaded without the attach \
                 socket's placements",
                pipeline.model_id
            ))
        })?;
        let buffer = *index.entry(region.memory.fd().as_raw_fd()).or_insert_with(|| {
            memories.push(region.memory);
            devices.push(pipeline.device_of(t));
            (memories.len() - 1) as u32
        });
        tensors.push(pb::AttachedTensor {
            name,
            dtype: t.dtype_name().into(),
            shape: t.data.shape().iter().map(|&d| d as u64).collect(),
            buffer,
            offset: region.offset,
            size_bytes: t.size_bytes(),
            file: pipeline.weight_file(t).to_owned(),
        });
    }
    tensors.sort_unstable_by(|a, b| a.name.cmp(&b.name));
    let buffers = memories
        .iter()
        .zip(&devices)
        .map(|(m, device)| pb::AttachedBuffer {
            kind: match m.kind() {
                MemoryKind::HostMemfd => pb::BufferKind::HostMemfd,
                MemoryKind::HostFile => pb::BufferKind::HostFile,
                MemoryKind::CudaVmm => pb::BufferKind::CudaVmm,
            } as i32,
            device: device.to_string(),
            size_bytes: m.size(),
        })
        .collect();
    let status = manager.get(&pipeline.model_id).map(convert::status).ok();
    let files = pipeline.files.iter().map(|f| convert::model_file(f, include_files)).collect();
    Ok((pb::AttachResponse { code: 0, message: String::new(), status, buffers, tensors, files }, memories))
}

fn error_response(status: &Status) -> pb::AttachResponse {
    let code = if status.code() == Code::Ok { Code::Internal } else { status.code() };
    pb::AttachResponse { code: code as i32, message: status.message().to_owned(), ..Default::default() }
}

/// Sends one response frame, `fds` with its first bytes ([`wire::pieces`]: [`wire::MAX_FDS`] a
/// message).
async fn respond(stream: &UnixStream, response: &pb::AttachResponse, fds: &[BorrowedFd<'_>]) -> std::io::Result<()> {
    let frame = wire::encode(response);
    for (bytes, fds) in wire::pieces(&frame, fds)? {
        let mut sent = stream.async_io(Interest::WRITABLE, || wire::send(stream.as_fd(), bytes, fds)).await?;
        while sent < bytes.len() {
            sent += stream.async_io(Interest::WRITABLE, || wire::send_rest(stream.as_fd(), &bytes[sent..])).await?;
        }
    }
    Ok(())
}
