# Generated from server/acecal/errors.py by ACECalibration/CMake/generate_light_client.py: edit the source.
"""One exception hierarchy for the whole project.

Each error carries a stable machine-readable ``code`` and the HTTP status the server answers it with; the server maps
them in one place (``acecal.api.errors``) to ``{"error": code, "detail": message}`` and the client turns such replies
back into the same classes. Messages say what was wrong and what to do. Dependency-free: the client imports it.
"""

from __future__ import annotations


class ACECalError(Exception):
    """Base class. ``detail`` is a human message: what was wrong and what to do about it."""

    code = "error"
    http_status = 500

    def __init__(self, detail: str, *, code: str | None = None):
        super().__init__(detail)
        self.detail = detail
        if code is not None:
            self.code = code

    def __str__(self) -> str:  # pragma: no cover - trivial
        return self.detail


class InvalidInputError(ACECalError, ValueError):
    """The request or file is malformed or unusable (corrupt image, 2-D image, NaN voxels, wrong channels...)."""

    code = "invalid_input"
    http_status = 422


class NotFoundError(ACECalError, LookupError):
    code = "not_found"
    http_status = 404


class ModelNotFoundError(NotFoundError):
    code = "model_not_found"


class ResultNotFoundError(NotFoundError):
    code = "result_not_found"


class UnauthorizedError(ACECalError):
    code = "unauthorized"
    http_status = 401


class PayloadTooLargeError(ACECalError):
    code = "payload_too_large"
    http_status = 413


class ConflictError(ACECalError):
    code = "conflict"
    http_status = 409


class ServerBusyError(ACECalError):
    """The bounded queue is full; retry after ``retry_after`` seconds."""

    code = "busy"
    http_status = 503

    def __init__(self, detail: str, *, retry_after: float = 5.0, code: str | None = None):
        super().__init__(detail, code=code)
        self.retry_after = retry_after


class StorageError(ACECalError):
    """Disk full or unwritable data directory."""

    code = "storage_error"
    http_status = 507


class BundleError(ACECalError):
    """A model bundle is malformed (missing file, bad config, weights that do not fit the network)."""

    code = "bundle_error"
    http_status = 500


# --- raised by callers of the server (the client, the Slicer module), never sent by it --------------------------------
class ServerUnreachableError(ACECalError, ConnectionError):
    """The server could not be reached (not running, wrong URL or port, network down)."""

    code = "unreachable"
    http_status = 503


class ServerTimeoutError(ServerUnreachableError, TimeoutError):
    """The server did not answer within the client's timeout."""

    code = "timeout"
    http_status = 504


class ProtocolError(ACECalError):
    """A reply that is not the wire format of :mod:`acecal.protocol` (wrong URL? a proxy? a version mismatch?)."""

    code = "bad_response"
    http_status = 502


#: code -> class, for the client to rebuild typed errors from a server reply (the server's own errors only).
ERRORS_BY_CODE: dict[str, type[ACECalError]] = {
    cls.code: cls
    for cls in (
        ACECalError,
        InvalidInputError,
        NotFoundError,
        ModelNotFoundError,
        ResultNotFoundError,
        UnauthorizedError,
        PayloadTooLargeError,
        ConflictError,
        ServerBusyError,
        StorageError,
        BundleError,
    )
}
