//! Traces: the real binary with `--otlp-endpoint` exports its gRPC calls, a load and the load's
//! eight steps to an OTLP receiver in this process, continuing the caller's W3C trace context.

use opentelemetry_proto::tonic::trace::v1::{span::SpanKind, status::StatusCode};
use serde_json::Value;
use tests::{WAIT, binary::Binary, connect, fixture, load, otlp};
use tonic::Code;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

/// The caller's trace and span, as a `traceparent` carries them (W3C Trace Context's example).
const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT_SPAN_ID: &str = "00f067aa0ba902b7";
const TRACESTATE: &str = "congo=t61rcWkgMzE";

/// The steps' names in traces, in order (written here apart from the `steps` crate).
const STEP_NAMES: [&str; 8] = [
    "init",
    "cache_check",
    "build_strategies",
    "load_weights",
    "load_complete",
    "move_to_device",
    "apply_optimizations",
    "finalize",
];

fn models_arg() -> String {
    fixture::repo_models_dir().to_str().expect("a UTF-8 path").to_owned()
}

/// LoadModel with the caller's trace context in its metadata, read to its end: the bytes of
/// step 4 as the stream said them.
async fn traced_load(addr: std::net::SocketAddr, id: &str) -> u64 {
    let mut client = connect(addr).await;
    let mut request = tonic::Request::new(load(id));
    let traceparent = format!("00-{TRACE_ID}-{PARENT_SPAN_ID}-01");
    request.metadata_mut().insert("traceparent", traceparent.parse().expect("ASCII"));
    request.metadata_mut().insert("tracestate", TRACESTATE.parse().expect("ASCII"));
    let mut stream = client.load_model(request).await.expect("LoadModel starts").into_inner();
    let (messages, end) = tests::rest_of(&mut stream).await;
    end.expect("the demo loads");
    messages.iter().filter(|m| m.step == 4).map(|m| m.bytes_total).max().expect("step 4 said its bytes")
}

