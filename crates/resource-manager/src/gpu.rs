//! CUDA devices (feature `cuda`): the GPUs the driver reports, their capacity and free memory,
//! one candle device per GPU, made once at start-up (it holds the GPU's context and stream,
//! which every load on that GPU shares), pinned staging buffers, and the GPU as a
//! [`CopyEngine`]: asynchronous copies from pinned memory on that stream.

use std::sync::Arc;

use candle_core::{
    DType, Device, Shape, Storage, Tensor,
    backend::{BackendDevice, BackendStorage},
    cuda::{
        CudaDType, CudaDevice, CudaStorage,
        cudarc::driver::{CudaContext, CudaEvent, CudaStream, DevicePtr, result, sys},
    },
    op::BackpropOp,
};

use crate::staging::{CopyEngine, DeviceError, StagingPool};

/// Pinned staging buffers shared by every GPU (allocated portable, so any context may copy
/// from them).
pub type PinnedPool = StagingPool<PinnedBuffer, CudaEvent>;

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

    /// Its candle device (conversions of tensors on it).
    pub fn device(&self) -> &Device {
        &self.device
    }

    fn open(ordinal: usize) -> Result<Self, DeviceError> {
        // One real stream that every thread uses. `Device::new_cuda` would use the per-thread
        // default stream, where each reader thread's copies, the allocations and the frees would
        // land on a different stream per thread, unordered with each other, and synchronizing
        // waits only for the calling thread's own work.
        let device = Device::Cuda(CudaDevice::new_with_stream(ordinal)?);
        let context = device.as_cuda_device()?.cuda_stream().context().clone();
        let name = context.name()?;
        let total = context.total_mem()? as u64;
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
            Ok(()) => self.device.synchronize().map_err(DeviceError::from),
            Err(e) => Err(DeviceError::from(e)),
        };
        if let Err(cause) = synced {
            tracing::warn!(ordinal = self.ordinal, %cause, "synchronizing the GPU after a free");
        }
    }

    /// Lets this GPU read `peer`'s memory directly (NVLink or PCIe peer-to-peer), so copies from
    /// it go device to device; `false` where the hardware has no such path. Once per pair is
    /// enough: enabling it again is not an error.
    #[allow(unsafe_code)] // the driver's peer API
    pub fn reach_peer(&self, peer: &Gpu) -> Result<bool, DeviceError> {
        let mut can = 0;
        // SAFETY: the driver writes an int through the pointer; both devices are open.
        unsafe { sys::cuDeviceCanAccessPeer(&mut can, self.context.cu_device(), peer.context.cu_device()) }.result()?;
        if can == 0 {
            return Ok(false);
        }
        self.context.bind_to_thread()?;
        // SAFETY: the current context is this GPU's; the peer's context lives as long as `peer`.
        match unsafe { sys::cuCtxEnablePeerAccess(peer.context.cu_ctx(), 0) } {
            sys::CUresult::CUDA_SUCCESS | sys::CUresult::CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED => {}
            other => other.result()?,
        }
        // candle allocates from the peer's stream-ordered pool, whose memory other GPUs reach only
        // by the pool's own grant (peer access covers `cuMemAlloc`'s): without it the copies
        // would still be right, staged through the host by the driver, but slower.
        let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
        // SAFETY: the driver writes the pool's handle through the pointer.
        if unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, peer.context.cu_device()) }.result().is_ok() {
            let access = sys::CUmemAccessDesc {
                location: crate::vmm::device_location(self.ordinal),
                flags: sys::CUmemAccess_flags::CU_MEM_ACCESS_FLAGS_PROT_READWRITE,
            };
            // SAFETY: the pool is the peer's default one; one access descriptor.
            unsafe { sys::cuMemPoolSetAccess(pool, &access, 1) }.result()?;
        }
        Ok(true)
    }

    /// Queues a copy of `len` bytes at `offset` of `from`, memory of `peer` (its address and
    /// length), to the same offset of `to`, memory of this GPU, on this GPU's stream, and returns
    /// its completion.
    #[allow(unsafe_code)] // the driver's peer copy
    pub(crate) fn copy_from_peer_at(
        &self,
        peer: &Gpu,
        (from, from_bytes): (sys::CUdeviceptr, usize),
        (to, to_bytes): (sys::CUdeviceptr, usize),
        (offset, len): (usize, usize),
    ) -> Result<CudaEvent, DeviceError> {
        if offset.checked_add(len).is_none_or(|end| end > to_bytes.min(from_bytes)) {
            return Err(DeviceError::Refused(format!(
                "peer copy of {len} bytes at {offset} past the end of {from_bytes} or {to_bytes} bytes"
            )));
        }
        let stream = self.stream()?;
        self.context.bind_to_thread()?;
        let at = offset as u64;
        // SAFETY: both ranges are inside their memory (checked above), which the callers keep
        // alive until the returned event completes.
        unsafe {
            let (dst, src) = (self.context.cu_ctx(), peer.context.cu_ctx());
            sys::cuMemcpyPeerAsync(to + at, dst, from + at, src, len, stream.cu_stream())
        }
        .result()?;
        Ok(stream.record_event(Some(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING))?)
    }

    pub(crate) fn stream(&self) -> Result<Arc<CudaStream>, DeviceError> {
        Ok(self.device.as_cuda_device()?.cuda_stream())
    }
}

