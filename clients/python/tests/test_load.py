"""load() against an in-process gRPC server (skipped without grpcio)."""

from __future__ import annotations

import sys
from concurrent import futures
from typing import Any, Iterator, List

import pytest

grpc = pytest.importorskip("grpc")

from model_loader import LoadError, load, pb2  # noqa: E402
from model_loader._proto import model_loader_pb2_grpc as pb2_grpc  # noqa: E402

MESSAGES = ["Initializing model loader...", "Checking model cache...",
            "Building loading strategies...", "Loading model weights...", "Model weights loaded",
            "Moving model to device...", "Applying optimizations...", "Finalizing model..."]


def steps(model_id: str) -> Iterator[pb2.ModelLoadProgress]:
    for step, message in enumerate(MESSAGES, start=1):
        yield pb2.ModelLoadProgress(model_id=model_id, step=step, total=8, message=message)
        if step == 4:
            for done in (1 << 20, 2 << 20, 3 << 20):
                yield pb2.ModelLoadProgress(model_id=model_id, step=4, total=8, message=message,
                                            detail="model.safetensors", bytes_done=done,
                                            bytes_total=3 << 20)


class Loader(pb2_grpc.ModelLoaderServicer):  # type: ignore[misc]
    def __init__(self) -> None:
        self.requests: List[pb2.LoadModelRequest] = []

    def LoadModel(self, request: pb2.LoadModelRequest, context: Any) -> Iterator[Any]:
        self.requests.append(request)
        if request.model_id == "missing/model":
            context.abort(grpc.StatusCode.NOT_FOUND, "no model missing/model")
        if request.model_id == "broken/model":
            yield from list(steps(request.model_id))[:3]
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "config.json: bad json")
        yield from steps(request.model_id)


@pytest.fixture
def server() -> Iterator[tuple[str, Loader]]:
    loader = Loader()
    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb2_grpc.add_ModelLoaderServicer_to_server(loader, srv)
    port = srv.add_insecure_port("127.0.0.1:0")
    srv.start()
    yield f"127.0.0.1:{port}", loader
    srv.stop(None)


def test_load_returns_the_last_message(server: tuple[str, Loader]) -> None:
    address, loader = server
    last = load("org/model", address, revision="main", device="cpu", dtype="bf16", progress=False)
    assert (last.step, last.total, last.message) == (8, 8, "Finalizing model...")
    (request,) = loader.requests
    assert (request.model_id, request.revision, request.device, request.dtype) == (
        "org/model", "main", "cpu", "bf16")


def test_several_gpus_their_placement_and_device_map_are_sent(server: tuple[str, Loader]) -> None:
    address, loader = server
    load("org/model", address, device="cuda:0,cuda:1", placement="split",
         device_map={"lm_head": "cuda:1", "": "cuda:0"}, progress=False)
    (request,) = loader.requests
    assert (request.device, request.placement) == ("cuda:0,cuda:1", "split")
    assert dict(request.device_map) == {"lm_head": "cuda:1", "": "cuda:0"}


def test_optional_fields_stay_unset(server: tuple[str, Loader]) -> None:
    address, loader = server
    load("org/model", address, progress=False)
    (request,) = loader.requests
    assert not any(request.HasField(f) for f in ("revision", "device", "dtype", "placement"))
    assert not request.device_map


@pytest.mark.parametrize("model_id, code, name", [
    ("missing/model", 5, "NOT_FOUND"), ("broken/model", 3, "INVALID_ARGUMENT")])
def test_failed_stream_raises_with_its_code(server: tuple[str, Loader], model_id: str,
                                            code: int, name: str) -> None:
    with pytest.raises(LoadError) as info:
        load(model_id, server[0], progress=False)
    assert (info.value.code, info.value.code_name) == (code, name)
    assert info.value.message


def test_unreachable_server_is_unavailable() -> None:
    with pytest.raises(LoadError) as info:
        load("org/model", "127.0.0.1:1", progress=False, timeout=5)
    assert info.value.code_name in ("UNAVAILABLE", "DEADLINE_EXCEEDED")


def test_progress_bar(server: tuple[str, Loader], capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("tqdm")
    load("org/model", server[0])
    err = capsys.readouterr().err
    assert "4/8 Loading model weights..." in err
    assert "3.00M/3.00MB" in err
    assert "8/8 Finalizing model..." in err


def test_plain_progress_without_tqdm(server: tuple[str, Loader], capsys: pytest.CaptureFixture[str],
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    load("org/model", server[0])
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "org/model: step 1/8 Initializing model loader..."
    assert len(lines) == 8
    assert lines[3] == "org/model: step 4/8 Loading model weights..."


def test_grpcio_missing_is_a_clear_import_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "grpc", None)
    with pytest.raises(ImportError, match=r"model-loader-client\[grpc\]"):
        load("org/model")
