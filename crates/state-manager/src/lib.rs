//! The per-model state machine: UNLOADED, LOADING, LOADED, UNLOADING, FAILED, and the explicit
//! table of transitions between them.
//!
//! Each model has one [`ModelStatus`] record; every change to it is one atomic check-and-set under
//! the record's map entry, and is published as a [`StateEvent`] to every subscriber, in the order
//! it happened. This crate knows nothing of loading, memory or gRPC: callers say what happened
//! ([`Transition`]) and the table says whether it may.

use std::{
    collections::VecDeque,
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use dashmap::DashMap;
use resource_manager::Target;
use steps::ModelLoadProgress;
use tokio::sync::{broadcast, watch};

/// Where a model is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, strum::Display, strum::IntoStaticStr)]
#[strum(serialize_all = "SCREAMING_SNAKE_CASE")]
pub enum ModelState {
    Unloaded,
    Loading,
    Loaded,
    Unloading,
    Failed,
}

pub use model_id::{ModelId, ModelSource};

/// Facts about a model's current or last load, shown in its status.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoadFacts {
    /// The devices of its current or last load; `None` before one, and once it left (an unload,
    /// a cancel).
    pub target: Option<Target>,
    /// The dtype of the resident floating-point tensors ("F32", "BF16", "mixed").
    pub dtype: String,
    /// The resolved revision (a commit for the HF cache; empty for the model root).
    pub revision: String,
    pub weight_bytes: u64,
    /// Host bytes booked for its tensors' metadata (names, shapes, views).
    pub metadata_bytes: u64,
    pub sample_size: Option<u32>,
    pub source: Option<ModelSource>,
}

/// What is known of one model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelStatus {
    pub model_id: ModelId,
    pub state: ModelState,
    /// The latest progress message of the current or last load.
    pub last_progress: Option<ModelLoadProgress>,
    /// Why the last load failed (state FAILED).
    pub error: Option<String>,
    /// The stable kind of that failure (`not_found`, `corrupt`, ...), for programs.
    pub error_kind: Option<&'static str>,
    /// Why the server itself unloaded it (evicted to make room for another model); kept until
    /// the next load, so an operator can see where a model went.
    pub unload_reason: Option<String>,
    pub facts: LoadFacts,
    /// Processes attached to it now. Leases are not state: the state manager records 0 and the
    /// facade fills in the count where it answers.
    pub attached_clients: usize,
    /// When it was last used (milliseconds since the Unix epoch; 0 when not resident). Like
    /// `attached_clients`, filled in by the facade from the pipelines it keeps.
    pub last_used_unix_ms: u64,
}

impl ModelStatus {
    /// The status of a model nobody has loaded yet.
    pub fn unloaded(model_id: &ModelId) -> Self {
        Self {
            model_id: model_id.clone(),
            state: ModelState::Unloaded,
            last_progress: None,
            error: None,
            error_kind: None,
            unload_reason: None,
            facts: LoadFacts::default(),
            attached_clients: 0,
            last_used_unix_ms: 0,
        }
    }
}

