//! Step 4 (LOAD_WEIGHTS): reads every planned tensor into the load's [`Placement`] with
//! positioned reads of one chunk each, on a few threads, checking cancellation between chunks
//! and counting bytes for the progress bar (unless the placement maps the files as they are).
//! It never knows where the bytes land.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use candle_core::DType;
use resource_manager::sync;
use tokio_util::sync::CancellationToken;

use crate::{
    Error,
    files::ReadAt,
    placement::{self, Destination, GROUP_BYTES, Placed, Placement},
    plan::LoadPlan,
};

// Tensors are read as raw bytes into typed memory: the file is little-endian, so the host must be.
#[cfg(target_endian = "big")]
compile_error!("safetensors data is little-endian; this loader reads it in place and needs a little-endian host");

/// How a load reads.
#[derive(Debug, Clone, Copy)]
pub struct ReadOptions<'a> {
    pub threads: usize,
    pub cancel: &'a CancellationToken,
    /// How often progress is reported while reading.
    pub interval: Duration,
    /// Chunks of this many bytes (capped by [`Placement::max_chunk`]) instead of the placement's
    /// own choice: a remote store's requests.
    pub chunk_bytes: Option<usize>,
}

/// A read that failed, and what it had placed by then: the caller frees that when it suits it
/// (freeing gigabytes takes the kernel tens of milliseconds, which a cancel should not wait for).
pub struct ReadFailed {
    pub error: Error,
    pub placed: Option<Box<dyn Placed>>,
}

impl std::fmt::Debug for ReadFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadFailed").field("error", &self.error).field("placed", &self.placed.is_some()).finish()
    }
}

impl<E: Into<Error>> From<E> for ReadFailed {
    fn from(error: E) -> Self {
        Self { error: error.into(), placed: None }
    }
}

/// Reads every tensor of `plan` from `files` (numbered as [`LoadPlan::files`] yields them) into
/// `placement` on `options.threads` threads. `on_progress(done, file)` is called from this thread
/// about every `options.interval` while reading, and once at the end.
pub fn read(
    placement: &dyn Placement,
    plan: &LoadPlan,
    files: &[Arc<dyn ReadAt>],
    options: ReadOptions,
    on_progress: impl FnMut(u64, &str) + Send,
) -> Result<Box<dyn Placed>, ReadFailed> {
    let names: Vec<&str> = plan.files().map(|f| f.path.as_str()).collect();
    if let Some(mapped) = placement.map(plan, files) {
        let mut on_progress = on_progress;
        on_progress(plan.read_bytes(), names.last().copied().unwrap_or(""));
        return mapped.map_err(ReadFailed::from);
    }
    let groups = placement::groups(plan, GROUP_BYTES, placement.tensor_align(), |i| placement.device_of(i));
    if let Some(g) = groups.iter().find(|g| !supported(g.dtype)) {
        let tensor = g.members.first().map_or("", |m| m.name.as_str());
        return Err(unsupported_dtype(names[g.file], tensor, g.dtype).into());
    }
    let mut cut = placement.chunking(plan.read_bytes(), options.threads);
    if let Some(bytes) = options.chunk_bytes {
        cut.chunk = bytes.clamp(1, placement.max_chunk());
        cut.edge_chunk = cut.edge_chunk.min(cut.chunk);
    }
    let chunks = placement::chunks(&groups, cut);

    let next = AtomicUsize::new(0);
    let done = AtomicU64::new(0);
    let current_file = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let first_error: Mutex<Option<Error>> = Mutex::new(None);
    let fail = |e: Error| {
        failed.store(true, Ordering::Relaxed);
        sync::lock(&first_error).get_or_insert(e);
    };
    let on_progress = Mutex::new(on_progress);
    let report = || {
        let file = names.get(current_file.load(Ordering::Relaxed)).unwrap_or(&"");
        (sync::lock(&on_progress))(done.load(Ordering::Relaxed), file);
    };
    let worker = |destination: &dyn Destination| {
        while !failed.load(Ordering::Relaxed) {
            let index = next.fetch_add(1, Ordering::Relaxed);
            let Some(chunk) = chunks.get(index) else { return };
            let group = &groups[chunk.group];
            current_file.store(group.file, Ordering::Relaxed);
            let stop = || options.cancel.is_cancelled() || failed.load(Ordering::Relaxed);
            let mut read_chunk = |buffer: &mut [u8]| {
                files[group.file].read_exact_at(buffer, group.start + chunk.offset).map_err(|e| {
                    // A read the cancel ended (a remote request aborted) is the cancel.
                    if options.cancel.is_cancelled() { Error::Cancelled } else { Error::read(names[group.file], e) }
                })?;
                // A cancel that came during the read stops before the bytes go on.
                match options.cancel.is_cancelled() {
                    true => Err(Error::Cancelled),
                    false => Ok(()),
                }
            };
            match destination.fill(index, &stop, &mut read_chunk) {
                Ok(true) => {
                    done.fetch_add(chunk.len as u64, Ordering::Relaxed);
                }
                Ok(false) => {
                    if options.cancel.is_cancelled() {
                        fail(Error::Cancelled);
                    }
                    return;
                }
                Err(e) => return fail(e),
            }
        }
    };
    report();
    let readers = |destination: &dyn Destination| {
        let threads = options.threads.clamp(1, chunks.len().max(1));
        in_parallel(threads, options.interval, || worker(destination), report);
    };
    let placed = placement.place(&groups, &chunks, &readers);
    let error = sync::into_inner(first_error);
    match (placed, error) {
        (Ok(placed), None) => {
            report();
            Ok(placed)
        }
        (Ok(placed), Some(error)) => Err(ReadFailed { error, placed: Some(placed) }),
        (Err(placement), error) => Err(ReadFailed { error: error.unwrap_or(placement), placed: None }),
    }
}

