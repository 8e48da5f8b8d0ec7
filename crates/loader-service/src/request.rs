//! What a load is asked to do, validated: the model (see `model-id`), the device or devices (and
//! how the model goes over several) and the dtype.

pub use model_id::{DEFAULT_REVISION, InvalidRequest, ModelId, Revision, TargetDtype};
use resource_manager::{DeviceId, Layout, TargetRequest};

/// A validated LoadModel request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadRequest {
    pub model_id: ModelId,
    pub revision: Revision,
    /// `None`: the server's default device.
    pub device: Option<TargetRequest>,
    /// How a model goes over several devices; `None`: split.
    pub placement: Option<Layout>,
    /// For a split load: module prefixes to devices (`weights::device_map`); empty: balanced.
    pub device_map: Vec<(String, DeviceId)>,
    /// `None`: as stored (or the server's default dtype).
    pub dtype: Option<TargetDtype>,
}

impl LoadRequest {
    pub fn new(model_id: ModelId) -> Self {
        Self {
            model_id,
            revision: Revision::default(),
            device: None,
            placement: None,
            device_map: Vec::new(),
            dtype: None,
        }
    }
}
