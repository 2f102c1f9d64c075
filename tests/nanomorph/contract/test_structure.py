"""Annotation strips and structure-less tiles are found from the frame itself (numpy only)."""

from __future__ import annotations

import numpy as np

from nanomorph.contract.structure import Bands, annotation_bands, structured_tiles, tile_origins


def _particles(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = rng.normal(0.4, 0.05, (h, w))
    yy, xx = np.mgrid[:h, :w]
    for _ in range(12):
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(6, 14)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = 0.9
    return img.astype(np.float32)


def test_scale_bar_strip_with_text_is_found_at_any_edge() -> None:
    img = _particles(256, 320)
    img[-30:] = 0.0  # a black strip at the bottom ...
    img[-20:-12, 20:90] = 1.0  # ... with a white scale bar
    img[-24:-8, 200:204] = 1.0  # ... and a "text" glyph
    assert annotation_bands(img) == Bands(bottom=30)
    assert annotation_bands(np.rot90(img).copy()) == Bands(right=30)
    assert annotation_bands(img[::-1].copy()) == Bands(top=30)


def test_plain_frames_have_no_bands() -> None:
    assert annotation_bands(_particles(128, 128)) == Bands()
    noise = np.random.default_rng(2).random((100, 100)).astype(np.float32)
    assert annotation_bands(noise) == Bands()


def test_structured_tiles_skip_strips_and_empty_film() -> None:
    img = np.random.default_rng(3).normal(0.4, 0.03, (256, 256)).astype(np.float32)  # empty film
    img[:96, :96] = _particles(96, 96)  # particles only in the top-left corner
    img[-32:] = 1.0  # a white strip at the bottom
    kept = structured_tiles(img, 64, 32)
    assert kept, "some tiles carry structure"
    assert all(y + 64 <= 256 - 32 for y, _ in kept), "no tile reaches into the strip"
    assert all(y < 96 and x < 96 for y, x in kept), "only tiles that overlap the particles"
    assert len(kept) < len(tile_origins(256, 256, 64, 32)) / 2


def test_uniform_frame_falls_back_to_all_tiles() -> None:
    img = np.full((128, 128), 0.5, dtype=np.float32)
    assert structured_tiles(img, 64, 64) == tile_origins(128, 128, 64, 64)


def test_tile_origins_cover_the_frame() -> None:
    origins = tile_origins(100, 130, 64, 32)
    assert max(y for y, _ in origins) == 36 and max(x for _, x in origins) == 66
    assert tile_origins(50, 50, 64, 32) == [(0, 0)]
