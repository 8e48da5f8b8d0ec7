//! Generated gRPC code for `modelloader.v1`: messages, the client and the server stubs, and the
//! encoded file descriptor set that reflection serves.
//!
//! Nothing but generated code lives here; conversions to domain types happen in the server.

#![allow(clippy::all, clippy::too_many_lines, missing_docs)]

/// `modelloader.v1`: the messages and the `ModelLoader` service.
pub mod v1 {
    tonic::include_proto!("modelloader.v1");
}

/// The encoded `FileDescriptorSet` of the proto, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("model_loader_descriptor");
