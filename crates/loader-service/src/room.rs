//! Making room on a device for a load (step 3): reserve its bytes, or, with `--evict lru`, unload
//! the least recently used LOADED models until it fits. Never a model that is loading, and nothing
//! at all when evicting every loaded model could still not make it fit.

use resource_manager::{DeviceId, Reservation, ResourceError};
use steps::ModelLoadStep;

use crate::{LoadError, LoadHandle, LoaderService};

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
        let id = handle.model_id().as_str();
        let cancelled = || LoadError::Cancelled { model_id: id.to_owned() };
        let mut books = self.resources.changes(device)?;
        let mut states = self.state.changes();
        loop {
            books.borrow_and_update();
            states.borrow_and_update();
            match self.resources.reserve(device, id, needed) {
                Ok(reservation) => return Ok(reservation),
                Err(ResourceError::OverBudget { .. }) if self.config.evict == EvictPolicy::Lru => {}
                Err(e) => return Err(e.into()),
            }
            let usage = self.resources.usage_of(device)?;
            let budget = usage.budget_bytes;
            if needed > budget {
                return Err(ResourceError::LargerThanBudget { device, model_id: id.to_owned(), needed, budget }.into());
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
                    ResourceError::NoRoom { device, model_id: id.to_owned(), needed, free, evictable, budget }.into()
                );
            }
            for victim in victims {
                if coming >= needed {
                    break;
                }
                if handle.cancel.is_cancelled() {
                    return Err(cancelled());
                }
                let reason = format!("evicted (least recently used) to make room for {id} on {device}");
                // Another caller may be unloading it already: then its bytes are coming anyway.
                if self.unload_loaded(&victim.model_id, Some(reason)).is_ok() {
                    tracing::info!(
                        evicted = victim.model_id,
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
}
