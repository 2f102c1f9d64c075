"""``nanomorph study cls|seg``: label-efficiency studies — how good is each encoder with K labels?

Classification (``cls``): every encoder given plus a ``scratch`` baseline of the same architecture
(random init, BatchNorm statistics recalibrated on the non-test images) × modes (``linear``,
``finetune`` = LP-FT) × labels per class × repeats. Repeat ``r`` uses seed ``seed + r``: its own
fixed test split and nested labeled subsets, identical for every encoder (so differences between
encoders are not differences between draws). Frozen-encoder features are computed once per encoder
(and per repeat for the random-init baseline) and reused by every linear cell.

Segmentation (``seg``): the same grid over the number of labeled images with
:func:`training.finetune_seg.train_segmenter`, modes ``frozen`` (decoder only) and ``finetune``.

Outputs in ``STUDY/``: ``results.csv`` (one row per cell, appended as each finishes, so a rerun skips
finished cells), ``summary.md`` (mean ± std over repeats), ``curve.png`` (metric vs labels, log x,
error bars, one line per encoder × mode), ``cells/`` (full metrics of each cell), ``study.json``
(the settings that define the splits; a rerun with other ones is refused).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import os
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from nanomorph.atomic import atomic_path, atomic_write_text
from nanomorph.config import save_resolved
from nanomorph.progress import progress

if TYPE_CHECKING:  # torch-backed types; the module itself imports torch only when a study runs
    from training.finetune_cls import EncoderSpec, LabeledImages
    from training.splits import Split

log = logging.getLogger("nanomorph.study")

KEY_COLUMNS = ("encoder", "mode", "labels", "repeat")
CLS_METRICS = ("accuracy", "balanced_accuracy", "macro_f1")
SEG_METRICS = ("mean_iou_foreground", "mean_dice_foreground", "pixel_accuracy")
DEFAULT_MODES = {"cls": "linear,finetune", "seg": "frozen,finetune"}


# ----------------------------------------------------------------------------------------------
# parsing


def parse_encoders(value: str | Sequence[str] | None) -> dict[str, str]:
    """``"ssl=RUNS/X/backbone.safetensors,other=PATH"`` -> ``{"ssl": ..., "other": ...}``.

    A bare path is named after its run folder. ``scratch`` is reserved for the baseline.
    """
    raw = [value] if isinstance(value, str) else list(value or [])
    items = [part for v in raw for part in str(v).split(",")]  # --encoder A --encoder B,C
    out: dict[str, str] = {}
    for item in (i.strip() for i in items):
        if not item:
            continue
        name, sep, path = item.partition("=")
        if not sep:
            path = name
            p = Path(path)
            name = (p.parent.name if p.suffix == ".safetensors" else p.name) or "encoder"
        name, path = name.strip(), path.strip()
        if name == "scratch" or path == "scratch":
            continue  # always added anyway
        if name in out:
            raise ValueError(f"--encoders: name {name!r} is used twice")
        out[name] = path
    return out


def parse_grid(value: str | int | Sequence[Any]) -> list[str]:
    """``"1,2,4,all"`` -> ``["1", "2", "4", "all"]`` (validated, duplicates dropped, order kept)."""
    items = (
        value.split(",")
        if isinstance(value, str)
        else [str(v) for v in (value if isinstance(value, Sequence) else [value])]
    )
    out: list[str] = []
    for item in (str(i).strip().lower() for i in items):
        if not item:
            continue
        if item != "all" and (not item.isdigit() or int(item) < 1):
            raise ValueError(f"label counts must be positive integers or 'all', got {item!r}")
        if item not in out:
            out.append(item)
    if not out:
        raise ValueError("empty list of label counts")
    return out


def _x_value(label: str) -> float:
    return float("inf") if label == "all" else float(label)


# ----------------------------------------------------------------------------------------------
# results.csv (append-only, resumable)


class ResultsFile:
    """``results.csv``: one row per finished cell, flushed and fsynced as each cell ends."""

    def __init__(self, path: Path, columns: Sequence[str]) -> None:
        self.path = path
        self.columns = list(columns)
        self.rows: list[dict[str, str]] = []
        if path.is_file() and path.stat().st_size:
            with open(path, newline="", encoding="utf-8") as fh:
                reader = csv.DictReader(fh)
                if list(reader.fieldnames or [])[: len(KEY_COLUMNS)] != list(KEY_COLUMNS):
                    raise ValueError(f"{path}: not a study results file (columns {reader.fieldnames})")
                self.columns = list(reader.fieldnames or self.columns)
                last = self.columns[-1]
                every = list(reader)
            # A row cut short by a killed process lacks its last value: dropped (that cell runs
            # again) and the file rewritten without it, so no broken line stays behind.
            self.rows = [
                r for r in every if all(r.get(c) for c in KEY_COLUMNS) and r.get(last) not in (None, "")
            ]
            if len(self.rows) != len(every):
                log.warning(
                    "%s: dropping %d incomplete row(s); those cells run again",
                    path,
                    len(every) - len(self.rows),
                )
                self._rewrite()

    def _rewrite(self) -> None:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=self.columns, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write_text(self.path, buf.getvalue())

    def done(self) -> set[tuple[str, str, str, str]]:
        return {tuple(r[c] for c in KEY_COLUMNS) for r in self.rows}  # type: ignore[misc]

    def append(self, row: dict[str, Any]) -> None:
        new = not self.path.is_file() or not self.path.stat().st_size
        if not new:
            # make sure a half-written last line (killed process) does not swallow this row
            with open(self.path, "rb") as fh:
                fh.seek(-1, os.SEEK_END)
                needs_newline = fh.read(1) != b"\n"
        with open(self.path, "a", newline="", encoding="utf-8") as fh:
            if not new and needs_newline:
                fh.write("\n")
            writer = csv.DictWriter(fh, fieldnames=self.columns, extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerow({c: _fmt_cell(row.get(c)) for c in self.columns})
            fh.flush()
            os.fsync(fh.fileno())
        self.rows.append({c: _fmt_cell(row.get(c)) for c in self.columns})


def _fmt_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


# ----------------------------------------------------------------------------------------------
# summary.md and curve.png


def _stats(values: list[float]) -> tuple[float, float, int]:
    arr = np.asarray(values, dtype=np.float64)
    arr = arr[np.isfinite(arr)]
    if not arr.size:
        return float("nan"), float("nan"), 0
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else 0.0, int(arr.size)


def aggregate(
    rows: list[dict[str, str]], metric: str
) -> dict[tuple[str, str], dict[str, tuple[float, float, int]]]:
    """``{(encoder, mode): {labels: (mean, std, n)}}`` for one metric column."""
    groups: dict[tuple[str, str], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        try:
            groups[(r["encoder"], r["mode"])][r["labels"]].append(float(r[metric]))
        except (KeyError, ValueError):
            continue
    return {k: {lab: _stats(v) for lab, v in d.items()} for k, d in groups.items()}


def write_summary(
    path: Path,
    rows: list[dict[str, str]],
    metrics: Sequence[str],
    title: str,
    notes: Sequence[str],
    extra: Sequence[str] = (),
) -> None:
    """Markdown tables (one per metric): rows encoder/mode, columns label counts, ``mean ± std (n)``;
    ``extra`` lines (another table) close the file."""
    labels = sorted({r["labels"] for r in rows}, key=_x_value)
    lines = [f"# {title}", ""]
    lines += [f"- {n}" for n in notes]
    lines.append("")
    for metric in metrics:
        agg = aggregate(rows, metric)
        if not agg:
            continue
        lines += [f"## {metric.replace('_', ' ')}", ""]
        lines.append("| encoder | mode | " + " | ".join(labels) + " |")
        lines.append("|---|---|" + "---|" * len(labels))
        for (enc, mode), by_label in sorted(agg.items(), key=lambda kv: (kv[0][0] == "scratch", kv[0])):
            cells = []
            for lab in labels:
                if lab in by_label and by_label[lab][2]:
                    mean, std, n = by_label[lab]
                    cells.append(f"{mean:.3f} ± {std:.3f} ({n})")
                else:
                    cells.append("–")
            lines.append(f"| {enc} | {mode} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += list(extra)
    atomic_write_text(path, "\n".join(lines))


def plot_curve(
    path: Path,
    rows: list[dict[str, str]],
    metrics: Sequence[str],
    xlabel: str,
    all_position: float,
    title: str,
) -> None:
    """Metric vs labels (log₂ x, ``all`` at its mean label count), mean ± std error bars, one line per
    encoder × mode; one panel per metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    numeric = sorted({int(r["labels"]) for r in rows if r["labels"] != "all"})
    x_all = max(all_position, (max(numeric) * 2) if numeric else 1.0)
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.2 * len(metrics), 4.2), squeeze=False)
    encoders = sorted({r["encoder"] for r in rows}, key=lambda e: (e == "scratch", e))
    colours = {e: plt.get_cmap("tab10")(i % 10) for i, e in enumerate(encoders)}
    modes = sorted({r["mode"] for r in rows})
    styles = {m: ("-", "--", ":", "-.")[i % 4] for i, m in enumerate(modes)}
    markers = {m: ("o", "s", "^", "D")[i % 4] for i, m in enumerate(modes)}
    for ax, metric in zip(axes[0], metrics, strict=True):
        for (enc, mode), by_label in sorted(aggregate(rows, metric).items()):
            pts = sorted(((x_all if lab == "all" else float(lab)), *v) for lab, v in by_label.items() if v[2])
            if not pts:
                continue
            xs, means, stds, _ = (np.asarray(c) for c in zip(*pts, strict=True))
            ax.errorbar(
                xs, means, yerr=stds, label=f"{enc} · {mode}", color=colours[enc], linestyle=styles[mode],
                marker=markers[mode], capsize=3, markersize=4,
            )  # fmt: skip
        ax.set_xscale("log", base=2)
        ticks = [float(v) for v in numeric] + ([x_all] if any(r["labels"] == "all" for r in rows) else [])
        ax.set_xticks(
            ticks, labels=[str(v) for v in numeric] + (["all"] if len(ticks) > len(numeric) else [])
        )
        ax.minorticks_off()
        ax.set_xlabel(xlabel)
        ax.set_ylabel(metric.replace("_", " "))
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8, loc="lower right")
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=130)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# the study


