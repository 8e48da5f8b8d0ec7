"""attach(): map a loaded model's memory from the server over its attach socket, zero-copy."""

from __future__ import annotations

import hashlib
import mmap
import os
import re
import select
import socket as _socket
import warnings
import weakref
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Dict, List, Optional, Tuple, Type, Union

import numpy as np
from google.protobuf.message import DecodeError

from . import _cuda, _dtypes, _wire
from ._errors import (
    DATA_LOSS,
    DEADLINE_EXCEEDED,
    INTERNAL,
    PERMISSION_DENIED,
    UNAVAILABLE,
    AttachError,
    code_name,
)
from ._proto import model_loader_pb2 as pb2

SOCKET_ENV = "MODEL_LOADER_ATTACH_SOCKET"
DEFAULT_SOCKET = "/run/model-loader/attach.sock"

HOST_KINDS = ("HOST_MEMFD", "HOST_FILE")
CUDA_KIND = "CUDA_VMM"

PathLike = Union[str, "os.PathLike[str]"]


def default_socket() -> str:
    """$MODEL_LOADER_ATTACH_SOCKET, else DEFAULT_SOCKET."""
    return os.environ.get(SOCKET_ENV) or DEFAULT_SOCKET


@dataclass(frozen=True)
class BufferInfo:
    """One buffer of the model's memory, as the server described it."""

    index: int
    # "HOST_MEMFD", "HOST_FILE" or "CUDA_VMM" (BufferKind without its prefix).
    kind: str
    # "cpu" or "cuda:N".
    device: str
    size_bytes: int
    # The received file descriptor; owned by the Attached object, closed by close().
    fd: int

    @property
    def is_cuda(self) -> bool:
        return self.kind == CUDA_KIND


@dataclass(frozen=True)
class TensorSpec:
    """Where one tensor's bytes are: a buffer, an offset and a length (row-major, little-endian)."""

    name: str
    dtype: str
    shape: Tuple[int, ...]
    buffer: int
    offset: int
    size_bytes: int
    # The checkpoint file it was read from, relative to the model's folder ("" from a server
    # older than this field).
    file: str = ""

    @property
    def numel(self) -> int:
        return _dtypes.numel(self.shape)


def _natural_key(path: str) -> List[Union[int, str]]:
    """Digits compared as numbers: ``model-00002-of-00010`` and ``model-2-of-10`` both in order."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", path)]


@dataclass(frozen=True)
class FileSpec:
    """One of the model's small files (a config, the tokenizer, ...) as the server keeps it."""

    path: str
    size_bytes: int
    # Hex sha256 of its bytes.
    sha256: str


def _buffer_kind(kind: int) -> str:
    if kind not in pb2.BufferKind.values():
        return f"UNKNOWN_{kind}"
    return pb2.BufferKind.Name(kind).removeprefix("BUFFER_KIND_")


def _checked_files(files: Any, with_content: bool) -> Dict[str, bytes]:
    """The files' bytes by path, each checked against its size and sha256 (empty unless asked)."""
    out: Dict[str, bytes] = {}
    if not with_content:
        return out
    for f in files:
        if len(f.content) != f.size_bytes or hashlib.sha256(f.content).hexdigest() != f.sha256:
            raise AttachError.from_code(
                DATA_LOSS, f"file {f.path} arrived with {len(f.content)} bytes that do not match "
                f"its size ({f.size_bytes}) or sha256 ({f.sha256})")
        out[f.path] = bytes(f.content)
    return out


