"""Model loading: every task's stored model into an onnxruntime session, its helper and batcher.

:class:`Models` loads in a background thread: each task's tag is resolved in the store (sha256
verified by :func:`nanomorph.store.resolve`), run once on a blank input (warm-up) and given a
:class:`~service.batching.Batcher` in front of the service's batch API of that task. A task whose
model is missing or broken keeps the reason (``/models``, 503 ``model_unavailable``) while the
others serve; required models (``NANOMORPH_REQUIRE_MODELS``) are polled for until they load. Then
the similar-image index (``NANOMORPH_INDEX``) is opened and the service reports ready. What differs
between tasks comes from the one table, :mod:`nanomorph.tasks`.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from nanomorph.archive.index import SimilarityIndex
from nanomorph.runtime import OnnxModel, task_helper
from nanomorph.store import StoredModel, resolve
from nanomorph.tasks import TASKS, get_task
from service import metrics
from service.batching import Batcher
from service.guard import GuardError
from service.schemas import ModelInfo
from service.settings import Settings

# BentoML configures the "bentoml" logger hierarchy in its workers; log under it so our lines
# (providers in use, models loaded, warm-up) reach the server log.
log = logging.getLogger("bentoml.nanomorph")

NO_INDEX = "no index configured: set NANOMORPH_INDEX to a folder made by `nanomorph index build`"


class BatchAPI(Protocol):
    """A service batch API: a batch (axis 0) -> one result per item; ``narrow``: run it on the
    task's session of half the cores (adaptive calls)."""

    def __call__(self, batch: np.ndarray, narrow: bool = False) -> Any: ...


@dataclass
class ModelSlot:
    """One task's model: loaded (with its task helper and batcher) or the reason it is not."""

    task: str
    tag: str
    stored: StoredModel | None = None
    onnx: OnnxModel | None = None
    helper: Any = None
    narrow_helper: Any = None  # the helper on a session of half the cores (adaptive calls), or None
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
            sha256=_served_sha256(stored, self.onnx) if stored and self.onnx else None,
            metrics=stored.metrics if stored else {},
            ood_threshold=float(ood["threshold"]) if "threshold" in ood else None,
            precision=self.onnx.precision if self.onnx else None,
            inference_tile=getattr(self.helper, "max_tile", None) if get_task(self.task).tiled else None,
        )


def _served_sha256(stored: StoredModel, onnx: OnnxModel) -> str:
    """The manifest's sha256 of the ONNX file the session runs (model.onnx or model.int8.onnx)."""
    return str((stored.manifest.get("files") or {}).get(onnx.file, ""))


def _warmup_input(stored: StoredModel, task: str) -> np.ndarray:
    """A dummy input for warm-up: one blank image of the model's input size."""
    side = get_task(task).input_side(stored.contract)
    return np.zeros((1, 1, side, side), dtype=np.float32)


