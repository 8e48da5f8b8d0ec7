//! Self-tests of the test hub (`tests::hub`): that it speaks the Hub's protocol as Python's
//! `huggingface_hub` expects (snapshots, errors, tokens), and that its counters and faults do what
//! they say, seen through a raw HTTP/1.1 client.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
    process::Stdio,
};

use serde_json::{Value, json};
use tests::{
    WAIT,
    fixture::{self, TensorSpec},
    hub::{Access, Fault, HubRepo, TestHub, etag_of, git_blob_sha1, sha256_hex},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

// ---------------------------------------------------------------------------------------------
// A raw HTTP/1.1 client: one request per connection, read to the end, nothing hidden.
// ---------------------------------------------------------------------------------------------

#[derive(Debug)]
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    /// The connection ended before `Content-Length` bytes of body arrived.
    cut: bool,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("a JSON body")
    }
}

/// Splits `http://host:port/path?q` into (`host:port`, `/path?q`).
fn split_url(url: &str) -> (&str, &str) {
    let rest = url.strip_prefix("http://").expect("an http:// url");
    match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    }
}

async fn connect_and_send(url: &str, method: &str, headers: &[(&str, &str)]) -> TcpStream {
    let (host, path) = split_url(url);
    let mut stream =
        tokio::time::timeout(WAIT, TcpStream::connect(host)).await.expect("connect in time").expect("connect");
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n");
    for (k, v) in headers {
        request.push_str(&format!("{k}: {v}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).await.expect("send the request");
    stream
}

/// Sends one request to a full URL and reads the reply until the server closes the connection.
async fn send(url: &str, method: &str, headers: &[(&str, &str)]) -> Reply {
    let mut stream = connect_and_send(url, method, headers).await;
    let mut raw = Vec::new();
    let mut reset = false;
    let read = tokio::time::timeout(WAIT, async {
        let mut buf = vec![0u8; 64 << 10];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) => break,
                Ok(n) => raw.extend_from_slice(&buf[..n]),
                Err(_) => {
                    reset = true;
                    break;
                }
            }
        }
    })
    .await;
    assert!(read.is_ok(), "{method} {url}: no end of reply within {WAIT:?}");
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n").expect("a complete head");
    let head = String::from_utf8(raw[..end].to_vec()).expect("an ASCII head");
    let body = raw[end + 4..].to_vec();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().expect("a status line");
    let status = status_line.split(' ').nth(1).and_then(|s| s.parse().ok()).expect("a status code");
    let headers: Vec<(String, String)> =
        lines.filter_map(|l| l.split_once(':')).map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned())).collect();
    let length: Option<usize> =
        headers.iter().find(|(k, _)| k.eq_ignore_ascii_case("content-length")).and_then(|(_, v)| v.parse().ok());
    let cut = method != "HEAD" && (reset || length.is_some_and(|n| body.len() < n));
    Reply { status, headers, body, cut }
}

// ---------------------------------------------------------------------------------------------
// Fixtures
// ---------------------------------------------------------------------------------------------

/// `org/sharded`: `main` = a 3-shard fixture model, tag `v1` = a single-file model.
fn sharded_repo(dir: &Path) -> HubRepo {
    let main_dir = dir.join("main");
    let v1_dir = dir.join("v1");
    fixture::sharded_model(&main_dir, &fixture::f32_tensors("layers", 6, 4096), 3).expect("sharded fixture");
    fixture::single_file_model(&v1_dir, &[TensorSpec::f32("w", &[64, 64], 7)]).expect("single-file fixture");
    HubRepo::from_dir("org/sharded", &main_dir)
        .expect("repo from the sharded fixture")
        .with_revision_from_dir("v1", &v1_dir)
        .expect("v1 from the single-file fixture")
}

const SHARD: &str = "model-00001-of-00003.safetensors";

fn quoted(s: &str) -> String {
    format!("\"{s}\"")
}

// ---------------------------------------------------------------------------------------------
// Protocol, counters and faults through the raw client
// ---------------------------------------------------------------------------------------------

