"""ASGI middleware: the request size caps.

- An upload (a multipart body to one of the :data:`UPLOAD_ROUTES`) whose declared ``Content-Length`` exceeds
  ``max_upload_mb`` is answered 413 at once, before its body is read; a body without a declared length (chunked) is
  counted as it arrives and refused as soon as it passes the cap.
- Any other body (JSON, or anything sent to another route) may hold at most :data:`MAX_JSON_BYTES`: it is read here
  (never more than that), refused 413 beyond it, and refused 422 when nested deeper than :data:`MAX_JSON_DEPTH`
  (Python's JSON parser would otherwise recurse until ``RecursionError``), then handed on unchanged.

Replies are the usual ``{"error": ..., "detail": ...}``.
"""

from __future__ import annotations

import re
import time

import numpy as np
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from acecal.api.errors import error_body

_BODYLESS = {"GET", "HEAD", "OPTIONS", "DELETE"}
#: scope key: perf_counter() when the request arrived
RECEIVED_AT = "acecal.received_at"
#: the largest JSON (non-multipart) request body accepted
MAX_JSON_BYTES = 1024 * 1024
#: the deepest nesting of arrays/objects accepted in a JSON body or in the ``params`` form field
MAX_JSON_DEPTH = 32

_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')
#: the routes that take multipart uploads (everything else takes small JSON bodies)
UPLOAD_ROUTES = (re.compile(r"^/infer/[^/]+$"), re.compile(r"^/datasets/[^/]+/cases$"))


def json_depth(data: bytes | str) -> int:
    """How deeply arrays and objects nest in a JSON text (strings skipped), without parsing it."""
    raw = data.encode("utf-8", "replace") if isinstance(data, str) else bytes(data)
    a = np.frombuffer(_JSON_STRING.sub(b'""', raw), np.uint8)
    if a.size == 0:
        return 0
    step = ((a == ord("[")) | (a == ord("{"))).astype(np.int32) - ((a == ord("]")) | (a == ord("}"))).astype(np.int32)
    return int(max(np.cumsum(step).max(), 0))


def too_deep_message(depth: int, what: str = "the JSON body") -> str:
    return (
        f"{what} nests arrays/objects {depth} levels deep; at most {MAX_JSON_DEPTH} are accepted "
        "(no request of this API needs more than a few)"
    )


def _too_large_message(limit: int, size: int | None = None, *, json_body: bool = False) -> str:
    mb = limit / (1024 * 1024)
    got = f"{size / (1024 * 1024):.1f} MB" if size is not None else "larger than the limit"
    if json_body:
        return f"the request body is {got}; JSON requests may be at most {mb:.4g} MB (files go in multipart uploads)"
    return (
        f"the upload is {got}; this server accepts at most {mb:.4g} MB per request "
        "(raise it with --max-upload-mb or ACECAL_MAX_UPLOAD_MB)"
    )


class UploadLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = int(max_bytes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope[RECEIVED_AT] = time.perf_counter()  # when the request's headers arrived (handlers time the body)
        if scope["type"] != "http" or scope.get("method") in _BODYLESS:
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        multipart = headers.get("content-type", "").lower().lstrip().startswith("multipart/") and any(
            r.match(scope.get("path", "")) for r in UPLOAD_ROUTES
        )
        limit = self.max_bytes if multipart else min(self.max_bytes, MAX_JSON_BYTES)
        length = headers.get("content-length")
        try:
            declared = int(length) if length is not None else None
        except ValueError:
            declared = None
        if declared is not None and declared > limit:
            await self._refuse(
                scope,
                receive,
                send,
                413,
                "payload_too_large",
                _too_large_message(limit, declared, json_body=not multipart),
            )
            return
        if not multipart:
            await self._json(scope, receive, send, limit)
            return
        total = 0

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

    async def _json(self, scope: Scope, receive: Receive, send: Send, limit: int) -> None:
        """Read a (small) non-multipart body here, check its size and nesting, then replay it to the app."""
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await self._refuse(
                    scope, receive, send, 413, "payload_too_large", _too_large_message(limit, json_body=True)
                )
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        depth = json_depth(body) if body else 0
        if depth > MAX_JSON_DEPTH:
            await self._refuse(scope, receive, send, 422, "invalid_input", too_deep_message(depth))
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    @staticmethod
    async def _refuse(scope: Scope, receive: Receive, send: Send, status: int, code: str, detail: str) -> None:
        response = JSONResponse(error_body(code, detail), status_code=status, headers={"Connection": "close"})
        await response(scope, receive, send)
