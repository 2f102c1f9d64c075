"""``nanomorph map``: a 2-D map of the embeddings of a folder, to see clusters, outliers and
mislabeled images.

Every image is embedded with a stored ``embed`` (or ``classify``) model (onnxruntime, no torch) and
projected to 2-D with PCA (numpy SVD of the centred embeddings; Pearson, 1901) or, when the
``umap-learn`` package is importable, UMAP (McInnes et al., 2018; ``--method umap`` / ``auto``).
When the folder is a classification layout (every image in a first-level class folder, or a
``labels.csv``), points are coloured by class and images whose embedding lies nearer another
class's centroid than their own (leave-one-out, cosine) are listed as *suspects*: candidates for
a wrong label, or for a class the encoder cannot tell apart.

Outputs: ``--out map.png`` (Pillow; thumbnails with class-coloured frames, or dots for big folders),
``map.csv`` beside it (path, class, x, y, suspect), and with ``--html map.html`` a self-contained page
(inline SVG with base64 thumbnails and hover titles; no scripts, no CDN) that opens offline.
"""

from __future__ import annotations

import argparse
import base64
import csv
import html
import io
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image, ImageDraw, ImageFont

from nanomorph.atomic import atomic_write_bytes, atomic_write_text
from nanomorph.config import resolved
from nanomorph.contract import Contract, ImageReadError, list_images, normalise, read_image, resize

log = logging.getLogger(__name__)

METHODS = ("auto", "pca", "umap")
# Tableau 10: distinguishable, colour-blind-tolerable class colours.
PALETTE = [
    "#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f",
    "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac",
]  # fmt: skip
UNLABELED_COLOUR = "#555555"


# ------------------------------------------------------------------------------------- projection


def pca_2d(x: np.ndarray) -> tuple[np.ndarray, list[float]]:
    """First two principal components (numpy SVD) and their explained-variance ratios."""
    x = np.asarray(x, dtype=np.float64)
    if len(x) == 0:
        return np.zeros((0, 2)), [0.0, 0.0]
    c = x - x.mean(axis=0, keepdims=True)
    _, s, vt = np.linalg.svd(c, full_matrices=False)
    coords = c @ vt[:2].T
    if coords.shape[1] < 2:
        coords = np.pad(coords, ((0, 0), (0, 2 - coords.shape[1])))
    var = s**2
    total = float(var.sum()) or 1.0
    ratios = [float(v / total) for v in var[:2]] + [0.0] * max(0, 2 - len(var))
    # Sign convention so the picture does not flip between runs: largest |loading| positive.
    for k in range(min(2, vt.shape[0])):
        if vt[k][np.argmax(np.abs(vt[k]))] < 0:
            coords[:, k] *= -1
    return coords, ratios


