"""deploy/check.py against the Helm chart: values that break a rule fail the check, naming the
rule, and good values pass. Each test runs the check as `just deploy-check` does, with the pinned
helm (scripts/helm-bin) and the debug server's flags."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CHECK = REPO / "deploy" / "check.py"
CHART = REPO / "deploy" / "helm" / "model-loader"
SERVER = REPO / "target" / "debug" / "model-loader"


@pytest.fixture(scope="session")
def helm() -> str:
    return os.environ.get("HELM") or subprocess.run(
        [str(REPO / "scripts" / "helm-bin")], check=True, capture_output=True, text=True
    ).stdout.strip()


def check(helm: str, *args: str) -> subprocess.CompletedProcess[str]:
    assert SERVER.exists(), f"{SERVER} is missing: cargo build -p server --bin model-loader"
    return subprocess.run(
        [sys.executable, str(CHECK), "--helm", helm, "--server", str(SERVER), *args],
        capture_output=True,
        text=True,
    )


def test_good_values_pass(helm: str) -> None:
    """Values a deployment would use pass every rule: preloads, a Hub token from a Secret, a
    budget in bytes, another flag, metrics off, cuda:1 on two GPUs."""
    out = check(
        helm,
        "--set", "preload={demo/tiny-sd,s3://models/llama}",
        "--set", "huggingFace.tokenSecret.name=hf",
        "--set", "memoryBudget=12GiB",
        "--set", "config.MODEL_LOADER_MAX_CONCURRENT_LOADS=2",
        "--set", "metrics.enabled=false",
        "--set", "device=cuda:1,gpu.count=2",
        "--set", "shutdownGrace=2m,terminationGracePeriodSeconds=150",
    )
    assert out.returncode == 0, out.stderr
    assert "chart: 9 objects valid" in out.stdout


def test_consumer_values_pass(helm: str) -> None:
    """The consumer's values file on its own passes (its container mounts the attach folder)."""
    out = check(helm, "--values", str(CHART / "ci" / "cpu-consumer-values.yaml"))
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize(
    ("sets", "rule"),
    [
        (["terminationGracePeriodSeconds=10"], "terminationGracePeriodSeconds 10 is not above the shutdown grace 20"),
        (["shutdownGrace=1m"], "terminationGracePeriodSeconds 30 is not above the shutdown grace 60"),
        (
            ["podSecurityContext.runAsNonRoot=false,podSecurityContext.runAsUser=0,securityContext.runAsNonRoot=false"],
            "container model-loader may run as root",
        ),
        (["securityContext.readOnlyRootFilesystem=false"], "container model-loader: the root filesystem is writable"),
        (["securityContext.allowPrivilegeEscalation=true"], "container model-loader: privilege escalation is allowed"),
        (["config.MODEL_LOADER_PRELAOD=demo/tiny-sd"], "ConfigMap key MODEL_LOADER_PRELAOD is no flag of the server"),
        (["config.MODEL_LOADER_HF_TOKEN=hf_abc"], "ConfigMap key MODEL_LOADER_HF_TOKEN is a credential"),
        (["device=cuda"], "MODEL_LOADER_DEVICE cuda needs 1 nvidia.com/gpu, the limits give 0"),
        (["device=cuda:1,gpu.count=1"], "MODEL_LOADER_DEVICE cuda:1 needs 2 nvidia.com/gpu, the limits give 1"),
        # The values schema and the chart's own checks, through helm lint.
        (["evict=sometimes"], "at '/evict': value must be one of 'lru', 'none'"),
        (["networkPolicy.grpcFrom=null"], "at '/networkPolicy': missing property 'grpcFrom'"),
        (["consumer.enabled=true,consumer.image=c:1,attach.enabled=false"], "consumer.enabled needs attach.enabled"),
    ],
)
def test_broken_value_fails(helm: str, sets: list[str], rule: str) -> None:
    """A value that breaks a rule fails the check, which names the rule."""
    out = check(helm, *[arg for item in sets for arg in ("--set", item)])
    assert out.returncode == 1, out.stdout + out.stderr
    assert rule in out.stderr, out.stderr


def test_consumer_literal_token_fails(helm: str, tmp_path: Path) -> None:
    """A token written into a container's env, not taken from a Secret, fails the check."""
    values = tmp_path / "values.yaml"
    values.write_text(
        "consumer:\n  env:\n    - name: HF_TOKEN\n      value: hf_abc\n",
        encoding="utf-8",
    )
    out = check(helm, "--values", str(CHART / "ci" / "cpu-consumer-values.yaml"), "--values", str(values))
    assert out.returncode == 1, out.stdout + out.stderr
    assert "container consumer: env HF_TOKEN is a credential set as a literal value" in out.stderr, out.stderr


def test_chart_drifting_from_overlay_fails(helm: str, tmp_path: Path) -> None:
    """A chart whose defaults no longer deploy what the cpu overlay does fails the full check,
    naming the difference, though every rule still holds for it."""
    chart = tmp_path / "model-loader"
    shutil.copytree(CHART, chart)
    values = chart / "values.yaml"
    text = values.read_text(encoding="utf-8")
    assert 'memoryBudget: "80%"' in text
    values.write_text(text.replace('memoryBudget: "80%"', 'memoryBudget: "70%"'), encoding="utf-8")
    out = check(helm, "--chart", str(chart))
    assert out.returncode == 1, out.stdout + out.stderr
    assert (
        "chart: differs from overlay cpu at ConfigMap/model-loader-config.data.MODEL_LOADER_MEMORY_BUDGET: '70%' != '80%'"
        in out.stderr
    ), out.stderr
    # The overlays and the ci renders still pass.
    assert "cpu: 9 objects valid" in out.stdout
    assert "chart gpu: 9 objects valid" in out.stdout
