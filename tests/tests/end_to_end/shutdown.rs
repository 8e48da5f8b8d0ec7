//! Shutdown of the real binary: new loads refused while it drains, SIGINT as SIGTERM, models
//! dropped before the exit, the grace running out on a load that cannot stop, open Watch streams
//! ended, and SIGHUP survived.
//!
//! "During shutdown" is made deterministic with a load converting one large tensor in step 7: one
//! call that sees no cancel until it returns, so the loader's shutdown cannot finish while it
//! runs, and the server has not begun closing connections yet.

use std::{
    process::ExitStatus,
    time::{Duration, Instant},
};

use proto::v1 as pb;
use tests::{
    WAIT,
    binary::Binary,
    connect, end_of, fixture,
    hub::{Fault, HubRepo, TestHub},
    load, load_ok, open_load, read_until,
};
use tokio_stream::StreamExt;
use tonic::{Code, Streaming, transport::Channel};
use tonic_health::pb::{
    HealthCheckRequest, HealthCheckResponse, health_check_response::ServingStatus, health_client::HealthClient,
};

/// The warn lines of `server::run` when the grace runs out.
const LOADS_DID_NOT_END: &str = "loads did not end within the shutdown grace";
const CONNECTIONS_STILL_OPEN: &str = "connections still open at the end of the shutdown grace; closing them";

/// Starts the binary on `model_root` with an empty HF cache in `cache` and the hub at `hub_url`
/// (never offline, a hub timeout far beyond any wait here), plus `args`.
async fn start_with_hub(model_root: &std::path::Path, cache: &std::path::Path, hub_url: &str, args: &[&str]) -> Binary {
    let mut all = vec![
        "--model-root",
        model_root.to_str().expect("a UTF-8 path"),
        "--hf-cache",
        cache.to_str().expect("a UTF-8 path"),
        "--hf-endpoint",
        hub_url,
        "--hf-timeout",
        "600s",
    ];
    all.extend_from_slice(args);
    Binary::start(&all, &[("HF_HUB_OFFLINE", "0")]).await
}

/// A readiness (`modelloader.v1.ModelLoader`) Watch on a connection of its own, after its first
/// report, which must be `first`.
async fn watch_readiness(server: &Binary, first: ServingStatus) -> (Channel, Streaming<HealthCheckResponse>) {
    let channel = Channel::from_shared(format!("http://{}", server.addr)).expect("uri").connect_lazy();
    let request = HealthCheckRequest { service: "modelloader.v1.ModelLoader".into() };
    let mut readiness = tokio::time::timeout(WAIT, HealthClient::new(channel.clone()).watch(request))
        .await
        .expect("health Watch answers")
        .expect("health Watch")
        .into_inner();
    assert_eq!(next_readiness(server, &mut readiness).await, first);
    (channel, readiness)
}

/// The next readiness report, which must come within [`WAIT`].
async fn next_readiness(server: &Binary, readiness: &mut Streaming<HealthCheckResponse>) -> ServingStatus {
    let next = tokio::time::timeout(WAIT, readiness.next()).await;
    let log = || server.log().join("\n");
    match next {
        Ok(Some(Ok(report))) => report.status(),
        Ok(Some(Err(status))) => panic!("the health stream failed: {status:?}; log:\n{}", log()),
        Ok(None) => panic!("the health stream ended without a report; log:\n{}", log()),
        Err(_) => panic!("readiness did not report within {WAIT:?}; log:\n{}", log()),
    }
}

/// Sends SIGINT (what Ctrl-C sends) to the server.
fn sigint(server: &Binary) {
    let status =
        std::process::Command::new("kill").args(["-INT", "--", &server.pid().to_string()]).status().expect("run kill");
    assert!(status.success(), "kill -INT failed");
}

/// The index of the first log line containing `text`, or a panic showing the log.
fn line_index(log: &[String], text: &str) -> usize {
    log.iter().position(|l| l.contains(text)).unwrap_or_else(|| panic!("no {text:?} line in:\n{}", log.join("\n")))
}

