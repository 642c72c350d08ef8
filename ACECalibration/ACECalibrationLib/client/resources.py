# Generated from server/acecal/client/resources.py by ACECalibration/CMake/generate_light_client.py: edit the source.
"""The server's resources as client methods: models and inference, datasets, fine-tuning jobs, evaluation.

Each class adds the endpoints of one resource to :class:`~acecal.client.transport.Transport`;
:class:`acecal.client.ACEClient` combines them. Replies are parsed with :mod:`acecal.protocol` (typed records for
models and inference results; datasets, jobs and evaluations are returned as the server's JSON, whose keys the
protocol names: ``JobInfo.from_json(client.job(id))`` reads a job typed).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from .results import InferenceResult
from .transport import (
    FilePart,
    JSONObject,
    ProgressCallback,
    Transport,
    json_object,
    json_objects,
    url_segment,
)
from .errors import ACECalError, InvalidInputError, NotFoundError, ProtocolError, ServerTimeoutError
from .geometry import Grid
from .nrrd import encode_nrrd, read_nrrd
from .protocol import (
    EVAL_FIGURES,
    EVAL_FIGURES_CASES,
    EVAL_FIGURES_DATASET,
    SUMMARY_NAME,
    UPLOAD_SUFFIXES,
    VOLUME_FILE_NAMES,
    VOLUMES,
    JobInfo,
    ModelInfo,
    image_stem,
)

#: an image to upload: a file path (streamed from disk) or ``(array_zyx, Grid)`` (sent as NRRD)
ImageInput = Union[str, "os.PathLike[str]", Tuple["np.ndarray[Any, Any]", Grid]]
PathLike = Union[str, "os.PathLike[str]"]


def file_part(source: ImageInput, filename: Optional[str] = None, *, compress: bool = False) -> FilePart:
    """A multipart file part from a path (streamed from disk) or ``(array_zyx, Grid)`` (encoded as NRRD)."""
    if isinstance(source, tuple):
        array, grid = source
        if not isinstance(grid, Grid):
            raise TypeError("an image must be a path or (array_zyx, Grid)")
        return filename or "image.nrrd", encode_nrrd(np.asarray(array), grid, encoding="gzip" if compress else "raw")
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"no such image file: {path}")
    return filename or path.name, path


# --------------------------------------------------------------------------------------------- models and inference
class ModelResources(Transport):
    """``/health``, ``/models``, ``/infer`` and ``/results``."""

    file_part = staticmethod(file_part)

    def health(self) -> JSONObject:
        """``GET /health``: {"status", "version", "device", "auth_required", ...}. Needs no key."""
        return self.get_object("/health")

    def check(self) -> JSONObject:
        """Like :meth:`health`, and also checks the key (``/models``): raises ``UnauthorizedError`` if refused.

        For "Test connection" buttons: one call says the server is up, which version and device, and that the key
        works.
        """
        info = self.health()
        info["models"] = [m.id for m in self.models()]
        return info

    def models(self) -> List[ModelInfo]:
        """``GET /models``."""
        reply = self.get_json("/models")
        if not isinstance(reply, dict) or not isinstance(reply.get("models"), list):
            raise ProtocolError("the server's /models reply has no list of models; is it an ACECal server?")
        return [ModelInfo.from_json(m) for m in reply["models"]]

    def default_model(self) -> Optional[ModelInfo]:
        """The model the server runs when a request names none (``GET /models``, the entry marked ``default``);
        None when the server has no model, or is older than default models."""
        return next((m for m in self.models() if m.default), None)

    def model(self, model_id: str) -> ModelInfo:
        """``GET /models/{id}``; ``ModelNotFoundError`` if unknown."""
        return ModelInfo.from_json(self.get_json(f"/models/{url_segment(model_id)}"))

    def infer(
        self,
        image: ImageInput,
        model_id: Optional[str] = None,
        *,
        params: Optional[Dict[str, Any]] = None,
        out_dir: Optional[PathLike] = None,
        load_arrays: Optional[bool] = None,
        volumes: Sequence[str] = VOLUMES,
        keep_on_server: bool = False,
        progress: Optional[ProgressCallback] = None,
        filename: Optional[str] = None,
        compress_upload: bool = False,
        **param_kwargs: Any,
    ) -> InferenceResult:
        """Segment one volume; returns the reply with the volumes on the input's exact grid.

        Args:
            image: a file path (.nii, .nii.gz, .nrrd, .mha; streamed from disk) or ``(array_zyx, Grid)`` (sent as
                NRRD; the grid in LPS, as :class:`acecal.geometry.Grid` always is).
            model_id: a model id from :meth:`models`; None runs the server's default model (``POST /infer``; the
                result's ``model_id`` says which ran).
            params / **param_kwargs: inference parameters (``uncertainty_threshold``, ``overlap``,
                ``use_calibrator`` (``use_temperature`` is its older name), ``band_mm``, ``band_voxels``,
                ``min_region_voxels``, ``connectivity``, ``tta``, ``compress``); keyword arguments override
                ``params``.
            out_dir: write ``<volume>.nrrd`` files and ``summary.json`` there.
            load_arrays: also decode the volumes into ``result.arrays`` (default: when no ``out_dir`` is given).
            volumes: which volumes to fetch.
            keep_on_server: leave the result on the server (it expires) instead of deleting it after download.
            progress: ``progress(stage, done_bytes, total_bytes)`` for the upload and each download.
            filename: the name to send with an array (default ``image.nrrd``) or instead of the file's own.
            compress_upload: gzip an array before sending it (smaller, slower).
        """
        p = dict(params or {})
        p.update({k: v for k, v in param_kwargs.items() if v is not None})
        unknown = [v for v in volumes if v not in VOLUMES]
        if unknown:
            raise ValueError(f"unknown volume(s) {unknown}; choose from {VOLUMES}")
        fields = {"params": json.dumps(p)} if p else {}
        resp = self.post_multipart(
            "/infer" if model_id is None else f"/infer/{url_segment(model_id)}",
            fields,
            {"image": file_part(image, filename, compress=compress_upload)},
            progress=progress,
        )
        result = InferenceResult.from_reply(self._json(resp))
        try:
            self.fetch_volumes(result, out_dir=out_dir, load_arrays=load_arrays, volumes=volumes, progress=progress)
        finally:
            if not keep_on_server and result.result_id:
                try:
                    self.delete_result(result.result_id)
                except ACECalError:
                    pass  # it expires anyway
        return result

    def fetch_volumes(
        self,
        result: InferenceResult,
        *,
        out_dir: Optional[PathLike] = None,
        load_arrays: Optional[bool] = None,
        volumes: Sequence[str] = VOLUMES,
        progress: Optional[ProgressCallback] = None,
    ) -> InferenceResult:
        """Download a result's volumes into ``result.arrays`` and/or ``out_dir`` (with ``summary.json``)."""
        load = (out_dir is None) if load_arrays is None else load_arrays
        out = Path(out_dir) if out_dir is not None else None
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
        for name in volumes:
            stage = f"download:{name}"
            url = result.files.get(name)
            if url is None:
                raise ProtocolError(f"the server's reply lists no {name} volume")
            if out is not None:
                dest = out / VOLUME_FILE_NAMES[name]
                self.download(url, dest, progress=progress, stage=stage)
                result.paths[name] = dest
                if load:
                    result.arrays[name] = read_nrrd(dest).array
            else:
                result.arrays[name] = read_nrrd(self.download_bytes(url, progress=progress, stage=stage)).array
            if name in result.arrays and result.arrays[name].shape != result.grid.shape_zyx:
                raise ProtocolError(
                    f"the {name} volume has shape {result.arrays[name].shape}, not the input's {result.grid.shape_zyx}"
                )
        if out is not None:
            summary = dict(
                result.raw, files={n: p.name for n, p in result.paths.items()}, source={"server": self.base_url}
            )
            (out / SUMMARY_NAME).write_text(json.dumps(summary, indent=2))
            result.paths["summary"] = out / SUMMARY_NAME
        return result

    def result(self, result_id: str) -> InferenceResult:
        """``GET /results/{id}``: a stored result's reply (volumes not fetched; see :meth:`fetch_volumes`)."""
        return InferenceResult.from_reply(self.get_json(f"/results/{url_segment(result_id)}"))

    def delete_result(self, result_id: str, *, missing_ok: bool = True) -> None:
        """``DELETE /results/{id}``."""
        try:
            self.delete(f"/results/{url_segment(result_id)}")
        except NotFoundError:
            if not missing_ok:
                raise


