//! Refusals that end a load and must keep ending it the same way: bad JSON side files
//! (`config.json`, `model.safetensors.index.json`, `model_index.json`) and an oversized
//! safetensors header are DATA_LOSS, single files symlinked out of the model root or the HF cache
//! are PERMISSION_DENIED, a token repo without its token is UNAUTHENTICATED; each leaves the model
//! FAILED with a reason, nothing resident and the server healthy. And ListModels shows the models
//! the server tracks from the HF cache and the hub next to the model root's.

use std::{
    io::Write,
    path::{Path, PathBuf},
    time::Duration,
};

use proto::v1::{self as pb, model_loader_client::ModelLoaderClient};
use tempfile::TempDir;
use tests::{
    TestServer, assert_failed_with, assert_nothing_resident, checksums, config, expect_code, fixture, get_model,
    hub::{Access, HubRepo, TestHub},
    load, load_all, load_ok, state_of,
};
use tonic::{Code, Status, transport::Channel};
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};

type Client = ModelLoaderClient<Channel>;

/// The model every model root of this file holds, to show the server still loads after a refusal.
const GOOD: &str = "good";

/// The largest safetensors header the loader reads: `MAX_HEADER_BYTES` of
/// crates/loader-service/src/plan.rs (100 MiB, the format's own limit), written out here because
/// the tests crate does not depend on loader-service.
const MAX_HEADER_BYTES: u64 = 100 * 1024 * 1024;

/// A model root holding the good model; the test adds what it needs.
fn model_root() -> TempDir {
    let root = tempfile::tempdir().expect("tempdir");
    fixture::single_file_model(&root.path().join(GOOD), &fixture::f32_tensors("layer", 4, 256)).expect("good model");
    root
}

async fn list_models(client: &mut Client) -> Vec<pb::ModelStatus> {
    tokio::time::timeout(tests::WAIT, client.list_models(pb::ListModelsRequest::default()))
        .await
        .expect("ListModels answers")
        .expect("ListModels")
        .into_inner()
        .models
}

async fn unload(client: &mut Client, id: &str) -> pb::UnloadModelResponse {
    tokio::time::timeout(tests::WAIT, client.unload_model(pb::UnloadModelRequest { model_id: id.into(), force: false }))
        .await
        .expect("UnloadModel answers")
        .expect("UnloadModel")
        .into_inner()
}

/// Both health services are SERVING.
async fn assert_serving(client_addr: std::net::SocketAddr) {
    let channel =
        Channel::from_shared(format!("http://{client_addr}")).expect("uri").timeout(tests::WAIT).connect_lazy();
    let mut health = HealthClient::new(channel);
    for service in ["", "modelloader.v1.ModelLoader"] {
        let reply = tokio::time::timeout(tests::WAIT, health.check(HealthCheckRequest { service: service.into() }))
            .await
            .expect("Health/Check answers")
            .unwrap_or_else(|e| panic!("Health/Check {service:?}: {e:?}"))
            .into_inner();
        assert_eq!(reply.status(), ServingStatus::Serving, "health of {service:?}");
    }
}

/// The server still answers and still loads: both health services SERVING, the good model loads
/// to LOADED with its 4 tensors, and unloads again.
async fn assert_healthy(server: &TestServer, client: &mut Client) {
    assert_serving(server.addr).await;
    load_ok(client, load(GOOD)).await;
    assert_eq!(state_of(client, GOOD).await, pb::ModelState::Loaded);
    assert_eq!(checksums(client, GOOD).await.len(), 4);
    let unloaded = unload(client, GOOD).await;
    assert!(unloaded.was_loaded);
    assert_eq!(state_of(client, GOOD).await, pb::ModelState::Unloaded);
}

/// Runs a load of `id` that must be refused with `code` before a weight byte is read: the stream
/// fails with `code` and a message naming the model and each of `names`, after at most step 3.
async fn refused(client: &mut Client, id: &str, code: Code, names: &[&str]) -> (Vec<pb::ModelLoadProgress>, Status) {
    let (messages, end) = load_all(client, load(id)).await;
    let status = expect_code(end, code, &format!("LoadModel {id}"));
    assert!(status.message().contains(id), "{id}: the message names the model: {status:?}");
    for name in names {
        assert!(status.message().contains(name), "{id}: the message names {name:?}: {status:?}");
    }
    assert!(messages.iter().all(|m| m.step <= 3), "{id}: no step reads weights: {messages:?}");
    (messages, status)
}

