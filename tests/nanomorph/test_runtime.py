"""onnxruntime sessions and the task helpers on the tiny stored models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from nanomorph.contract import to_model_input
from nanomorph.runtime import (
    CPU,
    CUDA,
    Classifier,
    Embedder,
    OnnxModel,
    Segmenter,
    default_providers,
    model_file,
)
from nanomorph.store import StoredModel, resolve
from tests.fixtures.tiny_models import expected_class


def _speck(bright_background: bool, shape: tuple[int, int] = (48, 40)) -> np.ndarray:
    img = np.zeros(shape, dtype=np.float32)
    img[10:16, 10:16] = 200.0
    return 200.0 - img if bright_background else img


def test_providers(monkeypatch: pytest.MonkeyPatch, tiny_store: tuple[Path, dict[str, str]]) -> None:
    root, tags = tiny_store
    monkeypatch.delenv("NANOMORPH_PROVIDERS", raising=False)
    assert default_providers()[-1] == "CPUExecutionProvider"
    monkeypatch.setenv("NANOMORPH_PROVIDERS", "CPUExecutionProvider")
    model = OnnxModel(resolve(tags["embed"], root))
    assert model.providers == ["CPUExecutionProvider"]
    monkeypatch.setenv("NANOMORPH_PROVIDERS", "NoSuchExecutionProvider")
    with pytest.raises(ValueError, match="NoSuchExecutionProvider"):
        default_providers()


def test_model_file_picks_the_precision(tmp_path: Path) -> None:
    def stored(files: list[str], kept: bool | None) -> StoredModel:
        manifest = {
            "files": dict.fromkeys(files, "0"),
            "quantization": None if kept is None else {"kept": kept},
        }
        return StoredModel("t-segment:1", "segment", tmp_path, tmp_path / "model.onnx", manifest, {})

    both = stored(["model.onnx", "model.int8.onnx"], kept=True)
    assert model_file(both, [CPU]) == (tmp_path / "model.int8.onnx", "int8")
    assert model_file(both, [CUDA, CPU]) == (tmp_path / "model.onnx", "fp32")  # fp32 on the GPU
    assert model_file(both, [CPU], "fp32") == (tmp_path / "model.onnx", "fp32")
    for only_fp32 in (stored(["model.onnx"], None), stored(["model.onnx"], kept=False)):
        assert model_file(only_fp32, [CPU]) == (tmp_path / "model.onnx", "fp32")
    # Exported before both files were kept: a kept int8 model is its only model.onnx.
    assert model_file(stored(["model.onnx"], kept=True), [CUDA, CPU], "fp32")[1] == "int8"
    with pytest.raises(ValueError, match="int4"):
        model_file(both, [CPU], "int4")


def test_precision_setting(monkeypatch: pytest.MonkeyPatch, tiny_store: tuple[Path, dict[str, str]]) -> None:
    root, tags = tiny_store
    monkeypatch.setenv("NANOMORPH_PRECISION", "fp32")
    assert OnnxModel(resolve(tags["segment"], root), providers=[CPU]).precision == "fp32"
    monkeypatch.setenv("NANOMORPH_PRECISION", "bf16")
    with pytest.raises(ValueError, match="NANOMORPH_PRECISION"):
        OnnxModel(resolve(tags["segment"], root), providers=[CPU])


def test_onnx_model_run_dynamic_batch(tiny_store: tuple[Path, dict[str, str]]) -> None:
    root, tags = tiny_store
    model = OnnxModel(root / "nanomorph-classify" / "1")  # a folder path works too
    for n in (1, 7):
        out = model.run(np.random.default_rng(n).random((n, 1, 32, 32), dtype=np.float32))
        assert out["probabilities"].shape == (n, 4) and out["embedding"].shape == (n, 4)
        np.testing.assert_allclose(out["probabilities"].sum(axis=1), 1.0, atol=1e-5)
        np.testing.assert_allclose(np.linalg.norm(out["embedding"], axis=1), 1.0, atol=1e-5)
    with pytest.raises(ValueError, match=r"\(N, 1, H, W\)"):
        model.run(np.zeros((2, 32, 32), dtype=np.float32))


def test_classifier_labels_and_ood(tiny_store: tuple[Path, dict[str, str]]) -> None:
    root, tags = tiny_store
    clf = Classifier(resolve(tags["classify"], root), batch_size=2)
    dark, bright = _speck(False), _speck(True)
    flat = np.full((30, 30), 7.0, dtype=np.float32)  # no contrast: normalises to 0.5 everywhere
    results = clf.predict([dark, bright, flat, dark])
    assert [r["label"] for r in results] == ["singular", "network", "dispersed", "singular"]
    assert expected_class(float(to_model_input(dark, clf.contract).mean())) == 0
    for r in results:
        assert set(r["probabilities"]) == {"singular", "dispersed", "bundle", "network"}
        assert r["confidence"] == pytest.approx(max(r["probabilities"].values()))
        assert r["embedding"].shape == (4,)
    assert results[0]["confidence"] > 0.9
    # A flat image is far from every class centroid: flagged out-of-distribution.
    assert [r["ood_flag"] for r in results] == [False, False, True, False]
    assert results[2]["ood_score"] > 0.1 > results[0]["ood_score"]
    assert clf.predict([]) == []


def test_embedder(tiny_store: tuple[Path, dict[str, str]]) -> None:
    root, tags = tiny_store
    emb = Embedder(resolve(tags["embed"], root)).embed([_speck(False), _speck(True), _speck(False)])
    assert emb.shape == (3, 4) and emb.dtype == np.float32
    np.testing.assert_allclose(emb[0], emb[2])
    assert float(emb[0] @ emb[1]) < 0.99
    # The classify model's embedding output is the same features.
    emb2 = Embedder(resolve(tags["classify"], root)).embed([_speck(False)])
    np.testing.assert_allclose(emb2[0], emb[0], atol=1e-6)


@pytest.mark.parametrize("shape", [(40, 50), (150, 130)])
def test_segmenter_any_size(tiny_store: tuple[Path, dict[str, str]], shape: tuple[int, int]) -> None:
    root, tags = tiny_store
    seg = Segmenter(resolve(tags["segment"], root), batch_size=3)
    img = np.zeros(shape, dtype=np.float32)
    img[:, 20:26] = 5.0  # a vertical bright "wire"
    out = seg.predict(img)
    assert out["mask"].shape == shape and out["mask"].dtype == np.uint8
    assert out["probabilities"].shape == (2, *shape)
    expected = (img > 2.5).astype(np.uint8)
    assert (out["mask"] == expected).mean() == 1.0
    np.testing.assert_allclose(out["probabilities"].sum(axis=0), 1.0, atol=1e-4)


def test_task_mismatch(tiny_store: tuple[Path, dict[str, str]]) -> None:
    root, tags = tiny_store
    with pytest.raises(ValueError, match="not segment"):
        Segmenter(resolve(tags["classify"], root))
    with pytest.raises(ValueError, match="not classify"):
        Classifier(resolve(tags["embed"], root))


def test_segmenter_large_tiles_and_mask_only_path_agree(tiny_store: tuple[Path, dict[str, str]]) -> None:
    root, tags = tiny_store
    stored = resolve(tags["segment"], root)
    img = np.random.default_rng(0).normal(100.0, 20.0, (700, 530)).astype(np.float32)
    img[:, 200:230] += 200.0  # a bright "wire"
    small = Segmenter(stored, max_tile=64)  # the training tile: 64 px
    large = Segmenter(stored)  # the contract's CPU inference tile
    assert small.tile_geometry(img.shape)[0] == 64
    side, overlap = large.tile_geometry(img.shape)
    assert side > 64 and side % 32 == 0 and overlap == stored.contract.tile_overlap
    ref = small.predict(img)
    # The tiny model is per-pixel, so any tiling must give the same mask and probabilities.
    np.testing.assert_array_equal(large.mask(img), ref["mask"])
    np.testing.assert_allclose(large.probabilities(img), ref["probabilities"], atol=1e-5)
    np.testing.assert_array_equal(small.mask(img), ref["mask"])


def test_segmenter_mask_memory_is_bounded(tiny_store: tuple[Path, dict[str, str]]) -> None:
    """Predictions are blended as they arrive: no stack of tile probabilities, no full-frame
    float64 accumulator (~60 bytes per pixel before). numpy's allocations are traced by tracemalloc."""
    import tracemalloc

    root, tags = tiny_store
    seg = Segmenter(resolve(tags["segment"], root), max_tile=64)
    img = np.random.default_rng(1).random((1536, 1536), dtype=np.float32)
    tracemalloc.start()
    try:
        seg.mask(img)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    per_pixel = peak / img.size
    assert per_pixel < 16, f"peak {per_pixel:.1f} bytes per pixel"
