//! The pinned staging → CUDA placement: the readers fill pinned staging buffers and one copying
//! thread copies each full buffer to its group's device allocation asynchronously while the next
//! ones are read, so the page cache, the disk and the host→device link all stay busy. No pageable
//! copy, no pinned allocation per load (the pool is the server's, see `resource_manager::staging`).
//!
//! The readers only read: the copying thread makes every call to the device while they do. It
//! queues each filled buffer's copy and gives the buffer back to the pool once that copy has
//! completed. Readers that queued their own copies and waited for their own buffers contended
//! for the driver's locks, and where the cores are busy a preempted lock holder stalls them all.
//! The copying thread polls rather than blocks while copies are in flight: both choices were
//! measured against the machine's limit, idle and with every core busy
//! (docs/benchmarks/design-choices.md).
//!
//! Each group has one device allocation; the views into it are made by the allocating thread
//! while the readers read (they are only shapes over memory not written yet, handed out after the
//! copies complete), so the milliseconds a checkpoint of thousands of tensors spends on them do
//! not follow the last copy (docs/benchmarks/design-choices.md). Generic over the device
//! ([`CopyEngine`]): the scheduling is the same code, and is tested, without a GPU.

use std::{
    collections::VecDeque,
    sync::{
        Arc, Condvar, Mutex, OnceLock,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    time::{Duration, Instant},
};

use resource_manager::{
    staging::{CopyEngine, DeviceError, Lease, MIN_CHUNK_BYTES, StagingPool, chunk_bytes},
    sync,
};

use crate::{
    Error,
    placement::{Chunk, Chunking, Destination, Group, Placed, PlacedTensor, Placement, TENSOR_ALIGN},
};

/// Loads onto a device through a pool of staging buffers; with replicas, onto several devices,
/// each byte read once.
pub struct StagedPlacement<E: GroupViews> {
    engine: Arc<E>,
    pool: Arc<StagingPool<E::Buffer, E::Fence>>,
    /// The device's name, for messages.
    device: String,
    /// Replicas: every group again on each of these devices, copied device to device from the
    /// device before it in the list (the first from `engine`'s), a chunk as soon as its copy there
    /// completed. A chain rather than a star: every device sends and receives each byte once, so
    /// no one link carries it several times (PCIe peers share links; behind NVSwitch, where every
    /// pair has its own, a chain should cost no more than a star).
    replicas: Vec<(Arc<E>, String)>,
}

impl<E: GroupViews> StagedPlacement<E> {
    pub fn new(engine: Arc<E>, pool: Arc<StagingPool<E::Buffer, E::Fence>>, device: String) -> Self {
        Self { engine, pool, device, replicas: Vec::new() }
    }

    /// The same load replicated on `replicas` too, each filled by peer copies
    /// ([`CopyEngine::copy_from_peer`]) rather than from the host.
    pub fn with_replicas(mut self, replicas: Vec<(Arc<E>, String)>) -> Self {
        self.replicas = replicas;
        self
    }

    /// The devices it fills: its own, then each replica's.
    fn devices(&self) -> usize {
        1 + self.replicas.len()
    }

    fn engine(&self, device: usize) -> &E {
        device.checked_sub(1).and_then(|r| self.replicas.get(r)).map_or(self.engine.as_ref(), |(e, _)| e.as_ref())
    }

    fn name(&self, device: usize) -> &str {
        device.checked_sub(1).and_then(|r| self.replicas.get(r)).map_or(self.device.as_str(), |(_, n)| n.as_str())
    }

    fn error(&self, source: DeviceError) -> Error {
        Error::place(&self.device, source)
    }

    fn error_on(&self, device: usize, source: DeviceError) -> Error {
        Error::place(self.name(device), source)
    }

    /// Drops each device's part of `per_device` with that device ready to free it (a GPU's
    /// context current on this thread).
    fn free_each<T>(&self, per_device: Vec<T>) {
        for (device, part) in per_device.into_iter().enumerate() {
            self.engine(device).prepare_free();
            drop(part);
        }
    }
}

/// What the threads of one staged load share.
struct Shared<'a, E: GroupViews> {
    placement: &'a StagedPlacement<E>,
    groups: &'a [Group],
    chunks: &'a [Chunk],
    /// Per device (its own, then each replica's), filled in group order by the allocating thread.
    allocations: Vec<Vec<OnceLock<E::Allocation>>>,
    allocated: (Mutex<()>, Condvar),
    /// The placement failed (a copy or an allocation): the readers stop.
    failed: AtomicBool,
    first_error: Mutex<Option<Error>>,
}

impl<E: GroupViews> Shared<'_, E> {
    fn fail(&self, e: Error) {
        self.failed.store(true, Ordering::Relaxed);
        sync::lock(&self.first_error).get_or_insert(e);
    }

    fn failed(&self) -> bool {
        self.failed.load(Ordering::Relaxed)
    }

    /// `device`'s allocation of `group`, once made; `None` if the load failed first.
    fn allocation(&self, device: usize, group: usize) -> Option<&E::Allocation> {
        wait_for(&self.allocations[device][group], &self.allocated, &self.failed)
    }
}

impl<E: GroupViews + Send + 'static> Placement for StagedPlacement<E>
where
    E::Allocation: 'static,
{
    /// Whole buffers for large loads, smaller pieces for small ones; the first and the last chunk
    /// of every reader (the reads in flight when the first copy and the last one are queued) are
    /// short, so the link starts early and is not left with one long copy at the end.
    fn max_chunk(&self) -> usize {
        self.pool.buffer_bytes()
    }

    /// CUDA's allocations start at multiples of 256 bytes; the groups' cut keeps every tensor there.
    fn tensor_align(&self) -> u64 {
        TENSOR_ALIGN
    }

    fn chunking(&self, total: u64, threads: usize) -> Chunking {
        let chunk = chunk_bytes(total, threads, self.pool.buffer_bytes());
        Chunking { chunk, edge_chunk: MIN_CHUNK_BYTES.min(chunk), edge: (threads * chunk) as u64 }
    }

    /// Allocates the device memory of every group (on a thread of its own, ahead of the readers:
    /// mapping gigabytes takes milliseconds, which would otherwise come before the first read),
    /// then makes every tensor a view into its group on that thread, while the readers fill
    /// staging buffers whose copies the copying thread queues once their group is allocated.
    fn place(
        &self,
        groups: &[Group],
        chunks: &[Chunk],
        readers: &(dyn Fn(&dyn Destination) + Sync),
    ) -> Result<Box<dyn Placed>, Error> {
        let shared = Shared {
            placement: self,
            groups,
            chunks,
            allocations: (0..self.devices()).map(|_| groups.iter().map(|_| OnceLock::new()).collect()).collect(),
            allocated: (Mutex::new(()), Condvar::new()),
            failed: AtomicBool::new(false),
            first_error: Mutex::new(None),
        };
        let (filled, to_copy) = mpsc::channel::<Filled<'_, E>>();
        let (allocator, copier) = std::thread::scope(|scope| {
            let allocator = scope.spawn(|| allocate(&shared));
            let copier = scope.spawn(|| copy(&shared, to_copy));
            // Dropped when the readers are done (or one panicked), closing the channel: the copying
            // thread then ends once their last copies complete.
            let destination = StagedDestination { shared: &shared, filled };
            readers(&destination);
            drop(destination);
            (allocator.join(), copier.join())
        });
        let Shared { allocations, first_error, .. } = shared;
        // Whatever was allocated is freed on this thread if the load fails.
        let failed = |e: Error, allocations| {
            self.free_each(allocations);
            Err(e)
        };
        if copier.is_err() {
            return failed(Error::Internal("the copying thread panicked".into()), allocations);
        }
        let Ok((allocated_in, tensors)) = allocator else {
            return failed(Error::Internal("the allocating thread panicked".into()), allocations);
        };
        if let Some(e) = sync::into_inner(first_error) {
            return failed(e, allocations);
        }
        let allocations = allocations
            .into_iter()
            .map(|each| each.into_iter().map(OnceLock::into_inner).collect::<Option<Vec<_>>>())
            .collect::<Option<Vec<_>>>();
        let allocations = allocations.ok_or_else(|| Error::Internal("a group was never allocated".into()))?;
        Ok(Box::new(Staged {
            engines: std::iter::once((self.engine.clone(), self.device.clone())).chain(self.replicas.clone()).collect(),
            allocations,
            tensors,
            allocated_in,
            pinned_bytes: self.pool.count() * self.pool.buffer_bytes(),
        }))
    }
}

