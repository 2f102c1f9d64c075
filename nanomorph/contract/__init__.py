"""The preprocessing contract: decode, normalise, resize, tile. numpy only (no torch).

Training and the service both import this package, and the service rebuilds its preprocessing
from the :class:`Contract` stored inside each exported ONNX file, so the two cannot drift apart.
See docs/architecture.md.
"""

from nanomorph.contract.frames import (
    FrameTiles,
    aggregate_embeddings,
    aggregate_probabilities,
    frame_tiles,
    tile_geometry,
)
from nanomorph.contract.io import (
    COMPANION_SUFFIXES,
    DEFAULT_MAX_PIXELS,
    SUPPORTED_SUFFIXES,
    CorruptImageError,
    EmptyImageError,
    ImageDimensionError,
    ImageMeta,
    ImageReadError,
    ImageTooLargeError,
    NonFiniteImageError,
    UnsupportedFormatError,
    is_companion,
    is_supported,
    list_files,
    list_images,
    peek_shape,
    read_image,
)
from nanomorph.contract.tiling import (
    Stitcher,
    blend_window,
    choose_tile,
    mask_dtype,
    n_tiles,
    tile,
    tile_chunks,
    tile_positions,
    untile,
)
from nanomorph.contract.transform import DEFAULT_INFER_TILE, Contract, normalise, resize, to_model_input

__all__ = [
    "COMPANION_SUFFIXES",
    "DEFAULT_INFER_TILE",
    "DEFAULT_MAX_PIXELS",
    "SUPPORTED_SUFFIXES",
    "Contract",
    "CorruptImageError",
    "EmptyImageError",
    "FrameTiles",
    "ImageDimensionError",
    "ImageMeta",
    "ImageReadError",
    "ImageTooLargeError",
    "NonFiniteImageError",
    "Stitcher",
    "UnsupportedFormatError",
    "aggregate_embeddings",
    "aggregate_probabilities",
    "blend_window",
    "frame_tiles",
    "is_companion",
    "is_supported",
    "list_files",
    "choose_tile",
    "list_images",
    "mask_dtype",
    "n_tiles",
    "normalise",
    "peek_shape",
    "read_image",
    "resize",
    "tile",
    "tile_geometry",
    "tile_chunks",
    "tile_positions",
    "to_model_input",
    "untile",
]
