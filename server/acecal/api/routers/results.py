"""GET /results/{id}, GET /results/{id}/files/{name}, DELETE /results/{id}: stored inference results (they expire)."""

from __future__ import annotations

import os
from typing import Iterator

from fastapi import APIRouter
from fastapi.responses import JSONResponse, StreamingResponse

from acecal.api.deps import ResultsDep
from acecal.api.schemas import DeleteResponse, ErrorResponse, InferResponse, Responses, VolumeName
from acecal.protocol import VOLUME_FILE_NAMES

router = APIRouter(tags=["results"])

_NOT_FOUND: Responses = {404: {"model": ErrorResponse, "description": "unknown, expired or deleted result id"}}
_CHUNK = 1 << 20


@router.get(
    "/results/{result_id}",
    response_model=InferResponse,
    summary="The reply of a finished inference again",
    responses=_NOT_FOUND,
)
def get_result(result_id: str, results: ResultsDep) -> JSONResponse:
    return JSONResponse(results.get(result_id))  # stored as built to the schema: no re-validation


@router.get(
    "/results/{result_id}/files/{name}",
    response_class=StreamingResponse,
    summary="One result volume as NRRD, on the input's exact grid",
    responses={
        200: {
            "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
            "description": "the NRRD file",
        },
        **_NOT_FOUND,
    },
)
def get_result_file(result_id: str, name: VolumeName, results: ResultsDep) -> StreamingResponse:
    path = results.file(result_id, name, VOLUME_FILE_NAMES[name])
    fh = open(path, "rb")  # opened here: a sweep deleting the folder now cannot break the download
    size = os.fstat(fh.fileno()).st_size

    def chunks() -> Iterator[bytes]:
        with fh:
            while True:
                b = fh.read(_CHUNK)
                if not b:
                    break
                yield b

    return StreamingResponse(
        chunks(),
        media_type="application/octet-stream",
        headers={"Content-Length": str(size), "Content-Disposition": f'attachment; filename="{name}.nrrd"'},
    )


@router.delete(
    "/results/{result_id}", response_model=DeleteResponse, summary="Delete a result now", responses=_NOT_FOUND
)
def delete_result(result_id: str, results: ResultsDep) -> DeleteResponse:
    results.delete(result_id)
    return DeleteResponse(result_id=result_id)
