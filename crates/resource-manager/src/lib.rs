//! Devices and their memory: which devices this build and machine have, each device's capacity
//! and budget, reservations for loads in flight, and the bytes each loaded model holds.
//!
//! Reservations ([`Reservation`]) and allocations ([`ModelAllocation`]) are guards: dropping one
//! gives its bytes back to the budget, so an early return, a cancelled load or an unload cannot
//! leak accounting. This crate never reads model files and never decides what to load.
//!
//! Host memory: the CPU's capacity comes from the cgroup limit when one is set (a container),
//! else from `MemAvailable`; [`host::configure_allocator`] and [`host::release_free_memory`] make
//! freed tensor memory go back to the operating system.

mod device;
#[cfg(feature = "cuda")]
pub mod gpu;
pub mod host;
pub mod staging;
pub mod sync;
mod target;
#[cfg(feature = "cuda")]
pub mod vmm;

use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicBool, Ordering},
    },
};

use tokio::sync::watch;

pub use model_id::ModelId;

pub use crate::{
    device::{DeviceId, DeviceRequest, InvalidBudget, MemoryBudget},
    target::{Layout, MAX_TARGET_DEVICES, Target, TargetRequest},
};

/// The share of a device's capacity models may hold when no budget is configured.
pub const DEFAULT_BUDGET_PERCENT: f64 = 80.0;

/// What went wrong with a device or its memory.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResourceError {
    #[error("invalid device {0:?}: expected \"cpu\", \"cuda\" or \"cuda:N\"")]
    InvalidDevice(String),
    #[error("invalid placement {0:?}: expected \"split\" or \"replicate\"")]
    InvalidPlacement(String),
    #[error("device {device} is not available: {reason}")]
    DeviceUnavailable { device: String, reason: String },
    #[error(
        "not enough memory on {device} for {model_id}: needs {needed} bytes, {free} bytes free of a budget of {budget} bytes"
    )]
    OverBudget { device: DeviceId, model_id: String, needed: u64, free: u64, budget: u64 },
    #[error(
        "{model_id} needs {needed} bytes, more than the whole budget of {budget} bytes on {device}: nothing was evicted"
    )]
    LargerThanBudget { device: DeviceId, model_id: String, needed: u64, budget: u64 },
    #[error(
        "not enough memory on {device} for {model_id}: needs {needed} bytes, {free} bytes free of a budget of {budget} \
         bytes, and evicting every loaded model would free only {evictable} bytes more (the rest is reserved by loads \
         in flight): nothing was evicted"
    )]
    NoRoom { device: DeviceId, model_id: String, needed: u64, free: u64, evictable: u64, budget: u64 },
}

/// Memory figures of one device, for GetResources.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceUsage {
    pub device: DeviceId,
    pub total_bytes: u64,
    pub budget_bytes: u64,
    /// Bytes held by models, loaded or on their way out.
    pub used_bytes: u64,
    /// Of `used_bytes`, those of models being unloaded whose memory is not back yet (a reader
    /// still holds them); they come back without anyone unloading anything.
    pub leaving_bytes: u64,
    pub reserved_bytes: u64,
    /// Free memory as the system reports it now.
    pub available_bytes: u64,
    /// The most bytes held and reserved at once since start-up.
    pub peak_bytes: u64,
    /// Bytes held per model, sorted by model id.
    pub models: Vec<(ModelId, u64)>,
}

impl DeviceUsage {
    /// Budget not held or reserved by anyone.
    pub fn free_bytes(&self) -> u64 {
        self.budget_bytes.saturating_sub(self.used_bytes + self.reserved_bytes)
    }
}

#[derive(Debug, Default)]
struct Ledger {
    /// Bytes reserved by loads in flight, per model.
    reserved: BTreeMap<ModelId, u64>,
    /// Bytes held by loaded models.
    models: BTreeMap<ModelId, u64>,
    /// Bytes held by models on their way out (unloaded, memory not back yet).
    leaving: BTreeMap<ModelId, u64>,
    /// The largest `committed()` ever seen.
    peak: u64,
}

impl Ledger {
    fn committed(&self) -> u64 {
        self.reserved.values().sum::<u64>() + self.models.values().sum::<u64>() + self.leaving.values().sum::<u64>()
    }
}

