"""Pydantic models of the dataset, fine-tuning job and evaluation endpoints (part of ``/openapi.json``)."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

from acecal.bundles.bundle import ID_PATTERN
from acecal.protocol import FinetuneLoss as LossName, JobStatus
from acecal.storage.datasets import clean_text

#: upper bound of ``epochs`` in the schema; the server's own limit (``ACECAL_JOB_MAX_EPOCHS``) may be lower
EPOCHS_LIMIT = 10000
#: upper bound of each training patch side in voxels (the model's divisibility is checked at submission)
PATCH_SIDE_LIMIT = 512


def _clean_text(value: str, what: str, limit: int) -> str:
    """Names and descriptions travel into model cards and logs: one printable line, like file names."""
    cleaned = clean_text(value, limit)
    if not cleaned:
        raise ValueError(f"{what} must hold some printable characters")
    return cleaned


# --- datasets --------------------------------------------------------------------------------------------------------
class DatasetCreate(BaseModel):
    """``POST /datasets``."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(
        min_length=1,
        max_length=200,
        description="a name for people; need not be unique (control and bidi characters become '?')",
    )
    model: Optional[str] = Field(
        None,
        max_length=200,
        description="a model id whose labels every case must use: uploads with other label values are refused at "
        "once. Without it label values are checked when a fine-tuning job is submitted.",
    )

    @field_validator("name")
    @classmethod
    def _printable(cls, v: str) -> str:
        return _clean_text(v, "name", 200)


class CaseInfo(BaseModel):
    case_id: str
    name: str = Field(description="the uploaded image's file name (display only; files get server-chosen names)")
    size: Optional[list[int]] = Field(None, description="image size (i, j, k) in voxels")
    spacing: Optional[list[float]] = Field(None, description="voxel spacing in mm")
    label_values: list[int] = Field(default_factory=list, description="the values present in the label map")
    bytes: Optional[int] = Field(None, description="stored size of image + label")
    created: str


class DatasetSummary(BaseModel):
    id: str
    name: str
    model: Optional[str] = Field(None, description="the model whose labels the cases are checked against, if any")
    num_cases: int
    created: str


class DatasetInfo(DatasetSummary):
    cases: list[CaseInfo]


class DatasetsResponse(BaseModel):
    datasets: list[DatasetSummary]


class DatasetCreated(BaseModel):
    id: str
    name: str
    model: Optional[str] = None
    created: str


class CaseCreated(CaseInfo):
    dataset: str


class Deleted(BaseModel):
    id: str
    deleted: bool = True


# --- fine-tuning -----------------------------------------------------------------------------------------------------
class FinetuneRequest(BaseModel):
    """``POST /finetune``: fine-tune ``base_model`` on a stored dataset and publish the result as a new model."""

    model_config = ConfigDict(extra="forbid")

    base_model: str = Field(min_length=1, max_length=200, description="id of the model to start from (GET /models)")
    dataset: str = Field(min_length=1, max_length=200, description="id of a stored dataset (POST /datasets)")
    loss: LossName = Field("hardl1ace_dice_ce", description="training loss by registry name")
    epochs: int = Field(
        20, ge=1, le=EPOCHS_LIMIT, description="training epochs (the server may cap this: ACECAL_JOB_MAX_EPOCHS)"
    )
    lr: Optional[float] = Field(None, gt=0.0, le=1.0, description="learning rate (default 5e-5)")
    freeze_encoder: bool = Field(False, description="train the decoder only")
    val_fraction: float = Field(
        0.2,
        gt=0.0,
        lt=1.0,
        description="share of the cases held out for validation (at least one case; at least one left to train on)",
    )
    val_cases: Optional[list[str]] = Field(
        None, max_length=10000, description="case ids to hold out for validation (instead of val_fraction)"
    )
    val_every: Optional[int] = Field(
        None,
        ge=1,
        le=EPOCHS_LIMIT,
        description="validate every N epochs (default: about 20 validations per job, and always after the last epoch)",
    )
    batch_size: Optional[int] = Field(None, ge=1, le=64, description="volumes per step (default 2)")
    num_samples: Optional[int] = Field(None, ge=1, le=32, description="patches per volume per step (default 2)")
    patch_size: Optional[list[Annotated[int, Field(ge=1, le=PATCH_SIDE_LIMIT)]]] = Field(
        None,
        min_length=3,
        max_length=3,
        description=f"training patch (x, y, z) in voxels, each 1..{PATCH_SIDE_LIMIT} and divisible as the base "
        "model's network needs (default: the base model's ROI)",
    )
    loss_params: dict[str, Union[float, int, bool, str]] = Field(
        default_factory=dict, description="extra loss parameters, e.g. ace_weight"
    )
    fit_temperature: bool = Field(False, description="fit a temperature on the validation cases")
    seed: Optional[int] = Field(None, ge=0, le=2**31 - 1, description="random seed (split, sampling)")
    model_id: Optional[str] = Field(
        None, pattern=ID_PATTERN, description="id of the new model (default: <base>-ft-<job>)"
    )
    description: Optional[str] = Field(
        None, max_length=500, description="description for the model card (control and bidi characters become '?')"
    )

    @field_validator("description")
    @classmethod
    def _printable(cls, v: Optional[str]) -> Optional[str]:
        return None if v is None else _clean_text(v, "description", 500)


