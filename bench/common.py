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


def print_and_record(table: str, section: str, record: bool) -> None:
    """Prints a bench's result ``table`` and, with ``record``, writes it into docs/benchmarks.md."""
    print()
    print(table)
    if record:
        path = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
        record_section(table, path, section)
        print(f"recorded in {path}")


def record_section(text: str, path: Path, section: str) -> None:
    """Replaces the ``section`` ("## Title" or "### Title") of ``path`` (docs/benchmarks.md) with
    ``text``, which starts with that heading, or appends it; what follows the section (the next
    heading of its level or higher) is kept."""
    doc = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    start = doc.find(section)
    if start < 0:
        doc = doc.rstrip("\n") + "\n\n" + text
    else:
        level = len(section) - len(section.lstrip("#"))
        ends = [doc.find("\n" + "#" * k + " ", start + len(section)) for k in range(1, level + 1)]
        end = min((e for e in ends if e >= 0), default=-1)
        doc = doc[:start] + text.rstrip("\n") + "\n" + (doc[end:] if end >= 0 else "")
    path.write_text(doc.rstrip("\n") + "\n", encoding="utf-8")


def export_to_store(
    job: Any, store: Path, tag: str, props: dict[str, str], int8_calibration: Any = None
) -> str:
    """Exports ``job`` (a ``training.export.ExportJob``) to ONNX with ``props`` as its metadata and
    saves it into the folder store ``store`` as ``tag``; returns the tag. With
    ``int8_calibration`` (model inputs) the int8 model is stored beside it, as ``nanomorph export
    --quantize int8`` stores a kept one (no accuracy check: benchmarks time it, weights are random)."""
    from nanomorph.store import INT8_FILE, save_model
    from training.export import export_onnx, quantize_int8, set_metadata

    onnx_path = store / f"bench-{job.task}.onnx"
    export_onnx(job, onnx_path)
    set_metadata(onnx_path, props)
    files = {}
    if int8_calibration is not None:
        files[INT8_FILE] = quantize_int8(onnx_path, store / f"bench-{job.task}.int8.onnx", int8_calibration)
        set_metadata(files[INT8_FILE], props)
    save_model(onnx_path, store, tag, job.task, {"files": files} if files else None)
    for path in (onnx_path, *files.values()):
        path.unlink()
    return tag
