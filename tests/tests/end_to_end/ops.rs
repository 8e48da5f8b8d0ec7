//! Operations: the real binary's JSON logs, its Prometheus metrics, and readiness with preloads.

use std::collections::BTreeMap;

use proto::v1 as pb;
use serde_json::Value;
use tests::{
    WAIT,
    binary::Binary,
    connect, fixture,
    hub::{Fault, HubRepo, TestHub},
    load, load_all, state_of,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_stream::StreamExt;
use tonic::{Code, transport::Channel};
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};

/// Starts the real binary on the bundled models with `args`.
async fn start(args: &[&str]) -> Binary {
    let models = fixture::repo_models_dir();
    let root = models.to_str().expect("a UTF-8 path");
    let mut all = vec!["--model-root", root];
    all.extend_from_slice(args);
    Binary::start(&all, &[]).await
}

/// With `--log-format json` every line is one JSON object, and every line of a load carries the
/// model id and the step as top-level fields (the step line stays the message).
#[tokio::test]
async fn json_logs_carry_the_model_and_the_step() {
    let server = start(&["--log-format", "json"]).await;
    let mut client = connect(server.addr).await;
    let (_, end) = load_all(&mut client, load("demo/tiny-sd")).await;
    end.expect("the demo loads");
    // The load's last line is written before its stream ends, but the log's reader may not have
    // read it yet: wait for it.
    server.wait_for_line(|l| l.contains("step=8/8")).await;
    let lines = server.log();
    let records: Vec<Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}")))
        .collect();
    let first = records.iter().position(|r| r["message"].as_str().is_some_and(|m| m.contains("step=1/8")));
    let last = records.iter().rposition(|r| r["message"].as_str().is_some_and(|m| m.contains("step=8/8")));
    let (Some(first), Some(last)) = (first, last) else { panic!("no step lines in the log:\n{}", lines.join("\n")) };
    let load_lines = &records[first..=last];
    assert!(load_lines.len() >= 8, "{load_lines:#?}");
    for record in load_lines {
        assert_eq!(record["model_id"], "demo/tiny-sd", "{record}");
        assert!(record["step"].as_u64().is_some_and(|s| (1..=8).contains(&s)), "{record}");
        assert!(record["timestamp"].is_string() && record["level"].is_string(), "{record}");
    }
    for n in 1..=8u64 {
        let line = load_lines
            .iter()
            .find(|r| r["message"].as_str().is_some_and(|m| m.starts_with(&format!("demo/tiny-sd step={n}/8 "))))
            .unwrap_or_else(|| panic!("no step line {n}"));
        assert_eq!(line["step"], n, "{line}");
    }
}

/// In the text format, the lines of a load carry its span once, with the step it is at:
/// `load{model_id=demo/tiny-sd step=4}: … step=4/8 …`, never a `step=` per step seen so far, and
/// no line (the debug byte-progress lines included) names the step twice.
#[tokio::test]
async fn text_logs_carry_the_span_with_one_step() {
    let models = fixture::repo_models_dir();
    let server =
        Binary::start(&["--model-root", models.to_str().expect("a UTF-8 path")], &[("RUST_LOG", "info,steps=debug")])
            .await;
    let mut client = connect(server.addr).await;
    let (_, end) = load_all(&mut client, load("demo/tiny-sd")).await;
    end.expect("the demo loads");
    // The load's last line is written before its stream ends, but the log's reader may not have
    // read it yet: wait for it.
    server.wait_for_line(|l| l.contains("step=8/8")).await;
    let lines = server.log();
    let spans: Vec<&str> = lines
        .iter()
        .filter_map(|l| l.split_once(" load{").map(|(_, rest)| rest.split_once("}:").map_or(rest, |(span, _)| span)))
        .collect();
    assert!(spans.len() >= 8, "every step line is in the load's span:\n{}", lines.join("\n"));
    for span in &spans {
        assert_eq!(span.matches("step=").count(), 1, "one step in the span {{{span}}}:\n{}", lines.join("\n"));
    }
    let in_span = || lines.iter().filter(|l| l.contains(" load{"));
    let bytes_lines = in_span().filter(|l| l.contains(" steps: bytes ")).count();
    assert!(bytes_lines >= 1, "the debug byte-progress lines are there:\n{}", lines.join("\n"));
    for line in in_span() {
        // The step line's message says `step=N/8` (that is its format); no field says it again.
        let fields = line
            .match_indices("step=")
            .filter(|(at, _)| !line[at + 5..].trim_start_matches(|c: char| c.is_ascii_digit()).starts_with("/8"))
            .count();
        assert_eq!(fields, 1, "one step field: {line}");
    }
    for n in 1..=8 {
        let step_line = format!("demo/tiny-sd step={n}/8 ");
        let line = lines.iter().find(|l| l.contains(&step_line)).unwrap_or_else(|| panic!("no step line {n}"));
        assert!(line.contains(&format!(" load{{model_id=demo/tiny-sd step={n}}}: ")), "{line}");
    }
}

