"""Generators of hostile uploads: broken, lying and absurd inputs a public endpoint must survive.

Every generated :class:`Case` is one HTTP request (endpoint, multipart files or a raw body, form
fields, headers). :func:`generate` cycles through the kinds below with a seeded RNG, so a run is
reproducible from ``(n, seed)`` and any failing case can be rebuilt by its ``name``.

Kinds (each a family of variants):

* ``truncated``: valid PNG / TIFF / JPEG / DM4 / MRC files cut at a random byte.
* ``bitflip``: the same files with 1-16 random bits flipped (headers, chunk CRCs, tag tables).
* ``random``: random bytes, bare or behind a real magic number (PNG, TIFF, DM4, JPEG).
* ``huge_dims``: headers declaring 100000 x 100000 (PNG IHDR, TIFF tags, DM4 dimensions, MRC).
* ``nonfinite``: float32 TIFFs that are all NaN, all +/-inf, partly NaN, or with huge finite values.
* ``extreme_shape``: 1x1, 1x100000, 100000x1, 1x2 images (PNG and TIFF), 3-D/RGBA stacks.
* ``no_file``: multipart bodies with only text fields, or empty.
* ``wrong_field``: the file under another field name (``image`` vs ``images``, ``file``).
* ``wrong_content_type``: JSON, plain text, raw octet-stream, multipart without a boundary.
* ``odd_fields``: bad ``pixel_size`` / ``format`` values, odd filenames, too many files.
* ``valid``: well-formed images, as a control that the server still answers 200 in between.

DigitalMicrograph files are built tag by tag, as ``tests/nanomorph/contract/test_io.py`` does,
because no installed library writes them.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import tifffile
from PIL import Image

from tests.fixtures import emfiles

#: Endpoints that take uploads, and the name of their file field.
FILE_FIELD = {
    "/classify": "images",
    "/embed": "images",
    "/segment": "image",
    "/similar": "image",
    "/preview": "image",  # the web page's picture of an upload (service/webui.py)
}
ENDPOINTS = tuple(FILE_FIELD)

FileTuple = tuple[str, tuple[str, bytes, str]]


@dataclass
class Case:
    """One hostile request.

    Attributes:
        name: unique id ``<kind>-<index>-<variant>`` (reproducible from the generator's seed).
        kind: the family (see the module docstring).
        endpoint: path, e.g. ``/classify``.
        files: multipart file parts ``(field, (filename, bytes, content type))``.
        data: multipart text fields.
        content: a raw body instead of multipart (then ``headers`` should set Content-Type).
        headers: extra request headers.
        params: query parameters.
        expect_ok: True for control cases that must be answered 200.
    """

    name: str
    kind: str
    endpoint: str
    files: list[FileTuple] = field(default_factory=list)
    data: dict[str, str] = field(default_factory=dict)
    content: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)
    expect_ok: bool = False

    def request_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``httpx.Client.post`` / ``AsyncClient.post``."""
        kw: dict[str, Any] = {"headers": dict(self.headers), "params": dict(self.params)}
        if self.content is not None:
            kw["content"] = self.content
        else:
            if self.files:
                kw["files"] = list(self.files)
            if self.data:
                kw["data"] = dict(self.data)
            if not self.files and not self.data:
                # httpx sends no body and no multipart header for an empty form; send an empty
                # multipart body explicitly.
                kw["content"] = b"--xyz--\r\n"
                kw["headers"].setdefault("content-type", "multipart/form-data; boundary=xyz")
        return kw

    def size(self) -> int:
        return sum(len(f[1][1]) for f in self.files) + len(self.content or b"")


# ---------------------------------------------------------------------------------- valid files


def noise_image(rng: np.random.Generator, h: int, w: int, dtype: str = "uint8") -> np.ndarray:
    """A TEM-like frame: noisy background with a few bright discs."""
    yy, xx = np.mgrid[:h, :w]
    img = rng.normal(80, 15, (h, w))
    for _ in range(3):
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(2, max(3, min(h, w) / 4))
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] += 120
    if dtype == "uint8":
        return np.clip(img, 0, 255).astype(np.uint8)
    if dtype == "uint16":
        return np.clip(img * 200, 0, 65535).astype(np.uint16)
    return img.astype(np.float32)


def png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def jpeg_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def tiff_bytes(arr: np.ndarray, **kwargs: Any) -> bytes:
    buf = io.BytesIO()
    tifffile.imwrite(buf, arr, **kwargs)
    return buf.getvalue()


