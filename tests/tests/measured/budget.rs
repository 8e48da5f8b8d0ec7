//! The memory budget and the load queue: a load that does not fit is refused at step 3 before a
//! weight byte is read, or (`--evict lru`) makes room by unloading the least recently used LOADED
//! models and never more than that; loads beyond `max_concurrent_loads` wait in arrival order, are
//! told their place, and can be cancelled while they wait. What is booked covers what a load
//! holds, tensors' metadata included.

use std::{path::Path, time::Duration};

use model_manager::{EvictPolicy, resource_manager::MemoryBudget};
use proto::v1::{self as pb, model_event::Event, model_loader_client::ModelLoaderClient};
use tests::{
    TestServer,
    binary::Binary,
    config, cpu_resources, end_of, fixture,
    fixture::TensorSpec,
    get_model,
    hub::{Fault, HubRepo, TestHub},
    load, load_all, load_ok, mib, next_event, next_status, open_load, peak_rss_bytes, rchar, read_until, rss_bytes,
    state_of, watch,
};
use tonic::{Code, Streaming, transport::Channel};

type Client = ModelLoaderClient<Channel>;

use super::ONE_AT_A_TIME;

/// A hub repo whose weight file the test hub stalls on (half the body, then nothing).
const STALLED: &str = "org/stalled";
const STALLED_FILE: &str = "model.safetensors";

/// A small single-file model `id` under `root`: 4 F32 tensors of 16 Ki elements, 256 KiB.
/// Returns what a load of it books: the weights and their metadata.
fn small_model(root: &Path, id: &str) -> u64 {
    fixture::single_file_model(&root.join(id), &fixture::f32_tensors("layer", 4, 16 * 1024)).expect("fixture").booked()
}

/// What a loaded model books on the CPU, from its status.
fn booked(status: &pb::ModelStatus) -> u64 {
    status.weight_bytes + status.metadata_bytes
}

/// Per model bytes of the CPU entry of GetResources, as (id, bytes) sorted by id.
fn per_model(cpu: &pb::DeviceResources) -> Vec<(String, u64)> {
    let mut models: Vec<_> = cpu.models.iter().map(|m| (m.model_id.clone(), m.bytes)).collect();
    models.sort();
    models
}

/// The step-1 message a waiting load gets when `ahead` loads wait in line before it.
fn queued(ahead: usize) -> String {
    format!("queued: {ahead} ahead")
}

/// Details and steps of messages, for readable assertions.
fn steps_and_details(messages: &[pb::ModelLoadProgress]) -> Vec<(u32, String)> {
    messages.iter().map(|m| (m.step, m.detail.clone())).collect()
}

/// A server with `budget` bytes on the CPU and the given eviction policy, serving `root`.
async fn server_with(root: &Path, budget: u64, evict: EvictPolicy) -> TestServer {
    let mut cfg = config(root);
    cfg.manager.budget = MemoryBudget::Bytes(budget);
    cfg.manager.loader.evict = evict;
    TestServer::start(cfg).await
}