def project(x: np.ndarray, method: str = "auto", seed: int = 0) -> tuple[np.ndarray, str]:
    """2-D coordinates of the rows of ``x`` and a description of the method used."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; one of {', '.join(METHODS)}")
    if method in ("auto", "umap") and len(x) >= 10:
        try:
            import umap  # type: ignore[import-not-found]
        except ImportError:
            if method == "umap":
                raise ValueError(
                    "--method umap needs the umap-learn package (pip install umap-learn)"
                ) from None
        else:
            reducer = umap.UMAP(
                n_components=2, metric="cosine", random_state=seed, n_neighbors=min(15, len(x) - 1)
            )
            return np.asarray(reducer.fit_transform(x), dtype=np.float64), "UMAP (cosine)"
    coords, ratios = pca_2d(x)
    return coords, f"PCA (PC1 {ratios[0]:.0%}, PC2 {ratios[1]:.0%} of variance)"


# ------------------------------------------------------------------------------------------ classes


def folder_classes(root: Path, paths: Sequence[Path]) -> list[str | None]:
    """Class of each image from the layout: ``labels.csv`` (path,label) in ``root`` when present,
    else the folder name when every image lies directly in a first-level folder (``root/<class>/<file>``)
    and there are at least two such folders; otherwise None for every image."""
    labels_csv = root / "labels.csv"
    if labels_csv.is_file():
        with open(labels_csv, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            if not reader.fieldnames or not {"path", "label"} <= set(reader.fieldnames):
                raise ValueError(f"{labels_csv}: needs columns path,label")
            table = {(root / r["path"]).resolve(): r["label"] for r in reader}
        return [table.get(p.resolve()) for p in paths]
    rels = [p.relative_to(root).parts for p in paths]
    # Exactly root/<class>/<file> for every image: a data set root (unlabeled/ + classification/...)
    # or a dated archive tree is not mistaken for classes.
    if rels and all(len(r) == 2 for r in rels) and len({r[0] for r in rels}) >= 2:
        return [r[0] for r in rels]
    return [None] * len(paths)


def suspects(x: np.ndarray, labels: Sequence[str | None]) -> list[dict[str, Any]]:
    """Labeled images nearer another class's centroid than their own (leave-one-out, cosine).

    Returns:
        ``[{"index", "label", "nearest", "margin"}]``, biggest ``margin`` (how much nearer the
        other class is, in cosine similarity) first.
    """
    names = sorted({lab for lab in labels if lab is not None})
    if len(names) < 2:
        return []
    xu = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    sums = {c: np.zeros(x.shape[1]) for c in names}
    counts = dict.fromkeys(names, 0)
    for v, lab in zip(xu, labels, strict=True):
        if lab is not None:
            sums[lab] += v
            counts[lab] += 1
    found = []
    for i, (v, lab) in enumerate(zip(xu, labels, strict=True)):
        if lab is None or counts[lab] < 2:
            continue
        sims = {}
        for c in names:
            s, k = (sums[c] - v, counts[c] - 1) if c == lab else (sums[c], counts[c])
            cen = s / max(k, 1)
            sims[c] = float(v @ cen / max(np.linalg.norm(cen), 1e-12))
        nearest = max(sims, key=lambda c: sims[c])
        if nearest != lab:
            found.append({"index": i, "label": lab, "nearest": nearest, "margin": sims[nearest] - sims[lab]})
    return sorted(found, key=lambda r: -r["margin"])


# ----------------------------------------------------------------------------------------- drawing


def _rgb(hex_colour: str) -> tuple[int, int, int]:
    h = hex_colour.lstrip("#")
    return int(h[0:2], 16), int(h[2:4], 16), int(h[4:6], 16)


def _colours(labels: Sequence[str | None]) -> dict[str | None, str]:
    names = sorted({lab for lab in labels if lab is not None})
    table: dict[str | None, str] = {c: PALETTE[i % len(PALETTE)] for i, c in enumerate(names)}
    table[None] = UNLABELED_COLOUR
    return table


def _canvas_height(coords: np.ndarray, width: int) -> int:
    """Canvas height following the map's aspect ratio (between 40 % and 100 % of the width)."""
    if len(coords) < 2:
        return width
    span = np.maximum(coords.max(axis=0) - coords.min(axis=0), 1e-9)
    return int(width * float(np.clip(span[1] / span[0], 0.4, 1.0)))


def _layout(coords: np.ndarray, width: int, height: int, margin: int) -> np.ndarray:
    """Coordinates scaled into the canvas (y up, as in a plot), aspect ratio kept."""
    if len(coords) == 0:
        return coords
    lo, hi = coords.min(axis=0), coords.max(axis=0)
    span = np.maximum(hi - lo, 1e-9)
    scale = min((width - 2 * margin) / span[0], (height - 2 * margin) / span[1])
    centre = (lo + hi) / 2
    px = (coords[:, 0] - centre[0]) * scale + width / 2
    py = height / 2 - (coords[:, 1] - centre[1]) * scale
    return np.stack([px, py], axis=1)


