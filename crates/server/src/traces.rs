//! Traces over OTLP/gRPC (`--otlp-endpoint`): the tracer provider and its batch exporter, the
//! `tracing` layer that turns spans into OpenTelemetry spans, and the span of each gRPC call, which
//! continues the caller's W3C trace context (`traceparent`/`tracestate` in its metadata).
//!
//! The spans for traces (an RPC, a load's facts, its steps) use the target [`TRACES`]: the trace
//! layer takes only those (and the warnings and errors logged inside them); the log layers leave
//! them out, so the log lines stay as they are whether traces are on or off.

use std::time::Duration;

use anyhow::Context as _;
use opentelemetry::{propagation::TextMapPropagator as _, trace::TracerProvider as _};
use opentelemetry_http::HeaderExtractor;
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::{Resource, propagation::TraceContextPropagator, trace::SdkTracerProvider};
use tower_http::{
    classify::{GrpcErrorsAsFailures, SharedClassifier},
    trace::{MakeSpan, OnEos, OnResponse, TraceLayer},
};
use tracing::{Level, Span, field::Empty};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::{Layer, filter::FilterFn, registry::LookupSpan};

pub use steps::TRACES;

/// The service name traces carry unless `OTEL_SERVICE_NAME` says another.
pub const SERVICE_NAME: &str = "model-loader";

/// How long shutdown waits for the last spans to reach the collector.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

/// Where traces go, and as which service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OtlpConfig {
    /// The collector's OTLP/gRPC endpoint, e.g. `http://127.0.0.1:4317`.
    pub endpoint: String,
    pub service_name: String,
}

/// The tracer provider: [`Traces::shutdown`] exports the spans still queued.
pub struct Traces(SdkTracerProvider);

impl Traces {
    /// Exports what is queued and stops the exporter. Call it after the server has drained and
    /// while the runtime still runs (the exporter's channel lives on it).
    pub fn shutdown(self) {
        if let Err(e) = self.0.shutdown_with_timeout(FLUSH_TIMEOUT) {
            tracing::warn!(cause = %e, "could not export the last spans");
        }
    }
}

/// The batch exporter to `config.endpoint` and the `tracing` layer that feeds it, filtered to the
/// spans for traces and the warnings and errors inside them. Call it within the tokio runtime:
/// the exporter's gRPC channel is spawned on it.
pub(crate) fn layer<S>(config: &OtlpConfig) -> anyhow::Result<(impl Layer<S> + Send + Sync + 'static, Traces)>
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a> + Send + Sync,
{
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(config.endpoint.clone())
        .build()
        .with_context(|| format!("--otlp-endpoint {}", config.endpoint))?;
    let resource = Resource::builder()
        .with_service_name(config.service_name.clone())
        .with_attribute(opentelemetry::KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
        .build();
    let provider = SdkTracerProvider::builder().with_batch_exporter(exporter).with_resource(resource).build();
    let tracer = provider.tracer("model-loader");
    let only_traces = FilterFn::new(|meta: &tracing::Metadata<'_>| {
        meta.target() == TRACES || (meta.is_event() && *meta.level() <= Level::WARN)
    });
    let layer = tracing_opentelemetry::layer().with_tracer(tracer).with_filter(only_traces);
    Ok((layer, Traces(provider)))
}

/// The span of each gRPC call ([`RpcSpan`]), with its status code recorded from the response's
/// headers (an error before any message) or its trailers ([`RecordStatus`]). Nothing is logged.
pub(crate) type RpcSpans =
    TraceLayer<SharedClassifier<GrpcErrorsAsFailures>, RpcSpan, (), RecordStatus, (), RecordStatus, ()>;

pub(crate) fn rpc_spans() -> RpcSpans {
    TraceLayer::new_for_grpc()
        .make_span_with(RpcSpan)
        .on_request(())
        .on_response(RecordStatus)
        .on_body_chunk(())
        .on_eos(RecordStatus)
        .on_failure(())
}

/// A server span per call, named `package.Service/Method`, a child of the caller's span when the
/// metadata carries a W3C `traceparent`. Health checks get none: probes call every few seconds
/// and would fill the trace store with nothing to see.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RpcSpan;

impl<B> MakeSpan<B> for RpcSpan {
    fn make_span(&mut self, request: &http::Request<B>) -> Span {
        let path = request.uri().path();
        if path.starts_with("/grpc.health.v1.Health/") {
            return Span::none();
        }
        let (service, method) = path.trim_start_matches('/').split_once('/').unwrap_or((path, ""));
        let span = tracing::info_span!(
            target: TRACES,
            "rpc",
            otel.name = path.trim_start_matches('/'),
            otel.kind = "server",
            otel.status_code = Empty,
            rpc.system = "grpc",
            rpc.service = service,
            rpc.method = method,
            rpc.grpc.status_code = Empty,
        );
        if !span.is_disabled() {
            let parent = TraceContextPropagator::new().extract(&HeaderExtractor(request.headers()));
            // Fails only for a span the trace layer has not seen, and this one is new.
            let _ = span.set_parent(parent);
        }
        span
    }
}

/// Records `grpc-status` on the call's span, and an error status for the codes that mean the
/// server failed (OpenTelemetry's convention for gRPC servers; a client's mistake is not one).
#[derive(Debug, Clone, Copy)]
pub(crate) struct RecordStatus;

impl RecordStatus {
    fn record(headers: &http::HeaderMap, span: &Span) {
        let Some(code) = headers.get("grpc-status").and_then(|v| v.to_str().ok()?.parse::<i32>().ok()) else {
            return;
        };
        span.record("rpc.grpc.status_code", code);
        if is_server_error(tonic::Code::from_i32(code)) {
            span.record("otel.status_code", "error");
        }
    }
}

impl<B> OnResponse<B> for RecordStatus {
    fn on_response(self, response: &http::Response<B>, _latency: Duration, span: &Span) {
        Self::record(response.headers(), span);
    }
}

impl OnEos for RecordStatus {
    fn on_eos(self, trailers: Option<&http::HeaderMap>, _stream_duration: Duration, span: &Span) {
        if let Some(trailers) = trailers {
            Self::record(trailers, span);
        }
    }
}

fn is_server_error(code: tonic::Code) -> bool {
    use tonic::Code::*;
    matches!(code, Unknown | DeadlineExceeded | Unimplemented | Internal | Unavailable | DataLoss)
}