/// A load over the free budget, with eviction off, fails with RESOURCE_EXHAUSTED naming the exact
/// bytes needed (the fixture's) and free (the budget less the model already loaded), at step 3
/// and before any weight byte is read: no step-4 message, and this process read far less than the
/// 64 MiB of weights (`rchar`). The model is FAILED with that reason; the books hold only the first
/// model, nothing reserved, and the refused reservation never counted (peak). Once the first model
/// is unloaded, exactly the whole budget is free and the same load succeeds.
#[tokio::test]
async fn over_budget_is_refused_at_step_3_without_reading() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let tmp = tempfile::tempdir().expect("tmp");
    let small = fixture::single_file_model(&tmp.path().join("small"), &fixture::f32_tensors("layer", 4, 64 * 1024))
        .expect("fixture")
        .booked();
    let big_model = fixture::large_sharded_model(&tmp.path().join("big"), 64, 2, 2).expect("fixture");
    assert_eq!(big_model.bytes(), 64 << 20, "the fixture holds 64 MiB of weights");
    let big = big_model.booked();
    // The whole budget is the big model: it fits alone, not next to the small one.
    let budget = big;
    let server = server_with(tmp.path(), budget, EvictPolicy::None).await;
    let mut client = server.client().await;

    load_ok(&mut client, load("small")).await;
    let free = budget - small;

    let read_before = rchar();
    let (messages, end) = load_all(&mut client, load("big")).await;
    let read = rchar() - read_before;
    let status = end.expect_err("the big model does not fit next to the small one");
    eprintln!("bytes read by a refused load of a {} MiB model: {read}", big >> 20);
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    let reason =
        format!("not enough memory on cpu for big: needs {big} bytes, {free} bytes free of a budget of {budget} bytes");
    assert!(status.message().contains(&reason), "the message names needed and free bytes: {:?}", status.message());
    assert_eq!(messages.last().map(|m| m.step), Some(3), "the stream's last message is step 3: {messages:?}");
    assert!(messages.iter().all(|m| m.step <= 3), "no message of step 4 or later: {messages:?}");
    assert!(read < 1 << 20, "a refused load reads no weights: {read} bytes read, the weights are 64 MiB");

    let status = get_model(&mut client, "big").await;
    assert_eq!(status.state(), pb::ModelState::Failed, "{status:?}");
    assert!(status.error.contains(&reason), "GetModel shows the reason: {status:?}");
    assert_eq!(status.last_progress.as_ref().map(|p| p.step), Some(3), "{status:?}");
    let cpu = cpu_resources(&mut client).await;
    assert_eq!(cpu.budget_bytes, budget);
    assert_eq!((cpu.used_bytes, cpu.reserved_bytes), (small, 0), "only the small model is held: {cpu:?}");
    assert_eq!(per_model(&cpu), vec![("small".to_owned(), small)], "{cpu:?}");
    assert_eq!(cpu.peak_bytes, small, "the refused load never reserved anything: {cpu:?}");

    let unloaded = client
        .unload_model(pb::UnloadModelRequest { model_id: "small".into(), force: false })
        .await
        .expect("unload")
        .into_inner();
    assert_eq!((unloaded.was_loaded, unloaded.freed_bytes), (true, small));
    let read_before = rchar();
    load_ok(&mut client, load("big")).await;
    let read = rchar() - read_before;
    eprintln!("bytes read by the successful load: {read}");
    // The measure sees the server's reads: a load that fits reads every weight byte.
    let weights = big_model.bytes();
    assert!(read >= weights, "rchar counts the weights a load reads: {read} bytes read, the weights are {weights}");
    let cpu = cpu_resources(&mut client).await;
    assert_eq!((cpu.used_bytes, cpu.reserved_bytes), (big, 0), "the whole budget is the big model: {cpu:?}");
    assert_eq!(per_model(&cpu), vec![("big".to_owned(), big)]);
    let status = get_model(&mut client, "big").await;
    assert_eq!(status.state(), pb::ModelState::Loaded);
    assert!(status.error.is_empty(), "a successful retry clears the failure: {status:?}");
    server.stop().await;
}

