"""Prometheus metrics of the service, beyond BentoML's own request metrics.

Made with ``prometheus_client`` (``bentoml.metrics`` is deprecated). BentoML runs its workers in
prometheus_client's multiprocess mode and its ``/metrics`` endpoint collects every metric created
here, so they appear next to ``bentoml_service_request_*``. Names and labels are listed in
docs/service.md ("Metrics").
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

# Images per onnxruntime call: powers of two up to well past any sensible max_batch_size.
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# Inference seconds: from sub-millisecond tiny models to multi-second large frames.
SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

INFERENCE_SECONDS = Histogram(
    "nanomorph_inference_seconds",
    "Seconds per onnxruntime call, by model",
    ["task", "model"],
    buckets=SECONDS_BUCKETS,
)
BATCH_IMAGES = Histogram(
    "nanomorph_batch_images",
    "Images (or segmentation tiles) per onnxruntime call, by model: > 1 means requests were batched",
    ["task", "model"],
    buckets=BATCH_BUCKETS,
)
IMAGES = Counter("nanomorph_images", "Images processed, by endpoint", ["endpoint"])
PREDICTIONS = Counter(
    "nanomorph_predictions", "Classifications, by model and predicted class", ["model", "label"]
)
OOD_FLAGS = Counter("nanomorph_ood_flags", "Images flagged out-of-distribution, by model", ["model"])
REJECTED = Counter(
    "nanomorph_rejected_inputs", "Refused requests or uploads, by endpoint and reason", ["endpoint", "reason"]
)
MODEL_INFO = Gauge(
    "nanomorph_model_info",
    "1 for every loaded model, labelled with its tag, sha256 and the onnxruntime providers in use",
    ["task", "tag", "sha256", "providers"],
    multiprocess_mode="livemax",
)


def record_rejection(endpoint: str, reason: str) -> None:
    """Counts a refused request; ``endpoint`` may be a path (``/classify`` -> ``classify``)."""
    REJECTED.labels(endpoint=endpoint.strip("/") or "/", reason=reason).inc()
