# Generated from server/acecal/protocol.py by ACECalibration/CMake/generate_light_client.py: edit the source.
"""The wire format between the server and its callers (the Python client, the CLI, the 3D Slicer module), defined once.

Stdlib + numpy only, like :mod:`acecal.geometry`: the client and the Slicer extension's copy of it import this module
without torch, SimpleITK or FastAPI. It holds

- the names: result volumes and their files, upload suffixes, job states, the keys of replies read by key;
- the records: :class:`Region`, :class:`ClassSummary`, :class:`Summary`, :class:`InferenceReply` (``POST /infer``),
  :class:`ModelInfo` (``GET /models``), :class:`JobInfo` with :class:`JobProgress` and :class:`EpochMetrics`
  (``GET /jobs/{id}``) and :class:`JobEvent` (the training engine's progress events, one JSON line each).

Each record is a dataclass whose fields are its JSON keys (one exception, spelled out in the field: ``Region.
class_value`` is ``"class"``, a Python keyword). ``Record.from_json`` checks types and required keys and raises
:class:`acecal.errors.ProtocolError` naming the first problem; keys it does not know are kept in ``extra`` (a newer
server's additions survive a round trip) and ``to_json`` writes them back. The server's pydantic schemas
(``acecal.api.schemas``, ``acecal.api.finetune_schemas``) are tested to have exactly these keys
(``Testing/test_protocol.py``), so the OpenAPI document and this module cannot drift apart.
"""

from __future__ import annotations

import json
import math
from dataclasses import MISSING, Field, dataclass, field, fields
from typing import Any, Callable, ClassVar, Dict, List, Literal, Mapping, Optional, Tuple, Type, TypeVar, get_args

from .errors import ProtocolError
from .geometry import Grid

# ==================================================================================================== names
#: a result volume's name
VolumeName = Literal["labels", "confidence", "uncertainty", "flags"]
#: the result volumes of an inference, in the order they are listed everywhere
VOLUMES: Tuple[str, ...] = get_args(VolumeName)
#: file name of each volume in a result folder (server) or output folder (client, CLI)
VOLUME_FILE_NAMES = {name: f"{name}.nrrd" for name in VOLUMES}
#: the JSON reply of an inference, as written next to the volumes
SUMMARY_NAME = "summary.json"

#: image files an upload may be (single-file formats: a detached header cannot travel alone)
UPLOAD_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")
#: headers whose voxel data live in another file: readable from disk, never uploaded
DETACHED_HEADER_SUFFIXES = (".nhdr", ".mhd")
#: every image file name ending the project reads
IMAGE_SUFFIXES = UPLOAD_SUFFIXES + DETACHED_HEADER_SUFFIXES

#: the background's label value, as the key of a model's ``labels``
BACKGROUND_LABEL = "0"
#: the calibration and overlap metrics every evaluation and validation reports, in this order
METRIC_NAMES = ("dice", "ace", "ece", "mce")


def image_stem(file_name: str, suffixes: Tuple[str, ...] = IMAGE_SUFFIXES) -> Optional[str]:
    """``case_01.nii.gz`` -> ``case_01``: the name without its image ending (any case); None when it has none."""
    low = file_name.lower()
    for s in suffixes:
        if low.endswith(s):
            return file_name[: -len(s)]
    return None


# --- fine-tuning jobs ------------------------------------------------------------------------------------------------
#: a job's state
JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
JOB_STATUSES: Tuple[str, ...] = get_args(JobStatus)
JOB_QUEUED, JOB_RUNNING, JOB_SUCCEEDED, JOB_FAILED, JOB_CANCELLED = JOB_STATUSES
#: a job in one of these states still holds its dataset and a slot
ACTIVE_JOB_STATUSES = (JOB_QUEUED, JOB_RUNNING)
#: a job in one of these states never changes again
FINAL_JOB_STATUSES = (JOB_SUCCEEDED, JOB_FAILED, JOB_CANCELLED)
#: the training losses a fine-tuning job may use (names of ``acecal.losses.registry``)
FinetuneLoss = Literal[
    "baseline_dice_ce",
    "hardl1ace_dice_ce",
    "softl1ace_dice_ce",
    "labelsmooth_dice_ce",
    "nacl_dice",
    "twohead_dice_ce_softace",  # two-head models only (hardl1ace_dice_ce / softl1ace_dice_ce become these for them)
    "twohead_dice_ce_hardace",
]
FINETUNE_LOSSES: Tuple[str, ...] = get_args(FinetuneLoss)

