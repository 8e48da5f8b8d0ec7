//! Where a load's bytes land: the seam between the reader (which knows files) and the memory it
//! fills (host memory, a sealed memfd, pinned staging → CUDA; later a CUDA VMM range).
//!
//! A load's tensors are cut into [`Group`]s: tensors back to back in one file with one dtype (at
//! most [`GROUP_BYTES`]), each with one destination allocation mirroring those file bytes, so
//! every chunk is one read and one copy and a checkpoint of thousands of small tensors moves in
//! the same few large pieces as a dense one. Each tensor is then a view into its group; a group's
//! memory is freed when its last view is (converting every tensor of a group to another dtype
//! frees it, and a group bounds what a conversion holds twice).
//!
//! A [`Placement`] allocates the groups, lends the readers the memory of each [`Chunk`] through a
//! [`Destination`] and runs whatever it needs beside them (a copying thread); the reader loop
//! (`read`) never knows which placement it fills.

use std::{sync::Arc, time::Duration};

use candle_core::DType;
use pipeline_manager::TensorData;
use resource_manager::staging::DeviceError;
use tokio_util::sync::CancellationToken;

use crate::{Error, files::ReadAt, header, plan::LoadPlan};

/// The most bytes one group holds: few allocations for a large model, and a bound on the memory
/// a dtype conversion holds twice.
pub const GROUP_BYTES: u64 = 256 * 1024 * 1024;

/// Where a placement that gives tensors aligned starts puts each: a multiple of 256 bytes, as
/// every tensor PyTorch allocates on a GPU has. GPU libraries choose kernels by a pointer's
/// alignment (cuBLASLt and cuDNN look at up to 256 bytes), so a tensor attached at an odd file
/// offset can run another kernel than the same tensor loaded by `from_pretrained`, and sum in
/// another order: the results differ in their last bits.
pub const TENSOR_ALIGN: u64 = 256;

/// Tensors back to back in one file with one dtype: one allocation at the destination.
#[derive(Debug, Clone)]
pub struct Group {
    /// The file, numbered as [`LoadPlan::files`] yields them.
    pub file: usize,
    /// The device it goes to, numbered as its placement's devices (0 but for a split load).
    pub device: usize,
    pub dtype: DType,
    /// Its first byte in the file.
    pub start: u64,
    pub len: u64,
    pub members: Vec<Member>,
}

/// One tensor of a group.
#[derive(Debug, Clone)]
pub struct Member {
    /// Its component, numbered as the plan's.
    pub component: usize,
    pub name: String,
    pub shape: Vec<usize>,
    /// Bytes from the start of the group.
    pub at: u64,
    pub len: u64,
}

impl Group {
    /// Its elements of its dtype.
    pub fn elems(&self) -> usize {
        (self.len / self.dtype.size_in_bytes() as u64) as usize
    }
}

/// A part of a group filled in one go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunk {
    pub group: usize,
    /// Bytes from the start of the group.
    pub offset: u64,
    pub len: usize,
}

/// How a placement wants its groups cut: chunks of at most `chunk` bytes, except the first and
/// the last `edge` bytes of the load, in chunks of at most `edge_chunk`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunking {
    pub chunk: usize,
    pub edge_chunk: usize,
    pub edge: u64,
}

/// One tensor placed: its component, its file, its name in its file, and its data at the
/// destination.
pub struct PlacedTensor {
    pub component: usize,
    /// Its device, numbered as the load's (0 but for a load over several devices).
    pub device: usize,
    /// Numbered as [`LoadPlan::files`] yields them.
    pub file: usize,
    pub name: String,
    pub data: Box<dyn TensorData>,
}

/// The memory of the chunks, lent to the reader threads.
pub trait Destination: Sync {
    /// Lends `fill` the memory of chunk `index` (of the chunks given to [`Placement::place`]) to
    /// write, and takes it back once written. It may wait for memory (a staging buffer): `stop`
    /// ends that wait, and then `Ok(false)` says nothing was filled.
    fn fill(
        &self,
        index: usize,
        stop: &dyn Fn() -> bool,
        fill: &mut dyn FnMut(&mut [u8]) -> Result<(), Error>,
    ) -> Result<bool, Error>;
}

