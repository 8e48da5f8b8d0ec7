//! Devices as requests name them and as this process knows them, and budgets as flags give them.

use std::{fmt, str::FromStr};

use crate::{DEFAULT_BUDGET_PERCENT, ResourceError};

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
        // Only the start of a long value is echoed: errors travel in grpc-message, a header that
        // default clients cap at a few KB (a 16 KB value failed the whole response).
        let invalid = || ResourceError::InvalidDevice(s.chars().take(40).collect());
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

impl DeviceRequest {
    /// The device it names: "cuda" is the first GPU. Whether this build and machine have it is
    /// `ResourceManager::resolve`'s to say; comparing a request with a resident model's device
    /// goes through here, never through their spellings.
    pub fn id(self) -> DeviceId {
        match self {
            Self::Cpu => DeviceId::Cpu,
            Self::Cuda(n) => DeviceId::Cuda(n.unwrap_or(0)),
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

/// Why a budget was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidBudget(String);

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
    type Err = InvalidBudget;

    /// `8GiB`, `500MB`, `1073741824` or `75%`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if let Some(p) = s.strip_suffix('%') {
            let p: f64 = p.trim().parse().map_err(|_| InvalidBudget(format!("not a percentage: {s}")))?;
            if !(p > 0.0 && p <= 100.0) {
                return Err(InvalidBudget(format!("a percentage budget must be in (0, 100]: {s}")));
            }
            return Ok(Self::Percent(p));
        }
        let bytes: bytesize::ByteSize = s.parse().map_err(|e| InvalidBudget(format!("not a size: {s}: {e}")))?;
        Ok(Self::Bytes(bytes.as_u64()))
    }
}

impl MemoryBudget {
    pub(crate) fn of(self, capacity: u64) -> u64 {
        match self {
            Self::Bytes(b) => b,
            // Rounding down a share of a byte count: f64 has ample precision for a budget.
            Self::Percent(p) => ((capacity as f64) * p / 100.0) as u64,
        }
    }
}
