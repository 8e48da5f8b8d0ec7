//! The facade (seed 004): [`ModelManager`] owns the state manager, the resource manager, the
//! pipeline manager and the loader service, and is all the server talks to.
//!
//! It assembles answers from the four (a status is the state plus the pipeline's facts), and owns
//! what spans them: unloading (cancel a load, or free a loaded model, or forget a failure),
//! watching, and shutdown.
//! It never speaks gRPC and never reads model files itself.

use std::{collections::VecDeque, sync::Arc};

use loader_service::{LoaderConfig, LoaderParts, LoaderService, NotUnloaded};
use pipeline_manager::{
    Attached, FileChanged, Lease, ModelFile, Pipeline, PipelineManager, ReadBackError, TensorInfo, TensorsError,
};
use resource_manager::{
    DeviceRequest, DeviceUsage, Layout, MemoryBudget, ResourceError, ResourceManager, TargetRequest,
};
use state_manager::{ModelState, StateEvent, StateManager, Transition};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

pub use loader_service::{
    DEFAULT_MAX_CONCURRENT_LOADS, DEFAULT_OBJECT_CONCURRENCY, EvictPolicy, HubConfig, HubFailure, InvalidRequest, Kind,
    LoadError, LoadOutcome, LoadRequest, LoadSubscription, LoadUpdate, ModelId, ObjectConfig, ObjectFailure, Revision,
    SourceConfig, TargetDtype,
};
pub use pipeline_manager;
pub use resource_manager;
pub use state_manager::{self, LoadFacts, ModelSource, ModelStatus};
pub use steps;

/// How many status and progress events a slow watcher may fall behind before it is given a
/// fresh snapshot.
pub const DEFAULT_EVENT_CAPACITY: usize = 4096;

/// The pinned staging pool of a GPU server unless configured: 24 buffers of 4 MiB, one for each
/// of 16 reader threads to fill and 8 for the copies in flight (the copying thread gives a buffer
/// back as soon as its copy completes), small enough to stay in the CPU's cache (see
/// `resource_manager::staging::BUFFER_BYTES`). Measured on H100 hosts, 8 GiB warm, interleaved
/// against 32 buffers in 5 runs on 4 hosts: never slower, 0.4–7.4% faster.
pub const DEFAULT_PINNED_POOL_BYTES: u64 = 96 << 20;

/// Everything the facade needs to build the four managers.
#[derive(Debug, Clone)]
pub struct ManagerConfig {
    pub loader: LoaderConfig,
    pub budget: MemoryBudget,
    /// Where loads that name no device go: one device, or several GPUs laid out as
    /// `default_placement` says.
    pub default_device: TargetRequest,
    pub default_placement: Option<Layout>,
    /// See [`DEFAULT_EVENT_CAPACITY`].
    pub event_capacity: usize,
    /// Overrides the CPU capacity read from the machine (tests).
    pub cpu_capacity: Option<u64>,
    /// Pinned host memory GPU loads read through (allocated only when there is a GPU).
    pub pinned_pool_bytes: u64,
}

impl Default for ManagerConfig {
    fn default() -> Self {
        Self {
            loader: LoaderConfig::default(),
            budget: MemoryBudget::default(),
            default_device: TargetRequest::Devices(vec![DeviceRequest::Cpu]),
            default_placement: None,
            event_capacity: DEFAULT_EVENT_CAPACITY,
            cpu_capacity: None,
            pinned_pool_bytes: DEFAULT_PINNED_POOL_BYTES,
        }
    }
}

/// Why a request to the facade failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ManagerError {
    #[error(transparent)]
    Load(Arc<LoadError>),
    #[error("model {model_id} is not loaded (it is {state})")]
    NotLoaded { model_id: String, state: ModelState },
    #[error(transparent)]
    ReadBack(Arc<ReadBackError>),
    /// A LOADED model has no small file at that path.
    #[error("model {model_id} has no file {path} (GetModelFiles lists its files)")]
    NoSuchFile { model_id: String, path: String },
    #[error("model {model_id} has {clients} attached clients; unload with force to close their connections")]
    Attached { model_id: String, clients: usize },
    /// A file the model's tensors were mapped from changed: it was unloaded and marked FAILED.
    #[error("model {model_id}: {source}; it was unloaded and marked FAILED: load it again")]
    Changed {
        model_id: String,
        #[source]
        source: FileChanged,
    },
}