/// Where one load's bytes land; chosen once per load.
pub trait Placement: Send + Sync {
    /// How the groups of a load of `total` bytes read on `threads` threads are cut.
    fn chunking(&self, total: u64, threads: usize) -> Chunking;
    /// The largest chunk it can take (a staging buffer's size); any, for memory of its own.
    fn max_chunk(&self) -> usize {
        usize::MAX
    }
    /// The alignment each tensor's first byte gets, given that every group's allocation starts
    /// at a multiple of it: the groups are cut so that each member starts at a multiple of it
    /// from its group's start. 1: wherever the file puts it.
    fn tensor_align(&self) -> u64 {
        1
    }
    /// Which of its devices the tensor `index` (in plan order) goes to: groups never span two.
    fn device_of(&self, _index: usize) -> usize {
        0
    }
    /// Allocates every group, runs `readers` (which fill every chunk through the destination,
    /// then return) beside whatever the placement runs itself, and returns what was placed
    /// (copies may still be in flight: see [`Placed::finish`]). An error of the placement's own
    /// stops the readers at their next chunk.
    fn place(
        &self,
        groups: &[Group],
        chunks: &[Chunk],
        readers: &(dyn Fn(&dyn Destination) + Sync),
    ) -> Result<Box<dyn Placed>, Error>;
    /// Places the plan's tensors without reading them, where this placement can take the files
    /// as they are (maps them); `None`: read them into [`Placement::place`].
    fn map(&self, _plan: &LoadPlan, _files: &[Arc<dyn ReadAt>]) -> Option<Result<Box<dyn Placed>, Error>> {
        None
    }
    /// Step 7: converts the float tensors of a finished load on `device` to `dtype` (see
    /// [`convert_each`]), keeping them where this placement keeps tensors. Returns how many were
    /// converted.
    fn convert(
        &self,
        tensors: &mut Vec<PlacedTensor>,
        dtype: DType,
        cancel: &CancellationToken,
        device: &str,
    ) -> Result<usize, Error> {
        convert_each(tensors, dtype, cancel, |e| Error::place(device, DeviceError::from(e)))
    }
}

/// Step 7's conversion of floats to another dtype, each tensor on its device through its own
/// [`TensorData::to_dtype`]: what a placement does unless it keeps converted tensors itself.
/// Returns how many tensors were converted; stops with [`Error::Cancelled`] between two tensors.
pub fn convert_each(
    tensors: &mut [PlacedTensor],
    dtype: DType,
    cancel: &CancellationToken,
    place: impl Fn(candle_core::Error) -> Error,
) -> Result<usize, Error> {
    let mut converted = 0;
    for t in tensors.iter_mut().filter(|t| converts_to(t.data.as_ref(), dtype)) {
        if cancel.is_cancelled() {
            return Err(Error::Cancelled);
        }
        t.data = t.data.to_dtype(dtype).map_err(&place)?;
        converted += 1;
    }
    Ok(converted)
}

/// One tensor's place when a conversion writes every tensor of a load into one new allocation.
#[derive(Debug, Clone, Copy)]
pub struct Converted {
    /// Its dtype after the conversion (`dtype`, or its own if it is not converted).
    pub dtype: DType,
    /// Its first byte, `align`-aligned, and its length.
    pub start: usize,
    pub len: usize,
    pub converts: bool,
}

