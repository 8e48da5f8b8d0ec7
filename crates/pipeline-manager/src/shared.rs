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
    /// The model's file, opened read-only.
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
}

/// Where a tensor's bytes are in a [`SharedMemory`].
#[derive(Debug, Clone, Copy)]
pub struct Region<'a> {
    pub memory: &'a dyn SharedMemory,
    /// Its first byte.
    pub offset: u64,
}
