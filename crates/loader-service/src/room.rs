//! Making room for a load (step 3): reserve its bytes on every device it needs at once, or, with
//! `--evict lru`, unload the least recently used LOADED models of a device short of room until
//! it fits. Never a model that is loading, and nothing at all when evicting every loaded model
//! could still not make it fit.

use futures::future::select_all;
use pipeline_manager::Resident;
use resource_manager::{DeviceId, DeviceUsage, Reservations, ResourceError};
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

/// The evictions that make room on one device.
struct Evictions {
    device: DeviceId,
    needed: u64,
    /// Least recently used first.
    victims: Vec<Resident>,
    /// Free or on its way back before any of them is evicted.
    coming: u64,
}

impl LoaderService {
    /// Reserves the bytes `needs` says per device for `handle`'s load, on all of them at once
    /// (never one device held while waiting for another), evicting as the policy allows;
    /// evictions are reported as messages of `step`.
    pub(crate) async fn make_room(
        &self,
        handle: &LoadHandle,
        needs: &[(DeviceId, u64)],
        step: ModelLoadStep,
    ) -> Result<Reservations, LoadError> {
        let id = handle.model_id();
        let cancelled = || LoadError::cancelled(handle.model_id());
        // A device named twice needs the sum, as `reserve_all` books it. The caller's order is
        // kept: the first device short of room is the one a wait or a refusal speaks of.
        let mut summed: Vec<(DeviceId, u64)> = Vec::with_capacity(needs.len());
        for &(device, bytes) in needs {
            match summed.iter_mut().find(|(d, _)| *d == device) {
                Some((_, sum)) => *sum = sum.saturating_add(bytes),
                None => summed.push((device, bytes)),
            }
        }
        let needs = summed;
        let mut books =
            needs.iter().map(|&(device, _)| self.resources.changes(device)).collect::<Result<Vec<_>, _>>()?;
        let mut states = self.state.changes();
        let mut said_waiting = false;
        loop {
            books.iter_mut().for_each(|b| {
                b.borrow_and_update();
            });
            states.borrow_and_update();
            let over = match self.resources.reserve_all(&needs, id) {
                Ok(reservations) => return Ok(reservations),
                Err(over @ ResourceError::OverBudget { .. }) => over,
                Err(e) => return Err(e.into()),
            };
            // The devices short of room now, with their figures.
            let mut short = Vec::new();
            for &(device, needed) in &needs {
                let usage = self.resources.usage_of(device)?;
                if usage.free_bytes() < needed {
                    short.push((device, needed, usage));
                }
            }
            if self.config.evict == EvictPolicy::None {
                // Memory on its way back (a failed or cancelled load's pages being freed, an
                // unloaded model's last reader) is back in moments: wait for it, refuse only
                // what would not fit even then, naming the device it would not fit on.
                if let Some((device, needed, usage)) =
                    short.iter().find(|(_, needed, usage)| usage.free_bytes() + usage.leaving_bytes < *needed)
                {
                    return Err(match over {
                        ResourceError::OverBudget { device: d, .. } if d == *device => over,
                        _ => ResourceError::OverBudget {
                            device: *device,
                            model_id: id.to_string(),
                            needed: *needed,
                            free: usage.free_bytes(),
                            budget: usage.budget_bytes,
                        },
                    }
                    .into());
                }
                if let Some((_, needed, usage)) = short.first()
                    && !std::mem::replace(&mut said_waiting, true)
                {
                    handle.note(
                        step,
                        format!(
                            "waiting for memory being freed: {needed} bytes needed, {} free, {} on their way back",
                            usage.free_bytes(),
                            usage.leaving_bytes
                        ),
                    );
                }
            } else {
                // Every short device checked before any model is evicted: a load refused on one
                // device evicts nothing on another.
                let evictions = short
                    .iter()
                    .map(|(device, needed, usage)| self.evictions(handle, *device, *needed, usage))
                    .collect::<Result<Vec<_>, _>>()?;
                for evictions in evictions {
                    self.evict(handle, evictions, step)?;
                }
            }
            // Look again on the next change of any of these devices' books or of a model's
            // state: at once after an eviction; when memory that is coming is back; when a model
            // in transit is stored; when another load's reservation took what was freed. The
            // senders live as long as the service, so `changed` cannot fail.
            let any_book = select_all(books.iter_mut().map(|b| Box::pin(b.changed())));
            tokio::select! {
                _ = any_book => {}
                _ = states.changed() => {}
                () = handle.cancel.cancelled() => return Err(cancelled()),
            }
        }
    }

