"""Exceptions carrying a gRPC status code."""

from __future__ import annotations

# The gRPC status codes (https://grpc.github.io/grpc/core/md_doc_statuscodes.html). The attach
# socket answers with the same numbers the same request over gRPC would get.
CODE_NAMES: dict[int, str] = {
    0: "OK",
    1: "CANCELLED",
    2: "UNKNOWN",
    3: "INVALID_ARGUMENT",
    4: "DEADLINE_EXCEEDED",
    5: "NOT_FOUND",
    6: "ALREADY_EXISTS",
    7: "PERMISSION_DENIED",
    8: "RESOURCE_EXHAUSTED",
    9: "FAILED_PRECONDITION",
    10: "ABORTED",
    11: "OUT_OF_RANGE",
    12: "UNIMPLEMENTED",
    13: "INTERNAL",
    14: "UNAVAILABLE",
    15: "DATA_LOSS",
    16: "UNAUTHENTICATED",
}

CANCELLED = 1
UNKNOWN = 2
DEADLINE_EXCEEDED = 4
PERMISSION_DENIED = 7
INTERNAL = 13
UNAVAILABLE = 14
DATA_LOSS = 15


def code_name(code: int) -> str:
    """The name of a gRPC status code, e.g. 9 -> "FAILED_PRECONDITION"."""
    return CODE_NAMES.get(code, f"CODE_{code}")


class ModelLoaderError(Exception):
    """A request to the model-loader server failed with a gRPC status code."""

    def __init__(self, code: int, code_name: str, message: str) -> None:
        super().__init__(code, code_name, message)
        self.code = code
        self.code_name = code_name
        self.message = message

    @classmethod
    def from_code(cls, code: int, message: str) -> ModelLoaderError:
        return cls(code, code_name(code), message)

    def __str__(self) -> str:
        return f"{self.code_name} ({self.code}): {self.message}"


class AttachError(ModelLoaderError):
    """Attaching failed: the server's error, or a transport failure mapped to a status code.

    Besides the codes the server answers with (NOT_FOUND, FAILED_PRECONDITION, ...), the client
    raises UNAVAILABLE when it cannot connect or the server hangs up before answering,
    PERMISSION_DENIED when the socket's permissions do not let it connect,
    DEADLINE_EXCEEDED when the answer does not come within the timeout, and INTERNAL when the
    answer is not a well-formed frame.
    """


class LoadError(ModelLoaderError):
    """A LoadModel stream ended with an error status."""
