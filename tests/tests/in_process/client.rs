//! The typed client (`crates/client`) against an in-process server: typed progress ending in one
//! outcome, joining a load in flight, errors with their kind, pages followed, an unreachable
//! server, a bearer token, https with a CA file and mutual TLS.

use std::time::Duration;

use client::{Client, ConnectOptions, Error, LoadRequest, LoadStream, LoadUpdate, Phase, Progress};
use futures::StreamExt;
use tests::{STEPS, TestServer, WAIT, config, fixture, tls};

/// Reads a load to its end: every progress, and the outcome, which must be the last item.
async fn drain(mut stream: LoadStream) -> (Vec<Progress>, Result<(), Error>) {
    let mut progress = Vec::new();
    loop {
        match tokio::time::timeout(WAIT, stream.next()).await.expect("the load stream moves") {
            Some(LoadUpdate::Progress(p)) => progress.push(p),
            Some(LoadUpdate::Finished(outcome)) => {
                let after = tokio::time::timeout(WAIT, stream.next()).await.expect("the stream ends");
                assert!(after.is_none(), "Finished is the last item: {after:?}");
                return (progress, outcome);
            }
            None => panic!("the stream ended without Finished"),
        }
    }
}

async fn connect(options: &ConnectOptions) -> Client {
    tokio::time::timeout(WAIT, Client::connect(options)).await.expect("connect answers").expect("connect")
}

/// `files` lists a loaded model's small files and `read_file` gives each one's bytes (a file of
/// several chunks whole); a path it does not have is NOT_FOUND with kind not_found.
#[tokio::test]
async fn files_and_read_file_give_a_models_small_files() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("demo/tiny-sd");
    std::fs::create_dir_all(dir.join("tokenizer")).expect("mkdir");
    let vocab: Vec<u8> = (0..(5 << 19)).map(|i: u32| (i % 253) as u8).collect();
    std::fs::write(dir.join("tokenizer/vocab.json"), &vocab).expect("vocab");
    fixture::demo_tiny_sd(&dir).expect("fixture");
    let files = fixture::small_files(&dir).expect("small files");
    let server = TestServer::start(config(tmp.path())).await;
    let client = connect(&ConnectOptions::new(server.addr.to_string())).await;
    let (_, outcome) = drain(client.load(LoadRequest::new("demo/tiny-sd")).await.expect("load")).await;
    outcome.expect("loads");

    let listed = client.files("demo/tiny-sd").await.expect("files");
    let paths: Vec<&str> = listed.iter().map(|f| f.path.as_str()).collect();
    assert_eq!(paths, files.iter().map(|(p, _)| p.as_str()).collect::<Vec<_>>());
    for (path, content) in &files {
        let read = client.read_file("demo/tiny-sd", path).await.expect("read_file");
        assert!(read == *content, "{path}: {} bytes read, {} in the file", read.len(), content.len());
    }
    let missing = client.read_file("demo/tiny-sd", "README.md").await.expect_err("no such file");
    assert_eq!((missing.code(), missing.kind()), (tonic::Code::NotFound, "not_found"), "{missing}");
    server.stop().await;
}

/// A load streams typed progress for steps 1..=8 (the table's phase, bytes to their total) and
/// ends with exactly one Finished(Ok); the model is then LOADED.
#[tokio::test]
async fn load_streams_typed_progress_and_finishes_ok() {
    let tmp = tempfile::tempdir().expect("tmp");
    let expected = fixture::demo_tiny_sd(&tmp.path().join("demo/tiny-sd")).expect("fixture");
    let server = TestServer::start(config(tmp.path())).await;
    let client = connect(&ConnectOptions::new(server.addr.to_string())).await;
    assert_eq!(client.server(), format!("http://{}", server.addr));

    let stream = client.load(LoadRequest::new("demo/tiny-sd")).await.expect("load");
    let (progress, outcome) = drain(stream).await;
    outcome.expect("the load succeeds");
    let mut steps: Vec<u32> = progress.iter().map(|p| p.step).collect();
    steps.dedup();
    assert_eq!(steps, (1..=8).collect::<Vec<_>>());
    for p in &progress {
        let (_, message, phase) = STEPS[(p.step - 1) as usize];
        assert_eq!((p.message.as_str(), p.phase), (message, Phase::from(phase)), "{p:?}");
        assert_eq!((p.total, p.model_id.as_str(), p.raw().step), (8, "demo/tiny-sd", p.step));
    }
    let read = progress.iter().rfind(|p| p.bytes_total > 0).expect("byte progress");
    assert_eq!((read.phase, read.phase.to_string().as_str()), (Phase::Loading, "loading"));
    assert_eq!((read.bytes_done, read.bytes_total), (expected.bytes(), expected.bytes()));

    let status = client.get("demo/tiny-sd").await.expect("get");
    assert_eq!(status.state(), client::pb::ModelState::Loaded);
    server.stop().await;
}

