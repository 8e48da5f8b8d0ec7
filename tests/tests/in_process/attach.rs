//! The attach socket through the Rust client: a sharded model of mixed dtypes attaches, every
//! tensor's bytes are the file's (checked against the fixture's sha256), in one sealed memfd (its
//! files could change: only immutable ones are mapped, see attach_files.rs); while attached the model cannot be unloaded without force, and after
//! the client goes it can; a forced unload, and shutdown, close an attached client's connection.
//! A model of more files than one message can pass descriptors for attaches too.

use std::time::Duration;

use attach::{AttachRequest, Attached};
use proto::v1 as pb;
use sha2::{Digest, Sha256};
use tests::{TestServer, config, fixture, load, load_ok, with_attach};
use tonic::Code;

const TIMEOUT: Duration = Duration::from_secs(30);

fn request(id: &str) -> AttachRequest {
    AttachRequest { model_id: id.into(), ..Default::default() }
}

/// Attaches on a blocking thread (the client is blocking).
async fn attach(socket: &std::path::Path, request: AttachRequest) -> Result<Attached, attach::AttachError> {
    let socket = socket.to_owned();
    tokio::task::spawn_blocking(move || Attached::attach(&socket, &request, TIMEOUT)).await.expect("attach task")
}

#[tokio::test]
async fn attached_tensors_are_the_files_bytes_and_hold_the_model() {
    let tmp = tempfile::tempdir().expect("tmp");
    let models = tmp.path().join("models");
    let mut tensors = fixture::f32_tensors("layers", 4, 4096);
    tensors.push(fixture::TensorSpec::bf16("head.weight", &[64, 32], 7));
    tensors.push(fixture::TensorSpec::i64_range("positions", 1000));
    let expected = fixture::sharded_model(&models.join("mixed"), &tensors, 2).expect("fixture");
    let socket = tmp.path().join("attach.sock");
    let server = TestServer::start(with_attach(config(&models), &socket)).await;
    let mut client = server.client().await;
    // The server task runs once the test yields: a gRPC answer says it has bound the socket too.
    client.list_models(pb::ListModelsRequest::default()).await.expect("ListModels");

    let refused = attach(&socket, request("mixed")).await.expect_err("not loaded yet");
    assert!(matches!(refused, attach::AttachError::Refused { code: 9, .. }), "{refused:?}");
    load_ok(&mut client, load("mixed")).await;
    let attached = attach(&socket, request("mixed")).await.expect("attaches");
    // Loaded as stored from local files that could change: read into one memfd, not mapped.
    assert_eq!(attached.buffers().len(), 1, "one memfd for the load: {:?}", attached.buffers());
    assert!(attached.buffers().iter().all(|b| b.kind() == pb::BufferKind::HostMemfd), "{:?}", attached.buffers());
    assert_eq!(attached.status().map(|s| s.attached_clients), Some(1));
    let got: Vec<(String, String, Vec<u64>, String)> = attached
        .tensors()
        .iter()
        .map(|t| {
            let bytes = attached.bytes(t).expect("host bytes");
            (t.name.clone(), t.dtype.clone(), t.shape.clone(), hex::encode(Sha256::digest(bytes)))
        })
        .collect();
    let want: Vec<(String, String, Vec<u64>, String)> =
        expected.tensors.iter().map(|(n, (d, s, h))| (n.clone(), d.clone(), s.clone(), h.clone())).collect();
    assert_eq!(got, want);

    let unload = pb::UnloadModelRequest { model_id: "mixed".into(), force: false };
    let status = client.unload_model(unload.clone()).await.expect_err("attached");
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(status.message().contains("1 attached clients"), "{status:?}");
    drop(attached);
    // The server sees the connection close at once, but asynchronously: wait for the lease to go.
    tests::eventually!(client.unload_model(unload.clone()).await.is_ok(), "the lease is never released");

    // A forced unload takes an attached model.
    load_ok(&mut client, load("mixed")).await;
    let attached = attach(&socket, request("mixed")).await.expect("attaches again");
    assert!(!attached.closed_by_server(Duration::from_millis(50)).expect("open"), "the lease holds");
    let forced = pb::UnloadModelRequest { model_id: "mixed".into(), force: true };
    assert!(client.unload_model(forced).await.expect("forced").into_inner().was_loaded);
    let closed = tokio::task::spawn_blocking(move || attached.closed_by_server(TIMEOUT)).await.expect("task");
    assert!(closed.expect("read"), "a forced unload closes the client's connection");

    // Shutdown closes every connection.
    load_ok(&mut client, load("mixed")).await;
    let attached = attach(&socket, request("mixed")).await.expect("attaches again");
    server.stop().await;
    let closed = tokio::task::spawn_blocking(move || attached.closed_by_server(TIMEOUT)).await.expect("task");
    assert!(closed.expect("read"), "shutdown closes the client's connection");
    assert!(!socket.exists(), "and removes the socket");
}

