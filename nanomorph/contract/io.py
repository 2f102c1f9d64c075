"""Reading TEM images from paths or bytes: the decoding half of the preprocessing contract.

One function, :func:`read_image`, turns any supported file (or the bytes of an upload) into a
``float32 (H, W)`` array plus an :class:`ImageMeta`. Training, the offline pipelines and the service
all call it, so every part of nanomorph sees the same pixels for the same file.

Formats and readers:

* PNG, JPEG: Pillow. TIFF (8/16/32-bit integer, float, multi-page, BigTIFF): tifffile, with a
  Pillow fallback for compressions tifffile cannot decode without ``imagecodecs`` (LZW, PackBits).
  TIFF calibration, first found wins: ImageJ (``unit`` + XResolution), OME-XML
  (``Pixels/@PhysicalSizeX`` and its unit, default µm), FEI/Thermo Fisher SEM/FIB tags
  (``[Scan] PixelWidth`` in metres, tag 34680 FEI_HELIOS or 34682 FEI_SFEG).
* Gatan DigitalMicrograph DM3/DM4, MRC, Thermo Fisher Velox EMD (and Berkeley EMD) and TIA SER:
  rosettasciio (``rsciio``). It is the HyperSpy project's reader library, actively maintained,
  tested against files from many instruments, and it returns the calibrated axes (``scale`` and
  ``units``), which is where these formats keep the pixel size that morphology numbers in nm
  depend on. Its DM/MRC/TIA readers want a file name, so uploaded bytes go through a temporary
  file that is always removed; EMD (HDF5, needs h5py) is opened from memory. A ``.ser`` read from
  a folder also reads its ``.emi`` companion (``name.emi`` beside ``name_1.ser``), which tells a
  diffraction pattern (reciprocal pixel size) from an image.

The format comes from the file's magic bytes, never from its suffix alone (the suffix only settles
old MRC files that lack the ``MAP`` stamp). Every size check happens on the header, before any
pixel is decoded, so a small file that claims to be 50000x50000 is refused without allocating.

Errors are :class:`ImageReadError` subclasses (``ValueError``) whose message starts with the
file name (or ``upload``) and which carry a machine-readable ``reason`` and the ``http_status``
the service answers with.
"""

from __future__ import annotations

import io
import math
import os
import struct
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any, cast

import numpy as np
from PIL import Image

DEFAULT_MAX_PIXELS = 16384 * 16384
SUPPORTED_SUFFIXES = (
    ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".dm3", ".dm4", ".mrc", ".emd", ".ser",
)  # fmt: skip
#: Files read together with an image rather than on their own (TIA: ``name.emi`` with ``name_1.ser``).
COMPANION_SUFFIXES = (".emi",)
_FORMAT_NAMES = "PNG, JPEG, TIFF, DM3, DM4, MRC, EMD (Velox), SER (TIA)"

# ITU-R BT.601 luma weights: the classic RGB -> grey conversion (also Pillow's "L").
_LUMA_601 = np.array([0.299, 0.587, 0.114], dtype=np.float32)

# Length units -> nanometres. Pixel sizes are reported in nm whenever the unit is a length, so
# morphology numbers from any format are comparable; other units (e.g. 1/nm) are kept verbatim.
_TO_NM = {
    "nm": 1.0,
    "nanometer": 1.0,
    "nanometre": 1.0,
    "µm": 1e3,
    "μm": 1e3,  # Greek mu, as well as the micro sign above
    "um": 1e3,
    "micron": 1e3,
    "microns": 1e3,
    "\\u00b5m": 1e3,  # ImageJ writes the micro sign escaped
    "å": 0.1,
    "Å": 0.1,
    "angstrom": 0.1,
    "pm": 1e-3,
    "mm": 1e6,
    "m": 1e9,
}

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"
_TIFF_MAGICS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic and BigTIFF
_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
_SER_MAGIC = struct.pack("<HH", 0x4949, 0x0197)  # TIA: little-endian byte order mark, series id
_SER_IMAGE, _SER_SPECTRUM = 0x4122, 0x4120
_MRC_MODES = {0: np.uint8, 1: np.int16, 2: np.float32, 6: np.uint16, 12: np.float16}  # as rsciio reads them


class ImageReadError(ValueError):
    """An image could not be read. Base of all read errors; a ``ValueError`` for the CLI.

    Attributes:
        reason: short machine-readable cause (``empty``, ``corrupt``, ...).
        http_status: the status the service answers with.
    """

    reason = "unreadable"
    http_status = 400


class EmptyImageError(ImageReadError):
    """The file or upload has 0 bytes."""

    reason = "empty"


class UnsupportedFormatError(ImageReadError):
    """Not a format nanomorph reads (or a variant of one it cannot decode, e.g. complex data)."""

    reason = "unsupported_format"
    http_status = 415


class CorruptImageError(ImageReadError):
    """A supported format, but truncated or malformed."""

    reason = "corrupt"


class ImageTooLargeError(ImageReadError):
    """More pixels than allowed; refused from the header, before decoding."""

    reason = "too_large"
    http_status = 413


