"""Running stored ONNX models with onnxruntime: sessions, providers and task-level helpers.

:class:`OnnxModel` wraps one ``onnxruntime.InferenceSession``. :class:`Classifier`,
:class:`Embedder` and :class:`Segmenter` take raw 2-D images, preprocess them with the
:class:`~nanomorph.contract.Contract` read from the model's own metadata (the only preprocessing
there is: :mod:`nanomorph.contract`), batch them and postprocess the outputs. Used by the service,
``nanomorph predict`` and the index/map commands. Never imports torch or bentoml; onnxruntime is
imported when a session is made.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from nanomorph.contract import (
    FrameTiles,
    Stitcher,
    aggregate_embeddings,
    aggregate_probabilities,
    choose_tile,
    frame_tiles,
    n_tiles,
    normalise,
    tile_chunks,
    to_model_input,
)
from nanomorph.store import StoredModel, load_model_dir
from nanomorph.tasks import get_task

log = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
#: ``auto``: a stored int8 model on CPU, fp32 on CUDA; ``fp32``: always the fp32 model
PRECISIONS = ("auto", "fp32")


def default_providers() -> list[str]:
    """Execution providers to use: ``NANOMORPH_PROVIDERS`` (comma list) if set, else CUDA then CPU
    when the GPU build of onnxruntime is installed, else CPU.

    Raises:
        ValueError: ``NANOMORPH_PROVIDERS`` names a provider this onnxruntime does not have.
    """
    import onnxruntime as ort

    available = ort.get_available_providers()
    requested = [p.strip() for p in os.environ.get("NANOMORPH_PROVIDERS", "").split(",") if p.strip()]
    if requested:
        missing = [p for p in requested if p not in available]
        if missing:
            raise ValueError(
                f"NANOMORPH_PROVIDERS names {', '.join(missing)}, not available in this onnxruntime "
                f"(available: {', '.join(available)})"
            )
        return requested
    return [CUDA, CPU] if CUDA in available else [CPU]


def default_precision(env: Mapping[str, str] | None = None) -> str:
    """``NANOMORPH_PRECISION`` of ``env`` (default ``os.environ``): ``auto`` or ``fp32``, else ``auto``.

    Raises:
        ValueError: another value.
    """
    value = (os.environ if env is None else env).get("NANOMORPH_PRECISION", "").strip().lower() or "auto"
    if value not in PRECISIONS:
        raise ValueError(f"NANOMORPH_PRECISION={value!r}: use {' or '.join(PRECISIONS)}")
    return value


def model_file(stored: StoredModel, providers: Sequence[str], precision: str = "auto") -> tuple[Path, str]:
    """``(ONNX file to load, "fp32" | "int8")`` of ``stored`` for a session on ``providers``.

    ``auto`` loads the int8 model (``model.int8.onnx``: stored only where export's accuracy check
    passed) on CPU and the fp32 ``model.onnx`` when CUDA is among the providers; ``fp32`` always
    the fp32 one. A model exported before both files were stored keeps a kept int8 model as its
    only ``model.onnx``: it is int8 whatever is asked.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: use {' or '.join(PRECISIONS)}")
    int8 = stored.int8_path
    if int8 is None:
        quant = stored.manifest.get("quantization")
        only_int8 = isinstance(quant, dict) and bool(quant.get("kept"))
        return stored.onnx_path, "int8" if only_int8 else "fp32"
    if precision == "auto" and CUDA not in providers:
        return int8, "int8"
    return stored.onnx_path, "fp32"


