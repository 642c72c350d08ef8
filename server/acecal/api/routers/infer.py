"""POST /infer/{model_id} and POST /infer (the server's default model): upload a volume, get the segmentation,
confidence, uncertainty and flagged regions.

The handler is ``async`` but never blocks the event loop: it runs :func:`acecal.inference.pipeline.run_inference`
(what ``acecal infer`` runs) in the thread pool with the forward pass on the device queue
(:class:`acecal.api.queue.InferenceQueue`), and a full queue answers 503 at once.
It runs before the body is read (:mod:`acecal.api.uploads`): an unknown model is 404 and a full queue 503 without
receiving the upload. The upload streams to a server-chosen temporary name in the data directory (its ending chosen
from its content), is checked from its header before any reader opens it (:mod:`acecal.data.headers`: a regular
file, voxel data attached, within ``max_voxels``; the model-space size within ``max_model_voxels``) and is deleted
whatever happens. Running out of memory is a 413, with the memory released before the reply.

A client that disconnects once its upload is in (the Slicer module's *Cancel*, a killed script) stops its inference:
the handler watches for the ASGI ``http.disconnect`` message (``Request.is_disconnected``) and cancels the request's
:class:`~acecal.inference.window.CancelToken`. Device work still waiting is dropped from the queue, a running forward
pass stops at its next sliding-window batch, nothing is stored, the slot is released and the log says so. The handler
then returns an empty 499 ("client closed request", nginx's name for it), which the server drops unsent.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from acecal.api.deps import ServicesDep
from acecal.api.schemas import DISK_FULL_RESPONSE, ErrorResponse, InferParams, InferResponse, Responses, busy_response
from acecal.api.services import AppServices
from acecal.api.uploads import display_name, multipart_body, receive_form, store_upload
from acecal.bundles import Bundle
from acecal.data.headers import image_limits
from acecal.errors import ModelNotFoundError
from acecal.inference.memory import memory_bounded
from acecal.inference.pipeline import InferenceOptions, run_inference, write_volumes
from acecal.inference.window import CancelToken, InferenceCancelled
from acecal.protocol import VOLUMES
from acecal.storage.results import VOLUMES_KEY

log = logging.getLogger("acecal.api")
router = APIRouter(tags=["inference"])

_ERRORS: Responses = {
    400: {"model": ErrorResponse, "description": "malformed multipart body"},
    404: {"model": ErrorResponse, "description": "unknown model id (POST /infer: the server has no model)"},
    413: {
        "model": ErrorResponse,
        "description": "upload larger than the server's limit, or an image with more voxels "
        "(or model-space voxels) than max_voxels (max_model_voxels), or one "
        "too large for the server's memory",
    },
    422: {
        "model": ErrorResponse,
        "description": "unusable image (corrupt, empty, 2-D, NaN, wrong channel count, "
        "detached voxel data, values that overflow the normalisation) or "
        "invalid params",
    },
    **busy_response("inference queue"),
    **DISK_FULL_RESPONSE,
}

_BODY = multipart_body(
    files={"image": "the volume: .nii, .nii.gz, .nrrd or .mha (3-D, scalar, voxel data in the file itself)"},
    fields={"params": 'JSON object of InferParams, e.g. {"uncertainty_threshold": 0.7, "band_mm": 3}'},
    required=["image"],
)


#: how often a request waiting for its inference asks whether its client is still there (seconds)
DISCONNECT_POLL_S = 0.1
#: the status of the (unsent) reply to a request whose client left before it (nginx's "client closed request")
CLIENT_CLOSED_REQUEST = 499


@contextlib.asynccontextmanager
async def cancelled_on_disconnect(request: Request, token: CancelToken) -> AsyncIterator[None]:
    """Cancel ``token`` as soon as the client disconnects, while the block runs (enter it once the body is read:
    the watcher and the body reader would otherwise share the ASGI ``receive``)."""

    async def watch() -> None:
        while not token.cancelled:
            if await request.is_disconnected():
                token.cancel("the client disconnected")
                return
            await asyncio.sleep(DISCONNECT_POLL_S)

    watcher = asyncio.create_task(watch())
    try:
        yield
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher


@router.post(
    "/infer/{model_id}",
    response_model=InferResponse,
    summary="Segment a volume, with calibrated confidence, uncertainty and uncertain boundary regions",
    responses=_ERRORS,
    openapi_extra=_BODY,
)
async def infer(request: Request, model_id: str, services: ServicesDep) -> Response:
    bundle = await run_in_threadpool(services.registry.get, model_id)  # 404 before the body is read
    return await _infer(request, bundle, services)


@router.post(
    "/infer",
    response_model=InferResponse,
    summary="Segment a volume with the server's default model (GET /health: default_model)",
    responses=_ERRORS,
    openapi_extra=_BODY,
)
async def infer_default(request: Request, services: ServicesDep) -> Response:
    default = await run_in_threadpool(services.default_model)
    if default.served is None:
        raise ModelNotFoundError("the server has no model to run: publish a bundle into its models folder")
    bundle = await run_in_threadpool(services.registry.get, default.served)
    return await _infer(request, bundle, services)


async def _infer(request: Request, bundle: Bundle, services: AppServices) -> Response:
    t_start = time.perf_counter()
    settings, queue, results = services.settings, services.queue, services.results
    timings: dict[str, float] = {}
    cancel = CancelToken()
    async with queue.slot():  # 503 before the body is read
        t0 = time.perf_counter()
        form = await receive_form(request, settings.tmp_dir, files=("image",), fields=("params",))
        timings["receive_s"] = time.perf_counter() - t0
        try:
            p = InferParams.from_form(form.fields.get("params"))
            options = InferenceOptions(
                uncertainty_threshold=p.uncertainty_threshold,
                overlap=p.overlap,
                use_temperature=p.use_temperature,
                use_calibrator=p.use_calibrator,
                band_mm=p.band_mm,
                band_voxels=p.band_voxels,
                min_region_voxels=p.min_region_voxels,
                connectivity=p.connectivity,
                tta=p.tta,
            )
            received = form.file("image")
            name = display_name(received.filename)
            t0 = time.perf_counter()
            tmp = await run_in_threadpool(store_upload, received)
            timings["save_upload_s"] = time.perf_counter() - t0
            predictor = services.predictors.get(bundle)
            limits = settings.image_limits()

            def on_device(stage: Any) -> Any:
                return queue.call(stage, cancel=cancel)

            def infer_and_store() -> dict[str, Any]:
                with image_limits(limits):  # the server's budgets for the reads
                    out = run_inference(predictor, tmp, options, name=name, run_on_device=on_device, cancel=cancel)
                out.report["timings"] = {**{k: round(v, 4) for k, v in timings.items()}, **out.report["timings"]}

                def write(folder: Path) -> dict[str, Any]:
                    cancel.check()  # nobody would fetch it
                    t = time.perf_counter()
                    write_volumes(folder, out, compress=p.compress)
                    report = dict(out.report)
                    report["timings"] = dict(
                        report["timings"],
                        write_s=round(time.perf_counter() - t, 4),
                        total_s=round(time.perf_counter() - t_start, 4),
                    )
                    report[VOLUMES_KEY] = list(VOLUMES)
                    return report

                return memory_bounded(lambda: results.create(write), f"the image {name!r}")

            try:
                async with cancelled_on_disconnect(request, cancel):
                    reply = await run_in_threadpool(infer_and_store)
                if cancel.cancelled:  # the client left while the result was being stored
                    await run_in_threadpool(results.discard, reply["result_id"])
                    raise InferenceCancelled(cancel.reason)
            except InferenceCancelled:
                queue.count_cancelled()
                log.info(
                    "inference cancelled after %.2f s: model %s, image %r: %s; its slot is free and nothing was stored",
                    time.perf_counter() - t_start,
                    bundle.id,
                    name,
                    cancel.reason,
                )
                return Response(status_code=CLIENT_CLOSED_REQUEST)
        finally:
            form.discard()
    log.info(
        "inference %s: model %s, image %r %s, %.2f s",
        reply["result_id"],
        bundle.id,
        name,
        "x".join(map(str, reply["grid"]["size"])),
        time.perf_counter() - t_start,
    )
    try:
        # built by our own code to the InferResponse schema (tests validate it) and stored with allow_nan=False:
        # sent without re-validation, which costs more than the JSON itself for thousands of regions
        body = json.dumps(reply, allow_nan=False, separators=(",", ":")).encode("utf-8")
    except BaseException:
        await run_in_threadpool(results.discard, reply["result_id"])  # never an orphaned result
        raise
    return Response(body, media_type="application/json")
