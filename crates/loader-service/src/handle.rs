//! One load in flight as its callers see it: the handle that keeps its latest message and fans
//! every message out to any number of streams, resynchronising a stream that falls behind, and the
//! memory a failed load still holds until its streams have ended.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex, MutexGuard},
};

use resource_manager::{Allocations, Reservations, Target, sync};
use state_manager::StateManager;
use steps::{ModelLoadProgress, ModelLoadStep, ProgressSink, emit_step};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use weights::{Placed, PlacedTensor};

use crate::{Kind, LoadError, ModelId, TargetDtype};

/// How many progress messages a LoadModel caller may fall behind before it is resynchronised.
const LOAD_STREAM_CAPACITY: usize = 256;

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
    /// Where and as what this load places the model: a request that asks for another device or
    /// dtype does not join it.
    pub(crate) wants: Wants,
    /// A child of the service's root token: shutdown cancels every load.
    pub(crate) cancel: CancellationToken,
    state: Arc<StateManager>,
    /// The latest message and the outcome are read and the broadcast subscribed under this one
    /// lock, so a joiner gets the latest message and then every later one, never a gap.
    stream: Mutex<LoadStream>,
    /// The memory of a load that failed or was cancelled holding tensors, freed by `run` once
    /// the load's streams have ended.
    pub(crate) set_aside: Mutex<Option<SetAside>>,
}

/// The devices, the explicit device map (empty: balanced, or one device) and the target dtype
/// (`None`: as stored) of a load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Wants {
    pub target: Target,
    pub device_map: Vec<(String, resource_manager::DeviceId)>,
    pub dtype: Option<TargetDtype>,
}

/// What a failed load still holds: what it had placed, then the bytes they were booked under
/// on each device, the host's for a GPU load's tensor metadata among them (dropped in this
/// order, so the books show the memory until it is back).
pub(crate) struct SetAside {
    _placed: Option<Box<dyn Placed>>,
    _tensors: Vec<PlacedTensor>,
    booked: Allocations,
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
pub(crate) struct Held<'h> {
    pub handle: &'h LoadHandle,
    /// Step 4's placement until step 6 hands out its tensors.
    pub placed: Option<Box<dyn Placed>>,
    pub tensors: Vec<PlacedTensor>,
    /// One per device: the weights' devices, and for a load to a GPU the host bytes of its
    /// tensors' metadata (a CPU load's are part of its one reservation).
    pub reservations: Option<Reservations>,
}

impl<'h> Held<'h> {
    pub fn new(handle: &'h LoadHandle, reservations: Reservations) -> Self {
        Self { handle, placed: None, tensors: Vec::new(), reservations: Some(reservations) }
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        if let Some(reservations) = self.reservations.take() {
            let aside = SetAside {
                _placed: self.placed.take(),
                _tensors: std::mem::take(&mut self.tensors),
                booked: reservations.into_leaving(),
            };
            *sync::lock(&self.handle.set_aside) = Some(aside);
        }
    }
}

struct LoadStream {
    /// The step the load is in and since when (the step-duration histogram).
    step_since: Option<(ModelLoadStep, std::time::Instant)>,
    /// The load's span for traces until the load ends: taken then, so that the span ends with
    /// the load and not with the last stream that still holds this handle.
    trace: Option<tracing::Span>,
    /// The span for traces of the step in flight; replaced (so ended) when the next step begins.
    step_span: tracing::Span,
    /// The step's latest byte progress (done, total), recorded on its span as it ends: a span's
    /// attribute recorded again is added again, not replaced.
    step_bytes: Option<(u64, u64)>,
    latest: Option<ModelLoadProgress>,
    outcome: Option<LoadOutcome>,
    tx: broadcast::Sender<LoadUpdate>,
}

impl LoadStream {
    /// Takes the step's span for traces out, its bytes recorded: it ends when the caller drops it.
    fn end_step_span(&mut self) -> tracing::Span {
        let span = std::mem::replace(&mut self.step_span, tracing::Span::none());
        if let Some((done, total)) = self.step_bytes.take() {
            span.record("bytes.done", signed(done));
            span.record("bytes.total", signed(total));
        }
        span
    }
}

impl LoadHandle {
    /// `trace`: the load's span for traces (disabled when traces are off).
    pub(crate) fn new(
        model_id: ModelId,
        wants: Wants,
        cancel: CancellationToken,
        state: Arc<StateManager>,
        trace: tracing::Span,
    ) -> Self {
        let (tx, _) = broadcast::channel(LOAD_STREAM_CAPACITY);
        let stream = LoadStream {
            step_since: None,
            trace: Some(trace),
            step_span: tracing::Span::none(),
            step_bytes: None,
            latest: None,
            outcome: None,
            tx,
        };
        Self { model_id, wants, cancel, state, stream: Mutex::new(stream), set_aside: Mutex::new(None) }
    }

    /// Records `field` on the load's span for traces, while the load runs.
    pub(crate) fn record_trace(&self, field: &str, value: impl tracing::Value) {
        if let Some(trace) = &self.stream().trace {
            trace.record(field, value);
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
        Err(Arc::new(LoadError::internal(&self.model_id, "load vanished")))
    }

    /// Enters `step` (logged, sent, recorded), unless the load was cancelled.
    pub(crate) fn step(&self, step: ModelLoadStep) -> Result<(), LoadError> {
        emit_step(self.model_id.as_str(), step, &self.cancel, self).map_err(|_| LoadError::cancelled(&self.model_id))
    }

    /// A message of the current step with a `detail`; not logged at info (the step was).
    pub(crate) fn note(&self, step: ModelLoadStep, detail: String) {
        self.send(ModelLoadProgress::new(self.model_id.as_str(), step).with_detail(detail));
    }

    pub(crate) fn finish(&self, outcome: LoadOutcome) {
        let mut stream = self.stream();
        if let Some((step, since)) = stream.step_since.take() {
            record_step(step, since);
        }
        let step_span = stream.end_step_span();
        end_trace(&outcome, &step_span, stream.trace.take().as_ref());
        stream.outcome = Some(outcome.clone());
        let _ = stream.tx.send(LoadUpdate::Done(outcome));
    }
}

/// A count for a span for traces: OTLP's integers are signed, and the trace layer would send an
/// unsigned one as text.
pub(crate) fn signed(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Records how the load ended on its span for traces and on the span of the step it ended in.
fn end_trace(outcome: &LoadOutcome, step: &tracing::Span, load: Option<&tracing::Span>) {
    let label = match outcome {
        Ok(()) => "succeeded",
        Err(e) if matches!(e.kind(), Kind::Cancelled | Kind::ShuttingDown) => "cancelled",
        Err(_) => "failed",
    };
    for span in std::iter::once(step).chain(load) {
        span.record("outcome", label);
        if let (Err(e), "failed") = (outcome, label) {
            span.record("otel.status_code", "error");
            span.record("otel.status_description", e.to_string());
        }
    }
    if let (Some(load), Err(e)) = (load, outcome) {
        load.record("error.kind", e.kind().name());
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
                // The previous step's span ends (dropped) before the next one begins.
                stream.end_step_span().record("outcome", "done");
                stream.step_span =
                    steps::step_span(stream.trace.as_ref().unwrap_or(&tracing::Span::none()), progress.step);
            }
        }
        if progress.bytes_total > 0 {
            stream.step_bytes = Some((progress.bytes_done, progress.bytes_total));
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
    pub(crate) fn already_loaded(model_id: &ModelId) -> Self {
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
