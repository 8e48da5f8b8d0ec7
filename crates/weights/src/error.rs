//! What can go wrong planning or reading a model's weights. No variant names the model: the
//! loader says which model once, around the whole error.

use std::io;

use resource_manager::staging::DeviceError;

/// Why a plan or a read failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The model has no weights this loader reads, or a file the plan needs is missing.
    #[error("not found: {0}")]
    NotFound(String),
    /// A path leads (through a symlink) outside the root the model was found in.
    #[error("refusing to open {path}: it leads outside the model root and the HF cache")]
    PathEscapes { path: String },
    #[error("has only pickle weights ({files}); they are refused, never unpickled: convert them to safetensors")]
    PickleOnly { files: String },
    #[error("{file}: tensor {tensor} has dtype {dtype}, which this server cannot hold")]
    UnsupportedDtype { file: String, tensor: String, dtype: String },
    #[error("{file} is corrupt: {reason}")]
    Corrupt { file: String, reason: String },
    /// A model file that is a FIFO, a directory, a socket or a device: never read (a FIFO would
    /// block the load for ever).
    #[error("{file} is {what}, not a regular file")]
    NotAFile { file: String, what: &'static str },
    /// A file past one of the server's limits (JSON side file size, tensors per model), refused
    /// before it takes memory the budget does not count.
    #[error("{file}: {what}")]
    OverLimit { file: String, what: String },
    /// A JSON side file that is not JSON, or JSON of another shape than the one it must have:
    /// `reason` says which.
    #[error("{file}: {reason}")]
    BadConfig { file: String, reason: String },
    #[error("cannot read {file}: {source}")]
    Read {
        file: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot place tensors on {device}: {source}")]
    Place {
        device: String,
        #[source]
        source: Box<DeviceError>,
    },
    #[error("load cancelled")]
    Cancelled,
    /// A bug: a placement or a reader broke a rule of the other.
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    /// The device `device` refused what a placement asked of it.
    pub fn place(device: &str, source: DeviceError) -> Self {
        Self::Place { device: device.to_owned(), source: Box::new(source) }
    }

    /// A failed read of `file`: a file that ends early was truncated (or changed) under the load.
    pub fn read(file: &str, source: io::Error) -> Self {
        if source.kind() == io::ErrorKind::UnexpectedEof {
            Self::Corrupt {
                file: file.to_owned(),
                reason: "the file ended before its last tensor: truncated while loading?".into(),
            }
        } else {
            Self::Read { file: file.to_owned(), source }
        }
    }
}
