//! The shared host placement, for models other processes attach to. Local files loaded as stored
//! are mapped as they are where the kernel keeps them from changing (immutable or fs-verity:
//! `mapped`); otherwise one memfd per load holds every group (64-byte aligned), filled in place
//! by the same readers as host memory, then sealed against writes, growth and shrinking, and
//! mapped read-only. Every tensor is a view into it, and its
//! [`Region`](pipeline_manager::Region) is what an attaching client maps: no copy in the server,
//! none in the client. The memfd is a snapshot: nobody (the server, a client reopening its
//! descriptor, root) can write, grow or shrink it, whatever happens to the files afterwards.

use std::{
    borrow::Cow,
    fs::File,
    os::fd::{AsFd, BorrowedFd},
    sync::{Arc, OnceLock},
    time::Duration,
};

use candle_core::DType;
use memmap2::{Mmap, MmapMut, MmapOptions};
use pipeline_manager::{MemoryKind, SharedMemory};
use resource_manager::staging::DeviceError;
use rustix::fs::{MemfdFlags, SealFlags};
use tokio_util::sync::CancellationToken;

use crate::{
    Error, ReadAt,
    host::{CHUNK_BYTES, HostDestination, HostMemory, HostView, split},
    placement::{Chunk, Chunking, Group, Placed, PlacedTensor, Placement, TENSOR_ALIGN, converted_layout, converts_to},
    plan::LoadPlan,
};

/// Where each group starts, so every tensor starts there too (the groups are cut for it): aligned
/// for any element type, vector loads and a GPU library's kernel choice in clients.
const ALIGN: u64 = TENSOR_ALIGN;

/// The longest memfd name the kernel takes: `NAME_MAX` less the `memfd:` it puts in front.
const MAX_NAME_BYTES: usize = 255 - "memfd:".len();

/// A sealed memfd mapped read-only: the memory of one load's tensors.
#[derive(Debug)]
pub struct Memfd {
    file: File,
    map: Mmap,
}

impl Memfd {
    /// A memfd of `len` bytes named `name` (shown in `/proc/<pid>/maps` as `/memfd:<name>`;
    /// cut at a character boundary to the kernel's limit), mapped read-write for the readers to
    /// fill.
    #[allow(unsafe_code)] // mapping a file is unsafe in Rust: see the SAFETY note
    pub fn create(name: &str, len: u64) -> Result<(File, MmapMut), Error> {
        let failed = |what: &str, e: std::io::Error| Error::Internal(format!("{what} a memfd of {len} bytes: {e}"));
        let name = &name[..name.floor_char_boundary(MAX_NAME_BYTES)];
        let fd = rustix::fs::memfd_create(name, MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING)
            .map_err(|e| failed("creating", e.into()))?;
        let file = File::from(fd);
        file.set_len(len).map_err(|e| failed("sizing", e))?;
        // SAFETY: the memfd is this process's own and its size is fixed from here on (sealed
        // against shrinking once filled); nothing else writes it while the mapping lives.
        let map = unsafe { MmapOptions::new().len(len as usize).map_mut(&file) }.map_err(|e| failed("mapping", e))?;
        Ok((file, map))
    }

    /// Seals the filled memfd (no write, growth or shrinking by anyone from now on, and no
    /// change to the seals) and maps it read-only.
    pub fn seal(file: File, map: MmapMut) -> Result<Self, Error> {
        let failed = |what: &str, e: std::io::Error| Error::Internal(format!("{what} a memfd: {e}"));
        let map = map.make_read_only().map_err(|e| failed("protecting", e))?;
        // FUTURE_WRITE rather than WRITE: the server's own mapping was writable, which WRITE
        // refuses even once protected; FUTURE_WRITE refuses every new writable mapping and write.
        let seals = SealFlags::FUTURE_WRITE | SealFlags::GROW | SealFlags::SHRINK | SealFlags::SEAL;
        rustix::fs::fcntl_add_seals(&file, seals).map_err(|e| failed("sealing", e.into()))?;
        Ok(Self { file, map })
    }
}

