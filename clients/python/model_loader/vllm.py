"""vLLM's load format ``model-loader``: the engine takes its weights from a model-loader server.

Installed with the client, the plugin registers itself through the ``vllm.general_plugins``
entry point; then::

    python -m model_loader.vllm files org/model /models/org-model     # config and tokenizer
    vllm serve /models/org-model --load-format model-loader \\
        --model-loader-extra-config '{"model_id": "org/model"}'

vLLM reads the config and the tokenizer from ``--model`` before any loader runs, so the first
line writes the small files the server keeps with the model into a folder (nothing but the attach
socket is needed). The loader then asks the server to load the model (LoadModel over gRPC,
joining a load in flight; its steps and bytes go to vLLM's log), attaches to it, and feeds every
tensor by its checkpoint name, in checkpoint order, to the model's own ``load_weights``: vLLM
slices its tensor-parallel shard, fuses q/k/v and gate/up and processes quantized weights itself,
exactly as from files. Every parameter vLLM's model has must have been loaded (the missing are
named: stricter than vLLM's own loader, see check_loaded). The lease ends when the weights are in: vLLM's parameters are copies (fused and sharded),
so the server may then unload or evict the model.

Settings (``--model-loader-extra-config``, JSON), all optional:

- ``model_id``: the server's id of the model, when it differs from vLLM's ``--model``.
- ``socket``: the attach socket (default ``$MODEL_LOADER_ATTACH_SOCKET``, else
  ``model_loader.DEFAULT_SOCKET``).
- ``server``: the gRPC address for the load and its progress (default ``$MODEL_LOADER_SERVER``,
  else 127.0.0.1:50051). Unreachable, the attach socket loads the model, without progress.
- ``device``: where the server should hold the model: ``"cpu"``, ``"cuda:N"``, or ``"engine"``
  for the device vLLM loads onto (a model on the engine's GPU is one device-to-device copy).
  Default: wherever it is resident, else the server's default device.
- ``dtype``: have the server convert (``"bf16"``, ``"f16"``, ``"f32"``); default as stored (vLLM
  casts while copying, as from files).
- ``revision``: the revision to load.
- ``fallback``: when the server cannot be reached, load from ``--model`` on disk (vLLM's own
  loader) with a warning instead of failing. Default false.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Set, Tuple

from . import _adapt
from ._attach import Attached, PathLike, attach, default_socket
from ._errors import UNAVAILABLE, AttachError, LoadError
from ._load import DEFAULT_SERVER, STEPS, load

LOAD_FORMAT = "model-loader"
SERVER_ENV = "MODEL_LOADER_SERVER"

log = logging.getLogger("model_loader.vllm")


class ModelLoaderUnreachable(RuntimeError):
    """Neither the attach socket nor the gRPC address answered (and fallback is off)."""


@dataclass(frozen=True)
class Settings:
    """The plugin's keys of ``--model-loader-extra-config``."""

    model_id: Optional[str] = None
    socket: Optional[str] = None
    server: Optional[str] = None
    device: Optional[str] = None
    dtype: Optional[str] = None
    revision: Optional[str] = None
    fallback: bool = False

    @classmethod
    def parse(cls, extra: Optional[Dict[str, Any]]) -> Settings:
        """The settings from vLLM's extra config; unknown keys are refused by name."""
        extra = dict(extra or {})
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(extra) - names)
        if unknown:
            raise ValueError(f"unknown --model-loader-extra-config keys for load format "
                             f"{LOAD_FORMAT!r}: {', '.join(unknown)} (known: "
                             f"{', '.join(sorted(names))})")
        fallback = extra.get("fallback", False)
        if not isinstance(fallback, bool):
            raise ValueError(f"fallback must be true or false, not {fallback!r}")
        for key in names - {"fallback"}:
            if extra.get(key) is not None and not isinstance(extra[key], str):
                raise ValueError(f"{key} must be a string, not {extra[key]!r}")
        return cls(**extra)

    def grpc_address(self) -> str:
        return self.server or os.environ.get(SERVER_ENV) or DEFAULT_SERVER


