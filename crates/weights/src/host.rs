//! The host-memory placement: one allocation per group, filled by the readers in place, every
//! tensor a view into its group. Nothing is copied after the read.

use std::{
    borrow::Cow,
    sync::{Arc, Mutex, OnceLock},
    time::Duration,
};

use candle_core::{DType, Device, Tensor};
use pipeline_manager::{Region, SharedMemory, TensorData};
use resource_manager::sync;

use crate::{
    Error,
    placement::{Chunk, Chunking, Destination, Group, Placed, PlacedTensor, Placement},
};

/// Bytes read between two cancellation checks and progress updates: one `pread` each. Small enough
/// that a cancel waits about a millisecond for the chunks in flight, large enough that the extra
/// calls cost nothing measurable (docs/benchmarks/design-choices.md).
pub const CHUNK_BYTES: usize = 2 * 1024 * 1024;

/// Host memory of one group, 8-byte aligned (every dtype's elements are). Zeroed by the
/// allocator: a group large enough to be its own mapping gets the kernel's zero pages, which the
/// reads write once (no zeroing pass); a small one is cleared on the heap, which costs little.
#[derive(Debug)]
pub struct HostBuffer {
    words: Vec<u64>,
    len: usize,
}

impl HostBuffer {
    pub fn zeroed(len: usize) -> Self {
        Self { words: vec![0; len.div_ceil(8)], len }
    }

    pub fn bytes_mut(&mut self) -> &mut [u8] {
        &mut bytemuck::cast_slice_mut(&mut self.words)[..self.len]
    }
}

/// Host memory that tensor views point into: a heap buffer, or a mapping other processes can
/// share ([`crate::memfd`], [`crate::mapped`]).
pub trait HostMemory: Send + Sync + std::fmt::Debug {
    /// Its length in bytes.
    fn size(&self) -> usize;
    /// The `len` bytes at `at` (within [`HostMemory::size`]): borrowed from memory nobody else
    /// can change, or read through a file's descriptor where touching a mapping's pages could
    /// fault (a file truncated under it).
    fn read(&self, at: usize, len: usize) -> std::io::Result<Cow<'_, [u8]>>;
    /// The memory as another process maps it, where it can.
    fn shared(&self) -> Option<&dyn SharedMemory> {
        None
    }
}

impl HostBuffer {
    pub fn bytes(&self) -> &[u8] {
        &bytemuck::cast_slice(&self.words)[..self.len]
    }
}

impl HostMemory for HostBuffer {
    fn size(&self) -> usize {
        self.len
    }

    fn read(&self, at: usize, len: usize) -> std::io::Result<Cow<'_, [u8]>> {
        Ok(Cow::Borrowed(&self.bytes()[at..at + len]))
    }
}

/// A tensor in host memory: a view of part of a buffer that it shares with the other tensors of
/// its group.
#[derive(Debug, Clone)]
pub struct HostView {
    buffer: Arc<dyn HostMemory>,
    at: usize,
    len: usize,
    dtype: DType,
    shape: Vec<usize>,
}

impl HostView {
    /// The `len` bytes at `at` of `buffer` as a tensor of `dtype` and `shape`; `None` if they do
    /// not fit the buffer or the shape.
    pub fn new(buffer: Arc<dyn HostMemory>, at: usize, len: usize, dtype: DType, shape: Vec<usize>) -> Option<Self> {
        let fits = at.checked_add(len).is_some_and(|end| end <= buffer.size());
        let sized = shape.iter().product::<usize>() * dtype.size_in_bytes() == len;
        (fits && sized).then_some(Self { buffer, at, len, dtype, shape })
    }
}

impl TensorData for HostView {
    fn dtype(&self) -> DType {
        self.dtype
    }

    fn shape(&self) -> &[usize] {
        &self.shape
    }

    fn bytes(&self) -> candle_core::Result<Cow<'_, [u8]>> {
        self.buffer.read(self.at, self.len).map_err(candle_core::Error::wrap)
    }

    fn to_dtype(&self, dtype: DType) -> candle_core::Result<Box<dyn TensorData>> {
        // candle's conversions (the rounding every caller of the server expects), into a tensor of
        // its own; the group is freed once none of its views is left.
        let tensor = Tensor::from_raw_buffer(self.bytes()?.as_ref(), self.dtype, &self.shape, &Device::Cpu)?;
        Ok(Box::new(tensor.to_dtype(dtype)?))
    }

    fn region(&self) -> Option<Region<'_>> {
        self.buffer.shared().map(|memory| Region { memory, offset: self.at as u64 })
    }
}

/// Loads into host memory.
#[derive(Debug, Default, Clone, Copy)]
pub struct HostPlacement;

impl Placement for HostPlacement {
    fn chunking(&self, _total: u64, _threads: usize) -> Chunking {
        Chunking { chunk: CHUNK_BYTES, edge_chunk: CHUNK_BYTES, edge: 0 }
    }

