//! Bad input of every kind gets its exact gRPC code, a message that names the reason, and leaves
//! the server healthy: malformed ids, revisions, devices and dtypes, unknown models, pickle-only
//! models, corrupt safetensors files, symlinks out of the model root, and ListTensors of a model
//! that is not loaded.

use proto::v1::{self as pb, model_loader_client::ModelLoaderClient};
use serde_json::json;
use tempfile::TempDir;
use tests::{assert_failed_with, expect_code, fixture};
use tonic::{Code, transport::Channel};

type Client = ModelLoaderClient<Channel>;

/// The model every server in this file also has, to show it still loads after bad input.
const GOOD: &str = "good";

/// Ids the hub's rules refuse; none may reach the file system.
fn malformed_ids() -> Vec<String> {
    vec!["".into(), "../x".into(), "/abs".into(), "a//b".into(), "a\u{1}b".into(), "a".repeat(200), "a/b/c".into()]
}

/// A model root holding the good model; the test adds what it needs.
fn model_root() -> TempDir {
    let root = tempfile::tempdir().expect("tempdir");
    fixture::single_file_model(&root.path().join(GOOD), &fixture::f32_tensors("layer", 4, 256)).expect("good model");
    root
}

/// The server still answers and still loads: GetResources answers, the good model loads to
/// LOADED, its tensors are listed, and it unloads again.
async fn assert_healthy(client: &mut Client) {
    let cpu = tests::cpu_resources(client).await;
    assert!(cpu.budget_bytes > 0, "{cpu:?}");
    let (messages, end) = tests::load_all(client, tests::load(GOOD)).await;
    end.expect("the good model loads");
    assert_eq!(messages.last().map(|m| m.step), Some(8), "{messages:?}");
    assert_eq!(tests::state_of(client, GOOD).await, pb::ModelState::Loaded);
    let tensors = client
        .list_tensors(pb::ListTensorsRequest { model_id: GOOD.into(), with_checksums: false })
        .await
        .expect("ListTensors of the good model")
        .into_inner()
        .tensors;
    assert_eq!(tensors.len(), 4);
    assert!(tensors.iter().all(|t| t.device == "cpu"), "each tensor names its device: {tensors:?}");
    let unloaded = client
        .unload_model(pb::UnloadModelRequest { model_id: GOOD.into(), force: false })
        .await
        .expect("unload")
        .into_inner();
    assert!(unloaded.was_loaded);
    assert_eq!(tests::state_of(client, GOOD).await, pb::ModelState::Unloaded);
}

/// Nothing is resident or reserved on the CPU, already when asked (unlike
/// `tests::assert_nothing_resident`, which waits for a failed load's memory to come back).
async fn assert_nothing_resident(client: &mut Client) {
    let cpu = tests::cpu_resources(client).await;
    assert_eq!((cpu.used_bytes, cpu.reserved_bytes), (0, 0), "{cpu:?}");
    assert!(cpu.models.is_empty(), "{cpu:?}");
}

/// Every id the server tracks or lists.
async fn listed_ids(client: &mut Client) -> Vec<String> {
    let models = client.list_models(pb::ListModelsRequest::default()).await.expect("ListModels").into_inner().models;
    models.into_iter().map(|m| m.model_id).collect()
}

/// LoadModel of malformed ids (empty, `../x`, `/abs`, `a//b`, a control character, 200
/// characters, `a/b/c`) is INVALID_ARGUMENT, and none of them is tracked afterwards.
#[tokio::test]
async fn load_of_malformed_ids_is_invalid_argument() {
    let root = model_root();
    let (server, mut client) = tests::serve(root.path()).await;
    for id in malformed_ids() {
        let (messages, end) = tests::load_all(&mut client, tests::load(&id)).await;
        expect_code(end, Code::InvalidArgument, &format!("LoadModel {id:?}"));
        assert!(messages.is_empty(), "no step runs for {id:?}: {messages:?}");
    }
    assert_eq!(listed_ids(&mut client).await, vec![GOOD.to_owned()], "no malformed id is tracked");
    assert_healthy(&mut client).await;
    drop(client);
    server.stop().await;
}

/// GetModel, UnloadModel, CancelLoad, ListTensors and WatchModels refuse malformed ids with
/// INVALID_ARGUMENT too.
#[tokio::test]
async fn other_rpcs_refuse_malformed_ids() {
    let root = model_root();
    let (server, mut client) = tests::serve(root.path()).await;
    for id in ["../x", "a\u{1}b", "a/b/c"] {
        let model_id = id.to_owned();
        let what = |rpc: &str| format!("{rpc} {id:?}");
        expect_code(
            client.get_model(pb::GetModelRequest { model_id: model_id.clone() }).await,
            Code::InvalidArgument,
            &what("GetModel"),
        );
        expect_code(
            client.unload_model(pb::UnloadModelRequest { model_id: model_id.clone(), force: false }).await,
            Code::InvalidArgument,
            &what("UnloadModel"),
        );
        expect_code(
            client.cancel_load(pb::CancelLoadRequest { model_id: model_id.clone() }).await,
            Code::InvalidArgument,
            &what("CancelLoad"),
        );
        expect_code(
            client.list_tensors(pb::ListTensorsRequest { model_id: model_id.clone(), with_checksums: true }).await,
            Code::InvalidArgument,
            &what("ListTensors"),
        );
        expect_code(
            client.watch_models(pb::WatchModelsRequest { model_id }).await.map(|_| ()),
            Code::InvalidArgument,
            &what("WatchModels"),
        );
    }
    assert_eq!(listed_ids(&mut client).await, vec![GOOD.to_owned()], "no malformed id is tracked");
    assert_healthy(&mut client).await;
    drop(client);
    server.stop().await;
}

