//! Loads models: runs the eight steps of `steps` for each load, from finding the files to
//! registering the finished pipeline, with one load per model at a time (single flight), loads
//! independent of the callers that asked for them, and cancellation between chunks.
//!
//! Loads wait in a queue for one of `max_concurrent_loads` slots, and reserve their bytes before
//! reading any; with `--evict lru` a load that does not fit unloads the least recently used
//! models first ([`EvictPolicy`]), which is why unloading a loaded model lives here too.
//!
//! It only orchestrates: where files come from is a [`model_source::Source`], what they hold and
//! how they are read is `weights`, where the bytes land is a [`weights::Placement`] chosen per load
//! by [`Placements`]. Collaborators: `state-manager` (every state change goes through its table),
//! `resource-manager` (the budget is reserved before a byte is read), `pipeline-manager` (where a
//! finished load is stored). This crate never reads a file itself and never speaks gRPC.

mod error;
mod handle;
mod load;
mod placements;
mod queue;
mod request;
mod room;

use std::sync::Arc;

use dashmap::{DashMap, mapref::entry::Entry};
pub use model_source::{
    self, DEFAULT_HUB_STALL_TIMEOUT, DEFAULT_OBJECT_CONCURRENCY, HubConfig, HubFailure, ObjectConfig, ObjectFailure,
    SourceConfig, Sources,
};
use pipeline_manager::{Pipeline, PipelineManager};
use resource_manager::ResourceManager;
use state_manager::{InvalidTransition, ModelState, StateManager, Transition};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::Instrument;
pub use weights::{self, CHUNK_BYTES, Layout, MAX_HEADER_BYTES};

pub use crate::{
    error::{Failure, Kind, LoadError},
    handle::{LoadHandle, LoadOutcome, LoadSubscription, LoadUpdate},
    placements::{DevicePlacements, Placements, placement_over_devices},
    request::{DEFAULT_REVISION, InvalidRequest, LoadRequest, ModelId, Revision, TargetDtype},
    room::EvictPolicy,
};
use crate::{handle::Wants, queue::LoadQueue};

/// A new load's two spans. For traces (target [`steps::TRACES`]): a child of the caller's span
/// (the LoadModel call, whose trace it continues) with the load's facts, its steps' spans under it
/// ([`steps::step_span`]). For logs: a child of that one carrying only `model_id` and `step`
/// (recorded as the load moves on, so every line says where it was); the load runs in it.
fn load_spans(id: &ModelId, wants: &Wants) -> (tracing::Span, tracing::Span) {
    use tracing::field::Empty;
    let dtype = wants.dtype.map_or_else(|| "as stored".to_owned(), |d| d.to_string());
    let trace = tracing::info_span!(
        target: steps::TRACES,
        "load",
        model_id = %id,
        device = %wants.target,
        dtype,
        source = Empty,
        outcome = Empty,
        bytes = Empty,
        error.kind = Empty,
        otel.status_code = Empty,
        otel.status_description = Empty,
    );
    // With no trace layer `trace` is disabled: the log span then takes the current span as parent,
    // as it would without traces.
    let parent = trace.id().or_else(|| tracing::Span::current().id());
    let log = tracing::info_span!(parent: parent, "load", model_id = %id, step = Empty);
    (trace, log)
}

/// Why [`LoaderService::unload_loaded`] unloaded nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotUnloaded {
    /// The model is not LOADED: the state it is in.
    State(ModelState),
    /// Clients are attached and the unload was not forced.
    Attached(pipeline_manager::Attached),
}

/// How many loads run at once unless configured.
pub const DEFAULT_MAX_CONCURRENT_LOADS: usize = 2;

/// How loads are done.
#[derive(Debug, Clone)]
pub struct LoaderConfig {
    pub sources: SourceConfig,
    /// Converts float tensors to this dtype when a request names none.
    pub default_dtype: Option<TargetDtype>,
    /// Loads past step 1 at once; later ones wait in a queue.
    pub max_concurrent_loads: usize,
    /// What a load that does not fit in the budget does.
    pub evict: EvictPolicy,
    /// Threads reading one load's tensors.
    pub read_threads: usize,
    /// Place loads in memory other processes can attach to: on the host the files mapped or a
    /// sealed memfd, on a GPU one exportable CUDA VMM allocation.
    pub exportable: bool,
}

