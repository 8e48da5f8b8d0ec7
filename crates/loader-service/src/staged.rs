//! Step 4 onto a GPU: the files are read straight into pinned staging buffers by several threads
//! and each full buffer is copied to the device asynchronously while the next ones are read, so
//! the page cache, the disk and the host→device link all stay busy. No pageable copy, no pinned
//! allocation per load (the pool is the server's, see `resource_manager::staging`).
//!
//! The readers only read: one copying thread makes every call to the device while they do. It
//! queues each filled buffer's copy and gives the buffer back to the pool once that copy has
//! completed. Readers that queued their own copies and waited for their own buffers contended
//! for the driver's locks, and where the cores are busy a preempted lock holder stalls them all.
//! The copying thread polls rather than blocks while copies are in flight: both choices were
//! measured against the machine's limit, idle and with every core busy
//! (docs/benchmarks/design-choices.md).
//!
//! Layout on the device: tensors that lie back to back in a file with one dtype form a *group*
//! (at most [`GROUP_BYTES`]) with one device allocation mirroring those file bytes, so every
//! chunk is one copy and a checkpoint of thousands of small tensors moves in the same few large
//! copies as a dense one. Each tensor is a view into its group; a group's memory is freed when
//! its last view is (converting every tensor of a group to another dtype frees it, and a group
//! caps what a conversion holds twice). The views are made by the allocating thread while the
//! readers read (they are only shapes over memory not written yet, handed out after the copies
//! complete), so the milliseconds a checkpoint of thousands of tensors spends on them do not
//! follow the last copy (docs/benchmarks/design-choices.md).

use std::{
    collections::VecDeque,
    fs::File,
    os::unix::fs::FileExt,
    sync::{
        Condvar, Mutex, OnceLock,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        mpsc,
    },
    time::Duration,
};

use candle_core::DType;
use resource_manager::{
    staging::{CopyEngine, Lease, MIN_CHUNK_BYTES, StagingPool, chunk_bytes},
    sync,
};
use tokio_util::sync::CancellationToken;

use crate::{
    error::LoadError,
    header::TensorPlan,
    plan::LoadPlan,
    read::{self, ReadTensor},
    request::ModelId,
};

/// The most bytes one device allocation holds: few allocations for a large model, and a bound on
/// the memory a dtype conversion holds twice (a group is freed once all its tensors are converted).
pub const GROUP_BYTES: u64 = 256 * 1024 * 1024;

/// Tensors back to back in one file with one dtype, read into one device allocation.
#[derive(Debug, Clone)]
struct Group<'a> {
    file: usize,
    dtype: DType,
    /// Its first byte in the file.
    start: u64,
    len: u64,
    members: Vec<Member<'a>>,
}

#[derive(Debug, Clone)]
struct Member<'a> {
    component: usize,
    tensor: &'a TensorPlan,
    /// Bytes from the start of the group.
    at: u64,
}

/// A part of a group read into one staging buffer and copied in one go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Chunk {
    group: usize,
    /// Bytes from the start of the group.
    offset: u64,
    len: usize,
}

/// The plan's tensors in groups, in file order; files are numbered as `LoadPlan::files` yields them.
fn groups(plan: &LoadPlan, max_bytes: u64) -> Vec<Group<'_>> {
    let mut groups: Vec<Group> = Vec::new();
    let files =
        plan.components.iter().enumerate().flat_map(|(c, component)| component.files.iter().map(move |f| (c, f)));
    for (file, (component, plan)) in files.enumerate() {
        let first_of_file = groups.len();
        for tensor in &plan.tensors {
            let joins = groups[first_of_file..].last().is_some_and(|g: &Group| {
                g.dtype == tensor.dtype && g.start + g.len == tensor.offset && g.len + tensor.len <= max_bytes
            });
            if !joins {
                groups.push(Group { file, dtype: tensor.dtype, start: tensor.offset, len: 0, members: Vec::new() });
            }
            let group = groups.last_mut().expect("pushed above");
            group.members.push(Member { component, tensor, at: group.len });
            group.len += tensor.len;
        }
    }
    groups
}