/// Sends each request for the good model and checks it is refused with `code`, a message naming
/// `word`, no progress message and no load begun (the model stays UNLOADED, nothing resident).
async fn assert_refused_before_loading(requests: Vec<pb::LoadModelRequest>, code: Code, word: &str) {
    let root = model_root();
    let (server, mut client) = tests::serve(root.path()).await;
    for request in requests {
        let what = format!("{request:?}");
        let (messages, end) = tests::load_all(&mut client, request).await;
        let status = expect_code(end, code, &what);
        assert!(status.message().contains(word), "the message names the {word}: {status:?}");
        assert!(messages.is_empty(), "{messages:?}");
        assert_eq!(tests::state_of(&mut client, GOOD).await, pb::ModelState::Unloaded, "no load began");
        assert_nothing_resident(&mut client).await;
    }
    assert_healthy(&mut client).await;
    drop(client);
    server.stop().await;
}

/// Malformed revisions are INVALID_ARGUMENT and start no load.
#[tokio::test]
async fn bad_revision_is_invalid_argument() {
    let long = "r".repeat(300);
    let requests = ["../main", "/main", "main/", "a b", "x//y", "main\n", long.as_str()]
        .map(|r| pb::LoadModelRequest { revision: Some(r.into()), ..tests::load(GOOD) });
    assert_refused_before_loading(requests.into(), Code::InvalidArgument, "revision").await;
}

/// Malformed device strings are INVALID_ARGUMENT and start no load.
#[tokio::test]
async fn bad_device_is_invalid_argument() {
    let requests = ["gpu", "tpu:0", "cuda:", "cuda:x", "cuda:-1", "cuda:1:2", "cpu0", " cpu"]
        .map(|d| pb::LoadModelRequest { device: Some(d.into()), ..tests::load(GOOD) });
    assert_refused_before_loading(requests.into(), Code::InvalidArgument, "device").await;
}

/// A device string of 16 KB is INVALID_ARGUMENT with a short message: echoing it whole made the
/// status's grpc-message exceed default clients' header limit (RESOURCE_EXHAUSTED at the client).
#[tokio::test]
async fn a_huge_device_is_invalid_argument_with_a_short_message() {
    let huge = "x".repeat(16 * 1024);
    let request = pb::LoadModelRequest { device: Some(huge.clone()), ..tests::load(GOOD) };
    assert_refused_before_loading(vec![request], Code::InvalidArgument, "device").await;
    let root = model_root();
    let (server, mut client) = tests::serve(root.path()).await;
    let (_, end) = tests::load_all(&mut client, pb::LoadModelRequest { device: Some(huge), ..tests::load(GOOD) }).await;
    let status = end.expect_err("refused");
    assert!(status.message().len() < 300, "{} bytes of message", status.message().len());
    server.stop().await;
}

/// Malformed or unsupported dtype strings are INVALID_ARGUMENT and start no load.
#[tokio::test]
async fn bad_dtype_is_invalid_argument() {
    let requests = ["int8", "f64", "float", "f 16", "bf", "q4_0"]
        .map(|d| pb::LoadModelRequest { dtype: Some(d.into()), ..tests::load(GOOD) });
    assert_refused_before_loading(requests.into(), Code::InvalidArgument, "dtype").await;
}

/// A CUDA device in a build without CUDA is FAILED_PRECONDITION, not a crash, and loads nothing.
#[tokio::test]
async fn cuda_without_cuda_is_failed_precondition() {
    let requests = ["cuda:0", "cuda"].map(|d| pb::LoadModelRequest { device: Some(d.into()), ..tests::load(GOOD) });
    assert_refused_before_loading(requests.into(), Code::FailedPrecondition, "cuda").await;
}

/// Several GPUs in a build without CUDA are FAILED_PRECONDITION too, however they are named.
#[tokio::test]
async fn several_gpus_without_cuda_are_failed_precondition() {
    let requests =
        ["cuda:0,cuda:1", "cuda:*"].map(|d| pb::LoadModelRequest { device: Some(d.into()), ..tests::load(GOOD) });
    assert_refused_before_loading(requests.into(), Code::FailedPrecondition, "cuda").await;
}

