"""Shared run-folder helpers: metrics log, atomic checkpoints, model cards.

Every training command writes its run folder through these so that the folders look alike
(docs/architecture.md §3) and a killed process never leaves a half-written file behind.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nanomorph.atomic import atomic_path, atomic_write_text

log = logging.getLogger(__name__)


def _jsonable(value: Any) -> Any:
    """Makes tensors, numpy scalars, Paths and non-finite floats JSON-safe."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep the information as a string
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


class MetricsLogger:
    """Appends one JSON object per line to ``metrics.jsonl``.

    Each line is flushed as it is written, so the file survives a killed process (at most the
    line being written is lost; :func:`read_metrics` skips a truncated last line).

    Args:
        path: the ``metrics.jsonl`` file (its folder is created).
        enabled: False on non-zero DDP ranks: :meth:`log` then does nothing.
    """

    def __init__(self, path: str | Path, enabled: bool = True) -> None:
        self.path = Path(path)
        self.enabled = enabled
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def log(self, record: Mapping[str, Any] | None = None, **fields: Any) -> None:
        """Writes ``record`` merged with ``fields`` (plus a ``time`` stamp) as one line."""
        if not self.enabled:
            return
        data = {"time": round(time.time(), 3), **dict(record or {}), **fields}
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(_jsonable(data)) + "\n")
            fh.flush()

    def truncate(self, keep: Any) -> int:
        """Keeps only the records for which ``keep(record)`` is true (used on resume to drop the
        lines of an epoch that was interrupted). Returns how many records were kept."""
        if not self.enabled or not self.path.exists():
            return 0
        kept = [r for r in read_metrics(self.path) if keep(r)]
        text = "".join(json.dumps(r) + "\n" for r in kept)
        atomic_write_text(self.path, text, fsync=True)
        return len(kept)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Reads a ``metrics.jsonl`` file, skipping a truncated (unparsable) line."""
    records: list[dict[str, Any]] = []
    path = Path(path)
    if not path.exists():
        return records
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            log.warning("%s: skipping a truncated line", path)
    return records


def save_checkpoint(state: Mapping[str, Any], path: str | Path) -> Path:
    """Saves ``state`` with :func:`torch.save` atomically (temporary file, fsync, rename).

    Keep ``state`` to tensors, dicts, lists, tuples, str/int/float/bool/None so that
    :func:`load_checkpoint` (``weights_only=True``) can read it; see :func:`rng_state`.
    """
    with atomic_path(path, fsync=True) as tmp:
        torch.save(dict(state), tmp)
    return Path(path)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Loads a checkpoint written by :func:`save_checkpoint` with ``weights_only=True``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not a loadable checkpoint (message names the file).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise ValueError(f"{path}: cannot load checkpoint ({exc})") from exc
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: checkpoint is not a dict")
    return obj


def rng_state() -> dict[str, Any]:
    """Python, numpy, torch (and CUDA) RNG states, all as tensors so ``weights_only=True`` loads them."""
    py_version, py_state, py_gauss = random.getstate()
    np_state = np.random.get_state(legacy=True)
    assert isinstance(np_state, tuple)
    state: dict[str, Any] = {
        "python_version": int(py_version),
        "python": torch.tensor(py_state, dtype=torch.int64),
        "python_gauss": py_gauss,
        "numpy_keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
        "numpy_pos": int(np_state[2]),
        "numpy_has_gauss": int(np_state[3]),
        "numpy_cached_gauss": float(np_state[4]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restores the states saved by :func:`rng_state`."""
    py_state = tuple(int(v) for v in state["python"].tolist())
    random.setstate((int(state["python_version"]), py_state, state["python_gauss"]))
    keys = state["numpy_keys"].numpy().astype(np.uint32)
    np.random.set_state(
        (
            "MT19937",
            keys,
            int(state["numpy_pos"]),
            int(state["numpy_has_gauss"]),
            float(state["numpy_cached_gauss"]),
        )
    )
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = [s.cpu() for s in state["cuda"]]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def write_model_card(path: str | Path, title: str, sections: Mapping[str, Any]) -> Path:
    """Writes a Markdown model card (``README.md``) atomically.

    Args:
        path: the file to write.
        title: the level-1 heading.
        sections: heading -> content. A string is written as is; a mapping becomes a two-column
            table; a list becomes bullet points.
    """
    lines = [f"# {title}", ""]
    for heading, content in sections.items():
        lines += [f"## {heading}", ""]
        if isinstance(content, Mapping):
            lines += ["| key | value |", "|---|---|"]
            lines += [f"| {k} | {_format_value(v)} |" for k, v in content.items()]
        elif isinstance(content, (list, tuple)):
            lines += [f"- {_format_value(item)}" for item in content]
        else:
            lines.append(str(content).rstrip())
        lines.append("")
    path = Path(path)
    atomic_write_text(path, "\n".join(lines), fsync=True)
    return path
