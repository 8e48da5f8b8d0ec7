//! Loads models: runs the eight steps of `steps` for each load, from finding the files to
//! registering the finished pipeline, with one load per model at a time (single flight), loads
//! independent of the callers that asked for them, and cancellation between chunks.
//!
//! Loads wait in a queue for one of `max_concurrent_loads` slots, and reserve their bytes before
//! reading any; with `--evict lru` a load that does not fit unloads the least recently used
//! models first ([`EvictPolicy`]), which is why unloading a loaded model lives here too.
//!
//! Collaborators: `state-manager` (every state change goes through its table),
//! `resource-manager` (the budget is reserved before a byte is read), `pipeline-manager` (where a
//! finished load is stored). This crate never speaks gRPC.

mod error;
mod header;
mod hub;
mod plan;
mod queue;
mod read;
mod request;
mod room;
mod source;
// The GPU path's reader; its scheduling is tested in every build.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
mod staged;
mod weights;

use std::{
    collections::{BTreeMap, VecDeque},
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicBool, Ordering},
    },
};

use dashmap::{DashMap, mapref::entry::Entry};
use pipeline_manager::{Component, Pipeline, PipelineManager, ResidentTensor};
use resource_manager::{DeviceId, ModelAllocation, Reservation, ResourceManager, host, sync};
use state_manager::{InvalidTransition, LoadFacts, ModelSource, ModelState, StateManager, Transition};
use steps::{BYTE_PROGRESS_INTERVAL, ByteProgress, ModelLoadProgress, ModelLoadStep, ProgressSink, emit_step};
use tokio::sync::broadcast;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::Instrument;

pub use crate::{
    error::{HubFailure, LoadError},
    header::MAX_HEADER_BYTES,
    hub::{DEFAULT_HUB_STALL_TIMEOUT, HubConfig},
    plan::Layout,
    read::CHUNK_BYTES,
    request::{DEFAULT_REVISION, InvalidRequest, LoadRequest, ModelId, Revision, TargetDtype},
    room::EvictPolicy,
    source::SourceConfig,
};
use crate::{hub::Hub, queue::LoadQueue};

/// How many loads run at once unless configured.
pub const DEFAULT_MAX_CONCURRENT_LOADS: usize = 2;
/// How many progress messages a LoadModel caller may fall behind before it is resynchronised.
const LOAD_STREAM_CAPACITY: usize = 256;

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
}

impl Default for LoaderConfig {
    fn default() -> Self {
        Self {
            sources: SourceConfig::default(),
            default_dtype: None,
            max_concurrent_loads: DEFAULT_MAX_CONCURRENT_LOADS,
            evict: EvictPolicy::None,
            read_threads: std::thread::available_parallelism().map_or(2, |n| n.get()),
        }
    }
}

/// How a load ended, shared by every stream of it.
pub type LoadOutcome = Result<(), Arc<LoadError>>;

/// What a LoadModel caller receives.
#[derive(Debug, Clone)]
pub enum LoadUpdate {
    Progress(ModelLoadProgress),
    /// The last update of a stream.
    Done(LoadOutcome),
}

/// One load in flight: its cancellation, its latest message, and the fan-out to its callers.
pub struct LoadHandle {
    model_id: ModelId,
    /// A child of the service's root token: shutdown cancels every load.
    cancel: CancellationToken,
    state: Arc<StateManager>,
    /// The latest message and the outcome are read and the broadcast subscribed under this one
    /// lock, so a joiner gets the latest message and then every later one, never a gap.
    stream: Mutex<LoadStream>,
    /// The memory of a load that failed or was cancelled holding tensors, freed by `run` once
    /// the load's streams have ended.
    set_aside: Mutex<Option<SetAside>>,
}

/// What a failed load still holds: the tensors it had read, then the bytes they were booked
/// under (dropped in this order, so the books show the memory until it is back).
struct SetAside {
    _tensors: Vec<read::ReadTensor>,
    booked: ModelAllocation,
}

impl Drop for SetAside {
    // Runs before the fields drop: this thread must be able to free the tensors (see
    // `ModelAllocation::prepare_free`).
    fn drop(&mut self) {
        self.booked.prepare_free();
    }
}

