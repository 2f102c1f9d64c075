"""A small HTTP client for the nanomorph service, for acquisition PCs and facility pipelines.

Needs only httpx, numpy and Pillow (plus tifffile to send 16-bit or float arrays); never torch or
bentoml, and it imports nothing else from nanomorph, so ``client.py`` can be copied on its own
next to the microscope's acquisition software. It also runs on old Pythons (no ``match``, no
3.10-only syntax at run time).

    from nanomorph.client import NanomorphClient

    client = NanomorphClient("http://gpu-box:3000", token="s3cret")
    client.ready()                                   # True once the models are loaded
    client.classify(["a.tif", "b.dm4"])              # one result dict per image
    client.classify([frame])                         # a uint16 numpy frame, no file written
    seg = client.segment("c.tif", pixel_size=0.8)    # seg["mask"] is a numpy array
    client.embed(["a.tif"])[0]["embedding"]          # float32 numpy vector

Connection errors and ``503`` answers (models still loading, a worker restarting, server
overloaded) are retried with exponential backoff, never sooner than the server's ``Retry-After``.
Every request the client sends is idempotent (inference has no side effects), so a request cut off
by a restarting worker is simply sent again. A ``4xx`` raises :class:`NanomorphError` carrying the
server's message and machine-readable reason.
"""

from __future__ import annotations

import base64
import contextlib
import io
import os
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Tuple, Union  # noqa: UP035 - Tuple for the runtime alias below

import httpx
import numpy as np

#: What the client accepts as an image: a path, the bytes of a file, a ``(name, bytes)`` pair or a
#: 2-D numpy array (uint8, uint16, float; RGB uint8 too).
# typing.Union (not ``|``): this alias is evaluated at import, and ``|`` needs Python 3.10.
ImageInput = Union[str, "os.PathLike[str]", bytes, Tuple[str, bytes], np.ndarray]  # noqa: UP006, UP007

#: Environment variable read when no token is given.
TOKEN_ENV = "NANOMORPH_TOKEN"


class NanomorphError(Exception):
    """The server refused a request, or could not be reached.

    Attributes:
        status: the HTTP status (None when the server could not be reached).
        reason: the server's machine-readable reason (``corrupt``, ``unauthorized``, ...), or
            ``connection`` / ``http_<status>`` when it sent none.
        message: the server's human-readable message (naming the file), or what went wrong.
        url: the URL requested.
    """

    def __init__(self, message: str, status: int | None = None, reason: str = "", url: str = "") -> None:
        super().__init__(message if status is None else f"HTTP {status} ({reason}): {message}")
        self.message = message
        self.status = status
        self.reason = reason
        self.url = url

    @property
    def retryable(self) -> bool:
        """True for errors another attempt may cure (server unreachable, 503, 5xx)."""
        return self.status is None or self.status >= 500


class NanomorphConnectionError(NanomorphError):
    """The server could not be reached (or kept answering 503) after every retry."""


def encode_array(array: np.ndarray) -> tuple[bytes, str]:
    """Encodes an image array as file bytes in memory, losslessly.

    uint8 (grey or RGB/RGBA) becomes PNG; uint16 a 16-bit TIFF; other integer types and floats a
    float32 TIFF (exact for integers below 2**24, which covers every camera). Needs tifffile for
    anything but uint8.

    Returns:
        ``(bytes, suggested filename)``.

    Raises:
        ValueError: not a 2-D (or H x W x 3/4 uint8) array, empty, or complex.
    """
    arr = np.asarray(array)
    if arr.size == 0:
        raise ValueError(f"cannot send an empty array (shape {arr.shape})")
    if np.iscomplexobj(arr):
        raise ValueError("cannot send a complex-valued array; send its magnitude")
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8) * 255
    colour = arr.ndim == 3 and arr.shape[2] in (3, 4) and arr.dtype == np.uint8
    if arr.ndim != 2 and not colour:
        raise ValueError(f"an image array must be 2-D (H, W) or (H, W, 3|4) uint8, got shape {arr.shape}")
    if arr.dtype == np.uint8:
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(arr)).save(buf, format="PNG")
        return buf.getvalue(), "array.png"
    import tifffile  # only needed for 16-bit and float frames

    if arr.dtype != np.uint16:
        arr = arr.astype(np.float32)
    buf = io.BytesIO()
    tifffile.imwrite(buf, np.ascontiguousarray(arr))
    return buf.getvalue(), "array.tif"


