//! A model's life across its callers: a load outlives the client that asked for it, and a load
//! asked for while the model is UNLOADING waits for the unload to end and then loads afresh.

use std::{
    alloc::{GlobalAlloc, Layout, System},
    collections::BTreeSet,
    net::SocketAddr,
    pin::pin,
    sync::{
        Arc, Condvar, Mutex, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
};

use model_manager::{
    LoadRequest, LoadUpdate, ModelId, ModelManager, ModelStatus, Unloaded,
    state_manager::{ModelState, StateEvent},
};
use proto::v1::{self as pb, model_event::Event};
use tests::{TestServer, WAIT, checksums, config, connect, fixture, load_until_step4, next_event, next_status, watch};

// ---- The gate: an unload held inside UNLOADING --------------------------------------------------

/// The system allocator with a gate: once armed, the first thread that frees a block of exactly
/// [`MARKER_BYTES`] (the host memory of the model of
/// [`a_load_asked_for_while_unloading_waits_then_loads`]) stops there until the test lets it go.
/// An unload frees a CPU model's tensors between UNLOADING and UNLOADED, so this holds the unload
/// inside UNLOADING for as long as the test needs, with no timing involved.
struct GatedAllocator;

#[global_allocator]
static ALLOCATOR: GatedAllocator = GatedAllocator;

/// Elements of the marker tensor: an F32 tensor of an odd size.
const MARKER_ELEMS: usize = 1_234_567;
/// Elements of each of the model's three other F32 tensors.
const SMALL_ELEMS: usize = 4096;
/// The block the model's tensors share in host memory: F32 tensors back to back in one file are
/// one allocation of whole 8-byte words (`weights::HostBuffer`), a size no other allocation of
/// these tests has (4,987,424 bytes).
const MARKER_BYTES: usize = (MARKER_ELEMS + 3 * SMALL_ELEMS).div_ceil(2) * 8;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Gate {
    /// Frees pass.
    Open,
    /// The next free of the marker block stops.
    Armed,
    /// A thread is stopped in the free of the marker block.
    Holding,
    /// The held thread may go on.
    Released,
}

/// Checked on every free, so the gate costs one relaxed load while it is not armed.
static ARMED: AtomicBool = AtomicBool::new(false);
static GATE: Mutex<Gate> = Mutex::new(Gate::Open);
static GATE_CHANGED: Condvar = Condvar::new();

// SAFETY: every call is forwarded to the system allocator unchanged; the gate only delays a free,
// and what it does meanwhile (a futex-based mutex and condvar) never allocates.
#[allow(unsafe_code)] // a global allocator is unsafe to implement; this one forwards every call to System
unsafe impl GlobalAlloc for GatedAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract, passed on.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract, passed on.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller's contract, passed on.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if layout.size() == MARKER_BYTES && ARMED.load(Ordering::Relaxed) {
            hold_here();
        }
        // SAFETY: the caller's contract, passed on.
        unsafe { System.dealloc(ptr, layout) }
    }
}

/// Stops the calling thread (inside a free of the marker block) until the gate is released, or
/// for [`WAIT`] at most.
fn hold_here() {
    let mut gate = GATE.lock().unwrap_or_else(PoisonError::into_inner);
    if *gate != Gate::Armed {
        return;
    }
    *gate = Gate::Holding;
    ARMED.store(false, Ordering::Relaxed);
    GATE_CHANGED.notify_all();
    let (mut gate, _) =
        GATE_CHANGED.wait_timeout_while(gate, WAIT, |g| *g == Gate::Holding).unwrap_or_else(|p| p.into_inner());
    *gate = Gate::Open;
}

/// The armed gate; dropping it opens the gate and lets a held thread go (also when the test fails
/// while it holds one).
struct ArmedGate;

impl ArmedGate {
    fn arm() -> Self {
        let mut gate = GATE.lock().unwrap_or_else(PoisonError::into_inner);
        assert_eq!(*gate, Gate::Open, "one gate at a time");
        *gate = Gate::Armed;
        ARMED.store(true, Ordering::Relaxed);
        Self
    }

    /// Waits (blocking this thread, for [`WAIT`] at most) until a thread is held at the gate.
    fn wait_until_holding(&self) {
        let gate = GATE.lock().unwrap_or_else(PoisonError::into_inner);
        let (gate, _) =
            GATE_CHANGED.wait_timeout_while(gate, WAIT, |g| *g == Gate::Armed).unwrap_or_else(|p| p.into_inner());
        assert_eq!(*gate, Gate::Holding, "the unload never freed the model's memory within {WAIT:?}");
    }
}

impl Drop for ArmedGate {
    fn drop(&mut self) {
        ARMED.store(false, Ordering::Relaxed);
        let mut gate = GATE.lock().unwrap_or_else(PoisonError::into_inner);
        *gate = match *gate {
            Gate::Holding => Gate::Released,
            _ => Gate::Open,
        };
        GATE_CHANGED.notify_all();
    }
}

