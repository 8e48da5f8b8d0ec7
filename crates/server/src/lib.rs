//! The `model-loader` server: the tonic service over the [`ModelManager`] facade (gRPC, and
//! gRPC-web for browsers on the same port), the KServe v2 model-repository protocol beside it,
//! gRPC health and reflection, configuration from flags, logs, traces over OTLP, and graceful
//! shutdown.
//!
//! This is the only crate that knows tonic's server side or parses flags. It holds no model
//! logic: every request is converted, handed to the facade, and its answer converted back.

pub mod attach;
mod auth;
pub mod cli;
pub mod connections;
mod convert;
mod dashboard;
mod health;
mod kserve;
mod logs;
pub mod metrics;
mod service;
mod status;
mod throttle;
mod tls;
pub mod traces;
pub mod web;

use std::{future::Future, sync::Arc};

use anyhow::Context;
use model_manager::ModelManager;
use proto::{
    inference::grpc_inference_service_server::GrpcInferenceServiceServer, v1::model_loader_server::ModelLoaderServer,
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::transport::Server;
use tonic_health::server::HealthReporter;
use tower::layer::util::{Identity, Stack};

pub use crate::{
    cli::{Cli, LogFormat, SecurityConfig, ServerConfig},
    logs::init_tracing,
    service::ModelLoaderService,
    tls::TlsFiles,
};

/// The largest request message decoded: every request is an id and a few options.
const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// HTTP/2 pings on every connection this often, and the peer's answer waited for this long.
const KEEPALIVE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(30);
const KEEPALIVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);

/// Raises the soft open-file limit to the hard one, as most servers do: every gRPC and attach
/// connection, load and mapped model file holds a descriptor, and the usual soft 1,024 is soon
/// reached. Logs the limit it serves with.
pub fn raise_open_files_limit() {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    if limit.current == limit.maximum {
        return tracing::info!(limit = ?limit.current, "open-file limit");
    }
    match setrlimit(Resource::Nofile, Rlimit { current: limit.maximum, maximum: limit.maximum }) {
        Ok(()) => {
            tracing::info!(from = ?limit.current, to = ?limit.maximum, "raised the open-file limit to the hard limit")
        }
        Err(e) => {
            tracing::warn!(limit = ?limit.current, hard = ?limit.maximum, cause = %e, "could not raise the open-file limit")
        }
    }
}

/// Resolves on the first SIGTERM or SIGINT. The handlers are installed by this call, not at the
/// future's first poll: `run` polls it only once it serves, and a signal in between would
/// otherwise kill the process without a drain. Call it within the runtime.
pub fn shutdown_signal() -> impl Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler succeeds at start-up");
    let mut int = signal(SignalKind::interrupt()).expect("installing a SIGINT handler succeeds at start-up");
    async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = int.recv() => tracing::info!("SIGINT received"),
        }
    }
}