def _as_upload(item: Any, index: int = 0) -> tuple[str, bytes]:
    """``(filename, bytes)`` for any :data:`ImageInput`."""
    if isinstance(item, np.ndarray):
        data, name = encode_array(item)
        stem, suffix = os.path.splitext(name)
        return f"{stem}-{index}{suffix}", data
    if isinstance(item, (bytes, bytearray, memoryview)):
        return f"image-{index}", bytes(item)
    if isinstance(item, tuple) and len(item) == 2:
        return str(item[0]), bytes(item[1])
    if isinstance(item, (str, os.PathLike)):
        path = Path(item)
        try:
            return path.name, path.read_bytes()
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no such file") from None
    raise TypeError(
        f"cannot send {type(item).__name__!r}: give a path, bytes, (name, bytes) or a numpy array"
    )


def decode_png(data: bytes) -> np.ndarray:
    """A PNG mask (8- or 16-bit) as a numpy array (uint8 or uint16)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        arr = np.array(img)
    return arr.astype(np.uint16) if arr.dtype.kind in "iu" and arr.dtype.itemsize > 1 else arr


class NanomorphClient:
    """Talks to a running nanomorph service.

    Args:
        url: base URL, e.g. ``http://localhost:3000``.
        token: bearer token (the service's ``NANOMORPH_API_TOKENS``); default ``$NANOMORPH_TOKEN``.
        timeout: seconds per request (connect, read, write).
        retries: extra attempts after a connection error or a 503 answer.
        backoff: first wait between attempts in seconds; doubles each time (with a little jitter,
            so that many clients do not retry in lockstep), and is never shorter than the server's
            ``Retry-After``.
        max_connections: HTTP connections kept open (raise it for many threads).
        transport: an httpx transport (tests, proxies); default a plain one.
    """

    def __init__(
        self,
        url: str,
        token: str | None = None,
        timeout: float = 60.0,
        retries: int = 3,
        backoff: float = 0.5,
        max_connections: int = 16,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"server URL must start with http:// or https://, got {url!r}")
        if retries < 0 or backoff < 0 or timeout <= 0:
            raise ValueError("retries and backoff must be >= 0 and timeout > 0")
        self.url = url.rstrip("/")
        self.retries = int(retries)
        self.backoff = float(backoff)
        token = token if token is not None else os.environ.get(TOKEN_ENV) or None
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
        self._http = httpx.Client(
            base_url=self.url, headers=headers, timeout=timeout, limits=limits, transport=transport
        )

    # ----------------------------------------------------------------------------- plumbing

    def close(self) -> None:
        """Closes the connections."""
        self._http.close()

    def __enter__(self) -> NanomorphClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _wait(self, attempt: int, retry_after: str | None = None) -> None:
        time.sleep(self.retry_delay(attempt, retry_after))

    def retry_delay(self, attempt: int, retry_after: str | None = None) -> float:
        """Seconds to wait before retry ``attempt + 1``: the exponential backoff, but never less
        than the server's ``Retry-After`` (in seconds, capped at 30)."""
        delay = self.backoff * (2**attempt) * (1.0 + 0.1 * random.random())
        if retry_after:
            with contextlib.suppress(ValueError):
                delay = max(delay, min(max(float(retry_after), 0.0), 30.0))
        return delay

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """Sends a request with retries; returns a 2xx response or raises :class:`NanomorphError`.

        ``kwargs`` may hold ``files`` as a callable returning the multipart list, so that every
        attempt sends fresh bodies.
        """
        url = self.url + path
        files_fn = kwargs.pop("files", None)
        last: NanomorphError | None = None
        retry_after: str | None = None
        for attempt in range(self.retries + 1):
            if attempt:
                self._wait(attempt - 1, retry_after)
            try:
                if files_fn is not None:
                    kwargs["files"] = files_fn()
                response = self._http.request(method, path, **kwargs)
            except httpx.TransportError as exc:  # refused, reset, DNS, timeouts
                last = NanomorphConnectionError(
                    f"cannot reach the nanomorph server at {self.url} ({type(exc).__name__}: {exc})",
                    url=url,
                    reason="connection",
                )
                retry_after = None
                continue
            if response.status_code < 400:
                return response
            error = self._error(response, url)
            if response.status_code != 503:
                raise error
            last = NanomorphConnectionError(error.message, status=503, reason=error.reason, url=url)
            retry_after = response.headers.get("Retry-After")
        assert last is not None
        tries = self.retries + 1
        last.args = (f"{last.args[0]} (gave up after {tries} attempt{'s' if tries > 1 else ''})",)
        raise last

    @staticmethod
    def _error(response: httpx.Response, url: str) -> NanomorphError:
        """The server's ``{"error", "reason"}`` body as an exception (any body is tolerated)."""
        message, reason = "", ""
        try:
            body = response.json()
            if isinstance(body, dict):
                message = str(body.get("error") or body.get("detail") or body.get("message") or "")
                reason = str(body.get("reason") or "")
        except ValueError:
            pass
        if not message:
            message = response.text.strip()[:500] or response.reason_phrase
        return NanomorphError(
            message, status=response.status_code, reason=reason or f"http_{response.status_code}", url=url
        )

    # ---------------------------------------------------------------------------- endpoints

    def ready(self) -> bool:
        """True when ``/readyz`` answers 200 (models loaded); False when not ready or unreachable.

        Not retried: use it to poll.
        """
        try:
            return self._http.get("/readyz").status_code == 200
        except httpx.HTTPError:
            return False

    def wait_ready(self, timeout: float = 120.0, interval: float = 1.0) -> None:
        """Polls :meth:`ready` until it is True.

        Raises:
            NanomorphConnectionError: not ready within ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        while not self.ready():
            if time.monotonic() > deadline:
                raise NanomorphConnectionError(
                    f"the nanomorph server at {self.url} is not ready after {timeout:.0f} s", url=self.url
                )
            time.sleep(interval)

    def models(self) -> dict[str, Any]:
        """The served models (``GET /models``): ``{"ready", "models": [{task, tag, available,
        classes, contract, providers, sha256, metrics, ...}], "limits": {...}, ...}``."""
        return dict(self._request("GET", "/models").json())

    def model_info(self, task: str) -> dict[str, Any]:
        """The ``/models`` entry of one task (``classify``, ``embed`` or ``segment``).

        Raises:
            NanomorphError: the server serves no such task.
        """
        for entry in self.models().get("models", []):
            if entry.get("task") == task:
                return dict(entry)
        raise NanomorphError(f"the server at {self.url} has no {task} model", reason="model_unavailable")

    def _multi(self, endpoint: str, images: Any, batch_size: int) -> list[dict[str, Any]]:
        if isinstance(images, (str, bytes, np.ndarray, os.PathLike)) or (
            isinstance(images, tuple) and len(images) == 2 and isinstance(images[1], bytes)
        ):
            images = [images]  # one image given bare
        uploads = [_as_upload(item, i) for i, item in enumerate(images)]
        results: list[dict[str, Any]] = []
        for start in range(0, len(uploads), max(1, batch_size)):
            chunk = uploads[start : start + batch_size]

            def files(chunk: list[tuple[str, bytes]] = chunk) -> list[tuple[str, tuple[str, bytes, str]]]:
                return [("images", (name, data, "application/octet-stream")) for name, data in chunk]

            body = self._request("POST", "/" + endpoint, files=files).json()
            results.extend(body["results"])
        return results

    def classify(
        self, images: ImageInput | Sequence[ImageInput], batch_size: int = 32
    ) -> list[dict[str, Any]]:
        """Classifies images.

        Args:
            images: one image or a list: paths, file bytes, ``(name, bytes)`` or numpy arrays.
            batch_size: images per request (the server's ``max_files`` limit is 64 by default).

        Returns:
            One dict per image, in order: ``filename``, ``shape``, ``label``, ``confidence``,
            ``probabilities`` (class -> probability), ``ood_score``, ``ood_flag``, ``model``.

        Raises:
            NanomorphError: the server refused an image (e.g. ``corrupt``), with its message.
            NanomorphConnectionError: the server could not be reached after every retry.
        """
        return self._multi("classify", images, batch_size)

    def embed(self, images: ImageInput | Sequence[ImageInput], batch_size: int = 32) -> list[dict[str, Any]]:
        """Embeds images: one dict per image with ``filename``, ``shape`` and ``embedding`` (float32
        numpy vector, L2-normalised). Arguments and errors as :meth:`classify`."""
        results = self._multi("embed", images, batch_size)
        for r in results:
            r["embedding"] = np.asarray(r["embedding"], dtype=np.float32)
        return results

    def segment(
        self,
        image: ImageInput,
        pixel_size: float | None = None,
        pixel_unit: str = "nm",
        particles: bool = False,
    ) -> dict[str, Any]:
        """Segments one image of any size.

        Args:
            image: a path, file bytes, ``(name, bytes)`` or a numpy array.
            pixel_size: physical size of one pixel; default the file's own calibration.
            pixel_unit: unit of ``pixel_size``.
            particles: also ask for the per-particle table (``particles``, ``particle_summary``).

        Returns:
            The server's answer (``model``, ``filename``, ``shape``, ``legend``, ``pixel_size``,
            ``pixel_unit``, ``morphology``, ``mask_png`` base64) plus ``mask``: the class index
            per pixel as a numpy array.
        """
        name, data = _as_upload(image)
        form: dict[str, str] = {}
        if pixel_size is not None:
            form["pixel_size"] = repr(float(pixel_size))
            form["pixel_unit"] = pixel_unit

        def files() -> list[tuple[str, tuple[str, bytes, str]]]:
            return [("image", (name, data, "application/octet-stream"))]

        params = {"particles": "true"} if particles else None
        body = dict(self._request("POST", "/segment", files=files, data=form, params=params).json())
        body["mask"] = decode_png(base64.b64decode(body["mask_png"]))
        return body
