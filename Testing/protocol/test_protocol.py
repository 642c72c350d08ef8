"""The wire format is defined once (``acecal.protocol``): the server's pydantic schemas have exactly its keys, the real
server's replies and the real engine's log parse into its records with nothing left over, and the records check what
they read."""

from __future__ import annotations

import json
import typing

import pytest
import requests
from live_server import LiveServer, make_settings
from synthetic import make_case, write_case

from acecal import protocol
from acecal.api import finetune_schemas as fs, schemas
from acecal.errors import ProtocolError
from acecal.protocol import (
    ClassSummary,
    EpochMetrics,
    InferenceReply,
    JobEvent,
    JobInfo,
    JobProgress,
    ModelInfo,
    Region,
    Summary,
)


def schema_keys(model) -> set:
    """The JSON keys of a pydantic model (aliases where a field has one, e.g. Region's "class")."""
    return {f.alias or name for name, f in model.model_fields.items()}


# --------------------------------------------------------------------------------------------- names
def test_names_are_the_schemas_literals():
    assert protocol.VOLUMES == typing.get_args(schemas.VolumeName) == tuple(schemas.ResultFiles.model_fields)
    assert protocol.JOB_STATUSES == typing.get_args(fs.JobStatus)
    assert set(protocol.ACTIVE_JOB_STATUSES) | set(protocol.FINAL_JOB_STATUSES) == set(protocol.JOB_STATUSES)
    assert not set(protocol.ACTIVE_JOB_STATUSES) & set(protocol.FINAL_JOB_STATUSES)
    assert protocol.VOLUME_FILE_NAMES == {v: f"{v}.nrrd" for v in protocol.VOLUMES}
    assert protocol.METRIC_NAMES == tuple(fs.Metrics4.model_fields)
    from acecal.losses.registry import LOSS_NAMES

    assert protocol.FINETUNE_LOSSES == typing.get_args(fs.LossName) and set(protocol.FINETUNE_LOSSES) <= set(LOSS_NAMES)


def test_image_stem_knows_every_image_ending():
    assert protocol.image_stem("case.NII.GZ") == "case" and protocol.image_stem("a.b.nrrd") == "a.b"
    assert protocol.image_stem("scan.nhdr") == "scan"
    assert protocol.image_stem("scan.nhdr", protocol.UPLOAD_SUFFIXES) is None
    assert protocol.image_stem("notes.txt") is None and protocol.image_stem("x.gz") is None


@pytest.mark.parametrize(
    "record, model",
    [
        (Region, schemas.Region),
        (ClassSummary, schemas.ClassSummary),
        (Summary, schemas.Summary),
        (InferenceReply, schemas.InferResponse),
        (ModelInfo, schemas.ModelInfo),
        (JobInfo, fs.JobInfo),
        (JobProgress, fs.JobProgress),
        (EpochMetrics, fs.EpochMetrics),
    ],
)
def test_each_record_has_exactly_its_schemas_keys(record, model):
    assert set(record.json_keys()) == schema_keys(model)
    assert len(record.json_keys()) == len(set(record.json_keys()))


def test_the_keys_read_by_name_are_in_the_schemas():
    assert {
        protocol.HEALTH_VERSION,
        protocol.HEALTH_DEVICE,
        protocol.HEALTH_AUTH_REQUIRED,
        protocol.HEALTH_DEFAULT_MODEL,
        protocol.HEALTH_DEFAULT_MODEL_CONFIGURED,
    } <= schema_keys(schemas.HealthResponse)
    assert {protocol.DATASET_ID, protocol.DATASET_NUM_CASES} <= schema_keys(fs.DatasetInfo)
    assert protocol.DATASET_ID in schema_keys(fs.DatasetCreated)
    assert protocol.JOB_ACCEPTED_ID in schema_keys(fs.JobAccepted)
    assert {protocol.EVAL_AGGREGATE, protocol.EVAL_NUM_CASES, protocol.EVAL_FIGURES} <= schema_keys(
        fs.EvaluationResponse
    )
    assert {protocol.EVAL_FIGURES_DATASET, protocol.EVAL_FIGURES_CASES} == schema_keys(fs.EvaluationFigures)


