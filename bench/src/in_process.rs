//! Our loader in this process: the facade and its loader service reading a model from a model
//! root, as the server does, without gRPC in between.

use std::{
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, anyhow};
use fixtures::fixture::Expected;
use model_manager::{LoadRequest, LoadUpdate, ManagerConfig, ModelId, ModelManager};

/// A model manager over `model_root`, offline, with the default budget.
pub fn manager(model_root: &Path) -> anyhow::Result<Arc<ModelManager>> {
    manager_on(model_root, model_manager::resource_manager::DeviceRequest::Cpu)
}

/// As [`manager`], loading onto `device` unless a request says otherwise.
pub fn manager_on(
    model_root: &Path,
    device: model_manager::resource_manager::DeviceRequest,
) -> anyhow::Result<Arc<ModelManager>> {
    let default_device = model_manager::resource_manager::TargetRequest::Devices(vec![device]);
    let mut config = ManagerConfig { default_device, ..ManagerConfig::default() };
    config.loader.sources.model_root = Some(model_root.to_owned());
    config.loader.sources.offline = true;
    Ok(Arc::new(ModelManager::new(config, &Default::default()).map_err(|e| anyhow!("{e}"))?))
}

/// Loads `id` to LOADED and returns the time from the request to the end of the load.
pub async fn load(manager: &ModelManager, id: &str) -> anyhow::Result<Duration> {
    let model_id = ModelId::parse(id).map_err(|e| anyhow!("{e}"))?;
    let start = Instant::now();
    let mut updates = manager.load(LoadRequest::new(model_id)).await.map_err(|e| anyhow!("{e}"))?;
    while let Some(update) = updates.next().await {
        if let LoadUpdate::Done(outcome) = update {
            outcome.map_err(|e| anyhow!("loading {id}: {e}"))?;
            return Ok(start.elapsed());
        }
    }
    Err(anyhow!("the load of {id} ended without an outcome"))
}

/// What is resident for `id`: name → (dtype, shape, sha256).
pub async fn resident(manager: &ModelManager, id: &str) -> anyhow::Result<Expected> {
    let model_id = ModelId::parse(id).map_err(|e| anyhow!("{e}"))?;
    let tensors = manager.tensors(&model_id, true).await.map_err(|e| anyhow!("{e}"))?;
    let mut expected = Expected::default();
    for t in tensors {
        let sha = t.sha256.context("a checksum was asked for")?;
        expected.tensors.insert(t.name, (t.dtype.to_owned(), t.shape, sha));
    }
    Ok(expected)
}

pub async fn unload(manager: &ModelManager, id: &str) -> anyhow::Result<()> {
    let model_id = ModelId::parse(id).map_err(|e| anyhow!("{e}"))?;
    manager.unload(&model_id, false).await.map_err(|e| anyhow!("{e}"))?;
    Ok(())
}
