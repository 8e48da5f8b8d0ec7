"""Frames on the attach socket: a 4-byte little-endian length, then that many bytes of one message.

The answer's file descriptors travel as SCM_RIGHTS ancillary data, at most 253 a message: more come
over several messages, each with a part of the answer's bytes. Every recvmsg's ancillary data is
collected while the frame is read, so the split does not matter.
"""

from __future__ import annotations

import array
import os
import socket
import struct
import time
from typing import List, Optional, Tuple

from ._errors import DEADLINE_EXCEEDED, INTERNAL, UNAVAILABLE, AttachError

HEADER = struct.Struct("<I")
MAX_REQUEST_BYTES = 64 * 1024
# An answer lists every tensor (name, dtype, shape, place): a few hundred thousand tensors at
# most. A length above this is taken as garbage rather than waited for.
MAX_RESPONSE_BYTES = 256 * 1024 * 1024
# Linux passes at most SCM_MAX_FD (253) descriptors in one message.
MAX_FDS = 253
_FD_SIZE = array.array("i").itemsize
# Received descriptors are close-on-exec, like every descriptor Python opens itself.
_RECV_FLAGS = getattr(socket, "MSG_CMSG_CLOEXEC", 0)


class Deadline:
    """The time left for one exchange; None means no limit."""

    def __init__(self, timeout: Optional[float]) -> None:
        self._end = None if timeout is None else time.monotonic() + timeout

    def apply(self, sock: socket.socket) -> None:
        if self._end is None:
            sock.settimeout(None)
            return
        left = self._end - time.monotonic()
        if left <= 0:
            raise socket.timeout("timed out")
        sock.settimeout(left)


def encode_frame(payload: bytes) -> bytes:
    return HEADER.pack(len(payload)) + payload


def send_frame(sock: socket.socket, payload: bytes, deadline: Deadline) -> None:
    if len(payload) > MAX_REQUEST_BYTES:
        raise ValueError(f"request of {len(payload)} bytes exceeds {MAX_REQUEST_BYTES}")
    frame = encode_frame(payload)
    sent = 0
    while sent < len(frame):
        deadline.apply(sock)
        sent += sock.send(frame[sent:])


def _close_all(fds: List[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
    fds.clear()


def _recv_exactly(
    sock: socket.socket, n: int, fds: List[int], deadline: Deadline, what: str
) -> bytes:
    chunks: List[bytes] = []
    got = 0
    ancbufsize = socket.CMSG_SPACE(MAX_FDS * _FD_SIZE)
    while got < n:
        deadline.apply(sock)
        data, ancdata, flags, _ = sock.recvmsg(min(n - got, 1 << 20), ancbufsize, _RECV_FLAGS)
        for level, kind, cdata in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                got_fds = array.array("i")
                got_fds.frombytes(cdata[: len(cdata) - len(cdata) % _FD_SIZE])
                fds.extend(got_fds)
        if flags & socket.MSG_CTRUNC:
            raise AttachError.from_code(
                INTERNAL,
                "file descriptors sent with the answer were dropped: is this process at its "
                "open-file limit (ulimit -n)?",
            )
        if not data:
            if got == 0 and what == "header":
                raise AttachError.from_code(
                    UNAVAILABLE, "the server closed the connection without answering"
                )
            raise AttachError.from_code(
                INTERNAL, f"the connection closed after {got} of {n} bytes of the answer's {what}"
            )
        chunks.append(data)
        got += len(data)
    return b"".join(chunks)


def recv_frame(sock: socket.socket, deadline: Deadline) -> Tuple[bytes, List[int]]:
    """Read one frame and every descriptor sent with it. On failure no descriptor stays open."""
    fds: List[int] = []
    try:
        (length,) = HEADER.unpack(_recv_exactly(sock, HEADER.size, fds, deadline, "header"))
        if length > MAX_RESPONSE_BYTES:
            raise AttachError.from_code(
                INTERNAL, f"the answer claims {length} bytes, more than {MAX_RESPONSE_BYTES}"
            )
        payload = _recv_exactly(sock, length, fds, deadline, "body")
    except socket.timeout:
        _close_all(fds)
        raise AttachError.from_code(DEADLINE_EXCEEDED, "no answer within the timeout") from None
    except BaseException:
        _close_all(fds)
        raise
    return payload, fds
