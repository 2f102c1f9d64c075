"""Normalisation and resizing: the numeric half of the preprocessing contract.

Training and serving both call these functions, with parameters from one :class:`Contract`
recorded in the run and in the exported ONNX file, so the two can never drift apart.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import numpy as np
from PIL import Image

CONTRACT_VERSION = 1
CLS_AGGREGATES = ("mean",)

#: Segmentation inference tile per provider when a model's contract records none (0). Measured on
#: the default U-Net (resnet18) on 2 CPU cores: ~1.2 us/px on 256 px tiles, ~1.0 on 512-1024, so
#: the gain is in recomputing less overlap; 768 keeps one call's activations modest. A GPU wants
#: large calls. See docs/benchmarks.md (large frames).
DEFAULT_INFER_TILE = {"cpu": 768, "cuda": 1024}


@dataclass(frozen=True)
class Contract:
    """Preprocessing parameters, JSON-able.

    Attributes:
        in_chans: channels the model takes (always 1: TEM is grayscale).
        image_size: side of the square input of ``embed`` / ``classify`` models.
        p_low: lower percentile of the robust intensity clip.
        p_high: upper percentile of the robust intensity clip.
        tile_size: side of the tiles ``segment`` models run on (multiple of 32).
        tile_overlap: overlap of neighbouring tiles in pixels.
        cls_tile: classification at the encoder's scale: side (native pixels) of the tiles a
            frame larger than this is cut into before each tile is resized to ``image_size``;
            0 = the whole frame is resized to ``image_size`` (see :mod:`nanomorph.contract.frames`).
        cls_stride: native pixels between neighbouring classification tiles; 0 = ``cls_tile``.
        cls_pixel_size: nm per native pixel at which ``cls_tile`` was defined; when > 0 and an
            image's pixel size is known, its tiles span the same nm (resampled to the encoder's
            nm per model pixel); 0 = tiles are ``cls_tile`` pixels whatever the calibration.
        cls_aggregate: how tile probabilities make the frame's (``mean``).
        cls_min_std: tiles whose normalised intensity std is below this carry no structure and
            are left out of training and of the frame's aggregate (0 = every tile counts).
        infer_tile_cpu: largest tile side ``segment`` inference uses on the CPU provider (0: not
            recorded, :data:`DEFAULT_INFER_TILE`). The U-Net is fully convolutional, so inference tiles may be
            larger than training tiles: less of each frame is recomputed in overlaps.
        infer_tile_cuda: the same on CUDA (a GPU wants larger calls).
    """

    in_chans: int = 1
    image_size: int = 224
    p_low: float = 0.5
    p_high: float = 99.5
    tile_size: int = 256
    tile_overlap: int = 64
    cls_tile: int = 0
    cls_stride: int = 0
    cls_pixel_size: float = 0.0
    cls_aggregate: str = "mean"
    cls_min_std: float = 0.0
    infer_tile_cpu: int = 0
    infer_tile_cuda: int = 0
    version: int = CONTRACT_VERSION

    def __post_init__(self) -> None:
        if self.in_chans != 1:
            raise ValueError("nanomorph models take single-channel images (in_chans=1)")
        if self.image_size < 8:
            raise ValueError(f"image_size must be >= 8, got {self.image_size}")
        if not 0.0 <= self.p_low < self.p_high <= 100.0:
            raise ValueError(f"need 0 <= p_low < p_high <= 100, got {self.p_low}, {self.p_high}")
        if self.tile_size % 32:
            raise ValueError(f"tile_size must be a multiple of 32, got {self.tile_size}")
        if not 0 <= self.tile_overlap < self.tile_size:
            raise ValueError(f"tile_overlap must be in [0, tile_size), got {self.tile_overlap}")
        if self.cls_tile and self.cls_tile < 8:
            raise ValueError(f"cls_tile must be 0 (whole frame) or >= 8 pixels, got {self.cls_tile}")
        if self.cls_stride < 0 or self.cls_stride > max(self.cls_tile, 0):
            raise ValueError(f"cls_stride must be in [0, cls_tile], got {self.cls_stride}")
        if not (self.cls_pixel_size >= 0 and math.isfinite(self.cls_pixel_size)):
            raise ValueError(f"cls_pixel_size must be >= 0 nm/px, got {self.cls_pixel_size}")
        if self.cls_aggregate not in CLS_AGGREGATES:
            raise ValueError(f"cls_aggregate must be one of {CLS_AGGREGATES}, got {self.cls_aggregate!r}")
        if not 0.0 <= self.cls_min_std < 1.0:
            raise ValueError(f"cls_min_std must be in [0, 1), got {self.cls_min_std}")
        for name in ("infer_tile_cpu", "infer_tile_cuda"):
            side = getattr(self, name)
            if side and (side % 32 or side < self.tile_size):
                raise ValueError(f"{name} must be 0 or a multiple of 32 >= tile_size, got {side}")

    @property
    def cls_tiling(self) -> bool:
        """True when large frames are classified as tiles at the encoder's scale."""
        return self.cls_tile > 0

    @property
    def cls_scale(self) -> float:
        """Native pixels per model pixel of a classification tile (0 without tiling)."""
        return self.cls_tile / self.image_size if self.cls_tile else 0.0

    def infer_tile(self, provider: str) -> int:
        """Largest segmentation inference tile on ``provider`` ("cpu" or "cuda"): the recorded one,
        else :data:`DEFAULT_INFER_TILE` (never below the training tile)."""
        side = self.infer_tile_cuda if provider == "cuda" else self.infer_tile_cpu
        return max(self.tile_size, side or DEFAULT_INFER_TILE["cuda" if provider == "cuda" else "cpu"])

    def with_infer_tiles(self) -> Contract:
        """This contract with both inference tiles recorded (what export writes into the model)."""
        return replace(
            self,
            infer_tile_cpu=self.infer_tile("cpu"),
            infer_tile_cuda=self.infer_tile("cuda"),
        )

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        # Unrecorded inference tiles stay out, so such contracts read as before in older versions.
        for name in ("infer_tile_cpu", "infer_tile_cuda"):
            if not data[name]:
                del data[name]
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Contract:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(
                f"unknown contract keys {sorted(unknown)}; was the model made by a newer nanomorph?"
            )
        if int(data.get("version", CONTRACT_VERSION)) > CONTRACT_VERSION:
            raise ValueError(f"contract version {data['version']} is newer than this nanomorph understands")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> Contract:
        return cls.from_dict(json.loads(text))