/// Something that happened to a model; the table decides whether it may happen now.
#[derive(Debug, Clone)]
pub enum Transition {
    /// A load begins onto `target`'s devices (from UNLOADED or FAILED).
    StartLoad { target: Target },
    /// The load finished: the model is resident.
    LoadSucceeded(LoadFacts),
    /// The load failed; the reason and its stable kind are kept for GetModel.
    LoadFailed { reason: String, kind: &'static str },
    /// The load was cancelled: nothing of it stays.
    LoadCancelled,
    /// An unload begins (from LOADED); `reason` when the server unloads it by itself (an
    /// eviction), `None` when a client asked.
    StartUnload { reason: Option<String> },
    /// The unload finished: the memory is back.
    UnloadFinished,
    /// The unload of a model whose resident bytes were lost (a file it was mapped from changed)
    /// finished: the memory is back and the model is FAILED, the reason kept for GetModel.
    UnloadedLost { reason: String, kind: &'static str },
    /// The failure of the last load is forgotten (an unload of a FAILED model).
    ClearFailure,
}

impl Transition {
    /// The transition table: the state a model moves to from `from`, or `None` when the
    /// transition is not allowed there. Every state is reachable and can be left.
    pub fn target(&self, from: ModelState) -> Option<ModelState> {
        use ModelState as S;
        match (self, from) {
            (Self::StartLoad { .. }, S::Unloaded | S::Failed) => Some(S::Loading),
            (Self::LoadSucceeded(_), S::Loading) => Some(S::Loaded),
            (Self::LoadFailed { .. }, S::Loading) => Some(S::Failed),
            (Self::LoadCancelled, S::Loading) => Some(S::Unloaded),
            (Self::StartUnload { .. }, S::Loaded) => Some(S::Unloading),
            (Self::UnloadFinished, S::Unloading) => Some(S::Unloaded),
            (Self::UnloadedLost { .. }, S::Unloading) => Some(S::Failed),
            (Self::ClearFailure, S::Failed) => Some(S::Unloaded),
            _ => None,
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Self::StartLoad { .. } => "start load",
            Self::LoadSucceeded(_) => "load succeeded",
            Self::LoadFailed { .. } => "load failed",
            Self::LoadCancelled => "load cancelled",
            Self::StartUnload { .. } => "start unload",
            Self::UnloadFinished => "unload finished",
            Self::UnloadedLost { .. } => "unload of a lost model finished",
            Self::ClearFailure => "clear failure",
        }
    }
}

/// A transition the table does not allow from the model's current state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("model {model_id}: cannot {transition} while {current}")]
pub struct InvalidTransition {
    pub model_id: ModelId,
    pub transition: &'static str,
    /// The state the model is in, so the caller can decide what to do instead.
    pub current: ModelState,
}

/// A change published to subscribers, in the order it happened for each model.
// Statuses are rare next to progress messages and each is cloned once per subscriber anyway: a
// box would add an allocation per status for a few hundred bytes of channel slot.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StateEvent {
    Status(ModelStatus),
    Progress(ModelLoadProgress),
}

/// How many models at rest (UNLOADED or FAILED) keep their record by default; older ones are
/// forgotten (see [`StateManager::with_max_resting`]).
pub const DEFAULT_MAX_RESTING: usize = 1024;

/// The records of every tracked model and the stream of their changes.
pub struct StateManager {
    /// One record per model tracked. A record's entry lock is what makes a transition one
    /// atomic check-and-set; it is never held across an `.await`.
    records: DashMap<ModelId, Record>,
    /// Every change, published while the entry lock is held, so each model's events are ordered.
    events: broadcast::Sender<StateEvent>,
    /// Notified on every transition (`send_replace` notifies even an unchanged value), for callers that wait for a state to be left (an unload) or for
    /// memory held by a model in transition to become evictable.
    changed: watch::Sender<()>,
    /// Models that came to rest, oldest first, each with the number of that rest: a client
    /// asking for ids that do not exist must not grow the records (and ListModels) for ever.
    resting: Mutex<VecDeque<(ModelId, u64)>>,
    rests: AtomicU64,
    max_resting: usize,
}

/// A model's status and the number of its latest rest.
struct Record {
    status: ModelStatus,
    rest: u64,
}

impl StateManager {
    /// `event_capacity` is how many events a slow subscriber may fall behind before it lags.
    pub fn new(event_capacity: usize) -> Self {
        let (events, _) = broadcast::channel(event_capacity.max(1));
        Self {
            records: DashMap::new(),
            events,
            changed: watch::Sender::new(()),
            resting: Mutex::new(VecDeque::new()),
            rests: AtomicU64::new(0),
            max_resting: DEFAULT_MAX_RESTING,
        }
    }

    /// Keeps the records of at most about `max` models at rest (UNLOADED or FAILED): once more
    /// have come to rest, the record of the one that came to rest longest ago is forgotten (a
    /// later GetModel sees it as never loaded). Models in LOADING, LOADED or UNLOADING are never
    /// forgotten.
    pub fn with_max_resting(mut self, max: usize) -> Self {
        self.max_resting = max;
        self
    }

