"""Per-image output files people open in ordinary tools: masks, label TIFFs, overlays.

The folder pipelines (``predict``, ``client``, ``watch``) write, for an input ``run2/frame.dm4``:

``masks/run2/frame_mask.png``
    the class index per pixel as a palette PNG: any viewer shows the class colours of the
    overlays, while every PNG reader (Pillow, scikit-image, ImageJ, numpy users) still gets the
    integer index (a palette PNG stores indices). 16-bit grey when there are more than 255 classes.
``masks/run2/frame_labels.tif``
    the same indices as an ImageJ TIFF with the pixel size (XResolution + ``unit``), a glasbey-like
    lookup table and the class names in its Info: Fiji opens it calibrated, ``Analyze Particles``
    measures in nm directly.
``overlays/run2/frame_overlay.png``
    the class colours over the normalised image, a legend strip under it and, when the pixel size
    is known, a scale bar. Small images are enlarged (nearest neighbour) so the text stays legible.

Stems: the input's path without its suffix. Two inputs that differ only by suffix
(``frame.emd`` and ``frame.tif`` exported from it) keep their suffix in the stem
(``frame_emd``, ``frame_tif``) so that neither overwrites the other (:func:`output_stems`).
Only numpy, Pillow and tifffile are used.
"""

from __future__ import annotations

import io
import math
from collections import Counter
from collections.abc import Sequence
from pathlib import PurePosixPath

import numpy as np

from nanomorph.contract.io import _to_nm
from nanomorph.morphology import overlay, palette_256

#: Overlays narrower than this are enlarged by an integer factor (nearest) for a legible legend.
MIN_OVERLAY_WIDTH = 384
MAX_ENLARGE = 8


def mask_file(stem: str) -> str:
    return f"masks/{stem}_mask.png"


def labels_file(stem: str) -> str:
    return f"masks/{stem}_labels.tif"


def overlay_file(stem: str) -> str:
    return f"overlays/{stem}_overlay.png"


def output_stems(rels: Sequence[str]) -> dict[str, str]:
    """Output stem of each input path (relative, ``/``): the path without its suffix, or with the
    suffix folded in (``a.tif`` -> ``a_tif``) where two inputs in one folder share a stem."""
    plain = {rel: str(PurePosixPath(rel).with_suffix("")) for rel in rels}
    counts = Counter(plain.values())
    stems = {}
    for rel, stem in plain.items():
        suffix = PurePosixPath(rel).suffix
        stems[rel] = f"{stem}_{suffix[1:]}" if counts[stem] > 1 and suffix else stem
    return stems


def output_stem(rel: str) -> str:
    """The stem of one path on its own (no other input shares it)."""
    return output_stems([rel])[rel]


def palette_lut() -> np.ndarray:
    """(256, 3) uint8: index 0 black, then the overlay colours, cycled (as :func:`overlay` does)."""
    return palette_256()


def labels_tiff(
    mask: np.ndarray, classes: Sequence[str], pixel_size: float | None, pixel_unit: str | None
) -> bytes:
    """An ImageJ TIFF of the class indices, calibrated when the pixel size is known."""
    import tifffile

    data = mask.astype(np.uint8 if int(mask.max(initial=0)) < 256 else np.uint16)
    info = "nanomorph class mask\n" + "\n".join(f"class {i} = {name}" for i, name in enumerate(classes))
    metadata: dict[str, object] = {"Info": info}
    kwargs: dict[str, object] = {}
    if data.dtype == np.uint8:
        metadata["LUTs"] = [np.ascontiguousarray(palette_lut().T)]  # (3, 256), as ImageJ stores it
    size, unit = _to_nm((pixel_size, pixel_unit or "nm")) if pixel_size else (None, None)
    if size is not None and size > 0:
        metadata["unit"] = "nm" if unit == "nm" else str(unit)
        kwargs["resolution"] = (1.0 / size, 1.0 / size)
    buf = io.BytesIO()
    tifffile.imwrite(buf, data, imagej=True, metadata=metadata, **kwargs)  # type: ignore[arg-type]
    return buf.getvalue()


# -------------------------------------------------------------------------------------- overlays


def _font(size: int) -> object:
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # Pillow's bundled FreeType font: no files needed
    except (TypeError, ValueError, OSError):
        return ImageFont.load_default()  # Pillow without FreeType: the small bitmap font


def nice_length(max_nm: float) -> float:
    """The largest 1, 2 or 5 x 10^k (nm) not above ``max_nm``."""
    exp = math.floor(math.log10(max_nm))
    for m in (5, 2, 1):
        if m * 10**exp <= max_nm:
            return float(m * 10**exp)
    return float(10 ** (exp - 1) * 5)


def length_label(nm: float) -> str:
    if nm >= 1000:
        return f"{nm / 1000:g} µm"
    if nm < 1:
        return f"{nm * 10:g} Å"
    return f"{nm:g} nm"