# --- keys of the replies callers read by key (the rest are records below) ---------------------------------------------
#: ``GET /health``
HEALTH_VERSION, HEALTH_DEVICE, HEALTH_AUTH_REQUIRED = "version", "device", "auth_required"
#: ``GET /health``: the model ``POST /infer`` runs without a model id (null: none), and the configured one
HEALTH_DEFAULT_MODEL, HEALTH_DEFAULT_MODEL_CONFIGURED = "default_model", "default_model_configured"
#: ``POST /datasets`` and ``GET /datasets/{id}``: the dataset's id and case count
DATASET_ID, DATASET_NUM_CASES = "id", "num_cases"
#: ``POST /finetune``: the new job's id
JOB_ACCEPTED_ID = "job_id"
#: ``POST /evaluate/{model}``: macro metrics (``METRIC_NAMES``), the number of cases, and the figures' URL paths
#: ``{"dataset_histogram": URL, "cases": {case id: URL}}``
EVAL_AGGREGATE, EVAL_NUM_CASES, EVAL_FIGURES = "aggregate", "num_cases", "figures"
EVAL_FIGURES_DATASET, EVAL_FIGURES_CASES = "dataset_histogram", "cases"


# ==================================================================================================== records
def _fail(what: str, value: Any) -> ProtocolError:
    shown = repr(value)
    return ProtocolError(f"{what}, got {shown[:80] + '...' if len(shown) > 80 else shown}")


def _int(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(v, float) and not v.is_integer()):
        raise _fail("expected an integer", v)
    return int(v)