/// Insists the server exited 0, then returns its log up to its last line ("shut down"): the
/// process may exit before the test has read all its stderr, so this waits (bounded) for that line.
async fn log_after_exit_0(server: &Binary, exit: ExitStatus) -> Vec<String> {
    assert!(exit.success(), "exit status {exit:?}; log so far:\n{}", server.log().join("\n"));
    server.wait_for_line(|l| l.ends_with(" shut down")).await;
    server.log()
}

fn has_line(log: &[String], text: &str) -> bool {
    log.iter().any(|l| l.contains(text))
}

/// A LoadModel sent during shutdown, on an already-open connection, is refused with UNAVAILABLE
/// by the server itself, and the load in flight ends with UNAVAILABLE.
///
/// Deterministic: with `--max-concurrent-loads 1`, a load converting one large tensor in step 7
/// (one call that sees no cancel until it returns, seconds in the debug binary) holds the only
/// slot; a local load queued behind it is the load in flight. After SIGTERM, readiness turns
/// NOT_SERVING (Watch stream) and the queued load's stream ends with UNAVAILABLE: the loader has
/// set "shutting down" (it does before it cancels). The conversion keeps the loader's shutdown
/// from finishing, so the server has not begun closing connections, and the new LoadModel
/// reaches the service. Once the tensor is converted the load sees the cancel and shutdown ends:
/// the process exits 0 long before the (300 s) grace, with no grace warning.
#[tokio::test]
async fn a_load_during_shutdown_gets_unavailable() {
    let root = tempfile::tempdir().expect("root");
    fixture::single_file_model(&root.path().join("small"), &fixture::f32_tensors("w", 2, 256)).expect("fixture");
    one_large_tensor(root.path());
    let mut server = start_local(root.path(), &["--max-concurrent-loads", "1", "--shutdown-grace", "300s"]).await;
    let (health, mut readiness) = watch_readiness(&server, ServingStatus::Serving).await;
    let mut client = connect(server.addr).await;

    let mut converting = open_load(&mut client, converted(LARGE)).await;
    read_until(&mut converting, "large: step 7", |m| m.step == 7).await;
    let mut queued = open_load(&mut client, load("small")).await;
    read_until(&mut queued, "small: queued", |m| m.step == 1 && m.detail.starts_with("queued: ")).await;

    server.sigterm();
    assert_eq!(next_readiness(&server, &mut readiness).await, ServingStatus::NotServing);
    let (messages, end) = end_of(queued).await;
    let status = end.expect_err("the queued load does not succeed");
    assert_eq!(status.code(), Code::Unavailable, "the load in flight ends with UNAVAILABLE: {status:?} {messages:?}");
    assert_eq!(status.message(), "the server is shutting down", "{status:?}");
    drop((readiness, health));

    // Shutdown is in progress (the conversion holds it): a new LoadModel, on the open connection.
    let refused = tokio::time::timeout(WAIT, client.load_model(load("small"))).await.expect("LoadModel answers");
    let status = refused.expect_err("a load during shutdown is refused");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(status.message(), "the server is shutting down", "refused by the server itself: {status:?}");
    let log = server.log();
    assert!(!log.iter().any(|l| l.ends_with(" shut down")), "still shutting down:\n{}", log.join("\n"));

    // The conversion returns, the load sees the cancel, and shutdown finishes well within its grace.
    let (_, end) = end_of(converting).await;
    end.expect_err("the converting load does not succeed");
    let exit = server.wait_exit(WAIT).await;
    let log = log_after_exit_0(&server, exit).await;
    for warn in [LOADS_DID_NOT_END, CONNECTIONS_STILL_OPEN] {
        assert!(!has_line(&log, warn), "{warn:?} logged:\n{}", log.join("\n"));
    }
}