/// `count` pinned buffers of `bytes` each, allocated through `gpu`'s context. Pinning costs
/// about 1.6 s per GiB (measured on an H100 host), so this happens once, at start-up.
pub fn pinned_pool(gpu: &Gpu, count: usize, bytes: usize) -> Result<PinnedPool, DeviceError> {
    gpu.context.bind_to_thread()?;
    let buffers = (0..count).map(|_| PinnedBuffer::new(bytes)).collect::<Result<Vec<_>, _>>()?;
    Ok(StagingPool::new(buffers, bytes))
}

/// Page-locked host memory from the driver (`cuMemHostAlloc`): the GPU reads it by DMA, so a copy
/// from it returns at once and overlaps the next read.
pub struct PinnedBuffer {
    ptr: *mut u8,
    len: usize,
}

// The buffer is plain memory owned by this value; the driver only reads it during copies, which
// `StagingPool` orders by their fences.
#[allow(unsafe_code)] // the driver's pinned memory and copy API
unsafe impl Send for PinnedBuffer {}

#[allow(unsafe_code)] // the driver's pinned memory and copy API
impl PinnedBuffer {
    fn new(len: usize) -> Result<Self, DeviceError> {
        // Portable: pinned for every context, so one pool serves all GPUs. Not write-combined:
        // the kernel's copy into it from the page cache would be slower.
        // SAFETY: a plain allocation; the pointer is owned by the returned value.
        let ptr = unsafe { result::malloc_host(len, sys::CU_MEMHOSTALLOC_PORTABLE) }
            .map_err(|source| DeviceError::Pinning { bytes: len, source })?;
        Ok(Self { ptr: ptr.cast(), len })
    }
}

#[allow(unsafe_code)]
impl AsRef<[u8]> for PinnedBuffer {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: `ptr` points to `len` bytes owned by this value for its whole life.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

#[allow(unsafe_code)]
impl AsMut<[u8]> for PinnedBuffer {
    fn as_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above, and `&mut self` makes this the only reference.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

#[allow(unsafe_code)]
impl Drop for PinnedBuffer {
    fn drop(&mut self) {
        // The pool lives as long as the process; its buffers' copies completed before it drops.
        // SAFETY: `ptr` came from `malloc_host` and is freed once.
        if let Err(e) = unsafe { result::free_host(self.ptr.cast()) } {
            tracing::warn!(cause = %e, "freeing a pinned buffer");
        }
    }
}

/// Device memory being written by staged copies: the tensor that owns it, and its address.
pub struct DeviceBuffer {
    tensor: Tensor,
    ptr: sys::CUdeviceptr,
    bytes: usize,
}

#[allow(unsafe_code)]
impl CopyEngine for Gpu {
    type Buffer = PinnedBuffer;
    type Fence = CudaEvent;
    type Allocation = DeviceBuffer;

