//! gRPC-web on the gRPC port, driven by the real curl with gRPC-web framing (as a browser's
//! client sends it): a unary call and the LoadModel stream over HTTP/1.1, HTTP/2 and TLS; pages
//! of other origins refused unless `--cors-origin` allows them; auth enforced as on gRPC. And the
//! dashboard page at `GET /`: the committed bundle, its ETag and 304, and `--no-dashboard`.
use crate::path;

use std::path::Path;

use prost::Message;
use proto::v1 as pb;
use tests::{
    WAIT,
    binary::Binary,
    connect,
    tls::{make_ca, make_cert},
};

const RESOURCES: &str = "modelloader.v1.ModelLoader/GetResources";
const LOAD: &str = "modelloader.v1.ModelLoader/LoadModel";

/// One HTTP response as curl printed it.
#[derive(Debug)]
struct Reply {
    /// `HTTP/1.1`, `HTTP/2`: the protocol the answer came over.
    version: String,
    status: u16,
    /// Header names lowercase.
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    /// The gRPC-web body's messages and its trailers (`grpc-status`, …), or the status sent in
    /// the headers of a trailers-only answer.
    fn grpc(&self) -> (Vec<Vec<u8>>, Vec<(String, String)>) {
        let (mut messages, mut trailers) = (Vec::new(), Vec::new());
        let mut rest = self.body.as_slice();
        while rest.len() >= 5 {
            let len = u32::from_be_bytes(rest[1..5].try_into().expect("4 bytes")) as usize;
            let (flag, payload) = (rest[0], &rest[5..5 + len]);
            if flag & 0x80 == 0 {
                messages.push(payload.to_vec());
            } else {
                trailers = parse_headers(&String::from_utf8_lossy(payload));
            }
            rest = &rest[5 + len..];
        }
        assert!(rest.is_empty(), "a gRPC-web body ends with a whole frame: {:?}", self.body);
        if trailers.is_empty() {
            trailers = self.headers.iter().filter(|(n, _)| n.starts_with("grpc-")).cloned().collect();
        }
        (messages, trailers)
    }

    /// The `grpc-status` of a gRPC-web answer.
    fn grpc_status(&self) -> String {
        let (_, trailers) = self.grpc();
        trailers.into_iter().find(|(n, _)| n == "grpc-status").map(|(_, v)| v).unwrap_or_default()
    }
}

fn parse_headers(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect()
}

/// Runs curl with `args` (the URL among them) and reads its answer (`-i`: headers, then body).
async fn curl(args: &[&str]) -> Reply {
    let output =
        tokio::time::timeout(WAIT, tokio::process::Command::new("curl").args(["-sS", "-i"]).args(args).output())
            .await
            .expect("curl finishes")
            .expect("curl runs");
    assert!(output.status.success(), "curl {args:?}: {}", String::from_utf8_lossy(&output.stderr));
    let out = output.stdout;
    let end = out.windows(4).position(|w| w == b"\r\n\r\n").expect("headers end");
    let head = String::from_utf8_lossy(&out[..end]).into_owned();
    let mut lines = head.lines();
    let first: Vec<&str> = lines.next().expect("a status line").split_whitespace().collect();
    let (version, status) = (first[0].to_owned(), first[1].parse().expect("a status"));
    Reply {
        version,
        status,
        headers: parse_headers(&lines.collect::<Vec<_>>().join("\n")),
        body: out[end + 4..].to_vec(),
    }
}

/// `message` in one gRPC-web data frame, written to a file of `dir` for curl's `--data-binary`.
fn frame_file(dir: &Path, name: &str, message: &impl Message) -> String {
    let payload = message.encode_to_vec();
    let mut frame = vec![0u8];
    frame.extend_from_slice(&u32::try_from(payload.len()).expect("small").to_be_bytes());
    frame.extend_from_slice(&payload);
    let file = dir.join(name);
    std::fs::write(&file, frame).expect("write the frame");
    format!("@{}", path(&file))
}

/// A gRPC-web call with curl: POST `frame` (from [`frame_file`]) to `base/method`, with `extra`
/// curl arguments (protocol, headers).
async fn grpc_web(base: &str, method: &str, frame: &str, extra: &[&str]) -> Reply {
    let url = format!("{base}/{method}");
    let mut args = vec!["-H", "content-type: application/grpc-web+proto", "-H", "x-grpc-web: 1"];
    args.extend_from_slice(extra);
    args.extend(["--data-binary", frame, &url]);
    curl(&args).await
}

