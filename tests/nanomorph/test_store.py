"""The model store: folder and BentoML stores, manifests, integrity, `nanomorph models list`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from nanomorph.contract import Contract
from nanomorph.store import (
    IntegrityError,
    list_models,
    load_model_dir,
    make_tag,
    metadata_props,
    read_onnx_metadata,
    resolve,
    save_model,
    split_tag,
)
from tests.fixtures.cli import nanomorph, nanomorph_process
from tests.fixtures.tiny_models import build_tiny_store


@pytest.fixture()
def store(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    root = tmp_path / "store"
    return root, build_tiny_store(root)


def test_folder_store_layout_and_manifest(store: tuple[Path, dict[str, str]]) -> None:
    root, tags = store
    assert tags == {t: f"nanomorph-{t}:1" for t in ("embed", "classify", "segment")}
    folder = root / "nanomorph-classify" / "1"
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "manifest.json", "model.onnx"]
    assert (root / "nanomorph-classify" / "latest").read_text().strip() == "1"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["tag"] == "nanomorph-classify:1" and manifest["task"] == "classify"
    assert len(manifest["files"]["model.onnx"]) == 64  # sha256 hex
    assert manifest["classes"] == ["singular", "dispersed", "bundle", "network"]
    assert manifest["contract"]["image_size"] == 32


def test_metadata_round_trip(store: tuple[Path, dict[str, str]]) -> None:
    root, tags = store
    model = resolve(tags["classify"], root)
    assert model.task == "classify"
    assert model.contract == Contract(image_size=32, tile_size=64, tile_overlap=16)
    assert model.classes == ["singular", "dispersed", "bundle", "network"]
    assert model.metrics == {"accuracy": 1.0, "macro_f1": 1.0}
    assert model.ood is not None and len(model.ood["centroids"]) == 4
    assert model.metadata["encoder"] == {"method": "none", "architecture": "tiny-onnx"}
    assert model.metadata["provenance"]["git_commit"] == "test"
    # The raw props are strings under the nanomorph. prefix, as onnx wrote them.
    raw = read_onnx_metadata(model.onnx_path)
    assert raw["nanomorph.task"] == "classify"
    assert json.loads(raw["nanomorph.contract"])["tile_size"] == 64


def test_resolve_latest_and_new_version(store: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    root, tags = store
    first = resolve("nanomorph-segment", root)
    assert first.tag == "nanomorph-segment:1"
    # A second version becomes latest; the first stays reachable by its tag.
    save_model(first.onnx_path, root, "nanomorph-segment:2", "segment")
    assert resolve("nanomorph-segment:latest", root).version == "2"
    assert resolve("nanomorph-segment:1", root).version == "1"
    with pytest.raises(ValueError, match="never overwritten"):
        save_model(first.onnx_path, root, "nanomorph-segment:2", "segment")
    with pytest.raises(ValueError, match="not 'classify'"):
        save_model(first.onnx_path, root, "nanomorph-classify:9", "classify")
    with pytest.raises(FileNotFoundError, match="nanomorph-segment:7"):
        resolve("nanomorph-segment:7", root)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve("nanomorph-segment", tmp_path / "nowhere")


def test_tampered_model_is_refused(store: tuple[Path, dict[str, str]]) -> None:
    root, tags = store
    path = resolve(tags["classify"], root).onnx_path
    # Change one weight (the first class's bias, -60 * 0.125**2) to another valid float.
    data = path.read_bytes()
    old = np.float32(-0.9375).tobytes()
    assert data.count(old) == 1
    path.write_bytes(data.replace(old, np.float32(5.0).tobytes()))
    with pytest.raises(IntegrityError, match=r"model\.onnx does not match its manifest"):
        resolve(tags["classify"], root)
    # Listing still shows it unless asked to verify, and then it is skipped.
    assert len(list_models(root)) == 3
    assert [m.task for m in list_models(root, verify=True)] == ["embed", "segment"]
    path.unlink()
    with pytest.raises(IntegrityError, match="missing"):
        load_model_dir(path.parent)


def test_tags() -> None:
    assert split_tag("nanomorph-classify") == ("nanomorph-classify", "latest")
    assert make_tag("lab1", "segment", "2026.1") == "lab1-segment:2026.1"
    with pytest.raises(ValueError, match="invalid model version"):
        make_tag("nanomorph", "classify", "bad version")
    with pytest.raises(ValueError, match="unknown task"):
        metadata_props("detect", Contract())


def test_models_list_cli(store: tuple[Path, dict[str, str]]) -> None:
    root, _ = store
    listed = nanomorph("models", "list", "--store", root)
    assert listed.returncode == 0, listed.stderr
    out = listed.stdout
    lines = out.strip().splitlines()
    assert lines[0].split() == ["TAG", "TASK", "CLASSES", "METRICS"]
    row = next(line for line in lines if line.startswith("nanomorph-classify:1"))
    assert "singular,dispersed,bundle,network" in row and "accuracy=1" in row
    js_run = nanomorph("models", "list", "--store", root, "--json")
    assert js_run.returncode == 0, js_run.stderr
    js = js_run.stdout
    assert {json.loads(line)["task"] for line in js.splitlines()} == {"embed", "classify", "segment"}
    bad = nanomorph("models", "list", "--store", root / "nope")
    assert bad.returncode == 2 and "does not exist" in bad.stderr and "Traceback" not in bad.stderr


def test_bentoml_store(tmp_path: Path) -> None:
    """The BentoML store (at $BENTOML_HOME), in a subprocess so the home is fresh."""
    env = {**os.environ, "BENTOML_HOME": str(tmp_path / "bentoml"), "BENTOML_DO_NOT_TRACK": "True"}
    code = (
        "from pathlib import Path; from tests.fixtures.tiny_models import build_tiny_store;"
        f"print(build_tiny_store(Path({str(tmp_path / 'scratch')!r}), store='bentoml'))"
    )
    subprocess.run([sys.executable, "-c", code], env=env, check=True, cwd=Path(__file__).parents[2])
    assert (tmp_path / "bentoml" / "models" / "nanomorph-classify" / "1" / "manifest.json").is_file()
    listed = nanomorph_process(
        "models", "list", "--store", "bentoml", env=env
    )  # BentoML reads its home at import
    assert listed.returncode == 0, listed.stderr
    out = listed.stdout
    assert "nanomorph-segment:1" in out and "background,wire" in out
