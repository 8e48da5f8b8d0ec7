//! Which placement a load's bytes go to, chosen once per load from its target: host memory for
//! the CPU (when loads are exportable, for attach: the files mapped, or a sealed memfd), pinned staging → CUDA for a
//! GPU (into one exportable CUDA VMM allocation when loads are exportable); over several GPUs,
//! each GPU's own placement for the tensors its device map gives it, or for a replica
//! ([`placement_over_devices`]).

use std::sync::Arc;

use resource_manager::{DeviceId, Layout, ResourceManager, Target};
use weights::{DevicesPlacement, HostPlacement, Placement, SharedHostPlacement, device_map::DeviceMap};

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

/// A load over several devices of `target` through each device's own placement (`one`): split,
/// each tensor where `map` puts it, or a replica on each. What every [`Placements`] does with
/// several devices.
pub fn placement_over_devices(
    target: &Target,
    map: Option<&DeviceMap>,
    one: impl Fn(DeviceId) -> Result<Arc<dyn Placement>, LoadError>,
) -> Result<Arc<dyn Placement>, LoadError> {
    let devices = target.devices().iter().map(|&d| Ok((d, one(d)?))).collect::<Result<Vec<_>, LoadError>>()?;
    let unsupported = |e: weights::Error| LoadError::Unsupported(e.to_string());
    match target.layout() {
        Layout::Replicate => Ok(Arc::new(DevicesPlacement::replicate(devices).map_err(unsupported)?)),
        Layout::Split => {
            let map = map.ok_or_else(|| LoadError::Unsupported(format!("a split load over {target} without a map")))?;
            Ok(Arc::new(DevicesPlacement::split(devices, map).map_err(unsupported)?))
        }
    }
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

#[cfg(feature = "cuda")]
impl DevicePlacements {
    /// Replicas read into the first GPU and copied on device to device, each GPU from the one
    /// before it, where every such pair has a peer path; `None` where one lacks it (the replicas
    /// then fan out through host memory, [`placement_over_devices`]).
    fn peer_replicas(&self, target: &Target) -> Result<Option<Arc<dyn Placement>>, LoadError> {
        let gpus = target.devices().iter().map(|&d| self.resources.gpu_staging(d)).collect::<Result<Vec<_>, _>>()?;
        for pair in gpus.windows(2) {
            let [(before, _), (after, _)] = pair else { continue };
            match after.reach_peer(before) {
                Ok(true) => {}
                Ok(false) => {
                    let (from, to) = (before.ordinal, after.ordinal);
                    tracing::info!(from, to, "no peer path between the GPUs: replicas fan out through host memory");
                    return Ok(None);
                }
                Err(e) => {
                    let device = DeviceId::Cuda(after.ordinal).to_string();
                    let reason = format!("enabling copies from cuda:{}: {e}", before.ordinal);
                    return Err(resource_manager::ResourceError::DeviceUnavailable { device, reason }.into());
                }
            }
        }
        let name = |gpu: &resource_manager::gpu::Gpu| DeviceId::Cuda(gpu.ordinal).to_string();
        let (first, pool) = gpus[0].clone();
        let replicas = gpus[1..].iter().map(|(gpu, _)| (gpu.clone(), name(gpu))).collect();
        Ok(Some(if self.exportable {
            Arc::new(weights::VmmPlacement::new(first.clone(), pool, name(&first)).with_replicas(replicas))
        } else {
            Arc::new(weights::StagedPlacement::new(first.clone(), pool, name(&first)).with_replicas(replicas))
        }))
    }
}

impl Placements for DevicePlacements {
    fn placement(
        &self,
        target: &Target,
        map: Option<&DeviceMap>,
        model: &ModelId,
    ) -> Result<Arc<dyn Placement>, LoadError> {
        #[cfg(feature = "cuda")]
        if target.layout() == Layout::Replicate
            && !target.is_single()
            && let Some(replicas) = self.peer_replicas(target)?
        {
            return Ok(replicas);
        }
        if !target.is_single() {
            return placement_over_devices(target, map, |d| self.placement(&Target::one(d), None, model));
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
            DeviceId::Cuda(_) => Err(resource_manager::ResourceError::DeviceUnavailable {
                device: device.to_string(),
                reason: "this build has no CUDA support".into(),
            }
            .into()),
        }
    }
}
