//! The attach socket from Python (clients/python, `pip install ./clients/python`), against the
//! server binary: a consumer process attaches to a sharded model of mixed dtypes and every
//! tensor's bytes are the file's; its mappings are the server's (its sealed memfd, shared,
//! read-only, no private pages) and the server's RSS does not grow; writes are refused; an unload
//! without force is refused while it is attached; once it goes the unload works and the memory comes back;
//! SIGKILL of a consumer releases its lease; 100 clients of one process attach at once.

use std::{collections::BTreeMap, path::Path, process::Stdio, time::Duration};

use proto::v1::{self as pb, model_loader_client::ModelLoaderClient};
use serde_json::Value;
use tests::{WAIT, binary::Binary, cpu_resources, fixture, load, load_ok, rss_bytes};

use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
};
use tonic::Code;

const MODEL: &str = "mixed";

type Client = ModelLoaderClient<tonic::transport::Channel>;

/// A consumer process (tests/python/attach_consumer.py) and its report.
struct Consumer {
    child: Child,
    report: Value,
}

async fn consumer(socket: &Path, expected: &Path, count: usize) -> Consumer {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("python/attach_consumer.py");
    let mut child = Command::new("python3")
        .arg(script)
        .args([socket.to_str().expect("UTF-8"), MODEL, expected.to_str().expect("UTF-8"), &count.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("python3 (pip install ./clients/python)");
    let stdout = child.stdout.take().expect("stdout");
    let line = tokio::time::timeout(WAIT, BufReader::new(stdout).lines().next_line())
        .await
        .expect("the consumer reports in time")
        .expect("read")
        .expect("a report line (see the consumer's stderr)");
    Consumer { child, report: serde_json::from_str(&line).expect("a JSON report") }
}

impl Consumer {
    /// Closes its standard input: it lets go and exits.
    async fn finish(mut self) {
        drop(self.child.stdin.take());
        let status = tokio::time::timeout(WAIT, self.child.wait()).await.expect("exits").expect("wait");
        assert!(status.success(), "the consumer failed: {status:?}");
    }
}

async fn attached_clients(client: &mut Client) -> u32 {
    tests::get_model(client, MODEL).await.attached_clients
}

async fn wait_for_clients(client: &mut Client, want: u32) {
    tests::eventually!(attached_clients(client).await == want, "attached clients never became {want}");
}

// One scenario, read top to bottom.
#[allow(clippy::too_many_lines)]
#[tokio::test]
async fn a_python_process_maps_the_servers_memory() {
    let tmp = tempfile::tempdir().expect("tmp");
    let models = tmp.path().join("models");
    // 32 MiB of F32 (a copy into the server or the client would show in RSS), BF16 and I64.
    let mut tensors = fixture::f32_tensors("layers", 8, 1 << 20);
    tensors.push(fixture::TensorSpec::bf16("head.weight", &[256, 128], 9));
    tensors.push(fixture::TensorSpec::i64_range("positions", 4096));
    let expected = fixture::sharded_model(&models.join(MODEL), &tensors, 3).expect("fixture");
    let digests: BTreeMap<&String, &String> = expected.tensors.iter().map(|(n, (_, _, sha))| (n, sha)).collect();
    let expected_path = tmp.path().join("expected.json");
    std::fs::write(&expected_path, serde_json::to_vec(&digests).expect("json")).expect("write");
    let socket = tmp.path().join("attach.sock");
    let root = models.to_str().expect("UTF-8");
    let server =
        Binary::start(&["--model-root", root, "--offline", "--attach-socket", socket.to_str().expect("UTF-8")], &[])
            .await;
    let mut client = tests::connect(server.addr).await;
    load_ok(&mut client, load(MODEL)).await;
    let before = rss_bytes(Some(server.pid()));

    let one = consumer(&socket, &expected_path, 1).await;
    let report = &one.report;
    assert_eq!(report["digests_match"], true, "{report}");
    assert_eq!(
        (report["write_refused"].as_bool(), report["writable_mapping_refused"].as_bool()),
        (Some(true), Some(true))
    );
    assert_eq!(report["attached_clients"], 1, "{report}");
    let mappings = report["mappings"].as_array().expect("mappings");
    // Loaded as stored from local files that could change: the client maps the server's memfd.
    assert_eq!(mappings.len(), 1, "the load's one memfd is mapped: {report}");
    let shared_bytes: u64 = mappings
        .iter()
        .map(|m| m["fields"]["Shared_Clean"].as_u64().unwrap_or(0) + m["fields"]["Shared_Dirty"].as_u64().unwrap_or(0))
        .sum();
    assert!(shared_bytes >= expected.bytes(), "every tensor's pages, shared: {report}");
    for m in mappings {
        assert_eq!(m["perms"], "r--s", "read-only and shared: {m}");
        let f = &m["fields"];
        let private = f["Private_Clean"].as_u64().unwrap_or(0) + f["Private_Dirty"].as_u64().unwrap_or(0);
        let shared = f["Shared_Clean"].as_u64().unwrap_or(0) + f["Shared_Dirty"].as_u64().unwrap_or(0);
        assert_eq!(private, 0, "no private copy of a page: {m}");
        assert!(shared > 0, "the server's pages, shared: {m}");
        // Proportional set size: each page counted half here, half in the server.
        let (rss, pss) = (f["Rss"].as_u64().unwrap_or(0), f["Pss"].as_u64().unwrap_or(0));
        assert!(pss * 2 <= rss + 4096, "shared with one other process (the server): {m}");
    }
    let grown = rss_bytes(Some(server.pid())).saturating_sub(before);
    assert!(grown < 4 << 20, "the server's RSS grew by {grown} bytes on attach");

    let unload = pb::UnloadModelRequest { model_id: MODEL.into(), force: false };
    let refused = client.unload_model(unload.clone()).await.expect_err("attached");
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(refused.message().contains("1 attached clients"), "{refused:?}");

    // SIGKILL of a second consumer releases its lease.
    let mut killed = consumer(&socket, &expected_path, 1).await;
    wait_for_clients(&mut client, 2).await;
    killed.child.start_kill().expect("SIGKILL");
    let _ = killed.child.wait().await;
    wait_for_clients(&mut client, 1).await;

    // 100 clients of one process attach at once, and all let go.
    let many = consumer(&socket, &expected_path, 100).await;
    assert_eq!(many.report["digests_match"], true);
    wait_for_clients(&mut client, 101).await;
    many.finish().await;
    wait_for_clients(&mut client, 1).await;

    one.finish().await;
    wait_for_clients(&mut client, 0).await;
    let loaded = rss_bytes(Some(server.pid()));
    let unloaded = client.unload_model(unload).await.expect("unloads once detached").into_inner();
    assert!(unloaded.was_loaded);
    let cpu = cpu_resources(&mut client).await;
    assert_eq!((cpu.used_bytes, cpu.reserved_bytes), (0, 0), "{cpu:?}");
    tests::eventually!(
        loaded.saturating_sub(rss_bytes(Some(server.pid()))) >= expected.bytes() * 9 / 10,
        "the memfd's memory never came back"
    );
}

/// The README's Attach section works as written: its `cargo run` line, run from the repository
/// root (the release build `just test` made), serves the demo with the attach socket, and its
/// Python example, run as it is, loads and attaches the demo and prints the tensor it names.
#[tokio::test]
async fn the_readmes_attach_example_works() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).expect("README");
    let section = readme.split_once("\n## Attach").expect("an Attach section").1;
    let section = section.split("\n## ").next().expect("the section");
    let block = |lang: &str| {
        let (_, rest) = section.split_once(&format!("```{lang}\n")).unwrap_or_else(|| panic!("a {lang} block"));
        rest.split_once("```").expect("the block's end").0.to_owned()
    };
    let (run, example) = (block("sh"), block("python"));
    let run = run.lines().next().expect("a line").to_owned();
    assert!(run.starts_with("cargo run --release -- --attach-socket "), "{run}");
    let socket = run.rsplit(' ').next().expect("the socket path").to_owned();
    let _ = std::fs::remove_file(&socket);
    drop(std::net::TcpListener::bind("127.0.0.1:50051").expect("127.0.0.1:50051 is free for the README's server"));

    let repo_root = fixture::repo_models_dir().join("..");
    let mut command = Command::new("sh");
    command.args(["-c", &run]).current_dir(&repo_root).process_group(0);
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy();
        if key.starts_with("CARGO_") && !["CARGO_HOME", "CARGO_TARGET_DIR"].contains(&key.as_ref()) {
            command.env_remove(key.as_ref());
        }
    }
    let mut server = Binary::spawn(command);
    server
        .wait_for_line_within(Duration::from_secs(30 * 60), |l| l.contains("serving modelloader.v1.ModelLoader"))
        .await;
    let out = tokio::time::timeout(WAIT, Command::new("python3").args(["-c", &example]).output())
        .await
        .expect("the example ends")
        .expect("python3");
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{printed}{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(printed.trim(), "float32 (64, 4, 3, 3) 1", "{printed}");
    server.sigterm_in_group("model-loader");
    let exit = server.wait_exit(Duration::from_secs(15)).await;
    assert!(exit.success(), "exit status {exit:?}");
    assert!(!Path::new(&socket).exists(), "the socket is removed at shutdown");
}
