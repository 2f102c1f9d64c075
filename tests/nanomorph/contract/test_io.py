"""Reading TEM images: every format written to disk for real, read from paths and from bytes.

DigitalMicrograph files cannot be written by rosettasciio, so ``tests.fixtures.emfiles.dm_bytes`` builds minimal
DM3/DM4 files tag by tag, in the layout rosettasciio's reader walks (header, root tag group,
``ImageList`` with ``ImageData`` = calibrations, data array, data type, dimensions). A test on a
real DM4 from acquisition software runs too when ``/work/shared`` is present.
"""

from __future__ import annotations

import io
import json
import struct
import tracemalloc
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from nanomorph.contract import (
    CorruptImageError,
    EmptyImageError,
    ImageDimensionError,
    ImageReadError,
    ImageTooLargeError,
    NonFiniteImageError,
    UnsupportedFormatError,
    list_images,
    peek_shape,
    read_image,
)
from tests.fixtures.emfiles import dm_bytes

REAL_DM4 = (
    Path(__file__).resolve().parents[4] / "shared" / "data" / "em-formats" / "jeol_haadf_nanoparticles.dm4"
)
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
RNG = np.random.default_rng(0)


# ------------------------------------------------------------------------------------------------
# Writers for formats no installed library writes.


def _mrc_bytes(arr: np.ndarray, mode: int = 2, pixel_angstrom: float = 0.0, stamp: bool = True) -> bytes:
    """An MRC2014 file (1024-byte header written field by field, little endian)."""
    nz, ny, nx = arr.shape if arr.ndim == 3 else (1, *arr.shape)
    header = bytearray(1024)
    struct.pack_into("<4i", header, 0, nx, ny, nz, mode)
    struct.pack_into("<3i", header, 28, nx, ny, nz)  # MX, MY, MZ: sampling = image size
    struct.pack_into("<3f", header, 40, nx * pixel_angstrom, ny * pixel_angstrom, nz * pixel_angstrom)
    struct.pack_into("<3f", header, 52, 90.0, 90.0, 90.0)
    struct.pack_into("<3i", header, 64, 1, 2, 3)
    if stamp:
        header[208:212] = b"MAP "
        header[212:214] = b"\x44\x44"  # little endian
    return bytes(header) + np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<")).tobytes()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG with a valid IHDR claiming ``width`` x ``height`` but a tiny IDAT (a decompression bomb shape)."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return (
            struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


def _tiff_header_only(width: int, height: int) -> bytes:
    """A classic little-endian TIFF whose one IFD claims ``width`` x ``height`` uint8 with 16 bytes of data."""
    entries = [  # (tag, type, value); type 3 = SHORT, 4 = LONG
        (256, 4, width),
        (257, 4, height),
        (258, 3, 8),
        (259, 3, 1),
        (262, 3, 1),
        (273, 4, 0),  # StripOffsets, patched below
        (277, 3, 1),
        (278, 4, height),
        (279, 4, 16),
    ]
    data_offset = 8 + 2 + 12 * len(entries) + 4
    ifd = struct.pack("<H", len(entries))
    for tag, kind, value in entries:
        value = data_offset if tag == 273 else value
        packed = struct.pack("<HI", value, 0)[:4] if kind == 3 else struct.pack("<I", value)
        ifd += struct.pack("<HHI", tag, kind, 1) + packed
    return b"II*\x00" + struct.pack("<I", 8) + ifd + struct.pack("<I", 0) + b"\x00" * 16


def _png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _read_both(path: Path, **kwargs):
    """Reads a file from its path and from its bytes; both must agree."""
    from_path, meta = read_image(path, **kwargs)
    from_bytes, meta_b = read_image(path.read_bytes(), name=path.name, **kwargs)
    np.testing.assert_array_equal(from_path, from_bytes)
    assert meta_b.name == path.name and meta.name == str(path)
    assert (meta.source_format, meta.dtype, meta.shape, meta.pixel_size, meta.pixel_unit) == (
        meta_b.source_format,
        meta_b.dtype,
        meta_b.shape,
        meta_b.pixel_size,
        meta_b.pixel_unit,
    )
    assert from_path.dtype == np.float32 and from_path.ndim == 2
    assert peek_shape(path) == from_path.shape == peek_shape(path.read_bytes(), name=path.name)
    return from_path, meta


# ------------------------------------------------------------------------------------------------
# Formats.


@pytest.mark.parametrize("dtype", ["uint8", "uint16"])
def test_png_grey_is_read_exactly(tmp_path: Path, dtype: str) -> None:
    top = np.iinfo(dtype).max
    arr = RNG.integers(0, top, size=(40, 56), endpoint=True).astype(dtype)
    path = tmp_path / "frame.png"
    Image.fromarray(arr).save(path)
    img, meta = _read_both(path)
    np.testing.assert_array_equal(img, arr.astype(np.float32))
    assert (meta.source_format, meta.dtype, meta.shape, meta.n_pages) == ("png", dtype, (40, 56), 1)
    assert meta.pixel_size is None and meta.pixel_unit is None
    assert json.loads(json.dumps(meta.to_dict()))["shape"] == [40, 56]


@pytest.mark.parametrize("mode", ["RGB", "RGBA"])
def test_colour_png_becomes_bt601_luminance_and_alpha_is_dropped(tmp_path: Path, mode: str) -> None:
    arr = RNG.integers(0, 255, size=(32, 48, len(mode)), endpoint=True).astype(np.uint8)
    if mode == "RGBA":
        arr[..., 3] = RNG.integers(0, 255, size=(32, 48))  # alpha must not leak into grey values
    path = tmp_path / f"colour_{mode}.png"
    Image.fromarray(arr, mode=mode).save(path)
    img, meta = _read_both(path)
    np.testing.assert_allclose(img, arr[..., :3].astype(np.float32) @ LUMA, atol=1e-3)
    assert meta.shape == (32, 48, len(mode)) and meta.dtype == "uint8"


def test_jpeg_grey_and_rgb(tmp_path: Path) -> None:
    yy, xx = np.mgrid[0:64, 0:64]
    smooth = (128 + 100 * np.sin(xx / 9.0) * np.cos(yy / 7.0)).astype(np.uint8)  # JPEG-friendly
    Image.fromarray(smooth).save(tmp_path / "grey.jpg", quality=95)
    img, meta = _read_both(tmp_path / "grey.jpg")
    assert meta.source_format == "jpeg" and meta.dtype == "uint8" and img.shape == (64, 64)
    assert np.abs(img - smooth).mean() < 2.0  # lossy, but close

    rgb = np.stack([smooth, smooth, smooth], axis=-1)
    Image.fromarray(rgb).save(tmp_path / "colour.jpeg", quality=95)
    img_rgb, meta_rgb = _read_both(tmp_path / "colour.jpeg")
    assert meta_rgb.shape == (64, 64, 3) and img_rgb.shape == (64, 64)
    assert np.abs(img_rgb - smooth).mean() < 2.0


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "int32", "float32"])
def test_tiff_integer_and_float_are_read_exactly(tmp_path: Path, dtype: str) -> None:
    if dtype == "float32":
        arr = RNG.normal(1000.0, 50.0, size=(36, 44)).astype(dtype)
    else:
        info = np.iinfo(dtype)
        arr = RNG.integers(
            max(info.min, -(2**20)), min(info.max, 2**20), size=(36, 44), endpoint=True
        ).astype(dtype)
    path = tmp_path / "frame.tif"
    tifffile.imwrite(path, arr)
    img, meta = _read_both(path)
    np.testing.assert_array_equal(img, arr.astype(np.float32))
    assert (meta.source_format, meta.dtype, meta.shape, meta.n_pages) == ("tiff", dtype, (36, 44), 1)


