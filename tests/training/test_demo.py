"""The default-model pipeline (`nanomorph demo`, run by `make serve` through `nanomorph serve
--build-default`) with tiny settings: every stage runs, the store ends up with the three default
models, and a rerun skips every stage."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from nanomorph.serve import missing_default_models
from nanomorph.store import resolve
from tests.fixtures.cli import nanomorph

TINY = [
    "--n-per-class", "6", "--n-unlabeled", "16", "--size", "64", "--image-size", "32",
    "--pretrain-epochs", "1", "--pretrain-batch-size", "8", "--cls-steps", "4",
    "--seg-tile", "64", "--seg-steps", "3",
]  # fmt: skip


def test_demo_builds_the_default_models_and_a_rerun_skips(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    store = tmp_path / "store"
    assert len(missing_default_models(str(store))) == 3
    out = tmp_path / "demo"
    assert nanomorph("demo", "--out", out, "--store", store, *TINY).returncode == 0

    assert missing_default_models(str(store)) == []
    classify = resolve("nanomorph-classify:latest", store)
    assert classify.classes == ["bundle", "dispersed", "network", "phase_separated", "singular"]
    assert resolve("nanomorph-segment:latest", store).classes == ["background", "wire"]
    assert resolve("nanomorph-embed:latest", store).contract.image_size == 32
    assert json.loads((out / "runs" / "classifier" / "classes.json").read_text()) == classify.classes

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="nanomorph.demo"):
        assert nanomorph("demo", "--out", out, "--store", store, *TINY).returncode == 0
    skipped = [r.getMessage() for r in caplog.records if "skipping" in r.getMessage()]
    assert len(skipped) == 5, skipped  # synth, pretrain, finetune-cls, finetune-seg, export