fn decode<M: Message + Default>(bytes: &[u8]) -> M {
    M::decode(bytes).expect("a message of the expected type")
}

/// Checks a LoadModel answer: progress through step 8 of 8, status OK.
fn assert_loaded(reply: &Reply) {
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.grpc_status(), "0", "{reply:?}");
    let steps: Vec<u32> = reply.grpc().0.iter().map(|m| decode::<pb::ModelLoadProgress>(m).step).collect();
    let last = decode::<pb::ModelLoadProgress>(reply.grpc().0.last().expect("progress messages"));
    assert_eq!((last.step, last.total), (8, 8), "the stream reaches 8/8: {steps:?}");
    assert!(steps.windows(2).all(|w| w[0] <= w[1]), "steps in order: {steps:?}");
}

/// GetResources answers over gRPC-web on HTTP/1.1 and on HTTP/2 (prior knowledge), and the
/// LoadModel stream reaches step 8/8 with every progress message framed and a final OK status.
#[tokio::test]
async fn grpc_web_answers_a_unary_call_and_streams_a_load_to_8_of_8() {
    let root = crate::small_model_root();
    let server = Binary::start(&["--model-root", path(root.path()), "--offline"], &[]).await;
    let base = format!("http://{}", server.addr);
    let empty = frame_file(root.path(), "empty", &pb::GetResourcesRequest::default());
    for protocol in ["--http1.1", "--http2-prior-knowledge"] {
        let reply = grpc_web(&base, RESOURCES, &empty, &[protocol]).await;
        assert_eq!(reply.status, 200, "{protocol}: {reply:?}");
        assert_eq!(reply.header("content-type"), Some("application/grpc-web+proto"), "{protocol}");
        assert_eq!(reply.grpc_status(), "0", "{protocol}: {reply:?}");
        let resources: pb::GetResourcesResponse = decode(&reply.grpc().0[0]);
        assert_eq!(resources.devices.first().map(|d| d.name.as_str()), Some("cpu"), "{protocol}: {resources:?}");
    }
    let load =
        frame_file(root.path(), "load", &pb::LoadModelRequest { model_id: "small".into(), ..Default::default() });
    assert_loaded(&grpc_web(&base, LOAD, &load, &["--http1.1"]).await);
    let mut client = connect(server.addr).await;
    assert_eq!(tests::state_of(&mut client, "small").await, pb::ModelState::Loaded);
}

