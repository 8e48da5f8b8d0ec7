//! Bad input on the attach socket: garbage, a request cut short, a huge length prefix, an unknown
//! model, a client that connects and never speaks, more clients than allowed, and 1,000 clients
//! at once, idle connections filling every place or more than the descriptor limit, a client that
//! never reads its answer, and socket paths that are not ours to take. Each gets an error answer
//! or a close, never a panic or a leak; the server stays healthy and a good client attaches after
//! every one.

use std::{
    io::Write,
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::Duration,
};

use attach::{AttachRequest, AttachResponse, Attached, wire};
use prost::Message;
use tests::{TestServer, binary::Binary, config, fixture, load, load_ok, with_attach};

const TIMEOUT: Duration = Duration::from_secs(30);

/// Sends `bytes` raw (closing the write side after them when `close`) and reads the answer:
/// `Some(response)`, or `None` when the server closed without one.
async fn raw(socket: &Path, bytes: Vec<u8>, close: bool) -> Option<AttachResponse> {
    let socket = socket.to_owned();
    tokio::task::spawn_blocking(move || {
        let mut stream = UnixStream::connect(&socket).expect("connect");
        stream.set_read_timeout(Some(TIMEOUT)).expect("timeout");
        stream.write_all(&bytes).expect("write");
        if close {
            stream.shutdown(std::net::Shutdown::Write).expect("shutdown");
        }
        match wire::read_frame(&stream, wire::MAX_RESPONSE_BYTES) {
            Ok((body, fds)) => {
                assert!(fds.is_empty(), "no descriptor comes with an error");
                Some(AttachResponse::decode(body.as_slice()).expect("an AttachResponse"))
            }
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => None,
            Err(e) => panic!("reading the answer: {e}"),
        }
    })
    .await
    .expect("raw task")
}

fn frame(body: &[u8]) -> Vec<u8> {
    let mut frame = (body.len() as u32).to_le_bytes().to_vec();
    frame.extend_from_slice(body);
    frame
}

async fn attach(socket: &Path, id: &str) -> Result<Attached, attach::AttachError> {
    let (socket, request) = (socket.to_owned(), AttachRequest { model_id: id.into(), ..Default::default() });
    tokio::task::spawn_blocking(move || Attached::attach(&socket, &request, TIMEOUT)).await.expect("attach task")
}

async fn start(tmp: &Path, max_clients: usize, request_timeout: Duration) -> (TestServer, PathBuf) {
    let models = tmp.join("models");
    fixture::single_file_model(&models.join("m"), &fixture::f32_tensors("layer", 2, 1024)).expect("fixture");
    let socket = tmp.join("attach.sock");
    let mut cfg = with_attach(config(&models), &socket);
    if let Some(attach) = cfg.attach.as_mut() {
        (attach.max_clients, attach.request_timeout) = (max_clients, request_timeout);
    }
    let server = TestServer::start(cfg).await;
    load_ok(&mut server.client().await, load("m")).await;
    (server, socket)
}

/// Asserts a good client still attaches and lets go.
async fn healthy(socket: &Path) {
    let attached = attach(socket, "m").await.expect("a good client attaches");
    assert_eq!(attached.tensors().len(), 2);
}