def checkpoint_weights(att: Attached) -> Iterator[Tuple[str, Any]]:
    """Every attached tensor as (checkpoint name, torch tensor), in the checkpoint's order:
    files in natural order, names sorted within each, as vLLM reads safetensors files."""
    tensors = att.torch()
    for name in att.checkpoint_order():
        yield name, tensors[name]


def write_files(model_id: str, folder: PathLike, *, socket: Optional[PathLike] = None,
                device: Optional[str] = None, load_if_needed: bool = True) -> List[str]:
    """Write the small files the server keeps with the model (config, tokenizer, generation
    config) into folder, for vLLM's ``--model``; returns their paths. The weights stay on the
    server. A short lease reads them (loading the model first when load_if_needed)."""
    with attach(model_id, socket, device=device, load_if_needed=load_if_needed, files=True,
                timeout=None) as att:
        files = att.files
    _adapt.check_names(files, ("config.json",), "config.json", model_id)
    _adapt.write_files(Path(folder), files)
    return sorted(files)


def check_loaded(model: Any, loaded: Set[str], quantization: Optional[str], model_id: str,
                 disk: Any) -> None:
    """Fail naming every parameter of vLLM's model that the checkpoint did not fill.

    vLLM's own check (DefaultModelLoader.track_weights_loading) exempts, on a model without
    quantization, every parameter of a layer with a weight-processing method (all linear and
    embedding layers), so a checkpoint missing its lm_head loads there with the head left as
    allocated. Here an unquantized model must get every parameter; a quantized one follows vLLM's
    rule (its scales may come from the quantization config)."""
    if quantization is None:
        missing = sorted({name for name, _ in model.named_parameters()} - loaded)
        if missing:
            raise ValueError(f"{model_id!r} from model-loader lacks {len(missing)} of the "
                             f"weights vLLM's model needs: {', '.join(missing[:20])}"
                             f"{', ...' if len(missing) > 20 else ''}")
        return
    try:
        disk.track_weights_loading(model, loaded, quantized=True)
    except ValueError as e:
        raise ValueError(f"{model_id!r} from model-loader: {e}") from None


class _ProgressLog:
    """LoadModel's progress as vLLM log lines: each step once, bytes at most every 2 s."""

    def __init__(self, logger: Any, model_id: str) -> None:
        self._log, self._id = logger, model_id
        self._step, self._at = 0, 0.0

    def __call__(self, msg: Any) -> None:
        total = msg.total or STEPS
        now = time.monotonic()
        if msg.step != self._step:
            self._step, self._at = msg.step, now
            detail = f" ({msg.detail})" if msg.detail else ""
            self._log.info("model-loader: %s step %d/%d %s%s", self._id, msg.step, total,
                           msg.message, detail)
        elif msg.bytes_total and now - self._at >= 2.0:
            self._at = now
            self._log.info("model-loader: %s step %d/%d %s %.2f/%.2f GB", self._id, msg.step,
                           total, msg.message, msg.bytes_done / 1e9, msg.bytes_total / 1e9)


def register() -> None:
    """The ``vllm.general_plugins`` entry point: registers the load format (once a process)."""
    global _registered
    if _registered:
        return
    from vllm.model_executor.model_loader import register_model_loader

    register_model_loader(LOAD_FORMAT)(_loader_class())
    _registered = True


_registered = False


