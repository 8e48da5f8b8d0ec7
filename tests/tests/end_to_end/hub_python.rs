//! The HF cache is shared with Python's `huggingface_hub` both ways: what our server downloads,
//! Python reads offline; what Python's `snapshot_download` writes, our server loads offline.
//! Needs `pip install huggingface_hub` (`.ci/run` installs it); fails, never skips, without it.

use std::{path::Path, process::Stdio};

use tests::{
    TestServer, WAIT, config, fixture,
    hub::{HubRepo, TestHub},
    load, load_all,
};

/// Runs a Python snippet with `env`; returns its stdout's last line, failing the test on an error.
async fn python(code: &str, env: &[(&str, &Path)], offline: bool) -> String {
    let mut command = tokio::process::Command::new("python3");
    command.args(["-c", code]).stdin(Stdio::null()).kill_on_drop(true);
    for var in ["HF_TOKEN", "HF_HUB_OFFLINE", "HF_ENDPOINT", "HF_HOME"] {
        command.env_remove(var);
    }
    for (k, v) in env {
        command.env(k, v);
    }
    command.env("HF_HUB_DISABLE_XET", "1").env("HF_HUB_DISABLE_TELEMETRY", "1").env("NO_PROXY", "127.0.0.1,localhost");
    if offline {
        command.env("HF_HUB_OFFLINE", "1");
    }
    let out = tokio::time::timeout(WAIT, command.output())
        .await
        .expect("python ends in time")
        .expect("python3 runs (pip install huggingface_hub)");
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "python failed (pip install huggingface_hub?):\n{stdout}\n{stderr}");
    stdout.lines().last().unwrap_or_default().to_owned()
}

/// A cache our server filled from the hub is read by huggingface_hub with HF_HUB_OFFLINE=1, and a
/// cache huggingface_hub's snapshot_download filled is loaded by our server offline, with the
/// fixture's checksums.
#[tokio::test]
async fn the_cache_is_shared_with_huggingface_hub_both_ways() {
    let tmp = tempfile::tempdir().expect("tmp");
    let expected =
        fixture::sharded_model(&tmp.path().join("repo"), &fixture::f32_tensors("layers", 4, 4096), 2).expect("fixture");
    let repo = HubRepo::from_dir("org/shared", &tmp.path().join("repo")).expect("repo");
    let commit = repo.commit().to_owned();
    let hub = TestHub::start([repo]).await;

    // Ours → Python: our server downloads into cache A; Python reads it offline.
    let cache_a = tmp.path().join("cache-a");
    let mut cfg = config(&tmp.path().join("models"));
    cfg.manager.loader.sources.offline = false;
    cfg.manager.loader.sources.hf_cache = Some(cache_a.clone());
    cfg.manager.loader.sources.hub.endpoint = Some(hub.url().to_owned());
    let server = TestServer::start(cfg).await;
    load_all(&mut server.client().await, load("org/shared")).await.1.expect("downloads");
    server.stop().await;
    let code = r#"
import os
from huggingface_hub import snapshot_download
path = snapshot_download("org/shared", cache_dir=os.environ["CACHE"])
print(os.path.basename(path), sorted(os.listdir(path)))
"#;
    let line = python(code, &[("CACHE", &cache_a)], true).await;
    assert!(line.starts_with(&commit), "Python resolved main to our commit offline: {line}");
    for file in ["config.json", "model.safetensors.index.json", "model-00001-of-00002.safetensors"] {
        assert!(line.contains(file), "{file} in {line}");
    }

    // Python → ours: snapshot_download into cache B; our server loads it with --offline.
    let cache_b = tmp.path().join("cache-b");
    let code = r#"
import os
from huggingface_hub import snapshot_download
print(snapshot_download("org/shared", cache_dir=os.environ["CACHE"]))
"#;
    let endpoint = std::path::PathBuf::from(hub.url());
    python(code, &[("CACHE", &cache_b), ("HF_ENDPOINT", &endpoint)], false).await;
    drop(hub);
    let mut cfg = config(&tmp.path().join("models"));
    cfg.manager.loader.sources.hf_cache = Some(cache_b);
    let server = TestServer::start(cfg).await;
    let mut client = server.client().await;
    let (messages, end) = load_all(&mut client, load("org/shared")).await;
    end.expect("loads Python's cache offline");
    assert!(messages.iter().any(|m| m.detail == format!("cache hit: snapshot {commit}")), "{messages:?}");
    assert_eq!(tests::checksums(&mut client, "org/shared").await, expected.tensors);
    server.stop().await;
}
