"""The service's request and response schemas: the pydantic models of the OpenAPI document.

Every public endpoint (:mod:`service.service`) answers one of these models, and every refusal an
:class:`ErrorResponse` (:data:`ERRORS` lists the codes per route in the OpenAPI document; the
handlers that write them are in :mod:`service.errors`).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from nanomorph.tasks import TASKS


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
    task: Literal[TASKS]  # type: ignore[valid-type]  # the names of the one task table
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
    sha256: str | None = Field(
        default=None,
        description="sha256 of the ONNX file served (model.onnx, or model.int8.onnx when int8), verified at load",
    )
    metrics: dict[str, Any] = Field(default_factory=dict, description="evaluation metrics recorded at export")
    ood_threshold: float | None = Field(default=None, description="classify: the OOD flag threshold")
    precision: str | None = Field(
        default=None,
        description="weights served: int8 where export kept a quantised model and the session runs on CPU "
        "(NANOMORPH_PRECISION=auto), else fp32",
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
