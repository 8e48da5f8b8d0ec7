//! The KServe v2 / Triton protocol (`inference.GRPCInferenceService`) beside `modelloader.v1`:
//! health and metadata, the repository index with Triton's states, RepositoryModelLoad blocking
//! until the model is LOADED (with `device`/`dtype` parameters), unload, ids with `/`, the errors,
//! and UNIMPLEMENTED for inference.

use std::{collections::HashMap, time::Duration};

use proto::{
    inference::{
        self as v2, grpc_inference_service_client::GrpcInferenceServiceClient,
        model_repository_parameter::ParameterChoice, repository_index_response::ModelIndex,
    },
    v1 as pb,
};
use tests::{TestServer, config, eventually, fixture, load_ok};
use tonic::{Code, transport::Channel};

const TIMEOUT: Duration = Duration::from_secs(30);
const MODEL: &str = "org/small";
const OTHER: &str = "plain";

type Client = GrpcInferenceServiceClient<Channel>;

fn string(value: &str) -> v2::ModelRepositoryParameter {
    v2::ModelRepositoryParameter { parameter_choice: Some(ParameterChoice::StringParam(value.into())) }
}

fn load_request(name: &str, parameters: &[(&str, v2::ModelRepositoryParameter)]) -> v2::RepositoryModelLoadRequest {
    v2::RepositoryModelLoadRequest {
        repository_name: String::new(),
        model_name: name.into(),
        parameters: parameters.iter().map(|(k, v)| ((*k).to_owned(), v.clone())).collect(),
    }
}

async fn repository_load(client: &mut Client, request: v2::RepositoryModelLoadRequest) -> Result<(), tonic::Status> {
    tokio::time::timeout(TIMEOUT, client.repository_model_load(request)).await.expect("answers").map(|_| ())
}

async fn index(client: &mut Client, ready: bool) -> HashMap<String, ModelIndex> {
    let request = v2::RepositoryIndexRequest { repository_name: String::new(), ready };
    let models = client.repository_index(request).await.expect("RepositoryIndex").into_inner().models;
    models.into_iter().map(|m| (m.name.clone(), m)).collect()
}

async fn model_ready(client: &mut Client, name: &str, version: &str) -> bool {
    let request = v2::ModelReadyRequest { name: name.into(), version: version.into() };
    client.model_ready(request).await.expect("ModelReady").into_inner().ready
}

async fn start() -> (TestServer, Client, tempfile::TempDir) {
    let root = tempfile::tempdir().expect("tmp");
    fixture::single_file_model(&root.path().join(MODEL), &fixture::f32_tensors("layer", 3, 4096)).expect("fixture");
    fixture::single_file_model(&root.path().join(OTHER), &fixture::f32_tensors("w", 1, 64)).expect("fixture");
    let server = TestServer::start(config(root.path())).await;
    let client = GrpcInferenceServiceClient::new(server.channel());
    (server, client, root)
}

/// Live, ready (once start-up is done), and the metadata naming the model-repository extensions.
#[tokio::test]
async fn health_and_server_metadata() {
    let (server, mut client, _root) = start().await;
    assert!(client.server_live(v2::ServerLiveRequest {}).await.expect("ServerLive").into_inner().live);
    eventually!(
        client.server_ready(v2::ServerReadyRequest {}).await.expect("ServerReady").into_inner().ready,
        "ServerReady turns true once there is nothing to preload"
    );
    let metadata = client.server_metadata(v2::ServerMetadataRequest {}).await.expect("ServerMetadata").into_inner();
    assert_eq!(metadata.name, "model-loader");
    assert_eq!(metadata.version, env!("CARGO_PKG_VERSION"));
    assert_eq!(metadata.extensions, ["model_repository", "model_repository(unload_dependents)"]);
    server.stop().await;
}

