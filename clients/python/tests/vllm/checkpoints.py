"""Small checkpoints saved by transformers for vLLM's CPU kernels (head_dim 32: the smallest
they take), with a byte-level BPE tokenizer, so that vLLM can generate from text."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict

import models  # the adapters' tests' builders: their tokenizer and text

PROMPT = models.PROMPT
# Greedy tokens generated after it.
TOKENS = 12


def _save(model: Any, path: Path, **kwargs: Any) -> Path:
    model.save_pretrained(path, **kwargs)
    models.word_tokenizer(300).save_pretrained(path)
    return path


def _llama(seed: int) -> Any:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=256, tie_word_embeddings=False)
    return LlamaForCausalLM(config)


def llama_sharded(path: Path) -> Path:
    """A Llama in several shards (an index and 100 KB files): checkpoint order is by shard."""
    return _save(_llama(10), path, max_shard_size="100KB")


def qwen2_tied(path: Path) -> Path:
    """A Qwen2 whose LM head is its embedding (no lm_head in the file)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(11)
    config = Qwen2Config(vocab_size=320, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                         tie_word_embeddings=True, max_position_embeddings=256)
    return _save(Qwen2ForCausalLM(config), path)


def llama_without_head(path: Path) -> Path:
    """A Llama checkpoint that lacks lm_head.weight: vLLM's model needs it."""
    from safetensors.torch import save_file

    model = _llama(12)
    _save(model, path)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


BUILDERS: Dict[str, Callable[[Path], Path]] = {
    "llama-sharded": llama_sharded,
    "qwen2-tied": qwen2_tied,
    "llama-no-head": llama_without_head,
}
