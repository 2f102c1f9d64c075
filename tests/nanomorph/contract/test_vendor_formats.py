"""Vendor formats: Velox EMD, TIA SER (+ .emi), FEI/Thermo Fisher and OME TIFF calibration.

No installed library writes EMD or SER, so ``tests.fixtures.emfiles`` builds minimal files in the
layout rosettasciio's readers walk (Velox: ``/Version`` + ``/Data/Image/<id>/{Data,Metadata}``;
SER: series header, dimension record, offset arrays, one image element). The FEI and OME TIFFs
are written by tifffile with the vendor tag / OME-XML. Every file is read from a path and from
bytes, as the pipelines and the service do.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import pytest
import tifffile

from nanomorph.contract import (
    CorruptImageError,
    ImageDimensionError,
    ImageTooLargeError,
    UnsupportedFormatError,
    is_companion,
    list_files,
    list_images,
    peek_shape,
    read_image,
)
from tests.fixtures.emfiles import (
    emi_bytes,
    fei_tiff_bytes,
    ome_tiff_bytes,
    ser_bytes,
    velox_emd_bytes,
)

IMG = (np.arange(24 * 32).reshape(24, 32) % 251).astype(np.uint16)


def _both(path: Path, data: bytes) -> list[tuple[np.ndarray, object]]:
    """Reads ``data`` from a file at ``path`` and from memory; both must agree."""
    path.write_bytes(data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # multi-image warnings are asserted elsewhere
        results = [read_image(path), read_image(data, name=path.name)]
    assert peek_shape(path) == peek_shape(data, name=path.name) == results[0][0].shape
    return results


# ------------------------------------------------------------------------------------------- EMD


def test_velox_emd_reads_first_image_with_pixel_size_in_nm(tmp_path: Path) -> None:
    pytest.importorskip("h5py")
    data = velox_emd_bytes([IMG, IMG.astype(np.float32) * 2], pixel_size_m=1.5e-10)
    for image, meta in _both(tmp_path / "haadf.emd", data):
        assert image.dtype == np.float32 and np.array_equal(image, IMG)
        assert meta.source_format == "emd" and meta.dtype == "uint16" and meta.n_pages == 2  # type: ignore[attr-defined]
        assert meta.pixel_unit == "nm" and meta.pixel_size == pytest.approx(0.15)  # type: ignore[attr-defined]
    with pytest.warns(UserWarning, match="2 images; reading only the first"):
        read_image(tmp_path / "haadf.emd")
    # Micrometre calibration converts too.
    _, meta = read_image(velox_emd_bytes([IMG], pixel_size_m=0.02, unit="µm"), name="um.emd")
    assert meta.pixel_size == pytest.approx(20.0) and meta.pixel_unit == "nm"


def test_velox_emd_without_pixel_size_is_uncalibrated(tmp_path: Path) -> None:
    pytest.importorskip("h5py")
    _, meta = read_image(velox_emd_bytes([IMG], pixel_size_m=None), name="raw.emd")
    assert meta.pixel_size is None and meta.pixel_unit is None


def test_bad_emd_files_give_clear_errors(tmp_path: Path) -> None:
    h5py = pytest.importorskip("h5py")
    stack = velox_emd_bytes([np.stack([IMG, IMG], axis=-1)])
    with pytest.raises(ImageDimensionError, match="stack.emd.*3-D"):
        read_image(stack, name="stack.emd")
    buf = io.BytesIO()
    with h5py.File(buf, "w") as f:
        f.create_dataset("something", data=np.zeros((4, 4)))
    with pytest.raises(UnsupportedFormatError, match="other.h5: an HDF5 file that is not an EMD"):
        read_image(buf.getvalue(), name="other.h5")
    whole = velox_emd_bytes([IMG])
    with pytest.raises(CorruptImageError, match="cut.emd"):
        read_image(whole[: len(whole) // 2], name="cut.emd")
    with pytest.raises(ImageTooLargeError, match="big.emd"):
        read_image(whole, name="big.emd", max_pixels=100)


# ------------------------------------------------------------------------------------------- SER


def test_tia_ser_reads_with_pixel_size_in_nm(tmp_path: Path) -> None:
    for image, meta in _both(tmp_path / "frame_1.ser", ser_bytes(IMG, pixel_size_m=2e-10)):
        assert np.array_equal(image, IMG)  # TIA stores the bottom row first: flipped back
        assert meta.source_format == "ser" and meta.pixel_size == pytest.approx(0.2)  # type: ignore[attr-defined]
        assert meta.pixel_unit == "nm"  # type: ignore[attr-defined]
    float_img = np.linspace(-1, 1, 20 * 10, dtype=np.float32).reshape(20, 10)
    image, _ = read_image(ser_bytes(float_img), name="f_1.ser")
    assert np.array_equal(image, float_img)


def test_tia_emi_companion_sets_a_diffraction_calibration(tmp_path: Path) -> None:
    (tmp_path / "dp_1.ser").write_bytes(ser_bytes(IMG, pixel_size_m=5e7))  # 1/m in diffraction
    (tmp_path / "dp.emi").write_bytes(emi_bytes("TEM Diffraction"))
    _, meta = read_image(tmp_path / "dp_1.ser")
    assert meta.pixel_unit == "1 / nm" and meta.pixel_size == pytest.approx(0.05)
    (tmp_path / "dp.emi").write_bytes(emi_bytes("TEM Imaging"))
    assert read_image(tmp_path / "dp_1.ser")[1].pixel_unit == "nm"
    with pytest.raises(UnsupportedFormatError, match=r"dp.emi: .*metadata only.*_1.ser"):
        read_image(tmp_path / "dp.emi")


def test_bad_ser_files_give_clear_errors() -> None:
    whole = ser_bytes(IMG)
    with pytest.raises(CorruptImageError, match="cut_1.ser: SER file is truncated"):
        read_image(whole[:-100], name="cut_1.ser")
    with pytest.raises(ImageTooLargeError, match="big_1.ser"):
        read_image(whole, name="big_1.ser", max_pixels=100)
    spectrum = bytearray(whole)
    spectrum[6:10] = (0x4120).to_bytes(4, "little")
    with pytest.raises(UnsupportedFormatError, match="spectrum"):
        read_image(bytes(spectrum), name="eds_1.ser")
    series = bytearray(whole)
    series[14:22] = (3).to_bytes(4, "little") * 2  # three images in the series
    with pytest.raises(ImageDimensionError, match="series_1.ser"):
        read_image(bytes(series), name="series_1.ser")


# ------------------------------------------------------------------------------------ TIFF flavours


@pytest.mark.parametrize("tag", [34680, 34682])
def test_fei_tiff_pixel_width_in_metres(tmp_path: Path, tag: int) -> None:
    for image, meta in _both(tmp_path / "sem.tif", fei_tiff_bytes(IMG, 1.25e-9, tag=tag)):
        assert np.array_equal(image, IMG)
        assert meta.pixel_size == pytest.approx(1.25) and meta.pixel_unit == "nm"  # type: ignore[attr-defined]


@pytest.mark.parametrize(("size", "unit", "nm"), [(0.5, "nm", 0.5), (0.002, "µm", 2.0), (0.003, None, 3.0)])
def test_ome_tiff_physical_size(tmp_path: Path, size: float, unit: str | None, nm: float) -> None:
    for _, meta in _both(tmp_path / "a.ome.tif", ome_tiff_bytes(IMG, size, unit)):
        assert meta.pixel_size == pytest.approx(nm) and meta.pixel_unit == "nm"  # type: ignore[attr-defined]


def test_plain_tiff_stays_uncalibrated() -> None:
    buf = io.BytesIO()
    tifffile.imwrite(buf, IMG, resolution=(300, 300))  # print DPI, no length unit
    assert read_image(buf.getvalue(), name="dpi.tif")[1].pixel_size is None


# ---------------------------------------------------------------------------------------- listing


def test_listing_includes_vendor_formats_and_accounts_for_every_file(tmp_path: Path) -> None:
    (tmp_path / "a.emd").write_bytes(b"x")
    (tmp_path / "b_1.ser").write_bytes(b"x")
    (tmp_path / "b.emi").write_bytes(b"x")
    (tmp_path / "lonely.emi").write_bytes(b"x")
    (tmp_path / "notes.txt").write_bytes(b"x")
    (tmp_path / ".hidden.tif").write_bytes(b"x")
    assert [p.name for p in list_images(tmp_path)] == ["a.emd", "b_1.ser"]
    assert [p.name for p in list_files(tmp_path)] == ["a.emd", "b.emi", "b_1.ser", "lonely.emi", "notes.txt"]
    assert is_companion(tmp_path / "b.emi") and not is_companion(tmp_path / "lonely.emi")
    assert not is_companion(tmp_path / "notes.txt")
