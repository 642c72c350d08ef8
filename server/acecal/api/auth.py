"""Static API key authentication: ``Authorization: Bearer <key>``, compared in constant time, before the body is read.

With no key configured every request is allowed (the server binds loopback by default). With a key,
:class:`APIKeyMiddleware` (pure ASGI, in front of everything but CORS) answers every request except :data:`OPEN_PATHS`
with 401 ``{"error": "unauthorized"}`` and ``WWW-Authenticate: Bearer`` unless it carries the key, before a byte of
its body is read: an unauthenticated upload never reaches the disk, an unauthenticated JSON body never the memory.
:func:`require_api_key` is also declared on the secured routers so the OpenAPI schema states the bearer scheme.
"""

from __future__ import annotations

import hmac
from typing import Optional

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import SecretStr
from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from acecal.api.errors import error_body
from acecal.errors import UnauthorizedError

bearer = HTTPBearer(auto_error=False, description="the server's API key (acecal serve --api-key / ACECAL_API_KEY)")

#: paths that never need the key: liveness and the API's own description
OPEN_PATHS = frozenset({"/health", "/docs", "/docs/oauth2-redirect", "/openapi.json", "/redoc"})

MISSING_KEY = "this server needs an API key: send 'Authorization: Bearer <key>' (acecal --api-key or ACECAL_API_KEY)"
WRONG_KEY = "the API key was refused; check the key the server was started with"


def keys_match(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8"))


def check_authorization(header: Optional[str], key: SecretStr) -> None:
    """Raise :class:`UnauthorizedError` unless ``header`` is ``Bearer <key>``."""
    scheme, _, token = (header or "").strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise UnauthorizedError(MISSING_KEY)
    if not keys_match(token, key.get_secret_value()):
        raise UnauthorizedError(WRONG_KEY)


class APIKeyMiddleware:
    """Refuse requests without the key before the application (and its body parsing) sees them."""

    def __init__(self, app: ASGIApp, key: Optional[SecretStr]):
        self.app = app
        self.key = key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.key is None or scope.get("path") in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        try:
            check_authorization(Headers(scope=scope).get("authorization"), self.key)
        except UnauthorizedError as e:
            # the body, if any, is never read: close the connection rather than drain it
            response = JSONResponse(
                error_body(e.code, e.detail),
                status_code=401,
                headers={"WWW-Authenticate": "Bearer", "Connection": "close"},
            )
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


async def require_api_key(
    request: Request, credentials: Optional[HTTPAuthorizationCredentials] = Depends(bearer)
) -> None:
    """The route-level check (the middleware already made it); declares the bearer scheme in the OpenAPI schema."""
    key = request.app.state.acecal.settings.api_key
    if key is None:
        return
    check_authorization(request.headers.get("authorization"), key)
