"""A consumer process: builds a model through an adapter from the attach socket alone and runs it.

Usage: consumer.py KIND MODEL_ID SOCKET OUT FORBIDDEN...

An audit hook refuses (and records) any open() of a path under a FORBIDDEN folder, before anything
is imported. It builds the model twice (the first, which imports the model's modules, is timed and
dropped), writes the second's outputs, the adapter's stats, its RssAnon before and after, and any
refused opens to OUT (torch.save), prints "built", then waits for "release" on stdin, drops the
model (del + gc.collect()), prints "released" and waits for "exit".
"""

from __future__ import annotations

import os
import sys

KIND, MODEL_ID, SOCKET, OUT = sys.argv[1:5]
FORBIDDEN = [os.path.abspath(p) for p in sys.argv[5:]]
REFUSED: list = []


def _audit(event: str, args: tuple) -> None:
    if event != "open" or not isinstance(args[0], (str, bytes, os.PathLike)):
        return
    path = os.path.abspath(os.fsdecode(args[0]))
    if any(path == f or path.startswith(f + os.sep) for f in FORBIDDEN):
        REFUSED.append(path)
        raise PermissionError(f"the consumer may not open the model's file {path}")


sys.addaudithook(_audit)

import gc  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import models  # noqa: E402
import torch  # noqa: E402

import model_loader  # noqa: E402


def rss_anon() -> int:
    """This process's private resident memory in bytes (mapped shared memory is not in it)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no RssAnon in /proc/self/status")


def build() -> tuple:
    if KIND == "lm":
        from model_loader import transformers as ml

        return ml.from_server(MODEL_ID, socket=SOCKET), ml.tokenizer(MODEL_ID, socket=SOCKET)
    if KIND == "st":
        from model_loader import sentence_transformers as ml_st

        return ml_st.from_server(MODEL_ID, socket=SOCKET), None
    from model_loader import diffusers as ml_diffusers

    pipe = ml_diffusers.from_server(MODEL_ID, socket=SOCKET)
    pipe.set_progress_bar_config(disable=True)
    return pipe, None


def main() -> None:
    # Import the frameworks first: their code is not the model's memory.
    import diffusers  # noqa: F401
    import sentence_transformers  # noqa: F401
    import transformers  # noqa: F401

    # The first build in a process imports the model's modules: timed apart, then dropped.
    start = time.perf_counter()
    model, tokenizer = build()
    first = time.perf_counter() - start
    del model, tokenizer
    gc.collect()
    before = rss_anon()
    start = time.perf_counter()
    model, tokenizer = build()
    seconds = time.perf_counter() - start
    built = rss_anon()
    outputs = models.run(KIND, model, tokenizer)
    after = rss_anon()
    stats = model.model_loader_stats
    torch.save({"outputs": outputs, "seconds": seconds, "first_seconds": first, "rss": [before, built, after],
                "attached_bytes": stats.attached_bytes, "copied_bytes": stats.copied_bytes,
                "copied": stats.copied, "refused": REFUSED}, OUT)
    del outputs
    print("built", flush=True)
    assert sys.stdin.readline().strip() == "release"
    del model, tokenizer
    gc.collect()
    print("released", flush=True)
    assert sys.stdin.readline().strip() == "exit"
    assert model_loader is not None


main()
