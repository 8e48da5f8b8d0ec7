//! Progress fan-out: late LoadModel joiners, a LoadModel caller that falls behind, and a
//! WatchModels watcher that falls behind, each checked message by message against a reference
//! stream that saw every message.
//!
//! What the server guarantees and these tests rely on (crates/loader-service `LoadHandle`,
//! crates/model-manager `WatchSubscription`, crates/state-manager `StateManager`):
//!
//! - A LoadModel stream is a subscription to the load: its latest message and the broadcast are
//!   taken under one lock, so a joiner gets the latest message, then every later one, no gap.
//! - Every progress message of a load is sent to its LoadModel subscribers and, while the model is
//!   LOADING, published to WatchModels as well: a watcher that does not lag sees exactly the load's
//!   messages, in the order the load sent them.
//! - A LoadModel subscriber that falls more than the per-load channel's 256 messages behind
//!   (`LOAD_STREAM_CAPACITY`) starts again from the latest message; the outcome is kept in the
//!   handle and never lost.
//! - A watcher that falls more than `event_capacity` events behind resubscribes and then gets a
//!   fresh snapshot: the status of every model (for a watch of all models, `ListModels`' list).

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
};

use model_manager::{EvictPolicy, resource_manager::MemoryBudget};
use proto::v1::{self as pb, model_event::Event, model_loader_client::ModelLoaderClient};
use tests::{
    TestServer, WAIT, config, cpu_resources, end_of, fixture,
    hub::{Fault, HubRepo, TestHub},
    load, load_all, load_ok, next_event, next_status, open_load, read_until, rest_of, state_of, until_status, watch,
};
use tonic::transport::Channel;

type Client = ModelLoaderClient<Channel>;

/// Room in a load's channel (`LOAD_STREAM_CAPACITY` in crates/loader-service/src/lib.rs, a power
/// of two, so tokio's broadcast holds exactly this many).
const LOAD_STREAM_CAPACITY: usize = 256;

/// A client whose HTTP/2 streams have a 64-byte window: while the test does not read a stream,
/// the server cannot send ahead on it, so its messages pile up in the server, where they overflow.
async fn slow_client(server: &TestServer) -> Client {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", server.addr))
        .expect("uri")
        .timeout(WAIT)
        .initial_stream_window_size(64)
        .connect()
        .await
        .expect("connect the slow client");
    ModelLoaderClient::new(channel)
}

/// The progress messages of one load of `id` as a watcher saw them: the events up to its end
/// state must be exactly LOADING, progress of `id`, and `end` (no resync in between).
fn progress_of_one_load(events: &[Event], id: &str, end: pb::ModelState) -> Vec<pb::ModelLoadProgress> {
    let statuses: Vec<(String, pb::ModelState)> = events
        .iter()
        .filter_map(|e| match e {
            Event::Status(s) => Some((s.model_id.clone(), s.state())),
            Event::Progress(_) => None,
        })
        .collect();
    assert_eq!(
        statuses,
        vec![(id.to_owned(), pb::ModelState::Loading), (id.to_owned(), end)],
        "the reference watcher saw one load and did not fall behind"
    );
    assert!(matches!(events.first(), Some(Event::Status(_))), "LOADING comes first: {:?}", events.first());
    events
        .iter()
        .filter_map(|e| match e {
            Event::Progress(p) => {
                assert_eq!(p.model_id, id, "{p:?}");
                Some(p.clone())
            }
            Event::Status(_) => None,
        })
        .collect()
}

/// Checks that `received`, a stream that fell behind, is what a resync makes of `reference`,
/// every message of the load: the load's messages in its order, none twice, steps never going
/// back, with at least one gap and every gap a resync's. Returns the gaps as (first message
/// skipped, messages skipped).
fn resyncs(received: &[pb::ModelLoadProgress], reference: &[pb::ModelLoadProgress]) -> Vec<(usize, usize)> {
    let mut positions = Vec::with_capacity(received.len());
    let mut from = 0;
    for m in received {
        let Some(at) = reference[from..].iter().position(|r| r == m) else {
            panic!("{m:?} is not a later message of the load than the previous one: {positions:?}");
        };
        positions.push(from + at);
        from += at + 1;
    }
    assert!(received.windows(2).all(|w| w[0].step <= w[1].step), "steps never go backwards: {received:?}");
    let mut gaps = Vec::new();
    let mut next = 0;
    for &at in &positions {
        if at > next {
            gaps.push((next, at - next));
        }
        next = at + 1;
    }
    assert!(!gaps.is_empty(), "the slow caller fell behind and missed messages: it received all {}", reference.len());
    // A lag is noticed once the channel's oldest unread update was overwritten: 257 updates
    // unread, of which one may be the outcome and the latest is sent again, so a resync skips at
    // least 255 messages; a smaller gap is a message lost some other way.
    for &(at, skipped) in &gaps {
        assert!(
            skipped >= LOAD_STREAM_CAPACITY - 1,
            "a gap of {skipped} messages from message {at} is less than a channel's worth: not a resync"
        );
    }
    gaps
}

