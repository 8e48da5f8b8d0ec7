"""The client README's first example, run as written against the real server."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Callable

from conftest import Sources
from realserver import WAIT

README = Path(__file__).resolve().parents[2] / "README.md"


def first_python_block() -> str:
    found = re.search(r"```python\n(.*?)```", README.read_text(), re.S)
    assert found, "the client README has no python example"
    return found.group(1)


def test_the_readme_s_first_example_runs_as_written(
        sources: Sources, built: Callable[[str], Path], tmp_path: Path) -> None:
    """The README's first example (the one-call transformers load) runs as written and loads
    the model zero-copy, with nothing but the attach socket in its environment."""
    code = first_python_block()
    model_id = re.search(r'from_server\("([^"]+)"\)', code)
    assert model_id, code
    sources.publish(built("llama"), "root", model_id.group(1))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MODEL_LOADER_", "HF_"))}
    env["MODEL_LOADER_ATTACH_SOCKET"] = sources.server.socket
    env["PYTHONPATH"] = str(README.parent)
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, text=True,
                         capture_output=True, timeout=WAIT)
    assert run.returncode == 0, run.stderr[-4000:]
    assert re.search(r"\d+ bytes attached, 0 bytes copied", run.stdout), run.stdout