def _float(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise _fail("expected a finite number", v)
    return float(v)


def _str(v: Any) -> str:
    if not isinstance(v, str):
        raise _fail("expected a string", v)
    return v


def _bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise _fail("expected true or false", v)
    return v


def _object(v: Any) -> Dict[str, Any]:
    if not isinstance(v, Mapping):
        raise _fail("expected a JSON object", v)
    return dict(v)


def _optional(parse: Callable[[Any], Any]) -> Callable[[Any], Any]:
    return lambda v: None if v is None else parse(v)


def _list(parse: Callable[[Any], Any], length: Optional[int] = None) -> Callable[[Any], List[Any]]:
    def parse_list(v: Any) -> List[Any]:
        if not isinstance(v, (list, tuple)) or (length is not None and len(v) != length):
            raise _fail(f"expected a list{f' of {length}' if length else ''}", v)
        return [parse(x) for x in v]

    return parse_list


def _str_map(v: Any) -> Dict[str, str]:
    return {_str(k): _str(x) for k, x in _object(v).items()}


def _float_map(v: Any) -> Dict[str, float]:
    return {_str(k): _float(x) for k, x in _object(v).items()}


def _box(parse: Callable[[Any], Any]) -> Callable[[Any], Dict[str, List[Any]]]:
    """``{"min": [x, y, z], "max": [x, y, z]}``."""

    def parse_box(v: Any) -> Dict[str, List[Any]]:
        d = _object(v)
        if set(d) != {"min", "max"}:
            raise _fail('expected {"min": [...], "max": [...]}', v)
        return {k: _list(parse, 3)(d[k]) for k in ("min", "max")}

    return parse_box


def _grid(v: Any) -> Grid:
    try:
        return Grid.from_dict(_object(v))
    except (KeyError, TypeError, ValueError) as e:
        raise _fail(f"expected a grid {{size, spacing, origin, direction}} ({e})", v) from None


def _wire(
    parse: Callable[[Any], Any], *, key: Optional[str] = None, default: Any = MISSING, default_factory: Any = MISSING
) -> Any:
    """A record field: ``parse`` checks and converts the JSON value; ``key`` is the JSON key when it is not the
    field's name. Without a default the key is required."""
    return field(default=default, default_factory=default_factory, metadata={"parse": parse, "key": key})


R = TypeVar("R", bound="Record")


def _record_fields(record: Any) -> Tuple[Field[Any], ...]:
    """The dataclass fields of a record or record class (every :class:`Record` subclass is a dataclass)."""
    return fields(record)


class Record:
    """Base of the wire records: JSON in and out, driven by the dataclass fields (see the module docstring)."""

    extra: Dict[str, Any]

    @classmethod
    def json_keys(cls) -> Tuple[str, ...]:
        """The record's JSON keys, in field order."""
        return tuple(f.metadata.get("key") or f.name for f in _record_fields(cls) if f.name != "extra")

    @classmethod
    def from_json(cls: Type[R], data: Any) -> R:
        """The record from a decoded JSON object; :class:`~acecal.errors.ProtocolError` names what does not fit."""
        if not isinstance(data, Mapping):
            raise _fail(f"{cls.__name__}: expected a JSON object", data)
        values: Dict[str, Any] = {}
        known = set()
        for f in _record_fields(cls):
            if f.name == "extra":
                continue
            key = f.metadata.get("key") or f.name
            known.add(key)
            if key not in data:
                if f.default is MISSING and f.default_factory is MISSING:
                    raise ProtocolError(f"{cls.__name__}: the key {key!r} is missing")
                continue
            try:
                values[f.name] = f.metadata["parse"](data[key])
            except ProtocolError as e:
                raise ProtocolError(f"{cls.__name__}.{key}: {e.detail}") from None
        return cls(**values, extra={k: v for k, v in data.items() if k not in known})  # type: ignore[call-arg]

    def to_json(self) -> Dict[str, Any]:
        """The JSON object (plain dicts, lists, numbers and strings), unknown keys of the source included."""
        out = {
            f.metadata.get("key") or f.name: _plain(getattr(self, f.name))
            for f in _record_fields(self)
            if f.name != "extra"
        }
        out.update(self.extra)
        return out

    @property
    def raw(self) -> Dict[str, Any]:
        """The record as JSON (:meth:`to_json`)."""
        return self.to_json()


def _plain(v: Any) -> Any:
    if isinstance(v, Record):
        return v.to_json()
    if isinstance(v, Grid):
        return v.to_dict()
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v


def _records(cls: Type[R]) -> Callable[[Any], List[R]]:
    return _list(cls.from_json)


# --- inference -------------------------------------------------------------------------------------------------------
@dataclass
class Region(Record):
    """One uncertain boundary region (a connected component of flagged voxels). Coordinates in mm, boxes
    ``{"min": [x, y, z], "max": [x, y, z]}`` with the voxels' edges included; ``*_ijk`` in voxel indices."""

    id: int = _wire(_int)
    class_value: int = _wire(_int, key="class")  # the foreground class whose boundary the region is on
    class_name: str = _wire(_str)
    voxels: int = _wire(_int)
    volume_ml: float = _wire(_float)
    mean_confidence: float = _wire(_float)
    centroid_lps: List[float] = _wire(_list(_float, 3))
    centroid_ras: List[float] = _wire(_list(_float, 3))
    bbox_lps: Dict[str, List[float]] = _wire(_box(_float))
    bbox_ras: Dict[str, List[float]] = _wire(_box(_float))
    min_confidence: Optional[float] = _wire(_optional(_float), default=None)
    centroid_ijk: Optional[List[float]] = _wire(_optional(_list(_float, 3)), default=None)
    bbox_ijk: Optional[Dict[str, List[int]]] = _wire(_optional(_box(_int)), default=None)
    extra: Dict[str, Any] = field(default_factory=dict, repr=False)


@dataclass
class ClassSummary(Record):
    """One class of the label map: its volume, mean confidence (None when absent) and uncertain part."""

    value: int = _wire(_int)
    name: str = _wire(_str)
    voxels: int = _wire(_int)
    volume_ml: float = _wire(_float)
    mean_confidence: Optional[float] = _wire(_optional(_float))
    uncertain_voxels: int = _wire(_int)
    uncertain_volume_ml: float = _wire(_float)
    extra: Dict[str, Any] = field(default_factory=dict, repr=False)


@dataclass
class Summary(Record):
    """The inference's summary: per class, overall confidence and flagged volume, the calibration applied."""

    classes: List[ClassSummary] = _wire(_records(ClassSummary))
    mean_confidence: float = _wire(_float)
    uncertain_voxels: int = _wire(_int)
    uncertain_volume_ml: float = _wire(_float)
    voxel_volume_ml: float = _wire(_float)
    region_count: int = _wire(_int)
    temperature: Optional[float] = _wire(_optional(_float), default=None)  # the temperature applied, if any
    calibrator: Optional[str] = _wire(_optional(_str), default=None)  # the post-hoc calibrator applied, if any
    extra: Dict[str, Any] = field(default_factory=dict, repr=False)


@dataclass
class InferenceReply(Record):
    """``POST /infer/{model_id}`` and ``GET /results/{id}``, also ``summary.json`` next to the volumes.

    ``files``: volume name -> URL path on the server (local file names in a ``summary.json``); ``params``: the
    inference parameters with the model's defaults filled in; ``result_id`` is None for in-process inference.
    """

    result_id: Optional[str] = _wire(_optional(_str))
    model_id: str = _wire(_str)
    labels: Dict[str, str] = _wire(_str_map)  # label value as a string -> class name; "0" is the background
    grid: Grid = _wire(_grid)  # the input's grid (LPS): every volume lies on it
    summary: Summary = _wire(Summary.from_json)
    files: Dict[str, str] = _wire(_str_map)
    regions: List[Region] = _wire(_records(Region), default_factory=list)
    params: Dict[str, Any] = _wire(_object, default_factory=dict)
    timings: Dict[str, float] = _wire(_float_map, default_factory=dict)
    created: Optional[str] = _wire(_optional(_str), default=None)
    expires_at: Optional[str] = _wire(_optional(_str), default=None)
    expires_in_s: Optional[float] = _wire(_optional(_float), default=None)
    extra: Dict[str, Any] = field(default_factory=dict, repr=False)


# --- models ----------------------------------------------------------------------------------------------------------
@dataclass
class ModelInfo(Record):
    """A model as ``GET /models`` describes it (``default``: the one ``POST /infer`` runs without a model id)."""

    id: str = _wire(_str)
    labels: Dict[str, str] = _wire(_str_map)  # label value as a string -> class name; "0" is the background
    description: str = _wire(_str, default="")
    loss: str = _wire(_str, default="")  # the training loss by registry name
    metrics: Dict[str, Any] = _wire(_object, default_factory=dict)  # measured validation metrics
    temperature: Optional[float] = _wire(_optional(_float), default=None)
    uncertainty_threshold: Optional[float] = _wire(_optional(_float), default=None)
    loss_params: Dict[str, Any] = _wire(_object, default_factory=dict)
    modality: Optional[str] = _wire(_optional(_str), default=None)
    in_channels: Optional[int] = _wire(_optional(_int), default=None)
    spacing: Optional[List[float]] = _wire(_optional(_list(_float, 3)), default=None)
    orientation: Optional[str] = _wire(_optional(_str), default=None)
    roi_size: Optional[List[int]] = _wire(_optional(_list(_int, 3)), default=None)
    parent: Optional[str] = _wire(_optional(_str), default=None)  # the model this one was fine-tuned from
    created: Optional[str] = _wire(_optional(_str), default=None)
    # the server's default model (run by POST /infer without an id); False from servers older than the field
    default: bool = _wire(_bool, default=False)
    extra: Dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_dict(cls, data: Any) -> ModelInfo:
        """The older name of :meth:`from_json`."""
        return cls.from_json(data)

    @property
    def class_names(self) -> List[str]:
        """The class names in label order (background first)."""
        return [self.labels[k] for k in sorted(self.labels, key=int)]


# --- fine-tuning jobs ------------------------------------------------------------------------------------------------
@dataclass
class JobProgress(Record):
    epoch: int = _wire(_int)  # finished epochs
    epochs: int = _wire(_int)
    fraction: float = _wire(_float)  # 0..1
    step: Optional[int] = _wire(_optional(_int), default=None)  # training steps done in the current epoch
    steps: Optional[int] = _wire(_optional(_int), default=None)  # training steps per epoch
    extra: Dict[str, Any] = field(default_factory=dict, repr=False)


@dataclass
class EpochMetrics(Record):
    """One finished epoch of a job: training loss, and the validation metrics when that epoch was validated."""

    epoch: int = _wire(_int)
    train_loss: Optional[float] = _wire(_optional(_float), default=None)
    lr: Optional[float] = _wire(_optional(_float), default=None)
    seconds: Optional[float] = _wire(_optional(_float), default=None)
    dice: Optional[float] = _wire(_optional(_float), default=None)
    ace: Optional[float] = _wire(_optional(_float), default=None)
    ece: Optional[float] = _wire(_optional(_float), default=None)
    mce: Optional[float] = _wire(_optional(_float), default=None)
    extra: Dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def validated(self) -> bool:
        return self.dice is not None

    def metric_values(self) -> Dict[str, Optional[float]]:
        """:data:`METRIC_NAMES` -> value (None where not validated)."""
        return {name: getattr(self, name) for name in METRIC_NAMES}


@dataclass
class JobInfo(Record):
    """A fine-tuning job as ``GET /jobs/{id}`` describes it (the client returns the JSON; parse it with
    :meth:`from_json` to read it typed)."""

    id: str = _wire(_str)
    status: str = _wire(_str)  # one of JOB_STATUSES (the server's schema enforces them; a newer one may add some)
    epochs: int = _wire(_int)
    progress: JobProgress = _wire(JobProgress.from_json)
    kind: str = _wire(_str, default="finetune")
    base_model: Optional[str] = _wire(_optional(_str), default=None)
    dataset: Optional[str] = _wire(_optional(_str), default=None)
    loss: Optional[str] = _wire(_optional(_str), default=None)
    metrics: List[EpochMetrics] = _wire(_records(EpochMetrics), default_factory=list)  # per finished epoch, in order
    final_metrics: Optional[Dict[str, Any]] = _wire(_optional(_object), default=None)  # of the published weights
    model_id: Optional[str] = _wire(_optional(_str), default=None)  # the new model (only when succeeded)
    target_model_id: Optional[str] = _wire(_optional(_str), default=None)  # the id it gets when the job succeeds
    error: Optional[str] = _wire(_optional(_str), default=None)  # why the job failed (or was cancelled)
    log_tail: List[str] = _wire(_list(_str), default_factory=list)
    queue_position: Optional[int] = _wire(_optional(_int), default=None)  # 1 = next to run
    attempts: int = _wire(_int, default=0)
    cancel_requested: bool = _wire(_bool, default=False)
    pid: Optional[int] = _wire(_optional(_int), default=None)
    created: Optional[str] = _wire(_optional(_str), default=None)
    started: Optional[str] = _wire(_optional(_str), default=None)
    finished: Optional[str] = _wire(_optional(_str), default=None)
    rev: int = _wire(_int, default=0)  # changes whenever the job does: pass it back as ?after= to long-poll
    request: Dict[str, Any] = _wire(_object, default_factory=dict)
    extra: Dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def final(self) -> bool:
        """Whether the job has ended (it never changes again)."""
        return self.status in FINAL_JOB_STATUSES

    def last_validation(self) -> Optional[EpochMetrics]:
        """The latest validated epoch, if any."""
        return next((m for m in reversed(self.metrics) if m.validated), None)


# --- the training engine's progress events ---------------------------------------------------------------------------
EVENT_START, EVENT_STEP, EVENT_EPOCH, EVENT_STOPPED, EVENT_PUBLISHED = "start", "step", "epoch", "stopped", "published"
#: why a run stopped before its last epoch (it resumes from its last checkpoint)
STOP_CANCELLED, STOP_SITTING_LIMIT = "cancelled", "sitting_limit"


@dataclass
class JobEvent(Record):
    """One progress event of a training run: a line of its JSON-lines log (``train_log.jsonl``) and the argument of
    its progress callback (``step`` events go to the callback only).

    ``event`` says which fields it carries (:attr:`FIELDS`); the others are None and left out of :meth:`to_json`::

        start      model_id, epochs, start_epoch, train_cases, val_cases, world_size, resumed, work_dir
        step       epoch, step, steps, loss                        (every iteration)
        epoch      epoch (from 1), epochs, train_loss, lr, seconds, val ({dice, ace, ece, mce, ...} or None when the
                   epoch was not validated), val_cases, best_dice, best_epoch
        stopped    reason (STOP_CANCELLED | STOP_SITTING_LIMIT), epoch    (resumable)
        published  model_id, path, metrics

    ``time`` (ISO 8601, UTC) is set by the log writer.
    """

    FIELDS: ClassVar[Dict[str, Tuple[str, ...]]] = {
        EVENT_START: (
            "model_id",
            "epochs",
            "start_epoch",
            "train_cases",
            "val_cases",
            "world_size",
            "resumed",
            "work_dir",
        ),
        EVENT_STEP: ("epoch", "step", "steps", "loss"),
        EVENT_EPOCH: ("epoch", "epochs", "train_loss", "lr", "seconds", "val", "val_cases", "best_dice", "best_epoch"),
        EVENT_STOPPED: ("reason", "epoch"),
        EVENT_PUBLISHED: ("model_id", "path", "metrics"),
    }

    event: str = _wire(_str)
    model_id: Optional[str] = _wire(_optional(_str), default=None)
    epoch: Optional[int] = _wire(_optional(_int), default=None)
    epochs: Optional[int] = _wire(_optional(_int), default=None)
    start_epoch: Optional[int] = _wire(_optional(_int), default=None)
    train_cases: Optional[int] = _wire(_optional(_int), default=None)
    val_cases: Optional[int] = _wire(_optional(_int), default=None)
    world_size: Optional[int] = _wire(_optional(_int), default=None)
    resumed: Optional[bool] = _wire(_optional(_bool), default=None)
    work_dir: Optional[str] = _wire(_optional(_str), default=None)
    step: Optional[int] = _wire(_optional(_int), default=None)
    steps: Optional[int] = _wire(_optional(_int), default=None)
    loss: Optional[float] = _wire(_optional(_float), default=None)
    train_loss: Optional[float] = _wire(_optional(_float), default=None)
    lr: Optional[float] = _wire(_optional(_float), default=None)
    seconds: Optional[float] = _wire(_optional(_float), default=None)
    val: Optional[Dict[str, Any]] = _wire(_optional(_object), default=None)
    best_dice: Optional[float] = _wire(_optional(_float), default=None)
    best_epoch: Optional[int] = _wire(_optional(_int), default=None)
    reason: Optional[str] = _wire(_optional(_str), default=None)
    path: Optional[str] = _wire(_optional(_str), default=None)
    metrics: Optional[Dict[str, Any]] = _wire(_optional(_object), default=None)
    time: Optional[str] = _wire(_optional(_str), default=None)
    extra: Dict[str, Any] = field(default_factory=dict, repr=False)

    def to_json(self) -> Dict[str, Any]:
        """``event``, the fields of its kind (None included: an unvalidated epoch's ``val`` is null), other fields
        that are set, ``time`` last when set, then unknown keys of the source."""
        own = self.FIELDS.get(self.event, ())
        out: Dict[str, Any] = {"event": self.event}
        out.update((name, _plain(getattr(self, name))) for name in own)
        for f in fields(self):
            if f.name not in ("event", "time", "extra") and f.name not in own and getattr(self, f.name) is not None:
                out[f.name] = _plain(getattr(self, f.name))
        if self.time is not None:
            out["time"] = self.time
        out.update(self.extra)
        return out

    @classmethod
    def from_line(cls, line: str) -> Optional[JobEvent]:
        """The event of one log line; None for a blank, partial or foreign line (a log may end mid-write)."""
        try:
            data = json.loads(line)
            return cls.from_json(data) if isinstance(data, dict) and "event" in data else None
        except (ValueError, ProtocolError):
            return None

    def epoch_metrics(self) -> EpochMetrics:
        """An ``epoch`` event as the job view lists it (validation metrics None when the epoch was not validated)."""
        if self.event != EVENT_EPOCH or self.epoch is None:
            raise ValueError(f"a {self.event!r} event has no epoch metrics")
        val = self.val or {}
        return EpochMetrics(
            epoch=self.epoch,
            train_loss=self.train_loss,
            lr=self.lr,
            seconds=self.seconds,
            **{name: _optional(_float)(val.get(name)) for name in METRIC_NAMES},
        )
