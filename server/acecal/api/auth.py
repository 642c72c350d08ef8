"""Static API key authentication: ``Authorization: Bearer <key>``, compared in constant time.

With no key configured every request is allowed (the server binds loopback by default). With a key, every router
except ``/health`` is included with :func:`require_api_key` as a dependency; a missing or wrong key is 401
``{"error": "unauthorized"}`` with ``WWW-Authenticate: Bearer``.
"""

from __future__ import annotations

import hmac
from typing import Optional

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from acecal.errors import UnauthorizedError

bearer = HTTPBearer(auto_error=False, description="the server's API key (acecal serve --api-key / ACECAL_API_KEY)")


def keys_match(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8"))


async def require_api_key(request: Request,
                          credentials: Optional[HTTPAuthorizationCredentials] = Depends(bearer)) -> None:
    key = request.app.state.acecal.settings.api_key
    if key is None:
        return
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise UnauthorizedError("this server needs an API key: send 'Authorization: Bearer <key>' "
                                "(acecal --api-key or ACECAL_API_KEY)")
    if not keys_match(credentials.credentials, key.get_secret_value()):
        raise UnauthorizedError("the API key was refused; check the key the server was started with")
