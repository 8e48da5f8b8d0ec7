"""A fake attach server: a thread on a Unix socket that answers like model-loader does."""

from __future__ import annotations

import fcntl
import hashlib
import json
import mmap
import os
import socket
import struct
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from model_loader import pb2

MEMFD_NAME = "model-loader-test"
ALIGN = 64


def bf16_bits(values: Sequence[float]) -> np.ndarray:
    """BF16 encodings of values that are exact in BF16 (the top half of their F32 bits)."""
    return (np.asarray(values, dtype="<f4").view("<u4") >> 16).astype("<u2")


@dataclass
class Tensor:
    name: str
    dtype: str
    shape: Tuple[int, ...]
    data: bytes


@dataclass
class Model:
    """Tensors laid out in buffers the way the server describes them."""

    buffers: List[List[Tensor]]
    kinds: Optional[List[pb2.BufferKind]] = None
    device: str = "cpu"
    # The model's small files by path (config.json, ...).
    files: Dict[str, bytes] = field(default_factory=dict)

    def layout(self) -> Tuple[List[bytes], List[pb2.AttachedTensor]]:
        contents, specs = [], []
        for index, tensors in enumerate(self.buffers):
            blob = bytearray()
            for t in tensors:
                blob.extend(b"\0" * (-len(blob) % ALIGN))
                specs.append(pb2.AttachedTensor(name=t.name, dtype=t.dtype, shape=list(t.shape),
                                                buffer=index, offset=len(blob),
                                                size_bytes=len(t.data)))
                blob.extend(t.data)
            blob.extend(b"\0" * (-len(blob) % ALIGN))
            contents.append(bytes(blob))
        specs.sort(key=lambda s: s.name)
        return contents, specs


def sealed_memfd(data: bytes) -> int:
    """A memfd holding data, sealed against writes, growth and shrinking, as the server makes it."""
    fd = os.memfd_create(MEMFD_NAME, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, len(data))
    if data:
        m = mmap.mmap(fd, len(data), mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        m[:] = data
        # F_SEAL_WRITE is refused while a writable shared mapping exists.
        m.close()
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS,
                fcntl.F_SEAL_WRITE | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL)
    return fd


def frame(payload: bytes) -> bytes:
    return struct.pack("<I", len(payload)) + payload