/// One device's memory book.
#[derive(Debug)]
struct DeviceMemory {
    id: DeviceId,
    capacity: u64,
    budget: u64,
    /// Reservations and allocations; a check and its booking happen under one lock, so the sum
    /// never exceeds the budget. Never held across an `.await` (there are none in this crate).
    ledger: Mutex<Ledger>,
    /// Notified after every change of the ledger, for loads waiting for memory to come back.
    changed: watch::Sender<()>,
    /// The GPU behind a `cuda:N` device (its free memory, its candle device).
    #[cfg(feature = "cuda")]
    gpu: Option<Arc<gpu::Gpu>>,
    #[cfg(not(feature = "cuda"))]
    gpu: Option<std::convert::Infallible>,
}

impl DeviceMemory {
    fn new(id: DeviceId, capacity: u64, budget: u64) -> Self {
        Self { id, capacity, budget, ledger: Mutex::new(Ledger::default()), changed: watch::Sender::new(()), gpu: None }
    }

    fn ledger(&self) -> MutexGuard<'_, Ledger> {
        // A panic while holding this lock cannot leave the ledger half-updated (each update is one
        // map operation), so a poisoned lock is still consistent.
        crate::sync::lock(&self.ledger)
    }

    /// Applies one change to the ledger, records the peak, and tells the waiters.
    fn book<T>(&self, f: impl FnOnce(&mut Ledger) -> T) -> T {
        let mut ledger = self.ledger();
        let out = f(&mut ledger);
        ledger.peak = ledger.peak.max(ledger.committed());
        drop(ledger);
        self.changed.send_replace(());
        out
    }

    fn usage(&self) -> DeviceUsage {
        let ledger = self.ledger();
        let mut models = ledger.models.clone();
        for (id, bytes) in &ledger.leaving {
            *models.entry(id.clone()).or_default() += bytes;
        }
        let leaving_bytes = ledger.leaving.values().sum();
        DeviceUsage {
            device: self.id,
            total_bytes: self.capacity,
            budget_bytes: self.budget,
            used_bytes: ledger.models.values().sum::<u64>() + leaving_bytes,
            leaving_bytes,
            reserved_bytes: ledger.reserved.values().sum(),
            available_bytes: match (self.id, &self.gpu) {
                (DeviceId::Cpu, _) => host::available(),
                #[cfg(feature = "cuda")]
                (DeviceId::Cuda(_), Some(gpu)) => gpu.free(),
                (DeviceId::Cuda(_), _) => 0,
            },
            peak_bytes: ledger.peak,
            models: models.into_iter().collect(),
        }
    }
}

/// The devices of this process and their memory.
#[derive(Debug, Clone)]
pub struct ResourceManager {
    devices: Arc<Vec<Arc<DeviceMemory>>>,
    default_device: DeviceId,
    /// Loads that name no device go here: `default_device` alone unless set to several GPUs
    /// ([`Self::set_default_target`]).
    default_target: Option<Target>,
    /// Pinned buffers every GPU load reads through, allocated once ([`Self::allocate_staging`]).
    #[cfg(feature = "cuda")]
    staging: Option<Arc<gpu::PinnedPool>>,
}

impl ResourceManager {
    /// The CPU with its capacity read from the machine (see [`host::capacity`]) and the budget.
    pub fn new(budget: MemoryBudget, default_device: DeviceRequest) -> Result<Self, ResourceError> {
        Self::with_cpu_capacity(host::capacity(), budget, default_device)
    }

    /// As [`ResourceManager::new`] with a given CPU capacity (tests, and machines that know better).
    pub fn with_cpu_capacity(
        capacity: u64,
        budget: MemoryBudget,
        default_device: DeviceRequest,
    ) -> Result<Self, ResourceError> {
        let cpu = DeviceMemory::new(DeviceId::Cpu, capacity, budget.of(capacity));
        #[allow(unused_mut)]
        let mut devices = vec![Arc::new(cpu)];
        #[cfg(feature = "cuda")]
        for gpu in gpu::Gpu::all() {
            let mut memory = DeviceMemory::new(DeviceId::Cuda(gpu.ordinal), gpu.total, budget.of(gpu.total));
            tracing::info!(device = %memory.id, name = gpu.name, total = gpu.total, free = gpu.free(), "GPU");
            memory.gpu = Some(Arc::new(gpu));
            devices.push(Arc::new(memory));
        }
        let mut this = Self {
            devices: Arc::new(devices),
            default_device: DeviceId::Cpu,
            default_target: None,
            #[cfg(feature = "cuda")]
            staging: None,
        };
        this.default_device = this.resolve(Some(default_device))?;
        Ok(this)
    }