    /// With `--evict lru`: the least-recently-used models of `device` whose unloading covers
    /// `needed` with what is free or coming back; a refusal when even all of them would not.
    fn evictions(
        &self,
        handle: &LoadHandle,
        device: DeviceId,
        needed: u64,
        usage: &DeviceUsage,
    ) -> Result<Evictions, LoadError> {
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
        let coming = free + usage.leaving_bytes;
        let in_transit = usage.used_bytes.saturating_sub(usage.leaving_bytes + evictable);
        if coming + evictable + in_transit < needed {
            let evictable = evictable + in_transit;
            return Err(
                ResourceError::NoRoom { device, model_id: id.to_string(), needed, free, evictable, budget }.into()
            );
        }
        Ok(Evictions { device, needed, victims, coming })
    }

    /// Unloads the victims, least recently used first, until what is coming covers the need.
    fn evict(&self, handle: &LoadHandle, evictions: Evictions, step: ModelLoadStep) -> Result<(), LoadError> {
        let id = handle.model_id();
        let Evictions { device, needed, victims, mut coming } = evictions;
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
    use crate::{LoadRequest, LoadUpdate, LoaderConfig, ModelId, handle::Wants};

    const GPU0: DeviceId = DeviceId::Cuda(0);
    const GPU1: DeviceId = DeviceId::Cuda(1);

    fn id(s: &str) -> ModelId {
        ModelId::parse(s).expect("id")
    }

    /// A loader over `resources` whose model root is the returned folder (empty until a test
    /// writes a model there).
    fn service(resources: &ResourceManager, evict: EvictPolicy) -> (tempfile::TempDir, Arc<LoaderService>) {
        let root = tempfile::tempdir().expect("temp dir");
        let mut config = LoaderConfig { evict, ..LoaderConfig::default() };
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
        (root, service)
    }

    /// The handle of a load of `name` onto both fake GPUs.
    fn handle(service: &LoaderService, name: &str) -> Arc<LoadHandle> {
        let target = resource_manager::Target::new(vec![GPU0, GPU1], resource_manager::Layout::Split).expect("2 GPUs");
        let wants = Wants { target, device_map: Vec::new(), dtype: None };
        Arc::new(LoadHandle::new(id(name), wants, Default::default(), service.state.clone(), tracing::Span::none()))
    }

    /// Two loads that each need more than half of the same two GPUs (naming them in opposite
    /// orders) wait for a model's memory on its way back, which comes back one GPU at a time. A
    /// GPU back alone is taken by neither (a load holding it would wait for the other GPU while
    /// the other load might hold that one); once both are back one load takes both, and the other
    /// waits for them and takes them when the first hands them back (as a failed load's, booked
    /// as leaving first). One thread, so every step below happens exactly where the test says;
    /// a hang fails it after a bound.
    #[tokio::test(flavor = "current_thread")]
    async fn two_loads_over_the_same_two_gpus_take_turns() {
        let resources = ResourceManager::with_test_devices(1 << 30, &[1000, 1000], MemoryBudget::Percent(100.0));
        let (_root, service) = service(&resources, EvictPolicy::None);
        let reserved = |d| resources.usage_of(d).expect("device").reserved_bytes;
        let before = id("before");
        let leaving0 = resources.reserve(GPU0, &before, 600).expect("fits").into_leaving();
        let leaving1 = resources.reserve(GPU1, &before, 600).expect("fits").into_leaving();
        let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel();
        for (name, needs) in [("a", [(GPU0, 600), (GPU1, 600)]), ("b", [(GPU1, 600), (GPU0, 600)])] {
            let (service, done) = (service.clone(), done_tx.clone());
            tokio::spawn(async move {
                let handle = handle(&service, name);
                let outcome = match service.make_room(&handle, &needs, ModelLoadStep::BuildStrategies).await {
                    Ok(room) => {
                        let got = (room.bytes(GPU0), room.bytes(GPU1));
                        // Booked as leaving before this task yields (so before the other load
                        // looks again): it waits for these bytes rather than be refused.
                        let leaving = room.into_leaving();
                        tokio::task::yield_now().await;
                        drop(leaving);
                        Ok(got)
                    }
                    Err(e) => Err(e.to_string()),
                };
                let _ = done.send((name, outcome));
            });
        }
        let settle = || async {
            for _ in 0..10 {
                tokio::task::yield_now().await;
            }
        };
        settle().await;
        assert!(done_rx.try_recv().is_err(), "both wait for the memory on its way back");
        drop(leaving0);
        settle().await;
        assert_eq!((reserved(GPU0), reserved(GPU1)), (0, 0), "cuda:0 back alone is taken by neither load");
        assert!(done_rx.try_recv().is_err(), "both still wait for cuda:1");
        drop(leaving1);
        let finished = tokio::time::timeout(std::time::Duration::from_secs(10), async {
            let mut finished = Vec::new();
            while finished.len() < 2 {
                finished.push(done_rx.recv().await.expect("a load's outcome"));
            }
            finished
        })
        .await
        .expect("both loads get their room, one after the other");
        for (name, room) in &finished {
            assert_eq!(room, &Ok((600, 600)), "load {name}");
        }
        for usage in resources.usage() {
            assert_eq!((usage.reserved_bytes, usage.used_bytes), (0, 0), "{}", usage.device);
        }
    }

    /// A need that does not fit on one of several devices is refused naming that device, and
    /// leaves nothing reserved on the others; with `--evict lru` too, evicting nothing.
    #[tokio::test]
    async fn a_need_short_on_one_device_names_it() {
        let resources = ResourceManager::with_test_devices(1 << 30, &[1000, 1000], MemoryBudget::Percent(100.0));
        let other = resources.reserve(GPU1, &id("other"), 500).expect("fits");
        for evict in [EvictPolicy::None, EvictPolicy::Lru] {
            let (_root, service) = service(&resources, evict);
            let handle = handle(&service, "m");
            let step = ModelLoadStep::BuildStrategies;
            let larger = service.make_room(&handle, &[(GPU0, 100), (GPU1, 2000)], step).await;
            let larger = larger.expect_err("2000 bytes are more than cuda:1's budget");
            let taken = service.make_room(&handle, &[(GPU0, 900), (GPU1, 600)], step).await;
            let taken = taken.expect_err("500 of cuda:1's 1000 are reserved by another load");
            for (e, needed) in [(&larger, 2000), (&taken, 600)] {
                assert_eq!(e.kind(), crate::Kind::OverBudget, "{evict}: {e}");
                let device = match e {
                    LoadError::Resource(
                        ResourceError::OverBudget { device, needed: n, .. }
                        | ResourceError::LargerThanBudget { device, needed: n, .. }
                        | ResourceError::NoRoom { device, needed: n, .. },
                    ) if *n == needed => *device,
                    _ => panic!("{evict}: not a refusal of {needed} bytes: {e}"),
                };
                assert_eq!(device, GPU1, "{evict}: {e}");
            }
            if evict == EvictPolicy::Lru {
                assert!(matches!(larger, LoadError::Resource(ResourceError::LargerThanBudget { .. })), "{larger}");
                assert!(matches!(taken, LoadError::Resource(ResourceError::NoRoom { .. })), "{taken}");
            }
            assert_eq!(resources.usage_of(GPU0).expect("cuda:0").reserved_bytes, 0, "{evict}");
            assert_eq!(resources.usage_of(GPU1).expect("cuda:1").reserved_bytes, 500, "{evict}");
        }
        drop(other);
    }

    /// Without eviction, a load that fits once the memory on its way back is back waits for it
    /// (saying so) instead of being refused, and loads when it comes.
    #[tokio::test]
    async fn a_load_waits_for_memory_on_its_way_back() {
        let resources =
            ResourceManager::with_cpu_capacity(1 << 30, MemoryBudget::Bytes(10_000), DeviceRequest::Cpu).expect("cpu");
        let (root, service) = service(&resources, EvictPolicy::None);
        let dir = root.path().join("m");
        std::fs::create_dir_all(&dir).expect("model folder");
        std::fs::write(dir.join("config.json"), "{}").expect("config");
        let data = vec![0u8; 4000];
        let view = TensorView::new(Dtype::F32, vec![1000], &data).expect("view");
        safetensors::serialize_to_file([("w", view)], None, &dir.join("model.safetensors")).expect("weights");
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
