"""Bad inputs get a 4xx JSON error naming the problem, and the server stays up and ready."""

from __future__ import annotations

import io
import struct
import zlib

import httpx
import numpy as np
import pytest
import tifffile

from tests.fixtures.images import png_bytes, speck_image
from tests.fixtures.server import Server


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width x height`` pixels, with no pixel data at all."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return (
            struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def nan_tiff() -> bytes:
    buf = io.BytesIO()
    tifffile.imwrite(buf, np.full((32, 32), np.nan, dtype=np.float32))
    return buf.getvalue()


GOOD = png_bytes(speck_image(bright=False))
NOISE = png_bytes((np.random.default_rng(0).random((700, 700)) * 255).astype(np.uint8))  # ~490 KB > 0.25 MiB

# name -> (endpoint, files, status, allowed reasons)
CASES = {
    "truncated_png": (
        "/classify",
        {"images": ("cut.png", GOOD[: len(GOOD) // 2])},
        400,
        {"corrupt", "undecodable"},
    ),
    "text_file": (
        "/classify",
        {"images": ("notes.txt", b"just some text, not an image\n" * 4)},
        415,
        {"unsupported_format"},
    ),
    "empty_file": ("/embed", {"images": ("empty.png", b"")}, 400, {"empty"}),
    "huge_header": (
        "/classify",
        {"images": ("huge.png", png_header_only(50000, 50000))},
        413,
        {"too_many_pixels", "too_large"},
    ),
    "nan_tiff": ("/classify", {"images": ("nan.tif", nan_tiff())}, 400, {"non_finite"}),
    "nan_tiff_segment": ("/segment", {"image": ("nan.tif", nan_tiff())}, 400, {"non_finite"}),
    "oversized_upload": ("/classify", {"images": ("noise.png", NOISE)}, 413, {"too_large"}),
    "missing_field": ("/classify", {"files": ("a.png", GOOD)}, 422, {"missing_field"}),
    "segment_missing_image": ("/segment", {"images": ("a.png", GOOD)}, 422, {"missing_field"}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_upload_is_4xx_json(server: Server, case: str) -> None:
    endpoint, files, status, reasons = CASES[case]
    r = httpx.post(server.url + endpoint, files=files, timeout=30)
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error", "reason"}
    assert body["reason"] in reasons, body
    filename = next(iter(files.values()))[0]
    if status != 422:
        assert filename in body["error"], body  # the message names the file


def test_wrong_content_type(server: Server) -> None:
    r = httpx.post(server.url + "/classify", json={"images": ["a.png"]})
    assert r.status_code == 415
    assert r.json()["reason"] == "unsupported_media_type"
    r = httpx.post(server.url + "/segment", content=GOOD, headers={"content-type": "image/png"})
    assert r.status_code == 415


def test_invalid_form_field(server: Server) -> None:
    r = httpx.post(server.url + "/segment", files={"image": ("a.png", GOOD)}, data={"pixel_size": "-1"})
    assert r.status_code == 422
    assert r.json()["reason"] == "invalid_field" and "pixel_size" in r.json()["error"]


def test_request_too_large_from_content_length(server: Server) -> None:
    # NANOMORPH_MAX_REQUEST_MB is 1 on the test server: refused before the body is read.
    body = b"x" * (1 << 20) + b"x" * 1024
    r = httpx.post(
        server.url + "/embed", content=body, headers={"content-type": "multipart/form-data; boundary=b"}
    )
    assert r.status_code == 413 and r.json()["reason"] == "request_too_large"


def test_one_bad_file_fails_the_request_and_names_it(server: Server) -> None:
    files = [("images", ("good.png", GOOD)), ("images", ("bad.png", b"\x89PNG broken"))]
    r = httpx.post(server.url + "/classify", files=files)
    assert r.status_code in (400, 415) and "bad.png" in r.json()["error"]


def test_server_still_ready_after_bad_inputs(server: Server) -> None:
    for case in ("truncated_png", "huge_header", "nan_tiff", "text_file"):
        endpoint, files, _, _ = CASES[case]
        httpx.post(server.url + endpoint, files=files, timeout=30)
    assert httpx.get(server.url + "/readyz").status_code == 200
    r = httpx.post(server.url + "/classify", files={"images": ("ok.png", GOOD)})
    assert r.status_code == 200 and r.json()["results"][0]["label"] == "singular"
    metrics = httpx.get(server.url + "/metrics").text
    assert 'nanomorph_rejected_inputs_total{endpoint="classify",reason="too_many_pixels"}' in metrics


@pytest.mark.parametrize("boundary", ["", "; boundary=wrong"])
def test_malformed_multipart_is_a_json_400(server: Server, boundary: str) -> None:
    # A body that does not match its declared multipart boundary (or declares none) must be refused
    # in the service's own error format, not FastAPI's {"detail": ...}.
    body = b'--real\r\nContent-Disposition: form-data; name="images"; filename="a.png"\r\n\r\n'
    body += GOOD + b"\r\n--real--\r\n"
    r = httpx.post(
        server.url + "/classify", content=body, headers={"content-type": "multipart/form-data" + boundary}
    )
    assert 400 <= r.status_code < 500, r.text
    assert set(r.json()) == {"error", "reason"}, r.text