    /// Books alone, for tests: the CPU and fake GPUs `cuda:0..` of the given capacities, each with
    /// `budget` of it, whatever this build and machine have. Nothing is allocated on them (no
    /// placement, no staging pool). A feature rather than `cfg(test)`: other crates' tests need
    /// several GPUs' books too, and no other build can make a device that is not there.
    #[cfg(any(test, feature = "test-devices"))]
    pub fn with_test_devices(cpu_capacity: u64, gpu_capacities: &[u64], budget: MemoryBudget) -> Self {
        let cpu = DeviceMemory::new(DeviceId::Cpu, cpu_capacity, budget.of(cpu_capacity));
        let gpus = gpu_capacities
            .iter()
            .enumerate()
            .map(|(ordinal, &capacity)| DeviceMemory::new(DeviceId::Cuda(ordinal), capacity, budget.of(capacity)));
        Self {
            devices: Arc::new(std::iter::once(cpu).chain(gpus).map(Arc::new).collect()),
            default_device: DeviceId::Cpu,
            default_target: None,
            #[cfg(feature = "cuda")]
            staging: None,
        }
    }

    /// The device a request names (or the server's default), if this build and machine have it.
    pub fn resolve(&self, request: Option<DeviceRequest>) -> Result<DeviceId, ResourceError> {
        match request {
            None => Ok(self.default_device),
            Some(DeviceRequest::Cpu) => Ok(DeviceId::Cpu),
            Some(request @ DeviceRequest::Cuda(_)) => {
                let id = request.id();
                // Only a CUDA build lists GPUs (or tests, with devices of books alone).
                if self.devices.iter().any(|d| d.id == id) {
                    return Ok(id);
                }
                let reason = if cfg!(feature = "cuda") {
                    format!("the driver reports {} CUDA device(s)", self.devices.len() - 1)
                } else {
                    "this build has no CUDA support (built without the `cuda` feature)".into()
                };
                Err(ResourceError::DeviceUnavailable { device: id.to_string(), reason })
            }
        }
    }

    /// Allocates the staging buffers GPU loads read through: `bytes` of pinned host memory in
    /// buffers of [`staging::BUFFER_BYTES`] (at least one), when this build and machine have a
    /// GPU; nothing otherwise. Returns the bytes pinned.
    pub fn allocate_staging(&mut self, bytes: u64) -> Result<u64, ResourceError> {
        #[cfg(feature = "cuda")]
        if let Some(first) = self.devices.iter().find_map(|d| d.gpu.as_ref()) {
            let count = usize::try_from(bytes / staging::BUFFER_BYTES as u64).unwrap_or(usize::MAX).max(1);
            let started = std::time::Instant::now();
            let pool = gpu::pinned_pool(first, count, staging::BUFFER_BYTES).map_err(|e| {
                ResourceError::DeviceUnavailable { device: "pinned host memory".into(), reason: e.to_string() }
            })?;
            let pinned = (count * staging::BUFFER_BYTES) as u64;
            tracing::info!(
                buffers = count,
                bytes = pinned,
                took_ms = started.elapsed().as_millis() as u64,
                "pinned staging pool"
            );
            self.staging = Some(Arc::new(pool));
            return Ok(pinned);
        }
        let _ = bytes;
        Ok(0)
    }

    /// The GPU behind `device` and the staging pool its loads read through.
    #[cfg(feature = "cuda")]
    pub fn gpu_staging(&self, device: DeviceId) -> Result<(Arc<gpu::Gpu>, Arc<gpu::PinnedPool>), ResourceError> {
        let unavailable =
            |reason: &str| ResourceError::DeviceUnavailable { device: device.to_string(), reason: reason.into() };
        let gpu = self.memory(device)?.gpu.clone().ok_or_else(|| unavailable("not a GPU"))?;
        let pool = self.staging.clone().ok_or_else(|| unavailable("no pinned staging pool was allocated"))?;
        Ok((gpu, pool))
    }

    fn memory(&self, device: DeviceId) -> Result<&Arc<DeviceMemory>, ResourceError> {
        self.devices.iter().find(|d| d.id == device).ok_or_else(|| ResourceError::DeviceUnavailable {
            device: device.to_string(),
            reason: "not managed by this server".into(),
        })
    }