def _check_layout(buffers: Tuple[BufferInfo, ...], specs: Dict[str, TensorSpec]) -> None:
    """Refuse tensors that do not fit their buffers: mapping them would read out of bounds."""
    for s in specs.values():
        if s.buffer >= len(buffers):
            raise AttachError.from_code(
                INTERNAL, f"tensor {s.name} names buffer {s.buffer} of {len(buffers)}")
        if s.offset + s.size_bytes > buffers[s.buffer].size_bytes:
            raise AttachError.from_code(
                INTERNAL, f"tensor {s.name} ends at byte {s.offset + s.size_bytes}, past the "
                f"{buffers[s.buffer].size_bytes} bytes of buffer {s.buffer}")
        dtype = _dtypes.DTYPES.get(s.dtype)
        if dtype is not None and s.numel * dtype.itemsize != s.size_bytes:
            raise AttachError.from_code(
                INTERNAL, f"tensor {s.name}: {s.size_bytes} bytes for {s.dtype} {list(s.shape)}")


class _Resources:
    """What an Attached owns, apart from it so that a finalizer can release it."""

    def __init__(self, sock: _socket.socket, fds: List[int]) -> None:
        self.sock = sock
        self.fds = fds
        self.mmaps: Dict[int, mmap.mmap] = {}
        self.cuda: Dict[int, _cuda.CudaMapping] = {}
        self.closed_by_caller = False

    def release(self) -> None:
        for m in self.mmaps.values():
            try:
                m.close()
            except BufferError:
                # Arrays or tensors made from it are still alive: the mapping stays (it is
                # still valid memory) and goes when the last of them, and the mmap, do.
                pass
        self.mmaps.clear()
        # GPU mappings are unmapped by their own finalizers once no CudaArray or tensor built
        # from one refers to them.
        self.cuda.clear()
        for fd in self.fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds = []
        self.sock.close()
        if not self.closed_by_caller:
            # Last, so that a filter turning warnings into errors cannot stop the release.
            warnings.warn("an attached model was never closed; its lease ended at garbage "
                          "collection", ResourceWarning, stacklevel=2)