/// Malformed device lists, placements and device maps are INVALID_ARGUMENT and start no load; so
/// is a device map for a load onto one device.
#[tokio::test]
async fn bad_device_lists_placements_and_maps_are_invalid_argument() {
    let lists = ["cuda:0,", "cuda:0, cuda:1", "cuda:*,cuda:1", "cpu,cpu", "cpu,cuda:0"]
        .map(|d| pb::LoadModelRequest { device: Some(d.into()), ..tests::load(GOOD) });
    assert_refused_before_loading(lists.into(), Code::InvalidArgument, "device").await;
    let placement = pb::LoadModelRequest { placement: Some("mirror".into()), ..tests::load(GOOD) };
    assert_refused_before_loading(vec![placement], Code::InvalidArgument, "placement").await;
    let map = |entries: &[(&str, &str)], device: &str| pb::LoadModelRequest {
        device: Some(device.into()),
        device_map: entries.iter().map(|(p, d)| ((*p).to_owned(), (*d).to_owned())).collect(),
        ..tests::load(GOOD)
    };
    // Past the server's cap on entries, within its 64 KiB message limit.
    let too_many: Vec<(String, String)> = (0..4097).map(|i| (i.to_string(), "cpu".to_owned())).collect();
    let too_many: Vec<(&str, &str)> = too_many.iter().map(|(p, d)| (p.as_str(), d.as_str())).collect();
    let maps = vec![map(&[("lm_head", "gpu1")], "cpu"), map(&[("", "cpu")], "cpu"), map(&too_many, "cpu")];
    assert_refused_before_loading(maps, Code::InvalidArgument, "device").await;
}

/// Loading an unknown model is NOT_FOUND, after the steps it reached, and leaves it FAILED.
#[tokio::test]
async fn unknown_model_is_not_found() {
    let root = model_root();
    let (server, mut client) = tests::serve(root.path()).await;
    for id in ["nope", "org/nope"] {
        expect_code(
            client.get_model(pb::GetModelRequest { model_id: id.into() }).await,
            Code::NotFound,
            &format!("GetModel {id:?} before any load"),
        );
        let (messages, end) = tests::load_all(&mut client, tests::load(id)).await;
        let status = expect_code(end, Code::NotFound, &format!("LoadModel {id:?}"));
        assert!(status.message().contains(id), "the message names the model: {status:?}");
        // The load began (INIT) and stopped where it looked for the files (CACHE_CHECK).
        assert_eq!(messages.first().map(|m| m.step), Some(1), "{messages:?}");
        assert_eq!(messages.last().map(|m| m.step), Some(2), "{messages:?}");
        assert_failed_with(&mut client, id, &[id, "not found"]).await;
    }
    assert_nothing_resident(&mut client).await;
    assert_healthy(&mut client).await;
    drop(client);
    server.stop().await;
}

/// A model with only pickle weights (`pytorch_model.bin`) is FAILED_PRECONDITION; the file is
/// never opened.
#[tokio::test]
async fn pickle_only_model_is_failed_precondition() {
    let root = model_root();
    let dir = root.path().join("pickled");
    std::fs::create_dir_all(&dir).expect("mkdir");
    std::fs::write(dir.join("config.json"), r#"{"model_type": "test"}"#).expect("config");
    // Not a pickle at all: anything that tried to unpickle it would fail with another code.
    std::fs::write(dir.join("pytorch_model.bin"), b"\x00 this is not a pickle \xff\xfe").expect("bin");
    let (server, mut client) = tests::serve(root.path()).await;

    let (_, end) = tests::load_all(&mut client, tests::load("pickled")).await;
    let status = expect_code(end, Code::FailedPrecondition, "LoadModel of a pickle-only model");
    assert!(status.message().contains("pytorch_model.bin"), "the message names the file: {status:?}");
    assert!(status.message().contains("pickled"), "the message names the model: {status:?}");
    assert_failed_with(&mut client, "pickled", &["pytorch_model.bin", "pickle"]).await;
    assert_nothing_resident(&mut client).await;
    assert_healthy(&mut client).await;
    drop(client);
    server.stop().await;
}

// ---- corrupt safetensors ----------------------------------------------------------------------

/// A safetensors file from raw parts: the 8-byte little-endian header length, the header, the data.
fn raw_safetensors(header: &[u8], data: &[u8]) -> Vec<u8> {
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header);
    bytes.extend_from_slice(data);
    bytes
}

/// A safetensors file whose JSON header is `header`, as given (offsets are not checked here).
fn raw_with_json(header: &serde_json::Value, data: &[u8]) -> Vec<u8> {
    raw_safetensors(&serde_json::to_vec(header).expect("header JSON"), data)
}

/// The bytes of a valid safetensors file of the tensors the corrupt model should hold.
fn valid_bytes() -> Vec<u8> {
    let tmp = tempfile::tempdir().expect("tempdir");
    let path = tmp.path().join("model.safetensors");
    fixture::write_safetensors(&path, &fixture::f32_tensors("w", 3, 64)).expect("valid file");
    std::fs::read(&path).expect("read the valid file")
}

