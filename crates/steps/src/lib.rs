//! The eight fixed steps of a model load: [`ModelLoadStep`], its [`ModelLoadPhase`], the one table
//! of messages and phases, [`TOTAL_STEPS`], and [`emit_step`].
//!
//! Every other crate refers to steps through this crate; none spells a step number, message or
//! phase itself. This crate depends on nothing of ours and knows nothing of gRPC: it hands
//! [`ModelLoadProgress`] values to a [`ProgressSink`] its caller provides. For traces it makes
//! each step's span ([`step_span`]), under the target [`TRACES`] that the log output leaves out.

use std::time::{Duration, Instant};

use strum::{EnumCount, EnumIter, FromRepr};
use tokio_util::sync::CancellationToken;

/// One step of a model load. The numbers are API (clients draw `step/total`): explicit, never
/// reordered.
/// Its snake_case name (`load_weights`) labels metrics.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, EnumCount, EnumIter, FromRepr, strum::IntoStaticStr,
)]
#[strum(serialize_all = "snake_case")]
#[repr(u32)]
pub enum ModelLoadStep {
    Init = 1,
    CacheCheck = 2,
    BuildStrategies = 3,
    LoadWeights = 4,
    LoadComplete = 5,
    MoveToDevice = 6,
    ApplyOptimizations = 7,
    Finalize = 8,
}

/// The phase a step belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, strum::IntoStaticStr, strum::Display)]
#[strum(serialize_all = "snake_case")]
pub enum ModelLoadPhase {
    Initialization,
    Loading,
    Device,
    Optimization,
    Finalization,
}

/// How many steps a load has, derived from the enum.
pub const TOTAL_STEPS: u32 = ModelLoadStep::COUNT as u32;

impl ModelLoadStep {
    /// The one table of step messages and phases (seed 000's `STEP_CONFIG`).
    pub const fn spec(self) -> (&'static str, ModelLoadPhase) {
        use ModelLoadPhase as P;
        match self {
            Self::Init => ("Initializing model loader...", P::Initialization),
            Self::CacheCheck => ("Checking model cache...", P::Initialization),
            Self::BuildStrategies => ("Building loading strategies...", P::Initialization),
            Self::LoadWeights => ("Loading model weights...", P::Loading),
            Self::LoadComplete => ("Model weights loaded", P::Loading),
            Self::MoveToDevice => ("Moving model to device...", P::Device),
            Self::ApplyOptimizations => ("Applying optimizations...", P::Optimization),
            Self::Finalize => ("Finalizing model...", P::Finalization),
        }
    }

    /// The step's number, 1..=[`TOTAL_STEPS`].
    pub const fn number(self) -> u32 {
        self as u32
    }

    pub const fn message(self) -> &'static str {
        self.spec().0
    }

    pub const fn phase(self) -> ModelLoadPhase {
        self.spec().1
    }

    /// The step with this number, if any.
    pub fn from_number(n: u32) -> Option<Self> {
        Self::from_repr(n)
    }
}

/// One progress message: a step reached, or byte progress inside a step that moves bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelLoadProgress {
    pub model_id: String,
    pub step: ModelLoadStep,
    /// Free text about what happens inside the step; the message stays the table's.
    pub detail: String,
    pub bytes_done: u64,
    pub bytes_total: u64,
}

impl ModelLoadProgress {
    pub fn new(model_id: &str, step: ModelLoadStep) -> Self {
        Self { model_id: model_id.to_owned(), step, detail: String::new(), bytes_done: 0, bytes_total: 0 }
    }

    pub fn with_detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = detail.into();
        self
    }

    pub fn with_bytes(mut self, done: u64, total: u64) -> Self {
        self.bytes_done = done;
        self.bytes_total = total;
        self
    }

    pub fn total(&self) -> u32 {
        TOTAL_STEPS
    }

    pub fn message(&self) -> &'static str {
        self.step.message()
    }

    pub fn phase(&self) -> ModelLoadPhase {
        self.step.phase()
    }
}

/// Where progress messages go (the seed's `socket_service`): the load's subscribers.
pub trait ProgressSink: Send + Sync {
    fn send(&self, progress: ModelLoadProgress);
}

/// The load was cancelled (checked before a step is emitted, and between chunks of work).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("load cancelled")]
pub struct Cancelled;

/// Checks the cancellation token, then logs the step line and hands the message to the sink.
///
/// The log line is exactly `{model_id} step={n}/{total} phase={phase} msg="{message}"`.
pub fn emit_step(
    model_id: &str,
    step: ModelLoadStep,
    cancel: &CancellationToken,
    sink: &dyn ProgressSink,
) -> Result<(), Cancelled> {
    emit(ModelLoadProgress::new(model_id, step), cancel, sink)
}

/// [`emit_step`] with a `detail` (and possibly byte fields) already filled in.
pub fn emit(progress: ModelLoadProgress, cancel: &CancellationToken, sink: &dyn ProgressSink) -> Result<(), Cancelled> {
    if cancel.is_cancelled() {
        return Err(Cancelled);
    }
    let (message, phase) = progress.step.spec();
    // The load's span (if the caller runs in one with a `step` field) carries the step from here on.
    tracing::Span::current().record("step", progress.step.number());
    tracing::info!(
        "{} step={}/{} phase={} msg=\"{}\"",
        progress.model_id,
        progress.step.number(),
        TOTAL_STEPS,
        phase,
        message
    );
    sink.send(progress);
    Ok(())
}

/// The `tracing` target of the spans (and events) that are for traces only: a load's facts, its
/// steps, the gRPC calls. The server's log layers leave this target out, so the log lines are the
/// same with traces on or off, and its trace layer takes only this target's spans.
pub const TRACES: &str = "traces";