/// Repo info, tree listing, HEAD/GET on /resolve with the Hub's headers, the LFS redirect to a
/// second host name, Range requests, the error codes, and the counters that follow them.
// One scenario, read top to bottom.
#[allow(clippy::too_many_lines)]
#[tokio::test]
async fn speaks_the_hub_protocol_with_counters() {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = sharded_repo(dir.path());
    let (v1_commit, _) = repo.resolve("v1").expect("v1");
    let v1_commit = v1_commit.to_owned();
    let hub = TestHub::start([repo.clone()]).await;
    let base = hub.url();
    assert!(base.starts_with("http://127.0.0.1:"), "{base}");

    // repo info: main, a tag, a commit, and what is not there
    let info = send(&format!("{base}/api/models/org/sharded"), "GET", &[]).await;
    assert_eq!(info.status, 200);
    let info = info.json();
    assert_eq!(info["id"], "org/sharded");
    assert_eq!(info["modelId"], "org/sharded");
    assert_eq!(info["sha"], repo.commit());
    assert_eq!(info["private"], false);
    assert_eq!(info["gated"], false);
    let siblings: BTreeSet<&str> =
        info["siblings"].as_array().expect("siblings").iter().map(|s| s["rfilename"].as_str().expect("name")).collect();
    assert_eq!(siblings, repo.files().keys().map(String::as_str).collect());
    let tagged = send(&format!("{base}/api/models/org/sharded/revision/v1"), "GET", &[]).await.json();
    assert_eq!(tagged["sha"], v1_commit.as_str());
    assert_eq!(tagged["siblings"].as_array().expect("siblings").len(), 2);
    let by_commit = send(&format!("{base}/api/models/org/sharded/revision/{}", repo.commit()), "GET", &[]).await;
    assert_eq!(by_commit.json()["sha"], repo.commit());
    let with_blobs = send(&format!("{base}/api/models/org/sharded?blobs=true"), "GET", &[]).await.json();
    let shard = &repo.files()[SHARD];
    let sibling = with_blobs["siblings"].as_array().expect("siblings").iter().find(|s| s["rfilename"] == SHARD);
    assert_eq!(sibling.expect("the shard")["lfs"]["sha256"], sha256_hex(shard));
    let no_rev = send(&format!("{base}/api/models/org/sharded/revision/refs%2Fpr%2F9"), "GET", &[]).await;
    assert_eq!((no_rev.status, no_rev.header("x-error-code")), (404, Some("RevisionNotFound")));
    let no_repo = send(&format!("{base}/api/models/org/nothing"), "GET", &[]).await;
    assert_eq!((no_repo.status, no_repo.header("x-error-code")), (404, Some("RepoNotFound")));

    // tree: recursive listing with LFS metadata; a sub-path; an unknown revision
    let tree = send(&format!("{base}/api/models/org/sharded/tree/main?recursive=true"), "GET", &[]).await;
    assert_eq!(tree.status, 200);
    let tree = tree.json();
    let entries = tree.as_array().expect("a list");
    assert_eq!(entries.len(), repo.files().len());
    for entry in entries {
        let path = entry["path"].as_str().expect("path");
        let data = &repo.files()[path];
        assert_eq!(entry["type"], "file");
        assert_eq!(entry["size"], data.len());
        if path.ends_with(".safetensors") {
            assert_eq!(entry["lfs"]["oid"], sha256_hex(data), "{path}");
            assert_eq!(entry["lfs"]["size"], data.len());
            assert!(entry["lfs"]["pointerSize"].as_u64().expect("pointerSize") > 100);
        } else {
            assert_eq!(entry["oid"], git_blob_sha1(data), "{path}");
            assert!(entry.get("lfs").is_none(), "{path}");
        }
    }
    let nested =
        TestHub::start([HubRepo::new("org/nested", [("a/b/c.json", "{}"), ("a/d.txt", "d"), ("e.txt", "e")])]).await;
    let top = send(&format!("{}/api/models/org/nested/tree/main", nested.url()), "GET", &[]).await.json();
    let top: Vec<(&str, &str)> = top
        .as_array()
        .expect("a list")
        .iter()
        .map(|e| (e["type"].as_str().expect("t"), e["path"].as_str().expect("p")))
        .collect();
    assert_eq!(top, [("directory", "a"), ("file", "e.txt")]);
    let sub = send(&format!("{}/api/models/org/nested/tree/main/a?recursive=true", nested.url()), "GET", &[]).await;
    let sub: Vec<String> =
        sub.json().as_array().expect("a list").iter().map(|e| e["path"].as_str().expect("p").to_owned()).collect();
    assert_eq!(sub, ["a/b", "a/b/c.json", "a/d.txt"]);
    let no_rev = send(&format!("{base}/api/models/org/sharded/tree/nope"), "GET", &[]).await;
    assert_eq!(no_rev.header("x-error-code"), Some("RevisionNotFound"));

    // a small file: served directly, ETag = git blob sha1
    let config = &repo.files()["config.json"];
    let head = send(&format!("{base}/org/sharded/resolve/main/config.json"), "HEAD", &[]).await;
    assert_eq!(head.status, 200);
    assert_eq!(head.header("etag"), Some(quoted(&git_blob_sha1(config)).as_str()));
    assert_eq!(head.header("x-repo-commit"), Some(repo.commit()));
    assert_eq!(head.header("content-length"), Some(config.len().to_string().as_str()));
    assert!(head.body.is_empty());
    let get = send(&format!("{base}/org/sharded/resolve/main/config.json"), "GET", &[]).await;
    assert_eq!((get.status, &get.body[..], get.cut), (200, &config[..], false));
    assert_eq!((hub.head_count("org/sharded", "config.json"), hub.get_count("org/sharded", "config.json")), (1, 1));

    // an LFS file: 302 to the second host name with the linked headers, never X-Xet-Hash
    let head = send(&format!("{base}/org/sharded/resolve/v1/model.safetensors"), "HEAD", &[]).await;
    let v1_model = &repo.resolve("v1").expect("v1").1["model.safetensors"];
    assert_eq!(head.status, 302);
    assert_eq!(head.header("x-repo-commit"), Some(v1_commit.as_str()));
    assert_eq!(head.header("x-linked-etag"), Some(quoted(&sha256_hex(v1_model)).as_str()));
    assert_eq!(head.header("etag"), Some(quoted(&sha256_hex(v1_model)).as_str()));
    assert_eq!(head.header("x-linked-size"), Some(v1_model.len().to_string().as_str()));
    assert!(head.headers.iter().all(|(k, _)| !k.to_ascii_lowercase().starts_with("x-xet")), "{:?}", head.headers);
    let location = head.header("location").expect("a Location").to_owned();
    assert!(location.starts_with(hub.store_url()) && hub.store_url().starts_with("http://localhost:"), "{location}");
    assert_eq!(hub.get_count("org/sharded", "model.safetensors"), 0, "HEAD and the redirect serve no bytes");
    let get = send(&location, "GET", &[]).await;
    assert_eq!((get.status, get.body.len(), get.cut), (200, v1_model.len(), false));
    assert_eq!(&get.body[..], &v1_model[..]);
    let part = send(&location, "GET", &[("Range", "bytes=10-19")]).await;
    assert_eq!(part.status, 206);
    assert_eq!(&part.body[..], &v1_model[10..20]);
    assert_eq!(part.header("content-range"), Some(format!("bytes 10-19/{}", v1_model.len()).as_str()));
    let tail = send(&location, "GET", &[("Range", "bytes=100-")]).await;
    assert_eq!((tail.status, &tail.body[..]), (206, &v1_model[100..]));
    let beyond = send(&location, "GET", &[("Range", &format!("bytes={}-", v1_model.len()))]).await;
    assert_eq!(beyond.status, 416);
    // the redirected GET on /resolve is no body either; the store GETs are, the closed range as a
    // ranged read (a header read ahead), the open one as a resumed download
    let redirect = send(&format!("{base}/org/sharded/resolve/v1/model.safetensors"), "GET", &[]).await;
    assert_eq!(redirect.status, 302);
    let stats = hub.stats("org/sharded", "model.safetensors");
    assert_eq!((stats.heads, stats.gets, stats.range_reads), (1, 3, 1));
    assert_eq!(stats.bytes_sent, (v1_model.len() + v1_model.len() - 100) as u64);

    // by commit id, and the error codes on /resolve
    let by_commit = send(&format!("{base}/org/sharded/resolve/{}/{SHARD}", repo.commit()), "HEAD", &[]).await;
    assert_eq!(by_commit.header("x-linked-etag"), Some(quoted(&sha256_hex(shard)).as_str()));
    let missing = send(&format!("{base}/org/sharded/resolve/main/nope.json"), "HEAD", &[]).await;
    assert_eq!((missing.status, missing.header("x-error-code")), (404, Some("EntryNotFound")));
    assert_eq!(missing.header("x-repo-commit"), Some(repo.commit()));
    let no_rev = send(&format!("{base}/org/sharded/resolve/nope/config.json"), "HEAD", &[]).await;
    assert_eq!((no_rev.status, no_rev.header("x-error-code")), (404, Some("RevisionNotFound")));
    let no_repo = send(&format!("{base}/org/nothing/resolve/main/config.json"), "GET", &[]).await;
    assert_eq!((no_repo.status, no_repo.header("x-error-code")), (404, Some("RepoNotFound")));

    // the log saw the store under its own host name
    let requests = hub.requests();
    assert!(requests.iter().any(|r| r.path.starts_with("/_lfs/") && r.host.starts_with("localhost:")), "{requests:?}");
    assert!(hub.authorizations().is_empty());
}