impl HostMemory for Memfd {
    fn size(&self) -> usize {
        self.map.len()
    }

    /// The pages themselves: sealed, nobody can change or shrink them.
    fn read(&self, at: usize, len: usize) -> std::io::Result<Cow<'_, [u8]>> {
        Ok(Cow::Borrowed(&self.map[at..at + len]))
    }

    fn shared(&self) -> Option<&dyn SharedMemory> {
        Some(self)
    }
}

impl SharedMemory for Memfd {
    fn kind(&self) -> MemoryKind {
        MemoryKind::HostMemfd
    }

    fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    fn size(&self) -> u64 {
        self.map.len() as u64
    }
}

/// Host memory other processes attach to: local files loaded as stored that the kernel keeps from
/// changing are mapped as they are (see `mapped`); other loads are read into one sealed memfd,
/// and conversions write a new one.
#[derive(Debug, Clone)]
pub struct SharedHostPlacement {
    /// The memfd's name (`model-loader:<model id>`).
    name: String,
}

impl SharedHostPlacement {
    pub fn new(name: impl Into<String>) -> Self {
        Self { name: name.into() }
    }
}

/// Where each group starts in the memfd, and its whole length (at least one alignment unit: a
/// mapping is never empty).
fn layout(groups: &[Group]) -> (Vec<u64>, u64) {
    let mut end = 0u64;
    let starts = groups
        .iter()
        .map(|g| {
            let start = end.next_multiple_of(ALIGN);
            end = start + g.len;
            start
        })
        .collect();
    (starts, end.next_multiple_of(ALIGN).max(ALIGN))
}

impl Placement for SharedHostPlacement {
    fn chunking(&self, _total: u64, _threads: usize) -> Chunking {
        Chunking { chunk: CHUNK_BYTES, edge_chunk: CHUNK_BYTES, edge: 0 }
    }

    fn tensor_align(&self) -> u64 {
        ALIGN
    }

    fn place(
        &self,
        groups: &[Group],
        chunks: &[Chunk],
        readers: &(dyn Fn(&dyn crate::placement::Destination) + Sync),
    ) -> Result<Box<dyn Placed>, Error> {
        let (starts, len) = layout(groups);
        let (file, mut map) = Memfd::create(&self.name, len)?;
        let mut rest: &mut [u8] = &mut map;
        let mut at = 0;
        let mut pieces = Vec::with_capacity(groups.len());
        for (group, &start) in groups.iter().zip(&starts) {
            let (_, tail) = std::mem::take(&mut rest).split_at_mut((start - at) as usize);
            let (piece, tail) = tail.split_at_mut(group.len as usize);
            (rest, at) = (tail, start + group.len);
            pieces.push(Some(piece));
        }
        let filled: Vec<OnceLock<_>> = groups.iter().map(|_| OnceLock::new()).collect();
        readers(&HostDestination { chunks, pieces: split(pieces, chunks)?, filled: &filled });
        let memory: Arc<dyn HostMemory> = Arc::new(Memfd::seal(file, map)?);
        let mut tensors = Vec::with_capacity(groups.iter().map(|g| g.members.len()).sum());
        for (group, &start) in groups.iter().zip(&starts) {
            for m in &group.members {
                let at = (start + m.at) as usize;
                let view = HostView::new(memory.clone(), at, m.len as usize, group.dtype, m.shape.clone())
                    .ok_or_else(|| Error::Internal(format!("tensor {}: its shape does not fit its bytes", m.name)))?;
                tensors.push(PlacedTensor {
                    component: m.component,
                    device: 0,
                    file: group.file,
                    name: m.name.clone(),
                    data: Box::new(view),
                });
            }
        }
        Ok(Box::new(MemfdPlaced { tensors, len }))
    }

