"""The committed generated code matches the proto (skipped without the pinned grpcio-tools)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_regen() -> ModuleType:
    spec = importlib.util.spec_from_file_location("regen", ROOT / "regen.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["regen"] = module
    spec.loader.exec_module(module)
    return module


regen = load_regen()


def test_generated_code_is_current(tmp_path: Path) -> None:
    version = regen.installed_tools_version()
    if version is None:
        pytest.skip("grpcio-tools is not installed")
    if version != regen.GRPCIO_TOOLS_VERSION:
        pytest.skip(f"grpcio-tools {version} is installed; the files are made with "
                    f"{regen.GRPCIO_TOOLS_VERSION} (run regen.sh)")
    regen.generate(tmp_path)
    for name in regen.GENERATED:
        fresh = (tmp_path / name).read_text(encoding="utf-8")
        committed = (regen.PACKAGE_OUT / name).read_text(encoding="utf-8")
        assert fresh == committed, f"{name} is stale: run clients/python/regen.sh"


def test_stub_imports_its_messages_relatively() -> None:
    stub = (regen.PACKAGE_OUT / "model_loader_pb2_grpc.py").read_text(encoding="utf-8")
    assert "from . import model_loader_pb2 as" in stub
    assert "from modelloader.v1 import" not in stub


def test_messages_cover_the_attach_protocol() -> None:
    from model_loader import pb2

    for name in ("AttachRequest", "AttachResponse", "AttachedBuffer", "AttachedTensor",
                 "ModelStatus", "ModelLoadProgress"):
        assert hasattr(pb2, name), name
    assert pb2.DESCRIPTOR.name == "modelloader/v1/model_loader.proto"
    assert set(pb2.BufferKind.keys()) >= {"BUFFER_KIND_HOST_MEMFD", "BUFFER_KIND_HOST_FILE",
                                          "BUFFER_KIND_CUDA_VMM"}