/// Every fault can be set and cleared while the hub runs: Status on every request, BodyStatus on
/// the byte-serving one only, counted faults that clear themselves, WrongBytes (same length,
/// another sha256) and DropMidBody (a truncated body on a closed connection).
#[tokio::test]
async fn faults_are_injected_and_cleared_while_running() {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = sharded_repo(dir.path());
    let shard = repo.files()[SHARD].clone();
    let hub = TestHub::start([repo]).await;
    let resolve = format!("{}/org/sharded/resolve/main/{SHARD}", hub.url());
    let location = send(&resolve, "HEAD", &[]).await.header("location").expect("a Location").to_owned();

    for code in [500, 401, 403, 404] {
        hub.set_fault("org/sharded", SHARD, Fault::Status(code));
        assert_eq!(send(&resolve, "HEAD", &[]).await.status, code);
        assert_eq!(send(&resolve, "GET", &[]).await.status, code);
        let got = send(&location, "GET", &[]).await;
        assert_eq!(got.status, code);
        if code == 404 {
            assert_eq!(got.header("x-error-code"), Some("EntryNotFound"));
        }
    }
    hub.clear_fault("org/sharded", SHARD);
    assert_eq!(send(&resolve, "HEAD", &[]).await.status, 302);
    assert_eq!(send(&location, "GET", &[]).await.body, shard);

    // BodyStatus: metadata is fine, the bytes fail; a counted fault clears itself
    hub.reset_counters();
    hub.set_fault_times("org/sharded", SHARD, Fault::BodyStatus(503), 2);
    assert_eq!(send(&resolve, "HEAD", &[]).await.status, 302);
    assert_eq!(send(&location, "GET", &[]).await.status, 503);
    assert_eq!(send(&location, "GET", &[]).await.status, 503);
    let third = send(&location, "GET", &[]).await;
    assert_eq!((third.status, third.body == shard), (200, true));
    assert_eq!(hub.get_count("org/sharded", SHARD), 3, "every attempt at the bytes counts");

    // WrongBytes: same length, another sha256 than the advertised one; also on a small file
    hub.set_fault("org/sharded", SHARD, Fault::WrongBytes);
    let head = send(&resolve, "HEAD", &[]).await;
    let wrong = send(&location, "GET", &[]).await;
    assert_eq!((wrong.status, wrong.body.len(), wrong.cut), (200, shard.len(), false));
    assert_ne!(quoted(&sha256_hex(&wrong.body)), head.header("x-linked-etag").expect("linked etag"));
    assert_eq!(quoted(&sha256_hex(&shard)), head.header("x-linked-etag").expect("linked etag"));
    let config_url = format!("{}/org/sharded/resolve/main/config.json", hub.url());
    hub.set_fault("org/sharded", "config.json", Fault::WrongBytes);
    let config = send(&config_url, "GET", &[]).await;
    assert_ne!(quoted(&git_blob_sha1(&config.body)), config.header("etag").expect("etag"));

    // DropMidBody: the full Content-Length is promised, half arrives, the connection closes
    hub.set_fault("org/sharded", SHARD, Fault::DropMidBody);
    let dropped = send(&location, "GET", &[]).await;
    assert_eq!(dropped.status, 200);
    assert_eq!(dropped.header("content-length"), Some(shard.len().to_string().as_str()));
    assert!(dropped.cut && dropped.body.len() < shard.len(), "{} of {} bytes", dropped.body.len(), shard.len());
    assert_eq!(&dropped.body[..], &shard[..dropped.body.len()]);
    hub.set_fault("org/sharded", "config.json", Fault::DropMidBody);
    assert!(send(&config_url, "GET", &[]).await.cut);

    hub.clear_faults();
    let whole = send(&location, "GET", &[]).await;
    assert_eq!((whole.cut, whole.body == shard), (false, true));
    assert!(!send(&config_url, "GET", &[]).await.cut);
    hub.wait_until("every body ended", |h| h.active_bodies() == 0).await;
}