/// Every byte of every group, in file order, in chunks of at most `chunk_bytes`, except the first
/// and the last `edge` bytes of the load, in chunks of at most `edge_chunk`: the link idles until
/// the first reads complete and after the last copies are queued, so the first and last reads
/// are kept short (at the end, every reader's last copy is queued at about the same time).
fn chunks(groups: &[Group], chunk_bytes: usize, edge_chunk: usize, edge: u64) -> Vec<Chunk> {
    let total: u64 = groups.iter().map(|g| g.len).sum();
    let tail_from = total.saturating_sub(edge);
    let mut chunks = Vec::new();
    let mut base = 0;
    for (group, g) in groups.iter().enumerate() {
        let mut offset = 0;
        while offset < g.len {
            let at = base + offset;
            let most =
                if at < edge || at >= tail_from { edge_chunk as u64 } else { (chunk_bytes as u64).min(tail_from - at) };
            // Whole elements, so a copy never splits one (at least one element each).
            let (rest, size) = (g.len - offset, g.dtype.size_in_bytes() as u64);
            let len = if most >= rest { rest } else { (most / size * size).max(size) };
            chunks.push(Chunk { group, offset, len: len as usize });
            offset += len;
        }
        base += g.len;
    }
    chunks
}

/// What step 4 leaves on the device: the groups' allocations, their copies possibly still in
/// flight, and every tensor as a view into its group (not to be read before [`Staged::finish`]).
pub struct Staged<A> {
    allocations: Vec<A>,
    tensors: Vec<ReadTensor>,
    /// How long the device allocations took (while the first chunks were read).
    pub allocated_in: Duration,
}

/// Where a load goes and what it reports: the parts of step 4 that are not the device.
pub struct Target<'a> {
    pub id: &'a ModelId,
    /// The device's name, for errors.
    pub device: &'a str,
    pub threads: usize,
    pub cancel: &'a CancellationToken,
    /// How often `on_progress` is called while reading.
    pub interval: Duration,
}

impl Target<'_> {
    fn place_error(&self, reason: String) -> LoadError {
        LoadError::PlaceOnDevice { model_id: self.id.to_string(), device: self.device.to_owned(), reason }
    }

    fn cancelled(&self) -> LoadError {
        LoadError::Cancelled { model_id: self.id.to_string() }
    }
}