/// With `--evict lru` and room for two of three equal models, loading the third unloads the least
/// recently used one, where asking for a LOADED model again (LoadModel: "already loaded") and
/// reading its tensors (ListTensors) count as uses: after A, B, LoadModel A, loading C evicts B,
/// not A; after ListTensors A, loading B again evicts C, not A. The loading stream says whom it
/// evicted at step 3; a watcher of the victim sees LOADED, UNLOADING, UNLOADED with the reason;
/// GetModel keeps the reason until the model's next load, and a client's unload has none; the
/// books hold exactly the two resident models.
#[tokio::test]
async fn lru_evicts_the_least_recently_used_model() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let tmp = tempfile::tempdir().expect("tmp");
    let size = small_model(tmp.path(), "a");
    for id in ["b", "c"] {
        assert_eq!(small_model(tmp.path(), id), size);
    }
    let server = server_with(tmp.path(), 2 * size, EvictPolicy::Lru).await;
    let mut client = server.client().await;
    let evicted_for = |id: &str| format!("evicted (least recently used) to make room for {id} on cpu");
    let evicted_note = |victim: &str| {
        format!("evicted {victim} ({size} bytes, least recently used) to make room: {size} bytes needed, 0 free")
    };

    load_ok(&mut client, load("a")).await;
    load_ok(&mut client, load("b")).await;
    // A use of A: it is asked for again.
    let (again, end) = load_all(&mut client, load("a")).await;
    end.expect("LoadModel of a loaded model");
    assert_eq!(steps_and_details(&again), vec![(8, "already loaded".to_owned())], "one message for a loaded model");

    let mut watch_b = watch(&mut client, "b").await;
    let snapshot = next_status(&mut watch_b).await;
    assert_eq!((snapshot.model_id.as_str(), snapshot.state()), ("b", pb::ModelState::Loaded), "{snapshot:?}");

    let messages = load_ok(&mut client, load("c")).await;
    let evictions: Vec<_> = messages.iter().filter(|m| m.detail.starts_with("evicted")).collect();
    assert_eq!(evictions.len(), 1, "C evicted exactly one model: {messages:?}");
    assert_eq!((evictions[0].step, evictions[0].detail.clone()), (3, evicted_note("b")), "B, at step 3");

    let unloading = next_status(&mut watch_b).await;
    assert_eq!(unloading.state(), pb::ModelState::Unloading, "{unloading:?}");
    assert_eq!(unloading.unload_reason, evicted_for("c"), "{unloading:?}");
    let unloaded = next_status(&mut watch_b).await;
    assert_eq!(unloaded.state(), pb::ModelState::Unloaded, "{unloaded:?}");
    assert_eq!(unloaded.unload_reason, evicted_for("c"), "{unloaded:?}");

    for id in ["a", "c"] {
        let status = get_model(&mut client, id).await;
        assert_eq!(status.state(), pb::ModelState::Loaded, "{id}: {status:?}");
        assert_eq!(booked(&status), size);
        assert!(status.unload_reason.is_empty(), "{id}: {status:?}");
    }
    let b = get_model(&mut client, "b").await;
    assert_eq!(b.state(), pb::ModelState::Unloaded, "{b:?}");
    assert_eq!(b.unload_reason, evicted_for("c"), "GetModel keeps why B was unloaded: {b:?}");
    let cpu = cpu_resources(&mut client).await;
    assert_eq!((cpu.used_bytes, cpu.reserved_bytes), (2 * size, 0), "{cpu:?}");
    assert_eq!(per_model(&cpu), vec![("a".to_owned(), size), ("c".to_owned(), size)]);

    // A use of A: its tensors are read. C, loaded after A's last use so far, is now the oldest.
    let tensors = client
        .list_tensors(pb::ListTensorsRequest { model_id: "a".into(), with_checksums: false })
        .await
        .expect("ListTensors")
        .into_inner()
        .tensors;
    assert_eq!(tensors.len(), 4);
    let messages = load_ok(&mut client, load("b")).await;
    let evictions: Vec<_> = messages.iter().filter(|m| m.detail.starts_with("evicted")).collect();
    assert_eq!(evictions.len(), 1, "B evicted exactly one model: {messages:?}");
    assert_eq!((evictions[0].step, evictions[0].detail.clone()), (3, evicted_note("c")), "C, at step 3, not A");
    // B's own watcher saw it come back: LOADING with the reason cleared, then LOADED.
    let loading = next_status(&mut watch_b).await;
    assert_eq!((loading.state(), loading.unload_reason.as_str()), (pb::ModelState::Loading, ""), "{loading:?}");

    let a = get_model(&mut client, "a").await;
    assert_eq!(a.state(), pb::ModelState::Loaded, "ListTensors kept A: {a:?}");
    let b = get_model(&mut client, "b").await;
    assert_eq!(b.state(), pb::ModelState::Loaded);
    assert!(b.unload_reason.is_empty(), "the reason lasts until the next load: {b:?}");
    let c = get_model(&mut client, "c").await;
    assert_eq!(c.state(), pb::ModelState::Unloaded, "{c:?}");
    assert_eq!(c.unload_reason, evicted_for("b"), "{c:?}");
    let cpu = cpu_resources(&mut client).await;
    assert_eq!((cpu.used_bytes, cpu.reserved_bytes), (2 * size, 0), "{cpu:?}");
    assert_eq!(per_model(&cpu), vec![("a".to_owned(), size), ("b".to_owned(), size)]);

    // A client's unload is not the server's: no reason.
    client.unload_model(pb::UnloadModelRequest { model_id: "a".into(), force: false }).await.expect("unload");
    let a = get_model(&mut client, "a").await;
    assert_eq!((a.state(), a.unload_reason.as_str()), (pb::ModelState::Unloaded, ""), "{a:?}");
    drop(watch_b);
    server.stop().await;
}