/// The memory a load holds from its reservation to FINALIZE: the reservation and the tensors read
/// so far. When the load fails, dropping this does not free them on the spot: freeing a GB of
/// pages takes the kernel tens of milliseconds, which a cancel should not wait for. It books the
/// bytes as leaving and sets both aside on the handle, and `run` frees them after the load's
/// streams have ended.
struct Held<'h> {
    handle: &'h LoadHandle,
    tensors: Vec<read::ReadTensor>,
    reservation: Option<Reservation>,
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        if let Some(reservation) = self.reservation.take() {
            let aside = SetAside { _tensors: std::mem::take(&mut self.tensors), booked: reservation.into_leaving() };
            *sync::lock(&self.handle.set_aside) = Some(aside);
        }
    }
}

struct LoadStream {
    /// The step the load is in and since when (the step-duration histogram).
    step_since: Option<(ModelLoadStep, std::time::Instant)>,
    latest: Option<ModelLoadProgress>,
    outcome: Option<LoadOutcome>,
    tx: broadcast::Sender<LoadUpdate>,
}

impl LoadHandle {
    fn new(model_id: ModelId, cancel: CancellationToken, state: Arc<StateManager>) -> Self {
        let (tx, _) = broadcast::channel(LOAD_STREAM_CAPACITY);
        Self {
            model_id,
            cancel,
            state,
            stream: Mutex::new(LoadStream { step_since: None, latest: None, outcome: None, tx }),
            set_aside: Mutex::new(None),
        }
    }

    fn stream(&self) -> MutexGuard<'_, LoadStream> {
        // Each update under this lock is a single assignment or send: a panic elsewhere cannot
        // leave it half-done, so a poisoned lock is still consistent.
        sync::lock(&self.stream)
    }

    pub fn model_id(&self) -> &ModelId {
        &self.model_id
    }

    /// Asks the load to stop at its next check (between chunks).
    pub fn cancel(&self) {
        self.cancel.cancel();
    }

    /// A stream of this load: the latest message first, then every later one, then the outcome.
    pub fn subscribe(self: &Arc<Self>) -> LoadSubscription {
        let stream = self.stream();
        let mut pending = VecDeque::new();
        pending.extend(stream.latest.clone().map(LoadUpdate::Progress));
        pending.extend(stream.outcome.clone().map(LoadUpdate::Done));
        let rx = stream.outcome.is_none().then(|| stream.tx.subscribe());
        drop(stream);
        LoadSubscription { pending, rx, handle: Some(self.clone()), finished: false }
    }

    /// Waits for the load to end.
    pub async fn finished(self: &Arc<Self>) -> LoadOutcome {
        let mut sub = self.subscribe();
        while let Some(update) = sub.next().await {
            if let LoadUpdate::Done(outcome) = update {
                return outcome;
            }
        }
        Err(Arc::new(LoadError::Internal { model_id: self.model_id.to_string(), reason: "load vanished".into() }))
    }

    /// A message of the current step with a `detail`; not logged at info (the step was).
    fn note(&self, step: ModelLoadStep, detail: String) {
        self.send(ModelLoadProgress::new(self.model_id.as_str(), step).with_detail(detail));
    }

    fn finish(&self, outcome: LoadOutcome) {
        let mut stream = self.stream();
        if let Some((step, since)) = stream.step_since.take() {
            record_step(step, since);
        }
        stream.outcome = Some(outcome.clone());
        let _ = stream.tx.send(LoadUpdate::Done(outcome));
    }
}

/// Metrics (the `metrics` facade; the server exports them): the time a load spent in a step.
fn record_step(step: ModelLoadStep, since: std::time::Instant) {
    let step: &'static str = step.into();
    metrics::histogram!("model_loader_step_duration_seconds", "step" => step).record(since.elapsed().as_secs_f64());
}

impl ProgressSink for LoadHandle {
    fn send(&self, progress: ModelLoadProgress) {
        let mut stream = self.stream();
        match stream.step_since {
            Some((step, _)) if step == progress.step => {}
            previous => {
                if let Some((step, since)) = previous {
                    record_step(step, since);
                }
                stream.step_since = Some((progress.step, std::time::Instant::now()));
            }
        }
        stream.latest = Some(progress.clone());
        // No receiver is fine: the load does not depend on anyone listening.
        let _ = stream.tx.send(LoadUpdate::Progress(progress.clone()));
        drop(stream);
        self.state.record_progress(progress);
    }
}

