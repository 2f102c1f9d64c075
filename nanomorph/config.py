"""The packaged YAML defaults of each command (the only source of them) and the resolved config
saved beside every run's outputs (``config.yaml``). The CLI applies them: :mod:`nanomorph.cli.options`."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from nanomorph.atomic import atomic_write_text

_CONFIG_DIRS = (
    Path(__file__).parent / "configs",
    Path(__file__).parent.parent / "training" / "configs",
)


def yaml_defaults(command: str) -> dict[str, Any]:
    """Defaults of a command from its packaged YAML file (``configs/<command>.yaml``)."""
    for folder in _CONFIG_DIRS:
        path = folder / f"{command}.yaml"
        if path.is_file():
            return load_yaml(path)
    return {}


def load_yaml(path: str | Path) -> dict[str, Any]:
    with open(path, encoding="utf-8") as fh:
        data = yaml.safe_load(fh) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a config file must hold a mapping of option names to values")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def to_plain(value: Any) -> Any:
    """Converts Paths and tuples so that the config dumps as plain YAML."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    return value


def resolved(args: argparse.Namespace | Mapping[str, Any]) -> dict[str, Any]:
    items = vars(args) if isinstance(args, argparse.Namespace) else dict(args)
    return {k: to_plain(v) for k, v in items.items() if not callable(v)}


def save_resolved(args: argparse.Namespace | Mapping[str, Any], out_dir: str | Path) -> Path:
    """Writes the resolved config to ``out_dir/config.yaml`` (atomically) and returns its path."""
    path = Path(out_dir) / "config.yaml"
    atomic_write_text(path, yaml.safe_dump(resolved(args), sort_keys=True))
    return path
