"""Every key the Lib reads from the server's JSON replies, in one place.

The names are the server's (``server/acecal/api/schemas.py``, ``server/acecal/api/finetune_schemas.py``; regions from
``acecal.inference.uncertainty.describe_regions``, the summary from ``summarize``; docs/api.md). Nothing in the Lib
guesses between spellings: a key renamed on the server is renamed here, and the live-server tests fail until it is.
When the wire format gets a module of its own on the server side (stdlib + numpy, so it can join the light client's
sources in ``ACECalibration/CMake/generate_light_client.py``), these names should be imported from the copy
(``from .client.protocol import ...``) instead of being spelled out here.
"""

from __future__ import annotations

# --- GET /health --------------------------------------------------------------------------------------------------
HEALTH_VERSION = "version"
HEALTH_DEVICE = "device"
HEALTH_AUTH_REQUIRED = "auth_required"

# --- GET /models (ModelInfo; the client's ``ModelInfo.raw``) ----------------------------------------------------------
MODEL_ID = "id"
MODEL_LABELS = "labels"  # {"0": "background", "1": name, ...}: label value as a string -> name
MODEL_DESCRIPTION = "description"
MODEL_LOSS = "loss"
MODEL_METRICS = "metrics"
MODEL_UNCERTAINTY_THRESHOLD = "uncertainty_threshold"
BACKGROUND_LABEL = "0"

# --- POST /infer: one entry of ``regions`` ----------------------------------------------------------------------------
REGION_ID = "id"
REGION_CLASS = "class"  # label value (int) of the class whose boundary the region sits on
REGION_CLASS_NAME = "class_name"
REGION_VOXELS = "voxels"
REGION_VOLUME_ML = "volume_ml"
REGION_MEAN_CONFIDENCE = "mean_confidence"
REGION_MIN_CONFIDENCE = "min_confidence"
REGION_CENTROID_RAS = "centroid_ras"  # mm, the input's (local) RAS

# --- POST /infer: ``summary`` and its ``classes`` ------------------------------------------------------------------
SUMMARY_CLASSES = "classes"
SUMMARY_MEAN_CONFIDENCE = "mean_confidence"
SUMMARY_UNCERTAIN_VOLUME_ML = "uncertain_volume_ml"
SUMMARY_REGION_COUNT = "region_count"
CLASS_VALUE = "value"
CLASS_NAME = "name"
CLASS_VOXELS = "voxels"
CLASS_VOLUME_ML = "volume_ml"
CLASS_MEAN_CONFIDENCE = "mean_confidence"  # null for a class absent from the image

# --- datasets, fine-tuning jobs, evaluation ---------------------------------------------------------------------------
DATASET_ID = "id"
JOB_ACCEPTED_ID = "job_id"
JOB_STATUS = "status"
JOB_PROGRESS = "progress"
JOB_PROGRESS_EPOCH = "epoch"
JOB_PROGRESS_EPOCHS = "epochs"
JOB_PROGRESS_FRACTION = "fraction"
JOB_EPOCHS = "epochs"
JOB_METRICS = "metrics"  # per finished epoch: {"epoch", "train_loss", "dice", "ace", "ece", "mce", ...}
JOB_TRAIN_LOSS = "train_loss"
JOB_MODEL_ID = "model_id"
JOB_ERROR = "error"
JOB_REV = "rev"
JOB_SUCCEEDED, JOB_FAILED, JOB_CANCELLED = "succeeded", "failed", "cancelled"
JOB_FINAL_STATUSES = (JOB_SUCCEEDED, JOB_FAILED, JOB_CANCELLED)
EVAL_AGGREGATE = "aggregate"
EVAL_FIGURES = "figures"
EVAL_FIGURES_CASES = "cases"  # case id -> URL path of its reliability diagram
EVAL_NUM_CASES = "num_cases"
METRIC_NAMES = ("dice", "ace", "ece", "mce")