/// A LoadModel carrying a `traceparent` gives the collector, at shutdown (the batch's own delay
/// is made far longer than the test), one LoadModel server span in the caller's trace with the
/// caller's span as parent, one load span under it with the load's facts, and exactly the eight
/// steps under that, in order and one after another, step 4 with its bytes; health checks make
/// no span, a refused call records its code, a failed load says why; the JSON log lines are as
/// without traces.
#[tokio::test]
async fn a_load_continues_the_callers_trace_with_eight_steps() {
    let receiver = otlp::Receiver::start().await;
    let endpoint = receiver.endpoint();
    let models = models_arg();
    let mut server = Binary::start(
        &["--model-root", &models, "--offline", "--otlp-endpoint", &endpoint, "--log-format", "json"],
        &[("OTEL_BSP_SCHEDULE_DELAY", "600000")],
    )
    .await;
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", server.addr)).expect("uri");
    let mut health = HealthClient::new(channel.connect_lazy());
    health.check(HealthCheckRequest::default()).await.expect("health answers");
    let step4_bytes = traced_load(server.addr, "demo/tiny-sd").await;
    let mut client = connect(server.addr).await;
    let missing = client.get_model(proto::v1::GetModelRequest { model_id: "no/such".into() }).await;
    assert_eq!(missing.expect_err("unknown model").code(), Code::NotFound);
    let (_, failed) = tests::load_all(&mut client, load("no/such")).await;
    assert_eq!(failed.expect_err("no such model").code(), Code::NotFound);
    assert_eq!(receiver.exports(), 0, "nothing is exported before the batch is due or the server stops");
    server.sigterm();
    assert!(server.wait_exit(WAIT).await.success(), "exit 0");

    let spans = receiver.spans();
    let names: Vec<&str> = spans.iter().map(|s| s.span.name.as_str()).collect();
    for span in &spans {
        assert_eq!(span.service_name.as_deref(), Some("model-loader"), "{names:?}");
        assert_eq!(span.service_version.as_deref(), Some(env!("CARGO_PKG_VERSION")), "{names:?}");
    }
    assert!(!names.iter().any(|n| n.contains("Health")), "no span for health checks: {names:?}");
    let named = |name: &str| spans.iter().filter(|s| s.span.name == name).collect::<Vec<_>>();

    let calls = named("modelloader.v1.ModelLoader/LoadModel");
    assert_eq!(calls.len(), 2, "a span per LoadModel: {names:?}");
    let traced: Vec<_> = calls.into_iter().filter(|c| hex::encode(&c.span.trace_id) == TRACE_ID).collect();
    let [rpc] = traced[..] else { panic!("one LoadModel span in the caller's trace: {names:?}") };
    assert_eq!(hex::encode(&rpc.span.parent_span_id), PARENT_SPAN_ID, "the caller's span is the parent");
    assert_eq!(rpc.span.trace_state, TRACESTATE);
    assert_eq!(rpc.span.kind, SpanKind::Server as i32);
    assert_eq!(rpc.str("rpc.system"), Some("grpc"));
    assert_eq!(rpc.str("rpc.service"), Some("modelloader.v1.ModelLoader"));
    assert_eq!(rpc.str("rpc.method"), Some("LoadModel"));
    assert_eq!(rpc.int("rpc.grpc.status_code"), Some(0));

    let loads = named("load");
    let of = |id: &str| loads.iter().copied().filter(|l| l.str("model_id") == Some(id)).collect::<Vec<_>>();
    check_failed_load(&spans, &of("no/such"));
    let [load] = of("demo/tiny-sd")[..] else { panic!("one load span of the demo: {names:?}") };
    assert_eq!(load.span.trace_id, rpc.span.trace_id);
    assert_eq!(load.span.parent_span_id, rpc.span.span_id, "the load is a child of the call that started it");
    assert_eq!(load.str("model_id"), Some("demo/tiny-sd"));
    assert_eq!(load.str("device"), Some("cpu"));
    assert_eq!(load.str("dtype"), Some("as stored"));
    assert_eq!(load.str("source"), Some("local"));
    assert_eq!(load.str("outcome"), Some("succeeded"));
    assert_eq!(load.int("bytes"), Some(step4_bytes as i64), "the weights' bytes");
    check_steps(&spans, load, step4_bytes);

    let [refused] = named("modelloader.v1.ModelLoader/GetModel")[..] else { panic!("one GetModel span: {names:?}") };
    assert_eq!(refused.int("rpc.grpc.status_code"), Some(Code::NotFound as i64));
    assert_ne!(refused.span.trace_id, rpc.span.trace_id, "a call without a traceparent starts its own trace");
    assert_ne!(
        refused.span.status.as_ref().map(|s| s.code),
        Some(StatusCode::Error as i32),
        "a client's mistake is not the server's error"
    );

    check_json_log(&server.log());
}

/// Under `load` exactly the eight steps, in order, one after another, within the load, in its
/// trace; step 4 with the bytes it read.
fn check_steps(spans: &[otlp::ReceivedSpan], load: &otlp::ReceivedSpan, step4_bytes: u64) {
    let mut steps: Vec<_> = spans.iter().filter(|s| s.span.parent_span_id == load.span.span_id).collect();
    steps.sort_by_key(|s| s.int("step.number"));
    let numbers: Vec<_> = steps.iter().map(|s| s.int("step.number")).collect();
    assert_eq!(numbers, (1..=8).map(Some).collect::<Vec<_>>(), "exactly the eight steps under the load: {steps:#?}");
    for (step, name) in steps.iter().zip(STEP_NAMES) {
        assert_eq!(step.span.name, name);
        assert_eq!(step.str("step.name"), Some(name));
        assert_eq!(step.span.trace_id, load.span.trace_id);
        let outcome = if name == "finalize" { "succeeded" } else { "done" };
        assert_eq!(step.str("outcome"), Some(outcome), "{name}");
        assert!(step.span.start_time_unix_nano >= load.span.start_time_unix_nano, "{name}");
        assert!(step.span.end_time_unix_nano <= load.span.end_time_unix_nano, "{name}");
    }
    for pair in steps.windows(2) {
        assert!(pair[0].span.end_time_unix_nano <= pair[1].span.start_time_unix_nano, "one step after another");
    }
    let weights = steps[3];
    assert_eq!(weights.int("bytes.total"), Some(step4_bytes as i64), "step 4 carries its bytes");
    assert_eq!(weights.int("bytes.done"), weights.int("bytes.total"));
    assert_eq!(steps[0].int("bytes.total"), None, "a step without bytes says none");
}

