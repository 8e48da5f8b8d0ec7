//! The CUDA VMM placement (feature `cuda`), for models other processes attach to on a GPU: one
//! exportable VMM allocation per load, holding every group, filled by the same readers and
//! staged copies as the GPU's own placement. Every tensor is a view into it, and its
//! [`Region`] is what an attaching client imports: no copy in the server, none in the client.

use std::{
    borrow::Cow,
    os::fd::{AsFd, BorrowedFd},
    sync::Arc,
};

use candle_core::{DType, Tensor};
use pipeline_manager::{MemoryKind, Region, SharedMemory, TensorData};
use resource_manager::{
    gpu::{Gpu, PinnedPool},
    staging::DeviceError,
    vmm::{VMM_ALIGN, VmmEngine, VmmMemory, VmmRegion},
};

use crate::{
    Error,
    placement::{
        Chunk, Chunking, Destination, Group, Placed, PlacedTensor, Placement, TENSOR_ALIGN, converted_layout,
        converts_to,
    },
    staged::{GroupViews, StagedPlacement, device_elems},
};

/// The load's allocation as memory another process maps.
#[derive(Debug)]
struct Exported(Arc<VmmMemory>);

impl SharedMemory for Exported {
    fn kind(&self) -> MemoryKind {
        MemoryKind::CudaVmm
    }

    fn fd(&self) -> BorrowedFd<'_> {
        self.0.fd().as_fd()
    }

    fn size(&self) -> u64 {
        self.0.size() as u64
    }
}

/// A tensor in a VMM allocation.
#[derive(Debug)]
pub struct VmmView {
    memory: Arc<Exported>,
    at: usize,
    len: usize,
    dtype: DType,
    shape: Vec<usize>,
}

impl TensorData for VmmView {
    fn dtype(&self) -> DType {
        self.dtype
    }

    fn shape(&self) -> &[usize] {
        &self.shape
    }

    fn bytes(&self) -> candle_core::Result<Cow<'_, [u8]>> {
        let bytes = self.memory.0.read(self.at, self.len).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        Ok(Cow::Owned(bytes))
    }

    /// Through the host: candle cannot take the driver's VMM memory as its own.
    fn to_dtype(&self, dtype: DType) -> candle_core::Result<Box<dyn TensorData>> {
        let device = self.memory.0.gpu().device();
        let tensor = Tensor::from_raw_buffer(self.bytes()?.as_ref(), self.dtype, &self.shape, device)?;
        Ok(Box::new(tensor.to_dtype(dtype)?))
    }

    fn region(&self) -> Option<Region<'_>> {
        Some(Region { memory: self.memory.as_ref(), offset: self.at as u64 })
    }
}

/// The engine of one load, and its allocation shared by every view.
struct Engine {
    engine: VmmEngine,
    exported: Arc<Exported>,
}

impl resource_manager::staging::CopyEngine for Engine {
    type Buffer = <VmmEngine as resource_manager::staging::CopyEngine>::Buffer;
    type Fence = <VmmEngine as resource_manager::staging::CopyEngine>::Fence;
    type Allocation = VmmRegion;

    fn allocate(&self, dtype: DType, elems: usize) -> Result<VmmRegion, DeviceError> {
        self.engine.allocate(dtype, elems)
    }

    fn copy(&self, from: &Self::Buffer, len: usize, to: &VmmRegion, offset: usize) -> Result<Self::Fence, DeviceError> {
        self.engine.copy(from, len, to, offset)
    }

    fn copy_from_peer(
        &self,
        source: &Engine,
        from: &VmmRegion,
        to: &VmmRegion,
        offset: usize,
        len: usize,
    ) -> Result<Self::Fence, DeviceError> {
        self.engine.copy_from_peer(&source.engine, from, to, offset, len)
    }

    fn wait(&self, fence: Self::Fence) -> Result<(), DeviceError> {
        self.engine.wait(fence)
    }

    fn is_done(&self, fence: &Self::Fence) -> Result<bool, DeviceError> {
        self.engine.is_done(fence)
    }

    fn synchronize(&self) -> Result<(), DeviceError> {
        self.engine.synchronize()
    }

    fn prepare_free(&self) {
        self.engine.prepare_free();
    }

    fn tensor_of(&self, region: &VmmRegion, dtype: DType, elems: usize) -> Result<Tensor, DeviceError> {
        self.engine.tensor_of(region, dtype, elems)
    }
}

impl GroupViews for Engine {
    fn views(&self, region: &VmmRegion, group: &Group, into: &mut Vec<PlacedTensor>) -> Result<(), DeviceError> {
        for m in &group.members {
            let view = VmmView {
                memory: self.exported.clone(),
                at: region.offset + m.at as usize,
                len: m.len as usize,
                dtype: group.dtype,
                shape: m.shape.clone(),
            };
            into.push(PlacedTensor {
                component: m.component,
                device: 0,
                file: group.file,
                name: m.name.clone(),
                data: Box::new(view),
            });
        }
        Ok(())
    }
}

/// Loads onto a GPU into one exportable VMM allocation per load, through the staging pool; with
/// replicas, into one on each of their GPUs too, filled by peer copies (see [`StagedPlacement`]).
pub struct VmmPlacement {
    gpu: Arc<Gpu>,
    pool: Arc<PinnedPool>,
    device: String,
    /// Each replica's GPU and name, in the order the copies pass from one to the next.
    replicas: Vec<(Arc<Gpu>, String)>,
}