/// The updates of one load as one caller sees them.
pub struct LoadSubscription {
    pending: VecDeque<LoadUpdate>,
    rx: Option<broadcast::Receiver<LoadUpdate>>,
    handle: Option<Arc<LoadHandle>>,
    finished: bool,
}

impl LoadSubscription {
    /// A stream of one message: the model is already loaded.
    fn already_loaded(model_id: &ModelId) -> Self {
        let done = ModelLoadProgress::new(model_id.as_str(), ModelLoadStep::Finalize).with_detail("already loaded");
        Self {
            pending: VecDeque::from([LoadUpdate::Progress(done), LoadUpdate::Done(Ok(()))]),
            rx: None,
            handle: None,
            finished: false,
        }
    }

    /// The next update; `None` after `Done`.
    pub async fn next(&mut self) -> Option<LoadUpdate> {
        if self.finished {
            return None;
        }
        let update = match self.pending.pop_front() {
            Some(update) => Some(update),
            None => self.receive().await,
        };
        if matches!(update, Some(LoadUpdate::Done(_)) | None) {
            self.finished = true;
        }
        update
    }

    async fn receive(&mut self) -> Option<LoadUpdate> {
        let handle = self.handle.clone()?;
        loop {
            let rx = self.rx.as_mut()?;
            match rx.recv().await {
                Ok(update) => return Some(update),
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    // Fell behind: start again from the latest message (progress is a level, not a
                    // log; the outcome is never lost because it is kept in the handle).
                    let fresh = handle.subscribe();
                    self.pending = fresh.pending;
                    self.rx = fresh.rx;
                    if let Some(update) = self.pending.pop_front() {
                        return Some(update);
                    }
                }
                Err(broadcast::error::RecvError::Closed) => {
                    return handle.stream().outcome.clone().map(LoadUpdate::Done);
                }
            }
        }
    }
}

/// Runs loads. Shared as `Arc<LoaderService>`: loads are spawned tasks that outlive their callers.
pub struct LoaderService {
    config: LoaderConfig,
    state: Arc<StateManager>,
    resources: ResourceManager,
    pipelines: Arc<PipelineManager>,
    /// The load in flight per model. Its entry lock is taken before the state manager's, never
    /// after, and makes "join or start" one atomic step (single flight).
    inflight: DashMap<String, Arc<LoadHandle>>,
    /// Bounds the loads past INIT; later ones wait in line (cancellable), told their place.
    queue: Arc<LoadQueue>,
    /// Parent of every load's token; cancelled on shutdown.
    root: CancellationToken,
    /// Every spawned load, so shutdown can wait for them to end.
    tracker: TaskTracker,
    shutting_down: AtomicBool,
    /// The hub, unless offline or without an HF cache to download into.
    hub: Option<Arc<Hub>>,
}

/// A hub and what must be downloaded from it for one load.
type Downloads = (Arc<Hub>, hub::RemoteSnapshot, Vec<hub::RemoteFile>);

/// An upper bound of a download's resident bytes from the hub's file sizes (a safetensors file is
/// its tensors plus a small header), before any header is read: floats converted to a wider
/// dtype may double (from 16 bits to F32).
fn estimate_resident_bytes(files: &[hub::RemoteFile], target: Option<TargetDtype>) -> u64 {
    let weights: u64 = files.iter().filter(|f| f.path.ends_with(".safetensors")).map(|f| f.size).sum();
    match target {
        Some(TargetDtype::F32) => weights * 2,
        _ => weights,
    }
}

impl LoaderService {
    pub fn new(
        config: LoaderConfig,
        state: Arc<StateManager>,
        resources: ResourceManager,
        pipelines: Arc<PipelineManager>,
    ) -> Result<Arc<Self>, LoadError> {
        let queue = LoadQueue::new(config.max_concurrent_loads);
        let hub = match (&config.sources.hf_cache, config.sources.offline) {
            (Some(cache), false) => Some(Arc::new(Hub::new(&config.sources.hub, cache).map_err(|reason| {
                LoadError::Internal { model_id: String::new(), reason: format!("configuring the hub client: {reason}") }
            })?)),
            _ => None,
        };
        Ok(Arc::new(Self {
            config,
            state,
            resources,
            pipelines,
            inflight: DashMap::new(),
            queue,
            root: CancellationToken::new(),
            tracker: TaskTracker::new(),
            shutting_down: AtomicBool::new(false),
            hub,
        }))
    }