impl Default for LoaderConfig {
    fn default() -> Self {
        Self {
            sources: SourceConfig::default(),
            default_dtype: None,
            max_concurrent_loads: DEFAULT_MAX_CONCURRENT_LOADS,
            evict: EvictPolicy::None,
            read_threads: std::thread::available_parallelism().map_or(2, |n| n.get()),
            exportable: false,
        }
    }
}

/// What a loader works with: its settings, the managers it shares, and its cancellation (a child
/// of the server's one root: cancelling it cancels every load and refuses new ones).
pub struct LoaderParts {
    pub config: LoaderConfig,
    pub state: Arc<StateManager>,
    pub resources: ResourceManager,
    pub pipelines: Arc<PipelineManager>,
    pub cancel: CancellationToken,
}

/// Where loads find their files and where their bytes land: the configured sources and the
/// devices' placements unless a caller brings its own.
pub struct Seams {
    pub sources: Sources,
    pub placements: Arc<dyn Placements>,
}

/// Runs loads. Shared as `Arc<LoaderService>`: loads are spawned tasks that outlive their callers.
pub struct LoaderService {
    config: LoaderConfig,
    state: Arc<StateManager>,
    resources: ResourceManager,
    pipelines: Arc<PipelineManager>,
    sources: Sources,
    placements: Arc<dyn Placements>,
    /// The load in flight per model. Its entry lock is taken before the state manager's, never
    /// after, and makes "join or start" one atomic step (single flight).
    inflight: DashMap<ModelId, Arc<LoadHandle>>,
    /// Bounds the loads past INIT; later ones wait in line (cancellable), told their place.
    queue: Arc<LoadQueue>,
    /// Parent of every load's token, a child of the server's one root; cancelled on shutdown.
    root: CancellationToken,
    /// Every spawned load, so shutdown can wait for them to end.
    tracker: TaskTracker,
}

impl LoaderService {
    /// A loader reading from the configured sources onto the resources' devices.
    pub fn new(parts: LoaderParts) -> Result<Arc<Self>, LoadError> {
        let sources = Sources::from_config(&parts.config.sources).map_err(LoadError::Config)?;
        let placements = Arc::new(DevicePlacements::new(parts.resources.clone(), parts.config.exportable));
        Ok(Self::with_seams(parts, Seams { sources, placements }))
    }

    /// A loader with these sources and placements (`config.sources` is not read).
    pub fn with_seams(parts: LoaderParts, seams: Seams) -> Arc<Self> {
        let LoaderParts { config, state, resources, pipelines, cancel } = parts;
        Arc::new(Self {
            queue: LoadQueue::new(config.max_concurrent_loads),
            config,
            state,
            resources,
            pipelines,
            sources: seams.sources,
            placements: seams.placements,
            inflight: DashMap::new(),
            root: cancel,
            tracker: TaskTracker::new(),
        })
    }

