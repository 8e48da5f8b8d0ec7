//! Making room on a device for a load (step 3): reserve its bytes, or, with `--evict lru`, unload
//! the least recently used LOADED models until it fits. Never a model that is loading, and nothing
//! at all when evicting every loaded model could still not make it fit.

use resource_manager::{DeviceId, Reservation, ResourceError};
use steps::ModelLoadStep;

use crate::{LoadError, LoadHandle, LoaderService, NotUnloaded};

/// What to do when a load does not fit in the budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, strum::Display, strum::EnumString)]
#[strum(serialize_all = "lowercase")]
pub enum EvictPolicy {
    /// Refuse the load with RESOURCE_EXHAUSTED.
    #[default]
    None,
    /// Unload least-recently-used LOADED models until the load fits.
    Lru,
}

impl LoaderService {
    /// Reserves `needed` bytes on `device` for `handle`'s load, evicting as the policy allows;
    /// evictions are reported as messages of `step`.
    pub(crate) async fn make_room(
        &self,
        handle: &LoadHandle,
        device: DeviceId,
        needed: u64,
        step: ModelLoadStep,
    ) -> Result<Reservation, LoadError> {
        let id = handle.model_id();
        let cancelled = || LoadError::cancelled(handle.model_id());
        let mut books = self.resources.changes(device)?;
        let mut states = self.state.changes();
        let mut said_waiting = false;
        loop {
            books.borrow_and_update();
            states.borrow_and_update();
            let over = match self.resources.reserve(device, id, needed) {
                Ok(reservation) => return Ok(reservation),
                Err(over @ ResourceError::OverBudget { .. }) => over,
                Err(e) => return Err(e.into()),
            };
            let usage = self.resources.usage_of(device)?;
            if self.config.evict == EvictPolicy::None {
                // Memory on its way back (a failed or cancelled load's pages being freed, an
                // unloaded model's last reader) is back in moments: wait for it, refuse only
                // what would not fit even then.
                let free = usage.free_bytes();
                if free + usage.leaving_bytes < needed {
                    return Err(over.into());
                }
                if !std::mem::replace(&mut said_waiting, true) {
                    handle.note(
                        step,
                        format!(
                            "waiting for memory being freed: {needed} bytes needed, {free} free, {} on their way back",
                            usage.leaving_bytes
                        ),
                    );
                }
            } else {
                self.evict_for(handle, device, needed, step, &usage)?;
            }
            // Look again on the next change of the books or of a model's state: at once after an
            // eviction; when memory that is coming is back; when a model in transit is stored;
            // when another load's reservation took what was freed. The senders live as long as
            // the service, so `changed` cannot fail.
            tokio::select! {
                _ = books.changed() => {}
                _ = states.changed() => {}
                () = handle.cancel.cancelled() => return Err(cancelled()),
            }
        }
    }

