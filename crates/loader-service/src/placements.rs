//! Which placement a load's bytes go to, chosen once per load from its target: host memory for
//! the CPU (when loads are exportable, for attach: the files mapped, or a sealed memfd), pinned staging → CUDA for a
//! GPU (into one exportable CUDA VMM allocation when loads are exportable); over several GPUs,
//! each GPU's own placement for the tensors its device map gives it ([`split_placement`]).

use std::sync::Arc;

use resource_manager::{DeviceId, Layout, ResourceError, ResourceManager, Target};
use weights::{HostPlacement, Placement, SharedHostPlacement, SplitPlacement, device_map::DeviceMap};

use crate::{LoadError, ModelId};

/// Chooses where a load's bytes land.
pub trait Placements: Send + Sync {
    /// The placement of a load of `model` onto the devices of `target`; `map` says which device
    /// each tensor goes to when there are several.
    fn placement(
        &self,
        target: &Target,
        map: Option<&DeviceMap>,
        model: &ModelId,
    ) -> Result<Arc<dyn Placement>, LoadError>;
}

/// A load over several devices of `target`, each tensor where `map` puts it, through each device's
/// own placement (`one`): what every [`Placements`] does with several devices.
pub fn split_placement(
    target: &Target,
    map: Option<&DeviceMap>,
    one: impl Fn(DeviceId) -> Result<Arc<dyn Placement>, LoadError>,
) -> Result<Arc<dyn Placement>, LoadError> {
    if target.layout() == Layout::Replicate {
        return Err(replicas_unsupported(target));
    }
    let map = map.ok_or_else(|| LoadError::Unsupported(format!("a load over {target} without a device map")))?;
    let devices = target.devices().iter().map(|&d| Ok((d, one(d)?))).collect::<Result<Vec<_>, LoadError>>()?;
    let split = SplitPlacement::new(devices, map).map_err(|e| LoadError::Unsupported(e.to_string()))?;
    Ok(Arc::new(split))
}

/// What a replicated load over several devices is answered, until replicas are built.
pub(crate) fn replicas_unsupported(target: &Target) -> LoadError {
    LoadError::Unsupported(format!(
        "placement replicate (a whole copy on each of {target}) is not built yet; placement split loads one \
         model over several GPUs"
    ))
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
    fn placement(
        &self,
        target: &Target,
        map: Option<&DeviceMap>,
        model: &ModelId,
    ) -> Result<Arc<dyn Placement>, LoadError> {
        if !target.is_single() {
            return split_placement(target, map, |d| self.placement(&Target::one(d), None, model));
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