/// Runs `worker` on `threads` threads while this thread calls `report` about every `interval`,
/// until every worker has returned. Workers wake the reporting thread when they stop, so a cancel
/// or an error ends the step at once instead of at the next tick.
pub fn in_parallel(threads: usize, interval: Duration, worker: impl Fn() + Sync, report: impl Fn()) {
    let reporter = std::thread::current();
    let running = AtomicUsize::new(threads);
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| {
                let _wake = WakeOnDrop(&reporter, &running);
                worker();
            });
        }
        while running.load(Ordering::Acquire) > 0 {
            report();
            std::thread::park_timeout(interval);
        }
    });
}

/// Counts a worker out and wakes the reporting thread, however the worker stops.
struct WakeOnDrop<'a>(&'a std::thread::Thread, &'a AtomicUsize);

impl Drop for WakeOnDrop<'_> {
    fn drop(&mut self) {
        self.1.fetch_sub(1, Ordering::Release);
        self.0.unpark();
    }
}

/// Whether tensors of this dtype can be read (the dtypes candle holds).
fn supported(dtype: DType) -> bool {
    matches!(
        dtype,
        DType::U8
            | DType::U32
            | DType::I16
            | DType::I32
            | DType::I64
            | DType::F16
            | DType::BF16
            | DType::F32
            | DType::F64
            | DType::F8E4M3
    )
}

fn unsupported_dtype(file: &str, tensor: &str, dtype: DType) -> Error {
    Error::UnsupportedDtype { file: file.to_owned(), tensor: tensor.to_owned(), dtype: format!("{dtype:?}") }
}

#[cfg(test)]
mod tests {
    use std::{fs::File, io::Write};

    use super::*;
    use crate::{
        HostPlacement,
        header::TensorPlan,
        plan::{ComponentPlan, FilePlan, Layout},
    };

