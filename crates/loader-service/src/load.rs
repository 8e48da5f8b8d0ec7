//! The spawned task of one load: the eight steps in order, each a short method, then the end
//! state, the outcome for every stream, and the memory of a failed load freed last.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
    time::{Duration, Instant},
};

use dashmap::mapref::entry::Entry;
use model_source::{Fetch, FetchProgress, Located, ModelSource, Wanted};
use pipeline_manager::{Component, ModelFile, Pipeline, ResidentTensor};
use resource_manager::{DeviceId, Reservations, Target, host, sync};
use state_manager::{LoadFacts, Transition};
use steps::{BYTE_PROGRESS_INTERVAL, ByteProgress, ModelLoadStep};
use weights::{
    LoadPlan, ModelFiles, PlacedTensor, Placement,
    device_map::DeviceMap,
    read::{ReadFailed, ReadOptions},
};

use crate::{
    Failure, Kind, LoadError, LoadRequest, LoaderService, ModelId, TargetDtype,
    handle::{Held, LoadHandle},
    queue,
};

/// How long step 3 may spend reading configs and headers (kilobytes, even for a thousand
/// shards) before the load gives up on the filesystem.
const PLAN_IO_BOUND: Duration = Duration::from_secs(120);

/// Step 3's reading of the model's files: the plan of its weights and its small files.
struct Planning {
    plan: LoadPlan,
    small_files: Vec<Arc<ModelFile>>,
}

/// A planned load, from step 4 on.
struct Planned {
    devices: Target,
    target: Option<TargetDtype>,
    plan: LoadPlan,
    small_files: Vec<Arc<ModelFile>>,
    files: Arc<dyn ModelFiles>,
    source: ModelSource,
    revision: String,
    placement: Arc<dyn Placement>,
}

