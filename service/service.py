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
* Models load in a background thread (:mod:`service.loading`: sha256 verified by
  :func:`nanomorph.store.resolve`), are warmed up, and only then does ``/readyz`` answer 200. A task
  whose model is missing answers 503 ``model_unavailable`` while the other endpoints work.
* Request and response models are in :mod:`service.schemas`, the error handlers in
  :mod:`service.errors`, the settings in :mod:`service.settings`; this module holds the endpoints.
* ``POST /similar`` searches the index folder named by ``NANOMORPH_INDEX`` (built by ``nanomorph
  index build`` with the served embed model; :class:`nanomorph.archive.index.SimilarityIndex`); without
  one, or with an index of another model, it answers 503 ``index_unavailable``.

Never imports torch or ``training``.
"""

from __future__ import annotations

import asyncio
import base64
import math
import time
from typing import TYPE_CHECKING, Any, Literal

import bentoml
import numpy as np
from fastapi import FastAPI, File, Form, Query, UploadFile
from fastapi.responses import JSONResponse, Response

from nanomorph.contract import ImageMeta
from nanomorph.contract.frames import nm_per_px
from nanomorph.tasks import TASKS
from service import errors, metrics
from service.guard import GuardError, GuardMiddleware, decode_uploads, frame_pixels, read_upload
from service.largeframes import PixelBudget, fix_mmap_threshold, frame_numbers, segment_frame, trim_memory
from service.lifecycle import RecycleMiddleware, recycling_enabled
from service.schemas import (
    ERRORS,
    ClassifyResponse,
    ClassifyResult,
    EmbedResponse,
    EmbedResult,
    LegendEntry,
    ModelsResponse,
    SegmentResponse,
    SimilarItem,
    SimilarResponse,
    TileResult,
)
from service.settings import Settings
from service.webui import install as install_web_page

if TYPE_CHECKING:
    from nanomorph.runtime import Classifier, Segmenter
    from service.loading import ModelSlot

SETTINGS = Settings.from_env()
#: Frames at least this large (pixels) hand freed memory back to the system when they finish.
LARGE_FRAME = 2048 * 2048
#: Routes left out of BentoML's OpenTelemetry middleware (regular expressions searched in the URL).
UNTRACED = ("/classify", "/embed", "/segment", "/similar")

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
errors.install(app, SETTINGS)


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
    # One log line per request, written on the event loop: a few % of a worker's CPU per /classify
    # with a tiny model. On by default (operators read it); NANOMORPH_ACCESS_LOG=0 turns it off.
    logging={"access": {"enabled": SETTINGS.access_log}},
)
@bentoml.asgi_app(app, path="/")
class Nanomorph:
    """nanomorph: classify, embed and segment TEM images (see docs/service.md)."""

    def __init__(self, settings: Settings | None = None) -> None:
        # Heavy imports here, as BentoML's examples do (runtime, store, index): a worker
        # pays for them, `bentoml build` and the module import do not.
        from service.loading import Models

        self.settings = settings or SETTINGS
        # Large frames' buffers in their own mappings, returned when freed (service.largeframes).
        fix_mmap_threshold(self.settings.mmap_threshold_bytes)
        # Each task's batcher calls the batch API named after it: classify_batch, embed_batch, ...
        self.registry = Models(self.settings, {t: getattr(self, f"{t}_batch") for t in TASKS})
        self.slots = self.registry.slots
        self._ready = self.registry.ready
        # /segment pixels in flight (service.largeframes): bounds the memory of large frames.
        self.pixels = PixelBudget(self.settings.pixel_budget, self.settings.pixel_queue)
        self.registry.start()

    def __is_ready__(self) -> bool:
        return self._ready.is_set()

    def _slot(self, task: str) -> ModelSlot:
        return self.registry.slot(task)

    # ---------------------------------------------------------------- internal batch APIs
    # One array argument each (batch axis first), so that concurrent requests can share a call.

    def _observe(self, task: str, n: int, seconds: float) -> None:
        tag = self.slots[task].stored.tag  # type: ignore[union-attr]
        metrics.INFERENCE_SECONDS.labels(task=task, model=tag).observe(seconds)
        metrics.BATCH_IMAGES.labels(task=task, model=tag).observe(n)

    def _helper(self, task: str, narrow: bool) -> Any:
        """The task's helper; ``narrow``: the one on the session of half the cores (adaptive calls)."""
        slot = self.slots[task]
        return slot.narrow_helper if narrow else slot.helper

    def classify_batch(self, images: np.ndarray, narrow: bool = False) -> list[dict[str, Any]]:
        """Preprocessed images (N, 1, S, S) -> N classification dicts (see ``Classifier.predict``)."""
        t0 = time.perf_counter()
        out: list[dict[str, Any]] = self._helper("classify", narrow).predict_batch(images)
        self._observe("classify", len(images), time.perf_counter() - t0)
        return out

    def embed_batch(self, images: np.ndarray, narrow: bool = False) -> np.ndarray:
        """Preprocessed images (N, 1, S, S) -> embeddings (N, D)."""
        t0 = time.perf_counter()
        out: np.ndarray = self._helper("embed", narrow).embed_batch(images)
        self._observe("embed", len(images), time.perf_counter() - t0)
        return out

    def segment_batch(self, tiles: np.ndarray, narrow: bool = False) -> np.ndarray:
        """Normalised tiles (N, 1, T, T) -> class probabilities (N, C, T, T)."""
        t0 = time.perf_counter()
        out: np.ndarray = self._helper("segment", narrow).model.run(tiles)["probabilities"]
        self._observe("segment", len(tiles), time.perf_counter() - t0)
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

        decoded = await decode_uploads(images, prepare, self.settings, with_meta=True)
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
        decoded = await decode_uploads(images, slot.helper.preprocess, self.settings)
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
        data, name = await read_upload(image, self.settings)
        pixels = await asyncio.to_thread(frame_pixels, data, name, self.settings)
        budget = self.pixels.budget
        if pixels > budget:
            raise GuardError(
                413,
                "over_budget",
                f"{name}: {pixels} pixels is over the compute budget of {budget} pixels per request "
                "(NANOMORPH_PIXEL_BUDGET)",
            )
        seg: Segmenter = slot.helper
        numbers: dict[str, Any] = {}
        rows: list[dict[str, Any]] | None = None
        summary: dict[str, Any] | None = None
        try:
            async with self.pixels.hold(pixels):  # waits in line; 503 busy when the line is full
                submit = slot.batcher.submit  # type: ignore[union-attr]
                meta, mask, instances, png = await segment_frame(
                    seg, submit, data, name, self.settings, particles
                )
                size = pixel_size if pixel_size is not None else meta.pixel_size
                unit = pixel_unit or (meta.pixel_unit if pixel_size is None else None) or "nm"
                if format != "png":
                    wanted = instances if particles else None
                    numbers, rows, summary = await frame_numbers(seg, mask, wanted, size, unit, name)
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
        index = self.registry.index
        if index is None:
            raise GuardError(503, "index_unavailable", self.registry.index_error)
        tag = slot.stored.tag  # type: ignore[union-attr]
        try:
            index.check_model(tag)
        except ValueError as exc:
            raise GuardError(503, "index_unavailable", str(exc)) from exc
        ((name, meta, arr),) = await decode_uploads([image], slot.helper.preprocess, self.settings)
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
        self.registry.close()


# Auth, request size and media type are checked before any route (health and metrics included).
Nanomorph.add_asgi_middleware(  # type: ignore[attr-defined]
    GuardMiddleware, settings=SETTINGS, on_reject=metrics.record_rejection
)
# The web page, /docs, /docs.json (with version and bearer scheme) and POST /preview.
install_web_page(app, SETTINGS, lambda: Nanomorph.openapi_spec.asdict())  # type: ignore[attr-defined]
if recycling_enabled(SETTINGS):  # NANOMORPH_RECYCLE_REQUESTS / _RSS_MB (service/lifecycle.py)
    Nanomorph.add_asgi_middleware(RecycleMiddleware, settings=SETTINGS)  # type: ignore[attr-defined]