/// Writes `corrupt` as `bad/model.safetensors` and checks that loading it is DATA_LOSS naming the
/// file, that the model is FAILED with that reason and nothing of it is resident, that the server
/// is still healthy, and that once the file is repaired a new load succeeds.
async fn assert_data_loss(corrupt: Vec<u8>, reason: &str) {
    let root = model_root();
    let dir = root.path().join("bad");
    fixture::single_file_model(&dir, &fixture::f32_tensors("w", 3, 64)).expect("model");
    let file = dir.join("model.safetensors");
    std::fs::write(&file, corrupt).expect("write the corrupt file");
    let (server, mut client) = tests::serve(root.path()).await;

    let (messages, end) = tests::load_all(&mut client, tests::load("bad")).await;
    let status = expect_code(end, Code::DataLoss, &format!("LoadModel of a file with {reason}"));
    assert!(status.message().contains("model.safetensors"), "{reason}: the message names the file: {status:?}");
    assert!(status.message().contains("bad"), "{reason}: the message names the model: {status:?}");
    // Headers are validated while planning (BUILD_STRATEGIES), before any byte is read.
    assert_eq!(messages.last().map(|m| m.step), Some(3), "{reason}: {messages:?}");
    assert_failed_with(&mut client, "bad", &["model.safetensors", "corrupt"]).await;
    expect_code(
        client.list_tensors(pb::ListTensorsRequest { model_id: "bad".into(), with_checksums: false }).await,
        Code::FailedPrecondition,
        "ListTensors of a FAILED model",
    );
    assert_nothing_resident(&mut client).await;
    assert_healthy(&mut client).await;

    // Repaired, it loads: a failed load leaves nothing behind that blocks a retry.
    std::fs::write(&file, valid_bytes()).expect("repair the file");
    let (messages, end) = tests::load_all(&mut client, tests::load("bad")).await;
    end.expect("the repaired model loads");
    assert_eq!(messages.last().map(|m| m.step), Some(8), "{messages:?}");
    let model = client.get_model(pb::GetModelRequest { model_id: "bad".into() }).await.expect("GetModel").into_inner();
    assert_eq!(model.state(), pb::ModelState::Loaded, "{model:?}");
    assert!(model.error.is_empty(), "a successful retry clears the error: {model:?}");
    assert_eq!(model.weight_bytes, 3 * 64 * 4);
    drop(client);
    server.stop().await;
}

/// A truncated safetensors file (its last bytes cut off) is DATA_LOSS naming the file.
#[tokio::test]
async fn truncated_safetensors_is_data_loss() {
    let mut bytes = valid_bytes();
    bytes.truncate(bytes.len() - 5);
    assert_data_loss(bytes, "its last bytes cut off").await;
}

/// A header length larger than the file is DATA_LOSS naming the file.
#[tokio::test]
async fn header_length_beyond_the_file_is_data_loss() {
    let mut bytes = raw_with_json(&json!({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}), &[0; 16]);
    bytes[..8].copy_from_slice(&10_000u64.to_le_bytes());
    assert_data_loss(bytes, "a header length beyond the file").await;
}

/// A header that is not JSON is DATA_LOSS naming the file.
#[tokio::test]
async fn header_that_is_not_json_is_data_loss() {
    assert_data_loss(raw_safetensors(b"this is {not json at all", &[0; 16]), "a header that is not JSON").await;
}

/// Data offsets that end beyond the data are DATA_LOSS naming the file.
#[tokio::test]
async fn offsets_out_of_bounds_are_data_loss() {
    // Shapes and offsets agree and are contiguous; only the data is 8 bytes short of the last end.
    let header = json!({
        "a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
        "b": {"dtype": "F32", "shape": [4], "data_offsets": [16, 32]},
    });
    assert_data_loss(raw_with_json(&header, &[0; 24]), "offsets beyond the data").await;
}

/// Two tensors sharing bytes are DATA_LOSS naming the file.
#[tokio::test]
async fn overlapping_offsets_are_data_loss() {
    let header = json!({
        "a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
        "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]},
    });
    assert_data_loss(raw_with_json(&header, &[0; 24]), "overlapping offsets").await;
}

/// A tensor whose shape × dtype size differs from its byte length is DATA_LOSS naming the file.
#[tokio::test]
async fn shape_times_dtype_not_byte_length_is_data_loss() {
    let header = json!({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 16]}});
    assert_data_loss(raw_with_json(&header, &[0; 16]), "shape × dtype ≠ byte length").await;
}

/// A symlink in the model root to a model folder outside it is PERMISSION_DENIED; nothing loads.
#[tokio::test]
async fn symlink_out_of_the_model_root_is_refused() {
    let root = model_root();
    let outside = tempfile::tempdir().expect("tempdir outside the root");
    let target = outside.path().join("secret");
    fixture::single_file_model(&target, &fixture::f32_tensors("s", 2, 32)).expect("model outside the root");
    std::os::unix::fs::symlink(&target, root.path().join("escape")).expect("symlink");
    let (server, mut client) = tests::serve(root.path()).await;

    let (_, end) = tests::load_all(&mut client, tests::load("escape")).await;
    let status = expect_code(end, Code::PermissionDenied, "LoadModel through a symlink out of the root");
    assert!(status.message().contains("escape"), "the message names the model: {status:?}");
    let failed = assert_failed_with(&mut client, "escape", &["outside the model root"]).await;
    assert!(!failed.error.contains(&outside.path().display().to_string()), "no host path leaks: {failed:?}");
    expect_code(
        client.list_tensors(pb::ListTensorsRequest { model_id: "escape".into(), with_checksums: false }).await,
        Code::FailedPrecondition,
        "ListTensors of the refused model",
    );
    assert_nothing_resident(&mut client).await;
    assert_healthy(&mut client).await;
    drop(client);
    server.stop().await;
}