/// Serves on `listener` until `shutdown` resolves, then drains: readiness NOT_SERVING, new loads
/// refused, loads in flight cancelled (their streams end), watch streams ended, models dropped,
/// connections closed, all within the configured grace.
pub async fn run(
    config: ServerConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    // The one cancellation root of the process: the loads' and the watch streams' tokens are its
    // children (stopped in order by `ModelManager::shutdown`), and cancelling it stops serving.
    let root = CancellationToken::new();
    let manager = Arc::new(ModelManager::new(config.manager.clone(), &root).context("building the model manager")?);
    // Bound before gRPC answers, so a client that sees the server up finds the socket.
    let attach_listener = match &config.attach {
        Some(attach) => Some((attach::bind(attach)?, attach.clone())),
        None => None,
    };
    let (health, health_service, end_health_watches) = health::service();
    health.set_not_serving::<ModelLoaderServer<ModelLoaderService>>().await;
    let preload = tokio::spawn(preload(manager.clone(), health.clone(), config.preload.clone()));
    let (reflection_v1, reflection_v1alpha) = reflection()?;

    let addr = listener.local_addr().context("reading the listening address")?;
    let security = &config.security;
    let tokens =
        security.auth_token_file.as_deref().map(auth::Tokens::load).transpose().context("--auth-token-file")?;
    // Always handled: SIGHUP's default action would kill the server.
    let _reload_on_sighup = AbortOnDrop(auth::reload_on_sighup(tokens.clone())?);
    if tokens.is_none() && !addr.ip().is_loopback() {
        tracing::warn!(%addr, "listening beyond loopback without --auth-token-file: anyone who reaches it can load and unload models");
    }
    let tls = tls::TlsAcceptor::for_flags(security.tls.clone())?;
    let connections = Arc::new(connections::Registry::default());
    let incoming =
        connections::incoming(listener, security.connections, tls.clone(), connections.clone(), root.child_token());
    let service = ModelLoaderServer::new(ModelLoaderService::new(manager.clone(), security.max_watchers))
        .max_decoding_message_size(MAX_REQUEST_BYTES);
    let inference = inference_service(&manager, &health);
    let server = Server::builder()
        // gRPC-web from browsers comes over HTTP/1.1 as often as HTTP/2.
        .accept_http1(true)
        .max_concurrent_streams(Some(security.max_streams_per_connection))
        // Long streams (a load's progress, WatchModels) across proxies and NATs: pings keep the
        // connection's state alive and find a peer that vanished.
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        .layer(layers(tokens.clone(), &web::Origins::new(tls.is_some(), &security.cors_origins), security.dashboard))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(service)
        .add_service(inference)
        .serve_with_incoming_shutdown(incoming, root.clone().cancelled_owned());
    let mut server = tokio::spawn(server);
    log_memory(&manager, &config);
    tracing::info!(
        %addr,
        tls = tls.is_some(),
        mtls = security.tls.as_ref().is_some_and(|t| t.client_ca.is_some()),
        auth = tokens.is_some(),
        max_connections = security.connections.max_connections,
        "serving modelloader.v1.ModelLoader and inference.GRPCInferenceService"
    );
    // Stops serving /metrics however `run` ends.
    let _metrics = serve_metrics(&config, &manager).await?.map(AbortOnDrop);
    // The attach socket closes its connections and goes when the root is cancelled.
    let mut attach = attach_listener.map(|(listener, attach)| {
        AbortOnDrop(tokio::spawn(attach::serve(listener, attach, manager.clone(), root.child_token())))
    });

    tokio::select! {
        result = &mut server => return result.context("server task")?.context("serving"),
        () = shutdown => {}
    }

    let deadline = tokio::time::Instant::now() + config.shutdown_grace;
    tracing::info!(grace = ?config.shutdown_grace, "shutting down");
    health.set_not_serving::<ModelLoaderServer<ModelLoaderService>>().await;
    end_health_watches.cancel();
    preload.abort();
    if tokio::time::timeout_at(deadline, manager.shutdown()).await.is_err() {
        tracing::warn!("loads did not end within the shutdown grace");
    }
    root.cancel();
    match tokio::time::timeout_at(deadline, &mut server).await {
        Ok(result) => result.context("server task")?.context("serving")?,
        Err(_) => {
            tracing::warn!("connections still open at the end of the shutdown grace; closing them");
            server.abort();
        }
    }
    // The attach task removes its socket once it sees the cancel: let it, rather than abort it
    // first when `run` returns.
    if let Some(attach) = attach.as_mut() {
        let _ = tokio::time::timeout_at(deadline, &mut attach.0).await;
    }
    tracing::info!("shut down");
    Ok(())
}

/// The KServe v2 service over the same facade, its readiness that of `modelloader.v1`.
fn inference_service(
    manager: &Arc<ModelManager>,
    health: &HealthReporter,
) -> GrpcInferenceServiceServer<kserve::InferenceService> {
    let health = tonic_health::server::HealthService::from_health_reporter(health.clone());
    GrpcInferenceServiceServer::new(kserve::InferenceService::new(manager.clone(), health))
        .max_decoding_message_size(MAX_REQUEST_BYTES)
}

