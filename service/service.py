"""The nanomorph HTTP service: classify, embed and segment TEM images with stored ONNX models.

Start it with ``nanomorph serve`` or ``bentoml serve service.service:Nanomorph``. Configuration is
read from environment variables (:mod:`service.settings`, docs/service.md).

Shape of the service:

* :class:`Nanomorph` is a ``@bentoml.service``: BentoML supplies the server, the workers,
  ``/healthz`` ``/livez`` ``/readyz`` ``/metrics`` and the OpenAPI document; :mod:`service.webui`
  adds the web page (``/``), the API docs (``/docs``, ``/docs.json``) and ``POST /preview``.
* The public endpoints are FastAPI routes mounted into it (``@bentoml.asgi_app``), so that uploads,
  form fields and error bodies are under our control and every response has a pydantic model
  in the OpenAPI document. They read the uploads, run the input guard (:mod:`service.guard`),
  preprocess with the model's own contract (:mod:`nanomorph.contract`, via
  :mod:`nanomorph.runtime`) and hand arrays to the internal batch APIs ``classify_batch``,
  ``embed_batch`` and ``segment_batch`` (one array argument each) through a
  :class:`~service.batching.Batcher`, which gathers concurrent requests into one onnxruntime call.
* Models load in a background thread (sha256 verified by :func:`nanomorph.store.resolve`), are
  warmed up, and only then does ``/readyz`` answer 200. A task whose model is missing answers 503
  ``model_unavailable`` while the other endpoints work.
* ``POST /similar`` searches the index folder named by ``NANOMORPH_INDEX`` (built by ``nanomorph
  index build`` with the served embed model; :class:`nanomorph.index.SimilarityIndex`); without
  one, or with an index of another model, it answers 503 ``index_unavailable``.

Never imports torch or ``training``.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import math
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import bentoml
import numpy as np
from fastapi import FastAPI, File, Form, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from nanomorph.contract import ImageMeta, normalise, peek_shape
from nanomorph.contract.frames import nm_per_px
from nanomorph.index import SimilarityIndex
from nanomorph.morphology import mask_to_png_bytes, measure
from nanomorph.particles import connected_instances, segment_probs
from nanomorph.particles import report as particle_report
from nanomorph.runtime import Classifier, Embedder, OnnxModel, Segmenter
from nanomorph.store import StoredModel, resolve
from service import metrics
from service.batching import Batcher, Overloaded
from service.guard import GuardError, GuardMiddleware, decode_upload
from service.largeframes import Busy, PixelBudget, segment_tiles, trim_memory
from service.lifecycle import RecycleMiddleware, recycling_enabled
from service.settings import TASKS, Settings
from service.webui import install as install_web_page

# BentoML configures the "bentoml" logger hierarchy in its workers; log under it so our lines
# (providers in use, models loaded, warm-up) reach the server log.
log = logging.getLogger("bentoml.nanomorph")

SETTINGS = Settings.from_env()
#: Frames at least this large (pixels) hand freed memory back to the system when they finish.
LARGE_FRAME = 2048 * 2048
#: Routes left out of BentoML's OpenTelemetry middleware (regular expressions searched in the URL).
UNTRACED = ("/classify", "/embed", "/segment", "/similar")

# ------------------------------------------------------------------------------------------ schemas


class ErrorResponse(BaseModel):
    """Every refused request: what went wrong (naming the file) and a machine-readable reason."""

    error: str = Field(description="human-readable message, naming the offending file or field")
    reason: str = Field(
        description="machine-readable code: empty, undecodable, corrupt, unsupported_format, too_large, "
        "too_many_pixels, too_many_files, request_too_large, unsupported_media_type, missing_field, "
        "invalid_field, non_finite, dimensions, unauthorized, model_unavailable, index_unavailable, overloaded, "
        "over_budget, busy"
    )


class TileResult(BaseModel):
    box: list[int] = Field(description="[y, x, height, width] of the tile in the image's pixels")
    label: str
    confidence: float
    probabilities: dict[str, float]
    used: bool = Field(description="false: no structure, left out of the frame's probabilities")


class ClassifyResult(BaseModel):
    filename: str = Field(description="the uploaded file's name")
    shape: list[int] = Field(description="[height, width] of the decoded image")
    label: str = Field(description="predicted class")
    confidence: float = Field(ge=0, le=1, description="probability of the predicted class")
    probabilities: dict[str, float] = Field(description="class -> probability (sums to 1)")
    ood_score: float | None = Field(
        description="1 - max cosine similarity of the embedding to the training class centroids; "
        "null when the model has no OOD calibration"
    )
    ood_flag: bool = Field(description="ood_score above the threshold calibrated at export")
    model: str = Field(description="tag of the model that answered")
    n_tiles: int = Field(default=1, description="model inputs of this image: 1 = classified whole")
    tiles: list[TileResult] | None = Field(
        default=None,
        description="with ?tiles=true, per tile of a tiled frame (see nanomorph.contract.frames)",
    )


class ClassifyResponse(BaseModel):
    model: str = Field(description="tag of the classify model")
    results: list[ClassifyResult] = Field(description="one per uploaded image, in upload order")


class EmbedResult(BaseModel):
    filename: str
    shape: list[int] = Field(description="[height, width] of the decoded image")
    embedding: list[float] = Field(description="L2-normalised float32 embedding")


class EmbedResponse(BaseModel):
    model: str = Field(description="tag of the embed model")
    dim: int = Field(description="embedding dimension")
    results: list[EmbedResult] = Field(description="one per uploaded image, in upload order")


class SimilarItem(BaseModel):
    rank: int = Field(ge=1, description="1 = most similar")
    path: str = Field(description="the archive image (index root joined with its relative path)")
    distance: float = Field(description="1 - cosine similarity of the embeddings, in [0, 2]")


class SimilarResponse(BaseModel):
    model: str = Field(description="tag of the embed model (the one the index was built with)")
    filename: str = Field(description="the uploaded file's name")
    shape: list[int] = Field(description="[height, width] of the decoded image")
    index_size: int = Field(description="images in the index")
    results: list[SimilarItem] = Field(description="nearest first")


class LegendEntry(BaseModel):
    index: int = Field(description="pixel value in the mask")
    name: str = Field(description="class name")


class SegmentResponse(BaseModel):
    model: str = Field(description="tag of the segment model")
    filename: str
    shape: list[int] = Field(description="[height, width] of the image and the mask")
    mask_png: str = Field(
        description="base64 PNG (8-bit, 16-bit above 255 classes), one class index per pixel"
    )
    legend: list[LegendEntry] = Field(description="mask value -> class name")
    pixel_size: float | None = Field(
        description="pixel size used for the physical numbers (form field or file metadata)"
    )
    pixel_unit: str | None = Field(description="unit of pixel_size")
    morphology: dict[str, Any] = Field(
        description="numbers from the mask (nanomorph.morphology.measure): per class area fraction, "
        "domains, sizes, and for wire classes length, width and orientation order"
    )
    particles: list[dict[str, Any]] | None = Field(
        default=None,
        description="with ?particles=true: one row per particle (nanomorph.particles.COLUMNS: id, class, "
        "area_px, diameter_px (equivalent circular), major/minor_axis_px, aspect_ratio, circularity, "
        "orientation_deg, centroid_x/y_px, touches_border, and area/diameter/axes in pixel_unit when "
        "calibrated); ids are the particle ids of the instance map",
    )
    particle_summary: dict[str, Any] | None = Field(
        default=None,
        description="with ?particles=true: count (particles not touching the border), n_border, "
        "number_density, diameter mean/median/std, log-normal fit (mu, sigma of ln d)",
    )


class ModelInfo(BaseModel):
    task: Literal["classify", "embed", "segment"]
    tag: str = Field(description="configured tag; the resolved version once loaded")
    available: bool = Field(description="loaded and serving")
    error: str | None = Field(description="why the model is not available")
    classes: list[str] = Field(default_factory=list)
    contract: dict[str, Any] = Field(
        default_factory=dict, description="preprocessing contract from the ONNX metadata"
    )
    providers: list[str] = Field(
        default_factory=list, description="onnxruntime providers in use (session.get_providers())"
    )
    sha256: str | None = Field(default=None, description="sha256 of model.onnx, verified at load")
    metrics: dict[str, Any] = Field(default_factory=dict, description="evaluation metrics recorded at export")
    ood_threshold: float | None = Field(default=None, description="classify: the OOD flag threshold")
    precision: str | None = Field(
        default=None, description="weights served: fp32, or int8 when export kept a quantised model"
    )
    inference_tile: int | None = Field(
        default=None, description="segment: largest inference tile side (px) on the providers in use"
    )


class ModelsResponse(BaseModel):
    ready: bool = Field(description="model loading has finished")
    models: list[ModelInfo]
    max_batch_size: int
    max_latency_ms: int
    batch_wait_ms: float
    limits: dict[str, int] = Field(
        description="max_upload_bytes, max_request_bytes, max_files, max_pixels, pixel_budget, pixel_queue"
    )


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": desc}
    for code, desc in {
        400: "empty or undecodable upload",
        401: "missing or wrong bearer token (when NANOMORPH_API_TOKENS is set)",
        413: "upload, request or image too large; /segment frame over the pixel budget",
        415: "unsupported image format or request media type",
        422: "missing or invalid form field",
        503: "the task's model is not loaded, the server is overloaded, or the pixel budget's queue is full",
    }.items()
}

# ------------------------------------------------------------------------------------------ models


@dataclass
class ModelSlot:
    """One task's model: loaded (with its task helper and batcher) or the reason it is not."""

    task: str
    tag: str
    stored: StoredModel | None = None
    onnx: OnnxModel | None = None
    helper: Any = None
    batcher: Batcher | None = None
    error: str | None = "not loaded yet"
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def available(self) -> bool:
        return self.batcher is not None

    def info(self) -> ModelInfo:
        stored = self.stored
        ood = (stored.ood or {}) if stored else {}
        return ModelInfo(
            task=self.task,  # type: ignore[arg-type]
            tag=stored.tag if stored else self.tag,
            available=self.available,
            error=None if self.available else self.error,
            classes=list(stored.classes) if stored else [],
            contract=stored.contract.to_dict() if stored else {},
            providers=list(self.onnx.providers) if self.onnx else [],
            sha256=(stored.manifest.get("files") or {}).get("model.onnx") if stored else None,
            metrics=stored.metrics if stored else {},
            ood_threshold=float(ood["threshold"]) if "threshold" in ood else None,
            precision=_precision(stored) if stored else None,
            inference_tile=getattr(self.helper, "max_tile", None) if self.task == "segment" else None,
        )


