"""The model bundle: a self-describing, immutable folder ``<id>/`` with

- ``bundle.json``      :class:`BundleConfig` (network, labels, geometry, normalisation, sliding window, loss,
                        temperature, validation metrics, training record);
- ``model.safetensors`` the network weights (float32 by default, float16 on request);
- ``calibrator.safetensors`` the post-hoc calibrator's weights, when it has any (``BundleConfig.calibrator``);
- ``README.md``        the model card.

A bundle is published atomically: written into a hidden sibling folder, then renamed into place, so a reader never
sees half a bundle and a crash leaves no bundle at all.

Reading ``bundle.json`` needs pydantic only: torch, safetensors and MONAI are imported where weights are read or
written and networks built, so the server's settings, schemas and storage use bundles without loading them.
"""

from __future__ import annotations

import datetime as _dt
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from acecal.errors import BundleError
from acecal.storage.files import fsync_path

if TYPE_CHECKING:  # the torch boundary: torch is imported by the functions that build or load networks
    import torch

CONFIG_NAME = "bundle.json"
WEIGHTS_NAME = "model.safetensors"
CARD_NAME = "README.md"
FORMAT_VERSION = 1
ID_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"


class NetworkConfig(BaseModel):
    """A network and its keyword arguments (``spatial_dims``, channels excluded): MONAI's ``SegResNet`` /
    ``SegResNetDS``, or ``SegResNetTwoHead`` (``acecal.networks``: segmentation + calibration head, 2C outputs)."""

    model_config = ConfigDict(extra="forbid")
    name: Literal["SegResNet", "SegResNetDS", "SegResNetTwoHead"] = "SegResNet"
    args: dict[str, Any] = Field(default_factory=dict)


class IntensityConfig(BaseModel):
    """Intensity normalisation applied in model space, identical at training and inference.

    ``zscore_nonzero``: per-channel z-score over non-zero voxels (MRI). ``clip_scale``: clip to [a_min, a_max] and
    scale to [b_min, b_max] (CT in Hounsfield units).
    """

    model_config = ConfigDict(extra="forbid")
    mode: Literal["zscore_nonzero", "zscore", "clip_scale"] = "zscore_nonzero"
    a_min: Optional[float] = None
    a_max: Optional[float] = None
    b_min: float = 0.0
    b_max: float = 1.0

    @model_validator(mode="after")
    def _clip_needs_range(self) -> IntensityConfig:
        if self.mode == "clip_scale" and (self.a_min is None or self.a_max is None or self.a_min >= self.a_max):
            raise ValueError("intensity mode clip_scale needs a_min < a_max")
        return self


class LossRecord(BaseModel):
    """The training loss by registry name (see ``acecal.losses.registry``) and its overridden parameters."""

    name: str
    params: dict[str, Any] = Field(default_factory=dict)


CALIBRATOR_WEIGHTS_NAME = "calibrator.safetensors"


class CalibratorConfig(BaseModel):
    """A post-hoc calibrator applied to the network's model-space logits (``acecal.calibration``): it rescales them
    by a positive temperature per voxel, so the label map never changes.

    ``kind``: ``temperature`` (one global T, ``params = {"temperature": T}``) or ``local_temperature`` (a small CNN
    predicting T per voxel; ``params`` are its constructor arguments, its weights are the file ``weights`` in the
    bundle folder). ``fitted_on`` says on which cases and how it was fitted; ``metrics`` holds the raw and calibrated
    figures (``cross_fitted``: measured on cases the calibrator did not see; ``in_sample``: the shipped calibrator on
    the cases it was fitted on).
    """

    model_config = ConfigDict(extra="forbid")
    kind: Literal["temperature", "local_temperature"]
    params: dict[str, Any] = Field(default_factory=dict)
    weights: Optional[str] = Field(
        None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$",
        description="file in the bundle folder holding the calibrator's weights",
    )
    fitted_on: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _weights_when_needed(self) -> CalibratorConfig:
        if self.kind == "local_temperature" and not self.weights:
            raise ValueError("a local_temperature calibrator needs its weights file")
        if self.kind == "temperature":
            t = self.params.get("temperature")
            if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t < float("inf"):
                raise ValueError("a temperature calibrator needs params.temperature > 0")
        return self