    /// Reserves `bytes` on `device` for a load of `model_id`, or says how far over budget it is.
    pub fn reserve(&self, device: DeviceId, model_id: &ModelId, bytes: u64) -> Result<Reservation, ResourceError> {
        let mut reservations = self.reserve_all(&[(device, bytes)], model_id)?;
        reservations.take(device).ok_or_else(|| ResourceError::DeviceUnavailable {
            device: device.to_string(),
            reason: "no reservation was made on it".into(),
        })
    }

    /// Reserves bytes on several devices for a load of `model_id`, all or none: if one device
    /// lacks room, nothing is booked anywhere and the error names that device. A load thus never
    /// holds one device while it waits for another (two loads doing so would wait for each other
    /// for ever). Every ledger is locked before anything is checked, always in `DeviceId` order,
    /// so two such calls cannot deadlock. A device named twice needs the sum of its bytes.
    pub fn reserve_all(&self, needs: &[(DeviceId, u64)], model_id: &ModelId) -> Result<Reservations, ResourceError> {
        let mut wanted: BTreeMap<DeviceId, u64> = BTreeMap::new();
        for &(device, bytes) in needs {
            let sum = wanted.entry(device).or_default();
            *sum = sum.saturating_add(bytes);
        }
        let memories = wanted
            .into_iter()
            .map(|(device, bytes)| Ok((self.memory(device)?, bytes)))
            .collect::<Result<Vec<_>, _>>()?;
        // In the map's order: `DeviceId` order.
        let mut ledgers: Vec<MutexGuard<'_, Ledger>> = memories.iter().map(|(memory, _)| memory.ledger()).collect();
        for ((memory, bytes), ledger) in memories.iter().zip(&ledgers) {
            let free = memory.budget.saturating_sub(ledger.committed());
            if *bytes > free {
                return Err(ResourceError::OverBudget {
                    device: memory.id,
                    model_id: model_id.to_string(),
                    needed: *bytes,
                    free,
                    budget: memory.budget,
                });
            }
        }
        let mut reservations = BTreeMap::new();
        for ((memory, bytes), ledger) in memories.iter().zip(ledgers.iter_mut()) {
            *ledger.reserved.entry(model_id.clone()).or_default() += bytes;
            ledger.peak = ledger.peak.max(ledger.committed());
            let reservation = Reservation { memory: Arc::clone(memory), model_id: model_id.clone(), bytes: *bytes };
            reservations.insert(memory.id, reservation);
        }
        drop(ledgers);
        // Only a booking is announced: a refusal changed nothing (waiters woken by it would only
        // try again and be refused again).
        for (memory, _) in &memories {
            memory.changed.send_replace(());
        }
        Ok(Reservations(reservations))
    }

    /// Memory figures of every device.
    pub fn usage(&self) -> Vec<DeviceUsage> {
        self.devices.iter().map(|d| d.usage()).collect()
    }

    /// Memory figures of one device.
    pub fn usage_of(&self, device: DeviceId) -> Result<DeviceUsage, ResourceError> {
        Ok(self.memory(device)?.usage())
    }

    /// Changes whenever the device's ledger does (a reservation, a commit, memory coming back).
    pub fn changes(&self, device: DeviceId) -> Result<watch::Receiver<()>, ResourceError> {
        Ok(self.memory(device)?.changed.subscribe())
    }
}

/// Bytes set aside for a load in flight; given back when dropped, or turned into the model's
/// [`ModelAllocation`] when the load finishes.
#[derive(Debug)]
pub struct Reservation {
    memory: Arc<DeviceMemory>,
    model_id: ModelId,
    bytes: u64,
}

impl Reservation {
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Changes the reserved bytes to `bytes` (an estimate replaced by the exact figure): shrinking
    /// always succeeds, growing only within the budget.
    pub fn resize(&mut self, bytes: u64) -> Result<(), ResourceError> {
        let memory = self.memory.clone();
        memory.book(|ledger| self.resize_in(ledger, bytes))
    }

    fn resize_in(&mut self, ledger: &mut Ledger, bytes: u64) -> Result<(), ResourceError> {
        if bytes > self.bytes {
            let free = self.memory.budget.saturating_sub(ledger.committed());
            let more = bytes - self.bytes;
            if more > free {
                return Err(ResourceError::OverBudget {
                    device: self.memory.id,
                    model_id: self.model_id.to_string(),
                    needed: bytes,
                    free: free + self.bytes,
                    budget: self.memory.budget,
                });
            }
            *ledger.reserved.entry(self.model_id.clone()).or_default() += more;
        } else {
            release(&mut ledger.reserved, &self.model_id, self.bytes - bytes);
        }
        self.bytes = bytes;
        Ok(())
    }

