//! WatchModels: a snapshot first, then every change in order, the same for every watcher; a
//! watcher that falls behind gets a fresh snapshot and keeps its stream.

use std::path::Path;

use proto::v1::{self as pb, model_event::Event, model_loader_client::ModelLoaderClient};
use tests::{TestServer, fixture, load_ok, next_status, until_status, watch};
use tonic::transport::Channel;

type Client = ModelLoaderClient<Channel>;

fn add_model(root: &Path, id: &str) {
    fixture::single_file_model(&root.join(id), &fixture::f32_tensors("layer", 4, 512)).expect("fixture model");
}

async fn unload_ok(client: &mut Client, id: &str) {
    let response = client
        .unload_model(pb::UnloadModelRequest { model_id: id.into(), force: false })
        .await
        .expect("UnloadModel")
        .into_inner();
    assert!(response.was_loaded, "{id} was loaded");
}

/// A new watcher first receives a snapshot: the LOADED status of its model, or the status of
/// every model in the model root when it watches all.
#[tokio::test]
async fn watch_begins_with_a_snapshot() {
    let root = tempfile::tempdir().expect("tempdir");
    for id in ["alpha", "beta", "org/gamma"] {
        add_model(root.path(), id);
    }
    let server = TestServer::start(tests::config(root.path())).await;
    let mut client = server.client().await;
    load_ok(&mut client, tests::load("alpha")).await;

    // One model: its current status first.
    let mut one = watch(&mut client, "alpha").await;
    let first = next_status(&mut one).await;
    assert_eq!((first.model_id.as_str(), first.state()), ("alpha", pb::ModelState::Loaded), "{first:?}");
    assert_eq!(first.weight_bytes, 4 * 512 * 4, "{first:?}");
    assert_eq!(first.last_progress.as_ref().map(|p| p.step), Some(8), "{first:?}");

    // All models: one status per model of the root, LOADED or UNLOADED as they are.
    let mut all = watch(&mut client, "").await;
    let mut snapshot = Vec::new();
    for _ in 0..3 {
        let status = next_status(&mut all).await;
        snapshot.push((status.model_id.clone(), status.state()));
    }
    snapshot.sort();
    assert_eq!(
        snapshot,
        vec![
            ("alpha".to_owned(), pb::ModelState::Loaded),
            ("beta".to_owned(), pb::ModelState::Unloaded),
            ("org/gamma".to_owned(), pb::ModelState::Unloaded),
        ]
    );

    // The snapshot holds nothing more: the next event on both streams is the unload starting.
    unload_ok(&mut client, "alpha").await;
    for stream in [&mut one, &mut all] {
        let next = next_status(stream).await;
        assert_eq!((next.model_id.as_str(), next.state()), ("alpha", pb::ModelState::Unloading), "{next:?}");
        let next = next_status(stream).await;
        assert_eq!((next.model_id.as_str(), next.state()), ("alpha", pb::ModelState::Unloaded), "{next:?}");
    }
    drop((one, all, client));
    server.stop().await;
}

