"""Server settings: pydantic-settings with ``ACECAL_`` environment variables; ``acecal serve`` flags override them.

| setting | env | default |
|---|---|---|
| host | ``ACECAL_HOST`` | ``127.0.0.1`` (loopback only) |
| port | ``ACECAL_PORT`` | ``8000`` |
| data_dir | ``ACECAL_DATA_DIR`` | ``~/.acecal`` (results, temporary uploads, user models) |
| models_dirs | ``ACECAL_MODELS_DIRS`` (``os.pathsep``-separated or a JSON list) | the shipped ``models/`` |
| api_key | ``ACECAL_API_KEY`` | none (no authentication) |
| default_model | ``ACECAL_DEFAULT_MODEL`` | ``hippocampus-ace``; when not served, the first model ``/models`` lists |
| max_upload_mb | ``ACECAL_MAX_UPLOAD_MB`` | ``2048`` |
| max_voxels | ``ACECAL_MAX_VOXELS`` | from the machine's memory (64 bytes per voxel), at least 512 x 512 x 1024 |
| max_model_voxels | ``ACECAL_MAX_MODEL_VOXELS`` | the same: voxels of an image resampled to a model's spacing |
| result_ttl_s | ``ACECAL_RESULT_TTL_S`` | ``3600`` (results are deleted one hour after they were made) |
| queue_size | ``ACECAL_QUEUE_SIZE`` | ``8`` (inference requests waiting beyond the running ones; more -> 503) |
| inference_workers | ``ACECAL_INFERENCE_WORKERS`` | ``1`` (concurrent forward passes on the device) |
| device | ``ACECAL_DEVICE`` | ``auto`` (first CUDA GPU, else CPU) |
| max_loaded_models | ``ACECAL_MAX_LOADED_MODELS`` | ``4`` (networks kept in memory, least recently used dropped) |
| cors_origins | ``ACECAL_CORS_ORIGINS`` | none (no CORS headers) |
| job_slots | ``ACECAL_JOB_SLOTS`` | ``1`` (fine-tuning jobs running at once: one per device) |
| job_queue_size | ``ACECAL_JOB_QUEUE_SIZE`` | ``16`` (queued fine-tuning jobs beyond the running ones; more -> 503) |
| job_threads | ``ACECAL_JOB_THREADS`` | half the CPU cores, at most 4 (torch threads of a job process) |
| job_max_epochs | ``ACECAL_JOB_MAX_EPOCHS`` | ``1000`` |
| job_resume | ``ACECAL_JOB_RESUME`` | ``true`` (a job cut short by a stop or crash resumes from its checkpoint) |
| job_min_free_mb | ``ACECAL_JOB_MIN_FREE_MB`` | ``200`` (free disk space a job needs to start) |
| job_cancel_grace_s | ``ACECAL_JOB_CANCEL_GRACE_S`` | ``10`` (a cancelled job process is killed after this) |
| job_gpu_memory_fraction | ``ACECAL_JOB_GPU_MEMORY_FRACTION`` | ``0.6`` (GPU share of a job; the rest is inference's) |
| job_start_method | ``ACECAL_JOB_START_METHOD`` | ``forkserver`` (fork from a process holding torch); ``subprocess`` |

Every default works on a laptop without a GPU.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from acecal.bundles import default_data_dir, default_models_dir
from acecal.data.headers import ImageLimits, default_max_model_voxels, default_max_voxels

#: the model ``POST /infer`` (no model id), ``acecal infer --server`` without ``--model`` and the Slicer module use
#: unless the user chooses one
DEFAULT_MODEL = "hippocampus-ace"


def _split_paths(v: Any) -> Any:
    if v is None:
        return v
    if isinstance(v, (str, os.PathLike)):
        s = str(v).strip()
        if s.startswith("["):
            return json.loads(s)
        return [p for p in s.split(os.pathsep) if p]
    return v


class Settings(BaseSettings):
    """Everything the server needs to start; see the module docstring for the environment variables."""

    model_config = SettingsConfigDict(env_prefix="ACECAL_", extra="ignore", validate_default=True)

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    data_dir: Path = Field(default_factory=default_data_dir)
    models_dirs: Annotated[list[Path], NoDecode] = Field(default_factory=lambda: [default_models_dir()])
    api_key: Optional[SecretStr] = None
    default_model: str = Field(DEFAULT_MODEL, min_length=1, description="the model POST /infer runs without an id")
    max_upload_mb: float = Field(2048.0, gt=0)
    max_voxels: int = Field(default_factory=default_max_voxels, ge=1)
    max_model_voxels: int = Field(default_factory=default_max_model_voxels, ge=1)
    result_ttl_s: float = Field(3600.0, gt=0)
    queue_size: int = Field(8, ge=0)
    inference_workers: int = Field(1, ge=1)
    device: str = "auto"
    max_loaded_models: int = Field(4, ge=1)
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    log_level: str = "info"
    # fine-tuning jobs (acecal.jobs)
    job_slots: int = Field(1, ge=1)
    job_queue_size: int = Field(16, ge=0)
    job_threads: Optional[int] = Field(None, ge=1)
    job_max_epochs: int = Field(1000, ge=1)
    job_resume: bool = True
    job_min_free_mb: float = Field(200.0, ge=0)
    job_cancel_grace_s: float = Field(10.0, gt=0)
    job_gpu_memory_fraction: Optional[float] = Field(0.6, gt=0, le=1)
    job_start_method: Literal["forkserver", "subprocess"] = "forkserver"

    @field_validator("models_dirs", mode="before")
    @classmethod
    def _paths(cls, v: Any) -> Any:
        return _split_paths(v)

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _origins(cls, v: Any) -> Any:
        if isinstance(v, str):
            s = v.strip()
            return json.loads(s) if s.startswith("[") else [o.strip() for o in s.split(",") if o.strip()]
        return v

    @field_validator("data_dir", mode="after")
    @classmethod
    def _expand(cls, v: Path) -> Path:
        return Path(os.path.expanduser(str(v)))

    @field_validator("models_dirs", mode="after")
    @classmethod
    def _expand_all(cls, v: list[Path]) -> list[Path]:
        return [Path(os.path.expanduser(str(p))) for p in v]

    @field_validator("api_key", mode="after")
    @classmethod
    def _empty_key_is_none(cls, v: Optional[SecretStr]) -> Optional[SecretStr]:
        if v is None or not v.get_secret_value():
            return None
        key = v.get_secret_value()
        if not all(33 <= ord(c) < 127 for c in key):
            raise ValueError("the API key must be printable ASCII without spaces (it travels in an HTTP header)")
        return v

    # --- derived paths ---------------------------------------------------------------------------------------------
    @property
    def results_dir(self) -> Path:
        return self.data_dir / "results"

    @property
    def tmp_dir(self) -> Path:
        return self.data_dir / "tmp"

    @property
    def user_models_dir(self) -> Path:
        """Where fine-tuned bundles are published (searched after ``models_dirs``)."""
        return self.data_dir / "models"

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    def image_limits(self) -> ImageLimits:
        """What the server's readers accept (set around every request's file work with
        :func:`acecal.data.headers.image_limits`); files the server reads all have names it chose: no symlinks."""
        return ImageLimits(self.max_voxels, self.max_model_voxels, follow_symlinks=False, server=True)
