"""A second real server: bearer tokens, /readyz while its BentoML store is still being filled, and
a missing model that turns off its endpoint only."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx

from tests.fixtures.images import png_bytes, speck_image
from tests.fixtures.server import REPO_ROOT, start_server

TOKENS = "s3cret-token,second-token"


def build_bentoml_models(home: Path) -> None:
    """Builds the tiny models into a BentoML store at ``home`` (a subprocess, so that
    ``BENTOML_HOME`` is read fresh)."""
    code = (
        "import sys; from pathlib import Path; from tests.fixtures.tiny_models import build_tiny_store; "
        "build_tiny_store(Path(sys.argv[1]), store='bentoml')"
    )
    env = {
        **os.environ,
        "BENTOML_HOME": str(home),
        "BENTOML_DO_NOT_TRACK": "True",
        "PYTHONPATH": str(REPO_ROOT),
    }
    subprocess.run([sys.executable, "-c", code, str(home / "scratch")], check=True, env=env, cwd=REPO_ROOT)


def test_tokens_readiness_and_missing_model(tmp_path: Path) -> None:
    staging = tmp_path / "staging_home"
    build_bentoml_models(staging)
    env = {
        "NANOMORPH_STORE": "bentoml",
        "NANOMORPH_API_TOKENS": TOKENS,
        "NANOMORPH_REQUIRE_MODELS": "classify,embed",
        "NANOMORPH_MODEL_POLL_S": "0.2",
    }
    server = start_server(tmp_path / "work", env=env, wait=False, via="bentoml")
    with server:
        server.wait_listening(90)
        # No model in its store yet: alive but not ready; inference says why.
        assert httpx.get(server.url + "/livez").status_code == 200
        assert httpx.get(server.url + "/healthz").status_code == 200
        r = httpx.get(server.url + "/readyz")
        assert r.status_code == 503
        auth = {"Authorization": "Bearer s3cret-token"}
        r = httpx.post(
            server.url + "/classify", files={"images": ("a.png", png_bytes(speck_image(False)))}, headers=auth
        )
        assert r.status_code == 503 and r.json()["reason"] == "model_unavailable"
        assert r.headers["retry-after"] == "2"  # NANOMORPH_RETRY_AFTER_S: clients come back later

        # Publish classify and embed (not segment) into the server's store, each folder renamed into place.
        models_dir = Path(server.env["BENTOML_HOME"]) / "models"
        models_dir.mkdir(parents=True, exist_ok=True)
        for name in ("nanomorph-classify", "nanomorph-embed"):
            shutil.copytree(staging / "models" / name, models_dir / f".{name}.tmp")
            os.rename(models_dir / f".{name}.tmp", models_dir / name)
        server.wait_ready(60)

        # --- access control
        good = png_bytes(speck_image(False))
        for headers in (
            {},
            {"Authorization": "Bearer wrong"},
            {"Authorization": "Basic czNjcmV0LXRva2Vu"},
            {"Authorization": "Bearer"},
        ):
            r = httpx.get(server.url + "/models", headers=headers)
            assert r.status_code == 401, headers
            assert r.json()["reason"] == "unauthorized" and r.headers["www-authenticate"].startswith("Bearer")
            r = httpx.post(server.url + "/classify", files={"images": ("a.png", good)}, headers=headers)
            assert r.status_code == 401
        for token in TOKENS.split(","):
            r = httpx.post(
                server.url + "/classify",
                files={"images": ("a.png", good)},
                headers={"Authorization": f"Bearer {token}"},
            )
            assert r.status_code == 200 and r.json()["results"][0]["label"] == "singular"
        # Health, metrics (NANOMORPH_PROTECT_METRICS unset) and the API document stay open.
        for path in ("/healthz", "/livez", "/readyz", "/metrics", "/docs.json"):
            assert httpx.get(server.url + path).status_code == 200, path
        # So do the web page and its files (they hold no data); the page asks for the token, and the
        # preview it fetches needs it like every other upload.
        for path in ("/", "/docs", "/ui/app.js", "/ui/config.json"):
            assert httpx.get(server.url + path).status_code == 200, path
        assert httpx.get(server.url + "/ui/config.json").json()["auth"] is True
        r = httpx.post(server.url + "/preview", files={"image": ("a.png", good)})
        assert r.status_code == 401 and r.json()["reason"] == "unauthorized"
        r = httpx.post(server.url + "/preview", files={"image": ("a.png", good)}, headers=auth)
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        # The OpenAPI document declares the bearer scheme and requires it where the server does.
        doc = httpx.get(server.url + "/docs.json").json()
        assert doc["components"]["securitySchemes"]["bearerAuth"] == {
            "type": "http",
            "scheme": "bearer",
            "description": doc["components"]["securitySchemes"]["bearerAuth"]["description"],
        }
        for path in ("/classify", "/segment", "/embed", "/models", "/preview"):
            for op in doc["paths"][path].values():
                assert op["security"] == [{"bearerAuth": []}], path
        for path in ("/healthz", "/readyz", "/metrics"):
            assert all("security" not in op for op in doc["paths"][path].values()), path

        # --- a missing model turns off its endpoint only
        models = httpx.get(server.url + "/models", headers=auth).json()
        by_task = {m["task"]: m for m in models["models"]}
        assert by_task["classify"]["available"] and by_task["embed"]["available"]
        assert by_task["classify"]["tag"] == "nanomorph-classify:1"
        assert not by_task["segment"]["available"] and "nanomorph-segment" in by_task["segment"]["error"]
        r = httpx.post(server.url + "/segment", files={"image": ("a.png", good)}, headers=auth)
        assert r.status_code == 503 and r.json()["reason"] == "model_unavailable"
        assert "segment" in r.json()["error"]


def test_protected_metrics_in_process() -> None:
    """NANOMORPH_PROTECT_METRICS=1 puts /metrics behind the token (checked on the middleware alone)."""
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    from service.guard import GuardMiddleware
    from service.settings import Settings

    async def ok(_request: object) -> PlainTextResponse:
        return PlainTextResponse("ok")

    inner = Starlette(routes=[Route("/metrics", ok), Route("/readyz", ok)])
    settings = Settings.from_env({"NANOMORPH_API_TOKENS": "t0k", "NANOMORPH_PROTECT_METRICS": "1"})
    app = GuardMiddleware(inner, settings=settings)
    transport = httpx.ASGITransport(app=app)  # type: ignore[arg-type]

    async def go() -> tuple[int, int, int]:
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            a = (await client.get("/metrics")).status_code
            b = (await client.get("/metrics", headers={"Authorization": "Bearer t0k"})).status_code
            c = (await client.get("/readyz")).status_code
            return a, b, c

    assert asyncio.run(go()) == (401, 200, 200)
