"""The server under test: tiny ONNX models in a folder store, plus a similarity index when the
service has ``/similar``, started with the shared test starter (``tests/fixtures/server.py``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from reliability.hostile import noise_image


def prepare(work: Path) -> tuple[Path, dict[str, str], list[str]]:
    """Builds ``work/store`` (tiny models) and, if it can, ``work/index`` for ``/similar``.

    Returns:
        The store folder, the server environment (``NANOMORPH_INDEX`` when an index was built) and
        notes on what could not be set up.
    """
    from tests.fixtures.tiny_models import build_tiny_store

    store = work / "store"
    tags = build_tiny_store(store)
    env: dict[str, str] = {}
    notes: list[str] = []
    try:
        from nanomorph.archive.index import build_index, load_embedder

        images = work / "archive"
        images.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(3)
        for i in range(12):
            Image.fromarray(noise_image(rng, 48, 48)).save(images / f"a{i:02d}.png")
        embedder = load_embedder(tags["embed"], store)
        build_index(images, work / "index", embedder, tags["embed"], store)
        env["NANOMORPH_INDEX"] = str(work / "index")
    except Exception as exc:  # an older/newer index API: fuzz /similar unconfigured (503 by design)
        notes.append(f"no similarity index ({type(exc).__name__}: {exc})")
    return store, env, notes


def start(work: Path, env: dict[str, str] | None = None, **kwargs: Any) -> Any:
    """Prepares the store (and index) under ``work`` and starts a ready server; returns it."""
    from tests.fixtures.server import start_server

    store, extra, notes = prepare(work)
    server = start_server(work / "server", store=store, env={**extra, **(env or {})}, **kwargs)
    server.setup_notes = notes  # type: ignore[attr-defined]
    return server