class OnnxModel:
    """One stored model in an onnxruntime session.

    Args:
        stored: a :class:`~nanomorph.store.StoredModel` or the path of a stored model folder
            (verified on load).
        providers: execution providers; :func:`default_providers` when None.
        threads: intra-op threads (0 = onnxruntime's default, all cores).
        precision: ``auto`` or ``fp32`` (:func:`model_file`); :func:`default_precision` when None.

    Attributes:
        stored: the stored model (task, classes, contract, metadata).
        session: the ``onnxruntime.InferenceSession``.
        providers: the providers the session actually uses (``session.get_providers()``).
        precision: ``fp32`` or ``int8``: the weights the session runs.
    """

    def __init__(
        self,
        stored: StoredModel | str | Path,
        providers: Sequence[str] | None = None,
        threads: int = 0,
        precision: str | None = None,
    ) -> None:
        import onnxruntime as ort

        self.stored = stored if isinstance(stored, StoredModel) else load_model_dir(stored)
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        options.log_severity_level = 3  # onnxruntime's own warnings are noise for users
        chosen = list(providers) if providers else default_providers()
        path, self.precision = model_file(self.stored, chosen, precision or default_precision())
        self.file = path.name  # the ONNX file in the session (model.onnx or model.int8.onnx)
        self.session = ort.InferenceSession(str(path), options, providers=chosen)
        self.providers: list[str] = list(self.session.get_providers())
        self.input_name: str = self.session.get_inputs()[0].name
        self.output_names: list[str] = [o.name for o in self.session.get_outputs()]
        log.info(
            "loaded %s (%s, %s) on %s",
            self.stored.tag,
            self.stored.task,
            self.precision,
            ", ".join(self.providers),
        )

    @property
    def task(self) -> str:
        return self.stored.task

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Runs a preprocessed batch ``float32 (N, 1, H, W)``; returns ``{output name: array}``."""
        x = np.ascontiguousarray(batch, dtype=np.float32)
        if x.ndim != 4 or x.shape[1] != 1:
            raise ValueError(f"model input must be (N, 1, H, W), got shape {x.shape}")
        outputs = self.session.run(self.output_names, {self.input_name: x})
        return {name: np.asarray(out) for name, out in zip(self.output_names, outputs, strict=True)}


def _as_model(
    model: OnnxModel | StoredModel | str | Path, providers: Sequence[str] | None, task: str | None = None
) -> OnnxModel:
    """An onnxruntime session for ``model``; with ``task``, refuses a model made for another task."""
    session = model if isinstance(model, OnnxModel) else OnnxModel(model, providers)
    if task is not None and session.task != task:
        raise ValueError(f"{session.stored.tag} is a {session.task} model, not {task}")
    return session


def _batches(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, max(1, size))]


class Embedder:
    """L2-normalised embeddings of whole images, from an ``embed`` or ``classify`` model.

    Args:
        model: an :class:`OnnxModel`, a stored model or its folder.
        providers: execution providers when ``model`` is not a session yet.
        batch_size: images per onnxruntime call.
    """

    def __init__(
        self,
        model: OnnxModel | StoredModel | str | Path,
        providers: Sequence[str] | None = None,
        batch_size: int = 32,
    ) -> None:
        self.model = _as_model(model, providers)
        if "embedding" not in self.model.output_names:
            raise ValueError(f"{self.model.stored.tag} has no 'embedding' output (task {self.model.task})")
        self.contract = self.model.stored.contract
        self.batch_size = batch_size

    def preprocess(self, image: np.ndarray) -> np.ndarray:
        """Raw 2-D image -> float32 (1, S, S) with the model's contract."""
        return to_model_input(image, self.contract)

    def embed_batch(self, batch: np.ndarray) -> np.ndarray:
        """Preprocessed batch (N, 1, S, S) -> embeddings (N, D)."""
        return self.model.run(batch)["embedding"].astype(np.float32, copy=False)

    def embed(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Raw 2-D images -> embeddings float32 (N, D)."""
        if len(images) == 0:
            return np.zeros((0, 0), dtype=np.float32)
        inputs = np.stack([self.preprocess(im) for im in images])
        return np.concatenate([self.embed_batch(inputs[s]) for s in _batches(len(inputs), self.batch_size)])

    __call__ = embed


class Classifier:
    """Class probabilities, embedding and out-of-distribution score per image.

    The OOD score follows the ``nanomorph.ood`` metadata: ``1 - max cosine similarity`` of the
    image's embedding to the class centroids of the training embeddings; ``ood_flag`` is
    ``score > threshold`` (a nearest-class-mean detector, cf. Lee et al. 2018, "A simple unified
    framework for detecting out-of-distribution samples", in its cosine form).
    """

    def __init__(
        self,
        model: OnnxModel | StoredModel | str | Path,
        providers: Sequence[str] | None = None,
        batch_size: int = 32,
    ) -> None:
        self.model = _as_model(model, providers, task="classify")
        stored = self.model.stored
        self.contract = stored.contract
        self.classes = list(stored.classes)
        self.batch_size = batch_size
        ood = stored.ood or {}
        self.centroids: np.ndarray | None = None
        self.threshold: float = float(ood.get("threshold", math.inf))
        if ood.get("centroids"):
            c = np.asarray(ood["centroids"], dtype=np.float32)
            self.centroids = c / np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-12)

    def preprocess(self, image: np.ndarray) -> np.ndarray:
        """Raw 2-D image -> float32 (1, S, S) with the model's contract."""
        return to_model_input(image, self.contract)

    def ood_scores(self, embeddings: np.ndarray) -> np.ndarray | None:
        """``1 - max cosine similarity`` to the class centroids, or None without OOD metadata."""
        if self.centroids is None:
            return None
        e = embeddings.astype(np.float64)
        e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
        # Row by row in float64, not one BLAS matmul: a matmul's summation order depends on the
        # batch size, and 1 - cos loses most digits near 1, so a served (batched) request and an
        # in-process one would otherwise differ in the 5th digit.
        cos = (e[:, None, :] * self.centroids.astype(np.float64)[None, :, :]).sum(axis=2)
        return np.clip(1.0 - cos.max(axis=1), 0.0, 2.0).astype(np.float32)

    def predict_batch(self, batch: np.ndarray) -> list[dict[str, Any]]:
        """Preprocessed batch (N, 1, S, S) -> one result dict per image (see :meth:`predict`)."""
        out = self.model.run(batch)
        probs = out["probabilities"].astype(np.float32, copy=False)
        emb = out.get("embedding")
        scores = self.ood_scores(emb) if emb is not None else None
        results = []
        for i, p in enumerate(probs):
            k = int(np.argmax(p))
            score = None if scores is None else float(scores[i])
            results.append(
                {
                    "label": self.classes[k] if k < len(self.classes) else str(k),
                    "confidence": float(p[k]),
                    "probabilities": {c: float(v) for c, v in zip(self.classes, p, strict=False)},
                    "embedding": None if emb is None else emb[i],
                    "ood_score": score,
                    "ood_flag": bool(score is not None and score > self.threshold),
                }
            )
        return results

    def frame_inputs(self, image: np.ndarray, pixel_size: float | None = None) -> FrameTiles:
        """Raw 2-D frame -> its model inputs: the whole frame, or tiles at the encoder's scale
        when the contract says so (:func:`nanomorph.contract.frame_tiles`)."""
        return frame_tiles(image, self.contract, pixel_size)

    def frame_result(
        self, rows: Sequence[dict[str, Any]], frame: FrameTiles, with_tiles: bool = False
    ) -> dict[str, Any]:
        """Per-input results (:meth:`predict_batch`) of one frame's inputs -> the frame's result.

        A frame classified whole returns its one result unchanged; a tiled frame gets the mean of
        its tiles' probabilities and the normalised mean of their embeddings (the OOD score is
        that of the frame embedding), plus ``n_tiles`` and, with ``with_tiles``, ``tiles``: per
        tile ``box`` [y, x, height, width] (native pixels), ``label``, ``confidence``,
        ``probabilities`` and ``used`` (False: no structure, left out of the aggregate).
        """
        if not frame.tiled:
            return {**rows[0], "n_tiles": 1}
        probs = np.asarray([[r["probabilities"][c] for c in self.classes] for r in rows], dtype=np.float32)
        p = aggregate_probabilities(probs, frame.keep, self.contract.cls_aggregate)
        k = int(np.argmax(p))
        emb = None
        score = None
        if rows[0].get("embedding") is not None:
            emb = aggregate_embeddings(np.stack([r["embedding"] for r in rows]), frame.keep)
            scores = self.ood_scores(emb[None])
            score = None if scores is None else float(scores[0])
        result: dict[str, Any] = {
            "label": self.classes[k] if k < len(self.classes) else str(k),
            "confidence": float(p[k]),
            "probabilities": {c: float(v) for c, v in zip(self.classes, p, strict=False)},
            "embedding": emb,
            "ood_score": score,
            "ood_flag": bool(score is not None and score > self.threshold),
            "n_tiles": len(rows),
        }
        if with_tiles:
            result["tiles"] = [
                {
                    "box": list(box),
                    "label": r["label"],
                    "confidence": r["confidence"],
                    "probabilities": r["probabilities"],
                    "used": bool(used),
                }
                for r, box, used in zip(rows, frame.boxes, frame.keep, strict=True)
            ]
        return result

    def predict(
        self,
        images: Sequence[np.ndarray],
        pixel_sizes: Sequence[float | None] | None = None,
        with_tiles: bool = False,
    ) -> list[dict[str, Any]]:
        """Classifies raw 2-D images (frames larger than the contract's ``cls_tile``: by tiles).

        Args:
            images: raw 2-D arrays.
            pixel_sizes: nm per pixel of each image (None: unknown), used when the contract ties
                tiles to a physical size (``cls_pixel_size``).
            with_tiles: add the per-tile map (``tiles``) to tiled frames' results.

        Returns:
            Per image: ``label``, ``confidence`` (its probability), ``probabilities`` (class ->
            probability), ``embedding`` (float32 (D,), L2-normalised), ``ood_score`` (float or None),
            ``ood_flag`` and ``n_tiles`` (see :meth:`frame_result`).
        """
        if len(images) == 0:
            return []
        sizes = list(pixel_sizes) if pixel_sizes is not None else [None] * len(images)
        frames = [self.frame_inputs(im, px) for im, px in zip(images, sizes, strict=True)]
        inputs = np.concatenate([f.x for f in frames])
        rows: list[dict[str, Any]] = []
        for s in _batches(len(inputs), self.batch_size):
            rows.extend(self.predict_batch(inputs[s]))
        results, start = [], 0
        for f in frames:
            results.append(self.frame_result(rows[start : start + len(f.x)], f, with_tiles))
            start += len(f.x)
        return results

    __call__ = predict


class Segmenter:
    """Per-pixel class probabilities of one raw image of any size (sliding window).

    The image is normalised with the model's contract and cut into overlapping tiles (an image
    smaller than a training tile runs as one tile padded only up to a multiple of 32). The U-Net is
    fully convolutional, so large frames run on tiles up to the contract's inference tile for the
    provider in use (``infer_tile_cpu`` / ``infer_tile_cuda``; :func:`nanomorph.contract.choose_tile`
    picks the side that computes the fewest pixels), a few tiles per onnxruntime call, and each
    call's predictions are blended into the output at once (:class:`nanomorph.contract.Stitcher`),
    so memory stays bounded for any frame. The service runs the same plan (:meth:`tile_geometry`,
    :meth:`tiles_per_call`, ``tile_chunks``, ``Stitcher``) through its batcher.
    """

    def __init__(
        self,
        model: OnnxModel | StoredModel | str | Path,
        providers: Sequence[str] | None = None,
        batch_size: int = 8,
        max_tile: int | None = None,
    ) -> None:
        from nanomorph.particles import InstanceParams, semantic_classes

        self.model = _as_model(model, providers, task="segment")
        self.contract = self.model.stored.contract
        #: post-processing of a boundary-aware model (``nanomorph.instances``), else None
        self.instances = InstanceParams.from_dict(self.model.stored.metadata.get("instances"))
        self.model_classes = list(self.model.stored.classes)  # the output channels
        self.classes = semantic_classes(self.model_classes, self.instances)  # what masks hold
        self.batch_size = batch_size
        self.provider = "cuda" if CUDA in self.model.providers else "cpu"
        #: largest inference tile side (the contract's for this provider unless overridden)
        self.max_tile = max(self.contract.tile_size, max_tile or self.contract.infer_tile(self.provider))

    def tile_geometry(self, shape: tuple[int, int]) -> tuple[int, int]:
        """``(tile side, overlap)`` for an image of ``shape``."""
        t = self.contract.tile_size
        longest = max(shape)
        if longest <= t:
            return max(32, 32 * math.ceil(longest / 32)), 0
        overlap = self.contract.tile_overlap
        return choose_tile((int(shape[0]), int(shape[1])), t, self.max_tile, overlap), overlap

    def tiles_per_call(self, side: int, batch_size: int | None = None) -> int:
        """Tiles of ``side`` per onnxruntime call: ``batch_size`` training tiles' worth of pixels."""
        pixels = (batch_size or self.batch_size) * self.contract.tile_size**2
        return max(1, pixels // (side * side))

    def _stitch(self, image: np.ndarray, keep_probabilities: bool) -> Stitcher:
        img = np.asarray(image)
        if img.ndim != 2:
            raise ValueError(f"segmentation takes one 2-D image, got shape {img.shape}")
        norm = normalise(img, self.contract)
        side, overlap = self.tile_geometry(norm.shape)
        single = n_tiles(norm.shape, side, overlap) == 1
        stitcher = Stitcher(norm.shape, side, single_tile=single, keep_probabilities=keep_probabilities)
        for batch, positions in tile_chunks(norm, side, overlap, self.tiles_per_call(side)):
            stitcher.add(self.model.run(batch)["probabilities"], positions)
        return stitcher

    def probabilities(self, image: np.ndarray) -> np.ndarray:
        """Raw 2-D image -> float32 (C, H, W) class probabilities."""
        _, probs = self._stitch(image, keep_probabilities=True).finish()
        assert probs is not None
        return probs

    def mask(self, image: np.ndarray) -> np.ndarray:
        """Raw 2-D image -> class index mask (H, W), uint8 (uint16 above 256 classes); the
        probabilities are never held for the whole frame (1 byte per pixel of output)."""
        if self.instances is not None:  # a rim channel must be folded into its particle class
            return self.predict(image)["mask"]
        mask, _ = self._stitch(image, keep_probabilities=False).finish()
        return mask

    def predict(self, image: np.ndarray) -> dict[str, Any]:
        """Raw 2-D image -> ``{"mask": (H, W) class index into .classes (uint8, uint16 above 256
        classes: :func:`nanomorph.contract.mask_dtype`), "instances": int32
        (H, W) particle ids, "probabilities": float32 (C, H, W) over .model_classes}``.

        Mask and instances come from :func:`nanomorph.particles.segment_probs` (the service's too).
        """
        from nanomorph.particles import segment_probs

        probs = self.probabilities(image)
        mask, instances, _ = segment_probs(probs, self.model_classes, self.instances)
        return {"mask": mask, "instances": instances, "probabilities": probs}

    def mask_and_instances(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(mask, instances)`` as :meth:`predict` gives them, in bounded memory where the model
        has no boundary channel (the mask streams; instances are its connected components, as
        :func:`nanomorph.particles.segment_probs` makes them)."""
        if self.instances is not None:
            result = self.predict(image)
            return result["mask"], result["instances"]
        from nanomorph.particles import connected_instances

        mask = self.mask(image)
        return mask, connected_instances(mask)

    __call__ = predict


def task_helper(
    task: str, model: OnnxModel, max_tile: int | None = None
) -> Classifier | Embedder | Segmenter:
    """The runtime object that does ``task`` with ``model``: the class its
    :class:`nanomorph.tasks.Task` row names (``embed`` takes any model with an embedding output).

    ``max_tile`` bounds the inference tile of a tiled task (segment); the others have none.
    """
    row = get_task(task)
    cls = globals()[row.runtime]  # the row names a class of this module
    return cls(model, max_tile=max_tile) if row.tiled else cls(model)