class JobAccepted(BaseModel):
    job_id: str
    status: JobStatus
    model_id: str = Field(description="the id the new model will have when the job succeeds")
    url: str = Field(description="poll this: GET /jobs/{job_id}")


class JobProgress(BaseModel):
    epoch: int = Field(description="finished epochs")
    epochs: int
    step: Optional[int] = Field(None, description="training steps done in the current epoch")
    steps: Optional[int] = Field(None, description="training steps per epoch")
    fraction: float = Field(description="0..1")


class EpochMetrics(BaseModel):
    """One finished epoch: training loss, and validation metrics when that epoch was validated (else null)."""

    model_config = ConfigDict(extra="allow")

    epoch: int
    train_loss: Optional[float] = None
    lr: Optional[float] = None
    seconds: Optional[float] = None
    dice: Optional[float] = None
    ace: Optional[float] = None
    ece: Optional[float] = None
    mce: Optional[float] = None


class JobInfo(BaseModel):
    id: str
    kind: Literal["finetune"] = "finetune"
    status: JobStatus
    base_model: Optional[str]
    dataset: Optional[str]
    loss: Optional[str]
    epochs: int
    progress: JobProgress
    metrics: list[EpochMetrics] = Field(description="per finished epoch, in order")
    final_metrics: Optional[dict[str, Any]] = Field(
        None, description="validation metrics of the published weights (when succeeded)"
    )
    model_id: Optional[str] = Field(None, description="the new model's id (only when succeeded)")
    target_model_id: Optional[str] = Field(None, description="the id the new model gets when the job succeeds")
    error: Optional[str] = Field(None, description="why the job failed (or was cancelled)")
    log_tail: list[str] = Field(default_factory=list, description="the last lines of the job's log")
    queue_position: Optional[int] = Field(None, description="1 = next to run (queued jobs only)")
    attempts: int = Field(description="how many times the job process was started (resumes count)")
    cancel_requested: bool = False
    pid: Optional[int] = Field(None, description="the job process (running jobs only)")
    created: str
    started: Optional[str] = None
    finished: Optional[str] = None
    rev: int = Field(description="changes whenever the job does: pass it back as ?after= to long-poll")
    request: dict[str, Any] = Field(default_factory=dict, description="the accepted request, defaults filled in")


class JobsResponse(BaseModel):
    jobs: list[JobInfo]
    running: int
    queued: int
    slots: int = Field(description="jobs that run at once (one per device by default)")
    queue_size: int = Field(description="queued jobs accepted beyond the running ones; more get 503")