/// Writes `text` to `path`, replacing the file.
fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
}

/// `path` becomes a symlink to `target` (whatever was there is removed).
fn symlink(target: impl AsRef<Path>, path: &Path) {
    let _ = std::fs::remove_file(path);
    std::os::unix::fs::symlink(target.as_ref(), path)
        .unwrap_or_else(|e| panic!("symlink {} -> {}: {e}", path.display(), target.as_ref().display()));
}

// ---- ListModels -------------------------------------------------------------------------------

/// ListModels shows tracked models from the hub and the HF cache next to the model root's.
///
/// Outside the model root: a model downloaded from the hub, LOADED with source HUB and its commit;
/// a token repo, FAILED with its error; after an unload the hub model stays listed, UNLOADED; on a
/// fresh offline server the same model loaded from the HF cache, LOADED with source CACHE. They
/// come next to the model root's models (UNLOADED until loaded), sorted by id, each entry equal to
/// GetModel of it; a model only in the cache and never loaded is not listed.
#[tokio::test]
async fn list_models_shows_tracked_models_outside_the_model_root() {
    let tmp = tempfile::tempdir().expect("tmp");
    let root = tmp.path().join("models");
    fixture::single_file_model(&root.join("alpha"), &fixture::f32_tensors("a", 2, 128)).expect("alpha");
    fixture::single_file_model(&root.join("org/beta"), &fixture::f32_tensors("b", 2, 128)).expect("beta");
    let expected =
        fixture::single_file_model(&tmp.path().join("remote"), &fixture::f32_tensors("r", 3, 1024)).expect("remote");
    let remote = HubRepo::from_dir("org/remote", &tmp.path().join("remote")).expect("repo");
    let private = HubRepo::from_dir("org/private", &tmp.path().join("remote"))
        .expect("repo")
        .with_access(Access::Token("hf_list_models_token".into()));
    let commit = remote.commit().to_owned();
    let hub = TestHub::start([remote, private]).await;
    let cache = tmp.path().join("cache");
    let mut cfg = config(&root);
    cfg.manager.loader.sources.offline = false;
    cfg.manager.loader.sources.hf_cache = Some(cache.clone());
    cfg.manager.loader.sources.hub.endpoint = Some(hub.url().to_owned());
    let server = TestServer::start(cfg).await;
    let mut client = server.client().await;

    let ids = |models: &[pb::ModelStatus]| models.iter().map(|m| m.model_id.clone()).collect::<Vec<_>>();
    let listed = list_models(&mut client).await;
    assert_eq!(ids(&listed), ["alpha", "org/beta"], "before any load: the model root's models");
    assert!(listed.iter().all(|m| m.state() == pb::ModelState::Unloaded), "{listed:?}");

    load_ok(&mut client, load("org/remote")).await;
    let (_, end) = load_all(&mut client, load("org/private")).await;
    expect_code(end, Code::Unauthenticated, "the token repo without a token");
    load_ok(&mut client, load("alpha")).await;

    let listed = list_models(&mut client).await;
    assert_eq!(ids(&listed), ["alpha", "org/beta", "org/private", "org/remote"], "sorted by id: {listed:?}");
    for entry in &listed {
        assert_eq!(entry, &get_model(&mut client, &entry.model_id).await, "ListModels agrees with GetModel");
    }
    let by_id = |id: &str| listed.iter().find(|m| m.model_id == id).expect("listed").clone();
    let alpha = by_id("alpha");
    assert_eq!((alpha.state(), alpha.source()), (pb::ModelState::Loaded, pb::ModelSource::Local), "{alpha:?}");
    assert_eq!(by_id("org/beta").state(), pb::ModelState::Unloaded);
    let failed = by_id("org/private");
    assert_eq!(failed.state(), pb::ModelState::Failed, "{failed:?}");
    assert!(failed.error.contains("org/private"), "the listed FAILED model carries its error: {failed:?}");
    assert_eq!(failed.weight_bytes, 0, "{failed:?}");
    let from_hub = by_id("org/remote");
    assert_eq!((from_hub.state(), from_hub.source()), (pb::ModelState::Loaded, pb::ModelSource::Hub), "{from_hub:?}");
    assert_eq!(from_hub.revision, commit, "{from_hub:?}");
    assert_eq!(from_hub.weight_bytes, expected.bytes(), "{from_hub:?}");
    assert!(from_hub.error.is_empty(), "{from_hub:?}");

    // Unloaded, a tracked model stays listed.
    assert!(unload(&mut client, "org/remote").await.was_loaded);
    let listed = list_models(&mut client).await;
    assert_eq!(ids(&listed), ["alpha", "org/beta", "org/private", "org/remote"], "{listed:?}");
    let from_hub = listed.iter().find(|m| m.model_id == "org/remote").expect("listed");
    assert_eq!(from_hub.state(), pb::ModelState::Unloaded, "{from_hub:?}");
    drop(client);
    server.stop().await;

    // A fresh server, offline on the same cache: a model only in the cache is not listed until it
    // is tracked; loaded from the cache, it is listed with source CACHE and the commit.
    let mut cfg = config(&root);
    cfg.manager.loader.sources.hf_cache = Some(cache);
    let server = TestServer::start(cfg).await;
    let mut client = server.client().await;
    assert_eq!(ids(&list_models(&mut client).await), ["alpha", "org/beta"], "untracked cache models are not listed");
    let requests_before = hub.requests().len();
    load_ok(&mut client, load("org/remote")).await;
    assert_eq!(hub.requests().len(), requests_before, "offline, the hub is never asked");
    let listed = list_models(&mut client).await;
    assert_eq!(ids(&listed), ["alpha", "org/beta", "org/remote"], "{listed:?}");
    let cached = listed.iter().find(|m| m.model_id == "org/remote").expect("listed").clone();
    assert_eq!((cached.state(), cached.source()), (pb::ModelState::Loaded, pb::ModelSource::Cache), "{cached:?}");
    assert_eq!((cached.revision.as_str(), cached.weight_bytes), (commit.as_str(), expected.bytes()), "{cached:?}");
    assert_eq!(cached, get_model(&mut client, "org/remote").await);
    assert!(listed.iter().filter(|m| m.model_id != "org/remote").all(|m| m.state() == pb::ModelState::Unloaded));
    assert_eq!(checksums(&mut client, "org/remote").await, expected.tensors);
    drop(client);
    server.stop().await;
}

