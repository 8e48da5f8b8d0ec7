//! End to end: the real `model-loader` binary, driven by the real `grpcurl` with the README's own
//! command lines, and by a gRPC client through SIGTERM.

use std::time::Duration;

use proto::v1 as pb;
use serde_json::Value;
use tests::{
    WAIT,
    binary::{Binary, grpcurl, sh},
    connect, fixture, load,
};
use tokio_stream::StreamExt;
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};

fn readme() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).expect("README")
}

/// The grpcurl lines of the README, in order.
fn readme_grpcurl_lines() -> Vec<String> {
    readme().lines().map(str::trim).filter(|l| l.starts_with("grpcurl ")).map(str::to_owned).collect()
}

/// The lines of the README's Quick-start code block, as printed (comments included).
fn readme_quick_start() -> Vec<String> {
    let readme = readme();
    let section = readme.split_once("\n## Quick start").expect("a Quick start section").1;
    let block = section.split("```").nth(1).expect("a code block in the Quick start");
    block.lines().skip(1).filter(|l| !l.trim().is_empty()).map(str::to_owned).collect()
}

fn steps_of(messages: &[Value]) -> Vec<u64> {
    let mut steps: Vec<u64> = messages.iter().filter_map(|m| m["step"].as_u64()).collect();
    steps.dedup();
    steps
}

/// The README's first Quick-start line, run literally from the repository root as a newcomer
/// would (`sh -c`, nothing replaced), serves the bundled demo on 127.0.0.1:50051: health is SERVING
/// there, and the README's LoadModel line loads the demo to step 8/8. `just test` builds the
/// release binary first, so here cargo only checks that it is fresh.
#[tokio::test]
async fn readme_quick_start_serves_the_demo() {
    let quick_start = readme_quick_start();
    assert_eq!(quick_start.len(), 2, "the Quick start is two lines: {quick_start:?}");
    let first = &quick_start[0];
    let repo_root = fixture::repo_models_dir().join("..");
    // The README's address is fixed: a clear failure if something else holds it.
    drop(std::net::TcpListener::bind("127.0.0.1:50051").expect("127.0.0.1:50051 is free for the Quick start's server"));

    let mut command = tokio::process::Command::new("sh");
    command.args(["-c", first]).current_dir(&repo_root).process_group(0);
    // What `cargo test` sets for its tests is not in a newcomer's shell.
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy();
        if key.starts_with("CARGO_") && !["CARGO_HOME", "CARGO_TARGET_DIR"].contains(&key.as_ref()) {
            command.env_remove(key.as_ref());
        }
    }
    let mut server = Binary::spawn(command);
    // Bounded generously: without `just test`'s build first, this is a whole release build.
    let line = server
        .wait_for_line_within(Duration::from_secs(30 * 60), |l| l.contains("serving modelloader.v1.ModelLoader"))
        .await;
    assert!(line.contains("addr=127.0.0.1:50051"), "the README's address: {line}");

    let channel = tonic::transport::Channel::from_static("http://127.0.0.1:50051").connect_lazy();
    let health = tokio::time::timeout(
        WAIT,
        HealthClient::new(channel).check(HealthCheckRequest { service: "modelloader.v1.ModelLoader".into() }),
    )
    .await
    .expect("health answers")
    .expect("health check");
    assert_eq!(health.into_inner().status(), ServingStatus::Serving);

    let load_line = readme_grpcurl_lines().into_iter().find(|l| l.ends_with("/LoadModel")).expect("a LoadModel line");
    let out = sh(&load_line).await;
    assert!(out.success, "{load_line}\nfailed: {}{}", out.stdout, out.stderr);
    let messages = out.messages();
    assert_eq!(steps_of(&messages), (1..=8).collect::<Vec<_>>(), "{}", out.stdout);
    let last = messages.last().expect("messages");
    assert_eq!((last["step"].as_u64(), last["total"].as_u64()), (Some(8), Some(8)), "{last}");

    // SIGTERM to the server (the shell, if it did not exec cargo, exits with the server's status).
    server.sigterm_in_group("model-loader");
    let exit = server.wait_exit(Duration::from_secs(15)).await;
    assert!(exit.success(), "exit status {exit:?}; log:\n{}", server.log().join("\n"));
    // The log reader may still be behind the exit: wait for the line (the log is complete once
    // the process closed stderr).
    server.wait_for_line(|l| l.contains("shut down")).await;
}

