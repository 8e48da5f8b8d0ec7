//! `inference.GRPCInferenceService`: the KServe v2 / Triton protocol's health, metadata and
//! model-repository methods over the same facade as `modelloader.v1`, so tritonclient, KServe and
//! Triton tooling can list, load and unload models. Inference itself and the shared-memory,
//! statistics, trace and config methods answer UNIMPLEMENTED (the generated defaults).
//!
//! A v2 model name is a model-loader model id, verbatim (`org/name`, `s3://bucket/prefix`, …: the
//! v2 protocol allows `/` in names). A model has one version, `1`; an empty version means it too.

use std::sync::Arc;

use model_manager::{LoadUpdate, ModelId, ModelManager, ModelStatus, state_manager::ModelState};
use proto::{
    inference::{
        self as v2, grpc_inference_service_server::GrpcInferenceService, model_repository_parameter::ParameterChoice,
    },
    v1::model_loader_server::ModelLoaderServer,
};
use tonic::{Request, Response, Status, server::NamedService};
use tonic_health::{
    pb::{HealthCheckRequest, health_check_response::ServingStatus, health_server::Health},
    server::HealthService,
};

use crate::{convert, service::ModelLoaderService, status};

/// The protocol extensions this server implements, as ServerMetadata lists them.
const EXTENSIONS: [&str; 2] = ["model_repository", "model_repository(unload_dependents)"];
/// The one version every model has.
const VERSION: &str = "1";
/// ModelMetadata's platform: what the server holds of a model, its safetensors weights.
const PLATFORM: &str = "safetensors";
/// The parameters RepositoryModelLoad takes, each a string as in LoadModelRequest.
const LOAD_PARAMETERS: [&str; 3] = ["device", "dtype", "revision"];

/// The v2 face of a [`ModelManager`]; readiness is the gRPC health status of `modelloader.v1`.
pub struct InferenceService {
    manager: Arc<ModelManager>,
    health: HealthService,
}

impl InferenceService {
    pub fn new(manager: Arc<ModelManager>, health: HealthService) -> Self {
        Self { manager, health }
    }

    /// The status of a model the request names (NOT_FOUND for one the server does not know, or a
    /// version other than `1`).
    fn model(&self, name: &str, version: &str) -> Result<ModelStatus, Status> {
        let id = model_id(name)?;
        check_version(&id, version)?;
        self.manager.get(&id).map_err(|e| status::from_manager(&e))
    }
}

#[tonic::async_trait]
impl GrpcInferenceService for InferenceService {
    async fn server_live(&self, _: Request<v2::ServerLiveRequest>) -> Result<Response<v2::ServerLiveResponse>, Status> {
        Ok(Response::new(v2::ServerLiveResponse { live: true }))
    }

    async fn server_ready(
        &self,
        _: Request<v2::ServerReadyRequest>,
    ) -> Result<Response<v2::ServerReadyResponse>, Status> {
        let service = <ModelLoaderServer<ModelLoaderService> as NamedService>::NAME.to_owned();
        let health = self.health.check(Request::new(HealthCheckRequest { service })).await?.into_inner();
        Ok(Response::new(v2::ServerReadyResponse { ready: health.status == ServingStatus::Serving as i32 }))
    }

    async fn server_metadata(
        &self,
        _: Request<v2::ServerMetadataRequest>,
    ) -> Result<Response<v2::ServerMetadataResponse>, Status> {
        Ok(Response::new(v2::ServerMetadataResponse {
            name: "model-loader".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            extensions: EXTENSIONS.map(String::from).to_vec(),
        }))
    }

    async fn model_ready(
        &self,
        request: Request<v2::ModelReadyRequest>,
    ) -> Result<Response<v2::ModelReadyResponse>, Status> {
        let request = request.into_inner();
        // As Triton answers: a model it does not know is not ready, not an error.
        let ready = match self.model(&request.name, &request.version) {
            Ok(status) => status.state == ModelState::Loaded,
            Err(e) if e.code() == tonic::Code::NotFound => false,
            Err(e) => return Err(e),
        };
        Ok(Response::new(v2::ModelReadyResponse { ready }))
    }

    async fn model_metadata(
        &self,
        request: Request<v2::ModelMetadataRequest>,
    ) -> Result<Response<v2::ModelMetadataResponse>, Status> {
        let request = request.into_inner();
        let status = self.model(&request.name, &request.version)?;
        // As Triton answers for a model it knows but does not serve.
        if status.state != ModelState::Loaded {
            return Err(Status::unavailable(format!("{} is not loaded (it is {:?})", status.model_id, status.state)));
        }
        Ok(Response::new(v2::ModelMetadataResponse {
            name: status.model_id.to_string(),
            versions: vec![VERSION.into()],
            platform: PLATFORM.into(),
            inputs: Vec::new(),
            outputs: Vec::new(),
        }))
    }