/// With `--evict lru`, an attached model is never evicted, even when least recently used: the
/// next one goes instead; once its client is gone it is evictable again.
#[tokio::test]
async fn eviction_skips_an_attached_model() {
    let tmp = tempfile::tempdir().expect("tmp");
    let models = tmp.path().join("models");
    let size = |id: &str| {
        fixture::single_file_model(&models.join(id), &fixture::f32_tensors("layer", 4, 16 * 1024))
            .expect("fixture")
            .booked()
    };
    let bytes = size("a");
    for id in ["b", "c"] {
        assert_eq!(size(id), bytes);
    }
    let socket = tmp.path().join("attach.sock");
    let mut cfg = with_attach(config(&models), &socket);
    cfg.manager.budget = model_manager::resource_manager::MemoryBudget::Bytes(2 * bytes);
    cfg.manager.loader.evict = model_manager::EvictPolicy::Lru;
    let server = TestServer::start(cfg).await;
    let mut client = server.client().await;

    load_ok(&mut client, load("a")).await;
    let attached = attach(&socket, request("a")).await.expect("attaches");
    load_ok(&mut client, load("b")).await;
    // A is now the least recently used, but attached: loading C evicts B.
    let messages = load_ok(&mut client, load("c")).await;
    assert!(messages.iter().any(|m| m.detail.starts_with("evicted b ")), "{messages:?}");
    let state = |s: pb::ModelStatus| (s.state(), s.attached_clients);
    assert_eq!(state(tests::get_model(&mut client, "a").await), (pb::ModelState::Loaded, 1));
    assert_eq!(state(tests::get_model(&mut client, "b").await), (pb::ModelState::Unloaded, 0));

    drop(attached);
    tests::eventually!(tests::get_model(&mut client, "a").await.attached_clients == 0, "the lease is never released");
    let messages = load_ok(&mut client, load("b")).await;
    assert!(messages.iter().any(|m| m.detail.starts_with("evicted a ")), "A goes once detached: {messages:?}");
    server.stop().await;
}

/// A model of 300 shards, more files than one message can pass descriptors for, attaches: every
/// tensor's bytes are the file's, and it names its shard.
#[tokio::test]
async fn a_model_of_three_hundred_shards_attaches() {
    let tmp = tempfile::tempdir().expect("tmp");
    let models = tmp.path().join("models");
    let expected =
        fixture::sharded_model(&models.join("many"), &fixture::f32_tensors("t", 300, 64), 300).expect("fixture");
    let socket = tmp.path().join("attach.sock");
    let server = TestServer::start(with_attach(config(&models), &socket)).await;
    let mut client = server.client().await;
    load_ok(&mut client, load("many")).await;
    let attached = attach(&socket, request("many")).await.expect("a 300-shard model attaches");
    let got: Vec<(String, String)> = attached
        .tensors()
        .iter()
        .map(|t| (t.name.clone(), hex::encode(Sha256::digest(attached.bytes(t).expect("host bytes")))))
        .collect();
    let want: Vec<(String, String)> = expected.tensors.iter().map(|(n, (_, _, h))| (n.clone(), h.clone())).collect();
    assert_eq!(got, want);
    // Each tensor names the shard it was read from (the fixture puts tensor i in shard i + 1).
    for t in attached.tensors() {
        let i: usize = t.name.trim_start_matches("t.").trim_end_matches(".weight").parse().expect("fixture name");
        assert_eq!(t.file, format!("model-{:05}-of-00300.safetensors", i + 1), "{}", t.name);
    }
    drop(attached);
    server.stop().await;
}
