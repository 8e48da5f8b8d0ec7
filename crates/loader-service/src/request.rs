//! What a load is asked to do, validated: the model (see `model-id`), the device and the dtype.

pub use model_id::{DEFAULT_REVISION, InvalidRequest, ModelId, Revision, TargetDtype};
use resource_manager::DeviceRequest;

/// A validated LoadModel request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadRequest {
    pub model_id: ModelId,
    pub revision: Revision,
    /// `None`: the server's default device.
    pub device: Option<DeviceRequest>,
    /// `None`: as stored (or the server's default dtype).
    pub dtype: Option<TargetDtype>,
}

impl LoadRequest {
    pub fn new(model_id: ModelId) -> Self {
        Self { model_id, revision: Revision::default(), device: None, dtype: None }
    }
}