// ---- Connections, as the kernel sees them ----------------------------------------------------

/// TCP states of /proc/net/tcp.
const ESTABLISHED: &str = "01";
const CLOSE_WAIT: &str = "08";

/// The IPv4 sockets of this network namespace as (local port, remote port, state).
fn tcp_sockets() -> Vec<(u16, u16, String)> {
    let table = std::fs::read_to_string("/proc/net/tcp").expect("read /proc/net/tcp");
    let port = |addr: &str| u16::from_str_radix(addr.rsplit(':').next().expect("addr:port"), 16).expect("a hex port");
    table
        .lines()
        .skip(1)
        .map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            (port(fields[1]), port(fields[2]), fields[3].to_owned())
        })
        .collect()
}

/// The local ports of the clients connected to the server at `server` (their end ESTABLISHED).
fn clients_of(server: SocketAddr) -> BTreeSet<u16> {
    tcp_sockets()
        .into_iter()
        .filter(|(_, remote, state)| *remote == server.port() && state == ESTABLISHED)
        .map(|(local, _, _)| local)
        .collect()
}

/// Whether the connection of the client at local port `client` to `server` is closed on both
/// ends: the client's end is no longer ESTABLISHED and the server's has been closed (neither
/// ESTABLISHED nor waiting to be closed), so the server has seen the client go.
fn closed(server: SocketAddr, client: u16) -> bool {
    !tcp_sockets().into_iter().any(|(local, remote, state)| {
        (local == client && remote == server.port() && state == ESTABLISHED)
            || (local == server.port() && remote == client && (state == ESTABLISHED || state == CLOSE_WAIT))
    })
}

// ---- Tests -----------------------------------------------------------------------------------

/// A client that disconnects in step 4 does not stop the load: it goes on to LOADED, never UNLOADED.
///
/// The leaving client has a connection of its own; once it is dropped with its stream, the test
/// waits until the kernel shows that connection closed on both ends (the server closed its end),
/// checks the model is still LOADING then, and watches from another connection: the model's
/// statuses after LOADING must be LOADED and nothing else (a cancelled load would be UNLOADED, a
/// failed one FAILED; either fails the test at once). Every resident tensor then matches the files.
#[tokio::test]
async fn a_client_that_disconnects_mid_load_does_not_stop_it() {
    let tmp = tempfile::tempdir().expect("tmp");
    let expected = fixture::large_sharded_model(&tmp.path().join("big"), 1024, 2, 4).expect("fixture");
    let server = TestServer::start(config(tmp.path())).await;
    let mut observer = server.client().await;
    let mut events = watch(&mut observer, "big").await;
    assert_eq!(next_status(&mut events).await.state(), pb::ModelState::Unloaded, "the snapshot");

    let others = clients_of(server.addr);
    let mut leaver = connect(server.addr).await;
    let stream = load_until_step4(&mut leaver, "big").await;
    let leaver_ports: Vec<u16> = clients_of(server.addr).difference(&others).copied().collect();
    let [leaver_port] = leaver_ports[..] else {
        panic!("the leaving client has exactly one connection of its own: {leaver_ports:?} (others: {others:?})")
    };
    drop(stream);
    drop(leaver);

    // The connection is gone once the kernel shows it closed; asked again every millisecond.
    tests::eventually!(
        closed(server.addr, leaver_port),
        "the leaving client's connection was not closed within {WAIT:?}"
    );
    let now = tokio::time::timeout(WAIT, observer.get_model(pb::GetModelRequest { model_id: "big".into() }))
        .await
        .expect("GetModel answers")
        .expect("GetModel")
        .into_inner();
    assert_eq!(
        now.state(),
        pb::ModelState::Loading,
        "the load is still running when its only client's connection is closed (else the fixture is too small): {now:?}"
    );
    if let Some(p) = &now.last_progress {
        eprintln!("the connection was closed at step {}, {} of {} bytes", p.step, p.bytes_done, p.bytes_total);
    }

    let mut seen = Vec::new();
    loop {
        match next_event(&mut events).await {
            Event::Status(status) if status.model_id == "big" => {
                let state = status.state();
                seen.push(state);
                match state {
                    pb::ModelState::Loading => {}
                    pb::ModelState::Loaded => break,
                    _ => panic!("the load did not survive its client: the model went {state:?}: {status:?}"),
                }
            }
            _ => {}
        }
    }
    assert_eq!(seen, [pb::ModelState::Loading, pb::ModelState::Loaded], "one load, from LOADING to LOADED");
    assert_eq!(checksums(&mut observer, "big").await, expected.tensors, "every tensor as in the files");
    drop(events);
    server.stop().await;
}

/// The next status of `id` on a facade watch, skipping progress; within [`WAIT`].
async fn next_state(watch: &mut model_manager::WatchSubscription) -> ModelStatus {
    loop {
        match tokio::time::timeout(WAIT, watch.next()).await.expect("the watch moves").expect("the watch stays open") {
            StateEvent::Status(status) => return status,
            StateEvent::Progress(_) => {}
        }
    }
}

