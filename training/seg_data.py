"""Paired images and integer masks for segmentation: discovery, checks, splits and random tiles.

Layout (docs/architecture.md §1): ``DATA/images/<stem>.<img>`` and ``DATA/masks/<stem>.png|tif``,
same stem, mask pixel = class index. Images are normalised as whole frames with the preprocessing
contract (``nanomorph.contract.normalise``) and only then cut into tiles, exactly as at inference.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from nanomorph.contract import Contract, list_images, mask_dtype, normalise, peek_shape, read_image

MASK_SUFFIXES = (".png", ".tif", ".tiff")


@dataclass(frozen=True)
class SegPair:
    """One labeled frame: its stem (path below ``images/`` without suffix), image and mask files."""

    stem: str
    image: Path
    mask: Path


def resolve_data_dir(data: str | Path) -> Path:
    """``DATA`` itself when it holds ``images/`` + ``masks/``, else ``DATA/segmentation`` (synth's layout)."""
    data = Path(data)
    if not data.is_dir():
        raise FileNotFoundError(f"--data {data} does not exist or is not a folder")
    for candidate in (data, data / "segmentation"):
        if (candidate / "images").is_dir() and (candidate / "masks").is_dir():
            return candidate
    raise FileNotFoundError(f"--data {data}: expected the folders {data}/images and {data}/masks")


def _by_stem(root: Path, files: list[Path], what: str) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for path in files:
        stem = path.relative_to(root).with_suffix("").as_posix()
        if stem in out:
            raise ValueError(f"two {what} files share the stem {stem!r}: {out[stem]} and {path}")
        out[stem] = path
    return out


def find_pairs(data: str | Path) -> list[SegPair]:
    """Matches ``images/`` and ``masks/`` by stem; any image without mask (or mask without image) is an error.

    Raises:
        FileNotFoundError: missing folders.
        ValueError: an unpaired file (named), duplicate stems, or no pairs at all.
    """
    root = resolve_data_dir(data)
    images = _by_stem(root / "images", list_images(root / "images"), "image")
    mask_files = [p for p in list_images(root / "masks") if p.suffix.lower() in MASK_SUFFIXES]
    masks = _by_stem(root / "masks", mask_files, "mask")
    only_masks = sorted(set(masks) - set(images))
    if only_masks:
        raise ValueError(
            f"mask {masks[only_masks[0]]} has no image {root / 'images' / only_masks[0]}.*"
            + (f" (and {len(only_masks) - 1} more unpaired masks)" if len(only_masks) > 1 else "")
        )
    only_images = sorted(set(images) - set(masks))
    if only_images:
        raise ValueError(
            f"image {images[only_images[0]]} has no mask {root / 'masks' / only_images[0]}.png"
            + (f" (and {len(only_images) - 1} more unpaired images)" if len(only_images) > 1 else "")
        )
    if not images:
        raise ValueError(f"{root}: no image/mask pairs found in images/ and masks/")
    return [SegPair(stem, images[stem], masks[stem]) for stem in sorted(images)]


def classes_from_data(data: str | Path) -> list[str] | None:
    """Class names recorded by ``nanomorph synth`` (``synth.json`` beside or above the folder), if any."""
    root = resolve_data_dir(data)
    for candidate in (root / "synth.json", root.parent / "synth.json"):
        if candidate.is_file():
            try:
                semantic = json.loads(candidate.read_text())["masks"]["semantic"]
                return [semantic[str(i)] for i in range(len(semantic))]
            except (KeyError, ValueError, TypeError):
                return None
    return None


def read_index_image(path: Path, what: str) -> np.ndarray:
    """The raw array of an index image (class mask or instance map; PNG or first TIFF page).

    Not ``read_image``: it converts palette/RGB to grey levels, which would scramble indices.

    Raises:
        ValueError: ``"<what> <path>: ..."`` for colour images and files that do not decode.
    """
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            return np.asarray(tifffile.imread(path, key=0))
        with Image.open(path) as im:
            if im.mode not in ("1", "L", "P", "I", "I;16", "I;16B", "I;16L"):
                raise ValueError(
                    f"{what} {path}: expected a single-channel integer PNG, got mode {im.mode} "
                    "(colour images are not class or instance indices)"
                )
            return np.asarray(im)
    except ValueError:
        raise
    except Exception as exc:
        raise ValueError(f"{what} {path}: cannot decode ({exc})") from exc


def read_mask(path: str | Path, n_classes: int) -> np.ndarray:
    """Reads an integer class mask (PNG or TIFF) and checks every value lies in ``[0, n_classes)``.

    Returns:
        (H, W) uint8 array (uint16 when ``n_classes > 256``).

    Raises:
        ValueError: naming the file, for colour/multi-page masks, non-integer values or values out of range.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"mask {path} does not exist")
    arr = read_index_image(path, "mask")
    if arr.ndim != 2:
        raise ValueError(f"mask {path}: expected one channel (H, W), got shape {arr.shape}")
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise ValueError(f"mask {path}: non-finite values")
    if not np.array_equal(arr, np.round(arr)):
        raise ValueError(f"mask {path}: values must be integer class indices, found fractional values")
    bad = np.unique(arr[(arr < 0) | (arr >= n_classes)])
    if bad.size:
        shown = ", ".join(str(int(v)) for v in bad[:10]) + (" ..." if bad.size > 10 else "")
        raise ValueError(
            f"mask {path}: values {shown} are outside [0, {n_classes}) for {n_classes} classes "
            f"(found values {sorted(int(v) for v in np.unique(arr))[:20]}); check --classes"
        )
    return arr.astype(mask_dtype(n_classes))


def check_pairs(pairs: list[SegPair], n_classes: int) -> None:
    """Reads every mask and checks values and shape against its image's header, before any training.

    A bad mask found after an hour of training would lose the hour; reading masks is cheap.
    """
    for pair in pairs:
        mask = read_mask(pair.mask, n_classes)
        try:
            shape = peek_shape(pair.image)
        except OSError:
            continue  # a header the quick reader does not know; load_pair checks the shape later
        if tuple(shape) != mask.shape:
            raise ValueError(
                f"mask {pair.mask} has shape {mask.shape}, its image {pair.image} {tuple(shape)}"
            )


def load_pair(pair: SegPair, contract: Contract, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """The normalised frame (float32 in [0, 1]) and its checked mask, same (H, W)."""
    raw, _ = read_image(pair.image)
    mask = read_mask(pair.mask, n_classes)
    if raw.shape != mask.shape:
        raise ValueError(f"mask {pair.mask} has shape {mask.shape}, its image {pair.image} {raw.shape}")
    return normalise(raw, contract), mask


@dataclass(frozen=True)
class SegSplit:
    """Indices into the pair list. ``labeled = train + val``; the test split is disjoint from both."""

    train: list[int]
    val: list[int]
    test: list[int]

    def check(self) -> None:
        sets = [set(self.train), set(self.val), set(self.test)]
        # Every accuracy number must come from images that training and model selection never saw.
        assert not sets[0] & sets[1], "train/val overlap"
        assert not sets[0] & sets[2], "train/test overlap"
        assert not sets[1] & sets[2], "val/test overlap"


def split_indices(
    n: int, test_fraction: float, val_fraction: float, labeled: int | str, seed: int
) -> SegSplit:
    """Held-out test split fixed by ``seed``; ``labeled`` images drawn from the rest; validation from those.

    The labeled images are a prefix of one seeded permutation of the non-test images, so for a given
    seed the subsets are nested (K=2 is inside K=4) and identical for every encoder, as a
    label-efficiency study needs.

    Args:
        n: number of image/mask pairs.
        test_fraction: share of the images held out for the final metrics (at least one image).
        val_fraction: share of the labeled images used for model selection (at least one image
            when two or more are labeled; none with a single labeled image).
        labeled: ``"all"`` or the number of labeled images K.
        seed: fixes every choice.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"--test-fraction must be in (0, 1), got {test_fraction}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if n < 2:
        raise ValueError(f"need at least 2 image/mask pairs (one to train, one to test), found {n}")
    perm = [int(i) for i in np.random.default_rng(seed).permutation(n)]
    n_test = min(n - 1, max(1, int(round(n * test_fraction))))
    test, rest = perm[:n_test], perm[n_test:]
    if str(labeled).lower() == "all":
        k = len(rest)
    else:
        k = int(labeled)
        if k < 1:
            raise ValueError(f"--labeled-images must be >= 1 or 'all', got {labeled}")
        if k > len(rest):
            raise ValueError(
                f"--labeled-images {k}: only {len(rest)} of {n} images are left after holding out "
                f"{n_test} for testing"
            )
    chosen = rest[:k]
    n_val = 0 if k < 2 or val_fraction == 0 else min(k - 1, max(1, int(round(k * val_fraction))))
    split = SegSplit(train=sorted(chosen[n_val:]), val=sorted(chosen[:n_val]), test=sorted(test))
    split.check()
    return split


def _pad_pair(image: np.ndarray, mask: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    pad_h, pad_w = max(0, size - image.shape[0]), max(0, size - image.shape[1])
    if not (pad_h or pad_w):
        return image, mask
    # Same mirroring for image and mask, so the padded labels stay exact.
    pad = ((0, pad_h), (0, pad_w))
    return np.pad(image, pad, mode="symmetric"), np.pad(mask, pad, mode="symmetric")


class SegTileDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Random ``tile`` x ``tile`` crops of in-memory frames, with the same flips/rot90 on image and mask.

    Item ``i`` is a pure function of ``(seed, i)``, so a resumed run draws the same tiles and the
    dataset works with any number of loader workers. Frames are drawn in proportion to their area.
    With probability ``fg_fraction`` the crop is centred (with jitter) on a random foreground pixel:
    sparse phases (a few thin wires) would otherwise be rare in random tiles of few labeled frames.
    With probability ``invert_fraction`` the tile's intensity is inverted (``1 - x``): where labelled
    frames mix bright-field TEM (dark particles) with dark-field, STEM-HAADF or SEM (bright ones),
    the network then learns the particle's outline rather than "dark is particle".
    """

    def __init__(
        self,
        images: list[np.ndarray],
        masks: list[np.ndarray],
        tile: int,
        length: int,
        seed: int = 0,
        fg_fraction: float = 0.5,
        augment: bool = True,
        invert_fraction: float = 0.0,
    ) -> None:
        if not images or len(images) != len(masks):
            raise ValueError("SegTileDataset needs as many masks as images, and at least one")
        if not 0.0 <= invert_fraction <= 1.0:
            raise ValueError(f"invert_fraction must be in [0, 1], got {invert_fraction}")
        pairs = [_pad_pair(im, m, tile) for im, m in zip(images, masks, strict=True)]
        self.images = [p[0] for p in pairs]
        self.masks = [p[1] for p in pairs]
        self.tile = tile
        self.length = length
        self.seed = seed
        self.fg_fraction = fg_fraction
        self.augment = augment
        self.invert_fraction = invert_fraction
        areas = np.array([m.size for m in self.masks], dtype=np.float64)
        self.weights = areas / areas.sum()
        rng = np.random.default_rng(seed)
        self.fg: list[np.ndarray] = []
        for m in self.masks:
            idx = np.flatnonzero(m.ravel() > 0)
            if idx.size > 100_000:  # a subsample is enough to pick centres, and keeps memory small
                idx = np.sort(rng.choice(idx, 100_000, replace=False))
            self.fg.append(idx)

    def __len__(self) -> int:
        return self.length

    def sample(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """The (image, mask) tile of item ``index`` as numpy arrays."""
        rng = np.random.default_rng([self.seed, index])
        k = int(rng.choice(len(self.images), p=self.weights))
        image, mask, t = self.images[k], self.masks[k], self.tile
        h, w = mask.shape
        if self.fg[k].size and rng.random() < self.fg_fraction:
            cy, cx = divmod(int(self.fg[k][rng.integers(self.fg[k].size)]), w)
            y = cy - t // 2 + int(rng.integers(-t // 4, t // 4 + 1))
            x = cx - t // 2 + int(rng.integers(-t // 4, t // 4 + 1))
            y, x = int(np.clip(y, 0, h - t)), int(np.clip(x, 0, w - t))
        else:
            y, x = int(rng.integers(0, h - t + 1)), int(rng.integers(0, w - t + 1))
        img, msk = image[y : y + t, x : x + t], mask[y : y + t, x : x + t]
        if self.augment:
            # The dihedral group: TEM has no preferred orientation or handedness.
            rot = int(rng.integers(4))
            img, msk = np.rot90(img, rot), np.rot90(msk, rot)
            if rng.random() < 0.5:
                img, msk = img[:, ::-1], msk[:, ::-1]
            if self.invert_fraction and rng.random() < self.invert_fraction:
                img = 1.0 - img  # frames are normalised to [0, 1] by the contract
        return np.ascontiguousarray(img), np.ascontiguousarray(msk)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        img, msk = self.sample(index)
        return torch.from_numpy(img)[None], torch.from_numpy(msk.astype(np.int64))