#[tokio::test]
async fn bad_requests_get_an_error_or_a_close() {
    let tmp = tempfile::tempdir().expect("tmp");
    let (server, socket) = start(tmp.path(), 64, Duration::from_millis(300)).await;
    let code = |r: Option<AttachResponse>| r.map(|r| (r.code, r.buffers.is_empty(), r.message));

    let garbage = code(raw(&socket, frame(&[0xff; 10]), false).await).expect("an answer");
    assert_eq!((garbage.0, garbage.1), (3, true), "INVALID_ARGUMENT: {garbage:?}");
    let mut short = 100u32.to_le_bytes().to_vec();
    short.extend_from_slice(&[1; 10]);
    let cut = code(raw(&socket, short, true).await).expect("an answer");
    assert!(cut.0 == 3 && cut.2.contains("cut short"), "{cut:?}");
    let huge = code(raw(&socket, u32::MAX.to_le_bytes().to_vec(), false).await).expect("an answer");
    assert!(huge.0 == 3 && huge.2.contains("at most"), "{huge:?}");
    let nothing = code(raw(&socket, Vec::new(), true).await).expect("an answer");
    assert_eq!(nothing.0, 3, "{nothing:?}");
    let unknown = AttachRequest { model_id: "nope".into(), ..Default::default() }.encode_to_vec();
    let unknown = code(raw(&socket, frame(&unknown), false).await).expect("an answer");
    assert_eq!(unknown.0, 5, "NOT_FOUND: {unknown:?}");
    let bad_id = AttachRequest { model_id: "../x".into(), ..Default::default() }.encode_to_vec();
    assert_eq!(code(raw(&socket, frame(&bad_id), false).await).expect("an answer").0, 3);
    let huge = AttachRequest { model_id: "m".into(), device: Some("x".repeat(16 * 1024)), ..Default::default() };
    let huge = code(raw(&socket, frame(&huge.encode_to_vec()), false).await).expect("an answer");
    // A device that does not parse is INVALID_ARGUMENT (devices are compared parsed), echoed short.
    assert!(huge.0 == 3 && huge.2.len() < 300, "INVALID_ARGUMENT, a short message: {} bytes", huge.2.len());
    // Connects and never speaks: closed after the request timeout, with no answer.
    let started = std::time::Instant::now();
    assert_eq!(raw(&socket, Vec::new(), false).await.map(|r| r.code), None, "closed without an answer");
    assert!(started.elapsed() >= Duration::from_millis(300), "{:?}", started.elapsed());
    healthy(&socket).await;
    let status = tests::get_model(&mut server.client().await, "m").await;
    assert_eq!(status.attached_clients, 0, "no lease left behind: {status:?}");
    server.stop().await;
}

/// Past `max_clients` open connections a client is refused with RESOURCE_EXHAUSTED; 1,000
/// clients at once (under a larger cap) all attach, hold 1,000 leases, and all let go.
#[tokio::test]
async fn connections_are_capped_and_a_thousand_clients_attach() {
    let tmp = tempfile::tempdir().expect("tmp");
    let (server, socket) = start(tmp.path(), 4, Duration::from_secs(30)).await;
    let held: Vec<Attached> = futures::future::join_all((0..4).map(|_| attach(&socket, "m")))
        .await
        .into_iter()
        .collect::<Result<_, _>>()
        .expect("four attach");
    let refused = attach(&socket, "m").await.expect_err("a fifth is refused");
    assert!(matches!(refused, attach::AttachError::Refused { code: 8, .. }), "{refused:?}");
    drop(held);
    server.stop().await;

    let tmp = tempfile::tempdir().expect("tmp");
    let (server, socket) = start(tmp.path(), 2048, Duration::from_secs(30)).await;
    let mut client = server.client().await;
    let all: Vec<Attached> = futures::future::join_all((0..1000).map(|_| attach(&socket, "m")))
        .await
        .into_iter()
        .collect::<Result<_, _>>()
        .expect("a thousand attach");
    assert_eq!(tests::get_model(&mut client, "m").await.attached_clients, 1000);
    drop(all);
    tests::eventually!(tests::get_model(&mut client, "m").await.attached_clients == 0, "leases are never released");
    healthy(&socket).await;
    server.stop().await;
}

/// Connections that never send a request do not lock out attach: with every place taken by such
/// connections, a real client attaches at once (the oldest idle one makes way for it), well within
/// the 10 s request timeout.
#[tokio::test]
async fn idle_connections_do_not_lock_out_attach() {
    let tmp = tempfile::tempdir().expect("tmp");
    let (server, socket) = start(tmp.path(), 8, Duration::from_secs(10)).await;
    let idle: Vec<UnixStream> = (0..8).map(|_| UnixStream::connect(&socket).expect("connect")).collect();
    let attached = tokio::time::timeout(Duration::from_secs(3), attach(&socket, "m"))
        .await
        .expect("attached well within the request timeout")
        .expect("a real client attaches while idle connections fill every place");
    assert_eq!(attached.tensors().len(), 2);
    // The oldest idle connection was the one closed.
    let oldest = idle[0].try_clone().expect("clone");
    let closed = tokio::task::spawn_blocking(move || {
        oldest.set_read_timeout(Some(TIMEOUT)).expect("timeout");
        std::io::Read::read(&mut &oldest, &mut [0u8; 1])
    })
    .await
    .expect("read task");
    assert_eq!(closed.expect("read"), 0, "the oldest idle connection is closed without an answer");
    drop((idle, attached));
    server.stop().await;
}

