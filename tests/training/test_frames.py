"""Frames classified at the encoder's scale: tiles at the pretraining crop size, per-frame labels.

The frames here carry their class only in a 2-pixel pattern (stripes vs speckle): shrunk whole to the model
input the stripes average away (every frame looks alike); cut into native tiles they do not. The
same frame must get the same label and probabilities from the training side (torch), the exported
ONNX model (nanomorph.runtime) and the service's /classify.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from nanomorph.contract import Contract, aggregate_probabilities, frame_tiles, read_image
from tests.training.cls_helpers import one_thread, write_encoder

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

CLASSES = ("speckled", "striped")
FRAME = 160  # native frame side; the encoder's pretraining crop (the tile) is 32 px
CROP = 32


@pytest.fixture(autouse=True, scope="module")
def _torch_one_thread() -> Iterator[None]:
    yield from one_thread()


def stripe_frame(cls: str, rng: np.random.Generator, size: int = FRAME) -> np.ndarray:
    """Stripes of period 2 px (in a random direction) or speckle of the same contrast, under noise
    and a slow illumination ramp: averaged over a few pixels, both are the same flat gray."""
    yy, xx = np.mgrid[:size, :size]
    if cls == "striped":
        pattern = ((yy if rng.integers(2) else xx) + int(rng.integers(2))) % 2
    else:
        pattern = rng.integers(0, 2, (size, size))
    ramp = 20 * np.sin(xx / size * np.pi * rng.uniform(0.5, 2)) + rng.uniform(-15, 15)
    img = 120 + 50 * pattern + ramp + rng.normal(0, 8, pattern.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("frames") / "classification"
    rng = np.random.default_rng(0)
    for cls in CLASSES:
        (root / cls).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(stripe_frame(cls, rng)).save(root / cls / f"{cls}_{i}.png")
    return root


@pytest.fixture(scope="module")
def encoder_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A pretraining run folder: backbone (32-px input) + config.yaml with its 32-px crop size."""
    run = tmp_path_factory.mktemp("pretrain")
    write_encoder(run / "backbone.safetensors", image_size=32)
    (run / "config.yaml").write_text(
        yaml.safe_dump({"command": "pretrain", "crop_size": CROP, "image_size": 32})
    )
    return run


def test_contract_round_trips_the_tiling_and_validates_it() -> None:
    c = Contract(image_size=64, cls_tile=256, cls_stride=128, cls_pixel_size=0.5, cls_min_std=0.02)
    back = Contract.from_json(c.to_json())
    assert back == c and back.cls_tiling and back.cls_scale == 4.0
    assert Contract.from_dict({"image_size": 64}).cls_tile == 0  # contracts written before tiling
    with pytest.raises(ValueError, match="cls_stride"):
        Contract(cls_tile=64, cls_stride=65)
    with pytest.raises(ValueError, match="cls_tile"):
        Contract(cls_tile=4)
    with pytest.raises(ValueError, match="cls_aggregate"):
        Contract(cls_tile=64, cls_aggregate="max")


def test_frame_tiles_geometry_small_frames_and_physical_size() -> None:
    c = Contract(image_size=32, cls_tile=64)
    rng = np.random.default_rng(1)
    big = rng.normal(size=(200, 130)).astype(np.float32)
    ft = frame_tiles(big, c)
    assert ft.tiled and ft.side == 64 and ft.x.shape == (len(ft.boxes), 1, 32, 32)
    covered = np.zeros(big.shape, bool)
    for y, x, h, w in ft.boxes:
        covered[y : y + h, x : x + w] = True
    assert covered.all()
    # A frame no larger than a tile is classified whole, exactly as without tiling.
    small = big[:64, :50]
    from nanomorph.contract import to_model_input

    np.testing.assert_array_equal(frame_tiles(small, c).x[0], to_model_input(small, c))
    assert not frame_tiles(small, c).tiled
    # With the pixel size known, tiles span the same nm: at half the reference nm/px, twice the px.
    cp = Contract(image_size=32, cls_tile=64, cls_pixel_size=1.0)
    assert frame_tiles(big, cp, pixel_size=0.5).side == 128
    assert frame_tiles(big, cp, pixel_size=None).side == 64
    # Flat tiles (no structure) are left out of the aggregate, never all of them.
    flat = big.copy()
    flat[:, :64] = 0.0
    ft = frame_tiles(flat, Contract(image_size=32, cls_tile=64, cls_min_std=0.05))
    assert not ft.keep.all() and ft.keep.any()
    probs = np.tile(np.array([[0.9, 0.1]], np.float32), (len(ft.keep), 1))
    probs[~ft.keep] = [0.0, 1.0]
    np.testing.assert_allclose(aggregate_probabilities(probs, ft.keep), [0.9, 0.1], atol=1e-6)