def render_png(
    coords: np.ndarray,
    thumbs: Sequence[np.ndarray],
    labels: Sequence[str | None],
    dest: str | Path,
    title: str = "",
    size: int = 1200,
    thumb: int = 40,
    max_thumbs: int = 600,
    suspect_ids: Sequence[int] = (),
) -> Path:
    """Draws the map with Pillow: thumbnails in class-coloured frames (dots beyond ``max_thumbs``)."""
    width, height, top = size, _canvas_height(coords, size), 30
    img = Image.new("RGB", (width, height + top), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    pos = _layout(coords, width, height, margin=thumb) + np.array([0, top])
    colours = _colours(labels)
    use_thumbs = len(coords) <= max_thumbs
    bad = set(suspect_ids)
    for i in range(len(coords)):
        x, y = (int(round(v)) for v in pos[i])
        colour = _rgb(colours[labels[i]])
        if use_thumbs:
            h = thumb // 2
            frame = 3 if i in bad else 2
            draw.rectangle([x - h - frame, y - h - frame, x + h + frame - 1, y + h + frame - 1], fill=colour)
            img.paste(Image.fromarray(thumbs[i]).resize((thumb, thumb)).convert("RGB"), (x - h, y - h))
        else:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour, outline=(0, 0, 0) if i in bad else None)
    draw.text((8, 8), title, fill=(0, 0, 0), font=font)
    named = [c for c in colours if c is not None]
    for k, c in enumerate(named):
        y = top + 8 + 16 * k
        draw.rectangle([width - 150, y, width - 138, y + 12], fill=_rgb(colours[c]))
        draw.text((width - 132, y), str(c), fill=(0, 0, 0), font=font)
    dest = Path(dest)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    atomic_write_bytes(dest, buf.getvalue())
    return dest


