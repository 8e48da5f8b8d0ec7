//! A few thousand random LoadModel/UnloadModel/CancelLoad/WatchModels/GetModel/GetResources/ListModels
//! calls from many concurrent clients on a few models keep every invariant: never two loads of one
//! model, every load stream ends (OK at step 8/8 or CANCELLED), the budget is never exceeded (not
//! even between two samples: the server's peak stays within it), the accounting after every
//! operation is each resident model's tensor bytes, the final accounting equals the bytes of the
//! LOADED models' tensors, and nothing hangs. Once with a budget that holds every model, once with
//! one that holds two of the three and `--evict lru`.
//!
//! The operation sequences come from a seeded RNG; the seed is printed and can be set with
//! `CONCURRENCY_SEED=<u64>` (and the number of operations with `CONCURRENCY_OPS=<n>`). Timing
//! still differs between runs, so a seed reproduces the requests, not their interleaving.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use model_manager::{EvictPolicy, resource_manager::MemoryBudget};
use proto::v1::{self as pb, ModelState as S, model_event::Event, model_loader_client::ModelLoaderClient};
use rand::{Rng, SeedableRng, rngs::StdRng};
use tests::{TestServer, WAIT, fixture};
use tokio::sync::{oneshot, watch};
use tonic::{Code, Streaming, transport::Channel};

/// Concurrent client tasks.
const TASKS: usize = 12;
/// Operations of all tasks together unless `CONCURRENCY_OPS` says otherwise.
const DEFAULT_OPS: usize = 3000;
/// Room in the server's event channel: the long-running watcher must never fall behind.
const EVENT_CAPACITY: usize = 1 << 16;
/// How long a short-lived watcher waits for each event after its snapshot before it leaves.
const SHORT_WATCH: Duration = Duration::from_millis(10);
/// How long the client tasks may take together before the test calls it a hang.
const ALL_TASKS: Duration = Duration::from_secs(300);

/// One fixture model and the bytes of its tensors.
#[derive(Debug, Clone)]
struct Model {
    id: String,
    /// What a load of it books: its weights and their metadata.
    bytes: u64,
    /// Its weights.
    weights: u64,
}

type Models = std::sync::Arc<Vec<Model>>;

fn model<'a>(models: &'a [Model], id: &str) -> &'a Model {
    models.iter().find(|m| m.id == id).unwrap_or_else(|| panic!("{id:?} is not one of the fixture models"))
}

/// The operations a client task picks from, with their weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Op {
    /// LoadModel, read to the end of the stream.
    Load,
    /// LoadModel, read a message or two, then hang up (the load must go on without its caller).
    LoadAndLeave,
    Unload,
    Cancel,
    /// A short-lived WatchModels of one model or of all: the snapshot and a few events.
    Watch,
    GetModel,
    GetResources,
    ListModels,
}

const WEIGHTS: [(Op, u32); 8] = [
    (Op::Load, 30),
    (Op::LoadAndLeave, 4),
    (Op::Unload, 10),
    (Op::Cancel, 8),
    (Op::Watch, 12),
    (Op::GetModel, 14),
    (Op::GetResources, 14),
    (Op::ListModels, 8),
];

fn pick(rng: &mut StdRng) -> Op {
    let total: u32 = WEIGHTS.iter().map(|(_, w)| w).sum();
    let mut r = rng.random_range(0..total);
    for (op, w) in WEIGHTS {
        if r < w {
            return op;
        }
        r -= w;
    }
    unreachable!("r < total")
}

/// What one client task saw.
#[derive(Debug, Default)]
struct TaskStats {
    ops: BTreeMap<Op, u64>,
    /// Load streams that ended OK after a real load (started or joined).
    loads_ok: u64,
    /// Load streams that were a single "already loaded" message.
    already_loaded: u64,
    /// Load streams that ended CANCELLED.
    loads_cancelled: u64,
    /// Load streams whose first message was past step 1 (joined a load in flight).
    joined_late: u64,
    /// CancelLoads that found a load in flight.
    cancels_hit: u64,
    /// UnloadModels that freed a LOADED model.
    unloads_freed: u64,
    /// UnloadModels that freed nothing: each may have cancelled a load in flight.
    unloads_not_freeing: u64,
}