# --------------------------------------------------------------------------------------------- the real server
@pytest.fixture(scope="module")
def server(tiny_bundle, tmp_path_factory):
    with LiveServer(make_settings(tmp_path_factory.mktemp("protocol-data"), [tiny_bundle.parent])) as s:
        yield s


def _no_extra(reply: InferenceReply) -> list:
    records = [reply, reply.summary, *reply.summary.classes, *reply.regions]
    return [(type(r).__name__, r.extra) for r in records if r.extra]


def test_the_real_infer_reply_is_the_protocols_and_the_schemas(server, tmp_path):
    case = make_case((24, 24, 24), seed=5, spacing=(1.2, 0.9, 1.1))
    write_case(case, tmp_path / "c.nii.gz")
    params = {"uncertainty_threshold": 0.999}  # flags the doubtful boundary: the reply has regions
    with open(tmp_path / "c.nii.gz", "rb") as fh:
        r = requests.post(
            f"{server.url}/infer/tiny-sphere",
            files={"image": ("c.nii.gz", fh)},
            data={"params": json.dumps(params)},
            timeout=120,
        )
    assert r.status_code == 200, r.text
    data = r.json()
    reply = InferenceReply.from_json(data)
    assert _no_extra(reply) == []  # the protocol knows every key the server sends...
    assert reply.to_json() == data  # ...and writes them back as they came
    assert reply.regions and reply.summary.region_count == len(reply.regions)
    assert reply.grid.shape_zyx == (24, 24, 24) and set(reply.files) == set(protocol.VOLUMES)
    # the OpenAPI schema documents exactly the keys sent, at every level
    assert set(data) == schema_keys(schemas.InferResponse)
    assert set(data["summary"]) == schema_keys(schemas.Summary)
    assert set(data["params"]) == schema_keys(schemas.EffectiveParams)
    assert set(data["grid"]) == schema_keys(schemas.GridModel)
    assert set(data["files"]) == schema_keys(schemas.ResultFiles)
    for c in data["summary"]["classes"]:
        assert set(c) == schema_keys(schemas.ClassSummary)
    for region in data["regions"]:
        assert set(region) == schema_keys(schemas.Region)
        assert set(region["bbox_ijk"]) == schema_keys(schemas.IndexBox)
    schemas.InferResponse.model_validate(data)
    again = requests.get(f"{server.url}{reply.files['labels'].rsplit('/files/', 1)[0]}", timeout=30).json()
    assert InferenceReply.from_json(again).regions == reply.regions  # GET /results/{id}: the same record


def test_the_real_models_reply_is_the_protocols(server):
    data = requests.get(f"{server.url}/models", timeout=30).json()["models"]
    (m,) = [ModelInfo.from_json(d) for d in data]
    assert m.extra == {} and m.to_json() == data[0]
    assert m.id == "tiny-sphere" and m.class_names == ["background", "sphere"] and m.roi_size == [24, 24, 24]
    assert m.default  # the only model stands in for the configured default
    health = requests.get(f"{server.url}/health", timeout=30).json()
    assert health[protocol.HEALTH_DEVICE] == "cpu" and isinstance(health[protocol.HEALTH_AUTH_REQUIRED], bool)
    assert health[protocol.HEALTH_DEFAULT_MODEL] == "tiny-sphere"
    assert health[protocol.HEALTH_DEFAULT_MODEL_CONFIGURED] == "hippocampus-ace"


