"""NanomorphClient against a real server (tiny models), a dead port and a stub answering 503."""

from __future__ import annotations

import ast
import io
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from nanomorph.client import NanomorphClient, NanomorphConnectionError, NanomorphError, encode_array
from tests.fixtures.server import Server, free_port

CLASSES = ("singular", "dispersed", "bundle", "network")


def speck(bright_background: bool, dtype: type = np.uint8, size: int = 48) -> np.ndarray:
    """Mostly dark with a bright speck (class ``singular``) or the reverse (class ``network``)."""
    top = 60000 if dtype == np.uint16 else 250
    img: np.ndarray = np.full((size, size + 8), top if bright_background else 10, dtype=dtype)
    img[10:14, 20:24] = 10 if bright_background else top
    return img


@pytest.fixture()
def client(default_server: Server) -> Iterator[NanomorphClient]:
    with NanomorphClient(default_server.url, timeout=30.0, retries=1, backoff=0.05) as c:
        yield c


def test_encode_array_is_lossless_in_memory() -> None:
    rng = np.random.default_rng(0)
    frame16 = rng.integers(0, 65535, (40, 30), dtype=np.uint16)
    data, name = encode_array(frame16)
    assert name.endswith(".tif")
    back = tifffile.imread(io.BytesIO(data))
    assert back.dtype == np.uint16 and np.array_equal(back, frame16)

    frame32 = rng.normal(size=(20, 25)).astype(np.float32)
    back32 = tifffile.imread(io.BytesIO(encode_array(frame32)[0]))
    assert back32.dtype == np.float32 and np.array_equal(back32, frame32)

    frame8 = rng.integers(0, 255, (16, 16), dtype=np.uint8)
    data8, name8 = encode_array(frame8)
    assert name8.endswith(".png") and np.array_equal(np.array(Image.open(io.BytesIO(data8))), frame8)

    with pytest.raises(ValueError, match="2-D"):
        encode_array(np.zeros((2, 3, 4, 5)))


def test_classify_paths_and_a_uint16_frame(client: NanomorphClient, tmp_path: Path) -> None:
    path = tmp_path / "dark.png"
    Image.fromarray(speck(False)).save(path)
    frame = speck(True, np.uint16)  # straight from a "camera": never written to disk
    results = client.classify([path, frame])
    assert [r["label"] for r in results] == ["singular", "network"]
    assert results[0]["filename"] == "dark.png"
    assert results[1]["filename"].endswith(".tif") and results[1]["shape"] == list(frame.shape)
    for r in results:
        assert set(r["probabilities"]) == set(CLASSES)
        assert abs(sum(r["probabilities"].values()) - 1.0) < 1e-4
        assert r["model"].startswith("nanomorph-classify:")
    assert list(tmp_path.iterdir()) == [path]


def test_segment_float_frame_with_pixel_size(client: NanomorphClient) -> None:
    frame = np.zeros((40, 70), dtype=np.float32)
    frame[:, 35:] = 1000.0  # right half bright: class 1 (wire) for the tiny segmenter
    out = client.segment(frame, pixel_size=0.5, pixel_unit="nm")
    mask = out["mask"]
    assert mask.shape == frame.shape
    assert (mask[:, :35] == 0).all() and (mask[:, 35:] == 1).all()
    assert out["pixel_size"] == 0.5 and out["pixel_unit"] == "nm"
    assert [e["name"] for e in out["legend"]] == ["background", "wire"]
    assert out["morphology"]["classes"]["wire"]["area_fraction"] == pytest.approx(0.5)


def test_embed_models_ready(client: NanomorphClient) -> None:
    assert client.ready()
    results = client.embed([speck(False), speck(True)])
    vectors = np.stack([r["embedding"] for r in results])
    assert vectors.dtype == np.float32 and vectors.shape == (2, 4)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    info = client.models()
    assert {m["task"] for m in info["models"]} == {"classify", "embed", "segment"}
    assert client.model_info("classify")["classes"] == list(CLASSES)


