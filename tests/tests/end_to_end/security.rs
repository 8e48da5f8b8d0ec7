//! SPEC §11 against the real binary: bearer tokens through the real grpcurl (none, unknown,
//! read, admin; reloaded on SIGHUP), TLS and mutual TLS with certificates made by `openssl`
//! (a client with a certificate of another CA is refused), and the connection limits (2,000 idle
//! connections while health still answers, idle and half-open connections closed, WatchModels
//! past --max-watchers RESOURCE_EXHAUSTED while the others keep working).
use crate::path;

use std::time::Duration;

use proto::v1 as pb;
use tests::{
    WAIT,
    binary::{Binary, grpcurl},
    connect,
    tls::{make_ca, make_cert},
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;

const LOAD: &str = "modelloader.v1.ModelLoader/LoadModel";
const LIST: &str = "modelloader.v1.ModelLoader/ListModels";
const HEALTH: &str = "grpc.health.v1.Health/Check";

/// grpcurl over plaintext to `server`, with `header` if given, and the rest of `args`.
async fn call(server: &Binary, header: Option<&str>, args: &[&str]) -> tests::binary::GrpcurlOutput {
    let addr = server.addr.to_string();
    let mut all = vec!["-plaintext"];
    if let Some(header) = header {
        all.extend(["-H", header]);
    }
    all.extend_from_slice(&args[..args.len() - 1]);
    all.push(&addr);
    all.push(args[args.len() - 1]);
    grpcurl(&all).await
}

/// Without a token the service is UNAUTHENTICATED, and so is an unknown token; a `read` token
/// lists but may not load (PERMISSION_DENIED); an `admin` token loads. Health and reflection
/// answer without a token. After the file changes and SIGHUP, the old token is unknown and the
/// new one works; no token appears in the log.
#[tokio::test]
async fn tokens_gate_the_service_and_reload_on_sighup() {
    let root = crate::small_model_root();
    let tokens = root.path().join("tokens");
    std::fs::write(&tokens, "admin:admin-secret-1\nread:reader-secret-1\n").expect("tokens");
    let server =
        Binary::start(&["--model-root", path(root.path()), "--offline", "--auth-token-file", path(&tokens)], &[]).await;
    let load = ["-d", r#"{"model_id":"small"}"#, LOAD];

    let out = call(&server, None, &[LIST]).await;
    assert!(out.stderr.contains("Code: Unauthenticated"), "no token: {}", out.stderr);
    let out = call(&server, Some("authorization: Bearer wrong"), &[LIST]).await;
    assert!(out.stderr.contains("Code: Unauthenticated") && out.stderr.contains("unknown token"), "{}", out.stderr);
    let out = call(&server, Some("authorization: Bearer reader-secret-1"), &[LIST]).await;
    assert!(out.success, "a read token lists: {}", out.stderr);
    let out = call(&server, Some("authorization: Bearer reader-secret-1"), &load).await;
    assert!(out.stderr.contains("Code: PermissionDenied"), "a read token may not load: {}", out.stderr);
    let out = call(&server, Some("authorization: Bearer admin-secret-1"), &load).await;
    assert!(out.success, "an admin token loads: {}", out.stderr);
    assert_eq!(out.messages().last().map(|m| m["step"].clone()), Some(8.into()), "{}", out.stdout);
    let out = call(&server, None, &[HEALTH]).await;
    assert_eq!(out.messages()[0]["status"], "SERVING", "health is open: {}", out.stderr);
    let out = call(&server, None, &["list"]).await;
    assert!(out.stdout.contains("modelloader.v1.ModelLoader"), "reflection is open: {}", out.stderr);
    // The v2 protocol: the same tokens, its probes open.
    let v2_load = ["-d", r#"{"model_name":"small"}"#, "inference.GRPCInferenceService/RepositoryModelLoad"];
    let out = call(&server, Some("authorization: Bearer reader-secret-1"), &v2_load).await;
    assert!(out.stderr.contains("Code: PermissionDenied"), "a read token may not load through v2: {}", out.stderr);
    let out = call(&server, None, &["inference.GRPCInferenceService/RepositoryIndex"]).await;
    assert!(out.stderr.contains("Code: Unauthenticated"), "the v2 index needs a token: {}", out.stderr);
    let out = call(&server, None, &["inference.GRPCInferenceService/ServerLive"]).await;
    assert_eq!(out.messages()[0]["live"], true, "ServerLive is open: {}", out.stderr);

    std::fs::write(&tokens, "admin:admin-secret-2\n").expect("new tokens");
    let status = std::process::Command::new("kill").args(["-HUP", &server.pid().to_string()]).status().expect("kill");
    assert!(status.success());
    server.wait_for_line(|l| l.contains("auth tokens reloaded")).await;
    let out = call(&server, Some("authorization: Bearer admin-secret-1"), &[LIST]).await;
    assert!(out.stderr.contains("Code: Unauthenticated"), "the old token is gone: {}", out.stderr);
    let out = call(&server, Some("authorization: Bearer admin-secret-2"), &[LIST]).await;
    assert!(out.success, "the new token works: {}", out.stderr);
    let log = server.log().join("\n");
    for secret in ["admin-secret-1", "reader-secret-1", "admin-secret-2"] {
        assert!(!log.contains(secret), "{secret} is never logged:\n{log}");
    }
}

/// TLS with mutual authentication: grpcurl with the CA and a client certificate of the client
/// CA is served; without a client certificate, or with one of another CA, the handshake fails
/// and nothing is served; plaintext gets nothing either. After the server's certificate files
/// are replaced (a new server certificate from a new CA), new connections get the new one: a
/// client trusting only the old CA is refused, one trusting the new CA is served.
#[tokio::test]
async fn tls_and_mutual_tls_with_real_certificates_reloaded_when_they_change() {
    let root = crate::small_model_root();
    let pki = tempfile::tempdir().expect("pki");
    let dir = pki.path();
    make_ca(dir, "ca");
    make_ca(dir, "clients");
    make_ca(dir, "rogue");
    make_cert(dir, "ca", "server", "serverAuth");
    make_cert(dir, "clients", "client", "clientAuth");
    make_cert(dir, "rogue", "intruder", "clientAuth");
    let server = Binary::start(
        &[
            "--model-root",
            path(root.path()),
            "--offline",
            "--tls-cert",
            path(&dir.join("server.crt")),
            "--tls-key",
            path(&dir.join("server.key")),
            "--tls-client-ca",
            path(&dir.join("clients.crt")),
        ],
        &[],
    )
    .await;
    let addr = server.addr.to_string();
    let with = |ca: &str, client: Option<&str>| {
        let mut args = vec!["-cacert".to_owned(), path(&dir.join(format!("{ca}.crt"))).to_owned()];
        if let Some(client) = client {
            args.extend(["-cert".into(), path(&dir.join(format!("{client}.crt"))).into()]);
            args.extend(["-key".into(), path(&dir.join(format!("{client}.key"))).into()]);
        }
        args.extend(["-servername".into(), "localhost".into(), addr.clone(), LIST.into()]);
        args
    };
    let run = |args: Vec<String>| async move { grpcurl(&args.iter().map(String::as_str).collect::<Vec<_>>()).await };

    let out = run(with("ca", Some("client"))).await;
    assert!(out.success, "a client of the client CA is served over TLS: {}", out.stderr);
    assert!(out.stdout.contains("small"), "{}", out.stdout);
    let out = run(with("ca", None)).await;
    assert!(!out.success, "no client certificate: refused");
    let out = run(with("ca", Some("intruder"))).await;
    assert!(!out.success, "a client certificate of another CA: refused");
    let out = grpcurl(&["-plaintext", &addr, LIST]).await;
    assert!(!out.success, "plaintext is not served");

    // Rotation: a new CA signs a new server certificate, written over the old files.
    make_ca(dir, "ca2");
    make_cert(dir, "ca2", "server2", "serverAuth");
    std::fs::copy(dir.join("server2.key"), dir.join("server.key")).expect("rotate the key");
    std::fs::copy(dir.join("server2.crt"), dir.join("server.crt")).expect("rotate the certificate");
    let out = run(with("ca2", Some("client"))).await;
    assert!(out.success, "the rotated certificate is served: {}", out.stderr);
    server.wait_for_line(|l| l.contains("TLS files changed: reloaded")).await;
    let out = run(with("ca", Some("client"))).await;
    assert!(!out.success, "the old certificate is no longer served");
}

/// Opens a TCP connection that sends only the HTTP/2 client preface, then nothing.
async fn half_open(addr: std::net::SocketAddr) -> tokio::net::TcpStream {
    let mut socket = tokio::net::TcpStream::connect(addr).await.expect("connect");
    socket.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await.expect("preface");
    socket
}

/// Whether the server closed `socket` within `limit` (it reads end-of-file or an error).
async fn closed_within(socket: &mut tokio::net::TcpStream, limit: Duration) -> bool {
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, socket.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => return true,
            Ok(Ok(_)) => {} // the server's SETTINGS
            Err(_) => return false,
        }
    }
}

/// 2,000 connections that send only the HTTP/2 preface, against the server with the default
/// flags under a limit of 1,024 open files (as in a container): the server stays up, health
/// answers from new connections (grpcurl and a tonic client) while they are open, and a model
/// loads; at most `--max-connections` (1,000) are held at once, and the cap is logged. (Without
/// the cap, the server ran out of file descriptors: new clients timed out, nothing was logged.)
#[tokio::test]
async fn two_thousand_idle_connections_do_not_lock_out_health() {
    let root = crate::small_model_root();
    let mut command = tokio::process::Command::new("prlimit");
    command
        .args(["--nofile=1024:1024", "--"])
        .arg(tests::binary::binary_path())
        .args(["--listen", "127.0.0.1:0", "--model-root", path(root.path()), "--offline"])
        .args(["--metrics-listen", "127.0.0.1:0"]);
    let mut server = Binary::spawn(command);
    server.addr = server.logged_addr("serving modelloader.v1.ModelLoader").await;
    let mut idle = Vec::new();
    for _ in 0..2000 {
        idle.push(half_open(server.addr).await);
    }
    let out = grpcurl(&["-plaintext", "-max-time", "20", &server.addr.to_string(), HEALTH]).await;
    assert!(out.success, "health answers with 2,000 idle connections around: {}", out.stderr);
    assert_eq!(out.messages()[0]["status"], "SERVING", "{}", out.stdout);
    let mut client = connect(server.addr).await;
    let (_, end) = tests::load_all(&mut client, tests::load("small")).await;
    end.expect("a model loads with 2,000 idle connections around");
    let metrics_addr = server.logged_addr("serving /metrics").await;
    let metrics = reqwest_text(metrics_addr).await;
    let open: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("model_loader_connections "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no connections gauge:\n{metrics}"));
    assert!(open <= 1000.0, "at most 1,000 open: {open}");
    assert!(server.log().iter().any(|l| l.contains("connection limit reached")), "the cap is logged");
    drop(idle);
}

/// GET /metrics over a plain TCP socket (HTTP/1.0, read to the end).
async fn reqwest_text(addr: std::net::SocketAddr) -> String {
    let mut socket = tokio::net::TcpStream::connect(addr).await.expect("connect to /metrics");
    socket.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n").await.expect("request");
    let mut body = String::new();
    tokio::time::timeout(WAIT, socket.read_to_string(&mut body)).await.expect("metrics answer").expect("read");
    body
}

/// A connection that stops after the preface is closed at `--handshake-timeout`, one with no
/// request in flight at `--idle-timeout`; one with a WatchModels stream open stays.
#[tokio::test]
async fn idle_and_half_open_connections_are_closed() {
    let root = crate::small_model_root();
    let server = Binary::start(
        &["--model-root", path(root.path()), "--offline", "--handshake-timeout", "2s", "--idle-timeout", "2s"],
        &[],
    )
    .await;
    let mut watching = connect(server.addr).await;
    let mut stream = watching
        .watch_models(pb::WatchModelsRequest { model_id: String::new() })
        .await
        .expect("WatchModels")
        .into_inner();
    stream.message().await.expect("the snapshot");

    // Opened after the stream's last message, so once they are closed (at the 2 s timeouts) the
    // stream's connection has had no message for longer than the idle timeout too.
    let mut half = half_open(server.addr).await;
    let mut silent = tokio::net::TcpStream::connect(server.addr).await.expect("connect");
    assert!(closed_within(&mut half, Duration::from_secs(20)).await, "a half-open connection is closed");
    assert!(closed_within(&mut silent, Duration::from_secs(20)).await, "a silent connection is closed");

    // Past the idle timeout with the stream open, the stream still carries events.
    let mut other = connect(server.addr).await;
    tests::load_all(&mut other, tests::load("small")).await.1.expect("loads");
    let event = tokio::time::timeout(WAIT, stream.message()).await.expect("an event").expect("the stream is alive");
    assert!(event.is_some(), "a connection with a stream open is not idle");
}

/// Past `--max-watchers 2`, WatchModels is RESOURCE_EXHAUSTED; the two open streams keep
/// working, and once one ends a new watcher is served.
#[tokio::test]
async fn watchers_past_the_limit_are_resource_exhausted() {
    let root = crate::small_model_root();
    let server = Binary::start(&["--model-root", path(root.path()), "--offline", "--max-watchers", "2"], &[]).await;
    let mut client = connect(server.addr).await;
    let watch = || pb::WatchModelsRequest { model_id: String::new() };
    let mut first = client.watch_models(watch()).await.expect("first").into_inner();
    let mut second = client.watch_models(watch()).await.expect("second").into_inner();
    let refused = client.watch_models(watch()).await.expect_err("a third watcher is refused");
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(refused.message().contains("--max-watchers"), "{refused:?}");
    for stream in [&mut first, &mut second] {
        stream.message().await.expect("snapshot").expect("a snapshot");
    }
    tests::load_all(&mut client, tests::load("small")).await.1.expect("loads");
    assert!(first.message().await.expect("events").is_some(), "the first watcher still gets events");
    drop(first);
    // The permit goes back when the server sees the stream dropped: retry within the wait.
    tests::eventually!(
        match client.watch_models(watch()).await {
            Ok(_) => true,
            Err(s) if s.code() == Code::ResourceExhausted => false,
            Err(s) => panic!("a watcher after one left: {s:?}"),
        },
        "no watcher is served after one left"
    );
}
