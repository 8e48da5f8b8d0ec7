//! Cancelling loads and unloading models: streams end, state and accounting go back to zero, and
//! the memory really returns.

use std::time::Instant;

use model_manager::resource_manager::MemoryBudget;
use proto::v1 as pb;
use tests::{TestServer, config, cpu_resources_when, end_of, fixture, load, load_all, load_until_step4, state_of};
use tonic::Code;

/// CancelLoad during step 4 of a large model ends every stream of it with CANCELLED promptly,
/// leaves the model UNLOADED and gives its reservation back.
#[tokio::test]
async fn cancel_during_step_4_ends_every_stream() {
    let tmp = tempfile::tempdir().expect("tmp");
    fixture::large_sharded_model(&tmp.path().join("big"), 768, 3, 4).expect("fixture");
    let server = TestServer::start(config(tmp.path())).await;
    let mut client = server.client().await;

    let stream = load_until_step4(&mut client, "big").await;
    let joiner = server.client().await.load_model(load("big")).await.expect("join").into_inner();
    let started = Instant::now();
    let cancel = client.cancel_load(pb::CancelLoadRequest { model_id: "big".into() }).await.expect("cancel");
    assert!(cancel.into_inner().was_loading);
    let end = end_of(stream).await.1;
    let took = started.elapsed();
    assert_eq!(end.expect_err("cancelled").code(), Code::Cancelled);
    assert_eq!(end_of(joiner).await.1.expect_err("cancelled").code(), Code::Cancelled);
    eprintln!("CancelLoad to the end of the stream: {:.1} ms", took.as_secs_f64() * 1e3);

    assert_eq!(state_of(&mut client, "big").await, pb::ModelState::Unloaded);
    // The memory it had read comes back just after the streams end.
    cpu_resources_when(&mut client, |cpu| (cpu.used_bytes, cpu.reserved_bytes) == (0, 0)).await;
    let again = client.cancel_load(pb::CancelLoadRequest { model_id: "big".into() }).await.expect("cancel again");
    assert!(!again.into_inner().was_loading, "nothing is loading any more");
    server.stop().await;
}

/// The memory a cancelled load had read is freed just after its streams end, booked as leaving
/// until then: a load that needs it, started at once, waits for it instead of being refused, even
/// without eviction.
#[tokio::test]
async fn a_load_right_after_a_cancel_gets_its_memory() {
    let tmp = tempfile::tempdir().expect("tmp");
    let a = fixture::large_sharded_model(&tmp.path().join("a"), 512, 2, 4).expect("fixture");
    fixture::large_sharded_model(&tmp.path().join("b"), 512, 2, 4).expect("fixture");
    let mut cfg = config(tmp.path());
    // Room for one of the two, not both.
    cfg.manager.budget = MemoryBudget::Bytes(a.booked() + a.bytes() / 2);
    let server = TestServer::start(cfg).await;
    let mut client = server.client().await;

    let stream = load_until_step4(&mut client, "a").await;
    client.cancel_load(pb::CancelLoadRequest { model_id: "a".into() }).await.expect("cancel");
    assert_eq!(end_of(stream).await.1.expect_err("cancelled").code(), Code::Cancelled);
    let (_, end) = load_all(&mut client, load("b")).await;
    end.expect("b loads in the memory a gave back");
    assert_eq!(state_of(&mut client, "a").await, pb::ModelState::Unloaded);
    let cpu = cpu_resources_when(&mut client, |cpu| cpu.reserved_bytes == 0).await;
    assert_eq!(cpu.used_bytes, a.booked(), "only b is held: {cpu:?}");
    server.stop().await;
}

/// Unloading a model that is loading cancels the load and leaves it UNLOADED.
#[tokio::test]
async fn unloading_a_loading_model_cancels_it() {
    let tmp = tempfile::tempdir().expect("tmp");
    fixture::large_sharded_model(&tmp.path().join("big"), 512, 2, 4).expect("fixture");
    let server = TestServer::start(config(tmp.path())).await;
    let mut client = server.client().await;

    let stream = load_until_step4(&mut client, "big").await;
    let unloaded =
        client.unload_model(pb::UnloadModelRequest { model_id: "big".into(), force: false }).await.expect("unload");
    assert!(!unloaded.into_inner().was_loaded);
    assert_eq!(end_of(stream).await.1.expect_err("cancelled").code(), Code::Cancelled);
    assert_eq!(state_of(&mut client, "big").await, pb::ModelState::Unloaded);
    // The memory it had read comes back just after the streams end.
    cpu_resources_when(&mut client, |cpu| (cpu.used_bytes, cpu.reserved_bytes) == (0, 0)).await;
    server.stop().await;
}

/// A model over the memory budget is refused with RESOURCE_EXHAUSTED at step 3, before step 4.
#[tokio::test]
async fn over_budget_is_refused_before_reading() {
    let tmp = tempfile::tempdir().expect("tmp");
    let big = fixture::large_sharded_model(&tmp.path().join("big"), 16, 2, 2).expect("fixture");
    let mut cfg = config(tmp.path());
    cfg.manager.budget = model_manager::resource_manager::MemoryBudget::Bytes(1 << 20);
    let server = TestServer::start(cfg).await;
    let mut client = server.client().await;
    let (messages, end) = load_all(&mut client, load("big")).await;
    let status = end.expect_err("over budget");
    assert_eq!(status.code(), Code::ResourceExhausted);
    let needs = format!("needs {} bytes", big.booked());
    assert!(status.message().contains(&needs), "{needs}: {}", status.message());
    assert_eq!(messages.iter().map(|m| m.step).max(), Some(3), "nothing was read");
    assert_eq!(state_of(&mut client, "big").await, pb::ModelState::Failed);
    server.stop().await;
}