def dm_bytes(
    arr: np.ndarray,
    version: int = 4,
    scale: float | None = 0.5,
    unit: str = "nm",
    dims: tuple[int, ...] | None = None,
) -> bytes:
    """A minimal DM3/DM4 file holding ``arr`` (calibrated 0.5 nm by default); ``dims`` may lie about
    the size. The writer is shared with the contract's tests (``tests/fixtures/emfiles.py``)."""
    return emfiles.dm_bytes(arr, version=version, scale=scale, unit=unit, dims=dims)


def mrc_bytes(arr: np.ndarray, dims: tuple[int, int, int] | None = None) -> bytes:
    """An MRC2014 file (float32, mode 2); ``dims`` (nx, ny, nz) may lie about the size."""
    ny, nx = arr.shape
    nx_, ny_, nz_ = dims or (nx, ny, 1)
    header = bytearray(1024)
    struct.pack_into("<4i", header, 0, nx_, ny_, nz_, 2)
    struct.pack_into("<3i", header, 28, nx_, ny_, nz_)
    struct.pack_into("<3f", header, 40, float(nx_), float(ny_), float(nz_))
    struct.pack_into("<3f", header, 52, 90.0, 90.0, 90.0)
    struct.pack_into("<3i", header, 64, 1, 2, 3)
    header[208:212] = b"MAP "
    header[212:214] = b"\x44\x44"
    return bytes(header) + arr.astype("<f4").tobytes()


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_declaring(width: int, height: int, bit_depth: int = 8) -> bytes:
    """A PNG whose IHDR claims ``width`` x ``height`` but whose IDAT holds a few bytes only."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


def png_bomb(side: int) -> bytes:
    """A real, fully valid PNG of ``side`` x ``side`` zeros: tiny on the wire, large once decoded."""
    row = b"\x00" + b"\x00" * side
    raw = zlib.compress(row * side, 9)
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", raw) + _png_chunk(b"IEND", b"")
    )


def tiff_declaring(width: int, height: int) -> bytes:
    """A little-endian baseline TIFF whose tags claim ``width`` x ``height`` (8-bit) with 16 data bytes."""
    entries = [
        (256, 4, 1, width),  # ImageWidth (LONG)
        (257, 4, 1, height),  # ImageLength
        (258, 3, 1, 8),  # BitsPerSample
        (259, 3, 1, 1),  # Compression: none
        (262, 3, 1, 1),  # Photometric: min-is-black
        (273, 4, 1, 8 + 2 + 12 * 9 + 4),  # StripOffsets: right after the IFD
        (277, 3, 1, 1),  # SamplesPerPixel
        (278, 4, 1, height),  # RowsPerStrip
        (279, 4, 1, width * height & 0xFFFFFFFF),  # StripByteCounts (a lie)
    ]
    ifd = struct.pack("<H", len(entries))
    for tag, typ, count, value in entries:
        packed = struct.pack("<HHI", tag, typ, count)
        packed += struct.pack("<HH", value, 0) if typ == 3 else struct.pack("<I", value)
        ifd += packed
    ifd += struct.pack("<I", 0)
    return b"II*\x00" + struct.pack("<I", 8) + ifd + b"\x00" * 16


# ---------------------------------------------------------------------------------- the generator


KINDS = (
    "truncated",
    "bitflip",
    "random",
    "huge_dims",
    "nonfinite",
    "extreme_shape",
    "no_file",
    "wrong_field",
    "wrong_content_type",
    "odd_fields",
    "valid",
)

_FORMATS = ("png", "tiff16", "tiff_float", "jpeg", "dm4", "dm3", "mrc")


def _valid_file(rng: np.random.Generator, fmt: str, h: int = 48, w: int = 56) -> tuple[str, bytes]:
    if fmt == "png":
        return "frame.png", png_bytes(noise_image(rng, h, w))
    if fmt == "tiff16":
        return "frame.tif", tiff_bytes(noise_image(rng, h, w, "uint16"))
    if fmt == "tiff_float":
        return "frame.tiff", tiff_bytes(noise_image(rng, h, w, "float32"))
    if fmt == "jpeg":
        return "frame.jpg", jpeg_bytes(noise_image(rng, h, w))
    if fmt == "dm4":
        return "frame.dm4", dm_bytes(noise_image(rng, h, w, "float32"), version=4)
    if fmt == "dm3":
        return "frame.dm3", dm_bytes(noise_image(rng, h, w, "uint16"), version=3)
    if fmt == "mrc":
        return "frame.mrc", mrc_bytes(noise_image(rng, h, w, "float32"))
    raise ValueError(fmt)


def _one_file(
    endpoint: str, filename: str, data: bytes, ctype: str = "application/octet-stream"
) -> list[FileTuple]:
    return [(FILE_FIELD[endpoint], (filename, data, ctype))]


def _case(
    kind: str, i: int, variant: str, rng: np.random.Generator, endpoints: tuple[str, ...] = ENDPOINTS
) -> Case:
    endpoint = endpoints[int(rng.integers(len(endpoints)))]
    name = f"{kind}-{i}-{variant}"
    c = Case(name=name, kind=kind, endpoint=endpoint)
    fmt = variant
    if kind == "truncated":
        fname, data = _valid_file(rng, fmt)
        cut = int(rng.integers(1, len(data)))
        c.files = _one_file(endpoint, fname, data[:cut])
    elif kind == "bitflip":
        fname, data = _valid_file(rng, fmt)
        buf = bytearray(data)
        # Bias half the flips into the first 256 bytes, where the headers and tag tables live.
        for _ in range(int(rng.integers(1, 17))):
            pos = (
                int(rng.integers(0, min(len(buf), 256)))
                if rng.random() < 0.5
                else int(rng.integers(len(buf)))
            )
            buf[pos] ^= 1 << int(rng.integers(8))
        c.files = _one_file(endpoint, fname, bytes(buf))
    elif kind == "random":
        n = int(rng.choice([1, 7, 64, 1000, 20000]))
        noise = rng.bytes(n)
        prefix = {
            "bare": b"",
            "png": b"\x89PNG\r\n\x1a\n",
            "tiff": b"II*\x00",
            "bigtiff": b"II+\x00",
            "dm4": struct.pack(">l", 4),
            "jpeg": b"\xff\xd8\xff",
            "mrc_like": b"\x00" * 208 + b"MAP ",
        }[variant]
        c.files = _one_file(endpoint, "noise.bin", prefix + noise)
    elif kind == "huge_dims":
        if variant == "png":
            c.files = _one_file(endpoint, "huge.png", png_declaring(100000, 100000))
        elif variant == "png_wide":
            c.files = _one_file(endpoint, "wide.png", png_declaring(2**31 - 1, 1))
        elif variant == "png16":
            c.files = _one_file(endpoint, "huge16.png", png_declaring(70000, 70000, 16))
        elif variant == "tiff":
            c.files = _one_file(endpoint, "huge.tif", tiff_declaring(100000, 100000))
        elif variant == "dm4":
            arr = np.zeros((4, 4), np.float32)
            c.files = _one_file(endpoint, "huge.dm4", dm_bytes(arr, dims=(100000, 100000)))
        elif variant == "mrc":
            arr = np.zeros((4, 4), np.float32)
            c.files = _one_file(endpoint, "huge.mrc", mrc_bytes(arr, dims=(100000, 100000, 1)))
        else:  # "bomb": a real PNG, a few kB on the wire, 12000^2 once decoded (over the default limit)
            c.files = _one_file(endpoint, "bomb.png", png_bomb(12000))
    elif kind == "nonfinite":
        arr = noise_image(rng, 40, 48, "float32")
        if variant in ("all_nan", "all_nan_dm4"):
            arr[:] = np.nan
        elif variant == "all_inf":
            arr[:] = np.inf
        elif variant == "all_neginf":
            arr[:] = -np.inf
        elif variant == "mixed_inf":
            arr[::2] = np.inf
            arr[1::2] = -np.inf
        elif variant == "some_nan":
            arr[rng.random(arr.shape) < 0.3] = np.nan
        elif variant == "one_finite":
            arr[:] = np.nan
            arr[3, 4] = 1.0
        else:  # "huge_finite": finite but near float32 max (overflows naive arithmetic)
            arr = np.where(rng.random(arr.shape) < 0.5, 3.0e38, -3.0e38).astype(np.float32)
        if variant.endswith("dm4"):
            c.files = _one_file(endpoint, f"{variant}.dm4", dm_bytes(arr))
        else:
            c.files = _one_file(endpoint, f"{variant}.tif", tiff_bytes(arr))
    elif kind == "extreme_shape":
        shapes = {
            "1x1": (1, 1),
            "1x100000": (1, 100000),
            "100000x1": (100000, 1),
            "1x2": (1, 2),
            "2x1": (2, 1),
            "3x5000": (3, 5000),
        }
        if variant in shapes:
            h, w = shapes[variant]
            arr = (rng.random((h, w)) * 255).astype(np.uint8)
            if rng.random() < 0.5:
                c.files = _one_file(endpoint, f"{variant}.png", png_bytes(arr))
            else:
                c.files = _one_file(endpoint, f"{variant}.tif", tiff_bytes(arr.astype(np.float32)))
        elif variant == "constant":
            c.files = _one_file(endpoint, "flat.png", png_bytes(np.full((32, 32), 7, np.uint8)))
        elif variant == "rgba":
            c.files = _one_file(
                endpoint, "rgba.png", png_bytes((rng.random((20, 30, 4)) * 255).astype(np.uint8))
            )
        elif variant == "stack":
            c.files = _one_file(
                endpoint, "stack.tif", tiff_bytes((rng.random((3, 20, 30)) * 255).astype(np.uint8))
            )
        else:  # "volume4d"
            c.files = _one_file(endpoint, "vol.tif", tiff_bytes(np.zeros((2, 2, 8, 8), np.uint16)))
    elif kind == "no_file":
        if variant == "text_only":
            c.data = {"note": "no file here"}
        elif variant == "empty_form":
            pass  # an empty multipart body (see Case.request_kwargs)
        elif variant == "field_as_text":
            c.data = {FILE_FIELD[endpoint]: "this is a text field, not a file"}
        else:  # "empty_file"
            c.files = _one_file(endpoint, "empty.png", b"")
    elif kind == "wrong_field":
        _, data = _valid_file(rng, "png")
        other = {"images": "image", "image": "images"}[FILE_FIELD[endpoint]]
        field_name = {"other": other, "file": "file", "upper": FILE_FIELD[endpoint].upper(), "blank": ""}[
            variant
        ]
        c.files = [(field_name, ("frame.png", data, "image/png"))]
    elif kind == "wrong_content_type":
        _, data = _valid_file(rng, "png")
        if variant == "json":
            c.content, c.headers = b'{"images": "frame.png"}', {"content-type": "application/json"}
        elif variant == "text":
            c.content, c.headers = b"hello", {"content-type": "text/plain"}
        elif variant == "raw_png":
            c.content, c.headers = data, {"content-type": "image/png"}
        elif variant == "octet":
            c.content, c.headers = data, {"content-type": "application/octet-stream"}
        elif variant == "none":
            c.content, c.headers = data, {}
        elif variant == "no_boundary":
            c.content, c.headers = data, {"content-type": "multipart/form-data"}
        elif variant == "bad_boundary":
            c.content = b'--abc\r\nContent-Disposition: form-data; name="images"\r\n\r\n' + data
            c.headers = {"content-type": "multipart/form-data; boundary=zzz"}
        elif variant == "unterminated":
            c.content = (
                b'--abc\r\nContent-Disposition: form-data; name="%s"; filename="a.png"\r\n\r\n'
                % FILE_FIELD[endpoint].encode()
                + data[: len(data) // 2]
            )
            c.headers = {"content-type": "multipart/form-data; boundary=abc"}
        else:  # "part_ctype": a valid multipart whose part claims to be JSON
            c.files = _one_file(endpoint, "frame.png", data, "application/json")
    elif kind == "odd_fields":
        _, data = _valid_file(rng, "png", 32, 32)
        if variant == "pixel_size":
            c.endpoint = "/segment"
            c.files = _one_file("/segment", "frame.png", data)
            c.data = {"pixel_size": str(rng.choice(["-1", "0", "abc", "nan", "inf", "1e400", "", "1,5"]))}
        elif variant == "pixel_unit":
            c.endpoint = "/segment"
            c.files = _one_file("/segment", "frame.png", data)
            c.data = {
                "pixel_size": "0.5",
                "pixel_unit": str(rng.choice(["x" * 500, "\u00b5m", "", "nm\x00"])),
            }
        elif variant == "k" and "/similar" in endpoints:
            c.endpoint = "/similar"
            c.files = _one_file("/similar", "frame.png", data)
            c.params = {
                "k": str(rng.choice(["0", "-1", "abc", "100000", "1e9", "", "3.5", "99999999999999999999"]))
            }
        elif variant in ("format", "k"):
            c.endpoint = "/segment"
            c.files = _one_file("/segment", "frame.png", data)
            c.params = {"format": str(rng.choice(["xml", "", "PNG", "png\x00", "j" * 300]))}
        elif variant == "filename":
            fname = str(
                rng.choice(["../../etc/passwd", "a" * 5000, "\u00e9\u00e8\u2603.png", "x\r\ny.png", ""])
            )
            c.files = _one_file(endpoint, fname, data)
        elif variant == "many_files":
            c.endpoint = "/classify"
            c.files = [
                ("images", (f"f{i}.png", data, "image/png")) for i in range(int(rng.integers(65, 100)))
            ]
        else:  # "mixed_batch": a good file and a broken one in one request
            c.endpoint = "/classify"
            c.files = [
                ("images", ("good.png", data, "image/png")),
                ("images", ("bad.png", data[:40], "image/png")),
            ]
    elif kind == "valid":
        fname, data = _valid_file(rng, fmt, int(rng.integers(16, 96)), int(rng.integers(16, 96)))
        c.files = _one_file(endpoint, fname, data, "application/octet-stream")
        c.expect_ok = True
    else:
        raise ValueError(f"unknown kind {kind!r}")
    return c


VARIANTS: dict[str, tuple[str, ...]] = {
    "truncated": _FORMATS,
    "bitflip": _FORMATS,
    "random": ("bare", "png", "tiff", "bigtiff", "dm4", "jpeg", "mrc_like"),
    "huge_dims": ("png", "png_wide", "png16", "tiff", "dm4", "mrc", "bomb"),
    "nonfinite": (
        "all_nan",
        "all_inf",
        "all_neginf",
        "mixed_inf",
        "some_nan",
        "one_finite",
        "huge_finite",
        "all_nan_dm4",
    ),
    "extreme_shape": (
        "1x1",
        "1x100000",
        "100000x1",
        "1x2",
        "2x1",
        "3x5000",
        "constant",
        "rgba",
        "stack",
        "volume4d",
    ),
    "no_file": ("text_only", "empty_form", "field_as_text", "empty_file"),
    "wrong_field": ("other", "file", "upper", "blank"),
    "wrong_content_type": (
        "json",
        "text",
        "raw_png",
        "octet",
        "none",
        "no_boundary",
        "bad_boundary",
        "unterminated",
        "part_ctype",
    ),
    "odd_fields": ("pixel_size", "pixel_unit", "format", "k", "filename", "many_files", "mixed_batch"),
    "valid": ("png", "tiff16", "tiff_float", "jpeg", "dm4", "dm3", "mrc"),
}

#: How often each kind is drawn (corrupt files dominate: they exercise the decoders).
WEIGHTS: dict[str, float] = {
    "truncated": 4,
    "bitflip": 5,
    "random": 2,
    "huge_dims": 1,
    "nonfinite": 1,
    "extreme_shape": 1,
    "no_file": 0.5,
    "wrong_field": 0.5,
    "wrong_content_type": 1,
    "odd_fields": 1,
    "valid": 1,
}


def generate(
    n: int, seed: int = 0, *, skip_heavy: bool = False, endpoints: tuple[str, ...] = ENDPOINTS
) -> Iterator[Case]:
    """Yields ``n`` hostile cases; every kind and variant appears once before random draws begin.

    Args:
        n: number of cases.
        seed: RNG seed (a run is reproducible from ``(n, seed)``).
        skip_heavy: leave out the cases that cost the server real work even when refused properly
            (the 100000-pixel strips on ``/segment``), for the fast default tests.
        endpoints: upload endpoints to draw from (those of :data:`FILE_FIELD` the server has).
    """
    endpoints = tuple(e for e in endpoints if e in FILE_FIELD) or ENDPOINTS
    rng = np.random.default_rng(seed)
    fixed = [(k, v) for k in KINDS for v in VARIANTS[k]]
    kinds = list(WEIGHTS)
    p = np.array([WEIGHTS[k] for k in kinds], dtype=float)
    p /= p.sum()
    for i in range(n):
        if i < len(fixed):
            kind, variant = fixed[i]
        else:
            kind = kinds[int(rng.choice(len(kinds), p=p))]
            variant = VARIANTS[kind][int(rng.integers(len(VARIANTS[kind])))]
        case = _case(kind, i, variant, rng, endpoints)
        if skip_heavy and case.kind == "extreme_shape" and case.endpoint == "/segment":
            case.endpoint = "/classify"
            case.files = [("images", f[1]) for f in case.files]
        yield case