/// A load asked for while the model is UNLOADING waits for the unload, then loads from step 1 to 8.
///
/// Through the facade, so the unload can be held inside UNLOADING (see [`GatedAllocator`]): the
/// unload runs on a thread of its own and stops while freeing the model's host memory, with the
/// model UNLOADING. The load is then asked for and polled once: it must see UNLOADING and wait
/// (pending), not start and not answer "already loaded". Released, the unload ends (UNLOADED,
/// every byte freed) and only then does the load begin: the watch shows LOADED (snapshot),
/// UNLOADING, UNLOADED, LOADING, LOADED; the load's stream runs steps 1..=8 and succeeds, and the
/// tensors match the files.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_load_asked_for_while_unloading_waits_then_loads() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut tensors = fixture::f32_tensors("small", 3, SMALL_ELEMS);
    tensors.push(fixture::TensorSpec::f32("marker.weight", &[MARKER_ELEMS], 7));
    let expected = fixture::single_file_model(&tmp.path().join("m"), &tensors).expect("fixture");
    drop(tensors);
    let manager = Arc::new(ModelManager::new(config(tmp.path()).manager, &Default::default()).expect("manager"));
    let id = ModelId::parse("m").expect("id");
    let first = outcome(manager.load(LoadRequest::new(id.clone())).await.expect("the first load")).await;
    assert_eq!(first.1, Ok(()), "the first load succeeds: {:?}", first.0);
    let mut watch = manager.watch(Some(id.clone()));
    assert_eq!(next_state(&mut watch).await.state, ModelState::Loaded, "the snapshot");

    let gate = ArmedGate::arm();
    let runtime = tokio::runtime::Handle::current();
    let unload = tokio::task::spawn_blocking({
        let (manager, id) = (manager.clone(), id.clone());
        move || runtime.block_on(manager.unload(&id, false))
    });
    // Blocks this thread (the test's own, not a worker) until the unload is held.
    gate.wait_until_holding();
    let now = manager.get(&id).expect("status");
    assert_eq!(now.state, ModelState::Unloading, "the unload is held while UNLOADING: {now:?}");

    let mut load = pin!(manager.load(LoadRequest::new(id.clone())));
    assert!(futures::poll!(load.as_mut()).is_pending(), "a load asked for while UNLOADING waits for the unload");
    assert_eq!(manager.get(&id).expect("status").state, ModelState::Unloading, "the waiting load started nothing");

    drop(gate);
    let unloaded = tokio::time::timeout(WAIT, unload).await.expect("the unload ends").expect("the unload thread");
    assert_eq!(
        unloaded.expect("unload"),
        Unloaded { was_loaded: true, freed_bytes: expected.booked() },
        "the unload freed the whole model"
    );
    let subscription = tokio::time::timeout(WAIT, load).await.expect("the waiting load starts").expect("load");
    let (messages, end) = outcome(subscription).await;
    assert_eq!(end, Ok(()), "the load after the unload succeeds: {messages:?}");
    let steps: Vec<u32> = messages.iter().map(|m| m.step.number()).collect();
    assert!(steps.is_sorted(), "steps in order: {steps:?}");
    assert_eq!(steps.iter().copied().collect::<BTreeSet<_>>(), (1..=8).collect(), "every step, 1 to 8: {steps:?}");
    assert!(!messages.iter().any(|m| m.detail == "already loaded"), "a real load, not the old model: {messages:?}");

    let mut states = Vec::new();
    while states.last() != Some(&ModelState::Loaded) {
        states.push(next_state(&mut watch).await.state);
    }
    assert_eq!(
        states,
        [ModelState::Unloading, ModelState::Unloaded, ModelState::Loading, ModelState::Loaded],
        "the unload ended before the load began"
    );
    let resident: std::collections::BTreeMap<_, _> = manager
        .tensors(&id, true)
        .await
        .expect("tensors")
        .into_iter()
        .map(|t| (t.name, (t.dtype.to_owned(), t.shape, t.sha256.expect("a checksum"))))
        .collect();
    assert_eq!(resident, expected.tensors, "every tensor as in the file");
    manager.shutdown().await;
}

/// Reads a facade load to its end: its progress messages and its outcome.
async fn outcome(
    mut subscription: model_manager::LoadSubscription,
) -> (Vec<model_manager::steps::ModelLoadProgress>, Result<(), String>) {
    let mut messages = Vec::new();
    loop {
        match tokio::time::timeout(WAIT, subscription.next()).await.expect("the load moves") {
            Some(LoadUpdate::Progress(p)) => messages.push(p),
            Some(LoadUpdate::Done(done)) => return (messages, done.map_err(|e| e.to_string())),
            None => return (messages, Err("the stream ended without an outcome".into())),
        }
    }
}
