//! The client's one error: a gRPC code, a stable kind and a message for people.

use tonic::Code;

/// The metadata entry in which the server sends an error status's stable kind.
pub const KIND_KEY: &str = "model-loader-error-kind";

/// A failed call: the gRPC code, a stable machine-readable kind (`not_found`, `over_budget`,
/// `unreachable`, ...) and the message. Display is for people: the message and its kind.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", self.display())]
pub struct Error {
    code: Code,
    kind: String,
    message: String,
}

impl Error {
    /// An error with its parts; most come from a server's status (`From<tonic::Status>`).
    pub fn new(code: Code, kind: impl Into<String>, message: impl Into<String>) -> Self {
        Self { code, kind: kind.into(), message: message.into() }
    }

    /// Something the client refused before calling (an unreadable token file, a bad URL).
    pub fn bad_argument(message: impl Into<String>) -> Self {
        Self::new(Code::InvalidArgument, "bad_argument", message)
    }

    /// No connection could be made to `server`.
    pub(crate) fn unreachable(server: &str, cause: &dyn std::error::Error) -> Self {
        Self::new(
            Code::Unavailable,
            "unreachable",
            format!("cannot reach the server at {server}: is it running? ({})", chain(cause)),
        )
    }

    /// A unary call that got no answer within the request timeout.
    pub(crate) fn timeout(what: &str, after: std::time::Duration) -> Self {
        Self::new(Code::DeadlineExceeded, "timeout", format!("{what}: no answer within {after:?}"))
    }

    /// The gRPC code (`Unavailable` for an unreachable server).
    pub fn code(&self) -> Code {
        self.code
    }

    /// The server's kind (its `model-loader-error-kind`), else one from the code
    /// (`unavailable`, `unauthenticated`, ...); `unreachable` when no connection could be made,
    /// `timeout` when no answer came in time, `bad_argument` for the client's own checks.
    pub fn kind(&self) -> &str {
        &self.kind
    }

    /// The message, for people.
    pub fn message(&self) -> &str {
        &self.message
    }

    fn display(&self) -> String {
        // The unreachable message says all there is; the others name their kind for scripts.
        if self.kind == "unreachable" { self.message.clone() } else { format!("{} [{}]", self.message, self.kind) }
    }
}

impl From<tonic::Status> for Error {
    fn from(status: tonic::Status) -> Self {
        let kind = status
            .metadata()
            .get(KIND_KEY)
            .and_then(|v| v.to_str().ok())
            .filter(|k| !k.is_empty())
            .map_or_else(|| code_kind(status.code()).to_owned(), str::to_owned);
        let message = if status.message().is_empty() {
            // A status without a message (a proxy, a transport error) still says something.
            match std::error::Error::source(&status) {
                Some(source) => chain(source),
                None => format!("the call failed with {:?}", status.code()),
            }
        } else {
            status.message().to_owned()
        };
        Self { code: status.code(), kind, message }
    }
}

/// The kind of a status that carries none: its code in snake_case.
fn code_kind(code: Code) -> &'static str {
    match code {
        Code::Ok => "ok",
        Code::Cancelled => "cancelled",
        Code::Unknown => "unknown",
        Code::InvalidArgument => "invalid_argument",
        Code::DeadlineExceeded => "timeout",
        Code::NotFound => "not_found",
        Code::AlreadyExists => "already_exists",
        Code::PermissionDenied => "permission_denied",
        Code::ResourceExhausted => "resource_exhausted",
        Code::FailedPrecondition => "failed_precondition",
        Code::Aborted => "aborted",
        Code::OutOfRange => "out_of_range",
        Code::Unimplemented => "unimplemented",
        Code::Internal => "internal",
        Code::Unavailable => "unavailable",
        Code::DataLoss => "data_loss",
        Code::Unauthenticated => "unauthenticated",
    }
}

/// An error and its causes on one line ("a: b: c"), the way people read them.
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let next = cause.to_string();
        // Wrappers often repeat their cause's text.
        if !text.contains(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The server's kind wins over the code's; without one the code gives it.
    #[test]
    fn kind_from_metadata_else_code() {
        let mut status = tonic::Status::not_found("model org/x: no such model");
        status.metadata_mut().insert(KIND_KEY, tonic::metadata::MetadataValue::from_static("hub_not_found"));
        let e = Error::from(status);
        assert_eq!((e.code(), e.kind()), (Code::NotFound, "hub_not_found"));
        assert_eq!(e.to_string(), "model org/x: no such model [hub_not_found]");
        let e = Error::from(tonic::Status::unauthenticated("unknown token"));
        assert_eq!(e.kind(), "unauthenticated");
    }

    /// The unreachable message is the friendly sentence with its cause, no debug dump.
    #[test]
    fn unreachable_reads_well() {
        let cause = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "connection refused");
        let e = Error::unreachable("http://127.0.0.1:1", &cause);
        assert_eq!(e.to_string(), "cannot reach the server at http://127.0.0.1:1: is it running? (connection refused)");
        assert_eq!(e.kind(), "unreachable");
    }
}