/// A filled staging buffer and the index of the chunk it holds, on its way to the copying thread.
type Filled<'a, E> = (Lease<'a, <E as CopyEngine>::Buffer, <E as CopyEngine>::Fence>, usize);

/// The readers' side: each filled buffer goes to the copying thread; they never call the device.
struct StagedDestination<'s, 'a, E: GroupViews> {
    shared: &'s Shared<'a, E>,
    filled: mpsc::Sender<Filled<'a, E>>,
}

impl<E: GroupViews> Destination for StagedDestination<'_, '_, E> {
    fn fill(
        &self,
        index: usize,
        stop: &dyn Fn() -> bool,
        fill: &mut dyn FnMut(&mut [u8]) -> Result<(), Error>,
    ) -> Result<bool, Error> {
        let shared = self.shared;
        let placement: &StagedPlacement<E> = shared.placement;
        let chunk = shared.chunks.get(index).ok_or_else(|| Error::Internal(format!("no chunk {index}")))?;
        let Some(mut lease) = placement.pool.take(|| stop() || shared.failed()) else { return Ok(false) };
        let buffer = lease.fill(placement.engine.as_ref()).map_err(|e| placement.error(e))?;
        fill(&mut buffer[..chunk.len])?;
        match self.filled.send((lease, index)) {
            Ok(()) => Ok(true),
            Err(_) => Err(Error::Internal("the copying thread stopped".into())),
        }
    }
}

/// The allocating thread: every group's memory in order (on every device, for replicas), then
/// every tensor's view, device by device.
fn allocate<E: GroupViews>(shared: &Shared<'_, E>) -> (Duration, Vec<PlacedTensor>) {
    let placement = shared.placement;
    let started = Instant::now();
    'groups: for (g, group) in shared.groups.iter().enumerate() {
        for (device, slots) in shared.allocations.iter().enumerate() {
            if shared.failed() {
                break 'groups;
            }
            match placement.engine(device).allocate(group.dtype, device_elems(group)) {
                Ok(allocation) => {
                    let _ = slots[g].set(allocation);
                }
                Err(e) => shared.fail(placement.error_on(device, e)),
            }
        }
        let _guard = sync::lock(&shared.allocated.0);
        shared.allocated.1.notify_all();
    }
    let allocated_in = started.elapsed();
    let per_device = shared.groups.iter().map(|g| g.members.len()).sum::<usize>();
    let mut tensors = Vec::with_capacity(per_device * shared.allocations.len());
    for (device, slots) in shared.allocations.iter().enumerate() {
        for (group, slot) in shared.groups.iter().zip(slots) {
            let Some(allocation) = slot.get().filter(|_| !shared.failed()) else { break };
            let first = tensors.len();
            if let Err(e) = placement.engine(device).views(allocation, group, &mut tensors) {
                shared.fail(placement.error_on(device, e));
            }
            tensors[first..].iter_mut().for_each(|t| t.device = device);
        }
    }
    (allocated_in, tensors)
}

/// The copying thread: queues each filled buffer's copy as soon as it arrives and gives a buffer
/// back to the pool as soon as its copy completed, polling both while copies are in flight
/// (blocking on either would leave a filled buffer unqueued, and the link idle, for up to a
/// copy's time); it sleeps only while nothing is in flight. With replicas, a chunk whose copy
/// completed on one device is copied on from there to the next.
fn copy<E: GroupViews>(shared: &Shared<'_, E>, to_copy: mpsc::Receiver<Filled<'_, E>>) {
    let placement = shared.placement;
    let engine = placement.engine.as_ref();
    let mut in_flight = VecDeque::new();
    let mut peers = PeerCopies { shared, in_flight: Vec::new() };
    let (mut received, mut readers_done) = (None, false);
    loop {
        let next = received.take().or_else(|| match to_copy.try_recv() {
            Ok(filled) => Some(filled),
            Err(mpsc::TryRecvError::Empty) => None,
            Err(mpsc::TryRecvError::Disconnected) => {
                readers_done = true;
                None
            }
        });
        if let Some((mut lease, index)) = next {
            let chunk = shared.chunks[index];
            if shared.failed() {
                continue;
            }
            let Some(to) = shared.allocation(0, chunk.group) else { continue };
            match lease.copy_to(engine, chunk.len, to, chunk.offset as usize) {
                Ok(()) => in_flight.push_back((lease, index)),
                Err(e) => shared.fail(placement.error(e)),
            }
            continue;
        }
        // Copies complete in the order they were queued.
        let before = in_flight.len();
        while let Some((oldest, index)) = in_flight.front_mut() {
            match oldest.copied(engine) {
                Ok(false) => break,
                Ok(true) => {
                    let index = *index;
                    drop(in_flight.pop_front());
                    peers.queue(1, index);
                }
                // Back to the pool with its fence, which the next borrower waits for.
                Err(e) => {
                    shared.fail(placement.error(e));
                    drop(in_flight.pop_front());
                }
            }
        }
        if in_flight.len() < before || peers.poll() {
            continue;
        }
        if !in_flight.is_empty() || !peers.in_flight.is_empty() {
            std::hint::spin_loop();
        } else if readers_done {
            return;
        } else {
            // Nothing in flight: sleep until a buffer is filled.
            match to_copy.recv() {
                Ok(filled) => received = Some(filled),
                Err(mpsc::RecvError) => readers_done = true,
            }
        }
    }
}

/// The replicas' copies in flight, each chunk's passed on from device to device.
struct PeerCopies<'s, 'a, E: GroupViews> {
    shared: &'s Shared<'a, E>,
    /// (device, chunk, fence), in no order: each device's stream completes its own in order.
    in_flight: Vec<(usize, usize, E::Fence)>,
}

