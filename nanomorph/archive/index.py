"""Similar-image search over an image archive: ``nanomorph index build`` / ``nanomorph index query``.

``build`` embeds every supported image under a folder with a stored ``embed`` (or ``classify``)
model (:class:`nanomorph.runtime.Embedder`, onnxruntime, no torch) and writes an index folder::

    INDEX_DIR/
      vectors.npy    float32 (N, D), L2-normalised embeddings, row i <-> paths[i]
      paths.json     N paths relative to the indexed folder (POSIX separators)
      index.json     {"format", "model", "store", "task", "dim", "count", "root", "metric", ...}
      parts/         chunks embedded but not yet merged (present only while building / after a kill)

Building is resumable: every chunk of embedded images is written atomically to ``parts/`` as soon
as it is done, and a re-run skips every path already in ``paths.json`` or in a part, then merges.
Files that disappeared from the folder are dropped from the index at the merge.

Search is exact cosine similarity over the whole matrix with numpy (``distance = 1 - cosine``),
in blocks so that a memory-mapped ``vectors.npy`` never has to be in memory at once. Where the limit
is: the matrix takes ``N x D x 4`` bytes (1M images x 512-d = 2 GB; a build's final merge holds it
twice) and one query reads all of it (measured: 0.11 s per query for 200k x 512 on 2 shared CPU
cores, so ~0.5 s at 1M). Up to ~1M images that is fine. Beyond, or for many queries per second,
put the same ``vectors.npy`` into an approximate index, e.g. faiss
``IndexHNSWFlat(D, 32)`` with ``METRIC_INNER_PRODUCT`` or ``IndexIVFFlat`` / ``IndexIVFPQ`` (PQ also
cuts memory 10-50x); vectors are already normalised, so inner product = cosine.

:class:`SimilarityIndex` (``load(dir)``, ``query(vector, k)``) is what the service's ``/similar``
endpoint uses; :func:`embed_paths` is shared with ``nanomorph suggest`` and ``nanomorph map``.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from nanomorph.atomic import atomic_path, atomic_write_text
from nanomorph.config import save_resolved
from nanomorph.contract import SUPPORTED_SUFFIXES, ImageReadError, list_images, read_image
from nanomorph.progress import Progress

log = logging.getLogger(__name__)

FORMAT = "nanomorph-index/1"
VECTORS = "vectors.npy"
PATHS = "paths.json"
INFO = "index.json"
PARTS = "parts"
DEFAULT_TAG = "nanomorph-embed:latest"
# Rows per block of the exact search: bounds the temporary (block x D) copy of a memory-mapped matrix.
_BLOCK = 65536


# ----------------------------------------------------------------------------------------- embedding


def resolve_model(tag: str, store: str | Path | None) -> Any:
    """The :class:`~nanomorph.store.StoredModel` for ``tag`` in ``store`` (default store when None),
    or for a stored model folder (holding ``manifest.json``) given as ``tag``.

    Raises:
        FileNotFoundError: no such model.
        ValueError: ``tag`` is a training run folder (nanomorph runs exported ONNX models only:
            the message says how to export it).
    """
    from nanomorph.store import default_store, load_model_dir, resolve

    as_path = Path(tag)
    if as_path.is_dir():
        if (as_path / "manifest.json").is_file():
            return load_model_dir(as_path)
        if any(as_path.glob("*.safetensors")):
            raise ValueError(
                f"{as_path} is a training run folder; export it first "
                f"(nanomorph export {as_path} --store STORE) and pass the exported model's tag"
            )
        raise FileNotFoundError(f"{as_path} is neither a stored model folder nor a run folder")
    return resolve(tag, store if store else default_store())


def load_embedder(tag: str, store: str | Path | None, batch_size: int = 32) -> Any:
    """An :class:`nanomorph.runtime.Embedder` for ``tag`` (see :func:`resolve_model`).

    Raises:
        FileNotFoundError: no such model.
        ValueError: a run folder, or a model without an ``embedding`` output.
    """
    from nanomorph.runtime import Embedder

    return Embedder(resolve_model(tag, store), batch_size=batch_size)


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), max(1, size)):
        yield items[start : start + size]


def embed_paths(
    paths: Sequence[Path],
    embedder: Any,
    chunk: int = 64,
    desc: str = "embed",
    on_chunk: Callable[[list[int], np.ndarray], None] | None = None,
    collect: bool = True,
) -> tuple[np.ndarray, list[int], dict[int, str]]:
    """Reads and embeds images chunk by chunk; unreadable files are skipped with a warning.

    Args:
        paths: image files.
        embedder: an :class:`nanomorph.runtime.Embedder` (anything with ``embed(images) -> (N, D)``).
        chunk: images read and embedded at a time (bounds memory).
        desc: progress label.
        on_chunk: called with (indices into ``paths``, their embeddings) after every chunk, e.g. to
            save it; the build command uses it to be resumable.

    Returns:
        ``(embeddings float32 (M, D), indices into paths of the M embedded images, {index: error})``.
    """
    progress = Progress(len(paths), desc)
    vectors: list[np.ndarray] = []
    kept: list[int] = []
    errors: dict[int, str] = {}
    try:
        for group in _chunks(list(range(len(paths))), chunk):
            images, ok = [], []
            for i in group:
                try:
                    image, _ = read_image(paths[i])
                except (ImageReadError, OSError) as exc:
                    log.warning("skipping %s: %s", paths[i], exc)
                    errors[i] = str(exc)
                    continue
                images.append(image)
                ok.append(i)
            if images:
                emb = np.asarray(embedder.embed(images), dtype=np.float32)
                if collect:
                    vectors.append(emb)
                kept.extend(ok)
                if on_chunk is not None:
                    on_chunk(ok, emb)
            progress.update(len(group))
    finally:
        progress.close()
    dim = vectors[0].shape[1] if vectors else 0
    out = np.concatenate(vectors) if vectors else np.zeros((0, dim), dtype=np.float32)
    return out, kept, errors


def l2_normalise(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero), float32."""
    x = np.asarray(x, dtype=np.float32)
    return (x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)).astype(np.float32)