class ImageDimensionError(ImageReadError):
    """Not a single 2-D image after squeezing (a 3-D stack, an unknown channel layout)."""

    reason = "dimensions"


class NonFiniteImageError(ImageReadError):
    """Every pixel is NaN or infinite."""

    reason = "non_finite"


@dataclass
class ImageMeta:
    """What :func:`read_image` knows about the file besides its pixels.

    Attributes:
        source_format: ``png``, ``jpeg``, ``tiff``, ``dm3``, ``dm4``, ``mrc``, ``emd`` or ``ser``.
        dtype: the pixel dtype stored in the file (before conversion to float32).
        shape: the array shape stored in the file (before squeezing / colour conversion).
        pixel_size: the width of one pixel in ``pixel_unit`` (x spacing), when the file is calibrated.
        pixel_unit: ``nm`` for any length unit (converted), else the file's unit verbatim.
        n_pages: pages (TIFF) or images (DM, EMD) in the file; only the first one is read.
        name: the file path or the upload name, as given.
    """

    source_format: str
    dtype: str
    shape: tuple[int, ...]
    pixel_size: float | None = None
    pixel_unit: str | None = None
    n_pages: int = 1
    name: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (shape as a list)."""
        data = asdict(self)
        data["shape"] = list(self.shape)
        return data


# --------------------------------------------------------------------------------------------------
# Sources: a path (read lazily, never slurped) or bytes.


class _Source:
    """A path or a bytes buffer, with the label every error message starts with."""

    def __init__(self, source: str | os.PathLike[str] | bytes | bytearray | memoryview, name: str | None):
        self.path: Path | None = None
        self.data: bytes | None = None
        if isinstance(source, bytes | bytearray | memoryview):
            self.data = bytes(source)
            self.label = name or "upload"
            self.size = len(self.data)
            self.head = self.data[:1024]
        elif isinstance(source, str | os.PathLike):
            self.path = Path(source)
            self.label = name or str(source)
            if not self.path.exists():
                raise FileNotFoundError(f"{self.label}: no such file")
            if not self.path.is_file():
                raise FileNotFoundError(f"{self.label}: not a file")
            self.size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                self.head = f.read(1024)
        else:
            raise TypeError(f"read_image takes a path or bytes, not {type(source).__name__}")
        self.name = name if name is not None else (str(source) if self.path is not None else None)
        self.suffix = Path(self.label).suffix.lower()

    def open(self) -> IO[bytes]:
        if self.data is not None:
            return io.BytesIO(self.data)
        assert self.path is not None
        return open(self.path, "rb")

    @contextmanager
    def as_file(self, suffix: str) -> Iterator[str]:
        """A real file name for readers that need one (rosettasciio); temporary for bytes."""
        if self.path is not None:
            yield str(self.path)
            return
        assert self.data is not None
        fd, tmp = tempfile.mkstemp(prefix="nanomorph-", suffix=suffix)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(self.data)
            yield tmp
        finally:
            os.unlink(tmp)


@dataclass
class _Probe:
    """What the header says: enough to refuse an image before decoding it."""

    fmt: str
    height: int
    width: int
    n_pixels: int  # everything the decoder would allocate (all samples of the first image)
    n_pages: int = 1
    extra: dict[str, Any] = field(default_factory=dict)


def _detect_format(src: _Source) -> str:
    head = src.head
    if head.startswith(_PNG_MAGIC):
        return "png"
    if head.startswith(_JPEG_MAGIC):
        return "jpeg"
    if head[:4] in _TIFF_MAGICS:
        return "tiff"
    if head.startswith(_HDF5_MAGIC):
        return "emd"  # the only HDF5 flavour read; others are refused by the EMD probe
    if head[:4] == _SER_MAGIC:
        return "ser"
    # DM3/DM4: big-endian version 3 or 4, then the file size (4 or 8 bytes), then a byte-order flag 0/1.
    if (
        head[:4] == b"\x00\x00\x00\x03"
        and len(head) >= 12
        and head[8:12] in (b"\x00" * 4, b"\x00\x00\x00\x01")
    ):
        return "dm3"
    if (
        head[:4] == b"\x00\x00\x00\x04"
        and len(head) >= 16
        and head[12:16] in (b"\x00" * 4, b"\x00\x00\x00\x01")
    ):
        return "dm4"
    # MRC2014 stamps "MAP " at byte 208; older MRC files have no magic, so there the suffix decides.
    if len(head) >= 212 and head[208:212] == b"MAP ":
        return "mrc"
    if src.suffix == ".mrc" and len(head) >= 1024:
        return "mrc"
    return "unknown"


def _probe(src: _Source) -> _Probe:
    if src.size == 0:
        raise EmptyImageError(f"{src.label}: empty file (0 bytes)")
    fmt = _detect_format(src)
    if fmt == "unknown":
        hint = (
            " (TIA .emi files hold metadata only; read the matching name_1.ser)"
            if src.suffix == ".emi"
            else ""
        )
        raise UnsupportedFormatError(
            f"{src.label}: not a supported image format{hint} (supported: {_FORMAT_NAMES}); "
            f"first bytes {src.head[:8]!r}"
        )
    try:
        if fmt in ("png", "jpeg"):
            return _probe_pillow(src, fmt)
        if fmt == "tiff":
            return _probe_tiff(src)
        if fmt in ("dm3", "dm4"):
            return _probe_dm(src, fmt)
        if fmt == "emd":
            return _probe_emd(src)
        if fmt == "ser":
            return _probe_ser(src)
        return _probe_mrc(src)
    except ImageReadError:
        raise
    except Exception as exc:  # any parser failure on the header means a broken file
        raise CorruptImageError(
            f"{src.label}: malformed or truncated {fmt.upper()} file ({_short(exc)})"
        ) from exc


def _short(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text if len(text) <= 200 else text[:200] + "..."


def _check_pixels(src: _Source, probe: _Probe, max_pixels: int) -> None:
    if probe.n_pixels > max_pixels:
        raise ImageTooLargeError(
            f"{src.label}: image is {probe.width}x{probe.height} ({probe.n_pixels} values), "
            f"more than the limit of {max_pixels} pixels"
        )


# --------------------------------------------------------------------------------------------------
# PNG / JPEG (and the TIFF fallback): Pillow.

_PILLOW_FORMAT = {"png": "PNG", "jpeg": "JPEG", "tiff": "TIFF"}


@contextmanager
def _pillow_open(src: _Source, fmt: str) -> Iterator[Image.Image]:
    """Opens with Pillow (header only), turning its decompression-bomb guard into our error."""
    with src.open() as fh:  # Pillow never closes a file object it was handed
        with warnings.catch_warnings():
            # Our own max_pixels limit governs; Pillow's warning below its hard limit is noise here.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            try:
                im = Image.open(fh, formats=[_PILLOW_FORMAT[fmt]])
            except Image.DecompressionBombError as exc:
                raise ImageTooLargeError(
                    f"{src.label}: image header claims more pixels than Pillow allows "
                    f"(2 x Image.MAX_IMAGE_PIXELS = {2 * (Image.MAX_IMAGE_PIXELS or 0)}): {_short(exc)}"
                ) from exc
        try:
            yield im
        finally:
            im.close()


def _probe_pillow(src: _Source, fmt: str) -> _Probe:
    if fmt == "png":
        # The IHDR chunk must come first: width and height are bytes 16-24. Read them directly, so
        # even a header Pillow would refuse as a decompression bomb still reports its size.
        if len(src.head) < 24 or src.head[12:16] != b"IHDR":
            raise CorruptImageError(f"{src.label}: PNG without an IHDR header chunk")
        width, height = struct.unpack(">II", src.head[16:24])
        if width <= 0 or height <= 0:
            raise CorruptImageError(f"{src.label}: PNG header gives size {width}x{height}")
        return _Probe(fmt, height, width, width * height)
    with _pillow_open(src, fmt) as im:
        width, height = im.size
        if width <= 0 or height <= 0:
            raise CorruptImageError(f"{src.label}: {fmt.upper()} header gives size {width}x{height}")
        return _Probe(fmt, height, width, width * height, n_pages=getattr(im, "n_frames", 1))


def _decode_pillow(src: _Source, fmt: str) -> tuple[np.ndarray, str, tuple[int, ...]]:
    """Decodes with Pillow; returns (grey array, original dtype, original shape)."""
    with _pillow_open(src, fmt) as im:
        im.load()
        mode = im.mode
        if mode in ("1", "L", "I", "F") or mode.startswith("I;16"):
            arr = np.asarray(im)
            return arr, str(arr.dtype), tuple(arr.shape)
        raw = np.asarray(im)
        if mode in ("LA", "La"):  # grey + alpha
            return raw[..., 0], str(raw.dtype), tuple(raw.shape)
        # RGB, RGBA, P, PA, CMYK, YCbCr...: via RGB (palette resolved, alpha dropped), then 601 luma.
        rgb = np.asarray(im.convert("RGB"), dtype=np.float32)
        return rgb @ _LUMA_601, str(raw.dtype), tuple(raw.shape)


# --------------------------------------------------------------------------------------------------
# TIFF: tifffile.


def _probe_tiff(src: _Source) -> _Probe:
    import tifffile

    with src.open() as fh, tifffile.TiffFile(fh) as tif:
        n_pages = len(tif.pages)
        if n_pages == 0:
            raise CorruptImageError(f"{src.label}: TIFF file has no pages")
        page = cast("tifffile.TiffPage", tif.pages[0])  # the first IFD is always a full page
        height, width = int(page.imagelength), int(page.imagewidth)
        depth, samples = int(page.imagedepth), int(page.samplesperpixel)
        if height <= 0 or width <= 0:
            raise CorruptImageError(f"{src.label}: TIFF header gives size {width}x{height}")
        n_pixels = height * width * max(depth, 1) * max(samples, 1)
        extra: dict[str, Any] = {"pixel": _tiff_pixel_size(tif, page)}
        # Strips/tiles that end past the end of the file: truncated, known before decoding anything.
        ends = [int(o) + int(n) for o, n in zip(page.dataoffsets, page.databytecounts, strict=False)]
        if ends and max(ends) > src.size:
            extra["truncated"] = f"{src.label}: TIFF file is truncated ({src.size} of {max(ends)} bytes)"
        elif int(page.compression) == 1 and int(page.bitspersample) % 8 == 0:
            stored = sum(int(n) for n in page.databytecounts)
            if stored < int(page.nbytes):  # uncompressed: the strips must hold every pixel
                extra["truncated"] = (
                    f"{src.label}: TIFF is truncated or malformed: its strips hold {stored} bytes, "
                    f"the image needs {int(page.nbytes)}"
                )
        return _Probe("tiff", height, width, n_pixels, n_pages=n_pages, extra=extra)


def _tiff_pixel_size(tif: Any, page: Any) -> tuple[float, str] | None:
    """Pixel size from the TIFF's microscope calibration: ImageJ, then OME-XML, then FEI/TFS tags.

    Plain TIFF resolution tags alone are ignored: without a length unit they are print DPI.
    """
    for reader in (_imagej_pixel_size, _ome_pixel_size, _fei_pixel_size):
        try:
            pixel = reader(tif, page)
        except Exception:
            pixel = None  # calibration is optional: never fail a read on it
        if pixel is not None and math.isfinite(pixel[0]) and pixel[0] > 0:
            return pixel
    return None


def _imagej_pixel_size(tif: Any, page: Any) -> tuple[float, str] | None:
    """ImageJ metadata: ``unit`` + XResolution (pixels per unit)."""
    meta = tif.imagej_metadata or {}
    unit = str(meta.get("unit", "")).strip()
    if not unit or unit.lower() in ("pixel", "pixels", "inch", "cm"):
        return None  # uncalibrated, or print DPI rather than a microscope calibration
    tag = page.tags.get("XResolution")
    if tag is None:
        return None
    num, den = tag.value
    if not num or not den:
        return None
    return float(den) / float(num), unit


def _ome_pixel_size(tif: Any, page: Any) -> tuple[float, str] | None:
    """OME-XML: the first ``Pixels`` element's ``PhysicalSizeX`` (unit default µm, per the schema)."""
    if not tif.is_ome:
        return None
    import xml.etree.ElementTree as ET

    root = ET.fromstring(tif.ome_metadata)
    for element in root.iter():
        if element.tag.rsplit("}", 1)[-1] == "Pixels" and element.get("PhysicalSizeX"):
            return float(element.get("PhysicalSizeX", "")), element.get("PhysicalSizeXUnit") or "µm"
    return None