/// With `--evict lru`, a model larger than the whole budget fails at once with RESOURCE_EXHAUSTED
/// ("more than the whole budget") and evicts nothing: the loaded model stays LOADED with its bytes.
#[tokio::test]
async fn a_model_larger_than_the_budget_evicts_nothing() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let tmp = tempfile::tempdir().expect("tmp");
    let size = small_model(tmp.path(), "a");
    let big = fixture::single_file_model(&tmp.path().join("big"), &fixture::f32_tensors("layer", 12, 16 * 1024))
        .expect("fixture")
        .booked();
    let budget = 2 * size;
    assert!(big > budget);
    let server = server_with(tmp.path(), budget, EvictPolicy::Lru).await;
    let mut client = server.client().await;
    load_ok(&mut client, load("a")).await;

    let (messages, end) = load_all(&mut client, load("big")).await;
    let status = end.expect_err("larger than the budget");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    let reason =
        format!("big needs {big} bytes, more than the whole budget of {budget} bytes on cpu: nothing was evicted");
    assert!(status.message().contains(&reason), "{:?}", status.message());
    assert!(messages.iter().all(|m| m.step <= 3), "refused at step 3: {messages:?}");
    assert!(!messages.iter().any(|m| m.detail.starts_with("evicted")), "no eviction was announced: {messages:?}");
    assert_eq!(state_of(&mut client, "big").await, pb::ModelState::Failed);

    let a = get_model(&mut client, "a").await;
    assert_eq!((a.state(), booked(&a)), (pb::ModelState::Loaded, size), "A stays loaded: {a:?}");
    assert!(a.unload_reason.is_empty(), "{a:?}");
    let cpu = cpu_resources(&mut client).await;
    assert_eq!((cpu.used_bytes, cpu.reserved_bytes), (size, 0), "{cpu:?}");
    assert_eq!(per_model(&cpu), vec![("a".to_owned(), size)]);
    server.stop().await;
}

/// Writes the repo the test hub serves as [`STALLED`] under `tmp/repo`: a 1 MiB single-file model.
/// Returns the bytes of its tensors and their metadata, which a download of it reserves at step 3 (from the header,
/// read ahead of the download): its weight file less the header.
fn write_stalled_repo(tmp: &Path) -> u64 {
    let expected =
        fixture::single_file_model(&tmp.join("repo"), &fixture::f32_tensors("layer", 4, 64 * 1024)).expect("fixture");
    let file = std::fs::metadata(tmp.join("repo").join(STALLED_FILE)).expect("weight file").len();
    assert!(expected.bytes() < file, "the header is not counted");
    expected.booked()
}

/// A test hub serving `tmp/repo` (see [`write_stalled_repo`]) as [`STALLED`], whose weight file
/// stalls, and `extra_repos`; and a server of the model root `tmp/models` that downloads from it
/// into `tmp/cache` with a stall timeout far longer than any test, so a load of [`STALLED`] holds
/// its slot (and its reservation) in step 4 until it is cancelled.
async fn stalled_hub_setup(
    tmp: &Path,
    extra_repos: Vec<HubRepo>,
    budget: Option<u64>,
    max_concurrent_loads: usize,
    evict: EvictPolicy,
) -> (TestHub, TestServer) {
    let mut repos = vec![HubRepo::from_dir(STALLED, &tmp.join("repo")).expect("repo")];
    repos.extend(extra_repos);
    let hub = TestHub::start(repos).await;
    hub.set_fault(STALLED, STALLED_FILE, Fault::Stall);
    let mut cfg = config(&tmp.join("models"));
    cfg.manager.loader.sources.offline = false;
    cfg.manager.loader.sources.hf_cache = Some(tmp.join("cache"));
    cfg.manager.loader.sources.hub.endpoint = Some(hub.url().to_owned());
    cfg.manager.loader.sources.hub.stall_timeout = Duration::from_secs(600);
    cfg.manager.loader.max_concurrent_loads = max_concurrent_loads;
    cfg.manager.loader.evict = evict;
    if let Some(budget) = budget {
        cfg.manager.budget = MemoryBudget::Bytes(budget);
    }
    (hub, TestServer::start(cfg).await)
}

