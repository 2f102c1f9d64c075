"""Tiling large frames and stitching per-tile predictions back."""

from __future__ import annotations

import time

import numpy as np
import pytest

from nanomorph.contract import (
    Stitcher,
    blend_window,
    choose_tile,
    n_tiles,
    tile,
    tile_chunks,
    tile_positions,
    untile,
)

RNG = np.random.default_rng(2)


def _covered(shape: tuple[int, int], positions: list[tuple[int, int]], tile_size: int) -> np.ndarray:
    cover = np.zeros((max(shape[0], tile_size), max(shape[1], tile_size)), dtype=np.int32)
    for y, x in positions:
        cover[y : y + tile_size, x : x + tile_size] += 1
    return cover[: shape[0], : shape[1]]


@pytest.mark.parametrize(
    ("shape", "tile_size", "overlap"),
    [
        ((40, 50), 64, 16),  # smaller than a tile: padded, then cropped back
        ((64, 64), 64, 16),  # exactly one tile
        ((100, 130), 64, 16),  # not a multiple of the stride
        ((1, 200), 64, 16),  # a single row
        ((300, 257), 64, 0),  # no overlap
        ((97, 500), 96, 95),  # stride 1 along neither edge multiple
    ],
)
def test_identity_predictions_stitch_back_to_the_image(
    shape: tuple[int, int], tile_size: int, overlap: int
) -> None:
    img = RNG.normal(0.0, 1000.0, size=shape).astype(np.float32)
    tiles, positions, padded = tile(img, tile_size, overlap)
    assert tiles.shape == (len(positions), tile_size, tile_size)
    assert padded == (max(shape[0], tile_size), max(shape[1], tile_size))
    assert (_covered(shape, positions, tile_size) >= 1).all()  # every pixel is predicted
    out = untile(tiles[:, None], positions, shape, tile_size)
    assert out.shape == (1, *shape) and out.dtype == np.float32
    # Accumulated in float64, so identical predictions stitch back bit for bit.
    np.testing.assert_array_equal(out[0], img)


def test_large_frame_is_fast_and_exact_with_channels() -> None:
    img = RNG.random((2048, 2048)).astype(np.float32)
    start = time.perf_counter()
    tiles, positions, _ = tile(img, 256, 64)
    two_channels = np.stack([tiles, 1.0 - tiles], axis=1)  # e.g. (background, particle) probabilities
    out = untile(two_channels, positions, img.shape, 256)
    elapsed = time.perf_counter() - start
    np.testing.assert_array_equal(out[0], img)
    np.testing.assert_allclose(out.sum(axis=0), 1.0, atol=1e-6)  # blending keeps probabilities normalised
    assert elapsed < 10.0, f"tile+untile of 2048x2048 took {elapsed:.1f}s"


def test_channel_first_images_tile_per_channel() -> None:
    img = RNG.random((3, 70, 90)).astype(np.float32)
    tiles, positions, _ = tile(img, 32, 8)
    assert tiles.shape == (len(positions), 3, 32, 32)
    y, x = positions[-1]
    np.testing.assert_array_equal(tiles[-1], img[:, y : y + 32, x : x + 32])
    np.testing.assert_array_equal(untile(tiles, positions, (70, 90), 32), img)


def test_positions_start_at_zero_and_end_on_the_border() -> None:
    positions = tile_positions((100, 130), 64, 16)
    ys, xs = sorted({y for y, _ in positions}), sorted({x for _, x in positions})
    assert ys == [0, 36] and xs == [0, 48, 66]
    assert tile_positions((10, 10), 64, 16) == [(0, 0)]


def test_blend_window_is_centred_positive_and_symmetric() -> None:
    w = blend_window(64)
    assert w.shape == (64, 64) and (w > 0).all()
    assert w[32, 32] > w[0, 0] and w[31:33, 31:33].max() == w.max()
    np.testing.assert_allclose(w, w.T)
    np.testing.assert_allclose(w, w[::-1, ::-1])


def test_bad_arguments_are_value_errors() -> None:
    with pytest.raises(ValueError, match="overlap"):
        tile_positions((100, 100), 64, 64)
    with pytest.raises(ValueError, match="shape"):
        tile(np.zeros((2, 2, 8, 8), np.float32), 4, 1)
    tiles, positions, _ = tile(np.zeros((100, 100), np.float32), 64, 16)
    with pytest.raises(ValueError, match="positions"):
        untile(tiles[:-1, None], positions, (100, 100), 64)
    with pytest.raises(ValueError, match="untile expects"):
        untile(tiles, positions, (100, 100), 64)


@pytest.mark.parametrize(
    ("shape", "tile_size", "overlap", "per_call"), [((300, 257), 64, 16, 5), ((97, 500), 96, 40, 1)]
)
def test_streaming_stitcher_equals_untile_chunk_by_chunk(
    shape: tuple[int, int], tile_size: int, overlap: int, per_call: int
) -> None:
    img = RNG.random(shape).astype(np.float32)
    tiles, positions, _ = tile(img, tile_size, overlap)
    two = np.stack([tiles, 1.0 - tiles], axis=1)
    expected = untile(two, positions, shape, tile_size)
    stitcher = Stitcher(shape, tile_size, keep_probabilities=True)
    seen = 0
    for batch, pos in tile_chunks(img, tile_size, overlap, per_call):
        assert len(pos) <= per_call and batch.shape[1:] == (1, tile_size, tile_size)
        np.testing.assert_array_equal(batch[:, 0], tiles[seen : seen + len(pos)])  # same tiles, same order
        stitcher.add(np.concatenate([batch, 1.0 - batch], axis=1), pos)
        seen += len(pos)
    assert seen == len(positions) == n_tiles(shape, tile_size, overlap)
    mask, probs = stitcher.finish()
    np.testing.assert_array_equal(probs, expected)
    np.testing.assert_array_equal(mask, np.argmax(expected, axis=0))
    # Only one band of tile rows is ever accumulated, whatever the frame's height.
    assert stitcher._weight.shape == (tile_size, max(shape[1], tile_size))


def test_stitcher_refuses_tiles_out_of_order() -> None:
    stitcher = Stitcher((200, 64), 64)
    stitcher.add(np.zeros((2, 2, 64, 64), np.float32), [(0, 0), (48, 0)])
    with pytest.raises(ValueError, match="out of order"):
        stitcher.add(np.zeros((1, 2, 64, 64), np.float32), [(0, 0)])
    with pytest.raises(ValueError, match="without predictions"):
        stitcher.add(np.zeros((1, 2, 64, 64), np.float32), [(136, 0)])
    with pytest.raises(ValueError, match="no tile predictions"):
        Stitcher((10, 10), 32).finish()


def test_choose_tile_computes_the_fewest_pixels() -> None:
    shape = (4096, 4096)
    best = choose_tile(shape, 256, 1024, 64)
    assert best % 32 == 0 and 256 <= best <= 1024
    cost = n_tiles(shape, best, 64) * best**2
    assert all(cost <= n_tiles(shape, s, 64) * s**2 for s in range(256, 1025, 32))
    assert cost < 0.8 * n_tiles(shape, 256, 64) * 256**2  # far less overlap recomputed than 256 px tiles
    assert choose_tile(shape, 256, 256, 64) == 256
    assert n_tiles((100, 130), 64, 16) == len(tile_positions((100, 130), 64, 16))
