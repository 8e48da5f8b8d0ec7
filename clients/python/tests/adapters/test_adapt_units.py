"""The adapters' plumbing without the real server: the served-files folder, the attached/copied
count, the lease tied to the model (a fake attach server serving a saved folder)."""

from __future__ import annotations

import gc
import stat
from pathlib import Path
from typing import Callable, Iterator

import pytest
import torch
from fakeserver import FakeServer, serve_folder

import model_loader
from model_loader import _adapt
from model_loader import transformers as ml


@pytest.fixture
def qwen_server(built: Callable[[str], Path], tmp_path: Path) -> Iterator[FakeServer]:
    server = FakeServer(str(tmp_path / "attach.sock"), serve_folder(built("qwen2-tied")))
    yield server
    server.stop()


def test_served_folder_is_private_and_removed() -> None:
    """The small files land in a 0700 folder, sub-folders included, gone after the block."""
    with _adapt.served_folder({"config.json": b"{}", "tokenizer/vocab.txt": b"a\n"}) as folder:
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
        assert (folder / "tokenizer" / "vocab.txt").read_bytes() == b"a\n"
    assert not folder.exists()


@pytest.mark.parametrize("path", ["../escape.json", "/etc/passwd", "a/../../b", "", "a//b"])
def test_a_file_path_that_leaves_the_folder_is_refused(path: str) -> None:
    """A served path that is absolute or climbs out is an AdapterError, and nothing is written."""
    with pytest.raises(model_loader.AdapterError, match="unsafe path"):
        with _adapt.served_folder({path: b"x"}):
            pass


def test_stats_count_copies_and_the_lease_ends_with_the_model(qwen_server: FakeServer) -> None:
    """A converted (here: cloned) tensor counts as copied, the rest as attached; the lease ends
    when the model is collected, and release() on anything else is a TypeError."""
    model = ml.from_server("org/qwen", socket=qwen_server.path)
    stats = model.model_loader_stats
    assert stats.copied_bytes == 0 and stats.copied == []
    # Tied: the LM head is the embedding, counted once.
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert qwen_server.answered.acquire(timeout=10)
    att = model._model_loader_lease[1]
    state = att.torch()
    model.model.norm.weight = torch.nn.Parameter(model.model.norm.weight.detach().clone())
    again = _adapt.measure(model, att, state)
    assert again.copied == ["model.norm.weight"]
    assert again.copied_bytes == model.model.norm.weight.numel() * 4
    assert again.attached_bytes + again.copied_bytes == stats.attached_bytes
    del model, att, state
    gc.collect()
    assert qwen_server.hangups.acquire(timeout=10), "the lease outlived the model"
    with pytest.raises(TypeError, match="not built by a model_loader adapter"):
        model_loader.release(torch.nn.Linear(1, 1))


def test_an_auto_class_picks_the_concrete_one(qwen_server: FakeServer) -> None:
    """cls=AutoModel builds the config's base model (Qwen2Model), not the causal LM; after
    release() the lease is over but the model's memory stays mapped while the model lives."""
    from transformers import AutoModel, Qwen2Model

    model = ml.from_server("org/qwen", socket=qwen_server.path, cls=AutoModel)
    assert type(model) is Qwen2Model
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        before = model(ids).last_hidden_state
    model_loader.release(model)
    assert qwen_server.hangups.acquire(timeout=10)
    with torch.no_grad():
        assert torch.equal(model(ids).last_hidden_state, before)


def test_a_sentence_module_with_weights_of_its_own_is_refused(
        built: Callable[[str], Path], tmp_path: Path) -> None:
    """A sentence-transformers model whose Dense module has its own weights is an AdapterError
    naming the module (it would read a weight file), and the lease ends."""
    import shutil

    from safetensors.torch import save_file

    from model_loader import sentence_transformers as ml_st

    folder = tmp_path / "with-dense"
    shutil.copytree(built("bert-st"), folder)
    (folder / "2_Dense").mkdir()
    (folder / "2_Dense" / "config.json").write_text('{"in_features": 64, "out_features": 8}')
    save_file({"linear.weight": torch.zeros(8, 64)}, str(folder / "2_Dense" / "model.safetensors"))
    server = FakeServer(str(tmp_path / "attach.sock"), serve_folder(folder))
    try:
        with pytest.raises(model_loader.AdapterError, match="2_Dense"):
            ml_st.from_server("org/dense", socket=server.path)
        assert server.hangups.acquire(timeout=10)
    finally:
        server.stop()


def test_a_split_state_gives_each_module_its_device() -> None:
    """Tensors on two devices map each module to its tensors' device; one device maps nothing;
    a module across two devices is refused by name."""
    cpu, meta = torch.zeros(1), torch.empty(1, device="meta")
    state = {"model.layers.0.w": cpu, "model.layers.0.b": cpu, "model.layers.1.w": meta, "lm_head.weight": meta}
    split = _adapt.device_map_of(state)
    assert split == {"": "cpu", "model.layers.0": "cpu", "model.layers.1": "meta", "lm_head": "meta"}
    assert next(iter(split)) == "", "the catch-all comes first, so the modules' entries win"
    assert _adapt.device_map_of({"a.w": cpu, "b.w": cpu}) is None
    with pytest.raises(model_loader.AdapterError, match="'a' has tensors on cpu and meta"):
        _adapt.device_map_of({"a.w": cpu, "a.b": meta})


def test_transformers_takes_the_module_map_and_keeps_the_tensors() -> None:
    """The map's form is one from_pretrained takes: with a state split in two (here meta stands
    for the second GPU, mapped back to the CPU to build), the model equals the reference and
    its parameters are the given tensors, not copies."""
    import transformers

    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    reference = transformers.LlamaForCausalLM(config).eval()
    state = {k: v.clone() for k, v in reference.state_dict().items()}
    second = ("model.layers.1.", "lm_head.")
    split = _adapt.device_map_of({k: torch.empty(1, device="meta") if k.startswith(second) else v
                                  for k, v in state.items()})
    assert split is not None and split["model.layers.1.mlp.up_proj"] == "meta"
    model = transformers.LlamaForCausalLM.from_pretrained(
        None, config=config, state_dict=state, device_map={k: "cpu" for k in split}).eval()
    tokens = torch.tensor([[1, 2, 3]])
    assert torch.equal(model(tokens).logits, reference(tokens).logits)
    weight = "model.layers.1.mlp.up_proj.weight"
    assert model.get_parameter(weight).data_ptr() == state[weight].data_ptr()
