"""POST /infer/{model_id}: upload a volume, get the segmentation, confidence, uncertainty and flagged regions.

The handler is ``async`` but never blocks the event loop: file work and CPU stages run in the thread pool, the
forward pass on the device queue (:class:`acecal.api.queue.InferenceQueue`), and a full queue answers 503 at once.
The upload is copied to a server-chosen temporary name (only a recognised suffix is kept from the user's file name)
and deleted whatever happens.
"""

from __future__ import annotations

import logging
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import Optional

from fastapi import APIRouter, Depends, File, Form, Request, UploadFile
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from acecal.api.deps import ServerState, get_state
from acecal.api.middleware import RECEIVED_AT
from acecal.api.schemas import DISK_FULL_RESPONSE, ErrorResponse, busy_response, InferParams, InferResponse
from acecal.api.store import storage_guard
from acecal.errors import ACECalError, InvalidInputError, PayloadTooLargeError

log = logging.getLogger("acecal.api")
router = APIRouter(tags=["inference"])

#: suffixes accepted for uploads (detached headers, .nhdr/.mhd, cannot travel alone)
UPLOAD_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")

_ERRORS = {
    400: {"model": ErrorResponse, "description": "malformed multipart body"},
    404: {"model": ErrorResponse, "description": "unknown model id"},
    413: {"model": ErrorResponse, "description": "upload larger than the server's limit"},
    422: {"model": ErrorResponse, "description": "unusable image (corrupt, empty, 2-D, NaN, wrong channel count) or "
                                                 "invalid params"},
    **busy_response("inference queue"),
    **DISK_FULL_RESPONSE,
}


def display_name(filename: Optional[str]) -> str:
    """The user's file name for messages only: base name, printable characters, at most 100 of them."""
    base = re.split(r"[\\/]", filename or "")[-1]
    base = "".join(ch if ch.isprintable() else "?" for ch in base)[:100]
    return base or "upload"


def sniff_suffix(head: bytes) -> Optional[str]:
    if head.startswith(b"NRRD000"):
        return ".nrrd"
    if head[:2] == b"\x1f\x8b":
        return ".nii.gz"
    if len(head) >= 348 and head[344:348] in (b"n+1\x00", b"n+2\x00"):
        return ".nii"
    if head.lstrip().startswith((b"ObjectType", b"NDims")):
        return ".mha"
    return None


def upload_suffix(filename: Optional[str], head: bytes) -> str:
    """A safe suffix for the temporary copy: the recognised ending of the user's name, else sniffed from the bytes."""
    name = display_name(filename).lower()
    for s in UPLOAD_SUFFIXES:
        if name.endswith(s):
            return s
    if name.endswith((".nhdr", ".mhd")):
        raise InvalidInputError(f"{display_name(filename)!r} is a detached header whose voxel data live in another "
                                "file; send a single-file volume (.nrrd, .nii, .nii.gz or .mha)")
    sniffed = sniff_suffix(head)
    if sniffed is None:
        if not head:
            raise InvalidInputError(f"the image file {display_name(filename)!r} is empty; send a NIfTI, NRRD or MHA "
                                    "volume")
        raise InvalidInputError(f"{display_name(filename)!r} is not a recognised image type; send a NIfTI "
                                "(.nii, .nii.gz), NRRD (.nrrd) or MetaImage (.mha) volume")
    return sniffed


def save_upload(upload: UploadFile, tmp_dir: Path) -> Path:
    """Copy the uploaded file to ``tmp_dir/upload-<random><suffix>`` (server-chosen name)."""
    f = upload.file
    f.seek(0)
    head = f.read(512)
    f.seek(0)
    suffix = upload_suffix(upload.filename, head)
    tmp_dir.mkdir(parents=True, exist_ok=True)
    path = tmp_dir / f"upload-{uuid.uuid4().hex}{suffix}"
    try:
        with storage_guard("the upload"), open(path, "wb") as out:
            shutil.copyfileobj(f, out, length=1 << 20)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return path


def _bad_image(name: str, stage: str, exc: Exception) -> InvalidInputError:
    log.warning("image %r could not be %s: %r", name, stage, exc, exc_info=True)
    return InvalidInputError(f"the image {name!r} could not be {stage} ({type(exc).__name__}: {str(exc)[:200]}); "
                             "check that it is a valid 3-D scalar volume")