/// ListTensors of a model that is not loaded (never loaded, or unloaded) is FAILED_PRECONDITION.
#[tokio::test]
async fn list_tensors_of_a_model_not_loaded_is_failed_precondition() {
    let root = model_root();
    let (server, mut client) = tests::serve(root.path()).await;
    let request = || pb::ListTensorsRequest { model_id: GOOD.into(), with_checksums: true };
    let status =
        expect_code(client.list_tensors(request()).await, Code::FailedPrecondition, "ListTensors before any load");
    assert!(status.message().contains(GOOD), "the message names the model: {status:?}");
    assert!(status.message().contains("not loaded"), "{status:?}");

    // Loaded, then unloaded again: refused again.
    assert_healthy(&mut client).await;
    expect_code(client.list_tensors(request()).await, Code::FailedPrecondition, "ListTensors after an unload");
    drop(client);
    server.stop().await;
}

/// Makes a FIFO at `path` (a writer never comes: opening it for reading would block for ever).
fn mkfifo(path: &std::path::Path) {
    let made = std::process::Command::new("mkfifo").arg(path).status().expect("run mkfifo");
    assert!(made.success(), "mkfifo {}", path.display());
}

/// A model file that is not a regular file is FAILED_PRECONDITION naming what it is, at once:
/// a FIFO as the weights or as `config.json` (which used to hang the load at step 3 for ever,
/// holding a load slot, the unload and shutdown), a directory as either, a symlink loop. The
/// server stays healthy, with nothing held.
#[tokio::test]
async fn a_model_file_that_is_not_a_regular_file_is_failed_precondition() {
    let root = model_root();
    let weights = fixture::f32_tensors("w", 2, 32);
    let fifo_weights = root.path().join("fifo-weights");
    std::fs::create_dir(&fifo_weights).expect("folder");
    std::fs::write(fifo_weights.join("config.json"), "{}").expect("config");
    mkfifo(&fifo_weights.join("model.safetensors"));
    let fifo_config = root.path().join("fifo-config");
    fixture::single_file_model(&fifo_config, &weights).expect("model");
    std::fs::remove_file(fifo_config.join("config.json")).expect("remove the config");
    mkfifo(&fifo_config.join("config.json"));
    let dir_weights = root.path().join("dir-weights");
    fixture::single_file_model(&dir_weights, &weights).expect("model");
    std::fs::remove_file(dir_weights.join("model.safetensors")).expect("remove the weights");
    std::fs::create_dir(dir_weights.join("model.safetensors")).expect("a folder named like the weights");
    let dir_config = root.path().join("dir-config");
    fixture::single_file_model(&dir_config, &weights).expect("model");
    std::fs::remove_file(dir_config.join("config.json")).expect("remove the config");
    std::fs::create_dir(dir_config.join("config.json")).expect("a folder named like the config");
    let looped = root.path().join("symlink-loop");
    fixture::single_file_model(&looped, &weights).expect("model");
    std::fs::remove_file(looped.join("model.safetensors")).expect("remove the weights");
    std::os::unix::fs::symlink("other.safetensors", looped.join("model.safetensors")).expect("symlink");
    std::os::unix::fs::symlink("model.safetensors", looped.join("other.safetensors")).expect("symlink");
    let (server, mut client) = tests::serve(root.path()).await;

    // Two FIFO loads at once used to hold both load slots: every later load waited for ever.
    for (id, what) in [
        ("fifo-weights", "a FIFO"),
        ("fifo-config", "a FIFO"),
        ("fifo-weights", "a FIFO"),
        ("dir-weights", "a directory"),
        ("dir-config", "a directory"),
        ("symlink-loop", "a symlink loop"),
    ] {
        let (_, end) = tests::load_all(&mut client, tests::load(id)).await;
        let status = expect_code(end, Code::FailedPrecondition, &format!("LoadModel {id}"));
        assert!(status.message().contains(what) && status.message().contains(id), "{id}: {status:?}");
        assert_failed_with(&mut client, id, &[what, "not a regular file"]).await;
    }
    assert_nothing_resident(&mut client).await;
    assert_healthy(&mut client).await;
    drop(client);
    server.stop().await;
}