def test_multipage_tiff_gives_first_page_and_warns_with_page_count(tmp_path: Path) -> None:
    stack = RNG.integers(0, 4000, size=(3, 32, 40)).astype(np.uint16)
    path = tmp_path / "series.tiff"
    tifffile.imwrite(path, stack, photometric="minisblack")
    with pytest.warns(UserWarning, match=r"series\.tiff.*3 pages"):
        img, meta = read_image(path)
    np.testing.assert_array_equal(img, stack[0])
    assert meta.n_pages == 3 and peek_shape(path) == (32, 40)


@pytest.mark.parametrize("channels", [3, 4])
def test_rgb_and_rgba_tiff_become_luminance(tmp_path: Path, channels: int) -> None:
    arr = RNG.integers(0, 255, size=(24, 30, channels), endpoint=True).astype(np.uint8)
    path = tmp_path / "colour.tif"
    if channels == 4:
        tifffile.imwrite(path, arr, photometric="rgb", extrasamples=["unassalpha"])
    else:
        tifffile.imwrite(path, arr, photometric="rgb")
    img, meta = _read_both(path)
    np.testing.assert_allclose(img, arr[..., :3].astype(np.float32) @ LUMA, atol=1e-3)
    assert meta.shape == (24, 30, channels)


def test_lzw_tiff_without_imagecodecs_falls_back_to_pillow(tmp_path: Path) -> None:
    arr = (np.arange(40 * 50).reshape(40, 50) * 17 % 65536).astype(np.uint16)
    path = tmp_path / "lzw.tif"
    Image.fromarray(arr).save(path, compression="tiff_lzw")
    img, meta = _read_both(path)
    np.testing.assert_array_equal(img, arr.astype(np.float32))
    assert meta.source_format == "tiff"