/// A page of another origin (or of a DNS name rebound to the server) is refused with 403, its
/// preflight and its request alike, and its request does nothing; an origin given with --cors-origin gets its CORS headers and its answer;
/// the server's own origin (the dashboard's) needs no flag.
#[tokio::test]
async fn other_origins_are_refused_unless_allowed() {
    let root = crate::small_model_root();
    let allowed = "http://dashboard.example:8080";
    let server =
        Binary::start(&["--model-root", path(root.path()), "--offline"], &[("MODEL_LOADER_CORS_ORIGIN", allowed)])
            .await;
    let base = format!("http://{}", server.addr);
    let url = format!("{base}/{LOAD}");
    let preflight = |origin: String| {
        let url = url.clone();
        async move {
            let origin = format!("origin: {origin}");
            let args = ["-X", "OPTIONS", "-H", &origin, "-H", "access-control-request-method: POST"];
            curl(
                &[&args[..], &["-H", "access-control-request-headers: content-type,x-grpc-web,authorization", &url]]
                    .concat(),
            )
            .await
        }
    };
    let load =
        frame_file(root.path(), "load", &pb::LoadModelRequest { model_id: "small".into(), ..Default::default() });

    let refused = preflight("http://evil.example".into()).await;
    assert_eq!(refused.status, 403, "{refused:?}");
    assert_eq!(refused.header("access-control-allow-origin"), None);
    let refused = grpc_web(&base, LOAD, &load, &["--http1.1", "-H", "origin: http://evil.example"]).await;
    assert_eq!(refused.status, 403, "{refused:?}");
    assert!(String::from_utf8_lossy(&refused.body).contains("--cors-origin"), "the refusal says what to do");
    // DNS rebinding: a page of a name pointed at this server is "same origin" by Host, yet refused.
    let rebound = format!("attacker.example:{}", server.addr.port());
    let (host, origin) = (format!("host: {rebound}"), format!("origin: http://{rebound}"));
    let refused = grpc_web(&base, LOAD, &load, &["--http1.1", "-H", &host, "-H", &origin]).await;
    assert_eq!(refused.status, 403, "a DNS name is not the server's own origin unless listed: {refused:?}");
    let mut client = connect(server.addr).await;
    assert_eq!(tests::state_of(&mut client, "small").await, pb::ModelState::Unloaded, "a refused request does nothing");

    let ok = preflight(allowed.into()).await;
    assert_eq!(ok.status, 200, "{ok:?}");
    assert_eq!(ok.header("access-control-allow-origin"), Some(allowed));
    let allow_headers = ok.header("access-control-allow-headers").unwrap_or_default();
    assert!(allow_headers.contains("authorization") && allow_headers.contains("x-grpc-web"), "{ok:?}");
    let own = format!("http://{}", server.addr);
    for origin in [allowed, own.as_str()] {
        let empty = frame_file(root.path(), "empty", &pb::GetResourcesRequest::default());
        let reply = grpc_web(&base, RESOURCES, &empty, &["--http1.1", "-H", &format!("origin: {origin}")]).await;
        assert_eq!((reply.status, reply.grpc_status().as_str()), (200, "0"), "{origin}: {reply:?}");
        assert_eq!(reply.header("access-control-allow-origin"), Some(origin));
        assert!(reply.header("access-control-expose-headers").unwrap_or_default().contains("grpc-status"));
    }
    assert_loaded(&grpc_web(&base, LOAD, &load, &["--http1.1", "-H", &format!("origin: {own}")]).await);
}

/// With --auth-token-file, a gRPC-web call without a token is UNAUTHENTICATED (16), a read token
/// reads but may not load (PERMISSION_DENIED, 7), and an admin token loads, exactly as over gRPC.
#[tokio::test]
async fn auth_applies_to_grpc_web() {
    let root = crate::small_model_root();
    let tokens = root.path().join("tokens");
    std::fs::write(&tokens, "admin:web-admin-1\nread:web-reader-1\n").expect("tokens");
    let server =
        Binary::start(&["--model-root", path(root.path()), "--offline", "--auth-token-file", path(&tokens)], &[]).await;
    let base = format!("http://{}", server.addr);
    let empty = frame_file(root.path(), "empty", &pb::GetResourcesRequest::default());
    let load =
        frame_file(root.path(), "load", &pb::LoadModelRequest { model_id: "small".into(), ..Default::default() });
    let (read, admin) = ("authorization: Bearer web-reader-1", "authorization: Bearer web-admin-1");

    assert_eq!(grpc_web(&base, RESOURCES, &empty, &["--http1.1"]).await.grpc_status(), "16", "no token");
    assert_eq!(grpc_web(&base, LOAD, &load, &["--http1.1"]).await.grpc_status(), "16", "no token");
    let wrong = grpc_web(&base, RESOURCES, &empty, &["--http1.1", "-H", "authorization: Bearer nope"]).await;
    assert_eq!(wrong.grpc_status(), "16", "{wrong:?}");
    assert_eq!(grpc_web(&base, RESOURCES, &empty, &["--http1.1", "-H", read]).await.grpc_status(), "0", "read reads");
    assert_eq!(grpc_web(&base, LOAD, &load, &["--http1.1", "-H", read]).await.grpc_status(), "7", "read may not load");
    assert_loaded(&grpc_web(&base, LOAD, &load, &["--http1.1", "-H", admin]).await);
}