impl TaskStats {
    fn add(&mut self, other: &Self) {
        for (op, n) in &other.ops {
            *self.ops.entry(*op).or_default() += n;
        }
        self.loads_ok += other.loads_ok;
        self.already_loaded += other.already_loaded;
        self.loads_cancelled += other.loads_cancelled;
        self.joined_late += other.joined_late;
        self.cancels_hit += other.cancels_hit;
        self.unloads_freed += other.unloads_freed;
        self.unloads_not_freeing += other.unloads_not_freeing;
    }
}

/// Awaits `f` for at most [`WAIT`]; a longer wait fails the test as a hang.
async fn bounded<F: Future>(what: &str, f: F) -> F::Output {
    tokio::time::timeout(WAIT, f).await.unwrap_or_else(|_| panic!("{what}: no answer within {WAIT:?} (a hang)"))
}

/// A progress message is well formed: this model, step 1..=8 of 8, the step's phase.
fn check_progress(p: &pb::ModelLoadProgress, id: &str, what: &str) {
    assert_eq!(p.model_id, id, "{what}: progress of another model: {p:?}");
    assert_eq!(p.total, 8, "{what}: total is 8: {p:?}");
    let phase = match p.step {
        1..=3 => pb::ModelLoadPhase::Initialization,
        4 | 5 => pb::ModelLoadPhase::Loading,
        6 => pb::ModelLoadPhase::Device,
        7 => pb::ModelLoadPhase::Optimization,
        8 => pb::ModelLoadPhase::Finalization,
        _ => panic!("{what}: step outside 1..=8: {p:?}"),
    };
    assert_eq!(pb::ModelLoadPhase::try_from(p.phase), Ok(phase), "{what}: phase of step {}: {p:?}", p.step);
    assert!(p.bytes_done <= p.bytes_total, "{what}: more bytes done than in all: {p:?}");
}

/// A status is one a client may see in this test: a known model, no failure, and bytes that
/// match its state (the fixture's bytes while resident, none otherwise).
fn check_status(s: &pb::ModelStatus, models: &[Model], what: &str) -> S {
    let m = model(models, &s.model_id);
    let state = S::try_from(s.state).unwrap_or_else(|e| panic!("{what}: unknown state: {e}: {s:?}"));
    match state {
        S::Loaded | S::Unloading => {
            assert_eq!(s.weight_bytes, m.weights, "{what}: a resident model holds its fixture bytes: {s:?}");
            if state == S::Loaded {
                assert_eq!((s.device.as_str(), s.dtype.as_str()), ("cpu", "F32"), "{what}: {s:?}");
            }
        }
        S::Unloaded | S::Loading => assert_eq!(s.weight_bytes, 0, "{what}: nothing is resident: {s:?}"),
        S::Failed => panic!("{what}: {} FAILED (nothing in this test should fail): {}", s.model_id, s.error),
        S::Unspecified => panic!("{what}: state UNSPECIFIED: {s:?}"),
    }
    if let Some(p) = &s.last_progress {
        check_progress(p, &s.model_id, what);
    }
    state
}

/// The CPU figures are consistent: within the budget, `used` is the sum of the per-model bytes,
/// and every model holds whole copies of its fixture bytes.
fn check_cpu(devices: &[pb::DeviceResources], models: &[Model], budget: u64, what: &str) -> pb::DeviceResources {
    let cpu = devices.iter().find(|d| d.name == "cpu").unwrap_or_else(|| panic!("{what}: no cpu device"));
    assert_eq!(cpu.budget_bytes, budget, "{what}: the configured budget");
    assert!(
        cpu.used_bytes + cpu.reserved_bytes <= cpu.budget_bytes,
        "{what}: used {} + reserved {} exceeds the budget {}",
        cpu.used_bytes,
        cpu.reserved_bytes,
        cpu.budget_bytes
    );
    // The peak is kept under the ledger's lock at every change: at no moment, sampled or not, did
    // reservations and models together exceed the budget.
    assert!(
        cpu.used_bytes + cpu.reserved_bytes <= cpu.peak_bytes && cpu.peak_bytes <= cpu.budget_bytes,
        "{what}: used {} + reserved {}, peak {}, budget {}",
        cpu.used_bytes,
        cpu.reserved_bytes,
        cpu.peak_bytes,
        cpu.budget_bytes
    );
    assert_eq!(cpu.models.iter().map(|m| m.bytes).sum::<u64>(), cpu.used_bytes, "{what}: used is the per-model sum");
    for held in &cpu.models {
        // Its fixture bytes, or a multiple: a cancelled load's memory is freed just after its
        // stream ended, and a new load of the same model may already hold its own copy by then.
        let fixture = model(models, &held.model_id).bytes;
        assert!(
            held.bytes > 0 && held.bytes.is_multiple_of(fixture),
            "{what}: {} holds {} bytes, not a whole number of copies of its {fixture} fixture bytes",
            held.model_id,
            held.bytes
        );
    }
    cpu.clone()
}

