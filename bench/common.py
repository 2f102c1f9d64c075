"""What the benchmarks share: the machine line of a recorded result, the "## Section" writer of
docs/benchmarks.md, and exporting a network into a folder store with ``training.export``."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return cpu


def load_average() -> str:
    return ", ".join(f"{x:.1f}" for x in os.getloadavg())


def record_section(text: str, path: Path, section: str) -> None:
    """Replaces the ``section`` ("## Title") of ``path`` (docs/benchmarks.md) with ``text``, which
    starts with that heading, or appends it; the sections after it are kept."""
    doc = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    start = doc.find(section)
    if start < 0:
        doc = doc.rstrip("\n") + "\n\n" + text
    else:
        end = doc.find("\n## ", start + len(section))
        doc = doc[:start] + text.rstrip("\n") + "\n" + (doc[end:] if end >= 0 else "")
    path.write_text(doc.rstrip("\n") + "\n", encoding="utf-8")


def export_to_store(job: Any, store: Path, tag: str, props: dict[str, str]) -> str:
    """Exports ``job`` (a ``training.export.ExportJob``) to ONNX with ``props`` as its metadata and
    saves it into the folder store ``store`` as ``tag``; returns the tag."""
    from nanomorph.store import save_model
    from training.export import export_onnx, set_metadata

    onnx_path = store / f"bench-{job.task}.onnx"
    export_onnx(job, onnx_path)
    set_metadata(onnx_path, props)
    save_model(onnx_path, store, tag, job.task)
    onnx_path.unlink()
    return tag
