//! Workspace-level tests of model-loader: a helper that runs the server in process on
//! `127.0.0.1:0`, a test hub, certificates made by openssl, and gRPC client helpers; the fixture
//! models, the real binary and the object stores come from the `fixtures` crate, re-exported here.
//!
//! The tests themselves live in `tests/tests/`; nothing here downloads anything.

pub mod hub;
pub mod otlp;
pub mod tls;

pub use fixtures::{POLL, WAIT, binary, eventually, fixture, peak_rss_bytes, rss_bytes, stores};

use std::{net::SocketAddr, path::Path, time::Duration};

use model_manager::ManagerConfig;
use proto::v1::{self as pb, model_loader_client::ModelLoaderClient};
use server::{LogFormat, ServerConfig};
use tokio::{sync::oneshot, task::JoinHandle};
use tokio_stream::StreamExt;
use tonic::{Status, transport::Channel};

/// A server configuration for tests: the given model root, no HF cache, everything else default.
pub fn config(model_root: &Path) -> ServerConfig {
    let mut manager = ManagerConfig::default();
    manager.loader.sources.model_root = Some(model_root.to_owned());
    manager.loader.sources.offline = true;
    ServerConfig {
        listen: ([127, 0, 0, 1], 0).into(),
        manager,
        preload: Vec::new(),
        shutdown_grace: Duration::from_secs(10),
        log_format: LogFormat::Text,
        otlp: None,
        metrics_listen: None,
        attach: None,
        security: server::SecurityConfig::default(),
    }
}

/// `config` with the attach socket served at `socket` (and loads placed for attach).
pub fn with_attach(mut config: ServerConfig, socket: &Path) -> ServerConfig {
    config.manager.loader.exportable = true;
    config.attach = Some(server::attach::AttachConfig {
        path: socket.to_owned(),
        mode: 0o660,
        max_clients: 2048,
        request_timeout: Duration::from_secs(10),
    });
    config
}

/// A server running in this process on `127.0.0.1:0`.
pub struct TestServer {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

impl TestServer {
    /// Binds port 0 and serves `config` until [`TestServer::stop`].
    pub async fn start(config: ServerConfig) -> Self {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await.expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local addr");
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(server::run(config, listener, async {
            let _ = stopped.await;
        }));
        Self { addr, stop: Some(stop), task: Some(task) }
    }

    pub async fn client(&self) -> ModelLoaderClient<Channel> {
        connect(self.addr).await
    }

    pub fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.addr)).expect("uri").connect_lazy()
    }

    /// Shuts the server down and surfaces its error or panic in the test.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            match tokio::time::timeout(WAIT, task).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => panic!("server failed: {e:#}"),
                Ok(Err(join)) => std::panic::resume_unwind(join.into_panic()),
                Err(_) => panic!("server did not stop within {WAIT:?}"),
            }
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// A client of the server at `addr` (connects lazily; the listener is already bound). Every call
/// gets its answer (a unary call's reply, a stream's headers) within [`WAIT`] or fails with
/// DEADLINE_EXCEEDED, so a deadlock fails the test that hit it instead of hanging the run.
pub async fn connect(addr: SocketAddr) -> ModelLoaderClient<Channel> {
    let channel = Channel::from_shared(format!("http://{addr}")).expect("uri").timeout(WAIT).connect_lazy();
    ModelLoaderClient::new(channel).max_decoding_message_size(64 << 20)
}

/// The table of steps as a client must see it: (step, message, phase), written here apart from
/// the `steps` crate's so that the tests check it.
pub const STEPS: [(u32, &str, pb::ModelLoadPhase); 8] = [
    (1, "Initializing model loader...", pb::ModelLoadPhase::Initialization),
    (2, "Checking model cache...", pb::ModelLoadPhase::Initialization),
    (3, "Building loading strategies...", pb::ModelLoadPhase::Initialization),
    (4, "Loading model weights...", pb::ModelLoadPhase::Loading),
    (5, "Model weights loaded", pb::ModelLoadPhase::Loading),
    (6, "Moving model to device...", pb::ModelLoadPhase::Device),
    (7, "Applying optimizations...", pb::ModelLoadPhase::Optimization),
    (8, "Finalizing model...", pb::ModelLoadPhase::Finalization),
];