/// LoadModel read to its end: steps never go back, the stream ends OK at 8/8 or CANCELLED.
async fn load_to_end(client: &mut ModelLoaderClient<Channel>, m: &Model, what: &str, stats: &mut TaskStats) {
    let mut stream = bounded(what, client.load_model(tests::load(&m.id)))
        .await
        .unwrap_or_else(|s| panic!("{what}: LoadModel refused before streaming: {s:?}"))
        .into_inner();
    let mut messages: Vec<pb::ModelLoadProgress> = Vec::new();
    let end = loop {
        match bounded(what, stream.message()).await {
            Ok(Some(p)) => {
                check_progress(&p, &m.id, what);
                if let Some(last) = messages.last() {
                    assert!(p.step >= last.step, "{what}: step {} after step {}", p.step, last.step);
                }
                messages.push(p);
            }
            Ok(None) => break Ok(()),
            Err(status) => break Err(status),
        }
    };
    if messages.first().is_some_and(|p| p.step > 1) {
        stats.joined_late += 1;
    }
    match end {
        Ok(()) => {
            let last = messages.last().unwrap_or_else(|| panic!("{what}: the stream ended OK without a message"));
            assert_eq!(last.step, 8, "{what}: an OK stream ends at step 8/8: {last:?}");
            if last.detail == "already loaded" {
                assert_eq!(messages.len(), 1, "{what}: \"already loaded\" is the only message: {messages:?}");
                stats.already_loaded += 1;
            } else {
                stats.loads_ok += 1;
            }
        }
        Err(status) => {
            assert_eq!(status.code(), Code::Cancelled, "{what}: a load stream ends OK or CANCELLED: {status:?}");
            stats.loads_cancelled += 1;
        }
    }
}

/// LoadModel, then hang up after `keep` messages: the load must not depend on its caller.
async fn load_and_leave(client: &mut ModelLoaderClient<Channel>, m: &Model, keep: usize, what: &str) {
    let mut stream = bounded(what, client.load_model(tests::load(&m.id)))
        .await
        .unwrap_or_else(|s| panic!("{what}: LoadModel refused before streaming: {s:?}"))
        .into_inner();
    let mut last_step = 0;
    for _ in 0..keep {
        match bounded(what, stream.message()).await {
            Ok(Some(p)) => {
                check_progress(&p, &m.id, what);
                assert!(p.step >= last_step, "{what}: step {} after step {last_step}", p.step);
                last_step = p.step;
            }
            Ok(None) => return,
            Err(status) => {
                assert_eq!(status.code(), Code::Cancelled, "{what}: a load stream ends OK or CANCELLED: {status:?}");
                return;
            }
        }
    }
}

/// A short-lived WatchModels of one model (or of all): the snapshot, up to `extra` more events
/// that arrive promptly, then the watcher leaves.
async fn short_watch(
    client: &mut ModelLoaderClient<Channel>,
    models: &[Model],
    one: Option<&Model>,
    extra: usize,
    what: &str,
) {
    let request = pb::WatchModelsRequest { model_id: one.map(|m| m.id.clone()).unwrap_or_default() };
    let mut stream = bounded(what, client.watch_models(request))
        .await
        .unwrap_or_else(|s| panic!("{what}: WatchModels refused: {s:?}"))
        .into_inner();
    let expected: Vec<&str> = match one {
        Some(m) => vec![m.id.as_str()],
        None => models.iter().map(|m| m.id.as_str()).collect(),
    };
    for id in expected {
        let event = bounded(what, stream.message())
            .await
            .unwrap_or_else(|s| panic!("{what}: the watch stream failed in its snapshot: {s:?}"))
            .unwrap_or_else(|| panic!("{what}: the watch stream ended in its snapshot"));
        match event.event {
            Some(Event::Status(s)) => {
                assert_eq!(s.model_id, id, "{what}: the snapshot lists the models in order");
                check_status(&s, models, what);
            }
            other => panic!("{what}: a snapshot is statuses, not {other:?}"),
        }
    }
    for _ in 0..extra {
        let Ok(next) = tokio::time::timeout(SHORT_WATCH, stream.message()).await else { return };
        let event = next
            .unwrap_or_else(|s| panic!("{what}: the watch stream failed: {s:?}"))
            .unwrap_or_else(|| panic!("{what}: the watch stream ended while the server runs"));
        match event.event {
            Some(Event::Status(s)) => {
                check_status(&s, models, what);
                if let Some(m) = one {
                    assert_eq!(s.model_id, m.id, "{what}: only the watched model");
                }
            }
            Some(Event::Progress(p)) => {
                let id = one.map_or(p.model_id.as_str(), |m| m.id.as_str());
                check_progress(&p, id, what);
            }
            None => panic!("{what}: an empty event"),
        }
    }
}