/// A server of `root` that downloads from `hub` into `cache`, with a hub stall timeout far
/// longer than any test: a download the hub stalls holds its load in step 4 until cancelled.
fn stalled_hub_config(root: &Path, cache: &Path, hub: &TestHub) -> server::ServerConfig {
    let mut cfg = config(root);
    cfg.manager.loader.sources.offline = false;
    cfg.manager.loader.sources.hf_cache = Some(cache.to_owned());
    cfg.manager.loader.sources.hub.endpoint = Some(hub.url().to_owned());
    cfg.manager.loader.sources.hub.stall_timeout = std::time::Duration::from_secs(600);
    cfg
}

/// A hub repo `id` of a small model (1 MiB of weights) whose weight file the hub stalls on: half
/// of it, then nothing. Returns the repo and the weight file's size.
fn stalled_repo(dir: &Path, id: &str) -> (HubRepo, u64) {
    fixture::single_file_model(dir, &fixture::f32_tensors("layer", 4, 64 * 1024)).expect("fixture");
    let weights = std::fs::metadata(dir.join("model.safetensors")).expect("weight file").len();
    (HubRepo::from_dir(id, dir).expect("repo"), weights)
}

/// A late joiner's first message is the latest the load had sent when it joined (at or after the
/// first stream's last message then), and from there it receives exactly what the first stream
/// receives; a watcher receives the same progress messages, all of them.
#[tokio::test]
async fn a_late_joiner_receives_the_first_streams_suffix() {
    let tmp = tempfile::tempdir().expect("tmp");
    let expected = fixture::large_sharded_model(&tmp.path().join("big"), 512, 2, 4).expect("fixture");
    let mut cfg = config(tmp.path());
    // One reading thread: step 4 lasts long enough for several byte-progress messages.
    cfg.manager.loader.read_threads = 1;
    let server = TestServer::start(cfg).await;
    let mut client = server.client().await;
    let mut joiner_client = server.client().await;
    let mut watcher = watch(&mut client, "big").await;
    let snapshot = next_status(&mut watcher).await;
    assert_eq!(snapshot.state(), pb::ModelState::Unloaded, "{snapshot:?}");

    // The joiner races the load: when the load is past step 4 before the join, try again.
    for attempt in 1..=5 {
        let mut first = open_load(&mut client, load("big")).await;
        let seen = read_until(&mut first, "big: inside step 4", |m| {
            m.step > 4 || (m.step == 4 && m.bytes_done > 0 && m.bytes_done < m.bytes_total)
        })
        .await;
        let last_seen = seen.last().expect("a message").clone();
        let joined_at = seen.len() - 1;
        // The server has subscribed the joiner once this returns.
        let joiner = if last_seen.step == 4 { Some(open_load(&mut joiner_client, load("big")).await) } else { None };
        let (rest, end) = rest_of(&mut first).await;
        end.expect("the first stream ends OK");
        let full: Vec<_> = seen.into_iter().chain(rest).collect();
        let joined = match joiner {
            Some(joiner) => {
                let (joined, end) = end_of(joiner).await;
                end.expect("the joiner's stream ends OK");
                Some(joined)
            }
            None => None,
        };
        let events = until_status(&mut watcher, "big", pb::ModelState::Loaded, |_| true).await;
        let watched = progress_of_one_load(&events, "big", pb::ModelState::Loaded);
        assert_eq!(watched, full, "the watcher saw every message of the load, as the first stream did");

        let Some(joined) = joined.filter(|j| !(j.len() == 1 && j[0].detail == "already loaded")) else {
            eprintln!("attempt {attempt}: the load left step 4 before the join; again");
            let unloaded = client.unload_model(pb::UnloadModelRequest { model_id: "big".into(), force: false }).await;
            assert!(unloaded.expect("UnloadModel").into_inner().was_loaded);
            until_status(&mut watcher, "big", pb::ModelState::Unloaded, |_| true).await;
            continue;
        };

        assert_eq!(full.first().map(|m| m.step), Some(1), "the first stream started the load: {full:?}");
        assert_eq!(full.last().map(|m| m.step), Some(8), "{full:?}");
        assert!(!joined.is_empty(), "the joiner received messages");
        assert!(
            full.ends_with(&joined),
            "the joiner's messages are the first stream's last {} ones:\njoiner {joined:?}\nfirst {full:?}",
            joined.len()
        );
        let start = full.len() - joined.len();
        assert!(
            start >= joined_at,
            "the joiner starts at or after the first stream's last message when it joined ({last_seen:?}), \
             not at an earlier one ({:?})",
            joined[0]
        );
        assert!(joined[0].step >= 4, "{:?}", joined[0]);
        eprintln!(
            "attempt {attempt}: the first stream had {} messages when the joiner joined, the joiner started at \
             message {} of {}",
            joined_at + 1,
            start + 1,
            full.len()
        );
        assert_eq!(state_of(&mut client, "big").await, pb::ModelState::Loaded);
        assert_eq!(cpu_resources(&mut client).await.used_bytes, expected.booked(), "one load, one copy");
        drop((watcher, client, joiner_client));
        server.stop().await;
        return;
    }
    panic!("the load always left step 4 before the joiner joined");
}

