"""The input guard and access control: every bad request becomes a 4xx JSON error, never a 500.

Two layers:

* :class:`GuardMiddleware`, a plain ASGI middleware in front of every route: bearer-token check
  (``NANOMORPH_API_TOKENS``, constant-time compare), request size from ``Content-Length`` (413
  before a byte of the body is read) and the request's media type (415 unless multipart).
* :func:`decode_upload`, per uploaded file: empty (400), too large (413), pixel count read from the
  header before decoding (413), then the preprocessing contract's own reader
  (:func:`nanomorph.contract.read_image`), whose errors carry their HTTP status and reason;
  :func:`decode_uploads` runs it over a request's uploads (:func:`read_upload`: declared size first).

All errors have the body ``{"error": "<what went wrong, naming the file>", "reason": "<code>"}``.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from typing import Any

import numpy as np
from starlette.datastructures import UploadFile

from nanomorph.contract import ImageMeta, ImageReadError, peek_shape, read_image
from service.settings import Settings

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: Paths open without a token (health probes, the web page, the OpenAPI document and its UI). The
#: page itself holds no data: every request it makes to the API carries the token typed into it.
OPEN_PATHS = ("/healthz", "/livez", "/readyz", "/", "/docs", "/docs.json", "/schema.json")
OPEN_PREFIXES = ("/static_content/", "/assets/", "/ui/")
#: Inference endpoints: POST with a multipart body.
UPLOAD_PATHS = ("/classify", "/embed", "/segment", "/preview")


class GuardError(Exception):
    """A request the service refuses, with its HTTP status and a machine-readable reason."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message

    def body(self) -> dict[str, str]:
        return {"error": self.message, "reason": self.reason}


def check_token(authorization: str | None, tokens: tuple[str, ...]) -> bool:
    """True when ``authorization`` is ``Bearer <t>`` for one of ``tokens`` (constant-time compare).

    Every token is compared, so the time taken does not reveal which one nearly matched.
    """
    if not tokens:
        return True
    if not authorization:
        return False
    scheme, _, given = authorization.partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        return False
    given_b = given.strip().encode("utf-8")
    ok = False
    for token in tokens:
        ok |= hmac.compare_digest(given_b, token.encode("utf-8"))
    return ok


def needs_token(path: str, settings: Settings) -> bool:
    """Whether a request to ``path`` must carry a bearer token under ``settings``."""
    if not settings.auth_enabled:
        return False
    if path in OPEN_PATHS or path.startswith(OPEN_PREFIXES):
        return False
    return not (path == "/metrics" and not settings.protect_metrics)


def decode_upload(data: bytes, name: str, settings: Settings) -> tuple[np.ndarray, ImageMeta]:
    """Checks and decodes one uploaded file.

    Args:
        data: the file's bytes.
        name: its filename (for messages).
        settings: the limits.

    Returns:
        The image as float32 (H, W) and its metadata, from :func:`nanomorph.contract.read_image`.

    Raises:
        GuardError: 400 empty/undecodable, 413 too large (bytes or pixels), 415 unsupported format.
    """
    if not data:
        raise GuardError(400, "empty", f"{name}: empty file (0 bytes)")
    if len(data) > settings.max_upload_bytes:
        raise GuardError(
            413,
            "too_large",
            f"{name}: {len(data)} bytes is over the upload limit of {settings.max_upload_bytes} bytes",
        )
    try:
        # The header alone says how big the decoded image would be: refuse before allocating it.
        h, w = peek_shape(data, name=name)
        if h * w > settings.max_pixels:
            raise GuardError(
                413, "too_many_pixels", f"{name}: {h}x{w} pixels is over the limit of {settings.max_pixels}"
            )
        return read_image(data, name=name, max_pixels=settings.max_pixels)
    except GuardError:
        raise
    except ImageReadError as exc:
        raise GuardError(int(exc.http_status), str(exc.reason), str(exc)) from exc
    except MemoryError as exc:
        raise GuardError(413, "too_large", f"{name}: image too large to decode") from exc
    except Exception as exc:  # any decoder failure is the upload's fault, not the server's
        kind = type(exc).__name__
        if "DecompressionBomb" in kind:
            raise GuardError(413, "too_many_pixels", f"{name}: {exc}") from exc
        if "UnidentifiedImage" in kind:
            raise GuardError(
                415, "unsupported_format", f"{name}: not an image in a supported format"
            ) from exc
        raise GuardError(400, "undecodable", f"{name}: cannot decode image ({kind}: {exc})") from exc