/// The phase as the log line spells it (`phase=initialization`).
pub fn phase_name(phase: pb::ModelLoadPhase) -> &'static str {
    match phase {
        pb::ModelLoadPhase::Initialization => "initialization",
        pb::ModelLoadPhase::Loading => "loading",
        pb::ModelLoadPhase::Device => "device",
        pb::ModelLoadPhase::Optimization => "optimization",
        pb::ModelLoadPhase::Finalization => "finalization",
        pb::ModelLoadPhase::Unspecified => "unspecified",
    }
}

/// Opens a LoadModel stream (the server has started or joined the load once this returns).
pub async fn open_load(
    client: &mut ModelLoaderClient<Channel>,
    request: pb::LoadModelRequest,
) -> tonic::Streaming<pb::ModelLoadProgress> {
    let id = request.model_id.clone();
    tokio::time::timeout(WAIT, client.load_model(request))
        .await
        .expect("LoadModel answers")
        .unwrap_or_else(|e| panic!("LoadModel {id}: {e:?}"))
        .into_inner()
}

/// Loads to its end and insists it succeeded at step 8; returns its messages.
pub async fn load_ok(
    client: &mut ModelLoaderClient<Channel>,
    request: pb::LoadModelRequest,
) -> Vec<pb::ModelLoadProgress> {
    let id = request.model_id.clone();
    let (messages, end) = load_all(client, request).await;
    end.unwrap_or_else(|e| panic!("loading {id}: {e:?}; messages {messages:?}"));
    assert_eq!(messages.last().map(|m| m.step), Some(8), "{id}: the last message is step 8: {messages:?}");
    messages
}

/// Reads `stream` until a message for which `stop` holds; returns every message read, that one
/// last. Panics if the stream fails or ends first, or nothing comes within [`WAIT`].
pub async fn read_until(
    stream: &mut tonic::Streaming<pb::ModelLoadProgress>,
    what: &str,
    stop: impl Fn(&pb::ModelLoadProgress) -> bool,
) -> Vec<pb::ModelLoadProgress> {
    let mut messages = Vec::new();
    loop {
        let next = tokio::time::timeout(WAIT, stream.next())
            .await
            .unwrap_or_else(|_| panic!("{what}: no message within {WAIT:?}; so far {messages:?}"));
        match next {
            Some(Ok(m)) => {
                let done = stop(&m);
                messages.push(m);
                if done {
                    return messages;
                }
            }
            Some(Err(status)) => panic!("{what}: the stream failed first: {status:?}; messages {messages:?}"),
            None => panic!("{what}: the stream ended first; messages {messages:?}"),
        }
    }
}

/// Starts a load of `id` and returns its stream once it is reading weights (step 4, bytes moving
/// and not yet all read).
pub async fn load_until_step4(
    client: &mut ModelLoaderClient<Channel>,
    id: &str,
) -> tonic::Streaming<pb::ModelLoadProgress> {
    let mut stream = open_load(client, load(id)).await;
    let messages = read_until(&mut stream, &format!("{id}: step 4"), |m| {
        assert!(m.step <= 4, "the load went past step 4: {m:?}");
        m.step == 4 && m.bytes_done > 0
    })
    .await;
    let last = messages.last().expect("a message");
    assert!(last.bytes_done < last.bytes_total, "the load finished step 4 before the test could act: {last:?}");
    stream
}

/// Reads a LoadModel stream to its end: the messages still to come and how it ended.
pub async fn end_of(
    mut stream: tonic::Streaming<pb::ModelLoadProgress>,
) -> (Vec<pb::ModelLoadProgress>, Result<(), Status>) {
    rest_of(&mut stream).await
}

