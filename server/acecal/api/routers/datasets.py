"""Stored datasets for fine-tuning and evaluation: ``/datasets`` and ``/datasets/{id}/cases``.

Each case (image + label map) is checked when it arrives and refused with a 422 naming the problem (see
:mod:`acecal.storage.datasets`); it is stored re-encoded from the images read, and acknowledged only once its files
and its row are durably stored. The upload route runs before its body is read (:mod:`acecal.api.uploads`): an
unknown dataset is a 404 without receiving the files.
"""

from __future__ import annotations

from typing import Any, Optional

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from acecal.api.deps import DatasetsDep, SettingsDep
from acecal.api.finetune_schemas import (
    CaseCreated,
    CaseInfo,
    DatasetCreate,
    DatasetCreated,
    DatasetInfo,
    DatasetsResponse,
    Deleted,
)
from acecal.api.schemas import DISK_FULL_RESPONSE, ErrorResponse, Responses
from acecal.api.uploads import ReceivedForm, display_name, multipart_body, receive_form, store_upload
from acecal.data.headers import image_limits
from acecal.errors import InvalidInputError
from acecal.inference.memory import memory_bounded
from acecal.storage.datasets import case_view

router = APIRouter(tags=["datasets"])
_400: Responses = {400: {"model": ErrorResponse, "description": "the body is not valid JSON"}}

_404: Responses = {404: {"model": ErrorResponse, "description": "unknown dataset (or case)"}}
_409: Responses = {409: {"model": ErrorResponse, "description": "a queued or running fine-tuning job uses the dataset"}}
_507: Responses = DISK_FULL_RESPONSE


@router.post(
    "/datasets",
    response_model=DatasetCreated,
    status_code=201,
    summary="Create an empty dataset",
    responses={**_400, 404: {"model": ErrorResponse, "description": "unknown model"}, **_507},
)
def create_dataset(body: DatasetCreate, datasets: DatasetsDep) -> dict[str, Any]:
    return datasets.create(body.name, body.model).to_json()


@router.get("/datasets", response_model=DatasetsResponse, summary="List the stored datasets")
def list_datasets(datasets: DatasetsDep) -> dict[str, Any]:
    return {"datasets": [d.to_json() for d in datasets.all()]}


@router.get("/datasets/{dataset_id}", response_model=DatasetInfo, summary="One dataset with its cases", responses=_404)
def get_dataset(dataset_id: str, datasets: DatasetsDep) -> dict[str, Any]:
    return datasets.describe(dataset_id)


@router.delete(
    "/datasets/{dataset_id}",
    response_model=Deleted,
    summary="Delete a dataset and its files",
    responses={**_404, **_409},
)
def delete_dataset(dataset_id: str, datasets: DatasetsDep) -> dict[str, Any]:
    datasets.delete(dataset_id)
    return {"id": dataset_id}


_CASE_BODY = multipart_body(
    files={
        "image": "the image: .nii, .nii.gz, .nrrd or .mha (3-D, voxel data in the file itself)",
        "label": "its label map (whole numbers) on exactly the image's grid",
    },
    fields={
        "name": "a display name (default: the image file name), at most 200 characters",
        "model": "check the label values against this model's labels (default: the dataset's model, if it has one)",
    },
    required=["image", "label"],
)


def _text_field(form: ReceivedForm, key: str, limit: int = 200) -> Optional[str]:
    value = form.fields.get(key)
    if value is not None and len(value) > limit:
        raise InvalidInputError(f"invalid request: {key}: at most {limit} characters")
    return value


@router.post(
    "/datasets/{dataset_id}/cases",
    response_model=CaseCreated,
    status_code=201,
    summary="Add a labelled case (validated on arrival, stored re-encoded as NIfTI)",
    responses={
        400: {"model": ErrorResponse, "description": "malformed multipart body"},
        **_404,
        413: {
            "model": ErrorResponse,
            "description": "upload larger than the server's limit, or an image over the "
            "voxel budgets (max_voxels, max_model_voxels)",
        },
        422: {
            "model": ErrorResponse,
            "description": "the case is unusable: unreadable or corrupt file, detached voxel "
            "data, not 3-D, NaN voxels, image and label on different grids, "
            "non-integer label values or values the model does not know",
        },
        **_507,
    },
    openapi_extra=_CASE_BODY,
)
async def add_case(request: Request, dataset_id: str, datasets: DatasetsDep, settings: SettingsDep) -> dict[str, Any]:
    await run_in_threadpool(datasets.get, dataset_id)  # 404 before the body is read
    form = await receive_form(request, settings.tmp_dir, files=("image", "label"), fields=("name", "model"))
    try:
        name, model = _text_field(form, "name"), _text_field(form, "model")
        image, label = form.file("image"), form.file("label")
        img = await run_in_threadpool(store_upload, image, "image")
        lab = await run_in_threadpool(store_upload, label, "label")
        limits = settings.image_limits()
        image_name, label_name = display_name(image.filename), display_name(label.filename)

        def add() -> dict[str, Any]:
            with image_limits(limits):
                return datasets.add_case(
                    dataset_id, img, lab, image_name=image_name, label_name=label_name, name=name, model=model
                )

        case = await run_in_threadpool(memory_bounded, add, f"the image {image_name!r}")
    finally:
        form.discard()
    return {**case, "dataset": dataset_id}


@router.get("/datasets/{dataset_id}/cases/{case_id}", response_model=CaseInfo, summary="One case", responses=_404)
def get_case(dataset_id: str, case_id: str, datasets: DatasetsDep) -> dict[str, Any]:
    return case_view(datasets.get_case(dataset_id, case_id))


@router.delete(
    "/datasets/{dataset_id}/cases/{case_id}",
    response_model=Deleted,
    summary="Delete a case",
    responses={**_404, **_409},
)
def delete_case(dataset_id: str, case_id: str, datasets: DatasetsDep) -> dict[str, Any]:
    datasets.delete_case(dataset_id, case_id)
    return {"id": case_id}