// ---- bad JSON side files ----------------------------------------------------------------------

/// A broken JSON side file: the model it is in, the file as messages name it, and a word of the
/// reason.
#[derive(Debug, Clone, Copy)]
struct SideFile {
    id: &'static str,
    file: &'static str,
    reason: &'static str,
}

/// Writes the models of [`bad_side_files_are_data_loss`] into `root`.
fn write_bad_side_files(root: &Path) -> Vec<SideFile> {
    let tensors = || fixture::f32_tensors("w", 4, 64);
    let mut cases = Vec::new();

    let dir = root.join("bad-config");
    fixture::single_file_model(&dir, &tensors()).expect("model");
    write(&dir.join("config.json"), "{\"model_type\": \"test\", ");
    cases.push(SideFile { id: "bad-config", file: "config.json", reason: "not valid JSON" });

    let dir = root.join("empty-config");
    fixture::single_file_model(&dir, &tensors()).expect("model");
    write(&dir.join("config.json"), "");
    cases.push(SideFile { id: "empty-config", file: "config.json", reason: "not valid JSON" });

    let dir = root.join("bad-index");
    fixture::sharded_model(&dir, &tensors(), 2).expect("model");
    write(&dir.join("model.safetensors.index.json"), "{\"weight_map\": {\"w.0.weight\": ");
    cases.push(SideFile { id: "bad-index", file: "model.safetensors.index.json", reason: "not valid JSON" });

    let dir = root.join("index-without-map");
    fixture::sharded_model(&dir, &tensors(), 2).expect("model");
    write(&dir.join("model.safetensors.index.json"), "{\"metadata\": {\"total_size\": 1024}}");
    cases.push(SideFile { id: "index-without-map", file: "model.safetensors.index.json", reason: "weight_map" });

    // A shard name that leads out of the folder (to the good model) is refused, never opened.
    let dir = root.join("index-escaping-shard");
    fixture::sharded_model(&dir, &tensors(), 2).expect("model");
    write(
        &dir.join("model.safetensors.index.json"),
        r#"{"weight_map": {"layer.0.weight": "../good/model.safetensors"}}"#,
    );
    cases.push(SideFile { id: "index-escaping-shard", file: "model.safetensors.index.json", reason: "shard name" });

    let dir = root.join("bad-pipeline");
    fixture::demo_tiny_sd(&dir).expect("pipeline");
    write(&dir.join("model_index.json"), "{\"_class_name\": \"StableDiffusionPipeline\", \"unet\": [");
    cases.push(SideFile { id: "bad-pipeline", file: "model_index.json", reason: "not valid JSON" });

    let dir = root.join("pipeline-not-an-object");
    fixture::demo_tiny_sd(&dir).expect("pipeline");
    write(&dir.join("model_index.json"), r#"[["diffusers", "UNet2DConditionModel"]]"#);
    cases.push(SideFile { id: "pipeline-not-an-object", file: "model_index.json", reason: "not a JSON object" });

    let dir = root.join("bad-unet-config");
    fixture::demo_tiny_sd(&dir).expect("pipeline");
    write(&dir.join("unet/config.json"), "{\"sample_size\": 32,,}");
    cases.push(SideFile { id: "bad-unet-config", file: "unet/config.json", reason: "not valid JSON" });
    cases
}

/// Bad config.json, model.safetensors.index.json and model_index.json files are DATA_LOSS.
///
/// A bad `config.json` (broken or empty), a bad `model.safetensors.index.json` (broken, without
/// `weight_map`, or mapping a tensor to a shard outside the folder) and a bad `model_index.json`
/// (broken, or not an object) or pipeline component config each fail the load with DATA_LOSS
/// naming the model and the file, at step 3 before anything is reserved; the model is FAILED with
/// that reason, nothing is resident or was ever reserved (peak 0), and the server stays healthy.
#[tokio::test]
async fn bad_side_files_are_data_loss() {
    let root = model_root();
    let cases = write_bad_side_files(root.path());
    let (server, mut client) = tests::serve(root.path()).await;

    for &SideFile { id, file, reason } in &cases {
        let (messages, status) = refused(&mut client, id, Code::DataLoss, &[file, reason]).await;
        assert_eq!(messages.last().map(|m| m.step), Some(3), "{id}: refused while planning: {messages:?}");
        assert!(!status.message().contains(&root.path().display().to_string()), "{id}: no host path: {status:?}");
        assert_failed_with(&mut client, id, &[id, file, reason]).await;
        expect_code(
            client.list_tensors(pb::ListTensorsRequest { model_id: id.into(), with_checksums: false }).await,
            Code::FailedPrecondition,
            &format!("ListTensors of {id}"),
        );
        let cpu = assert_nothing_resident(&mut client).await;
        assert_eq!(cpu.peak_bytes, 0, "{id}: nothing was ever reserved: {cpu:?}");
    }
    assert_healthy(&server, &mut client).await;
    // Every refused model is still FAILED, not forgotten nor half-loaded.
    for &SideFile { id, .. } in &cases {
        assert_eq!(state_of(&mut client, id).await, pb::ModelState::Failed, "{id}");
    }
    drop(client);
    server.stop().await;
}

// ---- the header size limit --------------------------------------------------------------------

/// Writes `dir/model.safetensors` (and a config) as a sparse file of `file_len` bytes whose first
/// 8 bytes claim a header of `header_len` bytes; the rest reads as zeros and takes no disk.
fn sparse_safetensors(dir: &Path, header_len: u64, file_len: u64) -> PathBuf {
    std::fs::create_dir_all(dir).expect("mkdir");
    write(&dir.join("config.json"), r#"{"model_type": "test"}"#);
    let path = dir.join("model.safetensors");
    let mut file = std::fs::File::create(&path).expect("create");
    file.write_all(&header_len.to_le_bytes()).expect("header length");
    file.set_len(file_len).expect("set_len");
    path
}

/// A safetensors header over the 100 MiB limit is DATA_LOSS, refused before anything is read.
///
/// A header longer than the limit (in a file long enough to hold it, so only the limit refuses
/// it), and one claiming u64::MAX bytes, are DATA_LOSS naming the model, the file and the limit,
/// refused at step 3 before the header or any weight byte is read: no step-4 message, nothing ever
/// reserved (peak 0), and this process read less than the header (`rchar`, which also counts the
/// tests running beside it).
#[tokio::test]
async fn header_over_the_size_limit_is_data_loss_before_reading() {
    let root = model_root();
    let over = MAX_HEADER_BYTES + 1;
    let huge = sparse_safetensors(&root.path().join("huge-header"), over, 8 + over + (64 << 20));
    assert!(std::fs::metadata(&huge).expect("stat").len() > 8 + over, "the file could hold the header");
    sparse_safetensors(&root.path().join("endless-header"), u64::MAX, 4096);
    let (server, mut client) = tests::serve(root.path()).await;

    for (id, claimed) in [("huge-header", over), ("endless-header", u64::MAX)] {
        let read_before = tests::rchar();
        let (messages, status) =
            refused(&mut client, id, Code::DataLoss, &["model.safetensors", &claimed.to_string(), "limit"]).await;
        let read = tests::rchar() - read_before;
        eprintln!("{id}: bytes this process read while the load was refused: {read}");
        // `rchar` counts the whole test process: the tests running beside this one have read
        // 52 MB in this window on a busy 2-core machine. Reading the header would be more than
        // MAX_HEADER_BYTES by itself.
        assert!(read < MAX_HEADER_BYTES, "{id}: the header is never read: {read} bytes read");
        assert_eq!(messages.last().map(|m| m.step), Some(3), "{id}: {messages:?}");
        assert!(status.message().contains(&MAX_HEADER_BYTES.to_string()), "{id}: names the limit: {status:?}");
        assert_failed_with(&mut client, id, &["model.safetensors", "corrupt", "limit"]).await;
        let cpu = assert_nothing_resident(&mut client).await;
        assert_eq!(cpu.peak_bytes, 0, "{id}: nothing was ever reserved: {cpu:?}");
    }
    assert_healthy(&server, &mut client).await;
    drop(client);
    server.stop().await;
}

// ---- symlinks out of the model root and the HF cache ------------------------------------------

/// Asserts the load of `id` is PERMISSION_DENIED naming the model (and `file`, when given), that
/// the model is FAILED saying it leads outside, and that no path of `outside` leaks.
async fn assert_escape_refused(client: &mut Client, id: &str, file: Option<&str>, outside: &Path) {
    let names: Vec<&str> = file.into_iter().collect();
    let (_, status) = refused(client, id, Code::PermissionDenied, &names).await;
    let outside = outside.display().to_string();
    assert!(!status.message().contains(&outside), "{id}: no host path leaks: {status:?}");
    let mut needles = vec![id, "outside the model root"];
    needles.extend(file);
    let failed = assert_failed_with(client, id, &needles).await;
    assert!(!failed.error.contains(&outside), "{id}: no host path leaks: {failed:?}");
}

/// A file symlinked out of the model root is PERMISSION_DENIED; a link inside it is followed.
///
/// In a model folder inside the model root, a `model.safetensors` symlinked to a valid file outside
/// the root, and a `config.json` symlinked out next to in-root weights, are PERMISSION_DENIED
/// naming the model and the file, the model FAILED, nothing resident; a weight file symlinked to
/// another place inside the root loads, so the check follows links rather than refusing them.
#[tokio::test]
async fn file_symlinked_out_of_the_model_root_is_permission_denied() {
    let root = model_root();
    let outside = tempfile::tempdir().expect("tempdir outside the root");
    let secret = outside.path().join("secret");
    fixture::single_file_model(&secret, &fixture::f32_tensors("s", 2, 32)).expect("model outside the root");

    let leak = root.path().join("leak");
    fixture::single_file_model(&leak, &fixture::f32_tensors("l", 2, 32)).expect("model");
    symlink(secret.join("model.safetensors"), &leak.join("model.safetensors"));
    let leak_config = root.path().join("leak-config");
    fixture::single_file_model(&leak_config, &fixture::f32_tensors("c", 2, 32)).expect("model");
    symlink(secret.join("config.json"), &leak_config.join("config.json"));
    // Inside the root: weights kept in a folder that is no model, linked relatively.
    let linked = root.path().join("linked");
    let expected = fixture::single_file_model(&linked, &fixture::f32_tensors("k", 2, 32)).expect("model");
    std::fs::create_dir_all(root.path().join("store")).expect("mkdir");
    std::fs::rename(linked.join("model.safetensors"), root.path().join("store/blob-1")).expect("move");
    symlink("../store/blob-1", &linked.join("model.safetensors"));
    let (server, mut client) = tests::serve(root.path()).await;

    assert_escape_refused(&mut client, "leak", Some("model.safetensors"), outside.path()).await;
    assert_escape_refused(&mut client, "leak-config", Some("config.json"), outside.path()).await;
    let cpu = assert_nothing_resident(&mut client).await;
    assert_eq!(cpu.peak_bytes, 0, "nothing was ever reserved: {cpu:?}");

    load_ok(&mut client, load("linked")).await;
    assert_eq!(checksums(&mut client, "linked").await, expected.tensors, "a link inside the root is followed");
    assert!(unload(&mut client, "linked").await.was_loaded);
    assert_healthy(&server, &mut client).await;
    drop(client);
    server.stop().await;
}

/// Lays out `models--{org}--{name}` in `cache` as huggingface_hub does: `refs/main` = `commit`,
/// each file a blob under `blobs/` and a relative symlink `snapshots/<commit>/<file>` to it.
/// Returns the snapshot folder.
fn cache_repo(cache: &Path, id: &str, commit: &str, model: &Path) -> PathBuf {
    let repo = cache.join(format!("models--{}", id.replace('/', "--")));
    let snapshot = repo.join("snapshots").join(commit);
    for dir in [repo.join("blobs"), repo.join("refs"), snapshot.clone()] {
        std::fs::create_dir_all(dir).expect("mkdir");
    }
    write(&repo.join("refs/main"), commit);
    for file in ["config.json", "model.safetensors"] {
        let bytes = std::fs::read(model.join(file)).expect("read the model file");
        let blob = tests::hub::sha256_hex(&bytes);
        std::fs::write(repo.join("blobs").join(&blob), bytes).expect("blob");
        symlink(format!("../../blobs/{blob}"), &snapshot.join(file));
    }
    snapshot
}

/// A snapshot file or folder symlinked out of the HF cache is PERMISSION_DENIED.
///
/// In an HF cache laid out by hand (offline), a snapshot file symlinked to a blob outside the
/// cache, a snapshot file whose blob inside the cache is itself a symlink out of it, and a
/// snapshot folder symlinked out of the cache are each PERMISSION_DENIED naming the model, the
/// model FAILED, nothing resident; a well-formed repo of the same cache loads (source CACHE).
#[tokio::test]
async fn snapshot_symlinked_out_of_the_hf_cache_is_permission_denied() {
    let tmp = tempfile::tempdir().expect("tmp");
    let cache = tmp.path().join("hub");
    let outside = tmp.path().join("outside");
    let model = outside.join("model");
    let expected = fixture::single_file_model(&model, &fixture::f32_tensors("w", 3, 64)).expect("model");
    let commit = "89abcdef0123456789abcdef0123456789abcdef";

    cache_repo(&cache, "org/good", commit, &model);
    // The snapshot file points straight at a blob outside the cache.
    let snapshot = cache_repo(&cache, "org/escape", commit, &model);
    symlink(model.join("model.safetensors"), &snapshot.join("model.safetensors"));
    // The snapshot file points at a blob in the cache, which is itself a link outside.
    let snapshot = cache_repo(&cache, "org/escape-blob", commit, &model);
    let blob = std::fs::read_link(snapshot.join("model.safetensors")).expect("readlink");
    symlink(model.join("model.safetensors"), &snapshot.join(&blob));
    // The snapshot folder itself is a link outside.
    let snapshot = cache_repo(&cache, "org/escape-snapshot", commit, &model);
    std::fs::remove_dir_all(&snapshot).expect("rm snapshot");
    symlink(&model, &snapshot);

    let mut cfg = config(&tmp.path().join("models"));
    cfg.manager.loader.sources.hf_cache = Some(cache.clone());
    let server = TestServer::start(cfg).await;
    let mut client = server.client().await;

    assert_escape_refused(&mut client, "org/escape", Some("model.safetensors"), &outside).await;
    assert_escape_refused(&mut client, "org/escape-blob", Some("model.safetensors"), &outside).await;
    assert_escape_refused(&mut client, "org/escape-snapshot", None, &outside).await;
    let cpu = assert_nothing_resident(&mut client).await;
    assert_eq!(cpu.peak_bytes, 0, "nothing was ever reserved: {cpu:?}");

    let (messages, end) = load_all(&mut client, load("org/good")).await;
    end.expect("the well-formed cached repo loads");
    assert!(messages.iter().any(|m| m.detail == format!("cache hit: snapshot {commit}")), "{messages:?}");
    let good = get_model(&mut client, "org/good").await;
    assert_eq!(
        (good.state(), good.source(), good.revision.as_str()),
        (pb::ModelState::Loaded, pb::ModelSource::Cache, commit)
    );
    assert_eq!(checksums(&mut client, "org/good").await, expected.tensors);
    assert_serving(server.addr).await;
    drop(client);
    server.stop().await;
}

// ---- a token repo without its token -----------------------------------------------------------

const PRIVATE: &str = "org/private";
const TOKEN: &str = "hf_refusals_token_7c1e";

/// A server on the test hub with an empty cache under `tmp`, sending `token` if any.
async fn hub_server(tmp: &Path, hub: &TestHub, token: Option<&str>) -> (TestServer, Client) {
    let mut cfg = config(&tmp.join("models"));
    cfg.manager.loader.sources.offline = false;
    cfg.manager.loader.sources.hf_cache = Some(tmp.join("cache"));
    cfg.manager.loader.sources.hub.endpoint = Some(hub.url().to_owned());
    cfg.manager.loader.sources.hub.token = token.map(str::to_owned);
    cfg.manager.loader.sources.hub.stall_timeout = Duration::from_secs(10);
    let server = TestServer::start(cfg).await;
    let client = server.client().await;
    (server, client)
}

/// Files in the cache's blobs folder of the private repo.
fn private_blobs(tmp: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(tmp.join("cache/models--org--private/blobs")) else { return Vec::new() };
    entries.filter_map(|e| e.ok()?.file_name().into_string().ok()).collect()
}

/// A token repo loaded without its token is UNAUTHENTICATED and the model FAILED with a reason.
///
/// The repo needs a token (tests::hub::Access::Token); loaded without one and with a wrong one, it
/// is UNAUTHENTICATED naming the model, before step 3; the model is FAILED saying so, nothing is
/// downloaded, cached or resident. With the right token it loads intact, and the LFS store (a
/// second host, a CDN) never receives the token.
#[tokio::test]
async fn token_repo_without_a_token_is_unauthenticated() {
    let tmp = tempfile::tempdir().expect("tmp");
    let expected =
        fixture::single_file_model(&tmp.path().join("repo"), &fixture::f32_tensors("w", 2, 512)).expect("fixture");
    let repo =
        HubRepo::from_dir(PRIVATE, &tmp.path().join("repo")).expect("repo").with_access(Access::Token(TOKEN.into()));
    let hub = TestHub::start([repo]).await;
    let bearer = format!("Bearer {TOKEN}");

    for token in [None, Some("hf_wrong_token")] {
        let (server, mut client) = hub_server(tmp.path(), &hub, token).await;
        let (messages, _) = refused(&mut client, PRIVATE, Code::Unauthenticated, &[]).await;
        assert!(messages.iter().all(|m| m.step <= 2), "{token:?}: refused while resolving: {messages:?}");
        assert_failed_with(&mut client, PRIVATE, &[PRIVATE, "unauthenticated"]).await;
        assert!(!hub.authorizations().contains(&bearer), "{token:?}: the right token was never sent");
        assert_eq!(hub.get_count(PRIVATE, "model.safetensors"), 0, "{token:?}: no weight byte was served");
        assert!(private_blobs(tmp.path()).is_empty(), "{token:?}: nothing cached: {:?}", private_blobs(tmp.path()));
        let cpu = assert_nothing_resident(&mut client).await;
        assert_eq!(cpu.peak_bytes, 0, "{token:?}: nothing was ever reserved: {cpu:?}");
        assert_serving(server.addr).await;
        drop(client);
        server.stop().await;
    }

    let (server, mut client) = hub_server(tmp.path(), &hub, Some(TOKEN)).await;
    load_ok(&mut client, load(PRIVATE)).await;
    assert_eq!(checksums(&mut client, PRIVATE).await, expected.tensors);
    assert!(hub.authorizations().contains(&bearer), "the token reached the hub: {:?}", hub.authorizations());
    let store_host = hub.store_url().trim_start_matches("http://").to_owned();
    let store: Vec<_> = hub.requests().into_iter().filter(|r| r.host == store_host).collect();
    assert!(!store.is_empty(), "the weights came from the LFS store");
    assert!(store.iter().all(|r| r.authorization.is_none()), "the store never gets the token: {store:?}");
    drop(client);
    server.stop().await;
}