/// One client task: `ops` random operations on random models.
async fn client_task(
    index: usize,
    seed: u64,
    ops: usize,
    addr: std::net::SocketAddr,
    models: Models,
    budget: u64,
) -> TaskStats {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut client = tests::connect(addr).await;
    let mut stats = TaskStats::default();
    for n in 0..ops {
        let op = pick(&mut rng);
        let m = &models[rng.random_range(0..models.len())];
        let what = format!("task {index} op {n} ({op:?} {})", m.id);
        *stats.ops.entry(op).or_default() += 1;
        match op {
            Op::Load => load_to_end(&mut client, m, &what, &mut stats).await,
            Op::LoadAndLeave => load_and_leave(&mut client, m, rng.random_range(0..3), &what).await,
            Op::Unload => {
                let r = bounded(
                    &what,
                    client.unload_model(pb::UnloadModelRequest { model_id: m.id.clone(), force: false }),
                )
                .await
                .unwrap_or_else(|s| panic!("{what}: UnloadModel is always OK: {s:?}"))
                .into_inner();
                let expected = if r.was_loaded { m.bytes } else { 0 };
                assert_eq!(r.freed_bytes, expected, "{what}: freed bytes: {r:?}");
                stats.unloads_freed += u64::from(r.was_loaded);
                stats.unloads_not_freeing += u64::from(!r.was_loaded);
            }
            Op::Cancel => {
                let r = bounded(&what, client.cancel_load(pb::CancelLoadRequest { model_id: m.id.clone() }))
                    .await
                    .unwrap_or_else(|s| panic!("{what}: CancelLoad is always OK: {s:?}"))
                    .into_inner();
                stats.cancels_hit += u64::from(r.was_loading);
            }
            Op::Watch => {
                let one = rng.random_bool(0.5).then_some(m);
                short_watch(&mut client, &models, one, rng.random_range(0..8), &what).await;
            }
            Op::GetModel => {
                let s = bounded(&what, client.get_model(pb::GetModelRequest { model_id: m.id.clone() }))
                    .await
                    .unwrap_or_else(|s| panic!("{what}: GetModel is always OK: {s:?}"))
                    .into_inner();
                assert_eq!(s.model_id, m.id, "{what}");
                check_status(&s, &models, &what);
            }
            Op::GetResources => {
                let r = bounded(&what, client.get_resources(pb::GetResourcesRequest {}))
                    .await
                    .unwrap_or_else(|s| panic!("{what}: GetResources is always OK: {s:?}"))
                    .into_inner();
                check_cpu(&r.devices, &models, budget, &what);
            }
            Op::ListModels => {
                let listed = bounded(&what, client.list_models(pb::ListModelsRequest::default()))
                    .await
                    .unwrap_or_else(|s| panic!("{what}: ListModels is always OK: {s:?}"))
                    .into_inner()
                    .models;
                let ids: Vec<&str> = listed.iter().map(|s| s.model_id.as_str()).collect();
                let expected: Vec<&str> = models.iter().map(|m| m.id.as_str()).collect();
                assert_eq!(ids, expected, "{what}: every fixture model, sorted");
                for s in &listed {
                    check_status(s, &models, &what);
                }
            }
        }
        // After every operation: within the budget, and each model holding its tensors' bytes.
        resources(&mut client, &models, budget, &format!("{what}, then GetResources")).await;
    }
    stats
}

/// What the long-running watcher saw.
#[derive(Debug, Default)]
struct WatchReport {
    events: u64,
    loads_started: u64,
    loads_completed: u64,
    loads_cancelled: u64,
    /// Cancelled loads by the last step they reached (0: before step 1).
    cancelled_at_step: [u64; 9],
    unloads: u64,
    /// Unloads the server did by itself to make room (`--evict lru`).
    evictions: u64,
}