/// Allocates the device memory of every group (on a thread of its own, ahead of the readers), then
/// makes every tensor a view into its group on that thread, and reads every chunk into a staging
/// buffer from `pool` on `target.threads` threads, whose copies a copying thread queues once
/// their group is allocated. `on_progress(done, file)` is called from this thread about every
/// `target.interval` and once at the end, `done` counting the bytes whose copy was queued. On an
/// error or a cancel, the device memory is dropped here (frees are ordered after the copies in
/// flight).
pub fn read<E: CopyEngine>(
    engine: &E,
    pool: &StagingPool<E::Buffer, E::Fence>,
    plan: &LoadPlan,
    files: &[File],
    target: &Target,
    mut on_progress: impl FnMut(u64, &str),
) -> Result<Staged<E::Allocation>, LoadError> {
    // Whatever is allocated is dropped on this thread if the load fails.
    engine.prepare_free();
    let file_names: Vec<&str> = plan.files().map(|f| f.display.as_str()).collect();
    let groups = groups(plan, GROUP_BYTES);
    for g in &groups {
        if !read::supported(g.dtype) {
            let member = g.members.first().map_or("", |m| m.tensor.name.as_str());
            return Err(read::unsupported_dtype(target.id, file_names[g.file], member, g.dtype));
        }
    }
    let chunk = chunk_bytes(plan.read_bytes(), target.threads, pool.buffer_bytes());
    // The edges: one chunk per reader, the reads in flight when the first copy and the last one
    // are queued.
    let edge = (target.threads * chunk) as u64;
    let chunks = chunks(&groups, chunk, MIN_CHUNK_BYTES.min(chunk), edge);
    // Allocated in order on a thread of their own while the readers start: mapping gigabytes of
    // device memory takes milliseconds, which would otherwise come before the first read.
    let allocations: Vec<OnceLock<E::Allocation>> = groups.iter().map(|_| OnceLock::new()).collect();
    let allocated = (Mutex::new(()), Condvar::new());

    let next = AtomicUsize::new(0);
    let done = AtomicU64::new(0);
    let current_file = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let first_error: Mutex<Option<LoadError>> = Mutex::new(None);
    let fail = |e: LoadError| {
        failed.store(true, Ordering::Relaxed);
        sync::lock(&first_error).get_or_insert(e);
    };
    // Readers hand each filled buffer to the copying thread and never call the device themselves.
    let (filled, to_copy) = mpsc::channel::<(Lease<'_, E::Buffer, E::Fence>, &Chunk)>();
    let filled = Mutex::new(Some(filled));
    let worker = || {
        // This thread's end of the channel; the copying thread ends once every end is dropped.
        let Some(filled) = sync::lock(&filled).clone() else { return };
        while !failed.load(Ordering::Relaxed) {
            let Some(chunk) = chunks.get(next.fetch_add(1, Ordering::Relaxed)) else { return };
            let group = &groups[chunk.group];
            current_file.store(group.file, Ordering::Relaxed);
            let stop = || target.cancel.is_cancelled() || failed.load(Ordering::Relaxed);
            let Some(mut lease) = pool.take(stop) else {
                if target.cancel.is_cancelled() {
                    fail(target.cancelled());
                }
                return;
            };
            let buffer = match lease.fill(engine) {
                Ok(buffer) => &mut buffer[..chunk.len],
                Err(reason) => return fail(target.place_error(reason)),
            };
            if let Err(e) = files[group.file].read_exact_at(buffer, group.start + chunk.offset) {
                return fail(read::read_error(target.id, file_names[group.file], e));
            }
            // A cancel that came during the read stops before the copy.
            if target.cancel.is_cancelled() {
                return fail(target.cancelled());
            }
            if filled.send((lease, chunk)).is_err() {
                return fail(target.place_error("the copying thread stopped".into()));
            }
        }
    };
    // Queues each filled buffer's copy as soon as it arrives and gives a buffer back to the pool
    // as soon as its copy completed, polling both while copies are in flight (blocking on either
    // would leave a filled buffer unqueued, and the link idle, for up to a copy's time); it sleeps
    // only while nothing is in flight.
    let copier = || {
        let to_copy = to_copy;
        let mut in_flight = VecDeque::new();
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
            if let Some((mut lease, chunk)) = next {
                if failed.load(Ordering::Relaxed) {
                    continue;
                }
                let Some(to) = wait_for(&allocations[chunk.group], &allocated, &failed) else { continue };
                match lease.copy_to(engine, chunk.len, to, chunk.offset as usize) {
                    Ok(()) => {
                        done.fetch_add(chunk.len as u64, Ordering::Relaxed);
                        in_flight.push_back(lease);
                    }
                    Err(reason) => fail(target.place_error(reason)),
                }
                continue;
            }
            // Copies complete in the order they were queued.
            let before = in_flight.len();
            while let Some(oldest) = in_flight.front_mut() {
                match oldest.copied(engine) {
                    Ok(false) => break,
                    Ok(true) => drop(in_flight.pop_front()),
                    // Back to the pool with its fence, which the next borrower waits for.
                    Err(reason) => {
                        fail(target.place_error(reason));
                        drop(in_flight.pop_front());
                    }
                }
            }
            if in_flight.len() < before {
                continue;
            }
            if !in_flight.is_empty() {
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
    };
    let allocator = || {
        let started = std::time::Instant::now();
        for (g, slot) in groups.iter().zip(&allocations) {
            if failed.load(Ordering::Relaxed) {
                break;
            }
            match engine.allocate(g.dtype, device_elems(g)) {
                Ok(allocation) => {
                    let _ = slot.set(allocation);
                }
                Err(reason) => fail(target.place_error(reason)),
            }
            let _guard = sync::lock(&allocated.0);
            allocated.1.notify_all();
        }
        let allocated_in = started.elapsed();
        let mut tensors = Vec::with_capacity(groups.iter().map(|g| g.members.len()).sum());
        for (group, slot) in groups.iter().zip(&allocations) {
            let Some(allocation) = slot.get().filter(|_| !failed.load(Ordering::Relaxed)) else { break };
            if let Err(e) = views(engine, allocation, group, target, &mut tensors) {
                fail(e);
            }
        }
        (allocated_in, tensors)
    };
    on_progress(0, file_names.first().unwrap_or(&""));
    let (allocator, copier) = std::thread::scope(|scope| {
        let allocator = scope.spawn(allocator);
        let copier = scope.spawn(copier);
        {
            // Dropped when the readers are done (or one panicked): the copying thread then ends
            // once their last copies complete.
            let _close = Closes(&filled);
            read::in_parallel(target.threads.clamp(1, chunks.len().max(1)), target.interval, worker, || {
                on_progress(
                    done.load(Ordering::Relaxed),
                    file_names.get(current_file.load(Ordering::Relaxed)).unwrap_or(&""),
                )
            });
        }
        (allocator.join(), copier.join())
    });
    copier.map_err(|_| target.place_error("the copying thread panicked".into()))?;
    let (allocated_in, tensors) = allocator.map_err(|_| target.place_error("the allocating thread panicked".into()))?;
    if let Some(e) = sync::into_inner(first_error) {
        return Err(e);
    }
    on_progress(done.load(Ordering::Relaxed), file_names.last().unwrap_or(&""));
    let allocations = allocations.into_iter().map(OnceLock::into_inner).collect::<Option<Vec<_>>>();
    let allocations = allocations.ok_or_else(|| target.place_error("a group was never allocated".into()))?;
    Ok(Staged { allocations, tensors, allocated_in })
}

/// Drops what the mutex holds when dropped itself.
struct Closes<'a, T>(&'a Mutex<Option<T>>);

impl<T> Drop for Closes<'_, T> {
    fn drop(&mut self) {
        sync::lock(self.0).take();
    }
}