    /// Replaces the reservation by the model's real bytes, held until the allocation is dropped.
    pub fn commit(mut self, actual_bytes: u64) -> ModelAllocation {
        let memory = self.memory.clone();
        memory.book(|ledger| {
            release(&mut ledger.reserved, &self.model_id, self.bytes);
            *ledger.models.entry(self.model_id.clone()).or_default() += actual_bytes;
            // Moved in this same critical section: the reservation's Drop now releases nothing.
            self.bytes = 0;
        });
        ModelAllocation {
            memory: self.memory.clone(),
            model_id: self.model_id.clone(),
            bytes: actual_bytes,
            leaving: AtomicBool::new(false),
        }
    }
}

impl Reservation {
    /// Books the reserved bytes as on their way out, for a load that failed holding memory that
    /// is yet to be freed: they are released when the returned allocation is dropped, after that
    /// memory. Loads that need room wait for them rather than fail.
    pub fn into_leaving(mut self) -> ModelAllocation {
        let memory = self.memory.clone();
        let bytes = self.bytes;
        memory.book(|ledger| {
            release(&mut ledger.reserved, &self.model_id, bytes);
            if bytes > 0 {
                *ledger.leaving.entry(self.model_id.clone()).or_default() += bytes;
            }
            // Moved in this same critical section: the reservation's Drop now releases nothing.
            self.bytes = 0;
        });
        ModelAllocation { memory, model_id: self.model_id.clone(), bytes, leaving: AtomicBool::new(true) }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.bytes > 0 {
            self.memory.book(|ledger| release(&mut ledger.reserved, &self.model_id, self.bytes));
        }
    }
}

/// One load's reservations, one per device, made together by [`ResourceManager::reserve_all`].
#[derive(Debug, Default)]
pub struct Reservations(BTreeMap<DeviceId, Reservation>);

impl Reservations {
    pub fn get(&self, device: DeviceId) -> Option<&Reservation> {
        self.0.get(&device)
    }

    /// The bytes reserved on `device` (0 where none are).
    pub fn bytes(&self, device: DeviceId) -> u64 {
        self.get(device).map_or(0, Reservation::bytes)
    }

    /// Its devices, in `DeviceId` order.
    pub fn devices(&self) -> impl Iterator<Item = DeviceId> + '_ {
        self.0.keys().copied()
    }

    /// Takes the reservation on `device` out of the set.
    pub fn take(&mut self, device: DeviceId) -> Option<Reservation> {
        self.0.remove(&device)
    }

    /// Each reservation replaced by the bytes the model really holds on its device (`actual`).
    pub fn commit(self, mut actual: impl FnMut(DeviceId) -> u64) -> Allocations {
        Allocations(self.0.into_iter().map(|(device, r)| (device, r.commit(actual(device)))).collect())
    }

    /// Every reservation booked as on its way out (see [`Reservation::into_leaving`]).
    pub fn into_leaving(self) -> Allocations {
        Allocations(self.0.into_iter().map(|(device, r)| (device, r.into_leaving())).collect())
    }
}

/// The bytes a loaded model holds, one [`ModelAllocation`] per device: its weights' devices and,
/// for a model on a GPU, the host's for its tensors' metadata. Dropped in `DeviceId` order (the
/// host's first).
#[derive(Debug, Default)]
pub struct Allocations(BTreeMap<DeviceId, ModelAllocation>);

impl Allocations {
    pub fn get(&self, device: DeviceId) -> Option<&ModelAllocation> {
        self.0.get(&device)
    }

    /// The bytes held on `device` (0 where none are).
    pub fn bytes(&self, device: DeviceId) -> u64 {
        self.get(device).map_or(0, ModelAllocation::bytes)
    }

    /// Every device's allocation, in `DeviceId` order.
    pub fn iter(&self) -> impl Iterator<Item = (DeviceId, &ModelAllocation)> {
        self.0.iter().map(|(&device, a)| (device, a))
    }

    /// See [`ModelAllocation::prepare_free`], for each device: only a GPU's does anything (a model
    /// over several GPUs frees each one's tensors after its own `prepare_free`).
    pub fn prepare_free(&self) {
        self.0.values().for_each(ModelAllocation::prepare_free);
    }

    /// See [`ModelAllocation::leave`]: every device's bytes on their way out.
    pub fn leave(&self) {
        self.0.values().for_each(ModelAllocation::leave);
    }
}