@pytest.mark.parametrize(("unit", "size", "expected_nm"), [("nm", 0.25, 0.25), ("micron", 0.002, 2.0)])
def test_imagej_tiff_calibration_gives_pixel_size_in_nm(
    tmp_path: Path, unit: str, size: float, expected_nm: float
) -> None:
    path = tmp_path / "calibrated.tif"
    arr = np.zeros((16, 16), dtype=np.uint16)
    tifffile.imwrite(path, arr, imagej=True, resolution=(1.0 / size, 1.0 / size), metadata={"unit": unit})
    _, meta = _read_both(path)
    assert meta.pixel_unit == "nm" and meta.pixel_size == pytest.approx(expected_nm, rel=1e-5)


@pytest.mark.parametrize(("mode", "dtype"), [(2, "float32"), (1, "int16"), (6, "uint16"), (0, "uint8")])
def test_mrc_values_and_pixel_size(tmp_path: Path, mode: int, dtype: str) -> None:
    arr = RNG.integers(0, 120, size=(28, 36)).astype(dtype)
    path = tmp_path / "map.mrc"
    path.write_bytes(_mrc_bytes(arr, mode=mode, pixel_angstrom=5.0))  # 5 Å = 0.5 nm
    img, meta = _read_both(path)
    np.testing.assert_array_equal(img, arr.astype(np.float32))
    assert (meta.source_format, meta.dtype, meta.shape) == ("mrc", dtype, (28, 36))
    assert meta.pixel_unit == "nm" and meta.pixel_size == pytest.approx(0.5)


def test_mrc_without_cell_size_has_no_pixel_size_and_old_files_need_the_suffix(tmp_path: Path) -> None:
    arr = RNG.normal(size=(20, 24)).astype(np.float32)
    old = _mrc_bytes(arr, pixel_angstrom=0.0, stamp=False)  # pre-2014: no "MAP " stamp
    (tmp_path / "old.mrc").write_bytes(old)
    img, meta = read_image(tmp_path / "old.mrc")
    np.testing.assert_array_equal(img, arr)
    assert meta.pixel_size is None and meta.pixel_unit is None
    # Without the stamp only the suffix says MRC: the same bytes under another name are refused.
    with pytest.raises(UnsupportedFormatError, match="old.bin"):
        read_image(old, name="old.bin")
    # A movie-like name must not send rosettasciio looking for DE metadata files.
    (tmp_path / "movie_0001.mrc").write_bytes(_mrc_bytes(arr))
    assert read_image(tmp_path / "movie_0001.mrc")[0].shape == (20, 24)


@pytest.mark.parametrize("version", [3, 4])
@pytest.mark.parametrize("dtype", ["float32", "uint16", "int16"])
def test_synthetic_dm_file_values_and_pixel_size(tmp_path: Path, version: int, dtype: str) -> None:
    arr = RNG.integers(0, 3000, size=(24, 40)).astype(dtype)
    path = tmp_path / f"frame.dm{version}"
    path.write_bytes(dm_bytes([arr], version=version, scale=0.0125, unit="µm"))
    img, meta = _read_both(path)
    np.testing.assert_array_equal(img, arr.astype(np.float32))
    assert (meta.source_format, meta.dtype, meta.shape) == (f"dm{version}", dtype, (24, 40))
    assert meta.pixel_unit == "nm" and meta.pixel_size == pytest.approx(12.5)


def test_uncalibrated_and_multi_image_dm(tmp_path: Path) -> None:
    first, second = np.ones((16, 20), np.float32), np.zeros((8, 8), np.float32)
    path = tmp_path / "two.dm4"
    path.write_bytes(dm_bytes([first, second]))
    with pytest.warns(UserWarning, match=r"two\.dm4.*2 images"):
        img, meta = read_image(path)
    assert img.shape == (16, 20) and meta.n_pages == 2
    assert meta.pixel_size is None and meta.pixel_unit is None


