//! Bad input on the attach socket: garbage, a request cut short, a huge length prefix, an unknown
//! model, a client that connects and never speaks, more clients than allowed, and 1,000 clients
//! at once. Each gets an error answer or a close, never a panic or a leak; the server stays
//! healthy and a good client attaches after every one.

use std::{
    io::Write,
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::Duration,
};

use attach::{AttachRequest, AttachResponse, Attached, wire};
use prost::Message;
use tests::{TestServer, config, fixture, load, load_ok, with_attach};

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
    assert!(huge.0 == 9 && huge.2.len() < 300, "FAILED_PRECONDITION, a short message: {} bytes", huge.2.len());
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
    let deadline = tokio::time::Instant::now() + tests::WAIT;
    while tests::get_model(&mut client, "m").await.attached_clients > 0 {
        assert!(tokio::time::Instant::now() < deadline, "leases are never released");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    healthy(&socket).await;
    server.stop().await;
}