/// The bytes a loaded model holds on its device; given back when dropped (on unload).
#[derive(Debug)]
pub struct ModelAllocation {
    memory: Arc<DeviceMemory>,
    model_id: ModelId,
    bytes: u64,
    /// Booked under `leaving` instead of `models`.
    leaving: AtomicBool,
}

impl ModelAllocation {
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Makes this thread able to free the memory these bytes stand for, before the tensors holding
    /// it are dropped: candle frees device buffers in their `Drop`, on whatever thread drops them,
    /// and a CUDA free fails (the memory stays taken) on a thread without the GPU's context.
    pub fn prepare_free(&self) {
        #[cfg(feature = "cuda")]
        if let Some(gpu) = &self.memory.gpu {
            gpu.bind_to_thread();
        }
    }

    /// Books the bytes as on their way out: the model is unloaded, and the memory comes back when
    /// the last reader lets go of it. Loads that need room wait for these bytes rather than evict.
    pub fn leave(&self) {
        self.memory.book(|ledger| {
            if !self.leaving.swap(true, Ordering::AcqRel) {
                release(&mut ledger.models, &self.model_id, self.bytes);
                *ledger.leaving.entry(self.model_id.clone()).or_default() += self.bytes;
            }
        });
    }
}

impl Drop for ModelAllocation {
    fn drop(&mut self) {
        let leaving = *self.leaving.get_mut();
        self.memory.book(|ledger| {
            let book = if leaving { &mut ledger.leaving } else { &mut ledger.models };
            release(book, &self.model_id, self.bytes);
        });
        if self.memory.id == DeviceId::Cpu {
            // The owner drops its tensors before this allocation (see pipeline-manager's
            // `Pipeline`), so their memory is free now: hand the heap's share back to the OS.
            host::release_free_memory();
        }
        #[cfg(feature = "cuda")]
        if let Some(gpu) = &self.memory.gpu {
            gpu.release_free_memory();
        }
    }
}

fn release(book: &mut BTreeMap<ModelId, u64>, model_id: &ModelId, bytes: u64) {
    if let Some(held) = book.get_mut(model_id) {
        *held = held.saturating_sub(bytes);
        if *held == 0 {
            book.remove(model_id);
        }
    }
}

#[cfg(test)]
mod tests {
    /// A valid model id.
    fn id(s: &str) -> model_id::ModelId {
        model_id::ModelId::parse(s).expect("a valid id")
    }

    use super::*;

    fn manager(capacity: u64, budget: MemoryBudget) -> ResourceManager {
        ResourceManager::with_cpu_capacity(capacity, budget, DeviceRequest::Cpu).expect("cpu exists")
    }

    /// Device strings parse; malformed ones are InvalidDevice; CUDA is unavailable in this build.
    #[test]
    fn devices_parse_and_resolve() {
        assert_eq!("cpu".parse::<DeviceRequest>(), Ok(DeviceRequest::Cpu));
        assert_eq!("cuda".parse::<DeviceRequest>(), Ok(DeviceRequest::Cuda(None)));
        assert_eq!("cuda:1".parse::<DeviceRequest>(), Ok(DeviceRequest::Cuda(Some(1))));
        for bad in ["", "gpu", "cuda:", "cuda:x", "cuda:-1", "CPU", "cuda:99999"] {
            assert!(matches!(bad.parse::<DeviceRequest>(), Err(ResourceError::InvalidDevice(_))), "{bad}");
        }
        let m = manager(1000, MemoryBudget::Bytes(100));
        assert_eq!(m.resolve(None), Ok(DeviceId::Cpu));
        assert!(matches!(m.resolve(Some(DeviceRequest::Cuda(Some(0)))), Err(ResourceError::DeviceUnavailable { .. })));
    }

    /// "cuda" and "cuda:0" name the same device; "cuda:1" another; spellings never compare.
    #[test]
    fn requests_name_devices_parsed() {
        let id = |s: &str| s.parse::<DeviceRequest>().expect("parses").id();
        assert_eq!(id("cuda"), DeviceId::Cuda(0));
        assert_eq!(id("cuda"), id("cuda:0"));
        assert_eq!(id("cuda:00"), DeviceId::Cuda(0));
        assert_ne!(id("cuda:1"), id("cuda"));
        assert_eq!(id("cpu"), DeviceId::Cpu);
    }

