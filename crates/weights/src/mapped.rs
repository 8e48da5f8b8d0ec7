//! Local model files mapped as they are, for attach, where the kernel keeps them from changing:
//! a file with the immutable attribute (`chattr +i`) or fs-verity. Each is mapped shared and
//! read-only (its pages populated now, locked in memory where the process may), and every tensor
//! is a view at its offset in the file: nothing is read or copied, the page cache is the resident
//! memory, shared by the server and every client that maps the same descriptor.
//!
//! Any other file could be rewritten or truncated under the mapping (by its owner, by root, by a
//! client reopening its descriptor through `/proc/self/fd` for writing; a read-only mount is no
//! guard either, as a read-only bind mount of a writable filesystem still changes underneath),
//! so it is read into a sealed memfd instead (`memfd`). Even a mapped file is never trusted
//! blindly: root can lift its attribute. The server never touches a mapped page itself (where it
//! needs the bytes, for checksums or a conversion, it reads through the descriptor, so a
//! truncated file is an error, never SIGBUS), and the file's identity (device, inode, size,
//! mtime, ctime and its attribute) is recorded at load and checked again at every attach and
//! every checksum ([`SharedMemory::check`]).

use std::{
    borrow::Cow,
    fs::File,
    io,
    os::{
        fd::{AsFd, BorrowedFd},
        unix::fs::FileExt,
    },
    sync::Arc,
    time::Duration,
};

use memmap2::{Mmap, MmapOptions};
use pipeline_manager::{FileChanged, MemoryKind, SharedMemory};
use rustix::fs::{AtFlags, StatxAttributes, StatxFlags};

use crate::{
    Error,
    files::ReadAt,
    host::{HostMemory, HostView},
    placement::{Placed, PlacedTensor},
    plan::LoadPlan,
};

/// What a file was when it was mapped: any write, truncation or change of its attribute
/// changes one of these.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Identity {
    dev: (u32, u32),
    ino: u64,
    size: u64,
    mtime: (i64, u32),
    ctime: (i64, u32),
    /// Immutable or fs-verity: the kernel refuses every change of its bytes.
    unchangeable: bool,
}

impl Identity {
    fn of(file: &File) -> io::Result<Self> {
        let st = rustix::fs::statx(file, "", AtFlags::EMPTY_PATH, StatxFlags::BASIC_STATS)?;
        let guards = StatxAttributes::IMMUTABLE | StatxAttributes::VERITY;
        Ok(Self {
            dev: (st.stx_dev_major, st.stx_dev_minor),
            ino: st.stx_ino,
            size: st.stx_size,
            mtime: (st.stx_mtime.tv_sec, st.stx_mtime.tv_nsec),
            ctime: (st.stx_ctime.tv_sec, st.stx_ctime.tv_nsec),
            unchangeable: st.stx_attributes.intersects(guards & st.stx_attributes_mask),
        })
    }

    /// What differs in `now`, in words.
    fn change(&self, now: &Self) -> Option<String> {
        if now == self {
            None
        } else if !now.unchangeable {
            Some("it is no longer immutable".into())
        } else if now.size != self.size {
            Some(format!("its size went from {} to {} bytes", self.size, now.size))
        } else {
            Some("it was modified".into())
        }
    }
}

/// Whether the kernel keeps `file` from changing (immutable or fs-verity); its identity if so.
fn unchangeable(file: &File) -> Option<Identity> {
    Identity::of(file).ok().filter(|id| id.unchangeable)
}

/// One model file the kernel keeps from changing, mapped read-only.
#[derive(Debug)]
pub struct MappedFile {
    file: File,
    /// Keeps the file's pages resident (populated, locked where allowed) for the clients that
    /// map the descriptor; the server never reads through it.
    map: Mmap,
    /// The file's name in the model, for errors.
    name: String,
    identity: Identity,
}

