//! A Rust client of the attach socket: one request, one response with the model's buffers, each
//! host buffer mapped read-only and shared (the server's own memory, no copy). The connection is
//! the lease: it lasts as long as the [`Attached`].

use std::{
    fs::File,
    os::{fd::OwnedFd, unix::net::UnixStream},
    path::Path,
    time::Duration,
};

use memmap2::{Mmap, MmapOptions};
use prost::Message;
use proto::v1::{AttachRequest, AttachResponse, AttachedBuffer, BufferKind, ModelFile, ModelStatus};

use crate::wire;

/// Why an attach failed.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("the attach socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("the server's answer does not decode: {0}")]
    Decode(#[from] prost::DecodeError),
    /// The server refused, with a gRPC status code.
    #[error("refused with code {code}: {message}")]
    Refused { code: i32, message: String },
    #[error("the server's answer does not add up: {0}")]
    Protocol(String),
}

/// One tensor of an attached model.
pub type AttachedTensor = proto::v1::AttachedTensor;

/// A model attached: its buffers (host ones mapped read-only) and tensors, while the lease lasts.
#[derive(Debug)]
pub struct Attached {
    // Kept open: it is the lease.
    socket: UnixStream,
    response: AttachResponse,
    /// One per buffer: the mapping of a host buffer; `None` for a device's.
    maps: Vec<Option<Mmap>>,
    /// Device buffers' descriptors, for the caller to import.
    fds: Vec<OwnedFd>,
}

impl Attached {
    /// Attaches to the model `request` names through the socket at `path`, waiting at most
    /// `timeout` for the answer.
    pub fn attach(path: &Path, request: &AttachRequest, timeout: Duration) -> Result<Self, AttachError> {
        let socket = UnixStream::connect(path)?;
        socket.set_read_timeout(Some(timeout))?;
        // A server that refuses at once (too many clients) answers and closes before reading the
        // request: the write then fails with EPIPE, but the refusal is waiting to be read.
        match wire::write_frame(&socket, &wire::encode(request), &[]) {
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
            result => result?,
        }
        let (body, fds) = wire::read_frame(&socket, wire::MAX_RESPONSE_BYTES)?;
        let response = AttachResponse::decode(body.as_slice())?;
        if response.code != 0 {
            return Err(AttachError::Refused { code: response.code, message: response.message });
        }
        if fds.len() != response.buffers.len() {
            return Err(AttachError::Protocol(format!(
                "{} buffers and {} file descriptors",
                response.buffers.len(),
                fds.len()
            )));
        }
        let mut maps = Vec::with_capacity(fds.len());
        let mut device_fds = Vec::new();
        for (buffer, fd) in response.buffers.iter().zip(fds) {
            match buffer.kind() {
                BufferKind::HostMemfd | BufferKind::HostFile => maps.push(Some(map_read_only(fd, buffer.size_bytes)?)),
                _ => {
                    maps.push(None);
                    device_fds.push(fd);
                }
            }
        }
        let attached = Self { socket, response, maps, fds: device_fds };
        attached.check()?;
        Ok(attached)
    }

    /// Every tensor lies inside its buffer.
    fn check(&self) -> Result<(), AttachError> {
        for t in &self.response.tensors {
            let buffer = self.response.buffers.get(t.buffer as usize);
            let fits =
                buffer.is_some_and(|b| t.offset.checked_add(t.size_bytes).is_some_and(|end| end <= b.size_bytes));
            if !fits {
                return Err(AttachError::Protocol(format!("tensor {} lies outside its buffer", t.name)));
            }
        }
        Ok(())
    }

    pub fn status(&self) -> Option<&ModelStatus> {
        self.response.status.as_ref()
    }

    pub fn buffers(&self) -> &[AttachedBuffer] {
        &self.response.buffers
    }

    /// Sorted by name.
    pub fn tensors(&self) -> &[AttachedTensor] {
        &self.response.tensors
    }

    /// The model's small files (configs, tokenizer), sorted by path; their `content` is there
    /// when the request set `include_files`.
    pub fn files(&self) -> &[ModelFile] {
        &self.response.files
    }

    /// The bytes of a tensor in host memory (read-only, the server's own pages); `None` on a
    /// device.
    pub fn bytes(&self, tensor: &AttachedTensor) -> Option<&[u8]> {
        let map = self.maps.get(tensor.buffer as usize)?.as_ref()?;
        map.get(tensor.offset as usize..(tensor.offset + tensor.size_bytes) as usize)
    }

    /// Whether the server closed the connection (a forced unload, shutdown) within `timeout`:
    /// the lease is over, though the mappings stay valid until this value is dropped.
    pub fn closed_by_server(&self, timeout: Duration) -> Result<bool, AttachError> {
        self.socket.set_read_timeout(Some(timeout))?;
        let mut byte = [0u8; 1];
        match std::io::Read::read(&mut &self.socket, &mut byte) {
            Ok(0) => Ok(true),
            Ok(_) => Err(AttachError::Protocol("the server sent more after its answer".into())),
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// The descriptors of device buffers, in buffer order, for the caller to import.
    pub fn device_fds(&self) -> &[OwnedFd] {
        &self.fds
    }
}

/// Maps `size` bytes of `fd` read-only and shared.
#[allow(unsafe_code)] // mapping a file is unsafe in Rust: see the SAFETY note
fn map_read_only(fd: OwnedFd, size: u64) -> Result<Mmap, AttachError> {
    let file = File::from(fd);
    if size == 0 {
        return Err(AttachError::Protocol("a buffer of 0 bytes".into()));
    }
    // SAFETY: the server sealed the memfd against writes, growth and shrinking (or sends a file
    // it only reads): the pages cannot change or vanish under the mapping.
    Ok(unsafe { MmapOptions::new().len(size as usize).map(&file) }?)
}
