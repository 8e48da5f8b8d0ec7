//! Which placement a load's bytes go to, chosen once per load from its target: host memory for
//! the CPU (when loads are exportable, for attach: the files mapped, or a sealed memfd), pinned staging → CUDA for a
//! GPU (into one exportable CUDA VMM allocation when loads are exportable).

use std::sync::Arc;

use resource_manager::{DeviceId, ResourceError, ResourceManager, Target};
use weights::{HostPlacement, Placement, SharedHostPlacement};

use crate::{LoadError, ModelId};

/// Chooses where a load's bytes land.
pub trait Placements: Send + Sync {
    /// The placement of a load of `model` onto the devices of `target`.
    fn placement(&self, target: &Target, model: &ModelId) -> Result<Arc<dyn Placement>, LoadError>;
}

/// The devices' own placements.
#[derive(Debug, Clone)]
pub struct DevicePlacements {
    // Only a GPU's placement needs the devices (its engine and the staging pool).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    resources: ResourceManager,
    /// In memory other processes can attach to.
    exportable: bool,
}

impl DevicePlacements {
    pub fn new(resources: ResourceManager, exportable: bool) -> Self {
        Self { resources, exportable }
    }
}

impl Placements for DevicePlacements {
    fn placement(&self, target: &Target, model: &ModelId) -> Result<Arc<dyn Placement>, LoadError> {
        if !target.is_single() {
            return Err(ResourceError::DeviceUnavailable {
                device: target.to_string(),
                reason: "loads onto several devices are not supported yet".into(),
            }
            .into());
        }
        let device = target.first();
        match device {
            DeviceId::Cpu if self.exportable => Ok(Arc::new(SharedHostPlacement::new(format!("model-loader:{model}")))),
            DeviceId::Cpu => Ok(Arc::new(HostPlacement)),
            #[cfg(feature = "cuda")]
            DeviceId::Cuda(_) if self.exportable => {
                let (gpu, pool) = self.resources.gpu_staging(device)?;
                Ok(Arc::new(weights::VmmPlacement::new(gpu, pool, device.to_string())))
            }
            #[cfg(feature = "cuda")]
            DeviceId::Cuda(_) => {
                let (gpu, pool) = self.resources.gpu_staging(device)?;
                Ok(Arc::new(weights::StagedPlacement::new(gpu, pool, device.to_string())))
            }
            // `resolve` refuses CUDA devices in this build; a load never gets here with one.
            #[cfg(not(feature = "cuda"))]
            DeviceId::Cuda(_) => Err(ResourceError::DeviceUnavailable {
                device: device.to_string(),
                reason: "this build has no CUDA support".into(),
            }
            .into()),
        }
    }
}
