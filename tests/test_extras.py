"""pyproject's extras: no install line we document puts onnxruntime and onnxruntime-gpu in one env.

Both wheels write the same ``onnxruntime/`` folder; whichever installs last wins, and uninstalling
one breaks the other. The extras refer to each other (``nanomorph[serving-base]``), so they are
expanded here the way pip does.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    tomllib = pytest.importorskip("tomli")

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
EXTRAS: dict[str, list[str]] = PYPROJECT["project"]["optional-dependencies"]


def _name(requirement: str) -> str:
    return re.split(r"[\[<>=~!; ]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def packages(extras: list[str]) -> set[str]:
    """Distribution names an install of ``nanomorph[extras]`` brings (self-references expanded)."""
    out = {_name(r) for r in PYPROJECT["project"]["dependencies"]}
    todo, seen = list(extras), set()
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for req in EXTRAS[extra]:
            m = re.match(r"^nanomorph\[([^\]]+)\]", req.strip())
            if m:
                todo.extend(e.strip() for e in m.group(1).split(","))
            else:
                out.add(_name(req))
    return out


def test_gpu_is_serving_with_the_gpu_build_only() -> None:
    gpu, serving = packages(["gpu"]), packages(["serving"])
    assert "onnxruntime-gpu" in gpu and "onnxruntime" not in gpu
    assert "onnxruntime" in serving and "onnxruntime-gpu" not in serving
    assert gpu - {"onnxruntime-gpu"} == serving - {"onnxruntime"}


def test_make_installs_one_onnxruntime() -> None:
    line = re.search(r"pip install --quiet -e '\.\[([^\]]+)\]'", (REPO / "Makefile").read_text())
    assert line, "the Makefile's install line moved"
    got = packages(line.group(1).split(","))
    assert "onnxruntime" in got and "onnxruntime-gpu" not in got


def test_readme_install_lines_never_mix_the_two_builds() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    lines = re.findall(r"pip install -e '\.\[([^\]]+)\]'", readme)
    assert any("gpu" in extras.split(",") for extras in lines), "the README's GPU install line is gone"
    for extras in lines:
        got = packages(extras.split(","))
        assert not {"onnxruntime", "onnxruntime-gpu"} <= got, extras