/// A Slow body is paced, and ends on the hub's side as soon as the client drops the connection.
#[tokio::test]
async fn a_slow_body_ends_when_the_client_goes_away() {
    let big = vec![7u8; 1 << 20];
    let hub = TestHub::start([HubRepo::new("org/big", [("big.safetensors", big.clone())])]).await;
    hub.set_fault("org/big", "big.safetensors", Fault::Slow { bytes_per_sec: 256 << 10 });
    let head = send(&format!("{}/org/big/resolve/main/big.safetensors", hub.url()), "HEAD", &[]).await;
    assert_eq!(head.status, 302, "HEAD is not slowed");
    let location = head.header("location").expect("a Location").to_owned();

    let mut stream = connect_and_send(&location, "GET", &[]).await;
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(WAIT, stream.read(&mut buf)).await.expect("a first read in time").expect("read");
    assert!(n > 0 && buf.starts_with(b"HTTP/1.1 200"), "{:?}", String::from_utf8_lossy(&buf[..n]));
    hub.wait_until("the slow body started", |h| h.stats("org/big", "big.safetensors").bytes_sent > 0).await;
    assert_eq!(hub.active_bodies(), 1);
    drop(stream);
    hub.wait_until("the slow body ended after the client left", |h| h.active_bodies() == 0).await;
    let sent = hub.stats("org/big", "big.safetensors").bytes_sent;
    assert!(sent < big.len() as u64 / 2, "{sent} bytes sent: the body went on after the client left");
}