/// The layers in front of every service, outermost first.
type Layers = tower::ServiceBuilder<
    Stack<
        auth::RequireToken,
        Stack<
            traces::RpcSpans,
            Stack<
                tonic_web::GrpcWebLayer,
                Stack<
                    tower_http::cors::CorsLayer,
                    Stack<web::RequireOrigin, Stack<dashboard::ServePage, Stack<connections::CountRequests, Identity>>>,
                >,
            >,
        >,
    >,
>;

/// The layers in front of every service: connection accounting, the dashboard page (GET), then
/// the browser's origin checks, gRPC-web's translation, each call's span for traces (every call
/// as gRPC, refusals included), and auth inside it (so a refusal reaches a browser as a
/// gRPC-web status).
fn layers(tokens: Option<auth::Tokens>, origins: &web::Origins, dashboard: bool) -> Layers {
    tower::ServiceBuilder::new()
        .layer(connections::CountRequests)
        .layer(dashboard::ServePage(dashboard.then(dashboard::Page::embedded)))
        .layer(web::RequireOrigin(origins.clone()))
        .layer(origins.cors())
        .layer(tonic_web::GrpcWebLayer::new())
        .layer(traces::rpc_spans())
        .layer(auth::RequireToken(tokens))
}

/// Both reflection versions, each knowing every service (grpcurl 1.8 speaks only v1alpha).
fn reflection() -> anyhow::Result<(
    tonic_reflection::server::v1::ServerReflectionServer<impl tonic_reflection::server::v1::ServerReflection>,
    tonic_reflection::server::v1alpha::ServerReflectionServer<impl tonic_reflection::server::v1alpha::ServerReflection>,
)> {
    let builder = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(proto::INFERENCE_FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET)
    };
    let v1 = builder().build_v1().context("building reflection v1")?;
    let v1alpha = builder().build_v1alpha().context("building reflection v1alpha")?;
    Ok((v1, v1alpha))
}

/// One line per device: its capacity and budget, and how loads use it.
fn log_memory(manager: &ModelManager, config: &ServerConfig) {
    for device in manager.resources() {
        tracing::info!(
            device = %device.device,
            capacity = device.total_bytes,
            budget = device.budget_bytes,
            evict = %config.manager.loader.evict,
            max_concurrent_loads = config.manager.loader.max_concurrent_loads,
            "memory"
        );
    }
}

/// `/metrics` on `--metrics-listen`, if set.
async fn serve_metrics(
    config: &ServerConfig,
    manager: &Arc<ModelManager>,
) -> anyhow::Result<Option<tokio::task::JoinHandle<anyhow::Result<()>>>> {
    let Some(metrics_addr) = config.metrics_listen else { return Ok(None) };
    let handle = metrics::install()?;
    let listener =
        TcpListener::bind(metrics_addr).await.with_context(|| format!("binding --metrics-listen {metrics_addr}"))?;
    let addr = listener.local_addr().context("reading the metrics address")?;
    tracing::info!(%addr, "serving /metrics");
    Ok(Some(tokio::spawn(metrics::serve(listener, manager.clone(), handle))))
}

/// Loads the `--preload` models, then turns readiness SERVING. A preload that fails leaves
/// readiness NOT_SERVING (the error is in GetModel and the log).
async fn preload(manager: Arc<ModelManager>, health: HealthReporter, models: Vec<model_manager::ModelId>) {
    let mut all_loaded = true;
    for id in models {
        let request = model_manager::LoadRequest::new(id.clone());
        let outcome = match manager.load(request).await {
            Ok(mut sub) => {
                let mut outcome = Ok(());
                while let Some(update) = sub.next().await {
                    if let model_manager::LoadUpdate::Done(done) = update {
                        outcome = done.map_err(|e| e.to_string());
                    }
                }
                outcome
            }
            Err(e) => Err(e.to_string()),
        };
        if let Err(cause) = outcome {
            tracing::error!(model_id = %id, %cause, "preload failed; readiness stays NOT_SERVING");
            all_loaded = false;
        }
    }
    if all_loaded {
        health.set_serving::<ModelLoaderServer<ModelLoaderService>>().await;
    }
}

/// Aborts a background task when dropped.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}