def _precision(stored: StoredModel) -> str:
    quant = stored.manifest.get("quantization") or {}
    return "int8" if isinstance(quant, dict) and quant.get("kept") else "fp32"


def _model_input(stored: StoredModel, task: str) -> np.ndarray:
    """A dummy input for warm-up: one blank image of the model's input size."""
    side = stored.contract.tile_size if task == "segment" else stored.contract.image_size
    return np.zeros((1, 1, side, side), dtype=np.float32)


def _error(status: int, reason: str, message: str) -> JSONResponse:
    # Every 503 (models loading, a restarted worker, overload) is temporary: say when to come back.
    headers = {"Retry-After": str(SETTINGS.retry_after_s)} if status == 503 else None
    return JSONResponse({"error": message, "reason": reason}, status_code=status, headers=headers)


# ------------------------------------------------------------------------------------------ the app

app = FastAPI(
    title="nanomorph",
    version="1",
    description="Classify, embed and segment TEM images with self-supervised models.",
    docs_url=None,  # service.webui serves the page (/), the docs UI (/docs) and BentoML's merged /docs.json
    redoc_url=None,
    openapi_url=None,
)


async def _current_service() -> Any:
    return bentoml.get_current_service()


# BentoML hands `self` to the routes through a *sync* FastAPI dependency, which FastAPI runs in a
# worker thread: one thread hop per request just to fetch a global (~5% of a worker's CPU per
# /classify in a py-spy profile). The same dependency, async, runs on the event loop.
app.dependency_overrides[bentoml.get_current_service] = _current_service


