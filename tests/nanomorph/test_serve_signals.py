"""A real ``nanomorph serve`` stopped with SIGTERM while a request is in flight.

``NANOMORPH_BATCH_WAIT_MS`` holds a lone request in the batcher for a few seconds, so that a
request is certainly in flight (``bentoml_service_request_in_progress`` says so) when the signal
arrives. The request must still complete with 200, ``nanomorph serve`` must exit 0, and afterwards
no process of the server may remain and its port must be free.
"""

from __future__ import annotations

import io
import os
import signal
import socket
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest
from PIL import Image

from tests.fixtures.server import Server, start_server


def speck_png() -> bytes:
    image = np.zeros((48, 48), np.uint8)
    image[20:28, 20:28] = 255
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def _tree(pid: int) -> list[int]:
    return [pid, *(c.pid for c in psutil.Process(pid).children(recursive=True))]


def _alive(pids: list[int]) -> list[int]:
    out = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
        except psutil.NoSuchProcess:
            pass
    return out


def _in_progress(server: Server, endpoint: str) -> float:
    text = httpx.get(server.url + "/metrics", timeout=10).text
    for line in text.splitlines():
        if line.startswith("bentoml_service_request_in_progress{") and f'endpoint="{endpoint}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _port_free(port: int) -> bool:
    """True when a restarted server could listen on ``port`` again. SO_REUSEADDR, as uvicorn and
    BentoML set it: connections the stopped server closed may linger in TIME_WAIT, which does
    not stop a new server, while a process still listening does."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            s.listen()
        except OSError:
            return False
    return True


def _post_in_background(server: Server, box: dict[str, object]) -> threading.Thread:
    def go() -> None:
        try:
            box["response"] = httpx.post(
                server.url + "/classify", files=[("images", ("a.png", speck_png(), "image/png"))], timeout=120
            )
        except httpx.HTTPError as exc:
            box["error"] = exc

    thread = threading.Thread(target=go, daemon=True)
    thread.start()
    return thread


def _wait_in_flight(server: Server, thread: threading.Thread, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while _in_progress(server, "/classify") < 1:
        assert thread.is_alive(), "the request finished before it could be caught in flight"
        assert time.monotonic() < deadline, "the request never reached the server"
        time.sleep(0.05)


def test_sigterm_drains_the_request_in_flight_and_leaves_nothing_behind(
    tmp_path: Path, tiny_store: tuple[Path, dict[str, str]]
) -> None:
    env = {"NANOMORPH_BATCH_WAIT_MS": "4000", "NANOMORPH_SHUTDOWN_GRACE_S": "30"}
    server = start_server(tmp_path, store=tiny_store[0], env=env, timeout=300)  # `nanomorph serve`
    try:
        port = int(server.url.rsplit(":", 1)[1])
        tree = _tree(server.proc.pid)
        assert len(tree) >= 3, f"expected nanomorph serve -> bentoml serve -> worker, got {tree}"
        box: dict[str, object] = {}
        thread = _post_in_background(server, box)
        _wait_in_flight(server, thread)
        os.kill(server.proc.pid, signal.SIGTERM)  # only `nanomorph serve`, as systemd / docker stop do
        thread.join(timeout=120)
        assert "error" not in box, f"request in flight failed: {box.get('error')!r}\n{server.log()}"
        response = box["response"]
        assert isinstance(response, httpx.Response) and response.status_code == 200, server.log()
        assert len(response.json()["results"]) == 1
        assert server.proc.wait(timeout=120) == 0, server.log()
        deadline = time.monotonic() + 30
        while _alive(tree) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _alive(tree) == [], f"left behind: {_alive(tree)}\n{server.log()}"
        assert _port_free(port), f"port {port} still taken"
        assert "stopped (SIGTERM) with exit status 0" in server.log()
    finally:
        server.stop()


@pytest.mark.slow
def test_the_drain_is_bounded_by_the_grace(tmp_path: Path, tiny_store: tuple[Path, dict[str, str]]) -> None:
    """A request that would outlast the grace is cut off and the server still exits, leaving nothing."""
    env = {"NANOMORPH_BATCH_WAIT_MS": "60000", "NANOMORPH_SHUTDOWN_GRACE_S": "2"}
    server = start_server(tmp_path, store=tiny_store[0], env=env, timeout=300)
    try:
        tree = _tree(server.proc.pid)
        box: dict[str, object] = {}
        thread = _post_in_background(server, box)
        _wait_in_flight(server, thread)
        server.proc.send_signal(signal.SIGHUP)  # a hang-up stops the server like SIGTERM
        server.proc.wait(timeout=60)  # far less than the 60 s the request would have waited
        thread.join(timeout=60)
        response = box.get("response")
        assert "error" in box or (isinstance(response, httpx.Response) and response.status_code >= 500)
        deadline = time.monotonic() + 30
        while _alive(tree) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _alive(tree) == []
    finally:
        server.stop()