    /// A group that is one chunk is allocated by the reader that fills it; larger groups (their
    /// own mappings: the kernel's zero pages, nothing to clear) are allocated here and cut into
    /// their chunks' pieces. Clearing thousands of small buffers and faulting their pages in on
    /// one thread, ahead of the reads, made a checkpoint of 5,000 small tensors load 5× slower
    /// on 16 cores than faulting them in on the readers (docs/benchmarks/design-choices.md).
    fn place(
        &self,
        groups: &[Group],
        chunks: &[Chunk],
        readers: &(dyn Fn(&dyn Destination) + Sync),
    ) -> Result<Box<dyn Placed>, Error> {
        let mut per_group = vec![0usize; groups.len()];
        for chunk in chunks {
            *per_group
                .get_mut(chunk.group)
                .ok_or_else(|| Error::Internal(format!("chunk {chunk:?} of no group")))? += 1;
        }
        let by_reader = |g: usize| per_group[g] == 1;
        let mut buffers: Vec<Option<HostBuffer>> = groups
            .iter()
            .enumerate()
            .map(|(g, group)| (!by_reader(g)).then(|| HostBuffer::zeroed(group.len as usize)))
            .collect();
        let filled: Vec<OnceLock<HostBuffer>> = groups.iter().map(|_| OnceLock::new()).collect();
        let pieces = split(buffers.iter_mut().map(|b| b.as_mut().map(HostBuffer::bytes_mut)).collect(), chunks)?;
        readers(&HostDestination { chunks, pieces, filled: &filled });
        let mut tensors = Vec::with_capacity(groups.iter().map(|g| g.members.len()).sum());
        let mut unfilled = 0;
        for ((group, buffer), filled) in groups.iter().zip(buffers).zip(filled) {
            let Some(buffer) = buffer.or_else(|| filled.into_inner()) else {
                unfilled += 1;
                continue;
            };
            let buffer: Arc<dyn HostMemory> = Arc::new(buffer);
            for m in &group.members {
                let view = HostView::new(buffer.clone(), m.at as usize, m.len as usize, group.dtype, m.shape.clone())
                    .ok_or_else(|| {
                    Error::Internal(format!("tensor {}: its shape does not fit its bytes", m.name))
                })?;
                tensors.push(PlacedTensor {
                    component: m.component,
                    device: 0,
                    file: group.file,
                    name: m.name.clone(),
                    data: Box::new(view),
                });
            }
        }
        Ok(Box::new(HostPlaced { tensors, unfilled }))
    }
}

/// Cuts the groups' memory allocated ahead into their chunks' disjoint pieces (the chunks of a
/// group come in order and cover it), so each reader thread writes its own piece and no two ever
/// share one. A chunk of a group without memory gets `None`: its reader allocates it.
pub(crate) fn split<'b>(groups: Vec<Option<&'b mut [u8]>>, chunks: &[Chunk]) -> Result<Vec<Piece<'b>>, Error> {
    let mut rests: Vec<(u64, Option<&mut [u8]>)> = groups.into_iter().map(|g| (0, g)).collect();
    let mut pieces = Vec::with_capacity(chunks.len());
    for chunk in chunks {
        let out_of_order = || Error::Internal(format!("chunk {chunk:?} does not follow the last one of its group"));
        let (at, rest) = rests.get_mut(chunk.group).ok_or_else(out_of_order)?;
        let Some(rest) = rest else {
            pieces.push(Mutex::new(None));
            continue;
        };
        if *at != chunk.offset || chunk.len > rest.len() {
            return Err(out_of_order());
        }
        let (piece, tail) = std::mem::take(rest).split_at_mut(chunk.len);
        (*at, *rest) = (*at + chunk.len as u64, tail);
        pieces.push(Mutex::new(Some(piece)));
    }
    Ok(pieces)
}

/// The memory of one chunk: a piece of a buffer allocated ahead, or `None` for a group of one
/// chunk, which its reader allocates.
pub(crate) type Piece<'b> = Mutex<Option<&'b mut [u8]>>;

/// Lends each reader its chunk's piece, or allocates the buffer of a group of one chunk.
pub(crate) struct HostDestination<'a, 'b> {
    pub chunks: &'a [Chunk],
    pub pieces: Vec<Piece<'b>>,
    /// The buffers of the groups of one chunk, once their reader filled them.
    pub filled: &'a [OnceLock<HostBuffer>],
}

impl Destination for HostDestination<'_, '_> {
    fn fill(
        &self,
        index: usize,
        stop: &dyn Fn() -> bool,
        fill: &mut dyn FnMut(&mut [u8]) -> Result<(), Error>,
    ) -> Result<bool, Error> {
        if stop() {
            return Ok(false);
        }
        let twice = || Error::Internal(format!("chunk {index} was filled already or never planned"));
        let (chunk, piece) = self.chunks.get(index).zip(self.pieces.get(index)).ok_or_else(twice)?;
        if let Some(bytes) = sync::lock(piece).take() {
            return fill(bytes).map(|()| true);
        }
        let mut buffer = HostBuffer::zeroed(chunk.len);
        fill(buffer.bytes_mut())?;
        self.filled.get(chunk.group).ok_or_else(twice)?.set(buffer).map_err(|_| twice())?;
        Ok(true)
    }
}

struct HostPlaced {
    tensors: Vec<PlacedTensor>,
    /// Groups no reader filled (the read failed or was cancelled first).
    unfilled: usize,
}

impl Placed for HostPlaced {
    fn read_detail(&self, total: u64, _reading: Duration, _threads: usize) -> String {
        format!("{} tensors, {total} bytes read and checked", self.tensors.len())
    }

    fn finish(self: Box<Self>, _total: u64, _reading: Duration) -> Result<(Vec<PlacedTensor>, String), Error> {
        if self.unfilled > 0 {
            return Err(Error::Internal(format!("{} groups of tensors were never read", self.unfilled)));
        }
        Ok((self.tensors, "cpu: the tensors are already in host memory, nothing to copy".into()))
    }
}
