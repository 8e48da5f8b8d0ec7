//! Devices and their memory: which devices this build and machine have, each device's capacity
//! and budget, reservations for loads in flight, and the bytes each loaded model holds.
//!
//! Reservations ([`Reservation`]) and allocations ([`ModelAllocation`]) are guards: dropping one
//! gives its bytes back to the budget, so an early return, a cancelled load or an unload cannot
//! leak accounting. This crate never reads model files and never decides what to load.

use std::{
    collections::BTreeMap,
    fmt,
    str::FromStr,
    sync::{Arc, Mutex, MutexGuard},
};

/// The share of a device's capacity models may hold when no budget is configured.
pub const DEFAULT_BUDGET_PERCENT: f64 = 80.0;

/// A device as a client asks for it ("cpu", "cuda", "cuda:1"), not yet checked against the build.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeviceRequest {
    Cpu,
    /// `None` is "cuda": the first GPU.
    Cuda(Option<usize>),
}

impl FromStr for DeviceRequest {
    type Err = ResourceError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let invalid = || ResourceError::InvalidDevice(s.to_owned());
        match s {
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(None)),
            _ => {
                let ordinal = s.strip_prefix("cuda:").ok_or_else(invalid)?;
                if ordinal.is_empty() || !ordinal.bytes().all(|b| b.is_ascii_digit()) || ordinal.len() > 3 {
                    return Err(invalid());
                }
                Ok(Self::Cuda(Some(ordinal.parse().map_err(|_| invalid())?)))
            }
        }
    }
}

/// A device this process can place tensors on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DeviceId {
    Cpu,
    Cuda(usize),
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// How much of a device models may hold.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum MemoryBudget {
    Bytes(u64),
    /// A share of the device's capacity, 0..=100.
    Percent(f64),
}

impl Default for MemoryBudget {
    fn default() -> Self {
        Self::Percent(DEFAULT_BUDGET_PERCENT)
    }
}

impl FromStr for MemoryBudget {
    type Err = String;

    /// `8GiB`, `500MB`, `1073741824` or `75%`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if let Some(p) = s.strip_suffix('%') {
            let p: f64 = p.trim().parse().map_err(|_| format!("not a percentage: {s}"))?;
            if !(p > 0.0 && p <= 100.0) {
                return Err(format!("a percentage budget must be in (0, 100]: {s}"));
            }
            return Ok(Self::Percent(p));
        }
        let bytes: bytesize::ByteSize = s.parse().map_err(|e| format!("not a size: {s}: {e}"))?;
        Ok(Self::Bytes(bytes.as_u64()))
    }
}

impl MemoryBudget {
    fn of(self, capacity: u64) -> u64 {
        match self {
            Self::Bytes(b) => b,
            // Rounding down a share of a byte count: f64 has ample precision for a budget.
            Self::Percent(p) => ((capacity as f64) * p / 100.0) as u64,
        }
    }
}

/// What went wrong with a device or its memory.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResourceError {
    #[error("invalid device {0:?}: expected \"cpu\", \"cuda\" or \"cuda:N\"")]
    InvalidDevice(String),
    #[error("device {device} is not available: {reason}")]
    DeviceUnavailable { device: String, reason: String },
    #[error(
        "not enough memory on {device} for {model_id}: needs {needed} bytes, {free} bytes free of a budget of {budget} bytes"
    )]
    OverBudget { device: DeviceId, model_id: String, needed: u64, free: u64, budget: u64 },
}

/// Memory figures of one device, for GetResources.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceUsage {
    pub device: DeviceId,
    pub total_bytes: u64,
    pub budget_bytes: u64,
    pub used_bytes: u64,
    pub reserved_bytes: u64,
    /// Bytes held per loaded model, sorted by model id.
    pub models: Vec<(String, u64)>,
}

#[derive(Debug, Default)]
struct Ledger {
    /// Bytes reserved by loads in flight, per model.
    reserved: BTreeMap<String, u64>,
    /// Bytes held by loaded models.
    models: BTreeMap<String, u64>,
}

impl Ledger {
    fn committed(&self) -> u64 {
        self.reserved.values().sum::<u64>() + self.models.values().sum::<u64>()
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
}

impl DeviceMemory {
    fn ledger(&self) -> MutexGuard<'_, Ledger> {
        // A panic while holding this lock cannot leave the ledger half-updated (each update is one
        // map operation), so a poisoned lock is still consistent.
        self.ledger.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The devices of this process and their memory.
#[derive(Debug, Clone)]
pub struct ResourceManager {
    devices: Arc<Vec<Arc<DeviceMemory>>>,
    default_device: DeviceId,
}

impl ResourceManager {
    /// The CPU with its capacity read from the machine and the given budget.
    pub fn new(budget: MemoryBudget, default_device: DeviceRequest) -> Result<Self, ResourceError> {
        Self::with_cpu_capacity(cpu_capacity(), budget, default_device)
    }

    /// As [`ResourceManager::new`] with a given CPU capacity (tests, and machines that know better).
    pub fn with_cpu_capacity(
        capacity: u64,
        budget: MemoryBudget,
        default_device: DeviceRequest,
    ) -> Result<Self, ResourceError> {
        let cpu = DeviceMemory {
            id: DeviceId::Cpu,
            capacity,
            budget: budget.of(capacity),
            ledger: Mutex::new(Ledger::default()),
        };
        let mut this = Self { devices: Arc::new(vec![Arc::new(cpu)]), default_device: DeviceId::Cpu };
        this.default_device = this.resolve(Some(default_device))?;
        Ok(this)
    }

