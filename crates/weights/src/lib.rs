//! A load's weights, from file names to bytes in place: which files of a folder to read
//! ([`choice`]), each safetensors header validated ([`header`]), the load plan ([`plan`]), and
//! step 4's reader ([`read`]), which fills the load's [`Placement`] — host memory
//! ([`HostPlacement`]), host memory other processes attach to ([`SharedHostPlacement`]: the
//! files mapped, or a sealed memfd) or pinned staging → CUDA ([`StagedPlacement`]) — with
//! positioned reads through [`ReadAt`], on several threads, cancellable between chunks. The
//! model's small files that travel with it (configs, tokenizer) are chosen and read in
//! [`small_files`].
//!
//! It never finds or downloads a model (a source hands it [`ModelFiles`]), never books memory
//! against a budget (`resource-manager` does), never keeps a loaded model (`pipeline-manager`
//! does) and never names the model it reads: its errors say what failed, the loader says where.

pub mod choice;
pub mod device_map;
mod error;
pub mod files;
pub mod header;
mod host;
mod mapped;
mod memfd;
pub mod placement;
pub mod plan;
pub mod read;
pub mod small_files;
mod split;
// The GPU's placement; its scheduling is built and tested in every build.
mod staged;
#[cfg(feature = "cuda")]
mod vmm;

#[cfg(feature = "cuda")]
pub use crate::vmm::{VmmPlacement, VmmView};
pub use crate::{
    error::Error,
    files::{ModelFiles, ReadAt, Reading},
    header::MAX_HEADER_BYTES,
    host::{CHUNK_BYTES, HostBuffer, HostMemory, HostPlacement, HostView},
    mapped::MappedFile,
    memfd::{Memfd, SharedHostPlacement},
    placement::{Placed, PlacedTensor, Placement},
    plan::{Layout, LoadPlan},
    split::DevicesPlacement,
    staged::StagedPlacement,
};
