"""Training configuration: one pydantic model, loadable from JSON or YAML, overridable by CLI flags.

Every default works on a laptop without a GPU. The model-space fields (network, spacing, orientation, intensity,
roi) become the published bundle's config; when fine-tuning (``base`` set) they are inherited from the base bundle
and the values given here are ignored.
"""

from __future__ import annotations

import datetime as _dt
import json
import re
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from acecal.bundles.bundle import ID_PATTERN, IntensityConfig, NetworkConfig


def default_network() -> NetworkConfig:
    return NetworkConfig(
        name="SegResNet", args={"init_filters": 16, "blocks_down": [1, 2, 2, 4], "blocks_up": [1, 1, 1]}
    )


class TrainConfig(BaseModel):
    """How to train (or fine-tune) one model. See ``docs/training.md``."""

    model_config = ConfigDict(extra="forbid")

    # --- data ------------------------------------------------------------------------------------------------------
    data: Optional[str] = Field(None, description="dataset.json, or a folder with dataset.json or images/ + labels/")
    images: Optional[str] = Field(None, description="images folder (with `labels`), instead of `data`")
    labels_dir: Optional[str] = Field(None, description="labels folder, same file names as the images")
    val_fraction: float = Field(0.2, ge=0.0, lt=1.0)
    val_cases: Optional[list[str]] = Field(None, description="explicit validation case names (overrides val_fraction)")
    split_seed: Optional[int] = Field(None, description="seed of the train/val split (default: seed)")
    data_source: str = Field("", description="data source for the model card (default: from dataset.json)")
    data_licence: str = Field("", description="data licence for the model card (default: from dataset.json)")

    # --- model space (ignored when fine-tuning: inherited from the base bundle) --------------------------------------
    labels: Optional[dict[str, str]] = Field(None, description="label value -> name (default: dataset.json labels)")
    network: NetworkConfig = Field(default_factory=default_network)
    in_channels: int = Field(1, ge=1)
    modality: str = "MRI"
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    orientation: str = "RAS"
    intensity: IntensityConfig = Field(default_factory=IntensityConfig)
    roi_size: tuple[int, int, int] = Field((64, 64, 64), description="sliding-window ROI (validation, inference)")
    patch_size: Optional[tuple[int, int, int]] = Field(
        None,
        description="training patch (default: roi_size). GroupNorm statistics depend on the window: a patch "
        "smaller than the ROI can cost a lot of Dice at inference (docs/training.md)",
    )
    sw_overlap: float = Field(0.25, ge=0.0, lt=1.0)
    sw_batch_size: int = Field(4, ge=1)
    tta: Literal["none", "axis_flips", "all_flips"] = Field(
        "none",
        description="flip test-time augmentation stored in the bundle (served, and the final validation pass; "
        "the per-epoch validation runs without it)",
    )

    # --- fine-tuning -----------------------------------------------------------------------------------------------
    base: Optional[str] = Field(None, description="bundle id or folder to start from (fine-tuning)")
    freeze_encoder: bool = False

    # --- optimisation ----------------------------------------------------------------------------------------------
    loss: str = "baseline_dice_ce"
    loss_params: dict[str, Any] = Field(default_factory=dict)
    loss_warmup_epochs: int = Field(
        0,
        ge=0,
        description="epochs trained with baseline_dice_ce before `loss` takes "
        "over (ACE switched on after a Dice+CE warm-up)",
    )
    epochs: int = Field(100, ge=1)
    batch_size: int = Field(2, ge=1, description="volumes per step (each gives num_samples patches)")
    num_samples: int = Field(2, ge=1, description="patches drawn per volume per step")
    pos_fraction: float = Field(0.5, ge=0.0, le=1.0, description="share of patches centred on foreground")
    augment: bool = True
    lr: float = Field(2e-4, gt=0.0)
    weight_decay: float = Field(1e-5, ge=0.0)
    warmup_epochs: int = Field(2, ge=0)
    warmup_multiplier: float = Field(0.5, ge=0.0, le=1.0)
    val_every: int = Field(10, ge=1)
    seed: int = 12345
    amp: bool = Field(True, description="mixed precision (CUDA only; ignored on the CPU)")
    cpu_bf16: bool = Field(
        False,
        description="bfloat16 autocast on CPUs with native bf16 (AVX512-BF16/AMX); "
        "about 2.5x faster SegResNet steps there, ignored elsewhere",
    )
    device: Optional[str] = Field(None, description="cpu, cuda, cuda:1 ... (default: cuda if available)")
    num_workers: int = Field(0, ge=0)
    cache_rate: float = Field(1.0, ge=0.0, le=1.0)
    num_threads: Optional[int] = Field(None, ge=1, description="torch CPU threads (default: torch's choice)")

    # --- sittings --------------------------------------------------------------------------------------------------
    resume: bool = Field(False, description="continue from the last checkpoint in work_dir")
    stop_after_epochs: Optional[int] = Field(
        None, ge=1, description="stop (resumable) after this many epochs in this sitting"
    )
    time_limit_minutes: Optional[float] = Field(
        None, gt=0, description="stop (resumable) after the epoch that passes this"
    )

    # --- output ----------------------------------------------------------------------------------------------------
    out_dir: Optional[str] = Field(None, description="models folder to publish into (default: <data dir>/models)")
    model_id: Optional[str] = Field(None, description="new bundle id (default: generated)")
    work_dir: Optional[str] = Field(None, description="checkpoints + log (default: <data dir>/runs/<id>)")
    log_file: Optional[str] = Field(None, description="JSON-lines log (default: <work_dir>/train.jsonl)")
    overwrite: bool = False
    description: str = ""
    fit_temperature: bool = False
    uncertainty_accuracy: float = Field(0.9, gt=0.5, lt=1.0, description="target accuracy for uncertainty_threshold")
    half_precision: bool = False
    publish: bool = True
    command: str = Field("", description="the command line, recorded in the model card")

    @field_validator("model_id")
    @classmethod
    def _id_ok(cls, v: Optional[str]) -> Optional[str]:
        if v is not None and not re.match(ID_PATTERN, v):
            raise ValueError(f"model id {v!r} must be lower-case letters, digits, '.', '_' or '-' (max 64)")
        return v

    @model_validator(mode="after")
    def _data_given(self) -> TrainConfig:
        if self.data is None and self.images is None:
            raise ValueError("give the training data: `data` (dataset.json or folder) or `images` + `labels_dir`")
        if self.images is not None and self.labels_dir is None:
            raise ValueError("`images` needs `labels_dir` (a folder of label maps with the same file names)")
        return self

    # --- helpers ---------------------------------------------------------------------------------------------------
    def resolved_id(self) -> str:
        if self.model_id:
            return self.model_id
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        if self.base:
            stem = Path(self.base).name.lower()
            return f"{stem[:40]}-ft-{stamp}"
        return f"{self.loss.split('_')[0].lower()}-{stamp}"

    @classmethod
    def from_file(cls, path: str | Path, **overrides: Any) -> TrainConfig:
        """Load a JSON or YAML file; ``overrides`` (non-None values) win over the file."""
        p = Path(path)
        text = p.read_text()
        if p.suffix.lower() in (".yaml", ".yml"):
            import yaml  # PyYAML is optional: only YAML settings files need it

            raw = yaml.safe_load(text) or {}
        else:
            raw = json.loads(text)
        if not isinstance(raw, dict):
            raise ValueError(f"{p.name} must hold a mapping of training settings")
        raw.update({k: v for k, v in overrides.items() if v is not None})
        # relative data paths in a config file are relative to the file
        for key in ("data", "images", "labels_dir"):
            if raw.get(key) and not Path(raw[key]).is_absolute() and key not in overrides:
                raw[key] = str((p.parent / raw[key]).resolve())
        return cls.model_validate(raw)

    def result_affecting(self) -> dict:
        """The settings that change the trained weights (compared on resume)."""
        skip = {
            "resume",
            "stop_after_epochs",
            "time_limit_minutes",
            "out_dir",
            "log_file",
            "overwrite",
            "description",
            "fit_temperature",
            "uncertainty_accuracy",
            "half_precision",
            "publish",
            "command",
            "num_workers",
            "num_threads",
            "work_dir",
            "data_source",
            "data_licence",
            "epochs",
            "val_every",
            "device",
            "amp",
            "cpu_bf16",
            "tta",
        }
        return {k: v for k, v in self.model_dump(mode="json").items() if k not in skip}


Device = Literal["cpu", "cuda"]
