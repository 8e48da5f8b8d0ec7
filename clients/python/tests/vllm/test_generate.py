"""End to end: `LLM(model=..., load_format="model-loader")` found through the entry point, its
config and tokenizer from the served small files, its weights from the real server, generates
the same greedy tokens as `load_format="auto"` from the folder and as transformers' generate."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List

from checkpoints import PROMPT, TOKENS
from conftest import Root

from model_loader import vllm as plugin

HERE = Path(__file__).resolve().parent
# A cold engine start on the 2-core machine takes about 20 s.
ENGINE_WAIT = 300


def engine_env(served: Root) -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MODEL_LOADER_", "HF_"))}
    env.update(VLLM_CPU_KVCACHE_SPACE="1", VLLM_ENABLE_V1_MULTIPROCESSING="0",
               HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join([str(HERE), str(HERE.parent / "adapters"),
                                               str(HERE.parents[1])]))
    return env


def generate(folder: Path, load_format: str, env: Dict[str, str], *extra: str) -> Dict[str, Any]:
    run = subprocess.run([sys.executable, str(HERE / "generate.py"), str(folder), load_format,
                          *extra], env=env, text=True, capture_output=True, timeout=ENGINE_WAIT)
    assert run.returncode == 0, run.stderr[-6000:]
    # vLLM logs to stdout too (its engine processes, after this line).
    result = json.loads(run.stdout.split("RESULT ", 1)[1].splitlines()[0])
    result["log"] = run.stdout + run.stderr
    return result


def transformers_greedy(folder: Path) -> List[int]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, do_sample=False, max_new_tokens=TOKENS, min_new_tokens=TOKENS)
    return out[0, ids.shape[1]:].tolist()


def test_generates_the_same_tokens_as_vllms_loader_and_transformers(
        served: Root, built: Callable[[str], Path], tmp_path: Path) -> None:
    folder = built("llama-sharded")
    model_id = "vllm/generate"
    published = served.publish(folder, model_id)
    env = engine_env(served)
    want = generate(folder, "auto", env)
    assert want["tokens"] == transformers_greedy(folder), "vLLM and transformers differ"

    # The documented route: the small files into a folder for --model, then the engine, with
    # the checkpoint's folder renamed away so nothing but the socket can give the weights.
    small = tmp_path / "small"
    cli = subprocess.run([sys.executable, "-m", "model_loader.vllm", "files", model_id,
                          str(small), "--socket", served.server.socket], env=env, text=True,
                         capture_output=True, timeout=120)
    assert cli.returncode == 0, cli.stderr
    assert "tokenizer.json" in cli.stdout and not list(small.glob("*.safetensors")), cli.stdout
    hidden = published.with_name(published.name + ".hidden")
    published.rename(hidden)
    try:
        log_before = len(served.server.log.lines)
        extra = json.dumps({"socket": served.server.socket, "server": served.server.addr,
                            "model_id": model_id})
        got = generate(small, "model-loader", env, "--extra", extra, "--server",
                       served.server.addr, "--model-id", model_id)
    finally:
        hidden.rename(published)
    assert got["prompt"] == want["prompt"]
    assert got["tokens"] == want["tokens"], (got, want)
    attached = [line for line in served.server.log.lines[log_before:]
                if "client attached" in line and model_id in line]
    assert any(re.search(rf"pid\D+{got['pid']}\b", line) for line in attached), attached
    assert got["clients_while_serving"] == 0, "the engine still held the lease after loading"
    # The plugin's own account in vLLM's log: every parameter a copy in vLLM's memory.
    found = re.search(r"model-loader: \d+ tensors of vllm/generate .* (\d+) bytes of parameters "
                      r"copied, (\d+) still in the server's memory", got["log"])
    assert found and int(found.group(1)) > 0 and found.group(2) == "0", got["log"][-3000:]
    print(f"greedy tokens: {got['tokens']} (auto and transformers the same); {found.group(0)}")


def test_tensor_parallel_ranks_each_attach_and_generate_the_same_tokens(
        served: Root, built: Callable[[str], Path], tmp_path: Path) -> None:
    """Tensor parallelism 2 on the CPU: each rank's worker process attaches (vLLM's weight
    loaders narrow every tensor to the rank's slice), and the tokens are those of one engine
    loading from files."""
    folder = built("llama-sharded")
    model_id = "vllm/tensor-parallel"
    served.publish(folder, model_id)
    env = engine_env(served)
    want = generate(folder, "auto", env)
    small = tmp_path / "small"
    plugin.write_files(model_id, small, socket=served.server.socket)
    # Two workers on a machine of one NUMA node: vLLM asks for their cores by hand.
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING")
    env["VLLM_CPU_OMP_THREADS_BIND"] = "0|1"
    log_before = len(served.server.log.lines)
    extra = json.dumps({"socket": served.server.socket, "server": served.server.addr,
                        "model_id": model_id})
    got = generate(small, "model-loader", env, "--extra", extra, "--tp", "2")
    assert got["tokens"] == want["tokens"], (got["tokens"], want["tokens"])
    pids = {m.group(1) for line in served.server.log.lines[log_before:]
            if "client attached" in line and model_id in line
            for m in [re.search(r"pid\D+(\d+)", line)] if m}
    pids.discard(str(os.getpid()))  # write_files' short lease, logged a moment late
    assert len(pids) == 2 and str(got["pid"]) not in pids, served.server.log.lines[log_before:]
    assert served.server.clients(model_id) == 0