def _fei_pixel_size(tif: Any, page: Any) -> tuple[float, str] | None:
    """FEI/Thermo Fisher SEM/FIB TIFF (tags FEI_HELIOS / FEI_SFEG): ``[Scan] PixelWidth`` in metres."""
    if not tif.is_fei:
        return None
    meta = tif.fei_metadata or {}
    for section in ("Scan", "EScan"):
        width = (meta.get(section) or {}).get("PixelWidth")
        if width:
            return float(width), "m"
    return None


def _decode_tiff(src: _Source) -> tuple[np.ndarray, str, tuple[int, ...]]:
    import tifffile

    with src.open() as fh, tifffile.TiffFile(fh) as tif:
        page = cast("tifffile.TiffPage", tif.pages[0])  # the first IFD is always a full page
        try:
            arr = page.asarray()
        except (ValueError, KeyError, NotImplementedError) as exc:
            if "imagecodecs" in str(exc):
                # LZW / PackBits need imagecodecs in tifffile; Pillow decodes them natively.
                return _decode_pillow(src, "tiff")
            raise
        dtype, shape = str(arr.dtype), tuple(arr.shape)
        photometric = int(page.photometric)
        samples = int(page.samplesperpixel)
        if samples > 1:
            if int(page.planarconfig) == 2:  # SEPARATE: samples first
                arr = np.moveaxis(arr, -3, -1)
            if photometric == 2:  # RGB (+ alpha / extra samples, dropped)
                arr = arr[..., :3].astype(np.float32) @ _LUMA_601
            elif photometric in (0, 1) and samples == 2 and len(page.extrasamples) == 1:
                arr = arr[..., 0]  # grey + alpha
            else:
                raise ImageDimensionError(
                    f"{src.label}: TIFF page has {samples} samples per pixel "
                    f"(photometric {photometric}); expected grey or RGB"
                )
        elif photometric == 3 and page.colormap is not None:  # palette
            rgb = np.moveaxis(page.colormap[:, arr], 0, -1).astype(np.float32)
            arr = rgb @ _LUMA_601
        elif photometric == 0 and arr.dtype.kind in "ui":  # MINISWHITE: 0 is white
            arr = np.iinfo(arr.dtype).max - arr
        return arr, dtype, shape


