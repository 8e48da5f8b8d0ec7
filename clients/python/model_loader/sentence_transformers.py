"""sentence-transformers models from a model-loader server, the transformer's weights attached.

``from_server("org/model")`` builds the ``SentenceTransformer`` the way sentence-transformers loads a
saved one (``modules.json``, each module from its folder's config: pooling, normalize, ...) from the
small files the server keeps, except that the Transformer module's model is built by
transformers' ``from_pretrained`` from the attached tensors instead of the weight files.
"""

from __future__ import annotations

import json
from typing import Any, Dict, Optional

from . import _adapt
from . import transformers as _tf
from ._adapt import AdapterError
from ._attach import PathLike, attach


def _import() -> Any:
    try:
        import sentence_transformers
    except ImportError:
        raise ImportError("model_loader.sentence_transformers needs sentence-transformers: pip "
                          "install 'model-loader-client[sentence-transformers]'") from None
    if not hasattr(sentence_transformers.SentenceTransformer, "_load_with_module_classes"):
        raise ImportError(f"sentence-transformers {sentence_transformers.__version__} cannot "
                          "take a model already in memory: pip install "
                          "'sentence-transformers>=6.3'")
    return sentence_transformers


def _attached_transformer(base: Any, state: Dict[str, Any], dtype: Any, device: str) -> Any:
    """A subclass of the Transformer module class base whose model comes from the state dict."""
    transformers = _tf._import()

    class AttachedTransformer(base):  # type: ignore[misc]
        def _load_model(self, model_name_or_path: str, transformer_task: str, config: Any,
                        backend: str, is_peft_model: bool, **model_kwargs: Any) -> Any:
            if backend != "torch" or is_peft_model:
                raise AdapterError("only plain torch models can be attached, not "
                                   f"{'PEFT adapters' if is_peft_model else backend}")
            if getattr(config, "is_encoder_decoder", False):
                raise AdapterError(f"the encoder-decoder {config.model_type} model is not "
                                   "supported by the sentence-transformers adapter")
            from sentence_transformers.base.modules import transformer as st_transformer

            auto = st_transformer.TRANSFORMER_TASK_TO_AUTO_MODEL.get(transformer_task)
            if auto is None:
                raise AdapterError(f"the transformer task {transformer_task!r} is not supported")
            klass = _tf.model_class(transformers, config, auto)
            return _tf.build(transformers, klass, config, state, dtype, device)

    AttachedTransformer.__name__ = AttachedTransformer.__qualname__ = base.__name__
    return AttachedTransformer


def _module_classes(folder: Any, state: Dict[str, Any], dtype: Any,
                    device: str) -> Dict[str, Any]:
    """modules.json's Transformer types, each mapped to its attached subclass."""
    from sentence_transformers.base.modules.transformer import Transformer
    from sentence_transformers.util.misc import import_from_string

    classes = {}
    with open(folder / "modules.json", encoding="utf8") as f:
        modules = json.load(f)
    for module in modules:
        ref = module.get("type", "")
        if not ref.startswith("sentence_transformers."):
            continue
        klass = import_from_string(ref)
        if isinstance(klass, type) and issubclass(klass, Transformer):
            classes[ref] = _attached_transformer(klass, state, dtype, device)
    if not classes:
        raise AdapterError("modules.json lists no Transformer module to attach")
    return classes


def from_server(
    model_id: str,
    *,
    socket: Optional[PathLike] = None,
    device: Optional[str] = None,
    dtype: Optional[str] = None,
    load_if_needed: bool = True,
) -> Any:
    """A ``SentenceTransformer`` whose transformer model is the server's memory.

    Arguments as for ``model_loader.transformers.from_server``. The model holds the lease until
    it is garbage collected or ``model_loader.release(model)``; ``model.model_loader_stats`` says
    how many bytes are attached and how many were copied.
    """
    st = _import()
    import torch

    att = attach(model_id, socket, device=device, dtype=dtype, load_if_needed=load_if_needed,
                 files=True, timeout=None)
    try:
        _adapt.check_names(att.file_specs, ["modules.json"], "sentence-transformers modules",
                           model_id)
        state = att.torch()
        in_modules = sorted({name.split("/", 1)[0] for name in state if "/" in name})
        if in_modules:
            # Their modules (Dense, ...) would read weight files of their own.
            raise AdapterError(f"{model_id!r} has modules with weights of their own "
                               f"({', '.join(in_modules)}): only the Transformer module's "
                               "weights can be attached so far")
        build_dtype = _adapt.torch_dtype(torch, dtype, state)
        target = device or (att.buffers[0].device if att.buffers else "cpu")
        with _adapt.served_folder(att.files) as folder:
            classes = _module_classes(folder, state, build_dtype, target)
            # The private entry point sentence-transformers keeps for models already in memory:
            # modules.json's types resolve to the classes given instead of being imported.
            model = st.SentenceTransformer._load_with_module_classes(
                str(folder), classes, device=target, local_files_only=True)
        model.eval()
        stats = _adapt.measure(model, att, state)
    except BaseException:
        att.close()
        raise
    return _adapt.bind_lease(model, att, stats, "built")

