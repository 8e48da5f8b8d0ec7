"""Tensor dtypes as safetensors names them, and what each becomes in numpy, torch and CUDA."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np


@dataclass(frozen=True)
class DType:
    name: str
    itemsize: int
    # Array-interface type string of the raw elements. For dtypes numpy and the CUDA array
    # interface have no code for (BF16, F8) it is the unsigned integer of the same width.
    typestr: str
    # Name of the matching ml_dtypes type, for dtypes numpy lacks.
    ml_dtypes_name: Optional[str] = None
    # Name of the torch dtype (an attribute of the torch module).
    torch_name: Optional[str] = None
    # Type string handed to torch through the CUDA array interface when torch cannot take the
    # dtype that way; the tensor is then reinterpreted with Tensor.view(torch_name). Signed, not
    # unsigned, because torch only accepts uint16 since 2.3.
    torch_raw_typestr: Optional[str] = None


DTYPES: dict[str, DType] = {
    d.name: d
    for d in (
        DType("F64", 8, "<f8", torch_name="float64"),
        DType("F32", 4, "<f4", torch_name="float32"),
        DType("F16", 2, "<f2", torch_name="float16"),
        DType("BF16", 2, "<u2", "bfloat16", "bfloat16", torch_raw_typestr="<i2"),
        DType("F8_E4M3", 1, "|u1", "float8_e4m3fn", "float8_e4m3fn", torch_raw_typestr="|u1"),
        DType("F8_E5M2", 1, "|u1", "float8_e5m2", "float8_e5m2", torch_raw_typestr="|u1"),
        DType("I64", 8, "<i8", torch_name="int64"),
        DType("I32", 4, "<i4", torch_name="int32"),
        DType("I16", 2, "<i2", torch_name="int16"),
        DType("I8", 1, "|i1", torch_name="int8"),
        DType("U64", 8, "<u8", torch_name="uint64"),
        DType("U32", 4, "<u4", torch_name="uint32"),
        DType("U16", 2, "<u2", torch_name="uint16"),
        DType("U8", 1, "|u1", torch_name="uint8"),
        DType("BOOL", 1, "|b1", torch_name="bool"),
    )
}


def lookup(name: str) -> DType:
    try:
        return DTYPES[name]
    except KeyError:
        raise TypeError(f"unsupported tensor dtype {name!r}") from None


def numel(shape: Sequence[int]) -> int:
    return math.prod(shape)


def numpy_dtype(name: str) -> np.dtype[Any]:
    """The numpy dtype for a safetensors dtype.

    BF16 and F8 become ml_dtypes' types when ml_dtypes is installed, else the unsigned integer of
    the same width holding the raw bits.
    """
    d = lookup(name)
    if d.ml_dtypes_name is not None:
        try:
            import ml_dtypes  # type: ignore[import-untyped,unused-ignore]
        except ImportError:
            ml_dtypes = None
        scalar = getattr(ml_dtypes, d.ml_dtypes_name, None)  # None in old ml_dtypes releases
        if scalar is not None:
            ml: np.dtype[Any] = np.dtype(scalar)
            return ml
    return np.dtype(d.typestr)


def torch_dtype(torch: Any, name: str) -> Any:
    """The torch dtype for a safetensors dtype, with an error naming the torch that lacks it."""
    d = lookup(name)
    dtype = getattr(torch, d.torch_name or "", None)
    if dtype is None:
        raise TypeError(f"torch {torch.__version__} has no dtype for {name} ({d.torch_name})")
    return dtype
