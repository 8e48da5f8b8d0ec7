"""The server's GPU side, in a process of its own: a model in CUDA VMM allocations, exported as
POSIX file descriptors and handed out on an attach socket.

    python gpu_exporter.py SOCKET [ORDINAL [FOLDER]]

FOLDER: serve the model saved there (its safetensors' tensors, its small files) instead of the
fixed test tensors. Prints "ready" once it listens, then serves until it is killed. Talks to
libcuda.so.1 directly.
"""

from __future__ import annotations

import ctypes
import socket
import sys
import threading
from pathlib import Path
from typing import List, Tuple

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

from fakeserver import (  # noqa: E402
    Model,
    Tensor,
    bf16_bits,
    folder_model,
    frame,
    read_request,
    response_for,
    send_with_fds,
)

from model_loader import pb2  # noqa: E402

_POSIX_FD = 1
_DEVICE = 1
_PINNED = 1
_READWRITE = 3


class _Location(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


class _AllocFlags(ctypes.Structure):
    _fields_ = [("compressionType", ctypes.c_ubyte), ("gpuDirectRDMACapable", ctypes.c_ubyte),
                ("usage", ctypes.c_ushort), ("reserved", ctypes.c_ubyte * 4)]


class _Prop(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("requestedHandleTypes", ctypes.c_int),
                ("location", _Location), ("win32HandleMetaData", ctypes.c_void_p),
                ("allocFlags", _AllocFlags)]


class _AccessDesc(ctypes.Structure):
    _fields_ = [("location", _Location), ("flags", ctypes.c_int)]


def gpu_model(ordinal: int) -> Model:
    """What the GPU tests expect to read back."""
    return Model([
        [
            Tensor("a.weight", "F32", (2, 3), np.arange(6, dtype="<f4").tobytes()),
            Tensor("b.bf16", "BF16", (4,), bf16_bits([1.0, -2.0, 0.5, 3.0]).tobytes()),
            # 1.0, 2.0 and -2.0 in float8_e4m3fn.
            Tensor("d.f8", "F8_E4M3", (3,), bytes([0x38, 0x40, 0xC0])),
        ],
        [Tensor("c.ids", "I64", (2, 2), np.array([1, -2, 3, 1 << 40], dtype="<i8").tobytes())],
    ], kinds=[pb2.BUFFER_KIND_CUDA_VMM] * 2, device=f"cuda:{ordinal}")


class Exporter:
    def __init__(self, ordinal: int) -> None:
        self.lib = ctypes.CDLL("libcuda.so.1")
        self.ordinal = ordinal
        self._check(self.lib.cuInit(0), "cuInit")
        dev = ctypes.c_int()
        self._check(self.lib.cuDeviceGet(ctypes.byref(dev), ordinal), "cuDeviceGet")
        ctx = ctypes.c_void_p()
        self._check(self.lib.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev), "retain")
        self._check(self.lib.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")

    def _check(self, err: int, what: str) -> None:
        if err:
            raise RuntimeError(f"{what} failed with CUresult {err}")

    def export(self, data: bytes) -> Tuple[int, int]:
        """A VMM allocation holding data; returns its POSIX descriptor and its size."""
        lib = self.lib
        prop = _Prop(_PINNED, _POSIX_FD, _Location(_DEVICE, self.ordinal))
        gran = ctypes.c_size_t()
        self._check(lib.cuMemGetAllocationGranularity(ctypes.byref(gran), ctypes.byref(prop), 0),
                    "cuMemGetAllocationGranularity")
        size = -(-max(len(data), 1) // gran.value) * gran.value
        handle = ctypes.c_ulonglong()
        self._check(lib.cuMemCreate(ctypes.byref(handle), ctypes.c_size_t(size),
                                    ctypes.byref(prop), ctypes.c_ulonglong(0)), "cuMemCreate")
        ptr = ctypes.c_ulonglong()
        self._check(lib.cuMemAddressReserve(ctypes.byref(ptr), ctypes.c_size_t(size),
                                            ctypes.c_size_t(0), ctypes.c_ulonglong(0),
                                            ctypes.c_ulonglong(0)), "cuMemAddressReserve")
        self._check(lib.cuMemMap(ptr, ctypes.c_size_t(size), ctypes.c_size_t(0), handle,
                                 ctypes.c_ulonglong(0)), "cuMemMap")
        desc = _AccessDesc(_Location(_DEVICE, self.ordinal), _READWRITE)
        self._check(lib.cuMemSetAccess(ptr, ctypes.c_size_t(size), ctypes.byref(desc),
                                       ctypes.c_size_t(1)), "cuMemSetAccess")
        src = ctypes.create_string_buffer(data, len(data))
        self._check(lib.cuMemcpyHtoD_v2(ptr, src, ctypes.c_size_t(len(data))), "cuMemcpyHtoD")
        fd = ctypes.c_int()
        self._check(lib.cuMemExportToShareableHandle(ctypes.byref(fd), handle, _POSIX_FD,
                                                     ctypes.c_ulonglong(0)),
                    "cuMemExportToShareableHandle")
        return fd.value, size


def main() -> None:
    path, ordinal = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 0
    exporter = Exporter(ordinal)
    if len(sys.argv) > 3:
        model = folder_model(Path(sys.argv[3]))
        model.kinds = [pb2.BUFFER_KIND_CUDA_VMM] * len(model.buffers)
        model.device = f"cuda:{ordinal}"
    else:
        model = gpu_model(ordinal)
    contents, specs = model.layout()
    exported = [exporter.export(c) for c in contents]
    payloads = {}
    for include_files in (False, True):
        response = response_for(model, contents, specs, "gpu/model", include_files)
        for buffer, (_, size) in zip(response.buffers, exported):
            buffer.size_bytes = size
        payloads[include_files] = frame(response.SerializeToString())
    fds: List[int] = [fd for fd, _ in exported]

    def session(conn: socket.socket) -> None:
        with conn:
            request = read_request(conn)
            send_with_fds(conn, payloads[request.include_files], fds)
            while conn.recv(1):
                pass

    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen()
    print("ready", flush=True)
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=session, args=(conn,), daemon=True).start()


if __name__ == "__main__":
    main()