/// The span of one step for traces, a child of the load's span `load`: the step's number, name
/// and phase; the caller records `bytes.done`/`bytes.total` for a step that moves bytes and its
/// `outcome` (`done` when the next step began, else the load's) before dropping it, which ends it.
/// Disabled (free) when no trace layer is installed.
pub fn step_span(load: &tracing::Span, step: ModelLoadStep) -> tracing::Span {
    let name: &'static str = step.into();
    tracing::info_span!(
        target: TRACES,
        parent: load,
        "step",
        otel.name = name,
        otel.status_code = tracing::field::Empty,
        otel.status_description = tracing::field::Empty,
        // Signed: OTLP's integers are, and the trace layer sends an unsigned one as text.
        step.number = i64::from(step.number()),
        step.name = name,
        step.phase = %step.phase(),
        bytes.done = tracing::field::Empty,
        bytes.total = tracing::field::Empty,
        outcome = tracing::field::Empty,
    )
}

/// Byte progress inside a step, throttled to at most one message per [`BYTE_PROGRESS_INTERVAL`],
/// plus the first and the last, so a client can draw a smooth bar without a flood.
pub struct ByteProgress<'a> {
    model_id: &'a str,
    step: ModelLoadStep,
    total: u64,
    sink: &'a dyn ProgressSink,
    last_sent: Option<(Instant, u64)>,
}

/// The smallest interval between two byte-progress messages of one load (~20 a second).
pub const BYTE_PROGRESS_INTERVAL: Duration = Duration::from_millis(50);

impl<'a> ByteProgress<'a> {
    pub fn new(model_id: &'a str, step: ModelLoadStep, total: u64, sink: &'a dyn ProgressSink) -> Self {
        Self { model_id, step, total, sink, last_sent: None }
    }

    /// Reports `done` bytes; sends a message if it is the first, the last, or the interval has
    /// passed since the previous one. Byte messages are logged at debug level only: the info log
    /// keeps one line per step.
    pub fn update(&mut self, done: u64, detail: &str) {
        let now = Instant::now();
        let due = match self.last_sent {
            None => true,
            Some((_, last)) if last == done => false,
            Some(_) if done >= self.total => true,
            Some((at, _)) => now.duration_since(at) >= BYTE_PROGRESS_INTERVAL,
        };
        if due {
            self.last_sent = Some((now, done));
            // The load's span carries the model and the step: the line names each once.
            tracing::debug!(done, total = self.total, "bytes");
            self.sink.send(
                ModelLoadProgress::new(self.model_id, self.step).with_detail(detail).with_bytes(done, self.total),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use strum::IntoEnumIterator;

    use super::*;

    #[derive(Default)]
    struct Collect(Mutex<Vec<ModelLoadProgress>>);
    impl ProgressSink for Collect {
        fn send(&self, progress: ModelLoadProgress) {
            self.0.lock().expect("test lock").push(progress);
        }
    }

    /// The steps are numbered 1..=8 in order and the total is derived from the enum.
    #[test]
    fn steps_are_numbered_in_order() {
        let numbers: Vec<u32> = ModelLoadStep::iter().map(ModelLoadStep::number).collect();
        assert_eq!(numbers, (1..=8).collect::<Vec<_>>());
        assert_eq!(TOTAL_STEPS, 8);
        for n in 1..=TOTAL_STEPS {
            assert_eq!(ModelLoadStep::from_number(n).map(ModelLoadStep::number), Some(n));
        }
        assert_eq!(ModelLoadStep::from_number(0), None);
        assert_eq!(ModelLoadStep::from_number(9), None);
    }

    /// The table gives the seed's message and phase for every step.
    #[test]
    fn table_matches_the_seed() {
        use ModelLoadPhase as P;
        let expected = [
            ("Initializing model loader...", P::Initialization),
            ("Checking model cache...", P::Initialization),
            ("Building loading strategies...", P::Initialization),
            ("Loading model weights...", P::Loading),
            ("Model weights loaded", P::Loading),
            ("Moving model to device...", P::Device),
            ("Applying optimizations...", P::Optimization),
            ("Finalizing model...", P::Finalization),
        ];
        let got: Vec<_> = ModelLoadStep::iter().map(ModelLoadStep::spec).collect();
        assert_eq!(got, expected);
        assert_eq!(P::Initialization.to_string(), "initialization");
    }

    /// emit_step checks cancellation first and sends nothing once cancelled.
    #[test]
    fn emit_step_checks_cancellation_first() {
        let sink = Collect::default();
        let cancel = CancellationToken::new();
        emit_step("m", ModelLoadStep::Init, &cancel, &sink).expect("not cancelled");
        cancel.cancel();
        assert_eq!(emit_step("m", ModelLoadStep::CacheCheck, &cancel, &sink), Err(Cancelled));
        let sent = sink.0.lock().expect("test lock");
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0].step, ModelLoadStep::Init);
        assert_eq!(sent[0].total(), 8);
    }

    /// Byte progress sends the first and the last update and throttles the ones between.
    #[test]
    fn byte_progress_is_throttled() {
        let sink = Collect::default();
        let mut bytes = ByteProgress::new("m", ModelLoadStep::LoadWeights, 1000, &sink);
        for done in (0..=1000).step_by(10) {
            bytes.update(done, "f");
        }
        let sent = sink.0.lock().expect("test lock");
        assert!(sent.len() >= 2 && sent.len() < 20, "{} messages", sent.len());
        assert_eq!(sent.first().map(|p| p.bytes_done), Some(0));
        assert_eq!(sent.last().map(|p| (p.bytes_done, p.bytes_total)), Some((1000, 1000)));
    }
}
