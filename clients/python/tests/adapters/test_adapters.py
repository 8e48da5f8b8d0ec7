"""The adapters against the real server: bit-equal to from_pretrained, from every source, in a
process that cannot open the model's files, with the server's memory shared, not copied, and
the lease ending with the model."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, Tuple

import grpc
import models
import pytest
import torch
from conftest import Sources
from realserver import WAIT, eventually

import model_loader

CONSUMER = Path(__file__).resolve().parent / "consumer.py"
# (model, source): every model from the model root, the Llama from all three sources, and one
# other model more from the HF cache and from S3.
CASES = [("llama", "root"), ("qwen2-tied", "root"), ("qwen2-moe", "root"), ("bert-st", "root"),
         ("tiny-sd", "root"), ("llama", "hf"), ("llama", "s3"), ("bert-st", "hf"),
         ("tiny-sd", "s3")]
# Models whose every tensor transformers keeps as stored: all attached, nothing copied.
NO_CONVERSION = {"llama", "qwen2-tied", "bert-st", "tiny-sd"}

_references: Dict[str, Tuple[Dict[str, Any], float]] = {}


def reference(name: str, folder: Path) -> Tuple[Dict[str, Any], float]:
    """from_pretrained's outputs, and the seconds a warm from_pretrained took (the second)."""
    if name not in _references:
        kind = models.KINDS[name]
        models.from_pretrained(kind, folder)
        start = time.perf_counter()
        model, tokenizer = models.from_pretrained(kind, folder)
        seconds = time.perf_counter() - start
        _references[name] = (models.run(kind, model, tokenizer), seconds)
    return _references[name]


def weight_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*.safetensors"))


class Consumer:
    """consumer.py in its own process, driven line by line."""

    def __init__(self, kind: str, model_id: str, socket: str, out: Path, forbidden: list) -> None:
        self.log = out.with_suffix(".log")
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, str(CONSUMER), kind, model_id, socket, str(out),
                 *map(str, forbidden)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True)

    def expect(self, line: str) -> None:
        got = self.proc.stdout.readline().strip()  # type: ignore[union-attr]
        assert got == line, f"consumer said {got!r}, not {line!r}:\n{self.log.read_text()[-4000:]}"

    def say(self, line: str) -> None:
        self.proc.stdin.write(line + "\n")  # type: ignore[union-attr]
        self.proc.stdin.flush()  # type: ignore[union-attr]

    def finish(self) -> None:
        self.say("exit")
        assert self.proc.wait(timeout=WAIT) == 0, self.log.read_text()[-4000:]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.mark.parametrize("name, source", CASES)
def test_adapter_model_equals_from_pretrained(name: str, source: str, sources: Sources,
                                              built: Callable[[str], Path],
                                              tmp_path: Path) -> None:
    """A model built by its adapter in a process without access to its files equals
    from_pretrained's bit for bit, shares the server's memory, and releases it when dropped."""
    folder, kind, server = built(name), models.KINDS[name], sources.server
    model_id, served = sources.publish(folder, source, f"{name}-{source}")
    model_loader.load(model_id, server.addr, device="cpu", progress=False, timeout=WAIT)
    sources.hide(served)
    consumer = Consumer(kind, model_id, server.socket, tmp_path / "out.pt", [*served, folder])
    try:
        consumer.expect("built")
        report = torch.load(tmp_path / "out.pt")
        assert report["refused"] == [], "the consumer tried to open the model's files"
        expected, reference_seconds = reference(name, folder)
        for key, want in expected.items():
            assert torch.equal(report["outputs"][key], want), f"{key} differ from from_pretrained's"
        # The consumer's first model is dropped; its second holds the one lease.
        eventually(lambda: server.clients(model_id) == 1, f"{model_id} held by one lease")
        with pytest.raises(grpc.RpcError) as refused:
            server.unload(model_id)
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        consumer.say("release")
        consumer.expect("released")
        eventually(lambda: server.clients(model_id) == 0, f"{model_id}'s lease ending")
        server.unload(model_id)
        consumer.finish()
    finally:
        consumer.kill()

    total = weight_bytes(folder)
    before, built_rss, after = report["rss"]
    print(f"{name} from {source}: {report['attached_bytes']} B attached, "
          f"{report['copied_bytes']} B copied {report['copied'][:4]}; build "
          f"{report['seconds'] * 1000:.0f} ms (first in its process "
          f"{report['first_seconds'] * 1000:.0f} ms; from_pretrained, warm: "
          f"{reference_seconds * 1000:.0f} ms); RssAnon +{(built_rss - before) >> 10} KiB built, "
          f"+{(after - before) >> 10} KiB after running; weights {total >> 10} KiB")
    if name in NO_CONVERSION:
        assert report["copied_bytes"] == 0, report["copied"]
        # Every stored tensor is attached (tied weights are stored once).
        assert report["attached_bytes"] == total - _headers(folder)
    else:
        assert report["copied_bytes"] > 0
        assert all(".experts." in n for n in report["copied"]), report["copied"]
    if name == "llama":
        # The weights are mapped shared memory: the consumer's private memory grows by far less.
        assert built_rss - before < total // 8, (before, built_rss, total)
        assert after - before < total // 4, (before, after, total)


def _headers(folder: Path) -> int:
    """The bytes of the safetensors files that are not tensors (length prefix and JSON)."""
    total = 0
    for path in folder.rglob("*.safetensors"):
        with open(path, "rb") as f:
            total += 8 + int.from_bytes(f.read(8), "little")
    return total