    /// Immutable (or fs-verity) local files are mapped as they are (see `mapped`), faster than
    /// filling a memfd; a conversion then writes into a memfd.
    fn map(&self, plan: &LoadPlan, files: &[Arc<dyn ReadAt>]) -> Option<Result<Box<dyn Placed>, Error>> {
        crate::mapped::map_files(plan, files)
    }

    fn convert(
        &self,
        tensors: &mut Vec<PlacedTensor>,
        dtype: DType,
        cancel: &CancellationToken,
        device: &str,
    ) -> Result<usize, Error> {
        if !tensors.iter().any(|t| converts_to(t.data.as_ref(), dtype)) {
            return Ok(0);
        }
        self.convert_into_memfd(tensors, dtype, cancel, device)
    }
}

impl SharedHostPlacement {
    /// Step 7 into a new sealed memfd: every tensor, floats converted to `dtype` one at a time
    /// (candle's rounding, as the host placement), the others copied as they are, so the load's
    /// first memfd is freed whole once its views are replaced. The memory held at once: both
    /// memfds and one converted tensor.
    fn convert_into_memfd(
        &self,
        tensors: &mut [PlacedTensor],
        dtype: DType,
        cancel: &CancellationToken,
        device: &str,
    ) -> Result<usize, Error> {
        let place = |e: candle_core::Error| Error::place(device, DeviceError::from(e));
        let changed = |t: &PlacedTensor| {
            let changed = t.data.region()?.memory.check().err()?;
            Some(Error::Corrupt { file: changed.file, reason: format!("it changed while loading ({})", changed.what) })
        };
        let (layout, end) = converted_layout(tensors, dtype, ALIGN as usize);
        let (file, mut map) = Memfd::create(&self.name, (end as u64).next_multiple_of(ALIGN).max(ALIGN))?;
        let mut converted = 0;
        for (t, at) in tensors.iter().zip(&layout) {
            if cancel.is_cancelled() {
                return Err(Error::Cancelled);
            }
            let to = &mut map[at.start..at.start + at.len];
            let copied = if at.converts {
                t.data.to_dtype(dtype).and_then(|c| c.bytes().map(|bytes| to.copy_from_slice(&bytes)))
            } else {
                t.data.bytes().map(|bytes| to.copy_from_slice(&bytes))
            };
            // A mapped file that changed under the load is corrupt (DATA_LOSS), not a device's fault.
            copied.map_err(|e| changed(t).unwrap_or_else(|| place(e)))?;
            converted += usize::from(at.converts);
        }
        let memory: Arc<dyn HostMemory> = Arc::new(Memfd::seal(file, map)?);
        for (t, at) in tensors.iter_mut().zip(&layout) {
            let view = HostView::new(memory.clone(), at.start, at.len, at.dtype, t.data.shape().to_vec())
                .ok_or_else(|| Error::Internal(format!("tensor {}: its shape does not fit its bytes", t.name)))?;
            t.data = Box::new(view);
        }
        Ok(converted)
    }
}

struct MemfdPlaced {
    tensors: Vec<PlacedTensor>,
    len: u64,
}

impl Placed for MemfdPlaced {
    fn read_detail(&self, total: u64, _reading: Duration, _threads: usize) -> String {
        format!("{} tensors, {total} bytes read and checked", self.tensors.len())
    }

    fn finish(self: Box<Self>, _total: u64, _reading: Duration) -> Result<(Vec<PlacedTensor>, String), Error> {
        let detail = format!("cpu: the tensors are in a sealed memfd of {} bytes, ready to attach", self.len);
        Ok((self.tensors, detail))
    }
}

#[cfg(test)]
mod tests {
    use std::{
        os::{fd::AsRawFd, unix::fs::FileExt},
        time::Duration,
    };

    use super::*;
    use crate::{
        ReadAt,
        header::TensorPlan,
        plan::{ComponentPlan, FilePlan, Layout, LoadPlan},
        read::{ReadOptions, read},
    };

    /// A file read through `ReadAt` alone.
    struct Remote(File);