/// The load of a model that is nowhere: its span says it failed and why (an error status), under a
/// LoadModel span whose code is NOT_FOUND; its steps end at step 2, which failed.
fn check_failed_load(spans: &[otlp::ReceivedSpan], loads: &[&otlp::ReceivedSpan]) {
    let [load] = loads[..] else { panic!("one load span of the missing model: {loads:#?}") };
    assert_eq!(load.str("outcome"), Some("failed"));
    assert_eq!(load.str("error.kind"), Some("not_found"));
    let status = load.span.status.as_ref().expect("a status");
    assert_eq!(status.code, StatusCode::Error as i32);
    assert!(status.message.contains("no/such"), "{status:?}");
    let rpc = spans.iter().find(|s| s.span.span_id == load.span.parent_span_id).expect("under its call");
    assert_eq!(rpc.span.name, "modelloader.v1.ModelLoader/LoadModel");
    assert_eq!(rpc.int("rpc.grpc.status_code"), Some(Code::NotFound as i64), "from the trailers after the stream");
    let mut steps: Vec<_> = spans.iter().filter(|s| s.span.parent_span_id == load.span.span_id).collect();
    steps.sort_by_key(|s| s.int("step.number"));
    let outcomes: Vec<_> = steps.iter().map(|s| (s.int("step.number"), s.str("outcome"))).collect();
    assert_eq!(outcomes, [(Some(1), Some("done")), (Some(2), Some("failed"))]);
}

/// The JSON log lines with traces on: the step lines (`{model_id} step=N/8 …`) still carry
/// `model_id` and `step` as fields and nothing else of a span, and no line shows the spans that are
/// for traces only.
fn check_json_log(lines: &[String]) {
    let records: Vec<Value> = lines.iter().map(|l| serde_json::from_str(l).expect("a JSON line")).collect();
    let step_lines: Vec<&Value> =
        records.iter().filter(|r| r["message"].as_str().is_some_and(|m| m.contains(" step="))).collect();
    assert!(step_lines.len() >= 10, "the demo's eight and the missing model's two: {lines:#?}");
    for record in step_lines {
        let (id, step) = record["message"].as_str().and_then(|m| m.split_once(" step=")).expect("a step line");
        assert_eq!(record["model_id"], id, "{record}");
        assert_eq!(
            record["step"].as_u64().map(|n| n.to_string()),
            step.split('/').next().map(str::to_owned),
            "{record}"
        );
        let fields: Vec<&str> = record.as_object().expect("an object").keys().map(String::as_str).collect();
        assert_eq!(fields, ["level", "message", "model_id", "name", "step", "target", "timestamp"], "{record}");
    }
    assert!(!lines.iter().any(|l| l.contains("rpc.") || l.contains("otel.")), "{lines:#?}");
}

/// With the flag and OpenTelemetry's endpoint variables unset (empty counts as unset) traces are
/// off: nothing is said about them, a call with a `traceparent` loads as ever, and the server stops
/// cleanly without a warning.
#[tokio::test]
async fn without_an_endpoint_traces_are_off() {
    let models = models_arg();
    let unset = ["MODEL_LOADER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"];
    let envs: Vec<(&str, &str)> = unset.iter().map(|name| (*name, "")).collect();
    let mut server = Binary::start(&["--model-root", &models], &envs).await;
    traced_load(server.addr, "demo/tiny-sd").await;
    server.sigterm();
    assert!(server.wait_exit(WAIT).await.success(), "exit 0");
    let lines = server.log();
    assert!(lines.iter().any(|l| l.contains("step=8/8")), "{lines:#?}");
    assert!(!lines.iter().any(|l| l.contains("OTLP") || l.contains(" WARN ") || l.contains(" ERROR ")), "{lines:#?}");
}