/// The index lists the model root UNAVAILABLE; RepositoryModelLoad (BF16 asked for as a
/// parameter) returns once the model is LOADED, then it is READY in the index and in ModelReady,
/// and `modelloader.v1` agrees; unload makes it UNAVAILABLE again.
#[tokio::test]
async fn load_index_ready_and_unload() {
    let (server, mut client, _root) = start().await;
    let before = index(&mut client, false).await;
    let mut names: Vec<&str> = before.keys().map(String::as_str).collect();
    names.sort_unstable();
    assert_eq!(names, [MODEL, OTHER]);
    assert_eq!((before[MODEL].state.as_str(), before[MODEL].version.as_str()), ("UNAVAILABLE", "1"));
    assert!(index(&mut client, true).await.is_empty(), "ready: true lists only READY models");
    assert!(!model_ready(&mut client, MODEL, "").await);

    repository_load(&mut client, load_request(MODEL, &[("dtype", string("bf16")), ("device", string("cpu"))]))
        .await
        .expect("RepositoryModelLoad");
    // No waiting: the call returned once the load had ended.
    let mut v1 = server.client().await;
    let status = v1.get_model(pb::GetModelRequest { model_id: MODEL.into() }).await.expect("GetModel").into_inner();
    assert_eq!(status.state(), pb::ModelState::Loaded);
    assert_eq!((status.dtype.as_str(), status.device.as_str()), ("BF16", "cpu"), "{status:?}");
    assert!(model_ready(&mut client, MODEL, "").await);
    assert!(model_ready(&mut client, MODEL, "1").await);
    let ready = index(&mut client, true).await;
    assert_eq!(ready.keys().collect::<Vec<_>>(), [MODEL]);
    assert_eq!((ready[MODEL].state.as_str(), ready[MODEL].reason.as_str()), ("READY", ""));

    let metadata = client
        .model_metadata(v2::ModelMetadataRequest { name: MODEL.into(), version: String::new() })
        .await
        .expect("ModelMetadata")
        .into_inner();
    assert_eq!((metadata.name.as_str(), metadata.versions.as_slice()), (MODEL, ["1".to_owned()].as_slice()));
    assert_eq!(metadata.platform, "safetensors");
    assert!(metadata.inputs.is_empty() && metadata.outputs.is_empty());

    let unload = v2::RepositoryModelUnloadRequest {
        repository_name: String::new(),
        model_name: MODEL.into(),
        parameters: HashMap::from([(
            "unload_dependents".to_owned(),
            v2::ModelRepositoryParameter { parameter_choice: Some(ParameterChoice::BoolParam(true)) },
        )]),
    };
    client.repository_model_unload(unload).await.expect("RepositoryModelUnload");
    assert!(!model_ready(&mut client, MODEL, "").await);
    assert_eq!(index(&mut client, false).await[MODEL].state, "UNAVAILABLE");
    server.stop().await;
}

/// A model loaded through `modelloader.v1` is READY in the v2 index; one whose load failed is
/// UNAVAILABLE with the failure as its reason.
#[tokio::test]
async fn the_index_shows_loads_from_either_protocol_and_failures() {
    let (server, mut client, root) = start().await;
    let mut v1 = server.client().await;
    load_ok(&mut v1, tests::load(OTHER)).await;
    std::fs::write(root.path().join(MODEL).join("model.safetensors"), b"not safetensors").expect("corrupt it");
    let failed = repository_load(&mut client, load_request(MODEL, &[])).await.expect_err("a corrupt file");
    assert_eq!(failed.code(), Code::DataLoss, "{failed:?}");
    let all = index(&mut client, false).await;
    assert_eq!(all[OTHER].state, "READY");
    assert_eq!(all[MODEL].state, "UNAVAILABLE");
    assert!(!all[MODEL].reason.is_empty() && failed.message().contains(&all[MODEL].reason), "{all:?} {failed:?}");
    server.stop().await;
}