impl ManagerError {
    /// A stable name per variant, for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Load(e) => e.kind().name(),
            Self::NotLoaded { .. } => "not_loaded",
            Self::NoSuchFile { .. } => "not_found",
            Self::ReadBack(_) => "read_back",
            Self::Attached { .. } => "attached",
            Self::Changed { .. } => "file_changed",
        }
    }
}

impl From<LoadError> for ManagerError {
    fn from(e: LoadError) -> Self {
        Self::Load(Arc::new(e))
    }
}

impl From<InvalidRequest> for ManagerError {
    fn from(e: InvalidRequest) -> Self {
        LoadError::from(e).into()
    }
}

impl From<ResourceError> for ManagerError {
    fn from(e: ResourceError) -> Self {
        LoadError::from(e).into()
    }
}

/// What an unload did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unloaded {
    pub was_loaded: bool,
    pub freed_bytes: u64,
}

/// The facade over the four managers.
pub struct ModelManager {
    state: Arc<StateManager>,
    resources: ResourceManager,
    pipelines: Arc<PipelineManager>,
    loader: Arc<LoaderService>,
    /// Cancelled at the end of shutdown (after the loads and the unloads): ends every watch
    /// stream. A child of the root the manager was given, like the loader's.
    shutdown: CancellationToken,
}

impl ModelManager {
    /// The managers and the loader, under `root`: the caller's one cancellation root, whose
    /// children are the loads' and the watch streams' (cancelling it stops them all at once;
    /// [`ModelManager::shutdown`] stops them in order).
    pub fn new(config: ManagerConfig, root: &CancellationToken) -> Result<Self, ManagerError> {
        // Unloads must give host memory back to the OS; this is process-wide and idempotent.
        resource_manager::host::configure_allocator();
        let state = Arc::new(StateManager::new(config.event_capacity));
        let mut resources = match config.cpu_capacity {
            Some(capacity) => ResourceManager::with_cpu_capacity(capacity, config.budget, DeviceRequest::Cpu),
            None => ResourceManager::new(config.budget, DeviceRequest::Cpu),
        }?;
        resources.set_default_target(&config.default_device, config.default_placement)?;
        resources.allocate_staging(config.pinned_pool_bytes)?;
        let pipelines = Arc::new(PipelineManager::new());
        let loader = LoaderService::new(LoaderParts {
            config: config.loader,
            state: state.clone(),
            resources: resources.clone(),
            pipelines: pipelines.clone(),
            cancel: root.child_token(),
        })?;
        Ok(Self { state, resources, pipelines, loader, shutdown: root.child_token() })
    }

    /// Starts or joins a load (see [`LoaderService::load`]).
    pub async fn load(&self, request: LoadRequest) -> Result<LoadSubscription, ManagerError> {
        Ok(self.loader.load(request).await?)
    }

    /// Cancels the model's load in flight; true if there was one.
    pub fn cancel(&self, model_id: &ModelId) -> bool {
        self.loader.cancel(model_id)
    }

    /// Frees the model: cancels its load if it is loading, drops its pipeline (tensors and
    /// accounting together) if it is loaded, forgets its failure if it failed. Idempotent. A
    /// model with attached clients is refused unless `force`, which closes their connections.
    pub async fn unload(&self, model_id: &ModelId, force: bool) -> Result<Unloaded, ManagerError> {
        let id = model_id;
        loop {
            if let Some(load) = self.loader.in_flight(model_id) {
                load.cancel();
                let _ = load.finished().await;
                // The load may have finished before it saw the cancel: look again.
                continue;
            }
            let state = match self.loader.unload_loaded(id, None, force) {
                Ok(freed_bytes) => return Ok(Unloaded { was_loaded: true, freed_bytes }),
                Err(NotUnloaded::Attached(Attached { clients })) => {
                    return Err(ManagerError::Attached { model_id: id.to_string(), clients });
                }
                Err(NotUnloaded::State(state)) => state,
            };
            match state {
                ModelState::Failed => {
                    // Another caller may clear it first; either way it ends UNLOADED.
                    let _ = self.state.apply(id, Transition::ClearFailure);
                    return Ok(Unloaded { was_loaded: false, freed_bytes: 0 });
                }
                ModelState::Unloaded => return Ok(Unloaded { was_loaded: false, freed_bytes: 0 }),
                // A load began between the two looks. It records LOADING and registers its
                // handle under one lock of the in-flight map, so the next look finds it.
                ModelState::Loading => continue,
                // Another unload is under way: wait for it, then look again.
                current => self.state.wait_while(id, current).await,
            }
        }
    }