/// SIGINT shuts down as SIGTERM does: readiness turns NOT_SERVING, the load in flight ends with
/// UNAVAILABLE, the log says SIGINT was received, and the process exits 0 within --shutdown-grace
/// (with no grace warning: nothing was left to wait for).
///
/// The load in flight downloads from a test hub that stalls its largest file halfway, so it is
/// still in step 4 when the signal comes, however long the test takes to send it.
#[tokio::test]
async fn sigint_drains_and_exits_like_sigterm() {
    let demo = tempfile::tempdir().expect("demo");
    fixture::demo_tiny_sd(demo.path()).expect("demo fixture");
    let repo = HubRepo::from_dir("demo/tiny-sd", demo.path()).expect("repo");
    let largest = repo.files().iter().max_by_key(|(_, bytes)| bytes.len()).map(|(p, _)| p.clone()).expect("a file");
    let hub = TestHub::start([repo]).await;
    hub.set_fault("demo/tiny-sd", &largest, Fault::Stall);
    let (root, cache) = (tempfile::tempdir().expect("root"), tempfile::tempdir().expect("cache"));
    let grace = Duration::from_secs(10);
    let mut server = start_with_hub(root.path(), cache.path(), hub.url(), &["--shutdown-grace", "10s"]).await;
    let (health, mut readiness) = watch_readiness(&server, ServingStatus::Serving).await;
    let mut client = connect(server.addr).await;

    let mut stream = open_load(&mut client, load("demo/tiny-sd")).await;
    read_until(&mut stream, "demo/tiny-sd: downloading", |m| {
        assert!(m.step <= 4, "the load went past step 4 although a file stalls: {m:?}");
        m.step == 4 && m.bytes_done > 0
    })
    .await;

    // Taken before the signal: the server's grace starts after this.
    let signalled = Instant::now();
    sigint(&server);
    assert_eq!(next_readiness(&server, &mut readiness).await, ServingStatus::NotServing);
    let (messages, end) = end_of(stream).await;
    let status = end.expect_err("the stalled load does not succeed");
    assert_eq!(status.code(), Code::Unavailable, "the load in flight ends with UNAVAILABLE: {status:?} {messages:?}");
    assert_eq!(status.message(), "the server is shutting down", "{status:?}");
    // The health Watch is a stream the server does not end; the client leaves it.
    drop((readiness, health));

    let exit = server.wait_exit(grace.saturating_sub(signalled.elapsed())).await;
    let log = log_after_exit_0(&server, exit).await;
    let received = line_index(&log, "SIGINT received");
    assert!(!has_line(&log, "SIGTERM received"), "{}", log.join("\n"));
    assert!(received < line_index(&log, "shutting down"), "{}", log.join("\n"));
    for warn in [LOADS_DID_NOT_END, CONNECTIONS_STILL_OPEN] {
        assert!(!has_line(&log, warn), "{warn:?} logged:\n{}", log.join("\n"));
    }
}

/// Shutdown drops every LOADED model: each one's unload line, with the bytes it held as
/// `freed_bytes`, is logged after "shutting down" and before "shut down", and the process exits 0.
#[tokio::test]
async fn shutdown_unloads_every_loaded_model() {
    let root = tempfile::tempdir().expect("root");
    fixture::demo_tiny_sd(&root.path().join("demo/tiny-sd")).expect("demo fixture");
    fixture::single_file_model(&root.path().join("small"), &fixture::f32_tensors("w", 4, 1000)).expect("fixture");
    let mut server = Binary::start(
        &["--model-root", root.path().to_str().expect("a UTF-8 path"), "--offline", "--shutdown-grace", "10s"],
        &[],
    )
    .await;
    let mut client = connect(server.addr).await;
    let mut held = Vec::new();
    for id in ["demo/tiny-sd", "small"] {
        load_ok(&mut client, load(id)).await;
        let status = tests::get_model(&mut client, id).await;
        assert_eq!(status.state(), pb::ModelState::Loaded, "{status:?}");
        assert!(status.weight_bytes > 0, "{status:?}");
        held.push((id, status.weight_bytes + status.metadata_bytes));
    }
    drop(client);

    server.sigterm();
    let exit = server.wait_exit(WAIT).await;
    let log = log_after_exit_0(&server, exit).await;
    let (shutting_down, shut_down) = (line_index(&log, "shutting down"), line_index(&log, " shut down"));
    for (id, bytes) in held {
        // `model unloaded model_id="demo/tiny-sd" freed_bytes=2839824` (the id quoted or not).
        let fields = |l: &str| -> Vec<String> { l.split_whitespace().map(|f| f.replace('"', "")).collect() };
        let unloaded = log
            .iter()
            .position(|l| {
                let fields = fields(l);
                l.contains(" model unloaded ")
                    && fields.contains(&format!("model_id={id}"))
                    && fields.contains(&format!("freed_bytes={bytes}"))
            })
            .unwrap_or_else(|| panic!("no unload line of {id} freeing {bytes} bytes:\n{}", log.join("\n")));
        assert!(
            shutting_down < unloaded && unloaded < shut_down,
            "{id} is unloaded during shutdown:\n{}",
            log.join("\n")
        );
    }
}