impl<E: GroupViews> PeerCopies<'_, '_, E> {
    /// Copies chunk `index` from device `device - 1` to `device`, if there is one and the load
    /// has not failed.
    fn queue(&mut self, device: usize, index: usize) {
        let shared = self.shared;
        let placement = shared.placement;
        if device >= placement.devices() || shared.failed() {
            return;
        }
        let chunk = shared.chunks[index];
        let (Some(from), Some(to)) =
            (shared.allocation(device - 1, chunk.group), shared.allocation(device, chunk.group))
        else {
            return;
        };
        let (source, engine) = (placement.engine(device - 1), placement.engine(device));
        match engine.copy_from_peer(source, from, to, chunk.offset as usize, chunk.len) {
            Ok(fence) => self.in_flight.push((device, index, fence)),
            Err(e) => shared.fail(placement.error_on(device, e)),
        }
    }

    /// Passes every completed copy on to the next device; whether any completed.
    fn poll(&mut self) -> bool {
        let shared = self.shared;
        let mut completed = Vec::new();
        self.in_flight.retain(|(device, index, fence)| match shared.placement.engine(*device).is_done(fence) {
            Ok(false) => true,
            Ok(true) => {
                completed.push((*device, *index));
                false
            }
            Err(e) => {
                shared.fail(shared.placement.error_on(*device, e));
                false
            }
        });
        let any = !completed.is_empty();
        for (device, index) in completed {
            self.queue(device + 1, index);
        }
        any
    }
}

/// How a staged placement hands out the tensors of a group once it is allocated: as views into
/// its allocation, each shaped as in its file (made while the copies are in flight: read only
/// after [`Placed::finish`]).
pub trait GroupViews: CopyEngine {
    fn views(
        &self,
        allocation: &Self::Allocation,
        group: &Group,
        into: &mut Vec<PlacedTensor>,
    ) -> Result<(), DeviceError>;
}

/// [`GroupViews`] for an engine whose allocations are candle tensors ([`CopyEngine::tensor_of`]):
/// every member is a narrowed, reshaped view of its group's tensor.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))] // the GPU's engine and the tests use it
pub fn candle_views<E: CopyEngine>(
    engine: &E,
    allocation: &E::Allocation,
    group: &Group,
    into: &mut Vec<PlacedTensor>,
) -> Result<(), DeviceError> {
    let whole = engine.tensor_of(allocation, group.dtype, device_elems(group))?;
    let size = group.dtype.size_in_bytes() as u64;
    for m in &group.members {
        let view = whole
            .narrow(0, (m.at / size) as usize, (m.len / size) as usize)
            .and_then(|v| v.reshape(m.shape.as_slice()))
            .map_err(|e| DeviceError::Tensor { tensor: m.name.clone(), source: e })?;
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

#[cfg(feature = "cuda")]
impl GroupViews for resource_manager::gpu::Gpu {
    fn views(
        &self,
        allocation: &Self::Allocation,
        group: &Group,
        into: &mut Vec<PlacedTensor>,
    ) -> Result<(), DeviceError> {
        candle_views(self, allocation, group, into)
    }
}

/// The group's allocation once the allocating thread made it; `None` if the load failed first.
fn wait_for<'a, A>(slot: &'a OnceLock<A>, allocated: &(Mutex<()>, Condvar), failed: &AtomicBool) -> Option<&'a A> {
    let mut guard = sync::lock(&allocated.0);
    loop {
        if let Some(allocation) = slot.get() {
            return Some(allocation);
        }
        if failed.load(Ordering::Relaxed) {
            return None;
        }
        // Timed, so a failure (which does not notify) is seen within a millisecond.
        guard = sync::wait_timeout(&allocated.1, guard, Duration::from_millis(1));
    }
}

/// Elements a group's allocation holds: at least one (a group of empty tensors still gets an
/// address).
pub(crate) fn device_elems(g: &Group) -> usize {
    g.elems().max(1)
}

/// A staged load once every chunk was handed to the copying thread: the groups' allocations on
/// each device, their copies possibly still in flight, and every tensor as a view into its group
/// (not to be read before [`Placed::finish`]).
struct Staged<E: CopyEngine> {
    /// Each device's engine and name: the load's own, then each replica's.
    engines: Vec<(Arc<E>, String)>,
    /// Per device, as `engines`.
    allocations: Vec<Vec<E::Allocation>>,
    tensors: Vec<PlacedTensor>,
    /// How long the device allocations took (while the first chunks were read).
    allocated_in: Duration,
    pinned_bytes: usize,
}

impl<E: CopyEngine + Send + 'static> Placed for Staged<E>
where
    E::Allocation: 'static,
{
    fn read_detail(&self, total: u64, reading: Duration, threads: usize) -> String {
        let replicas = match &self.engines[1..] {
            [] => String::new(),
            rest => {
                let names = rest.iter().map(|(_, n)| n.as_str()).collect::<Vec<_>>().join(", ");
                format!(", copied on device to device to {names}")
            }
        };
        format!(
            "{total} bytes read into {} MiB of pinned buffers and queued to {} in {} device allocations{replicas} \
             (allocated in {} ms, read in {} ms, {threads} threads)",
            self.pinned_bytes >> 20,
            self.engines[0].1,
            self.allocations[0].len(),
            self.allocated_in.as_millis(),
            reading.as_millis(),
        )
    }

    /// Waits for the copies still in flight and hands out the tensors.
    fn finish(self: Box<Self>, total: u64, reading: Duration) -> Result<(Vec<PlacedTensor>, String), Error> {
        let waiting = Instant::now();
        for (engine, device) in &self.engines {
            engine.synchronize().map_err(|source| Error::place(device, source))?;
        }
        let names = self.engines.iter().map(|(_, n)| n.as_str()).collect::<Vec<_>>().join(", ");
        let detail = format!(
            "{names}: copied while reading ({:.1} GB/s); the last copies took {} ms more",
            total as f64 / reading.as_secs_f64().max(1e-9) / 1e9,
            waiting.elapsed().as_millis()
        );
        // The views share the allocations' memory: it lives as long as they do.
        let Staged { engines, allocations, tensors, .. } = *self;
        for ((engine, _), each) in engines.iter().zip(allocations) {
            engine.prepare_free();
            drop(each);
        }
        Ok((tensors, detail))
    }
}

#[cfg(test)]
mod tests {
    use std::{
        collections::HashSet,
        fs::File,
        io::Write,
        sync::atomic::{AtomicUsize, Ordering},
        thread::ThreadId,
    };

    use candle_core::{DType, Device, Tensor};
    use tokio_util::sync::CancellationToken;

    use super::*;
    use crate::{
        ReadAt,
        header::TensorPlan,
        placement::GROUP_BYTES,
        placement::{chunks, groups},
        plan::{ComponentPlan, FilePlan, Layout, LoadPlan},
        read::{ReadFailed, ReadOptions, read as read_into},
    };

