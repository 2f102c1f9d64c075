"""The web page, /docs, /docs.json and POST /preview over HTTP (the browser test is test_web_browser.py)."""

from __future__ import annotations

import io
import re
from html.parser import HTMLParser
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

import nanomorph
from nanomorph.contract import Contract, normalise
from nanomorph.morphology import PALETTE
from service.settings import Settings
from service.webui import BEARER, WEB_DIR, document, preview_png
from tests.fixtures.emfiles import dm_bytes
from tests.fixtures.images import png_bytes, speck_image
from tests.fixtures.server import Server

#: Generous timeout: under load the 2-core test machine can take seconds to answer.
HTTP = httpx.Client(timeout=60)


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if name in ("src", "href") and value:
                self.links.append(value)


def _links(html: str) -> list[str]:
    parser = _Links()
    parser.feed(html)
    return parser.links


@pytest.mark.parametrize("page", ["/", "/docs"])
def test_pages_load_only_files_of_this_server(server: Server, page: str) -> None:
    r = HTTP.get(server.url + page)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "googletagmanager" not in r.text
    links = _links(r.text)
    assert links
    for link in links:
        assert not re.match(r"^(https?:)?//", link), link  # nothing from a CDN or a tracker
        if link.startswith("data:"):
            continue
        got = HTTP.get(f"{server.url}/{link.removeprefix('./').lstrip('/')}")
        assert got.status_code == 200, link


def test_page_scripts_fetch_nothing_from_elsewhere() -> None:
    for path in WEB_DIR.iterdir():
        text = path.read_text(encoding="utf-8")
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", text, re.I), path.name


def test_page_config_has_the_overlay_palette(server: Server) -> None:
    config = HTTP.get(server.url + "/ui/config.json").json()
    assert config == {
        "version": nanomorph.__version__,
        "auth": False,
        "palette": PALETTE.tolist(),
        "max_upload_bytes": config["max_upload_bytes"],
    }
    assert config["max_upload_bytes"] == int(0.25 * 2**20)  # the test server's limit


def test_openapi_has_package_version_and_bearer_scheme(server: Server) -> None:
    doc = HTTP.get(server.url + "/docs.json").json()
    assert doc["info"]["version"] == nanomorph.__version__ != "None"
    assert "shields.io" not in doc["info"]["description"]  # BentoML's README badges are gone
    assert doc["components"]["securitySchemes"][BEARER]["type"] == "http"
    assert doc["components"]["securitySchemes"][BEARER]["scheme"] == "bearer"
    # Auth is off on this server: no operation requires the token.
    assert all("security" not in op for item in doc["paths"].values() for op in item.values())
    assert "/preview" in doc["paths"] and "/" not in doc["paths"] and "/docs" not in doc["paths"]
    # BentoML's own schemas are still there (the merge kept them).
    assert {"ClassifyResponse", "SegmentResponse", "ErrorResponse"} <= set(doc["components"]["schemas"])


def test_document_requires_the_token_where_the_guard_does() -> None:
    spec: dict[str, Any] = {
        "info": {"title": "x", "version": "None"},
        "components": {"schemas": {"A": {}}},
        "paths": {
            "/classify": {"post": {"responses": {}}},
            "/healthz": {"get": {"responses": {}}},
            "/metrics": {"get": {"responses": {}}},
        },
    }
    on = document(spec, Settings(api_tokens=("t",), protect_metrics=True))
    assert on["paths"]["/classify"]["post"]["security"] == [{BEARER: []}]
    assert on["paths"]["/metrics"]["get"]["security"] == [{BEARER: []}]
    assert "security" not in on["paths"]["/healthz"]["get"]
    assert on["components"]["schemas"] == {"A": {}} and BEARER in on["components"]["securitySchemes"]
    off = document(spec, Settings())
    assert all("security" not in op for item in off["paths"].values() for op in item.values())
    assert spec["info"]["version"] == "None" and "security" not in spec["paths"]["/classify"]["post"]


def test_preview_of_a_dm4_keeps_shape_and_calibration(server: Server) -> None:
    rng = np.random.default_rng(0)
    frame = (rng.random((40, 56)) * 4000).astype(np.float32)
    r = HTTP.post(server.url + "/preview", files={"image": ("f.dm4", dm_bytes(frame, scale=0.25, unit="nm"))})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.headers["x-nanomorph-shape"] == "40x56"
    assert float(r.headers["x-nanomorph-pixel-size"]) == pytest.approx(0.25)
    assert r.headers["x-nanomorph-pixel-unit"] == "nm"
    png = np.asarray(Image.open(io.BytesIO(r.content)))
    assert png.shape == (40, 56) and png.dtype == np.uint8
    expected = np.round(normalise(frame, Contract()) * 255).astype(np.uint8)
    assert np.abs(png.astype(int) - expected).max() <= 1


def test_preview_of_a_png_is_uncalibrated(server: Server) -> None:
    r = HTTP.post(server.url + "/preview", files={"image": ("a.png", png_bytes(speck_image(False)))})
    assert r.status_code == 200 and "x-nanomorph-pixel-size" not in r.headers
    assert r.headers["x-nanomorph-shape"] == "48x56"


@pytest.mark.parametrize(
    ("data", "status", "reason"),
    [(b"", 400, "empty"), (b"just some text, not an image", 415, "unsupported_format")],
)
def test_preview_refuses_bad_uploads_like_the_other_endpoints(
    server: Server, data: bytes, status: int, reason: str
) -> None:
    r = HTTP.post(server.url + "/preview", files={"image": ("bad.png", data)})
    assert r.status_code == status and r.json()["reason"] == reason
    assert "bad.png" in r.json()["error"]


def test_preview_without_multipart_is_415(server: Server) -> None:
    r = HTTP.post(server.url + "/preview", content=b"raw", headers={"content-type": "image/png"})
    assert r.status_code == 415 and r.json()["reason"] == "unsupported_media_type"


def test_preview_png_downscales_large_frames() -> None:
    image = np.linspace(0, 1, 3000 * 500, dtype=np.float32).reshape(3000, 500)
    png = Image.open(io.BytesIO(preview_png(image, max_side=1000)))
    assert png.size == (167, 1000) and png.mode == "L"