    /// Starts a load, or joins the one in flight, or answers "already loaded"; waits for an
    /// unload in progress first. Errors here are about the request itself (nothing began).
    pub async fn load(self: &Arc<Self>, request: LoadRequest) -> Result<LoadSubscription, LoadError> {
        let device = self.resources.resolve(request.device)?;
        let id = request.model_id.clone();
        loop {
            if self.is_shutting_down() {
                return Err(LoadError::ShuttingDown);
            }
            let wait_for = match self.inflight.entry(id.to_string()) {
                Entry::Occupied(load) => return Ok(load.get().subscribe()),
                Entry::Vacant(slot) => {
                    match self.state.apply(id.as_str(), Transition::StartLoad { device: device.to_string() }) {
                        Ok(_) => {
                            let handle =
                                Arc::new(LoadHandle::new(id.clone(), self.root.child_token(), self.state.clone()));
                            let subscription = handle.subscribe();
                            slot.insert(handle.clone());
                            // `step` is recorded as the load moves on, so every line of a load says where it was.
                            let span = tracing::info_span!("load", model_id = %id, step = tracing::field::Empty);
                            self.tracker.spawn(self.clone().run(handle, request.clone(), device).instrument(span));
                            return Ok(subscription);
                        }
                        Err(InvalidTransition { current: ModelState::Loaded, .. }) => {
                            // Asked for again: a use, for eviction's least-recently-used order.
                            self.pipelines.touch(id.as_str());
                            return Ok(LoadSubscription::already_loaded(&id));
                        }
                        // Unloading (or a load that is just ending): wait for the state to change.
                        Err(InvalidTransition { current, .. }) => current,
                    }
                }
            };
            self.state.wait_while(id.as_str(), wait_for).await;
        }
    }

    /// Unloads a LOADED model: UNLOADING, its pipeline out of the store, its memory back (as soon
    /// as no reader holds it), UNLOADED. `reason` is shown in its status for the server's own
    /// unloads (evictions). Returns the bytes freed, or the state the model is in if not LOADED.
    pub fn unload_loaded(&self, model_id: &str, reason: Option<String>) -> Result<u64, ModelState> {
        self.state.apply(model_id, Transition::StartUnload { reason }).map_err(|e| e.current)?;
        let freed_bytes = self.pipelines.remove(model_id).map_or(0, |pipeline| {
            pipeline.allocation.leave();
            pipeline.weight_bytes()
        });
        // Only this caller can end the UNLOADING it began: a refusal is a bug, not a race.
        if let Err(e) = self.state.apply(model_id, Transition::UnloadFinished) {
            tracing::error!(cause = %e, "state transition refused during an unload");
        }
        tracing::info!(model_id, freed_bytes, "model unloaded");
        Ok(freed_bytes)
    }

    /// Cancels the load of `model_id` if one is in flight; true if there was one.
    pub fn cancel(&self, model_id: &ModelId) -> bool {
        self.in_flight(model_id).inspect(|h| h.cancel()).is_some()
    }

    pub fn in_flight(&self, model_id: &ModelId) -> Option<Arc<LoadHandle>> {
        self.inflight.get(model_id.as_str()).map(|h| h.clone())
    }

    /// Whether the model can be found (model root or HF cache) at its default revision.
    pub fn exists(&self, model_id: &ModelId) -> bool {
        source::locate(&self.config.sources, model_id, &Revision::default()).is_ok()
    }

