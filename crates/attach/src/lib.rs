//! The attach socket, both ends' shared part: its frames ([`wire`]: a 4-byte little-endian length
//! and one prost message, with the buffers' file descriptors passed by SCM_RIGHTS) and a Rust
//! client ([`Attached`]) that attaches to a resident model and maps its memory read-only, with no
//! copy. The protocol is documented with its messages in `proto/modelloader/v1`.
//!
//! This crate never loads, keeps or frees a model: the server's listener (`server::attach`)
//! answers with what the model manager holds.

mod client;
pub mod wire;

pub use crate::client::{AttachError, Attached, AttachedTensor};
pub use proto::v1::{AttachRequest, AttachResponse, AttachedBuffer, BufferKind, ModelFile};