    /// Starts a load, or joins the one in flight, or answers "already loaded"; waits for an
    /// unload in progress first. Errors here are about the request itself (nothing began).
    pub async fn load(self: &Arc<Self>, request: LoadRequest) -> Result<LoadSubscription, LoadError> {
        let target = self.resources.resolve_target(request.device.as_ref(), request.placement)?;
        if target.is_single() && !request.device_map.is_empty() {
            return Err(weights::device_map::DeviceMapError::OneDevice { device: target.first() }.into());
        }
        let id = request.model_id.clone();
        let wants = Wants {
            target,
            device_map: request.device_map.clone(),
            dtype: request.dtype.or(self.config.default_dtype),
        };
        loop {
            if self.is_shutting_down() {
                return Err(LoadError::ShuttingDown);
            }
            let wait_for = match self.inflight.entry(id.clone()) {
                Entry::Occupied(load) => {
                    let load = load.get();
                    let theirs = &load.wants;
                    // A map asked for must be the one in flight (its balanced split is not known yet).
                    let same_devices = theirs.target == wants.target
                        && (wants.device_map.is_empty() || theirs.device_map == wants.device_map);
                    conflict(&request, &wants, same_devices, theirs.dtype == wants.dtype, || {
                        let dtype = theirs.dtype.map_or("as stored".into(), |d| d.to_string());
                        format!("loading on {}{} ({dtype})", theirs.target, map_text(&theirs.device_map))
                    })?;
                    // On the caller's span (its RPC) in traces: the load's own span is the first
                    // caller's.
                    tracing::info!(target: steps::TRACES, model_id = %id, "joined the load in flight");
                    return Ok(load.subscribe());
                }
                Entry::Vacant(slot) => {
                    match self.state.apply(&id, Transition::StartLoad { target: wants.target.clone() }) {
                        Ok(_) => {
                            let (trace, span) = load_spans(&id, &wants);
                            let target = wants.target.clone();
                            let handle = Arc::new(LoadHandle::new(
                                id.clone(),
                                wants,
                                self.root.child_token(),
                                self.state.clone(),
                                trace,
                            ));
                            let subscription = handle.subscribe();
                            slot.insert(handle.clone());
                            self.tracker.spawn(self.clone().run(handle, request.clone(), target).instrument(span));
                            return Ok(subscription);
                        }
                        Err(InvalidTransition { current: ModelState::Loaded, .. }) => {
                            if let Some(resident) = self.pipelines.get(&id) {
                                let same_dtype = wants.dtype.is_none_or(|t| holds_floats_as(&resident, t));
                                let same_devices =
                                    resident.target == wants.target && placed_as(&resident, &wants.device_map);
                                conflict(&request, &wants, same_devices, same_dtype, || {
                                    format!("loaded on {} as {}", resident.target, resident.dtype_summary())
                                })?;
                            }
                            // Asked for again: a use, for eviction's least-recently-used order.
                            self.pipelines.touch(&id);
                            tracing::info!(target: steps::TRACES, model_id = %id, "already loaded");
                            return Ok(LoadSubscription::already_loaded(&id));
                        }
                        // Unloading (or a load that is just ending): wait for the state to change.
                        Err(InvalidTransition { current, .. }) => current,
                    }
                }
            };
            self.state.wait_while(&id, wait_for).await;
        }
    }

    /// Unloads a LOADED model: UNLOADING, its pipeline out of the store, its memory back (as soon
    /// as no reader holds it), UNLOADED. `reason` is shown in its status for the server's own
    /// unloads (evictions). A model with attached clients is refused unless `force`, which
    /// revokes their leases. Returns the bytes freed, or why nothing was unloaded.
    pub fn unload_loaded(&self, model_id: &ModelId, reason: Option<String>, force: bool) -> Result<u64, NotUnloaded> {
        self.take_out(model_id, reason, force, Transition::UnloadFinished)
    }

    /// Frees a LOADED model whose resident bytes were lost (a file it is mapped from changed), as
    /// a forced unload does (its clients' leases revoked), and marks it FAILED with `reason` and
    /// its stable `kind`.
    pub fn fail_loaded(&self, model_id: &ModelId, reason: String, kind: &'static str) -> Result<u64, NotUnloaded> {
        let end = Transition::UnloadedLost { reason: reason.clone(), kind };
        let freed = self.take_out(model_id, Some(reason.clone()), true, end)?;
        tracing::error!(%model_id, reason, "a loaded model's file changed: unloaded and marked FAILED");
        Ok(freed)
    }