# --------------------------------------------------------------------------------------------- datasets
class DatasetResources(Transport):
    """``/datasets``: labelled cases stored on the server for fine-tuning and evaluation."""

    def create_dataset(self, name: str, *, model: Optional[str] = None) -> JSONObject:
        """``POST /datasets`` -> ``{"id", "name", "model", "created"}``. With ``model`` every uploaded case is
        checked against that model's labels at once."""
        return self.post_object("/datasets", {"name": name, **({"model": model} if model else {})})

    def datasets(self) -> List[JSONObject]:
        """``GET /datasets``: ``[{"id", "name", "model", "num_cases", "created"}, ...]``."""
        return json_objects(self.get_object("/datasets").get("datasets"), "/datasets")

    def dataset(self, dataset_id: str) -> JSONObject:
        """``GET /datasets/{id}``: ``{"id", "name", "model", "num_cases", "cases": [{"case_id", "name", ...}]}``."""
        return self.get_object(f"/datasets/{url_segment(dataset_id)}")

    def delete_dataset(self, dataset_id: str) -> None:
        """``DELETE /datasets/{id}`` (``ConflictError`` while a queued or running job uses it)."""
        self.delete(f"/datasets/{url_segment(dataset_id)}")

    def add_case(
        self,
        dataset_id: str,
        image: ImageInput,
        label: ImageInput,
        *,
        name: Optional[str] = None,
        model: Optional[str] = None,
        progress: Optional[ProgressCallback] = None,
        compress_upload: bool = True,
    ) -> JSONObject:
        """``POST /datasets/{id}/cases``: upload one labelled case; returns ``{"case_id", "name", ...}``.

        ``image`` and ``label``: file paths or ``(array_zyx, Grid)`` (sent as NRRD, gzip-compressed by default).
        The server checks the pair on arrival; a bad one raises ``InvalidInputError`` naming the problem.
        """
        files = {
            "image": file_part(image, "image.nrrd" if isinstance(image, tuple) else None, compress=compress_upload),
            "label": file_part(label, "label.nrrd" if isinstance(label, tuple) else None, compress=compress_upload),
        }
        fields = {k: v for k, v in (("name", name), ("model", model)) if v}
        where = f"/datasets/{url_segment(dataset_id)}/cases"
        return json_object(self._json(self.post_multipart(where, fields, files, progress=progress)), where)

    def delete_case(self, dataset_id: str, case_id: str) -> None:
        """``DELETE /datasets/{id}/cases/{case_id}``."""
        self.delete(f"/datasets/{url_segment(dataset_id)}/cases/{url_segment(case_id)}")

    def upload_dataset(
        self,
        images_dir: PathLike,
        labels_dir: PathLike,
        *,
        name: Optional[str] = None,
        model: Optional[str] = None,
        dataset_id: Optional[str] = None,
        on_case: Optional[Callable[[int, int, str], None]] = None,
    ) -> JSONObject:
        """Upload every (image, label) pair of two folders (same file names; the type may differ) as one dataset.

        Pairs are checked locally first (a missing label or a label without an image is reported before anything
        is sent), then each case is uploaded and checked by the server. Adds to ``dataset_id`` when given, else
        creates a dataset named ``name`` (default: the images folder's name, or its parent's for ``images/``).
        ``on_case(index, total, file_name)`` is called before each upload. Returns :meth:`dataset`'s reply.
        """
        pairs = pair_folders(images_dir, labels_dir)
        if dataset_id is None:
            folder = Path(images_dir).resolve()
            default = folder.parent.name if folder.name.lower() in ("images", "imagestr") else folder.name
            dataset_id = self.create_dataset(name or default or "uploaded cases", model=model)["id"]
        for i, (img, lab) in enumerate(pairs):
            if on_case is not None:
                on_case(i, len(pairs), img.name)
            try:
                self.add_case(dataset_id, img, lab, model=model)
            except InvalidInputError as e:
                raise type(e)(f"{img.name}: {e.detail}", code=e.code) from None
        return self.dataset(dataset_id)


