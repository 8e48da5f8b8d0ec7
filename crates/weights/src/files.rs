//! How the planner and the readers see a model's files, wherever they are: a listing by folder,
//! and files opened for positioned reads. Sources (`model-source`) implement these; a remote
//! object can serve [`ReadAt`] as well as a local file.

use std::{fs::File, io, os::unix::fs::FileExt, sync::Arc};

use crate::Error;

/// A file read at byte offsets, from any number of threads at once.
pub trait ReadAt: Send + Sync {
    /// Its length in bytes.
    fn size(&self) -> io::Result<u64>;
    /// Fills `buf` with the bytes at `offset`; `UnexpectedEof` if the file ends first.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// The local file it is, if it is one (a placement may map it instead of reading it).
    fn file(&self) -> Option<&File> {
        None
    }
}

impl ReadAt for File {
    fn size(&self) -> io::Result<u64> {
        Ok(self.metadata()?.len())
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        FileExt::read_exact_at(self, buf, offset)
    }

    fn file(&self) -> Option<&File> {
        Some(self)
    }
}

/// The files of one located model, by paths relative to its folder (`unet/config.json`): never
/// a path of the host, so errors can name them.
pub trait ModelFiles: Send + Sync {
    /// The names in folder `dir` (`""` is the model's own folder), files and folders, sorted.
    fn list(&self, dir: &str) -> Result<Vec<String>, Error>;
    /// Whether `dir` is a folder of the model.
    fn is_dir(&self, dir: &str) -> Result<bool, Error>;
    /// Opens `path` for positioned reads; `None` if it does not exist.
    fn open(&self, path: &str) -> Result<Option<Arc<dyn ReadAt>>, Error>;
    /// How its files are best read, where that differs from a local disk: a remote store wants
    /// many large requests in flight.
    fn reading(&self) -> Option<Reading> {
        None
    }
}

/// How step 4 reads a source's files: this many readers at once, in chunks of this many bytes
/// (or the most the placement takes, if that is less).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reading {
    pub threads: usize,
    pub chunk_bytes: usize,
}

/// `dir/name`, or `name` in the model's own folder.
pub fn join(dir: &str, name: &str) -> String {
    if dir.is_empty() { name.to_owned() } else { format!("{dir}/{name}") }
}
