"""The GPU path's pure-Python parts: type strings, pointer arithmetic, the plumbing to torch.

The driver calls themselves need a GPU; test_cuda_gpu.py runs them where one is visible.
"""

from __future__ import annotations

import ctypes
import sys
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import pytest
from fakeserver import FakeServer, Handler, Model, Tensor, answer, bf16_bits

import model_loader
from model_loader import _cuda, _dtypes, attach, pb2

Serve = Callable[[Handler], FakeServer]


@pytest.mark.parametrize("name, typestr, itemsize", [
    ("F64", "<f8", 8), ("F32", "<f4", 4), ("F16", "<f2", 2), ("BF16", "<u2", 2),
    ("F8_E4M3", "|u1", 1), ("F8_E5M2", "|u1", 1), ("I64", "<i8", 8), ("I32", "<i4", 4),
    ("I16", "<i2", 2), ("I8", "|i1", 1), ("U64", "<u8", 8), ("U32", "<u4", 4), ("U16", "<u2", 2),
    ("U8", "|u1", 1), ("BOOL", "|b1", 1),
])
def test_typestr_and_itemsize(name: str, typestr: str, itemsize: int) -> None:
    d = _dtypes.lookup(name)
    assert (d.typestr, d.itemsize) == (typestr, itemsize)
    # Every type string is one numpy reads back at the same width.
    assert np.dtype(typestr).itemsize == itemsize


def test_torch_reinterprets_only_what_it_cannot_take() -> None:
    raw = {n: d.torch_raw_typestr for n, d in _dtypes.DTYPES.items() if d.torch_raw_typestr}
    assert raw == {"BF16": "<i2", "F8_E4M3": "|u1", "F8_E5M2": "|u1"}


def test_unknown_dtype() -> None:
    with pytest.raises(TypeError, match="F4"):
        _dtypes.lookup("F4")


def test_numpy_dtypes_with_and_without_ml_dtypes(monkeypatch: pytest.MonkeyPatch) -> None:
    assert _dtypes.numpy_dtype("I16") == np.int16
    assert _dtypes.numpy_dtype("BOOL") == np.bool_
    monkeypatch.setitem(sys.modules, "ml_dtypes", None)
    assert _dtypes.numpy_dtype("BF16") == np.uint16
    assert _dtypes.numpy_dtype("F8_E4M3") == np.uint8


def test_parse_device() -> None:
    assert _cuda.parse_device("cuda") == 0
    assert _cuda.parse_device("cuda:3") == 3
    for bad in ("cpu", "cuda:x", "cuda:-1", "gpu:0"):
        with pytest.raises(ValueError):
            _cuda.parse_device(bad)


def test_array_interface() -> None:
    iface = _cuda.array_interface(0x7F00_0000_1000, (2, 3), "<f4", True)
    assert iface == {"shape": (2, 3), "typestr": "<f4", "data": (0x7F00_0000_1000, True),
                     "strides": None, "version": 3, "stream": None}


class FakeMapping:
    """Stands in for CudaMapping: a base address, no driver."""

    created: List["FakeMapping"] = []

    def __init__(self, fd: int, size: int, ordinal: int) -> None:
        self.ptr = 0x7F00_0000_0000 + 0x1000_0000 * len(FakeMapping.created)
        self.size = size
        self.device = ordinal
        FakeMapping.created.append(self)


@pytest.fixture
def gpu_server(serve: Serve, monkeypatch: pytest.MonkeyPatch) -> FakeServer:
    """A fake server answering with two CUDA_VMM buffers on cuda:1 (their fds are memfds)."""
    FakeMapping.created = []
    monkeypatch.setattr(_cuda, "CudaMapping", FakeMapping)
    model = Model([
        [Tensor("w", "F32", (2, 2), np.ones(4, "<f4").tobytes()),
         Tensor("h", "BF16", (3,), bf16_bits([1, 2, 3]).tobytes())],
        [Tensor("q", "F8_E4M3", (5,), bytes(5))],
    ], kinds=[pb2.BUFFER_KIND_CUDA_VMM] * 2, device="cuda:1")
    return serve(lambda conn, request: answer(conn, model))