    /// A lease on the LOADED model for a process attaching to it; `load` (a LoadModel request)
    /// loads it first where it is not resident, waiting for the load to end.
    pub async fn attach(&self, model_id: &ModelId, load: Option<LoadRequest>) -> Result<Lease, ManagerError> {
        if let Some(request) = load.filter(|_| self.pipelines.get(model_id).is_none()) {
            let mut loading = self.load(request).await?;
            while let Some(update) = loading.next().await {
                if let LoadUpdate::Done(outcome) = update {
                    outcome.map_err(ManagerError::Load)?;
                }
            }
        }
        if let Some(lease) = self.pipelines.attach(model_id) {
            // A client must never map bytes other than those loaded.
            if let Err(changed) = lease.pipeline().check_files() {
                drop(lease);
                return Err(self.lost(model_id, changed));
            }
            return Ok(lease);
        }
        // A model that exists nowhere is NOT_FOUND; one that merely is not loaded is not.
        self.get(model_id)?;
        Err(ManagerError::NotLoaded { model_id: model_id.to_string(), state: self.state.state(model_id) })
    }

    /// The model's status: tracked, or UNLOADED if it can be found; NOT_FOUND otherwise.
    pub fn get(&self, model_id: &ModelId) -> Result<ModelStatus, ManagerError> {
        if let Some(status) = self.state.get(model_id) {
            return Ok(self.with_clients(status));
        }
        if self.loader.exists(model_id) {
            return Ok(ModelStatus::unloaded(model_id));
        }
        Err(LoadError::not_found(model_id, "not in the model root or the HF cache, and never loaded").into())
    }

    /// Every model of the model root and every tracked model, sorted by id.
    pub fn list(&self) -> Vec<ModelStatus> {
        let mut all = self.state.all();
        for id in self.loader.local_models() {
            if !all.iter().any(|s| s.model_id == id) {
                all.push(ModelStatus::unloaded(&id));
            }
        }
        all.sort_by(|a, b| a.model_id.cmp(&b.model_id));
        all.into_iter().map(|s| self.with_clients(s)).collect()
    }

    /// Up to `size` models of [`Self::list`] after `after` (by id), and the last one's id if more
    /// follow (the next page's token).
    pub fn list_page(&self, after: Option<&ModelId>, size: usize) -> (Vec<ModelStatus>, Option<ModelId>) {
        let mut page: Vec<ModelStatus> =
            self.list().into_iter().filter(|s| after.is_none_or(|a| &s.model_id > a)).take(size + 1).collect();
        let more = page.len() > size;
        page.truncate(size);
        let next = if more { page.last().map(|s| s.model_id.clone()) } else { None };
        (page, next)
    }

    /// The status with its attached clients counted and its last use (the state manager knows
    /// neither leases nor uses).
    fn with_clients(&self, mut status: ModelStatus) -> ModelStatus {
        status.attached_clients = self.pipelines.clients(&status.model_id);
        status.last_used_unix_ms = self.pipelines.last_used_unix_ms(&status.model_id);
        status
    }

    pub fn resources(&self) -> Vec<DeviceUsage> {
        self.resources.usage()
    }

    /// The LOADED model's pipeline, used now (for eviction's least-recently-used order); NOT_FOUND
    /// for a model that exists nowhere, NotLoaded for one that merely is not loaded.
    fn loaded(&self, model_id: &ModelId) -> Result<Arc<Pipeline>, ManagerError> {
        let Some(pipeline) = self.pipelines.get(model_id) else {
            self.get(model_id)?;
            return Err(ManagerError::NotLoaded { model_id: model_id.to_string(), state: self.state.state(model_id) });
        };
        self.pipelines.touch(model_id);
        Ok(pipeline)
    }

    /// A LOADED model's small files (configs, tokenizer), sorted by path.
    pub fn files(&self, model_id: &ModelId) -> Result<Vec<Arc<ModelFile>>, ManagerError> {
        Ok(self.loaded(model_id)?.files.clone())
    }

