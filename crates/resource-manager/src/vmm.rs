//! CUDA VMM allocations another process can import (feature `cuda`): `cuMemCreate` with the
//! POSIX file-descriptor handle type, exported once with `cuMemExportToShareableHandle`, mapped
//! read-write on its GPU for the staged copies; and [`VmmEngine`], the GPU as a [`CopyEngine`]
//! whose groups are regions of one such allocation. The memory returns to the driver when this
//! process and every importer have let go of it.
//!
//! By hand on the driver API: cudarc's safe layer allocates only with `cuMemAlloc`, whose memory
//! cannot be exported.

use std::{
    ffi::c_void,
    mem::MaybeUninit,
    os::fd::{FromRawFd, OwnedFd},
    sync::{Arc, Mutex},
};

use candle_core::{
    DType, Tensor,
    cuda::cudarc::driver::{CudaEvent, result, sys},
};

use crate::{
    gpu::{Gpu, PinnedBuffer},
    staging::{CopyEngine, DeviceError},
    sync,
};

/// Group starts inside an allocation are aligned as `cuMemAlloc` aligns its allocations.
pub const VMM_ALIGN: usize = 256;

/// One exportable allocation, mapped read-write on its GPU.
#[derive(Debug)]
pub struct VmmMemory {
    gpu: Arc<Gpu>,
    handle: sys::CUmemGenericAllocationHandle,
    ptr: sys::CUdeviceptr,
    size: usize,
    fd: OwnedFd,
}

// The handle and the address are plain numbers the driver owns; this value frees them once.
#[allow(unsafe_code)] // the driver's VMM API
unsafe impl Send for VmmMemory {}
#[allow(unsafe_code)] // the driver's VMM API
unsafe impl Sync for VmmMemory {}

/// GPU `ordinal` as the driver's memory calls name a place.
#[allow(unsafe_code)] // a plain C struct, zeroed as the driver's docs ask
pub(crate) fn device_location(ordinal: usize) -> sys::CUmemLocation {
    // SAFETY: an enum whose zero is valid and an integer.
    let mut location: sys::CUmemLocation = unsafe { MaybeUninit::zeroed().assume_init() };
    location.type_ = sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE;
    location.id = ordinal as i32;
    location
}

/// What `cuMemCreate` and the granularity query are asked for: pinned memory on `ordinal`,
/// exportable as a POSIX file descriptor.
#[allow(unsafe_code)] // a plain C struct, zeroed as the driver's docs ask
fn properties(ordinal: usize) -> sys::CUmemAllocationProp {
    // SAFETY: every field of the C struct is an integer, an enum whose zero is valid, or a
    // pointer; zero is the documented default of the ones not set here.
    let mut prop: sys::CUmemAllocationProp = unsafe { MaybeUninit::zeroed().assume_init() };
    prop.type_ = sys::CUmemAllocationType::CU_MEM_ALLOCATION_TYPE_PINNED;
    prop.requestedHandleTypes = sys::CUmemAllocationHandleType::CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR;
    prop.location = device_location(ordinal);
    prop
}

#[allow(unsafe_code)] // the driver's VMM API
impl VmmMemory {
    /// At least `bytes` (rounded up to the GPU's recommended granularity) on `gpu`.
    pub fn new(gpu: Arc<Gpu>, bytes: usize) -> Result<Self, DeviceError> {
        gpu.bind_to_thread();
        let prop = properties(gpu.ordinal);
        let mut granularity = 0usize;
        let recommended = sys::CUmemAllocationGranularity_flags::CU_MEM_ALLOC_GRANULARITY_RECOMMENDED;
        // SAFETY: valid pointers to a local and to the properties above.
        unsafe { sys::cuMemGetAllocationGranularity(&mut granularity, &prop, recommended) }.result()?;
        let size = bytes.max(1).next_multiple_of(granularity.max(1));
        let mut handle: sys::CUmemGenericAllocationHandle = 0;
        // SAFETY: as above; the handle is released by `Drop` (or below, on a later failure).
        unsafe { sys::cuMemCreate(&mut handle, size, &prop, 0) }.result()?;
        let mut partial = Partial { handle, ptr: 0, size, mapped: false };
        let mut fd: i32 = -1;
        let posix = sys::CUmemAllocationHandleType::CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR;
        // SAFETY: the driver writes an int (the new file descriptor) through the pointer.
        unsafe { sys::cuMemExportToShareableHandle((&raw mut fd).cast::<c_void>(), handle, posix, 0) }.result()?;
        // SAFETY: the driver just opened it for this process, which owns it from here on.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: a fresh range of the allocation's size at the granularity, mapped whole.
        unsafe { sys::cuMemAddressReserve(&mut partial.ptr, size, granularity, 0, 0) }.result()?;
        unsafe { sys::cuMemMap(partial.ptr, size, 0, handle, 0) }.result()?;
        partial.mapped = true;
        let access = sys::CUmemAccessDesc {
            location: prop.location,
            flags: sys::CUmemAccess_flags::CU_MEM_ACCESS_FLAGS_PROT_READWRITE,
        };
        // SAFETY: the range was just mapped; one access descriptor.
        unsafe { sys::cuMemSetAccess(partial.ptr, size, &access, 1) }.result()?;
        let ptr = partial.ptr;
        std::mem::forget(partial);
        Ok(Self { gpu, handle, ptr, size, fd })
    }