def test_cuda_arrays_offsets_and_typestrs(gpu_server: FakeServer) -> None:
    with attach("org/model", gpu_server.path) as att:
        assert [b.kind for b in att.buffers] == ["CUDA_VMM", "CUDA_VMM"]
        assert all(b.is_cuda and b.device == "cuda:1" for b in att.buffers)
        with pytest.raises(TypeError, match="cuda:1"):
            _ = att.tensors
        arrays = att.cuda_arrays()
        first, second = FakeMapping.created
        assert (first.device, second.device) == (1, 1)
        spec = att.tensor_specs
        ifaces: Dict[str, Dict[str, Any]] = {
            n: a.__cuda_array_interface__ for n, a in arrays.items()}
        assert ifaces["w"]["data"] == (first.ptr + spec["w"].offset, True)
        assert ifaces["h"]["data"] == (first.ptr + spec["h"].offset, True)
        assert spec["h"].offset > 0
        assert ifaces["q"]["data"] == (second.ptr, True)
        assert [ifaces[n]["typestr"] for n in ("w", "h", "q")] == ["<f4", "<u2", "|u1"]
        assert ifaces["w"]["shape"] == (2, 2)
        assert arrays["h"].device == 1 and "cuda:1" in repr(arrays["h"])
        # One mapping per buffer, shared by its tensors and by later calls.
        att.cuda_arrays()
        assert len(FakeMapping.created) == 2


def test_torch_gets_writable_integer_views_to_reinterpret(gpu_server: FakeServer,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    class Tensorish:
        def __init__(self, iface: Dict[str, Any], device: str) -> None:
            self.iface, self.device = iface, device
            self.viewed_as: Optional[str] = None

        def view(self, dtype: str) -> "Tensorish":
            self.viewed_as = dtype
            return self

    class FakeTorch:
        __version__ = "0"
        float32, bfloat16, float8_e4m3fn = "float32", "bfloat16", "float8_e4m3fn"

        @staticmethod
        def as_tensor(obj: Any, device: str) -> Tensorish:
            calls.append(obj)
            return Tensorish(obj.__cuda_array_interface__, device)

    monkeypatch.setitem(sys.modules, "torch", FakeTorch)
    with attach("org/model", gpu_server.path) as att:
        t = att.torch()
    assert {n: (x.iface["typestr"], x.iface["data"][1], x.device, x.viewed_as)
            for n, x in t.items()} == {
        "w": ("<f4", False, "cuda:1", None),
        "h": ("<i2", False, "cuda:1", "bfloat16"),
        "q": ("|u1", False, "cuda:1", "float8_e4m3fn"),
    }
    # What torch was handed keeps the mapping alive.
    assert all(isinstance(obj._mapping, FakeMapping) for obj in calls)


def test_host_buffer_is_not_cuda(serve: Serve) -> None:
    server = serve(lambda conn, request: answer(conn, Model([[Tensor("x", "U8", (1,), b"\1")]])))
    with attach("org/model", server.path) as att:
        with pytest.raises(TypeError, match="host memory"):
            att.cuda_arrays()


def test_driver_missing_is_an_import_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_cuda, "_api", None)
    monkeypatch.setitem(sys.modules, "cuda", None)
    monkeypatch.setitem(sys.modules, "cuda.bindings", None)

    def no_lib(name: str) -> None:
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(ctypes, "CDLL", no_lib)
    with pytest.raises(ImportError, match="cuda-python"):
        _cuda.driver_api()
    assert model_loader.CudaError is _cuda.CudaError


class RecordingApi:
    """A driver that records its calls and fails where told."""

    def __init__(self, fail: str = "") -> None:
        self.calls: List[str] = []
        self.fail = fail

    def __getattr__(self, name: str) -> Callable[..., Any]:
        def call(*args: Any) -> Any:
            self.calls.append(name)
            if name == self.fail:
                raise _cuda.CudaError(name)
            return {"reserve": 0x5000, "import_fd": "handle", "retain_primary": "ctx"}.get(name)
        return call


def test_import_order_and_release() -> None:
    api = RecordingApi()
    ptr, release = _cuda._import(api, 7, 4096, 0)
    assert ptr == 0x5000
    assert api.calls == ["init", "retain_primary", "push", "import_fd", "reserve", "map",
                         "set_read_access", "pop"]
    api.calls.clear()
    release()
    assert api.calls == ["push", "unmap", "free", "release", "pop", "release_primary"]


def test_failed_import_undoes_what_it_did() -> None:
    api = RecordingApi(fail="set_read_access")
    with pytest.raises(_cuda.CudaError):
        _cuda._import(api, 7, 4096, 0)
    assert api.calls[-6:] == ["set_read_access", "unmap", "free", "release", "pop",
                              "release_primary"]