/// Every member of `group` as a view into its allocation, shaped as in its file.
fn views<E: CopyEngine>(
    engine: &E,
    allocation: &E::Allocation,
    group: &Group,
    target: &Target,
    into: &mut Vec<ReadTensor>,
) -> Result<(), LoadError> {
    let whole =
        engine.tensor_of(allocation, group.dtype, device_elems(group)).map_err(|reason| target.place_error(reason))?;
    let size = group.dtype.size_in_bytes() as u64;
    for m in &group.members {
        let t = m.tensor;
        let view = whole
            .narrow(0, (m.at / size) as usize, (t.len / size) as usize)
            .and_then(|v| v.reshape(t.shape.as_slice()))
            .map_err(|e| target.place_error(format!("tensor {}: {e}", t.name)))?;
        into.push(ReadTensor { component: m.component, name: t.name.clone(), tensor: view });
    }
    Ok(())
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
fn device_elems(g: &Group) -> usize {
    ((g.len as usize) / g.dtype.size_in_bytes()).max(1)
}

impl<A> Staged<A> {
    /// How many device allocations hold the groups.
    pub fn allocations(&self) -> usize {
        self.allocations.len()
    }

    /// Waits for the copies still in flight and hands out the tensors.
    pub fn finish<E: CopyEngine<Allocation = A>>(
        self,
        engine: &E,
        target: &Target,
    ) -> Result<Vec<ReadTensor>, LoadError> {
        engine.synchronize().map_err(|reason| target.place_error(reason))?;
        // The views share the allocations' memory: it lives as long as they do.
        drop(self.allocations);
        Ok(self.tensors)
    }
}

#[cfg(test)]
mod tests {
    use std::{collections::HashSet, io::Write, sync::Arc, thread::ThreadId};

    use candle_core::{Device, Tensor};

    use super::*;
    use crate::{
        header::TensorPlan,
        plan::{ComponentPlan, FilePlan, Layout},
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
        /// The threads that queued copies or waited for them.
        callers: Arc<Mutex<HashSet<ThreadId>>>,
    }

    struct Copy {
        from: Arc<Vec<u8>>,
        len: usize,
        to: Tensor,
        offset: usize,
        done: mpsc::Sender<()>,
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
                    let bytes = Tensor::from_raw_buffer(&from[..len], to.dtype(), &[len / size], &Device::Cpu);
                    bytes.and_then(|b| to.slice_set(&b, 0, offset / size)).expect("a copy into device memory");
                    drop(from);
                    marks.fetch_sub(1, Ordering::SeqCst);
                    let _ = done.send(());
                }
            });
            Self { queue, in_flight, copies: Arc::default(), callers: Arc::default() }
        }

        fn called(&self) {
            self.callers.lock().expect("callers").insert(std::thread::current().id());
        }

        fn pool(&self, count: usize, bytes: usize) -> StagingPool<Buffer, mpsc::Receiver<()>> {
            StagingPool::new((0..count).map(|_| Buffer(Arc::new(vec![0xAA; bytes]))).collect(), bytes)
        }
    }

    impl CopyEngine for LateCopies {
        type Buffer = Buffer;
        type Fence = mpsc::Receiver<()>;
        type Allocation = Tensor;

        fn allocate(&self, dtype: DType, elems: usize) -> Result<Self::Allocation, String> {
            // Bytes no file holds here, so a byte never copied shows.
            let unwritten = vec![0x55; elems * dtype.size_in_bytes()];
            Tensor::from_raw_buffer(&unwritten, dtype, &[elems], &Device::Cpu).map_err(|e| e.to_string())
        }

        fn copy(&self, from: &Buffer, len: usize, to: &Self::Allocation, offset: usize) -> Result<Self::Fence, String> {
            let size = to.dtype().size_in_bytes();
            assert!(offset + len <= to.elem_count() * size, "copy past the end of its allocation");
            assert!(offset.is_multiple_of(size) && len.is_multiple_of(size), "a copy splits an element");
            self.called();
            self.in_flight.fetch_add(1, Ordering::SeqCst);
            self.copies.fetch_add(1, Ordering::Relaxed);
            let (done, fence) = mpsc::channel();
            let copy = Copy { from: from.0.clone(), len, to: to.clone(), offset, done };
            self.queue.send(copy).map_err(|e| e.to_string())?;
            Ok(fence)
        }

        fn wait(&self, fence: Self::Fence) -> Result<(), String> {
            self.called();
            fence.recv().map_err(|e| e.to_string())
        }

        fn is_done(&self, fence: &Self::Fence) -> Result<bool, String> {
            self.called();
            match fence.try_recv() {
                Ok(()) => Ok(true),
                Err(mpsc::TryRecvError::Empty) => Ok(false),
                Err(e) => Err(e.to_string()),
            }
        }

        fn synchronize(&self) -> Result<(), String> {
            while self.in_flight.load(Ordering::SeqCst) > 0 {
                std::thread::sleep(Duration::from_micros(100));
            }
            Ok(())
        }

        fn tensor_of(&self, allocation: &Self::Allocation, dtype: DType, elems: usize) -> Result<Tensor, String> {
            assert_eq!((allocation.dtype(), allocation.elem_count()), (dtype, elems));
            Ok(allocation.clone())
        }
    }

    /// A file of tensors back to back (pseudo-random bytes) and its plan; `dtypes` one per tensor,
    /// `sizes` in elements; `gap_after` leaves 8 unplanned bytes after that tensor.
    fn fixture(
        dir: &std::path::Path,
        dtypes: &[DType],
        sizes: &[usize],
        gap_after: Option<usize>,
    ) -> (LoadPlan, Vec<File>, Vec<u8>) {
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
        let file = FilePlan { path: path.clone(), display: "model.safetensors".into(), tensors };
        let plan = LoadPlan {
            layout: Layout::SingleFile,
            components: vec![ComponentPlan { name: String::new(), config: None, files: vec![file], variant: None }],
        };
        (plan, vec![File::open(&path).expect("open the fixture")], data)
    }

    fn id() -> ModelId {
        ModelId::parse("test/staged").expect("an id")
    }

    fn target<'a>(id: &'a ModelId, cancel: &'a CancellationToken, threads: usize) -> Target<'a> {
        Target { id, device: "fake:0", threads, cancel, interval: Duration::from_millis(1) }
    }

    fn bytes_of(t: &Tensor) -> Vec<u8> {
        pipeline_manager::resident_bytes(t).expect("bytes")
    }

    #[test]
    fn groups_follow_dtype_runs_contiguity_and_the_size_cap() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (f32, bf16) = (DType::F32, DType::BF16);
        let (plan, _, _) = fixture(dir.path(), &[f32, f32, bf16, bf16, bf16, f32], &[4, 4, 8, 8, 8, 2], Some(3));
        let g = groups(&plan, 40);
        let summary: Vec<(DType, u64, u64, Vec<&str>)> = g
            .iter()
            .map(|g| (g.dtype, g.start, g.len, g.members.iter().map(|m| m.tensor.name.as_str()).collect()))
            .collect();
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
        let capped = groups(&plan, 16);
        assert_eq!(capped.iter().map(|g| g.members.len()).collect::<Vec<_>>(), vec![1, 1, 1, 1, 1, 1]);
        assert_eq!(g[1].members[1].at, 16);
    }

    #[test]
    fn chunks_cover_every_byte_once_and_never_cross_a_group() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (plan, _, _) = fixture(dir.path(), &[DType::U8, DType::F32, DType::U8], &[100, 7, 33], None);
        let g = groups(&plan, GROUP_BYTES);
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
        let plain = chunks(&g, 16, 16, 0);
        assert!(tiles(&plain).iter().all(|&(_, len)| len <= 16));
        assert_eq!(plain.len(), 7 + 2 + 3);

        // The first and last 24 of the 161 bytes in pieces of at most 4 bytes (the F32 group's
        // last piece is one whole element), the middle in pieces of up to 16 that stop where
        // the tail begins.
        let edged = tiles(&chunks(&g, 16, 4, 24));
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
            let (id, cancel) = (id(), CancellationToken::new());
            let target = target(&id, &cancel, threads);
            let mut reports = Vec::new();
            let staged =
                read(&engine, &pool, &plan, &files, &target, |done, _| reports.push(done)).expect("staged read");
            let tensors = staged.finish(&engine, &target).expect("finish");
            assert_eq!(pool.idle(), buffers, "every buffer came back");
            assert_eq!(engine.in_flight.load(Ordering::SeqCst), 0);
            // Readers that call the device contend for its driver's locks (see the module doc).
            assert_eq!(engine.callers.lock().expect("callers").len(), 1, "one thread queued and waited for copies");
            assert!(engine.copies.load(Ordering::Relaxed) >= plan.read_bytes() as usize / 512);
            assert_eq!(tensors.len(), 300);
            for t in &tensors {
                let planned = plan.components[0].files[0].tensors.iter().find(|p| p.name == t.name).expect("planned");
                assert_eq!(t.tensor.dtype(), planned.dtype);
                assert_eq!(t.tensor.dims(), planned.shape.as_slice());
                let file_bytes = &data[planned.offset as usize..(planned.offset + planned.len) as usize];
                assert!(bytes_of(&t.tensor) == file_bytes, "{} differs from the file (seed {seed})", t.name);
            }
            assert_eq!(reports.last(), Some(&plan.read_bytes()));
            assert!(reports.windows(2).all(|w| w[0] <= w[1]), "progress never goes back");
        }
    }

    #[test]
    fn a_cancel_stops_between_chunks_and_returns_every_buffer() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (plan, files, _) = fixture(dir.path(), &[DType::U8; 64], &[4096; 64], None);
        let engine = LateCopies::new(3);
        let pool = engine.pool(4, 1024);
        let (id, cancel) = (id(), CancellationToken::new());
        let target = target(&id, &cancel, 3);
        let total = plan.read_bytes();
        let mut cancelled_at = None;
        let result = read(&engine, &pool, &plan, &files, &target, |done, _| {
            if done > 0 && cancelled_at.is_none() {
                cancel.cancel();
                cancelled_at = Some(done);
            }
        });
        assert!(matches!(result, Err(LoadError::Cancelled { .. })), "{:?}", result.err());
        let copied = engine.copies.load(Ordering::Relaxed) as u64 * 1024;
        assert!(copied < total / 2, "stopped early: {copied} of {total} bytes copied");
        engine.synchronize().expect("synchronize");
        assert_eq!(pool.idle(), 4, "every buffer came back");

        // Cancelled before the first chunk: nothing is read or copied.
        let engine = LateCopies::new(4);
        let pool = engine.pool(4, 1024);
        let cancel = CancellationToken::new();
        cancel.cancel();
        let target = super::tests::target(&id, &cancel, 3);
        assert!(matches!(read(&engine, &pool, &plan, &files, &target, |_, _| {}), Err(LoadError::Cancelled { .. })));
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
        let files = vec![File::open(&plan.components[0].files[0].path).expect("open the fixture")];
        let engine = LateCopies::new(5);
        let pool = engine.pool(2, 4096);
        let (id, cancel) = (id(), CancellationToken::new());
        let result = read(&engine, &pool, &plan, &files, &target(&id, &cancel, 2), |_, _| {});
        assert!(matches!(result, Err(LoadError::Corrupt { .. })), "{:?}", result.err());
        engine.synchronize().expect("synchronize");
        assert_eq!(pool.idle(), 2);

        struct NoRoom(LateCopies);
        impl CopyEngine for NoRoom {
            type Buffer = Buffer;
            type Fence = mpsc::Receiver<()>;
            type Allocation = Tensor;
            fn allocate(&self, _: DType, _: usize) -> Result<Self::Allocation, String> {
                Err("out of memory".into())
            }
            fn copy(&self, f: &Buffer, l: usize, t: &Self::Allocation, o: usize) -> Result<Self::Fence, String> {
                self.0.copy(f, l, t, o)
            }
            fn wait(&self, f: Self::Fence) -> Result<(), String> {
                self.0.wait(f)
            }
            fn is_done(&self, f: &Self::Fence) -> Result<bool, String> {
                self.0.is_done(f)
            }
            fn synchronize(&self) -> Result<(), String> {
                self.0.synchronize()
            }
            fn tensor_of(&self, a: &Self::Allocation, d: DType, e: usize) -> Result<Tensor, String> {
                self.0.tensor_of(a, d, e)
            }
        }
        let engine = NoRoom(LateCopies::new(6));
        let pool = engine.0.pool(2, 4096);
        let result = read(&engine, &pool, &plan, &files, &target(&id, &cancel, 2), |_, _| {});
        assert!(matches!(&result, Err(LoadError::PlaceOnDevice { reason, .. }) if reason == "out of memory"));
        assert_eq!(engine.0.copies.load(Ordering::Relaxed), 0);
    }
}