def test_the_real_engines_log_is_job_events(tiny_bundle):
    """The tiny bundle was trained by the real engine: its JSON-lines log parses into JobEvents, nothing left over."""
    (log,) = (tiny_bundle.parent.parent / "work").rglob("train.jsonl")
    lines = log.read_text().splitlines()
    events = [JobEvent.from_line(line) for line in lines]
    assert None not in events and [e.extra for e in events if e.extra] == []
    assert [json.loads(line) for line in lines] == [e.to_json() for e in events]  # written back as they came
    kinds = [e.event for e in events]
    assert kinds[0] == protocol.EVENT_START and kinds[-1] == protocol.EVENT_PUBLISHED
    epochs = [e for e in events if e.event == protocol.EVENT_EPOCH]
    assert [e.epoch for e in epochs] == list(range(1, len(epochs) + 1)) == list(range(1, epochs[0].epochs + 1))
    for e in events:
        assert set(protocol.JobEvent.FIELDS[e.event]) <= set(e.to_json()), e.event
    last = epochs[-1].epoch_metrics()
    assert last.validated and 0.0 <= last.dice <= 1.0 and set(last.to_json()) == schema_keys(fs.EpochMetrics)
    assert not epochs[0].epoch_metrics().validated  # validated only at the end (val_every = epochs)


# --------------------------------------------------------------------------------------------- the records' checks
def _region_json(**change) -> dict:
    box = {"min": [0.0, 0.0, 0.0], "max": [1.0, 2.0, 3.0]}
    d = {
        "id": 1,
        "class": 2,
        "class_name": "sphere",
        "voxels": 12,
        "volume_ml": 0.012,
        "mean_confidence": 0.6,
        "min_confidence": 0.4,
        "centroid_ijk": [1.0, 2.0, 3.0],
        "centroid_lps": [1.0, 2.0, 3.0],
        "centroid_ras": [-1.0, -2.0, 3.0],
        "bbox_ijk": {"min": [0, 0, 0], "max": [1, 2, 3]},
        "bbox_lps": box,
        "bbox_ras": box,
    }
    d.update(change)
    return {k: v for k, v in d.items() if v is not ...}


def test_a_region_reads_class_as_class_value_and_refuses_what_does_not_fit():
    r = Region.from_json(_region_json())
    assert r.class_value == 2 and r.to_json()["class"] == 2 and "class_value" not in r.to_json()
    assert Region.from_json(_region_json(voxels=12.0)).voxels == 12  # an integral float is an integer
    for change, message in [
        ({"class": ...}, "'class' is missing"),
        ({"voxels": "12"}, "Region.voxels"),
        ({"voxels": 1.5}, "integer"),
        ({"voxels": True}, "integer"),
        ({"mean_confidence": float("nan")}, "finite"),
        ({"centroid_ras": [1.0, 2.0]}, "list of 3"),
        ({"bbox_lps": {"min": [0, 0, 0]}}, "min"),
        ({"class_name": None}, "string"),
    ]:
        with pytest.raises(ProtocolError, match=message):
            Region.from_json(_region_json(**change))
    with pytest.raises(ProtocolError, match="JSON object"):
        Region.from_json([1, 2])
    newer = Region.from_json(_region_json(surface_mm2=3.5))  # a key a newer server adds survives a round trip
    assert newer.extra == {"surface_mm2": 3.5} and newer.to_json()["surface_mm2"] == 3.5


def test_a_model_from_a_server_older_than_default_models_is_not_the_default():
    old = {"id": "m", "labels": {"0": "background", "1": "x"}, "loss": "baseline_dice_ce"}
    m = ModelInfo.from_json(old)
    assert m.default is False and m.extra == {}
    assert ModelInfo.from_json(dict(old, default=True)).default is True
    with pytest.raises(ProtocolError, match="ModelInfo.default"):
        ModelInfo.from_json(dict(old, default="yes"))