/// Every grpcurl command printed in the README works as written against the real binary started
/// from the repository root with no flags but the port (so with the bundled demo model), and the
/// log holds one step line per step.
#[tokio::test]
async fn readme_grpcurl_commands_work() {
    let repo_root = fixture::repo_models_dir().join("..");
    // What the demo books: the committed model is the fixture's (load::committed_demo_model_is_reproducible).
    let tmp = tempfile::tempdir().expect("tmp");
    let demo = fixture::demo_tiny_sd(tmp.path()).expect("demo");
    let server = Binary::start_in(&repo_root, &[], &[]).await;
    let lines = readme_grpcurl_lines();
    assert!(lines.len() >= 10, "the README shows the grpcurl commands: {lines:?}");
    let addr = server.addr.to_string();

    for line in &lines {
        let line = line.replace("127.0.0.1:50051", &addr);
        let method = line.split_whitespace().last().expect("a method").to_owned();
        let is_watch = method.ends_with("/WatchModels");
        // WatchModels never ends by itself: give it two seconds and read what it printed.
        let out = sh(&if is_watch { format!("timeout 2 {line}") } else { line.clone() }).await;
        assert!(out.success || is_watch, "{line}\nfailed: {}{}", out.stdout, out.stderr);
        check_readme_output(&line, &method, &out, &demo);
    }

    // One step line per step and load (each load line runs after the demo was unloaded), in the
    // exact format.
    let loads = lines.iter().filter(|l| l.ends_with("/LoadModel") || l.ends_with("/RepositoryModelLoad")).count();
    let log = server.log();
    for (n, msg, phase) in tests::STEPS {
        let line = format!("demo/tiny-sd step={n}/8 phase={} msg=\"{msg}\"", tests::phase_name(phase));
        let count = log.iter().filter(|l| l.ends_with(&line)).count();
        assert_eq!(count, loads, "{line:?} appears {count} times in:\n{}", log.join("\n"));
    }
}