    /// Budgets parse as sizes or percentages.
    #[test]
    fn budgets_parse() {
        assert_eq!("8GiB".parse(), Ok(MemoryBudget::Bytes(8 << 30)));
        assert_eq!("1000".parse(), Ok(MemoryBudget::Bytes(1000)));
        assert_eq!("50%".parse(), Ok(MemoryBudget::Percent(50.0)));
        assert!("0%".parse::<MemoryBudget>().is_err());
        assert!("lots".parse::<MemoryBudget>().is_err());
        assert_eq!(manager(1000, MemoryBudget::Percent(80.0)).usage()[0].budget_bytes, 800);
    }

    /// Reservations count against the budget, are refused past it with the figures, and come back
    /// when dropped; a committed allocation holds its real bytes until dropped.
    #[test]
    fn reservations_are_guards() {
        let m = manager(1000, MemoryBudget::Bytes(100));
        let a = m.reserve(DeviceId::Cpu, &id("a"), 60).expect("fits");
        let err = m.reserve(DeviceId::Cpu, &id("b"), 50).expect_err("over budget");
        assert_eq!(
            err,
            ResourceError::OverBudget {
                device: DeviceId::Cpu,
                model_id: "b".into(),
                needed: 50,
                free: 40,
                budget: 100
            }
        );
        assert!(err.to_string().contains("needs 50 bytes, 40 bytes free"));
        let alloc = a.commit(55);
        let usage = &m.usage()[0];
        assert_eq!((usage.used_bytes, usage.reserved_bytes), (55, 0));
        assert_eq!(usage.models, vec![(id("a"), 55)]);
        let mut b = m.reserve(DeviceId::Cpu, &id("b"), 45).expect("fits now");
        assert_eq!(m.usage()[0].reserved_bytes, 45);
        b.resize(20).expect("shrinking always fits");
        assert_eq!(m.usage()[0].reserved_bytes, 20);
        assert!(matches!(b.resize(46), Err(ResourceError::OverBudget { needed: 46, free: 45, .. })));
        b.resize(45).expect("growing within the budget");
        assert_eq!(m.usage()[0].reserved_bytes, 45);
        drop(b);
        drop(alloc);
        let usage = &m.usage()[0];
        assert_eq!((usage.used_bytes, usage.reserved_bytes), (0, 0));
        assert!(usage.models.is_empty());
    }

    /// A model on its way out still counts (its memory is not back yet) until its allocation
    /// drops; the peak remembers the most ever committed; every change is announced.
    #[test]
    fn leaving_bytes_and_peak() {
        let m = manager(1000, MemoryBudget::Bytes(100));
        let mut changes = m.changes(DeviceId::Cpu).expect("cpu");
        let a = m.reserve(DeviceId::Cpu, &id("a"), 70).expect("fits").commit(60);
        assert!(changes.has_changed().expect("the device lives"));
        changes.borrow_and_update();
        a.leave();
        a.leave();
        assert!(changes.has_changed().expect("the device lives"));
        let usage = m.usage_of(DeviceId::Cpu).expect("cpu");
        assert_eq!((usage.used_bytes, usage.leaving_bytes, usage.free_bytes()), (60, 60, 40));
        assert_eq!(usage.models, vec![(id("a"), 60)]);
        assert!(m.reserve(DeviceId::Cpu, &id("b"), 50).is_err(), "leaving bytes are still held");
        drop(a);
        let b = m.reserve(DeviceId::Cpu, &id("b"), 50).expect("fits once a's memory is back");
        let usage = m.usage_of(DeviceId::Cpu).expect("cpu");
        assert_eq!((usage.used_bytes, usage.leaving_bytes, usage.reserved_bytes, usage.peak_bytes), (0, 0, 50, 70));
        drop(b);
    }

    /// A failed load's reservation turns into leaving bytes in one booking, still held, and is
    /// released when that allocation drops.
    #[test]
    fn a_reservation_can_leave() {
        let m = manager(1000, MemoryBudget::Bytes(100));
        let leaving = m.reserve(DeviceId::Cpu, &id("a"), 70).expect("fits").into_leaving();
        let usage = m.usage_of(DeviceId::Cpu).expect("cpu");
        assert_eq!((usage.reserved_bytes, usage.used_bytes, usage.leaving_bytes, usage.free_bytes()), (0, 70, 70, 30));
        assert!(m.reserve(DeviceId::Cpu, &id("b"), 50).is_err(), "leaving bytes are still held");
        drop(leaving);
        let usage = m.usage_of(DeviceId::Cpu).expect("cpu");
        assert_eq!((usage.reserved_bytes, usage.used_bytes, usage.leaving_bytes), (0, 0, 0));
    }

