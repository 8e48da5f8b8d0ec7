//! The host-memory placement: one allocation per group, filled by the readers in place, every
//! tensor a view into its group. Nothing is copied after the read.

use std::{
    borrow::Cow,
    sync::{Arc, Mutex},
    time::Duration,
};

use candle_core::{DType, Device, Tensor};
use pipeline_manager::TensorData;
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

    pub fn bytes(&self) -> &[u8] {
        &bytemuck::cast_slice(&self.words)[..self.len]
    }

    pub fn bytes_mut(&mut self) -> &mut [u8] {
        &mut bytemuck::cast_slice_mut(&mut self.words)[..self.len]
    }
}

/// A tensor in host memory: a view of part of a buffer that it shares with the other tensors of
/// its group.
#[derive(Debug, Clone)]
pub struct HostView {
    buffer: Arc<HostBuffer>,
    at: usize,
    len: usize,
    dtype: DType,
    shape: Vec<usize>,
}

impl HostView {
    /// The `len` bytes at `at` of `buffer` as a tensor of `dtype` and `shape`; `None` if they do
    /// not fit the buffer or the shape.
    pub fn new(buffer: Arc<HostBuffer>, at: usize, len: usize, dtype: DType, shape: Vec<usize>) -> Option<Self> {
        let fits = at.checked_add(len).is_some_and(|end| end <= buffer.len);
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
        Ok(Cow::Borrowed(&self.buffer.bytes()[self.at..self.at + self.len]))
    }

    fn to_dtype(&self, dtype: DType) -> candle_core::Result<Box<dyn TensorData>> {
        // candle's conversions (the rounding every caller of the server expects), into a tensor of
        // its own; the group is freed once none of its views is left.
        let tensor = Tensor::from_raw_buffer(self.bytes()?.as_ref(), self.dtype, &self.shape, &Device::Cpu)?;
        Ok(Box::new(tensor.to_dtype(dtype)?))
    }
}

/// Loads into host memory.
#[derive(Debug, Default, Clone, Copy)]
pub struct HostPlacement;

impl Placement for HostPlacement {
    fn device(&self) -> String {
        "cpu".into()
    }

    fn chunking(&self, _total: u64, _threads: usize) -> Chunking {
        Chunking { chunk: CHUNK_BYTES, edge_chunk: CHUNK_BYTES, edge: 0 }
    }

    fn place(
        &self,
        groups: &[Group],
        chunks: &[Chunk],
        readers: &(dyn Fn(&dyn Destination) + Sync),
    ) -> Result<Box<dyn Placed>, Error> {
        let mut buffers: Vec<HostBuffer> = groups.iter().map(|g| HostBuffer::zeroed(g.len as usize)).collect();
        readers(&HostDestination { chunks: split(&mut buffers, chunks)? });
        let mut tensors = Vec::with_capacity(groups.iter().map(|g| g.members.len()).sum());
        for (group, buffer) in groups.iter().zip(buffers) {
            let buffer = Arc::new(buffer);
            for m in &group.members {
                let view = HostView::new(buffer.clone(), m.at as usize, m.len as usize, group.dtype, m.shape.clone())
                    .ok_or_else(|| {
                    Error::Internal(format!("tensor {}: its shape does not fit its bytes", m.name))
                })?;
                tensors.push(PlacedTensor { component: m.component, name: m.name.clone(), data: Box::new(view) });
            }
        }
        Ok(Box::new(HostPlaced { tensors }))
    }
}

/// Cuts the buffers into the chunks' disjoint pieces (the chunks of a group come in order and
/// cover it), so each reader thread writes its own piece and no two ever share one.
fn split<'b>(buffers: &'b mut [HostBuffer], chunks: &[Chunk]) -> Result<Vec<Mutex<Option<&'b mut [u8]>>>, Error> {
    let mut rests: Vec<(u64, &mut [u8])> = buffers.iter_mut().map(|b| (0, b.bytes_mut())).collect();
    let mut pieces = Vec::with_capacity(chunks.len());
    for chunk in chunks {
        let out_of_order = || Error::Internal(format!("chunk {chunk:?} does not follow the last one of its group"));
        let (at, rest) = rests.get_mut(chunk.group).ok_or_else(out_of_order)?;
        if *at != chunk.offset || chunk.len > rest.len() {
            return Err(out_of_order());
        }
        let (piece, tail) = std::mem::take(rest).split_at_mut(chunk.len);
        (*at, *rest) = (*at + chunk.len as u64, tail);
        pieces.push(Mutex::new(Some(piece)));
    }
    Ok(pieces)
}

struct HostDestination<'b> {
    chunks: Vec<Mutex<Option<&'b mut [u8]>>>,
}

impl Destination for HostDestination<'_> {
    fn fill(
        &self,
        index: usize,
        stop: &dyn Fn() -> bool,
        fill: &mut dyn FnMut(&mut [u8]) -> Result<(), Error>,
    ) -> Result<bool, Error> {
        if stop() {
            return Ok(false);
        }
        let piece = self.chunks.get(index).map(sync::lock).and_then(|mut p| p.take());
        match piece {
            Some(bytes) => fill(bytes).map(|()| true),
            None => Err(Error::Internal(format!("chunk {index} was filled already or never planned"))),
        }
    }
}

struct HostPlaced {
    tensors: Vec<PlacedTensor>,
}

impl Placed for HostPlaced {
    fn read_detail(&self, total: u64, _reading: Duration, _threads: usize) -> String {
        format!("{} tensors, {total} bytes read and checked", self.tensors.len())
    }

    fn finish(self: Box<Self>, _total: u64, _reading: Duration) -> Result<(Vec<PlacedTensor>, String), Error> {
        Ok((self.tensors, "cpu: the tensors are already in host memory, nothing to copy".into()))
    }
}