/// `GET /metrics` over plain HTTP/1.0, as Prometheus scrapes it: sample → value.
pub(crate) async fn scrape(addr: &str) -> BTreeMap<String, f64> {
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect to /metrics");
    stream.write_all(b"GET /metrics HTTP/1.0\r\nHost: test\r\n\r\n").await.expect("send the request");
    let mut response = String::new();
    tokio::time::timeout(WAIT, stream.read_to_string(&mut response)).await.expect("answered").expect("read");
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.to_ascii_lowercase().contains("content-type: text/plain"), "{head}");
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let (sample, value) = l.rsplit_once(' ').unwrap_or_else(|| panic!("a sample line: {l}"));
            (sample.to_owned(), value.parse().unwrap_or_else(|_| panic!("a number: {l}")))
        })
        .collect()
}

fn value(metrics: &BTreeMap<String, f64>, sample: &str) -> f64 {
    *metrics.get(sample).unwrap_or_else(|| panic!("no {sample} in:\n{metrics:#?}"))
}

/// After a load, a failed load and a cancelled one, `/metrics` of the real binary counts each by
/// outcome and error kind, times them and their steps, and shows the models, the memory and the
/// watchers as they are, its build, and the process's CPU, memory and file descriptors.
#[tokio::test]
async fn metrics_count_loads_failures_and_cancels() {
    let root = tempfile::tempdir().expect("temp dir");
    let good =
        fixture::single_file_model(&root.path().join("good"), &fixture::f32_tensors("w", 4, 1000)).expect("good");
    std::fs::create_dir_all(root.path().join("bad")).expect("bad");
    std::fs::write(root.path().join("bad/config.json"), "{}").expect("config");
    std::fs::write(root.path().join("bad/model.safetensors"), b"\x08\x00\x00\x00\x00\x00\x00\x00not json")
        .expect("bad");
    fixture::large_sharded_model(&root.path().join("big"), 512, 2, 4).expect("big");
    let root_arg = root.path().to_str().expect("UTF-8");
    let server = Binary::start(&["--model-root", root_arg, "--offline", "--metrics-listen", "127.0.0.1:0"], &[]).await;
    let metrics_addr = server.logged_addr("serving /metrics").await.to_string();
    let mut client = connect(server.addr).await;

    let (_, end) = load_all(&mut client, load("good")).await;
    end.expect("good loads");
    let (_, end) = load_all(&mut client, load("bad")).await;
    assert_eq!(end.expect_err("bad fails").code(), Code::DataLoss);
    let mut big = client.load_model(load("big")).await.expect("big starts").into_inner();
    while let Some(m) = tokio::time::timeout(WAIT, big.next()).await.expect("moves") {
        if m.expect("ok").step == 4 {
            break;
        }
    }
    client.cancel_load(pb::CancelLoadRequest { model_id: "big".into() }).await.expect("cancel");
    let end = loop {
        match tokio::time::timeout(WAIT, big.next()).await.expect("moves") {
            Some(Ok(_)) => {}
            Some(Err(status)) => break status,
            None => panic!("the big load finished before the cancel"),
        }
    };
    assert_eq!(end.code(), Code::Cancelled);
    let watch = client.watch_models(pb::WatchModelsRequest::default()).await.expect("watch").into_inner();

    let m = scrape(&metrics_addr).await;
    assert_eq!(value(&m, "model_loader_loads_started_total"), 3.0);
    assert_eq!(value(&m, r#"model_loader_loads_finished_total{outcome="succeeded",kind="none"}"#), 1.0);
    assert_eq!(value(&m, r#"model_loader_loads_finished_total{outcome="failed",kind="corrupt"}"#), 1.0);
    assert_eq!(value(&m, r#"model_loader_loads_finished_total{outcome="cancelled",kind="cancelled"}"#), 1.0);
    for outcome in ["succeeded", "failed", "cancelled"] {
        let count = format!(r#"model_loader_load_duration_seconds_count{{outcome="{outcome}"}}"#);
        assert_eq!(value(&m, &count), 1.0, "{outcome}");
        let inf = format!(r#"model_loader_load_duration_seconds_bucket{{outcome="{outcome}",le="+Inf"}}"#);
        assert_eq!(value(&m, &inf), 1.0, "{outcome}");
    }
    assert_eq!(value(&m, r#"model_loader_step_duration_seconds_count{step="init"}"#), 3.0);
    // The corrupt file fails while its header is read (step 3): two loads reached step 4.
    assert_eq!(value(&m, r#"model_loader_step_duration_seconds_count{step="load_weights"}"#), 2.0);
    assert_eq!(value(&m, r#"model_loader_step_duration_seconds_count{step="finalize"}"#), 1.0);
    assert_eq!(value(&m, "model_loader_loaded_bytes_total"), good.bytes() as f64);
    assert_eq!(value(&m, r#"model_loader_models{state="loaded"}"#), 1.0);
    assert_eq!(value(&m, r#"model_loader_models{state="failed"}"#), 1.0);
    assert!(value(&m, r#"model_loader_device_budget_bytes{device="cpu"}"#) > 0.0);
    assert_eq!(value(&m, "model_loader_watchers"), 1.0);
    assert_eq!(value(&m, "model_loader_download_bytes_total"), 0.0, "shown from the start, and nothing was downloaded");
    assert_eq!(value(&m, "model_loader_attached_clients"), 0.0, "shown without an attach socket");

    // The conventions operators' dashboards join on: the build, and the process's own metrics.
    let build: Vec<_> = m.iter().filter(|(k, _)| k.starts_with("model_loader_build_info{")).collect();
    let [(labels, one)] = build[..] else { panic!("one build_info series: {build:?}") };
    assert_eq!(*one, 1.0);
    assert!(labels.contains(&format!(r#"version="{}""#, env!("CARGO_PKG_VERSION"))), "{labels}");
    assert!(labels.contains(r#"cuda="false""#) || labels.contains(r#"cuda="true""#), "{labels}");
    let rss = value(&m, "process_resident_memory_bytes");
    assert!(rss > (1 << 20) as f64 && rss < (64u64 << 30) as f64, "RSS {rss}");
    let open_fds = value(&m, "process_open_fds");
    assert!(open_fds >= 3.0 && open_fds <= value(&m, "process_max_fds"), "open fds {open_fds}");
    assert!(value(&m, "process_cpu_seconds_total") >= 0.0);
    let started = value(&m, "process_start_time_seconds");
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("after 1970").as_secs_f64();
    assert!(started <= now + 1.0 && started > now - 3600.0, "started at {started}, now {now}");
    assert!(value(&m, "process_threads") >= 2.0);

    // The cancelled load's memory is freed just after its stream ended; then only `good` is held.
    drop(watch);
    let mut last = None;
    tests::eventually!(
        {
            let m = last.insert(scrape(&metrics_addr).await);
            value(m, r#"model_loader_device_used_bytes{device="cpu"}"#) == good.booked() as f64
                && value(m, "model_loader_watchers") == 0.0
        },
        "used bytes and watchers never came back: {last:?}"
    );
}

/// With `--preload`, readiness (`modelloader.v1.ModelLoader`) is NOT_SERVING until the model is
/// loaded, SERVING once it is, and NOT_SERVING again on SIGTERM. The demo comes from a test hub
/// that sends its largest file slowly, so the preload is still running when the test looks.
#[tokio::test]
async fn readiness_follows_the_preload_and_sigterm() {
    let demo = tempfile::tempdir().expect("temp dir");
    fixture::demo_tiny_sd(demo.path()).expect("demo");
    let repo = HubRepo::from_dir("demo/tiny-sd", demo.path()).expect("repo");
    let largest = repo.files().iter().max_by_key(|(_, bytes)| bytes.len()).map(|(p, _)| p.clone()).expect("a file");
    let repo_bytes: usize = repo.files().values().map(|bytes| bytes.len()).sum();
    let hub = TestHub::start([repo]).await;
    hub.set_fault("demo/tiny-sd", &largest, Fault::Slow { bytes_per_sec: 2 << 20 });
    let (root, cache) = (tempfile::tempdir().expect("root"), tempfile::tempdir().expect("cache"));
    let server = Binary::start(
        &[
            "--model-root",
            root.path().to_str().expect("UTF-8"),
            "--hf-cache",
            cache.path().to_str().expect("UTF-8"),
            "--hf-endpoint",
            hub.url(),
            "--preload",
            "demo/tiny-sd",
            "--metrics-listen",
            "127.0.0.1:0",
        ],
        &[],
    )
    .await;
    let channel = Channel::from_shared(format!("http://{}", server.addr)).expect("uri").connect_lazy();
    let request = HealthCheckRequest { service: "modelloader.v1.ModelLoader".into() };
    let mut readiness = HealthClient::new(channel).watch(request).await.expect("health watch").into_inner();
    let mut client = connect(server.addr).await;

    let first = tokio::time::timeout(WAIT, readiness.next()).await.expect("health").expect("open").expect("ok");
    assert_eq!(first.status(), ServingStatus::NotServing, "not ready while the preload runs");
    assert_ne!(state_of(&mut client, "demo/tiny-sd").await, pb::ModelState::Loaded);
    let next = tokio::time::timeout(WAIT, readiness.next()).await.expect("health").expect("open").expect("ok");
    assert_eq!(next.status(), ServingStatus::Serving);
    assert_eq!(state_of(&mut client, "demo/tiny-sd").await, pb::ModelState::Loaded, "ready only after the load");
    // The preload downloaded the whole repo, and the metric says so.
    let metrics_addr = server.logged_addr("serving /metrics").await.to_string();
    let m = scrape(&metrics_addr).await;
    assert_eq!(value(&m, "model_loader_download_bytes_total"), repo_bytes as f64);

    server.sigterm();
    let last = tokio::time::timeout(WAIT, readiness.next()).await.expect("health moves");
    assert_eq!(last.expect("reported before the end").expect("ok").status(), ServingStatus::NotServing);
}