/// A LoadModel asking for another dtype or device than the model is resident as is refused
/// with FAILED_PRECONDITION naming what is resident, never answered OK with something else (it
/// used to be "already loaded", still F32); asking for what is resident, or for nothing, is OK.
/// Two concurrent loads asking for different dtypes: one loads, the other is refused, and what
/// is resident is what the one that loaded asked for.
#[tokio::test]
async fn a_load_asking_for_another_dtype_than_resident_is_failed_precondition() {
    let root = model_root();
    let (server, mut client) = tests::serve(root.path()).await;
    let with = |dtype: &str, device: Option<&str>| pb::LoadModelRequest {
        dtype: Some(dtype.into()),
        device: device.map(Into::into),
        ..tests::load(GOOD)
    };
    let (_, end) = tests::load_all(&mut client, with("f32", None)).await;
    end.expect("loads as F32");
    let (_, end) = tests::load_all(&mut client, with("bf16", None)).await;
    let status = expect_code(end, Code::FailedPrecondition, "LoadModel bf16 of a model resident as F32");
    for needle in [GOOD, "loaded on cpu as F32", "BF16", "unload it first"] {
        assert!(status.message().contains(needle), "{needle:?}: {status:?}");
    }
    assert_eq!(tests::get_model(&mut client, GOOD).await.dtype, "F32", "still resident as it was");
    for same in [with("f32", None), with("f32", Some("cpu")), tests::load(GOOD)] {
        let (messages, end) = tests::load_all(&mut client, same.clone()).await;
        end.unwrap_or_else(|s| panic!("{same:?}: {s:?}"));
        assert_eq!(messages.last().map(|m| m.detail.as_str()), Some("already loaded"), "{messages:?}");
    }
    client.unload_model(pb::UnloadModelRequest { model_id: GOOD.into(), force: false }).await.expect("unload");

    let mut other = server.client().await;
    let (a, b) =
        tokio::join!(tests::load_all(&mut client, with("f16", None)), tests::load_all(&mut other, with("bf16", None)));
    let (ok, refused, resident) = match (a.1, b.1) {
        (Ok(()), Err(refused)) => ("f16", refused, "F16"),
        (Err(refused), Ok(())) => ("bf16", refused, "BF16"),
        ends => panic!("one of two conflicting loads loads and the other is refused: {ends:?}"),
    };
    assert_eq!(refused.code(), Code::FailedPrecondition, "{ok} loaded; the other: {refused:?}");
    assert_eq!(tests::get_model(&mut client, GOOD).await.dtype, resident);
    client.unload_model(pb::UnloadModelRequest { model_id: GOOD.into(), force: false }).await.expect("unload");
    assert_healthy(&mut client).await;
    drop((client, other));
    server.stop().await;
}

/// A message whose field 1 is a varint: where the service expects `model_id` (a string), the
/// bytes do not decode.
#[derive(Clone, PartialEq, prost::Message)]
struct Undecodable {
    #[prost(uint64, tag = "1")]
    model_id: u64,
}

/// Requests whose bytes do not decode as the RPC's message are INVALID_ARGUMENT (tonic's codec
/// said INTERNAL, blaming the server), unary and streaming alike; the server stays healthy.
#[tokio::test]
async fn an_undecodable_request_is_invalid_argument() {
    use tonic::codegen::http::uri::PathAndQuery;
    let root = model_root();
    let (server, mut client) = tests::serve(root.path()).await;
    let channel = Channel::from_shared(format!("http://{}", server.addr)).expect("uri").connect_lazy();
    let mut grpc = tonic::client::Grpc::new(channel);
    let bad = || tonic::Request::new(Undecodable { model_id: 7 });
    grpc.ready().await.expect("ready");
    let unary = grpc
        .unary(
            bad(),
            PathAndQuery::from_static("/modelloader.v1.ModelLoader/GetModel"),
            proto::codec::RequestCodec::<Undecodable, pb::ModelStatus>::default(),
        )
        .await;
    let status = expect_code(unary, Code::InvalidArgument, "GetModel of undecodable bytes");
    assert!(status.message().contains("does not decode"), "{status:?}");
    grpc.ready().await.expect("ready");
    let streaming = grpc
        .server_streaming(
            bad(),
            PathAndQuery::from_static("/modelloader.v1.ModelLoader/LoadModel"),
            proto::codec::RequestCodec::<Undecodable, pb::ModelLoadProgress>::default(),
        )
        .await;
    let end = match streaming {
        Ok(mut stream) => stream.get_mut().message().await.map(|_| ()),
        Err(status) => Err(status),
    };
    expect_code(end, Code::InvalidArgument, "LoadModel of undecodable bytes");
    assert_healthy(&mut client).await;
    drop(client);
    server.stop().await;
}

