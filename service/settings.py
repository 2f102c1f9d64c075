"""Service configuration, in one place: environment variables read once at start-up.

Every knob of the service is an environment variable (``bentoml serve`` passes the environment on
to its workers; a bentofile's ``envs`` section or a container's ``-e`` flags set them too). The
table in docs/service.md ("Configuration") lists them all with their defaults; :data:`ENV_VARS` is
that table in code, so the docs and the code can be checked against each other.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from nanomorph.tasks import TASKS  # the one task table; re-exported for the service modules

MIB = 1 << 20
#: Largest image the service decodes: 8192 x 8192. Segmenting one is planned at 16 bytes per pixel
#: (~1 GB) by the pixel budget (service.largeframes, docs/service.md "Large frames").
DEFAULT_MAX_PIXELS = 8192 * 8192
#: Largest uploaded file: the largest frame the pixel limit accepts as an uncompressed uint16 TIFF
#: (128 MiB, what direct-detector cameras write) plus 8 MiB for headers and metadata; a smaller cap
#: refused 8192 x 8192 frames that the documented limits accept.
DEFAULT_MAX_UPLOAD_MB = 136

# name -> (default shown in the docs, one-line description)
ENV_VARS: dict[str, tuple[str, str]] = {
    "NANOMORPH_STORE": ("bentoml", "model store: 'bentoml' (at $BENTOML_HOME) or a folder store"),
    "NANOMORPH_CLASSIFY_MODEL": ("nanomorph-classify:latest", "tag of the classify model"),
    "NANOMORPH_EMBED_MODEL": ("nanomorph-embed:latest", "tag of the embed model"),
    "NANOMORPH_SEGMENT_MODEL": ("nanomorph-segment:latest", "tag of the segment model"),
    "NANOMORPH_REQUIRE_MODELS": (
        "(none)",
        "tasks that must load before /readyz is ready (comma list or 'all'); missing ones are polled for",
    ),
    "NANOMORPH_MODEL_POLL_S": ("2", "seconds between store polls for required models"),
    "NANOMORPH_PROVIDERS": ("CUDA then CPU if available", "onnxruntime execution providers (comma list)"),
    "NANOMORPH_ORT_THREADS": (
        "0 (all cores; a call beside others: its share of them)",
        "onnxruntime intra-op threads per session",
    ),
    "NANOMORPH_CONCURRENT_CALLS": (
        "auto",
        "onnxruntime calls each model runs at once; auto: classify/embed on CPU run a lone request on all "
        "cores and share the cores between two calls under load, segment and CUDA one call",
    ),
    "NANOMORPH_PRECISION": (
        "auto",
        "auto: a model's int8 file (where export kept one) on CPU, fp32 on CUDA; fp32: always fp32",
    ),
    "NANOMORPH_WARMUP": ("1", "run every model once on a dummy batch before reporting ready"),
    "NANOMORPH_MAX_BATCH_SIZE": ("32", "most images (or tiles) per onnxruntime call"),
    "NANOMORPH_BATCH_WAIT_MS": ("0", "extra wait for a batch to fill when the model is idle (ms)"),
    "NANOMORPH_MAX_LATENCY_MS": (
        "60000",
        "a request whose first model call is queued longer than this gets 503 (load shedding)",
    ),
    "NANOMORPH_MAX_UPLOAD_MB": (
        str(DEFAULT_MAX_UPLOAD_MB),
        "largest single uploaded file (MiB); the default holds an uncompressed uint16 8192 x 8192 frame",
    ),
    "NANOMORPH_MAX_REQUEST_MB": ("256", "largest request body (MiB), checked from Content-Length"),
    "NANOMORPH_MAX_FILES": ("64", "most files per /classify or /embed request"),
    "NANOMORPH_MAX_PIXELS": ("67108864 (8192^2)", "largest image (height x width), read from the header"),
    "NANOMORPH_PIXEL_BUDGET": (
        "25% of memory / workers / 16 B, >= NANOMORPH_MAX_PIXELS",
        "/segment pixels in flight per worker; larger requests get 413 over_budget, others queue",
    ),
    "NANOMORPH_PIXEL_QUEUE": (
        "16",
        "requests that may wait for the pixel budget; beyond: 503 busy + Retry-After",
    ),
    "NANOMORPH_SEGMENT_TILE": (
        "from the model's contract",
        "largest segmentation inference tile (px, multiple of 32); default infer_tile_cpu/_cuda",
    ),
    "NANOMORPH_MALLOC_TRIM": (
        "1",
        "return freed memory to the system (glibc malloc_trim) after large requests",
    ),
    "NANOMORPH_MMAP_THRESHOLD_MB": (
        "1",
        "glibc mmap threshold fixed at worker start: larger buffers are returned to the system when freed (0: glibc's)",
    ),
    "NANOMORPH_API_TOKENS": ("(unset: no auth)", "comma-separated bearer tokens for inference and /models"),
    "NANOMORPH_PROTECT_METRICS": ("0", "1: /metrics needs a token too"),
    "NANOMORPH_WORKERS": ("1", "BentoML worker processes (each loads every model)"),
    "NANOMORPH_TIMEOUT_S": ("300", "BentoML request timeout (s)"),
    "NANOMORPH_INDEX": ("(unset: /similar off)", "similar-image index folder from `nanomorph index build`"),
    "NANOMORPH_SHUTDOWN_GRACE_S": (
        "30",
        "on a stop signal, seconds requests in flight get to finish (`nanomorph serve`)",
    ),
    "NANOMORPH_RECYCLE_REQUESTS": (
        "0 (never)",
        "a worker drains and restarts after about this many requests",
    ),
    "NANOMORPH_RECYCLE_RSS_MB": (
        "0 (never)",
        "a worker drains and restarts once its resident memory passes this (MiB)",
    ),
    "NANOMORPH_ACCESS_LOG": (
        "1",
        "0: no access-log line per request (saves ~0.2 ms of a worker's CPU per request)",
    ),
    "NANOMORPH_TRACE_REQUESTS": (
        "0",
        "1: BentoML's OpenTelemetry spans also for the inference routes (costly; see docs/service.md)",
    ),
    "NANOMORPH_RETRY_AFTER_S": ("2", "Retry-After (s) sent with every 503 (models loading, overloaded)"),
}


def _int(env: Mapping[str, str], name: str, default: int, minimum: int = 0) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(float(raw))
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a number") from None
    if value < minimum:
        raise ValueError(f"{name}={raw!r} must be >= {minimum}")
    return value


def _calls(env: Mapping[str, str]) -> int:
    """``NANOMORPH_CONCURRENT_CALLS``: ``auto`` (or unset) -> 0, else a count >= 1."""
    raw = env.get("NANOMORPH_CONCURRENT_CALLS", "").strip()
    if raw.lower() in ("", "auto"):
        return 0
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"NANOMORPH_CONCURRENT_CALLS={raw!r} must be 'auto' or a count >= 1")
    return int(raw)


def _float(env: Mapping[str, str], name: str, default: float, minimum: float = 0.0) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a number") from None
    if value < minimum:
        raise ValueError(f"{name}={raw!r} must be >= {minimum}")
    return value


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{name}={raw!r}: use 1/0, true/false, yes/no or on/off")


def _precision(env: Mapping[str, str]) -> str:
    from nanomorph.runtime import default_precision  # the one reading of NANOMORPH_PRECISION

    return default_precision(env)


def _list(env: Mapping[str, str], name: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in env.get(name, "").split(",") if p.strip())


def _default_budget(max_pixels: int, workers: int) -> int:
    from service.largeframes import default_pixel_budget

    return default_pixel_budget(max_pixels, workers)


def available_cores() -> int:
    """CPU cores this process may run on: its affinity mask (what a container's cpuset or
    ``taskset`` leaves it), else the machine's count."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


