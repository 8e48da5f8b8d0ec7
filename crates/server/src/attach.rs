//! The attach socket (`--attach-socket`): a Unix socket beside gRPC where a process attaches to a
//! LOADED model and receives its memory's file descriptors (SCM_RIGHTS) and every tensor's place
//! in them. The connection is the lease: the model stays resident while it is open; a forced
//! unload or shutdown closes it. The wire is `attach::wire`; the messages are in the proto.

use std::{
    collections::HashMap,
    os::{
        fd::{AsFd, AsRawFd, BorrowedFd},
        unix::fs::PermissionsExt,
    },
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use anyhow::Context;
use attach::wire;
use model_manager::{ModelManager, pipeline_manager::Lease};
use pipeline_manager::MemoryKind;
use prost::Message;
use proto::v1 as pb;
use tokio::{
    io::{AsyncReadExt, Interest},
    net::{UnixListener, UnixStream},
    sync::Semaphore,
};
use tokio_util::sync::CancellationToken;
use tonic::{Code, Status};

use crate::{convert, status};

/// The attach socket's settings.
#[derive(Debug, Clone)]
pub struct AttachConfig {
    pub path: PathBuf,
    /// Its permissions (0660 unless set): who may attach.
    pub mode: u32,
    /// Connections open at once; past it, RESOURCE_EXHAUSTED.
    pub max_clients: usize,
    /// How long a client may take to send its request before the server closes the connection.
    pub request_timeout: Duration,
}

/// Binds the socket, replacing a stale one and refusing one a live server holds.
pub fn bind(config: &AttachConfig) -> anyhow::Result<UnixListener> {
    let path = &config.path;
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        anyhow::bail!("another live server holds the attach socket {}", path.display());
    }
    // A socket file nobody answers on is a previous server's: bind over it.
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path).with_context(|| format!("binding the attach socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(config.mode))
        .with_context(|| format!("setting the mode of {}", path.display()))?;
    tracing::info!(path = %path.display(), mode = format!("{:o}", config.mode), "serving the attach socket");
    Ok(listener)
}

/// Serves the bound socket until `stop`, then removes it.
pub async fn serve(listener: UnixListener, config: AttachConfig, manager: Arc<ModelManager>, stop: CancellationToken) {
    let path = &config.path;
    let slots = Arc::new(Semaphore::new(config.max_clients));
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(cause = %e, "accepting an attach connection");
                    continue;
                }
            },
            () = stop.cancelled() => break,
        };
        let (manager, stop, slot) = (manager.clone(), stop.clone(), slots.clone().try_acquire_owned());
        let config = config.clone();
        tokio::spawn(async move {
            match slot {
                Ok(_slot) => connection(stream, &manager, config.request_timeout, &stop).await,
                Err(_) => {
                    tracing::warn!(max = config.max_clients, "attach connection refused: too many clients");
                    let refusal = Status::resource_exhausted("too many attach connections open; try again later");
                    let _ = respond(&stream, &error_response(&refusal), &[]).await;
                }
            }
        });
    }
    let _ = std::fs::remove_file(path);
}

