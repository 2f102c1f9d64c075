"""``nanomorph suggest``: which unlabeled images to label next (active learning).

Strategies, all on L2-normalised embeddings of a stored ``embed`` model (cosine distance):

* ``diversity``: k-center greedy coverage (Sener & Savarese, 2018, "Active learning for
  convolutional neural networks: a core-set approach", ICLR). Each pick is the unlabeled image
  farthest from everything labeled or picked so far, so the picks cover the embedding space. With
  ``--labeled`` the labeled images seed the set (their region counts as covered); without, the
  first pick is the image nearest the centroid of the pool.
* ``uncertainty``: the images the current classifier (``--classifier TAG``, a stored ``classify``
  model) is least sure about: ``margin`` = 1 - (p1 - p2) (Scheffer et al., 2001) or normalised
  ``entropy`` of the probabilities (Lewis & Gale, 1994).
* ``hybrid``: uncertainty, then diversity: the ``pool_factor x n`` most uncertain images form the
  candidate pool and k-center greedy picks ``n`` of them (unseeded, starting from the most
  uncertain), so a batch is not n near-duplicates of one confusing image (cf. Citovsky et al., 2021, "Batch active learning at scale").

``--encoder`` takes an exported embed model (tag in ``--store``, or a stored model folder): nanomorph
never runs torch, so a training run folder must be exported first (``nanomorph export RUN``).
Embeddings are cached in ``OUT/cache/`` (an index, see :mod:`nanomorph.archive.index`), so a re-run or a
run with a bigger ``-n`` embeds nothing again. Writes ``OUT/suggestions.csv`` (rank, path, score,
reason), ``OUT/suggestions.png`` (contact sheet) and ``OUT/config.yaml``.
"""

from __future__ import annotations

import argparse
import csv
import io
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from nanomorph.atomic import atomic_write_bytes, atomic_write_text
from nanomorph.config import save_resolved
from nanomorph.contract import Contract, normalise, read_image, resize

log = logging.getLogger(__name__)

STRATEGIES = ("diversity", "uncertainty", "hybrid")
UNCERTAINTY = ("margin", "entropy")
CSV_NAME = "suggestions.csv"
SHEET_NAME = "suggestions.png"


# ------------------------------------------------------------------------------------------ scoring


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def k_center_greedy(
    embeddings: np.ndarray,
    n: int,
    labeled: np.ndarray | None = None,
    first: int | None = None,
) -> tuple[list[int], list[float]]:
    """Greedy k-center selection in cosine distance (Sener & Savarese, 2018).

    Args:
        embeddings: (N, D) candidates.
        n: how many to pick (clipped to N).
        labeled: (L, D) embeddings already labeled; they seed the covered set.
        first: index of the first pick when nothing is labeled (default: nearest the centroid).

    Returns:
        ``(indices, distances)``: picks in order, each with its cosine distance to the nearest
        labeled-or-earlier pick at the time it was chosen (``nan`` for an unseeded first pick).
    """
    x = _unit(embeddings)
    n = min(int(n), len(x))
    if n <= 0:
        return [], []
    # Distance of every candidate to its nearest covered point, updated after each pick: O(N n D).
    min_d = np.full(len(x), np.inf, dtype=np.float32)
    if labeled is not None and len(labeled):
        lab = _unit(labeled)
        for start in range(0, len(lab), 4096):
            min_d = np.minimum(min_d, (1.0 - x @ lab[start : start + 4096].T).min(axis=1))
    picks: list[int] = []
    scores: list[float] = []
    picked = np.zeros(len(x), dtype=bool)
    for _ in range(n):
        if np.isinf(min_d).all():
            i = (
                int(first)
                if first is not None
                else int(np.argmax(x @ _unit(x.mean(axis=0, keepdims=True))[0]))
            )
            score = float("nan")
        else:
            masked = np.where(picked, -np.inf, min_d)
            i = int(np.argmax(masked))
            score = float(min_d[i])
        picks.append(i)
        picked[i] = True
        scores.append(score)
        min_d = np.minimum(min_d, 1.0 - x @ x[i])
        min_d[i] = 0.0
    return picks, scores


def uncertainty_scores(probabilities: np.ndarray, kind: str = "margin") -> np.ndarray:
    """Per-row uncertainty in [0, 1] from class probabilities (N, C).

    ``margin``: ``1 - (p_top1 - p_top2)``; ``entropy``: ``H(p) / log C``.
    """
    p = np.clip(np.asarray(probabilities, dtype=np.float64), 0.0, 1.0)
    if p.ndim != 2 or p.shape[1] < 2:
        raise ValueError(f"need probabilities of shape (N, C >= 2), got {p.shape}")
    if kind == "margin":
        top2 = -np.sort(-p, axis=1)[:, :2]
        return (1.0 - (top2[:, 0] - top2[:, 1])).astype(np.float32)
    if kind == "entropy":
        h = -(p * np.log(np.where(p > 0, p, 1.0))).sum(axis=1)
        return (h / np.log(p.shape[1])).astype(np.float32)
    raise ValueError(f"unknown uncertainty {kind!r}; one of {', '.join(UNCERTAINTY)}")