    /// The device a request names (or the server's default), if this build and machine have it.
    pub fn resolve(&self, request: Option<DeviceRequest>) -> Result<DeviceId, ResourceError> {
        match request {
            None => Ok(self.default_device),
            Some(DeviceRequest::Cpu) => Ok(DeviceId::Cpu),
            Some(DeviceRequest::Cuda(n)) => Err(ResourceError::DeviceUnavailable {
                device: format!("cuda:{}", n.unwrap_or(0)),
                reason: "this build has no CUDA support (built without the `cuda` feature)".into(),
            }),
        }
    }

    /// The candle device for a resolved device.
    pub fn candle_device(&self, device: DeviceId) -> Result<candle_core::Device, ResourceError> {
        match device {
            DeviceId::Cpu => Ok(candle_core::Device::Cpu),
            DeviceId::Cuda(n) => Err(ResourceError::DeviceUnavailable {
                device: device.to_string(),
                reason: format!("no CUDA device {n} in this build"),
            }),
        }
    }

    fn memory(&self, device: DeviceId) -> Result<&Arc<DeviceMemory>, ResourceError> {
        self.devices.iter().find(|d| d.id == device).ok_or_else(|| ResourceError::DeviceUnavailable {
            device: device.to_string(),
            reason: "not managed by this server".into(),
        })
    }

    /// Reserves `bytes` on `device` for a load of `model_id`, or says how far over budget it is.
    pub fn reserve(&self, device: DeviceId, model_id: &str, bytes: u64) -> Result<Reservation, ResourceError> {
        let memory = self.memory(device)?;
        let mut ledger = memory.ledger();
        let free = memory.budget.saturating_sub(ledger.committed());
        if bytes > free {
            return Err(ResourceError::OverBudget {
                device,
                model_id: model_id.to_owned(),
                needed: bytes,
                free,
                budget: memory.budget,
            });
        }
        *ledger.reserved.entry(model_id.to_owned()).or_default() += bytes;
        drop(ledger);
        Ok(Reservation { memory: memory.clone(), model_id: model_id.to_owned(), bytes })
    }

    /// Memory figures of every device.
    pub fn usage(&self) -> Vec<DeviceUsage> {
        self.devices
            .iter()
            .map(|d| {
                let ledger = d.ledger();
                DeviceUsage {
                    device: d.id,
                    total_bytes: d.capacity,
                    budget_bytes: d.budget,
                    used_bytes: ledger.models.values().sum(),
                    reserved_bytes: ledger.reserved.values().sum(),
                    models: ledger.models.iter().map(|(k, v)| (k.clone(), *v)).collect(),
                }
            })
            .collect()
    }
}

/// Bytes set aside for a load in flight; given back when dropped, or turned into the model's
/// [`ModelAllocation`] when the load finishes.
#[derive(Debug)]
pub struct Reservation {
    memory: Arc<DeviceMemory>,
    model_id: String,
    bytes: u64,
}

impl Reservation {
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    pub fn device(&self) -> DeviceId {
        self.memory.id
    }

    /// Changes the reserved bytes to `bytes` (an estimate replaced by the exact figure): shrinking
    /// always succeeds, growing only within the budget.
    pub fn resize(&mut self, bytes: u64) -> Result<(), ResourceError> {
        let mut ledger = self.memory.ledger();
        if bytes > self.bytes {
            let free = self.memory.budget.saturating_sub(ledger.committed());
            let more = bytes - self.bytes;
            if more > free {
                return Err(ResourceError::OverBudget {
                    device: self.memory.id,
                    model_id: self.model_id.clone(),
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
        let mut ledger = self.memory.ledger();
        release(&mut ledger.reserved, &self.model_id, self.bytes);
        *ledger.models.entry(self.model_id.clone()).or_default() += actual_bytes;
        drop(ledger);
        // Moved above, in the same critical section: the reservation's Drop now releases nothing.
        self.bytes = 0;
        ModelAllocation { memory: self.memory.clone(), model_id: self.model_id.clone(), bytes: actual_bytes }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        release(&mut self.memory.ledger().reserved, &self.model_id, self.bytes);
    }
}

/// The bytes a loaded model holds on its device; given back when dropped (on unload).
#[derive(Debug)]
pub struct ModelAllocation {
    memory: Arc<DeviceMemory>,
    model_id: String,
    bytes: u64,
}

impl ModelAllocation {
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    pub fn device(&self) -> DeviceId {
        self.memory.id
    }
}

impl Drop for ModelAllocation {
    fn drop(&mut self) {
        release(&mut self.memory.ledger().models, &self.model_id, self.bytes);
    }
}

fn release(book: &mut BTreeMap<String, u64>, model_id: &str, bytes: u64) {
    if let Some(held) = book.get_mut(model_id) {
        *held = held.saturating_sub(bytes);
        if *held == 0 {
            book.remove(model_id);
        }
    }
}

/// Memory the machine can give this process: `MemAvailable` from /proc/meminfo, else `MemTotal`.
fn cpu_capacity() -> u64 {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let field = |name: &str| {
        meminfo.lines().find_map(|l| {
            let rest = l.strip_prefix(name)?.strip_prefix(':')?;
            let kib: u64 = rest.trim().trim_end_matches("kB").trim().parse().ok()?;
            Some(kib * 1024)
        })
    };
    field("MemAvailable").or_else(|| field("MemTotal")).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
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
        let a = m.reserve(DeviceId::Cpu, "a", 60).expect("fits");
        let err = m.reserve(DeviceId::Cpu, "b", 50).expect_err("over budget");
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
        assert_eq!(usage.models, vec![("a".to_owned(), 55)]);
        let mut b = m.reserve(DeviceId::Cpu, "b", 45).expect("fits now");
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
}
