"""The adapters on a GPU: a model in CUDA VMM allocations exported by another process (as the
server's cuda build does), built on cuda:0 without a copy and equal to from_pretrained's.

Skipped unless torch sees a CUDA device.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Callable, Iterator

import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)

import models  # noqa: E402

import model_loader  # noqa: E402

EXPORTER = Path(__file__).resolve().parents[1] / "gpu_exporter.py"


def exporter(socket: Path, folder: Path) -> Iterator[str]:
    proc = subprocess.Popen([sys.executable, str(EXPORTER), str(socket), "0", str(folder)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    try:
        line = proc.stdout.readline()
        assert line.strip() == "ready", f"the exporter did not start: {line!r}"
        yield str(socket)
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()


@pytest.mark.parametrize("name", ["llama", "qwen2-moe", "tiny-sd"])
def test_a_gpu_model_is_built_in_place(name: str, built: Callable[[str], Path],
                                       tmp_path: Path) -> None:
    """On cuda:0 the adapter's outputs equal from_pretrained(device_map="cuda:0")'s bit for bit,
    every stored tensor stays in the exported allocation, and GPU memory does not drop by the
    model's size."""
    folder, kind = built(name), models.KINDS[name]
    for socket in exporter(tmp_path / "attach.sock", folder):
        free_before = torch.cuda.mem_get_info(0)[0]
        if kind == "sd":
            from model_loader import diffusers as ml_diffusers

            model, tokenizer = ml_diffusers.from_server(name, socket=socket, device="cuda:0"), None
            model.set_progress_bar_config(disable=True)
        else:
            from model_loader import transformers as ml

            model = ml.from_server(name, socket=socket, device="cuda:0")
            tokenizer = ml.tokenizer(name, socket=socket)
        torch.cuda.synchronize()
        grown = free_before - torch.cuda.mem_get_info(0)[0]
        stats = model.model_loader_stats
        total = sum(p.stat().st_size for p in folder.rglob("*.safetensors"))
        print(f"{name} on cuda:0: {stats}; GPU free memory down {grown >> 10} KiB for "
              f"{total >> 10} KiB of weights")
        if name == "qwen2-moe":
            assert stats.copied_bytes > 0
        else:
            assert stats.copied_bytes == 0, stats.copied
        if name == "llama":
            assert grown < total // 2, (grown, total)
        got = _on_cuda(kind, model, tokenizer)
        if kind == "sd":
            from diffusers import DiffusionPipeline

            reference = DiffusionPipeline.from_pretrained(folder).to("cuda:0")
            reference.set_progress_bar_config(disable=True)
            want = _on_cuda(kind, reference, None)
        else:
            from transformers import AutoModelForCausalLM

            reference = AutoModelForCausalLM.from_pretrained(folder, device_map="cuda:0").eval()
            want = _on_cuda(kind, reference, tokenizer)
        for key in want:
            assert torch.equal(got[key], want[key]), key
        model_loader.release(model)


def _on_cuda(kind: str, model: object, tokenizer: object) -> dict:
    with torch.no_grad():
        if kind == "lm":
            ids = tokenizer(models.PROMPT, return_tensors="pt").input_ids.to("cuda:0")
            return {"logits": model(ids).logits}
        generator = torch.Generator("cuda:0").manual_seed(0)
        return {"image": model(models.PROMPT, num_inference_steps=2, generator=generator,
                               output_type="pt").images}
