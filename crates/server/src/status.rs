//! The one table mapping errors to gRPC status codes. Nothing is logged here: errors are logged
//! where they are handled.

use model_manager::{HubFailure, Kind, LoadError, ManagerError, ObjectFailure};
use tonic::{Code, Status};

/// The metadata entry holding an error status's stable kind (`not_found`, `corrupt`, ...), so a
/// client need not parse the message. The proto's `ModelStatus.error_kind` lists the kinds.
pub const KIND_KEY: &str = "model-loader-error-kind";

/// The gRPC status for a facade error, with its kind.
pub fn from_manager(e: &ManagerError) -> Status {
    let status = match e {
        ManagerError::Load(e) => return from_load(e),
        ManagerError::NotLoaded { .. } | ManagerError::Attached { .. } => Status::failed_precondition(e.to_string()),
        ManagerError::NoSuchFile { .. } => Status::not_found(e.to_string()),
        ManagerError::ReadBack(_) => Status::internal(e.to_string()),
        ManagerError::Changed { .. } => Status::data_loss(e.to_string()),
    };
    with_kind(status, e.kind())
}

/// `status` carrying `kind` in its metadata.
fn with_kind(mut status: Status, kind: &'static str) -> Status {
    status.metadata_mut().insert(KIND_KEY, tonic::metadata::MetadataValue::from_static(kind));
    status
}

/// The gRPC status for a load error, with its kind.
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
        Kind::Unsupported => Code::Unimplemented,
        Kind::ReadWeights
        | Kind::PlaceOnDevice
        | Kind::Hub(HubFailure::Other)
        | Kind::Object(ObjectFailure::Other)
        | Kind::Internal => Code::Internal,
    };
    with_kind(Status::new(code, e.to_string()), e.kind().name())
}