    /// With `--evict lru`: unloads least-recently-used models until what is free or coming back
    /// covers `needed`; refuses at once, evicting nothing, when even all of them would not.
    fn evict_for(
        &self,
        handle: &LoadHandle,
        device: DeviceId,
        needed: u64,
        step: ModelLoadStep,
        usage: &resource_manager::DeviceUsage,
    ) -> Result<(), LoadError> {
        let id = handle.model_id();
        let budget = usage.budget_bytes;
        if needed > budget {
            return Err(ResourceError::LargerThanBudget { device, model_id: id.to_string(), needed, budget }.into());
        }
        let victims = self.pipelines.least_recently_used(device);
        let evictable: u64 = victims.iter().map(|v| v.bytes).sum();
        // Memory of models already unloaded comes back by itself once their last reader (a
        // ListTensors) lets go: it counts as coming, not as something to evict. Bytes held by
        // a model between two books (a load committing before it is stored, an unload taking it
        // out of the store) will be evictable or coming in a moment: they count as evictable.
        let free = usage.free_bytes();
        let mut coming = free + usage.leaving_bytes;
        let in_transit = usage.used_bytes.saturating_sub(usage.leaving_bytes + evictable);
        if coming + evictable + in_transit < needed {
            let evictable = evictable + in_transit;
            return Err(
                ResourceError::NoRoom { device, model_id: id.to_string(), needed, free, evictable, budget }.into()
            );
        }
        for victim in victims {
            if coming >= needed {
                break;
            }
            if handle.cancel.is_cancelled() {
                return Err(LoadError::cancelled(handle.model_id()));
            }
            let reason = format!("evicted (least recently used) to make room for {id} on {device}");
            // Another caller may be unloading it already: then its bytes are coming anyway. A
            // client that attached since the victims were chosen keeps it, and its bytes.
            let unloaded = self.unload_loaded(&victim.model_id, Some(reason), false);
            if matches!(unloaded, Err(NotUnloaded::Attached(_))) {
                continue;
            }
            if unloaded.is_ok() {
                tracing::info!(
                    evicted = %victim.model_id,
                    bytes = victim.bytes,
                    needed,
                    free = coming,
                    "evicted to make room"
                );
                // `coming`: free before this eviction, counting those just before it.
                handle.note(
                    step,
                    format!(
                        "evicted {} ({} bytes, least recently used) to make room: {needed} bytes needed, {coming} free",
                        victim.model_id, victim.bytes
                    ),
                );
            }
            coming += victim.bytes;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use pipeline_manager::PipelineManager;
    use resource_manager::{DeviceRequest, MemoryBudget, ResourceManager};
    use safetensors::{Dtype, tensor::TensorView};
    use state_manager::StateManager;

    use super::*;
    use crate::{LoadRequest, LoadUpdate, LoaderConfig, ModelId};

    /// Without eviction, a load that fits once the memory on its way back is back waits for it
    /// (saying so) instead of being refused, and loads when it comes.
    #[tokio::test]
    async fn a_load_waits_for_memory_on_its_way_back() {
        let root = tempfile::tempdir().expect("temp dir");
        let dir = root.path().join("m");
        std::fs::create_dir_all(&dir).expect("model folder");
        std::fs::write(dir.join("config.json"), "{}").expect("config");
        let data = vec![0u8; 4000];
        let view = TensorView::new(Dtype::F32, vec![1000], &data).expect("view");
        safetensors::serialize_to_file([("w", view)], None, &dir.join("model.safetensors")).expect("weights");

        let resources =
            ResourceManager::with_cpu_capacity(1 << 30, MemoryBudget::Bytes(10_000), DeviceRequest::Cpu).expect("cpu");
        let mut config = LoaderConfig::default();
        config.sources.model_root = Some(root.path().to_owned());
        config.sources.offline = true;
        let service = LoaderService::new(crate::LoaderParts {
            config,
            state: Arc::new(StateManager::new(64)),
            resources: resources.clone(),
            pipelines: Arc::new(PipelineManager::new()),
            cancel: Default::default(),
        })
        .expect("service");
        // Another model's 8,000 bytes are on their way out: 2,000 free, 4,000 needed, the
        // tensor's metadata and the config's 2 bytes (a small file kept with the model).
        let leaving = resources
            .reserve(DeviceId::Cpu, &ModelId::parse("other").expect("id"), 8_000)
            .expect("fits")
            .into_leaving();

        let mut load = service.load(LoadRequest::new(ModelId::parse("m").expect("id"))).await.expect("starts");
        loop {
            match load.next().await.expect("the load goes on") {
                LoadUpdate::Progress(p) if p.detail.starts_with("waiting for memory being freed") => {
                    let needed = 4000 + weights::header::metadata_bytes("w", 1) + 2;
                    assert_eq!(
                        p.detail,
                        format!(
                            "waiting for memory being freed: {needed} bytes needed, 2000 free, 8000 on their way back"
                        )
                    );
                    break;
                }
                LoadUpdate::Progress(_) => {}
                LoadUpdate::Done(outcome) => panic!("the load ended instead of waiting: {outcome:?}"),
            }
        }
        drop(leaving);
        loop {
            match load.next().await.expect("the load ends") {
                LoadUpdate::Progress(_) => {}
                LoadUpdate::Done(outcome) => {
                    outcome.expect("the load gets the memory");
                    break;
                }
            }
        }
        let booked = 4000 + weights::header::metadata_bytes("w", 1) + 2;
        assert_eq!(resources.usage_of(DeviceId::Cpu).expect("cpu").used_bytes, booked);
    }
}