/// The server run on `socket` until `shutdown`: its result (an error when it cannot serve there).
async fn run_on(models: &Path, socket: &Path, shutdown: impl std::future::Future<Output = ()>) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await.expect("bind");
    server::run(with_attach(config(models), socket), listener, shutdown).await
}

/// `--attach-socket` naming a file that is not a socket is refused with a clear message, and the
/// file is left as it was.
#[tokio::test]
async fn a_file_at_the_socket_path_is_refused_and_kept() {
    let tmp = tempfile::tempdir().expect("tmp");
    let path = tmp.path().join("precious.txt");
    std::fs::write(&path, "keep me").expect("write");
    let refused = run_on(tmp.path(), &path, async {}).await.expect_err("not a socket");
    assert!(format!("{refused:#}").contains("not a socket"), "{refused:#}");
    assert_eq!(std::fs::read_to_string(&path).expect("the file is still there"), "keep me");
}

/// A server removes at shutdown only the socket it created: once its socket file was removed and
/// a second server bound the path, the first one's shutdown leaves the second's socket alone.
#[tokio::test]
async fn shutdown_leaves_another_servers_socket() {
    let tmp = tempfile::tempdir().expect("tmp");
    let socket = tmp.path().join("attach.sock");
    let first = TestServer::start(with_attach(config(tmp.path()), &socket)).await;
    first.client().await.list_models(proto::v1::ListModelsRequest::default()).await.expect("first serves");
    std::fs::remove_file(&socket).expect("remove the first's socket file");
    let second = TestServer::start(with_attach(config(tmp.path()), &socket)).await;
    second.client().await.list_models(proto::v1::ListModelsRequest::default()).await.expect("second serves");
    first.stop().await;
    assert!(socket.exists(), "the first server's shutdown removed the second's socket");
    UnixStream::connect(&socket).expect("the second server still answers there");
    second.stop().await;
    assert!(!socket.exists(), "the second server removes its own socket");
}

/// A socket in a directory anyone may write to (and not sticky) is refused: another user could
/// replace it. A leftover socket another user owns is refused too, never taken over.
#[tokio::test]
async fn a_socket_others_could_take_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().expect("tmp");
    let open = tmp.path().join("open");
    std::fs::create_dir(&open).expect("mkdir");
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    let refused = run_on(tmp.path(), &open.join("attach.sock"), async {}).await.expect_err("world-writable");
    assert!(format!("{refused:#}").contains("world-writable"), "{refused:#}");
    assert!(!open.join("attach.sock").exists());

    // A dead socket of another user (made here and given away, which only root can do).
    // Files this process makes are its own: owned by uid 0 when it runs as root.
    if std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(tmp.path()).expect("stat")) == 0 {
        let theirs = tmp.path().join("theirs.sock");
        drop(std::os::unix::net::UnixListener::bind(&theirs).expect("bind"));
        std::os::unix::fs::chown(&theirs, Some(65534), None).expect("chown");
        let refused = run_on(tmp.path(), &theirs, async {}).await.expect_err("another user's socket");
        assert!(format!("{refused:#}").contains("owned by uid 65534"), "{refused:#}");
        assert!(theirs.exists(), "their socket is left alone");
    }
}

/// Bytes the `cpu` device holds for models.
async fn cpu_used(client: &mut proto::v1::model_loader_client::ModelLoaderClient<tonic::transport::Channel>) -> u64 {
    let resources = client.get_resources(proto::v1::GetResourcesRequest::default()).await.expect("GetResources");
    resources.into_inner().devices.iter().find(|d| d.name == "cpu").expect("a cpu device").used_bytes
}

