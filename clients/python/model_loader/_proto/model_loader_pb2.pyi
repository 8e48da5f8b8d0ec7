from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ModelLoadPhase(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODEL_LOAD_PHASE_UNSPECIFIED: _ClassVar[ModelLoadPhase]
    MODEL_LOAD_PHASE_INITIALIZATION: _ClassVar[ModelLoadPhase]
    MODEL_LOAD_PHASE_LOADING: _ClassVar[ModelLoadPhase]
    MODEL_LOAD_PHASE_DEVICE: _ClassVar[ModelLoadPhase]
    MODEL_LOAD_PHASE_OPTIMIZATION: _ClassVar[ModelLoadPhase]
    MODEL_LOAD_PHASE_FINALIZATION: _ClassVar[ModelLoadPhase]

class ModelState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODEL_STATE_UNSPECIFIED: _ClassVar[ModelState]
    MODEL_STATE_UNLOADED: _ClassVar[ModelState]
    MODEL_STATE_LOADING: _ClassVar[ModelState]
    MODEL_STATE_LOADED: _ClassVar[ModelState]
    MODEL_STATE_UNLOADING: _ClassVar[ModelState]
    MODEL_STATE_FAILED: _ClassVar[ModelState]

class ModelSource(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODEL_SOURCE_UNSPECIFIED: _ClassVar[ModelSource]
    MODEL_SOURCE_LOCAL: _ClassVar[ModelSource]
    MODEL_SOURCE_CACHE: _ClassVar[ModelSource]
    MODEL_SOURCE_HUB: _ClassVar[ModelSource]
    MODEL_SOURCE_OBJECT_STORE: _ClassVar[ModelSource]

class BufferKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BUFFER_KIND_UNSPECIFIED: _ClassVar[BufferKind]
    BUFFER_KIND_HOST_MEMFD: _ClassVar[BufferKind]
    BUFFER_KIND_HOST_FILE: _ClassVar[BufferKind]
    BUFFER_KIND_CUDA_VMM: _ClassVar[BufferKind]
MODEL_LOAD_PHASE_UNSPECIFIED: ModelLoadPhase
MODEL_LOAD_PHASE_INITIALIZATION: ModelLoadPhase
MODEL_LOAD_PHASE_LOADING: ModelLoadPhase
MODEL_LOAD_PHASE_DEVICE: ModelLoadPhase
MODEL_LOAD_PHASE_OPTIMIZATION: ModelLoadPhase
MODEL_LOAD_PHASE_FINALIZATION: ModelLoadPhase
MODEL_STATE_UNSPECIFIED: ModelState
MODEL_STATE_UNLOADED: ModelState
MODEL_STATE_LOADING: ModelState
MODEL_STATE_LOADED: ModelState
MODEL_STATE_UNLOADING: ModelState
MODEL_STATE_FAILED: ModelState
MODEL_SOURCE_UNSPECIFIED: ModelSource
MODEL_SOURCE_LOCAL: ModelSource
MODEL_SOURCE_CACHE: ModelSource
MODEL_SOURCE_HUB: ModelSource
MODEL_SOURCE_OBJECT_STORE: ModelSource
BUFFER_KIND_UNSPECIFIED: BufferKind
BUFFER_KIND_HOST_MEMFD: BufferKind
BUFFER_KIND_HOST_FILE: BufferKind
BUFFER_KIND_CUDA_VMM: BufferKind

class ModelLoadProgress(_message.Message):
    __slots__ = ("model_id", "step", "total", "phase", "message", "detail", "bytes_done", "bytes_total")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    BYTES_DONE_FIELD_NUMBER: _ClassVar[int]
    BYTES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    step: int
    total: int
    phase: ModelLoadPhase
    message: str
    detail: str
    bytes_done: int
    bytes_total: int
    def __init__(self, model_id: _Optional[str] = ..., step: _Optional[int] = ..., total: _Optional[int] = ..., phase: _Optional[_Union[ModelLoadPhase, str]] = ..., message: _Optional[str] = ..., detail: _Optional[str] = ..., bytes_done: _Optional[int] = ..., bytes_total: _Optional[int] = ...) -> None: ...

class LoadModelRequest(_message.Message):
    __slots__ = ("model_id", "revision", "device", "dtype", "placement", "device_map")
    class DeviceMapEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_FIELD_NUMBER: _ClassVar[int]
    DEVICE_MAP_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    revision: str
    device: str
    dtype: str
    placement: str
    device_map: _containers.ScalarMap[str, str]
    def __init__(self, model_id: _Optional[str] = ..., revision: _Optional[str] = ..., device: _Optional[str] = ..., dtype: _Optional[str] = ..., placement: _Optional[str] = ..., device_map: _Optional[_Mapping[str, str]] = ...) -> None: ...

class WatchModelsRequest(_message.Message):
    __slots__ = ("model_id",)
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    def __init__(self, model_id: _Optional[str] = ...) -> None: ...

class ModelEvent(_message.Message):
    __slots__ = ("status", "progress")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    status: ModelStatus
    progress: ModelLoadProgress
    def __init__(self, status: _Optional[_Union[ModelStatus, _Mapping]] = ..., progress: _Optional[_Union[ModelLoadProgress, _Mapping]] = ...) -> None: ...

class CancelLoadRequest(_message.Message):
    __slots__ = ("model_id",)
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    def __init__(self, model_id: _Optional[str] = ...) -> None: ...

class CancelLoadResponse(_message.Message):
    __slots__ = ("was_loading",)
    WAS_LOADING_FIELD_NUMBER: _ClassVar[int]
    was_loading: bool
    def __init__(self, was_loading: bool = ...) -> None: ...

class UnloadModelRequest(_message.Message):
    __slots__ = ("model_id", "force")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    force: bool
    def __init__(self, model_id: _Optional[str] = ..., force: bool = ...) -> None: ...

class UnloadModelResponse(_message.Message):
    __slots__ = ("was_loaded", "freed_bytes")
    WAS_LOADED_FIELD_NUMBER: _ClassVar[int]
    FREED_BYTES_FIELD_NUMBER: _ClassVar[int]
    was_loaded: bool
    freed_bytes: int
    def __init__(self, was_loaded: bool = ..., freed_bytes: _Optional[int] = ...) -> None: ...

class GetModelRequest(_message.Message):
    __slots__ = ("model_id",)
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    def __init__(self, model_id: _Optional[str] = ...) -> None: ...

class ModelStatus(_message.Message):
    __slots__ = ("model_id", "state", "last_progress", "device", "dtype", "revision", "weight_bytes", "sample_size", "error", "source", "unload_reason", "attached_clients", "metadata_bytes", "error_kind", "last_used_unix_ms")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    LAST_PROGRESS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_BYTES_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_SIZE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    UNLOAD_REASON_FIELD_NUMBER: _ClassVar[int]
    ATTACHED_CLIENTS_FIELD_NUMBER: _ClassVar[int]
    METADATA_BYTES_FIELD_NUMBER: _ClassVar[int]
    ERROR_KIND_FIELD_NUMBER: _ClassVar[int]
    LAST_USED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    state: ModelState
    last_progress: ModelLoadProgress
    device: str
    dtype: str
    revision: str
    weight_bytes: int
    sample_size: int
    error: str
    source: ModelSource
    unload_reason: str
    attached_clients: int
    metadata_bytes: int
    error_kind: str
    last_used_unix_ms: int
    def __init__(self, model_id: _Optional[str] = ..., state: _Optional[_Union[ModelState, str]] = ..., last_progress: _Optional[_Union[ModelLoadProgress, _Mapping]] = ..., device: _Optional[str] = ..., dtype: _Optional[str] = ..., revision: _Optional[str] = ..., weight_bytes: _Optional[int] = ..., sample_size: _Optional[int] = ..., error: _Optional[str] = ..., source: _Optional[_Union[ModelSource, str]] = ..., unload_reason: _Optional[str] = ..., attached_clients: _Optional[int] = ..., metadata_bytes: _Optional[int] = ..., error_kind: _Optional[str] = ..., last_used_unix_ms: _Optional[int] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models", "next_page_token")
    MODELS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelStatus]
    next_page_token: str
    def __init__(self, models: _Optional[_Iterable[_Union[ModelStatus, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class GetResourcesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetResourcesResponse(_message.Message):
    __slots__ = ("devices",)
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    devices: _containers.RepeatedCompositeFieldContainer[DeviceResources]
    def __init__(self, devices: _Optional[_Iterable[_Union[DeviceResources, _Mapping]]] = ...) -> None: ...

class DeviceResources(_message.Message):
    __slots__ = ("name", "total_bytes", "used_bytes", "reserved_bytes", "budget_bytes", "models", "available_bytes", "peak_bytes")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    RESERVED_BYTES_FIELD_NUMBER: _ClassVar[int]
    BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_BYTES_FIELD_NUMBER: _ClassVar[int]
    PEAK_BYTES_FIELD_NUMBER: _ClassVar[int]
    name: str
    total_bytes: int
    used_bytes: int
    reserved_bytes: int
    budget_bytes: int
    models: _containers.RepeatedCompositeFieldContainer[ModelResources]
    available_bytes: int
    peak_bytes: int
    def __init__(self, name: _Optional[str] = ..., total_bytes: _Optional[int] = ..., used_bytes: _Optional[int] = ..., reserved_bytes: _Optional[int] = ..., budget_bytes: _Optional[int] = ..., models: _Optional[_Iterable[_Union[ModelResources, _Mapping]]] = ..., available_bytes: _Optional[int] = ..., peak_bytes: _Optional[int] = ...) -> None: ...

class ModelResources(_message.Message):
    __slots__ = ("model_id", "bytes")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    bytes: int
    def __init__(self, model_id: _Optional[str] = ..., bytes: _Optional[int] = ...) -> None: ...

class ListTensorsRequest(_message.Message):
    __slots__ = ("model_id", "with_checksums")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    WITH_CHECKSUMS_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    with_checksums: bool
    def __init__(self, model_id: _Optional[str] = ..., with_checksums: bool = ...) -> None: ...

class ListTensorsResponse(_message.Message):
    __slots__ = ("tensors",)
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    tensors: _containers.RepeatedCompositeFieldContainer[TensorInfo]
    def __init__(self, tensors: _Optional[_Iterable[_Union[TensorInfo, _Mapping]]] = ...) -> None: ...

class TensorInfo(_message.Message):
    __slots__ = ("name", "dtype", "shape", "size_bytes", "sha256", "device")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    size_bytes: int
    sha256: str
    device: str
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., size_bytes: _Optional[int] = ..., sha256: _Optional[str] = ..., device: _Optional[str] = ...) -> None: ...

class GetModelFilesRequest(_message.Message):
    __slots__ = ("model_id",)
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    def __init__(self, model_id: _Optional[str] = ...) -> None: ...

class GetModelFilesResponse(_message.Message):
    __slots__ = ("files",)
    FILES_FIELD_NUMBER: _ClassVar[int]
    files: _containers.RepeatedCompositeFieldContainer[ModelFile]
    def __init__(self, files: _Optional[_Iterable[_Union[ModelFile, _Mapping]]] = ...) -> None: ...

class ModelFile(_message.Message):
    __slots__ = ("path", "size_bytes", "sha256", "content")
    PATH_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    path: str
    size_bytes: int
    sha256: str
    content: bytes
    def __init__(self, path: _Optional[str] = ..., size_bytes: _Optional[int] = ..., sha256: _Optional[str] = ..., content: _Optional[bytes] = ...) -> None: ...

class ReadModelFileRequest(_message.Message):
    __slots__ = ("model_id", "path")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    path: str
    def __init__(self, model_id: _Optional[str] = ..., path: _Optional[str] = ...) -> None: ...

class ModelFileChunk(_message.Message):
    __slots__ = ("offset", "data")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    offset: int
    data: bytes
    def __init__(self, offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class AttachRequest(_message.Message):
    __slots__ = ("model_id", "revision", "device", "load_if_needed", "dtype", "include_files")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    LOAD_IF_NEEDED_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_FILES_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    revision: str
    device: str
    load_if_needed: bool
    dtype: str
    include_files: bool
    def __init__(self, model_id: _Optional[str] = ..., revision: _Optional[str] = ..., device: _Optional[str] = ..., load_if_needed: bool = ..., dtype: _Optional[str] = ..., include_files: bool = ...) -> None: ...

class AttachResponse(_message.Message):
    __slots__ = ("code", "message", "status", "buffers", "tensors", "files")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    BUFFERS_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    status: ModelStatus
    buffers: _containers.RepeatedCompositeFieldContainer[AttachedBuffer]
    tensors: _containers.RepeatedCompositeFieldContainer[AttachedTensor]
    files: _containers.RepeatedCompositeFieldContainer[ModelFile]
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ..., status: _Optional[_Union[ModelStatus, _Mapping]] = ..., buffers: _Optional[_Iterable[_Union[AttachedBuffer, _Mapping]]] = ..., tensors: _Optional[_Iterable[_Union[AttachedTensor, _Mapping]]] = ..., files: _Optional[_Iterable[_Union[ModelFile, _Mapping]]] = ...) -> None: ...

class AttachedBuffer(_message.Message):
    __slots__ = ("kind", "device", "size_bytes")
    KIND_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    kind: BufferKind
    device: str
    size_bytes: int
    def __init__(self, kind: _Optional[_Union[BufferKind, str]] = ..., device: _Optional[str] = ..., size_bytes: _Optional[int] = ...) -> None: ...

class AttachedTensor(_message.Message):
    __slots__ = ("name", "dtype", "shape", "buffer", "offset", "size_bytes", "file")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    BUFFER_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    FILE_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    buffer: int
    offset: int
    size_bytes: int
    file: str
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., buffer: _Optional[int] = ..., offset: _Optional[int] = ..., size_bytes: _Optional[int] = ..., file: _Optional[str] = ...) -> None: ...
