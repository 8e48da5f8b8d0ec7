//! Memory coming back after an unload, measured as this process's RSS. Alone in its own test
//! binary so no other test's allocations blur the figures.

use proto::v1 as pb;
use tests::{TestServer, config, cpu_resources, fixture, load, load_all, rss_bytes, state_of};

/// UnloadModel of a ~500 MB model brings accounting to zero and RSS back down; unloading again
/// is OK with was_loaded = false.
#[tokio::test]
async fn unload_gives_the_memory_back() {
    let tmp = tempfile::tempdir().expect("tmp");
    let expected = fixture::large_sharded_model(&tmp.path().join("big"), 512, 2, 4).expect("fixture");
    let server = TestServer::start(config(tmp.path())).await;
    let mut client = server.client().await;

    let before = rss_bytes(None);
    load_all(&mut client, load("big")).await.1.expect("load");
    let loaded = rss_bytes(None);
    let cpu = cpu_resources(&mut client).await;
    assert_eq!(cpu.used_bytes, expected.bytes());
    assert_eq!(cpu.models.len(), 1);

    let unload = client.unload_model(pb::UnloadModelRequest { model_id: "big".into() }).await.expect("unload");
    let unload = unload.into_inner();
    assert!(unload.was_loaded);
    assert_eq!(unload.freed_bytes, expected.bytes());
    let after = rss_bytes(None);
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    eprintln!(
        "RSS of a {:.0} MiB model: before load {:.0} MiB, loaded {:.0} MiB, after unload {:.0} MiB",
        mib(expected.bytes()),
        mib(before),
        mib(loaded),
        mib(after)
    );
    assert!(loaded >= before + expected.bytes() * 9 / 10, "the weights are resident");
    assert!(after < before + expected.bytes() / 10, "the weights' memory went back to the OS");

    let cpu = cpu_resources(&mut client).await;
    assert_eq!((cpu.used_bytes, cpu.reserved_bytes), (0, 0));
    assert!(cpu.models.is_empty());
    assert_eq!(state_of(&mut client, "big").await, pb::ModelState::Unloaded);
    let again = client.unload_model(pb::UnloadModelRequest { model_id: "big".into() }).await.expect("unload again");
    assert!(!again.into_inner().was_loaded, "unload is idempotent");
    server.stop().await;
}