def _png_b64(array: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def render_html(
    coords: np.ndarray,
    thumbs: Sequence[np.ndarray],
    labels: Sequence[str | None],
    names: Sequence[str],
    dest: str | Path,
    title: str = "",
    found: Sequence[dict[str, Any]] = (),
    size: int = 1000,
    thumb: int = 36,
    max_thumbs: int = 2000,
) -> Path:
    """A self-contained HTML page: inline SVG, base64 thumbnails, hover titles, a suspects table."""
    height = _canvas_height(coords, size)
    pos = _layout(coords, size, height, margin=thumb)
    colours = _colours(labels)
    use_thumbs = len(coords) <= max_thumbs
    bad = {r["index"] for r in found}
    items = []
    for i in range(len(coords)):
        x, y = pos[i]
        tip = html.escape(f"{names[i]}" + (f" [{labels[i]}]" if labels[i] is not None else ""))
        c = colours[labels[i]]
        if use_thumbs:
            h = thumb / 2
            sw = 4 if i in bad else 2
            items.append(
                f'<g><title>{tip}</title><rect x="{x - h:.1f}" y="{y - h:.1f}" width="{thumb}" height="{thumb}" '
                f'fill="none" stroke="{c}" stroke-width="{sw}"/><image x="{x - h:.1f}" y="{y - h:.1f}" '
                f'width="{thumb}" height="{thumb}" href="data:image/png;base64,{_png_b64(thumbs[i])}"/></g>'
            )
        else:
            items.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{c}"><title>{tip}</title></circle>')
    legend = "".join(
        f'<span class="key"><span class="sw" style="background:{colours[c]}"></span>{html.escape(str(c))}</span>'
        for c in colours
        if c is not None
    )
    rows = "".join(
        f"<tr><td>{html.escape(names[r['index']])}</td><td>{html.escape(str(r['label']))}</td>"
        f"<td>{html.escape(str(r['nearest']))}</td><td>{r['margin']:.3f}</td></tr>"
        for r in found
    )
    table = (
        "<h2>Suspects: nearer another class's centroid than their own</h2>"
        "<table><tr><th>image</th><th>label</th><th>nearest class</th><th>margin</th></tr>"
        + rows
        + "</table>"
        if found
        else ""
    )
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>nanomorph map</title>
<style>
body {{ font-family: sans-serif; margin: 1em; }}
svg {{ border: 1px solid #ccc; background: #fff; }}
svg g:hover image {{ transform-box: fill-box; transform-origin: center; transform: scale(3); }}
svg g:hover {{ outline: none; }}
.key {{ margin-right: 1.2em; }} .sw {{ display: inline-block; width: 12px; height: 12px; margin-right: 4px; }}
table {{ border-collapse: collapse; }} td, th {{ border: 1px solid #ccc; padding: 2px 6px; }}
</style></head><body>
<h1>nanomorph map</h1><p>{html.escape(title)} &middot; {len(coords)} images &middot; hover for names</p>
<p>{legend}</p>
<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {size} {height}" width="{size}" height="{height}">
{chr(10).join(items)}
</svg>
{table}
</body></html>
"""
    atomic_write_text(dest, page)
    return Path(dest)


# -------------------------------------------------------------------------------------------- the command (nanomorph.cli calls run)


def run(args: argparse.Namespace) -> int:
    from nanomorph.archive.index import Progress, load_embedder
    from nanomorph.store import default_store

    root = Path(args.input_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"input folder {root} does not exist")
    if args.max_images < 2:
        raise ValueError(f"--max-images must be >= 2, got {args.max_images}")
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise ValueError(f"--out {out}: the map is a PNG file (name it *.png)")
    out.parent.mkdir(parents=True, exist_ok=True)
    files = list_images(root)
    if len(files) > args.max_images:
        rng = np.random.default_rng(args.seed)
        files = sorted(files[i] for i in rng.choice(len(files), args.max_images, replace=False))
        log.info("mapping a random sample of %d images", len(files))
    if len(files) < 2:
        raise ValueError(f"{root}: need at least 2 supported images to map, found {len(files)}")
    embedder = load_embedder(args.tag, args.store or default_store(), args.batch_size)
    kept: list[Path] = []
    thumbs: list[np.ndarray] = []
    vecs: list[np.ndarray] = []
    progress = Progress(len(files), "map")
    for start in range(0, len(files), 64):
        images = []
        for p in files[start : start + 64]:
            try:
                image, _ = read_image(p)
            except (ImageReadError, OSError) as exc:
                log.warning("skipping %s: %s", p, exc)
                continue
            images.append(image)
            kept.append(p)
            thumbs.append(
                np.rint(resize(normalise(image, Contract()), (48, 48)) * 255).clip(0, 255).astype(np.uint8)
            )
        if images:
            vecs.append(np.asarray(embedder.embed(images), dtype=np.float32))
        progress.update(len(files[start : start + 64]))
    progress.close()
    if len(kept) < 2:
        raise ValueError(f"{root}: fewer than 2 readable images")
    x = np.concatenate(vecs)
    labels = folder_classes(root, kept)
    coords, method = project(x, args.method, args.seed)
    found = suspects(x, labels)
    bad = [r["index"] for r in found]
    title = f"{embedder.model.stored.tag} · {method}"
    names = [p.relative_to(root).as_posix() for p in kept]
    render_png(coords, thumbs, labels, out, title=title, suspect_ids=bad)
    by_index = {r["index"]: r for r in found}
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["path", "class", "x", "y", "suspect_nearest_class"])
    for i, name in enumerate(names):
        w.writerow(
            [
                name,
                labels[i] or "",
                f"{coords[i, 0]:.6f}",
                f"{coords[i, 1]:.6f}",
                by_index.get(i, {}).get("nearest", ""),
            ]
        )
    atomic_write_text(out.with_suffix(".csv"), buf.getvalue())
    if args.html:
        Path(args.html).parent.mkdir(parents=True, exist_ok=True)
        render_html(coords, thumbs, labels, names, args.html, title=title, found=found)
    # Beside the PNG as <stem>.yaml, not config.yaml: the map often lands in a folder holding other outputs.
    atomic_write_text(out.with_suffix(".yaml"), yaml.safe_dump(resolved(args), sort_keys=True))
    n_cls = len({lab for lab in labels if lab is not None})
    print(
        f"map of {len(kept)} images ({method}{f', {n_cls} classes, {len(found)} suspects' if n_cls else ''}): "
        f"{out}" + (f", {args.html}" if args.html else "")
    )
    return 0