@app.exception_handler(GuardError)
async def _guard_error(request: Request, exc: GuardError) -> JSONResponse:
    metrics.record_rejection(request.url.path, exc.reason)
    return _error(exc.status, exc.reason, exc.message)


@app.exception_handler(Overloaded)
async def _overloaded(request: Request, exc: Overloaded) -> JSONResponse:
    metrics.record_rejection(request.url.path, "overloaded")
    return _error(503, "overloaded", str(exc))


@app.exception_handler(Busy)
async def _busy(request: Request, exc: Busy) -> JSONResponse:
    metrics.record_rejection(request.url.path, "busy")
    return JSONResponse(
        {"error": str(exc), "reason": "busy"},
        status_code=503,
        headers={"Retry-After": str(exc.retry_after_s)},
    )


_HTTP_REASONS = {400: "malformed_request", 404: "not_found", 405: "method_not_allowed"}


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    # e.g. a multipart body without (or with a wrong) boundary: FastAPI raises a 400 with `detail`;
    # answer it in the service's own error format like every other refusal.
    reason = _HTTP_REASONS.get(exc.status_code, "http_error")
    if exc.status_code < 500:
        metrics.record_rejection(request.url.path, reason)
    return JSONResponse(
        {"error": str(exc.detail), "reason": reason}, status_code=exc.status_code, headers=exc.headers
    )


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    problems = []
    reason = "invalid_field"
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", ()) if p not in ("body", "query")]
        where = ".".join(loc) or "request"
        if err.get("type") == "missing":
            reason = "missing_field"
            problems.append(f"missing form field '{where}'")
        else:
            problems.append(f"{where}: {err.get('msg')}")
    metrics.record_rejection(request.url.path, reason)
    return _error(422, reason, "; ".join(problems) or "invalid request")


