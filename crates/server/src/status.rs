//! The one table mapping errors to gRPC status codes. Nothing is logged here: errors are logged
//! where they are handled.

use model_manager::{HubFailure, LoadError, ManagerError, resource_manager::ResourceError};
use tonic::{Code, Status};

/// The gRPC status for a facade error.
pub fn from_manager(e: &ManagerError) -> Status {
    match e {
        ManagerError::Load(e) => from_load(e),
        ManagerError::NotLoaded { .. } => Status::failed_precondition(e.to_string()),
        ManagerError::ReadBack(_) => Status::internal(e.to_string()),
    }
}

/// The gRPC status for a load error.
pub fn from_load(e: &LoadError) -> Status {
    let code = match e {
        LoadError::InvalidRequest(_) | LoadError::Resource(ResourceError::InvalidDevice(_)) => Code::InvalidArgument,
        LoadError::Resource(ResourceError::DeviceUnavailable { .. }) => Code::FailedPrecondition,
        LoadError::Resource(
            ResourceError::OverBudget { .. } | ResourceError::LargerThanBudget { .. } | ResourceError::NoRoom { .. },
        ) => Code::ResourceExhausted,
        LoadError::NotFound { .. } => Code::NotFound,
        LoadError::PathEscapes { .. } => Code::PermissionDenied,
        LoadError::PickleOnly { .. } | LoadError::UnsupportedDtype { .. } => Code::FailedPrecondition,
        LoadError::Corrupt { .. } | LoadError::BadConfig { .. } => Code::DataLoss,
        LoadError::Hub { failure, .. } => match failure {
            HubFailure::NotFound => Code::NotFound,
            HubFailure::Unauthenticated => Code::Unauthenticated,
            HubFailure::PermissionDenied => Code::PermissionDenied,
            HubFailure::Unavailable => Code::Unavailable,
            HubFailure::Other => Code::Internal,
        },
        LoadError::Cancelled { .. } => Code::Cancelled,
        LoadError::ShuttingDown => Code::Unavailable,
        LoadError::ReadWeights { .. } | LoadError::PlaceOnDevice { .. } | LoadError::Internal { .. } => Code::Internal,
    };
    Status::new(code, e.to_string())
}