    /// Copies that complete later, on another thread, in random order: the device side of a GPU
    /// without one. A copy holds its buffer's bytes until it completes and reads them only then,
    /// like DMA: writing a buffer while a copy holds it panics (the rule under test). Device
    /// memory is a host tensor that copies write in place, so views made before the copies
    /// complete see the bytes only once they do, as on a GPU.
    #[derive(Clone)]
    struct LateCopies {
        queue: mpsc::Sender<Copy>,
        in_flight: Arc<AtomicUsize>,
        copies: Arc<AtomicUsize>,
        /// The bytes copied to this device from the host.
        copied: Arc<AtomicUsize>,
        /// The bytes copied to this device from another.
        from_peers: Arc<AtomicUsize>,
        /// The threads that queued copies or waited for them.
        callers: Arc<Mutex<HashSet<ThreadId>>>,
        /// Refuses copies from other devices (a link that fails).
        no_peer_link: bool,
    }

    struct Copy {
        from: Source,
        len: usize,
        to: Tensor,
        offset: usize,
        done: mpsc::Sender<()>,
    }

    /// Where a copy reads: a staging buffer, or another device's memory (from a byte offset),
    /// read when the copy completes, as DMA reads it.
    enum Source {
        Buffer(Arc<Vec<u8>>),
        Peer(Tensor, usize),
    }

    struct Buffer(Arc<Vec<u8>>);

    impl AsRef<[u8]> for Buffer {
        fn as_ref(&self) -> &[u8] {
            &self.0
        }
    }

    impl AsMut<[u8]> for Buffer {
        fn as_mut(&mut self) -> &mut [u8] {
            Arc::get_mut(&mut self.0).expect("a buffer written while a copy still reads it")
        }
    }

    impl LateCopies {
        fn new(seed: u64) -> Self {
            let (queue, pending) = mpsc::channel::<Copy>();
            let in_flight = Arc::new(AtomicUsize::new(0));
            let marks = in_flight.clone();
            std::thread::spawn(move || {
                let mut rng = seed;
                let mut held: Vec<Copy> = Vec::new();
                loop {
                    // Hold a few copies back and complete them in random order, with small delays.
                    match pending.recv_timeout(Duration::from_micros(200)) {
                        Ok(copy) => held.push(copy),
                        Err(mpsc::RecvTimeoutError::Timeout) => {}
                        Err(mpsc::RecvTimeoutError::Disconnected) if held.is_empty() => return,
                        Err(mpsc::RecvTimeoutError::Disconnected) => {}
                    }
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    if held.is_empty() || (held.len() < 4 && !rng.is_multiple_of(3)) {
                        continue;
                    }
                    let copy = held.swap_remove((rng as usize / 3) % held.len());
                    std::thread::sleep(Duration::from_micros(rng % 300));
                    let Copy { from, len, to, offset, done } = copy;
                    let size = to.dtype().size_in_bytes();
                    let bytes = match &from {
                        Source::Buffer(from) => {
                            Tensor::from_raw_buffer(&from[..len], to.dtype(), &[len / size], &Device::Cpu)
                        }
                        // A copy of the peer's bytes as they are now.
                        Source::Peer(peer, at) => peer.narrow(0, at / size, len / size).and_then(|t| t.copy()),
                    };
                    bytes.and_then(|b| to.slice_set(&b, 0, offset / size)).expect("a copy into device memory");
                    drop(from);
                    marks.fetch_sub(1, Ordering::SeqCst);
                    let _ = done.send(());
                }
            });
            let (copies, copied, from_peers, callers) = Default::default();
            Self { queue, in_flight, copies, copied, from_peers, callers, no_peer_link: false }
        }

        fn called(&self) {
            self.callers.lock().expect("callers").insert(std::thread::current().id());
        }

        fn pool(&self, count: usize, bytes: usize) -> Pool {
            Arc::new(StagingPool::new((0..count).map(|_| Buffer(Arc::new(vec![0xAA; bytes]))).collect(), bytes))
        }
    }

    impl CopyEngine for LateCopies {
        type Buffer = Buffer;
        type Fence = mpsc::Receiver<()>;
        type Allocation = Tensor;

        fn allocate(&self, dtype: DType, elems: usize) -> Result<Self::Allocation, DeviceError> {
            // Bytes no file holds here, so a byte never copied shows.
            let unwritten = vec![0x55; elems * dtype.size_in_bytes()];
            Ok(Tensor::from_raw_buffer(&unwritten, dtype, &[elems], &Device::Cpu)?)
        }

        fn copy(
            &self,
            from: &Buffer,
            len: usize,
            to: &Self::Allocation,
            offset: usize,
        ) -> Result<Self::Fence, DeviceError> {
            let size = to.dtype().size_in_bytes();
            assert!(offset + len <= to.elem_count() * size, "copy past the end of its allocation");
            assert!(offset.is_multiple_of(size) && len.is_multiple_of(size), "a copy splits an element");
            self.called();
            self.in_flight.fetch_add(1, Ordering::SeqCst);
            self.copies.fetch_add(1, Ordering::Relaxed);
            self.copied.fetch_add(len, Ordering::Relaxed);
            let (done, fence) = mpsc::channel();
            let copy = Copy { from: Source::Buffer(from.0.clone()), len, to: to.clone(), offset, done };
            self.queue.send(copy).map_err(|e| DeviceError::Refused(e.to_string()))?;
            Ok(fence)
        }

        /// Queued on this device, like a pull over the link: the source's bytes are read when the
        /// copy completes, so a copy queued before they landed there copies the wrong bytes.
        fn copy_from_peer(
            &self,
            source: &Self,
            from: &Tensor,
            to: &Tensor,
            offset: usize,
            len: usize,
        ) -> Result<Self::Fence, DeviceError> {
            let size = to.dtype().size_in_bytes();
            assert_eq!((from.dtype(), from.elem_count()), (to.dtype(), to.elem_count()), "replicas differ");
            assert!(offset + len <= to.elem_count() * size, "copy past the end of its allocation");
            assert!(!Arc::ptr_eq(&self.in_flight, &source.in_flight), "a peer copy from the device itself");
            self.called();
            if self.no_peer_link {
                return Err(DeviceError::Refused("no link to the peer".into()));
            }
            self.in_flight.fetch_add(1, Ordering::SeqCst);
            self.from_peers.fetch_add(len, Ordering::Relaxed);
            let (done, fence) = mpsc::channel();
            let copy = Copy { from: Source::Peer(from.clone(), offset), len, to: to.clone(), offset, done };
            self.queue.send(copy).map_err(|e| DeviceError::Refused(e.to_string()))?;
            Ok(fence)
        }

        fn wait(&self, fence: Self::Fence) -> Result<(), DeviceError> {
            self.called();
            fence.recv().map_err(|e| DeviceError::Refused(e.to_string()))
        }

        fn is_done(&self, fence: &Self::Fence) -> Result<bool, DeviceError> {
            self.called();
            match fence.try_recv() {
                Ok(()) => Ok(true),
                Err(mpsc::TryRecvError::Empty) => Ok(false),
                Err(e) => Err(DeviceError::Refused(e.to_string())),
            }
        }