/// A forced unload ends a client that asked for a large answer and never reads it: within a
/// bounded wait the model's bytes are freed and the connection is closed.
#[tokio::test]
async fn a_forced_unload_ends_a_client_that_never_reads() {
    let tmp = tempfile::tempdir().expect("tmp");
    let models = tmp.path().join("models");
    // 30,000 tensors: an answer of about 1 MB, far more than a socket's buffer holds.
    fixture::single_file_model(&models.join("wide"), &fixture::f32_tensors("t", 30_000, 1)).expect("fixture");
    let socket = tmp.path().join("attach.sock");
    let server = TestServer::start(with_attach(config(&models), &socket)).await;
    let mut client = server.client().await;
    let idle = cpu_used(&mut client).await;
    load_ok(&mut client, load("wide")).await;
    assert!(cpu_used(&mut client).await > idle);

    let request = AttachRequest { model_id: "wide".into(), ..Default::default() }.encode_to_vec();
    let mut stream = UnixStream::connect(&socket).expect("connect");
    stream.write_all(&frame(&request)).expect("write the request");
    // Never read: wait until the server holds the lease and is stuck writing its answer.
    tests::eventually!(
        tests::get_model(&mut client, "wide").await.attached_clients > 0,
        "the client never gets its lease"
    );
    let forced = proto::v1::UnloadModelRequest { model_id: "wide".into(), force: true };
    client.unload_model(forced).await.expect("forced unload");
    tests::eventually!(
        within Duration::from_secs(10),
        cpu_used(&mut client).await <= idle,
        "the bytes are still booked 10 s after a forced unload"
    );
    // Only now read: whatever of the answer was sent, then the end.
    let rest = tokio::task::spawn_blocking(move || {
        stream.set_read_timeout(Some(TIMEOUT)).expect("timeout");
        let mut rest = Vec::new();
        std::io::Read::read_to_end(&mut stream, &mut rest).map(|_| rest.len())
    })
    .await
    .expect("read task");
    let sent = rest.expect("the connection ends");
    assert!(sent < 1_000_000, "the answer was abandoned, not completed: {sent} bytes");
    server.stop().await;
}

/// CPU time (user and system, in clock ticks) that process `pid` has used.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    // After `pid (comm)`: state is the first field, utime the 12th and stime the 13th.
    let fields: Vec<&str> = stat[stat.rfind(')').expect("comm") + 1..].split_whitespace().collect();
    fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime")
}

/// With a low descriptor limit (soft 128, hard 256: the server raises the soft one), 400 idle
/// attach connections neither make the server spin nor flood its log; gRPC still takes new
/// connections; once they close, a client attaches again.
#[tokio::test]
async fn more_idle_connections_than_descriptors() {
    let tmp = tempfile::tempdir().expect("tmp");
    let models = tmp.path().join("models");
    fixture::single_file_model(&models.join("m"), &fixture::f32_tensors("layer", 2, 1024)).expect("fixture");
    let socket = tmp.path().join("attach.sock");
    let mut command = tokio::process::Command::new("prlimit");
    command.args(["--nofile=128:256", "--"]).arg(tests::binary::binary_path()).args(["--listen", "127.0.0.1:0"]);
    command.arg("--model-root").arg(&models).arg("--offline").arg("--attach-socket").arg(&socket);
    let mut server = Binary::spawn(command);
    server.addr = server.logged_addr("serving modelloader.v1.ModelLoader").await;
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", server.pid())).expect("limits");
    let open_files = limits.lines().find(|l| l.starts_with("Max open files")).expect("a nofile line");
    assert_eq!(open_files.split_whitespace().collect::<Vec<_>>()[3..5], ["256", "256"], "raised: {open_files}");
    load_ok(&mut tests::connect(server.addr).await, load("m")).await;

    let (lines, ticks, started) = (server.log().len(), cpu_ticks(server.pid()), std::time::Instant::now());
    let mut idle = Vec::new();
    for _ in 0..400 {
        // Non-blocking connects: one the full backlog refuses is simply not held.
        if let Ok(stream) = tokio::net::UnixStream::connect(&socket).await {
            idle.push(stream);
        }
    }
    // A new gRPC connection is still accepted and answered.
    let answered = tokio::time::timeout(Duration::from_secs(10), async {
        tests::connect(server.addr).await.list_models(proto::v1::ListModelsRequest::default()).await
    })
    .await;
    assert!(matches!(answered, Ok(Ok(_))), "gRPC does not answer with the attach connections open: {answered:?}");
    // A measuring window, not a wait for an event: how much CPU and log the idle crowd costs.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (spent, window) = (cpu_ticks(server.pid()) - ticks, started.elapsed());
    let added = server.log().len() - lines;
    assert!(added < 50, "{added} log lines in {window:?}:\n{}", server.log()[lines..lines + 20].join("\n"));
    // Clock ticks are 1/100 s: a spinning loop uses the whole window, an idle server next to nothing.
    assert!((spent as f64) < window.as_secs_f64() * 100.0 / 2.0, "{spent} ticks of CPU in {window:?}");

    drop(idle);
    let attached = tokio::time::timeout(Duration::from_secs(10), attach(&socket, "m")).await;
    assert!(matches!(attached, Ok(Ok(_))), "attach works again once they close: {attached:?}");
    server.sigterm();
    assert!(server.wait_exit(tests::WAIT).await.success());
}