def pair_folders(images_dir: PathLike, labels_dir: PathLike) -> List[Tuple[Path, Path]]:
    """(image, label) pairs of two folders with the same file names (a label may differ only in its type).

    Only uploadable files count (:data:`~acecal.protocol.UPLOAD_SUFFIXES`). Raises ``InvalidInputError`` listing
    every image without a label and every label without an image.
    """
    images_dir, labels_dir = Path(images_dir), Path(labels_dir)
    for d in (images_dir, labels_dir):
        if not d.is_dir():
            raise InvalidInputError(f"no such folder: {d}")

    def files(d: Path) -> Dict[str, Path]:
        out: Dict[str, Path] = {}
        for p in sorted(d.iterdir()):
            key = image_stem(p.name, UPLOAD_SUFFIXES) if p.is_file() and not p.name.startswith(".") else None
            if key is not None:
                out.setdefault(key, p)
        return out

    imgs, labs = files(images_dir), files(labels_dir)
    problems = [f"{imgs[k].name}: no label with the same name in {labels_dir}" for k in imgs if k not in labs]
    problems += [f"{labs[k].name}: a label without an image in {images_dir}" for k in labs if k not in imgs]
    if problems:
        raise InvalidInputError("the folders do not pair up:\n  " + "\n  ".join(problems))
    if not imgs:
        raise InvalidInputError(f"no images ({', '.join(UPLOAD_SUFFIXES)}) in {images_dir}")
    return [(imgs[k], labs[k]) for k in imgs]