/// What the README's grpcurl `line` calling `method` printed, checked for that method.
fn check_readme_output(line: &str, method: &str, out: &tests::binary::GrpcurlOutput, demo: &fixture::Expected) {
    let text = &out.stdout;
    match method.rsplit('/').next().expect("name") {
        "LoadModel" => {
            let messages = out.messages();
            assert_eq!(steps_of(&messages), (1..=8).collect::<Vec<_>>(), "{text}");
            assert!(messages.iter().all(|m| m["total"] == 8));
            let bytes: Vec<_> = messages.iter().filter(|m| m["bytesTotal"].is_string()).collect();
            assert!(!bytes.is_empty(), "byte progress inside step 4");
            assert!(bytes.iter().all(|m| m["step"] == 4));
            assert_eq!(bytes.last().map(|m| m["bytesDone"].clone()), bytes.last().map(|m| m["bytesTotal"].clone()));
        }
        "GetModel" => {
            let status = &out.messages()[0];
            assert_eq!(status["state"], "MODEL_STATE_LOADED", "{text}");
            assert_eq!(status["sampleSize"], 32, "{text}");
        }
        "ListTensors" => {
            let tensors = out.messages()[0]["tensors"].as_array().expect("tensors").clone();
            assert_eq!(tensors.len(), 18, "{text}");
            assert!(tensors.iter().all(|t| t["sha256"].as_str().is_some_and(|s| s.len() == 64)));
        }
        "GetModelFiles" => {
            let files = out.messages()[0]["files"].as_array().expect("files").clone();
            let paths: Vec<&str> = files.iter().filter_map(|f| f["path"].as_str()).collect();
            let want = ["model_index.json", "scheduler/scheduler_config.json", "unet/config.json", "vae/config.json"];
            assert_eq!(paths, want, "{text}");
            assert!(files.iter().all(|f| f["sha256"].as_str().is_some_and(|s| s.len() == 64)), "{text}");
        }
        "GetResources" => {
            let cpu = &out.messages()[0]["devices"][0];
            assert_eq!(cpu["name"], "cpu");
            assert_eq!(cpu["usedBytes"], demo.booked().to_string(), "{text}");
        }
        "ListModels" => assert!(text.contains("\"demo/tiny-sd\""), "{text}"),
        "UnloadModel" => assert_eq!(out.messages()[0]["wasLoaded"], true, "{text}"),
        // The KServe v2 protocol: the load returns once the model is loaded, and the index
        // then lists it READY.
        "RepositoryModelLoad" => assert_eq!(out.messages(), [serde_json::json!({})], "{text}"),
        "RepositoryIndex" => {
            let models = out.messages()[0]["models"].as_array().cloned().unwrap_or_default();
            let demo = models.iter().find(|m| m["name"] == "demo/tiny-sd");
            assert_eq!(
                demo.map(|m| (m["state"].clone(), m["version"].clone())),
                Some(("READY".into(), "1".into())),
                "{text}"
            );
        }
        "list" => {
            for service in [
                "modelloader.v1.ModelLoader",
                "grpc.health.v1.Health",
                "grpc.reflection.v1.ServerReflection",
                "grpc.reflection.v1alpha.ServerReflection",
                "inference.GRPCInferenceService",
            ] {
                assert!(text.lines().any(|l| l == service), "{service} missing from:\n{text}");
            }
        }
        "Check" => assert_eq!(out.messages()[0]["status"], "SERVING", "{text}"),
        "WatchModels" => {
            let first = &out.messages()[0];
            assert!(first["status"]["modelId"].is_string(), "a snapshot comes first: {text}");
        }
        "CancelLoad" => assert!(out.messages()[0].get("wasLoading").is_none_or(|v| v == false), "{text}"),
        _ if line.contains(" describe ") => {
            assert!(text.contains("// Loads, watches, cancels and unloads models"), "proto comments: {text}");
            assert!(text.contains("rpc LoadModel"), "{text}");
        }
        other => panic!("the README shows a grpcurl command this test does not check: {other}"),
    }
}

