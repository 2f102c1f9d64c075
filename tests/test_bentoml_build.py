"""Packaging: ``bentoml build`` of bentofile.yaml, and the key facts of the Dockerfile.

No Docker engine is needed: ``bentoml build`` only writes the bento (service code, requirements,
a generated Dockerfile) into its own ``BENTOML_HOME``; the Dockerfile is checked by reading it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bento(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Builds the bento (with the tiny models in a private BentoML store); returns its folder."""
    home = tmp_path_factory.mktemp("bentoml_home")
    env = {**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "True", "PYTHONPATH": str(REPO)}
    # In a child process: bentoml reads BENTOML_HOME once, when first imported.
    scratch = tmp_path_factory.mktemp("onnx")
    code = f"from tests.fixtures.tiny_models import build_tiny_store; build_tiny_store({str(scratch)!r}, store='bentoml')"
    models = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert models.returncode == 0, models.stderr[-3000:]
    run = subprocess.run(
        [sys.executable, "-m", "bentoml", "build", str(REPO), "--output", "tag"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    tag = re.search(r"nanomorph:[a-z0-9]+", run.stdout)
    assert tag, run.stdout
    return home / "bentos" / "nanomorph" / tag.group(0).split(":")[1]


def test_bento_holds_the_service_and_models_but_no_training_or_torch(bento: Path) -> None:
    src = {p.relative_to(bento / "src").as_posix() for p in (bento / "src").rglob("*") if p.is_file()}
    for expected in (
        "service/service.py",
        "service/guard.py",
        "service/webui.py",
        "service/web/index.html",
        "service/web/app.js",
        "nanomorph/contract/io.py",
        "nanomorph/runtime.py",
    ):
        assert expected in src
    assert not any(p.startswith(("training/", "tests/", ".venv/")) for p in src)
    assert not any("__pycache__" in p for p in src)

    requirements = (bento / "env" / "python" / "requirements.txt").read_text().lower()
    names = {re.split(r"[<>=~!; ]", line.strip())[0] for line in requirements.splitlines() if line.strip()}
    assert {"bentoml", "onnxruntime-gpu", "numpy", "pillow", "prometheus-client"} <= names
    assert "onnxruntime" not in names, "onnxruntime-gpu replaces onnxruntime; never both"
    assert not names & {"torch", "torchvision", "timm", "lightly", "segmentation-models-pytorch"}

    meta = yaml.safe_load((bento / "bento.yaml").read_text())
    assert meta["service"] == "service.service:Nanomorph"
    assert {m["tag"].split(":")[0] for m in meta["models"]} == {
        "nanomorph-classify",
        "nanomorph-embed",
        "nanomorph-segment",
    }
    assert meta["docker"]["cuda_version"].startswith("12.")  # onnxruntime-gpu 1.26 = CUDA 12 + cuDNN 9
    assert {e["name"]: e["value"] for e in meta["envs"]}["NANOMORPH_STORE"] == "bentoml"
    dockerfile = (bento / "env" / "docker" / "Dockerfile").read_text()
    assert re.search(r"FROM nvidia/cuda:12\.\d+\.\d+-cudnn-runtime", dockerfile)


def test_bento_packages_are_pyprojects(bento: Path) -> None:
    """The bento installs pyproject's `gpu` extra (with its [tool.nanomorph.bento] pins), nothing typed twice."""
    from importlib.metadata import version

    from packaging.requirements import Requirement

    from scripts.bento_requirements import requirements
    from tests.test_extras import packages

    lines = (bento / "env" / "python" / "requirements.txt").read_text().splitlines()
    packed = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    # BentoML appends its own pin of the bentoml that built the bento (the one pyproject pins too), and
    # rewrites each line in its canonical form (e.g. markers in double quotes): compare canonical forms.
    expected = [*requirements(), f"bentoml=={version('bentoml')}"]
    assert [str(Requirement(r)) for r in packed] == [str(Requirement(r)) for r in expected]
    names = {re.split(r"[\[<>=~!; ]", line)[0].lower() for line in packed}
    assert names == packages(["gpu"])  # pyproject's own expansion of the extra (tests/test_extras.py)


def test_bento_requirements_file_is_current() -> None:
    """bento-requirements.txt is what scripts/bento_requirements.py writes from pyproject.toml."""
    from scripts.bento_requirements import render

    assert (REPO / "bento-requirements.txt").read_text(encoding="utf-8") == render(), (
        "pyproject.toml changed: run `make bento-requirements`"
    )
    python = yaml.safe_load((REPO / "bentofile.yaml").read_text())["python"]
    assert python["requirements_txt"] == "./bento-requirements.txt" and "packages" not in python


def test_dockerfile_key_facts() -> None:
    text = (REPO / "Dockerfile").read_text()
    gpu_image = re.search(r"ARG CUDA_IMAGE=nvidia/cuda:(\d+)\.(\d+)\.\d+-cudnn-runtime-ubuntu", text)
    ort_gpu = re.search(r"ARG ORT_GPU=onnxruntime-gpu==1\.(\d+)\.\d+", text)
    assert gpu_image and ort_gpu
    # PyPI's onnxruntime-gpu >= 1.27 is built for CUDA 13 (+ cuDNN 9), <= 1.26 for CUDA 12.
    assert int(gpu_image.group(1)) == (13 if int(ort_gpu.group(1)) >= 27 else 12)
    assert "pip uninstall -y onnxruntime" in text  # the GPU build replaces the CPU one
    assert "python:3.11-slim" in text and "ARG VARIANT=gpu" in text
    assert re.search(r"^USER nanomorph$", text, re.M) and "useradd" in text
    assert re.search(r"^EXPOSE 3000$", text, re.M)
    health = re.search(r"^HEALTHCHECK .*\n\s+CMD (.*)$", text, re.M)
    assert health and "/readyz" in health.group(1) and "urllib" in health.group(1)
    assert "NANOMORPH_STORE=/models" in text
    cmd = re.search(r"^CMD \[(.*)\]$", text, re.M)
    # `nanomorph serve` runs `bentoml serve service.service:Nanomorph` and drains it on SIGTERM.
    assert cmd and cmd.group(1).startswith('"nanomorph", "serve"') and '"0.0.0.0"' in cmd.group(1)
    assert '"service.service:Nanomorph"' in (REPO / "nanomorph" / "serve.py").read_text()
    assert (REPO / "service" / "service.py").read_text().count("class Nanomorph") == 1
    ignore = (REPO / ".dockerignore").read_text().splitlines()
    assert ignore[ignore.index("**") + 1 :].count("!training/") == 0 and "**" in ignore
