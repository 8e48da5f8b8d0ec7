"""Importing a CUDA VMM allocation from its POSIX file descriptor, and handing its tensors out.

The steps are the driver API's: cuMemImportFromShareableHandle, cuMemAddressReserve, cuMemMap,
then cuMemSetAccess with read access for the allocation's device; undone in reverse order when
nothing refers to the mapping any more. The driver is reached through cuda-python
(``cuda.bindings.driver``, or ``cuda.cuda`` in releases before 12.6) when it is installed, else
through ``libcuda.so.1`` directly with ctypes: the driver library ships with every NVIDIA driver,
and CuPy has no binding of the VMM calls to fall back on.
"""

from __future__ import annotations

import contextlib
import ctypes
import weakref
from typing import Any, Callable, Dict, Optional, Tuple

from ._dtypes import DType

# Values from cuda.h; they are ABI and never change.
_CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR = 0x1
_CU_MEM_LOCATION_TYPE_DEVICE = 0x1
_CU_MEM_ACCESS_FLAGS_PROT_READ = 0x1


class CudaError(RuntimeError):
    """A CUDA driver call failed while importing or releasing an attached buffer."""


def parse_device(device: str) -> int:
    """The ordinal of "cuda" or "cuda:N"."""
    kind, _, ordinal = device.partition(":")
    if kind != "cuda" or (ordinal and not ordinal.isdigit()):
        raise ValueError(f"not a CUDA device: {device!r}")
    return int(ordinal) if ordinal else 0


def array_interface(
    ptr: int, shape: Tuple[int, ...], typestr: str, readonly: bool
) -> Dict[str, Any]:
    """A version 3 ``__cuda_array_interface__`` of a C-contiguous array at ptr.

    stream is None: the server finished writing the memory before it answered, so a consumer
    need not synchronise with any stream before reading.
    """
    return {
        "shape": shape,
        "typestr": typestr,
        "data": (ptr, readonly),
        "strides": None,
        "version": 3,
        "stream": None,
    }


class _CudaPythonApi:
    """The driver calls through cuda-python's bindings."""

    def __init__(self, driver: Any) -> None:
        self.d = driver

    def _check(self, result: Any, what: str) -> Any:
        err, *rest = result
        if err != self.d.CUresult.CUDA_SUCCESS:
            _, name = self.d.cuGetErrorName(err)
            raise CudaError(f"{what}: {name.decode() if name else int(err)}")
        return rest[0] if len(rest) == 1 else None

    def init(self) -> None:
        self._check(self.d.cuInit(0), "cuInit")

    def retain_primary(self, ordinal: int) -> Any:
        dev = self._check(self.d.cuDeviceGet(ordinal), "cuDeviceGet")
        return self._check(self.d.cuDevicePrimaryCtxRetain(dev), "cuDevicePrimaryCtxRetain")

    def release_primary(self, ordinal: int) -> None:
        dev = self._check(self.d.cuDeviceGet(ordinal), "cuDeviceGet")
        self._check(self.d.cuDevicePrimaryCtxRelease(dev), "cuDevicePrimaryCtxRelease")

    def push(self, ctx: Any) -> None:
        self._check(self.d.cuCtxPushCurrent(ctx), "cuCtxPushCurrent")

    def pop(self) -> None:
        self._check(self.d.cuCtxPopCurrent(), "cuCtxPopCurrent")

    def import_fd(self, fd: int) -> Any:
        kind = self.d.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR
        return self._check(
            self.d.cuMemImportFromShareableHandle(fd, kind), "cuMemImportFromShareableHandle"
        )

    def reserve(self, size: int) -> int:
        ptr = self._check(self.d.cuMemAddressReserve(size, 0, 0, 0), "cuMemAddressReserve")
        return int(ptr)

    def map(self, ptr: int, size: int, handle: Any) -> None:
        self._check(self.d.cuMemMap(ptr, size, 0, handle, 0), "cuMemMap")

    def set_read_access(self, ptr: int, size: int, ordinal: int) -> None:
        desc = self.d.CUmemAccessDesc()
        desc.location.type = self.d.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        desc.location.id = ordinal
        desc.flags = self.d.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READ
        self._check(self.d.cuMemSetAccess(ptr, size, [desc], 1), "cuMemSetAccess")

    def unmap(self, ptr: int, size: int) -> None:
        self._check(self.d.cuMemUnmap(ptr, size), "cuMemUnmap")

    def free(self, ptr: int, size: int) -> None:
        self._check(self.d.cuMemAddressFree(ptr, size), "cuMemAddressFree")

    def release(self, handle: Any) -> None:
        self._check(self.d.cuMemRelease(handle), "cuMemRelease")


