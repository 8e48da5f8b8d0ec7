//! CUDA devices (feature `cuda`): the GPUs the driver reports, their capacity and free memory,
//! and one candle device per GPU, made once at start-up (it holds the GPU's context and stream,
//! which every load on that GPU shares).

use std::sync::Arc;

use candle_core::{Device, cuda::cudarc::driver::CudaContext};

/// One GPU.
#[derive(Debug)]
pub struct Gpu {
    pub ordinal: usize,
    pub name: String,
    /// Its memory, as the driver reports it.
    pub total: u64,
    device: Device,
    context: Arc<CudaContext>,
}

impl Gpu {
    /// Every GPU the driver reports; none on a machine without a driver or a GPU (the CUDA build
    /// then serves the CPU only, and says why in the log).
    pub fn all() -> Vec<Gpu> {
        let count = match CudaContext::device_count() {
            Ok(n) => usize::try_from(n).unwrap_or(0),
            Err(e) => {
                tracing::warn!(cause = %e, "no CUDA driver: serving the CPU only");
                return Vec::new();
            }
        };
        (0..count)
            .filter_map(|ordinal| match Self::open(ordinal) {
                Ok(gpu) => Some(gpu),
                Err(reason) => {
                    tracing::warn!(ordinal, %reason, "a CUDA device cannot be used");
                    None
                }
            })
            .collect()
    }

    fn open(ordinal: usize) -> Result<Self, String> {
        let device = Device::new_cuda(ordinal).map_err(|e| e.to_string())?;
        let context = device.as_cuda_device().map_err(|e| e.to_string())?.cuda_stream().context().clone();
        let name = context.name().map_err(|e| e.to_string())?;
        let total = context.total_mem().map_err(|e| e.to_string())? as u64;
        Ok(Self { ordinal, name, total, device, context })
    }

    /// Free memory on the GPU as the driver reports it now (all processes' allocations counted).
    pub fn free(&self) -> u64 {
        self.context.mem_get_info().map_or(0, |(free, _)| free as u64)
    }

    /// Makes the GPU's context current on this thread (frees and copies need it).
    pub fn bind_to_thread(&self) {
        if let Err(e) = self.context.bind_to_thread() {
            tracing::warn!(ordinal = self.ordinal, cause = %e, "binding the GPU's context to this thread");
        }
    }

    /// Lets the frees queued on the GPU's stream happen: candle frees device memory
    /// asynchronously into the driver's memory pool, whose default release threshold (0) hands
    /// it back to the driver at the next synchronisation.
    pub fn release_free_memory(&self) {
        // Unloads run on any thread: bind the GPU's context to this one first.
        let synced = match self.context.bind_to_thread() {
            Ok(()) => self.device.synchronize().map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        if let Err(cause) = synced {
            tracing::warn!(ordinal = self.ordinal, %cause, "synchronizing the GPU after a free");
        }
    }

    /// The candle device to place tensors with.
    pub fn device(&self) -> &Device {
        &self.device
    }
}
