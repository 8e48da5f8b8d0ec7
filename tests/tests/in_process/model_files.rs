//! A model's small files (configs, tokenizer, scheduler, sentence-transformers module configs)
//! travel with it: GetModelFiles lists exactly those docs/model-files.md names, ReadModelFile
//! serves their bytes, the attach socket lists and sends them, the cpu budget books them, limits
//! refuse oversized ones, and the hub downloads them and nothing unlisted.

use std::{path::Path, time::Duration};

use attach::{AttachRequest, Attached};
use proto::v1::{self as pb, model_loader_client::ModelLoaderClient};
use sha2::{Digest, Sha256};
use tests::{
    TestServer, config, cpu_resources, expect_code, fixture,
    hub::{HubRepo, TestHub},
    load, load_all, load_ok, with_attach,
};
use tonic::{Code, transport::Channel};
use weights::small_files::{MAX_FILE_BYTES, MAX_MODEL_FILES_BYTES};

const TIMEOUT: Duration = Duration::from_secs(30);

/// Deterministic bytes that are not all alike.
fn bytes(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
}

fn write(dir: &Path, path: &str, content: &[u8]) {
    let path = dir.join(path);
    std::fs::create_dir_all(path.parent().expect("a folder")).expect("mkdir");
    std::fs::write(path, content).expect("write");
}

