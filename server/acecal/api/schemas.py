"""Pydantic models of every request and response (they make the OpenAPI schema at ``/openapi.json``)."""

from __future__ import annotations

import json
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from acecal.api.middleware import MAX_JSON_DEPTH, json_depth, too_deep_message
from acecal.errors import InvalidInputError
from acecal.inference.uncertainty import DEFAULT_BAND_VOXELS, DEFAULT_CONNECTIVITY, DEFAULT_MIN_REGION_VOXELS
from acecal.protocol import VolumeName as VolumeName  # re-exported: the result-file routes' path parameter


class ErrorResponse(BaseModel):
    """Every error reply: a stable machine code and a human message saying what to do."""

    error: str = Field(description="machine-readable code, e.g. invalid_input, model_not_found, busy")
    detail: str = Field(description="what was wrong and what to do about it")


#: the ``responses=`` of a FastAPI route: status -> OpenAPI response entry
Responses = dict[Union[int, str], dict[str, Any]]


def busy_response(queue: str) -> Responses:
    """OpenAPI entry for the 503 a full ``queue`` answers, with its Retry-After header."""
    return {
        503: {
            "model": ErrorResponse,
            "description": f"the {queue} is full; retry after Retry-After seconds",
            "headers": {"Retry-After": {"schema": {"type": "integer"}, "description": "seconds"}},
        }
    }


#: OpenAPI entry for the 507 every writing endpoint answers when the data directory's disk is full
DISK_FULL_RESPONSE: Responses = {507: {"model": ErrorResponse, "description": "the server's disk is full"}}


# --- health ----------------------------------------------------------------------------------------------------------
class QueueStats(BaseModel):
    in_flight: int = Field(description="inference requests in progress or waiting")
    running: int = Field(description="forward passes running on the device now")
    capacity: int = Field(description="workers + queue_size: more concurrent requests get 503")
    workers: int
    queue_size: int
    completed: int = Field(description="requests that left their slot, answered or not")
    rejected: int = Field(description="requests refused with 503 because every slot was taken")
    cancelled: int = Field(0, description="requests stopped because their client disconnected")


class HealthResponse(BaseModel):
    status: Literal["ok"] = "ok"
    version: str
    device: str = Field(description="the device inference runs on, e.g. 'cpu' or 'cuda:0 (NVIDIA ...)'")
    auth_required: bool = Field(description="whether endpoints other than /health need 'Authorization: Bearer <key>'")
    max_upload_mb: float
    max_voxels: int = Field(description="voxel values an image may have (checked from its header); more -> 413")
    max_model_voxels: int = Field(
        description="voxels an image may have once resampled to a model's spacing; more -> 413"
    )
    result_ttl_s: float = Field(description="results are deleted this many seconds after they were made")
    queue: QueueStats
    default_model: Optional[str] = Field(
        None,
        description="the model POST /infer runs without a model id: default_model_configured when it is served, "
        "else the first model /models lists; null when there is no model",
    )
    default_model_configured: str = Field(
        description="the configured default model (ACECAL_DEFAULT_MODEL, acecal serve --default-model)"
    )


# --- models ----------------------------------------------------------------------------------------------------------
class ModelInfo(BaseModel):
    id: str
    description: str
    labels: dict[str, str] = Field(description="label value (as a string) -> name; '0' is the background")
    loss: str = Field(description="the training loss by registry name, e.g. hardl1ace_dice_ce")
    loss_params: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict, description="measured validation metrics (Dice, ECE, ...)")
    temperature: Optional[float] = Field(None, description="fitted post-hoc temperature; null = not fitted")
    uncertainty_threshold: float = Field(description="default confidence threshold for uncertain regions")
    modality: str
    in_channels: int
    spacing: list[float] = Field(description="model-space voxel spacing in mm")
    orientation: str
    roi_size: list[int]
    parent: Optional[str] = Field(None, description="id of the model this one was fine-tuned from")
    created: str
    default: bool = Field(False, description="whether this is the model POST /infer runs without a model id")


class ModelsResponse(BaseModel):
    models: list[ModelInfo]
    problems: list[str] = Field(default_factory=list, description="bundles that could not be loaded, and why")