    async fn repository_index(
        &self,
        request: Request<v2::RepositoryIndexRequest>,
    ) -> Result<Response<v2::RepositoryIndexResponse>, Status> {
        let request = request.into_inner();
        check_repository(&request.repository_name)?;
        let models =
            self.manager.list().into_iter().map(index_entry).filter(|m| !request.ready || m.state == "READY").collect();
        Ok(Response::new(v2::RepositoryIndexResponse { models }))
    }

    async fn repository_model_load(
        &self,
        request: Request<v2::RepositoryModelLoadRequest>,
    ) -> Result<Response<v2::RepositoryModelLoadResponse>, Status> {
        let request = request.into_inner();
        check_repository(&request.repository_name)?;
        let load = load_request(request)?;
        // Blocks until the load ends, as Triton's load does; a client that goes away leaves the
        // load running (only this listener is dropped), as with LoadModel.
        let mut subscription = self.manager.load(load).await.map_err(|e| status::from_manager(&e))?;
        while let Some(update) = subscription.next().await {
            if let LoadUpdate::Done(done) = update {
                return done
                    .map(|()| Response::new(v2::RepositoryModelLoadResponse {}))
                    .map_err(|e| status::from_load(&e));
            }
        }
        Err(Status::unavailable("the server is shutting down"))
    }

    async fn repository_model_unload(
        &self,
        request: Request<v2::RepositoryModelUnloadRequest>,
    ) -> Result<Response<v2::RepositoryModelUnloadResponse>, Status> {
        let request = request.into_inner();
        check_repository(&request.repository_name)?;
        for (key, value) in &request.parameters {
            // A model-loader model has no dependents: `unload_dependents` changes nothing.
            match (key.as_str(), &value.parameter_choice) {
                ("unload_dependents", Some(ParameterChoice::BoolParam(_))) => {}
                _ => {
                    return Err(Status::invalid_argument(format!(
                        "unknown unload parameter {key:?}: only the bool `unload_dependents`"
                    )));
                }
            }
        }
        let id = model_id(&request.model_name)?;
        // An unknown model is NOT_FOUND (unload itself is idempotent and would say nothing).
        self.manager.get(&id).map_err(|e| status::from_manager(&e))?;
        self.manager.unload(&id, false).await.map_err(|e| status::from_manager(&e))?;
        Ok(Response::new(v2::RepositoryModelUnloadResponse {}))
    }
}

/// A model name as a model id (INVALID_ARGUMENT as in `modelloader.v1` when it is not one).
fn model_id(name: &str) -> Result<ModelId, Status> {
    convert::model_id(name)
}

fn check_version(id: &ModelId, version: &str) -> Result<(), Status> {
    if version.is_empty() || version == VERSION {
        return Ok(());
    }
    let shown: String = version.chars().take(64).collect();
    Err(Status::not_found(format!("{id} has no version {shown:?}: every model has one version, \"1\"")))
}

/// The server is one repository; an empty name means it.
fn check_repository(name: &str) -> Result<(), Status> {
    if name.is_empty() {
        return Ok(());
    }
    let shown: String = name.chars().take(64).collect();
    Err(Status::not_found(format!("no repository {shown:?}: this server has one, named by the empty string")))
}

/// RepositoryModelLoad as a load: its string parameters are LoadModelRequest's fields, checked the
/// same way.
fn load_request(request: v2::RepositoryModelLoadRequest) -> Result<model_manager::LoadRequest, Status> {
    let mut load = proto::v1::LoadModelRequest { model_id: request.model_name, ..Default::default() };
    for (key, value) in request.parameters {
        let Some(ParameterChoice::StringParam(value)) = value.parameter_choice else {
            return Err(Status::invalid_argument(format!(
                "load parameter {key:?}: model-loader takes only the string parameters {}; a config or model files \
                 cannot be given (models come from the server's sources)",
                LOAD_PARAMETERS.join(", ")
            )));
        };
        match key.as_str() {
            "device" => load.device = Some(value),
            "dtype" => load.dtype = Some(value),
            "revision" => load.revision = Some(value),
            _ => {
                let shown: String = key.chars().take(64).collect();
                return Err(Status::invalid_argument(format!(
                    "unknown load parameter {shown:?}: model-loader takes {}",
                    LOAD_PARAMETERS.join(", ")
                )));
            }
        }
    }
    convert::load_request(load)
}

/// A model's line in RepositoryIndex: Triton's states, and why a model is not ready.
fn index_entry(status: ModelStatus) -> v2::repository_index_response::ModelIndex {
    let state = match status.state {
        ModelState::Loaded => "READY",
        ModelState::Loading => "LOADING",
        ModelState::Unloading => "UNLOADING",
        ModelState::Unloaded | ModelState::Failed => "UNAVAILABLE",
    };
    let reason = match status.state {
        ModelState::Failed => status.error.unwrap_or_default(),
        ModelState::Unloaded => status.unload_reason.unwrap_or_else(|| "unloaded".into()),
        _ => String::new(),
    };
    v2::repository_index_response::ModelIndex {
        name: status.model_id.to_string(),
        version: VERSION.into(),
        state: state.into(),
        reason,
    }
}
