"""Every endpoint of a real server, called with raw multipart HTTP as curl would."""

from __future__ import annotations

import base64
import io
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from nanomorph.contract import Contract, normalise, to_model_input
from nanomorph.morphology import png_bytes_to_mask
from tests.fixtures.images import png_bytes, speck_image
from tests.fixtures.server import Server
from tests.fixtures.tiny_models import expected_class

CONTRACT = Contract(image_size=32, tile_size=64, tile_overlap=16)  # build_tiny_store's contract
CLASSES = ["singular", "dispersed", "bundle", "network"]


def metric_values(text: str, name: str) -> dict[str, float]:
    """``{label string: value}`` of one metric in Prometheus text format."""
    out = {}
    for line in text.splitlines():
        m = re.match(rf"^{name}(\{{[^}}]*\}})?\s+(\S+)$", line)
        if m:
            out[m.group(1) or ""] = float(m.group(2))
    return out


def test_health_and_openapi(server: Server) -> None:
    for path in ("/healthz", "/livez", "/readyz"):
        assert httpx.get(server.url + path).status_code == 200
    doc = httpx.get(server.url + "/docs.json").json()
    for path in ("/classify", "/embed", "/segment", "/models"):
        assert path in doc["paths"], path
    schemas = doc["components"]["schemas"]
    for model in (
        "ClassifyResponse",
        "ClassifyResult",
        "EmbedResponse",
        "SegmentResponse",
        "ModelsResponse",
        "ErrorResponse",
    ):
        assert model in schemas, model
    classify = doc["paths"]["/classify"]["post"]
    assert "multipart/form-data" in classify["requestBody"]["content"]
    assert {"200", "400", "413", "415", "422", "503"} <= set(classify["responses"])
    assert set(schemas["ClassifyResult"]["properties"]) >= {
        "label",
        "confidence",
        "probabilities",
        "ood_score",
        "ood_flag",
        "model",
    }