    /// Applies `transition` if the table allows it from the model's current state (a model never
    /// seen is UNLOADED), publishes the new status and returns it.
    pub fn apply(&self, model_id: &ModelId, transition: Transition) -> Result<ModelStatus, InvalidTransition> {
        let mut entry = self
            .records
            .entry(model_id.clone())
            .or_insert_with(|| Record { status: ModelStatus::unloaded(model_id), rest: 0 });
        let rest = self.rests.fetch_add(1, Ordering::Relaxed) + 1;
        let Record { status: record, rest: record_rest } = entry.value_mut();
        let Some(next) = transition.target(record.state) else {
            return Err(InvalidTransition {
                model_id: model_id.clone(),
                transition: transition.name(),
                current: record.state,
            });
        };
        record.state = next;
        *record_rest = rest;
        match transition {
            Transition::StartLoad { target } => {
                record.error = None;
                record.error_kind = None;
                record.unload_reason = None;
                record.last_progress = None;
                record.facts = LoadFacts { target: Some(target), ..LoadFacts::default() };
            }
            Transition::LoadSucceeded(facts) => record.facts = facts,
            Transition::LoadFailed { reason, kind } => {
                record.error = Some(reason);
                record.error_kind = Some(kind);
                record.facts.weight_bytes = 0;
                record.facts.metadata_bytes = 0;
            }
            // Nothing of the model stays resident: its facts went with it.
            Transition::LoadCancelled | Transition::UnloadFinished => record.facts = LoadFacts::default(),
            Transition::UnloadedLost { reason, kind } => {
                record.error = Some(reason);
                record.error_kind = Some(kind);
                record.facts = LoadFacts::default();
            }
            Transition::ClearFailure => {
                record.error = None;
                record.error_kind = None;
            }
            Transition::StartUnload { reason } => record.unload_reason = reason,
        }
        let status = record.clone();
        // No subscriber is not an error: nobody is watching.
        let _ = self.events.send(StateEvent::Status(status.clone()));
        drop(entry);
        if is_resting(next) {
            self.came_to_rest(model_id, rest);
        }
        self.changed.send_replace(());
        Ok(status)
    }

    /// Notes that `model_id` came to rest (its rest number `rest`), and forgets the models that
    /// came to rest longest ago beyond the bound, if they are still at rest since then.
    fn came_to_rest(&self, model_id: &ModelId, rest: u64) {
        // A poisoned lock's queue is still consistent: each update under it is one push or pop.
        let mut resting = self.resting.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        resting.push_back((model_id.clone(), rest));
        while resting.len() > self.max_resting {
            let Some((id, rest)) = resting.pop_front() else { break };
            self.records.remove_if(&id, |_, r| r.rest == rest && is_resting(r.status.state));
        }
    }

    /// Records and publishes a progress message of a model that is LOADING; progress of a load
    /// that already ended is dropped (it cannot overtake the terminal status).
    pub fn record_progress(&self, progress: ModelLoadProgress) {
        if let Some(mut record) = self.records.get_mut(progress.model_id.as_str())
            && record.status.state == ModelState::Loading
        {
            record.status.last_progress = Some(progress.clone());
            let _ = self.events.send(StateEvent::Progress(progress));
        }
    }

    /// The model's status; `None` for a model never tracked.
    pub fn get(&self, model_id: &ModelId) -> Option<ModelStatus> {
        self.records.get(model_id).map(|r| r.status.clone())
    }

    pub fn state(&self, model_id: &ModelId) -> ModelState {
        self.records.get(model_id).map_or(ModelState::Unloaded, |r| r.status.state)
    }

    /// Every tracked model's status, sorted by id.
    pub fn all(&self) -> Vec<ModelStatus> {
        let mut all: Vec<_> = self.records.iter().map(|r| r.status.clone()).collect();
        all.sort_by(|a, b| a.model_id.cmp(&b.model_id));
        all
    }

    /// Subscribes to every later change. Subscribe before taking a snapshot, so nothing falls
    /// between the two (an event may then appear in both, never in neither).
    pub fn subscribe(&self) -> broadcast::Receiver<StateEvent> {
        self.events.subscribe()
    }

