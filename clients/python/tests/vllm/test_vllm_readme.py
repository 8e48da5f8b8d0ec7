"""The client README's vLLM example, run as written (vLLM's own engine processes, the entry
point found by each) against the real server, with nothing but the socket and the gRPC address
in its environment."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

from conftest import Root
from test_generate import ENGINE_WAIT, engine_env

README = Path(__file__).resolve().parents[2] / "README.md"


def vllm_python_block() -> str:
    section = README.read_text().split("### vLLM", 1)[1]
    found = re.search(r"```python\n(.*?)```", section, re.S)
    assert found, "the client README's vLLM section has no python example"
    return found.group(1)


def test_the_readme_s_vllm_example_runs_as_written(served: Root, built: Callable[[str], Path],
                                                   tmp_path: Path) -> None:
    code = vllm_python_block()
    model_id = re.search(r'"model_id": "([^"]+)"', code)
    folder = re.search(r'write_files\("[^"]+", "([^"]+)"\)', code)
    assert model_id and folder, code
    served.publish(built("llama-sharded"), model_id.group(1))
    env = engine_env(served)
    # As a user runs it: vLLM's engine in its own process, which loads the plugin itself.
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING")
    env.update(MODEL_LOADER_ATTACH_SOCKET=served.server.socket,
               MODEL_LOADER_SERVER=served.server.addr)
    log_before = len(served.server.log.lines)
    try:
        run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, text=True,
                             capture_output=True, timeout=ENGINE_WAIT)
    finally:
        shutil.rmtree(folder.group(1), ignore_errors=True)
    assert run.returncode == 0, run.stderr[-6000:]
    # vLLM logs to stdout too: the example's own line is the token ids.
    printed = [line for line in run.stdout.splitlines() if re.fullmatch(r"\[\d+(, \d+){7}\]", line)]
    assert len(printed) == 1, run.stdout[-3000:]
    assert any("client attached" in line and model_id.group(1) in line
               for line in served.server.log.lines[log_before:])
    assert re.search(r"model-loader: .* step 8/8", run.stdout + run.stderr), "no progress logged"