/// Starts the load of [`STALLED`] and returns its stream once it is in step 4 and the hub has begun
/// sending the weight file (half of which it will ever send).
async fn start_stalled_load(client: &mut Client, hub: &TestHub) -> Streaming<pb::ModelLoadProgress> {
    let mut stream = open_load(client, load(STALLED)).await;
    read_until(&mut stream, "the stalled load reaches step 4", |m| m.step == 4).await;
    hub.wait_until("half the weight file is sent", |h| h.stats(STALLED, STALLED_FILE).bytes_sent > 0).await;
    stream
}

/// With one load at a time and the slot held by a load that cannot finish (a hub download that
/// stalls), later loads wait after step 1 and are told their place ("queued: 0 ahead", "queued: 1
/// ahead", ...); a waiting load cancelled with CancelLoad, or with UnloadModel, ends CANCELLED
/// without ever reaching step 2 and is UNLOADED; once the stalled load is cancelled, the loads in
/// line run in arrival order, one after the other: B (a slow download, so it visibly holds the
/// slot) runs while D, behind it, hears its place change to "queued: 0 ahead"; B's step 8 comes
/// before D's step 2, as a watcher of every model sees it; at the end nothing is reserved.
// One scenario, read top to bottom.
#[allow(clippy::too_many_lines)]
#[tokio::test]
async fn queued_loads_wait_in_order_and_can_be_cancelled() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let tmp = tempfile::tempdir().expect("tmp");
    let models = tmp.path().join("models");
    let size = small_model(&models, "c");
    for id in ["d", "e"] {
        small_model(&models, id);
    }
    write_stalled_repo(tmp.path());
    // B: a hub model of the same size, downloaded at 128 KiB/s (about two seconds): it holds the
    // slot long enough for D's place to change while it runs, and then finishes by itself.
    const B: &str = "org/slow";
    small_model(tmp.path(), "slow-repo");
    let slow = HubRepo::from_dir(B, &tmp.path().join("slow-repo")).expect("repo");
    let (hub, server) = stalled_hub_setup(tmp.path(), vec![slow], None, 1, EvictPolicy::None).await;
    hub.set_fault(B, "model.safetensors", Fault::Slow { bytes_per_sec: 128 << 10 });
    let mut client = server.client().await;
    let mut all = watch(&mut client, "").await;

    let stalled = start_stalled_load(&mut client, &hub).await;

    let mut b = open_load(&mut client, load(B)).await;
    let seen = read_until(&mut b, "B is queued", |m| m.detail.starts_with("queued")).await;
    assert_eq!(steps_and_details(&seen), vec![(1, String::new()), (1, queued(0))], "B waits first in line");
    let mut c = open_load(&mut client, load("c")).await;
    let seen = read_until(&mut c, "C is queued", |m| m.detail.starts_with("queued")).await;
    assert_eq!(steps_and_details(&seen), vec![(1, String::new()), (1, queued(1))], "C waits behind B");

    let cancel = client.cancel_load(pb::CancelLoadRequest { model_id: "c".into() }).await.expect("CancelLoad");
    assert!(cancel.into_inner().was_loading, "a queued load is a load in flight");
    let (rest, end) = end_of(c).await;
    assert_eq!(end.expect_err("C was cancelled").code(), Code::Cancelled);
    assert!(rest.iter().all(|m| m.step == 1), "C never left step 1: {rest:?}");
    assert_eq!(state_of(&mut client, "c").await, pb::ModelState::Unloaded);

    let mut d = open_load(&mut client, load("d")).await;
    let seen = read_until(&mut d, "D is queued", |m| m.detail.starts_with("queued")).await;
    assert_eq!(steps_and_details(&seen), vec![(1, String::new()), (1, queued(1))], "D waits behind B, C left");
    let mut e = open_load(&mut client, load("e")).await;
    let seen = read_until(&mut e, "E is queued", |m| m.detail.starts_with("queued")).await;
    assert_eq!(steps_and_details(&seen), vec![(1, String::new()), (1, queued(2))], "E waits behind B and D");
    let unload =
        client.unload_model(pb::UnloadModelRequest { model_id: "e".into(), force: false }).await.expect("UnloadModel");
    assert!(!unload.into_inner().was_loaded, "E was only waiting");
    let (rest, end) = end_of(e).await;
    assert_eq!(end.expect_err("E was cancelled by its unload").code(), Code::Cancelled);
    assert!(rest.iter().all(|m| m.step == 1), "E never left step 1: {rest:?}");
    assert_eq!(state_of(&mut client, "e").await, pb::ModelState::Unloaded);

    assert_eq!(state_of(&mut client, STALLED).await, pb::ModelState::Loading, "the slot is still held");
    assert_eq!(state_of(&mut client, B).await, pb::ModelState::Loading, "B is in line");
    let cancel = client.cancel_load(pb::CancelLoadRequest { model_id: STALLED.into() }).await.expect("CancelLoad");
    assert!(cancel.into_inner().was_loading);
    let (_, end) = end_of(stalled).await;
    assert_eq!(end.expect_err("the stalled load was cancelled").code(), Code::Cancelled);

    // D moves up while B runs.
    let moved = read_until(&mut d, "D moves up", |m| m.detail.starts_with("queued")).await;
    assert_eq!(steps_and_details(&moved), vec![(1, queued(0))], "D is told it is first in line, and nothing else");
    let b_now = get_model(&mut client, B).await;
    assert_eq!(b_now.state(), pb::ModelState::Loading, "B runs while D waits: {b_now:?}");
    assert!(b_now.last_progress.as_ref().is_some_and(|p| p.step >= 2), "B was admitted: {b_now:?}");

    let (rest_b, end) = end_of(b).await;
    end.expect("B loads once the slot is free");
    assert_eq!(rest_b.first().map(|m| m.step), Some(2), "B went on with step 2: {rest_b:?}");
    assert_eq!(rest_b.last().map(|m| m.step), Some(8), "{rest_b:?}");
    let (rest_d, end) = end_of(d).await;
    end.expect("D loads after B");
    assert_eq!(rest_d.first().map(|m| m.step), Some(2), "D went on with step 2: {rest_d:?}");
    assert_eq!(rest_d.last().map(|m| m.step), Some(8), "{rest_d:?}");
    hub.wait_until("the stalled download's connection is closed", |h| h.active_bodies() == 0).await;

    // The watcher's view of every model, until B and D are loaded.
    let mut events = Vec::new();
    let loaded = |events: &[Event], id: &str| {
        events.iter().any(|e| matches!(e, Event::Status(s) if s.model_id == id && s.state() == pb::ModelState::Loaded))
    };
    while !(loaded(&events, B) && loaded(&events, "d")) {
        events.push(next_event(&mut all).await);
    }
    let progress_at = |id: &str, step: u32| {
        events
            .iter()
            .position(|e| matches!(e, Event::Progress(p) if p.model_id == id && p.step == step))
            .unwrap_or_else(|| panic!("the watcher saw no step {step} of {id}"))
    };
    assert!(progress_at(B, 8) < progress_at("d", 2), "B finished (step 8) before D began step 2");
    for id in ["c", "e"] {
        assert!(
            !events.iter().any(|e| matches!(e, Event::Progress(p) if p.model_id == id && p.step > 1)),
            "the watcher saw {id} past step 1"
        );
    }
    let d_places: Vec<_> = events
        .iter()
        .filter_map(|e| match e {
            Event::Progress(p) if p.model_id == "d" && p.detail.starts_with("queued") => Some(p.detail.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(d_places, vec![queued(1), queued(0)], "watchers hear D's place too");

    assert_eq!(state_of(&mut client, STALLED).await, pb::ModelState::Unloaded);
    let cpu = cpu_resources(&mut client).await;
    assert_eq!((cpu.used_bytes, cpu.reserved_bytes), (2 * size, 0), "B and D held, nothing reserved: {cpu:?}");
    assert_eq!(per_model(&cpu), vec![("d".to_owned(), size), (B.to_owned(), size)]);
    drop(all);
    server.stop().await;
}

/// With `--evict lru`, bytes reserved by a load in flight cannot be evicted: when evicting every
/// LOADED model would still not make room, the load fails with RESOURCE_EXHAUSTED ("evicting every
/// loaded model would free only …") and evicts nothing. A download reserves its exact bytes at
/// step 3 (from the header read ahead), before the first byte of its weights; once that load is
/// cancelled the same load fits without evicting anyone.
#[tokio::test]
async fn reserved_bytes_of_a_load_in_flight_are_not_evictable() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let tmp = tempfile::tempdir().expect("tmp");
    let models = tmp.path().join("models");
    let size = small_model(&models, "a");
    let big = fixture::single_file_model(&models.join("big"), &fixture::f32_tensors("layer", 12, 16 * 1024))
        .expect("fixture")
        .booked();
    assert!(big > 2 * size, "BIG needs more than two small models");
    // The stalled download reserves its tensors' bytes (1 MiB: four small models).
    let stalled_bytes = write_stalled_repo(tmp.path());
    let budget = stalled_bytes + 2 * size;
    let (hub, server) = stalled_hub_setup(tmp.path(), Vec::new(), Some(budget), 2, EvictPolicy::Lru).await;
    let mut client = server.client().await;

    load_ok(&mut client, load("a")).await;
    let stalled = start_stalled_load(&mut client, &hub).await;
    let cpu = cpu_resources(&mut client).await;
    assert_eq!((cpu.used_bytes, cpu.reserved_bytes), (size, stalled_bytes), "the download reserved its bytes: {cpu:?}");

    // Free: the budget less A and the reservation = one small model; evicting A frees one more:
    // two, and BIG needs three (less than the whole budget).
    let free = budget - size - stalled_bytes;
    let (messages, end) = load_all(&mut client, load("big")).await;
    let status = end.expect_err("no room even after evicting A");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    let reason = format!(
        "not enough memory on cpu for big: needs {big} bytes, {free} bytes free of a budget of {budget} bytes, and \
         evicting every loaded model would free only {size} bytes more"
    );
    assert!(status.message().contains(&reason), "{:?}", status.message());
    assert!(status.message().ends_with("nothing was evicted"), "{:?}", status.message());
    assert!(messages.iter().all(|m| m.step <= 3), "{messages:?}");
    assert!(!messages.iter().any(|m| m.detail.starts_with("evicted")), "no eviction was announced: {messages:?}");
    let a = get_model(&mut client, "a").await;
    assert_eq!((a.state(), booked(&a)), (pb::ModelState::Loaded, size), "A stays loaded: {a:?}");
    assert!(a.unload_reason.is_empty(), "{a:?}");

    client.cancel_load(pb::CancelLoadRequest { model_id: STALLED.into() }).await.expect("CancelLoad");
    let (_, end) = end_of(stalled).await;
    assert_eq!(end.expect_err("cancelled").code(), Code::Cancelled);
    let cpu = cpu_resources(&mut client).await;
    assert_eq!((cpu.used_bytes, cpu.reserved_bytes), (size, 0), "the cancelled download's reservation is back");
    let messages = load_ok(&mut client, load("big")).await;
    assert!(!messages.iter().any(|m| m.detail.starts_with("evicted")), "BIG fits next to A: {messages:?}");
    let cpu = cpu_resources(&mut client).await;
    assert_eq!(per_model(&cpu), vec![("a".to_owned(), size), ("big".to_owned(), big)]);
    server.stop().await;
}

/// A load that converts reserves its peak, not only what stays: F32 weights are read whole
/// before step 7 makes them BF16, so a 256 KiB F32 model loaded as BF16 needs 384 KiB at once.
/// Under a budget of 320 KiB (room for the 128 KiB it keeps, not for the peak) it is refused at
/// step 3 with RESOURCE_EXHAUSTED naming the peak (it used to reserve 128 KiB and hold 384);
/// under 384 KiB it loads, and then holds 128 KiB. (Each figure also books the tensors' metadata.)
#[tokio::test]
async fn a_converting_load_reserves_its_peak() {
    let _one = ONE_AT_A_TIME.lock().await;
    let root = tempfile::tempdir().expect("root");
    let model = fixture::single_file_model(&root.path().join("wide"), &fixture::f32_tensors("layer", 4, 16 * 1024))
        .expect("fixture");
    let (stored, metadata) = (model.bytes(), model.metadata_bytes());
    let bf16 = pb::LoadModelRequest { dtype: Some("bf16".into()), ..load("wide") };
    let peak = stored + stored / 2 + metadata;

    let server = server_with(root.path(), stored + stored / 4 + metadata, EvictPolicy::None).await;
    let mut client = server.client().await;
    let (messages, end) = load_all(&mut client, bf16.clone()).await;
    let status = end.expect_err("the peak does not fit");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains(&peak.to_string()), "names the peak, {peak} bytes: {status:?}");
    assert_eq!(messages.last().map(|m| m.step), Some(3), "refused before a byte is read: {messages:?}");
    server.stop().await;

    let server = server_with(root.path(), peak, EvictPolicy::None).await;
    let mut client = server.client().await;
    load_ok(&mut client, bf16).await;
    let cpu = cpu_resources(&mut client).await;
    assert_eq!(
        (cpu.used_bytes, cpu.reserved_bytes),
        (stored / 2 + metadata, 0),
        "holds the BF16 bytes once loaded: {cpu:?}"
    );
    server.stop().await;
}