    /// The threads fill chunks in any order; the tensors still come back in the plan's (file)
    /// order, with their bytes.
    #[test]
    fn tensors_come_back_in_plan_order() {
        let dir = tempfile::tempdir().expect("temp dir");
        let sizes: Vec<usize> = (0..40).map(|i| 1 + (i * 37) % 300).collect();
        let (mut data, mut tensors) = (Vec::new(), Vec::new());
        for (i, &n) in sizes.iter().enumerate() {
            let offset = data.len() as u64;
            data.extend((0..n).map(|b| (b * 7 + i) as u8));
            tensors.push(TensorPlan {
                name: format!("t{i:02}"),
                dtype: DType::U8,
                shape: vec![n],
                offset,
                len: n as u64,
                is_bool: false,
            });
        }
        let path = dir.path().join("model.safetensors");
        File::create(&path).and_then(|mut f| f.write_all(&data)).expect("write the fixture");
        let file = FilePlan { path: "model.safetensors".into(), tensors: tensors.clone() };
        let plan = LoadPlan {
            layout: Layout::SingleFile,
            components: vec![ComponentPlan {
                name: String::new(),
                sample_size: None,
                files: vec![file],
                variant: None,
            }],
        };
        let files: Vec<Arc<dyn ReadAt>> = vec![Arc::new(File::open(&path).expect("open the fixture"))];
        let cancel = CancellationToken::new();
        let options =
            ReadOptions { threads: 4, cancel: &cancel, interval: Duration::from_millis(1), chunk_bytes: None };
        let placed = read(&HostPlacement, &plan, &files, options, |_, _| {}).expect("read");
        let (read, _) = placed.finish(0, Duration::ZERO).expect("finish");
        let names: Vec<&str> = read.iter().map(|t| t.name.as_str()).collect();
        let planned: Vec<&str> = tensors.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, planned);
        for (t, p) in read.iter().zip(&tensors) {
            let bytes = t.data.bytes().expect("bytes");
            assert_eq!(bytes.as_ref(), &data[p.offset as usize..(p.offset + p.len) as usize], "{}", p.name);
        }
    }

    /// The host placement with chunks of at most `0` bytes.
    struct Chunked(usize);

    impl Placement for Chunked {
        fn chunking(&self, _: u64, _: usize) -> crate::placement::Chunking {
            crate::placement::Chunking { chunk: self.0, edge_chunk: self.0, edge: 0 }
        }

        fn place(
            &self,
            groups: &[crate::placement::Group],
            chunks: &[crate::placement::Chunk],
            readers: &(dyn Fn(&dyn Destination) + Sync),
        ) -> Result<Box<dyn Placed>, Error> {
            HostPlacement.place(groups, chunks, readers)
        }
    }

    /// 1000 U32 elements after 100 bytes of header, planned as one tensor of `elems` elements.
    fn u32s(dir: &std::path::Path, elems: usize) -> (LoadPlan, Vec<Arc<dyn ReadAt>>) {
        let mut bytes = vec![0xEEu8; 100];
        bytes.extend((0..1000u32).flat_map(u32::to_le_bytes));
        let path = dir.join("u32s.safetensors");
        std::fs::write(&path, bytes).expect("write");
        let tensor = TensorPlan {
            name: "t".into(),
            dtype: DType::U32,
            shape: vec![elems],
            offset: 100,
            len: 4 * elems as u64,
            is_bool: false,
        };
        let file = FilePlan { path: "u32s.safetensors".into(), tensors: vec![tensor] };
        let plan = LoadPlan {
            layout: Layout::SingleFile,
            components: vec![ComponentPlan {
                name: String::new(),
                sample_size: None,
                files: vec![file],
                variant: None,
            }],
        };
        (plan, vec![Arc::new(File::open(&path).expect("open"))])
    }

    /// Reads land exactly, whatever the chunk size (here not a multiple of the element size: a
    /// chunk holds whole elements), and every byte is counted.
    #[test]
    fn reads_land_exactly_in_chunks_of_any_size() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (plan, files) = u32s(dir.path(), 1000);
        let cancel = CancellationToken::new();
        let options =
            ReadOptions { threads: 3, cancel: &cancel, interval: Duration::from_millis(1), chunk_bytes: None };
        let mut counted = 0;
        let placed = read(&Chunked(7), &plan, &files, options, |done, _| counted = done).expect("read");
        let (tensors, _) = placed.finish(0, Duration::ZERO).expect("finish");
        let values: Vec<u32> = bytemuck::pod_collect_to_vec(&tensors[0].data.bytes().expect("bytes"));
        assert_eq!(values, (0..1000).collect::<Vec<u32>>());
        assert_eq!(counted, 4000);
    }

    /// A file that ends early is corrupt (truncated while loading); a cancel stops the reading
    /// between chunks, with what was placed handed back.
    #[test]
    fn stops_at_the_end_of_the_file_or_when_cancelled() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (plan, files) = u32s(dir.path(), 1001);
        let cancel = CancellationToken::new();
        let options =
            ReadOptions { threads: 1, cancel: &cancel, interval: Duration::from_millis(1), chunk_bytes: None };
        let short = read(&Chunked(1 << 20), &plan, &files, options, |_, _| {}).err().expect("the file ends");
        assert!(matches!(&short.error, Error::Corrupt { reason, .. } if reason.contains("truncated")), "{short:?}");

        // Cancelled during the second of four chunk reads: the load stops before the third.
        let (plan, files) = u32s(dir.path(), 1000);
        let file =
            Arc::new(CancelsAt { file: files[0].clone(), reads: AtomicUsize::new(0), at: 2, cancel: cancel.clone() });
        let files: Vec<Arc<dyn ReadAt>> = vec![file.clone()];
        let stopped = read(&Chunked(1000), &plan, &files, options, |_, _| {}).err().expect("cancelled");
        assert!(matches!(stopped.error, Error::Cancelled), "{stopped:?}");
        assert!(stopped.placed.is_some(), "what was placed comes back to be freed later");
        assert_eq!(file.reads.load(Ordering::SeqCst), 2, "stopped between chunks: 2000 of 4000 bytes read");
    }

    /// A file that cancels `cancel` during its `at`-th read, and counts its reads.
    struct CancelsAt {
        file: Arc<dyn ReadAt>,
        reads: AtomicUsize,
        at: usize,
        cancel: CancellationToken,
    }

    impl ReadAt for CancelsAt {
        fn size(&self) -> std::io::Result<u64> {
            self.file.size()
        }

        fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
            if self.reads.fetch_add(1, Ordering::SeqCst) + 1 == self.at {
                self.cancel.cancel();
            }
            self.file.read_exact_at(buf, offset)
        }
    }
}