    pub fn gpu(&self) -> &Arc<Gpu> {
        &self.gpu
    }

    /// The exported handle, for another process to import.
    pub fn fd(&self) -> &OwnedFd {
        &self.fd
    }

    /// Bytes allocated (the granularity's multiple).
    pub fn size(&self) -> usize {
        self.size
    }

    /// Lets `peer` read this allocation (it was mapped for its own GPU only), so that `peer`'s
    /// stream can copy from it device to device. Needs [`Gpu::reach_peer`] to hold for the pair.
    #[allow(unsafe_code)] // the driver's VMM API
    pub fn let_read(&self, peer: &Gpu) -> Result<(), DeviceError> {
        let access = sys::CUmemAccessDesc {
            location: device_location(peer.ordinal),
            flags: sys::CUmemAccess_flags::CU_MEM_ACCESS_FLAGS_PROT_READ,
        };
        self.gpu.bind_to_thread();
        // SAFETY: the range is this value's mapped allocation; one access descriptor.
        unsafe { sys::cuMemSetAccess(self.ptr, self.size, &access, 1) }.result()?;
        Ok(())
    }

    /// Copies `bytes` from the host to `offset`, synchronously.
    pub fn write(&self, offset: usize, bytes: &[u8]) -> Result<(), DeviceError> {
        if offset.checked_add(bytes.len()).is_none_or(|end| end > self.size) {
            return Err(DeviceError::Refused(format!(
                "{} bytes at {offset} past the end of {}",
                bytes.len(),
                self.size
            )));
        }
        self.gpu.bind_to_thread();
        // SAFETY: the range is inside the mapped allocation (checked above); the source is a host
        // slice of that length; the copy is synchronous.
        unsafe { sys::cuMemcpyHtoD_v2(self.ptr + offset as u64, bytes.as_ptr().cast(), bytes.len()) }.result()?;
        Ok(())
    }

    /// Copies `len` bytes at `offset` back to the host (after every copy into them completed).
    pub fn read(&self, offset: usize, len: usize) -> Result<Vec<u8>, DeviceError> {
        if offset.checked_add(len).is_none_or(|end| end > self.size) {
            return Err(DeviceError::Refused(format!("{len} bytes at {offset} past the end of {}", self.size)));
        }
        self.gpu.bind_to_thread();
        let mut bytes = vec![0u8; len];
        // SAFETY: the range is inside the mapped allocation (checked above), the destination is
        // a host buffer of `len` bytes; the copy is synchronous.
        unsafe { sys::cuMemcpyDtoH_v2(bytes.as_mut_ptr().cast(), self.ptr + offset as u64, len) }.result()?;
        Ok(bytes)
    }
}

#[allow(unsafe_code)] // the driver's VMM API
impl Drop for VmmMemory {
    fn drop(&mut self) {
        self.gpu.bind_to_thread();
        let partial = Partial { handle: self.handle, ptr: self.ptr, size: self.size, mapped: true };
        drop(partial);
    }
}

/// An allocation being set up, undone in reverse when dropped.
struct Partial {
    handle: sys::CUmemGenericAllocationHandle,
    ptr: sys::CUdeviceptr,
    size: usize,
    mapped: bool,
}