@dataclass
class Cell:
    encoder: str
    mode: str
    labels: str
    repeat: int

    @property
    def key(self) -> tuple[str, str, str, str]:
        return (self.encoder, self.mode, self.labels, str(self.repeat))

    @property
    def slug(self) -> str:
        return f"{self.encoder}_{self.mode}_{self.labels}_r{self.repeat}"


def _check_study_file(out: Path, identity: dict[str, Any]) -> None:
    """Refuses to mix two studies with different splits in one folder; records the settings."""
    path = out / "study.json"
    if path.is_file():
        previous = json.loads(path.read_text())
        prev_enc = previous.get("encoders", {})
        clash = [k for k in identity if k != "encoders" and previous.get(k) != identity[k]]
        clash += [
            f"encoder {n}" for n, p in identity["encoders"].items() if n in prev_enc and prev_enc[n] != p
        ]
        if clash:
            raise ValueError(
                f"{path} was written by a study with other settings ({', '.join(clash)}); "
                "use another --out (its finished cells would not be comparable)"
            )
        identity = {**identity, "encoders": {**prev_enc, **identity["encoders"]}}
    atomic_write_text(path, json.dumps(identity, indent=2, sort_keys=True))


def _run_grid(
    out: Path,
    cells: list[Cell],
    columns: Sequence[str],
    run_cell: Callable[[Cell], tuple[dict[str, Any], dict[str, Any]]],
) -> ResultsFile:
    results = ResultsFile(out / "results.csv", columns)
    done = results.done()
    pending = [c for c in cells if c.key not in done]
    log.info(
        "study grid: %d cells, %d finished already, %d to run -> %s",
        len(cells), len(cells) - len(pending), len(pending), out / "results.csv",
    )  # fmt: skip
    (out / "cells").mkdir(parents=True, exist_ok=True)
    bar = progress(pending, total=len(pending), desc=f"study ({len(cells) - len(pending)} done before)")
    for cell in bar:
        start = time.perf_counter()
        row, detail = run_cell(cell)
        row.update({"encoder": cell.encoder, "mode": cell.mode, "labels": cell.labels, "repeat": cell.repeat})
        row["seconds"] = round(time.perf_counter() - start, 2)
        atomic_write_text(out / "cells" / f"{cell.slug}.json", json.dumps(detail, indent=2, default=str))
        results.append(row)
        bar.set_postfix(cell=cell.slug, score=row.get(columns[4]))
    return results