# --------------------------------------------------------------------------------------------------
# DM3 / DM4: rosettasciio.


def _probe_dm(src: _Source, fmt: str) -> _Probe:
    from rsciio.digitalmicrograph._api import DigitalMicrographReader, ImageObject

    with src.open() as fh:
        dm = DigitalMicrographReader(fh)
        dm.parse_file()  # tags only: the pixel data is skipped, its offset recorded
        images = dm.get_image_dictionaries() or []
        if not images:
            raise CorruptImageError(f"{src.label}: {fmt.upper()} file holds no image")
        first = ImageObject(images[0], fh)
        shape = tuple(int(s) for s in first.shape)
        try:
            dtype = np.dtype(first.dtype)
        except (NotImplementedError, KeyError, TypeError) as exc:
            raise UnsupportedFormatError(f"{src.label}: unsupported DM data type ({_short(exc)})") from exc
        if dtype.kind == "c":
            raise UnsupportedFormatError(
                f"{src.label}: complex-valued DM data (e.g. an FFT) is not supported"
            )
        data = images[0]["ImageData"]["Data"]
        n_values = int(np.prod(shape)) if shape else 0
        end = int(data["offset"]) + n_values * dtype.itemsize
    if n_values == 0 or any(s <= 0 for s in shape):
        raise CorruptImageError(f"{src.label}: {fmt.upper()} image has shape {shape}")
    height, width = _two_d(src, shape, fmt)
    probe = _Probe(fmt, height, width, n_values, n_pages=len(images), extra={"dtype": dtype})
    if end > src.size:
        probe.extra["truncated"] = f"{src.label}: {fmt.upper()} file is truncated ({src.size} of {end} bytes)"
    return probe


