# Generated from server/acecal/client/client.py by ACECalibration/CMake/generate_light_client.py: edit the source.
"""ACEClient: the one HTTP client of the ACECalibration server (requests + numpy; no torch, monai, SimpleITK, FastAPI).

Used by scripts, by the ``acecal`` remote commands and by the 3D Slicer module (through the extension's generated
copy). It is the transport (:mod:`acecal.client.transport`: timeouts, safe retries, typed errors, streamed uploads
and downloads) plus one class of methods per resource (:mod:`acecal.client.resources`); replies are parsed with the
wire records of :mod:`acecal.protocol` (:mod:`acecal.client.results`).
"""

from __future__ import annotations

from .resources import DatasetResources, EvaluationResources, JobResources, ModelResources


class ACEClient(ModelResources, DatasetResources, JobResources, EvaluationResources):
    """Client of one ACECalibration server.

    Args:
        server_url: e.g. ``http://127.0.0.1:8000`` (``http://`` is added when no scheme is given).
        api_key: the server's key, sent as ``Authorization: Bearer``; default ``ACECAL_API_KEY`` from the environment.
        timeout: ``(connect, read)`` seconds. The read timeout bounds each wait for data, including the wait for an
            inference reply: raise it for very large volumes on a CPU server.
        retries: attempts after the first for safe requests (see :mod:`acecal.client.transport`).
        busy_retries: how many times ``infer`` waits ``Retry-After`` and tries again when the server is busy.
        session: a ``requests.Session`` to use (a new one by default).

    Methods by resource: :class:`~acecal.client.resources.ModelResources` (``health``, ``check``, ``models``,
    ``default_model``, ``model``, ``infer``, ``fetch_volumes``, ``result``, ``delete_result``),
    :class:`~acecal.client.resources.DatasetResources` (``create_dataset``, ``datasets``, ``dataset``,
    ``delete_dataset``, ``add_case``, ``delete_case``, ``upload_dataset``),
    :class:`~acecal.client.resources.JobResources` (``finetune``, ``jobs``, ``job``, ``cancel_job``, ``wait_job``),
    :class:`~acecal.client.resources.EvaluationResources` (``evaluate``); for other paths ``request``,
    ``get_json``, ``post_json``, ``post_multipart``, ``delete``, ``download``.
    """

    def __enter__(self) -> ACEClient:
        return self