def test_tiled_frames_train_by_frame_and_agree_across_torch_onnx_and_service(
    data: Path, encoder_run: Path, tmp_path: Path
) -> None:
    import torch

    from tests.fixtures.server import start_server
    from training.export import export_runs
    from training.finetune_cls import train_classifier

    base = {"encoder": str(encoder_run), "data": str(data), "mode": "linear", "labels_per_class": "2",
            "test_fraction": 0.34, "seed": 0}  # fmt: skip
    whole = train_classifier({**base, "cls_tile": 0}, show_progress=False)
    tiled = train_classifier({**base, "out": str(tmp_path / "cls")}, show_progress=False)
    # K counts frames (2 per class, one of them validation); every tile of those frames trains.
    assert (tiled["n_train"], tiled["n_val"], tiled["n_test"]) == (2, 2, 4)
    assert tiled["n_train_inputs"] == 2 * 25 and whole["n_train_inputs"] == 2
    assert "32-px tiles" in tiled["tiling"] and "whole image" in whole["tiling"]
    # The class lives at native scale: tiles see it, the shrunk whole frame cannot.
    assert tiled["balanced_accuracy"] == 1.0
    assert whole["balanced_accuracy"] < 1.0, whole
    from training.backbones import read_metadata

    saved = json.loads(read_metadata(tmp_path / "cls" / "classifier.safetensors")["contract"])
    assert saved["cls_tile"] == CROP and saved["image_size"] == 32

    tags = export_runs(classifier=tmp_path / "cls", store=tmp_path / "store", name="frames")
    from nanomorph.runtime import Classifier as OnnxClassifier
    from nanomorph.store import resolve

    stored = resolve(tags["classify"], tmp_path / "store")
    assert stored.contract.cls_tile == CROP and stored.contract.image_size == 32
    onnx = OnnxClassifier(stored)

    # torch, training side: the saved classifier on the contract's tiles, mean of tile softmaxes.
    from safetensors.torch import load_file

    from training.backbones import create_backbone
    from training.models import Classifier as TorchClassifier

    net = TorchClassifier(create_backbone("test_resnet"), len(CLASSES))
    net.load_state_dict(load_file(str(tmp_path / "cls" / "classifier.safetensors")))
    net.eval()
    paths = sorted(data.rglob("*.png"))[::3]
    images = [read_image(p)[0] for p in paths]
    expected = []
    for im in images:
        ft = frame_tiles(im, stored.contract)
        with torch.no_grad():
            p = torch.softmax(net(torch.from_numpy(ft.x)), dim=1).numpy()
        expected.append(aggregate_probabilities(p, ft.keep))
    results = onnx.predict(images, with_tiles=True)
    for p, r, path in zip(expected, results, paths, strict=True):
        assert r["n_tiles"] == 25 and len(r["tiles"]) == 25
        assert r["label"] == CLASSES[int(np.argmax(p))] == path.parent.name
        np.testing.assert_allclose([r["probabilities"][c] for c in CLASSES], p, atol=1e-4)

    # The service answers exactly what the in-process runtime does.
    import httpx

    with start_server(
        tmp_path / "srv",
        store=tmp_path / "store",
        env={"NANOMORPH_CLASSIFY_MODEL": tags["classify"], "NANOMORPH_REQUIRE_MODELS": "classify"},
        timeout=300,
    ) as srv:  # a loaded shared machine starts it slowly
        files = [("images", (p.name, p.read_bytes(), "image/png")) for p in paths]
        resp = httpx.post(f"{srv.url}/classify", params={"tiles": "true"}, files=files, timeout=60)
        assert resp.status_code == 200, resp.text
        served = resp.json()["results"]
        plain = httpx.post(f"{srv.url}/classify", files=files[:1], timeout=60).json()["results"][0]
    assert plain["tiles"] is None and plain["n_tiles"] == 25
    for s, r in zip(served, results, strict=True):
        assert s["label"] == r["label"] and s["n_tiles"] == 25 and len(s["tiles"]) == 25
        for c in CLASSES:
            assert s["probabilities"][c] == pytest.approx(r["probabilities"][c], abs=1e-6)
        assert [t["box"] for t in s["tiles"]] == [t["box"] for t in r["tiles"]]


def test_study_counts_labeled_frames_and_trains_on_all_their_tiles(
    data: Path, encoder_run: Path, tmp_path: Path
) -> None:
    import csv

    from tests.fixtures.cli import nanomorph

    out = tmp_path / "study"
    code = nanomorph(*["study", "cls", "--data", str(data), "--encoder", f"ssl={encoder_run}",
                     "--encoder", f"again={encoder_run}", "--labels-per-class", "1,2", "--repeats", "1",
                     "--modes", "linear", "--test-fraction", "0.34", "--out", str(out)]).returncode  # fmt: skip
    assert code == 0
    with open(out / "results.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert sorted({r["encoder"] for r in rows}) == ["again", "scratch", "ssl"]
    for r in rows:
        frames = int(r["n_train"]) + int(r["n_val"])
        assert frames == 2 * int(r["labels"]) and int(r["n_test"]) == 4  # K labeled frames per class
        cell = json.loads((out / "cells" / f"{r['encoder']}_linear_{r['labels']}_r0.json").read_text())
        assert cell["n_train_inputs"] == 25 * int(r["n_train"])  # every tile of the train frames
        assert "32-px tiles" in cell["tiling"]  # the scratch baseline sees the encoder's tiling too
    assert "every tile of a labeled image trains" in (out / "summary.md").read_text()
    assert "cls_tiling" in json.loads((out / "study.json").read_text())