/// Opens WatchModels (empty `id`: every model); the server has subscribed once this returns.
pub async fn watch(client: &mut ModelLoaderClient<Channel>, id: &str) -> tonic::Streaming<pb::ModelEvent> {
    tokio::time::timeout(WAIT, client.watch_models(pb::WatchModelsRequest { model_id: id.into() }))
        .await
        .expect("WatchModels answers")
        .expect("WatchModels")
        .into_inner()
}

/// The next event of a watch stream, which must come within [`WAIT`] and must not end the stream.
pub async fn next_event(stream: &mut tonic::Streaming<pb::ModelEvent>) -> pb::model_event::Event {
    let message = tokio::time::timeout(WAIT, stream.message())
        .await
        .expect("an event within the wait")
        .expect("the watch stream does not fail")
        .expect("the watch stream stays open");
    message.event.expect("an event holds a status or a progress message")
}

/// The next event, which must be a status.
pub async fn next_status(stream: &mut tonic::Streaming<pb::ModelEvent>) -> pb::ModelStatus {
    match next_event(stream).await {
        pb::model_event::Event::Status(status) => status,
        pb::model_event::Event::Progress(p) => panic!("expected a status, got progress {p:?}"),
    }
}

/// Reads events until a status of `id` in `state` for which `also` holds; returns every event read.
pub async fn until_status(
    stream: &mut tonic::Streaming<pb::ModelEvent>,
    id: &str,
    state: pb::ModelState,
    also: impl Fn(&pb::ModelStatus) -> bool,
) -> Vec<pb::model_event::Event> {
    let mut events = Vec::new();
    loop {
        let event = next_event(stream).await;
        let done =
            matches!(&event, pb::model_event::Event::Status(s) if s.model_id == id && s.state() == state && also(s));
        events.push(event);
        if done {
            return events;
        }
    }
}