/// A joiner of a load that has nothing new to say receives exactly the latest message the first
/// stream received, then nothing but the outcome, as the first stream does: the latest message
/// first, exactly, with neither a gap nor a repeat.
#[tokio::test]
async fn a_joiner_of_a_quiet_load_receives_exactly_the_latest_message() {
    const STALLED: &str = "org/stalled";
    let tmp = tempfile::tempdir().expect("tmp");
    let (repo, weights) = stalled_repo(&tmp.path().join("repo"), STALLED);
    // The hub sends half the weight file, then nothing (the connection stays open): once the load
    // has counted that half, it sends no more messages until it is cancelled.
    let hub = TestHub::start([repo]).await;
    hub.set_fault(STALLED, "model.safetensors", Fault::Stall);
    let server =
        TestServer::start(stalled_hub_config(&tmp.path().join("models"), &tmp.path().join("cache"), &hub)).await;
    let mut client = server.client().await;
    let mut joiner_client = server.client().await;

    let mut first = open_load(&mut client, load(STALLED)).await;
    let unsent = weights - weights / 2;
    let seen = read_until(&mut first, "the download reaches the stall", |m| {
        assert!(m.step <= 4, "the stalled load went past step 4: {m:?}");
        m.step == 4 && m.bytes_total > 0 && m.bytes_done == m.bytes_total - unsent
    })
    .await;
    let latest = seen.last().expect("a message").clone();

    let joiner = open_load(&mut joiner_client, load(STALLED)).await;
    let cancel = client.cancel_load(pb::CancelLoadRequest { model_id: STALLED.into() }).await.expect("CancelLoad");
    assert!(cancel.into_inner().was_loading);
    let (rest, end) = end_of(first).await;
    assert_eq!(end.expect_err("cancelled").code(), tonic::Code::Cancelled, "the first stream ends CANCELLED");
    assert!(rest.is_empty(), "the load sent nothing after {latest:?}: {rest:?}");
    let (joined, end) = end_of(joiner).await;
    assert_eq!(end.expect_err("cancelled").code(), tonic::Code::Cancelled, "the joiner ends CANCELLED");
    assert_eq!(joined, vec![latest], "the joiner receives the latest message, and only it");
    assert_eq!(state_of(&mut client, STALLED).await, pb::ModelState::Unloaded);
    drop((client, joiner_client));
    server.stop().await;
}