def normalise(image: np.ndarray, contract: Contract | None = None) -> np.ndarray:
    """Robust intensity normalisation to [0, 1].

    Clips to the ``[p_low, p_high]`` percentiles of the image and rescales. A constant image
    (no contrast at all) maps to 0.5 everywhere, never NaN. Non-finite pixels must have been
    handled by :func:`nanomorph.contract.read_image`; any left are an error.

    Args:
        image: 2-D array of any real dtype.
        contract: parameters; the defaults when None.

    Returns:
        float32 array of the same shape with values in [0, 1].
    """
    contract = contract or Contract()
    img = np.asarray(image, dtype=np.float32)
    if img.ndim != 2:
        raise ValueError(f"normalise expects a 2-D image, got shape {img.shape}")
    if not np.isfinite(img).all():
        raise ValueError("image has non-finite pixels; read it with nanomorph.contract.read_image")
    lo, hi = np.percentile(img, [contract.p_low, contract.p_high])
    if not hi > lo:
        # Percentiles can coincide on images that are constant but for a few pixels: fall back to min/max.
        lo, hi = float(img.min()), float(img.max())
        if not hi > lo:
            return np.full(img.shape, 0.5, dtype=np.float32)
    span = float(hi) - float(lo)
    if span > float(np.finfo(np.float32).max):
        # Values near +-3.4e38: hi - lo overflows float32 (inf / inf = NaN), so rescale in float64.
        out = ((img.astype(np.float64) - float(lo)) / span).astype(np.float32)
    else:
        out = (img - np.float32(lo)) / np.float32(span)
    return np.clip(out, 0.0, 1.0, out=out).astype(np.float32, copy=False)


def resize(image: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Resizes a 2-D float image to ``size`` (side or ``(height, width)``).

    Pillow's bilinear filter on 32-bit float images (mode ``F``), which antialiases when
    shrinking. This is the one resize used in training and serving.
    """
    height, width = (size, size) if isinstance(size, int) else size
    img = np.asarray(image, dtype=np.float32)
    if img.shape == (height, width):
        return img.copy()
    resized = Image.fromarray(img, mode="F").resize((width, height), Image.Resampling.BILINEAR)
    return np.asarray(resized, dtype=np.float32)


def to_model_input(image: np.ndarray, contract: Contract | None = None) -> np.ndarray:
    """Normalises a raw 2-D image and resizes it to the model's square input: float32 (1, S, S)."""
    contract = contract or Contract()
    normalised = normalise(image, contract)
    return resize(normalised, contract.image_size)[None, :, :]
