"""POST /infer/{model_id}: upload a volume, get the segmentation, confidence, uncertainty and flagged regions.

The handler is ``async`` but never blocks the event loop: file work and CPU stages run in the thread pool, the
forward pass on the device queue (:class:`acecal.api.queue.InferenceQueue`), and a full queue answers 503 at once.
It runs before the body is read (:mod:`acecal.api.uploads`): an unknown model is 404 and a full queue 503 without
receiving the upload. The upload streams to a server-chosen temporary name in the data directory (its ending chosen
from its content), is checked from its header before any reader opens it (:mod:`acecal.data.headers`: a regular
file, voxel data attached, within ``max_voxels``; the model-space size within ``max_model_voxels``) and is deleted
whatever happens. Running out of memory is a 413, with the memory released before the reply.
"""

from __future__ import annotations

import gc
import json
import logging
import time
from pathlib import Path
from typing import Any, Awaitable, Callable, Optional

from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from acecal.api.deps import ServicesDep
from acecal.api.schemas import DISK_FULL_RESPONSE, ErrorResponse, InferParams, InferResponse, busy_response
from acecal.api.uploads import display_name, multipart_body, receive_form, store_upload
from acecal.data.headers import image_limits
from acecal.errors import ACECalError, InvalidInputError, PayloadTooLargeError
from acecal.inference.memory import out_of_memory

log = logging.getLogger("acecal.api")
router = APIRouter(tags=["inference"])

_ERRORS = {
    400: {"model": ErrorResponse, "description": "malformed multipart body"},
    404: {"model": ErrorResponse, "description": "unknown model id"},
    413: {"model": ErrorResponse, "description": "upload larger than the server's limit, or an image with more voxels "
                                                 "(or model-space voxels) than max_voxels (max_model_voxels), or one "
                                                 "too large for the server's memory"},
    422: {"model": ErrorResponse, "description": "unusable image (corrupt, empty, 2-D, NaN, wrong channel count, "
                                                 "detached voxel data, values that overflow the normalisation) or "
                                                 "invalid params"},
    **busy_response("inference queue"),
    **DISK_FULL_RESPONSE,
}

_BODY = multipart_body(
    files={"image": "the volume: .nii, .nii.gz, .nrrd or .mha (3-D, scalar, voxel data in the file itself)"},
    fields={"params": "JSON object of InferParams, e.g. {\"uncertainty_threshold\": 0.7, \"band_mm\": 3}"},
    required=["image"])


def _bad_image(name: str, stage: str, exc: Exception) -> InvalidInputError:
    log.warning("image %r could not be %s: %r", name, stage, exc, exc_info=True)
    return InvalidInputError(f"the image {name!r} could not be {stage} ({type(exc).__name__}: {str(exc)[:200]}); "
                             "check that it is a valid 3-D scalar volume")


async def memory_bounded(call: Callable[[], Awaitable[Any]], name: str, where: str = "this server's memory") -> Any:
    """Await ``call()``; running out of memory becomes a 413 raised only after the failed attempt is freed."""
    try:
        return await call()
    except BaseException as e:  # noqa: BLE001 - only memory errors are handled here
        if not out_of_memory(e):
            raise
    gc.collect()
    raise PayloadTooLargeError(f"the image {name!r} is too large for {where}; send a smaller volume (or crop it) or "
                               "use a server with more memory", code="image_too_large")


@router.post(
    "/infer/{model_id}",
    response_model=InferResponse,
    summary="Segment a volume, with calibrated confidence, uncertainty and uncertain boundary regions",
    responses=_ERRORS,
    openapi_extra=_BODY,
)
async def infer(request: Request, model_id: str, state: ServicesDep) -> Response:
    t_start = time.perf_counter()
    bundle = await run_in_threadpool(state.registry.get, model_id)  # 404 before the body is read
    limits = state.settings.image_limits()

    def limited(fn: Callable, *args: Any, **kwargs: Any) -> Callable[[], Any]:
        def run() -> Any:
            with image_limits(limits):
                return fn(*args, **kwargs)
        return run

    from acecal.data.io import grid_of
    from acecal.inference.pipeline import VOLUMES, InferenceOptions, analyse, write_volumes

    timings: dict[str, float] = {}
    async with state.queue.slot():  # 503 before the body is read
        t0 = time.perf_counter()
        form = await receive_form(request, state.settings.tmp_dir, files=("image",), fields=("params",))
        timings["receive_s"] = time.perf_counter() - t0
        try:
            p = InferParams.from_form(form.fields.get("params"))
            options = InferenceOptions(
                uncertainty_threshold=p.uncertainty_threshold, overlap=p.overlap, use_temperature=p.use_temperature,
                band_mm=p.band_mm, band_voxels=p.band_voxels, min_region_voxels=p.min_region_voxels,
                connectivity=p.connectivity,
            )
            received = form.file("image")
            name = display_name(received.filename)
            t0 = time.perf_counter()
            tmp = await run_in_threadpool(store_upload, received)
            timings["save_upload_s"] = time.perf_counter() - t0
            predictor = state.predictors.get(bundle)
            t0 = time.perf_counter()
            img = await memory_bounded(lambda: run_in_threadpool(limited(predictor.load_image, tmp, name=name)), name)
            timings["read_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()

            async def _preprocess():
                try:
                    return await run_in_threadpool(limited(predictor.preprocess, img, name=name))
                except ACECalError:
                    raise
                except Exception as e:  # a valid file MONAI cannot bring into model space is still bad input
                    if out_of_memory(e):
                        raise
                    raise _bad_image(name, "brought into the model's space", e) from None

            data = await memory_bounded(_preprocess, name)
            timings["preprocess_s"] = time.perf_counter() - t0

            forward_time = {}

            def _forward():
                import torch

                t = time.perf_counter()
                try:
                    probs = predictor.forward(data, overlap=options.overlap, use_temperature=options.use_temperature)
                finally:
                    forward_time["s"] = time.perf_counter() - t
                if not bool(torch.isfinite(probs).all()):
                    raise InvalidInputError(f"model {bundle.id!r} gave non-finite probabilities for the image "
                                            f"{name!r}; check its intensities")
                return probs

            t0 = time.perf_counter()
            device_memory = "the device's memory" if predictor.device.type != "cpu" else "this server's memory"
            probs_model = await memory_bounded(lambda: state.queue.run(_forward), name, device_memory)
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
                                             total_s=round(time.perf_counter() - t_start, 4))
                    report["_volumes"] = list(VOLUMES)
                    return report

                return state.results.create(_write)

            reply = await memory_bounded(lambda: run_in_threadpool(_finish), name)
        finally:
            form.discard()
    log.info("inference %s: model %s, image %r %s, %.2f s", reply["result_id"], bundle.id, name,
             "x".join(map(str, reply["grid"]["size"])), time.perf_counter() - t_start)
    try:
        # built by our own code to the InferResponse schema (tests validate it) and stored with allow_nan=False:
        # sent without re-validation, which costs more than the JSON itself for thousands of regions
        body = json.dumps(reply, allow_nan=False, separators=(",", ":")).encode("utf-8")
    except BaseException:
        await run_in_threadpool(state.results.discard, reply["result_id"])  # never an orphaned result
        raise
    return Response(body, media_type="application/json")
