//! Why a load failed: the model, said once, and what failed in it, typed down to the I/O,
//! candle or hub error that caused it. [`LoadError::kind`] is the one match from an error to
//! its [`Kind`], which names it in logs and metrics and picks its gRPC code in the server.

use model_id::{InvalidRequest, ModelId};
use model_source::{HubFailure, ObjectError, ObjectFailure};
use resource_manager::ResourceError;

/// Why a load failed. Messages name the model, the file and the reason.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    InvalidRequest(#[from] InvalidRequest),
    #[error(transparent)]
    Resource(#[from] ResourceError),
    /// A request's device map that does not place the model (checked against its tensors).
    #[error(transparent)]
    DeviceMap(#[from] weights::device_map::DeviceMapError),
    /// Something the request asks that this server does not do (yet).
    #[error("{0}")]
    Unsupported(String),
    #[error("the server is shutting down")]
    ShuttingDown,
    /// The sources could not be set up (the hub client); no model is involved.
    #[error("configuring the sources: {0}")]
    Config(#[source] model_source::Error),
    /// The model is resident or loading otherwise than the request asks (another device or
    /// dtype): the request is refused rather than answered with something else.
    #[error("model {model_id} is {current}; asked for {asked}: unload it first to load it so")]
    Conflict { model_id: ModelId, current: String, asked: String },
    /// What failed while loading one model.
    #[error("model {model_id}{}{failure}", separator(failure))]
    Model { model_id: ModelId, failure: Failure },
}

/// What failed while loading a model.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    /// Its files: missing, unreadable, corrupt, unsupported; its placement; a cancel.
    #[error(transparent)]
    Weights(#[from] weights::Error),
    #[error("the hub failed ({failure}): {reason}")]
    Hub { failure: HubFailure, reason: String },
    #[error("the object store failed ({failure}): {reason}")]
    Object { failure: ObjectFailure, reason: String },
    /// File I/O that did not finish in time: a stalled filesystem, not bad input.
    #[error("{what} did not finish within {after:?}: is the filesystem stalled?")]
    Stalled { what: &'static str, after: std::time::Duration },
    /// A bug: a rule of the loader broken.
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<model_source::Error> for Failure {
    fn from(e: model_source::Error) -> Self {
        match e {
            model_source::Error::Files(e) => Self::Weights(e),
            model_source::Error::Hub { failure, reason } => Self::Hub { failure, reason },
            model_source::Error::Object(e) => Self::Object { failure: e.failure, reason: e.reason },
        }
    }
}

/// "model m not found: ...", "model m has only pickle weights ...", "model m: ..." otherwise.
fn separator(failure: &Failure) -> &'static str {
    match failure {
        Failure::Weights(weights::Error::NotFound(_) | weights::Error::PickleOnly { .. }) => " ",
        _ => ": ",
    }
}

/// What kind of failure an error is: one name each, for logs and metrics, and the gRPC code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    InvalidRequest,
    InvalidDevice,
    Conflict,
    DeviceUnavailable,
    OverBudget,
    NotFound,
    PathEscapes,
    PickleOnly,
    UnsupportedDtype,
    Corrupt,
    BadConfig,
    /// A file past a limit of the server (JSON size, tensor count).
    OverLimit,
    /// A model path that is not a regular file, or a symlink loop: the folder is wrong, not the
    /// server.
    NotAFile,
    ReadWeights,
    Stalled,
    PlaceOnDevice,
    Hub(HubFailure),
    Object(ObjectFailure),
    Cancelled,
    ShuttingDown,
    /// Asked of the server, which does not do it.
    Unsupported,
    Internal,
}

impl Kind {
    /// A stable name, for logs and metrics.
    pub fn name(self) -> &'static str {
        match self {
            Self::InvalidRequest => "invalid_request",
            Self::InvalidDevice => "invalid_device",
            Self::Conflict => "conflict",
            Self::DeviceUnavailable => "device_unavailable",
            Self::OverBudget => "over_budget",
            Self::NotFound => "not_found",
            Self::PathEscapes => "path_escapes",
            Self::PickleOnly => "pickle_only",
            Self::UnsupportedDtype => "unsupported_dtype",
            Self::Corrupt => "corrupt",
            Self::BadConfig => "bad_config",
            Self::OverLimit => "over_limit",
            Self::NotAFile => "not_a_file",
            Self::ReadWeights => "read_weights",
            Self::Stalled => "stalled",
            Self::PlaceOnDevice => "place_on_device",
            Self::Hub(failure) => failure.kind(),
            Self::Object(failure) => failure.kind(),
            Self::Cancelled => "cancelled",
            Self::ShuttingDown => "shutting_down",
            Self::Unsupported => "unsupported",
            Self::Internal => "internal",
        }
    }
}

impl LoadError {
    /// `failure` in a load of `model_id`.
    pub fn model(model_id: &ModelId, failure: impl Into<Failure>) -> Self {
        Self::Model { model_id: model_id.clone(), failure: failure.into() }
    }

    pub fn cancelled(model_id: &ModelId) -> Self {
        Self::model(model_id, weights::Error::Cancelled)
    }

    pub fn not_found(model_id: &ModelId, reason: impl Into<String>) -> Self {
        Self::model(model_id, weights::Error::NotFound(reason.into()))
    }

    pub fn internal(model_id: &ModelId, reason: impl Into<String>) -> Self {
        Self::model(model_id, Failure::Internal(reason.into()))
    }

    pub fn is_cancelled(&self) -> bool {
        self.kind() == Kind::Cancelled
    }

    /// The one match from an error to its kind.
    pub fn kind(&self) -> Kind {
        use weights::Error as W;
        match self {
            Self::InvalidRequest(_) => Kind::InvalidRequest,
            Self::Resource(ResourceError::InvalidDevice(_) | ResourceError::InvalidPlacement(_))
            | Self::DeviceMap(_) => Kind::InvalidDevice,
            Self::Unsupported(_) => Kind::Unsupported,
            Self::Resource(ResourceError::DeviceUnavailable { .. }) => Kind::DeviceUnavailable,
            Self::Resource(
                ResourceError::OverBudget { .. }
                | ResourceError::LargerThanBudget { .. }
                | ResourceError::NoRoom { .. },
            ) => Kind::OverBudget,
            Self::ShuttingDown => Kind::ShuttingDown,
            Self::Conflict { .. } => Kind::Conflict,
            Self::Config(_) | Self::Model { failure: Failure::Internal(_), .. } => Kind::Internal,
            Self::Model { failure: Failure::Hub { failure, .. }, .. } => Kind::Hub(*failure),
            Self::Model { failure: Failure::Object { failure, .. }, .. } => Kind::Object(*failure),
            Self::Model { failure: Failure::Stalled { .. }, .. } => Kind::Stalled,
            Self::Model { failure: Failure::Weights(e), .. } => match e {
                W::NotFound(_) => Kind::NotFound,
                W::PathEscapes { .. } => Kind::PathEscapes,
                W::PickleOnly { .. } => Kind::PickleOnly,
                W::UnsupportedDtype { .. } => Kind::UnsupportedDtype,
                W::Corrupt { .. } => Kind::Corrupt,
                W::BadConfig { .. } => Kind::BadConfig,
                W::OverLimit { .. } => Kind::OverLimit,
                W::NotAFile { .. } => Kind::NotAFile,
                W::Read { source, .. } if is_bad_path(source) => Kind::NotAFile,
                W::Read { source, .. } => {
                    ObjectError::of(source).map_or(Kind::ReadWeights, |e| Kind::Object(e.failure))
                }
                W::Place { .. } => Kind::PlaceOnDevice,
                W::Cancelled => Kind::Cancelled,
                W::Internal(_) => Kind::Internal,
            },
        }
    }
}

/// An I/O error that says the path is wrong (a directory where a file belongs, a file where a
/// folder belongs, a name too long), not that the server failed.
fn is_bad_path(e: &std::io::Error) -> bool {
    use std::io::ErrorKind as E;
    matches!(e.kind(), E::IsADirectory | E::NotADirectory | E::InvalidFilename)
}