def overlay_png(
    image01: np.ndarray,
    mask: np.ndarray,
    classes: Sequence[str],
    pixel_size: float | None = None,
    pixel_unit: str | None = None,
) -> bytes:
    """PNG of the class colours over ``image01`` (normalised to [0, 1]) with a legend strip and,
    when ``pixel_size`` is a length, a scale bar (bottom right of the image)."""
    from PIL import Image, ImageDraw

    n_classes = max(len(classes), int(mask.max(initial=0)) + 1)
    rgb = Image.fromarray(overlay(image01, mask, n_classes))
    width, height = rgb.size
    factor = min(MAX_ENLARGE, max(1, math.ceil(MIN_OVERLAY_WIDTH / max(width, 1))))
    if factor > 1:
        rgb = rgb.resize((width * factor, height * factor), Image.Resampling.NEAREST)
    out_w, img_h = rgb.size
    font_px = max(12, min(32, out_w // 40))
    font = _font(font_px)
    names = list(classes[1:]) or ["foreground"]
    swatch, gap = font_px, font_px // 2
    # Legend entries wrapped into lines that fit the width.
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lines: list[list[tuple[int, str, int]]] = [[]]
    x = gap
    for i, name in enumerate(names, start=1):
        w = swatch + gap // 2 + int(probe.textlength(name, font=font)) + gap * 2  # type: ignore[arg-type]
        if lines[-1] and x + w > out_w:
            lines.append([])
            x = gap
        lines[-1].append((i, name, x))
        x += w
    line_h = font_px + gap
    canvas = Image.new("RGB", (out_w, img_h + line_h * len(lines) + gap), (32, 32, 32))
    canvas.paste(rgb, (0, 0))
    draw = ImageDraw.Draw(canvas)
    lut = palette_lut()
    for row, line in enumerate(lines):
        y = img_h + gap + row * line_h
        for index, name, x0 in line:
            colour = tuple(int(c) for c in lut[index % 256])
            draw.rectangle([x0, y, x0 + swatch - 1, y + swatch - 1], fill=colour, outline=(255, 255, 255))
            draw.text((x0 + swatch + gap // 2, y), name, fill=(255, 255, 255), font=font)  # type: ignore[arg-type]
    _scale_bar(draw, font, out_w, img_h, font_px, factor, pixel_size, pixel_unit)
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return buf.getvalue()


def _scale_bar(
    draw: object,
    font: object,
    out_w: int,
    img_h: int,
    font_px: int,
    factor: int,
    pixel_size: float | None,
    pixel_unit: str | None,
) -> None:
    """A white bar of a round length, about a fifth of the width, with its label, on a dark box."""
    if not pixel_size or pixel_size <= 0:
        return
    size_nm, unit = _to_nm((pixel_size, pixel_unit or "nm"))
    if unit != "nm" or size_nm is None:
        return  # not a length (e.g. a diffraction pattern in 1/nm): no spatial scale bar
    nm_per_out_px = size_nm / factor
    length_nm = nice_length(out_w * 0.2 * nm_per_out_px)
    bar = max(1, round(length_nm / nm_per_out_px))
    label = length_label(length_nm)
    text_w = int(draw.textlength(label, font=font))  # type: ignore[attr-defined]
    margin, thick = font_px // 2, max(3, font_px // 4)
    box_w = max(bar, text_w) + 2 * margin
    box_h = font_px + thick + 3 * margin
    x1, y1 = out_w - margin, img_h - margin
    x0, y0 = x1 - box_w, y1 - box_h
    if x0 < 0 or y0 < 0:
        return  # an image too small for a readable bar
    draw.rectangle([x0, y0, x1, y1], fill=(0, 0, 0))  # type: ignore[attr-defined]
    bx = x0 + (box_w - bar) // 2
    draw.rectangle([bx, y1 - margin - thick, bx + bar - 1, y1 - margin], fill=(255, 255, 255))  # type: ignore[attr-defined]
    draw.text((x0 + (box_w - text_w) // 2, y0 + margin // 2), label, fill=(255, 255, 255), font=font)  # type: ignore[attr-defined]


def segment_files(
    stem: str,
    mask: np.ndarray,
    classes: Sequence[str],
    pixel_size: float | None,
    pixel_unit: str | None,
    overlay_bytes: bytes | None,
) -> dict[str, bytes]:
    """The files of one segmented image, keyed by their path relative to OUT."""
    from nanomorph.morphology import mask_to_png_bytes

    files = {
        mask_file(stem): mask_to_png_bytes(mask),
        labels_file(stem): labels_tiff(mask, classes, pixel_size, pixel_unit),
    }
    if overlay_bytes is not None:
        files[overlay_file(stem)] = overlay_bytes
    return files