/// The grace runs out on a load that cannot stop in time: a load converting one large tensor in
/// step 7 sees the shutdown's cancel only when the conversion returns. With `--shutdown-grace
/// 100ms` the log says the loads did not end (and, as the load's stream is still open, that
/// connections were closed), and the process still exits 0 soon after the grace; the load's
/// stream ends with the connection.
#[tokio::test]
async fn the_grace_runs_out_on_a_load_that_cannot_stop() {
    let root = tempfile::tempdir().expect("root");
    one_large_tensor(root.path());
    let grace = Duration::from_millis(100);
    let mut server = start_local(root.path(), &["--shutdown-grace", "100ms"]).await;
    let mut client = connect(server.addr).await;
    let mut converting = open_load(&mut client, converted(LARGE)).await;
    read_until(&mut converting, "large: step 7", |m| m.step == 7).await;

    // Taken before the signal: the server's grace starts after this.
    let signalled = Instant::now();
    server.sigterm();
    let exit = server.wait_exit(grace + Duration::from_secs(10)).await;
    let took = signalled.elapsed();
    let log = log_after_exit_0(&server, exit).await;
    assert!(took >= grace, "the process waited for the grace ({took:?}):\n{}", log.join("\n"));
    let order = ["shutting down", LOADS_DID_NOT_END, CONNECTIONS_STILL_OPEN, " shut down"].map(|l| line_index(&log, l));
    assert!(order.is_sorted(), "lines in this order {order:?}:\n{}", log.join("\n"));
    let (_, end) = end_of(converting).await;
    assert!(end.is_err(), "the converting load's stream does not end well");
}

/// The model of [`one_large_tensor`].
const LARGE: &str = "large";

/// A model of one F32 tensor of 2^27 elements (512 MiB) under `root`: converting it to BF16 in
/// step 7 is one call that checks no cancellation, seconds long in the debug binary.
fn one_large_tensor(root: &std::path::Path) {
    fixture::single_file_model(&root.join(LARGE), &fixture::f32_tensors("w", 1, 1 << 27)).expect("fixture");
}

/// A LoadModel of `id` converting its floats to BF16.
fn converted(id: &str) -> pb::LoadModelRequest {
    pb::LoadModelRequest { dtype: Some("bf16".into()), ..load(id) }
}

/// The real binary serving the model root `root` offline, with `args`.
async fn start_local(root: &std::path::Path, args: &[&str]) -> Binary {
    let root = root.to_str().expect("a UTF-8 path");
    Binary::start(&[&["--model-root", root, "--offline"], args].concat(), &[]).await
}