def test_a_reply_names_the_nested_key_that_is_wrong():
    summary = {
        "classes": [
            {
                "value": 0,
                "name": "background",
                "voxels": 1,
                "volume_ml": 0.001,
                "mean_confidence": None,
                "uncertain_voxels": 0,
                "uncertain_volume_ml": 0.0,
            }
        ],
        "mean_confidence": 0.9,
        "uncertain_voxels": 0,
        "uncertain_volume_ml": 0.0,
        "voxel_volume_ml": 0.001,
        "region_count": 0,
    }
    grid = {"size": [2, 3, 4], "spacing": [1, 1, 1], "origin": [0, 0, 0], "direction": [1, 0, 0, 0, 1, 0, 0, 0, 1]}
    ok = {
        "result_id": "r",
        "model_id": "m",
        "labels": {"0": "background"},
        "grid": grid,
        "summary": summary,
        "files": {},
    }
    reply = InferenceReply.from_json(ok)
    assert reply.summary.classes[0].mean_confidence is None and reply.grid.shape_zyx == (4, 3, 2)
    assert reply.regions == [] and reply.summary.temperature is None
    bad = json.loads(json.dumps(ok))
    bad["summary"]["classes"][0]["voxels"] = -0.5
    with pytest.raises(ProtocolError, match=r"InferenceReply.summary: Summary.classes: ClassSummary.voxels"):
        InferenceReply.from_json(bad)
    with pytest.raises(ProtocolError, match="grid"):
        InferenceReply.from_json(dict(ok, grid={"size": [2, 3]}))


def test_job_info_and_events_round_trip():
    view = {
        "id": "j1",
        "status": "running",
        "epochs": 3,
        "progress": {"epoch": 1, "epochs": 3, "step": 2, "steps": 5, "fraction": 0.4667},
        "metrics": [
            {
                "epoch": 1,
                "train_loss": 0.5,
                "lr": 0.01,
                "seconds": 1.5,
                "dice": None,
                "ace": None,
                "ece": None,
                "mce": None,
            }
        ],
        "rev": 7,
    }
    job = JobInfo.from_json(view)
    assert not job.final and job.last_validation() is None and job.progress.fraction == pytest.approx(0.4667)
    assert JobInfo.from_json(dict(view, status=protocol.JOB_CANCELLED)).final
    epoch = JobEvent.from_json(
        {
            "event": "epoch",
            "epoch": 2,
            "epochs": 3,
            "train_loss": 0.4,
            "lr": 0.01,
            "seconds": 1.2,
            "val": {"dice": 0.9, "ace": 0.1, "ece": 0.01, "mce": 0.3},
            "val_cases": 1,
            "best_dice": 0.9,
            "best_epoch": 2,
            "time": "t",
        }
    )
    m = epoch.epoch_metrics()
    assert m.validated and m.metric_values() == {"dice": 0.9, "ace": 0.1, "ece": 0.01, "mce": 0.3}
    stopped = JobEvent(protocol.EVENT_STOPPED, reason=protocol.STOP_CANCELLED, epoch=2)
    assert stopped.to_json() == {"event": "stopped", "reason": "cancelled", "epoch": 2}  # only its own fields
    unvalidated = JobEvent(protocol.EVENT_EPOCH, epoch=1, epochs=3, train_loss=0.5)
    assert unvalidated.to_json()["val"] is None  # an epoch event always says whether it was validated
    with pytest.raises(ValueError, match="no epoch metrics"):
        stopped.epoch_metrics()
    for line in ("", '{"event": "epo', "[1, 2]", '{"no_event": 1}', '{"event": "epoch", "epoch": "one"}'):
        assert JobEvent.from_line(line) is None


def test_the_protocol_imports_no_server_library():
    """stdlib + numpy (and acecal.errors / acecal.geometry): the client and the Slicer copy import it."""
    import ast
    import sys
    from pathlib import Path

    tree = ast.parse(Path(protocol.__file__).read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 0}
    assert imported <= set(sys.stdlib_module_names) | {"numpy", "acecal"}, imported
    froms = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module.startswith("acecal")}
    assert froms <= {"acecal.errors", "acecal.geometry"}, froms