/// Where each of `tensors` lands when a conversion to `dtype` writes them all, back to back and
/// `align`-aligned, into one new allocation; and that allocation's length.
pub fn converted_layout(tensors: &[PlacedTensor], dtype: DType, align: usize) -> (Vec<Converted>, usize) {
    let mut end = 0usize;
    let layout = tensors
        .iter()
        .map(|t| {
            let converts = converts_to(t.data.as_ref(), dtype);
            let to = if converts { dtype } else { t.data.dtype() };
            let start = end.next_multiple_of(align);
            let len = t.data.shape().iter().product::<usize>() * to.size_in_bytes();
            end = start + len;
            Converted { dtype: to, start, len, converts }
        })
        .collect();
    (layout, end)
}

/// Whether step 7 converts this tensor to `dtype`: a float of another width (see
/// [`header::converts`]).
pub fn converts_to(data: &dyn TensorData, dtype: DType) -> bool {
    header::converts(data.dtype()) && data.dtype() != dtype
}

/// What a placement holds once every chunk was filled, until step 6 hands out the tensors.
pub trait Placed: Send {
    /// Step 5's detail, for `total` bytes read in `reading` on `threads` threads.
    fn read_detail(&self, total: u64, reading: Duration, threads: usize) -> String;
    /// Step 6: waits for what is still in flight; the tensors in group order, and the step's
    /// detail.
    fn finish(self: Box<Self>, total: u64, reading: Duration) -> Result<(Vec<PlacedTensor>, String), Error>;
}

/// The plan's tensors in groups of at most `max_bytes`, in file order, each member at a multiple
/// of `align` from its group's start (a tensor after one whose end is not aligned starts a group of
/// its own: a checkpoint's large tensors are multiples of 256 bytes, so only the odd small ones
/// add groups), and on the device `device_of` gives each tensor (by its index in plan order).
pub fn groups(plan: &LoadPlan, max_bytes: u64, align: u64, device_of: impl Fn(usize) -> usize) -> Vec<Group> {
    let mut groups: Vec<Group> = Vec::new();
    let files =
        plan.components.iter().enumerate().flat_map(|(c, component)| component.files.iter().map(move |f| (c, f)));
    let mut index = 0;
    for (file, (component, plan)) in files.enumerate() {
        let first_of_file = groups.len();
        for tensor in &plan.tensors {
            let device = device_of(index);
            index += 1;
            let joins = groups[first_of_file..].last().is_some_and(|g: &Group| {
                g.dtype == tensor.dtype
                    && g.device == device
                    && g.start + g.len == tensor.offset
                    && g.len + tensor.len <= max_bytes
                    && g.len.is_multiple_of(align)
            });
            if !joins {
                groups.push(Group {
                    file,
                    device,
                    dtype: tensor.dtype,
                    start: tensor.offset,
                    len: 0,
                    members: Vec::new(),
                });
            }
            let Some(group) = groups.last_mut() else { continue };
            group.members.push(Member {
                component,
                name: tensor.name.clone(),
                shape: tensor.shape.clone(),
                at: group.len,
                len: tensor.len,
            });
            group.len += tensor.len;
        }
    }
    groups
}

/// Every byte of every group, in file order, cut as `cut` says: the link idles until the first
/// reads complete and after the last copies are queued, so the first and last reads are kept
/// short (at the end, every reader's last copy is queued at about the same time). A chunk holds
/// whole elements, so a copy never splits one (at least one element each).
pub fn chunks(groups: &[Group], cut: Chunking) -> Vec<Chunk> {
    let total: u64 = groups.iter().map(|g| g.len).sum();
    let tail_from = total.saturating_sub(cut.edge);
    let mut chunks = Vec::new();
    let mut base = 0;
    for (group, g) in groups.iter().enumerate() {
        let mut offset = 0;
        while offset < g.len {
            let at = base + offset;
            let most = if at < cut.edge || at >= tail_from {
                cut.edge_chunk as u64
            } else {
                (cut.chunk as u64).min(tail_from - at)
            };
            let (rest, size) = (g.len - offset, g.dtype.size_in_bytes() as u64);
            let len = if most >= rest { rest } else { (most / size * size).max(size) };
            chunks.push(Chunk { group, offset, len: len as usize });
            offset += len;
        }
        base += g.len;
    }
    chunks
}