    /// Waits until the model is not in `state` (e.g. until an unload has finished).
    pub async fn wait_while(&self, model_id: &ModelId, state: ModelState) {
        let mut changes = self.changes();
        while self.state(model_id) == state {
            // The sender lives in `self`, which outlives this borrow: `changed` cannot fail.
            let _ = changes.changed().await;
        }
    }

    /// Changes after every transition of any model (not on progress), for callers that wait for
    /// some condition over several models: mark it seen, check the condition, then await a change.
    pub fn changes(&self) -> watch::Receiver<()> {
        self.changed.subscribe()
    }
}

/// UNLOADED or FAILED: nothing of the model is resident or in flight.
fn is_resting(state: ModelState) -> bool {
    matches!(state, ModelState::Unloaded | ModelState::Failed)
}

#[cfg(test)]
mod tests {
    /// A valid model id.
    fn id(s: &str) -> model_id::ModelId {
        model_id::ModelId::parse(s).expect("a valid id")
    }

    use super::*;

    fn cpu() -> Target {
        Target::one(resource_manager::DeviceId::Cpu)
    }

    fn all_states() -> [ModelState; 5] {
        use ModelState as S;
        [S::Unloaded, S::Loading, S::Loaded, S::Unloading, S::Failed]
    }

    fn all_transitions() -> Vec<Transition> {
        vec![
            Transition::StartLoad { target: cpu() },
            Transition::LoadSucceeded(LoadFacts::default()),
            Transition::LoadFailed { reason: "x".into(), kind: "internal" },
            Transition::LoadCancelled,
            Transition::StartUnload { reason: None },
            Transition::UnloadFinished,
            Transition::UnloadedLost { reason: "x".into(), kind: "changed" },
            Transition::ClearFailure,
        ]
    }

    /// The table has no dead states: every state can be entered and left.
    #[test]
    fn every_state_is_entered_and_left() {
        for state in all_states() {
            let entered =
                all_states().iter().any(|&from| all_transitions().iter().any(|t| t.target(from) == Some(state)));
            let left = all_transitions().iter().any(|t| t.target(state).is_some_and(|to| to != state));
            assert!(entered, "{state} cannot be entered");
            assert!(left, "{state} cannot be left");
        }
    }

    /// Past the bound, the models that came to rest longest ago are forgotten; a model loading
    /// or loaded is kept however old, and one that rested, loaded again and rested anew counts
    /// from its latest rest.
    #[test]
    fn models_at_rest_are_forgotten_oldest_first_past_the_bound() {
        let m = StateManager::new(16).with_max_resting(3);
        let fail = |name: &str| {
            m.apply(&id(name), Transition::StartLoad { target: cpu() }).expect("start");
            m.apply(&id(name), Transition::LoadFailed { reason: "not found".into(), kind: "not_found" }).expect("fail");
        };
        m.apply(&id("loaded"), Transition::StartLoad { target: cpu() }).expect("start");
        m.apply(&id("loaded"), Transition::LoadSucceeded(LoadFacts::default())).expect("loaded");
        for name in ["a", "b", "c"] {
            fail(name);
        }
        fail("a");
        fail("d");
        let ids: Vec<String> = m.all().into_iter().map(|s| s.model_id.as_str().to_owned()).collect();
        assert_eq!(ids, ["a", "c", "d", "loaded"], "b rested longest ago; a counts from its second rest");
        for i in 0..1000 {
            fail(&format!("unknown-{i}"));
        }
        assert_eq!(m.all().len(), 4, "three at rest and the loaded model");
        assert_eq!(m.state(&id("loaded")), ModelState::Loaded);
    }

    /// A second StartLoad while loading is refused and reports the current state.
    #[test]
    fn second_start_load_is_refused() {
        let m = StateManager::new(16);
        m.apply(&id("a"), Transition::StartLoad { target: cpu() }).expect("first load starts");
        let err = m.apply(&id("a"), Transition::StartLoad { target: cpu() }).expect_err("second is refused");
        assert_eq!(err.current, ModelState::Loading);
    }

