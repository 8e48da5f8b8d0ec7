//! The exit codes: one table, printed in `--help` and the README.

use std::process::ExitCode;

use tonic::Code;

/// Success.
pub const OK: u8 = 0;
/// NOT_FOUND: no such model.
pub const NOT_FOUND: u8 = 3;
/// INVALID_ARGUMENT, FAILED_PRECONDITION, OUT_OF_RANGE, ALREADY_EXISTS: the request cannot be
/// served as asked (a bad id or dtype, a model not loaded, attached clients).
pub const REFUSED: u8 = 4;
/// RESOURCE_EXHAUSTED: over the memory budget or a server limit.
pub const RESOURCE_EXHAUSTED: u8 = 5;
/// DATA_LOSS: corrupt or changed weights.
pub const DATA_LOSS: u8 = 6;
/// CANCELLED: the load was cancelled.
pub const CANCELLED: u8 = 7;
/// UNAUTHENTICATED, PERMISSION_DENIED: a missing, unknown or read-only token.
pub const DENIED: u8 = 8;
/// UNAVAILABLE, DEADLINE_EXCEEDED: the server is unreachable, shutting down, or too slow.
pub const UNAVAILABLE: u8 = 9;
/// Any other gRPC code (INTERNAL, UNKNOWN, ABORTED, UNIMPLEMENTED).
pub const OTHER: u8 = 10;
/// Interrupted with Ctrl-C (a load goes on unless it was cancelled).
pub const INTERRUPTED: u8 = 130;

/// The `--help` text of the table above.
pub const TABLE: &str = "\
Exit codes:
  0    ok
  2    usage: the command line was refused
  3    not found
  4    invalid argument or failed precondition (e.g. not loaded, clients attached)
  5    resource exhausted (over the memory budget or a server limit)
  6    data loss (corrupt or changed weights)
  7    cancelled
  8    unauthenticated or permission denied
  9    unavailable: the server is unreachable, shutting down or timed out
  10   any other error
  130  interrupted with Ctrl-C";

/// The exit code for a gRPC status code.
pub fn for_code(code: Code) -> u8 {
    match code {
        Code::Ok => OK,
        Code::NotFound => NOT_FOUND,
        Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange | Code::AlreadyExists => REFUSED,
        Code::ResourceExhausted => RESOURCE_EXHAUSTED,
        Code::DataLoss => DATA_LOSS,
        Code::Cancelled => CANCELLED,
        Code::Unauthenticated | Code::PermissionDenied => DENIED,
        Code::Unavailable | Code::DeadlineExceeded => UNAVAILABLE,
        Code::Unknown | Code::Internal | Code::Aborted | Code::Unimplemented => OTHER,
    }
}

/// An [`ExitCode`] from one of the codes above.
pub fn code(value: u8) -> ExitCode {
    ExitCode::from(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every gRPC code has an exit code, and the help table names each exit code there is.
    #[test]
    fn every_code_is_in_the_table() {
        let codes = [
            Code::Ok,
            Code::Cancelled,
            Code::Unknown,
            Code::InvalidArgument,
            Code::DeadlineExceeded,
            Code::NotFound,
            Code::AlreadyExists,
            Code::PermissionDenied,
            Code::ResourceExhausted,
            Code::FailedPrecondition,
            Code::Aborted,
            Code::OutOfRange,
            Code::Unimplemented,
            Code::Internal,
            Code::Unavailable,
            Code::DataLoss,
            Code::Unauthenticated,
        ];
        for code in codes {
            let exit = for_code(code);
            assert!(TABLE.lines().any(|l| l.trim_start().starts_with(&format!("{exit} "))), "{code:?} -> {exit}");
        }
        assert_eq!(for_code(Code::NotFound), 3);
        assert_eq!(for_code(Code::Unavailable), 9);
        assert!(TABLE.contains("2    usage") && TABLE.contains(&format!("{INTERRUPTED}  interrupted")));
    }
}