/// A malformed request through grpcurl gets INVALID_ARGUMENT, a missing model NOT_FOUND with its
/// kind in the trailers, and the server keeps serving.
#[tokio::test]
async fn grpcurl_sees_error_codes() {
    let models = fixture::repo_models_dir();
    let server = Binary::start(&["--model-root", models.to_str().expect("utf-8 path"), "--offline"], &[]).await;
    let addr = server.addr.to_string();
    let out =
        grpcurl(&["-plaintext", "-d", r#"{"model_id":"../x"}"#, &addr, "modelloader.v1.ModelLoader/LoadModel"]).await;
    assert!(!out.success);
    assert!(out.stderr.contains("Code: InvalidArgument"), "{}", out.stderr);
    // -v shows the trailers: the error's stable kind rides beside the code.
    let out = grpcurl(&[
        "-plaintext",
        "-v",
        "-d",
        r#"{"model_id":"no/such"}"#,
        &addr,
        "modelloader.v1.ModelLoader/LoadModel",
    ])
    .await;
    assert!(out.stderr.contains("Code: NotFound"), "{}", out.stderr);
    let all = format!("{}{}", out.stdout, out.stderr);
    assert!(all.contains("model-loader-error-kind: not_found"), "{all}");
    // The kinds are documented where grpcurl users look: the proto's comments.
    let out = grpcurl(&["-plaintext", &addr, "describe", "modelloader.v1.ModelStatus"]).await;
    assert!(out.stdout.contains("string error_kind = 14;"), "{}", out.stdout);
    assert!(out.stdout.contains("model-loader-error-kind"), "{}", out.stdout);
    assert!(out.stdout.contains("uint64 last_used_unix_ms = 15;"), "{}", out.stdout);
    let out = grpcurl(&["-plaintext", &addr, "grpc.health.v1.Health/Check"]).await;
    assert_eq!(out.messages()[0]["status"], "SERVING", "{}", out.stdout);
}

/// SIGTERM during a load: readiness turns NOT_SERVING, the load's stream ends, and the process
/// exits 0 within --shutdown-grace.
#[tokio::test]
async fn sigterm_during_a_load_drains_and_exits() {
    let tmp = tempfile::tempdir().expect("tmp");
    fixture::large_sharded_model(&tmp.path().join("big"), 768, 3, 4).expect("fixture");
    let grace = Duration::from_secs(5);
    let mut server =
        Binary::start(&["--model-root", tmp.path().to_str().expect("utf-8 path"), "--shutdown-grace", "5s"], &[]).await;
    let channel =
        tonic::transport::Channel::from_shared(format!("http://{}", server.addr)).expect("uri").connect_lazy();
    let mut health = HealthClient::new(channel);
    let mut readiness = health
        .watch(HealthCheckRequest { service: "modelloader.v1.ModelLoader".into() })
        .await
        .expect("health watch")
        .into_inner();
    let first = tokio::time::timeout(WAIT, readiness.next()).await.expect("health").expect("open").expect("ok");
    assert_eq!(first.status(), ServingStatus::Serving);

    let mut client = connect(server.addr).await;
    let mut stream = client.load_model(load("big")).await.expect("load").into_inner();
    loop {
        let m: pb::ModelLoadProgress =
            tokio::time::timeout(WAIT, stream.next()).await.expect("moves").expect("open").expect("ok");
        if m.step == 4 && m.bytes_done > 0 {
            break;
        }
    }
    server.sigterm();
    let next = tokio::time::timeout(WAIT, readiness.next()).await.expect("health moves");
    let next = next.expect("the health stream reports before it ends").expect("ok");
    assert_eq!(next.status(), ServingStatus::NotServing);
    // The load's stream ends (with an error: the load was cancelled by the shutdown).
    let mut ended_with = None;
    while let Some(item) = tokio::time::timeout(WAIT, stream.next()).await.expect("stream moves") {
        if let Err(status) = item {
            ended_with = Some(status.code());
            break;
        }
    }
    assert!(ended_with == Some(tonic::Code::Unavailable), "the stream ends with UNAVAILABLE: {ended_with:?}");
    let exit = server.wait_exit(grace + Duration::from_secs(2)).await;
    assert!(exit.success(), "exit status {exit:?}");
    // The log reader may still be behind the exit: wait for the line (the log is complete once
    // the process closed stderr).
    server.wait_for_line(|l| l.contains("shut down")).await;
}

/// A token given to the binary reaches the hub as `Authorization: Bearer …` and appears in no log
/// line, even at trace level.
#[tokio::test]
async fn the_hub_token_is_sent_and_never_logged() {
    use tests::hub::{Access, HubRepo, TestHub};
    let tmp = tempfile::tempdir().expect("tmp");
    fixture::single_file_model(&tmp.path().join("repo"), &fixture::f32_tensors("w", 2, 256)).expect("fixture");
    let token = "hf_secret_token_4f9a0c";
    let repo = HubRepo::from_dir("org/private", &tmp.path().join("repo"))
        .expect("repo")
        .with_access(Access::Token(token.into()));
    let hub = TestHub::start([repo]).await;
    let cache = tmp.path().join("cache");
    let server = Binary::start(
        &[
            "--model-root",
            tmp.path().join("models").to_str().expect("utf-8"),
            "--hf-cache",
            cache.to_str().expect("utf-8"),
        ],
        &[("HF_ENDPOINT", hub.url()), ("HF_TOKEN", token), ("RUST_LOG", "trace")],
    )
    .await;
    let (_, end) = tests::load_all(&mut connect(server.addr).await, load("org/private")).await;
    end.expect("the private repo loads with the token");
    assert!(hub.authorizations().iter().any(|a| a == &format!("Bearer {token}")), "{:?}", hub.authorizations());
    let log = server.log();
    assert!(log.len() > 20, "trace logging is on");
    assert!(!log.iter().any(|l| l.contains(token)), "the token was logged");
}