        fn synchronize(&self) -> Result<(), DeviceError> {
            while self.in_flight.load(Ordering::SeqCst) > 0 {
                std::thread::sleep(Duration::from_micros(100));
            }
            Ok(())
        }

        fn tensor_of(&self, allocation: &Self::Allocation, dtype: DType, elems: usize) -> Result<Tensor, DeviceError> {
            assert_eq!((allocation.dtype(), allocation.elem_count()), (dtype, elems));
            Ok(allocation.clone())
        }
    }

    impl GroupViews for LateCopies {
        fn views(&self, a: &Tensor, g: &Group, into: &mut Vec<PlacedTensor>) -> Result<(), DeviceError> {
            candle_views(self, a, g, into)
        }
    }

    /// A file of tensors back to back (pseudo-random bytes) and its plan; `dtypes` one per tensor,
    /// `sizes` in elements; `gap_after` leaves 8 unplanned bytes after that tensor.
    fn fixture(
        dir: &std::path::Path,
        dtypes: &[DType],
        sizes: &[usize],
        gap_after: Option<usize>,
    ) -> (LoadPlan, Vec<Arc<dyn ReadAt>>, Vec<u8>) {
        let mut data = Vec::new();
        let mut tensors = Vec::new();
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        for (i, (&dtype, &n)) in dtypes.iter().zip(sizes).enumerate() {
            let len = n * dtype.size_in_bytes();
            tensors.push(TensorPlan {
                name: format!("t{i:04}"),
                dtype,
                shape: vec![n],
                offset: data.len() as u64,
                len: len as u64,
                is_bool: false,
            });
            for _ in 0..len {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                data.push((x >> 56) as u8);
            }
            if gap_after == Some(i) {
                data.extend_from_slice(&[0xEE; 8]);
            }
        }
        let path = dir.join("model.safetensors");
        File::create(&path).and_then(|mut f| f.write_all(&data)).expect("write the fixture");
        let file = FilePlan { path: "model.safetensors".into(), tensors };
        let plan = LoadPlan {
            layout: Layout::SingleFile,
            components: vec![ComponentPlan {
                name: String::new(),
                sample_size: None,
                files: vec![file],
                variant: None,
            }],
        };
        (plan, vec![Arc::new(File::open(&path).expect("open the fixture"))], data)
    }

    type Pool = Arc<StagingPool<Buffer, mpsc::Receiver<()>>>;