/// A text model's folder: tokenizer files (a tokenizer.json over 1 MiB, an empty chat
/// template), a sentence-transformers pooling module, and files that never travel (a README, a
/// pickle, a dotfile, a config two folders down); then its weights and config.json.
fn text_model(dir: &Path) -> fixture::Expected {
    write(dir, "tokenizer.json", &bytes(2 * 1024 * 1024 + 77, 1));
    write(dir, "tokenizer_config.json", br#"{"model_max_length": 512}"#);
    write(dir, "special_tokens_map.json", br#"{"cls_token": "[CLS]"}"#);
    write(dir, "vocab.txt", b"[PAD]\n[UNK]\n[CLS]\n[SEP]\nhello\n");
    write(dir, "merges.txt", b"#version: 0.2\nh e\n");
    write(dir, "tokenizer.model", &bytes(4096, 9));
    write(dir, "chat_template.jinja", b"");
    write(dir, "modules.json", br#"[{"idx": 0, "name": "0", "path": "", "type": "Transformer"}]"#);
    write(dir, "1_Pooling/config.json", br#"{"pooling_mode_mean_tokens": true}"#);
    write(dir, "README.md", b"# not served\n");
    write(dir, "pytorch_model.bin", b"never read");
    write(dir, ".env", b"SECRET=1\n");
    write(dir, "x/y/config.json", b"{}");
    fixture::single_file_model(dir, &fixture::f32_tensors("layer", 2, 256)).expect("fixture")
}

/// (path, size, sha256) of each file, as GetModelFiles lists them.
fn listed(files: &[(String, Vec<u8>)]) -> Vec<(String, u64, String)> {
    files.iter().map(|(p, b)| (p.clone(), b.len() as u64, hex::encode(Sha256::digest(b)))).collect()
}

async fn get_files(client: &mut ModelLoaderClient<Channel>, id: &str) -> Result<Vec<pb::ModelFile>, tonic::Status> {
    let request = pb::GetModelFilesRequest { model_id: id.into() };
    let response = tokio::time::timeout(TIMEOUT, client.get_model_files(request)).await.expect("answers")?;
    Ok(response.into_inner().files)
}

fn of(files: &[pb::ModelFile]) -> Vec<(String, u64, String)> {
    files.iter().map(|f| (f.path.clone(), f.size_bytes, f.sha256.clone())).collect()
}

/// Every chunk of ReadModelFile, checked to come in order and cover the file.
async fn read_file(
    client: &mut ModelLoaderClient<Channel>,
    id: &str,
    path: &str,
) -> Result<(Vec<u8>, usize), tonic::Status> {
    let request = pb::ReadModelFileRequest { model_id: id.into(), path: path.into() };
    let mut stream =
        tokio::time::timeout(TIMEOUT, client.read_model_file(request)).await.expect("answers")?.into_inner();
    let (mut content, mut chunks) = (Vec::new(), 0);
    while let Some(chunk) = tokio::time::timeout(TIMEOUT, stream.message()).await.expect("a chunk comes")? {
        assert_eq!(chunk.offset, content.len() as u64, "{path}: chunks in order, without gaps");
        assert!(chunk.data.len() <= 1024 * 1024, "{path}: a chunk of {} bytes", chunk.data.len());
        content.extend(chunk.data);
        chunks += 1;
    }
    Ok((content, chunks))
}

/// The error kind an error status carries.
fn kind(status: &tonic::Status) -> &str {
    status.metadata().get("model-loader-error-kind").and_then(|v| v.to_str().ok()).unwrap_or("")
}

/// A model-root model: GetModelFiles lists exactly the files that travel (right sizes and
/// sha256, sorted), ReadModelFile gives their bytes (a 2 MiB file in 3 chunks, an empty file in
/// one empty chunk), the step 3 detail and the cpu budget count them, unknown paths and models
/// not loaded are refused, and an unload frees them.
#[tokio::test]
async fn a_loaded_model_serves_exactly_the_files_that_travel() {
    let tmp = tempfile::tempdir().expect("tmp");
    let models = tmp.path().join("models");
    let dir = models.join("text");
    let expected = text_model(&dir);
    let files = fixture::small_files(&dir).expect("small files");
    let paths: Vec<&str> = files.iter().map(|(p, _)| p.as_str()).collect();
    assert_eq!(
        paths,
        [
            "1_Pooling/config.json",
            "chat_template.jinja",
            "config.json",
            "merges.txt",
            "modules.json",
            "special_tokens_map.json",
            "tokenizer.json",
            "tokenizer.model",
            "tokenizer_config.json",
            "vocab.txt"
        ],
        "the fixture's own reading of the allowlist"
    );
    let files_bytes: u64 = files.iter().map(|(_, b)| b.len() as u64).sum();
    let (server, mut client) = tests::serve(&models).await;

    let unknown = expect_code(get_files(&mut client, "nobody").await, Code::NotFound, "an unknown model");
    assert_eq!(kind(&unknown), "not_found");
    let not_loaded = expect_code(get_files(&mut client, "text").await, Code::FailedPrecondition, "not loaded");
    assert_eq!(kind(&not_loaded), "not_loaded", "{not_loaded:?}");
    expect_code(read_file(&mut client, "text", "config.json").await, Code::FailedPrecondition, "not loaded");

    let messages = load_ok(&mut client, load("text")).await;
    let step3: Vec<&str> = messages.iter().filter(|m| m.step == 3).map(|m| m.detail.as_str()).collect();
    let said = format!("{} small files ({:.1} MB)", files.len(), files_bytes as f64 / 1e6);
    assert!(step3.iter().any(|d| d.contains(&said)), "step 3 says {said:?}: {step3:?}");

    let got = get_files(&mut client, "text").await.expect("GetModelFiles");
    assert_eq!(of(&got), listed(&files));
    assert!(got.iter().all(|f| f.content.is_empty()), "GetModelFiles sends no bytes");
    for (path, content) in &files {
        let (read, chunks) = read_file(&mut client, "text", path).await.expect("ReadModelFile");
        assert!(read == *content, "{path}: the bytes served are the file's");
        assert_eq!(chunks, content.len().div_ceil(1024 * 1024).max(1), "{path}");
    }
    for never in
        ["README.md", "pytorch_model.bin", ".env", "x/y/config.json", "model.safetensors", "../text/config.json"]
    {
        let status = expect_code(read_file(&mut client, "text", never).await, Code::NotFound, never);
        assert!(status.message().contains(never), "names the path: {status:?}");
        assert_eq!(kind(&status), "not_found");
    }

    let status = tests::get_model(&mut client, "text").await;
    assert_eq!(status.metadata_bytes, expected.metadata_bytes(), "{status:?}");
    let cpu = cpu_resources(&mut client).await;
    assert_eq!(cpu.used_bytes, expected.booked(), "{cpu:?}");
    assert!(cpu.used_bytes >= expected.bytes() + files_bytes, "the files are booked on top of the weights: {cpu:?}");

    let unload = pb::UnloadModelRequest { model_id: "text".into(), force: false };
    let freed = client.unload_model(unload).await.expect("unloads").into_inner().freed_bytes;
    assert_eq!(freed, expected.booked(), "the files are freed with the model");
    tests::assert_nothing_resident(&mut client).await;
    expect_code(get_files(&mut client, "text").await, Code::FailedPrecondition, "unloaded");
    server.stop().await;
}

/// A diffusers pipeline keeps model_index.json and each component's files (scheduler config,
/// tokenizer vocab and merges, feature extractor, components' configs), weightless or not.
#[tokio::test]
async fn a_pipeline_keeps_each_components_files() {
    let tmp = tempfile::tempdir().expect("tmp");
    let models = tmp.path().join("models");
    let dir = models.join("sd");
    write(&dir, "tokenizer/vocab.json", br#"{"a": 0, "b": 1}"#);
    write(&dir, "tokenizer/merges.txt", b"#version: 0.2\na b\n");
    write(&dir, "tokenizer/tokenizer_config.json", br#"{"model_max_length": 77}"#);
    write(&dir, "feature_extractor/preprocessor_config.json", br#"{"crop_size": 224}"#);
    write(&dir, "text_encoder/config.json", br#"{"hidden_size": 32}"#);
    write(&dir, "unet/README.md", b"never");
    let expected = fixture::demo_tiny_sd(&dir).expect("fixture");
    let files = fixture::small_files(&dir).expect("small files");
    let paths: Vec<&str> = files.iter().map(|(p, _)| p.as_str()).collect();
    assert_eq!(
        paths,
        [
            "feature_extractor/preprocessor_config.json",
            "model_index.json",
            "scheduler/scheduler_config.json",
            "text_encoder/config.json",
            "tokenizer/merges.txt",
            "tokenizer/tokenizer_config.json",
            "tokenizer/vocab.json",
            "unet/config.json",
            "vae/config.json"
        ]
    );
    let (server, mut client) = tests::serve(&models).await;
    load_ok(&mut client, load("sd")).await;
    assert_eq!(of(&get_files(&mut client, "sd").await.expect("GetModelFiles")), listed(&files));
    let (vocab, _) = read_file(&mut client, "sd", "tokenizer/vocab.json").await.expect("ReadModelFile");
    assert_eq!(vocab, br#"{"a": 0, "b": 1}"#);
    assert_eq!(tests::get_model(&mut client, "sd").await.metadata_bytes, expected.metadata_bytes());
    server.stop().await;
}

/// A small file over its limit, and small files over the model's limit in all, fail the load
/// with RESOURCE_EXHAUSTED (kind over_limit) naming the file, its size and the limit; nothing
/// stays resident. (The files are sparse: nothing of them is read.)
#[tokio::test]
async fn files_past_the_limits_fail_the_load() {
    let tmp = tempfile::tempdir().expect("tmp");
    let models = tmp.path().join("models");
    let sparse = |path: &Path, len: u64| {
        std::fs::create_dir_all(path.parent().expect("a folder")).expect("mkdir");
        std::fs::File::create(path).expect("create").set_len(len).expect("set_len");
    };
    let tensors = fixture::f32_tensors("layer", 1, 16);
    fixture::single_file_model(&models.join("big-file"), &tensors).expect("fixture");
    sparse(&models.join("big-file/tokenizer.json"), MAX_FILE_BYTES + 1);
    fixture::single_file_model(&models.join("big-model"), &tensors).expect("fixture");
    let third = MAX_MODEL_FILES_BYTES / 3 + 1;
    for dir in ["a", "b", "c"] {
        sparse(&models.join(format!("big-model/{dir}/tokenizer.json")), third);
    }
    let (server, mut client) = tests::serve(&models).await;

    let (_, end) = load_all(&mut client, load("big-file")).await;
    let status = expect_code(end, Code::ResourceExhausted, "a file over its limit");
    assert_eq!(kind(&status), "over_limit");
    let limit = format!("{MAX_FILE_BYTES}-byte limit of a small file");
    for needle in ["tokenizer.json", &(MAX_FILE_BYTES + 1).to_string(), &limit] {
        assert!(status.message().contains(needle), "names {needle:?}: {status:?}");
    }
    let (_, end) = load_all(&mut client, load("big-model")).await;
    let status = expect_code(end, Code::ResourceExhausted, "the model's files over their limit");
    let limit = format!("{MAX_MODEL_FILES_BYTES}-byte limit of a model's small files");
    for needle in ["c/tokenizer.json", &third.to_string(), &limit] {
        assert!(status.message().contains(needle), "names {needle:?}: {status:?}");
    }
    tests::assert_failed_with(&mut client, "big-model", &["c/tokenizer.json"]).await;
    tests::assert_nothing_resident(&mut client).await;
    server.stop().await;
}

fn attach_request(id: &str) -> AttachRequest {
    AttachRequest { model_id: id.into(), ..Default::default() }
}

/// Attaches on a blocking thread (the client is blocking).
async fn attach(socket: &Path, request: AttachRequest) -> Result<Attached, attach::AttachError> {
    let socket = socket.to_owned();
    tokio::task::spawn_blocking(move || Attached::attach(&socket, &request, TIMEOUT)).await.expect("attach task")
}

fn refused_code(result: Result<Attached, attach::AttachError>, what: &str) -> (i32, String) {
    match result {
        Err(attach::AttachError::Refused { code, message }) => (code, message),
        other => panic!("{what}: expected a refusal, got {other:?}"),
    }
}

/// The attach socket lists the files always and sends their bytes with include_files; a dtype
/// is compared parsed ("f32" is F32) and another one refused naming both; with load_if_needed
/// the dtype is loaded converted. Devices compare parsed: on the CPU only `cpu` itself, `cuda`
/// (another device, so refused) and spellings that do not parse can be tried.
#[tokio::test]
async fn attach_sends_the_files_and_checks_dtype_and_device_parsed() {
    let tmp = tempfile::tempdir().expect("tmp");
    let models = tmp.path().join("models");
    let dir = models.join("text");
    text_model(&dir);
    let files = fixture::small_files(&dir).expect("small files");
    let socket = tmp.path().join("attach.sock");
    let server = TestServer::start(with_attach(config(&models), &socket)).await;
    let mut client = server.client().await;
    load_ok(&mut client, load("text")).await;

    let attached = attach(&socket, attach_request("text")).await.expect("attaches");
    assert_eq!(of(attached.files()), listed(&files));
    assert!(attached.files().iter().all(|f| f.content.is_empty()), "no bytes unless asked");
    drop(attached);
    let with_files = AttachRequest { include_files: true, ..attach_request("text") };
    let attached = attach(&socket, with_files).await.expect("attaches with files");
    let contents: Vec<(String, Vec<u8>)> =
        attached.files().iter().map(|f| (f.path.clone(), f.content.clone())).collect();
    assert!(contents == files, "include_files sends each file's bytes");
    drop(attached);

    let ask = |dtype: &str, device: &str| AttachRequest {
        dtype: (!dtype.is_empty()).then(|| dtype.to_owned()),
        device: (!device.is_empty()).then(|| device.to_owned()),
        ..attach_request("text")
    };
    for (dtype, device) in [("f32", ""), ("F32", "cpu"), ("float32", ""), ("", "cpu")] {
        attach(&socket, ask(dtype, device)).await.unwrap_or_else(|e| panic!("{dtype:?} {device:?}: {e}"));
    }
    let (code, message) = refused_code(attach(&socket, ask("bf16", "")).await, "another dtype");
    assert_eq!(code, Code::FailedPrecondition as i32, "{message}");
    assert!(message.contains("F32") && message.contains("BF16"), "names both: {message}");
    for device in ["cuda", "cuda:0"] {
        let (code, message) = refused_code(attach(&socket, ask("", device)).await, device);
        assert_eq!(code, Code::FailedPrecondition as i32, "{message}");
        assert!(message.contains("resident on cpu, not cuda:0"), "parsed, not echoed: {message}");
    }
    for (dtype, device) in [("int8", ""), ("", "gpu"), ("", "CPU"), ("", "cuda:x")] {
        let (code, message) = refused_code(attach(&socket, ask(dtype, device)).await, "unparsable");
        assert_eq!(code, Code::InvalidArgument as i32, "{dtype:?} {device:?}: {message}");
    }

    // Not resident: load_if_needed loads it converted to the dtype asked.
    let unload = pb::UnloadModelRequest { model_id: "text".into(), force: false };
    tests::eventually!(client.unload_model(unload.clone()).await.is_ok(), "the leases are never released");
    let converted = AttachRequest { load_if_needed: true, ..ask("bf16", "cpu") };
    let attached = attach(&socket, converted).await.expect("loads as BF16 and attaches");
    assert!(attached.tensors().iter().all(|t| t.dtype == "BF16"), "{:?}", attached.tensors());
    assert_eq!(attached.status().map(|s| s.dtype.as_str()), Some("BF16"));
    assert_eq!(of(attached.files()), listed(&files), "the files come with a load through attach too");
    drop(attached);
    server.stop().await;
}

/// From the hub: the tokenizer files (vocab.txt, merges.txt, tokenizer.model) are downloaded
/// and served, files that do not travel (a README, a pickle, a stray file in a folder) are never
/// requested; the HF cache then serves the same files offline.
#[tokio::test]
async fn the_hub_fetches_the_files_that_travel_and_nothing_else() {
    let tmp = tempfile::tempdir().expect("tmp");
    let repo_dir = tmp.path().join("repo");
    write(&repo_dir, "vocab.txt", b"[PAD]\n[UNK]\nhello\n");
    write(&repo_dir, "merges.txt", b"#version: 0.2\nh e\n");
    write(&repo_dir, "tokenizer.model", &bytes(3000, 5));
    write(&repo_dir, "README.md", b"# never fetched\n");
    write(&repo_dir, "pytorch_model.bin", b"never fetched");
    write(&repo_dir, "extra/secret.txt", b"never fetched");
    fixture::single_file_model(&repo_dir, &fixture::f32_tensors("layer", 2, 64)).expect("fixture");
    let files = fixture::small_files(&repo_dir).expect("small files");
    let paths: Vec<&str> = files.iter().map(|(p, _)| p.as_str()).collect();
    assert_eq!(paths, ["config.json", "merges.txt", "tokenizer.model", "vocab.txt"]);
    let hub = TestHub::start([HubRepo::from_dir("org/text", &repo_dir).expect("repo")]).await;
    let mut cfg = config(&tmp.path().join("models"));
    cfg.manager.loader.sources.offline = false;
    cfg.manager.loader.sources.hf_cache = Some(tmp.path().join("cache"));
    cfg.manager.loader.sources.hub.endpoint = Some(hub.url().to_owned());
    let server = TestServer::start(cfg.clone()).await;
    let mut client = server.client().await;
    load_ok(&mut client, load("org/text")).await;
    assert_eq!(of(&get_files(&mut client, "org/text").await.expect("GetModelFiles")), listed(&files));
    for (path, content) in &files {
        assert!(read_file(&mut client, "org/text", path).await.expect("ReadModelFile").0 == *content, "{path}");
    }
    let requests = hub.requests();
    for never in ["README.md", "pytorch_model.bin", "secret.txt"] {
        let asked: Vec<_> = requests.iter().filter(|r| r.path.contains(never)).collect();
        assert!(asked.is_empty(), "{never} was requested: {asked:?}");
    }
    for fetched in ["vocab.txt", "merges.txt", "tokenizer.model"] {
        assert!(requests.iter().any(|r| r.path.ends_with(fetched)), "{fetched} is downloaded: {requests:?}");
    }
    server.stop().await;

    cfg.manager.loader.sources.offline = true;
    let server = TestServer::start(cfg).await;
    let mut client = server.client().await;
    let messages = load_ok(&mut client, load("org/text")).await;
    assert_eq!(tests::get_model(&mut client, "org/text").await.source(), pb::ModelSource::Cache, "{messages:?}");
    assert_eq!(of(&get_files(&mut client, "org/text").await.expect("GetModelFiles")), listed(&files));
    server.stop().await;
}
