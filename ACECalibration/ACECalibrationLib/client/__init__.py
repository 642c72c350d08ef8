# Generated from server/acecal/client/__init__.py by ACECalibration/CMake/generate_light_client.py: edit the source.
"""The Python client of the ACECalibration server (requests + numpy only: usable inside 3D Slicer).

    from acecal.client import ACEClient
    with ACEClient("http://127.0.0.1:8000", api_key=None) as c:
        print(c.health())
        res = c.infer("scan.nii.gz", "my-model")           # or c.infer((array_zyx, grid), "my-model")
        res.label_map, res.confidence, res.regions, res.grid

Errors are the classes of :mod:`acecal.errors` (carrying the server's message) plus :class:`ServerUnreachableError`,
:class:`ServerTimeoutError` and :class:`ProtocolError` for transport problems.
"""

from .client import (
    DEFAULT_URL,
    SUMMARY_NAME,
    VOLUMES,
    ACEClient,
    InferenceResult,
    ModelInfo,
    MultipartBody,
    ProgressCallback,
    ProtocolError,
    Region,
    ServerTimeoutError,
    ServerUnreachableError,
    error_from_response,
)
from .errors import (
    ACECalError,
    InvalidInputError,
    ModelNotFoundError,
    NotFoundError,
    PayloadTooLargeError,
    ResultNotFoundError,
    ServerBusyError,
    UnauthorizedError,
)
from .geometry import Grid

__all__ = [
    "ACEClient", "InferenceResult", "ModelInfo", "Region", "MultipartBody", "ProgressCallback", "DEFAULT_URL",
    "VOLUMES", "SUMMARY_NAME", "ServerUnreachableError", "ServerTimeoutError", "ProtocolError", "error_from_response",
    "ACECalError", "InvalidInputError", "ModelNotFoundError", "NotFoundError", "PayloadTooLargeError",
    "ResultNotFoundError", "ServerBusyError", "UnauthorizedError", "Grid",
]
