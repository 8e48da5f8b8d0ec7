"""The dashboard's browser tests: the real server binary on a free port with a temporary model
root, and Debian's Chromium driven by Playwright (the system browser, never a downloaded one)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

REPO = Path(__file__).resolve().parents[2]
BINARY = REPO / "target" / "debug" / "model-loader"
HUB_BINARY = REPO / "target" / "debug" / "test-hub"
ARTIFACTS = REPO / "target" / "web-artifacts"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
# How long the server may take to start, and a page to show what it waits for.
DEADLINE_S = 60.0

# The slow load: `org/big`, one f32 tensor of this many bytes on the tests' local Hub, which
# streams it at SLOW_BYTES_PER_SEC (half a minute), so a test can watch step 4 and press Cancel
# while it runs however fast the machine's disk is.
BIG = "org/big"
BIG_BYTES = 64 << 20
SLOW_BYTES_PER_SEC = 2 << 20


def eventually(cond: Callable[[], bool], what: str, deadline_s: float = DEADLINE_S) -> None:
    """Polls `cond` until it holds, failing with `what` after the deadline."""
    end = time.monotonic() + deadline_s
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    """A running `model-loader` and how to start it again on the same port."""

    url: str
    model_root: Path
    args: list[str]
    log: Path
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen([str(BINARY), *self.args], stdout=log, stderr=log)
        eventually(self._answers, f"the server at {self.url} to serve the page (log: {self.log})")

    def _answers(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"the server exited with {self.process.returncode}: {self.log.read_text()}")
        try:
            with urllib.request.urlopen(self.url, timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)


@pytest.fixture(scope="session")
def model_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled demo model; `broken`: a truncated safetensors file."""
    root = tmp_path_factory.mktemp("models")
    shutil.copytree(REPO / "models" / "demo" / "tiny-sd", root / "demo" / "tiny-sd")
    # `broken`: a safetensors header that promises more bytes than the file holds.
    broken = root / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "test"}')
    header = b'{"w":{"dtype":"F32","shape":[1024],"data_offsets":[0,4096]}}'
    (broken / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 16)
    return root


@pytest.fixture(scope="session")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The tests' local Hub (tests/src/bin/test_hub.rs) serving `org/big` slowly; its URL."""
    assert HUB_BINARY.exists(), "build it first: cargo build --locked -p tests --bin test-hub"
    big = tmp_path_factory.mktemp("hub") / "big"
    big.mkdir()
    (big / "config.json").write_text('{"model_type": "test"}')
    weights = np.random.default_rng(7).standard_normal(BIG_BYTES // 4, dtype=np.float32)
    save_file({"w": weights.reshape(-1, 1024)}, str(big / "model.safetensors"))
    process = subprocess.Popen(
        [str(HUB_BINARY), "--slow", str(SLOW_BYTES_PER_SEC), f"{BIG}={big}"], stdout=subprocess.PIPE
    )
    assert process.stdout is not None
    url = process.stdout.readline().decode().strip()
    assert url.startswith("http://"), f"the hub printed {url!r}"
    # It holds the files in memory: none is needed on disk any more.
    shutil.rmtree(big)
    yield url
    process.terminate()
    process.wait(timeout=30)


@pytest.fixture
def start_server(model_root: Path, hub: str, tmp_path: Path) -> Iterator[Callable[..., Server]]:
    """Starts servers on free ports (with extra flags), stopped at the test's end."""
    assert BINARY.exists(), "build the server first: cargo build --locked -p server --bin model-loader"
    started: list[Server] = []

    def start(*extra: str) -> Server:
        port = free_port()
        args = ["--listen", f"127.0.0.1:{port}", "--model-root", str(model_root)]
        args += ["--hf-endpoint", hub, "--hf-cache", str(tmp_path / "hf-cache"), *extra]
        s = Server(url=f"http://127.0.0.1:{port}/", model_root=model_root, args=args, log=tmp_path / f"server-{port}.log")
        started.append(s)
        s.start()
        return s

    yield start
    for s in started:
        s.stop()


@pytest.fixture
def server(start_server: Callable[..., Server]) -> Server:
    return start_server()


@pytest.fixture(scope="session")
def browser() -> Iterator[object]:
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).exists(), "Chromium is missing: apt-get install -y chromium"
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


# Records every text a step label shows, in every tab, so a test sees steps that went by faster
# than a frame.
RECORD_STEPS = """
window.seenSteps = [];
new MutationObserver((records) => {
  for (const r of records) {
    const label = r.target instanceof Element ? r.target.closest('.step-label') : null;
    if (!label) continue;
    const card = label.closest('[data-model-id]');
    window.seenSteps.push(card.dataset.modelId + ' | ' + label.textContent);
  }
}).observe(document, {subtree: true, childList: true, characterData: true});
"""


@pytest.fixture
def context(browser: object) -> Iterator[object]:
    ctx = browser.new_context(viewport={"width": 1000, "height": 900})  # type: ignore[attr-defined]
    ctx.add_init_script(RECORD_STEPS)
    yield ctx
    ctx.close()