/// One client: its request, the lease and the answer, then the open connection until the client
/// goes, the lease is revoked or the server stops.
async fn connection(mut stream: UnixStream, manager: &ModelManager, timeout: Duration, stop: &CancellationToken) {
    let peer = rustix::net::sockopt::socket_peercred(&stream).ok();
    let (pid, uid) = peer.map_or((0, 0), |p| (p.pid.as_raw_nonzero().get(), p.uid.as_raw()));
    let request = match tokio::time::timeout(timeout, read_request(&mut stream)).await {
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
    let lease = match lease(manager, &request).await {
        Ok(lease) => lease,
        Err(refusal) => {
            tracing::info!(pid, uid, model_id = %request.model_id, reason = %refusal.message(), "attach refused");
            let _ = respond(&stream, &error_response(&refusal), &[]).await;
            return;
        }
    };
    let (response, memories) = match answer(manager, &lease) {
        Ok(answer) => answer,
        Err(refusal) => {
            let _ = respond(&stream, &error_response(&refusal), &[]).await;
            return;
        }
    };
    let fds: Vec<BorrowedFd<'_>> = memories.iter().map(|m| m.fd()).collect();
    if let Err(e) = respond(&stream, &response, &fds).await {
        tracing::info!(pid, uid, cause = %e, "attach answer not delivered");
        return;
    }
    let model_id = request.model_id.as_str();
    tracing::info!(pid, uid, model_id, clients = lease.clients(), "client attached");
    metrics::gauge!("model_loader_attached_clients").increment(1);
    let revoked = lease.revoked();
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

/// The lease the request asks for, loading the model first where asked to.
async fn lease(manager: &ModelManager, request: &pb::AttachRequest) -> Result<Lease, Status> {
    let id = convert::model_id(&request.model_id)?;
    let load = match request.load_if_needed {
        true => Some(convert::load_request(pb::LoadModelRequest {
            model_id: request.model_id.clone(),
            revision: request.revision.clone(),
            device: request.device.clone(),
            dtype: None,
        })?),
        false => None,
    };
    let lease = manager.attach(&id, load).await.map_err(|e| status::from_manager(&e))?;
    if let Some(device) = request.device.as_deref().filter(|d| !d.is_empty()) {
        let resident = lease.pipeline().device.to_string();
        if resident != device {
            let asked: String = device.chars().take(40).collect();
            return Err(Status::failed_precondition(format!("model {id} is resident on {resident}, not {asked}")));
        }
    }
    Ok(lease)
}

/// The answer for a lease: the model's status, its buffers and its tensors; and the memories
/// whose descriptors go with it, in buffer order.
fn answer<'a>(
    manager: &ModelManager,
    lease: &'a Lease,
) -> Result<(pb::AttachResponse, Vec<&'a dyn pipeline_manager::SharedMemory>), Status> {
    let pipeline = lease.pipeline();
    let mut memories: Vec<&dyn pipeline_manager::SharedMemory> = Vec::new();
    let mut index: HashMap<i32, u32> = HashMap::new();
    let mut tensors = Vec::new();
    for (component, t) in pipeline.tensors() {
        let name = if component.name.is_empty() { t.name.clone() } else { format!("{}/{}", component.name, t.name) };
        let region = t.data.region().ok_or_else(|| {
            Status::failed_precondition(format!(
                "tensor {name} of {} is not in memory another process can map: it was loaded without the attach \
                 socket's placements",
                pipeline.model_id
            ))
        })?;
        let buffer = *index.entry(region.memory.fd().as_raw_fd()).or_insert_with(|| {
            memories.push(region.memory);
            (memories.len() - 1) as u32
        });
        tensors.push(pb::AttachedTensor {
            name,
            dtype: t.dtype_name().into(),
            shape: t.data.shape().iter().map(|&d| d as u64).collect(),
            buffer,
            offset: region.offset,
            size_bytes: t.size_bytes(),
        });
    }
    tensors.sort_unstable_by(|a, b| a.name.cmp(&b.name));
    let device = pipeline.device.to_string();
    let buffers = memories
        .iter()
        .map(|m| pb::AttachedBuffer {
            kind: match m.kind() {
                MemoryKind::HostMemfd => pb::BufferKind::HostMemfd,
                MemoryKind::HostFile => pb::BufferKind::HostFile,
                MemoryKind::CudaVmm => pb::BufferKind::CudaVmm,
            } as i32,
            device: device.clone(),
            size_bytes: m.size(),
        })
        .collect();
    let status = manager.get(&pipeline.model_id).map(convert::status).ok();
    Ok((pb::AttachResponse { code: 0, message: String::new(), status, buffers, tensors }, memories))
}

fn error_response(status: &Status) -> pb::AttachResponse {
    let code = if status.code() == Code::Ok { Code::Internal } else { status.code() };
    pb::AttachResponse { code: code as i32, message: status.message().to_owned(), ..Default::default() }
}

/// Sends one response frame, `fds` with its first bytes.
async fn respond(stream: &UnixStream, response: &pb::AttachResponse, fds: &[BorrowedFd<'_>]) -> std::io::Result<()> {
    let frame = wire::encode(response);
    let mut sent = stream.async_io(Interest::WRITABLE, || wire::send(stream.as_fd(), &frame, fds)).await?;
    while sent < frame.len() {
        sent += stream.async_io(Interest::WRITABLE, || wire::send_rest(stream.as_fd(), &frame[sent..])).await?;
    }
    Ok(())
}