def read_request(conn: socket.socket) -> pb2.AttachRequest:
    def exactly(n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = conn.recv(n - len(buf))
            if not chunk:
                raise EOFError
            buf += chunk
        return buf

    (length,) = struct.unpack("<I", exactly(4))
    return pb2.AttachRequest.FromString(exactly(length))


def model_files(model: Model, include_files: bool) -> List[pb2.ModelFile]:
    return [pb2.ModelFile(path=path, size_bytes=len(data), sha256=hashlib.sha256(data).hexdigest(),
                          content=data if include_files else b"")
            for path, data in sorted(model.files.items())]


def response_for(model: Model, contents: List[bytes], specs: List[pb2.AttachedTensor],
                 model_id: str, include_files: bool = False) -> pb2.AttachResponse:
    kinds = model.kinds or [pb2.BUFFER_KIND_HOST_MEMFD] * len(contents)
    return pb2.AttachResponse(
        code=0,
        status=pb2.ModelStatus(model_id=model_id, state=pb2.MODEL_STATE_LOADED,
                               device=model.device, dtype="mixed",
                               weight_bytes=sum(len(c) for c in contents), attached_clients=1),
        buffers=[pb2.AttachedBuffer(kind=k, device=model.device, size_bytes=len(c))
                 for k, c in zip(kinds, contents)],
        tensors=specs,
        files=model_files(model, include_files),
    )


# Linux passes at most SCM_MAX_FD descriptors in one message.
MAX_FDS = 253


def send_with_fds(conn: socket.socket, data: bytes, fds: List[int]) -> None:
    """Send a frame the way the server does: at most MAX_FDS descriptors a message, each message
    but the last with one byte of the frame, the last with the rest."""
    chunks = [fds[i:i + MAX_FDS] for i in range(0, len(fds), MAX_FDS)] or [[]]
    for i, chunk in enumerate(chunks):
        piece = data[i:i + 1] if i < len(chunks) - 1 else data[i:]
        sent = socket.send_fds(conn, [piece], chunk)
        conn.sendall(piece[sent:])


def answer(conn: socket.socket, model: Model, model_id: str = "org/model",
           include_files: bool = False) -> None:
    """Send the model the way the server does: the response, its descriptors in SCM_RIGHTS."""
    contents, specs = model.layout()
    fds = [sealed_memfd(c) for c in contents]
    try:
        response = response_for(model, contents, specs, model_id, include_files)
        send_with_fds(conn, frame(response.SerializeToString()), fds)
    finally:
        for fd in fds:
            os.close(fd)


Handler = Callable[[socket.socket, pb2.AttachRequest], None]


@dataclass
class FakeServer:
    path: str
    handler: Handler
    requests: List[pb2.AttachRequest] = field(default_factory=list)
    connections: List[socket.socket] = field(default_factory=list)
    # Released once per answer sent (the server's copies of its descriptors closed) and once
    # per connection ended.
    answered: threading.Semaphore = field(default_factory=lambda: threading.Semaphore(0))
    hangups: threading.Semaphore = field(default_factory=lambda: threading.Semaphore(0))

    def __post_init__(self) -> None:
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(self.path)
        self._listener.listen()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            self.connections.append(conn)
            threading.Thread(target=self._session, args=(conn,), daemon=True).start()

    def _session(self, conn: socket.socket) -> None:
        try:
            request = read_request(conn)
            self.requests.append(request)
            self.handler(conn, request)
            self.answered.release()
            # Like the server: hold the connection (the lease) until the client lets go.
            while conn.recv(1):
                pass
        except (OSError, EOFError):
            pass
        finally:
            conn.close()
            self.hangups.release()

    def drop_all(self) -> None:
        """End every lease from the server's side (a forced unload)."""
        for conn in self.connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()

    def stop(self) -> None:
        self._listener.close()
        self.drop_all()


def mixed_model() -> Model:
    """F32, BF16, I64 and F16 tensors (a scalar and an empty one too) in two buffers."""
    return Model([
        [
            Tensor("a.weight", "F32", (2, 3), np.arange(6, dtype="<f4").tobytes()),
            Tensor("b.bf16", "BF16", (4,), bf16_bits([1.0, -2.0, 0.5, 3.0]).tobytes()),
            Tensor("e.empty", "F32", (0, 4), b""),
            Tensor("f.scalar", "F16", (), np.array(1.5, dtype="<f2").tobytes()),
        ],
        [
            Tensor("c.ids", "I64", (2, 2), np.array([1, -2, 3, 1 << 40], dtype="<i8").tobytes()),
        ],
    ])


def open_fds() -> int:
    """Descriptors open in this process (the fake server's included)."""
    return len(os.listdir("/proc/self/fd"))


def memfd_mappings() -> List[str]:
    with open("/proc/self/maps") as f:
        return [line for line in f if f"/memfd:{MEMFD_NAME}" in line]


# The small files the server keeps with a model (docs/model-files.md): these names and
# sentencepiece's *.model, in the model's folder or one folder down.
SMALL_FILES = {
    "config.json", "generation_config.json", "model_index.json", "tokenizer.json",
    "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
    "vocab.txt", "merges.txt", "chat_template.jinja", "chat_template.json",
    "preprocessor_config.json", "processor_config.json", "scheduler_config.json", "modules.json",
    "sentence_bert_config.json", "config_sentence_transformers.json",
}


def is_small_file(rel: str) -> bool:
    name = rel.rsplit("/", 1)[-1]
    return rel.count("/") <= 1 and (name in SMALL_FILES or name.endswith(".model"))


def folder_model(root: Path) -> Model:
    """A saved model folder as the server holds it: one buffer per safetensors file (tensors
    named with the file's folder as prefix, "unet/conv_in.weight") and its small files."""
    buffers: List[List[Tensor]] = []
    files: Dict[str, bytes] = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if is_small_file(rel):
            files[rel] = path.read_bytes()
            continue
        if not path.name.endswith(".safetensors"):
            continue
        data = path.read_bytes()
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8:8 + n])
        prefix = "" if "/" not in rel else rel.rsplit("/", 1)[0] + "/"
        tensors = []
        for name, info in sorted(header.items()):
            if name == "__metadata__":
                continue
            start, end = info["data_offsets"]
            tensors.append(Tensor(prefix + name, info["dtype"], tuple(info["shape"]),
                                  data[8 + n + start:8 + n + end]))
        buffers.append(tensors)
    return Model(buffers, files=files)


def serve_folder(root: Path) -> Handler:
    """A handler answering every request with the model saved in root."""
    model = folder_model(root)
    return lambda conn, request: answer(conn, model, request.model_id, request.include_files)
