"""What the framework adapters share: the served files on disk, the lease tied to the model, and
the count of bytes attached versus copied."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Tuple

from ._attach import Attached

log = logging.getLogger("model_loader")

# The attribute an adapter's model carries: the lease's finalizer and the Attached it closes.
_LEASE_ATTR = "_model_loader_lease"
STATS_ATTR = "model_loader_stats"

# LoadModel's dtype names, as torch dtypes' attribute names.
_TORCH_DTYPES = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}


class AdapterError(ValueError):
    """The model the server has cannot be built by this adapter (unknown class, missing file)."""


@dataclass
class AttachStats:
    """Where a built model's state lives: in the server's attached memory or in copies.

    Measured after building: every parameter and persistent buffer whose storage lies inside an
    attached buffer counts as attached, the rest (converted, fused, cast) as copied. A storage
    shared by several names (tied weights) counts once.
    """

    attached_bytes: int = 0
    copied_bytes: int = 0
    # The state's names whose tensors are copies, in state_dict order.
    copied: List[str] = field(default_factory=list)

    def add(self, other: AttachStats, prefix: str = "") -> None:
        self.attached_bytes += other.attached_bytes
        self.copied_bytes += other.copied_bytes
        self.copied.extend(prefix + name for name in other.copied)

    def __str__(self) -> str:
        return (f"{self.attached_bytes} bytes attached, {self.copied_bytes} bytes copied"
                + (f" ({len(self.copied)} tensors: {', '.join(self.copied[:8])}"
                   f"{', ...' if len(self.copied) > 8 else ''})" if self.copied else ""))


def torch_dtype(torch: Any, dtype: Optional[str], state: Dict[str, Any]) -> Any:
    """The torch dtype to build in: the one asked (the server converted to it), else the one most
    of the attached floating-point bytes have, so that the framework casts nothing."""
    if dtype is not None:
        name = _TORCH_DTYPES.get(dtype.lower())
        if name is None:
            raise AdapterError(f"dtype {dtype!r} is none of {sorted(_TORCH_DTYPES)}")
        return getattr(torch, name)
    by_dtype: Dict[Any, int] = {}
    for t in state.values():
        if t.is_floating_point():
            by_dtype[t.dtype] = by_dtype.get(t.dtype, 0) + t.numel() * t.element_size()
    return max(by_dtype, key=lambda d: by_dtype[d]) if by_dtype else None


def device_map_of(state: Dict[str, Any]) -> Optional[Dict[str, str]]:
    """For a model split over several devices, each module on its tensors' device (a
    ``device_map`` for ``from_pretrained``, which then leaves every tensor where it is); None for
    tensors on one device. Its first entry, ``""``, puts what the state does not hold (buffers the
    model computes, such as rotary frequencies) on the first tensor's device: transformers gives
    each parameter the last entry that names it, and accelerate wants every one named."""
    devices = [str(t.device) for t in state.values()]
    if len(set(devices)) <= 1:
        return None
    modules: Dict[str, str] = {"": devices[0]}
    for name, t in state.items():
        module, device = name.rpartition(".")[0] or name, str(t.device)
        if modules.setdefault(module, device) != device:
            raise AdapterError(f"module {module!r} has tensors on {modules[module]} and {device}: "
                               "the server splits whole modules, so this model was not split by it")
    return modules


def safe_path(root: Path, path: str) -> Path:
    """root/path for a path the server sent, refused when it would leave root."""
    parts = path.split("/")
    if any(p in ("..", ".", "") or "\0" in p for p in parts):
        raise AdapterError(f"the server sent a file with the unsafe path {path!r}")
    return root.joinpath(*parts)


@contextlib.contextmanager
def served_folder(files: Dict[str, bytes]) -> Iterator[Path]:
    """The model's small files written into a private temporary folder (mode 0700), so that the
    framework's own readers (from_pretrained on configs and tokenizers) read them; removed after.
    The weights are never among them: they come from attached memory."""
    root = Path(tempfile.mkdtemp(prefix="model-loader-"))
    try:
        write_files(root, files, exclusive=True)
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def write_files(root: Path, files: Dict[str, bytes], exclusive: bool = False) -> None:
    """Each served file at its path under root (paths that would leave root are refused).
    exclusive: create each anew, owner-only (a private folder); else replace what is there."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_EXCL if exclusive else os.O_TRUNC)
    for path, data in files.items():
        target = safe_path(root, path)
        target.parent.mkdir(parents=True, exist_ok=True)
        with os.fdopen(os.open(target, flags, 0o600 if exclusive else 0o644), "wb") as f:
            f.write(data)


def _attached_ranges(att: Attached, state: Dict[str, Any]) -> List[Tuple[str, int, int]]:
    """(device, start, end) of every attached buffer, from the tensors made over them."""
    ranges: Dict[int, Tuple[str, int, int]] = {}
    for name, t in state.items():
        spec = att.tensor_specs[name]
        if spec.size_bytes == 0 or spec.buffer in ranges:
            continue
        start = t.data_ptr() - spec.offset
        ranges[spec.buffer] = (str(t.device), start, start + att.buffers[spec.buffer].size_bytes)
    return list(ranges.values())


def measure(module: Any, att: Attached, state: Dict[str, Any]) -> AttachStats:
    """Count the module's parameters and persistent buffers as attached or copied."""
    ranges = _attached_ranges(att, state)
    stats = AttachStats()
    seen = set()
    for name, t in module.state_dict(keep_vars=True).items():
        storage = t.untyped_storage()
        key = (str(t.device), storage.data_ptr(), storage.nbytes())
        if key in seen:
            continue
        seen.add(key)
        nbytes = t.numel() * t.element_size()
        ptr = t.data_ptr()
        inside = any(dev == key[0] and start <= ptr and ptr + nbytes <= end
                     for dev, start, end in ranges)
        if inside or nbytes == 0:
            stats.attached_bytes += nbytes
        else:
            stats.copied_bytes += nbytes
            stats.copied.append(name)
    return stats


def bind_lease(obj: Any, att: Attached, stats: AttachStats, what: str) -> Any:
    """Tie the lease to obj: closed when obj is collected or on release(obj); report stats."""
    finalizer = weakref.finalize(obj, att.close)
    # obj keeps the Attached (and so its mappings) alive as long as obj lives.
    object.__setattr__(obj, _LEASE_ATTR, (finalizer, att))
    object.__setattr__(obj, STATS_ATTR, stats)
    log.info("%s %s from the attached model %r: %s", what, type(obj).__name__, att.model_id, stats)
    return obj


def release(model: Any) -> None:
    """End the lease of a model an adapter built, now rather than when it is garbage collected.

    The server may then unload or evict the model. The model's tensors stay valid memory (the
    mappings go when the model is collected), but the server no longer counts them as in use:
    drop the model after releasing it. Releasing twice does nothing.
    """
    lease = getattr(model, _LEASE_ATTR, None)
    if lease is None:
        raise TypeError(f"{type(model).__name__} was not built by a model_loader adapter")
    lease[0]()


def lease_alive(model: Any) -> bool:
    """Whether the model's lease is still held (not released, not ended by the server)."""
    lease = getattr(model, _LEASE_ATTR, None)
    return lease is not None and bool(lease[1].alive())


def check_names(names: Iterable[str], need: Iterable[str], what: str, model_id: str) -> None:
    """Fail naming what is missing when none of `need` is among the served names."""
    have = set(names)
    if not any(n in have for n in need):
        raise AdapterError(
            f"{model_id!r} has no {what}: the server keeps none of {', '.join(sorted(need))} "
            f"(it has {', '.join(sorted(have)) or 'no small files'})")
