"""The adapters' errors and leases against the real server: what a user gets for a model the
adapter cannot build, a missing tokenizer, a model that is not loaded; dtype and release()."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import models
import pytest
import torch
from conftest import Sources
from realserver import eventually

import model_loader
from model_loader import transformers as ml


def _copy(built: Path, tmp_path: Path, name: str) -> Path:
    folder = tmp_path / name
    shutil.copytree(built, folder)
    return folder


def test_an_unknown_architecture_is_named_and_leaves_no_lease(
        sources: Sources, built: Callable[[str], Path], tmp_path: Path) -> None:
    """A config naming an architecture transformers lacks fails with its name; no lease stays."""
    folder = _copy(built("qwen2-tied"), tmp_path, "odd")
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = ["Qwen2ForTeleportation"]
    (folder / "config.json").write_text(json.dumps(config))
    model_id, _ = sources.publish(folder, "root", "odd-architecture")
    with pytest.raises(model_loader.AdapterError, match="Qwen2ForTeleportation"):
        ml.from_server(model_id, socket=sources.server.socket)
    eventually(lambda: sources.server.clients(model_id) == 0, "the failed build's lease ending")
    sources.server.unload(model_id)


def test_a_missing_tokenizer_says_what_is_missing(
        sources: Sources, built: Callable[[str], Path], tmp_path: Path) -> None:
    """tokenizer() of a model saved without one names the files it looked for and those it has."""
    folder = _copy(built("qwen2-tied"), tmp_path, "no-tokenizer")
    for path in folder.glob("tokenizer*"):
        path.unlink()
    model_id, _ = sources.publish(folder, "root", "no-tokenizer")
    model_loader.load(model_id, sources.server.addr, progress=False)
    with pytest.raises(model_loader.AdapterError) as e:
        ml.tokenizer(model_id, socket=sources.server.socket)
    assert "tokenizer.json" in str(e.value) and "config.json" in str(e.value), e.value
    eventually(lambda: sources.server.clients(model_id) == 0, "the tokenizer's lease ending")
    sources.server.unload(model_id)


def test_not_loaded_without_load_if_needed_then_loaded_and_released(
        sources: Sources, built: Callable[[str], Path]) -> None:
    """load_if_needed=False on a model not loaded is FAILED_PRECONDITION; the default loads it;
    release() ends the lease at once while the model object lives on."""
    model_id, _ = sources.publish(built("qwen2-tied"), "root", "not-loaded")
    socket = sources.server.socket
    with pytest.raises(model_loader.AttachError) as e:
        ml.from_server(model_id, socket=socket, load_if_needed=False)
    assert e.value.code_name == "FAILED_PRECONDITION", e.value
    model = ml.from_server(model_id, socket=socket)
    assert sources.server.clients(model_id) == 1
    model_loader.release(model)
    eventually(lambda: sources.server.clients(model_id) == 0, "release() ending the lease")
    model_loader.release(model)  # a second release does nothing
    sources.server.unload(model_id)
    del model


def test_dtype_is_converted_by_the_server_not_the_client(
        sources: Sources, built: Callable[[str], Path]) -> None:
    """dtype="bf16" loads the model in BF16 on the server: every tensor attached, nothing
    copied, and the logits equal from_pretrained(dtype=torch.bfloat16)'s bit for bit."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = built("qwen2-tied")
    model_id, _ = sources.publish(folder, "root", "qwen2-bf16")
    model = ml.from_server(model_id, socket=sources.server.socket, dtype="bf16")
    stats = model.model_loader_stats
    assert stats.copied_bytes == 0 and stats.attached_bytes > 0, stats
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert torch.equal(models.run("lm", model, tokenizer)["logits"],
                       models.run("lm", reference, tokenizer)["logits"])
    del model
    import gc

    gc.collect()
    eventually(lambda: sources.server.clients(model_id) == 0, "the collected model's lease ending")
    sources.server.unload(model_id)