def select(
    embeddings: np.ndarray,
    n: int,
    strategy: str = "diversity",
    labeled: np.ndarray | None = None,
    uncertainty: np.ndarray | None = None,
    pool_factor: int = 4,
    first: int | None = None,
) -> list[dict[str, Any]]:
    """Picks ``n`` candidates to label.

    Args:
        embeddings: (N, D) unlabeled embeddings.
        n: budget.
        strategy: ``diversity``, ``uncertainty`` or ``hybrid``.
        labeled: (L, D) embeddings of the images labeled already.
        uncertainty: (N,) scores in [0, 1] (needed by ``uncertainty`` and ``hybrid``).
        pool_factor: ``hybrid``: k-center greedy runs over the ``pool_factor x n`` most uncertain.
        first: ``diversity`` without labels: the first pick (default: nearest the centroid).

    Returns:
        ``[{"index", "score", "distance", "uncertainty"}]`` in pick order; ``score`` is the
        distance (diversity, hybrid) or the uncertainty (uncertainty).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; one of {', '.join(STRATEGIES)}")
    if strategy != "diversity" and uncertainty is None:
        raise ValueError(f"strategy {strategy} needs classifier uncertainties (--classifier TAG)")
    n = min(int(n), len(embeddings))
    u = None if uncertainty is None else np.asarray(uncertainty, dtype=np.float32)
    out: list[dict[str, Any]] = []
    if strategy == "uncertainty":
        assert u is not None
        order = np.lexsort((np.arange(len(u)), -u))[:n]  # ties: file order
        for i in order:
            out.append({"index": int(i), "score": float(u[i]), "distance": None, "uncertainty": float(u[i])})
        return out
    if strategy == "diversity":
        picks, dists = k_center_greedy(embeddings, n, labeled, first)
        pool = np.arange(len(embeddings))
    else:
        assert u is not None
        size = min(len(u), max(n, int(pool_factor) * n))
        pool = np.lexsort((np.arange(len(u)), -u))[:size]
        # Unseeded, the first pick is the most uncertain image (pool[0]), not the most central one.
        picks, dists = k_center_greedy(np.asarray(embeddings)[pool], n, labeled, first=0)
    for p, d in zip(picks, dists, strict=True):
        i = int(pool[p])
        out.append(
            {
                "index": i,
                "score": d,
                "distance": d,
                "uncertainty": None if u is None else float(u[i]),
            }
        )
    return out


def _reason(pick: dict[str, Any], strategy: str, probs: dict[str, float] | None, has_labeled: bool) -> str:
    parts = []
    d = pick["distance"]
    if d is not None:
        if d != d:  # nan: the unseeded first k-center pick
            first = "most uncertain" if strategy == "hybrid" else "most central image of the pool"
            parts.append(f"{first} (first coverage pick)")
        else:
            ref = "labeled or already suggested" if has_labeled else "already suggested"
            parts.append(f"far from every {ref} image (cosine distance {d:.3f})")
    if pick["uncertainty"] is not None and strategy != "diversity":
        text = f"classifier uncertainty {pick['uncertainty']:.3f}"
        if probs:
            top = sorted(probs.items(), key=lambda kv: -kv[1])[:2]
            text += " (" + " vs ".join(f"{c} {p:.2f}" for c, p in top) + ")"
        parts.append(text)
    return "; ".join(parts)


# ---------------------------------------------------------------------------------------- outputs


def contact_sheet(
    paths: Sequence[Path],
    captions: Sequence[str],
    dest: str | Path,
    thumb: int = 128,
    columns: int = 5,
) -> Path:
    """A grid of thumbnails with a caption under each (Pillow only), written atomically."""
    dest = Path(dest)
    n = len(paths)
    cols = max(1, min(columns, n))
    rows = max(1, -(-n // cols))
    pad, cap = 6, 14
    sheet = Image.new("L", (pad + cols * (thumb + pad), pad + rows * (thumb + cap + pad)), 255)
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for k, (path, caption) in enumerate(zip(paths, captions, strict=True)):
        x = pad + (k % cols) * (thumb + pad)
        y = pad + (k // cols) * (thumb + cap + pad)
        try:
            image, _meta = read_image(path)
            tile = np.rint(resize(normalise(image, Contract()), (thumb, thumb)) * 255).clip(0, 255)
            sheet.paste(Image.fromarray(tile.astype(np.uint8)), (x, y))
        except (ValueError, OSError) as exc:
            draw.text((x + 4, y + thumb // 2), "unreadable", fill=0, font=font)
            log.warning("contact sheet: %s: %s", path, exc)
        text = caption if len(caption) <= thumb // 6 else caption[: thumb // 6 - 1] + "…"
        draw.text((x, y + thumb + 1), text, fill=0, font=font)
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    atomic_write_bytes(dest, buf.getvalue())
    return dest


def write_csv(rows: Sequence[dict[str, Any]], dest: Path) -> Path:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["rank", "path", "score", "reason"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(dest, buf.getvalue())
    return dest


# -------------------------------------------------------------------------------------------- the command (nanomorph.cli calls run)


def _classifier_probs(
    tag: str, store: str, paths: Sequence[Path], batch_size: int
) -> tuple[np.ndarray, list[str]]:
    from nanomorph.archive.index import Progress, resolve_model
    from nanomorph.runtime import Classifier

    clf = Classifier(resolve_model(tag, store), batch_size=batch_size)
    probs = []
    progress = Progress(len(paths), "classify")
    for start in range(0, len(paths), 64):
        images = [read_image(p)[0] for p in paths[start : start + 64]]
        for r in clf.predict(images):
            probs.append([r["probabilities"][c] for c in clf.classes])
        progress.update(len(images))
    progress.close()
    return np.asarray(probs, dtype=np.float32), list(clf.classes)


def run(args: argparse.Namespace) -> int:
    from nanomorph.archive.index import SimilarityIndex, build_index, load_embedder
    from nanomorph.store import default_store

    if args.n < 1:
        raise ValueError(f"-n must be >= 1, got {args.n}")
    if args.pool_factor < 1:
        raise ValueError(f"--pool-factor must be >= 1, got {args.pool_factor}")
    if args.strategy != "diversity" and not args.classifier:
        raise ValueError(f"--strategy {args.strategy} needs --classifier TAG (a stored classify model)")
    unl_dir = Path(args.unlabeled)
    if not unl_dir.is_dir():
        raise FileNotFoundError(f"--unlabeled folder {unl_dir} does not exist")
    if args.labeled and not Path(args.labeled).is_dir():
        raise FileNotFoundError(f"--labeled folder {args.labeled} does not exist")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    store = args.store or default_store()
    embedder = load_embedder(args.encoder, store, args.batch_size)
    tag = str(embedder.model.stored.tag)

    # Embeddings cached as indexes: a re-run embeds only new files.
    build_index(unl_dir, out / "cache" / "unlabeled", embedder, tag, store, exclude=[out])
    unl = SimilarityIndex.load(out / "cache" / "unlabeled", mmap=False)
    lab_vecs = None
    if args.labeled:
        build_index(args.labeled, out / "cache" / "labeled", embedder, tag, store, exclude=[out])
        lab = SimilarityIndex.load(out / "cache" / "labeled", mmap=False)
        lab_vecs = np.asarray(lab.vectors)
        # A file in both folders (e.g. --unlabeled is the whole archive) is labeled, not a candidate.
        labeled_files = {Path(lab.full_path(p)).resolve() for p in lab.paths}
        keep = [i for i, p in enumerate(unl.paths) if Path(unl.full_path(p)).resolve() not in labeled_files]
        unl = SimilarityIndex(np.asarray(unl.vectors)[keep], [unl.paths[i] for i in keep], unl.info)
    if len(unl) == 0:
        log.error("no readable unlabeled images under %s", unl_dir)
        return 1
    files = [unl_dir / p for p in unl.paths]
    u = probs = classes = None
    if args.classifier:
        probs, classes = _classifier_probs(args.classifier, store, files, args.batch_size)
        u = uncertainty_scores(probs, args.uncertainty)
    picks = select(np.asarray(unl.vectors), args.n, args.strategy, lab_vecs, u, args.pool_factor)
    rows: list[dict[str, Any]] = []
    for rank, pick in enumerate(picks, 1):
        i = pick["index"]
        p_dict = (
            None
            if probs is None or classes is None
            else dict(zip(classes, map(float, probs[i]), strict=True))
        )
        score = pick["score"]
        rows.append(
            {
                "rank": rank,
                "path": str(files[i]),
                "score": "" if score != score else f"{score:.6f}",
                "reason": _reason(pick, args.strategy, p_dict, lab_vecs is not None),
            }
        )
    write_csv(rows, out / CSV_NAME)
    contact_sheet(
        [files[p["index"]] for p in picks],
        [f"{r['rank']}. {Path(r['path']).name}" for r in rows],
        out / SHEET_NAME,
    )
    save_resolved(args, out)
    print(
        f"suggested {len(rows)} of {len(unl)} images ({args.strategy}): {out / CSV_NAME}, {out / SHEET_NAME}"
    )
    return 0