/// Bytes this process has read through read(2)/pread(2) and friends so far (`rchar` of
/// /proc/self/io): file reads of the in-process server included, page cache or not.
pub fn rchar() -> u64 {
    let io = std::fs::read_to_string("/proc/self/io").expect("read /proc/self/io");
    io.lines()
        .find_map(|l| l.strip_prefix("rchar:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("an rchar line in /proc/self/io")
}

/// A LoadModel request for `id` with defaults.
pub fn load(id: &str) -> pb::LoadModelRequest {
    pb::LoadModelRequest { model_id: id.into(), ..Default::default() }
}

/// Runs LoadModel to its end: every message received and how the stream ended.
pub async fn load_all(
    client: &mut ModelLoaderClient<Channel>,
    request: pb::LoadModelRequest,
) -> (Vec<pb::ModelLoadProgress>, Result<(), Status>) {
    let mut stream = match tokio::time::timeout(WAIT, client.load_model(request)).await.expect("LoadModel answers") {
        Ok(response) => response.into_inner(),
        Err(status) => return (Vec::new(), Err(status)),
    };
    rest_of(&mut stream).await
}

/// Reads a LoadModel stream to its end: the messages still to come and how it ended.
pub async fn rest_of(
    stream: &mut tonic::Streaming<pb::ModelLoadProgress>,
) -> (Vec<pb::ModelLoadProgress>, Result<(), Status>) {
    let mut messages = Vec::new();
    loop {
        match tokio::time::timeout(WAIT, stream.next()).await.expect("the load stream moves") {
            Some(Ok(m)) => messages.push(m),
            Some(Err(status)) => return (messages, Err(status)),
            None => return (messages, Ok(())),
        }
    }
}

/// ListTensors with checksums of a loaded model, as name → (dtype, shape, sha256), the form of
/// [`fixture::Expected::tensors`].
pub async fn checksums(
    client: &mut ModelLoaderClient<Channel>,
    id: &str,
) -> std::collections::BTreeMap<String, (String, Vec<u64>, String)> {
    let request = pb::ListTensorsRequest { model_id: id.into(), with_checksums: true };
    let tensors = tokio::time::timeout(WAIT, client.list_tensors(request))
        .await
        .expect("ListTensors answers")
        .expect("ListTensors")
        .into_inner()
        .tensors;
    tensors.into_iter().map(|t| (t.name, (t.dtype, t.shape, t.sha256))).collect()
}

/// A server on `root` (the test configuration) and a client of it.
pub async fn serve(root: &Path) -> (TestServer, ModelLoaderClient<Channel>) {
    let server = TestServer::start(config(root)).await;
    let client = server.client().await;
    (server, client)
}

/// Asserts `result` failed with `code`, and returns the status.
pub fn expect_code<T: std::fmt::Debug>(result: Result<T, Status>, code: tonic::Code, what: &str) -> Status {
    let status = result.expect_err(&format!("{what} must fail with {code:?}"));
    assert_eq!(status.code(), code, "{what}: {status:?}");
    status
}

/// GetModel of `id`: FAILED, with an error that contains every one of `needles`, nothing resident.
pub async fn assert_failed_with(
    client: &mut ModelLoaderClient<Channel>,
    id: &str,
    needles: &[&str],
) -> pb::ModelStatus {
    let status = get_model(client, id).await;
    assert_eq!(status.state(), pb::ModelState::Failed, "{status:?}");
    assert!(!status.error.is_empty(), "a FAILED model says why: {status:?}");
    for needle in needles {
        assert!(status.error.contains(needle), "{id}: error {:?} should name {needle:?}", status.error);
    }
    assert_eq!(status.weight_bytes, 0, "nothing of a failed load is resident: {status:?}");
    status
}

/// Nothing is resident or reserved on the CPU (waited for: a failed load frees what it held just
/// after its streams end).
pub async fn assert_nothing_resident(client: &mut ModelLoaderClient<Channel>) -> pb::DeviceResources {
    let cpu = cpu_resources_when(client, |cpu| cpu.used_bytes == 0 && cpu.reserved_bytes == 0).await;
    assert!(cpu.models.is_empty(), "{cpu:?}");
    cpu
}

/// GetModel of `id`, answered within [`WAIT`].
pub async fn get_model(client: &mut ModelLoaderClient<Channel>, id: &str) -> pb::ModelStatus {
    tokio::time::timeout(WAIT, client.get_model(pb::GetModelRequest { model_id: id.into() }))
        .await
        .expect("GetModel answers")
        .expect("GetModel")
        .into_inner()
}

/// GetModel's state for `id`.
pub async fn state_of(client: &mut ModelLoaderClient<Channel>, id: &str) -> pb::ModelState {
    let status = get_model(client, id).await;
    status.state()
}

/// The CPU entry of GetResources.
pub async fn cpu_resources(client: &mut ModelLoaderClient<Channel>) -> pb::DeviceResources {
    device_resources(client, "cpu").await
}

/// GetResources' entry for `device` ("cpu", "cuda:0").
pub async fn device_resources(client: &mut ModelLoaderClient<Channel>, device: &str) -> pb::DeviceResources {
    let devices = tokio::time::timeout(WAIT, client.get_resources(pb::GetResourcesRequest {}))
        .await
        .expect("GetResources answers")
        .expect("GetResources")
        .into_inner()
        .devices;
    devices.into_iter().find(|d| d.name == device).unwrap_or_else(|| panic!("no device {device}"))
}

/// GetResources' CPU entry once `done` holds of it, asked again every few milliseconds for at most
/// [`WAIT`]: the memory of a failed or cancelled load is freed (and booked as leaving until then)
/// just after its streams end, so "all memory is back" is something to wait for, briefly.
pub async fn cpu_resources_when(
    client: &mut ModelLoaderClient<Channel>,
    done: impl Fn(&pb::DeviceResources) -> bool,
) -> pb::DeviceResources {
    let mut last = None;
    eventually!(
        done(last.insert(cpu_resources(client).await)),
        "GetResources never got there within {WAIT:?}: {last:?}"
    );
    last.expect("asked at least once")
}

/// Bytes as MiB, for messages.
pub fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1 << 20) as f64
}