class Models:
    """Every task's :class:`ModelSlot` and the similar-image index, loaded in a background thread.

    Args:
        settings: the service's settings (store, tags, providers, batching, warm-up, index).
        batch_apis: task -> the service's batch API that the task's batcher calls.
    """

    def __init__(self, settings: Settings, batch_apis: Mapping[str, BatchAPI]) -> None:
        self.settings = settings
        self.slots: dict[str, ModelSlot] = {t: ModelSlot(t, settings.models[t]) for t in TASKS}
        self.index: SimilarityIndex | None = None
        self.index_error = NO_INDEX
        self.ready = threading.Event()
        self.stop = threading.Event()
        self._batch_apis = batch_apis
        self._thread = threading.Thread(target=self.load_all, name="nanomorph-loader", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self.stop.set()
        for slot in self.slots.values():
            if slot.batcher is not None:
                slot.batcher.close()

    def any_loaded(self) -> bool:
        return any(s.available for s in self.slots.values())

    def slot(self, task: str) -> ModelSlot:
        """The loaded slot of ``task``; 503 ``model_unavailable`` while loading or when it is missing."""
        slot = self.slots[task]
        if not slot.available:
            if not self.ready.is_set():
                raise GuardError(
                    503, "model_unavailable", "models are still loading; retry when /readyz is ready"
                )
            raise GuardError(503, "model_unavailable", f"no {task} model is loaded: {slot.error}")
        return slot

    def load_one(self, slot: ModelSlot) -> None:
        """Loads, warms up and puts a batcher in front of ``slot``'s model (raises on failure)."""
        s = self.settings
        stored = resolve(slot.tag, s.store)  # verifies the sha256 of every file
        providers = list(s.providers) or None
        calls = s.lanes(adaptive=False)  # auto: one call on all the cores until we know the providers
        onnx = OnnxModel(stored, providers, threads=s.session_threads(calls), precision=s.precision)
        log.info(
            "%s: %s (%s) from %s on providers %s",
            slot.task,
            stored.tag,
            onnx.precision,
            stored.path,
            onnx.providers,
        )
        max_tile = s.segment_tile or None
        slot.stored, slot.onnx = stored, onnx
        slot.helper = task_helper(slot.task, onnx, max_tile=max_tile)
        adaptive = s.adaptive_calls(slot.task, onnx.providers)
        sessions = [onnx] + ([self._narrow_session(slot, providers)] if adaptive else [])
        slot.narrow_helper = task_helper(slot.task, sessions[1], max_tile=max_tile) if adaptive else None
        if s.warmup:
            t0 = time.perf_counter()
            for session in sessions:
                session.run(_warmup_input(stored, slot.task))
            log.info("%s: warm-up %.0f ms", slot.task, 1000 * (time.perf_counter() - t0))
        # Tiled calls hold at most max_batch_size training tiles' worth of pixels, however large
        # the inference tiles and however many frames are in flight.
        tiled = get_task(slot.task).tiled
        elements = s.max_batch_size * stored.contract.tile_size**2 if tiled else 0
        batch_api = self._batch_apis[slot.task]
        slot.batcher = Batcher(
            batch_api,
            s.max_batch_size,
            s.max_latency_ms,
            s.batch_wait_ms,
            name=f"nanomorph-{slot.task}",
            max_elements=elements,
            concurrent_calls=s.lanes(adaptive),
            narrow_fn=functools.partial(batch_api, narrow=True) if adaptive else None,
        )
        slot.error = None
        metrics.MODEL_INFO.labels(
            task=slot.task,
            tag=stored.tag,
            sha256=_served_sha256(stored, onnx),
            providers=",".join(onnx.providers),
        ).set(1)

    def _narrow_session(self, slot: ModelSlot, providers: list[str] | None) -> OnnxModel:
        """The second session of an adaptive slot: the same model on half the cores."""
        s = self.settings
        threads = s.session_threads(s.lanes(adaptive=True))
        log.info(
            "%s: a lone request runs on all cores, two calls on %d thread(s) each under load",
            slot.task,
            threads,
        )
        assert slot.stored is not None
        return OnnxModel(slot.stored, providers, threads=threads, precision=s.precision)

    def _try_load(self, slot: ModelSlot) -> None:
        """:meth:`load_one`, keeping the reason of a failure; logs a reason once, not every poll."""
        before = slot.error
        try:
            self.load_one(slot)
        except FileNotFoundError as exc:
            slot.error = str(exc)
            if slot.error != before:
                log.warning("%s: %s; /%s answers 503 until it is there", slot.task, exc, slot.task)
        except Exception as exc:  # integrity error, bad model: that endpoint stays off
            slot.error = f"{type(exc).__name__}: {exc}"
            if slot.error != before:
                log.error("%s: cannot load %s: %s", slot.task, slot.tag, slot.error)

    def _waiting(self) -> list[str]:
        """Tasks still to poll for: required ones, and every one while none at all has loaded."""
        required = self.settings.required
        return [t for t in TASKS if not self.slots[t].available and (t in required or not self.any_loaded())]

    def load_all(self) -> None:
        """Loads every task's model; keeps polling the store for required ones (and, while no
        model at all has loaded, for any), then opens the index and reports ready."""
        required = set(self.settings.required)
        tried: set[str] = set()
        last_note, last_time = "", 0.0
        while not self.stop.is_set():
            for task, slot in self.slots.items():
                if slot.available or (task in tried and task not in required and self.any_loaded()):
                    continue
                self._try_load(slot)
                tried.add(task)
            waiting = self._waiting()
            if not waiting:
                break
            note = f"waiting for models: {', '.join(waiting)} (store {self.settings.store})"
            if note != last_note or time.monotonic() - last_time > 30:
                log.info(note)
                last_note, last_time = note, time.monotonic()
            self.stop.wait(self.settings.poll_s)
        self.load_index()
        self.ready.set()
        log.info(
            "ready: %s",
            ", ".join(f"{t}={'ok' if s.available else 'unavailable'}" for t, s in self.slots.items()),
        )

    def load_index(self) -> None:
        """Opens the similar-image index of ``NANOMORPH_INDEX``, if set and built with the embed model."""
        path = self.settings.index
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