/// A LoadModel caller that does not read while its load sends far more messages than the
/// per-load channel holds is resynchronised: what it receives is the load's messages in order,
/// with only gaps of at least a channel's worth, and it ends with the load's last message (8/8)
/// and OK.
#[tokio::test]
async fn a_slow_load_caller_is_resynchronised() {
    // 800 small models fill the budget; a load of one the size of the whole budget evicts all of
    // them, one step-3 message each, in one burst: far more than the channel's 256.
    const VICTIMS: usize = 800;
    const ELEMS: usize = 1024;
    let tmp = tempfile::tempdir().expect("tmp");
    // Long ids make every eviction message long, so few fit in what the server may have taken
    // from the subscription before the window closed (tonic takes up to 32 KiB at a time).
    let victims: Vec<String> =
        (0..VICTIMS).map(|i| format!("v/victim-{i:04}-with-a-long-name-so-its-message-is-long")).collect();
    let mut victim_bytes = 0;
    for id in &victims {
        victim_bytes += fixture::single_file_model(&tmp.path().join(id), &fixture::f32_tensors("w", 1, ELEMS))
            .expect("victim")
            .booked();
    }
    // Each victim's config.json travels with it and is booked: the target's vocab.txt books as
    // much as the victims' configs but its own.
    let config_len = std::fs::metadata(tmp.path().join(&victims[0]).join("config.json")).expect("config").len();
    std::fs::create_dir_all(tmp.path().join("target")).expect("mkdir");
    std::fs::write(tmp.path().join("target/vocab.txt"), vec![b'a'; (VICTIMS - 1) * config_len as usize])
        .expect("vocab");
    let target = fixture::single_file_model(&tmp.path().join("target"), &fixture::f32_tensors("w", VICTIMS, ELEMS))
        .expect("target");
    // The budget is the target: every victim fits in it, and the target fits only once all of
    // them are gone (its longer tensor names book a few bytes more than the victims together).
    let victim = victim_bytes / VICTIMS as u64;
    let budget = target.booked();
    assert!(victim_bytes <= budget && budget - victim_bytes < victim, "the target books as much as all the victims");
    let mut cfg = config(tmp.path());
    cfg.manager.budget = MemoryBudget::Bytes(budget);
    cfg.manager.loader.evict = EvictPolicy::Lru;
    let server = TestServer::start(cfg).await;
    let mut client = server.client().await;

    let started = std::time::Instant::now();
    for id in &victims {
        load_ok(&mut client, load(id)).await;
    }
    eprintln!("{VICTIMS} victims loaded in {:?}", started.elapsed());
    let cpu = cpu_resources(&mut client).await;
    assert_eq!((cpu.used_bytes, cpu.budget_bytes), (victim_bytes, budget), "the budget is full: {cpu:?}");

    // The reference: a watcher of the target on an ordinary connection, which holds every event
    // of this load (far fewer than the event capacity) until it is read.
    let mut watcher = watch(&mut client, "target").await;
    assert_eq!(next_status(&mut watcher).await.state(), pb::ModelState::Unloaded);

    // The slow caller starts the load and reads nothing until it is over.
    let mut slow = slow_client(&server).await;
    let stream = open_load(&mut slow, load("target")).await;
    let events = until_status(&mut watcher, "target", pb::ModelState::Loaded, |_| true).await;
    let reference = progress_of_one_load(&events, "target", pb::ModelState::Loaded);
    let evictions = reference.iter().filter(|m| m.step == 3 && m.detail.starts_with("evicted ")).count();
    assert_eq!(evictions, VICTIMS, "one message per eviction");
    assert!(reference.len() > 2 * LOAD_STREAM_CAPACITY, "the load sent {} messages", reference.len());
    assert_eq!(reference.last().map(|m| m.step), Some(8));

    let (received, end) = end_of(stream).await;
    end.expect("the slow caller's stream ends OK");

    assert_eq!(received.last(), reference.last(), "it ends with the load's last message, 8/8");
    let gaps = resyncs(&received, &reference);
    // And it resumes at the latest message, not at the oldest the channel still held: the
    // evictions are one synchronous loop of the load's task, which on this test's one-threaded
    // runtime no stream task can interrupt, so the lag is noticed after the burst at the
    // earliest, when the latest message is at or past the last eviction; fewer than a channel's
    // worth follow it, so there is no second lag.
    let last_eviction = reference.iter().rposition(|m| m.detail.starts_with("evicted ")).expect("evictions");
    assert_eq!(gaps.len(), 1, "one resync: {gaps:?}");
    let resumed = gaps[0].0 + gaps[0].1;
    assert!(
        resumed >= last_eviction,
        "the resync resumed at message {resumed}, inside the burst of evictions (the last is {last_eviction}): \
         not at the latest message"
    );
    eprintln!(
        "the load sent {} messages; the slow caller received {}, skipping (from, count) {gaps:?}",
        reference.len(),
        received.len()
    );
    assert_eq!(state_of(&mut client, "target").await, pb::ModelState::Loaded);
    assert_eq!(cpu_resources(&mut client).await.used_bytes, target.booked(), "every victim was evicted");
    drop((watcher, slow, client));
    server.stop().await;
}

