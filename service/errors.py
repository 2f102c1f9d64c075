"""Refusals in the service's one error format: ``{"error": message, "reason": code}``.

:func:`install` registers the exception handlers on the service's FastAPI app: input-guard
refusals (:class:`~service.guard.GuardError`), load shedding (:class:`~service.batching.Overloaded`),
a full pixel-budget queue (:class:`~service.largeframes.Busy`), FastAPI's own HTTP errors and form
validation. Each is counted in the rejection metric under its reason. The body is
:class:`service.schemas.ErrorResponse`.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service import metrics
from service.batching import Overloaded
from service.guard import GuardError
from service.largeframes import Busy
from service.settings import Settings

#: FastAPI's HTTP errors -> the reason code they answer with (others: ``http_error``).
HTTP_REASONS = {400: "malformed_request", 404: "not_found", 405: "method_not_allowed"}


def error_response(status: int, reason: str, message: str, retry_after_s: int) -> JSONResponse:
    """One refusal; every 503 (models loading, a restarted worker, overload) is temporary, so it
    says when to come back (``Retry-After``)."""
    headers = {"Retry-After": str(retry_after_s)} if status == 503 else None
    return JSONResponse({"error": message, "reason": reason}, status_code=status, headers=headers)


def validation_message(exc: RequestValidationError) -> tuple[str, str]:
    """``(reason, message)`` of a form validation error: ``missing_field`` when any field is missing."""
    problems = []
    reason = "invalid_field"
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", ()) if p not in ("body", "query")]
        where = ".".join(loc) or "request"
        if err.get("type") == "missing":
            reason = "missing_field"
            problems.append(f"missing form field '{where}'")
        else:
            problems.append(f"{where}: {err.get('msg')}")
    return reason, "; ".join(problems) or "invalid request"


def install(app: FastAPI, settings: Settings) -> None:
    """Registers the service's exception handlers on ``app``."""
    retry = settings.retry_after_s

    @app.exception_handler(GuardError)
    async def _guard_error(request: Request, exc: GuardError) -> JSONResponse:
        metrics.record_rejection(request.url.path, exc.reason)
        return error_response(exc.status, exc.reason, exc.message, retry)

    @app.exception_handler(Overloaded)
    async def _overloaded(request: Request, exc: Overloaded) -> JSONResponse:
        metrics.record_rejection(request.url.path, "overloaded")
        return error_response(503, "overloaded", str(exc), retry)

    @app.exception_handler(Busy)
    async def _busy(request: Request, exc: Busy) -> JSONResponse:
        # The pixel budget knows how long its queue takes: its own Retry-After, not the setting's.
        metrics.record_rejection(request.url.path, "busy")
        return JSONResponse(
            {"error": str(exc), "reason": "busy"},
            status_code=503,
            headers={"Retry-After": str(exc.retry_after_s)},
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # e.g. a multipart body without (or with a wrong) boundary: FastAPI raises a 400 with `detail`;
        # answer it in the service's own error format like every other refusal.
        reason = HTTP_REASONS.get(exc.status_code, "http_error")
        if exc.status_code < 500:
            metrics.record_rejection(request.url.path, reason)
        return JSONResponse(
            {"error": str(exc.detail), "reason": reason}, status_code=exc.status_code, headers=exc.headers
        )

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        reason, message = validation_message(exc)
        metrics.record_rejection(request.url.path, reason)
        return error_response(422, reason, message, retry)