    /// One small file of a LOADED model, by its path.
    pub fn file(&self, model_id: &ModelId, path: &str) -> Result<Arc<ModelFile>, ManagerError> {
        let pipeline = self.loaded(model_id)?;
        let file = pipeline.file(path).cloned();
        // Only the start of a long path is echoed: errors travel in a header (grpc-message).
        let shown = || path.chars().take(200).collect();
        file.ok_or_else(|| ManagerError::NoSuchFile { model_id: model_id.to_string(), path: shown() })
    }

    /// What is resident for a LOADED model; checksums are computed on a blocking thread.
    pub async fn tensors(&self, model_id: &ModelId, with_checksums: bool) -> Result<Vec<TensorInfo>, ManagerError> {
        // Reading its tensors is a use, for eviction's least-recently-used order.
        let pipeline = self.loaded(model_id)?;
        let infos = tokio::task::spawn_blocking(move || pipeline.tensor_infos(with_checksums))
            .await
            .map_err(|e| ManagerError::from(LoadError::internal(model_id, e.to_string())))?;
        match infos {
            Ok(infos) => Ok(infos),
            Err(TensorsError::ReadBack(e)) => Err(ManagerError::ReadBack(Arc::new(e))),
            Err(TensorsError::Changed(changed)) => Err(self.lost(model_id, changed)),
        }
    }

    /// A LOADED model whose file changed under it: freed as a forced unload would (its clients'
    /// connections closed) and marked FAILED, never served again as it is; the error to answer.
    fn lost(&self, model_id: &ModelId, changed: FileChanged) -> ManagerError {
        let error = ManagerError::Changed { model_id: model_id.to_string(), source: changed };
        // Another caller may have seen the change first: then it is on its way out already.
        let _ = self.loader.fail_loaded(model_id, error.to_string(), error.kind());
        error
    }

    /// A snapshot of one model (or of all, for `None`), then every later change.
    pub fn watch(self: &Arc<Self>, model_id: Option<ModelId>) -> WatchSubscription {
        let rx = self.state.subscribe();
        let pending = self.snapshot(model_id.as_ref()).into();
        WatchSubscription { manager: self.clone(), filter: model_id, rx, pending }
    }

    fn snapshot(&self, model_id: Option<&ModelId>) -> Vec<StateEvent> {
        let statuses = match model_id {
            Some(id) => vec![self.state.get(id).map_or_else(|| ModelStatus::unloaded(id), |s| self.with_clients(s))],
            None => self.list(),
        };
        statuses.into_iter().map(StateEvent::Status).collect()
    }

    /// Refuses new loads, cancels those in flight and waits for them, drops every model, and
    /// ends every watch stream.
    pub async fn shutdown(&self) {
        self.loader.shutdown().await;
        for status in self.state.all() {
            if status.state == ModelState::Loaded {
                let _ = self.unload(&status.model_id, true).await;
            }
        }
        self.shutdown.cancel();
    }
}

/// The events one WatchModels caller receives.
pub struct WatchSubscription {
    manager: Arc<ModelManager>,
    filter: Option<ModelId>,
    rx: broadcast::Receiver<StateEvent>,
    pending: VecDeque<StateEvent>,
}

impl WatchSubscription {
    /// The next event; a watcher that fell behind gets a fresh snapshot instead of a gap.
    /// `None` once the server shuts down.
    pub async fn next(&mut self) -> Option<StateEvent> {
        loop {
            if let Some(event) = self.pending.pop_front() {
                return Some(event);
            }
            let received = tokio::select! {
                received = self.rx.recv() => received,
                () = self.manager.shutdown.cancelled() => return None,
            };
            match received {
                // A status as GetModel gives it: with its attached clients and last use.
                Ok(StateEvent::Status(status)) if self.wanted_id(status.model_id.as_str()) => {
                    return Some(StateEvent::Status(self.manager.with_clients(status)));
                }
                Ok(event) if self.wanted(&event) => return Some(event),
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    tracing::debug!(missed, "watcher fell behind; sending a fresh snapshot");
                    self.rx = self.rx.resubscribe();
                    self.pending = self.manager.snapshot(self.filter.as_ref()).into();
                }
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }

    fn wanted(&self, event: &StateEvent) -> bool {
        self.wanted_id(match event {
            StateEvent::Status(s) => s.model_id.as_str(),
            StateEvent::Progress(p) => p.model_id.as_str(),
        })
    }

    fn wanted_id(&self, id: &str) -> bool {
        self.filter.as_ref().is_none_or(|filter| id == filter.as_str())
    }
}