async def read_upload(upload: UploadFile, settings: Settings) -> tuple[bytes, str]:
    """``(bytes, filename)`` of one upload; 413 ``too_large`` when its declared size is over the
    limit (an undeclared one is read one byte past it, for :func:`decode_upload` to refuse)."""
    name = upload.filename or "upload"
    limit = settings.max_upload_bytes
    if upload.size is not None and upload.size > limit:
        raise GuardError(
            413, "too_large", f"{name}: {upload.size} bytes is over the upload limit of {limit} bytes"
        )
    data = await upload.read(limit + 1)
    return data, name


async def decode_uploads(
    uploads: Sequence[UploadFile], prepare: Callable[..., Any], settings: Settings, with_meta: bool = False
) -> list[tuple[str, ImageMeta, Any]]:
    """Reads, guards and preprocesses uploads (decoding off the event loop): per upload
    ``(filename, metadata, prepare(image[, metadata]))``."""
    if len(uploads) > settings.max_files:
        raise GuardError(
            413,
            "too_many_files",
            f"{len(uploads)} files in one request; the limit is {settings.max_files}",
        )
    out = []
    for upload in uploads:
        data, name = await read_upload(upload, settings)

        def work(data: bytes = data, name: str = name) -> tuple[ImageMeta, Any]:
            image, meta = decode_upload(data, name, settings)
            return meta, prepare(image, meta) if with_meta else prepare(image)

        meta, arr = await asyncio.to_thread(work)
        out.append((name, meta, arr))
    return out


def frame_pixels(data: bytes, name: str, settings: Settings) -> int:
    """Pixels of an uploaded frame, from its header; a bad or over-limit upload raises its usual
    4xx here (:func:`decode_upload`), before any pixel budget is taken."""
    try:
        h, w = peek_shape(data, name=name)
    except Exception:
        h, w = 0, 0
    if h * w == 0 or h * w > settings.max_pixels:
        image, _ = decode_upload(data, name, settings)  # raises the precise refusal
        h, w = image.shape[:2]
    return int(h * w)


async def send_json(
    send: Send, status: int, body: dict[str, Any], headers: Sequence[tuple[bytes, bytes]] = ()
) -> None:
    payload = json.dumps(body).encode("utf-8")
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})


class GuardMiddleware:
    """ASGI middleware: access control, request size and media type (see the module docstring).

    Args:
        app: the wrapped ASGI app.
        settings: tokens, ``protect_metrics`` and ``max_request_bytes``; read from the environment
            when None.
        on_reject: called with ``(path, reason)`` for every refused request (metrics).
    """

    def __init__(
        self,
        app: ASGIApp,
        settings: Settings | None = None,
        on_reject: Callable[[str, str], None] | None = None,
    ) -> None:
        self.app = app
        self.settings = settings or Settings.from_env()
        self.on_reject = on_reject

    def _needs_token(self, path: str) -> bool:
        return needs_token(path, self.settings)

    async def _reject(
        self, send: Send, path: str, error: GuardError, headers: list[tuple[bytes, bytes]]
    ) -> None:
        if self.on_reject is not None:
            self.on_reject(path, error.reason)
        await send_json(send, error.status, error.body(), headers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if self._needs_token(path) and not check_token(
            headers.get("authorization"), self.settings.api_tokens
        ):
            err = GuardError(
                401, "unauthorized", "missing or invalid bearer token (Authorization: Bearer <token>)"
            )
            await self._reject(send, path, err, [(b"www-authenticate", b'Bearer realm="nanomorph"')])
            return
        if path in UPLOAD_PATHS and scope.get("method") == "POST":
            length = headers.get("content-length")
            if length is not None and length.isdigit() and int(length) > self.settings.max_request_bytes:
                err = GuardError(
                    413,
                    "request_too_large",
                    f"request body of {length} bytes is over the limit of {self.settings.max_request_bytes} bytes",
                )
                await self._reject(send, path, err, [(b"connection", b"close")])
                return
            ctype = headers.get("content-type", "")
            if not ctype.lower().startswith("multipart/form-data"):
                err = GuardError(
                    415,
                    "unsupported_media_type",
                    f"{path} takes multipart/form-data file uploads, not {ctype or 'a body without Content-Type'}",
                )
                await self._reject(send, path, err, [])
                return
        await self.app(scope, receive, send)
