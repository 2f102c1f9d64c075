"""Datasets over the folders users bring (docs/architecture.md §1).

* :func:`list_classification` / :class:`LabeledFolder`: ``<class>/`` folders or a ``labels.csv``.
* :class:`UnlabeledFolder`: every supported image under a folder, decoded ONCE through the
  preprocessing contract (``read_image`` + ``normalise``), cached as float32 arrays (in memory,
  bounded; optionally as ``.npy`` files on disk), served as random native-resolution crops, so a
  4k frame is never squashed to the model's input size.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from nanomorph.atomic import atomic_path
from nanomorph.contract import Contract, list_images, normalise, read_image, resize, to_model_input
from nanomorph.contract.structure import structured_tiles, tile_origins

log = logging.getLogger(__name__)

LABELS_CSV = "labels.csv"


def list_classification(root: Path) -> tuple[list[Path], list[int], list[str]]:
    """Lists a labelled classification folder.

    Two layouts (docs/architecture.md §1): ``root/labels.csv`` with columns ``path,label`` (paths
    relative to the csv) wins when present; otherwise every sub-folder of ``root`` is a class and
    holds its images (any depth).

    Args:
        root: the ``classification/`` folder.

    Returns:
        ``(paths, labels, class_names)``: paths sorted within each class, ``labels[i]`` indexes
        ``class_names`` (sorted alphabetically).

    Raises:
        FileNotFoundError: ``root`` or a file listed in ``labels.csv`` does not exist.
        ValueError: no classes / no images / a malformed ``labels.csv`` (the message names it).
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"classification folder {root} does not exist")
    csv_path = root / LABELS_CSV
    pairs: list[tuple[Path, str]] = []
    if csv_path.is_file():
        with open(csv_path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            fields = [f.strip().lower() for f in reader.fieldnames or []]
            if "path" not in fields or "label" not in fields:
                raise ValueError(f"{csv_path}: needs a header with columns 'path,label', got {fields}")
            for line_no, row in enumerate(reader, start=2):
                row = {(k or "").strip().lower(): (v or "").strip() for k, v in row.items()}
                if not row.get("path") and not row.get("label"):
                    continue  # blank line
                if not row.get("path") or not row.get("label"):
                    raise ValueError(f"{csv_path}:{line_no}: empty path or label")
                path = (csv_path.parent / row["path"]).resolve()
                if not path.is_file():
                    raise FileNotFoundError(f"{csv_path}:{line_no}: image {row['path']} does not exist")
                pairs.append((path, row["label"]))
        if not pairs:
            raise ValueError(f"{csv_path}: lists no images")
    else:
        for class_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            pairs += [(path, class_dir.name) for path in list_images(class_dir, recursive=True)]
        if not pairs:
            raise ValueError(
                f"{root}: no images found in <class>/ sub-folders and no {LABELS_CSV}; "
                "expected classification/<class>/*.png or a labels.csv with columns path,label"
            )
    class_names = sorted({label for _, label in pairs})
    index = {name: i for i, name in enumerate(class_names)}
    pairs.sort(key=lambda pl: (index[pl[1]], str(pl[0])))
    return [p for p, _ in pairs], [index[lbl] for _, lbl in pairs], class_names


class ArrayCache:
    """A bounded, thread-safe LRU cache of normalised float32 images, keyed by file, with an
    optional on-disk ``.npy`` layer (memory-mapped when read back).

    Args:
        max_bytes: memory budget; the least recently used arrays are evicted beyond it.
        cache_dir: folder for ``.npy`` files (shared between runs; keys include the file's size,
            mtime and the contract's clip percentiles, so a changed file or contract re-decodes).
    """

    def __init__(self, max_bytes: int = 2 << 30, cache_dir: str | Path | None = None) -> None:
        self.max_bytes = int(max_bytes)
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self._items: OrderedDict[str, np.ndarray] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.decodes = 0  # how many times a file was actually decoded (tests check it is once)

    def _key(self, path: Path, contract: Contract) -> str:
        stat = path.stat()
        raw = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{contract.p_low}|{contract.p_high}"
        return hashlib.sha1(raw.encode()).hexdigest()[:20]

    def get(self, path: Path, contract: Contract) -> np.ndarray:
        key = self._key(path, contract)
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        array = self._load(path, contract, key)
        with self._lock:
            if array.nbytes <= self.max_bytes and key not in self._items:
                self._items[key] = array
                self._bytes += array.nbytes
                while self._bytes > self.max_bytes:
                    _, old = self._items.popitem(last=False)
                    self._bytes -= old.nbytes
        return array

    def _load(self, path: Path, contract: Contract, key: str) -> np.ndarray:
        npy = self.cache_dir / f"{key}.npy" if self.cache_dir else None
        if npy is not None and npy.is_file():
            try:
                return np.load(npy, mmap_mode="r")
            except (OSError, ValueError):
                log.warning("cache file %s is unreadable; decoding %s again", npy, path)
        image, _ = read_image(path)
        array = normalise(image, contract)
        self.decodes += 1
        if npy is not None:
            with atomic_path(npy) as tmp:  # a unique name: loader workers may decode the same file
                np.save(tmp, array)
        return array

    @property
    def nbytes(self) -> int:
        return self._bytes


class UnlabeledFolder(Dataset):
    """Random native-resolution crops from every image under a folder (any depth).

    Each item is a float32 tensor ``(1, crop_size, crop_size)`` in [0, 1]. Frames larger than
    ``crop_size`` give a random crop (never a squash); an image smaller than ``crop_size`` along
    a side is first resized up (with :func:`nanomorph.contract.resize`, keeping its aspect) until
    it covers the crop. Augmentations run later, on whole batches (:mod:`training.augment`).

    Args:
        root: the folder.
        crop_size: side of the crops.
        contract: the preprocessing contract (clip percentiles).
        crops_per_image: items per image per epoch (more for a few large frames).
        cache: the decoded-image cache (default: in memory, 2 GiB).
        structured_only: draw crops only where the frame carries structure (outside burned-in
            annotation strips, not near-uniform; :mod:`nanomorph.contract.structure`).
        crop_norm: stretch each crop to its own ``contract.p_low``-``p_high`` percentiles (the
            frame's are used otherwise), so local contrast, not the frame's, is what crops share.

    Raises:
        FileNotFoundError / ValueError: no folder / no supported images in it.
    """

    def __init__(
        self,
        root: str | Path,
        crop_size: int,
        contract: Contract | None = None,
        crops_per_image: int = 1,
        cache: ArrayCache | None = None,
        structured_only: bool = False,
        crop_norm: bool = False,
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"data folder {self.root} does not exist")
        self.files = list_images(self.root, recursive=True)
        if not self.files:
            raise ValueError(f"{self.root}: no supported images found (looked for png/jpg/tif/dm3/dm4/mrc)")
        if crop_size < 8:
            raise ValueError(f"crop size must be >= 8, got {crop_size}")
        if crops_per_image < 1:
            raise ValueError(f"crops_per_image must be >= 1, got {crops_per_image}")
        self.crop_size = int(crop_size)
        self.contract = contract or Contract()
        self.crops_per_image = int(crops_per_image)
        self.cache = cache or ArrayCache()
        self.bad_files: list[str] = []
        self.structured_only = bool(structured_only)
        self.crop_norm = bool(crop_norm)
        # Per file: the tile origins crops are drawn around (filled by preload when structured_only).
        self.origins: list[np.ndarray] = []
        self.tiles_kept = (0, 0)  # (kept, all) tiles over the folder, for the run's log

    def __len__(self) -> int:
        return len(self.files) * self.crops_per_image

    def preload(self, progress: Callable[..., Any] | None = None) -> int:
        """Decodes every file now (before DataLoader workers fork, so they share the arrays).

        Unreadable files are skipped with a warning and listed in :attr:`bad_files`.
        Returns how many files were loaded.
        """
        good: list[Path] = []
        items: Iterable[Path] = progress(self.files, desc="decode") if progress else self.files
        for path in items:
            try:
                self.cache.get(path, self.contract)
                good.append(path)
            except (ValueError, OSError) as exc:
                log.warning("skipping %s: %s", path, exc)
                self.bad_files.append(str(path))
        if not good:
            raise ValueError(f"{self.root}: none of the {len(self.files)} images could be read")
        self.files = good
        if self.structured_only:
            self._find_structure()
        return len(good)

    def _find_structure(self) -> None:
        """Tile origins (stride half a crop) that carry structure, per file."""
        kept = total = 0
        self.origins = []
        for path in self.files:
            img = self._covering(np.asarray(self.cache.get(path, self.contract)))
            h, w = img.shape
            stride = max(1, self.crop_size // 2)
            total += len(tile_origins(h, w, self.crop_size, stride))
            origins = np.array(structured_tiles(img, self.crop_size, stride), dtype=np.int64)
            kept += len(origins)
            self.origins.append(origins)
        self.tiles_kept = (kept, total)

    def image(self, index: int) -> np.ndarray:
        """The cached normalised image behind item ``index``."""
        return self.cache.get(self.files[index // self.crops_per_image], self.contract)

    def _covering(self, img: np.ndarray) -> np.ndarray:
        """``img`` resized up (aspect kept) when a side is shorter than the crop."""
        c = self.crop_size
        h, w = img.shape
        if h < c or w < c:
            scale = c / min(h, w)
            img = resize(np.asarray(img), (max(c, round(h * scale)), max(c, round(w * scale))))
        return img

    def __getitem__(self, index: int) -> torch.Tensor:
        img = self._covering(self.image(index))
        c = self.crop_size
        h, w = img.shape
        # torch's RNG: seeded per DataLoader worker and saved in checkpoints.
        if self.origins:
            # A structured tile, shifted by up to half a stride so crops are not on a fixed grid.
            origins = self.origins[index // self.crops_per_image]
            y, x = (int(v) for v in origins[int(torch.randint(0, len(origins), (1,)))])
            # Clipped to the span of the kept tiles, so a shift never reaches an annotation strip.
            jitter = max(1, c // 4)
            lo, hi = origins.min(axis=0), origins.max(axis=0)
            y = int(np.clip(y + int(torch.randint(-jitter, jitter + 1, (1,))), lo[0], hi[0]))
            x = int(np.clip(x + int(torch.randint(-jitter, jitter + 1, (1,))), lo[1], hi[1]))
        else:
            y = int(torch.randint(0, h - c + 1, (1,)))
            x = int(torch.randint(0, w - c + 1, (1,)))
        crop = np.array(img[y : y + c, x : x + c], dtype=np.float32)
        if self.crop_norm:
            crop = normalise(crop, self.contract)
        return torch.from_numpy(crop)[None]


class LabeledFolder(Dataset):
    """Labelled images (see :func:`list_classification`) as whole images resized to ``image_size``
    with :func:`nanomorph.contract.to_model_input` (the exact serving preprocessing).

    Items are ``(tensor (1, S, S), label)``; decoded inputs are cached in memory.

    Args:
        root: the classification folder, or pass ``paths``/``labels``/``class_names`` directly.
        image_size: model input side.
        contract: preprocessing contract (its ``image_size`` is replaced by ``image_size``).
        transform: optional callable on the ``(1, S, S)`` tensor (training augmentation).
    """

    def __init__(
        self,
        root: str | Path | None = None,
        image_size: int = 224,
        contract: Contract | None = None,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        paths: list[Path] | None = None,
        labels: list[int] | None = None,
        class_names: list[str] | None = None,
    ) -> None:
        if paths is None:
            if root is None:
                raise ValueError("LabeledFolder needs root or paths")
            paths, labels, class_names = list_classification(Path(root))
        self.paths = list(paths)
        self.labels = list(labels or [])
        if len(self.labels) != len(self.paths):
            raise ValueError("paths and labels differ in length")
        self.class_names = list(class_names or sorted({str(lbl) for lbl in self.labels}))
        base = contract or Contract()
        self.contract = Contract.from_dict({**base.to_dict(), "image_size": int(image_size)})
        self.transform = transform
        self._cache: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.paths)

    def array(self, index: int) -> np.ndarray:
        if index not in self._cache:
            image, _ = read_image(self.paths[index])
            self._cache[index] = to_model_input(image, self.contract)
        return self._cache[index]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        x = torch.from_numpy(self.array(index).copy())
        if self.transform is not None:
            x = self.transform(x)
        return x, self.labels[index]

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All images as one ``(N, 1, S, S)`` tensor and the labels as ``(N,)`` (no transform)."""
        xs = torch.stack([torch.from_numpy(np.array(self.array(i))) for i in range(len(self))])
        return xs, torch.tensor(self.labels, dtype=torch.long)