/// A LoadModel caller that falls behind while its load waits in the queue, and reads only once
/// the load has gone quiet and was cancelled, is resynchronised to exactly the latest message
/// ("queued: 0 ahead"), then CANCELLED: a resync never leaves a caller without the current
/// progress, nor with a stale one.
#[tokio::test]
async fn a_slow_caller_of_a_quiet_load_resyncs_to_the_latest_message() {
    const STALLED: &str = "org/stalled";
    const WAITERS: usize = 600;
    let tmp = tempfile::tempdir().expect("tmp");
    let root = tmp.path().join("models");
    let waiters: Vec<String> = (0..WAITERS).map(|i| format!("w/waiter-{i:04}")).collect();
    for id in waiters.iter().map(String::as_str).chain(["target"]) {
        fixture::single_file_model(&root.join(id), &fixture::f32_tensors("w", 1, 256)).expect("fixture");
    }
    let (repo, _) = stalled_repo(&tmp.path().join("repo"), STALLED);
    let hub = TestHub::start([repo]).await;
    hub.set_fault(STALLED, "model.safetensors", Fault::Stall);
    let mut cfg = stalled_hub_config(&root, &tmp.path().join("cache"), &hub);
    // One load at a time: the stalled download holds the slot, every other load waits in line.
    cfg.manager.loader.max_concurrent_loads = 1;
    let server = TestServer::start(cfg).await;
    let mut client = server.client().await;

    let mut stalled = open_load(&mut client, load(STALLED)).await;
    read_until(&mut stalled, "the stalled load reaches step 4", |m| m.step == 4).await;
    let mut waiting = Vec::with_capacity(WAITERS);
    for (ahead, id) in waiters.iter().enumerate() {
        let mut stream = open_load(&mut client, load(id)).await;
        let place = format!("queued: {ahead} ahead");
        read_until(&mut stream, &format!("{id} waits in line"), |m| m.detail == place).await;
        waiting.push(stream);
    }
    // The reference: a watcher of the target, which holds every event from here on (far fewer
    // than the event capacity) until it is read.
    let mut watcher = watch(&mut client, "target").await;
    assert_eq!(next_status(&mut watcher).await.state(), pb::ModelState::Unloaded);

    // The slow caller reads until the target is in line, then nothing while every load before it
    // leaves the line, one by one, each a message of its load ("queued: N ahead"): far more
    // than 256.
    let mut slow = slow_client(&server).await;
    let mut stream = open_load(&mut slow, load("target")).await;
    let place = format!("queued: {WAITERS} ahead");
    let mut received = read_until(&mut stream, "the target waits in line", |m| m.detail == place).await;
    // From the back of the line, so that only the target's place changes (and the client's
    // connection does not pile up unread messages of the waiters).
    for (id, waiter) in waiters.iter().zip(waiting).rev() {
        let cancel = client.cancel_load(pb::CancelLoadRequest { model_id: id.clone() }).await.expect("CancelLoad");
        assert!(cancel.into_inner().was_loading, "{id} was waiting");
        let (_, end) = end_of(waiter).await;
        let e = end.expect_err("cancelled");
        assert_eq!(e.code(), tonic::Code::Cancelled, "{id}: {e:?}");
    }
    // Now the target is first in line behind the stalled load, and says so; nothing more comes.
    let status = client.get_model(pb::GetModelRequest { model_id: "target".into() }).await.expect("GetModel");
    let latest = status.into_inner().last_progress.expect("the target's latest message");
    assert_eq!((latest.step, latest.detail.as_str()), (1, "queued: 0 ahead"), "{latest:?}");

    let cancel = client.cancel_load(pb::CancelLoadRequest { model_id: "target".into() }).await.expect("CancelLoad");
    assert!(cancel.into_inner().was_loading);
    let (rest, end) = end_of(stream).await;
    assert_eq!(end.expect_err("cancelled").code(), tonic::Code::Cancelled, "the slow caller ends CANCELLED");
    received.extend(rest);
    let events = until_status(&mut watcher, "target", pb::ModelState::Unloaded, |_| true).await;
    let reference = progress_of_one_load(&events, "target", pb::ModelState::Unloaded);
    assert_eq!(reference.last(), Some(&latest), "the load's last message");
    assert!(reference.len() > 2 * LOAD_STREAM_CAPACITY, "the load sent {} messages", reference.len());

    let gaps = resyncs(&received, &reference);
    eprintln!(
        "the load sent {} messages; the slow caller received {}, skipping (from, count) {gaps:?}",
        reference.len(),
        received.len()
    );
    assert_eq!(received.last(), Some(&latest), "the slow caller ends with the latest message, and only once");

    client.cancel_load(pb::CancelLoadRequest { model_id: STALLED.into() }).await.expect("CancelLoad");
    let (_, end) = end_of(stalled).await;
    assert_eq!(end.expect_err("cancelled").code(), tonic::Code::Cancelled);
    drop((watcher, slow, client));
    server.stop().await;
}