/// Per model: its state as the watcher saw it and the last step of its current load.
#[derive(Debug, Clone, Copy)]
struct Track {
    state: S,
    step: u32,
}

/// Follows every event of every model after the initial snapshot and checks each against the
/// state table: a LOADING status only from UNLOADED or FAILED (never a second load while one is in
/// flight), progress only while LOADING with steps starting at 1 and never going back, LOADED only
/// after step 8. A lagging watcher would be sent a fresh snapshot, whose repeated statuses break
/// the table too, so a lag fails the test rather than hiding a gap. Publishes the states it has
/// seen on `seen`.
async fn watch_everything(
    mut stream: Streaming<pb::ModelEvent>,
    models: Models,
    seen: watch::Sender<BTreeMap<String, S>>,
    mut stop: oneshot::Receiver<()>,
) -> WatchReport {
    let mut tracks: BTreeMap<String, Track> =
        models.iter().map(|m| (m.id.clone(), Track { state: S::Unloaded, step: 0 })).collect();
    let mut report = WatchReport::default();
    loop {
        let item = tokio::select! {
            biased;
            _ = &mut stop => return report,
            item = stream.message() => item,
        };
        let event = item
            .unwrap_or_else(|s| panic!("watcher: the stream failed: {s:?}"))
            .unwrap_or_else(|| panic!("watcher: the stream ended while the server runs"))
            .event
            .unwrap_or_else(|| panic!("watcher: an empty event"));
        report.events += 1;
        match event {
            Event::Status(s) => {
                let what = format!("watcher, event {}", report.events);
                let to = check_status(&s, &models, &what);
                let track = tracks.get_mut(&s.model_id).unwrap_or_else(|| panic!("{what}: unknown model {s:?}"));
                let from = track.state;
                let legal = matches!(
                    (from, to),
                    (S::Unloaded | S::Failed, S::Loading)
                        | (S::Loading, S::Loaded | S::Failed | S::Unloaded)
                        | (S::Loaded, S::Unloading)
                        | (S::Unloading | S::Failed, S::Unloaded)
                );
                assert!(
                    legal,
                    "{what}: {}: {from:?} -> {to:?} is not in the state table (two loads of one model, or the \
                     watcher lagged and was sent a snapshot): {s:?}",
                    s.model_id
                );
                match to {
                    S::Loading => {
                        assert!(
                            s.last_progress.is_none(),
                            "{what}: a load starts without progress; this LOADING status is a snapshot (the \
                             watcher lagged): {s:?}"
                        );
                        report.loads_started += 1;
                        track.step = 0;
                    }
                    S::Loaded => {
                        assert_eq!(track.step, 8, "{what}: {} LOADED before step 8 was published", s.model_id);
                        assert_eq!(s.last_progress.as_ref().map(|p| p.step), Some(8), "{what}: {s:?}");
                        report.loads_completed += 1;
                    }
                    S::Unloaded if from == S::Loading => {
                        report.loads_cancelled += 1;
                        report.cancelled_at_step[track.step as usize] += 1;
                    }
                    S::Unloaded => {
                        report.unloads += 1;
                        if !s.unload_reason.is_empty() {
                            assert!(s.unload_reason.starts_with("evicted"), "{what}: {s:?}");
                            report.evictions += 1;
                        }
                    }
                    _ => {}
                }
                track.state = to;
                seen.send_replace(tracks.iter().map(|(id, t)| (id.clone(), t.state)).collect());
            }
            Event::Progress(p) => {
                let what = format!("watcher, event {}", report.events);
                check_progress(&p, &p.model_id, &what);
                let track = tracks.get_mut(&p.model_id).unwrap_or_else(|| panic!("{what}: unknown model {p:?}"));
                assert_eq!(track.state, S::Loading, "{what}: progress while {:?}: {p:?}", track.state);
                if track.step == 0 {
                    assert_eq!(p.step, 1, "{what}: a load's first message is step 1: {p:?}");
                }
                assert!(p.step >= track.step, "{what}: step {} after step {} in one load", p.step, track.step);
                track.step = p.step;
            }
        }
    }
}

