"""The service's own web page (``/``), its API docs page (``/docs``) and OpenAPI document (``/docs.json``).

Everything the page needs ships in ``service/web/`` (plain HTML, CSS and JavaScript; no CDN, no
trackers), so it works on an offline microscope PC. The page calls the public endpoints
(``/classify``, ``/segment``, ``/models``) with the bearer token typed into it, and ``POST /preview``
for a browser-displayable picture of any supported upload (DM3/DM4, MRC, 16-bit or float TIFF ...),
which browsers cannot show themselves.

BentoML's own index (Swagger UI loading a Google Tag Manager script) is replaced: the FastAPI routes
mounted with ``@bentoml.asgi_app`` are matched before BentoML's ``/`` and ``/docs.json``. ``/docs``
is Swagger UI from the copy BentoML ships (``/static_content/``), without the tracker.
``/docs.json`` is BentoML's merged document plus what BentoML 1.4 cannot express: the package
version as ``info.version`` and a bearer security scheme (``components.securitySchemes``, not
supported by BentoML's ``Components``), required on the token-protected operations when
``NANOMORPH_API_TOKENS`` is set, so Swagger UI's "Authorize" works.

Never imports torch or ``training``.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, File, UploadFile
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image

import nanomorph
from nanomorph.contract import Contract, normalise
from nanomorph.morphology import PALETTE
from service.guard import decode_upload, needs_token
from service.settings import Settings

WEB_DIR = Path(__file__).with_name("web")
#: Name of the bearer scheme in ``components.securitySchemes``.
BEARER = "bearerAuth"
#: Longest side of a preview PNG; larger frames are downscaled (the page scales the mask to it).
PREVIEW_MAX_SIDE = 2048

DESCRIPTION = (
    "Classify, embed and segment TEM images with self-supervised models (nanomorph "
    f"{nanomorph.__version__}). The web page is at `/`. When the server has tokens "
    "(`NANOMORPH_API_TOKENS`), use *Authorize* with one of them. Every refusal is JSON "
    '`{"error": ..., "reason": ...}`; see docs/service.md.'
)

DOCS_HTML = """<!DOCTYPE html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>nanomorph API</title>
  <link rel="stylesheet" href="./static_content/swagger-ui.css">
</head>
<body>
  <div id="swagger-ui"></div>
  <script src="./static_content/swagger-ui-bundle.js"></script>
  <script src="./static_content/swagger-ui-standalone-preset.js"></script>
  <script src="./ui/docs.js"></script>
</body>
</html>
"""


def preview_png(image: np.ndarray, max_side: int = PREVIEW_MAX_SIDE) -> bytes:
    """An 8-bit grey PNG of a decoded image, percentile-stretched as models see it.

    Args:
        image: float32 (H, W) from :func:`nanomorph.contract.read_image`.
        max_side: longest side of the PNG; larger images are downscaled (aspect kept).
    """
    grey = Image.fromarray(np.round(normalise(image, Contract()) * 255.0).astype(np.uint8), mode="L")
    h, w = image.shape[:2]
    scale = max_side / max(h, w)
    if scale < 1:
        grey = grey.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    grey.save(buf, format="PNG", compress_level=1)  # speed over size: it goes back over the LAN
    return buf.getvalue()


def document(spec: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """BentoML's OpenAPI document with the package version and the bearer security scheme.

    Args:
        spec: ``Service.openapi_spec.asdict()``.
        settings: decides which operations require the token (none when auth is off).
    """
    spec = dict(spec)
    # BentoML's info says version "None" outside a bento and its description is BentoML's README,
    # whose badges are images from img.shields.io etc. (fetched by any viewer): replace both.
    spec["info"] = {"title": "nanomorph", "version": nanomorph.__version__, "description": DESCRIPTION}
    components = dict(spec.get("components") or {})
    components["securitySchemes"] = {
        BEARER: {
            "type": "http",
            "scheme": "bearer",
            "description": "one of the tokens in NANOMORPH_API_TOKENS (only when that is set)",
        }
    }
    spec["components"] = components
    paths: dict[str, Any] = {}
    for path, item in (spec.get("paths") or {}).items():
        if needs_token(path, settings):
            item = {
                method: {**op, "security": [{BEARER: []}]} if isinstance(op, dict) else op
                for method, op in item.items()
            }
        paths[path] = item
    spec["paths"] = paths
    return spec


def install(app: FastAPI, settings: Settings, openapi: Callable[[], dict[str, Any]]) -> None:
    """Adds the page, the docs page, ``/docs.json``, ``/ui/*`` and ``POST /preview`` to ``app``.

    Args:
        app: the service's FastAPI app (mounted at ``/``).
        settings: upload limits and whether tokens are on.
        openapi: returns BentoML's merged OpenAPI document as a dict.
    """

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(WEB_DIR / "index.html", media_type="text/html")

    @app.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        return HTMLResponse(DOCS_HTML)

    @app.get("/docs.json", include_in_schema=False)
    def docs_json() -> JSONResponse:
        return JSONResponse(document(openapi(), settings))

    @app.get("/ui/config.json", include_in_schema=False)
    def config() -> JSONResponse:
        # What the page needs before any authorised call: whether to ask for a token, and the
        # overlay colours of nanomorph.morphology (so the page and the saved overlays agree).
        return JSONResponse(
            {
                "version": nanomorph.__version__,
                "auth": settings.auth_enabled,
                "palette": PALETTE.tolist(),
                "max_upload_bytes": settings.max_upload_bytes,
            }
        )

    @app.post(
        "/preview",
        response_class=Response,
        responses={
            200: {"content": {"image/png": {}}, "description": "8-bit grey PNG of the image"},
            **{code: {"description": d} for code, d in ((400, "undecodable"), (413, "too large"))},
            415: {"description": "unsupported format"},
        },
        summary="A browser-displayable picture of one image (for the web page)",
        tags=["ui"],
    )
    async def preview(
        image: UploadFile = File(description="one image file, any supported format"),
    ) -> Response:
        """The image percentile-stretched to 8 bits (as the models see it) as a PNG, at most
        2048 px on the long side. Headers: ``X-Nanomorph-Shape`` (``HxW`` of the original) and,
        when the file is calibrated, ``X-Nanomorph-Pixel-Size`` / ``X-Nanomorph-Pixel-Unit``."""
        name = image.filename or "upload"
        data = await image.read(settings.max_upload_bytes + 1)

        def work() -> tuple[bytes, Any]:
            arr, meta = decode_upload(data, name, settings)
            return preview_png(arr), meta

        png, meta = await asyncio.to_thread(work)
        headers = {"X-Nanomorph-Shape": f"{meta.shape[0]}x{meta.shape[1]}"}
        if meta.pixel_size is not None:
            headers["X-Nanomorph-Pixel-Size"] = repr(float(meta.pixel_size))
            headers["X-Nanomorph-Pixel-Unit"] = (meta.pixel_unit or "nm").encode("ascii", "replace").decode()
        return Response(content=png, media_type="image/png", headers=headers)

    app.mount("/ui", StaticFiles(directory=WEB_DIR), name="ui")