/// One operation of the watcher test, and the statuses it publishes.
#[derive(Debug, Clone, Copy)]
enum Op {
    /// A load that succeeds in this dtype (request spelling; the status spells it upper case).
    Load(&'static str, &'static str),
    /// A load that fails (a corrupt file): LOADING, then FAILED.
    Fail(&'static str),
    /// An unload of a LOADED model (UNLOADING, UNLOADED) or of a FAILED one (UNLOADED).
    Unload(&'static str),
}

/// A status as the checker compares it: the state, and for LOADED the dtype.
type Key = (pb::ModelState, String);

fn key(s: &pb::ModelStatus) -> Key {
    let dtype = if s.state() == pb::ModelState::Loaded { s.dtype.clone() } else { String::new() };
    (s.state(), dtype)
}

/// The transition table as a client may see it, written here apart from the state manager's.
fn legal(from: pb::ModelState, to: pb::ModelState) -> bool {
    use pb::ModelState as S;
    matches!(
        (from, to),
        (S::Unloaded | S::Failed, S::Loading)
            | (S::Loading, S::Loaded | S::Failed | S::Unloaded)
            | (S::Loaded, S::Unloading)
            | (S::Unloading | S::Failed, S::Unloaded)
    )
}

/// What the checker knows of one model: where in its true history of statuses the watcher can be
/// (every position that what it saw is consistent with), its state, and the highest step of the
/// current load it has seen.
struct Track {
    history: Vec<Key>,
    places: BTreeSet<usize>,
    state: pb::ModelState,
    /// The highest step received as progress since LOADING or the last snapshot.
    step: u32,
    /// The step of the last snapshot's `last_progress` while LOADING (0 otherwise): progress
    /// published just as the snapshot was taken is in both, so it does not bound later steps.
    snapshot_step: u32,
    /// Statuses received as changes (not in a snapshot).
    changes: usize,
}

impl Track {
    /// The state after the first `place` statuses of the history.
    fn state_at(&self, place: usize) -> Key {
        match place {
            0 => (pb::ModelState::Unloaded, String::new()),
            n => self.history[n - 1].clone(),
        }
    }
}

/// A watcher of every model that falls behind gets a recognisable snapshot (one status per model,
/// in id order, nothing in between) and never a gap: every status it receives outside a snapshot
/// is the next in the model's true history and a legal transition, progress comes only while
/// LOADING with steps never going back, LOADED only after step 8; the terminal events it missed
/// are covered by a snapshot that equals ListModels, and its stream then goes on.
// One scenario, read top to bottom.
#[allow(clippy::too_many_lines)]
#[tokio::test]
async fn a_lagging_watcher_is_resynchronised_never_left_with_a_gap() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut ids = vec!["a", "b", "broken", "c"];
    ids.sort_unstable();
    for id in ["a", "b", "c"] {
        fixture::single_file_model(&tmp.path().join(id), &fixture::f32_tensors("layer", 4, 512)).expect("fixture");
    }
    write_broken_model(&tmp.path().join("broken"));
    let mut cfg = config(tmp.path());
    cfg.manager.event_capacity = 8;
    let server = TestServer::start(cfg).await;
    let mut client = server.client().await;
    let mut slow = slow_client(&server).await;
    let mut watcher = watch(&mut slow, "").await;

    // The first snapshot: every model of the root, UNLOADED, in id order.
    let mut events = Vec::new();
    for _ in &ids {
        events.push(Event::Status(next_status(&mut watcher).await));
    }
    let first: Vec<_> = events
        .iter()
        .map(|e| if let Event::Status(s) = e { (s.model_id.as_str(), s.state()) } else { unreachable!() })
        .collect();
    assert_eq!(first, ids.iter().map(|id| (*id, pb::ModelState::Unloaded)).collect::<Vec<_>>());

    // Far more events than the 8 the server keeps for a watcher, while it reads nothing; the last
    // one, c loaded in F16, is a status c never had before.
    let mut ops = Vec::new();
    for dtype in ["f32", "bf16"] {
        ops.extend([Op::Load("a", dtype), Op::Load("b", dtype), Op::Load("c", dtype)]);
        ops.extend([Op::Fail("broken"), Op::Unload("broken"), Op::Unload("a"), Op::Unload("b"), Op::Unload("c")]);
    }
    ops.extend([Op::Load("a", "f16"), Op::Fail("broken"), Op::Load("b", "bf16"), Op::Load("c", "f16")]);
    let mut tracks: BTreeMap<&str, Track> = ids
        .iter()
        .map(|id| {
            let track = Track {
                history: Vec::new(),
                places: BTreeSet::from([0]),
                state: pb::ModelState::Unloaded,
                step: 0,
                snapshot_step: 0,
                changes: 0,
            };
            (*id, track)
        })
        .collect();
    for op in ops {
        match op {
            Op::Load(id, dtype) => {
                load_ok(&mut client, pb::LoadModelRequest { dtype: Some(dtype.into()), ..load(id) }).await;
                let history = &mut tracks.get_mut(id).expect("known").history;
                history.push((pb::ModelState::Loading, String::new()));
                history.push((pb::ModelState::Loaded, dtype.to_uppercase()));
            }
            Op::Fail(id) => {
                let (_, end) = load_all(&mut client, load(id)).await;
                assert_eq!(end.expect_err("a corrupt model fails").code(), tonic::Code::DataLoss);
                let history = &mut tracks.get_mut(id).expect("known").history;
                history.push((pb::ModelState::Loading, String::new()));
                history.push((pb::ModelState::Failed, String::new()));
            }
            Op::Unload(id) => {
                client
                    .unload_model(pb::UnloadModelRequest { model_id: id.into(), force: false })
                    .await
                    .expect("UnloadModel");
                let history = &mut tracks.get_mut(id).expect("known").history;
                if history.last().is_some_and(|(s, _)| *s == pb::ModelState::Loaded) {
                    history.push((pb::ModelState::Unloading, String::new()));
                }
                history.push((pb::ModelState::Unloaded, String::new()));
            }
        }
    }
    let current = client.list_models(pb::ListModelsRequest::default()).await.expect("ListModels").into_inner().models;
    assert_eq!(current.iter().map(|s| s.model_id.as_str()).collect::<Vec<_>>(), ids, "ListModels: every model");
    let last_c = current.iter().find(|s| s.model_id == "c").expect("c").clone();
    assert_eq!(ids.last(), Some(&"c"), "c is the last status of a snapshot");

    // Read until c's current status: the last of a snapshot, or (had the watcher kept up) the
    // last change.
    loop {
        let Ok(message) = tokio::time::timeout(WAIT, watcher.message()).await else {
            panic!("the watcher never received c's current status (a gap without a snapshot?): {events:?}")
        };
        let event = message.expect("the watch stream does not fail").expect("it stays open").event.expect("an event");
        let done = matches!(&event, Event::Status(s) if *s == last_c);
        events.push(event);
        if done {
            break;
        }
        assert!(events.len() < 10_000, "the watcher never reached c's current status");
    }

    // Check every event after the first snapshot. A snapshot is recognised as one status per
    // model in id order with nothing in between: these operations, one at a time, never publish
    // more than two statuses in a row, and never of more than two models. The server takes a
    // snapshot right after resubscribing, with no await in between: on this test's one-threaded
    // runtime no status can change between the two (every transition is made on an async task),
    // so the statuses after a snapshot continue from it; only progress sent from a loading
    // thread may be in both (see `Track::snapshot_step`).
    let is_snapshot_at = |i: usize| {
        events.len() >= i + ids.len()
            && events[i..i + ids.len()]
                .iter()
                .zip(&ids)
                .all(|(e, id)| matches!(e, Event::Status(s) if s.model_id == *id))
    };
    let mut snapshots = Vec::new();
    let mut behind_at_last_snapshot = Vec::new();
    let mut i = ids.len();
    while i < events.len() {
        if is_snapshot_at(i) {
            let snapshot: Vec<pb::ModelStatus> = events[i..i + ids.len()]
                .iter()
                .map(|e| if let Event::Status(s) = e { s.clone() } else { unreachable!() })
                .collect();
            behind_at_last_snapshot.clear();
            for s in &snapshot {
                let track = tracks.get_mut(s.model_id.as_str()).expect("known");
                if !track.places.contains(&track.history.len()) {
                    behind_at_last_snapshot.push(s.model_id.clone());
                }
                let from = *track.places.first().expect("a place");
                track.places = (from..=track.history.len()).filter(|&p| track.state_at(p) == key(s)).collect();
                assert!(
                    !track.places.is_empty(),
                    "event {i}: the snapshot's {s:?} is no status {} had at or after its place {from}",
                    s.model_id
                );
                track.state = s.state();
                track.step = 0;
                track.snapshot_step =
                    s.last_progress.as_ref().filter(|_| s.state() == pb::ModelState::Loading).map_or(0, |p| p.step);
            }
            snapshots.push((i, snapshot));
            i += ids.len();
            continue;
        }
        match &events[i] {
            Event::Status(s) => {
                let track = tracks.get_mut(s.model_id.as_str()).unwrap_or_else(|| panic!("unknown model {s:?}"));
                assert!(
                    legal(track.state, s.state()),
                    "event {i}: {} went {:?} -> {:?} with no snapshot in between: a lost event",
                    s.model_id,
                    track.state,
                    s.state()
                );
                let places: BTreeSet<usize> =
                    track.places.iter().filter(|&&p| track.history.get(p) == Some(&key(s))).map(|p| p + 1).collect();
                assert!(
                    !places.is_empty(),
                    "event {i}: {s:?} is not the next status of {} after {:?}: a gap without a snapshot",
                    s.model_id,
                    track.places
                );
                if s.state() == pb::ModelState::Loaded {
                    assert_eq!(track.step.max(track.snapshot_step), 8, "event {i}: LOADED after step 8: {s:?}");
                }
                if s.state() == pb::ModelState::Loading {
                    (track.step, track.snapshot_step) = (0, 0);
                }
                track.places = places;
                track.state = s.state();
                track.changes += 1;
            }
            Event::Progress(p) => {
                let track = tracks.get_mut(p.model_id.as_str()).unwrap_or_else(|| panic!("unknown model {p:?}"));
                assert_eq!(track.state, pb::ModelState::Loading, "event {i}: progress only while LOADING: {p:?}");
                assert!(p.step >= track.step && (1..=8).contains(&p.step), "event {i}: steps go on: {p:?}");
                track.step = p.step;
            }
        }
        i += 1;
    }

    let statuses = events.iter().filter(|e| matches!(e, Event::Status(_))).count();
    let published: usize = tracks.values().map(|t| t.history.len()).sum();
    let changes: usize = tracks.values().map(|t| t.changes).sum();
    eprintln!(
        "{} events: {} snapshots after the first at {:?}, {changes} of {published} changes received, {statuses} statuses",
        events.len(),
        snapshots.len(),
        snapshots.iter().map(|(at, _)| *at).collect::<Vec<_>>()
    );
    let Some((at, last)) = snapshots.last() else {
        panic!("the watcher never fell behind: no snapshot after the first; {} events", events.len())
    };
    assert_eq!(at + ids.len(), events.len(), "the last snapshot is the last thing received");
    assert_eq!(last, &current, "the snapshot is every model's current status, as ListModels says");
    assert!(changes < published, "the watcher missed changes (covered by the snapshot)");
    assert!(
        !behind_at_last_snapshot.is_empty(),
        "some model's last change (LOADED, FAILED or UNLOADED) reached the watcher only through the snapshot"
    );
    for (id, track) in &tracks {
        assert!(track.places.contains(&track.history.len()), "{id} ends at its current status");
    }

    // The stream goes on: the next events are those of the next change, and nothing else.
    client.unload_model(pb::UnloadModelRequest { model_id: "c".into(), force: false }).await.expect("UnloadModel");
    for state in [pb::ModelState::Unloading, pb::ModelState::Unloaded] {
        let next = next_event(&mut watcher).await;
        assert!(
            matches!(&next, Event::Status(s) if s.model_id == "c" && s.state() == state),
            "after the snapshot comes c's {state:?}, not {next:?} (an event from before the snapshot?)"
        );
    }
    drop((watcher, slow, client));
    server.stop().await;
}

/// A model whose safetensors header is corrupt: its load fails with DATA_LOSS.
fn write_broken_model(dir: &Path) {
    std::fs::create_dir_all(dir).expect("mkdir");
    std::fs::write(dir.join("config.json"), "{\"model_type\": \"test\"}\n").expect("config.json");
    let mut bytes = 1_000_000u64.to_le_bytes().to_vec();
    bytes.extend_from_slice(b"{\"w\": not json");
    std::fs::write(dir.join("model.safetensors"), bytes).expect("model.safetensors");
}