class _CUmemLocation(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


class _CUmemAccessDesc(ctypes.Structure):
    _fields_ = [("location", _CUmemLocation), ("flags", ctypes.c_int)]


class _CtypesApi:
    """The same calls straight into libcuda.so.1."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self.lib = lib

    def _check(self, err: int, what: str) -> None:
        if err != 0:
            name = ctypes.c_char_p()
            self.lib.cuGetErrorName(err, ctypes.byref(name))
            raise CudaError(f"{what}: {name.value.decode() if name.value else err}")

    def init(self) -> None:
        self._check(self.lib.cuInit(0), "cuInit")

    def _device(self, ordinal: int) -> ctypes.c_int:
        dev = ctypes.c_int()
        self._check(self.lib.cuDeviceGet(ctypes.byref(dev), ordinal), "cuDeviceGet")
        return dev

    def retain_primary(self, ordinal: int) -> Any:
        ctx = ctypes.c_void_p()
        self._check(self.lib.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), self._device(ordinal)),
                    "cuDevicePrimaryCtxRetain")
        return ctx

    def release_primary(self, ordinal: int) -> None:
        self._check(self.lib.cuDevicePrimaryCtxRelease_v2(self._device(ordinal)),
                    "cuDevicePrimaryCtxRelease")

    def push(self, ctx: Any) -> None:
        self._check(self.lib.cuCtxPushCurrent_v2(ctx), "cuCtxPushCurrent")

    def pop(self) -> None:
        self._check(self.lib.cuCtxPopCurrent_v2(ctypes.byref(ctypes.c_void_p())), "cuCtxPopCurrent")

    def import_fd(self, fd: int) -> Any:
        handle = ctypes.c_ulonglong()
        # The POSIX handle is the descriptor's number passed in the pointer argument.
        self._check(self.lib.cuMemImportFromShareableHandle(
            ctypes.byref(handle), ctypes.c_void_p(fd), _CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR),
            "cuMemImportFromShareableHandle")
        return handle.value

    def reserve(self, size: int) -> int:
        ptr = ctypes.c_ulonglong()
        self._check(self.lib.cuMemAddressReserve(
            ctypes.byref(ptr), ctypes.c_size_t(size), ctypes.c_size_t(0), ctypes.c_ulonglong(0),
            ctypes.c_ulonglong(0)), "cuMemAddressReserve")
        return ptr.value

    def map(self, ptr: int, size: int, handle: Any) -> None:
        self._check(self.lib.cuMemMap(ctypes.c_ulonglong(ptr), ctypes.c_size_t(size),
                                      ctypes.c_size_t(0), ctypes.c_ulonglong(handle),
                                      ctypes.c_ulonglong(0)), "cuMemMap")

    def set_read_access(self, ptr: int, size: int, ordinal: int) -> None:
        desc = _CUmemAccessDesc(_CUmemLocation(_CU_MEM_LOCATION_TYPE_DEVICE, ordinal),
                                _CU_MEM_ACCESS_FLAGS_PROT_READ)
        self._check(self.lib.cuMemSetAccess(ctypes.c_ulonglong(ptr), ctypes.c_size_t(size),
                                            ctypes.byref(desc), ctypes.c_size_t(1)),
                    "cuMemSetAccess")

    def unmap(self, ptr: int, size: int) -> None:
        self._check(self.lib.cuMemUnmap(ctypes.c_ulonglong(ptr), ctypes.c_size_t(size)),
                    "cuMemUnmap")

    def free(self, ptr: int, size: int) -> None:
        self._check(self.lib.cuMemAddressFree(ctypes.c_ulonglong(ptr), ctypes.c_size_t(size)),
                    "cuMemAddressFree")

    def release(self, handle: Any) -> None:
        self._check(self.lib.cuMemRelease(ctypes.c_ulonglong(handle)), "cuMemRelease")


_api: Optional[Any] = None


def driver_api() -> Any:
    """The driver: cuda-python's bindings when installed, else libcuda.so.1 through ctypes."""
    global _api
    if _api is None:
        try:
            from cuda.bindings import driver  # type: ignore[import-not-found,unused-ignore]
        except ImportError:
            try:
                from cuda import cuda as driver  # type: ignore[import-not-found,no-redef,unused-ignore]
            except ImportError:
                driver = None
        if driver is not None:
            _api = _CudaPythonApi(driver)
        else:
            try:
                _api = _CtypesApi(ctypes.CDLL("libcuda.so.1"))
            except OSError as e:
                raise ImportError(
                    "attaching to GPU memory needs the NVIDIA driver (libcuda.so.1) or "
                    "cuda-python (pip install cuda-python)") from e
    return _api


def _import(api: Any, fd: int, size: int, ordinal: int) -> Tuple[int, Callable[[], None]]:
    """Map the allocation behind fd; returns its address and the function that undoes it all."""
    api.init()
    ctx = api.retain_primary(ordinal)
    try:
        # The calls run in the device's primary context (the one torch and the runtime API use),
        # pushed and popped so that the caller's current context is left as it was.
        api.push(ctx)
        try:
            with contextlib.ExitStack() as undo:
                handle = api.import_fd(fd)
                undo.callback(api.release, handle)
                ptr = api.reserve(size)
                undo.callback(api.free, ptr, size)
                api.map(ptr, size, handle)
                undo.callback(api.unmap, ptr, size)
                api.set_read_access(ptr, size, ordinal)
                mapped = undo.pop_all()
        finally:
            api.pop()
    except BaseException:
        api.release_primary(ordinal)
        raise

    def release() -> None:
        api.push(ctx)
        try:
            mapped.close()
        finally:
            api.pop()
            api.release_primary(ordinal)

    return ptr, release


class CudaMapping:
    """One imported allocation, mapped read-only on its device until nothing refers to it."""

    def __init__(self, fd: int, size: int, ordinal: int) -> None:
        self.size = size
        self.device = ordinal
        self.ptr, release = _import(driver_api(), fd, size, ordinal)
        finalizer = weakref.finalize(self, release)
        # At interpreter exit the process's mappings go with it; calling into the driver while
        # other libraries are being torn down would only risk errors.
        finalizer.atexit = False


class CudaArray:
    """A tensor in attached GPU memory, for any consumer of ``__cuda_array_interface__``.

    BF16 and F8 tensors have the unsigned integer type string of their width (the interface has
    no code for them); reinterpret them in the consumer (e.g. ``tensor.view(torch.bfloat16)``).
    The object keeps the mapping alive, and so does whatever a consumer builds from it.
    """

    __slots__ = ("name", "dtype", "shape", "device", "ptr", "typestr", "readonly", "_mapping")

    def __init__(self, name: str, dtype: DType, shape: Tuple[int, ...], mapping: CudaMapping,
                 offset: int, typestr: Optional[str] = None, readonly: bool = True) -> None:
        self.name = name
        self.dtype = dtype.name
        self.shape = shape
        self.device = mapping.device
        self.ptr = mapping.ptr + offset
        self.typestr = typestr or dtype.typestr
        self.readonly = readonly
        self._mapping = mapping

    @property
    def __cuda_array_interface__(self) -> Dict[str, Any]:
        return array_interface(self.ptr, self.shape, self.typestr, self.readonly)

    def __repr__(self) -> str:
        return (f"CudaArray({self.name!r}, dtype={self.dtype}, shape={self.shape}, "
                f"device=cuda:{self.device}, ptr=0x{self.ptr:x})")
