"""Python client of the model-loader server.

attach() maps a loaded model's memory from the server's attach socket into this process without
a copy (numpy arrays, torch tensors, CUDA array interface objects); load() loads a model over
gRPC and shows its progress. The adapters build framework models over that memory in one call:
model_loader.transformers, model_loader.sentence_transformers and model_loader.diffusers (each
imported on its own, with its framework); release() ends such a model's lease.
"""

from ._adapt import AdapterError, AttachStats, release
from ._attach import (
    DEFAULT_SOCKET,
    SOCKET_ENV,
    Attached,
    BufferInfo,
    FileSpec,
    TensorSpec,
    attach,
    default_socket,
)
from ._cuda import CudaArray, CudaError
from ._errors import AttachError, LoadError, ModelLoaderError
from ._load import DEFAULT_SERVER, load
from ._proto import model_loader_pb2 as pb2

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_SERVER",
    "DEFAULT_SOCKET",
    "SOCKET_ENV",
    "AdapterError",
    "AttachError",
    "AttachStats",
    "Attached",
    "BufferInfo",
    "CudaArray",
    "CudaError",
    "FileSpec",
    "LoadError",
    "ModelLoaderError",
    "TensorSpec",
    "attach",
    "default_socket",
    "load",
    "pb2",
    "release",
]