/// Bad names, versions, repositories and parameters get the right codes, and the server goes on.
#[tokio::test]
async fn errors_name_what_is_wrong() {
    let (server, mut client, _root) = start().await;
    #[track_caller]
    fn code(r: Result<(), tonic::Status>) -> Code {
        r.expect_err("refused").code()
    }
    assert_eq!(code(repository_load(&mut client, load_request("org/nope", &[])).await), Code::NotFound);
    assert_eq!(code(repository_load(&mut client, load_request("../etc", &[])).await), Code::InvalidArgument);
    let unknown = repository_load(&mut client, load_request(MODEL, &[("config", string("{}"))])).await;
    assert!(unknown.as_ref().is_err_and(|s| s.message().contains("device, dtype, revision")), "{unknown:?}");
    assert_eq!(code(unknown), Code::InvalidArgument);
    let int = v2::ModelRepositoryParameter { parameter_choice: Some(ParameterChoice::Int64Param(3)) };
    assert_eq!(
        code(repository_load(&mut client, load_request(MODEL, &[("device", int)])).await),
        Code::InvalidArgument
    );
    let device = load_request(MODEL, &[("device", string("tpu:9"))]);
    assert_eq!(code(repository_load(&mut client, device).await), Code::InvalidArgument);
    let mut elsewhere = load_request(MODEL, &[]);
    elsewhere.repository_name = "other".into();
    assert_eq!(code(repository_load(&mut client, elsewhere).await), Code::NotFound);

    assert!(!model_ready(&mut client, "org/nope", "").await, "an unknown model is not ready, as in Triton");
    let v2_of = |name: &str, version: &str| v2::ModelMetadataRequest { name: name.into(), version: version.into() };
    let metadata = client.model_metadata(v2_of("org/never", "")).await.map(|_| ());
    assert_eq!(code(metadata), Code::NotFound);
    let not_loaded = client.model_metadata(v2_of(MODEL, "")).await.map(|_| ());
    assert_eq!(code(not_loaded), Code::Unavailable);
    assert_eq!(code(client.model_metadata(v2_of(MODEL, "2")).await.map(|_| ())), Code::NotFound);
    let unload = v2::RepositoryModelUnloadRequest { model_name: "org/never".into(), ..Default::default() };
    assert_eq!(code(client.repository_model_unload(unload).await.map(|_| ())), Code::NotFound);

    // Inference and the other extensions are not served.
    let infer = client.model_infer(v2::ModelInferRequest { model_name: MODEL.into(), ..Default::default() }).await;
    assert_eq!(code(infer.map(|_| ())), Code::Unimplemented);
    let config = client.model_config(v2::ModelConfigRequest { name: MODEL.into(), version: String::new() }).await;
    assert_eq!(code(config.map(|_| ())), Code::Unimplemented);

    // Still serving.
    repository_load(&mut client, load_request(MODEL, &[])).await.expect("a good load after the bad ones");
    server.stop().await;
}

/// RepositoryModelLoad blocks while the load runs (here: the hub holds its answer, the model is
/// LOADING) and returns once it is LOADED.
#[tokio::test]
async fn repository_load_blocks_until_the_model_is_loaded() {
    use tests::hub::{HubRepo, TestHub};
    const REPO: &str = "org/held";
    let tmp = tempfile::tempdir().expect("tmp");
    fixture::single_file_model(&tmp.path().join("repo"), &fixture::f32_tensors("w", 2, 1024)).expect("fixture");
    let hub = TestHub::start([HubRepo::from_dir(REPO, &tmp.path().join("repo")).expect("repo")]).await;
    let mut cfg = config(&tmp.path().join("models"));
    cfg.manager.loader.sources.offline = false;
    cfg.manager.loader.sources.hf_cache = Some(tmp.path().join("cache"));
    cfg.manager.loader.sources.hub.endpoint = Some(hub.url().to_owned());
    let server = TestServer::start(cfg).await;
    let mut client = GrpcInferenceServiceClient::new(server.channel());

    hub.hold_api();
    let load = tokio::spawn({
        let mut client = client.clone();
        async move { repository_load(&mut client, load_request(REPO, &[])).await }
    });
    hub.wait_until("the load asks the hub", |h| h.held_api() > 0).await;
    let mut v1 = server.client().await;
    let status = v1.get_model(pb::GetModelRequest { model_id: REPO.into() }).await.expect("GetModel").into_inner();
    assert_eq!(status.state(), pb::ModelState::Loading);
    assert_eq!(index(&mut client, false).await[REPO].state, "LOADING");
    assert!(!load.is_finished(), "RepositoryModelLoad returned while the model was LOADING");

    hub.answer_api();
    tokio::time::timeout(TIMEOUT, load).await.expect("returns").expect("task").expect("loaded");
    assert!(model_ready(&mut client, REPO, "").await, "LOADED when the call returned");
    server.stop().await;
}