@pytest.mark.skipif(
    not REAL_DM4.is_file(), reason="real DM4 sample only present beside the repo in ../shared"
)
def test_real_dm4_from_acquisition_software() -> None:
    img, meta = read_image(REAL_DM4)
    assert img.shape == (112, 112) and img.dtype == np.float32 and np.isfinite(img).all()
    assert img.std() > 0  # a real HAADF image, not the 384x384 thumbnail stored before it
    assert (meta.source_format, meta.dtype, meta.n_pages) == ("dm4", "float32", 1)
    assert meta.pixel_unit == "nm" and meta.pixel_size == pytest.approx(1.249, abs=1e-3)  # 0.001249 µm
    assert peek_shape(REAL_DM4.read_bytes()) == (112, 112)


def test_format_comes_from_content_not_suffix(tmp_path: Path) -> None:
    arr = RNG.integers(0, 255, size=(16, 16)).astype(np.uint8)
    mislabelled = tmp_path / "actually_png.tif"
    mislabelled.write_bytes(_png_bytes(arr))
    img, meta = read_image(mislabelled)
    assert meta.source_format == "png"
    np.testing.assert_array_equal(img, arr)


# ------------------------------------------------------------------------------------------------
# Bad input: each case gives its documented error, naming the file.


def test_empty_file_and_empty_upload(tmp_path: Path) -> None:
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(EmptyImageError, match="empty.png") as excinfo:
        read_image(tmp_path / "empty.png")
    assert excinfo.value.http_status == 400 and excinfo.value.reason == "empty"
    with pytest.raises(EmptyImageError, match="upload"):
        read_image(b"")


def test_unknown_format_is_415(tmp_path: Path) -> None:
    path = tmp_path / "notes.png"
    path.write_text("this is not an image\n" * 100)
    with pytest.raises(UnsupportedFormatError, match="notes.png") as excinfo:
        read_image(path)
    assert excinfo.value.http_status == 415 and isinstance(excinfo.value, ValueError)
    with pytest.raises(UnsupportedFormatError, match="upload"):
        peek_shape(b"GIF89a" + b"\x00" * 64)


def test_missing_path_is_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.tif"):
        read_image(tmp_path / "nope.tif")


def _truncated_cases(tmp_path: Path) -> dict[str, bytes]:
    arr = RNG.integers(0, 255, size=(64, 64)).astype(np.uint8)
    tif = io.BytesIO()
    tifffile.imwrite(tif, arr.astype(np.uint16))
    jpg = io.BytesIO()
    Image.fromarray(arr).save(jpg, format="JPEG")
    return {
        "cut.png": _png_bytes(arr)[:200],
        "cut.tif": tif.getvalue()[:-1500],
        "cut.jpg": jpg.getvalue()[:300],
        "cut.mrc": _mrc_bytes(arr.astype(np.float32))[:-100],
        "cut.dm4": dm_bytes([arr.astype(np.float32)])[:-2000],
        "garbage.png": b"\x89PNG\r\n\x1a\n" + b"\xab" * 300,
        "garbage.tif": b"II*\x00" + b"\xff" * 300,
        "garbage.dm3": b"\x00\x00\x00\x03\x00\x00\x01\x00\x00\x00\x00\x01" + b"\x07" * 40,
    }


def test_truncated_or_garbled_files_are_corrupt_and_name_the_file(tmp_path: Path) -> None:
    for fname, data in _truncated_cases(tmp_path).items():
        path = tmp_path / fname
        path.write_bytes(data)
        for source, label in ((path, fname), (data, "upload")):
            with pytest.raises(CorruptImageError) as excinfo, warnings.catch_warnings():
                warnings.simplefilter("ignore")
                read_image(source)
            assert label in str(excinfo.value), (fname, str(excinfo.value))
            assert excinfo.value.http_status == 400


def test_huge_png_header_is_refused_before_decoding(tmp_path: Path) -> None:
    data = _png_header_only(50000, 50000)
    path = tmp_path / "bomb.png"
    path.write_bytes(data)
    assert peek_shape(path) == (50000, 50000)  # the header alone answers
    tracemalloc.start()
    try:
        with pytest.raises(ImageTooLargeError, match="bomb.png") as excinfo:
            read_image(path)
        # A higher limit than Pillow's own: its DecompressionBombError becomes ours too.
        with pytest.raises(ImageTooLargeError, match="upload"):
            read_image(data, max_pixels=50000 * 50000)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert excinfo.value.http_status == 413
    assert peak < 20 * 2**20  # decoding would have needed gigabytes