# ------------------------------------------------------------------------------------------- storage


def _atomic_save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        np.save(tmp, array)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc}); delete the index folder to rebuild it") from exc


class SimilarityIndex:
    """Exact cosine search over L2-normalised embeddings (numpy).

    Attributes:
        vectors: float32 (N, D), unit rows (memory-mapped when loaded with ``mmap=True``).
        paths: N paths relative to ``root``.
        info: the parsed ``index.json`` (model tag, store, dim, count, root, ...).
    """

    def __init__(self, vectors: np.ndarray, paths: Sequence[str], info: dict[str, Any] | None = None) -> None:
        if vectors.ndim != 2 or len(vectors) != len(paths):
            raise ValueError(f"index has {len(paths)} paths but vectors of shape {vectors.shape}")
        self.vectors = vectors
        self.paths = list(paths)
        self.info = dict(info or {})

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def root(self) -> Path | None:
        root = self.info.get("root")
        return Path(root) if root else None

    @property
    def model(self) -> str | None:
        return self.info.get("model")

    @classmethod
    def load(cls, directory: str | Path, mmap: bool = True) -> SimilarityIndex:
        """Loads an index folder written by ``nanomorph index build``.

        Args:
            directory: the index folder.
            mmap: memory-map ``vectors.npy`` (the OS pages it in; a 2 GB index costs no copy).

        Raises:
            FileNotFoundError: the folder or one of its files is missing (message names it).
            ValueError: the files do not fit together.
        """
        d = Path(directory)
        if not d.is_dir():
            raise FileNotFoundError(f"index folder {d} does not exist")
        for name in (VECTORS, PATHS, INFO):
            if not (d / name).is_file():
                raise FileNotFoundError(
                    f"{d / name} is missing: is {d} an index built by `nanomorph index build`?"
                )
        info = _read_json(d / INFO)
        paths = _read_json(d / PATHS)
        if not isinstance(paths, list) or not isinstance(info, dict):
            raise ValueError(f"{d}: {PATHS} must be a list and {INFO} a mapping")
        vectors = np.load(d / VECTORS, mmap_mode="r" if mmap else None, allow_pickle=False)
        if len(paths) == 0:
            vectors = np.zeros((0, int(info.get("dim") or 0)), dtype=np.float32)
        if len(vectors) != len(paths):
            raise ValueError(f"{d}: {VECTORS} has {len(vectors)} rows but {PATHS} {len(paths)} paths")
        return cls(vectors, [str(p) for p in paths], info)

    def check_model(self, tag: str, dim: int | None = None) -> None:
        """Refuses to search with embeddings of another model than the one the index was built with.

        Raises:
            ValueError: ``tag`` (name:version) or ``dim`` differs from the index's.
        """
        if self.model and self.model != tag:
            raise ValueError(
                f"the index was built with {self.model}, not {tag}; rebuild it or serve that model"
            )
        if dim is not None and len(self) and dim != self.dim:
            raise ValueError(f"the index holds {self.dim}-d vectors, the model gives {dim}-d")

    def full_path(self, rel: str) -> str:
        """``root / rel`` when the index knows its root, else ``rel``."""
        root = self.root
        return str(root / rel) if root is not None else rel

    def search(self, queries: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` rows for each query.

        Args:
            queries: float (Q, D) or (D,); normalised here.
            k: neighbours per query (clipped to the index size).

        Returns:
            ``(indices int64 (Q, k), distances float32 (Q, k))`` sorted by distance
            (``1 - cosine``, in [0, 2]).
        """
        q = l2_normalise(np.atleast_2d(np.asarray(queries, dtype=np.float32)))
        if q.shape[1] != self.dim:
            raise ValueError(f"query vectors have dimension {q.shape[1]}, the index {self.dim}")
        n = len(self)
        k = max(0, min(int(k), n))
        if k == 0:
            return np.zeros((len(q), 0), dtype=np.int64), np.zeros((len(q), 0), dtype=np.float32)
        best_i = np.zeros((len(q), 0), dtype=np.int64)
        best_s = np.zeros((len(q), 0), dtype=np.float32)
        for start in range(0, n, _BLOCK):
            block = np.asarray(self.vectors[start : start + _BLOCK], dtype=np.float32)
            sims = q @ block.T  # (Q, B)
            kk = min(k, sims.shape[1])
            top = np.argpartition(-sims, kk - 1, axis=1)[:, :kk]
            best_i = np.concatenate([best_i, top + start], axis=1)
            best_s = np.concatenate([best_s, np.take_along_axis(sims, top, axis=1)], axis=1)
            if best_i.shape[1] > k:  # keep only the running top-k
                keep = np.argpartition(-best_s, k - 1, axis=1)[:, :k]
                best_i = np.take_along_axis(best_i, keep, axis=1)
                best_s = np.take_along_axis(best_s, keep, axis=1)
        # Ties broken by row index so results are deterministic.
        order = np.lexsort((best_i, -best_s), axis=1) if best_i.shape[1] else best_i
        best_i = np.take_along_axis(best_i, order, axis=1)
        best_s = np.take_along_axis(best_s, order, axis=1)
        return best_i, np.clip(1.0 - best_s, 0.0, 2.0).astype(np.float32)

    def query(self, vector: np.ndarray, k: int = 10) -> list[dict[str, Any]]:
        """The ``k`` nearest archive images to one embedding.

        Returns:
            ``[{"path": str, "distance": float (1 - cosine), "rank": int (1 = nearest)}, ...]``;
            ``path`` is absolute-ish (``root / relative path``) when the index records its root.
        """
        idx, dist = self.search(np.asarray(vector, dtype=np.float32).reshape(1, -1), k)
        return [
            {"path": self.full_path(self.paths[int(i)]), "distance": float(d), "rank": r + 1}
            for r, (i, d) in enumerate(zip(idx[0], dist[0], strict=True))
        ]


# -------------------------------------------------------------------------------------------- build


def _load_parts(parts_dir: Path) -> tuple[list[str], list[np.ndarray]]:
    paths: list[str] = []
    vecs: list[np.ndarray] = []
    for pj in sorted(parts_dir.glob("part-*.json")):
        pn = pj.with_suffix(".npy")
        if not pn.is_file():
            continue  # killed between the two writes: the chunk is simply embedded again
        try:
            p = json.loads(pj.read_text(encoding="utf-8"))
            v = np.load(pn, allow_pickle=False)
        except (ValueError, OSError) as exc:
            log.warning("ignoring damaged chunk %s: %s", pj, exc)
            continue
        if len(p) == len(v):
            paths.extend(p)
            vecs.append(np.asarray(v, dtype=np.float32))
    return paths, vecs


def build_index(
    input_dir: str | Path,
    out_dir: str | Path,
    embedder: Any,
    model: str,
    store: str | Path | None = None,
    chunk: int = 256,
    recursive: bool = True,
    exclude: Sequence[str | Path] = (),
) -> dict[str, Any]:
    """Embeds the images under ``input_dir`` not in the index yet and merges them into ``out_dir``.

    Args:
        input_dir: folder of images.
        out_dir: index folder (created; resumed when it exists).
        embedder: an :class:`nanomorph.runtime.Embedder`.
        model: the model's tag (recorded; a later build with another model is refused).
        store: the model store (recorded, so ``index query`` finds the same model).
        chunk: images per saved chunk.
        recursive: search subfolders.
        exclude: folders whose images are never indexed (``out_dir`` always is), e.g. outputs that
            lie inside ``input_dir``.

    Returns:
        The ``index.json`` contents plus ``added`` / ``skipped`` / ``failed`` / ``removed`` counts.

    Raises:
        FileNotFoundError: ``input_dir`` does not exist.
        ValueError: the index was built with another model or from another folder.
    """
    src, out = Path(input_dir), Path(out_dir)
    files = _images_to_index(src, out, exclude, recursive)
    root = src.resolve()
    out.mkdir(parents=True, exist_ok=True)
    info: dict[str, Any] = _read_json(out / INFO) if (out / INFO).is_file() else {}
    _check_same_model_and_root(out, info, model, root)

    existing = SimilarityIndex.load(out, mmap=False) if (out / VECTORS).is_file() else None
    parts_dir = out / PARTS
    parts_dir.mkdir(exist_ok=True)
    part_paths, _ = _load_parts(parts_dir)
    done = set(existing.paths if existing else []) | set(part_paths)

    rels = [p.relative_to(src).as_posix() for p in files]
    todo = [i for i, r in enumerate(rels) if r not in done]
    log.info(
        "index %s: %d images, %d already embedded, %d to embed",
        out,
        len(files),
        len(files) - len(todo),
        len(todo),
    )
    chunks = _ChunkWriter(parts_dir, [rels[i] for i in todo])
    # Everything embedded goes to parts/ (collect=False), so memory stays at one chunk.
    _, _, errors = embed_paths(
        [files[i] for i in todo], embedder, chunk=chunk, desc="index", on_chunk=chunks.save, collect=False
    )

    matrix, paths, removed = _merge(existing, parts_dir, set(rels), int(info.get("dim") or 0))
    _atomic_save_npy(out / VECTORS, matrix)
    atomic_write_text(out / PATHS, json.dumps(paths))
    info = _index_info(model, store, embedder, int(matrix.shape[1]), len(paths), root)
    atomic_write_text(out / INFO, json.dumps(info, indent=2) + "\n")
    for f in parts_dir.glob("part-*"):
        f.unlink()
    parts_dir.rmdir()
    if errors:
        atomic_write_text(
            out / "errors.json",
            json.dumps({rels[todo[i]]: msg for i, msg in errors.items()}, indent=2) + "\n",
        )
    stats = {
        "added": len(todo) - len(errors),
        "skipped": len(files) - len(todo),
        "failed": len(errors),
        "removed": removed,
    }
    return {**info, **stats}


def _images_to_index(src: Path, out: Path, exclude: Sequence[str | Path], recursive: bool) -> list[Path]:
    """The images under ``src``, minus those inside ``out`` or an ``exclude`` folder."""
    if not src.is_dir():
        raise FileNotFoundError(f"input folder {src} does not exist")
    skip = {Path(e).resolve() for e in (out, *exclude)}
    files = [p for p in list_images(src, recursive=recursive) if not skip & set(p.resolve().parents)]
    if not files:
        raise ValueError(f"no supported images under {src} ({' '.join(SUPPORTED_SUFFIXES)})")
    return files


def _check_same_model_and_root(out: Path, info: dict[str, Any], model: str, root: Path) -> None:
    """An existing index is only extended with the same model's embeddings of the same folder."""
    if not info:
        return
    if info.get("model") != model:
        raise ValueError(
            f"{out / INFO}: index built with model {info.get('model')}, not {model}; "
            "use another --out (embeddings of different models cannot be mixed)"
        )
    if info.get("root") and Path(info["root"]) != root:
        raise ValueError(f"{out / INFO}: index built from {info['root']}, not {root}; use another --out")


class _ChunkWriter:
    """Saves each embedded chunk as ``parts/part-NNNNNN.{npy,json}`` (vectors, then paths), so that
    a killed build resumes from its last whole chunk. ``rels`` are the paths being embedded, in
    the order that the embedder's chunk indices refer to."""

    def __init__(self, parts_dir: Path, rels: list[str]) -> None:
        self.parts_dir = parts_dir
        self.rels = rels
        self.n_part = len(list(parts_dir.glob("part-*.json")))

    def save(self, indices: list[int], emb: np.ndarray) -> None:
        name = f"part-{self.n_part:06d}"
        self.n_part += 1
        _atomic_save_npy(self.parts_dir / f"{name}.npy", emb)
        # The JSON is written last: a chunk counts only once both files are there.
        atomic_write_text(self.parts_dir / f"{name}.json", json.dumps([self.rels[i] for i in indices]))


def _merge(
    existing: SimilarityIndex | None, parts_dir: Path, present: set[str], dim: int
) -> tuple[np.ndarray, list[str], int]:
    """Existing index + all saved chunks, minus files that are gone and duplicates:
    ``(L2-normalised vectors, their paths, number of indexed files removed)``. ``dim`` is used
    only when there are no vectors at all."""
    part_paths, part_vecs = _load_parts(parts_dir)
    all_paths = (existing.paths if existing else []) + part_paths
    blocks = ([np.asarray(existing.vectors)] if existing and len(existing) else []) + part_vecs
    dim = int(blocks[0].shape[1]) if blocks else dim
    matrix = np.concatenate(blocks) if blocks else np.zeros((0, dim), dtype=np.float32)
    keep, seen = [], set()
    for i, p in enumerate(all_paths):
        if p in present and p not in seen:
            keep.append(i)
            seen.add(p)
    removed = len(set(all_paths) - present)
    matrix = l2_normalise(matrix[keep]) if keep else matrix[:0]
    return matrix, [all_paths[i] for i in keep], removed


def _index_info(
    model: str, store: str | Path | None, embedder: Any, dim: int, count: int, root: Path
) -> dict[str, Any]:
    """The ``index.json`` contents."""
    return {
        "format": FORMAT,
        "model": model,
        # A folder store is recorded absolute, so `index query` works from any working folder.
        "store": None
        if store is None
        else (str(store) if str(store) == "bentoml" else str(Path(store).resolve())),
        "task": getattr(getattr(getattr(embedder, "model", None), "stored", None), "task", None),
        "dim": dim,
        "count": count,
        "root": str(root),
        "metric": "cosine",
        "updated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


# ------------------------------------------------------------------------------------------------ the command (nanomorph.cli calls run)


def _run_build(args: argparse.Namespace) -> int:
    from nanomorph.store import default_store

    if not args.out:
        raise ValueError("index build needs --out INDEX_DIR")
    if args.batch_size < 1 or args.chunk < 1:
        raise ValueError("--batch-size and --chunk must be >= 1")
    store = args.store or default_store()
    embedder = load_embedder(args.tag, store, args.batch_size)
    model = str(embedder.model.stored.tag)
    stats = build_index(
        args.path, args.out, embedder, model, store, chunk=args.chunk, recursive=not args.no_recursive
    )
    save_resolved(args, args.out)
    print(
        f"index {args.out}: {stats['count']} images ({stats['added']} added, {stats['skipped']} already there, "
        f"{stats['failed']} unreadable, {stats['removed']} removed), dim {stats['dim']}, model {model}"
    )
    return 0 if stats["count"] else 1


def _run_query(args: argparse.Namespace) -> int:
    if not args.index:
        raise ValueError("index query needs --index INDEX_DIR")
    if args.k < 1:
        raise ValueError(f"-k must be >= 1, got {args.k}")
    index = SimilarityIndex.load(args.index)
    if not Path(args.path).is_file():
        raise FileNotFoundError(f"query image {args.path} does not exist")
    model = index.model
    if not model:
        raise ValueError(f"{Path(args.index) / INFO}: no model recorded")
    embedder = load_embedder(model, args.store or index.info.get("store"), 1)
    image, _ = read_image(args.path)
    vec = embedder.embed([image])[0]
    results = index.query(vec, args.k)
    if args.json:
        print(json.dumps({"query": str(args.path), "model": model, "results": results}, indent=2))
        return 0
    width = max([len(r["path"]) for r in results] + [4])
    print(f"{'rank':>4}  {'distance':>8}  path")
    for r in results:
        print(f"{r['rank']:>4}  {r['distance']:>8.4f}  {r['path']:<{width}}")
    return 0


def run(args: argparse.Namespace) -> int:
    if args.action == "build":
        return _run_build(args)
    return _run_query(args)