    /// An unload ending with `end` (UNLOADED, or FAILED for a lost model).
    fn take_out(
        &self,
        model_id: &ModelId,
        reason: Option<String>,
        force: bool,
        end: Transition,
    ) -> Result<u64, NotUnloaded> {
        // Closed to new leases first, so no client attaches to it on its way out.
        self.pipelines.close(model_id, force).map_err(NotUnloaded::Attached)?;
        self.state.apply(model_id, Transition::StartUnload { reason }).map_err(|e| NotUnloaded::State(e.current))?;
        let freed_bytes = self.pipelines.remove(model_id).map_or(0, |pipeline| {
            pipeline.allocations.leave();
            // What its devices' books get back (on the CPU, with the tensors' metadata).
            pipeline.target.devices().iter().map(|&d| pipeline.allocations.bytes(d)).sum()
        });
        // Only this caller can end the UNLOADING it began: a refusal is a bug, not a race.
        if let Err(e) = self.state.apply(model_id, end) {
            tracing::error!(cause = %e, "state transition refused during an unload");
        }
        tracing::info!(%model_id, freed_bytes, "model unloaded");
        Ok(freed_bytes)
    }

    /// Cancels the load of `model_id` if one is in flight; true if there was one.
    pub fn cancel(&self, model_id: &ModelId) -> bool {
        self.in_flight(model_id).inspect(|h| h.cancel()).is_some()
    }

    pub fn in_flight(&self, model_id: &ModelId) -> Option<Arc<LoadHandle>> {
        self.inflight.get(model_id).map(|h| h.clone())
    }

    /// Whether a source has the model at its default revision without asking the network.
    pub fn exists(&self, model_id: &ModelId) -> bool {
        self.sources.has(model_id, &Revision::default())
    }

    /// The models the sources list (the model root's folders).
    pub fn local_models(&self) -> Vec<ModelId> {
        self.sources.list()
    }

    fn is_shutting_down(&self) -> bool {
        self.root.is_cancelled()
    }

    /// Refuses new loads, cancels those in flight and waits for them to end.
    pub async fn shutdown(&self) {
        self.root.cancel();
        self.tracker.close();
        self.tracker.wait().await;
    }
}

/// Refuses a request that explicitly asks for another device or dtype than the model resident or
/// loading (`what`: how it is), rather than answer OK with something else than asked. A request
/// that names neither takes the model as it is.
fn conflict(
    request: &LoadRequest,
    wants: &Wants,
    same_device: bool,
    same_dtype: bool,
    what: impl FnOnce() -> String,
) -> Result<(), LoadError> {
    let other_device = request.device.is_some() && !same_device;
    let other_dtype = request.dtype.is_some() && !same_dtype;
    if !other_device && !other_dtype {
        return Ok(());
    }
    let mut asked = Vec::new();
    if other_device {
        asked.push(format!("{}{}", wants.target, map_text(&wants.device_map)));
    }
    if let Some(dtype) = request.dtype.filter(|_| other_dtype) {
        asked.push(dtype.to_string());
    }
    Err(LoadError::Conflict { model_id: request.model_id.clone(), current: what(), asked: asked.join(" ") })
}

/// ` with map PREFIX=DEVICE,...` for an explicit device map; nothing for none.
fn map_text(map: &[(String, resource_manager::DeviceId)]) -> String {
    if map.is_empty() {
        return String::new();
    }
    let entries = map.iter().map(|(prefix, device)| format!("{prefix}={device}")).collect::<Vec<_>>();
    format!(" with map {}", entries.join(","))
}

/// Whether every tensor of `pipeline` is on the device `map` puts it on (any placement, for an
/// empty map).
fn placed_as(pipeline: &Pipeline, map: &[(String, resource_manager::DeviceId)]) -> bool {
    map.is_empty()
        || pipeline.tensors().all(|(component, t)| {
            let name = pipeline_manager::tensor_name(&component.name, &t.name);
            weights::device_map::device_for(map, &name) == Some(pipeline.device_of(t))
        })
}

/// Whether every float tensor of `pipeline` (those a target dtype converts) is resident as `target`.
fn holds_floats_as(pipeline: &Pipeline, target: TargetDtype) -> bool {
    let target = target.candle();
    pipeline.tensors().map(|(_, t)| t.data.dtype()).filter(|&d| weights::header::converts(d)).all(|d| d == target)
}
