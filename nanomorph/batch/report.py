"""``OUT/report.html``: one self-contained page per batch, readable without Python.

Everything is inline (base64 PNG thumbnails, SVG charts, CSS), so the file can be mailed or
opened from a network share offline. It is rebuilt from what the batch wrote (``results.jsonl``,
``errors.csv``, ``model.json``, the overlays), so it is the same whichever pipeline wrote them
(``predict``, ``client``, ``watch``, ``merge`` of shards), and it holds no timestamp: the same
results give the same bytes.

Sections: counts and the model card's key numbers; per task, class fractions and histograms
(classify: labels, confidence, out-of-distribution flags; segment: mean area fraction per class,
histograms of per-image area fraction and of per-image median domain size, in nm when calibrated)
and a contact sheet of the overlays (the first :data:`SHEET_MAX` by path); the files not read.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from nanomorph.atomic import atomic_write_text
from nanomorph.morphology import unit_key

REPORT = "report.html"
MODEL_CARD = "model.json"
SHEET_MAX = 48
THUMB_WIDTH = 220
ERRORS_MAX = 200
BAR = "#0072b2"


def model_card(
    tag: str,
    task: str,
    classes: Sequence[str],
    sha256: str | None,
    metrics: dict[str, Any] | None,
    ood_threshold: float | None,
) -> dict[str, Any]:
    """The model's key numbers as both pipelines see them (the store's manifest or the server's
    ``/models``), so that ``model.json`` is the same from either."""
    return {
        "tag": tag,
        "task": task,
        "classes": list(classes),
        "sha256": sha256,
        "metrics": metrics or {},
        "ood_threshold": ood_threshold,
    }


def write_model_card(out: Path, card: dict[str, Any]) -> None:
    from nanomorph.batch.pipelines import clean

    atomic_write_text(out / MODEL_CARD, json.dumps(clean(card), indent=1, sort_keys=True) + "\n")


def _rows(out: Path) -> list[dict[str, Any]]:
    path = out / "results.jsonl"
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return sorted(rows, key=lambda r: PurePosixPath(str(r.get("path", ""))).parts)


def _errors(out: Path) -> list[dict[str, str]]:
    path = out / "errors.csv"
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as fh:
        return sorted(csv.DictReader(fh), key=lambda r: r.get("path", ""))


# ------------------------------------------------------------------------------------ small charts


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def svg_bars(labels: Sequence[str], values: Sequence[float], unit: str = "") -> str:
    """Horizontal bar chart (inline SVG)."""
    if not labels:
        return ""
    top = max(max(values), 1e-12)
    row, label_w, bar_w = 22, 160, 320
    parts = [f'<svg width="{label_w + bar_w + 90}" height="{row * len(labels) + 6}" role="img">']
    for i, (label, value) in enumerate(zip(labels, values, strict=True)):
        y = 3 + i * row
        w = bar_w * value / top
        parts.append(
            f'<text x="{label_w - 6}" y="{y + 15}" text-anchor="end">{html.escape(label)}</text>'
            f'<rect x="{label_w}" y="{y + 3}" width="{w:.1f}" height="{row - 6}" fill="{BAR}"/>'
            f'<text x="{label_w + w + 4:.1f}" y="{y + 15}">{_fmt(value)}{html.escape(unit)}</text>'
        )
    return "".join(parts) + "</svg>"


def svg_histogram(values: Sequence[float | None], xlabel: str, bins: int = 20) -> str:
    """Histogram (inline SVG) of finite ``values``; empty string when there are none."""
    data = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if data.size == 0:
        return ""
    lo, hi = float(data.min()), float(data.max())
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    counts, edges = np.histogram(data, bins=bins, range=(lo, hi))
    width, height, pad = 420, 140, 30
    top = max(int(counts.max()), 1)
    step = width / bins
    parts = [f'<svg width="{width + 2 * pad}" height="{height + 2 * pad}" role="img">']
    for i, c in enumerate(counts):
        h = height * int(c) / top
        parts.append(
            f'<rect x="{pad + i * step:.1f}" y="{pad + height - h:.1f}" width="{step - 1:.1f}" '
            f'height="{h:.1f}" fill="{BAR}"><title>{_fmt(edges[i])} to {_fmt(edges[i + 1])}: {int(c)}</title></rect>'
        )
    parts.append(
        f'<line x1="{pad}" y1="{pad + height}" x2="{pad + width}" y2="{pad + height}" stroke="#444"/>'
        f'<text x="{pad}" y="{pad + height + 16}">{_fmt(lo)}</text>'
        f'<text x="{pad + width}" y="{pad + height + 16}" text-anchor="end">{_fmt(hi)}</text>'
        f'<text x="{pad + width / 2}" y="{pad + height + 28}" text-anchor="middle">{html.escape(xlabel)}</text>'
        f'<text x="{pad - 4}" y="{pad + 10}" text-anchor="end">{top}</text>'
        f'<text x="{pad + width}" y="{pad - 8}" text-anchor="end">n = {data.size}</text>'
    )
    return "".join(parts) + "</svg>"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_cell(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return _fmt(value)
    return "" if value is None else str(value)


def _thumbnail(path: Path) -> str | None:
    from PIL import Image

    try:
        with Image.open(path) as opened:
            im = opened.convert("RGB")
            if im.width > THUMB_WIDTH:
                im = im.resize((THUMB_WIDTH, max(1, round(im.height * THUMB_WIDTH / im.width))))
            buf = io.BytesIO()
            im.save(buf, format="PNG", optimize=True)
    except OSError:
        return None
    return base64.b64encode(buf.getvalue()).decode("ascii")


# ----------------------------------------------------------------------------------------- sections


def _card_section(card: dict[str, Any]) -> str:
    if not card:
        return "<p>No model card (model.json) in this folder.</p>"
    rows: list[tuple[str, Any]] = [("tag", card.get("tag")), ("task", card.get("task"))]
    rows.append(("classes", ", ".join(card.get("classes") or [])))
    if card.get("sha256"):
        rows.append(("model.onnx sha256", str(card["sha256"])[:16] + "..."))
    for key, value in sorted((card.get("metrics") or {}).items()):
        if isinstance(value, int | float) and not isinstance(value, bool):
            rows.append((f"test {key}", value))
    if card.get("ood_threshold") is not None:
        rows.append(("OOD threshold", card["ood_threshold"]))
    return "<h2>Model</h2>" + _table(["", "value"], rows)


def _classify_section(rows: list[dict[str, Any]]) -> str:
    labels = Counter(str(r.get("label")) for r in rows)
    names = sorted(labels)
    fractions = [labels[n] / len(rows) for n in names]
    conf = [float(r["confidence"]) for r in rows if r.get("confidence") is not None]
    ood = [r["path"] for r in rows if r.get("ood_flag")]
    parts = [
        "<h2>Class fractions</h2>",
        svg_bars(names, fractions),
        _table(["label", "images", "fraction"], [(n, labels[n], labels[n] / len(rows)) for n in names]),
        "<h2>Confidence</h2>",
        svg_histogram(conf, "confidence of the predicted label"),
        f"<h2>Out of distribution</h2><p>{len(ood)} of {len(rows)} images flagged "
        "(unlike the training images; their labels deserve a look).</p>",
    ]
    if ood:
        parts.append(_table(["path"], [(p,) for p in ood[:ERRORS_MAX]]))
    return "".join(parts)


def _segment_section(out: Path, rows: list[dict[str, Any]]) -> str:
    classes: list[str] = []
    for r in rows:
        for name in (r.get("morphology") or {}).get("classes", {}):
            if name not in classes:
                classes.append(name)
    units = {str(r.get("pixel_unit")) for r in rows if r.get("pixel_size")}
    unit = (
        units.pop() if len(units) == 1 and len(rows) == sum(1 for r in rows if r.get("pixel_size")) else None
    )
    parts = ["<h2>Class fractions</h2>"]
    mean_fraction, table = [], []
    for name in classes:
        fr = [_get(r, name, "area_fraction") for r in rows]
        values = [v for v in fr if v is not None]
        mean = float(np.mean(values)) if values else 0.0
        mean_fraction.append(mean)
        table.append(
            (name, mean, float(np.min(values)) if values else None, float(np.max(values)) if values else None)
        )
    parts.append(svg_bars(classes, mean_fraction))
    parts.append(_table(["class", "mean area fraction", "min", "max"], table))
    parts.append("<h2>Per-image distributions</h2>")
    for name in classes:
        parts.append(f"<h3>{html.escape(name)}</h3>")
        parts.append(svg_histogram([_get(r, name, "area_fraction") for r in rows], "area fraction per image"))
        size_key = f"equivalent_diameter_{unit_key(unit)}" if unit else "equivalent_diameter_px"
        sizes = [_get(r, name, size_key, "median") for r in rows]
        parts.append(svg_histogram(sizes, f"median domain equivalent diameter per image ({unit or 'px'})"))
    if unit is None and any(r.get("pixel_size") for r in rows):
        parts.append("<p>Sizes in px: the images do not all share one calibrated unit.</p>")
    parts.append(_contact_sheet(out, rows))
    return "".join(parts)


def _get(row: dict[str, Any], name: str, key: str, stat: str | None = None) -> float | None:
    value = ((row.get("morphology") or {}).get("classes", {}).get(name) or {}).get(key)
    if stat is not None:
        value = value.get(stat) if isinstance(value, dict) else None
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _contact_sheet(out: Path, rows: list[dict[str, Any]]) -> str:
    shown = [r for r in rows if r.get("overlay_file")][:SHEET_MAX]
    if not shown:
        return ""
    cells = []
    for r in shown:
        data = _thumbnail(out / str(r["overlay_file"]))
        if data is None:
            continue
        cells.append(
            f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(r["path"])}">'
            f"<figcaption>{html.escape(r['path'])}</figcaption></figure>"
        )
    total = sum(1 for r in rows if r.get("overlay_file"))
    note = f"<p>First {len(shown)} of {total} overlays, by path.</p>" if total > len(shown) else ""
    return f'<h2>Overlays</h2>{note}<div class="sheet">{"".join(cells)}</div>'


def _errors_section(errors: list[dict[str, str]]) -> str:
    if not errors:
        return "<h2>Files not read</h2><p>None.</p>"
    reasons = Counter(e.get("reason", "") for e in errors)
    summary = ", ".join(f"{n} {html.escape(r)}" for r, n in sorted(reasons.items()))
    more = len(errors) - ERRORS_MAX
    tail = f"<p>... and {more} more: see errors.csv.</p>" if more > 0 else ""
    table = _table(
        ["path", "reason", "message"],
        [(e.get("path"), e.get("reason"), e.get("message")) for e in errors[:ERRORS_MAX]],
    )
    return f"<h2>Files not read ({len(errors)}: {summary})</h2>{table}{tail}"


_CSS = """
body{font-family:system-ui,sans-serif;margin:2em;max-width:75em;color:#222}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.2em .6em;text-align:left}
svg{font-size:12px;display:block;margin:.5em 0}.sheet{display:flex;flex-wrap:wrap;gap:8px}
figure{margin:0;width:220px}figure img{width:100%}figcaption{font-size:11px;word-break:break-all}
"""


def build_report(out: Path) -> str:
    """The HTML of ``out``'s report."""
    rows, errors = _rows(out), _errors(out)
    card_path = out / MODEL_CARD
    card = json.loads(card_path.read_text(encoding="utf-8")) if card_path.is_file() else {}
    task = str(card.get("task") or (rows[0].get("task") if rows else "") or "")
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>nanomorph {html.escape(task)} report</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>nanomorph {html.escape(task)} report</h1>",
        f"<p>{len(rows)} images with results, {len(errors)} files not read. "
        "Every number is in results.csv / results.jsonl beside this page.</p>",
        _card_section(card),
    ]
    if rows and task == "classify":
        parts.append(_classify_section(rows))
    elif rows and task == "segment":
        parts.append(_segment_section(out, rows))
    elif rows and task == "embed":
        dims = sorted({int(r.get("dim", 0)) for r in rows})
        parts.append(
            f"<h2>Embeddings</h2><p>{len(rows)} vectors of dimension {', '.join(map(str, dims))}.</p>"
        )
    parts.append(_errors_section(errors))
    parts.append("</body></html>\n")
    return "".join(parts)


def write_report(out: Path) -> Path:
    """Writes ``out/report.html`` (atomically) and returns its path."""
    path = out / REPORT
    atomic_write_text(path, build_report(out))
    return path