class BundleConfig(BaseModel):
    """Everything needed to run a model and to know how far to trust it (``bundle.json``)."""

    model_config = ConfigDict(extra="allow")

    format_version: int = FORMAT_VERSION
    id: str = Field(pattern=ID_PATTERN)
    description: str = ""
    network: NetworkConfig = Field(default_factory=NetworkConfig)
    labels: dict[str, str] = Field(description="label value (as a string) -> name; '0' is the background")
    in_channels: int = Field(1, ge=1)
    modality: str = "MRI"
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    orientation: str = "RAS"
    intensity: IntensityConfig = Field(default_factory=IntensityConfig)
    roi_size: tuple[int, int, int] = (64, 64, 64)
    sw_overlap: float = Field(0.25, ge=0.0, lt=1.0)
    sw_mode: Literal["gaussian", "constant"] = "gaussian"
    sw_batch_size: int = Field(4, ge=1)
    tta: Literal["none", "axis_flips", "all_flips"] = Field(
        "none",
        description="flip test-time augmentation, softmax averaged over: the identity and the 3 single-axis "
        "flips (axis_flips, 4 passes) or all 8 flip combinations (all_flips); none = one pass",
    )
    loss: LossRecord = Field(default_factory=lambda: LossRecord(name="baseline_dice_ce"))
    temperature: Optional[float] = Field(None, gt=0.0, description="fitted post-hoc temperature; None = not fitted")
    calibrator: Optional[CalibratorConfig] = Field(
        None, description="post-hoc calibrator applied at inference; takes precedence over `temperature`"
    )
    uncertainty_threshold: float = Field(
        0.8, gt=0.0, le=1.0, description="default confidence below which boundary voxels are flagged as uncertain"
    )
    metrics: dict[str, Any] = Field(default_factory=dict, description="measured validation metrics")
    training: dict[str, Any] = Field(default_factory=dict, description="how it was trained: data, split, epochs, time")
    parent: Optional[str] = Field(None, description="id of the bundle this one was fine-tuned from")
    weights: str = WEIGHTS_NAME
    created: str = Field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))

    @field_validator("labels")
    @classmethod
    def _labels_are_contiguous(cls, v: dict[str, str]) -> dict[str, str]:
        try:
            keys = sorted(int(k) for k in v)
        except ValueError as e:
            raise ValueError(f"label keys must be integers as strings, got {list(v)}") from e
        if keys != list(range(len(keys))) or len(keys) < 2:
            raise ValueError(f"labels must be 0..N-1 with N >= 2 (0 = background), got {keys}")
        return {str(k): v[str(k)] for k in keys}

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def class_names(self) -> list[str]:
        return [self.labels[str(i)] for i in range(self.num_classes)]

    def default_threshold(self, calibrated: bool = True) -> float:
        """The default uncertainty threshold for the confidence being served: ``uncertainty_threshold`` (set for
        the calibrated confidence when the bundle has a calibrator), or with the calibrator switched off the
        network's own, which ``acecal calibrate`` records as ``fitted_on.uncertainty_threshold.base_value``."""
        if calibrated or self.calibrator is None:
            return self.uncertainty_threshold
        base = (self.calibrator.fitted_on.get("uncertainty_threshold") or {}).get("base_value")
        return float(base) if isinstance(base, (int, float)) and 0.0 < base <= 1.0 else self.uncertainty_threshold