    /// A set of needs is booked whole or not at all: the device short of room is named and the
    /// others are left untouched; a device named twice needs the sum; the set commits per device.
    #[test]
    fn reserve_all_is_all_or_nothing() {
        let m = ResourceManager::with_test_devices(1000, &[1000, 1000], MemoryBudget::Percent(100.0));
        let (gpu0, gpu1) = (DeviceId::Cuda(0), DeviceId::Cuda(1));
        let reserved = |d| m.usage_of(d).expect("device").reserved_bytes;
        let a = m.reserve_all(&[(gpu1, 600), (gpu0, 600), (DeviceId::Cpu, 10)], &id("a")).expect("fits");
        assert_eq!(a.devices().collect::<Vec<_>>(), [DeviceId::Cpu, gpu0, gpu1]);
        let err = m.reserve_all(&[(gpu1, 300), (gpu0, 500)], &id("b")).expect_err("cuda:0 is short");
        assert_eq!(
            err,
            ResourceError::OverBudget { device: gpu0, model_id: "b".into(), needed: 500, free: 400, budget: 1000 }
        );
        let err = m.reserve_all(&[(gpu0, 300), (gpu1, 500)], &id("b")).expect_err("cuda:1 is short");
        assert!(matches!(err, ResourceError::OverBudget { device, .. } if device == gpu1), "{err}");
        let err = m.reserve_all(&[(DeviceId::Cpu, 5), (DeviceId::Cuda(7), 1)], &id("b")).expect_err("no cuda:7");
        assert!(matches!(err, ResourceError::DeviceUnavailable { .. }), "{err}");
        assert_eq!((reserved(DeviceId::Cpu), reserved(gpu0), reserved(gpu1)), (10, 600, 600), "b booked nothing");
        let twice = m.reserve_all(&[(gpu0, 200), (gpu0, 200)], &id("c")).expect("400 fits on cuda:0");
        assert_eq!((twice.bytes(gpu0), reserved(gpu0)), (400, 1000));
        drop(twice);
        let held = a.commit(|d| if d == DeviceId::Cpu { 8 } else { 500 });
        assert_eq!((held.bytes(DeviceId::Cpu), held.bytes(gpu0), held.bytes(gpu1)), (8, 500, 500));
        assert_eq!((reserved(gpu0), m.usage_of(gpu1).expect("cuda:1").used_bytes), (0, 500));
        held.leave();
        assert_eq!(m.usage_of(gpu0).expect("cuda:0").leaving_bytes, 500);
        drop(held);
        for usage in m.usage() {
            assert_eq!((usage.used_bytes, usage.reserved_bytes), (0, 0), "{}", usage.device);
        }
    }

    /// Two callers that each need more than half of the same two devices, naming them in opposite
    /// orders, take turns: the ledgers' locks are taken in one order whatever the caller's, so
    /// the two never wait for each other's second lock. A hang fails the test after a bound.
    #[test]
    fn opposite_orders_take_turns() {
        const ROUNDS: usize = 2000;
        let m = ResourceManager::with_test_devices(1000, &[1000, 1000], MemoryBudget::Percent(100.0));
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let barrier = Arc::new(std::sync::Barrier::new(2));
        for (name, order) in
            [("a", [DeviceId::Cuda(0), DeviceId::Cuda(1)]), ("b", [DeviceId::Cuda(1), DeviceId::Cuda(0)])]
        {
            let (m, done, barrier) = (m.clone(), done_tx.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                let mut got = 0;
                while got < ROUNDS {
                    match m.reserve_all(&[(order[0], 600), (order[1], 600)], &id(name)) {
                        Ok(both) => {
                            assert_eq!((both.bytes(order[0]), both.bytes(order[1])), (600, 600));
                            got += 1;
                        }
                        Err(ResourceError::OverBudget { .. }) => {}
                        Err(e) => panic!("{e}"),
                    }
                    std::thread::yield_now();
                }
                let _ = done.send(got);
            });
        }
        for _ in 0..2 {
            let got = done_rx.recv_timeout(std::time::Duration::from_secs(60)).expect("both callers finish");
            assert_eq!(got, ROUNDS);
        }
        assert!(m.usage().iter().all(|u| u.reserved_bytes == 0));
    }
}
