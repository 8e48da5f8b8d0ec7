//! The `modelloader.v1.ModelLoader` service: converts requests, calls the facade, converts back.

use std::{pin::Pin, sync::Arc};

use futures::{Stream, stream};
use model_manager::{LoadUpdate, ModelManager};
use proto::v1::{self as pb, model_loader_server::ModelLoader};
use tonic::{Request, Response, Status};

use crate::{convert, status};

/// ListModels' page size when a request names none, and the most it gives: a page of statuses
/// stays far below a client's default 4 MiB message limit.
const DEFAULT_PAGE_SIZE: u32 = 100;
const MAX_PAGE_SIZE: u32 = 1000;
/// ReadModelFile's chunks: far below a client's default 4 MiB message limit.
const FILE_CHUNK_BYTES: usize = 1024 * 1024;

type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// The gRPC face of a [`ModelManager`].
pub struct ModelLoaderService {
    manager: Arc<ModelManager>,
    /// One permit per WatchModels stream open (`--max-watchers`).
    watchers: Arc<tokio::sync::Semaphore>,
    max_watchers: usize,
}

impl ModelLoaderService {
    pub fn new(manager: Arc<ModelManager>, max_watchers: usize) -> Self {
        Self { manager, watchers: Arc::new(tokio::sync::Semaphore::new(max_watchers)), max_watchers }
    }
}

#[tonic::async_trait]
impl ModelLoader for ModelLoaderService {
    type LoadModelStream = ResponseStream<pb::ModelLoadProgress>;
    type WatchModelsStream = ResponseStream<pb::ModelEvent>;
    type ReadModelFileStream = ResponseStream<pb::ModelFileChunk>;