    /// A full life: load, succeed, unload; a failure is kept with its reason and then retried.
    #[test]
    fn life_cycle_and_failure() {
        let m = StateManager::new(16);
        let mut rx = m.subscribe();
        m.apply(&id("a"), Transition::StartLoad { target: cpu() }).expect("start");
        m.record_progress(ModelLoadProgress::new("a", steps::ModelLoadStep::Init));
        let facts = LoadFacts { weight_bytes: 10, ..LoadFacts::default() };
        assert_eq!(m.apply(&id("a"), Transition::LoadSucceeded(facts)).expect("ok").facts.weight_bytes, 10);
        m.apply(&id("a"), Transition::StartUnload { reason: None }).expect("unload");
        assert_eq!(m.apply(&id("a"), Transition::UnloadFinished).expect("done").facts, LoadFacts::default());
        m.apply(&id("a"), Transition::StartLoad { target: cpu() }).expect("start again");
        let failed =
            m.apply(&id("a"), Transition::LoadFailed { reason: "bad file".into(), kind: "corrupt" }).expect("fail");
        assert_eq!(failed.error.as_deref(), Some("bad file"));
        assert_eq!(failed.error_kind, Some("corrupt"));
        let retried = m.apply(&id("a"), Transition::StartLoad { target: cpu() }).expect("retry");
        assert_eq!((retried.error, retried.error_kind), (None, None));

        let mut states = Vec::new();
        while let Ok(ev) = rx.try_recv() {
            states.push(match ev {
                StateEvent::Status(s) => s.state.to_string(),
                StateEvent::Progress(p) => format!("step {}", p.step.number()),
            });
        }
        assert_eq!(states, ["LOADING", "step 1", "LOADED", "UNLOADING", "UNLOADED", "LOADING", "FAILED", "LOADING"]);
    }

    /// An eviction's reason stays in the status after the unload and is cleared by the next load.
    #[test]
    fn unload_reason_lasts_until_the_next_load() {
        let m = StateManager::new(16);
        m.apply(&id("a"), Transition::StartLoad { target: cpu() }).expect("start");
        m.apply(&id("a"), Transition::LoadSucceeded(LoadFacts::default())).expect("ok");
        let reason = Some("evicted".to_owned());
        assert_eq!(
            m.apply(&id("a"), Transition::StartUnload { reason: reason.clone() }).expect("unload").unload_reason,
            reason
        );
        assert_eq!(m.apply(&id("a"), Transition::UnloadFinished).expect("done").unload_reason, reason);
        assert_eq!(m.apply(&id("a"), Transition::StartLoad { target: cpu() }).expect("again").unload_reason, None);
    }

    /// Progress of a model that is not loading is dropped.
    #[test]
    fn late_progress_is_dropped() {
        let m = StateManager::new(16);
        m.apply(&id("a"), Transition::StartLoad { target: cpu() }).expect("start");
        m.apply(&id("a"), Transition::LoadCancelled).expect("cancel");
        let mut rx = m.subscribe();
        m.record_progress(ModelLoadProgress::new("a", steps::ModelLoadStep::LoadWeights));
        assert!(rx.try_recv().is_err());
        assert_eq!(m.get(&id("a")).map(|s| s.state), Some(ModelState::Unloaded));
    }

    /// wait_while returns once the state is left.
    #[tokio::test]
    async fn wait_while_wakes_on_change() {
        let m = std::sync::Arc::new(StateManager::new(16));
        m.apply(&id("a"), Transition::StartLoad { target: cpu() }).expect("start");
        m.apply(&id("a"), Transition::LoadSucceeded(LoadFacts::default())).expect("ok");
        m.apply(&id("a"), Transition::StartUnload { reason: None }).expect("unload");
        let waiter = tokio::spawn({
            let m = m.clone();
            async move { m.wait_while(&id("a"), ModelState::Unloading).await }
        });
        tokio::task::yield_now().await;
        m.apply(&id("a"), Transition::UnloadFinished).expect("done");
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter).await.expect("woken").expect("no panic");
    }
}