def _read_rsciio(
    src: _Source, fmt: str, max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[np.ndarray, str, tuple[int, ...], tuple[float, str] | None]:
    if fmt == "emd":
        signals = _read_emd(src, max_pixels)
    elif fmt == "ser":
        signals = _read_ser(src)
    elif fmt == "mrc":
        from rsciio.mrc import file_reader as mrc_reader

        with src.as_file(".mrc") as fname, warnings.catch_warnings():
            # rsciio 0.15's MRC reader never closes its file handle (CPython closes it on return);
            # the ResourceWarning that follows is theirs, not a leak here.
            warnings.simplefilter("ignore", ResourceWarning)
            # metadata_file=None: rsciio otherwise treats any name containing "movie" as a DE movie.
            signals = mrc_reader(fname, endianness=_mrc_endian(src.head), metadata_file=None)
    else:
        from rsciio.digitalmicrograph import file_reader as dm_reader

        with src.as_file("." + fmt) as fname:
            signals = dm_reader(fname)
    if not signals:
        raise CorruptImageError(f"{src.label}: {fmt.upper()} file holds no image")
    signal = signals[0]
    arr = np.asarray(signal["data"])
    dtype, shape = str(arr.dtype), tuple(arr.shape)
    if arr.dtype.names:  # DM RGB(A): a structured array of R, G, B, A bytes
        rgb = np.stack([arr[c].astype(np.float32) for c in ("R", "G", "B")], axis=-1)
        arr = rgb @ _LUMA_601
    pixel = None if signal.get("uncalibrated") else _axes_pixel_size(signal.get("axes") or [])
    return arr, dtype, shape, pixel


def _axes_pixel_size(axes: list[dict[str, Any]]) -> tuple[float, str] | None:
    """Pixel size from rosettasciio's calibrated axes (the x axis: the last signal axis)."""
    spatial = [ax for ax in axes if int(ax.get("size", 1)) > 1]
    if not spatial:
        return None
    x_axis = spatial[-1]
    unit = str(x_axis.get("units") or "").strip()
    scale = float(x_axis.get("scale", 0.0))
    if not unit or unit in ("<undefined>", "px", "pixel") or not math.isfinite(scale) or scale <= 0:
        return None
    return scale, unit


# --------------------------------------------------------------------------------------------------
# EMD (Velox / Berkeley, HDF5): header from h5py, pixels by rosettasciio's readers on our handle.


@contextmanager
def _h5_open(src: _Source) -> Iterator[Any]:
    try:
        import h5py
    except ImportError as exc:  # rosettasciio's "hdf5" extra; a dependency of nanomorph
        raise UnsupportedFormatError(f"{src.label}: reading EMD (HDF5) files needs h5py") from exc
    with src.open() as fh, h5py.File(fh, "r") as f:
        yield f


def _velox_images(f: Any) -> list[Any]:
    group = f.get("Data/Image")
    return [group[k]["Data"] for k in group] if group is not None else []


def _ncem_first_shape(f: Any) -> tuple[int, ...] | None:
    """Shape of the first Berkeley EMD data group (attribute ``emd_group_type == 1``)."""
    found: list[tuple[int, ...]] = []

    def visit(name: str, obj: Any) -> None:
        if not found and int(obj.attrs.get("emd_group_type", 0)) == 1 and "data" in obj:
            found.append(tuple(int(s) for s in obj["data"].shape))

    f.visititems(visit)
    return found[0] if found else None


def _probe_emd(src: _Source) -> _Probe:
    with _h5_open(src) as f:
        from rsciio.emd._api import is_EMD_NCEM, is_EMD_Velox

        if is_EMD_Velox(f):
            images = _velox_images(f)
            if not images:
                raise UnsupportedFormatError(f"{src.label}: Velox EMD file holds no image (spectra only)")
            first = images[0]
            if first.dtype.names:
                raise UnsupportedFormatError(
                    f"{src.label}: complex-valued EMD data (FFT / DPC) is not supported"
                )
            height, width, frames = (int(s) for s in first.shape)  # Velox stores (y, x, frame)
            _two_d(src, (frames, height, width), "emd")
            return _Probe("emd", height, width, height * width * frames, n_pages=len(images))
        if is_EMD_NCEM(f):
            shape = _ncem_first_shape(f)
            if shape is None:
                raise UnsupportedFormatError(f"{src.label}: Berkeley EMD file holds no data group")
            height, width = _two_d(src, shape, "emd")
            return _Probe("emd", height, width, height * width)
    raise UnsupportedFormatError(
        f"{src.label}: an HDF5 file that is not an EMD file (Velox or Berkeley); supported: {_FORMAT_NAMES}"
    )


def _read_emd(src: _Source, max_pixels: int) -> list[dict[str, Any]]:
    """rosettasciio's EMD readers, lazily on our own h5py handle: only the first image is decoded."""
    with _h5_open(src) as f:
        from rsciio.emd._api import is_EMD_Velox

        if is_EMD_Velox(f):
            from rsciio.emd._emd_velox import FeiEMDReader

            reader: Any = FeiEMDReader(lazy=True, select_type="images")
            # An EDS spectrum image needs `sparse`; the images were read before rsciio asks for it.
            with suppress(ModuleNotFoundError):
                reader.read_file(f)
        else:
            from rsciio.emd._emd_ncem import EMD_NCEM

            reader = EMD_NCEM()
            reader.read_file(f, lazy=True)
        signals = [d for d in reader.dictionaries if len(d["data"].shape) >= 2]
        if not signals:
            raise UnsupportedFormatError(f"{src.label}: EMD file holds no image")
        first = dict(signals[0])
        shape = tuple(int(s) for s in first["data"].shape)
        height, width = _two_d(src, shape, "emd")
        if height * width > max_pixels:  # checked on the header already; rsciio may see more
            raise ImageTooLargeError(
                f"{src.label}: image is {width}x{height}, more than the limit of {max_pixels} pixels"
            )
        first["data"] = np.asarray(first["data"])  # decodes while the file is open
        binary = (first.get("original_metadata") or {}).get("BinaryResult")
        if isinstance(binary, dict) and not binary.get("PixelSize"):
            first["uncalibrated"] = True  # rsciio reports 1 (metre) per pixel when Velox has no size
        first["n_images"] = len(signals)
        return [first]


# --------------------------------------------------------------------------------------------------
# TIA SER: the series header parsed here, pixels by rosettasciio (with the .emi beside it, if any).


def _probe_ser(src: _Source) -> _Probe:
    with src.open() as fh:
        head = fh.read(34)
        if len(head) < 30:
            raise CorruptImageError(f"{src.label}: SER file shorter than its header")
        version, data_type, _tag, _total, valid = struct.unpack_from("<HIIII", head, 4)
        if data_type == _SER_SPECTRUM:
            raise UnsupportedFormatError(f"{src.label}: TIA spectrum series, not an image")
        if data_type != _SER_IMAGE:
            raise CorruptImageError(f"{src.label}: unknown TIA data type 0x{data_type:04x}")
        if valid < 1:
            raise CorruptImageError(f"{src.label}: TIA series holds no image")
        wide = version > 0x0210  # offsets are 8 bytes from series version 0x0220 on
        (offsets_at,) = struct.unpack_from("<Q" if wide else "<I", head, 22)
        fh.seek(offsets_at)
        raw = fh.read(8 if wide else 4)
        (data_at,) = struct.unpack("<Q" if wide else "<I", raw)
        fh.seek(data_at + 40)
        element = fh.read(10)
        if len(element) < 10:
            raise CorruptImageError(f"{src.label}: SER file is truncated (no image element)")
        pixel_type, width, height = struct.unpack("<HII", element)
    if pixel_type in (9, 10):
        raise UnsupportedFormatError(f"{src.label}: complex-valued TIA data is not supported")
    _two_d(src, (valid, height, width), "ser")
    itemsize = {1: 1, 2: 2, 3: 4, 4: 1, 5: 2, 6: 4, 7: 4, 8: 8}.get(pixel_type)
    if itemsize is None or width <= 0 or height <= 0:
        raise CorruptImageError(f"{src.label}: TIA image element of type {pixel_type}, size {width}x{height}")
    probe = _Probe("ser", height, width, height * width)
    end = data_at + 50 + width * height * itemsize
    if end > src.size:
        probe.extra["truncated"] = f"{src.label}: SER file is truncated ({src.size} of {end} bytes)"
    return probe


def _emi_companion(path: Path | None) -> Path | None:
    """``name.emi`` for ``name_1.ser``: TIA writes one .emi per acquisition, one .ser per signal."""
    if path is None or "_" not in path.stem:
        return None
    emi = path.with_name(path.stem.rsplit("_", 1)[0] + ".emi")
    return emi if emi.is_file() else None


def _read_ser(src: _Source) -> list[dict[str, Any]]:
    from rsciio.tia._api import get_xml_info_from_emi, ser_reader

    emi = _emi_companion(src.path)
    objects = get_xml_info_from_emi(str(emi)) if emi is not None else None
    with src.as_file(".ser") as fname, warnings.catch_warnings():
        # Without the .emi, rsciio warns that it assumes a spatial (metre) calibration: that is
        # the documented behaviour here too.
        warnings.simplefilter("ignore", UserWarning)
        return list(ser_reader(fname, objects=objects or None))


# --------------------------------------------------------------------------------------------------
# MRC: the 1024-byte header parsed here (cheap), pixels by rosettasciio.


def _mrc_endian(head: bytes) -> str:
    # MACHST (byte 212): 0x44 0x44 little endian, 0x11 0x11 big endian; absent in old files -> little.
    return ">" if head[212:214] == b"\x11\x11" else "<"


def _probe_mrc(src: _Source) -> _Probe:
    head = src.head
    if len(head) < 1024:
        raise CorruptImageError(f"{src.label}: MRC file shorter than its 1024-byte header")
    endian = _mrc_endian(head)
    nx, ny, nz, mode = struct.unpack_from(endian + "4i", head, 0)
    (next_bytes,) = struct.unpack_from(endian + "i", head, 92)
    xlen, mx = struct.unpack_from(endian + "f", head, 40)[0], struct.unpack_from(endian + "i", head, 28)[0]
    if min(nx, ny, nz) <= 0 or next_bytes < 0:
        raise CorruptImageError(f"{src.label}: MRC header gives size {nx}x{ny}x{nz}")
    if mode not in _MRC_MODES:
        kind = "complex" if mode in (3, 4) else "unknown"
        raise UnsupportedFormatError(f"{src.label}: MRC mode {mode} ({kind} data) is not supported")
    dtype = np.dtype(_MRC_MODES[mode])
    n_values = nx * ny * nz
    end = 1024 + next_bytes + n_values * dtype.itemsize
    extra = {"dtype": dtype, "calibrated": xlen > 0 and mx > 0}
    height, width = _two_d(src, (nz, ny, nx), "mrc")
    probe = _Probe("mrc", height, width, n_values, extra=extra)
    if end > src.size:
        probe.extra["truncated"] = f"{src.label}: MRC file is truncated ({src.size} of {end} bytes)"
    return probe


def _two_d(src: _Source, shape: tuple[int, ...], fmt: str) -> tuple[int, int]:
    squeezed = tuple(s for s in shape if s != 1)
    if len(squeezed) > 2:
        raise ImageDimensionError(
            f"{src.label}: {fmt.upper()} holds a {len(squeezed)}-D array of shape {shape}; "
            "nanomorph reads single 2-D images (split stacks into files first)"
        )
    if len(squeezed) < 2:
        raise ImageDimensionError(
            f"{src.label}: {fmt.upper()} holds a 1-D array of shape {shape}, not an image"
        )
    return squeezed[0], squeezed[1]


# --------------------------------------------------------------------------------------------------
# Public API.


def peek_shape(source: str | os.PathLike[str] | bytes, *, name: str | None = None) -> tuple[int, int]:
    """(H, W) of the image :func:`read_image` would return, from the header only.

    Used by the service to refuse huge uploads before decoding them. Pixels are not decoded
    (DM: tags only, MRC: the 1024-byte header, PNG/JPEG/TIFF: Pillow/tifffile lazy open).

    Args:
        source: a path or the file's bytes.
        name: label for error messages (default: the path, or ``upload``).

    Raises:
        FileNotFoundError: the path does not exist.
        ImageReadError: empty, unsupported, corrupt header, or not a 2-D image.
    """
    probe = _probe(_Source(source, name))
    return probe.height, probe.width


def read_image(
    source: str | os.PathLike[str] | bytes, *, name: str | None = None, max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[np.ndarray, ImageMeta]:
    """Reads one TEM image as ``float32 (H, W)`` and its :class:`ImageMeta`.

    Colour images become grey by ITU-R BT.601 luma (alpha dropped); multi-page TIFF and multi-image
    DM files give their first image with a warning naming the count; partially non-finite images
    have their NaN/inf pixels replaced by the median of the finite ones (with a warning).

    Args:
        source: a path or the bytes of a file (e.g. an HTTP upload).
        name: label for ``ImageMeta.name`` and error messages (default: the path, or ``upload``);
            its suffix also identifies MRC files that lack the ``MAP`` stamp.
        max_pixels: largest number of values accepted, checked on the header before decoding.

    Returns:
        ``(image, meta)``.

    Raises:
        FileNotFoundError: the path does not exist.
        EmptyImageError: 0 bytes.
        UnsupportedFormatError: not PNG/JPEG/TIFF/DM3/DM4/MRC/EMD/SER (by content), or complex data.
        CorruptImageError: truncated or malformed.
        ImageTooLargeError: more than ``max_pixels``.
        ImageDimensionError: not a 2-D image after squeezing.
        NonFiniteImageError: no finite pixel at all.
    """
    src = _Source(source, name)
    probe = _probe(src)
    _check_pixels(src, probe, max_pixels)
    if probe.extra.get("truncated"):
        raise CorruptImageError(probe.extra["truncated"])
    fmt = probe.fmt
    pixel: tuple[float, str] | None = None
    try:
        if fmt in ("png", "jpeg"):
            arr, dtype, shape = _decode_pillow(src, fmt)
        elif fmt == "tiff":
            arr, dtype, shape = _decode_tiff(src)
            pixel = probe.extra.get("pixel")
        else:
            arr, dtype, shape, pixel = _read_rsciio(src, fmt, max_pixels)
            if fmt == "mrc" and not probe.extra.get("calibrated"):
                pixel = None  # rsciio reports scale 1 nm when the header has no cell size
    except ImageReadError:
        raise
    except MemoryError as exc:
        raise ImageTooLargeError(f"{src.label}: not enough memory to decode this image") from exc
    except Exception as exc:
        raise CorruptImageError(f"{src.label}: cannot decode {fmt.upper()} data ({_short(exc)})") from exc

    if np.iscomplexobj(arr):
        raise UnsupportedFormatError(f"{src.label}: complex-valued data (e.g. an FFT) is not supported")
    if arr.ndim != 2:
        squeezed = np.squeeze(arr)
        if squeezed.ndim != 2:
            raise ImageDimensionError(
                f"{src.label}: {fmt.upper()} holds an array of shape {tuple(arr.shape)}, not a 2-D image"
            )
        arr = squeezed
    if probe.n_pages > 1:
        what = "pages" if fmt == "tiff" else "images"
        warnings.warn(f"{src.label}: file has {probe.n_pages} {what}; reading only the first", stacklevel=2)

    image = _finite_float32(arr, src.label)
    pixel_size, pixel_unit = _to_nm(pixel)
    meta = ImageMeta(
        source_format=fmt,
        dtype=dtype,
        shape=tuple(int(s) for s in shape),
        pixel_size=pixel_size,
        pixel_unit=pixel_unit,
        n_pages=probe.n_pages,
        name=src.name,
    )
    return image, meta


def _to_nm(pixel: tuple[float, str] | None) -> tuple[float | None, str | None]:
    if pixel is None:
        return None, None
    size, unit = pixel
    factor = _TO_NM.get(unit) or _TO_NM.get(unit.lower())
    if factor is None:
        return float(size), unit
    return float(size) * factor, "nm"


def _finite_float32(arr: np.ndarray, label: str) -> np.ndarray:
    image = np.ascontiguousarray(arr, dtype=np.float32)
    if image.dtype.kind == "f":
        finite = np.isfinite(image)  # after the cast, so float64 beyond float32 range counts too
        n_bad = int(image.size - np.count_nonzero(finite))
        if n_bad == image.size:
            raise NonFiniteImageError(f"{label}: every pixel is NaN or infinite")
        if n_bad:
            fill = np.float32(np.median(image[finite]))
            warnings.warn(
                f"{label}: {n_bad} non-finite pixel(s) (NaN/inf) replaced by the median {float(fill):.6g}",
                stacklevel=3,
            )
            image = np.where(finite, image, fill)
    return image


def _walk(root: str | os.PathLike[str], recursive: bool) -> Iterator[Path]:
    """Every non-hidden file under ``root`` (hidden folders pruned, folder links not followed)."""
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"{root}: no such folder")
    if not root.is_dir():
        raise NotADirectoryError(f"{root}: not a folder")
    # Symlinked files are listed; symlinked folders are not followed (a link cycle would never end).
    for dirpath, dirnames, filenames in os.walk(root):
        # Hidden folders (.git, .ipynb_checkpoints, ...) are pruned in place, so never walked.
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for fname in filenames:
            path = Path(dirpath) / fname
            if not fname.startswith(".") and path.is_file():
                yield path
        if not recursive:
            break


def is_supported(path: str | os.PathLike[str]) -> bool:
    """True when ``path``'s suffix is one nanomorph reads (the content is checked when read)."""
    return Path(path).suffix.lower() in SUPPORTED_SUFFIXES


def is_companion(path: str | os.PathLike[str]) -> bool:
    """True for a file read together with an image, not on its own: a TIA ``name.emi`` beside
    at least one ``name_<n>.ser``."""
    path = Path(path)
    if path.suffix.lower() not in COMPANION_SUFFIXES:
        return False
    return any(p.suffix.lower() == ".ser" for p in path.parent.glob(f"{glob_escape(path.stem)}_*"))


def glob_escape(text: str) -> str:
    """``text`` with glob wildcards escaped (file names may hold ``[``, ``*``, ``?``)."""
    import glob

    return glob.escape(text)


def list_images(root: str | os.PathLike[str], recursive: bool = True) -> list[Path]:
    """Supported image files under ``root`` (by suffix), sorted; hidden files and folders skipped.

    Raises:
        FileNotFoundError: ``root`` does not exist.
        NotADirectoryError: ``root`` is not a folder.
    """
    return sorted(p for p in _walk(root, recursive) if is_supported(p))


def list_files(root: str | os.PathLike[str], recursive: bool = True) -> list[Path]:
    """Every file under ``root`` that is not hidden, sorted: what a folder job must account for
    (an image, a companion such as a TIA ``.emi``, or a file it reports as not read).

    Raises:
        FileNotFoundError: ``root`` does not exist.
        NotADirectoryError: ``root`` is not a folder.
    """
    return sorted(_walk(root, recursive))