/// Over TLS the port offers HTTP/1.1 by ALPN as well as h2: curl negotiates each, and gRPC-web
/// and the page answer on both.
#[tokio::test]
async fn grpc_web_over_tls_negotiates_http1_and_h2() {
    let root = crate::small_model_root();
    let dir = root.path();
    make_ca(dir, "ca");
    make_cert(dir, "ca", "server", "serverAuth");
    let (cert, key, ca) = (dir.join("server.crt"), dir.join("server.key"), dir.join("ca.crt"));
    let server = Binary::start(
        &["--model-root", path(dir), "--offline", "--tls-cert", path(&cert), "--tls-key", path(&key)],
        &[],
    )
    .await;
    let base = format!("https://localhost:{}", server.addr.port());
    let empty = frame_file(dir, "empty", &pb::GetResourcesRequest::default());
    for (protocol, version) in [("--http1.1", "HTTP/1.1"), ("--http2", "HTTP/2")] {
        let reply = grpc_web(&base, RESOURCES, &empty, &[protocol, "--cacert", path(&ca)]).await;
        assert_eq!(reply.version, version, "ALPN gave {protocol}'s protocol");
        assert_eq!((reply.status, reply.grpc_status().as_str()), (200, "0"), "{protocol}: {reply:?}");
        let page = curl(&[protocol, "--cacert", path(&ca), &format!("{base}/")]).await;
        assert_eq!((page.version.as_str(), page.status), (version, 200), "the page over {protocol}");
    }
}

/// A file of the committed bundle, as the binary embeds it.
fn bundle_file(name: &str) -> Vec<u8> {
    std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("../web/dist").join(name)).expect("the committed bundle")
}

/// `GET /` serves the committed page without a token even with auth on, with a strong ETag that
/// is its SHA-256, `Cache-Control: no-cache` and a strict CSP; `If-None-Match` with that ETag is
/// 304 with no body; the script is its own file, served as JavaScript; unknown paths are 404.
#[tokio::test]
async fn the_page_is_served_with_a_content_hash_etag_and_revalidated() {
    let root = crate::small_model_root();
    let tokens = root.path().join("tokens");
    std::fs::write(&tokens, "admin:page-admin-1\n").expect("tokens");
    let server =
        Binary::start(&["--model-root", path(root.path()), "--offline", "--auth-token-file", path(&tokens)], &[]).await;
    let base = format!("http://{}", server.addr);

    let page = curl(&[&format!("{base}/")]).await;
    assert_eq!(page.status, 200, "{page:?}");
    assert_eq!(page.body, bundle_file("index.html"), "the embedded page is the committed one");
    assert_eq!(page.header("content-type"), Some("text/html; charset=utf-8"));
    let etag = format!("\"{}\"", hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&page.body)));
    assert_eq!(page.header("etag"), Some(etag.as_str()), "a strong ETag: the content's hash");
    assert_eq!(page.header("cache-control"), Some("no-cache"));
    let csp = page.header("content-security-policy").expect("a CSP");
    assert!(csp.contains("default-src 'none'") && csp.contains("script-src 'self'"), "{csp}");
    assert!(!csp.contains("unsafe-inline") && !csp.contains("unsafe-eval"), "{csp}");

    let again = curl(&["-H", &format!("if-none-match: {etag}"), &format!("{base}/")]).await;
    assert_eq!((again.status, again.body.len()), (304, 0), "{again:?}");
    assert_eq!(again.header("etag"), Some(etag.as_str()));
    let stale = curl(&["-H", "if-none-match: \"an-older-page\"", &format!("{base}/")]).await;
    assert_eq!(stale.status, 200, "another ETag gets the page");

    let script = curl(&["--http2-prior-knowledge", &format!("{base}/app.js")]).await;
    assert_eq!((script.status, script.header("content-type")), (200, Some("text/javascript; charset=utf-8")));
    assert_eq!(script.body, bundle_file("app.js"));
    assert_ne!(script.header("etag"), Some(etag.as_str()), "each file has its own hash");
    assert_eq!(curl(&[&format!("{base}/secrets.txt")]).await.status, 404);
}

/// With --no-dashboard, `GET /` and the assets are 404, and gRPC-web still answers.
#[tokio::test]
async fn no_dashboard_turns_the_page_off() {
    let root = crate::small_model_root();
    let server = Binary::start(&["--model-root", path(root.path()), "--offline", "--no-dashboard"], &[]).await;
    let base = format!("http://{}", server.addr);
    for file in ["", "app.js"] {
        let reply = curl(&[&format!("{base}/{file}")]).await;
        assert_eq!(reply.status, 404, "/{file}: {reply:?}");
        assert!(String::from_utf8_lossy(&reply.body).contains("--no-dashboard"), "the 404 says why");
    }
    let empty = frame_file(root.path(), "empty", &pb::GetResourcesRequest::default());
    assert_eq!(grpc_web(&base, RESOURCES, &empty, &["--http1.1"]).await.grpc_status(), "0");
}
