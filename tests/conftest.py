"""Fixtures every test folder shares: the tiny model store and the real servers on it.

The store holds the tiny ONNX ``embed``/``classify``/``segment`` models of
``tests/fixtures/tiny_models.py`` (built once per session, read only). Tests that change a store
build their own with ``build_tiny_store``. Helpers that are not fixtures live in ``tests/fixtures/``:
``cli`` (run the CLI), ``server`` (start a server), ``images`` (test images), ``emfiles``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures.server import Server, start_server
from tests.fixtures.tiny_models import build_tiny_store

#: The ``server`` fixture's upload limit (low, so the oversized-upload test stays small).
UPLOAD_LIMIT_MB = 0.25

#: The ``server`` fixture's environment: low limits, and a batching wait so that concurrent
#: requests to the tiny (sub-millisecond) models are gathered into one batch.
LIMITED_SERVER_ENV = {
    "NANOMORPH_MAX_UPLOAD_MB": str(UPLOAD_LIMIT_MB),
    "NANOMORPH_MAX_PIXELS": str(4096 * 4096),
    "NANOMORPH_BATCH_WAIT_MS": "100",
    "NANOMORPH_MAX_BATCH_SIZE": "16",
    "NANOMORPH_MAX_REQUEST_MB": "1",
}


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """A folder store with the tiny embed/classify/segment models: ``(root, {task: tag})``."""
    root = tmp_path_factory.mktemp("tiny_store")
    return root, build_tiny_store(root)


@pytest.fixture(scope="session")
def server(
    tmp_path_factory: pytest.TempPathFactory, tiny_store: tuple[Path, dict[str, str]]
) -> Iterator[Server]:
    """``nanomorph serve`` on the tiny store with the low limits of :data:`LIMITED_SERVER_ENV`
    (the service tests check those limits)."""
    srv = start_server(tmp_path_factory.mktemp("server"), store=tiny_store[0], env=LIMITED_SERVER_ENV)
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="session")
def default_server(
    tmp_path_factory: pytest.TempPathFactory, tiny_store: tuple[Path, dict[str, str]]
) -> Iterator[Server]:
    """``nanomorph serve`` on the tiny store with the default settings, as users start it (the
    client, pipeline and per-task tests)."""
    srv = start_server(tmp_path_factory.mktemp("default_server"), store=tiny_store[0])
    try:
        yield srv
    finally:
        srv.stop()