@dataclass
class _Grid:
    """The grid a study walks: encoders × modes × label counts × repeats (repeat r: seed + r)."""

    encoders: dict[str, str]
    labels: list[str]
    modes: list[str]
    repeats: int
    seed: int

    @classmethod
    def from_config(cls, cfg: dict[str, Any], labels_key: str, task: str, allowed: Sequence[str]) -> _Grid:
        encoders = parse_encoders(cfg.get("encoders"))
        labels = parse_grid(cfg[labels_key])
        modes = parse_grid_modes(cfg.get("modes") or DEFAULT_MODES[task], allowed)
        repeats = int(cfg["repeats"])
        if repeats < 1:
            raise ValueError(f"--repeats must be >= 1, got {repeats}")
        return cls(encoders, labels, modes, repeats, int(cfg["seed"]))

    def cells(self, order: Sequence[str]) -> list[Cell]:
        return [
            Cell(e, m, lab, r)
            for r in range(self.repeats)
            for e in order
            for lab in self.labels
            for m in self.modes
        ]


def _open_study(out: Path, identity: dict[str, Any], cfg: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    _check_study_file(out, identity)
    save_resolved(cfg, out)  # after the check: a refused rerun leaves the folder as it was


def _all_position(rows: list[dict[str, str]]) -> float:
    """Where ``all`` sits on the curve's x axis: the mean labeled count of its cells."""
    all_rows = [r for r in rows if r["labels"] == "all" and r.get("labels_per_class_mean")]
    return float(np.mean([float(r["labels_per_class_mean"]) for r in all_rows])) if all_rows else 0.0


def _cls_encoders(cfg: dict[str, Any], encoders: dict[str, str]) -> tuple[dict[str, EncoderSpec], str, int]:
    """The encoders to compare plus the ``scratch`` baseline of the same architecture and input
    size; returns ``(specs, scratch architecture, image size)``."""
    from training import finetune_cls as fc

    specs = {
        name: fc.resolve_encoder(path, cfg.get("arch") or "resnet18", cfg.get("image_size"), cfg)
        for name, path in encoders.items()
    }
    first = next(iter(specs.values()), None)
    arch = cfg.get("arch") or (first.architecture if first else "resnet18")
    image_size = int(cfg.get("image_size") or (first.contract.image_size if first else 224))
    specs["scratch"] = fc.resolve_encoder("scratch", arch, image_size, cfg)
    if first is not None:  # the baseline sees exactly the pretrained encoder's preprocessing
        specs["scratch"].contract = first.contract
    for name, spec in specs.items():
        if spec.contract.image_size != image_size:
            raise ValueError(
                f"encoder {name} takes {spec.contract.image_size} px, another {image_size}; pass --image-size"
            )
    return specs, arch, image_size


class ClsStudy:
    """What every cell of a classification study shares, and the caches that make it affordable:
    decoded images per preprocessing contract, every split (drawn up front, so a label count the
    data cannot give fails now, naming the class) and frozen-encoder features per encoder."""

    def __init__(self, cfg: dict[str, Any], specs: dict[str, EncoderSpec], arch: str, grid: _Grid) -> None:
        from training.device import pick_device

        self.cfg, self.specs, self.arch, self.grid = cfg, specs, arch, grid
        self.images_by_contract: dict[str, LabeledImages] = {}
        # (encoder, repeat or None) -> features of every image; see features_for.
        self.features: dict[tuple[str, int | None], np.ndarray] = {}
        base = self.images_for(specs["scratch"])
        self.names, self.y = base.class_names, base.labels
        self.splits = self._make_splits(base.groups)
        self.device = pick_device(cfg.get("device"))
        self.overrides = {
            k: cfg[k]
            for k in ("steps", "scratch_steps", "batch_size", "eval_every")
            if cfg.get(k) is not None
        }

    def _make_splits(self, groups: np.ndarray | None) -> dict[tuple[int, str], Split]:
        from training.splits import make_split, parse_labels_per_class

        cfg, grid = self.cfg, self.grid
        splits = {
            (r, lab): make_split(
                self.y,
                parse_labels_per_class(lab),
                float(cfg["val_fraction"]),
                float(cfg["test_fraction"]),
                grid.seed + r,
                groups=groups,
                class_names=self.names,
            )  # fmt: skip
            for r in range(grid.repeats)
            for lab in grid.labels
        }
        for r in range(grid.repeats):  # the test split of a repeat is the same for every label count
            tests = [splits[(r, lab)].test for lab in grid.labels]
            assert all(np.array_equal(tests[0], t) for t in tests)
        return splits

    def images_for(self, spec: EncoderSpec) -> LabeledImages:
        from training import finetune_cls as fc

        key = spec.contract.to_json()
        if key not in self.images_by_contract:
            self.images_by_contract[key] = fc.load_images(
                self.cfg["data"], spec.contract, self.cfg.get("group_column")
            )
        return self.images_by_contract[key]

    def features_for(self, name: str, repeat: int) -> np.ndarray:
        from training import finetune_cls as fc

        spec = self.specs[name]
        # Pretrained features do not depend on the repeat; the random-init baseline's do (its seed
        # and the non-test images its BatchNorm statistics are calibrated on).
        key = (name, repeat if spec.is_scratch else None)
        if key not in self.features:
            imgs = self.images_for(spec)
            pool = np.setdiff1d(np.arange(len(self.y)), self.splits[(repeat, self.grid.labels[0])].test)
            backbone = spec.build(self.grid.seed + repeat, calibration=imgs.x[imgs.rows(pool)])
            self.features[key] = fc.extract_features(backbone, imgs.x, device=self.device)
            if spec.is_scratch:  # the previous repeat's random features are not needed again
                for old in [k for k in self.features if k[0] == name and k[1] not in (None, repeat)]:
                    del self.features[old]
        return self.features[key]

    def run_cell(self, cell: Cell) -> tuple[dict[str, Any], dict[str, Any]]:
        """Trains one cell's classifier; returns its ``results.csv`` row and its full detail."""
        import torch

        from training import finetune_cls as fc

        cfg, spec, seed = self.cfg, self.specs[cell.encoder], self.grid.seed + cell.repeat
        config = {
            "encoder": spec.source, "arch": self.arch, "data": str(cfg["data"]), "mode": cell.mode,
            "labels_per_class": cell.labels, "val_fraction": cfg["val_fraction"],
            "test_fraction": cfg["test_fraction"], "seed": seed, "init_seed": seed,
            "device": str(self.device), "out": None, **self.overrides,
        }  # fmt: skip
        torch.manual_seed(seed)
        split = self.splits[(cell.repeat, cell.labels)]
        result = fc.train_classifier(
            config,
            images=self.images_for(spec),
            split=split,
            features=self.features_for(cell.encoder, cell.repeat),
            encoder=spec,
            show_progress=False,
        )
        row = {m: result[m] for m in CLS_METRICS}
        row.update({k: result[k] for k in ("n_train", "n_val", "n_test")})
        row["labels_per_class_mean"] = (result["n_train"] + result["n_val"]) / len(self.names)
        detail = {**result, "split": {k: getattr(split, k).tolist() for k in ("train", "val", "test")}}
        return row, detail


def study_cls(cfg: dict[str, Any]) -> dict[str, Any]:
    """Runs (or resumes) a classification label-efficiency study; returns paths and cell counts."""
    from training.frames import tiling_summary

    out = Path(cfg["out"])
    grid = _Grid.from_config(cfg, "labels_per_class", "cls", ("linear", "finetune"))
    specs, arch, image_size = _cls_encoders(cfg, grid.encoders)
    identity = {
        "task": "cls", "data": str(Path(cfg["data"]).resolve()), "seed": grid.seed,
        "val_fraction": float(cfg["val_fraction"]), "test_fraction": float(cfg["test_fraction"]),
        "group_column": cfg.get("group_column"), "image_size": image_size, "scratch_arch": arch,
        "encoders": {n: s.source for n, s in specs.items()},
    }  # fmt: skip
    tiled = {n: s.contract for n, s in specs.items() if s.contract.cls_tiling}
    if tiled:  # K counts frames either way; the inputs (and so the numbers) depend on the tiling
        identity["cls_tiling"] = {n: tiling_summary(c) for n, c in tiled.items()}
        for name, spec in specs.items():
            log.info("%s: %s", name, tiling_summary(spec.contract))
    _open_study(out, identity, cfg)
    study = ClsStudy(cfg, specs, arch, grid)
    cells = grid.cells(["scratch"] + [n for n in specs if n != "scratch"])
    columns = [*KEY_COLUMNS, *CLS_METRICS, "n_train", "n_val", "n_test", "labels_per_class_mean", "seconds"]
    results = _run_grid(out, cells, columns, study.run_cell)
    _write_cls_report(out, study, results.rows, tiled)
    return {"results": str(out / "results.csv"), "cells": len(cells), "rows": len(results.rows)}


def _write_cls_report(out: Path, study: ClsStudy, rows: list[dict[str, str]], tiled: dict[str, Any]) -> None:
    """``summary.md`` (with the quality-signal table, also logged) and ``curve.png``."""
    from training.frames import tiling_summary

    cfg, seed = study.cfg, study.grid.seed
    group = f", grouped by {cfg['group_column']}" if cfg.get("group_column") else ""
    notes = [
        f"data: {cfg['data']} ({len(study.y)} images, classes {', '.join(study.names)})",
        f"{study.grid.repeats} repeat(s); repeat r uses seed {seed}+r: its own test split "
        f"({float(cfg['test_fraction']):.0%}{group}) and labeled subsets, the same for every encoder",
        "labels = labeled images per class (validation carved from them); metrics on the test split only",
        *[
            f"{n}: {tiling_summary(c)}; every tile of a labeled image trains, evaluation per image"
            for n, c in tiled.items()
        ],
        "scratch = same architecture from random init (BatchNorm statistics recalibrated on the non-test images)",
        "finetune = LP-FT (linear probe, then the whole network with a lower encoder learning rate)",
        "mean ± sample std over repeats (n repeats in brackets)",
    ]
    quality = quality_table(study.specs, rows)
    for line in quality[2:]:
        log.info("%s", line)
    write_summary(
        out / "summary.md", rows, CLS_METRICS, "Label-efficiency study (classification)", notes, quality
    )
    plot_curve(
        out / "curve.png", rows, ("accuracy", "balanced_accuracy"), "labeled images per class",
        _all_position(rows), f"Label efficiency: {Path(cfg['data']).name}",
    )  # fmt: skip


def quality_table(specs: dict[str, Any], rows: list[dict[str, str]]) -> list[str]:
    """The encoders' label-free quality signals (written by ``nanomorph pretrain`` into the backbone's
    metadata) beside their linear-probe balanced accuracy at the largest label count, so a reader can
    see whether the signals track accuracy."""
    agg = aggregate(rows, "balanced_accuracy")
    lines = [
        "## label-free quality signals (pretraining, no labels) vs accuracy",
        "",
        "| encoder | verdict | effective rank | alignment | uniformity | linear balanced accuracy (most labels) |",
        "|---|---|---|---|---|---|",
    ]
    for name, spec in specs.items():
        signals = json.loads(spec.meta.get("quality") or "{}") if getattr(spec, "meta", None) else {}
        end = signals.get("end", {})
        by_label = agg.get((name, "linear"), {})
        best = max(by_label, key=_x_value) if by_label else None
        acc = f"{by_label[best][0]:.3f} ({best})" if best else "–"
        verdict = signals.get("verdict", "not measured").split(":")[0]
        cells = [
            f"{end[k]:.{d}f}" if k in end else "–"
            for k, d in (("effective_rank", 0), ("alignment", 3), ("uniformity", 3))
        ]
        lines.append(f"| {name} | {verdict} | " + " | ".join(cells) + f" | {acc} |")
    return lines


def parse_grid_modes(value: str | Sequence[str], allowed: Sequence[str]) -> list[str]:
    items = value.split(",") if isinstance(value, str) else list(value)
    modes = [m.strip() for m in items if m.strip()]
    bad = [m for m in modes if m not in allowed]
    if bad or not modes:
        raise ValueError(f"--modes must be a comma list of {', '.join(allowed)}; got {value!r}")
    return list(dict.fromkeys(modes))


def study_seg(cfg: dict[str, Any]) -> dict[str, Any]:
    """Runs (or resumes) a segmentation study over the number of labeled images (IoU)."""
    out = Path(cfg["out"])
    grid = _Grid.from_config(cfg, "labeled_images", "seg", ("frozen", "finetune"))
    arch = _seg_scratch_arch(cfg, grid.encoders)
    sources = {"scratch": "scratch", **grid.encoders}
    identity = {
        "task": "seg", "data": str(Path(cfg["data"]).resolve()), "seed": grid.seed,
        "val_fraction": float(cfg["val_fraction"]), "test_fraction": float(cfg["test_fraction"]),
        "tile": cfg.get("tile"), "scratch_arch": arch, "encoders": sources,
    }  # fmt: skip
    _open_study(out, identity, cfg)
    classes = cfg.get("classes")
    class_columns = [f"iou_{c.strip()}" for c in str(classes).split(",") if c.strip()] if classes else []
    cells = grid.cells(["scratch", *grid.encoders])
    columns = [
        *KEY_COLUMNS,
        *SEG_METRICS,
        *class_columns,
        "n_train",
        "n_val",
        "n_test",
        "labels_per_class_mean",
        "seconds",
    ]
    results = _run_grid(out, cells, columns, lambda cell: _run_seg_cell(cfg, sources, arch, out, cell))
    notes = [
        f"data: {cfg['data']}; {grid.repeats} repeat(s), repeat r uses seed {grid.seed}+r (test split fixed per repeat)",
        "labels = labeled images (validation carved from them); hard (argmax) IoU/Dice on held-out images",
        "frozen = decoder only; finetune = encoder too (decoder warm-up, lower encoder lr)",
        "mean ± sample std over repeats (n repeats in brackets)",
    ]
    write_summary(
        out / "summary.md", results.rows, SEG_METRICS, "Label-efficiency study (segmentation)", notes
    )
    plot_curve(
        out / "curve.png", results.rows, ("mean_iou_foreground",), "labeled images",
        _all_position(results.rows), f"Label efficiency: {Path(cfg['data']).name}",
    )  # fmt: skip
    return {"results": str(out / "results.csv"), "cells": len(cells), "rows": len(results.rows)}


def _seg_scratch_arch(cfg: dict[str, Any], encoders: dict[str, str]) -> str | None:
    """Checks every encoder has a backbone file; the baseline's architecture is ``--arch`` or the
    first encoder's (``None``: finetune-seg's default)."""
    for name, path in encoders.items():
        p = Path(path)
        if not (p.is_file() or (p / "backbone.safetensors").is_file()):
            raise FileNotFoundError(f"--encoders {name}={path}: no backbone.safetensors there")
    arch = cfg.get("arch")
    if not arch and encoders:
        from training.backbones import read_metadata

        p = Path(next(iter(encoders.values())))
        arch = read_metadata(p if p.is_file() else p / "backbone.safetensors")["architecture"]
    return arch


def _run_seg_cell(
    cfg: dict[str, Any], sources: dict[str, str], arch: str | None, out: Path, cell: Cell
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Trains one cell's segmenter (no model saved); returns its ``results.csv`` row and metrics."""
    from training.finetune_seg import train_segmenter

    config: dict[str, Any] = {
        "encoder": sources[cell.encoder], "data": str(cfg["data"]), "labeled_images": cell.labels,
        "freeze_encoder": cell.mode == "frozen", "seed": int(cfg["seed"]) + cell.repeat,
        "val_fraction": float(cfg["val_fraction"]), "test_fraction": float(cfg["test_fraction"]),
        "out": str(out / "runs" / cell.slug), "save_model": False, "overlays": 0,
        "device": cfg.get("device") or "auto",
    }  # fmt: skip
    if cell.encoder == "scratch" and arch:
        config["arch"] = arch
    for key, target in (
        ("classes", "classes"),
        ("tile", "tile"),
        ("seg_steps", "steps"),
        ("batch_size", "batch_size"),
    ):
        if cfg.get(key) is not None:
            config[target] = cfg[key]
    metrics = train_segmenter(config)
    row = {m: metrics.get(m) for m in SEG_METRICS}
    for cls_name, vals in (metrics.get("per_class") or {}).items():
        row[f"iou_{cls_name}"] = vals.get("iou") if isinstance(vals, dict) else None
    n = metrics.get("n_images", {})
    row.update({"n_train": n.get("train"), "n_val": n.get("val"), "n_test": n.get("test")})
    row["labels_per_class_mean"] = (n.get("train", 0) or 0) + (n.get("val", 0) or 0)
    return row, metrics


# ----------------------------------------------------------------------------------------------
# the command (nanomorph.cli.study calls run)


def run(args: argparse.Namespace) -> int:
    if args.data is None:
        raise ValueError("--data DIR is required")
    if not Path(args.data).is_dir():
        raise FileNotFoundError(f"--data {args.data} does not exist")
    cfg = {k: v for k, v in vars(args).items() if k != "config"}
    summary = study_cls(cfg) if args.task == "cls" else study_seg(cfg)
    log.info(
        "study %s: %d/%d cells in %s; summary.md and curve.png written",
        args.task, summary["rows"], summary["cells"], summary["results"],
    )  # fmt: skip
    return 0
