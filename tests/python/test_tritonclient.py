"""NVIDIA's own v2 client, tritonclient[grpc] from PyPI, drives the real server's
`inference.GRPCInferenceService` as it would drive Triton: health, metadata, load (blocking until
the model is ready), the repository index, unload, and Triton's exceptions for bad requests."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Iterator

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "clients" / "python" / "tests" / "adapters"))

import realserver  # noqa: E402

import tritonclient.grpc as tritonclient_grpc  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

DEMO = "demo/tiny-sd"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[realserver.Server]:
    """The real binary serving the repository's demo model."""
    binary = realserver.server_binary(REPO, "just test")
    s = realserver.Server(binary, ["--model-root", str(REPO / "models"), "--offline"], {}, tmp_path)
    yield s
    s.stop()


@pytest.fixture
def client(server: realserver.Server) -> Iterator[Any]:
    c = tritonclient_grpc.InferenceServerClient(url=server.addr)
    yield c
    c.close()


def index(client: Any) -> dict[str, dict[str, str]]:
    listed = client.get_model_repository_index(as_json=True).get("models", [])
    return {m["name"]: m for m in listed}


def test_health_metadata_load_index_and_unload(client: Any) -> None:
    c = client
    assert c.is_server_live()
    realserver.eventually(c.is_server_ready, "the server says it is ready")
    metadata = c.get_server_metadata(as_json=True)
    assert metadata["name"] == "model-loader"
    assert set(metadata["extensions"]) == {"model_repository", "model_repository(unload_dependents)"}

    assert index(c)[DEMO]["state"] == "UNAVAILABLE"
    assert not c.is_model_ready(DEMO)
    c.load_model(DEMO)
    # load_model returned: the model is ready now, without polling.
    assert c.is_model_ready(DEMO)
    assert c.is_model_ready(DEMO, "1")
    listed = index(c)
    assert listed[DEMO]["state"] == "READY" and listed[DEMO]["version"] == "1", listed
    model = c.get_model_metadata(DEMO, as_json=True)
    assert (model["name"], model["versions"], model["platform"]) == (DEMO, ["1"], "safetensors")

    c.unload_model(DEMO)
    assert not c.is_model_ready(DEMO)
    assert index(c)[DEMO]["state"] == "UNAVAILABLE"


def test_bad_requests_raise_triton_exceptions_with_the_right_code(client: Any) -> None:
    c = client
    with pytest.raises(InferenceServerException) as missing:
        c.load_model("org/no-such-model")
    assert missing.value.status() == "StatusCode.NOT_FOUND", missing.value
    assert "org/no-such-model" in str(missing.value.message())

    with pytest.raises(InferenceServerException) as config:
        c.load_model(DEMO, config='{"backend": "onnxruntime"}')
    assert config.value.status() == "StatusCode.INVALID_ARGUMENT", config.value

    with pytest.raises(InferenceServerException) as metadata:
        c.get_model_metadata("org/never-seen", as_json=True)
    assert metadata.value.status() == "StatusCode.NOT_FOUND", metadata.value

    with pytest.raises(InferenceServerException) as infer:
        c.get_inference_statistics(DEMO)
    assert infer.value.status() == "StatusCode.UNIMPLEMENTED", infer.value

    # The server goes on: the demo still loads.
    c.load_model(DEMO)
    assert c.is_model_ready(DEMO)


def test_the_readme_example_runs_as_written(server: realserver.Server, client: Any) -> None:
    """The README's tritonclient example, against this test's server."""
    readme = (REPO / "README.md").read_text()
    section = readme.split("### KServe v2 / Triton clients", 1)[1]
    block = section.split("```python\n", 1)[1].split("```", 1)[0]
    assert "127.0.0.1:50051" in block, block
    code = block.replace("127.0.0.1:50051", server.addr)
    exec(compile(code, "README.md", "exec"), {})
    assert not client.is_model_ready(DEMO), "the example ends by unloading the demo"