@dataclass(frozen=True)
class Settings:
    """The service's configuration (see :data:`ENV_VARS` and docs/service.md)."""

    store: str = "bentoml"
    models: dict[str, str] = field(default_factory=lambda: {t: f"nanomorph-{t}:latest" for t in TASKS})
    required: tuple[str, ...] = ()
    poll_s: float = 2.0
    providers: tuple[str, ...] = ()
    ort_threads: int = 0
    concurrent_calls: int = 0  # 0: auto (adaptive_calls)
    precision: str = "auto"
    warmup: bool = True
    max_batch_size: int = 32
    max_latency_ms: int = 60000
    batch_wait_ms: float = 0.0
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_MB * MIB
    max_request_bytes: int = 256 * MIB
    max_files: int = 64
    max_pixels: int = DEFAULT_MAX_PIXELS
    pixel_budget: int = DEFAULT_MAX_PIXELS
    pixel_queue: int = 16
    segment_tile: int = 0
    malloc_trim: bool = True
    mmap_threshold_bytes: int = MIB
    api_tokens: tuple[str, ...] = ()
    protect_metrics: bool = False
    workers: int = 1
    timeout_s: int = 300
    shutdown_grace_s: float = 30.0
    recycle_requests: int = 0
    recycle_rss_mb: float = 0.0
    retry_after_s: int = 2
    trace_requests: bool = False
    access_log: bool = True
    index: str = ""  # similar-image index folder; empty: /similar answers 503 index_unavailable

    @property
    def auth_enabled(self) -> bool:
        return bool(self.api_tokens)

    def adaptive_calls(self, task: str, providers: Sequence[str], cores: int | None = None) -> bool:
        """Whether ``task``'s batcher adapts to load (``NANOMORPH_CONCURRENT_CALLS=auto``): a lone
        request on a session with all the cores, two calls on half the cores each when more are
        waiting. On CPU with 2+ cores for classify and embed (measured faster from 4 clients up, as
        fast for one; docs/benchmarks.md); segment (large frames, an arena per session) and CUDA keep
        one call."""
        cores = available_cores() if cores is None else cores
        on_cpu = all(p == "CPUExecutionProvider" for p in providers)
        return self.concurrent_calls == 0 and task in ("classify", "embed") and on_cpu and cores >= 2

    def lanes(self, adaptive: bool) -> int:
        """Calls a model's batcher may run at once."""
        return 2 if adaptive else max(1, self.concurrent_calls)

    def session_threads(self, calls: int = 1, cores: int | None = None) -> int:
        """onnxruntime intra-op threads of a session whose calls run beside ``calls - 1`` others:
        ``NANOMORPH_ORT_THREADS`` if set; else the cores shared between them (calls with more
        threads than their share fight over the cores: measured slower than one call at a time);
        else 0, all."""
        if self.ort_threads or calls == 1:
            return self.ort_threads
        return max(1, (available_cores() if cores is None else cores) // calls)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Reads the settings from ``env`` (default ``os.environ``).

        Raises:
            ValueError: a variable has a bad value (the message names it).
        """
        env = os.environ if env is None else env
        models = {
            t: env.get(f"NANOMORPH_{t.upper()}_MODEL", "").strip() or f"nanomorph-{t}:latest" for t in TASKS
        }
        required = _list(env, "NANOMORPH_REQUIRE_MODELS")
        if any(r.lower() == "all" for r in required):
            required = TASKS
        unknown = [r for r in required if r not in TASKS]
        if unknown:
            raise ValueError(
                f"NANOMORPH_REQUIRE_MODELS names {', '.join(unknown)}; tasks are {', '.join(TASKS)}"
            )
        workers = _int(env, "NANOMORPH_WORKERS", 1, minimum=1)
        max_pixels = _int(env, "NANOMORPH_MAX_PIXELS", DEFAULT_MAX_PIXELS, minimum=1)
        segment_tile = _int(env, "NANOMORPH_SEGMENT_TILE", 0)
        if segment_tile % 32:
            raise ValueError(f"NANOMORPH_SEGMENT_TILE={segment_tile} must be a multiple of 32")
        return cls(
            store=env.get("NANOMORPH_STORE", "").strip() or "bentoml",
            models=models,
            required=tuple(required),
            poll_s=_float(env, "NANOMORPH_MODEL_POLL_S", 2.0, minimum=0.05),
            providers=_list(env, "NANOMORPH_PROVIDERS"),
            ort_threads=_int(env, "NANOMORPH_ORT_THREADS", 0),
            concurrent_calls=_calls(env),
            precision=_precision(env),
            warmup=_bool(env, "NANOMORPH_WARMUP", True),
            max_batch_size=_int(env, "NANOMORPH_MAX_BATCH_SIZE", 32, minimum=1),
            max_latency_ms=_int(env, "NANOMORPH_MAX_LATENCY_MS", 60000, minimum=1),
            batch_wait_ms=_float(env, "NANOMORPH_BATCH_WAIT_MS", 0.0),
            max_upload_bytes=int(
                _float(env, "NANOMORPH_MAX_UPLOAD_MB", float(DEFAULT_MAX_UPLOAD_MB), minimum=0.0) * MIB
            ),
            max_request_bytes=int(_float(env, "NANOMORPH_MAX_REQUEST_MB", 256.0, minimum=0.0) * MIB),
            max_files=_int(env, "NANOMORPH_MAX_FILES", 64, minimum=1),
            max_pixels=max_pixels,
            pixel_budget=_int(env, "NANOMORPH_PIXEL_BUDGET", 0) or _default_budget(max_pixels, workers),
            pixel_queue=_int(env, "NANOMORPH_PIXEL_QUEUE", 16),
            segment_tile=segment_tile,
            malloc_trim=_bool(env, "NANOMORPH_MALLOC_TRIM", True),
            mmap_threshold_bytes=int(_float(env, "NANOMORPH_MMAP_THRESHOLD_MB", 1.0, minimum=0.0) * MIB),
            api_tokens=_list(env, "NANOMORPH_API_TOKENS"),
            protect_metrics=_bool(env, "NANOMORPH_PROTECT_METRICS", False),
            workers=workers,
            timeout_s=_int(env, "NANOMORPH_TIMEOUT_S", 300, minimum=1),
            shutdown_grace_s=_float(env, "NANOMORPH_SHUTDOWN_GRACE_S", 30.0),
            recycle_requests=_int(env, "NANOMORPH_RECYCLE_REQUESTS", 0),
            recycle_rss_mb=_float(env, "NANOMORPH_RECYCLE_RSS_MB", 0.0),
            retry_after_s=_int(env, "NANOMORPH_RETRY_AFTER_S", 2, minimum=1),
            trace_requests=_bool(env, "NANOMORPH_TRACE_REQUESTS", False),
            access_log=_bool(env, "NANOMORPH_ACCESS_LOG", True),
            index=env.get("NANOMORPH_INDEX", "").strip(),
        )
