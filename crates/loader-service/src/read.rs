//! Step 4 (LOAD_WEIGHTS): reads every planned tensor straight into its final, typed buffer with
//! positioned reads, on a few threads, checking cancellation between chunks and counting bytes
//! for the progress bar.

use std::{
    fs::File,
    sync::{
        Mutex,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use candle_core::{DType, Device, Shape, Tensor, WithDType};
use resource_manager::{host, sync};
use tokio_util::sync::CancellationToken;

use crate::{error::LoadError, plan::LoadPlan, request::ModelId};

// Tensors are read as raw bytes into typed buffers: the file is little-endian, so the host must be.
#[cfg(target_endian = "big")]
compile_error!("safetensors data is little-endian; this loader reads it in place and needs a little-endian host");

/// Bytes read between two cancellation checks and progress updates: one `pread` each. Small enough
/// that a cancel waits about a millisecond for the chunks in flight, large enough that the extra
/// calls cost nothing measurable (docs/benchmarks/design-choices.md).
pub const CHUNK_BYTES: usize = 2 * 1024 * 1024;

/// One tensor read back, with its place in the plan.
pub struct ReadTensor {
    pub component: usize,
    pub name: String,
    pub tensor: Tensor,
}

struct Job<'a> {
    /// Its place in the plan: the results are put back in plan (file) order.
    order: usize,
    component: usize,
    file: usize,
    tensor: &'a crate::header::TensorPlan,
}

/// Reads every tensor of the plan on `threads` threads into `into`, where the tensors read so far
/// also are when it fails (their memory is freed by the caller). `on_progress(done)` is called
/// from this thread about every `interval` while reading, and once at the end.
#[allow(clippy::too_many_arguments)]
pub fn read_all(
    id: &ModelId,
    plan: &LoadPlan,
    files: &[File],
    threads: usize,
    cancel: &CancellationToken,
    interval: Duration,
    mut on_progress: impl FnMut(u64, &str),
    into: &mut Vec<ReadTensor>,
) -> Result<(), LoadError> {
    let mut jobs = Vec::new();
    let mut file_names = Vec::new();
    for (ci, component) in plan.components.iter().enumerate() {
        for file in &component.files {
            let fi = file_names.len();
            file_names.push(file.display.as_str());
            let first = jobs.len();
            jobs.extend(file.tensors.iter().enumerate().map(|(i, tensor)| Job {
                order: first + i,
                component: ci,
                file: fi,
                tensor,
            }));
        }
    }
    // Largest first, so one big tensor does not start last and leave the other threads idle.
    jobs.sort_by_key(|job| std::cmp::Reverse(job.tensor.len));

    let next = AtomicUsize::new(0);
    let done_bytes = AtomicU64::new(0);
    let current_file = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let first_error: Mutex<Option<LoadError>> = Mutex::new(None);
    let results: Mutex<Vec<(usize, ReadTensor)>> = Mutex::new(Vec::with_capacity(jobs.len()));
    on_progress(0, file_names.first().unwrap_or(&""));
    let worker = || {
        loop {
            if failed.load(Ordering::Relaxed) {
                return;
            }
            let Some(job) = jobs.get(next.fetch_add(1, Ordering::Relaxed)) else { return };
            current_file.store(job.file, Ordering::Relaxed);
            match read_tensor(id, file_names[job.file], &files[job.file], job.tensor, cancel, &done_bytes) {
                Ok(tensor) => sync::lock(&results)
                    .push((job.order, ReadTensor { component: job.component, name: job.tensor.name.clone(), tensor })),
                Err(e) => {
                    failed.store(true, Ordering::Relaxed);
                    sync::lock(&first_error).get_or_insert(e);
                    return;
                }
            }
        }
    };
    in_parallel(threads.clamp(1, jobs.len().max(1)), interval, worker, || {
        on_progress(
            done_bytes.load(Ordering::Relaxed),
            file_names.get(current_file.load(Ordering::Relaxed)).unwrap_or(&""),
        )
    });
    let mut results = sync::into_inner(results);
    results.sort_unstable_by_key(|(order, _)| *order);
    into.extend(results.into_iter().map(|(_, tensor)| tensor));
    if let Some(e) = sync::into_inner(first_error) {
        return Err(e);
    }
    on_progress(done_bytes.load(Ordering::Relaxed), file_names.last().unwrap_or(&""));
    Ok(())
}

/// Runs `worker` on `threads` threads while this thread calls `report` about every `interval`,
/// until every worker has returned. Workers wake the reporting thread when they stop, so a cancel
/// or an error ends the step at once instead of at the next tick.
pub(crate) fn in_parallel(threads: usize, interval: Duration, worker: impl Fn() + Sync, mut report: impl FnMut()) {
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

/// Whether tensors of this dtype can be read (the dtypes candle holds).
pub(crate) fn supported(dtype: DType) -> bool {
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

pub(crate) fn unsupported_dtype(id: &ModelId, file: &str, tensor: &str, dtype: DType) -> LoadError {
    LoadError::UnsupportedDtype {
        model_id: id.to_string(),
        file: file.to_owned(),
        tensor: tensor.to_owned(),
        dtype: format!("{dtype:?}"),
    }
}

/// A failed read: a file that ends early was truncated (or changed) under the load.
pub(crate) fn read_error(id: &ModelId, file: &str, source: std::io::Error) -> LoadError {
    if source.kind() == std::io::ErrorKind::UnexpectedEof {
        LoadError::Corrupt {
            model_id: id.to_string(),
            file: file.to_owned(),
            reason: "the file ended before its last tensor: truncated while loading?".into(),
        }
    } else {
        LoadError::ReadWeights { model_id: id.to_string(), file: file.to_owned(), source }
    }
}

/// Counts a worker out and wakes the reporting thread, however the worker stops.
struct WakeOnDrop<'a>(&'a std::thread::Thread, &'a AtomicUsize);

impl Drop for WakeOnDrop<'_> {
    fn drop(&mut self) {
        self.1.fetch_sub(1, Ordering::Release);
        self.0.unpark();
    }
}

fn read_tensor(
    id: &ModelId,
    display: &str,
    file: &File,
    plan: &crate::header::TensorPlan,
    cancel: &CancellationToken,
    done: &AtomicU64,
) -> Result<Tensor, LoadError> {
    let shape = Shape::from(plan.shape.clone());
    let read = Source { id, display, file, offset: plan.offset, cancel, done };
    let read = &read;
    match plan.dtype {
        DType::U8 => typed::<u8>(plan.len, shape, read),
        DType::U32 => typed::<u32>(plan.len, shape, read),
        DType::I16 => typed::<i16>(plan.len, shape, read),
        DType::I32 => typed::<i32>(plan.len, shape, read),
        DType::I64 => typed::<i64>(plan.len, shape, read),
        DType::F16 => typed::<half::f16>(plan.len, shape, read),
        DType::BF16 => typed::<half::bf16>(plan.len, shape, read),
        DType::F32 => typed::<f32>(plan.len, shape, read),
        DType::F64 => typed::<f64>(plan.len, shape, read),
        DType::F8E4M3 => typed::<float8::F8E4M3>(plan.len, shape, read),
        other => Err(TypedError::Load(unsupported_dtype(id, display, &plan.name, other))),
    }
    .map_err(|e| match e {
        TypedError::Load(e) => e,
        TypedError::Candle(e) => LoadError::Corrupt {
            model_id: id.to_string(),
            file: display.to_owned(),
            reason: format!("tensor {}: {e}", plan.name),
        },
    })
}

enum TypedError {
    Load(LoadError),
    Candle(candle_core::Error),
}

impl From<LoadError> for TypedError {
    fn from(e: LoadError) -> Self {
        Self::Load(e)
    }
}

/// Allocates the tensor's final buffer as `Vec<T>` (so it is aligned for `T`), reads the file's
/// bytes straight into it in chunks (checking cancellation before each, counting bytes after),
/// and hands it to candle without another copy.
fn typed<T: WithDType + bytemuck::Pod>(len: u64, shape: Shape, source: &Source) -> Result<Tensor, TypedError> {
    let data = source.read::<T>(len as usize / size_of::<T>())?;
    Tensor::from_vec(data, shape, &Device::Cpu).map_err(TypedError::Candle)
}

/// Where one tensor's bytes are, and what its reads report to.
struct Source<'a> {
    id: &'a ModelId,
    display: &'a str,
    file: &'a File,
    offset: u64,
    cancel: &'a CancellationToken,
    done: &'a AtomicU64,
}

impl Source<'_> {
    fn read<T: bytemuck::Pod>(&self, elems: usize) -> Result<Vec<T>, LoadError> {
        host::read_new_vec_at::<T, LoadError>(
            self.file,
            self.offset,
            elems,
            CHUNK_BYTES,
            || match self.cancel.is_cancelled() {
                true => Err(LoadError::Cancelled { model_id: self.id.to_string() }),
                false => Ok(()),
            },
            |n| {
                self.done.fetch_add(n as u64, Ordering::Relaxed);
            },
            |source| read_error(self.id, self.display, source),
        )
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;
    use crate::{
        header::TensorPlan,
        plan::{ComponentPlan, FilePlan, Layout},
    };

    /// The threads take the largest tensors first and finish in any order; the tensors still come
    /// back in the plan's (file) order, with their bytes.
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
            });
        }
        let path = dir.path().join("model.safetensors");
        File::create(&path).and_then(|mut f| f.write_all(&data)).expect("write the fixture");
        let file = FilePlan { path: path.clone(), display: "model.safetensors".into(), tensors: tensors.clone() };
        let plan = LoadPlan {
            layout: Layout::SingleFile,
            components: vec![ComponentPlan { name: String::new(), config: None, files: vec![file], variant: None }],
        };
        let files = vec![File::open(&path).expect("open the fixture")];
        let id = ModelId::parse("test/read").expect("an id");
        let mut read = Vec::new();
        let cancel = CancellationToken::new();
        read_all(&id, &plan, &files, 4, &cancel, Duration::from_millis(1), |_, _| {}, &mut read).expect("read");
        let names: Vec<&str> = read.iter().map(|t| t.name.as_str()).collect();
        let planned: Vec<&str> = tensors.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, planned);
        for (t, p) in read.iter().zip(&tensors) {
            let bytes = t.tensor.to_vec1::<u8>().expect("bytes");
            assert_eq!(bytes, data[p.offset as usize..(p.offset + p.len) as usize], "{}", p.name);
        }
    }
}
