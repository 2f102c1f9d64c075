"""Instance-aware targets for ``finetune-seg``: ``DATA/instances/<stem>.png`` -> a boundary class.

When the data folder has ``instances/`` (uint16 particle ids, 0 = background, same stems as
``masks/``), the U-Net learns one more class, ``boundary`` (the rim of each particle, see
:func:`nanomorph.particles.instance_target`), and the saved segmenter carries the post-processing
parameters (:class:`nanomorph.particles.InstanceParams`) that export writes into the ONNX metadata.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from nanomorph.contract import Contract
from nanomorph.particles import InstanceParams, instance_target
from training.seg_data import SegPair, load_pair, read_index_image, resolve_data_dir

INSTANCE_SUFFIXES = (".png", ".tif", ".tiff")


def instance_file(data: str | Path, pair: SegPair) -> Path | None:
    """``DATA/instances/<stem>.png|tif`` of a pair, None when there is none."""
    folder = resolve_data_dir(data) / "instances"
    for suffix in INSTANCE_SUFFIXES:
        path = folder / f"{pair.stem}{suffix}"
        if path.is_file():
            return path
    return None


def read_instances(path: Path) -> np.ndarray:
    """An instance-id map as int64 (H, W); a ValueError naming the file when it is not one."""
    arr = read_index_image(path, "instance map")
    if arr.ndim != 2 or arr.dtype.kind not in "uib":
        raise ValueError(f"instance map {path}: expected integer ids (H, W), got {arr.dtype} {arr.shape}")
    if arr.dtype.kind == "i" and arr.min() < 0:
        raise ValueError(f"instance map {path}: negative ids")
    return arr.astype(np.int64)


def instance_params(
    cfg: dict[str, Any], data: str | Path, pairs: list[SegPair], n_semantic: int
) -> InstanceParams | None:
    """Instance training settings, or None (``--instances off`` or no ``instances/`` folder).

    Raises:
        ValueError: ``instances/`` exists but a pair has no instance map (named).
    """
    mode = str(cfg["instances"]).lower()  # the default lives in configs/finetune-seg.yaml
    if mode == "off" or not (resolve_data_dir(data) / "instances").is_dir():
        if mode not in ("auto", "off", "on"):
            raise ValueError(f"--instances must be auto, on or off, got {mode!r}")
        if mode == "on":
            raise ValueError(f"--instances on: {resolve_data_dir(data)}/instances does not exist")
        return None
    for pair in pairs:
        if instance_file(data, pair) is None:
            raise ValueError(
                f"image {pair.image} has no instance map {resolve_data_dir(data)}/instances/{pair.stem}.png"
            )
    return InstanceParams(boundary_class=n_semantic)


def target_mask(data: str | Path, pair: SegPair, mask: np.ndarray, inst: InstanceParams | None) -> np.ndarray:
    """The training target of a pair: the class mask, or with ``inst`` the mask with particle rims."""
    if inst is None:
        return mask
    path = instance_file(data, pair)
    assert path is not None  # checked by instance_params
    ids = read_instances(path)
    if ids.shape != mask.shape:
        raise ValueError(f"instance map {path} has shape {ids.shape}, its mask {pair.mask} {mask.shape}")
    return instance_target(ids, mask, inst.boundary_class, inst.boundary_width)


def load_target_pair(
    data: str | Path, pair: SegPair, contract: Contract, n_semantic: int, inst: InstanceParams | None
) -> tuple[np.ndarray, np.ndarray]:
    """``load_pair`` with the instance-aware target."""
    image, mask = load_pair(pair, contract, n_semantic)
    return image, target_mask(data, pair, mask, inst)
