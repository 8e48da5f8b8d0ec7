"""The GPU path end to end: a VMM allocation exported by another process, imported here.

Skipped unless torch sees a CUDA device.
"""

from __future__ import annotations

import ctypes
import gc
import subprocess
import sys
import textwrap
import weakref
from pathlib import Path
from typing import Iterator

import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)

from model_loader import _cuda, attach  # noqa: E402

EXPORTER = Path(__file__).resolve().parent / "gpu_exporter.py"
EXPECTED = {
    "a.weight": [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]],
    "b.bf16": [1.0, -2.0, 0.5, 3.0],
    "c.ids": [[1, -2], [3, 1 << 40]],
    "d.f8": [1.0, 2.0, -2.0],
}


def start_exporter(path: Path) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, str(EXPORTER), str(path), "0"],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line.strip() != "ready":
        proc.kill()
        pytest.fail(f"the exporter did not start: {line!r}")
    return proc


def stop(proc: subprocess.Popen[str]) -> None:
    proc.kill()
    proc.wait()
    assert proc.stdout is not None
    proc.stdout.close()


@pytest.fixture(scope="module")
def exporter(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    path = tmp_path_factory.mktemp("gpu") / "attach.sock"
    proc = start_exporter(path)
    yield path
    stop(proc)


@pytest.fixture(params=["cuda-python", "ctypes"])
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "cuda-python":
        try:
            from cuda.bindings import driver
        except ImportError:
            try:
                from cuda import cuda as driver
            except ImportError:
                pytest.skip("cuda-python is not installed")
        monkeypatch.setattr(_cuda, "_api", _cuda._CudaPythonApi(driver))
    else:
        monkeypatch.setattr(_cuda, "_api", _cuda._CtypesApi(ctypes.CDLL("libcuda.so.1")))
    return str(request.param)


def as_lists(tensors: dict) -> dict:  # type: ignore[type-arg]
    return {n: (t.float() if t.dtype in (torch.bfloat16, torch.float8_e4m3fn) else t).tolist()
            for n, t in tensors.items()}


def test_torch_reads_the_exported_memory(exporter: Path, backend: str) -> None:
    with attach("gpu/model", exporter) as att:
        assert all(b.kind == "CUDA_VMM" and b.device == "cuda:0" for b in att.buffers)
        t = att.torch()
        assert {n: x.device for n, x in t.items()} == {n: torch.device("cuda:0") for n in t}
        assert t["b.bf16"].dtype == torch.bfloat16
        assert t["d.f8"].dtype == torch.float8_e4m3fn
        assert as_lists(t) == EXPECTED
        spec = att.tensor_specs
        base = t["a.weight"].data_ptr() - spec["a.weight"].offset
        assert t["b.bf16"].data_ptr() == base + spec["b.bf16"].offset
        # Kernels run on it like on any tensor.
        assert (t["a.weight"] * 2).sum().item() == 30.0
        del t


def test_cupy_reads_the_interface(exporter: Path, backend: str) -> None:
    cupy = pytest.importorskip("cupy")
    with attach("gpu/model", exporter) as att:
        arrays = att.cuda_arrays()
        assert cupy.asnumpy(cupy.asarray(arrays["a.weight"])).tolist() == EXPECTED["a.weight"]
        assert cupy.asnumpy(cupy.asarray(arrays["c.ids"])).tolist() == EXPECTED["c.ids"]
        del arrays


def test_tensors_outlive_close_and_are_released_after(exporter: Path, backend: str) -> None:
    att = attach("gpu/model", exporter)
    t = att.torch()["c.ids"]
    released: list[bool] = []
    mapping = att._res.cuda[att.tensor_specs["c.ids"].buffer]
    weakref.finalize(mapping, released.append, True)
    del mapping
    att.close()
    assert t.tolist() == EXPECTED["c.ids"]
    assert not released
    del t
    gc.collect()
    assert released == [True]


def test_writes_through_the_mapping_fault(exporter: Path) -> None:
    # In a child: a fault leaves its CUDA context unusable.
    script = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(EXPORTER.parent.parent)!r})
        from model_loader import attach
        att = attach("gpu/model", {str(exporter)!r})
        t = att.torch()["a.weight"]
        try:
            t.fill_(7.0)
            torch.cuda.synchronize()
        except Exception as e:
            print("refused:", e)
            sys.exit(3)
        print("written")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 3 and "refused:" in proc.stdout, proc.stdout + proc.stderr
    with attach("gpu/model", exporter) as att:
        assert att.torch()["a.weight"].tolist() == EXPECTED["a.weight"]


def test_memory_outlives_the_exporting_process(tmp_path: Path, backend: str) -> None:
    proc = start_exporter(tmp_path / "attach.sock")
    att = attach("gpu/model", tmp_path / "attach.sock")
    t = att.torch()
    assert att.alive()
    stop(proc)
    assert att.wait_closed(10)
    assert not att.alive()
    # The server is gone; the imported allocation stays valid until released here.
    assert as_lists(t) == EXPECTED
    att.close()
    del t