/// An open health Watch does not hold up shutdown: the readiness Watch reports only NOT_SERVING,
/// then ends with UNAVAILABLE, and the process exits 0 long before its (60 s) grace, with no word
/// of connections still open.
#[tokio::test]
async fn an_open_health_watch_ends_at_shutdown() {
    let models = fixture::repo_models_dir();
    let mut server = Binary::start(
        &["--model-root", models.to_str().expect("a UTF-8 path"), "--offline", "--shutdown-grace", "60s"],
        &[],
    )
    .await;
    let (_health, mut readiness) = watch_readiness(&server, ServingStatus::Serving).await;

    server.sigterm();
    let end = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match readiness.next().await {
                Some(Ok(report)) => assert_eq!(report.status(), ServingStatus::NotServing),
                end => break end,
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("the Watch is still open 20 s into a 60 s grace:\n{}", server.log().join("\n")));
    match end {
        Some(Err(status)) if status.code() == Code::Unavailable => {}
        // The process may be gone, its connection reset, before this client read the end.
        Some(Err(status)) if status.message().contains("connection") => {}
        other => panic!("the Watch ends with UNAVAILABLE, not {other:?}"),
    }
    let exit = server.wait_exit(Duration::from_secs(20)).await;
    let log = log_after_exit_0(&server, exit).await;
    assert!(!has_line(&log, CONNECTIONS_STILL_OPEN), "{}", log.join("\n"));
}

/// SIGHUP never kills the server, with nothing to reload (no `--auth-token-file`): it logs that,
/// keeps answering, then exits 0 on SIGTERM and removes its attach socket.
#[tokio::test]
async fn sighup_without_tokens_keeps_serving() {
    let root = tempfile::tempdir().expect("root");
    let socket = root.path().join("attach.sock");
    let mut server = Binary::start(
        &[
            "--model-root",
            root.path().to_str().expect("a UTF-8 path"),
            "--offline",
            "--attach-socket",
            socket.to_str().expect("a UTF-8 path"),
        ],
        &[],
    )
    .await;
    let mut client = connect(server.addr).await;
    client.list_models(pb::ListModelsRequest::default()).await.expect("ListModels before SIGHUP");
    let status =
        std::process::Command::new("kill").args(["-HUP", "--", &server.pid().to_string()]).status().expect("run kill");
    assert!(status.success(), "kill -HUP failed");
    server.wait_for_line(|l| l.contains("SIGHUP received")).await;
    client.list_models(pb::ListModelsRequest::default()).await.expect("ListModels after SIGHUP");
    assert!(socket.exists(), "the socket is still served");
    server.sigterm();
    let exit = server.wait_exit(WAIT).await;
    log_after_exit_0(&server, exit).await;
    assert!(!socket.exists(), "the socket is removed at exit");
}

/// WatchModels streams end with UNAVAILABLE at shutdown, as LoadModel streams do, so a watcher
/// can tell the server going away from a normal end; the process still exits 0.
#[tokio::test]
async fn watch_streams_end_unavailable_at_shutdown() {
    let root = tempfile::tempdir().expect("root");
    fixture::single_file_model(&root.path().join("small"), &fixture::f32_tensors("w", 2, 100)).expect("fixture");
    let mut server = Binary::start(
        &["--model-root", root.path().to_str().expect("a UTF-8 path"), "--offline", "--shutdown-grace", "10s"],
        &[],
    )
    .await;
    let mut client = connect(server.addr).await;
    let mut streams = Vec::new();
    for model_id in ["", "small"] {
        let request = pb::WatchModelsRequest { model_id: model_id.into() };
        let mut stream = tokio::time::timeout(WAIT, client.watch_models(request))
            .await
            .expect("WatchModels answers")
            .expect("WatchModels")
            .into_inner();
        let snapshot = tokio::time::timeout(WAIT, stream.next()).await.expect("the snapshot comes");
        assert!(matches!(snapshot, Some(Ok(_))), "{snapshot:?}");
        streams.push(stream);
    }

    server.sigterm();
    for mut stream in streams {
        let end = loop {
            match tokio::time::timeout(WAIT, stream.next()).await.expect("the watch ends at shutdown") {
                Some(Ok(_)) => {}
                end => break end,
            }
        };
        let status = match end {
            Some(Err(status)) => status,
            other => panic!("a watch ended without a status: {other:?}"),
        };
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        assert_eq!(status.message(), "the server is shutting down", "{status:?}");
    }
    let exit = server.wait_exit(WAIT).await;
    log_after_exit_0(&server, exit).await;
}
