//! Why a load failed, one variant per thing that can go wrong, named after what failed.

use std::{io, path::PathBuf};

use resource_manager::ResourceError;

use crate::request::InvalidRequest;

/// Why a load failed. Messages name the model, the file and the reason; the server maps each
/// variant to one gRPC code.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    InvalidRequest(#[from] InvalidRequest),
    #[error(transparent)]
    Resource(#[from] ResourceError),
    #[error("model {model_id} not found: {reason}")]
    NotFound { model_id: String, reason: String },
    #[error("model {model_id}: refusing to open {path}: it leads outside the model root and the HF cache")]
    PathEscapes { model_id: String, path: PathBuf },
    #[error(
        "model {model_id} has only pickle weights ({files}); they are refused, never unpickled: convert them to safetensors"
    )]
    PickleOnly { model_id: String, files: String },
    #[error("model {model_id}: {file}: tensor {tensor} has dtype {dtype}, which this server cannot hold")]
    UnsupportedDtype { model_id: String, file: String, tensor: String, dtype: String },
    #[error("model {model_id}: {file} is corrupt: {reason}")]
    Corrupt { model_id: String, file: String, reason: String },
    #[error("model {model_id}: {file} is not valid JSON: {reason}")]
    BadConfig { model_id: String, file: String, reason: String },
    #[error("model {model_id}: cannot read {file}: {source}")]
    ReadWeights {
        model_id: String,
        file: String,
        #[source]
        source: io::Error,
    },
    #[error("model {model_id}: the hub failed ({failure}): {reason}")]
    Hub { model_id: String, failure: HubFailure, reason: String },
    #[error("model {model_id}: cannot place tensors on {device}: {reason}")]
    PlaceOnDevice { model_id: String, device: String, reason: String },
    #[error("model {model_id}: load cancelled")]
    Cancelled { model_id: String },
    #[error("the server is shutting down")]
    ShuttingDown,
    #[error("model {model_id}: internal error: {reason}")]
    Internal { model_id: String, reason: String },
}

impl LoadError {
    /// A stable name per variant, for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::InvalidRequest(_) => "invalid_request",
            Self::Resource(ResourceError::InvalidDevice(_)) => "invalid_device",
            Self::Resource(ResourceError::DeviceUnavailable { .. }) => "device_unavailable",
            Self::Resource(
                ResourceError::OverBudget { .. }
                | ResourceError::LargerThanBudget { .. }
                | ResourceError::NoRoom { .. },
            ) => "over_budget",
            Self::NotFound { .. } => "not_found",
            Self::PathEscapes { .. } => "path_escapes",
            Self::PickleOnly { .. } => "pickle_only",
            Self::UnsupportedDtype { .. } => "unsupported_dtype",
            Self::Corrupt { .. } => "corrupt",
            Self::BadConfig { .. } => "bad_config",
            Self::ReadWeights { .. } => "read_weights",
            Self::PlaceOnDevice { .. } => "place_on_device",
            Self::Hub { failure, .. } => failure.kind(),
            Self::Cancelled { .. } => "cancelled",
            Self::ShuttingDown => "shutting_down",
            Self::Internal { .. } => "internal",
        }
    }
}

/// How a hub request failed, for the gRPC code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, strum::Display)]
#[strum(serialize_all = "snake_case")]
pub enum HubFailure {
    /// Unknown repo, revision or file.
    NotFound,
    /// 401: no token, or a token the hub rejected.
    Unauthenticated,
    /// 403, or a gated repo.
    PermissionDenied,
    /// 5xx, timeouts, refused connections (after hf-hub's bounded retries).
    Unavailable,
    Other,
}

impl HubFailure {
    pub fn kind(self) -> &'static str {
        match self {
            Self::NotFound => "hub_not_found",
            Self::Unauthenticated => "hub_unauthenticated",
            Self::PermissionDenied => "hub_permission_denied",
            Self::Unavailable => "hub_unavailable",
            Self::Other => "hub_other",
        }
    }
}
