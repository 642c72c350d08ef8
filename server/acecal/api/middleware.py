"""ASGI middleware: the upload size cap.

A request whose declared ``Content-Length`` exceeds the cap is answered 413 at once, before its body is read; a body
without a declared length (chunked) is counted as it arrives and refused as soon as it passes the cap. The reply is
the usual ``{"error": "payload_too_large", "detail": ...}``.
"""

from __future__ import annotations

import time

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from acecal.api.errors import error_body

_BODYLESS = {"GET", "HEAD", "OPTIONS", "DELETE"}
#: scope key: perf_counter() when the request arrived
RECEIVED_AT = "acecal.received_at"


def _too_large_message(limit: int, size: int | None = None) -> str:
    mb = limit / (1024 * 1024)
    got = f"{size / (1024 * 1024):.1f} MB" if size is not None else "larger than the limit"
    return (f"the upload is {got}; this server accepts at most {mb:.4g} MB per request "
            "(raise it with --max-upload-mb or ACECAL_MAX_UPLOAD_MB)")


class UploadLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = int(max_bytes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope[RECEIVED_AT] = time.perf_counter()  # when the request's headers arrived (handlers time the body)
        if scope["type"] != "http" or scope.get("method") in _BODYLESS:
            await self.app(scope, receive, send)
            return
        length = Headers(scope=scope).get("content-length")
        try:
            declared = int(length) if length is not None else None
        except ValueError:
            declared = None
        if declared is not None and declared > self.max_bytes:
            response = JSONResponse(error_body("payload_too_large", _too_large_message(self.max_bytes, declared)),
                                    status_code=413, headers={"Connection": "close"})
            await response(scope, receive, send)
            return
        total = 0
        limit = self.max_bytes

        async def limited_receive() -> Message:
            nonlocal total
            message = await receive()
            if message["type"] == "http.request":
                total += len(message.get("body", b""))
                if total > limit:
                    # raised inside body parsing: FastAPI re-raises HTTPExceptions, our handler formats it
                    raise HTTPException(413, detail=_too_large_message(limit))
            return message

        await self.app(scope, limited_receive, send)
