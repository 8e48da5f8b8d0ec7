//! Loading models end to end through an in-process server: the steps, byte progress, every
//! layout, checksums of what is resident, single flight and late joiners.

use proto::v1::{self as pb};
use tests::{STEPS, TestServer, WAIT, checksums, config, fixture, load, load_all, state_of};
use tokio_stream::StreamExt;

/// Checks a complete load stream: steps 1..=8 in order, the table's message and phase on each,
/// total 8, byte progress inside step 4 rising to its total, and 8/8 last.
fn assert_full_stream(messages: &[pb::ModelLoadProgress], bytes_total: u64) {
    assert!(!messages.is_empty());
    let mut last_step = 0;
    let mut seen = Vec::new();
    let mut last_bytes = 0;
    for m in messages {
        assert_eq!(m.total, 8, "{m:?}");
        assert!(m.step >= last_step, "steps go backwards: {m:?}");
        let (_, message, phase) = STEPS[(m.step - 1) as usize];
        assert_eq!((m.message.as_str(), m.phase()), (message, phase), "{m:?}");
        if m.step != last_step {
            seen.push(m.step);
        }
        last_step = m.step;
        if m.bytes_total > 0 {
            assert_eq!(m.step, 4, "only step 4 moves bytes on the cpu: {m:?}");
            assert_eq!(m.bytes_total, bytes_total);
            assert!(m.bytes_done >= last_bytes && m.bytes_done <= m.bytes_total, "{m:?}");
            last_bytes = m.bytes_done;
        }
    }
    assert_eq!(seen, (1..=8).collect::<Vec<_>>());
    assert_eq!(last_bytes, bytes_total, "byte progress reaches the total");
    assert_eq!(messages.last().map(|m| m.step), Some(8));
}

/// The bundled demo pipeline streams steps 1..=8 with byte progress, is LOADED with sample_size 32,
/// and ListTensors shows every tensor with the checksum of its bytes in the file.
#[tokio::test]
async fn demo_pipeline_loads_with_every_step() {
    let tmp = tempfile::tempdir().expect("tmp");
    let expected = fixture::demo_tiny_sd(&tmp.path().join("demo/tiny-sd")).expect("fixture");
    let server = TestServer::start(config(tmp.path())).await;
    let mut client = server.client().await;

    let (messages, end) = load_all(&mut client, load("demo/tiny-sd")).await;
    end.expect("load ends OK");
    assert_full_stream(&messages, expected.bytes());

    let status =
        client.get_model(pb::GetModelRequest { model_id: "demo/tiny-sd".into() }).await.expect("get").into_inner();
    assert_eq!(status.state(), pb::ModelState::Loaded);
    assert_eq!(status.sample_size, Some(32));
    assert_eq!((status.device.as_str(), status.dtype.as_str()), ("cpu", "F32"));
    assert_eq!(status.weight_bytes, expected.bytes());
    assert_eq!(status.metadata_bytes, expected.metadata_bytes(), "its tensors' metadata is booked too");
    assert_eq!(status.source(), pb::ModelSource::Local);
    assert_eq!(status.revision, "", "a model-root folder has no revision: empty, as the proto says");
    assert_eq!(checksums(&mut client, "demo/tiny-sd").await, expected.tensors);
    server.stop().await;
}

/// The committed demo model is exactly what the fixture builder writes (it can be regenerated).
#[test]
fn committed_demo_model_is_reproducible() {
    let tmp = tempfile::tempdir().expect("tmp");
    fixture::demo_tiny_sd(tmp.path()).expect("fixture");
    let committed = fixture::repo_models_dir().join("demo/tiny-sd");
    for file in [
        "model_index.json",
        "scheduler/scheduler_config.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors",
    ] {
        let fresh = std::fs::read(tmp.path().join(file)).expect("fresh file");
        let repo = std::fs::read(committed.join(file)).expect("committed file (run `just demo-model`)");
        assert!(fresh == repo, "{file} differs from what the fixture builder writes: run `just demo-model`");
    }
}

/// A single-file model and a sharded model load, and every resident tensor's dtype, shape and
/// sha256 equal those in the files (F32, BF16 and I64 tensors).
#[tokio::test]
async fn single_file_and_sharded_models_load_intact() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mixed = vec![
        fixture::TensorSpec::f32("embed.weight", &[64, 32], 1),
        fixture::TensorSpec::bf16("norm.weight", &[32], 2),
        fixture::TensorSpec::i64_range("position_ids", 77),
    ];
    let single = fixture::single_file_model(&tmp.path().join("single"), &mixed).expect("single");
    let sharded = fixture::sharded_model(&tmp.path().join("org/sharded"), &fixture::f32_tensors("layers", 9, 1000), 3)
        .expect("sharded");
    let server = TestServer::start(config(tmp.path())).await;
    let mut client = server.client().await;

    for (id, expected) in [("single", &single), ("org/sharded", &sharded)] {
        let (messages, end) = load_all(&mut client, load(id)).await;
        end.unwrap_or_else(|e| panic!("{id}: {e}"));
        assert_full_stream(&messages, expected.bytes());
        assert_eq!(checksums(&mut client, id).await, expected.tensors, "{id}");
    }
    let status = client.get_model(pb::GetModelRequest { model_id: "single".into() }).await.expect("get").into_inner();
    assert_eq!(status.dtype, "mixed", "F32 and BF16 floats");
    server.stop().await;
}