    /// The staged read of `plan` through `engine` and `pool` on `threads` threads.
    fn read<E: GroupViews<Buffer = Buffer, Fence = mpsc::Receiver<()>> + Clone + 'static>(
        engine: &E,
        pool: &Pool,
        plan: &LoadPlan,
        files: &[Arc<dyn ReadAt>],
        (cancel, threads): (&CancellationToken, usize),
        on_progress: impl FnMut(u64, &str) + Send,
    ) -> Result<Box<dyn Placed>, ReadFailed>
    where
        E::Allocation: 'static,
    {
        let placement = StagedPlacement::new(Arc::new(engine.clone()), pool.clone(), "fake:0".into());
        let options = ReadOptions { threads, cancel, interval: Duration::from_millis(1), chunk_bytes: None };
        read_into(&placement, plan, files, options, on_progress)
    }

    fn finish(placed: Box<dyn Placed>) -> Vec<PlacedTensor> {
        placed.finish(0, Duration::from_millis(1)).expect("finish").0
    }

    #[test]
    fn groups_follow_dtype_runs_contiguity_and_the_size_cap() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (f32, bf16) = (DType::F32, DType::BF16);
        let (plan, _, _) = fixture(dir.path(), &[f32, f32, bf16, bf16, bf16, f32], &[4, 4, 8, 8, 8, 2], Some(3));
        let g = groups(&plan, 40, 1, |_| 0);
        let summary: Vec<(DType, u64, u64, Vec<&str>)> =
            g.iter().map(|g| (g.dtype, g.start, g.len, g.members.iter().map(|m| m.name.as_str()).collect())).collect();
        assert_eq!(
            summary,
            vec![
                (f32, 0, 32, vec!["t0000", "t0001"]),
                (bf16, 32, 32, vec!["t0002", "t0003"]), // the gap after t0003 ends the run
                (bf16, 72, 16, vec!["t0004"]),
                (f32, 88, 8, vec!["t0005"]),
            ]
        );
        // The cap splits a long run.
        let capped = groups(&plan, 16, 1, |_| 0);
        assert_eq!(capped.iter().map(|g| g.members.len()).collect::<Vec<_>>(), vec![1, 1, 1, 1, 1, 1]);
        assert_eq!(g[1].members[1].at, 16);
    }

    /// With an alignment, a tensor after one whose end is not aligned starts a group of its own,
    /// so every member starts aligned from its group's start; aligned runs stay one group.
    #[test]
    fn groups_keep_every_member_aligned() {
        let dir = tempfile::tempdir().expect("temp dir");
        // F16 elements: 640 B (a 320-channel bias), 256 B, 512 B, 2 B, 256 B.
        let (plan, _, _) = fixture(dir.path(), &[DType::F16; 5], &[320, 128, 256, 1, 128], None);
        let g = groups(&plan, GROUP_BYTES, 256, |_| 0);
        let members: Vec<Vec<(&str, u64)>> =
            g.iter().map(|g| g.members.iter().map(|m| (m.name.as_str(), m.at)).collect()).collect();
        assert_eq!(
            members,
            vec![
                vec![("t0000", 0)], // 640 B: the next tensor would be at 640
                vec![("t0001", 0), ("t0002", 256), ("t0003", 768)],
                vec![("t0004", 0)], // after 770 B
            ]
        );
        assert!(g.iter().flat_map(|g| &g.members).all(|m| m.at.is_multiple_of(256)));
        // Without one, the same tensors are one run.
        assert_eq!(groups(&plan, GROUP_BYTES, 1, |_| 0).len(), 1);
    }

    #[test]
    fn chunks_cover_every_byte_once_and_never_cross_a_group() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (plan, _, _) = fixture(dir.path(), &[DType::U8, DType::F32, DType::U8], &[100, 7, 33], None);
        let g = groups(&plan, GROUP_BYTES, 1, |_| 0);
        // Each chunk as (its first byte in the load, its length), checked to tile every group.
        let tiles = |c: &[Chunk]| -> Vec<(u64, usize)> {
            let mut out = Vec::new();
            let mut base = 0;
            for (group, g) in g.iter().enumerate() {
                let mut end = 0;
                for chunk in c.iter().filter(|c| c.group == group) {
                    assert_eq!(chunk.offset, end, "chunks of a group are contiguous, in order");
                    assert!(chunk.len > 0);
                    assert!(chunk.len.is_multiple_of(g.dtype.size_in_bytes()), "a chunk splits an element");
                    out.push((base + chunk.offset, chunk.len));
                    end += chunk.len as u64;
                }
                assert_eq!(end, g.len);
                base += g.len;
            }
            out
        };
        let plain = chunks(&g, Chunking { chunk: 16, edge_chunk: 16, edge: 0 });
        assert!(tiles(&plain).iter().all(|&(_, len)| len <= 16));
        assert_eq!(plain.len(), 7 + 2 + 3);

        // The first and last 24 of the 161 bytes in pieces of at most 4 bytes (the F32 group's
        // last piece is one whole element), the middle in pieces of up to 16 that stop where
        // the tail begins.
        let edged = tiles(&chunks(&g, Chunking { chunk: 16, edge_chunk: 4, edge: 24 }));
        for &(at, len) in &edged {
            let end = at + len as u64;
            if !(24..161 - 24).contains(&at) {
                assert!(len <= 4, "edge chunk at {at} of {len} bytes");
            } else {
                assert!(len <= 16 && end <= 161 - 24, "middle chunk at {at} of {len} bytes");
            }
        }
        assert!(edged.iter().filter(|&&(at, _)| at < 24).count() >= 6);
        assert!(edged.iter().filter(|&&(at, _)| at >= 161 - 24).count() >= 6);
    }

    /// Many chunks, few buffers, copies completing late and out of order: every tensor ends up
    /// with exactly its file bytes, every buffer is back in the pool, every copy waited for, and
    /// only one thread called the device.
    #[test]
    fn staged_reads_land_every_byte_with_buffers_reused_only_after_their_copy() {
        let dir = tempfile::tempdir().expect("temp dir");
        let dtypes: Vec<DType> = (0..300).map(|i| [DType::F32, DType::BF16, DType::U8][i % 7 % 3]).collect();
        let sizes: Vec<usize> = (0..300).map(|i| 1 + (i * 37) % 700).collect();
        let (plan, files, data) = fixture(dir.path(), &dtypes, &sizes, Some(150));
        for (seed, threads, buffers) in [(1, 4, 3), (7, 8, 2), (42, 1, 1), (99, 3, 16)] {
            let engine = LateCopies::new(seed);
            let pool = engine.pool(buffers, 512);
            let cancel = CancellationToken::new();
            let mut reports = Vec::new();
            let staged = read(&engine, &pool, &plan, &files, (&cancel, threads), |done, _| reports.push(done));
            let tensors = finish(staged.map_err(|e| e.error).expect("staged read"));
            assert_eq!(pool.idle(), buffers, "every buffer came back");
            assert_eq!(engine.in_flight.load(Ordering::SeqCst), 0);
            // Readers that call the device contend for its driver's locks (see the module doc).
            assert_eq!(engine.callers.lock().expect("callers").len(), 1, "one thread queued and waited for copies");
            assert!(engine.copies.load(Ordering::Relaxed) >= plan.read_bytes() as usize / 512);
            assert_eq!(tensors.len(), 300);
            for t in &tensors {
                let planned = plan.components[0].files[0].tensors.iter().find(|p| p.name == t.name).expect("planned");
                assert_eq!(t.data.dtype(), planned.dtype);
                assert_eq!(t.data.shape(), planned.shape.as_slice());
                let file_bytes = &data[planned.offset as usize..(planned.offset + planned.len) as usize];
                let bytes = t.data.bytes().expect("bytes");
                assert!(bytes.as_ref() == file_bytes, "{} differs from the file (seed {seed})", t.name);
            }
            assert_eq!(reports.last(), Some(&plan.read_bytes()));
            assert!(reports.windows(2).all(|w| w[0] <= w[1]), "progress never goes back");
        }
    }

    /// A device with no room: every allocation fails.
    #[derive(Clone)]
    struct NoRoom(LateCopies);
    impl CopyEngine for NoRoom {
        type Buffer = Buffer;
        type Fence = mpsc::Receiver<()>;
        type Allocation = Tensor;
        fn allocate(&self, _: DType, _: usize) -> Result<Self::Allocation, DeviceError> {
            Err(DeviceError::Refused("out of memory".into()))
        }
        fn copy(&self, f: &Buffer, l: usize, t: &Self::Allocation, o: usize) -> Result<Self::Fence, DeviceError> {
            self.0.copy(f, l, t, o)
        }
        fn wait(&self, f: Self::Fence) -> Result<(), DeviceError> {
            self.0.wait(f)
        }
        fn is_done(&self, f: &Self::Fence) -> Result<bool, DeviceError> {
            self.0.is_done(f)
        }
        fn synchronize(&self) -> Result<(), DeviceError> {
            self.0.synchronize()
        }
        fn tensor_of(&self, a: &Self::Allocation, d: DType, e: usize) -> Result<Tensor, DeviceError> {
            self.0.tensor_of(a, d, e)
        }
    }
    impl GroupViews for NoRoom {
        fn views(&self, a: &Tensor, g: &Group, into: &mut Vec<PlacedTensor>) -> Result<(), DeviceError> {
            candle_views(self, a, g, into)
        }
    }

    /// A load split over two fake GPUs, each its own engine, pool and placement: one pass over
    /// the file fills both, every tensor has its file bytes and comes back in the load's order,
    /// and each device received exactly the bytes its share of the map says (balanced, or as an
    /// explicit map puts them).
    #[test]
    fn a_split_load_fills_two_devices_from_one_pass() {
        use resource_manager::{DeviceId, Layout, Target};

        use crate::{device_map::DeviceMap, split::DevicesPlacement};

        let dir = tempfile::tempdir().expect("temp dir");
        let dtypes: Vec<DType> = (0..120).map(|i| [DType::F32, DType::BF16, DType::U8][i % 5 % 3]).collect();
        let sizes: Vec<usize> = (0..120).map(|i| 1 + (i * 53) % 900).collect();
        let (plan, files, data) = fixture(dir.path(), &dtypes, &sizes, Some(60));
        let target = Target::new(vec![DeviceId::Cuda(0), DeviceId::Cuda(1)], Layout::Split).expect("target");
        let explicit = vec![("t0007".to_string(), DeviceId::Cuda(1)), (String::new(), DeviceId::Cuda(0))];
        for (seed, map) in [(3, None), (11, Some(explicit.as_slice()))] {
            let map = DeviceMap::new(&plan, &target, None, map).expect("map");
            let engines = [LateCopies::new(seed), LateCopies::new(seed + 1)];
            let pools = [engines[0].pool(3, 512), engines[1].pool(2, 256)];
            let devices = (0..2)
                .map(|d| {
                    let placement =
                        StagedPlacement::new(Arc::new(engines[d].clone()), pools[d].clone(), format!("fake:{d}"));
                    (target.devices()[d], Arc::new(placement) as Arc<dyn Placement>)
                })
                .collect();
            let split = DevicesPlacement::split(devices, &map).expect("split placement");
            let cancel = CancellationToken::new();
            let options =
                ReadOptions { threads: 3, cancel: &cancel, interval: Duration::from_millis(1), chunk_bytes: None };
            let placed = read_into(&split, &plan, &files, options, |_, _| {}).map_err(|e| e.error).expect("split read");
            let (tensors, detail) = placed.finish(plan.read_bytes(), Duration::from_millis(1)).expect("finish");
            assert!(detail.starts_with("cuda:0: ") && detail.contains("; cuda:1: "), "{detail}");
            let planned = &plan.components[0].files[0].tensors;
            assert_eq!(
                tensors.iter().map(|t| t.name.as_str()).collect::<Vec<_>>(),
                planned.iter().map(|p| p.name.as_str()).collect::<Vec<_>>()
            );
            for (i, (t, p)) in tensors.iter().zip(planned).enumerate() {
                let file_bytes = &data[p.offset as usize..(p.offset + p.len) as usize];
                assert!(t.data.bytes().expect("bytes").as_ref() == file_bytes, "{} differs (seed {seed})", t.name);
                assert_eq!(map.devices_of(i), &[target.devices()[t.device]], "{} on its device", t.name);
            }
            // Step 7 over both devices: each converts its own floats; order and devices stay.
            let mut converted = tensors;
            let floats = converted.iter().filter(|t| t.data.dtype() == DType::F32).count();
            let n = split.convert(&mut converted, DType::BF16, &cancel, "cuda:0,cuda:1").expect("convert");
            assert_eq!(n, floats);
            for (i, (t, p)) in converted.iter().zip(planned).enumerate() {
                assert_eq!((t.name.as_str(), map.devices_of(i)), (p.name.as_str(), &[target.devices()[t.device]][..]));
                let want = if p.dtype == DType::F32 { DType::BF16 } else { p.dtype };
                assert_eq!(t.data.dtype(), want, "{}", t.name);
            }
            let shares: Vec<u64> = map.bytes().map(|(_, b)| b).collect();
            let copied: Vec<u64> = engines.iter().map(|e| e.copied.load(Ordering::Relaxed) as u64).collect();
            assert_eq!(copied, shares, "each device got its share (seed {seed})");
            assert!(shares.iter().all(|&b| b > 0), "{shares:?}");
            assert_eq!((pools[0].idle(), pools[1].idle()), (3, 2), "every buffer came back");
        }

        // The second device has no room: the load fails with its error, nothing hangs, and the
        // first device's buffers come back.
        let map = DeviceMap::new(&plan, &target, None, None).expect("map");
        let (first, full) = (LateCopies::new(5), NoRoom(LateCopies::new(6)));
        let pools = [first.pool(2, 512), full.0.pool(2, 512)];
        let devices: Vec<(DeviceId, Arc<dyn Placement>)> = vec![
            (
                DeviceId::Cuda(0),
                Arc::new(StagedPlacement::new(Arc::new(first.clone()), pools[0].clone(), "fake:0".into())),
            ),
            (DeviceId::Cuda(1), Arc::new(StagedPlacement::new(Arc::new(full), pools[1].clone(), "fake:1".into()))),
        ];
        let split = DevicesPlacement::split(devices, &map).expect("split placement");
        let cancel = CancellationToken::new();
        let options =
            ReadOptions { threads: 3, cancel: &cancel, interval: Duration::from_millis(1), chunk_bytes: None };
        let failed = read_into(&split, &plan, &files, options, |_, _| {}).map(|_| ()).expect_err("no room on fake:1");
        assert!(
            failed.error.to_string().contains("fake:1") && failed.error.to_string().contains("out of memory"),
            "{}",
            failed.error
        );
        first.synchronize().expect("synchronize");
        assert_eq!((pools[0].idle(), pools[1].idle()), (2, 2), "every buffer came back");
    }

    /// A file that counts the bytes read from it.
    struct CountedReads(Arc<dyn ReadAt>, AtomicUsize);

    impl ReadAt for CountedReads {
        fn size(&self) -> std::io::Result<u64> {
            self.0.size()
        }

        fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
            self.1.fetch_add(buf.len(), Ordering::SeqCst);
            self.0.read_exact_at(buf, offset)
        }
    }

    /// 90 tensors of three dtypes in a file that counts the bytes read from it.
    fn counted_fixture(dir: &std::path::Path) -> (LoadPlan, Arc<CountedReads>, Vec<u8>) {
        let dtypes: Vec<DType> = (0..90).map(|i| [DType::F32, DType::BF16, DType::U8][i % 4 % 3]).collect();
        let sizes: Vec<usize> = (0..90).map(|i| 1 + (i * 71) % 800).collect();
        let (plan, files, data) = fixture(dir, &dtypes, &sizes, Some(30));
        (plan, Arc::new(CountedReads(files[0].clone(), AtomicUsize::new(0))), data)
    }

    /// Replicas on two fake GPUs: every byte is read from the file once and lands on both, each
    /// device gets the whole model through its own engine, every tensor comes back once per
    /// device with its file's bytes, and every buffer of both pools returns.
    #[test]
    fn replicas_read_each_byte_once_and_fill_every_device() {
        use resource_manager::DeviceId;

        use crate::split::DevicesPlacement;

        let dir = tempfile::tempdir().expect("temp dir");
        let (plan, counted, data) = counted_fixture(dir.path());
        let files: Vec<Arc<dyn ReadAt>> = vec![counted.clone()];
        let engines = [LateCopies::new(21), LateCopies::new(22)];
        let pools = [engines[0].pool(3, 512), engines[1].pool(2, 512)];
        let devices = (0..2)
            .map(|d| {
                let placement =
                    StagedPlacement::new(Arc::new(engines[d].clone()), pools[d].clone(), format!("fake:{d}"));
                (DeviceId::Cuda(d), Arc::new(placement) as Arc<dyn Placement>)
            })
            .collect();
        let replicas = DevicesPlacement::replicate(devices).expect("replicas");
        let cancel = CancellationToken::new();
        let options =
            ReadOptions { threads: 3, cancel: &cancel, interval: Duration::from_millis(1), chunk_bytes: None };
        let placed = read_into(&replicas, &plan, &files, options, |_, _| {}).map_err(|e| e.error).expect("replicas");
        let (tensors, _) = placed.finish(plan.read_bytes(), Duration::from_millis(1)).expect("finish");
        assert_eq!(counted.1.load(Ordering::SeqCst) as u64, plan.read_bytes(), "each byte read once");
        let copied: Vec<u64> = engines.iter().map(|e| e.copied.load(Ordering::Relaxed) as u64).collect();
        assert_eq!(copied, [plan.read_bytes(); 2], "each device got the whole model");
        let planned = &plan.components[0].files[0].tensors;
        assert_eq!(tensors.len(), 2 * planned.len());
        for (i, t) in tensors.iter().enumerate() {
            let p = &planned[i % planned.len()];
            assert_eq!((t.name.as_str(), t.device), (p.name.as_str(), i / planned.len()));
            let file_bytes = &data[p.offset as usize..(p.offset + p.len) as usize];
            assert!(t.data.bytes().expect("bytes").as_ref() == file_bytes, "{} on device {}", t.name, t.device);
        }
        assert_eq!((pools[0].idle(), pools[1].idle()), (3, 2), "every buffer came back");
    }

    /// Replicas on three fake GPUs through one staged placement: each byte is read from the
    /// file once and copied from the host once, to the first device; the others get every byte
    /// from the device before them (a copy queued before its bytes landed there would copy
    /// unwritten bytes, and the comparison below would fail); every tensor comes back once per
    /// device with its file's bytes, and every buffer returns. A failing link fails the load with
    /// the device's name, and nothing hangs.
    #[test]
    fn replicas_fan_out_device_to_device_after_one_host_copy() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (plan, counted, data) = counted_fixture(dir.path());
        let files: Vec<Arc<dyn ReadAt>> = vec![counted.clone()];
        let planned = &plan.components[0].files[0].tensors;
        for (seed, buffers, threads) in [(31, 3, 3), (32, 1, 2), (33, 8, 4)] {
            counted.1.store(0, Ordering::SeqCst);
            let engines = [LateCopies::new(seed), LateCopies::new(seed + 100), LateCopies::new(seed + 200)];
            let pool = engines[0].pool(buffers, 512);
            let replicas = (1..3).map(|d| (Arc::new(engines[d].clone()), format!("fake:{d}"))).collect();
            let placement = StagedPlacement::new(Arc::new(engines[0].clone()), pool.clone(), "fake:0".into())
                .with_replicas(replicas);
            let cancel = CancellationToken::new();
            let options =
                ReadOptions { threads, cancel: &cancel, interval: Duration::from_millis(1), chunk_bytes: None };
            let placed =
                read_into(&placement, &plan, &files, options, |_, _| {}).map_err(|e| e.error).expect("replicas");
            let detail = placed.read_detail(plan.read_bytes(), Duration::from_millis(1), threads);
            assert!(detail.contains("device to device to fake:1, fake:2"), "{detail}");
            let (tensors, _) = placed.finish(plan.read_bytes(), Duration::from_millis(1)).expect("finish");
            let total = plan.read_bytes() as usize;
            assert_eq!(counted.1.load(Ordering::SeqCst), total, "each byte read once");
            let from_host: Vec<usize> = engines.iter().map(|e| e.copied.load(Ordering::Relaxed)).collect();
            let from_peers: Vec<usize> = engines.iter().map(|e| e.from_peers.load(Ordering::Relaxed)).collect();
            assert_eq!((from_host, from_peers), (vec![total, 0, 0], vec![0, total, total]), "seed {seed}");
            assert_eq!(tensors.len(), 3 * planned.len());
            for (i, t) in tensors.iter().enumerate() {
                let p = &planned[i % planned.len()];
                assert_eq!((t.name.as_str(), t.device), (p.name.as_str(), i / planned.len()));
                let file_bytes = &data[p.offset as usize..(p.offset + p.len) as usize];
                assert!(t.data.bytes().expect("bytes").as_ref() == file_bytes, "{} on device {}", t.name, t.device);
            }
            assert_eq!(pool.idle(), buffers, "every buffer came back");
        }

        let mut broken = LateCopies::new(40);
        broken.no_peer_link = true;
        let (first, second) = (LateCopies::new(41), LateCopies::new(42));
        let pool = first.pool(2, 512);
        let replicas = vec![(Arc::new(second.clone()), "fake:1".to_string()), (Arc::new(broken), "fake:2".into())];
        let placement =
            StagedPlacement::new(Arc::new(first.clone()), pool.clone(), "fake:0".into()).with_replicas(replicas);
        let cancel = CancellationToken::new();
        let options =
            ReadOptions { threads: 3, cancel: &cancel, interval: Duration::from_millis(1), chunk_bytes: None };
        let failed = read_into(&placement, &plan, &files, options, |_, _| {}).map(|_| ()).expect_err("no link");
        let message = failed.error.to_string();
        assert!(message.contains("fake:2") && message.contains("no link to the peer"), "{message}");
        for engine in [&first, &second] {
            engine.synchronize().expect("synchronize");
        }
        assert_eq!(pool.idle(), 2, "every buffer came back");
    }

    /// Groups never span two devices.
    #[test]
    fn groups_end_where_the_device_changes() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (plan, _, _) = fixture(dir.path(), &[DType::F32; 6], &[4; 6], None);
        let g = groups(&plan, GROUP_BYTES, 1, |i| usize::from((2..5).contains(&i)));
        let summary: Vec<(usize, usize)> = g.iter().map(|g| (g.device, g.members.len())).collect();
        assert_eq!(summary, vec![(0, 2), (1, 3), (0, 1)]);
    }

    #[test]
    fn a_cancel_stops_between_chunks_and_returns_every_buffer() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (plan, files, _) = fixture(dir.path(), &[DType::U8; 64], &[4096; 64], None);
        let engine = LateCopies::new(3);
        let pool = engine.pool(4, 1024);
        let cancel = CancellationToken::new();
        let total = plan.read_bytes();
        let mut cancelled_at = None;
        let result = read(&engine, &pool, &plan, &files, (&cancel, 3), |done, _| {
            if done > 0 && cancelled_at.is_none() {
                cancel.cancel();
                cancelled_at = Some(done);
            }
        });
        assert!(matches!(result, Err(ReadFailed { error: Error::Cancelled, .. })), "{:?}", result.err());
        let copied = engine.copies.load(Ordering::Relaxed) as u64 * 1024;
        assert!(copied < total / 2, "stopped early: {copied} of {total} bytes copied");
        engine.synchronize().expect("synchronize");
        assert_eq!(pool.idle(), 4, "every buffer came back");

        // Cancelled before the first chunk: nothing is read or copied.
        let engine = LateCopies::new(4);
        let pool = engine.pool(4, 1024);
        let cancel = CancellationToken::new();
        cancel.cancel();
        let result = read(&engine, &pool, &plan, &files, (&cancel, 3), |_, _| {});
        assert!(matches!(result, Err(ReadFailed { error: Error::Cancelled, .. })));
        assert_eq!(engine.copies.load(Ordering::Relaxed), 0);
        assert_eq!(pool.idle(), 4);
    }

    /// A file shorter than its plan fails as corrupt; a device that cannot allocate fails before
    /// copying anything.
    #[test]
    fn truncated_files_and_failed_allocations_are_errors() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (mut plan, _, _) = fixture(dir.path(), &[DType::F32; 4], &[1000; 4], None);
        plan.components[0].files[0].tensors[3].len += 4;
        plan.components[0].files[0].tensors[3].shape = vec![1001];
        let files: Vec<Arc<dyn ReadAt>> =
            vec![Arc::new(File::open(dir.path().join("model.safetensors")).expect("open"))];
        let engine = LateCopies::new(5);
        let pool = engine.pool(2, 4096);
        let cancel = CancellationToken::new();
        let result = read(&engine, &pool, &plan, &files, (&cancel, 2), |_, _| {});
        assert!(matches!(result, Err(ReadFailed { error: Error::Corrupt { .. }, .. })), "{:?}", result.err());
        engine.synchronize().expect("synchronize");
        assert_eq!(pool.idle(), 2);

        let engine = NoRoom(LateCopies::new(6));
        let pool = engine.0.pool(2, 4096);
        let result = read(&engine, &pool, &plan, &files, (&cancel, 2), |_, _| {});
        let error = result.err().map(|e| e.error);
        assert!(matches!(&error, Some(Error::Place { source, .. }) if source.to_string() == "out of memory"));
        assert_eq!(engine.0.copies.load(Ordering::Relaxed), 0);
    }
}
