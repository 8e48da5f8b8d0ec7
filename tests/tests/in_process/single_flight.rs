//! Single flight: concurrent LoadModel calls for one model make one load that reads the files
//! once. Alone in its own test binary, so the process's read counter sees only this test.

use futures::future::join_all;
use proto::v1 as pb;
use tests::{TestServer, WAIT, config, fixture, load, load_all, rchar};
use tokio_stream::StreamExt;

/// Sixteen concurrent LoadModel calls for one model make one load: one LOADING transition, and
/// all sixteen streams end at 8/8.
#[tokio::test]
async fn concurrent_loads_share_one_load() {
    let tmp = tempfile::tempdir().expect("tmp");
    let expected = fixture::large_sharded_model(&tmp.path().join("m"), 64, 2, 4).expect("fixture");
    let server = TestServer::start(config(tmp.path())).await;
    let mut client = server.client().await;
    let mut watch =
        client.watch_models(pb::WatchModelsRequest { model_id: "m".into() }).await.expect("watch").into_inner();

    let read_before = rchar();
    let loads = (0..16).map(|_| {
        let channel = server.channel();
        async move { load_all(&mut pb::model_loader_client::ModelLoaderClient::new(channel), load("m")).await }
    });
    for (messages, end) in join_all(loads).await {
        end.expect("every stream ends OK");
        assert_eq!(messages.last().map(|m| m.step), Some(8));
    }
    let mut loading = 0;
    loop {
        let event = tokio::time::timeout(WAIT, watch.next()).await.expect("watch moves").expect("open").expect("ok");
        if let Some(pb::model_event::Event::Status(s)) = event.event {
            match s.state() {
                pb::ModelState::Loading => loading += 1,
                pb::ModelState::Loaded => break,
                _ => {}
            }
        }
    }
    assert_eq!(loading, 1, "exactly one load");
    let read = rchar() - read_before;
    eprintln!("16 concurrent loads of {} bytes read {read} bytes", expected.bytes());
    assert!(read >= expected.bytes(), "the weights were read");
    assert!(read < expected.bytes() * 3 / 2, "the weights were read once, not {read} bytes");
    assert_eq!(tests::cpu_resources(&mut client).await.used_bytes, expected.booked());
    server.stop().await;
}