# --- inference -------------------------------------------------------------------------------------------------------
class InferParams(BaseModel):
    """The optional ``params`` form field of ``POST /infer/{model_id}`` and ``POST /infer`` (a JSON object; unknown keys
    are refused)."""

    model_config = ConfigDict(extra="forbid")

    uncertainty_threshold: Optional[float] = Field(
        None,
        gt=0.0,
        le=1.0,
        description="confidence below which boundary voxels are flagged; default: the model's own threshold",
    )
    overlap: Optional[float] = Field(None, ge=0.0, lt=1.0, description="sliding-window overlap; default: the model's")
    use_calibrator: Optional[bool] = Field(
        None,
        description="apply the model's post-hoc calibrator (a fitted temperature or local temperature scaling; it "
        "never changes the label map); default: use_temperature, which defaults to true",
    )
    use_temperature: bool = Field(True, description="the older name of use_calibrator (used when that is not set)")
    band_mm: Optional[float] = Field(
        None,
        ge=0.0,
        le=1000.0,
        description="half-width of the band around predicted boundaries, in mm; overrides band_voxels",
    )
    band_voxels: float = Field(
        DEFAULT_BAND_VOXELS,
        ge=0.0,
        le=1000.0,
        description="half-width of the boundary band in voxel steps (when band_mm is unset)",
    )
    min_region_voxels: int = Field(
        DEFAULT_MIN_REGION_VOXELS, ge=1, le=10**9, description="uncertain regions smaller than this are dropped"
    )
    connectivity: Literal[6, 18, 26] = Field(DEFAULT_CONNECTIVITY, description="voxel connectivity of regions")
    tta: Optional[Literal["none", "axis_flips", "all_flips"]] = Field(
        None,
        description="flip test-time augmentation (softmax averaged over flips; changes the label map); "
        "default: the model's own setting",
    )
    compress: bool = Field(False, description="gzip the float volumes too (the masks always are)")

    @classmethod
    def from_form(cls, raw: Optional[str]) -> InferParams:
        """Parse the form field; any problem is an :class:`InvalidInputError` (422) naming the offending key."""
        if raw is None or not raw.strip():
            return cls()
        depth = json_depth(raw)
        if depth > MAX_JSON_DEPTH:
            raise InvalidInputError(too_deep_message(depth, "params"))
        try:
            data = json.loads(raw)
        except RecursionError:  # nesting the depth count above missed (it cannot, but never a 500)
            raise InvalidInputError(too_deep_message(depth, "params")) from None
        except ValueError as e:
            raise InvalidInputError(
                f"params is not valid JSON ({str(e)[:200]}); send a JSON object such as "
                '{"uncertainty_threshold": 0.7}'
            ) from None
        if not isinstance(data, dict):
            raise InvalidInputError('params must be a JSON object such as {"uncertainty_threshold": 0.7}')
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            msgs = "; ".join(f"{'.'.join(str(x) for x in err['loc']) or 'params'}: {err['msg']}" for err in e.errors())
            raise InvalidInputError(f"invalid params: {msgs}") from None


class EffectiveParams(BaseModel):
    """The parameters actually used, defaults filled in."""

    uncertainty_threshold: float
    overlap: float
    use_temperature: bool
    use_calibrator: bool = Field(
        description="whether the model's post-hoc calibrator was applied (use_temperature is its older name)"
    )
    band_mm: Optional[float]
    band_voxels: float
    min_region_voxels: int
    connectivity: int
    tta: str = Field(description="flip test-time augmentation: none, axis_flips or all_flips")


class GridModel(BaseModel):
    """An image grid in LPS (as in image files): size (i, j, k), spacing mm, origin mm, direction (row-major 3x3)."""

    size: list[int] = Field(min_length=3, max_length=3)
    spacing: list[float] = Field(min_length=3, max_length=3)
    origin: list[float] = Field(min_length=3, max_length=3)
    direction: list[float] = Field(min_length=9, max_length=9)


class ClassSummary(BaseModel):
    value: int
    name: str
    voxels: int
    volume_ml: float
    mean_confidence: Optional[float] = Field(description="mean confidence over voxels predicted as this class")
    uncertain_voxels: int
    uncertain_volume_ml: float


class Summary(BaseModel):
    classes: list[ClassSummary]
    mean_confidence: float
    uncertain_voxels: int
    uncertain_volume_ml: float
    voxel_volume_ml: float
    region_count: int
    temperature: Optional[float] = Field(description="the temperature applied; null when none was")
    calibrator: Optional[str] = Field(None, description="the kind of post-hoc calibrator applied; null when none was")


class Box(BaseModel):
    min: list[float]
    max: list[float]


class IndexBox(BaseModel):
    min: list[int]
    max: list[int]


class Region(BaseModel):
    """One uncertain boundary region (a connected component of flagged voxels)."""

    model_config = ConfigDict(populate_by_name=True)

    id: int
    class_: int = Field(alias="class", description="the foreground class whose boundary the region is on")
    class_name: str
    voxels: int
    volume_ml: float
    mean_confidence: float
    min_confidence: float
    centroid_ijk: list[float] = Field(description="continuous voxel index (i, j, k)")
    centroid_lps: list[float]
    centroid_ras: list[float]
    bbox_ijk: IndexBox = Field(description="inclusive voxel index range")
    bbox_lps: Box = Field(description="axis-aligned LPS box enclosing the region's voxels (edges included)")
    bbox_ras: Box = Field(description="the same in RAS (as 3D Slicer shows coordinates)")


class ResultFiles(BaseModel):
    """URL paths (relative to the server) of the result volumes, NRRD on the input's exact grid."""

    labels: str = Field(description="uint8 label map")
    confidence: str = Field(description="float32 calibrated probability of the predicted class")
    uncertainty: str = Field(description="float32 normalised entropy in [0, 1]")
    flags: str = Field(description="uint8 mask of the uncertain boundary regions")


class InferResponse(BaseModel):
    result_id: str
    model_id: str
    labels: dict[str, str]
    grid: GridModel
    summary: Summary
    regions: list[Region]
    params: EffectiveParams
    files: ResultFiles
    timings: dict[str, float]
    created: str
    expires_at: str
    expires_in_s: float


class DeleteResponse(BaseModel):
    result_id: str
    deleted: bool = True
