"""transformers models and tokenizers from a model-loader server, weights attached zero-copy.

``from_server("org/model")`` attaches to the model (loading it first if needed), reads its config
from the small files the server keeps with it, and builds the model with transformers' own
``from_pretrained`` given the attached tensors as its state dict: non-persistent buffers, tied
weights and checkpoint conversions (MoE expert fusion, renames) happen exactly as when loading
from files. Tensors transformers keeps as they are stay in the server's memory; the ones it
converts are copies, counted in ``model.model_loader_stats`` and logged.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

from . import _adapt
from ._adapt import AdapterError
from ._attach import Attached, PathLike, attach

# Files any of which makes a folder a tokenizer AutoTokenizer can read.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json",
                   "tokenizer.model", "spiece.model", "sentencepiece.bpe.model")


def _import() -> Any:
    try:
        import transformers
    except ImportError:
        raise ImportError("model_loader.transformers needs transformers and torch: pip install "
                          "'model-loader-client[transformers]'") from None
    return transformers


def model_class(transformers: Any, config: Any, cls: Any = None) -> Any:
    """The class to build: cls, else the config's first architecture, else the Auto mapping's."""
    if cls is not None:
        auto_mapping = getattr(cls, "_model_mapping", None)
        if auto_mapping is not None:
            # An Auto class (AutoModelForCausalLM): its concrete class for this config.
            try:
                return auto_mapping[type(config)]
            except KeyError:
                raise AdapterError(f"{cls.__name__} has no class for the config "
                                   f"{type(config).__name__} ({config.model_type})") from None
        return cls
    for arch in config.architectures or []:
        found = getattr(transformers, arch, None)
        if found is None:
            raise AdapterError(f"the architecture {arch!r} in the model's config.json is not one "
                               f"transformers {transformers.__version__} has; pass cls=")
        return found
    try:
        return transformers.AutoModel._model_mapping[type(config)]
    except KeyError:
        raise AdapterError(f"transformers has no model for the config {type(config).__name__} "
                           f"({config.model_type}); pass cls=") from None


def load_config(transformers: Any, folder: Any, model_id: str, **overrides: Any) -> Any:
    """The model's config, read by AutoConfig from the served files."""
    try:
        return transformers.AutoConfig.from_pretrained(folder, **overrides)
    except (ValueError, KeyError, OSError) as e:
        raise AdapterError(f"the config of {model_id!r} cannot be read: {e}") from e


def build(transformers: Any, cls: Any, config: Any, state: Dict[str, Any], dtype: Any,
          device: Optional[str]) -> Any:
    """from_pretrained with the attached tensors as its state dict (no files read)."""
    import torch

    kwargs: Dict[str, Any] = {} if dtype is None else {"dtype": dtype}
    split = _adapt.device_map_of(state) if device is None else None
    if split is not None:
        # Split over several GPUs by the server: each module where its tensors are.
        kwargs["device_map"] = split
    elif device is not None:
        # Without a device map from_pretrained places every tensor on the CPU: GPU tensors would
        # be copied there. One device: no dispatch hooks, the tensors stay where they are.
        kwargs["device_map"] = {"": device}
    model = cls.from_pretrained(None, config=config, state_dict=state, **kwargs)
    if device is not None and torch.device(device).type != "cpu":
        # The parameters are on the device already; the buffers transformers computes (rotary
        # frequencies, position ids) are made on the CPU and follow them.
        model.to(device)
    return model.eval()


def _device(att: Attached, device: Optional[str]) -> Optional[str]:
    """The one device the model is on; None for a model split over several (see build)."""
    on = {b.device for b in att.buffers}
    return device or (on.pop() if len(on) == 1 else None)


def from_server(
    model_id: str,
    cls: Any = None,
    *,
    socket: Optional[PathLike] = None,
    device: Optional[str] = None,
    dtype: Optional[str] = None,
    load_if_needed: bool = True,
    **config_overrides: Any,
) -> Any:
    """A ready transformers model (``eval()``) whose weights are the server's memory.

    cls: the model class (``LlamaForCausalLM``) or an Auto class (``AutoModelForCausalLM``);
    default the first of config.json's ``architectures``, else ``AutoModel``'s. device, dtype:
    where and in what the server holds it ("cuda:0", "bf16"; it loads or converts, the client
    never does). load_if_needed: load the model if it is not loaded (else FAILED_PRECONDITION).
    config_overrides: passed to ``AutoConfig.from_pretrained``.

    The model holds the lease: the server keeps it resident until the model is garbage
    collected or ``model_loader.release(model)``. ``model.model_loader_stats`` says how many
    bytes are attached and how many transformers copied while converting.
    """
    transformers = _import()
    att = attach(model_id, socket, device=device, dtype=dtype, load_if_needed=load_if_needed,
                 files=True, timeout=None)
    try:
        with _adapt.served_folder(att.files) as folder:
            config = load_config(transformers, folder, model_id, **config_overrides)
        klass = model_class(transformers, config, cls)
        state = att.torch()
        import torch

        model = build(transformers, klass, config, state, _adapt.torch_dtype(torch, dtype, state),
                      _device(att, device))
        stats = _adapt.measure(model, att, state)
    except BaseException:
        att.close()
        raise
    return _adapt.bind_lease(model, att, stats, "built")


def tokenizer(model_id: str, *, socket: Optional[PathLike] = None, subfolder: str = "",
              **kwargs: Any) -> Any:
    """The model's tokenizer (``AutoTokenizer``), from the files the server keeps with it.

    subfolder: where it is in the model ("tokenizer" for a diffusers pipeline's); kwargs go to
    ``AutoTokenizer.from_pretrained``. The model must be LOADED (a short lease reads the files).
    """
    transformers = _import()
    prefix = f"{subfolder.strip('/')}/" if subfolder else ""
    with attach(model_id, socket, files=True) as att:
        files = {p[len(prefix):]: data for p, data in att.files.items() if p.startswith(prefix)}
    _adapt.check_names([p for p in files if "/" not in p], TOKENIZER_FILES,
                       f"tokenizer{' in ' + subfolder if subfolder else ''}", model_id)
    with _adapt.served_folder(files) as folder:
        return transformers.AutoTokenizer.from_pretrained(folder, **kwargs)