/// A token repo answers 401 without the right bearer token and serves with it; a gated repo shows
/// its info but answers 403 GatedRepo for files; access can change while the hub runs.
#[tokio::test]
async fn token_and_gated_repos_refuse_until_allowed() {
    let files = [("config.json", b"{}".to_vec()), ("model.safetensors", vec![1u8; 1000])];
    let hub = TestHub::start([
        HubRepo::new("org/private", files.clone()).with_access(Access::Token("secret".into())),
        HubRepo::new("org/gated", files.clone()).with_access(Access::Gated),
    ])
    .await;
    let url = |repo: &str, rest: &str| format!("{}/{repo}{rest}", hub.url());

    let none = send(&url("org/private", "/resolve/main/config.json"), "GET", &[]).await;
    assert_eq!((none.status, none.header("x-error-code")), (401, Some("RepoNotFound")));
    let info = send(&format!("{}/api/models/org/private", hub.url()), "GET", &[]).await;
    assert_eq!(info.status, 401);
    let wrong =
        send(&url("org/private", "/resolve/main/config.json"), "GET", &[("Authorization", "Bearer nope")]).await;
    assert_eq!(wrong.status, 401);
    let right =
        send(&url("org/private", "/resolve/main/config.json"), "GET", &[("Authorization", "Bearer secret")]).await;
    assert_eq!((right.status, &right.body[..]), (200, &b"{}"[..]));
    let info =
        send(&format!("{}/api/models/org/private", hub.url()), "GET", &[("Authorization", "Bearer secret")]).await;
    assert_eq!((info.status, &info.json()["private"]), (200, &json!(true)));
    assert_eq!(hub.authorizations(), ["Bearer nope", "Bearer secret", "Bearer secret"]);

    let info = send(&format!("{}/api/models/org/gated", hub.url()), "GET", &[]).await;
    assert_eq!((info.status, &info.json()["gated"]), (200, &json!("auto")));
    let tree = send(&format!("{}/api/models/org/gated/tree/main", hub.url()), "GET", &[]).await;
    assert_eq!(tree.status, 200);
    let file = send(&url("org/gated", "/resolve/main/model.safetensors"), "HEAD", &[]).await;
    assert_eq!((file.status, file.header("x-error-code")), (403, Some("GatedRepo")));
    hub.set_access("org/gated", Access::Public);
    assert_eq!(send(&url("org/gated", "/resolve/main/model.safetensors"), "HEAD", &[]).await.status, 302);
}

