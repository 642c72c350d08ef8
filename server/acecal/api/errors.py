"""The one place where exceptions become HTTP responses: ``{"error": code, "detail": human message}``.

- :class:`acecal.errors.ACECalError` and subclasses -> their ``http_status`` and ``code`` (503 adds ``Retry-After``,
  401 adds ``WWW-Authenticate: Bearer``);
- request validation errors (bad path/form fields) -> 422 ``invalid_input`` with a readable message;
- Starlette HTTP errors (unknown path, wrong method, oversized body) -> their status with a matching code;
- anything else -> 500 ``internal_error`` (logged with a traceback; the reply never carries one).

Details never carry the server's data directory or model folders (:func:`scrub_server_paths`).

The client rebuilds the same exception classes from ``error`` (see :data:`acecal.errors.ERRORS_BY_CODE`).
"""

from __future__ import annotations

import logging
import math
import re
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from acecal.errors import ACECalError, ServerBusyError, UnauthorizedError

log = logging.getLogger("acecal.api")

#: HTTP status -> error code for errors raised by the framework rather than by our code
STATUS_CODES = {
    400: "invalid_input",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid_input",
    429: "busy",
    503: "busy",
    507: "storage_error",
}


def error_body(code: str, detail: str) -> dict:
    return {"error": code, "detail": detail}


def error_response(exc: ACECalError) -> JSONResponse:
    headers = {}
    if isinstance(exc, ServerBusyError):
        headers["Retry-After"] = str(max(1, int(math.ceil(exc.retry_after))))
    if isinstance(exc, UnauthorizedError):
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse(error_body(exc.code, exc.detail), status_code=exc.http_status, headers=headers or None)


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = [str(x) for x in err.get("loc", ()) if x not in ("body",)]
        where = ".".join(loc) or "request"
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return "invalid request: " + "; ".join(parts) if parts else "invalid request"


def _allowed_methods(request: Request) -> list[str]:
    """Every method the API documents on this path (Starlette's 405 names only the first matching route's)."""
    methods: set[str] = set()
    path = request.url.path
    for template, ops in request.app.openapi().get("paths", {}).items():
        pattern = "^" + re.sub(r"\\\{[^/]+?\\\}", "[^/]+", re.escape(template)) + "$"
        if re.match(pattern, path):
            methods |= {m.upper() for m in ops}
    return sorted(methods)


def scrub_server_paths(detail: str, request: Request) -> str:
    """``detail`` without the server's own folders (data directory, model folders): replies never reveal them."""
    state = getattr(request.app.state, "acecal", None)
    if state is None:
        return detail
    s = state.settings
    for folder, label in [(s.data_dir, "<data-dir>"), *((m, "<models>") for m in s.models_dirs)]:
        for variant in {str(folder), str(folder.resolve())}:
            if len(variant) > 1 and variant in detail:
                detail = detail.replace(variant, label)
    return detail


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ACECalError)
    async def _acecal_error(request: Request, exc: ACECalError) -> JSONResponse:
        if exc.http_status >= 500 and not isinstance(exc, ServerBusyError):
            log.error("%s %s failed: %s", request.method, request.url.path, exc.detail)
        exc.detail = scrub_server_paths(exc.detail, request)
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(error_body("invalid_input", _validation_message(exc)), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = STATUS_CODES.get(exc.status_code, "error")
        if exc.status_code == 404 and exc.detail in (None, "Not Found"):
            detail = f"no such endpoint: {request.method} {request.url.path}; see /docs for the API"
        elif exc.status_code == 405:
            detail = f"method {request.method} is not allowed on {request.url.path}"
        else:
            detail = str(exc.detail) if exc.detail else code
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 405:
            headers["Allow"] = ", ".join(_allowed_methods(request))
        return JSONResponse(error_body(code, detail), status_code=exc.status_code, headers=headers or None)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        ref = uuid.uuid4().hex[:8]
        log.exception("unexpected error %s in %s %s", ref, request.method, request.url.path)
        return JSONResponse(
            error_body("internal_error", f"unexpected server error (reference {ref}); the server log has the details"),
            status_code=500,
        )