# --- evaluation ------------------------------------------------------------------------------------------------------
class EvaluateRequest(BaseModel):
    """``POST /evaluate/{model_id}``."""

    model_config = ConfigDict(extra="forbid")

    dataset: str = Field(min_length=1, max_length=200, description="id of a stored dataset")
    temperature: bool = Field(
        False,
        description="insist on the model's post-hoc calibrator, e.g. a fitted "
        "temperature (an error if it has none; applied by default anyway)",
    )
    raw: bool = Field(
        False,
        description="evaluate the network's own softmax (no post-hoc calibrator); default: the "
        "probabilities the server serves",
    )
    cases: Optional[list[str]] = Field(
        None, min_length=1, max_length=10000, description="evaluate only these case ids (default: all)"
    )


class Metrics4(BaseModel):
    dice: Optional[float] = None
    ace: Optional[float] = None
    ece: Optional[float] = None
    mce: Optional[float] = None


class ClassMetrics(Metrics4):
    label: int
    cases_present: int
    floor_ace: Optional[float] = Field(None, description="expected ACE of a perfectly calibrated model, this class")
    removable_ace: Optional[float] = Field(None, description="ace - floor_ace")
    micro_ace: Optional[float] = None


class CaseMetrics(Metrics4):
    case_id: str
    name: str
    figure: Optional[str] = Field(None, description="URL path of the case's reliability diagram (PNG)")
    floor_ace: Optional[float] = None
    auroc: Optional[float] = None
    recall: Optional[float] = None
    flagged_over_wrong: Optional[float] = None


class FloorValues(BaseModel):
    ace: Optional[float] = None
    ece: Optional[float] = None
    mce: Optional[float] = None
    removable_ace: Optional[float] = Field(None, description="measured ACE - floor ACE")


class Floor(FloorValues):
    """The expected errors of a perfectly calibrated model with the served probabilities (labels drawn from them)."""

    micro: FloorValues = Field(default_factory=FloorValues, description="the same for the pooled (micro) metrics")
    note: str = ""


class Detection(BaseModel):
    auroc: Optional[float] = Field(None, description="AUROC of 1 - confidence for 'voxel is wrong' within the ROI")
    auroc_max_error: Optional[float] = None
    recall: Optional[float] = Field(None, description="wrong volume inside the flags / wrong volume")
    flagged_over_wrong: Optional[float] = Field(None, description="flagged volume / wrong volume")
    precision: Optional[float] = None
    wrong_ml: float = 0.0
    flagged_ml: float = 0.0
    flagged_wrong_ml: float = 0.0
    wrong_voxels: int = 0
    flagged_voxels: int = 0
    flagged_wrong_voxels: int = 0
    roi_voxels: int = 0


class ErrorDetection(Detection):
    """Do the served flags find the wrong voxels? (ROI: predicted or true foreground, dilated)"""

    per_class: dict[str, Detection] = Field(default_factory=dict)
    roi_radius_voxels: float = 0.0
    flags: dict[str, Any] = Field(default_factory=dict, description="threshold, band and minimum region of the flags")
    note: str = ""


class EvaluationFigures(BaseModel):
    dataset_histogram: Optional[str] = Field(None, description="URL path of the dataset reliability histogram")
    cases: dict[str, str] = Field(default_factory=dict, description="case id -> URL path of its reliability diagram")


class EvaluationResponse(BaseModel):
    evaluation_id: str
    model_id: str
    dataset: str
    temperature: Optional[float] = Field(None, description="the temperature applied, if any")
    raw: bool = Field(False, description="the network's own softmax was evaluated (no post-hoc calibrator)")
    calibrator: Optional[str] = Field(None, description="the post-hoc calibrator applied, if any")
    num_cases: int
    aggregate: Metrics4 = Field(description="macro: mean over cases of the mean over foreground classes present")
    aggregate_std: Metrics4
    micro: Metrics4 = Field(description="all voxels pooled")
    floor: Optional[Floor] = Field(None, description="the ACE floor and the removable part")
    error_detection: Optional[ErrorDetection] = Field(None, description="how well the served flags find the errors")
    per_class: dict[str, ClassMetrics]
    cases: list[CaseMetrics]
    figures: EvaluationFigures
    note: str
    seconds: float
    created: str
