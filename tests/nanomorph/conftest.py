"""Fixtures shared by the client and pipeline tests: a tiny model store and one real server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures.server import Server, start_server
from tests.fixtures.tiny_models import build_tiny_store


@pytest.fixture(scope="session")
def nm_store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """A folder store with the tiny embed/classify/segment models: ``(root, {task: tag})``."""
    root = tmp_path_factory.mktemp("nm_store")
    return root, build_tiny_store(root)


@pytest.fixture(scope="session")
def nm_server(
    tmp_path_factory: pytest.TempPathFactory, nm_store: tuple[Path, dict[str, str]]
) -> Iterator[Server]:
    """One real server (``nanomorph serve`` on the tiny store) for the client and pipeline tests."""
    srv = start_server(tmp_path_factory.mktemp("nm_server"), store=nm_store[0])
    try:
        yield srv
    finally:
        srv.stop()