/// 200,000 one-element tensors (800 KB of weights; tens of MB of names, shapes and views) in the
/// real binary, loaded as stored and as BF16: the books cover what a load really holds. RSS growth
/// while loaded stays within the growth of the cpu's used bytes, and the load's high-water mark
/// within the most it booked at once plus the header step 3 read to know what to book. (When only
/// the weights were booked, 800 KB stood for some 75 MB.)
#[tokio::test]
async fn the_books_cover_the_metadata_of_many_small_tensors() {
    const TENSORS: usize = 200_000;
    let _alone = ONE_AT_A_TIME.lock().await;
    let tmp = tempfile::tempdir().expect("tmp");
    let name = |i: usize| format!("model.layers.{}.mlp.experts.{}.w1.weight", i / 64, i % 64);
    let tensors: Vec<TensorSpec> = (0..TENSORS).map(|i| TensorSpec::f32(&name(i), &[1, 1], i as u64)).collect();
    let expected = fixture::single_file_model(&tmp.path().join("many"), &tensors).expect("fixture");
    fixture::single_file_model(&tmp.path().join("tiny"), &fixture::f32_tensors("w", 1, 16)).expect("fixture");
    let file = std::fs::metadata(tmp.path().join("many/model.safetensors")).expect("weights").len();
    let header = file - expected.bytes();
    let root = tmp.path().to_str().expect("utf-8 path");
    let server = Binary::start(&["--model-root", root, "--offline"], &[]).await;
    let mut client = tests::connect(server.addr).await;
    // A first load starts what every load uses (threads, pools), so the figures below are the
    // big model's.
    load_all(&mut client, load("tiny")).await.1.expect("tiny loads");
    let (idle, idle_used) = (rss_bytes(Some(server.pid())), cpu_resources(&mut client).await.used_bytes);

    load_all(&mut client, load("many")).await.1.expect("many loads");
    let (loaded, peak) = (rss_bytes(Some(server.pid())), peak_rss_bytes(Some(server.pid())));
    let cpu = cpu_resources(&mut client).await;
    let status = tests::get_model(&mut client, "many").await;
    assert_eq!(status.metadata_bytes, expected.metadata_bytes(), "{status:?}");
    let booked = cpu.used_bytes - idle_used;
    eprintln!(
        "{TENSORS} tensors of {} weight bytes: booked {:.1} MiB ({} a tensor); RSS grew {:.1} MiB while loaded, \
         {:.1} MiB at the peak ({:.1} MiB booked at most, {:.1} MiB of header)",
        expected.bytes(),
        mib(booked),
        booked / TENSORS as u64,
        mib(loaded - idle),
        mib(peak - idle),
        mib(cpu.peak_bytes - idle_used),
        mib(header)
    );
    assert_eq!(booked, expected.booked());
    assert!(loaded - idle <= booked, "RSS grew {} bytes while {booked} are booked", loaded - idle);
    assert!(
        peak - idle <= cpu.peak_bytes - idle_used + header,
        "RSS peaked {} bytes above idle; at most {} were booked, and the header is {header} bytes",
        peak - idle,
        cpu.peak_bytes - idle_used
    );

    client.unload_model(pb::UnloadModelRequest { model_id: "many".into(), force: false }).await.expect("unload");
    let unloaded = rss_bytes(Some(server.pid()));
    let bf16 = pb::LoadModelRequest { dtype: Some("bf16".into()), ..load("many") };
    load_all(&mut client, bf16).await.1.expect("many loads as BF16");
    let converted = rss_bytes(Some(server.pid()));
    let booked = cpu_resources(&mut client).await.used_bytes - idle_used;
    eprintln!("as BF16: booked {:.1} MiB; RSS grew {:.1} MiB", mib(booked), mib(converted.saturating_sub(unloaded)));
    assert_eq!(booked, expected.bytes() / 2 + expected.metadata_bytes());
    assert!(
        converted.saturating_sub(unloaded) <= booked,
        "RSS grew {} bytes while {booked} are booked",
        converted - unloaded
    );
}