class Attached:
    """A loaded model's memory, mapped from the server; also the lease that keeps it resident.

    The connection to the attach socket is the lease: while it is open the server keeps the model
    loaded and never evicts it; a plain UnloadModel is refused. close() (or leaving the ``with``
    block) ends the lease: it closes the connection and the file descriptors and unmaps what
    nothing uses any more. An array or tensor that is still alive keeps its mapping, which stays
    valid memory, but the server no longer counts it as in use: use tensors only while attached.

    The server may end the lease itself (a forced unload, shutdown): alive() turns False, and
    wait_closed() returns. Mappings made before stay valid until they are released.

    Host tensors are mapped read-only: numpy arrays refuse writes with ValueError; torch tensors
    cannot be marked read-only, and a write through one kills the process with SIGSEGV.
    """

    def __init__(self, sock: _socket.socket, response: pb2.AttachResponse, fds: List[int],
                 with_files: bool = False) -> None:
        """Made by attach(); takes ownership of sock and fds unless it raises."""
        self.status: pb2.ModelStatus = response.status
        self.buffers: Tuple[BufferInfo, ...] = tuple(
            BufferInfo(i, _buffer_kind(b.kind), b.device, b.size_bytes, fds[i])
            for i, b in enumerate(response.buffers))
        self.tensor_specs: Dict[str, TensorSpec] = {
            t.name: TensorSpec(t.name, t.dtype, tuple(t.shape), t.buffer, t.offset, t.size_bytes,
                               t.file)
            for t in response.tensors}
        _check_layout(self.buffers, self.tensor_specs)
        # The model's small files: always their names, sizes and digests; bytes when asked.
        self.file_specs: Dict[str, FileSpec] = {
            f.path: FileSpec(f.path, f.size_bytes, f.sha256) for f in response.files}
        self._files = _checked_files(response.files, with_files)
        self._with_files = with_files
        # Nothing may raise past this point: the finalizer owns sock and fds from here on.
        self._res = _Resources(sock, fds)
        self._finalizer = weakref.finalize(self, self._res.release)
        self._numpy: Optional[Dict[str, np.ndarray[Any, Any]]] = None
        self._torch: Optional[Dict[str, Any]] = None

    # --- the lease -------------------------------------------------------------------------------

    @property
    def model_id(self) -> str:
        return self.status.model_id

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def fileno(self) -> int:
        """The connection's descriptor, e.g. for a selector: readable once the server hangs up."""
        self._check_open()
        return self._res.sock.fileno()

    def alive(self) -> bool:
        """Whether the lease holds: False once closed here or by the server. Never blocks."""
        return not self.closed and not self._hung_up(0)

    def wait_closed(self, timeout: Optional[float] = None) -> bool:
        """Block until the server closes the connection (True) or timeout seconds pass (False)."""
        if self.closed:
            return True
        return self._hung_up(None if timeout is None else max(0, int(timeout * 1000)))

    def _hung_up(self, timeout_ms: Optional[int]) -> bool:
        poller = select.poll()
        poller.register(self._res.sock, select.POLLIN | getattr(select, "POLLRDHUP", 0))
        if not poller.poll(timeout_ms):
            return False
        try:
            # The server sends nothing after its answer: readable means end of file or an error.
            return self._res.sock.recv(1, _socket.MSG_PEEK | _socket.MSG_DONTWAIT) == b""
        except BlockingIOError:
            return False
        except OSError:
            return True

    def close(self) -> None:
        """End the lease: close the connection and descriptors, unmap what nothing still uses."""
        self._numpy = None
        self._torch = None
        self._res.closed_by_caller = True
        self._finalizer()

    def __enter__(self) -> Attached:
        return self

    def __exit__(self, exc_type: Optional[Type[BaseException]], exc: Optional[BaseException],
                 tb: Optional[TracebackType]) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return (f"<Attached {self.model_id!r} {state}: {len(self.tensor_specs)} tensors in "
                f"{len(self.buffers)} buffers>")

    def _check_open(self) -> None:
        if self.closed:
            raise ValueError(f"the attachment of {self.model_id!r} is closed")

    @property
    def files(self) -> Dict[str, bytes]:
        """The model's small files' bytes by path (``attach(..., files=True)``), sha256-checked."""
        if not self._with_files:
            raise ValueError(f"the files of {self.model_id!r} were not asked for: attach with "
                             "files=True (file_specs lists them without their bytes)")
        return dict(self._files)

    # --- host memory ----------------------------------------------------------------------------

    def _host_map(self, index: int) -> mmap.mmap:
        m = self._res.mmaps.get(index)
        if m is None:
            b = self.buffers[index]
            if b.kind not in HOST_KINDS:
                raise TypeError(f"buffer {index} is {b.kind} on {b.device}, not host memory")
            m = mmap.mmap(b.fd, b.size_bytes, mmap.MAP_SHARED, mmap.PROT_READ)
            self._res.mmaps[index] = m
        return m

    def _numpy_array(self, spec: TensorSpec) -> np.ndarray[Any, Any]:
        dtype = _dtypes.numpy_dtype(spec.dtype)
        if spec.size_bytes == 0:
            # Nothing to map (mmap refuses a length of 0).
            empty = np.empty(spec.shape, dtype)
            empty.flags.writeable = False
            return empty
        m = self._host_map(spec.buffer)
        return np.frombuffer(m, dtype, spec.numel, spec.offset).reshape(spec.shape)

    @property
    def tensors(self) -> Dict[str, np.ndarray[Any, Any]]:
        """Every tensor as a read-only numpy array over the shared mapping (no copy).

        Only for models in host memory; GPU tensors come from torch() or cuda_arrays().
        """
        self._check_open()
        if self._numpy is None:
            for spec in self.tensor_specs.values():
                if self.buffers[spec.buffer].is_cuda:
                    raise TypeError(f"tensor {spec.name} is on "
                                    f"{self.buffers[spec.buffer].device}: use torch() or "
                                    "cuda_arrays()")
            self._numpy = {n: self._numpy_array(s) for n, s in self.tensor_specs.items()}
        return dict(self._numpy)

    # --- GPU memory -----------------------------------------------------------------------------

    def _cuda_map(self, index: int) -> _cuda.CudaMapping:
        m = self._res.cuda.get(index)
        if m is None:
            b = self.buffers[index]
            if not b.is_cuda:
                raise TypeError(f"buffer {index} is {b.kind}, not CUDA memory")
            m = _cuda.CudaMapping(b.fd, b.size_bytes, _cuda.parse_device(b.device))
            self._res.cuda[index] = m
        return m

    def _cuda_array(self, spec: TensorSpec, for_torch: bool = False) -> _cuda.CudaArray:
        dtype = _dtypes.lookup(spec.dtype)
        mapping = self._cuda_map(spec.buffer)
        if for_torch:
            # torch refuses the interface's read-only flag and has no type string for BF16/F8:
            # it gets a writable-looking integer view to reinterpret. The device mapping itself
            # is read-only (see set_read_access).
            return _cuda.CudaArray(spec.name, dtype, spec.shape, mapping, spec.offset,
                                   dtype.torch_raw_typestr, readonly=False)
        return _cuda.CudaArray(spec.name, dtype, spec.shape, mapping, spec.offset)

    def cuda_arrays(self) -> Dict[str, _cuda.CudaArray]:
        """Every tensor of a GPU model as a ``__cuda_array_interface__`` object (no copy).

        For CuPy, Numba and others: ``cupy.asarray(arr)``. Each object keeps the mapping alive.
        """
        self._check_open()
        out = {}
        for spec in self.tensor_specs.values():
            if not self.buffers[spec.buffer].is_cuda:
                raise TypeError(f"tensor {spec.name} is in host memory: use .tensors or torch()")
            out[spec.name] = self._cuda_array(spec)
        return out

    def checkpoint_order(self) -> List[str]:
        """The tensors' names in the order an engine reading the checkpoint meets them: its files
        in natural order (``model-2-of-10`` before ``model-10-of-10``), then the names within a
        file sorted, as safetensors lists them (vLLM's own loader iterates this way)."""
        return sorted(self.tensor_specs, key=lambda n: (_natural_key(self.tensor_specs[n].file), n))

    # --- torch ----------------------------------------------------------------------------------

    def torch(self) -> Dict[str, Any]:
        """Every tensor as a torch tensor on its device, sharing the attached memory (no copy)."""
        self._check_open()
        try:
            import torch
        except ImportError:
            raise ImportError("Attached.torch() needs PyTorch: pip install "
                              "'model-loader-client[torch]'") from None
        if self._torch is None:
            views: Dict[int, memoryview] = {}
            out: Dict[str, Any] = {}
            for name, spec in self.tensor_specs.items():
                if self.buffers[spec.buffer].is_cuda:
                    out[name] = self._torch_cuda(torch, spec)
                else:
                    out[name] = self._torch_host(torch, spec, views)
            self._torch = out
        return dict(self._torch)

    def _torch_host(self, torch: Any, spec: TensorSpec, views: Dict[int, memoryview]) -> Any:
        dtype = _dtypes.torch_dtype(torch, spec.dtype)
        if spec.size_bytes == 0:
            return torch.empty(spec.shape, dtype=dtype)
        view = views.get(spec.buffer)
        if view is None:
            # torch.frombuffer keeps a reference to the object it is given but not a buffer
            # export, so given the mmap itself, close() could unmap memory under live tensors.
            # A memoryview holds an export for as long as the tensors hold it.
            view = views[spec.buffer] = memoryview(self._host_map(spec.buffer))
        with warnings.catch_warnings():
            # The memory is mapped read-only on purpose (the server's copy must not change) and
            # torch has no read-only tensors, so it warns on every non-writable buffer.
            warnings.filterwarnings("ignore", message=".*not writable", category=UserWarning)
            t = torch.frombuffer(view, dtype=dtype, count=spec.numel, offset=spec.offset)
        return t.reshape(spec.shape)

    def _torch_cuda(self, torch: Any, spec: TensorSpec) -> Any:
        arr = self._cuda_array(spec, for_torch=True)
        t = torch.as_tensor(arr, device=f"cuda:{arr.device}")
        if _dtypes.lookup(spec.dtype).torch_raw_typestr is not None:
            t = t.view(_dtypes.torch_dtype(torch, spec.dtype))
        return t