/// A second load of a model while it reads its weights joins that load: both streams end with
/// Finished(Ok) after step 8.
#[tokio::test]
async fn a_second_load_joins_the_load_in_flight() {
    let tmp = tempfile::tempdir().expect("tmp");
    fixture::large_sharded_model(&tmp.path().join("big"), 256, 2, 4).expect("fixture");
    let server = TestServer::start(config(tmp.path())).await;
    let client = connect(&ConnectOptions::new(server.addr.to_string())).await;

    let mut first = client.load(LoadRequest::new("big")).await.expect("load");
    loop {
        match tokio::time::timeout(WAIT, first.next()).await.expect("progress") {
            Some(LoadUpdate::Progress(p)) if p.step == 4 && p.bytes_done > 0 => {
                assert!(p.bytes_done < p.bytes_total, "the load read everything before the join: {p:?}");
                break;
            }
            Some(LoadUpdate::Progress(p)) => assert!(p.step <= 4, "{p:?}"),
            other => panic!("the load ended before step 4: {other:?}"),
        }
    }
    let second = client.load(LoadRequest::new("big")).await.expect("join");
    let (joined, outcome) = drain(second).await;
    outcome.expect("the joined load succeeds");
    // A joiner gets the load's latest message first: a load of its own would start at step 1.
    assert!(joined.first().is_some_and(|p| p.step >= 4), "{:?}", joined.first());
    assert_eq!(joined.last().map(|p| p.step), Some(8));
    let last = first.finish().await.expect("the first load succeeds");
    assert_eq!(last.step, 8);
    server.stop().await;
}

/// A load of a model that does not exist ends with Finished(Err) of code NotFound and kind
/// `not_found`, and its Display is the server's message with the kind, not a debug dump.
#[tokio::test]
async fn a_missing_model_finishes_with_kind_not_found() {
    let tmp = tempfile::tempdir().expect("tmp");
    let server = TestServer::start(config(tmp.path())).await;
    let client = connect(&ConnectOptions::new(format!("http://{}", server.addr))).await;

    let stream = client.load(LoadRequest::new("no/such-model")).await.expect("the stream opens");
    let (_, outcome) = drain(stream).await;
    let error = outcome.expect_err("the load fails");
    assert_eq!((error.code(), error.kind()), (tonic::Code::NotFound, "not_found"), "{error:?}");
    let shown = error.to_string();
    assert!(shown.ends_with(" [not_found]") && shown.contains("no/such-model"), "{shown}");
    assert!(!shown.contains("Status {"), "{shown}");
    server.stop().await;
}

/// `list` follows every page: 7 models with pages of 3 come back whole and in order.
#[tokio::test]
async fn list_follows_every_page() {
    let tmp = tempfile::tempdir().expect("tmp");
    let ids: Vec<String> = (0..7).map(|i| format!("m{i}")).collect();
    for id in &ids {
        fixture::single_file_model(&tmp.path().join(id), &[fixture::TensorSpec::f32("w", &[4], 1)]).expect("fixture");
    }
    let server = TestServer::start(config(tmp.path())).await;
    let client = connect(&ConnectOptions::new(server.addr.to_string())).await.list_page_size(3);
    for id in &ids {
        client.load(LoadRequest::new(id)).await.expect("load").finish().await.expect("loads");
    }
    let listed: Vec<String> = client.list().await.expect("list").into_iter().map(|s| s.model_id).collect();
    assert_eq!(listed, ids);
    server.stop().await;
}