#[allow(unsafe_code)] // the driver's VMM API
impl Drop for Partial {
    fn drop(&mut self) {
        // SAFETY: each step undoes one that succeeded, once; the driver frees the memory when
        // this process's handle and every importer's are released.
        unsafe {
            if self.mapped
                && let Err(e) = sys::cuMemUnmap(self.ptr, self.size).result()
            {
                tracing::warn!(cause = %e, "unmapping a VMM allocation");
            }
            if self.ptr != 0
                && let Err(e) = sys::cuMemAddressFree(self.ptr, self.size).result()
            {
                tracing::warn!(cause = %e, "freeing a VMM address range");
            }
            if let Err(e) = sys::cuMemRelease(self.handle).result() {
                tracing::warn!(cause = %e, "releasing a VMM allocation");
            }
        }
    }
}

/// A group's place in a [`VmmMemory`].
#[derive(Debug, Clone)]
pub struct VmmRegion {
    pub memory: Arc<VmmMemory>,
    pub offset: usize,
    pub bytes: usize,
}

/// The GPU as a [`CopyEngine`] for one load into one [`VmmMemory`]: each allocation is the next
/// region of it, [`VMM_ALIGN`]-aligned, in the order the groups are allocated.
pub struct VmmEngine {
    memory: Arc<VmmMemory>,
    next: Mutex<usize>,
}

impl VmmEngine {
    pub fn new(memory: Arc<VmmMemory>) -> Self {
        Self { memory, next: Mutex::new(0) }
    }

    pub fn memory(&self) -> &Arc<VmmMemory> {
        &self.memory
    }
}

#[allow(unsafe_code)] // the driver's copy API
impl CopyEngine for VmmEngine {
    type Buffer = PinnedBuffer;
    type Fence = CudaEvent;
    type Allocation = VmmRegion;

    fn allocate(&self, dtype: DType, elems: usize) -> Result<VmmRegion, DeviceError> {
        let bytes = elems * dtype.size_in_bytes();
        let mut next = sync::lock(&self.next);
        let offset = next.next_multiple_of(VMM_ALIGN);
        if offset + bytes > self.memory.size {
            return Err(DeviceError::Refused(format!(
                "{bytes} bytes at {offset} do not fit the load's VMM allocation of {}",
                self.memory.size
            )));
        }
        *next = offset + bytes;
        Ok(VmmRegion { memory: self.memory.clone(), offset, bytes })
    }

    fn copy(&self, from: &PinnedBuffer, len: usize, to: &VmmRegion, offset: usize) -> Result<CudaEvent, DeviceError> {
        let src = from.as_ref().get(..len).ok_or_else(|| DeviceError::Refused("copy longer than its buffer".into()))?;
        if offset.checked_add(len).is_none_or(|end| end > to.bytes) {
            return Err(DeviceError::Refused(format!("copy of {len} bytes at {offset} past the end of {}", to.bytes)));
        }
        let gpu = &self.memory.gpu;
        let stream = gpu.stream()?;
        gpu.bind_to_thread();
        let at = self.memory.ptr + (to.offset + offset) as u64;
        // SAFETY: the destination range is inside the region (checked above), inside the mapped
        // allocation that `to` keeps alive; the source is pinned memory that the staging pool
        // leaves untouched until the returned event completes.
        unsafe { result::memcpy_htod_async(at, src, stream.cu_stream()) }?;
        Ok(stream.record_event(Some(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING))?)
    }

    fn copy_from_peer(
        &self,
        source: &VmmEngine,
        from: &VmmRegion,
        to: &VmmRegion,
        offset: usize,
        len: usize,
    ) -> Result<CudaEvent, DeviceError> {
        let region = |r: &VmmRegion| (r.memory.ptr + r.offset as u64, r.bytes);
        self.memory.gpu.copy_from_peer_at(&source.memory.gpu, region(from), region(to), (offset, len))
    }

    fn wait(&self, fence: CudaEvent) -> Result<(), DeviceError> {
        self.memory.gpu.wait(fence)
    }

    fn is_done(&self, fence: &CudaEvent) -> Result<bool, DeviceError> {
        self.memory.gpu.is_done(fence)
    }

    fn synchronize(&self) -> Result<(), DeviceError> {
        self.memory.gpu.synchronize()
    }

    fn prepare_free(&self) {
        self.memory.gpu.prepare_free();
    }

    fn tensor_of(&self, _: &VmmRegion, _: DType, _: usize) -> Result<Tensor, DeviceError> {
        Err(DeviceError::Refused("a VMM region is viewed in place, not as a candle tensor".into()))
    }
}
