"""``nanomorph models list``: the stored models (:mod:`nanomorph.store`)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from typing import Any

from nanomorph.cli.options import add_store


def add_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument("action", choices=["list"], help="what to do (list: show stored models)")
    add_store(
        parser,
        "'bentoml' (the BentoML model store, at $BENTOML_HOME) or a folder; null: $NANOMORPH_STORE or bentoml",
    )
    parser.add_argument("--verify", action="store_true", help="also check every file's sha256")
    parser.add_argument("--json", action="store_true", help="print JSON lines instead of a table")


def _format_metrics(metrics: Mapping[str, Any], limit: int = 4) -> str:
    parts = []
    for key, value in list(metrics.items())[:limit]:
        parts.append(f"{key}={value:.3g}" if isinstance(value, float) else f"{key}={value}")
    return " ".join(parts) or "-"


def run(args: argparse.Namespace) -> int:
    from nanomorph.store import _is_bentoml, default_store, list_models

    store = args.store or default_store()
    models = list_models(store, verify=bool(args.verify))
    if args.json:
        for m in models:
            entry = {
                "tag": m.tag,
                "task": m.task,
                "classes": m.classes,
                "metrics": m.metrics,
                "path": str(m.path),
            }
            print(json.dumps(entry, sort_keys=True))
        return 0
    if not models:
        print(f"no models in {'the BentoML model store' if _is_bentoml(store) else store}")
        return 0
    rows = [("TAG", "TASK", "CLASSES", "METRICS")]
    rows += [(m.tag, m.task, ",".join(m.classes) or "-", _format_metrics(m.metrics)) for m in models]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row[:3], widths, strict=True)) + "  " + row[3])
    return 0