/// Two watchers started before a load receive the same events of it, in the same order, ending
/// with LOADED.
#[tokio::test]
async fn watchers_see_the_same_sequence() {
    let root = tempfile::tempdir().expect("tempdir");
    add_model(root.path(), "m");
    add_model(root.path(), "other");
    let server = TestServer::start(tests::config(root.path())).await;
    let mut client = server.client().await;

    let mut first = watch(&mut client, "m").await;
    let mut second = watch(&mut client, "m").await;
    for stream in [&mut first, &mut second] {
        let snapshot = next_status(stream).await;
        assert_eq!((snapshot.model_id.as_str(), snapshot.state()), ("m", pb::ModelState::Unloaded));
    }

    // Another model's load in between must not show up in a watch of "m".
    load_ok(&mut client, tests::load("other")).await;
    load_ok(&mut client, tests::load("m")).await;

    let seen_first = until_status(&mut first, "m", pb::ModelState::Loaded, |_| true).await;
    let seen_second = until_status(&mut second, "m", pb::ModelState::Loaded, |_| true).await;
    assert_eq!(seen_first, seen_second, "both watchers see the same events");

    // And they are the load's events: LOADING, the steps 1..=8 in order, LOADED, all of "m".
    let Some(Event::Status(loading)) = seen_first.first() else { panic!("{seen_first:?}") };
    assert_eq!(loading.state(), pb::ModelState::Loading, "{loading:?}");
    let steps: Vec<u32> = seen_first
        .iter()
        .filter_map(|e| match e {
            Event::Progress(p) => {
                assert_eq!(p.model_id, "m", "{p:?}");
                Some(p.step)
            }
            Event::Status(s) => {
                assert_eq!(s.model_id, "m", "{s:?}");
                None
            }
        })
        .collect();
    assert!(steps.is_sorted(), "steps in order: {steps:?}");
    let mut distinct = steps.clone();
    distinct.dedup();
    assert_eq!(distinct, (1..=8).collect::<Vec<u32>>(), "every step once or more: {steps:?}");
    let statuses = seen_first.iter().filter(|e| matches!(e, Event::Status(_))).count();
    assert_eq!(statuses, 2, "LOADING and LOADED only: {seen_first:?}");
    drop((first, second, client));
    server.stop().await;
}

/// A watcher that falls behind gets a fresh snapshot of the current state instead of a gap, and
/// its stream stays open for later events.
#[tokio::test]
async fn a_lagging_watcher_gets_a_fresh_snapshot() {
    let root = tempfile::tempdir().expect("tempdir");
    add_model(root.path(), "m");
    add_model(root.path(), "other");
    let mut config = tests::config(root.path());
    config.manager.event_capacity = 2;
    let server = TestServer::start(config).await;
    let mut client = server.client().await;

    // The watcher's own connection has a tiny HTTP/2 window, so while the test does not read it
    // the server cannot send ahead either: its events pile up in the server and overflow.
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", server.addr))
        .expect("uri")
        .initial_stream_window_size(64)
        .connect()
        .await
        .expect("connect the watcher");
    let mut watcher_client = ModelLoaderClient::new(channel);
    let mut watcher = watch(&mut watcher_client, "m").await;

    // Three loads of "m" in three dtypes, with unloads between, then a full load of another
    // model: far more than 2 events, and the newest ones are not about "m" at all.
    for dtype in ["f32", "bf16"] {
        load_ok(&mut client, pb::LoadModelRequest { dtype: Some(dtype.into()), ..tests::load("m") }).await;
        unload_ok(&mut client, "m").await;
    }
    load_ok(&mut client, pb::LoadModelRequest { dtype: Some("f16".into()), ..tests::load("m") }).await;
    load_ok(&mut client, tests::load("other")).await;

    // Now read: the watcher reaches the current state of "m" (the last load, in F16) even though
    // the events that said so have long left the buffer.
    let caught_up = until_status(&mut watcher, "m", pb::ModelState::Loaded, |s| s.dtype == "F16").await;
    let statuses = caught_up.iter().filter(|e| matches!(e, Event::Status(_))).count();
    // Without falling behind it would have seen 1 (its first snapshot) + 3 loads × 2 + 2 unloads × 2.
    assert!(statuses < 11, "the watcher fell behind and was resynchronised: {caught_up:?}");
    let Some(Event::Status(current)) = caught_up.last() else { panic!("{caught_up:?}") };
    assert_eq!(current.weight_bytes, 4 * 512 * 2, "the snapshot is the current F16 model: {current:?}");
    for event in &caught_up {
        match event {
            Event::Status(s) => assert_eq!(s.model_id, "m", "{s:?}"),
            Event::Progress(p) => assert_eq!(p.model_id, "m", "{p:?}"),
        }
    }

    // The stream is still open and carries what happens next.
    unload_ok(&mut client, "m").await;
    until_status(&mut watcher, "m", pb::ModelState::Unloaded, |_| true).await;
    assert_eq!(tests::state_of(&mut client, "m").await, pb::ModelState::Unloaded);
    drop((watcher, watcher_client, client));
    server.stop().await;
}
