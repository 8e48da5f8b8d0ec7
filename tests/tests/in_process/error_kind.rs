//! Every failure carries a stable kind a program can match on: a failed load's ModelStatus has
//! `error_kind` (GetModel and WatchModels alike), the error status of any RPC carries it in the
//! `model-loader-error-kind` metadata entry, and a loaded model tells when it was last used.

use std::time::{SystemTime, UNIX_EPOCH};

use proto::v1 as pb;
use tests::{expect_code, fixture, get_model, load, load_all, load_ok, serve, until_status, watch};
use tonic::{Code, Status};

/// The kind an error status carries in its metadata.
fn kind_of(status: &Status) -> &str {
    status
        .metadata()
        .get("model-loader-error-kind")
        .unwrap_or_else(|| panic!("the status carries a kind: {status:?}"))
        .to_str()
        .expect("an ASCII kind")
}

fn now_ms() -> u64 {
    u64::try_from(SystemTime::now().duration_since(UNIX_EPOCH).expect("after 1970").as_millis()).expect("fits")
}

/// A corrupt safetensors file: the load's stream ends DATA_LOSS with kind `corrupt`, the FAILED
/// status (GetModel and the watch's) says `corrupt` beside the message, and a load of the
/// repaired file clears it.
#[tokio::test]
async fn failed_load_has_its_kind_in_status_and_stream() {
    let root = tempfile::tempdir().expect("tempdir");
    let dir = root.path().join("bad");
    let tensors = fixture::f32_tensors("w", 3, 64);
    fixture::single_file_model(&dir, &tensors).expect("model");
    let file = dir.join("model.safetensors");
    let good = std::fs::read(&file).expect("read the good file");
    // A header length far past the end of the file.
    let mut corrupt = good.clone();
    corrupt[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    std::fs::write(&file, corrupt).expect("write the corrupt file");
    let (server, mut client) = serve(root.path()).await;
    let mut watcher = watch(&mut client, "bad").await;

    let (_, end) = load_all(&mut client, load("bad")).await;
    let status = expect_code(end, Code::DataLoss, "a corrupt file");
    assert_eq!(kind_of(&status), "corrupt");
    let failed = get_model(&mut client, "bad").await;
    assert_eq!(failed.state(), pb::ModelState::Failed, "{failed:?}");
    assert_eq!(failed.error_kind, "corrupt", "{failed:?}");
    assert!(!failed.error.is_empty(), "the message for people stays: {failed:?}");
    assert_eq!(failed.last_used_unix_ms, 0, "nothing is resident: {failed:?}");
    // The watch's FAILED status carries the kind as GetModel's does.
    until_status(&mut watcher, "bad", pb::ModelState::Failed, |s| s.error_kind == "corrupt").await;

    std::fs::write(&file, good).expect("repair the file");
    let before = now_ms();
    load_ok(&mut client, load("bad")).await;
    let loaded = get_model(&mut client, "bad").await;
    assert_eq!((loaded.error.as_str(), loaded.error_kind.as_str()), ("", ""), "{loaded:?}");
    assert!(
        (before..=now_ms()).contains(&loaded.last_used_unix_ms),
        "last use is the load, between {before} and now: {loaded:?}"
    );
    // The watch's LOADED status tells the same last use as GetModel.
    let last_used = loaded.last_used_unix_ms;
    until_status(&mut watcher, "bad", pb::ModelState::Loaded, |s| s.last_used_unix_ms == last_used).await;
    server.stop().await;
}

/// Errors of calls that are not a load's stream carry their kind too: a model that exists nowhere
/// (`not_found`, for LoadModel and GetModel) and ListTensors of a model not loaded
/// (`not_loaded`).
#[tokio::test]
async fn error_statuses_carry_the_kind() {
    let root = tempfile::tempdir().expect("tempdir");
    fixture::single_file_model(&root.path().join("idle"), &fixture::f32_tensors("w", 2, 16)).expect("model");
    let (server, mut client) = serve(root.path()).await;

    let (_, end) = load_all(&mut client, load("nowhere")).await;
    assert_eq!(kind_of(&expect_code(end, Code::NotFound, "LoadModel of a missing model")), "not_found");
    let get = client.get_model(pb::GetModelRequest { model_id: "never-seen".into() }).await;
    assert_eq!(kind_of(&expect_code(get, Code::NotFound, "GetModel of a missing model")), "not_found");
    let tensors = client.list_tensors(pb::ListTensorsRequest { model_id: "idle".into(), with_checksums: false }).await;
    let status = expect_code(tensors, Code::FailedPrecondition, "ListTensors of a model not loaded");
    assert_eq!(kind_of(&status), "not_loaded");
    server.stop().await;
}