    async fn load_model(
        &self,
        request: Request<pb::LoadModelRequest>,
    ) -> Result<Response<Self::LoadModelStream>, Status> {
        let request = convert::load_request(request.into_inner())?;
        let subscription = self.manager.load(request).await.map_err(|e| status::from_manager(&e))?;
        // The stream only listens: dropping it (the client left) does not touch the load.
        let stream = stream::unfold(subscription, |mut sub| async move {
            match sub.next().await? {
                LoadUpdate::Progress(p) => Some((Ok(convert::progress(p)), sub)),
                LoadUpdate::Done(Ok(())) => None,
                LoadUpdate::Done(Err(e)) => Some((Err(status::from_load(&e)), sub)),
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn watch_models(
        &self,
        request: Request<pb::WatchModelsRequest>,
    ) -> Result<Response<Self::WatchModelsStream>, Status> {
        let id = request.into_inner().model_id;
        let filter = if id.is_empty() { None } else { Some(convert::model_id(&id)?) };
        let permit = self.watchers.clone().try_acquire_owned().map_err(|_| {
            metrics::counter!("model_loader_watchers_refused_total").increment(1);
            Status::resource_exhausted(format!(
                "{} WatchModels streams are open, the most this server serves (--max-watchers)",
                self.max_watchers
            ))
        })?;
        let subscription = self.manager.watch(filter);
        // The watcher gauge counts the stream until it is dropped (its client went away). The
        // stream only ends when the server shuts down, and then with UNAVAILABLE, as LoadModel
        // streams do: a client can tell shutdown from a normal end and reconnect elsewhere.
        let state = Some((subscription, crate::metrics::Watcher::open(), permit));
        let stream = stream::unfold(state, |state| async move {
            let (mut sub, watcher, permit) = state?;
            match sub.next().await {
                Some(event) => Some((Ok(convert::event(event)), Some((sub, watcher, permit)))),
                None => Some((Err(Status::unavailable("the server is shutting down")), None)),
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn cancel_load(
        &self,
        request: Request<pb::CancelLoadRequest>,
    ) -> Result<Response<pb::CancelLoadResponse>, Status> {
        let id = convert::model_id(&request.into_inner().model_id)?;
        let was_loading = self.manager.cancel(&id);
        tracing::info!(model_id = %id, was_loading, "cancel requested");
        Ok(Response::new(pb::CancelLoadResponse { was_loading }))
    }

    async fn unload_model(
        &self,
        request: Request<pb::UnloadModelRequest>,
    ) -> Result<Response<pb::UnloadModelResponse>, Status> {
        let request = request.into_inner();
        let id = convert::model_id(&request.model_id)?;
        let unloaded = self.manager.unload(&id, request.force).await.map_err(|e| status::from_manager(&e))?;
        Ok(Response::new(pb::UnloadModelResponse {
            was_loaded: unloaded.was_loaded,
            freed_bytes: unloaded.freed_bytes,
        }))
    }

    async fn get_model(&self, request: Request<pb::GetModelRequest>) -> Result<Response<pb::ModelStatus>, Status> {
        let id = convert::model_id(&request.into_inner().model_id)?;
        let status = self.manager.get(&id).map_err(|e| status::from_manager(&e))?;
        Ok(Response::new(convert::status(status)))
    }

    async fn list_models(
        &self,
        request: Request<pb::ListModelsRequest>,
    ) -> Result<Response<pb::ListModelsResponse>, Status> {
        let request = request.into_inner();
        let size = match request.page_size {
            0 => DEFAULT_PAGE_SIZE,
            n => n.min(MAX_PAGE_SIZE),
        };
        // The token is the last id of the previous page: any valid id is a place to start after.
        let after = match request.page_token.as_str() {
            "" => None,
            token => Some(convert::model_id(token).map_err(|s| {
                Status::invalid_argument(format!("page_token is not one ListModels gave: {}", s.message()))
            })?),
        };
        let (page, next) = self.manager.list_page(after.as_ref(), size as usize);
        Ok(Response::new(pb::ListModelsResponse {
            models: page.into_iter().map(convert::status).collect(),
            next_page_token: next.map(|id| id.as_str().to_owned()).unwrap_or_default(),
        }))
    }

    async fn get_resources(
        &self,
        _: Request<pb::GetResourcesRequest>,
    ) -> Result<Response<pb::GetResourcesResponse>, Status> {
        let devices = self.manager.resources().into_iter().map(convert::device).collect();
        Ok(Response::new(pb::GetResourcesResponse { devices }))
    }

    async fn list_tensors(
        &self,
        request: Request<pb::ListTensorsRequest>,
    ) -> Result<Response<pb::ListTensorsResponse>, Status> {
        let request = request.into_inner();
        let id = convert::model_id(&request.model_id)?;
        let tensors = self.manager.tensors(&id, request.with_checksums).await.map_err(|e| status::from_manager(&e))?;
        Ok(Response::new(pb::ListTensorsResponse { tensors: tensors.into_iter().map(convert::tensor).collect() }))
    }

    async fn get_model_files(
        &self,
        request: Request<pb::GetModelFilesRequest>,
    ) -> Result<Response<pb::GetModelFilesResponse>, Status> {
        let id = convert::model_id(&request.into_inner().model_id)?;
        let files = self.manager.files(&id).map_err(|e| status::from_manager(&e))?;
        Ok(Response::new(pb::GetModelFilesResponse {
            files: files.iter().map(|f| convert::model_file(f, false)).collect(),
        }))
    }

    async fn read_model_file(
        &self,
        request: Request<pb::ReadModelFileRequest>,
    ) -> Result<Response<Self::ReadModelFileStream>, Status> {
        let request = request.into_inner();
        let id = convert::model_id(&request.model_id)?;
        let file = self.manager.file(&id, &request.path).map_err(|e| status::from_manager(&e))?;
        // Each chunk is copied as it is sent: the stream holds the file's shared bytes, not a
        // copy of them all. An empty file is one empty chunk.
        let chunks = file.content.len().div_ceil(FILE_CHUNK_BYTES).max(1);
        let stream = stream::iter((0..chunks).map(move |i| {
            let start = i * FILE_CHUNK_BYTES;
            let end = (start + FILE_CHUNK_BYTES).min(file.content.len());
            Ok(pb::ModelFileChunk { offset: start as u64, data: file.content[start..end].to_vec() })
        }));
        Ok(Response::new(Box::pin(stream)))
    }
}