def test_classify_several_images(server: Server, tiny_store: tuple[Path, dict[str, str]]) -> None:
    dark, bright = speck_image(bright=False), speck_image(bright=True, seed=1)
    files = [
        ("images", ("dark.png", png_bytes(dark), "image/png")),
        ("images", ("bright.png", png_bytes(bright), "image/png")),
    ]
    r = httpx.post(server.url + "/classify", files=files, timeout=30)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == tiny_store[1]["classify"] == "nanomorph-classify:1"
    assert [x["filename"] for x in body["results"]] == ["dark.png", "bright.png"]
    for res, img in zip(body["results"], (dark, bright), strict=True):
        want = CLASSES[expected_class(float(to_model_input(img, CONTRACT).mean()), len(CLASSES))]
        assert res["label"] == want
        assert res["shape"] == list(img.shape)
        assert set(res["probabilities"]) == set(CLASSES)
        assert sum(res["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
        assert res["confidence"] == pytest.approx(max(res["probabilities"].values()))
        assert res["confidence"] == res["probabilities"][res["label"]]
        assert isinstance(res["ood_score"], float) and 0.0 <= res["ood_score"] <= 2.0
        assert res["ood_flag"] == (res["ood_score"] > 0.02)
        assert res["model"] == body["model"]
    assert body["results"][0]["label"] == "singular" and body["results"][1]["label"] == "network"


def test_embed(server: Server) -> None:
    img = speck_image(bright=False, seed=3)
    r = httpx.post(
        server.url + "/embed", files={"images": ("x.png", png_bytes(img), "application/octet-stream")}
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "nanomorph-embed:1" and body["dim"] == 4
    vec = np.array(body["results"][0]["embedding"])
    assert np.linalg.norm(vec) == pytest.approx(1.0, abs=1e-5)
    x = to_model_input(img, CONTRACT)
    f = np.array([x.mean(), 1 - x.mean(), x.max(), x.min()])
    np.testing.assert_allclose(vec, f / np.linalg.norm(f), atol=1e-4)


@pytest.mark.parametrize("shape", [(48, 56), (150, 131)])
def test_segment_json_and_png(server: Server, shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(5)
    img = (rng.random(shape) * 255).astype(np.uint8)
    data = png_bytes(img)
    r = httpx.post(
        server.url + "/segment",
        files={"image": ("s.png", data)},
        data={"pixel_size": "2.5", "pixel_unit": "nm"},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "nanomorph-segment:1" and body["shape"] == list(shape)
    assert body["legend"] == [{"index": 0, "name": "background"}, {"index": 1, "name": "wire"}]
    assert body["pixel_size"] == 2.5 and body["pixel_unit"] == "nm"
    mask = png_bytes_to_mask(base64.b64decode(body["mask_png"]))
    assert mask.shape == shape
    # The tiny segmenter labels pixels brighter than 0.5 after normalisation as "wire".
    want = normalise(img.astype(np.float32), CONTRACT) > 0.5
    assert np.mean(mask.astype(bool) == want) > 0.99
    wire = (
        body["morphology"]["classes"]["wire"]
        if "classes" in body["morphology"]
        else body["morphology"]["wire"]
    )
    assert wire["area_fraction"] == pytest.approx(float(np.mean(mask == 1)), abs=1e-6)
    # ?format=png returns the same mask as a bare PNG.
    r2 = httpx.post(server.url + "/segment?format=png", files={"image": ("s.png", data)})
    assert r2.status_code == 200 and r2.headers["content-type"] == "image/png"
    assert r2.headers["x-nanomorph-model"] == "nanomorph-segment:1"
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(r2.content))), mask)


def test_models(server: Server) -> None:
    body = httpx.get(server.url + "/models").json()
    assert body["ready"] is True
    by_task = {m["task"]: m for m in body["models"]}
    assert set(by_task) == {"classify", "embed", "segment"}
    for task, m in by_task.items():
        assert m["available"] and m["error"] is None
        assert m["tag"] == f"nanomorph-{task}:1"
        assert m["providers"] == ["CPUExecutionProvider"]
        assert re.fullmatch(r"[0-9a-f]{64}", m["sha256"])
        assert m["contract"]["image_size"] == 32 and m["contract"]["tile_size"] == 64
    assert by_task["classify"]["classes"] == CLASSES and by_task["classify"]["ood_threshold"] == 0.02
    assert by_task["classify"]["metrics"]["accuracy"] == 1.0
    assert body["limits"]["max_upload_bytes"] == int(0.25 * (1 << 20))


def test_concurrent_requests_are_batched(server: Server) -> None:
    """32 concurrent one-image requests take fewer onnxruntime calls than requests (from /metrics)."""

    def counts() -> tuple[float, float]:
        text = httpx.get(server.url + "/metrics").text
        calls = sum(
            v for k, v in metric_values(text, "nanomorph_batch_images_count").items() if 'task="embed"' in k
        )
        images = sum(
            v for k, v in metric_values(text, "nanomorph_batch_images_sum").items() if 'task="embed"' in k
        )
        return calls, images

    data = png_bytes(speck_image(bright=True, seed=7))
    calls0, images0 = counts()
    n = 32
    with httpx.Client(timeout=60) as client, ThreadPoolExecutor(n) as pool:
        responses = list(
            pool.map(
                lambda i: client.post(server.url + "/embed", files={"images": (f"{i}.png", data)}), range(n)
            )
        )
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200]
    calls1, images1 = counts()
    assert images1 - images0 == n
    assert calls1 - calls0 < n, "no onnxruntime call had more than one image"
    text = httpx.get(server.url + "/metrics").text
    assert metric_values(text, "nanomorph_images_total")['{endpoint="embed"}'] >= n
    assert any('providers="CPUExecutionProvider"' in k for k in metric_values(text, "nanomorph_model_info"))
    assert metric_values(text, "nanomorph_predictions_total"), "no per-class prediction counter"
