"""Datasets over real folders on disk: class listing, decode-once cache, native-resolution crops."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nanomorph.contract import Contract, normalise, read_image
from training.data import ArrayCache, LabeledFolder, UnlabeledFolder, list_classification


def _png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array.astype(np.uint8)).save(path)
    return path


def _noise(shape: tuple[int, int], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape)


def test_list_classification_from_class_folders(tmp_path: Path) -> None:
    for i in range(3):
        _png(tmp_path / "rods" / f"r{i}.png", _noise((16, 16), i))
    _png(tmp_path / "spheres" / "deep" / "s0.png", _noise((16, 16), 9))
    (tmp_path / "spheres" / "notes.txt").write_text("not an image")
    paths, labels, classes = list_classification(tmp_path)
    assert classes == ["rods", "spheres"]
    assert labels == [0, 0, 0, 1]
    assert [p.name for p in paths] == ["r0.png", "r1.png", "r2.png", "s0.png"]


def test_list_classification_from_labels_csv(tmp_path: Path) -> None:
    _png(tmp_path / "img" / "a.png", _noise((16, 16), 1))
    _png(tmp_path / "img" / "b.png", _noise((16, 16), 2))
    (tmp_path / "labels.csv").write_text("path,label\nimg/b.png,cubes\nimg/a.png,amorphous\n")
    paths, labels, classes = list_classification(tmp_path)
    assert classes == ["amorphous", "cubes"]
    assert [(p.name, lbl) for p, lbl in zip(paths, labels, strict=True)] == [("a.png", 0), ("b.png", 1)]


def test_list_classification_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing"):
        list_classification(tmp_path / "missing")
    with pytest.raises(ValueError, match="no images"):
        list_classification(tmp_path)
    (tmp_path / "labels.csv").write_text("path,label\nnope.png,x\n")
    with pytest.raises(FileNotFoundError, match=r"labels\.csv:2"):
        list_classification(tmp_path)
    (tmp_path / "labels.csv").write_text("file,class\n")
    with pytest.raises(ValueError, match="path,label"):
        list_classification(tmp_path)


def test_labeled_folder_uses_the_contract(tmp_path: Path) -> None:
    _png(tmp_path / "a" / "x.png", _noise((40, 50), 3))
    _png(tmp_path / "b" / "y.png", _noise((40, 50), 4))
    ds = LabeledFolder(tmp_path, image_size=32)
    x, y = ds[1]
    assert x.shape == (1, 32, 32) and x.dtype == torch.float32 and y == 1
    xs, ys = ds.tensors()
    assert xs.shape == (2, 1, 32, 32) and ys.tolist() == [0, 1]


def test_unlabeled_folder_crops_large_frames_at_native_resolution(tmp_path: Path) -> None:
    big = _noise((200, 300), 5)
    path = _png(tmp_path / "deep" / "er" / "frame.png", big)
    ds = UnlabeledFolder(tmp_path, crop_size=32, contract=Contract(image_size=32), crops_per_image=3)
    assert len(ds) == 3
    reference = normalise(read_image(path)[0], Contract())
    torch.manual_seed(0)
    crop = ds[0][0].numpy()
    assert crop.shape == (32, 32)
    # The crop is an exact window of the normalised frame: no resizing of large frames.
    windows = np.lib.stride_tricks.sliding_window_view(reference, (32, 32))
    match = np.isclose(windows, crop, atol=1e-6).all(axis=(2, 3))
    assert match.sum() == 1


def test_unlabeled_folder_resizes_small_images_up(tmp_path: Path) -> None:
    _png(tmp_path / "small.png", _noise((20, 40), 6))
    ds = UnlabeledFolder(tmp_path, crop_size=32)
    item = ds[0]
    assert item.shape == (1, 32, 32)
    assert float(item.min()) >= 0.0 and float(item.max()) <= 1.0


def test_decodes_each_file_once_and_reuses_npy_cache(tmp_path: Path) -> None:
    data = tmp_path / "data"
    for i in range(4):
        _png(data / f"{i}.png", _noise((48, 48), i))
    cache = ArrayCache(max_bytes=1 << 20, cache_dir=tmp_path / "cache")
    ds = UnlabeledFolder(data, crop_size=16, cache=cache)
    for _ in range(3):  # three epochs
        for i in range(len(ds)):
            ds[i]
    assert cache.decodes == 4
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 4
    # A new process (fresh memory cache) reads the .npy files instead of decoding again.
    cache2 = ArrayCache(max_bytes=1 << 20, cache_dir=tmp_path / "cache")
    UnlabeledFolder(data, crop_size=16, cache=cache2).preload()
    assert cache2.decodes == 0


def test_memory_cache_is_bounded(tmp_path: Path) -> None:
    for i in range(4):
        _png(tmp_path / f"{i}.png", _noise((64, 64), i))
    cache = ArrayCache(max_bytes=2 * 64 * 64 * 4)  # room for two images
    UnlabeledFolder(tmp_path, crop_size=16, cache=cache).preload()
    assert cache.nbytes <= 2 * 64 * 64 * 4


def test_unreadable_files_are_skipped_and_empty_folders_rejected(tmp_path: Path) -> None:
    _png(tmp_path / "ok.png", _noise((32, 32), 1))
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    ds = UnlabeledFolder(tmp_path, crop_size=16)
    assert ds.preload() == 1
    assert ds.bad_files and "broken.png" in ds.bad_files[0]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no supported images"):
        UnlabeledFolder(tmp_path / "empty", crop_size=16)


def test_structured_crops_come_from_where_the_frame_has_structure(tmp_path: Path) -> None:
    """Only the top-left quarter holds particles and a text strip closes the frame: every crop
    is drawn from the particles, none from the strip or the empty film."""
    rng = np.random.default_rng(0)
    img = rng.normal(100, 4, (256, 256))
    yy, xx = np.mgrid[:256, :256]
    for _ in range(10):
        cy, cx = rng.uniform(0, 100, 2)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < 64] = 230
    img[-40:] = 0
    img[-30:-20, 10:120] = 255  # the scale bar
    _png(tmp_path / "frame.png", img)
    ds = UnlabeledFolder(tmp_path, crop_size=48, crops_per_image=64, structured_only=True)
    ds.preload()
    kept, total = ds.tiles_kept
    assert 0 < kept < total / 2
    torch.manual_seed(0)
    crops = torch.stack([ds[i] for i in range(len(ds))])
    assert crops.shape == (64, 1, 48, 48)
    # No crop reaches the black strip (value 0 after the percentile clip) ...
    assert bool((crops.flatten(1).min(dim=1).values > 0).all())
    # ... and every crop holds part of a particle (bright pixels).
    assert bool((crops.flatten(1).max(dim=1).values > 0.9).all())


def test_crop_norm_stretches_each_crop_to_its_own_range(tmp_path: Path) -> None:
    """A faint half and a bright half: frame normalisation leaves crops of the faint half dim;
    with crop_norm the same crops span [0, 1] on their own percentiles."""
    rng = np.random.default_rng(0)
    _png(
        tmp_path / "frame.png", np.concatenate([rng.normal(40, 3, (64, 128)), rng.normal(200, 30, (64, 128))])
    )
    framed = UnlabeledFolder(tmp_path, crop_size=32, crops_per_image=32)
    own = UnlabeledFolder(tmp_path, crop_size=32, crops_per_image=32, crop_norm=True)
    framed.preload(), own.preload()
    torch.manual_seed(1)
    by_frame = torch.stack([framed[i] for i in range(32)])
    torch.manual_seed(1)  # the same crop positions
    by_crop = torch.stack([own[i] for i in range(32)])
    faint = by_frame.amax(dim=(1, 2, 3)) < 0.5  # crops wholly inside the faint half
    assert 0 < int(faint.sum()) < 32
    assert bool(
        (by_crop[faint].amin(dim=(1, 2, 3)) == 0).all() and (by_crop[faint].amax(dim=(1, 2, 3)) == 1).all()
    )