impl LoaderService {
    /// The spawned task of one load: runs the steps, records the outcome, ends every stream.
    pub(crate) async fn run(self: Arc<Self>, handle: Arc<LoadHandle>, request: LoadRequest, target: Target) {
        let id = request.model_id.clone();
        let started = std::time::Instant::now();
        metrics::counter!("model_loader_loads_started_total").increment(1);
        // The queue slot is held until the end state is recorded, so the next load in line never
        // starts while this one still shows LOADING.
        let mut slot = None;
        let mut labels = ("succeeded", "none");
        let (transition, outcome) = match self.steps(&handle, request, target, &mut slot).await {
            Ok(facts) => {
                metrics::counter!("model_loader_loaded_bytes_total").increment(facts.weight_bytes);
                handle.record_trace("bytes", crate::handle::signed(facts.weight_bytes));
                (Transition::LoadSucceeded(facts), Ok(()))
            }
            Err(e) => {
                let e = if e.is_cancelled() && self.root.is_cancelled() { LoadError::ShuttingDown } else { e };
                let kind = e.kind();
                let transition = match kind {
                    Kind::Cancelled | Kind::ShuttingDown => {
                        tracing::info!(reason = %e, "load cancelled");
                        labels = ("cancelled", kind.name());
                        Transition::LoadCancelled
                    }
                    _ => {
                        tracing::warn!(kind = kind.name(), cause = %e, "load failed");
                        labels = ("failed", kind.name());
                        Transition::LoadFailed { reason: e.to_string(), kind: kind.name() }
                    }
                };
                (transition, Err(Arc::new(e)))
            }
        };
        // The end state, the outcome and leaving the in-flight map happen under the map entry's
        // lock (taken before the state manager's, as in `load`), so a new LoadModel either joins
        // this load before it ends or starts a new one after: never joins a load already over.
        let entry = self.inflight.entry(id.clone());
        let outcome = match self.state.apply(&id, transition) {
            Ok(_) => outcome,
            // The table refusing the end of a load is a bug in its callers, not bad input.
            Err(invalid) => {
                tracing::error!(cause = %invalid, "state transition refused at the end of a load");
                Err(Arc::new(LoadError::internal(&id, invalid.to_string())))
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
        devices: Target,
        slot: &mut Option<queue::Slot>,
    ) -> Result<LoadFacts, LoadError> {
        let id = request.model_id.clone();
        let target = request.dtype.or(self.config.default_dtype);
        handle.step(ModelLoadStep::Init)?;
        *slot = Some(tokio::select! {
            slot = self.queue.admit(|ahead| handle.note(ModelLoadStep::Init, format!("queued: {ahead} ahead"))) => slot,
            () = handle.cancel.cancelled() => return Err(LoadError::cancelled(&id)),
        });

        handle.step(ModelLoadStep::CacheCheck)?;
        let variant = target.and_then(TargetDtype::variant);
        let wanted = Wanted { id: id.clone(), revision: request.revision, variant, cancel: handle.cancel.clone() };
        let located = self.sources.locate(&wanted).await.map_err(|e| LoadError::model(&id, e))?;
        handle.record_trace("source", tracing::field::display(located.source));
        handle.note(ModelLoadStep::CacheCheck, located.description.clone());

        handle.step(ModelLoadStep::BuildStrategies)?;
        let plan_files = match &located.fetch {
            Some(fetch) => {
                let progress = Arc::new(FetchProgress::default());
                let _counted = CountFetched(&progress);
                fetch.plan_files(&handle.cancel, &progress).await.map_err(|e| LoadError::model(&id, e))?
            }
            None => located.files.clone(),
        };
        let (Planning { plan, small_files }, map, reservations) =
            self.plan_and_reserve(handle, &devices, target, &request.device_map, plan_files).await?;
        if let Some(fetch) = &located.fetch {
            self.fetch(handle, fetch.as_ref()).await?;
        }
        let placement = self.placements.placement(&devices, map.as_ref(), &id)?;
        let Located { files, source, revision, .. } = located;
        let planned = Planned { devices, target, plan, small_files, files, source, revision, placement };
        let (this, handle, span) = (self.clone(), handle.clone(), tracing::Span::current());
        blocking(&id, move || span.in_scope(|| this.read_and_register(&handle, planned, reservations))).await
    }

    /// Step 3: the plan from the files' headers and the small files read, then the exact bytes
    /// reserved before step 4 moves any byte of weights (for a source that fetches, the files as
    /// they will be): the weights on the device, the tensors' metadata and the small files on
    /// the host, all in one reservation (one wait) over those devices.
    async fn plan_and_reserve(
        &self,
        handle: &LoadHandle,
        devices: &Target,
        target: Option<TargetDtype>,
        device_map: &[(String, DeviceId)],
        files: Arc<dyn ModelFiles>,
    ) -> Result<(Planning, Option<DeviceMap>, Reservations), LoadError> {
        let planning = plan(handle, files, target).await?;
        let plan = &planning.plan;
        let step = ModelLoadStep::BuildStrategies;
        let metadata = host_bytes(&planning);
        let (needs, map) = if devices.is_single() {
            // The peak, not the end state: converted tensors are read whole as stored first.
            (vec![(devices.first(), plan.peak_bytes(target))], None)
        } else {
            let explicit = (!device_map.is_empty()).then_some(device_map);
            let map = DeviceMap::new(plan, devices, target, explicit)?;
            (map.peak_bytes().collect(), Some(map))
        };
        // On the CPU alone, the weights and the host's bytes are one reservation on one device.
        let (needs, detail) = if devices.devices() == [DeviceId::Cpu] {
            let total = needs[0].1.saturating_add(metadata);
            (vec![(DeviceId::Cpu, total)], format!("{total} bytes reserved on cpu"))
        } else {
            let each = needs.iter().map(|(d, bytes)| format!("{bytes} bytes reserved on {d}")).collect::<Vec<_>>();
            let detail = format!("{}, {metadata} on cpu for the tensors' metadata and small files", each.join(", "));
            (needs.into_iter().chain([(DeviceId::Cpu, metadata)]).collect(), detail)
        };
        let reservations = self.make_room(handle, &needs, step).await?;
        let small = weights::small_files::describe(&planning.small_files);
        handle.note(step, format!("{}, {small}; {detail}", plan.describe()));
        handle.step(ModelLoadStep::LoadWeights)?;
        Ok((planning, map, reservations))
    }

    /// Fetches the missing files with byte progress over all of them (step 4).
    async fn fetch(&self, handle: &LoadHandle, fetch: &dyn Fetch) -> Result<(), LoadError> {
        let id = handle.model_id();
        let progress = Arc::new(FetchProgress::default());
        let _counted = CountFetched(&progress);
        let (total, paths) = (fetch.bytes(), fetch.paths());
        let mut bytes = ByteProgress::new(id.as_str(), ModelLoadStep::LoadWeights, total, handle);
        bytes.update(0, paths.first().copied().unwrap_or(""));
        let fetching = fetch.fetch(&handle.cancel, &progress);
        tokio::pin!(fetching);
        let mut tick = tokio::time::interval(BYTE_PROGRESS_INTERVAL);
        loop {
            tokio::select! {
                result = &mut fetching => {
                    result.map_err(|e| LoadError::model(id, e))?;
                    bytes.update(total, paths.last().copied().unwrap_or(""));
                    return Ok(());
                }
                _ = tick.tick() => bytes.update(progress.done(), &progress.file()),
            }
        }
    }

    /// Steps 4 (the read) to 8, on a blocking thread: file I/O and tensor work never run on the
    /// async workers. From here on an error sets the memory aside instead of freeing it in the
    /// way of the cancel or the error reaching the callers (see `Held`).
    fn read_and_register(
        &self,
        handle: &LoadHandle,
        planned: Planned,
        reservations: Reservations,
    ) -> Result<LoadFacts, LoadError> {
        let mut held = Held::new(handle, reservations);
        self.read(handle, &planned, &mut held)?;
        convert(handle, &planned, &mut held)?;
        let facts = self.register(handle, planned, held)?;
        // The plan and the tensors as read before a conversion are freed by now: small blocks
        // scattered in the heap (a checkpoint of many small tensors frees tens of MB of them),
        // which stay resident unless handed back.
        host::release_free_memory();
        Ok(facts)
    }

    /// Step 4's read into the load's placement, then steps 5 and 6 (the placement's last copies).
    fn read(&self, handle: &LoadHandle, planned: &Planned, held: &mut Held) -> Result<(), LoadError> {
        let id = handle.model_id();
        let files = planned
            .plan
            .files()
            .map(|f| match planned.files.open(&f.path) {
                Ok(Some(file)) => Ok(file),
                Ok(None) => Err(LoadError::not_found(id, format!("{} vanished", f.path))),
                Err(e) => Err(LoadError::model(id, e)),
            })
            .collect::<Result<Vec<_>, _>>()?;
        let total = planned.plan.read_bytes();
        let reading = planned.files.reading();
        let threads = reading.map_or(self.config.read_threads, |r| r.threads);
        let mut bytes = ByteProgress::new(id.as_str(), ModelLoadStep::LoadWeights, total, handle);
        let options = ReadOptions {
            threads,
            cancel: &handle.cancel,
            interval: BYTE_PROGRESS_INTERVAL,
            chunk_bytes: reading.map(|r| r.chunk_bytes),
        };
        let started = Instant::now();
        let read = weights::read::read(planned.placement.as_ref(), &planned.plan, &files, options, |done, file| {
            bytes.update(done, file)
        });
        let reading = started.elapsed();
        drop(files);
        let placed = match read {
            Ok(placed) => held.placed.insert(placed),
            Err(ReadFailed { error, placed }) => {
                held.placed = placed;
                return Err(LoadError::model(id, error));
            }
        };
        let detail = placed.read_detail(total, reading, threads);
        handle.step(ModelLoadStep::LoadComplete)?;
        handle.note(ModelLoadStep::LoadComplete, detail);
        handle.step(ModelLoadStep::MoveToDevice)?;
        let placed = held.placed.take().ok_or_else(|| LoadError::internal(id, "nothing was placed"))?;
        let (tensors, detail) = placed.finish(total, reading).map_err(|e| LoadError::model(id, e))?;
        held.tensors = tensors;
        handle.note(ModelLoadStep::MoveToDevice, detail);
        Ok(())
    }

    /// Step 8: the pipeline into the store, the reservation into its allocation, the facts.
    fn register(&self, handle: &LoadHandle, planned: Planned, mut held: Held) -> Result<LoadFacts, LoadError> {
        handle.step(ModelLoadStep::Finalize)?;
        let id = handle.model_id();
        // The reader numbers components in plan order; the pipeline keys them by name.
        let names: Vec<String> = planned.plan.components.iter().map(|c| c.name.clone()).collect();
        let bools = bool_tensors(&planned.plan);
        // Every tensor names its file (the attach socket says it): an index into these.
        let weight_files: Vec<String> = planned.plan.files().map(|f| f.path.clone()).collect();
        let metadata_bytes = planned.plan.metadata_bytes().saturating_add(small_files_bytes(&planned.small_files));
        let mut components: BTreeMap<String, Component> = planned
            .plan
            .components
            .into_iter()
            .map(|c| (c.name.clone(), Component { name: c.name, sample_size: c.sample_size, tensors: Vec::new() }))
            .collect();
        // Kept in file order: ListTensors sorts what it shows, so loads of checkpoints with
        // thousands of tensors do not pay for a sort (docs/benchmarks/design-choices.md).
        for t in std::mem::take(&mut held.tensors) {
            let component = names.get(t.component).and_then(|name| components.get_mut(name));
            let component = component.ok_or_else(|| LoadError::internal(id, "tensor of an unknown component"))?;
            let file = if bools.is_empty() { None } else { bools.get(&(t.component, t.name.clone())) };
            let is_bool = match file {
                Some(file) => check_bools(file, &t).map_err(|e| LoadError::model(id, e)).map(|()| true)?,
                None => false,
            };
            let source = u32::try_from(t.file).ok().filter(|&f| (f as usize) < weight_files.len());
            let source = source.ok_or_else(|| LoadError::internal(id, "tensor of an unknown file"))?;
            let device = u8::try_from(t.device).map_err(|_| LoadError::internal(id, "a tensor's device past 255"))?;
            component.tensors.push(ResidentTensor { name: t.name, data: t.data, is_bool, file: source, device });
        }
        // Each device's weights, numbered as the target's devices.
        let mut on_device = vec![0u64; planned.devices.devices().len()];
        for t in components.values().flat_map(|c| &c.tensors) {
            let bytes = on_device.get_mut(usize::from(t.device));
            *bytes.ok_or_else(|| LoadError::internal(id, "a tensor on none of the load's devices"))? += t.size_bytes();
        }
        let weight_bytes: u64 = on_device.iter().sum();
        let reservations = held.reservations.take().ok_or_else(|| LoadError::internal(id, "reservation gone"))?;
        // What the plan's metadata estimate booked stays booked on the host: the resident tensors
        // hold it.
        let allocations = reservations.commit(|d| {
            let position = planned.devices.devices().iter().position(|&x| x == d);
            let weights = position.map_or(0, |i| on_device[i]);
            let metadata = if d == DeviceId::Cpu { metadata_bytes } else { 0 };
            weights.saturating_add(metadata)
        });
        let pipeline = Pipeline {
            model_id: id.clone(),
            components,
            files: planned.small_files,
            weight_files,
            target: planned.devices.clone(),
            revision: planned.revision.clone(),
            allocations,
        };
        let facts = LoadFacts {
            target: Some(planned.devices),
            dtype: pipeline.dtype_summary(),
            revision: planned.revision,
            weight_bytes,
            metadata_bytes,
            sample_size: pipeline.sample_size(),
            source: Some(planned.source),
        };
        if let Some(stale) = self.pipelines.insert(pipeline) {
            tracing::error!(model_id = %stale.model_id, "a pipeline was replaced by a new load of the same model");
        }
        Ok(facts)
    }
}

/// Step 3's plan of the model's files and its small files read (bounded by
/// `weights::small_files`' limits, like the plan's headers, before the reservation books them),
/// on a blocking thread. A stalled filesystem (a hung network mount) can block that thread in the
/// kernel for ever: the load does not wait for it past a cancel or [`PLAN_IO_BOUND`], so it
/// cannot hold a load slot, an unload or shutdown. The thread is left to finish on its own.
async fn plan(
    handle: &LoadHandle,
    files: Arc<dyn ModelFiles>,
    target: Option<TargetDtype>,
) -> Result<Planning, LoadError> {
    let id = handle.model_id();
    let owned = id.clone();
    let planning = blocking(id, move || {
        let plan = weights::plan::build(files.as_ref(), target.and_then(TargetDtype::variant))
            .map_err(|e| LoadError::model(&owned, e))?;
        let small_files = weights::small_files::collect(files.as_ref()).map_err(|e| LoadError::model(&owned, e))?;
        Ok(Planning { plan, small_files })
    });
    tokio::select! {
        plan = planning => plan,
        () = handle.cancel.cancelled() => Err(LoadError::cancelled(id)),
        () = tokio::time::sleep(PLAN_IO_BOUND) => Err(LoadError::model(id, Failure::Stalled {
            what: "reading the model's configs and safetensors headers",
            after: PLAN_IO_BOUND,
        })),
    }
}

/// Host bytes a loaded model holds besides its weights: its tensors' metadata and small files.
fn host_bytes(planning: &Planning) -> u64 {
    planning.plan.metadata_bytes().saturating_add(small_files_bytes(&planning.small_files))
}

fn small_files_bytes(files: &[Arc<ModelFile>]) -> u64 {
    files.iter().map(|f| f.size_bytes()).fold(0, u64::saturating_add)
}

/// The BOOL tensors of a plan (rare: masks), by component number and name, with their file.
fn bool_tensors(plan: &LoadPlan) -> HashMap<(usize, String), String> {
    let files =
        plan.components.iter().enumerate().flat_map(|(c, component)| component.files.iter().map(move |f| (c, f)));
    files
        .flat_map(|(c, f)| f.tensors.iter().filter(|t| t.is_bool).map(move |t| ((c, t.name.clone()), f.path.clone())))
        .collect()
}

/// A BOOL tensor's bytes are each 0 or 1: other bytes are not a bool in any framework that
/// takes the weights (torch reads them as undefined behaviour), so the file is corrupt.
fn check_bools(file: &str, tensor: &PlacedTensor) -> Result<(), weights::Error> {
    let bytes =
        tensor.data.bytes().map_err(|e| weights::Error::Internal(format!("reading {} back: {e}", tensor.name)))?;
    match bytes.iter().position(|&b| b > 1) {
        None => Ok(()),
        Some(at) => Err(weights::Error::Corrupt {
            file: file.to_owned(),
            reason: format!("BOOL tensor {} holds byte {:#04x} at {at}: a bool is 0 or 1", tensor.name, bytes[at]),
        }),
    }
}

/// Step 7: float tensors converted to the target dtype, on their device, where the placement
/// keeps them.
fn convert(handle: &LoadHandle, planned: &Planned, held: &mut Held) -> Result<(), LoadError> {
    handle.step(ModelLoadStep::ApplyOptimizations)?;
    let id = handle.model_id();
    let converted = match planned.target {
        Some(target) => planned
            .placement
            .convert(&mut held.tensors, target.candle(), &handle.cancel, &planned.devices.to_string())
            .map_err(|e| LoadError::model(id, e))?,
        None => 0,
    };
    let detail = match planned.target {
        Some(t) if converted > 0 => format!("converted {converted} tensors to {t}"),
        _ => "no dtype conversion".into(),
    };
    handle.note(ModelLoadStep::ApplyOptimizations, detail);
    Ok(())
}

/// Adds a fetch's bytes, finished or not, to the download metric.
struct CountFetched<'a>(&'a FetchProgress);

impl Drop for CountFetched<'_> {
    fn drop(&mut self) {
        metrics::counter!("model_loader_download_bytes_total").increment(self.0.done());
    }
}

/// Runs `f` on a blocking thread: file I/O and tensor work never run on the async workers.
async fn blocking<T: Send + 'static>(
    id: &ModelId,
    f: impl FnOnce() -> Result<T, LoadError> + Send + 'static,
) -> Result<T, LoadError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| LoadError::internal(id, format!("load task failed: {e}")))?
}
