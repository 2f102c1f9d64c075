"""Normalisation, resizing and the JSON-able Contract: the numeric half of the preprocessing contract."""

from __future__ import annotations

import json

import numpy as np
import pytest

from nanomorph.contract import Contract, normalise, resize, to_model_input

RNG = np.random.default_rng(1)


def test_normalise_maps_to_unit_range_with_percentile_clip() -> None:
    img = RNG.normal(5000.0, 200.0, size=(64, 64)).astype(np.float32)
    img[0, 0] = 1e9  # one hot pixel (a cosmic ray) must not squash the rest of the image
    out = normalise(img, Contract(p_low=1.0, p_high=99.0))
    assert out.dtype == np.float32 and out.shape == img.shape
    assert out.min() == 0.0 and out.max() == 1.0
    assert out[0, 0] == 1.0
    lo, hi = np.percentile(img, [1.0, 99.0])
    assert np.mean(out == 0.0) == pytest.approx(np.mean(img <= lo), abs=1e-3)
    assert np.mean(out == 1.0) == pytest.approx(np.mean(img >= hi), abs=1e-3)
    assert 0.3 < float(np.median(out)) < 0.7  # the bulk keeps its contrast


def test_normalise_is_linear_between_the_percentiles_and_accepts_integers() -> None:
    img = np.arange(101, dtype=np.uint16).reshape(1, 101).repeat(3, axis=0)
    out = normalise(img, Contract(p_low=0.0, p_high=100.0))
    np.testing.assert_allclose(out[0], np.linspace(0.0, 1.0, 101), atol=1e-6)


def test_constant_and_nearly_constant_images() -> None:
    const = normalise(np.full((16, 16), 7.0, np.float32))
    np.testing.assert_array_equal(const, np.full((16, 16), 0.5, np.float32))
    nearly = np.zeros((32, 32), np.float32)
    nearly[5, 5] = 3.0  # percentiles coincide; min/max still gives a finite, useful result
    out = normalise(nearly)
    assert np.isfinite(out).all() and out[5, 5] == 1.0 and out[0, 0] == 0.0


def test_normalise_rejects_non_2d_and_non_finite() -> None:
    with pytest.raises(ValueError, match="2-D"):
        normalise(np.zeros((2, 8, 8), np.float32))
    bad = np.zeros((8, 8), np.float32)
    bad[1, 1] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        normalise(bad)


@pytest.mark.parametrize(
    ("shape", "size", "expected"),
    [((64, 48), 32, (32, 32)), ((20, 30), (45, 60), (45, 60)), ((33, 33), (8, 100), (8, 100))],
)
def test_resize_shapes(
    shape: tuple[int, int], size: int | tuple[int, int], expected: tuple[int, int]
) -> None:
    img = RNG.random(shape).astype(np.float32)
    out = resize(img, size)
    assert out.shape == expected and out.dtype == np.float32
    assert img.min() - 1e-6 <= out.min() and out.max() <= img.max() + 1e-6  # bilinear never overshoots


def test_resize_keeps_constants_and_copies_on_identity() -> None:
    const = np.full((40, 60), 0.25, np.float32)
    np.testing.assert_allclose(resize(const, 17), 0.25, atol=1e-6)
    img = RNG.random((16, 16)).astype(np.float32)
    same = resize(img, 16)
    np.testing.assert_array_equal(same, img)
    same[0, 0] = -1.0
    assert img[0, 0] != -1.0  # a copy, never a view the caller could corrupt


def test_to_model_input_shape_and_range() -> None:
    img = RNG.normal(100.0, 10.0, size=(50, 70)).astype(np.float32)
    x = to_model_input(img, Contract(image_size=32))
    assert x.shape == (1, 32, 32) and x.dtype == np.float32
    assert x.min() >= 0.0 and x.max() <= 1.0


def test_contract_json_round_trip() -> None:
    contract = Contract(image_size=128, p_low=1.0, p_high=99.0, tile_size=512, tile_overlap=32)
    text = contract.to_json()
    assert json.loads(text)["image_size"] == 128
    assert Contract.from_json(text) == contract
    assert Contract.from_dict(contract.to_dict()) == contract
    assert Contract.from_dict({}) == Contract()  # every field has a default


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"in_chans": 3}, "in_chans"),
        ({"image_size": 4}, "image_size"),
        ({"p_low": 50.0, "p_high": 50.0}, "p_low"),
        ({"p_high": 101.0}, "p_low"),
        ({"tile_size": 100}, "multiple of 32"),
        ({"tile_size": 64, "tile_overlap": 64}, "tile_overlap"),
    ],
)
def test_contract_validation(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Contract(**kwargs)


def test_contract_from_a_newer_nanomorph_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown contract keys"):
        Contract.from_dict({"image_size": 224, "colour_space": "lab"})
    with pytest.raises(ValueError, match="newer"):
        Contract.from_json(json.dumps({"version": 99}))