def test_4xx_carries_the_servers_message(client: NanomorphClient) -> None:
    with pytest.raises(NanomorphError) as err:
        client.classify([("broken.png", b"\x89PNG\r\n\x1a\n-truncated")])
    assert 400 <= (err.value.status or 0) < 500
    assert err.value.reason == "corrupt"
    assert "broken.png" in err.value.message
    assert not isinstance(err.value, NanomorphConnectionError)


def test_dead_port_fails_fast_with_a_clear_error() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    client = NanomorphClient(url, timeout=2.0, retries=2, backoff=0.05)
    assert client.ready() is False
    t0 = time.monotonic()
    with pytest.raises(NanomorphConnectionError) as err:
        client.classify([speck(False)])
    assert time.monotonic() - t0 < 5.0
    assert err.value.status is None and err.value.reason == "connection"
    assert url in str(err.value) and "3 attempts" in str(err.value)


def _send_json(handler: BaseHTTPRequestHandler, status: int, body: dict[str, object]) -> None:
    """A fake server's JSON answer."""
    data = json.dumps(body).encode()
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)


class _Flaky(BaseHTTPRequestHandler):
    """``GET /models`` answers 503 ``fail`` times, then 200."""

    fail = 2
    calls = 0

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        type(self).calls += 1
        body: dict[str, object]
        if type(self).calls <= type(self).fail:
            body, status = {"error": "models are still loading", "reason": "model_unavailable"}, 503
        else:
            body, status = {"ready": True, "models": []}, 200
        _send_json(self, status, body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def flaky() -> Iterator[tuple[str, type[_Flaky]]]:
    handler = type("Flaky", (_Flaky,), {"calls": 0, "fail": 2})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", handler
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_503_is_retried_then_reported(flaky: tuple[str, type[_Flaky]]) -> None:
    url, handler = flaky
    assert NanomorphClient(url, retries=3, backoff=0.01).models()["ready"] is True
    assert handler.calls == 3
    handler.calls, handler.fail = 0, 100
    with pytest.raises(NanomorphConnectionError) as err:
        NanomorphClient(url, retries=1, backoff=0.01).models()
    assert err.value.status == 503 and err.value.reason == "model_unavailable"
    assert "still loading" in str(err.value) and handler.calls == 2


def test_client_stays_light_and_old_python_friendly() -> None:
    """The acquisition PC may have an old Python and no torch/bentoml/scipy: check both."""
    source = Path(__file__).resolve().parents[2] / "nanomorph" / "client.py"
    ast.parse(source.read_text(), feature_version=(3, 8))  # no match statements, no 3.10-only syntax
    code = (
        "import sys, nanomorph.client as c; c.encode_array(__import__('numpy').zeros((4, 4), 'uint16')); "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'bentoml', 'onnxruntime', 'scipy', 'skimage'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_retry_after_is_a_floor_for_the_backoff() -> None:
    client = NanomorphClient("http://127.0.0.1:9", backoff=0.01)
    assert client.retry_delay(0, "2") == 2.0  # the server's Retry-After wins over a short backoff
    assert client.retry_delay(0, "600") == 30.0  # capped
    assert 0.01 <= client.retry_delay(0, "soon") <= 0.011  # unparsable: plain backoff
    assert 0.08 <= client.retry_delay(3, "0") <= 0.088  # a longer backoff wins over Retry-After


class _Dropping(BaseHTTPRequestHandler):
    """``POST /classify`` drops the connection without an answer ``drop`` times (a killed worker)."""

    drop = 1
    calls = 0

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        self.rfile.read(int(self.headers["Content-Length"]))
        type(self).calls += 1
        if type(self).calls <= type(self).drop:
            self.close_connection = True
            return  # no response at all: the client sees the connection close
        _send_json(self, 200, {"model": "m", "results": [{"filename": "a.png", "label": "x"}]})

    def log_message(self, *args: object) -> None:
        pass


def test_a_request_cut_off_by_a_dying_worker_is_sent_again() -> None:
    handler = type("Dropping", (_Dropping,), {"calls": 0, "drop": 2})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}"
        with NanomorphClient(url, retries=3, backoff=0.01) as client:
            assert client.classify([("a.png", b"png bytes")])[0]["label"] == "x"
        assert handler.calls == 3
    finally:
        httpd.shutdown()
        httpd.server_close()