    impl ReadAt for Remote {
        fn size(&self) -> std::io::Result<u64> {
            ReadAt::size(&self.0)
        }

        fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
            ReadAt::read_exact_at(&self.0, buf, offset)
        }
    }

    /// A one-file plan of `tensors` in `model.safetensors`.
    fn plan_of(tensors: &[TensorPlan]) -> LoadPlan {
        let file = FilePlan { path: "model.safetensors".into(), tensors: tensors.to_vec() };
        LoadPlan {
            layout: Layout::SingleFile,
            components: vec![ComponentPlan {
                name: String::new(),
                sample_size: None,
                files: vec![file],
                variant: None,
            }],
        }
    }

    fn tensor(name: &str, dtype: DType, offset: u64, len: u64) -> TensorPlan {
        TensorPlan {
            name: name.into(),
            dtype,
            shape: vec![(len as usize) / dtype.size_in_bytes()],
            offset,
            len,
            is_bool: false,
        }
    }

    /// Reads (step 4) `plan` from the local file at `path` into the shared host placement.
    fn place(plan: &LoadPlan, path: &std::path::Path) -> Vec<PlacedTensor> {
        let files: Vec<Arc<dyn ReadAt>> = vec![Arc::new(File::open(path).expect("open"))];
        let cancel = CancellationToken::new();
        let options =
            ReadOptions { threads: 2, cancel: &cancel, interval: Duration::from_millis(1), chunk_bytes: None };
        let placed =
            read(&SharedHostPlacement::new("model-loader:test"), plan, &files, options, |_, _| {}).expect("placed");
        placed.finish(0, Duration::ZERO).expect("finish").0
    }

    /// Sets the immutable attribute of `path` (FS_IOC_SETFLAGS, as `chattr +i`), lifted again on
    /// drop so the temporary folder can go; `None` where the filesystem or the process may not.
    struct Immutable(std::path::PathBuf);

    impl Immutable {
        fn set(path: &std::path::Path) -> Option<Self> {
            let file = File::open(path).ok()?;
            let flags = rustix::fs::ioctl_getflags(&file).ok()?;
            match rustix::fs::ioctl_setflags(&file, flags | rustix::fs::IFlags::IMMUTABLE) {
                Ok(()) => Some(Self(path.to_owned())),
                Err(e) => {
                    eprintln!("the immutable attribute is refused here ({e}): its mapping is not tested");
                    None
                }
            }
        }

        fn lift(&self) {
            let file = File::open(&self.0).expect("open");
            let flags = rustix::fs::ioctl_getflags(&file).expect("flags");
            rustix::fs::ioctl_setflags(&file, flags - rustix::fs::IFlags::IMMUTABLE).expect("lift the attribute");
        }
    }

    impl Drop for Immutable {
        fn drop(&mut self) {
            self.lift();
        }
    }

    /// A plain local file is read into a sealed memfd (it could change under a mapping); an
    /// immutable one is mapped as it is, every view at its offset in the file, whose descriptor
    /// is what a client maps.
    #[test]
    fn maps_only_files_that_cannot_change() {
        let dir = tempfile::tempdir().expect("temp dir");
        let data: Vec<u8> = (0..2000u32).map(|i| (i * 13 % 251) as u8).collect();
        let path = dir.path().join("model.safetensors");
        std::fs::write(&path, &data).expect("write");
        let tensors = vec![tensor("a", DType::U8, 8, 992), tensor("b", DType::F32, 1000, 1000)];
        let plan = plan_of(&tensors);
        for t in place(&plan, &path) {
            let region = t.data.region().expect("shared");
            assert_eq!(region.memory.kind(), MemoryKind::HostMemfd, "a file that can change is not mapped");
        }

        let Some(_immutable) = Immutable::set(&path) else { return };
        for (t, p) in place(&plan, &path).iter().zip(&tensors) {
            assert_eq!(t.data.bytes().expect("bytes").as_ref(), &data[p.offset as usize..(p.offset + p.len) as usize]);
            let region = t.data.region().expect("shared");
            assert_eq!(
                (region.memory.kind(), region.offset, region.memory.size()),
                (MemoryKind::HostFile, p.offset, 2000)
            );
        }
    }

    /// A file truncated after step 4 cannot fault step 7's conversion: a plain file's tensors are
    /// the memfd's snapshot and convert as loaded; an immutable file whose attribute root lifts
    /// before truncating it is read through its descriptor, so the conversion fails naming the
    /// file, and its check says what changed.
    #[test]
    fn a_file_truncated_before_the_conversion_cannot_fault_it() {
        let dir = tempfile::tempdir().expect("temp dir");
        let values: Vec<f32> = (0..4096).map(|i| i as f32 * 0.25).collect();
        let data: Vec<u8> = bytemuck::cast_slice(&values).to_vec();
        let path = dir.path().join("model.safetensors");
        std::fs::write(&path, &data).expect("write");
        let plan = plan_of(&[tensor("w", DType::F32, 0, data.len() as u64)]);
        let placement = SharedHostPlacement::new("model-loader:test");
        let cancel = CancellationToken::new();

        let mut placed = place(&plan, &path);
        File::options().write(true).open(&path).expect("open").set_len(0).expect("truncate");
        assert_eq!(placement.convert(&mut placed, DType::BF16, &cancel, "cpu").expect("converts"), 1);
        let loaded = candle_core::Tensor::from_slice(&values, values.len(), &candle_core::Device::Cpu).expect("tensor");
        let want = pipeline_manager::resident_bytes(&loaded.to_dtype(DType::BF16).expect("bf16")).expect("bytes");
        assert_eq!(placed[0].data.bytes().expect("bytes").as_ref(), want.as_slice(), "the bytes as loaded");

        std::fs::write(&path, &data).expect("write again");
        let Some(immutable) = Immutable::set(&path) else { return };
        let mut placed = place(&plan, &path);
        assert_eq!(placed[0].data.region().expect("shared").memory.kind(), MemoryKind::HostFile);
        immutable.lift();
        File::options().write(true).open(&path).expect("open").set_len(100).expect("truncate");
        let failed = placement.convert(&mut placed, DType::BF16, &cancel, "cpu").expect_err("the file changed");
        assert!(matches!(&failed, Error::Corrupt { file, .. } if file == "model.safetensors"), "{failed}");
        assert!(placed[0].data.bytes().is_err(), "no bytes of a changed file");
    }

    /// A memfd's name is cut, at a character boundary, to the kernel's limit of 249 bytes: an
    /// object store id of 300 characters still loads for attach.
    #[test]
    fn a_long_name_is_cut_to_the_kernels_limit() {
        let name = format!("model-loader:{}{}", "a".repeat(235), "é".repeat(52));
        assert_eq!(name.chars().count(), 300);
        let (file, _map) = Memfd::create(&name, 64).expect("a memfd of a long name");
        let link = std::fs::read_link(format!("/proc/self/fd/{}", file.as_fd().as_raw_fd())).expect("its name");
        let shown = link.to_string_lossy().into_owned();
        // 13 + 235 bytes, and the é across byte 249 left out whole.
        assert_eq!(shown, format!("/memfd:model-loader:{} (deleted)", "a".repeat(235)));
    }

    /// Tensors of one dtype at odd offsets in their file (a 640-byte bias, then others) each start
    /// 256-byte aligned in the memfd, with their file's bytes: what a GPU library's kernel choice
    /// sees in a client is the alignment `from_pretrained`'s own tensors have.
    #[test]
    fn every_tensor_starts_aligned() {
        let dir = tempfile::tempdir().expect("temp dir");
        let data: Vec<u8> = (0..4000u32).map(|i| (i * 13 % 251) as u8).collect();
        let path = dir.path().join("model.safetensors");
        std::fs::write(&path, &data).expect("write");
        let tensors = vec![
            tensor("bias", DType::F16, 8, 640),
            tensor("weight", DType::F16, 648, 1024),
            tensor("scale", DType::F16, 1672, 2),
            tensor("next", DType::F16, 1674, 2048),
        ];
        let plan = plan_of(&tensors);
        let files: Vec<Arc<dyn ReadAt>> = vec![Arc::new(Remote(File::open(&path).expect("open")))];
        let cancel = CancellationToken::new();
        let options =
            ReadOptions { threads: 2, cancel: &cancel, interval: Duration::from_millis(1), chunk_bytes: None };
        let placed =
            read(&SharedHostPlacement::new("model-loader:test"), &plan, &files, options, |_, _| {}).expect("read");
        let (placed, _) = placed.finish(0, Duration::ZERO).expect("finish");
        for (t, p) in placed.iter().zip(&tensors) {
            assert_eq!(t.data.bytes().expect("bytes").as_ref(), &data[p.offset as usize..][..p.len as usize]);
            let region = t.data.region().expect("in shared memory");
            assert_eq!(region.offset % 256, 0, "{} at {}", p.name, region.offset);
        }
    }

    /// Tensors of three dtypes (three groups) read into one memfd: every view holds its file's
    /// bytes at a 256-byte aligned group start, all in the one sealed memfd, which no one can
    /// write, grow or shrink any more.
    #[test]
    fn reads_into_one_sealed_memfd() {
        let dir = tempfile::tempdir().expect("temp dir");
        let data: Vec<u8> = (0..3000u32).map(|i| (i * 7 % 251) as u8).collect();
        let path = dir.path().join("model.safetensors");
        std::fs::write(&path, &data).expect("write");
        let tensors = vec![
            tensor("a", DType::U8, 0, 1001),
            tensor("b", DType::F32, 1004, 1000),
            tensor("c", DType::I64, 2008, 992),
        ];
        let plan = plan_of(&tensors);
        // Not a local file (as a remote object is not): read into the memfd, not mapped.
        let files: Vec<Arc<dyn ReadAt>> = vec![Arc::new(Remote(File::open(&path).expect("open")))];
        let cancel = CancellationToken::new();
        let options =
            ReadOptions { threads: 2, cancel: &cancel, interval: Duration::from_millis(1), chunk_bytes: None };
        let placement = SharedHostPlacement::new("model-loader:test");
        let placed = read(&placement, &plan, &files, options, |_, _| {}).expect("read");
        let (placed, _) = placed.finish(0, Duration::ZERO).expect("finish");
        let mut fds = Vec::new();
        for (t, p) in placed.iter().zip(&tensors) {
            let bytes = t.data.bytes().expect("bytes");
            assert_eq!(bytes.as_ref(), &data[p.offset as usize..(p.offset + p.len) as usize], "{}", p.name);
            let region = t.data.region().expect("in shared memory");
            assert_eq!((region.memory.kind(), region.offset % ALIGN), (MemoryKind::HostMemfd, 0), "{}", p.name);
            fds.push(region.memory.fd().as_fd().try_clone_to_owned().expect("dup"));
        }
        let region = placed[0].data.region().expect("shared");
        assert_eq!(region.memory.size(), 3072, "three groups, each 256-byte aligned");
        let memfd = File::from(fds.pop().expect("an fd"));
        let seals = rustix::fs::fcntl_get_seals(&memfd).expect("seals");
        assert!(seals.contains(SealFlags::FUTURE_WRITE | SealFlags::GROW | SealFlags::SHRINK | SealFlags::SEAL));
        assert!(memfd.write_at(b"x", 0).is_err(), "no write");
        assert!(memfd.set_len(1 << 20).is_err() && memfd.set_len(10).is_err(), "no growing or shrinking");
        #[allow(unsafe_code)] // a mapping for this test only, dropped at once
        // SAFETY: the mapping is refused; none is ever used.
        let writable = unsafe { MmapOptions::new().len(64).map_mut(&memfd) };
        assert!(writable.is_err(), "no writable shared mapping");
    }
}