// ---------------------------------------------------------------------------------------------
// Python's huggingface_hub against the hub
// ---------------------------------------------------------------------------------------------

const PYTHON_PRELUDE: &str = r#"
import json, sys
from huggingface_hub import hf_hub_download, snapshot_download

def outcome(f):
    try:
        return {"ok": f()}
    except Exception as e:
        return {"error": type(e).__name__, "mro": [c.__name__ for c in type(e).__mro__], "message": str(e)[:800]}

args = json.loads(sys.argv[1])
result = {}
"#;

/// Runs `code` (after [`PYTHON_PRELUDE`]; it fills `result`) with `HF_ENDPOINT` at the hub and
/// returns `result`. Fails, not skips, when Python or huggingface_hub is missing.
async fn python(hub: &TestHub, home: &Path, code: &str, args: Value) -> Value {
    let probe = tokio::process::Command::new("python3")
        .args(["-c", "import huggingface_hub"])
        .stdin(Stdio::null())
        .output()
        .await;
    match probe {
        Ok(out) if out.status.success() => {}
        Ok(out) => panic!(
            "Python's huggingface_hub is needed by this test: pip install huggingface_hub ({})",
            String::from_utf8_lossy(&out.stderr).trim()
        ),
        Err(e) => panic!("python3 is needed by this test, with huggingface_hub: pip install huggingface_hub ({e})"),
    }
    let script = format!("{PYTHON_PRELUDE}\n{code}\nprint('RESULT ' + json.dumps(result))\n");
    let mut command = tokio::process::Command::new("python3");
    command
        .args(["-c", &script, &args.to_string()])
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .env("HF_ENDPOINT", hub.url())
        .env("HF_HOME", home.join("hf-home"))
        .env("HF_HUB_CACHE", home.join("default-cache"))
        .env("HF_HUB_DISABLE_XET", "1")
        .env("HF_HUB_ENABLE_HF_TRANSFER", "0")
        .env("HF_HUB_DISABLE_TELEMETRY", "1")
        .env("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        .env("HF_HUB_DISABLE_IMPLICIT_TOKEN", "1")
        .env("NO_PROXY", "127.0.0.1,localhost")
        .env("no_proxy", "127.0.0.1,localhost");
    for var in ["HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"] {
        command.env_remove(var);
    }
    let out = tokio::time::timeout(WAIT, command.output()).await.expect("python ends in time").expect("run python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "python failed: {}\nstdout:\n{stdout}\nstderr:\n{stderr}", out.status);
    let line = stdout.lines().rev().find_map(|l| l.strip_prefix("RESULT ")).unwrap_or_else(|| {
        panic!("python printed no result\nstdout:\n{stdout}\nstderr:\n{stderr}");
    });
    serde_json::from_str(line).expect("the result is JSON")
}

/// Asserts the HF cache under `cache` holds `revision` of `repo` as huggingface_hub lays it out:
/// `models--org--name/{blobs/<etag>, snapshots/<commit>/<file> → ../../blobs/<etag>}` with the
/// fixture's bytes, and `refs/<revision>` = the commit when the revision is a name.
fn assert_cached(cache: &Path, repo: &HubRepo, revision: &str) {
    let (commit, files) = repo.resolve(revision).expect("a known revision");
    let folder = cache.join(format!("models--{}", repo.id.replace('/', "--")));
    if revision != commit {
        let r = std::fs::read_to_string(folder.join("refs").join(revision)).expect("refs/<revision>");
        assert_eq!(r.trim(), commit, "refs/{revision}");
    }
    let snapshot = folder.join("snapshots").join(commit);
    for (path, data) in files {
        let pointer = snapshot.join(path);
        let meta = std::fs::symlink_metadata(&pointer).unwrap_or_else(|e| panic!("{}: {e}", pointer.display()));
        assert!(meta.file_type().is_symlink(), "{} is a symlink", pointer.display());
        let blob = folder.join("blobs").join(etag_of(path, data));
        assert_eq!(
            std::fs::canonicalize(&pointer).expect("the pointer resolves"),
            std::fs::canonicalize(&blob).expect("the blob exists"),
            "{path} points at its blob"
        );
        assert!(std::fs::read(&pointer).expect("read the snapshot file") == data[..], "{path}: the bytes differ");
    }
    let listed = std::fs::read_dir(&snapshot).expect("the snapshot folder").count();
    assert_eq!(listed, files.len(), "nothing else in the snapshot");
}

/// Python's snapshot_download of a sharded fixture repo works by branch, by tag and by commit id,
/// laying out the standard cache with the fixture's bytes, one HEAD and one GET per file.
#[tokio::test]
async fn python_snapshot_download_by_branch_tag_and_commit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = sharded_repo(&dir.path().join("fixture"));
    let hub = TestHub::start([repo.clone()]).await;
    let commit = repo.commit().to_owned();
    let runs = [("branch", "main"), ("tag", "v1"), ("commit", commit.as_str())];
    let cache = |key: &str| dir.path().join(format!("cache-by-{key}"));
    let caches: BTreeMap<&str, _> = runs.iter().map(|(key, _)| (*key, cache(key))).collect();
    let result = python(
        &hub,
        dir.path(),
        r#"
for key, revision in [("branch", None), ("tag", "v1"), ("commit", args["commit"])]:
    result[key] = outcome(lambda: snapshot_download("org/sharded", revision=revision, cache_dir=args["caches"][key]))
"#,
        json!({ "commit": commit, "caches": caches }),
    )
    .await;

    let mut expected: BTreeMap<&str, u64> = BTreeMap::new();
    for (key, revision) in runs {
        let (at, files) = repo.resolve(revision).expect("a known revision");
        let path = result[key]["ok"].as_str().unwrap_or_else(|| panic!("snapshot by {key}: {}", result[key]));
        assert_eq!(Path::new(path), cache(key).join("models--org--sharded/snapshots").join(at), "by {key}");
        assert_cached(&cache(key), &repo, revision);
        for file in files.keys() {
            *expected.entry(file).or_default() += 1;
        }
    }
    assert!(!cache("commit").join("models--org--sharded/refs").join(&commit).exists(), "no ref for a commit id");
    for (file, n) in expected {
        let stats = hub.stats("org/sharded", file);
        assert_eq!((stats.heads, stats.gets), (n, n), "{file}: one HEAD and one GET per download");
    }
    assert!(hub.authorizations().is_empty(), "no token was sent: {:?}", hub.authorizations());
}

/// Python's errors: a missing file is EntryNotFoundError, an unknown revision RevisionNotFoundError,
/// an unknown repo RepositoryNotFoundError, a gated repo GatedRepoError; a token repo fails without
/// the token and downloads with it, the token reaching the hub but never the LFS store; a body
/// dropped midway is resumed with a Range request.
#[tokio::test]
async fn python_sees_the_hub_errors_and_uses_the_token() {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = sharded_repo(&dir.path().join("fixture"));
    let files = repo.files().clone();
    let large: Vec<u8> = (0..24usize << 20).map(|i| (i * 31 % 251) as u8).collect();
    let hub = TestHub::start([
        repo.clone(),
        HubRepo::new("org/gated", files.clone()).with_access(Access::Gated),
        HubRepo { id: "org/private".into(), ..repo.clone() }.with_access(Access::Token("hf_secret".into())),
        // over Python's 10 MB read chunk, so the part that arrives before the drop is kept
        HubRepo::new("org/large", [("big.safetensors", large.clone())]),
    ])
    .await;
    hub.set_fault_times("org/large", "big.safetensors", Fault::DropMidBody, 1);
    let result = python(
        &hub,
        dir.path(),
        r#"
c = args["cache"]
result["resumed"] = outcome(lambda: hf_hub_download("org/large", "big.safetensors", cache_dir=args["resume_cache"]))
result["missing_file"] = outcome(lambda: hf_hub_download("org/sharded", "nope.json", cache_dir=c))
result["unknown_revision"] = outcome(lambda: hf_hub_download("org/sharded", "config.json", revision="nope", cache_dir=c))
result["unknown_repo"] = outcome(lambda: snapshot_download("org/nothing", cache_dir=c))
result["gated_file"] = outcome(lambda: hf_hub_download("org/gated", "config.json", cache_dir=c))
result["gated_snapshot"] = outcome(lambda: snapshot_download("org/gated", cache_dir=c))
result["private_without_token"] = outcome(lambda: snapshot_download("org/private", cache_dir=c))
result["private_wrong_token"] = outcome(lambda: hf_hub_download("org/private", "config.json", cache_dir=c, token="hf_wrong"))
result["private_with_token"] = outcome(lambda: snapshot_download("org/private", cache_dir=c, token="hf_secret"))
"#,
        json!({ "cache": dir.path().join("cache"), "resume_cache": dir.path().join("resume") }),
    )
    .await;
    let resumed = result["resumed"]["ok"].as_str().unwrap_or_else(|| panic!("resume: {}", result["resumed"]));
    assert!(std::fs::read(resumed).expect("the resumed file") == large, "the resumed file's bytes");
    let gets: Vec<_> =
        hub.requests().into_iter().filter(|r| r.path.starts_with("/_lfs/org/large/") && r.method == "GET").collect();
    assert_eq!(gets.len(), 2, "{gets:?}");
    let range = gets[1].range.as_deref().expect("the second GET asks for a range");
    let from: usize =
        range.strip_prefix("bytes=").and_then(|r| r.strip_suffix('-')).and_then(|n| n.parse().ok()).expect("bytes=N-");
    assert!(from > 0 && from < large.len(), "{range}");
    assert_eq!(gets[1].status, 206);
    let is = |key: &str, class: &str| {
        let mro = result[key]["mro"].as_array().unwrap_or_else(|| panic!("{key} did not fail: {}", result[key]));
        assert!(mro.iter().any(|c| c == class), "{key}: expected {class}, got {}", result[key]);
    };
    is("missing_file", "EntryNotFoundError");
    assert_eq!(result["missing_file"]["error"], "RemoteEntryNotFoundError");
    is("unknown_revision", "RevisionNotFoundError");
    is("unknown_repo", "RepositoryNotFoundError");
    is("gated_file", "GatedRepoError");
    is("gated_snapshot", "GatedRepoError");
    is("private_without_token", "RepositoryNotFoundError");
    is("private_wrong_token", "HfHubHTTPError");
    assert!(result["private_wrong_token"]["message"].as_str().is_some_and(|m| m.contains("401")), "{result}");

    let private = hub.repo("org/private");
    let path =
        result["private_with_token"]["ok"].as_str().unwrap_or_else(|| panic!("{}", result["private_with_token"]));
    assert_eq!(Path::new(path), dir.path().join("cache/models--org--private/snapshots").join(private.commit()));
    assert_cached(&dir.path().join("cache"), &private, "main");
    let requests = hub.requests();
    assert!(requests.iter().any(|r| r.authorization.as_deref() == Some("Bearer hf_secret")), "the token arrived");
    assert!(hub.authorizations().iter().all(|a| a == "Bearer hf_secret" || a == "Bearer hf_wrong"));
    let store: Vec<_> = requests.iter().filter(|r| r.path.starts_with("/_lfs/")).collect();
    assert!(!store.is_empty() && store.iter().all(|r| r.authorization.is_none()), "no token to the store: {store:?}");
}