def test_huge_tiff_header_is_refused_before_decoding(tmp_path: Path) -> None:
    path = tmp_path / "bomb.tif"
    path.write_bytes(_tiff_header_only(50000, 50000))
    assert peek_shape(path) == (50000, 50000)
    tracemalloc.start()
    try:
        with pytest.raises(ImageTooLargeError, match="bomb.tif"):
            read_image(path)
        # Allowed that many pixels, the 16 bytes of data still give it away as truncated.
        with pytest.raises(CorruptImageError, match="truncated"):
            read_image(path, max_pixels=50000 * 50000)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20 * 2**20


def test_max_pixels_applies_to_every_format(tmp_path: Path) -> None:
    arr = np.ones((32, 32), dtype=np.float32)
    tifffile.imwrite(tmp_path / "a.tif", arr)
    (tmp_path / "a.png").write_bytes(_png_bytes(arr.astype(np.uint8)))
    (tmp_path / "a.mrc").write_bytes(_mrc_bytes(arr))
    (tmp_path / "a.dm3").write_bytes(dm_bytes([arr], version=3))
    for path in sorted(tmp_path.iterdir()):
        with pytest.raises(ImageTooLargeError, match=path.name):
            read_image(path, max_pixels=32 * 32 - 1)
        assert read_image(path, max_pixels=32 * 32)[0].shape == (32, 32)


def test_stacks_and_odd_channel_counts_are_dimension_errors(tmp_path: Path) -> None:
    (tmp_path / "stack.mrc").write_bytes(_mrc_bytes(np.zeros((3, 16, 16), np.float32)))
    tifffile.imwrite(
        tmp_path / "five.tif",
        np.zeros((16, 16, 5), np.uint8),
        photometric="minisblack",
        planarconfig="contig",
    )
    (tmp_path / "stack.dm4").write_bytes(dm_bytes([np.zeros((2, 8, 8), np.float32)]))
    for fname in ("stack.mrc", "five.tif", "stack.dm4"):
        with pytest.raises(ImageDimensionError, match=fname):
            read_image(tmp_path / fname)


def test_complex_mrc_is_unsupported(tmp_path: Path) -> None:
    data = _mrc_bytes(np.zeros((8, 8), np.complex64), mode=4)
    with pytest.raises(UnsupportedFormatError, match="fft.mrc"):
        read_image(data, name="fft.mrc")


def test_partly_non_finite_pixels_become_the_median_with_a_warning(tmp_path: Path) -> None:
    arr = np.arange(64, dtype=np.float32).reshape(8, 8)
    arr[0, 0], arr[3, 4], arr[7, 7] = np.nan, np.inf, -np.inf
    path = tmp_path / "holes.tif"
    tifffile.imwrite(path, arr)
    with pytest.warns(UserWarning, match=r"holes\.tif: 3 non-finite"):
        img, _ = read_image(path)
    finite = arr[np.isfinite(arr)]
    assert np.isfinite(img).all()
    assert img[0, 0] == img[3, 4] == img[7, 7] == np.float32(np.median(finite))
    np.testing.assert_array_equal(img[np.isfinite(arr)], finite)


def test_all_non_finite_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "nan.tif"
    tifffile.imwrite(path, np.full((8, 8), np.nan, np.float32))
    with pytest.raises(NonFiniteImageError, match="nan.tif") as excinfo:
        read_image(path)
    assert isinstance(excinfo.value, ImageReadError) and excinfo.value.reason == "non_finite"


# ------------------------------------------------------------------------------------------------
# Listing folders.


def test_list_images_is_sorted_recursive_and_skips_hidden_and_other_files(tmp_path: Path) -> None:
    for rel in [
        "b/deep/x.TIF",
        "a.png",
        "b/c.dm4",
        "m.mrc",
        "j.jpeg",
        "notes.txt",
        ".hidden.png",
        ".cache/z.png",
    ]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    found = [p.relative_to(tmp_path).as_posix() for p in list_images(tmp_path)]
    assert found == ["a.png", "b/c.dm4", "b/deep/x.TIF", "j.jpeg", "m.mrc"]
    top = [p.relative_to(tmp_path).as_posix() for p in list_images(tmp_path, recursive=False)]
    assert top == ["a.png", "j.jpeg", "m.mrc"]
    with pytest.raises(FileNotFoundError, match="missing"):
        list_images(tmp_path / "missing")
    with pytest.raises(NotADirectoryError, match="a.png"):
        list_images(tmp_path / "a.png")