impl MappedFile {
    /// Maps all of `file` (a descriptor of its own, read-only as it was opened), its pages
    /// populated, and locked where the process may lock memory.
    #[allow(unsafe_code)] // mapping a file is unsafe in Rust: see the SAFETY note
    fn new(file: &File, name: &str, identity: Identity) -> Result<Self, Error> {
        let read_error = |e| Error::read(name, e);
        let file = file.try_clone().map_err(read_error)?;
        // SAFETY: a read-only shared mapping of a file the kernel keeps from changing; the server
        // never reads through it (see the module's doc), so a file changed anyway (its attribute
        // lifted by root) cannot fault the server.
        let map =
            unsafe { MmapOptions::new().len(identity.size as usize).populate().map(&file) }.map_err(read_error)?;
        // Locked pages stay resident under memory pressure; containers often may not lock, and
        // then the pages are the page cache's, reclaimable.
        let _ = map.lock();
        Ok(Self { file, map, name: name.to_owned(), identity })
    }
}

impl HostMemory for MappedFile {
    fn size(&self) -> usize {
        self.map.len()
    }

    /// Read through the descriptor, never the mapping: a file truncated under the server is an
    /// error here, where its pages would fault. Checked before and after, so bytes of a file
    /// changed meanwhile are never taken for the loaded ones.
    fn read(&self, at: usize, len: usize) -> io::Result<Cow<'_, [u8]>> {
        self.check().map_err(io::Error::other)?;
        let mut bytes = vec![0; len];
        FileExt::read_exact_at(&self.file, &mut bytes, at as u64)?;
        self.check().map_err(io::Error::other)?;
        Ok(Cow::Owned(bytes))
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

    fn check(&self) -> Result<(), FileChanged> {
        let changed = |what: String| FileChanged { file: self.name.clone(), what };
        let now = Identity::of(&self.file).map_err(|e| changed(format!("it can no longer be examined: {e}")))?;
        self.identity.change(&now).map_or(Ok(()), |what| Err(changed(what)))
    }
}

/// The plan's tensors as views into their files, mapped; `None` unless every file is local and
/// kept from changing by the kernel (then the load is read into a sealed memfd).
pub fn map_files(plan: &LoadPlan, files: &[Arc<dyn ReadAt>]) -> Option<Result<Box<dyn Placed>, Error>> {
    let locals: Vec<&File> = files.iter().map(|f| f.file()).collect::<Option<_>>()?;
    let identities: Vec<Identity> = locals.iter().map(|f| unchangeable(f)).collect::<Option<_>>()?;
    Some(map_local(plan, &locals, &identities))
}

fn map_local(plan: &LoadPlan, files: &[&File], identities: &[Identity]) -> Result<Box<dyn Placed>, Error> {
    let mut tensors = Vec::new();
    let planned = plan.components.iter().enumerate().flat_map(|(c, comp)| comp.files.iter().map(move |f| (c, f)));
    for (index, (((component, file_plan), file), identity)) in planned.zip(files).zip(identities).enumerate() {
        let memory: Arc<dyn HostMemory> = Arc::new(MappedFile::new(file, &file_plan.path, *identity)?);
        for t in &file_plan.tensors {
            let view = HostView::new(memory.clone(), t.offset as usize, t.len as usize, t.dtype, t.shape.clone())
                .ok_or_else(|| Error::Corrupt {
                    file: file_plan.path.clone(),
                    reason: format!("tensor {} lies past the end of the file: truncated while loading?", t.name),
                })?;
            tensors.push(PlacedTensor {
                component,
                device: 0,
                file: index,
                name: t.name.clone(),
                data: Box::new(view),
            });
        }
    }
    Ok(Box::new(Mapped { tensors }))
}

struct Mapped {
    tensors: Vec<PlacedTensor>,
}

impl Placed for Mapped {
    fn read_detail(&self, total: u64, _reading: Duration, _threads: usize) -> String {
        format!("{} tensors, {total} bytes mapped from their immutable files", self.tensors.len())
    }

    fn finish(self: Box<Self>, _total: u64, _reading: Duration) -> Result<(Vec<PlacedTensor>, String), Error> {
        let detail = "cpu: the tensors are the model's immutable files' pages, mapped read-only, ready to attach";
        Ok((self.tensors, detail.into()))
    }
}