    fn allocate(&self, dtype: DType, elems: usize) -> Result<DeviceBuffer, DeviceError> {
        let cuda = self.device.as_cuda_device()?;
        // SAFETY: the memory is uninitialised until the copies into it complete; views of it are
        // handed out only after `synchronize`.
        let storage = unsafe { cuda.alloc_uninit(&Shape::from(elems), dtype) }?;
        let ptr = device_ptr(&storage, &self.stream()?)?;
        let tensor = Tensor::from_storage(Storage::Cuda(storage), elems, BackpropOp::none(), false);
        Ok(DeviceBuffer { tensor, ptr, bytes: elems * dtype.size_in_bytes() })
    }

    fn copy(
        &self,
        from: &PinnedBuffer,
        len: usize,
        to: &DeviceBuffer,
        offset: usize,
    ) -> Result<CudaEvent, DeviceError> {
        let src = from.as_ref().get(..len).ok_or_else(|| DeviceError::Refused("copy longer than its buffer".into()))?;
        if offset.checked_add(len).is_none_or(|end| end > to.bytes) {
            return Err(DeviceError::Refused(format!(
                "copy of {len} bytes at {offset} past the end of {} bytes",
                to.bytes
            )));
        }
        let stream = self.stream()?;
        self.context.bind_to_thread()?;
        // SAFETY: the destination range is inside the allocation (checked above), which `to`
        // keeps alive; the source is pinned memory that `StagingPool` leaves untouched until the
        // returned event completes.
        unsafe { result::memcpy_htod_async(to.ptr + offset as u64, src, stream.cu_stream()) }?;
        Ok(stream.record_event(Some(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING))?)
    }

    fn copy_from_peer(
        &self,
        source: &Gpu,
        from: &DeviceBuffer,
        to: &DeviceBuffer,
        offset: usize,
        len: usize,
    ) -> Result<CudaEvent, DeviceError> {
        self.copy_from_peer_at(source, (from.ptr, from.bytes), (to.ptr, to.bytes), (offset, len))
    }

    fn wait(&self, fence: CudaEvent) -> Result<(), DeviceError> {
        Ok(fence.synchronize()?)
    }

    fn is_done(&self, fence: &CudaEvent) -> Result<bool, DeviceError> {
        Ok(fence.try_is_complete()?)
    }

    fn synchronize(&self) -> Result<(), DeviceError> {
        Ok(self.stream()?.synchronize()?)
    }

    fn prepare_free(&self) {
        self.bind_to_thread();
    }

    fn tensor_of(&self, allocation: &DeviceBuffer, dtype: DType, elems: usize) -> Result<Tensor, DeviceError> {
        match (allocation.tensor.dtype(), allocation.tensor.elem_count()) {
            (d, n) if d == dtype && n == elems => Ok(allocation.tensor.clone()),
            (d, n) => {
                Err(DeviceError::Refused(format!("allocated {n} elements of {d:?}, asked for {elems} of {dtype:?}")))
            }
        }
    }
}

/// The device address of a CUDA storage of any dtype.
fn device_ptr(storage: &CudaStorage, stream: &Arc<CudaStream>) -> Result<sys::CUdeviceptr, DeviceError> {
    fn of<T: CudaDType>(storage: &CudaStorage, stream: &Arc<CudaStream>) -> Result<sys::CUdeviceptr, DeviceError> {
        Ok(storage.as_cuda_slice::<T>()?.device_ptr(stream).0)
    }
    match storage.dtype() {
        DType::U8 => of::<u8>(storage, stream),
        DType::U32 => of::<u32>(storage, stream),
        DType::I16 => of::<i16>(storage, stream),
        DType::I32 => of::<i32>(storage, stream),
        DType::I64 => of::<i64>(storage, stream),
        DType::F16 => of::<half::f16>(storage, stream),
        DType::BF16 => of::<half::bf16>(storage, stream),
        DType::F32 => of::<f32>(storage, stream),
        DType::F64 => of::<f64>(storage, stream),
        DType::F8E4M3 => of::<float8::F8E4M3>(storage, stream),
        other => Err(DeviceError::Refused(format!("no staged copies of {other:?}"))),
    }
}