def _loader_class() -> Any:
    """The BaseModelLoader subclass, defined once vLLM is importable."""
    import dataclasses

    import torch
    from vllm.logger import init_logger
    from vllm.model_executor.model_loader.base_loader import BaseModelLoader
    from vllm.model_executor.model_loader.default_loader import DefaultModelLoader

    # Under "vllm": vLLM configures the handlers of its own logger tree only.
    vllm_log = init_logger("vllm.plugins.model_loader")

    class ModelLoaderServerLoader(BaseModelLoader):  # type: ignore[misc]
        """Weights from a model-loader server over its attach socket (module docstring)."""

        def __init__(self, load_config: Any) -> None:
            super().__init__(load_config)
            self.settings = Settings.parse(load_config.model_loader_extra_config)
            # vLLM's own loader, for the fallback and its check of what was loaded: it refuses
            # extra keys it does not know, so it sees none of ours.
            self._disk = DefaultModelLoader(
                dataclasses.replace(load_config, load_format="auto", model_loader_extra_config={}))
            self._use_disk = False

        def _model_id(self, model_config: Any) -> str:
            return self.settings.model_id or str(model_config.model)

        def _device(self) -> Optional[str]:
            device = self.settings.device
            if device == "engine":
                if torch.cuda.is_available() and torch.cuda.is_initialized():
                    return f"cuda:{torch.cuda.current_device()}"
                return "cpu"
            return device

        def _unreachable(self, what: str, error: Exception) -> None:
            if not self.settings.fallback:
                raise ModelLoaderUnreachable(
                    f"the model-loader server cannot be reached ({what}: {error}); start it, "
                    f"fix the socket/server settings, or set \"fallback\": true to load from "
                    f"disk") from error
            vllm_log.warning("model-loader server unreachable (%s: %s): loading from disk "
                             "with vLLM's own loader (fallback)", what, error)
            self._use_disk = True

        def download_model(self, model_config: Any) -> None:
            """Has the server load the model (joining a load in flight), its progress logged."""
            model_id = self._model_id(model_config)
            address = self.settings.grpc_address()
            try:
                load(model_id, address, revision=self.settings.revision, device=self._device(),
                     dtype=self.settings.dtype, progress=False,
                     on_progress=_ProgressLog(vllm_log, model_id))
            except ImportError:
                vllm_log.info("model-loader: no grpcio, the attach socket loads %s", model_id)
            except LoadError as e:
                if e.code != UNAVAILABLE:
                    raise
                # The socket may still answer (gRPC on another address): attach loads then.
                vllm_log.warning("model-loader: gRPC at %s unreachable (%s); the attach socket "
                                 "loads %s, without progress", address, e.message, model_id)

        def load_weights(self, model: Any, model_config: Any) -> None:
            model_id = self._model_id(model_config)
            if not self._use_disk:
                self.download_model(model_config)
                try:
                    att = attach(model_id, self.settings.socket, revision=self.settings.revision,
                                 device=self._device(), dtype=self.settings.dtype,
                                 load_if_needed=True, timeout=None)
                except AttachError as e:
                    if e.code != UNAVAILABLE:
                        raise
                    socket = self.settings.socket or default_socket()
                    self._unreachable(f"attach socket {socket}", e)
            if self._use_disk:
                self._disk.load_weights(model, model_config)
                return
            try:
                self._from_attached(model, model_config, att)
            finally:
                att.close()

        def _from_attached(self, model: Any, model_config: Any, att: Attached) -> None:
            started = time.perf_counter()
            loaded = model.load_weights(checkpoint_weights(att))
            stats = _adapt.measure(model, att, att.torch())
            if loaded is not None:
                check_loaded(model, set(loaded), model_config.quantization, att.model_id,
                             self._disk)
            vllm_log.info(
                "model-loader: %d tensors of %s (%.2f GB) into vLLM in %.2f s; %d bytes of "
                "parameters copied, %d still in the server's memory", len(att.tensor_specs),
                att.model_id, sum(s.size_bytes for s in att.tensor_specs.values()) / 1e9,
                time.perf_counter() - started, stats.copied_bytes, stats.attached_bytes)

    return ModelLoaderServerLoader


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m model_loader.vllm",
        description="Helpers for vLLM's load format model-loader.")
    sub = parser.add_subparsers(dest="command", required=True)
    files = sub.add_parser("files", help="write the model's small files (config, tokenizer) "
                                         "into a folder for vLLM's --model")
    files.add_argument("model_id")
    files.add_argument("folder")
    files.add_argument("--socket", help="the attach socket (default $MODEL_LOADER_ATTACH_SOCKET)")
    files.add_argument("--device", help="where the server should hold the model")
    files.add_argument("--no-load", action="store_true",
                       help="fail unless the model is loaded already")
    args = parser.parse_args(argv)
    try:
        written = write_files(args.model_id, args.folder, socket=args.socket, device=args.device,
                              load_if_needed=not args.no_load)
    except (AttachError, _adapt.AdapterError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{len(written)} files of {args.model_id} in {args.folder}: {', '.join(written)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