# --------------------------------------------------------------------------------------------- fine-tuning jobs
class JobResources(Transport):
    """``/finetune`` and ``/jobs``: fine-tuning jobs (job views: :class:`acecal.protocol.JobInfo`)."""

    def finetune(
        self, base_model: str, dataset: str, *, loss: str = "hardl1ace_dice_ce", epochs: int = 20, **options: Any
    ) -> JSONObject:
        """``POST /finetune``: queue a fine-tuning job; returns ``{"job_id", "status", "model_id", "url"}``.

        ``options``: ``lr``, ``freeze_encoder``, ``val_fraction``, ``val_cases``, ``val_every``, ``batch_size``,
        ``num_samples``, ``patch_size``, ``loss_params``, ``fit_temperature``, ``seed``, ``model_id``,
        ``description`` (see the server's ``/docs``). ``model_id`` is the id the new model gets on success.
        """
        payload = {
            "base_model": base_model,
            "dataset": dataset,
            "loss": loss,
            "epochs": int(epochs),
            **{k: v for k, v in options.items() if v is not None},
        }
        return self.post_object("/finetune", payload)

    def jobs(self, status: Optional[str] = None, limit: int = 100) -> List[JSONObject]:
        """``GET /jobs``: the jobs, newest first (optionally only those in ``status``)."""
        params: Dict[str, Any] = {"limit": limit}
        if status:
            params["status"] = status
        return json_objects(self.get_object("/jobs", params=params).get("jobs"), "/jobs")

    def job(self, job_id: str, *, wait: Optional[float] = None, after: Optional[int] = None) -> JSONObject:
        """``GET /jobs/{id}``: ``{"status", "progress", "metrics", "model_id", "error", "log_tail", "rev", ...}``.

        With ``wait`` (seconds, at most 30) the server answers as soon as the job changes from revision ``after``
        (default: its current one), or when ``wait`` runs out.
        """
        params: Dict[str, Any] = {}
        timeout = None
        if wait:
            params["wait"] = min(float(wait), 30.0)
            timeout = (self.timeout[0], max(self.timeout[1], params["wait"] + 30.0))
            if after is not None:
                params["after"] = int(after)
        return self.get_object(f"/jobs/{url_segment(job_id)}", params=params, timeout=timeout)

    def cancel_job(self, job_id: str) -> JSONObject:
        """``DELETE /jobs/{id}``: cancel (a running job stops within seconds and publishes nothing)."""
        return self.delete_object(f"/jobs/{url_segment(job_id)}")

    def wait_job(
        self,
        job_id: str,
        *,
        timeout: Optional[float] = None,
        poll_s: float = 15.0,
        on_update: Optional[Callable[[JSONObject], None]] = None,
    ) -> JSONObject:
        """Follow a job (long-polling) until it succeeds, fails or is cancelled; returns the final job.

        ``on_update(job)`` is called with every new state. ``ServerTimeoutError`` if ``timeout`` seconds pass first
        (the job goes on).
        """
        deadline = None if timeout is None else time.monotonic() + float(timeout)
        job = self.job(job_id)
        seen = JobInfo.from_json(job)
        if on_update is not None:
            on_update(job)
        while not seen.final:
            wait = poll_s
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ServerTimeoutError(f"job {job_id} is still {seen.status} after {timeout:g} s")
                wait = max(0.1, min(wait, left))
            job = self.job(job_id, wait=wait, after=seen.rev)
            new = JobInfo.from_json(job)
            if on_update is not None and (new.rev, new.status) != (seen.rev, seen.status):
                on_update(job)
            seen = new
        return job


