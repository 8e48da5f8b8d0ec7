"""load(): LoadModel over gRPC, with a progress bar."""

from __future__ import annotations

import sys
from typing import Any, Callable, Mapping, Optional

from ._errors import UNKNOWN, LoadError
from ._proto import model_loader_pb2 as pb2

DEFAULT_SERVER = "127.0.0.1:50051"
STEPS = 8


class _Progress:
    """A tqdm bar when tqdm is installed (bytes while weights move, steps otherwise), else a line
    on stderr for every step."""

    def __init__(self, model_id: str, enabled: bool) -> None:
        self._bar: Any = None
        self._plain = False
        self._last_step = 0
        if not enabled:
            return
        try:
            from tqdm.auto import tqdm  # type: ignore[import-untyped,unused-ignore]
        except ImportError:
            self._plain = True
            return
        # No rate: it would mix steps and bytes.
        self._bar = tqdm(total=STEPS, unit="", desc=model_id, dynamic_ncols=True,
                         bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt}{unit} "
                                    "[{elapsed}{postfix}]")

    def update(self, msg: pb2.ModelLoadProgress) -> None:
        total = msg.total or STEPS
        if self._plain:
            if msg.step != self._last_step:
                detail = f" ({msg.detail})" if msg.detail else ""
                print(f"{msg.model_id}: step {msg.step}/{total} {msg.message}{detail}",
                      file=sys.stderr, flush=True)
            self._last_step = msg.step
            return
        bar = self._bar
        if bar is None:
            return
        if msg.bytes_total:
            bar.unit, bar.unit_scale, bar.unit_divisor = "B", True, 1024
            bar.total, bar.n = msg.bytes_total, msg.bytes_done
        else:
            bar.unit, bar.unit_scale = "", False
            bar.total, bar.n = total, msg.step
        bar.set_description_str(f"{msg.step}/{total} {msg.message}", refresh=False)
        bar.set_postfix_str(msg.detail, refresh=False)
        bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def load(
    model_id: str,
    server: str = DEFAULT_SERVER,
    *,
    revision: Optional[str] = None,
    device: Optional[str] = None,
    dtype: Optional[str] = None,
    placement: Optional[str] = None,
    device_map: Optional[Mapping[str, str]] = None,
    progress: bool = True,
    timeout: Optional[float] = None,
    on_progress: Optional[Callable[[pb2.ModelLoadProgress], None]] = None,
) -> pb2.ModelLoadProgress:
    """Load a model with LoadModel and follow its progress to the end; returns the last message.

    device: "cpu", "cuda:N", or several GPUs ("cuda:0,cuda:1", "cuda:*"); placement: "split" or
    "replicate" over several; device_map: for a split load, module prefixes to devices
    ({"lm_head": "cuda:1", "": "cuda:0"}).

    A model that is loading already is joined; a loaded one answers at once (step 8, detail
    "already loaded"). progress: show a tqdm bar (a plain line a step without tqdm). timeout:
    seconds for the whole stream; None waits. on_progress: called with every message (an
    engine's log, say). Raises LoadError with the stream's gRPC status.
    Interrupting the call stops following the load, not the load (CancelLoad stops it).
    """
    try:
        import grpc
    except ImportError:
        raise ImportError("load() needs grpcio: pip install 'model-loader-client[grpc]'") from None
    from ._proto import model_loader_pb2_grpc as pb2_grpc

    request = pb2.LoadModelRequest(model_id=model_id)
    if revision is not None:
        request.revision = revision
    if device is not None:
        request.device = device
    if dtype is not None:
        request.dtype = dtype
    if placement is not None:
        request.placement = placement
    request.device_map.update(device_map or {})

    last: Optional[pb2.ModelLoadProgress] = None
    bar = _Progress(model_id, progress)
    try:
        with grpc.insecure_channel(server) as channel:
            call = pb2_grpc.ModelLoaderStub(channel).LoadModel(request, timeout=timeout)
            try:
                for msg in call:
                    last = msg
                    bar.update(msg)
                    if on_progress is not None:
                        on_progress(msg)
            except grpc.RpcError as e:
                status = e.code()
                raise LoadError(status.value[0], status.name, e.details() or "") from e
            finally:
                call.cancel()  # a no-op once the stream has ended
    finally:
        bar.close()
    if last is None:
        raise LoadError.from_code(UNKNOWN, "the LoadModel stream ended without a message")
    return last
