"""diffusers pipelines from a model-loader server, every component's weights attached.

``from_server("org/pipeline")`` builds each component that has weights the way diffusers'
``from_pretrained`` does, with the attached ``component/...`` tensors instead of the weight files:
diffusers models (UNet, VAE, ...) are made on ``meta`` from their served config and filled with
diffusers' own ``load_model_dict_into_meta``; transformers models (CLIP's text encoder) go through
``model_loader.transformers``. The pipeline itself, its tokenizers, schedulers and feature
extractors come from ``DiffusionPipeline.from_pretrained`` on the served small files, given the
built components.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from . import _adapt
from . import transformers as _tf
from ._adapt import AdapterError, AttachStats
from ._attach import Attached, PathLike, attach

# The libraries a model_index.json may name for a component with weights.
_LIBRARIES = ("diffusers", "transformers")


def _import() -> Any:
    try:
        import diffusers
    except ImportError:
        raise ImportError("model_loader.diffusers needs diffusers, transformers and torch: pip "
                          "install 'model-loader-client[diffusers]'") from None
    return diffusers


def _component_class(name: str, entry: Any) -> Any:
    """The class model_index.json names for a component, from diffusers or transformers only."""
    library, class_name = entry
    if library not in _LIBRARIES:
        raise AdapterError(f"component {name!r} is a {library}.{class_name}: only diffusers and "
                           "transformers components with weights can be attached")
    klass = getattr(importlib.import_module(library), class_name, None)
    if klass is None:
        raise AdapterError(f"component {name!r}: {library} has no class {class_name!r}")
    return klass


def _diffusers_model(klass: Any, folder: Path, state: Dict[str, Any], dtype: Any,
                     device: str, model_id: str) -> Any:
    """A diffusers ModelMixin as from_pretrained makes it: built on meta, then filled."""
    import accelerate
    import torch
    from diffusers.models.model_loading_utils import load_model_dict_into_meta
    from diffusers.models.modeling_utils import no_init_weights

    config = klass.load_config(folder)
    default = torch.get_default_dtype()
    try:
        if dtype is not None:
            # As from_pretrained(torch_dtype=...): what __init__ makes (buffers) in that dtype.
            torch.set_default_dtype(dtype)
        with no_init_weights(), accelerate.init_empty_weights():
            model = klass.from_config(config)
    finally:
        torch.set_default_dtype(default)
    state = dict(state)
    model._fix_state_dict_keys_on_load(state)
    expected = set(model.state_dict())
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise AdapterError(f"{klass.__name__} of {model_id!r}: the attached tensors do not fit its "
                           f"config: missing {sorted(missing)[:5]}, unexpected "
                           f"{sorted(unexpected)[:5]}")
    load_model_dict_into_meta(model, state, dtype=dtype, model_name_or_path=model_id,
                              device_map={"": device})
    model.register_to_config(_name_or_path=model_id)
    return model.eval()


def _build_components(att: Attached, folder: Path, index: Dict[str, Any], dtype: Optional[str],
                      device: str) -> Tuple[Dict[str, Any], AttachStats]:
    """Every component with attached tensors, built; and where their state lives."""
    import torch

    state = att.torch()
    build_dtype = _adapt.torch_dtype(torch, dtype, state)
    components: Dict[str, Any] = {}
    stats = AttachStats()
    for name, entry in index.items():
        prefix = f"{name}/"
        own = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if name.startswith("_") or not own:
            continue
        if not isinstance(entry, list) or len(entry) != 2:
            raise AdapterError(f"model_index.json's {name!r} is not a component, yet tensors "
                               f"{next(iter(own))!r}... are named after it")
        klass = _component_class(name, entry)
        if entry[0] == "transformers":
            transformers = _tf._import()
            config = _tf.load_config(transformers, folder / name, att.model_id)
            model = _tf.build(transformers, klass, config, own, build_dtype, device)
        else:
            model = _diffusers_model(klass, folder / name, own, build_dtype, device, att.model_id)
        components[name] = model
        stats.add(_adapt.measure(model, att, {prefix + k: v for k, v in own.items()}), prefix)
    return components, stats


def from_server(
    model_id: str,
    pipeline_cls: Any = None,
    *,
    socket: Optional[PathLike] = None,
    device: Optional[str] = None,
    dtype: Optional[str] = None,
    load_if_needed: bool = True,
) -> Any:
    """A ready diffusers pipeline whose components' weights are the server's memory.

    pipeline_cls: the ``DiffusionPipeline`` subclass; default model_index.json's ``_class_name``.
    device, dtype, load_if_needed: as for ``model_loader.transformers.from_server`` (without
    dtype the components keep the server's dtype, as ``torch_dtype=`` that dtype would). The
    pipeline holds the lease until it is garbage collected or ``model_loader.release(pipe)``;
    ``pipe.model_loader_stats`` says how many bytes are attached and how many were copied.
    """
    diffusers = _import()
    att = attach(model_id, socket, device=device, dtype=dtype, load_if_needed=load_if_needed,
                 files=True, timeout=None)
    try:
        _adapt.check_names(att.file_specs, ["model_index.json"], "pipeline (model_index.json)",
                           model_id)
        target = device or (att.buffers[0].device if att.buffers else "cpu")
        with _adapt.served_folder(att.files) as folder:
            index = json.loads((folder / "model_index.json").read_text(encoding="utf8"))
            if pipeline_cls is None:
                pipeline_cls = getattr(diffusers, index.get("_class_name", ""), None)
                if pipeline_cls is None:
                    raise AdapterError(f"model_index.json names the pipeline "
                                       f"{index.get('_class_name')!r}, which diffusers "
                                       f"{diffusers.__version__} does not have")
            components, stats = _build_components(att, folder, index, dtype, target)
            # diffusers loads the rest (tokenizers, schedulers, feature extractors) from the
            # served files and takes the built components as they are.
            pipe = pipeline_cls.from_pretrained(str(folder), **components)
        pipe.register_to_config(_name_or_path=model_id)
        import torch

        if torch.device(target).type != "cpu":
            pipe.to(target)
    except BaseException:
        att.close()
        raise
    return _adapt.bind_lease(pipe, att, stats, "built")
