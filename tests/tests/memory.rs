//! Memory coming back after an unload, measured as RSS: of this process for the in-process server
//! (alone in its own test binary: memory that other tests freed but the allocator kept would
//! blur the figures), and of the real binary over many load/unload cycles.

use proto::v1 as pb;
use tests::{TestServer, binary::Binary, config, cpu_resources, fixture, load, load_all, mib, rss_bytes, state_of};

/// The tests of this file measure RSS: they run one at a time so one's fixture does not blur the
/// other's figures.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// UnloadModel of a ~500 MB model brings accounting to zero and RSS back down; unloading again
/// is OK with was_loaded = false.
#[tokio::test]
async fn unload_gives_the_memory_back() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let tmp = tempfile::tempdir().expect("tmp");
    let expected = fixture::large_sharded_model(&tmp.path().join("big"), 512, 2, 4).expect("fixture");
    let server = TestServer::start(config(tmp.path())).await;
    let mut client = server.client().await;

    let before = rss_bytes(None);
    load_all(&mut client, load("big")).await.1.expect("load");
    let loaded = rss_bytes(None);
    let cpu = cpu_resources(&mut client).await;
    assert_eq!(cpu.used_bytes, expected.booked());
    assert_eq!(cpu.models.len(), 1);

    let unload =
        client.unload_model(pb::UnloadModelRequest { model_id: "big".into(), force: false }).await.expect("unload");
    let unload = unload.into_inner();
    assert!(unload.was_loaded);
    assert_eq!(unload.freed_bytes, expected.booked());
    let after = rss_bytes(None);
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
    let again = client
        .unload_model(pb::UnloadModelRequest { model_id: "big".into(), force: false })
        .await
        .expect("unload again");
    assert!(!again.into_inner().was_loaded, "unload is idempotent");
    server.stop().await;
}

/// 20 load/unload cycles of a ~266 MB model with tensors from 2 KiB to 62 MiB, in the real binary:
/// RSS after the last unload stays within 10% of RSS after the first (memory is not kept by the
/// allocator or leaked a cycle at a time), and each unload gives back nearly the model's bytes.
#[tokio::test]
async fn twenty_cycles_give_the_memory_back() {
    const CYCLES: usize = 20;
    let _alone = ONE_AT_A_TIME.lock().await;
    let tmp = tempfile::tempdir().expect("tmp");
    let expected = fixture::transformer_like_model(&tmp.path().join("tf"), 512, 16, 32000).expect("fixture");
    let root = tmp.path().to_str().expect("utf-8 path");
    let server = Binary::start(&["--model-root", root, "--offline"], &[]).await;
    let mut client = tests::connect(server.addr).await;
    let rss = || rss_bytes(Some(server.pid()));

    let idle = rss();
    let mut loaded = Vec::new();
    let mut unloaded = Vec::new();
    for cycle in 0..CYCLES {
        load_all(&mut client, load("tf")).await.1.unwrap_or_else(|s| panic!("cycle {cycle}: load: {s:?}"));
        if cycle == 0 {
            let tensors = client.list_tensors(pb::ListTensorsRequest { model_id: "tf".into(), with_checksums: false });
            assert_eq!(tensors.await.expect("ListTensors").into_inner().tensors.len(), expected.tensors.len());
        }
        loaded.push(rss());
        let unload =
            client.unload_model(pb::UnloadModelRequest { model_id: "tf".into(), force: false }).await.expect("unload");
        assert_eq!(unload.into_inner().freed_bytes, expected.booked(), "cycle {cycle}");
        unloaded.push(rss());
    }
    let (first, last) = (unloaded[0], unloaded[CYCLES - 1]);
    eprintln!(
        "RSS of the server over {CYCLES} cycles of a {:.0} MiB model: idle {:.1} MiB; loaded {:.1}..{:.1} MiB; \
         after unload: first {:.1} MiB, last {:.1} MiB, highest {:.1} MiB",
        mib(expected.bytes()),
        mib(idle),
        mib(*loaded.iter().min().expect("cycles")),
        mib(*loaded.iter().max().expect("cycles")),
        mib(first),
        mib(last),
        mib(*unloaded.iter().max().expect("cycles")),
    );
    for (cycle, (&l, &u)) in loaded.iter().zip(&unloaded).enumerate() {
        assert!(l >= idle + expected.bytes() * 9 / 10, "cycle {cycle}: the weights are resident: {l} bytes");
        assert!(
            l - u >= expected.bytes() * 9 / 10,
            "cycle {cycle}: the unload gave back {} of {} bytes",
            l - u,
            expected.bytes()
        );
    }
    assert!(
        last <= first + first / 10,
        "RSS after {CYCLES} cycles ({last} bytes) is within 10% of RSS after the first unload ({first} bytes)"
    );
    let cpu = cpu_resources(&mut client).await;
    assert_eq!((cpu.used_bytes, cpu.reserved_bytes), (0, 0));
}
