//! Memory that other processes can map: where resident tensors live when a load places them for
//! attach (a sealed memfd, the model's own file, a CUDA VMM allocation). The attach socket sends
//! each [`SharedMemory`]'s file descriptor and every tensor's [`Region`] in it.

use std::os::fd::BorrowedFd;

/// What a [`SharedMemory`]'s file descriptor is, for the client that maps it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, strum::Display)]
#[strum(serialize_all = "snake_case")]
pub enum MemoryKind {
    /// A memfd sealed against writes, growth and shrinking.
    HostMemfd,
    /// The model's file, opened read-only: only a file the kernel keeps from changing
    /// (immutable, or fs-verity).
    HostFile,
    /// A CUDA VMM allocation exported as a POSIX file descriptor.
    CudaVmm,
}

/// Memory another process can map by its file descriptor.
pub trait SharedMemory: Send + Sync + std::fmt::Debug {
    fn kind(&self) -> MemoryKind;
    /// Lent for as long as the memory lives (the attach socket duplicates it into the client).
    fn fd(&self) -> BorrowedFd<'_>;
    /// Bytes a client maps.
    fn size(&self) -> u64;
    /// Whether its bytes are still the ones loaded: a model's file is checked against what it was
    /// at load; a sealed memfd (a snapshot nobody can change) and device memory always are.
    fn check(&self) -> Result<(), FileChanged> {
        Ok(())
    }
}

/// A model file mapped for attach changed after it was loaded (its immutable attribute removed,
/// then rewritten or truncated): its pages are no longer the bytes that were loaded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("its file {file} changed after it was loaded ({what})")]
pub struct FileChanged {
    /// The file, relative to the model's folder.
    pub file: String,
    pub what: String,
}

/// Where a tensor's bytes are in a [`SharedMemory`].
#[derive(Debug, Clone, Copy)]
pub struct Region<'a> {
    pub memory: &'a dyn SharedMemory,
    /// Its first byte.
    pub offset: u64,
}
