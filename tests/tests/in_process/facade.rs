//! The facade used directly, without gRPC: races too narrow for a network round trip to hit.

use std::sync::Arc;

use model_manager::{
    LoadRequest, LoadUpdate, ModelId, ModelManager, ModelStatus, state_manager::ModelState, state_manager::StateEvent,
};
use tests::{WAIT, fixture};

async fn next_status(watch: &mut model_manager::WatchSubscription) -> ModelStatus {
    loop {
        match tokio::time::timeout(WAIT, watch.next()).await.expect("watch moves").expect("open") {
            StateEvent::Status(s) => return s,
            StateEvent::Progress(_) => {}
        }
    }
}

async fn outcome(manager: &ModelManager, id: &ModelId) -> Result<(), String> {
    let mut sub = manager.load(LoadRequest::new(id.clone())).await.map_err(|e| e.to_string())?;
    while let Some(update) = tokio::time::timeout(WAIT, sub.next()).await.expect("load moves") {
        if let LoadUpdate::Done(done) = update {
            return done.map_err(|e| e.to_string());
        }
    }
    Err("the stream ended without an outcome".into())
}

/// A load started right after a cancelled load was seen to end is a new load, never a join of the
/// ended one (which would hand it the old CANCELLED outcome). Multi-threaded, so the load's task
/// and this one really run at the same time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_load_after_a_finished_load_starts_afresh() {
    let tmp = tempfile::tempdir().expect("tmp");
    fixture::single_file_model(&tmp.path().join("m"), &fixture::f32_tensors("w", 2, 1024)).expect("fixture");
    let manager = Arc::new(ModelManager::new(tests::config(tmp.path()).manager, &Default::default()).expect("manager"));
    let id = ModelId::parse("m").expect("id");
    for round in 0..500 {
        let mut watch = manager.watch(Some(id.clone()));
        assert_eq!(next_status(&mut watch).await.state, ModelState::Unloaded, "snapshot");
        let first = manager.load(LoadRequest::new(id.clone())).await.expect("load");
        manager.cancel(&id);
        drop(first);
        assert_eq!(next_status(&mut watch).await.state, ModelState::Loading);
        let ended = next_status(&mut watch).await.state;
        assert!(matches!(ended, ModelState::Unloaded | ModelState::Loaded), "{ended}");
        assert_eq!(outcome(&manager, &id).await, Ok(()), "round {round}: the second load");
        manager.unload(&id, false).await.expect("unload");
    }
    manager.shutdown().await;
}