class Bundle:
    """A bundle folder on disk. Cheap to create; the network is built and loaded on demand."""

    def __init__(self, path: str | os.PathLike, config: BundleConfig):
        self.path = Path(path)
        self.config = config

    @property
    def id(self) -> str:
        return self.config.id

    @classmethod
    def load(cls, path: str | os.PathLike) -> Bundle:
        path = Path(path)
        cfg_file = path / CONFIG_NAME
        if not cfg_file.is_file():
            raise BundleError(f"{path} is not a model bundle: {CONFIG_NAME} is missing")
        try:
            config = BundleConfig.model_validate_json(cfg_file.read_text())
        except Exception as e:  # pydantic.ValidationError or JSON error
            raise BundleError(f"{cfg_file} is not a valid bundle config: {e}") from e
        if not (path / config.weights).is_file():
            raise BundleError(f"bundle {config.id} at {path} has no weights file {config.weights}")
        if (
            config.calibrator is not None
            and config.calibrator.weights
            and not (path / config.calibrator.weights).is_file()
        ):
            raise BundleError(
                f"bundle {config.id} at {path} has no calibrator weights file {config.calibrator.weights}"
            )
        return cls(path, config)

    @property
    def weights_path(self) -> Path:
        return self.path / self.config.weights

    @property
    def calibrator_path(self) -> Optional[Path]:
        """The calibrator's weights file, None when the bundle's calibrator has none (or there is no calibrator)."""
        c = self.config.calibrator
        return self.path / c.weights if c is not None and c.weights else None

    @property
    def card_path(self) -> Path:
        return self.path / CARD_NAME

    def describe(self) -> dict[str, Any]:
        """The model as ``GET /models`` and ``acecal models`` describe it (JSON-able)."""
        c = self.config
        return {
            "id": c.id,
            "description": c.description,
            "labels": dict(c.labels),
            "loss": c.loss.name,
            "loss_params": dict(c.loss.params),
            "metrics": dict(c.metrics),
            "temperature": c.temperature,
            "uncertainty_threshold": c.uncertainty_threshold,
            "modality": c.modality,
            "in_channels": c.in_channels,
            "spacing": list(c.spacing),
            "orientation": c.orientation,
            "roi_size": list(c.roi_size),
            "parent": c.parent,
            "created": c.created,
        }

    def build_network(self) -> torch.nn.Module:
        """The untrained MONAI network described by the config (torch is imported here, not at module import)."""
        return build_network(self.config)

    def state_dict(self) -> dict:
        from safetensors.torch import load_file  # torch boundary (see the module docstring)

        try:
            sd = load_file(str(self.weights_path))
        except Exception as e:
            raise BundleError(f"cannot read weights of bundle {self.id} ({self.weights_path}): {e}") from e
        return {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}

    def load_network(self, device: Any = "cpu") -> torch.nn.Module:
        """Build the network, load the weights strictly, move to ``device`` and switch to eval mode."""
        net = self.build_network()
        try:
            net.load_state_dict(self.state_dict(), strict=True)
        except RuntimeError as e:
            raise BundleError(f"weights of bundle {self.id} do not fit its network config: {e}") from e
        return net.to(device).eval()

    def __repr__(self) -> str:  # pragma: no cover
        return f"Bundle(id={self.id!r}, path={str(self.path)!r})"


def build_network(config: BundleConfig) -> torch.nn.Module:
    """The untrained network of ``config``: ``acecal.networks`` first (two heads), then MONAI's ``nets``."""
    # torch boundary (see the module docstring): acecal.networks and MONAI import torch
    from monai.networks import nets

    from acecal import networks

    cls = getattr(networks, config.network.name, None) or getattr(nets, config.network.name)
    return cls(spatial_dims=3, in_channels=config.in_channels, out_channels=config.num_classes, **config.network.args)


def write_bundle(
    parent_dir: str | os.PathLike,
    config: BundleConfig,
    state_dict: dict,
    card: str,
    *,
    half_precision: bool = False,
    overwrite: bool = False,
    extra_files: Optional[dict[str, Path]] = None,
) -> Bundle:
    """Publish a bundle ``parent_dir/<config.id>`` atomically and return it.

    Args:
        parent_dir: the models folder (shipped ``models/`` or a data directory's ``models/``).
        config: the bundle config; ``config.weights`` names the weights file.
        state_dict: the network's ``state_dict()`` (moved to the CPU and made contiguous here).
        card: the model card's Markdown text.
        half_precision: store floating-point weights as float16 (half the size, loaded back as float32).
        overwrite: replace an existing bundle with the same id (otherwise that is an error).
        extra_files: name -> source path of files to copy in (figures for the card, say).
    """
    # torch boundary (see the module docstring)
    import torch
    from safetensors.torch import save_file

    parent = Path(parent_dir)
    parent.mkdir(parents=True, exist_ok=True)
    final = parent / config.id
    if final.exists() and not overwrite:
        raise BundleError(f"a bundle with id {config.id!r} already exists in {parent}; choose another id")
    tmp = Path(tempfile.mkdtemp(prefix=f".{config.id}.", dir=parent))
    try:
        tensors = {}
        for k, v in state_dict.items():
            t = v.detach().to("cpu").contiguous()
            if half_precision and t.is_floating_point():
                t = t.to(torch.float16)
            tensors[k] = t
        save_file(tensors, str(tmp / config.weights))
        (tmp / CONFIG_NAME).write_text(config.model_dump_json(indent=2) + "\n")
        (tmp / CARD_NAME).write_text(card)
        for name, src in (extra_files or {}).items():
            shutil.copyfile(src, tmp / name)
        for f in tmp.iterdir():  # make the bundle durable before it becomes visible
            fsync_path(f)
        if final.exists():
            old = parent / f".{config.id}.old"
            shutil.rmtree(old, ignore_errors=True)
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Bundle.load(final)


def valid_id(model_id: str) -> bool:
    """Whether ``model_id`` is a valid bundle id (:data:`ID_PATTERN`)."""
    return re.match(ID_PATTERN, model_id) is not None