@bentoml.service(
    name="nanomorph",
    workers=SETTINGS.workers,
    traffic={"timeout": SETTINGS.timeout_s},
    # bentoml 1.4.40 recycles the connections of internal calls (self.to_async, bentoml.depends)
    # after 100 requests and drops ~6% of requests under concurrency doing so; never recycle.
    runner_connection={"max_requests": 10**9, "max_age": 86400.0},
    # bentoml 1.4.40 records OpenTelemetry spans for every request and every ASGI message even with
    # tracing off (its sampler always records): ~20% of a worker's CPU per /classify in a py-spy
    # profile. Leave the inference routes out unless NANOMORPH_TRACE_REQUESTS=1.
    tracing={} if SETTINGS.trace_requests else {"excluded_urls": list(UNTRACED)},
)
@bentoml.asgi_app(app, path="/")
class Nanomorph:
    """nanomorph: classify, embed and segment TEM images (see docs/service.md)."""

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or SETTINGS
        self.slots: dict[str, ModelSlot] = {t: ModelSlot(t, self.settings.models[t]) for t in TASKS}
        # Similar-image search: an index folder from `nanomorph index build` (NANOMORPH_INDEX).
        self.index: SimilarityIndex | None = None
        self.index_error = (
            "no index configured: set NANOMORPH_INDEX to a folder made by `nanomorph index build`"
        )
        # /segment pixels in flight (service.largeframes): bounds the memory of large frames.
        self.pixels = PixelBudget(self.settings.pixel_budget, self.settings.pixel_queue)
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._loader = threading.Thread(target=self._load_models, name="nanomorph-loader", daemon=True)
        self._loader.start()

    # ---------------------------------------------------------------------------- loading

    def _load_one(self, slot: ModelSlot) -> None:
        s = self.settings
        stored = resolve(slot.tag, s.store)  # verifies the sha256 of every file
        onnx = OnnxModel(stored, providers=list(s.providers) or None, threads=s.ort_threads)
        log.info("%s: %s from %s on providers %s", slot.task, stored.tag, stored.path, onnx.providers)
        helper: Any
        fn: Any
        if slot.task == "classify":
            helper, fn = Classifier(onnx), self.classify_batch
        elif slot.task == "embed":
            helper, fn = Embedder(onnx), self.embed_batch
        else:
            helper, fn = Segmenter(onnx, max_tile=s.segment_tile or None), self.segment_batch
        slot.stored, slot.onnx, slot.helper = stored, onnx, helper
        if s.warmup:
            t0 = time.perf_counter()
            onnx.run(_model_input(stored, slot.task))
            log.info("%s: warm-up %.0f ms", slot.task, 1000 * (time.perf_counter() - t0))
        # Segment calls hold at most max_batch_size training tiles' worth of pixels, however large
        # the inference tiles and however many frames are in flight.
        elements = s.max_batch_size * stored.contract.tile_size**2 if slot.task == "segment" else 0
        slot.batcher = Batcher(
            fn,
            s.max_batch_size,
            s.max_latency_ms,
            s.batch_wait_ms,
            name=f"nanomorph-{slot.task}",
            max_elements=elements,
        )
        slot.error = None
        sha = (stored.manifest.get("files") or {}).get("model.onnx", "")
        metrics.MODEL_INFO.labels(
            task=slot.task, tag=stored.tag, sha256=sha, providers=",".join(onnx.providers)
        ).set(1)

    def _load_models(self) -> None:
        """Loads every task's model; keeps polling the store for required ones (and, while no
        model at all has loaded, for any), then reports ready."""
        required = set(self.settings.required)
        tried: set[str] = set()
        last_note, last_time = "", 0.0
        while not self._stop.is_set():
            for task, slot in self.slots.items():
                if slot.available or (task in tried and task not in required and self._any_loaded()):
                    continue
                before = slot.error
                try:
                    self._load_one(slot)
                except FileNotFoundError as exc:
                    slot.error = str(exc)
                    if slot.error != before:
                        log.warning("%s: %s; /%s answers 503 until it is there", task, exc, task)
                except Exception as exc:  # integrity error, bad model: that endpoint stays off
                    slot.error = f"{type(exc).__name__}: {exc}"
                    if slot.error != before:  # polled again later: say it once, not every poll
                        log.error("%s: cannot load %s: %s", task, slot.tag, slot.error)
                tried.add(task)
            waiting = [
                t for t in TASKS if not self.slots[t].available and (t in required or not self._any_loaded())
            ]
            if not waiting:
                break
            note = f"waiting for models: {', '.join(waiting)} (store {self.settings.store})"
            if note != last_note or time.monotonic() - last_time > 30:
                log.info(note)
                last_note, last_time = note, time.monotonic()
            self._stop.wait(self.settings.poll_s)
        self._load_index()
        self._ready.set()
        log.info(
            "ready: %s",
            ", ".join(f"{t}={'ok' if s.available else 'unavailable'}" for t, s in self.slots.items()),
        )

    def _load_index(self) -> None:
        path = os.environ.get("NANOMORPH_INDEX", "").strip()
        if not path:
            return
        try:
            index = SimilarityIndex.load(path)  # vectors memory-mapped
            slot = self.slots["embed"]
            if slot.stored is not None:
                index.check_model(slot.stored.tag)
        except (OSError, ValueError) as exc:
            self.index_error = f"index {path}: {exc}"
            log.error("/similar unavailable: %s", self.index_error)
            return
        self.index = index
        log.info("index %s: %d images, model %s", path, len(index), index.model)

    def _any_loaded(self) -> bool:
        return any(s.available for s in self.slots.values())

    def __is_ready__(self) -> bool:
        return self._ready.is_set()

    def _slot(self, task: str) -> ModelSlot:
        slot = self.slots[task]
        if not slot.available:
            if not self._ready.is_set():
                raise GuardError(
                    503, "model_unavailable", "models are still loading; retry when /readyz is ready"
                )
            raise GuardError(503, "model_unavailable", f"no {task} model is loaded: {slot.error}")
        return slot

    # ---------------------------------------------------------------- internal batch APIs
    # One array argument each (batch axis first), so that concurrent requests can share a call.

    def _observe(self, task: str, n: int, seconds: float) -> None:
        tag = self.slots[task].stored.tag  # type: ignore[union-attr]
        metrics.INFERENCE_SECONDS.labels(task=task, model=tag).observe(seconds)
        metrics.BATCH_IMAGES.labels(task=task, model=tag).observe(n)

    def classify_batch(self, images: np.ndarray) -> list[dict[str, Any]]:
        """Preprocessed images (N, 1, S, S) -> N classification dicts (see ``Classifier.predict``)."""
        t0 = time.perf_counter()
        out: list[dict[str, Any]] = self.slots["classify"].helper.predict_batch(images)
        self._observe("classify", len(images), time.perf_counter() - t0)
        return out

    def embed_batch(self, images: np.ndarray) -> np.ndarray:
        """Preprocessed images (N, 1, S, S) -> embeddings (N, D)."""
        t0 = time.perf_counter()
        out: np.ndarray = self.slots["embed"].helper.embed_batch(images)
        self._observe("embed", len(images), time.perf_counter() - t0)
        return out

    def segment_batch(self, tiles: np.ndarray) -> np.ndarray:
        """Normalised tiles (N, 1, T, T) -> class probabilities (N, C, T, T)."""
        t0 = time.perf_counter()
        out: np.ndarray = self.slots["segment"].onnx.run(tiles)["probabilities"]  # type: ignore[union-attr]
        self._observe("segment", len(tiles), time.perf_counter() - t0)
        return out

    # ------------------------------------------------------------------- large frames

    def _frame_pixels(self, data: bytes, name: str) -> int:
        """Pixels of the uploaded frame, from its header; a bad or over-limit upload raises its
        usual 4xx here (decode_upload), before any budget is taken."""
        try:
            h, w = peek_shape(data, name=name)
        except Exception:
            h, w = 0, 0
        if h * w == 0 or h * w > self.settings.max_pixels:
            image, _ = decode_upload(data, name, self.settings)  # raises the precise refusal
            h, w = image.shape[:2]
        return int(h * w)

    async def _segment_frame(
        self, slot: ModelSlot, data: bytes, name: str, with_instances: bool
    ) -> tuple[ImageMeta, np.ndarray, np.ndarray | None, bytes]:
        """Decodes, normalises and segments one frame tile chunk by tile chunk (service.largeframes).

        Returns ``(meta, mask, instances or None, mask PNG)``, post-processed exactly as
        :meth:`nanomorph.runtime.Segmenter.mask_and_instances`: a boundary-aware model keeps its
        probabilities for the watershed; otherwise the mask streams and instances, when asked
        for, are its connected components."""
        seg: Segmenter = slot.helper
        batcher = slot.batcher
        assert batcher is not None

        def prepare() -> tuple[ImageMeta, np.ndarray]:
            image, meta = decode_upload(data, name, self.settings)
            return meta, normalise(image, seg.contract)  # the raw frame is freed on return

        meta, norm = await asyncio.to_thread(prepare)
        side, overlap = seg.tile_geometry(norm.shape)
        per_call = seg.tiles_per_call(side, self.settings.max_batch_size)
        boundary = seg.instances is not None
        mask, probs = await segment_tiles(norm, side, overlap, per_call, batcher.submit, boundary)
        del norm

        def finish() -> tuple[np.ndarray, np.ndarray | None, bytes]:
            if boundary:
                assert probs is not None
                folded, ids, _ = segment_probs(probs, seg.model_classes, seg.instances)
                return folded, ids, mask_to_png_bytes(folded)
            return mask, connected_instances(mask) if with_instances else None, mask_to_png_bytes(mask)

        folded, instances, png = await asyncio.to_thread(finish)
        return meta, folded, instances, png

    # ------------------------------------------------------------------- upload handling

    async def _read_upload(self, upload: UploadFile) -> tuple[bytes, str]:
        name = upload.filename or "upload"
        limit = self.settings.max_upload_bytes
        if upload.size is not None and upload.size > limit:
            raise GuardError(
                413, "too_large", f"{name}: {upload.size} bytes is over the upload limit of {limit} bytes"
            )
        data = await upload.read(limit + 1)
        return data, name

    async def _decode(
        self, uploads: list[UploadFile], prepare: Any, with_meta: bool = False
    ) -> list[tuple[str, ImageMeta, Any]]:
        """Reads, guards and preprocesses uploads (decoding off the event loop)."""
        if len(uploads) > self.settings.max_files:
            raise GuardError(
                413,
                "too_many_files",
                f"{len(uploads)} files in one request; the limit is {self.settings.max_files}",
            )
        out = []
        for upload in uploads:
            data, name = await self._read_upload(upload)

            def work(data: bytes = data, name: str = name) -> tuple[ImageMeta, Any]:
                image, meta = decode_upload(data, name, self.settings)
                return meta, prepare(image, meta) if with_meta else prepare(image)

            meta, arr = await asyncio.to_thread(work)
            out.append((name, meta, arr))
        return out

    # -------------------------------------------------------------------- public endpoints

    @app.post(
        "/classify",
        response_model=ClassifyResponse,
        responses=ERRORS,
        summary="Classify one or more images",
        tags=["inference"],
    )
    async def classify(
        self,
        images: list[UploadFile] = File(
            description="image files (PNG, JPEG, TIFF incl. 16-bit/float, DM3/DM4, MRC); repeat the field for several"
        ),
        pixel_size: float | None = Form(
            default=None,
            gt=0,
            allow_inf_nan=False,
            description="nm per pixel of every image; default: the file's metadata (used by models whose "
            "contract ties classification tiles to a physical size)",
        ),
        tiles: bool = Query(default=False, description="return the per-tile map of tiled frames"),
    ) -> ClassifyResponse:
        """Label, confidence, class probabilities and an out-of-distribution score per image.

        Frames larger than the model's classification tile (``cls_tile`` in its contract) are
        classified by tiles at the encoder's scale and the tile probabilities averaged, exactly as
        in training (:mod:`nanomorph.contract.frames`); ``tiles=true`` returns the per-tile map.
        """
        slot = self._slot("classify")
        helper: Classifier = slot.helper

        def prepare(image: np.ndarray, meta: ImageMeta) -> Any:
            return helper.frame_inputs(image, pixel_size if pixel_size is not None else nm_per_px(meta))

        decoded = await self._decode(images, prepare, with_meta=True)
        rows = await slot.batcher.submit(np.concatenate([f.x for _, _, f in decoded]))  # type: ignore[union-attr]
        results, start = [], 0
        for _, _, frame in decoded:
            results.append(helper.frame_result(rows[start : start + len(frame.x)], frame, tiles))
            start += len(frame.x)
        tag = slot.stored.tag  # type: ignore[union-attr]
        metrics.IMAGES.labels(endpoint="classify").inc(len(decoded))
        out = []
        for (name, meta, _), r in zip(decoded, results, strict=True):
            metrics.PREDICTIONS.labels(model=tag, label=r["label"]).inc()
            if r["ood_flag"]:
                metrics.OOD_FLAGS.labels(model=tag).inc()
            score = r["ood_score"]
            out.append(
                ClassifyResult(
                    filename=name,
                    shape=list(meta.shape[:2]),
                    label=r["label"],
                    confidence=r["confidence"],
                    probabilities=r["probabilities"],
                    ood_score=None if score is None or not math.isfinite(score) else score,
                    ood_flag=bool(r["ood_flag"]),
                    model=tag,
                    n_tiles=r["n_tiles"],
                    tiles=[TileResult(**t) for t in r["tiles"]] if r.get("tiles") else None,
                )
            )
        return ClassifyResponse(model=tag, results=out)

    @app.post(
        "/embed",
        response_model=EmbedResponse,
        responses=ERRORS,
        summary="Embedding vectors of one or more images",
        tags=["inference"],
    )
    async def embed(
        self,
        images: list[UploadFile] = File(description="image files; repeat the field for several"),
    ) -> EmbedResponse:
        """L2-normalised float32 embedding per image (for search, clustering, maps)."""
        slot = self._slot("embed")
        decoded = await self._decode(images, slot.helper.preprocess)
        vectors = await slot.batcher.submit(np.stack([a for _, _, a in decoded]))  # type: ignore[union-attr]
        metrics.IMAGES.labels(endpoint="embed").inc(len(decoded))
        results = [
            EmbedResult(
                filename=name, shape=list(meta.shape[:2]), embedding=np.asarray(v, np.float32).tolist()
            )
            for (name, meta, _), v in zip(decoded, vectors, strict=True)
        ]
        dim = len(results[0].embedding) if results else 0
        return EmbedResponse(model=slot.stored.tag, dim=dim, results=results)  # type: ignore[union-attr]

    @app.post(
        "/segment",
        response_model=SegmentResponse,
        responses={
            **ERRORS,
            200: {"content": {"image/png": {}}, "description": "JSON, or the mask PNG with ?format=png"},
        },
        summary="Segment one image of any size",
        tags=["inference"],
    )
    async def segment(
        self,
        image: UploadFile = File(description="one image file of any size (sliding window over large frames)"),
        pixel_size: float | None = Form(
            default=None,
            gt=0,
            allow_inf_nan=False,  # "inf" / "1e400" would pass gt=0 and fail later in measure() (500)
            description="physical size of a pixel; default: from the file's metadata",
        ),
        pixel_unit: str | None = Form(
            default=None, max_length=16, description="unit of pixel_size (default nm)"
        ),
        format: Literal["json", "png"] = Query(default="json", description="png: return only the mask PNG"),
        particles: bool = Query(
            default=False,
            description="also return the per-particle table and its summary (instances: watershed for "
            "models with a boundary class, else connected components of the mask)",
        ),
    ) -> Any:
        """Class mask, legend and morphology numbers (area fractions, domain sizes, wire length/width/orientation)."""
        slot = self._slot("segment")
        data, name = await self._read_upload(image)
        pixels = await asyncio.to_thread(self._frame_pixels, data, name)
        budget = self.pixels.budget
        if pixels > budget:
            raise GuardError(
                413,
                "over_budget",
                f"{name}: {pixels} pixels is over the compute budget of {budget} pixels per request "
                "(NANOMORPH_PIXEL_BUDGET)",
            )
        seg: Segmenter = slot.helper
        try:
            async with self.pixels.hold(pixels):  # waits in line; 503 busy when the line is full
                meta, mask, instances, png = await self._segment_frame(slot, data, name, particles)
                size = pixel_size if pixel_size is not None else meta.pixel_size
                unit = pixel_unit or (meta.pixel_unit if pixel_size is None else None) or "nm"
                numbers: dict[str, Any] = {}
                rows: list[dict[str, Any]] | None = None
                summary: dict[str, Any] | None = None
                if format != "png":  # morphology of a large mask needs memory too: inside the budget
                    numbers = await asyncio.to_thread(measure, mask, seg.classes, size, unit)
                    if particles and instances is not None:
                        rows, summary = await asyncio.to_thread(
                            particle_report, instances, mask, seg.classes, size, unit, name
                        )
        finally:
            if self.settings.malloc_trim and pixels >= LARGE_FRAME and self.pixels.in_use == 0:
                await asyncio.to_thread(trim_memory)  # give the frame's buffers back (docs/service.md)
        tag = slot.stored.tag  # type: ignore[union-attr]
        metrics.IMAGES.labels(endpoint="segment").inc()
        headers = {"X-Nanomorph-Model": tag}
        if format == "png":
            return Response(content=png, media_type="image/png", headers=headers)
        body = SegmentResponse(
            model=tag,
            filename=name,
            shape=[int(mask.shape[0]), int(mask.shape[1])],
            mask_png=base64.b64encode(png).decode("ascii"),
            legend=[LegendEntry(index=i, name=c) for i, c in enumerate(seg.classes)],
            pixel_size=size,
            pixel_unit=unit if size is not None else None,
            morphology=numbers,
            particles=rows,
            particle_summary=summary,
        )
        return JSONResponse(body.model_dump(mode="json"), headers=headers)

    @app.post(
        "/similar",
        response_model=SimilarResponse,
        responses=ERRORS,
        summary="The archive images most similar to one image",
        tags=["search"],
    )
    async def similar(
        self,
        image: UploadFile = File(description="one image file"),
        k: int = Query(default=10, ge=1, le=1000, description="how many neighbours"),
    ) -> SimilarResponse:
        """The k nearest images of the index configured with NANOMORPH_INDEX (built by `nanomorph index
        build` with the served embed model), by cosine distance of the embeddings (exact search)."""
        slot = self._slot("embed")
        index = self.index
        if index is None:
            raise GuardError(503, "index_unavailable", self.index_error)
        tag = slot.stored.tag  # type: ignore[union-attr]
        try:
            index.check_model(tag)
        except ValueError as exc:
            raise GuardError(503, "index_unavailable", str(exc)) from exc
        ((name, meta, arr),) = await self._decode([image], slot.helper.preprocess)
        (vector,) = await slot.batcher.submit(arr[None])  # type: ignore[union-attr]
        hits = await asyncio.to_thread(index.query, np.asarray(vector, dtype=np.float32), k)
        metrics.IMAGES.labels(endpoint="similar").inc()
        return SimilarResponse(
            model=tag,
            filename=name,
            shape=list(meta.shape[:2]),
            index_size=len(index),
            results=[SimilarItem(**h) for h in hits],
        )

    @app.get("/models", response_model=ModelsResponse, responses={401: ERRORS[401]}, tags=["models"])
    def models(self) -> ModelsResponse:
        """Served models: tags, tasks, classes, input contract, providers, sha256, metrics."""
        s = self.settings
        return ModelsResponse(
            ready=self._ready.is_set(),
            models=[slot.info() for slot in self.slots.values()],
            max_batch_size=s.max_batch_size,
            max_latency_ms=s.max_latency_ms,
            batch_wait_ms=s.batch_wait_ms,
            limits={
                "max_upload_bytes": s.max_upload_bytes,
                "max_request_bytes": s.max_request_bytes,
                "max_files": s.max_files,
                "max_pixels": s.max_pixels,
                "pixel_budget": s.pixel_budget,
                "pixel_queue": s.pixel_queue,
            },
        )

    @bentoml.on_shutdown
    def _shutdown(self) -> None:
        self._stop.set()
        for slot in self.slots.values():
            if slot.batcher is not None:
                slot.batcher.close()


# Auth, request size and media type are checked before any route (health and metrics included).
Nanomorph.add_asgi_middleware(  # type: ignore[attr-defined]
    GuardMiddleware, settings=SETTINGS, on_reject=metrics.record_rejection
)
# The web page, /docs, /docs.json (with version and bearer scheme) and POST /preview.
install_web_page(app, SETTINGS, lambda: Nanomorph.openapi_spec.asdict())  # type: ignore[attr-defined]
if recycling_enabled(SETTINGS):  # NANOMORPH_RECYCLE_REQUESTS / _RSS_MB (service/lifecycle.py)
    Nanomorph.add_asgi_middleware(RecycleMiddleware, settings=SETTINGS)  # type: ignore[attr-defined]