# --------------------------------------------------------------------------------------------- evaluation
class EvaluationResources(Transport):
    """``/evaluate``: calibration and overlap metrics of a model on a stored dataset."""

    def evaluate(
        self,
        model_id: str,
        dataset: str,
        *,
        temperature: bool = False,
        cases: Optional[Sequence[str]] = None,
        out_dir: Optional[PathLike] = None,
        raw: bool = False,
    ) -> JSONObject:
        """``POST /evaluate/{model_id}`` on a stored dataset: Dice/ACE/ECE/MCE (macro, micro, per class, per case),
        the ACE floor, the flags' error detection and the figures' URL paths; ``raw``: the network's own softmax
        instead of the served probabilities. With ``out_dir`` the reply (``evaluation.json``) and every reliability
        PNG are saved there (``figures/<name>.png``); ``reply["files"]`` then maps URL paths to local files."""
        payload: Dict[str, Any] = {"dataset": dataset, "temperature": bool(temperature)}
        if raw:
            payload["raw"] = True
        if cases:
            payload["cases"] = list(cases)
        reply = self.post_object(f"/evaluate/{url_segment(model_id)}", payload)
        if out_dir is not None:
            out = Path(out_dir)
            (out / "figures").mkdir(parents=True, exist_ok=True)
            figures = reply[EVAL_FIGURES]
            urls = [figures.get(EVAL_FIGURES_DATASET)] + list((figures.get(EVAL_FIGURES_CASES) or {}).values())
            files = {}
            for url in (u for u in urls if u):
                dest = out / "figures" / url.rsplit("/", 1)[-1]
                self.download(url, dest, stage="download:figure")
                files[url] = str(dest)
            reply = dict(reply, files=files)
            (out / "evaluation.json").write_text(json.dumps(reply, indent=2))
        return reply