/// A server that is not there: kind `unreachable`, code Unavailable and the message for people.
#[tokio::test]
async fn an_unreachable_server_says_so() {
    // A port that was free a moment ago: bound, then closed.
    let port = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
    let options = ConnectOptions::new(format!("127.0.0.1:{port}")).connect_timeout(Duration::from_secs(5));
    let error = tokio::time::timeout(WAIT, Client::connect(&options)).await.expect("answers").expect_err("refused");
    assert_eq!((error.kind(), error.code()), ("unreachable", tonic::Code::Unavailable));
    let shown = error.to_string();
    assert!(
        shown.starts_with(&format!("cannot reach the server at http://127.0.0.1:{port}: is it running? (")),
        "{shown}"
    );
}

/// With `--auth-token-file` on, the client with the token (from a file) is served and one without
/// is refused with UNAUTHENTICATED.
#[tokio::test]
async fn a_token_is_sent_on_every_call() {
    let tmp = tempfile::tempdir().expect("tmp");
    let (tokens, token_file) = (tmp.path().join("tokens"), tmp.path().join("token"));
    std::fs::write(&tokens, "admin:s3cret-token\n").expect("the server's tokens");
    std::fs::write(&token_file, "  s3cret-token \nignored second line\n").expect("the client's token");
    let mut config = config(tmp.path());
    config.security.auth_token_file = Some(tokens);
    let server = TestServer::start(config).await;

    let with =
        connect(&ConnectOptions::new(server.addr.to_string()).token_file(&token_file).expect("token file")).await;
    assert!(with.list().await.expect("served with the token").is_empty());
    let without = connect(&ConnectOptions::new(server.addr.to_string())).await;
    let error = without.list().await.expect_err("refused without a token");
    assert_eq!(error.code(), tonic::Code::Unauthenticated, "{error:?}");
    let wrong = connect(&ConnectOptions::new(server.addr.to_string()).token("wrong")).await;
    assert_eq!(wrong.resources().await.expect_err("refused").code(), tonic::Code::Unauthenticated);
    server.stop().await;
}

/// https with the CA in a file works; with mutual TLS the client's certificate is required and
/// accepted.
#[tokio::test]
async fn https_with_a_ca_file_and_mutual_tls() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path();
    tls::make_ca(dir, "ca");
    tls::make_ca(dir, "clients");
    tls::make_cert(dir, "ca", "server", "serverAuth");
    tls::make_cert(dir, "clients", "client", "clientAuth");
    let mut config = config(dir);
    config.security.tls =
        Some(server::TlsFiles { cert: dir.join("server.crt"), key: dir.join("server.key"), client_ca: None });
    let server = TestServer::start(config.clone()).await;
    let url = format!("https://localhost:{}", server.addr.port());
    let client = connect(&ConnectOptions::new(&url).ca_file(dir.join("ca.crt"))).await;
    assert!(client.list().await.expect("served over https").is_empty());
    server.stop().await;

    config.security.tls = Some(server::TlsFiles {
        cert: dir.join("server.crt"),
        key: dir.join("server.key"),
        client_ca: Some(dir.join("clients.crt")),
    });
    let server = TestServer::start(config).await;
    let url = format!("https://localhost:{}", server.addr.port());
    let options = ConnectOptions::new(&url).ca_file(dir.join("ca.crt"));
    let mutual = connect(&options.clone().identity(dir.join("client.crt"), dir.join("client.key"))).await;
    assert!(mutual.list().await.expect("served with a client certificate").is_empty());
    // Without a certificate the server ends the handshake (TLS 1.3: after the client thinks it is
    // done), so the connect or the first call fails at the transport; nothing is served.
    let refused = match tokio::time::timeout(WAIT, Client::connect(&options)).await.expect("answers") {
        Ok(client) => client.list().await.expect_err("refused without a client certificate"),
        Err(error) => error,
    };
    assert!(matches!(refused.code(), tonic::Code::Unavailable | tonic::Code::Unknown), "{refused:?}");
    assert!(refused.message().contains("transport error"), "{refused:?}");
    server.stop().await;
}