/// Waits (through a WatchModels of the model) until it is neither LOADING nor UNLOADING, and
/// returns that status.
async fn settled(client: &mut ModelLoaderClient<Channel>, models: &[Model], id: &str) -> pb::ModelStatus {
    let what = format!("settling {id}");
    let mut stream = bounded(&what, client.watch_models(pb::WatchModelsRequest { model_id: id.into() }))
        .await
        .unwrap_or_else(|s| panic!("{what}: WatchModels refused: {s:?}"))
        .into_inner();
    loop {
        let event = bounded(&what, stream.message())
            .await
            .unwrap_or_else(|s| panic!("{what}: the stream failed: {s:?}"))
            .unwrap_or_else(|| panic!("{what}: the stream ended"));
        if let Some(Event::Status(s)) = event.event
            && matches!(check_status(&s, models, &what), S::Loaded | S::Unloaded)
        {
            return s;
        }
    }
}

async fn resources(
    client: &mut ModelLoaderClient<Channel>,
    models: &[Model],
    budget: u64,
    what: &str,
) -> pb::DeviceResources {
    let r = bounded(what, client.get_resources(pb::GetResourcesRequest {}))
        .await
        .unwrap_or_else(|s| panic!("{what}: GetResources: {s:?}"))
        .into_inner();
    check_cpu(&r.devices, models, budget, what)
}

async fn cpu_peak(client: &mut ModelLoaderClient<Channel>) -> u64 {
    tests::cpu_resources(client).await.peak_bytes
}

