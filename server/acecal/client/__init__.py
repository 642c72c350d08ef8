"""The Python client of the ACECalibration server (requests + numpy only: usable inside 3D Slicer).

    from acecal.client import ACEClient
    with ACEClient("http://127.0.0.1:8000", api_key=None) as c:
        print(c.health())
        res = c.infer("scan.nii.gz", "my-model")           # or c.infer((array_zyx, grid), "my-model")
        res = c.infer("scan.nii.gz")                       # the server's default model (res.model_id says which)
        res.label_map, res.confidence, res.regions, res.grid
        res.summary.uncertain_volume_ml, res.regions[0].centroid_ras

Modules: :mod:`~acecal.client.transport` (HTTP), :mod:`~acecal.client.resources` (one class of methods per server
resource), :mod:`~acecal.client.results` (:class:`InferenceResult` and the wire records of :mod:`acecal.protocol`).
Errors are the classes of :mod:`acecal.errors`: the server's (carrying its message) and, for transport problems,
:class:`ServerUnreachableError`, :class:`ServerTimeoutError` and :class:`ProtocolError`.
"""

from acecal.client.client import ACEClient
from acecal.client.resources import pair_folders
from acecal.client.results import ClassSummary, InferenceReply, InferenceResult, JobInfo, ModelInfo, Region, Summary
from acecal.client.transport import DEFAULT_URL, MultipartBody, ProgressCallback, error_from_response
from acecal.errors import (
    ACECalError,
    ConflictError,
    InvalidInputError,
    ModelNotFoundError,
    NotFoundError,
    PayloadTooLargeError,
    ProtocolError,
    ResultNotFoundError,
    ServerBusyError,
    ServerTimeoutError,
    ServerUnreachableError,
    StorageError,
    UnauthorizedError,
)
from acecal.geometry import Grid
from acecal.protocol import SUMMARY_NAME, VOLUMES

__all__ = [
    "ACEClient",
    "InferenceResult",
    "InferenceReply",
    "ModelInfo",
    "Region",
    "Summary",
    "ClassSummary",
    "JobInfo",
    "MultipartBody",
    "ProgressCallback",
    "DEFAULT_URL",
    "VOLUMES",
    "SUMMARY_NAME",
    "pair_folders",
    "ServerUnreachableError",
    "ServerTimeoutError",
    "ProtocolError",
    "error_from_response",
    "ACECalError",
    "InvalidInputError",
    "ModelNotFoundError",
    "NotFoundError",
    "PayloadTooLargeError",
    "ResultNotFoundError",
    "ServerBusyError",
    "ConflictError",
    "StorageError",
    "UnauthorizedError",
    "Grid",
]