/// Whether the reference implementation (Python's `safetensors`, `pip install safetensors`)
/// accepts each file: `safetensors.deserialize` of its bytes.
fn reference_accepts(files: &[std::path::PathBuf]) -> Vec<bool> {
    let script = "import sys, safetensors\n\
                  for path in sys.argv[1:]:\n\
                  \x20   try:\n\
                  \x20       safetensors.deserialize(open(path, 'rb').read()); print('ok')\n\
                  \x20   except Exception:\n\
                  \x20       print('refused')\n";
    let out = std::process::Command::new("python3").arg("-c").arg(script).args(files).output().expect("run python3");
    assert!(out.status.success(), "python3 safetensors: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("utf-8").lines().map(|l| l == "ok").collect()
}

/// `__metadata__` is validated as the reference validates it, and a test runs the reference on
/// the same files and agrees on each: strings to strings (or null) load; a number, a nested map,
/// an array, `__metadata__` given twice, or invalid UTF-8 inside a metadata string are
/// DATA_LOSS (all used to load).
#[tokio::test]
async fn metadata_is_validated_as_the_reference_does() {
    let tensor = r#""w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}"#;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("strings", format!(r#"{{"__metadata__":{{"format":"pt"}},{tensor}}}"#).into_bytes()),
        ("null", format!(r#"{{"__metadata__":null,{tensor}}}"#).into_bytes()),
        ("a number", format!(r#"{{"__metadata__":{{"a":1}},{tensor}}}"#).into_bytes()),
        ("a nested map", format!(r#"{{"__metadata__":{{"a":{{"b":"c"}}}},{tensor}}}"#).into_bytes()),
        ("an array", format!(r#"{{"__metadata__":["a"],{tensor}}}"#).into_bytes()),
        ("twice", format!(r#"{{"__metadata__":{{"a":"b"}},"__metadata__":{{"c":"d"}},{tensor}}}"#).into_bytes()),
        (
            "invalid UTF-8",
            [br#"{"__metadata__":{"a":""#.as_slice(), b"\xff\xfe", br#""},"#, tensor.as_bytes(), b"}"].concat(),
        ),
    ];
    let tmp = tempfile::tempdir().expect("tmp");
    let paths: Vec<_> = cases
        .iter()
        .map(|(name, header)| {
            let path = tmp.path().join(format!("{}.safetensors", name.replace(' ', "-")));
            std::fs::write(&path, raw_safetensors(header, &[0u8; 8])).expect("write");
            path
        })
        .collect();
    let reference = reference_accepts(&paths);
    assert_eq!(reference, [true, true, false, false, false, false, false], "the reference's verdicts");

    let root = model_root();
    for ((name, _), path) in cases.iter().zip(&paths) {
        let dir = root.path().join(name.replace(' ', "-"));
        std::fs::create_dir(&dir).expect("folder");
        std::fs::copy(path, dir.join("model.safetensors")).expect("copy");
    }
    let (server, mut client) = tests::serve(root.path()).await;
    for ((name, _), accepted) in cases.iter().zip(reference) {
        let id = name.replace(' ', "-");
        let (_, end) = tests::load_all(&mut client, tests::load(&id)).await;
        if accepted {
            end.unwrap_or_else(|s| panic!("metadata {name}: the reference accepts it, so do we: {s:?}"));
        } else {
            let status = expect_code(end, Code::DataLoss, &format!("metadata {name}"));
            assert!(status.message().contains("model.safetensors"), "{status:?}");
        }
    }
    assert_healthy(&mut client).await;
    drop(client);
    server.stop().await;
}

/// BOOL tensors keep their name (ListTensors says BOOL, not U8) and must hold only 0 and 1:
/// bytes `07 02 ff 00` are DATA_LOSS naming the tensor (they used to load, listed as U8).
#[tokio::test]
async fn bool_tensors_are_listed_as_bool_and_hold_only_zero_and_one() {
    let header = serde_json::json!({ "mask": { "dtype": "BOOL", "shape": [4], "data_offsets": [0, 4] } });
    let root = model_root();
    for (id, data) in [("bools", [1u8, 0, 0, 1]), ("not-bools", [7, 2, 0xff, 0])] {
        std::fs::create_dir(root.path().join(id)).expect("folder");
        std::fs::write(root.path().join(id).join("model.safetensors"), raw_with_json(&header, &data)).expect("write");
    }
    let (server, mut client) = tests::serve(root.path()).await;
    let (_, end) = tests::load_all(&mut client, tests::load("bools")).await;
    end.expect("a BOOL tensor of 0s and 1s loads");
    let tensors = client
        .list_tensors(pb::ListTensorsRequest { model_id: "bools".into(), with_checksums: true })
        .await
        .expect("ListTensors")
        .into_inner()
        .tensors;
    assert_eq!(tensors.len(), 1);
    assert_eq!((tensors[0].dtype.as_str(), tensors[0].shape.as_slice()), ("BOOL", [4u64].as_slice()));
    assert_eq!(tests::get_model(&mut client, "bools").await.dtype, "BOOL");

    let (_, end) = tests::load_all(&mut client, tests::load("not-bools")).await;
    let status = expect_code(end, Code::DataLoss, "a BOOL tensor holding 7");
    for needle in ["model.safetensors", "mask", "0x07"] {
        assert!(status.message().contains(needle), "{needle}: {status:?}");
    }
    assert_failed_with(&mut client, "not-bools", &["a bool is 0 or 1"]).await;
    client.unload_model(pb::UnloadModelRequest { model_id: "bools".into(), force: false }).await.expect("unload");
    tests::assert_nothing_resident(&mut client).await;
    drop(client);
    server.stop().await;
}

/// Every model ListModels gives, page by page (`page_size` as given), and the pages' sizes.
async fn list_all_pages(client: &mut Client, page_size: u32) -> (Vec<pb::ModelStatus>, Vec<usize>) {
    let (mut all, mut pages, mut token) = (Vec::new(), Vec::new(), String::new());
    loop {
        let page = client
            .list_models(pb::ListModelsRequest { page_size, page_token: token })
            .await
            .expect("ListModels")
            .into_inner();
        pages.push(page.models.len());
        all.extend(page.models);
        if page.next_page_token.is_empty() {
            return (all, pages);
        }
        token = page.next_page_token;
        assert!(pages.len() < 1000, "ListModels pages end");
    }
}

/// LoadModel of 2,000 distinct unknown ids (each NOT_FOUND) does not grow what the server
/// tracks for ever: past the bound (1,024 models at rest) the oldest are forgotten, while the
/// model root's models stay listed. ListModels comes in pages (100 by default, `page_size` up to
/// 1,000), in id order without gaps or repeats, so it never outgrows a client's message limit
/// (it used to list every id ever asked for, in one message).
#[tokio::test]
async fn unknown_ids_are_forgotten_and_list_models_pages() {
    let root = model_root();
    let (server, mut client) = tests::serve(root.path()).await;
    for i in 0..2000 {
        let (_, end) = tests::load_all(&mut client, tests::load(&format!("org/unknown-{i:04}"))).await;
        expect_code(end, Code::NotFound, "an unknown id");
    }
    let (all, pages) = list_all_pages(&mut client, 0).await;
    assert!(pages.iter().all(|&n| n <= 100), "default pages of at most 100: {pages:?}");
    let ids: Vec<&str> = all.iter().map(|m| m.model_id.as_str()).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "sorted, no repeats across pages");
    assert!(ids.contains(&GOOD), "the model root's model is listed");
    assert!(all.len() <= 1025, "at most 1,024 at rest plus the model root: {}", all.len());
    assert!(!ids.contains(&"org/unknown-0000") && ids.contains(&"org/unknown-1999"), "the oldest went first");
    let (big, big_pages) = list_all_pages(&mut client, 5000).await;
    assert_eq!(big.len(), all.len());
    assert!(big_pages[0] == 1000 || big_pages.len() == 1, "pages are capped at 1,000: {big_pages:?}");
    expect_code(
        client.list_models(pb::ListModelsRequest { page_size: 0, page_token: "../x".into() }).await,
        Code::InvalidArgument,
        "a page token that is no model id",
    );
    assert_healthy(&mut client).await;
    drop(client);
    server.stop().await;
}

/// Past the server's limits a model is refused with RESOURCE_EXHAUSTED naming the limit, before
/// its metadata takes memory the budget does not count: a header of 300,000 zero-size tensors
/// (over 250,000 a model; it used to cost ~350 bytes of memory each, counted as nothing) and a
/// 17 MiB `config.json` (over 16 MiB; every config used to be kept whole with the model).
#[tokio::test]
async fn headers_and_configs_past_the_limits_are_resource_exhausted() {
    let root = model_root();
    let many = root.path().join("many-tensors");
    std::fs::create_dir(&many).expect("folder");
    let mut header = serde_json::Map::new();
    for i in 0..300_000 {
        header.insert(format!("t{i}"), json!({ "dtype": "F32", "shape": [0], "data_offsets": [0, 0] }));
    }
    header.insert("w".into(), json!({ "dtype": "F32", "shape": [1], "data_offsets": [0, 4] }));
    std::fs::write(many.join("model.safetensors"), raw_with_json(&header.into(), &[0; 4])).expect("write");
    let big_config = root.path().join("big-config");
    fixture::single_file_model(&big_config, &fixture::f32_tensors("w", 2, 32)).expect("model");
    let padding = "x".repeat(17 << 20);
    std::fs::write(big_config.join("config.json"), format!(r#"{{"sample_size": 8, "pad": "{padding}"}}"#))
        .expect("config");
    let (server, mut client) = tests::serve(root.path()).await;

    for (id, needles) in [
        ("many-tensors", ["model.safetensors", "limit of 250000 tensors"]),
        ("big-config", ["config.json", "16777216-byte limit"]),
    ] {
        let (_, end) = tests::load_all(&mut client, tests::load(id)).await;
        let status = expect_code(end, Code::ResourceExhausted, id);
        for needle in needles {
            assert!(status.message().contains(needle), "{id}: {needle}: {status:?}");
        }
    }
    assert_nothing_resident(&mut client).await;
    assert_healthy(&mut client).await;
    drop(client);
    server.stop().await;
}

/// A request over 64 KiB (every real one is an id and a few options) is refused before it is
/// decoded (tonic says OUT_OF_RANGE), and the server stays healthy.
#[tokio::test]
async fn a_request_over_64_kib_is_refused_before_decoding() {
    let root = model_root();
    let (server, mut client) = tests::serve(root.path()).await;
    let huge = "a".repeat(100 * 1024);
    let (_, end) = tests::load_all(&mut client, tests::load(&huge)).await;
    let status = expect_code(end, Code::OutOfRange, "a 100 KiB LoadModel");
    assert!(status.message().contains("too large"), "{status:?}");
    assert_healthy(&mut client).await;
    drop(client);
    server.stop().await;
}