    /// The models in the model root.
    pub fn local_models(&self) -> Vec<ModelId> {
        source::local_models(&self.config.sources)
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Acquire)
    }

    /// Refuses new loads, cancels those in flight and waits for them to end.
    pub async fn shutdown(&self) {
        self.shutting_down.store(true, Ordering::Release);
        self.root.cancel();
        self.tracker.close();
        self.tracker.wait().await;
    }

    /// The spawned task of one load: runs the steps, records the outcome, ends every stream.
    async fn run(self: Arc<Self>, handle: Arc<LoadHandle>, request: LoadRequest, device: DeviceId) {
        let id = request.model_id.clone();
        let started = std::time::Instant::now();
        metrics::counter!("model_loader_loads_started_total").increment(1);
        // The queue slot is held until the end state is recorded, so the next load in line never
        // starts while this one still shows LOADING.
        let mut slot = None;
        let mut labels = ("succeeded", "none");
        let (transition, outcome) = match self.steps(&handle, request, device, &mut slot).await {
            Ok(facts) => {
                metrics::counter!("model_loader_loaded_bytes_total").increment(facts.weight_bytes);
                (Transition::LoadSucceeded(facts), Ok(()))
            }
            Err(e) => {
                let e = match e {
                    LoadError::Cancelled { .. } if self.root.is_cancelled() => LoadError::ShuttingDown,
                    e => e,
                };
                let transition = match e {
                    LoadError::Cancelled { .. } | LoadError::ShuttingDown => {
                        tracing::info!(reason = %e, "load cancelled");
                        labels = ("cancelled", e.kind());
                        Transition::LoadCancelled
                    }
                    _ => {
                        tracing::warn!(kind = e.kind(), cause = %e, "load failed");
                        labels = ("failed", e.kind());
                        Transition::LoadFailed { reason: e.to_string() }
                    }
                };
                (transition, Err(Arc::new(e)))
            }
        };
        // The end state, the outcome and leaving the in-flight map happen under the map entry's
        // lock (taken before the state manager's, as in `load`), so a new LoadModel either joins
        // this load before it ends or starts a new one after: never joins a load already over.
        let entry = self.inflight.entry(id.to_string());
        let outcome = match self.state.apply(id.as_str(), transition) {
            Ok(_) => outcome,
            // The table refusing the end of a load is a bug in its callers, not bad input.
            Err(invalid) => {
                tracing::error!(cause = %invalid, "state transition refused at the end of a load");
                Err(Arc::new(LoadError::Internal { model_id: id.to_string(), reason: invalid.to_string() }))
            }
        };
        let failed = outcome.is_err();
        handle.finish(outcome);
        let (result, kind) = labels;
        metrics::counter!("model_loader_loads_finished_total", "outcome" => result, "kind" => kind).increment(1);
        metrics::histogram!("model_loader_load_duration_seconds", "outcome" => result)
            .record(started.elapsed().as_secs_f64());
        if let Entry::Occupied(entry) = entry {
            entry.remove();
        }
        drop(slot);
        if failed {
            // The streams have ended: now free what the load had read (booked as leaving until
            // then, so other loads wait for it rather than fail), and give the heap to the OS.
            let aside = sync::lock(&handle.set_aside).take();
            let _ = tokio::task::spawn_blocking(move || {
                drop(aside);
                host::release_free_memory();
            })
            .await;
        }
    }

    async fn steps(
        self: &Arc<Self>,
        handle: &Arc<LoadHandle>,
        request: LoadRequest,
        device: DeviceId,
        slot: &mut Option<queue::Slot>,
    ) -> Result<LoadFacts, LoadError> {
        let id = request.model_id.clone();
        let cancelled = || LoadError::Cancelled { model_id: id.to_string() };
        let step = |s| emit_step(id.as_str(), s, &handle.cancel, handle.as_ref()).map_err(|_| cancelled());
        step(ModelLoadStep::Init)?;
        *slot = Some(tokio::select! {
            slot = self.queue.admit(|ahead| handle.note(ModelLoadStep::Init, format!("queued: {ahead} ahead"))) => slot,
            () = handle.cancel.cancelled() => return Err(cancelled()),
        });

        step(ModelLoadStep::CacheCheck)?;
        let (located, downloads) = self.locate(&request).await?;
        handle.note(ModelLoadStep::CacheCheck, located.description.clone());

        step(ModelLoadStep::BuildStrategies)?;
        let target = request.dtype.or(self.config.default_dtype);
        // A download reserves an estimate from the hub's file sizes before its first byte, then
        // LOAD_WEIGHTS downloads; the exact figure replaces the estimate once headers are read.
        let estimate = match downloads {
            Some((hub, snapshot, missing)) => {
                let estimate = estimate_resident_bytes(&snapshot.needed, target);
                let reservation = self.make_room(handle, device, estimate, ModelLoadStep::BuildStrategies).await?;
                let bytes: u64 = missing.iter().map(|f| f.size).sum();
                handle.note(
                    ModelLoadStep::BuildStrategies,
                    format!("download {} files, {bytes} bytes; {estimate} bytes reserved on {device}", missing.len()),
                );
                step(ModelLoadStep::LoadWeights)?;
                self.download(handle, &hub, &id, &snapshot.commit, &missing, bytes).await?;
                write_ref(&hub, &id, &request.revision, &snapshot.commit);
                Some(reservation)
            }
            None => None,
        };

        let (plan, located) = blocking(&id, {
            let id = id.clone();
            let variant = target.and_then(TargetDtype::variant);
            move || plan::build(&id, &located, variant).map(|plan| (plan, located))
        })
        .await?;
        let needed = plan.resident_bytes(target);
        let reservation = match estimate {
            Some(mut estimate) => {
                estimate.resize(needed)?;
                handle.note(
                    ModelLoadStep::LoadWeights,
                    format!("{}; {needed} bytes reserved on {device}", plan.describe()),
                );
                estimate
            }
            None => {
                let reservation = self.make_room(handle, device, needed, ModelLoadStep::BuildStrategies).await?;
                handle.note(
                    ModelLoadStep::BuildStrategies,
                    format!("{}; {needed} bytes reserved on {device}", plan.describe()),
                );
                step(ModelLoadStep::LoadWeights)?;
                reservation
            }
        };

        let (this, handle, span) = (self.clone(), handle.clone(), tracing::Span::current());
        blocking(&id.clone(), move || {
            span.in_scope(|| this.read_and_place(&handle, &id, target, device, located, plan, reservation))
        })
        .await
    }

    /// Step 2: the model root; else, offline or without a hub, the HF cache; else the hub, which
    /// resolves the revision to a commit and says which files are missing from the cache. A hub
    /// that cannot be reached falls back to a cached snapshot of the revision.
    async fn locate(&self, request: &LoadRequest) -> Result<(source::Located, Option<Downloads>), LoadError> {
        let sources = &self.config.sources;
        let (id, revision) = (&request.model_id, &request.revision);
        let (Some(hub), Some(cache)) = (&self.hub, &sources.hf_cache) else {
            return Ok((source::locate(sources, id, revision)?, None));
        };
        if let Some(local) = source::locate_in_root(sources, id)? {
            return Ok((local, None));
        }
        let variant = request.dtype.or(self.config.default_dtype).and_then(TargetDtype::variant);
        let snapshot = match hub.resolve(id, revision, variant).await {
            Ok(snapshot) => snapshot,
            Err(LoadError::Hub { failure: HubFailure::Unavailable, reason, .. })
                if let Some(mut cached) = source::in_hf_cache(cache, id, revision)? =>
            {
                cached.description = format!("hub unreachable ({reason}); {}", cached.description);
                return Ok((cached, None));
            }
            Err(e) => return Err(e),
        };
        let missing = hub.missing(id, &snapshot);
        if missing.is_empty() {
            write_ref(hub, id, revision, &snapshot.commit);
            let description = format!("cache hit: snapshot {}", snapshot.commit);
            return Ok((source::cache_snapshot(cache, id, &snapshot.commit, ModelSource::Cache, description)?, None));
        }
        let bytes: u64 = missing.iter().map(|f| f.size).sum();
        let description = format!("cache miss: {} files, {bytes} bytes to download", missing.len());
        let located = source::cache_snapshot(cache, id, &snapshot.commit, ModelSource::Hub, description)?;
        Ok((located, Some((hub.clone(), snapshot, missing))))
    }

    /// Downloads the missing files with byte progress over all of them (step 4).
    async fn download(
        &self,
        handle: &LoadHandle,
        hub: &Hub,
        id: &ModelId,
        commit: &str,
        missing: &[hub::RemoteFile],
        total: u64,
    ) -> Result<(), LoadError> {
        let counter = Arc::new(hub::DownloadCounter::default());
        let _counted = CountDownloaded(&counter);
        let mut bytes = ByteProgress::new(id.as_str(), ModelLoadStep::LoadWeights, total, handle);
        bytes.update(0, missing.first().map_or("", |f| f.path.as_str()));
        let download = hub.download(id, commit, missing, &handle.cancel, &counter);
        tokio::pin!(download);
        let mut tick = tokio::time::interval(BYTE_PROGRESS_INTERVAL);
        // A hub that stops sending (hf-hub's clients have no timeouts) fails the load instead of
        // holding it forever: dropping the download future closes the connection.
        let (mut last_done, mut last_change) = (0, tokio::time::Instant::now());
        loop {
            tokio::select! {
                result = &mut download => {
                    result?;
                    bytes.update(total, missing.last().map_or("", |f| f.path.as_str()));
                    return Ok(());
                }
                _ = tick.tick() => {
                    let done = counter.done.load(std::sync::atomic::Ordering::Relaxed);
                    if done != last_done {
                        (last_done, last_change) = (done, tokio::time::Instant::now());
                    } else if last_change.elapsed() >= hub.stall_timeout() {
                        return Err(hub::stalled(id, hub.stall_timeout()));
                    }
                    bytes.update(done, &counter.file());
                }
            }
        }
    }

    /// Steps 4..=8 (the reading part of 4 after a download), on a blocking thread: file I/O and
    /// tensor work never run on the async workers.
    #[allow(clippy::too_many_arguments)]
    fn read_and_place(
        &self,
        handle: &LoadHandle,
        id: &ModelId,
        target: Option<TargetDtype>,
        device: DeviceId,
        located: source::Located,
        plan: plan::LoadPlan,
        reservation: Reservation,
    ) -> Result<LoadFacts, LoadError> {
        let cancel = &handle.cancel;
        let step = |s| {
            emit_step(id.as_str(), s, cancel, handle).map_err(|_| LoadError::Cancelled { model_id: id.to_string() })
        };
        let note = |s, detail: String| handle.note(s, detail);

        let files = plan
            .files()
            .map(|f| {
                located.open(id, &f.path)?.ok_or_else(|| LoadError::NotFound {
                    model_id: id.to_string(),
                    reason: format!("{} vanished", f.display),
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let total = plan.read_bytes();
        let mut bytes = ByteProgress::new(id.as_str(), ModelLoadStep::LoadWeights, total, handle);
        // From here on, an error sets the memory aside instead of freeing it in the way of the
        // cancel or the error reaching the callers (see `Held`). Tensors change in place.
        let mut held = Held { handle, tensors: Vec::new(), reservation: Some(reservation) };
        match device {
            DeviceId::Cpu => {
                read::read_all(
                    id,
                    &plan,
                    &files,
                    self.config.read_threads,
                    cancel,
                    BYTE_PROGRESS_INTERVAL,
                    |done, file| bytes.update(done, file),
                    &mut held.tensors,
                )?;
                drop(files);
                step(ModelLoadStep::LoadComplete)?;
                note(
                    ModelLoadStep::LoadComplete,
                    format!("{} tensors, {total} bytes read and checked", held.tensors.len()),
                );
                step(ModelLoadStep::MoveToDevice)?;
                note(
                    ModelLoadStep::MoveToDevice,
                    "cpu: the tensors are already in host memory, nothing to copy".into(),
                );
            }
            #[cfg(feature = "cuda")]
            DeviceId::Cuda(_) => {
                let (gpu, pool) = self.resources.gpu_staging(device)?;
                let name = device.to_string();
                let target = staged::Target {
                    id,
                    device: &name,
                    threads: self.config.read_threads,
                    cancel,
                    interval: BYTE_PROGRESS_INTERVAL,
                };
                let started = std::time::Instant::now();
                let staged = staged::read(gpu, &pool, &plan, &files, &target, |done, file| bytes.update(done, file))?;
                let reading = started.elapsed();
                drop(files);
                step(ModelLoadStep::LoadComplete)?;
                note(
                    ModelLoadStep::LoadComplete,
                    format!(
                        "{total} bytes read into {} MiB of pinned buffers and queued to {device} in {} device allocations \
                         (allocated in {} ms, read in {} ms, {} threads)",
                        pool.count() * pool.buffer_bytes() >> 20,
                        staged.allocations(),
                        staged.allocated_in.as_millis(),
                        reading.as_millis(),
                        self.config.read_threads,
                    ),
                );
                step(ModelLoadStep::MoveToDevice)?;
                let waiting = std::time::Instant::now();
                held.tensors = staged.finish(gpu, &target)?;
                note(
                    ModelLoadStep::MoveToDevice,
                    format!(
                        "{device}: copied while reading ({:.1} GB/s); the last copies took {} ms more",
                        total as f64 / reading.as_secs_f64().max(1e-9) / 1e9,
                        waiting.elapsed().as_millis()
                    ),
                );
            }
            #[cfg(not(feature = "cuda"))]
            DeviceId::Cuda(_) => {
                // `resolve` refuses CUDA devices in this build; a load never gets here with one.
                return Err(LoadError::Internal {
                    model_id: id.to_string(),
                    reason: format!("{device}: this build has no CUDA support"),
                });
            }
        }

        step(ModelLoadStep::ApplyOptimizations)?;
        let mut converted = 0usize;
        for t in &mut held.tensors {
            if let Some(target) = target.map(TargetDtype::candle)
                && header::converts(t.tensor.dtype())
                && t.tensor.dtype() != target
            {
                if cancel.is_cancelled() {
                    return Err(LoadError::Cancelled { model_id: id.to_string() });
                }
                t.tensor = t.tensor.to_dtype(target).map_err(|e| place_error(id, device, e))?;
                converted += 1;
            }
        }
        note(
            ModelLoadStep::ApplyOptimizations,
            match target {
                Some(t) if converted > 0 => format!("converted {converted} tensors to {t}"),
                _ => "no dtype conversion".into(),
            },
        );

        step(ModelLoadStep::Finalize)?;
        // The reader numbers components in plan order; the pipeline keys them by name.
        let names: Vec<String> = plan.components.iter().map(|c| c.name.clone()).collect();
        let mut components: BTreeMap<String, Component> = plan
            .components
            .into_iter()
            .map(|c| (c.name.clone(), Component { name: c.name, config: c.config, tensors: Vec::new() }))
            .collect();
        // Kept in file order: ListTensors sorts what it shows, so loads of checkpoints with
        // thousands of tensors do not pay for a sort (docs/benchmarks/design-choices.md).
        for t in std::mem::take(&mut held.tensors) {
            let component = components.get_mut(&names[t.component]).ok_or_else(|| LoadError::Internal {
                model_id: id.to_string(),
                reason: "tensor of an unknown component".into(),
            })?;
            component.tensors.push(ResidentTensor { name: t.name, tensor: t.tensor });
        }
        let weight_bytes: u64 = components.values().flat_map(|c| &c.tensors).map(ResidentTensor::size_bytes).sum();
        let pipeline = Pipeline {
            model_id: id.to_string(),
            components,
            device,
            revision: located.revision.clone(),
            allocation: match held.reservation.take() {
                Some(reservation) => reservation.commit(weight_bytes),
                None => {
                    return Err(LoadError::Internal { model_id: id.to_string(), reason: "reservation gone".into() });
                }
            },
        };
        let facts = LoadFacts {
            device: device.to_string(),
            dtype: pipeline.dtype_summary(),
            revision: located.revision,
            weight_bytes,
            sample_size: pipeline.sample_size(),
            source: Some(located.source),
        };
        if let Some(stale) = self.pipelines.insert(pipeline) {
            tracing::error!(model_id = %stale.model_id, "a pipeline was replaced by a new load of the same model");
        }
        Ok(facts)
    }
}

/// Adds a download's bytes, finished or not, to the download metric.
struct CountDownloaded<'a>(&'a hub::DownloadCounter);

impl Drop for CountDownloaded<'_> {
    fn drop(&mut self) {
        let done = self.0.done.load(std::sync::atomic::Ordering::Relaxed);
        metrics::counter!("model_loader_download_bytes_total").increment(done);
    }
}

/// Runs `f` on a blocking thread: file I/O and tensor work never run on the async workers.
async fn blocking<T: Send + 'static>(
    id: &ModelId,
    f: impl FnOnce() -> Result<T, LoadError> + Send + 'static,
) -> Result<T, LoadError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| LoadError::Internal { model_id: id.to_string(), reason: format!("load task failed: {e}") })?
}

/// Records the revision's commit in the cache; a failure costs only offline lookups later.
fn write_ref(hub: &Hub, id: &ModelId, revision: &Revision, commit: &str) {
    if let Err(e) = hub.write_ref(id, revision, commit) {
        tracing::warn!(cause = %e, revision = revision.as_str(), "cannot record the revision in the HF cache");
    }
}

fn place_error(id: &ModelId, device: DeviceId, e: candle_core::Error) -> LoadError {
    LoadError::PlaceOnDevice { model_id: id.to_string(), device: device.to_string(), reason: e.to_string() }
}