@router.post(
    "/infer/{model_id}",
    response_model=InferResponse,
    summary="Segment a volume, with calibrated confidence, uncertainty and uncertain boundary regions",
    responses=_ERRORS,
)
async def infer(
    request: Request,
    model_id: str,
    image: UploadFile = File(..., description="the volume: .nii, .nii.gz, .nrrd or .mha (3-D, scalar)"),
    params: Optional[str] = Form(
        None, description="JSON object of InferParams, e.g. {\"uncertainty_threshold\": 0.7, \"band_mm\": 3}"),
    state: ServerState = Depends(get_state),
) -> JSONResponse:
    t_start = time.perf_counter()
    # upload transfer and multipart parsing happened before this handler ran
    t_arrived = request.scope.get(RECEIVED_AT, t_start)
    p = InferParams.from_form(params)
    bundle = await run_in_threadpool(state.registry.get, model_id)

    from acecal.data.io import grid_of
    from acecal.inference.pipeline import VOLUMES, InferenceOptions, analyse, write_volumes

    options = InferenceOptions(
        uncertainty_threshold=p.uncertainty_threshold, overlap=p.overlap, use_temperature=p.use_temperature,
        band_mm=p.band_mm, band_voxels=p.band_voxels, min_region_voxels=p.min_region_voxels,
        connectivity=p.connectivity,
    )
    name = display_name(image.filename)
    timings: dict[str, float] = {"receive_s": t_start - t_arrived}
    async with state.queue.slot():
        t0 = time.perf_counter()
        tmp = await run_in_threadpool(save_upload, image, state.settings.tmp_dir)
        timings["save_upload_s"] = time.perf_counter() - t0
        try:
            predictor = state.predictors.get(bundle)
            t0 = time.perf_counter()
            img = await run_in_threadpool(predictor.load_image, tmp, name=name)
            timings["read_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            try:
                data = await run_in_threadpool(predictor.preprocess, img)
            except ACECalError:
                raise
            except Exception as e:  # a valid file MONAI cannot bring into model space is still bad input
                raise _bad_image(name, "brought into the model's space", e) from None
            timings["preprocess_s"] = time.perf_counter() - t0

            forward_time = {}

            def _forward():
                t = time.perf_counter()
                try:
                    return predictor.forward(data, overlap=options.overlap, use_temperature=options.use_temperature)
                except MemoryError:
                    raise PayloadTooLargeError(f"the image {name!r} is too large for this server's memory") from None
                except RuntimeError as e:
                    if "out of memory" in str(e).lower() or "can't allocate memory" in str(e).lower():
                        raise PayloadTooLargeError(
                            f"the image {name!r} is too large for the device's memory; try a smaller volume or a "
                            "server with more memory") from None
                    raise
                finally:
                    forward_time["s"] = time.perf_counter() - t

            t0 = time.perf_counter()
            probs_model = await state.queue.run(_forward)
            timings["inference_s"] = forward_time.get("s", 0.0)
            timings["queue_wait_s"] = max(0.0, time.perf_counter() - t0 - timings["inference_s"])

            def _finish() -> dict:
                t = time.perf_counter()
                probs = predictor.postprocess(data, probs_model)
                timings["invert_s"] = time.perf_counter() - t
                out = analyse(probs, grid_of(img), bundle.config, options,
                              temperature=predictor.temperature(options.use_temperature), model_id=bundle.id,
                              timings=timings)
                del probs

                def _write(folder: Path) -> dict:
                    t = time.perf_counter()
                    write_volumes(folder, out, compress=p.compress)
                    report = dict(out.report)
                    report["timings"] = dict(report["timings"], write_s=round(time.perf_counter() - t, 4),
                                             total_s=round(time.perf_counter() - t_arrived, 4))
                    report["_volumes"] = list(VOLUMES)
                    return report

                return state.results.create(_write)

            reply = await run_in_threadpool(_finish)
        finally:
            await run_in_threadpool(lambda: tmp.unlink(missing_ok=True))
    log.info("inference %s: model %s, image %r %s, %.2f s", reply["result_id"], bundle.id, name,
             "x".join(map(str, reply["grid"]["size"])), time.perf_counter() - t_start)
    # built by our own code to the InferResponse schema (tests validate it): sent without re-validation, which
    # costs more than the JSON itself when a volume has thousands of regions
    return JSONResponse(reply)