fn env_number(name: &str) -> Option<u64> {
    let value = std::env::var(name).ok()?;
    Some(value.trim().parse().unwrap_or_else(|e| panic!("{name}={value:?} is not a number: {e}")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn random_concurrent_operations_keep_the_invariants() {
    run(EvictPolicy::None).await;
}

/// The same with room for two of the three models: loads evict the least recently used model.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn random_concurrent_operations_with_eviction_keep_the_invariants() {
    run(EvictPolicy::Lru).await;
}

// One scenario, read top to bottom.
#[allow(clippy::too_many_lines)]
async fn run(evict: EvictPolicy) {
    let seed = env_number("CONCURRENCY_SEED").unwrap_or_else(|| {
        SystemTime::now().duration_since(UNIX_EPOCH).expect("the clock is after 1970").as_nanos() as u64
    });
    let ops = env_number("CONCURRENCY_OPS").map_or(DEFAULT_OPS, |n| n as usize);
    eprintln!(
        "concurrency ({evict}): seed {seed}, {ops} operations on {TASKS} tasks (rerun with CONCURRENCY_SEED={seed})"
    );

    // Three models of 6 to 8 MiB: a load takes long enough that cancels and joins land mid-load.
    let tmp = tempfile::tempdir().expect("a temporary model root");
    let root = tmp.path();
    let fixtures = [
        ("alpha", fixture::single_file_model(&root.join("alpha"), &fixture::f32_tensors("alpha", 8, 256 * 1024))),
        ("beta", fixture::sharded_model(&root.join("beta"), &fixture::f32_tensors("beta", 12, 128 * 1024), 3)),
        ("gamma", fixture::single_file_model(&root.join("gamma"), &fixture::f32_tensors("gamma", 4, 512 * 1024))),
    ];
    let models: Models = std::sync::Arc::new(
        fixtures
            .into_iter()
            .map(|(id, expected)| {
                let expected = expected.expect("writing a fixture model");
                Model { id: id.into(), bytes: expected.booked(), weights: expected.bytes() }
            })
            .collect(),
    );
    // Without eviction the budget holds all three models and not a byte more: leaked accounting
    // shows up as a RESOURCE_EXHAUSTED load. With eviction it holds the two largest: two loads
    // run at once (the default), so evicting the loaded model always makes room, and a load that
    // fails is a bug here too.
    let mut sizes: Vec<u64> = models.iter().map(|m| m.bytes).collect();
    sizes.sort_unstable();
    let budget: u64 = match evict {
        EvictPolicy::None => sizes.iter().sum(),
        EvictPolicy::Lru => sizes[1] + sizes[2],
    };
    let mut config = tests::config(root);
    config.manager.event_capacity = EVENT_CAPACITY;
    config.manager.budget = MemoryBudget::Bytes(budget);
    config.manager.loader.evict = evict;
    assert_eq!(config.manager.loader.max_concurrent_loads, 2, "the budget above assumes two loads at once");
    let server = TestServer::start(config).await;
    let mut client = server.client().await;

    // The long-running watcher subscribes (and reads its snapshot: every model UNLOADED) first.
    let mut all = bounded("watcher", client.watch_models(pb::WatchModelsRequest::default()))
        .await
        .expect("WatchModels")
        .into_inner();
    for m in models.iter() {
        let event = bounded("watcher snapshot", all.message()).await.expect("the snapshot").expect("a snapshot event");
        match event.event {
            Some(Event::Status(s)) => {
                assert_eq!((s.model_id.as_str(), s.state()), (m.id.as_str(), S::Unloaded), "snapshot: {s:?}")
            }
            other => panic!("the snapshot is statuses, not {other:?}"),
        }
    }
    let initial: BTreeMap<String, S> = models.iter().map(|m| (m.id.clone(), S::Unloaded)).collect();
    let (seen_tx, mut seen) = watch::channel(initial);
    let (stop_watcher, stopped) = oneshot::channel();
    let watcher = tokio::spawn(watch_everything(all, models.clone(), seen_tx, stopped));

    let started = Instant::now();
    let mut seeds = StdRng::seed_from_u64(seed);
    let tasks: Vec<_> = (0..TASKS)
        .map(|i| {
            let task_ops = ops / TASKS + usize::from(i < ops % TASKS);
            tokio::spawn(client_task(i, seeds.random(), task_ops, server.addr, models.clone(), budget))
        })
        .collect();
    let mut stats = TaskStats::default();
    let deadline = tokio::time::Instant::now() + ALL_TASKS;
    for (i, task) in tasks.into_iter().enumerate() {
        match tokio::time::timeout_at(deadline, task).await {
            Ok(Ok(task_stats)) => stats.add(&task_stats),
            Ok(Err(join)) => std::panic::resume_unwind(join.into_panic()),
            Err(_) => panic!("task {i} did not finish within {ALL_TASKS:?} (a hang)"),
        }
    }
    let ran = started.elapsed();

    // Loads left by callers that hung up go on: wait for every model to settle.
    let mut finals = BTreeMap::new();
    for m in models.iter() {
        let s = settled(&mut client, &models, &m.id).await;
        finals.insert(m.id.clone(), s);
    }
    // Nothing runs any more: GetModel agrees, and the watcher has seen exactly these states.
    for m in models.iter() {
        let s = bounded("final GetModel", client.get_model(pb::GetModelRequest { model_id: m.id.clone() }))
            .await
            .expect("GetModel")
            .into_inner();
        assert_eq!(s.state(), finals[&m.id].state(), "{}: the state stays put once everything ended", m.id);
    }
    let final_states: BTreeMap<String, S> = finals.iter().map(|(id, s)| (id.clone(), s.state())).collect();
    if bounded("the watcher catching up", seen.wait_for(|states| *states == final_states)).await.is_err() {
        // The watcher stopped publishing: it panicked on a broken invariant.
        match watcher.await {
            Err(join) if join.is_panic() => std::panic::resume_unwind(join.into_panic()),
            other => panic!("the watcher ended early: {other:?}"),
        }
    }

    // Accounting equals the bytes of the LOADED models, nothing is reserved, once the memory of
    // the cancelled loads is back (it is freed just after their streams end).
    let loaded_ids: Vec<&str> =
        models.iter().filter(|m| final_states[&m.id] == S::Loaded).map(|m| m.id.as_str()).collect();
    tests::cpu_resources_when(&mut client, |cpu| {
        cpu.reserved_bytes == 0 && cpu.models.iter().map(|m| m.model_id.as_str()).eq(loaded_ids.iter().copied())
    })
    .await;
    let cpu = resources(&mut client, &models, budget, "final GetResources").await;
    let loaded: Vec<&Model> = models.iter().filter(|m| final_states[&m.id] == S::Loaded).collect();
    let weight_bytes: u64 = finals.values().filter(|s| s.state() == S::Loaded).map(|s| s.weight_bytes).sum();
    let fixture_bytes: u64 = loaded.iter().map(|m| m.weights).sum();
    let booked: u64 = loaded.iter().map(|m| m.bytes).sum();
    assert_eq!(cpu.used_bytes, booked, "used bytes are the booked bytes of the LOADED models");
    assert_eq!(weight_bytes, fixture_bytes, "the LOADED models hold their fixture bytes");
    assert_eq!(cpu.reserved_bytes, 0, "no load is in flight, nothing is reserved");
    let held: Vec<(&str, u64)> = cpu.models.iter().map(|m| (m.model_id.as_str(), m.bytes)).collect();
    let expected: Vec<(&str, u64)> = loaded.iter().map(|m| (m.id.as_str(), m.bytes)).collect();
    assert_eq!(held, expected, "GetResources lists exactly the LOADED models");
    for m in &loaded {
        let request = pb::ListTensorsRequest { model_id: m.id.clone(), with_checksums: false };
        let tensors = bounded("final ListTensors", client.list_tensors(request)).await.expect("ListTensors");
        let tensor_bytes: u64 = tensors.into_inner().tensors.iter().map(|t| t.size_bytes).sum();
        assert_eq!(tensor_bytes, m.weights, "{}: accounted bytes are the resident tensors' bytes", m.id);
    }

    // Unloading everything gives every byte back.
    for m in models.iter() {
        let r = bounded(
            "final UnloadModel",
            client.unload_model(pb::UnloadModelRequest { model_id: m.id.clone(), force: false }),
        )
        .await
        .expect("UnloadModel")
        .into_inner();
        let was_loaded = final_states[&m.id] == S::Loaded;
        assert_eq!((r.was_loaded, r.freed_bytes), (was_loaded, if was_loaded { m.bytes } else { 0 }), "{}", m.id);
    }
    let cpu = resources(&mut client, &models, budget, "GetResources after unloading all").await;
    assert_eq!((cpu.used_bytes, cpu.reserved_bytes), (0, 0), "everything unloaded: {cpu:?}");
    assert!(cpu.models.is_empty(), "no model holds memory: {cpu:?}");
    let unloaded: BTreeMap<String, S> = models.iter().map(|m| (m.id.clone(), S::Unloaded)).collect();
    for m in models.iter() {
        assert_eq!(bounded("final GetModel", tests::state_of(&mut client, &m.id)).await, S::Unloaded, "{}", m.id);
    }
    if bounded("the watcher seeing the unloads", seen.wait_for(|states| *states == unloaded)).await.is_err() {
        match watcher.await {
            Err(join) if join.is_panic() => std::panic::resume_unwind(join.into_panic()),
            other => panic!("the watcher ended early: {other:?}"),
        }
    }
    let _ = stop_watcher.send(());
    let report = match bounded("stopping the watcher", watcher).await {
        Ok(report) => report,
        Err(join) => std::panic::resume_unwind(join.into_panic()),
    };

    eprintln!("concurrency: {ops} operations in {:.1} s; per operation: {:?}", ran.as_secs_f64(), stats.ops);
    eprintln!("concurrency: peak {} of a budget of {budget} bytes", cpu_peak(&mut client).await);
    eprintln!(
        "concurrency: load streams: {} loaded, {} already loaded, {} cancelled, {} joined past step 1; \
         {} cancels found a load, {} unloads freed a model, {} freed nothing",
        stats.loads_ok,
        stats.already_loaded,
        stats.loads_cancelled,
        stats.joined_late,
        stats.cancels_hit,
        stats.unloads_freed,
        stats.unloads_not_freeing
    );
    eprintln!(
        "concurrency: watcher: {} events, {} loads started, {} completed, {} cancelled (by last step 0..=8: {:?}), \
         {} unloads ({} evictions)",
        report.events,
        report.loads_started,
        report.loads_completed,
        report.loads_cancelled,
        report.cancelled_at_step,
        report.unloads,
        report.evictions
    );
    // Every load the watcher saw start ended, one way or the other (the final unloads included).
    assert_eq!(report.loads_started, report.loads_completed + report.loads_cancelled, "every load ended");
    // A load ends UNLOADED only when a client cancelled or unloaded it: never because a caller left
    // (LoadAndLeave) or its stream was dropped.
    assert!(
        report.loads_cancelled <= stats.cancels_hit + stats.unloads_not_freeing,
        "{} loads ended LOADING -> UNLOADED, but only {} CancelLoads found a load and {} UnloadModels might have \
         cancelled one",
        report.loads_cancelled,
        stats.cancels_hit,
        stats.unloads_not_freeing
    );
    if ops >= DEFAULT_OPS {
        assert!(report.loads_completed > 0 && report.loads_cancelled > 0, "the run exercised loads and cancels");
        if evict == EvictPolicy::Lru {
            assert!(report.evictions > 0, "the run evicted models");
        }
    }
    if evict == EvictPolicy::None {
        assert_eq!(report.evictions, 0, "nothing is evicted without --evict lru");
    }
    server.stop().await;
}