/// A LoadModel for a model that is already loaded sends one message, 8/8 "already loaded".
#[tokio::test]
async fn loading_a_loaded_model_answers_at_once() {
    let tmp = tempfile::tempdir().expect("tmp");
    fixture::demo_tiny_sd(&tmp.path().join("demo/tiny-sd")).expect("fixture");
    let server = TestServer::start(config(tmp.path())).await;
    let mut client = server.client().await;
    load_all(&mut client, load("demo/tiny-sd")).await.1.expect("first load");
    let (messages, end) = load_all(&mut client, load("demo/tiny-sd")).await;
    end.expect("OK");
    assert_eq!(messages.len(), 1);
    assert_eq!((messages[0].step, messages[0].detail.as_str()), (8, "already loaded"));
    server.stop().await;
}

/// A late joiner of a load in flight first receives the latest message (not step 1), then the rest.
#[tokio::test]
async fn late_joiner_starts_from_the_latest_message() {
    let tmp = tempfile::tempdir().expect("tmp");
    let expected = fixture::large_sharded_model(&tmp.path().join("big"), 256, 2, 4).expect("fixture");
    let server = TestServer::start(config(tmp.path())).await;
    let mut client = server.client().await;

    // The joiner races the load; if the load wins (it finished before the join), try again.
    for attempt in 1..=5 {
        let mut first = client.load_model(load("big")).await.expect("load").into_inner();
        // Wait until the load is inside step 4, then join.
        loop {
            let m = tokio::time::timeout(WAIT, first.next()).await.expect("moves").expect("open").expect("ok");
            if m.step == 4 && m.bytes_total > 0 {
                break;
            }
        }
        let (joined, end) = load_all(&mut server.client().await, load("big")).await;
        end.expect("joiner ends OK");
        while let Some(m) = tokio::time::timeout(WAIT, first.next()).await.expect("moves") {
            m.expect("first stream ends OK");
        }
        if joined.len() == 1 && joined[0].detail == "already loaded" {
            eprintln!("attempt {attempt}: the load finished before the join; again");
            client.unload_model(pb::UnloadModelRequest { model_id: "big".into(), force: false }).await.expect("unload");
            continue;
        }
        assert!(joined[0].step >= 4, "the joiner starts from the latest message: {:?}", joined[0]);
        assert_eq!(joined.last().map(|m| m.step), Some(8));
        assert!(joined.windows(2).all(|w| w[0].step <= w[1].step));
        assert_eq!(state_of(&mut client, "big").await, pb::ModelState::Loaded);
        let resources = tests::cpu_resources(&mut client).await;
        assert_eq!(resources.used_bytes, expected.booked());
        server.stop().await;
        return;
    }
    panic!("the load always finished before the joiner joined");
}

/// A model in the HF cache layout (refs/main → snapshots/<commit>, files symlinked to blobs/)
/// loads with source CACHE and the resolved commit as its revision; a revision the cache lacks is
/// NOT_FOUND.
#[tokio::test]
async fn loads_from_the_hf_cache() {
    let tmp = tempfile::tempdir().expect("tmp");
    let staging = tmp.path().join("staging");
    let expected = fixture::single_file_model(&staging, &fixture::f32_tensors("w", 3, 100)).expect("fixture");
    let commit = "0123456789abcdef0123456789abcdef01234567";
    let repo = tmp.path().join("hub/models--org--cached");
    let snapshot = repo.join("snapshots").join(commit);
    std::fs::create_dir_all(repo.join("blobs")).expect("blobs");
    std::fs::create_dir_all(repo.join("refs")).expect("refs");
    std::fs::create_dir_all(&snapshot).expect("snapshot");
    std::fs::write(repo.join("refs/main"), commit).expect("ref");
    for file in ["config.json", "model.safetensors"] {
        let blob = format!("blob-{file}");
        std::fs::rename(staging.join(file), repo.join("blobs").join(&blob)).expect("move to blobs");
        std::os::unix::fs::symlink(format!("../../blobs/{blob}"), snapshot.join(file)).expect("symlink");
    }
    let mut cfg = config(&tmp.path().join("empty-root"));
    cfg.manager.loader.sources.hf_cache = Some(tmp.path().join("hub"));
    let server = TestServer::start(cfg).await;
    let mut client = server.client().await;

    let (messages, end) = load_all(&mut client, load("org/cached")).await;
    end.expect("loads from the cache");
    assert!(messages.iter().any(|m| m.detail == format!("cache hit: snapshot {commit}")), "{messages:?}");
    let status =
        client.get_model(pb::GetModelRequest { model_id: "org/cached".into() }).await.expect("get").into_inner();
    assert_eq!((status.source(), status.revision.as_str()), (pb::ModelSource::Cache, commit));
    assert_eq!(checksums(&mut client, "org/cached").await, expected.tensors);

    let request = pb::LoadModelRequest { revision: Some("v2".into()), ..load("org/other") };
    let (_, end) = load_all(&mut client, request).await;
    assert_eq!(end.expect_err("not cached").code(), tonic::Code::NotFound);
    server.stop().await;
}
