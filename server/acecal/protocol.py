"""The wire format between the server and its callers (the Python client, the CLI, the 3D Slicer module), defined once.

Stdlib + numpy only, like :mod:`acecal.geometry`: the client and the Slicer extension's copy of it import this module
without torch, SimpleITK or FastAPI. The server builds its replies from these names and types, the client parses
them with the same ones, and the HTTP schemas (``acecal.api.schemas``) are checked against them by the tests.
"""

from __future__ import annotations

#: the result volumes of an inference, in the order they are listed everywhere
VOLUMES = ("labels", "confidence", "uncertainty", "flags")
#: file name of each volume in a result folder (server) or output folder (client, CLI)
VOLUME_FILE_NAMES = {name: f"{name}.nrrd" for name in VOLUMES}
#: the JSON reply of an inference, as written next to the volumes
SUMMARY_NAME = "summary.json"

#: image files an upload may be (single-file formats: a detached header cannot travel alone)
UPLOAD_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")

# --- fine-tuning jobs ------------------------------------------------------------------------------------------------
JOB_QUEUED = "queued"
JOB_RUNNING = "running"
JOB_SUCCEEDED = "succeeded"
JOB_FAILED = "failed"
JOB_CANCELLED = "cancelled"
#: a job in one of these states still holds its dataset and a slot
ACTIVE_JOB_STATUSES = (JOB_QUEUED, JOB_RUNNING)
#: a job in one of these states never changes again
FINAL_JOB_STATUSES = (JOB_SUCCEEDED, JOB_FAILED, JOB_CANCELLED)
JOB_STATUSES = ACTIVE_JOB_STATUSES + FINAL_JOB_STATUSES