impl VmmPlacement {
    pub fn new(gpu: Arc<Gpu>, pool: Arc<PinnedPool>, device: String) -> Self {
        Self { gpu, pool, device, replicas: Vec::new() }
    }

    /// The same load on `replicas` too; each must reach the GPU before it ([`Gpu::reach_peer`]).
    pub fn with_replicas(mut self, replicas: Vec<(Arc<Gpu>, String)>) -> Self {
        self.replicas = replicas;
        self
    }

    /// The staged placement of one load, into an allocation that holds every group (one per GPU,
    /// each readable by the next GPU for the peer copies).
    fn staged(&self, groups: &[Group]) -> Result<StagedPlacement<Engine>, Error> {
        let bytes = groups
            .iter()
            .fold(0usize, |end, g| end.next_multiple_of(VMM_ALIGN) + device_elems(g) * g.dtype.size_in_bytes());
        let engine = |gpu: &Arc<Gpu>, device: &str| {
            let memory = Arc::new(VmmMemory::new(gpu.clone(), bytes).map_err(|e| Error::place(device, e))?);
            Ok::<_, Error>(Engine { engine: VmmEngine::new(memory.clone()), exported: Arc::new(Exported(memory)) })
        };
        let first = engine(&self.gpu, &self.device)?;
        let mut replicas: Vec<(Arc<Engine>, String)> = Vec::with_capacity(self.replicas.len());
        for (gpu, device) in &self.replicas {
            let before = replicas.last().map_or(&first, |(e, _)| e.as_ref());
            before.engine.memory().let_read(gpu).map_err(|e| Error::place(device, e))?;
            replicas.push((Arc::new(engine(gpu, device)?), device.clone()));
        }
        Ok(StagedPlacement::new(Arc::new(first), self.pool.clone(), self.device.clone()).with_replicas(replicas))
    }
}

impl VmmPlacement {
    /// Step 7 into a new VMM allocation: every tensor, floats converted to `dtype` one at a time
    /// by candle on the GPU, the others copied as they are, so the load's first allocation is
    /// freed whole once its views are replaced. Through the host: candle's tensors cannot be the
    /// driver's VMM memory, so each tensor goes there and back (a slow path, for loads that ask
    /// for another dtype).
    fn convert_into_vmm(
        (gpu, device): (&Arc<Gpu>, &str),
        tensors: &mut [PlacedTensor],
        dtype: DType,
        cancel: &tokio_util::sync::CancellationToken,
    ) -> Result<usize, Error> {
        let place = |e: DeviceError| Error::place(device, e);
        let candle = |e: candle_core::Error| place(DeviceError::from(e));
        let (layout, end) = converted_layout(tensors, dtype, VMM_ALIGN);
        let memory = Arc::new(VmmMemory::new(gpu.clone(), end).map_err(place)?);
        let exported = Arc::new(Exported(memory.clone()));
        let mut converted = 0;
        for (t, at) in tensors.iter_mut().zip(&layout) {
            if cancel.is_cancelled() {
                return Err(Error::Cancelled);
            }
            let bytes = if at.converts {
                converted += 1;
                t.data.to_dtype(dtype).and_then(|c| c.bytes().map(Cow::into_owned)).map_err(candle)?
            } else {
                t.data.bytes().map_err(candle)?.into_owned()
            };
            memory.write(at.start, &bytes).map_err(place)?;
            let shape = t.data.shape().to_vec();
            t.data = Box::new(VmmView { memory: exported.clone(), at: at.start, len: at.len, dtype: at.dtype, shape });
        }
        Ok(converted)
    }
}

impl Placement for VmmPlacement {
    fn max_chunk(&self) -> usize {
        self.pool.buffer_bytes()
    }

    /// Every group's region starts at a multiple of [`VMM_ALIGN`], as large as the tensors need.
    fn tensor_align(&self) -> u64 {
        const { assert!(VMM_ALIGN as u64 >= TENSOR_ALIGN) };
        TENSOR_ALIGN
    }

    fn chunking(&self, total: u64, threads: usize) -> Chunking {
        // As the GPU's own placement: the same pool and link.
        StagedPlacement::new(self.gpu.clone(), self.pool.clone(), self.device.clone()).chunking(total, threads)
    }

    fn place(
        &self,
        groups: &[Group],
        chunks: &[Chunk],
        readers: &(dyn Fn(&dyn Destination) + Sync),
    ) -> Result<Box<dyn Placed>, Error> {
        self.staged(groups)?.place(groups, chunks, readers)
    }

    fn convert(
        &self,
        tensors: &mut Vec<PlacedTensor>,
        dtype: DType,
        cancel: &tokio_util::sync::CancellationToken,
        _device: &str,
    ) -> Result<usize, Error> {
        if !tensors.iter().any(|t| converts_to(t.data.as_ref(), dtype)) {
            return Ok(0);
        }
        // Each replica's tensors into new memory on its own GPU.
        let gpus = std::iter::once((&self.gpu, self.device.as_str()))
            .chain(self.replicas.iter().map(|(gpu, device)| (gpu, device.as_str())));
        let mut converted = 0;
        let mut rest = std::mem::take(tensors);
        for (index, gpu) in gpus.enumerate() {
            let (mut mine, others): (Vec<_>, Vec<_>) = rest.into_iter().partition(|t| t.device == index);
            converted += Self::convert_into_vmm(gpu, &mut mine, dtype, cancel)?;
            tensors.extend(mine);
            rest = others;
        }
        Ok(converted)
    }
}
