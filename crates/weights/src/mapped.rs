//! Local model files mapped as they are, for attach: each file opened read-only is mapped shared
//! and read-only (its pages populated now, locked in memory where the process may), and every
//! tensor is a view at its offset in the file. Nothing is read or copied: the page cache is the
//! resident memory, shared by the server and every client that maps the same descriptor.
//!
//! Measured against filling a sealed memfd (docs/benchmarks): a memfd fills at about 0.64× the
//! speed of anonymous memory on shmem page faults; a mapping costs only its page tables. The
//! file must not be truncated while it is loaded: its pages would vanish under every mapping.

use std::{
    fs::File,
    os::fd::{AsFd, BorrowedFd},
    sync::Arc,
    time::Duration,
};

use memmap2::{Mmap, MmapOptions};
use pipeline_manager::{MemoryKind, SharedMemory};

use crate::{
    Error,
    files::ReadAt,
    host::{HostMemory, HostView},
    placement::{Placed, PlacedTensor},
    plan::LoadPlan,
};

/// One model file, mapped read-only.
#[derive(Debug)]
pub struct MappedFile {
    file: File,
    map: Mmap,
}

impl MappedFile {
    /// Maps all of `file` (a descriptor of its own, read-only as it was opened), its pages
    /// populated, and locked where the process may lock memory.
    #[allow(unsafe_code)] // mapping a file is unsafe in Rust: see the SAFETY note
    fn new(file: &File, name: &str) -> Result<Self, Error> {
        let read_error = |e| Error::read(name, e);
        let file = file.try_clone().map_err(read_error)?;
        let len = file.metadata().map_err(read_error)?.len();
        // SAFETY: a read-only shared mapping of a model file the server only reads; a file
        // truncated under it would fault its readers (see the module's doc).
        let map = unsafe { MmapOptions::new().len(len as usize).populate().map(&file) }.map_err(read_error)?;
        // Locked pages stay resident under memory pressure; containers often may not lock, and
        // then the pages are the page cache's, reclaimable.
        let _ = map.lock();
        Ok(Self { file, map })
    }
}

impl HostMemory for MappedFile {
    fn bytes(&self) -> &[u8] {
        &self.map
    }

    fn shared(&self) -> Option<&dyn SharedMemory> {
        Some(self)
    }
}

impl SharedMemory for MappedFile {
    fn kind(&self) -> MemoryKind {
        MemoryKind::HostFile
    }

    fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    fn size(&self) -> u64 {
        self.map.len() as u64
    }
}

/// The plan's tensors as views into their files, mapped; `None` unless every file is local.
pub fn map_files(plan: &LoadPlan, files: &[Arc<dyn ReadAt>]) -> Option<Result<Box<dyn Placed>, Error>> {
    let locals: Vec<&File> = files.iter().map(|f| f.file()).collect::<Option<_>>()?;
    Some(map_local(plan, &locals))
}

fn map_local(plan: &LoadPlan, files: &[&File]) -> Result<Box<dyn Placed>, Error> {
    let mut tensors = Vec::new();
    let planned = plan.components.iter().enumerate().flat_map(|(c, comp)| comp.files.iter().map(move |f| (c, f)));
    for ((component, file_plan), file) in planned.zip(files) {
        let memory: Arc<dyn HostMemory> = Arc::new(MappedFile::new(file, &file_plan.path)?);
        for t in &file_plan.tensors {
            let view = HostView::new(memory.clone(), t.offset as usize, t.len as usize, t.dtype, t.shape.clone())
                .ok_or_else(|| Error::Corrupt {
                    file: file_plan.path.clone(),
                    reason: format!("tensor {} lies past the end of the file: truncated while loading?", t.name),
                })?;
            tensors.push(PlacedTensor { component, name: t.name.clone(), data: Box::new(view) });
        }
    }
    Ok(Box::new(Mapped { tensors }))
}

struct Mapped {
    tensors: Vec<PlacedTensor>,
}

impl Placed for Mapped {
    fn read_detail(&self, total: u64, _reading: Duration, _threads: usize) -> String {
        format!("{} tensors, {total} bytes mapped from their files", self.tensors.len())
    }

    fn finish(self: Box<Self>, _total: u64, _reading: Duration) -> Result<(Vec<PlacedTensor>, String), Error> {
        Ok((self.tensors, "cpu: the tensors are the model files' pages, mapped read-only, ready to attach".into()))
    }
}
