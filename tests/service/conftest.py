"""Fixtures for the service tests: a tiny model store and one real server for the session."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.fixtures.server import Server, start_server
from tests.fixtures.tiny_models import build_tiny_store

#: The main test server's upload limit (low, so the oversized-upload test stays small).
UPLOAD_LIMIT_MB = 0.25


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def speck_image(bright: bool, size: int = 48, seed: int = 0) -> np.ndarray:
    """A mostly dark image with a bright speck (``bright=False``) or the reverse, uint8."""
    rng = np.random.default_rng(seed)
    base = np.full((size, size + 8), 20 if not bright else 235, dtype=np.uint8)
    base += rng.integers(0, 5, base.shape, dtype=np.uint8)
    value = 250 if not bright else 5
    base[size // 3 : size // 3 + 4, size // 2 : size // 2 + 4] = value
    return base


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("store")
    tags = build_tiny_store(root)
    return root, tags


@pytest.fixture(scope="session")
def server(
    tmp_path_factory: pytest.TempPathFactory, tiny_store: tuple[Path, dict[str, str]]
) -> Iterator[Server]:
    """One real server (started through ``nanomorph serve``) for the whole session."""
    work = tmp_path_factory.mktemp("server")
    env = {
        "NANOMORPH_MAX_UPLOAD_MB": str(UPLOAD_LIMIT_MB),
        "NANOMORPH_MAX_PIXELS": str(4096 * 4096),
        # Gather concurrent requests for a moment so that the tiny models (sub-millisecond) batch.
        "NANOMORPH_BATCH_WAIT_MS": "100",
        "NANOMORPH_MAX_BATCH_SIZE": "16",
        "NANOMORPH_MAX_REQUEST_MB": "1",
    }
    srv = start_server(work, store=tiny_store[0], env=env)
    try:
        yield srv
    finally:
        srv.stop()
