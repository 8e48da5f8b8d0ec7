//! The one table mapping errors to gRPC status codes. Nothing is logged here: errors are logged
//! where they are handled.

use model_manager::{HubFailure, Kind, LoadError, ManagerError, ObjectFailure};
use tonic::{Code, Status};

/// The gRPC status for a facade error.
pub fn from_manager(e: &ManagerError) -> Status {
    match e {
        ManagerError::Load(e) => from_load(e),
        ManagerError::NotLoaded { .. } | ManagerError::Attached { .. } => Status::failed_precondition(e.to_string()),
        ManagerError::ReadBack(_) => Status::internal(e.to_string()),
        ManagerError::Changed { .. } => Status::data_loss(e.to_string()),
    }
}

/// The gRPC status for a load error.
pub fn from_load(e: &LoadError) -> Status {
    let code = match e.kind() {
        Kind::InvalidRequest | Kind::InvalidDevice => Code::InvalidArgument,
        Kind::DeviceUnavailable | Kind::PickleOnly | Kind::UnsupportedDtype | Kind::NotAFile | Kind::Conflict => {
            Code::FailedPrecondition
        }
        Kind::OverBudget | Kind::OverLimit => Code::ResourceExhausted,
        Kind::NotFound | Kind::Hub(HubFailure::NotFound) | Kind::Object(ObjectFailure::NotFound) => Code::NotFound,
        Kind::PathEscapes | Kind::Hub(HubFailure::PermissionDenied) | Kind::Object(ObjectFailure::PermissionDenied) => {
            Code::PermissionDenied
        }
        Kind::Corrupt | Kind::BadConfig => Code::DataLoss,
        Kind::Hub(HubFailure::Unauthenticated) | Kind::Object(ObjectFailure::Unauthenticated) => Code::Unauthenticated,
        Kind::Hub(HubFailure::Unavailable)
        | Kind::Object(ObjectFailure::Unavailable)
        | Kind::ShuttingDown
        | Kind::Stalled => Code::Unavailable,
        Kind::Object(ObjectFailure::Changed) => Code::Aborted,
        Kind::Cancelled => Code::Cancelled,
        Kind::ReadWeights
        | Kind::PlaceOnDevice
        | Kind::Hub(HubFailure::Other)
        | Kind::Object(ObjectFailure::Other)
        | Kind::Internal => Code::Internal,
    };
    Status::new(code, e.to_string())
}