def _connect(path: str, deadline: _wire.Deadline) -> _socket.socket:
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        deadline.apply(sock)
        sock.connect(path)
    except BaseException as e:
        sock.close()
        if isinstance(e, OSError) and not isinstance(e, _socket.timeout):
            # Not allowed by the socket's mode (--attach-socket-mode), or nobody listening.
            code = PERMISSION_DENIED if isinstance(e, PermissionError) else UNAVAILABLE
            raise AttachError.from_code(
                code, f"cannot connect to the attach socket {path}: {e}") from e
        raise
    return sock


def attach(
    model_id: str,
    socket: Optional[PathLike] = None,
    *,
    revision: Optional[str] = None,
    device: Optional[str] = None,
    dtype: Optional[str] = None,
    load_if_needed: bool = False,
    files: bool = False,
    timeout: Optional[float] = 30.0,
) -> Attached:
    """Attach to a loaded model over the server's attach socket.

    socket: the server's ``--attach-socket`` path; default $MODEL_LOADER_ATTACH_SOCKET, else
    DEFAULT_SOCKET. device: the device the caller expects the model on ("cpu", "cuda:0"); the
    server refuses another. dtype: the dtype expected ("f32", "f16", "bf16", as LoadModel's): a
    load_if_needed load converts to it, a model resident in another is FAILED_PRECONDITION.
    load_if_needed: load the model first (with revision, device and dtype) if it is not loaded;
    otherwise a model that is not LOADED is FAILED_PRECONDITION. files: also fetch the model's
    small files' bytes (``Attached.files``; ``Attached.file_specs`` lists them always).
    timeout: seconds for the whole exchange, a load included; None waits as long as it takes.

    Raises AttachError with the server's gRPC status code, or UNAVAILABLE, DEADLINE_EXCEEDED or
    INTERNAL for a connection that fails, an answer that does not come, or one that is malformed.
    """
    request = pb2.AttachRequest(model_id=model_id, load_if_needed=load_if_needed,
                                include_files=files)
    if revision is not None:
        request.revision = revision
    if device is not None:
        request.device = device
    if dtype is not None:
        request.dtype = dtype
    path = os.fspath(socket) if socket is not None else default_socket()

    deadline = _wire.Deadline(timeout)
    try:
        sock = _connect(path, deadline)
    except _socket.timeout:
        raise AttachError.from_code(
            DEADLINE_EXCEEDED, f"connecting to {path} took longer than {timeout} s") from None
    fds: List[int] = []
    try:
        try:
            _wire.send_frame(sock, request.SerializeToString(), deadline)
            payload, fds = _wire.recv_frame(sock, deadline)
        except _socket.timeout:
            raise AttachError.from_code(DEADLINE_EXCEEDED, "no answer within the timeout") from None
        except (BrokenPipeError, ConnectionResetError) as e:
            raise AttachError.from_code(
                UNAVAILABLE, f"the server closed the connection: {e}") from e
        try:
            response = pb2.AttachResponse.FromString(payload)
        except DecodeError as e:
            raise AttachError.from_code(INTERNAL, f"malformed answer: {e}") from e
        if response.code != 0:
            raise AttachError(response.code, code_name(response.code), response.message)
        if len(fds) != len(response.buffers):
            raise AttachError.from_code(
                INTERNAL, f"the answer lists {len(response.buffers)} buffers but carried "
                f"{len(fds)} file descriptors")
        # From here on the socket only signals the end of the lease.
        sock.settimeout(None)
        return Attached(sock, response, fds, with_files=files)
    except BaseException:
        for fd in fds:
            os.close(fd)
        sock.close()
        raise

